"""apply_rope: every backend against the reference (outputs + gradients of q, k, cos, sin), the Hugging Face
Llama oracle, GQA, per-batch tables (decoding offsets / left padding), strided inputs, opcheck, compile, bad input.
"""

import pytest
import torch

import intro2llm.ops as ops
from intro2llm.ops._dispatch import extension_error
from intro2llm.testing import assert_close_to_exact, assert_compiled_matches, backends_for, dtypes_for, randn_tensors

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FAST = [b for b in backends_for(DEVICE) if b != "reference"]
# (B, H, Hkv, T, D, table): table "shared" (T, D), "batch" (B, T, D), "one" (1, T, D), "hf" (B, 1, T, D)
CASES = [
    (2, 4, 2, 5, 16, "shared"),
    (1, 3, 1, 1, 8, "batch"),  # T = 1: one decoding step
    (3, 6, 3, 7, 34, "batch"),  # odd half (17), GQA 2:1
    (2, 5, 5, 3, 6, "one"),  # MHA, tiny head_dim
    (2, 8, 1, 4, 64, "hf"),  # MQA
]


def _tables(B, T, D, kind, seed=0, offsets=None):
    """Llama-style cos/sin (both halves equal) for positions offset per batch row (left padding / decoding)."""
    g = torch.Generator().manual_seed(seed)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))  # (D/2,)
    if offsets is None:
        offsets = torch.randint(0, 50, (B,), generator=g)
    rows = B if kind in ("batch", "hf") else 1
    pos = offsets[:rows, None].double() + torch.arange(T, dtype=torch.float64)  # (rows, T)
    ang = pos[..., None] * inv_freq  # (rows, T, D/2)
    emb = torch.cat((ang, ang), dim=-1)  # (rows, T, D)
    cos, sin = emb.cos().float(), emb.sin().float()
    if kind == "shared":
        cos, sin = cos[0], sin[0]
    elif kind == "hf":
        cos, sin = cos[:, None], sin[:, None]
    return cos.to(DEVICE), sin.to(DEVICE)


def _inputs(B, H, Hkv, T, D, dtype, seed=0):
    """q, k and the upstream gradients of both outputs."""
    q_shape, k_shape = (B, H, T, D), (B, Hkv, T, D)
    return randn_tensors(q_shape, k_shape, q_shape, k_shape, dtype=dtype, device=DEVICE, seed=seed)


def _run(fn, q, k, cos, sin, dq, dk, table_grad=False):
    q = q.detach().clone().requires_grad_()
    k = k.detach().clone().requires_grad_()
    cos = cos.detach().clone().requires_grad_(table_grad)
    sin = sin.detach().clone().requires_grad_(table_grad)
    qo, ko = fn(q, k, cos, sin)
    torch.autograd.backward((qo, ko), (dq, dk))
    out = [qo.detach(), ko.detach(), q.grad, k.grad]
    if table_grad:
        out += [cos.grad, sin.grad]
    return out


def test_reference_known_answer():
    # a 2-D rotation: (1, 0) turned by theta is (cos theta, sin theta); (0, 1) goes to (-sin theta, cos theta)
    th = torch.tensor(0.3)
    cos = torch.full((1, 2), th.cos().item())
    sin = torch.full((1, 2), th.sin().item())
    q = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    k = torch.tensor([0.0, 1.0]).view(1, 1, 1, 2)
    qo, ko = ops.apply_rope_reference(q, k, cos, sin)
    torch.testing.assert_close(qo.flatten(), torch.stack([th.cos(), th.sin()]))
    torch.testing.assert_close(ko.flatten(), torch.stack([-th.sin(), th.cos()]))


def test_reference_matches_hugging_face_llama():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q, k, _, _ = _inputs(2, 4, 2, 5, 16, torch.float32)
    cos, sin = _tables(2, 5, 16, "batch")
    want = apply_rotary_pos_emb(q.cpu(), k.cpu(), cos.cpu(), sin.cpu())  # unsqueezes the head dim itself
    got = ops.apply_rope(q, k, cos, sin, backend="reference")
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_.cpu(), w_, atol=1e-6, rtol=1e-6)


