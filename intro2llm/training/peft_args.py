"""``--lora r`` / ``--qlora`` for every training command (pretraining, SFT, DPO): one place that adds the flags
to an argparse parser and applies them to a loaded base model.

    add_peft_args(parser)                           # --lora R --lora-alpha --lora-dropout --lora-targets --qlora ...
    model = apply_peft_args(model, args, base=DIR)  # after loading the base, before building the Trainer
    export_model(model, out_dir, tokenizer)         # adapters in PEFT's layout (LoRA) or save_pretrained (full)
    model = load_adapted_model(out_dir)             # base (from the adapter's pointer) + adapters, ready to run

``--qlora`` quantizes the base's linear layers to NF4 (``prepare_qlora_model``) and adds LoRA adapters of rank
``--lora`` (8 when not given) on top; ``--lora`` alone adds adapters to the full-precision base. With ``--qlora``
activation checkpointing is on by default (``CausalLM.set_gradient_checkpointing``, the QLoRA recipe's memory
saver; ``--no-activation-checkpointing`` turns it off, ``--activation-checkpointing`` turns it on for any run).
Only the adapters train: the optimizer is built from ``requires_grad`` parameters, and ``Trainer`` checkpoints
of such a model hold only the adapters plus a pointer to the base (``trainer.pt``'s ``adapter`` entry), from
which ``--resume`` rebuilds the same model. This module imports no torch at the top level (CLIs list commands quickly).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

DEFAULT_QLORA_RANK = 8
# = intro2llm.model.lora.DEFAULT_TARGETS, repeated so that building a CLI parser imports no torch (tested)
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_peft_args(parser: argparse.ArgumentParser) -> None:
    """Add the LoRA/QLoRA options to ``parser`` (an argument group "parameter-efficient fine-tuning")."""
    g = parser.add_argument_group("parameter-efficient fine-tuning (lesson 14)")
    g.add_argument("--lora", type=int, default=None, metavar="R",
                   help="train rank-R LoRA adapters on a frozen base instead of every weight")
    g.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (scaling alpha/r; default 2·r)")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapters' input")
    g.add_argument("--lora-targets", default=",".join(DEFAULT_TARGETS),
                   help="comma-separated names of the linear layers that get adapters")
    g.add_argument("--qlora", action="store_true",
                   help=f"QLoRA: quantize the base's linear layers to NF4 and train LoRA adapters on top "
                        f"(rank --lora, default {DEFAULT_QLORA_RANK})")
    g.add_argument("--no-double-quant", action="store_true", help="QLoRA without double quantization of absmax")
    g.add_argument("--qlora-compute-dtype", default="fp32", choices=["fp32", "bf16"],
                   help="dtype of the 4-bit matmuls (bf16 is the paper's; fp32 is faster on CPUs without AMX)")
    g.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute each Transformer block in the backward instead of keeping its activations "
                        "(default: on with --qlora, as in the QLoRA recipe; off otherwise)")


def peft_requested(args: argparse.Namespace) -> bool:
    """True when ``--lora`` or ``--qlora`` was given."""
    return getattr(args, "lora", None) is not None or bool(getattr(args, "qlora", False))


def peft_settings(args: argparse.Namespace) -> dict[str, Any] | None:
    """The flags as a JSON-ready dict (None without ``--lora``/``--qlora``); ValueError on bad values."""
    if not peft_requested(args):
        return None
    r = args.lora if args.lora is not None else DEFAULT_QLORA_RANK
    if r < 1:
        raise ValueError(f"--lora must be a rank >= 1, got {r}")
    alpha = args.lora_alpha if args.lora_alpha is not None else 2.0 * r
    if not alpha > 0:
        raise ValueError(f"--lora-alpha must be > 0, got {alpha}")
    if not 0.0 <= args.lora_dropout < 1.0:
        raise ValueError(f"--lora-dropout must be in [0, 1), got {args.lora_dropout}")
    targets = [t.strip() for t in str(args.lora_targets).split(",") if t.strip()]
    if not targets:
        raise ValueError(f"--lora-targets names no module: {args.lora_targets!r}")
    qlora = None
    if args.qlora:
        qlora = {"double_quant": not args.no_double_quant, "compute_dtype": args.qlora_compute_dtype}
    ckpt = getattr(args, "activation_checkpointing", None)
    return {"r": r, "alpha": alpha, "dropout": args.lora_dropout, "target_modules": targets, "qlora": qlora,
            "activation_checkpointing": bool(args.qlora) if ckpt is None else bool(ckpt)}


def set_activation_checkpointing(model: Any, enabled: bool) -> None:
    """``model.set_gradient_checkpointing(enabled)``; ValueError for a model without it."""
    if not hasattr(model, "set_gradient_checkpointing"):
        if enabled:
            raise ValueError(f"activation checkpointing: {type(model).__name__} has no set_gradient_checkpointing")
        return
    model.set_gradient_checkpointing(enabled)


def apply_settings(model: Any, settings: dict[str, Any] | None, base: str | None = None) -> Any:
    """Quantize (QLoRA) and add adapters as ``settings`` (from ``peft_settings``) say; in place, returns the model.
    ``base`` is recorded as the adapters' pointer to the frozen weights."""
    import torch

    from intro2llm.model.lora import get_lora_model
    from intro2llm.model.qlora import prepare_qlora_model

    if settings is None:
        return model
    q = settings.get("qlora")
    set_activation_checkpointing(model, settings.get("activation_checkpointing", bool(q)))
    if q:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[q.get("compute_dtype", "fp32")]
        prepare_qlora_model(model, double_quant=q.get("double_quant", True), compute_dtype=dtype)
    get_lora_model(model, r=settings["r"], alpha=settings["alpha"], dropout=settings["dropout"],
                   target_modules=tuple(settings["target_modules"]),
                   base_model_name_or_path=None if base is None else str(Path(base).resolve()))
    model.lora_config.extra["qlora"] = q
    return model


