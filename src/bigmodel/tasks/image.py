"""Image classification: image sources (IDX, CIFAR binary, folders, CSVs of paths, scikit-learn digits), per-channel
normalisation fitted on train, batched augmentation, optional flip TTA; predicts image files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from bigmodel.config import ImageDataConfig
from bigmodel.errors import UserError
from bigmodel.tasks.base import ExportSignature, InputError, LoaderOptions, register_task
from bigmodel.tasks.classification import ClassificationSpec, as_array


class ImageExport(nn.Module):
    """Raw pixels (B, C, H, W) float 0..255 → logits: the artifact's normalisation and TTA inside the graph."""

    def __init__(self, art: Any) -> None:
        super().__init__()
        C = len(art.preprocess.mean or [])
        mean = torch.tensor(art.preprocess.mean, dtype=torch.float32).view(1, C, 1, 1)
        std = torch.tensor(art.preprocess.std, dtype=torch.float32).view(1, C, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std))
        self.register_buffer("shift", -mean / std)
        self.model = art.inference_model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x * self.scale + self.shift)


class ImageClassification(ClassificationSpec):
    name = "image_classification"
    kind = "image"
    channels_last = True
    loader_workers = True
    data_config = ImageDataConfig

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

    def build_loader(self, recipe: Any, split: Any, pre: Any, opts: LoaderOptions) -> Any:
        from bigmodel.data.loader import BatchLoader, Normalizer

        assert pre.mean is not None and pre.std is not None
        return BatchLoader(
            split,
            opts.batch_size,
            Normalizer(pre.mean, pre.std, opts.device),
            augment=recipe.data.augment if opts.train else None,
            channels_last=opts.channels_last,
            num_classes=len(pre.labels),
            num_workers=recipe.train.num_workers,
            **self.loader_kwargs(recipe, opts),
        )

    file_noun = "image file"

    def write_shards(self, recipe: Any, out: Any, shard_size: int) -> dict[str, Any]:
        from bigmodel.data.shards import write_shards
        from bigmodel.data.sources import load_data

        return write_shards(load_data(recipe.data, recipe.seed, decode=False), out, shard_size, recipe.data)

    prepared_unit = "images"

    def baseline_features(self, recipe: Any, data: Any, pre: Any, split: str) -> Any:
        """`linear`: logistic regression on the pixels in [0, 1] (average-pooled to at most 32 x 32)."""
        from bigmodel.evaluation.baseline import from_splits, pixels

        if getattr(data, "on_disk", False):
            return None  # scikit-learn fits in memory: no baseline for data kept on disk
        return from_splits("linear", data, split, lambda s: pixels(s.x))

    def report_example(self, art: Any, split: Any, i: int) -> str:
        from bigmodel.report.classification import image_view

        return image_view(split.x[i])

    def prepare_artifact(self, art: Any) -> None:
        from bigmodel.data.loader import Normalizer

        if art.preprocess.mean is not None:
            art.normalizer = Normalizer(art.preprocess.mean, art.preprocess.std)

    def predict_files(self, art: Any, files: list[Path], top_k: int) -> list[dict[str, Any]]:
        return art.top_k([str(f) for f in files], art.predict_proba(art.load_images(files)), top_k, "file")

    def read_items(self, art: Any, files: list[Path]) -> tuple[list[str], list[Any]]:
        return [str(f) for f in files], list(art.load_images(files).to(torch.float32).numpy())

    def model_inputs(self, art: Any, items: list[Any]) -> tuple[Any, ...]:
        """float (C, H, W) pixels 0..255 → the normalised batch (B, C, H, W)."""
        import numpy as np

        return (art.normalizer(torch.from_numpy(np.stack(items))),)

    def serve_item(self, art: Any, i: int, x: Any) -> Any:
        """`{"image_base64": PNG/JPEG/BMP}` or `{"array": (C, H, W) or (H, W) pixels 0..255}` → float (C, H, W)."""
        import base64
        import binascii

        where = f"inputs[{i}]"
        C, H, W = art.preprocess.input_shape
        if isinstance(x, str):
            raise InputError(f"{where}: this is an image model; expected an object, not a string")
        if isinstance(x, dict) and "image_base64" in x:
            from bigmodel.data.images import decode_image

            try:
                data = base64.b64decode(x["image_base64"], validate=True)
            except (binascii.Error, ValueError):
                raise InputError(f"{where}.image_base64: not valid base64") from None
            try:
                return decode_image(data, C, (H, W), name=f"{where}.image_base64").astype("float32")
            except UserError as e:
                raise InputError(str(e)) from None
        arr = as_array(where, x)
        if arr.shape == (H, W) and C == 1:
            arr = arr[None]
        if arr.shape != (C, H, W):
            raise InputError(f"{where}.array: expected shape {[C, H, W]} (pixel values 0..255), got {list(arr.shape)}")
        return arr

    def probabilities(self, art: Any, batch: list[Any]) -> torch.Tensor:
        import numpy as np

        return art.predict_proba(torch.from_numpy(np.stack(batch)))

    def export_signature(self, art: Any, data: Any, n: int) -> ExportSignature:
        test = data.split("test")
        x = test.x[: min(n, len(test))].to(torch.float32)
        return ExportSignature(
            module=ImageExport(art),
            inputs=(x,),
            names=["pixels"],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65_536)},),
            shapes=[["batch", *list(x.shape[1:])]],
        )


register_task(ImageClassification())
