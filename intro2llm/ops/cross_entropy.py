"""Cross-entropy over a vocabulary, with label smoothing and z-loss, as one fused op.

``loss_i = (1 - ε)·(lse_i - x_i[t_i]) + ε·(lse_i - mean_j x_ij) + z·lse_i²`` with ``lse_i = logsumexp_j x_ij``,
which equals ``torch.nn.functional.cross_entropy(x, t, ignore_index, label_smoothing=ε)`` when ``z = 0``
(z-loss: PaLM, Chowdhery et al. 2022, §5). Reduction "mean" divides by the number of non-ignored tokens; with
every token ignored that is 0/0 = nan, exactly like PyTorch (gradients are then zero); "sum" gives 0.

Layout: the op template of ``_dispatch`` (worked example ``rms_norm.py``); the kernels are the C++/CUDA ops of
``intro2llm._C`` and the Triton ops of ``kernels/cross_entropy.py``.

How the fast paths save memory (Liger-Kernel's goal, a different route): the forward makes one online
log-sum-exp pass over each row in fp32 and keeps only ``lse`` (N floats); the backward re-reads the logits and
writes ``dL/dx = g_i·(softmax(x)·(1 + 2z·lse) - (1-ε)·onehot(t) - ε/V)`` straight into the gradient in the
logits' dtype. No vocab-sized buffer exists besides that gradient (no fp32 softmax, no upcast copy), and the
user's logits are never written: Liger-Kernel overwrites them in place with their gradient (so it saves nothing
for the backward, but corrupts a tensor the caller may still hold); here autograd keeps the logits alive until
the backward instead. The reduction (sum / mean over valid tokens) is plain torch on the (N,) per-token losses,
so autograd hands the backward kernel one scale per row. ``fused_linear_cross_entropy`` reuses these kernels
chunk by chunk, overwriting its own chunk logits with their gradient (``cross_entropy_fwd_bwd_``).

Not handled: class weights, probability (soft) targets, the ``(N, V, d1, ...)`` class-in-dim-1 layout of
``F.cross_entropy`` (logits here are ``(..., V)``, the LM layout).
"""

from __future__ import annotations

import torch

from intro2llm.ops import _dispatch
from intro2llm.ops._checks import check_float, check_same_device

OP = _dispatch.Op("cross_entropy", backends=("reference", "triton", "cpp", "cuda"), compiled="cross_entropy_fwd")
REDUCTIONS = ("mean", "sum", "none")


def _reduce(loss_rows: torch.Tensor, valid: torch.Tensor, reduction: str, dtype: torch.dtype, shape) -> torch.Tensor:
    """Per-token fp32 losses (N,) → the requested reduction in the logits' dtype (like F.cross_entropy)."""
    if reduction == "none":
        return loss_rows.reshape(shape).to(dtype)
    total = loss_rows.sum()
    if reduction == "sum":
        return total.to(dtype)
    return (total / valid.sum()).to(dtype)  # 0/0 = nan when every token is ignored, as in PyTorch


def cross_entropy_reference(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                            label_smoothing: float = 0.0, z_loss: float = 0.0, reduction: str = "mean") -> torch.Tensor:
    """Eager cross-entropy: logits (..., V), targets (...) int64 → scalar (mean/sum) or (...) ("none").

    Statistics in fp32 whatever the input dtype; result in the logits' dtype. Memory traffic: ~5 passes over
    the (N, V) fp32 upcast (upcast, logsumexp, mean, gather, and as many again in autograd's backward, which also
    materializes fp32 softmax) — the fused kernels read the logits twice and write the gradient once.
    """
    V = logits.shape[-1]
    x = logits.reshape(-1, V).float()  # (N, V)
    t = targets.reshape(-1)  # (N,)
    valid = t != ignore_index
    safe_t = torch.where(valid, t, torch.zeros_like(t))
    lse = torch.logsumexp(x, dim=-1)  # (N,)
    nll = lse - x.gather(1, safe_t[:, None]).squeeze(1)
    loss = nll if label_smoothing == 0.0 else (1.0 - label_smoothing) * nll + label_smoothing * (lse - x.mean(-1))
    if z_loss != 0.0:
        loss = loss + z_loss * lse * lse
    loss = torch.where(valid, loss, torch.zeros_like(loss))  # where, not *: keeps nan/inf out of the gradients
    return _reduce(loss, valid, reduction, logits.dtype, targets.shape)


