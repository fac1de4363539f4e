"""Lesson 04 basic tests: the KV cache's update, the whole model — loss at initialization, label shifting,
causal leakage, greedy decoding with and without the KV cache, sampling filters, bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from intro2llm.model import CausalLM, DynamicKVCache, StaticKVCache, top_k_filter, top_p_filter
from intro2llm.testing import tiny_config

MODEL = ("CausalLM.__init__", "CausalLM.forward")
GENERATE = ("CausalLM.generate", "CausalLM.stream_generate", "sample_next_token")


# ---- the KV cache
@pytest.mark.task("StaticKVCache.update", "DynamicKVCache.update")
def test_kv_cache_update_appends_and_returns_the_whole_history():
    torch.manual_seed(0)
    B, Hkv, D = 2, 3, 4
    for cache in (StaticKVCache(num_layers=2, batch_size=B, max_seq_len=6, num_kv_heads=Hkv, head_dim=D),
                  DynamicKVCache()):
        ks, vs = [], []
        for n in (3, 1, 2):  # a 3-token prefill, then 1 token, then 2
            k, v = torch.randn(B, Hkv, n, D), torch.randn(B, Hkv, n, D)
            ks.append(k)
            vs.append(v)
            for layer in (0, 1):  # every layer writes at the same position; layers are kept apart
                k_all, v_all = cache.update(layer, k + layer, v - layer)
                torch.testing.assert_close(k_all, torch.cat(ks, 2) + layer, atol=0, rtol=0)
                torch.testing.assert_close(v_all, torch.cat(vs, 2) - layer, atol=0, rtol=0)
            cache.advance(n)
        assert cache.get_seq_length() == 6
    full = StaticKVCache(num_layers=1, batch_size=1, max_seq_len=2, num_kv_heads=1, head_dim=2)
    with pytest.raises(ValueError, match="max_seq_len"):
        full.update(0, torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2))


@pytest.mark.task("top_k_filter")
def test_top_k_filter_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 3.0, -1.0, 2.0], [0.0, -5.0, 4.0, 1.0]])
    kept = top_k_filter(logits, 2).isfinite()
    assert kept.tolist() == [[False, True, False, True], [False, False, True, True]]
    torch.testing.assert_close(top_k_filter(logits, 2)[kept], logits[kept])  # kept logits unchanged
    assert top_k_filter(logits, 10).isfinite().all()  # k >= V keeps everything


# ---- the model
@pytest.mark.task(*MODEL)
def test_loss_at_initialization_is_log_vocab():
    torch.manual_seed(0)
    model = CausalLM(tiny_config(initializer_range=0.002))
    ids = torch.randint(0, 53, (4, 16))
    assert model(ids, labels=ids).loss.item() == pytest.approx(math.log(53), abs=0.05)


@pytest.mark.task(*MODEL)
def test_labels_are_shifted_inside():
    torch.manual_seed(0)
    model = CausalLM(tiny_config())
    ids = torch.randint(0, 53, (2, 9))
    out = model(ids, labels=ids)
    ref = F.cross_entropy(out.logits[:, :-1].reshape(-1, 53), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.task(*MODEL)
def test_changing_a_future_token_never_changes_past_logits():
    torch.manual_seed(0)
    model = CausalLM(tiny_config()).eval()
    ids = torch.randint(0, 53, (1, 10))
    for t in range(1, 10):
        changed = ids.clone()
        changed[0, t] = (changed[0, t] + 1) % 53
        torch.testing.assert_close(model(ids).logits[:, :t], model(changed).logits[:, :t], atol=0, rtol=0)


# ---- generation
@pytest.mark.task(*GENERATE, "CausalLM._decode_cached", "StaticKVCache.update")
def test_greedy_with_cache_equals_without():
    torch.manual_seed(0)
    model = CausalLM(tiny_config(initializer_range=0.2)).eval()
    ids = torch.randint(0, 53, (2, 4))
    assert torch.equal(model.generate(ids, 30), model.generate(ids, 30, use_cache=False))


@pytest.mark.task("top_p_filter", *GENERATE)
def test_top_p_and_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    probs = torch.softmax(logits, -1)[0]  # 0.644, 0.237, 0.087, 0.032; cumulative 0.644, 0.881, 0.968, 1
    assert probs[0] < 0.85 <= probs[:2].sum() < 0.9 <= probs[:3].sum()
    assert top_p_filter(logits, 0.85).isfinite()[0].tolist() == [True, True, False, False]
    assert top_p_filter(logits, 0.9).isfinite()[0].tolist() == [True, True, True, False]
    assert top_p_filter(logits, 0.5).isfinite()[0].tolist() == [True, False, False, False]
    torch.manual_seed(0)
    model = CausalLM(tiny_config(initializer_range=0.2)).eval()
    ids = torch.randint(0, 53, (1, 3))
    assert torch.equal(model.generate(ids, 8, do_sample=True, temperature=0.0), model.generate(ids, 8))


@pytest.mark.task("CausalLM.forward", "CausalLM.stream_generate")
def test_bad_input():
    model = CausalLM(tiny_config())
    with pytest.raises(ValueError, match="vocabulary"):
        model(torch.tensor([[0, 53]]))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.generate(torch.zeros(1, 60, dtype=torch.long), 10)
