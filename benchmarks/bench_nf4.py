"""NF4 benchmarks: quantize, dequantize and the 4-bit matmul against bitsandbytes and against dequantize-then-matmul.

    pytest benchmarks/bench_nf4.py --benchmark-only --benchmark-group-by=group --benchmark-columns=min,median

Groups (weight 4096 × 4096, as a 7B model's attention projection):
- ``nf4-quantize``: ours (``nf4_quantize``, the torch reference) vs ``bitsandbytes.functional.quantize_4bit``,
  plain and double-quantized; ``extra_info`` has the stored size against the bf16 weight.
- ``nf4-dequantize-<dtype>``: our backends vs ``dequantize_4bit``; the ``clone()`` of the output is the floor.
- ``nf4-matmul-<tokens>tok-<dtype>``: ``nf4_matmul`` per backend vs bitsandbytes' dequantize_4bit + F.linear
  (``bnb-dequant+linear``), ``bitsandbytes.matmul_4bit`` (``bnb-matmul_4bit``) and our own dequantize + F.linear
  (``dequant+linear``; on a GPU that is dequantize + cuBLAS). Tokens 1 and 16 (1, 4, 16 on a GPU).
- ``nf4-matmul-peak-memory``: peak extra resident memory of one C++ ``nf4_matmul`` (1 and 16 tokens) and of
  bitsandbytes' dequantize + matmul, in a fresh process (``intro2llm.testing.peak_extra_memory``: VmHWM after
  resetting it, minus VmRSS before), against the dequantized weight's size; in ``extra_info``.
CPU figures are ratios side by side in one run; absolute times count only on a GPU.
"""

import pytest
import torch
import torch.nn.functional as F

from intro2llm.ops.nf4 import nf4_dequantize, nf4_matmul, nf4_quantize
from intro2llm.testing import backends_for, peak_extra_memory

try:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf
except ImportError:  # the GPU machine may lack it: the bnb rows are skipped, dequantize + cuBLAS stays
    bnb = bnbf = None

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N = K = 4096
FAST = [b for b in backends_for(DEVICE) if b != "reference" and not (b == "triton" and DEVICE == "cpu")]
TOKENS = [1, 4, 16] if DEVICE == "cuda" else [1, 16]
DTYPES = [torch.bfloat16, torch.float16] if DEVICE == "cuda" else [torch.float32, torch.bfloat16]


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


_weights: dict = {}


def _need_bnb(impl):
    if impl.startswith("bnb") and bnb is None:
        pytest.skip("bitsandbytes is not installed")


def _weight(dtype, double_quant=False):
    """(our NF4Weight, bitsandbytes' (packed, state)) of one seeded 4096 × 4096 weight in ``dtype``."""
    key = (dtype, double_quant)
    if key not in _weights:
        w = torch.randn(N, K, generator=torch.Generator().manual_seed(0)).to(DEVICE, dtype) * 0.02
        _weights[key] = (
            nf4_quantize(w, double_quant=double_quant),
            None if bnbf is None else bnbf.quantize_4bit(w, blocksize=64, compress_statistics=double_quant,
                                                         quant_type="nf4"),
        )
    return _weights[key]


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("impl", ["ours", "bnb"])
def test_quantize(benchmark, impl, double_quant):
    _need_bnb(impl)
    w = torch.randn(N, K, device=DEVICE, dtype=torch.bfloat16)
    if impl == "ours":
        fn = lambda: nf4_quantize(w, double_quant=double_quant)  # noqa: E731
    else:
        fn = lambda: bnbf.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")  # noqa: E731

    def run():
        fn()
        _sync()

    benchmark.group = "nf4-quantize"
    q = nf4_quantize(w, double_quant=double_quant)
    benchmark.extra_info["stored_bytes"] = q.nbytes()
    benchmark.extra_info["size_vs_bf16"] = round(q.nbytes() / (w.numel() * 2), 4)
    benchmark.pedantic(run, rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("impl", ["reference"] + [b for b in FAST if b != "triton"] + ["bnb", "clone"])
def test_dequantize(benchmark, impl, dtype):
    _need_bnb(impl)
    q, theirs = _weight(dtype)
    packed, state = theirs if theirs is not None else (None, None)
    out = nf4_dequantize(q)
    if impl == "bnb":
        fn = lambda: bnbf.dequantize_4bit(packed, state)  # noqa: E731
    elif impl == "clone":
        fn = out.clone
    else:
        fn = lambda: nf4_dequantize(q, backend=impl)  # noqa: E731

    def run():
        fn()
        _sync()

    benchmark.group = f"nf4-dequantize-{str(dtype)[6:]}"
    benchmark.extra_info["bytes_written"] = out.numel() * out.element_size()
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)


