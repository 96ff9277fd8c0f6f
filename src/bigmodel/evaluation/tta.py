"""Test-time augmentation: average the logits of each image and its horizontal mirror."""

from __future__ import annotations

import torch
from torch import nn


class FlipTTA(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.model(x) + self.model(x.flip(3))) / 2  # (B, K)
