"""Lesson 03 basic tests: LayerNorm vs RMSNorm statistics and formulas, the three FFN forms."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from intro2llm.model import BasicFFN, FeedForward, LayerNorm, ModelConfig, RMSNorm, SwiGLU


def config(**kw) -> ModelConfig:
    base = dict(vocab_size=50, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                max_position_embeddings=32)
    return ModelConfig(**{**base, **kw})


def test_layer_norm_output_has_zero_mean_unit_variance():
    torch.manual_seed(0)
    x = torch.randn(8, 64) * 5 + 3
    y = LayerNorm(64, eps=1e-6)(x)
    torch.testing.assert_close(y.mean(-1), torch.zeros(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(-1, unbiased=False), torch.ones(8), atol=1e-4, rtol=0)


def test_rms_norm_output_has_unit_rms_but_keeps_the_mean():
    torch.manual_seed(0)
    x = torch.randn(8, 64) + 3  # rows with a large mean
    y = RMSNorm(64, eps=1e-6)(x)
    torch.testing.assert_close(y.pow(2).mean(-1).sqrt(), torch.ones(8), atol=1e-4, rtol=0)
    assert (y.mean(-1) > 0.5).all()  # unlike LayerNorm, the mean is not removed


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


def test_ffn_forms_match_their_formulas():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64)
    sw = SwiGLU(config())
    torch.testing.assert_close(sw(x), sw.down_proj(F.silu(sw.gate_proj(x)) * sw.up_proj(x)), atol=1e-5, rtol=1e-5)
    ge = FeedForward(config(), approximate="none")
    ref = ge.down_proj(F.gelu(ge.gate_proj(x)) * ge.up_proj(x))
    torch.testing.assert_close(ge(x), ref, atol=1e-5, rtol=1e-5)
    mlp = BasicFFN(config(), activation="gelu")
    torch.testing.assert_close(mlp(x), mlp.down_proj(F.gelu(mlp.up_proj(x))), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("module, n_mats", [(SwiGLU, 3), (FeedForward, 3), (BasicFFN, 2)])
def test_ffn_parameter_counts(module, n_mats):
    m = module(config())
    assert sum(p.numel() for p in m.parameters()) == n_mats * 64 * 96
