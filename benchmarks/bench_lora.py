"""LoRA / QLoRA benchmarks on the tiny preset (lesson 14).

    pytest benchmarks/bench_lora.py --benchmark-only --benchmark-columns=min,median   # pytest-benchmark
    python benchmarks/bench_lora.py [--batch 8 --seq 128 --rounds 6]                 # ratios + peak memory

1. LoRA (r = 8, alpha = 16, the seven projections of every layer) training step, ours vs ``peft`` over
   ``transformers``' ``LlamaForCausalLM``: same initial weights (``intro2llm.interop`` maps the names), the same
   adapter values (A copied, B set to the same random values so every gradient is non-trivial), the same batch,
   fp32. A step is forward with labels, backward, ``optimizer.step()`` (AdamW over the adapters) and ``zero_grad``.
   Ours: ``get_lora_model`` (its ``lora_linear`` fast path) + the ops' fast backends + the fused linear
   cross-entropy + our AdamW; theirs: ``peft.get_peft_model`` + eager Llama (SDPA) + ``torch.optim.AdamW``. The
   two steps alternate within one process (``--rounds`` rounds after a warm-up) and the median of each side is
   compared.
2. Peak memory of a training step, QLoRA (NF4 base with double quantization, fp32 compute, LoRA r = 8, activation
   checkpointing per block as ``--qlora`` does by default and as the QLoRA recipe does) vs full fine-tuning (every
   weight trains, AdamW, no checkpointing: the plain baseline) vs LoRA; for honesty also full fine-tuning with
   checkpointing ("full+ckpt") and QLoRA without it ("qlora-no-ckpt"). Each in a fresh subprocess. ``VmRSS`` is
   read before the model is built; the model (and its quantization) is built, ``VmHWM`` reset (``5`` into
   ``/proc/self/clear_refs``) and 3 steps run; the figure is ``VmHWM - VmRSS before`` = resident weights +
   gradients + optimizer state + activations + temporaries (the fp32 weights a real loader would never hold at once
   are not counted: they are freed by the quantization before the reset). Linux only (``/proc``). Measured twice:
   with glibc's default malloc, and with its mmap threshold fixed at 128 KiB (``mallopt``), which returns freed
   large blocks to the OS at once so that the RSS peak follows the peak of live tensors (see ``_fix_mmap_threshold``).
3. Stored bytes of the quantized weights vs bf16 (``quantized_weight_report``).
4. ``--sft-demo BASE``: QLoRA (NF4 + double quant, LoRA r = 8 on all projections) SFT of a pretrained synthetic-task
   model with ``SFTTrainer`` on ``intro2llm sft``'s synthetic data; prints the held-out loss over the supervised
   tokens and the greedy exact match on held-out 2-digit additions before and after.

Measured 2026-12-05 (2-core Intel Xeon with AVX-512, shared; the benchmark in its own scheduler autogroup at nice
-20, ~99% of the CPU, load ~5; ``--threads 1 --rounds 8``, batch 8x128; lesson 14's README has the tables): LoRA
step ours / PEFT 1.46x (2831 vs 1941 tokens/s; other runs 1.46-1.50x; the plain forward instead of ``lora_linear``:
1.35x). Peak memory QLoRA (checkpointing) / full fine-tuning (no checkpointing): 0.33x with the fixed mmap threshold
(105.1 vs 314.4 MiB; vs full + checkpointing 0.47x), 0.51-0.64x with glibc's default malloc (185.0 vs 360.4 MiB in
the run quoted; heap fragmentation varies).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import pytest
import torch

from intro2llm import testing
from intro2llm.testing import child_json_value, peak_mib_since, reset_peak_rss, status_kb

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BATCH, SEQ, RANK, ALPHA = 8, 128, 8, 16
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _ours(seed: int = 0):
    from intro2llm.configs import get_config
    from intro2llm.model.causal_lm import CausalLM

    torch.manual_seed(seed)
    return CausalLM(get_config("tiny"))


def _batch(vocab: int, batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g).to(DEVICE)


def _adapter_values(model: torch.nn.Module, seed: int = 1) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module name → (A, B) set on our LoRA model from a seeded generator (B non-zero, so dA is not 0)."""
    from intro2llm.model.lora import lora_layers

    g = torch.Generator().manual_seed(seed)
    out = {}
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            layer.lora_A.weight.copy_(torch.randn(layer.lora_A.weight.shape, generator=g) * layer.in_features ** -0.5)
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.01)
            out[name] = (layer.lora_A.weight.detach().clone(), layer.lora_B.weight.detach().clone())
    return out


MEMORY_IMPLS = ("full", "full+ckpt", "lora", "qlora", "qlora-no-ckpt")


