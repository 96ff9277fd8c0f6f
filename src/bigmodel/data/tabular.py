"""Tables: CSV / Parquet files or the tables bundled with scikit-learn, numeric and categorical columns.

Numeric columns are standardised with the training split's mean and std (missing values → the training mean, i.e.
0 after standardising); categorical columns become indices into a vocabulary fitted on the training split (index 0:
a value not seen in training, or missing). Both are saved with the model, so `predict`, `serve` and `export` apply
exactly what training saw. Splits a source lacks are carved seeded and stratified, as for every other task.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import Field, model_validator

from bigmodel.config import ImbalanceConfig, Strict
from bigmodel.data.loader import BatchLoader
from bigmodel.data.sources import ImageSplit, Splits
from bigmodel.errors import UserError

BUNDLED = ("breast_cancer", "wine", "iris")  # scikit-learn's bundled tables (offline)
MISSING = ("", "na", "nan", "null", "none", "?")


class TabularDataConfig(Strict):
    """`data` of `task: tabular_classification`."""

    source: Literal["csv", "parquet", "breast_cancer", "wine", "iris"]
    """`csv` / `parquet`: a file (`path`, or `train_path` [+ `val_path`, `test_path`]); `breast_cancer` (569 x 30,
    2 classes), `wine` (178 x 13, 3 classes), `iris` (150 x 4, 3 classes): scikit-learn's bundled tables."""
    path: Path | None = None
    train_path: Path | None = None
    val_path: Path | None = None
    test_path: Path | None = None
    label_column: str = "label"
    """The column of class labels (the bundled tables: `target`, holding the class names)."""
    features: Annotated[list[str], Field(min_length=1)] | None = None
    """The feature columns (default: every column but the label)."""
    categorical: list[str] | None = None
    """Which feature columns are categorical (default: those whose training values are not all numbers)."""
    val_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    test_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.2
    limit_train: Annotated[int, Field(ge=1)] | None = None
    imbalance: ImbalanceConfig | None = None
    balance: Literal["none", "oversample", "undersample", "class_weights"] = "none"

    @model_validator(mode="after")
    def _cross(self) -> TabularDataConfig:
        if self.source in ("csv", "parquet") and self.path is None and self.train_path is None:
            raise ValueError(f"data.path (or data.train_path) is required when data.source is {self.source!r}")
        if self.source in BUNDLED and (self.path or self.train_path):
            raise ValueError(f"data.source {self.source!r} is bundled; data.path does not apply")
        if self.path is not None and self.train_path is not None:
            raise ValueError("data.path and data.train_path are alternatives; give one")
        for name in ("val_path", "test_path"):
            if getattr(self, name) is not None and self.train_path is None:
                raise ValueError(f"data.{name} needs data.train_path")
        if self.categorical and self.features and set(self.categorical) - set(self.features):
            extra = sorted(set(self.categorical) - set(self.features))
            raise ValueError(f"data.categorical {extra} are not among data.features")
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError(
                f"data.val_fraction + data.test_fraction = {self.val_fraction + self.test_fraction:g} leaves too "
                "little to train on; expected a sum below 0.9"
            )
        return self


# ------------------------------------------------------------------------------------------------------ reading
Rows = list[dict[str, str]]


