"""FSDP2 on torchrun: the `fsdp2` Trainer strategy (`train.distributed.strategy: fsdp2`).

`fully_shard` (PyTorch's per-parameter FSDP, as torchtitan applies it) is applied from outside the model: once per
block the model declares (`ModelBase.shard_units()`: GPT and Transformer blocks, a transformers model's
`_no_split_modules` layers), then to the root. Every parameter becomes a DTensor holding 1/N of it on each of the N
processes; a block's full weights are all-gathered just before its forward (and backward) and freed after, and its
gradients are reduce-scattered, so each process holds its shard of the weights, gradients and optimizer moments.
The optimizer steps on the shards. With `train.precision` bf16 (or fp16), the gathered weights are cast for compute
and gradients are reduced in fp32 (`MixedPrecisionPolicy`).

Data, metric reduction and fault handling are DDP's (this strategy extends it). What differs is the state:
checkpoints are written by every rank through `torch.distributed.checkpoint` (`checkpoint.save_sharded_checkpoint`)
and can be resumed on any number of processes, with or without FSDP2; the final artifact gathers the whole weights
into one plain safetensors model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from bigmodel.training.ddp import DDPStrategy
from bigmodel.training.strategy import OptimizerFactory, register_strategy


def fqn_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, sd: dict[str, Any]) -> dict[str, Any]:
    """`optimizer.state_dict()` (parameters numbered in group order) keyed by parameter name instead, the form
    `torch.distributed.checkpoint.state_dict` reads."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    state = {order[int(i)]: st for i, st in sd["state"].items()}
    groups = [{**g, "params": [order[int(i)] for i in g["params"]]} for g in sd["param_groups"]]
    return {"state": state, "param_groups": groups}


class FSDP2Strategy(DDPStrategy):
    """`fully_shard` per declared block and at the root; gradient accumulation skips the reduce-scatter until the
    last micro-batch."""

    name = "fsdp2"
    sharded = True

    def __init__(self, param_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.param_dtype = param_dtype

    def setup(
        self, model: nn.Module, optimizer_factory: OptimizerFactory, train_loader: Any
    ) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        from bigmodel.models.base import ModelBase

        kw: dict[str, Any] = {}
        if self.param_dtype is not None:
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=torch.float32)
        units = model.shard_units() if isinstance(model, ModelBase) else []
        for unit in units:
            fully_shard(unit, **kw)
        fully_shard(model, **kw)
        return model, optimizer_factory(model), train_loader

    @contextlib.contextmanager
    def accumulate(self, train_model: nn.Module, last: bool) -> Iterator[None]:
        train_model.set_requires_gradient_sync(last)  # type: ignore[operator]
        yield

    def unwrap(self, train_model: nn.Module) -> nn.Module:
        return train_model  # fully_shard changes the module in place

    def full_model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_model_state(self, model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        from torch.distributed.tensor import DTensor

        whole = not any(isinstance(v, DTensor) for v in sd.values())
        set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=whole))

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(
            model, optimizer, fqn_optimizer_state(model, optimizer, sd), options=StateDictOptions(full_state_dict=True)
        )


register_strategy("fsdp2", FSDP2Strategy)
