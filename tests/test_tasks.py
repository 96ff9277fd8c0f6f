"""Task specs: every task in the recipe schema has exactly one registered spec, unknown tasks are errors, and the
API reaches data, loaders, objectives and predictions only through the spec."""

from __future__ import annotations

import typing

import pytest
import torch

from bigmodel import api
from bigmodel.config import TaskName, validate_recipe
from bigmodel.errors import UserError
from bigmodel.tasks import TaskSpec, get_task, register_task, task_names
from conftest import tiny_recipe


def test_every_schema_task_has_one_spec():
    assert task_names() == sorted(typing.get_args(TaskName))
    for name in task_names():
        spec = get_task(name)
        assert isinstance(spec, TaskSpec) and spec.name == name and spec.kind


def test_unknown_task_is_a_one_line_error_and_names_are_unique():
    with pytest.raises(UserError, match="unknown task 'nope'; expected one of: audio_classification, image_class"):
        get_task("nope")
    with pytest.raises(ValueError, match="registered twice"):
        register_task(get_task("translation"))


def test_the_experiment_is_built_from_the_spec():
    recipe = validate_recipe(tiny_recipe(**{"data.balance": "oversample"}))
    spec = get_task(recipe.task)
    exp = api.build_experiment(recipe)
    assert exp.preprocess.kind == spec.kind == "image"
    train = exp.loader("train", train=True)
    assert train.plan.mode == "oversample" and exp.loader("val").plan.mode == "sequential"
    # the spec's loader shards by rank: two ranks see each global batch once between them
    halves = [spec.loader(recipe, exp.data, exp.preprocess, "val", rank=r, world_size=2, batch_size=16) for r in (0, 1)]
    seen = sum(len(y) for h in halves for _, y in h.epoch(0))
    assert seen == len(exp.data.val.y)
    loss = exp.task.loss(exp.model, next(iter(train.epoch(0))))
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_predict_goes_through_the_task_spec(tmp_path):
    run = api.train(validate_recipe(tiny_recipe()), out=tmp_path / "run", progress=False).run_dir
    with pytest.raises(UserError, match="give files, not text"):
        api.predict(run, texts=["hello"])
    with pytest.raises(UserError, match="nope.png: image file not found"):
        api.predict(run, [tmp_path / "nope.png"])


def test_recipe_models_lists_tasks_and_capabilities():
    from conftest import run_cli

    p = run_cli("recipe", "models")
    rows = {line.split("\t")[0]: line.split("\t") for line in p.stdout.splitlines()}
    assert p.returncode == 0 and rows["mlp"][1] == "tabular_classification"
    assert "convnet" in rows["cnn-small"][2].split(", ") and "generates" in rows["gpt"][2].split(", ")
