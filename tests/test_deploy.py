"""Export with parity checks, int8 quantization, structured and unstructured pruning, distillation."""

from __future__ import annotations

import json

import pytest
import torch

from bigmodel import api
from bigmodel.config import validate_recipe
from bigmodel.deploy import export as export_mod
from bigmodel.deploy.compress import compress, prune_channels
from bigmodel.deploy.quantize import Int8Embedding, Int8Linear, quantize_model
from bigmodel.errors import UserError
from bigmodel.models import build_model
from bigmodel.runs import load_artifact
from conftest import run_cli, tiny_recipe


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("img") / "run"
    api.train(validate_recipe(tiny_recipe(**{"train.epochs": 3})), out=out, progress=False)
    return out


def text_csv(path, n=120):
    good = ["great fun and a wonderful story", "truly wonderful acting", "a great film", "loved it"]
    bad = ["boring and awful", "a dull terrible plot", "awful dialogue, dull film", "hated it"]
    rows = ["text,label"] + [
        f'"{(good if i % 2 else bad)[(i // 2) % 4]}",{"pos" if i % 2 else "neg"}' for i in range(n)
    ]
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("txt")
    recipe = {
        "task": "text_classification",
        "data": {"source": "csv", "path": str(text_csv(d / "r.csv")), "tokenizer": {"min_frequency": 1}},
        "model": {"name": "transformer-classifier", "dim": 32, "num_heads": 4, "num_layers": 2, "dropout": 0.0},
        "train": {"epochs": 4, "batch_size": 16, "optimizer": {"name": "adamw", "lr": 0.005}},
    }
    api.train(validate_recipe(recipe), out=d / "run", progress=False)
    return d / "run"


@pytest.fixture(scope="module")
def seq_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("seq")
    recipe = {
        "task": "sequence_classification",
        "data": {"source": "ts", "name": "JapaneseVowels", "val_fraction": 0.1},
        "model": {"name": "lstm-classifier", "hidden_size": 16, "num_layers": 1},
        "train": {"epochs": 2, "batch_size": 32},
    }
    api.train(validate_recipe(recipe), out=d / "run", progress=False)
    return d / "run"


# --------------------------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "exported-program"])
def test_export_image_model_with_parity(image_run, tmp_path, fmt):
    report = export_mod.export(image_run, fmt, tmp_path / "bundle")
    assert report["parity"]["passed"] and report["parity"]["max_abs_diff"] <= 1e-4
    assert report["parity"]["checked_inputs"] > 100  # real test inputs, not one dummy
    files = {p.name for p in (tmp_path / "bundle").iterdir()}
    assert {"labels.json", "preprocess.json", "config.json", "export.json", export_mod.FILENAMES[fmt]} <= files


def test_onnx_bundle_runs_alone_on_raw_pixels(image_run, tmp_path):
    """The edge bundle: ONNX Runtime + labels.json, fed raw pixel values, gives `bigmodel predict`'s labels."""
    import numpy as np
    import onnxruntime as ort
    from sklearn.datasets import load_digits

    export_mod.export(image_run, "onnx", tmp_path / "b")
    labels = json.loads((tmp_path / "b" / "labels.json").read_text())
    sess = ort.InferenceSession(str(tmp_path / "b" / "model.onnx"))
    imgs = np.rint(load_digits().images[:7] * (255 / 16)).astype(np.float32)[:, None]
    logits = sess.run(None, {"pixels": imgs})[0]
    art = load_artifact(image_run)
    ref = art.predict_proba(torch.from_numpy(imgs).to(torch.uint8)).argmax(1).tolist()
    assert [labels[i] for i in logits.argmax(1)] == [art.labels[i] for i in ref]


@pytest.mark.parametrize("which", ["text_run", "seq_run"])
def test_export_text_and_sequence_models_to_onnx(request, tmp_path, which):
    run = request.getfixturevalue(which)
    report = export_mod.export(run, "onnx", tmp_path / "bundle")
    assert report["parity"]["passed"], report["parity"]
    assert [i["name"] for i in report["inputs"]] == ["x", "lengths"]


