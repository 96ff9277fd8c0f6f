"""In-memory batching without per-sample Python: index a uint8 tensor, convert, normalise, augment — per batch.

The order of epoch e comes from the sampling plan (`data/sampling.py`: a pure function of (seed, e), sharded by
rank); augmentation is seeded by (seed, e, batch). So the loader has no hidden state: `epoch(e, start=k)` resumes
mid-epoch exactly where an interrupted run stopped.

Batch k of an epoch is a pure function of (seed, epoch, k), so it can be made anywhere: with `num_workers` > 0 (images
held on the CPU: in memory or on disk) worker processes read, augment and normalise whole batches (a `DataLoader` over
the epoch's batch list, delivered in order) and the numbers are the same as made in the main process, bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from bigmodel.config import AugmentConfig
from bigmodel.data.augment import augment_batch, is_identity, mix_batch, uses_mixing
from bigmodel.data.sampling import SamplingPlan
from bigmodel.data.sequences import SeqSplit
from bigmodel.data.sources import ImageSplit
from bigmodel.data.split import mix_seed
from bigmodel.errors import UserError


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
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
    ) -> None:
        self.x = split.x.to(device)
        self.y = split.y.to(device)
        self._y_cpu = split.y.cpu()  # what worker processes index (they must not touch a GPU)
        # Workers only for images on the CPU: data kept on a GPU is batched there, faster than any worker.
        self.num_workers = num_workers if self.x.device.type == "cpu" else 0
        on_cpu = normalizer is None or normalizer.scale.device.type == "cpu"
        self._normalizer_cpu = normalizer if on_cpu else Normalizer(normalizer.mean, normalizer.std)
        self.batch_size = batch_size
        self.normalizer = normalizer
        self.shuffle = shuffle
        self.seed = seed
        self.augment = augment if augment is not None and not is_identity(augment) else None
        self.mixing = self.augment is not None and uses_mixing(self.augment)
        if self.mixing and num_classes is None:
            raise ValueError("mixup/cutmix need num_classes")
        self.num_classes = num_classes
        self.sampling = sampling
        self.plan = SamplingPlan.for_labels(
            split.y,
            batch_size,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
            sampling=sampling,
            rank=rank,
            world_size=world_size,
        )
        self.channels_last = channels_last
        self.device = torch.device(device)

    def __len__(self) -> int:
        return len(self.plan)

    @property
    def num_examples(self) -> int:
        return len(self.y)

    def order(self, epoch: int) -> torch.Tensor | None:
        """The example indices of `epoch` on this rank (None when batches run in order): the sampling plan's
        seeded permutation or class-balanced draw."""
        if self.plan.mode == "sequential":
            return None
        return torch.cat([torch.as_tensor(b) for b in self.plan.batches(epoch)])

    def epoch(self, epoch: int = 0, start: int = 0) -> Iterator[tuple[Any, torch.Tensor]]:
        """Yield (x, y) batches of `epoch`, beginning at batch index `start`."""
        batches = self.plan.batches(epoch)[start:]
        if self.num_workers and batches:
            yield from self._in_workers(batches, epoch, start)
            return
        if not isinstance(self.x, torch.Tensor):  # on disk (`data/shards.py`): read ahead in a background thread
            yield from self._read_ahead(batches, epoch, start)
            return
        for i, idx in enumerate(batches, start):
            if isinstance(idx, torch.Tensor):
                idx = idx.to(self.device)
            yield self._batch(idx, epoch, i)

    def _read_ahead(self, batches: list[Any], epoch: int, start: int, depth: int = 2) -> Iterator[Any]:
        """The next `depth` batches' images are read while the current one trains (the reads release the GIL).
        Only the reading runs ahead; augmentation stays here, in batch order, so the numbers are the in-memory
        path's."""
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bigmodel-read")
        pending: deque[Any] = deque()
        try:
            for k, idx in enumerate(batches):
                while len(pending) <= depth and k + len(pending) < len(batches):
                    pending.append(pool.submit(self.x.__getitem__, batches[k + len(pending)]))
                yield self._batch(idx, epoch, start + k, pending.popleft().result())
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _in_workers(self, batches: list[Any], epoch: int, start: int) -> Iterator[Any]:
        """`num_workers` processes make whole batches (read, augment, normalise, on the CPU), two each ahead; they
        come back in order and move to the device here."""
        from torch.utils.data import DataLoader

        pin = self.device.type == "cuda" and torch.cuda.is_available()
        dl = DataLoader(
            _EpochBatches(self, batches, epoch, start),
            batch_size=None,
            num_workers=self.num_workers,
            prefetch_factor=2,
            pin_memory=pin,
            # its own generator: iter() draws the workers' base seed, which must not advance the global one (dropout)
            generator=torch.Generator().manual_seed(mix_seed(self.seed, epoch, start)),
        )
        it = iter(dl)
        try:
            for xb, yb in it:
                if self.device.type != "cpu":
                    xb, yb = xb.to(self.device, non_blocking=pin), yb.to(self.device, non_blocking=pin)
                yield xb, yb
        except UserError as e:  # raised in a worker (a bad image file): the DataLoader adds the worker's traceback
            raise type(e)(_worker_message(e)) from None
        finally:
            del it  # an epoch left early (a time limit, an error) stops its workers now

    def _batch(
        self,
        idx: slice | torch.Tensor,
        epoch: int,
        i: int,
        xb: torch.Tensor | None = None,
        in_worker: bool = False,
    ) -> tuple[Any, torch.Tensor]:
        xb, yb = (self.x[idx] if xb is None else xb), (self._y_cpu if in_worker else self.y)[idx]
        if xb.device != self.device and not in_worker:  # images read from disk come to the device a batch at a time
            xb = xb.to(self.device, non_blocking=True)
        g = None
        if self.augment is not None:
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, i))
            xb = augment_batch(xb, self.augment, g)
        normalizer = self._normalizer_cpu if in_worker else self.normalizer
        assert normalizer is not None
        xb = normalizer(xb)
        if self.mixing:
            assert g is not None and self.num_classes is not None and self.augment is not None
            xb, yb = mix_batch(xb, yb, self.num_classes, self.augment, g)
        if self.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        return xb, yb

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.epoch(0)


def _worker_message(e: UserError) -> str:
    """The message of an error a DataLoader worker raised: the DataLoader wraps it in the worker's traceback, which
    ends with `module.ErrorType: message`."""
    text, marker = str(e), f"{type(e).__module__}.{type(e).__qualname__}: "
    at = text.rfind(marker)
    return text[at + len(marker) :].strip() if at >= 0 else text


class _EpochBatches(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Item k = batch `start + k` of `epoch`, made in a worker process (a pure function of seed, epoch and k)."""

    def __init__(self, loader: BatchLoader, batches: list[Any], epoch: int, start: int) -> None:
        self.loader, self.batches, self.epoch, self.start = loader, batches, epoch, start

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int) -> tuple[Any, torch.Tensor]:
        return self.loader._batch(self.batches[k], self.epoch, self.start + k, in_worker=True)


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
        rank: int = 0,
        world_size: int = 1,
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
            rank=rank,
            world_size=world_size,
        )
        self.lengths = split.lengths.to(device)

    def _batch(
        self, idx: slice | torch.Tensor, epoch: int, i: int, xb: torch.Tensor | None = None
    ) -> tuple[Any, torch.Tensor]:
        lengths = self.lengths[idx]
        T = int(lengths.max()) if len(lengths) else 1
        x = self.x[idx] if xb is None else xb.to(self.device)  # xb: read ahead from disk (`data/textshards.py`)
        return (x[:, :T], lengths), self.y[idx]
