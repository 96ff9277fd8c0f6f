"""Data on disk in shards against data in memory: training speed and resident memory, on an enlarged Fashion-MNIST.

    python benchmarks/data.py [--enlarge 4] [--epochs 2] [--limit-train N] [--num-workers N]
                              [--paths in_memory on_disk] [--memory-cap-mb MB] [--json]

1. Writes the quickstart's Fashion-MNIST splits with the training split enlarged `--enlarge` times (copy k is shifted
   by k mod 3 - 1 pixels and mirrored when k is odd; generated a shard at a time, never whole in memory) through
   `write_shards`, the code behind `bigmodel data prepare`.
2. Trains the quickstart on it twice, each in its own process: `in_memory` (the splits read into memory) and
   `on_disk` (`data.in_memory_limit_mb` far below their size: each batch read from the shards). Each process prints
   its resident memory (VmRSS) after every epoch and the samples/s of its training. `--num-workers N` adds
   `on_disk_workers`: the on-disk path with its batches made by N worker processes; "PSS with workers" is the memory
   of the process and its workers with shared pages counted once (forked workers share the parent's pages, so adding
   their VmRSS would count those twice).
3. `--image-files`: the same splits written as an image folder of PNG files (`data.source: image_folder`): decoded
   into memory at the start (in_memory), or decoded a batch at a time (on_disk; in the workers with --num-workers).
4. `--memory-cap-mb MB` runs the on-disk processes in a memory cgroup limited to MB (cgroup v1 `memory.limit_in_bytes`
   or v2 `memory.max`; it needs a writable cgroup, e.g. root in a container): the kernel kills the run if the process
   and its workers ever hold more, page cache included. The cgroup's peak usage and how often it hit the limit are
   reported. Set it at least 5x below the training split's size to show memory that does not grow with the data.
Memory figures are each epoch's peak of samples taken every 25 steps.
`disk_vs_memory_speed_ratio` = on-disk samples/s / in-memory samples/s; `disk_peak_rss_vs_data_ratio` = the on-disk
run's peak resident memory / the size of the training images; `data_vs_memory_cap_ratio` = the training images' size /
the cap.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
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


def write_png_folder(shards: Path, root: Path) -> None:
    """The prepared splits as an image folder of PNG files (ROOT/<split>/<label>/<n>.png), for `--image-files`."""
    from PIL import Image

    from bigmodel.data.shards import ShardIndex

    index = ShardIndex.read(shards)
    for split in index.splits:
        x, y = index.images(split), index.labels_of(split)
        names = [f"{c:02d}-{label.replace('/', '-')}" for c, label in enumerate(index.labels)]  # in class order
        for name in names:
            (root / split / name).mkdir(parents=True, exist_ok=True)
        for a in range(0, len(x), 10_000):
            for k, (img, c) in enumerate(
                zip(x[a : a + 10_000].numpy(), y[a : a + 10_000].tolist(), strict=True), start=a
            ):
                Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)).save(
                    root / split / names[c] / f"{k:07d}.png", compress_level=1
                )


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

import multiprocessing

def _field(path, key):
    try:
        for line in open(path):
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return 0.0

def rss_mb():  # this process's resident memory
    return _field("/proc/self/status", "VmRSS:")

def pss_mb():  # this process and its worker processes, shared pages counted once (proportional set size)
    pids = ["self"] + [str(p.pid) for p in multiprocessing.active_children()]
    return sum(_field(f"/proc/{pid}/smaps_rollup", "Pss:") for pid in pids)

folder, limit, epochs, out, workers = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
source = sys.argv[6]
recipe = load_recipe(
    "recipes/quickstart.yaml",
    [f"data.source={source}", f"data.path={folder}", f"data.in_memory_limit_mb={limit}", f"train.epochs={epochs}",
     "train.eval_every=1000", "train.baseline=false", f"train.num_workers={workers}"],
)
exp = build_experiment(recipe)
per_epoch, pss_per_epoch = [], []

class Rss(Callback):
    # the peak of memory samples taken every 25 steps of each epoch (worker processes live only within one)

    epoch, steps, rss, pss = 0, 0, 0.0, 0.0

    def on_step_end(self, trainer, loss):
        self.steps += 1
        if self.steps % 25 == 1:
            self.rss, self.pss = max(self.rss, rss_mb()), max(self.pss, pss_mb())
        if trainer.state.epoch != self.epoch:  # an epoch just ended
            self.epoch = trainer.state.epoch
            self.close()

    def close(self):
        per_epoch.append(max(self.rss, rss_mb()))
        pss_per_epoch.append(self.pss or pss_mb())
        self.rss = self.pss = 0.0

    def on_fit_end(self, trainer):
        if len(per_epoch) < trainer.state.epoch or not per_epoch:
            self.close()

t = exp.trainer(run_dir=Path(out), callbacks=[Rss()], validate=False)
rss_start = rss_mb()
t0 = time.perf_counter()
state = t.fit()
seconds = time.perf_counter() - t0
print(json.dumps({"on_disk": bool(exp.data.on_disk), "samples_per_s": state.samples_seen / seconds,
                  "rss_mb_start": rss_start, "rss_mb_per_epoch": per_epoch, "pss_mb_per_epoch": pss_per_epoch,
                  "seconds": seconds}))
"""


