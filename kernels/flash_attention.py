"""Flash attention forward and backward in Triton, FlashAttention-2 structure (Dao, 2023; after the Triton tutorial
``06-fused-attention.py``), with GQA/MQA, causal and sliding-window masks and an optional key padding mask.

Layout: kernels ``_flash_attention_fwd_kernel`` (a program owns BLOCK_M query rows of one head, keeps them in
registers and streams K/V blocks past them with an online softmax; saves the log-sum-exp), ``_bwd_preprocess_kernel``
(Δ = rowsum(O∘dO)), ``_bwd_dkdv_kernel`` (a program owns BLOCK_N keys of one kv head and loops over the query
heads of its group and the query blocks that see those keys — dK/dV summed over the group without atomics) and
``_bwd_dq_kernel`` (dQ per query block) → host launchers ``flash_attention_fwd`` / ``flash_attention_bwd``.

Positions: key j at j, query i at i + Tk − Tq. Blocks the causal/window mask hides entirely are skipped by
the loop bounds; the mask is applied element-wise inside the rest. Plain pointer arithmetic, int64 offsets,
loads upcast to fp32 right away (the CPU interpreter mishandles bf16); the matmuls run in the input dtype
(fp16/bf16 tensor cores on GPU, fp32 as IEEE fp32) with fp32 accumulation.
Not handled: head dims other than 16/32/64/128, dropout, additive biases, non-contiguous strides (the
launchers make inputs contiguous).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from intro2llm.course import lesson_task


@triton.jit
def _keep_mask(
    q_pos,  # (BLOCK_M,) absolute query positions
    k_pos,  # (BLOCK_N,) absolute key positions
    kpm_ptr,  # (B, Tk) int8 key padding mask row base for this batch (used if HAS_KPM)
    Tk,  # key length
    WINDOW,  # window size (used if HAS_WINDOW)
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_KPM: tl.constexpr,
):
    keep = (k_pos[None, :] < Tk) & (q_pos[:, None] >= -(1 << 30))  # (BLOCK_M, BLOCK_N)
    if CAUSAL:
        keep = keep & (k_pos[None, :] <= q_pos[:, None])
    if HAS_WINDOW:
        keep = keep & (k_pos[None, :] > q_pos[:, None] - WINDOW)
        if not CAUSAL:
            keep = keep & (k_pos[None, :] < q_pos[:, None] + WINDOW)
    if HAS_KPM:
        kp = tl.load(kpm_ptr + k_pos, mask=k_pos < Tk, other=0)
        keep = keep & (kp[None, :] != 0)
    return keep


@triton.jit
def _key_range(
    pid_m,  # query block index
    offset,  # Tk - Tq: query i sits at position i + offset
    Tk,  # key length
    WINDOW,  # window size (used if HAS_WINDOW)
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # [lo, hi): the keys the mask leaves visible to query block pid_m, lo a multiple of BLOCK_N (whole hidden
    # blocks are never loaded)
    lo = 0
    hi = Tk
    if CAUSAL:
        hi = tl.minimum(Tk, (pid_m + 1) * BLOCK_M + offset)
    elif HAS_WINDOW:
        hi = tl.minimum(Tk, (pid_m + 1) * BLOCK_M - 1 + offset + WINDOW)
    if HAS_WINDOW:
        lo = tl.maximum(0, pid_m * BLOCK_M + offset - WINDOW + 1)
        lo = (lo // BLOCK_N) * BLOCK_N
    return lo, hi


@triton.jit
def _row_offsets(base, pos, offs_d, HEAD_DIM: tl.constexpr):
    # int64 element offsets (len(pos), HEAD_DIM) of rows ``pos`` of the head whose first element is at ``base``
    return base + pos[:, None].to(tl.int64) * HEAD_DIM + offs_d[None, :]


@triton.jit
def _load_rows(ptr, offs, ok):
    # the rows at ``offs`` where ``ok`` (one flag per row) upcast to fp32, zeros elsewhere
    return tl.load(ptr + offs, mask=ok[:, None], other=0.0).to(tl.float32)


@triton.jit
def _load_lse_delta(lse_ptr, delta_ptr, offs, ok):
    # the forward's log-sum-exp and Δ = rowsum(O ∘ dO) of rows ``offs``; rows past Tq or that saw no key get
    # lse = +inf, so that their recomputed P is 0
    lse = tl.load(lse_ptr + offs, mask=ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    return lse, tl.load(delta_ptr + offs, mask=ok, other=0.0)


@triton.jit
def _bwd_tile(q_dot, k_dot, v_dot, do_dot, lse, delta, q_pos, k_pos, kpm_row, Tk, scale, WINDOW,
              CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr, PRECISION: tl.constexpr):
    # one (query rows x keys) tile of the backward: P recomputed from the saved lse, dP = dO Vᵀ,
    # dS = P ∘ (dP − Δ) · scale; returns (P, dS)
    s = tl.dot(q_dot, tl.trans(k_dot), input_precision=PRECISION) * scale  # (BLOCK_M, BLOCK_N)
    keep = _keep_mask(q_pos, k_pos, kpm_row, Tk, WINDOW, CAUSAL, HAS_WINDOW, HAS_KPM)
    p = tl.where(keep, tl.exp(s - lse[:, None]), 0.0)
    dp = tl.dot(do_dot, tl.trans(v_dot), input_precision=PRECISION)
    return p, p * (dp - delta[:, None]) * scale


@lesson_task(15)  # course mode: blanked with --include-kernels
@triton.jit
def _flash_attention_fwd_kernel(
    q_ptr,  # (B, H, Tq, D) contiguous
    k_ptr,  # (B, Hkv, Tk, D) contiguous
    v_ptr,  # (B, Hkv, Tk, D) contiguous
    kpm_ptr,  # (B, Tk) int8, 1 = keep (dummy when not HAS_KPM)
    o_ptr,  # (B, H, Tq, D) output, dtype of q
    lse_ptr,  # (B, H, Tq) fp32 log-sum-exp of each score row (−inf for a row that sees no key)
    H,  # query heads
    GROUP,  # query heads per kv head (H // Hkv)
    Tq,  # query length
    Tk,  # key length
    scale,  # softmax scale
    WINDOW,  # window size (used if HAS_WINDOW)
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # keys per inner step
    PRECISION: tl.constexpr,  # tl.dot input_precision ("ieee" keeps fp32 matmuls exact-ish)
):
    # pid → (query block, batch·head); GQA: the kv head is an index mapping, no copy
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    Hkv = H // GROUP
    offset = Tk - Tq
    # offsets (int64 bases: B·H·T·D can pass 2^31)
    q_base = pid_bh.to(tl.int64) * Tq * HEAD_DIM
    kv_base = (b * Hkv + hk).to(tl.int64) * Tk * HEAD_DIM
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < Tq
    q_pos = offs_m + offset
    # load the resident Q block, upcast
    q_offs = _row_offsets(q_base, offs_m, offs_d, HEAD_DIM)
    q = _load_rows(q_ptr, q_offs, row_ok)  # (BLOCK_M, D)
    dt = q_ptr.dtype.element_ty
    q_dot = q.to(dt)  # matmul operand in the input dtype (tensor cores on GPU); the fp32 copy dies here
    # the key range the mask leaves visible to this block
    lo, hi = _key_range(pid_m, offset, Tk, WINDOW, CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)  # running row max
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)  # running row sum
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)  # running unnormalized output
    kpm_row = kpm_ptr + b.to(tl.int64) * Tk
    for start_n in range(lo, hi, BLOCK_N):
        k_pos = start_n + offs_n
        kv_offs = _row_offsets(kv_base, k_pos, offs_d, HEAD_DIM)
        k = _load_rows(k_ptr, kv_offs, k_pos < Tk)  # (BLOCK_N, D)
        v = _load_rows(v_ptr, kv_offs, k_pos < Tk)
        # scores, masked
        s = tl.dot(q_dot, tl.trans(k.to(dt)), input_precision=PRECISION) * scale  # (BLOCK_M, BLOCK_N)
        keep = _keep_mask(q_pos, k_pos, kpm_row, Tk, WINDOW, CAUSAL, HAS_WINDOW, HAS_KPM)
        s = tl.where(keep, s, float("-inf"))
        # online softmax: new max, rescale what was accumulated under the old one
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(dt), v.to(dt), input_precision=PRECISION)
        m_i = m_new
    # normalize and store; a row that saw no key gets 0 and lse = −inf
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.log(tl.where(seen, l_i, 1.0)), float("-inf"))
    tl.store(o_ptr + q_offs, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])
    tl.store(lse_ptr + pid_bh.to(tl.int64) * Tq + offs_m, lse, mask=row_ok)


@triton.jit
def _bwd_preprocess_kernel(
    o_ptr,  # (B·H·Tq, D) forward output
    do_ptr,  # (B·H·Tq, D) upstream gradient
    delta_ptr,  # (B·H·Tq,) fp32 output: rowsum(O ∘ dO)
    n_rows,  # B·H·Tq
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = rows < n_rows
    offs = _row_offsets(0, rows, offs_d, HEAD_DIM)
    tl.store(delta_ptr + rows, tl.sum(_load_rows(o_ptr, offs, ok) * _load_rows(do_ptr, offs, ok), axis=1), mask=ok)


@triton.jit
def _bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, kpm_ptr,  # as in _flash_attention_fwd_kernel
    do_ptr,  # (B, H, Tq, D) upstream gradient
    lse_ptr,  # (B, H, Tq) fp32 from the forward
    delta_ptr,  # (B, H, Tq) fp32 rowsum(O ∘ dO)
    dk_ptr,  # (B, Hkv, Tk, D) output, dtype of k
    dv_ptr,  # (B, Hkv, Tk, D) output, dtype of v
    H, GROUP, Tq, Tk, scale, WINDOW,  # as in _flash_attention_fwd_kernel
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows per inner step
    BLOCK_N: tl.constexpr,  # keys per program
    PRECISION: tl.constexpr,
):
    # pid → (key block, batch·kv head)
    pid_n = tl.program_id(0)
    pid_bhk = tl.program_id(1)
    Hkv = H // GROUP
    b = pid_bhk // Hkv
    hk = pid_bhk % Hkv
    offset = Tk - Tq
    dt = q_ptr.dtype.element_ty
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_mb = tl.arange(0, BLOCK_M)
    kv_offs = _row_offsets(pid_bhk.to(tl.int64) * Tk * HEAD_DIM, offs_n, offs_d, HEAD_DIM)
    key_ok = offs_n < Tk
    # the resident K/V block (BLOCK_N, D), as matmul operands
    k_dot = _load_rows(k_ptr, kv_offs, key_ok).to(dt)
    v_dot = _load_rows(v_ptr, kv_offs, key_ok).to(dt)
    dk = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    # query rows that see at least one of these keys
    q_lo = 0
    q_hi = Tq
    if CAUSAL:
        q_lo = tl.maximum(0, start_n - offset)
    elif HAS_WINDOW:
        q_lo = tl.maximum(0, start_n - offset - WINDOW + 1)
    if HAS_WINDOW:
        q_hi = tl.minimum(Tq, start_n + BLOCK_N - 1 - offset + WINDOW)
    q_lo = (q_lo // BLOCK_M) * BLOCK_M
    kpm_row = kpm_ptr + b.to(tl.int64) * Tk
    for g in range(0, GROUP):
        bh = b * H + hk * GROUP + g
        q_base = bh.to(tl.int64) * Tq * HEAD_DIM
        r_base = bh.to(tl.int64) * Tq
        for start_m in range(q_lo, q_hi, BLOCK_M):
            offs_m = start_m + offs_mb
            row_ok = offs_m < Tq
            q_offs = _row_offsets(q_base, offs_m, offs_d, HEAD_DIM)
            q_dot = _load_rows(q_ptr, q_offs, row_ok).to(dt)  # (BLOCK_M, D)
            do_dot = _load_rows(do_ptr, q_offs, row_ok).to(dt)
            lse, delta = _load_lse_delta(lse_ptr, delta_ptr, r_base + offs_m, row_ok)
            p, ds = _bwd_tile(q_dot, k_dot, v_dot, do_dot, lse, delta, offs_m + offset, offs_n, kpm_row, Tk, scale,
                              WINDOW, CAUSAL, HAS_WINDOW, HAS_KPM, PRECISION)
            # dV += Pᵀ dO;  dK += dSᵀ Q
            dv += tl.dot(tl.trans(p.to(dt)), do_dot, input_precision=PRECISION)
            dk += tl.dot(tl.trans(ds.to(dt)), q_dot, input_precision=PRECISION)
    tl.store(dk_ptr + kv_offs, dk.to(dk_ptr.dtype.element_ty), mask=key_ok[:, None])
    tl.store(dv_ptr + kv_offs, dv.to(dv_ptr.dtype.element_ty), mask=key_ok[:, None])


@triton.jit
def _bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, kpm_ptr, do_ptr, lse_ptr, delta_ptr,  # as in _bwd_dkdv_kernel
    dq_ptr,  # (B, H, Tq, D) output, dtype of q
    H, GROUP, Tq, Tk, scale, WINDOW,  # as in _flash_attention_fwd_kernel
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # keys per inner step
    PRECISION: tl.constexpr,
):
    # pid → (query block, batch·head)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    Hkv = H // GROUP
    offset = Tk - Tq
    dt = q_ptr.dtype.element_ty
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_nb = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < Tq
    q_offs = _row_offsets(pid_bh.to(tl.int64) * Tq * HEAD_DIM, offs_m, offs_d, HEAD_DIM)
    kv_base = (b * Hkv + h // GROUP).to(tl.int64) * Tk * HEAD_DIM
    q_dot = _load_rows(q_ptr, q_offs, row_ok).to(dt)
    do_dot = _load_rows(do_ptr, q_offs, row_ok).to(dt)
    lse, delta = _load_lse_delta(lse_ptr, delta_ptr, pid_bh.to(tl.int64) * Tq + offs_m, row_ok)
    dq = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    lo, hi = _key_range(pid_m, offset, Tk, WINDOW, CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
    kpm_row = kpm_ptr + b.to(tl.int64) * Tk
    for start_n in range(lo, hi, BLOCK_N):
        k_pos = start_n + offs_nb
        kv_offs = _row_offsets(kv_base, k_pos, offs_d, HEAD_DIM)
        k_dot = _load_rows(k_ptr, kv_offs, k_pos < Tk).to(dt)
        v_dot = _load_rows(v_ptr, kv_offs, k_pos < Tk).to(dt)
        _, ds = _bwd_tile(q_dot, k_dot, v_dot, do_dot, lse, delta, offs_m + offset, k_pos, kpm_row, Tk, scale, WINDOW,
                          CAUSAL, HAS_WINDOW, HAS_KPM, PRECISION)
        dq += tl.dot(ds.to(dt), k_dot, input_precision=PRECISION)
    tl.store(dq_ptr + q_offs, dq.to(dq_ptr.dtype.element_ty), mask=row_ok[:, None])


# ---------------------------------------------------------------------------------------------------------------
# Host launchers
# ---------------------------------------------------------------------------------------------------------------
def _blocks(Tq: int, Tk: int, D: int, on_gpu: bool, backward: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for these sizes."""
    if not on_gpu:
        # interpreter: blocks near the problem size (each program is slow to launch), at least 16 for tl.dot
        bm = max(16, min(64, triton.next_power_of_2(Tq)))
        bn = max(16, min(64, triton.next_power_of_2(Tk)))
        return bm, bn, 4, 1
    if backward:
        return (64, 64, 4, 2) if D <= 64 else (32, 64, 4, 2)
    return (128, 64, 8, 3) if D >= 64 else (128, 64, 4, 3)


