"""Lion (EvoLved Sign Momentum): an update that only keeps the sign of an interpolated momentum.

Reference: Chen et al., "Symbolic Discovery of Optimization Algorithms" (2023), Algorithm 2. For gradient g:

    c <- beta1 * m + (1 - beta1) * g              # interpolation used for the update
    p <- p * (1 - lr * wd) - lr * sign(c)          # every coordinate moves by exactly lr (or 0)
    m <- beta2 * m + (1 - beta2) * g              # momentum tracked with a slower beta2

Lion keeps one state tensor per parameter (AdamW keeps two), and since |update| = lr per coordinate, it wants an
lr 3-10x smaller and a weight decay 3-10x larger than AdamW. Sharded (DTensor, FSDP2) parameters are updated
through their local shards (the update is elementwise). Not handled: sparse or complex gradients.
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT

from intro2llm.optimizer.adamw import evaluate_closure


class Lion(Optimizer):
    """Lion optimizer: ``Lion(params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0)``."""

    def __init__(self, params: ParamsT, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, *, maximize: bool = False) -> None:
        if not 0.0 <= lr:
            raise ValueError(f"Lion: lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] <= 1.0 and 0.0 <= betas[1] <= 1.0):
            raise ValueError(f"Lion: betas must be in [0, 1], got {betas}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Lion: weight_decay must be >= 0, got {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - same signature as torch optimizers
        """One Lion update of every parameter that has a gradient; returns ``closure()`` if given."""
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse or torch.is_complex(p):
                    raise ValueError("Lion: sparse gradients and complex parameters are not supported")
                g = -p.grad if group["maximize"] else p.grad
                state = self.state[p]
                if len(state) == 0:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                m = state["exp_avg"]
                if hasattr(p, "to_local"):  # FSDP2 DTensors: the update is elementwise, run it on this rank's shards
                    p, g, m = p.to_local(), g.to_local(), m.to_local()
                p.mul_(1 - lr * wd)
                update = m.lerp(g, 1 - beta1).sign_()  # sign(beta1*m + (1-beta1)*g)
                p.add_(update, alpha=-lr)
                m.lerp_(g, 1 - beta2)  # m = beta2*m + (1-beta2)*g
        return loss
