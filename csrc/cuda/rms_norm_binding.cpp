// Torch binding of the CUDA RMSNorm kernels: checks, allocation, stream, dtype code → csrc/cuda/rms_norm.cu.
// Compiled only when torch is a CUDA build (setup.py), so ATen's CUDA headers are available here.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "binding.h"
#include "op_checks.h"
#include "rms_norm.cuh"

namespace intro2llm {
namespace {

void check(const at::Tensor& x, const at::Tensor& weight, const char* op) {
  TORCH_CHECK(x.is_cuda() && weight.device() == x.device(), op, ": x and weight must be on one CUDA device, got ",
              x.device(), " and ", weight.device());
  check_rms_norm_args(x, weight, op);
}

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_cuda(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check(x, weight, "intro2llm::rms_norm_fwd");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto xc = x.contiguous();
  const auto wf = weight.to(at::kFloat).contiguous();
  const int64_t N = x.size(-1), M = x.numel() / N;
  auto y = at::empty_like(xc);
  auto rstd_sizes = x.sizes().vec();
  rstd_sizes.pop_back();
  auto rstd = at::empty(rstd_sizes, x.options().dtype(at::kFloat));
  const auto err = cuda::rms_norm_fwd(xc.const_data_ptr(), wf.const_data_ptr<float>(), y.mutable_data_ptr(),
                                      rstd.mutable_data_ptr<float>(), M, N, static_cast<float>(eps),
                                      cuda::dtype_code(x, "intro2llm::rms_norm_fwd", "x"), at::cuda::getCurrentCUDAStream());
  cuda::check_error(err, "intro2llm::rms_norm_fwd");
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_cuda(const at::Tensor& grad_y, const at::Tensor& x,
                                                     const at::Tensor& weight, const at::Tensor& rstd) {
  check(x, weight, "intro2llm::rms_norm_bwd");
  check_rms_norm_grad_args(grad_y, x, rstd, "intro2llm::rms_norm_bwd");
  TORCH_CHECK(x.size(-1) <= 8192, "intro2llm::rms_norm_bwd (cuda): rows longer than 8192 are not supported, got ",
              x.size(-1), "; use backend='triton'");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto xc = x.contiguous();
  const auto gc = grad_y.to(x.scalar_type()).contiguous();
  const auto wf = weight.to(at::kFloat).contiguous();
  const auto rc = rstd.contiguous();
  const int64_t N = x.size(-1), M = x.numel() / N;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int num_blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(M, 4 * sms)));
  auto dx = at::empty_like(xc);
  auto dw_partial = at::empty({num_blocks, N}, x.options().dtype(at::kFloat));
  auto dw = at::empty({N}, x.options().dtype(at::kFloat));
  const auto err = cuda::rms_norm_bwd(gc.const_data_ptr(), xc.const_data_ptr(), wf.const_data_ptr<float>(),
                                      rc.const_data_ptr<float>(), dx.mutable_data_ptr(),
                                      dw_partial.mutable_data_ptr<float>(), dw.mutable_data_ptr<float>(), M, N,
                                      num_blocks, cuda::dtype_code(x, "intro2llm::rms_norm_bwd", "x"),
                                      at::cuda::getCurrentCUDAStream());
  cuda::check_error(err, "intro2llm::rms_norm_bwd");
  return {dx, dw.to(weight.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(intro2llm, CUDA, m) { impl_rms_norm<rms_norm_fwd_cuda, rms_norm_bwd_cuda>(m); }

}  // namespace intro2llm