def _kpm_arg(key_padding_mask: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    if key_padding_mask is None:
        return torch.empty(1, dtype=torch.int8, device=q.device)
    return key_padding_mask.to(device=q.device, dtype=torch.int8).contiguous()


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def flash_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, window: int, scale: float,
    key_padding_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, H, Tq, D), k/v (B, Hkv, Tk, D) contiguous → out (B, H, Tq, D), lse (B, H, Tq) fp32. window <= 0: none."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty((B, H, Tq), device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        lse.fill_(float("-inf"))
        return out, lse
    bm, bn, warps, stages = _blocks(Tq, Tk, D, q.is_cuda, backward=False)
    grid = (triton.cdiv(Tq, bm), B * H)
    _flash_attention_fwd_kernel[grid](
        q, k, v, _kpm_arg(key_padding_mask, q), out, lse,
        H, H // Hkv, Tq, Tk, float(scale), max(int(window), 1),
        CAUSAL=bool(causal), HAS_WINDOW=window > 0, HAS_KPM=key_padding_mask is not None,
        HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, PRECISION=_precision(q.dtype),
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out, lse


def flash_attention_bwd(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    causal: bool, window: int, scale: float, key_padding_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of ``flash_attention_fwd``; all inputs contiguous, grad_out in q's dtype."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if q.numel() == 0:
        return dq, dk.zero_(), dv.zero_()
    delta = torch.empty((B, H, Tq), device=q.device, dtype=torch.float32)
    n_rows = B * H * Tq
    pre_block = 64 if q.is_cuda else max(16, min(256, triton.next_power_of_2(n_rows)))
    grid = (triton.cdiv(n_rows, pre_block),)
    _bwd_preprocess_kernel[grid](out, grad_out, delta, n_rows, HEAD_DIM=D, BLOCK_M=pre_block)
    bm, bn, warps, stages = _blocks(Tq, Tk, D, q.is_cuda, backward=True)
    kpm = _kpm_arg(key_padding_mask, q)
    common = dict(
        CAUSAL=bool(causal), HAS_WINDOW=window > 0, HAS_KPM=key_padding_mask is not None, HEAD_DIM=D,
        BLOCK_M=bm, BLOCK_N=bn, PRECISION=_precision(q.dtype), num_warps=warps, num_stages=stages,
    )  # fmt: skip
    args = (H, H // Hkv, Tq, Tk, float(scale), max(int(window), 1))
    _bwd_dkdv_kernel[(triton.cdiv(Tk, bn), B * Hkv)](q, k, v, kpm, grad_out, lse, delta, dk, dv, *args, **common)
    _bwd_dq_kernel[(triton.cdiv(Tq, bm), B * H)](q, k, v, kpm, grad_out, lse, delta, dq, *args, **common)
    return dq, dk, dv
