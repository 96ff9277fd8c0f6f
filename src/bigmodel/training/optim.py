"""Optimizers and learning-rate schedules.

Schedules are pure functions of the optimizer step (`lr_factor`), so a checkpoint only needs the step to restore them
exactly; the Trainer writes `base_lr * lr_factor(step)` into every param group before each optimizer step.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from bigmodel.config import OptimizerConfig, ScheduleConfig
from bigmodel.models.base import ModelBase, decays


def decay_and_no_decay(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if decays(p) else no_decay).append(p)
    return decay, no_decay


def build_optimizer(cfg: OptimizerConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Two groups (with / without weight decay), or the model's own groups when it defines `optimizer_groups`
    (per-group learning rates: layer-wise decay of a pretrained model); the schedule scales every group alike."""
    own = model.optimizer_groups if isinstance(model, ModelBase) else None
    groups = own(cfg.lr, cfg.weight_decay) if own is not None else None
    if groups is None:
        decay, no_decay = decay_and_no_decay(model)
        groups = [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
    groups = [g for g in groups if g["params"]]
    # foreach=True: one kernel launch per group instead of one per tensor (the default picks it only on CUDA).
    # On CUDA, Adam(W) takes the fused kernel (one launch for the whole update) where every parameter allows it.
    if cfg.name == "sgd":
        momentum = 0.9 if cfg.momentum is None else cfg.momentum
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=momentum, nesterov=cfg.nesterov, foreach=True)
    fast: dict[str, bool] = {"fused": True} if _fusable(groups) else {"foreach": True}
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **fast)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **fast)


def _fusable(groups: list[dict]) -> bool:
    """Plain floating-point CUDA tensors only (sharded DTensors and CPU tensors keep the foreach path)."""
    params = [p for g in groups for p in g["params"]]
    return bool(params) and all(
        p.is_cuda and type(p.data) is torch.Tensor and p.dtype in (torch.float32, torch.float16, torch.bfloat16)
        for p in params
    )


def lr_factor(cfg: ScheduleConfig, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based) of `total_steps`."""
    total_steps = max(total_steps, 1)
    if cfg.name == "onecycle":
        # Smith & Topin 2017: cosine rise from lr/div_factor to lr over pct_start, then cosine fall to lr*min_lr_ratio.
        start, peak, end = 1.0 / cfg.div_factor, 1.0, cfg.min_lr_ratio
        rise = max(int(cfg.pct_start * total_steps), 1)
        if step < rise:
            t = step / rise
            return start + (peak - start) * (1 - math.cos(math.pi * t)) / 2
        t = min((step - rise) / max(total_steps - rise, 1), 1.0)
        return end + (peak - end) * (1 + math.cos(math.pi * t)) / 2
    warm = 1.0
    if cfg.warmup_steps and step < cfg.warmup_steps:
        warm = (step + 1) / (cfg.warmup_steps + 1)
    if cfg.name == "constant":
        return warm
    if cfg.name == "step":
        epoch = step // max(steps_per_epoch, 1)
        return warm * cfg.gamma ** (epoch // cfg.step_size)
    # cosine, after the warm-up
    t = min(max(step - cfg.warmup_steps, 0) / max(total_steps - cfg.warmup_steps, 1), 1.0)
    return warm * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * (1 + math.cos(math.pi * t)) / 2)


def l1_penalty(params: list[nn.Parameter]) -> torch.Tensor:
    return torch.stack([p.abs().sum() for p in params]).sum()
