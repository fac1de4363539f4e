"""Benchmarks for flash_attention: forward and forward+backward per backend, beside eager attention (materialized
(T, T) scores: ``flash_attention_reference``) and torch's ``scaled_dot_product_attention`` (SDPA).

``pytest benchmarks/bench_attention.py --benchmark-only``: groups ``attention-fwd`` and ``attention-full``
(forward+backward), parametrized over kind × T (causal, B=1, H=8, D=64 on CPU; B=2, H=16, D=128 bf16 on GPU),
plus ``attention-window`` (window 512 vs full causal at the longest T). ``extra_info`` holds FLOPs
(forward 4·B·H·Tq·Tk·D, halved for causal; forward+backward 3.5× that) and TFLOP/s.

``python benchmarks/bench_attention.py`` prints the issue's CPU targets side by side (the contenders interleaved
round by round so machine noise hits them alike): C++ forward at B=1, H=8, T=4096, D=64 fp32 causal against
SDPA and eager, window 512 against full causal, and peak extra memory of each, measured in a fresh process
(``VmHWM`` after writing ``5`` to ``/proc/self/clear_refs``, minus ``VmRSS`` before the call; a tiny warm-up
call first so that library initialization is not counted). ``--decode``: one cached decoding step for
MHA/GQA/MQA; ``--gqa-table``: MHA vs GQA vs MQA trained on the tiny preset (lesson 15's table).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import intro2llm.ops as ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    B, H, D, DTYPE = 1, 8, 64, torch.float32
    TS = [512, 1024, 2048]
    FAST = [b for b in ops.available_backends() if b == "cpp"]
else:
    B, H, D, DTYPE = 2, 16, 128, torch.bfloat16
    TS = [512, 1024, 2048, 4096]
    FAST = [b for b in ops.available_backends() if b in ("triton", "cuda")]
KINDS = ["eager", "sdpa"] + FAST


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _attn(kind: str, window: int | None = None):
    if kind == "eager":
        return lambda q, k, v: ops.flash_attention_reference(q, k, v, causal=True, window=window)
    if kind == "sdpa":
        if window is not None:
            raise ValueError("sdpa has no sliding window without a materialized mask")
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return lambda q, k, v: ops.flash_attention(q, k, v, causal=True, window=window, backend=kind)


def _inputs(T: int, requires_grad: bool = False, b: int = B, h: int = H, d: int = D, dtype=DTYPE):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, T, d, generator=g).to(DEVICE, dtype).requires_grad_(requires_grad) for _ in "qkv")
    return q, k, v


def flops(T: int, causal: bool = True, backward: bool = False, b: int = B, h: int = H, d: int = D) -> float:
    f = 4.0 * b * h * T * T * d / (2 if causal else 1)
    return f * 3.5 if backward else f


def _record(benchmark, group: str, nflops: float) -> None:
    benchmark.group = f"attention-{group}"
    benchmark.extra_info["flops"] = nflops
    if benchmark.stats is not None:
        benchmark.extra_info["TFLOP/s"] = round(nflops / benchmark.stats.stats.min / 1e12, 3)


CASES = [(k, T) for k in KINDS for T in TS]
IDS = [f"{k}-T{T}" for k, T in CASES]


@pytest.mark.parametrize("kind,T", CASES, ids=IDS)
def test_fwd(benchmark, kind, T):
    q, k, v = _inputs(T)
    fn = _attn(kind)

    def run():
        with torch.no_grad():
            fn(q, k, v)
        _sync()

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    _record(benchmark, "fwd", flops(T))


@pytest.mark.parametrize("kind,T", CASES, ids=IDS)
def test_full(benchmark, kind, T):
    q, k, v = _inputs(T, requires_grad=True)
    fn = _attn(kind)
    do = torch.randn_like(q)

    def run():
        q.grad = k.grad = v.grad = None
        fn(q, k, v).backward(do)
        _sync()

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    _record(benchmark, "full", flops(T, backward=True))


@pytest.mark.parametrize("window", [None, 512], ids=["causal", "window512"])
@pytest.mark.parametrize("kind", FAST)
def test_window(benchmark, kind, window):
    T = 4096
    q, k, v = _inputs(T)
    fn = _attn(kind, window)

    def run():
        with torch.no_grad():
            fn(q, k, v)
        _sync()

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    # useful FLOPs: each query sees min(i + 1, window) keys
    seen = sum(min(i + 1, window or T) for i in range(T))
    _record(benchmark, "window", 4.0 * B * H * seen * D)


# ---------------------------------------------------------------------------------------------------------------
# Side-by-side CPU targets and peak memory
# ---------------------------------------------------------------------------------------------------------------
_MEM_CHILD = r"""
import sys, torch
import intro2llm.ops as ops
sys.path.insert(0, {bench_dir!r})
from bench_attention import _attn

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])

