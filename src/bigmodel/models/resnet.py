"""ResNet-style image classifiers (He et al. 2016, "Deep Residual Learning for Image Recognition").

Basic blocks (two 3x3 convs with BatchNorm) with identity shortcuts, a 1x1 projection where the shape changes, and
stages that halve the resolution. The stem is CPU-friendly in the airbench manner: conv → max-pool → BN → ReLU, so
the first stage already runs at half resolution (on 28x28 input the full-resolution stage costs more in BN and
ReLU traffic than in convolutions).

Presets: `resnet-8` (3 stages x 1 block), `resnet-14` (3 x 2), `resnet-20` (3 x 3, the CIFAR ResNet-20 depth).
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from bigmodel.models.cnn import CONVNET_CAPABILITIES, ImageClassifier
from bigmodel.registry import register_model


class ResNetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    blocks: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=1, max_length=5)] = [1, 1, 1]
    """Basic blocks per stage; each stage after the first halves the resolution."""
    widths: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=1, max_length=5)] = [32, 64, 128]
    stem_pool: bool = True
    """Max-pool in the stem (halves the resolution before the first stage)."""
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def _build(cfg: ResNetConfig, input_shape: tuple[int, int, int], num_classes: int) -> ImageClassifier:
    if len(cfg.blocks) != len(cfg.widths):
        raise ValueError(f"model.blocks has {len(cfg.blocks)} stages but model.widths has {len(cfg.widths)}")
    channels, height, width = input_shape
    halvings = (len(cfg.widths) - 1) + int(cfg.stem_pool)
    if min(height, width) >> halvings < 1:
        raise ValueError(f"this ResNet halves the image {halvings} times; {height}x{width} is too small")
    stem: list[nn.Module] = [nn.Conv2d(channels, cfg.widths[0], 3, padding=1, bias=False)]
    if cfg.stem_pool:
        stem.append(nn.MaxPool2d(2))
    stem += [nn.BatchNorm2d(cfg.widths[0]), nn.ReLU(inplace=True)]
    layers: list[nn.Module] = [*stem]
    in_ch = cfg.widths[0]
    for i, (n, w) in enumerate(zip(cfg.blocks, cfg.widths, strict=True)):
        for b in range(n):
            layers.append(BasicBlock(in_ch, w, stride=2 if (i > 0 and b == 0) else 1))
            in_ch = w
    layers.append(nn.AdaptiveAvgPool2d(1))
    head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(in_ch, num_classes))
    model = ImageClassifier(nn.Sequential(*layers), head)
    for m in model.modules():
        if isinstance(m, BasicBlock):
            nn.init.zeros_(m.bn2.weight)  # zero-init the last BN of each residual branch (Goyal et al. 2017)
    return model


@register_model(
    "resnet",
    ResNetConfig,
    tasks=("image_classification",),
    capabilities=CONVNET_CAPABILITIES,
    description="ResNet: basic blocks per stage.",
)
def build_resnet(cfg: ResNetConfig, input_shape: tuple[int, int, int], num_classes: int) -> ImageClassifier:
    return _build(cfg, input_shape, num_classes)


def _preset(name: str, blocks: list[int]) -> None:
    class Preset(ResNetConfig):
        pass

    Preset.model_fields["blocks"].default = blocks
    Preset.model_rebuild(force=True)
    Preset.__name__ = f"ResNet{sum(blocks) * 2 + 2}Config"

    @register_model(
        name,
        Preset,
        tasks=("image_classification",),
        capabilities=CONVNET_CAPABILITIES,
        description=f"ResNet with {blocks} blocks per stage.",
    )
    def build(cfg: ResNetConfig, input_shape: tuple[int, int, int], num_classes: int) -> ImageClassifier:
        return _build(cfg, input_shape, num_classes)


_preset("resnet-8", [1, 1, 1])
_preset("resnet-14", [2, 2, 2])
_preset("resnet-20", [3, 3, 3])
