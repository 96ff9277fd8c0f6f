"""Sentence pairs as token ids on disk (`bigmodel data prepare` on a translation recipe, `data.source: shards`): the
ids, lengths and references the in-memory path makes, for carved and given splits, reversed, one vocabulary per side
and masked; the same training bit for bit in memory and on disk; exact resume; one-line errors."""

from __future__ import annotations

import json
import random
import signal

import pytest
import torch
import yaml
from safetensors.torch import load_file

from bigmodel.config import validate_recipe
from bigmodel.data.textshards import DiskRows
from conftest import run_cli

WORDS = {"red": "rojo", "blue": "azul", "dog": "perro", "cat": "gato", "house": "casa", "big": "grande"}


def write_pairs(path, n=300, seed=0, long_every=0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        s = [rng.choice(list(WORDS)) for _ in range(rng.randint(1, 5 if not long_every or i % long_every else 30))]
        pairs.append((" ".join(s), " ".join(WORDS[w] for w in s)))
    path.write_text("".join(f"{a}\t{b}\n" for a, b in pairs), encoding="utf-8")
    return pairs


def source_recipe(tsv, **data) -> dict:
    return {
        "name": "pairs",
        "task": "translation",
        "data": {
            "source": "tsv",
            "path": str(tsv),
            "val_fraction": 0.1,
            "test_fraction": 0.1,
            "tokenizer": {"vocab_size": 400, "max_length": 16, "min_frequency": 1},
            **data,
        },
        "model": {"name": "transformer-seq2seq", "dim": 16, "num_heads": 2, "encoder_layers": 1, "decoder_layers": 1},
        "train": {"epochs": 3, "batch_size": 16, "precision": "fp32", "checkpoint_every": 4},
        "seed": 0,
    }


def on_disk(folder, base, **data) -> dict:
    r = json.loads(json.dumps(base))
    r["data"] = {"source": "shards", "path": str(folder), "mask_pii": base["data"].get("mask_pii", []), **data}
    r["data"].setdefault("in_memory_limit_mb", 0.001)
    return r


def prepare(recipe: dict, tmp_path, name: str):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = run_cli("data", "prepare", str(path), "--out", str(tmp_path / name), check=True)
    assert out.stdout.strip().splitlines()[-1] == str(tmp_path / name) and "pairs (" in out.stderr
    return tmp_path / name


def assert_same_pairs(recipe: dict, folder) -> None:
    """The folder, read in memory and from disk, holds what tokenizing the source recipe gives."""
    from bigmodel.api import build_experiment

    exp = build_experiment(validate_recipe(recipe))
    disk = build_experiment(validate_recipe(on_disk(folder, recipe)))
    mem = build_experiment(validate_recipe(on_disk(folder, recipe, in_memory_limit_mb=64)))
    assert disk.data.on_disk and isinstance(disk.data.train.src, DiskRows) and not mem.data.on_disk
    assert mem.data.dropped == disk.data.dropped == exp.data.dropped
    assert getattr(mem.data, "pii_masked", None) == getattr(exp.data, "pii_masked", None)
    for a, b in ((disk.preprocess, exp.preprocess), (mem.preprocess, exp.preprocess)):
        assert a.tokenizer.to_str() == b.tokenizer.to_str() and a.input_shape == b.input_shape
        assert (a.target_tokenizer is None) == (b.target_tokenizer is None)
        if b.target_tokenizer is not None:
            assert a.target_tokenizer.to_str() == b.target_tokenizer.to_str()
    for split in ("train", "val", "test"):
        want = exp.data.split(split)
        for got in (mem.data.split(split), disk.data.split(split)):
            assert (got is None) == (want is None), split
            if want is None:
                continue
            for k in ("src", "tgt"):
                x = getattr(got, k)[:]
                assert torch.equal(x, getattr(want, k)), (split, k)
                assert torch.equal(getattr(got, f"{k}_lengths"), getattr(want, f"{k}_lengths")), (split, k)
            assert list(got.references) == want.references and list(got.sources) == want.sources


def test_prepare_writes_the_in_memory_pairs(tmp_path):
    """Carved and given splits, reversed with a vocabulary per side, aligned files; training pairs over max_length
    dropped as the in-memory path drops them."""
    write_pairs(tmp_path / "p.tsv", long_every=7)
    carved = source_recipe(tmp_path / "p.tsv", limit_train=150)
    folder = prepare(carved, tmp_path, "carved")
    index = json.loads((folder / "index.json").read_text())
    assert index["format"] == "bigmodel-pairids/1" and index["dropped"] > 0 and index["shared_vocab"]
    assert_same_pairs(carved, folder)

    for name, n, seed in (("train", 200, 1), ("val", 30, 2), ("test", 40, 3)):
        write_pairs(tmp_path / f"{name}.tsv", n=n, seed=seed)
    given = source_recipe(
        None, reverse=True, shared_vocab=False, val_path=str(tmp_path / "val.tsv"), test_path=str(tmp_path / "test.tsv")
    )
    given["data"] |= {"path": None, "train_path": str(tmp_path / "train.tsv")}
    folder = prepare(given, tmp_path, "given")
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["index.json", "tokenizer.json", "target_tokenizer.json"]
        + [
            f"{s}-{k}{e}"
            for s in ("train", "val", "test")
            for k in ("src", "tgt", "text")
            for e in (".bin", "-offsets.npy")
        ]
    )
    assert_same_pairs(given, folder)

    pairs = write_pairs(tmp_path / "unused.tsv", n=120, seed=4)
    (tmp_path / "en.txt").write_text("".join(f"{a}\n" for a, _ in pairs) + "\n")
    (tmp_path / "es.txt").write_text("".join(f"{b}\n" for _, b in pairs) + "\n")
    aligned = source_recipe(None, source="aligned_files", source_file=str(tmp_path / "en.txt"))
    aligned["data"] |= {"path": None, "target_file": str(tmp_path / "es.txt"), "val_fraction": 0.2}
    assert_same_pairs(aligned, prepare(aligned, tmp_path, "aligned"))


