"""LayerNorm forward and backward in Triton (same structure as ``kernels/rms_norm.py``).

A program owns BLOCK_M whole rows; mean and rstd in fp32 are saved for the backward (``rms_norm.norm_bwd``, the
kernel shared with RMSNorm), which writes dx per row and one fp32 partial (dw, db) row per program, summed on the
host. Not handled: rows over 65536 elements.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from intro2llm.kernels.rms_norm import _blocks, norm_bwd
from intro2llm.kernels.tiles import load_f32, row_tile


@triton.jit
def _layer_norm_fwd_kernel(
    x_ptr,  # (M, N) input rows, contiguous
    w_ptr,  # (N,) scale
    b_ptr,  # (N,) shift (ignored when HAS_BIAS is False)
    y_ptr,  # (M, N) output, dtype of x
    mean_ptr,  # (M,) fp32 row means, saved for backward
    rstd_ptr,  # (M,) fp32 1/sqrt(var + eps), saved for backward
    M,  # number of rows
    N,  # row length
    eps,  # added to the variance
    HAS_BIAS: tl.constexpr,  # whether b_ptr is read
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_N: tl.constexpr,  # power of two ≥ N
):
    # pid → rows; masks and offsets; load, upcast
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    row_ok, mask, offs = row_tile(rows, M, cols, col_ok, N)
    x = load_f32(x_ptr, offs, mask)
    w = load_f32(w_ptr, cols, col_ok)
    # compute: two-pass statistics on the resident row (no E[x^2] - E[x]^2 cancellation)
    mean = tl.sum(x, axis=1) / N
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / N + eps)
    y = xc * rstd[:, None] * w[None, :]
    if HAS_BIAS:
        y += load_f32(b_ptr, cols, col_ok)[None, :]
    # store
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + rows, mean, mask=row_ok)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


def layer_norm_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (..., N) contiguous → (y in x's dtype, mean fp32 (...), rstd fp32 (...))."""
    N = x.shape[-1]
    M = x.numel() // N
    y = torch.empty_like(x)
    mean = torch.empty(x.shape[:-1], device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    block_m, block_n = _blocks(M, N)
    _layer_norm_fwd_kernel[(triton.cdiv(M, block_m),)](
        x, weight, bias if bias is not None else weight, y, mean, rstd, M, N, eps,
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n,
    )  # fmt: skip
    return y, mean, rstd


def layer_norm_bwd(
    grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx in x's dtype, dw fp32, db fp32) of ``layer_norm_fwd``; all inputs contiguous (rms_norm.py's backward
    kernel, centred)."""
    return norm_bwd(grad_y, x, weight, rstd, mean)
