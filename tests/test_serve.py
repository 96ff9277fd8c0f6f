"""The HTTP server: answers equal `bigmodel predict`, dynamic batching, limits and errors, metrics, a real process."""

from __future__ import annotations

import asyncio
import base64
import io
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from bigmodel import api
from bigmodel.config import validate_recipe
from bigmodel.runs import load_artifact
from bigmodel.serving.batcher import DynamicBatcher
from bigmodel.serving.server import create_app
from conftest import ServerProcess, tiny_recipe, train_lm_fixture_run, train_text_fixture_run


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("img") / "run"
    api.train(validate_recipe(tiny_recipe()), out=out, progress=False)
    return out


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    return train_text_fixture_run(tmp_path_factory.mktemp("txt"))


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def digits_images(n=5):
    from sklearn.datasets import load_digits

    d = load_digits()
    return [np.rint(d.images[i] * (255 / 16)).astype(np.uint8) for i in range(n)]


def test_image_predictions_equal_bigmodel_predict(image_run, tmp_path):
    imgs = digits_images()
    files = []
    for i, im in enumerate(imgs):
        (tmp_path / f"{i}.png").write_bytes(png_bytes(im))
        files.append(tmp_path / f"{i}.png")
    expected = api.predict(image_run, files, top_k=3)
    with TestClient(create_app(load_artifact(image_run), max_delay_ms=2)) as c:
        body = {"inputs": [{"image_base64": base64.b64encode(png_bytes(im)).decode()} for im in imgs], "top_k": 3}
        r = c.post("/v1/predict", json=body)
        assert r.status_code == 200, r.text
        got = r.json()["predictions"]
        arr = c.post("/v1/predict", json={"inputs": [{"array": imgs[0].tolist()}], "top_k": 3}).json()["predictions"]
    for g, e in zip(got, expected, strict=True):
        assert g["label"] == e["label"] and [t["label"] for t in g["top_k"]] == [t["label"] for t in e["top_k"]]
        assert g["score"] == pytest.approx(e["score"], abs=1e-5)
    assert arr[0]["label"] == expected[0]["label"] and arr[0]["score"] == pytest.approx(expected[0]["score"], abs=1e-5)


def test_text_predictions_equal_bigmodel_predict(text_run):
    texts = ["great fun", "awful plot", "fun but awful"]
    expected = api.predict(text_run, texts=texts, top_k=2)
    with TestClient(create_app(load_artifact(text_run))) as c:
        got = c.post("/v1/predict", json={"inputs": texts, "top_k": 2}).json()["predictions"]
        health = c.get("/healthz").json()
    assert [g["label"] for g in got] == [e["label"] for e in expected]
    assert [g["score"] for g in got] == pytest.approx([e["score"] for e in expected], abs=1e-5)
    assert health["kind"] == "text" and health["labels"] == ["neg", "pos"]


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({}, 422, "inputs"),
        ({"inputs": []}, 422, "inputs"),
        ({"inputs": ["hello"]}, 422, "this is an image model; expected an object"),
        ({"inputs": [{"image_base64": "%%%"}]}, 422, "not valid base64"),
        ({"inputs": [{"image_base64": base64.b64encode(b"not a png").decode()}]}, 422, "not a readable image"),
        ({"inputs": [{"array": [[1, 2], [3, 4]]}]}, 422, "expected shape [1, 8, 8]"),
        ({"inputs": [{"array": [[1, 2], [3]]}]}, 422, "nested lists of numbers of one shape"),
        ({"inputs": [{"array": [[1] * 8] * 8}], "top_k": 0}, 422, "top_k"),
        ({"inputs": [{"array": [[1] * 8] * 8}] * 300}, 413, "at most 256"),
    ],
)
def test_client_mistakes_are_4xx_not_500(image_run, body, status, needle):
    with TestClient(create_app(load_artifact(image_run)), raise_server_exceptions=False) as c:
        r = c.post("/v1/predict", json=body)
    assert r.status_code == status, r.text
    assert needle in r.text


