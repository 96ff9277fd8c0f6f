"""Trainer strategies: how one training step is spread over devices and processes, applied from outside the model.

The Trainer's loop never changes; a strategy wraps what it needs (torchtitan applies parallelism the same way, from
outside a single-device model):

    setup(model, optimizer_factory, train_loader) -> (train_model, optimizer, train_loader)
        wrap the model (DDP, FSDP2, Opacus' GradSampleModule), build the optimizer over the wrapped parameters
        (DP noise wraps it), and shard or re-sample the training loader (rank / world size, Poisson sampling);
    accumulate(train_model, last)   a context for each micro-batch's backward (DDP skips the all-reduce until last);
    step(train_model, optimizer, grad_clip, scaler)   clip, then the optimizer step;
    reduce_metrics(metrics)         sum the metric state (`metrics.sums()`) across processes, in place;
    reduce_mean(x) / reduce_count(n)   the mean of a logged scalar, the sum of an example count, over processes;
    unwrap(train_model)             the module whose state checkpoints, best weights and artifacts hold (the plain
                                    module; under FSDP2 the sharded module itself);
    sharded                         whether that state is split across processes: then every rank writes its shard of
                                    each checkpoint (DCP) and `full_model_state` gathers the artifact's weights;
    full_model_state(model)         the whole weights as plain tensors (collective where sharded; rank 0's is whole);
    load_model_state(model, sd)     load whole (or this strategy's own sharded) weights;
    load_optimizer_state(model, optimizer, sd)   load a whole `optimizer.state_dict()` (parameter-index keyed);
    log_fields() / summary()        what the training log and summary.json / the artifact record (DP: ε, δ, σ);
    state_dict() / load_state_dict()   the strategy's own state (a privacy accountant, say), saved in every
                                    checkpoint and restored on resume.

Only `SingleDevice` lives here; DDP (`ddp.py`), FSDP2 (`fsdp.py`) and DP-SGD register as further strategies
(`register_strategy`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]


class Strategy:
    """The single-process, single-device base: nothing wrapped, nothing reduced. Subclasses override what differs."""

    name = "single"
    sharded = False

    def setup(
        self, model: nn.Module, optimizer_factory: OptimizerFactory, train_loader: Any
    ) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
        return model, optimizer_factory(model), train_loader

    @contextlib.contextmanager
    def accumulate(self, train_model: nn.Module, last: bool) -> Iterator[None]:
        """Around the backward of one micro-batch; `last` is the micro-batch after which the optimizer steps."""
        yield

    def physical_batches(self, batch: Any) -> list[Any]:
        """The pieces one micro-batch is computed in, each with its own forward and backward (DP-SGD: a Poisson-sampled
        batch in chunks of at most `max_physical_batch_size` examples, for memory). Default: the batch whole."""
        return [batch]

    def partial_step(self, train_model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """After the backward of every piece of `physical_batches` but the last: fold its gradients away for the step
        the last piece ends in. Default: nothing (one piece)."""

    def step(
        self,
        train_model: nn.Module,
        optimizer: torch.optim.Optimizer,
        grad_clip: float | None,
        scaler: torch.amp.GradScaler | None,
    ) -> None:
        """Clip the global gradient norm (after unscaling fp16 gradients), then step the optimizer."""
        if grad_clip is not None:
            if scaler is not None:
                scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(train_model.parameters(), grad_clip, foreach=True)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()

    def reduce_metrics(self, metrics: Any) -> None:
        """Sum `metrics.sums()` (loss sums, counts, confusion matrices) over processes, in place. One process: no-op."""

    def reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a scalar over processes (the logged training loss). One process: the value."""
        return value

    def reduce_count(self, value: int) -> int:
        """The sum of an example count over processes (samples seen). One process: the value."""
        return value

    def unwrap(self, train_model: nn.Module) -> nn.Module:
        return train_model

    def full_model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return model.state_dict()

    def load_model_state(self, model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
        model.load_state_dict(sd)

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
        optimizer.load_state_dict(sd)

    def log_fields(self) -> dict[str, Any]:
        """Extra fields of each training log record (DP-SGD: ε spent so far)."""
        return {}

    def summary(self) -> dict[str, Any] | None:
        """What the run's summary.json and artifact record about the strategy (DP-SGD: ε, δ, σ, q, steps), or None."""
        return None

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, JSON-able metadata) of the strategy's own state."""
        return {}, {}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        pass


class SingleDevice(Strategy):
    """One process on one device (CPU, one CUDA GPU, MPS): the default."""


_STRATEGIES: dict[str, Callable[..., Strategy]] = {"single": SingleDevice}


def register_strategy(name: str, factory: Callable[..., Strategy]) -> None:
    if name in _STRATEGIES:
        raise ValueError(f"strategy {name!r} registered twice")
    _STRATEGIES[name] = factory


def get_strategy(name: str, **kwargs: Any) -> Strategy:
    try:
        return _STRATEGIES[name](**kwargs)
    except KeyError:
        raise KeyError(f"unknown strategy {name!r}; expected one of: {', '.join(sorted(_STRATEGIES))}") from None
