"""Lesson 13 basic tests: group-normalized advantages, the softmax weights of the course's objective, the GRPO
loss at ratio 1, DAPO's clip-higher, the loss aggregation modes, gradcheck in fp64, bad input."""

import pytest
import torch

from intro2llm.data.grpo_dataset import GRPODataset
from intro2llm.training.grpo_trainer import compute_grpo_loss, group_advantages, softmax_group_weights


@pytest.mark.task("group_advantages")
def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.1, 0.1, 0.1, 0.4])
    a = group_advantages(r, 4)
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std()  # unbiased, as TRL
    torch.testing.assert_close(a[:4], (torch.tensor([1.0, 0, 0, 1]) - 0.5) / (std + 1e-4))
    torch.testing.assert_close(group_advantages(r, 4, scale_rewards=False)[4:], torch.tensor([-0.075] * 3 + [0.225]))


@pytest.mark.task("group_advantages")
def test_group_advantages_invariant_to_a_constant_per_group():
    torch.manual_seed(0)
    r = torch.rand(12)
    shift = torch.tensor([3.0, -7.0, 0.5]).repeat_interleave(4)
    torch.testing.assert_close(group_advantages(r + shift, 4), group_advantages(r, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(group_advantages(r + shift, 4, scale_rewards=False),
                               group_advantages(r, 4, scale_rewards=False), atol=1e-5, rtol=0)


@pytest.mark.task("group_advantages", "compute_grpo_loss")
def test_all_equal_rewards_give_zero_advantages_not_nan():
    a = group_advantages(torch.tensor([0.1, 0.1, 0.1, 1.0, 1.0, 1.0]), 3)
    assert torch.isfinite(a).all() and (a == 0).all()
    # and then the GRPO loss has no policy gradient at all (only a KL term would remain)
    lp = torch.log(torch.rand(6, 3)).requires_grad_(True)
    loss, _ = compute_grpo_loss(lp, lp.detach(), a, torch.ones(6, 3))
    loss.backward()
    assert loss.item() == 0 and (lp.grad == 0).all()


@pytest.mark.task("softmax_group_weights")
def test_softmax_weights_sum_to_one_per_group_and_follow_the_reward():
    s = torch.tensor([0.0, 1.0, 2.0, 5.0, 5.0, 5.0])
    w = softmax_group_weights(s, 3)
    torch.testing.assert_close(w.view(2, 3).sum(1), torch.ones(2))
    assert w[0] < w[1] < w[2]
    torch.testing.assert_close(w[3:], torch.full((3,), 1 / 3))  # equal scores: equal weights, still positive
    sharp = softmax_group_weights(s, 3, temperature=0.01)
    assert sharp[2] > 0.999  # τ → 0: all the weight on the best response


@pytest.mark.task("compute_grpo_loss")
def test_grpo_loss_at_ratio_one():
    torch.manual_seed(1)
    lp = torch.log(torch.rand(4, 5))
    adv = torch.tensor([1.0, -1.0, 0.5, 2.0])
    mask = torch.ones(4, 5)
    mask[0, 2:] = 0  # response 0 has 2 tokens, the others 5
    grpo, _ = compute_grpo_loss(lp, lp, adv, mask, loss_type="grpo")
    assert grpo.item() == pytest.approx(-adv.mean().item())  # each response weighs the same
    bnpo, _ = compute_grpo_loss(lp, lp, adv, mask, loss_type="bnpo")
    assert bnpo.item() == pytest.approx(-(adv * mask.sum(1)).sum().item() / mask.sum().item())  # each token
    dr, _ = compute_grpo_loss(lp, lp, adv, mask, loss_type="dr_grpo", max_completion_length=10)
    assert dr.item() == pytest.approx(-(adv * mask.sum(1)).sum().item() / (4 * 10))


@pytest.mark.task("softmax_group_weights", "compute_grpo_loss")
def test_softmax_weighted_loss_by_hand():
    lp = torch.log(torch.rand(4, 3)).requires_grad_(True)
    mask = torch.tensor([[1.0, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]])
    w = softmax_group_weights(torch.tensor([0.0, 1.0, 1.0, 0.0]), 2)
    loss, _ = compute_grpo_loss(lp, lp.detach(), w, mask, loss_type="softmax_weighted")
    seq = (lp * mask).sum(1)  # log P(y_i | x)
    expected = -((w[0] * seq[0] + w[1] * seq[1]) + (w[2] * seq[2] + w[3] * seq[3])) / 2  # mean over 2 groups
    torch.testing.assert_close(loss, expected)
    loss.backward()
    torch.testing.assert_close(lp.grad, -(w[:, None] * mask) / 2)  # every sampled token is pushed up


@pytest.mark.task("compute_grpo_loss")
def test_clip_higher_keeps_the_gradient_between_the_two_bounds():
    old = torch.zeros(1, 1)
    lp = torch.log(torch.tensor([[1.25]])).requires_grad_(True)  # ratio 1.25: above 1 + 0.2, below 1 + 0.28
    adv = torch.tensor([1.0])
    loss, st = compute_grpo_loss(lp, old, adv, torch.ones(1, 1), epsilon_low=0.2)
    (g_sym,) = torch.autograd.grad(loss, lp)
    assert g_sym.item() == 0 and st["clip_ratio/high"] == 1
    loss, st = compute_grpo_loss(lp, old, adv, torch.ones(1, 1), epsilon_low=0.2, epsilon_high=0.28)
    (g_high,) = torch.autograd.grad(loss, lp)
    assert g_high.item() != 0 and st["clip_ratio/high"] == 0


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "softmax_weighted"])
@pytest.mark.task("compute_grpo_loss", "group_advantages", "softmax_group_weights")
def test_gradcheck_fp64(loss_type):
    torch.manual_seed(0)
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.float64)
    old = -torch.rand(4, 4, dtype=torch.float64)
    ref = old + 0.1 * torch.randn(4, 4, dtype=torch.float64)
    lp = (old + 0.05 * torch.randn(4, 4, dtype=torch.float64)).requires_grad_(True)
    r = torch.tensor([1.0, 0.0, 0.3, 0.7], dtype=torch.float64)
    adv = softmax_group_weights(r, 2) if loss_type == "softmax_weighted" else group_advantages(r, 2).double()

    def f(x):
        return compute_grpo_loss(x, old, adv.to(x.dtype), mask, ref_logprobs=ref, beta=0.04, epsilon_high=0.28,
                                 loss_type=loss_type, max_completion_length=6)[0]

    assert torch.autograd.gradcheck(f, (lp,))


