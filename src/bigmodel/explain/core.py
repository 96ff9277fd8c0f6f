"""Attributions through the declared model contract, with Captum.

An `Explainer` wraps a *copy* of an artifact's model (fp32, eval mode, every in-place activation made out-of-place,
no gradients on the weights): the artifact's own model is never hooked or modified, so its outputs stay
bit-identical. What is attributed depends on the input kind, and each kind is one small adapter class registered in
`KINDS` (a new input kind is a new adapter and one registration line):

- images: the normalised pixels (B, C, H, W); Grad-CAM reads `cam_layer()`;
- sequences: the standardised values (B, T, F) (padding never scores);
- text: gradient methods attribute to `input_embedding()`'s output (one score per token, summed over the
  embedding); occlusion, LIME and KernelSHAP delete tokens (the pad id);
- tables: columns (numeric and categorical), by ablation to the training mean / the unseen category;
- language models (`lm.py`): which prompt tokens drove each generated token.

Defaults (per method) need no tuning: IG with 50 Gauss-Legendre steps from a black image (tokens: pad; values: 0),
doubled (up to 400) for the examples whose completeness error is over 5%,
Grad-CAM upsampled bilinearly, occlusion with a window of a seventh of the image, LIME / KernelSHAP on a 7 x 7 patch
grid with 200 samples evaluated 100 at a time (Captum's default, one per forward, is ~5x slower) and LIME's own
sample weights (`lime_kernel`). Captum's KernelSHAP with one fixed baseline computes *Baseline Shapley* values;
results say so. Convnets are explained channels-last; the perturbed inputs of LIME and KernelSHAP are built per batch of
samples (`MaskedForward`).
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bigmodel.errors import UserError

METHODS = ("saliency", "integrated_gradients", "gradcam", "occlusion", "lime", "kernel_shap")
ALL_METHODS = (*METHODS, "activations")
LABELS = {
    "saliency": "saliency (|gradient|)",
    "integrated_gradients": "integrated gradients",
    "gradcam": "Grad-CAM",
    "occlusion": "occlusion",
    "lime": "LIME",
    "kernel_shap": "KernelSHAP (Baseline Shapley: one fixed baseline)",
}
IG_STEPS = 50
IG_MAX_STEPS = 400  # adaptive refinement: 50 → 100 → 200 → 400 steps for the examples that need them
IG_TOLERANCE = 0.05  # |completeness error| allowed, relative to |F(x) − F(baseline)|
SAMPLES = 200  # LIME / KernelSHAP perturbations per input
PER_EVAL = 100  # perturbations per forward pass (batched)
LIME_KERNEL_WIDTH = 0.25  # LIME's: cosine distances in the interpretable space
GRID = 7  # LIME / KernelSHAP: a GRID x GRID patch mask on images (49 features)


def require_captum() -> Any:
    try:
        import captum.attr
    except ImportError:
        raise UserError("explain needs Captum: pip install 'bigmodel[explain]'") from None
    # Captum's notes about what bigmodel does on purpose: inputs get requires_grad set by Captum; LIME and
    # KernelSHAP fit one interpretable model per example of a batch (batched forwards are the point).
    warnings.filterwarnings("ignore", message="Input Tensor .* did not already require gradients")
    warnings.filterwarnings("ignore", message="You are providing multiple inputs for Lime")
    return captum.attr


def explainable_copy(model: nn.Module) -> nn.Module:
    """A copy safe to hook and differentiate: fp32, eval mode, no in-place activations (Captum's hooks and
    gradients break on a ReLU(inplace=True) reused inside a block), weights without gradients."""
    m = copy.deepcopy(model).float().eval()
    for mod in m.modules():
        if hasattr(mod, "inplace") and isinstance(mod.inplace, bool):
            mod.inplace = False
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def lime_kernel(original: Any, perturbed: Any, interpretable: torch.Tensor, **_: Any) -> float:
    """LIME's own sample weight (Ribeiro et al.'s `lime_image` / `lime_text`): an exponential kernel of width 0.25 on
    the cosine distance between the sample's binary interpretable vector and the all-ones vector of the input itself.
    Captum's default measures the cosine distance of the whole perturbed input to the input instead: a different
    weighting, and one pass over every pixel per sample (a fifth of batched LIME's time on `cnn-small`)."""
    kept = float(interpretable.sum())
    distance = 1.0 - math.sqrt(kept / interpretable.numel())  # cos(1, z) = |z|_1 / sqrt(n |z|_1) for binary z
    return math.exp(-(distance**2) / (2 * LIME_KERNEL_WIDTH**2))


class MaskedForward:
    """The model as a function of LIME / KernelSHAP's interpretable samples, for one example: (k, F) binary samples
    → the k perturbed inputs, built in one `torch.where` per input (feature f kept from the example where the sample
    is 1, else the baseline) → the model's outputs.

    Captum's default builds each sample's perturbed input on its own (`default_from_interp_rep_transform`: a gather,
    two casts, two products and a sum per sample, ~20 µs even for a 28 x 28 image) before concatenating them for the
    batched forward: a sixth of batched LIME's time on `cnn-small`. Handing Captum the samples themselves as the
    "model input" (an identity transform) moves that work here, once per batch of `perturbations_per_eval`. The
    inputs are the ones Captum's transform builds, value for value (a test compares the attributions bit for bit)."""

    def __init__(
        self,
        forward: Any,
        inputs: tuple[torch.Tensor, ...],
        baselines: tuple[Any, ...],
        masks: tuple[torch.Tensor, ...],
    ) -> None:
        self.forward, self.inputs, self.masks = forward, inputs, masks
        self.baselines = tuple(
            b.to(x.dtype) if isinstance(b, torch.Tensor) else b for x, b in zip(inputs, baselines, strict=True)
        )

    def __call__(self, samples: torch.Tensor, *args: Any) -> torch.Tensor:
        keep = samples.bool()
        built = tuple(
            torch.where(keep[:, m[0]], x, b) for x, b, m in zip(self.inputs, self.baselines, self.masks, strict=True)
        )
        return self.forward(*built, *args)


def _identity_transform(sample: torch.Tensor, _inputs: Any, **_: Any) -> torch.Tensor:
    return sample


SAMPLE_BLOCK = 256  # interpretable samples drawn per call to torch's generator (`lime_samples`, `kernel_shap_samples`)


def _device(original_inp: Any) -> torch.device:
    return (original_inp if isinstance(original_inp, torch.Tensor) else original_inp[0]).device


def lime_samples(original_inp: Any, **kwargs: Any) -> Iterator[torch.Tensor]:
    """Captum's LIME sampler (`default_perturb_func`: each interpretable feature kept with probability 1/2), drawn
    `SAMPLE_BLOCK` samples at a time instead of one: Captum draws and casts each sample on its own (~10 µs)."""
    n, device = int(kwargs["num_interp_features"]), _device(original_inp)
    half = torch.full((SAMPLE_BLOCK, n), 0.5)
    while True:
        yield from torch.bernoulli(half).long().to(device).split(1)


def kernel_shap_samples(original_inp: Any, **kwargs: Any) -> Iterator[torch.Tensor]:
    """Captum's KernelSHAP sampler (`kernel_shap_perturb_generator`: every feature, then none, then k features with k
    drawn from the Shapley kernel's distribution and the k chosen uniformly — the k largest of n normal draws), drawn
    `SAMPLE_BLOCK` samples at a time: Captum's per-sample categorical draw, normal draw and k-th value took ~40 µs, a
    fifth to a third of batched KernelSHAP's time on Fashion-MNIST convnets. Same distribution, another random stream
    (a test checks the distribution, and that KernelSHAP with it recovers a linear model's Shapley values)."""
    n, device = int(kwargs["num_interp_features"]), _device(original_inp)
    probs = kwargs["num_select_distribution"].probs
    yield torch.ones(1, n, device=device, dtype=torch.long)
    yield torch.zeros(1, n, device=device, dtype=torch.long)
    rows = torch.arange(SAMPLE_BLOCK)
    while True:
        k = torch.multinomial(probs, SAMPLE_BLOCK, replacement=True)
        values = torch.randn(SAMPLE_BLOCK, n)
        threshold = values.sort(dim=1).values[rows, n - k - 1]  # the (n - k)-th smallest: k values lie above it
        yield from (values > threshold[:, None]).long().to(device).split(1)


class Surrogate:
    """LIME (weighted by `lime_kernel`) or KernelSHAP through Captum, one example at a time (as Captum's own batch
    loop does, drawing the same samples in the same order), the samples drawn a block at a time (`lime_samples`,
    `kernel_shap_samples`) and the perturbed inputs built per batch of samples by `MaskedForward`. `attribute` takes
    Captum's arguments.

    The surrogate fits (scikit-learn's Lasso, SciPy's lstsq; small, 200 x 49) run with one BLAS thread: they woke
    OpenBLAS's thread pool, whose threads then spun through the model's forward passes in torch's own pool (on 2
    cores KernelSHAP ran 2-3x slower)."""

    def __init__(self, captum: Any, forward: Any, method: str) -> None:
        self.captum, self.forward, self.method = captum, forward, method

    def _captum(self, forward: Any) -> Any:
        A = self.captum
        if self.method == "lime":
            m = A.Lime(forward, similarity_func=lime_kernel, perturb_func=lime_samples)
        else:
            m = A.KernelShap(forward)
            m.perturb_func = kernel_shap_samples  # LimeBase's sampler (KernelShap's constructor passes its own)
        # LimeBase's own constructor argument: with perturb_interpretable_space (Lime's and KernelShap's setting) the
        # "model input" of each sample is what this returns; MaskedForward builds the real inputs from it.
        assert m.perturb_interpretable_space
        m.from_interp_rep_transform = _identity_transform
        return m

    def attribute(
        self,
        inputs: torch.Tensor | tuple[torch.Tensor, ...],
        baselines: Any,
        target: Any,
        feature_mask: torch.Tensor | tuple[torch.Tensor, ...],
        n_samples: int,
        perturbations_per_eval: int,
        additional_forward_args: tuple[Any, ...] | None = None,
    ) -> Any:
        from threadpoolctl import threadpool_limits

        is_tuple = isinstance(inputs, tuple)
        xs = inputs if is_tuple else (inputs,)
        bs = baselines if isinstance(baselines, tuple) else (baselines,)
        ms = feature_mask if isinstance(feature_mask, tuple) else (feature_mask,)
        args = tuple(additional_forward_args or ())
        B = len(xs[0])

        def row(v: Any, i: int) -> Any:  # example i of a per-example tensor; anything else as it is
            return v[i : i + 1] if isinstance(v, torch.Tensor) and v.dim() > 0 and len(v) == B else v

        outs = []
        with threadpool_limits(1, user_api="blas"):
            for i in range(B):
                x_i = tuple(row(x, i) for x in xs)
                b_i = tuple(row(b, i) for b in bs)
                m_i = tuple(row(m, i) if len(m) == B else m for m in ms)
                t_i = target[i].item() if isinstance(target, torch.Tensor) and target.dim() > 0 else target
                masked = MaskedForward(self.forward, x_i, b_i, m_i)
                out = self._captum(masked).attribute(
                    x_i if is_tuple else x_i[0],
                    baselines=b_i if is_tuple else b_i[0],
                    target=t_i,
                    additional_forward_args=tuple(row(a, i) for a in args) or None,
                    feature_mask=m_i if is_tuple else m_i[0],
                    n_samples=n_samples,
                    perturbations_per_eval=perturbations_per_eval,
                )
                outs.append(out if is_tuple else (out,))
        joined = tuple(torch.cat(parts) for parts in zip(*outs, strict=True))
        return joined if is_tuple else joined[0]


def check_artifact(art: Any) -> None:
    """Explain needs the fp32 module: artifacts run by another runtime (ONNX Runtime, int8 kernels) cannot be
    differentiated; say which run to explain instead."""
    from bigmodel.artifact import runtime_name
    from bigmodel.models.base import Capability

    runtime = runtime_name(art.config)
    if runtime is not None:
        src = None
        record = Path(art.folder).parent / "compress.json"  # a `bigmodel compress` run names its source run
        if record.is_file():
            try:
                src = json.loads(record.read_text(encoding="utf-8")).get("source")
            except (OSError, ValueError):
                src = None
        hint = f"explain the fp32 run it came from ({src})" if src else "explain the fp32 run it came from"
        raise UserError(
            f"{art.folder}: this model runs on the {runtime} runtime, whose weights have no gradients; {hint}"
        )
    if not (art.can(Capability.EXPLAINABLE) or art.can(Capability.CLASSIFIER) or art.can(Capability.GENERATES)):
        raise UserError(f"{art.folder}: a {art.config['model']['name']} model does not explain")


def zero_padding(attr: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Scores at padded positions (t ≥ length) set to 0: padding is not part of the input."""
    T = attr.shape[1]
    valid = torch.arange(T)[None, :] < lengths[:, None]
    return attr * valid.view(*valid.shape, *([1] * (attr.ndim - 2)))


@dataclass
class Batch:
    """Model inputs of a batch (what `forward` takes) and the labels to explain."""

    inputs: tuple[torch.Tensor, ...]
    target: torch.Tensor  # (B,) class index per example
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.target)


class Explainer:
    """One input kind's attributions. `attribute` returns raw attributions in the attributed input's shape;
    `unit_scores` flattens them to one score per perturbable unit (pixel, token, time step x feature, column);
    `remove` replaces units with the baseline (the faithfulness curves); `units_valid` masks units that exist."""

    kind = ""
    methods: tuple[str, ...] = ()
    default = "integrated_gradients"

    def __init__(self, art: Any, model: nn.Module | None = None) -> None:
        self.art = art
        self.model = model if model is not None else explainable_copy(art.model)
        self.captum = require_captum()

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(*inputs).float()

    def surrogate(self, method: str) -> Surrogate:
        """Captum's LIME (weighted by `lime_kernel`) or KernelSHAP on this model."""
        return Surrogate(self.captum, self.forward, method)

    @torch.no_grad()
    def probabilities(self, inputs: tuple[torch.Tensor, ...], batch_size: int = 512) -> torch.Tensor:
        outs = [
            self.forward(*(t[i : i + batch_size] for t in inputs)).softmax(dim=1)
            for i in range(0, len(inputs[0]), batch_size)
        ]
        return torch.cat(outs)

    def method_name(self, method: str) -> str:
        """What the results call `method` (`method_name`): its label, with this kind's variant where it differs."""
        return LABELS[method]

    def check_method(self, method: str) -> None:
        if method not in self.methods:
            raise UserError(
                f"--method {method!r} does not apply to {self.kind} models; expected one of: {', '.join(self.methods)}"
            )

    def integrate(
        self,
        batch: Batch,
        run: Any,
        n_steps: int = IG_STEPS,
        adaptive: bool = True,
        tolerance: float = IG_TOLERANCE,
        **_: Any,
    ) -> torch.Tensor:
        """Integrated gradients with a completeness check: `run(steps, index)` attributes the examples `index`.
        Examples whose |sum of attributions − (F(x) − F(baseline))| exceeds `tolerance` of |F(x) − F(baseline)|
        (Captum's convergence delta) are integrated again with twice the steps, up to `IG_MAX_STEPS`: a ReLU
        network's path integral has kinks that 50 Gauss-Legendre points sometimes miss. The delta, the first
        pass's delta and the steps used per example go into `batch.extra`."""
        everyone = torch.arange(len(batch))
        attr, delta = run(n_steps, everyone)
        attr, delta = attr.detach().clone(), delta.detach().clone()
        batch.extra["ig_delta_first"] = delta.clone()
        batch.extra["ig_steps_first"] = n_steps
        used = torch.full((len(batch),), n_steps)
        steps = n_steps
        while adaptive and steps < IG_MAX_STEPS:
            total = attr.reshape(len(batch), -1).sum(dim=1)
            rel = delta.abs() / (total - delta).abs().clamp(min=1e-8)
            again = (rel > tolerance).nonzero().flatten()
            if len(again) == 0:
                break
            steps *= 2
            a2, d2 = run(steps, again)
            attr[again], delta[again], used[again] = a2.detach(), d2.detach(), steps
        batch.extra["ig_delta"] = delta
        batch.extra["ig_steps"] = used
        return attr

    def integrated_gradients(
        self, batch: Batch, x: torch.Tensor, base: torch.Tensor, extra: torch.Tensor | None, **options: Any
    ) -> torch.Tensor:
        """IG of the input `x` from `base`, with one extra forward argument per example (lengths, categories)."""
        ig = self.captum.IntegratedGradients(self.forward)
        t = batch.target

        def run(n: int, i: torch.Tensor) -> Any:
            args = (extra[i],) if extra is not None else None
            return ig.attribute(
                x[i],
                baselines=base[i],
                target=t[i],
                additional_forward_args=args,
                n_steps=n,
                internal_batch_size=8 * n,
                return_convergence_delta=True,
            )

        return self.integrate(batch, run, **options)

    # ------------------------------------------------------------------------------------------- to implement
    def attribute(self, method: str, batch: Batch, **options: Any) -> torch.Tensor:
        raise NotImplementedError

    def unit_scores(self, method: str, attr: torch.Tensor) -> torch.Tensor:
        """(B, U) one score per unit; higher = more evidence for the target."""
        return attr.reshape(len(attr), -1)

    def random_scores(self, method: str, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        """(B, U) a random attribution for `method`'s control (default: independent per unit)."""
        return torch.rand(len(batch), self.num_units(batch), generator=generator)

    def control_key(self, method: str) -> str:
        """Methods whose random controls are drawn alike share one (`random_scores` of the same form)."""
        return "unit"

    def units_valid(self, batch: Batch) -> torch.Tensor:
        return torch.ones(len(batch), self.num_units(batch), dtype=torch.bool)

    def num_units(self, batch: Batch) -> int:
        raise NotImplementedError

    def remove(
        self, batch: Batch, removed: torch.Tensor, canvas: tuple[torch.Tensor, ...] | None = None
    ) -> tuple[torch.Tensor, ...]:
        """Inputs with the units where `removed` (B, U) is True replaced by the baseline (or by `canvas`)."""
        raise NotImplementedError

    def insertion_canvas(self, batch: Batch) -> tuple[torch.Tensor, ...] | None:
        """What insertion starts from, when it differs from deletion's baseline (images: a blurred copy, as in
        RISE); None: insertion onto the deletion baseline would only mirror least-relevant-first deletion."""
        return None

    def baseline_inputs(self, batch: Batch) -> tuple[torch.Tensor, ...]:
        """The inputs integrated gradients starts from (what F(baseline) of its completeness is taken at)."""
        raise NotImplementedError

    def describe(
        self,
        r: dict[str, Any],
        files: dict[str, Any],
        batch: Batch,
        i: int,
        units: torch.Tensor,
        attr: torch.Tensor,
        item: Any,
        method: str,
        pictures: bool,
    ) -> None:
        """Add example `i`'s kind-specific scores to its result `r` (regions, tokens, steps, columns) and, with
        `pictures`, its picture to `files`."""
        raise NotImplementedError

    def input_gradient_map(self, batch: Batch) -> torch.Tensor:
        """(B, U) a model-independent edge map of the inputs (the sanity check's control): must fail it."""
        raise UserError(f"the edge-map control applies to images, not {self.kind} models")


# ------------------------------------------------------------------------------------------------------ images
class ImageExplainer(Explainer):
    """Normalised pixels (B, C, H, W). The baseline everywhere (IG's starting point, what occlusion, LIME,
    KernelSHAP and the deletion curves put in place of removed pixels) is a black image, pixel value 0, as in
    Sundararajan et al. 2017 and RISE's deletion; in normalised units that is -mean / std per channel."""

    kind = "image"
    methods = METHODS
    default = "integrated_gradients"

    def check_method(self, method: str) -> None:
        from bigmodel.models.base import Capability

        if method == "gradcam" and not self.art.can(Capability.CONVNET):
            name = self.art.config["model"]["name"]
            raise UserError(f"--method gradcam reads a convnet's last feature map; {name} has none (try saliency)")
        super().check_method(method)

    def baseline_inputs(self, batch: Batch) -> tuple[torch.Tensor, ...]:
        return (self.baseline(batch.inputs[0]),)

    def method_name(self, method: str) -> str:
        return "saliency (signed gradient)" if method == "saliency" else LABELS[method]

    def describe(self, r, files, batch, i, units, attr, item, method, pictures) -> None:  # type: ignore[no-untyped-def]
        from bigmodel.explain import render

        H, W = attr.shape[-2:]
        pixel = self.pixel_scores(method, attr[None])[0].numpy()
        ph, pw = -(-H // GRID), -(-W // GRID)
        r["regions"] = [  # GRID x GRID sums of the per-pixel scores, row-major from the top left
            [round(float(pixel[a * ph : (a + 1) * ph, b * pw : (b + 1) * pw].sum()), 6) for b in range(GRID)]
            for a in range(GRID)
        ]
        if pictures:
            import numpy as np

            files["heatmap.png"] = render.image_png(np.asarray(item), pixel, method)

    def __init__(self, art: Any, model: nn.Module | None = None) -> None:
        from bigmodel.models.base import Capability

        super().__init__(art, model)
        # A convnet's copy runs channels-last: oneDNN's fp32 convolutions and pooling are ~2.6x faster per image on
        # the batched forwards that occlusion, LIME, KernelSHAP and IG make (`cnn-small`, 100 images a call).
        self.memory_format = torch.channels_last if art.can(Capability.CONVNET) else torch.contiguous_format
        self.model = self.model.to(memory_format=self.memory_format)
        mean, std = art.preprocess.mean, art.preprocess.std
        self.black = (-torch.tensor(mean) / torch.tensor(std)).view(1, -1, 1, 1).float()

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        # Captum builds perturbed batches with torch.cat, which may return them channels-first: convert, or the
        # channels-last convolutions reorder every call (KernelSHAP ran at half speed that way).
        return self.model(*(t.contiguous(memory_format=self.memory_format) for t in inputs)).float()

    def baseline(self, x: torch.Tensor) -> torch.Tensor:
        return self.black.expand_as(x).to(x.dtype).contiguous(memory_format=self.memory_format)

    def _patch_mask(self, H: int, W: int) -> torch.Tensor:
        ph, pw = math.ceil(H / GRID), math.ceil(W / GRID)
        rows = torch.arange(H) // ph
        cols = torch.arange(W) // pw
        return (rows[:, None] * GRID + cols[None, :]).view(1, 1, H, W)

    def attribute(self, method: str, batch: Batch, **options: Any) -> torch.Tensor:
        A = self.captum
        (x,) = batch.inputs
        x = x.float().contiguous(memory_format=self.memory_format)
        t = batch.target
        B, C, H, W = x.shape
        base = self.baseline(x)
        if method == "saliency":
            # Signed: every pixel lies on one side of black (what deleting puts in its place), so the gradient's sign
            # says whether removing the pixel lowers the explained score or raises it. |gradient| ranks both kinds
            # together and was no better than random at finding the pixels whose removal lowers it (README).
            return A.Saliency(self.forward).attribute(x, target=t, abs=False)
        if method == "integrated_gradients":
            return self.integrated_gradients(batch, x, base, None, **options)
        if method == "gradcam":
            layer = self.model.cam_layer()
            cam = A.LayerGradCam(self.forward, layer).attribute(x, target=t, relu_attributions=True)
            return self.upsample(cam, H, W)
        if method == "occlusion":
            w = max(2, H // GRID)
            s = max(1, w // 2)
            occ = A.Occlusion(self.forward)
            return occ.attribute(
                x,
                sliding_window_shapes=(C, w, w),
                strides=(C, s, s),
                baselines=base,
                target=t,
                perturbations_per_eval=64,
            )
        if method in ("lime", "kernel_shap"):
            return self.surrogate(method).attribute(
                x,
                baselines=base,
                target=t,
                feature_mask=self._patch_mask(H, W),
                n_samples=int(options.get("n_samples", SAMPLES)),
                perturbations_per_eval=int(options.get("perturbations_per_eval", PER_EVAL)),
            )
        self.check_method(method)
        raise AssertionError(method)

    def pixel_scores(self, method: str, attr: torch.Tensor) -> torch.Tensor:
        """(B, H, W): the sum over channels (deleting a pixel blackens all of its channels at once)."""
        return attr.sum(dim=1)

    def unit_scores(self, method: str, attr: torch.Tensor) -> torch.Tensor:
        return self.pixel_scores(method, attr).reshape(len(attr), -1)

    @staticmethod
    def upsample(cam: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """A (B, 1, h, w) feature-map score → (B, 1, H, W), bilinearly, aligned with what the map covers: a network
        that pools 28 pixels down to 3 cells sees rows 0-23 through them (stride 8; the last 4 rows are dropped by
        floor pooling), so the map is stretched over 24 rows and its edge repeated below, not over all 28."""
        import torch.nn.functional as F

        h, w = cam.shape[-2:]
        sh, sw = max(1, H // h), max(1, W // w)
        up = F.interpolate(cam, (h * sh, w * sw), mode="bilinear", align_corners=False)
        return F.pad(up, (0, W - w * sw, 0, H - h * sh), mode="replicate") if (h * sh, w * sw) != (H, W) else up

    def num_units(self, batch: Batch) -> int:
        return batch.inputs[0].shape[-2] * batch.inputs[0].shape[-1]

    def random_scores(self, method: str, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        """A random attribution of the method's own resolution (the matched control): per pixel for saliency and
        IG; a random map of Grad-CAM's feature-map size, occlusion's window grid or the 7 x 7 patch grid,
        upsampled like the method's map. Deleting a smooth map's regions damages an image differently from
        scattered pixels (ROAD's caution), so each method is compared with random maps of its own smoothness."""
        import torch.nn.functional as F

        (x,) = batch.inputs
        B, _, H, W = x.shape
        if method in ("saliency", "integrated_gradients"):
            return torch.rand(B, H * W, generator=generator)
        if method == "gradcam":
            with torch.no_grad():
                size = self._cam_size(x[:1])
            return self.upsample(torch.rand(B, 1, *size, generator=generator), H, W).reshape(B, -1)
        if method == "occlusion":
            w = max(2, H // GRID)
            s = max(1, w // 2)
            coarse = torch.rand(B, 1, (H - w) // s + 1, (W - w) // s + 1, generator=generator)
            return F.interpolate(coarse, (H, W), mode="bilinear").reshape(B, -1)
        coarse = torch.rand(B, 1, GRID, GRID, generator=generator)  # lime, kernel_shap: the patch grid
        return F.interpolate(coarse, (H, W), mode="nearest").reshape(B, -1)

    def control_key(self, method: str) -> str:
        return {"saliency": "unit", "integrated_gradients": "unit", "kernel_shap": "grid", "lime": "grid"}.get(
            method, method
        )

    def _cam_size(self, x: torch.Tensor) -> tuple[int, int]:
        seen: list[tuple[int, int]] = []
        h = self.model.cam_layer().register_forward_hook(lambda _m, _i, out: seen.append(tuple(out.shape[-2:])))
        try:
            self.forward(x)
        finally:
            h.remove()
        return seen[-1]

    def units_valid(self, batch: Batch) -> torch.Tensor:
        """Pixels that differ from the black baseline in some channel: deleting a pixel that is black already
        changes nothing, so like padding it is not part of the ranking (Fashion-MNIST's background; natural
        photographs have almost none)."""
        (x,) = batch.inputs
        return ((x - self.baseline(x)).abs().amax(dim=1) > 1e-6).reshape(len(x), -1)

    def remove(
        self, batch: Batch, removed: torch.Tensor, canvas: tuple[torch.Tensor, ...] | None = None
    ) -> tuple[torch.Tensor, ...]:
        (x,) = batch.inputs
        gone = removed.view(len(x), 1, *x.shape[-2:])
        return (torch.where(gone, canvas[0] if canvas is not None else self.baseline(x), x),)

    def insertion_canvas(self, batch: Batch) -> tuple[torch.Tensor, ...]:
        """A Gaussian blur of the image (sigma = a fourteenth of its height; RISE blurs 224-px images with 5)."""
        import torch.nn.functional as F

        (x,) = batch.inputs
        sigma = max(1.0, x.shape[-2] / 14)
        r = int(math.ceil(2 * sigma))
        g = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / sigma) ** 2)
        g = g / g.sum()
        C = x.shape[1]
        y = F.pad(x.float(), (r, r, r, r), mode="replicate")
        y = F.conv2d(y, g.view(1, 1, 1, -1).expand(C, 1, 1, -1).contiguous(), groups=C)
        y = F.conv2d(y, g.view(1, 1, -1, 1).expand(C, 1, -1, 1).contiguous(), groups=C)
        return (y.to(x.dtype),)

    def input_gradient_map(self, batch: Batch) -> torch.Tensor:
        """The Sobel edge magnitude of the input, summed over channels: it ignores the model entirely."""
        import torch.nn.functional as F

        (x,) = batch.inputs
        kx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]])
        k = torch.stack([kx, kx.t()]).unsqueeze(1)  # (2, 1, 3, 3)
        g = F.conv2d(x.float().reshape(-1, 1, *x.shape[-2:]), k, padding=1)
        edges = g.pow(2).sum(dim=1).sqrt().view(x.shape[0], x.shape[1], *x.shape[-2:]).sum(dim=1)
        return edges.reshape(len(x), -1)


# --------------------------------------------------------------------------------------------------- sequences
class SequenceExplainer(Explainer):
    """(B, T, F) standardised values with lengths: scores per time step x feature."""

    kind = "sequence"
    methods = ("saliency", "integrated_gradients", "occlusion", "lime", "kernel_shap")
    default = "integrated_gradients"

    def baseline_inputs(self, batch: Batch) -> tuple[torch.Tensor, ...]:
        return torch.zeros_like(batch.inputs[0]), batch.inputs[1]

    def describe(self, r, files, batch, i, units, attr, item, method, pictures) -> None:  # type: ignore[no-untyped-def]
        from bigmodel.explain import render

        L = int(batch.inputs[1][i])
        m = attr[:L].numpy()
        r["scores"] = [[round(float(v), 6) for v in row] for row in m]  # time step x feature
        r["steps"] = L
        if pictures:
            files["heatmap.png"] = render.matrix_png(m.T, method)  # features as rows, time to the right

    def attribute(self, method: str, batch: Batch, **options: Any) -> torch.Tensor:
        A = self.captum
        x, lengths = batch.inputs
        x = x.float().contiguous()
        t = batch.target
        args = (lengths,)
        # cuDNN RNNs cannot run backward in eval mode; on the CPU this is a no-op.
        with torch.backends.cudnn.flags(enabled=False):
            if method == "saliency":
                attr = A.Saliency(self.forward).attribute(x, target=t, abs=True, additional_forward_args=args)
            elif method == "integrated_gradients":
                attr = self.integrated_gradients(batch, x, torch.zeros_like(x), lengths, **options)
            elif method == "occlusion":
                attr = A.Occlusion(self.forward).attribute(
                    x,
                    sliding_window_shapes=(1, 1),
                    baselines=0.0,
                    target=t,
                    additional_forward_args=args,
                    perturbations_per_eval=64,
                )
            elif method in ("lime", "kernel_shap"):
                T = x.shape[1]
                mask = torch.arange(T).view(1, T, 1).expand(1, T, x.shape[2])  # one feature per time step
                attr = self.surrogate(method).attribute(
                    x,
                    baselines=0.0,
                    target=t,
                    additional_forward_args=args,
                    feature_mask=mask,
                    n_samples=int(options.get("n_samples", SAMPLES)),
                    perturbations_per_eval=int(options.get("perturbations_per_eval", PER_EVAL)),
                )
            else:
                self.check_method(method)
                raise AssertionError(method)
        return zero_padding(attr, lengths)

    def num_units(self, batch: Batch) -> int:
        return batch.inputs[0].shape[1] * batch.inputs[0].shape[2]

    def units_valid(self, batch: Batch) -> torch.Tensor:
        x, lengths = batch.inputs
        valid = torch.arange(x.shape[1])[None, :] < lengths[:, None]
        return valid[:, :, None].expand(-1, -1, x.shape[2]).reshape(len(x), -1)

    def remove(
        self, batch: Batch, removed: torch.Tensor, canvas: tuple[torch.Tensor, ...] | None = None
    ) -> tuple[torch.Tensor, ...]:
        x, lengths = batch.inputs
        return (x * (~removed).view_as(x).to(x.dtype), lengths)


# -------------------------------------------------------------------------------------------------------- text
class TextExplainer(Explainer):
    """Token ids (B, T) with lengths: one score per token. Gradient methods attribute to `input_embedding()`'s
    output (summed over the embedding: IG's completeness holds per token); perturbation methods replace tokens by
    the pad id. A leading [CLS] is scored but never removed (the pooled models read it)."""

    kind = "text"
    methods = ("saliency", "integrated_gradients", "occlusion", "lime", "kernel_shap")
    default = "integrated_gradients"

    def baseline_inputs(self, batch: Batch) -> tuple[torch.Tensor, ...]:
        ids, lengths = batch.inputs
        base = torch.full_like(ids, self.pad_id)
        if self.has_cls:
            base[:, 0] = ids[:, 0]
        return base, lengths

    def describe(self, r, files, batch, i, units, attr, item, method, pictures) -> None:  # type: ignore[no-untyped-def]
        from bigmodel.explain import render

        L = int(batch.inputs[1][i])
        toks = self.tokens(batch.inputs[0][i], L)
        scores = [float(v) for v in units[:L]]
        r["tokens"] = [{"token": t, "score": round(s, 6)} for t, s in zip(toks, scores, strict=True)]
        if pictures:
            title = f"{r['method_name']}: {r['target']['label']}"
            body = f"<h2>{title}</h2><p>{render.token_html(toks, scores, method)}</p>"
            files["tokens.html"] = render.page(title, body)

    def __init__(self, art: Any, model: nn.Module | None = None) -> None:
        super().__init__(art, model)
        shape = art.preprocess.input_shape if isinstance(art.preprocess.input_shape, dict) else {}
        self.pad_id = int(shape.get("pad_id", 0))
        self.has_cls = bool(shape.get("has_cls", False))
        emb = self.model.input_embedding() if hasattr(self.model, "input_embedding") else None
        # An EmbeddingBag pools inside the layer: no per-token output to attribute gradients to.
        self.embedding = emb if isinstance(emb, nn.Embedding) else None
        if self.embedding is None:
            self.methods = ("occlusion", "lime", "kernel_shap")
            self.default = "occlusion"

    def check_method(self, method: str) -> None:
        if method in ("saliency", "integrated_gradients") and self.embedding is None:
            name = self.art.config["model"]["name"]
            raise UserError(
                f"--method {method}: {name} pools its token embeddings inside one layer, so gradients have no "
                "per-token output; use occlusion, lime or kernel_shap"
            )
        super().check_method(method)

    def attribute(self, method: str, batch: Batch, **options: Any) -> torch.Tensor:
        A = self.captum
        ids, lengths = batch.inputs
        t = batch.target
        args = (lengths,)
        self.check_method(method)
        with torch.backends.cudnn.flags(enabled=False):
            if method == "integrated_gradients":
                lig = A.LayerIntegratedGradients(self.forward, self.embedding)
                base = torch.full_like(ids, self.pad_id)
                if self.has_cls:
                    base[:, 0] = ids[:, 0]
                attr = self.integrate(
                    batch,
                    lambda n, i: lig.attribute(
                        ids[i],
                        baselines=base[i],
                        target=t[i],
                        additional_forward_args=(lengths[i],),
                        n_steps=n,
                        internal_batch_size=4 * n,
                        return_convergence_delta=True,
                    ),
                    **options,
                ).sum(dim=-1)
            elif method == "saliency":
                grad = A.LayerGradientXActivation(self.forward, self.embedding, multiply_by_inputs=False)
                attr = grad.attribute(ids, target=t, additional_forward_args=args).norm(dim=-1)
            else:
                mask = torch.arange(ids.shape[1]).view(1, -1)
                if method == "occlusion":
                    attr = A.FeatureAblation(self.forward).attribute(
                        ids,
                        baselines=self.pad_id,
                        target=t,
                        additional_forward_args=args,
                        feature_mask=mask,
                        perturbations_per_eval=64,
                    )
                else:
                    attr = self.surrogate(method).attribute(
                        ids,
                        baselines=self.pad_id,
                        target=t,
                        additional_forward_args=args,
                        feature_mask=mask,
                        n_samples=int(options.get("n_samples", SAMPLES)),
                        perturbations_per_eval=int(options.get("perturbations_per_eval", PER_EVAL)),
                    )
        return zero_padding(attr.float(), lengths)

    def num_units(self, batch: Batch) -> int:
        return batch.inputs[0].shape[1]

    def units_valid(self, batch: Batch) -> torch.Tensor:
        ids, lengths = batch.inputs
        valid = torch.arange(ids.shape[1])[None, :] < lengths[:, None]
        if self.has_cls:
            valid[:, 0] = False
        return valid

    def remove(
        self, batch: Batch, removed: torch.Tensor, canvas: tuple[torch.Tensor, ...] | None = None
    ) -> tuple[torch.Tensor, ...]:
        """Delete the removed tokens (ERASER): the rest shift left, lengths shrink."""
        ids, lengths = batch.inputs
        valid = torch.arange(ids.shape[1])[None, :] < lengths[:, None]
        keep = valid & ~removed
        out = torch.full_like(ids, self.pad_id)
        new_len = keep.sum(dim=1)
        for i in range(len(ids)):
            kept = ids[i][keep[i]]
            out[i, : len(kept)] = kept
        return out, new_len.clamp(min=1)

    def tokens(self, ids: torch.Tensor, length: int) -> list[str]:
        tok = self.art.preprocess.tokenizer
        return [tok.id_to_token(int(i)) or "?" for i in ids[:length]]


# ------------------------------------------------------------------------------------------------------- tables
class TabularExplainer(Explainer):
    """(numeric (B, Fn), categorical (B, Fc)): one score per column. Numeric columns are ablated to 0 (the
    training mean, after standardisation), categorical ones to index 0 (not seen in training). Gradient methods
    apply when every column is numeric."""

    kind = "tabular"
    methods = ("occlusion", "lime", "kernel_shap", "saliency", "integrated_gradients")
    default = "occlusion"

    def baseline_inputs(self, batch: Batch) -> tuple[torch.Tensor, ...]:
        return torch.zeros_like(batch.inputs[0]), batch.inputs[1]

    def describe(self, r, files, batch, i, units, attr, item, method, pictures) -> None:  # type: ignore[no-untyped-def]
        cols = self.columns()
        scores = [float(v) for v in units]
        values = item if isinstance(item, dict) else {}
        order = sorted(range(len(cols)), key=lambda j: -abs(scores[j]))
        r["columns"] = [{"column": cols[j], "value": values.get(cols[j]), "score": round(scores[j], 6)} for j in order]

    def columns(self) -> list[str]:
        shape = self.art.preprocess.input_shape
        return list(shape["numeric"]) + list(shape["categorical"])

    def _masks(self, num: torch.Tensor, cat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, m = num.shape[1], cat.shape[1]
        return torch.arange(n).view(1, n), (n + torch.arange(m)).view(1, m)

    def attribute(self, method: str, batch: Batch, **options: Any) -> torch.Tensor:
        A = self.captum
        num, cat = batch.inputs
        num = num.float()
        t = batch.target
        self.check_method(method)
        if method in ("saliency", "integrated_gradients"):
            if cat.shape[1]:
                names = list(self.art.preprocess.input_shape["categorical"])
                raise UserError(
                    f"--method {method}: categorical columns ({', '.join(names)}) have no gradient; "
                    "use occlusion, lime or kernel_shap for this table"
                )
            if method == "saliency":
                return A.Saliency(self.forward).attribute(num, target=t, additional_forward_args=(cat,))
            return self.integrated_gradients(batch, num, torch.zeros_like(num), cat, **options)
        masks = self._masks(num, cat)
        kw: dict[str, Any] = {"baselines": (0.0, 0), "target": t, "feature_mask": masks}
        if method == "occlusion":
            out = A.FeatureAblation(self.forward).attribute((num, cat), perturbations_per_eval=64, **kw)
        else:
            out = self.surrogate(method).attribute(
                (num, cat),
                n_samples=int(options.get("n_samples", SAMPLES)),
                perturbations_per_eval=int(options.get("perturbations_per_eval", PER_EVAL)),
                **kw,
            )
        return torch.cat([o.float() for o in out], dim=1)

    def num_units(self, batch: Batch) -> int:
        return batch.inputs[0].shape[1] + batch.inputs[1].shape[1]

    def remove(
        self, batch: Batch, removed: torch.Tensor, canvas: tuple[torch.Tensor, ...] | None = None
    ) -> tuple[torch.Tensor, ...]:
        num, cat = batch.inputs
        n = num.shape[1]
        return num * (~removed[:, :n]).to(num.dtype), cat * (~removed[:, n:]).to(cat.dtype)


KINDS: dict[str, type[Explainer]] = {
    "image": ImageExplainer,
    "sequence": SequenceExplainer,
    "text": TextExplainer,
    "tabular": TabularExplainer,
}


def register_explainer(kind: str, cls: type[Explainer]) -> None:
    KINDS[kind] = cls


def explainer_for(art: Any) -> Explainer:
    """The explainer of an artifact's input kind (its model copied; the artifact's model is never touched)."""
    check_artifact(art)
    if art.kind == "lm":
        from bigmodel.explain.lm import LanguageModelExplainer

        return LanguageModelExplainer(art)
    if art.kind not in KINDS:
        kinds = ", ".join(sorted(KINDS))
        raise UserError(f"{art.folder}: explain takes {kinds} classifiers and language models, not {art.kind} models")
    return KINDS[art.kind](art)
