"""SwiGLU and GeGLU (``act(gate) * up``) forward and backward in Triton.

Layout: private kernels (``_glu_fwd_kernel``, ``_glu_bwd_kernel``) → host launchers (``glu_fwd``, ``glu_bwd``).
Elementwise over the flattened (contiguous) inputs, BLOCK elements per program, fp32 math, one rounding at
the store. The backward recomputes the activation from ``gate`` instead of reading a saved one.

    silu(x)      = x * sigmoid(x)                       silu'      = s * (1 + x (1 - s))
    gelu(x)      = 0.5 x (1 + erf(x / sqrt 2))           gelu'      = Phi(x) + x phi(x)
    gelu_tanh(x) = x * sigmoid(2u), u = sqrt(2/pi)(x + 0.044715 x^3)   (0.5 (1 + tanh u) = sigmoid(2u))
                                                         gelu_tanh' = k + x k (1 - k) 2 u'(x),  k = sigmoid(2u)

Traffic: forward reads 2N and writes N; backward reads 3N and writes 2N. Not handled: strided inputs (the
caller makes them contiguous).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from intro2llm.course import lesson_task
from intro2llm.kernels.tiles import block_offsets, load_f32

ACTS = {"silu": 0, "gelu": 1, "gelu_tanh": 2}


@triton.jit
def _act_and_grad(x, ACT: tl.constexpr):
    """act(x) and act'(x) in fp32 (ACT: 0 silu, 1 gelu (erf), 2 gelu (tanh))."""
    if ACT == 0:
        s = tl.sigmoid(x)
        a = x * s
        da = s * (1.0 + x * (1.0 - s))
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
        a = x * cdf
        da = cdf + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)
    else:
        k = tl.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))  # 2 * sqrt(2/pi) * (...)
        a = x * k
        da = k + x * k * (1.0 - k) * 1.5957691216057308 * (1.0 + 0.134145 * x * x)
    return a, da


@triton.jit
def _act(x, ACT: tl.constexpr):
    if ACT == 0:
        a = x * tl.sigmoid(x)
    elif ACT == 1:
        a = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    else:
        a = x * tl.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))
    return a


@lesson_task(3)  # course mode: blanked with --include-kernels
@triton.jit
def _glu_fwd_kernel(
    g_ptr,  # (N,) gate, contiguous
    u_ptr,  # (N,) up
    o_ptr,  # (N,) output act(gate) * up, dtype of gate
    N,  # number of elements
    ACT: tl.constexpr,  # 0 silu, 1 gelu (erf), 2 gelu (tanh)
    BLOCK: tl.constexpr,  # elements per program
):
    # pid → offsets → mask; load, upcast; compute
    offs, mask = block_offsets(N, BLOCK)
    y = _act(load_f32(g_ptr, offs, mask), ACT) * load_f32(u_ptr, offs, mask)
    # store
    tl.store(o_ptr + offs, y.to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _glu_bwd_kernel(
    dy_ptr,  # (N,) upstream gradient
    g_ptr, u_ptr,  # (N,) gate and up
    dg_ptr, du_ptr,  # (N,) outputs d gate, d up
    N, ACT: tl.constexpr, BLOCK: tl.constexpr,  # as in _glu_fwd_kernel
):
    offs, mask = block_offsets(N, BLOCK)
    dy = load_f32(dy_ptr, offs, mask)
    u = load_f32(u_ptr, offs, mask)
    # compute: recompute act(gate), then both gradients
    a, da = _act_and_grad(load_f32(g_ptr, offs, mask), ACT)
    # store
    tl.store(dg_ptr + offs, (dy * u * da).to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + offs, (dy * a).to(du_ptr.dtype.element_ty), mask=mask)


def _block(x: torch.Tensor) -> int:
    # GPU: 1024 elements (4 warps x 8 per thread); interpreter: bigger blocks, fewer Python-level programs.
    return 1024 if x.is_cuda else 16384


def glu_fwd(gate: torch.Tensor, up: torch.Tensor, act: str) -> torch.Tensor:
    """act(gate) * up for contiguous gate/up of one shape and dtype; act in ``ACTS``."""
    out = torch.empty_like(gate)
    n = gate.numel()
    if n:
        block = _block(gate)
        _glu_fwd_kernel[(triton.cdiv(n, block),)](gate, up, out, n, ACT=ACTS[act], BLOCK=block)
    return out


def glu_bwd(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(d gate, d up) of ``glu_fwd`` for contiguous inputs."""
    dg = torch.empty_like(gate)
    du = torch.empty_like(up)
    n = gate.numel()
    if n:
        block = _block(gate)
        _glu_bwd_kernel[(triton.cdiv(n, block),)](grad, gate, up, dg, du, n, ACT=ACTS[act], BLOCK=block)
    return dg, du
