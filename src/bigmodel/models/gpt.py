"""A decoder-only Transformer language model (GPT-2 layout) with a preallocated KV cache, and sampling.

- `gpt` (task `language_modeling`): ids (B, T) → next-token logits (B, T, V).
- `gpt-classifier` (task `text_classification`): the same trunk, pooled (last token or mean) → class logits; with
  `model.init_from: RUN` it starts from a pretrained `gpt` run (pretrain → fine-tune).
- `generate` / `stream`: greedy, temperature, top-k, top-p, repetition penalty, stop tokens, a seed; one forward of
  one new token per step thanks to the cache.

Layout (GPT-2): token + learned position embeddings → blocks of [LayerNorm → causal self-attention → residual,
LayerNorm → MLP (4x, GELU) → residual] → LayerNorm → LM head tied to the token embedding. The attention's fused
`qkv` projection is laid out as GPT-2's `c_attn`, so Hugging Face weights can be copied in later.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from bigmodel.models.base import Capability, Classifier, ModelBase, keep_one_name
from bigmodel.registry import register_model


@dataclass
class GPTConfig:
    vocab_size: int
    max_len: int = 256
    dim: int = 128
    num_heads: int = 4
    num_layers: int = 4
    dropout: float = 0.0
    activation: str = "gelu"  # gelu (tanh approximation, GPT-2's gelu_new) or relu

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")


class KVCache:
    """Keys and values of every layer, preallocated (layers, B, H, max_len, D); `length` positions are filled."""

    def __init__(self, cfg: GPTConfig, batch: int, device: torch.device | str = "cpu", dtype=torch.float32) -> None:
        D = cfg.dim // cfg.num_heads
        shape = (cfg.num_layers, batch, cfg.num_heads, cfg.max_len, D)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions' k, v (B, H, T, D) of `layer`; return all keys and values so far."""
        T = k.shape[2]
        end = self.length + T
        if end > self.k.shape[3]:
            raise ValueError(f"sequence length {end} exceeds the cache / model max_len {self.k.shape[3]}")
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.h, self.d = cfg.num_heads, cfg.dim // cfg.num_heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)  # GPT-2's c_attn
        self.proj = nn.Linear(cfg.dim, cfg.dim)  # GPT-2's c_proj
        self.dropout = cfg.dropout
        self.record = False  # explain's attention maps: keep the per-head weights (B, H, T, T) of a plain pass
        self.recorded: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.h, self.d).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        if cache is not None:
            k, v = cache.append(layer, k, v)
        T_k = k.shape[2]
        p = self.dropout if self.training else 0.0
        if self.record and T_k == T:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.d)
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            self.recorded = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1).detach()
        if T_k == T:  # no earlier positions: the plain causal mask
            out = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, dropout_p=p)
        elif T == 1:  # one new position (decoding): it sees every cached one, no mask needed
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        else:  # new positions see every cached one and the new ones up to themselves
            mask = torch.ones(T, T_k, dtype=torch.bool, device=x.device).tril(diagonal=T_k - T)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.proj(out.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.dim)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.dim)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.dim, 4 * cfg.dim),
            nn.GELU(approximate="tanh") if cfg.activation == "gelu" else nn.ReLU(),
            nn.Linear(4 * cfg.dim, cfg.dim),
        )
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None, layer: int) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), cache, layer))
        return x + self.drop(self.mlp(self.ln2(x)))


class GPT(ModelBase):
    per_example_positions = False
    """True (set by the DP fix): look positions up per example, (B, T) rather than (T,) shared by the batch; the same
    outputs, and the position table's gradient splits by example, which per-example clipping needs."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos = nn.Embedding(cfg.max_len, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(cfg.dim)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def input_embedding(self) -> nn.Module:
        """The token embedding (explain attributes to its output; the tied LM head reads its weight directly)."""
        return self.tok

    def shard_units(self) -> list[nn.Module]:
        return list(self.blocks)

    def decoder(self, batch: int, use_cache: bool = True) -> GPTDecoder:
        """The incremental decoder `stream` drives (every generating model has one)."""
        return GPTDecoder(self, batch, use_cache)

    def forward(self, ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits (B, T, V) for token ids (B, T); with a cache, `ids` are the positions after those cached."""
        h = self.hidden(ids, cache)
        if "head" in self._modules:  # the DP fix: the tied weight through a module per-example hooks see
            return self._modules["head"](h)
        return F.linear(h, self.tok.weight)  # the LM head is tied to the token embedding

    def per_example_head(self) -> None:
        """The DP fix: the tied LM head becomes a Linear module holding the token embedding's own Parameter, so
        per-example gradient hooks see both of its uses (lookup and head) and sum them per example. The same outputs;
        the state dict keeps one name for the weight (`tok.weight`) and loading fills the other."""
        if "head" in self._modules:
            return
        head = nn.Linear(self.cfg.dim, self.cfg.vocab_size, bias=False)
        head.weight = self.tok.weight
        self.head = head
        keep_one_name(self, {"head.weight": "tok.weight"})

    def hidden(self, ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """The final (normalised) hidden states (B, T, C)."""
        start = cache.length if cache is not None else 0
        T = ids.shape[1]
        if start + T > self.cfg.max_len:
            raise ValueError(f"sequence length {start + T} exceeds max_len {self.cfg.max_len}")
        pos = torch.arange(start, start + T, device=ids.device)
        if self.per_example_positions:  # DP-SGD: each example's own lookup, so it has a per-example gradient
            pos = pos.expand(ids.shape[0], T)
        x = self.drop(self.tok(ids) + self.pos(pos))
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i)
        if cache is not None:
            cache.length += T
        return self.ln_f(x)


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Keep the `top_k` largest logits and the smallest set whose probability reaches `top_p`; the rest → -inf."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) >= top_p  # tokens after the nucleus is complete
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    return logits


