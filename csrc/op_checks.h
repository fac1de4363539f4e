// Argument checks shared by an op's CPU kernels (csrc/cpu) and its CUDA binding (csrc/cuda): shapes and dtype
// agreement, written once with errors that name the op and the shapes. Each device adds only its own checks
// (where the tensors live, which dtypes its kernels take).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace intro2llm {

// RoPE: q (B, H, T, D), k (B, Hkv, T, D) of q's dtype, D even; cos/sin (1 or B, T, D).
inline void check_rope_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
                            const char* op) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4, op, ": q and k must be 4-D (B, H, T, D), got q ", q.sizes(), " and k ",
              k.sizes());
  const int64_t B = q.size(0), T = q.size(2), D = q.size(3);
  TORCH_CHECK(k.size(0) == B && k.size(2) == T && k.size(3) == D, op, ": k must have shape (", B, ", Hkv, ", T, ", ",
              D, ") to match q of shape ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(D > 0 && D % 2 == 0, op, ": head_dim must be even and > 0, got q of shape ", q.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), op, ": q and k must share a dtype, got ", q.scalar_type(), " and ",
              k.scalar_type());
  TORCH_CHECK(cos.dim() == 3 && cos.sizes() == sin.sizes() && (cos.size(0) == 1 || cos.size(0) == B) &&
                  cos.size(1) == T && cos.size(2) == D,
              op, ": cos/sin must have shape (", B, " or 1, ", T, ", ", D, "), got cos ", cos.sizes(), " and sin ",
              sin.sizes());
}

// Flash attention: q (B, H, Tq, D), k/v (B, Hkv, Tk, D) of q's dtype, H % Hkv == 0, D in {16, 32, 64, 128},
// Tk > 0, Tq <= Tk under causal/window; key_padding_mask bool (B, Tk) on q's device.
inline void check_flash_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                                       int64_t window, const std::optional<at::Tensor>& kpm, const char* op) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op, ": q, k, v must be 4-D (B, H, T, D), got q ",
              q.sizes(), ", k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k and v must have the same shape, got k ", k.sizes(), " and v ",
              v.sizes());
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(3) == k.size(3), op, ": batch and head_dim must match, got q ",
              q.sizes(), " and k ", k.sizes());
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, op, ": H % Hkv must be 0, got q ", q.sizes(), " and k ",
              k.sizes());
  const int64_t D = q.size(3);
  TORCH_CHECK(D == 16 || D == 32 || D == 64 || D == 128, op, ": head_dim must be one of 16, 32, 64, 128, got ", D);
  TORCH_CHECK(k.size(2) > 0, op, ": the key length must be > 0, got k ", k.sizes());
  TORCH_CHECK(!(causal || window > 0) || q.size(2) <= k.size(2), op,
              ": causal/window attention needs Tq <= Tk, got q ", q.sizes(), " and k ", k.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": q, k, v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  if (kpm.has_value()) {
    TORCH_CHECK(kpm->scalar_type() == at::kBool && kpm->dim() == 2 && kpm->size(0) == q.size(0) &&
                    kpm->size(1) == k.size(2) && kpm->device() == q.device(),
                op, ": key_padding_mask must be bool (B, Tk) = (", q.size(0), ", ", k.size(2), ") on ", q.device(),
                ", got ", kpm->scalar_type(), " ", kpm->sizes(), " on ", kpm->device());
  }
}

}  // namespace intro2llm
