"""The C++ decode step (``intro2llm::decode_step``, every layer of a step in one call) against the Python fast
step it replaces: same logits and cache writes for MHA/GQA/MQA, biases, sliding window, left padding, batch sizes
on both sides of its small-GEMM blocking; generate() takes it when it can; bad input names the problem."""

from __future__ import annotations

import pytest
import torch

from intro2llm import ops
from intro2llm.model import CausalLM, ModelConfig, fast_decode
from intro2llm.model.fast_decode import DecodeWeights
from intro2llm.model.kv_cache import StaticKVCache
from intro2llm.ops import _dispatch

# a missing extension fails the session under INTRO2LLM_REQUIRE_EXT=1 (conftest.py): CI never skips these
pytestmark = pytest.mark.skipif(_dispatch.extension_error() is not None,
                                reason="intro2llm._C (the C++ extension) is not built")


def make_model(seed: int = 0, **kw) -> CausalLM:
    torch.manual_seed(seed)
    base = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2)
    return CausalLM(ModelConfig(**{**base, **kw})).eval()


def _prefilled(model: CausalLM, B: int, T0: int, padded: bool):
    """A cache after the prompt, the prompt's padding mask (or None) and the next token ids."""
    g = torch.Generator().manual_seed(B * 100 + T0)
    ids = torch.randint(0, model.config.vocab_size, (B, T0), generator=g)
    mask = None
    if padded:  # left padding: row b has b % T0 pad slots
        mask = torch.ones(B, T0, dtype=torch.bool)
        for b in range(B):
            mask[b, : b % T0] = False
    cache = StaticKVCache.from_config(model.config, B, T0 + 4)
    with torch.no_grad():
        model(ids, attention_mask=None if mask is None else mask.long(), kv_cache=cache)
    nxt = torch.randint(0, model.config.vocab_size, (B,), generator=g)
    return cache, mask, nxt


def _positions(mask, B, T0):
    if mask is None:
        return torch.tensor([T0])
    return mask.long().sum(-1, keepdim=True)  # (B, 1): the next position of each row


@pytest.mark.parametrize("B", [1, 3, 8, 9, 20])
@pytest.mark.parametrize("kw", [{}, {"num_key_value_heads": 1}, {"num_key_value_heads": 4, "attention_bias": True,
                                "attention_output_bias": True, "mlp_bias": True}, {"sliding_window": 3}])
@pytest.mark.parametrize("padded", [False, True])
def test_cpp_step_equals_python_step(B, kw, padded):
    model = make_model(**kw)
    T0 = 6
    cache_a, mask, nxt = _prefilled(model, B, T0, padded)
    cache_b = StaticKVCache.from_config(model.config, B, T0 + 4)
    cache_b.k.copy_(cache_a.k)
    cache_b.v.copy_(cache_a.v)
    cache_b.seq_len = cache_a.seq_len
    kpm = None if mask is None else torch.cat([mask, torch.ones(B, 1, dtype=torch.bool)], dim=1)
    pos = _positions(mask, B, T0)
    with torch.no_grad():
        w = DecodeWeights.from_model(model)
        assert fast_decode.cpp_applies(w, cache_a), "the C++ decode step should apply to this model"
        got = fast_decode.cpp_step(model, w, nxt, pos, cache_a, kpm)
        want = fast_decode.python_step(model, w, nxt, pos, cache_b, kpm)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert cache_a.seq_len == cache_b.seq_len == T0 + 1
    torch.testing.assert_close(cache_a.k[:, :, :, : T0 + 1], cache_b.k[:, :, :, : T0 + 1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache_a.v[:, :, :, : T0 + 1], cache_b.v[:, :, :, : T0 + 1], rtol=1e-5, atol=1e-5)


def test_generate_uses_the_cpp_step_and_matches_the_reference_ops(monkeypatch):
    model = make_model(3)
    ids = torch.randint(0, 97, (4, 5))
    calls = []
    original = fast_decode.cpp_step

    def spy(*a, **k):
        calls.append(1)
        return original(*a, **k)

    monkeypatch.setattr(fast_decode, "cpp_step", spy)
    fast = model.generate(ids, 12)
    assert len(calls) == 11  # every step after the prefill's first token
    calls.clear()
    with ops.use_backend("reference"):  # the reference ops: the Python path, not the C++ step
        slow = model.generate(ids, 12)
    assert not calls
    assert torch.equal(fast, slow)


def test_cpp_step_is_skipped_where_it_does_not_apply():
    model = make_model(4).double()
    cache = StaticKVCache.from_config(model.config, 1, 8, dtype=torch.float64)
    assert not fast_decode.cpp_applies(DecodeWeights.from_model(model), cache)  # float64: the Python step runs
    ids = torch.randint(0, 97, (1, 4))
    assert torch.equal(model.generate(ids, 5), model.generate(ids, 5, use_cache=False))


def test_decode_step_bad_input():
    model = make_model(5)
    cache, _, nxt = _prefilled(model, 2, 4, padded=False)
    w = DecodeWeights.from_model(model)
    flat, norm_w, head, eps = w.flat(), w.norm, w.head, w.eps
    h = model.embed_tokens.weight[nxt]
    cos = torch.ones(1, model.config.head_dim)
    op = torch.ops.intro2llm.decode_step
    with pytest.raises(RuntimeError, match="10 entries per layer"):
        op(h, flat[:-1], norm_w, head, cache.k, cache.v, 4, cos, cos, None, 4, eps, 0)
    with pytest.raises(RuntimeError, match="W_qkv must be a contiguous float32"):
        bad = list(flat)
        bad[1] = bad[1].t()
        op(h, bad, norm_w, head, cache.k, cache.v, 4, cos, cos, None, 4, eps, 0)
    with pytest.raises(RuntimeError, match="pos 8 outside"):
        op(h, flat, norm_w, head, cache.k, cache.v, 8, cos, cos, None, 4, eps, 0)
    with pytest.raises(RuntimeError, match="key_padding_mask must be"):
        op(h, flat, norm_w, head, cache.k, cache.v, 4, cos, cos, torch.ones(2, 3, dtype=torch.bool), 4, eps, 0)
    with pytest.raises(RuntimeError, match="h must be a float32"):
        op(h.double(), flat, norm_w, head, cache.k, cache.v, 4, cos, cos, None, 4, eps, 0)
