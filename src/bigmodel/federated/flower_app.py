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
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS as SECAGG_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

if TYPE_CHECKING:
    from bigmodel.federated import core

# `core` (torch, the recipe's data) is imported where it is used: a SecAgg+ round's key-exchange and unmasking
# messages each start a ClientApp process that needs only Flower and numpy (1.1 s less per client and stage).


def _secagg_when_asked(msg: Message, context: Context, call_next: Any) -> Message:
    """The client half of SecAgg+ (Flower's `secaggplus_mod`: key exchange, masking, unmasking) for the messages of
    a securely aggregated round; other messages pass straight to the handler."""
    if msg.metadata.message_type == MessageType.TRAIN and SECAGG_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


client_app = ClientApp(mods=[_secagg_when_asked])
server_app = ServerApp()


# --------------------------------------------------------------------------------------------------------- client
@client_app.train()
def train(msg: Message, context: Context) -> Message:
    from bigmodel.federated import core

    with core.machine_slot():
        return _train(msg, context)


def _train(msg: Message, context: Context) -> Message:
    from bigmodel.federated import core

    node = context.node_config
    # a SuperNode names its recipe; a virtual node of the Simulation Runtime has only its partition id, and runs on
    # the server's machine, next to the run's recipe
    recipe = node.get("recipe") or Path(str(context.run_config["run-dir"])) / "recipe.yaml"
    fed = core.Federation.from_file(str(recipe))
    # A securely aggregated round carries Flower's legacy FitIns (what secaggplus_mod reads and answers).
    secure = SECAGG_CONFIGS in msg.content.config_records
    if secure:
        fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
        config: Any = fitins.config
        weights = parameters_to_ndarrays(fitins.parameters)
    else:
        config = msg.content["config"]
        weights = msg.content["arrays"].to_numpy_ndarrays(keep_input=False)
    if str(config["recipe-digest"]) != fed.digest:
        raise RuntimeError(
            f"client {node['partition-id']}: its recipe {recipe} differs from the server's (digest "
            f"{fed.digest} vs {config['recipe-digest']}); give both the same recipe file"
        )
    names = json.loads(str(config["names"]))
    mu = float(config["proximal-mu"]) if "proximal-mu" in config else 0.0
    pid = int(node["partition-id"])
    home = Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr"))  # the client's own disk
    privacy_file = home / "bigmodel-privacy" / f"{config['run-key']}-partition-{pid}.json"
    rnd = int(config["server-round"])
    new, metrics = fed.client_round(pid, dict(zip(names, weights, strict=True)), rnd, mu, privacy_file)
    if secure:
        return _masked_reply(msg, fed, pid, rnd, weights, [new[k] for k in names], metrics, config)
    arrays = ArrayRecord([new[k] for k in names])
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=msg)


def _masked_reply(
    msg: Message,
    fed: core.Federation,
    pid: int,
    rnd: int,
    old: list[np.ndarray],
    new: list[np.ndarray],
    metrics: dict[str, float],
    config: Any,
) -> Message:
    """The client's update (new - global; integer buffers such as BatchNorm's step counter send zeros) as a FitRes;
    secaggplus_mod then weights it by the example count, quantises, masks and sends it, and clears the plain arrays
    from the reply."""
    update = [
        (n.astype(np.float64) - o.astype(np.float64)).astype(np.float32)
        if np.issubdtype(o.dtype, np.floating)
        else np.zeros(o.shape, np.float32)
        for o, n in zip(old, new, strict=True)
    ]
    ratio = metrics["num-examples"] / float(config["secagg-max-weight"])
    clip = float(config["secagg-clipping-range"])
    metrics["secagg-clipped"] = float(sum(int(np.count_nonzero(np.abs(u * ratio) > clip)) for u in update))
    # Flower quantises by stochastic rounding with numpy's global generator: seeded, the aggregate is reproducible
    # (the masks cancel exactly, whatever keys the exchange drew).
    np.random.seed((fed.recipe.seed * 1_000_003 + rnd * 1_009 + pid) % 2**32)
    res = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(update), int(metrics["num-examples"]), metrics)
    return Message(compat.fitres_to_recorddict(res, keep_input=False), reply_to=msg)


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


class _Sampled(LegacyStrategy):
    """The legacy Strategy SecAggPlusWorkflow drives: it sends the round's FitIns to the nodes bigmodel's strategy
    sampled, and keeps the clients' FitRes (their metrics; the parameters replaced by the unmasked aggregate)."""

    def __init__(self, grid: Any, run_id: int, node_ids: list[int], fitins: FitIns) -> None:
        self.proxies = [GridClientProxy(nid, grid, run_id) for nid in node_ids]
        self.fitins = fitins
        self.results: list[FitRes] = []
        self.failures: list[str] = []

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> list[Any]:
        return [(proxy, self.fitins) for proxy in self.proxies]

    def aggregate_fit(self, server_round: int, results: list[Any], failures: list[Any]) -> tuple[Any, dict]:
        self.results = [res for _, res in results]
        self.failures = [_reason(f) for f in failures]
        return (self.results[0].parameters if self.results else None), {}

    def initialize_parameters(self, client_manager: Any) -> None:
        return None

    def configure_evaluate(self, server_round: int, parameters: Any, client_manager: Any) -> list[Any]:
        return []

    def aggregate_evaluate(self, server_round: int, results: list[Any], failures: list[Any]) -> tuple[None, dict]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Any) -> None:
        return None


