"""layer_norm op and the RMSNorm/LayerNorm modules against torch.nn."""

import pytest
import torch

import intro2llm.ops as ops
from intro2llm.model.norm import LayerNorm, RMSNorm
from intro2llm.testing import assert_close_to_exact, backends_for

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FAST = [b for b in backends_for(DEVICE, ("reference", "triton")) if b != "reference"]


def test_reference_equals_torch_layer_norm():
    x, w, b = torch.randn(3, 47, 131), torch.randn(131), torch.randn(131)
    torch.testing.assert_close(ops.layer_norm_reference(x, w, b, 1e-5), torch.nn.functional.layer_norm(x, (131,), w, b))


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("shape", [(3, 47, 131), (1, 8), (6, 1000)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fast_matches_reference(backend, shape, bias, dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g).to(DEVICE, dtype)
    w = torch.randn(shape[-1], generator=g).to(DEVICE, dtype)
    b = torch.randn(shape[-1], generator=g).to(DEVICE, dtype) if bias else None
    dy = torch.randn(shape, generator=g).to(DEVICE, dtype)

    def run(fn, *ts):
        ts = [t.detach().clone().requires_grad_() if t is not None else None for t in ts]
        y = fn(*ts)
        y.backward(dy.to(y.dtype))
        return [y.detach()] + [t.grad for t in ts if t is not None]

    fast = run(lambda a, c, d: ops.layer_norm(a, c, d, backend=backend), x, w, b)
    ref = run(ops.layer_norm_reference, x, w, b)
    exact = run(ops.layer_norm_reference, x.double(), w.double(), None if b is None else b.double())
    for name, f, r, e in zip(("y", "dx", "dw", "db"), fast, ref, exact):
        assert_close_to_exact(f, r, e.to(f.dtype).double(), name=name)


def test_modules_match_torch_nn():
    x = torch.randn(2, 5, 64, requires_grad=True)
    ours, theirs = LayerNorm(64), torch.nn.LayerNorm(64)
    torch.testing.assert_close(ours(x), theirs(x))
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    rms = RMSNorm(64, eps=1e-6)
    y = rms(x)
    torch.testing.assert_close(y.pow(2).mean(-1), torch.ones(2, 5), atol=1e-4, rtol=1e-4)  # unit RMS
    y.sum().backward()
    assert rms.weight.grad is not None and x.grad is not None


def test_layer_norm_bad_bias():
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        ops.layer_norm(torch.randn(2, 8), torch.ones(8), torch.ones(3))
