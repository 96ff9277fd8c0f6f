"""Attention and Transformer building blocks, from scratch (Vaswani et al. 2017, "Attention Is All You Need").

- `scaled_dot_product_attention`: softmax(QKᵀ/√d_k)V with padding and causal masks; an explicit reference path
  (`impl="math"`) and PyTorch's fused kernel (`impl="sdpa"`), which agree to float tolerance.
- `MultiHeadAttention`: Concat(head_1..head_h)Wᴼ, self or cross; weights laid out so that a copy from
  `nn.MultiheadAttention` gives the same outputs (tests/test_layers.py).
- Positional encodings: sinusoidal PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...); learned;
  rotary (Su et al. 2021), applied to queries and keys.
- `TransformerEncoderBlock`: self-attention + feed-forward, residuals, LayerNorm before (pre-norm) or after
  (post-norm); matches `nn.TransformerEncoderLayer` with copied weights.

What the seed documents got wrong, and is right here: heads are real (the model dimension is split into
`num_heads` heads of `embed_dim / num_heads`); masks are applied; dropout acts on the attention *probabilities*
after the softmax; the residual adds the block's input, not a projection of it.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


# ---------------------------------------------------------------------------------------------------- attention
def combine_masks(
    B: int,
    T_q: int,
    T_k: int,
    attn_mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    is_causal: bool,
    device: torch.device,
) -> torch.Tensor | None:
    """One boolean mask (B, 1, T_q, T_k), True = may attend, or None when nothing is masked.

    `attn_mask`: bool (T_q, T_k) or (B, T_q, T_k), True = blocked (the `nn.MultiheadAttention` convention).
    `key_padding_mask`: bool (B, T_k), True = padding (blocked).
    """
    allowed = None
    if is_causal:
        allowed = torch.ones(T_q, T_k, dtype=torch.bool, device=device).tril(diagonal=T_k - T_q)[None, None]
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool:
            raise TypeError("attn_mask must be boolean (True = blocked)")
        m = ~(attn_mask[None, None] if attn_mask.dim() == 2 else attn_mask[:, None])  # (B|1, 1, T_q, T_k)
        allowed = m if allowed is None else allowed & m
    if key_padding_mask is not None:
        m = ~key_padding_mask[:, None, None, :]  # (B, 1, 1, T_k)
        allowed = m if allowed is None else allowed & m
    if allowed is None:
        return None
    return allowed.expand(B, 1, T_q, T_k)


def scaled_dot_product_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    impl: Literal["auto", "math", "sdpa"] = "auto",
    return_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """softmax(q kᵀ / √d) v over the last two dims. q (B, H, T_q, D), k and v (B, H, T_k, D); `mask` bool,
    broadcastable to (B, H, T_q, T_k), True = may attend. Rows with nothing to attend to give zeros."""
    if impl == "sdpa" or (impl == "auto" and not return_weights):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        if mask is not None:  # fully masked rows: sdpa gives NaN; define them as 0 like the math path
            out = out.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)
        return out, None
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, T_q, T_k)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    if mask is not None:
        weights = weights.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)  # all -inf rows → 0, not NaN
    if dropout_p > 0:
        weights = F.dropout(weights, p=dropout_p)  # on probabilities, after the softmax
    return weights @ v, weights  # (B, H, T_q, D)


class MultiHeadAttention(nn.Module):
    """Multi-head attention, self (`key is None`) or cross. Inputs are batch-first (B, T, C)."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        impl: Literal["auto", "math", "sdpa"] = "auto",
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.dropout, self.impl = dropout, impl
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.record = False  # explain's attention maps: keep the per-head weights (B, H, T_q, T_k)
        self.recorded: torch.Tensor | None = None

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        *,
        key_padding_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        rotary: RotaryEmbedding | None = None,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = query if key is None else key
        value = key if value is None else value
        B, T_q, C = query.shape
        T_k = key.shape[1]
        H, D = self.num_heads, self.head_dim
        q = self.q_proj(query).view(B, T_q, H, D).transpose(1, 2)  # (B, H, T_q, D)
        k = self.k_proj(key).view(B, T_k, H, D).transpose(1, 2)  # (B, H, T_k, D)
        v = self.v_proj(value).view(B, T_k, H, D).transpose(1, 2)  # (B, H, T_k, D)
        if rotary is not None:
            q, k = rotary(q), rotary(k)
        mask = combine_masks(B, T_q, T_k, attn_mask, key_padding_mask, is_causal, query.device)
        p = self.dropout if self.training else 0.0
        keep = need_weights or self.record
        out, weights = scaled_dot_product_attention(q, k, v, mask, p, "math" if self.record else self.impl, keep)
        if self.record and weights is not None:
            self.recorded = weights.detach()
        weights = weights if need_weights else None
        out = out.transpose(1, 2).reshape(B, T_q, C)  # (B, T_q, C): heads concatenated
        return self.out_proj(out), (weights.mean(dim=1) if weights is not None else None)

    @torch.no_grad()
    def load_from_torch(self, ref: nn.MultiheadAttention) -> None:
        """Copy the weights of an `nn.MultiheadAttention` (same embed_dim and heads)."""
        wq, wk, wv = ref.in_proj_weight.chunk(3)
        self.q_proj.weight.copy_(wq)
        self.k_proj.weight.copy_(wk)
        self.v_proj.weight.copy_(wv)
        if ref.in_proj_bias is not None:
            bq, bk, bv = ref.in_proj_bias.chunk(3)
            self.q_proj.bias.copy_(bq)
            self.k_proj.bias.copy_(bk)
            self.v_proj.bias.copy_(bv)
        self.out_proj.weight.copy_(ref.out_proj.weight)
        if ref.out_proj.bias is not None:
            self.out_proj.bias.copy_(ref.out_proj.bias)


