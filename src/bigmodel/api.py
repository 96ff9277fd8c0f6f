"""The Python API behind the CLI: train, resume, evaluate, predict.

recipe ─► data ─► model ─► task ─► Trainer.fit ─► run directory (recipe, env, metrics, checkpoints, model/)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bigmodel.config import Recipe, read_yaml, validate_recipe
from bigmodel.errors import TrainingDiverged, UserError
from bigmodel.fileio import write_json_atomic, write_text_atomic
from bigmodel.runs import (
    Preprocess,
    RunIndex,
    environment,
    is_recipe_file,
    load_artifact,
    new_run_dir,
    require_run_dir,
    save_artifact,
)
from bigmodel.training.distributed import barrier, is_main_process


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict[str, Any]  # the final evaluation on recipe.eval.split
    train_time_s: float
    steps: int
    stopped_early: bool
    baseline: dict[str, Any] | None = None  # the classic baseline's metrics on the same split (train.baseline)


@dataclass
class Experiment:
    """Everything a recipe builds: data, loaders, model, task — shared by train, evaluate and the benchmarks."""

    recipe: Recipe
    data: Any
    preprocess: Preprocess
    model: Any
    task: Any
    device: Any
    channels_last: bool
    model_options: dict[str, Any] | None = None  # the options the model was built with (init_from resolved)
    rank: int = 0  # this process's share of every batch under torchrun (0 of 1 otherwise)
    world_size: int = 1

    def loader(self, split: str, train: bool = False) -> Any:
        return make_loader(
            self.recipe,
            self.data,
            self.preprocess,
            split,
            train,
            self.device,
            self.channels_last,
            rank=self.rank,
            world_size=self.world_size,
        )

    def trainer(
        self,
        *,
        run_dir: Path | None = None,
        callbacks: list[Any] | None = None,
        model: Any = None,
        validate: bool = True,
        strategy: Any = None,
    ) -> Any:
        """A Trainer over this experiment's loaders (validation when the data has a val split and `validate`).
        `strategy`: a Trainer strategy of the caller's (a federated client's proximal term) instead of the one the
        recipe implies (single device, DDP, FSDP2, DP-SGD)."""
        from bigmodel.models.base import SolvedClassifier
        from bigmodel.training.strategy import get_strategy
        from bigmodel.training.trainer import Trainer

        has_val = validate and self.data.val is not None and len(self.data.val) > 0
        model = self.model if model is None else model
        dist_cfg = self.recipe.train.distributed
        own, strategy = strategy, None
        if self.world_size > 1 and dist_cfg.strategy == "fsdp2":
            import bigmodel.training.fsdp  # noqa: F401  (registers the `fsdp2` strategy)
            from bigmodel.training.trainer import resolve_precision

            if dist_cfg.sync_batchnorm:
                raise UserError("train.distributed.sync_batchnorm applies to strategy ddp, not fsdp2")
            strategy = get_strategy("fsdp2", param_dtype=resolve_precision(self.recipe.train.precision, self.device))
        elif self.world_size > 1:
            import bigmodel.training.ddp  # noqa: F401  (registers the `ddp` strategy)

            strategy = get_strategy("ddp", sync_batchnorm=dist_cfg.sync_batchnorm)
        if self.recipe.privacy.dp is not None:
            if self.world_size > 1:
                raise UserError("privacy.dp runs in one process so far; train it without --nproc-per-node / torchrun")
            strategy = self._dp_strategy()
        if own is not None:
            if strategy is not None:
                raise UserError(f"a {own.name} strategy cannot be combined with {strategy.name} in one run")
            strategy = own
        return Trainer(
            self.recipe.train,
            model,
            self.task,
            # a solver fits the training split as it is: no augmentation, no re-balancing draws
            self.loader("train", train=not isinstance(model, SolvedClassifier)),
            self.loader("val") if has_val else None,
            device=self.device,
            run_dir=run_dir,
            callbacks=callbacks,
            channels_last=self.channels_last,
            strategy=strategy,
        )

    def _dp_strategy(self) -> Any:
        """DP-SGD over this experiment's training split: the sampling rate and planned steps fix the noise."""
        import bigmodel.privacy.dp  # noqa: F401  (registers the `dp-sgd` strategy)
        from bigmodel.training.strategy import get_strategy
        from bigmodel.training.trainer import planned_epochs, resolve_precision

        cfg = self.recipe.train
        loader = self.loader("train", train=True)
        steps_per_epoch = len(loader)
        total = steps_per_epoch * planned_epochs(cfg, steps_per_epoch, resolve_precision(cfg.precision, self.device))
        if cfg.max_steps is not None:
            total = min(total, cfg.max_steps)
        return get_strategy(
            "dp-sgd",
            cfg=self.recipe.privacy.dp,
            num_examples=loader.plan.num_examples,  # the records Poisson sampling draws (LM: disjoint windows)
            batch_size=cfg.batch_size,
            total_steps=total,
        )

    def plain_model(self, state: dict[str, Any]) -> Any:
        """A fresh single-device model of this recipe holding `state` (whole weights gathered from FSDP2 shards)."""
        from bigmodel.models import build_model

        options = self.model_options if self.model_options is not None else self.recipe.model.options
        model = build_model(self.recipe.model.name, options, self.preprocess.input_shape, len(self.data.labels))
        model.load_state_dict(state)
        return model.to(self.device)


