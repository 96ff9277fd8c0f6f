"""Per-example clipping without materialising the per-example gradients of Linear and Embedding weights
(`grad_sample_mode: bk`, the default).

A Linear layer that sees one vector per example (input (B, in), as in every classifier head) has per-example weight
gradient g_i a_iᵀ, an outer product: its norm is ‖g_i‖·‖a_i‖ and the clipped sum Σ c_i g_i a_iᵀ is one matrix
product (c ⊙ G)ᵀ A. Opacus' hooks instead build the (B, out, in) tensor of all of them, zero a second one the same
size, copy one into the other, take its norms and contract it with the clip factors; on the Fashion-MNIST DP CNN
(1,568 → 32 head, batch 256) those (B, 32, 1568) tensors were half of the DP step's time in a profile on 2 cores.
An Embedding's per-example gradient is a (vocab, dim) matrix with a row per id the example holds; Opacus builds
(B, vocab, dim) of them (1.3 GB at batch 1,024, vocabulary 5,000, dim 64). Here the norm sums each example's
positions per id (a sort of B·T keys) and the clipped sum is one `index_add` of the scaled position gradients.
This is the "book-keeping" idea (Bu et al. 2023, "Differentially Private Optimization on Large Model at Small Cost")
for these two layers, in one backward pass.

Everything else is Opacus: the hooks, the grad samplers of every other layer, noise, scaling and the accountant. Two
subclasses, which reach into Opacus 1.6's hook and optimizer internals (pinned in pyproject):
- `BookKeepingGradSampleModule`: for such a layer, keeps the factors on the weight (`_bk_factors`: `Outer` or
  `Lookup`) and a Linear bias' per-example gradients (= G, which is small) as usual;
- `BookKeepingDPOptimizer` (flat clipping) and `BookKeepingPerLayerDPOptimizer` (per_layer): per-example norms from
  the factors and the other grad samples, then the clipped sums.
The clipped gradients equal those built example by example with autograd to float rounding
(`tests/test_privacy.py`).
"""

from __future__ import annotations

from typing import Any

import torch
from opacus.grad_sample.grad_sample_module import GradSampleModule
from opacus.optimizers.optimizer import DPOptimizer, _check_processed_flag, _mark_as_processed
from opacus.utils.module_utils import trainable_parameters
from torch import nn

from bigmodel.errors import UserError


