"""`bigmodel compress`: prune, quantize or distill a trained run into a NEW run directory, with a before/after report
that measures instead of assuming (size on disk, parameters, CPU latency p50 at batch 1 and 32, test metrics) and
says plainly when the result is bigger, slower or worse.

- `prune --structured` (cnn-small / seed-cnn): removes the lowest-|BN γ| (else lowest-L1) channels of every conv for
  real — a smaller dense model whose config says the new widths — then fine-tunes.
- `prune` (unstructured): global magnitude pruning of conv / linear weights, fine-tuned with the mask held. The file
  and the latency do not change (dense storage); the report shows that.
- `quantize`: dynamic int8 Linear / LSTM and int8 embedding tables (deploy/quantize.py); `--static`: static int8 for
  convnets through ONNX Runtime (deploy/ort.py).
- `distill`: train a student recipe against the teacher's softened outputs (KD loss, temperature, alpha).
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bigmodel.errors import UserError
from bigmodel.fileio import write_json_atomic
from bigmodel.runs import artifact_dir, load_artifact, require_run_dir, save_artifact


# ----------------------------------------------------------------------------------------------------- measuring
def artifact_bytes(folder: Path) -> int:
    """Bytes of the model's weights on disk (safetensors, or the ONNX graph for an ONNX Runtime artifact)."""
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file() and f.suffix in (".safetensors", ".onnx"))


def count_params(model: nn.Module) -> int:
    """Parameters and int8 weight buffers (a quantized model keeps its weights as buffers)."""
    if hasattr(model, "onnx_path"):  # ONNX Runtime artifact: count the graph's weight initializers
        import onnx
        from onnx import numpy_helper

        graph = onnx.load(str(model.onnx_path)).graph
        kinds = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.FLOAT)
        return sum(int(numpy_helper.to_array(t).size) for t in graph.initializer if t.data_type in kinds and t.dims)
    n = sum(p.numel() for p in model.parameters())
    int8_names = ("weight_int8", "w_ih_", "w_hh_")  # Int8Linear / Int8Embedding / Int8LSTM weights
    n += sum(b.numel() for name, b in model.named_buffers() if name.rsplit(".", 1)[-1].startswith(int8_names))
    return n


def latency_p50(sig: Any, batch: int, repeats: int = 30) -> float:
    """Median seconds of one forward pass at `batch` through the export signature's module (the artifact's
    preprocessing and inference path), eval and inference mode."""
    model = sig.module.eval()
    args = sig.select(torch.arange(batch) % len(sig.inputs[0]))
    times = []
    with torch.inference_mode():
        for _ in range(5):
            model(*args)
        for _ in range(repeats):
            t = time.perf_counter()
            model(*args)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(run_dir: Path) -> dict[str, Any]:
    from bigmodel.api import evaluate
    from bigmodel.deploy.export import signature

    art = load_artifact(run_dir)
    m = evaluate(run_dir, "test")
    sig = signature(art, run_dir, 256)
    return {
        "size_bytes": artifact_bytes(artifact_dir(run_dir)),
        "parameters": count_params(art.model),
        "latency_ms_b1": round(1000 * latency_p50(sig, 1), 4),
        "latency_ms_b32": round(1000 * latency_p50(sig, 32), 4),
        "accuracy": m["accuracy"],
        "macro_f1": m["macro_f1"],
    }


# ------------------------------------------------------------------------------------------------------- pruning
def _conv_bn_pairs(features: nn.Sequential) -> list[tuple[nn.Conv2d, nn.BatchNorm2d | None]]:
    mods = list(features)
    pairs = []
    for i, m in enumerate(mods):
        if isinstance(m, nn.Conv2d):
            bn = next((n for n in mods[i + 1 : i + 4] if isinstance(n, nn.BatchNorm2d)), None)
            nxt_conv = next((j for j in range(i + 1, len(mods)) if isinstance(mods[j], nn.Conv2d)), len(mods))
            if bn is not None and mods.index(bn) > nxt_conv:
                bn = None
            pairs.append((m, bn))
    return pairs


