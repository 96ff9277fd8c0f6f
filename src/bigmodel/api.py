"""The Python API behind the CLI: train, resume, evaluate, predict.

recipe ─► data ─► model ─► task ─► Trainer.fit ─► run directory (recipe, env, metrics, checkpoints, model/)
"""

from __future__ import annotations

import time
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
from bigmodel.training.distributed import is_main_process


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict[str, Any]  # the final evaluation on recipe.eval.split
    train_time_s: float
    steps: int
    stopped_early: bool


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

    def loader(self, split: str, train: bool = False) -> Any:
        return make_loader(self.recipe, self.data, self.preprocess, split, train, self.device, self.channels_last)

    def trainer(
        self,
        *,
        run_dir: Path | None = None,
        callbacks: list[Any] | None = None,
        model: Any = None,
        validate: bool = True,
    ) -> Any:
        """A Trainer over this experiment's loaders (validation when the data has a val split and `validate`)."""
        from bigmodel.training.trainer import Trainer

        has_val = validate and self.data.val is not None and len(self.data.val) > 0
        return Trainer(
            self.recipe.train,
            self.model if model is None else model,
            self.task,
            self.loader("train", train=True),
            self.loader("val") if has_val else None,
            device=self.device,
            run_dir=run_dir,
            callbacks=callbacks,
            channels_last=self.channels_last,
        )


