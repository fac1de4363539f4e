// NF4 CUDA kernels: blockwise dequantization and the fused dequantize-GEMV y = x @ dequant(W)ᵀ (+ bias).
// No ATen/c10 headers: compiles with plain `nvcc -c`.
//
// Dequantize: one thread per 8 elements (4 packed bytes, one scale when the group is 8-aligned), grid-stride.
// Matmul (small M): a block of kWarps warps, one warp per row n of W; each lane decodes 8 consecutive elements
// of the row at a time (one 32-bit load when aligned), multiplies them into up to kMTile token accumulators
// (x rows read through L1/L2), then a warp-shuffle sum per token. Reads the packed row once per kMTile tokens:
// N·K/2 bytes + N·K/blocksize scales instead of dequantize + GEMM's write and re-read of the N·K weight.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "nf4.cuh"

namespace intro2llm {
namespace cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kMTile = 8;

__constant__ float kNF4[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f,
};

__device__ __forceinline__ float decode_one(const uint8_t* packed, const float* absmax, int shift, int64_t e) {
  const unsigned byte = packed[e >> 1];
  const unsigned code = (e & 1) ? (byte & 15u) : (byte >> 4);
  return kNF4[code] * absmax[e >> shift];
}

// v[j] = W.flat[e + j] for j < 8 (all inside W); fast when e is a multiple of 8 (4 aligned bytes, one scale).
__device__ __forceinline__ void decode8(const uint8_t* packed, const float* absmax, int shift, int64_t e, float v[8]) {
  if ((e & 7) == 0) {
    const uint32_t word = *reinterpret_cast<const uint32_t*>(packed + (e >> 1));
    const float s = absmax[e >> shift];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const unsigned byte = (word >> (8 * j)) & 0xffu;
      v[2 * j] = kNF4[byte >> 4] * s;
      v[2 * j + 1] = kNF4[byte & 15u] * s;
    }
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = decode_one(packed, absmax, shift, e + j);
  }
}

template <typename T>
__global__ void nf4_dequantize_kernel(const uint8_t* __restrict__ packed, const float* __restrict__ absmax, int shift,
                                      int64_t e0, int64_t count, T* __restrict__ out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * 8;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * 8; i < count; i += stride) {
    if (i + 8 <= count) {
      float v[8];
      decode8(packed, absmax, shift, e0 + i, v);
#pragma unroll
      for (int j = 0; j < 8; ++j) out[i + j] = from_float<T>(v[j]);
    } else {
      for (int64_t j = i; j < count; ++j) out[j] = from_float<T>(decode_one(packed, absmax, shift, e0 + j));
    }
  }
}

template <typename T>
__global__ void nf4_matmul_fwd_kernel(const T* __restrict__ x, const uint8_t* __restrict__ packed,
                                      const float* __restrict__ absmax, const float* __restrict__ bias,
                                      T* __restrict__ y, int64_t M, int64_t N, int64_t K, int shift) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kMTile;
  if (n >= N) return;
  const int mt = static_cast<int>(M - m0 < kMTile ? M - m0 : kMTile);
  float acc[kMTile];
#pragma unroll
  for (int m = 0; m < kMTile; ++m) acc[m] = 0.f;
  const int64_t row = n * K;
  // the row is cut into groups of 8 elements whose flat start is 8-aligned (one aligned 32-bit load each), plus a
  // short first group of `head` elements when the row itself does not start 8-aligned; lane l takes groups l + 32i
  const int64_t head = (8 - (row & 7)) & 7;
  for (int64_t g = lane;; g += 32) {
    const int64_t k = head == 0 ? 8 * g : (g == 0 ? 0 : head + 8 * (g - 1));
    if (k >= K) break;
    int64_t len = (head != 0 && g == 0) ? head : 8;
    if (k + len > K) len = K - k;
    float v[8];
    if (len == 8) {
      decode8(packed, absmax, shift, row + k, v);
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) v[j] = j < len ? decode_one(packed, absmax, shift, row + k + j) : 0.f;
    }
#pragma unroll
    for (int m = 0; m < kMTile; ++m) {
      if (m < mt) {
        const T* xr = x + (m0 + m) * K + k;
        float s = 0.f;
#pragma unroll
        for (int j = 0; j < 8; ++j) s += j < len ? to_float(xr[j]) * v[j] : 0.f;
        acc[m] += s;
      }
    }
  }
#pragma unroll
  for (int m = 0; m < kMTile; ++m) {
    float v = acc[m];
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffff, v, offset);
    if (lane == 0 && m < mt) y[(m0 + m) * N + n] = from_float<T>(v + (bias ? bias[n] : 0.f));
  }
}

template <typename T>
cudaError_t launch_dequantize(const uint8_t* packed, const float* absmax, int shift, int64_t e0, int64_t count,
                              void* out, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  const int threads = 256;
  const int64_t groups = (count + 7) / 8;
  const unsigned blocks = static_cast<unsigned>(groups / threads + 1 < 65535 * 16 ? groups / threads + 1 : 65535 * 16);
  nf4_dequantize_kernel<T><<<blocks, threads, 0, stream>>>(packed, absmax, shift, e0, count, static_cast<T*>(out));
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_fwd(const void* x, const uint8_t* packed, const float* absmax, const float* bias, void* y,
                       int64_t M, int64_t N, int64_t K, int shift, cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>((N + kWarps - 1) / kWarps), static_cast<unsigned>((M + kMTile - 1) / kMTile));
  nf4_matmul_fwd_kernel<T><<<grid, kWarps * 32, 0, stream>>>(static_cast<const T*>(x), packed, absmax, bias,
                                                             static_cast<T*>(y), M, N, K, shift);
  return cudaGetLastError();
}

}  // namespace

cudaError_t nf4_dequantize(const uint8_t* packed, const float* absmax, int shift, int64_t e0, int64_t count,
                           void* out, DType dtype, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return launch_dequantize<float>(packed, absmax, shift, e0, count, out, stream);
    case DType::kFloat16: return launch_dequantize<__half>(packed, absmax, shift, e0, count, out, stream);
    case DType::kBFloat16: return launch_dequantize<__nv_bfloat16>(packed, absmax, shift, e0, count, out, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t nf4_matmul_fwd(const void* x, const uint8_t* packed, const float* absmax, const float* bias, void* y,
                           int64_t M, int64_t N, int64_t K, int shift, DType dtype, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return launch_fwd<float>(x, packed, absmax, bias, y, M, N, K, shift, stream);
    case DType::kFloat16: return launch_fwd<__half>(x, packed, absmax, bias, y, M, N, K, shift, stream);
    case DType::kBFloat16: return launch_fwd<__nv_bfloat16>(x, packed, absmax, bias, y, M, N, K, shift, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace intro2llm
