"""Sequence classification: multivariate time series (UEA/UCR .ts, .npz, CSV) or images read row by row, padded
per batch with their lengths, standardised per feature on train; predicts sequence files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from bigmodel.config import SequenceDataConfig
from bigmodel.errors import UserError
from bigmodel.tasks.base import ExportSignature, InputError, LoaderOptions, register_task
from bigmodel.tasks.classification import ClassificationSpec, as_array


class PaddedExport(nn.Module):
    """(values (B, T, ...), lengths (B,)) → logits: sequences (standardised) and token ids alike."""

    def __init__(self, art: Any) -> None:
        super().__init__()
        self.model = art.model

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.model(x, lengths)


def padded_signature(art: Any, data: Any, n: int) -> ExportSignature:
    """Padded values and lengths with dynamic batch and step axes (sequence and text models)."""
    test = data.split("test")
    k = min(n, len(test))
    lengths = test.lengths[:k]
    x = test.x[:k][:, : int(lengths.max())]
    batch = torch.export.Dim("batch", min=1, max=65_536)
    steps = torch.export.Dim("steps", min=1, max=65_536)
    return ExportSignature(
        module=PaddedExport(art),
        inputs=(x, lengths),
        names=["x", "lengths"],
        dynamic_shapes=({0: batch, 1: steps}, {0: batch}),
        shapes=[["batch", "steps", *list(x.shape[2:])], ["batch"]],
        padded=True,
    )


class SequenceClassification(ClassificationSpec):
    name = "sequence_classification"
    kind = "sequence"
    data_config = SequenceDataConfig

    def prepare(self, recipe: Any, pre: Any | None = None) -> tuple[Any, Any]:
        from bigmodel.data.sequences import SeqDataset, load_sequences, standardize
        from bigmodel.runs import Preprocess

        cfg = recipe.data
        seq = load_sequences(cfg, recipe.seed)
        if pre is None:
            mean, std = seq.feature_stats() if cfg.normalize else (None, None)
            spec = {"kind": "sequence", "features": seq.num_features}
            pre = Preprocess(labels=seq.labels, mean=mean, std=std, input_shape=spec, kind="sequence")
        elif pre.input_shape.get("features") != seq.num_features:
            raise UserError(
                f"the data has {seq.num_features} features per step, the model expects {pre.input_shape['features']}"
            )
        if pre.mean is not None and pre.std is not None:
            m, sd = pre.mean, pre.std
            parts = [standardize(s, m, sd) if s is not None else None for s in (seq.train, seq.val, seq.test)]
            seq = SeqDataset(parts[0], parts[1], parts[2], seq.labels)  # type: ignore[arg-type]
        return seq, pre

    def build_loader(self, recipe: Any, split: Any, pre: Any, opts: LoaderOptions) -> Any:
        from bigmodel.data.loader import SequenceLoader

        return SequenceLoader(split, opts.batch_size, **self.loader_kwargs(recipe, opts))

    file_noun = "sequence file"

    def baseline_features(self, recipe: Any, data: Any, pre: Any, split: str) -> Any:
        """`linear`: logistic regression on each feature's mean, std, min, max, first and last value, and the
        length."""
        from bigmodel.evaluation.baseline import from_splits, pooled

        return from_splits("linear", data, split, lambda s: pooled(s.x, s.lengths))

    def report_example(self, art: Any, split: Any, i: int) -> str:
        from bigmodel.report.classification import sequence_view

        return sequence_view(split.x[i], int(split.lengths[i]))

    def predict_files(self, art: Any, files: list[Path], top_k: int) -> list[dict[str, Any]]:
        from bigmodel.data.sequences import read_sequence_file

        seqs, names = [], []
        for f in files:
            s, n = read_sequence_file(Path(f), int(art.preprocess.input_shape["features"]))
            seqs += s
            names += n
        return art.top_k(names, art.predict_sequences_proba(seqs), top_k, "file")

    def read_items(self, art: Any, files: list[Path]) -> tuple[list[str], list[Any]]:
        from bigmodel.data.sequences import read_sequence_file

        seqs, names = [], []
        for f in files:
            s, n = read_sequence_file(Path(f), int(art.preprocess.input_shape["features"]))
            seqs += s
            names += n
        return names, seqs

    def model_inputs(self, art: Any, items: list[Any]) -> tuple[Any, ...]:
        """(T, F) arrays → standardised, zero-padded (B, T, F) values and lengths (B,)."""
        return art.prepare_sequences(items)

    def serve_item(self, art: Any, i: int, x: Any) -> Any:
        """`{"array": (T, F)}` (or (T,) for one feature) → float (T, F)."""
        where = f"inputs[{i}]"
        if isinstance(x, str):
            raise InputError(f"{where}: this is a sequence model; expected an object, not a string")
        if isinstance(x, dict) and "image_base64" in x:
            raise InputError(f"{where}: this is a sequence model; image_base64 is for image models")
        features = int(art.preprocess.input_shape["features"])
        arr = as_array(where, x)
        if arr.ndim == 1 and features == 1:
            arr = arr[:, None]
        if arr.ndim != 2 or arr.shape[1] != features:
            raise InputError(f"{where}.array: expected a sequence of shape [steps, {features}], got {list(arr.shape)}")
        return arr

    def probabilities(self, art: Any, batch: list[Any]) -> torch.Tensor:
        return art.predict_sequences_proba(batch)

    def export_signature(self, art: Any, data: Any, n: int) -> ExportSignature:
        return padded_signature(art, data, n)


register_task(SequenceClassification())