def make_loader(
    recipe: Recipe,
    data: Any,
    pre: Preprocess,
    split: str,
    train: bool = False,
    device: Any = "cpu",
    channels_last: bool = False,
    batch_size: int | None = None,
) -> Any:
    """The batch loader of `split`: training order, augmentation and balancing when `train`, else in order."""
    from bigmodel.data.loader import BatchLoader, Normalizer, SequenceLoader

    r = recipe
    bs = batch_size or (r.train.batch_size if train else r.eval.batch_size)
    if pre.kind == "lm":
        from bigmodel.data.corpus import WindowLoader

        T = r.data.context_length
        if not train and batch_size is None:  # keep an evaluation batch's logits under ~256 MB
            bs = max(1, min(bs, (1 << 26) // (T * int(pre.input_shape["vocab_size"]))))
        batches = r.data.batches_per_epoch if train else None
        return WindowLoader(data.split(split), T, bs, train=train, seed=r.seed, batches=batches, device=device)
    if pre.kind == "translation":
        from bigmodel.data.parallel import PairLoader

        if not train and batch_size is None:
            bs = max(1, min(bs, 256))
        return PairLoader(data.split(split), bs, shuffle=train, seed=r.seed, drop_last=train, device=device)
    sampling = r.data.balance if train and r.data.balance in ("oversample", "undersample") else "none"
    if pre.kind != "image":
        return SequenceLoader(
            data.split(split), bs, shuffle=train, seed=r.seed, drop_last=train, device=device, sampling=sampling
        )
    assert pre.mean is not None and pre.std is not None
    return BatchLoader(
        data.split(split),
        bs,
        Normalizer(pre.mean, pre.std, device),
        shuffle=train,
        seed=r.seed,
        augment=r.data.augment if train else None,
        drop_last=train,
        channels_last=channels_last,
        device=device,
        num_classes=len(data.labels),
        sampling=sampling,
    )


def hf_preprocess(recipe: Recipe, labels: list[str] | None = None) -> Preprocess:
    """The preprocessing of a pretrained Hugging Face model: its own tokenizer (a copy of the fast tokenizer's
    backend; truncated and padded for classification, plain for language models), nothing fitted."""
    from tokenizers import Tokenizer

    from bigmodel.data.corpus import plain
    from bigmodel.models.hf import HFConfig, load_tokenizer

    hf_tok = load_tokenizer(HFConfig.model_validate(recipe.model.options))
    tok = Tokenizer.from_str(hf_tok.backend_tokenizer.to_str())
    if recipe.task == "language_modeling":
        ctx = recipe.data.context_length if recipe.data is not None else 2048
        spec = {"kind": "lm", "vocab_size": len(hf_tok), "context_length": ctx, "tokenizer": "hf"}
        return Preprocess(labels=[], mean=None, std=None, input_shape=spec, kind="lm", tokenizer=plain(tok))
    assert recipe.data is not None
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
        "labels": list(labels or []),
    }
    return Preprocess(labels=list(labels or []), mean=None, std=None, input_shape=spec, kind="text", tokenizer=tok)


def pretrained_artifact(path: str | Path) -> Any:
    """A pretrained language model straight from its recipe (`model.name: hf`), untrained, as an in-memory artifact:
    `bigmodel generate|serve|evaluate RECIPE.yaml`."""
    from bigmodel.config import load_recipe
    from bigmodel.models import build_model
    from bigmodel.runs import Artifact

    recipe = load_recipe(path)
    if recipe.model.name != "hf" or recipe.task != "language_modeling":
        raise UserError(
            f"{path}: only a pretrained language model (model.name hf, task language_modeling) runs from its recipe "
            f"as it is; train this one first: bigmodel train {path}"
        )
    pre = hf_preprocess(recipe)
    model = build_model("hf", recipe.model.options, pre.input_shape, 0)
    config = {"task": recipe.task, "model": {"name": "hf", **recipe.model.options}, "input_shape": pre.input_shape}
    return Artifact.from_model(model, pre, config, Path(path))


def prepare_data(recipe: Recipe, pre: Preprocess | None = None) -> tuple[Any, Preprocess]:
    """Load the recipe's data and put it in model form. Without `pre`, fit the preprocessing on the training split
    (normalisation statistics, the tokenizer); with `pre` (from an artifact), apply exactly that."""
    cfg, seed = recipe.data, recipe.seed
    if cfg is None:
        raise UserError(
            f"recipe {recipe.name or ''}: no data block, so nothing to train or evaluate on (a pretrained language "
            "model runs as it is: bigmodel generate RECIPE.yaml)"
        )
    if recipe.task == "image_classification":
        from bigmodel.data.sources import load_data

        data = load_data(cfg, seed)
        if pre is None:
            mean, std = data.channel_stats()
            pre = Preprocess(
                labels=data.labels,
                mean=mean,
                std=std,
                input_shape=list(data.input_shape),
                tta_flip=recipe.eval.tta_flip,
            )
        return data, pre
    if recipe.task == "sequence_classification":
        from bigmodel.data.sequences import SeqDataset, load_sequences, standardize

        seq = load_sequences(cfg, seed)
        if pre is None:
            mean, std = seq.feature_stats() if cfg.normalize else (None, None)
            spec = {"kind": "sequence", "features": seq.num_features}
            pre = Preprocess(labels=seq.labels, mean=mean, std=std, input_shape=spec, kind="sequence")
        elif pre.input_shape.get("features") != seq.num_features:
            raise UserError(
                f"the data has {seq.num_features} features per step, the model expects {pre.input_shape['features']}"
            )
        if pre.mean is not None and pre.std is not None:
            m, sd = pre.mean, pre.std
            parts = [standardize(s, m, sd) if s is not None else None for s in (seq.train, seq.val, seq.test)]
            seq = SeqDataset(parts[0], parts[1], parts[2], seq.labels)  # type: ignore[arg-type]
        return seq, pre
    if recipe.task == "language_modeling":
        from bigmodel.data.corpus import load_corpus, tokenize_corpus, train_lm_tokenizer

        corpus = load_corpus(cfg, seed)
        if pre is None and recipe.model.name == "hf":
            pre = hf_preprocess(recipe)
        if pre is None:
            tok = train_lm_tokenizer(cfg.tokenizer, corpus.train)
            spec = {
                "kind": "lm",
                "vocab_size": tok.get_vocab_size(),
                "context_length": cfg.context_length,
                "tokenizer": cfg.tokenizer.kind,
            }
            pre = Preprocess(labels=[], mean=None, std=None, input_shape=spec, kind="lm", tokenizer=tok)
        return tokenize_corpus(corpus, pre.tokenizer), pre
    if recipe.task == "translation":
        from bigmodel.data.parallel import load_pairs, tokenize_pairs, train_pair_tokenizers

        pairs = load_pairs(cfg, seed)
        if pre is None:
            src_tok, tgt_tok = train_pair_tokenizers(cfg, pairs.train)
            spec = {
                "kind": "translation",
                "src_vocab_size": src_tok.get_vocab_size(),
                "tgt_vocab_size": (tgt_tok or src_tok).get_vocab_size(),
                "shared_vocab": tgt_tok is None,
                "max_length": cfg.tokenizer.max_length,
                "tokenizer": cfg.tokenizer.kind,
            }
            pre = Preprocess(
                labels=[],
                mean=None,
                std=None,
                input_shape=spec,
                kind="translation",
                tokenizer=src_tok,
                target_tokenizer=tgt_tok,
            )
        return tokenize_pairs(
            pairs, pre.tokenizer, pre.target_tokenizer or pre.tokenizer, cfg.tokenizer.max_length
        ), pre
    from bigmodel.data.text import load_text, tokenize_dataset, train_tokenizer

    text = load_text(cfg, seed)
    if pre is None and recipe.model.name == "hf":
        pre = hf_preprocess(recipe, text.labels)
    if pre is None:
        init = init_from_artifact(recipe)
        if init is not None:  # fine-tuning a pretrained run: its tokenizer, with this recipe's length limit
            from bigmodel.data.text import PAD_ID

            tok = init.preprocess.tokenizer
            tok.enable_truncation(max_length=cfg.tokenizer.max_length)
            tok.enable_padding(pad_id=PAD_ID, pad_token="[PAD]")
        else:
            tok = train_tokenizer(cfg.tokenizer, text.train.texts)
        spec = {
            "kind": "text",
            "vocab_size": tok.get_vocab_size(),
            "pad_id": 0,
            "has_cls": cfg.tokenizer.add_cls if init is None else False,
            "tokenizer": cfg.tokenizer.kind if init is None else init.preprocess.input_shape.get("tokenizer"),
            "max_length": cfg.tokenizer.max_length,
        }
        pre = Preprocess(labels=text.labels, mean=None, std=None, input_shape=spec, kind="text", tokenizer=tok)
    return tokenize_dataset(text, pre.tokenizer), pre


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
    from bigmodel.tasks.classification import ClassificationTask
    from bigmodel.training.trainer import resolve_device

    device = resolve_device(recipe.train.device)
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
    if recipe.task in ("language_modeling", "translation"):
        from bigmodel.tasks.generative import LanguageModelingTask, TranslationTask

        cls = LanguageModelingTask if recipe.task == "language_modeling" else TranslationTask
        return Experiment(recipe, data, pre, model, cls(recipe.train.label_smoothing), device, False, options)
    cl = recipe.train.channels_last
    channels_last = bool(getattr(model, "is_convnet", False)) if cl == "auto" else bool(cl)
    weights = None
    if recipe.data.balance == "class_weights":
        counts = torch.bincount(data.train.y, minlength=len(data.labels)).to(torch.float32)
        # N / (K * n_k): each class contributes equally to the loss; absent classes get weight 0.
        weights = torch.where(
            counts > 0, counts.sum() / (len(data.labels) * counts.clamp(min=1)), torch.zeros_like(counts)
        )
    task = ClassificationTask(
        len(data.labels),
        data.labels,
        recipe.train.label_smoothing,
        loss=recipe.train.loss,
        focal_gamma=recipe.train.focal_gamma,
        class_weights=weights,
    )
    channels_last = channels_last and pre.kind == "image" and device.type != "mps"
    return Experiment(recipe, data, pre, model, task, device, channels_last, options)


def _recipe_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)


