"""Sequence and text classifiers: the RNN family (RNN / LSTM / GRU), a Transformer encoder classifier built from
`layers.py`, and a fastText-style embedding bag.

Contract: `forward(x, lengths) -> logits (B, K)`, where `x` is (B, T, F) float features (`sequence` inputs) or
(B, T) int64 token ids (`text` inputs, 0 = padding) and `lengths` (B,) counts the valid steps of each row; rows are
right-padded. The input description (`input_shape` in the artifact) is a dict:
`{"kind": "sequence", "features": F}` or `{"kind": "text", "vocab_size": V, "pad_id": 0, "has_cls": bool}`.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from bigmodel.models.audio import MelFrames, is_audio
from bigmodel.models.base import Capability, Classifier
from bigmodel.models.layers import (
    LearnedPositionalEmbedding,
    RotaryEmbedding,
    SinusoidalPositionalEncoding,
    TransformerEncoderBlock,
)
from bigmodel.registry import register_model

SEQ_TASKS = ("sequence_classification", "text_classification", "audio_classification")  # audio: on log-mel frames
SEQ_CAPABILITIES = (Capability.CLASSIFIER, Capability.EXPORTABLE, Capability.QUANTIZABLE, Capability.EXPLAINABLE)


def padding_mask(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """(B, T) bool, True at padded positions."""
    return torch.arange(T, device=lengths.device)[None, :] >= lengths[:, None]


def _spec(input_shape: Any) -> dict[str, Any]:
    if not isinstance(input_shape, dict) or input_shape.get("kind") not in ("sequence", "text"):
        raise ValueError(f"expects sequence or text input, got input shape {input_shape!r} (an image model instead?)")
    return input_shape


class MaskedPooling(nn.Module):
    """(B, T, C) states + padding mask → (B, C): mean or max over valid steps, or additive attention
    (score_t = vᵀ tanh(W h_t), softmax over valid steps, weighted sum)."""

    def __init__(self, mode: str, dim: int) -> None:
        super().__init__()
        self.mode = mode
        if mode == "attention":
            self.proj = nn.Linear(dim, dim)
            self.score = nn.Linear(dim, 1, bias=False)

    def forward(self, h: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        valid = (~pad).unsqueeze(-1)  # (B, T, 1)
        if self.mode == "mean":
            return (h * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1)
        if self.mode == "max":
            return h.masked_fill(~valid, float("-inf")).amax(dim=1)
        scores = self.score(torch.tanh(self.proj(h))).masked_fill(~valid, float("-inf"))  # (B, T, 1)
        return (scores.softmax(dim=1) * h).sum(dim=1)


# --------------------------------------------------------------------------------------------------------- RNNs
class RNNConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cell: Literal["rnn", "lstm", "gru"] = "lstm"
    """`rnn`: h_t = tanh(W x_t + U h_(t-1) + b); `lstm` and `gru`: gated cells."""
    hidden_size: Annotated[int, Field(ge=1, le=8192)] = 128
    num_layers: Annotated[int, Field(ge=1, le=16)] = 2
    bidirectional: bool = False
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    """Between stacked layers (needs num_layers ≥ 2 to act)."""
    pooling: Literal["last", "mean", "max", "attention"] = "last"
    """`last`: the final state of each sequence's true end (both directions when bidirectional); the others pool
    the per-step outputs over valid steps."""
    embedding_dim: Annotated[int, Field(ge=1, le=8192)] = 128
    """Text inputs: the token embedding size (sequence inputs feed their features directly)."""
    embed_dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    head_dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0


class GRUConfig(RNNConfig):
    cell: Literal["rnn", "lstm", "gru"] = "gru"


class VanillaRNNConfig(RNNConfig):
    cell: Literal["rnn", "lstm", "gru"] = "rnn"


class RNNClassifier(Classifier):
    """Embedding (text) → stacked RNN/LSTM/GRU over packed variable-length sequences → pooling → linear."""

    def __init__(self, cfg: RNNConfig, spec: dict[str, Any], num_classes: int) -> None:
        super().__init__()
        self.text = "vocab_size" in spec  # token ids (embedded) or feature vectors
        if self.text:
            self.embed = nn.Embedding(spec["vocab_size"], cfg.embedding_dim, padding_idx=spec.get("pad_id", 0))
            in_size = cfg.embedding_dim
        else:
            in_size = spec["features"]
        self.embed_dropout = nn.Dropout(cfg.embed_dropout)
        rnn_cls = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[cfg.cell]
        self.rnn = rnn_cls(
            in_size,
            cfg.hidden_size,
            num_layers=cfg.num_layers,
            batch_first=True,
            dropout=cfg.dropout if cfg.num_layers > 1 else 0.0,
            bidirectional=cfg.bidirectional,
        )
        self.dirs = 2 if cfg.bidirectional else 1
        out = cfg.hidden_size * self.dirs
        self.pooling = cfg.pooling
        self.pool = MaskedPooling(cfg.pooling, out) if cfg.pooling != "last" else None
        self.head_dropout = nn.Dropout(cfg.head_dropout)
        self.head = nn.Linear(out, num_classes)

    def forward_features(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) if self.text else x
        h = self.embed_dropout(h)
        T = h.shape[1]
        if self.dirs == 1:
            # Right padding comes after every valid step, so a forward-only RNN's outputs at valid steps are exact
            # without packing: take the output at each sequence's last step (or pool the valid ones). No packing
            # also means no data-dependent control flow, so the model exports (ONNX, torch.export).
            out, _ = self.rnn(h)
            if self.pool is None:
                idx = (lengths - 1).clamp(min=0).view(-1, 1, 1).expand(-1, 1, out.shape[-1])
                return out.gather(1, idx).squeeze(1)
            return self.pool(out, padding_mask(lengths, T))
        # Bidirectional: the backward direction must start at each sequence's true end → pack.
        packed = pack_padded_sequence(h, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, state = self.rnn(packed)
        if self.pool is None:
            h_n = state[0] if isinstance(state, tuple) else state  # (layers * dirs, B, H)
            return torch.cat(list(h_n[-self.dirs :]), dim=-1)  # the last layer, both directions
        out = pad_packed_sequence(out, batch_first=True, total_length=T)[0]
        return self.pool(out, padding_mask(lengths, T))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_dropout(features))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, lengths))

    def input_embedding(self) -> nn.Module | None:
        """Text: the token embedding (integrated gradients attribute to its output); sequences: None (the input
        values themselves are attributed)."""
        return self.embed if self.text else None


def _rnn(cfg: RNNConfig, input_shape: Any, num_classes: int) -> nn.Module:
    if is_audio(input_shape):
        return MelFrames(input_shape, lambda spec: RNNClassifier(cfg, spec, num_classes))
    return RNNClassifier(cfg, _spec(input_shape), num_classes)


register_model(
    "lstm-classifier",
    RNNConfig,
    tasks=SEQ_TASKS,
    capabilities=SEQ_CAPABILITIES,
    description="LSTM (stacked, optionally bidirectional) over packed sequences; last/mean/max/attention pooling",
)(_rnn)
register_model(
    "gru-classifier",
    GRUConfig,
    tasks=SEQ_TASKS,
    capabilities=SEQ_CAPABILITIES,
    description="GRU classifier (as lstm-classifier)",
)(_rnn)
register_model(
    "rnn-classifier",
    VanillaRNNConfig,
    tasks=SEQ_TASKS,
    capabilities=SEQ_CAPABILITIES,
    description="Elman RNN (tanh) classifier (as lstm-classifier)",
)(_rnn)


# -------------------------------------------------------------------------------------------------- Transformer
class TransformerClassifierConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dim: Annotated[int, Field(ge=8, le=8192)] = 128
    num_heads: Annotated[int, Field(ge=1, le=128)] = 4
    num_layers: Annotated[int, Field(ge=1, le=48)] = 2
    ff_dim: Annotated[int, Field(ge=1)] | None = None
    """Feed-forward width (default 4 x dim)."""
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    activation: Literal["relu", "gelu"] = "gelu"
    norm_first: bool = True
    """Pre-norm (LayerNorm before attention / feed-forward; trains without warm-up) or post-norm (the paper's)."""
    positional: Literal["sinusoidal", "learned", "rotary"] = "sinusoidal"
    pooling: Literal["cls", "mean"] = "mean"
    """`cls`: the first position's output (the tokenizer's `[CLS]`, or a learned vector prepended to sequences)."""
    max_length: Annotated[int, Field(ge=2, le=65_536)] = 512
    """Longest input the positional encoding covers."""
    attention: Literal["auto", "math", "sdpa"] = "auto"
    """`math`: the explicit softmax(QKᵀ/√d)V; `sdpa`: PyTorch's fused kernel (the default, `auto`)."""

    @model_validator(mode="after")
    def _cross(self) -> TransformerClassifierConfig:
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.positional == "rotary" and (self.dim // self.num_heads) % 2:
            raise ValueError(f"rotary positions need an even head size; dim / num_heads = {self.dim // self.num_heads}")
        return self


class TransformerClassifier(Classifier):
    """Token embedding x √dim (or a linear projection of features) + positions → encoder blocks → pool → linear."""

    def __init__(self, cfg: TransformerClassifierConfig, spec: dict[str, Any], num_classes: int) -> None:
        super().__init__()
        self.text = "vocab_size" in spec  # token ids (embedded) or feature vectors
        d = cfg.dim
        if self.text:
            self.embed = nn.Embedding(spec["vocab_size"], d, padding_idx=spec.get("pad_id", 0))
            nn.init.normal_(self.embed.weight, std=d**-0.5)
            with torch.no_grad():
                self.embed.weight[spec.get("pad_id", 0)].zero_()
        else:
            self.embed = nn.Linear(spec["features"], d)
        self.scale = math.sqrt(d) if self.text else 1.0
        self.pooling = cfg.pooling
        # A learned [CLS] vector is prepended unless the tokenizer already puts [CLS] first.
        self.cls = nn.Parameter(torch.zeros(1, 1, d)) if cfg.pooling == "cls" and not spec.get("has_cls") else None
        self.positional = cfg.positional
        self.pos: nn.Module | None = None
        self.rotary: RotaryEmbedding | None = None
        if cfg.positional == "sinusoidal":
            self.pos = SinusoidalPositionalEncoding(d, cfg.max_length + 1)
        elif cfg.positional == "learned":
            self.pos = LearnedPositionalEmbedding(d, cfg.max_length + 1)
        else:
            self.rotary = RotaryEmbedding(d // cfg.num_heads, cfg.max_length + 1)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            TransformerEncoderBlock(
                d, cfg.num_heads, cfg.ff_dim or 4 * d, cfg.dropout, cfg.activation, cfg.norm_first, cfg.attention
            )
            for _ in range(cfg.num_layers)
        )
        self.norm = nn.LayerNorm(d) if cfg.norm_first else nn.Identity()
        self.head = nn.Linear(d, num_classes)

    def forward_features(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) * self.scale
        if self.cls is not None:
            h = torch.cat([self.cls.expand(h.shape[0], -1, -1).to(h.dtype), h], dim=1)
            lengths = lengths + 1
        T = h.shape[1]
        if self.pos is not None:
            h = self.pos(h)
        h = self.dropout(h)
        pad = padding_mask(lengths, T)
        for block in self.blocks:
            h = block(h, key_padding_mask=pad, rotary=self.rotary)
        h = self.norm(h)
        if self.pooling == "cls":
            return h[:, 0]
        valid = (~pad).unsqueeze(-1)
        return (h * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, lengths))

    def shard_units(self) -> list[nn.Module]:
        return list(self.blocks)

    def input_embedding(self) -> nn.Module | None:
        """Text: the token embedding; sequences: None (the feature projection acts on the attributed values)."""
        return self.embed if self.text else None


