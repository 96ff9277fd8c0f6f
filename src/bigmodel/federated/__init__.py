"""Federated learning on Flower: a classification recipe trained across client processes.

    from bigmodel.federated import federate
    summary = federate("recipes/fashion_mnist_federated.yaml", clients=10, rounds=20)

`core` holds the work (partition, client round, server evaluation, round checkpoints, the final artifact),
`flower_app` the Flower ServerApp / ClientApp over it (imported only in Flower's processes), `runtime` the processes
(SuperLink, SuperNodes, `flwr run`) and their teardown, `partition` the split of the training data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bigmodel.errors import UserError


def prepare_run(
    recipe: Any,
    *,
    out: str | Path | None = None,
    clients: int | None = None,
    rounds: int | None = None,
) -> Path:
    """A new run directory holding the resolved recipe (with `clients` / `rounds` applied) and the environment."""
    from bigmodel.api import index_running, write_run_start
    from bigmodel.config import Recipe, load_recipe
    from bigmodel.runs import new_run_dir
    from bigmodel.training.trainer import resolve_device

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    if recipe.federated is None:
        raise UserError(f"recipe {recipe.name or ''}: no federated block (add `federated:` with clients and rounds)")
    update = {k: v for k, v in (("clients", clients), ("rounds", rounds)) if v is not None}
    if update:
        data = recipe.to_dict()
        data["federated"].update(update)
        from bigmodel.config import validate_recipe

        recipe = validate_recipe(data, source="--clients/--rounds")
    run_dir = new_run_dir(out, (recipe.name or "run") + "-federated")
    write_run_start(run_dir, recipe, str(resolve_device(recipe.train.device)))
    index_running(run_dir, recipe)
    return run_dir


def federate(
    recipe: Any = None,
    *,
    out: str | Path | None = None,
    clients: int | None = None,
    rounds: int | None = None,
    resume: str | Path | None = None,
    simulation: bool = False,
    echo: Any = print,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """Train `recipe` federated on this machine: a SuperLink and one SuperNode per client as real processes on
    loopback, or with `simulation` Flower's Simulation Runtime (virtual SuperNodes, the ClientApps in Ray workers).
    `resume`: continue that run directory from its last completed round. Returns RUN/summary.json (its
    `run_dir`, `metrics` on eval.split and the `federated` totals); RUN/rounds.jsonl has one record per round."""
    from bigmodel.federated.runtime import run_federation
    from bigmodel.runs import RunIndex, require_run_dir

    if resume is not None:
        if recipe is not None or clients is not None or rounds is not None:
            raise UserError("--resume continues a run with its own recipe; give no recipe, --clients or --rounds")
        run_dir = require_run_dir(resume)
        if (run_dir / "summary.json").is_file():
            raise UserError(f"--resume {run_dir}: the federation already finished (summary.json is there)")
        from bigmodel.federated.core import prepare_resume

        prepare_resume(run_dir)
    elif recipe is None:
        raise UserError("nothing to federate: give a recipe file or --resume RUN_DIR")
    else:
        run_dir = prepare_run(recipe, out=out, clients=clients, rounds=rounds)
    try:
        return run_federation(run_dir, simulation=simulation, echo=echo, timeout_s=timeout_s)
    except BaseException:
        if not (run_dir / "summary.json").is_file():
            RunIndex().upsert(run_dir, status="failed")
        raise


def federate_server(
    recipe: Any = None,
    *,
    host: str = "0.0.0.0",
    port: int = 9092,
    out: str | Path | None = None,
    clients: int | None = None,
    rounds: int | None = None,
    resume: str | Path | None = None,
    echo: Any = print,
) -> dict[str, Any]:
    """The server of a federation across machines: a SuperLink on HOST:PORT that waits for `federated.clients`
    clients (`bigmodel federate client`), then runs the rounds."""
    from bigmodel.federated.runtime import run_federation
    from bigmodel.runs import require_run_dir

    if resume is not None:
        from bigmodel.federated.core import prepare_resume

        run_dir = require_run_dir(resume)
        prepare_resume(run_dir)
    else:
        run_dir = prepare_run(recipe, out=out, clients=clients, rounds=rounds)
    return run_federation(run_dir, host=host, port=port, local_clients=False, echo=echo)


def federate_client(recipe: str | Path, partition_id: int, server: str, home: str | Path | None = None) -> int:
    """One client (a SuperNode holding partition `partition_id`) of the federation served at `server` (HOST:PORT).
    Runs until the server is gone; returns the SuperNode's exit status."""
    from bigmodel.federated.runtime import run_client

    if home is None:
        home = Path.home() / ".cache" / "bigmodel" / "flower" / f"client-{partition_id}"
    return run_client(Path(recipe), partition_id, server, Path(home))
