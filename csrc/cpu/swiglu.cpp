// SwiGLU / GeGLU on CPU: out = act(gate) * up in one pass, and the backward in one pass (activation recomputed).
//
// act: silu(x) = x*sigmoid(x);  gelu(x) = x*Phi(x) = 0.5x(1 + erf(x/sqrt2));
//      gelu_tanh(x) = 0.5x(1 + tanh(u)) = x*sigmoid(2u), u = sqrt(2/pi)(x + 0.044715x^3)
// Backward: d_gate = g * up * act'(x),  d_up = g * act(x).
// Traffic: forward reads 2N, writes N (eager silu-then-multiply: reads 3N, writes 2N, plus an N temporary);
// backward reads 3N, writes 2N.
//
// The math runs on 16-wide GCC/Clang vector types with polynomial exp/erf (Cephes expf, Abramowitz-Stegun
// 7.1.26 erf, the same one ATen vectorizes); on x86-64 Linux with GCC each hot loop is cloned for x86-64-v4
// (AVX-512) and x86-64-v3 (AVX2+FMA) and picked at load time (target_clones: no -march=native, the binary
// still runs on any x86-64). Scalar std::exp made this compute-bound. Work is split over elements with at::parallel_for; bf16/fp16 blocks are widened to
// fp32 on the stack. Outputs of 32 MB and more use streaming stores (see vstream).
//
// Outputs are huge-page-advised (huge_pages.h): at (4096, 14336) fp32 the 4 KB page faults of a fresh 235 MB
// output cost more than the arithmetic and the reads together. Figures: benchmarks/bench_swiglu.py, lesson 03's
// README.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "huge_pages.h"
#include "op_checks.h"
#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

#if defined(__x86_64__)
#include <immintrin.h>  // _mm_stream_ps, _mm_sfence (SSE: every x86-64)
#define I2L_HAVE_STREAM 1
#else
#define I2L_HAVE_STREAM 0
#endif

