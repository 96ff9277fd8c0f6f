"""The encoder–decoder Transformer for translation (Vaswani et al. 2017), from `layers.py`, with greedy and beam search.

What the seed documents' version got wrong and is right here: real heads; the decoder's self-attention is causal
and both stacks mask padding (the masks are passed, not just built); the decoder has `decoder_layers` blocks each
with its own cross-attention; the loss flattens (B, T, V) logits against (B, T) targets, ignoring padding.

- `forward(src, src_lengths, tgt_in) -> logits (B, T, V)` (teacher forcing).
- `greedy` / `beam_search`: batched; the encoder runs once, cross-attention keys/values are computed once per layer,
  decoder self-attention keeps a key/value cache, so each step processes one new token per hypothesis.
  Beam scores are summed log-probabilities divided by length^α (`length_penalty` α; 0 = raw sum).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from bigmodel.models.base import Capability, ModelBase
from bigmodel.models.layers import MultiHeadAttention, SinusoidalPositionalEncoding, TransformerEncoderBlock
from bigmodel.registry import register_model
from bigmodel.tokens import BOS_ID, EOS_ID, PAD_ID


class Seq2SeqConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dim: Annotated[int, Field(ge=8, le=8192)] = 256
    num_heads: Annotated[int, Field(ge=1, le=128)] = 4
    encoder_layers: Annotated[int, Field(ge=1, le=48)] = 3
    decoder_layers: Annotated[int, Field(ge=1, le=48)] = 3
    ff_dim: Annotated[int, Field(ge=1)] | None = None
    """Feed-forward width (default 4 x dim)."""
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    activation: Literal["relu", "gelu"] = "relu"
    norm_first: bool = True
    tie_embeddings: bool = True
    """Share source/target embeddings (with one vocabulary) and tie the output layer to the target embedding."""
    beam_size: Annotated[int, Field(ge=1, le=64)] = 4
    """Default beam for `evaluate` / `translate` (1 = greedy)."""
    length_penalty: Annotated[float, Field(ge=0.0, le=5.0)] = 1.0

    @model_validator(mode="after")
    def _cross(self) -> Seq2SeqConfig:
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        return self


class DecoderBlock(nn.Module):
    """Causal self-attention, cross-attention over the encoder output, feed-forward; residuals and LayerNorm."""

    def __init__(self, cfg: Seq2SeqConfig) -> None:
        super().__init__()
        d = cfg.dim
        self.self_attn = MultiHeadAttention(d, cfg.num_heads, cfg.dropout)
        self.cross_attn = MultiHeadAttention(d, cfg.num_heads, cfg.dropout)
        self.linear1 = nn.Linear(d, cfg.ff_dim or 4 * d)
        self.linear2 = nn.Linear(cfg.ff_dim or 4 * d, d)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout = nn.Dropout(cfg.dropout)
        self.ff_dropout = nn.Dropout(cfg.dropout)
        self.act = nn.ReLU() if cfg.activation == "relu" else nn.GELU()
        self.norm_first = cfg.norm_first

    def _ff(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.linear2(self.ff_dropout(self.act(self.linear1(x)))))

    def _residuals(self, x: torch.Tensor, sa: Any, ca: Any) -> torch.Tensor:
        """The block around its two attentions (full-sequence or one-step): pre- or post-norm residuals."""
        if self.norm_first:
            x = x + sa(self.norm1(x))
            x = x + ca(self.norm2(x))
            return x + self._ff(self.norm3(x))
        x = self.norm1(x + sa(x))
        x = self.norm2(x + ca(x))
        return self.norm3(x + self._ff(x))

    def forward(self, x: torch.Tensor, memory: torch.Tensor, memory_pad: torch.Tensor) -> torch.Tensor:
        def sa(h: torch.Tensor) -> torch.Tensor:
            return self.dropout(self.self_attn(h, is_causal=True)[0])

        def ca(h: torch.Tensor) -> torch.Tensor:
            return self.dropout(self.cross_attn(h, memory, key_padding_mask=memory_pad)[0])

        return self._residuals(x, sa, ca)

    # ------------------------------------------------------------------------------------- incremental decoding
    @staticmethod
    def _heads(a: MultiHeadAttention, t: torch.Tensor) -> torch.Tensor:
        B, T, _ = t.shape
        return t.view(B, T, a.num_heads, a.head_dim).transpose(1, 2)

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.cross_attn
        return self._heads(a, a.k_proj(memory)), self._heads(a, a.v_proj(memory))

    def step(
        self,
        x: torch.Tensor,
        cache: dict[str, torch.Tensor],
        mem_k: torch.Tensor,
        mem_v: torch.Tensor,
        mem_allowed: torch.Tensor,
    ) -> torch.Tensor:
        """One new position x (B, 1, C): self-attention over the cached positions and itself, cross-attention over
        the precomputed memory keys/values (`mem_allowed` (B, 1, 1, S), True = a real source token)."""

        def sa(h: torch.Tensor) -> torch.Tensor:
            a = self.self_attn
            q, k, v = self._heads(a, a.q_proj(h)), self._heads(a, a.k_proj(h)), self._heads(a, a.v_proj(h))
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
            out = F.scaled_dot_product_attention(q, k, v)  # every cached position is in the past
            return a.out_proj(out.transpose(1, 2).reshape(h.shape))

        def ca(h: torch.Tensor) -> torch.Tensor:
            a = self.cross_attn
            q = self._heads(a, a.q_proj(h))
            out = F.scaled_dot_product_attention(q, mem_k, mem_v, attn_mask=mem_allowed)
            return a.out_proj(out.transpose(1, 2).reshape(h.shape))

        return self._residuals(x, sa, ca)


class Seq2SeqTransformer(ModelBase):
    def __init__(self, cfg: Seq2SeqConfig, spec: dict[str, Any]) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.max_len = int(spec.get("max_length", 256))
        # One vocabulary and tied embeddings: the target side reuses the source embedding (no second tensor, so
        # the weights stay plain safetensors without shared storage).
        self.shared = bool(spec.get("shared_vocab", True)) and cfg.tie_embeddings
        self.src_embed = nn.Embedding(spec["src_vocab_size"], d, padding_idx=PAD_ID)
        self._tgt_embed = None if self.shared else nn.Embedding(spec["tgt_vocab_size"], d, padding_idx=PAD_ID)
        for emb in (self.src_embed, self._tgt_embed):
            if emb is not None:
                nn.init.normal_(emb.weight, std=d**-0.5)
                with torch.no_grad():
                    emb.weight[PAD_ID].zero_()
        self.scale = math.sqrt(d)
        self.pos = SinusoidalPositionalEncoding(d, 2 * self.max_len + 2)
        self.dropout = nn.Dropout(cfg.dropout)
        ff = cfg.ff_dim or 4 * d
        self.encoder = nn.ModuleList(
            TransformerEncoderBlock(d, cfg.num_heads, ff, cfg.dropout, cfg.activation, cfg.norm_first)
            for _ in range(cfg.encoder_layers)
        )
        self.decoder = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.decoder_layers))
        self.enc_norm = nn.LayerNorm(d) if cfg.norm_first else nn.Identity()
        self.dec_norm = nn.LayerNorm(d) if cfg.norm_first else nn.Identity()
        self.out = None if cfg.tie_embeddings else nn.Linear(d, spec["tgt_vocab_size"], bias=False)

    def shard_units(self) -> list[nn.Module]:
        return [*self.encoder, *self.decoder]

    @property
    def tgt_embed(self) -> nn.Embedding:
        return self.src_embed if self._tgt_embed is None else self._tgt_embed

    def encode(self, src: torch.Tensor, src_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder output (B, S, C) and the source padding mask (B, S), True = padding."""
        pad = torch.arange(src.shape[1], device=src.device)[None, :] >= src_lengths.to(src.device)[:, None]
        x = self.dropout(self.pos(self.src_embed(src) * self.scale))
        for block in self.encoder:
            x = block(x, key_padding_mask=pad)
        return self.enc_norm(x), pad

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.tgt_embed.weight) if self.out is None else self.out(h)

    def forward(self, src: torch.Tensor, src_lengths: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        memory, pad = self.encode(src, src_lengths)
        x = self.dropout(self.pos(self.tgt_embed(tgt_in) * self.scale))
        for block in self.decoder:
            x = block(x, memory, pad)
        return self.logits(self.dec_norm(x))

    # ---------------------------------------------------------------------------------------------- decoding
    def _decoder_state(self, memory: torch.Tensor, pad: torch.Tensor) -> dict[str, Any]:
        kv = [block.memory_kv(memory) for block in self.decoder]
        return {"kv": kv, "allowed": (~pad)[:, None, None, :], "caches": [{} for _ in self.decoder], "t": 0}

    def _step(self, tokens: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        """Log-probabilities (B, V) of the next token after `tokens` (B,) at position state["t"]."""
        x = self.pos(self.tgt_embed(tokens[:, None]) * self.scale, offset=state["t"])
        for block, (k, v), cache in zip(self.decoder, state["kv"], state["caches"], strict=True):
            x = block.step(x, cache, k, v, state["allowed"])
        state["t"] += 1
        return self.logits(self.dec_norm(x))[:, 0].float().log_softmax(dim=-1)

    @staticmethod
    def _reorder(state: dict[str, Any], idx: torch.Tensor) -> None:
        state["kv"] = [(k[idx], v[idx]) for k, v in state["kv"]]
        state["allowed"] = state["allowed"][idx]
        for cache in state["caches"]:
            for key in list(cache):
                cache[key] = cache[key][idx]

    def default_max_new(self, src_lengths: torch.Tensor) -> int:
        return min(int(src_lengths.max()) * 2 + 10, 2 * self.max_len)

    @torch.inference_mode()
    def greedy(
        self, src: torch.Tensor, src_lengths: torch.Tensor, max_new_tokens: int | None = None
    ) -> list[list[int]]:
        """Token ids (without [BOS]/[EOS]) of the most likely next token at every step, per source."""
        self.eval()
        memory, pad = self.encode(src, src_lengths)
        state = self._decoder_state(memory, pad)
        B = src.shape[0]
        tokens = torch.full((B,), BOS_ID, dtype=torch.int64, device=src.device)
        out: list[list[int]] = [[] for _ in range(B)]
        done = torch.zeros(B, dtype=torch.bool, device=src.device)
        for _ in range(max_new_tokens or self.default_max_new(src_lengths)):
            tokens = self._step(tokens, state).argmax(dim=-1)
            for i in (~done).nonzero().flatten().tolist():
                if int(tokens[i]) != EOS_ID:
                    out[i].append(int(tokens[i]))
            done |= tokens == EOS_ID
            if bool(done.all()):
                break
        return out

    @torch.inference_mode()
    def beam_search(
        self,
        src: torch.Tensor,
        src_lengths: torch.Tensor,
        beam_size: int = 4,
        max_new_tokens: int | None = None,
        length_penalty: float = 1.0,
    ) -> list[list[int]]:
        """The best hypothesis per source by sum(log p) / length^α among those that ended with [EOS] (or, when
        none did within `max_new_tokens`, among the live ones). Batched: (B x K) hypotheses per step."""
        if beam_size == 1:
            return self.greedy(src, src_lengths, max_new_tokens)
        self.eval()
        B, K = src.shape[0], beam_size
        memory, pad = self.encode(src, src_lengths)
        rep = torch.arange(B, device=src.device).repeat_interleave(K)
        state = self._decoder_state(memory[rep], pad[rep])
        tokens = torch.full((B * K,), BOS_ID, dtype=torch.int64, device=src.device)
        # Only the first beam of each source is live at the start (the others would duplicate it).
        scores = torch.full((B, K), float("-inf"), device=src.device)
        scores[:, 0] = 0.0
        history = torch.zeros((B * K, 0), dtype=torch.int64, device=src.device)
        finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
        steps = max_new_tokens or self.default_max_new(src_lengths)
        done = [False] * B
        for t in range(steps):
            logp = self._step(tokens, state)  # (B*K, V)
            V = logp.shape[1]
            cand = (scores.view(B * K, 1) + logp).view(B, K * V)
            top, idx = cand.topk(2 * K, dim=1)  # enough that K survive after removing finished ones
            beam, tok = idx // V, idx % V
            new_scores = torch.full((B, K), float("-inf"), device=src.device)
            new_src = torch.zeros((B, K), dtype=torch.int64, device=src.device)
            new_tok = torch.full((B, K), PAD_ID, dtype=torch.int64, device=src.device)
            top_l, beam_l, tok_l = top.tolist(), beam.tolist(), tok.tolist()
            for b in range(B):
                if done[b]:
                    continue
                j = 0
                for s, k, w in zip(top_l[b], beam_l[b], tok_l[b], strict=True):
                    if s == float("-inf") or j == K:
                        break
                    if w == EOS_ID:
                        hyp = history[b * K + k].tolist()
                        finished[b].append((s / max(len(hyp) + 1, 1) ** length_penalty, hyp))
                        continue
                    new_scores[b, j], new_src[b, j], new_tok[b, j] = s, b * K + k, w
                    j += 1
                # Done (Hugging Face's heuristic) once K hypotheses have ended and none of the live ones, scored
                # at its current length, beats the worst of the K best ended ones.
                if len(finished[b]) >= K:
                    kth = sorted((s for s, _ in finished[b]), reverse=True)[K - 1]
                    live = float(new_scores[b].max()) / (t + 2) ** length_penalty
                    if live <= kth:
                        done[b] = True
                        new_scores[b] = float("-inf")
            if bool(torch.isinf(new_scores).all()):
                break
            order = new_src.view(-1)
            self._reorder(state, order)
            history = torch.cat([history[order], new_tok.view(-1, 1)], dim=1)
            tokens = new_tok.view(-1)
            scores = new_scores
        results = []
        for b in range(B):
            if not finished[b]:  # nothing ended: take the best live hypothesis
                k = int(scores[b].argmax())
                finished[b].append((0.0, history[b * K + k].tolist()))
            results.append(max(finished[b], key=lambda x: x[0])[1])
        return results


@register_model(
    "transformer-seq2seq",
    Seq2SeqConfig,
    tasks=("translation",),
    capabilities=(Capability.TRANSLATES, Capability.TOKEN_INPUT),
    description="encoder-decoder Transformer (cross-attention, tied embeddings), greedy and beam search",
)
def _seq2seq(cfg: Seq2SeqConfig, input_shape: Any, num_classes: int) -> nn.Module:
    if not isinstance(input_shape, dict) or input_shape.get("kind") != "translation":
        raise ValueError(f"transformer-seq2seq needs sentence pairs (task translation), got {input_shape!r}")
    return Seq2SeqTransformer(cfg, input_shape)


# ------------------------------------------------------------------------------------------------------ scoring
def translate_ids(
    model: Seq2SeqTransformer,
    src: torch.Tensor,
    src_lengths: torch.Tensor,
    *,
    beam_size: int,
    batch_size: int = 64,
    max_new_tokens: int | None = None,
    length_penalty: float = 1.0,
) -> list[list[int]]:
    """Decode every source (sorted by length into batches for less padding), in input order."""
    order = torch.argsort(src_lengths, descending=True)
    out: list[list[int]] = [[] for _ in range(len(order))]
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        S = int(src_lengths[idx].max())
        hyps = model.beam_search(src[idx, :S], src_lengths[idx], beam_size, max_new_tokens, length_penalty)
        for j, h in zip(idx.tolist(), hyps, strict=True):
            out[j] = h
    return out


def score_translations(art: Any, pairs: Any, *, beam_size: int | None = None, limit: int | None = None) -> dict:
    """BLEU and chrF (sacrebleu, detokenized text against the raw references) of the model's translations."""
    import sacrebleu

    model = art.model
    k = beam_size or model.cfg.beam_size
    n = min(len(pairs), limit) if limit else len(pairs)
    tgt_tok = art.preprocess.target_tokenizer or art.preprocess.tokenizer
    ids = translate_ids(
        model, pairs.src[:n], pairs.src_lengths[:n], beam_size=k, length_penalty=model.cfg.length_penalty
    )
    hyps = [h.strip() for h in tgt_tok.decode_batch(ids, skip_special_tokens=True)]
    refs = pairs.references[:n]
    return {
        "bleu": sacrebleu.corpus_bleu(hyps, [refs]).score,
        "chrf": sacrebleu.corpus_chrf(hyps, [refs]).score,
        "num_sentences": n,
        "beam_size": k,
        "examples": [
            {"source": s, "reference": r, "translation": h}
            for s, r, h in zip(pairs.sources[:3], refs[:3], hyps[:3], strict=True)
        ],
    }
