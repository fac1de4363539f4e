"""Multi-head self-attention with grouped key/value heads (MHA, GQA, MQA), causal/sliding-window/padding masks.

``Attention(Q, K, V) = softmax(Q Kᵀ / √d + M) V`` (Vaswani et al., 2017), computed per head. Grouped-query
attention (Ainslie et al., 2023) shares each key/value head among ``H / Hkv`` query heads: the KV cache shrinks
by that factor. ``Hkv == H`` is classic multi-head attention, ``Hkv == 1`` multi-query attention (Shazeer, 2019).

The attention itself is ``intro2llm.ops.flash_attention`` (B, H, T, D) tensors, k/v with Hkv heads — the op
maps query head h to kv head ``h // (H / Hkv)`` itself, so this module never materializes ``repeat_kv``
(the lesson's explanation and the tests' oracle). Masks: ``causal=True`` with bottom-right alignment (decoding
with a cache), ``window=config.sliding_window`` (Mistral), and a key padding mask (B, Tk) for left-padded
batches. The lesson's helpers — ``repeat_kv``, ``attention_mask``/``causal_mask``/``sliding_window_mask``/
``padding_mask`` (the same boolean masks, explicitly) and ``naive_attention`` (the formula) — live with the op
in ``intro2llm.ops.flash_attention`` and are re-exported here.

Not handled: attention dropout (the op has none; ``config.dropout`` applies to the output projection),
cross-attention, ALiBi/arbitrary additive biases.
"""

from __future__ import annotations

import torch
from torch import nn

from intro2llm import ops
from intro2llm.course import lesson_task
from intro2llm.model.config import ModelConfig
from intro2llm.model.kv_cache import KVCache
from intro2llm.ops.flash_attention import (  # noqa: F401  (the lesson's helpers; one home: intro2llm.ops)
    attention_mask,
    causal_mask,
    naive_attention,
    padding_mask,
    repeat_kv,
    sliding_window_mask,
)


class GroupedQueryAttention(nn.Module):
    """Self-attention with ``num_attention_heads`` query heads and ``num_key_value_heads`` key/value heads."""

    @lesson_task(2)
    def __init__(self, config: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        C = config.hidden_size
        self.q_proj = nn.Linear(C, config.q_size, bias=config.attention_bias)
        self.k_proj = nn.Linear(C, config.kv_size, bias=config.attention_bias)
        self.v_proj = nn.Linear(C, config.kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(config.q_size, C, bias=config.attention_output_bias)
        self.dropout = nn.Dropout(config.dropout)

    @lesson_task(2)
    def forward(
        self,
        x: torch.Tensor,  # (B, T, C)
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,  # cos, sin: (T, D) or (B, T, D)
        kv_cache: KVCache | None = None,
        key_padding_mask: torch.Tensor | None = None,  # (B, Tk) bool, True = real token
        segment_ids: torch.Tensor | None = None,  # (B, T) int: packed samples attend only within their segment
    ) -> torch.Tensor:  # (B, T, C)
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        if rope is not None:
            q, k = ops.apply_rope(q, k, rope[0], rope[1])
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, Hkv, T_past + T, D)
        out = ops.flash_attention(
            q, k, v, causal=True, window=self.config.sliding_window, key_padding_mask=key_padding_mask,
            segment_ids=segment_ids,
        )  # (B, H, T, D)
        out = out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)  # (B, T, H·D)
        return self.dropout(self.o_proj(out))


class MultiHeadAttention(GroupedQueryAttention):
    """Classic multi-head attention: one key/value head per query head (``num_key_value_heads`` is ignored)."""

    @lesson_task(2)
    def __init__(self, config: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__(config.replace(num_key_value_heads=config.num_attention_heads), layer_idx)
