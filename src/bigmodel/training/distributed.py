"""Rank awareness: one place that says which process writes files and prints.

Single-process runs are rank 0 of 1. Under torchrun (RANK / WORLD_SIZE set) only rank 0 writes the run directory,
checkpoints and logs, so distributed data parallel plugs in without touching the Trainer's I/O.
"""

from __future__ import annotations

import os


def get_rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def get_world_size() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
