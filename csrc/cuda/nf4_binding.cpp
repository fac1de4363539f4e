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
#include "nf4.cuh"

namespace intro2llm {
namespace {

constexpr int64_t kFusedMaxM = 64;
constexpr int64_t kTileElems = int64_t{4} << 20;  // 4M elements: 8 MB in bf16 per dequantized tile

int log2_blocksize(int64_t blocksize, const char* op) {
  TORCH_CHECK(blocksize >= 8 && (blocksize & (blocksize - 1)) == 0, op,
              ": blocksize must be a power of two >= 8, got ", blocksize);
  int shift = 0;
  while ((int64_t{1} << shift) < blocksize) ++shift;
  return shift;
}

void check_weight(const at::Tensor& packed, const at::Tensor& absmax, int64_t numel, int64_t blocksize,
                  const char* op) {
  TORCH_CHECK(packed.is_cuda() && absmax.device() == packed.device(), op,
              ": packed and absmax must be on one CUDA device, got ", packed.device(), " and ", absmax.device());
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.numel() == (numel + 1) / 2, op,
              ": packed must be uint8 with ", (numel + 1) / 2, " bytes, got ", packed.scalar_type(), " with ",
              packed.numel());
  TORCH_CHECK(absmax.scalar_type() == at::kFloat && absmax.numel() == (numel + blocksize - 1) / blocksize, op,
              ": absmax must be float32 with one value per block of ", blocksize, ", got ", absmax.scalar_type(),
              " with ", absmax.numel());
}

void check_cuda(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA error: ", cudaGetErrorString(err));
}

// Dequantize rows [n0, n0 + rows) of W (N, K) into tile (rows, K).
void dequantize_rows(const at::Tensor& packed, const at::Tensor& absmax, int shift, int64_t K, int64_t n0,
                     at::Tensor& tile, const char* op) {
  check_cuda(cuda::nf4_dequantize(packed.const_data_ptr<uint8_t>(), absmax.const_data_ptr<float>(), shift, n0 * K,
                                  tile.numel(), tile.mutable_data_ptr(), cuda::dtype_code(tile, op, "the tile"),
                                  at::cuda::getCurrentCUDAStream()),
             op);
}

at::Tensor nf4_dequantize_cuda(const at::Tensor& packed, const at::Tensor& absmax, int64_t numel, int64_t blocksize,
                               at::ScalarType dtype) {
  const char* op = "intro2llm::nf4_dequantize";
  check_weight(packed, absmax, numel, blocksize, op);
  const int shift = log2_blocksize(blocksize, op);
  const c10::cuda::CUDAGuard guard(packed.device());
  const auto p = packed.contiguous();
  const auto a = absmax.contiguous();
  auto out = at::empty({numel}, packed.options().dtype(dtype));
  check_cuda(cuda::nf4_dequantize(p.const_data_ptr<uint8_t>(), a.const_data_ptr<float>(), shift, 0, numel,
                                  out.mutable_data_ptr(), cuda::dtype_code(dtype, op, "dtype"), at::cuda::getCurrentCUDAStream()),
             op);
  return out;
}

at::Tensor nf4_matmul_fwd_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax, int64_t N,
                               int64_t blocksize, const std::optional<at::Tensor>& bias) {
  const char* op = "intro2llm::nf4_matmul_fwd";
  TORCH_CHECK(x.dim() == 2 && x.is_cuda(), op, ": x must be a 2-D (M, K) CUDA tensor, got ", x.sizes(), " on ",
              x.device());
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(N > 0 && K > 0, op, ": the weight must have a positive shape, got (", N, ", ", K, ")");
  check_weight(packed, absmax, N * K, blocksize, op);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, op, ": bias must have shape (", N, "), got ", bias->sizes());
  }
  const int shift = log2_blocksize(blocksize, op);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto xc = x.contiguous();
  const auto p = packed.contiguous();
  const auto a = absmax.contiguous();
  if (M <= kFusedMaxM) {
    auto y = at::empty({M, N}, x.options());
    at::Tensor bf;
    if (bias.has_value()) bf = bias->to(at::kFloat).contiguous();
    check_cuda(cuda::nf4_matmul_fwd(xc.const_data_ptr(), p.const_data_ptr<uint8_t>(), a.const_data_ptr<float>(),
                                    bias.has_value() ? bf.const_data_ptr<float>() : nullptr, y.mutable_data_ptr(), M,
                                    N, K, shift, cuda::dtype_code(x, op, "x"), at::cuda::getCurrentCUDAStream()),
               op);
    return y;
  }
  auto y = at::empty({M, N}, x.options());
  const int64_t tn = std::min(N, std::max<int64_t>(64, kTileElems / K));
  auto tile = at::empty({tn, K}, x.options());
  for (int64_t n0 = 0; n0 < N; n0 += tn) {
    const int64_t rows = std::min(tn, N - n0);
    auto t = tile.narrow(0, 0, rows);
    dequantize_rows(p, a, shift, K, n0, t, op);
    y.narrow(1, n0, rows).copy_(at::mm(xc, t.t()));
  }
  if (bias.has_value()) y.add_(bias->to(x.scalar_type()));
  return y;
}

at::Tensor nf4_matmul_bwd_cuda(const at::Tensor& grad_y, const at::Tensor& packed, const at::Tensor& absmax,
                               int64_t K, int64_t blocksize) {
  const char* op = "intro2llm::nf4_matmul_bwd";
  TORCH_CHECK(grad_y.dim() == 2 && grad_y.is_cuda(), op, ": grad_y must be a 2-D (M, N) CUDA tensor, got ",
              grad_y.sizes(), " on ", grad_y.device());
  const int64_t M = grad_y.size(0), N = grad_y.size(1);
  TORCH_CHECK(N > 0 && K > 0, op, ": the weight must have a positive shape, got (", N, ", ", K, ")");
  check_weight(packed, absmax, N * K, blocksize, op);
  const int shift = log2_blocksize(blocksize, op);
  const c10::cuda::CUDAGuard guard(grad_y.device());
  const auto gc = grad_y.contiguous();
  const auto p = packed.contiguous();
  const auto a = absmax.contiguous();
  auto dx = at::zeros({M, K}, grad_y.options().dtype(at::kFloat));
  const int64_t tn = std::min(N, std::max<int64_t>(64, kTileElems / K));
  auto tile = at::empty({tn, K}, grad_y.options());
  for (int64_t n0 = 0; n0 < N; n0 += tn) {
    const int64_t rows = std::min(tn, N - n0);
    auto t = tile.narrow(0, 0, rows);
    dequantize_rows(p, a, shift, K, n0, t, op);
    dx.add_(at::mm(gc.narrow(1, n0, rows), t));
  }
  return dx.to(grad_y.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(intro2llm, CUDA, m) {
  m.impl("nf4_dequantize", &nf4_dequantize_cuda);
  m.impl("nf4_matmul_fwd", &nf4_matmul_fwd_cuda);
  m.impl("nf4_matmul_bwd", &nf4_matmul_bwd_cuda);
}

}  // namespace intro2llm
