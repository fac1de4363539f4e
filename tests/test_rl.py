"""RL pieces (intro2llm.training.rl, ppo_trainer, grpo_trainer, data.grpo_dataset): rollouts, rewards, log-probs,
KL estimators, comparison with TRL, bad input, and the ``intro2llm ppo|grpo`` command."""

from __future__ import annotations

import json
import math
import types

import pytest
import torch

from intro2llm.data.grpo_dataset import GRPODataset, GRPOItem
from intro2llm.model import CausalLM, ModelConfig
from intro2llm.training import rl
from intro2llm.training.grpo_trainer import compute_grpo_loss, group_advantages
from intro2llm.training.ppo_trainer import compute_ppo_loss

EOS = 3


def tiny_model(seed: int = 0, vocab: int = 40, max_pos: int = 48) -> CausalLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_pos, eos_token_id=EOS)
    return CausalLM(cfg)


PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14, 15]]


# ------------------------------------------------------------------------------------------------ rollouts
@pytest.mark.parametrize("compact", [True, False])
def test_greedy_rollout_equals_generate_per_prompt(compact):
    model = tiny_model()
    r = rl.generate_responses(model, PROMPTS, n=3, temperature=0.0, max_new_tokens=7, compact=compact)
    assert r.response_ids.shape[0] == 9
    for i, p in enumerate(PROMPTS):
        ref = model.generate(torch.tensor([p]), 7, eos_token_id=EOS)[0, len(p):]
        for g in range(3):
            row = 3 * i + g
            n = int(r.response_mask[row].sum())
            assert r.response_ids[row, :n].tolist() == ref[:n].tolist()
            assert n == len(ref) or ref[n - 1].item() == EOS  # stopped at EOS (included) or ran to the limit


def test_sampled_rollout_masks_logprobs_and_stop_tokens():
    model = tiny_model(1)
    g = torch.Generator().manual_seed(0)
    r = rl.generate_responses(model, PROMPTS, n=8, temperature=1.3, max_new_tokens=12, generator=g,
                              stop_token_ids=[4])
    m = r.response_mask
    stops = torch.isin(r.response_ids, torch.tensor([EOS, 4])) & (m > 0)
    for row in range(m.shape[0]):
        n = int(m[row].sum())
        assert m[row, :n].all() and not m[row, n:].any()  # one contiguous block from position 0
        # a row ends early only at a stop token, which is its last masked token
        if n < m.shape[1]:
            assert stops[row, n - 1]
        assert stops[row, : n - 1].sum() == 0
    assert (r.old_logprobs[m == 0] == 0).all() and (r.old_logprobs[m > 0] < 0).all()
    # the log-probs gathered while sampling equal a fresh forward's (temperature-scaled) log-probs
    lp = rl.response_logprobs(model, r, temperature=1.3)
    torch.testing.assert_close(lp, r.old_logprobs, atol=2e-5, rtol=0)
    # the batched training forward equals one prompt at a time
    one = r.select(torch.tensor([5]))
    width = int(one.prompt_mask.sum())
    lp_alone = rl.response_logprobs(model, rl.Rollout(one.prompt_ids[:, -width:], one.prompt_mask[:, -width:],
                                                      one.response_ids, one.response_mask, one.old_logprobs, 1),
                                    temperature=1.3)
    torch.testing.assert_close(lp_alone, lp[5:6], atol=2e-5, rtol=0)


