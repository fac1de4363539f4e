"""apply_rope benchmarks: reference, plain eager (Hugging Face's formula in the input dtype), torch.compile'd
reference, the C++ (CPU) / Triton + CUDA (GPU) kernels, and the clone() memory floor of q and k.
Groups ``rope-fwd-<shape>-<dtype>`` and ``rope-full-...`` (forward + backward for q and k).

    pytest benchmarks/bench_rope.py --benchmark-only --benchmark-group-by=group --benchmark-columns=min,median

Shapes are Llama-7B-like attention at 1024 tokens: q (4, 32, 1024, 128) with 8 key heads (GQA), cos/sin
(1024, 128) fp32 (8 x 4096 tokens on a GPU). Bytes moved (fwd: read q, k + write q_out, k_out; full: twice
that) go in ``extra_info`` with GB/s; on a GPU also the peak memory of the timed call.
"""

import pytest
import torch

import intro2llm.ops as ops
from intro2llm.testing import backends_for, bandwidth_run, benchmark_bandwidth

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (B, H, Hkv, T, D)
SHAPES = [(8, 32, 8, 4096, 128)] if DEVICE == "cuda" else [(4, 32, 8, 1024, 128)]
DTYPES = [torch.float32, torch.bfloat16]
IMPLS = [b for b in backends_for(DEVICE) if not (b == "triton" and DEVICE == "cpu")] + ["eager", "compile", "clone"]


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _eager(q, k, cos, sin):
    # transformers.models.llama.modeling_llama.apply_rotary_pos_emb, with cos/sin cast to q's dtype as Llama does
    cos, sin = cos.to(q.dtype), sin.to(q.dtype)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


_compiled = {}


def _fn(impl):
    if impl == "clone":
        return lambda q, k, c, s: (q.clone(), k.clone())
    if impl == "eager":
        return _eager
    if impl == "compile":
        if "f" not in _compiled:
            _compiled["f"] = torch.compile(ops.apply_rope_reference)
        return _compiled["f"]
    return lambda q, k, c, s: ops.apply_rope(q, k, c, s, backend=impl)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}kv{}T{}D{}".format(*s))
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["fwd", "full"])
def test_rope(benchmark, mode, impl, shape, dtype):
    if mode == "full" and impl == "clone":
        pytest.skip("clone is the forward memory floor only")
    B, H, Hkv, T, D = shape
    q = torch.randn(B, H, T, D, device=DEVICE, dtype=dtype)
    k = torch.randn(B, Hkv, T, D, device=DEVICE, dtype=dtype)
    ang = torch.arange(T, device=DEVICE, dtype=torch.float32)[:, None] * torch.rand(D // 2, device=DEVICE)
    emb = torch.cat((ang, ang), dim=-1)  # (T, D)
    cos, sin = emb.cos(), emb.sin()
    grads = (torch.randn_like(q), torch.randn_like(k)) if mode == "full" else None
    run = bandwidth_run(_fn(impl), (q, k, cos, sin), grads, n_grad=2)  # cos/sin get no gradient
    moved = (2 if mode == "fwd" else 4) * (q.numel() + k.numel()) * q.element_size()
    benchmark_bandwidth(benchmark, run, moved, "rope-{}-B{}H{}kv{}T{}D{}-{}".format(mode, *shape, str(dtype)[6:]),
                        10 if DEVICE == "cuda" else 5)
