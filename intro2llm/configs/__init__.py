"""Named model presets: ``get_config("tiny")`` returns a fresh ``ModelConfig``.

``tiny`` (≈6.3M parameters with the synthetic tokenizer's ~25 ids; 10.5M with an 8192 vocabulary) and ``small``
(≈33M) are the course's trainable models (CPU-sized); ``nano`` (2 layers, width 128: ≈0.4M parameters with the
synthetic tokenizer) is the default of ``intro2llm train``: the size at which the pipeline's pretrain → SFT → RL
reaches its 2-digit-addition targets in minutes on 2 CPU cores (a deeper/wider model learns no faster per example
on that task and costs more per step; see lesson 10's figures); the
``llama2_7b``, ``llama3_8b``, ``llama3_1_8b`` and ``qwen2_0_5b`` presets copy the published shapes of those
models for ``intro2llm model-info`` / ``intro2llm.model.analysis`` (parameter, FLOP and memory arithmetic) —
instantiating them needs tens of GB of memory. ``gpt_style`` is the GPT-2-like variant of the early lessons
(LayerNorm, sinusoidal positions, GELU MLP, tied embeddings).
"""

from __future__ import annotations

import copy
from typing import Any

from intro2llm.model.config import ModelConfig

_PRESETS: dict[str, dict[str, Any]] = {
    "nano": dict(vocab_size=8192, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
    "tiny": dict(vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=8,
                 num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024),
    "small": dict(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048),
    "gpt_style": dict(vocab_size=8192, hidden_size=256, intermediate_size=1024, num_hidden_layers=6,
                      num_attention_heads=8, max_position_embeddings=1024, use_rms_norm=False, use_rope=False,
                      ffn_type="gelu", tie_word_embeddings=True, attention_bias=True, attention_output_bias=True,
                      mlp_bias=True, rms_norm_eps=1e-5),
    "llama2_7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                      rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2),
    "llama3_8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                      rope_theta=500000.0, rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001),
    "llama3_1_8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                        rope_theta=500000.0, rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "qwen2_0_5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                       rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=True,
                       model_type="qwen2", eos_token_id=151643, bos_token_id=151643),
}


def list_configs() -> list[str]:
    """Names accepted by ``get_config``."""
    return sorted(_PRESETS)


def get_config(name: str, **overrides: Any) -> ModelConfig:
    """A fresh ``ModelConfig`` for preset ``name``, with ``overrides`` applied (e.g. ``vocab_size=...``)."""
    if name not in _PRESETS:
        raise ValueError(f"unknown model config {name!r}; available: {', '.join(list_configs())}")
    return ModelConfig(**{**copy.deepcopy(_PRESETS[name]), **overrides})


__all__ = ["get_config", "list_configs"]
