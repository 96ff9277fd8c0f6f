"""Trainer overhead: the same model, data, batch size and steps through bigmodel's Trainer and through a
hand-written PyTorch loop, in the same process, alternating rounds; prints samples/s of each and the ratio.

    python benchmarks/trainer_overhead.py [--steps 200] [--rounds 3] [--json]

Both sides: cnn-small on Fashion-MNIST (random uint8 images of the same shape when it is not installed), batch 256,
AdamW + one-cycle (fused on CUDA), bf16 autocast where the device has it natively, channels_last, flip augmentation,
the data kept on the device (`train.device` picks it: CUDA when there is one). The Trainer side includes everything
a real run does (schedule, finiteness checks, logging to metrics.jsonl, the epoch-end checkpoint); evaluation is off
on both sides.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit_json, environment, median, print_env, print_table  # noqa: E402
from bigmodel.api import build_experiment  # noqa: E402
from bigmodel.config import load_recipe  # noqa: E402
from bigmodel.data import standard  # noqa: E402
from bigmodel.data.split import mix_seed  # noqa: E402
from bigmodel.models import build_model  # noqa: E402
from bigmodel.training.trainer import resolve_precision  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def make_experiment(steps: int, batch: int, extra: list[str] | None = None):
    overrides = [
        f"data.limit_train={steps * batch}",
        "train.epochs=1",
        f"train.batch_size={batch}",
        "train.log_every=50",
        *(extra or []),
    ]
    if not standard.has_idx_files(standard.IDX_SETS["fashion_mnist"].local_dirs[0]):
        overrides += ["data.source=digits"]  # shape differs, but both sides still run the same work
    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml", overrides)
    return recipe, build_experiment(recipe)


def run_trainer(recipe, exp, run_dir: Path) -> float:
    torch.manual_seed(0)
    model = build_model(recipe.model.name, recipe.model.options, exp.data.input_shape, len(exp.data.labels))
    trainer = exp.trainer(run_dir=run_dir, model=model, validate=False)
    sync(exp.device)
    t0 = time.perf_counter()
    state = trainer.fit()
    sync(exp.device)
    return state.samples_seen / (time.perf_counter() - t0)


def run_hand_loop(recipe, exp) -> float:
    """What a careful user writes by hand: index, normalise, flip, autocast, step, schedule."""
    torch.manual_seed(0)
    model = build_model(recipe.model.name, recipe.model.options, exp.data.input_shape, len(exp.data.labels))
    dev = exp.device
    model = model.to(dev, memory_format=torch.channels_last)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    cfg = recipe.train
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.optimizer.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.optimizer.lr,
        **({"fused": True} if dev.type == "cuda" else {"foreach": True}),
    )
    x_all, y_all = exp.data.train.x.to(dev), exp.data.train.y.to(dev)  # data kept on the device, as the Trainer does
    B = cfg.batch_size
    steps = len(y_all) // B
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.optimizer.lr, total_steps=steps, pct_start=cfg.schedule.pct_start
    )
    mean = torch.tensor(exp.preprocess.mean, device=dev).view(1, -1, 1, 1)
    std = torch.tensor(exp.preprocess.std, device=dev).view(1, -1, 1, 1)
    amp = resolve_precision(cfg.precision, dev)  # what the Trainer picks: bf16 on native-bf16 CPUs and on GPUs
    model.train()
    sync(dev)
    t0 = time.perf_counter()
    perm = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(0)).to(dev)
    for i in range(steps):
        idx = perm[i * B : (i + 1) * B]
        x, y = x_all[idx], y_all[idx]
        g = torch.Generator().manual_seed(mix_seed(0, 0, i))
        flip = (torch.rand(B, generator=g) < 0.5).to(dev)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        x = ((x.float() / 255 - mean) / std).contiguous(memory_format=torch.channels_last)
        with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = F.cross_entropy(model(x).float(), y, label_smoothing=cfg.label_smoothing)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
    sync(dev)
    return steps * B / (time.perf_counter() - t0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("overrides", nargs="*", help="recipe overrides for both sides, e.g. model.name=resnet-8")
    args = ap.parse_args()
    figures = compare(args.steps, args.batch_size, args.rounds, args.overrides)
    if args.json:
        emit_json(figures)
        return
    print_env(figures["environment"])
    print_table(
        ["loop", "samples/s (median)", "per round"],
        [
            [
                "bigmodel Trainer",
                figures["trainer_samples_per_s"],
                " ".join(f"{x:,.0f}" for x in figures["trainer_rounds"]),
            ],
            ["hand-written", figures["hand_loop_samples_per_s"], " ".join(f"{x:,.0f}" for x in figures["hand_rounds"])],
        ],
    )
    print(f"trainer / hand-written = {figures['trainer_vs_hand_loop_ratio']:.3f} (median of per-round ratios)")


def compare(steps: int, batch_size: int, rounds: int, overrides: list[str] | None = None) -> dict:
    """Alternating rounds of the hand loop and the Trainer; medians and the median per-round ratio."""
    recipe, exp = make_experiment(steps, batch_size, overrides)
    run_hand_loop(recipe, exp)  # warm-up: oneDNN primitive caches, allocator
    trainer_rates, hand_rates = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            hand_rates.append(run_hand_loop(recipe, exp))
            trainer_rates.append(run_trainer(recipe, exp, Path(tmp) / f"run{r}"))
            print(
                f"round {r}: trainer {trainer_rates[-1]:,.0f} samples/s, hand loop {hand_rates[-1]:,.0f}",
                file=sys.stderr,
            )
    ratios = [t / h for t, h in zip(trainer_rates, hand_rates, strict=True)]
    return {
        "model": recipe.model.name,
        "steps": steps,
        "batch_size": batch_size,
        "rounds": rounds,
        "data": recipe.data.source,
        "trainer_samples_per_s": median(trainer_rates),
        "hand_loop_samples_per_s": median(hand_rates),
        "trainer_vs_hand_loop_ratio": median(ratios),
        "trainer_rounds": trainer_rates,
        "hand_rounds": hand_rates,
        "environment": environment(),
    }


if __name__ == "__main__":
    main()
