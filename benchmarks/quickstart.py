"""Quickstart benchmark: test accuracy and training wall time of recipes/quickstart.yaml over several seeds.

    python benchmarks/quickstart.py [key=value ...] [--seeds 0 1 2] [--as-avx2] [--json]

Training time is `Trainer.fit` wall time (validation included; data loading and the final test evaluation excluded),
as `bigmodel train` reports it. The environment line names the CPU capability, whether bf16 is native, and any
instruction-set caps in force.

`--as-avx2` runs the benchmark as an AVX2-only CPU would (on a CPU with AVX-512): it restarts itself with
`ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`, so PyTorch's and oneDNN's kernels use AVX2 only and bf16 is not
native (`precision: auto` trains in fp32). It caps instruction sets, not clock speed or cores: an older AVX2-only CPU
is slower still.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

AVX2_CAPS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
if "--as-avx2" in sys.argv and any(os.environ.get(k) != v for k, v in AVX2_CAPS.items()):
    # The caps are read when torch loads: set them, then start again (before anything imports torch).
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **AVX2_CAPS})

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit_json, environment, print_env, print_table  # noqa: E402
from bigmodel.api import train  # noqa: E402
from bigmodel.config import load_recipe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "quickstart.yaml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--json", action="store_true", help="print one JSON object of the figures")
    ap.add_argument("--as-avx2", action="store_true", help="cap the kernels at AVX2, as on an AVX2-only CPU")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    env = environment()
    rows, accs, times = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            recipe = load_recipe(args.recipe, [*args.overrides, f"seed={seed}"])
            result = train(recipe, out=Path(tmp) / f"seed{seed}", progress=False)
            accs.append(result.metrics["accuracy"])
            times.append(result.train_time_s)
            rows.append([seed, result.metrics["accuracy"], result.train_time_s, result.steps])
            print(f"seed {seed}: test accuracy {accs[-1]:.4f} in {times[-1]:.1f}s", file=sys.stderr, flush=True)
    figures = {
        "recipe": Path(args.recipe).name,
        "overrides": args.overrides,
        "seeds": args.seeds,
        "test_accuracy_mean": statistics.mean(accs),
        "test_accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
        "test_accuracy_min": min(accs),
        "train_time_s_mean": statistics.mean(times),
        "train_time_s_max": max(times),
        "environment": env,
    }
    if args.json:
        emit_json(figures)
        return
    print_env(env)
    print_table(["seed", "test accuracy", "train time (s)", "steps"], rows)
    print(
        f"mean test accuracy {figures['test_accuracy_mean']:.4f} ± {figures['test_accuracy_std']:.4f}, "
        f"mean train time {figures['train_time_s_mean']:.1f}s (max {figures['train_time_s_max']:.1f}s)"
    )


if __name__ == "__main__":
    main()
