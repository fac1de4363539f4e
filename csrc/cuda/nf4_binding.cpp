// Torch binding of the CUDA NF4 kernels: checks, allocation, stream, dtype code → csrc/cuda/nf4.cu.
// Compiled only when torch is a CUDA build (setup.py), so ATen's CUDA headers are available here.
//
// Forward: M <= kFusedMaxM tokens run the fused GEMV kernel; more tokens (prefill, training) dequantize row tiles
// of W (<= kTileElems elements, never the whole weight) and multiply each with cuBLAS. Backward dx = dy @ W
// always goes through row tiles: dx += dy[:, tile] @ W[tile, :].
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "binding.h"
#include "op_checks.h"
#include "nf4.cuh"

namespace intro2llm {
namespace {

constexpr int64_t kFusedMaxM = 64;
constexpr int64_t kTileElems = int64_t{4} << 20;  // 4M elements: 8 MB in bf16 per dequantized tile

void check_cuda_weight(const at::Tensor& packed, const at::Tensor& absmax, const char* op) {
  TORCH_CHECK(packed.is_cuda() && absmax.device() == packed.device(), op,
              ": packed and absmax must be on one CUDA device, got ", packed.device(), " and ", absmax.device());
}

// Dequantize rows [n0, n0 + rows) of W (N, K) into tile (rows, K).
void dequantize_rows(const at::Tensor& packed, const at::Tensor& absmax, int shift, int64_t K, int64_t n0,
                     at::Tensor& tile, const char* op) {
  const auto err = cuda::nf4_dequantize(packed.const_data_ptr<uint8_t>(), absmax.const_data_ptr<float>(), shift,
                                        n0 * K, tile.numel(), tile.mutable_data_ptr(),
                                        cuda::dtype_code(tile, op, "the tile"), at::cuda::getCurrentCUDAStream());
  cuda::check_error(err, op);
}

// Dequantize W (N, K) one row tile at a time (<= kTileElems elements, one buffer reused) and hand each tile
// (rows, K) with its first row n0 to fn(n0, rows, tile): the whole weight is never materialized.
template <typename Fn>
void for_each_row_tile(const at::Tensor& packed, const at::Tensor& absmax, int shift, int64_t N, int64_t K,
                       const at::TensorOptions& options, const char* op, Fn&& fn) {
  const int64_t tn = std::min(N, std::max<int64_t>(64, kTileElems / K));
  auto tile = at::empty({tn, K}, options);
  for (int64_t n0 = 0; n0 < N; n0 += tn) {
    const int64_t rows = std::min(tn, N - n0);
    auto t = tile.narrow(0, 0, rows);
    dequantize_rows(packed, absmax, shift, K, n0, t, op);
    fn(n0, rows, t);
  }
}

at::Tensor nf4_dequantize_cuda(const at::Tensor& packed, const at::Tensor& absmax, int64_t numel, int64_t blocksize,
                               at::ScalarType dtype) {
  const char* op = "intro2llm::nf4_dequantize";
  check_cuda_weight(packed, absmax, op);
  const int shift = check_nf4_weight(packed, absmax, numel, blocksize, op);
  const c10::cuda::CUDAGuard guard(packed.device());
  const auto p = packed.contiguous();
  const auto a = absmax.contiguous();
  auto out = at::empty({numel}, packed.options().dtype(dtype));
  const auto err = cuda::nf4_dequantize(p.const_data_ptr<uint8_t>(), a.const_data_ptr<float>(), shift, 0, numel,
                                        out.mutable_data_ptr(), cuda::dtype_code(dtype, op, "dtype"),
                                        at::cuda::getCurrentCUDAStream());
  cuda::check_error(err, op);
  return out;
}

at::Tensor nf4_matmul_fwd_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax, int64_t N,
                               int64_t blocksize, const std::optional<at::Tensor>& bias) {
  const char* op = "intro2llm::nf4_matmul_fwd";
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got x on ", x.device());
  check_cuda_weight(packed, absmax, op);
  const int shift = check_nf4_matmul_args(x, N, /*backward=*/false, packed, absmax, blocksize, bias, op);
  const int64_t M = x.size(0), K = x.size(1);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto xc = x.contiguous();
  const auto p = packed.contiguous();
  const auto a = absmax.contiguous();
  if (M <= kFusedMaxM) {
    auto y = at::empty({M, N}, x.options());
    at::Tensor bf;
    if (bias.has_value()) bf = bias->to(at::kFloat).contiguous();
    const auto err = cuda::nf4_matmul_fwd(xc.const_data_ptr(), p.const_data_ptr<uint8_t>(), a.const_data_ptr<float>(),
                                          bias.has_value() ? bf.const_data_ptr<float>() : nullptr, y.mutable_data_ptr(),
                                          M, N, K, shift, cuda::dtype_code(x, op, "x"),
                                          at::cuda::getCurrentCUDAStream());
    cuda::check_error(err, op);
    return y;
  }
  auto y = at::empty({M, N}, x.options());
  for_each_row_tile(p, a, shift, N, K, x.options(), op, [&](int64_t n0, int64_t rows, const at::Tensor& t) {
    y.narrow(1, n0, rows).copy_(at::mm(xc, t.t()));
  });
  if (bias.has_value()) y.add_(bias->to(x.scalar_type()));
  return y;
}

at::Tensor nf4_matmul_bwd_cuda(const at::Tensor& grad_y, const at::Tensor& packed, const at::Tensor& absmax,
                               int64_t K, int64_t blocksize) {
  const char* op = "intro2llm::nf4_matmul_bwd";
  TORCH_CHECK(grad_y.is_cuda(), op, ": grad_y must be a CUDA tensor, got grad_y on ", grad_y.device());
  check_cuda_weight(packed, absmax, op);
  const int shift = check_nf4_matmul_args(grad_y, K, /*backward=*/true, packed, absmax, blocksize, std::nullopt, op);
  const int64_t M = grad_y.size(0), N = grad_y.size(1);
  const c10::cuda::CUDAGuard guard(grad_y.device());
  const auto gc = grad_y.contiguous();
  const auto p = packed.contiguous();
  const auto a = absmax.contiguous();
  auto dx = at::zeros({M, K}, grad_y.options().dtype(at::kFloat));
  for_each_row_tile(p, a, shift, N, K, grad_y.options(), op, [&](int64_t n0, int64_t rows, const at::Tensor& t) {
    dx.add_(at::mm(gc.narrow(1, n0, rows), t));
  });
  return dx.to(grad_y.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(intro2llm, CUDA, m) {
  impl_nf4<nf4_dequantize_cuda, nf4_matmul_fwd_cuda, nf4_matmul_bwd_cuda>(m);
}

}  // namespace intro2llm
