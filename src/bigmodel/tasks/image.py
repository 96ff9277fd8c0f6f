"""Image classification: image sources (IDX, CIFAR binary, folders, CSVs of paths, scikit-learn digits), per-channel
normalisation fitted on train, batched augmentation, optional flip TTA; predicts image files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bigmodel.errors import UserError
from bigmodel.tasks.base import refuse_inputs, register_task
from bigmodel.tasks.classification import ClassificationSpec


class ImageClassification(ClassificationSpec):
    name = "image_classification"
    kind = "image"
    channels_last = True

    def prepare(self, recipe: Any, pre: Any | None = None) -> tuple[Any, Any]:
        from bigmodel.data.sources import load_data
        from bigmodel.runs import Preprocess

        data = load_data(recipe.data, recipe.seed)
        if pre is None:
            mean, std = data.channel_stats()
            pre = Preprocess(
                labels=data.labels,
                mean=mean,
                std=std,
                input_shape=list(data.input_shape),
                tta_flip=recipe.eval.tta_flip,
            )
        return data, pre

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
        from bigmodel.data.loader import BatchLoader, Normalizer

        assert pre.mean is not None and pre.std is not None
        return BatchLoader(
            data.split(split),
            self.batch_size(recipe, train, batch_size),
            Normalizer(pre.mean, pre.std, device),
            shuffle=train,
            seed=recipe.seed,
            augment=recipe.data.augment if train else None,
            drop_last=train,
            channels_last=channels_last,
            device=device,
            num_classes=len(data.labels),
            sampling=self.sampling(recipe, train),
            rank=rank,
            world_size=world_size,
        )

    def predict(
        self, art: Any, files: list[str | Path] | None, texts: list[str] | None, top_k: int
    ) -> list[dict[str, Any]]:
        refuse_inputs(art, files, texts, takes="files")
        for f in files or []:
            if not Path(f).is_file():
                raise UserError(f"{f}: image file not found")
        return art.predict_files(list(files or []), top_k=top_k)


register_task(ImageClassification())
