"""DP-SGD as a Trainer strategy (`privacy.dp`), on Opacus.

What makes a run (ε, δ)-differentially private, and where each piece lives:
- **Poisson sampling**: the training loader draws every batch by including each example with probability
  q = batch_size / N (`SamplingPlan` mode `poisson`, seeded by (seed, epoch, batch): batches vary in size and may be
  empty, and a resumed run draws the same ones);
- **per-example clipping and noise**: the model is wrapped for per-example gradients (Opacus' `GradSampleModule`:
  hooks, expanded weights or functorch; by default `bk`: hooks, with the per-example gradients of Linear heads and
  Embeddings kept as factors, `privacy/bookkeeping.py`), and the optimizer is wrapped in Opacus' `DPOptimizer`, which
  clips each example's gradient to `max_grad_norm`, adds N(0, σ² max_grad_norm²) noise to the sum and divides by the
  expected batch size. The noise is drawn from the torch RNG, which every checkpoint holds, so resume is exact;
- **accounting**: after every step the accountant (PRV, RDP or GDP) records (σ, q); ε is logged with the training
  loss, and (ε, δ, σ, q, steps) go into summary.json and the artifact. The accountant's history is the strategy's
  checkpoint state.
Layers Opacus cannot compute per-example gradients for are replaced before training (`fix_model`: BatchNorm1d →
GroupNorm with one group, BatchNorm2d → GroupNorm, EmbeddingBag → Embedding + pooling, LSTM → DPLSTM,
MultiheadAttention → DPMultiheadAttention; in-place activations made out-of-place; position tables, which models
look up once for the whole batch, looked up per example); the artifact records it, so loading it replays the same
replacement. Anything else is a one-line recipe error naming the layer.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from bigmodel.errors import UserError
from bigmodel.training.strategy import OptimizerFactory, Strategy, register_strategy

FIX = "dp-v2"  # the artifact's `model_fix`: replay this version of `fix_model` when loading
# v2 added EmbeddingBag → PooledEmbedding; a v1 model holds no EmbeddingBag (v1 refused it), so v2 replays v1 exactly
FIXES = ("dp-v1", "dp-v2")


def require_opacus() -> None:
    try:
        import opacus  # noqa: F401
    except ImportError:
        raise UserError(
            "privacy.dp needs Opacus: pip install 'bigmodel[privacy]' (bash scripts/setup.sh installs it)"
        ) from None


def fix_model(model: nn.Module) -> nn.Module:
    """`model` with the layers Opacus cannot handle replaced by ones it can (deterministic, so an artifact's loader
    replays it on a freshly built model); a layer it cannot fix → UserError naming it."""
    require_opacus()
    from opacus.validators import ModuleValidator

    fixed = _batchnorm1d_to_groupnorm(_pool_embeddings(model))
    fixed = ModuleValidator.fix(fixed)
    for m in fixed.modules():  # in-place activations break per-example gradient hooks (a view modified in place)
        if getattr(m, "inplace", False) is True:
            m.inplace = False
        if hasattr(m, "per_example_positions"):  # a position table looked up once for the whole batch: per example
            m.per_example_positions = True
    for m in list(fixed.modules()):
        if hasattr(m, "per_example_head"):  # a head tied to the embedding through F.linear: a module hooks see
            m.per_example_head()
    errors = ModuleValidator.validate(fixed, strict=False)
    if errors:
        raise UserError(f"privacy.dp: {errors[0]} (Opacus cannot compute per-example gradients for it)")
    _one_name_per_parameter(fixed)
    return fixed


def _one_name_per_parameter(model: nn.Module) -> None:
    """DPLSTM registers each parameter under two names (its cells' `l0.ih.weight` and nn.LSTM's `weight_ih_l0`).
    Opacus' state-dict hook drops the first names only when the DPLSTM is the root module (it compares unprefixed
    names and returns a new dict, which a parent ignores), so inside a model `state_dict()` held both, and safetensors
    refused the artifact. nn.LSTM's names are kept, the cells' filled back when loading (`keep_one_name`), by hooks
    on `model` itself: a hook on the DPLSTM would run after Opacus' and edit the new dict it returned."""
    from opacus.layers.param_rename import RenameParamsMixin

    from bigmodel.models.base import keep_one_name

    aliases = {}
    for name, m in model.named_modules():
        if isinstance(m, RenameParamsMixin):
            at = f"{name}." if name else ""
            aliases |= {at + old: at + new for old, new in m.old_to_new.items()}
    if aliases:
        keep_one_name(model, aliases)