def train(
    recipe: Recipe | None = None,
    *,
    out: str | Path | None = None,
    resume: str | Path | None = None,
    progress: bool | None = None,
    callbacks: list[Any] | None = None,
) -> TrainResult:
    """Train `recipe` into a new run directory, or continue the run in `resume` exactly where it stopped."""
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
        recipe = saved
    elif recipe is None:
        raise UserError("nothing to train: give a recipe file or --resume RUN_DIR")
    else:
        run_dir = new_run_dir(out, recipe.name or "run") if is_main_process() else Path(out or ".")
    assert recipe is not None

    exp = build_experiment(recipe)
    if resume is None and is_main_process():
        write_text_atomic(run_dir / "recipe.yaml", _recipe_yaml(recipe))
        write_json_atomic(run_dir / "env.json", environment(str(exp.device), recipe.seed))
    index = RunIndex() if is_main_process() else None
    data_name = recipe.data.source + (f":{recipe.data.path}" if recipe.data.path else "")
    if index:
        index.upsert(
            run_dir,
            name=recipe.name,
            task=recipe.task,
            model=recipe.model.name,
            data=data_name,
            seed=recipe.seed,
            status="running",
        )

    cbs = list(callbacks or [])
    cbs.append(ProgressCallback(enabled=progress))
    trainer = exp.trainer(run_dir=run_dir, callbacks=cbs)
    ckpt_root = run_dir / "checkpoints"
    if resume is not None:
        ckpt.clean_partial(ckpt_root)
        folder = ckpt.latest_checkpoint(ckpt_root)
        if folder is not None:
            trainer.resume(folder)
            Trainer.truncate_log(run_dir, trainer.state.step)
        else:
            Trainer.truncate_log(run_dir, -1)
    t0 = time.perf_counter()
    try:
        state = trainer.fit()
    except TrainingDiverged:
        if index:
            index.upsert(run_dir, status="diverged")
        raise
    train_time = time.perf_counter() - t0 + getattr(trainer, "_elapsed_before", 0.0)

    # The artifact, then the final evaluation with exactly what the artifact will reproduce.
    if is_main_process():
        own = getattr(trainer.model, "artifact_options", None)  # e.g. hf: LoRA merged, nothing frozen any more
        options = own() if own is not None else (exp.model_options or recipe.model.options)
        save_artifact(
            run_dir / "model", trainer.model, recipe.task, {"name": recipe.model.name, **options}, exp.preprocess
        )
    # Final metrics through the same path as `bigmodel evaluate`: the saved artifact, fp32, so the numbers match.
    split = recipe.eval.split
    metrics = evaluate(run_dir, split, limit=recipe.eval.decode_limit) if is_main_process() else {}
    metrics = {k: v for k, v in metrics.items() if k not in ("run_dir", "split")}
    if is_main_process():
        trainer.log({"split": split, **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}})
        summary = {
            "run_dir": str(run_dir),
            "split": split,
            "metrics": metrics,
            "train_time_s": round(train_time, 3),
            "steps": state.step,
            "epochs_done": state.epoch,
            "stopped_early": state.stopped_early,
            "best": {"monitor": recipe.train.monitor, "value": state.best_value, "epoch": state.best_epoch},
        }
        write_json_atomic(run_dir / "summary.json", summary)
        if index:
            short = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            index.upsert(
                run_dir,
                status="finished",
                train_time_s=round(train_time, 3),
                metrics={f"{split}_{k}": v for k, v in short.items()},
            )
    return TrainResult(run_dir, metrics, train_time, state.step, state.stopped_early)


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
        return out
    return [] if a == b else [prefix]


