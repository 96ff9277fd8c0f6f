"""Streaming classification metrics: a confusion matrix accumulated batch by batch (torchmetrics), from which
accuracy and per-class / macro precision, recall and F1 are derived. Logits are never gathered.
"""

from __future__ import annotations

from typing import Any

import torch


class ClassificationMetrics:
    def __init__(self, num_classes: int, labels: list[str] | None = None, device: torch.device | str = "cpu") -> None:
        from torchmetrics.classification import MulticlassConfusionMatrix

        self.num_classes = num_classes
        self.labels = labels or [str(i) for i in range(num_classes)]
        # sync_on_compute off: the Trainer strategy all-reduces `sums()` itself (torchmetrics would gather again
        # inside compute(), doubling the counts, and block when one process evaluates alone).
        self._cm = MulticlassConfusionMatrix(num_classes=num_classes, validate_args=False, sync_on_compute=False).to(
            device
        )
        self._loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self._count = torch.zeros((), dtype=torch.int64, device=device)
        self._has_loss = False

    def update(self, logits: torch.Tensor, target: torch.Tensor, loss_sum: torch.Tensor | None = None) -> None:
        """Add one batch: `logits` (B, K), `target` (B,), and optionally the summed loss of the batch."""
        self._cm.update(logits.argmax(dim=1), target)
        if loss_sum is not None:
            self._loss_sum += loss_sum.detach().to(torch.float64)
            self._has_loss = True
        self._count += target.shape[0]

    def sums(self) -> dict[str, torch.Tensor]:
        """The whole state as tensors of sums and counts, for a strategy to all-reduce in place (DDP, federated)."""
        return {"confusion_matrix": self._cm.confmat, "loss_sum": self._loss_sum, "count": self._count}

    def confusion_matrix(self) -> torch.Tensor:
        """(K, K) counts: row = true class, column = predicted class."""
        return self._cm.compute().to(torch.int64).cpu()

    def compute(self) -> dict[str, Any]:
        cm = self.confusion_matrix().to(torch.float64)
        tp = cm.diag()
        support = cm.sum(1)
        predicted = cm.sum(0)
        precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
        recall = torch.where(support > 0, tp / support.clamp(min=1), torch.zeros_like(tp))
        denom = precision + recall
        f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-12), torch.zeros_like(tp))
        # Macro averages over the classes that occur in the targets or the predictions, as scikit-learn does.
        present = (support > 0) | (predicted > 0)
        total = cm.sum().item()
        out: dict[str, Any] = {
            "accuracy": tp.sum().item() / total if total else 0.0,
            "macro_precision": precision[present].mean().item() if present.any() else 0.0,
            "macro_recall": recall[present].mean().item() if present.any() else 0.0,
            "macro_f1": f1[present].mean().item() if present.any() else 0.0,
            "num_examples": int(total),
            "per_class": [
                {
                    "label": self.labels[k],
                    "precision": precision[k].item(),
                    "recall": recall[k].item(),
                    "f1": f1[k].item(),
                    "support": int(support[k].item()),
                }
                for k in range(self.num_classes)
            ],
            "confusion_matrix": cm.to(torch.int64).tolist(),
        }
        count = int(self._count)
        if count and self._has_loss:
            out["loss"] = self._loss_sum.item() / count
        return out
