"""Fused linear + log-prob: ``log_softmax(hidden @ weight.T / temperature)[target]`` without the (N, V) logits.

What DPO, PPO and GRPO need from a policy is not a loss but the log-probability of each response token,
``log p(t_i | x_<i) = z_{i,t_i} - logsumexp_j z_{i,j}`` with ``z = h W^T / T``. Materializing ``z`` costs N·V
floats (2 × 2 × 256 tokens × 32k vocabulary × 4 bytes = 130 MB for one small DPO batch, three times that with
the fp32 upcast and autograd's softmax). As in ``fused_linear_cross_entropy`` (Liger-Kernel's scheme), the fast
paths walk the tokens in chunks of ~16 MiB of logits:

    forward   per chunk: z = (h / T) W^T (GEMM), row kernel -> -log p                 saves nothing but the inputs
    backward  per chunk: z again (GEMM), in-place row kernel z <- onehot(t) - softmax(z) = d log p / dz,
              grad_h = g ⊙ (dz W) / T, grad_W += dz^T (g ⊙ h / T) (two GEMMs)

``log p = -cross_entropy(z, t)``, so the row kernels are exactly the cross-entropy kernels of the chosen backend
(C++ ``intro2llm::cross_entropy_fwd`` and ``cross_entropy_fwd_bwd_`` with grad_scale -1, Triton, CUDA); the chunk
loop and its helpers are shared with ``fused_linear_cross_entropy``. Unlike the loss, the upstream gradient of a
log-prob differs per token (DPO weights each sequence by its own sigmoid), so the backward recomputes each chunk's
logits instead of storing gradients in the forward: one more GEMM, and no (V, H) gradient buffer between passes.

Not handled: a bias on the head (no LM head here has one), double backward. Ignored targets give 0 and no gradient.
"""

from __future__ import annotations

import torch

from intro2llm.ops import _dispatch
from intro2llm.ops.cross_entropy import check_targets, fwd_and_bwd, fwd_bwd_inplace
from intro2llm.ops.fused_linear_cross_entropy import (
    _accumulate,
    _chunk_logits,
    _grad_buffers,
    check_head_inputs,
    default_chunk_size,
)

OP = _dispatch.Op(  # the fast paths are torch GEMMs around the cross_entropy kernels of the chosen backend
    "fused_linear_logprobs", backends=("reference", "triton", "cpp", "cuda"), compiled="cross_entropy_fwd"
)


