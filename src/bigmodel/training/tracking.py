"""Experiment trackers: the metrics log (metrics.jsonl) mirrored, record by record, to TensorBoard event files or
an MLflow run, while training (`train.track`) or afterwards (`bigmodel runs export RUN --to ...`).

Both go through the same `record → scalars` mapping, so a live-tracked run and an exported one hold the same
numbers: each numeric field of a record becomes `<split>/<field>` at the record's step (`train/loss`, `train/lr`,
`val/accuracy`, `test/macro_f1`, ...); lifecycle records (early stop) and bookkeeping fields (step, epoch, time)
are left out. The writers are the maintained ones (`torch.utils.tensorboard`, MLflow's client), from the optional
`track` extra; asking for one that is not installed is a one-line error before training starts."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import yaml

from bigmodel.errors import UserError
from bigmodel.training.trainer import Callback

SKIP = ("step", "epoch", "time", "split", "event")
KINDS = ("tensorboard", "mlflow")


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The tracked scalars of one metrics.jsonl record (none for a lifecycle event)."""
    if "event" in record:
        return {}
    split = str(record.get("split", "train"))
    out = {}
    for k, v in record.items():
        if k in SKIP or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(float(v)):
            out[f"{split}/{k}"] = float(v)
    return out


def _need(module: str, kind: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise UserError(
            f"train.track {kind!r} needs the track extra: pip install 'bigmodel[track]' ({module} is not installed)"
        )


def require(kinds: list[str]) -> None:
    """Fail before training when a requested tracker's package is missing."""
    for kind in kinds:
        _need("tensorboard" if kind == "tensorboard" else "mlflow", kind)


class Tracker:
    kind = ""

    def log(self, record: dict[str, Any]) -> None:
        raise NotImplementedError

    def close(self, status: str = "finished") -> None:
        raise NotImplementedError


class TensorBoardTracker(Tracker):
    """Event files in `log_dir` (default RUN/tensorboard); a resumed run purges the events after its checkpoint
    so the curves are the uninterrupted ones."""

    kind = "tensorboard"

    def __init__(self, log_dir: Path, recipe: dict[str, Any], resume_step: int | None = None) -> None:
        _need("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(
            log_dir=str(log_dir), purge_step=None if resume_step is None else resume_step + 1, flush_secs=30
        )
        if resume_step is None:
            text = "```yaml\n" + yaml.safe_dump(recipe, sort_keys=False) + "```"
            self.writer.add_text("recipe", text, 0)

    def log(self, record: dict[str, Any]) -> None:
        step = int(record.get("step", 0))
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, step)

    def close(self, status: str = "finished") -> None:
        self.writer.flush()
        self.writer.close()


def default_mlflow_uri(run_dir: Path) -> str:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return "sqlite:///" + str(run_dir.resolve().parent / "mlflow.db")