def test_prepare_masks_pii_as_the_source_run_does(tmp_path):
    pytest.importorskip("presidio_analyzer", reason="the privacy extra (Presidio) is not installed")
    rows = [f"mail bob{i}@example.com red dog\tescribe a bob{i}@example.com perro rojo\n" for i in range(60)]
    (tmp_path / "p.tsv").write_text("".join(rows))
    word = {"vocab_size": 400, "max_length": 40, "min_frequency": 1}
    recipe = source_recipe(tmp_path / "p.tsv", mask_pii=["email"], tokenizer=word)
    folder = prepare(recipe, tmp_path, "masked")
    assert json.loads((folder / "index.json").read_text())["pii_masked"] == {"email": 120}
    assert_same_pairs(recipe, folder)


def test_training_on_disk_equals_the_source_recipe_and_resumes_exactly(tmp_path):
    write_pairs(tmp_path / "p.tsv")
    recipe = source_recipe(tmp_path / "p.tsv")
    folder = prepare(recipe, tmp_path, "prep")
    src, disk = tmp_path / "src.yaml", tmp_path / "disk.yaml"
    src.write_text(yaml.safe_dump(recipe))
    disk.write_text(yaml.safe_dump(on_disk(folder, recipe)))
    one = {"OMP_NUM_THREADS": "1"}  # the claim is the data path's (see test_tokenshards)
    run_cli("train", str(src), "--out", str(tmp_path / "mem"), "--no-progress", env=one, check=True)
    run_cli("train", str(disk), "--out", str(tmp_path / "disk"), "--no-progress", env=one, check=True)
    a = load_file(str(tmp_path / "mem" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "disk" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = json.loads((tmp_path / "mem" / "summary.json").read_text())["metrics"]
    sb = json.loads((tmp_path / "disk" / "summary.json").read_text())["metrics"]
    assert sa["bleu"] == sb["bleu"] and sa["loss"] == sb["loss"]
    run = tmp_path / "killed"
    env = {**one, "BIGMODEL_FAULT": "kill_after_step:7"}
    killed = run_cli("train", str(disk), "--out", str(run), "--no-progress", env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run_cli("train", "--resume", str(run), "--no-progress", env=one, check=True)
    c = load_file(str(run / "model" / "model.safetensors"))
    assert all(torch.equal(a[k], c[k]) for k in a)
    # the run translates raw text with the folder's tokenizer (saved in its artifact) as the source run does
    outs = [run_cli("translate", str(tmp_path / r), "red dog", "big cat", check=True).stdout for r in ("mem", "disk")]
    assert outs[0] == outs[1] and len(outs[0].splitlines()) == 2


def test_a_folder_made_otherwise_is_a_one_line_error(tmp_path):
    write_pairs(tmp_path / "p.tsv", n=80)
    recipe = source_recipe(tmp_path / "p.tsv")
    folder = prepare(recipe, tmp_path, "prep")
    cases = {
        "len": (on_disk(folder, recipe, tokenizer={"max_length": 32}), "data.tokenizer.max_length 32"),
        "rev": (on_disk(folder, recipe, reverse=True), "data.reverse True"),
        "pii": (on_disk(folder, recipe, mask_pii=["email"]), "data.mask_pii"),
        "none": (on_disk(tmp_path / "nowhere", recipe), "not a folder"),
    }
    text = tmp_path / "text"
    text.mkdir()
    (text / "index.json").write_text(json.dumps({"format": "bigmodel-textids/1"}))
    cases["text"] = (on_disk(text, recipe), "holds labelled texts as token ids, not sentence pairs")
    for name, (r, message) in cases.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(r))
        out = run_cli("train", str(path), "--out", str(tmp_path / f"run-{name}"), "--no-progress")
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, (name, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    ids = folder / "val-src.bin"
    ids.write_bytes(ids.read_bytes()[:-2])
    path = tmp_path / "trunc.yaml"
    path.write_text(yaml.safe_dump(on_disk(folder, recipe)))
    out = run_cli("train", str(path), "--out", str(tmp_path / "trunc"), "--no-progress")
    assert out.returncode == 2 and "val-src.bin" in out.stderr and "Traceback" not in out.stderr
