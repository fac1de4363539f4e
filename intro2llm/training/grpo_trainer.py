"""GRPO (lesson 13): Shao et al. 2024, "DeepSeekMath" §4.1; DAPO (Yu et al. 2025) clip-higher and token-level
loss; Dr. GRPO (Liu et al. 2025); and the course outline's softmax-weighted objective. Loss modes follow TRL's
``GRPOTrainer`` (``loss_type``), checked against it in the tests.

GRPO is PPO without the critic: for each prompt sample G responses, score them, and use the group as the
baseline: A_i = (r_i − mean(r)) / (std(r) + eps) for every token of response i. The loss is PPO's clipped surrogate
on those advantages plus β·KL(π‖π_ref) with the k3 estimator, per token. DeepSeekMath keeps the reference model
(β = 0.04); ``beta = 0`` (TRL's default) drops the KL term and loads no reference model.

``loss_type`` (how per-token losses become one number; m = response mask, L = max_new_tokens, N rows):
  grpo            mean over responses of (Σ_t m·ℓ / Σ_t m)  (each response weighs the same: long ones dilute)
  bnpo            Σ m·ℓ / Σ m over the (mini-)batch          (each token weighs the same)
  dapo            Σ m·ℓ / num_items_in_batch, the token count of the whole generation batch (equals bnpo with one
                  process and one mini-batch; differs under accumulation)
  dr_grpo         Σ m·ℓ / (N·L)                              (a constant: no length bias)
  softmax_weighted  the outline's L = −E_x[Σ_i softmax(s_i/τ)·log P(y_i|x)] with log P(y|x) = Σ_t log π(y_t|…):
                  ``advantages`` are the weights w_i = softmax within the group (``softmax_group_weights``);
                  no ratio, no clipping; + β·KL if β > 0.

Under torchrun (``strategy`` ddp | fsdp, ``distributed.distribute_policy``) every rank samples the same whole
generation batch (same seed, same weights; FSDP gathers the full weights for the decode with ``gathered_params``),
so rewards and advantages are identical on all ranks without communication; each rank then runs the forward and
backward of its share of every mini-batch's groups (normalisers from the whole batch), the gradients are averaged,
and the logged sums are all-reduced: the same losses as one process. The rollout is therefore not parallelised.

Not handled: sequence-level importance sampling (GSPO), entropy bonuses, vLLM, sharded (per-rank) generation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from intro2llm.course import lesson_task
from intro2llm.data.grpo_dataset import GRPODataset
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
    kl_k3,
    masked_mean,
    response_logprobs,
)

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "softmax_weighted")


def _check_groups(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    if isinstance(num_generations, bool) or not isinstance(num_generations, int) or num_generations < 2:
        raise ValueError(f"num_generations (G) must be an int >= 2: a group of one response has no relative "
                         f"advantage (its std is undefined), got {num_generations!r}")
    if rewards.dim() != 1 or rewards.numel() % num_generations != 0:
        raise ValueError(f"rewards must be (P*G,) with G={num_generations} consecutive rows per prompt, got shape "
                         f"{tuple(rewards.shape)}")
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards contain NaN or inf")
    return rewards.view(-1, num_generations)  # (P, G)


@lesson_task(13)
def group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: bool = True,
                     eps: float = 1e-4) -> torch.Tensor:
    """(P·G,) rewards → (P·G,) advantages (r − mean_g) / (std_g + eps), or r − mean_g with ``scale_rewards=False``
    (Dr. GRPO). std is the unbiased one (as TRL). A group whose rewards are all equal gets advantages exactly 0
    (no NaN: 0 / (0 + eps)); it then contributes no policy gradient, only the KL term."""
    g = _check_groups(rewards, num_generations).float()
    adv = g - g.mean(dim=1, keepdim=True)
    if scale_rewards:
        adv = adv / (g.std(dim=1, keepdim=True) + eps)
    return adv.reshape(-1)


@lesson_task(13)
def softmax_group_weights(scores: torch.Tensor, num_generations: int, temperature: float = 1.0) -> torch.Tensor:
    """The outline's weights softmax(s_i / τ) within each group of G: (P·G,) → (P·G,), each group sums to 1."""
    if not temperature > 0:
        raise ValueError(f"softmax temperature must be > 0, got {temperature}")
    g = _check_groups(scores, num_generations).float()
    return torch.softmax(g / temperature, dim=1).reshape(-1)


