"""Seeded, stratified splits: the same seed and labels always give the same split."""

from __future__ import annotations

import torch


def mix_seed(*parts: int) -> int:
    """Combine integers into one 63-bit seed (a fixed polynomial hash: stable across runs and Python versions)."""
    h = 0x2545F4914F6CDD1D
    for p in parts:
        h = (h * 0x100000001B3 + (p & 0xFFFFFFFFFFFFFFFF)) & 0x7FFFFFFFFFFFFFFF
    return h


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices into (keep, held_out) with `fraction` of each class held out (at least one if it has ≥2)."""
    g = torch.Generator().manual_seed(seed)
    keep, held = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n = round(fraction * len(idx))
        if fraction > 0 and n == 0 and len(idx) >= 2:
            n = 1
        held.append(idx[:n])
        keep.append(idx[n:])
    return torch.sort(torch.cat(keep)).values, torch.sort(torch.cat(held)).values
