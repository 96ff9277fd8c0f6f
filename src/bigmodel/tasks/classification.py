"""Classification: batch → loss, and the streaming metrics of an evaluation.

The loss lives here, not in the model (`forward(x) -> logits`); the Trainer knows tasks, not model internals.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bigmodel.evaluation.metrics import ClassificationMetrics
from bigmodel.tasks.base import InputError, LoaderOptions, TaskSpec


def forward(model: nn.Module, x: Any) -> torch.Tensor:
    """Images: `model(x)`; sequences and text: x is `(values, lengths)` → `model(values, lengths)`."""
    return model(*x) if isinstance(x, (tuple, list)) else model(x)


class ClassificationTask:
    """Image, sequence and text classification share this: the inputs differ, the loss and metrics do not."""

    name = "classification"

    def __init__(
        self,
        num_classes: int,
        labels: list[str] | None = None,
        label_smoothing: float = 0.0,
        *,
        loss: str = "cross_entropy",
        focal_gamma: float = 2.0,
        class_weights: torch.Tensor | None = None,
    ) -> None:
        self.num_classes = num_classes
        self.labels = labels
        self.label_smoothing = label_smoothing
        self.loss_name = loss
        self.focal_gamma = focal_gamma
        self.class_weights = class_weights

    def loss(self, model: nn.Module, batch: tuple[Any, torch.Tensor]) -> torch.Tensor:
        """Mean training loss of one batch, in fp32. Targets are class indices (B,) or, after mixup/cutmix, class
        probabilities (B, K); optional label smoothing, class weights, focal loss."""
        x, y = batch
        logits = forward(model, x).float()
        w = self.class_weights.to(logits.device) if self.class_weights is not None else None
        if self.loss_name == "cross_entropy":
            return F.cross_entropy(logits, y, weight=w, label_smoothing=self.label_smoothing)
        target = F.one_hot(y, self.num_classes).float() if y.ndim == 1 else y
        if self.label_smoothing:
            target = target * (1 - self.label_smoothing) + self.label_smoothing / self.num_classes
        logp = logits.log_softmax(dim=1)
        per_class = -target * (1 - logp.exp()).pow(self.focal_gamma) * logp  # (B, K)
        if w is not None:
            per_class = per_class * w
        return per_class.sum(dim=1).mean()

    def new_metrics(self, device: torch.device | str = "cpu") -> ClassificationMetrics:
        return ClassificationMetrics(self.num_classes, self.labels, device)

    def eval_batch(self, model: nn.Module, batch: tuple[Any, torch.Tensor], metrics: Any) -> None:
        """Forward one batch in eval mode and add it to `metrics` (plain cross-entropy, summed, for val_loss)."""
        x, y = batch
        logits = forward(model, x).float()
        metrics.update(logits, y, F.cross_entropy(logits, y, reduction="sum"))


class ClassificationSpec(TaskSpec):
    """What image, sequence and text classification share: the objective (class weights from `data.balance`),
    class-balanced training loaders, and top-k predictions."""

    per_example_outputs = True

    def objective(self, recipe: Any, data: Any, num_classes: int, labels: list[str]) -> ClassificationTask:
        if recipe is None:
            return ClassificationTask(num_classes, labels)
        weights = None
        if recipe.data.balance == "class_weights":
            counts = torch.bincount(data.train.y, minlength=num_classes).to(torch.float32)
            # N / (K * n_k): each class contributes equally to the loss; absent classes get weight 0.
            weights = torch.where(
                counts > 0, counts.sum() / (num_classes * counts.clamp(min=1)), torch.zeros_like(counts)
            )
        return ClassificationTask(
            num_classes,
            labels,
            recipe.train.label_smoothing,
            loss=recipe.train.loss,
            focal_gamma=recipe.train.focal_gamma,
            class_weights=weights,
        )

    def predict(
        self, art: Any, files: list[str | Path] | None, texts: list[str] | None, top_k: int
    ) -> list[dict[str, Any]]:
        """File-based classifiers (images, sequences, tables): files must exist, strings are refused."""
        from bigmodel.errors import UserError
        from bigmodel.tasks.base import refuse_inputs

        refuse_inputs(art, files, texts, takes="files")
        for f in files or []:
            if not Path(f).is_file():
                raise UserError(f"{f}: {self.file_noun} not found")
        return self.predict_files(art, [Path(f) for f in files or []], top_k)

    file_noun = "input file"

    def explain_items(
        self, art: Any, files: list[str | Path] | None, texts: list[str] | None
    ) -> tuple[list[str], list[Any]]:
        """Files (images, sequence files, tables) → names and prepared items; strings are refused."""
        from bigmodel.errors import UserError
        from bigmodel.tasks.base import refuse_inputs

        refuse_inputs(art, files, texts, takes="files")
        for f in files or []:
            if not Path(f).is_file():
                raise UserError(f"{f}: {self.file_noun} not found")
        return self.read_items(art, [Path(f) for f in files or []])

    def read_items(self, art: Any, files: list[Path]) -> tuple[list[str], list[Any]]:
        raise NotImplementedError

    def serve_batch(self, art: Any, batch: list[Any]) -> list[Any]:
        return list(self.probabilities(art, batch))

    def probabilities(self, art: Any, batch: list[Any]) -> torch.Tensor:
        """(N, K) class probabilities for a list of items prepared by `serve_item`."""
        raise NotImplementedError

    def report_sections(self, ctx: Any) -> list[Any]:
        """Confusion matrix, per-class table, calibration and the highest-loss examples."""
        from bigmodel.report.classification import sections

        return sections(self, ctx)

    def report_example(self, art: Any, split: Any, i: int) -> str:
        """Example `i` of a split as HTML for the report's gallery (images: the picture; text: its tokens)."""
        from bigmodel.report.html import esc

        return f"<code>example {esc(i)}</code>"

    @staticmethod
    def loader_kwargs(recipe: Any, opts: LoaderOptions) -> dict[str, Any]:
        """A classification loader's arguments: shuffled and balanced (`data.balance`) when training; Poisson-sampled
        under `privacy.dp`."""
        balance = recipe.data.balance
        sampling = balance if opts.train and balance in ("oversample", "undersample") else "none"
        if opts.train and recipe.privacy.dp is not None:  # DP-SGD: each example joins each batch with prob. B / N
            sampling = "poisson"
        return {"shuffle": opts.train, "sampling": sampling, **opts.plan_kwargs(recipe)}


def as_array(where: str, x: Any) -> Any:
    """`{"array": nested numbers}` of a request → a finite float32 array, or an InputError naming the input."""
    import numpy as np

    if not isinstance(x, dict) or set(x) != {"array"}:
        raise InputError(f'{where}: expected {{"array": [...]}}')
    try:
        arr = np.asarray(x["array"], dtype=np.float32)
    except (ValueError, TypeError):
        raise InputError(f"{where}.array: expected nested lists of numbers of one shape") from None
    if not np.isfinite(arr).all():
        raise InputError(f"{where}.array: values must be finite numbers")
    return arr