def test_body_size_limit_api_key_and_metrics(image_run):
    app = create_app(load_artifact(image_run), api_key="s3cret", max_body_bytes=10_000)
    ok = {"inputs": [{"array": [[0] * 8] * 8}]}
    with TestClient(app) as c:
        assert c.post("/v1/predict", json=ok).status_code == 401
        assert c.post("/v1/predict", json=ok, headers={"X-API-Key": "wrong"}).status_code == 401
        assert c.post("/v1/predict", json=ok, headers={"X-API-Key": "s3cret"}).status_code == 200
        assert c.post("/v1/predict", json=ok, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        big = {"inputs": [{"array": [[0] * 8] * 8}] * 200}
        assert c.post("/v1/predict", json=big, headers={"X-API-Key": "s3cret"}).status_code == 413
        assert c.get("/healthz").status_code == 200  # liveness needs no key
        assert c.get("/metrics").status_code == 401
        text = c.get("/metrics", headers={"X-API-Key": "s3cret"}).text
        page = c.get("/")
    assert 'bigmodel_requests_total{status="200"} 2' in text and 'bigmodel_requests_total{status="401"} 2' in text
    assert "bigmodel_inputs_total 2" in text and 'bigmodel_batch_size_bucket{le="1"} 2' in text
    assert page.status_code == 200 and '"needs_key": true' in page.text and '"kind": "image"' in page.text


def test_dynamic_batching_groups_concurrent_requests_and_keeps_order():
    seen = []

    def run(batch):
        seen.append(len(batch))
        time.sleep(0.01)
        return [x * 10 for x in batch]

    async def main():
        b = DynamicBatcher(run, max_batch_size=8, max_delay_ms=50)
        await b.start()
        results = await asyncio.gather(*(b.submit([i, i + 100]) for i in range(12)))
        await b.stop()
        return results

    results = asyncio.run(main())
    assert results == [[i * 10, (i + 100) * 10] for i in range(12)]
    assert sum(seen) == 24 and max(seen) == 8 and len(seen) <= 4


def test_one_by_one_and_delay_bound():
    """max_batch_size=1 runs every input alone; a lone input runs at once; a batch waits for a request that is on its
    way, but never longer than max_delay_ms."""
    sizes = []

    async def main():
        b = DynamicBatcher(lambda xs: sizes.append(len(xs)) or xs, max_batch_size=1, max_delay_ms=1000)
        await b.start()
        await asyncio.gather(*(b.submit([i]) for i in range(5)))
        await b.stop()
        c = DynamicBatcher(lambda xs: xs, max_batch_size=64, max_delay_ms=200)
        await c.start()
        t = time.perf_counter()
        await c.submit([1])
        alone = time.perf_counter() - t
        with c.incoming():  # announced but never arrives: the batch waits for it, up to the 200 ms cap
            t = time.perf_counter()
            await c.submit([2])
            capped = time.perf_counter() - t
        with c.incoming() as late:  # arrives after 50 ms: it joins the same batch
            seen = []
            c.run_batch = lambda xs: seen.append(list(xs)) or xs

            async def arrive():
                await asyncio.sleep(0.05)
                return await c.submit([4], late)

            await asyncio.gather(c.submit([3]), arrive())
        await c.stop()
        return alone, capped, seen

    alone, capped, seen = asyncio.run(main())
    assert sizes == [1] * 5
    assert alone < 0.05
    assert 0.19 <= capped < 0.6
    assert seen == [[3, 4]]


def test_bigmodel_serve_process_answers_and_shuts_down_gracefully(text_run):
    """A real `bigmodel serve`: it answers; on SIGTERM a request already accepted (waiting for its batch to fill)
    still gets its answer before the process exits."""
    import threading

    import httpx

    server = ServerProcess(text_run, "--max-delay-ms", "1500")
    url = server.url
    in_flight: dict = {}
    try:
        r = httpx.post(url + "/v1/predict", json={"inputs": ["great fun"]}, timeout=10)
        assert r.status_code == 200 and r.json()["predictions"][0]["label"] == "pos"
        assert "openapi" in httpx.get(url + "/openapi.json", timeout=5).json()

        def slow_request():
            in_flight["r"] = httpx.post(url + "/v1/predict", json={"inputs": ["awful plot"]}, timeout=30)

        t = threading.Thread(target=slow_request)
        t.start()
        time.sleep(0.5)  # accepted, waiting up to 1.5 s for its batch
        server.proc.send_signal(signal.SIGTERM)
        t.join(timeout=30)
    finally:
        err = server.stop()
    assert in_flight["r"].status_code == 200 and in_flight["r"].json()["predictions"][0]["label"] == "neg"
    assert server.proc.returncode in (0, -signal.SIGTERM), err  # uvicorn re-raises the signal after shutdown
    assert "Traceback" not in err


def test_serve_bad_run_dir_is_one_line(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "bigmodel", "serve", str(tmp_path / "nope")], capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "not found" in p.stderr


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    return train_lm_fixture_run(tmp_path_factory.mktemp("lm"))


def test_generate_endpoint_streams_what_the_cli_generates(lm_run):
    import json

    art = load_artifact(lm_run)
    expected = art.generate_text("All:\n", 40, temperature=0.9, seed=3)
    with TestClient(create_app(art, api_key="k")) as c:
        body = {"prompt": "All:\n", "max_new_tokens": 40, "temperature": 0.9, "seed": 3}
        assert c.post("/v1/generate", json=body).status_code == 401
        r = c.post("/v1/generate", json=body, headers={"X-API-Key": "k"})
        assert r.status_code == 200 and r.json() == {"text": expected}
        with c.stream("POST", "/v1/generate", json={**body, "stream": True}, headers={"X-API-Key": "k"}) as s:
            assert s.headers["content-type"].startswith("text/event-stream")
            events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and len(events) > 3  # streamed in pieces, not at once
        assert "".join(json.loads(e)["text"] for e in events[:-1]) == expected
        stop = c.post("/v1/generate", json={**body, "stop": ["\n"]}, headers={"X-API-Key": "k"}).json()["text"]
        assert "\n" not in stop and expected.startswith(stop)
        for bad in ({"prompt": 3}, {"max_new_tokens": -1}, {"top_p": 0}, {"temperature": -1}, {"nope": 1}):
            assert c.post("/v1/generate", json=bad, headers={"X-API-Key": "k"}).status_code == 422, bad
        r = c.post("/v1/predict", json={"inputs": ["hi"]}, headers={"X-API-Key": "k"})
        assert r.status_code == 422 and "/v1/generate" in r.json()["detail"]
        assert 'bigmodel_requests_total{status="200"} 3' in c.get("/metrics", headers={"X-API-Key": "k"}).text


def test_generate_and_translate_refuse_the_wrong_model(text_run):
    with TestClient(create_app(load_artifact(text_run))) as c:
        r = c.post("/v1/generate", json={"prompt": "hi"})
        assert r.status_code == 422 and "language model" in r.json()["detail"]
        r = c.post("/v1/translate", json={"inputs": ["hi"]})
        assert r.status_code == 422 and "translation model" in r.json()["detail"]