def evaluate(
    run_dir: str | Path,
    split: str = "test",
    batch_size: int | None = None,
    *,
    decode: bool = True,
    beam_size: int | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """Metrics of the run's saved model on `split` of the run's own data (rebuilt from its recipe and seed).
    Language models: loss and perplexity. Translation: also BLEU and chrF of decoded translations (`decode`; beam
    search with `beam_size`, default the model's; `limit` = only the first N pairs)."""
    import torch

    from bigmodel.tasks.classification import ClassificationTask

    if is_recipe_file(run_dir):  # a pretrained model as it is (before fine-tuning)
        from bigmodel.config import load_recipe

        recipe, art = load_recipe(run_dir), pretrained_artifact(run_dir)
    else:
        run_dir = require_run_dir(run_dir)
        recipe = validate_recipe(read_yaml(run_dir / "recipe.yaml"), source=str(run_dir / "recipe.yaml"))
        art = load_artifact(run_dir)
    if split not in ("train", "val", "test"):
        raise UserError(f"--split {split!r}: expected test, val or train")
    data, _ = prepare_data(recipe, art.preprocess)
    loader = make_loader(recipe, data, art.preprocess, split, batch_size=batch_size)
    if recipe.task in ("language_modeling", "translation"):
        from bigmodel.tasks.generative import LanguageModelingTask, TranslationTask

        task: Any = LanguageModelingTask() if recipe.task == "language_modeling" else TranslationTask()
    else:
        task = ClassificationTask(len(art.labels), art.labels)
    metrics = task.new_metrics()
    with torch.inference_mode():
        for batch in loader.epoch(0):
            task.eval_batch(art.inference_model, batch, metrics)
    out = metrics.compute()
    if recipe.task == "translation" and decode:
        from bigmodel.models.seq2seq import score_translations

        out.update(score_translations(art, data.split(split), beam_size=beam_size, limit=limit))
    return {"run_dir": str(run_dir), "split": split, **out}


def predict(
    run_dir: str | Path,
    files: list[str | Path] | None = None,
    top_k: int = 1,
    *,
    texts: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Top-k labels from the run's artifact alone: image files, sequence files (.ts, .npy, .npz, .csv) for sequence
    models, strings (`texts`) for text models."""
    art = load_artifact(run_dir)
    if art.kind == "lm":
        raise UserError(f"{run_dir}: a language model generates text: `bigmodel generate {run_dir} --prompt ...`")
    if art.kind == "translation":
        if files:
            raise UserError(f"{run_dir}: a translation model takes sentences (or --lines FILE), not files")
        texts = list(texts or [])
        return [{"text": t, "translation": tr} for t, tr in zip(texts, art.translate(texts), strict=True)]
    if art.kind == "text":
        if files:
            raise UserError(f"{run_dir}: a text model takes strings (or --lines FILE), not files")
        return art.predict_texts(list(texts or []), top_k=top_k)
    if texts:
        raise UserError(f"{run_dir}: this is an {art.kind} model; give files, not text")
    for f in files or []:
        if not Path(f).is_file():
            raise UserError(f"{f}: {'image' if art.kind == 'image' else 'sequence'} file not found")
    return art.predict_files(list(files or []), top_k=top_k)