@lesson_task(13)
def compute_grpo_loss(
    logprobs: torch.Tensor,  # (N, T) log π_θ of the sampled tokens
    old_logprobs: torch.Tensor,  # (N, T) log π_old (sampling time)
    advantages: torch.Tensor,  # (N,) per response (softmax_weighted: the group weights)
    mask: torch.Tensor,  # (N, T) response mask
    *,
    ref_logprobs: torch.Tensor | None = None,  # (N, T) log π_ref, needed when beta > 0
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    num_items_in_batch: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO objective (see the module docstring) → (scalar loss, stats: kl, clip_ratio/low|high|region)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose from {LOSS_TYPES}")
    if not epsilon_low > 0:
        raise ValueError(f"epsilon_low (clip_eps) must be > 0, got {epsilon_low}")
    eps_high = epsilon_low if epsilon_high is None else epsilon_high
    if not eps_high > 0:
        raise ValueError(f"epsilon_high must be > 0, got {eps_high}")
    if not (logprobs.shape == old_logprobs.shape == mask.shape) or logprobs.dim() != 2:
        raise ValueError(f"logprobs, old_logprobs and mask must be the same (N, T) shape, got "
                         f"{tuple(logprobs.shape)}, {tuple(old_logprobs.shape)}, {tuple(mask.shape)}")
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(f"advantages must be (N,) = ({logprobs.shape[0]},), got {tuple(advantages.shape)}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta > 0 and ref_logprobs is None:
        raise ValueError("beta > 0 needs ref_logprobs (the reference model's log-probs)")
    mask = mask.to(logprobs.dtype)
    stats: dict[str, torch.Tensor] = {}
    per_token_kl = None
    if beta > 0:
        per_token_kl = kl_k3(logprobs, ref_logprobs)
        stats["kl"] = masked_mean(per_token_kl, mask).detach()

    if loss_type == "softmax_weighted":
        seq_logp = (logprobs * mask).sum(-1)  # (N,) log P(y_i | x)
        w = advantages.detach()
        loss = -(w * seq_logp).sum() / w.sum().clamp(min=1e-12)  # Σ_i w_i = number of groups
        if per_token_kl is not None:
            loss = loss + beta * masked_mean(per_token_kl, mask)
        return loss, stats

    adv = advantages[:, None]
    ratio = torch.exp(logprobs - old_logprobs)
    clipped = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + eps_high)
    per_token_loss = -torch.minimum(ratio * adv, clipped * adv)
    if per_token_kl is not None:
        per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        L = max_completion_length if max_completion_length is not None else mask.shape[1]
        loss = (per_token_loss * mask).sum() / (per_token_loss.shape[0] * L)
    else:  # dapo
        n_items = mask.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch)
        loss = (per_token_loss * mask).sum() / n_items.clamp(min=1.0)
    with torch.no_grad():
        low = (ratio < 1 - epsilon_low) & (adv < 0)
        high = (ratio > 1 + eps_high) & (adv > 0)
        stats["clip_ratio/low"] = masked_mean(low.float(), mask)
        stats["clip_ratio/high"] = masked_mean(high.float(), mask)
        stats["clip_ratio/region"] = masked_mean((low | high).float(), mask)
    return loss, stats


# ---------------------------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class GRPOConfig(RLConfig):
    """Hyper-parameters of ``GRPOTrainer``: ``RLConfig``'s (prompts_per_step, max_new_tokens, temperature, top_p,
    lr, grad_clip, weight_decay, seed) and GRPO's own."""

    num_generations: int = 8
    lr: float = 2e-5
    beta: float = 0.0
    epsilon_low: float = 0.2
    epsilon_high: float | None = None  # DAPO's clip-higher: e.g. 0.28
    loss_type: str = "grpo"
    scale_rewards: bool = True
    softmax_temperature: float = 1.0  # τ of softmax_weighted
    num_iterations: int = 1  # μ: passes over each generation batch
    num_minibatches: int = 1  # optimizer steps per pass (each over whole groups)
    micro_batch_size: int | None = 32  # rows per forward/backward (rounded to whole groups); None: all at once

    def validate(self) -> None:
        super().validate()
        if isinstance(self.num_generations, bool) or not isinstance(self.num_generations, int) \
                or self.num_generations < 2:
            raise ValueError(f"GRPOConfig.num_generations (G) must be >= 2, got {self.num_generations!r}")
        for name in ("num_iterations", "num_minibatches"):
            if getattr(self, name) < 1:
                raise ValueError(f"GRPOConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"GRPOConfig.loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if not self.epsilon_low > 0 or (self.epsilon_high is not None and not self.epsilon_high > 0):
            raise ValueError(f"GRPOConfig: clip epsilons must be > 0, got {self.epsilon_low}, {self.epsilon_high}")
        if self.beta < 0:
            raise ValueError(f"GRPOConfig.beta must be >= 0, got {self.beta}")
        if self.prompts_per_step < self.num_minibatches:
            raise ValueError("GRPOConfig: fewer prompts (groups) per step than mini-batches")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"GRPOConfig.micro_batch_size must be >= 1 or None, got {self.micro_batch_size}")


