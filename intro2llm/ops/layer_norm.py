"""LayerNorm (Ba et al., 2016): ``(x - mean) / sqrt(var + eps) * weight + bias`` over the last dimension.

Reference in eager PyTorch (fp32 statistics) and a Triton fast path (``kernels/layer_norm.py``), in the op
template of ``_dispatch`` (worked example ``rms_norm.py``). Modern decoders use RMSNorm; LayerNorm is here for
GPT-2-style models and the lesson's comparison of the two. No C++/CUDA kernel: on CPU the reference runs (auto
never picks Triton for CPU tensors).
"""

from __future__ import annotations

import torch

from intro2llm.ops import _dispatch
from intro2llm.ops._checks import check_float, check_same_device

OP = _dispatch.Op("layer_norm", backends=("reference", "triton"))


def layer_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, eps: float = 1e-5
) -> torch.Tensor:
    """Eager LayerNorm: x (..., N), weight/bias (N,) → (..., N) in x's dtype; statistics in fp32."""
    xf = x.float()
    mean = xf.mean(dim=-1, keepdim=True)  # (..., 1)
    var = (xf - mean).pow(2).mean(dim=-1, keepdim=True)  # biased variance, as nn.LayerNorm
    y = (xf - mean) * torch.rsqrt(var + eps) * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def _validate(x, weight, bias, eps):
    check_float("x", x, OP.name)
    check_float("weight", weight, OP.name)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{OP}: x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dim() != 1 or t.shape[0] != x.shape[-1]):
            raise ValueError(
                f"{OP}: {name} must have shape ({x.shape[-1]},) to match x of shape {tuple(x.shape)}, "
                f"got {tuple(t.shape)}"
            )
    if bias is not None:
        check_float("bias", bias, OP.name)
    check_same_device(OP.name, x=x, weight=weight, bias=bias)
    if not eps >= 0.0:
        raise ValueError(f"{OP}: eps must be >= 0, got {eps}")


@torch.library.custom_op("intro2llm::layer_norm_fwd_triton", mutates_args=())
def _layer_norm_fwd_triton(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from intro2llm.kernels.layer_norm import layer_norm_fwd

    return layer_norm_fwd(x.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(), eps)


@torch.library.custom_op("intro2llm::layer_norm_bwd_triton", mutates_args=())
def _layer_norm_bwd_triton(
    grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from intro2llm.kernels.layer_norm import layer_norm_bwd

    return layer_norm_bwd(grad_y.contiguous(), x.contiguous(), weight.contiguous(), mean, rstd)


def _fake_fwd(x, weight, bias, eps):
    stat = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return torch.empty_like(x, memory_format=torch.contiguous_format), stat, torch.empty_like(stat)


def _fake_bwd(grad_y, x, weight, mean, rstd):
    dw = x.new_empty(x.shape[-1], dtype=torch.float32)
    return torch.empty_like(x, memory_format=torch.contiguous_format), dw, torch.empty_like(dw)


def _setup_context(ctx, inputs, output):
    x, weight, bias, _eps = inputs
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.save_for_backward(x, weight, output[1], output[2])


def _backward(bwd, ctx, grad_y, _gm, _gr):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = bwd(grad_y, x, weight, mean, rstd)
    return dx, dw.to(weight.dtype), None if ctx.bias_dtype is None else db.to(ctx.bias_dtype), None


_dispatch.register_kernels(
    _layer_norm_fwd_triton, _layer_norm_bwd_triton, fake_fwd=_fake_fwd, fake_bwd=_fake_bwd, backward=_backward,
    setup_context=_setup_context,
)  # fmt: skip


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """LayerNorm over the last dim: x (..., N), weight/bias (N,) → (..., N) in x's dtype."""
    _validate(x, weight, bias, eps)
    name = OP.resolve(x.device, backend, dtype=x.dtype)
    if name == "triton":
        return _layer_norm_fwd_triton(x, weight, bias, float(eps))[0]
    return layer_norm_reference(x, weight, bias, eps)