def _reason(failure: Any) -> str:
    """What SecAggPlusWorkflow records for a failed node (an Exception around the reply's Error) as one line."""
    err = failure.args[0] if isinstance(failure, BaseException) and failure.args else failure
    return str(getattr(err, "reason", err))


class _SecAggPlus(SecAggPlusWorkflow):
    """Flower's SecAggPlusWorkflow with one fix. Flower 1.42 treats a client that dropped out before its key shares
    went round (during the setup or share-keys stage) as one to unmask in the last stage: it asks the others for
    shares they never received (a KeyError on every client) and for masks never added, and the round fails. Only
    the clients whose shares went round (those alive after the share-keys stage) can have been masked with, so the
    unmasking is restricted to them."""

    def collect_masked_vectors_stage(self, grid: Any, context: Any, state: Any) -> bool:
        state.sampled_node_ids = set(state.active_node_ids)
        for nid in state.nid_to_neighbours:
            state.nid_to_neighbours[nid] &= state.sampled_node_ids
        return super().collect_masked_vectors_stage(grid, context, state)


class _Counting:
    """The grid as SecAggPlusWorkflow uses it (`send_and_receive`), counting the bytes of what goes each way."""

    def __init__(self, grid: Grid) -> None:
        self.grid, self.down, self.up = grid, 0, 0

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        self.down += sum(_content_bytes(m.content) for m in messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.up += sum(_content_bytes(m.content) for m in replies if not m.has_error())
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)


def _content_bytes(content: RecordDict) -> int:
    """Arrays plus the bytes inside config records (SecAgg+ sends keys, shares and masked vectors as bytes)."""
    n = sum(_nbytes(r) for r in content.array_records.values())
    for rec in content.config_records.values():
        for v in rec.values():
            items = v if isinstance(v, list) else [v]
            n += sum(len(x) for x in items if isinstance(x, bytes))
    return n


def _plain_round(grid: Grid, messages: list[Message], strategy: Any, rnd: int, timeout: float) -> dict[str, Any]:
    """Send the global model to the sampled clients and aggregate their weights with the strategy."""
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    ok = [m for m in replies if not m.has_error()]
    failed = [m.error.reason for m in replies if m.has_error()]
    failed += ["no reply"] * (len(messages) - len(replies))
    if not ok:
        return {"arrays": None, "metrics": [], "failed": failed}
    ok.sort(key=lambda m: float(m.content["metrics"]["partition-id"]))  # a fixed summation order
    new_arrays, _ = strategy.aggregate_train(rnd, ok)
    return {
        "arrays": new_arrays,
        "metrics": [m.content["metrics"] for m in ok],
        "failed": failed,
        "bytes_down": _nbytes(messages[0].content["arrays"]) * len(messages) if messages else 0,
        "bytes_up": int(sum(_nbytes(m.content["arrays"]) for m in ok)),
    }


