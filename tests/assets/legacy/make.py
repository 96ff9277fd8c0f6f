"""Write the legacy artifacts that tests/test_legacy_artifacts.py loads: small models saved by the code as it was
before the architecture refactor (commit ab5109f), with the predictions that code gave. Run once, from the repo root:
    .venv/bin/python tests/assets/legacy/make.py
Artifacts saved by older code must keep loading and predicting identically; never re-run this to make a test pass.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # tests/ for conftest's fixture trainers

from bigmodel import api  # noqa: E402
from bigmodel.config import validate_recipe  # noqa: E402
from bigmodel.runs import load_artifact  # noqa: E402
from conftest import train_lm_fixture_run, train_text_fixture_run  # noqa: E402


def main() -> None:
    expected: dict[str, object] = {
        "commit": subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    }
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        # image: cnn-small on scikit-learn digits, three PNG inputs
        recipe = {
            "task": "image_classification",
            "data": {"source": "digits"},
            "model": {"name": "cnn-small", "widths": [8, 16]},
            "train": {"epochs": 2, "batch_size": 64, "optimizer": {"name": "adamw", "lr": 0.01}},
        }
        run = api.train(validate_recipe(recipe), out=t / "img", progress=False).run_dir
        from sklearn.datasets import load_digits

        digits = load_digits()
        files = []
        for i in (0, 1, 7):
            f = HERE / f"digit{i}.png"
            Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).save(f)
            files.append(f)
        shutil.rmtree(HERE / "image", ignore_errors=True)
        shutil.copytree(run / "model", HERE / "image")
        expected["image"] = api.predict(HERE / "image", [str(f) for f in files], top_k=3)
        # text: embedding bag on a two-class CSV
        (t / "txt").mkdir()
        run = train_text_fixture_run(t / "txt")
        shutil.rmtree(HERE / "text", ignore_errors=True)
        shutil.copytree(run / "model", HERE / "text")
        expected["text"] = api.predict(HERE / "text", texts=["great fun", "awful plot", "fun plot"], top_k=2)
        # language model: a tiny char GPT, greedy continuation
        (t / "lm").mkdir()
        run = train_lm_fixture_run(t / "lm")
        shutil.rmtree(HERE / "lm", ignore_errors=True)
        shutil.copytree(run / "model", HERE / "lm")
        expected["lm"] = load_artifact(HERE / "lm").generate_text("First", 40, temperature=0)
    for p in (HERE / "image", HERE / "text", HERE / "lm"):
        for f in p.iterdir():
            f.write_bytes(f.read_bytes())  # normalise permissions
    expected = json.loads(json.dumps(expected).replace(str(HERE), "LEGACY"))
    (HERE / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")


if __name__ == "__main__":
    main()
