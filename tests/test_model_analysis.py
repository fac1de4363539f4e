"""ModelConfig validation, presets, and the analysis arithmetic against the real model (numel, FlopCounterMode)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from intro2llm import ops
from intro2llm.configs import get_config, list_configs
from intro2llm.model import CausalLM, ModelConfig, StaticKVCache
from intro2llm.model.analysis import count_parameters, estimate_flops, estimate_memory


def cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
                num_key_value_heads=2, max_position_embeddings=128)
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("kw, match", [
    (dict(hidden_size=50), r"hidden_size \(50\).*num_attention_heads \(6\)"),
    (dict(num_key_value_heads=4), r"num_attention_heads \(6\).*num_key_value_heads \(4\)"),
    (dict(ffn_type="moe"), "ffn_type"),
    (dict(head_dim=7, hidden_size=48), "even head_dim"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "rope_scaling type"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "low_freq_factor"),
    (dict(eos_token_id=97), "eos_token_id=97"),
    (dict(num_hidden_layers=0), "num_hidden_layers"),
    (dict(dropout=1.0), "dropout"),
])
def test_config_validation_names_the_numbers(kw, match):
    with pytest.raises(ValueError, match=match):
        cfg(**kw)


def test_config_round_trip_and_unknown_fields():
    c = cfg(rope_scaling={"rope_type": "linear", "factor": 2.0}, tie_word_embeddings=True)
    assert ModelConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="hiden_size"):
        ModelConfig.from_dict({"hiden_size": 3})
    assert c.head_dim == 8 and c.num_kv_groups == 3


def test_presets():
    assert {"tiny", "small", "llama3_8b", "qwen2_0_5b"} <= set(list_configs())
    tiny = count_parameters(get_config("tiny"))["total"]
    assert 9e6 <= tiny <= 11e6
    # published sizes: Llama-3-8B 8.03B, Qwen2-0.5B 0.494B, Llama-2-7B 6.74B
    assert count_parameters(get_config("llama3_8b"))["total"] == pytest.approx(8.03e9, rel=0.005)
    assert count_parameters(get_config("qwen2_0_5b"))["total"] == pytest.approx(0.494e9, rel=0.005)
    assert count_parameters(get_config("llama2_7b"))["total"] == pytest.approx(6.74e9, rel=0.005)
    assert get_config("tiny", vocab_size=300).vocab_size == 300
    with pytest.raises(ValueError, match="available: .*tiny"):
        get_config("huge")


@pytest.mark.parametrize("kw", [
    {},
    dict(tie_word_embeddings=True),
    dict(attention_bias=True, attention_output_bias=True, mlp_bias=True),
    dict(use_rms_norm=False, use_rope=False, ffn_type="gelu"),
    dict(ffn_type="geglu", head_dim=16),
    dict(ffn_type="relu", mlp_bias=True, attention_bias=True),
])
def test_count_parameters_equals_model(kw):
    c = cfg(**kw)
    model = CausalLM(c)
    counts = count_parameters(c)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["embedding"] == model.embed_tokens.weight.numel()
    assert counts["attention"] == sum(p.numel() for n, p in model.named_parameters() if ".self_attn." in n)
    assert counts["ffn"] == sum(p.numel() for n, p in model.named_parameters() if ".mlp." in n)


@pytest.mark.parametrize("kw", [{}, dict(ffn_type="relu", num_key_value_heads=6)])
def test_estimate_flops_matches_flop_counter(kw):
    c = cfg(**kw)
    model = CausalLM(c).eval()
    T = 64
    ids = torch.randint(0, c.vocab_size, (1, T))
    with ops.use_backend("reference"), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(ids)  # the reference attention is plain matmuls, which FlopCounterMode counts
    measured = counter.get_total_flops()
    est = estimate_flops(c, T)["forward_per_sequence"]
    assert est == pytest.approx(measured, rel=0.05)
    assert estimate_flops(c, T)["training_per_token"] == pytest.approx(3 * est / T)


def test_estimate_memory_kv_cache_is_exact():
    c = cfg()
    mem = estimate_memory(c, batch=3, seq_len=40, dtype="float32", optimizer="adamw")
    cache = StaticKVCache.from_config(c, 3, 40, dtype=torch.float32)
    assert mem["kv_cache"] == cache.memory_bytes()
    P = count_parameters(c)["total"]
    assert mem["weights"] == 4 * P and mem["optimizer"] == 8 * P
    bf16 = estimate_memory(c, 1, 16, "bfloat16")
    assert bf16["weights"] == 2 * P and bf16["optimizer"] == 12 * P  # 2 fp32 moments + fp32 master weights
    with pytest.raises(ValueError, match="optimizer"):
        estimate_memory(c, 1, 16, optimizer="rmsprop")


def test_model_info_cli(capsys):
    from intro2llm.cli import main

    assert main(["model-info", "--config", "tiny"]) == 0
    out = capsys.readouterr().out
    assert f"{count_parameters(get_config('tiny'))['total']:,}" in out and "kv_cache" in out
    assert main(["model-info", "--config", "nope"]) == 2
