"""Lesson 12 advanced tests: PPOTrainer end to end on a toy reward (the policy learns it), the reference model
and the KL penalty, the value head on the trunk, resumable state."""

import copy

import pytest
import torch

from intro2llm.testing import TOY_RL_PROMPTS, first_token_prob, seven_first, toy_policy
from intro2llm.training.ppo_trainer import PPOConfig, PPOTrainer
from intro2llm.training.rl import RewardError, compute_rewards, generate_responses, response_logprobs

PROMPTS = TOY_RL_PROMPTS  # the toy policy (toy_policy) should learn to start its answers with "7" (seven_first)


@pytest.mark.task("PPOTrainer.training_step", "generate_responses", "compute_rewards")
def test_ppo_learns_a_toy_reward():
    model, tok = toy_policy()
    before = first_token_prob(model, tok, PROMPTS, "7")
    cfg = PPOConfig(prompts_per_step=4, samples_per_prompt=8, max_new_tokens=2, lr=1e-2, ppo_epochs=2,
                    num_minibatches=2, kl_coef=0.01, seed=0)
    tr = PPOTrainer(model, tok, seven_first, PROMPTS, cfg)
    history = [tr.training_step() for _ in range(8)]
    after = first_token_prob(model, tok, PROMPTS, "7")
    assert after > 4 * before, (before, after)
    for m in history:
        assert 0.0 <= m["clip_frac"] <= 1.0 and torch.isfinite(torch.tensor(m["loss"]))
    assert history[-1]["kl"] > 0  # the policy has moved away from the frozen reference
    # the reference model is a frozen copy of the starting policy
    assert all(not p.requires_grad for p in tr.ref_model.parameters())
    assert first_token_prob(tr.ref_model, tok, PROMPTS, "7") == pytest.approx(before)


@pytest.mark.task("PPOTrainer.training_step")
def test_value_head_reads_the_policy_trunk_and_learns_the_return():
    model, tok = toy_policy(1)
    cfg = PPOConfig(prompts_per_step=4, samples_per_prompt=4, max_new_tokens=2, lr=1e-2, kl_coef=0.0,
                    vf_coef=1.0, seed=1)
    tr = PPOTrainer(model, tok, lambda p, c: [1.0] * len(c), PROMPTS, cfg)  # constant return 1: V should reach it
    assert tr.ref_model is None  # kl_coef = 0: no reference model
    losses = [tr.training_step()["value_loss"] for _ in range(6)]
    assert losses[-1] < 0.5 * losses[0]
    rollout = tr.generate_responses(PROMPTS[:1])
    _, h = response_logprobs(model, rollout, return_hidden=True)
    assert h.shape[-1] == model.config.hidden_size  # one forward gives log-probs and the values' input


@pytest.mark.task("PPOTrainer.training_step")
def test_trainer_state_round_trip():
    model, tok = toy_policy(2)
    cfg = PPOConfig(prompts_per_step=2, samples_per_prompt=2, max_new_tokens=2, target_kl=0.01, seed=3)
    tr = PPOTrainer(model, tok, seven_first, PROMPTS, cfg)
    tr.training_step()
    state, weights = tr.trainer_state(), {k: v.clone() for k, v in tr.trainable_state().items()}
    opt = copy.deepcopy(tr.optimizer.state_dict())  # the live state is updated in place by the next step
    a = tr.training_step()
    model2, _ = toy_policy(2)
    tr2 = PPOTrainer(model2, tok, seven_first, PROMPTS, cfg)
    tr2.load_trainable_state(weights)
    tr2.optimizer.load_state_dict(opt)
    tr2.load_trainer_state(state)
    b = tr2.training_step()
    assert a["reward"] == b["reward"] and a["kl_coef"] == pytest.approx(b["kl_coef"])
    assert a["policy_loss"] == pytest.approx(b["policy_loss"], abs=1e-6)


def test_bad_config():
    model, tok = toy_policy()
    with pytest.raises(ValueError, match="clip_eps must be > 0"):
        PPOTrainer(model, tok, seven_first, PROMPTS, PPOConfig(clip_eps=0.0))
    with pytest.raises(ValueError, match="no prompts"):
        PPOTrainer(model, tok, seven_first, [], PPOConfig())


@pytest.mark.task("generate_responses")
def test_sampled_responses_stop_and_carry_their_own_log_probs():
    """P·n rows, prompt i // n; the mask ends at the stop token; old_logprobs are the sampling policy's, i.e. what
    one forward of prompt + response gives back."""
    model, tok = toy_policy(4)
    stop = tok.encode("\n")[0]
    ro = generate_responses(model, PROMPTS[:2], 3, tokenizer=tok, max_new_tokens=6, stop_token_ids=[stop],
                            generator=torch.Generator().manual_seed(0))
    assert ro.response_ids.shape[0] == 6 and ro.prompts == [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3
    assert ro.response_ids.shape[1] <= 6 and len(ro.completions) == 6
    for ids, m in zip(ro.response_ids.tolist(), ro.response_mask.tolist()):
        n = int(sum(m))
        assert n >= 1 and all(x == 1.0 for x in m[:n]) and all(x == 0.0 for x in m[n:])
        stops = [j for j in range(n) if ids[j] in (stop, tok.eos_token_id)]
        assert stops in ([], [n - 1])  # nothing sampled after the stop token
    assert ro.old_logprobs.shape == ro.response_mask.shape and (ro.old_logprobs[ro.response_mask == 0] == 0).all()
    torch.testing.assert_close(response_logprobs(model, ro), ro.old_logprobs, atol=1e-4, rtol=1e-4)


@pytest.mark.task("compute_rewards")
def test_rewards_are_the_weighted_sum_and_bad_values_are_named():
    length = lambda prompts, completions: [len(c) for c in completions]  # noqa: E731
    ones = lambda prompts, completions: [1.0] * len(completions)  # noqa: E731
    total, per_fn = compute_rewards([length, ones], ["a", "b"], ["xyz", "z"], [0.5, 2.0])
    assert per_fn.tolist() == [[3.0, 1.0], [1.0, 1.0]] and total.tolist() == [3.5, 2.5]

    def broken(prompts, completions):
        return [float("nan")] * len(completions)

    with pytest.raises(RewardError, match="broken"):
        compute_rewards([length, broken], ["a"], ["b"])
    with pytest.raises(RewardError, match="returned 1 values for 2"):
        compute_rewards(lambda p, c: [0.0], ["a", "b"], ["c", "d"])
