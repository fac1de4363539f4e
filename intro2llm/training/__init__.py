"""intro2llm.training: the Trainer (grad accumulation, clipping, bf16, eval, logging), crash-safe checkpoints with
bit-exact resume, DDP/FSDP2 under torchrun, and the ``train`` command.

Names are imported lazily (PEP 562), so ``import intro2llm.training.cli`` — done by ``intro2llm --help`` — does not
import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Trainer": "intro2llm.training.trainer",
    "TrainerConfig": "intro2llm.training.trainer",
    "NonFiniteLossError": "intro2llm.training.trainer",
    "PretrainTrainer": "intro2llm.training.pretrain_trainer",
    "PretrainBatches": "intro2llm.training.pretrain_trainer",
    "export_model": "intro2llm.interop.hf",
    "save_checkpoint": "intro2llm.training.checkpoint",
    "load_checkpoint": "intro2llm.training.checkpoint",
    "latest_checkpoint": "intro2llm.training.checkpoint",
    "list_checkpoints": "intro2llm.training.checkpoint",
    "CheckpointError": "intro2llm.training.checkpoint",
    "MetricsLogger": "intro2llm.training.logging",
    "read_metrics": "intro2llm.training.logging",
    "init_distributed": "intro2llm.training.distributed",
    "wrap_model": "intro2llm.training.distributed",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'intro2llm.training' has no attribute {name!r}")