@pytest.mark.parametrize("compact", [True, False])
@pytest.mark.parametrize("temperature,top_p", [(0.0, None), (1.3, None), (0.9, 0.8)])
def test_fast_decode_rollout_equals_the_module_path(compact, temperature, top_p, monkeypatch):
    """The decode steps on fast_decode's bundle (C++ where it applies) give the module forward's tokens under one
    seed, and old log-probs that equal both the module path's and a teacher-forced recomputation."""
    from intro2llm.model import fast_decode

    calls = {"python": 0, "cpp": 0}
    for name in calls:
        real = getattr(fast_decode, f"{name}_step")

        def counted(*a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(*a, **k)

        monkeypatch.setattr(fast_decode, f"{name}_step", counted)
    model = tiny_model(4)
    prompts = PROMPTS + [[20, 21, 22, 23, 24, 25, 26, 27], [30]]  # left padding of 0 to 7 tokens

    def run(fast: bool) -> rl.Rollout:
        return rl.generate_responses(model, prompts, n=4, temperature=temperature, top_p=top_p, max_new_tokens=10,
                                     generator=torch.Generator().manual_seed(5), compact=compact,
                                     stop_token_ids=range(4, 12), fast_decode=fast)

    ref = run(False)
    assert calls == {"python": 0, "cpp": 0}  # fast_decode=False: the module forward only
    fast = run(True)
    cpp = fast_decode.cpp_applies(fast_decode.DecodeWeights.from_model(model),
                                  rl.StaticKVCache.from_config(model.config, 1, 4, torch.float32, "cpu"))
    assert calls["cpp" if cpp else "python"] == fast.response_ids.shape[1] - 1 > 0  # every step after the prefill
    assert torch.equal(fast.response_ids, ref.response_ids)
    assert torch.equal(fast.response_mask, ref.response_mask)
    assert 0 < int(fast.response_mask.sum()) < fast.response_mask.numel()  # some rows stopped early
    torch.testing.assert_close(fast.old_logprobs, ref.old_logprobs, atol=1e-5, rtol=0)
    teacher = rl.response_logprobs(model, fast, temperature=temperature if temperature > 0 else 1.0)
    torch.testing.assert_close(fast.old_logprobs, teacher, atol=2e-5, rtol=0)


def test_response_logprobs_match_trl_selective_log_softmax():
    from trl.trainer.utils import selective_log_softmax

    model = tiny_model(2)
    r = rl.generate_responses(model, PROMPTS, n=2, temperature=1.0, max_new_tokens=5,
                              generator=torch.Generator().manual_seed(3))
    Tp = r.prompt_ids.shape[1]
    logits = model(r.input_ids, attention_mask=r.attention_mask).logits[:, Tp - 1 : -1] / 0.7
    expected = selective_log_softmax(logits, r.response_ids) * r.response_mask
    torch.testing.assert_close(rl.response_logprobs(model, r, temperature=0.7), expected, atol=1e-5, rtol=0)


def test_rollout_bad_input():
    model = tiny_model(max_pos=16)
    with pytest.raises(ValueError, match="prompt 1 has 12 tokens.*max_position_embeddings=16"):
        rl.generate_responses(model, [[5], [6] * 12], n=2, max_new_tokens=8)
    with pytest.raises(ValueError, match="n .* >= 1"):
        rl.generate_responses(model, [[5]], n=0)
    with pytest.raises(ValueError, match="empty"):
        rl.generate_responses(model, [[5], []], n=2)
    with pytest.raises(TypeError, match="tokenizer"):
        rl.generate_responses(model, ["text"], n=2)


# ------------------------------------------------------------------------------------------------ rewards
def test_compute_rewards_weights_and_errors():
    prompts = ["Q: 1+2=?\nA:", "Q: 10+5=?\nA:", "Q: 3+3=?\nA:"]
    completions = [" 3\n", " 14\n", "six"]
    total, per = rl.compute_rewards([rl.synthetic_reward, rl.synthetic_format_reward], prompts, completions,
                                    weights=[1.0, 0.5])
    torch.testing.assert_close(per, torch.tensor([[1.0, 1.0], [0.1, 1.0], [0.0, 0.0]]))
    torch.testing.assert_close(total, torch.tensor([1.5, 0.6, 0.0]))

    def boom(p, c):
        raise KeyError("no such answer")

    def nan_reward(p, c):
        return [0.0, float("nan"), 1.0]

    def short(p, c):
        return [1.0]

    with pytest.raises(rl.RewardError, match="'boom' raised KeyError"):
        rl.compute_rewards(boom, prompts, completions)
    with pytest.raises(rl.RewardError, match="'nan_reward' returned a non-finite value nan for completion 1"):
        rl.compute_rewards(nan_reward, prompts, completions)
    with pytest.raises(rl.RewardError, match="returned 1 values for 3"):
        rl.compute_rewards(short, prompts, completions)
    with pytest.raises(ValueError, match="2 weights for 1"):
        rl.compute_rewards(boom, prompts, completions, weights=[1, 2])


# ------------------------------------------------------------------------------------------------ KL, masks
def test_kl_estimators_known_values_and_unbiasedness():
    lp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    torch.testing.assert_close(rl.kl_k1(lp, ref), torch.tensor([math.log(2.0)]))
    torch.testing.assert_close(rl.kl_k2(lp, ref), torch.tensor([0.5 * math.log(2.0) ** 2]))
    torch.testing.assert_close(rl.kl_k3(lp, ref), torch.tensor([0.5 - 1 + math.log(2.0)]))
    # Monte Carlo: E_{a~p}[k1] = E[k3] = KL(p||q); k3 >= 0 per sample
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.5, 0.3])
    true_kl = (p * (p / q).log()).sum()
    a = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    lp, lq = p.log()[a], q.log()[a]
    for kind in ("k1", "k3"):
        assert abs(rl.kl_estimate(lp, lq, kind).mean() - true_kl) < 0.01
    assert (rl.kl_k3(lp, lq) >= 0).all()
    with pytest.raises(ValueError, match="unknown KL estimator"):
        rl.kl_estimate(lp, lq, "k4")


