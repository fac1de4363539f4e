"""LoRA: the layer's math, init and merge; get_lora_model's freezing and report; PEFT-format adapters that ``peft``
loads onto ``transformers``' Llama with the same logits, adapters ``peft`` saved loading into ours, and loading
errors that name the rank, the modules or the shapes that do not match."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from intro2llm.model import CausalLM, ModelConfig
from intro2llm.model import lora as lora_module
from intro2llm.model.lora import (
    DEFAULT_TARGETS,
    LoRALayer,
    get_lora_model,
    load_lora_adapters,
    lora_layers,
    merge_and_unload,
    save_lora_adapters,
    set_lora_merged,
    trainable_parameter_report,
)

TINY = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)


def tiny_model(seed: int = 0, **kw) -> CausalLM:
    torch.manual_seed(seed)
    return CausalLM(ModelConfig(**{**TINY, **kw})).eval()


def randomize_lora(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_A.weight.copy_(torch.randn(layer.lora_A.weight.shape, generator=g) * 0.3)
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.3)


# ---------------------------------------------------------------------------------------------------- the layer
def test_fresh_layer_is_the_base_and_a_is_kaiming():
    torch.manual_seed(0)
    base = nn.Linear(40, 24)
    w0 = base.weight.detach().clone()
    layer = LoRALayer(base, r=4, alpha=8)
    assert layer.base_layer is base and not base.weight.requires_grad and not base.bias.requires_grad
    assert layer.lora_A.weight.shape == (4, 40) and layer.lora_B.weight.shape == (24, 4)
    assert layer.scaling == 2.0
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    bound = 1 / math.sqrt(40)  # kaiming_uniform with a=√5: U(-1/√fan_in, 1/√fan_in)
    a = layer.lora_A.weight
    assert a.abs().max() <= bound and a.abs().max() > 0.8 * bound and a.std() > 0.4 * bound
    x = torch.randn(3, 5, 40)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)
    assert torch.equal(base.weight, w0)


def test_forward_is_the_formula_and_only_adapters_get_gradients():
    torch.manual_seed(0)
    layer = LoRALayer(nn.Linear(16, 12), r=3, alpha=6)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(2, 7, 16, dtype=torch.float64).float()
    A, B, W, b = layer.lora_A.weight, layer.lora_B.weight, layer.base_layer.weight, layer.base_layer.bias
    expect = x @ W.T + b + 2.0 * (x @ A.T) @ B.T
    y = layer(x)
    torch.testing.assert_close(y, expect, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    assert W.grad is None and b.grad is None
    assert A.grad is not None and B.grad is not None and A.grad.abs().sum() > 0


def test_dropout_applies_to_the_adapter_input_only():
    torch.manual_seed(0)
    layer = LoRALayer(nn.Linear(16, 8), r=2, alpha=2, dropout=0.5).train()
    nn.init.zeros_(layer.lora_A.weight)  # adapter contributes 0 whatever the mask: the base must be untouched
    x = torch.randn(4, 16)
    torch.testing.assert_close(layer(x), layer.base_layer(x))
    nn.init.normal_(layer.lora_A.weight)
    nn.init.normal_(layer.lora_B.weight)
    assert not torch.equal(layer(x), layer(x))  # two dropout masks
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))


def test_merge_equals_unmerged_and_merging_twice_is_a_noop():
    torch.manual_seed(0)
    layer = LoRALayer(nn.Linear(64, 48), r=8, alpha=16)
    nn.init.normal_(layer.lora_B.weight, std=0.1)
    x = torch.randn(5, 64)
    w0 = layer.base_layer.weight.detach().clone()
    unmerged = layer(x)
    layer.merge()
    assert layer.merged
    merged = layer(x)
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)  # fp32 rounding only
    torch.testing.assert_close(layer.base_layer.weight, w0 + layer.delta_weight())
    w_merged = layer.base_layer.weight.detach().clone()
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    assert torch.equal(layer.base_layer.weight, w_merged)  # not added twice
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=0, atol=1e-6)
    with pytest.warns(UserWarning, match="not merged"):
        layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=0, atol=1e-6)


def _fast_path_taken(y: torch.Tensor) -> bool:
    node, seen = y.grad_fn, 0
    while node is not None and seen < 3:  # ViewBackward0 -> _LoRALinearFunctionBackward
        if "_LoRALinearFunction" in type(node).__name__:
            return True
        node, seen = (node.next_functions[0][0] if node.next_functions else None), seen + 1
    return False


def _forward_and_grads(layer: LoRALayer, x: torch.Tensor, fast: bool, monkeypatch) -> list[torch.Tensor | None]:
    monkeypatch.setattr(lora_module, "FAST_PATH", fast)
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(x.requires_grad)
    y = layer(x)
    assert _fast_path_taken(y) == fast
    g = torch.linspace(-1, 1, y.numel()).view(y.shape)
    y.backward(g)
    return [y.detach(), x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("x_grad", [True, False])
def test_fast_path_equals_the_plain_forward_and_gradients(bias, x_grad, monkeypatch):
    torch.manual_seed(0)
    layer = LoRALayer(nn.Linear(24, 20, bias=bias), r=4, alpha=6)  # scaling 1.5: not a power of two
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 7, 24).requires_grad_(x_grad)
    fast = _forward_and_grads(layer, x, True, monkeypatch)
    plain = _forward_and_grads(layer, x, False, monkeypatch)
    assert (fast[1] is None) == (plain[1] is None) == (not x_grad)
    for f, p in zip(fast, plain):
        if p is not None:
            torch.testing.assert_close(f, p)  # fp32 rounding of the reordered scaling only
    assert fast[2].abs().sum() > 0 and fast[3].abs().sum() > 0
    assert layer.base_layer.weight.grad is None and (not bias or layer.base_layer.bias.grad is None)
    with torch.no_grad():  # inference (generation) takes it too, without saving anything for a backward
        torch.testing.assert_close(layer(x), plain[0])


def test_fast_path_is_skipped_where_it_would_change_the_result():
    torch.manual_seed(0)
    x = torch.randn(5, 16)
    with_dropout = LoRALayer(nn.Linear(16, 8), r=2, dropout=0.1)
    assert not _fast_path_taken(with_dropout(x))
    trainable_base = LoRALayer(nn.Linear(16, 8), r=2)
    trainable_base.base_layer.weight.requires_grad_(True)  # unfrozen by hand: its gradient must still come
    y = trainable_base(x)
    assert not _fast_path_taken(y)
    y.sum().backward()
    assert trainable_base.base_layer.weight.grad is not None
    layer = LoRALayer(nn.Linear(16, 8), r=2)
    assert _fast_path_taken(layer(x))
    bf16_base = LoRALayer(nn.Linear(16, 8).to(torch.bfloat16), r=2)  # fp32 adapters over bf16: the plain casts
    assert not _fast_path_taken(bf16_base(x.to(torch.bfloat16).requires_grad_()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert not _fast_path_taken(y) and y.dtype == torch.bfloat16  # autocast ran the plain forward
    with pytest.raises(ValueError, match="must be frozen"):
        lora_module.lora_linear(x, trainable_base.base_layer.weight, None, layer.lora_A.weight,
                                layer.lora_B.weight, 1.0)


def test_fast_path_model_loss_and_adapter_gradients_equal_the_plain_ones(monkeypatch):
    model = get_lora_model(tiny_model(), r=4, alpha=6).train()
    randomize_lora(model)
    ids = torch.randint(0, TINY["vocab_size"], (2, 9))
    result = {}
    for fast in (True, False):
        monkeypatch.setattr(lora_module, "FAST_PATH", fast)
        model.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids).loss
        loss.backward()
        result[fast] = (loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    torch.testing.assert_close(result[True][0], result[False][0], rtol=1e-6, atol=1e-6)
    assert result[True][1].keys() == result[False][1].keys()
    for name, g in result[True][1].items():
        torch.testing.assert_close(g, result[False][1][name], rtol=1e-5, atol=1e-6, msg=name)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_bad_arguments():
    with pytest.raises(ValueError, match="r must be"):
        LoRALayer(nn.Linear(4, 4), r=0)
    with pytest.raises(ValueError, match="dropout"):
        LoRALayer(nn.Linear(4, 4), dropout=1.0)
    with pytest.raises(TypeError, match="nn.Linear"):
        LoRALayer(nn.Conv1d(4, 4, 1))


# ---------------------------------------------------------------------------------------------------- whole model
def test_get_lora_model_freezes_all_but_adapters_and_reports_the_count():
    model = get_lora_model(tiny_model(), r=4, alpha=8)
    c = model.config
    per_layer = 4 * ((c.hidden_size + c.q_size) * 2 + (c.hidden_size + c.kv_size) * 2
                     + 3 * (c.hidden_size + c.intermediate_size))
    rep = trainable_parameter_report(model)
    assert rep.trainable == per_layer * c.num_hidden_layers
    assert rep.total == tiny_model().num_parameters() + rep.trainable
    assert "trainable params" in str(rep) and 0 < rep.fraction < 1
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert len(lora_layers(model)) == 7 * c.num_hidden_layers
    assert model.lora_config.target_modules == DEFAULT_TARGETS
    assert not isinstance(model.lm_head, LoRALayer)
    with pytest.raises(ValueError, match="already has LoRA"):
        get_lora_model(model)
    with pytest.raises(ValueError, match="no linear layer matches.*q_proj"):
        get_lora_model(tiny_model(), target_modules=("qproj",))


def test_model_merge_keeps_logits_and_merge_and_unload_gives_a_plain_model():
    model = get_lora_model(tiny_model(), r=4, alpha=8)
    randomize_lora(model)
    ids = torch.randint(0, TINY["vocab_size"], (2, 9))
    with torch.no_grad():
        ref = model(ids).logits
        set_lora_merged(model, True)
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)
        set_lora_merged(model, False)
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)
        merge_and_unload(model)
        assert not lora_layers(model) and type(model.layers[0].self_attn.q_proj) is nn.Linear
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)


def test_generation_with_adapters_matches_uncached_loop():
    model = get_lora_model(tiny_model(), r=4, alpha=8)
    randomize_lora(model)
    ids = torch.randint(0, TINY["vocab_size"], (2, 5))
    fast = model.generate(ids, max_new_tokens=6)
    slow = model.generate(ids, max_new_tokens=6, use_cache=False)
    assert torch.equal(fast, slow)


# ---------------------------------------------------------------------------------------------------- PEFT interop
transformers = pytest.importorskip("transformers", reason="transformers is in the test extras")
peft = pytest.importorskip("peft", reason="peft is in the test extras")


def hf_pair(tmp_path, seed=0):
    """Our tiny model and transformers' LlamaForCausalLM with the same weights."""
    ours = tiny_model(seed)
    ours.save_pretrained(tmp_path / "base")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()
    return ours, hf


