"""Image data sources: the standard sets (MNIST family, CIFAR; see `standard.py`), scikit-learn digits, image
folders and CSV files of image paths.

Every source returns an `ImageDataset`: uint8 tensors (N, C, H, W) per split, int64 labels and label names. Splits
a source lacks are carved from train, seeded and stratified, so the same recipe and seed always see the same data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bigmodel.config import ImageDataConfig, SequenceDataConfig
from bigmodel.data import standard
from bigmodel.data.images import IMAGE_SUFFIXES, is_grey, read_image
from bigmodel.data.shards import LazyImages
from bigmodel.data.split import mix_seed, stratified_split
from bigmodel.errors import UserError

ImageSourceConfig = ImageDataConfig | SequenceDataConfig  # images are read for both tasks (sequences: row by row)


@dataclass
class ImageSplit:
    x: torch.Tensor  # (N, C, H, W) uint8
    y: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx: torch.Tensor) -> ImageSplit:
        if hasattr(self.x, "subset"):  # images read when indexed (on disk, or image files): a view, nothing read
            return ImageSplit(self.x.subset(idx), self.y[idx])  # type: ignore[union-attr]
        return ImageSplit(self.x[idx], self.y[idx])


class Splits:
    """`split(name)` for every data set (images, sequences, text): the split, or a clear error when it is absent."""

    pii_masked: dict[str, int] | None = None
    """Text data with `data.mask_pii`: how many values of each type were masked (all splits)."""

    def split(self, name: str) -> Any:
        s = getattr(self, name)
        if s is None or len(s) == 0:
            raise UserError(f"this data has no {name!r} split (data.val_fraction = 0 leaves no validation split)")
        return s


@dataclass
class ImageDataset(Splits):
    train: ImageSplit
    val: ImageSplit | None
    test: ImageSplit | None
    labels: list[str]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])  # type: ignore[return-value]

    stats: tuple[list[float], list[float]] | None = field(default=None, repr=False)
    """Known per-channel mean and std of the training split (prepared shards store them)."""
    on_disk: bool = False
    """The images stay on disk (shards or image files larger than `data.in_memory_limit_mb`), read per batch."""

    def channel_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the training split, on the 0..1 scale (float64 accumulation)."""
        if self.stats is not None:
            return self.stats
        x = self.train.x
        if not isinstance(x, torch.Tensor):  # on disk (or generated): read it once, a chunk at a time
            from bigmodel.data.shards import channel_stats_streaming

            return channel_stats_streaming(x[a : a + 8192] for a in range(0, len(x), 8192))
        n = x.shape[0] * x.shape[2] * x.shape[3]
        mean, std = [], []
        for c in range(x.shape[1]):
            xc = x[:, c].to(torch.float64).div_(255.0)
            m = xc.sum().item() / n
            mean.append(m)
            std.append(max(((xc - m).pow_(2).sum().item() / n) ** 0.5, 1e-6))
        return mean, std


# ------------------------------------------------------------------------------------------------ standard sets
IDX_SOURCES = ("fashion_mnist", "mnist", "kmnist")
CIFAR_SOURCES = ("cifar10", "cifar100")


def load_standard(cfg: ImageSourceConfig, mirrors: list[str] | None = None) -> tuple[ImageSplit, ImageSplit, list[str]]:
    """MNIST-family (IDX) and CIFAR (binary) sets: (train, test, label names)."""
    if cfg.source in IDX_SOURCES:
        folder = standard.find_idx_set(cfg.source, cfg.path, cfg.cache_dir, cfg.download, mirrors)
        (xtr, ytr), (xte, yte) = standard.load_idx_set(folder)
        labels = list(standard.IDX_SETS[cfg.source].labels)
    else:
        folder = standard.find_cifar(cfg.source, cfg.path, cfg.cache_dir, cfg.download, mirrors)
        (xtr, ytr), (xte, yte), labels = standard.load_cifar(cfg.source, folder, cfg.label_set)
    return ImageSplit(xtr, ytr), ImageSplit(xte, yte), labels


# ---------------------------------------------------------------------------------------------------------- digits
def load_digits_data() -> tuple[ImageSplit, list[str]]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: 1,797 8x8 images, values 0..16

    d = load_digits()
    x = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # (N, 1, 8, 8)
    return ImageSplit(torch.from_numpy(x), torch.from_numpy(d.target.astype(np.int64))), [str(i) for i in range(10)]


# ---------------------------------------------------------------------------------------------------- image folder
def _list_split(root: Path, split: str) -> dict[str, list[Path]]:
    folder = root / split
    classes = {}
    for d in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        classes[d.name] = files
    return classes


