"""swiglu / geglu: every backend against the reference (output + both gradients), torch.nn.functional as the
oracle (silu, gelu with approximate "none" and "tanh"), strided inputs, opcheck, compile, bad input.
"""

import pytest
import torch
import torch.nn.functional as F

import intro2llm.ops as ops
from intro2llm.ops._dispatch import extension_error
from intro2llm.testing import assert_close_to_exact, assert_compiled_matches, backends_for, dtypes_for, output_and_grads

# tl.sigmoid(-100) overflows exp in the CPU interpreter's numpy (to inf, giving the right 0): not a failure
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FAST = [b for b in backends_for(DEVICE) if b != "reference"]
SHAPES = [(3, 47, 131), (1, 64), (5, 1), (2, 7, 1000), (17,)]
# (name, fast op, reference op, torch oracle)
OPS = {
    "swiglu": (ops.swiglu, ops.swiglu_reference, lambda g, u: F.silu(g) * u),
    "geglu": (ops.geglu, ops.geglu_reference, lambda g, u: F.gelu(g) * u),
    "geglu_tanh": (
        lambda g, u, **kw: ops.geglu(g, u, "tanh", **kw),
        lambda g, u: ops.geglu_reference(g, u, "tanh"),
        lambda g, u: F.gelu(g, approximate="tanh") * u,
    ),
}


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # gate spans the activations' curved region and both tails (|x| up to ~12)
    gate = (3 * torch.randn(shape, generator=g)).to(DEVICE, dtype)
    up = torch.randn(shape, generator=g).to(DEVICE, dtype)
    dy = torch.randn(shape, generator=g).to(DEVICE, dtype)
    return gate, up, dy


def _run(fn, a, b, dy):
    return output_and_grads(fn, (a, b), dy)


def test_reference_known_answers():
    g = torch.tensor([1.0, -2.0, 0.0])
    u = torch.tensor([2.0, 1.0, 5.0])
    # silu(1) = 1/(1+e^-1) = 0.7310586, silu(-2) = -2/(1+e^2) = -0.2384058
    torch.testing.assert_close(ops.swiglu_reference(g, u), torch.tensor([1.4621172, -0.2384058, 0.0]))
    # gelu(1) = Phi(1) = 0.8413447, gelu(-2) = -2 * Phi(-2) = -0.0455003
    torch.testing.assert_close(ops.geglu_reference(g, u), torch.tensor([1.6826894, -0.0455003, 0.0]))
    # tanh form: 0.5 * (1 + tanh(sqrt(2/pi) * 1.044715)) = 0.8411920
    torch.testing.assert_close(ops.geglu_reference(g, u, "tanh")[0], torch.tensor(1.6823840))


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("backend", ["reference"] + FAST)
def test_equals_torch_functional(op, backend):
    fast, _, oracle = OPS[op]
    gate, up, dy = _inputs((4, 77), torch.float32, seed=1)
    got = _run(lambda g, u: fast(g, u, backend=backend), gate, up, dy)
    want = _run(oracle, gate, up, dy)
    for name, g_, w_ in zip(("out", "grad_gate", "grad_up"), got, want):
        torch.testing.assert_close(g_, w_, atol=2e-5, rtol=2e-5, msg=name)


PARAMS = [(o, b, s, d) for o in OPS for b in FAST for s in SHAPES for d in dtypes_for(b, DEVICE)]
IDS = [f"{o}-{b}-{'x'.join(map(str, s))}-{str(d)[6:]}" for o, b, s, d in PARAMS]


@pytest.mark.parametrize("op,backend,shape,dtype", PARAMS, ids=IDS)
def test_backend_matches_reference(op, backend, shape, dtype):
    fast_fn, ref_fn, _ = OPS[op]
    gate, up, dy = _inputs(shape, dtype)
    fast = _run(lambda g, u: fast_fn(g, u, backend=backend), gate, up, dy)
    ref = _run(ref_fn, gate, up, dy)
    exact = _run(ref_fn, gate.double(), up.double(), dy.double())
    for name, f, r, e in zip(("out", "grad_gate", "grad_up"), fast, ref, exact):
        assert f.dtype == r.dtype == dtype, f"{name}: dtype {f.dtype} != {dtype}"
        assert_close_to_exact(f, r, e, name=name)


