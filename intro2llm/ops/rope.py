"""Rotary position embedding (RoPE, Su et al., 2021, "RoFormer") applied to queries and keys in one call.

Split-half convention of Hugging Face Llama (``rotate_half``): with ``h = D/2``,
``out = x * cos + rotate_half(x) * sin`` and ``rotate_half(x) = cat(-x[..., h:], x[..., :h])``.
``q`` is (B, H, T, D) and ``k`` is (B, Hkv, T, D) (GQA/MQA: fewer key heads); ``cos``/``sin`` are (T, D),
(B, T, D) or (1, T, D) (also accepted with a singleton head dim: (B, 1, T, D) as Hugging Face unsqueezes them)
and broadcast over heads; per-batch rows carry decoding offsets or ``position_ids`` with left padding. They
may be in another dtype than ``q`` (fp32 tables with bf16 activations); the result has ``q``'s dtype.

The backward is the transpose of the rotation, i.e. RoPE with ``-sin`` (with the sin halves swapped, which is
the same thing for the usual tables where both halves are equal). Gradients for ``cos``/``sin`` (rarely
wanted: they are buffers) are computed eagerly by the fast backends when asked for.

Layout: the op template of ``_dispatch`` (worked example ``rms_norm.py``). Not handled: the interleaved (GPT-J,
``x[..., 0::2]``) convention, partial rotary (rotating only the first ``rotary_dim`` channels); pass the rotated
slice yourself.
"""

from __future__ import annotations

import torch

from intro2llm.ops import _dispatch
from intro2llm.ops._checks import check_float, check_same_device

OP = _dispatch.Op("apply_rope", backends=("reference", "triton", "cpp", "cuda"), compiled="apply_rope_fwd")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def _table_3d(t: torch.Tensor) -> torch.Tensor:
    """cos/sin as (Bc, T, D) with Bc in {1, B} (a view, no copy)."""
    if t.dim() == 2:
        return t.unsqueeze(0)
    if t.dim() == 4:
        return t.squeeze(1)
    return t


