"""QLoRA: Linear4bit computes x·dequant(W)ᵀ + b through nf4_matmul, stores ≤ 0.29× (≤ 0.26× double-quantized)
the bf16 bytes, prepare_qlora_model swaps modules, LoRA trains over it (the input gradient flows through the 4-bit
layers), generation on a quantized model runs nf4_matmul in every decode step, merge_and_unload dequantizes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import intro2llm.ops.nf4 as ops
from intro2llm.model import CausalLM, ModelConfig
from intro2llm.model.lora import LoRALayer, get_lora_model, lora_layers, merge_and_unload
from intro2llm.model.qlora import Linear4bit, prepare_qlora_model, quantized_weight_report

TINY = dict(vocab_size=61, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return CausalLM(ModelConfig(**TINY)).eval()


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_linear4bit_is_the_dequantized_linear(double_quant, compute_dtype):
    torch.manual_seed(0)
    lin = nn.Linear(96, 40)
    q = Linear4bit.from_linear(lin, compute_dtype=compute_dtype, double_quant=double_quant)
    assert (q.out_features, q.in_features) == (40, 96) and not any(p.requires_grad for p in q.parameters())
    w = ops.nf4_dequantize(q.nf4_weight(), torch.float32)
    assert w.shape == (40, 96) and 0 < (w - lin.weight).abs().max() < 0.2 * lin.weight.abs().max()
    x = torch.randn(3, 5, 96)
    y = q(x)
    assert y.dtype == compute_dtype and y.shape == (3, 5, 40)
    expect = x.to(compute_dtype).float() @ w.T + lin.bias
    tol = 1e-5 if compute_dtype == torch.float32 else 3e-2
    torch.testing.assert_close(y.float(), expect, rtol=tol, atol=tol)
    torch.testing.assert_close(q.to_linear()(x.to(compute_dtype)).float(), y.float(), rtol=tol, atol=tol)


def test_stored_size_targets():
    lin = nn.Linear(4096, 1024, bias=False)
    bf16 = 2 * lin.weight.numel()
    plain = Linear4bit.from_linear(lin, double_quant=False).weight_nbytes() / bf16
    dq = Linear4bit.from_linear(lin, double_quant=True).weight_nbytes() / bf16
    assert plain == pytest.approx((0.5 + 4 / 64) / 2)  # codes + fp32 absmax per 64: 0.28125
    assert plain <= 0.29 and dq <= 0.26 and dq < plain


def test_bad_inputs():
    with pytest.raises(TypeError, match="floating point"):
        Linear4bit(torch.ones(4, 64, dtype=torch.int32))
    with pytest.raises(ValueError, match="2-D"):
        Linear4bit(torch.ones(64))
    with pytest.raises(ValueError, match="compute_dtype"):
        Linear4bit(torch.ones(4, 64), compute_dtype=torch.float16)
    with pytest.raises(ValueError, match="before adding LoRA"):
        prepare_qlora_model(get_lora_model(tiny_model()))


def test_prepare_qlora_model_swaps_linears_and_keeps_the_head():
    model = tiny_model()
    ids = torch.randint(0, TINY["vocab_size"], (2, 10))
    with torch.no_grad():
        ref = model(ids).logits
    prepare_qlora_model(model)
    kinds = {n: type(m) for n, m in model.named_modules() if isinstance(m, nn.Linear | Linear4bit)}
    assert kinds.pop("lm_head") is nn.Linear and set(kinds.values()) == {Linear4bit}
    assert len(kinds) == 7 * TINY["num_hidden_layers"]
    assert not any(p.requires_grad for p in model.parameters())
    rep = quantized_weight_report(model)
    assert rep["layers"] == len(kinds) and rep["ratio"] <= 0.26
    with torch.no_grad():
        got = model(ids).logits
    err = (got - ref).abs().max() / ref.abs().max()
    assert 0 < err < 0.2  # 4-bit weights: close, not equal


def test_qlora_trains_adapters_through_4bit_layers():
    model = get_lora_model(prepare_qlora_model(tiny_model()), r=4, alpha=8)
    assert all(isinstance(layer.base_layer, Linear4bit) for layer in lora_layers(model).values())
    for layer in lora_layers(model).values():
        nn.init.normal_(layer.lora_B.weight, std=0.02)
    ids = torch.randint(0, TINY["vocab_size"], (2, 10))
    model.train()
    model(ids, labels=ids).loss.backward()
    # layer 0's adapter gradient passes back through every later 4-bit layer: nf4_matmul's input gradient
    first = model.layers[0].self_attn.q_proj
    assert first.lora_A.weight.grad is not None and first.lora_A.weight.grad.abs().sum() > 0
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    with pytest.raises(TypeError, match="merge_and_unload"):
        first.merge()


def test_generation_on_a_quantized_model_uses_nf4_matmul_each_step(monkeypatch):
    model = get_lora_model(prepare_qlora_model(tiny_model()), r=4, alpha=8)
    for layer in lora_layers(model).values():
        nn.init.normal_(layer.lora_B.weight, std=0.05)
    ids = torch.randint(0, TINY["vocab_size"], (2, 6))
    slow = model.generate(ids, max_new_tokens=5, use_cache=False)
    calls = []
    real = ops.nf4_matmul

    def counting(x, w, bias=None, **kw):
        calls.append(x.shape[-2] if x.dim() > 1 else 1)
        return real(x, w, bias, **kw)

    monkeypatch.setattr(ops, "nf4_matmul", counting)
    fast = model.generate(ids, max_new_tokens=5)
    assert torch.equal(fast, slow)  # the cached path falls back to the modules and matches the uncached loop
    per_pass = 7 * TINY["num_hidden_layers"]
    assert len(calls) == 5 * per_pass  # prefill + 4 decode steps, every quantized projection each time
    assert calls[per_pass:] == [1] * (4 * per_pass)  # decode steps: one token per row


def test_merge_and_unload_dequantizes_into_plain_linears():
    model = get_lora_model(prepare_qlora_model(tiny_model()), r=4, alpha=8)
    for layer in lora_layers(model).values():
        nn.init.normal_(layer.lora_B.weight, std=0.05)
    ids = torch.randint(0, TINY["vocab_size"], (2, 10))
    with torch.no_grad():
        ref = model(ids).logits
        merge_and_unload(model)
        got = model(ids).logits
    assert not any(isinstance(m, LoRALayer | Linear4bit) for m in model.modules())
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------- checkpointing
@pytest.mark.parametrize("kind", ["full", "lora", "qlora"])
@pytest.mark.parametrize("masks", ["none", "padding", "segments"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(kind, masks):
    model = tiny_model()
    if kind == "qlora":
        prepare_qlora_model(model)
    if kind != "full":
        get_lora_model(model, r=4, alpha=8)
        for layer in lora_layers(model).values():
            nn.init.normal_(layer.lora_B.weight, std=0.05)
    model.train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, TINY["vocab_size"], (2, 12), generator=g)
    kw = {}
    if masks == "padding":
        kw["attention_mask"] = torch.tensor([[0] * 3 + [1] * 9, [1] * 12])
    elif masks == "segments":
        kw["segment_ids"] = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])
    block_calls = []
    for block in model.layers:
        block.register_forward_pre_hook(lambda *_: block_calls.append(1))  # recomputation may stop early
    n_saved: list[int] = []  # elements of the tensors the forward keeps for the backward

    def pack(t):
        n_saved.append(t.numel())
        return t

    saved = {}
    result = {}
    for ckpt in (False, True):
        model.set_gradient_checkpointing(ckpt)
        model.zero_grad(set_to_none=True)
        block_calls.clear()
        n_saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(ids, labels=ids, return_logits=False, **kw).loss
        saved[ckpt] = sum(n_saved)
        loss.backward()
        result[ckpt] = (loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        # checkpointed: each block runs again in the backward (the recomputation)
        assert len(block_calls) == TINY["num_hidden_layers"] * (2 if ckpt else 1)
    assert saved[True] < 0.5 * saved[False]  # what the forward keeps for the backward
    assert torch.equal(result[True][0], result[False][0])
    assert result[True][1].keys() == result[False][1].keys() and result[True][1]
    for name, grad in result[True][1].items():
        torch.testing.assert_close(grad, result[False][1][name], rtol=1e-6, atol=1e-7, msg=name)
    with torch.no_grad():  # no autograd: nothing to checkpoint, generation runs as before
        model.eval()
        out = model.generate(ids[:, :4], max_new_tokens=3)
    model.set_gradient_checkpointing(False)
    assert torch.equal(out, model.generate(ids[:, :4], max_new_tokens=3))
