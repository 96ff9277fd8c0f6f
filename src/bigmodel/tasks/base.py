"""Task specs: one registered object per task owns what the task *is* (torchtitan's `TrainSpec`, timm's
`TrainingTask`): how its data loads and its preprocessing is fitted or applied, the loader of a split (sharded by
rank / world size), the objective (loss + streaming metrics), extra evaluation, and raw input → predictions.

`api.py` asks the spec of `recipe.task` (or of an artifact's `config["task"]`); there is no `if task == ...` chain
outside `tasks/` and the recipe schema, and an unknown task is an error. A new task is a new file here with a
`register_task(...)` line in `_load_builtin_tasks`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from bigmodel.errors import UserError


class TaskSpec(ABC):
    """The interface every task implements. `kind` names the model input the task produces (the artifact's
    `preprocess.kind`: image, sequence, text, lm, translation, ...)."""

    name: str
    kind: str
    channels_last: bool = False  # whether its inputs are images that a convnet may take channels-last

    @abstractmethod
    def prepare(self, recipe: Any, pre: Any | None = None) -> tuple[Any, Any]:
        """Load the recipe's data in model form → (data, Preprocess). Without `pre`, fit the preprocessing on the
        training split (normalisation statistics, tokenizer); with `pre` (from an artifact), apply exactly that."""

    @abstractmethod
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
        """The batch loader of `split`: training order and augmentation when `train`, else in order."""

    @abstractmethod
    def objective(self, recipe: Any, data: Any, num_classes: int, labels: list[str]) -> Any:
        """The training objective: `.loss(model, batch)`, `.new_metrics(device)`, `.eval_batch(model, batch, m)`.
        `recipe` is None for a plain evaluation of an artifact (no training options apply)."""

    def evaluate_extra(self, art: Any, data: Any, split: str, **options: Any) -> dict[str, Any]:
        """Metrics beyond the streaming ones (translation: BLEU / chrF of decoded text). Default: none."""
        return {}

    @abstractmethod
    def predict(
        self, art: Any, files: list[str | Path] | None, texts: list[str] | None, top_k: int
    ) -> list[dict[str, Any]]:
        """User-facing predictions from raw inputs (files or strings), with the artifact's own preprocessing."""


_TASKS: dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec) -> TaskSpec:
    if spec.name in _TASKS:
        raise ValueError(f"task {spec.name!r} registered twice")
    _TASKS[spec.name] = spec
    return spec


def _load_builtin_tasks() -> None:
    # Importing the task modules runs their register_task lines.
    import bigmodel.tasks.image  # noqa: F401
    import bigmodel.tasks.language_modeling  # noqa: F401
    import bigmodel.tasks.sequence  # noqa: F401
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