namespace intro2llm {
namespace {

enum Act : int { kSilu = 0, kGelu = 1, kGeluTanh = 2 };

// Explicit 16-wide vectors (v16, simd.h). Plain scalar loops do not vectorize here: without -fno-trapping-math
// the compiler keeps the float compare-selects of the exp clamp as branches.
constexpr int64_t W = 16;

I2L_INLINE v16 splat(float v) { return v16{} + v; }
I2L_INLINE v16 vload(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
I2L_INLINE void vstore(float* p, v16 v) { std::memcpy(p, &v, sizeof(v)); }
I2L_INLINE v16 vabs(v16 x) { return (v16)((v16i)x & 0x7fffffff); }
I2L_INLINE v16 vcopysign(v16 mag, v16 sgn) {
  return (v16)(((v16i)mag & 0x7fffffff) | ((v16i)sgn & static_cast<int32_t>(0x80000000u)));
}

// exp(x), ~2 ulp for x in [-87, 88] (Cephes expf); exactly 0 below -87 and +inf above log(FLT_MAX) = 88.72,
// as expf (within 1.6e-38 of it below -87). Stand-ins such as exp(-87) ~ 1.6e-38 for 0 are no saturation once a
// caller multiplies by a huge x: silu(-1e36) = -1e36 * sigmoid(-1e36) came out -6e-3 instead of -0.
I2L_INLINE v16 vexp(v16 x) {
  const v16 x0 = x;
  x = x < splat(-87.0f) ? splat(-87.0f) : x;
  x = x > splat(88.0f) ? splat(88.0f) : x;
  // n = round(x / ln2), by truncating a positive number (t + 128.5 > 0 for x >= -87)
  const v16i n = __builtin_convertvector(x * 1.44269504088896341f + 128.5f, v16i) - 128;
  const v16 y = exp_reduced(x, __builtin_convertvector(n, v16));  // simd.h
  const v16 r = y * (v16)((n + 127) << 23);  // times 2^n, built in the exponent bits
  const v16 big = x0 > splat(88.7228391f) ? splat(__builtin_inff()) : r;
  return x0 < splat(-87.0f) ? splat(0.0f) : big;
}

I2L_INLINE v16 vsigmoid(v16 x) { return 1.0f / (1.0f + vexp(-x)); }

// erf(x), |error| <= 1.5e-7 (Abramowitz & Stegun 7.1.26, the formula ATen's vectorized erf uses).
I2L_INLINE v16 verf(v16 x) {
  const v16 ax = vabs(x);
  const v16 t = 1.0f / (1.0f + 0.3275911f * ax);
  v16 p = splat(1.061405429f);
  p = p * t - 1.453152027f;
  p = p * t + 1.421413741f;
  p = p * t - 0.284496736f;
  p = p * t + 0.254829592f;
  return vcopysign(1.0f - p * t * vexp(-ax * ax), x);
}

constexpr float kSqrt1_2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constexpr float kSqrt2OverPi = 0.79788456080286536f;
constexpr float kGeluC = 0.044715f;

// act(x)
template <int ACT>
I2L_INLINE v16 act_fwd(v16 x) {
  if constexpr (ACT == kSilu) {
    return x * vsigmoid(x);
  } else if constexpr (ACT == kGelu) {
    return 0.5f * x * (1.0f + verf(x * kSqrt1_2));
  } else {  // 0.5 (1 + tanh(u)) = sigmoid(2u): no cancellation near u = 0
    return x * vsigmoid(2.0f * kSqrt2OverPi * (x + kGeluC * x * x * x));
  }
}

// act(x) and act'(x)
template <int ACT>
I2L_INLINE void act_fwd_bwd(v16 x, v16& a, v16& da) {
  if constexpr (ACT == kSilu) {
    const v16 s = vsigmoid(x);
    a = x * s;
    da = s * (1.0f + x * (1.0f - s));
  } else if constexpr (ACT == kGelu) {
    const v16 cdf = 0.5f * (1.0f + verf(x * kSqrt1_2));
    a = x * cdf;
    da = cdf + x * kInvSqrt2Pi * vexp(-0.5f * x * x);
  } else {
    const v16 k = vsigmoid(2.0f * kSqrt2OverPi * (x + kGeluC * x * x * x));
    a = x * k;
    // x^2 capped: past |x| ~ 1e19 it overflows, and k (1 - k), exactly 0 there, times inf gave NaN, not 0.
    const v16 x2 = x * x;
    const v16 x2c = x2 > splat(1e30f) ? splat(1e30f) : x2;
    da = k + x * k * (1.0f - k) * (2.0f * kSqrt2OverPi) * (1.0f + 3.0f * kGeluC * x2c);
  }
}

// Non-temporal store of one vector (64-byte aligned `p`): the line goes to memory without being read first
// (no read-for-ownership) and without evicting the inputs from the cache. Used only for outputs far larger
// than the cache, which nothing reads back soon; saves 1 of the forward's 4 memory transfers.
I2L_INLINE void vstream(float* p, v16 v) {
#if I2L_HAVE_STREAM
  __m128 parts[4];
  std::memcpy(parts, &v, sizeof(v));
  for (int j = 0; j < 4; ++j) _mm_stream_ps(p + 4 * j, parts[j]);
#else
  vstore(p, v);
#endif
}

I2L_INLINE void stream_fence() {
#if I2L_HAVE_STREAM
  _mm_sfence();  // streaming stores are weakly ordered: publish them before the threads join
#endif
}

// Elements before `p` reaches a 64-byte boundary (at most n).
I2L_INLINE int64_t to_line(const float* p, int64_t n) {
  const auto misalign = static_cast<int64_t>(reinterpret_cast<uintptr_t>(p) & 63);
  return std::min<int64_t>(n, ((64 - misalign) & 63) / static_cast<int64_t>(sizeof(float)));
}

template <int ACT, bool NT>
I2L_INLINE void fwd_body(const float* g, const float* u, float* out, int64_t n) {
  int64_t i = 0;
  if constexpr (NT) {
    i = to_line(out, n);
    fwd_body<ACT, false>(g, u, out, i);
  }
  for (; i + W <= n; i += W) {
    const v16 r = act_fwd<ACT>(vload(g + i)) * vload(u + i);
    if constexpr (NT) {
      vstream(out + i, r);
    } else {
      vstore(out + i, r);
    }
  }
  if (i < n) {  // tail: pad one vector with zeros
    float gb[W] = {}, ub[W] = {}, ob[W];
    std::memcpy(gb, g + i, (n - i) * sizeof(float));
    std::memcpy(ub, u + i, (n - i) * sizeof(float));
    vstore(ob, act_fwd<ACT>(vload(gb)) * vload(ub));
    std::memcpy(out + i, ob, (n - i) * sizeof(float));
  }
  if constexpr (NT) stream_fence();
}

template <int ACT, bool NT>
I2L_INLINE void bwd_step(const float* dy, const float* g, const float* u, float* dg, float* du) {
  v16 a, da;
  act_fwd_bwd<ACT>(vload(g), a, da);
  const v16 d = vload(dy);
  if constexpr (NT) {
    vstream(dg, d * vload(u) * da);
    vstream(du, d * a);
  } else {
    vstore(dg, d * vload(u) * da);
    vstore(du, d * a);
  }
}

// NT requires dg and du at the same offset from a 64-byte boundary (the caller checks).
template <int ACT, bool NT>
I2L_INLINE void bwd_body(const float* dy, const float* g, const float* u, float* dg, float* du, int64_t n) {
  int64_t i = 0;
  if constexpr (NT) {
    i = to_line(dg, n);
    bwd_body<ACT, false>(dy, g, u, dg, du, i);
  }
  for (; i + W <= n; i += W) bwd_step<ACT, NT>(dy + i, g + i, u + i, dg + i, du + i);
  if (i < n) {
    float yb[W] = {}, gb[W] = {}, ub[W] = {}, dgb[W], dub[W];
    std::memcpy(yb, dy + i, (n - i) * sizeof(float));
    std::memcpy(gb, g + i, (n - i) * sizeof(float));
    std::memcpy(ub, u + i, (n - i) * sizeof(float));
    bwd_step<ACT, false>(yb, gb, ub, dgb, dub);
    std::memcpy(dg + i, dgb, (n - i) * sizeof(float));
    std::memcpy(du + i, dub, (n - i) * sizeof(float));
  }
  if constexpr (NT) stream_fence();
}

// The hot loops, one non-template function per activation so that target_clones applies; `nt` picks
// streaming stores.
#define I2L_GLU_ENTRY(name, ACT)                                                                            \
  I2L_CLONES void name##_fwd_f32(const float* g, const float* u, float* out, int64_t n, bool nt) {          \
    if (nt) {                                                                                               \
      fwd_body<ACT, true>(g, u, out, n);                                                                    \
    } else {                                                                                                \
      fwd_body<ACT, false>(g, u, out, n);                                                                   \
    }                                                                                                       \
  }                                                                                                         \
  I2L_CLONES void name##_bwd_f32(const float* dy, const float* g, const float* u, float* dg, float* du,     \
                                 int64_t n, bool nt) {                                                      \
    if (nt) {                                                                                               \
      bwd_body<ACT, true>(dy, g, u, dg, du, n);                                                             \
    } else {                                                                                                \
      bwd_body<ACT, false>(dy, g, u, dg, du, n);                                                            \
    }                                                                                                       \
  }
I2L_GLU_ENTRY(silu, kSilu)
I2L_GLU_ENTRY(gelu, kGelu)
I2L_GLU_ENTRY(gelu_tanh, kGeluTanh)
#undef I2L_GLU_ENTRY

using FwdFn = void (*)(const float*, const float*, float*, int64_t, bool);
using BwdFn = void (*)(const float*, const float*, const float*, float*, float*, int64_t, bool);

constexpr int64_t kStreamBytes = int64_t{32} << 20;  // outputs from 32 MB on: well past any L2/L3 share

constexpr int64_t kBlock = 1024;  // fp32 staging block for reduced-precision inputs (4 KB per array, in L1)
constexpr int64_t kGrain = 16 * kBlock;

template <typename scalar_t>
void glu_fwd_impl(FwdFn fn, const scalar_t* g, const scalar_t* u, scalar_t* out, int64_t N) {
  at::parallel_for(0, N, kGrain, [&](int64_t begin, int64_t end) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      fn(g + begin, u + begin, out + begin, end - begin, N * int64_t{sizeof(float)} >= kStreamBytes);
    } else {
      float gb[kBlock], ub[kBlock], ob[kBlock];
      for (int64_t i = begin; i < end; i += kBlock) {
        const int64_t n = std::min(kBlock, end - i);
        to_f32(g + i, gb, n);
        to_f32(u + i, ub, n);
        fn(gb, ub, ob, n, false);
        from_f32(ob, out + i, n);
      }
    }
  });
}

