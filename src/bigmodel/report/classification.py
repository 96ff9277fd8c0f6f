"""The classifier sections of the report: confusion matrix (counts and row-normalised) with the most-confused
pairs, the sortable per-class table, calibration (reliability diagram, ECE over 15 bins, confidence histogram) and
a gallery of the highest-loss examples of the split, each drawn by its task (`ClassificationSpec.report_example`).

Counts come from the run's final evaluation (summary.json) when it is of the same split, so every number equals
`bigmodel evaluate --json`; calibration and the gallery need the per-example probabilities, from one inference pass
of the artifact over the split (`--no-inference` leaves them out and says so)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from bigmodel.report import figures
from bigmodel.report.html import Section, esc, fmt, img, note, table

ECE_BINS = 15


def calibration_bins(probs: torch.Tensor, targets: torch.Tensor, n_bins: int = ECE_BINS) -> tuple[float, list[dict]]:
    """Top-label calibration: equal-width confidence bins [i/n, (i+1)/n) (a confidence of exactly 1.0 is its own
    last bin, as in torchmetrics' `MulticlassCalibrationError`), and ECE = Σ_b (n_b / N) |acc_b − conf_b|."""
    conf, pred = probs.to(torch.float64).max(dim=1)
    correct = (pred == targets).to(torch.float64)
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    idx = torch.bucketize(conf, edges, right=True) - 1  # 0 .. n_bins (n_bins: conf == 1.0)
    n = len(conf)
    bins, ece = [], 0.0
    for b in range(n_bins + 1):
        mask = idx == b
        count = int(mask.sum())
        acc = float(correct[mask].mean()) if count else 0.0
        c = float(conf[mask].mean()) if count else 0.0
        if count:
            ece += count / n * abs(acc - c)
        lower = float(edges[b]) if b < n_bins else 1.0
        upper = float(edges[b + 1]) if b < n_bins else 1.0
        bins.append({"lower": lower, "upper": upper, "count": count, "accuracy": acc, "confidence": c})
    return ece, bins


def sections(spec: Any, ctx: Any) -> list[Section]:
    m = ctx.final_metrics()
    out = [confusion_section(ctx, m), per_class_section(ctx, m)]
    ev = ctx.evaluation()
    if ev is None or ev.logits is None:
        why = (
            "the report was made with --no-inference"
            if not ctx.inference
            else "the run has no saved model (it did not finish)"
        )
        out.append(Section(ctx.id("calibration"), "Calibration", note(f"Needs the model's probabilities: {why}.")))
        out.append(Section(ctx.id("worst"), "Highest-loss examples", note(f"Needs the model's outputs: {why}.")))
        return out
    probs = ev.logits.float().softmax(dim=1)
    out.append(calibration_section(ctx, probs, ev.targets))
    out.append(gallery_section(spec, ctx, ev, probs))
    return out


def confusion_section(ctx: Any, m: dict[str, Any]) -> Section:
    if "confusion_matrix" not in m:
        return Section(ctx.id("confusion"), "Confusion matrix", note("No final evaluation: no confusion matrix."))
    cm = np.asarray(m["confusion_matrix"], dtype=np.int64)
    labels = [c["label"] for c in m["per_class"]]
    plots = [
        img(figures.confusion(cm, labels, normalise=False), "confusion matrix (counts)"),
        img(figures.confusion(cm, labels, normalise=True), "confusion matrix (row-normalised)"),
    ]
    pairs = sorted(
        ((int(cm[i, j]), i, j) for i in range(len(labels)) for j in range(len(labels)) if i != j and cm[i, j]),
        key=lambda t: (-t[0], t[1], t[2]),
    )[:10]
    support = cm.sum(axis=1)
    pair_rows = [[labels[i], labels[j], n, n / max(int(support[i]), 1)] for n, i, j in pairs]
    pair_html = (
        table(["true", "predicted as", "count", "share of true class"], pair_rows, cls="pairs")
        if pair_rows
        else note("No confusions: every example is on the diagonal.")
    )
    total = int(cm.sum())
    ctx.data["confusion_matrix"] = cm.tolist()
    ctx.data["labels"] = labels
    links = ctx.downloads.csv(
        f"{ctx.prefix}confusion_matrix.csv",
        ["true \\ predicted", *labels],
        [[lab, *row] for lab, row in zip(labels, cm.tolist(), strict=True)],
    )
    body = (
        f'<div class="plots">{"".join(plots)}</div>'
        + f"<p>{total} examples; rows are the true class, columns the prediction.</p>"
        + "<h3>Most-confused pairs</h3>"
        + pair_html
        + links
    )
    return Section(ctx.id("confusion"), "Confusion matrix", body)


def per_class_section(ctx: Any, m: dict[str, Any]) -> Section:
    if "per_class" not in m:
        return Section(ctx.id("per-class"), "Per-class metrics", note("No final evaluation."))
    rows = [[c["label"], c["precision"], c["recall"], c["f1"], c["support"]] for c in m["per_class"]]
    ctx.data["per_class"] = m["per_class"]
    body = table(["class", "precision", "recall", "f1", "support"], rows, sortable=True, cls="per-class")
    body += note("Click a column to sort.") + ctx.downloads.csv(
        f"{ctx.prefix}per_class.csv", ["class", "precision", "recall", "f1", "support"], rows
    )
    return Section(ctx.id("per-class"), "Per-class metrics", body)


def calibration_section(ctx: Any, probs: torch.Tensor, targets: torch.Tensor) -> Section:
    ece, bins = calibration_bins(probs, targets)
    conf, pred = probs.max(dim=1)
    correct = (pred == targets).numpy()
    plots = [
        img(figures.reliability(bins, ece), "reliability diagram"),
        img(figures.histogram(conf.numpy(), correct), "confidence histogram"),
    ]
    ctx.data["calibration"] = {"ece": ece, "n_bins": ECE_BINS, "bins": bins, "num_examples": len(targets)}
    rows = [
        [
            f"[{b['lower']:.3f}, {b['upper']:.3f}{']' if b['lower'] == 1.0 else ')'}",
            b["count"],
            b["accuracy"],
            b["confidence"],
        ]
        for b in bins
        if b["count"]
    ]
    body = (
        f'<div class="plots">{"".join(plots)}</div>'
        + f'<p>Expected calibration error (ECE, {ECE_BINS} equal-width bins, top-label): <b class="ece">{fmt(ece)}</b>'
        + f" over {len(targets)} examples; mean confidence {fmt(float(conf.mean()))}, accuracy "
        + f"{fmt(float(correct.mean()) if len(correct) else 0.0)}.</p>"
        + table(["confidence bin", "count", "accuracy", "mean confidence"], rows, cls="bins")
        + ctx.downloads.json(f"{ctx.prefix}calibration.json", ctx.data["calibration"])
    )
    return Section(ctx.id("calibration"), "Calibration", body)


def gallery_section(spec: Any, ctx: Any, ev: Any, probs: torch.Tensor) -> Section:
    targets = ev.targets
    n = len(targets)
    if n == 0:
        return Section(ctx.id("worst"), "Highest-loss examples", note("The split is empty."))
    p_true = probs[torch.arange(n), targets].clamp(min=1e-12)
    loss = -p_true.log()
    k = min(ctx.top_losses, n)
    # Highest loss first; ties broken by index so the gallery is the same every time.
    order = sorted(range(n), key=lambda i: (-float(loss[i]), i))[:k]
    split = ev.data.split(ctx.eval_split)
    labels = ev.artifact.labels
    items, rows = [], []
    for i in order:
        pred = int(probs[i].argmax())
        y = int(targets[i])
        view = spec.report_example(ev.artifact, split, i)
        caption = (
            f"#{i}: true <b>{esc(labels[y])}</b> (p {p_true[i].item():.3f}), predicted {esc(labels[pred])} "
            f"(p {probs[i, pred].item():.3f}), loss {loss[i].item():.3f}"
        )
        wide = "" if view.startswith("<img") else ' class="wide"'
        items.append(f"<figure{wide}>{view}<figcaption>{caption}</figcaption></figure>")
        rows.append(
            {
                "index": i,
                "true": labels[y],
                "predicted": labels[pred],
                "p_true": p_true[i].item(),
                "p_predicted": probs[i, pred].item(),
                "loss": loss[i].item(),
            }
        )
    ctx.data["worst"] = rows
    body = (
        f'<div class="gallery">{"".join(items)}</div>'
        + note(
            f"The {k} examples of the {ctx.eval_split} split with the highest cross-entropy "
            "(index = position in the split)."
        )
        + ctx.downloads.json(f"{ctx.prefix}worst_examples.json", rows)
    )
    return Section(ctx.id("worst"), "Highest-loss examples", body)


# ------------------------------------------------------------------------------------------- example renderers
def image_view(x: torch.Tensor) -> str:
    """(C, H, W) uint8 → an upscaled PNG."""
    a = x.cpu().numpy()
    a = a[0] if a.shape[0] == 1 else np.transpose(a[:3], (1, 2, 0))
    scale = max(1, 96 // max(a.shape[0], a.shape[1]))
    return img(figures.png_uri(a, scale=scale), "example", cls="ex")


def sequence_view(x: torch.Tensor, length: int) -> str:
    """(T, F) float features → a time × feature heat map."""
    a = x[:length].float().cpu().numpy().T
    return img(figures.heatmap(a, xlabel="time step", ylabel="feature"), "sequence", cls="ex")


def tokens_view(tok: Any, ids: torch.Tensor, length: int, pad_id: int = 0) -> str:
    """Token ids → the tokens as boxes (what the model saw), after the decoded text."""
    seq = [int(t) for t in ids[:length].tolist()]
    toks = [tok.id_to_token(t) or f"<{t}>" for t in seq]
    text = tok.decode(seq, skip_special_tokens=True)
    boxes = "".join(f'<span class="tok">{esc(t)}</span>' for t in toks[:80])
    more = f" … (+{len(toks) - 80})" if len(toks) > 80 else ""
    return f"<p>{esc(text)}</p><div>{boxes}{esc(more)}</div>"


def row_view(row: dict[str, Any]) -> str:
    items = list(row.items())
    body = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in items[:8])
    more = f'<tr><td colspan="2">… {len(items) - 8} more columns</td></tr>' if len(items) > 8 else ""
    return f'<table class="kv"><tbody>{body}{more}</tbody></table>'
