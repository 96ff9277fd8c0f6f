"""Classification: batch → loss, and the streaming metrics of an evaluation.

The loss lives here, not in the model (`forward(x) -> logits`); the Trainer knows tasks, not model internals.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bigmodel.evaluation.metrics import ClassificationMetrics


class ClassificationTask:
    name = "image_classification"

    def __init__(self, num_classes: int, labels: list[str] | None = None, label_smoothing: float = 0.0) -> None:
        self.num_classes = num_classes
        self.labels = labels
        self.label_smoothing = label_smoothing

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Mean training loss of one batch (cross-entropy with optional label smoothing, computed in fp32)."""
        x, y = batch
        logits = model(x)
        return F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)

    def new_metrics(self, device: torch.device | str = "cpu") -> ClassificationMetrics:
        return ClassificationMetrics(self.num_classes, self.labels, device)

    def eval_batch(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], metrics: Any) -> None:
        """Forward one batch in eval mode and add it to `metrics` (plain cross-entropy, summed, for val_loss)."""
        x, y = batch
        logits = model(x).float()
        metrics.update(logits, y, F.cross_entropy(logits, y, reduction="sum"))
