"""Artifacts saved by older code keep loading and predicting identically (tests/assets/legacy, written by make.py
there at commit ab5109f, before the architecture refactor)."""

from __future__ import annotations

import json
from pathlib import Path

from bigmodel import api
from bigmodel.runs import load_artifact

HERE = Path(__file__).resolve().parent / "assets" / "legacy"
EXPECTED = json.loads((HERE / "expected.json").read_text())


def _relative(results: list[dict]) -> list[dict]:
    return json.loads(json.dumps(results).replace(str(HERE), "LEGACY"))


def test_legacy_image_artifact_predicts_identically():
    files = [str(HERE / f"digit{i}.png") for i in (0, 1, 7)]
    assert _relative(api.predict(HERE / "image", files, top_k=3)) == EXPECTED["image"]


def test_legacy_text_artifact_predicts_identically():
    got = api.predict(HERE / "text", texts=["great fun", "awful plot", "fun plot"], top_k=2)
    assert got == EXPECTED["text"]


def test_legacy_language_model_generates_identically():
    assert load_artifact(HERE / "lm").generate_text("First", 40, temperature=0) == EXPECTED["lm"]
