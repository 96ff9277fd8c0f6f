"""Vision benchmark on Fashion-MNIST, all in one job:

1. time-to-accuracy: the seed documents' recipe (recipes/seed_cnn.yaml: fp32, SGD lr 0.001, momentum 0.9, batch 64,
   no augmentation, 5 epochs) sets the target — its validation accuracy after 5 epochs — and its training time;
   then bigmodel's recipe (recipes/quickstart.yaml by default) trains with the validation split evaluated every
   `--eval-every` steps (evaluation time excluded from the clock) until it first reaches that accuracy.
   `speedup_vs_seed_ratio` = seed time / bigmodel time to the same accuracy.
2. throughput of the quickstart model with and without bf16 autocast and channels_last
   (`bf16_channels_last_ratio` = both on / both off).
3. the Trainer against a hand-written loop on the ResNet (`resnet_trainer_vs_hand_loop_ratio`).

    python benchmarks/vision.py [--json] [--skip-seed]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit_json, environment, median, print_env, print_table  # noqa: E402
from bigmodel.api import build_experiment  # noqa: E402
from bigmodel.config import load_recipe  # noqa: E402
from bigmodel.training.trainer import Callback, Trainer  # noqa: E402
from trainer_overhead import compare  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class TimeToAccuracy(Callback):
    """Evaluate on validation every `every` steps; record the training time (evaluation excluded) when the
    validation accuracy first reaches `target`, then stop."""

    def __init__(self, every: int, target: float | None) -> None:
        self.every, self.target = every, target
        self.eval_time = 0.0
        self.reached_at: float | None = None
        self.curve: list[tuple[float, float]] = []

    def on_fit_start(self, trainer: Trainer) -> None:
        self.t0 = time.perf_counter()

    def train_time(self) -> float:
        return time.perf_counter() - self.t0 - self.eval_time

    def on_fit_end(self, trainer: Trainer) -> None:
        self.total = self.train_time()  # the whole fit, before any evaluation done after it

    def on_step_end(self, trainer: Trainer, loss: float | None) -> None:
        if trainer.state.step % self.every:
            return
        t = self.train_time()
        e0 = time.perf_counter()
        acc = trainer.evaluate(trainer.val_loader)["accuracy"]
        trainer.model.train()
        self.eval_time += time.perf_counter() - e0
        self.curve.append((t, acc))
        if self.target is not None and acc >= self.target and self.reached_at is None:
            self.reached_at = t
            trainer.request_stop()


def run(recipe_path: Path, overrides: list[str], every: int, target: float | None) -> tuple[TimeToAccuracy, float]:
    recipe = load_recipe(recipe_path, [*overrides, "train.checkpoint_every=null"])
    cb = TimeToAccuracy(every, target)
    trainer = build_experiment(recipe).trainer(callbacks=[cb])
    trainer.fit()
    final = trainer.evaluate(trainer.val_loader)["accuracy"]
    return cb, final


def throughput(precision: str, channels_last: bool, steps: int = 60) -> float:
    recipe = load_recipe(
        ROOT / "recipes" / "quickstart.yaml",
        [
            f"train.precision={precision}",
            f"train.channels_last={str(channels_last).lower()}",
            f"data.limit_train={steps * 256}",
        ],
    )
    t = build_experiment(recipe).trainer(validate=False)
    batches = list(t.train_loader.epoch(0))
    for b in batches[:5]:  # warm-up
        t.train_step([b])
    t0 = time.perf_counter()
    for b in batches:
        t.train_step([b])
    return len(batches) * 256 / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "quickstart.yaml"))
    ap.add_argument("--eval-every", type=int, default=50, help="steps between validation checks")
    ap.add_argument("--resnet", default="resnet-8")
    ap.add_argument("--quick", action="store_true", help="a smoke run on 1,024 images (for tests; figures meaningless)")
    args = ap.parse_args()
    figures: dict = {"environment": environment(), "quick": args.quick}
    small = ["data.limit_train=1024", "train.epochs=1"] if args.quick else []
    steps, rounds = (4, 1) if args.quick else (60, 3)

    # 1. time to the seed recipe's accuracy
    seed_cb, seed_acc = run(ROOT / "recipes" / "seed_cnn.yaml", small, every=10**9, target=None)
    seed_time = seed_cb.total
    print(f"seed recipe: val accuracy {seed_acc:.4f} after 5 epochs in {seed_time:.1f}s", file=sys.stderr)
    ours_cb, _ = run(Path(args.recipe), small, every=2 if args.quick else args.eval_every, target=seed_acc)
    ours_time = ours_cb.reached_at
    print(f"bigmodel: reached {seed_acc:.4f} in {ours_time}s", file=sys.stderr)
    figures.update(
        {
            "seed_val_accuracy_5_epochs": seed_acc,
            "seed_train_time_s": seed_time,
            "bigmodel_time_to_seed_accuracy_s": ours_time,
            "speedup_vs_seed_ratio": seed_time / ours_time if ours_time else None,
        }
    )

    # 2. bf16 autocast and channels_last
    rates = {}
    for precision in ("fp32", "bf16"):
        for cl in (False, True):
            rates[(precision, cl)] = median([throughput(precision, cl, steps) for _ in range(rounds)])
    figures.update(
        {
            "samples_per_s_fp32": rates[("fp32", False)],
            "samples_per_s_fp32_channels_last": rates[("fp32", True)],
            "samples_per_s_bf16": rates[("bf16", False)],
            "samples_per_s_bf16_channels_last": rates[("bf16", True)],
            "bf16_channels_last_ratio": rates[("bf16", True)] / rates[("fp32", False)],
        }
    )

    # 3. the Trainer against a hand-written loop on the ResNet
    res = compare(12 if args.quick else 100, 256, rounds, [f"model={{name: {args.resnet}}}"])
    figures.update(
        {
            "resnet_model": args.resnet,
            "resnet_trainer_samples_per_s": res["trainer_samples_per_s"],
            "resnet_hand_loop_samples_per_s": res["hand_loop_samples_per_s"],
            "resnet_trainer_vs_hand_loop_ratio": res["trainer_vs_hand_loop_ratio"],
        }
    )
    if args.json:
        emit_json(figures)
        return
    print_env(figures["environment"])
    print_table(
        ["time to accuracy", "value"],
        [
            ["seed recipe val accuracy (5 epochs)", seed_acc],
            ["seed recipe training time (s)", seed_time],
            ["bigmodel time to that accuracy (s)", ours_time if ours_time is not None else "not reached"],
            ["speedup_vs_seed_ratio", figures["speedup_vs_seed_ratio"] or "n/a"],
        ],
    )
    print()
    print_table(["precision", "channels_last", "samples/s"], [[p, str(cl), r] for (p, cl), r in rates.items()])
    print(f"bf16_channels_last_ratio = {figures['bf16_channels_last_ratio']:.2f}")
    print()
    print_table(
        ["loop", f"{args.resnet} samples/s"],
        [
            ["bigmodel Trainer", res["trainer_samples_per_s"]],
            ["hand-written", res["hand_loop_samples_per_s"]],
        ],
    )
    print(f"resnet_trainer_vs_hand_loop_ratio = {res['trainer_vs_hand_loop_ratio']:.3f}")


if __name__ == "__main__":
    main()
