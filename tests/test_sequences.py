"""Sequence data (.ts, CSV, .npz, image rows), the RNN family and the Transformer classifier on sequences."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bigmodel.config import validate_recipe
from bigmodel.data.sequences import load_sequences, read_ts
from bigmodel.errors import UserError
from bigmodel.models.sequence import (
    RNNClassifier,
    RNNConfig,
    TransformerClassifier,
    TransformerClassifierConfig,
)
from conftest import run_cli


def write_ts(path, series, labels, dims=2, class_labels=("a", "b")):
    lines = [
        "# a comment",
        "@problemName Toy",
        "@univariate false",
        f"@dimensions {dims}",
        "@equalLength false",
        f"@classLabel true {' '.join(class_labels)}",
        "@data",
    ]
    for s, lbl in zip(series, labels, strict=True):
        lines.append(":".join(",".join(f"{v:.4f}" for v in s[:, d]) for d in range(s.shape[1])) + f":{lbl}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def toy_series(n, seed, dims=2):
    """Class a: rising first feature; class b: falling. Lengths vary from 3 to 9."""
    rng = np.random.default_rng(seed)
    series, labels = [], []
    for i in range(n):
        T = int(rng.integers(3, 10))
        sign = 1 if i % 2 == 0 else -1
        t = np.linspace(0, 1, T)
        s = np.stack([sign * t + 0.05 * rng.standard_normal(T)] + [rng.standard_normal(T) for _ in range(dims - 1)], 1)
        series.append(s)
        labels.append("a" if sign > 0 else "b")
    return series, labels


def seq_recipe(**data):
    return {
        "task": "sequence_classification",
        "data": {"val_fraction": 0.2, **data},
        "model": {"name": "lstm-classifier", "hidden_size": 16, "num_layers": 1},
        "train": {"epochs": 2, "batch_size": 8, "log_every": 5},
    }


# ----------------------------------------------------------------------------------------------------------- .ts
def test_read_ts_variable_length_multivariate(tmp_path):
    series, labels = toy_series(6, 0)
    write_ts(tmp_path / "Toy_TRAIN.ts", series, labels)
    f = read_ts(tmp_path / "Toy_TRAIN.ts")
    assert f.class_labels == ["a", "b"] and f.labels == labels
    for got, want in zip(f.series, series, strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_ts_pair_found_in_folder_and_padded(tmp_path):
    tr, ltr = toy_series(20, 0)
    te, lte = toy_series(10, 1)
    write_ts(tmp_path / "Toy_TRAIN.ts", tr, ltr)
    write_ts(tmp_path / "Toy_TEST.ts", te, lte)
    r = validate_recipe(seq_recipe(source="ts", path=str(tmp_path)))
    d = load_sequences(r.data, 0)
    assert len(d.test) == 10 and len(d.train) + len(d.val) == 20
    assert d.labels == ["a", "b"] and d.num_features == 2
    T = d.test.x.shape[1]
    assert max(len(s) for s in te) == T
    for i, s in enumerate(te):  # zero padding after each true length
        assert d.test.lengths[i] == len(s)
        assert torch.all(d.test.x[i, len(s) :] == 0)


def test_ts_errors_name_file_and_line(tmp_path):
    tr, ltr = toy_series(4, 0)
    write_ts(tmp_path / "Toy_TRAIN.ts", tr, ltr)
    bad = tmp_path / "bad"
    bad.mkdir()
    write_ts(bad / "Toy_TRAIN.ts", tr, ltr, dims=3)
    with pytest.raises(UserError, match=r"Toy_TRAIN.ts: line 8: 2 dimensions, the header says @dimensions 3"):
        read_ts(bad / "Toy_TRAIN.ts")
    te, _ = toy_series(2, 1)
    write_ts(tmp_path / "Toy_TEST.ts", te, ["a", "zzz"], class_labels=("a", "b", "zzz"))
    r = validate_recipe(seq_recipe(source="ts", path=str(tmp_path)))
    with pytest.raises(UserError, match=r"Toy_TEST.ts: series 2: label 'zzz' does not occur"):
        load_sequences(r.data, 0)
    (tmp_path / "x.ts").write_text("@dimensions 1\n@classLabel true a\n@data\n1,2,oops:a\n")
    with pytest.raises(UserError, match=r"x.ts: line 4: a value is not a number"):
        read_ts(tmp_path / "x.ts")


def test_bundled_japanese_vowels():
    """The UEA set shipped in the aeon wheel: 270 + 370 series, 12 features, lengths 7..29, 9 speakers."""
    r = validate_recipe(seq_recipe(source="ts", name="JapaneseVowels", val_fraction=0.0))
    d = load_sequences(r.data, 0)
    assert (len(d.train), len(d.test), d.num_features) == (270, 370, 12)
    assert d.labels == [str(i) for i in range(1, 10)]
    lengths = torch.cat([d.train.lengths, d.test.lengths])
    assert int(lengths.min()) == 7 and int(lengths.max()) == 29


def test_unknown_bundled_set_is_a_clear_error():
    r = validate_recipe(seq_recipe(source="ts", name="NoSuchSet"))
    with pytest.raises(
        UserError, match=r"data.name 'NoSuchSet': not among the .ts sets bundled in aeon \(.*JapaneseVowels"
    ):
        load_sequences(r.data, 0)


# ------------------------------------------------------------------------------------------------- CSV and .npz
def test_csv_wide_and_long_forms(tmp_path):
    wide = tmp_path / "wide.csv"
    wide.write_text("label,t0,t1,t2,t3\n" + "up,1,2,3,4\ndown,4,3,,\nup,0,1,2,\ndown,9,8,7,6\n" * 3)
    r = validate_recipe(seq_recipe(source="csv", path=str(wide), val_fraction=0.0, test_fraction=0.25))
    d = load_sequences(r.data, 0)
    assert d.labels == ["down", "up"] and d.num_features == 1
    assert sorted(torch.cat([d.train.lengths, d.test.lengths]).tolist()) == [2] * 3 + [3] * 3 + [4] * 6

    long = tmp_path / "long.csv"
    rows = ["id,f1,f2,label"]
    for k in range(8):
        for t in range(2 + k % 3):
            rows.append(f"s{k},{t},{k},{'x' if k % 2 else 'y'}")
    long.write_text("\n".join(rows) + "\n")
    r = validate_recipe(seq_recipe(source="csv", path=str(long), sequence_column="id", val_fraction=0.0))
    d = load_sequences(r.data, 0)
    assert d.num_features == 2 and len(d.train) + len(d.test) == 8

    bad = tmp_path / "bad.csv"
    bad.write_text("label,t0,t1\nup,1,2\ndown,1,x\n")
    r = validate_recipe(seq_recipe(source="csv", path=str(bad)))
    with pytest.raises(UserError, match=r"bad.csv: line 3: column 't1': 'x' is not a number"):
        load_sequences(r.data, 0)
    r = validate_recipe(seq_recipe(source="csv", path=str(wide), label_column="class"))
    with pytest.raises(UserError, match=r"wide.csv: no column 'class'"):
        load_sequences(r.data, 0)


def test_npz_with_lengths_and_unknown_test_label(tmp_path):
    x = np.random.default_rng(0).standard_normal((12, 5, 3)).astype(np.float32)
    y = np.array([0, 1] * 6)
    np.savez(tmp_path / "train.npz", x=x, y=y, lengths=np.array([5, 4, 3] * 4))
    np.savez(tmp_path / "test.npz", x=x[:2], y=np.array([0, 7]))
    r = validate_recipe(seq_recipe(source="npy", train_path=str(tmp_path / "train.npz"), val_fraction=0.0))
    d = load_sequences(r.data, 0)
    assert d.num_features == 3 and sorted(set(d.train.lengths.tolist())) == [3, 4, 5]
    r = validate_recipe(
        seq_recipe(source="npy", train_path=str(tmp_path / "train.npz"), test_path=str(tmp_path / "test.npz"))
    )
    with pytest.raises(UserError, match=r"test.npz: row 1: label '7' does not occur"):
        load_sequences(r.data, 0)


def test_images_read_as_rows():
    r = validate_recipe(seq_recipe(source="digits"))
    d = load_sequences(r.data, 0)
    assert d.train.x.shape[1:] == (8, 8) and torch.all(d.train.lengths == 8)
    assert float(d.train.x.max()) <= 1.0


# ------------------------------------------------------------------------------------------------------- models
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("pooling", ["last", "mean", "max", "attention"])
def test_rnn_padded_batch_equals_each_sequence_alone(cell, bidirectional, pooling):
    """Packing makes padding invisible: a padded batch gives the logits each sequence gives on its own."""
    torch.manual_seed(0)
    cfg = RNNConfig(cell=cell, hidden_size=8, num_layers=2, bidirectional=bidirectional, pooling=pooling)
    m = RNNClassifier(cfg, {"kind": "sequence", "features": 3}, 4).eval()
    lengths = torch.tensor([5, 2, 4])
    x = torch.randn(3, 5, 3)
    x[1, 2:] = 0
    x[2, 4:] = 0
    batch = m(x, lengths)
    for i in range(3):
        alone = m(x[i : i + 1, : lengths[i]], lengths[i : i + 1])
        torch.testing.assert_close(batch[i : i + 1], alone, atol=1e-5, rtol=1e-5)


def test_rnn_last_state_is_the_state_at_each_true_end():
    torch.manual_seed(0)
    m = RNNClassifier(RNNConfig(hidden_size=6, num_layers=1), {"kind": "sequence", "features": 2}, 3).eval()
    x = torch.randn(2, 6, 2)
    lengths = torch.tensor([6, 3])
    feats = m.forward_features(x, lengths)
    out, _ = m.rnn(x[1:2, :3])
    torch.testing.assert_close(feats[1], out[0, -1], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("positional", ["sinusoidal", "learned", "rotary"])
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_transformer_padding_does_not_change_outputs(positional, pooling):
    torch.manual_seed(0)
    cfg = TransformerClassifierConfig(dim=16, num_heads=2, num_layers=2, positional=positional, pooling=pooling)
    m = TransformerClassifier(cfg, {"kind": "sequence", "features": 3}, 2).eval()
    x = torch.randn(1, 4, 3)
    padded = torch.cat([x, torch.randn(1, 3, 3)], dim=1)  # garbage in the padding must not matter
    a = m(x, torch.tensor([4]))
    b = m(padded, torch.tensor([4]))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_transformer_math_and_fused_attention_agree():
    torch.manual_seed(0)
    spec = {"kind": "text", "vocab_size": 50, "pad_id": 0, "has_cls": True}
    a = TransformerClassifier(TransformerClassifierConfig(dim=16, num_heads=4, attention="math"), spec, 3).eval()
    b = TransformerClassifier(TransformerClassifierConfig(dim=16, num_heads=4, attention="sdpa"), spec, 3).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randint(1, 50, (3, 7))
    lengths = torch.tensor([7, 3, 5])
    torch.testing.assert_close(a(x, lengths), b(x, lengths), atol=1e-5, rtol=1e-5)


def test_model_options_are_validated():
    bad = seq_recipe(source="digits")
    bad["model"] = {"name": "transformer-classifier", "dim": 30, "num_heads": 4}
    with pytest.raises(UserError, match="dim 30 is not divisible by num_heads 4"):
        validate_recipe(bad)
    bad["model"] = {"name": "embedding-bag"}
    with pytest.raises(UserError, match="does not do task 'sequence_classification'"):
        validate_recipe(bad)
    img = seq_recipe(source="digits")
    img["task"] = "image_classification"
    with pytest.raises(UserError, match="does not do task 'image_classification'"):
        validate_recipe(img)
    wrong = seq_recipe(source="tweets")
    with pytest.raises(UserError, match="data.source 'tweets' does not apply to task 'sequence_classification'"):
        validate_recipe(wrong)


# ------------------------------------------------------------------------------------------ end to end (the CLI)
def test_train_evaluate_predict_sequences_cli(tmp_path):
    tr, ltr = toy_series(60, 0)
    te, lte = toy_series(20, 1)
    write_ts(tmp_path / "Toy_TRAIN.ts", tr, ltr)
    write_ts(tmp_path / "Toy_TEST.ts", te, lte)
    recipe = seq_recipe(source="ts", path=str(tmp_path))
    recipe["train"].update(epochs=15, optimizer={"name": "adamw", "lr": 0.02})
    (tmp_path / "r.yaml").write_text(json.dumps(recipe))
    res = run_cli("train", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "run"))
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["metrics"]["accuracy"] >= 0.9  # rising vs falling is easy
    ev = run_cli("evaluate", str(tmp_path / "run"), "--json")
    got = json.loads(ev.stdout)
    assert set(got) >= {"accuracy", "macro_f1", "macro_precision", "macro_recall", "per_class", "confusion_matrix"}
    assert got["accuracy"] == summary["metrics"]["accuracy"]
    pr = run_cli("predict", str(tmp_path / "run"), str(tmp_path / "Toy_TEST.ts"), "--json")
    assert pr.returncode == 0, pr.stderr
    preds = json.loads(pr.stdout)["predictions"]
    assert len(preds) == 20
    acc = np.mean([p["label"] == lbl for p, lbl in zip(preds, lte, strict=True)])
    assert acc == pytest.approx(got["accuracy"])  # predict and evaluate see the same preprocessing
    np.save(tmp_path / "one.npy", te[0])
    one = json.loads(run_cli("predict", str(tmp_path / "run"), str(tmp_path / "one.npy"), "--json").stdout)
    assert one["predictions"][0]["label"] == preds[0]["label"]
    np.save(tmp_path / "wrong.npy", np.zeros((4, 5)))
    bad = run_cli("predict", str(tmp_path / "run"), str(tmp_path / "wrong.npy"))
    assert bad.returncode == 2 and "expected (steps, 2) values, got shape (4, 5)" in bad.stderr
    assert "Traceback" not in bad.stderr
