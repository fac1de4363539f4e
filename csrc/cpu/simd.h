// Run-time SIMD dispatch for the CPU kernels.
//
// torch's own CPU kernels pick AVX2/AVX-512 at run time, but this extension is built without -march flags (the
// wheel must run on any x86-64), so at::vec::Vectorized falls back to its scalar base here: measured 1.4 ns per
// element for RMSNorm written with it, ~15x slower than a copy of the same data. Instead the hot loops are plain,
// branch-free C++ under `#pragma omp simd` (or GCC vector types) inside functions marked I2L_CLONES: GCC compiles
// them three times (x86-64-v4 = AVX-512, x86-64-v3 = AVX2+FMA, baseline SSE2) and the loader picks the best one
// for the CPU it runs on. Elsewhere (clang, non-x86, non-Linux) the attribute is empty and the baseline build runs.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define I2L_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define I2L_CLONES
#endif
#define I2L_INLINE inline __attribute__((always_inline))

namespace intro2llm {
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
}  // namespace intro2llm
