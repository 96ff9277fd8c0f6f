"""Sequence data: UEA/UCR `.ts` files, numeric CSV (wide or long form), `.npz` arrays, and images read row by row.

Every source gives a `SeqDataset`: per split a zero-padded float tensor (N, T, F), the true lengths (N,) and int64
labels. Text, once tokenised (`data/text.py`), uses the same container with int64 token ids (N, T). Splits a source
lacks are carved from train exactly as for images (seeded, stratified: `sources.finish_splits`).
"""

from __future__ import annotations

import csv
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bigmodel.config import IMAGE_SOURCES, SequenceDataConfig
from bigmodel.data.sources import Splits
from bigmodel.errors import UserError


@dataclass
class SeqSplit:
    x: torch.Tensor  # (N, T, F) float32, zero-padded — or (N, T) int64 token ids, padded with 0 (or `DiskRows`)
    lengths: torch.Tensor  # (N,) int64, each ≥ 1
    y: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx: torch.Tensor) -> SeqSplit:
        x = self.x.subset(idx) if hasattr(self.x, "subset") else self.x[idx]  # texts on disk: a view, nothing read
        return SeqSplit(x, self.lengths[idx], self.y[idx])


@dataclass
class SeqDataset(Splits):
    train: SeqSplit
    val: SeqSplit | None
    test: SeqSplit | None
    labels: list[str]

    @property
    def num_features(self) -> int:
        return int(self.train.x.shape[-1])

    def feature_stats(self) -> tuple[list[float], list[float]]:
        """Per-feature mean and std over the valid (unpadded) steps of the training split (float64)."""
        x, lengths = self.train.x, self.train.lengths
        valid = torch.arange(x.shape[1])[None, :] < lengths[:, None]  # (N, T)
        v = x[valid].to(torch.float64)  # (steps, F)
        mean = v.mean(dim=0)
        std = v.std(dim=0, unbiased=False).clamp(min=1e-6)
        return mean.tolist(), std.tolist()