def make_loader(
    recipe: Recipe,
    data: Any,
    pre: Preprocess,
    split: str,
    train: bool = False,
    device: Any = "cpu",
    channels_last: bool = False,
    batch_size: int | None = None,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> Any:
    """The batch loader of `split` (the task spec's): training order, augmentation and balancing when `train`;
    this process's share (`rank` of `world_size`) of every batch."""
    from bigmodel.tasks import get_task

    return get_task(recipe.task).loader(
        recipe,
        data,
        pre,
        split,
        train=train,
        device=device,
        channels_last=channels_last,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
    )


def _hf_tokenizers(recipe: Recipe) -> tuple[Any, Any]:
    """A pretrained Hugging Face model's tokenizer and a copy of its fast backend (what bigmodel encodes with)."""
    from tokenizers import Tokenizer

    from bigmodel.models.hf import HFConfig, load_tokenizer

    hf_tok = load_tokenizer(HFConfig.model_validate(recipe.model.options))
    return hf_tok, Tokenizer.from_str(hf_tok.backend_tokenizer.to_str())


def hf_lm_preprocess(recipe: Recipe) -> Preprocess:
    """A pretrained language model's preprocessing: its own tokenizer, plain (no truncation or padding)."""
    from bigmodel.data.corpus import plain

    hf_tok, tok = _hf_tokenizers(recipe)
    ctx = recipe.data.context_length if recipe.data is not None else 2048
    spec = {"kind": "lm", "vocab_size": len(hf_tok), "context_length": ctx, "tokenizer": "hf"}
    return Preprocess(labels=[], mean=None, std=None, input_shape=spec, kind="lm", tokenizer=plain(tok))


def hf_text_preprocess(recipe: Recipe, labels: list[str]) -> Preprocess:
    """A pretrained classifier's preprocessing: its own tokenizer, truncated to `data.tokenizer.max_length` and
    padded with its pad (or EOS) token; nothing fitted."""
    assert recipe.data is not None
    hf_tok, tok = _hf_tokenizers(recipe)
    max_length = recipe.data.tokenizer.max_length
    pad = hf_tok.pad_token_id if hf_tok.pad_token_id is not None else (hf_tok.eos_token_id or 0)
    tok.enable_truncation(max_length=max_length)
    tok.enable_padding(pad_id=int(pad), pad_token=hf_tok.pad_token or hf_tok.eos_token or "[PAD]")
    spec = {
        "kind": "text",
        "vocab_size": len(hf_tok),
        "pad_id": int(pad),
        "has_cls": True,
        "tokenizer": "hf",
        "max_length": max_length,
        "labels": list(labels),
    }
    return Preprocess(labels=list(labels), mean=None, std=None, input_shape=spec, kind="text", tokenizer=tok)


def pretrained_artifact(path: str | Path) -> Any:
    """A pretrained language model straight from its recipe (`model.name: hf`), untrained, as an in-memory artifact:
    `bigmodel generate|serve|evaluate RECIPE.yaml`."""
    from bigmodel.config import load_recipe
    from bigmodel.models import build_model
    from bigmodel.runs import Artifact
    from bigmodel.tasks import get_task

    recipe = load_recipe(path)
    if recipe.model.name != "hf" or get_task(recipe.task).inputs != "prompt":
        raise UserError(
            f"{path}: only a pretrained language model (model.name hf, task language_modeling) runs from its recipe "
            f"as it is; train this one first: bigmodel train {path}"
        )
    pre = hf_lm_preprocess(recipe)
    model = build_model("hf", recipe.model.options, pre.input_shape, 0)
    config = {"task": recipe.task, "model": {"name": "hf", **recipe.model.options}, "input_shape": pre.input_shape}
    return Artifact.from_model(model, pre, config, Path(path))


def prepare_data(recipe: Recipe, pre: Preprocess | None = None) -> tuple[Any, Preprocess]:
    """Load the recipe's data and put it in model form (the task spec's). Without `pre`, fit the preprocessing on the
    training split (normalisation statistics, the tokenizer); with `pre` (from an artifact), apply exactly that."""
    from bigmodel.tasks import get_task

    if recipe.data is None:
        raise UserError(
            f"recipe {recipe.name or ''}: no data block, so nothing to train or evaluate on (a pretrained language "
            "model runs as it is: bigmodel generate RECIPE.yaml)"
        )
    return get_task(recipe.task).prepare(recipe, pre)


def prepare_shards(recipe: Recipe, out: str | Path, shard_size: int = 10_000) -> dict[str, Any]:
    """`bigmodel data prepare`: write the recipe's splits (carved with its seed) into the new folder `out` in the
    task's on-disk format, for `data.source: shards`; returns the folder's index. Nothing is read before `out` and
    the recipe are checked, and nothing is left half-written."""
    from bigmodel.data.shards import check_prepare
    from bigmodel.tasks import get_task

    if recipe.data is None:
        raise UserError(f"recipe {recipe.name or ''}: no data block, so nothing to prepare")
    check_prepare(recipe, Path(out))
    return get_task(recipe.task).write_shards(recipe, Path(out), shard_size)


def init_from_artifact(recipe: Recipe) -> Any:
    """The pretrained run named by `model.init_from` (a run directory or a run name in the index), or None."""
    ref = recipe.model.init_from
    if ref is None:
        return None
    path = Path(ref)
    if not path.exists():  # a run name: its latest finished run
        done = [r for r in RunIndex().list() if r["name"] == ref and r["status"] == "finished"]
        if not done:
            raise UserError(
                f"model.init_from {ref!r}: no such run directory, and no finished run of that name in the index "
                "(train the pretraining recipe first)"
            )
        path = Path(done[-1]["run_dir"])
    return load_artifact(path)


def model_options(recipe: Recipe, init: Any) -> dict[str, Any]:
    """The model's options; with `init_from`, the pretrained run's architecture (its width, depth, context)."""
    opts = dict(recipe.model.options)
    if init is None:
        return opts
    pre_cfg = {k: v for k, v in init.config["model"].items() if k != "name"}
    arch = ("dim", "num_heads", "num_layers", "activation", "max_len")
    for k in arch:
        if k in opts and k in pre_cfg and opts[k] != pre_cfg[k]:
            raise UserError(
                f"model.{k} is {opts[k]!r} but the pretrained run {recipe.model.init_from} has {pre_cfg[k]!r}; "
                "leave it out to take the pretrained value"
            )
        if k in pre_cfg:
            opts[k] = pre_cfg[k]
    if opts.get("max_len") is None:
        opts["max_len"] = int(init.config["input_shape"].get("context_length", 512))
    return opts


def load_pretrained(model: Any, init: Any, recipe: Recipe) -> None:
    """Copy the pretrained run's weights into `model`'s matching trunk; every trunk weight must be found."""
    import torch

    src = init.model.state_dict()
    dst = model.state_dict()
    prefix = "gpt." if any(k.startswith("gpt.") for k in dst) else ""
    copied = 0
    with torch.no_grad():
        for k, v in src.items():
            key = prefix + k
            if key in dst and dst[key].shape == v.shape:
                dst[key].copy_(v)
                copied += 1
    if copied != len(src):
        raise UserError(
            f"model.init_from {recipe.model.init_from}: only {copied} of {len(src)} pretrained tensors fit "
            f"model.name {recipe.model.name!r} (expected a gpt run for gpt-classifier)"
        )


def build_experiment(recipe: Recipe) -> Experiment:
    import torch

    from bigmodel.models import build_model
    from bigmodel.models.base import Capability
    from bigmodel.registry import get_model
    from bigmodel.tasks import get_task
    from bigmodel.training.distributed import get_rank, get_world_size
    from bigmodel.training.trainer import resolve_device

    spec = get_task(recipe.task)
    device = resolve_device(recipe.train.device)
    world = get_world_size()
    rank = get_rank() if world > 1 else 0  # a lone process is all of the data, whatever RANK says
    if world > 1 and device.type == "cuda":  # one GPU per process under torchrun
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    data, pre = prepare_data(recipe)
    init = init_from_artifact(recipe)
    options = model_options(recipe, init)
    torch.manual_seed(recipe.seed)  # weight init depends on the seed only
    try:
        model = build_model(recipe.model.name, options, pre.input_shape, len(data.labels))
    except ValueError as e:
        raise UserError(f"model.name {recipe.model.name!r}: {e}") from None
    if init is not None:
        load_pretrained(model, init, recipe)
    if recipe.privacy.dp is not None:  # layers without per-example gradients → ones with (recorded in the artifact)
        from bigmodel.privacy.dp import fix_model

        model = fix_model(model)
    task = spec.objective(recipe, data, len(data.labels), data.labels)
    cl = recipe.train.channels_last
    channels_last = get_model(recipe.model.name).can(Capability.CONVNET) if cl == "auto" else bool(cl)
    channels_last = channels_last and spec.channels_last and device.type != "mps"
    if world > 1:
        from bigmodel.models.base import SolvedClassifier

        if isinstance(model, SolvedClassifier):
            raise UserError(
                f"model.name {recipe.model.name!r} is fitted by its solver in one process; train it without "
                "--nproc-per-node / torchrun"
            )
    return Experiment(recipe, data, pre, model, task, device, channels_last, options, rank, world)


def _recipe_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)


