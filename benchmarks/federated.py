"""Federated vs central training: test accuracy per round, wall time per round and bytes sent per round.

    python benchmarks/federated.py [key=value ...] [--strategies fedavg fedprox fedavg+secagg]
                                   [--partitions iid 0.5 0.1] [--rounds R] [--clients N] [--no-central]
                                   [--simulation] [--json]

Each federation is `bigmodel federate` (a SuperLink and N SuperNode processes on loopback, Flower's Deployment
Runtime; with --simulation, Flower's Simulation Runtime: virtual SuperNodes whose ClientApps run in Ray workers):
the recipe (default recipes/fashion_mnist_federated.yaml) with `federated.strategy` and `federated.partition` set
per cell; a partition is `iid` or a Dirichlet alpha (0.5, 0.1); a strategy ending in `+secagg` runs with SecAgg+
secure aggregation (`federated.secure_aggregation: {}`). The central baseline is `bigmodel train` on the same
recipe: the same model, data and total epochs (train.epochs = rounds x local_epochs). Round time is the server's:
sending the global model, the clients' work (under the Deployment Runtime each in a fresh ClientApp process that
loads the data and the model; under the Simulation Runtime in long-lived Ray workers), aggregation; evaluation and
checkpointing come after it. On one machine the clients take turns on its cores (at most cores / threads at once).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit_json, environment, print_env, print_table  # noqa: E402
from bigmodel.api import train  # noqa: E402
from bigmodel.config import load_recipe  # noqa: E402
from bigmodel.federated import federate  # noqa: E402
from bigmodel.federated.core import read_rounds  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def partition_overrides(p: str) -> list[str]:
    if p == "iid":
        return ["federated.partition.kind=iid"]
    return ["federated.partition.kind=dirichlet", f"federated.partition.alpha={float(p)}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "fashion_mnist_federated.yaml"))
    ap.add_argument("--strategies", nargs="+", default=["fedavg", "fedprox"])
    ap.add_argument("--partitions", nargs="+", default=["iid", "0.5", "0.1"])
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--clients", type=int, default=None)
    ap.add_argument("--no-central", action="store_true", help="skip the central baseline")
    ap.add_argument("--simulation", action="store_true", help="Flower's Simulation Runtime (Ray) instead of SuperNodes")
    ap.add_argument("--out", default=None, help="keep the run directories here (default: a temporary folder)")
    ap.add_argument("--json", action="store_true", help="print one JSON object of the figures")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    env = environment()
    cells: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        base = [*args.overrides]
        base += [f"federated.rounds={args.rounds}"] if args.rounds else []
        base += [f"federated.clients={args.clients}"] if args.clients else []
        recipe0 = load_recipe(args.recipe, base)
        fed0 = recipe0.federated
        assert fed0 is not None
        central = None
        if not args.no_central:
            epochs = fed0.rounds * fed0.local_epochs
            result = train(
                load_recipe(args.recipe, [*base, f"train.epochs={epochs}"]), out=root / "central", progress=False
            )
            central = {"accuracy": result.metrics["accuracy"], "train_time_s": result.train_time_s, "epochs": epochs}
            print(f"central: {central['accuracy']:.4f} in {central['train_time_s']:.1f}s", file=sys.stderr)
        for part in args.partitions:
            for strategy in args.strategies:
                name = f"{strategy}-{part}"
                plain, _, extra = strategy.partition("+")
                over = [f"federated.strategy={plain}"] + (["federated.secure_aggregation={}"] if extra else [])
                if extra not in ("", "secagg"):
                    ap.error(f"--strategies {strategy}: expected a strategy, or one followed by +secagg")
                recipe = load_recipe(args.recipe, [*base, *partition_overrides(part), *over])
                summary = federate(
                    recipe,
                    out=root / name,
                    simulation=args.simulation,
                    echo=lambda s: print(s, file=sys.stderr, flush=True),
                )
                rounds = [r for r in read_rounds(Path(summary["run_dir"])) if r.get("round", 0) >= 1]
                cells.append(
                    {
                        "strategy": strategy,
                        "secure_aggregation": bool(extra),
                        "partition": part,
                        "final_accuracy": summary["metrics"]["accuracy"],
                        "best_round_accuracy": max(r["accuracy"] for r in rounds),
                        "accuracy_per_round": [round(r["accuracy"], 4) for r in rounds],
                        "round_time_s_mean": sum(r["time_s"] for r in rounds) / len(rounds),
                        "bytes_per_round": sum(r["bytes_down"] + r["bytes_up"] for r in rounds) / len(rounds),
                        "total_time_s": summary["federated"]["round_time_s"],
                    }
                )
                print(f"{name}: {cells[-1]['final_accuracy']:.4f}", file=sys.stderr, flush=True)
    figures = {
        "recipe": Path(args.recipe).name,
        "overrides": base,
        "clients": fed0.clients,
        "rounds": fed0.rounds,
        "local_epochs": fed0.local_epochs,
        "runtime": "simulation" if args.simulation else "deployment",
        "central": central,
        "federations": cells,
        "environment": env,
    }
    if central is not None:
        for c in cells:
            c["accuracy_vs_central_ratio"] = c["final_accuracy"] / central["accuracy"]
            c["time_vs_central_ratio"] = c["total_time_s"] / central["train_time_s"]
    if args.json:
        emit_json(figures)
        return
    print_env(env)
    rows = []
    if central is not None:
        rows.append(["central", "-", central["accuracy"], "-", central["train_time_s"] / fed0.rounds, 0, "1.00"])
    for c in cells:
        rows.append(
            [
                c["strategy"],
                c["partition"],
                c["final_accuracy"],
                c["best_round_accuracy"],
                c["round_time_s_mean"],
                c["bytes_per_round"] / 1e6,
                f"{c.get('time_vs_central_ratio', float('nan')):.2f}",
            ]
        )
    print_table(
        ["training", "partition", "test accuracy", "best round", "s / round", "MB / round", "time vs central"], rows
    )
    for c in cells:
        print(f"{c['strategy']} {c['partition']}: accuracy per round {c['accuracy_per_round']}")


if __name__ == "__main__":
    main()
