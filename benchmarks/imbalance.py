"""What balancing buys on an imbalanced split: recipes/fashion_mnist_imbalanced.yaml trained with no balancing,
oversampling, class weights and the focal loss (same seed, same data), in one job. Reports the mean test recall of
the minority classes, macro-F1 and accuracy.

    python benchmarks/imbalance.py [--seeds 0] [--json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit_json, environment, print_env, print_table  # noqa: E402
from bigmodel.api import train  # noqa: E402
from bigmodel.config import load_recipe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "none": ["data.balance=none"],
    "oversample": ["data.balance=oversample"],
    "class_weights": ["data.balance=class_weights"],
    "focal": ["data.balance=none", "train.loss=focal"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "fashion_mnist_imbalanced.yaml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in SETTINGS.items():
            runs = []
            for seed in args.seeds:
                recipe = load_recipe(args.recipe, [*overrides, f"seed={seed}"])
                minority = {str(c) for c in recipe.data.imbalance.classes} if recipe.data.imbalance else set()
                r = train(recipe, out=Path(tmp) / f"{name}-{seed}", progress=False)
                per = r.metrics["per_class"]
                minority_recall = statistics.mean(
                    c["recall"] for i, c in enumerate(per) if c["label"] in minority or str(i) in minority
                )
                runs.append(
                    {
                        "minority_recall": minority_recall,
                        "macro_f1": r.metrics["macro_f1"],
                        "accuracy": r.metrics["accuracy"],
                        "train_time_s": r.train_time_s,
                    }
                )
                print(
                    f"{name} seed {seed}: minority recall {minority_recall:.4f} macro-F1 {r.metrics['macro_f1']:.4f}",
                    file=sys.stderr,
                    flush=True,
                )
            results[name] = {k: statistics.mean(x[k] for x in runs) for k in runs[0]}
    base = results["none"]
    figures = {
        "seeds": args.seeds,
        "results": results,
        "oversample_minority_recall_gain": results["oversample"]["minority_recall"] - base["minority_recall"],
        "class_weights_minority_recall_gain": results["class_weights"]["minority_recall"] - base["minority_recall"],
        "oversample_macro_f1_ratio": results["oversample"]["macro_f1"] / base["macro_f1"],
        "class_weights_macro_f1_ratio": results["class_weights"]["macro_f1"] / base["macro_f1"],
        "environment": environment(),
    }
    if args.json:
        emit_json(figures)
        return
    print_env(figures["environment"])
    print_table(
        ["balance", "minority recall", "macro-F1", "accuracy", "train s"],
        [[k, v["minority_recall"], v["macro_f1"], v["accuracy"], v["train_time_s"]] for k, v in results.items()],
    )


if __name__ == "__main__":
    main()
