"""After training: structured pruning, int8 and ONNX Runtime against the fp32 eager model, and the HTTP server with and
without dynamic batching — all measured in this job.

    python benchmarks/deploy.py [--vision-run RUN] [--prune-run RUN] [--text-run RUN] [--serve-run RUN]
                                [--quick] [--json]

Without runs it trains them: the quickstart (Fashion-MNIST, cnn-small: pruning, static int8, ONNX, serving), the
quickstart at twice the widths (48/96/192: pruning an over-parameterised model), a wider tweet Transformer
(tweets_transformer.yaml with dim 256, ff 1024, 2 epochs: dynamic int8, which pays off where Linear layers dominate
the time — the 128-wide recipe model is too small for that) and a briefly trained ResNet-8 (serving: throughput
depends on the model's cost, not its accuracy). Server load comes from this process (raw keep-alive HTTP/1.1 over
asyncio streams) against `bigmodel serve` in a separate process on loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit_json, environment, print_env, print_table  # noqa: E402
from bigmodel.api import train  # noqa: E402
from bigmodel.config import load_recipe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEXT_WIDE = ["model.dim=256", "model.ff_dim=1024", "train.epochs=2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def onnx_vs_eager(run: Path, tmp: Path) -> dict[str, float]:
    import onnxruntime as ort
    import torch

    from bigmodel.deploy.export import ImageExport, check_inputs, export
    from bigmodel.runs import load_artifact

    report = export(run, "onnx", tmp / "onnx")
    art = load_artifact(run)
    (x,) = check_inputs(art, run, 256)
    eager = ImageExport(art).eval()
    sess = ort.InferenceSession(str(tmp / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    out: dict[str, float] = {"onnx_max_abs_diff": report["parity"]["max_abs_diff"]}
    for b in (1, 32):
        xb = x[:b]
        xn = xb.numpy()
        with torch.inference_mode():
            te = timeit(lambda xb=xb: eager(xb))
        to = timeit(lambda xn=xn: sess.run(None, {"pixels": xn}))
        out[f"eager_ms_b{b}"], out[f"onnx_ms_b{b}"] = 1000 * te, 1000 * to
    return out


def timeit(fn, repeats: int = 50) -> float:
    for _ in range(5):
        fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


async def _connection(host: str, port: int, request: bytes, lat: list[float], quota: list[int]) -> None:
    """One keep-alive HTTP/1.1 connection sending the same request until the shared quota is used up. A raw asyncio
    stream client: a few microseconds per request, so the load generator does not eat the 2 cores it shares."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while quota[0] > 0:
            quota[0] -= 1
            t = time.perf_counter()
            writer.write(request)
            status = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            if b" 200 " not in status:
                raise RuntimeError(f"server answered {status!r}")
            lat.append(time.perf_counter() - t)
    finally:
        writer.close()


