"""Attention from scratch: parity with PyTorch's own modules (copied weights), masks, positional encodings."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bigmodel.models.layers import (
    LearnedPositionalEmbedding,
    MultiHeadAttention,
    RotaryEmbedding,
    SinusoidalPositionalEncoding,
    TransformerEncoderBlock,
    combine_masks,
    scaled_dot_product_attention,
)


def padding_mask(B: int, T: int) -> torch.Tensor:
    lengths = torch.tensor([T, T - 2, 1, T - 1][:B])
    return torch.arange(T)[None, :] >= lengths[:, None]  # True = padding


@pytest.mark.parametrize("impl", ["math", "sdpa"])
@pytest.mark.parametrize("case", ["plain", "padding", "causal", "cross"])
def test_multihead_attention_matches_torch(impl, case):
    torch.manual_seed(0)
    B, T, S, C, H = 4, 7, 5, 32, 4
    ref = nn.MultiheadAttention(C, H, batch_first=True).eval()
    ours = MultiHeadAttention(C, H, impl=impl).eval()
    ours.load_from_torch(ref)
    x = torch.randn(B, T, C)
    mem = torch.randn(B, S, C) if case == "cross" else x
    kpm = padding_mask(B, mem.shape[1]) if case in ("padding", "cross") else None
    causal = nn.Transformer.generate_square_subsequent_mask(T).isinf() if case == "causal" else None
    expected, w_ref = ref(x, mem, mem, key_padding_mask=kpm, attn_mask=causal, need_weights=True)
    got, w = ours(x, mem, key_padding_mask=kpm, attn_mask=causal, need_weights=impl == "math")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    if impl == "math":
        torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-6)
    if case == "causal":  # is_causal builds the same mask
        torch.testing.assert_close(ours(x, is_causal=True)[0], expected, rtol=1e-5, atol=1e-5)


def test_math_and_fused_paths_agree_and_masks_block():
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 3, 6, 8) for _ in range(3))
    mask = combine_masks(2, 6, 6, None, padding_mask(2, 6), True, q.device)
    a, w = scaled_dot_product_attention(q, k, v, mask, impl="math", return_weights=True)
    b, _ = scaled_dot_product_attention(q, k, v, mask, impl="sdpa")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.all(w[~mask.expand_as(w)] == 0)  # blocked positions get exactly zero weight
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, 6))
    # The formula itself: softmax(q kᵀ / √d) v.
    plain, _ = scaled_dot_product_attention(q, k, v, impl="math")
    torch.testing.assert_close(plain, torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1) @ v)


def test_heads_are_real():
    # One head of full width and four heads of a quarter width give different results with the same weights.
    torch.manual_seed(2)
    one, four = MultiHeadAttention(16, 1), MultiHeadAttention(16, 4)
    four.load_state_dict(one.state_dict())
    x = torch.randn(2, 5, 16)
    assert not torch.allclose(one(x)[0], four(x)[0], atol=1e-4)
    with pytest.raises(ValueError, match="not divisible"):
        MultiHeadAttention(10, 3)


@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_encoder_block_matches_torch(norm_first, activation):
    torch.manual_seed(3)
    C, H, F = 24, 3, 48
    ref = nn.TransformerEncoderLayer(
        C, H, F, dropout=0.1, activation=activation, batch_first=True, norm_first=norm_first
    ).eval()
    ours = TransformerEncoderBlock(C, H, F, dropout=0.1, activation=activation, norm_first=norm_first).eval()
    ours.load_from_torch(ref)
    x = torch.randn(3, 9, C)
    kpm = padding_mask(3, 9)
    with torch.no_grad():  # no_grad keeps PyTorch on its reference (non-fast-path) implementation too
        torch.testing.assert_close(
            ours(x, key_padding_mask=kpm), ref(x, src_key_padding_mask=kpm), rtol=1e-5, atol=1e-5
        )
    ours.train()
    ours(x, key_padding_mask=kpm).sum().backward()
    assert all(p.grad is not None for p in ours.parameters())


def test_sinusoidal_encoding_is_the_standard_formula():
    pe = SinusoidalPositionalEncoding(6, max_len=50)
    x = torch.zeros(1, 50, 6)
    out = pe(x)[0]
    for pos in (0, 1, 7, 49):
        for i in range(3):
            angle = pos / 10000 ** (2 * i / 6)
            assert out[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert out[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)
    odd = SinusoidalPositionalEncoding(5, max_len=4)(torch.zeros(1, 4, 5))
    assert odd.shape == (1, 4, 5)
    with pytest.raises(ValueError, match="exceeds"):
        pe(torch.zeros(1, 51, 6))


def test_learned_positions_and_rotary():
    lp = LearnedPositionalEmbedding(8, max_len=10)
    assert lp(torch.zeros(2, 10, 8)).shape == (2, 10, 8)
    rope = RotaryEmbedding(8, max_len=64)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    # Rotations keep norms, and q·k depends only on the relative offset.
    qs = rope(q.expand(1, 1, 64, 8).contiguous())
    ks = rope(k.expand(1, 1, 64, 8).contiguous())
    torch.testing.assert_close(qs.norm(dim=-1), q.norm(dim=-1).expand(1, 1, 64))
    dots = (qs[0, 0, :, None, :] * ks[0, 0, None, :, :]).sum(-1)  # (64, 64): position i of q, j of k
    torch.testing.assert_close(dots[10, 7], dots[40, 37], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dots[3, 3], dots[50, 50], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="even head dimension"):
        RotaryEmbedding(7)
