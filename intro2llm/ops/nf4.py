"""NF4 (4-bit NormalFloat, Dettmers et al. 2023, QLoRA): blockwise weight quantization and the 4-bit matmul.

The format is bitsandbytes' exactly, so weights and habits carry over (bitsandbytes is the test oracle):

- the 16 code values are quantiles of N(0, 1) scaled into [-1, 1], with an exact 0 (``NF4_CODE``);
- the tensor is flattened and cut into blocks of ``blocksize`` (64) elements; each block stores its
  ``absmax = max |w|`` in fp32 and each element the index of the code value nearest to ``w / absmax``
  (a value exactly half-way between two codes takes the lower one, as ``torch.bucketize`` does in bitsandbytes);
- two 4-bit indices share a byte, the first element in the high nibble;
- double quantization (QLoRA's "DQ") stores the absmax values themselves in 8 bits: subtract their mean
  (``offset``), then quantize blockwise (256 absmax values per block, an fp32 ``scale`` each) to bitsandbytes'
  signed 8-bit "dynamic" code (``dynamic_map()``), with the nearest-code rule of bitsandbytes' CPU kernel.

When ``numel`` is not a multiple of ``blocksize`` the last block is short: it gets its own absmax over the
elements it has (the same as zero padding), and an odd ``numel`` pads the last byte's low nibble with the
code of 0.0 (index 7). ``NF4Weight.shape`` keeps the true shape, so nothing of the padding leaks out.

Lesson-level functions (lesson 14): ``quantize_tensor`` / ``dequantize_tensor`` are the readable reference.
Public ops: ``nf4_quantize`` / ``nf4_dequantize`` / ``nf4_matmul(x, w_nf4, bias)`` = ``x @ dequant(w)ᵀ + bias``.
The fast backends (C++ ``csrc/cpu/nf4.cpp``, Triton ``kernels/nf4.py``, CUDA ``csrc/cuda/nf4.cu``) never
materialize the whole dequantized weight: they dequantize a tile of rows and multiply it. The weight is frozen
(no gradient); ``nf4_matmul`` has a backward for ``x`` (QLoRA trains adapters on top and needs dL/dx).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from intro2llm.course import lesson_task
from intro2llm.ops import _dispatch
from intro2llm.ops._checks import check_float, check_same_device

OP = _dispatch.Op("nf4_matmul", backends=("reference", "triton", "cpp", "cuda"), compiled="nf4_matmul_fwd")
DEQUANTIZE = _dispatch.Op("nf4_dequantize", backends=("reference", "cpp", "cuda"), compiled="nf4_dequantize")
DQ_BLOCKSIZE = 256  # absmax values per block of the double quantization (bitsandbytes' choice)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # the block sizes bitsandbytes accepts

# The 16 NF4 values (bitsandbytes ``get_4bit_type("nf4")``): 8 positive and 7 negative normal quantiles,
# each side scaled so that its extreme is ±1, plus an exact 0 — asymmetric so that 0 is representable.
NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)


def _build_dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit "dynamic" code (``create_dynamic_map()``): 256 sorted fp32 values in [-1, 1].

    For exponent e = 0..6, the interval [0.1, 1] is cut into 2^e equal pieces and the piece midpoints times
    10^(e-6) give 2^e positive (and as many negative) values: 254 values spread over 7 decades, plus 0 and 1.
    """
    values: list[float] = []
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        values += (10 ** (e - 6) * mids).tolist()
        values += (-(10 ** (e - 6)) * mids).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


def _build_dynamic_lut(code: torch.Tensor) -> torch.Tensor:
    """The 65536-entry table bitsandbytes' CPU 8-bit quantizer uses for "nearest code".

    [-1, 1] is sampled at 65536 evenly spaced points; entry i is the index of the code value nearest to point i
    (the number of code midpoints below it). A value v maps to entry round((v + 1) / 2 * 65535).
    """
    midpoints = 0.5 * (code[:-1] + code[1:])
    grid = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32)) / 65535
    return torch.searchsorted(midpoints, grid, right=False).to(torch.uint8)


# Module constants (built once at import, so that torch.compile sees plain tensors)
_NF4_CODE = torch.tensor(NF4_CODE, dtype=torch.float32)
_NF4_MIDPOINTS = (_NF4_CODE[:-1] + _NF4_CODE[1:]) / 2  # 15 decision boundaries, in fp32 like bitsandbytes
_DYNAMIC_MAP = _build_dynamic_map()
_DYNAMIC_LUT = _build_dynamic_lut(_DYNAMIC_MAP)


def nf4_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 NF4 code values as an fp32 tensor on ``device``."""
    return _NF4_CODE.to(device)


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic code (256 sorted fp32 values), used for double quantization."""
    return _DYNAMIC_MAP