def write_run_start(run_dir: Path, recipe: Recipe, device: str, **env_extra: Any) -> None:
    """A new run's resolved recipe (RUN/recipe.yaml) and environment and seed (RUN/env.json)."""
    write_text_atomic(run_dir / "recipe.yaml", _recipe_yaml(recipe))
    write_json_atomic(run_dir / "env.json", {**environment(device, recipe.seed), **env_extra})


def index_running(run_dir: Path, recipe: Recipe, index: RunIndex | None = None) -> None:
    """List the run in the run index (`bigmodel runs`) as running."""
    data_name = recipe.data.source + (f":{recipe.data.path}" if recipe.data.path else "")
    (index or RunIndex()).upsert(
        run_dir,
        name=recipe.name,
        task=recipe.task,
        model=recipe.model.name,
        data=data_name,
        seed=recipe.seed,
        status="running",
    )


def _planned_precision(recipe: Recipe, run_dir: Path) -> Recipe:
    """A resumed run trains in the precision its last checkpoint was planned in. `train.precision: auto` picks by
    machine (bf16 where the CPU runs it natively, else fp32), so resuming elsewhere would switch precision mid-run and,
    under a per-precision `train.min_steps`, the number of epochs: instead the recorded precision is kept (where bf16
    is emulated it trains slower, but it continues the same plan). An explicit precision is the recipe's own."""
    from bigmodel.training import checkpoint as ckpt

    folder = ckpt.latest_checkpoint(run_dir / "checkpoints")
    if recipe.train.precision != "auto" or folder is None:
        return recipe
    planned = (ckpt.read_state(folder).get("plan") or {}).get("precision")
    if planned not in ("fp32", "bf16", "fp16"):
        return recipe  # a checkpoint from before plans were recorded
    return recipe.model_copy(update={"train": recipe.train.model_copy(update={"precision": planned})})


