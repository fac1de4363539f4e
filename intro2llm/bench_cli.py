"""``intro2llm bench``: every op's fast backends against its eager PyTorch reference, on this machine.

    intro2llm bench                          # all ops, forward and forward+backward; writes runs/bench/
    intro2llm bench --ops rms_norm,swiglu --out /tmp/b
    intro2llm bench --quick                  # tiny shapes, few repeats: a smoke run (seconds)

For each op the backends it has (``<module>.OP.backends``) that can run here (``Op.resolve`` says why one cannot:
no GPU, no ``intro2llm._C``, ...) are timed against the op's ``<op>_reference`` — the eager PyTorch code of the
lesson — on the same inputs, alternating calls so that both see the same machine load (figures on a shared CPU
are ratios, never absolute times). Each row prints ``speedup = eager time / backend time`` (> 1: faster than
eager); ``bench.json`` holds every timing and ``bench.png`` is a bar chart of the speedups (matplotlib).

This is a built-in quick comparison and works from an installed package. The full pytest-benchmark suites
(``benchmarks/bench_<op>.py``: several shapes and dtypes, bandwidth, ``torch.compile``, peak memory) live in the
source checkout only; run them with ``pytest benchmarks/bench_<op>.py --benchmark-only``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

_MIN_SAMPLE_S = 0.002  # one timed sample repeats a fast call until it lasts about this long (timer resolution)
OPS = ("rms_norm", "layer_norm", "apply_rope", "swiglu", "geglu", "cross_entropy", "fused_linear_cross_entropy",
       "fused_linear_logprobs", "flash_attention", "nf4_matmul")


def register(subparsers) -> None:
    """Add the ``bench`` command."""
    p = subparsers.add_parser("bench", help="time each op's fast backends against eager PyTorch; ratios + PNG chart",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench", help="directory for bench.json and bench.png (default runs/bench)")
    p.add_argument("--ops", default="all", help=f"comma-separated subset of: {', '.join(OPS)}")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda when available")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per backend (default 10, --quick 3)")
    p.add_argument("--quick", action="store_true", help="tiny shapes and 3 repeats: checks that everything runs")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG chart (no matplotlib needed)")
    p.set_defaults(func=run)


def _fail(msg: str) -> int:
    print(f"intro2llm bench: error: {msg}", file=sys.stderr)
    return 2


# ---------------------------------------------------------------------------------------------------------------
# Cases: op -> (OP declaration, inputs, eager reference, fast call, differentiable inputs)
# ---------------------------------------------------------------------------------------------------------------
def _case(name: str, device, dtype, quick: bool) -> dict[str, Any]:
    """The inputs and the two callables (``eager(*inputs)``, ``fast(*inputs, backend)``) of one op."""
    import importlib

    import torch

    import intro2llm.ops as ops

    def declared(module: str):  # the module, not the op function of the same name that intro2llm.ops exports
        return importlib.import_module(f"intro2llm.ops.{module}")

    ce_mod, fa_mod, ln_mod, nf4_mod, rms_mod, rope_mod, glu_mod = map(declared, (
        "cross_entropy", "flash_attention", "layer_norm", "nf4", "rms_norm", "rope", "swiglu"))
    flce_mod, fllp_mod = declared("fused_linear_cross_entropy"), declared("fused_linear_logprobs")

    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    N, D = (64, 128) if quick else (4096, 2048)
    B, H, T, Dh = (1, 2, 32, 64) if quick else (2, 8, 512, 64)
    V = 512 if quick else 16384
    if name == "rms_norm":
        x, w = rand(N, D), rand(D) + 1
        return dict(op=rms_mod.OP, inputs=(x, w), grad=(0, 1), shape=f"{N}x{D}",
                    eager=ops.rms_norm_reference, fast=lambda x, w, b: ops.rms_norm(x, w, backend=b))
    if name == "layer_norm":
        x, w, bias = rand(N, D), rand(D) + 1, rand(D)
        return dict(op=ln_mod.OP, inputs=(x, w, bias), grad=(0, 1, 2), shape=f"{N}x{D}",
                    eager=ops.layer_norm_reference, fast=lambda x, w, c, b: ops.layer_norm(x, w, c, backend=b))
    if name == "apply_rope":
        q, k = rand(B, H, T, Dh), rand(B, H // 2, T, Dh)
        ang = torch.arange(T)[:, None] * (10000.0 ** (-torch.arange(0, Dh, 2) / Dh))[None, :]
        ang = torch.cat([ang, ang], -1)
        cos, sin = ang.cos().to(device, dtype), ang.sin().to(device, dtype)
        return dict(op=rope_mod.OP, inputs=(q, k, cos, sin), grad=(0, 1), shape=f"q {B}x{H}x{T}x{Dh}",
                    eager=ops.apply_rope_reference, fast=lambda q, k, c, s, b: ops.apply_rope(q, k, c, s, backend=b))
    if name in ("swiglu", "geglu"):
        gate, up = rand(N, 2 * D), rand(N, 2 * D)
        mod_op = glu_mod.SWIGLU if name == "swiglu" else glu_mod.GEGLU
        fn = getattr(ops, name)
        return dict(op=mod_op, inputs=(gate, up), grad=(0, 1), shape=f"{N}x{2 * D}",
                    eager=getattr(ops, f"{name}_reference"), fast=lambda a, c, b: fn(a, c, backend=b))
    if name == "cross_entropy":
        logits = rand(N // 4, V)
        tgt = torch.randint(0, V, (N // 4,), generator=g).to(device)
        return dict(op=ce_mod.OP, inputs=(logits, tgt), grad=(0,), shape=f"{N // 4}x{V}",
                    eager=ops.cross_entropy_reference, fast=lambda x, t, b: ops.cross_entropy(x, t, backend=b))
    if name in ("fused_linear_cross_entropy", "fused_linear_logprobs"):
        hid, w = rand(N // 4, D // 2), rand(V, D // 2, scale=0.05)
        tgt = torch.randint(0, V, (N // 4,), generator=g).to(device)
        fn = getattr(ops, name)
        mod = flce_mod if name == "fused_linear_cross_entropy" else fllp_mod
        return dict(op=mod.OP, inputs=(hid, w, tgt), grad=(0, 1), shape=f"{N // 4}x{D // 2} @ {V}",
                    eager=getattr(ops, f"{name}_reference"), fast=lambda h, w, t, b: fn(h, w, t, backend=b))
    if name == "flash_attention":
        q, k, v = rand(B, H, T, Dh), rand(B, H // 2, T, Dh), rand(B, H // 2, T, Dh)
        return dict(op=fa_mod.OP, inputs=(q, k, v), grad=(0, 1, 2), shape=f"{B}x{H}x{T}x{Dh} causal",
                    eager=ops.flash_attention_reference,
                    fast=lambda q, k, v, b: ops.flash_attention(q, k, v, causal=True, backend=b))
    if name == "nf4_matmul":
        M, K, Nout = (4, 256, 256) if quick else (16, 4096, 4096)
        x = rand(M, K)
        qw = ops.nf4_quantize(torch.randn(Nout, K, generator=g) * 0.02).to(device)
        return dict(op=nf4_mod.OP, inputs=(x, qw), grad=(0,), shape=f"{M}x{K} @ nf4 {Nout}x{K}",
                    eager=ops.nf4_matmul_reference, fast=lambda x, q, b: ops.nf4_matmul(x, q, backend=b))
    raise ValueError(f"unknown op {name!r}")


def _time(fn, sync, calls: int = 1) -> float:
    """Seconds per call of ``fn`` over ``calls`` back-to-back calls."""
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - t0) / calls


def _runner(case: dict[str, Any], backend: str | None, mode: str):
    """A no-argument callable: one forward (``fwd``) or forward + backward (``full``) of eager or a backend."""
    import torch

    inputs = list(case["inputs"])
    if mode == "full":
        for i in case["grad"]:
            inputs[i] = inputs[i].detach().clone().requires_grad_(True)
    call = case["eager"] if backend is None else (lambda *a: case["fast"](*a, backend))

    def run():
        if mode == "fwd":
            with torch.no_grad():
                call(*inputs)
            return
        out = call(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward([o.float().sum() for o in outs])
        for i in case["grad"]:
            inputs[i].grad = None

    return run


def bench_op(name: str, device, dtype, quick: bool, repeats: int) -> tuple[list[dict], list[str]]:
    """Rows ``{op, mode, shape, dtype, backend, eager_ms, backend_ms, speedup}`` and notes on skipped backends."""
    import torch

    case = _case(name, device, dtype, quick)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    backends, notes = [], []
    for b in case["op"].backends:
        if b == "reference":
            continue
        if b == "triton" and device.type == "cpu":
            notes.append(f"{name}: triton skipped (on CPU tensors Triton runs in its interpreter, a correctness "
                         "tool: not timed)")
            continue
        try:
            case["op"].resolve(device, b, dtype=dtype)
        except Exception as exc:  # noqa: BLE001 - BackendUnavailableError / dtype TypeError: report and go on
            notes.append(f"{name}: {b} skipped ({str(exc).split(': ', 2)[-1]})")
            continue
        backends.append(b)
    rows = []
    for mode in ("fwd", "full"):
        impls: dict[str | None, Any] = {None: _runner(case, None, mode)}
        impls.update({b: _runner(case, b, mode) for b in backends})
        times: dict[str | None, list[float]] = {k: [] for k in impls}
        calls = {}
        for key, fn in impls.items():  # warm-up (compilation, caches, lazy tables), then calls per sample
            fn()
            calls[key] = max(1, min(100, int(_MIN_SAMPLE_S / max(_time(fn, sync), 1e-6))))
        for _ in range(repeats):
            for key, fn in impls.items():  # alternating: every implementation sees the same load
                times[key].append(_time(fn, sync, calls[key]))
        eager = min(times[None])  # interference only ever adds time: the minimum is the robust statistic
        for b in backends:
            t = min(times[b])
            rows.append(dict(op=name, mode=mode, shape=case["shape"], dtype=str(dtype).replace("torch.", ""),
                             device=device.type, backend=b, eager_ms=eager * 1e3, backend_ms=t * 1e3,
                             speedup=eager / t))
    return rows, notes


def _group_notes(notes: list[str]) -> list[str]:
    """"op: backend skipped (reason)" lines -> one line per (backend, reason) listing the ops."""
    groups: dict[tuple[str, str], list[str]] = {}
    for note in notes:
        op, rest = note.split(": ", 1)
        backend, reason = rest.split(" skipped ", 1)
        groups.setdefault((backend, reason), []).append(op)
    return [f"{backend} skipped {reason}: {', '.join(ops)}" for (backend, reason), ops in groups.items()]


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Horizontal bars of the speedups, one per (op, mode, backend), with the eager line at 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['op']} {r['mode']} [{r['backend']}]" for r in rows]
    values = [r["speedup"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.5))
    colors = {"cpp": "tab:blue", "cuda": "tab:green", "triton": "tab:orange"}
    # Bars grow from 1 (= eager) on a log axis: 2x faster and 2x slower are the same length, on either side.
    ax.barh(range(len(rows)), [v - 1.0 for v in values], left=1.0,
            color=[colors.get(r["backend"], "tab:gray") for r in rows])
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=1, linestyle="--", label="eager PyTorch reference")
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.2f}x ", va="center", ha="left" if v >= 1 else "right",
                fontsize=8)
    lo, hi = min(values + [1.0]), max(values + [1.0])
    ax.set_xlim(lo / 3, hi * 3)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("speedup over eager, log scale (eager time / backend time; > 1 is faster)")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def run(args: argparse.Namespace) -> int:
    """Handler of ``intro2llm bench``; returns the exit code."""
    names = list(OPS) if args.ops == "all" else [n.strip() for n in args.ops.split(",") if n.strip()]
    unknown = [n for n in names if n not in OPS]
    if unknown or not names:
        return _fail(f"--ops: unknown op(s) {unknown}; available: {', '.join(OPS)}")
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 10)
    if repeats < 1:
        return _fail(f"--repeats must be >= 1, got {repeats}")
    if not args.no_plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return _fail("the chart needs matplotlib, which is not installed: pip install matplotlib "
                         "(or pip install 'intro2llm[bench]'), or pass --no-plot")
    import torch
    from tqdm.auto import tqdm

    from intro2llm._io import atomic_write

    if args.device == "cuda" and not torch.cuda.is_available():
        return _fail("--device cuda: no CUDA device is visible (use --device cpu)")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          (args.device if args.device != "auto" else "cpu"))
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    out = Path(args.out)
    rows, notes = [], []
    for name in tqdm(names, desc="bench", unit="op", file=sys.stderr):
        r, n = bench_op(name, device, dtype, args.quick, repeats)
        rows += r
        notes += n
    for note in _group_notes(notes):
        print(note, file=sys.stderr)
    threads = torch.get_num_threads()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {threads} threads"
    print(f"{'op':28} {'mode':4} {'backend':7} {'shape':26} {'eager ms':>9} {'ms':>9} {'speedup':>8}")
    for r in rows:
        print(f"{r['op']:28} {r['mode']:4} {r['backend']:7} {r['shape']:26} {r['eager_ms']:9.3f} "
              f"{r['backend_ms']:9.3f} {r['speedup']:7.2f}x")
    if not rows:
        print("no fast backend can run on this machine: only the reference is available", file=sys.stderr)
    meta = dict(device=where, dtype=str(dtype).replace("torch.", ""), repeats=repeats, quick=args.quick,
                torch=torch.__version__, statistic="min over alternating samples")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "bench.json", json.dumps({"meta": meta, "rows": rows, "skipped": notes}, indent=1) + "\n")
    written = [out / "bench.json"]
    if rows and not args.no_plot:
        plot(rows, out / "bench.png", f"intro2llm ops vs eager PyTorch ({where}, {meta['dtype']})")
        written.append(out / "bench.png")
    print("wrote " + ", ".join(map(str, written)), file=sys.stderr)
    return 0
