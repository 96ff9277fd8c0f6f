"""Sequence classification: multivariate time series (UEA/UCR .ts, .npz, CSV) or images read row by row, padded
per batch with their lengths, standardised per feature on train; predicts sequence files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bigmodel.errors import UserError
from bigmodel.tasks.base import refuse_inputs, register_task
from bigmodel.tasks.classification import ClassificationSpec


def padded_loader(
    spec: ClassificationSpec,
    recipe: Any,
    data: Any,
    split: str,
    train: bool,
    device: Any,
    batch_size: int | None,
    rank: int,
    world_size: int,
) -> Any:
    """Sequences and token ids share one loader: values cut per batch to its longest example."""
    from bigmodel.data.loader import SequenceLoader

    return SequenceLoader(
        data.split(split),
        spec.batch_size(recipe, train, batch_size),
        shuffle=train,
        seed=recipe.seed,
        drop_last=train,
        device=device,
        sampling=spec.sampling(recipe, train),
        rank=rank,
        world_size=world_size,
    )


class SequenceClassification(ClassificationSpec):
    name = "sequence_classification"
    kind = "sequence"

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

    def loader(
        self,
        recipe: Any,
        data: Any,
        pre: Any,
        split: str,
        *,
        train: bool = False,
        device: Any = "cpu",
        channels_last: bool = False,
        batch_size: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> Any:
        return padded_loader(self, recipe, data, split, train, device, batch_size, rank, world_size)

    def predict(
        self, art: Any, files: list[str | Path] | None, texts: list[str] | None, top_k: int
    ) -> list[dict[str, Any]]:
        refuse_inputs(art, files, texts, takes="files")
        for f in files or []:
            if not Path(f).is_file():
                raise UserError(f"{f}: sequence file not found")
        return art.predict_files(list(files or []), top_k=top_k)


register_task(SequenceClassification())
