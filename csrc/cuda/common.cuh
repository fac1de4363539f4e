// Shared by the CUDA kernel files and their launcher headers: the dtype codes the torch bindings pass to the
// launchers, and (in nvcc-compiled code only) fp32 <-> storage-type conversions. No ATen/c10 headers, so the
// kernel files keep compiling with plain `nvcc -c`.
#pragma once

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace intro2llm {
namespace cuda {

// dtype codes shared by every CUDA launcher
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

#ifdef __CUDACC__
// Loads widen to fp32 (all arithmetic and reductions in fp32); stores round back to the storage type.
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
#endif

}  // namespace cuda
}  // namespace intro2llm
