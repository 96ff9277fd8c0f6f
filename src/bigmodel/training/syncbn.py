"""Batch normalisation over the global batch on any backend (gloo on CPU included).

PyTorch's `nn.SyncBatchNorm` runs on GPUs only (its statistics kernels are CUDA/XPU ones). `ProcessGroupBatchNorm`
computes the same thing with plain tensor operations and an autograd-aware all-reduce (`_AllReduceSum`, whose
backward all-reduces the gradient; torch's `torch.distributed.nn.functional.all_reduce` is deprecated): the batch mean
over all processes, then the (biased) variance around it — two passes, as one process computes it — so N processes
that each hold 1/N of a batch normalise exactly as one process holding the whole batch, forward and backward, and
update the running statistics the same way (the unbiased variance over the global count). In eval mode, or outside a
process group, it is an ordinary BatchNorm. On CUDA the DDP strategy keeps PyTorch's `SyncBatchNorm`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class _AllReduceSum(torch.autograd.Function):
    """Sum over the processes; the gradient of every input is the sum of the gradients of every output."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = grad.contiguous().clone()
        dist.all_reduce(out)
        return out


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    return _AllReduceSum.apply(x)


class ProcessGroupBatchNorm(_BatchNorm):
    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        local = torch.cat([xf.sum(dims), xf.new_tensor([x.numel() / x.shape[1]])])
        total = all_reduce(local)
        count = total[-1]
        mean = total[:-1] / count
        centred = xf - mean.reshape(shape)
        var = all_reduce((centred * centred).sum(dims)) / count  # biased: what normalises the batch
        y = centred * torch.rsqrt(var + self.eps).reshape(shape)
        if self.affine:
            y = y * self.weight.reshape(shape) + self.bias.reshape(shape)
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)  # type: ignore[union-attr,operator]
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                n = float(count)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / max(n - 1, 1.0)), alpha=m)
        return y.to(x.dtype)


def convert(module: nn.Module) -> nn.Module:
    """`module` with every BatchNorm1d/2d/3d replaced by a `ProcessGroupBatchNorm` holding the same parameters and
    statistics (the keys of the state dict are unchanged, so checkpoints and artifacts are the same)."""
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, ProcessGroupBatchNorm):
        out = ProcessGroupBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, convert(child))
    return out
