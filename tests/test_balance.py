"""Class imbalance: the imbalanced split, over/under-sampling, class weights, focal loss, per-class recall."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bigmodel.api import build_experiment
from bigmodel.config import ImageDataConfig, ImbalanceConfig, validate_recipe
from bigmodel.data.loader import BatchLoader, Normalizer
from bigmodel.data.sources import ImageSplit, load_data, make_imbalanced
from bigmodel.errors import UserError
from bigmodel.tasks.classification import ClassificationTask
from conftest import tiny_recipe


def test_make_imbalanced_keeps_a_fraction_of_the_chosen_classes():
    y = torch.arange(1000) % 4
    split = ImageSplit(torch.zeros(1000, 1, 2, 2, dtype=torch.uint8), y)
    out = make_imbalanced(split, ["a", "b", "c", "d"], ["b", 3], keep=0.1, seed=0)
    assert torch.bincount(out.y).tolist() == [250, 25, 250, 25]
    again = make_imbalanced(split, ["a", "b", "c", "d"], ["b", 3], keep=0.1, seed=0)
    assert torch.equal(out.y, again.y)
    with pytest.raises(UserError, match="data.imbalance.classes: 'z' is not a class"):
        make_imbalanced(split, ["a", "b", "c", "d"], ["z"], keep=0.1, seed=0)


def test_imbalance_applies_to_train_only():
    cfg = ImageDataConfig(source="digits", imbalance=ImbalanceConfig(classes=[0, 1], keep=0.2))
    ds = load_data(cfg, seed=0)
    counts = torch.bincount(ds.train.y).tolist()
    assert counts[0] < counts[2] / 3 and counts[1] < counts[2] / 3
    val = torch.bincount(ds.val.y).tolist()
    assert min(val) >= max(val) - 2  # val and test stay stratified, i.e. balanced here


@pytest.mark.parametrize("sampling", ["oversample", "undersample"])
def test_balanced_sampling_draws_every_class_equally(sampling):
    y = torch.tensor([0] * 90 + [1] * 9 + [2] * 21)
    split = ImageSplit(torch.arange(len(y), dtype=torch.uint8).view(-1, 1, 1, 1), y)
    loader = BatchLoader(split, 10, Normalizer([0.0], [1.0]), shuffle=True, seed=0, sampling=sampling)
    order = loader.order(0)
    counts = torch.bincount(y[order]).tolist()
    per = 90 if sampling == "oversample" else 9
    assert counts == [per] * 3 and len(loader) == -(-3 * per // 10)
    if sampling == "oversample":
        assert set(order.tolist()) == set(range(len(y)))  # every example appears at least once
    assert torch.equal(order, loader.order(0)) and not torch.equal(order, loader.order(1))
    seen = torch.cat([b[1] for b in loader.epoch(0)])
    assert torch.bincount(seen).tolist() == [per] * 3


def test_class_weights_are_inverse_frequency_and_enter_the_loss():
    recipe = validate_recipe(
        tiny_recipe(**{"data.balance": "class_weights", "data.imbalance": {"classes": [0], "keep": 0.1}})
    )
    exp = build_experiment(recipe)
    counts = torch.bincount(exp.data.train.y).float()
    w = exp.task.class_weights
    torch.testing.assert_close(w, counts.sum() / (10 * counts))
    assert w[0] > 5 * w[1]
    logits, y = torch.randn(32, 10), torch.arange(32) % 10
    model = lambda x: x  # noqa: E731  (the task only needs a callable that returns logits)
    torch.testing.assert_close(exp.task.loss(model, (logits, y)), F.cross_entropy(logits, y, weight=w))


def test_focal_loss():
    logits, y = torch.randn(64, 5), torch.arange(64) % 5
    ident = lambda x: x  # noqa: E731
    ce = ClassificationTask(5).loss(ident, (logits, y))
    torch.testing.assert_close(ClassificationTask(5, loss="focal", focal_gamma=0.0).loss(ident, (logits, y)), ce)
    focal = ClassificationTask(5, loss="focal", focal_gamma=2.0).loss(ident, (logits, y))
    assert focal < ce
    # Confident correct predictions cost almost nothing under focal loss.
    easy = torch.full((4, 5), -10.0)
    easy[torch.arange(4), torch.arange(4)] = 10.0
    assert ClassificationTask(5, loss="focal").loss(ident, (easy, torch.arange(4))) < 1e-12
    soft = F.one_hot(y, 5).float()
    torch.testing.assert_close(ClassificationTask(5, loss="focal").loss(ident, (logits, soft)), focal)


def test_recipe_keys_validate():
    with pytest.raises(UserError, match="data.balance: Input should be 'none', 'oversample'"):
        validate_recipe(tiny_recipe(**{"data.balance": "smote"}))
    with pytest.raises(UserError, match="data.imbalance.keep: Input should be greater than 0"):
        validate_recipe(tiny_recipe(**{"data.imbalance": {"classes": [1], "keep": 0}}))
    with pytest.raises(UserError, match="train.loss: Input should be 'cross_entropy' or 'focal'"):
        validate_recipe(tiny_recipe(**{"train.loss": "hinge"}))
