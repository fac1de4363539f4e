"""Learning-rate schedules: warmup + cosine, linear, constant, and warmup-stable-decay (WSD).

Each schedule is a pure function of the step (``warmup_cosine_lr`` …, easy to test and plot) wrapped in a
``torch.optim.lr_scheduler.LRScheduler`` subclass, so ``scheduler.step()`` after each ``optimizer.step()`` and
``state_dict()``/``load_state_dict()`` work as usual. ``step`` is 0-based: the lr used by optimizer step k is
``lr_at(k)``. Warmup is linear, ``max_lr * (k + 1) / warmup_steps``, so the first step already has a nonzero lr and
step ``warmup_steps - 1`` reaches ``max_lr``.

    cosine:  lr = min_lr + (max_lr - min_lr) * (1 + cos(pi * progress)) / 2     (Loshchilov & Hutter, SGDR, 2017)
    linear:  lr = min_lr + (max_lr - min_lr) * (1 - progress)
    WSD:     max_lr until step total - decay_steps, then decay to min_lr over decay_steps  (Hu et al., MiniCPM, 2024)

with ``progress = (k - warmup) / (total - warmup)`` clipped to [0, 1]; after ``total_steps`` the lr stays at min_lr.
``min_lr`` is absolute (the same for every parameter group, capped at the group's own lr).
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from intro2llm.course import lesson_task


def _check(warmup_steps: int, total_steps: int, min_lr: float) -> None:
    if warmup_steps < 0 or total_steps < 1:
        raise ValueError(f"schedule: need warmup_steps >= 0 and total_steps >= 1, got {warmup_steps}, {total_steps}")
    if warmup_steps > total_steps:
        raise ValueError(f"schedule: warmup_steps={warmup_steps} > total_steps={total_steps}")
    if min_lr < 0:
        raise ValueError(f"schedule: min_lr must be >= 0, got {min_lr}")


def _warmup(step: int, max_lr: float, warmup_steps: int) -> float | None:
    return max_lr * (step + 1) / warmup_steps if step < warmup_steps else None


def _progress(step: int, start: int, end: int) -> float:
    return min(max((step - start) / max(1, end - start), 0.0), 1.0)


@lesson_task(7)
def warmup_cosine_lr(step: int, max_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """Linear warmup to ``max_lr``, then a half cosine down to ``min_lr`` at ``total_steps``."""
    w = _warmup(step, max_lr, warmup_steps)
    if w is not None:
        return w
    p = _progress(step, warmup_steps, total_steps)
    return min_lr + (max_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))


def warmup_linear_lr(step: int, max_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """Linear warmup, then a straight line down to ``min_lr`` at ``total_steps``."""
    w = _warmup(step, max_lr, warmup_steps)
    if w is not None:
        return w
    return min_lr + (max_lr - min_lr) * (1.0 - _progress(step, warmup_steps, total_steps))


def warmup_constant_lr(step: int, max_lr: float, warmup_steps: int = 0) -> float:
    """Linear warmup, then ``max_lr`` forever."""
    w = _warmup(step, max_lr, warmup_steps)
    return max_lr if w is None else w


def warmup_stable_decay_lr(
    step: int,
    max_lr: float,
    warmup_steps: int,
    total_steps: int,
    decay_steps: int,
    min_lr: float = 0.0,
    decay: str = "linear",
) -> float:
    """WSD: warmup, a long plateau at ``max_lr``, then the last ``decay_steps`` go to ``min_lr``.

    ``decay``: ``"linear"``, ``"cosine"`` or ``"sqrt"`` (1 - sqrt(progress), as in MiniCPM).
    """
    w = _warmup(step, max_lr, warmup_steps)
    if w is not None:
        return w
    start = total_steps - decay_steps
    if step < start:
        return max_lr
    p = _progress(step, start, total_steps)
    if decay == "linear":
        f = 1.0 - p
    elif decay == "cosine":
        f = 0.5 * (1.0 + math.cos(math.pi * p))
    elif decay == "sqrt":
        f = 1.0 - math.sqrt(p)
    else:
        raise ValueError(f"warmup_stable_decay_lr: decay must be 'linear', 'cosine' or 'sqrt', got {decay!r}")
    return min_lr + (max_lr - min_lr) * f


class _FunctionScheduler(LRScheduler):
    """Sets every group's lr to ``self._lr_at(step, base_lr, min_lr)``; subclasses define ``_lr_at``."""

    def __init__(self, optimizer: Optimizer, last_epoch: int = -1) -> None:
        super().__init__(optimizer, last_epoch)

    def _lr_at(self, step: int, base_lr: float, min_lr: float) -> float:
        raise NotImplementedError

    def lr_at(self, step: int) -> list[float]:
        """The lr of each parameter group at 0-based optimizer step ``step``."""
        min_lr = getattr(self, "min_lr", 0.0)
        return [self._lr_at(step, base, min(min_lr, base)) for base in self.base_lrs]

    def get_lr(self) -> list[float]:
        return self.lr_at(self.last_epoch)


