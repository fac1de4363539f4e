// Flash attention CUDA kernels (forward, backward) with GQA/MQA, causal/sliding-window masks and a key padding
// mask. No ATen/c10 headers: compiles with plain `nvcc -c`.
//
// A simple, readable shared-memory tile design with fp32 accumulation (CUDA cores, no tensor cores):
// - forward: a block owns kRows = kWarps·kRowsPerWarp query rows of one head; K/V tiles of kTileN = 32 keys
//   are staged in shared memory (fp32) and streamed over the visible key range (hidden tiles skipped). Each
//   warp owns kRowsPerWarp rows: lane j scores key j of the tile (q row broadcast from shared memory), a warp
//   max/sum gives the online softmax update, and lanes split the head dim to accumulate P·V (p broadcast by
//   shuffles). Saves lse = m + log l.
// - backward: Δ = rowsum(O∘dO) (warp per row); dK/dV: a block owns kTileN keys of one kv head and loops over the
//   group's query heads and the query tiles that see them (lane = query row for the scores, lanes split the head
//   dim for the sums) — the GQA sum happens in registers, no atomics; dQ: like the forward, per query rows.
// K tiles are padded to D + 1 floats per row so that lanes reading different rows hit different banks.
// Not handled: head dims other than 16/32/64/128, dropout, additive biases. Speed is far from FlashAttention-2
// (no tensor cores); the Triton backend is the fast GPU path.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>
#include <cmath>

#include "flash_attention.cuh"

