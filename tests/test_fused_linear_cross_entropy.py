"""fused_linear_cross_entropy: every backend vs the eager reference (loss, grad hidden/weight/bias), chunking,
all-ignored batches, opcheck, torch.compile, bad input, and the peak-memory promise (fresh subprocess)."""

import sys

import pytest
import torch
import torch.nn.functional as F

import intro2llm.ops as ops
from intro2llm.ops._dispatch import extension_error
from intro2llm.testing import assert_close_to_exact, assert_fused_peak_fraction_of_eager, backends_for, dtypes_for

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FAST = [b for b in backends_for(DEVICE) if b != "reference"]
# (token shape, H, V, chunk_size): one token; (B, T) tokens with an uneven last chunk; V=32000 with few tokens
SHAPES = [((1,), 16, 131, None), ((3, 7), 24, 131, 4), ((5,), 32, 32000, 2)]
REDUCTIONS = ["mean", "sum", "none"]


CASES = [(b, s, d) for b in FAST for s in SHAPES for d in dtypes_for(b, DEVICE)]
IDS = [f"{b}-{'x'.join(map(str, s[0]))}x{s[1]}-V{s[2]}-{str(d)[6:]}" for b, s, d in CASES]


def _inputs(tokens, H, V, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*tokens, H, generator=g).to(DEVICE, dtype)
    w = (torch.randn(V, H, generator=g) / H**0.5).to(DEVICE, dtype)
    b = (0.1 * torch.randn(V, generator=g)).to(DEVICE, dtype) if bias else None
    t = torch.randint(0, V, tokens, generator=g)
    t.view(-1)[1::4] = -100
    return h, w, b, t.to(DEVICE)


def _run(fn, h, w, b, t):
    leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in (h, w, b)]
    loss = fn(leaves[0], leaves[1], t, leaves[2])
    up = torch.randn(loss.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, loss.dtype)
    loss.backward(up)
    return [loss.detach()] + [x.grad for x in leaves if x is not None]


def _assert_runs_agree(fn, ref, h, w, b, t, tol=None):
    """``fn`` and ``ref`` give the same loss and gradients (``_run``); tol None: assert_close's defaults."""
    for g_, w_ in zip(_run(fn, h, w, b, t), _run(ref, h, w, b, t)):
        torch.testing.assert_close(g_, w_, atol=tol, rtol=tol)


def test_reference_matches_torch():
    h, w, b, t = _inputs((4, 5), 12, 37, torch.float32)
    _assert_runs_agree(lambda *a: ops.fused_linear_cross_entropy(*a, label_smoothing=0.1, backend="reference"),
                       lambda h_, w_, t_, b_: F.cross_entropy(F.linear(h_, w_, b_).reshape(-1, 37), t_.reshape(-1),
                                                              label_smoothing=0.1), h, w, b, t)


@pytest.mark.parametrize("backend,shape,dtype", CASES, ids=IDS)
def test_backend_matches_reference(backend, shape, dtype):
    tokens, H, V, chunk = shape
    reduction = REDUCTIONS[CASES.index((backend, shape, dtype)) % 3]
    eps = 0.1 if dtype == torch.float32 else 0.0
    h, w, b, t = _inputs(tokens, H, V, dtype, bias=(V != 32000))

    def fast(*a):
        return ops.fused_linear_cross_entropy(*a, label_smoothing=eps, reduction=reduction, chunk_size=chunk,
                                              backend=backend)

    def ref(*a):
        return ops.fused_linear_cross_entropy_reference(*a, label_smoothing=eps, reduction=reduction)

    got, want = _run(fast, h, w, b, t), _run(ref, h, w, b, t)
    exact = _run(ref, h.double(), w.double(), None if b is None else b.double(), t)
    for name, f, r, e in zip(("loss", "grad_hidden", "grad_weight", "grad_bias"), got, want, exact):
        assert f.dtype == r.dtype, f"{name}: dtype {f.dtype} != reference {r.dtype}"
        # fp32 accumulation of grad_weight makes the fused path *more* accurate than the reference in half dtypes
        assert_close_to_exact(f, r, e.to(f.dtype).double(), name=name)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_chunk_sizes_agree(backend, reduction):
    h, w, b, t = _inputs((37,), 20, 300, torch.float32)
    for chunk in (1, 16, None, 1000):
        _assert_runs_agree(lambda *a, c=chunk: ops.fused_linear_cross_entropy(*a, reduction=reduction, chunk_size=c,
                                                                               backend=backend),
                           lambda *a: ops.fused_linear_cross_entropy_reference(*a, reduction=reduction),
                           h, w, b, t, tol=1e-5)


