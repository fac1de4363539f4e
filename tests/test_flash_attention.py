"""flash_attention: references against SDPA with an explicit mask, every fast backend against the fp64 reference
(output and the gradients of q, k, v), key padding masks, opcheck, torch.compile, bad input.

Grid: MHA/GQA/MQA × causal/non-causal × window × Tq ≠ Tk (decoding) × odd lengths (1, 17, 113, 257) × head dims.
Triton runs in the interpreter on CPU (conftest sets TRITON_INTERPRET=1 without a GPU), so its cases are small.
"""

import pytest
import torch
import torch.nn.functional as F

import intro2llm.ops as ops
from intro2llm.ops import BackendUnavailableError
from intro2llm.ops._dispatch import extension_error
from intro2llm.ops.flash_attention import attention_mask
from intro2llm.testing import assert_compiled_matches, backends_for, randn_tensors

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FAST = [b for b in backends_for(DEVICE, ("reference", "triton", "cpp", "cuda")) if b != "reference"]
INTERPRETED = DEVICE == "cpu"  # Triton through the interpreter: keep its shapes small
TOL = {torch.float32: 3e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}

# (B, H, Hkv, Tq, Tk, D, causal, window)
CASES_BIG = [
    (2, 4, 4, 17, 17, 64, True, None),  # MHA causal
    (1, 8, 2, 113, 113, 32, True, None),  # GQA causal
    (1, 4, 1, 257, 257, 64, True, 64),  # MQA sliding window
    (2, 4, 2, 113, 113, 128, False, None),  # GQA bidirectional
    (1, 4, 2, 47, 47, 16, False, 9),  # symmetric window
    (2, 4, 2, 1, 257, 64, True, None),  # decoding: one query, bottom-right aligned
    (1, 4, 4, 17, 113, 32, True, 40),  # chunked prefill with a cache and a window
    (1, 2, 1, 113, 17, 64, False, None),  # Tq > Tk without a mask
]
CASES_SMALL = [
    (1, 2, 2, 17, 17, 16, True, None),
    (1, 4, 2, 17, 33, 32, True, 5),
    (2, 2, 1, 1, 17, 16, True, None),
    (1, 4, 1, 20, 20, 64, False, 7),
    (1, 2, 2, 31, 9, 16, False, None),
]


def _dtypes(backend):
    # bf16 arithmetic is wrong in the Triton CPU interpreter; bf16 Triton runs on GPU only.
    if backend == "triton" and INTERPRETED:
        return [torch.float32, torch.float16]
    return [torch.float32, torch.float16, torch.bfloat16]


def _cases(backend):
    if backend == "triton" and INTERPRETED:
        return [(c, torch.float32) for c in CASES_SMALL] + [(CASES_SMALL[1], torch.float16)]
    out = [(c, torch.float32) for c in CASES_BIG]
    out += [(CASES_BIG[1], d) for d in _dtypes(backend) if d != torch.float32]
    out += [(CASES_BIG[2], d) for d in _dtypes(backend) if d != torch.float32]
    return out


FAST_CASES = [(b, c, d) for b in FAST for c, d in _cases(b)]


def _ids(cases):
    return [f"{b}-{'x'.join(str(x) for x in c[:6])}-{'c' if c[6] else 'nc'}-w{c[7]}-{str(d)[6:]}" for b, c, d in cases]


def _inputs(B, H, Hkv, Tq, Tk, D, dtype=torch.float32, seed=0):
    """q, k, v and the upstream gradient of the output."""
    q_shape, kv_shape = (B, H, Tq, D), (B, Hkv, Tk, D)
    return randn_tensors(q_shape, kv_shape, kv_shape, q_shape, dtype=dtype, device=DEVICE, seed=seed)


def _run(fn, q, k, v, do):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o = fn(q, k, v)
    o.backward(do)
    return o.detach(), q.grad, k.grad, v.grad


def _sdpa(q, k, v, causal, window, kpm=None):
    """torch's SDPA with an explicit boolean mask and K/V repeated per group: the independent oracle."""
    H = q.shape[1]
    g = H // k.shape[1]
    mask = attention_mask(q.shape[2], k.shape[2], causal, window, kpm, device=q.device)
    return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=mask)


