"""RMSNorm forward and backward in Triton (the template every kernel in this folder follows).

Layout: private kernels (``_rms_norm_fwd_kernel``, ``_norm_bwd_kernel``) → host launchers
(``rms_norm_fwd``, ``rms_norm_bwd``). A program owns BLOCK_M whole rows (BLOCK_N ≥ N columns), so one load
gives the row statistic and the output; reductions in fp32 whatever the input dtype. The backward writes
dx per row and one fp32 partial dw row per program, summed on the host (deterministic, no atomics); it is also
LayerNorm's (``CENTERED``: the row mean subtracted, and a partial db row).
Not handled: rows longer than 65536 elements (raise; a looped two-pass kernel would be needed).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from intro2llm.course import lesson_task
from intro2llm.kernels.tiles import load_f32, row_tile

MAX_FUSED_N = 65536


@lesson_task(2)  # course mode: blanked with --include-kernels
@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr,  # (M, N) input rows, contiguous
    w_ptr,  # (N,) scale
    y_ptr,  # (M, N) output, dtype of x
    rstd_ptr,  # (M,) fp32: 1/sqrt(mean(x^2) + eps), saved for backward
    M,  # number of rows
    N,  # row length
    eps,  # added to the mean square
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_N: tl.constexpr,  # power of two ≥ N
):
    # pid → which rows; their masks and offsets
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    row_ok, mask, offs = row_tile(rows, M, cols, col_ok, N)
    # load, upcast
    x = load_f32(x_ptr, offs, mask)
    w = load_f32(w_ptr, cols, col_ok)
    # compute the row statistic and the output
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / N + eps)  # (BLOCK_M,)
    y = x * rstd[:, None] * w[None, :]
    # store
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit
def _norm_bwd_kernel(
    g_ptr,  # (M, N) upstream gradient dL/dy
    x_ptr,  # (M, N) forward input
    w_ptr,  # (N,) scale
    mean_ptr,  # (M,) fp32 row means saved by LayerNorm's forward (read if CENTERED)
    rstd_ptr,  # (M,) fp32 saved by the forward
    dx_ptr,  # (M, N) output dL/dx, dtype of x
    dw_ptr,  # (P, N) fp32 partial dL/dw, one row per program
    db_ptr,  # (P, N) fp32 partial dL/db (written if CENTERED)
    M,  # number of rows
    N,  # row length
    rows_per_program,  # rows each program reduces into its partial rows
    CENTERED: tl.constexpr,  # LayerNorm (x - mean, a bias) instead of RMSNorm
    BLOCK_M: tl.constexpr,  # rows per inner step
    BLOCK_N: tl.constexpr,  # power of two ≥ N
):
    # With xhat = (x - mean) * r (RMSNorm: x * r) the two norms share one backward:
    #   dx = r * (g*w - mean(g*w) - xhat * mean(g*w*xhat))   (RMSNorm: without the mean(g*w) term)
    #   dw += g * xhat,  db += g
    # pid → which chunk of rows
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = load_f32(w_ptr, cols, col_ok)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for r0 in range(row_start, row_end, BLOCK_M):
        # this step's rows: masks and offsets; load, upcast
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok, mask, offs = row_tile(rows, row_end, cols, col_ok, N)
        g = load_f32(g_ptr, offs, mask)
        x = load_f32(x_ptr, offs, mask)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        if CENTERED:
            mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        else:
            xhat = x * rstd[:, None]
        wg = g * w[None, :]
        dx = wg - xhat * (tl.sum(wg * xhat, axis=1) / N)[:, None]
        if CENTERED:
            dx -= (tl.sum(wg, axis=1) / N)[:, None]
            db += tl.sum(g, axis=0)
        dw += tl.sum(g * xhat, axis=0)
        # store dx
        tl.store(dx_ptr + offs, (dx * rstd[:, None]).to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_ptr + pid * N + cols, dw, mask=col_ok)
    if CENTERED:
        tl.store(db_ptr + pid * N + cols, db, mask=col_ok)


def _blocks(M: int, N: int) -> tuple[int, int]:
    if N > MAX_FUSED_N:
        raise ValueError(f"rms_norm (triton): rows of {N} elements exceed the fused kernel's limit {MAX_FUSED_N}")
    block_n = triton.next_power_of_2(N)
    # ~4K elements per program keeps registers in check on GPU and the interpreter's program count low on CPU
    block_m = max(1, min(triton.next_power_of_2(M), 4096 // block_n))
    return block_m, block_n


def _bwd_programs(x: torch.Tensor, M: int, block_m: int) -> int:
    # programs of a backward that sums one partial weight-gradient row per program: 4 per SM on GPU; in the
    # interpreter few programs, each looping over many rows
    programs = torch.cuda.get_device_properties(x.device).multi_processor_count * 4 if x.is_cuda else 4
    return max(1, min(programs, triton.cdiv(M, block_m)))


def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., N) contiguous, weight (N,) → y (..., N) in x's dtype, rstd (...) fp32."""
    N = x.shape[-1]
    M = x.numel() // N
    y = torch.empty_like(x)
    rstd = torch.empty(x.shape[:-1], device=x.device, dtype=torch.float32)
    block_m, block_n = _blocks(M, N)
    grid = (triton.cdiv(M, block_m),)
    _rms_norm_fwd_kernel[grid](x, weight, y, rstd, M, N, eps, BLOCK_M=block_m, BLOCK_N=block_n)
    return y, rstd


def norm_bwd(
    grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, mean: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(dx in x's dtype, dw fp32, db fp32) of RMSNorm (``mean`` None: no db) or LayerNorm; all inputs contiguous."""
    N = x.shape[-1]
    M = x.numel() // N
    block_m, block_n = _blocks(M, N)
    programs = _bwd_programs(x, M, block_m)
    dx = torch.empty_like(x)
    dw = torch.empty((programs, N), device=x.device, dtype=torch.float32)
    db = dw if mean is None else torch.empty_like(dw)
    _norm_bwd_kernel[(programs,)](
        grad_y, x, weight, rstd if mean is None else mean, rstd, dx, dw, db, M, N, triton.cdiv(M, programs),
        CENTERED=mean is not None, BLOCK_M=block_m, BLOCK_N=block_n,
    )  # fmt: skip
    return dx, dw.sum(0), None if mean is None else db.sum(0)


def rms_norm_bwd(
    grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (dx in x's dtype, dw in weight's dtype) of ``rms_norm_fwd``; all inputs contiguous."""
    dx, dw, _ = norm_bwd(grad_y, x, weight, rstd)
    return dx, dw.to(weight.dtype)
