"""Shared pieces of reinforcement learning on a language model (lessons 12 PPO and 13 GRPO).

- ``generate_responses``: the rollout. P prompts × G samples in one batch with the KV cache: the prompts are
  left-padded and run once (prefill of P rows, not P·G: the G samples of a prompt share its prefix), the cache is
  repeated G times, then one token per step for all P·G rows (on ``intro2llm.model.fast_decode``'s weight bundle: one
  C++ call per step on fp32 CPU; the module forward for a model it does not cover). Rows stop at EOS (or any
  ``stop_token_ids``, e.g. an end-of-turn token); finished rows are dropped from the batch (the cache is compacted)
  once half of the live rows have finished, so the last long answers do not pay for the short ones. The
  log-probability of every sampled token under the sampling policy (softmax(logits / temperature), before top-k/top-p
  filtering: the policy that the trainer's forward recomputes) is gathered at the step that samples it: PPO/GRPO's
  ``old_logprobs``.
- ``compute_rewards``: several reward functions with weights; a function that raises, returns the wrong number of
  values or a non-finite value raises ``RewardError`` naming it.
- ``response_logprobs``: per-token log-probs of the responses under a model through
  ``intro2llm.ops.fused_linear_logprobs`` (the (B, T, V) logits never exist), plus the trunk's hidden states
  (PPO's value head reads them).
- ``masked_mean``, ``masked_var``, ``masked_whiten``; the KL estimators ``k1``, ``k2``, ``k3`` of Schulman,
  "Approximating KL Divergence" (2020).

Not handled: beam search, stop strings (only stop token ids), multi-turn rollouts, tool calls.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from intro2llm import ops
from intro2llm.course import lesson_task
from intro2llm.model import fast_decode as _fast
from intro2llm.model.causal_lm import sample_next_token
from intro2llm.model.kv_cache import DynamicKVCache, StaticKVCache

RewardFn = Callable[[list[str], list[str]], Sequence[float]]


# ---------------------------------------------------------------------------------------------------------------
# Masked statistics and KL estimators
# ---------------------------------------------------------------------------------------------------------------
def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1 (all of them, or along ``dim``); 0 where none are."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries of ``x`` (Bessel-corrected by default); ValueError with < 2 entries."""
    mask = mask.to(x.dtype)
    n = mask.sum()
    if unbiased and n < 2:
        raise ValueError(f"masked_var: the unbiased variance needs >= 2 masked entries, got {int(n)}")
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return var * n / (n - 1) if unbiased else var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries (mean added back if not ``shift_mean``); masked-out
    entries are returned as 0. Used to whiten PPO's advantages per batch."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    white = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        white = white + mean
    return white * mask.to(x.dtype)


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 = log π(a) − log π_ref(a): unbiased for KL(π‖π_ref) when a ~ π, high variance, can be negative."""
    return logprobs - ref_logprobs


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k2 = ½ (log π(a) − log π_ref(a))²: biased, low variance, ≥ 0."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 = r − 1 − log r with r = π_ref(a)/π(a): unbiased and ≥ 0 (GRPO's and TRL's estimator)."""
    log_r = ref_logprobs - logprobs
    return torch.exp(log_r) - log_r - 1.0


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token KL(π‖π_ref) estimate of the sampled tokens, ``kind`` in k1 | k2 | k3."""
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {kind!r}; choose from {sorted(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[kind](logprobs, ref_logprobs)


# ---------------------------------------------------------------------------------------------------------------
# The hyper-parameters PPO and GRPO share
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class RLConfig:
    """The rollout's and the optimizer's hyper-parameters, the same in ``PPOConfig`` and ``GRPOConfig`` (which add
    their own; defaults sized for the tiny model on the synthetic tasks)."""

    prompts_per_step: int = 16
    max_new_tokens: int = 8
    temperature: float = 1.0
    top_p: float | None = None
    lr: float = 1e-5
    grad_clip: float | None = 1.0
    weight_decay: float = 0.0
    seed: int = 0

    def validate(self) -> None:
        """ValueError naming the first bad shared field (subclasses check theirs after calling this)."""
        for name in ("prompts_per_step", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{type(self).__name__}.{name} must be >= 1, got {getattr(self, name)}")


# ---------------------------------------------------------------------------------------------------------------
# Rollouts
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Rollout:
    """P prompts × G samples, row ``i`` answers prompt ``i // G``.

    ``prompt_ids``/``prompt_mask`` (N, Tp) left-padded; ``response_ids`` (N, Tr) right-padded with the pad id,
    ``response_mask`` (N, Tr) fp32, 1 for the sampled tokens up to and including the stop token;
    ``old_logprobs`` (N, Tr) fp32, log π_old of each sampled token (0 where masked); ``completions``: the decoded
    responses (stop token excluded) when a tokenizer was given.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    old_logprobs: torch.Tensor
    num_generations: int
    prompts: list[str] | None = None
    completions: list[str] | None = None

    @property
    def input_ids(self) -> torch.Tensor:
        """(N, Tp + Tr) prompt + response."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """(N, Tp + Tr) 1 on the real prompt tokens and the response tokens."""
        return torch.cat([self.prompt_mask.long(), self.response_mask.long()], dim=1)

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)

    def select(self, rows: torch.Tensor) -> Rollout:
        """The rollout restricted to ``rows`` (for mini-batches); texts are dropped."""
        return Rollout(self.prompt_ids[rows], self.prompt_mask[rows], self.response_ids[rows],
                       self.response_mask[rows], self.old_logprobs[rows], self.num_generations)


def encode_prompts(prompts: Sequence[str] | Sequence[Sequence[int]], tokenizer=None,  # noqa: ANN001
                   encode: Callable[[str], list[int]] | None = None) -> list[list[int]]:
    """Token ids of each prompt (strings need ``tokenizer`` or ``encode``); ValueError for an empty prompt."""
    if len(prompts) == 0:
        raise ValueError("generate_responses: no prompts given")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if encode is not None:
                ids = list(encode(p))
            elif tokenizer is not None:
                ids = list(tokenizer.encode(p))
            else:
                raise TypeError("generate_responses: string prompts need a tokenizer=")
        else:
            ids = [int(t) for t in p]
        if not ids:
            raise ValueError(f"generate_responses: prompt {i} is empty")
        out.append(ids)
    return out


def left_pad(seqs: list[list[int]], pad_id: int, device: torch.device | str | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Lists of ids → (B, T) ids left-padded with ``pad_id`` and the (B, T) 0/1 mask."""
    width = max(map(len, seqs))
    ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in seqs], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], dtype=torch.long, device=device)
    return ids, mask