class MLflowTracker(Tracker):
    """One MLflow run per bigmodel run: the recipe as parameters, the environment as tags, the metrics log as
    metrics. The MLflow run id is kept in RUN/tracking.json, so a resumed bigmodel run continues its MLflow run."""

    kind = "mlflow"

    def __init__(
        self,
        run_dir: Path,
        recipe: dict[str, Any],
        env: dict[str, Any] | None,
        uri: str | None,
        *,
        resume: bool,
        remember: bool = True,
    ) -> None:
        _need("mlflow", "mlflow")
        import logging

        from mlflow.tracking import MlflowClient

        # MLflow sets its loggers to INFO on import; the database migrations it prints are not the user's business.
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)

        self.uri = uri or default_mlflow_uri(run_dir)
        try:
            self.client = MlflowClient(tracking_uri=self.uri)
            name = str(recipe.get("name") or "bigmodel")
            exp = self.client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(name)
            state_file = run_dir / "tracking.json"
            state = json.loads(state_file.read_text()) if state_file.is_file() else {}
            run_id = state.get("mlflow_run_id") if resume and state.get("mlflow_uri") == self.uri else None
            if run_id is None:
                tags = {"mlflow.runName": run_dir.name, "bigmodel.run_dir": str(run_dir.resolve())}
                tags.update({f"env.{k}": str(v) for k, v in (env or {}).items() if k not in ("argv",)})
                run = self.client.create_run(exp_id, run_name=run_dir.name, tags=tags)
                run_id = run.info.run_id
                from mlflow.entities import Param

                from bigmodel.config import dotted

                params = {k: v if isinstance(v, str) else json.dumps(v) for k, v in dotted(recipe).items()}
                items = [Param(k, v[:6000]) for k, v in params.items()]
                for i in range(0, len(items), 100):
                    self.client.log_batch(run_id, params=items[i : i + 100])
                if remember:
                    from bigmodel.fileio import write_json_atomic

                    write_json_atomic(state_file, {"mlflow_uri": self.uri, "mlflow_run_id": run_id})
            else:
                self.client.update_run(run_id, status="RUNNING")
        except UserError:
            raise
        except Exception as e:  # a bad URI, an unreachable server, a locked store
            raise UserError(
                f"train.tracking_uri {self.uri}: MLflow could not open it ({type(e).__name__}: {e})"
            ) from None
        self.run_id = run_id
        self.start_ms = _start_ms(env)

    def log(self, record: dict[str, Any]) -> None:
        """Live: stamped with the wall-clock time, so after a resume the value logged again at a step is the
        newest one there (MLflow keeps every value; it cannot delete those logged past the checkpoint)."""
        import time

        from mlflow.entities import Metric

        step = int(record.get("step", 0))
        ts = int(time.time() * 1000)
        metrics = [Metric(k, v, ts, step) for k, v in scalars(record).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def log_many(self, records: list[dict[str, Any]]) -> None:
        """Export: stamped with the run's start time plus each record's training time."""
        from mlflow.entities import Metric

        batch = []
        for r in records:
            step = int(r.get("step", 0))
            ts = self.start_ms + int(1000 * float(r.get("time", 0.0)))
            batch += [Metric(k, v, ts, step) for k, v in scalars(r).items()]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])

    def close(self, status: str = "finished") -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if status == "finished" else "FAILED")


def _start_ms(env: dict[str, Any] | None) -> int:
    import time

    started = (env or {}).get("started")
    if started:
        try:
            return int(time.mktime(time.strptime(started, "%Y-%m-%dT%H:%M:%S%z")) * 1000)
        except ValueError:
            pass
    return int(time.time() * 1000)


def open_trackers(
    kinds: list[str],
    run_dir: Path,
    recipe: dict[str, Any],
    env: dict[str, Any] | None,
    *,
    uri: str | None = None,
    resume_step: int | None = None,
    log_dir: Path | None = None,
) -> list[Tracker]:
    out: list[Tracker] = []
    for kind in kinds:
        if kind == "tensorboard":
            out.append(TensorBoardTracker(log_dir or run_dir / "tensorboard", recipe, resume_step))
        elif kind == "mlflow":
            out.append(MLflowTracker(run_dir, recipe, env, uri, resume=resume_step is not None))
        else:
            raise UserError(f"unknown tracker {kind!r}; expected one of: {', '.join(KINDS)}")
    return out


class TrackingCallback(Callback):
    """A Trainer callback that hands each metrics.jsonl record to the trackers."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers

    def on_log(self, trainer: Any, record: dict[str, Any]) -> None:
        for t in self.trackers:
            t.log(record)

    def close(self, status: str = "finished") -> None:
        for t in self.trackers:
            t.close(status)


def export_run(run_dir: Path, to: str, *, uri: str | None = None, out: Path | None = None) -> dict[str, Any]:
    """Replay a finished run's metrics log into a tracker; returns where it went and how many points."""
    from bigmodel.report.runfiles import RunFiles

    run = RunFiles.read(run_dir)
    if to not in KINDS:
        raise UserError(f"--to {to!r}: expected one of: {', '.join(KINDS)}")
    records = [r for r in run.records if scalars(r)]
    points = sum(len(scalars(r)) for r in records)
    if to == "tensorboard":
        log_dir = out or run.path / "tensorboard"
        if log_dir.is_dir() and any(log_dir.glob("events.out.tfevents.*")):
            raise UserError(f"{log_dir}: already holds TensorBoard events (tracked live?); give --out NEW_DIR")
        tb = TensorBoardTracker(log_dir, run.recipe)
        for r in records:
            tb.log(r)
        tb.close()
        return {"to": to, "where": str(log_dir), "records": len(records), "points": points}
    ml = MLflowTracker(run.path, run.recipe, run.env, uri, resume=False, remember=False)
    ml.log_many(records)
    ml.close("finished" if run.summary is not None else "failed")
    return {"to": to, "where": ml.uri, "run_id": ml.run_id, "records": len(records), "points": points}
