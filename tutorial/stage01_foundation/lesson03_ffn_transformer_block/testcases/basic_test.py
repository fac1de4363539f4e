"""Lesson 03 basic tests: the three FFN forms (ReLU/GELU MLP, GeGLU, SwiGLU) against their formulas and
parameter counts; the Transformer block's Pre-LN / Post-LN residual formulas, its parameter count, shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from intro2llm.model import BasicFFN, FeedForward, ModelConfig, SwiGLU, TransformerBlock
from intro2llm.model.analysis import count_parameters

BLOCK_TASKS = ("TransformerBlock.__init__", "TransformerBlock.forward")


def config(**kw) -> ModelConfig:
    base = dict(vocab_size=50, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                max_position_embeddings=32)
    return ModelConfig(**{**base, **kw})


def block_config(**kw) -> ModelConfig:
    base = dict(vocab_size=50, hidden_size=32, intermediate_size=80, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=32)
    return ModelConfig(**{**base, **kw})


# ---- feed-forward networks
@pytest.mark.parametrize("form", [
    pytest.param("swiglu", marks=pytest.mark.task("SwiGLU._gate", "_GatedFFN.forward")),
    pytest.param("geglu", marks=pytest.mark.task("FeedForward._gate", "_GatedFFN.forward")),
    pytest.param("relu", marks=pytest.mark.task("BasicFFN.forward")),
    pytest.param("gelu", marks=pytest.mark.task("BasicFFN.forward")),
])
def test_ffn_forms_match_their_formulas(form):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64)
    if form == "swiglu":
        sw = SwiGLU(config())
        ref = sw.down_proj(F.silu(sw.gate_proj(x)) * sw.up_proj(x))
        torch.testing.assert_close(sw(x), ref, atol=1e-5, rtol=1e-5)
    elif form == "geglu":
        ge = FeedForward(config(), approximate="none")
        ref = ge.down_proj(F.gelu(ge.gate_proj(x)) * ge.up_proj(x))
        torch.testing.assert_close(ge(x), ref, atol=1e-5, rtol=1e-5)
    else:
        mlp = BasicFFN(config(), activation=form)
        act = F.relu if form == "relu" else F.gelu
        torch.testing.assert_close(mlp(x), mlp.down_proj(act(mlp.up_proj(x))), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("module, n_mats", [(SwiGLU, 3), (FeedForward, 3), (BasicFFN, 2)])
def test_ffn_parameter_counts(module, n_mats):
    m = module(config())
    assert sum(p.numel() for p in m.parameters()) == n_mats * 64 * 96


@pytest.mark.task("BasicFFN.forward")
def test_basic_ffn_is_relu_by_default_and_zeroes_negative_pre_activations():
    # the original Transformer's FFN: max(0, x W1) W2 — with W1 = I (C = F) and W2 = I the output is relu(x)
    c = ModelConfig(vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                    ffn_type="relu")
    mlp = BasicFFN(c)
    assert mlp.activation == "relu"
    with torch.no_grad():
        mlp.up_proj.weight.copy_(torch.eye(8))
        mlp.down_proj.weight.copy_(torch.eye(8))
    x = torch.tensor([[-2.0, -0.5, 0.0, 0.5, 1.0, 2.0, -3.0, 3.0]])
    torch.testing.assert_close(mlp(x), torch.tensor([[0.0, 0.0, 0.0, 0.5, 1.0, 2.0, 0.0, 3.0]]))
    assert BasicFFN(c.replace(ffn_type="gelu")).activation == "gelu"


# ---- the Transformer block
@pytest.mark.task(*BLOCK_TASKS)
def test_pre_ln_formula():
    torch.manual_seed(0)
    blk = TransformerBlock(block_config())
    x = torch.randn(2, 6, 32)
    h = x + blk.self_attn(blk.input_layernorm(x))
    ref = h + blk.mlp(blk.post_attention_layernorm(h))
    torch.testing.assert_close(blk(x), ref, atol=1e-6, rtol=1e-6)


@pytest.mark.task(*BLOCK_TASKS)
def test_post_ln_formula():
    torch.manual_seed(0)
    blk = TransformerBlock(block_config(norm_position="post"))
    x = torch.randn(2, 6, 32)
    h = blk.input_layernorm(x + blk.self_attn(x))
    ref = blk.post_attention_layernorm(h + blk.mlp(h))
    torch.testing.assert_close(blk(x), ref, atol=1e-6, rtol=1e-6)


@pytest.mark.task(*BLOCK_TASKS)
def test_post_ln_output_is_normalized_pre_ln_output_is_not():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 32) * 10
    post = TransformerBlock(block_config(norm_position="post"))(x)
    pre = TransformerBlock(block_config())(x)
    torch.testing.assert_close(post.pow(2).mean(-1).sqrt(), torch.ones(2, 6), atol=1e-3, rtol=0)
    assert pre.pow(2).mean(-1).sqrt().mean() > 5  # the residual stream keeps the input's scale


@pytest.mark.task("TransformerBlock.__init__")  # counts parameters only: forward is graded by the other block tests
@pytest.mark.parametrize("kw", [{}, dict(num_key_value_heads=4), dict(ffn_type="relu", use_rms_norm=False)])
def test_block_parameters_follow_the_formula(kw):
    c = block_config(**kw)
    blk = TransformerBlock(c)
    C, F, Hd, Hkvd = 32, 80, c.q_size, c.kv_size
    attn = C * Hd + 2 * C * Hkvd + Hd * C
    ffn = (3 if c.ffn_type == "swiglu" else 2) * C * F
    norms = 2 * C if c.use_rms_norm else 4 * C
    assert sum(p.numel() for p in blk.parameters()) == attn + ffn + norms
    per_layer = count_parameters(c)
    assert per_layer["attention"] + per_layer["ffn"] == attn + ffn


@pytest.mark.task(*BLOCK_TASKS)
def test_block_keeps_shape():
    assert TransformerBlock(block_config())(torch.randn(3, 5, 32)).shape == (3, 5, 32)
