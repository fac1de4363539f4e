"""Lesson 15 basic tests: KV-cache bytes of MHA/GQA/MQA, the sliding-window mask, the online softmax and the
tiled (flash) algorithm in PyTorch — each checked against an independent computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import intro2llm.ops as ops
from intro2llm.configs import get_config
from intro2llm.model.analysis import kv_cache_bytes
from intro2llm.model.kv_cache import StaticKVCache
from intro2llm.ops.flash_attention import attention_mask


@pytest.mark.parametrize("kv_heads,kib", [(32, 512), (8, 128), (1, 16)])
def test_llama3_8b_kv_cache_bytes_per_token(kv_heads, kib):
    # Llama-3-8B: 32 layers, head_dim 128; bf16 → 2 (k, v) · 32 · kv_heads · 128 · 2 bytes per token
    cfg = get_config("llama3_8b", num_key_value_heads=kv_heads)
    assert cfg.head_dim == 128 and cfg.num_hidden_layers == 32
    assert kv_cache_bytes(cfg, batch=1, seq_len=1, dtype="bfloat16") == kib * 1024
    # 8K tokens of context: MHA 4 GiB, GQA-8 1 GiB, MQA 128 MiB
    assert kv_cache_bytes(cfg, batch=1, seq_len=8192, dtype="bfloat16") == kib * 1024 * 8192


@pytest.mark.parametrize("kv_heads", [8, 4, 1])
def test_formula_matches_a_real_cache(kv_heads):
    cfg = get_config("tiny", num_key_value_heads=kv_heads)
    cache = StaticKVCache.from_config(cfg, batch_size=2, max_seq_len=16, dtype=torch.float16)
    allocated = cache.k.numel() * cache.k.element_size() + cache.v.numel() * cache.v.element_size()
    assert allocated == kv_cache_bytes(cfg, batch=2, seq_len=16, dtype="float16")


def test_sliding_window_mask_by_hand():
    # T = 5, window 3: token i sees i-2, i-1, i
    want = torch.tensor(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 1, 1, 1, 0], [0, 0, 1, 1, 1]], dtype=torch.bool
    )
    assert torch.equal(attention_mask(5, 5, causal=True, window=3), want)
    # decoding: 1 query at the last position (bottom-right) sees the last 3 keys
    assert torch.equal(attention_mask(1, 5, causal=True, window=3), want[-1:])


def test_window_as_large_as_the_sequence_is_plain_causal():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 16) for _ in range(3))
    torch.testing.assert_close(
        ops.flash_attention_reference(q, k, v, True, window=9), F.scaled_dot_product_attention(q, k, v, is_causal=True)
    )


def test_online_softmax_equals_softmax():
    # the running max m and sum l over chunks give the same normalizer as one pass over the whole row
    torch.manual_seed(0)
    x = torch.randn(1000, dtype=torch.float64) * 10
    m, total = torch.tensor(float("-inf"), dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
    for chunk in x.split(64):
        m_new = torch.maximum(m, chunk.max())
        total = total * torch.exp(m - m_new) + torch.exp(chunk - m_new).sum()
        m = m_new
    torch.testing.assert_close(torch.exp(x - m) / total, torch.softmax(x, 0))
    torch.testing.assert_close(m + torch.log(total), torch.logsumexp(x, 0))


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