class GPTDecoder:
    """Next-token logits for `stream`: the preallocated KV cache until it is full, then a sliding window of the last
    `max_len` tokens recomputed each step. Called with the new tokens and the whole sequence so far."""

    def __init__(self, model: GPT, batch: int, use_cache: bool = True) -> None:
        self.model = model
        p = next(model.parameters())
        self.cache = KVCache(model.cfg, batch, p.device, p.dtype) if use_cache else None
        self.started = False

    def __call__(self, new: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
        max_len = self.model.cfg.max_len
        if self.cache is not None and self.cache.length >= max_len:
            self.cache = None  # the window is full: slide it from now on
        if self.cache is None:
            return self.model(full[:, -max_len:])[:, -1]
        ids = new if self.started else full[:, -max_len:]
        self.started = True
        return self.model(ids, self.cache)[:, -1]


@torch.inference_mode()
def stream(
    model: nn.Module,
    ids: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    stop_ids: set[int] | None = None,
    seed: int | None = None,
    use_cache: bool = True,
) -> Iterator[torch.Tensor]:
    """Yield the next tokens (B, 1) of `ids` (B, T) one step at a time. temperature 0 = greedy. Repetition penalty
    (CTRL): logits of tokens already in the sequence are divided by it when positive, multiplied when negative.
    Stops early once every row has emitted a stop id (rows already stopped repeat it). The context is the last
    `max_len` tokens: the cache serves until it is full, then each step recomputes that sliding window."""
    model.eval()
    if ids.shape[1] == 0:
        raise ValueError("generation needs at least one prompt token")
    g = torch.Generator(device=ids.device).manual_seed(seed) if seed is not None else None
    B = ids.shape[0]
    decoder = model.decoder(B, use_cache)
    out = ids
    logits = decoder(ids, ids)
    done = torch.zeros(B, dtype=torch.bool, device=ids.device)
    stops = torch.tensor(sorted(stop_ids), device=ids.device) if stop_ids else None
    for step in range(max_new_tokens):
        logits = logits.float()
        if repetition_penalty != 1.0:
            seen = torch.gather(logits, 1, out)
            seen = torch.where(seen > 0, seen / repetition_penalty, seen * repetition_penalty)
            logits = logits.scatter(1, out, seen)
        # Extreme penalties or temperatures overflow: keep every logit finite (-inf stays "never").
        big = torch.finfo(logits.dtype).max / 4
        logits = torch.nan_to_num(logits, nan=-big, posinf=big, neginf=float("-inf")).clamp(min=-big)
        if temperature < 1e-6:  # 0 (and anything a float32 division would turn into 0/0) is greedy
            nxt = logits.argmax(dim=-1, keepdim=True)
        else:
            # Shift by the max first: tiny temperatures then send the others to -inf (→ greedy), never to +inf.
            scaled = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
            probs = filter_logits(scaled, top_k, top_p).softmax(dim=-1)
            nxt = torch.multinomial(probs, 1, generator=g)
        if stops is not None:
            nxt = torch.where(done[:, None], stops[:1].expand_as(nxt), nxt)
            done |= torch.isin(nxt[:, 0], stops)
        yield nxt
        out = torch.cat([out, nxt], dim=1)
        if (stops is not None and bool(done.all())) or step == max_new_tokens - 1:
            break
        logits = decoder(nxt, out)


def generate(model: GPT, ids: torch.Tensor, max_new_tokens: int, **kw: Any) -> torch.Tensor:
    """`ids` (B, T) followed by up to `max_new_tokens` generated tokens (see `stream` for the options)."""
    return torch.cat([ids, *stream(model, ids, max_new_tokens, **kw)], dim=1)


@torch.no_grad()
def copy_gpt_to_hf(model: GPT, hf: nn.Module) -> None:
    """Copy our weights into a Hugging Face `GPT2LMHeadModel` of the same shape (n_embd, n_layer, n_head,
    n_positions ≥ max_len, vocab). GPT-2's Conv1D layers hold (in, out) matrices: our Linear weights transposed."""
    t = hf.transformer
    t.wte.weight.copy_(model.tok.weight)
    t.wpe.weight[: model.cfg.max_len].copy_(model.pos.weight)
    for ours, theirs in zip(model.blocks, t.h, strict=True):
        theirs.ln_1.load_state_dict(ours.ln1.state_dict())
        theirs.ln_2.load_state_dict(ours.ln2.state_dict())
        for src, dst in (
            (ours.attn.qkv, theirs.attn.c_attn),
            (ours.attn.proj, theirs.attn.c_proj),
            (ours.mlp[0], theirs.mlp.c_fc),
            (ours.mlp[2], theirs.mlp.c_proj),
        ):
            dst.weight.copy_(src.weight.t())
            dst.bias.copy_(src.bias)
    t.ln_f.load_state_dict(model.ln_f.state_dict())
    hf.lm_head.weight = t.wte.weight  # tied, as ours


# ------------------------------------------------------------------------------------------------- recipe models
class GPTModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dim: Annotated[int, Field(ge=8, le=8192)] = 128
    num_heads: Annotated[int, Field(ge=1, le=128)] = 4
    num_layers: Annotated[int, Field(ge=1, le=96)] = 4
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    activation: Literal["gelu", "relu"] = "gelu"
    """`gelu`: GPT-2's tanh approximation."""
    max_len: Annotated[int, Field(ge=2, le=65_536)] | None = None
    """Longest context (position table size); default: `data.context_length` (language models) or the
    tokenizer's `max_length` (classifiers)."""
    pooling: Literal["last", "mean"] = "last"
    """`gpt-classifier` only: the state of the last real token (it has seen the whole text) or the mean."""

    @model_validator(mode="after")
    def _cross(self) -> GPTModelConfig:
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        return self

    def gpt_config(self, vocab_size: int, max_len: int) -> GPTConfig:
        return GPTConfig(
            vocab_size=vocab_size,
            max_len=self.max_len or max_len,
            dim=self.dim,
            num_heads=self.num_heads,
            num_layers=self.num_layers,
            dropout=self.dropout,
            activation=self.activation,
        )


@register_model(
    "gpt",
    GPTModelConfig,
    tasks=("language_modeling",),
    capabilities=(Capability.GENERATES, Capability.TOKEN_INPUT),
    description="decoder-only Transformer LM (GPT-2 layout, tied head), KV-cached sampling",
)
def _gpt(cfg: GPTModelConfig, input_shape: Any, num_classes: int) -> nn.Module:
    if not isinstance(input_shape, dict) or input_shape.get("kind") != "lm":
        raise ValueError(f"gpt is a language model; it needs token streams, got input shape {input_shape!r}")
    return GPT(cfg.gpt_config(input_shape["vocab_size"], input_shape["context_length"]))


class GPTClassifier(Classifier):
    """A GPT trunk over right-padded token ids, pooled → linear. Causal attention: padding after a text never
    changes its states, so no padding mask is needed; `last` pools the state of the last real token."""

    def __init__(self, cfg: GPTConfig, num_classes: int, pooling: str = "last") -> None:
        super().__init__()
        self.gpt = GPT(cfg)  # only its trunk (`hidden`) is used
        self.pooling = pooling
        self.classifier = nn.Linear(cfg.dim, num_classes)
        self.cfg = cfg

    def shard_units(self) -> list[nn.Module]:
        return self.gpt.shard_units()

    def forward_features(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        ids = ids[:, : self.cfg.max_len]
        h = self.gpt.hidden(ids)  # (B, T, C)
        last = (lengths.clamp(1, ids.shape[1]) - 1).to(ids.device)
        if self.pooling == "last":
            return h[torch.arange(h.shape[0], device=h.device), last]  # (B, C)
        valid = (torch.arange(ids.shape[1], device=ids.device)[None, :] <= last[:, None]).unsqueeze(-1)
        return (h * valid).sum(dim=1) / valid.sum(dim=1)  # (B, C)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(features)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(ids, lengths))

    def input_embedding(self) -> nn.Module:
        return self.gpt.tok


@register_model(
    "gpt-classifier",
    GPTModelConfig,
    tasks=("text_classification",),
    capabilities=(
        Capability.CLASSIFIER,
        Capability.TOKEN_INPUT,
        Capability.EXPORTABLE,
        Capability.QUANTIZABLE,
        Capability.EXPLAINABLE,
    ),
    description="GPT trunk + last-token/mean pooling → classes; `model.init_from: RUN` fine-tunes a pretrained gpt",
)
def _gpt_classifier(cfg: GPTModelConfig, input_shape: Any, num_classes: int) -> nn.Module:
    if not isinstance(input_shape, dict) or input_shape.get("kind") != "text":
        raise ValueError(f"gpt-classifier needs text input (token ids), got input shape {input_shape!r}")
    max_len = int(input_shape.get("max_length", 512))
    return GPTClassifier(cfg.gpt_config(input_shape["vocab_size"], max_len), num_classes, cfg.pooling)