async def load(url: str, body: dict, concurrency: int, total: int) -> dict[str, float]:
    import json
    from urllib.parse import urlparse

    u = urlparse(url)
    payload = json.dumps(body).encode()
    request = (
        f"POST {u.path} HTTP/1.1\r\nHost: {u.hostname}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode() + payload
    warm: list[float] = []
    await _connection(u.hostname or "127.0.0.1", u.port or 80, request, warm, [concurrency])
    lat: list[float] = []
    quota = [total]
    t0 = time.perf_counter()
    await asyncio.gather(*(_connection(u.hostname, u.port, request, lat, quota) for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    lat.sort()
    return {
        "throughput_rps": len(lat) / wall,
        "p50_ms": 1000 * lat[len(lat) // 2],
        "p95_ms": 1000 * lat[min(len(lat) - 1, int(0.95 * len(lat)))],
    }


def serve_bench(run: Path, levels: list[int], total: int, max_delay_ms: float) -> dict[str, dict[int, dict]]:
    import httpx
    import numpy as np
    from PIL import Image

    from bigmodel.runs import load_artifact

    art = load_artifact(run)
    C, H, W = art.preprocess.input_shape
    img = (np.random.default_rng(0).random((H, W)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    body = {"inputs": [{"image_base64": base64.b64encode(buf.getvalue()).decode()}]}
    results: dict[str, dict[int, dict]] = {}
    for name, bs in (("one_by_one", 1), ("batching", 32)):
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "bigmodel", "serve", str(run), "--port", str(port), "--max-batch-size", str(bs),
             "--max-delay-ms", str(max_delay_ms if bs > 1 else 0)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        results[name] = {}
        for c in levels:
            results[name][c] = asyncio.run(load(url + "/v1/predict", body, c, max(total, 4 * c)))
            r = results[name][c]
            print(
                f"{name} c={c}: {r['throughput_rps']:.0f} req/s p95 {r['p95_ms']:.1f} ms", file=sys.stderr, flush=True
            )
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vision-run", type=Path)
    ap.add_argument("--text-run", type=Path)
    ap.add_argument("--serve-run", type=Path, help="a heavier model to serve (default: ResNet-8, briefly trained)")
    ap.add_argument("--prune-run", type=Path, help="a wide cnn-small run to prune (default: trained, widths 48/96/192)")
    ap.add_argument("--quick", action="store_true", help="tiny trainings and loads (a smoke test; figures meaningless)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from bigmodel.deploy.compress import compress

    quick_v = ["train.epochs=1", "data.limit_train=1024"] if args.quick else []
    quick_t = ["train.epochs=1", "data.limit_train=1000"] if args.quick else []
    levels = [1, 8] if args.quick else [1, 8, 32, 64]
    figures: dict[str, object] = {"quick": args.quick}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        vision = args.vision_run
        if vision is None:
            vision = train(
                load_recipe(ROOT / "recipes" / "quickstart.yaml", quick_v), out=tmp / "vision", progress=False
            ).run_dir
        text = args.text_run
        if text is None:
            r = load_recipe(ROOT / "recipes" / "tweets_transformer.yaml", [*TEXT_WIDE, *quick_t])
            text = train(r, out=tmp / "text", progress=False).run_dir
        heavy = args.serve_run
        if heavy is None:  # throughput depends on the model's cost, not its accuracy: one short epoch is enough
            r = load_recipe(ROOT / "recipes" / "fashion_mnist_resnet.yaml", ["train.epochs=1", "data.limit_train=2048"])
            heavy = train(r, out=tmp / "resnet", progress=False).run_dir
        wide = args.prune_run
        if wide is None:  # pruning is for over-parameterised models: the quickstart at twice its widths
            r = load_recipe(ROOT / "recipes" / "quickstart.yaml", ["model.widths=[48,96,192]", *quick_v])
            wide = train(r, out=tmp / "wide", progress=False).run_dir
        ft = 0 if args.quick else 5
        prune = compress(wide, "prune", tmp / "pruned", amount=0.5, structured=True, finetune_epochs=ft)
        print(f"prune (wide): {prune['verdict']}", file=sys.stderr, flush=True)
        prune_qs = compress(vision, "prune", tmp / "pruned_qs", amount=0.5, structured=True, finetune_epochs=ft)
        print(f"prune (quickstart): {prune_qs['verdict']}", file=sys.stderr, flush=True)
        int8 = compress(text, "quantize", tmp / "int8")
        print(f"int8: {int8['verdict']}", file=sys.stderr, flush=True)
        static = compress(vision, "quantize", tmp / "static", static=True, calibration=128 if args.quick else 512)
        print(f"static int8: {static['verdict']}", file=sys.stderr, flush=True)
        onnx = onnx_vs_eager(vision, tmp)
        serving = serve_bench(heavy, levels, 64 if args.quick else 1000, 5.0)
        serving_small = serve_bench(vision, levels, 64 if args.quick else 1000, 5.0)

    c = 8 if args.quick else 32
    figures.update(
        prune={
            k: prune[k]
            for k in ("before", "after", "size_ratio", "speedup_b1", "speedup_b32", "accuracy_change_points")
        },
        int8={
            k: int8[k] for k in ("before", "after", "size_ratio", "speedup_b1", "speedup_b32", "accuracy_change_points")
        },
        onnx=onnx,
        serving={k: {str(c_): v for c_, v in d.items()} for k, d in serving.items()},
        serving_cnn_small={k: {str(c_): v for c_, v in d.items()} for k, d in serving_small.items()},
        batching_throughput_cnn_small_ratio=serving_small["batching"][c]["throughput_rps"]
        / serving_small["one_by_one"][c]["throughput_rps"],
        prune_speedup_ratio=prune["speedup_b32"],
        prune_speedup_b1_ratio=prune["speedup_b1"],
        int8_size_ratio=int8["size_ratio"],
        int8_speedup_ratio=int8["speedup_b32"],
        int8_speedup_b1_ratio=int8["speedup_b1"],
        onnx_max_abs_diff=onnx["onnx_max_abs_diff"],
        onnx_speedup_b1_ratio=onnx["eager_ms_b1"] / onnx["onnx_ms_b1"],
        batching_throughput_ratio=serving["batching"][c]["throughput_rps"] / serving["one_by_one"][c]["throughput_rps"],
        batching_p95_ratio=serving["batching"][c]["p95_ms"] / serving["one_by_one"][c]["p95_ms"],
        env=environment(),
        threads=os.cpu_count(),
    )
    if args.json:
        emit_json(figures)
        return
    print_env(figures["env"])  # type: ignore[arg-type]
    rows = []
    for name, rep in (
        ("structured prune 50% (cnn-small 48/96/192)", prune),
        ("structured prune 50% (cnn-small 24/48/96)", prune_qs),
        ("dynamic int8 (tweet Transformer, dim 256)", int8),
        ("static int8, ONNX Runtime (cnn-small)", static),
    ):
        b, a = rep["before"], rep["after"]
        rows.append([name, f"{b['size_bytes']:,} → {a['size_bytes']:,} (x{rep['size_ratio']:.2f})",
                     f"{b['latency_ms_b1']:.3f} → {a['latency_ms_b1']:.3f} (x{rep['speedup_b1']:.2f})",
                     f"{b['latency_ms_b32']:.3f} → {a['latency_ms_b32']:.3f} (x{rep['speedup_b32']:.2f})",
                     f"{100 * b['accuracy']:.2f} → {100 * a['accuracy']:.2f}"])  # fmt: skip
    print_table(["compression", "bytes", "p50 ms batch 1", "p50 ms batch 32", "test accuracy %"], rows)
    print()
    print_table(
        ["cnn-small", "eager ms", "ONNX Runtime ms"],
        [[f"batch {b}", f"{onnx[f'eager_ms_b{b}']:.3f}", f"{onnx[f'onnx_ms_b{b}']:.3f}"] for b in (1, 32)],
    )
    print(f"ONNX max abs diff on 256 test images: {onnx['onnx_max_abs_diff']:.2e}")
    print()
    for title, res in (("ResNet-8 (flip TTA)", serving), ("cnn-small", serving_small)):
        srows = []
        for cc in levels:
            o, b = res["one_by_one"][cc], res["batching"][cc]
            lat_o, lat_b = f"{o['p50_ms']:.1f} / {o['p95_ms']:.1f}", f"{b['p50_ms']:.1f} / {b['p95_ms']:.1f}"
            srows.append([cc, f"{o['throughput_rps']:.0f}", f"{b['throughput_rps']:.0f}", lat_o, lat_b])
        print(f"serving {title}: bigmodel serve, max batch 32, max delay 5 ms")
        print_table(
            ["concurrency", "one-by-one req/s", "batching req/s", "one-by-one p50/p95 ms", "batching p50/p95 ms"], srows
        )
        print()
    print(f"batching_throughput_ratio (ResNet-8, c={c}): {figures['batching_throughput_ratio']:.2f}")


if __name__ == "__main__":
    main()