def _secure_round(
    grid: Grid,
    context: Context,
    messages: list[Message],
    strategy: Any,
    rnd: int,
    fed: core.Federation,
    arrays: ArrayRecord,
    dtypes: list[Any],
) -> dict[str, Any]:
    """SecAgg+: the sampled clients exchange keys, train, and send their masked, weighted updates; the server
    unmasks only their sum (Flower's SecAggPlusWorkflow), adds the mean update to the global model, and hands the
    result to the strategy as one reply (FedAvg and FedProx keep it; FedAdam takes its Adam step on the mean
    update)."""
    cfg = fed.cfg
    sa = cfg.secure_aggregation
    config = dict(messages[0].content["config"])  # what configure_train put there: server-round, proximal-mu
    max_weight = max(len(p) for p in fed.parts)
    config |= {"secagg-max-weight": float(max_weight), "secagg-clipping-range": float(sa.clipping_range)}
    fitins = FitIns(compat.arrayrecord_to_parameters(arrays, keep_input=True), config)
    sampled = _Sampled(grid, context.run_id, [m.metadata.dst_node_id for m in messages], fitins)
    legacy = LegacyContext(context, strategy=sampled)
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: rnd})
    legacy.state.array_records[MAIN_PARAMS_RECORD] = arrays
    workflow = _SecAggPlus(
        sa.num_shares,
        sa.reconstruction_threshold,
        max_weight=float(max_weight),
        clipping_range=sa.clipping_range,
        quantization_range=2**sa.quantization_bits,
        modulus_range=2**32,
        timeout=cfg.round_timeout_s,
    )
    counting = _Counting(grid)
    workflow(counting, legacy)  # type: ignore[arg-type]  (it calls only send_and_receive)
    # one entry per client that did not contribute (the workflow records a stage-2 error twice)
    missing = len(messages) - len(sampled.results)
    failed = (list(dict.fromkeys(sampled.failures)) + ["dropped out"] * missing)[:missing]
    out: dict[str, Any] = {"bytes_down": counting.down, "bytes_up": counting.up, "failed": failed}
    if not sampled.results:
        out |= {"arrays": None, "metrics": []}
        return out
    mean_update = parameters_to_ndarrays(sampled.results[0].parameters)
    merged = []
    for i, (g, u) in enumerate(zip(arrays.to_numpy_ndarrays(), mean_update, strict=True)):
        floating = np.issubdtype(dtypes[i], np.floating)
        merged.append((g.astype(np.float64) + u).astype(dtypes[i]) if floating else g)
    mets = sorted((dict(r.metrics) for r in sampled.results), key=lambda x: float(x["partition-id"]))
    n = float(sum(float(x["num-examples"]) for x in mets))
    reply = Message(
        RecordDict({"arrays": ArrayRecord(merged), "metrics": MetricRecord({"num-examples": n})}),
        dst_node_id=0,
        message_type=MessageType.TRAIN,
    )
    new_arrays, _ = strategy.aggregate_train(rnd, [reply])
    out |= {"arrays": new_arrays, "metrics": mets, "secagg_clipped": int(sum(x["secagg-clipped"] for x in mets))}
    return out


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    from bigmodel.federated import core

    run_dir = Path(str(context.run_config["run-dir"]))
    try:
        _serve(grid, context, run_dir)
    except BaseException as e:
        stopped = isinstance(e, (KeyboardInterrupt, SystemExit))
        message = "the server process was stopped" if stopped else f"{type(e).__name__}: {e}"
        core.append_round(run_dir, {"event": "failed", "message": message})
        (run_dir / "server-error.txt").write_text(traceback.format_exc(), encoding="utf-8")
        raise


def _serve(grid: Grid, context: Context, run_dir: Path) -> None:
    from bigmodel.federated import core

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
        # Flower's configure_train sizes its sample from the nodes connected when it is called, and only then waits
        # for min_available_nodes: a first round begun while a client was still connecting went to 2 of 3 clients.
        while len(list(grid.get_node_ids())) < strategy.min_available_nodes:
            time.sleep(0.5)
        messages = list(strategy.configure_train(rnd, arrays, config, grid))
        # The first round waited for every client to connect; later rounds go on with those alive (a dead client's
        # node drops out of the available ones, and waiting for it would wait for ever).
        strategy.min_available_nodes = cfg.min_clients
        if cfg.secure_aggregation is None:
            res = _plain_round(grid, messages, strategy, rnd, cfg.round_timeout_s)
        else:
            res = _secure_round(grid, context, messages, strategy, rnd, fed, arrays, dtypes)
        mets, failed = res["metrics"], res["failed"]
        if len(mets) < cfg.min_clients or res["arrays"] is None:
            raise RuntimeError(
                f"round {rnd}: {len(mets)} of {len(messages)} clients replied, fewer than federated.min_clients "
                f"{cfg.min_clients} ({'; '.join(sorted(set(failed))) or 'secure aggregation halted'})"
            )
        # back in the model's dtypes: averaging and FedAdam's update give float64, which would double what is sent
        arrays = ArrayRecord(
            [np.asarray(a.numpy()).astype(dtypes[i], copy=False) for i, a in enumerate(res["arrays"].values())]
        )
        weights = dict(zip(names, arrays.to_numpy_ndarrays(), strict=True))
        seconds = time.perf_counter() - t0
        metrics = fed.evaluate(weights)
        server_state = strategy.state() if hasattr(strategy, "state") else {}
        core.save_round(run_dir, rnd, weights, server_state)
        n = sum(float(x["num-examples"]) for x in mets)
        record = {
            "round": rnd,
            **metrics,
            "train_loss": _mean_loss(mets),
            "clients": len(mets),
            "sent_to": len(messages),
            "failures": failed,
            "partitions": sorted(int(float(x["partition-id"])) for x in mets),
            "examples": int(n),
            "time_s": round(seconds, 3),
            "client_train_s": round(max(float(x["train-time-s"]) for x in mets), 3),
            "bytes_down": int(res["bytes_down"]),
            "bytes_up": int(res["bytes_up"]),
            **_privacy(mets),
        }
        if "secagg_clipped" in res:
            record["secagg_clipped"] = res["secagg_clipped"]
        core.append_round(run_dir, record)
    rounds = [r for r in core.read_rounds(run_dir) if r.get("round", 0) >= 1]
    summary = core.finish(fed, run_dir, weights, rounds)
    core.append_round(run_dir, {"event": "finished", "metrics": summary["metrics"]})


__all__ = ["client_app", "server_app"]