# ---- references -------------------------------------------------------------------------------------------------
def test_reference_known_answer():
    # one query, keys k0=[1,0], k1=[0,1], q=[ln 3, 0], scale 1 → weights softmax([ln 3, 0]) = [3/4, 1/4]
    q = torch.tensor([[[[torch.log(torch.tensor(3.0)).item(), 0.0]]]])
    k = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    v = torch.tensor([[[[4.0, 8.0], [0.0, -4.0]]]])
    out = ops.flash_attention_reference(q, k, v, causal=True, scale=1.0)
    torch.testing.assert_close(out, torch.tensor([[[[3.0, 5.0]]]]))
    # window=1 keeps only the key at the query's own position (the last one, bottom-right alignment)
    torch.testing.assert_close(ops.flash_attention_reference(q, k, v, True, window=1, scale=1.0), v[:, :, 1:])


def test_mask_rule():
    # Tq=2 queries at positions 2, 3 of Tk=4 keys; window 2 keeps q_pos - 2 < k_pos <= q_pos
    want = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(attention_mask(2, 4, causal=True, window=2), want)
    want_nc = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]], dtype=torch.bool)  # symmetric without causal
    assert torch.equal(attention_mask(2, 4, causal=False, window=2), want_nc)


@pytest.mark.parametrize("case", CASES_BIG, ids=_ids([("ref", c, torch.float64) for c in CASES_BIG]))
def test_references_match_sdpa(case):
    B, H, Hkv, Tq, Tk, D, causal, window = case
    q, k, v, do = _inputs(B, H, Hkv, Tq, Tk, D, torch.float64)
    want = _run(lambda a, b, c: _sdpa(a, b, c, causal, window), q, k, v, do)
    got = _run(lambda a, b, c: ops.flash_attention_reference(a, b, c, causal, window), q, k, v, do)
    for name, g_, w_ in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(g_, w_, atol=1e-10, rtol=1e-10, msg=name)
    tiled = ops.flash_attention_tiled_reference(q, k, v, causal, window, block_q=16, block_k=32)
    torch.testing.assert_close(tiled, want[0], atol=1e-10, rtol=1e-10)


def test_tiled_reference_gradients_and_padding():
    q, k, v, do = _inputs(2, 4, 2, 20, 29, 16, torch.float64)
    kpm = torch.ones(2, 29, dtype=torch.bool)
    kpm[0, :12] = False  # left padding
    want = _run(lambda a, b, c: ops.flash_attention_reference(a, b, c, True, 6, key_padding_mask=kpm), q, k, v, do)
    got = _run(
        lambda a, b, c: ops.flash_attention_tiled_reference(a, b, c, True, 6, key_padding_mask=kpm, block_q=8),
        q, k, v, do,
    )  # fmt: skip
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_, w_, atol=1e-10, rtol=1e-10)


def test_fully_masked_rows_are_zero_not_nan():
    q, k, v, do = _inputs(1, 2, 2, 4, 4, 16, torch.float64)
    kpm = torch.tensor([[False, False, True, True]])  # queries 0, 1 see only padding under the causal mask
    o, dq, dk, dv = _run(lambda a, b, c: ops.flash_attention(a, b, c, key_padding_mask=kpm), q, k, v, do)
    assert torch.isfinite(o).all() and torch.isfinite(dq).all()
    assert (o[:, :, :2] == 0).all() and (dq[:, :, :2] == 0).all()
    torch.testing.assert_close(o[:, :, 2:], _sdpa(q, k, v, True, None, kpm)[:, :, 2:])


