"""Federated learning (bigmodel federate): partitions, the FedProx term, and whole federations run as real Flower
processes on loopback (SuperLink, SuperNodes, per-message ServerApp / ClientApp processes), including a client
killed mid-round, Ctrl-C and resume, a crash, and the server / client commands of a federation across machines."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import ROOT, run_cli, tiny_recipe


def _flower_ready() -> str | None:
    from bigmodel.errors import UserError
    from bigmodel.federated.runtime import flower_bin

    try:
        flower_bin()
    except UserError as e:
        return str(e)
    return None


needs_flower = pytest.mark.skipif(_flower_ready() is not None, reason=f"Flower is not set up: {_flower_ready()}")


# ------------------------------------------------------------------------------------------------------ partitions
def test_partitions_cover_every_example_once_and_are_reproducible():
    from bigmodel.federated.partition import partition

    labels = np.random.default_rng(1).integers(0, 10, 3000)
    for kind in ("iid", "dirichlet", "shards"):
        parts = partition(labels, 7, kind, seed=3, alpha=0.5)
        assert len(parts) == 7
        allidx = np.concatenate(parts)
        assert np.array_equal(np.sort(allidx), np.arange(3000)), kind
        again = partition(labels, 7, kind, seed=3, alpha=0.5)
        assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True)), kind
        other = partition(labels, 7, kind, seed=4, alpha=0.5)
        assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True)), kind
    iid = partition(labels, 7, "iid", seed=0)
    assert max(map(len, iid)) - min(map(len, iid)) <= 1


def test_dirichlet_alpha_sets_how_skewed_the_clients_are():
    """The share of a client's examples in its most frequent class: near 1/10 for alpha 100, far above for 0.1."""
    from bigmodel.federated.partition import partition

    labels = np.repeat(np.arange(10), 600)

    def top_share(alpha: float) -> float:
        parts = partition(labels, 10, "dirichlet", seed=0, alpha=alpha, min_size=10)
        return float(np.mean([np.bincount(labels[p], minlength=10).max() / len(p) for p in parts]))

    assert top_share(100.0) < 0.2
    assert top_share(0.5) > 0.3
    assert top_share(0.1) > 0.6
    parts = partition(labels, 10, "dirichlet", seed=0, alpha=0.1, min_size=50)
    assert min(map(len, parts)) >= 50


def test_shards_give_each_client_few_labels():
    from bigmodel.federated.partition import partition

    labels = np.repeat(np.arange(10), 100)
    parts = partition(labels, 10, "shards", seed=0, labels_per_client=2)
    assert all(len(np.unique(labels[p])) <= 2 for p in parts)
    assert all(len(p) == 100 for p in parts)


def test_partition_errors_are_one_line():
    from bigmodel.errors import UserError
    from bigmodel.federated.partition import partition

    with pytest.raises(UserError, match="federated.clients 20 is more than the 10 training examples"):
        partition(np.zeros(10), 20)
    with pytest.raises(UserError, match="min_size"):
        partition(np.zeros(100), 20, "dirichlet", min_size=10)


# --------------------------------------------------------------------------------------------------------- fedprox
def test_proximal_strategy_adds_mu_times_the_distance_to_the_global_weights():
    from bigmodel.federated.core import Proximal

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    prox = Proximal(mu=0.5)
    prox.set_anchor(model)
    anchor = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    with torch.no_grad():  # move away from the anchor, then take a step with zero loss gradient
        for p in model.parameters():
            p.add_(1.0)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    prox.step(model, opt, None, None)
    for p, a in zip(model.parameters(), anchor, strict=True):
        # w = a + 1; grad = mu (w - a) = 0.5; after the step w = a + 1 - 0.5
        assert torch.allclose(p.detach(), a + 0.5)


