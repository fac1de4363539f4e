"""Lesson 12 basic tests: GAE by hand (λ = 0, λ = 1, the mask at the end of a response), the clipped surrogate
(ratio 1, zero gradient where clipped), value clipping, the adaptive KL coefficient, gradcheck in fp64."""

import pytest
import torch

from intro2llm.training.ppo_trainer import AdaptiveKLController, compute_gae, compute_ppo_loss, compute_value_loss


def gae_loop(r, v, gamma, lam):
    """The textbook recursion on one response (python floats)."""
    T = len(r)
    adv = [0.0] * T
    nxt = 0.0
    for t in reversed(range(T)):
        v_next = v[t + 1] if t + 1 < T else 0.0
        delta = r[t] + gamma * v_next - v[t]
        nxt = delta + gamma * lam * nxt
        adv[t] = nxt
    return adv


@pytest.mark.task("compute_gae")
def test_gae_lambda_zero_is_the_td_error():
    r = torch.tensor([[0.0, 0.5, 1.0]])
    v = torch.tensor([[0.2, 0.4, 0.3]])
    adv, ret = compute_gae(r, v, torch.ones(1, 3), gamma=0.9, lam=0.0)
    delta = torch.tensor([[0.0 + 0.9 * 0.4 - 0.2, 0.5 + 0.9 * 0.3 - 0.4, 1.0 + 0.0 - 0.3]])
    torch.testing.assert_close(adv, delta)
    torch.testing.assert_close(ret, delta + v)


@pytest.mark.task("compute_gae")
def test_gae_lambda_one_is_return_minus_value():
    r = torch.tensor([[0.1, -0.2, 0.0, 1.0]])
    v = torch.tensor([[0.5, 0.1, 0.7, 0.2]])
    adv, ret = compute_gae(r, v, torch.ones(1, 4), gamma=1.0, lam=1.0)
    returns = torch.tensor([[0.9, 0.8, 1.0, 1.0]])  # Σ_{k>=t} r_k
    torch.testing.assert_close(adv, returns - v)
    torch.testing.assert_close(ret, returns)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5)])
@pytest.mark.task("compute_gae")
def test_gae_stops_at_the_end_of_each_response(gamma, lam):
    torch.manual_seed(0)
    r, v = torch.randn(3, 6), torch.randn(3, 6)
    lengths = [6, 2, 4]
    mask = (torch.arange(6)[None] < torch.tensor(lengths)[:, None]).float()
    garbage_r, garbage_v = r.clone(), v.clone()
    garbage_r[mask == 0], garbage_v[mask == 0] = 1e3, -1e3  # what lies past the end must not leak in
    adv, ret = compute_gae(garbage_r, garbage_v, mask, gamma, lam)
    for i, n in enumerate(lengths):
        expected = torch.tensor(gae_loop(r[i, :n].tolist(), v[i, :n].tolist(), gamma, lam))
        torch.testing.assert_close(adv[i, :n], expected)
        assert (adv[i, n:] == 0).all() and (ret[i, n:] == 0).all()


@pytest.mark.task("compute_ppo_loss")
def test_ppo_loss_at_ratio_one_is_minus_mean_advantage():
    lp = torch.log(torch.rand(4, 5))
    adv = torch.randn(4, 5)
    mask = torch.ones(4, 5)
    mask[1, 3:] = 0
    loss, stats = compute_ppo_loss(lp, lp, adv, mask)
    torch.testing.assert_close(loss, -(adv * mask).sum() / mask.sum())
    assert stats["clip_frac"] == 0 and stats["approx_kl"] == 0


@pytest.mark.task("compute_ppo_loss")
def test_zero_gradient_where_the_ratio_is_clipped_on_the_advantages_side():
    old = torch.zeros(4)
    # ratio 1.5 with A > 0 (clipped), 0.5 with A < 0 (clipped), 0.5 with A > 0 and 1.5 with A < 0 (not clipped)
    lp = torch.log(torch.tensor([1.5, 0.5, 0.5, 1.5])).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss, stats = compute_ppo_loss(lp[None], old[None], adv[None], torch.ones(1, 4), clip_eps=0.2)
    loss.backward()
    assert lp.grad[0] == 0 and lp.grad[1] == 0
    assert lp.grad[2] != 0 and lp.grad[3] != 0
    assert stats["clip_frac"] == pytest.approx(0.5)


@pytest.mark.task("compute_value_loss")
def test_value_clipping_by_hand():
    v_old = torch.tensor([[0.0, 0.0]])
    v = torch.tensor([[1.0, 0.1]])
    ret = torch.tensor([[2.0, 2.0]])
    loss, stats = compute_value_loss(v, v_old, ret, torch.ones(1, 2), clip_range=0.2)
    # element 0: clipped V = 0.2, (0.2-2)^2 = 3.24 > (1-2)^2 = 1 -> 3.24 ; element 1: (0.1-2)^2 = 3.61
    assert loss.item() == pytest.approx(0.5 * (3.24 + 3.61) / 2)
    assert stats["vf_clip_frac"].item() == pytest.approx(0.5)


def test_adaptive_kl_coefficient_moves_toward_the_target():
    ctl = AdaptiveKLController(0.1, target=1.0, horizon=100)
    ctl.update(current_kl=5.0, n_steps=10)  # too far from the reference: raise β (error clipped at +0.2)
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    ctl.update(current_kl=0.0, n_steps=10)
    assert ctl.value < 0.1 * 1.02
    fixed = AdaptiveKLController(0.1)
    fixed.update(5.0, 10)
    assert fixed.value == 0.1


@pytest.mark.task("compute_ppo_loss", "compute_value_loss", "compute_gae")
def test_gradcheck_fp64():
    torch.manual_seed(0)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    old = torch.randn(2, 4, dtype=torch.float64)
    adv = torch.randn(2, 4, dtype=torch.float64)
    lp = (old + 0.1 * torch.randn(2, 4, dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: compute_ppo_loss(x, old, adv, mask, 0.2)[0], (lp,))
    v_old, ret = torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    v = (v_old + 0.05 * torch.randn(2, 4, dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: compute_value_loss(x, v_old, ret, mask, 0.2)[0], (v,))
    r = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    vals = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: compute_gae(a, b, mask, 0.99, 0.9), (r, vals))


@pytest.mark.task("compute_ppo_loss", "compute_gae")
def test_bad_input():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="clip_eps must be > 0"):
        compute_ppo_loss(x, x, x, torch.ones(1, 2), clip_eps=0.0)
    with pytest.raises(ValueError, match="same"):
        compute_gae(torch.zeros(1, 2), torch.zeros(1, 3), torch.ones(1, 2))
    with pytest.raises(ValueError, match="lam"):
        compute_gae(x, x, torch.ones(1, 2), lam=1.5)
