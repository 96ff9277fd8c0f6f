"""Progress: a rich bar on a terminal, plain log lines otherwise; nothing from ranks other than 0."""

from __future__ import annotations

import io

from bigmodel.api import build_experiment
from bigmodel.config import validate_recipe
from bigmodel.training.progress import ProgressCallback
from conftest import tiny_recipe


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def fit_with(stream, monkeypatch=None) -> str:
    recipe = validate_recipe(tiny_recipe(**{"train.epochs": 2}))
    t = build_experiment(recipe).trainer(callbacks=[ProgressCallback(stream=stream)])
    t.fit()
    return stream.getvalue()


def test_plain_lines_when_not_a_terminal():
    out = fit_with(io.StringIO())
    lines = out.strip().splitlines()
    assert lines[0].startswith("training: ") and "steps" in lines[0]
    assert lines[1].startswith("epoch 1/2 step ") and "val_accuracy" in lines[1] and "samples/s" in lines[1]
    assert lines[2].startswith("epoch 2/2 ") and "eta 0m00s" in lines[2]


def test_rich_bar_on_a_terminal():
    out = fit_with(FakeTTY())
    assert "train" in out and "samples/s" in out and "epoch 1/2" not in out


def test_silent_on_other_ranks(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert fit_with(io.StringIO()) == ""
