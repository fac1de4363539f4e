"""Rotary position embedding (split-half / Hugging Face ``rotate_half``) in Triton: q and k in one launch.

Layout: private kernel ``_rope_kernel`` → host launcher ``rope_fwd`` (also the backward: ``backward=True``
applies the transposed rotation). One program owns one (batch, position) row: it loads the cos/sin row once
and rotates every query head and every key head of that row (a (heads, D/2) tile per tensor), so the table is
read B·T times instead of B·(H+Hkv)·T. Inputs are read through their strides (a (B, T, H, D).transpose(1, 2)
view costs no copy; the last dim must have stride 1, else it is copied); outputs are contiguous.
Math in fp32, one rounding at the store.

    forward   out1 = x1*c1 - x2*s1,   out2 = x2*c2 + x1*s2     (x = (x1, x2), halves of D)
    backward  dx1  = g1*c1 + g2*s2,   dx2  = g2*c2 - g1*s1     (the same kernel with s1, s2 -> -s2, -s1)

Not handled: more than 256 heads per tensor or D > 1024 (register tiles; raise), interleaved (GPT-J) pairs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from intro2llm.course import lesson_task

MAX_HEADS = 256
MAX_HEAD_DIM = 1024


@triton.jit
def _rotate_heads(
    x_ptr, o_ptr,  # (B, NH, T, D) input with unit stride on D; contiguous output
    b, t, sxb, sxh, sxt,  # the (batch, position) to rotate; x's strides over batch, heads, positions
    NH, T,  # heads, sequence length
    c1, c2, sa, sb,  # (BLOCK_D,) fp32 cos of both halves and the signed sines
    d, d_ok,  # (BLOCK_D,) offsets in a half row and their mask
    HALF: tl.constexpr, BLOCK: tl.constexpr,  # D // 2; power of two >= NH
):
    # load the (BLOCK, BLOCK_D) halves of every head at (b, t), upcast, rotate, store in o's dtype
    h = tl.arange(0, BLOCK)
    mask = (h < NH)[:, None] & d_ok[None, :]
    src = b * sxb + t * sxt + h[:, None].to(tl.int64) * sxh + d[None, :]
    x1 = tl.load(x_ptr + src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + src + HALF, mask=mask, other=0.0).to(tl.float32)
    o1 = x1 * c1[None, :] - x2 * sa[None, :]
    o2 = x2 * c2[None, :] + x1 * sb[None, :]
    dst = ((b * NH + h[:, None]) * T + t) * (2 * HALF) + d[None, :]
    tl.store(o_ptr + dst, o1.to(o_ptr.dtype.element_ty), mask=mask)
    tl.store(o_ptr + dst + HALF, o2.to(o_ptr.dtype.element_ty), mask=mask)


@lesson_task(1)  # course mode: blanked with --include-kernels
@triton.jit
def _rope_kernel(
    q_ptr,  # (B, H, T, D) input, any strides with unit stride on D
    k_ptr,  # (B, Hkv, T, D) input
    qo_ptr,  # (B, H, T, D) contiguous output, dtype of q
    ko_ptr,  # (B, Hkv, T, D) contiguous output
    cos_ptr,  # (Bc, T, D) contiguous table, Bc in {1, B}
    sin_ptr,  # (Bc, T, D) contiguous table
    sqb,  # q stride over batch (elements)
    sqh,  # q stride over heads
    sqt,  # q stride over positions
    skb,  # k stride over batch
    skh,  # k stride over heads
    skt,  # k stride over positions
    T,  # sequence length
    H,  # query heads
    HKV,  # key heads
    table_sb,  # batch stride of cos/sin: T*D, or 0 for a table shared by the batch
    HALF: tl.constexpr,  # D // 2
    BLOCK_D: tl.constexpr,  # power of two >= HALF
    BLOCK_H: tl.constexpr,  # power of two >= H
    BLOCK_HKV: tl.constexpr,  # power of two >= HKV
    BACKWARD: tl.constexpr,  # apply the transposed rotation (gradient)
):
    # pid → (b, t)
    pid = tl.program_id(0)
    b = (pid // T).to(tl.int64)
    t = (pid % T).to(tl.int64)
    D = 2 * HALF
    # offsets and mask of the half row
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HALF
    # load the table row, upcast
    trow = b * table_sb + t * D
    c1 = tl.load(cos_ptr + trow + d, mask=d_ok, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + trow + HALF + d, mask=d_ok, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + trow + d, mask=d_ok, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + trow + HALF + d, mask=d_ok, other=0.0).to(tl.float32)
    if BACKWARD:
        sa = -s2
        sb = -s1
    else:
        sa = s1
        sb = s2

    # query heads, then key heads (their own strides and head count): rotate the (heads, BLOCK_D) halves
    _rotate_heads(q_ptr, qo_ptr, b, t, sqb, sqh, sqt, H, T, c1, c2, sa, sb, d, d_ok, HALF, BLOCK_H)
    _rotate_heads(k_ptr, ko_ptr, b, t, skb, skh, skt, HKV, T, c1, c2, sa, sb, d, d_ok, HALF, BLOCK_HKV)


def rope_fwd(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, H, T, D), k (B, Hkv, T, D), cos/sin (1|B, T, D) → rotated (q, k), contiguous, in q's dtype.

    ``backward=True`` applies the transposed rotation (the gradient of the forward).
    """
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    if H > MAX_HEADS or Hkv > MAX_HEADS or D > MAX_HEAD_DIM:
        raise ValueError(
            f"apply_rope (triton): at most {MAX_HEADS} heads and head_dim {MAX_HEAD_DIM}, got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}"
        )
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    cos = cos.contiguous()
    sin = sin.contiguous()
    q_out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    k_out = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    if B * T == 0 or D == 0:
        return q_out, k_out
    table_sb = 0 if cos.shape[0] == 1 else T * D
    _rope_kernel[(B * T,)](
        q, k, q_out, k_out, cos, sin,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        T, H, Hkv, table_sb,
        HALF=D // 2,
        BLOCK_D=triton.next_power_of_2(D // 2),
        BLOCK_H=triton.next_power_of_2(max(H, 1)),
        BLOCK_HKV=triton.next_power_of_2(max(Hkv, 1)),
        BACKWARD=backward,
    )  # fmt: skip
    return q_out, k_out
