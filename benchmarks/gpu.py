"""The GPU check: one script, one call, a few minutes on one CUDA GPU; prints one JSON object with `--json`.

    python benchmarks/gpu.py [--json]                   # on a machine with a CUDA GPU (about 4 minutes on an H200)
    python benchmarks/gpu.py --device cpu --quick       # the same code paths at toy sizes on CPU (the test suite's
                                                        # smoke test; its figures say nothing about a GPU)

Without a CUDA device (and without `--device cpu`) it measures nothing: it prints the environment and
`{"skipped": "..."}` and exits 0. Nothing GPU-only is emulated. Parts (`--parts`, default all):

1. `quickstart`: `recipes/quickstart.yaml` trained to accuracy on the device (the Trainer keeps the data set on the
   device, bf16 autocast, channels_last, fused AdamW), eager and with `train.compile=true`: test accuracy, training
   seconds (compile included), samples/s. `compile_vs_eager_ratio` = eager seconds / compiled seconds.
2. `trainer`: the Trainer against a hand-written loop on the same device, the same work
   (`benchmarks/trainer_overhead.py`): `trainer_vs_hand_loop_ratio`.
3. `gpt`: GPT training tokens/s, nanoGPT's Shakespeare-character GPU shape (6 layers x 384, 6 heads, context 256,
   batch 64), bf16 autocast: `gpt_train_tokens_per_s`.
4. `decode`: greedy decoding with our KV cache against transformers' `generate` with the same weights, GPT-2 small's
   shape (random weights, nothing downloaded), batch 1 and 32: `kv_vs_hf_generate_b1_ratio`, `..._b32_ratio`.
5. `minilm`: all-MiniLM-L6-v2 fine-tuning on the tweets through `recipes/tweets_minilm.yaml`:
   `minilm_train_samples_per_s` (needs the `hf` extra and the bundled weights; skipped with the reason otherwise).
6. `resume`: the quickstart for 2 epochs through the CLI on the device, twice with the same seed, and once killed
   (`kill -9`, `BIGMODEL_FAULT`) after step 500 then resumed: `same_seed_bit_identical`, `resume_bit_identical`
   (every weight compared with `torch.equal`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit_json, environment, print_env, print_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("quickstart", "trainer", "gpt", "decode", "minilm", "resume")


def _records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def part_quickstart(device: str, quick: bool) -> dict[str, Any]:
    from bigmodel.api import train
    from bigmodel.config import load_recipe

    size = ["data.limit_train=1024", "train.epochs=1"] if quick else []
    out: dict[str, Any] = {}
    for name, extra in (("eager", []), ("compiled", ["train.compile=true"])):
        overrides = [f"train.device={device}", "train.baseline=false", "seed=0", *size, *extra]
        recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml", overrides)
        with tempfile.TemporaryDirectory() as tmp:
            res = train(recipe, out=Path(tmp) / "run", progress=False)
        out[name] = {
            "test_accuracy": res.metrics["accuracy"],
            "train_time_s": res.train_time_s,  # validation each epoch included, as `bigmodel train` reports it
            "steps": res.steps,
            "samples_per_s": res.steps * recipe.train.batch_size / res.train_time_s,
        }
        print(f"quickstart ({name}): {res.metrics['accuracy']:.4f} in {res.train_time_s:.1f}s", file=sys.stderr)
    out["compile_vs_eager_ratio"] = out["eager"]["train_time_s"] / out["compiled"]["train_time_s"]
    return out


def part_trainer(device: str, quick: bool) -> dict[str, Any]:
    from trainer_overhead import compare

    steps, rounds = (12, 1) if quick else (300, 3)
    r = compare(steps, 256, rounds, [f"train.device={device}"])
    r.pop("environment", None)
    return r


def part_gpt(device: str, quick: bool) -> dict[str, Any]:
    from bigmodel.api import train
    from bigmodel.config import load_recipe

    ctx, batch = (32, 4) if quick else (256, 64)
    shape = (
        ["model.dim=64", "model.num_heads=2", "model.num_layers=2"]
        if quick
        else ["model.dim=384", "model.num_heads=6", "model.num_layers=6", "model.dropout=0.2"]
    )
    steps = 12 if quick else 400
    overrides = [
        f"train.device={device}",
        "train.precision=auto",
        f"data.context_length={ctx}",
        f"train.batch_size={batch}",
        f"data.batches_per_epoch={steps}",
        "train.epochs=1",
        "train.log_every=4" if quick else "train.log_every=50",
        "train.optimizer.lr=1e-3",
        *shape,
    ]
    with tempfile.TemporaryDirectory() as tmp:
        res = train(
            load_recipe(ROOT / "recipes" / "shakespeare_char_gpt.yaml", overrides),
            out=Path(tmp) / "run",
            progress=False,
        )
        logs = [r for r in _records(res.run_dir) if r.get("split") == "train"]
    first, last = logs[0], logs[-1]  # tokens/s between the first and the last training log: warm-up left out
    tok_s = (last["step"] - first["step"]) * batch * ctx / (last["time"] - first["time"])
    return {
        "context": ctx,
        "batch": batch,
        "steps": res.steps,
        "tokens_per_s": tok_s,
        "val_loss": res.metrics.get("loss"),
    }


def part_decode(device: str, quick: bool) -> dict[str, Any]:
    from generation import decode_speed

    shape = (
        {"vocab": 512, "ctx": 128, "dim": 64, "heads": 2, "layers": 2}
        if quick
        else {"vocab": 50257, "ctx": 1024, "dim": 768, "heads": 12, "layers": 12}
    )
    out: dict[str, Any] = {"shape": shape}
    for batch in (1, 32):
        out[f"b{batch}"] = decode_speed(shape, batch, 8 if quick else 128, 1 if quick else 3, device=device)
    return out


def part_minilm(device: str, quick: bool) -> dict[str, Any]:
    try:
        import transformers  # noqa: F401

        from bigmodel.models.hf import HFConfig, resolve_source

        resolve_source(HFConfig(pretrained="minilm-l6"))
    except Exception as e:  # the extra or the bundled weights are missing: say so, measure nothing
        return {"skipped": f"{type(e).__name__}: {e}"}
    from hf import train_ours

    # Quick: small held-out splits, so the run's closing evaluation does not dominate (samples/s leaves it out anyway).
    small = ["data.val_fraction=0.02", "data.test_fraction=0.02"] if quick else []
    return train_ours(21 if quick else 201, [f"train.device={device}", *small])


def part_resume(device: str, quick: bool) -> dict[str, Any]:
    import os
    import subprocess

    import torch
    from safetensors.torch import load_file

    size = ["data.limit_train=1024", "train.epochs=1", "train.batch_size=64"] if quick else ["train.epochs=2"]
    kill_at = 5 if quick else 500
    recipe = [str(ROOT / "recipes" / "quickstart.yaml"), f"train.device={device}", "train.baseline=false", *size]

    def cli(*args: str, fault: str | None = None) -> subprocess.CompletedProcess:
        env = {**os.environ, **({"BIGMODEL_FAULT": fault} if fault else {})}
        cmd = [sys.executable, "-m", "bigmodel", *args, "--no-progress"]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)

    with tempfile.TemporaryDirectory() as tmp:
        for name in ("a", "b"):
            p = cli("train", *recipe, "--out", f"{tmp}/{name}")
            if p.returncode != 0:
                raise RuntimeError(f"train {name}: {p.stderr.strip().splitlines()[-1:]}")
        killed = cli("train", *recipe, "--out", f"{tmp}/killed", fault=f"kill_after_step:{kill_at}")
        if killed.returncode != -9:
            raise RuntimeError(f"the run to kill exited with {killed.returncode}, not -9 (SIGKILL)")
        p = cli("train", "--resume", f"{tmp}/killed")
        if p.returncode != 0:
            raise RuntimeError(f"resume: {p.stderr.strip().splitlines()[-1:]}")
        a, b, c = (load_file(f"{tmp}/{n}/model/model.safetensors") for n in ("a", "b", "killed"))
    return {
        "killed_after_step": kill_at,
        "same_seed_bit_identical": all(torch.equal(a[k], b[k]) for k in a),
        "resume_bit_identical": all(torch.equal(a[k], c[k]) for k in a),
    }


RUNNERS: dict[str, Callable[[str, bool], dict[str, Any]]] = {
    "quickstart": part_quickstart,
    "trainer": part_trainer,
    "gpt": part_gpt,
    "decode": part_decode,
    "minilm": part_minilm,
    "resume": part_resume,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (a smoke run of the same code)")
    ap.add_argument("--quick", action="store_true", help="toy sizes: checks that every part runs")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import torch

    env = environment()
    out: dict[str, Any] = {"device": args.device, "quick": args.quick, "environment": env}
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        out["skipped"] = "no CUDA device here: nothing measured (use --device cpu for a smoke run of the code paths)"
        print(out["skipped"], file=sys.stderr)
        if args.json:
            emit_json(out)
        else:
            print_env(env)
        return
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        ap.error(f"--parts: unknown {', '.join(unknown)} (choose from {', '.join(PARTS)})")
    failed = []
    for name in parts:
        t0 = time.perf_counter()
        try:
            out[name] = RUNNERS[name](args.device, args.quick)
        except Exception as e:  # one part failing must not lose the others' figures (one call, limited time)
            traceback.print_exc()
            out[name] = {"error": f"{type(e).__name__}: {e}"}
            failed.append(name)
        out[name]["seconds"] = time.perf_counter() - t0
        print(f"{name}: {out[name]['seconds']:.1f}s", file=sys.stderr, flush=True)

    q, d = out.get("quickstart", {}), out.get("decode", {})
    if "compile_vs_eager_ratio" in q:
        out["compile_vs_eager_ratio"] = q["compile_vs_eager_ratio"]
        out["quickstart_test_accuracy"] = q["eager"]["test_accuracy"]
        out["quickstart_train_time_s"] = q["eager"]["train_time_s"]
    if "trainer_vs_hand_loop_ratio" in out.get("trainer", {}):
        out["trainer_vs_hand_loop_ratio"] = out["trainer"]["trainer_vs_hand_loop_ratio"]
    if "tokens_per_s" in out.get("gpt", {}):
        out["gpt_train_tokens_per_s"] = out["gpt"]["tokens_per_s"]
    for b in ("b1", "b32"):
        if b in d:
            out[f"kv_vs_hf_generate_{b}_ratio"] = d[b]["kv_tok_s"] / d[b]["hf_tok_s"]
    if "samples_s" in out.get("minilm", {}):
        out["minilm_train_samples_per_s"] = out["minilm"]["samples_s"]
    for key in ("same_seed_bit_identical", "resume_bit_identical"):
        if key in out.get("resume", {}):
            out[key] = out["resume"][key]
    out["failed_parts"] = failed
    if args.json:
        emit_json(out)
    else:
        print_env(env)
        rows = [[k, v] for k, v in out.items() if isinstance(v, (float, bool))]
        print_table(["figure", "value"], rows)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
