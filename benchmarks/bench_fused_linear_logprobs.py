"""Benchmarks for fused_linear_logprobs: time (fwd+bwd) and peak memory vs eager linear + log_softmax + gather.

    pytest benchmarks/bench_fused_linear_logprobs.py --benchmark-only     # group fused_linear_logprobs-full
    python benchmarks/bench_fused_linear_logprobs.py [--tokens 1024 --hidden 256 --vocab 32000]   # time + memory table

The upstream gradient differs per token (as in DPO, where each sequence gets its own sigmoid weight), so the fused
backward recomputes each chunk's logits: 4 GEMMs of N·H·V multiply-adds against eager's 3. Eager = what TRL's
``selective_log_softmax`` path does on full logits: ``linear`` -> fp32 ``log_softmax`` -> ``gather``.
Peak memory: each side in a fresh subprocess, ``VmHWM`` reset after a warm-up (``5`` > ``/proc/self/clear_refs``),
figure = ``VmHWM - VmRSS before`` (weight and hidden gradients count on both sides). Linux only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import pytest
import torch

import intro2llm.ops as ops
from intro2llm.testing import child_json_value, peak_mib_since, reset_peak_rss, status_kb

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(N: int, H: int, V: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=g).to(DEVICE, dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * 0.02).to(DEVICE, dtype).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    targets[: N // 4] = -100  # a prompt share that is not scored
    up = torch.linspace(-1, 1, N, device=DEVICE)  # per-token upstream gradient
    return hidden, weight, targets, up


def step(kind: str, hidden, weight, targets, up) -> None:
    hidden.grad = weight.grad = None
    if kind == "eager":
        logits = torch.nn.functional.linear(hidden, weight).float()
        lp = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[:, None])[:, 0] * (targets != -100)
    else:
        lp = ops.fused_linear_logprobs(hidden, weight, targets, backend=kind)
    (lp * up).sum().backward()
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _child(kind: str, N: int, H: int, V: int) -> None:
    h, w, t, up = _inputs(N, H, V)
    small = [x[:16].detach().requires_grad_() if x.is_floating_point() and x.dim() == 2 else x[:16] for x in (h,)]
    step(kind, small[0], w[:64].detach().requires_grad_(), t[:16] % 64, up[:16])  # warm-up outside the figure
    before = status_kb("VmRSS")
    reset_peak_rss()
    step(kind, h, w, t, up)
    print(json.dumps({"peak_mb": peak_mib_since(before)}))


def peak_mb(kind: str, N: int, H: int, V: int) -> float:
    return child_json_value([sys.executable, os.path.abspath(__file__), "--child", kind, str(N), str(H), str(V)],
                            "peak_mb")


SHAPES = [(1024, 256, 32000)] if DEVICE == "cpu" else [(8192, 2048, 32000), (8192, 4096, 128256)]
KINDS = ["eager"] + [b for b in ops.available_backends() if b != "reference" and (b != "triton" or DEVICE == "cuda")]


@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
@pytest.mark.parametrize("kind", KINDS)
def test_fllp_full(benchmark, kind, shape):
    N, H, V = shape
    args = _inputs(N, H, V, torch.float32 if DEVICE == "cpu" else torch.bfloat16)
    benchmark.group = "fused_linear_logprobs-full"
    benchmark.extra_info["flops"] = (8 if kind != "eager" else 6) * N * H * V
    benchmark.pedantic(lambda: step(kind, *args), rounds=3, warmup_rounds=1)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--backend", default="cpp")
    p.add_argument("--child", nargs=4, metavar=("KIND", "N", "H", "V"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        _child(a.child[0], *map(int, a.child[1:]))
        sys.exit(0)
    N, H, V = a.tokens, a.hidden, a.vocab
    args = _inputs(N, H, V)
    times = {"eager": [], a.backend: []}
    for kind in times:
        step(kind, *args)
    for _ in range(a.rounds):  # alternate: the ratio survives a noisy machine
        for kind in times:
            t0 = time.perf_counter()
            step(kind, *args)
            times[kind].append(time.perf_counter() - t0)
    res = {"N": N, "H": H, "V": V, "threads": torch.get_num_threads()}
    for kind, ts in times.items():
        res[f"{kind}_ms"] = round(sorted(ts)[len(ts) // 2] * 1e3, 1)
    res["speedup"] = round(res["eager_ms"] / res[f"{a.backend}_ms"], 2)
    if sys.platform.startswith("linux"):
        mem = {k: peak_mb(k, N, H, V) for k in times}
        res.update({f"{k}_peak_mb": round(v, 1) for k, v in mem.items()})
        res["memory_ratio"] = round(mem[a.backend] / mem["eager"], 3)
    print(json.dumps(res))