class MemoryCap:
    """A memory cgroup limited to `mb` that child processes join before they exec (cgroup v1 or v2)."""

    def __init__(self, mb: float) -> None:
        self.mb = mb
        name = f"bigmodel-bench-{os.getpid()}"
        v1 = Path("/sys/fs/cgroup/memory")
        if (v1 / "memory.limit_in_bytes").exists():
            self.dir, limit, self.peak, self.hits = (
                v1 / name,
                "memory.limit_in_bytes",
                "memory.max_usage_in_bytes",
                None,
            )
        else:
            own = ""
            with contextlib.suppress(OSError):
                own = next(x[3:] for x in Path("/proc/self/cgroup").read_text().splitlines() if x.startswith("0::"))
            self.dir, limit, self.peak, self.hits = (
                Path("/sys/fs/cgroup") / own.strip("/") / name,
                "memory.max",
                "memory.peak",
                "memory.events",
            )
        try:
            self.dir.mkdir()
            (self.dir / limit).write_text(str(int(mb * 2**20)))
        except OSError as e:
            raise SystemExit(
                f"--memory-cap-mb: cannot make a memory cgroup at {self.dir} ({e.strerror}); it needs a writable "
                "cgroup memory controller (root in a container, or run under systemd-run --user -p MemoryMax=...)"
            ) from None

    def join(self) -> None:  # runs in the child between fork and exec
        (self.dir / "cgroup.procs").write_text(str(os.getpid()))

    def figures(self) -> dict[str, Any]:
        out: dict[str, Any] = {"cap_mb": self.mb}
        with contextlib.suppress(OSError, ValueError):
            out["peak_mb"] = int((self.dir / self.peak).read_text()) / 2**20
        with contextlib.suppress(OSError, ValueError):
            if self.hits is None:  # v1: times usage hit the limit (reclaim followed)
                out["limit_hits"] = int((self.dir / "memory.failcnt").read_text())
            else:
                ev = dict(line.split() for line in (self.dir / self.hits).read_text().splitlines())
                out["limit_hits"], out["oom_kills"] = int(ev.get("max", 0)), int(ev.get("oom_kill", 0))
        return out

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.dir.rmdir()


