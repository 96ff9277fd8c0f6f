"""DP-SGD cost: the time of one optimizer step with DP-SGD (per-example gradients, clipping, noise, accounting)
against the same step without it, at the same batch size, on the same model and batches, in one process (the median
of `--rounds` rounds of `--steps` steps each, the two alternating). Prints the environment and a table; `--json` one
object with `dp_step_time_ratio` (DP step time / non-private step time; Opacus measured 1.7-2.5x here, the goal is
≤ 2.5) and, when the recipe's `grad_sample_mode` is not `hooks`, `dp_hooks_step_time_ratio` (Opacus' own hooks mode on
the same batches). With `--accuracy`: also trains the recipe at ε = 1, 3, 8 and ∞ (no noise, clipping and learning
rate kept) and reports test accuracy (slow). With `--audit`: trains `benchmarks/audit_overfit.yaml` (a model overfit on
300 images) without DP and at ε = 3 and runs `bigmodel audit --membership` on both (`membership_auc_plain`,
`membership_auc_dp`; the goal: ≥ 0.65 without, ≤ 0.55 with).

    python benchmarks/privacy.py [--recipe recipes/fashion_mnist_dp.yaml] [--batch-size 256] [--steps 10]
        [--rounds 5] [--accuracy] [--audit] [--json] [key=value ...]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit_json, environment, median, print_env, print_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def step_times(recipe_path: str, overrides: list[str], steps: int, rounds: int) -> dict[str, list[float]]:
    """Seconds per step of each variant, per round: `dp` (the recipe's DP-SGD), `hooks` (Opacus' own hooks mode, when
    the recipe's mode is another) and `plain` (no DP), on the same batches, the variants alternating."""
    import itertools

    from bigmodel import load_recipe
    from bigmodel.api import build_experiment

    variants = {"dp": [], "hooks": ["privacy.dp.grad_sample_mode=hooks"], "plain": ["privacy.dp=null"]}
    dp = load_recipe(recipe_path, overrides=overrides).privacy.dp
    if dp is None:
        raise SystemExit(f"{recipe_path} has no privacy.dp block: add e.g. privacy.dp.target_epsilon=3")
    if dp.grad_sample_mode == "hooks":
        del variants["hooks"]
    trainers = {}
    for name, extra in variants.items():
        recipe = load_recipe(recipe_path, overrides=[*overrides, *extra])
        trainers[name] = build_experiment(recipe).trainer(validate=False)
    # the same fixed batches for all (the DP runs' loaders are Poisson-sampled: take the plain loader's)
    batches = list(itertools.islice(trainers["plain"].train_loader.epoch(0), steps))
    times: dict[str, list[float]] = {name: [] for name in trainers}
    for t in trainers.values():  # warm-up
        t.train_step([batches[0]])
    for _ in range(rounds):
        for name, t in trainers.items():
            t0 = time.perf_counter()
            for b in batches:
                t.train_step([b])
            times[name].append((time.perf_counter() - t0) / len(batches))
    return times


def accuracy(recipe: str, overrides: list[str], tmp: Path, tag: str) -> float:
    out = tmp / tag
    cmd = [sys.executable, "-m", "bigmodel", "train", recipe, *overrides, "--out", str(out), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    import json

    return float(json.loads((out / "summary.json").read_text())["metrics"]["accuracy"])


def audit(tmp: Path, dp: bool) -> dict:
    import json

    recipe = str(ROOT / "benchmarks" / "audit_overfit.yaml")
    accuracy(recipe, ["privacy.dp.target_epsilon=3"] if dp else [], tmp, "dp" if dp else "plain")
    run = tmp / ("dp" if dp else "plain")
    cmd = [sys.executable, "-m", "bigmodel", "audit", str(run), "--membership", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    r = json.loads(proc.stdout)
    r["test_accuracy"] = json.loads((run / "summary.json").read_text())["metrics"]["accuracy"]
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="recipes/fashion_mnist_dp.yaml")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--accuracy", action="store_true", help="also train at ε = 1, 3, 8, ∞ (slow)")
    ap.add_argument("--audit", action="store_true", help="also the membership audit, without DP and at ε = 3")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    env = environment()
    base = [f"train.batch_size={args.batch_size}", "train.baseline=false", *args.overrides]
    times = step_times(str(ROOT / args.recipe), base, args.steps, args.rounds)
    dp, plain = times["dp"], times["plain"]
    ratio = median(dp) / median(plain)
    result: dict = {
        "environment": env,
        "recipe": args.recipe,
        "batch_size": args.batch_size,
        "dp_step_s": median(dp),
        "plain_step_s": median(plain),
        "dp_step_time_ratio": round(ratio, 4),
    }
    if "hooks" in times:
        result["dp_hooks_step_s"] = median(times["hooks"])
        result["dp_hooks_step_time_ratio"] = round(median(times["hooks"]) / median(plain), 4)
    if args.accuracy:
        with tempfile.TemporaryDirectory() as tmp:
            acc = {}
            for eps in (1, 3, 8):
                acc[str(eps)] = accuracy(
                    args.recipe, [f"privacy.dp.target_epsilon={eps}", *args.overrides], Path(tmp), f"e{eps}"
                )
            # ε = ∞: the same recipe without noise (σ → 0), clipping and learning rate kept. Dropping `privacy.dp`
            # instead trains with the DP learning rate on unclipped gradients: SGD at lr 4 on the Fashion CNN diverged
            # (training loss 3.6 → 5.5 by epoch 9), which says nothing about the price of privacy.
            nonoise = ["privacy.dp.target_epsilon=null", "privacy.dp.noise_multiplier=1e-9"]
            acc["inf"] = accuracy(args.recipe, [*nonoise, *args.overrides], Path(tmp), "inf")
        result["accuracy_by_epsilon"] = acc
    if args.audit:
        with tempfile.TemporaryDirectory() as tmp:
            plain_audit, dp_audit = audit(Path(tmp), dp=False), audit(Path(tmp), dp=True)
        result |= {
            "membership_auc_plain": round(plain_audit["auc"], 4),
            "membership_auc_dp": round(dp_audit["auc"], 4),
            "membership_dp_epsilon": round(dp_audit["privacy"]["epsilon"], 4),
            "audit_test_accuracy_plain": plain_audit["test_accuracy"],
            "audit_test_accuracy_dp": dp_audit["test_accuracy"],
        }
    if args.json:
        emit_json(result)
        return
    print_env(env)
    rows = [["DP-SGD (the recipe's grad_sample_mode)", median(dp), args.batch_size / median(dp), ratio]]
    if "hooks" in times:
        h = median(times["hooks"])
        rows.append(["DP-SGD (Opacus' hooks mode)", h, args.batch_size / h, h / median(plain)])
    rows.append(["non-private", median(plain), args.batch_size / median(plain), 1.0])
    print_table(["step", "median s", "samples/s", "x non-private"], rows)
    print(f"dp_step_time_ratio {ratio:.3f}  (batch {args.batch_size}, median of {args.rounds} rounds)")
    if args.accuracy:
        print_table(["epsilon", "test accuracy"], [[k, v] for k, v in result["accuracy_by_epsilon"].items()])
    if args.audit:
        print_table(
            ["overfit model (300 images)", "membership AUC", "test accuracy"],
            [
                ["without DP", result["membership_auc_plain"], result["audit_test_accuracy_plain"]],
                [
                    f"DP-SGD ε = {result['membership_dp_epsilon']}",
                    result["membership_auc_dp"],
                    result["audit_test_accuracy_dp"],
                ],
            ],
        )


if __name__ == "__main__":
    main()
