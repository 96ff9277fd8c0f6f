"""Running a federation: Flower's Deployment Runtime as real processes, started, watched and torn down by bigmodel.

    bigmodel federate RECIPE      a SuperLink and one SuperNode per client on loopback, the run submitted with
                                  `flwr run`, a progress line per round, every process stopped at the end;
    bigmodel federate server      a SuperLink listening for SuperNodes of other machines, and the run;
    bigmodel federate client      one SuperNode (a client holding one partition) connected to a server.

Flower runs in its own environment (Flower 1.42 pins fastapi, starlette, uvicorn, typer, rich and protobuf below
what bigmodel's serving stack uses): `scripts/setup.sh` makes `.venv-flower` with `flwr` and a path file that adds
bigmodel's environment behind Flower's own packages, so Flower's processes import bigmodel and torch. bigmodel's
own process never imports Flower; it finds the executables (`flower_bin`) and talks to them through processes and
the run directory.

Every Flower process is started in a process group of its own, with the kernel told to kill it when bigmodel's
process dies (PR_SET_PDEATHSIG), and stopped by group (SIGTERM, then SIGKILL) when the run ends, fails or is
interrupted; its children (the SuperExec, the per-message ServerApp and ClientApp processes) go with it.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bigmodel.errors import UserError
from bigmodel.federated import core

FLOWER_EXES = ("flower-superlink", "flower-supernode", "flwr")
APP_MODULE = "bigmodel_federated_app"


def flower_bin() -> Path:
    """The folder of Flower's executables: beside this Python when Flower is installed here (`bigmodel[federated]`),
    else $BIGMODEL_FLOWER_ENV/bin, else the `.venv-flower` next to this environment (scripts/setup.sh)."""
    candidates = [Path(sys.executable).parent]
    env = os.environ.get("BIGMODEL_FLOWER_ENV")
    if env:
        candidates.insert(0, Path(env) / "bin")
    candidates.append(Path(sys.prefix).parent / ".venv-flower" / "bin")
    for c in candidates:
        if all((c / exe).is_file() for exe in FLOWER_EXES):
            return c
    raise UserError(
        "federated training needs Flower 1.42 (flwr): `bash scripts/setup.sh` installs it into .venv-flower; or set "
        "BIGMODEL_FLOWER_ENV to a virtual environment with flwr==1.42.0 that can import bigmodel"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flower_env(home: Path, bin_dir: Path) -> dict[str, str]:
    """The environment of every Flower process: Flower's executables first on PATH (SuperLink starts
    `flower-superexec` by name), its own FLWR_HOME (apps, config; nothing in ~/.flwr), no telemetry, and no `uv`
    installation of the app's dependencies at run time (offline that fails; torch would be resolved anew)."""
    env = dict(os.environ)
    env.update(
        {
            "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
            "FLWR_HOME": str(home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "PYTHONUNBUFFERED": "1",
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",  # start each message's app process sooner than every 1 s
        }
    )
    return env


def _die_with_parent() -> None:  # runs in the child between fork and exec
    os.setsid()
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def local_client_env(flower: Path, clients: int) -> dict[str, str]:
    """Clients sharing this machine: each works with `threads` threads in one of `slots` slots (slots x threads
    <= cores), so the cores are used without being oversubscribed."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // clients)
    slots = max(1, min(clients, cores // threads))
    return {
        core.SLOTS_ENV: f"{flower / 'slots'}:{slots}",
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
    }


class Processes:
    """The Flower processes this bigmodel process started; `stop()` ends each one's whole process group."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.seen: dict[int, str] = {}  # every descendant met so far: pid -> start time (a pid may be reused)

    def track(self) -> None:
        """Remember the current descendants. A process whose parent dies is re-parented to init and leaves the tree
        (the ServerApp when the SuperLink crashes), so `stop` also ends those it met before."""
        for pid in descendants([p.pid for _, p in self.procs]):
            start = _start_time(pid)
            if start is not None:
                self.seen[pid] = start

    def start(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            p = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
                start_new_session=not sys.platform.startswith("linux"),
            )
        self.procs.append((name, p))
        return p

    def dead(self) -> list[str]:
        return [name for name, p in self.procs if p.poll() is not None]

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM to every process started and every descendant (Flower detaches its SuperExec into a session of
        its own, so a process group does not reach it), then SIGKILL to what is left after `grace_s`."""
        pids = [p.pid for _, p in self.procs]
        tree = set(pids) | descendants(pids) | {pid for pid, t in self.seen.items() if _start_time(pid) == t}
        for pid in tree:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for _, p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
        while time.monotonic() < deadline and any(_alive(pid) for pid in tree):
            time.sleep(0.1)
        tree |= descendants(pids)
        for pid in tree:
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        for _, p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)
        self.procs.clear()
        self.seen.clear()


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state) of every process (Linux /proc; empty elsewhere)."""
    out: dict[int, tuple[int, str]] = {}
    for d in Path("/proc").glob("[0-9]*"):
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        rest = stat[stat.rindex(")") + 2 :].split()
        out[int(d.name)] = (int(rest[1]), rest[0])
    return out


def descendants(pids: list[int]) -> set[int]:
    """Every live descendant of `pids` (children, their children, ...)."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out: set[int] = set()
    todo = list(pids)
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return {p for p in out if table.get(p, (0, "Z"))[1] != "Z"}


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()[19]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2] != "Z"


def wait_for_port(host: str, port: int, procs: Processes, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if procs.dead():
            raise UserError(f"Flower's {', '.join(procs.dead())} exited at start (see its log in the run directory)")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1.0):
            return
        time.sleep(0.3)
    raise UserError(f"Flower's SuperLink did not listen on {host}:{port} within {timeout_s:.0f} s")


def write_app(app_dir: Path, run_dir: Path) -> None:
    """The Flower App `flwr run` bundles: a pyproject naming the components and a module that imports them from
    bigmodel (installed in Flower's environment, so nothing else travels)."""
    app_dir.mkdir(parents=True, exist_ok=True)
    (app_dir / f"{APP_MODULE}.py").write_text(
        '"""bigmodel\'s federated app (bigmodel.federated.flower_app)."""\n\n'
        "from bigmodel.federated.flower_app import client_app, server_app\n\n"
        '__all__ = ["client_app", "server_app"]\n',
        encoding="utf-8",
    )
    (app_dir / "pyproject.toml").write_text(
        f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "bigmodel-federated"
version = "1.0.0"
description = "bigmodel: a recipe trained across client processes"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "bigmodel"

[tool.flwr.app.components]
serverapp = "{APP_MODULE}:server_app"
clientapp = "{APP_MODULE}:client_app"

[tool.flwr.app.config]
run-dir = {json.dumps(str(run_dir.resolve()))}
""",
        encoding="utf-8",
    )


def write_flower_config(home: Path, address: str) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "bigmodel"\n\n[superlink.bigmodel]\naddress = "{address}"\ninsecure = true\n',
        encoding="utf-8",
    )


def superlink_argv(bin_dir: Path, host: str, port: int, db: Path, simulation: bool = False) -> list[str]:
    return [
        str(bin_dir / "flower-superlink"),
        "--insecure",
        "--host",
        host,
        "--port",
        str(port),
        "--database",
        str(db),
        "--disable-runtime-dependency-installation",
        *(["--simulation"] if simulation else []),
    ]


def simulation_ready(bin_dir: Path) -> None:
    """Flower's Simulation Runtime runs the ClientApps in Ray workers: Ray must be in Flower's environment."""
    python = bin_dir / "python"
    ok = subprocess.run([str(python), "-c", "import ray"], capture_output=True, check=False, timeout=120)
    if ok.returncode != 0:
        raise UserError(
            f"--simulation needs Ray in Flower's environment ({bin_dir.parent}): install it with "
            f"`{python} -m pip install 'flwr[simulation]==1.42.0'` (scripts/setup.sh does), or leave out --simulation"
        )


def simulation_config(clients: int) -> list[str]:
    """`flwr run --federation-config` entries: one virtual SuperNode per client, each ClientApp given the threads
    a SuperNode process would have (Ray runs as many at once as the cores allow)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // clients)
    return [f"num-supernodes={clients}", f"client-resources-num-cpus={threads}", f"init-args-num-cpus={cores}"]


def supernode_argv(bin_dir: Path, server: str, port: int, partition_id: int, clients: int, recipe: Path) -> list[str]:
    node_config = f'partition-id={partition_id} num-partitions={clients} recipe="{recipe.resolve()}"'
    return [
        str(bin_dir / "flower-supernode"),
        "--insecure",
        "--superlink",
        server,
        "--port",
        str(port),
        "--node-config",
        node_config,
        "--max-wait-time",
        "120",
    ]


def submit(bin_dir: Path, app_dir: Path, env: dict[str, str], log: Path, federation_config: list[str] = ()) -> str:
    """`flwr run APP bigmodel`: builds the app bundle and starts the run on the SuperLink; returns the run id."""
    extra = [x for item in federation_config for x in ("--federation-config", item)]
    out = subprocess.run(
        [str(bin_dir / "flwr"), "run", str(app_dir), "bigmodel", "--format", "json", *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    with log.open("a", encoding="utf-8") as f:
        f.write(out.stdout + out.stderr)
    try:
        answer = json.loads(out.stdout[out.stdout.index("{") :])
    except (ValueError, json.JSONDecodeError):
        answer = {}
    if out.returncode != 0 or not answer.get("success", False):
        reason = answer.get("error-message") or (out.stderr or out.stdout).strip().splitlines()[-1:]
        raise UserError(f"flwr run failed: {reason} (log: {log})")
    return str(answer.get("run-id", ""))


def format_round(r: dict[str, Any], total: int) -> str:
    acc = f"accuracy {r['accuracy']:.4f}  " if "accuracy" in r else ""
    fails = f"  ({len(r['failures'])} failed)" if r.get("failures") else ""
    clipped = f"  secagg clipped {r['secagg_clipped']}" if r.get("secagg_clipped") else ""
    return (
        f"round {r['round']:>3}/{total}  {acc}loss {r.get('loss', float('nan')):.4f}  "
        f"train_loss {r.get('train_loss', float('nan')):.4f}  clients {r['clients']}/{r['sent_to']}{fails}  "
        f"{r['time_s']:.1f} s{clipped}"
    )


def watch(
    run_dir: Path,
    total_rounds: int,
    procs: Processes,
    echo: Callable[[str], None],
    timeout_s: float | None = None,
    must_live: tuple[str, ...] = ("superlink",),
) -> dict[str, Any]:
    """Print each round as the server logs it; return the final record, or raise when the run fails or a process
    the run needs exits."""
    seen = 0
    t0 = time.monotonic()
    while True:
        records = core.read_rounds(run_dir)
        for r in records[seen:]:
            if r.get("event") == "failed":
                raise UserError(f"the federation failed: {r['message']} (details: {run_dir / 'server-error.txt'})")
            if r.get("event") == "finished":
                return r
            if r.get("event") == "resumed":
                echo(f"resumed after round {r['from_round']}")
            elif r.get("round") == 0:
                echo(f"round   0/{total_rounds}  accuracy {r.get('accuracy', float('nan')):.4f}  (initial model)")
            elif "round" in r:
                echo(format_round(r, total_rounds))
        seen = len(records)
        procs.track()
        gone = [n for n in procs.dead() if n in must_live]
        if gone:
            raise UserError(f"Flower's {gone[0]} exited during the run (its log: {run_dir / 'flower' / gone[0]}.log)")
        if timeout_s is not None and time.monotonic() - t0 > timeout_s:
            raise UserError(f"the federation did not finish within {timeout_s:.0f} s")
        time.sleep(0.5)


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP end the run through the `finally` that stops every process (SIGINT too: a process
    started in the background by a non-interactive shell inherits it ignored)."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def run_federation(
    run_dir: Path,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    local_clients: bool = True,
    simulation: bool = False,
    echo: Callable[[str], None] = print,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """Start a SuperLink (and, with `local_clients`, one SuperNode per client on loopback), submit the run whose
    recipe is RUN/recipe.yaml, print its rounds, and stop every process. Returns RUN/summary.json.

    `simulation`: Flower's Simulation Runtime instead of SuperNodes: the SuperLink runs the ServerApp and one virtual
    SuperNode per client, whose ClientApps run in Ray worker processes (a few at a time, as the cores allow)."""
    recipe = core.load_run_recipe(run_dir / "recipe.yaml")
    assert recipe.federated is not None
    clients = recipe.federated.clients
    bin_dir = flower_bin()
    if simulation:
        simulation_ready(bin_dir)
    flower = run_dir / "flower"
    home = flower / "home"
    port = port or free_port()
    link = f"127.0.0.1:{port}"
    write_app(flower / "app", run_dir)
    write_flower_config(home, link)
    env = flower_env(home, bin_dir)
    ray_tmp = None
    if simulation:  # Ray's sockets and logs in a short folder of this run's own (socket paths are length-limited)
        ray_tmp = Path(tempfile.mkdtemp(prefix="bigmodel-ray-"))
        slots = local_client_env(flower, clients)[core.SLOTS_ENV]  # Ray itself sets each worker's OMP threads
        env |= {core.SLOTS_ENV: slots, "RAY_TMPDIR": str(ray_tmp), "RAY_USAGE_STATS_ENABLED": "0"}
    procs = Processes()
    with _signals_raise():
        try:
            argv = superlink_argv(bin_dir, host, port, flower / "superlink.db", simulation)
            procs.start("superlink", argv, env, flower / "superlink.log")
            wait_for_port("127.0.0.1", port, procs)
            if local_clients and not simulation:
                node_env = local_client_env(flower, clients)
                for i in range(clients):
                    argv = supernode_argv(bin_dir, link, free_port(), i, clients, run_dir / "recipe.yaml")
                    env_i = {**flower_env(flower / f"node-{i}", bin_dir), **node_env}
                    procs.start(f"supernode-{i}", argv, env_i, flower / f"supernode-{i}.log")
            elif not simulation:
                echo(
                    f"waiting for {clients} clients: on each machine run `bigmodel federate client RECIPE "
                    f"--partition-id I --server {socket.gethostname()}:{port}` (I = 0 .. {clients - 1})"
                )
            fed_config = simulation_config(clients) if simulation else []
            run_id = submit(bin_dir, flower / "app", env, flower / "flwr-run.log", fed_config)
            secure = " + SecAgg+" if recipe.federated.secure_aggregation is not None else ""
            where = "Simulation Runtime (Ray)" if simulation else f"SuperLink {host}:{port}"
            echo(
                f"federation: {clients} clients, {recipe.federated.rounds} rounds, {recipe.federated.strategy}{secure} "
                f"(Flower run {run_id}, {where})"
            )
            watch(run_dir, recipe.federated.rounds, procs, echo, timeout_s)
        finally:
            procs.stop()
            if ray_tmp is not None:
                shutil.rmtree(ray_tmp, ignore_errors=True)
    return json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))


def run_client(recipe_path: Path, partition_id: int, server: str, home: Path) -> int:
    """One SuperNode in the foreground (this process waits on it): the client `partition_id` of a federation whose
    server is `server` (HOST:PORT). Returns its exit status; it exits ~2 minutes after the server is gone."""
    recipe = core.load_run_recipe(recipe_path)
    assert recipe.federated is not None
    if not 0 <= partition_id < recipe.federated.clients:
        raise UserError(f"--partition-id {partition_id}: expected 0 to {recipe.federated.clients - 1}")
    bin_dir = flower_bin()
    procs = Processes()
    argv = supernode_argv(bin_dir, server, free_port(), partition_id, recipe.federated.clients, recipe_path)
    with _signals_raise():
        try:
            p = procs.start(f"supernode-{partition_id}", argv, flower_env(home, bin_dir), home / "supernode.log")
            while p.poll() is None:
                procs.track()
                time.sleep(1.0)
            return int(p.returncode)
        finally:
            procs.stop()
