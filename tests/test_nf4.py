"""NF4: bit-identity with bitsandbytes, every nf4_matmul backend against the reference, opcheck, compile, bad input.

bitsandbytes is the oracle of the format (packed codes, absmax, double quantization, dequantized values).
Triton runs through the interpreter on CPU (conftest sets TRITON_INTERPRET=1 when there is no GPU).
"""

import copy

import pytest
import torch

from intro2llm.ops import nf4 as nf4_mod
from intro2llm.ops.nf4 import NF4Weight, dequantize_tensor, nf4_dequantize, nf4_matmul, nf4_quantize, quantize_tensor
from intro2llm.testing import assert_close_to_exact, assert_compiled_matches, backends_for, output_and_grads

try:
    import bitsandbytes.functional as bnbf
except ImportError:  # the GPU machine may lack it: only the oracle tests need it
    bnbf = None
needs_bnb = pytest.mark.skipif(bnbf is None, reason="bitsandbytes (the NF4 oracle) is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# even last dims (bitsandbytes' fast CPU dequantizer) and odd ones / short last blocks (its generic path)
SHAPES = [(64, 64), (128, 96), (33, 130), (7, 9), (1, 1), (3, 47, 131), (300, 256)]


@pytest.fixture
def no_dynamo():
    # bitsandbytes torch.compile()s its generic dequantizer (odd shapes): seconds per dtype and shape on 2 cores
    with torch.compiler.set_stance("force_eager"):
        yield


def _bnb(w, double_quant):
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    # The blocks run over the flattened weight, so the oracle dequantizes it flat: bitsandbytes 0.50's AVX-512 CPU
    # dequantizer, given the 2-D shape, misplaces the blocks of some shapes (128x96: every value after the second
    # block scaled by the wrong absmax, although its packed codes and absmax equal ours and its own flat result).
    flat = copy.copy(state)
    flat.shape = torch.Size([w.numel()])
    return packed, state, bnbf.dequantize_4bit(packed, flat).reshape(w.shape)


@needs_bnb
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bit_identical_to_bitsandbytes(shape, dtype, double_quant, no_dynamo):
    g = torch.Generator().manual_seed(sum(shape) * 3 + DTYPES.index(dtype))
    w = (torch.randn(shape, generator=g) * torch.rand(shape[-1], generator=g) * 3).to(dtype)
    q = nf4_quantize(w, blocksize=64, double_quant=double_quant)
    packed, state, deq = _bnb(w, double_quant)
    assert torch.equal(q.packed, packed.reshape(-1)), "packed codes differ from bitsandbytes"
    assert torch.equal(q.absmax, state.absmax), "absmax (or its 8-bit codes) differs from bitsandbytes"
    if double_quant:
        assert torch.equal(q.scales, state.state2.absmax), "double-quant scales differ"
        assert torch.equal(q.offset, state.offset), "double-quant offset differs"
    ours = nf4_dequantize(q)
    assert ours.shape == w.shape and ours.dtype == dtype
    assert torch.equal(ours, deq.reshape(shape)), "dequantized values differ from bitsandbytes"


@needs_bnb
def test_dynamic_map_is_bitsandbytes():
    assert torch.equal(nf4_mod.dynamic_map(), bnbf.create_dynamic_map())


@needs_bnb
def test_nf4_code_is_bitsandbytes():
    assert torch.equal(nf4_mod.nf4_code(), bnbf.get_4bit_type("nf4", device="cpu"))


@needs_bnb
def test_ties_and_zero_blocks_match_bitsandbytes(no_dynamo):
    # values exactly half-way between two codes take the lower code; an all-zero block has absmax 0
    mid = nf4_mod._NF4_MIDPOINTS
    w = torch.cat([torch.tensor([1.0]), mid, -mid, torch.zeros(33), torch.zeros(64), torch.randn(64)])
    for dq in (False, True):
        q = nf4_quantize(w, double_quant=dq)
        packed, state, deq = _bnb(w, dq)
        assert torch.equal(q.packed, packed.reshape(-1)) and torch.equal(q.absmax, state.absmax)
        assert torch.equal(nf4_dequantize(q), deq.reshape(-1))
    # the tie rule on its own: midpoint k lies between codes k and k + 1 and maps to k
    idx = torch.stack([quantize_tensor(torch.tensor([1.0, m.item()])).packed[0] & 15 for m in mid])
    assert torch.equal(idx, torch.arange(15, dtype=torch.uint8))


def test_known_answer():
    # block [2, -1, 0.5, 0]: absmax 2, scaled [1, -0.5, 0.25, 0] -> codes [15, 2, 10, 7]
    # -0.5 lies between -0.5251 (code 2) and -0.3949 (code 3), nearer to code 2; 0.25 nearest to 0.2461 (code 10)
    q = quantize_tensor(torch.tensor([2.0, -1.0, 0.5, 0.0]))
    assert q.packed.tolist() == [0xF2, 0xA7]
    assert q.absmax.tolist() == [2.0]
    want = torch.tensor([2.0, -0.5250730514526367 * 2, 0.24611230194568634 * 2, 0.0])
    torch.testing.assert_close(dequantize_tensor(q), want, rtol=0, atol=0)


def test_numel_not_divisible_pads_last_block():
    # 70 elements: one full block and a short block of 6 with its own absmax; odd numel pads a 0-code nibble
    w = torch.randn(70)
    w[64:] *= 100
    q = nf4_quantize(w)
    assert q.absmax.shape == (2,) and q.packed.shape == (35,)
    assert q.absmax[1] == w[64:].abs().max() and q.absmax[0] == w[:64].abs().max()
    q_odd = nf4_quantize(torch.randn(5))
    assert q_odd.packed.shape == (3,) and (q_odd.packed[2] & 15).item() == 7
    assert nf4_dequantize(q_odd).shape == (5,)
    # zero padding gives the same codes: the short block behaves as a zero-padded full block
    padded = nf4_quantize(torch.cat([w, torch.zeros(58)]))
    assert torch.equal(padded.packed[:35], q.packed) and torch.equal(padded.absmax, q.absmax)


def test_stored_size():
    w = torch.randn(256, 512, dtype=torch.bfloat16)
    bf16_bytes = w.numel() * 2
    plain, dq = nf4_quantize(w).nbytes(), nf4_quantize(w, double_quant=True).nbytes()
    assert plain / bf16_bytes <= 0.29, plain / bf16_bytes  # 4 bits + 32/64 bits = 4.5 bits: 0.28125
    assert dq / bf16_bytes <= 0.26, dq / bf16_bytes  # 4 + 8/64 + 32/(64*256) bits: ~0.258


@pytest.mark.parametrize("bad", [torch.arange(64), torch.zeros(64, dtype=torch.uint8), torch.zeros(64).bool()])
def test_non_float_input_raises(bad):
    with pytest.raises(TypeError, match="nf4_quantize: w must have dtype"):
        nf4_quantize(bad)


def test_bad_blocksize_and_empty_raise():
    with pytest.raises(ValueError, match="blocksize"):
        nf4_quantize(torch.randn(64), blocksize=48)
    with pytest.raises(ValueError, match="at least one element"):
        nf4_quantize(torch.randn(0, 4))


def test_matmul_bad_input_raises():
    q = nf4_quantize(torch.randn(8, 64))
    with pytest.raises(ValueError, match=r"does not match weight of shape \(8, 64\)"):
        nf4_matmul(torch.randn(2, 63), q)
    with pytest.raises(ValueError, match="bias must have shape"):
        nf4_matmul(torch.randn(2, 64), q, torch.randn(7))
    with pytest.raises(TypeError, match="x must have dtype"):
        nf4_matmul(torch.ones(2, 64, dtype=torch.int32), q)
    with pytest.raises(TypeError, match="expected an NF4Weight"):
        nf4_matmul(torch.randn(2, 64), torch.randn(8, 64))
    with pytest.raises(ValueError, match="must be 2-D"):
        nf4_matmul(torch.randn(2, 64), nf4_quantize(torch.randn(2, 4, 64)))
    broken = NF4Weight(q.packed[:-1], q.absmax, q.shape, q.dtype, q.blocksize)
    with pytest.raises(ValueError, match="packed must be uint8 with 256 bytes"):
        nf4_matmul(torch.randn(2, 64), broken)


def test_reference_matmul_matches_dequantize_then_linear():
    w = torch.randn(40, 70)
    q = nf4_quantize(w, double_quant=True)
    x, b = torch.randn(3, 5, 70), torch.randn(40)
    want = torch.nn.functional.linear(x, nf4_dequantize(q), b)
    torch.testing.assert_close(nf4_matmul(x, q, b, backend="reference"), want)


# ---------------------------------------------------------------------------------------------------------------
# nf4_matmul: every fast backend against the reference
# ---------------------------------------------------------------------------------------------------------------
FAST = [b for b in backends_for(DEVICE, nf4_mod.OP.backends) if b != "reference"]
# (x shape, N): 1 and 16 tokens, odd K (blocks straddle rows), odd N, leading dims, and 96 tokens (the C++ and
# CUDA large-M path: dequantized row tiles + BLAS)
MM_SHAPES = [((1, 64), 40), ((16, 131), 33), ((3, 5, 256), 96), ((2, 48, 70), 130)]


def _mm_dtypes(backend):
    # bf16 arithmetic is wrong in the Triton CPU interpreter; bf16 Triton runs on GPU only.
    return [torch.float32, torch.float16] if backend == "triton" and DEVICE == "cpu" else DTYPES


MM_CASES = [(b, s, n, d) for b in FAST for s, n in MM_SHAPES for d in _mm_dtypes(b)]
MM_IDS = [f"{b}-{'x'.join(map(str, s))}-N{n}-{str(d)[6:]}" for b, s, n, d in MM_CASES]


def _mm_inputs(x_shape, n, dtype, double_quant, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = nf4_quantize(torch.randn(n, x_shape[-1], generator=g).to(DEVICE), double_quant=double_quant)
    x = torch.randn(x_shape, generator=g).to(DEVICE, dtype)
    b = torch.randn(n, generator=g).to(DEVICE, dtype)
    dy = torch.randn(*x_shape[:-1], n, generator=g).to(DEVICE, dtype)
    return q, x, b, dy


def _mm_run(fn, a, b, dy):
    return output_and_grads(fn, (a, b), dy)


@pytest.mark.parametrize("backend,x_shape,n,dtype", MM_CASES, ids=MM_IDS)
def test_matmul_backend_matches_reference(backend, x_shape, n, dtype):
    q, x, b, dy = _mm_inputs(x_shape, n, dtype, double_quant=x_shape[-1] % 2 == 0)
    fast = _mm_run(lambda a, c: nf4_matmul(a, q, c, backend=backend), x, b, dy)
    ref = _mm_run(lambda a, c: nf4_mod.nf4_matmul_reference(a, q, c), x, b, dy)
    exact = _mm_run(lambda a, c: nf4_mod.nf4_matmul_reference(a, q, c), x.double(), b.double(), dy.double())
    for name, f, r, e in zip(("y", "grad_x", "grad_bias"), fast, ref, exact):
        assert f.dtype == r.dtype, f"{name}: dtype {f.dtype} != reference {r.dtype}"
        assert_close_to_exact(f, r, e.to(f.dtype).double(), name=name)


@pytest.mark.parametrize("backend", FAST)
def test_matmul_without_bias_and_non_contiguous_x(backend):
    q, x, _, dy = _mm_inputs((6, 64), 24, torch.float32, double_quant=False)
    xt = x.t().contiguous().t()
    assert not xt.is_contiguous()
    got = nf4_matmul(xt, q, backend=backend)
    torch.testing.assert_close(got, nf4_mod.nf4_matmul_reference(x, q), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", [b for b in FAST if b != "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_dequantize_backend_bit_identical(backend, dtype):
    g = torch.Generator().manual_seed(1)
    for shape, dq in [((33, 130), True), ((7, 9), False), ((256,), False)]:
        q = nf4_quantize(torch.randn(shape, generator=g).to(DEVICE, dtype), double_quant=dq)
        got = nf4_dequantize(q, backend=backend)
        assert got.dtype == dtype and got.shape == shape
        assert torch.equal(got, dequantize_tensor(q)), f"{backend} dequantize differs at shape {shape}"


@pytest.mark.skipif("cpp" not in FAST and "cuda" not in FAST, reason="intro2llm._C is not built here")
def test_opcheck_compiled():
    q = nf4_quantize(torch.randn(24, 136).to(DEVICE), double_quant=True)
    absmax = q.fp32_absmax()
    x, b = torch.randn(5, 136, device=DEVICE), torch.randn(24, device=DEVICE)
    torch.library.opcheck(
        torch.ops.intro2llm.nf4_matmul_fwd.default, (x.requires_grad_(), q.packed, absmax, 24, 64, b.requires_grad_())
    )
    torch.library.opcheck(torch.ops.intro2llm.nf4_matmul_fwd.default, (x, q.packed, absmax, 24, 64, None))
    torch.library.opcheck(torch.ops.intro2llm.nf4_matmul_bwd.default, (torch.randn(5, 24, device=DEVICE), q.packed,
                                                                       absmax, 136, 64))
    torch.library.opcheck(torch.ops.intro2llm.nf4_dequantize.default, (q.packed, absmax, q.numel, 64, torch.bfloat16))


@pytest.mark.skipif("triton" not in FAST, reason="triton backend unavailable on this machine")
def test_opcheck_triton():
    q = nf4_quantize(torch.randn(24, 72).to(DEVICE))
    x, b = torch.randn(3, 72, device=DEVICE).requires_grad_(), torch.randn(24, device=DEVICE).requires_grad_()
    torch.library.opcheck(torch.ops.intro2llm.nf4_matmul_fwd_triton.default, (x, q.packed, q.absmax, 24, 64, b))


@pytest.mark.parametrize("backend", FAST + ["auto"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_torch_compile_fullgraph(backend, double_quant):
    q, x, b, dy = _mm_inputs((4, 128), 48, torch.float32, double_quant=double_quant)
    bk = None if backend == "auto" else backend
    assert_compiled_matches(lambda a, c: nf4_matmul(a, q, c, backend=bk) * 2,
                            lambda a, c: nf4_mod.nf4_matmul_reference(a, q, c) * 2,
                            lambda f: _mm_run(f, x, b, dy), 1e-5)


def test_matmul_weight_gets_no_gradient_and_fp64_runs_reference():
    q, x, b, _ = _mm_inputs((2, 64), 8, torch.float32, double_quant=False)
    assert not q.packed.requires_grad and not q.absmax.requires_grad
    y64 = nf4_matmul(x.double(), q, b.double())  # auto: fp64 is reference-only
    torch.testing.assert_close(y64, nf4_mod.nf4_matmul_reference(x.double(), q, b.double()))


@pytest.mark.parametrize("backend", FAST)
def test_explicit_backend_rejects_fp64(backend):
    q, x, _, _ = _mm_inputs((2, 64), 8, torch.float32, double_quant=False)
    with pytest.raises(TypeError, match="supports dtypes"):
        nf4_matmul(x.double(), q, backend=backend)
