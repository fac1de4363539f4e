"""Training-step benchmark: our tiny ``CausalLM`` + our ``AdamW`` vs ``transformers``' ``LlamaForCausalLM`` of the
same shape + ``torch.optim.AdamW`` — same batch, sequence length, fp32, CPU (or CUDA when present).

    pytest benchmarks/bench_train.py --benchmark-only --benchmark-columns=min,median   # pytest-benchmark
    python benchmarks/bench_train.py [--batch 8 --seq 128 --rounds 6]                 # ratios + peak memory

A step is forward with labels (the loss), backward, ``optimizer.step()``, ``zero_grad``. Ours uses the fused
linear + cross-entropy (no (B, T, V) logits), the ops' fast backends (C++ on CPU) and the fused C++ AdamW
(``build_optimizer``'s choice); Hugging Face uses its eager model with SDPA attention and ``torch.optim.AdamW``
defaults. Both have the same parameters (``intro2llm.interop`` maps the names) and identical initial weights.

Time: the two steps alternate within one process (``--rounds`` rounds after a warm-up), median per side, so the
ratio survives a noisy shared machine. Peak memory: each side runs in a fresh subprocess; after imports, ``VmRSS``
is read and ``VmHWM`` reset (``5`` into ``/proc/self/clear_refs``), then the model and optimizer are built and 3
steps run; the figure is ``VmHWM - VmRSS before`` (weights + grads + Adam state + activations + temporaries).
Linux only for memory (``/proc``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import pytest
import torch

from intro2llm import testing
from intro2llm.testing import child_json_value, peak_mib_since, reset_peak_rss, status_kb

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BATCH, SEQ = 8, 128


def build(impl: str, batch: int = BATCH, seq: int = SEQ, seed: int = 0, precision: str = "fp32"):
    """(model, optimizer, step_fn) for ``impl`` in {"ours", "hf"}; both start from the same weights.

    ``precision="bf16"``: both forwards run under ``torch.autocast(bf16)`` (fp32 master weights); ours computes
    the loss from the hidden states with the fused linear + cross-entropy in fp32, as ``PretrainTrainer`` does."""
    import contextlib

    from intro2llm import ops
    from intro2llm.configs import get_config
    from intro2llm.model.causal_lm import CausalLM

    cfg = get_config("tiny")
    torch.manual_seed(seed)
    ours = CausalLM(cfg).to(DEVICE)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g).to(DEVICE)
    if impl == "ours":
        from intro2llm.optimizer import AdamW
        from intro2llm.optimizer.adamw import fused_unavailable

        # fused (one C++ pass over p, g, m, v) where it applies, as build_optimizer sets it up for the trainer
        model, opt = ours, AdamW(ours.parameters(), lr=1e-4, fused=fused_unavailable(ours.parameters()) is None)

        def loss_fn():
            if precision == "fp32":
                return model(ids, labels=ids, return_logits=False).loss
            with torch.autocast(DEVICE, dtype=torch.bfloat16):
                h = model(ids, return_logits=False).hidden_states
            return ops.fused_linear_cross_entropy(h[:, :-1].float(), model.lm_head.weight, ids[:, 1:])
    elif impl == "hf":
        model = testing.hf_llama_like(ours).to(DEVICE)
        del ours
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def loss_fn():
            ctx = torch.autocast(DEVICE, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
            with ctx:
                return model(input_ids=ids, labels=ids).loss
    else:
        raise ValueError(f"unknown impl {impl!r}")
    model.train()
    return model, opt, testing.train_step_fn(loss_fn, opt, DEVICE)


# ----------------------------------------------------------------------------------------------- pytest-benchmark
@pytest.mark.parametrize("impl", ["ours", "hf"])
def test_train_step(benchmark, impl):
    pytest.importorskip("transformers", reason="transformers is the baseline of this benchmark")
    _, _, step = build(impl)
    step()
    benchmark.group = "train-step-tiny"
    benchmark.extra_info["tokens_per_step"] = BATCH * SEQ
    benchmark.pedantic(step, rounds=3, iterations=1)
    benchmark.extra_info["tokens/s"] = BATCH * SEQ / benchmark.stats.stats.median


# ----------------------------------------------------------------------------------------------- script
def _memory_child(impl: str, batch: int, seq: int, precision: str) -> None:
    import intro2llm.interop.hf  # noqa: F401 - import everything before the baseline
    import intro2llm.model.causal_lm  # noqa: F401
    import intro2llm.optimizer  # noqa: F401

    if impl == "hf":
        import transformers  # noqa: F401
    torch.randn(8).sum()  # initialise the allocator/threads
    before = status_kb("VmRSS")
    reset_peak_rss()
    _, _, step = build(impl, batch, seq, precision=precision)
    for _ in range(3):
        step()
    print(json.dumps({"impl": impl, "peak_mib": peak_mib_since(before)}))


def measure_memory(impl: str, batch: int, seq: int, precision: str = "fp32") -> float:
    return child_json_value([sys.executable, __file__, "--memory-child", impl, "--batch", str(batch), "--seq", str(seq),
                             "--precision", precision], "peak_mib")


def measure_speed(batch: int, seq: int, rounds: int, precision: str = "fp32") -> dict[str, float]:
    steps = {impl: build(impl, batch, seq, precision=precision)[2] for impl in ("ours", "hf")}
    seconds = testing.median_seconds_alternating(steps, rounds)  # after a warm-up (first-call dispatch, allocator)
    return {impl: batch * seq / s for impl, s in seconds.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--seq", type=int, default=SEQ)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast on both sides")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        _memory_child(args.memory_child, args.batch, args.seq, args.precision)
        return
    tps = measure_speed(args.batch, args.seq, args.rounds, args.precision)
    result = {"device": DEVICE, "threads": torch.get_num_threads(), "batch": args.batch, "seq": args.seq,
              "precision": args.precision,
              "tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
              "speed_ratio": round(tps["ours"] / tps["hf"], 3)}
    if DEVICE == "cpu" and os.path.exists("/proc/self/clear_refs"):
        mem = {impl: measure_memory(impl, args.batch, args.seq, args.precision) for impl in ("ours", "hf")}
        result["peak_mib"] = {k: round(v, 1) for k, v in mem.items()}
        result["memory_ratio"] = round(mem["ours"] / mem["hf"], 3)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
