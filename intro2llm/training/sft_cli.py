"""``intro2llm sft``: supervised fine-tuning of a checkpoint on chat-templated data.

    intro2llm sft --ckpt runs/nano --data synthetic --out runs/sft           # the README's run (a few min, 2 cores)
    intro2llm sft --ckpt DIR --data chats.jsonl --template chatml --out DIR2 # {"messages": [...]} or prompt/response
    intro2llm sft --ckpt runs/nano --data synthetic --show-mask             # print the supervised tokens and exit
    intro2llm sft --ckpt runs/nano --out runs/sft --resume                  # continue from the newest checkpoint

``--data synthetic`` trains on seeded arithmetic problems (``intro2llm.data.synthetic``, see ``SYNTHETIC_TRAIN``)
from which the held-out set is removed: 2-digit additions from ``random.Random(12345)``. Greedy exact-match accuracy on
that held-out set is measured before and after training, printed and stored in ``DIR/summary.json``.
``DIR`` receives ``checkpoints/``, ``metrics.jsonl``, ``tb/`` and, at the end, ``config.json`` +
``model.safetensors`` (Hugging Face format; ``intro2llm eval`` and ``transformers`` load it), ``tokenizer.json``
(with the template's special tokens) and ``tokenizer_config.json`` (the Jinja ``chat_template``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

# Defaults for the checkpoint of the default `intro2llm train` (nano preset, arithmetic mix) on --data synthetic.
# Learning the carries of 2-digit addition is a sudden transition whose timing varies from seed to seed; batch 64,
# lr 3e-3 and weight decay 0.1 gave the earliest and most reliable one among the settings measured (batch 32 needs
# more examples, batch 128 or lr 6e-3 more steps or none within 800; without weight decay it came later and not for
# every seed). Lesson 10's README has the curves and the 3-seed results.
DEFAULTS = dict(steps=1500, batch_size=64, lr=3e-3, warmup=50, weight_decay=0.1, num_train=20_000, max_length=64)
EVAL_SEED = 12345


def register(subparsers) -> None:  # noqa: ANN001 - argparse's private subparsers type
    p = add_command(
        subparsers, "sft", summary="supervised fine-tuning with a chat template and loss masks (default: synthetic "
        "arithmetic)", description="Fine-tune a checkpoint on (prompt, response) conversations; loss on assistant "
        "tokens only.")
    p.add_argument("--ckpt", required=True, help="input checkpoint dir (config.json, safetensors, tokenizer.json)")
    p.add_argument("--data", default="synthetic", help="synthetic | FILE.jsonl ({'messages': [...]} or "
                                                       "{'prompt', 'response'} per line)")
    p.add_argument("--eval-data", default=None, help="held-out FILE.jsonl for eval loss (synthetic: built in)")
    p.add_argument("--out", default="runs/sft", help="output directory DIR")
    p.add_argument("--template", default="plain", help="chat template: plain | chatml | llama2")
    p.add_argument("--system", default=None, help="system prompt added to every synthetic conversation")
    p.add_argument("--show-mask", action="store_true", help="print the first rows with supervised tokens in "
                                                              "[[...]] and exit")
    add_schedule_args(p, DEFAULTS, batch="rows")
    add_optim_args(p)
    p.set_defaults(weight_decay=DEFAULTS["weight_decay"])
    p.add_argument("--max-length", type=int, default=DEFAULTS["max_length"], help="tokens per row (truncation)")
    p.add_argument("--truncation", default="right", choices=["right", "left", "drop"],
                   help="over-long rows: keep the start / keep the end / drop (rows left without a supervised "
                        "token are dropped and counted)")
    p.add_argument("--packing", action="store_true", help="pack several samples per row (attention stays within "
                                                           "a sample)")
    p.add_argument("--num-train", type=int, default=DEFAULTS["num_train"], help="synthetic training problems")
    p.add_argument("--accuracy-samples", type=int, default=200, help="held-out problems for exact match (0: skip)")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--save-every", type=int, default=100)
    add_run_args(p)
    from intro2llm.training.peft_args import add_peft_args

    add_peft_args(p)
    p.set_defaults(func=run)


def _fail(msg: str) -> int:
    print(f"intro2llm sft: error: {msg}", file=sys.stderr)
    return 2


def add_command(subparsers, name: str, summary: str, description: str) -> argparse.ArgumentParser:  # noqa: ANN001
    """The parser of ``intro2llm NAME`` (``summary`` in the command list, defaults shown in ``--help``)."""
    return subparsers.add_parser(name, help=summary, description=description,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def add_schedule_args(p: argparse.ArgumentParser, defaults: dict, batch: str) -> None:
    """--resume, --steps, --batch-size (global, counted in ``batch``), --micro-batch-size, --lr, --min-lr, --warmup."""
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in DIR")
    p.add_argument("--steps", type=int, default=defaults["steps"], help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=defaults["batch_size"],
                   help=f"global batch ({batch} per step, all processes)")
    p.add_argument("--micro-batch-size", type=int, default=None, help=f"{batch} per forward (gradient accumulation)")
    p.add_argument("--lr", type=float, default=defaults["lr"], help="peak learning rate")
    p.add_argument("--min-lr", type=float, default=None, help="final learning rate (default lr/10)")
    p.add_argument("--warmup", type=int, default=defaults["warmup"], help="warmup steps")


def add_optim_args(p: argparse.ArgumentParser) -> None:
    """Optimizer/schedule/precision options shared by ``intro2llm sft`` and ``intro2llm dpo``."""
    p.add_argument("--schedule", default="cosine", choices=["cosine", "linear", "constant", "wsd"])
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "lion", "torch-adamw"])
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0, help="global-norm clip (0: off)")
    p.add_argument("--precision", default="fp32", choices=["auto", "fp32", "bf16"])


def add_run_args(p: argparse.ArgumentParser) -> None:
    """Checkpoint-keeping, seed, device and logging options shared by ``intro2llm sft`` and ``intro2llm dpo``."""
    p.add_argument("--keep", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-tensorboard", action="store_true")
    add_dist_args(p)


def add_dist_args(p: argparse.ArgumentParser) -> None:
    """``--strategy`` and ``--dist-timeout``, for every command that trains under torchrun."""
    p.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp"],
                   help="multi-process wrapping under torchrun: ddp (replicas) or fsdp (FSDP2 shards); fsdp needs "
                        ">= 2 processes")
    p.add_argument("--dist-timeout", type=float, default=None, metavar="SECONDS",
                   help="longest wait of any collective for the other ranks (a dead rank -> error after this); "
                        "default $INTRO2LLM_DIST_TIMEOUT or 600")


def check_launch(args: argparse.Namespace, command: str) -> str | None:
    """The error message when ``--strategy fsdp`` runs without torchrun or ``--dist-timeout`` is not > 0."""
    import math
    import os

    if args.strategy == "fsdp" and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return ("--strategy fsdp shards the model over several processes, but this is one process: launch with "
                f"'torchrun --nproc_per_node N -m intro2llm {command} ...' (N >= 2), or drop --strategy fsdp")
    if args.dist_timeout is not None and not (math.isfinite(args.dist_timeout) and args.dist_timeout > 0):
        return f"--dist-timeout must be a finite number of seconds > 0, got {args.dist_timeout}"
    return None


def resume_trainer(trainer, out, info) -> str | None:  # noqa: ANN001 - a Trainer, a Path, a DistInfo
    """``trainer.resume(out)`` (every rank); rank 0 says the step. Returns the ``CheckpointError``'s message or None."""
    from intro2llm.training.checkpoint import CheckpointError

    try:
        step = trainer.resume(out)
    except CheckpointError as exc:
        return str(exc)
    if info.is_main:
        print(f"resumed from step {step}", file=sys.stderr)
    return None