def train(
    recipe: Recipe | None = None,
    *,
    out: str | Path | None = None,
    resume: str | Path | None = None,
    progress: bool | None = None,
    callbacks: list[Any] | None = None,
    report: bool = False,
) -> TrainResult:
    """Train `recipe` into a new run directory, or continue the run in `resume` exactly where it stopped.
    `report`: also write RUN/report.html (`bigmodel report`) at the end."""
    from bigmodel.training import checkpoint as ckpt
    from bigmodel.training.progress import ProgressCallback
    from bigmodel.training.trainer import Trainer

    if resume is not None:
        run_dir = require_run_dir(resume)
        saved = validate_recipe(read_yaml(run_dir / "recipe.yaml"), source=str(run_dir / "recipe.yaml"))
        if recipe is not None and recipe.to_dict() != saved.to_dict():
            a, b = recipe.to_dict(), saved.to_dict()
            diff = sorted(_diff(a, b))
            raise UserError(f"--resume {run_dir}: the recipe differs from the run's recipe.yaml at {', '.join(diff)}")
        recipe = _planned_precision(saved, run_dir)
    elif recipe is None:
        raise UserError("nothing to train: give a recipe file or --resume RUN_DIR")
    assert recipe is not None
    if recipe.train.track:  # a missing tracker fails before anything is written
        from bigmodel.training.tracking import require

        require(recipe.train.track)
    from bigmodel.training import ddp

    joined = not ddp.in_process_group()
    ddp.init_process_group(recipe.train.distributed.backend)  # under torchrun: join the job (else nothing)
    if resume is None:
        run_dir = new_run_dir(out, recipe.name or "run") if is_main_process() else Path(out or ".")
        run_dir = ddp.broadcast_object(run_dir)  # every rank reads and resumes from the folder rank 0 made

    exp = build_experiment(recipe)
    if resume is None and is_main_process():
        from bigmodel.training.distributed import get_world_size

        write_run_start(run_dir, recipe, str(exp.device), world_size=get_world_size())
    index = RunIndex() if is_main_process() else None
    if index:
        index_running(run_dir, recipe, index)

    cbs = list(callbacks or [])
    cbs.append(ProgressCallback(enabled=progress))
    trainer = exp.trainer(run_dir=run_dir, callbacks=cbs)
    ckpt_root = run_dir / "checkpoints"
    if resume is not None:
        if is_main_process():
            ckpt.clean_partial(ckpt_root)
        barrier()
        folder = ckpt.latest_checkpoint(ckpt_root)
        if folder is not None:
            trainer.resume(folder)
            Trainer.truncate_log(run_dir, trainer.state.step)
        else:
            Trainer.truncate_log(run_dir, -1)
        if is_main_process():
            append_event(run_dir, {"event": "resume", "from_step": trainer.state.step})
    tracking = None
    if recipe.train.track and is_main_process():
        from bigmodel.training.tracking import TrackingCallback, open_trackers

        env_file = run_dir / "env.json"
        env = json.loads(env_file.read_text(encoding="utf-8")) if env_file.is_file() else None
        resume_step = trainer.state.step if resume is not None else None
        tracking = TrackingCallback(
            open_trackers(
                recipe.train.track,
                run_dir,
                recipe.to_dict(),
                env,
                uri=recipe.train.tracking_uri,
                resume_step=resume_step,
            )
        )
        trainer.callbacks.append(tracking)
    try:
        result = _fit_and_finish(recipe, exp, trainer, run_dir, index)
    except BaseException as e:
        if isinstance(e, TrainingDiverged):
            if index:
                index.upsert(run_dir, status="diverged")
            if is_main_process():
                append_event(run_dir, {"event": "diverged", "step": trainer.state.step, "message": str(e)})
        if tracking is not None:
            tracking.close("failed")
        raise
    if tracking is not None:
        tracking.close("finished")
    if report and is_main_process():
        from bigmodel.report import write_report

        write_report([run_dir])
    # Under torchrun: every rank leaves the group together. A group left to the interpreter's exit can abort the
    # process ("terminate called without an active exception": gloo's threads destroyed while joinable).
    if joined:
        ddp.destroy()
    return result