def build(impl: str, batch: int = BATCH, seq: int = SEQ):
    """(model, step_fn) for impl in {"ours", "peft"} (LoRA) or MEMORY_IMPLS (ours, for memory): "qlora" has
    activation checkpointing on (the default of ``--qlora``), "qlora-no-ckpt" off; "full+ckpt" is full
    fine-tuning with it."""
    ours = _ours()
    ids = _batch(ours.config.vocab_size, batch, seq)
    if impl.endswith("+ckpt") or impl == "qlora":
        ours.set_gradient_checkpointing(True)
    impl = {"full+ckpt": "full", "qlora-no-ckpt": "qlora"}.get(impl, impl)
    if impl in ("ours", "lora", "qlora", "full"):
        from intro2llm.model.lora import get_lora_model
        from intro2llm.model.qlora import prepare_qlora_model
        from intro2llm.optimizer import build_optimizer

        if impl == "qlora":
            prepare_qlora_model(ours, double_quant=True)
        if impl != "full":
            get_lora_model(ours, r=RANK, alpha=ALPHA, target_modules=TARGETS)
            _adapter_values(ours)
        model = ours.to(DEVICE)
        opt = build_optimizer("adamw", model, lr=1e-4, weight_decay=0.0)

        def loss_fn():
            return model(ids, labels=ids, return_logits=False).loss
    elif impl == "peft":
        import peft

        from intro2llm.interop.hf import hf_name
        from intro2llm.model.lora import get_lora_model

        hf = testing.hf_llama_like(ours)
        values = _adapter_values(get_lora_model(ours, r=RANK, alpha=ALPHA, target_modules=TARGETS))
        model = peft.get_peft_model(hf, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS),
                                                        lora_dropout=0.0, task_type="CAUSAL_LM"))
        with torch.no_grad():
            for name, (a, b) in values.items():
                mod = model.base_model.model.get_submodule(hf_name(name))
                mod.lora_A["default"].weight.copy_(a)
                mod.lora_B["default"].weight.copy_(b)
        del ours
        model = model.to(DEVICE)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)

        def loss_fn():
            return model(input_ids=ids, labels=ids).loss
    else:
        raise ValueError(f"unknown impl {impl!r}")
    model.train()
    return model, testing.train_step_fn(loss_fn, opt, DEVICE)


# ----------------------------------------------------------------------------------------------- pytest-benchmark
@pytest.mark.parametrize("impl", ["ours", "peft"])
def test_lora_step(benchmark, impl):
    pytest.importorskip("peft", reason="peft + transformers are the baseline of this benchmark")
    _, step = build(impl)
    step()
    benchmark.group = "lora-step-tiny"
    benchmark.extra_info["tokens_per_step"] = BATCH * SEQ
    benchmark.pedantic(step, rounds=3, iterations=1)
    benchmark.extra_info["tokens/s"] = BATCH * SEQ / benchmark.stats.stats.median


# ----------------------------------------------------------------------------------------------- script
def _fix_mmap_threshold(nbytes: int = 128 * 1024) -> None:
    """glibc: serve every block >= ``nbytes`` by mmap, so a freed large block goes back to the OS at once. By
    default the threshold grows to the largest block freed so far (up to 32 MiB), after which blocks of that size
    come from the heap, whose freed pieces stay resident (fragmentation): the RSS peak then exceeds the peak of live
    tensors by however much the heap keeps."""
    import ctypes

    M_MMAP_THRESHOLD = -3  # malloc.h
    if ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, nbytes) != 1:
        raise RuntimeError("mallopt(M_MMAP_THRESHOLD) failed (not glibc?)")


def _memory_child(impl: str, batch: int, seq: int, fixed_mmap: bool = False) -> None:
    if fixed_mmap:
        _fix_mmap_threshold()
    import intro2llm.model.causal_lm  # noqa: F401 - import everything before the baseline
    import intro2llm.model.lora  # noqa: F401
    import intro2llm.model.qlora  # noqa: F401
    import intro2llm.optimizer  # noqa: F401

    torch.randn(8).sum()  # initialise the allocator/threads
    before = status_kb("VmRSS")
    _, step = build(impl, batch, seq)
    reset_peak_rss()
    for _ in range(3):
        step()
    print(json.dumps({"impl": impl, "peak_mib": peak_mib_since(before)}))


def measure_memory(impl: str, batch: int, seq: int, fixed_mmap: bool = False) -> float:
    cmd = [sys.executable, __file__, "--memory-child", impl, "--batch", str(batch), "--seq", str(seq)]
    cmd += ["--fixed-mmap-threshold"] if fixed_mmap else []
    return child_json_value(cmd, "peak_mib")


def measure_speed(batch: int, seq: int, rounds: int) -> dict[str, float]:
    steps = {impl: build(impl, batch, seq)[1] for impl in ("ours", "peft")}
    losses = {impl: float(step().detach()) for impl, step in steps.items()}  # warm-up; same weights: same first loss
    if abs(losses["ours"] - losses["peft"]) > 1e-3 * abs(losses["peft"]):
        raise RuntimeError(f"the two sides do not compute the same loss: {losses}")
    seconds = testing.median_seconds_alternating(steps, rounds, warmup=False)
    return {impl: batch * seq / s for impl, s in seconds.items()}


def size_report() -> dict[str, float]:
    from intro2llm.model.qlora import prepare_qlora_model, quantized_weight_report

    return {f"double_quant={dq}": round(quantized_weight_report(prepare_qlora_model(_ours(), double_quant=dq))
                                        ["ratio"], 4) for dq in (False, True)}