@register_model(
    "transformer-classifier",
    TransformerClassifierConfig,
    tasks=SEQ_TASKS,
    capabilities=SEQ_CAPABILITIES,
    description="Transformer encoder (from-scratch attention), sinusoidal/learned/rotary positions, CLS/mean pooling",
)
def _transformer(cfg: TransformerClassifierConfig, input_shape: Any, num_classes: int) -> nn.Module:
    if is_audio(input_shape):
        frames = int(input_shape["samples"]) // int(input_shape["features"]["hop_length"]) + 1
        if frames > cfg.max_length:
            raise ValueError(f"model.max_length {cfg.max_length} is shorter than a clip's {frames} mel frames")
        return MelFrames(input_shape, lambda spec: TransformerClassifier(cfg, spec, num_classes))
    return TransformerClassifier(cfg, _spec(input_shape), num_classes)


# -------------------------------------------------------------------------------------------------- embedding bag
class EmbeddingBagConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    embedding_dim: Annotated[int, Field(ge=1, le=8192)] = 64
    mode: Literal["mean", "sum", "max"] = "mean"
    ngram_buckets: Annotated[int, Field(ge=0, le=10_000_000)] = 0
    """fastText-style n-grams: hash each run of 2..`ngrams` neighbouring tokens into this many extra embeddings
    (0 = off)."""
    ngrams: Annotated[int, Field(ge=2, le=8)] = 2
    """The longest hashed n-gram (fastText's `-wordNgrams`): 2 = bigrams; with a `char` tokenizer, 5 gives the
    character 2..5-grams a TF-IDF baseline uses."""
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0


