// RoPE (split-half / Hugging Face `rotate_half`) CUDA kernel, q and k in one launch. No ATen/c10 headers:
// compiles with plain `nvcc -c`.
//
// One block per (b, t) row: its threads walk the (H + Hkv) * D/2 rotation pairs of that row (consecutive
// threads take consecutive pairs of one head, so loads and stores coalesce), reading the cos/sin row from
// L1/L2 (T*D values reused by every head).       reads B*(H+Hkv)*T*D once, writes it once
//   forward   out1 = x1*c1 - x2*s1,   out2 = x2*c2 + x1*s2
//   backward  dx1  = g1*c1 + g2*s2,   dx2  = g2*c2 - g1*s1   (the transposed rotation)
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "rope.cuh"

namespace intro2llm {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T, bool BWD>
__global__ void rope_kernel(const T* __restrict__ q, const T* __restrict__ k, T* __restrict__ q_out,
                            T* __restrict__ k_out, const float* __restrict__ cos, const float* __restrict__ sin,
                            RopeView qv, RopeView kv, int64_t T_len, int64_t D, int64_t table_sb) {
  const int64_t b = blockIdx.x / T_len, t = blockIdx.x % T_len;
  const int64_t half = D / 2;
  const float* c = cos + b * table_sb + t * D;
  const float* s = sin + b * table_sb + t * D;
  const int64_t pairs = (qv.heads + kv.heads) * half;
  for (int64_t i = threadIdx.x; i < pairs; i += blockDim.x) {
    const int64_t hh = i / half, j = i % half;
    const bool is_q = hh < qv.heads;
    const RopeView& v = is_q ? qv : kv;
    const int64_t head = is_q ? hh : hh - qv.heads;
    const T* x = (is_q ? q : k) + b * v.sb + head * v.sh + t * v.st;
    T* o = (is_q ? q_out : k_out) + ((b * v.heads + head) * T_len + t) * D;
    const float x1 = to_float(x[j]), x2 = to_float(x[j + half]);
    const float c1 = c[j], c2 = c[j + half], s1 = s[j], s2 = s[j + half];
    if (BWD) {
      o[j] = from_float<T>(x1 * c1 + x2 * s2);
      o[j + half] = from_float<T>(x2 * c2 - x1 * s1);
    } else {
      o[j] = from_float<T>(x1 * c1 - x2 * s1);
      o[j + half] = from_float<T>(x2 * c2 + x1 * s2);
    }
  }
}

template <typename T>
cudaError_t launch(const void* q, const void* k, void* q_out, void* k_out, const float* cos, const float* sin,
                   RopeView qv, RopeView kv, int64_t B, int64_t T_len, int64_t D, int64_t table_sb, bool backward,
                   cudaStream_t stream) {
  if (B * T_len == 0 || D == 0 || qv.heads + kv.heads == 0) return cudaSuccess;
  const int64_t pairs = (qv.heads + kv.heads) * (D / 2);
  const int threads = pairs >= kThreads ? kThreads : static_cast<int>((pairs + 31) / 32 * 32);
  const dim3 grid(static_cast<unsigned>(B * T_len));
  const auto* qp = static_cast<const T*>(q);
  const auto* kp = static_cast<const T*>(k);
  auto* qo = static_cast<T*>(q_out);
  auto* ko = static_cast<T*>(k_out);
  if (backward) {
    rope_kernel<T, true><<<grid, threads, 0, stream>>>(qp, kp, qo, ko, cos, sin, qv, kv, T_len, D, table_sb);
  } else {
    rope_kernel<T, false><<<grid, threads, 0, stream>>>(qp, kp, qo, ko, cos, sin, qv, kv, T_len, D, table_sb);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t rope(const void* q, const void* k, void* q_out, void* k_out, const float* cos, const float* sin,
                 RopeView qv, RopeView kv, int64_t B, int64_t T, int64_t D, int64_t table_sb, bool backward,
                 DType dtype, cudaStream_t stream) {
  if (B * T > 0x7fffffffLL) return cudaErrorInvalidValue;  // one block per row: grid.x limit
  switch (dtype) {
    case DType::kFloat32:
      return launch<float>(q, k, q_out, k_out, cos, sin, qv, kv, B, T, D, table_sb, backward, stream);
    case DType::kFloat16:
      return launch<__half>(q, k, q_out, k_out, cos, sin, qv, kv, B, T, D, table_sb, backward, stream);
    case DType::kBFloat16:
      return launch<__nv_bfloat16>(q, k, q_out, k_out, cos, sin, qv, kv, B, T, D, table_sb, backward, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace intro2llm
