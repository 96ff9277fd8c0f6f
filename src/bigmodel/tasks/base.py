"""Task specs: one registered object per task owns what the task *is* (torchtitan's `TrainSpec`, timm's
`TrainingTask`): how its data loads and its preprocessing is fitted or applied, the loader of a split (sharded by
rank / world size), the objective (loss + streaming metrics), extra evaluation, and raw input → predictions.

`api.py` asks the spec of `recipe.task` (or of an artifact's `config["task"]`); there is no `if task == ...` chain
outside `tasks/` and the recipe schema, and an unknown task is an error. A new task is a new file here with a
`register_task(...)` line in `_load_builtin_tasks`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from bigmodel.config import TokenizerConfig
from bigmodel.errors import UserError


class InputError(UserError):
    """A malformed input to a served model (the server answers 422 with this message)."""


@dataclass
class ExportSignature:
    """What `bigmodel export` traces: a module taking raw inputs (preprocessing inside the graph), real example
    inputs, their names and dynamic axes, and how each input's shape is described in export.json."""

    module: Any  # nn.Module
    inputs: tuple[Any, ...]
    names: list[str]
    dynamic_shapes: Any
    shapes: list[list[Any]]
    padded: bool = False  # inputs are (values (B, T, ...), lengths (B,)): a selection is cut to its longest
    outputs: dict[str, list[Any]] | None = None  # output name → shape; None: one output, "logits" (batch, labels)

    def select(self, idx: Any) -> tuple[Any, ...]:
        """The inputs of examples `idx` (a batch for a latency measurement, or of one for the dynamic-batch check)."""
        out = tuple(t[idx] for t in self.inputs)
        if self.padded:
            x, lengths = out
            out = (x[:, : int(lengths.max())], lengths)
        return out

    def batch_one(self) -> tuple[Any, ...]:
        import torch

        return self.select(torch.arange(1))


@dataclass(frozen=True)
class LoaderOptions:
    """How a loader is asked for: training or evaluation, where, how big, and which share of each batch."""

    train: bool
    device: Any
    channels_last: bool
    batch_size: int
    default_batch_size: bool  # the recipe's size (a task may cap an evaluation batch's memory), not the caller's
    rank: int = 0
    world_size: int = 1

    def plan_kwargs(self, recipe: Any, drop: bool = True) -> dict[str, Any]:
        """The sampling plan's arguments every loader takes: seed, sharding, device (and drop_last: training drops
        a ragged last batch)."""
        kw = {"seed": recipe.seed, "device": self.device, "rank": self.rank, "world_size": self.world_size}
        return {**kw, "drop_last": self.train} if drop else kw


