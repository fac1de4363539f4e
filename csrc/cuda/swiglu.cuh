// Launchers of the CUDA SwiGLU/GeGLU kernels (csrc/cuda/swiglu.cu). Plain C++ types only, so the kernel file
// compiles with bare nvcc and the torch binding (swiglu_binding.cpp) needs no CUDA headers from ATen here.
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

#include "common.cuh"

namespace intro2llm {
namespace cuda {

// activation codes: silu (SwiGLU), gelu with erf, gelu with the tanh approximation
enum class GluAct : int { kSilu = 0, kGelu = 1, kGeluTanh = 2 };

// out = act(gate) * up; gate, up, out: n contiguous elements in `dtype`.
cudaError_t glu_fwd(const void* gate, const void* up, void* out, int64_t n, GluAct act, DType dtype,
                    cudaStream_t stream);

// d_gate = grad * up * act'(gate), d_up = grad * act(gate); all n contiguous elements in `dtype`.
cudaError_t glu_bwd(const void* grad, const void* gate, const void* up, void* d_gate, void* d_up, int64_t n,
                    GluAct act, DType dtype, cudaStream_t stream);

}  // namespace cuda
}  // namespace intro2llm
