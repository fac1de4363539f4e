"""Lesson 03 advanced tests: RMSNorm = LayerNorm on zero-mean rows, the 8/3 rule, scale invariance, gradients of
the norms through the ops against autograd of the formula."""

from __future__ import annotations

import torch

from intro2llm.model import LayerNorm, ModelConfig, RMSNorm
from intro2llm.model.analysis import count_parameters


def test_rms_norm_equals_layer_norm_on_zero_mean_rows():
    torch.manual_seed(0)
    x = torch.randn(6, 32)
    x = x - x.mean(-1, keepdim=True)
    ln = LayerNorm(32, eps=1e-6, bias=False)
    torch.testing.assert_close(RMSNorm(32, eps=1e-6)(x), ln(x), atol=1e-5, rtol=1e-5)


def test_norms_are_scale_invariant():
    torch.manual_seed(0)
    x = torch.randn(4, 32)
    for norm in (RMSNorm(32, eps=0.0), LayerNorm(32, eps=0.0)):
        torch.testing.assert_close(norm(x * 37.0), norm(x), atol=1e-5, rtol=1e-5)


def test_gated_ffn_with_eight_thirds_width_matches_a_4c_mlp_in_parameters():
    C = 768
    mlp = ModelConfig(vocab_size=10, hidden_size=C, intermediate_size=4 * C, num_hidden_layers=1,
                      num_attention_heads=12, ffn_type="relu")
    glu = mlp.replace(intermediate_size=8 * C // 3, ffn_type="swiglu")
    assert count_parameters(glu)["ffn"] == count_parameters(mlp)["ffn"]


def test_rms_norm_gradients_match_the_formula():
    torch.manual_seed(0)
    x = torch.randn(5, 48, requires_grad=True)
    norm = RMSNorm(48, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    g = torch.randn(5, 48)
    dx, dw = torch.autograd.grad(norm(x), (x, norm.weight), g)
    x2 = x.detach().clone().requires_grad_(True)
    w2 = norm.weight.detach().clone().requires_grad_(True)
    ref = x2 / torch.sqrt(x2.pow(2).mean(-1, keepdim=True) + 1e-6) * w2
    rdx, rdw = torch.autograd.grad(ref, (x2, w2), g)
    torch.testing.assert_close(dx, rdx, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(dw, rdw, atol=1e-5, rtol=1e-4)
