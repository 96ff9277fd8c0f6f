"""Pictures of attributions: a heat map blended over an image (PNG), a time-step x feature heat map (PNG), tokens
coloured by their score (HTML and the terminal). Colours: signed methods use a diverging map (red = evidence for
the target, blue = against, scaled by the largest |score|); unsigned ones (Grad-CAM; the |gradient| saliency of
sequences and tokens) a sequential one.
Files are written to a temporary name and renamed into place."""

from __future__ import annotations

import html
import io
import os
from pathlib import Path
from typing import Any

import numpy as np

UNSIGNED = ("saliency", "gradcam")


def _write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_npy(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, np.asarray(array, dtype=np.float32), allow_pickle=False)
    _write_bytes(path, buf.getvalue())


def colour(scores: np.ndarray, method: str) -> np.ndarray:
    """Scores (H, W) → RGB uint8 (H, W, 3)."""
    import matplotlib

    s = np.nan_to_num(np.asarray(scores, dtype=np.float64))
    if method in UNSIGNED and not (s < 0).any():  # image saliency is the signed gradient
        top = s.max() if s.size and s.max() > 0 else 1.0
        rgba = matplotlib.colormaps["inferno"](np.clip(s / top, 0, 1))
    else:
        top = np.abs(s).max() if s.size and np.abs(s).max() > 0 else 1.0
        rgba = matplotlib.colormaps["RdBu_r"](np.clip(0.5 + 0.5 * s / top, 0, 1))
    return (rgba[..., :3] * 255).astype(np.uint8)


def _png(rgb: np.ndarray, scale: int) -> bytes:
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(rgb))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def image_overlay(pixels: np.ndarray, scores: np.ndarray, method: str, alpha: float = 0.55) -> np.ndarray:
    """The input (C, H, W) pixels 0..255 beside the heat map blended over it → RGB (H, 2W + 2, 3)."""
    px = np.asarray(pixels, dtype=np.float32)
    rgb = np.repeat(px, 3, axis=0) if px.shape[0] == 1 else px[:3]
    base = np.clip(rgb.transpose(1, 2, 0), 0, 255)
    heat = colour(scores, method).astype(np.float32)
    blend = (1 - alpha) * base + alpha * heat
    gap = np.full((base.shape[0], 2, 3), 255, dtype=np.float32)
    return np.concatenate([base, gap, blend], axis=1).astype(np.uint8)


def image_png(pixels: np.ndarray, scores: np.ndarray, method: str) -> bytes:
    H = pixels.shape[-2]
    return _png(image_overlay(pixels, scores, method), max(1, 224 // max(1, H)))


def matrix_png(scores: np.ndarray, method: str, cell: int = 8) -> bytes:
    """A (rows, cols) score matrix (time steps x features) as a heat map PNG."""
    return _png(colour(scores, method), cell)


def token_html(tokens: list[str], scores: list[float], method: str) -> str:
    """Tokens as <span>s whose background shows the score (red for, blue against; alpha = |score| / max)."""
    top = max((abs(s) for s in scores), default=0.0) or 1.0
    parts = []
    for t, s in zip(tokens, scores, strict=True):
        a = min(1.0, abs(s) / top)
        rgb = "214,39,40" if s >= 0 or method in UNSIGNED else "31,119,180"
        parts.append(
            f'<span title="{s:+.4f}" style="background: rgba({rgb},{a:.2f}); padding: 1px 2px; '
            f'border-radius: 3px">{html.escape(t)}</span>'
        )
    return " ".join(parts)


def page(title: str, body: str) -> str:
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>"
        + html.escape(title)
        + "</title><style>body{font:14px/1.9 sans-serif;margin:2em;max-width:60em}"
        "h2{font-size:1.05em;margin:1.4em 0 .3em}</style></head><body>" + body + "</body></html>\n"
    )


def write_text(path: Path, text: str) -> None:
    _write_bytes(path, text.encode("utf-8"))


def terminal_tokens(tokens: list[str], scores: list[float], method: str) -> Any:
    """A rich `Text` of the tokens with a background shade per score."""
    from rich.text import Text

    top = max((abs(s) for s in scores), default=0.0) or 1.0
    out = Text()
    for t, s in zip(tokens, scores, strict=True):
        a = min(1.0, abs(s) / top)
        if s >= 0 or method in UNSIGNED:
            bg = f"rgb({255},{int(255 - 180 * a)},{int(255 - 180 * a)})"
        else:
            bg = f"rgb({int(255 - 180 * a)},{int(255 - 120 * a)},{255})"
        out.append(t, style=f"black on {bg}")
        out.append(" ")
    return out
