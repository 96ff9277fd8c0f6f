"""`bigmodel report RUN [RUN ...]`: one self-contained HTML page per run (or per comparison of runs).

The generic sections (overview, final metrics, learning curves, privacy, compression) come from the run's files;
each task spec adds its own (`TaskSpec.report_sections`: classifiers their confusion matrix, calibration and worst
examples; language models and translation their samples). A section that does not apply says so."""

from __future__ import annotations

import math
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bigmodel.config import dotted
from bigmodel.errors import UserError
from bigmodel.report import figures
from bigmodel.report.html import Downloads, Section, esc, fmt, img, kv, note, page, table
from bigmodel.report.runfiles import RunFiles


@dataclass
class ReportContext:
    """One run being reported: its files, the downloads and raw numbers the sections add, and (when `inference`)
    the run's artifact evaluated on `split` with the per-example outputs kept."""

    run: RunFiles
    inference: bool = True
    split: str | None = None
    top_losses: int = 12
    prefix: str = ""  # section-id prefix (several runs on one page)
    downloads: Downloads = field(default_factory=Downloads)
    data: dict[str, Any] = field(default_factory=dict)
    _evaluation: Any = None
    _loaded: Any = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def eval_split(self) -> str:
        return self.split or str((self.run.summary or {}).get("split") or "test")

    def id(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def evaluation(self) -> Any:
        """The artifact evaluated on the report's split with per-example logits (None without inference or
        without a saved model)."""
        if not self.inference or not self.run.has_model:
            return None
        if self._evaluation is None:
            from bigmodel.api import evaluation

            t0 = time.perf_counter()
            self._evaluation = evaluation(self.run.path, self.eval_split, keep_outputs=True, decode=False)
            self.timings["inference_s"] = time.perf_counter() - t0
        return self._evaluation

    def loaded(self) -> tuple[Any, Any] | None:
        """(artifact, prepared data) without an evaluation pass (what generation samples need), or None without
        inference or a saved model."""
        if not self.inference or not self.run.has_model:
            return None
        if self._evaluation is not None:
            return self._evaluation.artifact, self._evaluation.data
        if self._loaded is None:
            from bigmodel.api import prepare_data
            from bigmodel.config import read_yaml, validate_recipe
            from bigmodel.runs import load_artifact

            t0 = time.perf_counter()
            recipe = validate_recipe(
                read_yaml(self.run.path / "recipe.yaml"), source=str(self.run.path / "recipe.yaml")
            )
            art = load_artifact(self.run.path)
            self._loaded = (art, prepare_data(recipe, art.preprocess)[0])
            self.timings["load_s"] = time.perf_counter() - t0
        return self._loaded

    def baseline(self) -> dict[str, Any] | None:
        """The classic baseline `train` fitted beside the model, when it was scored on the report's split."""
        from bigmodel.evaluation.baseline import stored_for

        return stored_for(self.run.summary, self.eval_split)

    def final_metrics(self) -> dict[str, Any]:
        """The final evaluation: summary.json's when it is of the report's split, else the inference's."""
        s = self.run.summary or {}
        if s.get("split") == self.eval_split and s.get("metrics"):
            return dict(s["metrics"])
        ev = self.evaluation()
        return {k: v for k, v in ev.metrics.items() if k not in ("run_dir", "split")} if ev is not None else {}


# ------------------------------------------------------------------------------------------------------ sections
def overview(ctx: ReportContext) -> Section:
    run, env, s = ctx.run, ctx.run.env or {}, ctx.run.summary or {}
    r = run.recipe
    model = r.get("model") or {}
    data = r.get("data") or {}
    best = run.best
    stop = run.early_stop
    resumes = run.resumes
    status = run.status
    rows: list[tuple[str, Any]] = [
        ("status", f'<span class="status {esc(status)}">{esc(status)}</span>'),
        ("recipe", esc(r.get("name") or "")),
        ("task", esc(run.task)),
        ("model", esc(model.get("name", ""))),
        ("data", esc(data.get("source", "—") + (f":{data['path']}" if data.get("path") else ""))),
        ("seed", esc(r.get("seed", ""))),
        ("git commit", esc(env.get("git_sha") or "unknown")),
        (
            "versions",
            esc(", ".join(f"{k} {env[k]}" for k in ("bigmodel", "torch", "python", "numpy") if env.get(k) is not None)),
        ),
        ("device", esc(env.get("device", "unknown") + (f" ({env['cuda']})" if env.get("cuda") else ""))),
        (
            "CPU",
            esc(
                f"{env.get('cpu_capability', 'unknown')}, bf16 {'native' if env.get('cpu_native_bf16') else 'emulated'}"
                f", {env.get('cpu_count', '?')} cores, {env.get('torch_threads', '?')} torch threads"
            ),
        ),
        ("platform", esc(env.get("platform", "unknown"))),
        ("started", esc(env.get("started", "unknown"))),
        ("training time", esc(f"{s['train_time_s']:.1f} s" if "train_time_s" in s else "—")),
        (
            "steps / epochs",
            esc(
                f"{s.get('steps', '—')} / {s.get('epochs_done', '—')}"
                + (f" of {s['epochs_planned']}" if "epochs_planned" in s else "")
            ),
        ),
        (
            "best",
            esc(
                f"{best.get('monitor')} {fmt(best.get('value'))} at epoch {best.get('epoch')}"
                if best.get("value") is not None
                else "—"
            ),
        ),
        (
            "early stop",
            esc(f"yes, at epoch {stop.get('epoch')} (best epoch {stop.get('best_epoch')})" if stop else "no"),
        ),
        (
            "resumed",
            esc(
                ", ".join(f"from step {e.get('from_step')} ({e.get('time', '')})" for e in resumes) if resumes else "no"
            ),
        ),
    ]
    diverged = next((e for e in run.events if e.get("event") == "diverged"), None)
    if diverged:
        rows.append(("diverged", esc(diverged.get("message") or f"at step {diverged.get('step')}")))
    command = f"bigmodel train {shlex.quote(str(run.path / 'recipe.yaml'))} --out NEW_RUN_DIR"
    body = kv(rows) + "<h3>Reproduce</h3>" + f"<pre>{esc(command)}</pre>"
    body += note("recipe.yaml in the run directory is the resolved recipe (overrides applied, seed included).")
    ctx.data["overview"] = {"status": status, "env": env, "summary": {k: v for k, v in s.items() if k != "metrics"}}
    return Section(ctx.id("overview"), "Overview", body)


def final_metrics(ctx: ReportContext) -> Section:
    m = ctx.final_metrics()
    title = f"Final metrics ({ctx.eval_split})"
    if not m:
        done = (ctx.run.summary or {}).get("split")
        if ctx.run.status == "diverged":
            why = "the run diverged"
        elif done and done != ctx.eval_split and not ctx.inference:
            why = f"the run's final evaluation is of the {done} split; --split {ctx.eval_split} needs inference"
        else:
            why = "the run has no final evaluation (not finished)"
        return Section(ctx.id("metrics"), title, note(f"No final metrics: {why}."))
    scalars = [(k, v) for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    ctx.data["final_metrics"] = dict(scalars)
    base = ctx.baseline()
    if base is not None:  # the classic baseline fitted on the same split, beside the model (train.baseline)
        ctx.data["baseline"] = base
        rows = [[k, v, base[k] if k in base and k != "num_examples" else ""] for k, v in scalars]
        body = table(["metric", "model", f"baseline ({base['model']})"], rows, cls="metrics")
        body += note(
            f"Baseline: {base['model']} fitted on the run's {base['train_examples']} training examples "
            f"(C = {base['C']}) in {base['fit_seconds']:.1f} s; see train.baseline."
        )
    else:
        body = table(["metric", "value"], [[k, v] for k, v in scalars], cls="metrics")
    body += ctx.downloads.json(f"{ctx.prefix}metrics.json", m)
    return Section(ctx.id("metrics"), title, body)


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(int(r["step"]), float(r[key])) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def learning_curves(ctx: ReportContext) -> Section:
    run = ctx.run
    tr, va = run.train_records, run.val_records
    if not tr and not va:
        return Section(ctx.id("curves"), "Learning curves", note("metrics.jsonl has no records yet."))
    plots = []
    x, y = _series(tr, "loss")
    series = []
    if x:
        series += [
            {"label": "train loss", "x": x, "y": y, "style": "raw", "color": figures.PALETTE[0]},
            {"label": "train loss (smoothed)", "x": x, "y": figures.smooth(y), "color": figures.PALETTE[0]},
        ]
    vx, vy = _series(va, "loss")
    if vx:
        series.append({"label": "val loss", "x": vx, "y": vy, "style": "points", "color": figures.PALETTE[1]})
    marks = []
    best_epoch = run.best.get("epoch")
    best_rec = next((r for r in va if r.get("epoch") == best_epoch), None) if best_epoch is not None else None
    if best_rec is not None:
        marks.append((float(best_rec["step"]), f"best (epoch {best_epoch})"))
    if series:
        plots.append(img(figures.curves(series, ylabel="loss", log_y=True, marks=marks), "loss curves"))
    val_keys = sorted(
        {
            k
            for r in va
            for k, v in r.items()
            if isinstance(v, (int, float)) and k not in ("step", "epoch", "time", "loss", "num_tokens")
        }
    )
    if val_keys:
        vs = []
        for i, k in enumerate(val_keys):
            kx, ky = _series(va, k)
            vs.append({"label": f"val {k}", "x": kx, "y": ky, "style": "points", "color": figures.PALETTE[i % 9]})
        plots.append(img(figures.curves(vs, ylabel="validation metric", marks=marks), "validation metrics"))
    lx, ly = _series(tr, "lr")
    if lx:
        plots.append(img(figures.curves([{"label": "learning rate", "x": lx, "y": ly}], ylabel="lr"), "learning rate"))
    cols = ["step", "epoch", "split", "time"]
    train_keys = sorted({k for r in tr for k in r if k not in cols})
    val_cols = sorted({k for r in va for k in r if k not in cols})
    links = ctx.downloads.csv(
        f"{ctx.prefix}train_curve.csv",
        ["step", "epoch", "time", *train_keys],
        [[r.get("step"), r.get("epoch"), r.get("time"), *[r.get(k) for k in train_keys]] for r in tr],
    )
    links += ctx.downloads.csv(
        f"{ctx.prefix}val_curve.csv",
        ["step", "epoch", "time", *val_cols],
        [[r.get("step"), r.get("epoch"), r.get("time"), *[r.get(k) for k in val_cols]] for r in va],
    )
    ctx.data["curves"] = {
        "train": {"step": x, "loss": y, "lr": ly},
        "val": {k: _series(va, k)[1] for k in ["loss", *val_keys]} | {"step": [int(r["step"]) for r in va]},
    }
    text = (
        f"{len(tr)} training log points (every train.log_every steps; smoothed as TensorBoard does, weight 0.6), "
        f"{len(va)} validation evaluations."
    )
    return Section(
        ctx.id("curves"), "Learning curves", f'<div class="plots">{"".join(plots)}</div>' + note(text) + links
    )


def privacy(ctx: ReportContext) -> Section:
    s = ctx.run.summary or {}
    block = ctx.run.recipe.get("privacy")
    p = s.get("privacy") or (block.get("dp") if isinstance(block, dict) else None)  # DP-SGD: ε, δ, σ, q, steps
    if not p:
        return Section(ctx.id("privacy"), "Privacy", note("Not used in this run: no privacy.dp in its recipe."))
    rows = [[k, v if isinstance(v, (int, float)) else str(v)] for k, v in p.items() if not isinstance(v, (dict, list))]
    ctx.data["privacy"] = p
    return Section(ctx.id("privacy"), "Privacy", table(["figure", "value"], rows))


def compression(ctx: ReportContext) -> Section:
    c = ctx.run.compression
    if not c:
        return Section(
            ctx.id("compression"), "Compression", note("Not a compressed run (bigmodel compress writes one).")
        )
    before, after = c.get("before") or {}, c.get("after") or {}
    keys = [k for k in before if isinstance(before.get(k), (int, float)) or isinstance(after.get(k), (int, float))]
    rows = [[k, before.get(k, ""), after.get(k, "")] for k in keys]
    head = kv([(k, esc(fmt(v))) for k, v in c.items() if not isinstance(v, (dict, list))])
    ctx.data["compression"] = c
    return Section(
        ctx.id("compression"), "Compression", head + table(["figure", "before", "after"], rows, cls="compression")
    )


def task_sections(ctx: ReportContext) -> list[Section]:
    from bigmodel.tasks import get_task

    try:
        spec = get_task(ctx.run.task)
    except UserError:
        return [Section(ctx.id("task"), "Task", note(f"Unknown task {ctx.run.task!r}: no task sections."))]
    return spec.report_sections(ctx)


def run_sections(ctx: ReportContext) -> list[Section]:
    return [
        overview(ctx),
        final_metrics(ctx),
        learning_curves(ctx),
        *task_sections(ctx),
        privacy(ctx),
        compression(ctx),
    ]


# ---------------------------------------------------------------------------------------------------- several runs
def comparison(ctxs: list[ReportContext]) -> list[Section]:
    runs = [c.run for c in ctxs]
    names = [r.name for r in runs]
    metrics = [c.final_metrics() for c in ctxs]
    keys = sorted({k for m in metrics for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    rows: list[list[Any]] = [
        ["status", *[r.status for r in runs]],
        ["train_time_s", *[(r.summary or {}).get("train_time_s", "") for r in runs]],
    ]
    rows += [[k, *[m.get(k, "") for m in metrics]] for k in keys]
    bases = [c.baseline() for c in ctxs]
    if any(b is not None for b in bases):
        rows += [[f"baseline_{k}", *[b[k] if b is not None else "" for b in bases]] for k in ("accuracy", "macro_f1")]
    body = table(["", *names], rows, cls="compare")
    flat = [dotted(r.recipe) for r in runs]
    diff_keys = sorted(k for k in set().union(*flat) if len({repr(f.get(k)) for f in flat}) > 1)
    diffs = [[k, *[repr(f.get(k, "—")) if f.get(k) is not None else "—" for f in flat]] for k in diff_keys]
    recipe_body = table(["recipe key", *names], diffs) if diffs else note("The recipes are identical.")
    plots = []
    loss_series, val_series = [], []
    for i, r in enumerate(runs):
        x, y = _series(r.train_records, "loss")
        if x:
            loss_series.append({"label": r.name, "x": x, "y": figures.smooth(y), "color": figures.PALETTE[i % 9]})
        monitor = str((r.recipe.get("train") or {}).get("monitor") or "val_loss").removeprefix("val_")
        vx, vy = _series(r.val_records, monitor)
        if vx:
            val_series.append(
                {
                    "label": f"{r.name} val {monitor}",
                    "x": vx,
                    "y": vy,
                    "style": "points",
                    "color": figures.PALETTE[i % 9],
                }
            )
    if loss_series:
        plots.append(
            img(figures.curves(loss_series, ylabel="train loss (smoothed)", log_y=True), "train loss, overlaid")
        )
    if val_series:
        plots.append(img(figures.curves(val_series, ylabel="validation (monitored)"), "validation, overlaid"))
    return [
        Section("compare", "Comparison", body),
        Section("recipe-diff", "Recipe differences", recipe_body),
        Section(
            "overlay", "Curves overlaid", f'<div class="plots">{"".join(plots)}</div>' if plots else note("No curves.")
        ),
    ]


# ---------------------------------------------------------------------------------------------------------- build
@dataclass
class Report:
    html: str
    data: dict[str, Any]
    timings: dict[str, float]


def build_report(
    runs: list[str | Path], *, inference: bool = True, split: str | None = None, top_losses: int = 12
) -> Report:
    """The report of one run, or the comparison of several (each run's own sections folded below)."""
    if not runs:
        raise UserError("bigmodel report: give one or more run directories")
    if split is not None and split not in ("train", "val", "test"):
        raise UserError(f"--split {split!r}: expected test, val or train")
    t0 = time.perf_counter()
    files = [RunFiles.read(r) for r in runs]
    several = len(files) > 1
    ctxs = [
        ReportContext(f, inference=inference, split=split, top_losses=top_losses, prefix=f"r{i}-" if several else "")
        for i, f in enumerate(files)
    ]
    if not several:
        ctx = ctxs[0]
        sections = run_sections(ctx)
        title = f"bigmodel report: {ctx.run.recipe.get('name') or ctx.run.name}"
        subtitle = f"{ctx.run.path.name} · {ctx.run.task} · {ctx.run.status}"
        data = {"runs": [{"run": ctx.run.name, **ctx.data}]}
    else:
        sections = comparison(ctxs)
        for ctx in ctxs:
            inner = run_sections(ctx)
            body = "".join(f'<section id="{esc(s.id)}"><h3>{esc(s.title)}</h3>{s.body}</section>' for s in inner)
            sections.append(
                Section(
                    ctx.id("run"),
                    f"Run {ctx.run.name}",
                    f"<details><summary>{esc(ctx.run.path)}</summary>{body}</details>",
                )
            )
        title = f"bigmodel report: {len(files)} runs"
        subtitle = " · ".join(f.name for f in files)
        data = {"runs": [{"run": c.run.name, **c.data} for c in ctxs]}
    downloads = "".join(
        f'<a class="dl" download="{esc(n)}" href="{u}">{esc(n)}</a>' for c in ctxs for n, u in c.downloads.links.items()
    )
    sections.append(Section("downloads", "Raw numbers", downloads + note("Every plot's numbers, as CSV / JSON files.")))
    html = page(title, subtitle, sections, _finite(data))
    timings = {"total_s": time.perf_counter() - t0}
    for c in ctxs:
        for k, v in c.timings.items():
            timings[k] = timings.get(k, 0.0) + v
    return Report(html, data, timings)


def _finite(obj: Any) -> Any:
    """NaN / inf (a diverged loss) as strings, so the embedded JSON is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_report(
    runs: list[str | Path],
    out: str | Path | None = None,
    *,
    inference: bool = True,
    split: str | None = None,
    top_losses: int = 12,
) -> tuple[Path, Report]:
    """Build the report and write it atomically: to `out`, or to RUN/report.html for one run."""
    from bigmodel.fileio import write_text_atomic

    report = build_report(runs, inference=inference, split=split, top_losses=top_losses)
    if out is None:
        if len(runs) > 1:
            raise UserError("bigmodel report: several runs need -o FILE.html (where to write the comparison)")
        out = Path(runs[0]) / "report.html"
    out = Path(out)
    if out.is_dir():
        raise UserError(f"-o {out}: is a directory; give a file name such as report.html")
    if not out.parent.is_dir():
        raise UserError(f"-o {out}: folder {out.parent} does not exist")
    write_text_atomic(out, report.html)
    return out, report
