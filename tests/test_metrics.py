"""Streaming metrics equal scikit-learn's on the same predictions, whatever the batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix, f1_score, precision_score, recall_score

from bigmodel.evaluation.metrics import ClassificationMetrics


@pytest.mark.parametrize("batch", [1, 7, 1000])
def test_matches_sklearn(batch):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 5, generator=g)
    y = torch.randint(0, 5, (300,), generator=g)
    y[y == 4] = 3  # class 4 never occurs in the targets; it may still be predicted
    m = ClassificationMetrics(5)
    for i in range(0, 300, batch):
        m.update(logits[i : i + batch], y[i : i + batch])
    out = m.compute()
    pred = logits.argmax(1).numpy()
    t = y.numpy()
    assert out["accuracy"] == pytest.approx((pred == t).mean())
    assert out["macro_precision"] == pytest.approx(precision_score(t, pred, average="macro", zero_division=0))
    assert out["macro_recall"] == pytest.approx(recall_score(t, pred, average="macro", zero_division=0))
    assert out["macro_f1"] == pytest.approx(f1_score(t, pred, average="macro", zero_division=0))
    np.testing.assert_array_equal(np.array(out["confusion_matrix"]), confusion_matrix(t, pred, labels=range(5)))
    per = recall_score(t, pred, average=None, labels=range(5), zero_division=0)
    assert [c["recall"] for c in out["per_class"]] == pytest.approx(per.tolist())
    assert [c["support"] for c in out["per_class"]] == np.bincount(t, minlength=5).tolist()


def test_loss_is_averaged_over_examples():
    m = ClassificationMetrics(2)
    m.update(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]), torch.tensor(3.0))
    m.update(torch.tensor([[1.0, 0.0]]), torch.tensor([1]), torch.tensor(1.0))
    out = m.compute()
    assert out["loss"] == pytest.approx(4.0 / 3) and out["accuracy"] == pytest.approx(1 / 3)
