"""``@triton.jit`` helpers shared by the kernels of this folder: the offsets and masks of a program's block and
upcasting loads. Each is a few lines that the kernels would otherwise repeat; Triton inlines them."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_f32(ptr, offs, mask):
    # load and upcast to fp32 at once (the CPU interpreter computes bf16 arithmetic wrongly); 0 where masked
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def block_offsets(N, BLOCK: tl.constexpr):
    # an elementwise kernel's block: this program's offsets (int64: N may pass 2^31) and their mask
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < N


@triton.jit
def row_tile(rows, row_end, cols, col_ok, N):
    # rows (valid below row_end) x cols of a row-major (M, N) matrix: the row mask, the 2-D mask of the ragged
    # edges and the element offsets (int64: M*N may pass 2^31)
    row_ok = rows < row_end
    return row_ok, row_ok[:, None] & col_ok[None, :], rows[:, None].to(tl.int64) * N + cols[None, :]
