"""The HTTP server: FastAPI around a model artifact, with dynamic batching across requests.

    POST /v1/predict   {"inputs": [...], "top_k": 1} → {"predictions": [{"label", "score", "top_k": [...]}, ...]}
    POST /v1/generate  language models: {"prompt": "...", "max_new_tokens": 200, "temperature": 0.8, "top_k",
                       "top_p", "repetition_penalty", "stop": [...], "seed", "stream": false} → {"text": "..."}, or
                       with "stream": true, Server-Sent Events `data: {"text": "<piece>"}` ... `data: [DONE]`
    POST /v1/translate translation models: {"inputs": ["..."], "beam_size": 4} → {"translations": ["..."]}
    POST /v1/transcribe speech recognition models: {"inputs": [{"audio_base64": "..."}], "beam_size": 8} →
                       {"transcripts": ["..."]}
    POST /v1/explain   the inputs of /v1/predict plus "method" (saliency, integrated_gradients, gradcam, occlusion,
                       lime, kernel_shap, activations) and "target" → {"explanations": [{"prediction", "target",
                       "heatmap_png" (images: a data: URI), "tokens" (text), "scores" / "columns", ...}]}
    GET  /healthz      liveness and what is served
    GET  /metrics      Prometheus text: requests, inputs, latency and batch-size histograms
    GET  /             a page to try the model (draw or upload an image, type text, paste a sequence)
    GET  /docs         OpenAPI (Swagger UI); /openapi.json

Each input is a string (text models), `{"image_base64": "..."}` (PNG/JPEG/BMP; image models), `{"audio_base64":
"..."}` (WAV/FLAC/Ogg/MP3; audio models), `{"array": [...]}` (nested numbers: an image as (C, H, W) or (H, W) pixel
values 0..255, a sequence as (T, F), mono audio samples at the model's rate) or a table row
`{"column": value, ...}` (tabular models); the task spec (`serve_item`) says which a model takes. Inputs go through the
artifact's own preprocessing and prediction code, so the answers are those of `bigmodel predict`.
Client mistakes are 4xx (422 malformed, 413 too large, 401 without the API key), never 500.
"""

from __future__ import annotations

import hmac
import threading
import time
from collections.abc import Iterator
from contextlib import asynccontextmanager, contextmanager
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from bigmodel.models.base import Capability
from bigmodel.runs import Artifact
from bigmodel.serving.batcher import DynamicBatcher
from bigmodel.tasks.base import InputError

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ImageInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image_base64: Annotated[str, Field(min_length=1, description="A PNG/JPEG/BMP file, base64-encoded.")]


class AudioInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    audio_base64: Annotated[
        str, Field(min_length=1, description="A WAV/FLAC/Ogg/MP3 file (any rate, any channels), base64-encoded.")
    ]


class ArrayInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    array: Annotated[list[Any], Field(min_length=1, description="Nested numbers in the model's input shape.")]


TableRow = dict[str, str | float | int | bool | None]  # a table row: column → value


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: Annotated[list[str | ImageInput | AudioInput | ArrayInput | TableRow], Field(min_length=1)]
    top_k: Annotated[int, Field(ge=1, le=1000)] = 1


ExplainMethod = Literal[
    "saliency", "integrated_gradients", "gradcam", "occlusion", "lime", "kernel_shap", "activations"
]


class ExplainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: Annotated[list[str | ImageInput | AudioInput | ArrayInput | TableRow], Field(min_length=1)]
    method: ExplainMethod | None = None
    target: Annotated[str | None, Field(description="A label name or index (default: the predicted label).")] = None


class ExplainResponse(BaseModel):
    explanations: list[dict[str, Any]]


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: Annotated[str, Field(max_length=100_000)] = ""
    max_new_tokens: Annotated[int, Field(ge=0, le=4096)] = 200
    temperature: Annotated[float, Field(ge=0.0, le=100.0)] = 0.8
    top_k: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=100.0)] = 1.0
    stop: Annotated[list[Annotated[str, Field(max_length=1000)]], Field(max_length=16)] = []
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None
    stream: bool = False


