"""AdamW and Lion against torch.optim.AdamW and hand-computed steps; the weight-decay parameter groups."""

import copy
import math

import pytest
import torch
from torch import nn

from intro2llm.optimizer import AdamW, Lion, build_optimizer, param_groups


def _tiny_lm():
    from intro2llm.configs import get_config
    from intro2llm.model.causal_lm import CausalLM

    torch.manual_seed(0)
    return CausalLM(get_config("tiny"))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(11, 8)
        self.fc = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.out = nn.Linear(16, 11, bias=False)

    def forward(self, x):
        return self.out(self.norm(torch.relu(self.fc(self.embed_tokens(x)))))


def _net_loss(model, step):
    g = torch.Generator().manual_seed(step)
    x = torch.randint(0, 11, (4, 5), generator=g)
    return nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())


def _run(model, opt, steps, loss_fn):
    for s in range(steps):
        opt.zero_grad(set_to_none=True)
        loss_fn(model, s).backward()
        opt.step()


@pytest.fixture
def one_thread():
    # 10M parameters x 100 steps x 2 optimizers: with the 2 cores shared, one thread avoids OpenMP contention
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_adamw_matches_torch_on_tiny_model_100_steps(one_thread):
    model = _tiny_lm()
    ref = copy.deepcopy(model)
    vocab = model.config.vocab_size

    def loss_fn(m, step):
        g = torch.Generator().manual_seed(step)
        ids = torch.randint(0, vocab, (1, 8), generator=g)
        return m(ids, labels=ids).loss

    kw = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    _run(model, AdamW(param_groups(model, 0.1), **kw), 100, loss_fn)
    _run(ref, torch.optim.AdamW(param_groups(ref, 0.1), **kw), 100, loss_fn)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=f"parameter {name} differs from torch.optim.AdamW")


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("amsgrad,maximize", [(False, False), (True, False), (False, True)])
def test_adamw_matches_torch_options(foreach, amsgrad, maximize):
    torch.manual_seed(0)
    model = _Net()
    ref = copy.deepcopy(model)
    kw = dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05, amsgrad=amsgrad, maximize=maximize)
    _run(model, AdamW(model.parameters(), foreach=foreach, **kw), 30, _net_loss)
    _run(ref, torch.optim.AdamW(ref.parameters(), foreach=False, **kw), 30, _net_loss)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


@pytest.mark.parametrize("maximize", [False, True])
def test_fused_adamw_equals_foreach_to_rounding(maximize):
    from intro2llm.optimizer.adamw import fused_unavailable

    model = _Net()
    if fused_unavailable(model.parameters()) is not None:  # CI builds the extension (INTRO2LLM_REQUIRE_EXT=1)
        pytest.skip(f"fused AdamW unavailable: {fused_unavailable(model.parameters())}")
    ref = copy.deepcopy(model)
    kw = dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, maximize=maximize)
    fused = AdamW(param_groups(model, 0.05), fused=True, **kw)
    foreach = AdamW(param_groups(ref, 0.05), **kw)
    _run(model, fused, 5, _net_loss)
    _run(ref, foreach, 5, _net_loss)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(fused.state[p][key], foreach.state[q][key], atol=1e-7, rtol=1e-4)
    assert build_optimizer("adamw", model, 1e-3).param_groups[0]["fused"] is True  # the trainer's optimizer


def test_fused_adamw_refuses_what_it_cannot_run():
    p64 = nn.Parameter(torch.ones(3, dtype=torch.float64))
    p64.grad = torch.ones(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="float32 on CPU"):
        AdamW([p64], fused=True).step()
    p = nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match="amsgrad"):
        AdamW([p], fused=True, amsgrad=True).step()
    with pytest.raises(ValueError, match="exclude each other"):
        AdamW([p], fused=True, foreach=True)