def _keep(conv: nn.Conv2d, bn: nn.BatchNorm2d | None, k: int) -> torch.Tensor:
    score = bn.weight.detach().abs() if bn is not None else conv.weight.detach().abs().sum(dim=(1, 2, 3))
    return torch.sort(torch.topk(score, k).indices).values


@torch.no_grad()
def prune_channels(model: nn.Module, new_model: nn.Module) -> None:
    """Copy the surviving channels of `model` into `new_model` (same layout, narrower convs): each conv keeps its
    most important output channels (|BN γ|, network slimming; else filter L1) and the matching input channels of the
    next conv and of the head."""
    old_pairs, new_pairs = _conv_bn_pairs(model.features), _conv_bn_pairs(new_model.features)
    prev = torch.arange(old_pairs[0][0].in_channels)
    for (oc, ob), (nc, nb) in zip(old_pairs, new_pairs, strict=True):
        keep = _keep(oc, ob, nc.out_channels)
        nc.weight.copy_(oc.weight[keep][:, prev])
        if oc.bias is not None:
            nc.bias.copy_(oc.bias[keep])
        if ob is not None and nb is not None:
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(nb, name).copy_(getattr(ob, name)[keep])
            nb.num_batches_tracked.copy_(ob.num_batches_tracked)
        prev = keep
    old_lin = next(m for m in model.head if isinstance(m, nn.Linear))
    new_lin = next(m for m in new_model.head if isinstance(m, nn.Linear))
    if old_lin.in_features == old_pairs[-1][0].out_channels:  # cnn-small: global pooling → one feature per channel
        new_lin.weight.copy_(old_lin.weight[:, prev])
        new_lin.bias.copy_(old_lin.bias)
    else:  # seed-cnn: flatten of C x H x W → keep the kept channels' blocks, then the rest of the head as is
        hw = old_lin.in_features // old_pairs[-1][0].out_channels
        cols = (prev[:, None] * hw + torch.arange(hw)[None, :]).flatten()
        new_lin.weight.copy_(old_lin.weight[:, cols])
        new_lin.bias.copy_(old_lin.bias)
        old_rest = [m for m in model.head if isinstance(m, nn.Linear)][1:]
        new_rest = [m for m in new_model.head if isinstance(m, nn.Linear)][1:]
        for a, b in zip(old_rest, new_rest, strict=True):
            b.load_state_dict(a.state_dict())


def narrower_options(name: str, options: dict[str, Any], ratio: float) -> dict[str, Any]:
    def k(w: int) -> int:
        return max(1, round(w * (1.0 - ratio)))

    if name == "cnn-small":
        from bigmodel.models.cnn import CNNSmallConfig

        widths = options.get("widths", CNNSmallConfig().widths)
        return {**options, "widths": [k(w) for w in widths]}
    if name == "seed-cnn":
        from bigmodel.models.cnn import SeedCNNConfig

        d = SeedCNNConfig(**options)
        return {**options, "conv1_channels": k(d.conv1_channels), "conv2_channels": k(d.conv2_channels)}
    raise UserError(f"structured pruning supports cnn-small and seed-cnn, not {name!r} (use unstructured pruning)")


class MaskCallback:
    """Holds pruned weights at zero during fine-tuning (re-applied after every optimizer step)."""

    def __init__(self, masks: dict[str, torch.Tensor]) -> None:
        self.masks = masks

    def on_fit_start(self, trainer: Any) -> None: ...
    def on_eval_end(self, trainer: Any, metrics: dict[str, Any]) -> None: ...
    def on_fit_end(self, trainer: Any) -> None: ...

    @torch.no_grad()
    def on_step_end(self, trainer: Any, loss: float | None) -> None:
        params = dict(trainer.model.named_parameters())
        for name, mask in self.masks.items():
            params[name].mul_(mask.to(params[name].device))


