// Launchers of the CUDA RoPE kernel (csrc/cuda/rope.cu). Plain C++ types only, so the kernel file compiles with
// bare nvcc and the torch binding (rope_binding.cpp) needs no CUDA headers from ATen here.
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

#include "common.cuh"

namespace intro2llm {
namespace cuda {

// Strides (in elements) of a (B, H, T, D) tensor whose D stride is 1, and its head count.
struct RopeView {
  int64_t sb, sh, st;
  int64_t heads;
};

// q (B, H, T, D) and k (B, Hkv, T, D) in `dtype` read through `qv`/`kv` strides; q_out/k_out contiguous, same
// dtype; cos/sin (Bc, T, D) fp32 contiguous with batch stride `table_sb` (T*D, or 0 for Bc = 1).
// backward: apply the transposed rotation (the gradient).
cudaError_t rope(const void* q, const void* k, void* q_out, void* k_out, const float* cos, const float* sin,
                 RopeView qv, RopeView kv, int64_t B, int64_t T, int64_t D, int64_t table_sb, bool backward,
                 DType dtype, cudaStream_t stream);

}  // namespace cuda
}  // namespace intro2llm
