"""Pretrain → fine-tune against training from scratch, on a small labelled subset of the tweets, in one job.

    python benchmarks/pretrain.py [--pretrain-run RUN] [--seeds 0 1 2] [--limit 1000] [--quick] [--json]

1. `recipes/tweets_gpt_pretrain.yaml`: a GPT trained on the training tweets' text (no labels) — or `--pretrain-run`.
2. `recipes/tweets_pretrained_gpt.yaml` on `--limit` labelled tweets, per seed: fine-tuned from that run, and the same
   classifier from scratch (`model.init_from=null`: its own tokenizer, random weights); and, as an independently
   tuned from-scratch baseline, `recipes/tweets_transformer.yaml` on the same tweets. Same split, same test set.
Reports test accuracy / macro-F1 (mean ± std over seeds) and `pretrain_gain_ratio` = fine-tuned accuracy / the better
from-scratch accuracy.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pretrain-run", type=Path)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--limit", type=int, default=1000, help="Labelled training tweets.")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    env = environment()
    print_env(env)
    quick_pre = ["train.epochs=1", "data.batches_per_epoch=20"] if args.quick else []
    quick_ft = ["train.epochs=1"] if args.quick else []
    out: dict = {"environment": env, "limit_train": args.limit}
    with tempfile.TemporaryDirectory() as tmp:
        pre = args.pretrain_run
        if pre is None:
            res = train(
                load_recipe(ROOT / "recipes" / "tweets_gpt_pretrain.yaml", quick_pre),
                out=Path(tmp) / "pre",
                progress=False,
            )
            pre = res.run_dir
            out["pretrain"] = {
                "train_time_s": res.train_time_s,
                "test_loss": res.metrics["loss"],
                "test_perplexity": res.metrics["perplexity"],
            }
            print(f"pretraining: {res.train_time_s:.0f} s, test perplexity {res.metrics['perplexity']:.2f}")
        runs = {
            "fine-tuned from the pretrained GPT": ("tweets_pretrained_gpt", [f"model.init_from={pre}"]),
            "from scratch": ("tweets_pretrained_gpt", ["model.init_from=null"]),
            "tweets_transformer from scratch": ("tweets_transformer", []),
        }
        results: dict[str, list[dict]] = {name: [] for name in runs}
        for seed in args.seeds:
            for i, (name, (recipe, extra)) in enumerate(runs.items()):
                over = [f"seed={seed}", f"data.limit_train={args.limit}", *extra, *quick_ft]
                r = train(
                    load_recipe(ROOT / "recipes" / f"{recipe}.yaml", over),
                    out=Path(tmp) / f"r{i}-{seed}",
                    progress=False,
                )
                results[name].append(
                    {
                        "accuracy": r.metrics["accuracy"],
                        "macro_f1": r.metrics["macro_f1"],
                        "train_time_s": r.train_time_s,
                    }
                )
    rows = []
    for name, rs in results.items():
        acc = [r["accuracy"] for r in rs]
        f1 = [r["macro_f1"] for r in rs]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        rows.append(
            [
                name,
                f"{100 * statistics.mean(acc):.2f} ± {100 * sd:.2f}",
                statistics.mean(f1),
                statistics.mean(r["train_time_s"] for r in rs),
            ]
        )
        out[name] = {
            "accuracy": statistics.mean(acc),
            "accuracy_std": sd,
            "macro_f1": statistics.mean(f1),
            "per_seed": rs,
        }
    print(f"\ntweet sentiment from {args.limit} labelled tweets (seeds {args.seeds})")
    print_table(["classifier", "test accuracy %", "macro-F1", "train time s"], rows)
    best_scratch = max(out["from scratch"]["accuracy"], out["tweets_transformer from scratch"]["accuracy"])
    out["pretrain_gain_ratio"] = out["fine-tuned from the pretrained GPT"]["accuracy"] / best_scratch
    if args.json:
        emit_json(out)


if __name__ == "__main__":
    main()
