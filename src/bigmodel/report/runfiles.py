"""What a run directory says about itself, read from its files alone: the resolved recipe, the environment, the
metrics log, the lifecycle events, the summary and (for compressed runs) the compression report.

Nothing here needs the model; a run that diverged, was interrupted or is still running reads as well as a finished
one (missing files are None, and `status` says which it is)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bigmodel.errors import UserError
from bigmodel.rundir import require_run_dir


def _json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (a torn last line, from a killed process, is skipped)."""
    if not path.is_file():
        return []
    out = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                continue
            raise UserError(f"{path}:{i + 1}: not a JSON record") from None
    return out


@dataclass
class RunFiles:
    path: Path
    recipe: dict[str, Any]
    env: dict[str, Any] | None
    summary: dict[str, Any] | None
    records: list[dict[str, Any]]
    events: list[dict[str, Any]]
    compression: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, path: str | Path) -> RunFiles:
        p = require_run_dir(path)
        try:
            recipe = yaml.safe_load((p / "recipe.yaml").read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise UserError(f"{p / 'recipe.yaml'}: not valid YAML ({e})") from None
        return cls(
            path=p,
            recipe=recipe,
            env=_json(p / "env.json"),
            summary=_json(p / "summary.json"),
            records=read_jsonl(p / "metrics.jsonl"),
            events=read_jsonl(p / "events.jsonl"),
            compression=_json(p / "compress.json"),
        )

    # ------------------------------------------------------------------------------------------------ derived
    @property
    def name(self) -> str:
        return self.path.name

    @property
    def task(self) -> str:
        return str(self.recipe.get("task", ""))

    @property
    def has_model(self) -> bool:
        return (self.path / "model" / "config.json").is_file()

    @property
    def status(self) -> str:
        """finished | diverged | early-stopped | incomplete (interrupted or still running)."""
        if self.summary is None:
            return "diverged" if any(e.get("event") == "diverged" for e in self.events) else "incomplete"
        return "early-stopped" if self.summary.get("stopped_early") else "finished"

    def split_records(self, split: str) -> list[dict[str, Any]]:
        """Records of one split, lifecycle records (early_stop) left out."""
        return [r for r in self.records if r.get("split") == split and "event" not in r]

    @property
    def train_records(self) -> list[dict[str, Any]]:
        return self.split_records("train")

    @property
    def val_records(self) -> list[dict[str, Any]]:
        return self.split_records("val")

    @property
    def resumes(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == "resume"]

    @property
    def early_stop(self) -> dict[str, Any] | None:
        return next((r for r in self.records if r.get("event") == "early_stop"), None)

    @property
    def metrics(self) -> dict[str, Any]:
        """The final evaluation (summary.json), or {} for a run that did not finish."""
        return dict((self.summary or {}).get("metrics") or {})

    @property
    def best(self) -> dict[str, Any]:
        return dict((self.summary or {}).get("best") or {})
