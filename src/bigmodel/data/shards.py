"""Image data on disk in shards: built once by `bigmodel data prepare RECIPE`, read back without holding it in memory.

A prepared folder holds, for each split (train / val / test, carved with the recipe's seed at prepare time):
- `<split>-00000.npy`, `<split>-00001.npy`, ...: uint8 (n, C, H, W) arrays of at most `shard_size` images (plain
  `.npy`: NumPy reads them with `np.load(..., mmap_mode="r")`, no pickle);
- `<split>-labels.npy`: int64 (N,) class indices;
and one `index.json`: the format, the label names, the image shape, each split's shards and counts, and the training
split's per-channel mean and std (computed while writing, so training never reads the data just to normalise it).

`data.source: shards` with `data.path: FOLDER` trains on it. Splits at most `data.in_memory_limit_mb` (all together)
are read into memory, the fast path for data that fits; larger ones stay on disk as `DiskImages`, which reads the
images of each batch with one `pread` per image (sorted by position), so resident memory holds one batch, not the
data set, whatever its size. Either way the batches are the sampling plan's: the order is a pure function of (seed,
epoch), so a resumed run continues exactly, and each process of a distributed run reads only its share of each batch.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bigmodel.errors import UserError

FORMAT = "bigmodel-shards/1"
SPLITS = ("train", "val", "test")


# --------------------------------------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class _Shard:
    path: Path
    offset: int  # where the array's bytes begin (after the .npy header)
    count: int


def _open_npy(path: Path, shape: tuple[int, ...]) -> _Shard:
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            fmt = np.lib.format
            read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            header = read(f)  # (shape, fortran_order, dtype); no pickle
            offset = f.tell()
    except FileNotFoundError:
        raise UserError(f"{path}: shard file not found (prepare the folder again: bigmodel data prepare)") from None
    except ValueError as e:
        raise UserError(f"{path}: not a .npy shard ({e})") from None
    got_shape, fortran, dtype = header
    if dtype != np.uint8 or fortran or tuple(got_shape[1:]) != shape:
        raise UserError(f"{path}: expected uint8 images of shape (n, {', '.join(map(str, shape))}), got {header}")
    return _Shard(path, offset, int(got_shape[0]))


class RawFile:
    """A read-only descriptor on `self.path`, opened on first use, opened again in a forked process (which must not
    share its parent's), closed with the object."""

    path: Path
    _fd: int | None = None
    _pid: int = -1

    def _file(self) -> int:
        if self._fd is None or os.getpid() != self._pid:
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def __del__(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)


class LazyImages:
    """(N, C, H, W) uint8 images that are read only when indexed, like a tensor: `x[i]`, `x[a:b]`, `x[index_tensor]`,
    `x[bool_mask]` return tensors; `subset(idx)` is a view (nothing is read). Subclasses say how to read rows."""

    dtype = torch.uint8
    device = torch.device("cpu")

    def __init__(self, total: int, image_shape: tuple[int, int, int], rows: torch.Tensor | None = None) -> None:
        self._total = total
        self._image_shape = tuple(image_shape)
        self._item = int(np.prod(image_shape))
        self._rows = rows  # a view's rows of the underlying data (None: all of them, in order)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self._image_shape)

    @property
    def nbytes(self) -> int:
        return len(self) * self._item

    def __len__(self) -> int:
        return self._total if self._rows is None else len(self._rows)

    def to(self, device: Any) -> LazyImages:
        """Stays where it is: batches are read on the CPU and the loader moves each one to its device."""
        return self

    def subset(self, idx: torch.Tensor) -> LazyImages:
        rows = torch.as_tensor(idx, dtype=torch.long)
        return self._view(rows if self._rows is None else self._rows[rows])

    def _view(self, rows: torch.Tensor) -> LazyImages:
        raise NotImplementedError

    def _read(self, rows: torch.Tensor) -> torch.Tensor:
        """Images at underlying positions `rows` (any order, repeats allowed) as a (len(rows), C, H, W) tensor."""
        raise NotImplementedError

    def __getitem__(self, idx: Any) -> torch.Tensor:
        n = len(self)
        if isinstance(idx, int):
            if not -n <= idx < n:
                raise IndexError(f"index {idx} out of range for {n} images")
            return self[torch.tensor([idx % n])][0]
        if isinstance(idx, slice):
            idx = torch.arange(n)[idx]
        idx = torch.as_tensor(idx).cpu()
        if idx.dtype == torch.bool:  # a mask over the images
            idx = torch.nonzero(idx).flatten()
        idx = idx.long()
        if len(idx) and (int(idx.max()) >= n or int(idx.min()) < -n):
            raise IndexError(f"index out of range for {n} images")
        idx = idx % max(n, 1)  # negative indices count from the end, as a tensor's do
        rows = idx if self._rows is None else self._rows[idx]
        return self._read(rows)

    def materialize(self) -> torch.Tensor:
        """All the images in memory (the in-memory path)."""
        return self[slice(None)]


class DiskImages(LazyImages):
    """Images spread over the shard files of a prepared folder, each read with one `preadv`."""

    def __init__(self, shards: list[_Shard], image_shape: tuple[int, int, int], rows: torch.Tensor | None = None):
        counts = torch.tensor([s.count for s in shards], dtype=torch.long)
        super().__init__(int(counts.sum()), image_shape, rows)
        self._shards = shards
        self._starts_np = (torch.cumsum(counts, 0) - counts).numpy()  # global index of each shard's first image
        self._offsets_np = np.array([s.offset for s in shards], dtype=np.int64)  # where each shard's pixels begin
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def _view(self, rows: torch.Tensor) -> DiskImages:
        return DiskImages(self._shards, self._image_shape, rows)  # type: ignore[arg-type]

    def _fd(self, shard: int) -> int:
        if os.getpid() != self._pid:  # a forked worker must not share the parent's file offsets: reopen
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self._shards[shard].path, os.O_RDONLY)
        return fd

    def _read(self, rows: torch.Tensor) -> torch.Tensor:
        """Images at global positions `rows` (any order, repeats allowed): one `preadv` straight into the batch's
        buffer per image, in file order (the kernel's read-ahead helps runs of neighbours)."""
        n = len(rows)
        out = np.empty((n, self._item), dtype=np.uint8)
        if n:
            r = rows.numpy()
            order = np.argsort(r, kind="stable")
            shard_of = np.searchsorted(self._starts_np, r[order], side="right") - 1
            offsets = self._offsets_np[shard_of] + (r[order] - self._starts_np[shard_of]) * self._item
            view = memoryview(out.reshape(-1))  # flat bytes: row k is view[k * item : (k + 1) * item]
            item = self._item
            for k, sh, off in zip(order.tolist(), shard_of.tolist(), offsets.tolist(), strict=True):
                if os.preadv(self._fd(sh), [view[k * item : (k + 1) * item]], off) != item:
                    raise UserError(f"{self._shards[sh].path}: truncated shard (prepare the folder again)")
        return torch.from_numpy(out.reshape(n, *self._image_shape))

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            with contextlib.suppress(OSError):
                os.close(fd)


