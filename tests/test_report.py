"""`bigmodel report`: one offline HTML page per run — its numbers equal summary.json / `evaluate --json`, ECE equals
torchmetrics', it is byte-identical when made twice, it opens in a real browser with no request, console error or
CSP violation, and it works for early-stopped, resumed, diverged and several runs."""

from __future__ import annotations

import json
import re
import shutil
from html import unescape

import pytest
import torch

from bigmodel import api
from bigmodel.config import validate_recipe
from bigmodel.report import build_report, write_report
from bigmodel.report.classification import calibration_bins
from conftest import run_cli, tiny_recipe

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def report_data(html: str) -> dict:
    m = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', html, re.S)
    assert m, "the page embeds its numbers"
    return json.loads(m.group(1).replace("<\\/", "</"))


def records(run, split):
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split and "event" not in r]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "run"
    api.train(validate_recipe(tiny_recipe(**{"train.epochs": 3})), out=out, progress=False)
    return out


@pytest.fixture(scope="module")
def page(run):
    path, rep = write_report([run])
    return path, rep, path.read_text(encoding="utf-8")


def test_every_number_equals_the_summary_and_evaluate(run, page):
    path, rep, html = page
    assert path == run / "report.html"
    data = report_data(html)["runs"][0]
    summary = json.loads((run / "summary.json").read_text())
    ev = json.loads(run_cli("evaluate", str(run), "--json", check=True).stdout)
    for source in (summary["metrics"], ev):
        assert data["confusion_matrix"] == source["confusion_matrix"]
        assert data["per_class"] == source["per_class"]
        for k in ("accuracy", "macro_f1", "macro_precision", "macro_recall", "num_examples", "loss"):
            assert data["final_metrics"][k] == source[k]
    assert sum(map(sum, data["confusion_matrix"])) == summary["metrics"]["num_examples"]
    # What a reader sees is the same numbers, printed with 4 digits.
    assert f"{summary['metrics']['accuracy']:.4f}" in html
    for c in summary["metrics"]["per_class"]:
        assert f'data-v="{c["f1"]!r}"' in html
    # Curves: one point per record of metrics.jsonl.
    train, val = records(run, "train"), records(run, "val")
    assert len(data["curves"]["train"]["step"]) == len(train) and len(data["curves"]["val"]["step"]) == len(val)
    assert data["curves"]["train"]["loss"] == [r["loss"] for r in train]
    assert data["curves"]["val"]["accuracy"] == [r["accuracy"] for r in val]
    assert data["overview"]["status"] == "finished"
    # The gallery holds the highest-loss test examples, in order.
    losses = [w["loss"] for w in data["worst"]]
    assert len(losses) == 12 and losses == sorted(losses, reverse=True)


def test_ece_equals_torchmetrics(run, page):
    from torchmetrics.classification import MulticlassCalibrationError

    data = report_data(page[2])["runs"][0]
    ev = api.evaluation(run, "test", keep_outputs=True)
    probs = ev.logits.softmax(dim=1)
    expected = MulticlassCalibrationError(num_classes=probs.shape[1], n_bins=15, norm="l1")(probs, ev.targets)
    assert abs(data["calibration"]["ece"] - expected.item()) <= 1e-6
    assert sum(b["count"] for b in data["calibration"]["bins"]) == len(ev.targets)


