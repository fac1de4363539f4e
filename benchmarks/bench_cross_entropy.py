"""Benchmarks for cross_entropy: forward, backward and forward+backward per backend, beside eager PyTorch.

``pytest benchmarks/bench_cross_entropy.py --benchmark-only``: groups ``cross_entropy-fwd``, ``-bwd``, ``-full``;
kinds = eager ``F.cross_entropy``, ``torch.compile`` of it (GPU), the reference, and every fast backend here.
``extra_info`` holds the bytes the fused kernels must move (fwd: read N·V; bwd: read N·V + write N·V) and GB/s.
On CPU the figures that count are ratios measured side by side: ``python benchmarks/bench_cross_entropy.py``
prints the issue's target (C++ vs reference, forward+backward, 8192 tokens × V=32000 fp32), interleaving the
contenders round by round so machine noise hits them alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

import intro2llm.ops as ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    SHAPES = [(2048, 32000)]
    DTYPES = [torch.float32]
else:
    SHAPES = [(8192, 32000), (4096, 128256)]
    DTYPES = [torch.bfloat16]  # keeps the GPU run inside gpu_check.sh's 120 s per benchmark file
FAST = [b for b in ops.available_backends() if b != "reference" and (b != "triton" or DEVICE == "cuda")]
KINDS = ["eager", "reference"] + (["compile"] if DEVICE == "cuda" else []) + FAST


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


_compiled = None


def _loss_fn(kind):
    global _compiled
    if kind == "eager":
        return lambda x, t: F.cross_entropy(x.float(), t)
    if kind == "compile":
        if _compiled is None:
            _compiled = torch.compile(lambda x, t: F.cross_entropy(x.float(), t))
        return _compiled
    return lambda x, t: ops.cross_entropy(x, t, backend=kind)


def _inputs(N, V, dtype, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, V, generator=g).to(DEVICE, dtype).requires_grad_(requires_grad)
    t = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    return x, t


def _case(kind, shape, dtype, requires_grad=False):
    """(logits, targets, loss function) of one benchmark case."""
    return *_inputs(*shape, dtype, requires_grad), _loss_fn(kind)


CASES = [(k, s, d) for k in KINDS for s in SHAPES for d in DTYPES]
IDS = [f"{k}-{s[0]}x{s[1]}-{str(d)[6:]}" for k, s, d in CASES]


def _bench(benchmark, group, nbytes, run, setup=None):
    """5 timed rounds of ``run`` in group ``cross_entropy-<group>``; on GPU the GB/s of moving ``nbytes``."""
    benchmark.group = f"cross_entropy-{group}"  # before the run: pytest-benchmark reads it then
    benchmark.extra_info["bytes"] = nbytes
    benchmark.pedantic(run, setup=setup, rounds=5, warmup_rounds=1)
    if DEVICE == "cuda" and benchmark.stats is not None:
        benchmark.extra_info["GB/s"] = round(nbytes / benchmark.stats.stats.min / 1e9, 1)


@pytest.mark.parametrize("kind,shape,dtype", CASES, ids=IDS)
def test_fwd(benchmark, kind, shape, dtype):
    x, t, fn = _case(kind, shape, dtype)

    def run():
        with torch.no_grad():
            fn(x, t)
        _sync()

    _bench(benchmark, "fwd", x.numel() * x.element_size(), run)


@pytest.mark.parametrize("kind,shape,dtype", CASES, ids=IDS)
def test_bwd(benchmark, kind, shape, dtype):
    x, t, fn = _case(kind, shape, dtype, requires_grad=True)

    def setup():
        x.grad = None
        return (fn(x, t),), {}

    def run(loss):
        loss.backward()
        _sync()

    _bench(benchmark, "bwd", 2 * x.numel() * x.element_size(), run, setup)


@pytest.mark.parametrize("kind,shape,dtype", CASES, ids=IDS)
def test_full(benchmark, kind, shape, dtype):
    x, t, fn = _case(kind, shape, dtype, requires_grad=True)

    def run():
        x.grad = None
        fn(x, t).backward()
        _sync()

    _bench(benchmark, "full", 3 * x.numel() * x.element_size(), run)


def side_by_side(N: int, V: int, rounds: int, kinds: list[str]) -> dict[str, float]:
    """Median seconds of forward+backward per kind, the kinds interleaved within each round."""
    x, t = _inputs(N, V, torch.float32, requires_grad=True)
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(rounds + 1):  # round 0 warms up
        for k in kinds:
            x.grad = None
            start = time.perf_counter()
            _loss_fn(k)(x, t).backward()
            _sync()
            if r:
                times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="cross_entropy forward+backward, side by side")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    kinds = ["reference", "eager"] + FAST
    med = side_by_side(args.tokens, args.vocab, args.rounds, kinds)
    print(f"cross_entropy fwd+bwd, {args.tokens} x {args.vocab} fp32 on {DEVICE}, median of {args.rounds}")
    for k, s in med.items():
        print(f"  {k:<10} {s * 1e3:9.1f} ms   reference/this = {med['reference'] / s:5.2f}x")
