"""One small registry for models (and, as they come, data sources and tasks).

Recipes name entries (`model.name: cnn-small`), never import paths: code can move without breaking recipes.
Each model entry carries its own pydantic config class, so `model.*` keys are validated per model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel


@dataclass(frozen=True)
class ModelEntry:
    name: str
    config_cls: type[BaseModel]
    build: Callable[..., Any]  # build(config, input_shape, num_classes) -> nn.Module
    tasks: tuple[str, ...]
    description: str
    capabilities: frozenset[str] = frozenset()
    """What the model declares it can do (`bigmodel.models.base.Capability` values): later verbs ask this, never
    probe attributes; tests/test_model_contract.py holds every registered name to its declarations."""
    load_artifact: Callable[..., Any] | None = None
    """`load(folder, options, num_classes)` for models whose artifact holds more than weights (hf); default: build
    from the options, then load `model.safetensors`."""

    def can(self, capability: Any) -> bool:
        return str(getattr(capability, "value", capability)) in self.capabilities


_MODELS: dict[str, ModelEntry] = {}


def register_model(
    name: str,
    config_cls: type[BaseModel],
    *,
    tasks: tuple[str, ...],
    description: str,
    capabilities: tuple[Any, ...] = (),
    load_artifact: Callable[..., Any] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register `build(config, input_shape, num_classes)` under `name`, with its declared capabilities
    (and, for a model whose artifact holds more than weights, its own artifact loader)."""

    def deco(build: Callable[..., Any]) -> Callable[..., Any]:
        if name in _MODELS:
            raise ValueError(f"model {name!r} registered twice")
        caps = frozenset(str(getattr(c, "value", c)) for c in capabilities)
        _MODELS[name] = ModelEntry(name, config_cls, build, tasks, description, caps, load_artifact)
        return build

    return deco


def _load_builtin_models() -> None:
    # Importing the family modules runs their @register_model decorators.
    import bigmodel.models.audio  # noqa: F401
    import bigmodel.models.classic  # noqa: F401
    import bigmodel.models.cnn  # noqa: F401
    import bigmodel.models.ctc  # noqa: F401
    import bigmodel.models.gpt  # noqa: F401
    import bigmodel.models.hf  # noqa: F401
    import bigmodel.models.mlp  # noqa: F401
    import bigmodel.models.resnet  # noqa: F401
    import bigmodel.models.seq2seq  # noqa: F401
    import bigmodel.models.sequence  # noqa: F401


def model_names() -> list[str]:
    _load_builtin_models()
    return sorted(_MODELS)


def get_model(name: str) -> ModelEntry:
    _load_builtin_models()
    try:
        return _MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; expected one of: {', '.join(sorted(_MODELS))}") from None
