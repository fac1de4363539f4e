// Cross-entropy CUDA kernels (label smoothing, z-loss, ignore_index). No ATen/c10 headers: compiles with plain
// `nvcc -c`. Math as in intro2llm/ops/cross_entropy.py; everything in fp32 after the load.
//
// Forward: one block per row. Each thread walks its strided share of the vocabulary keeping an online
// (max, sum exp(x - max)) pair and the plain sum (label smoothing); the pairs merge across the block with warp
// shuffles (m = max(m1, m2), s = s1 e^(m1-m) + s2 e^(m2-m)), so the row is read once and V is unbounded.
// fwd_bwd: the same block then rewrites its row with the scaled gradient (the row was just read: L2-hot).
// Backward: one block per row writes g (softmax (1 + 2 z lse) - (1-eps) onehot - eps/V).   reads NV, writes NV
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "cross_entropy.cuh"

namespace intro2llm {
namespace cuda {
namespace {

constexpr int kThreads = 512;

// Merge (m2, s2) into (m, s): both are (max, sum exp(x - max)) of disjoint sets.
__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
  const float mn = fmaxf(m, m2);
  if (mn == -INFINITY) return;  // both empty
  s = s * __expf(m - mn) + s2 * __expf(m2 - mn);
  m = mn;
}

// Block-wide merge of (m, s) and sum of sx; every thread gets the results.
__device__ void block_reduce(float& m, float& s, float& sx) {
  __shared__ float sm[kThreads / 32], ss[kThreads / 32], ssx[kThreads / 32];
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffff, m, offset);
    const float s2 = __shfl_xor_sync(0xffffffff, s, offset);
    lse_merge(m, s, m2, s2);
    sx += __shfl_xor_sync(0xffffffff, sx, offset);
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) {
    sm[warp] = m;
    ss[warp] = s;
    ssx[warp] = sx;
  }
  __syncthreads();
  m = -INFINITY;
  s = 0.f;
  sx = 0.f;
  for (int i = 0; i < kThreads / 32; ++i) {
    lse_merge(m, s, sm[i], ss[i]);
    sx += ssx[i];
  }
  __syncthreads();
}

// dloss/dx_j scaled by g: a * exp(x - lse) - b, minus (1 - eps) g at the target.
template <typename T>
__device__ __forceinline__ void write_grad(const T* x, T* out, int64_t V, int64_t t, float lse, float g, float eps,
                                           float z) {
  const float a = g * (1.f + 2.f * z * lse), b = g * eps / static_cast<float>(V), gt = g * (1.f - eps);
  for (int64_t j = threadIdx.x; j < V; j += kThreads) {
    float d = a * __expf(to_float(x[j]) - lse) - b;
    if (j == t) d -= gt;
    out[j] = from_float<T>(d);
  }
}

