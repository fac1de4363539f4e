"""Normalization layers: ``RMSNorm`` (Llama, Qwen) and ``LayerNorm`` (GPT-2, original Transformer).

LayerNorm (Ba et al., 2016) centres and scales each vector: ``(x - mean) / sqrt(var + eps) * w + b``.
RMSNorm (Zhang & Sennrich, 2019) drops the centring and the bias: ``x / sqrt(mean(x^2) + eps) * w`` — one
statistic instead of two, and in practice the same quality. Both run through ``intro2llm.ops`` so they use
the fused kernels when a backend is available.
"""

from __future__ import annotations

import torch
from torch import nn

from intro2llm import ops
from intro2llm.course import lesson_task


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension; ``weight`` starts at ones."""

    @lesson_task(2)
    def __init__(self, hidden_size: int, eps: float = 1e-6, device=None, dtype=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

    @lesson_task(2)
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., hidden) → (..., hidden)
        return ops.rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class LayerNorm(nn.Module):
    """LayerNorm over the last dimension with optional bias; equals ``torch.nn.LayerNorm``."""

    @lesson_task(2)
    def __init__(self, hidden_size: int, eps: float = 1e-5, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(hidden_size, device=device, dtype=dtype)) if bias else None

    @lesson_task(2)
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., hidden) → (..., hidden)
        return ops.layer_norm(x, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, bias={self.bias is not None}"