# ---- fast backends ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,case,dtype", FAST_CASES, ids=_ids(FAST_CASES))
def test_backend_matches_reference(backend, case, dtype):
    B, H, Hkv, Tq, Tk, D, causal, window = case
    q, k, v, do = _inputs(B, H, Hkv, Tq, Tk, D, dtype)
    fast = _run(lambda a, b, c: ops.flash_attention(a, b, c, causal, window, backend=backend), q, k, v, do)
    exact = _run(
        lambda a, b, c: ops.flash_attention_reference(a, b, c, causal, window), q.double(), k.double(), v.double(),
        do.double(),
    )  # fmt: skip
    tol = TOL[dtype]
    for name, f, e in zip(("out", "dq", "dk", "dv"), fast, exact):
        assert f.dtype == dtype and f.shape == e.shape, f"{name}: {f.dtype} {tuple(f.shape)}"
        scale = max(1.0, e.abs().max().item())
        torch.testing.assert_close(f.double(), e, atol=tol * scale, rtol=tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("backend", FAST)
def test_key_padding_mask(backend):
    B, H, Hkv, T, D = 3, 4, 2, 19, 32
    q, k, v, do = _inputs(B, H, Hkv, T, T, D)
    kpm = torch.ones(B, T, dtype=torch.bool, device=DEVICE)
    kpm[0, :7] = False  # left-padded rows: padding queries see nothing under the causal mask
    kpm[1, :1] = False
    fast = _run(lambda a, b, c: ops.flash_attention(a, b, c, key_padding_mask=kpm, backend=backend), q, k, v, do)
    ref = _run(lambda a, b, c: ops.flash_attention_reference(a, b, c, key_padding_mask=kpm), q, k, v, do)
    for name, f, r in zip(("out", "dq", "dk", "dv"), fast, ref):
        torch.testing.assert_close(f, r, atol=3e-5, rtol=3e-5, msg=lambda m, n=name: f"{n}: {m}")
    assert (fast[0][0, :, :7] == 0).all()


@pytest.mark.parametrize("backend", FAST)
def test_non_contiguous_inputs(backend):
    # (B, T, H, D) projections transposed to (B, H, T, D), as the attention module does
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 17, 4, 16, generator=g).to(DEVICE).transpose(1, 2)
    k = torch.randn(2, 17, 2, 16, generator=g).to(DEVICE).transpose(1, 2)
    v = torch.randn(2, 17, 2, 16, generator=g).to(DEVICE).transpose(1, 2)
    do = torch.randn(2, 4, 17, 16, generator=g).to(DEVICE)
    assert not q.is_contiguous()
    fast = _run(lambda a, b, c: ops.flash_attention(a, b, c, backend=backend), q, k, v, do)
    ref = _run(ops.flash_attention_reference, q, k, v, do)
    for f, r in zip(fast, ref):
        torch.testing.assert_close(f, r, atol=3e-5, rtol=3e-5)


@pytest.mark.skipif(extension_error() is not None, reason=f"cpp backend: {extension_error()}")
def test_opcheck_compiled():
    q, k, v, do = _inputs(1, 4, 2, 9, 13, 16)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), True, 4, 0.25, None)
    torch.library.opcheck(torch.ops.intro2llm.flash_attention_fwd.default, args)
    kpm = torch.ones(1, 13, dtype=torch.bool, device=DEVICE)
    out, lse = torch.ops.intro2llm.flash_attention_fwd(q, k, v, True, -1, 0.25, kpm)
    bwd_args = (do, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), True, -1, 0.25, kpm)
    torch.library.opcheck(torch.ops.intro2llm.flash_attention_bwd.default, bwd_args)


# The C++ forward packs up to 32 query rows (across the query heads of a kv group) into vector lanes, and takes
# thin blocks (<= 8 rows: decoding) through a row path. These shapes cross its seams: more than 32 heads per kv head
# (several tasks per group), 3 heads per group (rows of two heads in one 16-lane slab), one-slab blocks (9-16 rows),
# a thin tail block next to full ones, a window narrower than a slab, key padding, and keys past a block's last
# 8-key group.
CPP_LANE_CASES = [  # (B, H, Hkv, Tq, Tk, D, causal, window)
    (1, 40, 1, 20, 20, 16, True, None),
    (2, 6, 2, 100, 100, 32, True, 17),
    (1, 12, 1, 1, 70, 64, True, None),
    (1, 8, 1, 2, 45, 32, True, 5),
    (1, 2, 2, 33, 33, 64, True, 3),
    (1, 3, 1, 70, 300, 128, True, 40),
    (2, 4, 4, 77, 77, 16, False, 30),
]