# ---------------------------------------------------------------------------------------------------------- recipe
def test_recipe_checks(tmp_path):
    from bigmodel.config import load_recipe
    from bigmodel.errors import UserError

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(**{"federated.clients": 2, "federated.min_clients": 3})))
    with pytest.raises(UserError, match="federated.min_clients 3 is more than federated.clients 2"):
        load_recipe(path)
    path.write_text(yaml.safe_dump(tiny_recipe(**{"federated.clients": 2, "federated.strategy": "fedsgd"})))
    with pytest.raises(UserError, match="federated.strategy"):
        load_recipe(path)
    for over, match in (
        ({"federated.clients": 1}, "needs at least 2 clients a round"),
        ({"federated.clients": 4, "federated.fraction_fit": 0.25}, "needs at least 2 clients a round"),
        ({"federated.clients": 4, "federated.secure_aggregation.num_shares": 5}, "num_shares 5 is more than"),
        (
            {
                "federated.clients": 4,
                "federated.secure_aggregation.num_shares": 3,
                "federated.secure_aggregation.reconstruction_threshold": 3,
            },
            "reconstruction_threshold 3 must be less than num_shares 3",
        ),
        ({"federated.clients": 600, "federated.secure_aggregation.quantization_bits": 24}, "use at most 21 bits"),
        ({"federated.clients": 3, "federated.secure_aggregation.reconstruction_threshold": 1.5}, "reconstruction_t"),
    ):
        rec = tiny_recipe(**over)
        rec["federated"].setdefault("secure_aggregation", {})
        path.write_text(yaml.safe_dump(rec))
        with pytest.raises(UserError, match=match):
            load_recipe(path)
    path.write_text(yaml.safe_dump(tiny_recipe(**{"federated.clients": 3, "federated.secure_aggregation": True})))
    assert load_recipe(path).federated.secure_aggregation.num_shares == 1.0


def test_cli_errors_without_a_traceback(tmp_path):
    r = run_cli("federate")
    assert r.returncode != 0 and "give a recipe file" in r.stderr and "Traceback" not in r.stderr
    path = tmp_path / "plain.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe()))
    r = run_cli("federate", str(path), "--out", str(tmp_path / "run"))
    assert r.returncode != 0 and "no federated block" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("federate", "client", str(path))
    assert r.returncode != 0 and "--partition-id" in r.stderr


# ------------------------------------------------------------------------------------------------ real federations
def fed_recipe(tmp_path: Path, **over) -> Path:
    opts = {
        "name": "tinyfed",
        "data.val_fraction": 0.0,
        "model.dropout": 0.0,
        "train.epochs": 4,
        "train.batch_size": 32,
        "federated.clients": 3,
        "federated.rounds": 2,
        "federated.local_epochs": 2,
        "federated.partition.kind": "dirichlet",
        "federated.partition.alpha": 1.0,
        **over,
    }
    path = tmp_path / "fed.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(**opts)))
    return path


@pytest.fixture
def spawn():
    """Start `bigmodel federate ...` processes; whatever is still running when the test ends is stopped (SIGTERM:
    bigmodel stops its Flower processes), so a failing test leaves nothing behind."""
    procs: list[subprocess.Popen] = []

    def start(*args: str, **kw) -> subprocess.Popen:
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        p = subprocess.Popen([sys.executable, "-m", "bigmodel", "federate", *args], text=True, **kw)
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()


def flower_processes(run_dir: Path) -> list[int]:
    """Live processes (not zombies) whose environment points into this run's Flower folder: the SuperLink,
    SuperNodes, SuperExecs and the ServerApp / ClientApp processes all inherit FLWR_HOME from bigmodel."""
    mark = str(run_dir.resolve() / "flower").encode()
    out = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            stat = (d / "stat").read_text()
            if stat[stat.rindex(")") + 2] == "Z":
                continue
            if mark in (d / "environ").read_bytes():
                out.append(int(d.name))
        except (OSError, ValueError):
            continue
    return out


def no_flower_left(run_dir: Path, within_s: float = 15.0) -> bool:
    deadline = time.monotonic() + within_s
    while flower_processes(run_dir) and time.monotonic() < deadline:
        time.sleep(0.3)
    return not flower_processes(run_dir)


