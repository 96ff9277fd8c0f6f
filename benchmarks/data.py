"""Data on disk in shards against data in memory: training speed and resident memory, on an enlarged Fashion-MNIST.

    python benchmarks/data.py [--enlarge 4] [--epochs 2] [--limit-train N] [--json]

1. Writes the quickstart's Fashion-MNIST splits with the training split enlarged `--enlarge` times (copy k is shifted
   by k mod 3 - 1 pixels and mirrored when k is odd; generated a shard at a time, never whole in memory) through
   `write_shards`, the code behind `bigmodel data prepare`.
2. Trains the quickstart on it twice, each in its own process: `in_memory` (the splits read into memory) and
   `on_disk` (`data.in_memory_limit_mb` far below their size: each batch read from the shards). Each process prints
   its resident memory (VmRSS) after every epoch and the samples/s of its training.
`disk_vs_memory_speed_ratio` = on-disk samples/s / in-memory samples/s; `disk_peak_rss_vs_data_ratio` = the on-disk
run's peak resident memory / the size of the training images.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit_json, environment, print_env, print_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class Enlarged:
    """K shifted / mirrored copies of a uint8 (N, C, H, W) tensor, generated on indexing."""

    def __init__(self, x: Any, k: int) -> None:
        self.x, self.k = x, k
        self.shape = (len(x) * k, *x.shape[1:])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, sl: slice) -> Any:
        import torch

        n = len(self.x)
        rows = range(*sl.indices(len(self)))
        out = []
        for copy in sorted({r // n for r in rows}):
            lo, hi = max(rows.start, copy * n), min(rows.stop, (copy + 1) * n)
            part = torch.roll(self.x[lo - copy * n : hi - copy * n], shifts=copy % 3 - 1, dims=3)
            out.append(part.flip(3) if copy % 2 else part)
        return torch.cat(out)


def prepare(folder: Path, k: int, limit: int | None = None) -> dict[str, Any]:
    from bigmodel.config import load_recipe
    from bigmodel.data.shards import write_shards
    from bigmodel.data.sources import ImageDataset, ImageSplit, load_data

    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml")
    data = load_data(recipe.data, recipe.seed)
    if limit:
        data.train = ImageSplit(data.train.x[:limit], data.train.y[:limit])
    big = ImageSplit(Enlarged(data.train.x, k), data.train.y.repeat(k))  # type: ignore[arg-type]
    return write_shards(ImageDataset(big, data.val, data.test, data.labels), folder, shard_size=20_000)


CHILD = r"""
import json, sys, time
from pathlib import Path
from bigmodel.api import build_experiment
from bigmodel.config import load_recipe
from bigmodel.training.trainer import Callback

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

folder, limit, epochs, out = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
recipe = load_recipe(
    "recipes/quickstart.yaml",
    ["data.source=shards", f"data.path={folder}", f"data.in_memory_limit_mb={limit}", f"train.epochs={epochs}",
     "train.eval_every=1000", "train.baseline=false"],
)
exp = build_experiment(recipe)
per_epoch = []

class Rss(Callback):
    epoch = 0

    def on_step_end(self, trainer, loss):
        if trainer.state.epoch != self.epoch:  # an epoch just ended
            self.epoch = trainer.state.epoch
            per_epoch.append(rss_mb())

    def on_fit_end(self, trainer):
        if len(per_epoch) < trainer.state.epoch or not per_epoch:
            per_epoch.append(rss_mb())

t = exp.trainer(run_dir=Path(out), callbacks=[Rss()], validate=False)
rss_start = rss_mb()
t0 = time.perf_counter()
state = t.fit()
seconds = time.perf_counter() - t0
print(json.dumps({"on_disk": bool(exp.data.on_disk), "samples_per_s": state.samples_seen / seconds,
                  "rss_mb_start": rss_start, "rss_mb_per_epoch": per_epoch, "seconds": seconds}))
"""


def run_child(folder: Path, limit_mb: float, epochs: int, out: Path) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder), str(limit_mb), str(epochs), str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--enlarge", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--limit-train", type=int, help="enlarge only the first N training images (a quick run)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    env = environment()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "shards"
        index = prepare(folder, args.enlarge, args.limit_train)
        train_mb = sum((folder / s["file"]).stat().st_size for s in index["splits"]["train"]["shards"]) / 2**20
        mem = run_child(folder, 1e9, args.epochs, Path(tmp) / "mem")
        disk = run_child(folder, 1.0, args.epochs, Path(tmp) / "disk")
    assert disk["on_disk"] and not mem["on_disk"]
    figures = {
        "enlarge": args.enlarge,
        "train_images": index["splits"]["train"]["count"],
        "train_data_mb": train_mb,
        "in_memory": mem,
        "on_disk": disk,
        "disk_vs_memory_speed_ratio": disk["samples_per_s"] / mem["samples_per_s"],
        "disk_peak_rss_vs_data_ratio": max(disk["rss_mb_per_epoch"]) / train_mb,
        "environment": env,
    }
    if args.json:
        emit_json(figures)
        return
    print_env(env)
    print(f"training split: {figures['train_images']:,} images, {train_mb:.0f} MB of uint8 pixels")
    print_table(
        ["path", "samples/s", "RSS at start (MB)", "RSS after each epoch (MB)"],
        [
            [k, r["samples_per_s"], r["rss_mb_start"], " ".join(f"{v:.0f}" for v in r["rss_mb_per_epoch"])]
            for k, r in (("in memory", mem), ("on disk", disk))
        ],
    )
    print(f"on disk / in memory speed = {figures['disk_vs_memory_speed_ratio']:.3f}")


if __name__ == "__main__":
    main()
