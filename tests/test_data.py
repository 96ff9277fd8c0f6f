"""Data: IDX and CIFAR-binary files, lookup and download (against a local HTTP server), image folders and CSVs,
splits, batching."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from bigmodel.config import AugmentConfig, ImageDataConfig
from bigmodel.data import sources, standard
from bigmodel.data.download import download
from bigmodel.data.idx import read_idx, write_idx
from bigmodel.data.loader import BatchLoader, Normalizer
from bigmodel.data.sources import ImageSplit, load_data
from bigmodel.data.split import stratified_split
from bigmodel.errors import UserError
from conftest import make_image_folder, write_cifar_fixture, write_fashion_fixture


# ------------------------------------------------------------------------------------------------------------ IDX
@pytest.mark.parametrize("name", ["x.idx", "x.idx.gz"])
def test_idx_round_trip(tmp_path, name):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / name, a)
    np.testing.assert_array_equal(read_idx(tmp_path / name), a)


def test_idx_errors_name_the_file(tmp_path):
    (tmp_path / "junk").write_bytes(b"hello world")
    with pytest.raises(UserError, match="junk: not an IDX file"):
        read_idx(tmp_path / "junk")
    write_idx(tmp_path / "short", np.zeros((4, 4), np.uint8))
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-3])
    with pytest.raises(UserError, match="short: IDX data is 13 bytes"):
        read_idx(tmp_path / "short")
    (tmp_path / "bad.gz").write_bytes(b"\x1f\x8b\x08garbage")
    with pytest.raises(UserError, match="bad.gz: cannot read a gzipped IDX"):
        read_idx(tmp_path / "bad.gz")


def test_fashion_mnist_from_a_folder(tmp_path):
    write_fashion_fixture(tmp_path / "fm")
    ds = load_data(ImageDataConfig(source="fashion_mnist", path=tmp_path / "fm", val_fraction=0.1), seed=0)
    assert ds.input_shape == (1, 28, 28) and ds.labels[0] == "T-shirt/top"
    assert len(ds.train) == 50 and len(ds.val) == 10 and len(ds.test) == 20  # 6 per class: round(0.6) = 1 each
    with pytest.raises(UserError, match="expected the four Fashion-MNIST IDX files"):
        load_data(ImageDataConfig(source="fashion_mnist", path=tmp_path), seed=0)


@pytest.fixture
def http_server(tmp_path):
    """Serve tmp_path/www on loopback (the real download code, a local server)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a, **k: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def patch_spec(monkeypatch, key, **changes):
    spec = standard.IDX_SETS[key]
    monkeypatch.setitem(standard.IDX_SETS, key, dataclasses.replace(spec, **changes))


@pytest.mark.parametrize("key", ["fashion_mnist", "mnist", "kmnist"])
def test_idx_set_download_with_checksums(tmp_path, http_server, monkeypatch, key):
    www, url = http_server
    files = write_fashion_fixture(www)
    md5s = {name: hashlib.md5(data).hexdigest() for name, data in files.items()}
    patch_spec(monkeypatch, key, files=md5s, local_dirs=[])
    cfg = ImageDataConfig(source=key, cache_dir=tmp_path / "cache")
    train, test, labels = sources.load_standard(cfg, mirrors=["http://127.0.0.1:9/", url])  # first mirror is dead
    assert labels == standard.IDX_SETS[key].labels
    assert len(train) == 60 and len(test) == 20
    cached = tmp_path / "cache" / key
    assert sorted(p.name for p in cached.iterdir()) == sorted(files)
    # A second load uses the cache: the server's copy may go away.
    for p in www.iterdir():
        p.unlink()
    train2, _, _ = sources.load_standard(cfg, mirrors=[url])
    assert torch.equal(train.x, train2.x)


def test_download_from_a_local_file_url(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"payload")
    md5 = hashlib.md5(b"payload").hexdigest()
    out = download([src.as_uri()], tmp_path / "cache" / "f.bin", md5=md5)
    assert out.read_bytes() == b"payload"
    with pytest.raises(UserError, match=r"f2.bin \(.*checksum mismatch"):
        download([src.as_uri()], tmp_path / "cache" / "f2.bin", md5="1" * 32)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["f.bin"]  # nothing partial left


