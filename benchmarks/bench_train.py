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

Data parallelism (issue 21): ``python benchmarks/bench_train.py --parallel [--presets tiny,small]`` runs the
``Trainer`` (our fused AdamW, fp32, global batch ``--batch`` x ``--seq``) as 1 process, DDP x 2 and FSDP x 2
(``torchrun --standalone``; the CPU threads are split so every configuration uses ``--threads`` cores in all) and
reports global tokens/s and, per rank, (a) the bytes of parameters + optimizer state this rank holds after the
steps (FSDP: the local shards; exact, from the tensors) and (b) the process's peak RSS growth (``VmHWM`` minus
``VmRSS`` before the model was built: also gradients, activations, FSDP's all-gather buffers, gloo's buffers).
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


# ----------------------------------------------------------------------------------------------- 1 process / DDP / FSDP
def _parallel_child(preset: str, strategy: str, batch: int, seq: int, steps: int) -> None:
    """Under torchrun (or alone): train ``steps`` + 1 warm-up steps with the Trainer; rank 0 prints the JSON line."""
    import time

    from intro2llm.configs import get_config
    from intro2llm.model.causal_lm import CausalLM
    from intro2llm.training.distributed import cleanup_distributed, gather_objects, init_distributed
    from intro2llm.training.trainer import Trainer, TrainerConfig

    class LMTrainer(Trainer):
        def compute_loss(self, b):  # noqa: ANN001, ANN202 - fused linear + CE, as PretrainTrainer
            return self.model(b["input_ids"], labels=b["labels"], return_logits=False).loss

    info = init_distributed("cpu")
    torch.randn(8).sum()
    before = status_kb("VmRSS")
    reset_peak_rss()
    cfg = get_config(preset)
    torch.manual_seed(0)
    model = CausalLM(cfg)
    local = batch // info.world_size
    g = torch.Generator().manual_seed(1 + info.rank)

    def data():
        while True:
            w = torch.randint(0, cfg.vocab_size, (local, seq + 1), generator=g)
            yield {"input_ids": w, "labels": w}

    tc = TrainerConfig(steps=steps + 1, batch_size=batch, lr=1e-4, warmup_steps=0, precision="fp32", progress=False,
                       tensorboard=False, wandb=False, device="cpu", strategy=strategy if info.enabled else "ddp")
    batches = data()
    trainer = LMTrainer(model, tc, batches)
    # train_step directly (not train()): no end-of-run consolidation or export inside the measured peak
    trainer.train_step(next(batches))  # warm-up: first-call dispatch, optimizer state allocation
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(next(batches))
    seconds = time.perf_counter() - t0

    def local_bytes(t: torch.Tensor) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    params = sum(local_bytes(p) for p in trainer.model.parameters())
    optim = sum(local_bytes(v) for st in trainer.optimizer.state.values() for v in st.values() if torch.is_tensor(v))
    per_rank = gather_objects({"param_optim_mib": (params + optim) / 2**20, "peak_rss_mib": peak_mib_since(before)})
    if info.is_main:
        print(json.dumps({"tokens_per_s": batch * seq * steps / seconds, "ranks": per_rank}))
    del trainer, model
    cleanup_distributed()


def measure_parallel(preset: str, strategy: str, world: int, batch: int, seq: int, steps: int, threads: int) -> dict:
    """One configuration in fresh processes: ``world`` ranks with ``threads // world`` threads each."""
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // world))}
    child = [__file__, "--parallel-child", preset, "--strategy", strategy, "--batch", str(batch), "--seq", str(seq),
             "--steps", str(steps)]
    if world == 1:
        cmd = [sys.executable, *child]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", *child]
    import subprocess

    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def parallel_main(args: argparse.Namespace) -> None:
    threads = args.threads or os.cpu_count() or 1
    results = {}
    for preset in args.presets.split(","):
        row = {}
        for name, strategy, world in (("1proc", "ddp", 1), ("ddp2", "ddp", 2), ("fsdp2", "fsdp", 2)):
            r = measure_parallel(preset, strategy, world, args.batch, args.seq, args.steps, threads)
            row[name] = {"tokens_per_s": round(r["tokens_per_s"], 1),
                         "param_optim_mib_per_rank": [round(x["param_optim_mib"], 2) for x in r["ranks"]],
                         "peak_rss_mib_per_rank": [round(x["peak_rss_mib"], 1) for x in r["ranks"]]}
            print(preset, name, json.dumps(row[name]), file=sys.stderr, flush=True)
        ddp, fsdp = row["ddp2"], row["fsdp2"]
        row["fsdp_vs_ddp_param_optim"] = round(max(fsdp["param_optim_mib_per_rank"])
                                               / max(ddp["param_optim_mib_per_rank"]), 3)
        row["fsdp_vs_ddp_peak_rss"] = round(max(fsdp["peak_rss_mib_per_rank"]) / max(ddp["peak_rss_mib_per_rank"]), 3)
        results[preset] = row
    print(json.dumps({"threads_total": threads, "batch": args.batch, "seq": args.seq, "steps": args.steps,
                      "results": results}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--seq", type=int, default=SEQ)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast on both sides")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--parallel", action="store_true", help="1 process vs DDP x 2 vs FSDP x 2 (tokens/s, memory/rank)")
    ap.add_argument("--presets", default="tiny,small", help="--parallel: model presets")
    ap.add_argument("--steps", type=int, default=4, help="--parallel: timed steps (after one warm-up step)")
    ap.add_argument("--strategy", default="ddp", help=argparse.SUPPRESS)
    ap.add_argument("--parallel-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.parallel_child:
        _parallel_child(args.parallel_child, args.strategy, args.batch, args.seq, args.steps)
        return
    if args.parallel:
        parallel_main(args)
        return
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