@dataclass
class NF4Weight:
    """A tensor in bitsandbytes' NF4 format.

    ``packed``: uint8 (ceil(numel/2),), two codes per byte, first element in the high nibble.
    ``absmax``: fp32 (num_blocks,) — or, with double quantization, uint8 (num_blocks,) codes of
    ``absmax - offset`` in ``dynamic_map()``, with ``scales`` fp32 (ceil(num_blocks/256),) their blockwise
    absmax and ``offset`` an fp32 scalar tensor (the mean of the absmax values).
    ``shape``/``dtype``: the original tensor's; ``blocksize``: elements per absmax.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    offset: torch.Tensor | None = None
    scales: torch.Tensor | None = None

    @property
    def double_quant(self) -> bool:
        return self.scales is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by name (what a state dict or a size count needs)."""
        out = {"packed": self.packed, "absmax": self.absmax}
        if self.double_quant:
            out["offset"] = self.offset
            out["scales"] = self.scales
        return out

    def nbytes(self) -> int:
        """Bytes stored: packed codes + (absmax, or 8-bit absmax codes + scales + offset)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def fp32_absmax(self) -> torch.Tensor:
        """The per-block absmax in fp32 (undoing the double quantization when there is one)."""
        if not self.double_quant:
            return self.absmax
        return _dequantize_8bit_blockwise(self.absmax, self.scales, DQ_BLOCKSIZE) + self.offset

    def to(self, device: torch.device | str) -> NF4Weight:
        """A copy with every stored tensor on ``device``."""
        move = (lambda t: None if t is None else t.to(device))  # noqa: E731
        return NF4Weight(
            move(self.packed), move(self.absmax), self.shape, self.dtype, self.blocksize,
            move(self.offset), move(self.scales),
        )

    def __repr__(self) -> str:
        return (
            f"NF4Weight(shape={tuple(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}, "
            f"double_quant={self.double_quant}, nbytes={self.nbytes()}, device={self.device})"
        )


# ---------------------------------------------------------------------------------------------------------------
# Reference (the lesson's math, the test oracle): quantize_tensor / dequantize_tensor
# ---------------------------------------------------------------------------------------------------------------
def _blockwise_absmax_scaled(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(absmax per block fp32, flat / absmax of its block clamped to [-1, 1]) — bitsandbytes' arithmetic.

    Full blocks multiply by the reciprocal of their absmax (0 stays 0); the short last block divides by its
    absmax clamped to 1e-38 (and stores the clamped value). The two differ in the last bit now and then, and
    bit-identity with bitsandbytes needs both.
    """
    n = flat.numel()
    full = n - n % blocksize
    body = flat[:full].view(-1, blocksize)  # (blocks, blocksize)
    absmax = body.abs().amax(dim=1)  # (blocks,)
    scaled = (body * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp(-1, 1).reshape(-1)
    if full < n:
        tail_max = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max.reshape(1)])
        scaled = torch.cat([scaled, (flat[full:] / tail_max).clamp(-1, 1)])
    return absmax, scaled