class PooledEmbedding(nn.Module):
    """`nn.EmbeddingBag(mode, padding_idx)` on (B, L) ids, as an `nn.Embedding` followed by pooling over the positions
    that are not padding: the same outputs from the same weights, and per-example gradients Opacus computes (its
    EmbeddingBag sampler takes only 1-D ids with offsets, so a bag over padded rows had none in any mode)."""

    def __init__(self, bag: nn.EmbeddingBag) -> None:
        super().__init__()
        if bag.mode not in ("mean", "sum", "max"):
            raise UserError(f"privacy.dp: EmbeddingBag mode {bag.mode!r} cannot be fixed")
        self.mode = bag.mode
        self.padding_idx = bag.padding_idx
        self.embedding = nn.Embedding(bag.num_embeddings, bag.embedding_dim, padding_idx=bag.padding_idx)
        with torch.no_grad():
            self.embedding.weight.copy_(bag.weight)

    @property
    def weight(self) -> nn.Parameter:
        return self.embedding.weight

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor | None = None) -> torch.Tensor:
        if ids.dim() != 2 or offsets is not None:
            raise ValueError("PooledEmbedding takes padded (B, L) ids")
        e = self.embedding(ids)
        keep = torch.ones_like(ids, dtype=torch.bool) if self.padding_idx is None else ids != self.padding_idx
        if self.mode == "max":
            out = e.masked_fill(~keep[..., None], float("-inf")).amax(1)
            return torch.where(keep.any(1, keepdim=True), out, torch.zeros_like(out))  # an empty bag is 0
        total = (e * keep[..., None].to(e.dtype)).sum(1)
        if self.mode == "sum":
            return total
        return total / keep.sum(1, keepdim=True).clamp_min(1).to(e.dtype)


def _pool_embeddings(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.EmbeddingBag):
        return PooledEmbedding(module)
    for name, child in module.named_children():
        setattr(module, name, _pool_embeddings(child))
    return module


def check_mode(model: nn.Module, mode: str) -> None:
    """Layers that fail in one per-example gradient mode but work in another (measured with Opacus 1.6)."""
    from opacus.layers import DPRNN

    for name, m in model.named_modules():
        if isinstance(m, DPRNN) and mode != "ew":
            raise UserError(
                f"privacy.dp.grad_sample_mode {mode!r}: layer {name!r} (a vanilla RNN, as DPRNN) fails in this mode; "
                "use grad_sample_mode: ew"
            )


def _batchnorm1d_to_groupnorm(module: nn.Module) -> nn.Module:
    """BatchNorm1d → GroupNorm with one group (a LayerNorm over the features, with BatchNorm's affine parameters).
    Opacus' own fix uses min(32, C) groups, which on an (N, C) input leaves one value per group: every feature is
    normalised to 0 and the layer outputs its bias alone (an MLP trained that way predicts one class)."""
    if isinstance(module, nn.BatchNorm1d):
        return nn.GroupNorm(1, module.num_features, eps=module.eps, affine=module.affine)
    for name, child in module.named_children():
        setattr(module, name, _batchnorm1d_to_groupnorm(child))
    return module


def epsilon_of(history: list[tuple[float, float, int]], accountant: str, delta: float) -> float:
    """ε after the steps in `history` [(σ, q, steps), ...] for `accountant` at `delta` (recomputed from scratch)."""
    from opacus.accountants import create_accountant

    acc = create_accountant(accountant)
    acc.history = [tuple(h) for h in history]
    return float(acc.get_epsilon(delta))


def _rows(batch: Any, start: int, stop: int) -> Any:
    """Examples start..stop of a batch: every tensor in it sliced along its first dimension."""
    if isinstance(batch, torch.Tensor):
        return batch[start:stop]
    if isinstance(batch, (tuple, list)):
        return type(batch)(_rows(b, start, stop) for b in batch)
    if isinstance(batch, dict):
        return {k: _rows(v, start, stop) for k, v in batch.items()}
    return batch


