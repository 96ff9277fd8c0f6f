"""Batched, seeded image augmentation as tensor operations (CPU or GPU; no torchvision).

Every random draw comes from the generator passed in, which the loader seeds from (seed, epoch, batch): a resumed run
draws exactly what the uninterrupted run drew, with no augmentation state to save.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bigmodel.config import AugmentConfig


def random_crop(x: torch.Tensor, padding: int, g: torch.Generator) -> torch.Tensor:
    """Zero-pad by `padding` and crop back to H x W at an independent random offset per image."""
    B, C, H, W = x.shape
    xp = F.pad(x, (padding, padding, padding, padding))  # (B, C, H+2p, W+2p)
    off = torch.randint(0, 2 * padding + 1, (2, B), generator=g).to(x.device)
    rows = off[0, :, None] + torch.arange(H, device=x.device)  # (B, H)
    cols = off[1, :, None] + torch.arange(W, device=x.device)  # (B, W)
    b = torch.arange(B, device=x.device)[:, None, None]
    out = xp.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2)  # (B, C, H, W), channels-last in memory


def horizontal_flip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    flip = (torch.rand(x.shape[0], generator=g) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def augment_batch(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    if cfg.horizontal_flip:
        x = horizontal_flip(x, g)
    if cfg.random_crop_padding:
        x = random_crop(x, cfg.random_crop_padding, g)
    return x


def is_identity(cfg: AugmentConfig) -> bool:
    return not cfg.horizontal_flip and cfg.random_crop_padding == 0
