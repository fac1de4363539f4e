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

Layout follows ``intro2llm/ops/rms_norm.py``. Not handled: a single concatenated ``gate_up`` input (split it:
``gate, up = x.chunk(2, -1)``; the views are made contiguous by the fast paths), broadcasting between gate and up.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from intro2llm.ops import _dispatch
from intro2llm.ops._checks import FLOAT_DTYPES, check_float, check_same_device

_ALL_DTYPES = FLOAT_DTYPES + (torch.float64,)
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
    check_float("gate", gate, op, _ALL_DTYPES)
    check_float("up", up, op, _ALL_DTYPES)
    if gate.shape != up.shape:
        raise ValueError(
            f"{op}: gate and up must have the same shape, got gate {tuple(gate.shape)} and up {tuple(up.shape)}"
        )
    if gate.dim() < 1:
        raise ValueError(f"{op}: gate and up need at least one dimension, got shape {tuple(gate.shape)}")
    if gate.dtype != up.dtype:
        raise TypeError(f"{op}: gate and up must share a dtype, got gate {gate.dtype} and up {up.dtype}")
    if approximate is not None and approximate not in _APPROX:
        raise ValueError(f"{op}: approximate must be 'none' or 'tanh', got {approximate!r}")
    check_same_device(op, gate=gate, up=up)


# ---------------------------------------------------------------------------------------------------------------
# Shared autograd glue (the activation is recomputed in the backward: only gate and up are saved).
# ---------------------------------------------------------------------------------------------------------------
def _fake_out(gate, up, *args):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


def _fake_bwd(grad, gate, up, *args):
    return (
        torch.empty_like(gate, memory_format=torch.contiguous_format),
        torch.empty_like(up, memory_format=torch.contiguous_format),
    )


def _setup_swiglu(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1])


def _setup_geglu(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1])
    ctx.approximate = inputs[2]


def _swiglu_backward(bwd_op):
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        return bwd_op(grad, gate, up)

    return backward


def _geglu_backward(bwd_op):
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        dgate, dup = bwd_op(grad, gate, up, ctx.approximate)
        return dgate, dup, None

    return backward


# ---------------------------------------------------------------------------------------------------------------
# C++ (CPU) and CUDA: intro2llm::{swiglu,geglu}_{fwd,bwd} from csrc/, registered here with fake + autograd.
# ---------------------------------------------------------------------------------------------------------------
_COMPILED = _dispatch.extension_error() is None and hasattr(torch.ops.intro2llm, "swiglu_fwd")

if _COMPILED:
    torch.library.register_fake("intro2llm::swiglu_fwd")(_fake_out)
    torch.library.register_fake("intro2llm::swiglu_bwd")(_fake_bwd)
    torch.library.register_fake("intro2llm::geglu_fwd")(_fake_out)
    torch.library.register_fake("intro2llm::geglu_bwd")(_fake_bwd)
    torch.library.register_autograd(
        "intro2llm::swiglu_fwd",
        _swiglu_backward(lambda *a: torch.ops.intro2llm.swiglu_bwd(*a)),
        setup_context=_setup_swiglu,
    )
    torch.library.register_autograd(
        "intro2llm::geglu_fwd",
        _geglu_backward(lambda *a: torch.ops.intro2llm.geglu_bwd(*a)),
        setup_context=_setup_geglu,
    )


# ---------------------------------------------------------------------------------------------------------------
# Triton: kernels/swiglu.py launched inside custom ops (triton imported lazily: it is optional).
# ---------------------------------------------------------------------------------------------------------------
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
def _geglu_bwd_triton(
    grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, approximate: str
) -> tuple[torch.Tensor, torch.Tensor]:
    from intro2llm.kernels.swiglu import glu_bwd

    act = "gelu_tanh" if approximate == "tanh" else "gelu"
    return glu_bwd(grad.contiguous(), gate.contiguous(), up.contiguous(), act)


_swiglu_fwd_triton.register_fake(_fake_out)
_swiglu_bwd_triton.register_fake(_fake_bwd)
_geglu_fwd_triton.register_fake(_fake_out)
_geglu_bwd_triton.register_fake(_fake_bwd)
_swiglu_fwd_triton.register_autograd(_swiglu_backward(_swiglu_bwd_triton), setup_context=_setup_swiglu)
_geglu_fwd_triton.register_autograd(_geglu_backward(_geglu_bwd_triton), setup_context=_setup_geglu)


# ---------------------------------------------------------------------------------------------------------------
# Public ops
# ---------------------------------------------------------------------------------------------------------------
def _resolve(op: str, gate: torch.Tensor, backend: str | None) -> str:
    if _dispatch.extension_error() is None and not _COMPILED:
        implemented: tuple[str, ...] = ("reference", "triton")  # extension built before this op existed: rebuild
    else:
        implemented = ("reference", "triton", "cpp", "cuda")
    return _dispatch.resolve_backend(
        op, gate.device, backend, implemented=implemented, compiled_op=f"{op}_fwd" if _COMPILED else None,
        dtype=gate.dtype,
    )


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """silu(gate) * up: gate/up (..., F) fp32/bf16/fp16 → (..., F) in their dtype."""
    _validate("swiglu", gate, up)
    name = _resolve("swiglu", gate, backend)
    if name == "reference":
        return swiglu_reference(gate, up)
    if name == "triton":
        return _swiglu_fwd_triton(gate, up)
    return torch.ops.intro2llm.swiglu_fwd(gate, up)


def geglu(
    gate: torch.Tensor, up: torch.Tensor, approximate: str = "none", *, backend: str | None = None
) -> torch.Tensor:
    """gelu(gate, approximate) * up: gate/up (..., F) fp32/bf16/fp16, approximate "none" | "tanh" → (..., F)."""
    _validate("geglu", gate, up, approximate)
    name = _resolve("geglu", gate, backend)
    if name == "reference":
        return geglu_reference(gate, up, approximate)
    if name == "triton":
        return _geglu_fwd_triton(gate, up, approximate)
    return torch.ops.intro2llm.geglu_fwd(gate, up, approximate)
