"""Run directories, model artifacts and the run index — one import for users of all three.

They live in their own modules: `bigmodel.rundir` (run directories, the environment record), `bigmodel.artifact`
(the artifact format: save, load, runtimes) and `bigmodel.runindex` (the SQLite list of runs).
"""

from __future__ import annotations

from bigmodel.artifact import (
    ARTIFACT_FORMAT,
    Artifact,
    Preprocess,
    artifact_dir,
    load_artifact,
    register_runtime,
    save_artifact,
)
from bigmodel.rundir import environment, git_sha, is_recipe_file, is_run_dir, new_run_dir, require_run_dir
from bigmodel.runindex import RunIndex, index_path

__all__ = [
    "ARTIFACT_FORMAT",
    "Artifact",
    "Preprocess",
    "RunIndex",
    "artifact_dir",
    "environment",
    "git_sha",
    "index_path",
    "is_recipe_file",
    "is_run_dir",
    "load_artifact",
    "new_run_dir",
    "register_runtime",
    "require_run_dir",
    "save_artifact",
]
