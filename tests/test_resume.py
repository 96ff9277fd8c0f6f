"""Exact resume after a hard kill (SIGKILL), at several points including mid-epoch and while writing a checkpoint.

Each killed run is resumed with `bigmodel train --resume RUN_DIR`; its final weights must be bit-identical to an
uninterrupted run of the same recipe and seed (the test runs on CPU).
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import run_cli, tiny_recipe

# 3 epochs of digits in batches of 64 (`epochs: auto`, capped at 3: the resumed run must plan the same length), a
# checkpoint every 4 steps. Dropout, flip, crop and mixup are on, so RNG and data-order restoration are exercised.
RECIPE = tiny_recipe(
    **{
        "train.epochs": "auto",
        "train.min_steps": 100_000,
        "train.max_epochs": 3,
        "train.batch_size": 64,
        "train.checkpoint_every": 4,
        "train.schedule": {"name": "onecycle"},
        "train.early_stopping": {"patience": 5},
        "data.augment": {"horizontal_flip": True, "random_crop_padding": 1, "mixup_alpha": 0.2, "mix_prob": 0.5},
        "model.dropout": 0.3,
    }
)


def weights(path: Path) -> dict:
    return load_file(str(path))


def assert_identical(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert wa[k].dtype == wb[k].dtype and bool((wa[k] == wb[k]).all()), f"{k} differs"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    recipe = d / "r.yaml"
    import yaml

    recipe.write_text(yaml.safe_dump(RECIPE))
    run_cli("train", str(recipe), "--out", str(d / "run"), "--no-progress", check=True)
    return recipe, d / "run"


def last_ckpt(run: Path) -> Path:
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()


def steps_per_epoch() -> int:
    from bigmodel.api import build_experiment
    from bigmodel.config import validate_recipe

    exp = build_experiment(validate_recipe(RECIPE))
    return len(exp.loader("train", train=True))


# (point, step as a function of steps-per-epoch S); checkpoints fall on multiples of 4 and on epoch ends.
FAULTS = {
    "mid-epoch-1": ("kill_after_step", lambda S: 6),  # two steps after the checkpoint at step 4
    "mid-epoch-2": ("kill_after_step", lambda S: S + 3),
    "end-of-epoch-2": ("kill_after_step", lambda S: 2 * S),  # before its evaluation and epoch-end checkpoint
    "writing-mid-epoch-ckpt": ("kill_during_checkpoint", lambda S: 8),  # step 4's checkpoint must stay usable
    "writing-epoch-end-ckpt": ("kill_during_checkpoint", lambda S: S),
}


@pytest.mark.parametrize("case", list(FAULTS))
def test_resume_after_hard_kill_is_bit_identical(reference, tmp_path, case):
    recipe, ref_run = reference
    point, at = FAULTS[case]
    fault = f"{point}:{at(steps_per_epoch())}"
    run = tmp_path / "run"
    killed = run_cli("train", str(recipe), "--out", str(run), "--no-progress", env={"BIGMODEL_FAULT": fault})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (run / "model").exists()
    if fault.startswith("kill_during_checkpoint"):
        step = int(fault.split(":")[1])
        assert list((run / "checkpoints").glob(f".tmp-step-{step:08d}-*")), "the kill should leave a partial checkpoint"
        assert int(last_ckpt(run).name.split("-")[1]) < step  # `latest` still points at the previous, complete one
    resumed = run_cli("train", "--resume", str(run), "--no-progress", check=True)
    assert resumed.stdout.strip().splitlines()[-1] == str(run)
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert_identical(last_ckpt(ref_run) / "model.safetensors", last_ckpt(run) / "model.safetensors")
    assert_identical(ref_run / "model" / "model.safetensors", run / "model" / "model.safetensors")

    # The metrics log is the uninterrupted one again (no duplicated or missing steps).
    def records(r):
        import json

        return [(d["step"], d["split"]) for d in map(json.loads, (r / "metrics.jsonl").read_text().splitlines())]

    assert records(run) == records(ref_run)


def test_resume_rejects_a_different_recipe_and_non_runs(reference, tmp_path, write_recipe):
    recipe, ref_run = reference
    other = write_recipe({**RECIPE, "seed": 1}, "other.yaml")
    p = run_cli("train", str(other), "--resume", str(ref_run))
    assert p.returncode == 2 and "differs from the run's recipe.yaml at seed" in p.stderr
    p = run_cli("train", "--resume", str(tmp_path))
    assert p.returncode == 2 and "not a bigmodel run directory" in p.stderr