@pytest.mark.parametrize("backend", FAST)
def test_extreme_values_saturate(backend):
    # the tails: silu(-100) ~ -3.7e-42 (0 in fp32 output), silu(100) = 100, gelu(-30) = 0; no nan/inf
    g = torch.tensor([-1e4, -100.0, -30.0, -10.0, 10.0, 30.0, 100.0, 1e4], device=DEVICE)
    u = torch.ones_like(g)
    for op in OPS:
        fast_fn, _, oracle = OPS[op]
        got = _run(lambda a, b, f=fast_fn: f(a, b, backend=backend), g, u, torch.ones_like(g))
        want = _run(oracle, g.double(), u.double(), torch.ones_like(g).double())
        for f, w in zip(got, want):
            assert torch.isfinite(f).all(), f"{op}: {f}"
            torch.testing.assert_close(f.double(), w, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("backend", FAST)
def test_strided_inputs(backend):
    # gate and up as the two halves of a fused gate_up projection (non-contiguous views)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 2 * 40, generator=g).to(DEVICE)
    gate, up = x.chunk(2, dim=-1)
    assert not gate.is_contiguous()
    dy = torch.randn(6, 40, generator=g).to(DEVICE)
    for op in OPS:
        fast_fn, ref_fn, _ = OPS[op]
        fast = _run(lambda a, b, f=fast_fn: f(a, b, backend=backend), gate, up, dy)
        ref = _run(ref_fn, gate.contiguous(), up.contiguous(), dy)
        for f, r in zip(fast, ref):
            torch.testing.assert_close(f, r, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(extension_error() is not None, reason=f"cpp backend: {extension_error()}")
def test_opcheck_compiled():
    gate, up, dy = _inputs((5, 48), torch.float32)
    torch.library.opcheck(torch.ops.intro2llm.swiglu_fwd.default, (gate.requires_grad_(), up.requires_grad_()))
    torch.library.opcheck(torch.ops.intro2llm.swiglu_bwd.default, (dy, gate.detach(), up.detach()))
    for approx in ("none", "tanh"):
        torch.library.opcheck(torch.ops.intro2llm.geglu_fwd.default, (gate, up, approx))
        torch.library.opcheck(torch.ops.intro2llm.geglu_bwd.default, (dy, gate.detach(), up.detach(), approx))


@pytest.mark.skipif("triton" not in FAST, reason="triton backend unavailable on this machine")
def test_opcheck_triton():
    gate, up, dy = _inputs((3, 16), torch.float32)
    gate.requires_grad_()
    up.requires_grad_()
    torch.library.opcheck(torch.ops.intro2llm.swiglu_fwd_triton.default, (gate, up))
    torch.library.opcheck(torch.ops.intro2llm.geglu_fwd_triton.default, (gate, up, "tanh"))


@pytest.mark.parametrize("backend", FAST + ["auto"])
def test_torch_compile_fullgraph(backend):
    gate, up, dy = _inputs((4, 96), torch.float32)
    bk = None if backend == "auto" else backend
    assert_compiled_matches(lambda g, u: ops.swiglu(g, u, backend=bk) + ops.geglu(g, u, "tanh", backend=bk) * 2,
                            lambda g, u: ops.swiglu_reference(g, u) + ops.geglu_reference(g, u, "tanh") * 2,
                            lambda f: _run(f, gate, up, dy), 1e-5)


@pytest.mark.parametrize("backend", ["reference"] + FAST)
def test_bad_input(backend):
    g = torch.randn(4, 8, device=DEVICE)
    for name, fn in (("swiglu", ops.swiglu), ("geglu", ops.geglu)):
        with pytest.raises(ValueError, match=rf"{name}: gate and up must have the same shape.*\(4, 8\).*\(4, 7\)"):
            fn(g, g[:, :7], backend=backend)
        with pytest.raises(TypeError, match="int64"):
            fn(g.long(), g.long(), backend=backend)
        with pytest.raises(TypeError, match=r"share a dtype.*float32.*float16"):
            fn(g, g.half(), backend=backend)
        with pytest.raises(ValueError, match="meta"):
            fn(g, g.to("meta"), backend=backend)
        with pytest.raises(ValueError, match=r"at least one dimension.*\(\)"):
            fn(g[0, 0], g[0, 0], backend=backend)
    with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh', got 'erf'"):
        ops.geglu(g, g, "erf", backend=backend)
