"""NF4 dequantize-matmul in Triton: y = x @ dequant(W)ᵀ (+ bias) and dx = dy @ dequant(W), W never dequantized whole.

Layout: private kernels (``_nf4_matmul_fwd_kernel``, ``_nf4_matmul_bwd_kernel``) → host launchers
(``nf4_matmul_fwd``, ``nf4_matmul_bwd``). W (N, K) is in bitsandbytes' NF4 format (intro2llm/ops/nf4.py): element
e = n·K + k has its 4-bit code in byte e // 2 (high nibble for even e) and its scale absmax[e // BLOCKSIZE]. A
program decodes one (BLOCK_N, BLOCK_K) tile of W in registers — byte load, nibble select, a 16-entry table load,
times the scale — and feeds it to ``tl.dot``. Flat indexing makes any K work (blocks may straddle rows).

Reads N·K/2 bytes of codes + N·K/BLOCKSIZE scales instead of dequantize + GEMM's N·K·2 bytes written and read
back (bf16): the 1–16-token decode case is memory-bound, and this is its argument.
fp32 inputs multiply in fp32 (``input_precision="ieee"``); fp16/bf16 inputs cast the tile to their dtype (tensor
cores), accumulation in fp32 either way. Not tuned here (no GPU on the development machine).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from intro2llm.course import lesson_task


@triton.jit
def _decode_tile(
    packed_ptr,  # (ceil(N*K/2),) uint8 codes, high nibble first
    absmax_ptr,  # (ceil(N*K/BLOCKSIZE),) fp32 scales
    code_ptr,  # (16,) fp32 NF4 values
    rows,  # (R,) row indices of W
    cols,  # (C,) column indices of W
    N,
    K,
    BLOCKSIZE: tl.constexpr,
):
    # flat element index (int64: N*K may pass 2^31), masked outside W
    e = rows[:, None].to(tl.int64) * K + cols[None, :]
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    # byte → nibble (even element: high) → code value → times the block's scale
    byte = tl.load(packed_ptr + e // 2, mask=mask, other=0).to(tl.int32)
    code = tl.where(e % 2 == 0, byte >> 4, byte & 15)
    value = tl.load(code_ptr + code)
    scale = tl.load(absmax_ptr + e // BLOCKSIZE, mask=mask, other=0.0)
    return value * scale  # (R, C) fp32, 0 outside W


@triton.jit
def _load_tile(ptr, rows, cols, R, C):
    # (len(rows), len(cols)) tile of a row-major (R, C) matrix, 0 outside it, upcast right away (the CPU interpreter
    # computes bf16 wrongly)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    return tl.load(ptr + rows[:, None].to(tl.int64) * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_tile(ptr, rows, cols, R, C, tile):
    # writes ``tile`` at (rows, cols) of a row-major (R, C) matrix in its dtype, skipping what falls outside it
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    tl.store(ptr + rows[:, None].to(tl.int64) * C + cols[None, :], tile.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dot_add(acc, a, b, out_ptr, DOT_FP32: tl.constexpr):
    # acc + a @ b: fp32 inputs multiply as IEEE fp32 (no TF32), others in the output's dtype; fp32 accumulation
    if DOT_FP32:
        acc += tl.dot(a, b, input_precision="ieee")
    else:
        acc += tl.dot(a.to(out_ptr.dtype.element_ty), b.to(out_ptr.dtype.element_ty))
    return acc


@lesson_task(14)  # course mode: blanked with --include-kernels
@triton.jit
def _nf4_matmul_fwd_kernel(
    x_ptr,  # (M, K) activations, contiguous
    packed_ptr,  # W's NF4 codes
    absmax_ptr,  # W's fp32 scales
    code_ptr,  # (16,) fp32 NF4 values
    bias_ptr,  # (N,) or a dummy when HAS_BIAS is False
    y_ptr,  # (M, N) output, dtype of x
    M,  # tokens
    N,  # output features (rows of W)
    K,  # input features (columns of W)
    BLOCKSIZE: tl.constexpr,  # elements per absmax
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,  # x is fp32: multiply in fp32 (no TF32)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # pid → which (BLOCK_M, BLOCK_N) tile of y
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    # offsets
    rows_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        # load the x tile, decode the W tile in registers, multiply
        x = _load_tile(x_ptr, rows_m, cols, M, K)  # (BLOCK_M, BLOCK_K)
        w = _decode_tile(packed_ptr, absmax_ptr, code_ptr, rows_n, cols, N, K, BLOCKSIZE)  # (BLOCK_N, BLOCK_K)
        acc = _dot_add(acc, x, tl.trans(w), y_ptr, DOT_FP32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows_n, mask=rows_n < N, other=0.0).to(tl.float32)[None, :]
    _store_tile(y_ptr, rows_m, rows_n, M, N, acc)


@triton.jit
def _nf4_matmul_bwd_kernel(
    g_ptr,  # (M, N) upstream gradient, contiguous
    packed_ptr, absmax_ptr, code_ptr,  # W, as in _nf4_matmul_fwd_kernel
    dx_ptr,  # (M, K) output, dtype of g
    M, N, K,  # tokens, rows of W, columns of W
    BLOCKSIZE: tl.constexpr, DOT_FP32: tl.constexpr,  # as in _nf4_matmul_fwd_kernel
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # pid → which (BLOCK_M, BLOCK_K) tile of dx
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows_n = n0 + tl.arange(0, BLOCK_N)
        g = _load_tile(g_ptr, rows_m, rows_n, M, N)  # (BLOCK_M, BLOCK_N)
        w = _decode_tile(packed_ptr, absmax_ptr, code_ptr, rows_n, cols, N, K, BLOCKSIZE)  # (BLOCK_N, BLOCK_K)
        acc = _dot_add(acc, g, w, dx_ptr, DOT_FP32)
    _store_tile(dx_ptr, rows_m, cols, M, K, acc)


_CODES: dict[torch.device, torch.Tensor] = {}


def _code(device: torch.device) -> torch.Tensor:
    if device not in _CODES:
        from intro2llm.ops.nf4 import nf4_code

        _CODES[device] = nf4_code(device)
    return _CODES[device]


def _block_m(M: int) -> int:
    return 16 if M <= 16 else (32 if M <= 32 else 64)


def nf4_matmul_fwd(
    x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, N: int, blocksize: int, bias: torch.Tensor | None
) -> torch.Tensor:
    """x (M, K) contiguous, W (N, K) as packed codes + fp32 absmax → y (M, N) = x @ Wᵀ (+ bias) in x's dtype."""
    M, K = x.shape
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0:
        return y
    block_m, block_n, block_k = _block_m(M), 32, 128
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _nf4_matmul_fwd_kernel[grid](
        x, packed, absmax, _code(x.device), bias if bias is not None else y, y, M, N, K,
        BLOCKSIZE=blocksize, HAS_BIAS=bias is not None, DOT_FP32=x.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return y


def nf4_matmul_bwd(
    grad_y: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, K: int, blocksize: int
) -> torch.Tensor:
    """grad_y (M, N) contiguous → dx (M, K) = grad_y @ dequant(W) in grad_y's dtype."""
    M, N = grad_y.shape
    dx = torch.empty((M, K), device=grad_y.device, dtype=grad_y.dtype)
    if M == 0:
        return dx
    block_m, block_n, block_k = _block_m(M), 64, 64
    grid = (triton.cdiv(M, block_m), triton.cdiv(K, block_k))
    _nf4_matmul_bwd_kernel[grid](
        grad_y, packed, absmax, _code(grad_y.device), dx, M, N, K,
        BLOCKSIZE=blocksize, DOT_FP32=grad_y.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return dx