def _select_cache_rows(cache: StaticKVCache, keep: torch.Tensor) -> StaticKVCache:
    """A StaticKVCache holding only batch rows ``keep`` of ``cache`` (same length and fill)."""
    new = StaticKVCache.__new__(StaticKVCache)
    new.k, new.v = cache.k[:, keep], cache.v[:, keep]  # (L, B', Hkv, Tmax, D) copies
    new.max_seq_len, new.batch_size, new.seq_len = cache.max_seq_len, keep.numel(), cache.seq_len
    return new


@torch.no_grad()
@lesson_task(12)
def generate_responses(
    model: torch.nn.Module,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    n: int = 1,
    *,
    tokenizer=None,  # noqa: ANN001 - any intro2llm tokenizer (encode/decode/eos_token_id)
    temperature: float = 1.0,
    top_p: float | None = None,
    top_k: int | None = None,
    max_new_tokens: int = 16,
    eos_token_id: int | None = None,
    stop_token_ids: Sequence[int] = (),
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    compact: bool = True,
    encode: Callable[[str], list[int]] | None = None,
    fast_decode: bool = True,
) -> Rollout:
    """Sample ``n`` responses per prompt (see the module docstring); returns a ``Rollout`` of P·n rows.

    ``eos_token_id`` defaults to the tokenizer's, then the model config's. ``temperature == 0`` is greedy (its
    log-probs are then those of softmax(logits)). A prompt whose length + ``max_new_tokens`` exceeds the model's
    ``max_position_embeddings`` raises ``ValueError`` naming the prompt. ``encode`` (str → ids) replaces
    ``tokenizer.encode`` for string prompts, e.g. to wrap them in a chat template; ``Rollout.prompts`` keeps the
    strings as given (what reward functions read).

    ``fast_decode`` (default): the one-token steps run on ``intro2llm.model.fast_decode``'s weight bundle, in one
    C++ call per step where the extension applies (fp32 CPU), else in Python on the bundle; a model it does not
    cover (LoRA, 4-bit, other norms) and ``fast_decode=False`` take the module forward ``model(...)``, the
    reference. The prefill always runs through the module forward.
    """
    cfg = model.config
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"generate_responses: n (samples per prompt) must be an int >= 1, got {n!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"generate_responses: max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not temperature >= 0.0:
        raise ValueError(f"generate_responses: temperature must be >= 0, got {temperature}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"generate_responses: top_p must be in (0, 1], got {top_p}")
    seqs = encode_prompts(prompts, tokenizer, encode)
    for i, s in enumerate(seqs):
        if len(s) + max_new_tokens > cfg.max_position_embeddings:
            raise ValueError(
                f"generate_responses: prompt {i} has {len(s)} tokens; with max_new_tokens={max_new_tokens} it "
                f"exceeds the model's context (max_position_embeddings={cfg.max_position_embeddings})"
            )
    if eos_token_id is None:
        eos_token_id = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
        if eos_token_id is None:
            eos_token_id = cfg.eos_token_id
    stops = sorted({int(t) for t in stop_token_ids} | ({int(eos_token_id)} if eos_token_id is not None else set()))
    if pad_token_id is None:
        pad_token_id = cfg.pad_token_id if cfg.pad_token_id is not None else (eos_token_id or 0)
    device = next(model.parameters()).device
    dtype = model.lm_head.weight.dtype
    was_training = model.training
    model.eval()
    try:
        P, G = len(seqs), n
        prompt_ids, prompt_mask = left_pad(seqs, pad_token_id, device)  # (P, Tp)
        Tp = prompt_ids.shape[1]
        total = Tp + max_new_tokens
        # prefill the P distinct prompts once, then give each of the P·G rows its prompt's keys/values
        small = StaticKVCache.from_config(cfg, P, Tp, dtype, device)
        out = model(prompt_ids, attention_mask=prompt_mask, kv_cache=small, num_logits_to_keep=1)
        cache = StaticKVCache.from_config(cfg, P * G, total, dtype, device)
        cache.k[:, :, :, :Tp] = small.k.repeat_interleave(G, dim=1)
        cache.v[:, :, :, :Tp] = small.v.repeat_interleave(G, dim=1)
        cache.seq_len = Tp
        del small
        logits = out.logits[:, -1].repeat_interleave(G, dim=0)  # (N, V)
        N = P * G
        full_mask = torch.ones(N, total, dtype=torch.bool, device=device)
        full_mask[:, :Tp] = prompt_mask.repeat_interleave(G, dim=0)
        resp = torch.full((N, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        resp_mask = torch.zeros(N, max_new_tokens, dtype=torch.float32, device=device)
        old_lp = torch.zeros(N, max_new_tokens, dtype=torch.float32, device=device)
        stop_t = torch.tensor(stops, dtype=torch.long, device=device)
        rows = torch.arange(N, device=device)  # the N-row indices of the batch rows (the cache's rows)
        alive = torch.ones(N, dtype=torch.bool, device=device)  # batch rows still decoding
        lp_temp = temperature if temperature > 0 else 1.0
        # decode steps: the fast bundle (C++ where it applies) or the module forward; positions continue each
        # row's real prompt tokens (left padding: the first real token is position 0), as the module computes
        bundle = _fast.DecodeWeights.from_model(model) if fast_decode else None
        flat = bundle.flat() if bundle is not None and _fast.cpp_applies(bundle, cache) else None
        next_pos = prompt_mask.sum(-1).repeat_interleave(G)  # (N,) position of response token 0
        padded = not bool(prompt_mask.all())  # no key padding mask at all when no prompt is padded
        steps = 0
        for t in range(max_new_tokens):
            nxt = sample_next_token(logits, do_sample=temperature > 0, temperature=temperature, top_k=top_k,
                                    top_p=top_p, generator=generator)  # (n_batch,)
            logp = torch.log_softmax(logits.float() / lp_temp, dim=-1).gather(-1, nxt[:, None])[:, 0]
            w = rows[alive]
            resp[w, t] = nxt[alive]
            resp_mask[w, t] = 1.0
            old_lp[w, t] = logp[alive]
            steps = t + 1
            if stops:
                alive = alive & ~torch.isin(nxt, stop_t)
            n_alive = int(alive.sum())
            if n_alive == 0 or t == max_new_tokens - 1:
                break
            if compact and n_alive <= rows.numel() // 2:  # drop the finished rows from the batch and the cache
                keep = alive.nonzero()[:, 0]
                rows, nxt, alive = rows[keep], nxt[keep], alive[keep]
                cache = _select_cache_rows(cache, keep)
            nxt = torch.where(alive, nxt, torch.full_like(nxt, pad_token_id))  # finished rows idle on a pad
            step_mask = full_mask[rows, : Tp + t + 1]
            if bundle is None:
                logits = model(nxt[:, None], attention_mask=step_mask, kv_cache=cache,
                               num_logits_to_keep=1).logits[:, -1]
            else:
                pos = (next_pos[rows] + t)[:, None]  # (n_batch, 1)
                kpm = step_mask if padded else None
                logits = (_fast.python_step(model, bundle, nxt, pos, cache, kpm) if flat is None
                          else _fast.cpp_step(model, bundle, nxt, pos, cache, kpm, flat))
        resp, resp_mask, old_lp = resp[:, :steps], resp_mask[:, :steps], old_lp[:, :steps]
        completions = None
        if tokenizer is not None:
            completions = []
            for r, m in zip(resp.tolist(), resp_mask.tolist()):
                ids = [tok for tok, keep in zip(r, m) if keep and tok not in stops]
                completions.append(tokenizer.decode(ids))
        rep_prompts = None
        if isinstance(prompts[0], str):
            rep_prompts = [p for p in prompts for _ in range(G)]
        return Rollout(prompt_ids.repeat_interleave(G, dim=0), prompt_mask.repeat_interleave(G, dim=0), resp,
                       resp_mask, old_lp, G, rep_prompts, completions)
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------------------------------
# Log-probs of responses under a model
# ---------------------------------------------------------------------------------------------------------------
def response_logprobs(
    model: torch.nn.Module, rollout: Rollout, temperature: float = 1.0, return_hidden: bool = False,
    group_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-token log π(response token | prefix) (N, Tr) fp32, 0 where the response mask is 0.

    One forward of prompt + response; the final-norm hidden state at position Tp-1+j predicts response token j,
    and ``ops.fused_linear_logprobs`` turns those states into log-probs chunk by chunk (no (N, T, V) logits).
    ``return_hidden=True`` also returns those states (N, Tr, C) (PPO's value head reads them).

    ``group_size=g``: rows come in groups of g that share one prompt (GRPO's layout). The prompt then runs once
    per group and its keys/values are repeated for the g responses (the training-side twin of the shared
    prefill in ``generate_responses``): (N/g)·Tp + N·Tr token-forwards instead of N·(Tp + Tr), same values and
    gradients (autograd sums the g copies' gradients into the one prompt pass). Falls back to the plain forward
    when the rows of a group do not share their prompt.
    """
    Tp = rollout.prompt_ids.shape[1]
    N = rollout.prompt_ids.shape[0]
    g = group_size or 1
    shared = g > 1 and N % g == 0 and torch.equal(rollout.prompt_ids[::g].repeat_interleave(g, 0), rollout.prompt_ids) \
        and torch.equal(rollout.prompt_mask[::g].repeat_interleave(g, 0), rollout.prompt_mask)
    if shared:
        cache = DynamicKVCache()
        first = model(rollout.prompt_ids[::g], attention_mask=rollout.prompt_mask[::g], kv_cache=cache,
                      return_logits=False)
        cache.keys = [k.repeat_interleave(g, 0) for k in cache.keys]  # (N, Hkv, Tp, D)
        cache.values = [v.repeat_interleave(g, 0) for v in cache.values]
        rest = model(rollout.response_ids, attention_mask=rollout.attention_mask, kv_cache=cache,
                     return_logits=False)
        h = torch.cat([first.hidden_states[:, -1:].repeat_interleave(g, 0), rest.hidden_states[:, :-1]], dim=1)
    else:
        out = model(rollout.input_ids, attention_mask=rollout.attention_mask, return_logits=False)
        h = out.hidden_states[:, Tp - 1 : -1]  # (N, Tr, C): the states that predict the response tokens
    targets = rollout.response_ids.masked_fill(rollout.response_mask == 0, -100)
    lp = ops.fused_linear_logprobs(h, model.lm_head.weight, targets, ignore_index=-100,
                                   temperature=temperature if temperature > 0 else 1.0)
    return (lp, h) if return_hidden else lp


def sequence_logprobs(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log P(y|x) = Σ_t log π(y_t | x, y_<t) over the response mask: (N, T) → (N,)."""
    return (logprobs * mask).sum(-1)


# ---------------------------------------------------------------------------------------------------------------
# Rewards
# ---------------------------------------------------------------------------------------------------------------
class RewardError(ValueError):
    """A reward function raised, returned the wrong number of values, or a non-finite value."""


def synthetic_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """``intro2llm.data.synthetic.reward`` per (prompt, completion): 1 exact, 0.1 well formed, 0 otherwise."""
    from intro2llm.data import synthetic

    return [synthetic.reward(p, c) for p, c in zip(prompts, completions)]


def synthetic_format_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """1.0 when the completion has the ``" <value>\\n"`` form (any value), else 0."""
    from intro2llm.data import synthetic

    return [float(synthetic.extract_answer(c) is not None) for c in completions]


REWARD_FUNCTIONS: dict[str, RewardFn] = {"synthetic": synthetic_reward, "synthetic_format": synthetic_format_reward}


def _fn_name(fn: Callable) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


@lesson_task(12)
def compute_rewards(
    reward_fns: RewardFn | Sequence[RewardFn],
    prompts: Sequence[str],
    completions: Sequence[str],
    weights: Sequence[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_k w_k · r_k(prompt, completion): returns (total (N,), per-function (N, K)) fp32.

    A reward function is called once per batch, ``fn(prompts, completions)``, and returns N numbers (TRL's
    convention). It raising, returning a different count, or any NaN/±inf raises ``RewardError`` naming it:
    a silent NaN would turn every advantage of its group into NaN.
    """
    fns = [reward_fns] if callable(reward_fns) else list(reward_fns)
    if not fns:
        raise ValueError("compute_rewards: no reward functions given")
    if weights is None:
        weights = [1.0] * len(fns)
    if len(weights) != len(fns):
        raise ValueError(f"compute_rewards: {len(weights)} weights for {len(fns)} reward functions")
    if len(prompts) != len(completions):
        raise ValueError(f"compute_rewards: {len(prompts)} prompts but {len(completions)} completions")
    cols = []
    for fn in fns:
        name = _fn_name(fn)
        try:
            vals = fn(list(prompts), list(completions))
            r = torch.as_tensor([float(v) for v in vals], dtype=torch.float32)
        except RewardError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of user code is reported with the function's name
            raise RewardError(f"reward function {name!r} raised {type(exc).__name__}: {exc}") from exc
        if r.numel() != len(prompts):
            raise RewardError(f"reward function {name!r} returned {r.numel()} values for {len(prompts)} completions")
        bad = (~torch.isfinite(r)).nonzero()
        if bad.numel():
            i = int(bad[0, 0])
            raise RewardError(f"reward function {name!r} returned a non-finite value {r[i].item()} for completion "
                              f"{i} ({completions[i]!r})")
        cols.append(r)
    per_fn = torch.stack(cols, dim=1)  # (N, K)
    total = per_fn @ torch.as_tensor(list(weights), dtype=torch.float32)
    return total, per_fn


@torch.no_grad()
def evaluate_synthetic(model: torch.nn.Module, tokenizer, prompts: Sequence[str], *,  # noqa: ANN001
                       max_new_tokens: int = 8, batch_size: int = 128,
                       encode: Callable[[str], list[int]] | None = None,
                       stop_token_ids: Sequence[int] = ()) -> dict[str, float]:
    """Greedy exact-match accuracy and mean ``synthetic_reward`` of ``model`` on synthetic ``prompts``."""
    from intro2llm.data import synthetic

    completions: list[str] = []
    for i in range(0, len(prompts), batch_size):
        r = generate_responses(model, prompts[i : i + batch_size], 1, tokenizer=tokenizer, temperature=0.0,
                               max_new_tokens=max_new_tokens, encode=encode, stop_token_ids=stop_token_ids)
        completions += r.completions
    rewards = synthetic_reward(list(prompts), completions)
    return {"accuracy": synthetic.accuracy(prompts, completions), "reward": sum(rewards) / max(len(rewards), 1)}
