"""Shared helpers for the benchmarks: the environment header, tables, medians, --json output."""

from __future__ import annotations

import json
import os
import platform
import statistics
from typing import Any


def environment() -> dict[str, Any]:
    import torch

    from bigmodel.training.trainer import cpu_has_native_bf16, isa_caps

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "cpu_isa_caps": isa_caps(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def print_env(env: dict[str, Any]) -> None:
    print("environment: " + ", ".join(f"{k}={v}" for k, v in env.items()))


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    cells = [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def emit_json(obj: dict[str, Any]) -> None:
    print(json.dumps(obj))