@pytest.mark.skipif(extension_error() is not None, reason=f"cpp backend: {extension_error()}")
@pytest.mark.parametrize("case", CPP_LANE_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("padded", [False, True], ids=["", "kpm"])
def test_cpp_forward_block_layouts(case, padded):
    B, H, Hkv, Tq, Tk, D, causal, window = case
    q, k, v, _ = _inputs(B, H, Hkv, Tq, Tk, D, seed=3)
    kpm = None
    if padded:
        kpm = torch.rand(B, Tk, generator=torch.Generator().manual_seed(4)) > 0.3
        kpm[:, -1] = True  # the last key stays visible: every causal row sees something
    got = ops.flash_attention(q, k, v, causal, window, key_padding_mask=kpm, backend="cpp")
    want = ops.flash_attention_reference(
        q.double(), k.double(), v.double(), causal, window, key_padding_mask=kpm
    )  # fmt: skip
    torch.testing.assert_close(got.double(), want, atol=3e-5, rtol=3e-5)
    _, lse = torch.ops.intro2llm.flash_attention_fwd(q, k, v, causal, window or -1, D**-0.5, kpm)
    mask = attention_mask(Tq, Tk, causal, window, kpm)  # True = visible, (B or 1, 1, Tq, Tk)
    s = (q.double() @ k.double().repeat_interleave(H // Hkv, 1).transpose(-1, -2)) * D**-0.5
    want_lse = s.masked_fill(~mask, float("-inf")).logsumexp(-1)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif("triton" not in FAST, reason="triton backend unavailable on this machine")
def test_opcheck_triton():
    q, k, v, _ = _inputs(1, 2, 1, 9, 13, 16)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), True, -1, 0.25, None)
    torch.library.opcheck(torch.ops.intro2llm.flash_attention_fwd_triton.default, args)


@pytest.mark.parametrize("backend", FAST + ["auto"])
def test_torch_compile_fullgraph(backend):
    q, k, v, do = _inputs(1, 4, 2, 17, 17, 32)
    bk = None if backend == "auto" else backend
    assert_compiled_matches(lambda a, b, c: ops.flash_attention(a, b, c, causal=True, window=8, backend=bk) * 2,
                            lambda a, b, c: ops.flash_attention_reference(a, b, c, True, 8) * 2,
                            lambda f: _run(f, q, k, v, do), 5e-5)


def test_auto_falls_back_for_head_dims_fast_paths_lack():
    q, k, v, _ = _inputs(1, 2, 2, 5, 5, 24)  # head_dim 24: reference only
    torch.testing.assert_close(ops.flash_attention(q, k, v), ops.flash_attention_reference(q, k, v))
    q64, k64, v64 = (t.double() for t in (q, k, v))
    torch.testing.assert_close(ops.flash_attention(q64, k64, v64), ops.flash_attention_reference(q64, k64, v64))


# ---- bad input --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference"] + FAST)
def test_bad_input(backend):
    q, k, v, _ = _inputs(2, 4, 2, 8, 8, 16)
    fa = ops.flash_attention
    with pytest.raises(ValueError, match=r"batch sizes differ.*\(2, 4, 8, 16\).*\(1, 2, 8, 16\)"):
        fa(q, k[:1], v[:1], backend=backend)
    with pytest.raises(ValueError, match=r"head_dim differs.*\(2, 4, 8, 16\).*\(2, 2, 8, 32\)"):
        fa(q, torch.randn(2, 2, 8, 32, device=DEVICE), torch.randn(2, 2, 8, 32, device=DEVICE), backend=backend)
    with pytest.raises(ValueError, match=r"H % Hkv == 0.*H=4.*Hkv=3"):
        fa(q, torch.randn(2, 3, 8, 16, device=DEVICE), torch.randn(2, 3, 8, 16, device=DEVICE), backend=backend)
    with pytest.raises(ValueError, match=r"Tq <= Tk.*Tq=8.*Tk=5"):
        fa(q, k[:, :, :5], v[:, :, :5], causal=True, backend=backend)
    with pytest.raises(ValueError, match=r"window must be >= 1.*got 0"):
        fa(q, k, v, window=0, backend=backend)
    with pytest.raises(TypeError, match="int64"):
        fa(q.long(), k.long(), v.long(), backend=backend)
    with pytest.raises(ValueError, match=r"4-D \(B, H, T, D\).*\(4, 8, 16\)"):
        fa(q[0], k, v, backend=backend)
    with pytest.raises(ValueError, match=r"k and v must have the same shape"):
        fa(q, k, v[:, :, :4], backend=backend)
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(B, Tk\) = \(2, 8\)"):
        fa(q, k, v, key_padding_mask=torch.ones(2, 7, dtype=torch.bool, device=DEVICE), backend=backend)
    with pytest.raises(TypeError, match="q, k, v must share a dtype"):
        fa(q, k.half(), v.half(), backend=backend)


@pytest.mark.parametrize("backend", FAST)
def test_fast_path_rejects_unsupported_head_dim(backend):
    q, k, v, _ = _inputs(1, 2, 2, 5, 5, 24)
    with pytest.raises(ValueError, match=r"head_dim in \(16, 32, 64, 128\), got head_dim=24"):
        ops.flash_attention(q, k, v, backend=backend)
    with pytest.raises(TypeError, match="float64"):
        ops.flash_attention(q.double(), k.double(), v.double(), backend=backend)


def test_explicit_backend_that_cannot_run_names_the_reason():
    q, k, v, _ = _inputs(1, 2, 2, 5, 5, 16)
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match="cuda"):
            ops.flash_attention(q, k, v, backend="cuda")