namespace intro2llm {
namespace cuda {
namespace flash {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRowsPerWarp = 4;
constexpr int kRows = kWarps * kRowsPerWarp;  // query rows per forward / dQ block
constexpr int kTileN = 32;                    // keys per tile (one per lane)
constexpr int kKeysPerWarp = kTileN / kWarps;  // dK/dV: keys owned by each warp
constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

// visible keys of query row i: [lo, hi)
__device__ __forceinline__ int64_t key_lo(const Shape& s, int64_t i) {
  if (s.window <= 0) return 0;
  const int64_t v = i + (s.Tk - s.Tq) - s.window + 1;
  return v < 0 ? 0 : (v > s.Tk ? s.Tk : v);
}
__device__ __forceinline__ int64_t key_hi(const Shape& s, int64_t i) {
  int64_t v = s.Tk;
  if (s.causal) v = i + (s.Tk - s.Tq) + 1;
  else if (s.window > 0) v = i + (s.Tk - s.Tq) + s.window;
  return v < 0 ? 0 : (v > s.Tk ? s.Tk : v);
}
__device__ __forceinline__ bool visible(const Shape& s, int64_t b, int64_t i, int64_t j) {
  return j >= key_lo(s, i) && j < key_hi(s, i) && (s.kpm == nullptr || s.kpm[b * s.Tk + j] != 0);
}

// Stage rows [r0, r0 + n) of a (T, D) matrix into shared memory as fp32 with row stride `ld`; rows past T are 0.
// A warp holds a D-wide row spread over its lanes: lane owns columns d = lane + 32·e, e < DPL = ceil(D / 32).
// acc += a · src over this lane's columns.
template <int D, int DPL>
__device__ __forceinline__ void axpy_lane_cols(float (&acc)[DPL], float a, const float* src, int lane) {
  #pragma unroll
  for (int e = 0; e < DPL; ++e) {
    const int d = lane + 32 * e;
    if (d < D) acc[e] += a * src[d];
  }
}

// dst = acc · scale in T, this lane's columns.
template <typename T, int D, int DPL>
__device__ __forceinline__ void store_lane_cols(T* dst, const float (&acc)[DPL], float scale, int lane) {
  #pragma unroll
  for (int e = 0; e < DPL; ++e) {
    const int d = lane + 32 * e;
    if (d < D) dst[d] = from_float<T>(acc[e] * scale);
  }
}

// The backward's recomputation for one (query, key) pair from rows in shared memory: p = exp(q·k · scale − lse) and
// dS = p (dO·v − Δ) · scale, returned as (p, dS).
template <int D>
__device__ __forceinline__ float2 p_and_ds(const float* q, const float* dout, const float* k, const float* v,
                                           float scale, float lse, float delta) {
  float sc = 0.f, dp = 0.f;
#pragma unroll 16
  for (int d = 0; d < D; ++d) {
    sc += q[d] * k[d];
    dp += dout[d] * v[d];
  }
  const float p = __expf(sc * scale - lse);
  return make_float2(p, p * (dp - delta) * scale);
}

template <typename T, int D>
__device__ void stage(float* dst, int ld, const T* src, int64_t r0, int n, int64_t Trows, float mul = 1.f) {
  for (int idx = threadIdx.x; idx < n * D; idx += kThreads) {
    const int r = idx / D, d = idx % D;
    dst[r * ld + d] = (r0 + r < Trows) ? to_float(src[(r0 + r) * D + d]) * mul : 0.f;
  }
}

// ---- forward ----------------------------------------------------------------------------------------------------
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) fa_fwd_kernel(Shape s, const T* __restrict__ q, const T* __restrict__ k,
                                                         const T* __restrict__ v, T* __restrict__ out,
                                                         float* __restrict__ lse) {
  constexpr int DPL = (D + 31) / 32;  // head-dim elements per lane
  extern __shared__ float smem[];
  float* qs = smem;                  // (kRows, D)      scaled q rows
  float* ks = qs + kRows * D;        // (kTileN, D + 1)
  float* vs = ks + kTileN * (D + 1);  // (kTileN, D)
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t bh = blockIdx.x, b = bh / s.H, h = bh % s.H, hk = h / (s.H / s.Hkv);
  const int64_t q0 = static_cast<int64_t>(blockIdx.y) * kRows;
  const T* qp = q + bh * s.Tq * D;
  const T* kp = k + (b * s.Hkv + hk) * s.Tk * D;
  const T* vp = v + (b * s.Hkv + hk) * s.Tk * D;
  stage<T, D>(qs, D, qp, q0, kRows, s.Tq, s.scale);

  float m[kRowsPerWarp], l[kRowsPerWarp], acc[kRowsPerWarp][DPL];
  #pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.f;
    #pragma unroll
    for (int e = 0; e < DPL; ++e) acc[r][e] = 0.f;
  }
  const int64_t last = (q0 + kRows < s.Tq ? q0 + kRows : s.Tq) - 1;
  const int64_t kstart = key_lo(s, q0), kend = key_hi(s, last);
  for (int64_t k0 = (kstart / kTileN) * kTileN; k0 < kend; k0 += kTileN) {
    __syncthreads();  // previous tile fully used (and qs staged, on the first pass)
    stage<T, D>(ks, D + 1, kp, k0, kTileN, s.Tk);
    stage<T, D>(vs, D, vp, k0, kTileN, s.Tk);
    __syncthreads();
    const int64_t j = k0 + lane;
    #pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int row = warp * kRowsPerWarp + r;
      const int64_t i = q0 + row;
      if (i >= s.Tq) break;  // warp-uniform
      float sc = -INFINITY;
      if (j < s.Tk && visible(s, b, i, j)) {
        sc = 0.f;
#pragma unroll 16
        for (int d = 0; d < D; ++d) sc += qs[row * D + d] * ks[lane * (D + 1) + d];
      }
      const float m_new = fmaxf(m[r], warp_max(sc));
      if (m_new == -INFINITY) continue;  // nothing visible yet (warp-uniform)
      const float p = (sc == -INFINITY) ? 0.f : __expf(sc - m_new);
      const float alpha = __expf(m[r] - m_new);  // 0 when m was -inf
      l[r] = l[r] * alpha + warp_sum(p);
      m[r] = m_new;
      #pragma unroll
      for (int e = 0; e < DPL; ++e) acc[r][e] *= alpha;
      for (int jj = 0; jj < kTileN; ++jj) {
        const float pj = __shfl_sync(kFull, p, jj);
        if (pj == 0.f) continue;  // warp-uniform: masked key
        axpy_lane_cols<D>(acc[r], pj, vs + jj * D, lane);
      }
    }
  }
  #pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t i = q0 + warp * kRowsPerWarp + r;
    if (i >= s.Tq) break;
    store_lane_cols<T, D>(out + (bh * s.Tq + i) * D, acc[r], l[r] > 0.f ? 1.f / l[r] : 0.f, lane);
    if (lane == 0) lse[bh * s.Tq + i] = l[r] > 0.f ? m[r] + logf(l[r]) : -INFINITY;
  }
}

