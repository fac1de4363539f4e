// Run-time SIMD dispatch for the CPU kernels.
//
// torch's own CPU kernels pick AVX2/AVX-512 at run time, but this extension is built without -march flags (the
// wheel must run on any x86-64), so at::vec::Vectorized falls back to its scalar base here (lesson 03's README
// has the figures: an order of magnitude slower than a copy of the same data). Instead the hot loops are plain,
// branch-free C++ under `#pragma omp simd` (or GCC vector types) inside functions marked I2L_CLONES: GCC compiles
// them three times (x86-64-v4 = AVX-512, x86-64-v3 = AVX2+FMA, baseline SSE2) and the loader picks the best one
// for the CPU it runs on. Elsewhere (clang, non-x86, non-Linux) the attribute is empty and the baseline build runs.
// The row kernels shared by several ops (RMSNorm, RoPE rows) are in rows.h.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define I2L_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define I2L_CLONES
#endif
#define I2L_INLINE inline __attribute__((always_inline))

// GCC if-converts float clamps and masked selects into vector min/max/blend only when FP compares may not trap
// (torch itself builds with -fno-trapping-math). Functions that should vectorize that way sit between these two
// lines; clang never traps there and needs nothing.
#if defined(__GNUC__) && !defined(__clang__)
#define I2L_NO_TRAPPING_MATH_BEGIN _Pragma("GCC push_options") _Pragma("GCC optimize(\"no-trapping-math\")")
#define I2L_NO_TRAPPING_MATH_END _Pragma("GCC pop_options")
#else
#define I2L_NO_TRAPPING_MATH_BEGIN
#define I2L_NO_TRAPPING_MATH_END
#endif

#pragma GCC diagnostic ignored "-Wpsabi"  // 64-byte vector types are passed only between inlined helpers

namespace intro2llm {

// 16 floats (and 16 int32) as one GCC/clang vector: one AVX-512 register in the x86-64-v4 clone, two AVX2 ones
// in v3, four SSE2 ones in the baseline build.
typedef float v16 __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
// 8 floats: one AVX2 register. Register-tiled kernels (a tile of accumulators kept in registers) use v16 tiles
// only where wide_vectors(): AVX2 has 16 registers of 8 floats, and a tile sized for AVX-512's 32 registers of 16
// spills to the stack there (flash attention ran at 0.1x SDPA that way); they take v8 tiles otherwise.
typedef float v8 __attribute__((vector_size(32)));

inline bool wide_vectors() {
#if defined(__GNUC__) && defined(__x86_64__)
  static const bool wide = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") != 0;
  }();
  return wide;
#else
  return false;
#endif
}

namespace {  // internal linkage: every kernel file gets its own clones

// bf16 <-> fp32 for staging buffers: integer-only loops that vectorize (at::vec::convert's portable
// fallback, which is what an extension built without -mavx2 gets, converts one element at a time and was the
// bottleneck of the bf16 path). fp32 -> bf16 rounds to nearest even and keeps NaNs quiet, like c10::BFloat16.
[[maybe_unused]] I2L_CLONES void bf16_to_f32(const uint16_t* __restrict src, float* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t bits = static_cast<uint32_t>(src[i]) << 16;
    std::memcpy(dst + i, &bits, sizeof(bits));
  }
}
[[maybe_unused]] I2L_CLONES void f32_to_bf16(const float* __restrict src, uint16_t* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, src + i, sizeof(bits));
    const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    dst[i] = static_cast<uint16_t>((bits & 0x7fffffffu) > 0x7f800000u ? ((bits >> 16) | 0x40u) : rounded);
  }
}

template <typename scalar_t>
inline void to_f32(const scalar_t* src, float* dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    bf16_to_f32(reinterpret_cast<const uint16_t*>(src), dst, n);
  } else {
    at::vec::convert(src, dst, n);
  }
}

template <typename scalar_t>
inline void from_f32(const float* src, scalar_t* dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    f32_to_bf16(src, reinterpret_cast<uint16_t*>(dst), n);
  } else {
    at::vec::convert(src, dst, n);
  }
}

}  // namespace

// The clamps below vectorize only without trapping math; callers that should vectorize sit in such a region too.
I2L_NO_TRAPPING_MATH_BEGIN
// Cephes expf's core: with n = round(x / ln2), exp(x) / 2^n = exp(r) for r = x − n·ln2 (Cody-Waite: ln2 split in
// two, so the reduction is exact), |r| ≤ ln2/2, by a degree-6 polynomial. T is float or a GCC float vector
// (swiglu.cpp's vexp); the caller clamps x and multiplies by 2^n.
template <typename T>
I2L_INLINE T exp_reduced(T x, T n) {
  const T r = x - n * 0.693359375f + n * 2.12194440e-4f;
  T p = T{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * r * r + r + 1.0f;
}

// exp(x) for x ≤ ~88 (Cephes expf, rel. error ~1e-7): exp_reduced times 2^n built in the exponent bits.
// Branch-free so the loops that call it vectorize. x is clamped to [-87, 88]: exp(-inf) and anything below -87
// give exp(-87) ≈ 1.6e-38, not 0 (callers that need an exact 0 for a masked entry select it themselves).
inline float exp_poly(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);  // ternaries, not std::min/max: they vectorize to min/max
  // n = round(x / ln2); floor via truncation of a positive number (x/ln2 >= -126), which vectorizes
  const int32_t ni = static_cast<int32_t>(x * 1.44269504088896341f + 128.5f) - 128;
  const float y = exp_reduced(x, static_cast<float>(ni));
  const int32_t bits = (ni + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(float));
  return y * two_n;
}

I2L_NO_TRAPPING_MATH_END

}  // namespace intro2llm
