// Launchers of the CUDA cross-entropy kernels (csrc/cuda/cross_entropy.cu). Plain C++ types only, so the kernel
// file compiles with bare nvcc and the torch binding (cross_entropy_binding.cpp) keeps ATen out of it.
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

#include "common.cuh"

namespace intro2llm {
namespace cuda {


// logits: (N, V) rows `stride` elements apart, in `dtype`; targets: (N,) int64 (range-checked by the caller);
// loss, lse: (N,) fp32 outputs (loss 0 on ignored rows).
cudaError_t cross_entropy_fwd(const void* logits, const int64_t* targets, float* loss, float* lse, int64_t N,
                              int64_t V, int64_t stride, int64_t ignore_index, float label_smoothing, float z_loss,
                              DType dtype, cudaStream_t stream);

// grad_loss, lse: (N,) fp32; grad: (N, V) contiguous output in `dtype` = grad_loss[i] * dloss_i/dlogits.
cudaError_t cross_entropy_bwd(const float* grad_loss, const void* logits, const int64_t* targets, const float* lse,
                              void* grad, int64_t N, int64_t V, int64_t stride, int64_t ignore_index,
                              float label_smoothing, float z_loss, DType dtype, cudaStream_t stream);

// Forward, then logits (contiguous, N x V) overwritten in place by grad_scale * dloss_i/dlogits.
cudaError_t cross_entropy_fwd_bwd(void* logits, const int64_t* targets, float grad_scale, float* loss, float* lse,
                                  int64_t N, int64_t V, int64_t ignore_index, float label_smoothing, float z_loss,
                                  DType dtype, cudaStream_t stream);

}  // namespace cuda
}  // namespace intro2llm
