// Torch binding of the CUDA SwiGLU/GeGLU kernels: checks, allocation, stream, dtype code → csrc/cuda/swiglu.cu.
// Compiled only when torch is a CUDA build (setup.py), so ATen's CUDA headers are available here.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "binding.h"
#include "op_checks.h"
#include "swiglu.cuh"

namespace intro2llm {
namespace {

cuda::DType check_pair(const at::Tensor& gate, const at::Tensor& up, const char* op,
                       const at::Tensor* grad = nullptr) {
  check_glu_args(gate, up, op, grad);
  TORCH_CHECK(gate.is_cuda() && up.device() == gate.device(), op, ": gate and up must be on one CUDA device, got ",
              gate.device(), " and ", up.device());
  return cuda::dtype_code(gate, op, "gate");
}

at::Tensor glu_fwd_cuda(const at::Tensor& gate, const at::Tensor& up, cuda::GluAct act, const char* op) {
  const auto dtype = check_pair(gate, up, op);
  const c10::cuda::CUDAGuard guard(gate.device());
  const auto gc = gate.contiguous(), uc = up.contiguous();
  auto out = at::empty_like(gc, at::MemoryFormat::Contiguous);
  const auto err = cuda::glu_fwd(gc.const_data_ptr(), uc.const_data_ptr(), out.mutable_data_ptr(), gc.numel(), act,
                                 dtype, at::cuda::getCurrentCUDAStream());
  cuda::check_error(err, op);
  return out;
}

std::tuple<at::Tensor, at::Tensor> glu_bwd_cuda(const at::Tensor& grad, const at::Tensor& gate, const at::Tensor& up,
                                                cuda::GluAct act, const char* op) {
  const auto dtype = check_pair(gate, up, op, &grad);
  const c10::cuda::CUDAGuard guard(gate.device());
  const auto gc = gate.contiguous(), uc = up.contiguous(), yc = grad.to(gate.scalar_type()).contiguous();
  auto dg = at::empty_like(gc, at::MemoryFormat::Contiguous);
  auto du = at::empty_like(uc, at::MemoryFormat::Contiguous);
  const auto err = cuda::glu_bwd(yc.const_data_ptr(), gc.const_data_ptr(), uc.const_data_ptr(), dg.mutable_data_ptr(),
                                 du.mutable_data_ptr(), gc.numel(), act, dtype, at::cuda::getCurrentCUDAStream());
  cuda::check_error(err, op);
  return {dg, du};
}

}  // namespace

TORCH_LIBRARY_IMPL(intro2llm, CUDA, m) { impl_glu<cuda::GluAct, glu_fwd_cuda, glu_bwd_cuda>(m); }

}  // namespace intro2llm
