"""RMSNorm (Zhang & Sennrich, 2019): ``y = x / sqrt(mean(x^2) + eps) * weight`` over the last dimension.

The worked example of the op template (``_dispatch``'s "How to add an op"): the readable reference (the
lesson's math, the test oracle, the fallback), validation, the declaration ``OP``, the kernels of each fast
backend — C++/CUDA from ``intro2llm._C``, Triton from ``kernels/rms_norm.py`` — registered as differentiable
torch ops, then ``rms_norm`` that validates, resolves the backend and calls it.
"""

from __future__ import annotations

import torch

from intro2llm.ops import _dispatch
from intro2llm.ops._checks import check_float, check_same_device

OP = _dispatch.Op("rms_norm", backends=("reference", "triton", "cpp", "cuda"), compiled="rms_norm_fwd")


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Eager RMSNorm: x (..., N), weight (N,) → (..., N) in x's dtype; statistics in fp32.

    Memory traffic: ~6 passes over M·N fp32 values (upcast, square, mean, scale, weight, downcast);
    the fused kernels make 2 (read x, write y).
    """
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)  # (..., 1)
    return (xf * rstd * weight.float()).to(x.dtype)


def _validate(x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    check_float("x", x, OP.name)
    check_float("weight", weight, OP.name)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{OP}: x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"{OP}: weight must have shape ({x.shape[-1]},) to match x of shape {tuple(x.shape)}, "
            f"got {tuple(weight.shape)}"
        )
    check_same_device(OP.name, x=x, weight=weight)
    if not eps >= 0.0:
        raise ValueError(f"{OP}: eps must be >= 0, got {eps}")


# ---------------------------------------------------------------------------------------------------------------
# Kernels: one fake per kernel, one backward for every backend (it receives the backend's backward kernel).
# ---------------------------------------------------------------------------------------------------------------
def _fake_fwd(x, weight, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(x.shape[:-1], dtype=torch.float32)


def _fake_bwd(grad_y, x, weight, rstd):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight, _eps = inputs
    ctx.save_for_backward(x, weight, output[1])


def _backward(bwd, ctx, grad_y, _grad_rstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = bwd(grad_y.contiguous(), x, weight, rstd)
    return dx, dw, None


# Triton: kernels/rms_norm.py launched inside custom ops (triton imported lazily: it is optional).
@torch.library.custom_op("intro2llm::rms_norm_fwd_triton", mutates_args=())
def _rms_norm_fwd_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    from intro2llm.kernels.rms_norm import rms_norm_fwd

    return rms_norm_fwd(x.contiguous(), weight.contiguous(), eps)


@torch.library.custom_op("intro2llm::rms_norm_bwd_triton", mutates_args=())
def _rms_norm_bwd_triton(
    grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    from intro2llm.kernels.rms_norm import rms_norm_bwd

    return rms_norm_bwd(grad_y, x.contiguous(), weight.contiguous(), rstd.contiguous())


_KERNELS = dict(fake_fwd=_fake_fwd, fake_bwd=_fake_bwd, backward=_backward, setup_context=_setup_context)
_dispatch.register_kernels("rms_norm_fwd", "rms_norm_bwd", **_KERNELS)  # C++ (CPU) and CUDA, from csrc/
_dispatch.register_kernels(_rms_norm_fwd_triton, _rms_norm_bwd_triton, **_KERNELS)


# ---------------------------------------------------------------------------------------------------------------
# Public op
# ---------------------------------------------------------------------------------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, backend: str | None = None) -> torch.Tensor:
    """RMSNorm over the last dim: x (..., N) fp32/bf16/fp16, weight (N,) → (..., N) in x's dtype."""
    _validate(x, weight, eps)
    name = OP.resolve(x.device, backend, dtype=x.dtype)
    if name == "reference":
        return rms_norm_reference(x, weight, eps)
    if name == "triton":
        return _rms_norm_fwd_triton(x, weight, float(eps))[0]
    return torch.ops.intro2llm.rms_norm_fwd(x.contiguous(), weight, float(eps))[0]