@pytest.mark.parametrize("backend", ["reference"] + FAST)
def test_all_ignored(backend):
    h, w, b, t = _inputs((6,), 8, 20, torch.float32)
    t = torch.full_like(t, -100)
    for reduction in ("mean", "sum"):
        leaves = [x.clone().requires_grad_() for x in (h, w, b)]
        loss = ops.fused_linear_cross_entropy(leaves[0], leaves[1], t, leaves[2], reduction=reduction,
                                              backend=backend)
        want = F.cross_entropy(F.linear(h, w, b), t, reduction=reduction)
        torch.testing.assert_close(loss, want, equal_nan=True)  # nan under "mean" (as PyTorch), 0 under "sum"
        loss.backward()
        for x in leaves:
            assert torch.equal(x.grad, torch.zeros_like(x)), f"{reduction}: gradients must be exactly zero"


@pytest.mark.parametrize("backend", FAST)
def test_backward_twice_is_refused(backend):
    h, w, b, t = _inputs((4,), 8, 20, torch.float32)
    h.requires_grad_()
    loss = ops.fused_linear_cross_entropy(h, w, t, b, backend=backend)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward"):
        loss.backward()


@pytest.mark.parametrize("backend", FAST)
def test_inputs_untouched(backend):
    h, w, b, t = _inputs((9,), 8, 20, torch.float32)
    keep = [x.clone() for x in (h, w, b, t)]
    _run(lambda *a: ops.fused_linear_cross_entropy(*a, backend=backend), h, w, b, t)
    for x, k in zip((h, w, b, t), keep):
        assert torch.equal(x, k)


# ---- registration ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", FAST)
def test_opcheck(backend):
    h, w, b, t = _inputs((6,), 8, 20, torch.float32)
    fwd = torch.ops.intro2llm.fused_linear_cross_entropy_fwd.default
    torch.library.opcheck(fwd, (h.requires_grad_(), w.requires_grad_(), t, b, -100, 0.1, "mean", 4, backend))
    none_fwd = torch.ops.intro2llm.fused_linear_cross_entropy_none_fwd.default
    torch.library.opcheck(none_fwd, (h, w, t, None, -100, 0.0, 4, backend))


