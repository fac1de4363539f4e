"""swiglu / geglu at |x| up to the float limit (issue 19): the C++ kernel equals the reference where the
reference is finite (it gave silu(-1e36) = -6e-3 instead of -0, from exp's clamp standing in for 0)."""

from __future__ import annotations

import pytest
import torch

from intro2llm.ops.swiglu import geglu, geglu_reference, swiglu, swiglu_reference
from intro2llm.testing import backends_for

BACKENDS = [b for b in backends_for("cpu") if b not in ("reference", "triton")]
pytestmark = pytest.mark.skipif(not BACKENDS, reason="no compiled CPU backend in this build (intro2llm._C missing)")

MAGS = [0.0, 1e-30, 1.0, 20.0, 87.5, 88.5, 89.0, 100.0, 1e10, 1e30, 1e36, 1e37, 3e38]


def _grid():
    x = torch.tensor([s * m for m in MAGS for s in (1.0, -1.0)], dtype=torch.float32)
    gate = x.repeat_interleave(3)
    up = torch.tensor([1.0, -2.5, 1e-3], dtype=torch.float32).repeat(len(x))
    return gate, up


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["swiglu", "geglu", "geglu_tanh"])
def test_extreme_gates_match_the_reference(op, backend):
    gate, up = _grid()
    if op == "swiglu":
        fast, ref = (lambda g, u: swiglu(g, u, backend=backend)), swiglu_reference
    else:
        approx = "tanh" if op == "geglu_tanh" else "none"
        fast = lambda g, u: geglu(g, u, approx, backend=backend)  # noqa: E731
        ref = lambda g, u: geglu_reference(g, u, approx)  # noqa: E731
    got = fast(gate, up)
    want = ref(gate.double(), up.double()).float()  # float64 math, then rounded: the exact value in fp32
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), finite), (gate[finite != torch.isfinite(got)])
    err = (got[finite] - want[finite]).abs()
    tol = 1e-5 * want[finite].abs() + 1e-30
    bad = err > tol
    assert not bad.any(), list(zip(gate[finite][bad].tolist(), got[finite][bad].tolist(), want[finite][bad].tolist()))
    # gradients: where the reference's are finite, equal
    g1, u1 = gate.clone().requires_grad_(), up.clone().requires_grad_()
    fast(g1, u1).sum().backward()
    g2, u2 = gate.double().requires_grad_(), up.double().requires_grad_()
    ref(g2, u2).sum().backward()
    for a, b in ((g1.grad, g2.grad.float()), (u1.grad, u2.grad.float())):
        ok = torch.isfinite(b)
        bad = ~torch.isclose(a[ok], b[ok], rtol=1e-4, atol=1e-30)
        assert not bad.any(), list(zip(gate[ok][bad].tolist(), a[ok][bad].tolist(), b[ok][bad].tolist()))
