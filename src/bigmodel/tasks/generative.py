"""Language modelling and translation: next-token cross-entropy, and the streaming metrics of an evaluation.

Both are token-level: the loss is the mean cross-entropy over target tokens that are not padding (-100), and the
evaluation reports that loss and its exponential, the perplexity. BLEU / chrF of translations need decoding and are
computed by `bigmodel evaluate` (see `bigmodel.models.seq2seq.evaluate_translation`), not on every validation pass.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100  # target positions that are padding


class TokenMetrics:
    """Summed token cross-entropy and token count → loss (nats per token) and perplexity."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.tokens = torch.zeros((), dtype=torch.int64, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        flat, tgt = logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1)
        self.loss_sum += F.cross_entropy(flat, tgt, ignore_index=IGNORE, reduction="sum").double()
        valid = tgt != IGNORE
        self.tokens += valid.sum()
        self.correct += ((flat.argmax(dim=-1) == tgt) & valid).sum()

    def sums(self) -> dict[str, torch.Tensor]:
        """The whole state as tensors of sums and counts, for a strategy to all-reduce in place."""
        return {"loss_sum": self.loss_sum, "tokens": self.tokens, "correct": self.correct}

    def compute(self) -> dict[str, Any]:
        n = int(self.tokens)
        loss = float(self.loss_sum) / max(n, 1)
        return {
            "loss": loss,
            "perplexity": math.exp(min(loss, 700.0)),
            "bits_per_token": loss / math.log(2),
            "token_accuracy": int(self.correct) / max(n, 1),
            "num_tokens": n,
            "num_examples": n,
        }


class LanguageModelingTask:
    """Next-token prediction: batch = (ids (B, T), targets (B, T)); the model maps ids → logits (B, T, V)."""

    name = "language_modeling"

    def __init__(self, label_smoothing: float = 0.0) -> None:
        self.label_smoothing = label_smoothing

    def logits(self, model: nn.Module, x: Any) -> torch.Tensor:
        return model(x)

    def loss(self, model: nn.Module, batch: tuple[Any, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        logits = self.logits(model, x).float()
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            y.reshape(-1),
            ignore_index=IGNORE,
            label_smoothing=self.label_smoothing,
        )

    def new_metrics(self, device: torch.device | str = "cpu") -> TokenMetrics:
        return TokenMetrics(device)

    def eval_batch(self, model: nn.Module, batch: tuple[Any, torch.Tensor], metrics: TokenMetrics) -> None:
        x, y = batch
        metrics.update(self.logits(model, x), y)


class TranslationTask(LanguageModelingTask):
    """Teacher forcing: batch = ((src (B, S), src_lengths (B,), tgt_in (B, T)), tgt_out (B, T) with -100 padding)."""

    name = "translation"

    def logits(self, model: nn.Module, x: Any) -> torch.Tensor:
        src, src_lengths, tgt_in = x
        return model(src, src_lengths, tgt_in)