@pytest.mark.parametrize("backend", FAST + ["auto"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile_fullgraph(backend, reduction):
    h, w, b, t = _inputs((3, 5), 16, 50, torch.float32)
    bk = None if backend == "auto" else backend

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(h_, w_, t_, b_):
        return ops.fused_linear_cross_entropy(h_ * 2, w_, t_, b_, reduction=reduction, chunk_size=4, backend=bk)

    _assert_runs_agree(f, lambda h_, w_, t_, b_: ops.fused_linear_cross_entropy_reference(h_ * 2, w_, t_, b_,
                                                                                           reduction=reduction),
                       h, w, b, t, tol=1e-5)


# ---- bad input ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference"] + FAST)
def test_bad_input(backend):
    h, w, b, t = _inputs((4,), 8, 20, torch.float32)

    def call(**kw):
        args = dict(hidden=h, weight=w, targets=t, bias=b)
        args.update(kw)
        return ops.fused_linear_cross_entropy(**args, backend=backend)

    with pytest.raises(ValueError, match=r"target 20 .*outside \[0, 20\)"):
        call(targets=torch.tensor([0, 20, 1, 2], device=DEVICE))
    with pytest.raises(ValueError, match=r"target -5 "):
        call(targets=torch.tensor([0, -5, 1, 2], device=DEVICE))
    with pytest.raises(ValueError, match=r"weight must have shape \(V, 8\).*\(20, 9\)"):
        call(weight=torch.randn(20, 9, device=DEVICE))
    with pytest.raises(ValueError, match=r"bias must have shape \(20,\).*\(19,\)"):
        call(bias=torch.randn(19, device=DEVICE))
    with pytest.raises(ValueError, match=r"targets shape \(5,\).*\(4,\)"):
        call(targets=torch.zeros(5, dtype=torch.long, device=DEVICE))
    with pytest.raises(TypeError, match="int64"):
        call(weight=w.long())
    with pytest.raises(TypeError, match="int64"):
        call(targets=t.float())
    with pytest.raises(ValueError, match="chunk_size"):
        call(chunk_size=0)
    with pytest.raises(ValueError, match="reduction"):
        call(reduction="avg")


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_no_grad_forward(backend, reduction):
    # without autograd the op takes the loss-only path (no gradient GEMMs); the value must not change
    h, w, b, t = _inputs((3, 11), 16, 70, torch.float32)
    with torch.no_grad():
        got = ops.fused_linear_cross_entropy(h, w, t, b, reduction=reduction, chunk_size=8, backend=backend)
    torch.testing.assert_close(got, F.cross_entropy(F.linear(h, w, b).reshape(-1, 70), t.reshape(-1),
                                                    reduction=reduction))


@pytest.mark.parametrize("backend", FAST)
def test_fp32_weight_with_half_hidden(backend):
    # autocast-style mix: fp16 activations, fp32 lm-head weight/bias → loss in fp16, grads in each input's dtype
    h, w, b, t = _inputs((12,), 16, 40, torch.float32)
    got = _run(lambda h_, w_, t_, b_: ops.fused_linear_cross_entropy(h_.half(), w_, t_, b_, backend=backend),
               h, w, b, t)
    want = _run(lambda h_, w_, t_, b_: ops.fused_linear_cross_entropy_reference(h_.half(), w_, t_, b_), h, w, b, t)
    assert got[0].dtype == torch.float16 and got[2].dtype == torch.float32 and got[3].dtype == torch.float32
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_, w_, atol=2e-3, rtol=2e-3)


def test_default_chunk_size():
    from intro2llm.ops.fused_linear_cross_entropy import default_chunk_size

    assert default_chunk_size(8192, 32000, torch.float32) * 32000 * 4 <= 64 * 2**20
    assert default_chunk_size(8192, 128000, torch.float32) >= 16
    assert default_chunk_size(3, 32000, torch.float32) == 3


# ---- the memory promise ------------------------------------------------------------------------------------------
_MEM_STEP = r"""
def step(h, w, t):
    if kind == "eager":
        loss = torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, w), t)
    else:
        loss = ops.fused_linear_cross_entropy(h, w, t, backend="cpp")
    loss.backward()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak memory is read from /proc (Linux only)")
@pytest.mark.skipif(extension_error() is not None, reason=f"cpp backend: {extension_error()}")
def test_peak_memory_fraction_of_eager():
    # small version of the target (8192 x 1024 x 32000: <= 25%); the full figures: the benchmark's --memory
    assert_fused_peak_fraction_of_eager(_MEM_STEP, 2048, 64, 32000, fraction=0.25)


@pytest.mark.parametrize("backend", ["reference"] + [b for b in backends_for("cpu") if b == "cpp"])
def test_cpu_bf16_autocast_matches_eager_autocast(backend):
    # Under autocast the GEMMs run in bf16 and the loss comes back in fp32, like linear + cross_entropy would.
    g = torch.Generator().manual_seed(3)
    h = torch.randn(37, 64, generator=g, requires_grad=True)
    w = (0.1 * torch.randn(131, 64, generator=g)).requires_grad_()
    t = torch.randint(0, 131, (37,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ops.fused_linear_cross_entropy(h, w, t, backend=backend)
        want = torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, w), t)
    assert loss.dtype == torch.float32 and want.dtype == torch.float32
    torch.testing.assert_close(loss, want, atol=2e-2, rtol=1e-2)
    gh, gw = torch.autograd.grad(loss, (h, w))
    wh, ww = torch.autograd.grad(want, (h, w))
    assert gh.dtype == torch.float32 and gw.dtype == torch.float32
    torch.testing.assert_close(gh, wh, atol=2e-3, rtol=5e-2)
    torch.testing.assert_close(gw, ww, atol=2e-3, rtol=5e-2)
