"""Lesson 14 basic tests: the LoRA formula and its parameter count (the 256x example), zero-init and merge, NF4 built
from normal quantiles, blockwise quantize/dequantize by hand, and the fp32/fp16/bf16 ranges behind autocast."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from intro2llm.model.lora import LoRALayer, trainable_parameter_report
from intro2llm.ops.nf4 import NF4_CODE, NF4Weight, dequantize_tensor, quantize_tensor


@pytest.mark.task("LoRALayer")
def test_compression_example_is_256x():
    # a 4096 x 4096 projection with a rank-8 adapter; the meta device counts parameters without allocating them
    layer = LoRALayer(nn.Linear(4096, 4096, bias=False, device="meta"), r=8, alpha=16)
    rep = trainable_parameter_report(layer)
    assert rep.trainable == 8 * (4096 + 4096) == 65_536
    assert rep.total - rep.trainable == 4096 * 4096 == 16_777_216
    assert (rep.total - rep.trainable) // rep.trainable == 256  # 256x, not 250x


@pytest.mark.task("LoRALayer")
def test_lora_forward_by_hand():
    # W0 = I (2x2), A = [1, 1] (r = 1), B = [[1], [0]], alpha = 2 → scaling 2: h = x + 2·B(A x)
    base = nn.Linear(2, 2, bias=False)
    layer = LoRALayer(base, r=1, alpha=2)
    with torch.no_grad():
        base.weight.copy_(torch.eye(2))
        layer.lora_A.weight.copy_(torch.tensor([[1.0, 1.0]]))
        layer.lora_B.weight.copy_(torch.tensor([[1.0], [0.0]]))
    x = torch.tensor([[3.0, 4.0]])
    assert torch.equal(layer(x), torch.tensor([[3.0 + 2 * 7, 4.0]]))
    assert torch.equal(layer.delta_weight(), torch.tensor([[2.0, 2.0], [0.0, 0.0]]))


@pytest.mark.task("LoRALayer")
def test_zero_b_means_the_model_starts_unchanged_and_merge_is_exact():
    torch.manual_seed(0)
    layer = LoRALayer(nn.Linear(32, 16), r=4, alpha=8)
    x = torch.randn(5, 32)
    assert torch.equal(layer(x), layer.base_layer(x))  # B = 0
    nn.init.normal_(layer.lora_B.weight)
    before = layer(x)
    layer.merge()  # W0 ← W0 + (α/r)·B A
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
    with pytest.warns(UserWarning):
        layer.merge()  # a second merge changes nothing
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)


def test_nf4_is_built_from_normal_quantiles():
    # bitsandbytes' create_normal_map: 8 positive and 7 negative quantiles of N(0, 1) between p = 0.5 and
    # p = 0.9677083 (so the extreme levels are not ±inf), plus an exact 0, scaled so the extremes are ±1
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    offset = 0.9677083
    pos = normal.icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -normal.icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    levels = levels / levels.abs().max()
    torch.testing.assert_close(levels.float(), torch.tensor(NF4_CODE), rtol=0, atol=2e-7)
    assert len(set(NF4_CODE)) == 16 and 0.0 in NF4_CODE
    # denser near 0, where most weights are: the gap next to 0 is a fraction of the gap next to ±1
    assert NF4_CODE[8] - NF4_CODE[7] < 0.3 * (NF4_CODE[15] - NF4_CODE[14])


@pytest.mark.task("dequantize_tensor")
def test_dequantize_hand_packed_codes():
    """Codes 0, 15 | 7, 8 | 3 in two blocks of 4 (absmax 2 and 0.5), high nibble first, odd length padded."""
    q = NF4Weight(packed=torch.tensor([0x0F, 0x78, 0x30], dtype=torch.uint8), absmax=torch.tensor([2.0, 0.5]),
                  shape=torch.Size([5]), dtype=torch.float32, blocksize=4)
    want = [2.0 * NF4_CODE[0], 2.0 * NF4_CODE[15], 2.0 * NF4_CODE[7], 2.0 * NF4_CODE[8], 0.5 * NF4_CODE[3]]
    torch.testing.assert_close(dequantize_tensor(q), torch.tensor(want))
    assert dequantize_tensor(q, torch.bfloat16).dtype == torch.bfloat16

@pytest.mark.task("quantize_tensor", "dequantize_tensor")
def test_blockwise_quantize_by_hand():
    # one block of 64 values: absmax 2.0, each value 2·code[i % 16] is exactly representable → exact round trip
    code = torch.tensor(NF4_CODE)
    idx = torch.arange(64) % 16
    w = 2.0 * code[idx]
    q = quantize_tensor(w, blocksize=64)
    assert q.absmax.tolist() == [2.0]
    assert q.packed.numel() == 32 and q.packed[0].item() == (idx[0] << 4 | idx[1]).item()  # first in high nibble
    assert torch.equal(dequantize_tensor(q), w)
    # a value between two levels goes to the nearest one
    w2 = torch.full((64,), 0.1)
    w2[0] = 1.0  # absmax 1
    back = dequantize_tensor(quantize_tensor(w2))
    assert back[1].item() == pytest.approx(NF4_CODE[8])  # 0.1 → 0.0796 (nearest of 0.0796 and 0.1609)


@pytest.mark.task("quantize_tensor", "dequantize_tensor")
def test_double_quant_stores_absmax_in_8_bits():
    torch.manual_seed(0)
    w = torch.randn(256 * 64)
    plain, dq = quantize_tensor(w), quantize_tensor(w, double_quant=True)
    assert plain.absmax.dtype == torch.float32 and dq.absmax.dtype == torch.uint8
    assert dq.nbytes() < plain.nbytes()
    err = (dequantize_tensor(dq) - dequantize_tensor(plain)).abs().max()
    assert err < 0.02 * w.abs().max()  # absmax values carry ~8-bit relative error


def test_float_formats_ranges():
    f16, bf16, f32 = torch.finfo(torch.float16), torch.finfo(torch.bfloat16), torch.finfo(torch.float32)
    assert f16.max == 65504.0 and f16.eps == 2.0 ** -10  # 5 exponent bits, 10 mantissa bits
    assert bf16.eps == 2.0 ** -7 and bf16.max > 3.38e38  # 8 exponent bits (fp32's range), 7 mantissa bits
    assert bf16.max == pytest.approx(f32.max, rel=0.01)
    big = torch.tensor(70000.0)
    assert torch.isinf(big.half()) and torch.isfinite(big.bfloat16())  # fp16 overflows, bf16 does not
    assert torch.tensor(1.0 + 2.0 ** -9).bfloat16().item() == 1.0  # but bf16 rounds away small differences


def test_autocast_runs_matmuls_in_bf16_and_keeps_fp32_weights():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x)
        s = nn.functional.cross_entropy(y, torch.zeros(4, dtype=torch.long))  # a loss: on the fp32 list
    assert y.dtype == torch.bfloat16 and lin.weight.dtype == torch.float32 and s.dtype == torch.float32
    torch.testing.assert_close(y.float(), lin(x), rtol=2e-2, atol=2e-2)
