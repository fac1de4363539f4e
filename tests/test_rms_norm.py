"""rms_norm: every backend against the reference (forward + both gradients), opcheck, compile, bad input.

The template for op tests: parametrize backend × shape × dtype; run forward, then backward with the same
upstream gradient; compare with ``assert_close_to_exact`` (error vs fp64 ≤ a multiple of the reference's own).
Triton runs through the interpreter on CPU (conftest sets TRITON_INTERPRET=1 when there is no GPU).
"""

import pytest
import torch

import intro2llm.ops as ops
from intro2llm.ops import BackendUnavailableError
from intro2llm.ops._dispatch import extension_error
from intro2llm.testing import assert_close_to_exact, assert_compiled_matches, backends_for, dtypes_for, output_and_grads

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FAST = [b for b in backends_for(DEVICE) if b != "reference"]
SHAPES = [(3, 47, 131), (1, 64), (5, 1), (2, 7, 1024)]


CASES = [(b, s, d) for b in FAST for s in SHAPES for d in dtypes_for(b, DEVICE)]
CASE_IDS = [f"{b}-{'x'.join(map(str, s))}-{str(d)[6:]}" for b, s, d in CASES]


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(DEVICE, dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(DEVICE, dtype)
    dy = torch.randn(shape, generator=g).to(DEVICE, dtype)
    return x, w, dy


def _run(fn, a, b, dy):
    return output_and_grads(fn, (a, b), dy)


def test_reference_known_answer():
    # x = [3, 4]: mean(x^2) = 12.5, rms = 3.5355; with weight [1, 2]: [0.8485, 2.2627]
    y = ops.rms_norm_reference(torch.tensor([[3.0, 4.0]]), torch.tensor([1.0, 2.0]), eps=0.0)
    torch.testing.assert_close(y, torch.tensor([[3 / 12.5**0.5, 8 / 12.5**0.5]]))


def test_reference_matches_torch():
    if not hasattr(torch.nn.functional, "rms_norm"):
        pytest.skip("torch.nn.functional.rms_norm needs torch >= 2.4")
    x, w, _ = _inputs((4, 33), torch.float32)
    want = torch.nn.functional.rms_norm(x, (33,), w, 1e-5)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-5, backend="reference"), want)


@pytest.mark.parametrize("backend,shape,dtype", CASES, ids=CASE_IDS)
def test_backend_matches_reference(backend, shape, dtype):
    x, w, dy = _inputs(shape, dtype)
    fast = _run(lambda a, b: ops.rms_norm(a, b, 1e-6, backend=backend), x, w, dy)
    ref = _run(lambda a, b: ops.rms_norm_reference(a, b, 1e-6), x, w, dy)
    exact = _run(lambda a, b: ops.rms_norm_reference(a, b, 1e-6), x.double(), w.double(), dy.double())
    for name, f, r, e in zip(("y", "grad_x", "grad_weight"), fast, ref, exact):
        assert f.dtype == r.dtype, f"{name}: dtype {f.dtype} != reference {r.dtype}"
        assert_close_to_exact(f, r, e.to(f.dtype).double(), name=name)


@pytest.mark.parametrize("backend", FAST)
def test_non_contiguous_input(backend):
    x, w, dy = _inputs((6, 40), torch.float32)
    xt = x.t().contiguous().t()  # same values, column-major strides
    assert not xt.is_contiguous()
    fast = _run(lambda a, b: ops.rms_norm(a, b, backend=backend), xt, w, dy)
    ref = _run(ops.rms_norm_reference, x, w, dy)
    for f, r in zip(fast, ref):
        torch.testing.assert_close(f, r, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif("cpp" not in FAST, reason="cpp backend unavailable on this machine")
@pytest.mark.parametrize("threads", [2, 3])
def test_cpp_multithreaded_reduction(threads):
    # grad_weight is summed from one partial row per thread chunk: check it with several chunks
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, w, dy = _inputs((37, 129), torch.float32)
        fast = _run(lambda a, b: ops.rms_norm(a, b, backend="cpp"), x, w, dy)
    finally:
        torch.set_num_threads(before)
    ref = _run(ops.rms_norm_reference, x, w, dy)
    for f, r in zip(fast, ref):
        torch.testing.assert_close(f, r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", FAST)
def test_weight_in_another_dtype(backend):
    # autocast-style mix: bf16 activations, fp32 weight → output in x's dtype, grad_weight in fp32
    x, _, dy = _inputs((4, 64), torch.float16)
    w = torch.ones(64, device=DEVICE, dtype=torch.float32)
    y, gx, gw = _run(lambda a, b: ops.rms_norm(a, b, backend=backend), x, w, dy)
    assert y.dtype == torch.float16 and gw.dtype == torch.float32
    yr, _, gwr = _run(ops.rms_norm_reference, x, w, dy)
    torch.testing.assert_close(y, yr, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(gw, gwr, atol=2e-2, rtol=2e-3)


@pytest.mark.skipif(extension_error() is not None, reason=f"cpp backend: {extension_error()}")
def test_opcheck_compiled():
    x, w, _ = _inputs((5, 48), torch.float32)
    torch.library.opcheck(torch.ops.intro2llm.rms_norm_fwd.default, (x.requires_grad_(), w.requires_grad_(), 1e-6))
    rstd = torch.ops.intro2llm.rms_norm_fwd(x, w, 1e-6)[1].detach()
    torch.library.opcheck(torch.ops.intro2llm.rms_norm_bwd.default, (torch.randn_like(x), x.detach(), w.detach(), rstd))


@pytest.mark.skipif("triton" not in FAST, reason="triton backend unavailable on this machine")
def test_opcheck_triton():
    x, w, _ = _inputs((5, 48), torch.float32)
    args = (x.requires_grad_(), w.requires_grad_(), 1e-6)
    torch.library.opcheck(torch.ops.intro2llm.rms_norm_fwd_triton.default, args)


@pytest.mark.parametrize("backend", FAST + ["auto"])
def test_torch_compile_fullgraph(backend):
    x, w, dy = _inputs((4, 96), torch.float32)
    bk = None if backend == "auto" else backend
    assert_compiled_matches(lambda a, b: ops.rms_norm(a, b, 1e-6, backend=bk) * 2,
                            lambda a, b: ops.rms_norm_reference(a, b, 1e-6) * 2, lambda f: _run(f, x, w, dy), 1e-5)


@pytest.mark.parametrize("backend", ["reference"] + FAST)
def test_bad_input(backend):
    x = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\).*\(4, 8\).*\(7,\)"):
        ops.rms_norm(x, torch.ones(7, device=DEVICE), backend=backend)
    with pytest.raises(TypeError, match="int64"):
        ops.rms_norm(torch.ones(4, 8, dtype=torch.int64, device=DEVICE), torch.ones(8, device=DEVICE), backend=backend)
    with pytest.raises(ValueError, match=r"non-empty last dimension.*\(4, 0\)"):
        ops.rms_norm(torch.ones(4, 0, device=DEVICE), torch.ones(0, device=DEVICE), backend=backend)
    with pytest.raises(ValueError, match="meta"):
        ops.rms_norm(x, torch.ones(8, device="meta"), backend=backend)


def test_explicit_backend_that_cannot_run_names_the_reason(monkeypatch):
    with pytest.raises(BackendUnavailableError, match="cuda"):
        ops.rms_norm(torch.randn(2, 4), torch.ones(4), backend="cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
            ops.rms_norm(torch.randn(2, 4), torch.ones(4), backend="triton")
