"""The Flower app: a `ServerApp` and a `ClientApp` (Flower 1.42's Message API) over `bigmodel.federated.core`.

Imported only inside Flower's processes (the `flwr-serverapp` and `flwr-clientapp` processes SuperLink and each
SuperNode start), never by bigmodel's own CLI process.

Server: waits for `federated.clients` SuperNodes, then each round asks the strategy (Flower's FedAvg, FedProx or
FedAdam) whom to send the global weights to, sends them and waits for the replies (`round_timeout_s`; a node that
stops sending heartbeats gets an error reply after ~60 s), aggregates the valid replies in partition order,
evaluates the global model on the central split and checkpoints it. Fewer than `min_clients` replies stops the run.
Client: reads its recipe and partition id from the SuperNode's node config, checks it runs the server's recipe,
trains and replies.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
import traceback
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from bigmodel.federated import core

client_app = ClientApp()
server_app = ServerApp()


# --------------------------------------------------------------------------------------------------------- client
@client_app.train()
def train(msg: Message, context: Context) -> Message:
    with core.machine_slot():
        return _train(msg, context)


def _train(msg: Message, context: Context) -> Message:
    node = context.node_config
    fed = core.Federation.from_file(str(node["recipe"]))
    config = msg.content["config"]
    if str(config["recipe-digest"]) != fed.digest:
        raise RuntimeError(
            f"client {node['partition-id']}: its recipe {node['recipe']} differs from the server's (digest "
            f"{fed.digest} vs {config['recipe-digest']}); give both the same recipe file"
        )
    weights = msg.content["arrays"].to_numpy_ndarrays(keep_input=False)
    names = json.loads(str(config["names"]))
    mu = float(config["proximal-mu"]) if "proximal-mu" in config else 0.0
    pid = int(node["partition-id"])
    home = Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr"))  # the client's own disk
    privacy_file = home / "bigmodel-privacy" / f"{config['run-key']}-partition-{pid}.json"
    new, metrics = fed.client_round(
        pid, dict(zip(names, weights, strict=True)), int(config["server-round"]), mu, privacy_file
    )
    arrays = ArrayRecord([new[k] for k in names])
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=msg)


# --------------------------------------------------------------------------------------------------------- server
class _BuffersAveraged(FedAdam):
    """FedAdam (Reddi et al. 2021) on the parameters; buffers (BatchNorm's running statistics and counters) are the
    plain weighted average, as under FedAvg: an adaptive step could drive a running variance below zero."""

    def __init__(self, buffer_index: list[int], **kw: Any) -> None:
        super().__init__(**kw)
        self.buffer_index = buffer_index

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> Any:
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None or not self.buffer_index:
            return arrays, metrics
        plain, _ = FedAvg.aggregate_train(self, server_round, replies)
        keys = list(arrays.keys())
        plain_keys = list(plain.keys())
        for i in self.buffer_index:
            arrays[keys[i]] = plain[plain_keys[i]]
        return arrays, metrics

    def state(self) -> dict[str, Any]:
        arrays = {f"m.{k}": v for k, v in (self.m_t or {}).items()}
        arrays |= {f"v.{k}": v for k, v in (self.v_t or {}).items()}
        return {"arrays": arrays, "meta": {}}

    def load_state(self, state: dict[str, Any]) -> None:
        arrays = state.get("arrays", {})
        m = {k[2:]: v for k, v in arrays.items() if k.startswith("m.")}
        v = {k[2:]: x for k, x in arrays.items() if k.startswith("v.")}
        self.m_t = m or None
        self.v_t = v or None


def make_strategy(fed: core.Federation, buffer_index: list[int]) -> Any:
    cfg = fed.cfg
    common = {
        "fraction_train": cfg.fraction_fit,
        "fraction_evaluate": 0.0,  # the global model is evaluated centrally, on eval.split
        "min_train_nodes": 1,
        "min_available_nodes": cfg.clients,
    }
    if cfg.strategy == "fedprox":
        return FedProx(proximal_mu=cfg.proximal_mu, **common)
    if cfg.strategy == "fedadam":
        b1, b2 = cfg.server_betas
        return _BuffersAveraged(buffer_index, eta=cfg.server_lr, beta_1=b1, beta_2=b2, tau=cfg.server_tau, **common)
    return FedAvg(**common)


def _mean_loss(mets: list[Any]) -> float:
    """The clients' training losses averaged by their examples (a client that took no step has none)."""
    pairs = [(float(x["train-loss"]), float(x["num-examples"])) for x in mets]
    pairs = [(v, n) for v, n in pairs if v == v]
    return sum(v * n for v, n in pairs) / sum(n for _, n in pairs) if pairs else float("nan")


def _privacy(mets: list[Any]) -> dict[str, float]:
    """Client-side DP: the largest ε a client has spent so far, and the noise multiplier."""
    eps = [float(x["epsilon"]) for x in mets if "epsilon" in x]
    if not eps:
        return {}
    return {"epsilon_max": max(eps), "noise_multiplier": float(mets[0]["noise-multiplier"])}


def _nbytes(record: ArrayRecord) -> int:
    return int(sum(len(a.data) for a in record.values()))


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    run_dir = Path(str(context.run_config["run-dir"]))
    try:
        _serve(grid, run_dir)
    except BaseException as e:
        stopped = isinstance(e, (KeyboardInterrupt, SystemExit))
        message = "the server process was stopped" if stopped else f"{type(e).__name__}: {e}"
        core.append_round(run_dir, {"event": "failed", "message": message})
        (run_dir / "server-error.txt").write_text(traceback.format_exc(), encoding="utf-8")
        raise


def _serve(grid: Grid, run_dir: Path) -> None:
    fed = core.Federation.from_file(run_dir / "recipe.yaml")
    cfg = fed.cfg
    model = fed.exp.model
    names = list(model.state_dict().keys())
    params = {n for n, _ in model.named_parameters()}
    buffer_index = [i for i, n in enumerate(names) if n not in params]
    strategy = make_strategy(fed, buffer_index)
    restored = core.latest_round(run_dir)
    if restored is None:
        start, weights = 0, fed.initial_weights()
        core.write_json_atomic(run_dir / "clients.json", fed.describe_clients())
        first = fed.evaluate(weights)
        core.append_round(run_dir, {"round": 0, **first})
    else:
        start, weights, server_state = restored
        if hasattr(strategy, "load_state"):
            strategy.load_state(server_state)
        core.append_round(run_dir, {"event": "resumed", "from_round": start})
    dtypes = [fed.initial_weights()[n].dtype for n in names]
    arrays = ArrayRecord([np.asarray(weights[n]).astype(dtypes[i], copy=False) for i, n in enumerate(names)])
    started = json.loads((run_dir / "env.json").read_text(encoding="utf-8")).get("started", "")
    run_key = hashlib.sha256(f"{run_dir.resolve()}|{started}".encode()).hexdigest()[:16]  # this federation's
    for rnd in range(start + 1, cfg.rounds + 1):
        t0 = time.perf_counter()
        random.seed(fed.recipe.seed * 1_000_003 + rnd)  # which nodes a fraction_fit < 1 samples
        config = ConfigRecord({"recipe-digest": fed.digest, "names": json.dumps(names), "run-key": run_key})
        messages = list(strategy.configure_train(rnd, arrays, config, grid))
        # The first round waited for every client to connect; later rounds go on with those alive (a dead client's
        # node drops out of the available ones, and waiting for it would wait for ever).
        strategy.min_available_nodes = cfg.min_clients
        bytes_down = _nbytes(arrays) * len(messages)
        replies = list(grid.send_and_receive(messages, timeout=cfg.round_timeout_s))
        ok = [m for m in replies if not m.has_error()]
        failed = [m.error.reason for m in replies if m.has_error()]
        failed += ["no reply"] * (len(messages) - len(replies))
        if len(ok) < cfg.min_clients:
            raise RuntimeError(
                f"round {rnd}: {len(ok)} of {len(messages)} clients replied, fewer than federated.min_clients "
                f"{cfg.min_clients} ({'; '.join(sorted(set(failed)))})"
            )
        ok.sort(key=lambda m: float(m.content["metrics"]["partition-id"]))  # a fixed summation order
        new_arrays, _ = strategy.aggregate_train(rnd, ok)
        # back in the model's dtypes: averaging and FedAdam's update give float64, which would double what is sent
        arrays = ArrayRecord(
            [np.asarray(a.numpy()).astype(dtypes[i], copy=False) for i, a in enumerate(new_arrays.values())]
        )
        weights = dict(zip(names, arrays.to_numpy_ndarrays(), strict=True))
        seconds = time.perf_counter() - t0
        metrics = fed.evaluate(weights)
        server_state = strategy.state() if hasattr(strategy, "state") else {}
        core.save_round(run_dir, rnd, weights, server_state)
        mets = [m.content["metrics"] for m in ok]
        n = sum(float(x["num-examples"]) for x in mets)
        core.append_round(
            run_dir,
            {
                "round": rnd,
                **metrics,
                "train_loss": _mean_loss(mets),
                "clients": len(ok),
                "sent_to": len(messages),
                "failures": failed,
                "partitions": sorted(int(float(x["partition-id"])) for x in mets),
                "examples": int(n),
                "time_s": round(seconds, 3),
                "client_train_s": round(max(float(x["train-time-s"]) for x in mets), 3),
                "bytes_down": bytes_down,
                "bytes_up": int(sum(_nbytes(m.content["arrays"]) for m in ok)),
                **_privacy(mets),
            },
        )
    rounds = [r for r in core.read_rounds(run_dir) if r.get("round", 0) >= 1]
    summary = core.finish(fed, run_dir, weights, rounds)
    core.append_round(run_dir, {"event": "finished", "metrics": summary["metrics"]})


__all__ = ["Array", "client_app", "server_app"]
