"""The decoder-only Transformer: causality, KV-cache equivalence, sampling filters and seeded determinism."""

from __future__ import annotations

import pytest
import torch

from bigmodel.models.gpt import GPT, GPTConfig, KVCache, filter_logits, generate


@pytest.fixture
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=50, max_len=32, dim=32, num_heads=4, num_layers=2)).eval()


def test_no_attention_to_the_future(model):
    ids = torch.randint(0, 50, (2, 12))
    changed = ids.clone()
    changed[:, 7:] = torch.randint(0, 50, (2, 5))
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_kv_cache_gives_the_uncached_logits(model):
    ids = torch.randint(0, 50, (3, 10))
    full = model(ids)
    cache = KVCache(model.cfg, 3)
    parts = [model(ids[:, :4], cache), model(ids[:, 4:5], cache), model(ids[:, 5:10], cache)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 10


def test_greedy_generation_equals_an_uncached_argmax_rollout(model):
    ids = torch.randint(0, 50, (2, 5))
    fast = generate(model, ids, 8, temperature=0)
    slow = generate(model, ids, 8, temperature=0, use_cache=False)
    assert torch.equal(fast, slow)
    seq = ids
    for _ in range(8):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(fast, seq)


def test_sampling_is_deterministic_under_a_seed(model):
    ids = torch.randint(0, 50, (2, 3))
    a = generate(model, ids, 10, temperature=1.0, top_k=20, top_p=0.9, seed=7)
    b = generate(model, ids, 10, temperature=1.0, top_k=20, top_p=0.9, seed=7)
    c = generate(model, ids, 10, temperature=1.0, top_k=20, top_p=0.9, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_top_k_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    assert torch.isinf(filter_logits(logits, top_k=2)[0, 2:]).all()
    kept = ~torch.isinf(filter_logits(logits, top_p=0.7))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 + 0.25 reaches 0.7
    kept = ~torch.isinf(filter_logits(logits, top_p=0.5))
    assert kept.tolist() == [[True, False, False, False]]


def test_stop_ids_and_max_len(model):
    ids = torch.randint(1, 50, (1, 4))
    first = int(generate(model, ids, 1, temperature=0)[0, -1])
    out = generate(model, ids, 20, temperature=0, stop_ids={first})
    assert out.shape[1] == 5 and int(out[0, -1]) == first
    long = generate(model, ids, 100, temperature=0)
    assert long.shape[1] == 104  # past max_len 32 the context slides: the last 32 tokens
    assert torch.equal(long, generate(model, ids, 100, temperature=0, use_cache=False))
    seq = ids
    for _ in range(100):
        seq = torch.cat([seq, model(seq[:, -32:])[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(long, seq)
    with pytest.raises(ValueError, match="exceeds max_len"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_repetition_penalty_lowers_repeats(model):
    ids = torch.randint(0, 50, (4, 4))
    plain = generate(model, ids, 20, temperature=0)
    penal = generate(model, ids, 20, temperature=0, repetition_penalty=5.0)

    def repeats(x):
        return sum(len(r) - len(set(r)) for r in x[:, 4:].tolist())

    assert repeats(penal) < repeats(plain)


def test_extreme_sampling_settings_stay_finite(model):
    ids = torch.randint(0, 50, (2, 4))
    greedy = generate(model, ids, 10, temperature=0)
    assert torch.equal(generate(model, ids, 10, temperature=1e-300), greedy)  # 0 in float32: greedy, not 0/0
    assert torch.equal(generate(model, ids, 10, temperature=1e-30, seed=1), greedy)  # → greedy, never NaN
    for penalty, temp in ((5e-324, 12.0), (100.0, 1.0), (1e-300, 0.0), (1.0, 100.0)):
        out = generate(model, ids, 10, temperature=temp, repetition_penalty=penalty, seed=3)
        assert out.shape == (2, 14) and int(out.min()) >= 0 and int(out.max()) < 50
