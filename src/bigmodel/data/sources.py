"""Image data sources: Fashion-MNIST (IDX), scikit-learn digits, and image folders.

Every source returns an `ImageDataset`: uint8 tensors (N, C, H, W) per split, int64 labels and label names. Splits
a source lacks are carved from train, seeded and stratified, so the same recipe and seed always see the same data.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bigmodel.config import DataConfig
from bigmodel.data.download import default_cache_dir, download
from bigmodel.data.idx import read_idx
from bigmodel.data.images import IMAGE_SUFFIXES, is_grey, read_image
from bigmodel.data.split import mix_seed, stratified_split
from bigmodel.errors import UserError


@dataclass
class ImageSplit:
    x: torch.Tensor  # (N, C, H, W) uint8
    y: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx: torch.Tensor) -> ImageSplit:
        return ImageSplit(self.x[idx], self.y[idx])


@dataclass
class ImageDataset:
    train: ImageSplit
    val: ImageSplit | None
    test: ImageSplit | None
    labels: list[str]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])  # type: ignore[return-value]

    def split(self, name: str) -> ImageSplit:
        s = getattr(self, name)
        if s is None or len(s) == 0:
            raise UserError(f"this data has no {name!r} split (data.val_fraction = 0 leaves no validation split)")
        return s

    def channel_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the training split, on the 0..1 scale (float64 accumulation)."""
        x = self.train.x
        n = x.shape[0] * x.shape[2] * x.shape[3]
        mean, std = [], []
        for c in range(x.shape[1]):
            xc = x[:, c].to(torch.float64).div_(255.0)
            m = xc.sum().item() / n
            mean.append(m)
            std.append(max(((xc - m).pow_(2).sum().item() / n) ** 0.5, 1e-6))
        return mean, std


# ---------------------------------------------------------------------------------------------------- Fashion-MNIST
FASHION_MNIST_LABELS = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"
]  # fmt: skip
FASHION_MNIST_FILES = {  # official MD5s of the published .gz files (zalandoresearch/fashion-mnist README)
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
FASHION_MNIST_MIRRORS = [
    "https://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
]
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # Debian package `dataset-fashion-mnist`


def _has_idx_files(folder: Path) -> bool:
    return all((folder / n).is_file() or (folder / n.removesuffix(".gz")).is_file() for n in FASHION_MNIST_FILES)


def find_fashion_mnist(
    path: Path | None, cache_dir: Path | None, allow_download: bool, mirrors: list[str] | None = None
) -> Path:
    """The folder holding the four Fashion-MNIST IDX files: `path`, the Debian copy, the cache, or a download."""
    if path is not None:
        if not _has_idx_files(path):
            raise UserError(
                f"data.path {path}: expected the four Fashion-MNIST IDX files ({', '.join(FASHION_MNIST_FILES)})"
            )
        return path
    if _has_idx_files(DEBIAN_FASHION_MNIST):
        return DEBIAN_FASHION_MNIST
    cache = (cache_dir or default_cache_dir()) / "fashion_mnist"
    if _has_idx_files(cache):
        return cache
    hint = (
        "install the Debian package (apt-get install dataset-fashion-mnist), or put the four IDX files in a folder "
        "and set data.path"
    )
    if not allow_download or os.environ.get("BIGMODEL_OFFLINE") == "1":
        raise UserError(f"Fashion-MNIST not found and data.download is off: {hint}")
    for name, md5 in FASHION_MNIST_FILES.items():
        try:
            download([m + name for m in (mirrors or FASHION_MNIST_MIRRORS)], cache / name, md5=md5)
        except UserError as e:
            raise UserError(f"Fashion-MNIST: {e}; offline? {hint}") from None
    return cache


def _idx(folder: Path, name: str) -> np.ndarray:
    p = folder / name
    return read_idx(p if p.is_file() else folder / name.removesuffix(".gz"))


def load_fashion_mnist(cfg: DataConfig, mirrors: list[str] | None = None) -> tuple[ImageSplit, ImageSplit, list[str]]:
    folder = find_fashion_mnist(cfg.path, cfg.cache_dir, cfg.download, mirrors)
    splits = []
    for prefix in ("train", "t10k"):
        images = _idx(folder, f"{prefix}-images-idx3-ubyte.gz")
        labels = _idx(folder, f"{prefix}-labels-idx1-ubyte.gz")
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels) or images.dtype != np.uint8:
            raise UserError(f"{folder}: {prefix} images {images.shape} and labels {labels.shape} do not match")
        if labels.size and (labels.min() < 0 or labels.max() >= 10):
            raise UserError(f"{folder}: {prefix} labels must be 0..9, found {labels.min()}..{labels.max()}")
        splits.append(ImageSplit(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))))
    return splits[0], splits[1], list(FASHION_MNIST_LABELS)


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


def load_image_folder(cfg: DataConfig) -> tuple[ImageSplit, ImageSplit | None, ImageSplit | None, list[str]]:
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
    all_train = [f for files in train_files.values() for f in files]
    channels = cfg.channels or (1 if all(is_grey(f) for f in all_train) else 3)
    size = tuple(cfg.image_size) if cfg.image_size else tuple(read_image(all_train[0], channels).shape[1:])

    def read(split: str) -> ImageSplit | None:
        if not (root / split).is_dir():
            return None
        files = _list_split(root, split) if split != "train" else train_files
        unknown = sorted(set(files) - set(labels))
        if unknown:
            raise UserError(f"{root / split}: class folders {unknown} do not exist in train/ (classes: {labels})")
        xs, ys = [], []
        for cls, paths in files.items():
            for p in paths:
                xs.append(read_image(p, channels, size))  # type: ignore[arg-type]
                ys.append(labels.index(cls))
        if not xs:
            return ImageSplit(torch.zeros((0, channels, *size), dtype=torch.uint8), torch.zeros(0, dtype=torch.int64))
        return ImageSplit(torch.from_numpy(np.stack(xs)), torch.tensor(ys, dtype=torch.int64))

    return read("train"), read("val"), read("test"), labels  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------------- entry
def load_data(cfg: DataConfig, seed: int) -> ImageDataset:
    """Load the recipe's data with train/val/test splits; carved splits depend only on `seed`."""
    val = test = None
    if cfg.source == "fashion_mnist":
        train, test, labels = load_fashion_mnist(cfg)
    elif cfg.source == "digits":
        train, labels = load_digits_data()
    elif cfg.source == "image_folder":
        train, val, test, labels = load_image_folder(cfg)
    else:  # pragma: no cover - the schema allows only the sources above
        raise UserError(f"data.source {cfg.source!r} is not supported")
    if test is None:
        keep, held = stratified_split(train.y, cfg.test_fraction, mix_seed(seed, 1))
        train, test = train.subset(keep), train.subset(held)
    if val is None and cfg.val_fraction > 0:
        keep, held = stratified_split(train.y, cfg.val_fraction, mix_seed(seed, 2))
        train, val = train.subset(keep), train.subset(held)
    if cfg.limit_train is not None and cfg.limit_train < len(train):
        g = torch.Generator().manual_seed(mix_seed(seed, 3))
        train = train.subset(torch.sort(torch.randperm(len(train), generator=g)[: cfg.limit_train]).values)
    if len(train) == 0:
        raise UserError("the training split is empty")
    return ImageDataset(train, val, test, labels)