# -------------------------------------------------------------------------------------------- position encodings
class SinusoidalPositionalEncoding(nn.Module):
    """Adds PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d)) to (B, T, d)."""

    def __init__(self, dim: int, max_len: int = 4096) -> None:
        super().__init__()
        pos = torch.arange(max_len, dtype=torch.float64)[:, None]  # (max_len, 1)
        inv = torch.pow(10000.0, -torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (ceil(d/2),)
        pe = torch.zeros(max_len, dim, dtype=torch.float64)
        pe[:, 0::2] = torch.sin(pos * inv)
        pe[:, 1::2] = torch.cos(pos * inv[: dim // 2])
        self.register_buffer("pe", pe.to(torch.float32), persistent=False)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        T = x.shape[1]
        if offset + T > self.pe.shape[0]:
            raise ValueError(
                f"sequence length {offset + T} exceeds the positional encoding's max_len {self.pe.shape[0]}"
            )
        return x + self.pe[offset : offset + T].to(x.dtype)


class LearnedPositionalEmbedding(nn.Module):
    """Adds a trained embedding per position to (B, T, d)."""

    per_example_positions = False
    """True (set by the DP fix): look positions up per example, (B, T) rather than (T,) shared by the batch; the same
    outputs, and the table's gradient splits by example, which per-example clipping needs."""

    def __init__(self, dim: int, max_len: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(max_len, dim)
        nn.init.normal_(self.embedding.weight, std=0.02)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        T = x.shape[1]
        if offset + T > self.embedding.num_embeddings:
            raise ValueError(f"sequence length {offset + T} exceeds max_len {self.embedding.num_embeddings}")
        pos = torch.arange(offset, offset + T, device=x.device)
        if self.per_example_positions:  # DP-SGD: each example's own lookup, so it has a per-example gradient
            pos = pos.expand(x.shape[0], T)
        return x + self.embedding(pos)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE): rotates pairs of channels of q and k by position-dependent angles, so that
    q·k depends on the relative offset only. Applied to (B, H, T, D) with even D."""

    def __init__(self, head_dim: int, max_len: int = 4096, base: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embedding needs an even head dimension, got {head_dim}")
        inv = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.arange(max_len, dtype=torch.float64)[:, None] * inv  # (max_len, D/2)
        self.register_buffer("cos", angles.cos().to(torch.float32), persistent=False)
        self.register_buffer("sin", angles.sin().to(torch.float32), persistent=False)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        T = x.shape[-2]
        cos = self.cos[offset : offset + T].to(x.dtype)  # (T, D/2)
        sin = self.sin[offset : offset + T].to(x.dtype)
        x1, x2 = x[..., 0::2], x[..., 1::2]  # (..., T, D/2) each
        out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # (..., T, D/2, 2)
        return out.flatten(-2)  # (..., T, D), pairs interleaved back


# --------------------------------------------------------------------------------------------- encoder block
class TransformerEncoderBlock(nn.Module):
    """Self-attention and a feed-forward network, each with a residual and LayerNorm (pre- or post-norm)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ff_dim: int,
        dropout: float = 0.1,
        activation: Literal["relu", "gelu"] = "relu",
        norm_first: bool = True,
        impl: Literal["auto", "math", "sdpa"] = "auto",
    ) -> None:
        super().__init__()
        self.attn = MultiHeadAttention(dim, num_heads, dropout, impl=impl)
        self.linear1 = nn.Linear(dim, ff_dim)
        self.linear2 = nn.Linear(ff_dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)  # after attention and after the feed-forward (as in the paper)
        self.ff_dropout = nn.Dropout(dropout)  # inside the feed-forward, after the activation
        self.act = nn.ReLU() if activation == "relu" else nn.GELU()
        self.norm_first = norm_first

    def _sa(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None,
        attn_mask: torch.Tensor | None,
        is_causal: bool,
        rotary: RotaryEmbedding | None,
    ) -> torch.Tensor:
        out, _ = self.attn(
            x, key_padding_mask=key_padding_mask, attn_mask=attn_mask, is_causal=is_causal, rotary=rotary
        )
        return self.dropout(out)

    def _ff(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.linear2(self.ff_dropout(self.act(self.linear1(x)))))

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        rotary: RotaryEmbedding | None = None,
    ) -> torch.Tensor:
        if self.norm_first:
            x = x + self._sa(self.norm1(x), key_padding_mask, attn_mask, is_causal, rotary)
            return x + self._ff(self.norm2(x))
        x = self.norm1(x + self._sa(x, key_padding_mask, attn_mask, is_causal, rotary))
        return self.norm2(x + self._ff(x))

    @torch.no_grad()
    def load_from_torch(self, ref: nn.TransformerEncoderLayer) -> None:
        """Copy the weights of an `nn.TransformerEncoderLayer` (batch_first, same sizes)."""
        self.attn.load_from_torch(ref.self_attn)
        for name in ("linear1", "linear2", "norm1", "norm2"):
            getattr(self, name).load_state_dict(getattr(ref, name).state_dict())