def _quantize_8bit_blockwise(values: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (n,) → (uint8 codes in ``dynamic_map()``, fp32 absmax per block) like bitsandbytes' CPU kernel.

    The CPU kernel scales by 1/absmax (0 for an all-zero block, whose codes are 0) and picks the code through
    ``_DYNAMIC_LUT``: the nearest code to v rounded to a 65536-point grid over [-1, 1].
    """
    n = values.numel()
    nblocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(values, (0, nblocks * blocksize - n)).view(nblocks, blocksize)
    absmax = padded.abs().amax(dim=1)  # (nblocks,)
    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    v = (padded * inv.unsqueeze(1)).clamp(-1, 1)
    index = ((v + 1.0) * 0.5 * 65535 + 0.5).to(torch.int64)  # truncation, as the C++ cast does
    codes = _DYNAMIC_LUT.to(values.device)[index]
    codes = torch.where((absmax > 0).unsqueeze(1), codes, torch.zeros_like(codes))
    return codes.reshape(-1)[:n], absmax


def _dequantize_8bit_blockwise(codes: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """uint8 codes (n,) + fp32 absmax per block → fp32 (n,): ``dynamic_map()[code] * absmax[i // blocksize]``."""
    values = dynamic_map().to(codes.device)[codes.long()]
    return values * absmax.repeat_interleave(blocksize)[: codes.numel()]


def _check_blocksize(blocksize: int, op: str) -> None:
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"{op}: blocksize must be one of {BLOCKSIZES} (bitsandbytes' sizes), got {blocksize}")


@lesson_task(14)
def quantize_tensor(w: torch.Tensor, blocksize: int = 64, double_quant: bool = False) -> NF4Weight:
    """Blockwise NF4 quantization of ``w`` (any shape, fp32/bf16/fp16/fp64) → ``NF4Weight`` (bitsandbytes' format).

    1. flatten, cut into blocks of ``blocksize``; absmax per block (fp32);
    2. scale each block into [-1, 1] and take the nearest of the 16 NF4 values (its index, 0..15);
    3. pack two indices per byte, the first in the high nibble;
    4. (double quantization) absmax - mean → 8-bit blockwise codes, 256 per block.
    """
    check_float("w", w, "nf4_quantize")
    _check_blocksize(blocksize, "nf4_quantize")
    if w.numel() == 0:
        raise ValueError(f"nf4_quantize: w must have at least one element, got shape {tuple(w.shape)}")
    flat = w.detach().reshape(-1).float()  # (n,)
    absmax, scaled = _blockwise_absmax_scaled(flat, blocksize)
    # nearest code: index = number of midpoints strictly below the value (a tie goes to the lower code)
    idx = torch.bucketize(scaled, _NF4_MIDPOINTS.to(w.device), right=False).to(torch.uint8)  # (n,)
    if idx.numel() % 2:
        idx = torch.cat([idx, idx.new_full((1,), 7)])  # pad with the code of 0.0
    packed = (idx[0::2] << 4) | idx[1::2]  # (ceil(n/2),)
    if not double_quant:
        return NF4Weight(packed, absmax, w.shape, w.dtype, blocksize)
    offset = absmax.mean()
    codes, scales = _quantize_8bit_blockwise(absmax - offset, DQ_BLOCKSIZE)
    return NF4Weight(packed, codes, w.shape, w.dtype, blocksize, offset=offset, scales=scales)


def _unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 (ceil(n/2),) → code indices int64 (n,), high nibble first."""
    return torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)[:n].long()


@lesson_task(14)
def dequantize_tensor(q: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``NF4Weight`` → tensor of its original shape: ``code[index] * absmax[block]`` in fp32, cast to ``dtype``
    (default: the original dtype). Equals ``bitsandbytes.functional.dequantize_4bit``."""
    _check_nf4(q, "nf4_dequantize")
    n = q.numel
    values = nf4_code(q.device)[_unpack(q.packed, n)]  # (n,) fp32
    scale = q.fp32_absmax().repeat_interleave(q.blocksize)[:n]
    return (values * scale).view(q.shape).to(dtype or q.dtype)


def nf4_matmul_reference(x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x (..., K) @ dequant(w)ᵀ (K, N) + bias`` in x's dtype. Materializes the whole dequantized weight
    (reads N·K/2 bytes, writes and re-reads N·K values): the memory the fused kernels do not spend."""
    weight = dequantize_tensor(w, x.dtype)  # (N, K)
    return torch.nn.functional.linear(x, weight, None if bias is None else bias.to(x.dtype))


# ---------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------
def _check_nf4(q: NF4Weight, op: str) -> None:
    if not isinstance(q, NF4Weight):
        raise TypeError(f"{op}: expected an NF4Weight (from nf4_quantize), got {type(q).__name__}")
    n = q.numel
    nblocks = -(-n // q.blocksize)
    if q.packed.dtype != torch.uint8 or q.packed.numel() != (n + 1) // 2:
        raise ValueError(
            f"{op}: packed must be uint8 with {(n + 1) // 2} bytes for shape {tuple(q.shape)}, "
            f"got {q.packed.dtype} with {q.packed.numel()}"
        )
    want = torch.uint8 if q.double_quant else torch.float32
    if q.absmax.dtype != want or q.absmax.numel() != nblocks:
        raise ValueError(
            f"{op}: absmax must be {want} with {nblocks} values (blocksize {q.blocksize}, shape {tuple(q.shape)}), "
            f"got {q.absmax.dtype} with {q.absmax.numel()}"
        )


def _validate_matmul(x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None) -> None:
    check_float("x", x, OP.name)
    _check_nf4(w, OP.name)
    if len(w.shape) != 2:
        raise ValueError(f"{OP}: the weight must be 2-D (out_features, in_features), got shape {tuple(w.shape)}")
    if x.dim() < 1 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"{OP}: x of shape {tuple(x.shape)} does not match weight of shape {tuple(w.shape)}")
    if bias is not None:
        check_float("bias", bias, OP.name)
        if bias.shape != (w.shape[0],):
            raise ValueError(f"{OP}: bias must have shape ({w.shape[0]},), got {tuple(bias.shape)}")
    check_same_device(OP.name, x=x, packed=w.packed, bias=bias)


# ---------------------------------------------------------------------------------------------------------------
# Kernels (the op template of _dispatch): C++/CUDA intro2llm::nf4_matmul_fwd / _bwd / nf4_dequantize, Triton
# kernels/nf4.py. One backward for every backend: dx = dy @ dequant(W) by the backend's own kernel, dbias = dy
# summed over rows; the weight (packed, absmax) gets no gradient.
# ---------------------------------------------------------------------------------------------------------------
def _fake_fwd(x, packed, absmax, N, blocksize, bias):
    return x.new_empty((x.shape[0], N))


def _fake_bwd(grad_y, packed, absmax, K, blocksize):
    return grad_y.new_empty((grad_y.shape[0], K))


def _fake_dequantize(packed, absmax, numel, blocksize, dtype):
    return packed.new_empty((numel,), dtype=dtype)


def _setup_context(ctx, inputs, output):
    x, packed, absmax, _n, blocksize, bias = inputs
    ctx.save_for_backward(packed, absmax)
    ctx.K, ctx.blocksize = x.shape[1], blocksize
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(bwd, ctx, grad_y):
    packed, absmax = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = bwd(grad_y.contiguous(), packed, absmax, ctx.K, ctx.blocksize)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[5]:
        grad_bias = grad_y.float().sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, None, None, grad_bias


# Triton: kernels/nf4.py launched inside custom ops (triton imported lazily: it is optional).
@torch.library.custom_op("intro2llm::nf4_matmul_fwd_triton", mutates_args=())
def _nf4_matmul_fwd_triton(
    x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, N: int, blocksize: int, bias: torch.Tensor | None
) -> torch.Tensor:
    from intro2llm.kernels.nf4 import nf4_matmul_fwd

    return nf4_matmul_fwd(x.contiguous(), packed.contiguous(), absmax.contiguous(), N, blocksize, bias)


@torch.library.custom_op("intro2llm::nf4_matmul_bwd_triton", mutates_args=())
def _nf4_matmul_bwd_triton(
    grad_y: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, K: int, blocksize: int
) -> torch.Tensor:
    from intro2llm.kernels.nf4 import nf4_matmul_bwd

    return nf4_matmul_bwd(grad_y.contiguous(), packed.contiguous(), absmax.contiguous(), K, blocksize)


_KERNELS = dict(fake_fwd=_fake_fwd, fake_bwd=_fake_bwd, backward=_backward, setup_context=_setup_context)
_dispatch.register_kernels(  # C++ (CPU) and CUDA, from csrc/
    "nf4_matmul_fwd", "nf4_matmul_bwd", extra_fakes={"nf4_dequantize": _fake_dequantize}, **_KERNELS
)
_dispatch.register_kernels(_nf4_matmul_fwd_triton, _nf4_matmul_bwd_triton, **_KERNELS)


# ---------------------------------------------------------------------------------------------------------------
# Public ops
# ---------------------------------------------------------------------------------------------------------------
def nf4_quantize(w: torch.Tensor, blocksize: int = 64, double_quant: bool = False) -> NF4Weight:
    """Quantize ``w`` (any shape, fp32/bf16/fp16) to NF4; bit-identical to bitsandbytes' ``quantize_4bit``."""
    return quantize_tensor(w, blocksize, double_quant)


def nf4_dequantize(w: NF4Weight, dtype: torch.dtype | None = None, *, backend: str | None = None) -> torch.Tensor:
    """The dequantized tensor (original shape, ``dtype`` or the original dtype); equals ``dequantize_4bit``."""
    _check_nf4(w, "nf4_dequantize")
    dtype = dtype or w.dtype
    name = DEQUANTIZE.resolve(w.device, backend, dtype=dtype)
    if name == "reference":
        return dequantize_tensor(w, dtype)
    flat = torch.ops.intro2llm.nf4_dequantize(w.packed, w.fp32_absmax(), w.numel, w.blocksize, dtype)
    return flat.view(w.shape)


def nf4_matmul(
    x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None = None, *, backend: str | None = None
) -> torch.Tensor:
    """``x (..., K) @ dequant(w)ᵀ + bias`` → (..., N) in x's dtype; w: NF4Weight of shape (N, K), frozen.

    Differentiable w.r.t. ``x`` and ``bias``; the fast backends never hold the whole dequantized weight.
    """
    _validate_matmul(x, w, bias)
    name = OP.resolve(x.device, backend, dtype=x.dtype)
    if name == "reference":
        return nf4_matmul_reference(x, w, bias)
    N, K = w.shape
    x2 = x.reshape(-1, K)  # (M, K)
    if name == "triton":
        y = _nf4_matmul_fwd_triton(x2, w.packed, w.fp32_absmax(), N, w.blocksize, bias)
    else:
        y = torch.ops.intro2llm.nf4_matmul_fwd(x2, w.packed, w.fp32_absmax(), N, w.blocksize, bias)
    return y.view(*x.shape[:-1], N)
