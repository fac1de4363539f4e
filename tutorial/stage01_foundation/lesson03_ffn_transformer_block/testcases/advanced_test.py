"""Lesson 03 advanced tests: the 8/3 rule (a gated FFN of width 8C/3 has the parameters of a 4C MLP); the
exact identity path of Pre-LN (and its absence in Post-LN), dropout only in training."""

from __future__ import annotations

import pytest
import torch

from intro2llm.model import ModelConfig, TransformerBlock
from intro2llm.model.analysis import count_parameters

BLOCK_TASKS = ("TransformerBlock.__init__", "TransformerBlock.forward")


def block_config(**kw) -> ModelConfig:
    base = dict(vocab_size=50, hidden_size=32, intermediate_size=80, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64)
    return ModelConfig(**{**base, **kw})


def test_gated_ffn_with_eight_thirds_width_matches_a_4c_mlp_in_parameters():
    C = 768
    mlp = ModelConfig(vocab_size=10, hidden_size=C, intermediate_size=4 * C, num_hidden_layers=1,
                      num_attention_heads=12, ffn_type="relu")
    glu = mlp.replace(intermediate_size=8 * C // 3, ffn_type="swiglu")
    assert count_parameters(glu)["ffn"] == count_parameters(mlp)["ffn"]


def _zero_sublayer_outputs(blk: TransformerBlock) -> None:
    with torch.no_grad():
        blk.self_attn.o_proj.weight.zero_()
        blk.mlp.down_proj.weight.zero_()


@pytest.mark.task(*BLOCK_TASKS)
def test_pre_ln_keeps_an_exact_identity_path_post_ln_does_not():
    # With every sub-layer writing zeros, a Pre-LN stack is the identity (the gradient reaches the input
    # unchanged: dy/dx = I), while a Post-LN stack still renormalizes the stream at every layer.
    torch.manual_seed(0)
    x = torch.randn(2, 5, 32, requires_grad=True) * 3
    for position in ("pre", "post"):
        blocks = [TransformerBlock(block_config(norm_position=position), i) for i in range(6)]
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


@pytest.mark.task(*BLOCK_TASKS)
def test_dropout_only_in_training():
    torch.manual_seed(0)
    blk = TransformerBlock(block_config(dropout=0.5))
    x = torch.randn(1, 4, 32)
    blk.train()
    assert not torch.equal(blk(x), blk(x))
    blk.eval()
    assert torch.equal(blk(x), blk(x))


# ---- course mode, --include-kernels: the Triton forward kernel (on CPU it runs in Triton's interpreter), fp32
@pytest.mark.skipif("triton" not in __import__("intro2llm.ops", fromlist=["x"]).available_backends(),
                    reason="triton: not installed (pip install triton)")
@pytest.mark.task("_glu_fwd_kernel")
def test_triton_swiglu_kernel_matches_reference():
    import intro2llm.ops as ops

    torch.manual_seed(0)
    gate, up = torch.randn(6, 48), torch.randn(6, 48)
    torch.testing.assert_close(ops.swiglu(gate, up, backend="triton"), ops.swiglu_reference(gate, up), atol=1e-5,
                               rtol=1e-5)
