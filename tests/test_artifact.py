"""The artifact format apart from prediction: runtimes register with the loader (the core never imports deploy/),
models with richer artifacts declare their own loader, and `runs` keeps re-exporting the split modules."""

from __future__ import annotations

import json
import shutil
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch

from bigmodel import artifact, rundir, runindex, runs
from bigmodel.errors import UserError

LEGACY = Path(__file__).resolve().parent / "assets" / "legacy"


def test_runs_reexports_the_split_modules():
    assert runs.load_artifact is artifact.load_artifact and runs.Artifact is artifact.Artifact
    assert runs.RunIndex is runindex.RunIndex and runs.new_run_dir is rundir.new_run_dir


def test_deploy_runtimes_are_declared_as_entry_points():
    names = {ep.name: ep.value for ep in entry_points(group="bigmodel.runtimes")}
    assert names == {"onnxruntime": "bigmodel.deploy.ort:load_runtime", "int8": "bigmodel.deploy.quantize:load_runtime"}


def _copy_with(tmp_path: Path, **config) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(LEGACY / "image", folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **config}))
    return folder


def test_an_unknown_runtime_is_a_one_line_error(tmp_path):
    folder = _copy_with(tmp_path, runtime="tpu-magic")
    with pytest.raises(UserError, match="needs the 'tpu-magic' runtime; install it"):
        artifact.load_artifact(folder)


def test_a_registered_runtime_loads_the_model(tmp_path):
    calls = []

    def load(folder, config, build):
        calls.append(config["runtime"])
        model = build()  # the registry's module, then this runtime's own weights
        artifact.load_weights(model, folder)
        return model

    artifact.register_runtime("test-runtime", load)
    art = artifact.load_artifact(_copy_with(tmp_path, runtime="test-runtime"))
    ref = artifact.load_artifact(LEGACY / "image")
    x = torch.zeros(1, 1, 8, 8)
    assert calls == ["test-runtime"] and torch.equal(art.model(x), ref.model(x))
