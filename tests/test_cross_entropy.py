"""cross_entropy: reference vs torch, every backend vs the reference (loss + grad), opcheck, compile, bad input.

Follows tests/test_rms_norm.py: backend × shape × dtype, forward then backward with one upstream gradient,
``assert_close_to_exact`` against the fp64 reference. Triton runs in the interpreter on CPU (fp32/fp16).
"""

import math

import pytest
import torch
import torch.nn.functional as F

import intro2llm.ops as ops
from intro2llm.loss import CrossEntropyLoss
from intro2llm.ops._dispatch import extension_error
from intro2llm.testing import assert_close_to_exact, assert_compiled_matches, backends_for, dtypes_for

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FAST = [b for b in backends_for(DEVICE) if b != "reference"]
# (..., V) with odd sizes: one token, the LM layout (B, T, V), a real vocabulary with few tokens, V=1
SHAPES = [(1, 131), (3, 47, 131), (4, 32000), (6, 1)]
# (label_smoothing, z_loss, reduction), cycled over the cases so each option meets every backend
OPTIONS = [(0.0, 0.0, "mean"), (0.1, 0.0, "sum"), (0.0, 1e-3, "none"), (0.2, 1e-2, "mean")]


CASES = [(b, s, d) for b in FAST for s in SHAPES for d in dtypes_for(b, DEVICE)]


def _inputs(shape, dtype, seed=0, ignore_every=5):
    g = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(shape, generator=g)).to(DEVICE, dtype)
    t = torch.randint(0, shape[-1], shape[:-1], generator=g)
    t.view(-1)[1::ignore_every] = -100  # never token 0: a 1-token batch keeps a finite mean
    return x, t.to(DEVICE)


def _run(fn, x, t, upstream_seed=1):
    x = x.detach().clone().requires_grad_()
    loss = fn(x, t)
    g = torch.randn(loss.shape, generator=torch.Generator().manual_seed(upstream_seed)).to(DEVICE, loss.dtype)
    loss.backward(g)
    return loss.detach(), x.grad


# ---- the reference ------------------------------------------------------------------------------------------
def test_reference_known_answer():
    # logits [1, 2, 3], target 2: log(e + e^2 + e^3) - 3 = log(1 + e^-1 + e^-2) = 0.40760596
    loss = ops.cross_entropy_reference(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([2]))
    torch.testing.assert_close(loss, torch.tensor(math.log(1 + math.exp(-1) + math.exp(-2))))
    # z-loss adds z * lse^2: lse = 3 + 0.40760596
    z = ops.cross_entropy_reference(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([2]), z_loss=0.5) - loss
    torch.testing.assert_close(z, torch.tensor(0.5 * (3 + math.log(1 + math.exp(-1) + math.exp(-2))) ** 2))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_reference_matches_torch(reduction, label_smoothing):
    x, t = _inputs((4, 9, 37), torch.float32)
    got = _run(lambda a, b: ops.cross_entropy(a, b, label_smoothing=label_smoothing, reduction=reduction,
                                              backend="reference"), x, t)
    want = _run(lambda a, b: F.cross_entropy(a.transpose(1, 2), b, label_smoothing=label_smoothing,
                                             reduction=reduction), x, t)
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_, w_)


def test_loss_module_matches_torch():
    x, t = _inputs((2, 5, 19), torch.float32)
    mine = CrossEntropyLoss(ignore_index=-100, label_smoothing=0.05, reduction="sum")
    theirs = torch.nn.CrossEntropyLoss(ignore_index=-100, label_smoothing=0.05, reduction="sum")
    torch.testing.assert_close(mine(x, t), theirs(x.reshape(-1, 19), t.reshape(-1)))
    with pytest.raises(ValueError, match="reduction"):
        CrossEntropyLoss(reduction="avg")


# ---- every fast backend against the reference -----------------------------------------------------------------
IDS = [f"{b}-{'x'.join(map(str, s))}-{str(d)[6:]}" for b, s, d in CASES]


