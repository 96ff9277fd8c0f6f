"""Tracking: `train.track` mirrors metrics.jsonl to TensorBoard and MLflow while training, `bigmodel runs export`
replays a finished run; both read back (TensorBoard's event reader, `mlflow.search_runs`) with the log's numbers."""

from __future__ import annotations

import importlib.util
import json

import pytest
import yaml

from bigmodel import api
from bigmodel.config import validate_recipe
from bigmodel.errors import UserError
from bigmodel.training.tracking import require, scalars
from conftest import run_cli, tiny_recipe

HAS_TB = importlib.util.find_spec("tensorboard") is not None
HAS_MLFLOW = importlib.util.find_spec("mlflow") is not None
needs_tb = pytest.mark.skipif(not HAS_TB, reason="the track extra is not installed (tensorboard)")
needs_mlflow = pytest.mark.skipif(not HAS_MLFLOW, reason="the track extra is not installed (mlflow)")


def log_points(run) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as tracker series: tag → [(step, value)]."""
    out: dict[str, list[tuple[int, float]]] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        for tag, v in scalars(rec).items():
            out.setdefault(tag, []).append((rec["step"], v))
    return out


def tensorboard_points(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def mlflow_points(uri, run_id) -> dict[str, list[tuple[int, float]]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    return {
        k: [
            (m.step, m.value) for m in sorted(client.get_metric_history(run_id, k), key=lambda m: (m.step, m.timestamp))
        ]
        for k in run.data.metrics
    }


def assert_same(got, expected, rel=0.0):
    assert sorted(got) == sorted(expected)
    for tag, pts in expected.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in pts], tag
        for (_, a), (_, b) in zip(got[tag], pts, strict=True):
            assert a == pytest.approx(b, rel=rel, abs=rel), tag


def test_scalars_of_a_record():
    rec = {"step": 5, "epoch": 0, "split": "val", "loss": 0.5, "accuracy": 0.9, "time": 1.2, "num_examples": 10}
    assert scalars(rec) == {"val/loss": 0.5, "val/accuracy": 0.9, "val/num_examples": 10.0}
    assert scalars({"step": 9, "split": "train", "event": "early_stop", "best_epoch": 1}) == {}


@needs_tb
@needs_mlflow
def test_live_tracking_reads_back_with_the_log_numbers(tmp_path):
    uri = f"sqlite:///{tmp_path / 'ml.db'}"
    recipe = tiny_recipe(**{"train.track": ["tensorboard", "mlflow"], "train.tracking_uri": uri})
    res = api.train(validate_recipe(recipe), out=tmp_path / "run", progress=False)
    run = res.run_dir
    expected = log_points(run)
    assert "test/accuracy" in expected and "val/loss" in expected and "train/lr" in expected
    assert_same(tensorboard_points(run / "tensorboard"), expected, rel=1e-6)  # event files hold float32

    import mlflow

    mlflow.set_tracking_uri(uri)
    found = mlflow.search_runs(experiment_names=["tiny"], output_format="list")
    assert len(found) == 1 and found[0].info.status == "FINISHED" and found[0].info.run_name == "run"
    summary = json.loads((run / "summary.json").read_text())
    assert found[0].data.metrics["test/accuracy"] == summary["metrics"]["accuracy"]
    assert found[0].data.params["train.optimizer.lr"] == "0.01"
    state = json.loads((run / "tracking.json").read_text())
    assert state["mlflow_run_id"] == found[0].info.run_id
    assert_same(mlflow_points(uri, found[0].info.run_id), expected)


@needs_tb
@needs_mlflow
def test_export_of_a_finished_run(tmp_path):
    res = api.train(validate_recipe(tiny_recipe()), out=tmp_path / "run", progress=False)
    run = res.run_dir
    expected = log_points(run)
    uri = f"sqlite:///{tmp_path / 'export.db'}"
    out = json.loads(run_cli("runs", "export", str(run), "--to", "mlflow", "--uri", uri, "--json", check=True).stdout)
    assert out["points"] == sum(map(len, expected.values()))
    import mlflow

    mlflow.set_tracking_uri(uri)
    found = mlflow.search_runs(experiment_names=["tiny"], output_format="list")
    assert [r.info.run_id for r in found] == [out["run_id"]]
    assert_same(mlflow_points(uri, out["run_id"]), expected)
    assert not (run / "tracking.json").exists()  # an export does not claim the run for live tracking

    p = run_cli("runs", "export", str(run), "--to", "tensorboard", check=True)
    assert "exported" in p.stdout
    assert_same(tensorboard_points(run / "tensorboard"), expected, rel=1e-6)
    again = run_cli("runs", "export", str(run), "--to", "tensorboard")
    assert again.returncode == 2 and "already holds TensorBoard events" in again.stderr
    bad = run_cli("runs", "export", str(run), "--to", "wandb")
    assert bad.returncode == 2 and "expected mlflow or tensorboard" in bad.stderr


@needs_tb
@needs_mlflow
def test_a_resumed_run_tracks_the_uninterrupted_curves(tmp_path):
    """Killed after step 20 and resumed: TensorBoard purges the events past the checkpoint, MLflow continues the
    same run; both end with the log's numbers at every step."""
    uri = f"sqlite:///{tmp_path / 'ml.db'}"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            tiny_recipe(**{"train.epochs": 3, "train.track": ["tensorboard", "mlflow"], "train.tracking_uri": uri})
        )
    )
    run = tmp_path / "run"
    killed = run_cli(
        "train", str(recipe), "--out", str(run), "--no-progress", env={"BIGMODEL_FAULT": "kill_after_step:20"}
    )
    assert killed.returncode != 0
    run_cli("train", "--resume", str(run), "--no-progress", check=True)
    expected = log_points(run)
    assert_same(tensorboard_points(run / "tensorboard"), expected, rel=1e-6)
    import mlflow

    mlflow.set_tracking_uri(uri)
    found = mlflow.search_runs(experiment_names=["tiny"], output_format="list")
    assert len(found) == 1 and found[0].info.status == "FINISHED"
    # MLflow keeps every logged value, including those logged between the checkpoint and the kill; the newest
    # value at each step is the log's.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    for tag, pts in expected.items():
        newest: dict[int, tuple[int, float]] = {}
        for m in client.get_metric_history(found[0].info.run_id, tag):
            if m.step not in newest or m.timestamp >= newest[m.step][0]:
                newest[m.step] = (m.timestamp, m.value)
        assert sorted((s, v) for s, (_, v) in newest.items()) == pts, tag


def test_default_store_is_beside_the_run(tmp_path, monkeypatch):
    if not HAS_MLFLOW:
        pytest.skip("the track extra is not installed (mlflow)")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    api.train(validate_recipe(tiny_recipe(**{"train.track": "mlflow"})), out=tmp_path / "runs" / "a", progress=False)
    assert (tmp_path / "runs" / "mlflow.db").is_file()


def test_a_missing_tracker_is_a_one_line_error_before_training(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(UserError, match=r"needs the track extra: pip install 'bigmodel\[track\]'"):
        require(["mlflow"])
    with pytest.raises(UserError, match="track extra"):
        api.train(validate_recipe(tiny_recipe(**{"train.track": "mlflow"})), out=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # nothing half-written
