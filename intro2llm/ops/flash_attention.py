"""Scaled dot-product attention with GQA/MQA, causal and sliding-window masks: FlashAttention (Dao et al., 2022;
FlashAttention-2, Dao 2023) — the output of ``softmax(Q Kᵀ · scale + mask) V`` without materializing the
(Tq, Tk) score matrix.

Semantics (every backend):

- ``q`` (B, H, Tq, D); ``k``, ``v`` (B, Hkv, Tk, D) with ``H % Hkv == 0``. Query head ``h`` reads key/value
  head ``h // (H // Hkv)`` (the grouping of Llama's ``repeat_kv``): MHA when Hkv == H, GQA, MQA when Hkv == 1.
- Positions: key ``j`` sits at position ``j``; query ``i`` sits at ``i + Tk - Tq`` (bottom-right alignment: the
  queries are the last Tq tokens of the sequence, as in decoding with a KV cache).
- ``causal=True`` keeps keys with ``k_pos <= q_pos`` (needs Tq <= Tk).
- ``window=w`` keeps keys with ``q_pos - w < k_pos`` — with ``causal`` this is the sliding window
  ``q_pos - w < k_pos <= q_pos`` (each query sees itself and the w - 1 keys before it, Mistral-style). Without
  ``causal`` the window is symmetric, ``|q_pos - k_pos| < w`` (local bidirectional attention).
- ``key_padding_mask`` (B, Tk) bool, True = a real key, False = padding (left-padded batches). A query row
  with no visible key (e.g. a padding query under a causal mask) outputs zeros and gets zero gradients, where
  a naive softmax would produce NaN.
- ``segment_ids`` (B, T) int, Tq == Tk (packed sequences, e.g. SFT packing): query i sees key j only when
  ``segment_ids[b, i] == segment_ids[b, j]`` — a block-diagonal mask, so packed samples never attend to each
  other. Only the reference implements it (auto dispatch takes the reference when segment ids are given; an
  explicit fast backend raises).
- ``scale`` defaults to ``1/sqrt(D)``.

Backends: ``reference`` (the naive formula in fp32, any head dim, also fp64), ``cpp`` (csrc/cpu/flash_attention.cpp),
``cuda`` (csrc/cuda/flash_attention.cu), ``triton`` (kernels/flash_attention.py). Fast paths take head dims
16, 32, 64, 128 and fp32/fp16/bf16; auto dispatch falls back to the reference for anything else.
Not handled: dropout, arbitrary additive masks/ALiBi biases, Tq > Tk with causal or window.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from intro2llm.course import lesson_task
from intro2llm.ops import _dispatch
from intro2llm.ops._checks import check_float, check_same_device

OP = _dispatch.Op("flash_attention", backends=("reference", "triton", "cpp", "cuda"), compiled="flash_attention_fwd")
FAST_HEAD_DIMS = (16, 32, 64, 128)


# ---------------------------------------------------------------------------------------------------------------
# Masks and references
# ---------------------------------------------------------------------------------------------------------------
def attention_mask(
    Tq: int,
    Tk: int,
    causal: bool = True,
    window: int | None = None,
    key_padding_mask: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    segment_ids: torch.Tensor | None = None,
    *,
    rows: tuple[int, int] | None = None,
    cols: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Boolean keep-mask (Tq, Tk), or (B, 1, Tq, Tk) with ``key_padding_mask`` or ``segment_ids``: True where
    query i sees key j. ``rows=(q0, q1)``, ``cols=(k0, k1)``: only that tile of it (the tiled reference's masks)."""
    q0, q1 = rows or (0, Tq)
    k0, k1 = cols or (0, Tk)
    q_pos = torch.arange(q0, q1, device=device)[:, None] + (Tk - Tq)  # (tq, 1) bottom-right alignment
    k_pos = torch.arange(k0, k1, device=device)[None, :]  # (1, tk)
    keep = torch.ones(q1 - q0, k1 - k0, dtype=torch.bool, device=device)
    if causal:
        keep &= k_pos <= q_pos
    if window is not None:
        keep &= k_pos > q_pos - window
        if not causal:
            keep &= k_pos < q_pos + window
    if key_padding_mask is not None:
        keep = keep[None, None] & key_padding_mask.to(torch.bool)[:, None, None, k0:k1]  # (B, 1, tq, tk)
    if segment_ids is not None:  # Tq == Tk: packed samples see only their own segment
        keep = keep & (segment_ids[:, None, q0:q1, None] == segment_ids[:, None, None, k0:k1])  # (B, 1, tq, tk)
    return keep


