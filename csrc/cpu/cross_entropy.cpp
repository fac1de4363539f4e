// Cross-entropy on CPU (label smoothing, z-loss, ignore_index): rows in parallel (at::parallel_for), each row
// in fp32 whatever the input dtype. See intro2llm/ops/cross_entropy.py for the math and the op contract.
//
// Forward   per row: max and sum (pass 1), sum exp(x - max) (pass 2; the 128 KB row of V=32000 is still in L2),
//           lse = max + log(sum), loss = (1-eps)(lse - x_t) + eps(lse - sum/V) + z lse^2.   reads NV (from DRAM)
// Backward  dx = g (softmax(x)(1 + 2 z lse) - (1-eps) onehot(t) - eps/V).                   reads NV, writes NV
// fwd_bwd_  both at once, the gradient overwriting the logits (fused_linear_cross_entropy's own chunk buffer).
//
// SIMD: the row loops are plain, branch-free C++ (with a polynomial exp) under I2L_CLONES (simd.h).
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
#include <limits>
#include <vector>


namespace intro2llm {
namespace {

// exp(x) for x <= 0 (all callers subtract the row max): Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2,
// degree-6 Taylor/minimax polynomial (rel. error ~2 ulp), 2^n built in the exponent bits. Branch-free so
// that loops calling it vectorize; x below -87.3 (exp underflows fp32) gives exactly 0, as does -inf.
inline float exp_neg(float x) {
  const float xc = x < -87.3f ? -87.3f : x;
  // round to nearest by the 1.5 * 2^23 trick (vectorizes everywhere, unlike nearbyint)
  const float n = (xc * 1.44269504088896341f + 12582912.f) - 12582912.f;
  float r = xc - n * 0.693359375f;  // ln2 split in a high part exact in fp32 ...
  r = r - n * -2.12194440e-4f;      // ... and the rest
  float p = 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.3f ? 0.f : p * scale;
}

// Row sums run in blocks of kSumBlock: a vectorized fp32 sum inside a block, the block sums added in fp64. One
// fp32 accumulator per lane over a whole 32k-256k row loses accuracy with the row length (and differs with the
// lane count: 8 on AVX2, 16 on AVX-512); blocks keep the error at the level of torch's reductions for any V.
constexpr int64_t kSumBlock = 512;

// Pass 1 of a row: its max and its sum (the sum feeds label smoothing's mean).
I2L_CLONES void row_max_sum(const float* x, int64_t V, float* max_out, float* sum_out) {
  float m = -std::numeric_limits<float>::infinity();
  double total = 0.0;
  for (int64_t j0 = 0; j0 < V; j0 += kSumBlock) {
    const int64_t j1 = std::min(V, j0 + kSumBlock);
    float s = 0.f;
#pragma omp simd reduction(max : m) reduction(+ : s)
    for (int64_t j = j0; j < j1; ++j) {
      m = x[j] > m ? x[j] : m;
      s += x[j];
    }
    total += s;
  }
  *max_out = m;
  *sum_out = static_cast<float>(total);
}

// Pass 2: sum_j exp(x_j - m).
I2L_CLONES float row_sum_exp(const float* x, int64_t V, float m) {
  double total = 0.0;
  for (int64_t j0 = 0; j0 < V; j0 += kSumBlock) {
    const int64_t j1 = std::min(V, j0 + kSumBlock);
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t j = j0; j < j1; ++j) s += exp_neg(x[j] - m);
    total += s;
  }
  return static_cast<float>(total);
}

// Gradient of a row: out_j = a * exp(x_j - lse) - b (out may alias x: elementwise).
I2L_CLONES void row_grad(const float* x, int64_t V, float lse, float a, float b, float* out) {
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) out[j] = a * exp_neg(x[j] - lse) - b;
}

struct Params {
  int64_t N, V, ignore_index;
  float eps, z;
};

// Row i as fp32: the row itself for fp32 input, else widened into buf.
template <typename scalar_t>
inline float* row_as_float(scalar_t* base, int64_t V, std::vector<float>& buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return base;
  } else {
    at::vec::convert(base, buf.data(), V);
    return buf.data();
  }
}