def check_at_least_one(args: argparse.Namespace, names: tuple[str, ...]) -> str | None:
    """The error message for the first of ``names`` below 1, else None."""
    for name in names:
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}"
    return None


def check_out_dir(out, resume: bool) -> str | None:  # noqa: ANN001 - a pathlib.Path
    """The error message when ``--resume`` finds no checkpoint in ``out``, or a fresh run would overwrite one."""
    from intro2llm.training.checkpoint import latest_checkpoint

    if resume and latest_checkpoint(out / "checkpoints") is None:
        return f"--resume: no checkpoint found in {out / 'checkpoints'} (expected step_*/)"
    if not resume and latest_checkpoint(out / "checkpoints") is not None:
        return f"{out} already holds checkpoints of a run; pass --resume to continue it, or choose another --out"
    return None


def train_timed(trainer, summary: dict) -> list[dict]:  # noqa: ANN001 - a Trainer
    """``trainer.train()``'s history; records ``steps``, ``train_seconds`` and the last ``loss`` in ``summary``."""
    t0 = time.perf_counter()
    hist = trainer.train()
    summary.update(steps=trainer.step, train_seconds=round(time.perf_counter() - t0, 1))
    if hist:
        summary["loss"] = round(hist[-1]["loss"], 4)
    return hist