def test_download_rejects_a_bad_checksum_and_leaves_nothing(tmp_path, http_server):
    www, url = http_server
    (www / "f.bin").write_bytes(b"tampered")
    with pytest.raises(UserError, match="checksum mismatch"):
        download([url + "f.bin"], tmp_path / "dl" / "f.bin", md5="0" * 32)
    assert not any((tmp_path / "dl").iterdir())


def test_offline_without_a_copy_says_how_to_get_it(tmp_path, monkeypatch):
    patch_spec(monkeypatch, "fashion_mnist", local_dirs=[])
    cfg = ImageDataConfig(source="fashion_mnist", cache_dir=tmp_path / "cache")
    with pytest.raises(UserError, match=r"Fashion-MNIST: could not download .*apt-get install dataset-fashion-mnist"):
        sources.load_standard(cfg, mirrors=["http://127.0.0.1:9/"])
    with pytest.raises(UserError, match="data.download is off"):
        sources.load_standard(ImageDataConfig(source="fashion_mnist", cache_dir=tmp_path / "c", download=False))
    monkeypatch.setenv("BIGMODEL_OFFLINE", "1")
    with pytest.raises(UserError, match="CIFAR-10 not found and data.download is off"):
        sources.load_standard(ImageDataConfig(source="cifar10", cache_dir=tmp_path / "c"))


# -------------------------------------------------------------------------------------------------- CIFAR binary
@pytest.mark.parametrize("key", ["cifar10", "cifar100"])
def test_cifar_binary_from_folder_and_archive(tmp_path, key):
    first = write_cifar_fixture(tmp_path / "raw", key)
    spec = standard.CIFAR_SETS[key]
    ds = load_data(ImageDataConfig(source=key, path=tmp_path / "raw", val_fraction=0.0), seed=0)
    assert ds.input_shape == (3, 32, 32) and len(ds.train) + len(ds.test) == 40
    # Channel planes: the first 1,024 bytes of a record are red, row-major; the last 1,024 blue.
    x0 = standard.read_cifar_binary([tmp_path / "raw" / spec.folder / spec.train_files[0]], spec.label_bytes, 0)[0][0]
    assert torch.equal(x0[0].flatten(), torch.from_numpy(first[:1024]))
    assert torch.equal(x0[2].flatten(), torch.from_numpy(first[2048:]))
    assert ds.labels[0] == ("airplane" if key == "cifar10" else "fine0")
    archive = tmp_path / spec.archive
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "raw" / spec.folder, arcname=spec.folder)
    ds2 = load_data(ImageDataConfig(source=key, path=archive, cache_dir=tmp_path / "cache", val_fraction=0.0), seed=0)
    assert torch.equal(ds.train.x, ds2.train.x) and torch.equal(ds.test.y, ds2.test.y)
    if key == "cifar100":
        coarse = load_data(
            ImageDataConfig(source=key, path=tmp_path / "raw", label_set="coarse", val_fraction=0.0), seed=0
        )
        assert coarse.labels[0] == "coarse0" and int(coarse.train.y.max()) < 20


def test_cifar_download_checksum_and_truncated_records(tmp_path, http_server, monkeypatch):
    www, url = http_server
    write_cifar_fixture(tmp_path / "raw", "cifar10")
    spec = standard.CIFAR_SETS["cifar10"]
    with tarfile.open(www / spec.archive, "w:gz") as tar:
        tar.add(tmp_path / "raw" / spec.folder, arcname=spec.folder)
    md5 = hashlib.md5((www / spec.archive).read_bytes()).hexdigest()
    monkeypatch.setitem(standard.CIFAR_SETS, "cifar10", dataclasses.replace(spec, md5=md5, mirrors=[url]))
    ds = load_data(ImageDataConfig(source="cifar10", cache_dir=tmp_path / "cache"), seed=0)
    assert len(ds.test) == 10
    assert not (tmp_path / "cache" / "cifar10" / spec.archive).exists()  # extracted, then the archive removed
    monkeypatch.setitem(standard.CIFAR_SETS, "cifar10", dataclasses.replace(spec, md5="0" * 32, mirrors=[url]))
    with pytest.raises(UserError, match="checksum mismatch"):
        load_data(ImageDataConfig(source="cifar10", cache_dir=tmp_path / "cache2"), seed=0)
    assert not any((tmp_path / "cache2" / "cifar10").iterdir())  # no partial file left in the cache
    bad = tmp_path / "raw" / spec.folder / "test_batch.bin"
    bad.write_bytes(bad.read_bytes()[:-5])
    with pytest.raises(UserError, match=r"test_batch.bin: .* is not a whole number of 3073-byte CIFAR records"):
        load_data(ImageDataConfig(source="cifar10", path=tmp_path / "raw"), seed=0)


