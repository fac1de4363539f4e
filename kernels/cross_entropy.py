"""Cross-entropy (label smoothing, z-loss, ignore_index) forward and backward in Triton.

Layout: private kernels (``_cross_entropy_fwd_kernel``, ``_cross_entropy_bwd_kernel``) → host launchers
(``cross_entropy_fwd``, ``cross_entropy_bwd``, ``cross_entropy_fwd_bwd_``). The forward gives one program per
row and walks the vocabulary in BLOCK_V tiles with an online log-sum-exp (running max ``m`` and running
``Σ exp(x - m)`` rescaled when the max grows; Milakov & Gimelshein, 2018), so V up to 256k needs no more
registers than one tile and the row is read from memory once. It stores the fp32 loss and ``lse`` per row.
The backward re-reads the logits (a 2-D grid: row × vocabulary tile) and writes
``g·(softmax·(1 + 2z·lse) - (1-ε)·onehot - ε/V)`` in the logits' dtype; its output may be the logits themselves
(``fused_linear_cross_entropy`` overwrites its private chunk of logits). Math in fp32 after every load.

Not handled: targets are assumed range-checked by the caller (the op does it); the kernels still mask the
target load so an unchecked call can never read out of bounds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from intro2llm.course import lesson_task

MAX_BLOCK_V = 4096  # one vocabulary tile: 16 KB of fp32 per program on GPU


@lesson_task(6)  # course mode: blanked with --include-kernels
@triton.jit
def _cross_entropy_fwd_kernel(
    x_ptr,  # (N, V) logits, rows contiguous, any float dtype
    t_ptr,  # (N,) int64 targets
    loss_ptr,  # (N,) fp32 out: per-row loss (0 for ignored rows)
    lse_ptr,  # (N,) fp32 out: logsumexp of the row
    V,  # vocabulary size
    stride_x,  # elements between rows of x
    ignore_index,  # target value that marks a row to skip
    eps,  # label smoothing ε
    z,  # z-loss coefficient
    BLOCK_V: tl.constexpr,  # vocabulary tile (power of two)
):
    # pid → row
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    t = tl.load(t_ptr + row)
    valid = t != ignore_index
    # online log-sum-exp over vocabulary tiles, plus the row sum for label smoothing
    m = float("-inf")
    s = 0.0
    sx = 0.0
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.load(x_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        sx += tl.sum(tl.where(mask, x, 0.0), axis=0)
        m = m_new
    lse = m + tl.log(s)
    # the target logit: masked so that no target value can make this read out of bounds
    in_range = valid & (t >= 0) & (t < V)
    x_t = tl.load(x_row + tl.where(in_range, t, 0), mask=in_range, other=0.0).to(tl.float32)
    loss = (1.0 - eps) * (lse - x_t) + eps * (lse - sx / V) + z * lse * lse
    # store (ignored rows: loss 0)
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))
    tl.store(lse_ptr + row, lse)


@triton.jit
def _cross_entropy_bwd_kernel(
    g_ptr,  # (N,) fp32 upstream gradient per row
    x_ptr, t_ptr,  # logits and targets, as in _cross_entropy_fwd_kernel
    lse_ptr,  # (N,) fp32 from the forward
    dx_ptr,  # (N, V) out: gradient in the logits' dtype; may alias x_ptr
    V, stride_x,  # as in _cross_entropy_fwd_kernel
    stride_dx,  # elements between rows of dx
    ignore_index, eps, z, BLOCK_V: tl.constexpr,  # as in _cross_entropy_fwd_kernel
):
    # pid → (row, vocabulary tile)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = cols < V
    t = tl.load(t_ptr + row)
    valid = t != ignore_index
    # per-row scalars; an ignored row gets g = 0 (and a finite lse), so its gradient is exactly 0
    g = tl.where(valid, tl.load(g_ptr + row), 0.0)
    lse = tl.where(valid, tl.load(lse_ptr + row), 0.0)
    # load, upcast
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    # dL/dx = g * (p * (1 + 2 z lse) - (1-ε) [j == t] - ε/V)
    p = tl.exp(x - lse)
    dx = g * (p * (1.0 + 2.0 * z * lse) - tl.where(cols == t, 1.0 - eps, 0.0) - eps / V)
    dx = tl.where(valid, dx, 0.0)
    # store
    tl.store(dx_ptr + row * stride_dx + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _block_v(V: int) -> int:
    return min(MAX_BLOCK_V, triton.next_power_of_2(V))


def _num_warps(block_v: int) -> int:
    return 8 if block_v >= 2048 else 4


def cross_entropy_fwd(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, label_smoothing: float, z_loss: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (N, V) with unit column stride, targets (N,) int64 → (loss (N,) fp32, lse (N,) fp32)."""
    N, V = logits.shape
    loss = torch.empty(N, device=logits.device, dtype=torch.float32)
    lse = torch.empty(N, device=logits.device, dtype=torch.float32)
    if N == 0:
        return loss, lse
    block_v = _block_v(V)
    _cross_entropy_fwd_kernel[(N,)](
        logits, targets, loss, lse, V, logits.stride(0), ignore_index, label_smoothing, z_loss,
        BLOCK_V=block_v, num_warps=_num_warps(block_v),
    )
    return loss, lse


def cross_entropy_bwd(
    grad_loss: torch.Tensor,
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """grad_loss (N,) fp32, logits (N, V) → grad_logits (N, V) in logits' dtype (into ``out``; may be logits)."""
    N, V = logits.shape
    dx = torch.empty_like(logits) if out is None else out
    if N == 0:
        return dx
    block_v = _block_v(V)
    grid = (N, triton.cdiv(V, block_v))
    _cross_entropy_bwd_kernel[grid](
        grad_loss, logits, targets, lse, dx, V, logits.stride(0), dx.stride(0), ignore_index, label_smoothing, z_loss,
        BLOCK_V=block_v, num_warps=_num_warps(block_v),
    )
    return dx


def cross_entropy_fwd_bwd_(
    logits: torch.Tensor, targets: torch.Tensor, grad_scale: float, ignore_index: int, label_smoothing: float,
    z_loss: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (loss, lse) like ``cross_entropy_fwd``; ``logits`` is overwritten by ``grad_scale·dloss_i/dlogits``."""
    loss, lse = cross_entropy_fwd(logits, targets, ignore_index, label_smoothing, z_loss)
    g = torch.full_like(loss, grad_scale)
    cross_entropy_bwd(g, logits, targets, lse, ignore_index, label_smoothing, z_loss, out=logits)
    return loss, lse
