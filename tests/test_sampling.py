"""The sampling plan: order a pure function of (seed, epoch), sharded by (rank, world size) without duplicates,
Poisson sampling, and the three loaders reading through it."""

from __future__ import annotations

import pytest
import torch

from bigmodel.data.loader import BatchLoader, Normalizer, SequenceLoader
from bigmodel.data.sampling import SamplingPlan
from bigmodel.data.sequences import SeqSplit
from bigmodel.data.sources import ImageSplit


def idx(b) -> list[int]:
    return torch.arange(10_000)[b].tolist() if isinstance(b, slice) else b.tolist()


@pytest.mark.parametrize("mode", ["permutation", "oversample", "undersample", "with_replacement", "length_buckets"])
def test_order_is_a_pure_function_of_seed_and_epoch(mode):
    g = torch.Generator().manual_seed(1)
    kw = {"labels": torch.randint(0, 3, (103,), generator=g), "lengths": torch.randint(1, 30, (103,), generator=g)}
    a = SamplingPlan(mode, num_examples=103, batch_size=8, seed=7, **kw)
    b = SamplingPlan(mode, num_examples=103, batch_size=8, seed=7, **kw)
    e0, e1 = [idx(x) for x in a.batches(0)], [idx(x) for x in a.batches(1)]
    assert e0 == [idx(x) for x in b.batches(0)] and e0 != e1
    assert e0 != [idx(x) for x in SamplingPlan(mode, num_examples=103, batch_size=8, seed=8, **kw).batches(0)]
    assert [idx(a.batch(1, i)) for i in range(len(a))] == e1  # one batch alone = the same batch of the epoch
    assert len(e0) == len(a)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("mode", ["sequential", "permutation"])
def test_shards_split_every_global_batch_without_duplicates(mode, world_size):
    n, bs = 101, 10  # not divisible by the batch size or the world size
    ref = SamplingPlan(mode, num_examples=n, batch_size=bs, seed=3)
    ranks = [
        SamplingPlan(mode, num_examples=n, batch_size=bs, seed=3, rank=r, world_size=world_size)
        for r in range(4)[:world_size]
    ]
    assert {len(p) for p in ranks} == {len(ref)}  # every rank steps the same number of times
    for i, glob in enumerate(ref.batches(0)):
        parts = [idx(p.batches(0)[i]) for p in ranks]
        assert sorted(sum(parts, [])) == sorted(idx(glob))  # each example of the global batch on exactly one rank
    if mode == "sequential":  # evaluation: every example exactly once over all ranks, none padded in
        seen = sorted(sum((idx(b) for p in ranks for b in p.batches(0)), []))
        assert seen == list(range(n))


def test_a_bad_rank_is_an_error():
    with pytest.raises(ValueError, match="rank 2"):
        SamplingPlan("sequential", num_examples=5, batch_size=2, rank=2, world_size=2)


def test_poisson_sampling_draws_each_example_independently():
    n, bs = 2000, 50
    plan = SamplingPlan("poisson", num_examples=n, batch_size=bs, seed=0)
    sizes = [len(b) for b in plan.batches(0)]
    assert len(sizes) == n // bs and len(set(sizes)) > 5  # batch sizes vary
    assert abs(sum(sizes) / len(sizes) - bs) < 3  # expected size q * N = batch_size
    assert [idx(b) for b in plan.batches(0)] == [idx(b) for b in plan.batches(0)]
    tiny = SamplingPlan("poisson", num_examples=40, batch_size=1, seed=0)
    assert any(len(b) == 0 for b in tiny.batches(0))  # empty batches happen and are yielded as they are


def test_image_loader_shards_by_rank():
    y = torch.arange(40) % 4
    split = ImageSplit(torch.arange(40, dtype=torch.uint8).view(-1, 1, 1, 1), y)
    norm = Normalizer([0.0], [1 / 255])
    whole = BatchLoader(split, 8, norm, shuffle=True, seed=0, drop_last=True)
    halves = [BatchLoader(split, 8, norm, shuffle=True, seed=0, drop_last=True, rank=r, world_size=2) for r in (0, 1)]
    for (xw, _), (x0, _), (x1, _) in zip(whole.epoch(2), halves[0].epoch(2), halves[1].epoch(2), strict=True):
        assert sorted(torch.cat([x0, x1]).flatten().tolist()) == sorted(xw.flatten().tolist())
        assert len(x0) == len(x1) == 4


def test_sequence_loader_resumes_mid_epoch():
    x = torch.randn(30, 6, 2)
    split = SeqSplit(x, torch.full((30,), 6), torch.arange(30) % 3)
    loader = SequenceLoader(split, 4, shuffle=True, seed=5, drop_last=True)
    full = [b[1].tolist() for b in loader.epoch(1)]
    assert [b[1].tolist() for b in loader.epoch(1, start=3)] == full[3:]