def test_calibration_bins_match_torchmetrics_on_hard_cases():
    """Confidences exactly on bin edges and at 1.0 (a saturated softmax): the binning must be torchmetrics'."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 4, generator=g) * 3
    probs = logits.softmax(dim=1)
    probs[:40] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # confidence exactly 1.0
    probs[40:60] = torch.tensor([0.6, 0.4, 0.0, 0.0])  # exactly 9/15
    targets = torch.randint(0, 4, (500,), generator=g)
    ece, bins = calibration_bins(probs, targets)
    ref = multiclass_calibration_error(probs, targets, num_classes=4, n_bins=15, norm="l1").item()
    assert abs(ece - ref) <= 1e-6
    assert bins[-1]["count"] == 40 and bins[-1]["lower"] == 1.0
    # A badly calibrated model has a large ECE: always 99% sure, right half the time.
    sure = torch.full((200, 2), 0.01)
    sure[:, 0] = 0.99
    ece_bad, _ = calibration_bins(sure, torch.arange(200) % 2)
    assert abs(ece_bad - 0.49) < 1e-6


def test_same_run_same_bytes(run, page):
    again = build_report([run]).html
    assert again == page[2]


def test_size_and_no_external_references(page):
    html = page[2]
    assert len(html.encode()) < 2_000_000
    # Nothing the browser could fetch: every src / href is a data: URI or an in-page anchor.
    for attr in re.findall(r'(?:src|href)="([^"]*)"', html):
        assert attr.startswith(("data:", "#")), attr
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]*)"', html)
    assert csp and "default-src 'none'" in unescape(csp.group(1))
    assert ' style="' not in html  # inline style attributes would break the strict CSP


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium (apt-get install chromium; scripts/setup.sh does)")
def test_opens_offline_in_a_real_browser(page):
    from playwright.sync_api import sync_playwright

    path = page[0]
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])
        try:
            tab = b.new_page()
            requests, problems = [], []
            tab.on("request", lambda r: requests.append(r.url))
            tab.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
            tab.on("pageerror", lambda e: problems.append(str(e)))
            tab.goto(path.resolve().as_uri())
            tab.wait_for_load_state("load")
            images = tab.evaluate("[...document.images].map((i) => i.complete && i.naturalWidth > 0)")
            assert len(images) >= 8 and all(images)
            # The per-class table sorts (the page's one script runs under the CSP).
            cells = "[...document.querySelectorAll('table.per-class tbody td:nth-child(4)')].map((t) => +t.dataset.v)"
            tab.click("table.per-class th:nth-child(4)")
            asc = tab.evaluate(cells)
            tab.click("table.per-class th:nth-child(4)")
            desc = tab.evaluate(cells)
            assert asc == sorted(asc) and desc == sorted(asc, reverse=True)
        finally:
            b.close()
    assert [u for u in requests if not u.startswith(("file:", "data:"))] == []
    assert problems == []  # CSP violations are console errors too


def test_no_inference_is_files_only(run):
    rep = build_report([run], inference=False)
    data = report_data(rep.html)["runs"][0]
    assert "calibration" not in data and "worst" not in data
    assert "confusion_matrix" in data  # from summary.json
    assert "report was made with --no-inference" in rep.html
    other = build_report([run], inference=False, split="val").html
    assert "final evaluation is of the test split; --split val needs inference" in other
    val = report_data(build_report([run], split="val").html)["runs"][0]
    assert val["final_metrics"]["num_examples"] == sum(map(sum, val["confusion_matrix"]))
    assert val["final_metrics"] == {k: v for k, v in api.evaluate(run, "val").items() if type(v) in (int, float)}


def test_early_stopped_resumed_and_diverged_runs(tmp_path):
    early = tmp_path / "early"
    api.train(
        validate_recipe(tiny_recipe(**{"train.epochs": 6, "train.early_stopping": {"patience": 1, "min_delta": 1.0}})),
        out=early,
        progress=False,
    )
    data = report_data(build_report([early]).html)["runs"][0]
    assert data["overview"]["status"] == "early-stopped"

    # Killed after step 20, then resumed: the report says so, and its curves are the uninterrupted log.
    recipe = tmp_path / "r.yaml"
    import yaml

    recipe.write_text(yaml.safe_dump(tiny_recipe(**{"train.epochs": 3})))
    resumed = tmp_path / "resumed"
    killed = run_cli(
        "train", str(recipe), "--out", str(resumed), "--no-progress", env={"BIGMODEL_FAULT": "kill_after_step:20"}
    )
    assert killed.returncode != 0
    run_cli("train", "--resume", str(resumed), "--no-progress", "--report", check=True)
    html = (resumed / "report.html").read_text()
    data = report_data(html)["runs"][0]
    assert data["overview"]["status"] == "finished"
    assert re.search(r"from step \d+", html)
    assert len(data["curves"]["train"]["step"]) == len(records(resumed, "train"))

    # Diverged: poison the inputs after step 3 (a non-finite input, the way a real data bug does).
    from bigmodel.errors import TrainingDiverged
    from bigmodel.training.trainer import Callback

    class Poison(Callback):
        def on_fit_start(self, trainer):
            orig = trainer.train_loader.normalizer
            trainer.train_loader.normalizer = lambda xb: orig(xb) * (float("inf") if trainer.state.step >= 3 else 1.0)

    diverged = tmp_path / "diverged"
    with pytest.raises(TrainingDiverged):
        api.train(validate_recipe(tiny_recipe()), out=diverged, progress=False, callbacks=[Poison()])
    out = run_cli("report", str(diverged), check=True)
    assert out.stdout.strip() == str(diverged / "report.html")
    html = (diverged / "report.html").read_text()
    assert report_data(html)["runs"][0]["overview"]["status"] == "diverged"
    assert "No final metrics: the run diverged" in html and "Needs the model" in html


def test_several_runs_are_compared(run, tmp_path):
    other = tmp_path / "seed1"
    api.train(validate_recipe(tiny_recipe(**{"train.epochs": 3, "seed": 1})), out=other, progress=False)
    p = run_cli("report", str(run), str(other))
    assert p.returncode == 2 and "several runs need -o" in p.stderr
    out = tmp_path / "compare.html"
    run_cli("report", str(run), str(other), "-o", str(out), "--no-inference", check=True)
    html = out.read_text()
    assert 'id="compare"' in html and 'id="recipe-diff"' in html and 'id="overlay"' in html
    diff = html[html.index('id="recipe-diff"') : html.index('id="overlay"')]
    assert "<td>seed</td>" in diff and "train.epochs" not in diff
    assert len(report_data(html)["runs"]) == 2


def test_bad_input_is_one_line(tmp_path):
    p = run_cli("report", str(tmp_path))
    assert p.returncode == 2 and "not a bigmodel run directory" in p.stderr and "Traceback" not in p.stderr
    p = run_cli("report", str(tmp_path / "missing"))
    assert p.returncode == 2 and "run directory not found" in p.stderr


def test_served_from_the_run(run, page):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from bigmodel.runs import load_artifact
    from bigmodel.serving.server import create_app

    with TestClient(create_app(load_artifact(run))) as client:
        r = client.get("/report")
        assert r.status_code == 200 and r.text == page[2]
        assert "default-src 'none'" in r.headers["content-security-policy"]
        assert '"report": true' in client.get("/").text


def test_a_compressed_run_shows_before_and_after(run, tmp_path):
    q = tmp_path / "int8"
    run_cli("compress", str(run), "--method", "quantize", "--out", str(q), check=True)
    rep = build_report([q], inference=False)
    data = report_data(rep.html)["runs"][0]
    compress = json.loads((q / "compress.json").read_text())
    assert data["compression"] == compress
    table = rep.html[rep.html.index('class="compression"') :]
    assert "<td>size_bytes</td>" in table and f'data-v="{compress["after"]["size_bytes"]!r}"' in table
    assert "Not a compressed run" not in rep.html
    assert "Not a compressed run" in build_report([run], inference=False).html


def test_labels_are_drawn_as_written():
    """Class labels with `$` (prices, currencies) are text, not matplotlib mathematics; `<` and `&` stay escaped."""
    import base64

    import numpy as np

    from bigmodel.report import figures

    uri = figures.confusion(np.array([[3, 1], [0, 2]]), ["$5 off", "a<b & $x$"], normalise=False)
    svg = base64.b64decode(uri.split(",", 1)[1]).decode()
    assert "$5 off" in svg and "a&lt;b &amp; $x$" in svg