class ChannelStats:
    """Per-channel mean and std on the 0..1 scale, accumulated over uint8 (n, C, H, W) chunks (float64 sums: the
    values `ImageDataset.channel_stats` computes in memory, to rounding)."""

    def __init__(self) -> None:
        self.s: torch.Tensor | None = None
        self.s2: torch.Tensor | None = None
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        xc = x.to(torch.float64).div_(255.0)
        a, b = xc.sum(dim=(0, 2, 3)), xc.pow(2).sum(dim=(0, 2, 3))
        self.s, self.s2 = (a, b) if self.s is None else (self.s + a, self.s2 + b)  # type: ignore[operator]
        self.n += x.shape[0] * x.shape[2] * x.shape[3]

    def result(self) -> tuple[list[float], list[float]]:
        if self.s is None or self.s2 is None or self.n == 0:
            raise UserError("the training split is empty")
        mean = self.s / self.n
        var = (self.s2 / self.n - mean.pow(2)).clamp_min(0)
        return mean.tolist(), [max(v**0.5, 1e-6) for v in var.tolist()]


def channel_stats_streaming(chunks: Any) -> tuple[list[float], list[float]]:
    """`ChannelStats` over an iterable of chunks."""
    acc = ChannelStats()
    for x in chunks:
        acc.add(x)
    return acc.result()