def load_image_folder(cfg: ImageSourceConfig) -> tuple[ImageSplit, ImageSplit | None, ImageSplit | None, list[str]]:
    root = cfg.path
    assert root is not None
    if not root.is_dir():
        raise UserError(f"data.path {root}: folder not found (expected ROOT/<split>/<class>/*.png)")
    if not (root / "train").is_dir():
        raise UserError(f"data.path {root}: no train/ folder (expected ROOT/train/<class>/*.png, optional val/, test/)")
    train_files = _list_split(root, "train")
    if not train_files:
        raise UserError(f"{root / 'train'}: no class folders (expected train/<class>/*.png)")
    for name, files in train_files.items():
        if not files:
            raise UserError(f"{root / 'train' / name}: class folder has no images ({', '.join(IMAGE_SUFFIXES)})")
    labels = list(train_files)
    splits = {"train": [(f, labels.index(c)) for c, fs in train_files.items() for f in fs]}
    for split in ("val", "test"):
        if (root / split).is_dir():
            files = _list_split(root, split)
            unknown = sorted(set(files) - set(labels))
            if unknown:
                raise UserError(f"{root / split}: class folders {unknown} do not exist in train/ (classes: {labels})")
            splits[split] = [(f, labels.index(c)) for c, fs in files.items() for f in fs]
    return _read_splits(splits, cfg, labels)


def _read_splits(
    splits: dict[str, list[tuple[Path, int]]], cfg: ImageSourceConfig, labels: list[str]
) -> tuple[ImageSplit, ImageSplit | None, ImageSplit | None, list[str]]:
    """Decode every listed file at one channel count and size (from the recipe, else from the training images)."""
    train_paths = [p for p, _ in splits["train"]]
    channels = cfg.channels or (1 if all(is_grey(f) for f in train_paths) else 3)
    size = tuple(cfg.image_size) if cfg.image_size else tuple(read_image(train_paths[0], channels).shape[1:])

    def read(items: list[tuple[Path, int]] | None) -> ImageSplit | None:
        if items is None:
            return None
        if not items:
            return ImageSplit(torch.zeros((0, channels, *size), dtype=torch.uint8), torch.zeros(0, dtype=torch.int64))
        x = FileImages([p for p, _ in items], (channels, *size))  # type: ignore[arg-type]
        return ImageSplit(x, torch.tensor([y for _, y in items], dtype=torch.int64))  # type: ignore[arg-type]

    return read(splits["train"]), read(splits.get("val")), read(splits.get("test")), labels  # type: ignore[return-value]


class FileImages(LazyImages):
    """Images decoded from their files when indexed (at one channel count and size), a batch at a time by a pool of
    threads (Pillow releases the GIL while it decodes) — in the main process, or in `train.num_workers` workers."""

    def __init__(self, paths: list[Path], image_shape: tuple[int, int, int], rows: torch.Tensor | None = None):
        super().__init__(len(paths), image_shape, rows)
        self._paths = paths

    def _view(self, rows: torch.Tensor) -> FileImages:
        return FileImages(self._paths, self._image_shape, rows)  # type: ignore[arg-type]

    def _read(self, rows: torch.Tensor) -> torch.Tensor:
        C, H, W = self._image_shape
        out = np.empty((len(rows), C, H, W), dtype=np.uint8)

        def one(k_path: tuple[int, Path]) -> None:
            out[k_path[0]] = read_image(k_path[1], C, (H, W))

        items = [(k, self._paths[r]) for k, r in enumerate(rows.tolist())]
        if len(items) < 8:
            for it in items:
                one(it)
        else:
            for _ in _decoder_pool().map(one, items):
                pass
        return torch.from_numpy(out)


_POOL: Any = None
_POOL_PID = 0


def _decoder_pool() -> Any:
    """One thread pool per process (a forked worker makes its own)."""
    global _POOL, _POOL_PID
    import os
    from concurrent.futures import ThreadPoolExecutor

    if _POOL is None or os.getpid() != _POOL_PID:
        _POOL, _POOL_PID = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)), os.getpid()
    return _POOL


def decode_in_memory(data: ImageDataset, limit_mb: float | None) -> ImageDataset:
    """Image files decoded into memory when all splits together fit `limit_mb` (always for `None`); else they stay
    files, decoded a batch at a time (`data.on_disk`)."""
    lazy = [s for s in (data.train, data.val, data.test) if s is not None and isinstance(s.x, FileImages)]
    if not lazy:
        return data
    if limit_mb is not None and sum(s.x.nbytes for s in lazy) > limit_mb * 2**20:
        data.on_disk = True
        return data
    for s in lazy:
        s.x = s.x.materialize()  # type: ignore[union-attr]
    return data


