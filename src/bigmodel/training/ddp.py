"""Distributed data parallel on torchrun: the `ddp` Trainer strategy and the process group around a run.

`bigmodel train RECIPE --nproc-per-node N` (or `torchrun --nproc-per-node N -m bigmodel train RECIPE`) starts N
processes; each reads the same recipe and data, takes its share (`rank` of `world_size`) of every global batch from
the sampling plan, and trains a replica wrapped in `DistributedDataParallel`, which averages the gradients. Because
each global batch of `train.batch_size` examples is split evenly, the averaged gradient is the one a single process
computes on the whole batch: the runs agree (to float rounding of the all-reduce). Metrics are reduced as sums
(confusion matrix, loss sum, count) before they are derived, so every rank sees the same validation numbers and takes
the same best-model and early-stopping decisions. Only rank 0 writes the run directory.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from bigmodel.training.strategy import OptimizerFactory, Strategy, register_strategy

TIMEOUT_S = 60  # a collective waiting longer than this fails (a dead or raising peer ends the job, never hangs it)


def launched() -> bool:
    """Whether this process was started by torchrun for a job of more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_process_group(backend: str = "auto") -> torch.device | None:
    """Join the job's process group (once): NCCL on CUDA, gloo otherwise. Returns the device this rank trains on
    (its LOCAL_RANK's GPU under NCCL), or None to keep the recipe's."""
    if not launched():
        return None
    cuda = torch.cuda.is_available()
    chosen = ("nccl" if cuda else "gloo") if backend == "auto" else backend
    device = None
    if chosen == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(chosen, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    return device


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (e.g. the run directory it chose)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def in_process_group() -> bool:
    return dist.is_available() and dist.is_initialized()


def destroy() -> None:
    """Leave the process group after a finished job: wait for every rank, then destroy it (no-op outside one)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class DDPStrategy(Strategy):
    """`DistributedDataParallel` around the model; gradient accumulation skips the all-reduce until the last
    micro-batch (`no_sync`); metric sums and the logged loss are all-reduced."""

    name = "ddp"

    def __init__(self, sync_batchnorm: bool = False) -> None:
        self.sync_batchnorm = sync_batchnorm

    def setup(
        self, model: nn.Module, optimizer_factory: OptimizerFactory, train_loader: Any
    ) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
        from torch.nn.parallel import DistributedDataParallel

        device = next(model.parameters()).device
        if self.sync_batchnorm:  # statistics over the global batch, as one process computes them
            if device.type == "cpu":  # PyTorch's SyncBatchNorm has GPU kernels only: ours, on plain collectives
                from bigmodel.training.syncbn import convert

                model = convert(model)
            else:
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        wrapped = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        return wrapped, optimizer_factory(wrapped.module), train_loader

    @contextlib.contextmanager
    def accumulate(self, train_model: nn.Module, last: bool) -> Iterator[None]:
        with contextlib.nullcontext() if last else train_model.no_sync():  # type: ignore[operator]
            yield

    def reduce_metrics(self, metrics: Any) -> None:
        for t in metrics.sums().values():
            dist.all_reduce(t)

    def reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        v = value.detach().clone()
        dist.all_reduce(v)
        return v / dist.get_world_size()

    def reduce_count(self, value: int) -> int:
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"  # NCCL reduces GPU tensors only
        t = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(t)
        return int(t.item())

    def unwrap(self, train_model: nn.Module) -> nn.Module:
        return train_model.module  # type: ignore[return-value]


register_strategy("ddp", DDPStrategy)
