"""In-memory batching without per-sample Python: index a uint8 tensor, convert, normalise, augment — per batch.

The order of epoch e is a permutation seeded by (seed, e); augmentation is seeded by (seed, e, batch). So the loader
has no hidden state: `epoch(e, start=k)` resumes mid-epoch exactly where an interrupted run stopped.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from bigmodel.config import AugmentConfig
from bigmodel.data.augment import augment_batch, is_identity
from bigmodel.data.sources import ImageSplit
from bigmodel.data.split import mix_seed


class Normalizer:
    """uint8 (B, C, H, W) → float (x/255 - mean) / std, as one fused multiply-add per channel."""

    def __init__(self, mean: list[float], std: list[float], device: torch.device | str = "cpu") -> None:
        self.mean, self.std = list(mean), list(std)
        C = len(mean)
        std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, C, 1, 1)
        self.scale = 1.0 / (255.0 * std_t)
        self.shift = -torch.tensor(mean, dtype=torch.float32, device=device).view(1, C, 1, 1) / std_t

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift, x.to(torch.float32), self.scale)


class BatchLoader:
    def __init__(
        self,
        split: ImageSplit,
        batch_size: int,
        normalizer: Normalizer,
        *,
        shuffle: bool,
        seed: int = 0,
        augment: AugmentConfig | None = None,
        drop_last: bool = False,
        channels_last: bool = False,
        device: torch.device | str = "cpu",
    ) -> None:
        self.x = split.x.to(device)
        self.y = split.y.to(device)
        self.batch_size = batch_size
        self.normalizer = normalizer
        self.shuffle = shuffle
        self.seed = seed
        self.augment = augment if augment is not None and not is_identity(augment) else None
        # Dropping the ragged last batch keeps BatchNorm statistics sane; never drop when it would leave nothing.
        self.drop_last = drop_last and len(self.y) >= batch_size
        self.channels_last = channels_last
        self.device = torch.device(device)

    def __len__(self) -> int:
        n = len(self.y)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def num_examples(self) -> int:
        return len(self.y)

    def order(self, epoch: int) -> torch.Tensor | None:
        if not self.shuffle:
            return None
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 0x5EED))
        return torch.randperm(len(self.y), generator=g).to(self.device)

    def epoch(self, epoch: int = 0, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (x, y) batches of `epoch`, beginning at batch index `start`."""
        perm = self.order(epoch)
        for i in range(start, len(self)):
            lo, hi = i * self.batch_size, min((i + 1) * self.batch_size, len(self.y))
            if perm is None:
                xb, yb = self.x[lo:hi], self.y[lo:hi]
            else:
                idx = perm[lo:hi]
                xb, yb = self.x[idx], self.y[idx]
            if self.augment is not None:
                g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, i))
                xb = augment_batch(xb, self.augment, g)
            xb = self.normalizer(xb)
            if self.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            yield xb, yb

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.epoch(0)
