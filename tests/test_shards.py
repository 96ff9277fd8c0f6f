"""Data on disk in shards (`bigmodel data prepare`, `data.source: shards`): the same batches, the same numbers and the
same exact resume as the in-memory path, read a batch at a time — in the main process or in worker processes
(`train.num_workers`), in one process or in two (DDP ranks each read only their share of every batch)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from bigmodel.config import validate_recipe
from bigmodel.data.shards import DiskImages, ShardIndex
from bigmodel.errors import UserError
from conftest import run_cli, tiny_recipe

SOURCE = tiny_recipe(
    **{
        "train.epochs": 2,
        "train.batch_size": 64,
        "train.checkpoint_every": 4,
        "train.precision": "fp32",
        "data.augment": {"horizontal_flip": True, "random_crop_padding": 1},
        "model.dropout": 0.3,
    }
)


def on_disk(folder: Path, **over) -> dict:
    """The source recipe reading the prepared folder, kept on disk (a memory limit far below its size)."""
    r = json.loads(json.dumps(SOURCE))
    r["data"] = {
        "source": "shards",
        "path": str(folder),
        "in_memory_limit_mb": 0.01,
        "augment": SOURCE["data"]["augment"],
        **over,
    }
    return r


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    recipe = d / "source.yaml"
    recipe.write_text(yaml.safe_dump(SOURCE))
    out = run_cli("data", "prepare", str(recipe), "--out", str(d / "prep"), "--shard-size", "300", check=True)
    assert out.stdout.strip().splitlines()[-1] == str(d / "prep")
    return recipe, d / "prep"


def test_prepare_writes_the_recipes_splits(prepared):
    from bigmodel.api import build_experiment

    recipe, folder = prepared
    exp = build_experiment(validate_recipe(SOURCE))
    index = ShardIndex.read(folder)
    for split in ("train", "val", "test"):
        want = exp.data.split(split)
        x = index.images(split)
        assert isinstance(x, DiskImages) and x.shape == tuple(want.x.shape)
        assert torch.equal(x.materialize(), want.x) and torch.equal(index.labels_of(split), want.y)
    assert len(index.splits["train"]["shards"]) == -(-len(exp.data.train) // 300)  # 300 images per shard
    assert (index.mean, index.std) == exp.data.channel_stats()
    # Plain .npy: NumPy reads a shard without pickle.
    arr = np.load(folder / "train-00001.npy", mmap_mode="r", allow_pickle=False)
    assert np.array_equal(arr, exp.data.train.x[300:600].numpy())


def test_disk_images_index_like_a_tensor(prepared):
    _, folder = prepared
    x = ShardIndex.read(folder).images("train")
    full = x.materialize()
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, len(x), (200,), generator=g)  # repeats, any order, across shards
    assert torch.equal(x[idx], full[idx])
    assert torch.equal(x[295:610], full[295:610]) and torch.equal(x[7], full[7]) and torch.equal(x[-1], full[-1])
    view = x.subset(torch.tensor([900, 3, 301, 3]))
    assert len(view) == 4 and torch.equal(view[torch.tensor([3, 0])], full[torch.tensor([3, 900])])
    mask = torch.zeros(len(x), dtype=torch.bool)
    mask[[5, 640, 1000]] = True
    assert torch.equal(x[mask], full[mask]) and torch.equal(x[torch.tensor([-1, -2])], full[[-1, -2]])
    with pytest.raises(IndexError):
        x[len(x)]
    with pytest.raises(IndexError):
        x[torch.tensor([0, len(x)])]


def test_training_on_disk_equals_training_in_memory(prepared, tmp_path):
    """Same splits, statistics, order and augmentation: the final weights are bit-identical to the source recipe's."""
    recipe, folder = prepared
    disk = tmp_path / "disk.yaml"
    disk.write_text(yaml.safe_dump(on_disk(folder)))
    run_cli("train", str(recipe), "--out", str(tmp_path / "mem"), "--no-progress", check=True)
    run_cli("train", str(disk), "--out", str(tmp_path / "disk"), "--no-progress", check=True)
    a = load_file(str(tmp_path / "mem" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "disk" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma = json.loads((tmp_path / "mem" / "summary.json").read_text())
    mb = json.loads((tmp_path / "disk" / "summary.json").read_text())
    assert ma["metrics"]["accuracy"] == mb["metrics"]["accuracy"]
    # Batches made by 2 worker processes (read, augment, normalise there): the same weights, bit for bit.
    run_cli("train", str(disk), "train.num_workers=2", "--out", str(tmp_path / "w"), "--no-progress", check=True)
    c = load_file(str(tmp_path / "w" / "model" / "model.safetensors"))
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_workers_make_the_main_process_batches_and_stop_with_the_epoch(prepared):
    """Worker-made batches equal main-process ones (augmentation and mixup included; resuming mid-epoch too), and
    leaving an epoch early stops its workers."""
    import multiprocessing

    from bigmodel.api import build_experiment

    _, folder = prepared
    aug = {"horizontal_flip": True, "random_crop_padding": 1, "mixup_alpha": 0.2}
    runs = {}
    for w in (0, 2):
        exp = build_experiment(validate_recipe(on_disk(folder, augment=aug) | {"train": {"num_workers": w}}))
        loader = exp.loader("train", train=True)
        assert loader.num_workers == w and exp.data.on_disk
        runs[w] = [b for e in (0, 1) for b in loader.epoch(e, start=2)]
    assert len(runs[0]) == len(runs[2]) > 10
    for (xa, ya), (xb, yb) in zip(runs[0], runs[2], strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and xa.stride() == xb.stride()  # channels-last kept
    it = loader.epoch(0)
    next(it)
    assert len(multiprocessing.active_children()) == 2
    it.close()
    assert not multiprocessing.active_children()


def test_each_rank_reads_only_its_share_of_every_batch(prepared, monkeypatch):
    """Two ranks' loaders over the same shards read disjoint images whose union is each global batch."""
    from bigmodel.api import build_experiment

    _, folder = prepared
    exp = build_experiment(validate_recipe(on_disk(folder)))
    reads: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    rank_now = [0]
    original = DiskImages._read

    def spy(self, rows):
        reads[rank_now[0]].append(rows.clone())
        return original(self, rows)

    monkeypatch.setattr(DiskImages, "_read", spy)
    globals_ = [torch.as_tensor(b) for b in exp.loader("train", train=True).plan.batches(1)]
    for rank in (0, 1):
        rank_now[0] = rank
        exp.rank, exp.world_size = rank, 2
        for _ in exp.loader("train", train=True).epoch(1):
            pass
    assert len(reads[0]) == len(reads[1]) == len(globals_)
    for a, b, g in zip(reads[0], reads[1], globals_, strict=True):
        assert not set(a.tolist()) & set(b.tolist())
        assert sorted(a.tolist() + b.tolist()) == sorted(g.tolist())


def test_two_ddp_processes_on_disk_give_one_process_weights(prepared, tmp_path):
    """`--nproc-per-node 2` on on-disk shards (each rank reading its half of every batch): the weights of one process
    (no dropout or augmentation, whose draws are per batch; BatchNorm synchronised)."""
    _, folder = prepared
    r = on_disk(folder)
    r["data"].pop("augment")
    r["model"]["dropout"] = 0.0
    r["train"]["distributed"] = {"sync_batchnorm": True}
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(r))
    run_cli("train", str(path), "--out", str(tmp_path / "one"), "--no-progress", check=True)
    run_cli("train", str(path), "--out", str(tmp_path / "two"), "--nproc-per-node", "2", "--no-progress", check=True)
    a = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-5


def test_in_memory_is_chosen_by_size(prepared):
    from bigmodel.api import build_experiment

    _, folder = prepared
    small = build_experiment(validate_recipe(on_disk(folder, in_memory_limit_mb=64)))
    big = build_experiment(validate_recipe(on_disk(folder)))
    assert isinstance(small.data.train.x, torch.Tensor) and not small.data.on_disk
    assert isinstance(big.data.train.x, DiskImages) and big.data.on_disk


def test_resume_on_disk_after_a_hard_kill_is_bit_identical(prepared, tmp_path):
    _, folder = prepared
    recipe = tmp_path / "disk.yaml"
    recipe.write_text(yaml.safe_dump(on_disk(folder)))
    run_cli("train", str(recipe), "--out", str(tmp_path / "ref"), "--no-progress", check=True)
    run = tmp_path / "run"
    killed = run_cli(
        "train", str(recipe), "--out", str(run), "--no-progress", env={"BIGMODEL_FAULT": "kill_after_step:6"}
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run_cli("train", "--resume", str(run), "--no-progress", check=True)
    a = load_file(str(tmp_path / "ref" / "model" / "model.safetensors"))
    b = load_file(str(run / "model" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_input_is_one_line(prepared, tmp_path, write_recipe):
    recipe, folder = prepared
    again = run_cli("data", "prepare", str(recipe), "--out", str(folder))
    assert again.returncode != 0 and "not empty" in again.stderr and "Traceback" not in again.stderr
    from bigmodel.api import prepare_shards  # the Python API checks the same, before reading the source

    with pytest.raises(UserError, match="not empty"):
        prepare_shards(validate_recipe(SOURCE), folder)
    with pytest.raises(UserError, match="reads a prepared folder already"):
        prepare_shards(validate_recipe(on_disk(folder)), tmp_path / "new")
    assert not (tmp_path / "new").exists()
    missing = tmp_path / "missing.yaml"
    missing.write_text(yaml.safe_dump(on_disk(tmp_path / "nowhere")))
    r = run_cli("train", str(missing), "--out", str(tmp_path / "r1"), "--no-progress")
    assert r.returncode != 0 and "not a folder" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "empty").mkdir()
    noindex = tmp_path / "noindex.yaml"
    noindex.write_text(yaml.safe_dump(on_disk(tmp_path / "empty")))
    r = run_cli("train", str(noindex), "--out", str(tmp_path / "r2"), "--no-progress")
    assert r.returncode != 0 and "no index.json" in r.stderr and "Traceback" not in r.stderr
    text = tmp_path / "text.yaml"
    text.write_text(
        yaml.safe_dump(
            {
                "name": "t",
                "task": "text_classification",
                "data": {"source": "tweets"},
                "model": {"name": "embedding-bag"},
            }
        )
    )
    seq = tmp_path / "seq.yaml"
    seq.write_text(
        yaml.safe_dump(
            {
                "name": "s",
                "task": "sequence_classification",
                "data": {"source": "digits"},
                "model": {"name": "lstm-classifier"},
            }
        )
    )
    r = run_cli("data", "prepare", str(seq), "--out", str(tmp_path / "t"))
    assert r.returncode != 0 and "image_classification" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("train", str(text), "train.num_workers=2", "--out", str(tmp_path / "t2"), "--no-progress")
    assert r.returncode == 2 and "train.num_workers applies to image_classification" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "t2").exists()


def test_an_image_folder_larger_than_the_limit_is_decoded_per_batch_in_workers(tmp_path):
    """Image files over `data.in_memory_limit_mb` stay files, decoded a batch at a time (here in 2 worker processes):
    the weights of the run that decoded them all into memory, bit for bit. `data prepare` decodes them a shard at a
    time: the pixels of the in-memory path, and its statistics to rounding."""
    from bigmodel.api import build_experiment
    from bigmodel.data.sources import FileImages
    from conftest import make_image_folder

    make_image_folder(tmp_path / "img", classes=("a", "b", "c"), per_class=30, mode="RGB", splits=("train", "test"))
    mem = tiny_recipe(
        **{
            "data": {"source": "image_folder", "path": str(tmp_path / "img"), "val_fraction": 0.2},
            "train.precision": "fp32",
            "train.batch_size": 16,
        }
    )
    files = json.loads(json.dumps(mem))
    files["data"]["in_memory_limit_mb"] = 0.01
    files["train"]["num_workers"] = 2
    lazy = build_experiment(validate_recipe(files))
    assert lazy.data.on_disk and isinstance(lazy.data.train.x, FileImages)
    assert not build_experiment(validate_recipe(mem)).data.on_disk
    for name, r in (("mem", mem), ("files", files)):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(r))
        run_cli("train", str(path), "--out", str(tmp_path / name), "--no-progress", check=True)
    a = load_file(str(tmp_path / "mem" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "files" / "model" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)

    run_cli(
        "data", "prepare", str(tmp_path / "mem.yaml"), "--out", str(tmp_path / "prep"), "--shard-size", "7", check=True
    )
    index = ShardIndex.read(tmp_path / "prep")
    exp = build_experiment(validate_recipe(mem))
    for split in ("train", "val", "test"):
        assert torch.equal(index.images(split).materialize(), exp.data.split(split).x)
    assert np.allclose(index.mean, exp.preprocess.mean, rtol=0, atol=1e-12)
    assert np.allclose(index.std, exp.preprocess.std, rtol=0, atol=1e-12)


def test_a_bad_image_file_found_in_a_worker_is_a_one_line_error(tmp_path):
    from conftest import make_image_folder

    root = make_image_folder(tmp_path / "img", classes=("a", "b"), per_class=10, splits=("train", "test"))
    (root / "test" / "b" / "003.png").write_bytes(b"not a png")  # read only when the test split is evaluated
    r = tiny_recipe(**{"data": {"source": "image_folder", "path": str(root), "val_fraction": 0.2}})
    r["data"]["in_memory_limit_mb"] = 0.0001
    r["train"]["num_workers"] = 2
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(r))
    proc = run_cli("train", str(path), "--out", str(tmp_path / "run"), "--no-progress")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {root / 'test' / 'b' / '003.png'}: not a readable image")


def test_an_imbalance_applied_at_prepare_time_is_not_applied_again(tmp_path):
    """`data.imbalance` thins the training split when the folder is written; the same recipe on the folder keeps
    that split (not 10% of 10%), and a recipe asking for another imbalance gets a one-line error."""
    from bigmodel.api import build_experiment

    src = json.loads(json.dumps(SOURCE))
    src["data"]["imbalance"] = {"classes": [0, 1], "keep": 0.2}
    recipe = tmp_path / "imb.yaml"
    recipe.write_text(yaml.safe_dump(src))
    run_cli("data", "prepare", str(recipe), "--out", str(tmp_path / "prep"), check=True)
    want = build_experiment(validate_recipe(src)).data.train.y
    disk = on_disk(tmp_path / "prep", imbalance=src["data"]["imbalance"])
    got = build_experiment(validate_recipe(disk)).data.train.y
    assert torch.equal(torch.bincount(got, minlength=10), torch.bincount(want, minlength=10))
    disk["data"]["imbalance"] = {"classes": [0, 1], "keep": 0.5}
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(disk))
    r = run_cli("train", str(other), "--out", str(tmp_path / "run"), "--no-progress")
    assert r.returncode == 2 and "data.imbalance" in r.stderr and "Traceback" not in r.stderr


def test_each_task_says_what_its_prepared_folder_holds_in_its_own_units():
    """`data prepare`'s one line comes from the task spec (`TaskSpec.prepared_summary`), not from a branch on the
    folder's format name: images and tokens in shards, texts and pairs with their tokens, clips with their seconds."""
    from bigmodel.tasks import get_task

    def index(**split):
        return {"splits": {"train": split, "test": split}}

    shards = index(count=1200, shards=["a", "b"])
    assert (
        get_task("image_classification").prepared_summary(shards)
        == "train 1,200 images in 2 shards, test 1,200 images in 2 shards"
    )
    assert get_task("language_modeling").prepared_summary(shards).startswith("train 1,200 tokens in 2 shards")
    texts = index(count=3, tokens=4500)
    assert get_task("text_classification").prepared_summary(texts).startswith("train 3 texts (4,500 tokens)")
    pairs = {**index(count=2, src_tokens=5, tgt_tokens=6), "dropped": 1}
    assert get_task("translation").prepared_summary(pairs) == (
        "train 2 pairs (11 tokens), test 2 pairs (11 tokens); 1 training pairs over max_length dropped"
    )
    clips = {**index(count=4, samples_total=24000), "sample_rate": 8000}
    for task in ("audio_classification", "speech_recognition"):
        assert get_task(task).prepared_summary(clips) == "train 4 clips (3.0 s), test 4 clips (3.0 s)"
