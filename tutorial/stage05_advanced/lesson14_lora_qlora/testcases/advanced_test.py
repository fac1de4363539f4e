"""Lesson 14 advanced tests: LoRA and QLoRA on a whole model — only adapters train and the loss falls, the base
never moves, 4-bit storage targets, adapters saved in PEFT's layout and loaded back, merging for inference, and
generation on a quantized model."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from intro2llm.model import CausalLM, ModelConfig
from intro2llm.model.lora import (
    get_lora_model,
    load_lora_adapters,
    lora_layers,
    merge_and_unload,
    save_lora_adapters,
    trainable_parameter_report,
)
from intro2llm.model.qlora import Linear4bit, prepare_qlora_model, quantized_weight_report

CFG = dict(vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=64)


def model(seed=0):
    torch.manual_seed(seed)
    return CausalLM(ModelConfig(**CFG))


def train(m, steps=25, lr=1e-2):
    """A few AdamW steps over the trainable parameters on one fixed batch (a sequence to memorise)."""
    ids = torch.arange(24).remainder(CFG["vocab_size"]).repeat(4, 1)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr)
    losses = []
    m.train()
    for _ in range(steps):
        loss = m(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.task("get_lora_model", "LoRALayer")
def test_lora_trains_only_adapters_and_lowers_the_loss():
    m = get_lora_model(model(), r=4, alpha=8)
    base = {k: v.clone() for k, v in m.state_dict().items() if ".lora_" not in k}
    rep = trainable_parameter_report(m)
    assert rep.fraction < 0.15
    losses = train(m)
    assert losses[-1] < 0.7 * losses[0]
    assert all(torch.equal(v, base[k]) for k, v in m.state_dict().items() if ".lora_" not in k)


@pytest.mark.task("quantize_tensor", "get_lora_model", "LoRALayer")
def test_qlora_trains_over_4bit_weights_within_storage_targets():
    m = prepare_qlora_model(model(), double_quant=True)
    assert quantized_weight_report(m)["ratio"] <= 0.26
    assert quantized_weight_report(prepare_qlora_model(model(), double_quant=False))["ratio"] <= 0.29
    get_lora_model(m, r=4, alpha=8)
    assert all(isinstance(layer.base_layer, Linear4bit) for layer in lora_layers(m).values())
    codes = m.layers[0].mlp.up_proj.base_layer.nf4_packed.clone()
    losses = train(m)
    assert losses[-1] < 0.7 * losses[0]
    assert torch.equal(m.layers[0].mlp.up_proj.base_layer.nf4_packed, codes)


@pytest.mark.task("get_lora_model", "LoRALayer")
def test_adapters_saved_in_peft_layout_load_back(tmp_path):
    m = get_lora_model(model(), r=4, alpha=8, target_modules=("q_proj", "v_proj"))
    train(m, steps=5)
    save_lora_adapters(m, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["target_modules"] == ["q_proj", "v_proj"]
    fresh = load_lora_adapters(model(), tmp_path)  # the same base + the saved adapters
    ids = torch.randint(0, CFG["vocab_size"], (2, 10))
    m.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, m(ids).logits)


@pytest.mark.task("get_lora_model", "LoRALayer")
def test_merge_for_inference_and_generate_on_a_quantized_model():
    m = get_lora_model(model(), r=4, alpha=8)
    train(m, steps=5)
    m.eval()
    ids = torch.randint(0, CFG["vocab_size"], (2, 6))
    with torch.no_grad():
        ref = m(ids).logits
        merge_and_unload(m)
        assert not lora_layers(m) and type(m.layers[0].self_attn.q_proj) is nn.Linear
        torch.testing.assert_close(m(ids).logits, ref, rtol=1e-4, atol=1e-4)
    q = get_lora_model(prepare_qlora_model(model()), r=4, alpha=8).eval()
    out = q.generate(ids, max_new_tokens=4)
    assert out.shape == (2, 10) and torch.equal(out, q.generate(ids, max_new_tokens=4, use_cache=False))


# ---- course mode, --include-kernels: the Triton forward kernel (on CPU it runs in Triton's interpreter), fp32
@pytest.mark.skipif("triton" not in __import__("intro2llm.ops", fromlist=["x"]).available_backends(),
                    reason="triton: not installed (pip install triton)")
@pytest.mark.task("_nf4_matmul_fwd_kernel")
def test_triton_nf4_matmul_kernel_matches_reference():
    import intro2llm.ops as ops

    torch.manual_seed(0)
    w = ops.nf4_quantize(torch.randn(32, 64))
    x = torch.randn(4, 64)
    torch.testing.assert_close(ops.nf4_matmul(x, w, backend="triton"), ops.nf4_matmul_reference(x, w), atol=1e-4,
                               rtol=1e-4)