@pytest.mark.parametrize("backend,shape,dtype", CASES, ids=IDS)
def test_backend_matches_reference(backend, shape, dtype):
    eps, z, reduction = OPTIONS[CASES.index((backend, shape, dtype)) % len(OPTIONS)]
    x, t = _inputs(shape, dtype)

    def op(fn):
        return lambda a, b: fn(a, b, -100, eps, z, reduction)

    fast = _run(op(lambda *a: ops.cross_entropy(*a, backend=backend)), x, t)
    ref = _run(op(ops.cross_entropy_reference), x, t)
    exact = _run(op(ops.cross_entropy_reference), x.double(), t)
    for name, f, r, e in zip(("loss", "grad_logits"), fast, ref, exact):
        assert f.dtype == r.dtype, f"{name}: dtype {f.dtype} != reference {r.dtype}"
        assert_close_to_exact(f, r, e.to(f.dtype).double(), name=name)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("eps,z,reduction", OPTIONS + [(1.0, 0.0, "sum")])
def test_options_fp32(backend, eps, z, reduction):
    x, t = _inputs((5, 7, 300), torch.float32, seed=3, ignore_every=3)
    fast = _run(lambda a, b: ops.cross_entropy(a, b, -100, eps, z, reduction, backend=backend), x, t)
    ref = _run(lambda a, b: ops.cross_entropy_reference(a, b, -100, eps, z, reduction), x, t)
    for f, r in zip(fast, ref):
        torch.testing.assert_close(f, r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", FAST)
def test_large_vocabulary(backend):
    # 256k classes: the kernels loop over the vocabulary in tiles (online log-sum-exp)
    x, t = _inputs((2, 256_000), torch.float32, ignore_every=100)
    t[1] = 255_999
    fast = _run(lambda a, b: ops.cross_entropy(a, b, label_smoothing=0.1, backend=backend), x, t)
    ref = _run(lambda a, b: ops.cross_entropy_reference(a, b, label_smoothing=0.1), x, t)
    for f, r in zip(fast, ref):
        torch.testing.assert_close(f, r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference"] + FAST)
def test_all_ignored(backend):
    x = torch.randn(3, 4, 11, device=DEVICE)
    t = torch.full((3, 4), -1, device=DEVICE)
    for reduction, expect in (("mean", float("nan")), ("sum", 0.0)):
        xr = x.clone().requires_grad_()
        loss = ops.cross_entropy(xr, t, ignore_index=-1, reduction=reduction, backend=backend)
        want = F.cross_entropy(x.reshape(-1, 11), t.reshape(-1), ignore_index=-1, reduction=reduction)
        torch.testing.assert_close(loss, want, equal_nan=True)  # PyTorch: nan under "mean", 0 under "sum"
        assert math.isnan(loss.item()) if math.isnan(expect) else loss.item() == expect
        loss.backward()
        assert torch.equal(xr.grad, torch.zeros_like(x)), f"{reduction}: gradients must be exactly zero"


@pytest.mark.parametrize("backend", FAST)
def test_logits_untouched_and_non_contiguous(backend):
    x, t = _inputs((40, 6), torch.float32)
    xt = x.t().contiguous().t()  # same values, column-major
    keep = xt.detach().clone()
    fast = _run(lambda a, b: ops.cross_entropy(a, b, label_smoothing=0.1, backend=backend), xt, t)
    ref = _run(lambda a, b: ops.cross_entropy_reference(a, b, label_smoothing=0.1), x, t)
    for f, r in zip(fast, ref):
        torch.testing.assert_close(f, r, atol=1e-5, rtol=1e-5)
    assert torch.equal(xt, keep), "the user's logits must not be overwritten"


@pytest.mark.parametrize("backend", FAST)
def test_int32_targets(backend):
    x, t = _inputs((8, 50), torch.float32)
    torch.testing.assert_close(ops.cross_entropy(x, t.int(), backend=backend), ops.cross_entropy_reference(x, t))


# ---- registration: opcheck and torch.compile -------------------------------------------------------------------
@pytest.mark.skipif(extension_error() is not None, reason=f"cpp backend: {extension_error()}")
def test_opcheck_compiled():
    x, t = _inputs((6, 33), torch.float32)
    x = x.requires_grad_()
    torch.library.opcheck(torch.ops.intro2llm.cross_entropy_fwd.default, (x, t, -100, 0.1, 1e-3))
    lse = torch.ops.intro2llm.cross_entropy_fwd(x.detach(), t, -100, 0.1, 1e-3)[1]
    torch.library.opcheck(torch.ops.intro2llm.cross_entropy_bwd.default,
                          (torch.randn(6, device=DEVICE), x.detach(), t, lse, -100, 0.1, 1e-3))
    buf = x.detach().clone()
    torch.library.opcheck(torch.ops.intro2llm.cross_entropy_fwd_bwd_.default, (buf, t, 0.5, -100, 0.1, 0.0))


@pytest.mark.skipif(extension_error() is not None, reason=f"cpp backend: {extension_error()}")
def test_fwd_bwd_inplace_equals_fwd_then_bwd():
    x, t = _inputs((6, 33), torch.float32)
    loss, lse = torch.ops.intro2llm.cross_entropy_fwd(x, t, -100, 0.1, 1e-3)
    grad = torch.ops.intro2llm.cross_entropy_bwd(torch.full((6,), 0.5, device=DEVICE), x, t, lse, -100, 0.1, 1e-3)
    buf = x.clone()
    loss2, _ = torch.ops.intro2llm.cross_entropy_fwd_bwd_(buf, t, 0.5, -100, 0.1, 1e-3)
    torch.testing.assert_close(loss2, loss)
    torch.testing.assert_close(buf, grad)


@pytest.mark.skipif("triton" not in FAST, reason="triton backend unavailable on this machine")
def test_opcheck_triton():
    x, t = _inputs((6, 33), torch.float32)
    op = torch.ops.intro2llm.cross_entropy_fwd_triton.default
    torch.library.opcheck(op, (x.requires_grad_(), t, -100, 0.1, 1e-3))


@pytest.mark.parametrize("backend", FAST + ["auto"])
def test_torch_compile_fullgraph(backend):
    x, t = _inputs((4, 9, 96), torch.float32)
    bk = None if backend == "auto" else backend
    assert_compiled_matches(lambda a, b: ops.cross_entropy(a * 2, b, label_smoothing=0.1, z_loss=1e-3, backend=bk),
                            lambda a, b: ops.cross_entropy_reference(a * 2, b, label_smoothing=0.1, z_loss=1e-3),
                            lambda f: _run(f, x, t), 1e-5)


# ---- bad input ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference"] + FAST)
def test_bad_input(backend):
    x = torch.randn(4, 8, device=DEVICE)
    for bad in (8, -3, 1000):
        t = torch.tensor([0, bad, 1, 2], device=DEVICE)
        with pytest.raises(ValueError, match=rf"target {bad} .*outside \[0, 8\)"):
            ops.cross_entropy(x, t, backend=backend)
    with pytest.raises(ValueError, match=r"targets shape \(3,\).*\(4,\)"):
        ops.cross_entropy(x, torch.zeros(3, dtype=torch.long, device=DEVICE), backend=backend)
    with pytest.raises(TypeError, match="float32"):
        ops.cross_entropy(x, torch.zeros(4, device=DEVICE), backend=backend)
    with pytest.raises(TypeError, match="int64"):
        ops.cross_entropy(x.long(), torch.zeros(4, dtype=torch.long, device=DEVICE), backend=backend)
    with pytest.raises(ValueError, match=r"non-empty last.*\(4, 0\)"):
        ops.cross_entropy(torch.ones(4, 0, device=DEVICE), torch.zeros(4, dtype=torch.long, device=DEVICE),
                          backend=backend)
    with pytest.raises(ValueError, match="reduction"):
        ops.cross_entropy(x, torch.zeros(4, dtype=torch.long, device=DEVICE), reduction="avg", backend=backend)
    with pytest.raises(ValueError, match="label_smoothing"):
        ops.cross_entropy(x, torch.zeros(4, dtype=torch.long, device=DEVICE), label_smoothing=1.5, backend=backend)
    with pytest.raises(ValueError, match="meta"):
        ops.cross_entropy(x, torch.zeros(4, dtype=torch.long, device="meta"), backend=backend)


@pytest.mark.skipif(extension_error() is not None, reason=f"cpp backend: {extension_error()}")
def test_compiled_op_checks_targets_itself():
    # called directly (no Python validation in front), the C++ op still refuses before its kernel runs
    x = torch.randn(3, 5)
    with pytest.raises(ValueError, match=r"target 5 at position 2 is outside \[0, 5\)"):
        torch.ops.intro2llm.cross_entropy_fwd(x, torch.tensor([0, 1, 5]), -100, 0.0, 0.0)
    with pytest.raises(ValueError, match=r"target -7"):
        torch.ops.intro2llm.cross_entropy_fwd_bwd_(x.clone(), torch.tensor([0, -7, 1]), 1.0, -100, 0.0, 0.0)
