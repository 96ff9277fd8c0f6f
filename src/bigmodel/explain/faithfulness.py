"""`bigmodel explain RUN --evaluate`: are the explanations faithful, and do they depend on the model at all?

- **Deletion / insertion** (RISE, Petsiuk et al. 2018): units (pixels, tokens, time steps x features, columns) are
  removed in order of attribution, in `steps` equal fractions; the curve is the target-class probability, the AUC
  its trapezoidal mean over the fraction removed (0..1). Most-relevant-first (MoRF) deletion should fall faster
  than for a random ranking (a lower AUC), least-relevant-first (LeRF) slower (a higher AUC). Deleting pixels shifts
  the input distribution (ROAD, Rong et al. 2022), so both orders are reported against the same random control (the
  mean of 3 seeded random rankings), with paired standard errors over the examples. Insertion starts from the
  baseline and adds the most relevant units first (higher is better).
- **Model randomisation** (Adebayo et al. 2018): the model's parameterised layers are re-initialised from the
  output back to the input (cascading); after each stage, the Spearman rank correlation between the trained and
  the randomised model's attribution maps is taken per example. A method that explains the model gives maps that
  decorrelate (mean |rho| well below 1); a model-independent edge map (the Sobel control, images) stays at 1 and
  fails the check, which shows the check can fail.
- **IG completeness**: attributions sum to F(x) − F(baseline) (target logit); the relative error per example.
- **Text comprehensiveness** (ERASER, DeYoung et al. 2020): deleting the top-20% tokens should lower the predicted
  class probability more than deleting a random 20%.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bigmodel.errors import UserError
from bigmodel.explain.core import IG_STEPS, Batch, Explainer, explainer_for

DEFAULT_METHODS = {
    "image": ("saliency", "integrated_gradients", "gradcam", "occlusion"),
    "sequence": ("saliency", "integrated_gradients", "occlusion"),
    "text": ("saliency", "integrated_gradients", "occlusion"),
    "tabular": ("occlusion", "kernel_shap"),
}
SANITY_METHODS = ("saliency", "integrated_gradients", "gradcam")


def load_split(run: str | Path, split: str, limit: int, batch_size: int) -> tuple[Any, list[Batch]]:
    """The run's artifact and the first `limit` examples of `split` as model-input batches (targets: labels)."""
    from bigmodel.api import make_loader, prepare_data
    from bigmodel.config import read_yaml, validate_recipe
    from bigmodel.runs import load_artifact, require_run_dir

    run_dir = require_run_dir(run)
    recipe = validate_recipe(read_yaml(run_dir / "recipe.yaml"), source=str(run_dir / "recipe.yaml"))
    art = load_artifact(run_dir)
    if split not in ("train", "val", "test"):
        raise UserError(f"--split {split!r}: expected test, val or train")
    data, _ = prepare_data(recipe, art.preprocess)
    loader = make_loader(recipe, data, art.preprocess, split, batch_size=batch_size)
    batches, n = [], 0
    for x, y in loader.epoch(0):
        inputs = tuple(t.cpu() for t in x) if isinstance(x, (tuple, list)) else (x.cpu().contiguous(),)
        take = min(len(y), limit - n)
        batches.append(Batch(tuple(t[:take] for t in inputs), y[:take].cpu(), {"y": y[:take].cpu()}))
        n += take
        if n >= limit:
            break
    if not batches:
        raise UserError(f"{run_dir}: the {split} split is empty")
    return art, batches


def _rank_removal(scores: torch.Tensor, valid: torch.Tensor, fraction: float, descending: bool) -> torch.Tensor:
    """(B, U) True for the first `fraction` of each row's valid units in score order."""
    s = scores.masked_fill(~valid, -math.inf if descending else math.inf)
    # Ties (Grad-CAM's zeros after its ReLU, IG's zeros where the input equals the baseline) are broken in a fixed
    # random order, not in raster order (which would delete a contiguous band of the image).
    perm = torch.randperm(s.shape[1], generator=torch.Generator().manual_seed(7))
    order = perm[torch.argsort(s[:, perm], dim=1, descending=descending, stable=True)]
    n_valid = valid.sum(dim=1)
    k = torch.round(n_valid.float() * fraction).long()
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(s.shape[1]).expand_as(order).contiguous())
    return (rank < k[:, None]) & valid