class GenerateResponse(BaseModel):
    text: str


class TranslateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: Annotated[list[Annotated[str, Field(min_length=1, max_length=10_000)]], Field(min_length=1)]
    beam_size: Annotated[int, Field(ge=1, le=16)] | None = None


class TranslateResponse(BaseModel):
    translations: list[str]


class TranscribeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: Annotated[list[AudioInput | ArrayInput], Field(min_length=1)]
    beam_size: Annotated[int, Field(ge=1, le=64)] | None = None


class TranscribeResponse(BaseModel):
    transcripts: list[str]


class Scored(BaseModel):
    label: str
    score: float


class Prediction(BaseModel):
    label: str
    score: float
    top_k: list[Scored]


class PredictResponse(BaseModel):
    predictions: list[Prediction]


class Metrics:
    """Counters and histograms in the Prometheus text format (no client library needed)."""

    def __init__(self) -> None:
        self.requests: dict[str, int] = {}
        self.inputs = 0
        self.latency = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.batches: dict[int, int] = {}

    def request(self, status: int, seconds: float, n_inputs: int) -> None:
        self.requests[str(status)] = self.requests.get(str(status), 0) + 1
        self.inputs += n_inputs
        self.latency_sum += seconds
        i = next((k for k, b in enumerate(LATENCY_BUCKETS) if seconds <= b), len(LATENCY_BUCKETS))
        self.latency[i] += 1

    @contextmanager
    def counting(self, n_inputs: int) -> Iterator[None]:
        """Time one request and count it with its final status (and its inputs, when it succeeded)."""
        t0 = time.perf_counter()
        status = 200
        try:
            yield
        except HTTPException as e:
            status = e.status_code
            raise
        finally:
            self.request(status, time.perf_counter() - t0, n_inputs if status == 200 else 0)

    def batch(self, size: int) -> None:
        self.batches[size] = self.batches.get(size, 0) + 1

    def render(self) -> str:
        out = [
            "# HELP bigmodel_requests_total Prediction requests by HTTP status.",
            "# TYPE bigmodel_requests_total counter",
        ]
        out += [f'bigmodel_requests_total{{status="{s}"}} {n}' for s, n in sorted(self.requests.items())]
        out += ["# HELP bigmodel_inputs_total Inputs predicted.", "# TYPE bigmodel_inputs_total counter"]
        out.append(f"bigmodel_inputs_total {self.inputs}")
        out += ["# HELP bigmodel_request_seconds Request latency.", "# TYPE bigmodel_request_seconds histogram"]
        cum = 0
        for b, n in zip(LATENCY_BUCKETS, self.latency, strict=False):
            cum += n
            out.append(f'bigmodel_request_seconds_bucket{{le="{b}"}} {cum}')
        total = sum(self.latency)
        out.append(f'bigmodel_request_seconds_bucket{{le="+Inf"}} {total}')
        out.append(f"bigmodel_request_seconds_sum {self.latency_sum:.6f}")
        out.append(f"bigmodel_request_seconds_count {total}")
        out += ["# HELP bigmodel_batch_size Inputs per model call.", "# TYPE bigmodel_batch_size histogram"]
        cum = 0
        sizes = sorted(self.batches)
        for edge in (1, 2, 4, 8, 16, 32, 64, 128, 256):
            cum = sum(self.batches[s] for s in sizes if s <= edge)
            out.append(f'bigmodel_batch_size_bucket{{le="{edge}"}} {cum}')
        out.append(f'bigmodel_batch_size_bucket{{le="+Inf"}} {sum(self.batches.values())}')
        out.append(f"bigmodel_batch_size_sum {sum(s * n for s, n in self.batches.items())}")
        out.append(f"bigmodel_batch_size_count {sum(self.batches.values())}")
        return "\n".join(out) + "\n"


