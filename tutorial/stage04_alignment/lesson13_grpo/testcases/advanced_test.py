"""Lesson 13 advanced tests: GRPOTrainer end to end on a toy reward, beta = 0 loads no reference model, the
k3 KL to the reference, and how the course's softmax-weighted objective differs from GRPO on a tied group."""

import pytest
import torch

from intro2llm.data.grpo_dataset import GRPODataset
from intro2llm.testing import TOY_RL_PROMPTS, first_token_prob, seven_first, toy_policy
from intro2llm.training.grpo_trainer import GRPOConfig, GRPOTrainer

PROMPTS = TOY_RL_PROMPTS  # the toy policy (toy_policy) should learn to start its answers with "7" (seven_first)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "softmax_weighted"])
@pytest.mark.task("GRPOTrainer.training_step", "GRPOTrainer.generate_responses", "GRPOTrainer.compute_rewards",
                  "GRPODataset")
def test_grpo_learns_a_toy_reward(loss_type):
    model, tok = toy_policy()
    before = first_token_prob(model, tok, PROMPTS, "7")
    cfg = GRPOConfig(prompts_per_step=4, num_generations=8, max_new_tokens=2, lr=1e-2, loss_type=loss_type,
                     epsilon_high=0.28, softmax_temperature=0.1, seed=0)
    tr = GRPOTrainer(model, tok, seven_first, GRPODataset(PROMPTS, 8), cfg)
    assert tr.ref_model is None  # beta = 0: no reference model is loaded
    for _ in range(8):
        m = tr.training_step()
    assert first_token_prob(model, tok, PROMPTS, "7") > 4 * before
    assert 0 <= m["frac_reward_zero_std"] <= 1 and m["response_length"] <= 2


@pytest.mark.task("GRPOTrainer.training_step")
def test_beta_loads_a_frozen_reference_and_reports_k3_kl():
    model, tok = toy_policy(1)
    cfg = GRPOConfig(prompts_per_step=4, num_generations=4, max_new_tokens=2, lr=1e-2, beta=0.1, num_iterations=2)
    tr = GRPOTrainer(model, tok, seven_first, GRPODataset(PROMPTS, 4), cfg)
    assert tr.ref_model is not None and all(not p.requires_grad for p in tr.ref_model.parameters())
    kls = [tr.training_step()["kl"] for _ in range(3)]
    assert kls[0] >= 0 and kls[-1] > 0  # k3 >= 0; positive once the policy has moved


@pytest.mark.task("GRPOTrainer.training_step")
def test_tied_group_grpo_does_nothing_softmax_weighted_still_moves():
    """All rewards equal: GRPO's advantages are 0 (no update); the outline's softmax weights are all 1/G > 0, so
    its loss still raises the likelihood of every sampled response (it is reward-weighted SFT on own samples)."""
    for loss_type, moves in (("grpo", False), ("softmax_weighted", True)):
        model, tok = toy_policy(2)
        w0 = [p.detach().clone() for p in model.parameters()]
        cfg = GRPOConfig(prompts_per_step=2, num_generations=4, max_new_tokens=2, lr=1e-2, loss_type=loss_type)
        tr = GRPOTrainer(model, tok, lambda p, c: [0.5] * len(c), GRPODataset(PROMPTS, 4), cfg)
        m = tr.training_step()
        assert m["frac_reward_zero_std"] == 1.0
        changed = any(not torch.equal(a, b) for a, b in zip(w0, model.parameters()))
        assert changed == moves, loss_type


@pytest.mark.task("GRPOTrainer.compute_rewards")
def test_reward_errors_surface():
    from intro2llm.training.rl import RewardError

    model, tok = toy_policy()
    tr = GRPOTrainer(model, tok, lambda p, c: [float("inf")] * len(c), GRPODataset(PROMPTS, 2),
                     GRPOConfig(prompts_per_step=1, num_generations=2, max_new_tokens=2))
    with pytest.raises(RewardError, match="non-finite"):
        tr.training_step()
    with pytest.raises(ValueError, match="num_generations"):
        GRPOTrainer(model, tok, seven_first, GRPODataset(PROMPTS, 2), GRPOConfig(num_generations=1))
