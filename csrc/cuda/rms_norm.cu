// RMSNorm CUDA kernels (forward, backward). No ATen/c10 headers: compiles with plain `nvcc -c`.
//
// Forward: one block per row; each thread strides over the row accumulating x^2 in fp32, a warp-shuffle +
// shared-memory reduction gives mean(x^2), then the same threads write y = x * rstd * w.   reads MN, writes MN
// Backward: a grid of `num_blocks` blocks, each looping over rows (stride num_blocks); per row a block
// reduction gives sum(g*w*x); dx is written directly and dw accumulates in per-thread registers over the
// block's rows (thread t owns columns t, t+blockDim, ...), then one fp32 partial row per block; a second
// kernel sums the partials (deterministic, no atomics).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "rms_norm.cuh"

namespace intro2llm {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxColsPerThread = 32;  // backward keeps dw for N <= kThreads * 32 = 8192 in registers

// Sum of `v` over the block; every thread gets the result.
__device__ float block_sum(float v) {
  __shared__ float warp_sums[kThreads / 32];
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffff, v, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  float total = 0.f;
  for (int i = 0; i < kThreads / 32; ++i) total += warp_sums[i];
  __syncthreads();  // warp_sums is reused by the next call
  return total;
}

template <typename T>
__global__ void rms_norm_fwd_kernel(const T* __restrict__ x, const float* __restrict__ w, T* __restrict__ y,
                                    float* __restrict__ rstd, int64_t N, float eps) {
  const int64_t row = blockIdx.x;
  const T* xr = x + row * N;
  T* yr = y + row * N;
  float ss = 0.f;
  for (int64_t d = threadIdx.x; d < N; d += kThreads) {
    const float v = to_float(xr[d]);
    ss += v * v;
  }
  const float r = rsqrtf(block_sum(ss) / static_cast<float>(N) + eps);
  if (threadIdx.x == 0) rstd[row] = r;
  for (int64_t d = threadIdx.x; d < N; d += kThreads) yr[d] = from_float<T>(to_float(xr[d]) * r * w[d]);
}

template <typename T>
__global__ void rms_norm_bwd_kernel(const T* __restrict__ g, const T* __restrict__ x, const float* __restrict__ w,
                                    const float* __restrict__ rstd, T* __restrict__ dx, float* __restrict__ dw_partial,
                                    int64_t M, int64_t N) {
  float dw_acc[kMaxColsPerThread];
#pragma unroll
  for (int j = 0; j < kMaxColsPerThread; ++j) dw_acc[j] = 0.f;
  for (int64_t row = blockIdx.x; row < M; row += gridDim.x) {
    const T* gr = g + row * N;
    const T* xr = x + row * N;
    const float r = rstd[row];
    float dot = 0.f;
    for (int64_t d = threadIdx.x; d < N; d += kThreads) dot += to_float(gr[d]) * w[d] * to_float(xr[d]);
    const float coef = r * r * r * block_sum(dot) / static_cast<float>(N);
    int j = 0;
    for (int64_t d = threadIdx.x; d < N; d += kThreads, ++j) {
      const float gv = to_float(gr[d]), xv = to_float(xr[d]);
      dx[row * N + d] = from_float<T>(gv * w[d] * r - xv * coef);
      dw_acc[j] += gv * xv * r;
    }
  }
  int j = 0;
  for (int64_t d = threadIdx.x; d < N; d += kThreads, ++j) dw_partial[blockIdx.x * N + d] = dw_acc[j];
}

// dw[d] = sum_b dw_partial[b, d]
__global__ void sum_partials_kernel(const float* __restrict__ partial, float* __restrict__ out, int rows, int64_t N) {
  const int64_t d = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (d >= N) return;
  float s = 0.f;
  for (int b = 0; b < rows; ++b) s += partial[b * N + d];
  out[d] = s;
}

template <typename T>
cudaError_t launch_fwd(const void* x, const float* w, void* y, float* rstd, int64_t M, int64_t N, float eps,
                       cudaStream_t stream) {
  if (M == 0) return cudaSuccess;
  rms_norm_fwd_kernel<T><<<static_cast<unsigned>(M), kThreads, 0, stream>>>(static_cast<const T*>(x), w,
                                                                             static_cast<T*>(y), rstd, N, eps);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bwd(const void* g, const void* x, const float* w, const float* rstd, void* dx, float* dw_partial,
                       float* dw, int64_t M, int64_t N, int num_blocks, cudaStream_t stream) {
  if (M > 0) {
    rms_norm_bwd_kernel<T><<<num_blocks, kThreads, 0, stream>>>(static_cast<const T*>(g), static_cast<const T*>(x), w,
                                                                rstd, static_cast<T*>(dx), dw_partial, M, N);
  } else {
    cudaMemsetAsync(dw_partial, 0, sizeof(float) * N * num_blocks, stream);
  }
  const unsigned sum_blocks = static_cast<unsigned>((N + kThreads - 1) / kThreads);
  sum_partials_kernel<<<sum_blocks, kThreads, 0, stream>>>(dw_partial, dw, num_blocks, N);
  return cudaGetLastError();
}

}  // namespace

cudaError_t rms_norm_fwd(const void* x, const float* w, void* y, float* rstd, int64_t M, int64_t N, float eps,
                         DType dtype, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return launch_fwd<float>(x, w, y, rstd, M, N, eps, stream);
    case DType::kFloat16: return launch_fwd<__half>(x, w, y, rstd, M, N, eps, stream);
    case DType::kBFloat16: return launch_fwd<__nv_bfloat16>(x, w, y, rstd, M, N, eps, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t rms_norm_bwd(const void* g, const void* x, const float* w, const float* rstd, void* dx, float* dw_partial,
                         float* dw, int64_t M, int64_t N, int num_blocks, DType dtype, cudaStream_t stream) {
  if (N > static_cast<int64_t>(kThreads) * kMaxColsPerThread) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32: return launch_bwd<float>(g, x, w, rstd, dx, dw_partial, dw, M, N, num_blocks, stream);
    case DType::kFloat16: return launch_bwd<__half>(g, x, w, rstd, dx, dw_partial, dw, M, N, num_blocks, stream);
    case DType::kBFloat16:
      return launch_bwd<__nv_bfloat16>(g, x, w, rstd, dx, dw_partial, dw, M, N, num_blocks, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace intro2llm
