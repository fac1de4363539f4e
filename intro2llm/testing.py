"""Test helpers shared by the package tests, the lesson tests and the benchmarks.

``backends_for(device)`` lists the backends to exercise on this machine; ``assert_close_to_exact`` applies the
project's accuracy rule: a fast path's error against an fp64 "exact" result must be at most a small multiple
of the reference implementation's own error in the same dtype (plus a tiny floor), so tolerances follow the
dtype instead of being tuned per test.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from intro2llm.ops import _dispatch


def backends_for(device: str | torch.device = "cpu", implemented: Sequence[str] = _dispatch.BACKENDS) -> list[str]:
    """Backends in ``implemented`` that can run on ``device`` here (reference always included)."""
    device = torch.device(device)
    out = []
    for name in implemented:
        if _dispatch._why_not("test", name, device, implemented, None) is None:
            out.append(name)
    return out


def dtypes_for(backend: str, device: str | torch.device = "cpu") -> list[torch.dtype]:
    """The float dtypes to test ``backend`` with on ``device``: fp32, fp16, bf16 — without bf16 for Triton on CPU,
    whose interpreter computes bf16 arithmetic wrongly (bf16 Triton is tested on a GPU)."""
    if backend == "triton" and torch.device(device).type == "cpu":
        return [torch.float32, torch.float16]
    return [torch.float32, torch.float16, torch.bfloat16]


def randn_tensors(*shapes: Sequence[int], dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                  seed: int = 0) -> list[torch.Tensor]:
    """Standard-normal tensors of ``shapes``, drawn in order from one CPU generator seeded with ``seed`` (the same
    values on every device), then moved to ``device`` and ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g).to(device, dtype) for shape in shapes]


def output_and_grads(fn, inputs: Sequence[torch.Tensor], grad_out: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``fn(*inputs)`` on fresh leaf copies of ``inputs``, then backward with ``grad_out``: (output, the gradient of
    each input) — the tuple a parity test compares between a backend and the reference."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    y = fn(*leaves)
    y.backward(grad_out)
    return (y.detach(), *(t.grad for t in leaves))


def assert_compiled_matches(fn, reference, run, tol: float) -> None:  # noqa: ANN001 - callables
    """``torch.compile(fn, fullgraph=True)`` gives ``reference``'s outputs and gradients within ``tol``.

    ``run(f)`` calls ``f`` on the test's inputs, runs backward and returns the tensors to compare (output,
    gradients). The aot_eager backend traces the op's fake and autograd registrations without a C compiler."""
    got = run(torch.compile(fn, fullgraph=True, backend="aot_eager"))
    want = run(reference)
    assert len(got) == len(want), f"{len(got)} tensors compiled vs {len(want)} from the reference"
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=tol, rtol=tol)


def require_extension_if_asked() -> None:
    """Under INTRO2LLM_REQUIRE_EXT=1 (CI) a missing intro2llm._C is an error, never a skip."""
    import os

    if os.environ.get("INTRO2LLM_REQUIRE_EXT", "0") == "1" and _dispatch.extension_error() is not None:
        raise RuntimeError(f"INTRO2LLM_REQUIRE_EXT=1 but {_dispatch.extension_error()}")


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_to_exact(
    fast: torch.Tensor,
    ref: torch.Tensor,
    exact: torch.Tensor,
    *,
    factor: float = 4.0,
    floor: float | None = None,
    name: str = "output",
) -> None:
    """Assert ``|fast - exact| <= factor * |ref - exact| + floor`` (max norms).

    ``ref``: the reference op run in the same (low) dtype as ``fast``; ``exact``: the reference in fp64.
    ``floor`` defaults to a few ulps of the output dtype scaled by the magnitude of ``exact``.
    """
    assert fast.shape == exact.shape, f"{name}: shape {tuple(fast.shape)} != expected {tuple(exact.shape)}"
    if floor is None:
        eps = torch.finfo(fast.dtype).eps if fast.is_floating_point() else 0.0
        scale = exact.abs().max().item() if exact.numel() else 1.0
        floor = 8 * eps * max(scale, 1.0)
    err_fast, err_ref = max_err(fast, exact), max_err(ref, exact)
    assert err_fast <= factor * err_ref + floor, (
        f"{name}: fast-path error {err_fast:.3e} > {factor} x reference error {err_ref:.3e} + {floor:.1e}"
    )


