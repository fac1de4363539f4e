"""Lesson 02 basic tests: the attention formula, the masks, MHA/GQA/MQA shapes and parameter counts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from intro2llm.model import GroupedQueryAttention, ModelConfig, repeat_kv
from intro2llm.model.attention import causal_mask, naive_attention, padding_mask, sliding_window_mask


def config(**kw) -> ModelConfig:
    base = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64)
    return ModelConfig(**{**base, **kw})


def test_attention_by_hand_two_tokens():
    # one head, d = 1: q = [[1], [1]], k = [[0], [2]], v = [[10], [20]]; token 1 sees both keys
    q = torch.tensor([[[[1.0], [1.0]]]])
    k = torch.tensor([[[[0.0], [2.0]]]])
    v = torch.tensor([[[[10.0], [20.0]]]])
    out = naive_attention(q, k, v, causal_mask(2))
    w = torch.softmax(torch.tensor([0.0, 2.0]), 0)  # scores q·k / sqrt(1)
    assert out[0, 0, 0, 0].item() == pytest.approx(10.0)  # token 0 sees only itself
    assert out[0, 0, 1, 0].item() == pytest.approx((w[0] * 10 + w[1] * 20).item(), rel=1e-6)


def test_naive_attention_equals_torch_sdpa():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 6, 8) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(naive_attention(q, k, v, causal_mask(6)), ref, atol=1e-5, rtol=1e-5)


def test_scaling_keeps_score_variance_near_one():
    torch.manual_seed(0)
    d = 256
    q, k = torch.randn(4000, d), torch.randn(4000, d)
    raw = (q * k).sum(-1)
    assert raw.var().item() == pytest.approx(d, rel=0.1)
    assert (raw / math.sqrt(d)).var().item() == pytest.approx(1.0, rel=0.1)


def test_masks():
    assert torch.equal(causal_mask(3), torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool))
    # decoding: 1 query over 4 keys sees all of them (bottom-right alignment)
    assert causal_mask(1, 4).all()
    w = sliding_window_mask(5, 2)
    assert w.sum(-1).tolist() == [1, 2, 2, 2, 2]
    assert padding_mask(torch.tensor([[0, 1, 1]])).shape == (1, 1, 1, 3)


def test_repeat_kv_maps_query_head_to_its_group():
    kv = torch.arange(2.0).view(1, 2, 1, 1)  # kv head 0 holds 0, kv head 1 holds 1
    assert repeat_kv(kv, 3).flatten().tolist() == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_parameter_count_and_output_shape(kv_heads):
    attn = GroupedQueryAttention(config(num_key_value_heads=kv_heads))
    C, d = 32, 8
    expected = C * 4 * d + 2 * C * kv_heads * d + 4 * d * C  # W_Q, W_K + W_V, W_O
    assert sum(p.numel() for p in attn.parameters()) == expected
    assert attn(torch.randn(2, 5, C)).shape == (2, 5, C)


def test_config_rejects_heads_not_divisible_by_kv_heads():
    with pytest.raises(ValueError, match="num_key_value_heads"):
        config(num_key_value_heads=3)