def test_masked_whiten_and_mean():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 6.0, -7.0]])
    m = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]])
    assert rl.masked_mean(x, m).item() == pytest.approx(3.5)
    w = rl.masked_whiten(x, m)
    vals = w[m.bool()]
    assert vals.mean().abs() < 1e-6 and vals.std().item() == pytest.approx(1.0, abs=1e-4)
    assert (w[~m.bool()] == 0).all()
    torch.testing.assert_close(rl.masked_mean(x, m, dim=1), torch.tensor([2.0, 5.0]))


# ------------------------------------------------------------------------------------------------ TRL parity
def _trl_grpo_loss(loss_type, logps, old, ref, adv, mask, beta, eps_low, eps_high, max_len):
    """TRL's GRPOTrainer._compute_loss on given log-probs (its forward replaced by a stub)."""
    from collections import defaultdict

    from trl.trainer.grpo_trainer import GRPOTrainer

    acc = types.SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x, reduce=lambda x, reduction: x,
                                num_processes=1, sync_gradients=True)
    fake = types.SimpleNamespace(
        loss_type=loss_type, beta=beta, epsilon_low=eps_low, epsilon_high=eps_high, top_entropy_quantile=1.0,
        off_policy_mask_threshold=None, importance_sampling_level="token", use_vllm=False, aux_loss_enabled=False,
        _entropy_bonus_enabled=False, max_completion_length=max_len, current_gradient_accumulation_steps=1,
        accelerator=acc, model=types.SimpleNamespace(training=True), _metrics={"train": defaultdict(list)},
        args=types.SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1),
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
    )
    N, T = logps.shape
    inputs = {"prompt_ids": torch.zeros(N, 2, dtype=torch.long), "prompt_mask": torch.ones(N, 2, dtype=torch.long),
              "completion_ids": torch.zeros(N, T, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum()}
    return GRPOTrainer._compute_loss(fake, None, inputs)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_matches_trl(loss_type, beta):
    torch.manual_seed(0)
    N, T = 8, 6
    mask = (torch.arange(T)[None] < torch.randint(1, T + 1, (N, 1))).long()
    old = -torch.rand(N, T) * 2
    ref = old + 0.1 * torch.randn(N, T)
    logps = (old + 0.3 * torch.randn(N, T)).requires_grad_(True)
    adv = group_advantages(torch.rand(N), 4)
    ours, _ = compute_grpo_loss(logps, old, adv, mask, ref_logprobs=ref, beta=beta, epsilon_low=0.2,
                                epsilon_high=0.28, loss_type=loss_type, max_completion_length=T + 2)
    (g_ours,) = torch.autograd.grad(ours, logps)
    theirs = _trl_grpo_loss(loss_type, logps, old, ref, adv, mask, beta, 0.2, 0.28, T + 2)
    (g_theirs,) = torch.autograd.grad(theirs, logps)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(g_ours, g_theirs)


def test_group_advantages_match_trl_formula():
    from trl.trainer.utils import nanstd

    r = torch.tensor([1.0, 0.1, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    g = r.view(-1, 4)
    expected = ((g - g.mean(1, keepdim=True)) / (nanstd(g, dim=1).unsqueeze(1) + 1e-4)).reshape(-1)
    torch.testing.assert_close(group_advantages(r, 4), expected)
    assert (group_advantages(r, 4)[4:] == 0).all()  # all-equal group: exactly 0, no NaN


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_hyper_parameters():
    lp = torch.zeros(2, 3)
    m = torch.ones(2, 3)
    for eps in (0.0, -0.1):
        with pytest.raises(ValueError, match="clip_eps must be > 0"):
            compute_ppo_loss(lp, lp, lp, m, clip_eps=eps)
        with pytest.raises(ValueError, match="epsilon_low"):
            compute_grpo_loss(lp, lp, torch.zeros(2), m, epsilon_low=eps)
    with pytest.raises(ValueError, match=r"G\) must be an int >= 2"):
        group_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="num_generations must be an int >= 2"):
        GRPODataset(["Q: 1+1=?\nA:"], num_generations=1)
    with pytest.raises(ValueError, match="NaN"):
        group_advantages(torch.tensor([0.0, float("nan")]), 2)
    with pytest.raises(ValueError, match="beta > 0 needs ref_logprobs"):
        compute_grpo_loss(lp, lp, torch.zeros(2), m, beta=0.1)


def test_grpo_dataset_epochs_and_state():
    ds = GRPODataset([("Q: 1+1=?\nA:", "2"), ("Q: 2+2=?\nA:", "4"), GRPOItem("Q: 3+3=?\nA:", "6")], 2, seed=1)
    first = [it.prompt for it in ds.next_prompts(3)]
    assert sorted(first) == sorted(it.prompt for it in ds.items)  # one epoch visits every prompt once
    state = ds.state_dict()
    nxt = [it.prompt for it in ds.next_prompts(4)]
    ds.load_state_dict(state)
    assert [it.prompt for it in ds.next_prompts(4)] == nxt
    assert [it.prompt for it in ds.repeat(ds.items[:2])] == [ds.items[0].prompt] * 2 + [ds.items[1].prompt] * 2
    with pytest.raises(ValueError, match="2 responses but 1 rewards"):
        GRPODataset([GRPOItem("p", None, ["a", "b"], [1.0])], 2)


# ------------------------------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from intro2llm.testing import save_toy_checkpoint

    return save_toy_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.mark.parametrize("cmd", ["grpo", "ppo"])
def test_cli_run_resume_and_export(cmd, tiny_ckpt, tmp_path, capsys):
    from intro2llm.cli import main

    out = tmp_path / cmd
    common = ["--ckpt", str(tiny_ckpt), "--out", str(out), "--prompts-per-step", "2", "--max-new-tokens", "4",
              "--eval-prompts", "4", "--no-progress", "--save-every", "1", "--train-prompts", "20"]
    extra = ["-G", "2"] if cmd == "grpo" else ["--samples-per-prompt", "2"]
    assert main([cmd, *common, *extra, "--steps", "2"]) == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2]
    for key in ("reward", "kl", "clip_frac", "response_length"):
        assert key in lines[0]
    assert (out / "tb").is_dir() and (out / "checkpoints" / "step_00000002").is_dir()
    reloaded = CausalLM.from_pretrained(out)
    assert reloaded.config.hidden_size == 32
    assert main([cmd, *common, *extra, "--steps", "3", "--resume"]) == 0
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and "accuracy" in summary["eval_after"]
    # a run directory that holds checkpoints is not overwritten without --resume
    assert main([cmd, *common, *extra, "--steps", "1"]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err


def test_cli_errors(tiny_ckpt, tmp_path, capsys):
    from intro2llm.cli import main

    base = ["--out", str(tmp_path / "o"), "--no-progress"]
    assert main(["grpo", "--ckpt", str(tiny_ckpt), *base, "-G", "1"]) == 2
    assert "--num-generations must be >= 2" in capsys.readouterr().err
    assert main(["grpo", "--ckpt", str(tmp_path), *base]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["ppo", "--ckpt", str(tiny_ckpt), *base, "--reward", "nope"]) == 2
    assert "unknown reward" in capsys.readouterr().err
    assert main(["ppo", "--ckpt", str(tiny_ckpt), *base, "--clip-eps", "0"]) == 2
    assert "clip_eps must be > 0" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ shared prompts
def test_shared_prompt_forward_equals_the_plain_forward():
    model = tiny_model(4)
    r = rl.generate_responses(model, PROMPTS, n=4, temperature=1.0, max_new_tokens=6,
                              generator=torch.Generator().manual_seed(1))
    a = rl.response_logprobs(model, r, 0.9)
    grads_a = torch.autograd.grad(a.sum(), list(model.parameters()))
    b = rl.response_logprobs(model, r, 0.9, group_size=4)
    grads_b = torch.autograd.grad(b.sum(), list(model.parameters()))
    torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(gb, ga, atol=1e-4, rtol=1e-4)
    # rows whose groups do not share a prompt take the plain path (same result)
    mixed = r.select(torch.tensor([0, 4, 1, 5]))
    torch.testing.assert_close(rl.response_logprobs(model, mixed, 0.9, group_size=2), a[[0, 4, 1, 5]])
    # the hidden states PPO's value head reads (its no-grad pass over the whole rollout shares the prompt too)
    with torch.no_grad():
        _, h_plain = rl.response_logprobs(model, r, 0.9, return_hidden=True)
        _, h_shared = rl.response_logprobs(model, r, 0.9, return_hidden=True, group_size=4)
    torch.testing.assert_close(h_shared, h_plain, atol=1e-5, rtol=0)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "softmax_weighted"])