MM_IMPLS = FAST + ["dequant+linear", "bnb-dequant+linear", "bnb-matmul_4bit"]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("tokens", TOKENS, ids=lambda t: f"{t}tok")
@pytest.mark.parametrize("impl", MM_IMPLS)
def test_matmul(benchmark, impl, tokens, dtype):
    _need_bnb(impl)
    q, theirs = _weight(dtype)
    packed, state = theirs if theirs is not None else (None, None)
    x = torch.randn(tokens, K, device=DEVICE, dtype=dtype)
    if impl == "bnb-dequant+linear":
        fn = lambda: F.linear(x, bnbf.dequantize_4bit(packed, state))  # noqa: E731
    elif impl == "bnb-matmul_4bit":
        fn = lambda: bnb.matmul_4bit(x, packed.t(), quant_state=state)  # noqa: E731
    elif impl == "dequant+linear":
        fn = lambda: F.linear(x, nf4_dequantize(q))  # noqa: E731
    else:
        fn = lambda: nf4_matmul(x, q, backend=impl)  # noqa: E731

    def run():
        with torch.no_grad():
            fn()
        _sync()

    benchmark.group = f"nf4-matmul-{tokens}tok-{str(dtype)[6:]}"
    benchmark.extra_info["packed_bytes_read"] = q.nbytes()
    benchmark.pedantic(run, rounds=20 if DEVICE == "cuda" else 10, warmup_rounds=2)


_SETUP = """
import torch
torch.manual_seed(0)
import bitsandbytes as bnb, bitsandbytes.functional as bnbf
from intro2llm.ops.nf4 import nf4_quantize, nf4_matmul
w = torch.randn({n}, {k}) * 0.02
q = nf4_quantize(w)
packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
del w
x = torch.randn({m}, {k})
nf4_matmul(x, q, backend="cpp"); torch.nn.functional.linear(x, bnbf.dequantize_4bit(packed, state))  # warm up
"""


@pytest.mark.skipif(DEVICE != "cpu" or "cpp" not in FAST or bnb is None, reason="CPU peak memory: C++ vs bnb")
@pytest.mark.parametrize("tokens", [1, 16], ids=lambda t: f"{t}tok")
def test_matmul_peak_memory(benchmark, tokens):
    setup = _SETUP.format(n=N, k=K, m=tokens)
    results = {}

    def measure():
        results["cpp"] = peak_extra_memory(setup, "y = nf4_matmul(x, q, backend='cpp')")
        bnb_run = "y = torch.nn.functional.linear(x, bnbf.dequantize_4bit(packed, state))"
        results["bnb"] = peak_extra_memory(setup, bnb_run)

    benchmark.group = "nf4-matmul-peak-memory"
    benchmark.pedantic(measure, rounds=1, iterations=1)
    dequantized = N * K * 4
    benchmark.extra_info.update(
        dequantized_weight_MB=dequantized / 2**20,
        cpp_peak_extra_MB=round(results["cpp"] / 2**20, 2),
        bnb_peak_extra_MB=round(results["bnb"] / 2**20, 2),
        cpp_vs_dequantized=round(results["cpp"] / dequantized, 4),
    )
    assert results["cpp"] < dequantized / 4, results
