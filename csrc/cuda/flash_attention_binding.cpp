// Torch binding of the CUDA flash attention kernels: checks, allocation, stream, dtype code →
// csrc/cuda/flash_attention.cu. Compiled only when torch is a CUDA build (setup.py), so ATen's CUDA headers are
// available here.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>

#include "binding.h"
#include "op_checks.h"
#include "flash_attention.cuh"

namespace intro2llm {
namespace {

using cuda::flash::DType;
using cuda::flash::Shape;

void check(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal, int64_t window,
           const std::optional<at::Tensor>& kpm, const char* op) {
  TORCH_CHECK(q.dim() == 4 && q.is_cuda() && k.device() == q.device() && v.device() == q.device(), op,
              ": q, k, v must be on one CUDA device, got ", q.device(), ", ", k.device(), ", ", v.device());
  check_flash_attention_args(q, k, v, causal, window, kpm, op);
  TORCH_CHECK(q.size(0) * q.size(1) <= INT32_MAX && q.size(2) / 16 < 65535, op,
              ": B*H must fit in 2^31 and Tq in 65535*16 rows, got q ", q.sizes());
}

Shape make_shape(const at::Tensor& q, const at::Tensor& k, bool causal, int64_t window, double scale,
                 const at::Tensor* keep) {
  return Shape{q.size(0),
               q.size(1),
               k.size(1),
               q.size(2),
               k.size(2),
               q.size(3),
               causal,
               window,
               static_cast<float>(scale),
               keep != nullptr ? reinterpret_cast<const unsigned char*>(keep->const_data_ptr<bool>()) : nullptr};
}

std::tuple<at::Tensor, at::Tensor> flash_attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, bool causal, int64_t window,
                                                            double scale, const std::optional<at::Tensor>& kpm) {
  const char* op = "intro2llm::flash_attention_fwd";
  check(q, k, v, causal, window, kpm, op);
  const c10::cuda::CUDAGuard guard(q.device());
  const auto qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  at::Tensor keep;
  if (kpm.has_value()) keep = kpm->contiguous();
  auto out = at::empty_like(qc);
  auto lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  const Shape s = make_shape(q, k, causal, window, scale, kpm.has_value() ? &keep : nullptr);
  const auto err = cuda::flash::flash_attention_fwd(s, qc.const_data_ptr(), kc.const_data_ptr(), vc.const_data_ptr(),
                                                    out.mutable_data_ptr(), lse.mutable_data_ptr<float>(),
                                                    cuda::dtype_code(q, op, "q, k, v"), at::cuda::getCurrentCUDAStream());
  cuda::check_error(err, op);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, bool causal, int64_t window, double scale, const std::optional<at::Tensor>& kpm) {
  const char* op = "intro2llm::flash_attention_bwd";
  check(q, k, v, causal, window, kpm, op);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(), op, ": grad_out and out must have q's shape ",
              q.sizes(), ", got ", grad_out.sizes(), " and ", out.sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 3 && lse.size(0) == q.size(0) &&
                  lse.size(1) == q.size(1) && lse.size(2) == q.size(2),
              op, ": lse must be float32 (B, H, Tq), got ", lse.scalar_type(), " ", lse.sizes());
  const c10::cuda::CUDAGuard guard(q.device());
  const auto qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  const auto oc = out.to(q.scalar_type()).contiguous(), gc = grad_out.to(q.scalar_type()).contiguous();
  const auto lc = lse.contiguous();
  at::Tensor keep;
  if (kpm.has_value()) keep = kpm->contiguous();
  auto dq = at::empty_like(qc), dk = at::empty_like(kc), dv = at::empty_like(vc);
  auto delta = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  const Shape s = make_shape(q, k, causal, window, scale, kpm.has_value() ? &keep : nullptr);
  if (q.numel() == 0) return {dq, dk.zero_(), dv.zero_()};
  const auto err = cuda::flash::flash_attention_bwd(
      s, gc.const_data_ptr(), qc.const_data_ptr(), kc.const_data_ptr(), vc.const_data_ptr(), oc.const_data_ptr(),
      lc.const_data_ptr<float>(), delta.mutable_data_ptr<float>(), dq.mutable_data_ptr(), dk.mutable_data_ptr(),
      dv.mutable_data_ptr(), cuda::dtype_code(q, op, "q, k, v"), at::cuda::getCurrentCUDAStream());
  cuda::check_error(err, op);
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(intro2llm, CUDA, m) {
  impl_flash_attention<flash_attention_fwd_cuda, flash_attention_bwd_cuda>(m);
}

}  // namespace intro2llm
