"""The classic baseline beside every classifier (`train.baseline`): fitted on the run's own split, equal to
scikit-learn's numbers, shown by train, evaluate --json, runs compare and the report."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from bigmodel import api
from bigmodel.config import validate_recipe
from bigmodel.data.text import load_text
from bigmodel.evaluation.baseline import C_GRID, pooled
from conftest import make_image_folder, run_cli

TOPICS = {
    "sport": ["match", "goal", "team", "coach", "league", "score", "player", "season"],
    "food": ["recipe", "bread", "soup", "cheese", "dinner", "spicy", "bake", "salad"],
    "tech": ["laptop", "code", "software", "chip", "server", "update", "phone", "bug"],
}
NEUTRAL = ["today", "really", "the", "new", "again", "my", "friend", "said", "was", "very", "good", "bad"]


def write_topics(path, n=200, seed=0):
    """Short texts whose topic word gives the label, with shared filler and often a misleading word (noise)."""
    rng = np.random.default_rng(seed)
    names = list(TOPICS)
    lines = ["text,label"]
    for i in range(n):
        label = names[i % 3]
        words = [str(rng.choice(TOPICS[label]))] + list(rng.choice(NEUTRAL, 4))
        if rng.random() < 0.6:  # a word of another topic
            words.append(str(rng.choice(TOPICS[names[(i + 1) % 3]])))
        rng.shuffle(words)
        lines.append(f'"{" ".join(words)}",{label}')
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def text_recipe(path, **train):
    return {
        "name": "topics",
        "task": "text_classification",
        "data": {"source": "csv", "path": str(path), "val_fraction": 0.2, "test_fraction": 0.2},
        "model": {"name": "transformer-classifier", "dim": 16, "num_heads": 2, "num_layers": 1},
        "train": {"epochs": 1, "batch_size": 16, "log_every": 5, **train},
        "seed": 3,
    }


def sklearn_pipeline(recipe):
    """TF-IDF + logistic regression written with scikit-learn alone, C chosen on the validation split of the split
    bigmodel's loader makes: (C, the fitted pipeline, the data)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline, make_union

    d = load_text(recipe.data, recipe.seed)
    best = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for c in C_GRID:
            est = make_pipeline(
                make_union(
                    TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True),
                    TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), min_df=2, sublinear_tf=True),
                ),
                LogisticRegression(C=c, solver="saga", max_iter=100, random_state=recipe.seed),
            ).fit(d.train.texts, d.train.y.numpy())
            acc = float((est.predict(d.val.texts) == d.val.y.numpy()).mean())
            if best is None or acc > best[0]:
                best = (acc, c, est)
    return best[1], best[2], d


def sklearn_tfidf(recipe):
    """The baseline written out with scikit-learn alone: (C, test accuracy, test macro F1)."""
    from sklearn.metrics import accuracy_score, f1_score

    c, est, d = sklearn_pipeline(recipe)
    pred = est.predict(d.test.texts)
    y = d.test.y.numpy()
    return c, accuracy_score(y, pred), f1_score(y, pred, average="macro")


def test_text_baseline_is_scikit_learns_and_shown_everywhere(tmp_path):
    path = write_topics(tmp_path / "topics.csv")
    rec = text_recipe(path)
    (tmp_path / "r.yaml").write_text(json.dumps(rec))
    proc = run_cli("train", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "run"), "--no-progress", check=True)
    line = next(x for x in proc.stdout.splitlines() if " vs baseline " in x)
    assert line.startswith("model ") and "(tfidf-linear)" in line and "test accuracy" in line

    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    b = summary["baseline"]
    c, acc, f1 = sklearn_tfidf(validate_recipe(rec))
    assert b["model"] == "tfidf-linear" and b["split"] == "test" and b["C"] == c
    assert b["accuracy"] == pytest.approx(acc, abs=1e-6) and b["macro_f1"] == pytest.approx(f1, abs=1e-6)
    assert b["num_examples"] == 39 and b["train_examples"] == 128 and "val_accuracy" in b
    assert b["accuracy"] >= 0.6  # the topic word decides the label (chance: 1/3); noise words keep it below 100%
    assert f"{100 * b['accuracy']:.2f}%" in line

    ev = json.loads(run_cli("evaluate", str(tmp_path / "run"), "--json", check=True).stdout)
    assert ev["baseline"] == b and ev["accuracy"] == summary["metrics"]["accuracy"]
    val = json.loads(run_cli("evaluate", str(tmp_path / "run"), "--split", "val", "--json", check=True).stdout)
    assert "baseline" not in val  # fitted for the test split only: not passed off as the val split's
    shown = run_cli("evaluate", str(tmp_path / "run"), check=True).stdout
    assert "vs baseline (tfidf-linear)" in shown

    again = api.train(validate_recipe(text_recipe(path, baseline=False)), out=tmp_path / "off", progress=False)
    assert again.baseline is None and "baseline" not in json.loads((tmp_path / "off" / "summary.json").read_text())
    table = run_cli("runs", "compare", str(tmp_path / "run"), str(tmp_path / "off"), check=True).stdout
    assert "test_baseline_accuracy" in table and f"{b['accuracy']:.4f}" in table


