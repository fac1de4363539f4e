"""AdamW: Adam with decoupled weight decay, written out step by step.

Reference: Loshchilov & Hutter, "Decoupled Weight Decay Regularization" (ICLR 2019); Kingma & Ba, "Adam" (2015).
For each parameter p with gradient g at step t (1-based):

    p   <- p * (1 - lr * wd)                      # decoupled decay: not part of the gradient
    m   <- beta1 * m + (1 - beta1) * g            # first moment (written as lerp, like torch)
    v   <- beta2 * v + (1 - beta2) * g^2          # second moment
    p   <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

The constructor, the state names (``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``) and the order of the
floating-point operations follow ``torch.optim.AdamW``, so their state dicts load into each other. Three paths:

- ``foreach=True`` (the default): each line of the update runs over the whole list with ``torch._foreach_*``;
  agrees with ``torch.optim.AdamW`` to the last bit on CPU.
- ``foreach=False``: the readable per-tensor loop (the lesson's formulas), also bit-identical.
- ``fused=True``: ``intro2llm::adamw_step_`` (csrc/cpu/adamw.cpp) updates every tensor in one pass over p, g, m, v
  where the foreach path streams the optimizer state through memory ~8 times (tiny preset, 1 thread: see
  csrc/cpu/adamw.cpp for the figures). CPU float32 contiguous parameters, no ``amsgrad``, the C++ extension built;
  otherwise ``step`` raises ``ValueError`` naming what is missing (``fused_unavailable(params)`` asks first).
  Sharded (DTensor) parameters under FSDP2: the update is elementwise and p, g, m, v share one placement, so the op
  runs on each rank's local shards (``_local``) — no sharding strategy is needed.
  Equal to torch to ~1 ulp per step, not bit for bit (torch's sqrt is MKL's vector math, not always correctly
  rounded); ``build_optimizer("adamw", ...)`` turns it on where it applies.

Not handled: complex parameters, sparse gradients, ``capturable``/``differentiable`` (CUDA graphs and
differentiating through the step) — those raise ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT

from intro2llm.course import lesson_task


def evaluate_closure(closure) -> Any:  # noqa: ANN001 - a torch optimizer's closure or None
    """``closure()`` with gradients enabled (a ``step`` runs under no_grad), or None without one."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class AdamW(Optimizer):
    """AdamW with the signature of ``torch.optim.AdamW`` (see the module docstring for the update)."""

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        if isinstance(lr, torch.Tensor) or not 0.0 <= lr:
            raise ValueError(f"AdamW: lr must be a float >= 0, got {lr!r}")
        if not 0.0 <= eps:
            raise ValueError(f"AdamW: eps must be >= 0, got {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"AdamW: betas must be in [0, 1), got {betas}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"AdamW: weight_decay must be >= 0, got {weight_decay}")
        if capturable or differentiable:
            raise ValueError("AdamW: capturable=True and differentiable=True are not supported here")
        if fused and foreach:
            raise ValueError("AdamW: fused=True and foreach=True exclude each other")
        use_foreach = True if foreach is None else bool(foreach)  # foreach unless the per-tensor loop is asked for
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
            foreach=use_foreach, capturable=False, differentiable=False, fused=fused,
        )
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", True)
            for p in group["params"]:
                s = self.state.get(p, {})
                # torch stores step as a float32 tensor; accept older plain numbers too.
                if "step" in s and not torch.is_tensor(s["step"]):
                    s["step"] = torch.tensor(float(s["step"]), dtype=torch.float32)

    def _init_group(self, group: dict[str, Any]) -> tuple[list, list, list, list, list, list]:
        params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps = [], [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise ValueError("AdamW: sparse gradients are not supported")
            if torch.is_complex(p):
                raise ValueError("AdamW: complex parameters are not supported")
            state = self.state[p]
            if len(state) == 0:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["amsgrad"]:
                    state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            if group["amsgrad"]:
                max_sqs.append(state["max_exp_avg_sq"])
            steps.append(state["step"])
        return params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - same signature as torch optimizers
        """One AdamW update of every parameter that has a gradient; returns ``closure()`` if given."""
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps = self._init_group(group)
            if not params:
                continue
            if group.get("fused"):
                why_not = "amsgrad=True is not fused" if group["amsgrad"] else fused_unavailable(params, grads)
                if why_not is not None:
                    raise ValueError(f"AdamW(fused=True) cannot run: {why_not}")
                fn = _adamw_fused
            else:
                fn = _adamw_foreach if group["foreach"] else _adamw_loop
            fn(
                params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps,
                lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1], eps=group["eps"],
                weight_decay=group["weight_decay"], amsgrad=group["amsgrad"], maximize=group["maximize"],
            )
        return loss


