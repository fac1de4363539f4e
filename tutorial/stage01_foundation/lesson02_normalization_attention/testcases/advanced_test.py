"""Lesson 02 advanced tests: RMSNorm = LayerNorm on zero-mean rows, scale invariance, RMSNorm gradients against
autograd of the formula; GQA equals MHA with repeated K/V weights, causal leakage, sliding windows and padding
masks against PyTorch SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from intro2llm.model import GroupedQueryAttention, LayerNorm, ModelConfig, MultiHeadAttention, RMSNorm
from intro2llm.model.attention import sliding_window_mask

ATTN_TASKS = ("GroupedQueryAttention.__init__", "GroupedQueryAttention.forward")


def config(**kw) -> ModelConfig:
    base = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64)
    return ModelConfig(**{**base, **kw})


# ---- normalization
@pytest.mark.task("RMSNorm.forward", "LayerNorm.__init__", "LayerNorm.forward")
def test_rms_norm_equals_layer_norm_on_zero_mean_rows():
    torch.manual_seed(0)
    x = torch.randn(6, 32)
    x = x - x.mean(-1, keepdim=True)
    ln = LayerNorm(32, eps=1e-6, bias=False)
    torch.testing.assert_close(RMSNorm(32, eps=1e-6)(x), ln(x), atol=1e-5, rtol=1e-5)


@pytest.mark.task("RMSNorm.forward", "LayerNorm.forward")
def test_norms_are_scale_invariant():
    torch.manual_seed(0)
    x = torch.randn(4, 32)
    for norm in (RMSNorm(32, eps=0.0), LayerNorm(32, eps=0.0)):
        torch.testing.assert_close(norm(x * 37.0), norm(x), atol=1e-5, rtol=1e-5)


@pytest.mark.task("RMSNorm.__init__", "RMSNorm.forward")
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


# ---- attention
@pytest.mark.task("MultiHeadAttention.__init__", *ATTN_TASKS)
def test_gqa_equals_mha_with_repeated_kv_weights():
    torch.manual_seed(0)
    gqa = GroupedQueryAttention(config(num_key_value_heads=2))
    mha = MultiHeadAttention(config())
    d, group = 8, 2
    with torch.no_grad():
        mha.q_proj.weight.copy_(gqa.q_proj.weight)
        mha.o_proj.weight.copy_(gqa.o_proj.weight)
        for name in ("k_proj", "v_proj"):  # (Hkv·d, C) → (H·d, C): each kv head's rows repeated per group
            w = getattr(gqa, name).weight.view(2, d, 32).repeat_interleave(group, dim=0).reshape(32, 32)
            getattr(mha, name).weight.copy_(w)
    x = torch.randn(2, 7, 32)
    torch.testing.assert_close(gqa(x), mha(x), atol=1e-5, rtol=1e-5)


@pytest.mark.task("GroupedQueryAttention.forward")
def test_changing_future_tokens_never_changes_past_outputs():
    torch.manual_seed(0)
    attn = GroupedQueryAttention(config())
    x = torch.randn(1, 10, 32)
    y = x.clone()
    y[:, 6:] = torch.randn(1, 4, 32)
    torch.testing.assert_close(attn(x)[:, :6], attn(y)[:, :6], atol=0, rtol=0)


def _reference(attn, x, keep):
    B, T, _ = x.shape
    q = attn.q_proj(x).view(B, T, 4, 8).transpose(1, 2)
    k = attn.k_proj(x).view(B, T, 2, 8).transpose(1, 2).repeat_interleave(2, 1)
    v = attn.v_proj(x).view(B, T, 2, 8).transpose(1, 2).repeat_interleave(2, 1)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    return attn.o_proj(o.transpose(1, 2).reshape(B, T, 32))


@pytest.mark.task("GroupedQueryAttention.forward")
def test_sliding_window_against_sdpa():
    torch.manual_seed(0)
    attn = GroupedQueryAttention(config(sliding_window=3))
    x = torch.randn(2, 9, 32)
    torch.testing.assert_close(attn(x), _reference(attn, x, sliding_window_mask(9, 3)), atol=1e-5, rtol=1e-5)


@pytest.mark.task("GroupedQueryAttention.forward")
def test_padding_mask_real_tokens_ignore_pads():
    torch.manual_seed(0)
    attn = GroupedQueryAttention(config())
    real = torch.randn(1, 4, 32)
    padded = torch.cat([torch.randn(1, 3, 32) * 100, real], dim=1)  # 3 pad positions with garbage
    pad = torch.tensor([[False] * 3 + [True] * 4])
    out = attn(padded, key_padding_mask=pad)[:, 3:]
    # without RoPE the position offset does not matter: real tokens alone give the same result
    torch.testing.assert_close(out, attn(real), atol=1e-5, rtol=1e-5)
    # the first pad query sees no key at all: attention output 0, so o_proj (no bias) gives exactly 0
    assert torch.equal(attn(padded, key_padding_mask=pad)[0, 0], torch.zeros(32))


# ---- course mode, --include-kernels: the Triton forward kernel (on CPU it runs in Triton's interpreter), fp32
@pytest.mark.skipif("triton" not in __import__("intro2llm.ops", fromlist=["x"]).available_backends(),
                    reason="triton: not installed (pip install triton)")
@pytest.mark.task("_rms_norm_fwd_kernel")
def test_triton_rms_norm_kernel_matches_reference():
    import intro2llm.ops as ops

    torch.manual_seed(0)
    x, w = torch.randn(6, 32), torch.rand(32) + 0.5
    torch.testing.assert_close(ops.rms_norm(x, w, backend="triton"), ops.rms_norm_reference(x, w), atol=1e-5,
                               rtol=1e-5)