def fused_linear_logprobs_reference(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Eager log-probs: hidden (..., H), weight (V, H), targets (...) int64 → (...) fp32, 0 where ignored.

    The oracle (what TRL computes): full logits in hidden's dtype, upcast, log_softmax, gather.
    Memory: logits + fp32 copy + log_softmax output (+ its autograd buffers), each N·V.
    """
    logits = torch.nn.functional.linear(hidden, weight.to(hidden.dtype)).float() / temperature  # (..., V)
    mask = targets != ignore_index
    safe = torch.where(mask, targets, torch.zeros_like(targets)).long()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)  # (...)
    return torch.where(mask, logp, torch.zeros_like(logp))


def _validate(hidden, weight, targets, temperature, chunk_size) -> None:
    check_head_inputs(OP, hidden, weight, targets)
    if not isinstance(temperature, (int, float)) or not temperature > 0 or temperature == float("inf"):
        raise ValueError(f"{OP}: temperature must be a finite number > 0, got {temperature!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{OP}: chunk_size must be a positive int or None, got {chunk_size!r}")


# ---------------------------------------------------------------------------------------------------------------
# Fast paths (cpp / triton / cuda): one custom op pair; the backend names the row kernels inside the chunk loop.
# ---------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("intro2llm::fused_linear_logprobs_fwd", mutates_args=())
def _fllp_fwd(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, temperature: float,
              chunk_size: int, backend: str) -> torch.Tensor:
    """hidden (N, H), weight (V, H), targets (N,) → log p (N,) fp32 (0 where ignored)."""
    check_targets(targets, weight.shape[0], ignore_index, OP.name)
    ce_fwd, _ = fwd_and_bwd(backend)
    w = weight.to(hidden.dtype)
    inv_t = 1.0 / temperature
    out = []
    buf = hidden.new_empty(min(chunk_size, hidden.shape[0]), weight.shape[0])  # the one (n, V) buffer
    for start in range(0, hidden.shape[0], chunk_size):
        h = hidden[start : start + chunk_size]  # (n, H)
        if temperature != 1.0:
            h = h * inv_t  # (n, H): cheaper than scaling the (n, V) logits
        loss_rows, _ = ce_fwd(_chunk_logits(h, w, None, buf), targets[start : start + chunk_size],
                                ignore_index, 0.0, 0.0)
        out.append(loss_rows.neg())  # -0.0 at ignored rows, equal to 0
    if not out:
        return hidden.new_empty(0, dtype=torch.float32)
    return torch.cat(out)


def _fllp_fake_fwd(hidden, weight, targets, ignore_index, temperature, chunk_size, backend):
    return hidden.new_empty(hidden.shape[:1], dtype=torch.float32)


@torch.library.custom_op("intro2llm::fused_linear_logprobs_bwd", mutates_args=())
def _fllp_bwd(
    grad_logp: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
    temperature: float, chunk_size: int, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (hidden (N, H), weight (V, H)) of sum_i grad_logp_i · log p_i.

    The per-token factor g_i is kept out of the (n, V) pass: the in-place row kernel turns the chunk's logits into
    d log p / dz = onehot(t) - softmax(z) (cross-entropy's gradient scaled by -1), and g_i scales the (n, H) sides
    instead — grad_h_i = g_i (dz_i W) / T, grad_W += dz^T (g ⊙ h / T) — so no second (n, V) buffer exists.
    """
    kernel = fwd_bwd_inplace(backend)
    w = weight.to(hidden.dtype)
    inv_t = 1.0 / temperature
    N = hidden.shape[0]
    g = grad_logp.to(hidden.dtype).reshape(N, 1)  # (N, 1)
    grad_hidden = torch.empty_like(hidden)  # (N, H)
    gw32, _ = _grad_buffers(weight, None, N)
    buf = hidden.new_empty(min(chunk_size, N), weight.shape[0])  # the one (n, V) buffer
    for start in range(0, N, chunk_size):
        end = min(start + chunk_size, N)
        h = hidden[start:end]  # (n, H)
        if temperature != 1.0:
            h = h * inv_t
        dz = _chunk_logits(h, w, None, buf)  # (n, V) logits ...
        kernel(dz, targets[start:end], -1.0, ignore_index, 0.0, 0.0)  # ... become onehot - softmax (0: ignored)
        gh = grad_hidden[start:end]
        _accumulate(dz, h * g[start:end], w, gh, gw32, None, start == 0)  # gh = dz W, grad_W += dz^T (g h / T)
        gh.mul_(g[start:end] * inv_t if temperature != 1.0 else g[start:end])
    return grad_hidden, gw32.to(weight.dtype)


def _fllp_fake_bwd(grad_logp, hidden, weight, targets, ignore_index, temperature, chunk_size, backend):
    return torch.empty_like(hidden), torch.empty_like(weight)


def _fllp_setup_context(ctx, inputs, output):
    hidden, weight, targets, ignore_index, temperature, chunk_size, backend = inputs
    ctx.save_for_backward(hidden, weight, targets)
    ctx.params = (ignore_index, temperature, chunk_size, backend)


def _fllp_backward(bwd, ctx, grad_logp):
    hidden, weight, targets = ctx.saved_tensors
    gh, gw = bwd(grad_logp, hidden, weight, targets, *ctx.params)
    return gh, gw, None, None, None, None, None


_dispatch.register_kernels(
    _fllp_fwd, _fllp_bwd, fake_fwd=_fllp_fake_fwd, fake_bwd=_fllp_fake_bwd, backward=_fllp_backward,
    setup_context=_fllp_setup_context,
)


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """log p(target | hidden @ weight.T / temperature) per position, without materializing the logits.

    hidden (..., H) fp32/bf16/fp16 (fp64: reference only), weight (V, H), targets (...) int64 → (...) fp32,
    0 where ``targets == ignore_index``; differentiable w.r.t. hidden and weight. A weight in another dtype is used
    in hidden's dtype (its gradient comes back in its own). Under autocast the GEMMs run in the autocast dtype.
    """
    _validate(hidden, weight, targets, temperature, chunk_size)
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type=device_type, enabled=False):
            return fused_linear_logprobs(hidden.to(torch.get_autocast_dtype(device_type)), weight, targets,
                                         ignore_index=ignore_index, temperature=temperature, chunk_size=chunk_size,
                                         backend=backend)
    name = OP.resolve(hidden.device, backend, dtype=hidden.dtype)
    if name == "reference":
        check_targets(targets, weight.shape[0], ignore_index, OP.name)
        return fused_linear_logprobs_reference(hidden, weight, targets, ignore_index, temperature)
    H, V = hidden.shape[-1], weight.shape[0]
    h = hidden.reshape(-1, H).contiguous()  # (N, H)
    t = targets.reshape(-1).long().contiguous()  # (N,)
    chunk = chunk_size or default_chunk_size(h.shape[0], V, hidden.dtype)
    logp = _fllp_fwd(h, weight.contiguous(), t, int(ignore_index), float(temperature), chunk, name)
    return logp.reshape(targets.shape)
