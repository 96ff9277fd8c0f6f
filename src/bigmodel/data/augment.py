"""Batched, seeded image augmentation as tensor operations (CPU or GPU; no torchvision).

Every random draw comes from the generator passed in, which the loader seeds from (seed, epoch, batch): a resumed run
draws exactly what the uninterrupted run drew, with no augmentation state to save.

Geometric and erasing transforms work on the uint8 batch; mixup and cutmix (Zhang et al. 2018; Yun et al. 2019) mix
images *and* targets, returning soft targets (B, K) that the classification loss takes as class probabilities, which
is exactly the mixed loss `lam * CE(y_a) + (1 - lam) * CE(y_b)`.
"""

from __future__ import annotations

import math

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


def random_affine(x: torch.Tensor, degrees: float, translate: float, g: torch.Generator) -> torch.Tensor:
    """Rotate by U(-degrees, degrees) and shift by U(-translate, translate) of the size, per image (bilinear,
    zero fill)."""
    B = x.shape[0]
    angle = (torch.rand(B, generator=g) * 2 - 1) * math.radians(degrees)
    shift = (torch.rand(B, 2, generator=g) * 2 - 1) * translate * 2  # affine_grid coordinates span [-1, 1]
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    theta = theta.to(x.device)  # (B, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.round_().clamp_(0, 255).to(x.dtype) if x.dtype == torch.uint8 else out


def random_erasing(x: torch.Tensor, p: float, scale: tuple[float, float], g: torch.Generator) -> torch.Tensor:
    """Cutout / random erasing (Zhong et al. 2017): with probability p, zero one random rectangle per image whose
    area is U(scale) of the image and aspect ratio log-uniform in [0.3, 3.3]."""
    B, C, H, W = x.shape
    apply = torch.rand(B, generator=g) < p
    area = (torch.rand(B, generator=g) * (scale[1] - scale[0]) + scale[0]) * H * W
    log_r = torch.rand(B, generator=g) * (math.log(3.3) - math.log(0.3)) + math.log(0.3)
    ratio = torch.exp(log_r)
    h = torch.sqrt(area * ratio).round().clamp(1, H).long()
    w = torch.sqrt(area / ratio).round().clamp(1, W).long()
    top = (torch.rand(B, generator=g) * (H - h + 1)).long()
    left = (torch.rand(B, generator=g) * (W - w + 1)).long()
    rows = torch.arange(H)[None, :]
    cols = torch.arange(W)[None, :]
    mask_r = (rows >= top[:, None]) & (rows < (top + h)[:, None])  # (B, H)
    mask_c = (cols >= left[:, None]) & (cols < (left + w)[:, None])  # (B, W)
    mask = (mask_r[:, :, None] & mask_c[:, None, :] & apply[:, None, None]).to(x.device)  # (B, H, W)
    return x.masked_fill(mask[:, None], 0)


def _beta(alpha: float, g: torch.Generator) -> float:
    """A Beta(alpha, alpha) draw from the seeded generator (two Gamma draws via numpy, seeded from `g`)."""
    import numpy as np

    rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=g)))
    return float(rng.beta(alpha, alpha))


def mix_batch(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, cfg: AugmentConfig, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or cutmix on a normalised float batch → (mixed x, soft targets (B, K)). Each batch picks one of the
    enabled methods with equal chance, and applies it with probability `cfg.mix_prob`."""
    target = F.one_hot(y, num_classes).to(torch.float32)
    methods = [m for m, a in (("mixup", cfg.mixup_alpha), ("cutmix", cfg.cutmix_alpha)) if a > 0]
    if not methods or float(torch.rand(1, generator=g)) >= cfg.mix_prob:
        return x, target
    method = methods[int(torch.randint(0, len(methods), (1,), generator=g))]
    perm = torch.randperm(x.shape[0], generator=g).to(x.device)
    if method == "mixup":
        lam = _beta(cfg.mixup_alpha, g)
        x = x * lam + x[perm] * (1 - lam)
    else:
        lam = _beta(cfg.cutmix_alpha, g)
        H, W = x.shape[2], x.shape[3]
        cut_h, cut_w = int(H * math.sqrt(1 - lam)), int(W * math.sqrt(1 - lam))
        cy, cx = int(torch.randint(0, H, (1,), generator=g)), int(torch.randint(0, W, (1,), generator=g))
        y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, H)
        x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, W)
        x = x.clone()
        x[:, :, y0:y1, x0:x1] = x[perm][:, :, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (H * W)  # the area actually pasted
    return x, target * lam + target[perm] * (1 - lam)


def augment_batch(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """The per-image transforms, on the uint8 batch, in a fixed order: flip, crop, affine, erasing."""
    if cfg.horizontal_flip:
        x = horizontal_flip(x, g)
    if cfg.random_crop_padding:
        x = random_crop(x, cfg.random_crop_padding, g)
    if cfg.rotation_degrees or cfg.translate:
        x = random_affine(x, cfg.rotation_degrees, cfg.translate, g)
    if cfg.erasing_prob:
        x = random_erasing(x, cfg.erasing_prob, tuple(cfg.erasing_scale), g)  # type: ignore[arg-type]
    return x


def is_identity(cfg: AugmentConfig) -> bool:
    return not (
        cfg.horizontal_flip
        or cfg.random_crop_padding
        or cfg.rotation_degrees
        or cfg.translate
        or cfg.erasing_prob
        or uses_mixing(cfg)
    )


def uses_mixing(cfg: AugmentConfig) -> bool:
    return (cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0) and cfg.mix_prob > 0
