// Launchers of the CUDA flash attention kernels (csrc/cuda/flash_attention.cu). Plain C++ types only, so the
// kernel file compiles with bare nvcc and the torch binding (flash_attention_binding.cpp) includes this header.
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

#include "common.cuh"

namespace intro2llm {
namespace cuda {
namespace flash {

// dtype of q, k, v, out and the gradients (accumulation is fp32 whatever this is)
using DType = ::intro2llm::cuda::DType;

// Shapes and mask of one call. q/out/dq: (B, H, Tq, D); k/v/dk/dv: (B, Hkv, Tk, D); all contiguous.
// Query i sits at position i + Tk - Tq; causal keeps k <= q; window > 0 keeps q - window < k (and k < q + window
// without causal); kpm (B, Tk) bytes, nonzero = keep, or nullptr.
struct Shape {
  int64_t B, H, Hkv, Tq, Tk, D;
  bool causal;
  int64_t window;  // <= 0: none
  float scale;
  const unsigned char* kpm;
};

// out (B, H, Tq, D) in dtype; lse (B, H, Tq) fp32 (−inf for a row that sees no key). D in {16, 32, 64, 128}.
cudaError_t flash_attention_fwd(const Shape& s, const void* q, const void* k, const void* v, void* out, float* lse,
                                DType dtype, cudaStream_t stream);

// dq, dk, dv in dtype; delta: (B, H, Tq) fp32 scratch.
cudaError_t flash_attention_bwd(const Shape& s, const void* grad_out, const void* q, const void* k, const void* v,
                                const void* out, const float* lse, float* delta, void* dq, void* dk, void* dv,
                                DType dtype, cudaStream_t stream);

}  // namespace flash
}  // namespace cuda
}  // namespace intro2llm