def test_relative_position_property():
    # RoPE's point: <rope(q, m), rope(k, n)> depends on m - n only
    q, k, _, _ = _inputs(1, 1, 1, 1, 32, torch.float64)
    dots = []
    for m in (3, 10):
        cq, sq = _tables(1, 1, 32, "batch", offsets=torch.tensor([m]))
        ck, sk = _tables(1, 1, 32, "batch", offsets=torch.tensor([m - 2]))
        qo = ops.apply_rope(q, q, cq.double(), sq.double())[0]
        ko = ops.apply_rope(k, k, ck.double(), sk.double())[0]
        dots.append((qo * ko).sum().item())
    assert abs(dots[0] - dots[1]) < 1e-5  # fp32 tables


PARAMS = [(b, c, d) for b in FAST for c in CASES for d in dtypes_for(b, DEVICE)]
CASE_IDS = [f"{b}-B{c[0]}H{c[1]}kv{c[2]}T{c[3]}D{c[4]}{c[5]}-{str(d)[6:]}" for b, c, d in PARAMS]


@pytest.mark.parametrize("backend,case,dtype", PARAMS, ids=CASE_IDS)
def test_backend_matches_reference(backend, case, dtype):
    B, H, Hkv, T, D, kind = case
    q, k, dq, dk = _inputs(B, H, Hkv, T, D, dtype)
    cos, sin = _tables(B, T, D, kind)  # fp32 tables with low-precision activations, as in the model
    fast = _run(lambda *a: ops.apply_rope(*a, backend=backend), q, k, cos, sin, dq, dk)
    ref = _run(ops.apply_rope_reference, q, k, cos, sin, dq, dk)
    exact = _run(ops.apply_rope_reference, q.double(), k.double(), cos.double(), sin.double(), dq.double(), dk.double())
    for name, f, r, e in zip(("q_out", "k_out", "grad_q", "grad_k"), fast, ref, exact):
        assert f.dtype == r.dtype == dtype, f"{name}: dtype {f.dtype} != {dtype}"
        assert f.is_contiguous()
        assert_close_to_exact(f, r, e, name=name)