// ---- backward ---------------------------------------------------------------------------------------------------
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) fa_bwd_preprocess_kernel(const T* __restrict__ out,
                                                                    const T* __restrict__ dout,
                                                                    float* __restrict__ delta, int64_t n_rows) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= n_rows) return;
  float acc = 0.f;
  for (int d = lane; d < D; d += 32) acc += to_float(out[row * D + d]) * to_float(dout[row * D + d]);
  acc = warp_sum(acc);
  if (lane == 0) delta[row] = acc;
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) fa_bwd_dkdv_kernel(Shape s, const T* __restrict__ q,
                                                              const T* __restrict__ k, const T* __restrict__ v,
                                                              const T* __restrict__ dout,
                                                              const float* __restrict__ lse,
                                                              const float* __restrict__ delta, T* __restrict__ dk,
                                                              T* __restrict__ dv) {
  constexpr int DPL = (D + 31) / 32;
  constexpr int kQTile = 32;  // query rows per step (one per lane)
  extern __shared__ float smem[];
  float* ks = smem;                     // (kTileN, D)
  float* vs = ks + kTileN * D;          // (kTileN, D)
  float* qs = vs + kTileN * D;          // (kQTile, D + 1)
  float* dos = qs + kQTile * (D + 1);   // (kQTile, D + 1)
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t bhk = blockIdx.x, b = bhk / s.Hkv, hk = bhk % s.Hkv, group = s.H / s.Hkv;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * kTileN;
  const int64_t offset = s.Tk - s.Tq;
  stage<T, D>(ks, D, k + bhk * s.Tk * D, k0, kTileN, s.Tk);
  stage<T, D>(vs, D, v + bhk * s.Tk * D, k0, kTileN, s.Tk);
  float dk_acc[kKeysPerWarp][DPL], dv_acc[kKeysPerWarp][DPL];
  #pragma unroll
  for (int kk = 0; kk < kKeysPerWarp; ++kk)
    #pragma unroll
    for (int e = 0; e < DPL; ++e) dk_acc[kk][e] = dv_acc[kk][e] = 0.f;
  // query rows that can see keys [k0, k0 + kTileN)
  int64_t qlo = 0, qhi = s.Tq;
  if (s.causal) qlo = k0 - offset;
  else if (s.window > 0) qlo = k0 - offset - s.window + 1;
  if (s.window > 0) qhi = k0 + kTileN - 1 - offset + s.window;
  qlo = qlo < 0 ? 0 : qlo;
  qhi = qhi > s.Tq ? s.Tq : qhi;
  for (int64_t g = 0; g < group; ++g) {
    const int64_t bh = b * s.H + hk * group + g;
    for (int64_t qt = qlo; qt < qhi; qt += kQTile) {
      __syncthreads();
      stage<T, D>(qs, D + 1, q + bh * s.Tq * D, qt, kQTile, s.Tq);
      stage<T, D>(dos, D + 1, dout + bh * s.Tq * D, qt, kQTile, s.Tq);
      __syncthreads();
      const int64_t i = qt + lane;  // this lane's query row
      const bool row_ok = i < s.Tq;
      const float lse_i = row_ok ? lse[bh * s.Tq + i] : -INFINITY;
      const float delta_i = row_ok ? delta[bh * s.Tq + i] : 0.f;
      #pragma unroll
      for (int kk = 0; kk < kKeysPerWarp; ++kk) {
        const int jl = warp * kKeysPerWarp + kk;
        const int64_t j = k0 + jl;
        float p = 0.f, ds = 0.f;
        if (row_ok && j < s.Tk && lse_i != -INFINITY && visible(s, b, i, j)) {
          const float2 pd = p_and_ds<D>(qs + lane * (D + 1), dos + lane * (D + 1), ks + jl * D, vs + jl * D, s.scale,
                                        lse_i, delta_i);
          p = pd.x;
          ds = pd.y;
        }
        // dV_j += Σ_i p_ij dO_i ;  dK_j += Σ_i dS_ij q_i   (lanes split the head dim)
        for (int ii = 0; ii < kQTile; ++ii) {
          const float pb = __shfl_sync(kFull, p, ii), db = __shfl_sync(kFull, ds, ii);
          if (pb == 0.f && db == 0.f) continue;  // warp-uniform
          axpy_lane_cols<D>(dv_acc[kk], pb, dos + ii * (D + 1), lane);
          axpy_lane_cols<D>(dk_acc[kk], db, qs + ii * (D + 1), lane);
        }
      }
    }
  }
  #pragma unroll
  for (int kk = 0; kk < kKeysPerWarp; ++kk) {
    const int64_t j = k0 + warp * kKeysPerWarp + kk;
    if (j >= s.Tk) break;
    store_lane_cols<T, D>(dk + (bhk * s.Tk + j) * D, dk_acc[kk], 1.f, lane);
    store_lane_cols<T, D>(dv + (bhk * s.Tk + j) * D, dv_acc[kk], 1.f, lane);
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) fa_bwd_dq_kernel(Shape s, const T* __restrict__ q,
                                                            const T* __restrict__ k, const T* __restrict__ v,
                                                            const T* __restrict__ dout, const float* __restrict__ lse,
                                                            const float* __restrict__ delta, T* __restrict__ dq) {
  constexpr int DPL = (D + 31) / 32;
  extern __shared__ float smem[];
  float* qs = smem;                   // (kRows, D)
  float* dos = qs + kRows * D;        // (kRows, D)
  float* ks = dos + kRows * D;        // (kTileN, D + 1)
  float* vs = ks + kTileN * (D + 1);  // (kTileN, D + 1)
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t bh = blockIdx.x, b = bh / s.H, h = bh % s.H, hk = h / (s.H / s.Hkv);
  const int64_t q0 = static_cast<int64_t>(blockIdx.y) * kRows;
  const T* kp = k + (b * s.Hkv + hk) * s.Tk * D;
  const T* vp = v + (b * s.Hkv + hk) * s.Tk * D;
  stage<T, D>(qs, D, q + bh * s.Tq * D, q0, kRows, s.Tq);
  stage<T, D>(dos, D, dout + bh * s.Tq * D, q0, kRows, s.Tq);
  float acc[kRowsPerWarp][DPL], lse_r[kRowsPerWarp], delta_r[kRowsPerWarp];
  #pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t i = q0 + warp * kRowsPerWarp + r;
    lse_r[r] = i < s.Tq ? lse[bh * s.Tq + i] : -INFINITY;
    delta_r[r] = i < s.Tq ? delta[bh * s.Tq + i] : 0.f;
    #pragma unroll
    for (int e = 0; e < DPL; ++e) acc[r][e] = 0.f;
  }
  const int64_t last = (q0 + kRows < s.Tq ? q0 + kRows : s.Tq) - 1;
  const int64_t kstart = key_lo(s, q0), kend = key_hi(s, last);
  for (int64_t k0 = (kstart / kTileN) * kTileN; k0 < kend; k0 += kTileN) {
    __syncthreads();
    stage<T, D>(ks, D + 1, kp, k0, kTileN, s.Tk);
    stage<T, D>(vs, D + 1, vp, k0, kTileN, s.Tk);
    __syncthreads();
    const int64_t j = k0 + lane;
    #pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int row = warp * kRowsPerWarp + r;
      const int64_t i = q0 + row;
      if (i >= s.Tq) break;
      float ds = 0.f;
      if (j < s.Tk && lse_r[r] != -INFINITY && visible(s, b, i, j)) {
        ds = p_and_ds<D>(qs + row * D, dos + row * D, ks + lane * (D + 1), vs + lane * (D + 1), s.scale, lse_r[r],
                         delta_r[r]).y;
      }
      for (int jj = 0; jj < kTileN; ++jj) {  // dQ_i += Σ_j dS_ij k_j
        const float dj = __shfl_sync(kFull, ds, jj);
        if (dj == 0.f) continue;
        axpy_lane_cols<D>(acc[r], dj, ks + jj * (D + 1), lane);
      }
    }
  }
  #pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t i = q0 + warp * kRowsPerWarp + r;
    if (i >= s.Tq) break;
    store_lane_cols<T, D>(dq + (bh * s.Tq + i) * D, acc[r], 1.f, lane);
  }
}

