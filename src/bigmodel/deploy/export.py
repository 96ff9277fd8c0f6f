"""Export a trained model (ONNX, TorchScript, torch.export) with a dynamic batch axis, and prove it: the exported
model runs on real test inputs of the run and must match the eager fp32 model within a tolerance.

The exported graph for an image model takes raw pixel values (float, 0..255, shape (B, C, H, W)) — normalisation
(and flip TTA) are inside. Sequence and text models take `(x, lengths)`: standardised features (B, T, F) or token ids
(B, T), exactly what `Artifact.prepare_sequences` / `encode_texts` produce; `preprocess.json` and `tokenizer.json`
travel in the bundle. The bundle (the edge bundle) holds the model file, `preprocess.json`, `labels.json`,
`config.json`, `tokenizer.json` (text) and `export.json` (format, inputs, the parity figures).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bigmodel.errors import UserError
from bigmodel.runs import Artifact, artifact_dir, load_artifact

FORMATS = ("onnx", "torchscript", "exported-program")
FILENAMES = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt", "exported-program": "model.pt2"}


class ImageExport(nn.Module):
    """Raw pixels (B, C, H, W) float 0..255 → logits: the artifact's normalisation and TTA inside the graph."""

    def __init__(self, art: Artifact) -> None:
        super().__init__()
        C = len(art.preprocess.mean or [])
        mean = torch.tensor(art.preprocess.mean, dtype=torch.float32).view(1, C, 1, 1)
        std = torch.tensor(art.preprocess.std, dtype=torch.float32).view(1, C, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std))
        self.register_buffer("shift", -mean / std)
        self.model = art.inference_model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x * self.scale + self.shift)


class SequenceExport(nn.Module):
    def __init__(self, art: Artifact) -> None:
        super().__init__()
        self.model = art.model

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.model(x, lengths)


def check_inputs(art: Artifact, run_dir: Path | None, n: int) -> tuple[torch.Tensor, ...]:
    """Up to `n` real test inputs of the run (its recipe rebuilds the split), in the exported graph's input form."""
    from bigmodel.api import prepare_data
    from bigmodel.config import read_yaml, validate_recipe

    if run_dir is None or not (run_dir / "recipe.yaml").is_file():
        raise UserError(f"{art.folder}: export checks parity on the run's test inputs; pass the run directory")
    recipe = validate_recipe(read_yaml(run_dir / "recipe.yaml"), source=str(run_dir / "recipe.yaml"))
    data, _ = prepare_data(recipe, art.preprocess)
    test = data.split("test")
    k = min(n, len(test))
    if art.kind == "image":
        return (test.x[:k].to(torch.float32),)
    lengths = test.lengths[:k]
    return (test.x[:k][:, : int(lengths.max())], lengths)


def _dynamic_shapes(kind: str) -> Any:
    batch = torch.export.Dim("batch", min=1, max=65_536)
    if kind == "image":
        return ({0: batch},)
    steps = torch.export.Dim("steps", min=1, max=65_536)
    return ({0: batch, 1: steps}, {0: batch})


def _run_exported(fmt: str, path: Path, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    if fmt == "onnx":
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]
        feed = {name: t.numpy() for name, t in zip(names, inputs, strict=True)}
        return torch.from_numpy(sess.run(None, feed)[0])
    if fmt == "torchscript":
        m = torch.jit.load(str(path), map_location="cpu")
        with torch.inference_mode():
            return m(*inputs)
    ep = torch.export.load(str(path))
    with torch.inference_mode():
        return ep.module()(*inputs)


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
    if art.kind in ("lm", "translation"):
        raise UserError(
            f"{src}: a {'language' if art.kind == 'lm' else 'translation'} model; "
            f"export supports classifiers (image, sequence, text) so far"
        )
    if art.config.get("model", {}).get("name") == "hf":
        raise UserError(f"{src}: a pretrained Hugging Face model (model.name hf); export does not take these yet")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out}: already exists and is not empty")
    run = src if (src / "recipe.yaml").is_file() else (src.parent if (src.parent / "recipe.yaml").is_file() else None)
    inputs = check_inputs(art, run, n_check)
    wrapper = (ImageExport(art) if art.kind == "image" else SequenceExport(art)).eval()
    names = ["pixels"] if art.kind == "image" else ["x", "lengths"]

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
                    output_names=["logits"],
                    dynamic_shapes=_dynamic_shapes(art.kind),
                    opset_version=opset,
                    verbose=False,
                )
                prog.save(str(path))
            elif fmt == "torchscript":
                with torch.no_grad():
                    torch.jit.save(torch.jit.trace(wrapper, inputs, check_trace=False), str(path))
            else:
                ep = torch.export.export(wrapper, inputs, dynamic_shapes=_dynamic_shapes(art.kind))
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
        ref = wrapper(*inputs).float()
    got = _run_exported(fmt, path, inputs).float()
    one = tuple(t[:1] for t in inputs)  # the batch axis really is dynamic
    if art.kind != "image":
        one = (one[0][:, : int(one[1].max())], one[1])
    with torch.inference_mode():
        ref1 = wrapper(*one).float()
    got1 = _run_exported(fmt, path, one).float()
    diff = max(float((ref - got).abs().max()), float((ref1 - got1).abs().max()))
    ok = diff <= tolerance and got.shape == ref.shape
    report = {
        "format": fmt,
        "file": FILENAMES[fmt],
        "kind": art.kind,
        "model": art.config["model"],
        "inputs": [
            {
                "name": n,
                "shape": ["batch", *list(t.shape[1:])]
                if art.kind == "image"
                else ["batch", "steps", *list(t.shape[2:])][: t.dim()],
                "dtype": str(t.dtype).removeprefix("torch."),
            }
            for n, t in zip(names, inputs, strict=True)
        ],
        "output": {"name": "logits", "shape": ["batch", len(art.labels)]},
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
    for name in ("preprocess.json", "config.json", "tokenizer.json"):
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