class TaskSpec(ABC):
    """The interface every task implements. `kind` names the model input the task produces (the artifact's
    `preprocess.kind`: image, sequence, text, lm, translation, ...)."""

    name: str
    kind: str
    channels_last: bool = False  # whether its inputs are images that a convnet may take channels-last
    loader_workers: bool = False  # whether its loader makes batches in worker processes (`train.num_workers`)
    data_config: type[BaseModel]  # the class that validates the recipe's `data` block (its keys are the task's)
    inputs: Literal["files", "texts", "prompt"] = "files"  # what `predict` takes: files or strings (or generate)
    generative: bool = False  # monitors val_loss; needs a reversible tokenizer
    per_example_outputs: bool = False  # evaluation can keep (N, K) logits per example (the report's calibration)

    # -------------------------------------------------------------------------------------------------- recipe
    def check_recipe(self, recipe: Any) -> None:
        """Cross-field checks and task defaults of a recipe whose `data` block is set (raise ValueError naming the
        field); the data block's own keys were checked by `data_config`."""
        data = recipe.data
        hf = recipe.model.name == "hf"
        tok = getattr(data, "tokenizer", None)  # text, language-model and translation blocks have one
        if hf and tok:
            default = TokenizerConfig()
            extra = [
                k for k in TokenizerConfig.model_fields if k != "max_length" and getattr(tok, k) != getattr(default, k)
            ]
            if extra:
                raise ValueError(
                    f"data.tokenizer.{extra[0]} does not apply to model.name 'hf': the tokenizer comes with the "
                    "pretrained model (only data.tokenizer.max_length applies)"
                )
        if recipe.train.num_workers and not self.loader_workers:
            raise ValueError(
                f"train.num_workers applies to image_classification (batches made in workers), not {self.name!r}"
            )
        if recipe.eval.tta_flip and not self.channels_last:
            raise ValueError(f"eval.tta_flip applies to image_classification only, not {self.name!r}")
        if self.generative:
            self.monitor_val_loss(recipe)
            if not hf:
                # Generated text should read like the data: keep case and no [CLS] unless asked for.
                if "lowercase" not in tok.model_fields_set:
                    tok.lowercase = False
                if "add_cls" not in tok.model_fields_set:
                    tok.add_cls = False
                if "kind" not in tok.model_fields_set:
                    tok.kind = "bpe"
                if tok.kind not in ("char", "bpe"):
                    raise ValueError(
                        f"data.tokenizer.kind {tok.kind!r}: generative tasks need a reversible tokenizer (char or bpe)"
                    )
        if recipe.train.early_stopping is not None and not data.may_have_val_split():
            raise ValueError("train.early_stopping needs a validation split; set data.val_fraction > 0")

    def monitor_val_loss(self, recipe: Any, allowed: tuple[str, ...] = ("val_loss",)) -> None:
        """Set `train.monitor` to `allowed[0]` unless the recipe names one; refuse any other than `allowed`."""
        if "monitor" not in recipe.train.model_fields_set:
            recipe.train.monitor = allowed[0]
        elif recipe.train.monitor not in allowed:
            raise ValueError(f"train.monitor {recipe.train.monitor!r}: {self.name} monitors {' or '.join(allowed)}")

    # ---------------------------------------------------------------------------------------------------- data

    @abstractmethod
    def prepare(self, recipe: Any, pre: Any | None = None) -> tuple[Any, Any]:
        """Load the recipe's data in model form → (data, Preprocess). Without `pre`, fit the preprocessing on the
        training split (normalisation statistics, tokenizer); with `pre` (from an artifact), apply exactly that."""

    def loader(
        self,
        recipe: Any,
        data: Any,
        pre: Any,
        split: str,
        *,
        train: bool = False,
        device: Any = "cpu",
        channels_last: bool = False,
        batch_size: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> Any:
        """The batch loader of `split`: training order and augmentation when `train`, else in order; this process's
        share (`rank` of `world_size`) of every batch. `batch_size` overrides the recipe's."""
        default = recipe.train.batch_size if train else recipe.eval.batch_size
        opts = LoaderOptions(train, device, channels_last, batch_size or default, batch_size is None, rank, world_size)
        return self.build_loader(recipe, data.split(split), pre, opts)

    @abstractmethod
    def build_loader(self, recipe: Any, split: Any, pre: Any, opts: LoaderOptions) -> Any:
        """The loader over one split's data (what `loader` calls with its options gathered)."""

    @abstractmethod
    def objective(self, recipe: Any, data: Any, num_classes: int, labels: list[str]) -> Any:
        """The training objective: `.loss(model, batch)`, `.new_metrics(device)`, `.eval_batch(model, batch, m)`.
        `recipe` is None for a plain evaluation of an artifact (no training options apply)."""

    def baseline_features(self, recipe: Any, data: Any, pre: Any, split: str) -> Any:
        """The classic baseline's inputs (`evaluation.baseline.BaselineFeatures`: train, val and `split`), from the
        run's own prepared `data` and preprocessing; None: the task has no baseline (generative tasks)."""
        return None

    def write_shards(self, recipe: Any, out: Any, shard_size: int) -> dict[str, Any]:
        """`bigmodel data prepare` (`api.prepare_shards`, which has checked the recipe and `out` already): write the
        recipe's splits as shards under `out` (through `data.shards.prepared_folder`); returns the index."""
        raise UserError(
            f"task {self.name!r}: data prepare writes image_classification, text_classification, "
            "audio_classification, speech_recognition, language_modeling and translation data so far"
        )

    prepared_unit = "examples"  # what a prepared split's `count` counts (images, tokens, ...)

    def prepared_summary(self, index: dict[str, Any]) -> str:
        """One line of what `write_shards`'s folder holds (its index), per split, in the task's own units: what
        `bigmodel data prepare` prints. Default: each split's `count` of `prepared_unit`, and its shard files."""

        def line(k: str, v: dict[str, Any]) -> str:
            files = f" in {len(v['shards'])} shards" if "shards" in v else ""
            return f"{k} {v['count']:,} {self.prepared_unit}{files}"

        return ", ".join(line(k, v) for k, v in index["splits"].items())

    def evaluate_extra(self, art: Any, data: Any, split: str, **options: Any) -> dict[str, Any]:
        """Metrics beyond the streaming ones (translation: BLEU / chrF of decoded text). Default: none."""
        return {}

    @abstractmethod
    def predict(
        self, art: Any, files: list[str | Path] | None, texts: list[str] | None, top_k: int
    ) -> list[dict[str, Any]]:
        """User-facing predictions from raw inputs (files or strings), with the artifact's own preprocessing."""

    def predict_files(self, art: Any, files: list[Path], top_k: int) -> list[dict[str, Any]]:
        """Top-k predictions for input files (images, sequence files, tables)."""
        raise UserError(f"{art.folder}: a {art.kind} model does not take files")

    def prepare_artifact(self, art: Any) -> None:
        """Set up what the artifact's inference needs beyond the model (images: the pixel normaliser)."""
        return None

    # ----------------------------------------------------------------------------------------------- the CLI
    def summary(self, metrics: dict[str, Any], split: str) -> str:
        """The one line `bigmodel train` / `evaluate` print for these metrics."""
        m = metrics
        return f"{split} accuracy {m.get('accuracy', float('nan')):.4f}  macro_f1 {m.get('macro_f1', float('nan')):.4f}"

    def format_prediction(self, result: dict[str, Any]) -> str:
        """One prediction as a line of `bigmodel predict` (name, then label and score per top-k entry)."""
        key = next((k for k in ("file", "row", "text") if k in result), "")
        name = str(result.get(key, "")).replace("\t", " ").replace("\n", " ")
        return f"{name}\t" + "\t".join(f"{p['label']} {p['score']:.4f}" for p in result["top_k"])

    # --------------------------------------------------------------------------------------------- serving
    def serve_item(self, art: Any, i: int, x: Any) -> Any:
        """Validate and prepare `inputs[i]` of a /v1/predict request (raise `InputError` for a bad one)."""
        raise InputError(f"this is a {art.kind} model; /v1/predict does not take it")

    def serve_batch(self, art: Any, batch: list[Any]) -> list[Any]:
        """Class probabilities for prepared items (one tensor (K,) each), run as one batch."""
        raise NotImplementedError

    # --------------------------------------------------------------------------------------------- explain
    def explain_items(
        self, art: Any, files: list[str | Path] | None, texts: list[str] | None
    ) -> tuple[list[str], list[Any]]:
        """Raw inputs of `bigmodel explain` (files or strings) → their names and items in `serve_item`'s prepared
        form (so the CLI and the server explain the same things)."""
        raise UserError(f"{art.folder}: a {self.name} model does not explain")

    def model_inputs(self, art: Any, items: list[Any]) -> tuple[Any, ...]:
        """Prepared items → the tensors the model's `forward` takes, as one batch (normalised, padded, encoded)."""
        raise UserError(f"{art.folder}: a {self.name} model does not explain")

    # ---------------------------------------------------------------------------------------------- report
    def report_sections(self, ctx: Any) -> list[Any]:
        """The task's own sections of `bigmodel report` (`bigmodel.report.html.Section`s), given the report context
        of one run (`ctx.final_metrics()`, `ctx.evaluation()`, `ctx.data`, `ctx.downloads`). Default: a note."""
        from bigmodel.report.html import Section, note

        return [Section(ctx.id("task"), "Task", note(f"No task-specific sections for {self.name}."))]

    # ---------------------------------------------------------------------------------------------- export
    def export_signature(self, art: Any, data: Any, n: int) -> ExportSignature:
        """The graph `bigmodel export` traces and up to `n` real test inputs of `data` for its parity check."""
        raise UserError(f"{art.folder}: a {self.name} model does not export (export takes classifiers)")


_TASKS: dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec) -> TaskSpec:
    if spec.name in _TASKS:
        raise ValueError(f"task {spec.name!r} registered twice")
    _TASKS[spec.name] = spec
    return spec


