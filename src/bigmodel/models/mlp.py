"""MLP for tables: standardised numeric columns and learned embeddings of categorical columns, concatenated, then
Linear → (BatchNorm) → ReLU → Dropout blocks and a linear head (the entity-embedding network of Guo & Berkhahn 2016,
"Entity Embeddings of Categorical Variables").

Input (from `tasks/tabular.py`): `forward(numeric (B, Fn) float, categorical (B, Fc) int64) -> logits (B, K)`;
category index 0 is "not seen in training".
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from bigmodel.models.base import Capability, Classifier
from bigmodel.registry import register_model


class MLPConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hidden: Annotated[list[Annotated[int, Field(ge=1, le=65_536)]], Field(min_length=1, max_length=16)] = [128, 64]
    """Widths of the hidden layers."""
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    batchnorm: bool = True
    """BatchNorm after each hidden Linear (before ReLU)."""
    embedding_dim: Annotated[int, Field(ge=1, le=1024)] | None = None
    """Width of each categorical column's embedding (default: min(16, (cardinality + 1) // 2), fastai's rule)."""


class MLPClassifier(Classifier):
    def __init__(self, cfg: MLPConfig, numeric: int, cardinalities: list[int], num_classes: int) -> None:
        super().__init__()
        dims = [cfg.embedding_dim or min(16, (n + 1) // 2) for n in cardinalities]
        self.embeddings = nn.ModuleList(nn.Embedding(n, d) for n, d in zip(cardinalities, dims, strict=True))
        layers: list[nn.Module] = []
        width = numeric + sum(dims)
        if width == 0:
            raise ValueError("mlp needs at least one feature column")
        for h in cfg.hidden:
            layers += [nn.Linear(width, h, bias=not cfg.batchnorm)]
            layers += [nn.BatchNorm1d(h)] if cfg.batchnorm else []
            layers += [nn.ReLU(), nn.Dropout(cfg.dropout)]
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward_features(self, numeric: torch.Tensor, categorical: torch.Tensor) -> torch.Tensor:
        parts = [numeric] + [emb(categorical[:, j]) for j, emb in enumerate(self.embeddings)]  # each (B, d_j)
        return self.body(torch.cat(parts, dim=1))  # (B, hidden[-1])

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, numeric: torch.Tensor, categorical: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(numeric, categorical))


@register_model(
    "mlp",
    MLPConfig,
    tasks=("tabular_classification",),
    capabilities=(Capability.CLASSIFIER, Capability.EXPORTABLE, Capability.QUANTIZABLE, Capability.EXPLAINABLE),
    description="MLP over standardised numbers and categorical embeddings (tables)",
)
def build_mlp(cfg: MLPConfig, input_shape: Any, num_classes: int) -> MLPClassifier:
    if not isinstance(input_shape, dict) or input_shape.get("kind") != "tabular":
        raise ValueError(f"mlp needs a table (numeric and categorical columns), got input shape {input_shape!r}")
    return MLPClassifier(cfg, len(input_shape["numeric"]), list(input_shape["cardinalities"]), num_classes)
