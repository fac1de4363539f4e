"""Lesson 07 advanced tests: AdamW equals torch.optim.AdamW over ten steps of a real model (the readable per-tensor
loop and the foreach path), the scheduler classes drive an optimizer's lr like the pure functions, and Lion's state
is half of AdamW's."""

import copy

import pytest
import torch

from intro2llm.model.causal_lm import CausalLM
from intro2llm.model.config import ModelConfig
from intro2llm.optimizer import AdamW, Lion, WarmupCosineScheduler, build_scheduler, warmup_cosine_lr

VOCAB = 32


def model(seed=0):
    torch.manual_seed(seed)
    return CausalLM(ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=32))


@pytest.mark.task("_adamw_loop")
@pytest.mark.parametrize("foreach", [False, True])
def test_adamw_equals_torch(foreach):
    torch.manual_seed(0)
    a = model()
    b = copy.deepcopy(a)
    opt_a = AdamW(a.parameters(), lr=1e-2, foreach=foreach)
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2)
    for step in range(10):
        ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(step))
        for m, o in ((a, opt_a), (b, opt_b)):
            o.zero_grad()
            m(ids, labels=ids).loss.backward()
            o.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)
    # the state dicts are interchangeable with torch's
    torch.optim.AdamW(copy.deepcopy(a).parameters(), lr=1e-2).load_state_dict(opt_a.state_dict())


@pytest.mark.task("warmup_cosine_lr")
def test_scheduler_class_drives_the_optimizer_lr():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=3e-4)
    sched = WarmupCosineScheduler(opt, warmup_steps=10, total_steps=100, min_lr=3e-5)
    seen = []
    for _ in range(120):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([warmup_cosine_lr(k, 3e-4, 10, 100, 3e-5) for k in range(120)])
    assert max(seen) == pytest.approx(3e-4) and seen[-1] == pytest.approx(3e-5)
    assert all(x <= y for x, y in zip(seen[:10], seen[1:11]))  # warmup rises
    assert all(x >= y for x, y in zip(seen[10:100], seen[11:101]))  # then only decays
    # resuming: a fresh scheduler loaded from the state dict continues at the same step
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
    s2 = build_scheduler("cosine", opt2, 10, 100, 3e-5)
    s2.load_state_dict(sched.state_dict())
    assert s2.get_last_lr() == pytest.approx(sched.get_last_lr())


def test_lion_keeps_one_state_tensor_adamw_two():
    a, b = model(), model()
    opt_a, opt_l = AdamW(a.parameters()), Lion(b.parameters())
    for m, o in ((a, opt_a), (b, opt_l)):
        ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
        m(ids, labels=ids).loss.backward()
        o.step()

    def state_bytes(o):
        return sum(t.numel() * t.element_size() for s in o.state.values() for t in s.values()
                   if torch.is_tensor(t) and t.dim() > 0)

    n_bytes = sum(p.numel() * p.element_size() for p in a.parameters())
    assert state_bytes(opt_a) == 2 * n_bytes and state_bytes(opt_l) == n_bytes