@pytest.mark.parametrize("backend", FAST)
def test_general_tables_and_their_gradients(backend):
    # random (not Llama-structured) tables: the backward must be the exact transpose, not "rope with -sin"
    q, k, dq, dk = _inputs(2, 3, 1, 4, 10, torch.float32, seed=3)
    g = torch.Generator().manual_seed(4)
    cos = torch.randn(2, 4, 10, generator=g).to(DEVICE)
    sin = torch.randn(2, 4, 10, generator=g).to(DEVICE)
    fast = _run(lambda *a: ops.apply_rope(*a, backend=backend), q, k, cos, sin, dq, dk, table_grad=True)
    ref = _run(ops.apply_rope_reference, q, k, cos, sin, dq, dk, table_grad=True)
    for name, f, r in zip(("q_out", "k_out", "grad_q", "grad_k", "grad_cos", "grad_sin"), fast, ref):
        torch.testing.assert_close(f, r, atol=1e-5, rtol=1e-5, msg=name)
    # a shared (T, D) table gets its gradient summed over the batch
    fast = _run(lambda *a: ops.apply_rope(*a, backend=backend), q, k, cos[0], sin[0], dq, dk, table_grad=True)
    ref = _run(ops.apply_rope_reference, q, k, cos[0], sin[0], dq, dk, table_grad=True)
    for f, r in zip(fast[4:], ref[4:]):
        assert f.shape == (4, 10)
        torch.testing.assert_close(f, r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", FAST)
def test_strided_inputs(backend):
    # (B, T, H, D).transpose(1, 2): what attention produces from a fused projection; and a D stride of 2
    B, T, H, Hkv, D = 2, 5, 4, 2, 16
    g = torch.Generator().manual_seed(5)
    q = torch.randn(B, T, H, D, generator=g).to(DEVICE).transpose(1, 2)
    k = torch.randn(B, Hkv, T, 2 * D, generator=g).to(DEVICE)[..., ::2]
    assert not q.is_contiguous() and k.stride(-1) == 2
    dq = torch.randn(B, H, T, D, generator=g).to(DEVICE)
    dk = torch.randn(B, Hkv, T, D, generator=g).to(DEVICE)
    cos, sin = _tables(B, T, D, "batch")
    fast = _run(lambda *a: ops.apply_rope(*a, backend=backend), q, k, cos, sin, dq, dk)
    ref = _run(ops.apply_rope_reference, q.contiguous(), k.contiguous(), cos, sin, dq, dk)
    for f, r in zip(fast, ref):
        torch.testing.assert_close(f, r, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", ["reference"] + FAST)
def test_decoding_step_matches_full_sequence(backend):
    # left-padded batch: row 1 starts 3 positions later; the last step computed alone with its offset table
    # must equal the last position of the full-sequence call
    B, H, Hkv, T, D = 2, 4, 2, 6, 16
    q, k, _, _ = _inputs(B, H, Hkv, T, D, torch.float32, seed=7)
    offsets = torch.tensor([0, 3])
    cos, sin = _tables(B, T, D, "batch", offsets=offsets)
    full_q, full_k = ops.apply_rope(q, k, cos, sin, backend=backend)
    cos1, sin1 = _tables(B, 1, D, "batch", offsets=offsets + T - 1)
    step_q, step_k = ops.apply_rope(q[:, :, -1:], k[:, :, -1:], cos1, sin1, backend=backend)
    torch.testing.assert_close(step_q, full_q[:, :, -1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step_k, full_k[:, :, -1:], atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(extension_error() is not None, reason=f"cpp backend: {extension_error()}")
def test_opcheck_compiled():
    q, k, dq, dk = _inputs(2, 4, 2, 3, 8, torch.float32)
    cos, sin = _tables(2, 3, 8, "batch")
    torch.library.opcheck(
        torch.ops.intro2llm.apply_rope_fwd.default, (q.requires_grad_(), k.requires_grad_(), cos, sin)
    )
    torch.library.opcheck(torch.ops.intro2llm.apply_rope_bwd.default, (dq, dk, cos, sin))


@pytest.mark.skipif("triton" not in FAST, reason="triton backend unavailable on this machine")
def test_opcheck_triton():
    q, k, dq, dk = _inputs(1, 2, 1, 2, 8, torch.float32)
    cos, sin = _tables(1, 2, 8, "one")
    torch.library.opcheck(
        torch.ops.intro2llm.apply_rope_fwd_triton.default, (q.requires_grad_(), k.requires_grad_(), cos, sin)
    )


@pytest.mark.parametrize("backend", FAST + ["auto"])
def test_torch_compile_fullgraph(backend):
    q, k, dq, dk = _inputs(2, 4, 2, 3, 8, torch.float32)
    cos, sin = _tables(2, 3, 8, "shared")
    bk = None if backend == "auto" else backend

    def scaled(rope):  # (q, k) -> (2 q, k + 1) around the op, so that compile traces more than the op alone
        return lambda *a: (lambda o: (o[0] * 2, o[1] + 1))(rope(*a))

    assert_compiled_matches(scaled(lambda *a: ops.apply_rope(*a, backend=bk)), scaled(ops.apply_rope_reference),
                            lambda f: _run(f, q, k, cos, sin, dq, dk), 1e-6)


@pytest.mark.parametrize("backend", ["reference"] + FAST)
def test_bad_input(backend):
    q = torch.randn(2, 4, 5, 8, device=DEVICE)
    k = torch.randn(2, 2, 5, 8, device=DEVICE)
    cos = torch.randn(5, 8, device=DEVICE)

    def call(q_=q, k_=k, c_=cos, s_=cos):
        return ops.apply_rope(q_, k_, c_, s_, backend=backend)

    with pytest.raises(ValueError, match=r"k must have shape \(2, Hkv, 5, 8\).*\(2, 4, 5, 8\).*\(2, 2, 4, 8\)"):
        call(k_=k[:, :, :4])
    with pytest.raises(ValueError, match=r"4-D.*\(4, 5, 8\)"):
        call(q_=q[0])
    with pytest.raises(ValueError, match=r"even.*\(2, 4, 5, 7\)"):
        call(q_=q[..., :7], k_=k[..., :7], c_=cos[:, :7], s_=cos[:, :7])
    with pytest.raises(ValueError, match=r"cos/sin must have shape \(5, 8\).*got \(6, 8\)"):
        bad = torch.randn(6, 8, device=DEVICE)
        call(c_=bad, s_=bad)
    with pytest.raises(ValueError, match=r"same shape.*\(5, 8\) and \(2, 5, 8\)"):
        call(s_=cos.expand(2, 5, 8))
    with pytest.raises(TypeError, match="int64"):
        call(q_=q.long())
    with pytest.raises(TypeError, match=r"share a dtype.*float32.*float16"):
        call(k_=k.half())
    with pytest.raises(ValueError, match="meta"):
        call(c_=cos.to("meta"), s_=cos.to("meta"))
