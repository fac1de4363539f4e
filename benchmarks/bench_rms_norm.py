"""rms_norm benchmarks: reference vs C++ vs torch.compile'd reference vs the clone() memory floor (CPU), plus
Triton/CUDA on a GPU. Groups ``rms_norm-fwd-<shape>-<dtype>`` and ``rms_norm-full-...`` (forward + backward).

    pytest benchmarks/bench_rms_norm.py --benchmark-only --benchmark-group-by=group --benchmark-columns=min,median

Bytes moved (fwd: read x + write y; full: + read x, g, write dx) go in ``extra_info`` with GB/s.
"""

import pytest
import torch

import intro2llm.ops as ops
from intro2llm.testing import backends_for, bandwidth_run, benchmark_bandwidth

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(4096, 4096), (16384, 1024)]
DTYPES = [torch.float32, torch.bfloat16]
IMPLS = [b for b in backends_for(DEVICE) if not (b == "triton" and DEVICE == "cpu")] + ["compile", "clone"]


_compiled = {}


def _fn(impl):
    if impl == "clone":
        return lambda x, w: x.clone()
    if impl == "compile":
        if "f" not in _compiled:
            _compiled["f"] = torch.compile(ops.rms_norm_reference)
        return _compiled["f"]
    return lambda x, w: ops.rms_norm(x, w, backend=impl)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["fwd", "full"])
def test_rms_norm(benchmark, mode, impl, shape, dtype):
    if mode == "full" and impl == "clone":
        pytest.skip("clone is the forward memory floor only")
    x = torch.randn(shape, device=DEVICE, dtype=dtype)
    w = torch.ones(shape[-1], device=DEVICE, dtype=dtype)
    run = bandwidth_run(_fn(impl), (x, w), torch.randn_like(x) if mode == "full" else None)
    moved = (2 if mode == "fwd" else 5) * x.numel() * x.element_size()
    benchmark_bandwidth(benchmark, run, moved, f"rms_norm-{mode}-{'x'.join(map(str, shape))}-{str(dtype)[6:]}", 10)
