"""The Trainer: one straight loop.

    batch → forward → loss → backward → (accumulate) → clip → step → schedule → log / evaluate / checkpoint

Mixed precision, accumulation, clipping, L1 and early stopping are options, not subclasses. `train_step` is one
optimizer step and testable alone. Hooks (`Callback`) are a fixed, documented set: `on_fit_start`, `on_step_end`,
`on_eval_end`, `on_fit_end`; a callback may call `trainer.request_stop()`. Only rank 0 writes files (rank-aware
I/O for DDP later).

Exact resume: the data order and augmentation are functions of (seed, epoch, batch); the schedule is a function of
the step; model, optimizer, RNG, epoch position, early-stopping state and best weights are in each checkpoint. A
resumed run therefore ends bit-identical (on CPU) to an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bigmodel.config import LOWER_IS_BETTER, TrainConfig
from bigmodel.errors import TrainingDiverged, UserError
from bigmodel.fileio import write_text_atomic
from bigmodel.models.base import SolvedClassifier
from bigmodel.training import checkpoint as ckpt
from bigmodel.training.checkpoint import _fault
from bigmodel.training.distributed import get_world_size, is_main_process
from bigmodel.training.optim import build_optimizer, decay_and_no_decay, l1_penalty, lr_factor
from bigmodel.training.strategy import SingleDevice, Strategy


# ---------------------------------------------------------------------------------------------- device, precision
def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device 'cuda': no CUDA device is available here (use auto or cpu)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("train.device 'mps': no Apple MPS device is available here (use auto or cpu)")
    return torch.device(name)


# oneDNN ISA caps (`ONEDNN_MAX_CPU_ISA`) under which its bf16 kernels still run natively.
_ONEDNN_BF16_ISAS = {
    "ALL",
    "AVX512_CORE_BF16",
    "AVX512_CORE_FP16",
    "AVX512_CORE_AMX",
    "AVX512_CORE_AMX_FP16",
    "AVX10_1_512",
    "AVX10_1_512_AMX",
    "AVX10_1_512_AMX_FP16",
    "AVX10_2_512",
    "AVX10_2_512_AMX_2",
}


ISA_CAP_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def isa_caps() -> dict[str, str]:
    """The environment variables set in this process that cap the CPU instruction sets kernels use (they make an
    AVX-512 machine run as an AVX2-only one; every speed figure should say whether they were set)."""
    return {k: os.environ[k] for k in ISA_CAP_VARIABLES if os.environ.get(k)}


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX: bf16 matmuls/convs run natively (here ~2x fp32 for convnets); else bf16 is emulated.

    The hardware flag is not enough: a process whose kernels are capped below AVX-512 (`ATEN_CPU_CAPABILITY=avx2`,
    `ONEDNN_MAX_CPU_ISA=AVX2`, as on an AVX2-only CPU or when emulating one) emulates bf16 too, at ~1/10 of fp32's
    speed for a small convnet."""
    cpu = torch.cpu
    hardware = bool(
        getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
        or getattr(cpu, "_is_amx_tile_supported", lambda: False)()
    )
    if not hardware or torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AMX"):
        return False
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "ALL")).strip().upper()
    return cap in _ONEDNN_BF16_ISAS


def precision_name(autocast: torch.dtype | None) -> str:
    """ "bf16", "fp16" or "fp32" for an autocast dtype (None: plain fp32)."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(autocast, "fp32")  # type: ignore[arg-type]


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device`, or None for plain fp32."""
    if precision == "fp32":
        return None
    if device.type == "cuda":
        if precision == "fp16":
            return torch.float16
        if precision == "bf16" or torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16
    if device.type == "cpu":
        if precision == "fp16":
            raise UserError("train.precision 'fp16' needs a CUDA device; on CPU use 'bf16' or 'fp32'")
        if precision == "bf16" or cpu_has_native_bf16():
            return torch.bfloat16
        return None
    if device.type == "mps":
        return torch.float16 if precision in ("fp16", "auto") else torch.bfloat16
    return None


