// Torch binding of the CUDA RoPE kernel: checks, allocation, stream, dtype code → csrc/cuda/rope.cu.
// Compiled only when torch is a CUDA build (setup.py), so ATen's CUDA headers are available here.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "binding.h"
#include "op_checks.h"
#include "rope.cuh"

namespace intro2llm {
namespace {

std::tuple<at::Tensor, at::Tensor> rope_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& cos,
                                             const at::Tensor& sin, bool backward, const char* op) {
  check_rope_args(q_in, k_in, cos, sin, op);
  const int64_t B = q_in.size(0), T = q_in.size(2), D = q_in.size(3);
  TORCH_CHECK(q_in.is_cuda() && k_in.device() == q_in.device() && cos.device() == q_in.device() &&
                  sin.device() == q_in.device(),
              op, ": q, k, cos, sin must be on one CUDA device, got q on ", q_in.device(), ", k on ", k_in.device(),
              ", cos on ", cos.device(), ", sin on ", sin.device());
  const cuda::DType dtype = cuda::dtype_code(q_in, op, "q");
  const c10::cuda::CUDAGuard guard(q_in.device());
  const auto q = q_in.stride(3) == 1 ? q_in : q_in.contiguous();
  const auto k = k_in.stride(3) == 1 ? k_in : k_in.contiguous();
  const auto cf = cos.to(at::kFloat).contiguous();
  const auto sf = sin.to(at::kFloat).contiguous();
  auto q_out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  auto k_out = at::empty(k.sizes(), k.options().memory_format(at::MemoryFormat::Contiguous));
  const cuda::RopeView qv{q.stride(0), q.stride(1), q.stride(2), q.size(1)};
  const cuda::RopeView kv{k.stride(0), k.stride(1), k.stride(2), k.size(1)};
  const int64_t table_sb = cos.size(0) > 1 ? T * D : 0;
  const auto err = cuda::rope(q.const_data_ptr(), k.const_data_ptr(), q_out.mutable_data_ptr(),
                              k_out.mutable_data_ptr(), cf.const_data_ptr<float>(), sf.const_data_ptr<float>(), qv,
                              kv, B, T, D, table_sb, backward, dtype, at::cuda::getCurrentCUDAStream());
  cuda::check_error(err, op);
  return {q_out, k_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(intro2llm, CUDA, m) { impl_rope<rope_cuda>(m); }

}  // namespace intro2llm