// ---- launchers --------------------------------------------------------------------------------------------------
// More than 48 KB of dynamic shared memory must be opted into per kernel (D = 128 needs up to ~66 KB).
template <typename K>
cudaError_t allow_smem(K kernel, size_t smem) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
}

unsigned ceil_div(int64_t a, int64_t b) { return static_cast<unsigned>((a + b - 1) / b); }

template <typename T, int D>
cudaError_t fwd(const Shape& s, const void* q, const void* k, const void* v, void* out, float* lse,
                cudaStream_t stream) {
  const size_t smem = sizeof(float) * (kRows * D + kTileN * (D + 1) + kTileN * D);
  auto kernel = fa_fwd_kernel<T, D>;
  cudaError_t err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(s.B * s.H), ceil_div(s.Tq, kRows));
  kernel<<<grid, kThreads, smem, stream>>>(s, static_cast<const T*>(q), static_cast<const T*>(k),
                                           static_cast<const T*>(v), static_cast<T*>(out), lse);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t bwd(const Shape& s, const void* dout, const void* q, const void* k, const void* v, const void* out,
                const float* lse, float* delta, void* dq, void* dk, void* dv, cudaStream_t stream) {
  const int64_t n_rows = s.B * s.H * s.Tq;
  fa_bwd_preprocess_kernel<T, D><<<ceil_div(n_rows, kWarps), kThreads, 0, stream>>>(
      static_cast<const T*>(out), static_cast<const T*>(dout), delta, n_rows);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const size_t smem_kv = sizeof(float) * (2 * kTileN * D + 2 * 32 * (D + 1));
  auto kv_kernel = fa_bwd_dkdv_kernel<T, D>;
  if ((err = allow_smem(kv_kernel, smem_kv)) != cudaSuccess) return err;
  kv_kernel<<<dim3(static_cast<unsigned>(s.B * s.Hkv), ceil_div(s.Tk, kTileN)), kThreads, smem_kv, stream>>>(
      s, static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), static_cast<const T*>(dout),
      lse, delta, static_cast<T*>(dk), static_cast<T*>(dv));
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  const size_t smem_q = sizeof(float) * (2 * kRows * D + 2 * kTileN * (D + 1));
  auto q_kernel = fa_bwd_dq_kernel<T, D>;
  if ((err = allow_smem(q_kernel, smem_q)) != cudaSuccess) return err;
  q_kernel<<<dim3(static_cast<unsigned>(s.B * s.H), ceil_div(s.Tq, kRows)), kThreads, smem_q, stream>>>(
      s, static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), static_cast<const T*>(dout),
      lse, delta, static_cast<T*>(dq));
  return cudaGetLastError();
}