@dataclass
class ShardIndex:
    root: Path
    labels: list[str]
    input_shape: tuple[int, int, int]
    splits: dict[str, dict[str, Any]]
    mean: list[float]
    std: list[float]
    meta: dict[str, Any]

    @classmethod
    def read(cls, root: Path) -> ShardIndex:
        meta = read_prepared_index(root, FORMAT)
        return cls(
            root,
            list(meta["labels"]),
            tuple(meta["input_shape"]),  # type: ignore[arg-type]
            meta["splits"],
            list(meta["channel_mean"]),
            list(meta["channel_std"]),
            meta,
        )

    def images(self, split: str) -> DiskImages:
        entry = self.splits[split]
        shards = [_open_npy(self.root / s["file"], self.input_shape) for s in entry["shards"]]
        for s, meta in zip(shards, entry["shards"], strict=True):
            if s.count != meta["count"]:
                raise UserError(f"{s.path}: holds {s.count} images, index.json says {meta['count']}")
        return DiskImages(shards, self.input_shape)

    def labels_of(self, split: str) -> torch.Tensor:
        path = self.root / self.splits[split]["labels"]
        try:
            y = np.load(path, allow_pickle=False)
        except (FileNotFoundError, ValueError) as e:
            raise UserError(f"{path}: cannot read the labels ({e})") from None
        return torch.from_numpy(y.astype(np.int64))


def load_shards(cfg: Any, seed: int) -> Any:
    """`data.source: shards`: the prepared splits, in memory when they fit `data.in_memory_limit_mb`, else on disk."""
    from bigmodel.data.sources import ImageDataset, ImageSplit

    if cfg.path is None or not Path(cfg.path).is_dir():
        raise UserError(f"data.path {cfg.path}: not a folder (data.source 'shards' reads bigmodel data prepare's)")
    index = ShardIndex.read(Path(cfg.path))
    if "train" not in index.splits:
        raise UserError(f"{index.root / 'index.json'}: no train split")
    images = {name: index.images(name) for name in SPLITS if name in index.splits}
    total = sum(x.nbytes for x in images.values())
    in_memory = total <= cfg.in_memory_limit_mb * 2**20
    splits = {
        name: ImageSplit(x.materialize() if in_memory else x, index.labels_of(name)) for name, x in images.items()
    }
    for name, sp in splits.items():
        if len(sp.y) != len(sp.x):
            raise UserError(f"{index.root}: split {name!r} has {len(sp.x)} images and {len(sp.y)} labels")
    n_train = len(splits["train"])
    train, val, test = finish_prepared(splits, index.labels, cfg, seed, index.meta, index.root)
    data = ImageDataset(train, val, test, index.labels)
    data.on_disk = not in_memory
    if len(train) == n_train:  # the prepared training split as it is: its statistics were computed while writing
        data.stats = (index.mean, index.std)
    return data


# --------------------------------------------------------------------------------------------------------- writing
def _write_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)