_PEAK_SNIPPET = r"""
import re, sys
def _status(key):
    return int(re.search(key + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
{setup}
import gc; gc.collect()
before = _status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
{run}
print("PEAK_EXTRA_BYTES", _status("VmHWM") - before)
"""


def peak_extra_memory(setup: str, run: str, timeout: float = 600.0) -> int:
    """Peak resident memory (bytes) that ``run`` adds over the state after ``setup``, in a fresh process.

    Linux only: VmHWM after resetting it via /proc/self/clear_refs, minus VmRSS before ``run`` (``ru_maxrss``
    cannot be reset and is inherited across fork/exec). ``setup`` and ``run`` are Python source strings.
    """
    import subprocess
    import sys
    import textwrap

    code = _PEAK_SNIPPET.replace("{setup}", textwrap.dedent(setup)).replace("{run}", textwrap.dedent(run))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"memory measurement failed:\n{out.stderr[-2000:]}")
    return int(out.stdout.split("PEAK_EXTRA_BYTES")[-1].split()[0])


# Primitives for benchmarks that measure their own peak memory in a fresh process (they re-run their script
# with a "child" flag; the child prints one JSON line last).
def status_kb(field: str) -> int:
    """``field`` of /proc/self/status (``VmRSS``, ``VmHWM``, ...) in kB. Linux only."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> None:
    """Reset ``VmHWM`` to the current RSS (``5`` into /proc/self/clear_refs). Linux only."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_mib_since(before_kb: int) -> float:
    """``VmHWM`` minus ``before_kb`` (a ``VmRSS`` read before the measured work), in MiB."""
    return (status_kb("VmHWM") - before_kb) / 1024


def child_json_value(cmd: Sequence[str], key: str, cwd: str | None = None):
    """Run ``cmd`` (a fresh process) and return ``key`` of the JSON object on the last line it prints."""
    import json
    import subprocess

    out = subprocess.run(list(cmd), capture_output=True, text=True, check=True, cwd=cwd)
    return json.loads(out.stdout.strip().splitlines()[-1])[key]


_FUSED_VS_EAGER_CHILD = r"""
import json, sys, torch, intro2llm.ops as ops
kind, N, H, V = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def kb(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(field + ":"))
torch.manual_seed(0)
h = torch.randn(N, H).requires_grad_(); w = (torch.randn(V, H) * 0.02).requires_grad_(); t = torch.randint(0, V, (N,))
{step}
step(h[:8].detach().requires_grad_(), w[:32].detach().requires_grad_(), t[:8] % 32)  # warm-up
before = kb("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
step(h, w, t)
print(json.dumps({"peak_kb": kb("VmHWM") - before}))
"""


def assert_fused_peak_fraction_of_eager(step_src: str, N: int, H: int, V: int, fraction: float = 0.25) -> None:
    """Assert that a fused linear+loss op's peak extra memory is at most ``fraction`` of the eager version's.

    ``step_src`` defines ``step(h, w, t)`` (one forward + backward; ``kind`` is ``"fused"`` or ``"eager"``, and
    ``torch``/``ops`` are imported). Each kind runs in a fresh process (``OMP_NUM_THREADS=2``) on seeded
    (N, H) hidden states, (V, H) weights and N targets, after a small warm-up; the figure is ``VmHWM`` (reset via
    /proc/self/clear_refs) minus ``VmRSS`` before the step, in kB. Linux only.
    """
    import json
    import os
    import subprocess
    import sys

    code = _FUSED_VS_EAGER_CHILD.replace("{step}", step_src.strip("\n"))

    def peak(kind: str) -> int:
        out = subprocess.run([sys.executable, "-c", code, kind, str(N), str(H), str(V)], check=True,
                             capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="2"))
        return json.loads(out.stdout.strip().splitlines()[-1])["peak_kb"]

    fused, eager = peak("fused"), peak("eager")
    assert eager > N * V * 4 // 1024, f"eager peak {eager} kB is below one logits tensor: measurement broken"
    assert fused <= fraction * eager, f"fused peak {fused} kB > {fraction:.0%} of eager {eager} kB"


