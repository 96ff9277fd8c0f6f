"""bigmodel: from data to a trained, evaluated, compressed and served model — one recipe, one CLI, offline first.

`import bigmodel` stays light: heavy modules (torch, torchmetrics, PIL) load when a function needs them.

Python API (the CLI is a thin layer over these)::

    from bigmodel import load_recipe, train, evaluate, load_artifact
    recipe = load_recipe("recipes/quickstart.yaml", overrides=["train.epochs=2"])
    result = train(recipe, out="runs/qs")
    print(evaluate(result.run_dir, split="test")["accuracy"])
    artifact = load_artifact(result.run_dir)      # rebuilds the model from model/ alone
    artifact.predict_files(["shoe.png"], top_k=3)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["__version__", "evaluate", "load_artifact", "load_recipe", "train"]

if TYPE_CHECKING:
    from bigmodel.api import evaluate, train
    from bigmodel.config import load_recipe
    from bigmodel.runs import load_artifact


def __getattr__(name: str) -> Any:
    if name in ("train", "evaluate"):
        from bigmodel import api

        return getattr(api, name)
    if name == "load_recipe":
        from bigmodel.config import load_recipe

        return load_recipe
    if name == "load_artifact":
        from bigmodel.runs import load_artifact

        return load_artifact
    raise AttributeError(f"module 'bigmodel' has no attribute {name!r}")
