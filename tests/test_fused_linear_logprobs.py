"""fused_linear_logprobs: every backend vs the eager reference (log-probs, grad hidden, grad weight), temperature,
ignore_index, chunking, opcheck, torch.compile, autocast, bad input, and the peak-memory promise (fresh process)."""

import sys

import pytest
import torch
import torch.nn.functional as F

import intro2llm.ops as ops
from intro2llm.ops._dispatch import extension_error
from intro2llm.testing import (
    assert_close_to_exact,
    assert_compiled_matches,
    assert_fused_peak_fraction_of_eager,
    backends_for,
    dtypes_for,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FAST = [b for b in backends_for(DEVICE) if b != "reference"]
# (token shape, H, V, chunk_size, temperature): one token; odd (B, T) with an uneven last chunk; V=32000
SHAPES = [((1,), 16, 131, None, 1.0), ((3, 7), 24, 131, 4, 0.7), ((2, 3), 32, 32000, 2, 1.0)]


CASES = [(b, s, d) for b in FAST for s in SHAPES for d in dtypes_for(b, DEVICE)]
IDS = [f"{b}-{'x'.join(map(str, s[0]))}x{s[1]}-V{s[2]}-T{s[4]}-{str(d)[6:]}" for b, s, d in CASES]


def _inputs(tokens, H, V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*tokens, H, generator=g).to(DEVICE, dtype)
    w = (torch.randn(V, H, generator=g) / H**0.5).to(DEVICE, dtype)
    t = torch.randint(0, V, tokens, generator=g)
    t.view(-1)[1::4] = -100
    return h, w, t.to(DEVICE)


def _run(fn, h, w, t):
    leaves = [x.detach().clone().requires_grad_() for x in (h, w)]
    out = fn(leaves[0], leaves[1], t)
    up = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, out.dtype)
    out.backward(up)
    return [out.detach(), leaves[0].grad, leaves[1].grad]


def test_reference_known_answer():
    # two classes with logits (0, log 3): p = (1/4, 3/4); temperature 2 halves the logits
    h = torch.tensor([[1.0], [1.0], [1.0]])
    w = torch.tensor([[0.0], [torch.log(torch.tensor(3.0)).item()]])
    t = torch.tensor([0, 1, -100])
    got = ops.fused_linear_logprobs_reference(h, w, t)
    torch.testing.assert_close(got, torch.tensor([-torch.log(torch.tensor(4.0)).item(),
                                                  torch.log(torch.tensor(0.75)).item(), 0.0]))
    hot = ops.fused_linear_logprobs_reference(h, w, t, temperature=2.0)
    p1 = 3**0.5 / (1 + 3**0.5)
    torch.testing.assert_close(hot, torch.tensor([torch.log(torch.tensor(1 - p1)).item(),
                                                  torch.log(torch.tensor(p1)).item(), 0.0]))


