"""The run index: a small SQLite database (`$BIGMODEL_HOME/runs.sqlite`, stdlib) behind `bigmodel runs
list|show|compare` and `model.init_from: RUN_NAME`. Only rank 0 writes."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from bigmodel.errors import UserError


def index_path() -> Path:
    from bigmodel.data.download import bigmodel_home

    return bigmodel_home() / "runs.sqlite"


class RunIndex:
    """SQLite (stdlib) list of runs and their final metrics. Only rank 0 writes."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or index_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=30)
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS runs (run_dir TEXT PRIMARY KEY, name TEXT, task TEXT, model TEXT, data TEXT,"
            " seed INTEGER, status TEXT, created TEXT, updated TEXT, train_time_s REAL, metrics TEXT)"
        )
        self.db.commit()

    def upsert(self, run_dir: Path, **fields: Any) -> None:
        key = str(Path(run_dir).resolve())
        now = time.strftime("%Y-%m-%d %H:%M:%S")
        if "metrics" in fields and not isinstance(fields["metrics"], str):
            fields["metrics"] = json.dumps(fields["metrics"])
        fields["updated"] = now
        exists = self.db.execute("SELECT 1 FROM runs WHERE run_dir = ?", (key,)).fetchone()
        if exists:
            sets = ", ".join(f"{k} = ?" for k in fields)
            self.db.execute(f"UPDATE runs SET {sets} WHERE run_dir = ?", (*fields.values(), key))  # noqa: S608
        else:
            fields.setdefault("created", now)
            cols = ", ".join(["run_dir", *fields])
            marks = ", ".join("?" * (len(fields) + 1))
            self.db.execute(f"INSERT INTO runs ({cols}) VALUES ({marks})", (key, *fields.values()))  # noqa: S608
        self.db.commit()

    def list(self) -> list[dict[str, Any]]:
        self.db.row_factory = sqlite3.Row
        rows = self.db.execute("SELECT * FROM runs ORDER BY created").fetchall()
        return [self._row(r) for r in rows]

    def get(self, ref: str) -> dict[str, Any]:
        """A run by its directory (any spelling of the path) or by a unique name prefix."""
        runs = self.list()
        p = str(Path(ref).resolve())
        for r in runs:
            if r["run_dir"] == p:
                return r
        matches = [r for r in runs if Path(r["run_dir"]).name.startswith(ref) or (r["name"] or "") == ref]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise UserError(f"run {ref!r} not found in the run index {self.path} (`bigmodel runs list` shows them)")
        raise UserError(f"run {ref!r} is ambiguous: {', '.join(Path(r['run_dir']).name for r in matches)}")

    @staticmethod
    def _row(r: sqlite3.Row) -> dict[str, Any]:
        d = dict(r)
        d["metrics"] = json.loads(d["metrics"]) if d.get("metrics") else {}
        return d
