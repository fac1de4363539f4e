"""Input validation shared by every op: clear ``ValueError``/``TypeError`` messages before any kernel runs."""

from __future__ import annotations

import torch

from intro2llm.ops._dispatch import REFERENCE_DTYPES


def check_float(name: str, t: torch.Tensor, op: str, dtypes: tuple[torch.dtype, ...] = REFERENCE_DTYPES) -> None:
    """Raise TypeError unless ``t`` is a tensor of one of ``dtypes``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} must have dtype in ({allowed}), got {t.dtype} with shape {tuple(t.shape)}")


def check_same_device(op: str, **tensors: torch.Tensor | None) -> None:
    """Raise ValueError when the given tensors live on different devices."""
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"{op}: all tensors must be on one device, got {where}")
