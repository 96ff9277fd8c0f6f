"""Standard image data sets in their published on-disk formats, with download, checksum and cache.

- MNIST, Fashion-MNIST, KMNIST: the four IDX files (gzipped or not).
- CIFAR-10 / CIFAR-100: the *binary* distribution — fixed-size records, read with numpy, no unpickling.
  CIFAR-10 record: 1 label byte + 3,072 pixel bytes (1,024 red, 1,024 green, 1,024 blue, row-major 32x32).
  CIFAR-100 record: 1 coarse-label byte + 1 fine-label byte + 3,072 pixel bytes.

Lookup order: `data.path` (a folder, or for CIFAR the .tar.gz), a Debian copy where one exists (Fashion-MNIST),
the cache (`$BIGMODEL_HOME/cache/<name>`), then a download checked against the official MD5. Offline without a copy
gives one line saying how to get the data.
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bigmodel.data.download import default_cache_dir, download
from bigmodel.data.idx import read_idx
from bigmodel.errors import UserError


@dataclass(frozen=True)
class IdxSpec:
    name: str
    labels: list[str]
    files: dict[str, str]  # file name -> official MD5
    mirrors: list[str]
    local_dirs: list[Path] = field(default_factory=list)  # OS packages that ship the files
    install_hint: str = ""


_IDX_NAMES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)

IDX_SETS: dict[str, IdxSpec] = {
    "fashion_mnist": IdxSpec(
        "Fashion-MNIST",
        ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
        dict(zip(_IDX_NAMES, ["8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
                              "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310"], strict=True)),
        ["https://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
         "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"],
        [Path("/usr/share/datasets/fashion-mnist")],  # Debian package `dataset-fashion-mnist`
        "install the Debian package (apt-get install dataset-fashion-mnist), or ",
    ),
    "mnist": IdxSpec(
        "MNIST",
        [str(i) for i in range(10)],
        dict(zip(_IDX_NAMES, ["f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
                              "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c"], strict=True)),
        ["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"],
    ),
    "kmnist": IdxSpec(
        "KMNIST",
        ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"],
        dict(zip(_IDX_NAMES, ["bdb82020997e1d708af4cf47b453dcf7", "e144d726b3acfaa3e44228e80efcd344",
                              "5c965bf0a639b31b8f53240b1b52f4d7", "7320c461ea6c1c855c0b718fb2a4b134"], strict=True)),
        ["http://codh.rois.ac.jp/kmnist/dataset/kmnist/"],
    ),
}  # fmt: skip


def _offline() -> bool:
    return os.environ.get("BIGMODEL_OFFLINE") == "1"


def has_idx_files(folder: Path) -> bool:
    return all((folder / n).is_file() or (folder / n.removesuffix(".gz")).is_file() for n in _IDX_NAMES)


def find_idx_set(
    key: str, path: Path | None, cache_dir: Path | None, allow_download: bool, mirrors: list[str] | None = None
) -> Path:
    """The folder holding the four IDX files of `key`: `path`, an OS package copy, the cache, or a download."""
    spec = IDX_SETS[key]
    if path is not None:
        if not has_idx_files(path):
            raise UserError(f"data.path {path}: expected the four {spec.name} IDX files ({', '.join(_IDX_NAMES)})")
        return path
    for d in spec.local_dirs:
        if has_idx_files(d):
            return d
    cache = (cache_dir or default_cache_dir()) / key
    if has_idx_files(cache):
        return cache
    hint = f"{spec.install_hint}put the four IDX files in a folder and set data.path"
    if not allow_download or _offline():
        raise UserError(f"{spec.name} not found and data.download is off: {hint}")
    for name, md5 in spec.files.items():
        try:
            download([m + name for m in (mirrors or spec.mirrors)], cache / name, md5=md5)
        except UserError as e:
            raise UserError(f"{spec.name}: {e}; offline? {hint}") from None
    return cache


def _idx(folder: Path, name: str) -> np.ndarray:
    p = folder / name
    return read_idx(p if p.is_file() else folder / name.removesuffix(".gz"))


def load_idx_set(folder: Path, num_classes: int = 10) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """(train, test) as ((N, 1, 28, 28) uint8, (N,) int64) from the four IDX files in `folder`."""
    out = []
    for prefix in ("train", "t10k"):
        images = _idx(folder, f"{prefix}-images-idx3-ubyte.gz")
        labels = _idx(folder, f"{prefix}-labels-idx1-ubyte.gz")
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels) or images.dtype != np.uint8:
            raise UserError(f"{folder}: {prefix} images {images.shape} and labels {labels.shape} do not match")
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise UserError(
                f"{folder}: {prefix} labels must be 0..{num_classes - 1}, found {labels.min()}..{labels.max()}"
            )
        out.append((torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))))
    return tuple(out)


# ---------------------------------------------------------------------------------------------------------- CIFAR
@dataclass(frozen=True)
class CifarSpec:
    name: str
    archive: str
    md5: str
    folder: str  # the folder inside the archive
    train_files: list[str]
    test_files: list[str]
    label_bytes: int  # 1 (CIFAR-10) or 2 (CIFAR-100: coarse, fine)
    label_files: dict[str, str]  # label kind -> names file
    mirrors: list[str]


CIFAR_SETS: dict[str, CifarSpec] = {
    "cifar10": CifarSpec(
        "CIFAR-10", "cifar-10-binary.tar.gz", "c32a1d4ab5d03f1284b67883e8d87530", "cifar-10-batches-bin",
        [f"data_batch_{i}.bin" for i in range(1, 6)], ["test_batch.bin"], 1, {"fine": "batches.meta.txt"},
        ["https://www.cs.toronto.edu/~kriz/"],
    ),
    "cifar100": CifarSpec(
        "CIFAR-100", "cifar-100-binary.tar.gz", "03b5dce01913d631647c71ecec9e9cb8", "cifar-100-binary",
        ["train.bin"], ["test.bin"], 2, {"coarse": "coarse_label_names.txt", "fine": "fine_label_names.txt"},
        ["https://www.cs.toronto.edu/~kriz/"],
    ),
}  # fmt: skip

CIFAR10_LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
RECORD_PIXELS = 3 * 32 * 32


def _extract_cifar(archive: Path, dest: Path, spec: CifarSpec) -> Path:
    """Extract only the expected regular files of the archive (no links, no paths outside `dest`)."""
    wanted = {f"{spec.folder}/{n}" for n in [*spec.train_files, *spec.test_files, *spec.label_files.values()]}
    out = dest / spec.folder
    tmp = dest / f".{spec.folder}.{os.getpid()}.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                if member.name in wanted and member.isfile():
                    src = tar.extractfile(member)
                    assert src is not None
                    (tmp / Path(member.name).name).write_bytes(src.read())
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UserError(f"{archive}: not a readable {spec.name} archive ({e})") from None
    missing = [n for n in [*spec.train_files, *spec.test_files] if not (tmp / n).is_file()]
    if missing:
        raise UserError(f"{archive}: the archive lacks {', '.join(missing)} (expected the {spec.name} binary version)")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.rename(tmp, out)
    return out


def find_cifar(
    key: str, path: Path | None, cache_dir: Path | None, allow_download: bool, mirrors: list[str] | None = None
) -> Path:
    """The folder with the CIFAR binary files: `path` (folder or .tar.gz), the cache, or a download."""
    spec = CIFAR_SETS[key]

    def complete(folder: Path) -> bool:
        return all((folder / n).is_file() for n in [*spec.train_files, *spec.test_files])

    cache = (cache_dir or default_cache_dir()) / key
    if path is not None:
        if path.is_file():
            return _extract_cifar(path, cache, spec)
        for folder in (path, path / spec.folder):
            if complete(folder):
                return folder
        raise UserError(
            f"data.path {path}: expected the {spec.name} binary files "
            f"({', '.join(spec.train_files + spec.test_files)}) or the {spec.archive} archive"
        )
    if complete(cache / spec.folder):
        return cache / spec.folder
    hint = f"download {spec.archive} (binary version) elsewhere and set data.path to it"
    if not allow_download or _offline():
        raise UserError(f"{spec.name} not found and data.download is off: {hint}")
    try:
        archive = download([m + spec.archive for m in (mirrors or spec.mirrors)], cache / spec.archive, md5=spec.md5)
    except UserError as e:
        raise UserError(f"{spec.name}: {e}; offline? {hint}") from None
    folder = _extract_cifar(archive, cache, spec)
    archive.unlink()
    return folder


def read_cifar_binary(files: list[Path], label_bytes: int, label_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed-size records → ((N, 3, 32, 32) uint8, (N,) int64). `label_index` picks coarse (0) or fine (1)."""
    record = label_bytes + RECORD_PIXELS
    xs, ys = [], []
    for f in files:
        raw = np.fromfile(f, dtype=np.uint8)
        if raw.size == 0 or raw.size % record:
            raise UserError(f"{f}: {raw.size} bytes is not a whole number of {record}-byte CIFAR records")
        rec = raw.reshape(-1, record)
        ys.append(rec[:, label_index].astype(np.int64))
        xs.append(rec[:, label_bytes:].reshape(-1, 3, 32, 32))
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def load_cifar(
    key: str, folder: Path, label_kind: str = "fine"
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor], list[str]]:
    spec = CIFAR_SETS[key]
    label_index = 0 if spec.label_bytes == 1 or label_kind == "coarse" else 1
    train = read_cifar_binary([folder / n for n in spec.train_files], spec.label_bytes, label_index)
    test = read_cifar_binary([folder / n for n in spec.test_files], spec.label_bytes, label_index)
    names_file = folder / spec.label_files.get(label_kind if key == "cifar100" else "fine", "")
    if names_file.is_file():
        labels = [line.strip() for line in names_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif key == "cifar10":
        labels = list(CIFAR10_LABELS)
    else:
        labels = [str(i) for i in range(int(max(train[1].max(), test[1].max())) + 1)]
    top = int(max(train[1].max(), test[1].max()))
    if top >= len(labels):
        raise UserError(f"{folder}: label {top} found but only {len(labels)} label names")
    return train, test, labels