SYNTHETIC_TRAIN = dict(ops=("+",), min_digits=1, max_digits=2)  # the training mix of --data synthetic
SYNTHETIC_EVAL = dict(ops=("+",), min_digits=2, max_digits=2)  # the held-out task: 2-digit addition


def synthetic_split(num_train: int, num_eval: int, seed: int, system: str | None = None):  # noqa: ANN201
    """(train conversations, held-out (prompt, answer) pairs): training problems never equal a held-out one."""
    from intro2llm.data import synthetic
    from intro2llm.data.sft_dataset import rows_from_pairs

    held = synthetic.prompts_and_answers(num_eval, seed=EVAL_SEED, config=synthetic.SyntheticConfig(**SYNTHETIC_EVAL))
    held_prompts = {p for p, _ in held}
    pairs = synthetic.sft_pairs(num_train + num_eval + 1000, seed=seed + 1,
                                config=synthetic.SyntheticConfig(**SYNTHETIC_TRAIN))
    pairs = [(p, r) for p, r in pairs if p not in held_prompts][:num_train]
    return rows_from_pairs(pairs, system), held


def run(args: argparse.Namespace) -> int:
    """Handler of ``intro2llm sft``; returns the exit code. Under torchrun every rank runs it (``--strategy``)."""
    if (err := check_at_least_one(args, ("steps", "batch_size", "max_length", "num_train"))) is not None:
        return _fail(err)
    if (err := check_launch(args, "sft")) is not None:
        return _fail(err)
    from intro2llm.training.distributed import run_in_process_group

    return run_in_process_group(lambda info: _run(args, info), args.device, args.dist_timeout)