def sft_demo(base: str, out: str, steps: int, batch: int, lr: float, rank: int, num_train: int,
             eval_samples: int) -> dict:
    """QLoRA SFT on the synthetic task with the SFT trainer (``intro2llm sft``'s data and held-out split):
    held-out loss (supervised tokens) and greedy exact match on held-out 2-digit additions, before and after."""
    from intro2llm.data import chat
    from intro2llm.data.sft_dataset import SFTDataset, rows_from_pairs
    from intro2llm.evaluation.cli import load_checkpoint
    from intro2llm.model.lora import trainable_parameter_report
    from intro2llm.model.qlora import quantized_weight_report
    from intro2llm.training.peft_args import apply_settings
    from intro2llm.training.sft_cli import synthetic_split
    from intro2llm.training.sft_trainer import SFTTrainer, chat_accuracy
    from intro2llm.training.trainer import TrainerConfig

    model, tok = load_checkpoint(base)
    template = chat.get_template("plain")
    convs, held = synthetic_split(num_train, eval_samples, seed=0)
    ds = SFTDataset(convs, tok, template, max_length=64)
    eval_ds = SFTDataset(rows_from_pairs([(p, f" {a}\n") for p, a in held]), tok, template, max_length=64)
    torch.manual_seed(0)
    apply_settings(model, {"r": rank, "alpha": 2.0 * rank, "dropout": 0.0, "target_modules": list(TARGETS),
                           "qlora": {"double_quant": True, "compute_dtype": "fp32"}}, base=base)
    tc = TrainerConfig(steps=steps, batch_size=batch, lr=lr, warmup_steps=min(10, steps), schedule="cosine",
                       weight_decay=0.0, precision="fp32", eval_every=0, save_every=0, out_dir=out, progress=True,
                       tensorboard=False, wandb=False)
    trainer = SFTTrainer(model, tc, ds, eval_dataset=eval_ds, tokenizer=tok)
    result = {"base": base, "steps": steps, "batch": batch, "lr": lr, "rank": rank,
              "params": str(trainable_parameter_report(model)), "nf4_vs_bf16": quantized_weight_report(model)["ratio"],
              "eval_loss_before": trainer.evaluate(), "exact_match_before": chat_accuracy(model, tok, template, held)}
    t0 = time.perf_counter()
    trainer.train()
    result.update(train_seconds=round(time.perf_counter() - t0, 1), eval_loss_after=trainer.evaluate(),
                  exact_match_after=chat_accuracy(trainer.raw_model, tok, template, held),
                  held_out=f"{len(held)} 2-digit additions, greedy exact match")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--seq", type=int, default=SEQ)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--fixed-mmap-threshold", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--sft-demo", default=None, metavar="BASE",
                    help="instead: QLoRA SFT of the pretrained BASE dir on the synthetic task (loss/exact match)")
    ap.add_argument("--sft-out", default="runs/qlora_sft_demo")
    ap.add_argument("--sft-steps", type=int, default=150)
    ap.add_argument("--sft-batch", type=int, default=32)
    ap.add_argument("--sft-lr", type=float, default=3e-3)
    ap.add_argument("--sft-eval", type=int, default=200, help="held-out problems")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.sft_demo:
        print(json.dumps(sft_demo(args.sft_demo, args.sft_out, args.sft_steps, args.sft_batch, args.sft_lr, RANK,
                                  20_000, args.sft_eval), indent=1))
        return
    if args.memory_child:
        _memory_child(args.memory_child, args.batch, args.seq, args.fixed_mmap_threshold)
        return
    result = {"device": DEVICE, "threads": torch.get_num_threads(), "batch": args.batch, "seq": args.seq,
              "rank": RANK, "stored_weight_vs_bf16": size_report()}
    if not args.skip_speed:
        tps = measure_speed(args.batch, args.seq, args.rounds)
        result["lora_step_tokens_per_s"] = {k: round(v, 1) for k, v in tps.items()}
        result["lora_speed_ratio_ours_vs_peft"] = round(tps["ours"] / tps["peft"], 3)
        print(json.dumps(result), flush=True)  # a partial result first: the memory runs take long on a busy CPU
    if DEVICE == "cpu" and os.path.exists("/proc/self/clear_refs"):
        for fixed, key in ((False, "glibc_default"), (True, "fixed_mmap_threshold_128k")):
            mem = {impl: measure_memory(impl, args.batch, args.seq, fixed) for impl in MEMORY_IMPLS}
            result[f"peak_mib_{key}"] = {k: round(v, 1) for k, v in mem.items()}
            result[f"ratios_{key}"] = {
                "qlora_vs_full": round(mem["qlora"] / mem["full"], 3),  # the target's ratio
                "qlora_vs_full+ckpt": round(mem["qlora"] / mem["full+ckpt"], 3),
                "qlora-no-ckpt_vs_full": round(mem["qlora-no-ckpt"] / mem["full"], 3),
            }
            print(json.dumps({key: result[f"ratios_{key}"]}), flush=True)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