template <typename T>
cudaError_t fwd_d(const Shape& s, const void* q, const void* k, const void* v, void* out, float* lse,
                  cudaStream_t st) {
  switch (s.D) {
    case 16: return fwd<T, 16>(s, q, k, v, out, lse, st);
    case 32: return fwd<T, 32>(s, q, k, v, out, lse, st);
    case 64: return fwd<T, 64>(s, q, k, v, out, lse, st);
    case 128: return fwd<T, 128>(s, q, k, v, out, lse, st);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T>
cudaError_t bwd_d(const Shape& s, const void* dout, const void* q, const void* k, const void* v, const void* out,
                  const float* lse, float* delta, void* dq, void* dk, void* dv, cudaStream_t st) {
  switch (s.D) {
    case 16: return bwd<T, 16>(s, dout, q, k, v, out, lse, delta, dq, dk, dv, st);
    case 32: return bwd<T, 32>(s, dout, q, k, v, out, lse, delta, dq, dk, dv, st);
    case 64: return bwd<T, 64>(s, dout, q, k, v, out, lse, delta, dq, dk, dv, st);
    case 128: return bwd<T, 128>(s, dout, q, k, v, out, lse, delta, dq, dk, dv, st);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t flash_attention_fwd(const Shape& s, const void* q, const void* k, const void* v, void* out, float* lse,
                                DType dtype, cudaStream_t stream) {
  if (s.B * s.H == 0 || s.Tq == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32: return fwd_d<float>(s, q, k, v, out, lse, stream);
    case DType::kFloat16: return fwd_d<__half>(s, q, k, v, out, lse, stream);
    case DType::kBFloat16: return fwd_d<__nv_bfloat16>(s, q, k, v, out, lse, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t flash_attention_bwd(const Shape& s, const void* grad_out, const void* q, const void* k, const void* v,
                                const void* out, const float* lse, float* delta, void* dq, void* dk, void* dv,
                                DType dtype, cudaStream_t stream) {
  if (s.B * s.H == 0 || s.Tq == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32: return bwd_d<float>(s, grad_out, q, k, v, out, lse, delta, dq, dk, dv, stream);
    case DType::kFloat16: return bwd_d<__half>(s, grad_out, q, k, v, out, lse, delta, dq, dk, dv, stream);
    case DType::kBFloat16:
      return bwd_d<__nv_bfloat16>(s, grad_out, q, k, v, out, lse, delta, dq, dk, dv, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace flash
}  // namespace cuda
}  // namespace intro2llm
