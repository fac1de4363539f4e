// Fused AdamW step on CPU: every parameter of a group updated in one pass over (p, g, m, v).
//
// The foreach path (intro2llm/optimizer/adamw.py) runs ~8 whole-list operations (decay, lerp, mul, addcmul, sqrt,
// div, add, addcdiv), each streaming the optimizer state through memory; this reads p, g, m, v once and writes
// p, m, v once. Same formulas and operation order as the foreach path (and torch.optim.AdamW):
//   p <- p (1 - lr wd);  m <- m + (1 - b1)(g - m);  v <- b2 v + (1 - b2) g^2;
//   p <- p + step_size · m / (sqrt(v) / sqrt(1 - b2^t) + eps),   step_size = -lr / (1 - b1^t)
// Work is cut into chunks of kChunk elements across all tensors and spread over the threads (at::parallel_for).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "simd.h"

#include <algorithm>
#include <vector>

namespace intro2llm {
namespace {

constexpr int64_t kChunk = int64_t{1} << 16;

struct Hyper {
  float decay, w1, beta2, omb2, eps;
};

// The operations in the order of the aten kernels the foreach path calls; their vectorized lerp and addcmul end in
// a fused multiply-add, written out here as fmaf (found by comparing element by element). Not bit-identical all
// the same: torch's sqrt goes through MKL's vector math library, which is not always correctly rounded, and the
// compiler may contract p·decay + update into one FMA. Differences are ~1 ulp per step.
I2L_CLONES void adamw_chunk(float* __restrict p, const float* __restrict g, float* __restrict m, float* __restrict v,
                            int64_t n, Hyper hp, float step_size, float bc2_sqrt, bool maximize) {
  const float sign = maximize ? -1.f : 1.f;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float gi = sign * g[i];
    const float pi = p[i] * hp.decay;                      // mul_(1 - lr wd)
    const float mi = __builtin_fmaf(hp.w1, gi - m[i], m[i]);     // lerp_(g, 1 - b1), weight < 0.5
    const float vi = __builtin_fmaf(hp.omb2 * gi, gi, v[i] * hp.beta2);  // mul_(b2), addcmul_(g, g, 1 - b2)
    const float denom = __builtin_sqrtf(vi) / bc2_sqrt + hp.eps;  // sqrt, div_, add_
    m[i] = mi;
    v[i] = vi;
    p[i] = pi + step_size * mi / denom;  // addcdiv_: self + value * t1 / t2
  }
}

void adamw_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                    at::ArrayRef<double> step_sizes, at::ArrayRef<double> bc2_sqrts, double lr, double beta1,
                    double beta2, double eps, double weight_decay, bool maximize) {
  const char* op = "intro2llm::adamw_step_";
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && step_sizes.size() == n &&
                  bc2_sqrts.size() == n,
              op, ": params, grads, exp_avgs, exp_avg_sqs, step_sizes and bc2_sqrts must have one entry per "
              "parameter, got ", n, ", ", grads.size(), ", ", exp_avgs.size(), ", ", exp_avg_sqs.size(), ", ",
              step_sizes.size(), ", ", bc2_sqrts.size());
  struct Item {
    size_t t;
    int64_t begin, len;
  };
  std::vector<Item> items;
  for (size_t t = 0; t < n; ++t) {
    for (const at::Tensor* x : {&params[t], &grads[t], &exp_avgs[t], &exp_avg_sqs[t]}) {
      TORCH_CHECK(x->device().is_cpu() && x->scalar_type() == at::kFloat && x->is_contiguous() &&
                      x->numel() == params[t].numel(),
                  op, ": parameter ", t, ": params, grads and states must be contiguous float32 CPU tensors of ",
                  "one size, got ", x->sizes(), " ", x->scalar_type(), " on ", x->device());
    }
    const int64_t numel = params[t].numel();
    for (int64_t b = 0; b < numel; b += kChunk) items.push_back({t, b, std::min(kChunk, numel - b)});
  }
  const Hyper hp{static_cast<float>(1.0 - lr * weight_decay), static_cast<float>(1.0 - beta1),
                 static_cast<float>(beta2), static_cast<float>(1.0 - beta2), static_cast<float>(eps)};
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const Item& it = items[i];
      adamw_chunk(params[it.t].data_ptr<float>() + it.begin, grads[it.t].const_data_ptr<float>() + it.begin,
                  exp_avgs[it.t].data_ptr<float>() + it.begin, exp_avg_sqs[it.t].data_ptr<float>() + it.begin,
                  it.len, hp, static_cast<float>(step_sizes[it.t]), static_cast<float>(bc2_sqrts[it.t]), maximize);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(intro2llm, CPU, m) { m.impl("adamw_step_", &adamw_step_cpu); }

}  // namespace intro2llm
