"""intro2llm.model: the decoder-only Transformer of lessons 01–05 and its generation loop.

``from intro2llm.model import CausalLM, ModelConfig``; presets live in ``intro2llm.configs``.
"""

from intro2llm.model.attention import GroupedQueryAttention, MultiHeadAttention, repeat_kv
from intro2llm.model.causal_lm import CausalLM, CausalLMOutput, sample_next_token, top_k_filter, top_p_filter
from intro2llm.model.config import ModelConfig
from intro2llm.model.embedding import RotaryEmbedding, SinusoidalPositionalEncoding, TokenEmbedding
from intro2llm.model.feedforward import BasicFFN, FeedForward, SwiGLU
from intro2llm.model.kv_cache import DynamicKVCache, KVCache, StaticKVCache
from intro2llm.model.norm import LayerNorm, RMSNorm
from intro2llm.model.transformer_block import TransformerBlock

__all__ = [
    "BasicFFN",
    "CausalLM",
    "CausalLMOutput",
    "DynamicKVCache",
    "FeedForward",
    "GroupedQueryAttention",
    "KVCache",
    "LayerNorm",
    "ModelConfig",
    "MultiHeadAttention",
    "RMSNorm",
    "RotaryEmbedding",
    "SinusoidalPositionalEncoding",
    "StaticKVCache",
    "SwiGLU",
    "TokenEmbedding",
    "TransformerBlock",
    "repeat_kv",
    "sample_next_token",
    "top_k_filter",
    "top_p_filter",
]
