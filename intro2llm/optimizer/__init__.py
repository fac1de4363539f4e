"""intro2llm.optimizer: AdamW and Lion written from scratch, learning-rate schedules, weight-decay groups."""

from intro2llm.optimizer.adamw import AdamW
from intro2llm.optimizer.lion import Lion
from intro2llm.optimizer.param_groups import build_optimizer, param_groups
from intro2llm.optimizer.scheduler import (
    SCHEDULES,
    ConstantScheduler,
    WarmupCosineScheduler,
    WarmupLinearScheduler,
    WarmupStableDecayScheduler,
    build_scheduler,
    warmup_constant_lr,
    warmup_cosine_lr,
    warmup_linear_lr,
    warmup_stable_decay_lr,
)

__all__ = [
    "AdamW",
    "Lion",
    "param_groups",
    "build_optimizer",
    "SCHEDULES",
    "ConstantScheduler",
    "WarmupCosineScheduler",
    "WarmupLinearScheduler",
    "WarmupStableDecayScheduler",
    "build_scheduler",
    "warmup_constant_lr",
    "warmup_cosine_lr",
    "warmup_linear_lr",
    "warmup_stable_decay_lr",
]
