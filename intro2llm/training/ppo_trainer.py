"""PPO with GAE for a language model (lesson 12): Schulman et al. 2017 (PPO), 2016 (GAE); the RLHF recipe of
Ziegler et al. 2019 / Ouyang et al. 2022 (per-token KL penalty to the frozen SFT model, adaptive coefficient).

One ``training_step``:
  1. rollout: ``generate_responses`` samples responses and their log-probs log π_old (rl.py);
  2. score: ``compute_rewards`` (reward functions, weighted); values V(s_t) and the reference log-probs in one
     no-grad forward each;
  3. per-token rewards r_t = −β·(log π_old − log π_ref)_t, plus the score at the response's last token;
  4. ``compute_gae`` (reverse scan over the response, respecting the mask) → advantages and returns;
     advantages whitened over the batch;
  5. ``ppo_epochs`` passes over shuffled mini-batches: ``compute_ppo_loss`` (clipped surrogate) +
     ``vf_coef`` · ``compute_value_loss`` (clipped value loss), one optimizer step per mini-batch;
  6. the adaptive KL controller moves β toward ``target_kl``.

Value function: a value head (one ``Linear(C, 1)``) on the policy's trunk, not a separate critic. Why: on a CPU the
rollout and the forwards dominate; a shared trunk gives log-probs and values from one forward (a separate critic
doubles the forward/backward and the weights in memory). The price is that the value loss's gradient also moves
the policy's trunk (``vf_coef`` keeps it small); InstructGPT used a separate critic at 6B-175B, where that
interference matters more than the compute. The head starts at zero (V = 0 everywhere).

Under torchrun (``strategy`` ddp | fsdp, ``distributed.distribute_policy``) every rank samples the same whole
rollout (same seed and weights; FSDP gathers the full weights for the decode), so scores, values, GAE and the
whitening are identical on all ranks; each rank runs its share of every mini-batch, its token-mean losses weighted
by its share of the mini-batch's tokens, gradients (the value head's too) are averaged and the logged means
all-reduced: the same losses as one process. The rollout is not parallelised.

Not handled: a learned reward model (rewards are functions of the text), rollouts larger than memory, sharded
(per-rank) generation.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from intro2llm.course import lesson_task
from intro2llm.training.distributed import (
    DistInfo,
    all_reduce_stats,
    average_gradients,
    check_even_split,
    clip_grad_norm,
    distribute_policy,
    full_state_dict,
    gathered_params,
    init_distributed,
    load_full_state_dict,
    rank_rows,
)
from intro2llm.training.rl import (
    RewardFn,
    RLConfig,
    Rollout,
    compute_rewards,
    generate_responses,
    kl_k1,
    masked_mean,
    masked_whiten,
    response_logprobs,
)


# ---------------------------------------------------------------------------------------------------------------
# The formulas
# ---------------------------------------------------------------------------------------------------------------
@lesson_task(12)
def compute_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over (B, T) response tokens → (advantages, returns), 0 where mask is 0.

    δ_t = r_t + γ·V(s_{t+1}) − V(s_t);  A_t = δ_t + γλ·A_{t+1} (a reverse scan). The step after the last masked-in
    token is terminal (V = 0, A = 0): a response ends at its stop token. returns = A + V (the value targets).
    λ = 0 gives A_t = δ_t (one-step TD); λ = 1, γ = 1 gives A_t = Σ_{k≥t} r_k − V(s_t) (Monte Carlo).
    """
    if rewards.shape != values.shape or rewards.shape != mask.shape or rewards.dim() != 2:
        raise ValueError(f"compute_gae: rewards, values and mask must be the same (B, T) shape, got "
                         f"{tuple(rewards.shape)}, {tuple(values.shape)}, {tuple(mask.shape)}")
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"compute_gae: gamma and lam must lie in [0, 1], got gamma={gamma}, lam={lam}")
    mask = mask.to(values.dtype)
    values = values * mask
    rewards = rewards * mask
    T = rewards.shape[1]
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])  # A_{t+1}
    for t in reversed(range(T)):
        next_v = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)  # 0 past the end (masked values are 0)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        adv[:, t] = last
    return adv, (adv + values) * mask


