// Torch binding of the CUDA cross-entropy kernels: checks (targets range-checked on the device before any kernel
// reads x[t]), allocation, stream, dtype code → csrc/cuda/cross_entropy.cu. Compiled only with a CUDA torch.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "binding.h"
#include "op_checks.h"
#include "cross_entropy.cuh"

namespace intro2llm {
namespace {

// Shapes, devices, dtypes, and (check_range) the range of every target: one device reduction + a host sync.
// The backward skips the range check: its kernel only compares column indices with t, it never reads x[t].
void ce_check(const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index, double eps, double z,
              const char* op, bool check_range = true) {
  TORCH_CHECK_VALUE(logits.is_cuda() && targets.device() == logits.device(), op,
                    ": logits and targets must be on one CUDA device, got ", logits.device(), " and ",
                    targets.device());
  check_cross_entropy_args(logits, targets, eps, z, op);
  TORCH_CHECK_VALUE(logits.stride(1) == 1, op, ": logits rows must be contiguous, got strides ", logits.strides());
  TORCH_CHECK_VALUE(logits.size(0) <= 0x7fffffff, op, ": at most 2^31-1 rows, got ", logits.size(0));
  if (!check_range || targets.numel() == 0) return;
  const int64_t V = logits.size(1);
  const auto bad = ((targets < 0) | (targets >= V)) & (targets != ignore_index);
  if (bad.any().item<bool>()) {
    const int64_t pos = bad.nonzero()[0][0].item<int64_t>();
    fail_target_out_of_range(targets[pos].item<int64_t>(), pos, V, ignore_index, op);
  }
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_cuda(const at::Tensor& logits, const at::Tensor& targets,
                                                          int64_t ignore_index, double label_smoothing, double z_loss) {
  const char* op = "intro2llm::cross_entropy_fwd";
  ce_check(logits, targets, ignore_index, label_smoothing, z_loss, op);
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto tc = targets.contiguous();
  const int64_t N = logits.size(0), V = logits.size(1);
  auto loss = cross_entropy_row_output(logits), lse = cross_entropy_row_output(logits);
  const auto err = cuda::cross_entropy_fwd(logits.const_data_ptr(), tc.const_data_ptr<int64_t>(),
                                           loss.mutable_data_ptr<float>(), lse.mutable_data_ptr<float>(), N, V,
                                           logits.stride(0), ignore_index, static_cast<float>(label_smoothing),
                                           static_cast<float>(z_loss), cuda::dtype_code(logits, op, "logits"),
                                           at::cuda::getCurrentCUDAStream());
  cuda::check_error(err, op);
  return {loss, lse};
}

at::Tensor cross_entropy_bwd_cuda(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& targets,
                                  const at::Tensor& lse, int64_t ignore_index, double label_smoothing, double z_loss) {
  const char* op = "intro2llm::cross_entropy_bwd";
  ce_check(logits, targets, ignore_index, label_smoothing, z_loss, op, /*check_range=*/false);
  const int64_t N = logits.size(0), V = logits.size(1);
  check_cross_entropy_grad_args(grad_loss, lse, N, op);
  TORCH_CHECK_VALUE(grad_loss.device() == logits.device() && lse.device() == logits.device(), op,
                    ": grad_loss and lse must be on ", logits.device(), ", got ", grad_loss.device(), " and ",
                    lse.device());
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto tc = targets.contiguous();
  const auto gc = grad_loss.to(at::kFloat).contiguous();
  const auto lc = lse.contiguous();
  auto grad = at::empty({N, V}, logits.options());
  const auto err = cuda::cross_entropy_bwd(gc.const_data_ptr<float>(), logits.const_data_ptr(),
                                           tc.const_data_ptr<int64_t>(), lc.const_data_ptr<float>(),
                                           grad.mutable_data_ptr(), N, V, logits.stride(0), ignore_index,
                                           static_cast<float>(label_smoothing), static_cast<float>(z_loss),
                                           cuda::dtype_code(logits, op, "logits"), at::cuda::getCurrentCUDAStream());
  cuda::check_error(err, op);
  return grad;
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_bwd_cuda(at::Tensor& logits, const at::Tensor& targets,
                                                              double grad_scale, int64_t ignore_index,
                                                              double label_smoothing, double z_loss) {
  const char* op = "intro2llm::cross_entropy_fwd_bwd_";
  ce_check(logits, targets, ignore_index, label_smoothing, z_loss, op);
  TORCH_CHECK_VALUE(logits.is_contiguous(), op, ": logits must be contiguous (it is overwritten in place), got "
                    "strides ", logits.strides());
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto tc = targets.contiguous();
  const int64_t N = logits.size(0), V = logits.size(1);
  auto loss = cross_entropy_row_output(logits), lse = cross_entropy_row_output(logits);
  const auto err = cuda::cross_entropy_fwd_bwd(logits.mutable_data_ptr(), tc.const_data_ptr<int64_t>(),
                                               static_cast<float>(grad_scale), loss.mutable_data_ptr<float>(),
                                               lse.mutable_data_ptr<float>(), N, V, ignore_index,
                                               static_cast<float>(label_smoothing), static_cast<float>(z_loss),
                                               cuda::dtype_code(logits, op, "logits"), at::cuda::getCurrentCUDAStream());
  cuda::check_error(err, op);
  return {loss, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(intro2llm, CUDA, m) {
  impl_cross_entropy<cross_entropy_fwd_cuda, cross_entropy_bwd_cuda, cross_entropy_fwd_bwd_cuda>(m);
}

}  // namespace intro2llm