class Predictor:
    """Validates and prepares one input at a time (in the request), predicts whole batches (in the batcher); what an
    input may be and how it becomes model input is the task spec's (`serve_item`, `serve_batch`)."""

    def __init__(self, art: Artifact) -> None:
        from bigmodel.tasks import get_task

        self.art = art
        self.spec = get_task(art.config["task"])

    def prepare(self, i: int, x: Any) -> Any:
        raw = x.model_dump() if isinstance(x, BaseModel) else x
        try:
            return self.spec.serve_item(self.art, i, raw)
        except InputError as e:
            raise HTTPException(422, str(e)) from None

    def run(self, batch: list[Any]) -> list[Any]:
        return self.spec.serve_batch(self.art, batch)


class _Gate:
    """Pure ASGI middleware (Starlette's `BaseHTTPMiddleware` costs ~1 ms a request): reject bodies over the limit by
    their Content-Length (413) before reading them, and mark each predict request as "on its way" to the batcher
    until its inputs are queued."""

    def __init__(self, app: Any, batcher: DynamicBatcher, max_body_bytes: int) -> None:
        self.app, self.batcher, self.max_body_bytes = app, batcher, max_body_bytes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_body_bytes
            except ValueError:
                await JSONResponse({"detail": "invalid Content-Length"}, status_code=400)(scope, receive, send)
                return
            if too_big:
                body = {"detail": f"request body over {self.max_body_bytes} bytes"}
                await JSONResponse(body, status_code=413)(scope, receive, send)
                return
        if scope.get("path") != "/v1/predict":
            await self.app(scope, receive, send)
            return
        with self.batcher.incoming() as arriving:
            scope.setdefault("state", {})["arriving"] = arriving
            await self.app(scope, receive, send)


