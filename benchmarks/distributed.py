"""Distributed training (DDP or FSDP2): training samples/s of 1 process against N processes (`--nproc-per-node N`,
each with an equal share of the cores) on this machine, through the real CLI, same recipe and global batch; on a
CUDA machine the N processes take one GPU each. Prints the environment and a table; `--json` prints one object with
`ddp_scaling_ratio` (or `fsdp2_scaling_ratio` with `--strategy fsdp2`: N-process samples/s over 1-process
samples/s; on one CPU the work is the same, so 1.0 means the strategy costs nothing; on N GPUs the ideal is N) and the
largest weight difference between the two runs.

    python benchmarks/distributed.py [--recipe recipes/quickstart.yaml] [--nproc 2] [--steps 300]
        [--strategy ddp|fsdp2] [--json] [key=value ...]
    python benchmarks/distributed.py --recipe recipes/shakespeare_char_gpt.yaml --strategy fsdp2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit_json, environment, print_env, print_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run(recipe: str, out: Path, overrides: list[str], nproc: int) -> dict:
    cmd = [sys.executable, "-m", "bigmodel", "train", recipe, *overrides, "--out", str(out), "--no-progress"]
    cmd += ["--nproc-per-node", str(nproc)] if nproc > 1 else []
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    train_cfg = yaml.safe_load((out / "recipe.yaml").read_text())["train"]
    batch = train_cfg["batch_size"] * train_cfg.get("grad_accum_steps", 1)
    return {
        "steps": summary["steps"],
        "train_time_s": summary["train_time_s"],
        "samples_per_s": summary["steps"] * batch / summary["train_time_s"],
        "accuracy": summary["metrics"].get("accuracy"),
        "loss": summary["metrics"].get("loss"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="recipes/quickstart.yaml")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps per run (train.max_steps)")
    ap.add_argument("--strategy", choices=["ddp", "fsdp2"], default="ddp")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    overrides = ["train.epochs=1", f"train.max_steps={args.steps}", "train.baseline=false", *args.overrides]
    overrides.append(f"train.distributed.strategy={args.strategy}")
    env = environment()
    with tempfile.TemporaryDirectory() as tmp:
        one = run(args.recipe, Path(tmp) / "one", overrides, 1)
        many = run(args.recipe, Path(tmp) / "many", overrides, args.nproc)
        from safetensors.torch import load_file

        a = load_file(str(Path(tmp) / "one" / "model" / "model.safetensors"))
        b = load_file(str(Path(tmp) / "many" / "model" / "model.safetensors"))
        diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    ratio = many["samples_per_s"] / one["samples_per_s"]
    result = {
        "environment": env,
        "recipe": args.recipe,
        "nproc": args.nproc,
        "strategy": args.strategy,
        "one_process": one,
        "n_processes": many,
        f"{args.strategy}_scaling_ratio": round(ratio, 4),
        "max_weight_diff": diff,
    }
    if args.json:
        emit_json(result)
        return
    print_env(env)
    print_table(
        ["processes", "steps", "train s", "samples/s", "test accuracy", "test loss"],
        [
            [n, r["steps"], r["train_time_s"], r["samples_per_s"], r["accuracy"], r["loss"]]
            for n, r in ((1, one), (args.nproc, many))
        ],
    )
    print(
        f"{args.strategy}_scaling_ratio {ratio:.3f}  (N-process samples/s / 1-process; "
        f"max weight difference {diff:.2e})"
    )


if __name__ == "__main__":
    main()