def test_parity_failure_is_reported_not_hidden(image_run, tmp_path, monkeypatch):
    real = export_mod._run_exported
    monkeypatch.setattr(export_mod, "_run_exported", lambda *a: tuple(t + 1e-3 for t in real(*a)))
    with pytest.raises(UserError, match=r"parity check FAILED: exported onnx differs from eager by 0.001"):
        export_mod.export(image_run, "onnx", tmp_path / "bundle")
    report = json.loads((tmp_path / "bundle" / "export.json").read_text())
    assert report["parity"]["passed"] is False and report["parity"]["max_abs_diff"] == pytest.approx(1e-3, abs=1e-4)


def test_export_cli(image_run, tmp_path):
    res = run_cli("export", str(image_run), "--format", "onnx", "--out", str(tmp_path / "e"))
    assert res.returncode == 0, res.stderr
    assert "parity ok" in res.stdout and res.stdout.strip().splitlines()[-1] == str(tmp_path / "e")
    again = run_cli("export", str(image_run), "--format", "onnx", "--out", str(tmp_path / "e"))
    assert again.returncode == 2 and "already exists" in again.stderr
    bad = run_cli("export", str(image_run), "--format", "tflite", "--out", str(tmp_path / "f"))
    assert bad.returncode == 2 and "expected one of onnx, torchscript, exported-program" in bad.stderr


# ----------------------------------------------------------------------------------------------------- quantize
def test_int8_layers_match_float_closely():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    x = torch.randn(5, 7, 64)
    for mode in ("dynamic",):
        q = Int8Linear.from_float(lin, mode)
        rel = (q(x) - lin(x)).norm() / lin(x).norm()
        assert rel < 0.02, (mode, rel)
    emb = torch.nn.Embedding(50, 16, padding_idx=0)
    with torch.no_grad():
        emb.weight[0].zero_()
    qe = Int8Embedding.from_float(emb)
    ids = torch.randint(0, 50, (3, 9))
    assert torch.allclose(qe(ids), emb(ids), atol=emb.weight.abs().max().item() / 100)
    assert torch.all(qe(torch.zeros(1, 2, dtype=torch.long)) == 0)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_int8_lstm_matches_float_lstm_closely(bidirectional):
    """The RNN classifier with int8 LSTM weights (FBGEMM dynamic kernel), padded and packed paths."""
    from bigmodel.deploy.quantize import Int8LSTM
    from bigmodel.models.sequence import RNNClassifier, RNNConfig

    torch.manual_seed(0)
    cfg = RNNConfig(hidden_size=32, num_layers=2, bidirectional=bidirectional)
    m = RNNClassifier(cfg, {"kind": "sequence", "features": 6}, 4).eval()
    x, lengths = torch.randn(5, 9, 6), torch.tensor([9, 4, 7, 2, 9])
    ref = m.forward_features(x, lengths)
    q, replaced = quantize_model(m, "dynamic")
    assert isinstance(q.rnn, Int8LSTM) and "rnn" in replaced
    got = q.forward_features(x, lengths)
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()


def test_quantize_text_model_shrinks_and_reloads(text_run, tmp_path):
    report = compress(text_run, "quantize", tmp_path / "q")
    assert report["size_ratio"] < 0.45, report
    assert abs(report["accuracy_change_points"]) <= 5.0
    assert "size x" in report["verdict"]
    art = load_artifact(tmp_path / "q")
    assert any(isinstance(m, Int8Linear) for m in art.model.modules())
    texts = ["a great film", "hated it"]
    assert [p["label"] for p in api.predict(tmp_path / "q", texts=texts)] == ["pos", "neg"]
    p1, p2 = art.predict_texts_proba(texts), load_artifact(tmp_path / "q").predict_texts_proba(texts)
    assert torch.equal(p1, p2)
    assert api.evaluate(tmp_path / "q")["accuracy"] == report["after"]["accuracy"]
    # the source run is untouched
    assert not any(isinstance(m, Int8Linear) for m in load_artifact(text_run).model.modules())


def test_quantize_model_replaces_linear_and_embedding():
    spec = {"kind": "text", "vocab_size": 40, "pad_id": 0, "has_cls": True}
    m = build_model("transformer-classifier", {"dim": 16, "num_heads": 2}, spec, 3).eval()
    _, replaced = quantize_model(m, "dynamic")
    assert "embed" in replaced and "head" in replaced and any("q_proj" in r for r in replaced)


