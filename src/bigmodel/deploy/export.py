"""Export a trained model (ONNX, TorchScript, torch.export) with a dynamic batch axis, and prove it: the exported
model runs on real test inputs of the run and must match the eager fp32 model within a tolerance.

The task spec says what the graph takes (`TaskSpec.export_signature`): an image model takes raw pixel values (float,
0..255, shape (B, C, H, W)) — normalisation (and flip TTA) are inside. Sequence and text models take `(x, lengths)`:
standardised features (B, T, F) or token ids (B, T), exactly what `Artifact.prepare_sequences` / `encode_texts`
produce. Tables take raw numbers (B, Fn) and category indices (B, Fc), standardised inside; `preprocess.json` (the
vocabularies) and `tokenizer.json` travel in the bundle. The bundle (the edge bundle) holds the model file,
`preprocess.json`, `labels.json`, `config.json`, `tokenizer.json` (text), `lm.json` (speech with a character LM) and
`export.json` (format, inputs, the parity figures).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from bigmodel.errors import UserError
from bigmodel.models.base import Capability
from bigmodel.registry import get_model
from bigmodel.runs import Artifact, artifact_dir, load_artifact
from bigmodel.tasks import get_task
from bigmodel.tasks.base import ExportSignature
from bigmodel.tasks.image import ImageExport  # noqa: F401 (the image graph wrapper; benchmarks/deploy.py uses it)

FORMATS = ("onnx", "torchscript", "exported-program")
FILENAMES = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt", "exported-program": "model.pt2"}


def signature(art: Artifact, run_dir: Path | None, n: int) -> ExportSignature:
    """The task spec's export signature over up to `n` real test inputs of the run (its recipe rebuilds the split)."""
    from bigmodel.api import prepare_data
    from bigmodel.config import read_yaml, validate_recipe

    if run_dir is None or not (run_dir / "recipe.yaml").is_file():
        raise UserError(f"{art.folder}: export checks parity on the run's test inputs; pass the run directory")
    recipe = validate_recipe(read_yaml(run_dir / "recipe.yaml"), source=str(run_dir / "recipe.yaml"))
    data, _ = prepare_data(recipe, art.preprocess)
    return get_task(recipe.task).export_signature(art, data, n)


def check_inputs(art: Artifact, run_dir: Path | None, n: int) -> tuple[torch.Tensor, ...]:
    """Up to `n` real test inputs of the run, in the exported graph's input form."""
    return signature(art, run_dir, n).inputs


def refuse_unexportable(src: Path, art: Artifact, verb: str) -> None:
    """One line when the task or the model does not export / compress (generative tasks, pretrained hf models)."""
    spec = get_task(art.config["task"])
    if spec.generative:
        raise UserError(f"{src}: a {spec.name.replace('_', ' ')} model; {verb} supports classifiers so far")
    name = art.config.get("model", {}).get("name")
    if name is not None and not get_model(name).can(Capability.EXPORTABLE):
        raise UserError(f"{src}: model.name {name!r} ({get_model(name).description}); {verb} does not take these yet")


def _outputs(out: Any) -> tuple[torch.Tensor, ...]:
    """A graph's output(s) as a tuple of tensors (floats as float32, to compare)."""
    outs = tuple(out) if isinstance(out, tuple | list) else (out,)
    return tuple(o.float() if o.is_floating_point() else o for o in outs)


def _run_exported(fmt: str, path: Path, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    if fmt == "onnx":
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]
        feed = {name: t.numpy() for name, t in zip(names, inputs, strict=True)}
        return _outputs([torch.from_numpy(o) for o in sess.run(None, feed)])
    if fmt == "torchscript":
        m = torch.jit.load(str(path), map_location="cpu")
        with torch.inference_mode():
            return _outputs(m(*inputs))
    ep = torch.export.load(str(path))
    with torch.inference_mode():
        return _outputs(ep.module()(*inputs))


def max_difference(ref: tuple[torch.Tensor, ...], got: tuple[torch.Tensor, ...]) -> float:
    """The largest absolute difference over every output (inf when the outputs' number or shapes differ)."""
    if len(ref) != len(got) or any(r.shape != g.shape for r, g in zip(ref, got, strict=True)):
        return float("inf")
    return max(
        (float((r.double() - g.double()).abs().max()) if r.numel() else 0.0) for r, g in zip(ref, got, strict=True)
    )


