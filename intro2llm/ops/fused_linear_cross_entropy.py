"""Fused linear + cross-entropy: ``cross_entropy(hidden @ weight.T + bias, targets)`` without the (N, V) logits.

An LM head's logits are the largest activation of a training step (8192 tokens × 128k vocabulary × 4 bytes =
4 GB, and as much again for their gradient). Following Liger-Kernel's fused linear cross-entropy (Hsu et al.,
2024), the fast paths walk the tokens in chunks: per chunk they compute the chunk's logits, the loss, and — in
the forward already — the gradient w.r.t. the logits (overwriting the chunk logits in place), from which they
accumulate ``grad_hidden`` (N, H), ``grad_weight`` (V, H, fp32) and ``grad_bias`` (V, fp32). The backward only
scales these by the upstream gradient (in place, so no second (V, H) buffer). Only one chunk of logits lives at
a time: peak memory ≈ grad_weight + grad_hidden + one chunk, instead of 2-3 × N·V. ``reduction="none"`` keeps
only lse (N,) from the forward and recomputes each chunk in the backward (the upstream gradient differs per token).
The chunk loop is Python around GEMMs (torch.mm) and the ``cross_entropy`` kernels of the chosen backend.

Not handled: the same as ``cross_entropy`` (class weights, soft targets), z-loss (not in the signature), and
double backward. Half-precision inputs allocate one weight-sized temporary per chunk for the weight gradient.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake

from intro2llm.ops import _dispatch
from intro2llm.ops._checks import check_float, check_same_device
from intro2llm.ops.cross_entropy import (
    _reduce,
    check_loss_options,
    check_targets,
    cross_entropy_reference,
    fwd_and_bwd,
    fwd_bwd_inplace,
)

OP = _dispatch.Op(  # the fast paths are torch GEMMs around the cross_entropy kernels of the chosen backend
    "fused_linear_cross_entropy", backends=("reference", "triton", "cpp", "cuda"), compiled="cross_entropy_fwd"
)
# Default chunk: ~16 MiB of logits (32 tokens at V=128k fp32, 128 at V=32k, 512 at V=8k). Big enough for efficient
# GEMMs (K >= 32 rows per weight-gradient product), and under glibc's largest dynamic mmap threshold (32 MiB): after
# the first call the buffer comes from the heap instead of a fresh mapping whose page faults are paid every call
# (figures: benchmarks/bench_fused_linear_cross_entropy.py, lesson 08's README).
CHUNK_LOGITS_BYTES = 16 * 2**20


def fused_linear_cross_entropy_reference(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None = None,
    ignore_index: int = -100, label_smoothing: float = 0.0, reduction: str = "mean", chunk_size: int | None = None,
) -> torch.Tensor:
    """Eager linear + cross-entropy: hidden (..., H), weight (V, H), targets (...) → scalar or (...).

    The oracle: it materializes the full (N, V) logits (``chunk_size`` is accepted for signature parity and
    ignored). Memory: logits + their fp32 upcast + autograd's softmax, each N·V.
    """
    weight = weight.to(hidden.dtype)  # mixed dtypes (fp32 master weight, bf16 activations): compute in hidden's
    bias = None if bias is None else bias.to(hidden.dtype)
    logits = torch.nn.functional.linear(hidden, weight, bias)  # (..., V)
    return cross_entropy_reference(logits, targets, ignore_index, label_smoothing, 0.0, reduction)


def check_head_inputs(op, hidden, weight, targets, bias=None) -> None:
    """Validate the inputs every fused LM-head op shares: hidden (..., H), weight (V, H), targets (...) int, an
    optional bias (V,), all on one device; ``op`` (an ``_dispatch.Op``) names the op in the messages."""
    check_float("hidden", hidden, op.name)
    check_float("weight", weight, op.name)
    if bias is not None:
        check_float("bias", bias, op.name)
    if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{op}: targets must be an int64 (or int32) tensor, got "
                        f"{getattr(targets, 'dtype', type(targets).__name__)}")
    if hidden.dim() < 1 or hidden.shape[-1] == 0:
        raise ValueError(f"{op}: hidden must have a non-empty last dimension, got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(f"{op}: weight must have shape (V, {hidden.shape[-1]}) with V > 0 to match hidden of shape "
                         f"{tuple(hidden.shape)}, got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{op}: bias must have shape ({weight.shape[0]},) to match weight {tuple(weight.shape)}, "
                         f"got {tuple(bias.shape)}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"{op}: targets shape {tuple(targets.shape)} must equal hidden shape without its last "
                         f"dimension {tuple(hidden.shape[:-1])} (hidden {tuple(hidden.shape)})")
    check_same_device(op.name, hidden=hidden, weight=weight, targets=targets, bias=bias)


def _validate(hidden, weight, targets, bias, label_smoothing, reduction, chunk_size) -> None:
    check_head_inputs(OP, hidden, weight, targets, bias)
    check_loss_options(OP, label_smoothing, reduction)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{OP}: chunk_size must be a positive int or None, got {chunk_size!r}")


def default_chunk_size(num_tokens: int, vocab: int, dtype: torch.dtype) -> int:
    """Tokens per chunk: a multiple of 16 whose logits fit in ~16 MiB (at least 16, at most N)."""
    per_token = vocab * torch.empty((), dtype=dtype).element_size()
    chunk = max(16, CHUNK_LOGITS_BYTES // per_token // 16 * 16)
    return max(1, min(chunk, num_tokens))


def _cast(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
    """GEMMs run in hidden's dtype; the gradients go back in weight's and bias's own dtypes (fp32 accumulated)."""
    return weight.to(dtype), None if bias is None else bias.to(dtype)


