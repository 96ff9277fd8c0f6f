"""`--method activations`: what the seed tutorials show of a network's inside.

- Convnets: the feature maps after every activation (ReLU), one row per layer, up to 16 channels each (the most
  active first), each channel scaled to its own range: a grid PNG.
- Transformers (the from-scratch encoder, GPT, and anything built on `MultiHeadAttention`): the attention weights
  of every head in every layer, one small heat map per (layer, head), with the tokens on the axes when few.

Hooks live on the explainer's copy of the model and are removed before returning.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from bigmodel.errors import UserError

MAX_CHANNELS = 16


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "record") and hasattr(m, "recorded")]


def activation_views(ex: Any, names: list[str], items: list[Any]) -> list[dict[str, Any]]:
    art = ex.art
    model = ex.model
    attn = _attention_modules(model)
    relus = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.ReLU, nn.GELU, nn.SiLU))]
    if ex.kind == "image" and relus:
        return [_feature_maps(ex, name, item, relus) for name, item in zip(names, items, strict=True)]
    if attn:
        return [_attention_maps(ex, name, item, attn) for name, item in zip(names, items, strict=True)]
    raise UserError(
        f"--method activations: {art.config['model']['name']} has no convolutional feature maps or attention to show"
    )


def _feature_maps(ex: Any, name: str, item: Any, relus: list[tuple[str, nn.Module]]) -> dict[str, Any]:
    from bigmodel.explain.render import _png

    seen: list[tuple[str, torch.Tensor]] = []

    def hook(label: str) -> Any:
        def fn(_m: nn.Module, _i: Any, out: torch.Tensor) -> None:
            if out.ndim == 4:
                seen.append((label, out[0].detach()))

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in relus]
    try:
        with torch.no_grad():
            logits = ex.forward(*ex.art.spec.model_inputs(ex.art, [item]))
    finally:
        for h in handles:
            h.remove()
    cell = 48
    rows, layers = [], []
    for label, fmap in seen:
        act = fmap.mean(dim=(1, 2))
        idx = torch.argsort(act, descending=True)[:MAX_CHANNELS]
        tiles = []
        for c in idx.tolist():
            f = fmap[c].numpy()
            lo, hi = float(f.min()), float(f.max())
            f = (f - lo) / (hi - lo) if hi > lo else np.zeros_like(f)
            from PIL import Image

            tile = Image.fromarray((f * 255).astype(np.uint8)).resize((cell, cell), Image.Resampling.NEAREST)
            tiles.append(np.asarray(tile))
        tiles += [np.zeros((cell, cell), np.uint8)] * (MAX_CHANNELS - len(tiles))
        gap = np.full((cell, 2), 255, np.uint8)
        rows.append(np.concatenate([x for t in tiles for x in (t, gap)], axis=1))
        layers.append(
            {"layer": label, "channels": int(fmap.shape[0]), "size": list(fmap.shape[1:]), "shown": idx.tolist()}
        )
    grid = np.concatenate([x for r in rows for x in (r, np.full((2, r.shape[1]), 255, np.uint8))], axis=0)
    p = logits.softmax(dim=1)[0]
    top = int(p.argmax())
    return {
        "input": name,
        "method": "activations",
        "method_name": "feature maps",
        "prediction": {"label": ex.art.labels[top], "index": top, "score": round(float(p[top]), 6)},
        "layers": layers,
        "_files": {"activations.png": _png(np.stack([grid] * 3, axis=-1), 1)},
    }


def _attention_maps(ex: Any, name: str, item: Any, attn: list[nn.Module]) -> dict[str, Any]:
    from bigmodel.report.figures import figure

    art = ex.art
    for m in attn:
        m.record, m.recorded = True, None
    try:
        inputs = art.spec.model_inputs(art, [item])
        with torch.no_grad():
            logits = ex.forward(*inputs)
        maps = [m.recorded[0].float().numpy() for m in attn if m.recorded is not None]  # (H, T, T) each
    finally:
        for m in attn:
            m.record, m.recorded = False, None
    if not maps:
        raise UserError("--method activations: the model ran no attention layer on this input")
    ids = inputs[0][0]
    T = maps[0].shape[-1]
    L = int(inputs[1][0]) if len(inputs) > 1 else T
    tok = art.preprocess.tokenizer
    tokens = [tok.id_to_token(int(i)) or "?" for i in ids[:T]] if tok is not None else [str(i) for i in range(T)]
    maps = [m[:, :L, :L] for m in maps]
    H = maps[0].shape[0]
    fig = figure(1.6 * H + 0.6, 1.6 * len(maps) + 0.4)
    axes = fig.subplots(len(maps), H, squeeze=False)
    for li, m in enumerate(maps):
        for h in range(H):
            ax = axes[li][h]
            ax.imshow(m[h], cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
            ax.grid(False)
            ax.set_title(f"layer {li + 1} head {h + 1}", fontsize=7)
            if L <= 16:
                ax.set_xticks(range(L), [t[:6] for t in tokens[:L]], rotation=90, fontsize=5)
                ax.set_yticks(range(L), [t[:6] for t in tokens[:L]], fontsize=5)
            else:
                ax.set_xticks([])
                ax.set_yticks([])
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    out: dict[str, Any] = {
        "input": name,
        "method": "activations",
        "method_name": "attention maps",
        "tokens": tokens[:L],
        "attention": [[[[round(float(v), 4) for v in row] for row in head] for head in m] for m in maps],
        "_files": {"attention.png": buf.getvalue()},
    }
    if art.kind != "lm":
        p = logits.softmax(dim=1)[0]
        top = int(p.argmax())
        out["prediction"] = {"label": art.labels[top], "index": top, "score": round(float(p[top]), 6)}
    return out