class _WarmupDecayScheduler(_FunctionScheduler):
    """Warmup then decay to ``min_lr`` at ``total_steps``; subclasses name the schedule function ``_schedule``."""

    def __init__(self, optimizer: Optimizer, warmup_steps: int, total_steps: int, min_lr: float = 0.0,
                 last_epoch: int = -1) -> None:
        _check(warmup_steps, total_steps, min_lr)
        self.warmup_steps, self.total_steps, self.min_lr = warmup_steps, total_steps, min_lr
        super().__init__(optimizer, last_epoch)

    def _lr_at(self, step: int, base_lr: float, min_lr: float) -> float:
        return self._schedule(step, base_lr, self.warmup_steps, self.total_steps, min_lr)


class WarmupCosineScheduler(_WarmupDecayScheduler):
    """Linear warmup then cosine decay to ``min_lr`` (see ``warmup_cosine_lr``)."""

    _schedule = staticmethod(warmup_cosine_lr)


class WarmupLinearScheduler(_WarmupDecayScheduler):
    """Linear warmup then linear decay to ``min_lr`` (see ``warmup_linear_lr``)."""

    _schedule = staticmethod(warmup_linear_lr)


class ConstantScheduler(_FunctionScheduler):
    """Optional linear warmup, then the optimizer's lr unchanged."""

    def __init__(self, optimizer: Optimizer, warmup_steps: int = 0, last_epoch: int = -1) -> None:
        if warmup_steps < 0:
            raise ValueError(f"ConstantScheduler: warmup_steps must be >= 0, got {warmup_steps}")
        self.warmup_steps = warmup_steps
        super().__init__(optimizer, last_epoch)

    def _lr_at(self, step: int, base_lr: float, min_lr: float) -> float:
        return warmup_constant_lr(step, base_lr, self.warmup_steps)


class WarmupStableDecayScheduler(_FunctionScheduler):
    """Warmup-stable-decay; ``decay_steps`` defaults to 20% of ``total_steps`` (see ``warmup_stable_decay_lr``)."""

    def __init__(self, optimizer: Optimizer, warmup_steps: int, total_steps: int, min_lr: float = 0.0,
                 decay_steps: int | None = None, decay: str = "linear", last_epoch: int = -1) -> None:
        _check(warmup_steps, total_steps, min_lr)
        if decay_steps is None:
            decay_steps = max(1, round(0.2 * total_steps))
        if not 0 < decay_steps <= total_steps - warmup_steps:
            raise ValueError(
                f"WarmupStableDecayScheduler: need 0 < decay_steps <= total_steps - warmup_steps, got "
                f"decay_steps={decay_steps}, total_steps={total_steps}, warmup_steps={warmup_steps}"
            )
        if decay not in ("linear", "cosine", "sqrt"):
            raise ValueError(f"WarmupStableDecayScheduler: decay must be 'linear', 'cosine' or 'sqrt', got {decay!r}")
        self.warmup_steps, self.total_steps, self.min_lr = warmup_steps, total_steps, min_lr
        self.decay_steps, self.decay = decay_steps, decay
        super().__init__(optimizer, last_epoch)

    def _lr_at(self, step: int, base_lr: float, min_lr: float) -> float:
        return warmup_stable_decay_lr(step, base_lr, self.warmup_steps, self.total_steps, self.decay_steps, min_lr,
                                      self.decay)


SCHEDULES = ("cosine", "linear", "constant", "wsd")


def build_scheduler(name: str, optimizer: Optimizer, warmup_steps: int, total_steps: int,
                    min_lr: float = 0.0) -> LRScheduler:
    """Build a schedule by name: ``cosine``, ``linear``, ``constant`` or ``wsd``."""
    if name == "cosine":
        return WarmupCosineScheduler(optimizer, warmup_steps, total_steps, min_lr)
    if name == "linear":
        return WarmupLinearScheduler(optimizer, warmup_steps, total_steps, min_lr)
    if name == "constant":
        return ConstantScheduler(optimizer, warmup_steps)
    if name == "wsd":
        return WarmupStableDecayScheduler(optimizer, warmup_steps, total_steps, min_lr)
    raise ValueError(f"unknown schedule {name!r}; choose one of {SCHEDULES}")