def _grad_buffers(weight: torch.Tensor, bias: torch.Tensor | None, num_tokens: int, weight_grad: bool = True):
    """fp32 gradient accumulators: weight (V, H) (written by the first chunk, so zeros only without tokens; None
    when not ``weight_grad``) and bias (V,) zeros (None without bias)."""
    gw32 = None if not weight_grad else \
        (torch.empty if num_tokens > 0 else torch.zeros)(weight.shape, device=weight.device, dtype=torch.float32)
    return gw32, None if bias is None else torch.zeros(weight.shape[0], device=weight.device, dtype=torch.float32)


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  buf: torch.Tensor | None = None) -> torch.Tensor:
    """(n, V) logits of one chunk, written into ``buf[:n]`` when given (one buffer reused by every chunk)."""
    out = None if buf is None else buf[: h.shape[0]]
    if bias is None:
        return torch.mm(h, weight.t(), out=out)
    return torch.addmm(bias, h, weight.t(), out=out)


def _accumulate(grad_logits, h, weight, gh_out, gw32, gb32, first: bool) -> None:
    """From one chunk's dL/dlogits (n, V): write grad_hidden rows, add into the fp32 weight and bias gradients
    (``first``: the chunk that initializes the weight gradient, so it needs no zero-fill beforehand)."""
    torch.mm(grad_logits, weight, out=gh_out)  # (n, H)
    if gw32 is None:  # a frozen weight (LoRA's LM head): no (V, H) GEMM at all
        pass
    elif gw32.dtype == grad_logits.dtype:
        if first:
            torch.mm(grad_logits.t(), h, out=gw32)  # (V, H)
        else:
            gw32.addmm_(grad_logits.t(), h)  # accumulated in place
    elif first:  # half inputs: the GEMM runs in their dtype (fp32 accumulation inside), the sum over chunks in fp32
        gw32.copy_(torch.mm(grad_logits.t(), h))
    else:
        gw32.add_(torch.mm(grad_logits.t(), h))
    if gb32 is not None:
        gb32.add_(grad_logits.sum(0, dtype=torch.float32))