def run_child(
    folder: Path,
    limit_mb: float,
    epochs: int,
    out: Path,
    workers: int = 0,
    cap: MemoryCap | None = None,
    source: str = "shards",
) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder), str(limit_mb), str(epochs), str(out), str(workers), source],
        cwd=ROOT,
        capture_output=True,
        text=True,
        preexec_fn=cap.join if cap else None,
    )
    if proc.returncode != 0:
        killed = " (killed: over the memory cap)" if cap and proc.returncode == -9 else ""
        raise SystemExit(f"the training process failed{killed}:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if cap:
        result["cgroup"] = cap.figures()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--enlarge", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--limit-train", type=int, help="enlarge only the first N training images (a quick run)")
    ap.add_argument("--num-workers", type=int, default=0, help="also run on disk with this many worker processes")
    ap.add_argument("--paths", nargs="+", choices=["in_memory", "on_disk"], default=["in_memory", "on_disk"])
    ap.add_argument("--memory-cap-mb", type=float, help="run the on-disk processes in a memory cgroup of this size")
    ap.add_argument("--keep", type=Path, help="write the shards here and keep them (default: a temporary folder)")
    ap.add_argument(
        "--image-files",
        action="store_true",
        help="train from an image folder of PNG files instead of shards: decoded into memory, or per batch",
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    env = environment()
    cells: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp) / "shards"
        if (folder / "index.json").exists():
            index = json.loads((folder / "index.json").read_text())
        else:
            index = prepare(folder, args.enlarge, args.limit_train)
        train_mb = sum((folder / s["file"]).stat().st_size for s in index["splits"]["train"]["shards"]) / 2**20
        source = "shards"
        if args.image_files:
            folder, source = Path(tmp) / "png", "image_folder"
            write_png_folder(args.keep or Path(tmp) / "shards", folder)
        if "in_memory" in args.paths:
            cells["in_memory"] = run_child(folder, 1e9, args.epochs, Path(tmp) / "mem", source=source)
        runs = [("on_disk", 0)] if "on_disk" in args.paths else []
        runs += [("on_disk_workers", args.num_workers)] if args.num_workers and "on_disk" in args.paths else []
        for name, workers in runs:
            cap = MemoryCap(args.memory_cap_mb) if args.memory_cap_mb else None
            try:
                cells[name] = run_child(folder, 1.0, args.epochs, Path(tmp) / name, workers, cap, source)
            finally:
                if cap:
                    cap.close()
            cells[name]["num_workers"] = workers
    assert all(c["on_disk"] == (k != "in_memory") for k, c in cells.items())
    figures: dict[str, Any] = {
        "source": source,
        "enlarge": args.enlarge,
        "epochs": args.epochs,
        "train_images": index["splits"]["train"]["count"],
        "train_data_mb": train_mb,
        **cells,
        "environment": env,
    }
    if "in_memory" in cells and "on_disk" in cells:
        figures["disk_vs_memory_speed_ratio"] = cells["on_disk"]["samples_per_s"] / cells["in_memory"]["samples_per_s"]
    if "in_memory" in cells and "on_disk_workers" in cells:
        figures["workers_vs_memory_speed_ratio"] = (
            cells["on_disk_workers"]["samples_per_s"] / cells["in_memory"]["samples_per_s"]
        )
    if "on_disk" in cells:
        figures["disk_peak_rss_vs_data_ratio"] = max(cells["on_disk"]["rss_mb_per_epoch"]) / train_mb
    if args.memory_cap_mb:
        figures["data_vs_memory_cap_ratio"] = train_mb / args.memory_cap_mb
    if args.json:
        emit_json(figures)
        return
    print_env(env)
    print(f"training split: {figures['train_images']:,} images, {train_mb:.0f} MB of uint8 pixels")
    rows = []
    for k, r in cells.items():
        cg = r.get("cgroup", {})
        rows.append(
            [
                k.replace("_", " ") + (f" ({r['num_workers']} workers)" if r.get("num_workers") else ""),
                r["samples_per_s"],
                r["rss_mb_start"],
                " ".join(f"{v:.0f}" for v in r["rss_mb_per_epoch"]),
                " ".join(f"{v:.0f}" for v in r["pss_mb_per_epoch"]),
                f"{cg['peak_mb']:.0f} of {cg['cap_mb']:.0f}" if "peak_mb" in cg else "-",
            ]
        )
    headers = ["path", "samples/s", "RSS at start (MB)", "RSS peak per epoch (MB)", "PSS with workers (MB)"]
    print_table([*headers, "cgroup peak (MB)"], rows)
    for k, v in figures.items():
        if k.endswith("_ratio"):
            print(f"{k} = {v:.3f}")


if __name__ == "__main__":
    main()