template <typename scalar_t>
void glu_bwd_impl(BwdFn fn, const scalar_t* dy, const scalar_t* g, const scalar_t* u, scalar_t* dg, scalar_t* du,
                  int64_t N) {
  at::parallel_for(0, N, kGrain, [&](int64_t begin, int64_t end) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      const bool nt = N * int64_t{sizeof(float)} >= kStreamBytes &&
                      (reinterpret_cast<uintptr_t>(dg) & 63) == (reinterpret_cast<uintptr_t>(du) & 63);
      fn(dy + begin, g + begin, u + begin, dg + begin, du + begin, end - begin, nt);
    } else {
      float yb[kBlock], gb[kBlock], ub[kBlock], dgb[kBlock], dub[kBlock];
      for (int64_t i = begin; i < end; i += kBlock) {
        const int64_t n = std::min(kBlock, end - i);
        to_f32(dy + i, yb, n);
        to_f32(g + i, gb, n);
        to_f32(u + i, ub, n);
        fn(yb, gb, ub, dgb, dub, n, false);
        from_f32(dgb, dg + i, n);
        from_f32(dub, du + i, n);
      }
    }
  });
}

void check_pair(const at::Tensor& gate, const at::Tensor& up, const char* op, const at::Tensor* grad = nullptr) {
  check_glu_args(gate, up, op, grad);
  const auto st = gate.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, op,
              ": gate must be float32, bfloat16 or float16, got ", st);
  TORCH_CHECK(gate.device().is_cpu() && up.device().is_cpu(), op, ": expected CPU tensors, got gate on ",
              gate.device(), " and up on ", up.device());
}

