"""Learning-rate schedules: known values at given steps, torch-compatible stepping and state dicts."""

import math

import pytest
import torch

from intro2llm.optimizer import (
    AdamW,
    ConstantScheduler,
    WarmupCosineScheduler,
    WarmupLinearScheduler,
    WarmupStableDecayScheduler,
    build_scheduler,
)


def _opt(lr=1.0):
    return AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def _lrs(sched, n):
    out = []
    for _ in range(n):
        out.append(sched.optimizer.param_groups[0]["lr"])
        sched.optimizer.step()
        sched.step()
    return out


def test_warmup_cosine_values():
    lrs = _lrs(WarmupCosineScheduler(_opt(1.0), warmup_steps=4, total_steps=14, min_lr=0.1), 16)
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0)  # progress 0
    assert lrs[9] == pytest.approx(0.1 + 0.9 * 0.5)  # half way: (1 + cos(pi/2)) / 2 = 0.5
    assert lrs[14] == pytest.approx(0.1) and lrs[15] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


def test_torch_lambda_cosine_agrees():
    # Oracle: torch's LambdaLR with the textbook formula written independently.
    def f(s, w=10, t=50, lo=0.1):
        if s < w:
            return (s + 1) / w
        p = min((s - w) / (t - w), 1.0)
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * p))

    ours = _lrs(WarmupCosineScheduler(_opt(1.0), 10, 50, 0.1), 60)
    o2 = _opt(1.0)
    theirs = _lrs(torch.optim.lr_scheduler.LambdaLR(o2, f), 60)
    assert ours == pytest.approx(theirs, abs=1e-12)


def test_linear_constant_wsd_values():
    lin = _lrs(WarmupLinearScheduler(_opt(2.0), 2, 12, 0.0), 13)
    assert lin[:2] == pytest.approx([1.0, 2.0])
    assert lin[7] == pytest.approx(1.0) and lin[12] == pytest.approx(0.0)
    const = _lrs(ConstantScheduler(_opt(0.5), warmup_steps=2), 6)
    assert const == pytest.approx([0.25, 0.5, 0.5, 0.5, 0.5, 0.5])
    wsd = _lrs(WarmupStableDecayScheduler(_opt(1.0), 2, 20, min_lr=0.0, decay_steps=4), 21)
    assert wsd[:2] == pytest.approx([0.5, 1.0])
    assert wsd[2:16] == pytest.approx([1.0] * 14)
    assert wsd[16:21] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])


def test_state_dict_resume_continues_schedule():
    s1 = WarmupCosineScheduler(_opt(1.0), 3, 20, 0.0)
    full = _lrs(s1, 20)
    s2 = WarmupCosineScheduler(_opt(1.0), 3, 20, 0.0)
    first = _lrs(s2, 8)
    state = s2.state_dict()
    s3 = WarmupCosineScheduler(_opt(1.0), 3, 20, 0.0)
    s3.load_state_dict(state)
    s3.optimizer.param_groups[0]["lr"] = s3.get_last_lr()[0]
    assert first + _lrs(s3, 12) == pytest.approx(full)


def test_min_lr_per_group_and_bad_input():
    opt = AdamW([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1.0},
                 {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.01}])
    sched = WarmupCosineScheduler(opt, 0, 10, min_lr=0.1)
    assert sched.lr_at(10) == pytest.approx([0.1, 0.01])  # min_lr capped at the group's lr
    with pytest.raises(ValueError, match="warmup_steps"):
        WarmupCosineScheduler(_opt(), 20, 10)
    with pytest.raises(ValueError, match="unknown schedule"):
        build_scheduler("step", _opt(), 0, 10)
    with pytest.raises(ValueError, match="decay_steps"):
        WarmupStableDecayScheduler(_opt(), 5, 10, decay_steps=8)
