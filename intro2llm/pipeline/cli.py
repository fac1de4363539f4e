"""``intro2llm pipeline``: tokenizer → pretrain → SFT → DPO → GRPO (→ PPO) with an evaluation after every stage.

    intro2llm pipeline                                   # everything into runs/pipeline (minutes on a CPU)
    intro2llm pipeline --out runs/p --fast               # a quarter of every stage's steps
    intro2llm pipeline --out runs/p --resume             # continue after Ctrl-C or a failed stage
    intro2llm pipeline --stages tokenizer,pretrain,sft   # a prefix of the course; add ppo to compare with GRPO

``DIR`` then holds one Hugging Face-format checkpoint per stage, ``summary.json``, ``report.md`` with the table and
the plots, the PNG plots and ``metrics.jsonl`` (see ``intro2llm.pipeline.runner``).
"""

from __future__ import annotations

import argparse
import sys

from intro2llm.pipeline import DEFAULT_STAGES, STAGES


def register(subparsers) -> None:  # noqa: ANN001 - argparse's private subparsers type
    p = subparsers.add_parser(
        "pipeline",
        help="the whole course end to end: tokenizer, pretrain, SFT, DPO, GRPO, with a report and plots",
        description="Run every training stage on the embedded synthetic data, evaluate after each stage on the same "
                    "held-out sets, and write checkpoints, summary.json, report.md and plots.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", default="runs/pipeline", help="output directory DIR")
    p.add_argument("--config", default=None, help="model preset or JSON file (default: intro2llm train's)")
    p.add_argument("--stages", default=None,
                   help=f"comma-separated stages out of {','.join(STAGES)} (default {','.join(DEFAULT_STAGES)}; "
                        "with --resume: the run's own)")
    p.add_argument("--fast", action="store_true", help="every stage runs a quarter of its default steps")
    p.add_argument("--resume", action="store_true", help="continue the run in DIR from its last finished stage")
    p.add_argument("--force", action="store_true", help="start over in a DIR that holds something else (removes "
                                                         "only the pipeline's own files there)")
    p.add_argument("--qlora", action="store_true", help="SFT and DPO train QLoRA adapters (merged into each "
                                                         "stage's checkpoint) instead of the full model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Handler of ``intro2llm pipeline``; returns the exit code."""
    from intro2llm.pipeline.runner import Options, Pipeline, PipelineError, parse_stages

    if args.resume and args.force:
        print("intro2llm pipeline: error: --resume and --force exclude each other", file=sys.stderr)
        return 2
    try:
        stages = parse_stages(args.stages) if args.stages is not None else ()
        opts = Options(out=args.out, config=args.config, stages=stages, fast=args.fast, seed=args.seed,
                       qlora=args.qlora, progress=not args.no_progress)
        pipe = Pipeline(opts, resume=args.resume, force=args.force)
        return pipe.run()
    except PipelineError as exc:
        print(f"intro2llm pipeline: error: {exc}", file=sys.stderr)
        return 2
