"""The work of a federation's server and clients, in bigmodel's own terms (no Flower import here).

A client builds the recipe's experiment, keeps its partition of the training split and trains the global weights it
was sent for `local_epochs` epochs with the recipe's Trainer, continuing the data order and the learning-rate
schedule where the previous round left them (the schedule spans rounds x local_epochs epochs). Under FedProx the
Trainer strategy `Proximal` adds the gradient of (mu / 2) ||w - w_global||^2 before every optimizer step.

The server keeps the global model: its evaluation on the central `eval.split` after every round, a checkpoint of the
global weights and the server optimizer's state after every round (a restarted federation resumes from the last
one), the per-round log `rounds.jsonl`, and at the end an ordinary artifact in RUN/model.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bigmodel.config import FederatedConfig, Recipe, read_yaml, validate_recipe
from bigmodel.errors import UserError
from bigmodel.fileio import write_json_atomic
from bigmodel.training.strategy import Strategy
from bigmodel.training.trainer import Callback

ROUNDS_LOG = "rounds.jsonl"
CHECKPOINTS = "rounds"


def load_run_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    recipe = validate_recipe(read_yaml(path), source=str(path))
    if recipe.federated is None:
        raise UserError(f"{path}: no federated block (add `federated:` with clients and rounds)")
    return recipe


def recipe_digest(recipe: Recipe) -> str:
    """What server and clients compare: they must agree on the data, the partition, the model and the training."""
    text = json.dumps(recipe.to_dict(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Proximal(Strategy):
    """FedProx's client objective (Li et al. 2020): the loss plus (mu / 2) ||w - w_global||^2. Its gradient
    mu (w - w_global) is added to every parameter's gradient before clipping and the optimizer step."""

    name = "fedprox"

    def __init__(self, mu: float) -> None:
        self.mu = mu
        self.anchor: list[tuple[nn.Parameter, torch.Tensor]] = []

    def set_anchor(self, model: nn.Module) -> None:
        self.anchor = [(p, p.detach().clone()) for p in model.parameters() if p.requires_grad]

    def step(self, train_model: nn.Module, optimizer: Any, grad_clip: float | None, scaler: Any) -> None:
        if self.mu > 0:
            with torch.no_grad():
                for p, w0 in self.anchor:
                    if p.grad is not None:
                        p.grad.add_(p.detach() - w0, alpha=self.mu)
        super().step(train_model, optimizer, grad_clip, scaler)


