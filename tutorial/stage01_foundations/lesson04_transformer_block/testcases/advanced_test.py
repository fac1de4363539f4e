"""Lesson 04 advanced tests: token-by-token with a KV cache equals the whole sequence, the identity path of
Pre-LN (and its absence in Post-LN), dropout only in training."""

from __future__ import annotations

import torch

from intro2llm.model import DynamicKVCache, ModelConfig, RotaryEmbedding, TransformerBlock


def config(**kw) -> ModelConfig:
    base = dict(vocab_size=50, hidden_size=32, intermediate_size=80, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64)
    return ModelConfig(**{**base, **kw})


def test_block_with_rope_and_cache_token_by_token_equals_full_sequence():
    torch.manual_seed(0)
    c = config()
    blk = TransformerBlock(c)
    rope = RotaryEmbedding(c.head_dim, c.max_position_embeddings)
    x = torch.randn(2, 7, 32)
    full = blk(x, rope(torch.arange(7)))
    cache = DynamicKVCache()
    steps = []
    for t in range(7):
        steps.append(blk(x[:, t : t + 1], rope(torch.tensor([t])), cache))
        cache.advance(1)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def _zero_sublayer_outputs(blk: TransformerBlock) -> None:
    with torch.no_grad():
        blk.self_attn.o_proj.weight.zero_()
        blk.mlp.down_proj.weight.zero_()


def test_pre_ln_keeps_an_exact_identity_path_post_ln_does_not():
    # With every sub-layer writing zeros, a Pre-LN stack is the identity (the gradient reaches the input
    # unchanged: dy/dx = I), while a Post-LN stack still renormalizes the stream at every layer.
    torch.manual_seed(0)
    x = torch.randn(2, 5, 32, requires_grad=True) * 3
    for position in ("pre", "post"):
        blocks = [TransformerBlock(config(norm_position=position), i) for i in range(6)]
        for b in blocks:
            _zero_sublayer_outputs(b)
        h = x
        for b in blocks:
            h = b(h)
        (g,) = torch.autograd.grad(h.sum(), x)
        if position == "pre":
            torch.testing.assert_close(h, x)
            torch.testing.assert_close(g, torch.ones_like(x))
        else:
            assert not torch.allclose(h, x, atol=1e-3)
            torch.testing.assert_close(h.pow(2).mean(-1).sqrt(), torch.ones(2, 5), atol=1e-3, rtol=0)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    blk = TransformerBlock(config(dropout=0.5))
    x = torch.randn(1, 4, 32)
    blk.train()
    assert not torch.equal(blk(x), blk(x))
    blk.eval()
    assert torch.equal(blk(x), blk(x))