# Pieces of the end-to-end training benchmarks (bench_train, bench_lora): the same step, the same HF baseline.
def train_step_fn(loss_fn, opt: torch.optim.Optimizer, device: str | torch.device):
    """One optimizer step as a closure for a benchmark: ``loss_fn()``, backward, step, zero_grad (set to None), and
    a CUDA synchronize so a timer sees the work; returns the loss."""

    def step():
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        return loss

    return step


def hf_llama_like(model: torch.nn.Module):
    """A ``transformers.LlamaForCausalLM`` with the configuration and weights of our ``CausalLM`` (a benchmark
    baseline); RuntimeError if a weight name does not map."""
    import transformers

    from intro2llm.interop.hf import config_to_hf, hf_name

    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in config_to_hf(model.config).items() if k != "architectures"})
    hf = transformers.LlamaForCausalLM(hf_cfg)
    missing, unexpected = hf.load_state_dict({hf_name(k): v for k, v in model.state_dict().items()}, strict=False)
    if unexpected or [k for k in missing if "rotary" not in k]:
        raise RuntimeError(f"weight mapping failed: missing {missing}, unexpected {unexpected}")
    return hf


def seconds_alternating(steps: dict, rounds: int, warmup: bool = True) -> dict[str, list[float]]:
    """Wall seconds of every call of each ``steps[name]()``, the steps alternating round by round (on a noisy
    machine their ratio survives, absolute times do not); ``warmup`` calls each once before timing."""
    import time

    if warmup:
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    return times


def median_seconds_alternating(steps: dict, rounds: int, warmup: bool = True) -> dict[str, float]:
    """The median of ``seconds_alternating`` per step."""
    import statistics

    return {name: statistics.median(ts) for name, ts in seconds_alternating(steps, rounds, warmup).items()}


def best_seconds(fn, rounds: int = 3, warmup: bool = False) -> float:  # noqa: ANN001 - a callable
    """The fastest of ``rounds`` timed calls of ``fn()``."""
    return min(seconds_alternating({"fn": fn}, rounds, warmup)["fn"])


def benchmark_bandwidth(benchmark, run, moved_bytes: int, group: str, rounds: int = 5) -> None:
    """Time ``run()`` (which synchronizes on GPU) for a memory-bound op's pytest-benchmark: warm-up (and compile),
    on CUDA the peak memory of one call (``peak_MB``), then ``rounds`` timed calls; records ``bytes`` and ``GB/s``
    (from the fastest call) in ``extra_info``."""
    run()  # warm-up (and compile)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        benchmark.extra_info["peak_MB"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
    benchmark.group = group
    benchmark.extra_info["bytes"] = moved_bytes
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
    benchmark.extra_info["GB/s"] = round(moved_bytes / benchmark.stats.stats.min / 1e9, 2)


