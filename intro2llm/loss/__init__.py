"""intro2llm.loss: training losses as modules/functions over ``intro2llm.ops``."""

from intro2llm.loss.cross_entropy import CrossEntropyLoss
from intro2llm.loss.dpo_loss import DPOLoss

__all__ = ["CrossEntropyLoss", "DPOLoss"]