// Loss and lse of one fp32 row (target already range-checked; ignored rows are handled by the caller).
inline void row_loss(const float* x, int64_t t, const Params& p, float* loss, float* lse) {
  float m, sum;
  row_max_sum(x, p.V, &m, &sum);
  const float l = m + std::log(row_sum_exp(x, p.V, m));
  float out = (1.f - p.eps) * (l - x[t]);
  if (p.eps != 0.f) out += p.eps * (l - sum / static_cast<float>(p.V));
  if (p.z != 0.f) out += p.z * l * l;
  *loss = out;
  *lse = l;
}

// Overwrite fp32 row x (or write out) with g * dloss/dx.
inline void row_backward(const float* x, int64_t t, float lse, float g, const Params& p, float* out) {
  const float a = g * (1.f + 2.f * p.z * lse);
  row_grad(x, p.V, lse, a, g * p.eps / static_cast<float>(p.V), out);
  out[t] -= g * (1.f - p.eps);
}

// row_fn(i, buf) for every row i, rows split over threads; buf is a per-thread fp32 row buffer for half-precision
// logits (empty for fp32).
template <typename scalar_t, typename RowFn>
void for_each_row(const Params& p, const RowFn& row_fn) {
  at::parallel_for(0, p.N, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(std::is_same_v<scalar_t, float> ? 0 : p.V);
    for (int64_t i = begin; i < end; ++i) row_fn(i, buf);
  });
}

template <typename scalar_t>
void fwd_impl(const scalar_t* logits, const int64_t* targets, float* loss, float* lse, const Params& p) {
  for_each_row<scalar_t>(p, [&](int64_t i, std::vector<float>& buf) {
    const int64_t t = targets[i];
    if (t == p.ignore_index) {  // loss 0; lse is not needed (the backward writes zeros for this row)
      loss[i] = 0.f;
      lse[i] = 0.f;
      return;
    }
    row_loss(row_as_float(const_cast<scalar_t*>(logits) + i * p.V, p.V, buf), t, p, loss + i, lse + i);
  });
}

template <typename scalar_t>
void bwd_impl(const float* grad_loss, const scalar_t* logits, const int64_t* targets, const float* lse,
              scalar_t* grad, const Params& p) {
  for_each_row<scalar_t>(p, [&](int64_t i, std::vector<float>& buf) {
    const int64_t t = targets[i];
    scalar_t* out = grad + i * p.V;
    if (t == p.ignore_index) {
      std::fill(out, out + p.V, scalar_t(0));  // zero, whatever g is (mean over 0 tokens gives g = inf)
      return;
    }
    const float* x = row_as_float(const_cast<scalar_t*>(logits) + i * p.V, p.V, buf);
    if constexpr (std::is_same_v<scalar_t, float>) {
      row_backward(x, t, lse[i], grad_loss[i], p, out);
    } else {
      row_backward(x, t, lse[i], grad_loss[i], p, buf.data());  // in place in the fp32 buffer
      at::vec::convert(buf.data(), out, p.V);
    }
  });
}

template <typename scalar_t>
void fwd_bwd_impl(scalar_t* logits, const int64_t* targets, float grad_scale, float* loss, float* lse,
                  const Params& p) {
  for_each_row<scalar_t>(p, [&](int64_t i, std::vector<float>& buf) {
    const int64_t t = targets[i];
    scalar_t* row = logits + i * p.V;
    if (t == p.ignore_index) {
      std::fill(row, row + p.V, scalar_t(0));
      loss[i] = 0.f;
      lse[i] = 0.f;
      return;
    }
    float* x = row_as_float(row, p.V, buf);
    row_loss(x, t, p, loss + i, lse + i);
    row_backward(x, t, lse[i], grad_scale, p, x);  // the row is still in L2: overwrite it with its gradient
    if constexpr (!std::is_same_v<scalar_t, float>) at::vec::convert(x, row, p.V);
  });
}

