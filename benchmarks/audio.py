"""Audio classification, measured: test accuracy over seeds, against the linear baseline on mean + std log-mel
features of the same clips, with white noise at a given SNR added to the test clips, and SpecAugment on against off.

For each seed the recipe is trained through bigmodel (twice with `--ablation`: as written, and with SpecAugment
flipped: off when the recipe has it, on with 2 + 2 masks when it has not). The noisy accuracy comes from the saved
artifact on the test clips with noise added to each whole clip (its own mean power, seeded) before the model's
centre window is cut. Prints the environment and a table; `--json` prints one
object with the means (`recipe_*`, and `specaugment_*` or `no_specaugment_*` for the ablation's other arm) and
`model_vs_linear_accuracy_ratio`.

    python benchmarks/audio.py [--recipe recipes/speech_digits_cnn.yaml] [--seeds 0 1 2] [--snr 10] [--ablation]
                               [--json] [key=value ...]
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
NO_SPEC_AUGMENT = ["data.spec_augment.freq_masks=0", "data.spec_augment.time_masks=0"]
WITH_SPEC_AUGMENT = ["data.spec_augment.freq_masks=2", "data.spec_augment.time_masks=2"]  # when the recipe has none


def noisy_accuracy(run_dir: Path, recipe, snr_db: float, seed: int) -> float:  # type: ignore[no-untyped-def]
    """Test accuracy of the run's artifact with white noise at `snr_db` added to every test clip."""
    import numpy as np
    import torch

    from bigmodel.data.audio import add_noise, fit_length
    from bigmodel.runs import load_artifact
    from bigmodel.tasks import get_task

    art = load_artifact(run_dir)
    spec = get_task("audio_classification")
    data, _ = spec.prepare(recipe, art.preprocess)
    test = data.split("test")
    g = np.random.default_rng(seed)
    samples = int(art.preprocess.input_shape["samples"])
    items = [fit_length(add_noise(test.clip(i), snr_db, g), samples) for i in range(len(test))]
    pred = spec.probabilities(art, items).argmax(dim=1)
    return float((pred == test.y).to(torch.float64).mean())


def sd(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "speech_digits_cnn.yaml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--snr", type=float, default=10.0, help="dB of signal over the added white noise")
    ap.add_argument("--ablation", action="store_true", help="also train each seed with SpecAugment off")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("overrides", nargs="*", help="recipe overrides, e.g. train.epochs=2")
    args = ap.parse_args()
    env = environment()
    base = load_recipe(args.recipe, args.overrides)
    other = ("no_specaugment", NO_SPEC_AUGMENT) if base.data.spec_augment.on else ("specaugment", WITH_SPEC_AUGMENT)
    variants = [("recipe", [])] + ([other] if args.ablation else [])
    rows: list[list[object]] = []
    acc: dict[str, list[float]] = {v: [] for v, _ in variants}
    noisy: dict[str, list[float]] = {v: [] for v, _ in variants}
    f1: dict[str, list[float]] = {v: [] for v, _ in variants}
    linear, linear_f1, times = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for name, extra in variants:
                recipe = load_recipe(args.recipe, [*args.overrides, *extra, f"seed={seed}"])
                r = train(recipe, out=Path(tmp) / f"{name}-{seed}", progress=False)
                n = noisy_accuracy(r.run_dir, recipe, args.snr, seed)
                acc[name].append(r.metrics["accuracy"])
                f1[name].append(r.metrics["macro_f1"])
                noisy[name].append(n)
                base = r.baseline or {}
                if name == "recipe":
                    linear.append(base.get("accuracy", float("nan")))
                    linear_f1.append(base.get("macro_f1", float("nan")))
                    times.append(r.train_time_s)
                rows.append(
                    [
                        seed,
                        name,
                        r.metrics["accuracy"],
                        r.metrics["macro_f1"],
                        n,
                        base.get("accuracy", float("nan")),
                        base.get("macro_f1", float("nan")),
                        r.train_time_s,
                        r.metrics["num_examples"],
                    ]
                )
    out: dict[str, object] = {}
    for name, _ in variants:
        out[f"{name}_accuracy"] = statistics.mean(acc[name])
        out[f"{name}_accuracy_sd"] = sd(acc[name])
        out[f"{name}_macro_f1"] = statistics.mean(f1[name])
        out[f"{name}_noisy_accuracy"] = statistics.mean(noisy[name])
    out["linear_accuracy"] = statistics.mean(linear)
    out["linear_macro_f1"] = statistics.mean(linear_f1)
    out["train_time_s"] = statistics.mean(times)
    out["snr_db"] = args.snr
    out["model_vs_linear_accuracy_ratio"] = out["recipe_accuracy"] / out["linear_accuracy"]  # type: ignore[operator]
    if args.json:
        emit_json({"environment": env, "recipe": args.recipe, "seeds": args.seeds, **out})
        return
    print_env(env)
    print(f"recipe: {args.recipe}")
    print_table(
        [
            "seed",
            "variant",
            "test acc",
            "macro F1",
            f"acc +noise {args.snr:g} dB",
            "linear acc",
            "linear F1",
            "train s",
            "test clips",
        ],
        rows,
    )
    for name, _ in variants:
        print(
            f"{name}: accuracy {out[f'{name}_accuracy']:.4f} ± {out[f'{name}_accuracy_sd']:.4f}, macro F1 "
            f"{out[f'{name}_macro_f1']:.4f}, with noise {out[f'{name}_noisy_accuracy']:.4f}"
        )
    print(f"linear baseline: accuracy {out['linear_accuracy']:.4f}, macro F1 {out['linear_macro_f1']:.4f}")


if __name__ == "__main__":
    main()