def read_table(path: Path) -> Rows:
    """A CSV (UTF-8, header row) or Parquet file → rows of strings (column → cell)."""
    if not path.is_file():
        raise UserError(f"{path}: table file not found")
    if path.suffix.lower() in (".parquet", ".pq"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise UserError(f"{path}: reading Parquet needs pyarrow (pip install 'bigmodel[tabular]')") from None
        try:
            table = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for a broken file
            raise UserError(f"{path}: not a readable Parquet file ({e})") from None
        return [{k: "" if v is None else str(v) for k, v in row.items()} for row in table]
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = [dict(r) for r in reader]
            header = reader.fieldnames or []
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 CSV file") from None
    except csv.Error as e:
        raise UserError(f"{path}: not a readable CSV file ({e})") from None
    if not header:
        raise UserError(f"{path}: empty CSV (expected a header row)")
    for i, r in enumerate(rows):
        if None in r or any(v is None for v in r.values()):
            raise UserError(f"{path}: row {i + 2} has {len(r) - (None in r)} cells, the header {len(header)}")
    return rows


def bundled_table(name: str) -> Rows:
    from sklearn import datasets

    d = {"breast_cancer": datasets.load_breast_cancer, "wine": datasets.load_wine, "iris": datasets.load_iris}[name]()
    names = [str(n) for n in d.feature_names]
    classes = [str(c) for c in d.target_names]
    return [
        {**{n: repr(float(v)) for n, v in zip(names, row, strict=True)}, "target": classes[int(t)]}
        for row, t in zip(d.data, d.target, strict=True)
    ]


def _number(cell: str) -> float | None:
    """A numeric cell, or None when missing; raises ValueError when it is text."""
    if cell.strip().lower() in MISSING:
        return None
    v = float(cell)
    if not math.isfinite(v):
        raise ValueError(cell)
    return v


# ------------------------------------------------------------------------------------------------ the columns
@dataclass
class TableSchema:
    """Which columns are features and how each is encoded; fitted on train, saved in the artifact."""

    numeric: list[str]
    categorical: dict[str, list[str]]  # column → vocabulary (index 0 = unseen / missing)
    mean: list[float]
    std: list[float]

    def to_dict(self) -> dict[str, Any]:
        return {"numeric": self.numeric, "categorical": self.categorical}

    @property
    def cardinalities(self) -> list[int]:
        return [len(v) + 1 for v in self.categorical.values()]


def fit_schema(rows: Rows, cfg: TabularDataConfig, label: str, where: Path | str) -> TableSchema:
    columns = list(rows[0]) if rows else []
    features = cfg.features or [c for c in columns if c != label]
    missing = [c for c in features if c not in columns]
    if missing:
        raise UserError(f"{where}: data.features {missing} are not columns (it has: {', '.join(columns)})")
    if label in features:
        raise UserError(f"data.features: {label!r} is the label column, not a feature")
    categorical = list(cfg.categorical or [])
    if cfg.categorical is None:
        for c in features:
            try:
                for r in rows:
                    _number(r[c])
            except ValueError:
                categorical.append(c)
    numeric = [c for c in features if c not in categorical]
    stats_mean, stats_std = [], []
    for c in numeric:
        vals = []
        for i, r in enumerate(rows):
            try:
                v = _number(r[c])
            except ValueError:
                raise UserError(f"{where}: column {c!r} row {i + 2}: {r[c]!r} is not a number") from None
            if v is not None:
                vals.append(v)
        m = sum(vals) / len(vals) if vals else 0.0
        sd = (sum((v - m) ** 2 for v in vals) / len(vals)) ** 0.5 if vals else 1.0
        stats_mean.append(m)
        stats_std.append(sd if sd > 1e-12 else 1.0)
    vocab = {c: sorted({r[c] for r in rows if r[c].strip().lower() not in MISSING}) for c in categorical}
    ordered = {c: vocab[c] for c in features if c in vocab}
    return TableSchema(numeric, ordered, stats_mean, stats_std)


def encode_rows(rows: Rows, schema: TableSchema, where: Path | str = "input") -> tuple[torch.Tensor, torch.Tensor]:
    """Rows → standardised numeric (N, Fn) float32 and category indices (N, Fc) int64."""
    index = {c: {v: i + 1 for i, v in enumerate(vocab)} for c, vocab in schema.categorical.items()}
    num = torch.zeros((len(rows), len(schema.numeric)), dtype=torch.float32)
    cat = torch.zeros((len(rows), len(schema.categorical)), dtype=torch.int64)
    for i, r in enumerate(rows):
        for j, c in enumerate(schema.numeric):
            if c not in r:
                raise UserError(f"{where}: row {i}: missing column {c!r}")
            try:
                v = _number(str(r[c]))
            except ValueError:
                raise UserError(f"{where}: row {i}: column {c!r}: {r[c]!r} is not a number") from None
            num[i, j] = 0.0 if v is None else (v - schema.mean[j]) / schema.std[j]
        for j, c in enumerate(schema.categorical):
            if c not in r:
                raise UserError(f"{where}: row {i}: missing column {c!r}")
            cat[i, j] = index[c].get(str(r[c]), 0)
    return num, cat


# ------------------------------------------------------------------------------------------------- data sets
@dataclass
class TableSplit:
    rows: Rows
    y: torch.Tensor  # (N,) int64
    num: torch.Tensor | None = None  # (N, Fn) float32, once encoded
    cat: torch.Tensor | None = None  # (N, Fc) int64

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx: torch.Tensor) -> TableSplit:
        rows = [self.rows[i] for i in idx.tolist()]
        return TableSplit(
            rows,
            self.y[idx],
            None if self.num is None else self.num[idx],
            None if self.cat is None else self.cat[idx],
        )


