"""Labelled texts as token ids on disk (`bigmodel data prepare` on a text-classification recipe, `data.source:
shards`): the padded ids the in-memory path makes, the same training bit for bit in memory and on disk, exact resume,
the n-gram tokenizer, and one-line errors for a folder made otherwise."""

from __future__ import annotations

import json
import random
import signal

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from bigmodel.config import validate_recipe
from bigmodel.data.textshards import DiskRows
from conftest import run_cli


def source_recipe(csv, **tokenizer) -> dict:
    return {
        "name": "text_shards",
        "task": "text_classification",
        "data": {
            "source": "csv",
            "path": str(csv),
            "val_fraction": 0.1,
            "test_fraction": 0.2,
            "tokenizer": {"kind": "wordpiece", "vocab_size": 80, "min_frequency": 1, "max_length": 12, **tokenizer},
        },
        "model": {"name": "transformer-classifier", "dim": 16, "num_heads": 2, "num_layers": 1, "ff_dim": 32},
        "train": {
            "epochs": 3,
            "batch_size": 16,
            "precision": "fp32",
            "optimizer": {"name": "adamw", "lr": 0.01},
            "checkpoint_every": 10,
        },
        "seed": 0,
    }


def on_disk(folder, base=None, **data) -> dict:
    r = base or source_recipe("unused")
    r["data"] = {"source": "shards", "path": str(folder), "val_fraction": 0.1, "test_fraction": 0.2, **data}
    r["data"].setdefault("in_memory_limit_mb", 0.001)
    return r


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Texts of 1-9 words whose label is one of the words; some long enough to be truncated."""
    d = tmp_path_factory.mktemp("texts")
    rng = random.Random(0)
    fill = ["the", "movie", "plot", "was", "really", "quite", "a", "film", "story", "and", "unbelievably"]
    rows = ["text,label"]
    for i in range(300):
        word, label = [("great", "pos"), ("awful", "neg"), ("fine", "meh")][i % 3]
        words = rng.sample(fill, rng.randrange(0, 9))
        words.insert(rng.randrange(len(words) + 1), word)
        rows.append(f'"{" ".join(words)}",{label}')
    (d / "t.csv").write_text("\n".join(rows) + "\n")
    recipe = d / "source.yaml"
    recipe.write_text(yaml.safe_dump(source_recipe(d / "t.csv")))
    out = run_cli("data", "prepare", str(recipe), "--out", str(d / "prep"), check=True)
    assert out.stdout.strip().splitlines()[-1] == str(d / "prep") and "texts" in out.stderr
    return recipe, d / "prep"


def test_prepare_writes_the_in_memory_ids_lengths_and_labels(prepared):
    from bigmodel.api import build_experiment

    recipe, folder = prepared
    exp = build_experiment(validate_recipe(yaml.safe_load(recipe.read_text())))
    index = json.loads((folder / "index.json").read_text())
    assert index["format"] == "bigmodel-textids/1" and index["dtype"] == "uint16"
    assert index["labels"] == exp.data.labels and index["input_shape"] == exp.preprocess.input_shape
    disk = build_experiment(validate_recipe(on_disk(folder)))
    mem = build_experiment(validate_recipe(on_disk(folder, in_memory_limit_mb=64)))
    assert disk.data.on_disk and isinstance(disk.data.train.x, DiskRows) and not mem.data.on_disk
    assert disk.preprocess.tokenizer.to_str() == exp.preprocess.tokenizer.to_str()
    for split in ("train", "val", "test"):
        want = exp.data.split(split)
        assert index["splits"][split]["count"] == len(want)
        assert int(want.lengths.max()) == 12  # truncated at max_length
        for got in (mem.data.split(split), disk.data.split(split)):
            T = want.x.shape[1]
            assert torch.equal(got.x[:][:, :T], want.x) and bool((got.x[:][:, T:] == 0).all())
            assert torch.equal(got.lengths, want.lengths) and torch.equal(got.y, want.y)


def test_disk_rows_index_like_the_padded_matrix(prepared):
    _, folder = prepared
    entry = json.loads((folder / "index.json").read_text())["splits"]["train"]
    offsets = np.load(folder / entry["offsets"])
    x = DiskRows(folder / entry["ids"], np.dtype("<u2"), offsets)
    full = x.materialize()
    n = len(full)
    assert x.shape == tuple(full.shape) and full.dtype == torch.int64
    idx = torch.tensor([5, 0, n - 1, 5, 3])
    assert torch.equal(x[idx], full[idx]) and torch.equal(x[3:9], full[3:9]) and torch.equal(x[-1], full[-1])
    view = x.subset(torch.tensor([7, 2, 9]))
    assert torch.equal(view[torch.tensor([2, 0])], full[torch.tensor([9, 7])]) and torch.equal(
        view.materialize(), full[[7, 2, 9]]
    )
    with pytest.raises(IndexError):
        x[torch.tensor([n])]


def test_training_on_disk_equals_the_source_recipe_and_resumes_exactly(prepared, tmp_path):
    recipe, folder = prepared
    disk = tmp_path / "disk.yaml"
    disk.write_text(yaml.safe_dump(on_disk(folder)))
    run_cli("train", str(recipe), "--out", str(tmp_path / "mem"), "--no-progress", check=True)
    run_cli("train", str(disk), "--out", str(tmp_path / "disk"), "--no-progress", check=True)
    a = load_file(str(tmp_path / "mem" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "disk" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = json.loads((tmp_path / "mem" / "summary.json").read_text())
    sb = json.loads((tmp_path / "disk" / "summary.json").read_text())
    assert sa["metrics"]["accuracy"] == sb["metrics"]["accuracy"]
    run = tmp_path / "killed"
    killed = run_cli(
        "train", str(disk), "--out", str(run), "--no-progress", env={"BIGMODEL_FAULT": "kill_after_step:25"}
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run_cli("train", "--resume", str(run), "--no-progress", check=True)
    c = load_file(str(run / "model" / "model.safetensors"))
    assert all(torch.equal(a[k], c[k]) for k in a)
    # the run predicts raw text with the folder's tokenizer (saved in its artifact)
    out = run_cli("predict", str(tmp_path / "disk"), "a great film", "--json", check=True)
    assert json.loads(out.stdout)["predictions"][0]["label"] in ("pos", "neg", "meh")


def test_ngram_tokenizer_folder_trains_the_tfidf_linear_model(prepared, tmp_path):
    recipe, _ = prepared
    src = yaml.safe_load(recipe.read_text())
    src["data"]["tokenizer"] = {"kind": "ngrams", "max_length": 64}
    src["model"] = {"name": "tfidf-linear"}
    path = tmp_path / "ngrams.yaml"
    path.write_text(yaml.safe_dump(src))
    run_cli("data", "prepare", str(path), "--out", str(tmp_path / "prep"), check=True)
    disk = tmp_path / "disk.yaml"
    disk.write_text(yaml.safe_dump(on_disk(tmp_path / "prep", base=dict(src))))
    run_cli("train", str(path), "--out", str(tmp_path / "mem"), "--no-progress", check=True)
    run_cli("train", str(disk), "--out", str(tmp_path / "disk"), "--no-progress", check=True)
    a = load_file(str(tmp_path / "mem" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "disk" / "model" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_folder_made_otherwise_is_a_one_line_error(prepared, tmp_path):
    _, folder = prepared
    cases = {
        "tok": (on_disk(folder, tokenizer={"kind": "bpe"}), "data.tokenizer.kind 'bpe'"),
        "pii": (on_disk(folder, mask_pii=["email"]), "data.mask_pii"),
        "nothing": (on_disk(tmp_path / "nowhere"), "not a folder"),
    }
    tfidf = on_disk(folder)
    tfidf["model"] = {"name": "tfidf-linear"}
    cases["tfidf"] = (tfidf, "holds 'wordpiece' token ids")
    for other, message in (("bigmodel-shards/1", "holds images"), ("bigmodel-tokens/1", "language model's token")):
        d = tmp_path / other.split("/")[0]
        d.mkdir()
        (d / "index.json").write_text(json.dumps({"format": other}))
        cases[other] = (on_disk(d), message)
    for name, (recipe, message) in cases.items():
        path = tmp_path / f"{name.replace('/', '')}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        r = run_cli("train", str(path), "--out", str(tmp_path / f"run-{name.replace('/', '')}"), "--no-progress")
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (name, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1
    ids = folder / "val-ids.bin"
    data = ids.read_bytes()
    ids.write_bytes(data[:-2])
    try:
        path = tmp_path / "trunc.yaml"
        path.write_text(yaml.safe_dump(on_disk(folder)))
        r = run_cli("train", str(path), "--out", str(tmp_path / "trunc"), "--no-progress")
        assert r.returncode == 2 and "val-ids.bin" in r.stderr and "Traceback" not in r.stderr
    finally:
        ids.write_bytes(data)


# ------------------------------------------------------------------------------------ the source read a row at a time
def _text_sources(root) -> dict:
    """A source of each reader, with quoted line breaks, commas, unicode and a lone surrogate (a JSON escape)."""
    from bigmodel.config import TextDataConfig

    rng = random.Random(1)
    words = ["good", "bad", "so-so", "café", "naïve", "plot", "acting", "sehr", "gut"]

    def text(i: int) -> str:
        t = " ".join(rng.choice(words) for _ in range(rng.randrange(1, 7)))
        return t + (",\nmore on a second line" if i % 11 == 0 else "")

    labels = ["pos", "neg", "meh", "odd"]
    rows = [(text(i), labels[i % 4] if i % 13 else "pos") for i in range(160)]
    import csv

    for name, delimiter in (("t.csv", ","), ("t.tsv", "\t")):
        with (root / name).open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, delimiter=delimiter)
            w.writerow(["label", "body"])
            w.writerows((y, t) for t, y in rows)
    for name, part in (("train", rows[:100]), ("val", rows[100:130]), ("test", rows[130:])):
        lines = [json.dumps({"text": t + ("\ud800" if i == 3 else ""), "y": y}) for i, (t, y) in enumerate(part)]
        (root / f"{name}.jsonl").write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    for split, part in (("train", rows[:120]), ("test", rows[120:])):
        for i, (t, y) in enumerate(part):
            folder = root / "imdb" / split / ("pos" if y in ("pos", "meh") else "neg")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i}_7.txt").write_text(t.replace("\n", "<br />"), encoding="utf-8")
    tweets = ["sentiment,text"] + [f'{y},"{t.replace(chr(10), " ")} \xe9\x9f"' for t, y in rows[:90]]
    (root / "tweets.csv").write_bytes("\n".join(tweets).encode("latin-1", "surrogateescape"))
    csv_ = {"source": "csv", "path": root / "t.csv", "text_column": "body", "val_fraction": 0.1, "test_fraction": 0.2}
    return {
        "csv": TextDataConfig(**csv_),
        "csv-imbalanced-limited": TextDataConfig(**csv_, imbalance={"classes": ["odd"], "keep": 0.3}, limit_train=40),
        "tsv": TextDataConfig(**(csv_ | {"source": "tsv", "path": root / "t.tsv"})),
        "jsonl-files": TextDataConfig(
            source="jsonl",
            train_path=root / "train.jsonl",
            val_path=root / "val.jsonl",
            test_path=root / "test.jsonl",
            label_column="y",
        ),
        "aclimdb": TextDataConfig(source="aclimdb", path=root / "imdb", val_fraction=0.2),
        "tweets": TextDataConfig(source="tweets", path=root / "tweets.csv", val_fraction=0.1, test_fraction=0.1),
    }


def _streamed(cfg, seed, scratch):
    from bigmodel.data.textstream import StreamedText

    scratch.mkdir()
    s = StreamedText(cfg, seed, scratch)
    try:
        return s.labels, {n: (list(s.texts(n)), s.splits[n].y) for n in s.splits}, s.pii_masked
    finally:
        s.close()


def test_each_source_read_a_row_at_a_time_gives_load_texts_splits(tmp_path):
    """`StreamedText` (what `data prepare` reads) carves the splits `load_text` (what a run on the source reads)
    carves, texts and labels in the same order, and refuses what it refuses with the same line."""
    from bigmodel.data.text import load_text
    from bigmodel.errors import UserError

    sources = _text_sources(tmp_path)
    for name, cfg in sources.items():
        for seed in (0, 5):
            data = load_text(cfg, seed)
            labels, splits, masked = _streamed(cfg, seed, tmp_path / f"scratch-{name}-{seed}")
            assert labels == data.labels and masked is None, name
            assert set(splits) == {n for n in ("train", "val", "test") if data.split(n) is not None}, name
            for n, (texts, y) in splits.items():
                assert texts == data.split(n).texts and torch.equal(y, data.split(n).y), (name, n)
    (tmp_path / "test.jsonl").write_text(json.dumps({"text": "fine", "y": "pos"}) + "\n" + '{"text": "x", "y": "new"}')
    cfg = sources["jsonl-files"]
    with pytest.raises(UserError) as want:
        load_text(cfg, 0)
    with pytest.raises(UserError) as got:
        _streamed(cfg, 0, tmp_path / "scratch-bad")
    assert str(got.value) == str(want.value) and "line 2: label 'new'" in str(got.value)


def test_tokenizers_trained_on_the_streamed_texts_are_the_in_memory_ones(tmp_path):
    from bigmodel.config import TokenizerConfig
    from bigmodel.data.text import load_text, train_tokenizer
    from bigmodel.data.textstream import StreamedText

    cfg = _text_sources(tmp_path)["csv"]
    data = load_text(cfg, 0)
    (tmp_path / "scratch").mkdir()
    s = StreamedText(cfg, 0, tmp_path / "scratch")
    try:
        for kind in ("bpe", "wordpiece", "word", "char", "ngrams"):
            tc = TokenizerConfig(kind=kind, vocab_size=60, min_frequency=1)
            want = train_tokenizer(tc, data.train.texts).to_str()
            assert train_tokenizer(tc, s.train_texts()).to_str() == want, kind
    finally:
        s.close()


def test_prepare_encodes_a_chunk_at_a_time(prepared, tmp_path):
    """Encoding 7 texts at a time writes the files 4,096 at a time (the CLI's) writes; the scratch files are gone."""
    from bigmodel.data.textshards import write_text_shards
    from bigmodel.tasks import get_task

    recipe_path, folder = prepared
    recipe = validate_recipe(yaml.safe_load(recipe_path.read_text()))
    task = get_task(recipe.task)
    write_text_shards(recipe, tmp_path / "prep", lambda y, t: task.text_preprocess(recipe, y, t), chunk=7)
    names = sorted(p.name for p in folder.iterdir())
    assert sorted(p.name for p in (tmp_path / "prep").iterdir()) == names and "scratch" not in names
    for n in names:
        assert (tmp_path / "prep" / n).read_bytes() == (folder / n).read_bytes(), n


def test_prepare_masks_pii_as_the_source_run_does(tmp_path):
    pytest.importorskip("presidio_analyzer", reason="the privacy extra (Presidio) is not installed")
    from bigmodel.config import TextDataConfig
    from bigmodel.data.text import load_text

    rows = ["text,label"] + [
        f'"write to ann{i}@example.com{" or call +44 20 7946 0958" if i % 3 == 0 else ""} now",{"ab"[i % 2]}'
        for i in range(40)
    ]
    (tmp_path / "pii.csv").write_text("\n".join(rows) + "\n")
    cfg = TextDataConfig(
        source="csv", path=tmp_path / "pii.csv", mask_pii=["email", "phone"], limit_train=20, test_fraction=0.25
    )
    data = load_text(cfg, 3)
    labels, splits, masked = _streamed(cfg, 3, tmp_path / "scratch")
    kept = sum(len(y) for _, y in splits.values())  # every kept text has one address; the 20 kept of the training
    assert masked == data.pii_masked and masked["email"] == kept and len(splits["train"][1]) == 20
    assert masked["phone"] > 0
    for n, (texts, y) in splits.items():
        assert texts == data.split(n).texts and torch.equal(y, data.split(n).y)
        assert all("<EMAIL>" in t and "@" not in t for t in texts)
