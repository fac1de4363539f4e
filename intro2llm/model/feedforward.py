"""Position-wise feed-forward networks: the plain 2-layer MLP and the gated variants (GLU family).

- ``BasicFFN``: ``down(act(up(x)))`` with ReLU (Vaswani et al., 2017) or GELU (GPT-2).
- ``FeedForward``: GeGLU, ``down(gelu(gate(x)) ⊙ up(x))`` (Shazeer, 2020; Gemma uses tanh-GELU).
- ``SwiGLU``: ``down(silu(gate(x)) ⊙ up(x))`` (Shazeer, 2020; Llama, Qwen).

A gated FFN has three (C, F) matrices instead of two, so Llama shrinks F to about 8/3·C to keep the parameter
count of a 4·C MLP. The gating products run through ``intro2llm.ops.swiglu`` / ``geglu`` (fused kernels when a
backend is available). Projection names follow Hugging Face (``gate_proj``, ``up_proj``, ``down_proj``).

Not handled: mixture-of-experts, dropout inside the FFN (``config.dropout`` applies to its output).
"""

from __future__ import annotations

import torch
from torch import nn

from intro2llm import ops
from intro2llm.course import lesson_task
from intro2llm.model.config import ModelConfig


class BasicFFN(nn.Module):
    """Two-layer MLP: (B, T, C) → (B, T, F) → act → (B, T, C); act is ReLU (default) or GELU."""

    def __init__(self, config: ModelConfig, activation: str | None = None) -> None:
        super().__init__()
        act = activation or ("gelu" if config.ffn_type == "gelu" else "relu")
        if act not in ("relu", "gelu"):
            raise ValueError(f"BasicFFN: activation must be 'relu' or 'gelu', got {act!r}")
        self.activation = act
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.dropout = nn.Dropout(config.dropout)

    @lesson_task(3)
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up_proj(x)  # (B, T, F)
        h = torch.relu(h) if self.activation == "relu" else nn.functional.gelu(h)
        return self.dropout(self.down_proj(h))  # (B, T, C)


class _GatedFFN(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        C, F = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(C, F, bias=config.mlp_bias)
        self.up_proj = nn.Linear(C, F, bias=config.mlp_bias)
        self.down_proj = nn.Linear(F, C, bias=config.mlp_bias)
        self.dropout = nn.Dropout(config.dropout)

    def _gate(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @lesson_task(3)
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self._gate(self.gate_proj(x), self.up_proj(x))  # (B, T, F)
        return self.dropout(self.down_proj(h))  # (B, T, C)


class SwiGLU(_GatedFFN):
    """Llama's FFN: down(silu(gate(x)) * up(x)), (B, T, C) → (B, T, C)."""

    @lesson_task(3)
    def _gate(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return ops.swiglu(gate, up)


class FeedForward(_GatedFFN):
    """GeGLU FFN: down(gelu(gate(x)) * up(x)); ``approximate="tanh"`` as in Gemma."""

    def __init__(self, config: ModelConfig, approximate: str = "tanh") -> None:
        super().__init__(config)
        self.approximate = approximate

    @lesson_task(3)
    def _gate(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return ops.geglu(gate, up, approximate=self.approximate)


def build_ffn(config: ModelConfig) -> nn.Module:
    """The FFN that ``config.ffn_type`` names."""
    if config.ffn_type == "swiglu":
        return SwiGLU(config)
    if config.ffn_type == "geglu":
        return FeedForward(config)
    return BasicFFN(config)
