"""One decoder layer: self-attention and a feed-forward network, each wrapped in a residual connection.

Pre-LN (GPT-2, Llama; the default): ``x = x + Attn(Norm(x)); x = x + FFN(Norm(x))`` — the residual stream is
never normalized, so gradients reach early layers unchanged and deep stacks train without warm-up tricks
(Xiong et al., 2020). Post-LN (the original Transformer): ``x = Norm(x + Attn(x)); x = Norm(x + FFN(x))``.
Norms are RMSNorm (``use_rms_norm``) or LayerNorm. Module names follow Hugging Face Llama
(``input_layernorm``, ``self_attn``, ``post_attention_layernorm``, ``mlp``) so checkpoints map one to one.

Not handled: parallel attention+FFN blocks (GPT-J), sandwich norms (Gemma 2), per-layer sliding windows.
"""

from __future__ import annotations

import torch
from torch import nn

from intro2llm.course import lesson_task
from intro2llm.model.attention import GroupedQueryAttention
from intro2llm.model.config import ModelConfig
from intro2llm.model.feedforward import build_ffn
from intro2llm.model.kv_cache import KVCache
from intro2llm.model.norm import LayerNorm, RMSNorm


def build_norm(config: ModelConfig) -> nn.Module:
    """RMSNorm or LayerNorm over ``hidden_size`` as the config says."""
    if config.use_rms_norm:
        return RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
    return LayerNorm(config.hidden_size, eps=config.rms_norm_eps)


class TransformerBlock(nn.Module):
    """(B, T, C) → (B, T, C): attention sub-layer then FFN sub-layer, Pre-LN or Post-LN."""

    @lesson_task(3)
    def __init__(self, config: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.input_layernorm = build_norm(config)
        self.self_attn = GroupedQueryAttention(config, layer_idx)
        self.post_attention_layernorm = build_norm(config)
        self.mlp = build_ffn(config)

    @lesson_task(3)
    def forward(
        self,
        x: torch.Tensor,  # (B, T, C)
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        kv_cache: KVCache | None = None,
        key_padding_mask: torch.Tensor | None = None,  # (B, Tk) bool
        segment_ids: torch.Tensor | None = None,  # (B, T) int, packed sequences
    ) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.self_attn(self.input_layernorm(x), rope, kv_cache, key_padding_mask, segment_ids)
            return x + self.mlp(self.post_attention_layernorm(x))
        x = self.input_layernorm(x + self.self_attn(x, rope, kv_cache, key_padding_mask, segment_ids))
        return self.post_attention_layernorm(x + self.mlp(x))
