// Row kernels shared by several CPU ops: RMSNorm of one row (rms_norm.cpp and the fused decode step) and RoPE
// rows (rope.cpp and the fused decode step). One copy each, so the decode step computes exactly what the ops do.
#pragma once

#include "simd.h"

namespace intro2llm {
namespace {

// RMSNorm of one fp32 row (csrc/cpu/rms_norm.cpp, and the fused decode step): y = x * r * w, returns
// r = 1/sqrt(mean(x^2) + eps).
[[maybe_unused]] I2L_CLONES float rms_fwd_row(const float* __restrict x, const float* __restrict w,
                                              float* __restrict y, int64_t N, float eps) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t d = 0; d < N; ++d) ss += x[d] * x[d];
  const float r = 1.f / std::sqrt(ss / static_cast<float>(N) + eps);
#pragma omp simd
  for (int64_t d = 0; d < N; ++d) y[d] = x[d] * r * w[d];
  return r;
}

// RoPE (split-half) of one row of h pairs: out = rotate(x) with table rows c, s (fp32, D = 2h values each); BWD:
// the transposed rotation. out may be x itself (each pair is read before it is written). Used by rope.cpp and
// the fused decode step.
template <bool BWD>
I2L_INLINE void rope_row(const float* x, const float* __restrict c, const float* __restrict s, float* out, int64_t h) {
#pragma omp simd
  for (int64_t j = 0; j < h; ++j) {
    const float x1 = x[j], x2 = x[h + j];
    if constexpr (BWD) {
      out[j] = x1 * c[j] + x2 * s[h + j];
      out[h + j] = x2 * c[h + j] - x1 * s[j];
    } else {
      out[j] = x1 * c[j] - x2 * s[j];
      out[h + j] = x2 * c[h + j] + x1 * s[h + j];
    }
  }
}

// `n` consecutive positions of one (batch, head): input rows `x_stride` apart, output and table rows contiguous.
template <bool BWD>
I2L_CLONES void rope_rows(const float* x, int64_t x_stride, const float* c, const float* s, float* out, int64_t n,
                          int64_t D) {
  for (int64_t t = 0; t < n; ++t) rope_row<BWD>(x + t * x_stride, c + t * D, s + t * D, out + t * D, D / 2);
}

}  // namespace
}  // namespace intro2llm