@contextlib.contextmanager
def prepared_folder(out: Path) -> Any:
    """The temporary folder a prepare writes into, renamed to `out` when the block completes and removed when it
    fails or is interrupted (nothing half-written); a non-empty `out` is refused."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out}: the folder exists and is not empty (choose a new one)")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


PREPARED = {  # what each format of `bigmodel data prepare` holds (for the error when a folder of another is given)
    "bigmodel-shards": "images",
    "bigmodel-tokens": "a language model's token stream",
    "bigmodel-textids": "labelled texts as token ids",
    "bigmodel-pairids": "sentence pairs as token ids",
    "bigmodel-audio": "decoded audio clips",
    "bigmodel-speech": "decoded audio clips with transcripts",
}


def check_prepare(recipe: Any, out: Path) -> None:
    """What every task's `data prepare` checks before it reads (and decodes, tokenises) the source: the recipe reads a
    source, not a prepared folder, and `--out` is new or empty. (`prepared_folder` checks `--out` again when it
    starts writing.)"""
    if getattr(recipe.data, "source", None) == "shards":
        raise UserError("data.source 'shards': this recipe reads a prepared folder already")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out}: the folder exists and is not empty (choose a new one)")


def read_prepared_index(root: Path, expected: str, dtypes: Any = None) -> dict[str, Any]:
    """`root/index.json` of a prepared folder of format `expected` (one-line errors for a missing folder or index, bad
    JSON, a folder prepared for another task, no train split, or a `dtype` not among `dtypes` when given)."""
    path = root / "index.json"
    if not root.is_dir():
        raise UserError(f"data.path {root}: not a folder (data.source 'shards' reads bigmodel data prepare's)")
    if not path.is_file():
        raise UserError(f"data.path {root}: no index.json (make it: bigmodel data prepare RECIPE --out {root})")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    fmt = str(meta.get("format", ""))
    if fmt != expected:
        holds = PREPARED.get(fmt.split("/")[0])
        want = PREPARED.get(expected.split("/")[0], expected)
        if holds is not None and holds != want:
            raise UserError(f"{path}: holds {holds}, not {want} (prepare the folder from a recipe of this task)")
        raise UserError(f"{path}: format {meta.get('format')!r}, expected {expected!r}")
    if "train" not in meta.get("splits", {}):
        raise UserError(f"{path}: no train split")
    if dtypes is not None and meta.get("dtype") not in dtypes:
        raise UserError(f"{path}: dtype {meta.get('dtype')!r}, expected one of {', '.join(dtypes)}")
    return meta


def applied_carving(cfg: Any) -> dict[str, Any]:
    """What `finish_splits` did to the training split at prepare time, beyond carving val / test (recorded in the
    index, so training on the folder does not do it a second time)."""
    imb = getattr(cfg, "imbalance", None)
    return {"imbalance": imb.model_dump(mode="json") if imb is not None else None}


def finish_prepared(splits: dict[str, Any], labels: list[str], cfg: Any, seed: int, meta: dict[str, Any], root: Path):
    """`finish_splits` on a prepared folder's splits. An `imbalance` applied at prepare time is not applied again
    (keeping 10% of 10% of a class); a recipe asking for another one than the folder's gets a one-line error."""
    from bigmodel.data.sources import finish_splits

    done = (meta.get("applied") or {}).get("imbalance")
    if done is not None:
        asked = applied_carving(cfg)["imbalance"]
        if asked is not None and asked != done:
            raise UserError(
                f"data.imbalance {asked}: {root} was prepared with {done} applied (prepare it again with this setting, "
                "or drop it from the recipe)"
            )
        cfg = cfg.model_copy(update={"imbalance": None})
    return finish_splits(splits["train"], splits.get("val"), splits.get("test"), labels, cfg, seed)


def write_shards(data: Any, out: Path, shard_size: int = 10_000, cfg: Any = None) -> dict[str, Any]:
    """Write an `ImageDataset`'s splits as shards under `out` (into a temporary folder, renamed when complete: an
    interrupted prepare leaves nothing half-written); `cfg`: the recipe's `data` the splits were made with. Returns
    the index."""
    # Images not in memory (files decoded while writing): their statistics are summed while writing, not read twice.
    stats = ChannelStats() if data.stats is None and not isinstance(data.train.x, torch.Tensor) else None
    with prepared_folder(out) as tmp:
        splits: dict[str, Any] = {}
        for name in SPLITS:
            split = getattr(data, name, None)
            if split is None or len(split) == 0:
                continue
            shards = []
            for k, a in enumerate(range(0, len(split), shard_size)):
                x = split.x[a : a + shard_size]  # image files are decoded here, a shard at a time
                if stats is not None and name == "train":
                    stats.add(x)
                fname = f"{name}-{k:05d}.npy"
                _write_npy(tmp / fname, x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x))
                shards.append({"file": fname, "count": int(x.shape[0])})
            _write_npy(tmp / f"{name}-labels.npy", split.y.numpy().astype(np.int64))
            splits[name] = {"count": len(split), "shards": shards, "labels": f"{name}-labels.npy"}
        # The statistics training would compute from the same split (in memory: exactly those, so a run on the shards
        # normalises bit for bit as the run on the source does).
        mean, std = stats.result() if stats is not None else data.channel_stats()
        index = {
            "format": FORMAT,
            "labels": list(data.labels),
            "input_shape": list(data.input_shape),
            "channel_mean": mean,
            "channel_std": std,
            "applied": applied_carving(cfg),
            "splits": splits,
        }
        (tmp / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    return index