at::Tensor glu_fwd_cpu(const at::Tensor& gate, const at::Tensor& up, int act, const char* op) {
  check_pair(gate, up, op);
  const auto gc = gate.contiguous(), uc = up.contiguous();
  auto out = empty_output_like(gc);
  const FwdFn fn = act == kSilu ? silu_fwd_f32 : act == kGelu ? gelu_fwd_f32 : gelu_tanh_fwd_f32;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate.scalar_type(), "glu_fwd_cpu", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      glu_fwd_impl<scalar_t>(fn, gc.const_data_ptr<scalar_t>(), uc.const_data_ptr<scalar_t>(),
                             out.mutable_data_ptr<scalar_t>(), gc.numel());
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> glu_bwd_cpu(const at::Tensor& grad, const at::Tensor& gate, const at::Tensor& up,
                                               int act, const char* op) {
  check_pair(gate, up, op, &grad);
  const auto gc = gate.contiguous(), uc = up.contiguous(), yc = grad.to(gate.scalar_type()).contiguous();
  auto dg = empty_output_like(gc);
  auto du = empty_output_like(uc);
  const BwdFn fn = act == kSilu ? silu_bwd_f32 : act == kGelu ? gelu_bwd_f32 : gelu_tanh_bwd_f32;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate.scalar_type(), "glu_bwd_cpu", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      glu_bwd_impl<scalar_t>(fn, yc.const_data_ptr<scalar_t>(), gc.const_data_ptr<scalar_t>(),
                             uc.const_data_ptr<scalar_t>(), dg.mutable_data_ptr<scalar_t>(),
                             du.mutable_data_ptr<scalar_t>(), gc.numel());
    }
  });
  return {dg, du};
}

}  // namespace

TORCH_LIBRARY_IMPL(intro2llm, CPU, m) { impl_glu<Act, glu_fwd_cpu, glu_bwd_cpu>(m); }

}  // namespace intro2llm
