"""Why two of `bigmodel explain --evaluate`'s criteria fail on the Fashion-MNIST models, measured.

For each run given (the README uses the quickstart `cnn-small` and the `recipes/fashion_mnist_resnet.yaml` ResNet),
on the first `--images` test images, explaining each image's predicted class:

1. **IG completeness with a fixed budget of 50 gradients**: how many images have |sum of attributions −
   (F(x) − F(baseline))| ≤ 5% of |F(x) − F(baseline)| (F: the explained logit), for two baselines, and two rules
   for placing the steps:
   - baselines: `black` (pixel value 0: bigmodel's, the one deletion curves remove to) and `grey` (zero in the
     model's normalised input, i.e. the training mean pixel: Captum's default `baselines=None`);
   - rules: `gausslegendre` (Captum's default) and `sweep`: Gauss-Legendre nodes in the path variable warped by a
     forward sweep of `--sweep` points (density half uniform, half the sweep's |change of F|), after Walker et al.'s
     adaptive sampling. The sweep costs forwards only; both rules take 50 gradients.
   Along the ray the logit of a ReLU network is piecewise linear with many kinks; the printed `path_variation_ratio`
   is the median over images of (total variation of F along the path) / |F(x) − F(baseline)|: a quadrature that
   must land within 5% of the net change has to be that many times more precise on the variation.
2. **Grad-CAM's cells against deleting them** (convnets): the Spearman correlation, per image, between the
   Grad-CAM cells and the drop in the explained logit when the pixels under each cell (those where the explainer's
   `upsample` weighs that cell most) are set to black. Near 0: the last feature map's cells do not say which part
   of the image the prediction needs.

`--json` prints one object: per run, `ig` (`<baseline>_<rule>_within_5_percent`, out of `images`),
`path_variation_ratio` per baseline, and `gradcam_cell_spearman` (mean, and its standard error).

    python benchmarks/explain_checks.py RUN_DIR [RUN_DIR ...] [--images 100] [--steps 50] [--json]
    python benchmarks/explain_checks.py --quick --json     # a tiny digits model (CI smoke run)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit_json, environment, print_env, print_table  # noqa: E402


def _logit(ex: Any, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    from bigmodel.explain.faithfulness import _target_logit

    return _target_logit(ex, (x,), t)


def ig_within(ex: Any, x: torch.Tensor, t: torch.Tensor, base: torch.Tensor, nodes: torch.Tensor, weights):  # type: ignore[no-untyped-def]
    """Relative completeness error per image of IG at per-image `nodes` (B, n) with quadrature `weights` (B, n)."""
    total = torch.zeros(len(x))
    for k in range(nodes.shape[1]):
        p = (base + nodes[:, k].view(-1, 1, 1, 1) * (x - base)).requires_grad_(True)
        (g,) = torch.autograd.grad(ex.forward(p)[torch.arange(len(t)), t].sum(), p)
        total += weights[:, k] * (g * (x - base)).reshape(len(x), -1).sum(dim=1)
    net = _logit(ex, x, t) - _logit(ex, base, t)
    return (total - net).abs() / net.abs().clamp(min=1e-8)


def sweep_nodes(F: torch.Tensor, u: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gauss-Legendre nodes `u` / weights `w` on [0, 1] moved through the inverse CDF of a piecewise-constant density
    (half uniform, half the sweep's |change| per interval); weights divided by the density (change of variable)."""
    B, M = len(F), F.shape[1] - 1
    change = (F[:, 1:] - F[:, :-1]).abs()
    mass = 0.5 / M + 0.5 * change / change.sum(dim=1, keepdim=True).clamp(min=1e-12)
    cdf = torch.cat([torch.zeros(B, 1), mass.cumsum(dim=1)], dim=1)
    cdf = cdf / cdf[:, -1:]
    U = u.expand(B, -1).contiguous()
    k = (torch.searchsorted(cdf, U).clamp(1, M) - 1).clamp(max=M - 1)
    lo, hi = cdf.gather(1, k), cdf.gather(1, k + 1)
    nodes = (k + (U - lo) / (hi - lo).clamp(min=1e-12)) / M
    return nodes, w.expand(B, -1) / (mass.gather(1, k) * M)


