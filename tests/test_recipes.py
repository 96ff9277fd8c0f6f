"""Every shipped recipe trains in its debug size (1 epoch on a few hundred images) through the real CLI."""

from __future__ import annotations

import json

import pytest

from bigmodel.config import load_recipe
from bigmodel.data import standard
from conftest import ROOT, run_cli

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_debug_size_trains(path, tmp_path):
    recipe = load_recipe(path)
    if (
        recipe.data.source == "fashion_mnist"
        and recipe.data.path is None
        and not standard.has_idx_files(standard.IDX_SETS["fashion_mnist"].local_dirs[0])
    ):
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    out = tmp_path / "run"
    run_cli(
        "train", str(path), "train.epochs=1", "data.limit_train=512", "--out", str(out), "--no-progress", check=True
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] >= 1 and 0.0 <= summary["metrics"]["accuracy"] <= 1.0
    assert (out / "model" / "model.safetensors").is_file()