class GRPOTrainer:
    """GRPO on a ``CausalLM``: ``generate_responses`` → ``compute_rewards`` → group advantages → clipped updates."""

    def __init__(self, model: nn.Module, tokenizer: Any, reward_fns: RewardFn | Sequence[RewardFn],
                 dataset: GRPODataset, config: GRPOConfig | None = None,
                 reward_weights: Sequence[float] | None = None, ref_model: nn.Module | None = None,
                 stop_token_ids: Sequence[int] = (), encode: Any = None, strategy: str = "ddp",
                 dist_info: DistInfo | None = None) -> None:
        self.config = config or GRPOConfig()
        self.config.validate()
        if not isinstance(dataset, GRPODataset):
            raise TypeError(f"GRPOTrainer expects a GRPODataset, got {type(dataset).__name__}")
        self.model, self.tokenizer, self.dataset = model, tokenizer, dataset
        self.reward_fns = [reward_fns] if callable(reward_fns) else list(reward_fns)
        self.reward_weights = reward_weights
        self.stop_token_ids = tuple(stop_token_ids)
        self.encode = encode  # str -> ids (a chat template); None: tokenizer.encode
        # Under torchrun (strategy ddp | fsdp): every rank samples the same whole rollout (same seed, same weights)
        # and trains on its share of the groups; see distributed.distribute_policy. beta = 0: no reference at all.
        self.info = dist_info or init_distributed(next(model.parameters()).device.type)
        check_even_split(self.config.prompts_per_step, self.config.num_minibatches, self.info, "prompt groups")
        self.model, self.ref_model = distribute_policy(model, self.info, strategy, ref_model,
                                                       need_ref=self.config.beta > 0)
        self.device = next(model.parameters()).device
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=self.config.lr,
                                           weight_decay=self.config.weight_decay)
        self.step = 0
        self.generator = torch.Generator(device=self.device).manual_seed(self.config.seed)

    @lesson_task(13)
    def generate_responses(self, prompts: Sequence[str]) -> Rollout:
        c = self.config
        return generate_responses(self.model, prompts, c.num_generations, tokenizer=self.tokenizer,
                                  temperature=c.temperature, top_p=c.top_p, max_new_tokens=c.max_new_tokens,
                                  stop_token_ids=self.stop_token_ids, generator=self.generator, encode=self.encode)

    @lesson_task(13)
    def compute_rewards(self, rollout: Rollout) -> torch.Tensor:
        total, _ = compute_rewards(self.reward_fns, rollout.prompts, rollout.completions, self.reward_weights)
        return total.to(self.device)

    def compute_advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        c = self.config
        if c.loss_type == "softmax_weighted":
            return softmax_group_weights(rewards, c.num_generations, c.softmax_temperature)
        return group_advantages(rewards, c.num_generations, c.scale_rewards)

    def compute_gradients(self, rollout: Rollout, advantages: torch.Tensor, rows: torch.Tensor,
                          ref_logprobs: torch.Tensor | None = None, num_items: torch.Tensor | None = None
                          ) -> dict[str, float]:
        """Accumulate into ``.grad`` the gradient of the loss over ``rows`` (whole groups, in order), in
        micro-batches of ``micro_batch_size`` rows; each micro-batch's loss is scaled so the sum equals the loss
        over all of ``rows`` at once (tested). Returns the mini-batch's loss and stats."""
        c, G = self.config, self.config.num_generations
        mask = rollout.response_mask
        n_rows = rows.numel()
        micro = max(G, (c.micro_batch_size or n_rows) // G * G)  # whole groups per micro-batch
        tokens = mask[rows].sum().clamp(min=1.0)
        wsum = advantages[rows].sum() if c.loss_type == "softmax_weighted" else None
        totals: dict[str, float] = {}
        local = rank_rows(rows, G)  # this rank's whole groups (all rows with one process)
        for i in range(0, local.numel(), micro):
            r = local[i : i + micro]
            sub = rollout.select(r)
            lp = response_logprobs(self.model, sub, c.temperature, group_size=G)
            loss, st = compute_grpo_loss(
                lp, sub.old_logprobs, advantages[r], sub.response_mask,
                ref_logprobs=None if ref_logprobs is None else ref_logprobs[r], beta=c.beta,
                epsilon_low=c.epsilon_low, epsilon_high=c.epsilon_high, loss_type=c.loss_type,
                max_completion_length=c.max_new_tokens, num_items_in_batch=num_items)
            if c.loss_type in ("grpo", "dr_grpo"):
                w = r.numel() / n_rows
            elif c.loss_type == "bnpo":
                w = (sub.response_mask.sum() / tokens).item()
            elif c.loss_type == "softmax_weighted":
                w = (advantages[r].sum() / wsum).item()
            else:  # dapo: already divided by the generation batch's token count
                w = 1.0
            if not torch.isfinite(loss):
                raise FloatingPointError(f"GRPO loss is {loss.item()} at step {self.step}")
            (loss * w * self.info.world_size).backward()  # x W: the ranks' gradients are averaged
            for k, v in {"loss": loss.item(), **{k: v.item() for k, v in st.items()}}.items():
                totals[k] = totals.get(k, 0.0) + w * v if k == "loss" else totals.get(k, 0.0) + v * r.numel() / n_rows
        return all_reduce_stats(totals)  # each rank holds its share of the sums

    @lesson_task(13)
    def training_step(self, prompts: Sequence[str] | None = None) -> dict[str, float]:
        """One generation batch: rollout, rewards, advantages, ``num_iterations`` × mini-batch updates."""
        c, G = self.config, self.config.num_generations
        if prompts is None:
            prompts = [it.prompt for it in self.dataset.next_prompts(c.prompts_per_step)]
        with gathered_params(self.model):  # FSDP: full weights for the KV-cache decode, resharded after
            rollout = self.generate_responses(prompts)
        rewards = self.compute_rewards(rollout)
        adv = self.compute_advantages(rewards)
        mask = rollout.response_mask
        ref_lp = None
        if self.ref_model is not None:
            with torch.no_grad():
                ref_lp = response_logprobs(self.ref_model, rollout, c.temperature, group_size=G)
        P = mask.shape[0] // G
        per_mb = math.ceil(P / c.num_minibatches)  # mini-batches hold whole groups
        num_items = mask.sum() / c.num_minibatches
        self.model.train()
        stats: dict[str, list[float]] = {}
        for _ in range(c.num_iterations):
            order = torch.randperm(P, generator=self.generator, device=self.device) if c.num_minibatches > 1 \
                else torch.arange(P, device=self.device)
            for i in range(0, P, per_mb):
                groups = order[i : i + per_mb]
                rows = (groups[:, None] * G + torch.arange(G, device=self.device)).reshape(-1)
                self.optimizer.zero_grad(set_to_none=True)
                st = self.compute_gradients(rollout, adv, rows, ref_lp, num_items)
                average_gradients(self.model.parameters())  # ddp under torchrun (FSDP reduced them already)
                gn = clip_grad_norm(self.model.parameters(), c.grad_clip)
                self.optimizer.step()
                for k, v in {**st, "grad_norm": gn}.items():
                    stats.setdefault(k, []).append(v)
        self.step += 1
        out = {k: sum(v) / len(v) for k, v in stats.items()}
        g = rewards.view(-1, G)
        out.update(reward=rewards.mean().item(), reward_std=g.std(dim=1).mean().item(),
                   frac_reward_zero_std=(g.std(dim=1) == 0).float().mean().item(),
                   response_length=mask.sum(-1).mean().item(),
                   clip_frac=out.get("clip_ratio/region", 0.0), kl=out.get("kl", 0.0))
        return out

    # -------------------------------------------------------------------------------------------- checkpoints
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Full tensors (under FSDP gathered: every rank calls this)."""
        return {f"model.{k}": v for k, v in full_state_dict(self.model).items()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        load_full_state_dict(self.model, {k[6:]: v for k, v in state.items() if k.startswith("model.")})

    def trainer_state(self) -> dict[str, Any]:
        return {"step": self.step, "dataset": self.dataset.state_dict(), "generator": self.generator.get_state(),
                "config": asdict(self.config)}

    def load_trainer_state(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.dataset.load_state_dict(state["dataset"])
        self.generator.set_state(state["generator"])