class EmbeddingBagClassifier(Classifier):
    """fastText (Joulin et al. 2016): the average of token (and hashed bigram) embeddings → linear."""

    def __init__(self, cfg: EmbeddingBagConfig, spec: dict[str, Any], num_classes: int) -> None:
        super().__init__()
        if "vocab_size" not in spec:
            raise ValueError("embedding-bag needs text input (token ids)")
        self.vocab = spec["vocab_size"]
        self.pad_id = spec.get("pad_id", 0)
        self.buckets = cfg.ngram_buckets
        self.ngrams = cfg.ngrams
        self.bag = nn.EmbeddingBag(self.vocab + self.buckets, cfg.embedding_dim, mode=cfg.mode, padding_idx=self.pad_id)
        nn.init.uniform_(self.bag.weight, -1.0 / cfg.embedding_dim, 1.0 / cfg.embedding_dim)
        with torch.no_grad():
            self.bag.weight[self.pad_id].zero_()
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.embedding_dim, num_classes)

    def forward_features(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.bag(self.bag_ids(x, lengths)))

    def bag_ids(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The ids the bag averages: the tokens, then each n-gram's hashed bucket (padding where it runs past the
        text)."""
        parts = [x]
        if self.buckets:
            pos = torch.arange(x.shape[1], device=x.device)[None, :]
            h = x
            for n in range(2, self.ngrams + 1):
                if x.shape[1] < n:
                    break
                # The n-gram ending at position i: hash of the (n-1)-gram ending at i-1 and token i (bigrams hash
                # exactly as before this generalisation, so older artifacts keep their meaning).
                h = (
                    (h[:, :-1] * 1_000_003 + x[:, n - 1 :]) % 2_147_483_647
                    if n > 2
                    else h[:, :-1] * 1_000_003 + x[:, 1:]
                )
                ok = (pos[:, n - 1 :] < lengths[:, None]) & (x[:, : x.shape[1] - n + 1] != self.pad_id)
                ids = self.vocab + h % self.buckets
                parts.append(torch.where(ok, ids, torch.full_like(ids, self.pad_id)))
        return torch.cat(parts, dim=1) if len(parts) > 1 else x

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, lengths))

    def input_embedding(self) -> nn.Module:
        return self.bag


@register_model(
    "embedding-bag",
    EmbeddingBagConfig,
    tasks=("text_classification",),
    capabilities=(Capability.CLASSIFIER, Capability.TOKEN_INPUT, Capability.EXPORTABLE, Capability.QUANTIZABLE),
    description="fastText-style baseline: mean of token (+ hashed bigram) embeddings → linear",
)
def _embedding_bag(cfg: EmbeddingBagConfig, input_shape: Any, num_classes: int) -> nn.Module:
    return EmbeddingBagClassifier(cfg, _spec(input_shape), num_classes)