def apply_peft_args(model: Any, args: argparse.Namespace, base: str | None = None) -> Any:
    """``apply_settings(model, peft_settings(args), base)``; without ``--lora``/``--qlora`` only an explicit
    ``--activation-checkpointing`` applies (full fine-tuning)."""
    settings = peft_settings(args)
    if settings is None:
        if getattr(args, "activation_checkpointing", None):
            set_activation_checkpointing(model, True)
        return model
    return apply_settings(model, settings, base)


def export_model(model: Any, out_dir: Any, tokenizer: Any | None = None, template: Any | None = None) -> None:
    """``intro2llm.interop.hf.export_model``: adapters in PEFT's layout (pointing at the base) for a LoRA model,
    else ``save_pretrained``; plus the tokenizer files (ours, Hugging Face's, chat template, generation config)."""
    from intro2llm.interop.hf import export_model as export

    export(model, out_dir, tokenizer, template=template)


def load_adapted_model(path: Any, base: Any | None = None) -> Any:
    """A ``CausalLM`` from an adapter directory: the base from ``base`` or the adapter's
    ``base_model_name_or_path``, quantized again if the adapters were trained with QLoRA, then the adapters."""
    from intro2llm.model.causal_lm import CausalLM
    from intro2llm.model.lora import QLORA_CONFIG, load_lora_adapters, read_adapter_config
    from intro2llm.model.qlora import prepare_qlora_model

    cfg = read_adapter_config(path)
    base = base or cfg.get("base_model_name_or_path")
    if not base or not (Path(base) / "config.json").is_file():
        raise ValueError(f"{path}: the adapter's base model {base!r} is not a model directory (pass base=...)")
    model = CausalLM.from_pretrained(base)
    qpath = Path(path) / QLORA_CONFIG
    q = json.loads(qpath.read_text()) if qpath.is_file() else None
    if q:
        import torch

        prepare_qlora_model(model, double_quant=q.get("double_quant", True),
                            compute_dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[q.get("compute_dtype",
                                                                                                "fp32")])
    load_lora_adapters(model, path)
    model.lora_config.base_model_name_or_path = str(base)
    model.lora_config.extra["qlora"] = q
    return model
