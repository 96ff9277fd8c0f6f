"""`bigmodel explain`: attributions (saliency, integrated gradients, Grad-CAM, occlusion, LIME, KernelSHAP) and
activation views for every classifier kind and for language models, with their pictures; `--evaluate` measures how
faithful they are (`bigmodel.explain.faithfulness`).

Python API:

    from bigmodel.explain import explain
    results = explain("runs/quickstart-...", files=["shoe.png"], method="gradcam", out="explanations/")

Captum is an optional dependency (`pip install 'bigmodel[explain]'`); the core never imports this package.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bigmodel.errors import UserError
from bigmodel.explain.core import ALL_METHODS, METHODS, Batch, Explainer, explainer_for

__all__ = ["ALL_METHODS", "METHODS", "explain", "explain_items", "explainer_for", "evaluate"]


def resolve_target(art: Any, target: str | int | None) -> int | None:
    """`--target`: a label name or a class index (None: each input's predicted class)."""
    if target is None:
        return None
    labels = list(art.labels)
    if isinstance(target, str) and target in labels:
        return labels.index(target)
    try:
        i = int(target)
    except (TypeError, ValueError):
        i = -1
    if 0 <= i < len(labels):
        return i
    shown = ", ".join(labels[:20]) + (" ..." if len(labels) > 20 else "")
    raise UserError(
        f"--target {target!r}: not a label of this model; expected one of: {shown} (or 0..{len(labels) - 1})"
    )


def _slug(name: str, i: int) -> str:
    stem = Path(name).stem if ("/" in name or "." in name) and len(name) < 200 else name
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", stem).strip("-")[:40] or "input"
    return f"{i:03d}-{stem}"


def explain_items(
    art: Any,
    names: list[str],
    items: list[Any],
    method: str | None = None,
    target: str | int | None = None,
    *,
    explainer: Explainer | None = None,
    pictures: bool = True,
    new_tokens: int = 8,
    **options: Any,
) -> list[dict[str, Any]]:
    """Explain prepared items (a task spec's `serve_item` / `explain_items` form). Each result holds JSON-ready
    fields and, under `"_files"`, the pictures and raw attributions as bytes / arrays (not JSON)."""
    ex = explainer or explainer_for(art)
    method = method or ex.default
    if method == "activations":
        from bigmodel.explain.activations import activation_views

        return activation_views(ex, names, items)
    if method not in METHODS and method not in ex.methods:
        raise UserError(f"--method {method!r}: expected one of: {', '.join((*ex.methods, 'activations'))}")
    ex.check_method(method)
    if ex.kind == "lm":
        return [
            _explain_prompt(ex, n, it, method, new_tokens, pictures, **options)
            for n, it in zip(names, items, strict=True)
        ]
    if not items:
        return []
    inputs = art.spec.model_inputs(art, items)
    probs = ex.probabilities(inputs)
    fixed = resolve_target(art, target)
    tgt = probs.argmax(dim=1) if fixed is None else torch.full((len(items),), fixed, dtype=torch.long)
    batch = Batch(inputs, tgt)
    attr = ex.attribute(method, batch, **options).detach().float()
    units = ex.unit_scores(method, attr)
    results = []
    for i, name in enumerate(names):
        p = probs[i]
        k = int(tgt[i])
        top = int(p.argmax())
        r: dict[str, Any] = {
            "input": name,
            "method": method,
            "method_name": ex.method_name(method),
            "prediction": {"label": art.labels[top], "index": top, "score": round(float(p[top]), 6)},
            "target": {"label": art.labels[k], "index": k, "score": round(float(p[k]), 6)},
        }
        if "ig_delta" in batch.extra:
            r["completeness_delta"] = round(float(batch.extra["ig_delta"][i]), 6)
        files: dict[str, Any] = {"attributions.npy": attr[i].numpy()}
        ex.describe(r, files, batch, i, units[i], attr[i], items[i], method, pictures)
        r["_files"] = files
        results.append(r)
    return results


def _explain_prompt(
    ex: Any, name: str, prompt: str, method: str, new_tokens: int, pictures: bool, **options: Any
) -> dict[str, Any]:
    from bigmodel.explain import render

    out = ex.explain_prompt(ex.art.prompt_ids(prompt), method, new_tokens=new_tokens, **options)
    r: dict[str, Any] = {"input": name, "method": method, "method_name": ex.method_name(method), **out}
    files: dict[str, Any] = {}
    if pictures:
        ctx = out["prompt_tokens"] + out["generated_tokens"]
        body = [f"<h2>Prompt: {render.html.escape(prompt)}</h2>"]
        for j, (tok, row) in enumerate(zip(out["generated_tokens"], out["attributions"], strict=True)):
            body.append(
                f"<p><b>→ {render.html.escape(tok)}</b> ({out['prompt_share'][j]:.0%} from the prompt): "
                f"{render.token_html(ctx[: len(row)], row, method)}</p>"
            )
        files["tokens.html"] = render.page(f"{ex.method_name(method)}: {name}", "".join(body))
    r["_files"] = files
    return r


def write_files(results: list[dict[str, Any]], out: Path) -> list[dict[str, Any]]:
    """Write each result's pictures and raw attributions under `out` (NNN-name.*) and replace `_files` by
    `files` (their paths)."""
    from bigmodel.explain import render

    out.mkdir(parents=True, exist_ok=True)
    for i, r in enumerate(results):
        stem = _slug(str(r["input"]), i)
        paths = {}
        for suffix, content in r.pop("_files", {}).items():
            path = out / f"{stem}.{r['method']}.{suffix}"
            if isinstance(content, np.ndarray):
                render.save_npy(path, content)
            elif isinstance(content, bytes):
                render._write_bytes(path, content)
            else:
                render.write_text(path, str(content))
            paths[suffix.split(".")[0]] = str(path)
        r["files"] = paths
    return results


def inline_files(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The server's form: pictures as data: URIs (`heatmap_png`, `activations_png`, `attention_png`); raw
    attributions and HTML pages dropped (the scores are in the JSON)."""
    for r in results:
        files = r.pop("_files", {})
        for name, content in files.items():
            if name.endswith(".png"):
                r[name.replace(".", "_")] = "data:image/png;base64," + base64.b64encode(content).decode("ascii")
    return results


def explain(
    run: str | Path,
    files: list[str | Path] | None = None,
    texts: list[str] | None = None,
    method: str | None = None,
    target: str | int | None = None,
    out: str | Path | None = None,
    **options: Any,
) -> list[dict[str, Any]]:
    """Explain raw inputs (files, or strings for text models and language-model prompts) with a run's model.
    With `out`, pictures and raw attributions are written there and each result lists them under `files`."""
    from bigmodel.runs import load_artifact

    art = load_artifact(run)
    names, items = art.spec.explain_items(art, files, texts)
    if not items:
        raise UserError("nothing to explain: give inputs (files, or texts for a text model)")
    results = explain_items(art, names, items, method, target, **options)
    if out is not None:
        return write_files(results, Path(out))
    for r in results:
        r.pop("_files", None)
    return results


def evaluate(run: str | Path, **kw: Any) -> dict[str, Any]:
    """Faithfulness and sanity of the explanations on a split (see `bigmodel.explain.faithfulness.evaluate`)."""
    from bigmodel.explain.faithfulness import evaluate as _evaluate

    return _evaluate(run, **kw)
