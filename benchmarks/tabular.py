"""The tabular MLP against scikit-learn's HistGradientBoostingClassifier on the same split, in one job.

For each seed, the recipe is trained through bigmodel (its test accuracy from the saved artifact), and the gradient-
boosting baseline is fitted on exactly the rows of that run's training split (numeric columns raw, categorical columns
as native categories) and scored on the same test rows. Prints the environment and a table; `--json` prints one object
with the means and `mlp_vs_hgb_accuracy_ratio`.

    python benchmarks/tabular.py [--recipe recipes/breast_cancer_mlp.yaml] [--seeds 0 1 2] [--json] [key=value ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit_json, environment, print_env, print_table  # noqa: E402
from bigmodel.api import train  # noqa: E402
from bigmodel.config import load_recipe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def gradient_boosting(recipe, seed: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """(test accuracy, fit seconds) of HistGradientBoostingClassifier on the recipe's own split (train + val)."""
    import numpy as np
    from sklearn.ensemble import HistGradientBoostingClassifier

    from bigmodel.data.tabular import fit_schema, load_table

    data = load_table(recipe.data, recipe.seed)
    schema = fit_schema(data.train.rows, recipe.data, data.label_column, "train")
    cats = list(schema.categorical)
    cols = schema.numeric + cats

    def matrix(rows):  # type: ignore[no-untyped-def]
        out = np.full((len(rows), len(cols)), np.nan)
        for i, r in enumerate(rows):
            for j, c in enumerate(schema.numeric):
                v = r[c].strip()
                out[i, j] = float(v) if v else np.nan
            for j, c in enumerate(cats):
                vocab = schema.categorical[c]
                out[i, len(schema.numeric) + j] = vocab.index(r[c]) if r[c] in vocab else np.nan
        return out

    train_rows = data.train.rows + (data.val.rows if data.val is not None else [])
    y_train = np.concatenate([data.train.y.numpy()] + ([data.val.y.numpy()] if data.val is not None else []))
    mask = [False] * len(schema.numeric) + [True] * len(cats)
    clf = HistGradientBoostingClassifier(random_state=seed, categorical_features=mask if cats else None)
    t0 = time.perf_counter()
    clf.fit(matrix(train_rows), y_train)
    fit_s = time.perf_counter() - t0
    acc = float((clf.predict(matrix(data.test.rows)) == data.test.y.numpy()).mean())
    return acc, fit_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "breast_cancer_mlp.yaml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("overrides", nargs="*", help="recipe overrides, e.g. train.epochs=2")
    args = ap.parse_args()
    env = environment()
    rows, mlp, hgb, times = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            recipe = load_recipe(args.recipe, [*args.overrides, f"seed={seed}"])
            r = train(recipe, out=Path(tmp) / f"run-{seed}", progress=False)
            base, fit_s = gradient_boosting(recipe, seed)
            mlp.append(r.metrics["accuracy"])
            hgb.append(base)
            times.append(r.train_time_s)
            rows.append([seed, r.metrics["accuracy"], base, r.train_time_s, fit_s, r.metrics["num_examples"]])
    mean = {
        "mlp_accuracy": statistics.mean(mlp),
        "mlp_accuracy_sd": statistics.stdev(mlp) if len(mlp) > 1 else 0.0,
        "hgb_accuracy": statistics.mean(hgb),
        "hgb_accuracy_sd": statistics.stdev(hgb) if len(hgb) > 1 else 0.0,
        "mlp_train_time_s": statistics.mean(times),
    }
    mean["mlp_vs_hgb_accuracy_ratio"] = mean["mlp_accuracy"] / mean["hgb_accuracy"]
    if args.json:
        emit_json({"environment": env, "recipe": args.recipe, "seeds": args.seeds, **mean})
        return
    print_env(env)
    print(f"recipe: {args.recipe}")
    print_table(["seed", "mlp test acc", "hgb test acc", "mlp train s", "hgb fit s", "test rows"], rows)
    print(
        f"mean: mlp {mean['mlp_accuracy']:.4f} ± {mean['mlp_accuracy_sd']:.4f}, "
        f"hgb {mean['hgb_accuracy']:.4f} ± {mean['hgb_accuracy_sd']:.4f}, "
        f"ratio {mean['mlp_vs_hgb_accuracy_ratio']:.4f}"
    )


if __name__ == "__main__":
    main()