@lesson_task(2)
def causal_mask(Tq: int, Tk: int | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """(Tq, Tk) bool keep-mask: query i (at position i + Tk - Tq) sees keys j ≤ its position."""
    return attention_mask(Tq, Tq if Tk is None else Tk, causal=True, device=device)


@lesson_task(15)
def sliding_window_mask(
    Tq: int, window: int, Tk: int | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """(Tq, Tk) bool keep-mask of causal attention limited to the last ``window`` keys (itself included).

    Query i sits at position p = i + Tk - Tq (bottom-right alignment: with a KV cache the queries are the last
    Tq positions) and sees keys j with p - window < j <= p. Written out on its own (lesson 15's task);
    ``attention_mask(..., causal=True, window=w)`` gives the same mask."""
    Tk = Tq if Tk is None else Tk
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"sliding_window_mask: window must be an int >= 1, got {window!r}")
    q_pos = torch.arange(Tq, device=device)[:, None] + (Tk - Tq)  # (Tq, 1)
    k_pos = torch.arange(Tk, device=device)[None, :]  # (1, Tk)
    return (k_pos <= q_pos) & (k_pos > q_pos - window)  # (Tq, Tk)


def padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, Tk) 0/1 attention mask (1 = real token) → (B, 1, 1, Tk) bool keep-mask broadcastable to scores."""
    return attention_mask.to(torch.bool)[:, None, None, :]


@lesson_task(15)
def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hkv, T, D) → (B, Hkv·n_rep, T, D): query head h reads kv head h // n_rep (Hugging Face's repeat_kv).
    The references' copy; the fast paths map head indices instead."""
    if n_rep == 1:
        return x
    B, Hkv, T, D = x.shape
    return x[:, :, None].expand(B, Hkv, n_rep, T, D).reshape(B, Hkv * n_rep, T, D)


