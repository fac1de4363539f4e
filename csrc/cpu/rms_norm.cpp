// RMSNorm on CPU: one pass per row for the statistic, one for the output; rows in parallel (OpenMP via
// at::parallel_for), columns vectorized with at::vec. fp32/bf16/fp16 inputs, fp32 accumulation.
//
// Forward  y = x * r * w,  r = 1/sqrt(mean(x^2) + eps)                           reads MN, writes MN
// Backward dx = r * (g*w) - x * r^3 * mean(g*w*x),  dw = sum_rows(g * x * r)      reads 2MN, writes MN
// The eager reference makes ~6 passes over (M, N) fp32 tensors; this makes 2 (fwd) and 3 (bwd).
// Reduced-precision rows are widened to fp32 in a thread-local buffer (one row, stays in L1/L2).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

namespace intro2llm {
namespace {

using Vec = at::vec::Vectorized<float>;

// sum(a[i] * b[i]) over n floats.
inline float dot(const float* a, const float* b, int64_t n) {
  Vec acc(0.f);
  int64_t d = 0;
  for (; d + Vec::size() <= n; d += Vec::size()) {
    acc = at::vec::fmadd(Vec::loadu(a + d), Vec::loadu(b + d), acc);
  }
  float s = at::vec::vec_reduce_all<float>([](Vec& u, Vec& v) { return u + v; }, acc);
  for (; d < n; ++d) s += a[d] * b[d];
  return s;
}

// Pointer to row `i` as fp32: the row itself for fp32 input, else widened into `buf`.
template <typename scalar_t>
inline const float* row_as_float(const scalar_t* base, int64_t N, std::vector<float>& buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return base;
  } else {
    at::vec::convert(base, buf.data(), N);
    return buf.data();
  }
}

template <typename scalar_t>
void rms_norm_fwd_impl(const scalar_t* x, const float* w, scalar_t* y, float* rstd, int64_t M, int64_t N, float eps) {
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> xbuf(std::is_same_v<scalar_t, float> ? 0 : N), ybuf(N);
    for (int64_t i = begin; i < end; ++i) {
      const float* xr = row_as_float(x + i * N, N, xbuf);
      const float r = 1.f / std::sqrt(dot(xr, xr, N) / static_cast<float>(N) + eps);
      rstd[i] = r;
      float* out = std::is_same_v<scalar_t, float> ? reinterpret_cast<float*>(y + i * N) : ybuf.data();
      const Vec rv(r);
      int64_t d = 0;
      for (; d + Vec::size() <= N; d += Vec::size()) {
        (Vec::loadu(xr + d) * rv * Vec::loadu(w + d)).store(out + d);
      }
      for (; d < N; ++d) out[d] = xr[d] * r * w[d];
      if constexpr (!std::is_same_v<scalar_t, float>) at::vec::convert(out, y + i * N, N);
    }
  });
}

template <typename scalar_t>
void rms_norm_bwd_impl(const scalar_t* g, const scalar_t* x, const float* w, const float* rstd, scalar_t* dx,
                       float* dw_partial, int64_t M, int64_t N, int64_t num_chunks) {
  // One chunk of rows per task; each task owns one fp32 row of dw_partial, summed by the caller.
  const int64_t rows_per_chunk = (M + num_chunks - 1) / num_chunks;
  at::parallel_for(0, num_chunks, 1, [&](int64_t cbegin, int64_t cend) {
    std::vector<float> xbuf(std::is_same_v<scalar_t, float> ? 0 : N), gbuf(N), wg(N), dxbuf(N);
    for (int64_t c = cbegin; c < cend; ++c) {
      float* dwp = dw_partial + c * N;
      const int64_t rend = std::min(M, (c + 1) * rows_per_chunk);
      for (int64_t i = c * rows_per_chunk; i < rend; ++i) {
        const float* xr = row_as_float(x + i * N, N, xbuf);
        const float* gr = row_as_float(g + i * N, N, gbuf);
        const float r = rstd[i];
        int64_t d = 0;
        for (; d + Vec::size() <= N; d += Vec::size()) {
          const Vec gv = Vec::loadu(gr + d);
          (gv * Vec::loadu(w + d)).store(wg.data() + d);
          at::vec::fmadd(gv * Vec::loadu(xr + d), Vec(r), Vec::loadu(dwp + d)).store(dwp + d);
        }
        for (; d < N; ++d) {
          wg[d] = gr[d] * w[d];
          dwp[d] += gr[d] * xr[d] * r;
        }
        const float coef = r * r * r * dot(wg.data(), xr, N) / static_cast<float>(N);
        float* out = std::is_same_v<scalar_t, float> ? reinterpret_cast<float*>(dx + i * N) : dxbuf.data();
        const Vec rv(r), cv(coef);
        d = 0;
        for (; d + Vec::size() <= N; d += Vec::size()) {
          (Vec::loadu(wg.data() + d) * rv - Vec::loadu(xr + d) * cv).store(out + d);
        }
        for (; d < N; ++d) out[d] = wg[d] * r - xr[d] * coef;
        if constexpr (!std::is_same_v<scalar_t, float>) at::vec::convert(out, dx + i * N, N);
      }
    }
  });
}

void check_inputs(const at::Tensor& x, const at::Tensor& weight, const char* op) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, op, ": x must have a non-empty last dimension, got shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1), op, ": weight must have shape (", x.size(-1),
              ",) to match x of shape ", x.sizes(), ", got ", weight.sizes());
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
  auto y = at::empty_like(xc);
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
  TORCH_CHECK(grad_y.sizes() == x.sizes(), "intro2llm::rms_norm_bwd: grad_y shape ", grad_y.sizes(),
              " must equal x shape ", x.sizes());
  TORCH_CHECK(rstd.scalar_type() == at::kFloat && rstd.numel() * x.size(-1) == x.numel(),
              "intro2llm::rms_norm_bwd: rstd must be float32 with one value per row, got ", rstd.sizes());
  const auto xc = x.contiguous();
  const auto gc = grad_y.to(x.scalar_type()).contiguous();
  const auto wf = weight.to(at::kFloat).contiguous();
  const auto rc = rstd.contiguous();
  const int64_t N = x.size(-1), M = x.numel() / N;
  const int64_t num_chunks = std::max<int64_t>(1, std::min<int64_t>(M, at::get_num_threads()));
  auto dx = at::empty_like(xc);
  auto dw_partial = at::zeros({num_chunks, N}, x.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm_bwd_cpu", [&] {
    rms_norm_bwd_impl<scalar_t>(gc.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(), wf.const_data_ptr<float>(),
                                rc.const_data_ptr<float>(), dx.mutable_data_ptr<scalar_t>(),
                                dw_partial.mutable_data_ptr<float>(), M, N, num_chunks);
  });
  return {dx, dw_partial.sum(0).to(weight.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(intro2llm, CPU, m) {
  m.impl("rms_norm_fwd", &rms_norm_fwd_cpu);
  m.impl("rms_norm_bwd", &rms_norm_bwd_cpu);
}

}  // namespace intro2llm
