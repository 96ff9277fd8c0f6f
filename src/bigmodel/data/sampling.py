"""The sampling plan: which examples make up batch i of epoch e, on this process.

Every loader (images / sequences / text, language-model windows, translation pairs) asks one `SamplingPlan` for its
batches, so the rules hold everywhere:
- the order of epoch e is a pure function of (seed, e) — no hidden state, so `batches(e)[k:]` resumes mid-epoch
  exactly and a checkpoint only needs (epoch, batch position);
- sharding by (rank, world_size) splits each *global* batch across processes (rank r takes positions r, r + W, ...),
  so the global order, the global batch and the data position in global samples do not depend on the number of
  processes, and evaluation counts every example exactly once (no padding duplicates);
- modes: `sequential` (evaluation), `permutation` (a seeded shuffle per epoch), `oversample` / `undersample` (every
  class equally often, seeded per epoch), `with_replacement` (each batch drawn uniformly with replacement, seeded by
  (seed, e, i): language-model windows), `length_buckets` (similar lengths batched together, batches shuffled:
  translation) and `poisson` (each example joins batch i independently with probability batch_size / N, seeded by
  (seed, e, i): the sampling DP-SGD's privacy accounting assumes; batches vary in size and may be empty).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from bigmodel.data.split import mix_seed

Mode = Literal[
    "sequential", "permutation", "oversample", "undersample", "with_replacement", "length_buckets", "poisson"
]
Batch = slice | torch.Tensor  # indices into the split (a slice for sequential batches: views, no gather)

_PERMUTATION_SALT = 0x5EED  # keeps the image/sequence/text order of runs made before the plan existed


@dataclass
class SamplingPlan:
    """Batches of example indices for one epoch of one split, on process `rank` of `world_size`."""

    mode: Mode
    num_examples: int
    batch_size: int
    seed: int = 0
    drop_last: bool = False
    labels: torch.Tensor | None = None  # oversample / undersample: the class of each example
    lengths: torch.Tensor | None = None  # length_buckets: the length of each example
    num_batches: int | None = None  # with_replacement: batches per epoch (default: one pass's worth)
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in [0, world_size {self.world_size})")
        if self.mode in ("oversample", "undersample"):
            if self.labels is None:
                raise ValueError(f"sampling mode {self.mode!r} needs labels")
            counts = torch.bincount(self.labels) if len(self.labels) else torch.zeros(0, dtype=torch.long)
            present = counts[counts > 0]
            self._class_index = [torch.nonzero(self.labels == c).flatten() for c in range(len(counts)) if counts[c]]
            # Balanced sampling draws every class equally often: the epoch is K x (largest | smallest class).
            pick = present.max() if self.mode == "oversample" else present.min()
            self.epoch_size = int(pick) * len(present) if len(present) else 0
        else:
            self.epoch_size = self.num_examples
        if self.mode == "length_buckets" and self.lengths is None:
            raise ValueError("sampling mode 'length_buckets' needs lengths")
        # Dropping the ragged last batch keeps BatchNorm statistics sane; never drop when it would leave nothing.
        self.drop_last = self.drop_last and self.epoch_size >= self.batch_size

    @classmethod
    def for_labels(
        cls,
        labels: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool = False,
        sampling: str = "none",
        rank: int = 0,
        world_size: int = 1,
    ) -> SamplingPlan:
        """The plan of a labelled split: in order, shuffled, or class-balanced (`sampling` oversample/undersample)."""
        if sampling not in ("none", "oversample", "undersample", "poisson"):
            raise ValueError(f"unknown sampling {sampling!r}")
        mode = sampling if sampling != "none" else ("permutation" if shuffle else "sequential")
        return cls(
            mode,  # type: ignore[arg-type]
            num_examples=len(labels),
            batch_size=batch_size,
            seed=seed,
            drop_last=drop_last,
            labels=labels if sampling in ("oversample", "undersample") else None,
            rank=rank,
            world_size=world_size,
        )

    def __len__(self) -> int:
        """Batches per epoch (the same on every rank: each rank takes its part of every global batch)."""
        if self.mode == "with_replacement":
            return self.num_batches or max(1, self.num_examples // self.batch_size)
        if self.mode == "poisson":
            return max(1, self.num_examples // self.batch_size)
        n = self.epoch_size
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def batches(self, epoch: int) -> list[Batch]:
        """This rank's batches of `epoch`, in order."""
        return [self._shard(b) for b in self._global(epoch)]

    def batch(self, epoch: int, i: int) -> Batch:
        """Batch `i` of `epoch` alone (the per-batch seeded modes draw it without the rest of the epoch)."""
        if self.mode in ("with_replacement", "poisson"):
            return self._shard(self._draw(epoch, i))
        return self.batches(epoch)[i]

    # ------------------------------------------------------------------------------------------------------ modes
    def _generator(self, *parts: int) -> torch.Generator:
        return torch.Generator().manual_seed(mix_seed(self.seed, *parts))

    def _global(self, epoch: int) -> list[Batch]:
        n, bs, count = self.epoch_size, self.batch_size, len(self)
        if self.mode == "sequential":
            return [slice(i * bs, min((i + 1) * bs, n)) for i in range(count)]
        if self.mode in ("with_replacement", "poisson"):
            return [self._draw(epoch, i) for i in range(count)]
        if self.mode == "length_buckets":
            return self._length_buckets(epoch)
        order = self._order(epoch)
        return [order[i * bs : min((i + 1) * bs, len(order))] for i in range(count)]

    def _order(self, epoch: int) -> torch.Tensor:
        g = self._generator(epoch, _PERMUTATION_SALT)
        if self.mode == "permutation":
            return torch.randperm(self.num_examples, generator=g)
        per_class = self.epoch_size // len(self._class_index)
        picks = []
        for idx in self._class_index:
            if self.mode == "oversample":  # every example once, the rest drawn with replacement
                extra = idx[torch.randint(0, len(idx), (per_class - len(idx),), generator=g)]
                picks.append(torch.cat([idx, extra]))
            else:  # undersample: a fresh subset of each class every epoch
                picks.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
        order = torch.cat(picks)
        return order[torch.randperm(len(order), generator=g)]

    def _draw(self, epoch: int, i: int) -> torch.Tensor:
        g = self._generator(epoch, i)
        if self.mode == "with_replacement":
            return torch.randint(0, self.num_examples, (self.batch_size,), generator=g)
        q = self.batch_size / max(self.num_examples, 1)
        return torch.nonzero(torch.rand(self.num_examples, generator=g) < q).flatten()

    def _length_buckets(self, epoch: int) -> list[Batch]:
        """Chunks of 50 batches sorted by length and cut into batches; the batches shuffled (less padding)."""
        assert self.lengths is not None
        n, bs = self.num_examples, self.batch_size
        g = self._generator(epoch)
        perm = torch.randperm(n, generator=g)
        chunk = bs * 50
        batches = []
        for i in range(0, n, chunk):
            idx = perm[i : i + chunk]
            idx = idx[torch.argsort(self.lengths[idx], stable=True)]
            batches += [idx[j : j + bs] for j in range(0, len(idx), bs)]
        if self.drop_last:
            batches = [b for b in batches if len(b) == bs]
            while len(batches) < len(self):  # chunk remainders: refill from the start (rare)
                batches.append(perm[:bs])
            batches = batches[: len(self)]
        order = torch.randperm(len(batches), generator=g).tolist()
        return [batches[i] for i in order]

    def _shard(self, batch: Batch) -> Batch:
        if self.world_size == 1:
            return batch
        if isinstance(batch, slice):
            return slice(batch.start + self.rank, batch.stop, self.world_size)
        return batch[self.rank :: self.world_size]