class Outer:
    """A Linear weight's per-example gradients g_i a_iᵀ, kept as G (B, out) and A (B, in)."""

    def __init__(self, g: torch.Tensor, a: torch.Tensor) -> None:
        self.g, self.a = g, a.to(g.dtype)

    def __len__(self) -> int:
        return len(self.g)

    def sq_norms(self) -> torch.Tensor:
        return self.g.pow(2).sum(1) * self.a.pow(2).sum(1)

    def clipped_sum(self, c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return (self.g.to(like.dtype) * c[:, None]).t() @ self.a.to(like.dtype)


class Lookup:
    """An Embedding weight's per-example gradients: example i adds g_it to row x_it, for each of its positions t;
    kept as the ids X (B, T) and G (B, T, dim) rather than (B, vocab, dim), which is mostly zeros. A row's gradient
    sums the positions that hold its id, so the norm groups them first; padding positions add nothing (autograd
    gives the padding row no gradient)."""

    def __init__(self, ids: torch.Tensor, g: torch.Tensor, num_embeddings: int, padding_idx: int | None) -> None:
        self.ids = ids.flatten(1) if ids.dim() > 1 else ids[:, None]  # (B, T), also for an empty batch
        self.g = g.reshape(*self.ids.shape, g.shape[-1])
        if padding_idx is not None:
            self.g = self.g.masked_fill((self.ids == padding_idx)[..., None], 0.0)
        self.vocab = num_embeddings

    def __len__(self) -> int:
        return len(self.ids)

    def sq_norms(self) -> torch.Tensor:
        n, t = self.ids.shape
        if n * t == 0:
            return self.g.new_zeros(n)
        key = self.ids + torch.arange(n, device=self.ids.device)[:, None] * self.vocab  # (example, id) pairs
        rows, which = torch.unique(key.flatten(), return_inverse=True)
        summed = self.g.new_zeros(len(rows), self.g.shape[-1]).index_add_(0, which, self.g.reshape(n * t, -1))
        return self.g.new_zeros(n).index_add_(0, rows // self.vocab, summed.pow(2).sum(1))

    def clipped_sum(self, c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        scaled = (self.g.to(like.dtype) * c[:, None, None]).reshape(-1, like.shape[1])
        return torch.zeros_like(like).index_add_(0, self.ids.flatten(), scaled)


def _factorable(module: nn.Module) -> bool:
    """A plain Linear whose input is one vector per example (B, in), or a plain Embedding (no max_norm, no
    scale_grad_by_freq, dense), used once in this forward. A layer used more than once (its earlier uses' gradients
    pending in `_current_grad_sample`, or more calls to come) is left to Opacus, which sums the uses per example."""
    acts = getattr(module, "activations", None)
    if acts is None or len(acts) != 1:
        return False
    if type(module) is nn.Linear:
        kind_ok = acts[0][0].dim() == 2
    elif type(module) is nn.Embedding:
        kind_ok = module.max_norm is None and not module.scale_grad_by_freq and not module.sparse
    else:
        return False
    return kind_ok and all(
        p._forward_counter == 1 and getattr(p, "grad_sample", None) is None and not hasattr(p, "_current_grad_sample")
        for _, p in trainable_parameters(module)
    )


class BookKeepingGradSampleModule(GradSampleModule):
    """Opacus' hooks module, except that a rank-one Linear or an Embedding keeps its per-example weight gradients as
    factors (`weight._bk_factors`: `Outer` or `Lookup`)."""

    def __init__(self, m: nn.Module, *args: Any, **kwargs: Any) -> None:
        super().__init__(m, *args, **kwargs)
        self._bk_names = {id(mod): name for name, mod in m.named_modules()}
        self._bk_batch: int | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        first = args[0] if args else None
        self._bk_batch = first.shape[0] if isinstance(first, torch.Tensor) and first.dim() else None
        return super().forward(*args, **kwargs)

    def zero_grad(self, set_to_none: bool = False) -> None:
        for p in self.parameters():
            if hasattr(p, "_bk_factors"):
                p._bk_factors = None
        super().zero_grad(set_to_none)

    def _check_lookup(self, module: nn.Module) -> None:
        """An Embedding indexed once for the whole batch (positions as (T,)) has no per-example gradient: in Opacus'
        modes that is silently wrong (its T rows are taken for T examples) or a shape error deep in the optimizer."""
        ids = module.activations[-1][0]
        if self._bk_batch is not None and ids.shape[0] != self._bk_batch:
            raise UserError(
                f"privacy.dp: embedding {self._bk_names.get(id(module), '?')!r} is looked up once for the whole batch "
                f"(ids {tuple(ids.shape)} for a batch of {self._bk_batch}): per-example gradients need one lookup per "
                "example"
            )

    def capture_backprops_hook(
        self,
        module: nn.Module,
        _forward_input: torch.Tensor,
        forward_output: torch.Tensor,
        loss_reduction: str,
        batch_first: bool,
    ) -> None:
        if self.hooks_enabled and getattr(getattr(module, "weight", None), "_bk_factors", None) is not None:
            raise ValueError(  # a second backward before the step: Opacus refuses accumulation with Poisson batches
                "Poisson sampling is not compatible with grad accumulation: call optimizer.step() after every backward"
            )
        if self.hooks_enabled and type(module) is nn.Embedding and getattr(module, "activations", None):
            self._check_lookup(module)
        if not (self.hooks_enabled and _factorable(module)):
            return super().capture_backprops_hook(module, _forward_input, forward_output, loss_reduction, batch_first)
        activations, backprops = self.rearrange_grad_samples(
            module=module, backprops=forward_output[0].detach(), loss_reduction=loss_reduction, batch_first=batch_first
        )
        # backprops are scaled to per-example (summed-loss) gradients: Linear (B, out), Embedding (B, ..., dim)
        if type(module) is nn.Embedding:
            if module.weight.requires_grad:
                module.weight._bk_factors = Lookup(activations[0], backprops, module.num_embeddings, module.padding_idx)
        else:
            if module.weight.requires_grad:
                module.weight._bk_factors = Outer(backprops, activations[0])
            if module.bias is not None and module.bias.requires_grad:
                module.bias.grad_sample = backprops.clone()  # its own tensor: Opacus flags each one as processed
        for _, p in trainable_parameters(module):
            p._forward_counter -= 1
        if hasattr(module, "max_batch_len"):
            del module.max_batch_len


class BookKeepingDPOptimizer(DPOptimizer):
    """Flat per-example clipping over all parameters, reading factored weights (see the module docstring)."""

    @staticmethod
    def _factors(p: torch.Tensor) -> Outer | Lookup | None:
        return getattr(p, "_bk_factors", None)

    @property
    def grad_samples(self) -> list[Any]:
        return [f if (f := self._factors(p)) is not None else self._get_flat_grad_sample(p) for p in self.params]

    @property
    def accumulated_iterations(self) -> int:
        """1 per backward since the last step (DP recipes refuse gradient accumulation, so 1)."""
        counts = set()
        for p in self.params:
            gs = getattr(p, "grad_sample", None)
            if self._factors(p) is not None or isinstance(gs, torch.Tensor):
                counts.add(1)
            elif isinstance(gs, list):
                counts.add(len(gs))
            else:
                raise ValueError(f"no per-example gradient for a parameter of shape {tuple(p.shape)}")
        if len(counts) > 1:
            raise ValueError("Number of accumulated steps is inconsistent across parameters")
        return counts.pop() if counts else 1

    def _clip_factors(self, sq: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each parameter's per-example clip factors from the per-example squared norms of every parameter: flat
        clipping scales a whole example by one factor."""
        c = (self.max_grad_norm / (torch.stack(sq, dim=1).sum(1).sqrt() + 1e-6)).clamp(max=1.0)
        return [c] * len(sq)

    def clip_and_accumulate(self) -> None:
        sq = []  # per-example squared norms, one (B,) per parameter
        for p in self.params:
            f = self._factors(p)
            sq.append(f.sq_norms() if f is not None else self._get_flat_grad_sample(p).flatten(1).pow(2).sum(1))
        if not len(sq[0]):  # an empty Poisson batch: every summed gradient is zero
            clips = [torch.zeros((0,), device=self.params[0].device)] * len(sq)
        else:
            clips = self._clip_factors(sq)
        for p, clip in zip(self.params, clips, strict=True):
            f = self._factors(p)
            c = clip.to(device=p.device, dtype=p.dtype)
            if f is not None:
                if getattr(f, "_processed", False):
                    raise ValueError("Gradients haven't been cleared since the last optimizer step: call zero_grad()")
                grad = f.clipped_sum(c, p) if len(f) else torch.zeros_like(p)
                f._processed = True
            else:
                _check_processed_flag(p.grad_sample)
                gs = self._get_flat_grad_sample(p).to(p.dtype)
                grad = torch.einsum("i,i...", c, gs)
                _mark_as_processed(p.grad_sample)
            p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad

    def zero_grad(self, set_to_none: bool = False) -> None:
        for p in self.params:
            if hasattr(p, "_bk_factors"):
                p._bk_factors = None
        super().zero_grad(set_to_none)


class BookKeepingPerLayerDPOptimizer(BookKeepingDPOptimizer):
    """Per-layer clipping (Opacus' DPPerLayerOptimizer): parameter i's per-example gradient is clipped to its own
    bound `max_grad_norm[i]`; the noise is scaled to the norm of the bounds."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, max_grad_norm: list[float], **kwargs: Any) -> None:
        self.max_grad_norms = [float(m) for m in max_grad_norm]
        super().__init__(optimizer, max_grad_norm=float(torch.tensor(self.max_grad_norms).norm()), **kwargs)
        if len(self.max_grad_norms) != len(self.params):
            raise ValueError(f"{len(self.max_grad_norms)} clipping bounds for {len(self.params)} parameters")

    def _clip_factors(self, sq: list[torch.Tensor]) -> list[torch.Tensor]:
        return [(m / (s.sqrt() + 1e-6)).clamp(max=1.0) for m, s in zip(self.max_grad_norms, sq, strict=True)]
