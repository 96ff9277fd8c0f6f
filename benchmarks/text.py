"""Tweet sentiment: each tweet model recipe against a TF-IDF + logistic-regression baseline (scikit-learn) on the
same split, in the same job. The baseline is tuned fairly: word 1-2-grams, C picked on the validation split.

    python benchmarks/text.py [--seeds 0 1 2] [--recipes recipes/tweets_transformer.yaml ...] [--quick] [--json]

Reports test accuracy, macro-F1 and training time (mean over seeds), and `<recipe>_accuracy_ratio` = model accuracy /
baseline accuracy (≥ 1 means the model is at or above the baseline).
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
RECIPES = [
    ROOT / "recipes" / "tweets_transformer.yaml",
    ROOT / "recipes" / "tweets_lstm.yaml",
    ROOT / "recipes" / "tweets_fasttext.yaml",
]
QUICK = ["data.limit_train=2000", "train.epochs=1"]


def tfidf_baseline(recipe: object, quick: bool) -> dict[str, float]:
    """TF-IDF (1-2-grams, sublinear tf, min_df 2) + logistic regression; C chosen on the validation split."""
    import numpy as np
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    from bigmodel.data.text import load_text

    d = load_text(recipe.data, recipe.seed)  # type: ignore[attr-defined]
    t0 = time.perf_counter()
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True, lowercase=True)
    xtr = vec.fit_transform(d.train.texts)
    xva, xte = vec.transform(d.val.texts), vec.transform(d.test.texts)
    ytr, yva, yte = d.train.y.numpy(), d.val.y.numpy(), d.test.y.numpy()
    best = None
    for c in [1.0] if quick else [0.3, 1.0, 3.0, 10.0]:
        m = LogisticRegression(C=c, max_iter=3000).fit(xtr, ytr)
        acc = accuracy_score(yva, m.predict(xva))
        if best is None or acc > best[0]:
            best = (acc, c, m)
    assert best is not None
    pred = best[2].predict(xte)
    return {
        "accuracy": float(accuracy_score(yte, pred)),
        "macro_f1": float(f1_score(yte, pred, average="macro")),
        "train_time_s": time.perf_counter() - t0,
        "C": best[1],
        "test_examples": int(np.size(yte)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="+", default=[str(p) for p in RECIPES])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--quick", action="store_true", help="2,000 training tweets, one epoch (a smoke test)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    over = QUICK if args.quick else []
    names = ["tfidf_logreg"] + [Path(r).stem for r in args.recipes]
    per: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            base_recipe = load_recipe(args.recipes[0], [*over, f"seed={seed}"])
            b = tfidf_baseline(base_recipe, args.quick)
            per["tfidf_logreg"].append(b)
            print(f"tfidf_logreg seed {seed}: accuracy {b['accuracy']:.4f} (C={b['C']})", file=sys.stderr, flush=True)
            for path in args.recipes:
                recipe = load_recipe(path, [*over, f"seed={seed}"])
                if recipe.data.model_dump(exclude={"tokenizer"}) != base_recipe.data.model_dump(exclude={"tokenizer"}):
                    raise SystemExit(f"{path}: its data block differs from {args.recipes[0]}; the split must be shared")
                r = train(recipe, out=Path(tmp) / f"{Path(path).stem}-{seed}", progress=False)
                per[Path(path).stem].append(
                    {
                        "accuracy": r.metrics["accuracy"],
                        "macro_f1": r.metrics["macro_f1"],
                        "train_time_s": r.train_time_s,
                    }
                )
                print(
                    f"{Path(path).stem} seed {seed}: accuracy {r.metrics['accuracy']:.4f}", file=sys.stderr, flush=True
                )

    def mean(name: str, key: str) -> float:
        return statistics.mean(x[key] for x in per[name])

    def sd(name: str, key: str) -> float:
        vals = [x[key] for x in per[name]]
        return statistics.stdev(vals) if len(vals) > 1 else 0.0

    env = environment()
    base_acc = mean("tfidf_logreg", "accuracy")
    figures: dict[str, object] = {"seeds": args.seeds, "quick": args.quick, "env": env}
    rows = []
    for n in names:
        acc, f1, t = mean(n, "accuracy"), mean(n, "macro_f1"), mean(n, "train_time_s")
        ratio = acc / base_acc
        rows.append([n, f"{100 * acc:.2f} ± {100 * sd(n, 'accuracy'):.2f}", f"{f1:.4f}", f"{t:.1f}", f"{ratio:.3f}"])
        figures[n] = {"accuracy": acc, "accuracy_sd": sd(n, "accuracy"), "macro_f1": f1, "train_time_s": t}
        if n != "tfidf_logreg":
            figures[f"{n}_accuracy_ratio"] = ratio
    if args.json:
        emit_json(figures)
        return
    print_env(env)
    print(f"tweet sentiment (bundled corpus), seeds {args.seeds}" + (" [quick]" if args.quick else ""))
    print_table(["model", "test accuracy %", "macro-F1", "train s", "vs TF-IDF"], rows)


if __name__ == "__main__":
    main()