def measure(run: Path, images: int, steps: int, sweep: int) -> dict[str, Any]:
    from bigmodel.explain.core import explainer_for
    from bigmodel.explain.faithfulness import load_split
    from bigmodel.models.base import Capability

    art, batches = load_split(run, "test", images, images)
    ex = explainer_for(art)
    (x,) = batches[0].inputs
    x = x.float().contiguous(memory_format=ex.memory_format)
    t = ex.probabilities((x,)).argmax(dim=1)
    gl, glw = np.polynomial.legendre.leggauss(steps)
    u, w = torch.tensor((gl + 1) / 2).float()[None], torch.tensor(glw / 2).float()[None]
    grid = torch.linspace(0, 1, sweep + 1)
    out: dict[str, Any] = {"run": str(run), "model": art.config["model"]["name"], "images": len(x), "steps": steps}
    ig: dict[str, int] = {}
    variation: dict[str, float] = {}
    for name, base in (("black", ex.baseline(x)), ("grey", torch.zeros_like(x))):
        F = torch.stack([_logit(ex, base + float(a) * (x - base), t) for a in grid], dim=1)  # (B, sweep + 1)
        tv = (F[:, 1:] - F[:, :-1]).abs().sum(dim=1) / (F[:, -1] - F[:, 0]).abs().clamp(min=1e-8)
        variation[name] = round(float(tv.median()), 2)
        rel = ig_within(ex, x, t, base, u.expand(len(x), -1), w.expand(len(x), -1))
        ig[f"{name}_gausslegendre_within_5_percent"] = int((rel <= 0.05).sum())
        rel = ig_within(ex, x, t, base, *sweep_nodes(F, u, w))
        ig[f"{name}_sweep_within_5_percent"] = int((rel <= 0.05).sum())
    out["ig"] = ig
    out["path_variation_ratio"] = variation
    if art.can(Capability.CONVNET):
        from scipy.stats import spearmanr

        H, W = x.shape[-2:]
        cam = ex.captum.LayerGradCam(ex.forward, ex.model.cam_layer()).attribute(x, target=t).detach()
        h, wd = cam.shape[-2:]
        # The cell of each pixel: the one whose weight is largest there in the explainer's own upsampling.
        where = ex.upsample(torch.eye(h * wd).view(h * wd, 1, h, wd), H, W)[:, 0].argmax(dim=0)  # (H, W)
        before = _logit(ex, x, t)
        drops = torch.stack(
            [before - _logit(ex, torch.where(where == c, ex.baseline(x), x), t) for c in range(h * wd)], dim=1
        )
        rho = np.array([spearmanr(cam[i].flatten().numpy(), drops[i].numpy())[0] for i in range(len(x))])
        rho = rho[np.isfinite(rho)]
        out["gradcam_cells"] = [h, wd]
        out["gradcam_cell_spearman"] = round(float(rho.mean()), 3)
        out["gradcam_cell_spearman_se"] = round(float(rho.std(ddof=1) / np.sqrt(len(rho))), 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="*", help="finished image-classifier runs")
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--steps", type=int, default=50, help="gradients per image (IG's steps)")
    ap.add_argument("--sweep", type=int, default=128, help="forward points along the path for the `sweep` rule")
    ap.add_argument("--quick", action="store_true", help="train a tiny digits model and check 16 images")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    runs = [Path(r) for r in args.runs]
    if args.quick:
        from bigmodel import api
        from bigmodel.config import validate_recipe

        args.images, args.sweep = 16, 16
        recipe = validate_recipe(
            {
                "task": "image_classification",
                "data": {"source": "digits", "val_fraction": 0.1, "test_fraction": 0.2},
                "model": {"name": "cnn-small", "widths": [8, 16]},
                "train": {"epochs": 2, "batch_size": 64},
            }
        )
        runs = [api.train(recipe, out=Path(tempfile.mkdtemp(prefix="bench-checks-")) / "run", progress=False).run_dir]
    if not runs:
        ap.error("give one or more finished image-classifier runs, or --quick")
    results = [measure(r, args.images, args.steps, args.sweep) for r in runs]
    env = environment()
    if args.json:
        emit_json({"runs": results, "env": env})
        return
    print_env(env)
    for res in results:
        print(f"\n{res['model']} ({res['run']}): {res['images']} test images, {res['steps']} gradients each")
        ig = res["ig"]
        print_table(
            ["baseline", "Gauss-Legendre within 5%", "sweep-placed within 5%", "path variation / net change"],
            [
                [b, ig[f"{b}_gausslegendre_within_5_percent"], ig[f"{b}_sweep_within_5_percent"],
                 res["path_variation_ratio"][b]]
                for b in ("black", "grey")
            ],
        )  # fmt: skip
        if "gradcam_cell_spearman" in res:
            h, w = res["gradcam_cells"]
            print(
                f"Grad-CAM {h} x {w} cells vs the logit drop of blackening each cell: mean Spearman "
                f"{res['gradcam_cell_spearman']} (SE {res['gradcam_cell_spearman_se']})"
            )


if __name__ == "__main__":
    main()
