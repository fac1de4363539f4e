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

from intro2llm.ops import _dispatch
from intro2llm.ops._checks import FLOAT_DTYPES, check_float, check_same_device

OP = "flash_attention"
BACKENDS = ("reference", "triton", "cpp", "cuda")
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
) -> torch.Tensor:
    """Boolean keep-mask (Tq, Tk), or (B, 1, Tq, Tk) with ``key_padding_mask`` or ``segment_ids``: True where
    query i sees key j."""
    q_pos = torch.arange(Tq, device=device)[:, None] + (Tk - Tq)  # (Tq, 1) bottom-right alignment
    k_pos = torch.arange(Tk, device=device)[None, :]  # (1, Tk)
    keep = torch.ones(Tq, Tk, dtype=torch.bool, device=device)
    if causal:
        keep &= k_pos <= q_pos
    if window is not None:
        keep &= k_pos > q_pos - window
        if not causal:
            keep &= k_pos < q_pos + window
    if key_padding_mask is not None:
        keep = keep[None, None] & key_padding_mask.to(torch.bool)[:, None, None, :]  # (B, 1, Tq, Tk)
    if segment_ids is not None:
        same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]  # (B, 1, T, T)
        keep = keep & same
    return keep


def _expand_kv(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, Hkv, T, D) → (B, H, T, D): query head h reads kv head h // (H // Hkv). The reference's copy; fast
    paths map head indices instead."""
    group = n_heads // t.shape[1]
    return t if group == 1 else t.repeat_interleave(group, dim=1)


def flash_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    window: int | None = None,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Naive attention: softmax(Q Kᵀ·scale + mask) V with the (B, H, Tq, Tk) scores materialized, in fp32.

    q (B, H, Tq, D), k/v (B, Hkv, Tk, D) → (B, H, Tq, D) in q's dtype. Memory: O(B·H·Tq·Tk) — scores and
    probabilities each read and written once more than the output; that is what flash attention removes.
    """
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    H, Tq, D = q.shape[1], q.shape[2], q.shape[3]
    Tk = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    kf = _expand_kv(k, H).to(acc)  # (B, H, Tk, D)
    vf = _expand_kv(v, H).to(acc)  # (B, H, Tk, D)
    s = torch.matmul(q.to(acc), kf.transpose(-1, -2)) * scale  # (B, H, Tq, Tk)  reads Tq·Tk, writes Tq·Tk
    keep = attention_mask(Tq, Tk, causal, window, key_padding_mask, device=q.device, segment_ids=segment_ids)
    s = s.masked_fill(~keep, float("-inf"))
    # A row with no visible key would be softmax(all -inf) = NaN; give it zeros (and zero gradients).
    empty = ~keep.any(dim=-1, keepdim=True)  # (Tq, 1) or (B, 1, Tq, 1)
    p = torch.softmax(s.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)  # (B, H, Tq, Tk)
    return torch.matmul(p, vf).to(q.dtype)  # (B, H, Tq, D)


