"""The CLI end to end on a tiny recipe, the artifact round trip, the run index, and one-line user errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from bigmodel.runs import load_artifact
from conftest import make_image_folder, run_cli, tiny_recipe


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny image-folder run through `bigmodel train`, shared by the tests below."""
    d = tmp_path_factory.mktemp("cli")
    home = d / "home"
    make_image_folder(d / "imgs", classes=("left", "middle", "right"), per_class=16, splits=("train", "test"))
    recipe = tiny_recipe(
        **{
            "data": {"source": "image_folder", "path": str(d / "imgs"), "val_fraction": 0.25},
            "train.batch_size": 8,
            "train.epochs": 4,
            "train.optimizer.lr": 0.02,
        }
    )
    (d / "r.yaml").write_text(yaml.safe_dump(recipe))
    env = {"BIGMODEL_HOME": str(home)}
    proc = run_cli("train", str(d / "r.yaml"), "train.epochs=5", "--out", str(d / "run"), env=env, check=True)
    return d, d / "run", env, proc


def test_train_writes_a_complete_run_directory(trained):
    d, run, env, proc = trained
    assert proc.stdout.strip().splitlines()[-1] == str(run)
    assert "test accuracy" in proc.stdout
    for name in (
        "recipe.yaml",
        "env.json",
        "metrics.jsonl",
        "summary.json",
        "model/model.safetensors",
        "model/config.json",
        "model/preprocess.json",
        "checkpoints/latest",
    ):
        assert (run / name).is_file(), name
    resolved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert resolved["train"]["epochs"] == 5 and resolved["train"]["optimizer"]["name"] == "adamw"  # override, defaults
    env_json = json.loads((run / "env.json").read_text())
    assert env_json["seed"] == 0 and env_json["torch"].startswith("2.") and env_json["device"] == "cpu"
    pre = json.loads((run / "model" / "preprocess.json").read_text())
    assert pre["labels"] == ["left", "middle", "right"] and pre["input_shape"] == [1, 10, 12] and len(pre["mean"]) == 1
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines if x["split"] == "val"] == [1, 2, 3, 4, 5]
    # No pickle anywhere in the run directory.
    for p in run.rglob("*"):
        assert p.suffix not in (".pt", ".pth", ".pkl", ".bin"), p


def test_evaluate_json_has_the_contracted_fields(trained):
    d, run, env, _ = trained
    proc = run_cli("evaluate", str(run), "--json", env=env, check=True)
    m = json.loads(proc.stdout)
    for k in ("accuracy", "macro_precision", "macro_recall", "macro_f1", "per_class", "confusion_matrix"):
        assert k in m
    assert m["num_examples"] == 48 and np.array(m["confusion_matrix"]).sum() == 48
    assert m["accuracy"] > 0.9  # the class pattern is easy
    summary = json.loads((run / "summary.json").read_text())
    assert summary["metrics"]["accuracy"] == m["accuracy"]  # train's final numbers come from the same path
    val = json.loads(run_cli("evaluate", str(run), "--split", "val", "--json", env=env, check=True).stdout)
    assert val["num_examples"] == 12
    table = run_cli("evaluate", str(run), env=env, check=True).stdout
    assert "macro F1" in table and "confusion matrix" in table


def test_predict_files_matches_the_reloaded_artifact(trained):
    d, run, env, _ = trained
    files = sorted((d / "imgs" / "test").rglob("*.png"))[::7]
    proc = run_cli("predict", str(run), *map(str, files), "--top-k", "2", "--json", env=env, check=True)
    preds = json.loads(proc.stdout)["predictions"]
    assert [p["file"] for p in preds] == [str(f) for f in files]
    assert all(len(p["top_k"]) == 2 and p["top_k"][0]["label"] == p["label"] for p in preds)
    assert sum(p["label"] == Path(p["file"]).parent.name for p in preds) >= len(preds) - 1
    # Round trip: an artifact reloaded in this process gives the same predictions and probabilities.
    art = load_artifact(run)
    again = art.predict_files(files, top_k=2)
    assert [(p["label"], p["score"]) for p in again] == [(p["label"], p["score"]) for p in preds]
    x = art.load_images(files)
    torch.testing.assert_close(art.predict_proba(x), load_artifact(run / "model").predict_proba(x), rtol=0, atol=0)
    plain = run_cli("predict", str(run), str(files[0]), env=env, check=True).stdout
    assert plain.startswith(str(files[0]))


def test_runs_index_list_show_compare(trained):
    d, run, env, _ = trained
    listed = json.loads(run_cli("runs", "list", "--json", env=env, check=True).stdout)
    assert [r["run_dir"] for r in listed] == [str(run.resolve())]
    assert listed[0]["status"] == "finished" and listed[0]["metrics"]["test_accuracy"] > 0.9
    shown = json.loads(run_cli("runs", "show", "run", env=env, check=True).stdout)
    assert shown["summary"]["split"] == "test"
    assert "test_accuracy" in run_cli("runs", "compare", str(run), str(run), env=env, check=True).stdout
    assert "cnn-small" in run_cli("runs", "list", env=env, check=True).stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["evaluate", "/nonexistent/run"], "run directory not found"),
        (["predict", "/tmp", "x.png"], "not a bigmodel run directory or model artifact"),
        (["train", "missing.yaml"], "missing.yaml: recipe file not found"),
        (["train"], "give a recipe file"),
        (["runs", "show", "no-such-run"], "not found in the run index"),
    ],
)
def test_user_errors_are_one_line_exit_2(args, expected):
    p = run_cli(*args)
    assert p.returncode == 2, p.stderr
    assert expected in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_usage_errors_exit_2_without_a_traceback():
    """Click's usage errors (typer >= 0.29 raises those of its own vendored click) print usage, not a traceback."""
    p = run_cli("train", "r.yaml", "--no-such-flag")
    assert p.returncode == 2, p.stderr
    assert "No such option: --no-such-flag" in p.stderr and "Traceback" not in p.stderr


def test_unreadable_image_in_predict_is_named(trained, tmp_path):
    d, run, env, _ = trained
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    p = run_cli("predict", str(run), str(bad), env=env)
    assert p.returncode == 2 and "bad.png: not a readable image" in p.stderr and "Traceback" not in p.stderr
    p = run_cli("predict", str(run), str(tmp_path / "missing.png"), env=env)
    assert p.returncode == 2 and "missing.png: image file not found" in p.stderr


def test_out_dir_is_never_overwritten(trained, write_recipe):
    d, run, env, _ = trained
    p = run_cli("train", str(write_recipe(tiny_recipe())), "--out", str(run), env=env)
    assert p.returncode == 2 and "already exists and is not empty" in p.stderr


def test_image_folder_with_a_corrupt_file_fails_cleanly(tmp_path, write_recipe):
    make_image_folder(tmp_path / "imgs")
    (tmp_path / "imgs" / "train" / "cat" / "zz.jpg").write_bytes(b"\xff\xd8\xff broken jpeg")
    r = write_recipe(tiny_recipe(**{"data": {"source": "image_folder", "path": str(tmp_path / "imgs")}}))
    p = run_cli("train", str(r), "--out", str(tmp_path / "run"))
    assert p.returncode == 2 and "zz.jpg: not a readable image" in p.stderr and "Traceback" not in p.stderr


def test_rgb_images_predict_through_a_grey_model(trained, tmp_path):
    d, run, env, _ = trained
    f = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((20, 20, 3), dtype=np.uint8)).save(f)
    out = json.loads(run_cli("predict", str(run), str(f), "--json", env=env, check=True).stdout)
    assert out["predictions"][0]["label"] in ("left", "middle", "right")
