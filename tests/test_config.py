"""Recipes: strict schema, field-path errors, overrides, JSON Schema, and every shipped recipe validates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bigmodel.config import apply_overrides, load_recipe, parse_override, recipe_json_schema, validate_recipe
from bigmodel.errors import UserError
from conftest import ROOT, run_cli, tiny_recipe

# Each malformed recipe and the text its one-line error must contain (the field path, and what was expected).
MALFORMED = [
    ({"trian": {"epochs": 1}}, "trian: unknown key"),
    ({"train.epochs": "ten"}, "train.epochs: expected a whole number from 1 to 100000 or 'auto', got 'ten'"),
    ({"train.epochs": 0}, "train.epochs: expected a whole number from 1 to 100000 or 'auto', got 0"),
    ({"train.optimizer.lr": -1}, "train.optimizer.lr: Input should be greater than 0"),
    ({"train.optimizer.name": "adagrad"}, "train.optimizer.name: Input should be 'sgd', 'adam' or 'adamw'"),
    ({"train.optimizer.momentum": 0.9}, "train.optimizer.momentum only applies to sgd"),
    (
        {"train.optimizer.name": "sgd", "train.optimizer.momentum": 0.0, "train.optimizer.nesterov": True},
        "train.optimizer.nesterov needs train.optimizer.momentum > 0",
    ),
    ({"train.schedule.name": "exponential"}, "train.schedule.name: Input should be"),
    ({"train.schedule.name": "onecycle", "train.schedule.warmup_steps": 10}, "warmup_steps does not apply to onecycle"),
    ({"data.source": "cifar11"}, "data.source: Input should be"),
    ({"data.source": "image_folder"}, "data.path is required when data.source is 'image_folder'"),
    ({"data.image_size": [28, 28]}, "data.image_size only applies to data.source 'image_folder'"),
    ({"data.val_fraction": 0.5, "data.test_fraction": 0.5}, "leaves too little to train on"),
    ({"model.name": "resnet-9000"}, "unknown model 'resnet-9000'"),
    ({"model.widths": "wide"}, "model.widths: Input should be a valid list"),
    ({"model.depth": 3}, "model.depth: unknown key"),
    ({"task": "regression"}, "task: Input should be 'image_classification'"),
    ({"train.monitor": "val_auc"}, "train.monitor: unknown metric 'val_auc'; expected one of: val_loss"),
    ({"train.precision": "fp16", "train.device": "cpu"}, "train.precision 'fp16' needs a CUDA device"),
    ({"train.grad_clip": 0}, "train.grad_clip: Input should be greater than 0"),
    ({"seed": -1}, "seed: Input should be greater than or equal to 0"),
    ({"train.optimizer.lr": float("nan")}, "train.optimizer.lr"),
]


@pytest.mark.parametrize(("change", "expected"), MALFORMED, ids=[m[1][:40] for m in MALFORMED])
def test_malformed_recipe_names_the_field(change, expected):
    data = tiny_recipe(**change)
    with pytest.raises(UserError) as e:
        validate_recipe(data, source="r.yaml")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("r.yaml: ")
    assert expected in msg, msg


def test_missing_blocks_are_named():
    with pytest.raises(UserError, match=r"data: required key is missing.*model: required key is missing"):
        validate_recipe({"task": "image_classification"})


def test_overrides_parse_yaml_values_and_reach_nested_fields(tmp_path, write_recipe):
    p = write_recipe(tiny_recipe())
    r = load_recipe(
        p,
        [
            "train.optimizer.lr=3e-3",
            "train.epochs=5",
            "data.augment.horizontal_flip=true",
            "model.widths=[4, 8]",
            "train.early_stopping.patience=2",
        ],
    )
    assert r.train.optimizer.lr == 0.003 and r.train.epochs == 5
    assert r.data.augment.horizontal_flip is True
    assert r.model.options["widths"] == [4, 8]
    assert r.train.early_stopping is not None and r.train.early_stopping.patience == 2
    assert r.name == "tiny"


def test_override_errors():
    with pytest.raises(UserError, match="expected key=value"):
        parse_override("train.epochs")
    with pytest.raises(UserError, match="train.epochs is a value, not a block"):
        apply_overrides({"train": {"epochs": 3}}, ["train.epochs.x=1"])
    with pytest.raises(UserError, match="train.optimzer: unknown key"):
        validate_recipe(apply_overrides(tiny_recipe(), ["train.optimzer.lr=1"]))


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: [unclosed\n")
    with pytest.raises(UserError, match=r"bad.yaml: line \d+ not valid YAML"):
        load_recipe(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="a recipe is a YAML mapping"):
        load_recipe(lst)
    with pytest.raises(UserError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_json_schema_lists_blocks_and_models():
    s = recipe_json_schema()
    assert {"task", "data", "model", "train", "eval", "seed"} <= set(s["properties"])
    titles = {v["title"] for v in s["$defs"]["ModelConfig"]["oneOf"]}
    assert {"seed-cnn", "cnn-small"} <= titles
    json.dumps(s)


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path: Path):
    r = load_recipe(path)
    assert r.name


def test_cli_validate_and_schema(write_recipe):
    ok = run_cli("recipe", "validate", str(write_recipe(tiny_recipe())))
    assert ok.returncode == 0 and "ok" in ok.stdout
    bad = run_cli("recipe", "validate", str(write_recipe(tiny_recipe(**{"train.epochs": "x"}), "bad.yaml")))
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "train.epochs" in bad.stderr and "Traceback" not in bad.stderr
    schema = run_cli("recipe", "schema")
    assert schema.returncode == 0 and json.loads(schema.stdout)["title"] == "Recipe"