# ------------------------------------------------------------------------------------------------------ image CSV
def test_image_csv_with_and_without_split_column(tmp_path):
    make_image_folder(tmp_path / "imgs", classes=("a", "b"), per_class=6, splits=("train", "test"))
    rows = ["path,label,split"]
    for f in sorted((tmp_path / "imgs").rglob("*.png")):
        rows.append(f"{f.relative_to(tmp_path)},{f.parent.name},{f.parent.parent.name}")
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    ds = load_data(ImageDataConfig(source="image_csv", path=tmp_path / "data.csv", val_fraction=0.25), seed=0)
    assert ds.labels == ["a", "b"] and len(ds.test) == 12 and len(ds.val) == 4 and len(ds.train) == 8
    plain = tmp_path / "plain.csv"
    plain.write_text("file,cls\n" + "\n".join(",".join(r.split(",")[:2]) for r in rows[1:]) + "\n")
    with pytest.raises(UserError, match=r"no column 'path' \(columns: file, cls\)"):
        load_data(ImageDataConfig(source="image_csv", path=plain), seed=0)
    ds2 = load_data(ImageDataConfig(source="image_csv", path=plain, path_column="file", label_column="cls"), seed=0)
    assert len(ds2.train) + len(ds2.val) + len(ds2.test) == 24
    (tmp_path / "missing.csv").write_text("path,label\nnope.png,a\n")
    with pytest.raises(UserError, match="nope.png: image file not found"):
        load_data(ImageDataConfig(source="image_csv", path=tmp_path / "missing.csv"), seed=0)


FASHION_DEBIAN = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not standard.has_idx_files(FASHION_DEBIAN), reason="Debian dataset-fashion-mnist not installed")
def test_real_fashion_mnist_from_the_debian_package():
    ds = load_data(ImageDataConfig(source="fashion_mnist"), seed=0)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (54000, 6000, 10000)
    assert torch.bincount(ds.val.y).tolist() == [600] * 10  # stratified


# ---------------------------------------------------------------------------------------------------- image folder
def test_image_folder_grey_with_val_carved_stratified(tmp_path):
    make_image_folder(tmp_path / "imgs", classes=("a", "b", "c"), per_class=10, splits=("train", "test"))
    cfg = ImageDataConfig(source="image_folder", path=tmp_path / "imgs", val_fraction=0.2)
    ds = load_data(cfg, seed=3)
    assert ds.labels == ["a", "b", "c"] and ds.input_shape == (1, 10, 12)
    assert torch.bincount(ds.val.y).tolist() == [2, 2, 2] and len(ds.train) == 24 and len(ds.test) == 30
    again = load_data(cfg, seed=3)
    assert torch.equal(ds.val.x, again.val.x)  # seeded
    other = load_data(cfg, seed=4)
    assert not torch.equal(ds.val.x, other.val.x)


def test_image_folder_rgb_and_resize(tmp_path):
    make_image_folder(tmp_path / "imgs", mode="RGB", splits=("train", "val", "test"))
    ds = load_data(ImageDataConfig(source="image_folder", path=tmp_path / "imgs", image_size=16), seed=0)
    assert ds.input_shape == (3, 16, 16) and len(ds.val) == 24
    grey = load_data(ImageDataConfig(source="image_folder", path=tmp_path / "imgs", channels=1), seed=0)
    assert grey.input_shape == (1, 10, 12)


