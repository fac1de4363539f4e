"""Gated linear units of the feed-forward block: SwiGLU and GeGLU (Shazeer, 2020, "GLU Variants Improve Transformer").

``swiglu(gate, up) = silu(gate) * up`` with ``silu(x) = x * sigmoid(x)`` (Llama, Qwen, Mistral);
``geglu(gate, up, approximate) = gelu(gate, approximate) * up`` (Gemma uses ``approximate="tanh"``), equal to
``torch.nn.functional.gelu(gate, approximate=...) * up``. ``gate`` and ``up`` have one shape (..., F) and one
dtype; the math runs in fp32 and the result is rounded once to that dtype.

Gradients: ``d gate = g * up * act'(gate)``, ``d up = g * act(gate)`` with
``silu'(x) = s * (1 + x * (1 - s))``, ``s = sigmoid(x)``;
``gelu'(x) = Φ(x) + x φ(x)`` (erf form) and, for tanh, ``0.5 (1 + t) + 0.5 x (1 - t²) √(2/π) (1 + 3·0.044715 x²)``
with ``t = tanh(√(2/π) (x + 0.044715 x³))``. The fast backends recompute the activation in the backward
instead of saving it (saves one (…, F) tensor).

Layout: the op template of ``_dispatch`` (worked example ``rms_norm.py``), twice. Not handled: a single
concatenated ``gate_up`` input (split it: ``gate, up = x.chunk(2, -1)``; the views are made contiguous by the
fast paths), broadcasting between gate and up.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from intro2llm.ops import _dispatch
from intro2llm.ops._checks import check_float, check_same_device

SWIGLU = _dispatch.Op("swiglu", backends=("reference", "triton", "cpp", "cuda"), compiled="swiglu_fwd")
GEGLU = _dispatch.Op("geglu", backends=("reference", "triton", "cpp", "cuda"), compiled="geglu_fwd")
_APPROX = ("none", "tanh")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Eager SwiGLU: silu(gate) * up, gate/up (..., F) → (..., F) in gate's dtype, fp32 math.

    Memory traffic (fp32): silu reads F writes F, the product reads 2F writes F: 5 passes; fused: 3 (2 reads, 1 write).
    """
    c = _compute_dtype(gate)
    return (F.silu(gate.to(c)) * up.to(c)).to(gate.dtype)


def geglu_reference(gate: torch.Tensor, up: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """Eager GeGLU: gelu(gate, approximate) * up, gate/up (..., F) → (..., F) in gate's dtype, fp32 math."""
    c = _compute_dtype(gate)
    return (F.gelu(gate.to(c), approximate=approximate) * up.to(c)).to(gate.dtype)


def _validate(op: str, gate: torch.Tensor, up: torch.Tensor, approximate: str | None = None) -> None:
    check_float("gate", gate, op)
    check_float("up", up, op)
    if gate.shape != up.shape:
        raise ValueError(f"{op}: gate and up must have the same shape, got gate {tuple(gate.shape)} and up "
                         f"{tuple(up.shape)}")
    if gate.dim() < 1:
        raise ValueError(f"{op}: gate and up need at least one dimension, got shape {tuple(gate.shape)}")
    if gate.dtype != up.dtype:
        raise TypeError(f"{op}: gate and up must share a dtype, got gate {gate.dtype} and up {up.dtype}")
    if approximate is not None and approximate not in _APPROX:
        raise ValueError(f"{op}: approximate must be 'none' or 'tanh', got {approximate!r}")
    check_same_device(op, gate=gate, up=up)


# ---------------------------------------------------------------------------------------------------------------
# Kernels (the activation is recomputed in the backward: only gate and up are saved).
# ---------------------------------------------------------------------------------------------------------------
def _fake_out(gate, up, *args):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


def _fake_bwd(grad, gate, up, *args):
    return _fake_out(gate, up), _fake_out(up, gate)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1])
    ctx.args = inputs[2:]  # geglu's approximate


def _backward(bwd, ctx, grad):
    gate, up = ctx.saved_tensors
    dgate, dup = bwd(grad, gate, up, *ctx.args)
    return (dgate, dup) + (None,) * len(ctx.args)


# Triton: kernels/swiglu.py launched inside custom ops (triton imported lazily: it is optional).
@torch.library.custom_op("intro2llm::swiglu_fwd_triton", mutates_args=())
def _swiglu_fwd_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    from intro2llm.kernels.swiglu import glu_fwd

    return glu_fwd(gate.contiguous(), up.contiguous(), "silu")


@torch.library.custom_op("intro2llm::swiglu_bwd_triton", mutates_args=())
def _swiglu_bwd_triton(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from intro2llm.kernels.swiglu import glu_bwd

    return glu_bwd(grad.contiguous(), gate.contiguous(), up.contiguous(), "silu")


@torch.library.custom_op("intro2llm::geglu_fwd_triton", mutates_args=())
def _geglu_fwd_triton(gate: torch.Tensor, up: torch.Tensor, approximate: str) -> torch.Tensor:
    from intro2llm.kernels.swiglu import glu_fwd

    return glu_fwd(gate.contiguous(), up.contiguous(), "gelu_tanh" if approximate == "tanh" else "gelu")


@torch.library.custom_op("intro2llm::geglu_bwd_triton", mutates_args=())
def _geglu_bwd_triton(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                      approximate: str) -> tuple[torch.Tensor, torch.Tensor]:
    from intro2llm.kernels.swiglu import glu_bwd

    act = "gelu_tanh" if approximate == "tanh" else "gelu"
    return glu_bwd(grad.contiguous(), gate.contiguous(), up.contiguous(), act)


_KERNELS = dict(fake_fwd=_fake_out, fake_bwd=_fake_bwd, backward=_backward, setup_context=_setup_context)
_dispatch.register_kernels("swiglu_fwd", "swiglu_bwd", **_KERNELS)  # C++ (CPU) and CUDA, from csrc/
_dispatch.register_kernels("geglu_fwd", "geglu_bwd", **_KERNELS)
_dispatch.register_kernels(_swiglu_fwd_triton, _swiglu_bwd_triton, **_KERNELS)
_dispatch.register_kernels(_geglu_fwd_triton, _geglu_bwd_triton, **_KERNELS)


# ---------------------------------------------------------------------------------------------------------------
# Public ops
# ---------------------------------------------------------------------------------------------------------------
def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """silu(gate) * up: gate/up (..., F) fp32/bf16/fp16 → (..., F) in their dtype."""
    _validate("swiglu", gate, up)
    name = SWIGLU.resolve(gate.device, backend, dtype=gate.dtype)
    if name == "reference":
        return swiglu_reference(gate, up)
    if name == "triton":
        return _swiglu_fwd_triton(gate, up)
    return torch.ops.intro2llm.swiglu_fwd(gate, up)


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "none", *,
          backend: str | None = None) -> torch.Tensor:
    """gelu(gate, approximate) * up: gate/up (..., F) fp32/bf16/fp16, approximate "none" | "tanh" → (..., F)."""
    _validate("geglu", gate, up, approximate)
    name = GEGLU.resolve(gate.device, backend, dtype=gate.dtype)
    if name == "reference":
        return geglu_reference(gate, up, approximate)
    if name == "triton":
        return _geglu_fwd_triton(gate, up, approximate)
    return torch.ops.intro2llm.geglu_fwd(gate, up, approximate)