@lesson_task(7)
def _adamw_loop(params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps, *, lr, beta1, beta2, eps, weight_decay,
                amsgrad, maximize) -> None:
    """The readable version: one parameter at a time (the lesson's formulas, in torch's operation order)."""
    for i, p in enumerate(params):
        g = -grads[i] if maximize else grads[i]
        m, v = exp_avgs[i], exp_avg_sqs[i]
        steps[i] += 1
        t = steps[i].item()
        p.mul_(1 - lr * weight_decay)  # decoupled weight decay
        m.lerp_(g, 1 - beta1)  # m = beta1*m + (1-beta1)*g
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)  # v = beta2*v + (1-beta2)*g^2
        step_size = lr / (1 - beta1**t)
        bc2_sqrt = (1 - beta2**t) ** 0.5
        if amsgrad:
            torch.maximum(max_sqs[i], v, out=max_sqs[i])
            v = max_sqs[i]
        denom = (v.sqrt() / bc2_sqrt).add_(eps)
        p.addcdiv_(m, denom, value=-step_size)


def _advance_steps(steps: list[torch.Tensor], lr: float, beta1: float, beta2: float) -> tuple[list, list]:
    """t += 1 for every tensor; returns the per-tensor -lr / (1 - beta1^t) and sqrt(1 - beta2^t)."""
    torch._foreach_add_(steps, 1.0)
    ts = [s.item() for s in steps]
    return [-(lr / (1 - beta1**t)) for t in ts], [(1 - beta2**t) ** 0.5 for t in ts]


def _adamw_foreach(params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps, *, lr, beta1, beta2, eps, weight_decay,
                   amsgrad, maximize) -> None:
    """The same update with ``torch._foreach_*``: each line runs over the whole list of tensors at once."""
    if maximize:
        grads = torch._foreach_neg(grads)
    step_sizes, bc2_sqrts = _advance_steps(steps, lr, beta1, beta2)
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    if amsgrad:
        torch._foreach_maximum_(max_sqs, exp_avg_sqs)
        denom = torch._foreach_sqrt(max_sqs)
    else:
        denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bc2_sqrts)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, step_sizes)


def _local(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """This rank's shard of each DTensor (FSDP2 parameters, their gradients and optimizer state); plain tensors as
    they are. ``to_local()`` is a view: updating it in place updates the DTensor."""
    return [t.to_local() if hasattr(t, "to_local") else t for t in tensors]


def fused_unavailable(params: Iterable[torch.Tensor], grads: Iterable[torch.Tensor] = ()) -> str | None:
    """Why ``AdamW(fused=True)`` cannot update these parameters (and gradients), or None (DTensors: their shards)."""
    from intro2llm.ops import _dispatch

    if _dispatch.extension_error() is not None or not hasattr(torch.ops.intro2llm, "adamw_step_"):
        return f"the C++ extension is not available ({_dispatch.extension_error()})"
    for t in _local([*params, *grads]):
        if t.device.type != "cpu" or t.dtype != torch.float32:
            return f"parameters and gradients must be float32 on CPU, got {t.dtype} on {t.device}"
        if not t.is_contiguous():
            return f"parameters and gradients must be contiguous (a tensor of shape {tuple(t.shape)} is not)"
    return None


def _adamw_fused(params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps, *, lr, beta1, beta2, eps, weight_decay,
                 amsgrad, maximize) -> None:
    """The same update in one C++ pass per tensor (``intro2llm::adamw_step_``); amsgrad is never fused. DTensors
    (FSDP2) are updated through their local shards: the op has no sharding strategy and needs none."""
    step_sizes, bc2_sqrts = _advance_steps(steps, lr, beta1, beta2)
    torch.ops.intro2llm.adamw_step_(_local(params), _local(grads), _local(exp_avgs), _local(exp_avg_sqs), step_sizes,
                                    bc2_sqrts, lr, beta1, beta2, eps, weight_decay, maximize)
