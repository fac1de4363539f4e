"""LayerNorm forward and backward in Triton (same structure as ``kernels/rms_norm.py``).

A program owns BLOCK_M whole rows; mean and rstd in fp32 are saved for the backward, which writes dx per row
and one fp32 partial (dw, db) row per program, summed on the host. Not handled: rows over 65536 elements.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from intro2llm.kernels.rms_norm import _blocks, _bwd_programs
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


@triton.jit
def _layer_norm_bwd_kernel(
    g_ptr,  # (M, N) upstream gradient
    x_ptr,  # (M, N) forward input
    w_ptr,  # (N,) scale
    mean_ptr,  # (M,) fp32 saved mean
    rstd_ptr,  # (M,) fp32 saved rstd
    dx_ptr,  # (M, N) output dL/dx
    dw_ptr,  # (P, N) fp32 partial dL/dw
    db_ptr,  # (P, N) fp32 partial dL/db
    M,  # number of rows
    N,  # row length
    rows_per_program,  # rows reduced into one partial row
    BLOCK_M: tl.constexpr,  # rows per inner step
    BLOCK_N: tl.constexpr,  # power of two ≥ N
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = load_f32(w_ptr, cols, col_ok)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for r0 in range(row_start, row_end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok, mask, offs = row_tile(rows, row_end, cols, col_ok, N)
        g = load_f32(g_ptr, offs, mask)
        x = load_f32(x_ptr, offs, mask)
        mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        # dx = rstd * (g*w - mean(g*w) - xhat * mean(g*w*xhat))
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        wg = g * w[None, :]
        c1 = tl.sum(wg, axis=1) / N
        c2 = tl.sum(wg * xhat, axis=1) / N
        dx = (wg - c1[:, None] - xhat * c2[:, None]) * rstd[:, None]
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += tl.sum(g * xhat, axis=0)
        db += tl.sum(g, axis=0)
    tl.store(dw_ptr + pid * N + cols, dw, mask=col_ok)
    tl.store(db_ptr + pid * N + cols, db, mask=col_ok)


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
    """(dx in x's dtype, dw fp32, db fp32) of ``layer_norm_fwd``; all inputs contiguous."""
    N = x.shape[-1]
    M = x.numel() // N
    block_m, block_n = _blocks(M, N)
    programs = _bwd_programs(x, M, block_m)
    dx = torch.empty_like(x)
    dw = torch.empty((programs, N), device=x.device, dtype=torch.float32)
    db = torch.empty_like(dw)
    _layer_norm_bwd_kernel[(programs,)](
        grad_y, x, weight, mean, rstd, dx, dw, db, M, N, triton.cdiv(M, programs), BLOCK_M=block_m, BLOCK_N=block_n
    )
    return dx, dw.sum(0), db.sum(0)