def test_grpo_micro_batches_accumulate_the_whole_batch_gradient(loss_type):
    from intro2llm.data.prepare import synthetic_tokenizer
    from intro2llm.data.synthetic import pretrain_documents
    from intro2llm.training.grpo_trainer import GRPOConfig, GRPOTrainer

    tok = synthetic_tokenizer(list(pretrain_documents(100, seed=0)))
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=32, eos_token_id=tok.eos_token_id))
    prompts = ["Q: 1+2=?\nA:", "Q: 12+30=?\nA:", "Q: 7+7=?\nA:"]
    grads = []
    for micro in (None, 2):
        cfg = GRPOConfig(prompts_per_step=3, num_generations=2, max_new_tokens=3, loss_type=loss_type, beta=0.05,
                         micro_batch_size=micro)
        tr = GRPOTrainer(model, tok, rl.synthetic_reward, GRPODataset(prompts, 2), cfg)
        r = rl.generate_responses(model, prompts, 2, tokenizer=tok, max_new_tokens=3,
                                  generator=torch.Generator().manual_seed(0))
        adv = tr.compute_advantages(torch.tensor([1.0, 0.1, 0.0, 1.0, 0.1, 0.1]))
        noise = torch.randn(r.old_logprobs.shape, generator=torch.Generator().manual_seed(5))
        old = r.old_logprobs + 0.05 * noise * r.response_mask  # ratios != 1
        r.old_logprobs = old
        with torch.no_grad():
            ref = rl.response_logprobs(tr.ref_model, r) + 0.1 * r.response_mask
        model.zero_grad()
        st = tr.compute_gradients(r, adv, torch.arange(6), ref, num_items=r.response_mask.sum())
        grads.append(([p.grad.clone() for p in model.parameters()], st["loss"]))
    (g_all, loss_all), (g_micro, loss_micro) = grads
    assert loss_micro == pytest.approx(loss_all, rel=1e-5, abs=1e-7)
    for a, b in zip(g_all, g_micro):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