def create_app(
    art: Artifact,
    *,
    max_batch_size: int = 32,
    max_delay_ms: float = 5.0,
    api_key: str | None = None,
    max_inputs: int = 256,
    max_body_bytes: int = 16 * 1024 * 1024,
    max_new_tokens: int = 1024,
    max_explain_inputs: int = 16,
) -> FastAPI:
    predictor = Predictor(art)
    metrics = Metrics()
    batcher = DynamicBatcher(predictor.run, max_batch_size, max_delay_ms, on_batch=metrics.batch)

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
        await batcher.start()
        yield
        await batcher.stop()  # uvicorn has finished the accepted requests by now; drain what is queued

    app = FastAPI(
        title="bigmodel",
        version="1",
        description=f"Predictions from {art.folder} ({art.kind} model; labels: {', '.join(art.labels)}).",
        lifespan=lifespan,
    )
    app.state.metrics = metrics
    app.state.batcher = batcher

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        got = request.headers.get("x-api-key") or request.headers.get("authorization", "").removeprefix("Bearer ")
        if not hmac.compare_digest(got.encode(), api_key.encode()):
            raise HTTPException(401, "missing or wrong API key (send X-API-Key or Authorization: Bearer)")

    app.add_middleware(_Gate, batcher=batcher, max_body_bytes=max_body_bytes)

    @app.post(
        "/v1/predict",
        response_model=PredictResponse,
        responses={
            401: {"description": "API key"},
            413: {"description": "Too large"},
            422: {"description": "Malformed"},
        },
    )
    async def predict(req: PredictRequest, request: Request) -> PredictResponse:
        with metrics.counting(len(req.inputs)):
            check_key(request)
            if len(req.inputs) > max_inputs:
                raise HTTPException(413, f"{len(req.inputs)} inputs in one request; at most {max_inputs}")
            prepared = [predictor.prepare(i, x) for i, x in enumerate(req.inputs)]
            probs = await batcher.submit(prepared, getattr(request.state, "arriving", None))
        k = min(req.top_k, len(art.labels))
        out = []
        for p in probs:
            scores, idx = p.topk(k)
            top = [
                Scored(label=art.labels[i], score=round(s, 6))
                for s, i in zip(scores.tolist(), idx.tolist(), strict=True)
            ]
            out.append(Prediction(label=top[0].label, score=top[0].score, top_k=top))
        return PredictResponse(predictions=out)

    explain_state: dict[str, Any] = {}
    explain_lock = threading.Lock()  # Captum hooks one shared model copy: one explanation at a time

    def run_explain(items: list[Any], names: list[str], method: str | None, target: str | None) -> list[Any]:
        from bigmodel.errors import UserError

        try:
            import bigmodel.explain as ex
        except ImportError as e:
            raise HTTPException(501, f"this server cannot explain: pip install 'bigmodel[explain]' ({e.name})") from e
        with explain_lock:
            try:
                if "explainer" not in explain_state:
                    explain_state["explainer"] = ex.explainer_for(art)
                results = ex.explain_items(art, names, items, method, target, explainer=explain_state["explainer"])
            except UserError as e:
                raise HTTPException(422, str(e)) from None
        return ex.inline_files(results)

    @app.post(
        "/v1/explain",
        response_model=ExplainResponse,
        responses={
            401: {"description": "API key"},
            413: {"description": "Too large"},
            422: {"description": "Malformed, or the method does not apply to this model"},
            501: {"description": "The explain extra is not installed"},
        },
    )
    async def explain(req: ExplainRequest, request: Request) -> ExplainResponse:
        from starlette.concurrency import run_in_threadpool

        from bigmodel.errors import UserError

        with metrics.counting(len(req.inputs)):
            check_key(request)
            if len(req.inputs) > max_explain_inputs:
                n = len(req.inputs)
                raise HTTPException(413, f"{n} inputs to explain in one request; at most {max_explain_inputs}")
            if art.kind == "translation":
                raise HTTPException(422, "a translation model; /v1/explain takes classifiers and language models")
            if art.spec.inputs == "files":
                items = [predictor.prepare(i, x) for i, x in enumerate(req.inputs)]
                names = [f"inputs[{i}]" for i in range(len(items))]
            else:
                for i, x in enumerate(req.inputs):
                    if not isinstance(x, str):
                        raise HTTPException(422, f"inputs[{i}]: this is a {art.kind} model; expected a string")
                try:
                    names, items = art.spec.explain_items(art, None, list(req.inputs))
                except UserError as e:
                    raise HTTPException(422, str(e)) from None
            out = await run_in_threadpool(run_explain, items, names, req.method, req.target)
        return ExplainResponse(explanations=out)

    def generation_options(req: GenerateRequest) -> dict[str, Any]:
        return {
            "temperature": req.temperature,
            "top_k": req.top_k,
            "top_p": req.top_p,
            "repetition_penalty": req.repetition_penalty,
            "stop": req.stop,
            "seed": req.seed,
        }

    @app.post(
        "/v1/generate",
        response_model=GenerateResponse,
        responses={
            200: {"content": {"text/event-stream": {}}, "description": "JSON, or events when stream is true"},
            401: {"description": "API key"},
            413: {"description": "max_new_tokens over the server's limit"},
            422: {"description": "Malformed, or not a language model"},
        },
    )
    async def generate(req: GenerateRequest, request: Request) -> Any:
        import json as _json

        from fastapi.responses import StreamingResponse
        from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

        t0 = time.perf_counter()
        try:
            check_key(request)
            if not art.can(Capability.GENERATES):
                raise HTTPException(422, f"this is a {art.kind} model; /v1/generate needs a language model")
            if req.max_new_tokens > max_new_tokens:
                raise HTTPException(
                    413, f"max_new_tokens {req.max_new_tokens} is over this server's limit {max_new_tokens}"
                )
        except HTTPException as e:
            metrics.request(e.status_code, time.perf_counter() - t0, 0)
            raise
        opts = generation_options(req)
        if not req.stream:
            text = await run_in_threadpool(lambda: art.generate_text(req.prompt, req.max_new_tokens, **opts))
            metrics.request(200, time.perf_counter() - t0, 1)
            return GenerateResponse(text=text)

        async def events() -> Any:
            pieces = art.stream_text(req.prompt, req.max_new_tokens, **opts)
            try:
                async for piece in iterate_in_threadpool(pieces):
                    yield f"data: {_json.dumps({'text': piece})}\n\n"
            except Exception as e:  # the status line is sent already: end the stream with an error event
                yield f"event: error\ndata: {_json.dumps({'error': f'{type(e).__name__}: {e}'})}\n\n"
                metrics.request(500, time.perf_counter() - t0, 0)
                return
            yield "data: [DONE]\n\n"
            metrics.request(200, time.perf_counter() - t0, 1)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def admit(request: Request, n_inputs: int, needs: Capability, refusal: str) -> None:
        """The API key, the model's capability (422 naming what the endpoint needs) and the input count (413)."""
        check_key(request)
        if not art.can(needs):
            raise HTTPException(422, f"this is a {art.kind} model; {refusal}")
        if n_inputs > max_inputs:
            raise HTTPException(413, f"{n_inputs} inputs in one request; at most {max_inputs}")

    @app.post(
        "/v1/translate",
        response_model=TranslateResponse,
        responses={
            401: {"description": "API key"},
            413: {"description": "Too large"},
            422: {"description": "Malformed, or not a translation model"},
        },
    )
    async def translate(req: TranslateRequest, request: Request) -> TranslateResponse:
        from starlette.concurrency import run_in_threadpool

        with metrics.counting(len(req.inputs)):
            admit(request, len(req.inputs), Capability.TRANSLATES, "/v1/translate needs a translation model")
            out = await run_in_threadpool(lambda: art.translate(req.inputs, beam_size=req.beam_size))
        return TranslateResponse(translations=out)

    @app.post(
        "/v1/transcribe",
        response_model=TranscribeResponse,
        responses={
            401: {"description": "API key"},
            413: {"description": "Too large"},
            422: {"description": "Malformed, or not a speech recognition model"},
        },
    )
    async def transcribe(req: TranscribeRequest, request: Request) -> TranscribeResponse:
        from starlette.concurrency import run_in_threadpool

        with metrics.counting(len(req.inputs)):
            admit(request, len(req.inputs), Capability.TRANSCRIBES, "/v1/transcribe needs a speech recognition model")
            try:
                clips = [predictor.spec.transcribe_item(art, i, x.model_dump()) for i, x in enumerate(req.inputs)]
            except InputError as e:
                raise HTTPException(422, str(e)) from None
            out = await run_in_threadpool(lambda: art.transcribe(clips, beam_size=req.beam_size))
        return TranscribeResponse(transcripts=out)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "kind": art.kind, "labels": art.labels, "model": art.config["model"]["name"]}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus(request: Request) -> str:
        check_key(request)
        return metrics.render()

    def report_file() -> Path | None:
        """The run's `bigmodel report` page (RUN/report.html beside the artifact folder), if one was written."""
        folder = getattr(art, "folder", None)
        if folder is None:
            return None
        f = Path(folder).parent / "report.html"
        return f if f.is_file() else None

    @app.get("/report", response_class=HTMLResponse, include_in_schema=False)
    async def report() -> Any:
        from bigmodel.report.html import CSP

        f = report_file()
        if f is None:
            return PlainTextResponse("no report for this run: bigmodel report RUN_DIR writes one", status_code=404)
        return HTMLResponse(f.read_text(encoding="utf-8"), headers={"Content-Security-Policy": CSP})

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        html = resources.files("bigmodel.serving").joinpath("page.html").read_text(encoding="utf-8")
        shape = art.preprocess.input_shape
        info = {
            "kind": art.kind,
            "labels": art.labels,
            "shape": shape,
            "needs_key": api_key is not None,
            "report": report_file() is not None,
        }
        import json

        return html.replace("__BIGMODEL_INFO__", json.dumps(info))

    return app


def serve(
    art: Artifact,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch_size: int = 32,
    max_delay_ms: float = 5.0,
    api_key: str | None = None,
    *,
    max_new_tokens: int = 1024,
) -> None:
    import uvicorn

    app = create_app(
        art, max_batch_size=max_batch_size, max_delay_ms=max_delay_ms, api_key=api_key, max_new_tokens=max_new_tokens
    )
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30)