def apply_rope_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager RoPE: q (B, H, T, D), k (B, Hkv, T, D), cos/sin (T, D) | (B, T, D) → (q_out, k_out), fp32 math.

    Memory traffic per tensor: upcast, negate, cat, two products and a sum: ~6 passes over B·H·T·D values;
    the fused kernels read x once and write the output once (cos/sin are T·D, reused across heads).
    """
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    c = _table_3d(cos).unsqueeze(1).to(compute)  # (Bc, 1, T, D)
    s = _table_3d(sin).unsqueeze(1).to(compute)  # (Bc, 1, T, D)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        xf = x.to(compute)
        return (xf * c + _rotate_half(xf) * s).to(x.dtype)

    return rotate(q), rotate(k)


def _validate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        check_float(name, t, OP.name)
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"{OP}: q and k must be 4-D (B, H, T, D) and (B, Hkv, T, D), got q {tuple(q.shape)} and k "
                         f"{tuple(k.shape)}")
    B, _, T, D = q.shape
    if k.shape[0] != B or k.shape[2] != T or k.shape[3] != D:
        raise ValueError(f"{OP}: k must have shape ({B}, Hkv, {T}, {D}) to match q of shape {tuple(q.shape)}, got "
                         f"{tuple(k.shape)}")
    if D == 0 or D % 2 != 0:
        raise ValueError(f"{OP}: head_dim must be even and > 0 (split-half rotation), got q of shape {tuple(q.shape)}")
    if k.dtype != q.dtype:
        raise TypeError(f"{OP}: q and k must share a dtype, got q {q.dtype} and k {k.dtype}")
    if cos.shape != sin.shape:
        raise ValueError(f"{OP}: cos and sin must have the same shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if cos.dtype != sin.dtype:
        raise TypeError(f"{OP}: cos and sin must share a dtype, got {cos.dtype} and {sin.dtype}")
    shape = tuple(cos.shape)
    ok = (
        (len(shape) == 2 and shape == (T, D))
        or (len(shape) == 3 and shape[0] in (1, B) and shape[1:] == (T, D))
        or (len(shape) == 4 and shape[0] in (1, B) and shape[1] == 1 and shape[2:] == (T, D))
    )
    if not ok:
        raise ValueError(f"{OP}: cos/sin must have shape ({T}, {D}), ({B}, {T}, {D}) or (1, {T}, {D}) for q of shape "
                         f"{tuple(q.shape)}, got {shape}")
    check_same_device(OP.name, q=q, k=k, cos=cos, sin=sin)


# ---------------------------------------------------------------------------------------------------------------
# Kernels: rope's backward is the transposed rotation of the upstream gradients (one fused call).
# ---------------------------------------------------------------------------------------------------------------
def _fake_rope(a, b, cos, sin):
    fmt = torch.contiguous_format
    return torch.empty_like(a, memory_format=fmt), torch.empty_like(b, memory_format=fmt)


def _setup_context(ctx, inputs, output):
    q, k, cos, sin = inputs
    if cos.requires_grad or sin.requires_grad:  # keep q/k alive only when the tables want gradients
        ctx.save_for_backward(cos, sin, q, k)
    else:
        ctx.save_for_backward(cos, sin)


def _table_grads(saved, gq, gk):
    """Eager dcos/dsin (summed over heads, and over batch for a shared table), or (None, None)."""
    if len(saved) == 2:
        return None, None
    cos, sin, q, k = saved
    gq, gk, qf, kf = gq.float(), gk.float(), q.float(), k.float()
    dcos = (gq * qf).sum(1) + (gk * kf).sum(1)  # (B, T, D)
    dsin = (gq * _rotate_half(qf)).sum(1) + (gk * _rotate_half(kf)).sum(1)  # (B, T, D)
    if cos.shape[0] == 1:
        dcos, dsin = dcos.sum(0, keepdim=True), dsin.sum(0, keepdim=True)
    return dcos.to(cos.dtype), dsin.to(sin.dtype)


def _backward(bwd, ctx, gq, gk):
    saved = ctx.saved_tensors  # read once: under activation checkpointing each saved tensor unpacks only once
    cos, sin = saved[:2]
    dq, dk = bwd(gq, gk, cos, sin)  # the kernels take any strides
    dcos, dsin = _table_grads(saved, gq, gk)
    return dq, dk, dcos, dsin


# Triton: kernels/rope.py launched inside custom ops (triton imported lazily: it is optional).
@torch.library.custom_op("intro2llm::apply_rope_fwd_triton", mutates_args=())
def _apply_rope_fwd_triton(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    from intro2llm.kernels.rope import rope_fwd

    return rope_fwd(q, k, cos, sin, backward=False)


@torch.library.custom_op("intro2llm::apply_rope_bwd_triton", mutates_args=())
def _apply_rope_bwd_triton(
    grad_q: torch.Tensor, grad_k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    from intro2llm.kernels.rope import rope_fwd

    return rope_fwd(grad_q, grad_k, cos, sin, backward=True)


_KERNELS = dict(fake_fwd=_fake_rope, fake_bwd=_fake_rope, backward=_backward, setup_context=_setup_context)
_dispatch.register_kernels("apply_rope_fwd", "apply_rope_bwd", **_KERNELS)  # C++ (CPU) and CUDA, from csrc/
_dispatch.register_kernels(_apply_rope_fwd_triton, _apply_rope_bwd_triton, **_KERNELS)


# ---------------------------------------------------------------------------------------------------------------
# Public op
# ---------------------------------------------------------------------------------------------------------------
def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
               backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE on q (B, H, T, D) and k (B, Hkv, T, D) with cos/sin (T, D) | (B, T, D) → (q_out, k_out) in q's dtype."""
    _validate(q, k, cos, sin)
    name = OP.resolve(q.device, backend, dtype=q.dtype)
    if name == "reference":
        return apply_rope_reference(q, k, cos, sin)
    cos3, sin3 = _table_3d(cos), _table_3d(sin)
    if name == "triton":
        return _apply_rope_fwd_triton(q, k, cos3, sin3)
    return torch.ops.intro2llm.apply_rope_fwd(q, k, cos3, sin3)