class _LossLog(Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_step_end(self, trainer: Any, loss: float | None) -> None:
        if loss is not None:
            self.values.append(loss)


def _cast_like(state: dict[str, Any], like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Received arrays back in the model's dtypes (averaging turns BatchNorm's int64 counters into floats)."""
    missing = sorted(set(like) - set(state))
    if missing:
        raise UserError(f"the received weights lack {missing[:3]} (server and client run different models)")
    out = {}
    for k, ref in like.items():
        v = torch.as_tensor(np.asarray(state[k]))
        if v.shape != ref.shape and v.numel() == ref.numel() == 1:  # a scalar travels as shape (1,)
            v = v.reshape(ref.shape)
        if v.shape != ref.shape:
            raise UserError(f"received weight {k} has shape {tuple(v.shape)}, the model's is {tuple(ref.shape)}")
        out[k] = v.round().to(ref.dtype) if not ref.is_floating_point() else v.to(ref.dtype)
    return out


def plain_state(model: nn.Module) -> dict[str, np.ndarray]:
    """The weights as contiguous CPU numpy arrays (what goes over the wire)."""
    return {k: v.detach().cpu().contiguous().numpy().copy() for k, v in model.state_dict().items()}


SLOTS_ENV = "BIGMODEL_FEDERATED_SLOTS"  # "DIR:N": at most N clients of this machine work at once


@contextlib.contextmanager
def machine_slot() -> Iterator[None]:
    """Hold one of the N work slots of this machine (an exclusive lock on DIR/slot-i) while a client loads its data
    and trains. A local federation runs every client on one machine: ten clients training at once, each with as many
    threads as the machine has cores, ran a round 9x slower on 2 cores than one after the other. Without the
    variable (a client on its own machine) there is no slot to take."""
    spec = os.environ.get(SLOTS_ENV)
    if not spec:
        yield
        return
    folder, _, n = spec.rpartition(":")
    Path(folder).mkdir(parents=True, exist_ok=True)
    files = [open(Path(folder) / f"slot-{i}", "a+b") for i in range(max(1, int(n)))]  # noqa: SIM115
    try:
        while True:
            for f in files:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue
                try:
                    yield
                finally:
                    fcntl.flock(f, fcntl.LOCK_UN)
                return
            time.sleep(0.05)
    finally:
        for f in files:
            f.close()


class Federation:
    """The recipe's experiment with its partition among the clients; shared by the server and every client."""

    def __init__(self, recipe: Recipe) -> None:
        from bigmodel.api import build_experiment
        from bigmodel.federated.partition import partition

        assert recipe.federated is not None
        self.recipe = recipe
        self.cfg: FederatedConfig = recipe.federated
        self.exp = build_experiment(recipe)
        train = self.exp.data.train
        labels = getattr(train, "y", None)
        if labels is None or not hasattr(train, "subset"):
            raise UserError(f"federated: task {recipe.task!r} has no labelled training split to partition")
        self.labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
        p = self.cfg.partition
        self.parts = partition(
            self.labels,
            self.cfg.clients,
            p.kind,
            seed=recipe.seed if p.seed is None else p.seed,
            alpha=p.alpha,
            labels_per_client=p.labels_per_client,
            min_size=p.min_size,
        )
        self.digest = recipe_digest(recipe)

    @classmethod
    def from_file(cls, path: str | Path) -> Federation:
        return cls(load_run_recipe(path))

    # ------------------------------------------------------------------------------------------------ a client
    def client_round(
        self,
        partition_id: int,
        weights: dict[str, Any],
        server_round: int,
        proximal_mu: float = 0.0,
        privacy_file: Path | None = None,
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Train the global `weights` on client `partition_id`'s examples for `local_epochs` epochs (round
        `server_round`, 1-based). Returns the new weights and the metrics to report (num-examples first).

        With `privacy.dp` the client trains with DP-SGD (Opacus; the noise calibrated to the client's planned steps
        over all rounds) and reports the ε its examples have spent so far; the accountant's history is kept in
        `privacy_file` on the client's side between rounds (every round is a fresh process)."""
        cfg = self.cfg
        if not 0 <= partition_id < cfg.clients:
            raise UserError(f"partition-id {partition_id}: expected 0 to {cfg.clients - 1} (federated.clients)")
        exp = copy.copy(self.exp)
        data = copy.copy(exp.data)
        idx = torch.from_numpy(self.parts[partition_id])
        data.train = data.train.subset(idx)
        data.val = None
        exp.data = data
        # log_every 1: the callback sees every step's loss (nothing is written: a client's Trainer has no run dir)
        local = self.recipe.train.model_copy(
            update={"epochs": cfg.rounds * cfg.local_epochs, "early_stopping": None, "max_steps": None, "log_every": 1}
        )
        exp.recipe = self.recipe.model_copy(update={"train": local})
        exp.model.load_state_dict(_cast_like(weights, exp.model.state_dict()))
        strategy = Proximal(proximal_mu) if proximal_mu > 0 else None
        log = _LossLog()
        trainer = exp.trainer(validate=False, strategy=strategy, callbacks=[log])
        if strategy is not None:
            strategy.set_anchor(trainer.model)
        dp = self.recipe.privacy.dp is not None
        if dp and privacy_file is not None and privacy_file.is_file():
            trainer.strategy.load_state_dict({}, json.loads(privacy_file.read_text(encoding="utf-8")))
        # Continue the data order and the schedule: round r trains epochs (r-1)*k .. r*k-1 of the planned run.
        trainer.state.epoch = (server_round - 1) * cfg.local_epochs
        trainer.state.step = trainer.state.epoch * trainer.steps_per_epoch
        t0 = time.perf_counter()
        trainer.fit(epochs=cfg.local_epochs)
        seconds = time.perf_counter() - t0
        metrics = {
            "num-examples": float(len(idx)),
            "partition-id": float(partition_id),
            "train-loss": float(np.mean(log.values)) if log.values else float("nan"),
            "train-time-s": round(seconds, 3),
            "steps": float(trainer.state.step),
        }
        if dp:
            metrics["epsilon"] = float(trainer.strategy.epsilon())
            metrics["noise-multiplier"] = float(trainer.strategy.sigma)
            if privacy_file is not None:
                privacy_file.parent.mkdir(parents=True, exist_ok=True)
                write_json_atomic(privacy_file, trainer.strategy.state_dict()[1])
        return plain_state(trainer.model), metrics

    # ------------------------------------------------------------------------------------------------ the server
    def initial_weights(self) -> dict[str, np.ndarray]:
        return plain_state(self.exp.model)

    def set_weights(self, weights: dict[str, Any]) -> nn.Module:
        model = self.exp.model
        model.load_state_dict(_cast_like(weights, model.state_dict()))
        return model

    @torch.inference_mode()
    def evaluate(self, weights: dict[str, Any]) -> dict[str, float]:
        """The global model's metrics on the central `eval.split` (fp32, no test-time augmentation)."""
        model = self.set_weights(weights)
        model.eval()
        loader = self.exp.loader(self.recipe.eval.split)
        metrics = self.exp.task.new_metrics(self.exp.device)
        for batch in loader.epoch(0):
            self.exp.task.eval_batch(model, batch, metrics)
        out = metrics.compute()
        return {k: float(v) for k, v in out.items() if isinstance(v, (int, float)) and k != "num_examples"}

    def describe_clients(self) -> list[dict[str, Any]]:
        from bigmodel.federated.partition import describe

        return describe(self.labels, self.parts, len(self.exp.data.labels))


# ---------------------------------------------------------------------------------------------- round checkpoints
def save_round(run_dir: Path, server_round: int, weights: dict[str, np.ndarray], server_state: dict[str, Any]) -> None:
    """RUN/rounds/round-NNNN: the global weights and the server strategy's state after `server_round`; written to a
    temporary folder and renamed, older rounds removed (the last two kept)."""
    from safetensors.numpy import save_file

    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"round-{server_round:04d}"
    tmp = root / f".tmp-round-{server_round:04d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: np.ascontiguousarray(v) for k, v in weights.items()}, str(tmp / "global.safetensors"))
    arrays = {k: np.ascontiguousarray(v) for k, v in server_state.get("arrays", {}).items()}
    if arrays:
        save_file(arrays, str(tmp / "server.safetensors"))
    write_json_atomic(tmp / "state.json", {"round": server_round, "meta": server_state.get("meta", {})})
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    done = sorted(p for p in root.iterdir() if p.name.startswith("round-"))
    for old in done[:-2]:
        shutil.rmtree(old, ignore_errors=True)


def latest_round(run_dir: Path) -> tuple[int, dict[str, np.ndarray], dict[str, Any]] | None:
    """(round, global weights, server state) of the last completed round, or None."""
    from safetensors.numpy import load_file

    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return None
    done = sorted(p for p in root.iterdir() if p.name.startswith("round-") and (p / "state.json").is_file())
    if not done:
        return None
    last = done[-1]
    state = json.loads((last / "state.json").read_text(encoding="utf-8"))
    server = {"meta": state.get("meta", {})}
    if (last / "server.safetensors").is_file():
        server["arrays"] = load_file(str(last / "server.safetensors"))
    return int(state["round"]), load_file(str(last / "global.safetensors")), server


def completed_rounds(run_dir: Path) -> int:
    """The last round with a checkpoint (0: none)."""
    root = run_dir / CHECKPOINTS
    done = [p for p in root.glob("round-*") if (p / "state.json").is_file()] if root.is_dir() else []
    return max((int(p.name.removeprefix("round-")) for p in done), default=0)


def prepare_resume(run_dir: Path) -> int:
    """Before a federation restarts: drop the log of rounds after the last checkpoint and the previous run's final
    event (the restarted server logs them anew). Returns the round it continues after."""
    last = completed_rounds(run_dir)
    truncate_rounds(run_dir, last if last > 0 else -1)
    return last


def read_rounds(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / ROUNDS_LOG
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def append_round(run_dir: Path, record: dict[str, Any]) -> None:
    with (run_dir / ROUNDS_LOG).open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def truncate_rounds(run_dir: Path, last_round: int) -> None:
    """Drop log records of rounds after the last checkpoint (a resumed federation writes them again)."""
    from bigmodel.fileio import write_text_atomic

    keep = [r for r in read_rounds(run_dir) if "round" in r and r["round"] <= last_round]
    write_text_atomic(run_dir / ROUNDS_LOG, "".join(json.dumps(r) + "\n" for r in keep))


def finish(fed: Federation, run_dir: Path, weights: dict[str, Any], rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The final global model as an ordinary artifact (RUN/model), evaluated through `bigmodel evaluate`'s path, and
    RUN/summary.json."""
    from bigmodel.api import evaluate
    from bigmodel.models.base import ModelBase
    from bigmodel.runs import RunIndex, save_artifact

    recipe = fed.recipe
    model = fed.set_weights(weights)
    own = model.artifact_options() if isinstance(model, ModelBase) else None
    options = own if own is not None else (fed.exp.model_options or recipe.model.options)
    extra: dict[str, Any] = {
        "federated": {"strategy": fed.cfg.strategy, "rounds": len(rounds), "clients": fed.cfg.clients}
    }
    privacy = privacy_summary(fed, rounds)
    if privacy is not None:  # the layer fix build_experiment applied, replayed when the artifact loads
        from bigmodel.privacy.dp import FIX

        extra |= {"model_fix": FIX, "privacy": privacy}
    save_artifact(
        run_dir / "model",
        model,
        recipe.task,
        {"name": recipe.model.name, **options},
        fed.exp.preprocess,
        extra=extra,
    )
    split = recipe.eval.split
    metrics = evaluate(run_dir, split, limit=recipe.eval.decode_limit, baseline=False)
    metrics = {k: v for k, v in metrics.items() if k not in ("run_dir", "split")}
    summary = {
        "run_dir": str(run_dir),
        "split": split,
        "metrics": metrics,
        "federated": {
            "strategy": fed.cfg.strategy,
            "clients": fed.cfg.clients,
            "rounds": len(rounds),
            "local_epochs": fed.cfg.local_epochs,
            "partition": fed.cfg.partition.model_dump(),
            "round_time_s": round(sum(r.get("time_s", 0.0) for r in rounds), 3),
            "bytes_sent": int(sum(r.get("bytes_down", 0) + r.get("bytes_up", 0) for r in rounds)),
        },
    }
    if privacy is not None:
        summary["privacy"] = privacy
    write_json_atomic(run_dir / "summary.json", summary)
    short = {f"{split}_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
    RunIndex().upsert(run_dir, status="finished", train_time_s=summary["federated"]["round_time_s"], metrics=short)
    return summary


def privacy_summary(fed: Federation, rounds: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Client-side DP-SGD: each client's examples are protected by its own accountant; the federation's guarantee
    is the largest ε any client spent (at the recipe's δ)."""
    dp = fed.recipe.privacy.dp
    if dp is None:
        return None
    eps = [r["epsilon_max"] for r in rounds if "epsilon_max" in r]
    return {
        "mechanism": "dp-sgd on each client",
        "epsilon": max(eps) if eps else 0.0,
        "delta": dp.delta,
        "max_grad_norm": dp.max_grad_norm,
        "accountant": dp.accountant,
        "target_epsilon": dp.target_epsilon,
        "noise_multiplier": rounds[-1].get("noise_multiplier") if rounds else None,
    }
