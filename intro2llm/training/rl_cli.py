"""``intro2llm ppo`` and ``intro2llm grpo``: RL from rewards on top of an SFT (or pretrained) checkpoint.

    intro2llm grpo --ckpt /work/ckpt/sft --out runs/grpo                 # 2-digit addition, synthetic reward
    intro2llm ppo  --ckpt /work/ckpt/sft --out runs/ppo --steps 40
    intro2llm grpo --ckpt DIR --out runs/grpo --resume                   # continue from the newest checkpoint
    torchrun --standalone --nproc_per_node 2 -m intro2llm grpo --ckpt DIR --out runs/g2 --strategy fsdp

``--ckpt`` is a Hugging Face-format directory (config.json, model.safetensors, tokenizer.json; a
tokenizer_config.json written by ``intro2llm sft`` selects its chat template, whose end-of-turn token then stops
generation). Prompts come from ``intro2llm.data.synthetic`` (``--ops``, ``--digits``: 2-digit addition by default)
with a training seed, and a fixed held-out set (seed 10000) is scored greedily before and after training.

``DIR`` receives ``metrics.jsonl`` (one line per step: reward, kl, clip_frac, response_length, losses...), ``tb/``
(TensorBoard), ``checkpoints/step_*/`` (model + value head + optimizer + sampler/RNG state, crash-safe, resumable)
and at the end ``config.json`` + ``model.safetensors`` + ``tokenizer.json`` (``CausalLM.from_pretrained(DIR)``) and
``summary.json``. Under torchrun (``--strategy ddp|fsdp``) every rank samples the whole rollout and trains on its share
of each mini-batch (same losses as one process); rank 0 alone logs, checkpoints (full tensors: they resume under
any strategy and world size) and exports. This module imports no torch at the top level.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="starting checkpoint dir (HF format + tokenizer.json)")
    p.add_argument("--out", required=True, help="output directory DIR")
    p.add_argument("--reward", default="synthetic",
                   help="comma-separated reward functions (intro2llm.training.rl.REWARD_FUNCTIONS)")
    p.add_argument("--reward-weights", default=None, help="comma-separated weights, one per reward function")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in DIR")
    p.add_argument("--steps", type=int, default=30, help="RL steps (one rollout each)")
    p.add_argument("--max-new-tokens", type=int, default=6)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--ops", default="+", help="synthetic operations, e.g. '+' or '+-*'")
    p.add_argument("--digits", default="2", help="operand digits: N or MIN-MAX")
    p.add_argument("--train-prompts", type=int, default=2000, help="distinct training prompts")
    p.add_argument("--eval-prompts", type=int, default=200, help="held-out prompts scored greedily (0: skip)")
    p.add_argument("--eval-every", type=int, default=0, help="also evaluate every N steps (0: only start and end)")
    p.add_argument("--save-every", type=int, default=10, help="checkpoint every N steps (and at the end)")
    p.add_argument("--keep", type=int, default=2, help="checkpoints to keep")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument("--no-tensorboard", action="store_true")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto (under torchrun: this rank's GPU)")
    from intro2llm.training.sft_cli import add_dist_args

    add_dist_args(p)  # --strategy ddp|fsdp (every rank samples the whole rollout, trains on its share), --dist-timeout


def register(subparsers) -> None:  # noqa: ANN001 - argparse's private subparsers type
    fmt = argparse.ArgumentDefaultsHelpFormatter
    g = subparsers.add_parser("grpo", help="GRPO from rewards (group-relative advantages, no critic)",
                              description="GRPO on synthetic arithmetic prompts from a checkpoint.",
                              formatter_class=fmt)
    _common(g)
    g.add_argument("--prompts-per-step", type=int, default=16)
    g.add_argument("--num-generations", "-G", type=int, default=8, help="responses per prompt (>= 2)")
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--beta", type=float, default=0.0, help="KL coefficient (k3); 0 loads no reference model")
    g.add_argument("--epsilon", type=float, default=0.2, help="clip epsilon (low)")
    g.add_argument("--epsilon-high", type=float, default=None, help="DAPO clip-higher (default: --epsilon)")
    g.add_argument("--loss-type", default="grpo", choices=["grpo", "bnpo", "dr_grpo", "dapo", "softmax_weighted"])
    g.add_argument("--no-scale-rewards", action="store_true", help="advantages r - mean (Dr. GRPO), no std")
    g.add_argument("--softmax-temperature", type=float, default=1.0, help="tau of softmax_weighted")
    g.add_argument("--num-iterations", type=int, default=1, help="passes over each generation batch (mu)")
    g.add_argument("--num-minibatches", type=int, default=1)
    # 60 steps at lr 1e-4 for the default SFT checkpoint (nano): lr 3e-4 destabilised it (91% -> 68% at step 10)
    g.set_defaults(func=lambda a: run(a, "grpo"), steps=60)
    p = subparsers.add_parser("ppo", help="PPO with GAE from rewards (value head, KL penalty to the SFT model)",
                              description="PPO on synthetic arithmetic prompts from a checkpoint.", formatter_class=fmt)
    _common(p)
    p.add_argument("--prompts-per-step", type=int, default=16)
    p.add_argument("--samples-per-prompt", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--kl-coef", type=float, default=0.05, help="per-token KL penalty coefficient (0: no reference)")
    p.add_argument("--target-kl", type=float, default=None, help="adaptive KL controller target (default: fixed)")
    p.add_argument("--clip-eps", type=float, default=0.2)
    p.add_argument("--vf-coef", type=float, default=0.1)
    p.add_argument("--gamma", type=float, default=1.0)
    p.add_argument("--lam", type=float, default=0.95)
    p.add_argument("--ppo-epochs", type=int, default=2)
    p.add_argument("--num-minibatches", type=int, default=2)
    # 60 steps at lr 1e-4 for the default SFT checkpoint: held-out reward +0.03 (4x the seed-to-seed spread) in ~35 s
    p.set_defaults(func=lambda a: run(a, "ppo"), steps=60)


def _fail(cmd: str, msg: str) -> int:
    print(f"intro2llm {cmd}: error: {msg}", file=sys.stderr)
    return 2


def _synthetic_config(args):  # noqa: ANN001, ANN202
    from intro2llm.data.synthetic import SyntheticConfig

    d = args.digits.split("-")
    lo, hi = (int(d[0]), int(d[-1]))
    return SyntheticConfig(tasks=("arithmetic",), ops=tuple(args.ops), min_digits=lo, max_digits=hi)


def run(args: argparse.Namespace, cmd: str) -> int:
    """Handler of ``intro2llm ppo|grpo``; returns the exit code. Under torchrun every rank runs it (see
    ``distributed.run_in_process_group``); rank 0 alone logs, writes checkpoints, evaluates and exports."""
    from intro2llm.training.sft_cli import check_launch

    if (err := check_launch(args, cmd)) is not None:
        return _fail(cmd, err)
    from intro2llm.training.distributed import run_in_process_group

    def body(info) -> int:  # noqa: ANN001 - a DistInfo
        try:
            return _run(args, cmd, info)
        except (ValueError, OSError, FloatingPointError) as exc:
            return _fail(cmd, str(exc))

    return run_in_process_group(body, args.device, args.dist_timeout)


def _run(args: argparse.Namespace, cmd: str, info) -> int:  # noqa: ANN001 - a DistInfo
    import torch
    from tqdm import tqdm

    from intro2llm.data import synthetic
    from intro2llm.data.prepare import TOKENIZER_FILE, load_tokenizer, tokenizer_file
    from intro2llm.interop.hf import export_model
    from intro2llm.model.causal_lm import CausalLM
    from intro2llm.training import rl
    from intro2llm.training.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
    from intro2llm.training.distributed import (
        barrier,
        full_state_dict,
        gathered_params,
        is_sharded,
        load_full_state_dict,
    )
    from intro2llm.training.logging import MetricsLogger

    ckpt, out = Path(args.ckpt), Path(args.out)
    if not (ckpt / "config.json").exists():
        return _fail(cmd, f"--ckpt {ckpt}: no config.json (expected a directory written by save_pretrained)")
    if tokenizer_file(ckpt) is None:
        return _fail(cmd, f"--ckpt {ckpt}: no {TOKENIZER_FILE} or tokenizer.json")
    for name in ("steps", "max_new_tokens", "prompts_per_step", "train_prompts", "save_every", "keep"):
        if getattr(args, name) < 1:
            return _fail(cmd, f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    ck_root = out / "checkpoints"
    if args.resume and latest_checkpoint(ck_root) is None:
        return _fail(cmd, f"--resume: no checkpoint found in {ck_root}")
    if not args.resume and latest_checkpoint(ck_root) is not None:
        return _fail(cmd, f"{out} already holds checkpoints of a run; pass --resume or choose another --out")
    names = [n.strip() for n in args.reward.split(",") if n.strip()]
    unknown = [n for n in names if n not in rl.REWARD_FUNCTIONS]
    if not names or unknown:
        return _fail(cmd, f"--reward: unknown reward function(s) {unknown}; available: {sorted(rl.REWARD_FUNCTIONS)}")
    weights = None
    if args.reward_weights:
        weights = [float(w) for w in args.reward_weights.split(",")]
        if len(weights) != len(names):
            return _fail(cmd, f"--reward-weights: {len(weights)} weights for {len(names)} reward functions")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    try:
        scfg = _synthetic_config(args)
    except (ValueError, IndexError) as exc:
        return _fail(cmd, f"--ops/--digits: {exc}")
    model = CausalLM.from_pretrained(ckpt)
    tok = load_tokenizer(ckpt)
    encode, stops = None, []
    try:
        from intro2llm.data import chat

        tname = chat.read_chat_template_name(ckpt)
    except ImportError:
        tname = None
    if tname is not None and tname != "plain":
        template = chat.get_template(tname)
        encode = lambda p: chat.encode_prompt(tok, template, [{"role": "user", "content": p}])  # noqa: E731
        stops = [chat.stop_token_id(tok, template)]
    train_prompts = [p for p, _ in synthetic.prompts_and_answers(args.train_prompts, seed=args.seed, config=scfg)]
    # one fixed held-out set (seed 10000) whatever the training seed, so runs with different seeds compare
    eval_prompts = [p for p, _ in synthetic.prompts_and_answers(args.eval_prompts, seed=10_000, config=scfg)]
    fns = [rl.REWARD_FUNCTIONS[n] for n in names]
    if cmd == "grpo":
        from intro2llm.data.grpo_dataset import GRPODataset
        from intro2llm.training.grpo_trainer import GRPOConfig, GRPOTrainer

        cfg = GRPOConfig(prompts_per_step=args.prompts_per_step, num_generations=args.num_generations,
                         max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                         lr=args.lr, beta=args.beta, epsilon_low=args.epsilon, epsilon_high=args.epsilon_high,
                         loss_type=args.loss_type, scale_rewards=not args.no_scale_rewards,
                         softmax_temperature=args.softmax_temperature, num_iterations=args.num_iterations,
                         num_minibatches=args.num_minibatches, seed=args.seed)
        ds = GRPODataset(train_prompts, num_generations=max(args.num_generations, 2), seed=args.seed) \
            if args.num_generations >= 2 else None
        if ds is None:
            return _fail(cmd, f"--num-generations must be >= 2 (a group needs two responses), got "
                              f"{args.num_generations}")
        trainer = GRPOTrainer(model, tok, fns, ds, cfg, reward_weights=weights, stop_token_ids=stops, encode=encode,
                              strategy=args.strategy, dist_info=info)
    else:
        from intro2llm.training.ppo_trainer import PPOConfig, PPOTrainer

        cfg = PPOConfig(prompts_per_step=args.prompts_per_step, samples_per_prompt=args.samples_per_prompt,
                        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                        lr=args.lr, kl_coef=args.kl_coef, target_kl=args.target_kl, clip_eps=args.clip_eps,
                        vf_coef=args.vf_coef, gamma=args.gamma, lam=args.lam, ppo_epochs=args.ppo_epochs,
                        num_minibatches=args.num_minibatches, seed=args.seed)
        trainer = PPOTrainer(model, tok, fns, train_prompts, cfg, reward_weights=weights, stop_token_ids=stops,
                             encode=encode, strategy=args.strategy, dist_info=info)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    logger = MetricsLogger(out, enabled=info.is_main, tensorboard=not args.no_tensorboard, wandb=False,
                           run_config={"command": cmd, **vars(args), "func": None})

    def evaluate() -> dict[str, float]:
        """Greedy held-out score. Under torchrun every rank runs the same greedy decode (under FSDP each forward
        of the gathered model still passes FSDP's hooks, collectives the ranks must enter together)."""
        if args.eval_prompts <= 0:
            return {}
        with gathered_params(trainer.model) as full:
            return rl.evaluate_synthetic(full, tok, eval_prompts, max_new_tokens=args.max_new_tokens, encode=encode,
                                         stop_token_ids=stops)

    summary: dict = {"command": cmd, "ckpt": str(ckpt)}
    if args.resume:
        try:
            ck = load_checkpoint(latest_checkpoint(ck_root))
        except CheckpointError as exc:
            return _fail(cmd, str(exc))
        trainer.load_trainable_state(ck.model_state)
        load_full_state_dict(trainer.optimizer, ck.optimizer_state)
        trainer.load_trainer_state(ck.trainer_state)
        summary.update(ck.trainer_state.get("summary", {}))
        logger.truncate_after(trainer.step)
        if info.is_main:
            print(f"resumed from step {trainer.step}", file=sys.stderr)
    else:
        t0 = time.perf_counter()
        summary["eval_before"] = evaluate()
        summary["eval_seconds"] = round(time.perf_counter() - t0, 1)
        if info.is_main:
            print(f"{cmd}: held-out before training: {summary['eval_before']}", file=sys.stderr)

    def save() -> None:
        # full tensors (FSDP: gathered, a collective), written by rank 0: the checkpoint loads under any strategy
        state, optim = trainer.trainable_state(), full_state_dict(trainer.optimizer)
        if info.is_main:
            save_checkpoint(ck_root, trainer.step, state, optim, {**trainer.trainer_state(), "summary": summary},
                            keep_last=args.keep)
        barrier()

    t0 = time.perf_counter()
    bar = tqdm(total=args.steps, initial=trainer.step, disable=args.no_progress or not info.is_main, desc=cmd,
               dynamic_ncols=True)
    rewards = []
    try:
        while trainer.step < args.steps:
            ts = time.perf_counter()
            m = trainer.training_step()
            m["step_time"] = time.perf_counter() - ts
            if args.eval_every and trainer.step % args.eval_every == 0 and trainer.step < args.steps:
                m.update({f"eval_{k}": v for k, v in evaluate().items()})
            logger.log(trainer.step, m)
            rewards.append(m["reward"])
            bar.update(1)
            bar.set_postfix(reward=f"{m['reward']:.3f}", kl=f"{m.get('kl', 0.0):.4f}",
                            clip=f"{m.get('clip_frac', 0.0):.3f}", len=f"{m['response_length']:.1f}")
            if trainer.step % args.save_every == 0 or trainer.step == args.steps:
                save()
    except (rl.RewardError, FloatingPointError, CheckpointError) as exc:
        logger.close()
        return _fail(cmd, str(exc))
    finally:
        bar.close()
    train_seconds = time.perf_counter() - t0
    summary["eval_after"] = evaluate()
    summary.update(steps=trainer.step, train_seconds=round(train_seconds, 1),
                   first_rewards=summary.get("first_rewards", rewards[:5]), last_rewards=rewards[-5:])
    logger.close()
    final = model
    if is_sharded(trainer.model):  # FSDP: all-gather the full weights (every rank), rank 0 exports a plain copy
        state = full_state_dict(trainer.model)
        if info.is_main:
            final = CausalLM(model.config)
            final.load_state_dict(state)
    if info.is_main:
        export_model(final, out, tok, template=tname)  # + tokenizer files (ours, HF's, chat template, generation)
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        print(json.dumps({k: summary[k] for k in ("eval_before", "eval_after", "steps", "train_seconds")
                          if k in summary}))
    return 0