def _fit_and_finish(recipe: Recipe, exp: Experiment, trainer: Any, run_dir: Path, index: Any) -> TrainResult:
    """Fit, save the artifact, evaluate it and write summary.json."""
    state = trainer.fit()
    train_time = trainer.train_time_s

    # The artifact, then the final evaluation with exactly what the artifact will reproduce.
    final = trainer.model
    if trainer.strategy.sharded:  # FSDP2: gather the whole weights (every rank takes part) into a plain model
        whole = trainer.strategy.full_model_state(trainer.model)
        final = exp.plain_model(whole) if is_main_process() else None
    if is_main_process():
        from bigmodel.models.base import ModelBase

        own = final.artifact_options() if isinstance(final, ModelBase) else None
        options = own if own is not None else (exp.model_options or recipe.model.options)  # hf: LoRA merged
        extra: dict[str, Any] = {}
        if recipe.privacy.dp is not None:  # the layer fix build_experiment applied, replayed when the artifact loads
            from bigmodel.privacy.dp import FIX

            extra |= {"model_fix": FIX, "privacy": trainer.strategy.summary()}
        if getattr(recipe.data, "mask_pii", None):  # predict, generate, translate and serve mask their inputs alike
            d = recipe.data
            extra["pii_mask"] = {"types": d.mask_pii, "style": d.mask_style, "model": str(d.pii_model or "") or None}
        save_artifact(
            run_dir / "model",
            final,
            recipe.task,
            {"name": recipe.model.name, **options},
            exp.preprocess,
            extra=extra or None,
        )
    # Final metrics through the same path as `bigmodel evaluate`: the saved artifact, fp32, so the numbers match.
    split = recipe.eval.split
    metrics = evaluate(run_dir, split, limit=recipe.eval.decode_limit, baseline=False) if is_main_process() else {}
    metrics = {k: v for k, v in metrics.items() if k not in ("run_dir", "split")}
    baseline = None
    # tasks without a baseline (generative ones) give None; a classic model is its own baseline
    if is_main_process() and recipe.train.baseline and not trainer.solved:
        from bigmodel.evaluation.baseline import run as fit_baseline

        baseline = fit_baseline(recipe, exp.data, exp.preprocess, split)
    if is_main_process():
        from bigmodel.training.trainer import precision_name

        trainer.log({"split": split, **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}})
        summary = {
            "run_dir": str(run_dir),
            "split": split,
            "metrics": metrics,
            "train_time_s": round(train_time, 3),
            "steps": state.step,
            "epochs_done": state.epoch,
            "epochs_planned": trainer.epochs,
            "precision": precision_name(trainer.autocast_dtype),
            "stopped_early": state.stopped_early,
            "best": {"monitor": recipe.train.monitor, "value": state.best_value, "epoch": state.best_epoch},
        }
        strategy_summary = trainer.strategy.summary()  # DP-SGD: ε, δ, σ, q, steps
        if strategy_summary is not None:
            summary["privacy"] = strategy_summary
        if exp.data.pii_masked is not None:  # data.mask_pii: values masked per type, all splits
            summary["pii_masked"] = exp.data.pii_masked
        if baseline is not None:
            summary["baseline"] = baseline
        write_json_atomic(run_dir / "summary.json", summary)
        if index:
            short = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            if baseline is not None:
                short |= {f"baseline_{k}": baseline[k] for k in ("accuracy", "macro_f1")}
            index.upsert(
                run_dir,
                status="finished",
                train_time_s=round(train_time, 3),
                metrics={f"{split}_{k}": v for k, v in short.items()},
            )
    return TrainResult(run_dir, metrics, train_time, state.step, state.stopped_early, baseline)