# ------------------------------------------------------------------------------------------------------ callbacks
class Callback:
    """The fixed set of hooks. Each receives the Trainer; override the ones you need."""

    def on_fit_start(self, trainer: Trainer) -> None: ...
    def on_step_end(self, trainer: Trainer, loss: float | None) -> None: ...
    def on_eval_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None: ...
    def on_fit_end(self, trainer: Trainer) -> None: ...
    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """Each record as it is appended to metrics.jsonl (trackers mirror the log from here)."""


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch in progress (0-based)
    batch_in_epoch: int = 0  # the next micro-batch of that epoch
    samples_seen: int = 0
    best_value: float | None = None
    best_step: int | None = None
    best_epoch: int | None = None
    bad_evals: int = 0
    stopped_early: bool = False
    last_eval: dict[str, float] = field(default_factory=dict)


def planned_epochs(cfg: TrainConfig, steps_per_epoch: int, autocast: torch.dtype | None = None) -> int:
    """The run's length in epochs: `train.epochs`, or for `auto` the fewest whole epochs that reach
    `train.min_steps` optimizer steps (its budget for the run's precision, `autocast`), within [1,
    `train.max_epochs`]. A function of the data size and the machine's precision only, so a resumed run plans the
    same length."""
    if cfg.epochs != "auto":
        return int(cfg.epochs)
    return max(1, min(cfg.max_epochs, math.ceil(cfg.steps_budget(autocast) / max(1, steps_per_epoch))))


