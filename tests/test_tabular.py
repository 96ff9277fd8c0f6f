"""Tabular classification, the task added through the seams only: CSV / Parquet / bundled tables, numeric and
categorical columns, train → evaluate → predict → serve → export from the CLI and the Python API."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
import torch

from bigmodel import api
from bigmodel.config import validate_recipe
from bigmodel.errors import UserError
from conftest import ServerProcess, run_cli


def write_table(path: Path, n: int = 240, seed: int = 0) -> Path:
    """A table whose class depends on a number and a category (and a noise column); some cells missing."""
    rng = random.Random(seed)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["size", "colour", "noise", "label"])
        for i in range(n):
            size = rng.uniform(0, 10)
            colour = rng.choice(["red", "green", "blue"])
            label = "big" if (size > 5) != (colour == "blue") else "small"
            w.writerow(["" if i % 37 == 0 else f"{size:.3f}", colour, f"{rng.gauss(0, 1):.3f}", label])
    return path


def recipe(path: Path, **data) -> dict:
    return {
        "name": "table",
        "task": "tabular_classification",
        "data": {"source": "csv", "path": str(path), **data},
        "model": {"name": "mlp", "hidden": [32, 16], "dropout": 0.0},
        "train": {"epochs": 30, "batch_size": 32, "optimizer": {"name": "adamw", "lr": 0.01}, "log_every": 10},
        "seed": 0,
    }


@pytest.fixture(scope="module")
def table_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tab")
    csv_path = write_table(root / "t.csv")
    result = api.train(validate_recipe(recipe(csv_path)), out=root / "run", progress=False)
    return root, csv_path, result


def test_trains_learns_the_rule_and_evaluates_identically(table_run):
    root, _, result = table_run
    assert result.metrics["accuracy"] >= 0.85  # the label is a rule of size and colour: an MLP must find it
    pre = json.loads((result.run_dir / "model" / "preprocess.json").read_text())
    assert pre["kind"] == "tabular" and pre["input_shape"]["numeric"] == ["size", "noise"]
    assert pre["input_shape"]["categorical"] == {"colour": ["blue", "green", "red"]}
    again = api.evaluate(result.run_dir)
    assert again["accuracy"] == result.metrics["accuracy"] and again["num_examples"] == result.metrics["num_examples"]


def test_predict_cli_and_api_on_a_csv(table_run, tmp_path):
    root, _, result = table_run
    rows = tmp_path / "rows.csv"
    rows.write_text("size,colour,noise\n9.0,red,0\n1.0,red,0\n9.0,blue,0\n2,purple,\n")  # purple: unseen category
    got = api.predict(result.run_dir, [rows], top_k=2)
    assert [r["label"] for r in got[:3]] == ["big", "small", "small"]
    assert got[0]["row"] == f"{rows}:1" and len(got[0]["top_k"]) == 2 and len(got) == 4
    p = run_cli("predict", str(result.run_dir), str(rows), "--top-k", "2", "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["predictions"] == got
    bad = tmp_path / "bad.csv"
    bad.write_text("size,colour\nhuge,red\n")
    with pytest.raises(UserError, match="column 'size': 'huge' is not a number"):
        api.predict(result.run_dir, [bad])
    with pytest.raises(UserError, match="missing column 'noise'"):
        api.predict(result.run_dir, [_no_noise(tmp_path)])
    p = run_cli("predict", str(result.run_dir), "hello")
    assert p.returncode == 2 and "table file not found" in p.stderr


def _no_noise(tmp_path: Path) -> Path:
    f = tmp_path / "nonoise.csv"
    f.write_text("size,colour\n1,red\n")
    return f


def test_serve_json_rows(table_run):
    import httpx

    _, _, result = table_run
    server = ServerProcess(result.run_dir)
    try:
        r = httpx.post(
            server.url + "/v1/predict",
            json={"inputs": [{"size": 9, "colour": "red", "noise": 0.1}, {"size": 9, "colour": "blue", "noise": None}]},
        )
        assert r.status_code == 200, r.text
        assert [p["label"] for p in r.json()["predictions"]] == ["big", "small"]
        r = httpx.post(server.url + "/v1/predict", json={"inputs": ["a string"]})
        assert r.status_code == 422 and "expected a row object" in r.text
        r = httpx.post(server.url + "/v1/predict", json={"inputs": [{"size": "x", "colour": "red", "noise": 0}]})
        assert r.status_code == 422 and "is not a number" in r.text
    finally:
        server.stop()


def test_onnx_export_standardises_inside_the_graph(table_run, tmp_path):
    pytest.importorskip("onnxruntime")
    _, _, result = table_run
    p = run_cli("export", str(result.run_dir), "--format", "onnx", "--out", str(tmp_path / "onnx"), "--json")
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)
    assert report["parity"]["passed"] and [i["name"] for i in report["inputs"]] == ["numeric", "categorical"]
    import numpy as np
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    # raw size 9, noise 0; colour index 3 = "red" (0 = unseen, then the sorted vocabulary)
    logits = sess.run(None, {"numeric": np.array([[9.0, 0.0]], np.float32), "categorical": np.array([[3]])})[0]
    assert ["big", "small"][int(logits.argmax())] == "big"


def test_bundled_table_and_parquet(tmp_path):
    r = api.train(
        validate_recipe(
            {
                "task": "tabular_classification",
                "data": {"source": "wine"},
                "model": {"name": "mlp", "hidden": [16]},
                "train": {"epochs": 20, "batch_size": 16, "optimizer": {"name": "adamw", "lr": 0.01}},
            }
        ),
        out=tmp_path / "wine",
        progress=False,
    )
    assert r.metrics["accuracy"] > 0.85 and r.metrics["num_examples"] == 36
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    write_table(tmp_path / "t.csv", n=120)
    rows = list(csv.DictReader((tmp_path / "t.csv").open()))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    rp = api.train(validate_recipe(recipe(tmp_path / "t.parquet", **{})), out=tmp_path / "pq", progress=False)
    assert rp.steps > 0


def test_recipe_errors_name_the_field(tmp_path, write_recipe):
    p = run_cli("train", str(write_recipe(recipe(tmp_path / "missing.csv"))))
    assert p.returncode == 2 and "missing.csv: table file not found" in p.stderr
    bad = recipe(write_table(tmp_path / "t.csv"), features=["size", "weight"])
    p = run_cli("train", str(write_recipe(bad)))
    assert p.returncode == 2 and "data.features ['weight'] are not columns" in p.stderr
    r = recipe(tmp_path / "t.csv")
    r["data"]["augment"] = {"horizontal_flip": True}
    p = run_cli("recipe", "validate", str(write_recipe(r)))
    assert p.returncode == 2 and "data.augment: unknown key" in p.stderr
    with pytest.raises(UserError, match="does not do task 'tabular_classification'"):
        validate_recipe({**recipe(tmp_path / "t.csv"), "model": {"name": "cnn-small"}})


def test_category_indices_are_zero_for_unseen_values():
    from bigmodel.data.tabular import TableSchema, encode_rows

    schema = TableSchema(["a"], {"c": ["x", "y"]}, [1.0], [2.0])
    num, cat = encode_rows([{"a": "3", "c": "y"}, {"a": "", "c": "z"}], schema)
    assert torch.equal(num, torch.tensor([[1.0], [0.0]])) and torch.equal(cat, torch.tensor([[2], [0]]))


def test_table_page_prefills_a_row_and_predicts(table_run):
    """The web page in a real browser: a tabular model gets the JSON input, prefilled with one row of its columns."""
    import shutil

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium (apt-get install chromium; scripts/setup.sh does)")
    from playwright.sync_api import sync_playwright

    _, _, result = table_run
    server = ServerProcess(result.run_dir)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page()
            page.goto(server.url + "/")
            assert "tabular model" in page.text_content("#about")
            assert json.loads(page.input_value("#json")) == [{"size": 0, "noise": 0, "colour": "blue"}]
            page.fill("#json", '[{"size": 9, "colour": "red", "noise": 0}]')
            page.click("#go")
            page.wait_for_selector(".prediction")
            assert page.locator(".prediction .label").all_text_contents()[0] == "big"
            browser.close()
    finally:
        server.stop()