def _run(args: argparse.Namespace, info) -> int:  # noqa: ANN001 - a DistInfo
    from pathlib import Path

    from intro2llm.data import chat

    try:
        template = chat.get_template(args.template)
    except ValueError as exc:
        return _fail(str(exc))
    out = Path(args.out)
    import torch

    from intro2llm.evaluation.cli import load_checkpoint
    from intro2llm.training.checkpoint import CheckpointError

    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.show_mask and (err := check_out_dir(out, args.resume)) is not None:
        return _fail(err)
    try:
        model, tokenizer = load_checkpoint(args.ckpt)
    except (FileNotFoundError, ValueError, OSError) as exc:
        return _fail(f"--ckpt {args.ckpt}: {exc}")

    from intro2llm.data.sft_dataset import SFTDataset, read_jsonl, render_mask
    from intro2llm.training.peft_args import apply_peft_args, peft_requested
    from intro2llm.training.sft_trainer import SFTTrainer, chat_accuracy, resize_token_embeddings
    from intro2llm.training.trainer import NonFiniteLossError, TrainerConfig

    added = chat.ensure_special_tokens(tokenizer, template)
    if added and peft_requested(args):
        return _fail(f"template {template.name!r} adds special tokens {added} that the base model lacks; LoRA keeps "
                     "the base's embeddings frozen: use --template plain, or full fine-tuning")
    resize_token_embeddings(model, tokenizer.vocab_size)
    torch.manual_seed(args.seed)
    try:
        model = apply_peft_args(model, args, base=str(Path(args.ckpt).resolve()))
    except ValueError as exc:
        return _fail(str(exc))
    held = None
    try:
        if args.data == "synthetic":
            convs, held = synthetic_split(args.num_train, max(args.accuracy_samples, 1), args.seed, args.system)
            from intro2llm.data.sft_dataset import rows_from_pairs

            eval_convs = rows_from_pairs([(p, f" {a}\n") for p, a in held], args.system)
        else:
            convs = read_jsonl(args.data)
            eval_convs = read_jsonl(args.eval_data) if args.eval_data else None
        ds = SFTDataset(convs, tokenizer, template, max_length=args.max_length, truncation=args.truncation,
                        packing=args.packing)
        eval_ds = SFTDataset(eval_convs, tokenizer, template, max_length=args.max_length,
                             truncation=args.truncation) if eval_convs else None
    except (ValueError, TypeError, OSError) as exc:
        return _fail(str(exc))
    if args.show_mask:
        for i in range(min(3, len(ds))):
            print(render_mask(tokenizer, ds[i], color=sys.stdout.isatty()))
        print(json.dumps({"template": template.name, "added_special_tokens": added, **ds.stats}))
        return 0
    if info.is_main:
        print(f"sft: template {template.name} (added tokens {added or 'none'}), data {ds.stats}", file=sys.stderr)
    torch.manual_seed(args.seed)
    tc = TrainerConfig(
        steps=args.steps, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, lr=args.lr,
        min_lr=args.min_lr, warmup_steps=min(args.warmup, args.steps), schedule=args.schedule,
        optimizer=args.optimizer, weight_decay=args.weight_decay, grad_clip=args.grad_clip or None,
        precision=args.precision, eval_every=args.eval_every, save_every=args.save_every, keep_last=args.keep,
        out_dir=str(out), progress=not args.no_progress, tensorboard=not args.no_tensorboard, device=args.device,
        strategy=args.strategy,
        extra={"stage": "sft", "ckpt": args.ckpt, "data": args.data, "template": template.name, "seed": args.seed,
               "max_length": args.max_length, "packing": args.packing, "truncation": args.truncation},
    )
    summary: dict = {"template": template.name, "data": ds.stats}
    # greedy exact match on rank 0, from unsharded models: the loaded one (before Trainer shards it under FSDP)
    # and after training trainer.raw_model (under FSDP the consolidated copy on rank 0)
    accuracy = held is not None and args.accuracy_samples > 0 and info.is_main
    if accuracy and not args.resume:
        summary["accuracy_before"] = chat_accuracy(model, tokenizer, template, held)
        print(f"held-out 2-digit addition exact match before SFT: {summary['accuracy_before']:.3f}", file=sys.stderr)
    try:
        trainer = SFTTrainer(model, tc, ds, eval_dataset=eval_ds, tokenizer=tokenizer, seed=args.seed, dist_info=info)
    except ValueError as exc:
        return _fail(str(exc))
    if args.resume:
        if (err := resume_trainer(trainer, out, info)) is not None:
            return _fail(err)
        prev = out / "summary_before.json"
        if prev.exists():
            summary.update(json.loads(prev.read_text()))
    elif "accuracy_before" in summary:
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary_before.json").write_text(json.dumps({"accuracy_before": summary["accuracy_before"]}))
    try:
        train_timed(trainer, summary)
    except (NonFiniteLossError, CheckpointError) as exc:
        return _fail(str(exc))
    if trainer.last_eval is not None:
        summary["eval_loss"] = round(trainer.last_eval, 4)
    if accuracy:
        summary["accuracy"] = chat_accuracy(trainer.raw_model, tokenizer, template, held)
        summary["accuracy_task"] = f"2-digit addition, {len(held)} held-out problems, greedy exact match"
    if info.is_main:
        from intro2llm._io import atomic_write

        atomic_write(out / "summary.json", json.dumps(summary, indent=1) + "\n")
        print(json.dumps(summary))
    return 0