template <typename T, bool kWriteGrad>
__global__ void __launch_bounds__(kThreads) ce_fwd_kernel(T* x_base, const int64_t* __restrict__ targets,
                                                          float* __restrict__ loss, float* __restrict__ lse_out,
                                                          int64_t V, int64_t stride, int64_t ignore_index, float eps,
                                                          float z, float grad_scale) {
  const int64_t row = blockIdx.x;
  T* x = x_base + row * stride;
  const int64_t t = targets[row];
  const bool valid = t != ignore_index;
  if (kWriteGrad && !valid) {  // ignored row: zero gradient, no statistics needed
    for (int64_t j = threadIdx.x; j < V; j += kThreads) x[j] = from_float<T>(0.f);
    if (threadIdx.x == 0) loss[row] = lse_out[row] = 0.f;
    return;
  }
  float m = -INFINITY, s = 0.f, sx = 0.f;
  for (int64_t j = threadIdx.x; j < V; j += kThreads) {
    const float v = to_float(x[j]);
    if (v > m) {
      s = s * __expf(m - v) + 1.f;
      m = v;
    } else if (v > -INFINITY) {  // skips -inf (masked) logits, which would give exp(-inf - -inf) = nan
      s += __expf(v - m);
    }
    sx += v;
  }
  block_reduce(m, s, sx);
  const float lse = m + __logf(s);
  if (threadIdx.x == 0) {
    // the range guard keeps an unchecked call from reading out of bounds
    const float xt = (valid && t >= 0 && t < V) ? to_float(x[t]) : 0.f;
    const float l = (1.f - eps) * (lse - xt) + eps * (lse - sx / static_cast<float>(V)) + z * lse * lse;
    loss[row] = valid ? l : 0.f;
    lse_out[row] = lse;
  }
  if (kWriteGrad) {
    __syncthreads();  // x[t] is read above before any thread overwrites the row
    write_grad(x, x, V, t, lse, grad_scale, eps, z);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) ce_bwd_kernel(const float* __restrict__ grad_loss, const T* __restrict__ x_base,
                                                          const int64_t* __restrict__ targets,
                                                          const float* __restrict__ lse, T* __restrict__ grad,
                                                          int64_t V, int64_t stride, int64_t ignore_index, float eps,
                                                          float z) {
  const int64_t row = blockIdx.x;
  const int64_t t = targets[row];
  T* out = grad + row * V;
  if (t == ignore_index) {  // zero, whatever grad_loss is (a mean over 0 tokens gives inf)
    for (int64_t j = threadIdx.x; j < V; j += kThreads) out[j] = from_float<T>(0.f);
    return;
  }
  write_grad(x_base + row * stride, out, V, t, lse[row], grad_loss[row], eps, z);
}

template <typename T>
cudaError_t launch_fwd(const void* logits, const int64_t* targets, float* loss, float* lse, int64_t N, int64_t V,
                       int64_t stride, int64_t ignore_index, float eps, float z, cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  ce_fwd_kernel<T, false><<<static_cast<unsigned>(N), kThreads, 0, stream>>>(
      const_cast<T*>(static_cast<const T*>(logits)), targets, loss, lse, V, stride, ignore_index, eps, z, 0.f);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_fwd_bwd(void* logits, const int64_t* targets, float grad_scale, float* loss, float* lse, int64_t N,
                           int64_t V, int64_t ignore_index, float eps, float z, cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  ce_fwd_kernel<T, true><<<static_cast<unsigned>(N), kThreads, 0, stream>>>(
      static_cast<T*>(logits), targets, loss, lse, V, V, ignore_index, eps, z, grad_scale);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bwd(const float* grad_loss, const void* logits, const int64_t* targets, const float* lse,
                       void* grad, int64_t N, int64_t V, int64_t stride, int64_t ignore_index, float eps, float z,
                       cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  ce_bwd_kernel<T><<<static_cast<unsigned>(N), kThreads, 0, stream>>>(
      grad_loss, static_cast<const T*>(logits), targets, lse, static_cast<T*>(grad), V, stride, ignore_index, eps, z);
  return cudaGetLastError();
}

}  // namespace

cudaError_t cross_entropy_fwd(const void* logits, const int64_t* targets, float* loss, float* lse, int64_t N,
                              int64_t V, int64_t stride, int64_t ignore_index, float label_smoothing, float z_loss,
                              DType dtype, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return launch_fwd<float>(logits, targets, loss, lse, N, V, stride, ignore_index, label_smoothing, z_loss, stream);
    case DType::kFloat16:
      return launch_fwd<__half>(logits, targets, loss, lse, N, V, stride, ignore_index, label_smoothing, z_loss, stream);
    case DType::kBFloat16:
      return launch_fwd<__nv_bfloat16>(logits, targets, loss, lse, N, V, stride, ignore_index, label_smoothing, z_loss,
                                       stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t cross_entropy_bwd(const float* grad_loss, const void* logits, const int64_t* targets, const float* lse,
                              void* grad, int64_t N, int64_t V, int64_t stride, int64_t ignore_index,
                              float label_smoothing, float z_loss, DType dtype, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return launch_bwd<float>(grad_loss, logits, targets, lse, grad, N, V, stride, ignore_index, label_smoothing,
                               z_loss, stream);
    case DType::kFloat16:
      return launch_bwd<__half>(grad_loss, logits, targets, lse, grad, N, V, stride, ignore_index, label_smoothing,
                                z_loss, stream);
    case DType::kBFloat16:
      return launch_bwd<__nv_bfloat16>(grad_loss, logits, targets, lse, grad, N, V, stride, ignore_index,
                                       label_smoothing, z_loss, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t cross_entropy_fwd_bwd(void* logits, const int64_t* targets, float grad_scale, float* loss, float* lse,
                                  int64_t N, int64_t V, int64_t ignore_index, float label_smoothing, float z_loss,
                                  DType dtype, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return launch_fwd_bwd<float>(logits, targets, grad_scale, loss, lse, N, V, ignore_index, label_smoothing, z_loss,
                                   stream);
    case DType::kFloat16:
      return launch_fwd_bwd<__half>(logits, targets, grad_scale, loss, lse, N, V, ignore_index, label_smoothing,
                                    z_loss, stream);
    case DType::kBFloat16:
      return launch_fwd_bwd<__nv_bfloat16>(logits, targets, grad_scale, loss, lse, N, V, ignore_index,
                                           label_smoothing, z_loss, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace intro2llm