def append_event(run_dir: Path, record: dict[str, Any]) -> None:
    """One lifecycle event (resume, diverged) in RUN/events.jsonl, with the wall-clock time. metrics.jsonl stays the
    log of the training itself, identical for a resumed and an uninterrupted run."""
    import json
    import time

    rec = {**record, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with (run_dir / "events.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
        return out
    return [] if a == b else [prefix]


@dataclass
class Evaluation:
    """An evaluation with what it ran on: the artifact, the prepared data and, when kept, the per-example logits
    and targets of a classifier (in split order)."""

    metrics: dict[str, Any]
    recipe: Recipe
    artifact: Any
    data: Any
    logits: Any = None  # (N, K) float32
    targets: Any = None  # (N,) int64


class _Recorder:
    """Metrics that also keep each batch's logits and targets (classification metrics' `update(logits, y, ...)`)."""

    def __init__(self, metrics: Any) -> None:
        self.metrics = metrics
        self.logits: list[Any] = []
        self.targets: list[Any] = []

    def update(self, logits: Any, target: Any, *rest: Any) -> None:
        self.logits.append(logits.detach().float().cpu())
        self.targets.append(target.detach().cpu())
        self.metrics.update(logits, target, *rest)

    def compute(self) -> dict[str, Any]:
        return self.metrics.compute()


def evaluation(
    run_dir: str | Path,
    split: str = "test",
    batch_size: int | None = None,
    *,
    decode: bool = True,
    beam_size: int | None = None,
    limit: int | None = None,
    keep_outputs: bool = False,
    lm_weight: float | None = None,
    lm_bonus: float | None = None,
) -> Evaluation:
    """`evaluate`, returning the artifact and data it used and (`keep_outputs`, classifiers) the logits."""
    import torch

    from bigmodel.privacy.encrypt import decrypted, is_encrypted
    from bigmodel.tasks import get_task

    if is_encrypted(run_dir):  # `bigmodel export --encrypt`: the run's recipe and model, decrypted while evaluating
        with decrypted(run_dir) as folder:
            result = evaluation(
                folder,
                split,
                batch_size,
                decode=decode,
                beam_size=beam_size,
                limit=limit,
                keep_outputs=keep_outputs,
                lm_weight=lm_weight,
                lm_bonus=lm_bonus,
            )
        result.metrics["run_dir"] = str(run_dir)
        result.artifact.folder = Path(run_dir)
        return result

    if is_recipe_file(run_dir):  # a pretrained model as it is (before fine-tuning)
        from bigmodel.config import load_recipe

        recipe, art = load_recipe(run_dir), pretrained_artifact(run_dir)
    else:
        run_dir = require_run_dir(run_dir)
        recipe = validate_recipe(read_yaml(run_dir / "recipe.yaml"), source=str(run_dir / "recipe.yaml"))
        art = load_artifact(run_dir)
    if split not in ("train", "val", "test"):
        raise UserError(f"--split {split!r}: expected test, val or train")
    spec = get_task(recipe.task)
    data, _ = prepare_data(recipe, art.preprocess)
    loader = make_loader(recipe, data, art.preprocess, split, batch_size=batch_size)
    task = spec.objective(None, data, len(art.labels), art.labels)
    metrics = task.new_metrics()
    keep = keep_outputs and spec.per_example_outputs
    sink = _Recorder(metrics) if keep else metrics
    with torch.inference_mode():
        for batch in loader.epoch(0):
            task.eval_batch(art.inference_model, batch, sink)
    out = metrics.compute()
    options = {"decode": decode, "beam_size": beam_size, "limit": limit, "lm_weight": lm_weight, "lm_bonus": lm_bonus}
    out.update(spec.evaluate_extra(art, data, split, **options))
    result = Evaluation({"run_dir": str(run_dir), "split": split, **out}, recipe, art, data)
    if keep:
        assert isinstance(sink, _Recorder)
        result.logits = torch.cat(sink.logits) if sink.logits else torch.zeros(0, len(art.labels))
        result.targets = torch.cat(sink.targets) if sink.targets else torch.zeros(0, dtype=torch.long)
    return result


def evaluate(
    run_dir: str | Path,
    split: str = "test",
    batch_size: int | None = None,
    *,
    decode: bool = True,
    beam_size: int | None = None,
    limit: int | None = None,
    baseline: bool = True,
    lm_weight: float | None = None,
    lm_bonus: float | None = None,
) -> dict[str, Any]:
    """Metrics of the run's saved model on `split` of the run's own data (rebuilt from its recipe and seed).
    Language models: loss and perplexity. Translation: also BLEU and chrF of decoded translations (`decode`; beam
    search with `beam_size`, default the model's; `limit` = only the first N pairs). Classifiers trained with
    `train.baseline`: `baseline` holds the classic baseline's metrics on the same split (fitted by `train`).
    Speech recognition: CER / WER (greedy), with `beam_size` > 1 also beam search, fused with the model's character
    LM when it has one (`lm_weight` / `lm_bonus` override its settings; weight 0 turns it off)."""
    options = {"beam_size": beam_size, "limit": limit, "lm_weight": lm_weight, "lm_bonus": lm_bonus}
    metrics = evaluation(run_dir, split, batch_size, decode=decode, **options).metrics
    if baseline:
        stored = stored_baseline(run_dir, split)
        if stored is not None:
            metrics["baseline"] = stored
    return metrics


def stored_baseline(run_dir: str | Path, split: str) -> dict[str, Any] | None:
    """The baseline `train` fitted beside the run's model, when it was scored on `split`."""
    from bigmodel.evaluation.baseline import stored_for

    path = Path(run_dir) / "summary.json"
    try:
        summary = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError):
        summary = None
    return stored_for(summary, split)


def predict(
    run_dir: str | Path,
    files: list[str | Path] | None = None,
    top_k: int = 1,
    *,
    texts: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Top-k labels from the run's artifact alone: image files, sequence files (.ts, .npy, .npz, .csv) for sequence
    models, strings (`texts`) for text models."""
    from bigmodel.tasks import get_task

    art = load_artifact(run_dir)
    return get_task(art.config["task"]).predict(art, files, texts, top_k)
