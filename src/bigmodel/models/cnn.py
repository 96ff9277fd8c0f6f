"""Convolutional image classifiers.

- `seed-cnn`: the seed documents' two-conv CNN (conv 3x3 → ReLU → maxpool 2, twice, then fc → 128 → classes),
  with the flatten size computed from the input shape. The documents hard-code `64*6*6`, which is wrong for 32x32
  input (two 2x2 pools give 8x8) and silently mixes samples in `view(-1, ...)`.
- `cnn-small`: a fast, strong default (airbench-style stages of conv → pool → BN → ReLU → conv → BN → ReLU, global
  average pooling, dropout, linear head), sized for a 2-core CPU: Fashion-MNIST ≥ 92% test accuracy in under two
  minutes (see recipes/quickstart.yaml).

Contract (all classifiers): `forward(x) -> logits`, `forward_features(x) -> (B, F)`, `forward_head(features)`.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from bigmodel.models.base import Capability, ConvClassifier
from bigmodel.registry import register_model


# --------------------------------------------------------------------------------------------------------- configs
class SeedCNNConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    conv1_channels: Annotated[int, Field(ge=1)] = 32
    conv2_channels: Annotated[int, Field(ge=1)] = 64
    hidden: Annotated[int, Field(ge=1)] = 128
    kernel_size: Annotated[int, Field(ge=1, le=7)] = 3
    activation: Literal["relu", "tanh"] = "relu"
    """`tanh`: bounded activations keep per-example gradients small, which is what DP-SGD's clipping wants
    (Papernot et al. 2021, "Tempered Sigmoid Activations for Deep Learning with Differential Privacy")."""


class CNNSmallConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    widths: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=1, max_length=6)] = [24, 48, 96]
    """Channels of each stage (two 3x3 convs per stage; each stage halves the resolution)."""
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.2
    batchnorm: bool = True
    pool_first: bool = True
    """True (airbench-style): conv → max-pool → BN → ReLU → conv → BN → ReLU in every stage. Normalising and
    activating after the pool touches 4x fewer values, which is where a small convnet spends its CPU time (BN and
    ReLU backward were 40% of a step, convolutions 20%, in a profile of the VGG-style layout on 2 cores).
    False (VGG-style): stage 1 is one conv; later stages max-pool first, then two convs."""


# ------------------------------------------------------------------------------------------------------- blocks
def conv_bn_relu(in_ch: int, out_ch: int, batchnorm: bool = True) -> list[nn.Module]:
    # With BatchNorm right after, the conv bias is redundant (BN's shift absorbs it).
    layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=not batchnorm)]
    if batchnorm:
        layers.append(nn.BatchNorm2d(out_ch))
    layers.append(nn.ReLU(inplace=True))
    return layers


CONVNET_CAPABILITIES = (
    Capability.CLASSIFIER,
    Capability.CONVNET,
    Capability.EXPORTABLE,
    Capability.QUANTIZABLE,
    Capability.EXPLAINABLE,
)


class ImageClassifier(ConvClassifier):
    """`features` → flatten → `head`; the split every classifier exposes for explain and compress."""

    def __init__(self, features: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.features = features
        self.head = head

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).flatten(1)  # (B, F)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)  # (B, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def cam_layer(self) -> nn.Module:
        """The last module with a spatial output: the one before the global average pool (or the last one)."""
        last = self.features[-1]
        return self.features[-2] if isinstance(last, nn.AdaptiveAvgPool2d) else last


# ------------------------------------------------------------------------------------------------------- models
@register_model(
    "seed-cnn",
    SeedCNNConfig,
    tasks=("image_classification",),
    capabilities=(*CONVNET_CAPABILITIES, Capability.PRUNABLE),
    description="The seed documents' CNN: 2x(conv 3x3, ReLU, maxpool 2), fc 128, fc classes; flatten size computed.",
)
def build_seed_cnn(cfg: SeedCNNConfig, input_shape: tuple[int, int, int], num_classes: int) -> ImageClassifier:
    channels, height, width = input_shape
    if height < 4 or width < 4:
        raise ValueError(f"seed-cnn needs images of at least 4x4 (two 2x2 pools), got {height}x{width}")
    pad = cfg.kernel_size // 2
    act = nn.Tanh if cfg.activation == "tanh" else nn.ReLU
    features = nn.Sequential(
        nn.Conv2d(channels, cfg.conv1_channels, cfg.kernel_size, padding=pad),
        act(),
        nn.MaxPool2d(2),
        nn.Conv2d(cfg.conv1_channels, cfg.conv2_channels, cfg.kernel_size, padding=pad),
        act(),
        nn.MaxPool2d(2),
    )
    # Each 'same' conv keeps H x W and each pool floors it by 2: 28 → 14 → 7, 32 → 16 → 8 (not the documents' 6).
    flat = cfg.conv2_channels * (height // 2 // 2) * (width // 2 // 2)
    head = nn.Sequential(nn.Linear(flat, cfg.hidden), act(), nn.Linear(cfg.hidden, num_classes))
    return ImageClassifier(features, head)


@register_model(
    "cnn-small",
    CNNSmallConfig,
    tasks=("image_classification",),
    capabilities=(*CONVNET_CAPABILITIES, Capability.PRUNABLE),
    description="Fast default convnet: conv-BN-ReLU stages, max-pool between, global average pool, dropout, linear.",
)
def build_cnn_small(cfg: CNNSmallConfig, input_shape: tuple[int, int, int], num_classes: int) -> ImageClassifier:
    channels, height, width_px = input_shape
    pools = len(cfg.widths) if cfg.pool_first else len(cfg.widths) - 1
    if min(height, width_px) >> pools < 1:
        raise ValueError(
            f"cnn-small with {len(cfg.widths)} stages halves the image {pools} times; {height}x{width_px} is too small "
            f"(use fewer model.widths or a larger data.image_size)"
        )
    layers: list[nn.Module] = []
    in_ch = channels
    for i, width in enumerate(cfg.widths):
        if cfg.pool_first:
            layers += [nn.Conv2d(in_ch, width, 3, padding=1, bias=not cfg.batchnorm), nn.MaxPool2d(2)]
            layers += ([nn.BatchNorm2d(width)] if cfg.batchnorm else []) + [nn.ReLU(inplace=True)]
            layers += conv_bn_relu(width, width, cfg.batchnorm)
        else:
            if i > 0:
                layers.append(nn.MaxPool2d(2))
            layers += conv_bn_relu(in_ch, width, cfg.batchnorm)
            if i > 0:
                layers += conv_bn_relu(width, width, cfg.batchnorm)
        in_ch = width
    layers.append(nn.AdaptiveAvgPool2d(1))  # (B, C, 1, 1) whatever the input size
    head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(in_ch, num_classes))
    return ImageClassifier(nn.Sequential(*layers), head)