# ------------------------------------------------------------------------------------------------------ image CSV
def load_image_csv(cfg: ImageSourceConfig) -> tuple[ImageSplit, ImageSplit | None, ImageSplit | None, list[str]]:
    """A CSV with a header: image path (relative to the CSV's folder or absolute), label, optional split."""
    import csv

    path = cfg.path
    assert path is not None
    if not path.is_file():
        raise UserError(f"data.path {path}: CSV file not found")
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
            header = rows[0].keys() if rows else []
    except (UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{path}: not a readable CSV file ({e})") from None
    for col in (cfg.path_column, cfg.label_column):
        if col not in header:
            raise UserError(
                f"{path}: no column {col!r} (columns: {', '.join(header) or 'none'}); "
                "set data.path_column / data.label_column"
            )
    has_split = cfg.split_column in header
    labels = sorted({r[cfg.label_column] for r in rows if not has_split or r[cfg.split_column] == "train"})
    if not labels:
        raise UserError(f"{path}: no training rows")
    splits: dict[str, list[tuple[Path, int]]] = {"train": []}
    for i, r in enumerate(rows, start=2):
        split = r[cfg.split_column].strip() if has_split else "train"
        if split not in ("train", "val", "test"):
            raise UserError(f"{path}: line {i}: split {split!r}, expected train, val or test")
        if r[cfg.label_column] not in labels:
            raise UserError(f"{path}: line {i}: label {r[cfg.label_column]!r} does not occur in the train rows")
        image = Path(r[cfg.path_column])
        splits.setdefault(split, []).append(
            (image if image.is_absolute() else path.parent / image, labels.index(r[cfg.label_column]))
        )
    if not splits["train"]:
        raise UserError(f"{path}: no training rows")
    return _read_splits(splits, cfg, labels)


# ------------------------------------------------------------------------------------------------------ imbalance
def make_imbalanced(split: Any, labels: list[str], classes: list[int | str], keep: float, seed: int) -> Any:
    """Keep a seeded `keep` fraction (at least one) of each class in `classes`; every other class stays whole."""
    chosen = []
    for c in classes:
        if isinstance(c, str) and c in labels:
            chosen.append(labels.index(c))
        elif isinstance(c, int) and 0 <= c < len(labels):
            chosen.append(c)
        else:
            raise UserError(
                f"data.imbalance.classes: {c!r} is not a class index 0..{len(labels) - 1} or a label ({labels})"
            )
    g = torch.Generator().manual_seed(seed)
    keep_idx = []
    for c in range(len(labels)):
        idx = torch.nonzero(split.y == c).flatten()
        if c in chosen:
            idx = idx[torch.randperm(len(idx), generator=g)[: max(1, round(keep * len(idx)))]]
        keep_idx.append(idx)
    return split.subset(torch.sort(torch.cat(keep_idx)).values)


# ---------------------------------------------------------------------------------------------------------- entry
def load_data(cfg: ImageSourceConfig, seed: int, decode: bool = True) -> ImageDataset:
    """Load the recipe's image data with train/val/test splits; carved splits depend only on `seed`. Image files
    (`image_folder`, `image_csv`) are decoded into memory when they fit `data.in_memory_limit_mb`, else a batch at a
    time; with `decode=False` they are left as files (`bigmodel data prepare` decodes them a shard at a time)."""
    val = test = None
    if cfg.source in IDX_SOURCES or cfg.source in CIFAR_SOURCES:
        train, test, labels = load_standard(cfg)
    elif cfg.source == "digits":
        train, labels = load_digits_data()
    elif cfg.source == "image_folder":
        train, val, test, labels = load_image_folder(cfg)
    elif cfg.source == "image_csv":
        train, val, test, labels = load_image_csv(cfg)
    elif cfg.source == "shards":
        from bigmodel.data.shards import load_shards

        return load_shards(cfg, seed)
    else:
        raise UserError(f"data.source {cfg.source!r} is not an image source")
    train, val, test = finish_splits(train, val, test, labels, cfg, seed)
    data = ImageDataset(train, val, test, labels)
    return decode_in_memory(data, getattr(cfg, "in_memory_limit_mb", None)) if decode else data


def finish_splits(train: Any, val: Any, test: Any, labels: list[str], cfg: Any, seed: int) -> tuple[Any, ...]:
    """Carve the missing test and validation splits (seeded, stratified), then apply `imbalance` and
    `limit_train`. Works for any split type with `.y` and `.subset(idx)`."""
    if test is None:
        keep, held = stratified_split(train.y, cfg.test_fraction, mix_seed(seed, 1))
        train, test = train.subset(keep), train.subset(held)
    if val is None and cfg.val_fraction > 0:
        keep, held = stratified_split(train.y, cfg.val_fraction, mix_seed(seed, 2))
        train, val = train.subset(keep), train.subset(held)
    if cfg.imbalance is not None:
        train = make_imbalanced(train, labels, cfg.imbalance.classes, cfg.imbalance.keep, mix_seed(seed, 4))
    if cfg.limit_train is not None and cfg.limit_train < len(train):
        g = torch.Generator().manual_seed(mix_seed(seed, 3))
        train = train.subset(torch.sort(torch.randperm(len(train), generator=g)[: cfg.limit_train]).values)
    if len(train) == 0:
        raise UserError("the training split is empty")
    return train, val, test