def _load_builtin_tasks() -> None:
    # Importing the task modules runs their register_task lines.
    import bigmodel.tasks.audio  # noqa: F401
    import bigmodel.tasks.image  # noqa: F401
    import bigmodel.tasks.language_modeling  # noqa: F401
    import bigmodel.tasks.sequence  # noqa: F401
    import bigmodel.tasks.speech  # noqa: F401
    import bigmodel.tasks.tabular  # noqa: F401
    import bigmodel.tasks.text  # noqa: F401
    import bigmodel.tasks.translation  # noqa: F401


def task_names() -> list[str]:
    _load_builtin_tasks()
    return sorted(_TASKS)


def get_task(name: str) -> TaskSpec:
    _load_builtin_tasks()
    try:
        return _TASKS[name]
    except KeyError:
        raise UserError(f"unknown task {name!r}; expected one of: {', '.join(sorted(_TASKS))}") from None


def refuse_inputs(art: Any, files: list[Any] | None, texts: list[str] | None, *, takes: str) -> None:
    """One-line errors for the wrong kind of raw input (strings for a file model, files for a text model)."""
    if takes == "files" and texts:
        raise UserError(f"{art.folder}: this is an {art.kind} model; give files, not text")
    if takes == "texts" and files:
        what = "a translation model takes sentences" if art.kind == "translation" else "a text model takes strings"
        raise UserError(f"{art.folder}: {what} (or --lines FILE), not files")
