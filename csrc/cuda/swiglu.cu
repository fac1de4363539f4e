// SwiGLU / GeGLU CUDA kernels: out = act(gate) * up and its backward (activation recomputed). No ATen/c10
// headers: compiles with plain `nvcc -c`.
//
// Elementwise, grid-stride; each thread handles kUnroll elements one block-width apart per step so that every
// warp access is coalesced and several loads are in flight. fp32 math, one rounding at the store.
//   forward  reads 2N, writes N;   backward reads 3N, writes 2N
//   silu' = s (1 + x (1 - s));  gelu' = Phi(x) + x phi(x);
//   gelu_tanh(x) = x * sigmoid(2u), u = sqrt(2/pi)(x + 0.044715 x^3)   (0.5 (1 + tanh u) = sigmoid(2u))
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "swiglu.cuh"

namespace intro2llm {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;

__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

// act(x); with D = true also act'(x) in *da.
template <int ACT, bool D>
__device__ __forceinline__ float act(float x, float* da) {
  if (ACT == 0) {
    const float s = sigmoid(x);
    if (D) *da = s * (1.f + x * (1.f - s));
    return x * s;
  } else if (ACT == 1) {
    const float cdf = 0.5f * (1.f + erff(x * 0.70710678118654752f));
    if (D) *da = cdf + x * 0.39894228040143268f * expf(-0.5f * x * x);
    return x * cdf;
  } else {
    const float kk = sigmoid(1.5957691216057308f * (x + 0.044715f * x * x * x));  // = 0.5 (1 + tanh u)
    if (D) *da = kk + x * kk * (1.f - kk) * 1.5957691216057308f * (1.f + 0.134145f * x * x);
    return x * kk;
  }
}

template <typename T, int ACT>
__global__ void glu_fwd_kernel(const T* __restrict__ g, const T* __restrict__ u, T* __restrict__ out, int64_t n) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads * kUnroll;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kThreads * kUnroll + threadIdx.x; base < n; base += step) {
    float gv[kUnroll], uv[kUnroll];
#pragma unroll
    for (int r = 0; r < kUnroll; ++r) {
      const int64_t i = base + r * kThreads;
      gv[r] = i < n ? to_float(g[i]) : 0.f;
      uv[r] = i < n ? to_float(u[i]) : 0.f;
    }
#pragma unroll
    for (int r = 0; r < kUnroll; ++r) {
      const int64_t i = base + r * kThreads;
      if (i < n) out[i] = from_float<T>(act<ACT, false>(gv[r], nullptr) * uv[r]);
    }
  }
}

template <typename T, int ACT>
__global__ void glu_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ g, const T* __restrict__ u,
                               T* __restrict__ dg, T* __restrict__ du, int64_t n) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads * kUnroll;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kThreads * kUnroll + threadIdx.x; base < n; base += step) {
    float yv[kUnroll], gv[kUnroll], uv[kUnroll];
#pragma unroll
    for (int r = 0; r < kUnroll; ++r) {
      const int64_t i = base + r * kThreads;
      yv[r] = i < n ? to_float(dy[i]) : 0.f;
      gv[r] = i < n ? to_float(g[i]) : 0.f;
      uv[r] = i < n ? to_float(u[i]) : 0.f;
    }
#pragma unroll
    for (int r = 0; r < kUnroll; ++r) {
      const int64_t i = base + r * kThreads;
      if (i < n) {
        float da;
        const float a = act<ACT, true>(gv[r], &da);
        dg[i] = from_float<T>(yv[r] * uv[r] * da);
        du[i] = from_float<T>(yv[r] * a);
      }
    }
  }
}

unsigned grid_for(int64_t n) {
  const int64_t per_block = static_cast<int64_t>(kThreads) * kUnroll;
  const int64_t blocks = (n + per_block - 1) / per_block;
  return static_cast<unsigned>(blocks < 65535 * 8 ? blocks : 65535 * 8);  // grid-stride covers the rest
}

template <typename T, int ACT>
cudaError_t launch_fwd(const void* g, const void* u, void* out, int64_t n, cudaStream_t stream) {
  glu_fwd_kernel<T, ACT><<<grid_for(n), kThreads, 0, stream>>>(static_cast<const T*>(g), static_cast<const T*>(u),
                                                                static_cast<T*>(out), n);
  return cudaGetLastError();
}

template <typename T, int ACT>
cudaError_t launch_bwd(const void* dy, const void* g, const void* u, void* dg, void* du, int64_t n,
                       cudaStream_t stream) {
  glu_bwd_kernel<T, ACT><<<grid_for(n), kThreads, 0, stream>>>(static_cast<const T*>(dy), static_cast<const T*>(g),
                                                                static_cast<const T*>(u), static_cast<T*>(dg),
                                                                static_cast<T*>(du), n);
  return cudaGetLastError();
}

template <typename T>
cudaError_t fwd_for_type(const void* g, const void* u, void* out, int64_t n, GluAct a, cudaStream_t stream) {
  switch (a) {
    case GluAct::kSilu: return launch_fwd<T, 0>(g, u, out, n, stream);
    case GluAct::kGelu: return launch_fwd<T, 1>(g, u, out, n, stream);
    case GluAct::kGeluTanh: return launch_fwd<T, 2>(g, u, out, n, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t bwd_for_type(const void* dy, const void* g, const void* u, void* dg, void* du, int64_t n, GluAct a,
                         cudaStream_t stream) {
  switch (a) {
    case GluAct::kSilu: return launch_bwd<T, 0>(dy, g, u, dg, du, n, stream);
    case GluAct::kGelu: return launch_bwd<T, 1>(dy, g, u, dg, du, n, stream);
    case GluAct::kGeluTanh: return launch_bwd<T, 2>(dy, g, u, dg, du, n, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t glu_fwd(const void* gate, const void* up, void* out, int64_t n, GluAct act, DType dtype,
                    cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32: return fwd_for_type<float>(gate, up, out, n, act, stream);
    case DType::kFloat16: return fwd_for_type<__half>(gate, up, out, n, act, stream);
    case DType::kBFloat16: return fwd_for_type<__nv_bfloat16>(gate, up, out, n, act, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t glu_bwd(const void* grad, const void* gate, const void* up, void* d_gate, void* d_up, int64_t n,
                    GluAct act, DType dtype, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32: return bwd_for_type<float>(grad, gate, up, d_gate, d_up, n, act, stream);
    case DType::kFloat16: return bwd_for_type<__half>(grad, gate, up, d_gate, d_up, n, act, stream);
    case DType::kBFloat16: return bwd_for_type<__nv_bfloat16>(grad, gate, up, d_gate, d_up, n, act, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace intro2llm
