"""Lesson 04 basic tests: the block's residual formulas, its parameter count, shapes."""

from __future__ import annotations

import pytest
import torch

from intro2llm.model import ModelConfig, TransformerBlock
from intro2llm.model.analysis import count_parameters


def config(**kw) -> ModelConfig:
    base = dict(vocab_size=50, hidden_size=32, intermediate_size=80, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=32)
    return ModelConfig(**{**base, **kw})


def test_pre_ln_formula():
    torch.manual_seed(0)
    blk = TransformerBlock(config())
    x = torch.randn(2, 6, 32)
    h = x + blk.self_attn(blk.input_layernorm(x))
    ref = h + blk.mlp(blk.post_attention_layernorm(h))
    torch.testing.assert_close(blk(x), ref, atol=1e-6, rtol=1e-6)


def test_post_ln_formula():
    torch.manual_seed(0)
    blk = TransformerBlock(config(norm_position="post"))
    x = torch.randn(2, 6, 32)
    h = blk.input_layernorm(x + blk.self_attn(x))
    ref = blk.post_attention_layernorm(h + blk.mlp(h))
    torch.testing.assert_close(blk(x), ref, atol=1e-6, rtol=1e-6)


def test_post_ln_output_is_normalized_pre_ln_output_is_not():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 32) * 10
    post = TransformerBlock(config(norm_position="post"))(x)
    pre = TransformerBlock(config())(x)
    torch.testing.assert_close(post.pow(2).mean(-1).sqrt(), torch.ones(2, 6), atol=1e-3, rtol=0)
    assert pre.pow(2).mean(-1).sqrt().mean() > 5  # the residual stream keeps the input's scale


@pytest.mark.parametrize("kw", [{}, dict(num_key_value_heads=4), dict(ffn_type="relu", use_rms_norm=False)])
def test_block_parameters_follow_the_formula(kw):
    c = config(**kw)
    blk = TransformerBlock(c)
    C, F, Hd, Hkvd = 32, 80, c.q_size, c.kv_size
    attn = C * Hd + 2 * C * Hkvd + Hd * C
    ffn = (3 if c.ffn_type == "swiglu" else 2) * C * F
    norms = 2 * C if c.use_rms_norm else 4 * C
    assert sum(p.numel() for p in blk.parameters()) == attn + ffn + norms
    per_layer = count_parameters(c)
    assert per_layer["attention"] + per_layer["ffn"] == attn + ffn


def test_block_keeps_shape():
    assert TransformerBlock(config())(torch.randn(3, 5, 32)).shape == (3, 5, 32)
