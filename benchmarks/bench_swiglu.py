"""swiglu / geglu benchmarks: reference (fp32 math), plain eager (``F.silu(gate) * up`` in the input dtype, as
Hugging Face's LlamaMLP writes it), torch.compile'd reference, the C++ (CPU) / Triton + CUDA (GPU) kernels,
and the clone() memory floor. Groups ``<op>-fwd-<shape>-<dtype>`` and ``<op>-full-...`` (forward + backward).

    pytest benchmarks/bench_swiglu.py --benchmark-only --benchmark-group-by=group --benchmark-columns=min,median

Shape: a Mistral-7B MLP on 4096 tokens, (4096, 14336) (16384 tokens on a GPU). Bytes moved (fwd: read gate,
up + write out; full: + read grad, gate, up + write both gradients) go in ``extra_info`` with GB/s; on a GPU
also the peak memory.
The clone() floor copies gate alone (read N + write N: 2 of the forward's 3 transfers). On CPU the C++ kernel
runs under it: clone()'s fresh output takes a 4 KB page fault per page, ours asks for huge pages
(csrc/cpu/huge_pages.h).
"""

import pytest
import torch
import torch.nn.functional as F

import intro2llm.ops as ops
from intro2llm.testing import backends_for, bandwidth_run, benchmark_bandwidth

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(16384, 14336)] if DEVICE == "cuda" else [(4096, 14336)]
DTYPES = [torch.float32, torch.bfloat16]
IMPLS = [b for b in backends_for(DEVICE) if not (b == "triton" and DEVICE == "cpu")] + ["eager", "compile", "clone"]
OPS = {
    "swiglu": (ops.swiglu, ops.swiglu_reference, lambda g, u: F.silu(g) * u),
    "geglu": (ops.geglu, ops.geglu_reference, lambda g, u: F.gelu(g) * u),
}


_compiled = {}


def _fn(op, impl):
    fast, ref, eager = OPS[op]
    if impl == "clone":
        return lambda g, u: g.clone()
    if impl == "eager":
        return eager
    if impl == "compile":
        if op not in _compiled:
            _compiled[op] = torch.compile(ref)
        return _compiled[op]
    return lambda g, u: fast(g, u, backend=impl)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["fwd", "full"])
@pytest.mark.parametrize("op", list(OPS))
def test_glu(benchmark, op, mode, impl, shape, dtype):
    if mode == "full" and impl == "clone":
        pytest.skip("clone is the forward memory floor only")
    if op == "geglu" and impl in ("clone", "compile"):
        pytest.skip("geglu: the swiglu groups hold the floor and the compile baseline")
    gate = torch.randn(shape, device=DEVICE, dtype=dtype)
    up = torch.randn(shape, device=DEVICE, dtype=dtype)
    run = bandwidth_run(_fn(op, impl), (gate, up), torch.randn_like(gate) if mode == "full" else None)
    nbytes = gate.numel() * gate.element_size()
    moved = (3 if mode == "fwd" else 8) * nbytes
    benchmark_bandwidth(benchmark, run, moved if impl != "clone" else 2 * nbytes,
                        f"{op}-{mode}-{'x'.join(map(str, shape))}-{str(dtype)[6:]}", 10 if DEVICE == "cuda" else 5)