def test_reference_matches_log_softmax_gather():
    h, w, t = _inputs((4, 5), 12, 37, torch.float64)
    got = _run(lambda h_, w_, t_: ops.fused_linear_logprobs(h_, w_, t_, temperature=1.3), h, w, t)

    def eager(h_, w_, t_):
        lp = torch.log_softmax(F.linear(h_, w_) / 1.3, -1).gather(-1, t_.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return lp * (t_ != -100)

    for g_, w_ in zip(got, _run(eager, h, w, t)):
        torch.testing.assert_close(g_.double(), w_.double())
    assert got[0].dtype == torch.float32


@pytest.mark.parametrize("backend,shape,dtype", CASES, ids=IDS)
def test_backend_matches_reference(backend, shape, dtype):
    tokens, H, V, chunk, temp = shape
    h, w, t = _inputs(tokens, H, V, dtype)

    def fast(h_, w_, t_):
        return ops.fused_linear_logprobs(h_, w_, t_, temperature=temp, chunk_size=chunk, backend=backend)

    def ref(h_, w_, t_):
        return ops.fused_linear_logprobs_reference(h_, w_, t_, temperature=temp)

    got, want = _run(fast, h, w, t), _run(ref, h, w, t)
    exact = _run(ref, h.double(), w.double(), t)
    for name, f, r, e in zip(("logp", "grad_hidden", "grad_weight"), got, want, exact):
        assert f.dtype == r.dtype, f"{name}: dtype {f.dtype} != reference {r.dtype}"
        # the row kernels sum V exponentials in fp32 lanes (ATen's log_softmax sums more accurately): lse, hence
        # every softmax value, carries an error growing like sqrt(V) ulps, which the floor allows
        scale = max(e.abs().max().item(), 1.0) if e.numel() else 1.0
        floor = 8 * torch.finfo(f.dtype).eps * scale * max(1.0, (V / 1000) ** 0.5)
        assert_close_to_exact(f, r, e.to(f.dtype).double(), floor=floor, name=name)
    ignored = t == -100
    assert torch.equal(got[0][ignored], torch.zeros_like(got[0][ignored])), "ignored positions must give 0"
    assert bool((got[0][~ignored] < 0).all()), "log-probs of kept positions must be negative"


@pytest.mark.parametrize("backend", FAST)
def test_chunk_sizes_agree(backend):
    h, w, t = _inputs((37,), 20, 300, torch.float32)
    want = _run(lambda *a: ops.fused_linear_logprobs_reference(*a, temperature=0.5), h, w, t)
    for chunk in (5, 16, None, 1000):
        got = _run(lambda *a, c=chunk: ops.fused_linear_logprobs(*a, temperature=0.5, chunk_size=c, backend=backend),
                   h, w, t)
        for g_, w_ in zip(got, want):
            torch.testing.assert_close(g_, w_, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference"] + FAST)
def test_all_ignored_and_empty(backend):
    h, w, t = _inputs((6,), 8, 20, torch.float32)
    got = _run(lambda *a: ops.fused_linear_logprobs(*a, ignore_index=-7, backend=backend), h, w, torch.full_like(t, -7))
    assert torch.equal(got[0], torch.zeros(6, device=DEVICE)), "every position ignored: all log-probs 0"
    assert torch.equal(got[1], torch.zeros_like(h)) and torch.equal(got[2], torch.zeros_like(w)), "zero gradients"
    empty = _run(lambda *a: ops.fused_linear_logprobs(*a, backend=backend), h[:0], w, t[:0])
    assert empty[0].shape == (0,) and torch.equal(empty[2], torch.zeros_like(w))


@pytest.mark.parametrize("backend", FAST)
def test_inputs_untouched_and_no_grad(backend):
    h, w, t = _inputs((9,), 8, 20, torch.float32)
    keep = [x.clone() for x in (h, w, t)]
    with torch.no_grad():
        out = ops.fused_linear_logprobs(h, w, t, backend=backend)
    torch.testing.assert_close(out, ops.fused_linear_logprobs_reference(h, w, t))
    for x, k in zip((h, w, t), keep):
        assert torch.equal(x, k)


# ---- registration ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", FAST)
def test_opcheck(backend):
    h, w, t = _inputs((6,), 8, 20, torch.float32)
    fwd = torch.ops.intro2llm.fused_linear_logprobs_fwd.default
    torch.library.opcheck(fwd, (h.requires_grad_(), w.requires_grad_(), t, -100, 0.8, 4, backend))
    bwd = torch.ops.intro2llm.fused_linear_logprobs_bwd.default
    torch.library.opcheck(bwd, (torch.randn(6, device=DEVICE), h.detach(), w.detach(), t, -100, 0.8, 4, backend))


@pytest.mark.parametrize("backend", FAST + ["auto"])
def test_torch_compile_fullgraph(backend):
    h, w, t = _inputs((3, 5), 16, 50, torch.float32)
    bk = None if backend == "auto" else backend
    assert_compiled_matches(
        lambda h_, w_, t_: ops.fused_linear_logprobs(h_ * 2, w_, t_, temperature=0.9, chunk_size=4, backend=bk).sum(-1),
        lambda h_, w_, t_: ops.fused_linear_logprobs_reference(h_ * 2, w_, t_, temperature=0.9).sum(-1),
        lambda f: _run(f, h, w, t), 1e-5)


@pytest.mark.parametrize("backend", ["reference"] + [b for b in backends_for("cpu") if b == "cpp"])
def test_cpu_bf16_autocast(backend):
    h, w, t = _inputs((2, 9), 32, 70, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _run(lambda *a: ops.fused_linear_logprobs(*a, backend=backend), h.cpu(), w.cpu(), t.cpu())
    want = _run(lambda h_, w_, t_: ops.fused_linear_logprobs_reference(h_.bfloat16(), w_, t_), h.cpu(), w.cpu(),
                t.cpu())
    assert got[0].dtype == torch.float32 and got[2].dtype == torch.float32
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_, w_.to(g_.dtype), atol=2e-2, rtol=2e-2)


# ---- bad input ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference"] + FAST)
def test_bad_input(backend):
    h, w, t = _inputs((4,), 8, 20, torch.float32)

    def call(**kw):
        args = dict(hidden=h, weight=w, targets=t)
        args.update(kw)
        opts = {k: args.pop(k) for k in ("temperature", "ignore_index", "chunk_size") if k in args}
        return ops.fused_linear_logprobs(args["hidden"], args["weight"], args["targets"], backend=backend, **opts)

    with pytest.raises(ValueError, match=r"weight must have shape \(V, 8\)"):
        call(weight=w[:, :5])
    with pytest.raises(ValueError, match="targets shape"):
        call(targets=t[:3])
    with pytest.raises(TypeError, match="targets must be an int64"):
        call(targets=t.float())
    with pytest.raises(ValueError, match="outside"):
        call(targets=torch.tensor([0, 1, 20, 3], device=DEVICE))
    with pytest.raises(ValueError, match="temperature"):
        call(temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        call(chunk_size=0)


# ---- the memory promise ------------------------------------------------------------------------------------------
_MEM_STEP = r"""
def step(h, w, t):
    if kind == "eager":
        lp = torch.log_softmax(torch.nn.functional.linear(h, w).float(), -1).gather(-1, t[:, None]).squeeze(-1)
    else:
        lp = ops.fused_linear_logprobs(h, w, t, backend="cpp")
    (lp * torch.linspace(-1, 1, lp.numel())).sum().backward()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak memory is read from /proc (Linux only)")
@pytest.mark.skipif(extension_error() is not None, reason=f"cpp backend: {extension_error()}")
def test_peak_memory_fraction_of_eager():
    assert_fused_peak_fraction_of_eager(_MEM_STEP, 1024, 64, 16000, fraction=0.25)
