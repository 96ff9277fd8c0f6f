"""Run directories: what `bigmodel train` writes (`recipe.yaml`, `env.json`, `metrics.jsonl`, `checkpoints/`,
`summary.json`, `model/`) and the environment record of a run. The artifact inside is `bigmodel.artifact`'s; the
list of runs is `bigmodel.runindex`'s."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bigmodel.errors import UserError


# -------------------------------------------------------------------------------------------------- environment
def git_sha(cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment(device: str, seed: int) -> dict[str, Any]:
    import numpy
    import torch

    import bigmodel
    from bigmodel.training.trainer import cpu_has_native_bf16, isa_caps

    return {
        "bigmodel": bigmodel.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "cpu_isa_caps": isa_caps(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "device": device,
        "git_sha": git_sha(),
        "seed": seed,
        "argv": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# ---------------------------------------------------------------------------------------------------- run dirs
def is_run_dir(path: Path) -> bool:
    return (path / "recipe.yaml").is_file()


def require_run_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: run directory not found")
    if not is_run_dir(path):
        raise UserError(
            f"{path}: not a bigmodel run directory (no recipe.yaml); pass the folder `bigmodel train` printed"
        )
    return path


def new_run_dir(out: str | Path | None, name: str) -> Path:
    if out is None:
        base = Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        path, i = base, 1
        while path.exists():
            path, i = Path(f"{base}-{i}"), i + 1
    else:
        path = Path(out)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise UserError(f"--out {path}: already exists and is not empty (use --resume {path} to continue that run)")
    path.mkdir(parents=True, exist_ok=True)
    return path


def is_recipe_file(path: str | Path) -> bool:
    """A recipe given where a run is expected (a pretrained model used as it is)."""
    p = Path(path)
    return p.suffix in (".yaml", ".yml") and p.is_file()