class DPSGDStrategy(Strategy):
    """Per-example clipping and Gaussian noise (Opacus), with the accountant stepping after every optimizer step."""

    name = "dp-sgd"

    def __init__(self, cfg: Any, *, num_examples: int, batch_size: int, total_steps: int) -> None:
        require_opacus()
        import warnings

        from opacus.accountants import create_accountant
        from opacus.accountants.utils import get_noise_multiplier

        # PRV bounds its domain with RDP, whose search warns when the best order is its largest: not actionable here.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")

        self.cfg = cfg
        self.sample_rate = min(1.0, batch_size / max(1, num_examples))
        self.batch_size = batch_size
        self.total_steps = total_steps
        if cfg.noise_multiplier is not None:
            self.sigma = float(cfg.noise_multiplier)
        else:
            self.sigma = float(
                get_noise_multiplier(
                    target_epsilon=cfg.target_epsilon,
                    target_delta=cfg.delta,
                    sample_rate=self.sample_rate,
                    steps=max(1, total_steps),
                    accountant=cfg.accountant,
                    epsilon_tolerance=0.01,
                )
            )
        self.accountant = create_accountant(cfg.accountant)

    def setup(
        self, model: nn.Module, optimizer_factory: OptimizerFactory, train_loader: Any
    ) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
        import warnings

        from opacus.grad_sample.utils import wrap_model
        from opacus.optimizers import get_optimizer_class

        # Opacus' hooks fire on module outputs when the inputs need no gradient (the first layer): expected, not news.
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
        check_mode(model, self.cfg.grad_sample_mode)
        mode = self.cfg.grad_sample_mode
        book_keeping = mode == "bk"
        try:
            if book_keeping:
                from bigmodel.privacy.bookkeeping import BookKeepingGradSampleModule

                wrapped = BookKeepingGradSampleModule(model, batch_first=True, loss_reduction="mean")
            else:
                wrapped = wrap_model(model, mode, batch_first=True, loss_reduction="mean")
        except NotImplementedError as e:  # a layer without per-example gradients in this mode
            raise UserError(f"privacy.dp.grad_sample_mode {mode!r}: {e}") from None
        optimizer = optimizer_factory(model)
        if book_keeping:
            from bigmodel.privacy.bookkeeping import BookKeepingDPOptimizer, BookKeepingPerLayerDPOptimizer

            cls = BookKeepingDPOptimizer if self.cfg.clipping == "flat" else BookKeepingPerLayerDPOptimizer
        else:
            cls = get_optimizer_class(self.cfg.clipping, distributed=False, grad_sample_mode=mode)
        norm: Any = self.cfg.max_grad_norm
        if self.cfg.clipping == "per_layer":  # each parameter's share, so the whole gradient stays within the norm
            n = sum(len(g["params"]) for g in optimizer.param_groups)
            norm = [self.cfg.max_grad_norm / math.sqrt(n)] * n
        dp_optimizer = cls(
            optimizer,
            noise_multiplier=self.sigma,
            max_grad_norm=norm,
            expected_batch_size=self.batch_size,
            loss_reduction="mean",
        )
        return wrapped, dp_optimizer, train_loader

    def physical_batches(self, batch: Any) -> list[Any]:
        size, n = self.cfg.max_physical_batch_size, int(batch[1].shape[0])
        if size is None or n <= size:
            return [batch]
        return [_rows(batch, i, min(i + size, n)) for i in range(0, n, size)]

    def partial_step(self, train_model: nn.Module, optimizer: Any) -> None:
        optimizer.signal_skip_step(do_skip=True)
        optimizer.step()  # clip this piece's examples and add them to the sum: no noise, no update
        optimizer.zero_grad(set_to_none=True)  # its per-example gradients go, the clipped sum stays

    def step(self, train_model: nn.Module, optimizer: Any, grad_clip: float | None, scaler: Any) -> None:
        optimizer.step()  # clip each example, add noise, average over the expected batch size, then step
        self.accountant.step(noise_multiplier=self.sigma, sample_rate=self.sample_rate)

    def unwrap(self, train_model: nn.Module) -> nn.Module:
        return train_model._module  # type: ignore[return-value]

    def epsilon(self) -> float:
        if not self.accountant.history:
            return 0.0
        try:
            return float(self.accountant.get_epsilon(self.cfg.delta))
        except (ValueError, OverflowError, MemoryError):  # σ so small the accountant's grid gives out (PRV at 1e-9)
            return math.inf

    def log_fields(self) -> dict[str, Any]:
        return {"epsilon": self.epsilon()}

    def summary(self) -> dict[str, Any]:
        steps = sum(h[2] for h in self.accountant.history)
        return {
            "mechanism": "dp-sgd",
            "epsilon": self.epsilon(),
            "delta": self.cfg.delta,
            "noise_multiplier": self.sigma,
            "sample_rate": self.sample_rate,
            "steps": steps,
            "max_grad_norm": self.cfg.max_grad_norm,
            "clipping": self.cfg.clipping,
            "accountant": self.cfg.accountant,
            "target_epsilon": self.cfg.target_epsilon,
            "history": [list(h) for h in self.accountant.history],
        }

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {}, {"accountant_history": [list(h) for h in self.accountant.history], "noise_multiplier": self.sigma}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.accountant.history = [(float(s), float(q), int(n)) for s, q, n in meta.get("accountant_history", [])]


register_strategy("dp-sgd", DPSGDStrategy)