@dataclass
class TableDataset(Splits):
    train: TableSplit
    val: TableSplit | None
    test: TableSplit | None
    labels: list[str]
    label_column: str


def load_table(cfg: TabularDataConfig, seed: int) -> TableDataset:
    """The recipe's table with train / val / test splits (carved ones seeded and stratified)."""
    from bigmodel.data.sources import finish_splits

    label = cfg.label_column if cfg.source not in BUNDLED else "target"
    files: dict[str, tuple[Path | str, Rows]] = {}
    if cfg.source in BUNDLED:
        files["train"] = (cfg.source, bundled_table(cfg.source))
    else:
        for split, p in (("train", cfg.train_path or cfg.path), ("val", cfg.val_path), ("test", cfg.test_path)):
            if p is not None:
                files[split] = (p, read_table(p))
    where, train_rows = files["train"]
    if not train_rows:
        raise UserError(f"{where}: the table has no rows")
    if label not in train_rows[0]:
        raise UserError(f"{where}: data.label_column {label!r} is not a column (it has: {', '.join(train_rows[0])})")
    labels = sorted({r[label] for r in train_rows})
    if len(labels) < 2:
        raise UserError(f"{where}: the training data has {len(labels)} label(s); classification needs ≥ 2")
    ids = {name: i for i, name in enumerate(labels)}
    splits: dict[str, TableSplit | None] = {"val": None, "test": None}
    for split, (p, rows) in files.items():
        unknown = sorted({r.get(label, "") for r in rows} - set(ids))
        if unknown:
            raise UserError(f"{p}: labels {unknown[:5]} do not occur in the training data")
        splits[split] = TableSplit(rows, torch.tensor([ids[r[label]] for r in rows], dtype=torch.int64))
    train, val, test = finish_splits(splits["train"], splits["val"], splits["test"], labels, cfg, seed)
    return TableDataset(train, val, test, labels, label)


def encode_dataset(data: TableDataset, schema: TableSchema) -> TableDataset:
    def enc(s: TableSplit | None, name: str) -> TableSplit | None:
        if s is None:
            return None
        num, cat = encode_rows(s.rows, schema, name)
        return TableSplit(s.rows, s.y, num, cat)

    train = enc(data.train, "train")
    assert train is not None
    return TableDataset(train, enc(data.val, "val"), enc(data.test, "test"), data.labels, data.label_column)


# ---------------------------------------------------------------------------------------------------- batches
class TableLoader(BatchLoader):
    """Batches `((numeric (B, Fn), categorical (B, Fc)), y)` in the sampling plan's order (the image / sequence
    loader's order, balancing and sharding; only the batch differs). Keyword arguments as `BatchLoader`'s."""

    def __init__(self, split: TableSplit, batch_size: int, **kwargs: Any) -> None:
        assert split.num is not None and split.cat is not None, "encode the split first"
        super().__init__(ImageSplit(split.num, split.y), batch_size, None, **kwargs)
        self.cat = split.cat.to(self.device)

    def _batch(self, idx: slice | torch.Tensor, epoch: int, i: int) -> tuple[Any, torch.Tensor]:
        return (self.x[idx], self.cat[idx]), self.y[idx]
