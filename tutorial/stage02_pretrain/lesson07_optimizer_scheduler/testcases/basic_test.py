"""Lesson 07 basic tests: AdamW (the readable per-tensor loop and the foreach path) and Lion by hand, the
learning-rate schedules' values, weight-decay groups. (The cross-entropy test moved to lesson 06, gradient
accumulation to lesson 08.)"""

import math

import pytest
import torch
from torch import nn

from intro2llm.optimizer import (
    AdamW,
    Lion,
    param_groups,
    warmup_constant_lr,
    warmup_cosine_lr,
    warmup_linear_lr,
    warmup_stable_decay_lr,
)


@pytest.mark.task("_adamw_loop")
@pytest.mark.parametrize("foreach", [False, True])
def test_adamw_first_step_by_hand(foreach):
    # At t = 1: m_hat = g and v_hat = g^2, so the update is lr * g / (|g| + eps) = lr * sign(g) (almost).
    p = nn.Parameter(torch.tensor([2.0, -3.0]))
    opt = AdamW([p], lr=0.1, weight_decay=0.0, foreach=foreach)
    p.grad = torch.tensor([0.4, -10.0])
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([1.9, -2.9]), atol=1e-6, rtol=0)


@pytest.mark.task("_adamw_loop")
@pytest.mark.parametrize("foreach", [False, True])
def test_adamw_decay_is_decoupled(foreach):
    # With a zero gradient Adam's update is 0/(0+eps) = 0: only the decay acts, p <- p (1 - lr wd).
    p = nn.Parameter(torch.tensor([1.0]))
    opt = AdamW([p], lr=0.5, weight_decay=0.2, foreach=foreach)
    p.grad = torch.zeros(1)
    opt.step()
    assert p.item() == pytest.approx(0.9)


@pytest.mark.task("_adamw_loop")
@pytest.mark.parametrize("foreach", [False, True])
def test_adamw_second_step_by_hand(foreach):
    p = nn.Parameter(torch.tensor([0.0]))
    opt = AdamW([p], lr=1.0, betas=(0.5, 0.5), eps=0.0, weight_decay=0.0, foreach=foreach)
    for g in (1.0, 3.0):
        p.grad = torch.tensor([g])
        opt.step()
    # m = 0.5*0.5 + 0.5*3 = 1.75, v = 0.5*0.5 + 0.5*9 = 4.75; m_hat = 1.75/0.75, v_hat = 4.75/0.75
    expected = -1.0 - (1.75 / 0.75) / math.sqrt(4.75 / 0.75)
    assert p.item() == pytest.approx(expected, abs=1e-6)


def test_lion_moves_every_coordinate_by_lr():
    p = nn.Parameter(torch.tensor([1.0, 1.0, 1.0]))
    opt = Lion([p], lr=0.01)
    p.grad = torch.tensor([1e-6, -5.0, 0.0])
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([0.99, 1.01, 1.0]))


@pytest.mark.task("warmup_cosine_lr")
def test_schedule_values():
    # warmup 10 to lr 1.0, cosine to 0.1 at step 110
    assert warmup_cosine_lr(0, 1.0, 10, 110, 0.1) == pytest.approx(0.1)
    assert warmup_cosine_lr(9, 1.0, 10, 110, 0.1) == pytest.approx(1.0)
    assert warmup_cosine_lr(60, 1.0, 10, 110, 0.1) == pytest.approx(0.55)  # half way: (1 + 0.1) / 2
    assert warmup_cosine_lr(110, 1.0, 10, 110, 0.1) == pytest.approx(0.1)
    assert warmup_cosine_lr(500, 1.0, 10, 110, 0.1) == pytest.approx(0.1)
    assert warmup_linear_lr(60, 1.0, 10, 110, 0.0) == pytest.approx(0.5)
    assert warmup_constant_lr(4, 2.0, 10) == pytest.approx(1.0)
    assert warmup_stable_decay_lr(50, 1.0, 10, 110, decay_steps=20) == pytest.approx(1.0)
    assert warmup_stable_decay_lr(100, 1.0, 10, 110, decay_steps=20) == pytest.approx(0.5)


def test_no_weight_decay_for_norms_biases_embeddings():
    model = nn.ModuleDict({"embed": nn.Embedding(5, 4), "proj": nn.Linear(4, 4), "norm": nn.LayerNorm(4)})
    groups = {g["weight_decay"]: sorted(g["names"]) for g in param_groups(model, 0.1)}
    assert groups == {0.1: ["proj.weight"], 0.0: ["embed.weight", "norm.bias", "norm.weight", "proj.bias"]}