def rounds_of(run_dir: Path) -> list[dict]:
    lines = (run_dir / "rounds.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines if x.strip()]


@needs_flower
def test_a_federation_of_real_processes_trains_and_leaves_an_ordinary_run(tmp_path):
    recipe = fed_recipe(tmp_path)
    run = tmp_path / "run"
    r = run_cli("federate", str(recipe), "--out", str(run), check=True)
    assert r.stdout.strip().splitlines()[-1] == str(run)
    assert "round   2/2" in r.stdout and "clients 3/3" in r.stdout
    recs = [x for x in rounds_of(run) if "round" in x]
    assert [x["round"] for x in recs] == [0, 1, 2]
    assert all(x["clients"] == 3 and x["partitions"] == [0, 1, 2] and x["bytes_up"] > 0 for x in recs[1:])
    assert recs[-1]["accuracy"] > max(recs[0]["accuracy"], 0.3)  # learned: 10 classes, chance is 0.1
    clients = json.loads((run / "clients.json").read_text())
    assert sum(c["examples"] for c in clients) == recs[1]["examples"]
    assert all(sum(c["per_class"]) == c["examples"] for c in clients)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["federated"]["rounds"] == 2 and summary["federated"]["bytes_sent"] > 0
    # the final global model is an ordinary artifact: evaluate (and so predict / serve / export) take it as it is
    ev = run_cli("evaluate", str(run), "--json", check=True)
    assert json.loads(ev.stdout)["accuracy"] == pytest.approx(summary["metrics"]["accuracy"])
    assert no_flower_left(run)


@needs_flower
def test_secure_aggregation_gives_fedavgs_model_without_the_server_seeing_a_client_update(tmp_path):
    """SecAgg+ (masked, quantised updates; the server unmasks only their sum) against plain FedAvg on the same
    recipe: the clients train the same way, so after round 1 the global models agree to the quantisation's precision;
    the masked uploads are bigger than plain weights (the masked vectors' integers and the key exchange)."""
    from safetensors.numpy import load_file

    runs = {}
    for name, over in (("plain", {}), ("secure", {"federated.secure_aggregation": {"num_shares": 3}})):
        (tmp_path / name).mkdir()
        recipe = fed_recipe(tmp_path / name, **over)
        run = tmp_path / name / "run"
        r = run_cli("federate", str(recipe), "--out", str(run), check=True)
        assert "round   2/2" in r.stdout and "clients 3/3" in r.stdout
        runs[name] = run
    assert "SecAgg+" in r.stdout
    plain = [x for x in rounds_of(runs["plain"]) if x.get("round", 0) >= 1]
    secure = [x for x in rounds_of(runs["secure"]) if x.get("round", 0) >= 1]
    assert [x["partitions"] for x in secure] == [[0, 1, 2]] * 2
    assert [x["train_loss"] for x in secure[:1]] == [x["train_loss"] for x in plain[:1]]  # round 1: same start
    assert all(x["secagg_clipped"] == 0 for x in secure)
    assert all(s["bytes_up"] > p["bytes_up"] for s, p in zip(secure, plain, strict=True))
    # Round 1 starts both from the same model: the global models differ by the quantisation alone (2**22 levels over
    # +-8). Later rounds drift further apart (Adam's steps amplify tiny differences), so they are compared by accuracy.
    a = load_file(str(runs["plain"] / "rounds" / "round-0001" / "global.safetensors"))
    b = load_file(str(runs["secure"] / "rounds" / "round-0001" / "global.safetensors"))
    diffs = {k: float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a if a[k].dtype.kind == "f"}
    assert max(diffs.values()) < 1e-4, diffs
    assert max(diffs.values()) > 0  # quantised: not bit-identical, so the sum really went through SecAgg+
    assert secure[-1]["accuracy"] == pytest.approx(plain[-1]["accuracy"], abs=0.02)
    assert no_flower_left(runs["secure"])


def _ray_ready() -> str | None:
    if _flower_ready() is not None:
        return _flower_ready()
    from bigmodel.errors import UserError
    from bigmodel.federated.runtime import flower_bin, simulation_ready

    try:
        simulation_ready(flower_bin())
    except UserError as e:
        return str(e)
    return None


@pytest.mark.skipif(_ray_ready() is not None, reason=f"Ray is not set up: {_ray_ready()}")
@pytest.mark.timeout(900)
def test_the_simulation_runtime_trains_the_same_federation(tmp_path):
    """`--simulation`: Flower's Simulation Runtime (virtual SuperNodes, ClientApps in Ray workers) runs the same
    server and clients as the Deployment Runtime, so the same recipe gives the same global model; nothing of Flower
    or Ray is left running after it."""
    from safetensors.numpy import load_file

    runs = {}
    for name, extra in (("deployment", []), ("simulation", ["--simulation"])):
        (tmp_path / name).mkdir()
        recipe = fed_recipe(tmp_path / name)
        runs[name] = tmp_path / name / "run"
        r = run_cli("federate", str(recipe), "--out", str(runs[name]), *extra, check=True)
        assert "round   2/2" in r.stdout and "clients 3/3" in r.stdout
    assert "Simulation Runtime" in r.stdout
    assert no_flower_left(runs["simulation"], within_s=30)
    a = load_file(str(runs["deployment"] / "rounds" / "round-0002" / "global.safetensors"))
    b = load_file(str(runs["simulation"] / "rounds" / "round-0002" / "global.safetensors"))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    sim = [x for x in rounds_of(runs["simulation"]) if x.get("round", 0) >= 1]
    assert [x["partitions"] for x in sim] == [[0, 1, 2]] * 2


@needs_flower
@pytest.mark.slow
def test_ctrl_c_stops_every_process_and_resume_finishes_the_rounds(tmp_path, spawn):
    """SIGINT after the first round: exit 130, nothing of Flower left; `--resume` continues from round 1 (FedAdam:
    its server moments come back from the round checkpoint) and finishes round 2. The clients train with DP-SGD:
    each keeps its accountant between rounds, so the ε after round 2 (a new process, after a restart) is above
    round 1's."""
    dp = {"privacy.dp.noise_multiplier": 1.0, "privacy.dp.max_grad_norm": 1.0}
    recipe = fed_recipe(tmp_path, **{"federated.strategy": "fedadam", "federated.server_lr": 0.003, **dp})
    run = tmp_path / "run"
    proc = spawn(str(recipe), "--out", str(run))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (run / "rounds" / "round-0001" / "state.json").is_file():
        time.sleep(0.3)
    assert (run / "rounds" / "round-0001").is_dir(), proc.communicate(timeout=60)
    assert (run / "rounds" / "round-0001" / "server.safetensors").is_file()  # FedAdam's m and v
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert no_flower_left(run)
    assert not (run / "summary.json").is_file()
    r = run_cli("federate", "--resume", str(run), check=True)
    assert "resumed after round 1" in r.stdout
    recs = [x for x in rounds_of(run) if "round" in x]
    assert [x["round"] for x in recs] == [0, 1, 2]
    assert 0 < recs[1]["epsilon_max"] < recs[2]["epsilon_max"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["privacy"]["epsilon"] == recs[2]["epsilon_max"]
    assert no_flower_left(run)


@pytest.mark.skipif(_ray_ready() is not None, reason=f"Ray is not set up: {_ray_ready()}")
@pytest.mark.slow
def test_ctrl_c_of_a_simulation_leaves_no_ray_or_flower_process_and_resumes(tmp_path, spawn):
    recipe = fed_recipe(tmp_path, **{"federated.rounds": 30, "train.epochs": 60})
    run = tmp_path / "run"
    proc = spawn(str(recipe), "--out", str(run), "--simulation")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (run / "rounds" / "round-0001" / "state.json").is_file():
        time.sleep(0.3)
    assert flower_processes(run), proc.communicate(timeout=60)  # the SuperLink, SuperExec, Ray's processes, workers
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert no_flower_left(run, within_s=30)
    assert not (run / "summary.json").is_file()
    done = max(x["round"] for x in rounds_of(run) if "round" in x)
    r = run_cli("federate", "--resume", str(run), "--simulation", check=True)
    assert f"resumed after round {done}" in r.stdout
    assert [x["round"] for x in rounds_of(run) if "round" in x] == list(range(31))
    assert no_flower_left(run, within_s=30)


@needs_flower
@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secagg"])
def test_a_client_killed_mid_round_does_not_stop_the_federation(tmp_path, spawn, secure):
    """kill -9 of one SuperNode (and its ClientApp) while round 1 trains: Flower stops hearing its heartbeats and
    answers its message with an error, the round goes on with the two others, and round 2 asks only those. Under
    SecAgg+ the dead client had already shared its keys: the server recovers its masks from the others' shares."""
    over = {"federated.min_clients": 2, "train.epochs": 40, "federated.local_epochs": 20}
    if secure:  # long enough local training that the kill lands in it, after the key exchange
        over = {"federated.min_clients": 2, "train.epochs": 600, "federated.local_epochs": 300}
        over["federated.secure_aggregation"] = {"num_shares": 3, "reconstruction_threshold": 2}
    recipe = fed_recipe(tmp_path, **over)
    run = tmp_path / "run"
    proc = spawn(str(recipe), "--out", str(run))
    from bigmodel.federated.runtime import descendants

    victim, seen = None, {}
    deadline = time.monotonic() + 300
    while victim is None and time.monotonic() < deadline:  # wait until client 1's ClientApp has worked 3 s
        for pid in descendants([proc.pid]):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"flower-supernode" not in cmd or b"partition-id=1 " not in cmd:
                continue
            app = _clientapp_of(pid)
            if app is not None and time.monotonic() - seen.setdefault(app, time.monotonic()) > 3:
                victim = pid
        time.sleep(0.2)
    assert victim is not None
    for pid in [victim, *descendants([victim])]:
        os.kill(pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=420)
    assert proc.returncode == 0, err
    recs = [x for x in rounds_of(run) if x.get("round", 0) >= 1]
    assert [x["clients"] for x in recs] == [2, 2]
    assert all(x["partitions"] == [0, 2] for x in recs)
    assert len(recs[0]["failures"]) == 1 and "Node Unavailable" in recs[0]["failures"][0]
    assert recs[1]["sent_to"] == 2  # round 2 asks only the clients alive
    assert "(1 failed)" in out
    assert no_flower_left(run)


@needs_flower
@pytest.mark.slow
def test_a_crashed_superlink_ends_the_run_with_an_error_and_no_process_left(tmp_path, spawn):
    recipe = fed_recipe(tmp_path, **{"federated.rounds": 5})
    run = tmp_path / "run"
    proc = spawn(str(recipe), "--out", str(run))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (run / "rounds.jsonl").is_file():
        time.sleep(0.3)
    link = [p for p in flower_processes(run) if b"flower-superlink" in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert link
    os.kill(link[0], signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "superlink exited during the run" in err and "Traceback" not in err
    assert no_flower_left(run)


@needs_flower
@pytest.mark.slow
def test_server_and_client_commands_federate_across_machines_here_on_loopback(tmp_path, spawn):
    """`bigmodel federate server` and three `bigmodel federate client` processes (what runs on each machine), here
    on loopback, with FedProx."""
    from bigmodel.federated.runtime import free_port

    recipe = fed_recipe(tmp_path, **{"federated.strategy": "fedprox", "federated.proximal_mu": 0.1})
    run = tmp_path / "run"
    port = free_port()
    server = spawn("server", str(recipe), "--host", "127.0.0.1", "--port", str(port), "--out", str(run))
    env = {**os.environ, "HOME": str(tmp_path / "home")}
    clients = [
        spawn(
            "client",
            str(recipe),
            "--partition-id",
            str(i),
            "--server",
            f"127.0.0.1:{port}",
            stdout=subprocess.DEVNULL,
            env=env,
        )
        for i in range(3)
    ]
    try:
        out, err = server.communicate(timeout=600)
        assert server.returncode == 0, err
        assert "waiting for 3 clients" in out
        assert out.strip().splitlines()[-1] == str(run)
        recs = [x for x in rounds_of(run) if x.get("round", 0) >= 1]
        assert [x["clients"] for x in recs] == [3, 3]
    finally:
        for c in clients:
            c.send_signal(signal.SIGTERM)
        for c in clients:
            c.wait(timeout=60)
    assert no_flower_left(run)
    assert not any(b"flower-supernode" in Path(f"/proc/{p}/cmdline").read_bytes() for p in _live_children(clients))


def _clientapp_of(pid: int) -> int | None:
    """The ClientApp process a SuperNode runs now, if any."""
    from bigmodel.federated.runtime import descendants

    for k in descendants([pid]):
        try:
            if b"flwr-clientapp" in Path(f"/proc/{k}/cmdline").read_bytes():
                return k
        except OSError:
            continue
    return None


def _live_children(procs: list[subprocess.Popen]) -> list[int]:
    from bigmodel.federated.runtime import descendants

    return [p for p in descendants([c.pid for c in procs]) if Path(f"/proc/{p}").exists()]


def test_flower_is_not_imported_by_bigmodels_own_process():
    code = "import bigmodel.cli, bigmodel.federated, bigmodel.federated.runtime, sys; print('flwr' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"