# -------------------------------------------------------------------------------------------------------- prune
def test_structured_pruning_of_dead_channels_is_exact():
    """Channels whose BN scale and shift are zero contribute nothing; removing exactly them keeps every output."""
    torch.manual_seed(0)
    big = build_model("cnn-small", {"widths": [8, 16], "dropout": 0.0}, (1, 8, 8), 10).eval()
    with torch.no_grad():
        for m in big.features:
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                dead = torch.randperm(m.num_features)[: m.num_features // 2]
                m.weight[dead] = 0.0
                m.bias[dead] = 0.0
    small = build_model("cnn-small", {"widths": [4, 8], "dropout": 0.0}, (1, 8, 8), 10).eval()
    prune_channels(big, small)
    x = torch.randn(6, 1, 8, 8)
    torch.testing.assert_close(small(x), big(x), atol=1e-5, rtol=1e-5)


def test_structured_prune_cli_makes_a_smaller_model(image_run, tmp_path):
    res = run_cli(
        "compress", str(image_run), "--method", "prune", "--amount", "0.5", "--out", str(tmp_path / "p"), "--json"
    )
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["after"]["parameters"] < 0.4 * report["before"]["parameters"]
    assert report["size_ratio"] < 0.4
    cfg = json.loads((tmp_path / "p" / "model" / "config.json").read_text())
    assert cfg["model"]["widths"] == [4, 8]
    assert api.evaluate(tmp_path / "p")["accuracy"] == report["after"]["accuracy"]
    same = run_cli("compress", str(image_run), "--method", "prune", "--out", str(image_run))
    assert same.returncode == 2 and "never overwrites its input" in same.stderr


def test_unstructured_prune_keeps_zeros_and_says_it_is_not_smaller(image_run, tmp_path):
    report = compress(image_run, "prune", tmp_path / "u", structured=False, amount=0.6, finetune_epochs=1)
    art = load_artifact(tmp_path / "u")
    w = torch.cat(
        [m.weight.flatten() for m in art.model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    )
    assert (w == 0).float().mean() >= 0.59  # the mask held through fine-tuning
    assert "NOT smaller" in report["verdict"]


def test_distillation_trains_the_student(image_run, tmp_path):
    student = tiny_recipe(**{"model.widths": [4, 8], "train.epochs": 2})
    (tmp_path / "s.yaml").write_text(json.dumps(student))
    report = compress(image_run, "distill", tmp_path / "d", student=tmp_path / "s.yaml", temperature=3.0, alpha=0.5)
    assert report["after"]["parameters"] < report["before"]["parameters"]
    assert report["after"]["accuracy"] > 0.5  # digits: the student learned
    other = tiny_recipe(**{"seed": 3})
    (tmp_path / "o.yaml").write_text(json.dumps(other))
    with pytest.raises(UserError, match="must equal the teacher run's"):
        compress(image_run, "distill", tmp_path / "d2", student=tmp_path / "o.yaml")


def test_static_int8_convnet_through_onnxruntime(image_run, tmp_path):
    report = compress(image_run, "quantize", tmp_path / "s", static=True, calibration=128)
    assert report["mode"] == "static"
    # On this 2-conv toy the ONNX graph's own bytes outweigh its int8 weights: the report must say so plainly.
    assert ("NOT smaller" in report["verdict"]) == (report["size_ratio"] >= 0.99)
    assert abs(report["accuracy_change_points"]) <= 3.0, report["verdict"]
    art = load_artifact(tmp_path / "s")
    assert (tmp_path / "s" / "model" / "model.onnx").is_file() and not (
        tmp_path / "s" / "model" / "model.safetensors"
    ).exists()
    assert api.evaluate(tmp_path / "s")["accuracy"] == report["after"]["accuracy"]
    from sklearn.datasets import load_digits

    imgs = torch.from_numpy((load_digits().images[:4] * (255 / 16)).round().astype("uint8"))[:, None]
    assert art.predict_proba(imgs).shape == (4, 10)
    with pytest.raises(UserError, match="static int8 \\(calibrated\\) is for image models"):
        compress(load_text_run_dir(tmp_path), "quantize", tmp_path / "t", static=True)


def load_text_run_dir(tmp_path):
    d = tmp_path / "txt"
    d.mkdir()
    recipe = {
        "task": "text_classification",
        "data": {"source": "csv", "path": str(text_csv(d / "r.csv")), "tokenizer": {"min_frequency": 1}},
        "model": {"name": "embedding-bag", "embedding_dim": 8},
        "train": {"epochs": 1, "batch_size": 16},
    }
    api.train(validate_recipe(recipe), out=d / "run", progress=False)
    return d / "run"
