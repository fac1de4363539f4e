"""``CrossEntropyLoss``: the language-model loss as an ``nn.Module`` over ``intro2llm.ops.cross_entropy``.

Equal to ``torch.nn.CrossEntropyLoss(ignore_index=..., label_smoothing=..., reduction=...)`` for logits laid out
``(..., V)`` with targets ``(...)``, plus the optional z-loss (``z_loss·logsumexp²`` per token, PaLM §5). The op
picks its backend (fused C++/CUDA/Triton kernels or the eager reference) per call.
Not handled: class weights and soft (probability) targets.
"""

from __future__ import annotations

import torch
from torch import nn

from intro2llm.course import lesson_task
from intro2llm.ops.cross_entropy import REDUCTIONS, cross_entropy


class CrossEntropyLoss(nn.Module):
    """logits (..., V), targets (...) int64 → scalar ("mean"/"sum") or (...) ("none")."""

    def __init__(
        self, ignore_index: int = -100, label_smoothing: float = 0.0, reduction: str = "mean", z_loss: float = 0.0
    ) -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"CrossEntropyLoss: reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"CrossEntropyLoss: label_smoothing must be in [0, 1], got {label_smoothing}")
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.reduction = reduction
        self.z_loss = z_loss

    @lesson_task(6)
    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return cross_entropy(logits, targets, self.ignore_index, self.label_smoothing, self.z_loss, self.reduction)

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, "
                f"reduction={self.reduction!r}, z_loss={self.z_loss}")
