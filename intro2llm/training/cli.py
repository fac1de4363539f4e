"""``intro2llm train``: pretrain a ``CausalLM`` from the command line (also under ``torchrun ... -m intro2llm train``).

    intro2llm train --data synthetic --out runs/nano                       # the defaults: nano preset, arithmetic mix
    intro2llm train --config tiny --data synthetic --out runs/tiny        # the 6M tiny preset (slower to learn)
    intro2llm train --config tiny --data stdlib --steps 2000 --out runs/py
    intro2llm train --data PATH --out DIR                                  # a shard dir (index.json) or text file/dir
    intro2llm train --out runs/tiny --resume                               # continue from the newest checkpoint
    torchrun --nproc_per_node=2 -m intro2llm train --batch-size 32 ...    # DDP: same losses as one process
    torchrun --nproc_per_node=2 -m intro2llm train --strategy fsdp ...    # FSDP2: sharded weights/optimizer/ckpts
    torchrun --nnodes 2 --nproc_per_node 1 --rdzv-backend c10d --rdzv-endpoint HOST:PORT -m intro2llm train ...
                                                                           # on each of 2 nodes: the same run

``DIR`` receives ``data/`` (tokenizer-ready shards), ``checkpoints/``, ``metrics.jsonl``, ``tb/`` and, at the end,
``config.json`` + ``model.safetensors`` + the tokenizer files (``intro2llm_tokenizer.json``, Hugging Face
``tokenizer.json``, ``tokenizer_config.json``, ``generation_config.json``), loadable with
``CausalLM.from_pretrained(DIR)`` and ``intro2llm.data.prepare.load_tokenizer(DIR)`` (or ``transformers``'
``AutoModelForCausalLM``/``AutoTokenizer``). This module imports no torch at the top level (the CLI
lists commands quickly); the handler imports what it needs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

    from intro2llm.training.distributed import DistInfo

# Defaults tuned so that `intro2llm train` (tiny model, synthetic arithmetic) fits in ~3 minutes on 2 CPU cores.
DEFAULTS = dict(config="nano", steps=400, batch_size=16, seq_len=64, lr=3e-3, warmup=30)
# The --data synthetic pretraining mix: arithmetic with operations drawn uniformly from this tuple (a repeated
# operation weighs more: half the problems are additions, the task SFT/RL then specialise on), 1-2 digit operands.
SYNTHETIC_MIX = dict(ops=("+", "+", "-", "*"), min_digits=1, max_digits=2)


def register(subparsers) -> None:  # noqa: ANN001 - argparse's private subparsers type
    from intro2llm.training.sft_cli import add_command, add_dist_args, add_schedule_args

    p = add_command(subparsers, "train",
                    summary="pretrain a model (default: nano on synthetic arithmetic, ~1.5 min on 2 CPU cores)",
                    description="Pretrain a CausalLM with the intro2llm Trainer; works the same under torchrun (DDP).")
    p.add_argument("--config", default=DEFAULTS["config"],
                   help="model preset (intro2llm.configs) or a JSON file of ModelConfig fields; vocab_size is set "
                        "from the tokenizer")
    p.add_argument("--data", default="synthetic",
                   help="synthetic | stdlib | PATH (a shard dir with index.json, a text file, or a dir of text)")
    p.add_argument("--eval-data", default=None, help="held-out shard dir (default: DIR/data/val when built here)")
    p.add_argument("--out", default="runs/train", help="output directory DIR")
    add_schedule_args(p, DEFAULTS, batch="sequences")
    p.add_argument("--seq-len", type=int, default=DEFAULTS["seq_len"], help="tokens per training sequence")
    p.add_argument("--schedule", default="cosine", choices=["cosine", "linear", "constant", "wsd"])
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "lion", "torch-adamw"])
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0, help="global-norm clip (0: off)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="bf16 = autocast; auto = bf16 where the hardware has native bf16 matmuls, else fp32")
    p.add_argument("--eval-every", type=int, default=200, help="evaluate every N steps (and at the end)")
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--save-every", type=int, default=200, help="checkpoint every N steps (and at the end)")
    p.add_argument("--keep", type=int, default=2, help="checkpoints to keep")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    add_dist_args(p)  # --strategy ddp|fsdp, --dist-timeout
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary for stdlib/text data")
    p.add_argument("--max-bytes", type=int, default=8_000_000, help="text bytes read for stdlib/text data")
    p.add_argument("--synthetic-docs", type=int, default=50_000, help="synthetic training problems to generate")
    p.add_argument("--accuracy-samples", type=int, default=200,
                   help="synthetic data: greedy exact-match accuracy on N fresh problems at the end (0: skip)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument("--no-tensorboard", action="store_true")
    p.add_argument("--init", default=None, metavar="DIR",
                   help="start from this pretrained model directory (config.json + safetensors) instead of random "
                        "weights; required with --lora/--qlora (the frozen base)")
    from intro2llm.training.peft_args import add_peft_args

    add_peft_args(p)  # --lora R / --qlora (lesson 14)
    p.set_defaults(func=run)


def _fail(msg: str) -> int:
    print(f"intro2llm train: error: {msg}", file=sys.stderr)
    return 2


def _model_config(spec: str, vocab_size: int, seq_len: int, tokenizer):  # noqa: ANN001, ANN202
    from intro2llm.configs import get_config
    from intro2llm.model.config import ModelConfig

    if spec.endswith(".json") or os.path.sep in spec:
        if not os.path.isfile(spec):
            raise ValueError(f"--config {spec!r}: no such file")
        with open(spec, encoding="utf-8") as f:
            cfg = ModelConfig.from_dict(json.load(f))
    else:
        cfg = get_config(spec)
    changes = dict(vocab_size=vocab_size, bos_token_id=None, pad_token_id=None,
                   eos_token_id=getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None)
    if seq_len + 1 > cfg.max_position_embeddings:  # the trainer feeds windows of seq_len + 1 tokens
        changes["max_position_embeddings"] = seq_len + 1
    return cfg.replace(**changes)


def _initial_model(args, cfg, tokenizer):  # noqa: ANN001, ANN202
    """A fresh model of ``cfg``, or the ``--init`` model; then the ``--lora``/``--qlora`` adapters, if asked."""
    from pathlib import Path

    from intro2llm.data.prepare import load_tokenizer, tokenizer_file
    from intro2llm.model.causal_lm import CausalLM
    from intro2llm.training.peft_args import apply_peft_args, peft_requested

    if args.init is None:
        if peft_requested(args):
            raise ValueError("--lora/--qlora adapt a pretrained model: give it with --init DIR")
        return CausalLM(cfg)
    init = Path(args.init)
    if not (init / "config.json").is_file():
        raise ValueError(f"--init {init}: no config.json (expected a model directory written by train/save_pretrained)")
    model = CausalLM.from_pretrained(init)
    if model.config.vocab_size != cfg.vocab_size:
        raise ValueError(f"--init {init}: its vocab_size {model.config.vocab_size} differs from the data's "
                         f"{cfg.vocab_size}")
    if args.seq_len + 1 > model.config.max_position_embeddings:
        raise ValueError(f"--init {init}: --seq-len {args.seq_len} + 1 exceeds its max_position_embeddings "
                         f"{model.config.max_position_embeddings}")
    if tokenizer is not None and tokenizer_file(init) is not None:
        probe = "Q: 12+35=?\nA: 47\nthe quick brown fox, def f(x): return x ** 2\n"
        if load_tokenizer(init).encode(probe) != tokenizer.encode(probe):
            raise ValueError(f"--init {init}: its tokenizer encodes text differently from this run's tokenizer "
                             f"(build the data with the same --data/--seed/--synthetic-docs as the base run)")
    return apply_peft_args(model, args, base=str(init))


def _prepare(args, info):  # noqa: ANN001, ANN202
    """Build (rank 0) or find the data; returns (train_dir, val_dir, tokenizer)."""
    from pathlib import Path

    from intro2llm._io import atomic_write
    from intro2llm.data import prepare as prep
    from intro2llm.data.pretrain_dataset import INDEX_FILE, DataPathError, read_text_documents
    from intro2llm.training.distributed import barrier, broadcast_object

    out = Path(args.out)
    data_dir = out / "data"
    tok_path = out / prep.TOKENIZER_FILE
    is_shard_dir = args.data not in ("synthetic", "stdlib") and (Path(args.data) / INDEX_FILE).exists()
    source = {"data": args.data, "seed": args.seed, "vocab_size": args.vocab_size, "max_bytes": args.max_bytes,
              "synthetic_docs": args.synthetic_docs}
    if args.data == "synthetic":  # as JSON reads it back (lists), so an unchanged mix compares equal
        source["mix"] = json.loads(json.dumps(SYNTHETIC_MIX))
    source_file = data_dir / "source.json"
    built = (data_dir / "train" / INDEX_FILE).exists() and prep.tokenizer_file(out) is not None \
        and source_file.exists() \
        and json.loads(source_file.read_text()) == source
    error = None
    if info.is_main and not is_shard_dir and not built:
        try:
            out.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            if args.data == "synthetic":
                from intro2llm.data.synthetic import SyntheticConfig

                tok = prep.prepare_synthetic(data_dir, num_train=args.synthetic_docs, seed=args.seed,
                                             config=SyntheticConfig(**SYNTHETIC_MIX))
            elif args.data == "stdlib":
                from intro2llm.data.corpora import python_stdlib

                tok = prep.prepare_text(python_stdlib(args.max_bytes), data_dir, vocab_size=args.vocab_size)
            else:
                docs, size = [], 0
                for d in read_text_documents(args.data):
                    docs.append(d)
                    size += len(d)
                    if size >= args.max_bytes:
                        break
                tok = prep.prepare_text(docs, data_dir, vocab_size=args.vocab_size)
            tok.save(tok_path)
            atomic_write(source_file, json.dumps(source))
            print(f"data: {args.data} -> {data_dir} ({time.perf_counter() - t0:.1f}s, vocab {tok.vocab_size})",
                  file=sys.stderr)
        except (DataPathError, ValueError, OSError) as exc:
            error = str(exc)
    error = broadcast_object(error)
    barrier()
    if error is not None:
        raise ValueError(error)
    if is_shard_dir:
        src = Path(args.data)
        tokenizer = None
        for cand in (src, src.parent):
            if prep.tokenizer_file(cand) is not None:
                tokenizer = prep.load_tokenizer(cand)
                break
        return src, Path(args.eval_data) if args.eval_data else None, tokenizer
    val = Path(args.eval_data) if args.eval_data else data_dir / "val"
    return data_dir / "train", val if (val / INDEX_FILE).exists() else None, prep.load_tokenizer(out)


def _check_device(spec: str, torch) -> str | None:  # noqa: ANN001
    """None if ``--device`` names a device this build can use, else the error message."""
    if spec == "auto":
        return None
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        return f"--device {spec!r} is not a device: use auto, cpu, cuda or cuda:N"
    if dev.type == "cpu":
        return None
    if dev.type != "cuda":
        return f"--device {spec!r}: training runs on auto, cpu or cuda, not {dev.type}"
    if not torch.cuda.is_available():
        return (f"--device {spec!r}: no CUDA device is usable here (PyTorch {torch.__version__} "
                f"{'has no CUDA support' if torch.version.cuda is None else 'sees no GPU'}); use --device cpu or auto")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        return f"--device {spec!r}: only {torch.cuda.device_count()} CUDA device(s) here"
    return None


def run(args: argparse.Namespace) -> int:
    """Handler of ``intro2llm train``; returns the exit code."""
    from pathlib import Path

    import torch

    from intro2llm.training.checkpoint import latest_checkpoint
    from intro2llm.training.distributed import run_in_process_group

    for name in ("steps", "batch_size", "seq_len", "keep"):
        if getattr(args, name) < 1:
            return _fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name, low in (("lr", None), ("min_lr", 0.0), ("weight_decay", 0.0), ("grad_clip", 0.0)):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and (value > 0 if low is None else value >= low)):
            need = "> 0" if low is None else f">= {low:g}"
            return _fail(f"--{name.replace('_', '-')} must be a finite number {need}, got {value}")
    from intro2llm.training.sft_cli import check_launch

    if (err := check_launch(args, "train")) is not None:
        return _fail(err)
    bad_device = _check_device(args.device, torch)
    if bad_device:
        return _fail(bad_device)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.resume:
        ckpts = out / "checkpoints"
        if not out.is_dir():
            return _fail(f"--resume: output directory {out} does not exist")
        if latest_checkpoint(ckpts) is None:
            return _fail(f"--resume: no checkpoint found in {ckpts} (expected {ckpts}/step_*/)")
    elif latest_checkpoint(out / "checkpoints") is not None:
        return _fail(f"{out} already holds checkpoints of a run; pass --resume to continue it, or choose another --out")
    # _train runs in its own frame: its locals (the wrapped model, the trainer) are gone before the group is left
    return run_in_process_group(lambda info: _train(args, info, out), args.device, args.dist_timeout)


def _train(args: argparse.Namespace, info: DistInfo, out: Path) -> int:
    """The run itself, in its own frame so that everything holding the process group is freed when it returns."""
    import torch

    from intro2llm.data.pretrain_dataset import PretrainDataset, load_index
    from intro2llm.evaluation.accuracy import synthetic_accuracy
    from intro2llm.training.checkpoint import CheckpointError
    from intro2llm.training.pretrain_trainer import PretrainTrainer
    from intro2llm.training.sft_cli import resume_trainer
    from intro2llm.training.trainer import NonFiniteLossError, TrainerConfig

    try:
        train_dir, val_dir, tokenizer = _prepare(args, info)
        vocab = tokenizer.vocab_size if tokenizer is not None else load_index(train_dir)[1]["vocab_size"]
        cfg = _model_config(args.config, vocab, args.seq_len, tokenizer)
        ds = PretrainDataset(train_dir, args.seq_len, seed=args.seed, vocab_size=cfg.vocab_size)
        val_ds = PretrainDataset(val_dir, args.seq_len, seed=args.seed, vocab_size=cfg.vocab_size) \
            if val_dir is not None else None
    except (ValueError, OSError) as exc:
        return _fail(str(exc))
    torch.manual_seed(args.seed)
    try:
        model = _initial_model(args, cfg, tokenizer)
    except (ValueError, OSError) as exc:
        return _fail(str(exc))
    tc = TrainerConfig(
        steps=args.steps, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, lr=args.lr,
        min_lr=args.min_lr, warmup_steps=min(args.warmup, args.steps), schedule=args.schedule,
        optimizer=args.optimizer, weight_decay=args.weight_decay, grad_clip=args.grad_clip or None,
        precision=args.precision, eval_every=args.eval_every, save_every=args.save_every, keep_last=args.keep,
        out_dir=str(out), progress=not args.no_progress, tensorboard=not args.no_tensorboard,
        device=args.device, strategy=args.strategy,
        extra={"model_config": args.config, "data": args.data, "seq_len": args.seq_len, "seed": args.seed},
    )
    try:
        trainer = PretrainTrainer(model, tc, ds, eval_dataset=val_ds, eval_batches=args.eval_batches,
                                     tokenizer=tokenizer, dist_info=info)
    except ValueError as exc:
        return _fail(str(exc))
    if info.is_main:
        n_params = sum(p.numel() for p in model.parameters())
        if getattr(model, "lora_config", None) is not None:
            from intro2llm.model.lora import trainable_parameter_report

            print(f"LoRA over {args.init}: {trainable_parameter_report(model)}", file=sys.stderr)
        print(f"model: {args.config} ({n_params / 1e6:.2f}M parameters, vocab {cfg.vocab_size}), "
              f"{info.world_size} process(es) on {info.device} ({trainer.precision}), "
              f"global batch {args.batch_size} x {args.seq_len} tokens, {trainer.accum_steps} micro-batch(es) "
              "per step", file=sys.stderr)
    if args.resume:
        if (err := resume_trainer(trainer, out, info)) is not None:
            return _fail(err)
    t0 = time.perf_counter()
    try:
        hist = trainer.train()
    except (NonFiniteLossError, CheckpointError) as exc:
        return _fail(str(exc))
    elapsed = time.perf_counter() - t0
    if info.is_main and hist:
        last = hist[-1]
        summary = {"steps": trainer.step, "loss": round(last["loss"], 4), "train_seconds": round(elapsed, 1),
                   "tokens_per_s": round(last["tokens_per_s"], 1)}
        if trainer.last_eval is not None:
            summary["eval_loss"] = round(trainer.last_eval, 4)
        if args.data == "synthetic" and args.accuracy_samples > 0:
            summary["accuracy"] = synthetic_accuracy(trainer.raw_model, tokenizer, n=args.accuracy_samples)
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        print(json.dumps(summary))
    return 0