@torch.no_grad()
def magnitude_masks(model: nn.Module, amount: float, scope: str) -> dict[str, torch.Tensor]:
    """Masks zeroing the `amount` smallest-|w| weights of convs and linears, globally or per layer."""
    weights = {f"{name}.weight": m.weight for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    masks = {}
    if scope == "global":
        allw = torch.cat([w.abs().flatten() for w in weights.values()])
        k = int(amount * allw.numel())
        thr = torch.kthvalue(allw, k).values if k > 0 else torch.tensor(-1.0)
        for n, w in weights.items():
            masks[n] = (w.abs() > thr).to(w.dtype)
    else:
        for n, w in weights.items():
            k = int(amount * w.numel())
            thr = torch.kthvalue(w.abs().flatten(), k).values if k > 0 else torch.tensor(-1.0)
            masks[n] = (w.abs() > thr).to(w.dtype)
    for n, w in weights.items():
        w.mul_(masks[n])
    return masks


# -------------------------------------------------------------------------------------------------- distillation
class DistillationTask:
    """loss = alpha · T² · KL(softmax(teacher/T) ‖ softmax(student/T)) + (1 − alpha) · CE(student, y)
    (Hinton et al. 2015). The teacher runs in eval mode without gradients on the same batch."""

    def __init__(self, base: Any, teacher: nn.Module, temperature: float, alpha: float) -> None:
        self.base, self.teacher, self.T, self.alpha = base, teacher.eval(), temperature, alpha
        self.name = base.name

    def loss(self, model: nn.Module, batch: tuple[Any, torch.Tensor]) -> torch.Tensor:
        from bigmodel.tasks.classification import forward

        x, y = batch
        logits = forward(model, x).float()
        with torch.no_grad():
            t = forward(self.teacher, x).float()
        kd = F.kl_div(
            F.log_softmax(logits / self.T, dim=1),
            F.log_softmax(t / self.T, dim=1),
            reduction="batchmean",
            log_target=True,
        ) * (self.T**2)
        ce = F.cross_entropy(logits, y) if y.ndim == 1 else -(y * logits.log_softmax(1)).sum(1).mean()
        return self.alpha * kd + (1 - self.alpha) * ce

    def new_metrics(self, device: Any = "cpu") -> Any:
        return self.base.new_metrics(device)

    def eval_batch(self, model: nn.Module, batch: Any, metrics: Any) -> None:
        self.base.eval_batch(model, batch, metrics)


# ----------------------------------------------------------------------------------------------------------- main
def _new_run(src: Path, out: Path) -> Path:
    from bigmodel.runs import new_run_dir

    if out.resolve() == src.resolve():
        raise UserError(f"--out {out}: compress never overwrites its input; give a new folder")
    dst = new_run_dir(out, out.name)
    shutil.copy2(src / "recipe.yaml", dst / "recipe.yaml")
    if (src / "env.json").is_file():
        shutil.copy2(src / "env.json", dst / "env.json")
    return dst


def _finetune(recipe: Any, model: nn.Module, epochs: int | str, callbacks: list[Any], task: Any = None) -> None:
    """Train `model` in place on the recipe's data for `epochs` (no run directory: nothing is written)."""
    from bigmodel.api import build_experiment

    r = recipe.model_copy(deep=True)
    r.train.epochs = epochs
    r.train.early_stopping = None
    exp = build_experiment(r)
    if task is not None:
        exp.task = task(exp.task)
    trainer = exp.trainer(model=model, callbacks=callbacks)
    trainer.fit()
    model.load_state_dict(trainer.model.state_dict())


def compress(
    run_dir: str | Path,
    method: str,
    out: str | Path,
    *,
    amount: float = 0.5,
    structured: bool = False,
    scope: str = "global",
    finetune_epochs: int = 2,
    mode: str = "dynamic",
    static: bool = False,
    calibration: int = 512,
    student: str | Path | None = None,
    temperature: float = 4.0,
    alpha: float = 0.7,
) -> dict[str, Any]:
    from bigmodel.config import load_recipe, read_yaml, validate_recipe
    from bigmodel.deploy.export import refuse_unexportable
    from bigmodel.models import build_model
    from bigmodel.models.base import Capability
    from bigmodel.registry import get_model

    src = require_run_dir(run_dir)
    recipe = validate_recipe(read_yaml(src / "recipe.yaml"), source=str(src / "recipe.yaml"))
    art = load_artifact(src)
    refuse_unexportable(src, art, "compress")
    if art.can(Capability.TRANSCRIBES):
        raise UserError(f"{src}: a speech recognition model; compress supports classifiers so far")
    if art.config.get("quantization"):
        raise UserError(f"{src}: already quantized; compress the fp32 run it came from")
    if method not in ("prune", "quantize", "distill"):
        raise UserError(f"--method {method!r}: expected prune, quantize or distill")
    if not 0.0 < amount < 1.0:
        raise UserError(f"--amount {amount}: expected a fraction between 0 and 1")
    before = measure(src)
    dst = _new_run(src, Path(out))
    model = art.model.train()
    model_cfg = dict(art.config["model"])
    extra: dict[str, Any] = {k: art.config[k] for k in ("pii_mask",) if k in art.config}  # inputs masked alike
    details: dict[str, Any] = {"method": method}
    torch.manual_seed(recipe.seed)
    if method == "prune" and structured:
        name = model_cfg["name"]
        opts = narrower_options(name, {k: v for k, v in model_cfg.items() if k != "name"}, amount)
        new = build_model(name, opts, art.config["input_shape"], art.config["num_classes"])
        prune_channels(model.eval(), new)
        model, model_cfg = new, {"name": name, **opts}
        recipe.model = recipe.model.model_validate({"name": name, **opts})
        details.update(structured=True, amount=amount, finetune_epochs=finetune_epochs)
        if finetune_epochs:
            _finetune(recipe, model, finetune_epochs, [])
    elif method == "prune":
        masks = magnitude_masks(model, amount, scope)
        details.update(structured=False, amount=amount, scope=scope, finetune_epochs=finetune_epochs)
        if finetune_epochs:
            _finetune(recipe, model, finetune_epochs, [MaskCallback(masks)])
        zeros = sum(int((m == 0).sum()) for m in masks.values())
        details["zeroed_weights"] = zeros
    elif method == "quantize" and static:
        if not get_model(model_cfg["name"]).can(Capability.CONVNET):
            raise UserError(
                f"--static: static int8 (calibrated) is for image models (convnets); {model_cfg['name']!r} is not one "
                "(use the dynamic mode)"
            )
        from bigmodel.api import prepare_data
        from bigmodel.deploy.ort import calibration_images, quantize_static_onnx

        data, _ = prepare_data(recipe, art.preprocess)
        calib = calibration_images(data, art.normalizer, calibration, recipe.seed)
        onnx_path = dst / "model.int8.onnx"
        quantize_static_onnx(art.model.eval(), calib, onnx_path)  # flip-TTA stays in preprocess
        extra["runtime"] = "onnxruntime"
        extra["quantization"] = {"method": "static-int8", "engine": "onnxruntime", "calibration_images": len(calib)}
        details.update(mode="static", calibration_images=len(calib))
        save_artifact(
            dst / "model", None, recipe.task, model_cfg, art.preprocess, extra=extra, files={"model.onnx": onnx_path}
        )
        onnx_path.unlink()
        model = None
    elif method == "quantize":
        from bigmodel.deploy.quantize import MODES, quantize_model

        if mode not in MODES:
            raise UserError(f"--mode {mode!r}: expected one of {', '.join(MODES)}")
        model, replaced = quantize_model(model.eval(), mode)
        if not replaced:
            raise UserError(f"{model_cfg['name']}: no Linear or Embedding layers to quantize")
        extra["quantization"] = {"method": "int8", "mode": mode, "modules": replaced}
        details.update(mode=mode, quantized_modules=len(replaced))
    else:
        if student is None:
            raise UserError("--method distill needs --student RECIPE.yaml (the smaller model to train)")
        srec = load_recipe(student)
        if srec.data.model_dump() != recipe.data.model_dump() or srec.task != recipe.task or srec.seed != recipe.seed:
            raise UserError(f"--student {student}: its task, data block and seed must equal the teacher run's")
        teacher = art.model.eval()
        torch.manual_seed(srec.seed)  # the student's init as `bigmodel train` draws it; data is loaded once, below
        model = build_model(srec.model.name, srec.model.options, art.preprocess.input_shape, len(art.labels))
        model_cfg = {"name": srec.model.name, **srec.model.options}
        _finetune(
            srec, model, srec.train.epochs, [], task=lambda base: DistillationTask(base, teacher, temperature, alpha)
        )
        from bigmodel.api import _recipe_yaml
        from bigmodel.fileio import write_text_atomic

        write_text_atomic(dst / "recipe.yaml", _recipe_yaml(srec))
        recipe = srec
        details.update(student=str(student), temperature=temperature, alpha=alpha, epochs=srec.train.epochs)
    if method == "prune" and structured:
        from bigmodel.api import _recipe_yaml
        from bigmodel.fileio import write_text_atomic

        write_text_atomic(dst / "recipe.yaml", _recipe_yaml(recipe))
    if model is not None:
        save_artifact(dst / "model", model.eval(), recipe.task, model_cfg, art.preprocess, extra=extra)
    after = measure(dst)
    report = _report(before, after, details, src, dst)
    write_json_atomic(dst / "compress.json", report)
    write_json_atomic(
        dst / "summary.json",
        {
            "run_dir": str(dst),
            "split": "test",
            "metrics": {"accuracy": after["accuracy"], "macro_f1": after["macro_f1"]},
            "compressed_from": str(src),
        },
    )
    return report


def _report(
    before: dict[str, Any], after: dict[str, Any], details: dict[str, Any], src: Path, dst: Path
) -> dict[str, Any]:
    verdict = []
    size = after["size_bytes"] / before["size_bytes"]
    sp1 = before["latency_ms_b1"] / after["latency_ms_b1"]
    sp32 = before["latency_ms_b32"] / after["latency_ms_b32"]
    dacc = 100 * (after["accuracy"] - before["accuracy"])
    verdict.append(f"size x{size:.2f}" + (" (NOT smaller)" if size >= 0.99 else ""))
    for b, sp in (("1", sp1), ("32", sp32)):
        verdict.append(
            f"batch-{b} speed x{sp:.2f}" + (" (SLOWER)" if sp < 0.97 else " (no faster)" if sp < 1.03 else "")
        )
    verdict.append(f"accuracy {dacc:+.2f} points" + (" (WORSE)" if dacc < -0.05 else ""))
    return {
        "source": str(src),
        "output": str(dst),
        **details,
        "before": before,
        "after": after,
        "size_ratio": size,
        "speedup_b1": sp1,
        "speedup_b32": sp32,
        "accuracy_change_points": dacc,
        "verdict": "; ".join(verdict),
        "threads": torch.get_num_threads(),
        "pid": os.getpid(),
    }


def print_report(report: dict[str, Any]) -> str:
    b, a = report["before"], report["after"]
    rows = [
        ("size on disk (bytes)", f"{b['size_bytes']:,}", f"{a['size_bytes']:,}"),
        ("parameters", f"{b['parameters']:,}", f"{a['parameters']:,}"),
        ("latency p50 batch 1 (ms)", f"{b['latency_ms_b1']:.3f}", f"{a['latency_ms_b1']:.3f}"),
        ("latency p50 batch 32 (ms)", f"{b['latency_ms_b32']:.3f}", f"{a['latency_ms_b32']:.3f}"),
        ("test accuracy", f"{b['accuracy']:.4f}", f"{a['accuracy']:.4f}"),
        ("test macro-F1", f"{b['macro_f1']:.4f}", f"{a['macro_f1']:.4f}"),
    ]
    w = max(len(r[0]) for r in rows)
    lines = [f"{'':{w}}  {'before':>14}  {'after':>14}"] + [f"{n:{w}}  {x:>14}  {y:>14}" for n, x, y in rows]
    lines.append(f"verdict: {report['verdict']}")
    return "\n".join(lines)