def test_image_folder_corrupt_file_is_named(tmp_path):
    make_image_folder(tmp_path / "imgs")
    bad = tmp_path / "imgs" / "train" / "dog" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    with pytest.raises(UserError, match=r"broken.png: not a readable image"):
        load_data(ImageDataConfig(source="image_folder", path=tmp_path / "imgs"), seed=0)


def test_image_folder_layout_errors(tmp_path):
    with pytest.raises(UserError, match="folder not found"):
        load_data(ImageDataConfig(source="image_folder", path=tmp_path / "nope"), seed=0)
    (tmp_path / "flat").mkdir()
    with pytest.raises(UserError, match="no train/ folder"):
        load_data(ImageDataConfig(source="image_folder", path=tmp_path / "flat"), seed=0)
    make_image_folder(tmp_path / "x", splits=("train",))
    (tmp_path / "x" / "test" / "bird").mkdir(parents=True)
    with pytest.raises(UserError, match=r"class folders \['bird'\] do not exist in train/"):
        load_data(ImageDataConfig(source="image_folder", path=tmp_path / "x"), seed=0)


# ------------------------------------------------------------------------------------------------- splits, batches
def test_stratified_split_is_seeded_and_stratified():
    y = torch.arange(100) % 4
    keep, held = stratified_split(y, 0.2, seed=1)
    assert len(set(keep.tolist()) & set(held.tolist())) == 0 and len(keep) + len(held) == 100
    assert torch.bincount(y[held]).tolist() == [5, 5, 5, 5]
    assert torch.equal(held, stratified_split(y, 0.2, seed=1)[1])


def test_digits_source_and_normalisation_stats():
    ds = load_data(ImageDataConfig(source="digits"), seed=0)
    assert ds.input_shape == (1, 8, 8) and len(ds.train) + len(ds.val) + len(ds.test) == 1797
    mean, std = ds.channel_stats()
    x = ds.train.x.double() / 255
    assert mean[0] == pytest.approx(x.mean().item()) and std[0] == pytest.approx(x.std(unbiased=False).item())


def _split(n=50):
    g = torch.Generator().manual_seed(0)
    return ImageSplit(torch.randint(0, 256, (n, 1, 6, 6), dtype=torch.uint8, generator=g), torch.arange(n) % 5)


def test_loader_normalises_orders_by_epoch_and_resumes_mid_epoch():
    split = _split()
    norm = Normalizer([0.5], [0.25])
    loader = BatchLoader(
        split,
        8,
        norm,
        shuffle=True,
        seed=7,
        drop_last=True,
        augment=AugmentConfig(horizontal_flip=True, random_crop_padding=1),
    )
    assert len(loader) == 6
    e0 = list(loader.epoch(0))
    e1 = list(loader.epoch(1))
    assert not torch.equal(e0[0][1], e1[0][1])  # a new order each epoch
    resumed = list(loader.epoch(0, start=3))
    for a, b in zip(e0[3:], resumed, strict=True):  # mid-epoch resume gives the same batches, augmentation included
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    plain = BatchLoader(split, 50, norm, shuffle=False)
    ((x, y),) = list(plain.epoch(0))
    torch.testing.assert_close(x, (split.x.float() / 255 - 0.5) / 0.25)
    assert torch.equal(y, split.y)


def test_augmentation_crop_and_flip_are_real():
    from bigmodel.data.augment import horizontal_flip, random_crop

    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    g = torch.Generator().manual_seed(0)
    out = random_crop(x, 2, g)
    assert out.shape == x.shape
    same = random_crop(x, 0, torch.Generator().manual_seed(0))
    assert torch.equal(same, x)
    flipped = horizontal_flip(x, torch.Generator().manual_seed(1))
    for i in range(2):
        assert torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(2))
    # Every crop is a shifted window of the zero-padded image.
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        hits = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if torch.equal(padded[i, :, dy : dy + 4, dx : dx + 4], out[i])
        ]
        assert hits
