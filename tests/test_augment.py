"""Augmentation: shapes, dtypes, label handling (mixup/cutmix), determinism under a seed, identity when disabled."""

from __future__ import annotations

import pytest
import torch

from bigmodel.config import AugmentConfig
from bigmodel.data.augment import augment_batch, is_identity, mix_batch, random_affine, random_erasing
from bigmodel.data.loader import BatchLoader, Normalizer
from bigmodel.data.sources import ImageSplit


def batch(b=8, c=1, h=12, w=12):
    g = torch.Generator().manual_seed(0)
    return torch.randint(1, 256, (b, c, h, w), dtype=torch.uint8, generator=g)


ALL_ON = AugmentConfig(
    horizontal_flip=True, random_crop_padding=2, rotation_degrees=15, translate=0.1, erasing_prob=0.5,
    mixup_alpha=0.4, cutmix_alpha=1.0,
)  # fmt: skip


@pytest.mark.parametrize(
    "cfg",
    [
        AugmentConfig(horizontal_flip=True),
        AugmentConfig(random_crop_padding=3),
        AugmentConfig(rotation_degrees=20),
        AugmentConfig(translate=0.2),
        AugmentConfig(erasing_prob=1.0),
        ALL_ON,
    ],
)
def test_shape_dtype_and_determinism(cfg):
    x = batch(c=3)
    a = augment_batch(x, cfg, torch.Generator().manual_seed(5))
    b = augment_batch(x, cfg, torch.Generator().manual_seed(5))
    c = augment_batch(x, cfg, torch.Generator().manual_seed(6))
    assert a.shape == x.shape and a.dtype == torch.uint8
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_identity_when_disabled():
    x = batch()
    cfg = AugmentConfig()
    assert is_identity(cfg)
    assert torch.equal(augment_batch(x, cfg, torch.Generator().manual_seed(0)), x)
    assert torch.equal(random_affine(x, 0.0, 0.0, torch.Generator()), x)  # uint8: resampling rounds back exactly
    assert torch.equal(random_erasing(x, 0.0, (0.1, 0.2), torch.Generator()), x)
    xf, y = x.float(), torch.arange(8) % 3
    mixed, target = mix_batch(xf, y, 3, AugmentConfig(mixup_alpha=0.4, mix_prob=0.0), torch.Generator())
    assert torch.equal(mixed, xf) and torch.equal(target, torch.nn.functional.one_hot(y, 3).float())


def test_rotation_keeps_a_centred_disk_and_translation_moves_content():
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    disk = (((yy - 7.5) ** 2 + (xx - 7.5) ** 2) < 25).float().mul(255).expand(8, 1, 16, 16)
    rotated = random_affine(disk, 180.0, 0.0, torch.Generator().manual_seed(0))
    # A disk is rotation-invariant up to bilinear resampling at its rim; a half-plane is not.
    assert (rotated - disk).abs().mean() < 0.15 * disk.mean()
    half = (xx < 8).float().mul(255).expand(8, 1, 16, 16)
    turned = random_affine(half, 180.0, 0.0, torch.Generator().manual_seed(0))
    assert (turned - half).abs().mean() > 0.3 * half.mean()
    shifted = random_affine(torch.ones(64, 1, 8, 8), 0.0, 0.25, torch.Generator().manual_seed(1))
    assert (shifted.sum(dim=(1, 2, 3)) < 64).float().mean() > 0.5  # most images moved content out of frame


def test_erasing_zeroes_one_rectangle():
    x = torch.full((16, 1, 10, 10), 7, dtype=torch.uint8)
    out = random_erasing(x, 1.0, (0.1, 0.3), torch.Generator().manual_seed(0))
    for img in out[:, 0]:
        zero = (img == 0).nonzero()
        rows, cols = zero[:, 0], zero[:, 1]
        area = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert len(zero) == area  # a filled rectangle
        assert 0.05 * 100 <= len(zero) <= 0.45 * 100


@pytest.mark.parametrize("which", ["mixup", "cutmix"])
def test_mixed_targets_weigh_each_source_by_its_share_of_the_image(which):
    cfg = AugmentConfig(mixup_alpha=0.4 if which == "mixup" else 0.0, cutmix_alpha=1.0 if which == "cutmix" else 0.0)
    x = torch.stack([torch.full((1, 8, 8), float(i)) for i in range(6)])  # image i is the constant i
    y = torch.arange(6)  # one class per image, so target[i, k] is image k's share in mixed image i
    for seed in range(5):
        mixed, target = mix_batch(x, y, 6, cfg, torch.Generator().manual_seed(seed))
        assert mixed.shape == x.shape and target.shape == (6, 6)
        torch.testing.assert_close(target.sum(1), torch.ones(6))
        expected = (target * torch.arange(6.0)).sum(1)  # the share-weighted mean of the source images
        torch.testing.assert_close(mixed.mean(dim=(1, 2, 3)), expected)


def test_loader_mixing_is_seeded_and_gives_soft_targets():
    split = ImageSplit(batch(b=40), torch.arange(40) % 4)
    cfg = AugmentConfig(mixup_alpha=0.4, horizontal_flip=True)
    mk = lambda: BatchLoader(split, 8, Normalizer([0.5], [0.2]), shuffle=True, seed=1, augment=cfg, num_classes=4)  # noqa: E731
    a, b = list(mk().epoch(2)), list(mk().epoch(2))
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b, strict=True))
    assert a[0][1].shape == (8, 4) and a[0][1].dtype == torch.float32
    assert list(mk().epoch(2, start=3))[0][1].equal(a[3][1])
