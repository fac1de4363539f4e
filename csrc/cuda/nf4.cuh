// Launchers of the CUDA NF4 kernels (csrc/cuda/nf4.cu). Plain C++ types only, so the kernel file compiles with
// bare nvcc and the torch binding (nf4_binding.cpp) needs no CUDA headers from ATen here.
//
// W (N, K) in bitsandbytes' NF4 format: element e = n*K + k has its 4-bit code in packed[e / 2] (high nibble for
// even e) and its scale absmax[e >> shift] (fp32, blocksize = 1 << shift, a multiple of 8).
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

#include "common.cuh"

namespace intro2llm {
namespace cuda {

// out[i] = W.flat[e0 + i] for i < count, in `dtype`.
cudaError_t nf4_dequantize(const uint8_t* packed, const float* absmax, int shift, int64_t e0, int64_t count,
                           void* out, DType dtype, cudaStream_t stream);

// y (M, N) = x (M, K) @ dequant(W)ᵀ (+ bias (N,) fp32 or null); x and y in `dtype`. One warp per row of W,
// kMTile tokens per block row: meant for small M (decode); the binding sends large M to tiles + cuBLAS.
cudaError_t nf4_matmul_fwd(const void* x, const uint8_t* packed, const float* absmax, const float* bias, void* y,
                           int64_t M, int64_t N, int64_t K, int shift, DType dtype, cudaStream_t stream);

}  // namespace cuda
}  // namespace intro2llm
