"""Every shipped recipe trains in its debug size (1 epoch on at most 512 examples) through the real CLI.

Recipes whose data is not available offline (MNIST, CIFAR, IMDB) train on a small fixture written in the data set's true
on-disk format, passed as `data.path`.
"""

from __future__ import annotations

import json

import pytest

from bigmodel.config import load_recipe
from bigmodel.data import standard
from conftest import ROOT, run_cli, write_aclimdb_fixture, write_cifar_fixture, write_fashion_fixture

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_debug_size_trains(path, tmp_path):
    recipe = load_recipe(path)
    extra = []
    source = recipe.data.source
    if source == "fashion_mnist" and not standard.has_idx_files(standard.IDX_SETS["fashion_mnist"].local_dirs[0]):
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    if source in ("mnist", "kmnist"):
        write_fashion_fixture(tmp_path / "idx", n_train=300, n_test=50)
        extra = [f"data.path={tmp_path / 'idx'}"]
    elif source in ("cifar10", "cifar100"):
        write_cifar_fixture(tmp_path / "cifar", source, n_train=300, n_test=50)
        extra = [f"data.path={tmp_path / 'cifar'}"]
    elif source == "aclimdb":
        extra = [f"data.path={write_aclimdb_fixture(tmp_path / 'aclImdb', n_train=40, n_test=10)}"]
    out = tmp_path / "run"
    run_cli(
        "train",
        str(path),
        "train.epochs=1",
        "data.limit_train=512",
        *extra,
        "--out",
        str(out),
        "--no-progress",
        check=True,
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] >= 1 and 0.0 <= summary["metrics"]["accuracy"] <= 1.0
    assert (out / "model" / "model.safetensors").is_file()