# -------------------------------------------------------------------------------------------------------- trainer
class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        model: nn.Module,
        task: Any,
        train_loader: Any,
        val_loader: Any | None = None,
        *,
        device: torch.device | str = "cpu",
        run_dir: Path | None = None,
        callbacks: list[Callback] | None = None,
        channels_last: bool = False,
        strategy: Strategy | None = None,
    ) -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        model = model.to(self.device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.task = task
        # The strategy wraps model, optimizer and loader (DDP, FSDP2, DP-SGD); `self.model` stays the plain module
        # (what checkpoints, best weights and artifacts hold), `self.train_model` is what the loss is computed with.
        self.strategy = strategy or SingleDevice()
        self.train_model, self.optimizer, train_loader = self.strategy.setup(
            model, lambda m: build_optimizer(cfg.optimizer, m), train_loader
        )
        self.model = self.strategy.unwrap(self.train_model)
        if cfg.compile:
            # Shares the parameters; only the loss is computed through the compiled graph.
            self.train_model = torch.compile(self.train_model)
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.run_dir = Path(run_dir) if run_dir is not None else None
        if self.run_dir is not None and is_main_process():
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.callbacks = list(callbacks or [])
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.l1_params = decay_and_no_decay(self.model)[0] if cfg.l1 > 0 else []
        self.autocast_dtype = resolve_precision(cfg.precision, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.autocast_dtype == torch.float16 else None
        self.accum = cfg.grad_accum_steps
        if len(train_loader) < self.accum:
            raise UserError(
                f"train.grad_accum_steps {self.accum} needs at least that many batches per epoch; the training split "
                f"gives {len(train_loader)} batches of train.batch_size {cfg.batch_size}"
            )
        self.steps_per_epoch = len(train_loader) // self.accum
        self.solved = isinstance(self.model, SolvedClassifier)  # fitted by its solver in one pass, not by steps
        self.epochs = 1 if self.solved else planned_epochs(cfg, self.steps_per_epoch, self.autocast_dtype)
        self.total_steps = 0 if self.solved else self.steps_per_epoch * self.epochs
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.state = TrainState()
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.last_checkpoint: Path | None = None
        self._t_start = time.perf_counter()
        self._elapsed_before = 0.0  # training time before a resume (from the checkpoint)
        self._elapsed_total = 0.0  # training time of all `fit` calls so far, resumed time included
        self._higher_better = cfg.monitor not in LOWER_IS_BETTER
        self._stop = False
        self._limit = False
        self._multi = get_world_size() > 1
        self._local_samples = 0  # this process's examples since `state.samples_seen` was last summed over processes

    def _count_samples(self) -> None:
        """Add the examples every process took since the last count to `state.samples_seen` (global samples: a
        checkpoint resumed on another number of processes counts on). Collective: called at the same steps on all."""
        self.state.samples_seen += self.strategy.reduce_count(self._local_samples)
        self._local_samples = 0

    def _limit_reached(self) -> bool:
        cfg = self.cfg
        if cfg.max_steps is not None and self.state.step >= cfg.max_steps:
            return True
        if cfg.time_limit_s is None:
            return False
        over = time.perf_counter() - self._t_start >= cfg.time_limit_s
        if not self._multi:
            return over
        # Processes' clocks differ: they agree at log points (any process over the limit stops them all), so every
        # process stops after the same step and none waits on a collective the others left.
        if self.state.step % cfg.log_every:
            return False
        return self.strategy.reduce_count(int(over)) > 0

    @property
    def train_time_s(self) -> float:
        """Seconds spent in `fit` so far, over every call and across a resume."""
        return self._elapsed_total

    def request_stop(self) -> None:
        """Ask `fit` to stop after the current step (for callbacks: time budgets, targets reached)."""
        self._stop = True

    # ------------------------------------------------------------------------------------------------- one step
    def autocast(self) -> Any:
        return torch.autocast(
            self.device.type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None
        )

    def set_lr(self, step: int) -> float:
        factor = lr_factor(self.cfg.schedule, step, self.total_steps, self.steps_per_epoch)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor
        return self.base_lrs[0] * factor

    def train_step(self, micro_batches: list[Any]) -> torch.Tensor:
        """One optimizer step over `micro_batches` (len = grad_accum_steps). Returns the mean loss (detached)."""
        self.set_lr(self.state.step)
        total = torch.zeros((), device=self.device)
        n = len(micro_batches)
        for i, batch in enumerate(micro_batches):
            pieces = self.strategy.physical_batches(batch)  # [batch], or DP-SGD's chunks of one Poisson batch
            for j, piece in enumerate(pieces):
                last_piece = j == len(pieces) - 1
                with self.strategy.accumulate(self.train_model, last=i == n - 1 and last_piece):
                    with self.autocast():
                        loss = self.task.loss(self.train_model, piece)
                    if piece[1].shape[0] == 0:  # an empty Poisson-sampled batch (DP-SGD): no examples, no loss
                        loss = loss.nan_to_num(0.0)
                    if self.l1_params:
                        loss = loss + self.cfg.l1 * l1_penalty(self.l1_params)
                    scaled = loss / n if n > 1 else loss
                    if self.scaler is not None:
                        self.scaler.scale(scaled).backward()
                    else:
                        scaled.backward()
                if not last_piece:
                    self.strategy.partial_step(self.train_model, self.optimizer)
                share = piece[1].shape[0] / batch[1].shape[0] if len(pieces) > 1 else 1.0
                total += loss.detach() * share
        self.strategy.step(self.train_model, self.optimizer, self.cfg.grad_clip, self.scaler)
        self.optimizer.zero_grad(set_to_none=True)
        return total / n if n > 1 else total

    # ---------------------------------------------------------------------------------------------------- fit
    def fit(self, epochs: int | None = None) -> TrainState:
        """Train until epoch `self.epochs` (from the restored state, if `resume` was called), with evaluation, early
        stopping and checkpoints. Returns the final state; `self.model` holds the selected weights.

        `fit` can be called again: `fit(epochs=k)` continues for k more epochs from where the last call stopped
        (the current weights, optimizer moments, step count and data position), e.g. one federated round of k local
        epochs. Schedules still span `self.epochs`; steps past its end keep the schedule's final factor."""
        cfg, st = self.cfg, self.state
        if self.solved:
            return self._fit_solver()
        if epochs is not None:
            end_epoch = st.epoch + epochs
            self._stop = self._limit = False
            st.stopped_early = False
        else:
            end_epoch = self.epochs
        for cb in self.callbacks:
            cb.on_fit_start(self)
        self._t_start = time.perf_counter() - self._elapsed_total
        check_every_step = self.device.type == "cpu"  # a finiteness check syncs accelerators: do it at log points there
        running = torch.zeros((), device=self.device)
        running_n = 0
        while st.epoch < end_epoch and not st.stopped_early and not self._stop:
            self.train_model.train()
            batches = iter(self.train_loader.epoch(st.epoch, start=st.batch_in_epoch))
            while st.batch_in_epoch + self.accum <= self.steps_per_epoch * self.accum:
                micro = [next(batches) for _ in range(self.accum)]
                loss = self.train_step(micro)
                st.step += 1
                st.batch_in_epoch += self.accum
                self._local_samples += sum(int(b[1].shape[0]) for b in micro)
                running += loss
                running_n += 1
                log_now = st.step % cfg.log_every == 0
                if log_now or not self._multi:  # across processes a collective: at log points only
                    self._count_samples()
                if (check_every_step or log_now) and not torch.isfinite(loss):
                    self._diverged(loss.item())
                logged = None
                if log_now:
                    logged = self.strategy.reduce_mean(running / running_n).item()  # over processes, too
                    lr = self.optimizer.param_groups[0]["lr"]
                    self.log({"split": "train", "loss": logged, "lr": lr, **self.strategy.log_fields()})
                    running.zero_()
                    running_n = 0
                for cb in self.callbacks:
                    cb.on_step_end(self, logged)
                end_of_epoch = st.batch_in_epoch + self.accum > self.steps_per_epoch * self.accum
                if cfg.checkpoint_every and st.step % cfg.checkpoint_every == 0 and not end_of_epoch:
                    self.save_checkpoint()
                _fault("kill_after_step", st.step)
                if self._limit_reached():
                    self._stop = self._limit = True
                if self._stop:
                    break
            if self._limit:  # a step or time limit: evaluate and checkpoint what was trained, then stop
                if self.val_loader is not None:
                    self._after_eval(self.evaluate(self.val_loader))
                self.save_checkpoint()
            if self._stop:
                break
            st.epoch += 1
            st.batch_in_epoch = 0
            if self.val_loader is not None and (st.epoch % cfg.eval_every == 0 or st.epoch == end_epoch):
                metrics = self.evaluate(self.val_loader)
                self._after_eval(metrics)
            self.save_checkpoint()
        if self.best_weights is not None and cfg.select_best:
            self.strategy.load_model_state(self.model, self.best_weights)
        self._count_samples()
        self._elapsed_total = time.perf_counter() - self._t_start
        for cb in self.callbacks:
            cb.on_fit_end(self)
        return st

    def _fit_solver(self) -> TrainState:
        """A model fitted by a solver (`SolvedClassifier`, e.g. the classic baselines): one pass over the training
        batches (and the validation batches, which choose its regularisation), in fp32 without gradients; then the
        validation metrics as after an epoch. Deterministic, so a resumed run simply fits again."""
        st = self.state
        for cb in self.callbacks:
            cb.on_fit_start(self)
        self._t_start = time.perf_counter()

        def batches(loader: Any) -> Any:
            def gen() -> Any:
                for x, y in loader.epoch(0):
                    yield (tuple(x) if isinstance(x, (tuple, list)) else (x,)), y

            return gen

        self.model.eval()
        with torch.no_grad():
            assert isinstance(self.model, SolvedClassifier)
            info = self.model.fit_solver(
                batches(self.train_loader),
                batches(self.val_loader) if self.val_loader is not None else None,
                int(getattr(self.train_loader, "seed", 0)),
            )
        st.epoch, st.samples_seen = 1, int(info.get("train_examples", 0))
        self.log({"split": "train", "event": "solver", **info})
        if self.val_loader is not None:
            self._after_eval(self.evaluate(self.val_loader))
        self._elapsed_total = time.perf_counter() - self._t_start
        for cb in self.callbacks:
            cb.on_fit_end(self)
        return st

    def _diverged(self, value: float) -> None:
        where = f"{self.last_checkpoint}" if self.last_checkpoint else "none was written yet"
        raise TrainingDiverged(
            f"training stopped: the loss became {value} at step {self.state.step} (epoch {self.state.epoch + 1}); "
            f"last good checkpoint: {where}; try a lower train.optimizer.lr or set train.grad_clip"
        )

    def _after_eval(self, metrics: dict[str, Any]) -> None:
        cfg, st = self.cfg, self.state
        scalars = {f"val_{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "num_examples"}
        st.last_eval = scalars
        self.log({"split": "val", **{k.removeprefix("val_"): v for k, v in scalars.items()}})
        value = scalars.get(cfg.monitor)
        if value is None:
            raise UserError(f"train.monitor {cfg.monitor!r} is not among the validation metrics {sorted(scalars)}")
        min_delta = cfg.early_stopping.min_delta if cfg.early_stopping else 0.0
        improved = st.best_value is None or (
            value > st.best_value + min_delta if self._higher_better else value < st.best_value - min_delta
        )
        if improved:
            st.best_value, st.best_step, st.best_epoch, st.bad_evals = value, st.step, st.epoch, 0
            if cfg.select_best:
                self.best_weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        else:
            st.bad_evals += 1
            if cfg.early_stopping and st.bad_evals >= cfg.early_stopping.patience:
                st.stopped_early = True
                self.log(
                    {"split": "train", "event": "early_stop", "best_epoch": st.best_epoch, cfg.monitor: st.best_value}
                )
        for cb in self.callbacks:
            cb.on_eval_end(self, scalars)

    # ---------------------------------------------------------------------------------------------- evaluation
    @torch.inference_mode()
    def evaluate(self, loader: Any) -> dict[str, Any]:
        """Streaming metrics of `self.model` over `loader` (eval mode, same autocast as training)."""
        was_training = self.model.training
        self.model.eval()
        metrics = self.task.new_metrics(self.device)
        for batch in loader.epoch(0):
            with self.autocast():
                self.task.eval_batch(self.model, batch, metrics)
        self.model.train(was_training)
        self.strategy.reduce_metrics(metrics)  # each process saw its shard: sum the counts before deriving metrics
        return metrics.compute()

    # ------------------------------------------------------------------------------------------------- logging
    def log(self, record: dict[str, Any]) -> None:
        if self.run_dir is None or not is_main_process():
            return
        rec = {"step": self.state.step, "epoch": self.state.epoch, **record}
        rec["time"] = round(time.perf_counter() - self._t_start, 3)
        with (self.run_dir / "metrics.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        for cb in self.callbacks:
            cb.on_log(self, rec)

    # ------------------------------------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_dir(self) -> Path | None:
        return self.run_dir / "checkpoints" if self.run_dir is not None else None

    def _rng_tensors(self) -> dict[str, torch.Tensor]:
        out = {"rng.torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                out[f"rng.cuda.{i}"] = s
        return out

    def save_checkpoint(self) -> Path | None:
        self._count_samples()  # every rank saves (or returns below) at the same steps
        if self.checkpoint_dir is None or not (self.strategy.sharded or is_main_process()):
            return None
        sharded = self.strategy.sharded  # FSDP2: every rank writes its shards (below)
        if sharded:
            from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

            fqn_sd = get_optimizer_state_dict(self.model, self.optimizer)
            opt_shards, opt_meta = ckpt.split_optimizer(fqn_sd)
            tensors: dict[str, torch.Tensor] = {}
        else:
            opt_tensors, opt_meta = ckpt.flatten_optimizer(self.optimizer.state_dict())
            tensors = {f"optim.{k}": v for k, v in opt_tensors.items()}
        strategy_tensors, strategy_meta = self.strategy.state_dict()
        tensors.update({f"strategy.{k}": v for k, v in strategy_tensors.items()})
        tensors.update(self._rng_tensors())
        if self.best_weights is not None and not sharded:
            tensors.update({f"best.{k}": v for k, v in self.best_weights.items()})
        if self.scaler is not None:
            opt_meta["scaler"] = {
                k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in self.scaler.state_dict().items()
            }
        state = {
            "train_state": asdict(self.state),
            "optimizer": opt_meta,
            "elapsed_s": time.perf_counter() - self._t_start,
            "strategy": strategy_meta,
            "has_best": self.best_weights is not None,
            "plan": {"epochs": self.epochs, "precision": precision_name(self.autocast_dtype)},
        }
        if sharded:
            shards = {"model": get_model_state_dict(self.model), "optim": opt_shards}
            if self.best_weights is not None:
                shards["best"] = self.best_weights
            self.last_checkpoint = ckpt.save_sharded_checkpoint(
                self.checkpoint_dir, self.state.step, shards, tensors, state, keep=self.cfg.keep_checkpoints
            )
            return self.last_checkpoint
        self.last_checkpoint = ckpt.save_checkpoint(
            self.checkpoint_dir,
            self.state.step,
            self.model.state_dict(),
            tensors,
            state,
            keep=self.cfg.keep_checkpoints,
        )
        return self.last_checkpoint

    def resume(self, folder: Path) -> None:
        """Restore everything from a checkpoint folder; `fit()` then continues exactly where it stopped."""
        model_state, extra, state = ckpt.load_checkpoint(folder)
        plan = state.get("plan") or {}
        # `api.train` resumes in the planned precision, so the plan changes only if the data did (or a caller built
        # this Trainer in another precision): refuse rather than train another schedule.
        if plan.get("epochs", self.epochs) != self.epochs:
            raise UserError(
                f"{folder}: the run was planned for {plan['epochs']} epochs training in {plan.get('precision')}; here "
                f"it would train in {precision_name(self.autocast_dtype)} for {self.epochs} (train.epochs auto sizes "
                "the run by its data and precision): resume it with the data and precision it started with"
            )
        best: dict[str, torch.Tensor] = {}
        if ckpt.is_sharded(folder):  # written by N ranks under FSDP2: read back on any number, FSDP2 or not
            best = self._load_sharded(folder, state)
        else:
            self.strategy.load_model_state(self.model, model_state)
            opt_tensors = {k.removeprefix("optim."): v for k, v in extra.items() if k.startswith("optim.")}
            opt_sd = ckpt.unflatten_optimizer(opt_tensors, state["optimizer"])
            self.strategy.load_optimizer_state(self.model, self.optimizer, opt_sd)
            best = {k.removeprefix("best."): v.to(self.device) for k, v in extra.items() if k.startswith("best.")}
        # Keep optimizer moments in their parameter's memory format (channels_last kernels were saved contiguous).
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                for k, v in self.optimizer.state.get(p, {}).items():
                    if isinstance(v, torch.Tensor) and v.shape == p.shape and v.stride() != p.stride():
                        self.optimizer.state[p][k] = torch.empty_like(p, dtype=v.dtype).copy_(v)
        if self.scaler is not None and "scaler" in state["optimizer"]:
            self.scaler.load_state_dict(state["optimizer"]["scaler"])
        self.best_weights = best or None
        torch.set_rng_state(extra["rng.torch"])
        if torch.cuda.is_available():
            cuda_states = [extra[k] for k in sorted(extra) if k.startswith("rng.cuda.")]
            if cuda_states:
                torch.cuda.set_rng_state_all(cuda_states)
        strategy_tensors = {k.removeprefix("strategy."): v for k, v in extra.items() if k.startswith("strategy.")}
        self.strategy.load_state_dict(strategy_tensors, state.get("strategy", {}))
        self.state = TrainState(**state["train_state"])
        self._elapsed_before = self._elapsed_total = float(state.get("elapsed_s", 0.0))
        self.last_checkpoint = folder

    def _load_sharded(self, folder: Path, state: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Weights and optimizer state from a sharded checkpoint, resharded onto this run's processes (the distributed
        state-dict API shapes the template: DTensor shards under FSDP2, whole tensors otherwise). Returns the best
        weights so far ({} when none were kept)."""
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        model_sd = get_model_state_dict(self.model)
        opt_shards, _ = ckpt.split_optimizer(get_optimizer_state_dict(self.model, self.optimizer))
        template: dict[str, Any] = {"model": model_sd, "optim": opt_shards}
        if state.get("has_best"):
            template["best"] = {k: v.detach().clone() for k, v in model_sd.items()}
        ckpt.load_sharded(folder, template)
        set_model_state_dict(self.model, template["model"])
        set_optimizer_state_dict(self.model, self.optimizer, ckpt.join_optimizer(template["optim"], state["optimizer"]))
        return template.get("best", {})

    @staticmethod
    def truncate_log(run_dir: Path, step: int) -> None:
        """Drop metrics.jsonl records written after checkpoint `step` (they will be written again)."""
        path = run_dir / "metrics.jsonl"
        if not path.is_file():
            return
        keep = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by the kill
        write_text_atomic(path, "".join(x + "\n" for x in keep))
