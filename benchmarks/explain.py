"""What explanations cost and how faithful they are, per method, on trained image models.

For each run given (default: trains `recipes/quickstart.yaml`; the README figures use the quickstart cnn-small and
the `recipes/fashion_mnist_resnet.yaml` ResNet), in one process:
- time and peak resident memory to explain `--images` test images per method (one call, batched), scaled to
  seconds per 100 images;
- LIME and KernelSHAP with the 49-patch mask and 200 samples: batched (100 perturbations per forward, the default)
  against one perturbation per forward (Captum's default), on `--unbatched` images;
- the faithfulness table of `bigmodel explain --evaluate` on `--limit` test images: deletion (most- and
  least-relevant-first) and insertion AUCs against the random control, IG completeness and the randomisation check.

`--json` prints one object: per run (`runs`), and for the first run at top level, `<method>_seconds_per_100`,
`<method>_peak_mib`, `<method>_deletion_auc`, `<method>_lerf_auc`, `random_deletion_auc`,
`lime_batched_speedup_ratio`, `kernel_shap_batched_speedup_ratio`.

    python benchmarks/explain.py [RUN_DIR ...] [--images 100] [--limit 500] [--quick] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit_json, environment, print_env, print_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["saliency", "integrated_gradients", "gradcam", "occlusion", "lime", "kernel_shap"]


def _reset_peak() -> None:
    with contextlib.suppress(OSError):  # Linux: writing 5 to clear_refs resets the peak resident set (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")


def _peak_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def measure(run: Path, images: int, unbatched: int, limit: int, steps: int, faithfulness: bool = True) -> dict:
    from bigmodel import api
    from bigmodel.explain import evaluate, explain_items, explainer_for
    from bigmodel.runs import load_artifact

    art = load_artifact(run)
    x = api.evaluation(run, "test").data.split("test").x
    items = list(x[:images].float().numpy())
    names = [f"test{i}" for i in range(len(items))]
    ex = explainer_for(art)
    explain_items(art, names[:2], items[:2], "saliency", explainer=ex, pictures=False)  # warm-up
    out: dict = {"run": str(run), "model": art.config["model"]["name"], "images": len(items)}
    for m in METHODS:
        _reset_peak()
        t0 = time.perf_counter()
        explain_items(art, names, items, m, explainer=ex, pictures=False)
        dt = time.perf_counter() - t0
        out[f"{m}_seconds_per_100"] = round(dt * 100 / len(items), 3)
        out[f"{m}_peak_mib"] = round(_peak_mib(), 1)
    for m in ("lime", "kernel_shap"):
        few = items[:unbatched]
        t0 = time.perf_counter()
        explain_items(art, names[:unbatched], few, m, explainer=ex, pictures=False)
        batched = time.perf_counter() - t0
        t0 = time.perf_counter()
        explain_items(art, names[:unbatched], few, m, explainer=ex, pictures=False, perturbations_per_eval=1)
        single = time.perf_counter() - t0
        out[f"{m}_unbatched_seconds_per_100"] = round(single * 100 / len(few), 3)
        out[f"{m}_batched_speedup_ratio"] = round(single / batched, 3)
    if not faithfulness:
        return out
    faith = evaluate(run, limit=limit, steps=steps)
    out["faithfulness"] = faith
    out["random_deletion_auc"] = faith["random"]["deletion_auc"]
    for m, row in faith["methods"].items():
        out[f"{m}_deletion_auc"] = row["deletion_auc"]
        out[f"{m}_lerf_auc"] = row["deletion_lerf_auc"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="*", help="finished image-classifier runs (default: train the quickstart first)")
    ap.add_argument("--images", type=int, default=100, help="test images explained per method")
    ap.add_argument("--unbatched", type=int, default=10, help="images for the one-perturbation-per-forward timing")
    ap.add_argument("--limit", type=int, default=500, help="test images for the faithfulness table")
    ap.add_argument("--steps", type=int, default=20, help="steps of each deletion / insertion curve")
    ap.add_argument("--quick", action="store_true", help="a tiny digits model and few images (CI smoke run)")
    ap.add_argument("--no-faithfulness", action="store_true", help="timings only")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from bigmodel import api
    from bigmodel.config import load_recipe, validate_recipe

    runs = [Path(r) for r in args.runs]
    if args.quick:
        args.images, args.unbatched, args.limit, args.steps = 4, 1, 40, 5
    if not runs:
        tmp = Path(tempfile.mkdtemp(prefix="bench-explain-"))
        if args.quick:
            recipe = validate_recipe(
                {
                    "task": "image_classification",
                    "data": {"source": "digits", "val_fraction": 0.1, "test_fraction": 0.2},
                    "model": {"name": "cnn-small", "widths": [8, 16]},
                    "train": {"epochs": 2, "batch_size": 64},
                }
            )
        else:
            recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml")
        runs = [api.train(recipe, out=tmp / "run", progress=False).run_dir]
    results = [measure(r, args.images, args.unbatched, args.limit, args.steps, not args.no_faithfulness) for r in runs]
    env = environment()
    if args.json:
        top = {k: v for k, v in results[0].items() if k != "faithfulness"}
        emit_json({**top, "runs": results, "env": env})
        return
    print_env(env)
    for res in results:
        f = res.get("faithfulness")
        print(f"\n{res['model']} ({res['run']}): {res['images']} test images per method, one process")
        print_table(
            ["method", "s / 100 images", "peak RSS MiB"],
            [[m, res[f"{m}_seconds_per_100"], res[f"{m}_peak_mib"]] for m in METHODS]
            + [
                [f"{m} one perturbation per forward", res[f"{m}_unbatched_seconds_per_100"], ""]
                for m in ("lime", "kernel_shap")
            ],
        )
        lime, shap = res["lime_batched_speedup_ratio"], res["kernel_shap_batched_speedup_ratio"]
        print(f"batched speed-up: LIME x{lime:.1f}, KernelSHAP x{shap:.1f}")
        if f is None:
            continue
        print(f"\nfaithfulness on {f['examples']} test images (curves of {f['steps']} steps; z = paired mean / SE):")
        rows = []
        for m, row in f["methods"].items():
            vs = row["vs_random"]
            rows.append(
                [
                    m,
                    row["deletion_auc"],
                    row["random"]["deletion_auc"],
                    vs["deletion"]["z"],
                    row["deletion_lerf_auc"],
                    row["random"]["deletion_lerf_auc"],
                    vs["deletion_lerf"]["z"],
                    row.get("insertion_auc", ""),
                    "yes" if row["faithful"] else "no",
                ]
            )
        print_table(["method", "deletion", "random", "z", "LeRF", "random", "z", "insertion", "faithful"], rows)
        ig = f["methods"].get("integrated_gradients", {}).get("completeness")
        if ig:
            print(
                f"IG completeness within 5%: {ig['within_5_percent']}/{ig['examples']} (adaptive, median "
                f"{ig['steps_median']} steps, max {ig['steps_max']}); {ig['first_pass_within_5_percent']}/"
                f"{ig['examples']} with {ig['first_pass_steps']} steps alone"
            )
        if f.get("sanity"):
            print(f"randomisation check, mean |Spearman| after full randomisation: {f['sanity']['fully_randomised']}")


if __name__ == "__main__":
    main()