@torch.no_grad()
def curve_aucs(ex: Explainer, batch: Batch, scores: torch.Tensor, steps: int) -> dict[str, torch.Tensor]:
    """Per-example AUCs: deletion most-relevant-first, deletion least-relevant-first, insertion."""
    valid = ex.units_valid(batch)
    idx = torch.arange(len(batch))
    canvas = ex.insertion_canvas(batch)
    out = {}
    curves = [("deletion", True, False), ("deletion_lerf", False, False)]
    if canvas is not None:
        curves.append(("insertion", True, True))
    for name, desc, insert in curves:
        probs = []
        for k in range(steps + 1):
            frac = k / steps
            if insert:  # the most relevant units of the input drawn onto the canvas
                removed = valid & ~_rank_removal(scores, valid, frac, True)
                inputs = ex.remove(batch, removed, canvas)
            else:
                inputs = ex.remove(batch, _rank_removal(scores, valid, frac, desc))
            probs.append(ex.probabilities(inputs)[idx, batch.extra["pred"]])
        curve = torch.stack(probs, dim=1)  # (B, steps + 1)
        out[name] = torch.trapezoid(curve, dx=1.0 / steps, dim=1)
    return out


def _paired(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    d = (a - b).double()
    n = len(d)
    se = float(d.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    mean = float(d.mean())
    return {"diff": round(mean, 6), "se": round(se, 6), "z": round(mean / se, 3) if se > 0 else float("nan")}


def _spearman(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    from scipy.stats import spearmanr

    out = []
    for i in range(len(a)):
        x, y = a[i][valid[i]].numpy(), b[i][valid[i]].numpy()
        if x.std() == 0 or y.std() == 0:
            out.append(0.0)  # a constant map ranks nothing: no correlation
            continue
        out.append(float(spearmanr(x, y).statistic))
    return torch.tensor(out)


def _param_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules that own parameters, in registration order (≈ input → output)."""
    return [
        (n, m)
        for n, m in model.named_modules()
        if any(True for _ in m.parameters(recurse=False)) and hasattr(m, "reset_parameters")
    ]


def _randomise(m: nn.Module) -> None:
    m.reset_parameters()
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        m.reset_running_stats()


def sanity_check(
    ex: Explainer, batches: list[Batch], methods: tuple[str, ...], stages: int = 4, seed: int = 0
) -> dict[str, Any]:
    """Cascading model randomisation: mean |Spearman rho| between trained and randomised maps after each stage."""
    layers = _param_layers(ex.model)
    if not layers:
        return {}
    # Stage boundaries from the output back: the top layer, then evenly to all layers.
    cuts = sorted({max(1, round(len(layers) * s / stages)) for s in range(1, stages + 1)} | {1})
    trained = {m: [ex.unit_scores(m, ex.attribute(m, b).detach()) for b in batches] for m in methods}
    edges = [ex.input_gradient_map(b) for b in batches] if ex.kind == "image" else None
    valid = [ex.units_valid(b) for b in batches]
    result: dict[str, Any] = {"stages": [], "layers": len(layers)}
    model = copy.deepcopy(ex.model)
    done = 0
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for cut in cuts:
            for _name, m in list(reversed(_param_layers(model)))[done:cut]:
                _randomise(m)
            done = cut
            rex = type(ex)(ex.art, model)
            stage: dict[str, Any] = {"randomised_layers": cut, "down_to": list(reversed(layers))[cut - 1][0]}
            for meth in methods:
                rho = torch.cat(
                    [
                        _spearman(t, rex.unit_scores(meth, rex.attribute(meth, b).detach()), v)
                        for t, b, v in zip(trained[meth], batches, valid, strict=True)
                    ]
                )
                stage[meth] = round(float(rho.abs().mean()), 4)
            if edges is not None:  # the control: an edge map does not depend on the model at all
                stage["edge_control"] = round(
                    float(torch.cat([_spearman(e, e, v) for e, v in zip(edges, valid, strict=True)]).abs().mean()), 4
                )
            result["stages"].append(stage)
    final = result["stages"][-1]
    result["fully_randomised"] = {k: v for k, v in final.items() if k not in ("randomised_layers", "down_to")}
    result["passes"] = {k: v < 0.5 for k, v in result["fully_randomised"].items()}
    return result


@torch.no_grad()
def _target_logit(ex: Explainer, inputs: tuple[torch.Tensor, ...], target: torch.Tensor) -> torch.Tensor:
    return ex.forward(*inputs)[torch.arange(len(target)), target]


def evaluate(
    run: str | Path,
    *,
    split: str = "test",
    limit: int = 500,
    methods: list[str] | None = None,
    steps: int = 20,
    seeds: int = 3,
    batch_size: int = 50,
    sanity: bool = True,
    sanity_limit: int = 100,
    completeness_limit: int = 100,
) -> dict[str, Any]:
    """Faithfulness (deletion / insertion vs a random control), IG completeness, the randomisation sanity check
    and, for text, comprehensiveness, on the first `limit` examples of `split`. Targets: the predicted class."""
    t0 = time.perf_counter()
    art, batches = load_split(run, split, limit, batch_size)
    ex = explainer_for(art)
    if ex.kind == "lm":
        raise UserError("explain --evaluate takes classifiers (language models: explain prompts)")
    methods = list(methods or [m for m in DEFAULT_METHODS.get(ex.kind, ex.methods) if m in ex.methods])
    for m in methods:
        ex.check_method(m)
    for b in batches:
        b.extra["pred"] = ex.probabilities(b.inputs).argmax(dim=1)
        b.target = b.extra["pred"]
    n = sum(len(b) for b in batches)
    out: dict[str, Any] = {
        "run": str(run),
        "split": split,
        "examples": n,
        "kind": ex.kind,
        "steps": steps,
        "accuracy": round(
            float(sum(int((b.extra["pred"] == b.extra.get("y", b.extra["pred"])).sum()) for b in batches) / n), 4
        ),
    }
    # Random controls: the mean AUC of `seeds` random rankings per example, drawn at each method's resolution.
    names = ["deletion", "deletion_lerf"] + (["insertion"] if ex.insertion_canvas(batches[0]) is not None else [])
    controls: dict[str, dict[str, torch.Tensor]] = {}

    def control(method: str) -> tuple[str, dict[str, torch.Tensor]]:
        key = ex.control_key(method)
        if key not in controls:
            parts: dict[str, list[torch.Tensor]] = {k: [] for k in names}
            for b in batches:
                per_seed = []
                for s in range(seeds):
                    g = torch.Generator().manual_seed(1000 + s)
                    per_seed.append(curve_aucs(ex, b, ex.random_scores(method, b, g), steps))
                for k in parts:
                    parts[k].append(torch.stack([p[k] for p in per_seed]).mean(dim=0))
            controls[key] = {k: torch.cat(v) for k, v in parts.items()}
        return key, controls[key]

    _, unit = control("saliency")  # the per-unit (per-pixel, per-token) random ranking every kind has
    out["random"] = {f"{k}_auc": round(float(v.mean()), 4) for k, v in unit.items()}
    out["methods"] = {}
    for m in methods:
        t = time.perf_counter()
        key, random_auc = control(m)
        aucs: dict[str, list[torch.Tensor]] = {k: [] for k in names}
        rel_err: list[torch.Tensor] = []
        first_err: list[torch.Tensor] = []
        steps_used: list[torch.Tensor] = []
        seen = 0
        for b in batches:
            attr = ex.attribute(m, b).detach()
            scores = ex.unit_scores(m, attr)
            if m == "integrated_gradients" and seen < completeness_limit:
                diff = _target_logit(ex, b.inputs, b.target) - _target_logit(ex, ex.baseline_inputs(b), b.target)
                scale = diff.abs().clamp(min=1e-8)
                rel_err.append(b.extra["ig_delta"].abs() / scale)
                first_err.append(b.extra["ig_delta_first"].abs() / scale)
                steps_used.append(b.extra["ig_steps"])
                seen += len(b)
            for k, v in curve_aucs(ex, b, scores, steps).items():
                aucs[k].append(v)
        auc = {k: torch.cat(v) for k, v in aucs.items()}
        row: dict[str, Any] = {f"{k}_auc": round(float(v.mean()), 4) for k, v in auc.items()}
        row["control"] = key
        row["random"] = {f"{k}_auc": round(float(v.mean()), 4) for k, v in random_auc.items()}
        row["vs_random"] = {k: _paired(auc[k], random_auc[k]) for k in auc}
        if key != "unit":  # also against independent per-unit random rankings (the literal control)
            row["vs_unit_random"] = {k: _paired(auc[k], unit[k]) for k in auc}
        # Faithful: MoRF deletion below the random control by ≥ 3 paired SE, LeRF above it.
        row["faithful"] = bool(row["vs_random"]["deletion"]["z"] <= -3 and row["vs_random"]["deletion_lerf"]["z"] > 0)
        if rel_err:
            e = torch.cat(rel_err)[:completeness_limit]
            e1 = torch.cat(first_err)[:completeness_limit]
            used = torch.cat(steps_used)[:completeness_limit]
            row["completeness"] = {
                "examples": len(e),
                "median_relative_error": round(float(e.median()), 5),
                "within_5_percent": int((e <= 0.05).sum()),
                "steps_median": int(used.median()),
                "steps_max": int(used.max()),
                # the first pass alone (IG_STEPS steps for every example), before adaptive refinement
                "first_pass_steps": IG_STEPS,
                "first_pass_within_5_percent": int((e1 <= 0.05).sum()),
            }
        row["seconds"] = round(time.perf_counter() - t, 2)
        out["methods"][m] = row
    if ex.kind == "text":
        out["comprehensiveness"] = comprehensiveness(ex, batches, [m for m in methods if m != "saliency"] or methods)
    if sanity:
        sm = tuple(m for m in SANITY_METHODS if m in methods)
        if sm:
            sb, k = [], 0
            for b in batches:
                if k >= sanity_limit:
                    break
                take = min(len(b), sanity_limit - k)
                sb.append(Batch(tuple(t[:take] for t in b.inputs), b.target[:take]))
                k += take
            out["sanity"] = sanity_check(ex, sb, sm)
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


@torch.no_grad()
def _drop(ex: Explainer, b: Batch, removed: torch.Tensor) -> torch.Tensor:
    idx = torch.arange(len(b))
    before = ex.probabilities(b.inputs)[idx, b.target]
    return before - ex.probabilities(ex.remove(b, removed))[idx, b.target]


def comprehensiveness(ex: Explainer, batches: list[Batch], methods: list[str], fraction: float = 0.2) -> dict:
    """Deleting each text's top-`fraction` tokens vs a random `fraction` (mean of 3 seeds): the drop in the
    predicted class probability, and on how many texts the top tokens' drop is larger."""
    out: dict[str, Any] = {"fraction": fraction}
    for m in methods:
        top_drop, rand_drop = [], []
        for b in batches:
            valid = ex.units_valid(b)
            k = torch.clamp(torch.ceil(valid.sum(dim=1).float() * fraction), min=1)
            frac = (k / valid.sum(dim=1).clamp(min=1)).clamp(max=1.0)
            scores = ex.unit_scores(m, ex.attribute(m, b).detach())
            top = torch.stack(
                [_rank_removal(scores[i : i + 1], valid[i : i + 1], float(frac[i]), True)[0] for i in range(len(b))]
            )
            top_drop.append(_drop(ex, b, top))
            rd = []
            for s in range(3):
                g = torch.Generator().manual_seed(2000 + s)
                r = torch.rand(scores.shape, generator=g)
                rm = torch.stack(
                    [_rank_removal(r[i : i + 1], valid[i : i + 1], float(frac[i]), True)[0] for i in range(len(b))]
                )
                rd.append(_drop(ex, b, rm))
            rand_drop.append(torch.stack(rd).mean(dim=0))
        td, rdd = torch.cat(top_drop), torch.cat(rand_drop)
        out[m] = {
            "top_drop": round(float(td.mean()), 4),
            "random_drop": round(float(rdd.mean()), 4),
            "top_beats_random": round(float((td > rdd).float().mean()), 4),
        }
    return out