def pad_sequences(seqs: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """List of (T_i, F) arrays → zero-padded float32 (N, T_max, F) and lengths (N,)."""
    if not seqs:
        return torch.zeros((0, 1, 1)), torch.zeros(0, dtype=torch.int64)
    T = max(len(s) for s in seqs)
    F = seqs[0].shape[1]
    out = np.zeros((len(seqs), T, F), dtype=np.float32)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return torch.from_numpy(out), torch.tensor([len(s) for s in seqs], dtype=torch.int64)


def standardize(split: SeqSplit, mean: list[float], std: list[float]) -> SeqSplit:
    """(x - mean) / std on valid steps; padding stays 0."""
    m = torch.tensor(mean, dtype=torch.float32)
    s = torch.tensor(std, dtype=torch.float32)
    valid = (torch.arange(split.x.shape[1])[None, :] < split.lengths[:, None]).unsqueeze(-1)
    return SeqSplit(torch.where(valid, (split.x - m) / s, 0.0), split.lengths, split.y)


# ----------------------------------------------------------------------------------------------------- .ts files
@dataclass
class TsFile:
    series: list[np.ndarray]  # (T_i, F)
    labels: list[str]
    class_labels: list[str] | None  # from @classLabel, in the file's order


def read_ts(path: Path, with_labels: bool = True) -> TsFile:
    """Read a UEA/UCR `.ts` file: `@` header lines, then `@data` and one series per line, dimensions separated by
    `:`, values by `,`, the class label last (when `@classLabel true`). Multivariate, variable length.
    `with_labels=False` reads files with or without labels (for prediction; labels are then ignored)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"{path}: .ts file not found") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file") from None
    class_labels: list[str] | None = None
    has_labels = False
    dims: int | None = None
    series: list[np.ndarray] = []
    labels: list[str] = []
    in_data = False
    for lineno, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not in_data:
            low = line.lower()
            if low.startswith("@classlabel"):
                parts = line.split()
                has_labels = len(parts) > 1 and parts[1].lower() == "true"
                class_labels = parts[2:] if has_labels else None
            elif low.startswith("@dimensions"):
                dims = int(line.split()[1])
            elif low.startswith("@data"):
                in_data = True
            continue
        parts = line.split(":")
        label = None
        if has_labels:
            if len(parts) < 2:
                raise UserError(f"{path}: line {lineno}: expected dimensions and a class label separated by ':'")
            label = parts[-1].strip()
            parts = parts[:-1]
        if dims is not None and len(parts) != dims:
            raise UserError(f"{path}: line {lineno}: {len(parts)} dimensions, the header says @dimensions {dims}")
        try:
            cols = [[float(v) if v.strip() != "?" else math.nan for v in p.split(",")] for p in parts]
        except ValueError:
            raise UserError(f"{path}: line {lineno}: a value is not a number") from None
        if len({len(c) for c in cols}) != 1:
            raise UserError(f"{path}: line {lineno}: the dimensions have different lengths ({[len(c) for c in cols]})")
        arr = np.asarray(cols, dtype=np.float64).T  # (T, F)
        if not np.isfinite(arr).all():
            raise UserError(f"{path}: line {lineno}: missing or non-finite values ('?') are not supported")
        series.append(arr.astype(np.float32))
        labels.append(label if label is not None and with_labels else "")
    if not in_data:
        raise UserError(f"{path}: no @data line (not a .ts file?)")
    if not series:
        raise UserError(f"{path}: no series after @data")
    if len({s.shape[1] for s in series}) != 1:
        raise UserError(f"{path}: series have different numbers of dimensions")
    return TsFile(series, labels, class_labels)


def aeon_ts_folder(name: str) -> Path:
    """The folder of a UEA/UCR set bundled in the `aeon` wheel (installed with --no-deps; never imported)."""
    spec = importlib.util.find_spec("aeon")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"data.name {name!r}: the bundled UEA/UCR sets come with the `aeon` package; install it with "
            "`pip install --no-deps aeon` (or give data.path)"
        )
    root = Path(spec.submodule_search_locations[0]) / "datasets" / "data"
    folder = root / name
    if not (folder / f"{name}_TRAIN.ts").is_file():
        have = sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*_TRAIN.ts")))
        raise UserError(f"data.name {name!r}: not among the .ts sets bundled in aeon ({', '.join(have)})")
    return folder


def _ts_pair(cfg: SequenceDataConfig) -> tuple[Path, Path | None, Path | None]:
    if cfg.train_path is not None:
        return cfg.train_path, cfg.val_path, cfg.test_path
    folder = cfg.path if cfg.path is not None else aeon_ts_folder(cfg.name or "")
    if folder.is_file():
        return folder, None, None
    if not folder.is_dir():
        raise UserError(f"data.path {folder}: not found (expected a folder with <NAME>_TRAIN.ts and <NAME>_TEST.ts)")
    if cfg.name is not None:
        train = folder / f"{cfg.name}_TRAIN.ts"
    else:
        found = sorted(folder.glob("*_TRAIN.ts"))
        if len(found) != 1:
            raise UserError(
                f"data.path {folder}: expected exactly one <NAME>_TRAIN.ts, found {len(found)}"
                + (" (set data.name)" if found else "")
            )
        train = found[0]
    if not train.is_file():
        raise UserError(f"{train}: .ts file not found")
    test = train.with_name(train.name.replace("_TRAIN.ts", "_TEST.ts"))
    return train, None, test if test.is_file() else None


def load_ts(cfg: SequenceDataConfig) -> tuple[SeqSplit, SeqSplit | None, SeqSplit | None, list[str]]:
    train_path, val_path, test_path = _ts_pair(cfg)
    tr = read_ts(train_path)
    if any(lbl == "" for lbl in tr.labels):
        raise UserError(f"{train_path}: the series have no class labels (@classLabel false)")
    labels = tr.class_labels or sorted(set(tr.labels))
    missing = sorted(set(tr.labels) - set(labels))
    if missing:
        raise UserError(f"{train_path}: labels {missing} are not in the @classLabel list {labels}")

    def to_split(f: TsFile, path: Path) -> SeqSplit:
        for i, lbl in enumerate(f.labels, start=1):
            if lbl not in labels:
                raise UserError(f"{path}: series {i}: label {lbl!r} does not occur in the training labels {labels}")
        if f.series[0].shape[1] != tr.series[0].shape[1]:
            raise UserError(f"{path}: {f.series[0].shape[1]} dimensions, the training file has {tr.series[0].shape[1]}")
        x, lengths = pad_sequences(f.series)
        return SeqSplit(x, lengths, torch.tensor([labels.index(v) for v in f.labels], dtype=torch.int64))

    val = to_split(read_ts(val_path), val_path) if val_path else None
    test = to_split(read_ts(test_path), test_path) if test_path else None
    return to_split(tr, train_path), val, test, labels


# -------------------------------------------------------------------------------------------------- numeric CSV
def _csv_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    if not path.is_file():
        raise UserError(f"{path}: CSV file not found")
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{path}: not a readable CSV file ({e})") from None
    if not rows:
        raise UserError(f"{path}: empty file")
    return rows[0], rows[1:]


def _num(path: Path, line: int, col: str, v: str) -> float:
    try:
        x = float(v)
    except ValueError:
        raise UserError(f"{path}: line {line}: column {col!r}: {v!r} is not a number") from None
    if not math.isfinite(x):
        raise UserError(f"{path}: line {line}: column {col!r}: {v!r} is not a finite number")
    return x


def read_sequence_csv(path: Path, cfg: SequenceDataConfig) -> tuple[list[np.ndarray], list[str], list[int]]:
    """Wide form (one univariate sequence per row) or long form (`sequence_column`: one time step per row).
    Returns the sequences, their labels and the line each starts on."""
    header, rows = _csv_rows(path)
    if cfg.label_column not in header:
        raise UserError(f"{path}: no column {cfg.label_column!r} (columns: {', '.join(header)}); set data.label_column")
    li = header.index(cfg.label_column)
    seqs: list[np.ndarray] = []
    labels: list[str] = []
    starts: list[int] = []
    if cfg.sequence_column is None:
        for n, row in enumerate(rows, start=2):
            if not any(c.strip() for c in row):
                continue
            if len(row) != len(header):
                raise UserError(f"{path}: line {n}: {len(row)} cells, the header has {len(header)}")
            cells = [(header[i], c.strip()) for i, c in enumerate(row) if i != li]
            while cells and cells[-1][1] == "":
                cells.pop()
            if not cells:
                raise UserError(f"{path}: line {n}: empty sequence")
            vals = [_num(path, n, h, c) for h, c in cells]
            seqs.append(np.asarray(vals, dtype=np.float32)[:, None])
            labels.append(row[li].strip())
            starts.append(n)
        return seqs, labels, starts
    if cfg.sequence_column not in header:
        raise UserError(f"{path}: no column {cfg.sequence_column!r} (columns: {', '.join(header)})")
    si = header.index(cfg.sequence_column)
    feats = [i for i in range(len(header)) if i not in (li, si)]
    if not feats:
        raise UserError(f"{path}: no feature columns besides {cfg.sequence_column!r} and {cfg.label_column!r}")
    groups: dict[str, list[list[float]]] = {}
    glabel: dict[str, str] = {}
    gstart: dict[str, int] = {}
    for n, row in enumerate(rows, start=2):
        if not any(c.strip() for c in row):
            continue
        if len(row) != len(header):
            raise UserError(f"{path}: line {n}: {len(row)} cells, the header has {len(header)}")
        key = row[si].strip()
        lbl = row[li].strip()
        if key in glabel and glabel[key] != lbl:
            raise UserError(f"{path}: line {n}: sequence {key!r} changes label from {glabel[key]!r} to {lbl!r}")
        glabel.setdefault(key, lbl)
        gstart.setdefault(key, n)
        groups.setdefault(key, []).append([_num(path, n, header[i], row[i]) for i in feats])
    for key, steps in groups.items():
        seqs.append(np.asarray(steps, dtype=np.float32))
        labels.append(glabel[key])
        starts.append(gstart[key])
    return seqs, labels, starts


# ---------------------------------------------------------------------------------------------------------- .npz
def read_npz(path: Path) -> tuple[list[np.ndarray], list[str]]:
    """An `.npz` with `x` (N, T, F) or (N, T), `y` (N,) and optionally `lengths` (N,); or a folder with x.npy and
    y.npy (and lengths.npy)."""
    try:
        if path.is_dir():
            arrays = {k: np.load(path / f"{k}.npy", allow_pickle=False) for k in ("x", "y")}
            if (path / "lengths.npy").is_file():
                arrays["lengths"] = np.load(path / "lengths.npy", allow_pickle=False)
        else:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
    except FileNotFoundError as e:
        raise UserError(f"{path}: not found ({e.filename})") from None
    except (ValueError, OSError) as e:
        raise UserError(f"{path}: not a readable .npz/.npy file without pickled objects ({e})") from None
    for k in ("x", "y"):
        if k not in arrays:
            raise UserError(f"{path}: no array {k!r} (arrays: {', '.join(arrays)}); expected x (N, T, F) and y (N,)")
    x, y = arrays["x"], arrays["y"]
    if x.ndim == 2:
        x = x[:, :, None]
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
        raise UserError(f"{path}: expected x (N, T, F) or (N, T) and y (N,), got x {x.shape} and y {y.shape}")
    if not np.issubdtype(x.dtype, np.number) or not np.isfinite(x).all():
        raise UserError(f"{path}: x must hold finite numbers")
    lengths = arrays.get("lengths")
    if lengths is None:
        lengths = np.full(len(x), x.shape[1])
    if lengths.shape != (len(x),) or (lengths < 1).any() or (lengths > x.shape[1]).any():
        raise UserError(f"{path}: lengths must be (N,) with values in 1..{x.shape[1]}")
    seqs = [x[i, : int(n)].astype(np.float32) for i, n in enumerate(lengths)]
    return seqs, [str(v) for v in y.tolist()]


# -------------------------------------------------------------------------------------------------------- entry
def _label_index(labels: list[str], values: list[str], path: Path, where: list[str]) -> torch.Tensor:
    for v, w in zip(values, where, strict=True):
        if v not in labels:
            raise UserError(f"{path}: {w}: label {v!r} does not occur in the training data (labels: {labels})")
    return torch.tensor([labels.index(v) for v in values], dtype=torch.int64)


def _sort_labels(values: list[str]) -> list[str]:
    uniq = set(values)
    try:
        return sorted(uniq, key=float)
    except ValueError:
        return sorted(uniq)


def _load_files(cfg: SequenceDataConfig) -> tuple[SeqSplit, SeqSplit | None, SeqSplit | None, list[str]]:
    train_path = cfg.train_path or cfg.path
    assert train_path is not None
    paths = {"train": train_path, "val": cfg.val_path, "test": cfg.test_path}
    read: dict[str, tuple[list[np.ndarray], list[str], list[str]]] = {}
    for split, p in paths.items():
        if p is None:
            continue
        if cfg.source == "csv":
            seqs, lbls, starts = read_sequence_csv(p, cfg)
            where = [f"line {n}" for n in starts]
        else:
            seqs, lbls = read_npz(p)
            where = [f"row {i}" for i in range(len(lbls))]
        if not seqs:
            raise UserError(f"{p}: no sequences")
        if len({s.shape[1] for s in seqs}) != 1:
            raise UserError(f"{p}: sequences have different numbers of features")
        read[split] = (seqs, lbls, where)
    labels = _sort_labels(read["train"][1])
    F = read["train"][0][0].shape[1]
    out: dict[str, SeqSplit | None] = {"val": None, "test": None}
    for split, (seqs, lbls, where) in read.items():
        if seqs[0].shape[1] != F:
            raise UserError(f"{paths[split]}: {seqs[0].shape[1]} features per step, the training file has {F}")
        x, lengths = pad_sequences(seqs)
        out[split] = SeqSplit(x, lengths, _label_index(labels, lbls, paths[split], where))  # type: ignore[arg-type]
    return out["train"], out["val"], out["test"], labels  # type: ignore[return-value]


def image_rows(split: Any) -> SeqSplit:
    """Images (N, C, H, W) uint8 → sequences of H rows, each of C*W pixel values in 0..1 (the seed's row LSTM)."""
    N, C, H, W = split.x.shape
    x = split.x.permute(0, 2, 1, 3).reshape(N, H, C * W).to(torch.float32).div_(255.0)
    return SeqSplit(x, torch.full((N,), H, dtype=torch.int64), split.y)


def load_sequences(cfg: SequenceDataConfig, seed: int) -> SeqDataset:
    """Load a sequence-classification data set (not yet standardised; see `standardize`)."""
    from bigmodel.data.sources import finish_splits, load_data

    if cfg.source in IMAGE_SOURCES:
        images = load_data(cfg, seed)
        parts = [image_rows(s) if s is not None else None for s in (images.train, images.val, images.test)]
        return SeqDataset(parts[0], parts[1], parts[2], images.labels)  # type: ignore[arg-type]
    if cfg.source == "ts":
        train, val, test, labels = load_ts(cfg)
    elif cfg.source in ("csv", "npy"):
        train, val, test, labels = _load_files(cfg)
    else:
        raise UserError(f"data.source {cfg.source!r} is not a sequence source")
    train, val, test = finish_splits(train, val, test, labels, cfg, seed)
    return SeqDataset(train, val, test, labels)


def read_sequence_file(path: Path, num_features: int) -> tuple[list[np.ndarray], list[str]]:
    """Sequences to predict from one file: `.ts` (every series; labels ignored), `.npy` (T, F) or (N, T, F),
    `.npz` (like training), or `.csv` (one time step per row, one column per feature, a header row).
    Returns the sequences and a name for each."""
    suffix = path.suffix.lower()
    if not path.is_file():
        raise UserError(f"{path}: sequence file not found")
    if suffix == ".ts":
        seqs = read_ts(path, with_labels=False).series
        names = [f"{path}#{i}" for i in range(len(seqs))]
    elif suffix == ".npz":
        seqs, _ = read_npz(path)
        names = [f"{path}#{i}" for i in range(len(seqs))]
    elif suffix == ".npy":
        try:
            a = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise UserError(f"{path}: not a readable .npy file ({e})") from None
        if a.ndim == 1:
            a = a[:, None]
        if a.ndim == 2:
            seqs, names = [a.astype(np.float32)], [str(path)]
        elif a.ndim == 3:
            seqs, names = [s.astype(np.float32) for s in a], [f"{path}#{i}" for i in range(len(a))]
        else:
            raise UserError(f"{path}: expected an array (T, F) or (N, T, F), got shape {a.shape}")
    elif suffix == ".csv":
        header, rows = _csv_rows(path)
        vals = [[_num(path, n, header[i], c) for i, c in enumerate(r)] for n, r in enumerate(rows, start=2) if r]
        seqs, names = [np.asarray(vals, dtype=np.float32).reshape(len(vals), -1)], [str(path)]
    else:
        raise UserError(f"{path}: expected a .ts, .npy, .npz or .csv sequence file")
    for s, n in zip(seqs, names, strict=True):
        if s.ndim != 2 or s.shape[1] != num_features or len(s) == 0:
            raise UserError(f"{n}: expected (steps, {num_features}) values, got shape {tuple(s.shape)}")
        if not np.isfinite(s).all():
            raise UserError(f"{n}: values must be finite numbers")
    return seqs, names