@lesson_task(2)
def naive_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None = None, scale: float | None = None
) -> torch.Tensor:
    """The formula written out: softmax(Q Kᵀ·scale, masked where ``keep`` is False) V, in fp32 (fp64 for fp64).

    q (B, H, Tq, D), k/v (B, Hkv, Tk, D), keep a bool mask broadcastable to (B, H, Tq, Tk) → (B, H, Tq, D) in
    q's dtype. A query row with no visible key gives zeros (a plain softmax would give NaN). Memory:
    O(B·H·Tq·Tk) — scores and probabilities each read and written once more than the output; that is what flash
    attention removes.
    """
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    H = q.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    kf = repeat_kv(k, H // k.shape[1]).to(acc)  # (B, H, Tk, D)
    vf = repeat_kv(v, H // v.shape[1]).to(acc)  # (B, H, Tk, D)
    s = torch.matmul(q.to(acc), kf.transpose(-1, -2)) * scale  # (B, H, Tq, Tk)  reads Tq·Tk, writes Tq·Tk
    if keep is None:
        return torch.matmul(torch.softmax(s, dim=-1), vf).to(q.dtype)
    s = s.masked_fill(~keep, float("-inf"))
    empty = ~keep.any(dim=-1, keepdim=True)  # rows with no visible key: zeros (and zero gradients), not NaN
    p = torch.softmax(s.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)  # (B, H, Tq, Tk)
    return torch.matmul(p, vf).to(q.dtype)  # (B, H, Tq, D)


def flash_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, window: int | None = None,
    scale: float | None = None, key_padding_mask: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Naive attention (``naive_attention``) under ``attention_mask``: q (B, H, Tq, D), k/v (B, Hkv, Tk, D) →
    (B, H, Tq, D) in q's dtype, with the (B, H, Tq, Tk) scores materialized in fp32."""
    keep = attention_mask(q.shape[2], k.shape[2], causal, window, key_padding_mask, q.device, segment_ids)
    return naive_attention(q, k, v, keep, scale)


def flash_attention_tiled_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, window: int | None = None,
    scale: float | None = None, key_padding_mask: torch.Tensor | None = None, block_q: int = 64, block_k: int = 64,
    segment_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The lesson's algorithm in readable PyTorch: tiles of Q stay put, tiles of K/V stream past, and an online
    softmax (running max m, running sum l) rescales the partial output, so no (Tq, Tk) matrix exists.

    Same arguments and result as ``flash_attention_reference``; the extra memory is O(block_q·block_k) scores
    plus O(Tq·D) accumulators. Tiles that the causal/window mask hides entirely are skipped. Slow (Python loops):
    for teaching and testing, not for training.
    """
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    group = H // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    offset = Tk - Tq  # query i sits at position i + offset
    out = torch.zeros(B, H, Tq, D, dtype=acc, device=q.device)
    for h in range(H):
        hk = h // group  # GQA: index mapping, no copy of K/V
        for q0 in range(0, Tq, block_q):
            q1 = min(q0 + block_q, Tq)
            qi = q[:, h, q0:q1].to(acc) * scale  # (B, bq, D)
            m = torch.full((B, q1 - q0), float("-inf"), dtype=acc, device=q.device)  # running row max
            l_sum = torch.zeros(B, q1 - q0, dtype=acc, device=q.device)  # running row sum of exp(s - m)
            o = torch.zeros(B, q1 - q0, D, dtype=acc, device=q.device)  # running unnormalized output
            lo_pos, hi_pos = q0 + offset, q1 - 1 + offset  # positions of the first and last query of the tile
            for k0 in range(0, Tk, block_k):
                k1 = min(k0 + block_k, Tk)
                # skip tiles that every query of this tile is masked from
                if causal and k0 > hi_pos:
                    break
                if window is not None and k1 - 1 <= lo_pos - window:
                    continue
                if window is not None and not causal and k0 >= hi_pos + window:
                    break
                kj = k[:, hk, k0:k1].to(acc)  # (B, bk, D)
                vj = v[:, hk, k0:k1].to(acc)  # (B, bk, D)
                s = torch.matmul(qi, kj.transpose(-1, -2))  # (B, bq, bk)
                # the mask of this tile: (bq, bk), or (B, 1, bq, bk) with padding/segments -> (B, bq, bk)
                keep = attention_mask(Tq, Tk, causal, window, key_padding_mask, q.device, segment_ids,
                                      rows=(q0, q1), cols=(k0, k1))
                s = s.masked_fill(~keep.reshape(-1, q1 - q0, k1 - k0), float("-inf"))
                m_new = torch.maximum(m, s.amax(dim=-1))  # (B, bq)
                # rows that have seen no key yet keep m = -inf; use 0 there so exp() gives 0, not NaN
                m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
                p = torch.exp(s - m_safe[..., None])  # (B, bq, bk)
                alpha = torch.exp(m - m_safe)  # rescales what was accumulated under the old max
                l_sum = alpha * l_sum + p.sum(dim=-1)
                o = alpha[..., None] * o + torch.matmul(p, vj)
                m = m_new
            # rows with l_sum == 0 saw no key: output 0 instead of 0/0
            out[:, h, q0:q1] = o / torch.where(l_sum == 0, torch.ones_like(l_sum), l_sum)[..., None]
    return out.to(q.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------
def _validate(q, k, v, causal, window, scale, key_padding_mask) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(name, t, OP.name)
        if t.dim() != 4:
            raise ValueError(f"{OP}: {name} must be 4-D (B, H, T, D), got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{OP}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_same_device(OP.name, q=q, k=k, v=v, key_padding_mask=key_padding_mask)
    B, H, Tq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"{OP}: k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    Bk, Hkv, Tk, Dk = k.shape
    if Bk != B:
        raise ValueError(f"{OP}: batch sizes differ: q {tuple(q.shape)} vs k/v {tuple(k.shape)}")
    if Dk != D:
        raise ValueError(f"{OP}: head_dim differs: q {tuple(q.shape)} vs k/v {tuple(k.shape)}")
    if D == 0 or Tk == 0:
        raise ValueError(f"{OP}: head_dim and the key length must be > 0, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(
            f"{OP}: the number of query heads must be a multiple of the key/value heads (H % Hkv == 0), "
            f"got H={H} (q {tuple(q.shape)}) and Hkv={Hkv} (k {tuple(k.shape)})"
        )
    if Tq > Tk and (causal or window is not None):
        raise ValueError(
            f"{OP}: causal/window attention needs Tq <= Tk (queries are the last Tq of Tk positions), "
            f"got Tq={Tq} (q {tuple(q.shape)}) > Tk={Tk} (k {tuple(k.shape)})"
        )
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int):
            raise TypeError(f"{OP}: window must be an int or None, got {type(window).__name__}")
        if window < 1:
            raise ValueError(f"{OP}: window must be >= 1 (keys with q_pos - window < k_pos), got {window}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"{OP}: scale must be a finite float or None, got {scale!r}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            got = key_padding_mask.dtype if isinstance(key_padding_mask, torch.Tensor) else type(key_padding_mask)
            raise TypeError(f"{OP}: key_padding_mask must be a bool tensor (True = keep), got {got}")
        if tuple(key_padding_mask.shape) != (B, Tk):
            raise ValueError(
                f"{OP}: key_padding_mask must have shape (B, Tk) = ({B}, {Tk}), got {tuple(key_padding_mask.shape)}"
            )


def _validate_segments(q, k, segment_ids) -> None:
    B, Tq, Tk = q.shape[0], q.shape[2], k.shape[2]
    if not isinstance(segment_ids, torch.Tensor) or segment_ids.dtype.is_floating_point or \
            segment_ids.dtype == torch.bool:
        got = segment_ids.dtype if isinstance(segment_ids, torch.Tensor) else type(segment_ids).__name__
        raise TypeError(f"{OP}: segment_ids must be an integer tensor, got {got}")
    if Tq != Tk or tuple(segment_ids.shape) != (B, Tk):
        raise ValueError(f"{OP}: segment_ids must have shape (B, T) = ({B}, {Tk}) with Tq == Tk, got "
                         f"{tuple(segment_ids.shape)} for q {tuple(q.shape)}, k {tuple(k.shape)}")
    check_same_device(OP.name, q=q, segment_ids=segment_ids)


def _fast_kernel_problem(q: torch.Tensor, segment_ids: torch.Tensor | None) -> str | None:
    """Why the fast kernels cannot take this call (beyond dtype, which ``OP.dtypes`` covers), or None."""
    if segment_ids is not None:
        return "cannot take segment_ids (packed sequences): only the 'reference' backend implements them"
    if q.shape[-1] not in FAST_HEAD_DIMS:
        return f"supports head_dim in {FAST_HEAD_DIMS}, got head_dim={q.shape[-1]} (q {tuple(q.shape)})"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Kernels: C++/CUDA intro2llm::flash_attention_fwd / _bwd, Triton kernels/flash_attention.py; one backward.
# ---------------------------------------------------------------------------------------------------------------
def _fake_fwd(q, k, v, causal, window, scale, key_padding_mask):
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    return out, q.new_empty(q.shape[:-1], dtype=torch.float32)


def _fake_bwd(grad_out, q, k, v, out, lse, causal, window, scale, key_padding_mask):
    def like(t):
        return torch.empty_like(t, memory_format=torch.contiguous_format)

    return like(q), like(k), like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, window, scale, key_padding_mask = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], key_padding_mask)
    ctx.args = (causal, window, scale)


def _backward(bwd, ctx, grad_out, _grad_lse):
    q, k, v, out, lse, kpm = ctx.saved_tensors
    dq, dk, dv = bwd(grad_out.contiguous(), q, k, v, out, lse, *ctx.args, kpm)
    return dq, dk, dv, None, None, None, None


# Triton: kernels/flash_attention.py launched inside custom ops (triton imported lazily: it is optional).
@torch.library.custom_op("intro2llm::flash_attention_fwd_triton", mutates_args=())
def _flash_attention_fwd_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    window: int,
    scale: float,
    key_padding_mask: Optional[torch.Tensor],  # noqa: UP045 (custom_op's schema inference needs Optional)
) -> tuple[torch.Tensor, torch.Tensor]:
    from intro2llm.kernels.flash_attention import flash_attention_fwd

    return flash_attention_fwd(q.contiguous(), k.contiguous(), v.contiguous(), causal, window, scale, key_padding_mask)


@torch.library.custom_op("intro2llm::flash_attention_bwd_triton", mutates_args=())
def _flash_attention_bwd_triton(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    window: int,
    scale: float,
    key_padding_mask: Optional[torch.Tensor],  # noqa: UP045
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from intro2llm.kernels.flash_attention import flash_attention_bwd

    return flash_attention_bwd(
        grad_out.to(q.dtype).contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous(),
        lse.contiguous(), causal, window, scale, key_padding_mask,
    )  # fmt: skip


_KERNELS = dict(fake_fwd=_fake_fwd, fake_bwd=_fake_bwd, backward=_backward, setup_context=_setup_context)
_dispatch.register_kernels("flash_attention_fwd", "flash_attention_bwd", **_KERNELS)  # C++ (CPU) and CUDA
_dispatch.register_kernels(_flash_attention_fwd_triton, _flash_attention_bwd_triton, **_KERNELS)


# ---------------------------------------------------------------------------------------------------------------
# Public op
# ---------------------------------------------------------------------------------------------------------------
def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    window: int | None = None,
    scale: float | None = None,
    *,
    key_padding_mask: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention q (B, H, Tq, D), k/v (B, Hkv, Tk, D) → (B, H, Tq, D) in q's dtype (see the module docstring)."""
    _validate(q, k, v, causal, window, scale, key_padding_mask)
    if segment_ids is not None:
        _validate_segments(q, k, segment_ids)
    name = OP.resolve(q.device, backend, dtype=q.dtype, problem=_fast_kernel_problem(q, segment_ids))
    if name == "reference":
        return flash_attention_reference(q, k, v, causal, window, scale, key_padding_mask, segment_ids)
    sc = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    args = (bool(causal), -1 if window is None else int(window), sc)
    if name == "triton":
        return _flash_attention_fwd_triton(q, k, v, *args, key_padding_mask)[0]
    # no .contiguous(): the kernels read strided (B, H, T, D) views in place (the CPU forward avoids a copy of
    # transposed projections and KV-cache prefixes) or copy what they cannot
    return torch.ops.intro2llm.flash_attention_fwd(q, k, v, *args, key_padding_mask)[0]
