"""Parameter groups for weight decay: decay the matrices, not the norms, biases and embeddings.

Weight decay pulls weights toward 0. For the weight matrices of linear layers that is the intended regulariser;
for norm gains (which should stay near 1), biases (a shift, not a scale) and embedding rows (most rows see
a gradient rarely, so decay would erase them between updates) it only hurts — the GPT-2/nanoGPT/Llama recipe
excludes them. Rule used here: a parameter is decayed iff it has >= 2 dimensions and does not belong to an
``nn.Embedding`` (or a module whose name contains ``embed``). A weight tied to the embedding is not decayed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _no_decay_ids(model: nn.Module) -> set[int]:
    ids: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) or "embed" in name.rsplit(".", 1)[-1].lower():
            ids.update(id(p) for p in module.parameters(recurse=False))
    return ids


def param_groups(model: nn.Module, weight_decay: float, **group_options: Any) -> list[dict[str, Any]]:
    """Two optimizer groups: ``weight_decay`` for matrices, 0 for norms, biases and embeddings.

    Each group also carries ``names`` (for logging). Parameters with ``requires_grad=False`` are left out, and a
    tied parameter appears once. Extra keyword arguments (e.g. ``lr``) are copied into both groups.
    """
    no_decay_ids = _no_decay_ids(model)
    decay, no_decay, decay_names, no_decay_names = [], [], [], []
    for name, p in model.named_parameters():  # named_parameters() already skips tied duplicates
        if not p.requires_grad:
            continue
        if p.ndim >= 2 and id(p) not in no_decay_ids:
            decay.append(p)
            decay_names.append(name)
        else:
            no_decay.append(p)
            no_decay_names.append(name)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "names": decay_names, **group_options},
        {"params": no_decay, "weight_decay": 0.0, "names": no_decay_names, **group_options},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(
    name: str,
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.1,
    betas: tuple[float, float] | None = None,
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """``adamw`` (ours; fused where ``fused_unavailable`` says it can be), ``lion`` (ours) or ``torch-adamw`` over
    ``param_groups(model, weight_decay)``."""
    groups = param_groups(model, weight_decay)
    if name == "adamw":
        from intro2llm.optimizer.adamw import AdamW, fused_unavailable

        fused = fused_unavailable(model.parameters()) is None  # one C++ pass per step where it applies
        return AdamW(groups, lr=lr, betas=betas or (0.9, 0.95), eps=eps, fused=fused)
    if name == "lion":
        from intro2llm.optimizer.lion import Lion

        return Lion(groups, lr=lr, betas=betas or (0.9, 0.99))
    if name == "torch-adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas or (0.9, 0.95), eps=eps)
    raise ValueError(f"unknown optimizer {name!r}; choose adamw, lion or torch-adamw")
