// Rotary position embedding (split-half / Hugging Face `rotate_half` convention) on CPU, q and k in one call.
//
// Forward, with h = D/2 and x = (x1, x2):   out1 = x1*c1 - x2*s1,   out2 = x2*c2 + x1*s2
// Backward (the transposed rotation):        dx1  = g1*c1 + g2*s2,   dx2  = g2*c2 - g1*s1
// (= RoPE with -sin when both halves of the table are equal, as in every Llama-style table).
//
// q (B, H, T, D) and k (B, Hkv, T, D) are read through their strides (the usual (B, T, H, D).transpose(1, 2)
// view costs no copy; the last dim must be contiguous, else it is copied once); outputs are contiguous.
// cos/sin are (Bc, T, D) with Bc in {1, B}, converted once to fp32 (T*D values, reused by every head).
// Rows of D are independent: at::parallel_for over all B*(H+Hkv)*T rows, I2L_CLONES loops (simd.h) over the
// half-rows.
// Traffic: reads B*(H+Hkv)*T*D once and writes it once; the eager reference makes ~6 passes. Figures:
// benchmarks/bench_rope.py, lesson 03's README.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "huge_pages.h"
#include "op_checks.h"
#include "rows.h"

#include <algorithm>
#include <vector>

namespace intro2llm {
namespace {

struct View4 {  // a (B, H, T, D) tensor with unit stride on D
  const void* data;
  int64_t sb, sh, st;
  int64_t H;
};

template <typename scalar_t, bool BWD>
void rope_impl(const View4& q, const View4& k, scalar_t* q_out, scalar_t* k_out, const float* cos, const float* sin,
               int64_t B, int64_t T, int64_t D, bool table_per_batch) {
  const int64_t HH = q.H + k.H, h = D / 2;
  // ~16K values per task: enough work to amortize scheduling, small enough to balance.
  const int64_t grain = std::max<int64_t>(1, 16384 / D);
  at::parallel_for(0, B * HH * T, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> xbuf(std::is_same_v<scalar_t, float> ? 0 : D), obuf(std::is_same_v<scalar_t, float> ? 0 : D);
    for (int64_t r = begin; r < end;) {  // one run of positions of one (batch, head) per iteration
      const int64_t t0 = r % T, hh = (r / T) % HH, b = r / (T * HH);
      const int64_t n = std::min(T - t0, end - r);
      const bool is_q = hh < q.H;
      const View4& v = is_q ? q : k;
      const int64_t head = is_q ? hh : hh - q.H;
      const scalar_t* x = static_cast<const scalar_t*>(v.data) + b * v.sb + head * v.sh + t0 * v.st;
      scalar_t* o = (is_q ? q_out : k_out) + ((b * v.H + head) * T + t0) * D;
      const int64_t trow = ((table_per_batch ? b : 0) * T + t0) * D;
      if constexpr (std::is_same_v<scalar_t, float>) {
        rope_rows<BWD>(x, v.st, cos + trow, sin + trow, o, n, D);
      } else {
        for (int64_t t = 0; t < n; ++t) {
          to_f32(x + t * v.st, xbuf.data(), D);
          rope_rows<BWD>(xbuf.data(), D, cos + trow + t * D, sin + trow + t * D, obuf.data(), 1, D);
          from_f32(obuf.data(), o + t * D, D);
        }
      }
      r += n;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> rope_cpu(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& cos,
                                            const at::Tensor& sin, bool backward, const char* op) {
  check_rope_args(q_in, k_in, cos, sin, op);
  const int64_t B = q_in.size(0), T = q_in.size(2), D = q_in.size(3);
  const auto st = q_in.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, op,
              ": q must be float32, bfloat16 or float16, got ", st);
  TORCH_CHECK(q_in.device().is_cpu() && k_in.device().is_cpu() && cos.device().is_cpu() && sin.device().is_cpu(), op,
              ": expected CPU tensors, got q on ", q_in.device(), ", k on ", k_in.device(), ", cos on ", cos.device());
  const auto q = q_in.stride(3) == 1 ? q_in : q_in.contiguous();
  const auto k = k_in.stride(3) == 1 ? k_in : k_in.contiguous();
  const auto cf = cos.to(at::kFloat).contiguous();
  const auto sf = sin.to(at::kFloat).contiguous();
  auto q_out = empty_output_like(q);
  auto k_out = empty_output_like(k);
  if (q.numel() + k.numel() == 0) return {q_out, k_out};
  const View4 qv{q.const_data_ptr(), q.stride(0), q.stride(1), q.stride(2), q.size(1)};
  const View4 kv{k.const_data_ptr(), k.stride(0), k.stride(1), k.stride(2), k.size(1)};
  const bool per_batch = cos.size(0) > 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, st, "rope_cpu", [&] {
    if (backward) {
      rope_impl<scalar_t, true>(qv, kv, q_out.mutable_data_ptr<scalar_t>(), k_out.mutable_data_ptr<scalar_t>(),
                                cf.const_data_ptr<float>(), sf.const_data_ptr<float>(), B, T, D, per_batch);
    } else {
      rope_impl<scalar_t, false>(qv, kv, q_out.mutable_data_ptr<scalar_t>(), k_out.mutable_data_ptr<scalar_t>(),
                                 cf.const_data_ptr<float>(), sf.const_data_ptr<float>(), B, T, D, per_batch);
    }
  });
  return {q_out, k_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(intro2llm, CPU, m) { impl_rope<rope_cpu>(m); }

}  // namespace intro2llm