def export(
    run_dir: str | Path,
    fmt: str,
    out: str | Path,
    *,
    tolerance: float = 1e-4,
    n_check: int = 256,
    opset: int | None = None,
) -> dict[str, Any]:
    """Export the run's model to `out` (a new folder) and check it on real test inputs. Returns the report; raises
    `UserError` (after writing the report) when the exported outputs differ from eager by more than `tolerance`."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    src = Path(run_dir)
    art = load_artifact(src)
    refuse_unexportable(src, art, "export")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out}: already exists and is not empty")
    run = src if (src / "recipe.yaml").is_file() else (src.parent if (src.parent / "recipe.yaml").is_file() else None)
    sig = signature(art, run, n_check)
    inputs, names, wrapper = sig.inputs, sig.names, sig.module.eval()

    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    path = tmp / FILENAMES[fmt]
    t0 = time.perf_counter()
    import logging
    import warnings

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # e.g. "torchvision is not installed" notes
    logging.getLogger("torch.export").setLevel(logging.ERROR)
    with warnings.catch_warnings():  # exporter deprecation chatter is not the user's business
        warnings.simplefilter("ignore")
        try:
            if fmt == "onnx":
                prog = torch.onnx.export(
                    wrapper,
                    inputs,
                    dynamo=True,
                    input_names=names,
                    output_names=list(sig.outputs or {"logits": None}),
                    dynamic_shapes=sig.dynamic_shapes,
                    opset_version=opset,
                    verbose=False,
                )
                prog.save(str(path))
            elif fmt == "torchscript":
                with torch.no_grad():
                    torch.jit.save(torch.jit.trace(wrapper, inputs, check_trace=False), str(path))
            else:
                ep = torch.export.export(wrapper, inputs, dynamic_shapes=sig.dynamic_shapes)
                torch.export.save(ep, str(path))
        except UserError:
            raise
        except Exception as e:  # exporters raise many types; the user needs the model name and the first line
            shutil.rmtree(tmp, ignore_errors=True)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(
                f"{art.config['model']['name']}: export to {fmt} failed ({type(e).__name__}: {first})"
            ) from None
    export_s = time.perf_counter() - t0

    with torch.inference_mode():
        ref = _outputs(wrapper(*inputs))
    got = _run_exported(fmt, path, inputs)
    one = sig.batch_one()  # the batch axis really is dynamic
    with torch.inference_mode():
        ref1 = _outputs(wrapper(*one))
    got1 = _run_exported(fmt, path, one)
    diff = max(max_difference(ref, got), max_difference(ref1, got1))
    ok = diff <= tolerance
    outputs = [
        {"name": name, "shape": shape}
        for name, shape in (sig.outputs or {"logits": ["batch", len(art.labels)]}).items()
    ]
    report = {
        "format": fmt,
        "file": FILENAMES[fmt],
        "kind": art.kind,
        "model": art.config["model"],
        "inputs": [
            {"name": n, "shape": shape, "dtype": str(t.dtype).removeprefix("torch.")}
            for n, t, shape in zip(names, inputs, sig.shapes, strict=True)
        ],
        "output": outputs[0],  # the first (classifiers: the only) output
        "outputs": outputs,
        "parity": {
            "checked_inputs": int(inputs[0].shape[0]),
            "also_batch_1": True,
            "max_abs_diff": diff,
            "tolerance": tolerance,
            "passed": ok,
        },
        "export_time_s": round(export_s, 3),
    }
    folder = artifact_dir(src)
    for name in ("preprocess.json", "config.json", "tokenizer.json", "lm.json"):
        if (folder / name).is_file():
            shutil.copy2(folder / name, tmp / name)
    (tmp / "labels.json").write_text(json.dumps(art.labels, indent=2) + "\n", encoding="utf-8")
    (tmp / "export.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    os.rename(tmp, out)
    if not ok:
        raise UserError(
            f"{out}: parity check FAILED: exported {fmt} differs from eager by {diff:.3g} (tolerance {tolerance:g}) "
            f"on {report['parity']['checked_inputs']} test inputs; the bundle is kept for inspection (export.json)"
        )
    return report