def flash_attention_tiled_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    window: int | None = None,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    block_q: int = 64,
    block_k: int = 64,
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
                # the mask of this tile, from the absolute positions of its queries and keys
                qp = torch.arange(q0, q1, device=q.device)[:, None] + offset  # (bq, 1)
                kp = torch.arange(k0, k1, device=q.device)[None, :]  # (1, bk)
                keep = torch.ones(q1 - q0, k1 - k0, dtype=torch.bool, device=q.device)
                if causal:
                    keep &= kp <= qp
                if window is not None:
                    keep &= kp > qp - window
                    if not causal:
                        keep &= kp < qp + window
                keep = keep[None].expand(B, -1, -1)
                if key_padding_mask is not None:
                    keep = keep & key_padding_mask[:, None, k0:k1].to(torch.bool)
                s = s.masked_fill(~keep, float("-inf"))
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
        check_float(name, t, OP, FLOAT_DTYPES + (torch.float64,))
        if t.dim() != 4:
            raise ValueError(f"{OP}: {name} must be 4-D (B, H, T, D), got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{OP}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_same_device(OP, q=q, k=k, v=v, key_padding_mask=key_padding_mask)
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


def _validate_segments(q, k, segment_ids, backend) -> None:
    B, Tq, Tk = q.shape[0], q.shape[2], k.shape[2]
    if not isinstance(segment_ids, torch.Tensor) or segment_ids.dtype.is_floating_point or \
            segment_ids.dtype == torch.bool:
        got = segment_ids.dtype if isinstance(segment_ids, torch.Tensor) else type(segment_ids).__name__
        raise TypeError(f"{OP}: segment_ids must be an integer tensor, got {got}")
    if Tq != Tk or tuple(segment_ids.shape) != (B, Tk):
        raise ValueError(f"{OP}: segment_ids must have shape (B, T) = ({B}, {Tk}) with Tq == Tk, got "
                         f"{tuple(segment_ids.shape)} for q {tuple(q.shape)}, k {tuple(k.shape)}")
    check_same_device(OP, q=q, segment_ids=segment_ids)
    if backend is not None and backend != "reference":
        raise ValueError(f"{OP}: segment_ids (packed sequences) is only implemented by the 'reference' backend, "
                         f"not {backend!r}")


def _fast_path_problem(q: torch.Tensor) -> str | None:
    """Why a fast backend cannot take this call (dtype, head dim), or None."""
    if q.dtype not in FLOAT_DTYPES:
        return f"fast backends support dtypes (float32, float16, bfloat16), got {q.dtype}"
    if q.shape[-1] not in FAST_HEAD_DIMS:
        return f"fast backends support head_dim in {FAST_HEAD_DIMS}, got head_dim={q.shape[-1]} (q {tuple(q.shape)})"
    return None


# ---------------------------------------------------------------------------------------------------------------
# C++ (CPU) and CUDA: intro2llm::flash_attention_fwd / _bwd from csrc/, registered here with fake + autograd.
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


def _compiled_backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, kpm = ctx.saved_tensors
    causal, window, scale = ctx.args
    dq, dk, dv = torch.ops.intro2llm.flash_attention_bwd(
        grad_out.contiguous(), q, k, v, out, lse, causal, window, scale, kpm
    )
    return dq, dk, dv, None, None, None, None


def _compiled(q, k, v, causal, window, scale, key_padding_mask):
    # no .contiguous(): the kernels read strided (B, H, T, D) views in place (the CPU forward avoids a copy of
    # transposed projections and KV-cache prefixes) or copy what they cannot
    return torch.ops.intro2llm.flash_attention_fwd(q, k, v, causal, window, scale, key_padding_mask)[0]


if _dispatch.extension_error() is None and hasattr(torch.ops.intro2llm, "flash_attention_fwd"):
    torch.library.register_fake("intro2llm::flash_attention_fwd")(_fake_fwd)
    torch.library.register_fake("intro2llm::flash_attention_bwd")(_fake_bwd)
    torch.library.register_autograd("intro2llm::flash_attention_fwd", _compiled_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------------------
# Triton: kernels/flash_attention.py launched inside custom ops (triton imported lazily: it is optional).
# ---------------------------------------------------------------------------------------------------------------
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


def _triton_backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, kpm = ctx.saved_tensors
    causal, window, scale = ctx.args
    dq, dk, dv = _flash_attention_bwd_triton(grad_out, q, k, v, out, lse, causal, window, scale, kpm)
    return dq, dk, dv, None, None, None, None


_flash_attention_fwd_triton.register_fake(_fake_fwd)
_flash_attention_bwd_triton.register_fake(_fake_bwd)
_flash_attention_fwd_triton.register_autograd(_triton_backward, setup_context=_setup_context)


def _triton(q, k, v, causal, window, scale, key_padding_mask):
    return _flash_attention_fwd_triton(q, k, v, causal, window, scale, key_padding_mask)[0]


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
        _validate_segments(q, k, segment_ids, backend)
        return flash_attention_reference(q, k, v, causal, window, scale, key_padding_mask, segment_ids)
    name = _dispatch.resolve_backend(
        OP, q.device, backend, implemented=_implemented(), compiled_op="flash_attention_fwd"
    )
    if name != "reference":
        problem = _fast_path_problem(q)
        if problem is not None:
            if backend is not None:
                err = TypeError if q.dtype not in FLOAT_DTYPES else ValueError
                raise err(f"{OP}: backend {name!r}: {problem}")
            name = "reference"  # auto: fall back rather than fail
    if name == "reference":
        return flash_attention_reference(q, k, v, causal, window, scale, key_padding_mask)
    sc = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    w = -1 if window is None else int(window)
    return _FAST[name](q, k, v, bool(causal), w, sc, key_padding_mask)


# name -> callable(q, k, v, causal, window, scale, key_padding_mask) for each fast backend this module provides.
_FAST: dict = {"triton": _triton, "cpp": _compiled, "cuda": _compiled}


def _implemented() -> tuple[str, ...]:
    return ("reference",) + tuple(b for b in BACKENDS if b in _FAST)
