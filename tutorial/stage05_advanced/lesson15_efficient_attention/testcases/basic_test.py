"""Lesson 15 basic tests: KV-cache bytes of MHA/GQA/MQA, repeat_kv, the sliding-window mask, the online softmax and
the tiled (flash) algorithm in PyTorch — each checked against an independent computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import intro2llm.ops as ops
from intro2llm.configs import get_config
from intro2llm.model.analysis import kv_cache_bytes
from intro2llm.model.kv_cache import StaticKVCache
from intro2llm.ops.flash_attention import attention_mask, naive_attention, repeat_kv, sliding_window_mask


@pytest.mark.task("kv_cache_bytes")
@pytest.mark.parametrize("kv_heads,kib", [(32, 512), (8, 128), (1, 16)])
def test_llama3_8b_kv_cache_bytes_per_token(kv_heads, kib):
    # Llama-3-8B: 32 layers, head_dim 128; bf16 → 2 (k, v) · 32 · kv_heads · 128 · 2 bytes per token
    cfg = get_config("llama3_8b", num_key_value_heads=kv_heads)
    assert cfg.head_dim == 128 and cfg.num_hidden_layers == 32
    assert kv_cache_bytes(cfg, batch=1, seq_len=1, dtype="bfloat16") == kib * 1024
    # 8K tokens of context: MHA 4 GiB, GQA-8 1 GiB, MQA 128 MiB
    assert kv_cache_bytes(cfg, batch=1, seq_len=8192, dtype="bfloat16") == kib * 1024 * 8192


@pytest.mark.task("kv_cache_bytes")
@pytest.mark.parametrize("kv_heads", [8, 4, 1])
def test_formula_matches_a_real_cache(kv_heads):
    cfg = get_config("tiny", num_key_value_heads=kv_heads)
    cache = StaticKVCache.from_config(cfg, batch_size=2, max_seq_len=16, dtype=torch.float16)
    allocated = cache.k.numel() * cache.k.element_size() + cache.v.numel() * cache.v.element_size()
    assert allocated == kv_cache_bytes(cfg, batch=2, seq_len=16, dtype="float16")


@pytest.mark.task("sliding_window_mask")
def test_sliding_window_mask_by_hand():
    # T = 5, window 3: token i sees i-2, i-1, i
    want = torch.tensor(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 1, 1, 1, 0], [0, 0, 1, 1, 1]], dtype=torch.bool
    )
    assert torch.equal(attention_mask(5, 5, causal=True, window=3), want)
    # decoding: 1 query at the last position (bottom-right) sees the last 3 keys
    assert torch.equal(attention_mask(1, 5, causal=True, window=3), want[-1:])
    assert torch.equal(sliding_window_mask(5, 3), want)
    assert torch.equal(sliding_window_mask(1, 3, Tk=5), want[-1:])
    # every row sees min(position + 1, window) keys: the O(T·w) work of the lesson
    assert sliding_window_mask(50, 8).sum(-1).tolist() == [min(i + 1, 8) for i in range(50)]
    with pytest.raises(ValueError, match="window"):
        sliding_window_mask(5, 0)


@pytest.mark.task("repeat_kv")
@pytest.mark.parametrize("n_rep", [1, 2, 4])
def test_repeat_kv_gives_query_head_h_the_kv_head_h_over_g(n_rep):
    kv = torch.randn(2, 3, 5, 4)
    got = repeat_kv(kv, n_rep)
    assert got.shape == (2, 3 * n_rep, 5, 4)
    torch.testing.assert_close(got, torch.repeat_interleave(kv, n_rep, dim=1), rtol=0, atol=0)
    for h in range(3 * n_rep):
        assert torch.equal(got[:, h], kv[:, h // n_rep])


@pytest.mark.task("repeat_kv")
def test_gqa_reference_attention_equals_sdpa_on_repeated_heads():
    # naive attention with 2 kv heads for 8 query heads (it expands K/V with repeat_kv) vs SDPA on copies
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 8, 6, 16), torch.randn(1, 2, 6, 16), torch.randn(1, 2, 6, 16)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), is_causal=True)
    torch.testing.assert_close(naive_attention(q, k, v, attention_mask(6, 6)), want, atol=1e-5, rtol=1e-5)


def test_window_as_large_as_the_sequence_is_plain_causal():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 16) for _ in range(3))
    torch.testing.assert_close(
        ops.flash_attention_reference(q, k, v, True, window=9), F.scaled_dot_product_attention(q, k, v, is_causal=True)
    )


@pytest.mark.parametrize("block_k", [1, 64, 1000])
def test_online_softmax_equals_softmax(block_k):
    # The tiled algorithm streams a row of scores in blocks of block_k keys, keeping only a running max m and sum l.
    # With one query q = e_0, keys k_j = x_j e_0 (scores = x_j) and one-hot values v_j = e_j, its output row is
    # exactly softmax(x): the online softmax of the project's flash_attention_tiled_reference, read out directly.
    torch.manual_seed(0)
    n = 200
    x = torch.randn(n, dtype=torch.float64) * 10
    q = torch.zeros(1, 1, 1, n, dtype=torch.float64)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, n, n, dtype=torch.float64)
    k[0, 0, :, 0] = x
    v = torch.eye(n, dtype=torch.float64)[None, None]
    got = ops.flash_attention_tiled_reference(q, k, v, causal=False, scale=1.0, block_q=1, block_k=block_k)
    torch.testing.assert_close(got[0, 0, 0], torch.softmax(x, 0), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("block_q,block_k", [(1, 1), (7, 5), (64, 64)])
@pytest.mark.parametrize("causal,window", [(True, None), (True, 6), (False, None)])
def test_tiled_algorithm_equals_sdpa(block_q, block_k, causal, window):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 23, 8, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 23, 8, dtype=torch.float64) for _ in range(2))  # GQA: 2 kv heads
    mask = attention_mask(23, 23, causal, window)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask)
    got = ops.flash_attention_tiled_reference(q, k, v, causal, window, block_q=block_q, block_k=block_k)
    torch.testing.assert_close(got, want)
