"""In-memory batching without per-sample Python: index a uint8 tensor, convert, normalise, augment — per batch.

The order of epoch e is a permutation seeded by (seed, e); augmentation is seeded by (seed, e, batch). So the loader
has no hidden state: `epoch(e, start=k)` resumes mid-epoch exactly where an interrupted run stopped.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from bigmodel.config import AugmentConfig
from bigmodel.data.augment import augment_batch, is_identity, mix_batch, uses_mixing
from bigmodel.data.sequences import SeqSplit
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
        normalizer: Normalizer | None,
        *,
        shuffle: bool,
        seed: int = 0,
        augment: AugmentConfig | None = None,
        drop_last: bool = False,
        channels_last: bool = False,
        device: torch.device | str = "cpu",
        num_classes: int | None = None,
        sampling: str = "none",
    ) -> None:
        self.x = split.x.to(device)
        self.y = split.y.to(device)
        self.batch_size = batch_size
        self.normalizer = normalizer
        self.shuffle = shuffle
        self.seed = seed
        self.augment = augment if augment is not None and not is_identity(augment) else None
        self.mixing = self.augment is not None and uses_mixing(self.augment)
        if self.mixing and num_classes is None:
            raise ValueError("mixup/cutmix need num_classes")
        self.num_classes = num_classes
        if sampling not in ("none", "oversample", "undersample"):
            raise ValueError(f"unknown sampling {sampling!r}")
        self.sampling = sampling
        counts = torch.bincount(split.y) if len(split.y) else torch.zeros(0, dtype=torch.long)
        present = counts[counts > 0]
        # Balanced sampling draws every class equally often: the epoch is K x (largest | smallest class).
        self.epoch_size = len(split.y)
        if sampling == "oversample":
            self.epoch_size = int(present.max()) * len(present)
        elif sampling == "undersample":
            self.epoch_size = int(present.min()) * len(present)
        self._class_index = [torch.nonzero(split.y == c).flatten() for c in range(len(counts)) if counts[c] > 0]
        # Dropping the ragged last batch keeps BatchNorm statistics sane; never drop when it would leave nothing.
        self.drop_last = drop_last and self.epoch_size >= batch_size
        self.channels_last = channels_last
        self.device = torch.device(device)

    def __len__(self) -> int:
        n = self.epoch_size
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def num_examples(self) -> int:
        return len(self.y)

    def order(self, epoch: int) -> torch.Tensor | None:
        """The example indices of `epoch`: a seeded permutation, or a seeded class-balanced draw."""
        if not self.shuffle and self.sampling == "none":
            return None
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 0x5EED))
        if self.sampling == "none":
            return torch.randperm(len(self.y), generator=g).to(self.device)
        per_class = self.epoch_size // len(self._class_index)
        picks = []
        for idx in self._class_index:
            if self.sampling == "oversample":  # every example once, the rest drawn with replacement
                extra = idx[torch.randint(0, len(idx), (per_class - len(idx),), generator=g)]
                picks.append(torch.cat([idx, extra]))
            else:  # undersample: a fresh subset of each class every epoch
                picks.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
        order = torch.cat(picks)
        return order[torch.randperm(len(order), generator=g)].to(self.device)

    def epoch(self, epoch: int = 0, start: int = 0) -> Iterator[tuple[Any, torch.Tensor]]:
        """Yield (x, y) batches of `epoch`, beginning at batch index `start`."""
        perm = self.order(epoch)
        n = len(self.y) if perm is None else len(perm)
        for i in range(start, len(self)):
            lo, hi = i * self.batch_size, min((i + 1) * self.batch_size, n)
            yield self._batch(slice(lo, hi) if perm is None else perm[lo:hi], epoch, i)

    def _batch(self, idx: slice | torch.Tensor, epoch: int, i: int) -> tuple[Any, torch.Tensor]:
        xb, yb = self.x[idx], self.y[idx]
        g = None
        if self.augment is not None:
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, i))
            xb = augment_batch(xb, self.augment, g)
        assert self.normalizer is not None
        xb = self.normalizer(xb)
        if self.mixing:
            assert g is not None and self.num_classes is not None and self.augment is not None
            xb, yb = mix_batch(xb, yb, self.num_classes, self.augment, g)
        if self.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        return xb, yb

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.epoch(0)


class SequenceLoader(BatchLoader):
    """Batches of padded sequences: x is `(values, lengths)`, values (B, T_b, F) float or (B, T_b) token ids, cut to
    the longest sequence in the batch (so short batches cost less). Same seeded order and balancing as images."""

    def __init__(
        self,
        split: SeqSplit,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool = False,
        device: torch.device | str = "cpu",
        sampling: str = "none",
    ) -> None:
        super().__init__(
            split,  # type: ignore[arg-type]
            batch_size,
            None,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
            device=device,
            sampling=sampling,
        )
        self.lengths = split.lengths.to(device)

    def _batch(self, idx: slice | torch.Tensor, epoch: int, i: int) -> tuple[Any, torch.Tensor]:
        lengths = self.lengths[idx]
        T = int(lengths.max()) if len(lengths) else 1
        return (self.x[idx][:, :T], lengths), self.y[idx]
