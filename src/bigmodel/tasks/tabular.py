"""Tabular classification: CSV / Parquet tables or scikit-learn's bundled ones, numeric columns standardised and
categorical columns indexed (both fitted on train, saved in the artifact); predicts the rows of CSV / Parquet
files, serves JSON rows (`{"column": value, ...}`), exports a graph that standardises inside.

Added as a new task through the seams only: this file, `data/tabular.py`, `models/mlp.py` and registration lines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from bigmodel.data.tabular import TableSchema, TabularDataConfig, encode_rows, read_table
from bigmodel.errors import UserError
from bigmodel.tasks.base import ExportSignature, InputError, LoaderOptions, register_task
from bigmodel.tasks.classification import ClassificationSpec


def schema_of(pre: Any) -> TableSchema:
    """The fitted column encoding saved in an artifact's preprocessing."""
    shape = pre.input_shape
    return TableSchema(list(shape["numeric"]), dict(shape["categorical"]), list(pre.mean or []), list(pre.std or []))


class TabularExport(nn.Module):
    """Raw numbers (B, Fn) (not standardised) and category indices (B, Fc) → logits: standardisation in the graph.
    Category strings become indices with the vocabularies in the bundle's preprocess.json (0 = unseen)."""

    def __init__(self, art: Any) -> None:
        super().__init__()
        s = schema_of(art.preprocess)
        self.register_buffer("mean", torch.tensor(s.mean, dtype=torch.float32).view(1, -1))
        self.register_buffer("inv_std", 1.0 / torch.tensor(s.std, dtype=torch.float32).view(1, -1))
        self.model = art.model

    def forward(self, numeric: torch.Tensor, categorical: torch.Tensor) -> torch.Tensor:
        return self.model((numeric - self.mean) * self.inv_std, categorical)


class TabularClassification(ClassificationSpec):
    name = "tabular_classification"
    kind = "tabular"
    data_config = TabularDataConfig

    def check_recipe(self, recipe: Any) -> None:
        data = recipe.data
        if recipe.train.early_stopping is not None and data.val_fraction == 0 and data.val_path is None:
            raise ValueError("train.early_stopping needs a validation split; set data.val_fraction > 0")

    def prepare(self, recipe: Any, pre: Any | None = None) -> tuple[Any, Any]:
        from bigmodel.data.tabular import encode_dataset, fit_schema, load_table
        from bigmodel.runs import Preprocess

        data = load_table(recipe.data, recipe.seed)
        if pre is None:
            schema = fit_schema(data.train.rows, recipe.data, data.label_column, recipe.data.path or recipe.data.source)
            spec = {
                "kind": "tabular",
                **schema.to_dict(),
                "cardinalities": schema.cardinalities,
                "label_column": data.label_column,
            }
            pre = Preprocess(labels=data.labels, mean=schema.mean, std=schema.std, input_shape=spec, kind="tabular")
        return encode_dataset(data, schema_of(pre)), pre

    def build_loader(self, recipe: Any, split: Any, pre: Any, opts: LoaderOptions) -> Any:
        from bigmodel.data.tabular import TableLoader

        return TableLoader(split, opts.batch_size, **self.loader_kwargs(recipe, opts))

    def baseline_features(self, recipe: Any, data: Any, pre: Any, split: str) -> Any:
        """`linear`: logistic regression on the standardised numeric columns and one-hot categories."""
        import numpy as np

        from bigmodel.evaluation.baseline import from_splits
        from bigmodel.models.classic import table_features

        cards = list(pre.input_shape.get("cardinalities") or [])

        def featurize(s: Any) -> np.ndarray:
            num = s.num if s.num is not None else torch.zeros((len(s), 0))
            cat = s.cat if s.cat is not None else torch.zeros((len(s), 0), dtype=torch.int64)
            x = table_features(num, cat, cards if s.cat is not None else [])
            return x.numpy() if x.shape[1] else np.zeros((len(s), 1), dtype=np.float32)

        return from_splits("linear", data, split, featurize)

    def report_example(self, art: Any, split: Any, i: int) -> str:
        from bigmodel.report.classification import row_view

        label = art.preprocess.input_shape.get("label_column")
        return row_view({k: v for k, v in split.rows[i].items() if k != label})

    # -------------------------------------------------------------------------------------------- prediction
    def probabilities(self, art: Any, rows: list[Any], where: str = "input") -> torch.Tensor:
        num, cat = encode_rows(rows, schema_of(art.preprocess), where)
        with torch.inference_mode():
            return art.inference_model(num, cat).float().softmax(dim=1)

    file_noun = "table file"

    def predict_files(self, art: Any, files: list[Path], top_k: int) -> list[dict[str, Any]]:
        names, rows = [], []
        for f in files:
            table = read_table(Path(f))
            rows += table
            names += [f"{f}:{i + 1}" for i in range(len(table))]
        probs = self.probabilities(art, rows) if rows else torch.zeros((0, len(art.labels)))
        return art.top_k(names, probs, top_k, "row")

    def read_items(self, art: Any, files: list[Path]) -> tuple[list[str], list[Any]]:
        names, rows = [], []
        for f in files:
            table = read_table(Path(f))
            rows += table
            names += [f"{f}:{i + 1}" for i in range(len(table))]
        return names, rows

    def model_inputs(self, art: Any, items: list[Any]) -> tuple[Any, ...]:
        """Rows → standardised numeric (B, Fn) and category indices (B, Fc)."""
        return encode_rows(items, schema_of(art.preprocess), "input")

    def serve_item(self, art: Any, i: int, x: Any) -> Any:
        if not isinstance(x, dict):
            raise InputError(f"inputs[{i}]: this is a tabular model; expected a row object {{column: value, ...}}")
        row = {str(k): "" if v is None else str(v) for k, v in x.items()}
        try:
            encode_rows([row], schema_of(art.preprocess), f"inputs[{i}]")
        except UserError as e:
            raise InputError(str(e)) from None
        return row

    # ------------------------------------------------------------------------------------------------ export
    def export_signature(self, art: Any, data: Any, n: int) -> ExportSignature:
        test = data.split("test")
        k = min(n, len(test))
        s = schema_of(art.preprocess)
        mean, std = torch.tensor(s.mean), torch.tensor(s.std)
        numeric = (test.num[:k] * std + mean).to(torch.float32)  # back to raw values: the graph standardises
        batch = torch.export.Dim("batch", min=1, max=65_536)
        return ExportSignature(
            module=TabularExport(art),
            inputs=(numeric, test.cat[:k]),
            names=["numeric", "categorical"],
            dynamic_shapes=({0: batch}, {0: batch}),
            shapes=[["batch", len(s.numeric)], ["batch", len(s.categorical)]],
        )


register_task(TabularClassification())
