"""``intro2llm model-info --config NAME``: parameter, FLOP and memory table of a preset (light: no torch here)."""

from __future__ import annotations

import argparse


def _model_info(args: argparse.Namespace) -> int:
    from intro2llm.configs import get_config
    from intro2llm.model.analysis import format_report

    try:
        config = get_config(args.config)
    except ValueError as exc:
        print(f"error: {exc}")
        return 2
    print(f"config: {args.config}")
    print(format_report(config, seq_len=args.seq_len, batch=args.batch, dtype=args.dtype, optimizer=args.optimizer))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("model-info", help="parameters, FLOPs and memory of a model config preset")
    p.add_argument("--config", default="tiny", help="preset name (intro2llm.configs.list_configs())")
    p.add_argument("--seq-len", type=int, default=1024, help="sequence length for FLOPs and memory")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "lion", "sgd", "sgd_momentum", "none"])
    p.set_defaults(func=_model_info)
