"""Lesson 05 basic tests: ModelConfig's checks, the parameter count by component (by hand, against the model and
the tiny preset), FLOPs per token by hand, the KV cache and training memory arithmetic."""

from __future__ import annotations

import pytest
import torch

from intro2llm.configs import get_config
from intro2llm.model import CausalLM, ModelConfig, StaticKVCache
from intro2llm.model.analysis import count_parameters, estimate_flops, estimate_memory, kv_cache_bytes
from intro2llm.testing import tiny_config


def hand_config(**kw) -> ModelConfig:
    # V = 10, C = 8, F = 12, L = 2, H = 2 heads of d = 4, one kv head (GQA): small enough to count by hand
    base = dict(vocab_size=10, hidden_size=8, intermediate_size=12, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=32)
    return ModelConfig(**{**base, **kw})


def test_config_rejects_heads_not_divisible_by_kv_heads():
    with pytest.raises(ValueError, match="num_key_value_heads"):
        tiny_config(num_key_value_heads=3)


@pytest.mark.task("count_parameters")
def test_count_parameters_by_hand():
    counts = count_parameters(hand_config())
    attention = 8 * 8 + 2 * 8 * 4 + 8 * 8  # W_Q (C x H·d), W_K and W_V (C x Hkv·d), W_O (H·d x C)
    ffn = 3 * 8 * 12  # SwiGLU: gate, up, down
    assert counts == {
        "embedding": 10 * 8,
        "attention": 2 * attention,
        "ffn": 2 * ffn,
        "norms": (2 * 2 + 1) * 8,  # two RMSNorms per layer + the final one, C weights each
        "lm_head": 10 * 8,
        "total": 10 * 8 + 2 * attention + 2 * ffn + 5 * 8 + 10 * 8,
    }
    tied = count_parameters(hand_config(tie_word_embeddings=True))
    assert tied["lm_head"] == 0 and tied["total"] == counts["total"] - 10 * 8
    ln = count_parameters(hand_config(use_rms_norm=False, ffn_type="relu"))
    assert ln["norms"] == 5 * 2 * 8 and ln["ffn"] == 2 * (2 * 8 * 12)  # LayerNorm has a bias; a 2-matrix MLP


@pytest.mark.task("count_parameters")
def test_tiny_preset_is_about_ten_million_parameters_and_follows_the_formula():
    c = get_config("tiny")
    V, C, L, F_, Hd, Hkvd = c.vocab_size, c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.q_size, c.kv_size
    block = 2 * C * Hd + 2 * C * Hkvd + 3 * C * F_ + 2 * C
    formula = V * C + L * block + C + (0 if c.tie_word_embeddings else V * C)
    assert count_parameters(c)["total"] == formula
    assert 9e6 < formula < 11e6


@pytest.mark.task("count_parameters")
def test_model_parameter_count_equals_analysis():
    for c in (tiny_config(), tiny_config(tie_word_embeddings=True)):
        assert sum(p.numel() for p in CausalLM(c).parameters()) == count_parameters(c)["total"]


@pytest.mark.task("estimate_flops")
def test_estimate_flops_by_hand():
    T = 4
    flops = estimate_flops(hand_config(), T)
    proj = 2 * (8 * 8 + 2 * 8 * 4 + 8 * 8)  # 2 FLOPs per multiply-add of each projection, per token and layer
    ffn = 2 * 3 * 8 * 12
    attn = 4 * T * 8  # Q Kᵀ and P V: 2·T·(H·d) each, per token and layer
    head = 2 * 8 * 10
    forward = 2 * (proj + ffn + attn) + head
    assert flops["forward_per_token"] == forward
    assert flops["forward_per_sequence"] == T * forward
    assert flops["attention_per_token"] == 2 * attn
    assert flops["training_per_token"] == 3 * forward  # backward ≈ 2 × forward
    assert flops["training_per_sequence"] == 3 * T * forward
    causal = estimate_flops(hand_config(), T, causal=True)  # a kernel that skips masked tiles does half the scores
    assert causal["forward_per_token"] == forward - attn
    with pytest.raises(ValueError, match="seq_len"):
        estimate_flops(hand_config(), 0)


@pytest.mark.task("estimate_memory")
def test_kv_cache_bytes_is_exact():
    c = tiny_config()
    for dtype, torch_dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        cache = StaticKVCache.from_config(c, 3, 40, dtype=torch_dtype)
        assert kv_cache_bytes(c, 3, 40, dtype) == cache.memory_bytes()
        assert estimate_memory(c, 3, 40, dtype)["kv_cache"] == cache.memory_bytes()
    # Llama-3-8B, 8192 tokens, bf16: 2 (k, v) · 32 layers · 8192 · 8 kv heads · 128 · 2 bytes = 1 GiB
    assert kv_cache_bytes(get_config("llama3_8b"), 1, 8192, "bfloat16") == 2 * 32 * 8192 * 8 * 128 * 2 == 2 ** 30


@pytest.mark.task("estimate_memory")
def test_estimate_memory_training_state():
    c = tiny_config()
    P = count_parameters(c)["total"]
    fp32 = estimate_memory(c, 2, 16, "float32", "adamw")
    assert fp32["weights"] == 4 * P and fp32["gradients"] == 4 * P
    assert fp32["optimizer"] == 8 * P  # AdamW: two fp32 moments
    bf16 = estimate_memory(c, 2, 16, "bfloat16", "adamw")
    assert bf16["weights"] == 2 * P and bf16["optimizer"] == 12 * P  # + an fp32 master copy of the weights
    assert estimate_memory(c, 2, 16, "float32", "sgd")["optimizer"] == 0
    for mem in (fp32, bf16):
        assert mem["training_total"] == mem["weights"] + mem["gradients"] + mem["optimizer"] + mem["activations"]
        assert mem["inference_total"] == mem["weights"] + mem["kv_cache"]
    # activations grow linearly with batch × sequence length (flash attention keeps no T×T matrix)
    assert estimate_memory(c, 4, 16, "float32")["activations"] == 2 * fp32["activations"]
    assert estimate_memory(c, 2, 32, "float32")["activations"] == 2 * fp32["activations"]
    with pytest.raises(ValueError, match="optimizer"):
        estimate_memory(c, 1, 16, optimizer="rmsprop")
