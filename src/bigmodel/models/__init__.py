"""Model families. Models know nothing of data files, devices, optimizers or logging.

`build_model` turns a registry name, its options, the input shape and the class count into an `nn.Module`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from bigmodel.registry import get_model


def build_model(name: str, options: dict[str, Any], input_shape: Any, num_classes: int) -> nn.Module:
    """`input_shape`: (C, H, W) for images; a dict for sequence and text inputs (see models/sequence.py)."""
    entry = get_model(name)
    cfg = entry.config_cls.model_validate(options)
    return entry.build(cfg, input_shape if isinstance(input_shape, dict) else tuple(input_shape), num_classes)
