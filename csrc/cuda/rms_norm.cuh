// Launchers of the CUDA RMSNorm kernels (csrc/cuda/rms_norm.cu). Plain C++ types only, so the kernel file
// compiles with bare nvcc and the torch binding (rms_norm_binding.cpp) needs no CUDA headers from ATen here.
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

#include "common.cuh"

namespace intro2llm {
namespace cuda {

// x, y: (M, N) in `dtype`; w: (N,) fp32; rstd: (M,) fp32.
cudaError_t rms_norm_fwd(const void* x, const float* w, void* y, float* rstd, int64_t M, int64_t N, float eps,
                         DType dtype, cudaStream_t stream);

// g, x, dx: (M, N) in `dtype`; w: (N,) fp32; rstd: (M,) fp32; dw_partial: (num_blocks, N) fp32 scratch;
// dw: (N,) fp32 output (sum of the partials).
cudaError_t rms_norm_bwd(const void* g, const void* x, const float* w, const float* rstd, void* dx,
                         float* dw_partial, float* dw, int64_t M, int64_t N, int num_blocks, DType dtype,
                         cudaStream_t stream);

}  // namespace cuda
}  // namespace intro2llm