def test_image_sequence_and_table_baselines(tmp_path):
    make_image_folder(tmp_path / "img", classes=("a", "b", "c"), per_class=20, splits=("train", "test"))
    img = api.train(
        validate_recipe(
            {
                "task": "image_classification",
                "data": {"source": "image_folder", "path": str(tmp_path / "img"), "val_fraction": 0.2},
                "model": {"name": "seed-cnn", "conv1_channels": 4, "conv2_channels": 4, "hidden": 8},
                "train": {"epochs": 1, "batch_size": 16},
            }
        ),
        out=tmp_path / "img-run",
        progress=False,
    )
    assert img.baseline["model"] == "linear" and img.baseline["num_examples"] == 60
    assert img.baseline["accuracy"] >= 0.9  # the folder's classes are distinct patterns: pixels separate them

    seq = api.train(
        validate_recipe(
            {
                "task": "sequence_classification",
                "data": {"source": "ts", "name": "JapaneseVowels", "val_fraction": 0.2},
                "model": {"name": "lstm-classifier", "hidden_size": 8, "num_layers": 1},
                "train": {"epochs": 1, "batch_size": 32},
            }
        ),
        out=tmp_path / "seq-run",
        progress=False,
    )
    # pooled LPC statistics identify the speaker well (published linear baselines: ~95%)
    assert seq.baseline["num_examples"] == 370 and seq.baseline["accuracy"] >= 0.9

    tab = api.train(
        validate_recipe(
            {
                "task": "tabular_classification",
                "data": {"source": "wine"},
                "model": {"name": "mlp", "hidden": [8]},
                "train": {"epochs": 1, "batch_size": 16},
            }
        ),
        out=tmp_path / "tab-run",
        progress=False,
    )
    assert tab.baseline["model"] == "linear" and tab.baseline["accuracy"] >= 0.9


def test_pooled_sequence_statistics_skip_padding():
    x = torch.tensor([[[1.0, 10.0], [3.0, 30.0], [0.0, 0.0]], [[5.0, -1.0], [0.0, 0.0], [0.0, 0.0]]])
    lengths = torch.tensor([2, 1])
    f = pooled(x, lengths)
    assert f.shape == (2, 13)
    np.testing.assert_allclose(f[0], [2, 20, 1, 10, 1, 10, 3, 30, 1, 10, 3, 30, 2])
    np.testing.assert_allclose(f[1], [5, -1, 0, 0, 5, -1, 5, -1, 5, -1, 5, -1, 1])


def test_report_puts_the_baseline_beside_the_model(tmp_path):
    path = write_topics(tmp_path / "topics.csv", n=90)
    a = api.train(validate_recipe(text_recipe(path)), out=tmp_path / "a", progress=False)
    b = api.train(validate_recipe(text_recipe(path, baseline=False)), out=tmp_path / "b", progress=False)
    from bigmodel.report import write_report

    one = write_report([a.run_dir])[0].read_text(encoding="utf-8")
    assert "baseline (tfidf-linear)" in one and f"{a.baseline['train_examples']} training examples" in one
    both = write_report([a.run_dir, b.run_dir], out=tmp_path / "cmp.html")[0].read_text(encoding="utf-8")
    assert "baseline_accuracy" in both


def test_a_baseline_that_cannot_be_fitted_is_skipped_not_fatal(capsys):
    from bigmodel.evaluation.baseline import BaselineFeatures, fit_or_skip

    y = np.array([0, 1, 0, 1])
    tiny = BaselineFeatures("tfidf-linear", ["a", "b", "a", "b"], y, None, None, ["a", "b"], y[:2])
    assert fit_or_skip(tiny, 2, ["x", "y"]) is None  # one-letter texts leave no word or repeated char n-gram
    assert "baseline (tfidf-linear) not fitted: " in capsys.readouterr().err