def test_peft_loads_our_adapters_with_the_same_logits(tmp_path):
    ours, hf = hf_pair(tmp_path)
    get_lora_model(ours, r=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"))
    randomize_lora(ours)
    save_lora_adapters(ours, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["base_model_name_or_path"] == str(tmp_path / "base")
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    ids = torch.randint(0, TINY["vocab_size"], (2, 11))
    with torch.no_grad():
        ref = pm(ids).logits
        got = ours(ids).logits
    assert (got - ref).abs().max().item() <= 1e-4
    with torch.no_grad(), pm.disable_adapter():
        base_only = pm(ids).logits
    assert (got - base_only).abs().max().item() > 1e-2  # the adapters matter


def test_we_load_adapters_peft_saved_with_the_same_logits(tmp_path):
    ours, hf = hf_pair(tmp_path)
    lcfg = peft.LoraConfig(r=6, lora_alpha=12, target_modules=["k_proj", "o_proj", "gate_proj", "up_proj"],
                           task_type="CAUSAL_LM")
    pm = peft.get_peft_model(hf, lcfg)
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    pm.save_pretrained(tmp_path / "peft")
    load_lora_adapters(ours, tmp_path / "peft")
    assert {n.rsplit(".", 1)[-1] for n in lora_layers(ours)} == {"k_proj", "o_proj", "gate_proj", "up_proj"}
    assert ours.lora_config.r == 6 and next(iter(lora_layers(ours).values())).scaling == 2.0
    ids = torch.randint(0, TINY["vocab_size"], (2, 11))
    with torch.no_grad():
        ref = pm.eval()(ids).logits
        got = ours(ids).logits
    assert (got - ref).abs().max().item() <= 1e-4
    # round trip through our writer gives the same tensors back
    save_lora_adapters(ours, tmp_path / "again")
    again = load_lora_adapters(tiny_model(), tmp_path / "again")
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, got)


def test_loading_mismatched_adapters_names_the_problem(tmp_path):
    model = get_lora_model(tiny_model(), r=4, alpha=8, target_modules=("q_proj", "v_proj"))
    save_lora_adapters(model, tmp_path / "qv")
    with pytest.raises(ValueError, match=r"rank mismatch.*r=4.*r=\[2\]"):
        load_lora_adapters(get_lora_model(tiny_model(), r=2, target_modules=("q_proj", "v_proj")), tmp_path / "qv")
    with pytest.raises(ValueError, match=r"target modules do not match.*model.layers.0.self_attn.v_proj"):
        load_lora_adapters(get_lora_model(tiny_model(), r=4, target_modules=("q_proj",)), tmp_path / "qv")
    with pytest.raises(ValueError, match=r"shape mismatch.*q_proj: adapter base \(out, in\) = \(32, 32\) vs model "
                                         r"\(64, 64\)"):
        load_lora_adapters(tiny_model(hidden_size=64), tmp_path / "qv")
    with pytest.raises(ValueError, match=r"target modules do not match.*layers.1"):
        load_lora_adapters(tiny_model(num_hidden_layers=1), tmp_path / "qv")
    cfg = json.loads((tmp_path / "qv" / "adapter_config.json").read_text())
    (tmp_path / "qv" / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(ValueError, match="unsupported LoRA features.*use_dora"):
        load_lora_adapters(tiny_model(), tmp_path / "qv")
    with pytest.raises(ValueError, match="no adapter_config.json"):
        load_lora_adapters(tiny_model(), tmp_path / "nowhere")


def test_fused_cross_entropy_with_a_frozen_head_skips_its_gradient():
    # LoRA freezes lm_head: the fused loss must still give dL/dh and must not compute (or return) dL/dW
    from intro2llm import ops

    torch.manual_seed(0)
    h = torch.randn(12, 16, requires_grad=True)
    w = torch.randn(40, 16)
    t = torch.randint(0, 40, (12,))
    ops.fused_linear_cross_entropy(h, w, t, chunk_size=5).backward()
    h2 = h.detach().clone().requires_grad_()
    nn.functional.cross_entropy(h2 @ w.T, t).backward()
    torch.testing.assert_close(h.grad, h2.grad)
    assert w.grad is None
    if "cpp" not in ops.available_backends():
        pytest.skip("the C++ extension is not built: the fused op's registered kernel cannot be checked")
    fwd = torch.ops.intro2llm.fused_linear_cross_entropy_fwd.default
    out = fwd(h.detach(), w, t, None, -100, 0.0, "mean", 5, "cpp", False)
    assert out[2].numel() == 0 and out[1].shape == h.shape
    torch.library.opcheck(fwd, (h.detach().requires_grad_(), w, t, None, -100, 0.0, "mean", 5, "cpp", False))