def test_adamw_hand_computed_step():
    p = nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = AdamW([p], lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.5)
    grads = [torch.tensor([0.5, -1.0]), torch.tensor([0.2, 3.0])]
    m = [0.0, 0.0]
    v = [0.0, 0.0]
    w = [1.0, -2.0]
    for t, g in enumerate(grads, start=1):
        p.grad = g.clone()
        opt.step()
        for i in range(2):
            w[i] *= 1 - 0.1 * 0.5
            m[i] = 0.9 * m[i] + 0.1 * g[i].item()
            v[i] = 0.999 * v[i] + 0.001 * g[i].item() ** 2
            m_hat, v_hat = m[i] / (1 - 0.9**t), v[i] / (1 - 0.999**t)
            w[i] -= 0.1 * m_hat / (math.sqrt(v_hat) + 1e-8)
    torch.testing.assert_close(p.detach(), torch.tensor(w), atol=1e-6, rtol=0)


def test_adamw_state_dict_round_trips_with_torch():
    torch.manual_seed(0)
    model = _Net()
    ref = copy.deepcopy(model)
    ours = AdamW(model.parameters(), lr=1e-2)
    theirs = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    _run(model, ours, 5, _net_loss)
    _run(ref, theirs, 5, _net_loss)
    # Our state loads into torch's optimizer and vice versa; continuing gives the same weights.
    ours2 = AdamW(ref.parameters(), lr=1e-2)
    ours2.load_state_dict(theirs.state_dict())
    theirs2 = torch.optim.AdamW(model.parameters(), lr=1e-2)
    theirs2.load_state_dict(ours.state_dict())
    sd = ours.state_dict()
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert sd["state"][0]["step"].item() == 5
    _run(model, theirs2, 5, lambda m, s: _net_loss(m, s + 5))
    _run(ref, ours2, 5, lambda m, s: _net_loss(m, s + 5))
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


def test_adamw_rejects_bad_arguments():
    p = [nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="lr"):
        AdamW(p, lr=-1.0)
    with pytest.raises(ValueError, match="betas"):
        AdamW(p, betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="capturable"):
        AdamW(p, capturable=True)


def test_lion_hand_checked_sign_update():
    p = nn.Parameter(torch.tensor([1.0, -1.0, 0.5, 2.0]))
    opt = Lion([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.2)
    g1 = torch.tensor([0.3, -0.7, 0.0, -5.0])
    p.grad = g1.clone()
    opt.step()
    # m = 0: c = 0.1*g → sign(g); p = p*(1 - 0.02) - 0.1*sign(g); m = 0.01*g
    expected = torch.tensor([1.0 * 0.98 - 0.1, -1.0 * 0.98 + 0.1, 0.5 * 0.98, 2.0 * 0.98 + 0.1])
    torch.testing.assert_close(p.detach(), expected)
    torch.testing.assert_close(opt.state[p]["exp_avg"], 0.01 * g1)
    # Second step: c = 0.9*m + 0.1*g2; choose g2 so that the sign flips only where momentum is weak.
    g2 = torch.tensor([-0.01, -0.01, 1.0, 1.0])
    p.grad = g2.clone()
    opt.step()
    c = 0.9 * 0.01 * g1 + 0.1 * g2  # [0.0017, -0.0073, 0.1, 0.055]
    expected = expected * 0.98 - 0.1 * torch.sign(c)
    torch.testing.assert_close(p.detach(), expected)
    torch.testing.assert_close(opt.state[p]["exp_avg"], 0.99 * 0.01 * g1 + 0.01 * g2)


def test_lion_reduces_loss():
    torch.manual_seed(0)
    model = _Net()
    opt = Lion(model.parameters(), lr=3e-3)
    before = _net_loss(model, 0).item()
    _run(model, opt, 50, lambda m, s: _net_loss(m, 0))
    assert _net_loss(model, 0).item() < before - 0.5


def test_param_groups_skip_norms_biases_embeddings():
    model = _Net()
    groups = param_groups(model, 0.1)
    by_decay = {g["weight_decay"]: set(g["names"]) for g in groups}
    assert by_decay[0.1] == {"fc.weight", "out.weight"}
    assert by_decay[0.0] == {"embed_tokens.weight", "fc.bias", "norm.weight", "norm.bias"}
    # tied weights appear once, in the no-decay group (they are the embedding)
    model.out.weight = model.embed_tokens.weight
    groups = param_groups(model, 0.1)
    n = sum(len(g["params"]) for g in groups)
    assert n == len(list(model.parameters()))
    assert "out.weight" not in {name for g in groups for name in g["names"]}
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer("sgdx", model, lr=1e-3)