kind, T, window = sys.argv[1], int(sys.argv[2]), (int(sys.argv[3]) or None)
fn = _attn(kind, window)
with torch.no_grad():
    fn(*(torch.randn(1, 8, 64, 64) for _ in "qkv"))  # warm-up: library initialization is not counted
    q, k, v = (torch.randn(1, 8, T, 64) for _ in "qkv")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS:")
    out = fn(q, k, v)
    print(status("VmHWM:") - before)
"""


def peak_extra_mib(kind: str, T: int = 4096, window: int | None = None) -> float:
    """Peak extra resident memory (MiB) of one forward call, measured in a fresh process."""
    code = _MEM_CHILD.format(bench_dir=os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run(
        [sys.executable, "-c", code, kind, str(T), str(window or 0)], capture_output=True, text=True, check=True
    )
    return int(res.stdout.strip().splitlines()[-1]) / 1024


def side_by_side(T: int, rounds: int, kinds: dict[str, object]) -> dict[str, float]:
    """Median seconds of one forward per named callable, interleaved within each round (round 0 warms up)."""
    q, k, v = _inputs(T, b=1, h=8, d=64, dtype=torch.float32)
    times: dict[str, list[float]] = {n: [] for n in kinds}
    with torch.no_grad():
        for r in range(rounds + 1):
            for name, fn in kinds.items():
                start = time.perf_counter()
                fn(q, k, v)
                _sync()
                if r:
                    times[name].append(time.perf_counter() - start)
    return {n: statistics.median(t) for n, t in times.items()}


def gqa_table(
    steps: int = 150, layers: int = 2, seq: int = 128, batch: int = 8, seed: int = 0, verbose: bool = False
) -> list[dict]:
    """MHA vs GQA vs MQA on the ``tiny`` preset (vocab 256: raw bytes; ``layers`` layers to fit a CPU budget):
    the same seeded training run per num_key_value_heads, then held-out loss, training speed, cached decoding
    speed and KV-cache bytes per token. Data: Python's standard library source as bytes (no download)."""
    import glob
    import sysconfig

    from intro2llm.configs import get_config
    from intro2llm.model.causal_lm import CausalLM

    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    data = torch.tensor(list(b"".join(open(f, "rb").read() for f in files[:60])), dtype=torch.long)
    train, val = data[: int(0.9 * len(data))], data[int(0.9 * len(data)) :]
    steps = max(steps, 4)  # the first 3 steps are not timed
    rows = []
    for hkv in (8, 4, 2, 1):
        torch.manual_seed(seed)
        cfg = get_config("tiny", vocab_size=256, num_hidden_layers=layers, num_key_value_heads=hkv)
        model = CausalLM(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        g = torch.Generator().manual_seed(seed)
        start = time.perf_counter()
        for step in range(steps):
            if step == 3:  # the first steps pay one-time costs (allocator, kernels' first calls)
                start = time.perf_counter()
            ix = torch.randint(0, len(train) - seq - 1, (batch,), generator=g)
            x = torch.stack([train[i : i + seq] for i in ix])
            loss = model(x, labels=x).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        train_s = time.perf_counter() - start  # steps - 3 timed steps
        model.eval()
        with torch.no_grad():
            gv = torch.Generator().manual_seed(seed + 1)
            ix = torch.randint(0, len(val) - seq - 1, (32,), generator=gv)
            xv = torch.stack([val[i : i + seq] for i in ix])
            val_loss = model(xv, labels=xv).loss.item()
            prompt = xv[:4, :16]
            model.generate(prompt, max_new_tokens=4)  # warm-up
            t0 = time.perf_counter()
            model.generate(prompt, max_new_tokens=64)
            decode_s = time.perf_counter() - t0
        rows.append({
            "num_key_value_heads": hkv,
            "kind": {8: "MHA", 1: "MQA"}.get(hkv, "GQA"),
            "params": sum(p.numel() for p in model.parameters()),
            "kv_bytes_per_token_fp32": 2 * layers * hkv * cfg.head_dim * 4,
            "val_loss": round(val_loss, 3),
            "train_tokens_per_s": round((steps - 3) * batch * seq / train_s),
            "decode_tokens_per_s": round(4 * 64 / decode_s),
        })  # fmt: skip
        if verbose:
            print(json.dumps(rows[-1]), flush=True)
    return rows


def decode_step_table(tk: int = 4096, rounds: int = 7) -> dict[int, float]:
    """Milliseconds (min thread time, contenders interleaved) of one cached decoding attention step: one query
    against Tk cached keys, Llama-3-8B head shape (H=32, D=128), fp32, MHA (32 kv heads) / GQA-8 / MQA."""
    q = torch.randn(1, 32, 1, 128)
    kv = {h: (torch.randn(1, h, tk, 128), torch.randn(1, h, tk, 128)) for h in (32, 8, 1)}
    best = {h: float("inf") for h in kv}
    with torch.no_grad():
        for _ in range(rounds):
            for h, (k, v) in kv.items():
                start = time.thread_time()
                ops.flash_attention(q, k, v)
                best[h] = min(best[h], time.thread_time() - start)
    return {h: round(t * 1e3, 2) for h, t in best.items()}


def main() -> None:
    p = argparse.ArgumentParser(description="flash_attention CPU targets, side by side")
    p.add_argument("--T", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: default)")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--gqa-table", action="store_true", help="MHA/GQA/MQA quality and speed on the tiny model")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--decode", action="store_true", help="one cached decoding step, MHA vs GQA vs MQA")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.decode:
        print(json.dumps({"decode_step_ms_by_kv_heads": decode_step_table(args.T), "threads": torch.get_num_threads()}))
        return
    if args.gqa_table:
        gqa_table(args.steps, verbose=True)
        return
    kinds = {"sdpa": _attn("sdpa"), "cpp": _attn("cpp"), "cpp_window512": _attn("cpp", 512)}
    med = side_by_side(args.T, args.rounds, kinds)
    eager = side_by_side(args.T, max(1, args.rounds // 3), {"eager": _attn("eager")})
    med.update(eager)
    report = {
        "shape": f"B=1 H=8 T={args.T} D=64 fp32 causal, {torch.get_num_threads()} threads, median of {args.rounds}",
        "ms": {n: round(s * 1e3, 1) for n, s in med.items()},
        "cpp_vs_sdpa_speed": round(med["sdpa"] / med["cpp"], 2),
        "cpp_vs_eager_speed": round(med["eager"] / med["cpp"], 2),
        "window512_vs_causal_speed": round(med["cpp"] / med["cpp_window512"], 2),
    }
    if not args.no_memory and os.path.exists("/proc/self/clear_refs"):
        mem = {n: round(peak_extra_mib(n, args.T), 1) for n in ("sdpa", "cpp", "eager")}
        report["peak_extra_mib"] = mem
        report["cpp_vs_sdpa_memory"] = round(mem["cpp"] / mem["sdpa"], 2)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
