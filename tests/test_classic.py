"""The classic baselines as registered models (`linear`, `tfidf-linear`): trained through `bigmodel train` on the
recipe's own split, equal to scikit-learn (and to `train.baseline`) on it, and then predicted, served, exported to
ONNX and reloaded like every other model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from bigmodel import api
from bigmodel.config import validate_recipe
from bigmodel.data.text import load_tokenizer
from bigmodel.evaluation.baseline import run as fit_baseline
from bigmodel.runs import load_artifact
from bigmodel.serving.server import create_app
from conftest import make_image_folder, run_cli
from test_baseline import sklearn_pipeline, write_topics

NGRAMS = {"kind": "ngrams", "vocab_size": 1_000_000, "max_length": 65_536, "normalization": "none"}


def tfidf_recipe(path, **model):
    return {
        "name": "topics-tfidf",
        "task": "text_classification",
        "data": {"source": "csv", "path": str(path), "val_fraction": 0.2, "test_fraction": 0.2, "tokenizer": NGRAMS},
        "model": {"name": "tfidf-linear", **model},
        "train": {"batch_size": 32},
        "seed": 3,
    }


def test_tfidf_linear_is_scikit_learns_tfidf_and_serves_predicts_and_exports(tmp_path):
    path = write_topics(tmp_path / "topics.csv", n=300)
    recipe_file = tmp_path / "tfidf.yaml"
    import yaml

    recipe_file.write_text(yaml.safe_dump(tfidf_recipe(path)), encoding="utf-8")
    run = tmp_path / "run"
    proc = run_cli("train", str(recipe_file), "--out", str(run), check=True)
    assert "by its solver" in proc.stderr

    c, est, d = sklearn_pipeline(validate_recipe(tfidf_recipe(path)))
    # the n-gram vocabulary is scikit-learn's, in its column order
    tok = load_tokenizer(run / "model" / "tokenizer.json")
    words, chars = est[0].transformer_list[0][1], est[0].transformer_list[1][1]
    assert tok.words == list(words.get_feature_names_out())
    assert tok.chars == list(chars.get_feature_names_out())
    # the same C, and the same probabilities on the test texts (the model computes TF-IDF in float32 torch)
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert log[0]["event"] == "solver" and log[0]["C"] == c
    art = load_artifact(run)
    ours = art.predict_texts_proba(d.test.texts).numpy()
    np.testing.assert_allclose(ours, est.predict_proba(d.test.texts), atol=2e-5)
    summary = json.loads((run / "summary.json").read_text())
    sk_accuracy = float((est.predict(d.test.texts) == d.test.y.numpy()).mean())
    assert summary["metrics"]["accuracy"] == pytest.approx(sk_accuracy)
    assert "baseline" not in summary  # the model is the baseline: no second fit beside it
    assert summary["steps"] == 0 and summary["epochs_done"] == 1

    # predict (CLI), serve (equal answers), ONNX export with parity, and evaluate again from the artifact
    texts = ["the coach of the team scored a goal", "a spicy soup with bread"]
    out = run_cli("predict", str(run), *texts, "--json", check=True)
    expected = api.predict(run, texts=texts, top_k=2)
    labels = [r["label"] for r in json.loads(out.stdout)["predictions"]]
    assert labels == [e["label"] for e in expected] == ["sport", "food"]
    with TestClient(create_app(art)) as client:
        got = client.post("/v1/predict", json={"inputs": texts, "top_k": 2}).json()["predictions"]
    assert [g["label"] for g in got] == ["sport", "food"]
    assert [g["score"] for g in got] == pytest.approx([e["score"] for e in expected], abs=1e-6)
    pytest.importorskip("onnxruntime")
    exp = run_cli("export", str(run), "--format", "onnx", "--out", str(tmp_path / "onnx"), "--json", check=True)
    assert json.loads(exp.stdout)["parity"]["passed"] is True
    again = api.evaluate(run, "test")
    assert again["accuracy"] == summary["metrics"]["accuracy"]


def test_tfidf_linear_needs_the_ngram_tokenizer(tmp_path):
    import yaml

    path = write_topics(tmp_path / "topics.csv", n=60)
    r = tfidf_recipe(path)
    r["data"]["tokenizer"] = {"kind": "word"}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(r), encoding="utf-8")
    proc = run_cli("train", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "run"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "data.tokenizer.kind: ngrams" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_ngram_tokenizer_round_trip_and_limits(tmp_path):
    from bigmodel.config import TokenizerConfig
    from bigmodel.data.text import encode, train_tokenizer

    texts = ["Ça va très bien", "very good food", "good good good"]
    tok = train_tokenizer(TokenizerConfig(kind="ngrams", min_frequency=1), texts)
    (tmp_path / "tokenizer.json").write_text(tok.to_str(), encoding="utf-8")
    back = load_tokenizer(tmp_path / "tokenizer.json")
    x, n = encode(tok, texts + ["qqq qqq"])
    y, m = encode(back, texts + ["qqq qqq"])
    assert torch.equal(x, y) and torch.equal(n, m)
    assert tok.id_to_token(5) == tok.words[0] and tok.words[0] == "bien"
    assert int(n[-1]) == 1 and int(x[-1, 0]) == 0  # nothing known: one padding id, which the model ignores
    assert tok.decode(x[2, : n[2]].tolist()) == "good good good"
    capped = train_tokenizer(TokenizerConfig(kind="ngrams", min_frequency=1, vocab_size=20, max_length=6), texts)
    assert capped.get_vocab_size() == 20 and max(len(e.ids) for e in capped.encode_batch(texts)) == 6
    # the n-grams in the most texts are kept ("good": 2 texts), not those in one ("bien")
    assert " good" in capped.chars and "bien" not in capped.words and " bi" not in capped.chars


@pytest.mark.parametrize("kind", ["image", "sequence", "table"])
def test_linear_model_equals_the_baseline_on_the_same_split(kind, tmp_path):
    if kind == "image":
        make_image_folder(tmp_path / "img", classes=("a", "b", "c"), per_class=20, splits=("train", "test"))
        data = {"source": "image_folder", "path": str(tmp_path / "img"), "val_fraction": 0.2}
        task = "image_classification"
    elif kind == "sequence":
        data, task = {"source": "ts", "name": "JapaneseVowels", "val_fraction": 0.2}, "sequence_classification"
    else:
        data, task = {"source": "wine"}, "tabular_classification"
    recipe = validate_recipe(
        {"task": task, "data": data, "model": {"name": "linear"}, "train": {"batch_size": 32}, "seed": 1}
    )
    result = api.train(recipe, out=tmp_path / "run", progress=False)
    exp = api.build_experiment(recipe)
    base = fit_baseline(recipe, exp.data, exp.preprocess, "test")
    # the same features and solver: equal up to float32 rounding (images: normalised vs raw pixels, standardised)
    n = result.metrics["num_examples"]
    assert abs(result.metrics["accuracy"] - base["accuracy"]) <= 1.0 / n + 1e-9
    assert result.metrics["accuracy"] >= 0.9
    if kind == "image":  # gradients explain it (saliency); Grad-CAM needs a convnet and says so in one line
        png = str(sorted((tmp_path / "img" / "test" / "a").glob("*.png"))[0])
        ok = run_cli("explain", str(result.run_dir), png, "--method", "saliency", "--out", str(tmp_path / "ex"))
        assert ok.returncode == 0, ok.stderr
        bad = run_cli("explain", str(result.run_dir), png, "--method", "gradcam", "--out", str(tmp_path / "ex"))
        assert bad.returncode == 2 and "has none" in bad.stderr and "Traceback" not in bad.stderr
    # reloaded from the artifact, exported through torch.export and run again: the same answers
    art = load_artifact(result.run_dir)
    batch = next(iter(exp.loader("test").epoch(0)))[0]
    inputs = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
    with torch.no_grad():
        ref = art.model(*inputs)
        ep = torch.export.export(art.model, inputs, strict=False)
        torch.testing.assert_close(ep.module()(*inputs), ref, rtol=1e-5, atol=1e-5)


def test_tfidf_forward_equals_its_dense_rows_with_repeated_and_padded_ids():
    from bigmodel.models import build_model

    shape = {"kind": "text", "vocab_size": 40, "pad_id": 0, "has_cls": False, "ngram_words": [5, 20]}
    model = build_model("tfidf-linear", {}, shape, 3)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.idf.copy_(1 + torch.rand(40, generator=g))
        model.head.weight.normal_(generator=g)
    ids = torch.tensor([[7, 25, 7, 7, 30, 25, 0, 0], [39, 5, 5, 21, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0]])
    lengths = torch.tensor([6, 4, 1])
    dense = model.forward_features(ids, lengths)
    # row 0 by hand: words {7: 3 times}, characters {25: 2, 30: 1}; each part L2-normalised
    tf = torch.zeros(40)
    tf[7], tf[25], tf[30] = 1 + np.log(3), 1 + np.log(2), 1.0
    x = tf * model.idf
    expected = torch.cat([x[:20] / x[:20].norm(), x[20:] / x[20:].norm()])
    torch.testing.assert_close(dense[0], expected)
    assert torch.equal(dense[2], torch.zeros(40))  # nothing but padding: an all-zero row, the bias alone
    torch.testing.assert_close(model(ids, lengths), model.forward_head(dense), rtol=1e-5, atol=1e-6)


def test_gradient_boosting_is_scikit_learns_trees_evaluated_in_torch(tmp_path):
    from sklearn.ensemble import HistGradientBoostingClassifier

    recipe = validate_recipe(
        {
            "task": "tabular_classification",
            "data": {"source": "wine"},
            "model": {"name": "gradient-boosting", "max_iter": 30},
            "train": {"batch_size": 32},
            "seed": 2,
        }
    )
    result = api.train(recipe, out=tmp_path / "run", progress=False)
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    trees, nodes, depth = config["model"]["fitted"]  # the artifact rebuilds the fitted ensemble's shape
    assert trees == 30 * 3 and depth >= 1
    # scikit-learn on the same features (numeric columns + one-hot categories) and seed
    exp = api.build_experiment(recipe)
    art = load_artifact(result.run_dir)

    def features(split):
        xs, ys = [], []
        for (num, cat), y in exp.loader(split).epoch(0):
            xs.append(art.model.raw_features(num, cat).numpy())
            ys.append(y.numpy())
        return np.concatenate(xs), np.concatenate(ys), num, cat

    x, y, _, _ = features("train")
    est = HistGradientBoostingClassifier(max_iter=30, random_state=2).fit(x, y)
    probs, got = [], []
    for (num, cat), _ in exp.loader("test").epoch(0):
        with torch.no_grad():
            got.append(art.model(num, cat).softmax(1).numpy())
        probs.append(est.predict_proba(art.model.raw_features(num, cat).numpy()))
    np.testing.assert_allclose(np.concatenate(got), np.concatenate(probs), atol=1e-5)
    assert result.metrics["accuracy"] >= 0.85
    pytest.importorskip("onnxruntime")
    exp_out = run_cli("export", str(result.run_dir), "--format", "onnx", "--out", str(tmp_path / "onnx"), "--json")
    assert exp_out.returncode == 0, exp_out.stderr
    assert json.loads(exp_out.stdout)["parity"]["passed"] is True
