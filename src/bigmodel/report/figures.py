"""The report's plots: matplotlib's object API (a `Figure` and its own canvas, never pyplot's global state), written
as SVG with a fixed hash salt and no date, so the same numbers always give the same bytes. Each plot becomes a
`data:image/svg+xml` URI: the page loads nothing, and an SVG inside an <img> runs no script and no style against
the page's Content-Security-Policy."""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

_RC = {
    "svg.hashsalt": "bigmodel-report",  # clip-path / glyph ids are stable across runs
    "svg.fonttype": "none",  # text stays text (smaller; the browser's sans-serif draws it)
    "font.family": "sans-serif",
    "font.size": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "figure.dpi": 100,
}
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"]


def figure(width: float = 6.4, height: float = 3.4) -> Any:
    import matplotlib
    from matplotlib.figure import Figure

    with matplotlib.rc_context(_RC):
        fig = Figure(figsize=(width, height), layout="constrained")
    return fig


def svg_uri(fig: Any) -> str:
    """The figure as a deterministic SVG `data:` URI."""
    import matplotlib
    from matplotlib.backends.backend_svg import FigureCanvasSVG

    FigureCanvasSVG(fig)
    buf = io.BytesIO()
    with matplotlib.rc_context(_RC):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    return "data:image/svg+xml;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def png_uri(array: np.ndarray, scale: int = 1) -> str:
    """(H, W) or (H, W, 3) uint8 → a PNG `data:` URI (nearest-neighbour upscaled by `scale`); Pillow writes no
    timestamps, so the bytes are deterministic."""
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(array))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def smooth(values: Sequence[float], weight: float = 0.6) -> list[float]:
    """TensorBoard's smoothing: a debiased exponential moving average (non-finite values pass through)."""
    out, last, n = [], 0.0, 0
    for v in values:
        if not math.isfinite(v):
            out.append(v)
            continue
        n += 1
        last = last * weight + (1 - weight) * v
        out.append(last / (1 - weight**n))
    return out


def plain(text: str) -> str:
    """A label drawn as written: matplotlib would read `$...$` as mathematics."""
    return text.replace("$", r"\$")


def _with_style(fn: Any) -> Any:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        import matplotlib

        with matplotlib.rc_context(_RC):
            return fn(*args, **kwargs)

    wrapped.__doc__ = fn.__doc__
    return wrapped


@_with_style
def curves(
    series: list[dict[str, Any]],
    *,
    ylabel: str,
    xlabel: str = "step",
    log_y: bool = False,
    marks: list[tuple[float, str]] | None = None,
) -> str:
    """Lines over steps: each series is {label, x, y, [style: raw|smooth|points], [color]}; `marks` are vertical
    lines (x, label), e.g. the best epoch."""
    fig = figure()
    ax = fig.add_subplot()
    for i, s in enumerate(series):
        color = s.get("color", PALETTE[i % len(PALETTE)])
        style = s.get("style", "line")
        if style == "raw":
            ax.plot(s["x"], s["y"], color=color, alpha=0.25, linewidth=0.8, label=plain(s["label"]))
        elif style == "points":
            ax.plot(s["x"], s["y"], color=color, marker="o", markersize=3, linewidth=1.2, label=plain(s["label"]))
        else:
            ax.plot(s["x"], s["y"], color=color, linewidth=1.4, label=plain(s["label"]))
    for x, label in marks or []:
        ax.axvline(x, color="#555555", linestyle="--", linewidth=0.9)
        ax.annotate(
            plain(label), (x, 1), xycoords=("data", "axes fraction"), xytext=(3, -10), textcoords="offset points"
        )
    positive = all(v > 0 for s in series for v in s["y"] if math.isfinite(v))
    if log_y and positive and any(s["y"] for s in series):
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if series:
        ax.legend(loc="best", fontsize=8, frameon=False)
    return svg_uri(fig)


@_with_style
def confusion(cm: np.ndarray, labels: list[str], *, normalise: bool) -> str:
    """A confusion-matrix heat map (rows: true class, columns: predicted), counts or row-normalised, annotated when
    the matrix is small enough to read."""
    k = len(labels)
    size = min(9.0, 2.2 + 0.42 * k)
    fig = figure(size + 1.0, size)
    ax = fig.add_subplot()
    ax.grid(False)
    rows = cm.sum(axis=1, keepdims=True)
    shown = np.divide(cm, np.maximum(rows, 1)) if normalise else cm
    im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalise else max(1, int(cm.max())))
    fig.colorbar(im, ax=ax, shrink=0.8)
    short = [plain(lab if len(lab) <= 14 else lab[:13] + "…") for lab in labels]
    ax.set_xticks(range(k), short, rotation=60 if k > 4 else 0, ha="right" if k > 4 else "center")
    ax.set_yticks(range(k), short)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 20:
        top = float(shown.max()) if shown.size else 0.0
        for i in range(k):
            for j in range(k):
                v = shown[i, j]
                text = f"{v:.2f}" if normalise else str(int(v))
                color = "white" if top and v > 0.6 * top else "black"
                ax.text(j, i, text, ha="center", va="center", fontsize=7 if k > 10 else 8, color=color)
    return svg_uri(fig)


@_with_style
def reliability(bins: list[dict[str, Any]], ece: float) -> str:
    """The reliability diagram: accuracy per confidence bin against the diagonal, bars weighted by count."""
    fig = figure(4.6, 4.0)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="#888888", linestyle="--", linewidth=1, label="perfect calibration")
    used = [b for b in bins if b["count"]]
    ax.bar(
        [(b["lower"] + b["upper"]) / 2 for b in used],
        [b["accuracy"] for b in used],
        width=[max(b["upper"] - b["lower"], 0.01) for b in used],
        color="#1f77b4",
        edgecolor="white",
        label="accuracy",
    )
    ax.plot(
        [b["confidence"] for b in used],
        [b["confidence"] for b in used],
        "o",
        color="#d62728",
        markersize=3,
        label="mean confidence",
    )
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("confidence (top-1 probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"ECE {ece:.4f} (15 bins)")
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    return svg_uri(fig)


@_with_style
def histogram(values: np.ndarray, correct: np.ndarray) -> str:
    """Confidence histogram, correct and wrong predictions stacked."""
    fig = figure(4.6, 3.0)
    ax = fig.add_subplot()
    edges = np.linspace(0, 1, 21)
    ax.hist(
        [values[correct], values[~correct]],
        bins=edges,
        stacked=True,
        color=["#2ca02c", "#d62728"],
        label=["correct", "wrong"],
    )
    ax.set_xlabel("confidence")
    ax.set_ylabel("examples")
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    return svg_uri(fig)


@_with_style
def heatmap(values: np.ndarray, *, xlabel: str, ylabel: str, width: float = 2.1, height: float = 1.6) -> str:
    """A small heat map of a (rows, cols) array (a sequence's time steps × features), integer ticks."""
    from matplotlib.ticker import MaxNLocator

    fig = figure(width, height)
    ax = fig.add_subplot()
    ax.grid(False)
    ax.imshow(values, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.xaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))
    ax.tick_params(labelsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return svg_uri(fig)