def bandwidth_run(fn, inputs: Sequence, grad_outputs=None, n_grad: int | None = None):  # noqa: ANN001, ANN201
    """The ``run()`` that ``benchmark_bandwidth`` times: ``fn(*inputs)`` without autograd when ``grad_outputs`` is
    None, else forward and backward (with ``grad_outputs``) through fresh leaf copies of the first ``n_grad`` inputs
    (default: all). Synchronizes CUDA, so that the time covers the kernels."""
    def sync() -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    if grad_outputs is None:
        def run() -> None:
            with torch.no_grad():
                fn(*inputs)
            sync()
        return run
    n = len(inputs) if n_grad is None else n_grad
    leaves, rest = [t.clone().requires_grad_() for t in inputs[:n]], inputs[n:]

    def run() -> None:
        for t in leaves:
            t.grad = None
        torch.autograd.backward(fn(*leaves, *rest), grad_outputs)
        sync()
    return run


def sandbox_available() -> bool:
    """Whether this machine can start the code-evaluation sandbox (Linux only; see ``evaluation/sandbox.py``)."""
    import sys

    from intro2llm.evaluation.sandbox import Sandbox, SandboxUnavailableError

    if not sys.platform.startswith("linux"):
        return False
    try:
        Sandbox().close()
        return True
    except SandboxUnavailableError:
        return False


def tiny_config(**overrides):  # noqa: ANN201 - a ModelConfig
    """A ``ModelConfig`` small enough for unit tests (V 53, width 32, FFN 64, 2 layers, 4 heads over 2 kv heads,
    64 positions), with ``overrides`` applied."""
    from intro2llm.model import ModelConfig

    base = dict(vocab_size=53, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64)
    return ModelConfig(**{**base, **overrides})


# ---- the toy RL setting of the PPO and GRPO lesson tests ----------------------------------------------------------
TOY_RL_PROMPTS = ["Q: 1+2=?\nA:", "Q: 12+30=?\nA:", "Q: 7+7=?\nA:", "Q: 45+5=?\nA:"]


def seven_first(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """Reward 1 for a completion that starts with '7' (rare for a random policy: about 1 in 22)."""
    return [float(c.startswith("7")) for c in completions]


def toy_policy(seed: int = 0, **overrides):  # noqa: ANN201 - (CausalLM, tokenizer)
    """(a 1-layer, width-32 ``CausalLM`` initialised from ``seed``, the synthetic-arithmetic tokenizer);
    ``overrides`` change the model config."""
    from intro2llm.data.prepare import synthetic_tokenizer
    from intro2llm.data.synthetic import pretrain_documents
    from intro2llm.model import CausalLM, ModelConfig

    tok = synthetic_tokenizer(list(pretrain_documents(200, seed=0)))
    torch.manual_seed(seed)
    base = dict(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=32, eos_token_id=tok.eos_token_id)
    return CausalLM(ModelConfig(**{**base, **overrides})), tok


def save_toy_checkpoint(directory, seed: int = 0, **overrides):  # noqa: ANN001, ANN201 - a path
    """``toy_policy(seed, **overrides)`` saved as a checkpoint directory (model + tokenizer.json) for CLI tests."""
    model, tok = toy_policy(seed, **overrides)
    tok.save(directory / "tokenizer.json")
    model.save_pretrained(directory)
    return directory


def first_token_prob(model: torch.nn.Module, tok, prompts: Sequence[str], char: str) -> float:  # noqa: ANN001
    """Mean probability of ``char`` as the first response token over ``prompts``."""
    with torch.no_grad():
        probs = [torch.softmax(model(torch.tensor([tok.encode(p)])).logits[0, -1], -1)[tok.encode(char)[0]]
                 for p in prompts]
    return torch.stack(probs).mean().item()


# ---- pytest hooks shared by the repository's conftest.py and a course workspace's (they import them by name) ----
def pytest_sessionstart(session) -> None:
    """Under INTRO2LLM_REQUIRE_EXT=1 (CI) a missing compiled extension fails the session instead of skipping."""
    require_extension_if_asked()


def pytest_collection_modifyitems(config, items) -> None:
    """Without CUDA, tests marked ``gpu`` skip and say why."""
    import pytest

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="gpu: needs a CUDA device, none is visible")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
