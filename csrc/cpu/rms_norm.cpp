// RMSNorm on CPU: one pass per row for the statistic, one for the output; rows in parallel (OpenMP via
// at::parallel_for), columns vectorized by I2L_CLONES row functions (simd.h). fp32/bf16/fp16 inputs, fp32
// accumulation.
//
// Forward  y = x * r * w,  r = 1/sqrt(mean(x^2) + eps)                           reads MN, writes MN
// Backward dx = r * (g*w) - x * r^3 * mean(g*w*x),  dw = sum_rows(g * x * r)      reads 2MN, writes MN
// The eager reference makes ~6 passes over (M, N) fp32 tensors; this makes 2 (fwd) and 3 (bwd).
// Reduced-precision rows are widened to fp32 in a thread-local buffer (one row, stays in L1/L2).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "huge_pages.h"
#include "op_checks.h"
#include "rows.h"

#include <cmath>
#include <vector>

namespace intro2llm {
namespace {

// One fp32 row of the backward: dx = r (g w) - x r^3 mean(g w x);  dw += g x r.
I2L_CLONES void rms_bwd_row(const float* __restrict g, const float* __restrict x, const float* __restrict w, float r,
                            float* __restrict dx, float* __restrict dw, int64_t N) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < N; ++d) s += g[d] * w[d] * x[d];
  const float coef = r * r * r * s / static_cast<float>(N);
#pragma omp simd
  for (int64_t d = 0; d < N; ++d) {
    dx[d] = g[d] * w[d] * r - x[d] * coef;
    dw[d] += g[d] * x[d] * r;
  }
}

template <typename scalar_t>
void rms_norm_fwd_impl(const scalar_t* x, const float* w, scalar_t* y, float* rstd, int64_t M, int64_t N, float eps) {
  // ~16K elements per task: small inputs (a decode step's one row) run inline, without waking the thread pool
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / N), [&](int64_t begin, int64_t end) {
    constexpr bool kF32 = std::is_same_v<scalar_t, float>;
    std::vector<float> xbuf(kF32 ? 0 : N), ybuf(kF32 ? 0 : N);
    for (int64_t i = begin; i < end; ++i) {
      if constexpr (kF32) {
        rstd[i] = rms_fwd_row(x + i * N, w, y + i * N, N, eps);
      } else {
        to_f32(x + i * N, xbuf.data(), N);
        rstd[i] = rms_fwd_row(xbuf.data(), w, ybuf.data(), N, eps);
        from_f32(ybuf.data(), y + i * N, N);
      }
    }
  });
}

template <typename scalar_t>
void rms_norm_bwd_impl(const scalar_t* g, const scalar_t* x, const float* w, const float* rstd, scalar_t* dx,
                       float* dw_partial, int64_t M, int64_t N, int64_t num_chunks) {
  // One chunk of rows per task; each task owns one fp32 row of dw_partial, summed by the caller.
  const int64_t rows_per_chunk = (M + num_chunks - 1) / num_chunks;
  at::parallel_for(0, num_chunks, 1, [&](int64_t cbegin, int64_t cend) {
    constexpr bool kF32 = std::is_same_v<scalar_t, float>;
    std::vector<float> xbuf(kF32 ? 0 : N), gbuf(kF32 ? 0 : N), dxbuf(kF32 ? 0 : N);
    for (int64_t c = cbegin; c < cend; ++c) {
      float* dwp = dw_partial + c * N;
      const int64_t rend = std::min(M, (c + 1) * rows_per_chunk);
      for (int64_t i = c * rows_per_chunk; i < rend; ++i) {
        if constexpr (kF32) {
          rms_bwd_row(g + i * N, x + i * N, w, rstd[i], dx + i * N, dwp, N);
        } else {
          to_f32(x + i * N, xbuf.data(), N);
          to_f32(g + i * N, gbuf.data(), N);
          rms_bwd_row(gbuf.data(), xbuf.data(), w, rstd[i], dxbuf.data(), dwp, N);
          from_f32(dxbuf.data(), dx + i * N, N);
        }
      }
    }
  });
}

void check_inputs(const at::Tensor& x, const at::Tensor& weight, const char* op) {
  check_rms_norm_args(x, weight, op);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              op, ": x must be float32, bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), op, ": expected CPU tensors, got x on ", x.device(),
              " and weight on ", weight.device());
}

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_cpu(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_inputs(x, weight, "intro2llm::rms_norm_fwd");
  const auto xc = x.contiguous();
  const auto wf = weight.to(at::kFloat).contiguous();
  const int64_t N = x.size(-1), M = x.numel() / N;
  auto y = empty_output_like(xc);
  auto rstd_sizes = x.sizes().vec();
  rstd_sizes.pop_back();
  auto rstd = at::empty(rstd_sizes, x.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm_fwd_cpu", [&] {
    rms_norm_fwd_impl<scalar_t>(xc.const_data_ptr<scalar_t>(), wf.const_data_ptr<float>(), y.mutable_data_ptr<scalar_t>(),
                                rstd.mutable_data_ptr<float>(), M, N, static_cast<float>(eps));
  });
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                                                    const at::Tensor& weight, const at::Tensor& rstd) {
  check_inputs(x, weight, "intro2llm::rms_norm_bwd");
  check_rms_norm_grad_args(grad_y, x, rstd, "intro2llm::rms_norm_bwd");
  const auto xc = x.contiguous();
  const auto gc = grad_y.to(x.scalar_type()).contiguous();
  const auto wf = weight.to(at::kFloat).contiguous();
  const auto rc = rstd.contiguous();
  const int64_t N = x.size(-1), M = x.numel() / N;
  const int64_t num_chunks = std::max<int64_t>(1, std::min<int64_t>(M, at::get_num_threads()));
  auto dx = empty_output_like(xc);
  auto dw_partial = at::zeros({num_chunks, N}, x.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm_bwd_cpu", [&] {
    rms_norm_bwd_impl<scalar_t>(gc.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(), wf.const_data_ptr<float>(),
                                rc.const_data_ptr<float>(), dx.mutable_data_ptr<scalar_t>(),
                                dw_partial.mutable_data_ptr<float>(), M, N, num_chunks);
  });
  return {dx, dw_partial.sum(0).to(weight.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(intro2llm, CPU, m) { impl_rms_norm<rms_norm_fwd_cpu, rms_norm_bwd_cpu>(m); }

}  // namespace intro2llm
