"""The model contract, declared once (timm's `forward_features` / `forward_head`; torchtitan's models that know
nothing of devices, optimizers or parallelism).

- `ModelBase`: every bigmodel model. `forward(inputs) -> logits`; the loss lives in the task. Hooks with neutral
  defaults that a model overrides when it owns more than its `state_dict` (a pretrained model with merged adapters,
  its own files, its own optimizer groups).
- `Classifier`: `forward_features(*inputs) -> (B, F)`, `forward_head(features) -> (B, num_classes)`, and
  `forward = forward_head ∘ forward_features` (explain and compress work on any classifier through these).
  Convnets add `cam_layer()` (the module whose activations Grad-CAM reads); token models add `input_embedding()`
  (what integrated gradients attribute to).
- Generators (`gpt`, `hf` causal LMs, `transformer-seq2seq`) expose `decoder()` / `generate` in their own family
  files; `Capability.GENERATES` / `TRANSLATES` declare them.

Registry entries declare what each model can do (`capabilities=`), so later verbs ask the registry instead of probing
attributes; `tests/test_model_contract.py` proves every registered name keeps its declarations.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch import nn


class Capability(str, Enum):
    CLASSIFIER = "classifier"  # forward_features / forward_head
    CONVNET = "convnet"  # cam_layer(); channels_last pays off
    TOKEN_INPUT = "token_input"  # input_embedding(): ids → vectors
    EXPORTABLE = "exportable"  # bigmodel export (ONNX, TorchScript, torch.export)
    QUANTIZABLE = "quantizable"  # int8 Linear / Embedding / LSTM
    PRUNABLE = "prunable"  # structured (channel) pruning; unstructured pruning works on every classifier
    EXPLAINABLE = "explainable"  # attributions through the contract above
    GENERATES = "generates"  # a language model: decoder(), stream / generate
    TRANSLATES = "translates"  # an encoder-decoder: beam search
    TRANSCRIBES = "transcribes"  # speech → text (CTC decoding): transcribe, /v1/transcribe
    SOLVED = "solved"  # fitted by a solver in one pass over the data (fit_solver), not by gradient steps


def decays(p: nn.Parameter) -> bool:
    """Weights (matrices, kernels) get weight decay and L1; biases and norm scales do not (as in timm, nanoGPT)."""
    return p.ndim >= 2


def keep_one_name(module: nn.Module, aliases: dict[str, str]) -> None:
    """`module` holds some tensors under two names (`alias` → `canonical`, relative to it): its state dict keeps the
    canonical name only (safetensors refuses two names for one tensor) and loading fills the alias from it, so a strict
    load works. The hooks edit the dict every level writes into, at whatever prefix `module` sits."""

    def drop(m: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        for alias in aliases:
            state_dict.pop(prefix + alias, None)

    def restore(m: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        for alias, canonical in aliases.items():
            if prefix + canonical in state_dict:
                state_dict.setdefault(prefix + alias, state_dict[prefix + canonical])

    module._register_state_dict_hook(drop)
    module._register_load_state_dict_pre_hook(restore, with_module=True)


class ModelBase(nn.Module):
    """Every bigmodel model. The hooks below have neutral defaults; the artifact and the optimizer call them."""

    def artifact_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights the artifact stores (a pretrained model: adapters merged, tied tensors once)."""
        return self.state_dict()

    def save_artifact_files(self, folder: Path) -> None:
        """Files beyond the weights that rebuild the model (a pretrained model's `hf/` config)."""

    def artifact_options(self) -> dict[str, Any] | None:
        """The model options the artifact rebuilds from, when they differ from the recipe's (None: the recipe's)."""
        return None

    def optimizer_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]] | None:
        """Own optimizer parameter groups (layer-wise learning rates), or None for the default two groups."""
        return None

    def shard_units(self) -> list[nn.Module]:
        """The repeated blocks FSDP2 shards one by one (`train.distributed.strategy: fsdp2`): each block's full
        weights are gathered just before its forward and freed after, so a process holds one block whole at a time.
        What is left (embeddings, heads, norms) is sharded as one unit with the root. Default: none (the whole model
        is one unit)."""
        return []

    # Generators: how a prompt becomes ids and when generation stops, when the model knows better than the
    # artifact's tokenizer (a pretrained chat model: its template, BOS, end-of-turn ids).
    @property
    def uses_chat(self) -> bool:
        """Whether prompts are wrapped in a chat template (then a reply does not continue the prompt)."""
        return False

    def prompt_ids(self, prompt: str) -> list[int] | None:
        """Token ids of a generation prompt, or None to encode it with the artifact's tokenizer."""
        return None

    def stop_token_ids(self) -> set[int] | None:
        """Ids that end generation (besides `--stop` strings), or None."""
        return None


class Classifier(ModelBase):
    """`forward(*inputs) == forward_head(forward_features(*inputs))`. Subclasses define the two halves."""

    def forward_features(self, *inputs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(*inputs))


class ConvClassifier(Classifier):
    """A convnet classifier: Grad-CAM reads `cam_layer()`'s output (the last spatial feature map)."""

    def cam_layer(self) -> nn.Module:
        raise NotImplementedError


class SolvedClassifier(Classifier):
    """A classic model fitted by a solver (scikit-learn) rather than by gradient steps: the Trainer hands it the
    training and validation batches once (`fit_solver`), and the fitted coefficients land in its parameters and
    buffers, so its artifact, evaluation, prediction, serving and export are every other classifier's."""

    def fit_solver(self, train: Any, val: Any | None, seed: int) -> dict[str, Any]:
        """Fit on `train` (then choose settings on `val`): each is a callable giving an iterator of
        `(inputs tuple, labels)` batches. Returns what to log (e.g. the chosen C)."""
        raise NotImplementedError


class TokenClassifier(Classifier):
    """A classifier over token ids: integrated gradients attribute to `input_embedding()`'s output."""

    def input_embedding(self) -> nn.Module:
        raise NotImplementedError
