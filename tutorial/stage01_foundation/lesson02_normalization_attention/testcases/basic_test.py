"""Lesson 02 basic tests: LayerNorm vs RMSNorm statistics and formulas; the attention formula, its 1/sqrt(d)
scaling, the masks, MHA/GQA/MQA shapes and parameter counts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from intro2llm.model import GroupedQueryAttention, LayerNorm, ModelConfig, RMSNorm, repeat_kv
from intro2llm.model.attention import causal_mask, naive_attention, padding_mask, sliding_window_mask


def config(**kw) -> ModelConfig:
    base = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64)
    return ModelConfig(**{**base, **kw})


ATTN_TASKS = ("GroupedQueryAttention.__init__", "GroupedQueryAttention.forward")


# ---- normalization
@pytest.mark.task("LayerNorm.__init__", "LayerNorm.forward")
def test_layer_norm_output_has_zero_mean_unit_variance():
    torch.manual_seed(0)
    x = torch.randn(8, 64) * 5 + 3
    y = LayerNorm(64, eps=1e-6)(x)
    torch.testing.assert_close(y.mean(-1), torch.zeros(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(-1, unbiased=False), torch.ones(8), atol=1e-4, rtol=0)


@pytest.mark.task("RMSNorm.__init__", "RMSNorm.forward")
def test_rms_norm_output_has_unit_rms_but_keeps_the_mean():
    torch.manual_seed(0)
    x = torch.randn(8, 64) + 3  # rows with a large mean
    y = RMSNorm(64, eps=1e-6)(x)
    torch.testing.assert_close(y.pow(2).mean(-1).sqrt(), torch.ones(8), atol=1e-4, rtol=0)
    assert (y.mean(-1) > 0.5).all()  # unlike LayerNorm, the mean is not removed


@pytest.mark.task("RMSNorm.__init__", "RMSNorm.forward")
def test_rms_norm_by_hand_and_against_torch():
    x = torch.tensor([[3.0, 4.0]])  # rms = sqrt((9 + 16) / 2) = sqrt(12.5)
    y = RMSNorm(2, eps=0.0)(x)
    torch.testing.assert_close(y, x / 12.5 ** 0.5)
    torch.manual_seed(0)
    x = torch.randn(4, 7, 64)
    norm = RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    torch.testing.assert_close(norm(x), F.rms_norm(x, (64,), norm.weight, 1e-6), atol=1e-5, rtol=1e-5)


@pytest.mark.task("LayerNorm.__init__", "LayerNorm.forward")
def test_layer_norm_equals_torch():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 64)
    ours = LayerNorm(64, eps=1e-5)
    ref = torch.nn.LayerNorm(64, eps=1e-5)
    with torch.no_grad():
        ours.weight.normal_()
        ours.bias.normal_()
        ref.weight.copy_(ours.weight)
        ref.bias.copy_(ours.bias)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)


# ---- attention
@pytest.mark.task("naive_attention", "causal_mask")
def test_attention_by_hand_two_tokens():
    # one head, d = 1: q = [[1], [1]], k = [[0], [2]], v = [[10], [20]]; token 1 sees both keys
    q = torch.tensor([[[[1.0], [1.0]]]])
    k = torch.tensor([[[[0.0], [2.0]]]])
    v = torch.tensor([[[[10.0], [20.0]]]])
    out = naive_attention(q, k, v, causal_mask(2))
    w = torch.softmax(torch.tensor([0.0, 2.0]), 0)  # scores q·k / sqrt(1)
    assert out[0, 0, 0, 0].item() == pytest.approx(10.0)  # token 0 sees only itself
    assert out[0, 0, 1, 0].item() == pytest.approx((w[0] * 10 + w[1] * 20).item(), rel=1e-6)


@pytest.mark.task("naive_attention", "causal_mask")
def test_naive_attention_equals_torch_sdpa():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 6, 8) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(naive_attention(q, k, v, causal_mask(6)), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.task("naive_attention")
def test_scaling_keeps_score_variance_near_one():
    # Scores q·k of d-dim unit-variance vectors have variance d; the attention divides them by sqrt(d). The scores
    # are read back from the project's attention: with V = I the output row is softmax(s), and log softmax(s)
    # = s - logsumexp(s), so the variance of log-probabilities along a row is the variance of the scores.
    torch.manual_seed(0)
    d, n = 256, 200
    q = torch.randn(1, 1, n, d, dtype=torch.float64)
    k = torch.randn(1, 1, n, d, dtype=torch.float64)
    eye = torch.eye(n, dtype=torch.float64)[None, None]  # V = I
    probs = naive_attention(q, k, eye)  # default scale: 1/sqrt(d)
    assert probs.sum(-1).sub(1).abs().max() < 1e-9
    assert probs.log().var(-1).mean().item() == pytest.approx(1.0, rel=0.15)
    unscaled = naive_attention(q, k, eye, scale=1.0)  # without the scaling the variance is d
    assert unscaled.log().var(-1).mean().item() == pytest.approx(d, rel=0.15)


@pytest.mark.task(*ATTN_TASKS)
def test_attention_module_scales_scores_by_inverse_sqrt_head_dim():
    # the module's attention (projections -> the attention op): with W_Q = W_K = I and W_V = I, one head, d = 64,
    # the output of the last query is softmax(q·k / 8) V; checked against the formula written here
    torch.manual_seed(0)
    c = ModelConfig(vocab_size=10, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1,
                    max_position_embeddings=16)
    attn = GroupedQueryAttention(c)
    with torch.no_grad():
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
            proj.weight.copy_(torch.eye(64))
    x = torch.randn(1, 6, 64)
    w = torch.softmax(x[0, -1] @ x[0].T / 8.0, dim=-1)
    torch.testing.assert_close(attn(x)[0, -1], w @ x[0], atol=1e-5, rtol=1e-5)


@pytest.mark.task("causal_mask")
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


@pytest.mark.task(*ATTN_TASKS)
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_parameter_count_and_output_shape(kv_heads):
    attn = GroupedQueryAttention(config(num_key_value_heads=kv_heads))
    C, d = 32, 8
    expected = C * 4 * d + 2 * C * kv_heads * d + 4 * d * C  # W_Q, W_K + W_V, W_O
    assert sum(p.numel() for p in attn.parameters()) == expected
    assert attn(torch.randn(2, 5, C)).shape == (2, 5, C)
