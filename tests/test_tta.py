"""Test-time flip averaging: stored with the model, used by evaluate and predict alike."""

from __future__ import annotations

import json

import torch

from bigmodel.api import evaluate, train
from bigmodel.config import validate_recipe
from bigmodel.runs import load_artifact
from conftest import tiny_recipe


def test_tta_flip_travels_with_the_artifact(tmp_path):
    recipe = validate_recipe(tiny_recipe(**{"eval.tta_flip": True, "train.epochs": 1}))
    result = train(recipe, out=tmp_path / "run", progress=False)
    assert json.loads((tmp_path / "run" / "model" / "preprocess.json").read_text())["tta_flip"] is True
    art = load_artifact(tmp_path / "run")
    x = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    with torch.inference_mode():
        xn = art.normalizer(x)
        expected = ((art.model(xn) + art.model(xn.flip(3))) / 2).softmax(1)
        plain = art.model(xn).softmax(1)
    torch.testing.assert_close(art.predict_proba(x), expected)
    assert not torch.allclose(plain, expected)  # flipping really changes the answer
    assert evaluate(tmp_path / "run")["accuracy"] == result.metrics["accuracy"]
