"""A decoder-only Transformer language model (GPT-2 layout) with a preallocated KV cache, and sampling.

Groundwork for the generative-Transformer issue: the model, the cache and `generate` (greedy, temperature, top-k,
top-p, repetition penalty, stop tokens, a seed). Not registered as a recipe model yet — the language-modelling task,
data and CLI come with that issue.

Layout (GPT-2): token + learned position embeddings → blocks of [LayerNorm → causal self-attention → residual,
LayerNorm → MLP (4x, GELU) → residual] → LayerNorm → LM head tied to the token embedding. The attention's fused
`qkv` projection is laid out as GPT-2's `c_attn`, so Hugging Face weights can be copied in later.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class GPTConfig:
    vocab_size: int
    max_len: int = 256
    dim: int = 128
    num_heads: int = 4
    num_layers: int = 4
    dropout: float = 0.0

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

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.h, self.d).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        if cache is not None:
            k, v = cache.append(layer, k, v)
        T_k = k.shape[2]
        p = self.dropout if self.training else 0.0
        if T_k == T:  # no earlier positions: the plain causal mask
            out = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, dropout_p=p)
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
            nn.Linear(cfg.dim, 4 * cfg.dim), nn.GELU(approximate="tanh"), nn.Linear(4 * cfg.dim, cfg.dim)
        )
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None, layer: int) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), cache, layer))
        return x + self.drop(self.mlp(self.ln2(x)))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos = nn.Embedding(cfg.max_len, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.head.weight = self.tok.weight  # weight tying
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits (B, T, V) for token ids (B, T); with a cache, `ids` are the positions after those cached."""
        start = cache.length if cache is not None else 0
        T = ids.shape[1]
        if start + T > self.cfg.max_len:
            raise ValueError(f"sequence length {start + T} exceeds max_len {self.cfg.max_len}")
        pos = torch.arange(start, start + T, device=ids.device)
        x = self.drop(self.tok(ids) + self.pos(pos))
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i)
        if cache is not None:
            cache.length += T
        return self.head(self.ln_f(x))


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


@torch.inference_mode()
def generate(
    model: GPT,
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
) -> torch.Tensor:
    """Continue `ids` (B, T). temperature 0 = greedy. Repetition penalty (CTRL): logits of tokens already in the
    sequence are divided by it when positive, multiplied when negative. Stops early when every row has emitted a
    stop id. Returns (B, T + new)."""
    model.eval()
    g = torch.Generator(device=ids.device).manual_seed(seed) if seed is not None else None
    B = ids.shape[0]
    total = min(model.cfg.max_len, ids.shape[1] + max_new_tokens)
    cache = KVCache(model.cfg, B, ids.device, next(model.parameters()).dtype) if use_cache else None
    out = ids
    logits = model(ids, cache)[:, -1] if cache is not None else model(ids)[:, -1]
    done = torch.zeros(B, dtype=torch.bool, device=ids.device)
    while out.shape[1] < total:
        logits = logits.float()
        if repetition_penalty != 1.0:
            seen = torch.gather(logits, 1, out)
            seen = torch.where(seen > 0, seen / repetition_penalty, seen * repetition_penalty)
            logits = logits.scatter(1, out, seen)
        if temperature == 0:
            nxt = logits.argmax(dim=-1, keepdim=True)
        else:
            probs = filter_logits(logits / temperature, top_k, top_p).softmax(dim=-1)
            nxt = torch.multinomial(probs, 1, generator=g)
        if stop_ids:
            nxt = torch.where(done[:, None], nxt.new_full(nxt.shape, next(iter(stop_ids))), nxt)
            done |= torch.isin(nxt[:, 0], torch.tensor(sorted(stop_ids), device=ids.device))
        out = torch.cat([out, nxt], dim=1)
        if stop_ids and bool(done.all()):
            break
        if out.shape[1] >= total:
            break
        logits = model(nxt, cache)[:, -1] if cache is not None else model(out)[:, -1]
    return out