@lesson_task(12)
def compute_ppo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                     mask: torch.Tensor, clip_eps: float = 0.2, clip_eps_high: float | None = None
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate −E[min(ρ·A, clip(ρ, 1−ε, 1+ε_high)·A)], ρ = exp(log π − log π_old), mean over the mask.

    All inputs (B, T). Returns (loss, stats) with ``clip_frac`` (fraction of tokens where the clipped term is the
    one taken: its gradient is 0 there) and ``approx_kl`` = mean ½(log ρ)² (the k2 estimate of KL(π_old‖π)).
    """
    if not clip_eps > 0:
        raise ValueError(f"compute_ppo_loss: clip_eps must be > 0 (0 would clip every step to ratio 1), got {clip_eps}")
    high = clip_eps if clip_eps_high is None else clip_eps_high
    if not high > 0:
        raise ValueError(f"compute_ppo_loss: clip_eps_high must be > 0, got {high}")
    if not (logprobs.shape == old_logprobs.shape == advantages.shape == mask.shape):
        raise ValueError(f"compute_ppo_loss: shapes differ: logprobs {tuple(logprobs.shape)}, old "
                         f"{tuple(old_logprobs.shape)}, advantages {tuple(advantages.shape)}, mask {tuple(mask.shape)}")
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + high)
    loss = masked_mean(torch.maximum(loss_unclipped, loss_clipped), mask)
    with torch.no_grad():
        stats = {"clip_frac": masked_mean((loss_clipped > loss_unclipped).float(), mask),
                 "approx_kl": masked_mean(0.5 * log_ratio**2, mask),
                 "ratio_mean": masked_mean(ratio, mask)}
    return loss, stats


@lesson_task(12)
def compute_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       clip_range: float | None = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """½ E[max((V − R)², (V_clip − R)²)], V_clip = V_old + clip(V − V_old, ±clip_range) (PPO2's value clipping);
    ``clip_range=None`` gives the plain ½ E[(V − R)²]. Returns (loss, {"vf_clip_frac"})."""
    err = (values - returns) ** 2
    if clip_range is None:
        return 0.5 * masked_mean(err, mask), {"vf_clip_frac": torch.zeros(())}
    if not clip_range > 0:
        raise ValueError(f"compute_value_loss: clip_range must be > 0 or None, got {clip_range}")
    clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    err_clipped = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    return loss, {"vf_clip_frac": masked_mean((err_clipped > err).float(), mask).detach()}


class AdaptiveKLController:
    """β ← β·(1 + clip(KL/target − 1, ±0.2)·n/horizon) (Ziegler et al. 2019); ``target=None``: fixed β."""

    def __init__(self, init_kl_coef: float, target: float | None = None, horizon: int = 10000) -> None:
        if init_kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {init_kl_coef}")
        self.value, self.target, self.horizon = float(init_kl_coef), target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        if self.target is None:
            return
        err = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon


class ValueHead(nn.Module):
    """V(s_t) = w·h_t + b on the trunk's final-norm hidden states (C,) → scalar; starts at 0."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (..., C) → (...)
        return self.proj(hidden.float()).squeeze(-1)


# ---------------------------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class PPOConfig(RLConfig):
    """Hyper-parameters of ``PPOTrainer``: ``RLConfig``'s (prompts_per_step, max_new_tokens, temperature, top_p,
    lr, grad_clip, weight_decay, seed) and PPO's own."""

    samples_per_prompt: int = 4
    ppo_epochs: int = 2
    num_minibatches: int = 2
    clip_eps: float = 0.2
    clip_eps_value: float | None = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.05
    target_kl: float | None = None  # None: fixed kl_coef; else adaptive
    kl_horizon: int = 10000
    whiten_advantages: bool = True

    def validate(self) -> None:
        super().validate()
        for name in ("samples_per_prompt", "ppo_epochs", "num_minibatches"):
            if getattr(self, name) < 1:
                raise ValueError(f"PPOConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.clip_eps > 0:
            raise ValueError(f"PPOConfig.clip_eps must be > 0, got {self.clip_eps}")
        if self.clip_eps_value is not None and not self.clip_eps_value > 0:
            raise ValueError(f"PPOConfig.clip_eps_value must be > 0 or None, got {self.clip_eps_value}")
        if self.prompts_per_step * self.samples_per_prompt < self.num_minibatches:
            raise ValueError("PPOConfig: fewer responses per step than mini-batches")
        if self.kl_coef < 0:
            raise ValueError(f"PPOConfig.kl_coef must be >= 0, got {self.kl_coef}")


class PPOTrainer:
    """PPO on a ``CausalLM`` policy with a value head on its trunk; see the module docstring."""

    def __init__(self, model: nn.Module, tokenizer: Any, reward_fns: RewardFn | Sequence[RewardFn],
                 prompts: Sequence[str], config: PPOConfig | None = None, reward_weights: Sequence[float] | None = None,
                 ref_model: nn.Module | None = None, stop_token_ids: Sequence[int] = (),
                 encode: Any = None, strategy: str = "ddp", dist_info: DistInfo | None = None) -> None:
        self.config = config or PPOConfig()
        self.config.validate()
        if len(prompts) == 0:
            raise ValueError("PPOTrainer: no prompts given")
        self.model, self.tokenizer = model, tokenizer
        self.reward_fns = [reward_fns] if callable(reward_fns) else list(reward_fns)
        self.reward_weights = reward_weights
        self.prompts = list(prompts)
        self.stop_token_ids = tuple(stop_token_ids)
        self.encode = encode  # str -> ids (a chat template); None: tokenizer.encode
        # Under torchrun (strategy ddp | fsdp): every rank samples the same whole rollout and trains on its share
        # of each mini-batch (see the module docstring). The reference (kl_coef > 0): the frozen SFT model, a copy
        # of the starting policy unless given.
        self.info = dist_info or init_distributed(next(model.parameters()).device.type)
        check_even_split(self.config.prompts_per_step * self.config.samples_per_prompt, self.config.num_minibatches,
                         self.info, "responses")
        self.model, self.ref_model = distribute_policy(model, self.info, strategy, ref_model,
                                                       need_ref=self.config.kl_coef > 0)
        self.device = next(model.parameters()).device
        self.value_head = ValueHead(model.config.hidden_size).to(self.device)  # replicated on every rank
        self.kl_ctl = AdaptiveKLController(self.config.kl_coef, self.config.target_kl, self.config.kl_horizon)
        params = list(model.parameters()) + list(self.value_head.parameters())
        self.optimizer = torch.optim.AdamW(params, lr=self.config.lr, weight_decay=self.config.weight_decay)
        self.step = 0
        self._rng = random.Random(self.config.seed)
        self.generator = torch.Generator(device=self.device).manual_seed(self.config.seed)

    # -------------------------------------------------------------------------------------------- the pieces
    def sample_prompts(self) -> list[str]:
        return [self.prompts[self._rng.randrange(len(self.prompts))] for _ in range(self.config.prompts_per_step)]

    def generate_responses(self, prompts: Sequence[str]) -> Rollout:
        c = self.config
        return generate_responses(self.model, prompts, c.samples_per_prompt, tokenizer=self.tokenizer,
                                  temperature=c.temperature, top_p=c.top_p, max_new_tokens=c.max_new_tokens,
                                  stop_token_ids=self.stop_token_ids, generator=self.generator, encode=self.encode)

    def compute_rewards(self, rollout: Rollout) -> torch.Tensor:
        """(N,) scores of the rollout's completions (weighted sum of the reward functions)."""
        total, _ = compute_rewards(self.reward_fns, rollout.prompts, rollout.completions, self.reward_weights)
        return total.to(self.device)

    def _forward(self, rollout: Rollout, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs and values of the responses; ``group_size``: rows come in groups sharing one prompt (the
        whole rollout; not the shuffled mini-batches), whose prompt then runs once per group."""
        lp, h = response_logprobs(self.model, rollout, self.config.temperature, return_hidden=True,
                                  group_size=group_size)
        return lp, self.value_head(h)  # (N, Tr) each

    # -------------------------------------------------------------------------------------------- one step
    @lesson_task(12)
    def training_step(self, prompts: Sequence[str] | None = None) -> dict[str, float]:
        """Rollout → rewards → GAE → ``ppo_epochs`` × mini-batch updates; returns the step's metrics."""
        c = self.config
        prompts = self.sample_prompts() if prompts is None else list(prompts)
        with gathered_params(self.model):  # FSDP: full weights for the KV-cache decode, resharded after
            rollout = self.generate_responses(prompts)
        scores = self.compute_rewards(rollout)  # (N,)
        mask = rollout.response_mask
        old_lp = rollout.old_logprobs
        # FSDP: the no-grad forwards inside gathered_params, which reshards every unit at the end (measured: after a
        # no-grad forward of the policy left its root unsharded, the next backward lost the root's gradients)
        with torch.no_grad(), gathered_params(self.model):
            self.model.eval()
            _, old_values = self._forward(rollout, group_size=c.samples_per_prompt)
            if self.ref_model is not None:
                ref_lp = response_logprobs(self.ref_model, rollout, c.temperature, group_size=c.samples_per_prompt)
                kl = kl_k1(old_lp, ref_lp) * mask  # per-token KL estimate on the sampled tokens
            else:
                kl = torch.zeros_like(old_lp)
            rewards = -self.kl_ctl.value * kl
            last = (mask.sum(-1).long() - 1).clamp(min=0)  # index of each response's last token
            rewards[torch.arange(len(last)), last] += scores
            adv, returns = compute_gae(rewards, old_values, mask, c.gamma, c.lam)
            if c.whiten_advantages and mask.sum() >= 2:
                adv = masked_whiten(adv, mask)
        self.model.train()
        N = mask.shape[0]
        mb = math.ceil(N / c.num_minibatches)
        stats: dict[str, list[float]] = {"policy_loss": [], "value_loss": [], "clip_frac": [], "approx_kl": [],
                                         "vf_clip_frac": [], "grad_norm": []}
        params = list(self.model.parameters()) + list(self.value_head.parameters())
        for _ in range(c.ppo_epochs):
            perm = torch.randperm(N, generator=self.generator, device=self.device)
            for i in range(0, N, mb):
                # torchrun: this rank's share of the mini-batch; its token means weighted by its share of the
                # mini-batch's tokens (x W: gradients are averaged over ranks) sum to the whole mini-batch's
                rows = rank_rows(perm[i : i + mb])
                share = mask[rows].sum() / mask[perm[i : i + mb]].sum().clamp(min=1) if self.info.enabled else 1.0
                sub = rollout.select(rows)
                lp, values = self._forward(sub)
                m = mask[rows]
                pg_loss, pg_stats = compute_ppo_loss(lp, old_lp[rows], adv[rows], m, c.clip_eps)
                vf_loss, vf_stats = compute_value_loss(values, old_values[rows], returns[rows], m, c.clip_eps_value)
                loss = pg_loss + c.vf_coef * vf_loss
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"PPO loss is {loss.item()} at step {self.step} (policy {pg_loss.item()},"
                                             f" value {vf_loss.item()})")
                self.optimizer.zero_grad(set_to_none=True)
                (loss * (share * self.info.world_size)).backward()
                average_gradients(params)  # ddp and the value head under torchrun (FSDP reduced the policy's)
                gn = clip_grad_norm(params, c.grad_clip)
                self.optimizer.step()
                st = all_reduce_stats({"policy_loss": pg_loss.item() * share, "value_loss": vf_loss.item() * share,
                                       "clip_frac": pg_stats["clip_frac"].item() * share,
                                       "approx_kl": pg_stats["approx_kl"].item() * share,
                                       "vf_clip_frac": vf_stats["vf_clip_frac"].item() * share})
                for k, v in {**st, "grad_norm": gn}.items():
                    stats[k].append(float(v))
        mean_kl = (kl.sum(-1)).mean().item()  # per-response KL(π_old‖π_ref) estimate
        self.kl_ctl.update(mean_kl, N)
        self.step += 1
        out = {k: sum(v) / len(v) for k, v in stats.items()}
        out.update(reward=scores.mean().item(), kl=mean_kl, kl_coef=self.kl_ctl.value,
                   response_length=mask.sum(-1).mean().item(), loss=out["policy_loss"] + c.vf_coef * out["value_loss"])
        return out

    # -------------------------------------------------------------------------------------------- checkpoints
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Model + value head tensors (saved as the checkpoint's model.safetensors); full tensors (under FSDP
        gathered: every rank calls this)."""
        state = {f"model.{k}": v for k, v in full_state_dict(self.model).items()}
        state.update({f"value_head.{k}": v for k, v in self.value_head.state_dict().items()})
        return state

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        load_full_state_dict(self.model, {k[6:]: v for k, v in state.items() if k.startswith("model.")})
        self.value_head.load_state_dict({k[11:]: v for k, v in state.items() if k.startswith("value_head.")})

    def trainer_state(self) -> dict[str, Any]:
        return {"step": self.step, "kl_coef": self.kl_ctl.value, "prompt_rng": repr(self._rng.getstate()),
                "generator": self.generator.get_state(), "config": asdict(self.config)}

    def load_trainer_state(self, state: dict[str, Any]) -> None:
        import ast

        self.step = int(state["step"])
        self.kl_ctl.value = float(state["kl_coef"])
        self._rng.setstate(_tuple_state(ast.literal_eval(state["prompt_rng"])))
        self.generator.set_state(state["generator"])


def _tuple_state(s: Any) -> Any:
    """``random.Random.getstate()`` round-trips through ``repr``/``literal_eval`` (weights_only pickles)."""
    return tuple(_tuple_state(x) for x in s) if isinstance(s, list | tuple) else s