# ---------------------------------------------------------------------------------------------------------------
# "mean"/"sum": the forward computes loss and all gradients (Liger-Kernel's scheme); the backward scales them.
# ---------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("intro2llm::fused_linear_cross_entropy_fwd", mutates_args=())
def _flce_fwd(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None, ignore_index: int,
    label_smoothing: float, reduction: str, chunk_size: int, backend: str, weight_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden (N, H), weight (V, H), targets (N,) → loss () fp32, grad_hidden (N, H), grad_weight (V, H) (empty
    when not ``weight_grad``), grad_bias (V,) (empty without bias), the gradients being those of the reduced loss."""
    check_targets(targets, weight.shape[0], ignore_index, OP.name)
    kernel = fwd_bwd_inplace(backend)
    w, b = _cast(weight, bias, hidden.dtype)
    N, V = hidden.shape[0], weight.shape[0]
    n_valid = int((targets != ignore_index).sum()) if reduction == "mean" else 1
    scale = 1.0 / n_valid if n_valid > 0 else 0.0  # every token ignored: zero gradients, loss nan (below)
    grad_hidden = torch.empty_like(hidden)  # (N, H)
    gw32, gb32 = _grad_buffers(weight, bias, N, weight_grad)
    total = torch.zeros((), device=hidden.device, dtype=torch.float32)
    # the only vocabulary-sized buffer, allocated once: a fresh allocation per chunk would pay the OS's page faults
    # every time (glibc maps blocks over 32 MiB anew)
    buf = hidden.new_empty(min(chunk_size, N), V)
    for start in range(0, N, chunk_size):
        end = min(start + chunk_size, N)
        h = hidden[start:end]  # (n, H)
        logits = _chunk_logits(h, w, b, buf)  # (n, V)
        loss_rows, _ = kernel(logits, targets[start:end], scale, ignore_index, label_smoothing, 0.0)
        total += loss_rows.sum()
        _accumulate(logits, h, w, grad_hidden[start:end], gw32, gb32, start == 0)  # logits hold dL/dlogits
    loss = total / n_valid if reduction == "mean" else total  # 0/0 = nan when every token is ignored
    grad_bias = gb32.to(bias.dtype) if bias is not None else hidden.new_empty(0)
    grad_weight = gw32.to(weight.dtype) if gw32 is not None else hidden.new_empty(0)
    return loss, grad_hidden, grad_weight, grad_bias


def _flce_fake(hidden, weight, targets, bias, ignore_index, label_smoothing, reduction, chunk_size, backend,
               weight_grad=True):
    grad_bias = torch.empty_like(bias) if bias is not None else hidden.new_empty(0)
    grad_weight = torch.empty_like(weight) if weight_grad else hidden.new_empty(0)
    return hidden.new_empty((), dtype=torch.float32), torch.empty_like(hidden), grad_weight, grad_bias


def _flce_setup_context(ctx, inputs, output):
    ctx.has_bias = inputs[3] is not None
    ctx.weight_grad = inputs[9] if len(inputs) > 9 else True
    ctx.set_materialize_grads(False)  # else autograd allocates zero (N, H) and (V, H) grads for unused outputs
    # Traced (torch.compile / AOT, fake tensors): plain save_for_backward and an out-of-place scale.
    ctx.in_place = not (torch.compiler.is_compiling() or is_fake(output[1]))
    if ctx.in_place:
        # Kept as detached attributes, not save_for_backward: the backward hands them out as the gradients, and
        # autograd steals (does not copy) a gradient nobody else references — saved tensors would still be.
        ctx.grads = [g.detach() for g in output[1:]]
    else:
        ctx.save_for_backward(*output[1:])


def _flce_backward(_bwd, ctx, grad_loss, _gh, _gw, _gb):
    if ctx.in_place:
        if ctx.grads is None:
            raise RuntimeError(f"{OP}: backward ran twice through the same graph (retain_graph=True); the fused op "
                               "hands its precomputed gradients out once. Recompute the loss instead.")
        grads, ctx.grads = ctx.grads, None
        # Scale in place: no second (V, H) buffer.
        grads = [g.mul_(grad_loss.to(g.dtype)) for g in grads]
    else:
        grads = [g * grad_loss for g in ctx.saved_tensors]
    return (grads[0], grads[1] if ctx.weight_grad else None, None, grads[2] if ctx.has_bias else None, None, None,
            None, None, None, None)


_dispatch.register_kernels(
    _flce_fwd, None, fake_fwd=_flce_fake, fake_bwd=None, backward=_flce_backward, setup_context=_flce_setup_context
)


# ---------------------------------------------------------------------------------------------------------------
# "none": per-token losses; the upstream gradient differs per token, so the backward recomputes each chunk's
# logits (one more GEMM per chunk) from the saved lse instead of keeping gradients from the forward.
# ---------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("intro2llm::fused_linear_cross_entropy_none_fwd", mutates_args=())
def _flce_none_fwd(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None, ignore_index: int,
    label_smoothing: float, chunk_size: int, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden (N, H), weight (V, H), targets (N,) → per-token loss (N,) fp32, lse (N,) fp32."""
    check_targets(targets, weight.shape[0], ignore_index, OP.name)
    ce_fwd, _ = fwd_and_bwd(backend)
    w, b = _cast(weight, bias, hidden.dtype)
    losses, lses = [], []
    buf = hidden.new_empty(min(chunk_size, hidden.shape[0]), weight.shape[0])  # reused by every chunk
    for start in range(0, hidden.shape[0], chunk_size):
        h = hidden[start : start + chunk_size]
        loss_rows, lse = ce_fwd(_chunk_logits(h, w, b, buf), targets[start : start + chunk_size],
                                ignore_index, label_smoothing, 0.0)
        losses.append(loss_rows)
        lses.append(lse)
    if not losses:
        return hidden.new_empty(0, dtype=torch.float32), hidden.new_empty(0, dtype=torch.float32)
    return torch.cat(losses), torch.cat(lses)


def _flce_none_fake_fwd(hidden, weight, targets, bias, ignore_index, label_smoothing, chunk_size, backend):
    rows = hidden.new_empty(hidden.shape[:1], dtype=torch.float32)
    return rows, torch.empty_like(rows)


@torch.library.custom_op("intro2llm::fused_linear_cross_entropy_none_bwd", mutates_args=())
def _flce_none_bwd(
    grad_loss: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
    bias: torch.Tensor | None, lse: torch.Tensor, ignore_index: int, label_smoothing: float, chunk_size: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (hidden, weight, bias or empty) of the per-token losses for upstream grad_loss (N,)."""
    _, ce_bwd = fwd_and_bwd(backend)
    w, b = _cast(weight, bias, hidden.dtype)
    grad_loss = grad_loss.float().contiguous()
    grad_hidden = torch.empty_like(hidden)
    gw32, gb32 = _grad_buffers(weight, bias, hidden.shape[0])
    buf = hidden.new_empty(min(chunk_size, hidden.shape[0]), weight.shape[0])  # reused by every chunk
    for start in range(0, hidden.shape[0], chunk_size):
        end = min(start + chunk_size, hidden.shape[0])
        h = hidden[start:end]
        grad_logits = ce_bwd(grad_loss[start:end], _chunk_logits(h, w, b, buf), targets[start:end], lse[start:end],
                             ignore_index, label_smoothing, 0.0)
        _accumulate(grad_logits, h, w, grad_hidden[start:end], gw32, gb32, start == 0)
    grad_bias = gb32.to(bias.dtype) if bias is not None else hidden.new_empty(0)
    return grad_hidden, gw32.to(weight.dtype), grad_bias


def _flce_none_fake_bwd(grad_loss, hidden, weight, targets, bias, lse, ignore_index, label_smoothing, chunk_size,
                        backend):
    grad_bias = torch.empty_like(bias) if bias is not None else hidden.new_empty(0)
    return torch.empty_like(hidden), torch.empty_like(weight), grad_bias


def _flce_none_setup_context(ctx, inputs, output):
    hidden, weight, targets, bias, ignore_index, label_smoothing, chunk_size, backend = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(hidden, weight, targets, bias, output[1])
    ctx.params = (ignore_index, label_smoothing, chunk_size, backend)


def _flce_none_backward(bwd, ctx, grad_loss, _grad_lse):
    hidden, weight, targets, bias, lse = ctx.saved_tensors
    gh, gw, gb = bwd(grad_loss, hidden, weight, targets, bias, lse, *ctx.params)
    return gh, gw, None, gb if ctx.has_bias else None, None, None, None, None


_dispatch.register_kernels(
    _flce_none_fwd, _flce_none_bwd, fake_fwd=_flce_none_fake_fwd, fake_bwd=_flce_none_fake_bwd,
    backward=_flce_none_backward, setup_context=_flce_none_setup_context,
)  # fmt: skip


def fused_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None = None,
    ignore_index: int = -100, label_smoothing: float = 0.0, reduction: str = "mean", chunk_size: int | None = None,
    *, backend: str | None = None,
) -> torch.Tensor:
    """cross_entropy(hidden @ weight.T + bias, targets) without materializing the logits.

    hidden (..., H) fp32/bf16/fp16, weight (V, H), bias (V,), targets (...) int64 → scalar ("mean"/"sum") or
    (...) ("none") in hidden's dtype. A weight/bias in another dtype (an fp32 master weight with bf16 activations)
    is used in hidden's dtype, like autocast would; its gradient comes back in its own dtype.
    Under autocast the GEMMs run in the autocast dtype and the loss comes back in fp32, as
    ``cross_entropy(linear(hidden))`` would under autocast.
    """
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        # The op's own GEMMs write into fp32 buffers: run it with autocast off, on inputs cast the way autocast
        # would cast a linear layer's, and return the loss in fp32 like autocast's cross_entropy.
        with torch.autocast(device_type=device_type, enabled=False):
            hidden = hidden.to(torch.get_autocast_dtype(device_type))
            return _fused_linear_cross_entropy(
                hidden, weight, targets, bias, ignore_index, label_smoothing, reduction, chunk_size, backend,
                loss_dtype=torch.float32,
            )  # fmt: skip
    return _fused_linear_cross_entropy(
        hidden, weight, targets, bias, ignore_index, label_smoothing, reduction, chunk_size, backend, hidden.dtype
    )


def _fused_linear_cross_entropy(
    hidden, weight, targets, bias, ignore_index, label_smoothing, reduction, chunk_size, backend, loss_dtype
) -> torch.Tensor:
    _validate(hidden, weight, targets, bias, label_smoothing, reduction, chunk_size)
    name = OP.resolve(hidden.device, backend, dtype=hidden.dtype)
    if name == "reference":
        check_targets(targets, weight.shape[0], ignore_index, OP.name)
        loss = fused_linear_cross_entropy_reference(
            hidden, weight, targets, bias, ignore_index, label_smoothing, reduction, chunk_size
        )
        return loss.to(loss_dtype)
    H, V = hidden.shape[-1], weight.shape[0]
    h = hidden.reshape(-1, H).contiguous()  # (N, H)
    t = targets.reshape(-1).long().contiguous()  # (N,)
    w = weight.contiguous()
    b = None if bias is None else bias.contiguous()
    chunk = chunk_size or default_chunk_size(h.shape[0], V, hidden.dtype)
    needs_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (hidden, weight, bias))
    if reduction == "none" or not needs_grad:  # no gradients wanted: one GEMM per chunk instead of three
        loss, _ = _flce_none_fwd(h, w, t, b, int(ignore_index), float(label_smoothing), chunk, name)
        return _reduce(loss, t != ignore_index, reduction, loss_dtype, targets.shape)
    # a frozen weight (e.g. the LM head under LoRA) skips the (V, H) weight-gradient GEMM of every chunk
    loss = _flce_fwd(h, w, t, b, int(ignore_index), float(label_smoothing), reduction, chunk, name,
                     weight.requires_grad)[0]
    return loss.to(loss_dtype)