Params check_inputs(const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index, double eps, double z,
                    const char* op) {
  check_cross_entropy_args(logits, targets, eps, z, op);
  TORCH_CHECK_TYPE(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16 ||
                       logits.scalar_type() == at::kHalf,
                   op, ": logits must be float32, bfloat16 or float16, got ", logits.scalar_type());
  TORCH_CHECK_VALUE(logits.device().is_cpu() && targets.device().is_cpu(), op, ": expected CPU tensors, got logits on ",
                    logits.device(), " and targets on ", targets.device());
  const int64_t V = logits.size(1);
  // Every target is range-checked before any kernel reads x[t]: no out-of-bounds read, whatever the input.
  const auto tc = targets.contiguous();
  const int64_t* t = tc.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < targets.numel(); ++i) {
    if (t[i] != ignore_index && (t[i] < 0 || t[i] >= V)) fail_target_out_of_range(t[i], i, V, ignore_index, op);
  }
  return Params{logits.size(0), V, ignore_index, static_cast<float>(eps), static_cast<float>(z)};
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_cpu(const at::Tensor& logits, const at::Tensor& targets,
                                                         int64_t ignore_index, double label_smoothing, double z_loss) {
  const Params p = check_inputs(logits, targets, ignore_index, label_smoothing, z_loss, "intro2llm::cross_entropy_fwd");
  const auto xc = logits.contiguous();
  const auto tc = targets.contiguous();
  auto loss = cross_entropy_row_output(logits), lse = cross_entropy_row_output(logits);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xc.scalar_type(), "cross_entropy_fwd_cpu", [&] {
    fwd_impl<scalar_t>(xc.const_data_ptr<scalar_t>(), tc.const_data_ptr<int64_t>(), loss.mutable_data_ptr<float>(),
                       lse.mutable_data_ptr<float>(), p);
  });
  return {loss, lse};
}

at::Tensor cross_entropy_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& targets,
                                 const at::Tensor& lse, int64_t ignore_index, double label_smoothing, double z_loss) {
  const Params p = check_inputs(logits, targets, ignore_index, label_smoothing, z_loss, "intro2llm::cross_entropy_bwd");
  check_cross_entropy_grad_args(grad_loss, lse, p.N, "intro2llm::cross_entropy_bwd");
  const auto xc = logits.contiguous();
  const auto tc = targets.contiguous();
  const auto gc = grad_loss.to(at::kFloat).contiguous();
  const auto lc = lse.contiguous();
  auto grad = empty_output_like(xc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xc.scalar_type(), "cross_entropy_bwd_cpu", [&] {
    bwd_impl<scalar_t>(gc.const_data_ptr<float>(), xc.const_data_ptr<scalar_t>(), tc.const_data_ptr<int64_t>(),
                       lc.const_data_ptr<float>(), grad.mutable_data_ptr<scalar_t>(), p);
  });
  return grad;
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_bwd_cpu(at::Tensor& logits, const at::Tensor& targets,
                                                             double grad_scale, int64_t ignore_index,
                                                             double label_smoothing, double z_loss) {
  const Params p = check_inputs(logits, targets, ignore_index, label_smoothing, z_loss, "intro2llm::cross_entropy_fwd_bwd_");
  TORCH_CHECK_VALUE(logits.is_contiguous(), "intro2llm::cross_entropy_fwd_bwd_: logits must be contiguous (it is "
                    "overwritten in place), got strides ", logits.strides());
  const auto tc = targets.contiguous();
  auto loss = cross_entropy_row_output(logits), lse = cross_entropy_row_output(logits);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "cross_entropy_fwd_bwd_cpu", [&] {
    fwd_bwd_impl<scalar_t>(logits.mutable_data_ptr<scalar_t>(), tc.const_data_ptr<int64_t>(),
                           static_cast<float>(grad_scale), loss.mutable_data_ptr<float>(), lse.mutable_data_ptr<float>(),
                           p);
  });
  return {loss, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(intro2llm, CPU, m) {
  impl_cross_entropy<cross_entropy_fwd_cpu, cross_entropy_bwd_cpu, cross_entropy_fwd_bwd_cpu>(m);
}

}  // namespace intro2llm
