"""Model families. Models know nothing of data files, devices, optimizers or logging.

`build_model` turns a registry name, its options, the input shape and the class count into an `nn.Module`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from bigmodel.registry import get_model


def build_model(name: str, options: dict[str, Any], input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    entry = get_model(name)
    cfg = entry.config_cls.model_validate(options)
    return entry.build(cfg, tuple(input_shape), num_classes)