@pytest.mark.task("group_advantages", "GRPODataset", "compute_grpo_loss")
def test_bad_input():
    with pytest.raises(ValueError, match=r"G\) must be an int >= 2"):
        group_advantages(torch.zeros(3), 1)
    with pytest.raises(ValueError, match="consecutive rows"):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="num_generations must be an int >= 2"):
        GRPODataset(["Q: 1+1=?\nA:"], num_generations=1)
    x = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="epsilon_low"):
        compute_grpo_loss(x, x, torch.zeros(2), torch.ones(2, 2), epsilon_low=0.0)
    with pytest.raises(ValueError, match="unknown loss_type"):
        compute_grpo_loss(x, x, torch.zeros(2), torch.ones(2, 2), loss_type="ppo")


@pytest.mark.task("GRPODataset")
def test_dataset_serves_seeded_epochs_groups_and_resumes():
    items = [("Q: 1+1=?\nA:", " 2"), "Q: 2+2=?\nA:", ("Q: 3+3=?\nA:", " 6")]
    ds = GRPODataset(items, num_generations=3, seed=7)
    assert len(ds) == 3 and ds[0].answer == " 2" and ds[1].answer is None
    epoch0 = [it.prompt for it in ds.next_prompts(3)]
    assert sorted(epoch0) == sorted(it if isinstance(it, str) else it[0] for it in items)  # each prompt once
    state = ds.state_dict()
    nxt = [it.prompt for it in ds.next_prompts(4)]  # crosses into epoch 2
    again = GRPODataset(items, num_generations=3, seed=7)
    again.load_state_dict(state)
    assert [it.prompt for it in again.next_prompts(4)] == nxt and again.state_dict() == ds.state_dict()
    rows = ds.repeat(ds.next_prompts(2))
    assert len(rows) == 6 and rows[0] is rows[1] is rows[2] and rows[3] is rows[5]
