// Shared by the torch bindings of the CUDA kernels (host C++ with ATen; the kernel files never include it): the
// one map from a tensor's dtype to the launchers' dtype code, and the one check of a launcher's result.
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime_api.h>

#include "common.cuh"

namespace intro2llm {
namespace cuda {

// float32 / float16 / bfloat16 -> DType; anything else a TypeError naming the op, the argument and its dtype.
inline DType dtype_code(at::ScalarType t, const char* op, const char* what) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK_TYPE(false, op, ": ", what, " must be float32, float16 or bfloat16, got ", t);
  }
}

inline DType dtype_code(const at::Tensor& t, const char* op, const char* what) {
  return dtype_code(t.scalar_type(), op, what);
}

// A launcher's cudaError_t: anything but success is a RuntimeError naming the op and CUDA's message.
inline void check_error(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA error: ", cudaGetErrorString(err));
}

}  // namespace cuda
}  // namespace intro2llm