def _validate(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float, z_loss: float,
              reduction: str) -> None:
    check_float("logits", logits, OP.name)
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"{OP}: targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{OP}: targets must be int64 (or int32) class ids, got {targets.dtype} with shape "
                        f"{tuple(targets.shape)}")
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"{OP}: logits must have a non-empty last (vocabulary) dimension, got shape "
                         f"{tuple(logits.shape)}")
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"{OP}: targets shape {tuple(targets.shape)} must equal logits shape without its last "
                         f"dimension {tuple(logits.shape[:-1])} (logits {tuple(logits.shape)})")
    check_same_device(OP.name, logits=logits, targets=targets)
    check_loss_options(OP, label_smoothing, reduction)
    if not z_loss >= 0.0:
        raise ValueError(f"{OP}: z_loss must be >= 0, got {z_loss}")


def check_loss_options(op, label_smoothing: float, reduction: str) -> None:
    """ValueError for a reduction not in REDUCTIONS or a label_smoothing outside [0, 1] (``op`` names the op)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{op}: label_smoothing must be in [0, 1], got {label_smoothing}")


def check_targets(targets: torch.Tensor, num_classes: int, ignore_index: int, op: str = OP.name) -> None:
    """ValueError naming the first target outside [0, num_classes) that is not ``ignore_index`` (syncs on GPU)."""
    if torch.compiler.is_compiling() or targets.numel() == 0:
        return  # the compiled ops check again at run time; here the values are fake
    bad = ((targets < 0) | (targets >= num_classes)) & (targets != ignore_index)
    if bool(bad.any()):
        idx = int(bad.reshape(-1).nonzero()[0, 0])
        value = int(targets.reshape(-1)[idx])
        raise ValueError(f"{op}: target {value} at flat position {idx} is outside [0, {num_classes}) and is not "
                         f"ignore_index={ignore_index}")


# ---------------------------------------------------------------------------------------------------------------
# Kernels: all take 2-D logits (N, V) and int64 targets (N,); the reduction happens in Python on the per-row
# losses. C++/CUDA: intro2llm::cross_entropy_fwd / _bwd / _fwd_bwd_ (in place, for fused_linear_cross_entropy).
# ---------------------------------------------------------------------------------------------------------------
def _fake_fwd(logits, targets, ignore_index, label_smoothing, z_loss):
    rows = logits.new_empty(logits.shape[:1], dtype=torch.float32)
    return rows, torch.empty_like(rows)


def _fake_bwd(grad_loss, logits, targets, lse, ignore_index, label_smoothing, z_loss):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _fake_fwd_bwd_(logits, targets, grad_scale, ignore_index, label_smoothing, z_loss):
    return _fake_fwd(logits, targets, ignore_index, label_smoothing, z_loss)


def _setup_context(ctx, inputs, output):
    logits, targets, ignore_index, label_smoothing, z_loss = inputs
    ctx.save_for_backward(logits, targets, output[1])
    ctx.params = (ignore_index, label_smoothing, z_loss)


def _backward(bwd, ctx, grad_loss, _grad_lse):
    logits, targets, lse = ctx.saved_tensors
    return bwd(grad_loss.contiguous(), logits, targets, lse, *ctx.params), None, None, None, None


# Triton: kernels/cross_entropy.py launched inside custom ops (triton imported lazily: it is optional).
@torch.library.custom_op("intro2llm::cross_entropy_fwd_triton", mutates_args=())
def _cross_entropy_fwd_triton(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, label_smoothing: float, z_loss: float
) -> tuple[torch.Tensor, torch.Tensor]:
    from intro2llm.kernels.cross_entropy import cross_entropy_fwd

    check_targets(targets, logits.shape[-1], ignore_index)  # before the kernel, also when called directly
    return cross_entropy_fwd(logits.contiguous(), targets.contiguous(), ignore_index, label_smoothing, z_loss)


@torch.library.custom_op("intro2llm::cross_entropy_bwd_triton", mutates_args=())
def _cross_entropy_bwd_triton(grad_loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                              ignore_index: int, label_smoothing: float, z_loss: float) -> torch.Tensor:
    from intro2llm.kernels.cross_entropy import cross_entropy_bwd

    return cross_entropy_bwd(
        grad_loss.float().contiguous(), logits.contiguous(), targets.contiguous(), lse.contiguous(), ignore_index,
        label_smoothing, z_loss,
    )


_KERNELS = dict(fake_fwd=_fake_fwd, fake_bwd=_fake_bwd, backward=_backward, setup_context=_setup_context)
_dispatch.register_kernels(  # C++ (CPU) and CUDA, from csrc/
    "cross_entropy_fwd", "cross_entropy_bwd", extra_fakes={"cross_entropy_fwd_bwd_": _fake_fwd_bwd_}, **_KERNELS
)
_dispatch.register_kernels(_cross_entropy_fwd_triton, _cross_entropy_bwd_triton, **_KERNELS)


def fwd_bwd_inplace(backend: str):
    """The ``(logits (n, V), targets, grad_scale, ignore_index, ε, z) -> (loss, lse)`` in-place kernel of a backend
    (logits overwritten by their scaled gradient), for ``fused_linear_cross_entropy``."""
    if backend == "triton":
        from intro2llm.kernels.cross_entropy import cross_entropy_fwd_bwd_

        return cross_entropy_fwd_bwd_
    return torch.ops.intro2llm.cross_entropy_fwd_bwd_


def fwd_and_bwd(backend: str):
    """The (forward, backward) kernel pair of a backend with the signatures of ``intro2llm::cross_entropy_fwd/bwd``."""
    if backend == "triton":
        from intro2llm.kernels.cross_entropy import cross_entropy_bwd, cross_entropy_fwd

        return cross_entropy_fwd, cross_entropy_bwd
    return torch.ops.intro2llm.cross_entropy_fwd, torch.ops.intro2llm.cross_entropy_bwd


# ---------------------------------------------------------------------------------------------------------------
# Public op
# ---------------------------------------------------------------------------------------------------------------
def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, label_smoothing: float = 0.0,
                  z_loss: float = 0.0, reduction: str = "mean", *, backend: str | None = None) -> torch.Tensor:
    """Cross-entropy: logits (..., V) fp32/bf16/fp16, targets (...) int64 → scalar or (...) in logits' dtype."""
    _validate(logits, targets, label_smoothing, z_loss, reduction)
    name = OP.resolve(logits.device, backend, dtype=logits.dtype)
    if name == "reference":
        check_targets(targets, logits.shape[-1], ignore_index)
        return cross_entropy_reference(logits, targets, ignore_index, label_smoothing, z_loss, reduction)
    V = logits.shape[-1]
    x = logits.reshape(-1, V)  # (N, V)
    t = targets.reshape(-1).long()  # (N,)
    args = (int(ignore_index), float(label_smoothing), float(z_loss))
    if name == "triton":
        loss, _ = _cross_entropy_fwd_triton(x, t, *args)
    else:  # the C++/CUDA op checks the target range itself, before its kernel
        loss, _ = torch.ops.intro2llm.cross_entropy_fwd(x.contiguous(), t.contiguous(), *args)
    return _reduce(loss, t != ignore_index, reduction, logits.dtype, targets.shape)
