// Shared by an op's CPU kernels (csrc/cpu) and its CUDA binding (csrc/cuda): the argument checks (shapes and dtype
// agreement, written once with errors that name the op and the shapes; each device adds only its own checks: where
// the tensors live, which dtypes its kernels take) and, at the end, the registrations (which kernel serves which
// schema of ops.cpp, written once; a device passes its kernels as template arguments).
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <string>

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

// RMSNorm: x (..., N) with N > 0, weight (N,). The backward also takes grad_y of x's shape and rstd fp32 (one per row).
inline void check_rms_norm_args(const at::Tensor& x, const at::Tensor& weight, const char* op) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, op, ": x must have a non-empty last dimension, got shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1), op, ": weight must have shape (", x.size(-1),
              ",) to match x of shape ", x.sizes(), ", got ", weight.sizes());
}

inline void check_rms_norm_grad_args(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& rstd,
                                     const char* op) {
  TORCH_CHECK(grad_y.sizes() == x.sizes(), op, ": grad_y shape ", grad_y.sizes(), " must equal x shape ", x.sizes());
  TORCH_CHECK(rstd.scalar_type() == at::kFloat && rstd.numel() * x.size(-1) == x.numel(), op,
              ": rstd must be float32 with one value per row, got ", rstd.sizes());
}

// SwiGLU/GeGLU: gate and up of one shape and dtype; the backward's grad_out (when given) of gate's shape.
inline void check_glu_args(const at::Tensor& gate, const at::Tensor& up, const char* op,
                           const at::Tensor* grad_out = nullptr) {
  TORCH_CHECK(gate.sizes() == up.sizes(), op, ": gate and up must have the same shape, got gate ", gate.sizes(),
              " and up ", up.sizes());
  TORCH_CHECK(gate.scalar_type() == up.scalar_type(), op, ": gate and up must share a dtype, got ",
              gate.scalar_type(), " and ", up.scalar_type());
  TORCH_CHECK(grad_out == nullptr || grad_out->sizes() == gate.sizes(), op, ": grad_out shape ",
              grad_out ? grad_out->sizes() : gate.sizes(), " must equal gate shape ", gate.sizes());
}

// GeGLU's approximate argument: "none" (erf) or "tanh"; returns true for "tanh".
inline bool geglu_uses_tanh(c10::string_view approximate, const char* op) {
  const std::string a(approximate);
  TORCH_CHECK(a == "none" || a == "tanh", op, ": approximate must be 'none' or 'tanh', got '", a, "'");
  return a == "tanh";
}

// Cross-entropy: logits (N, V) with V > 0, targets int64 (N,), label_smoothing in [0, 1], z_loss >= 0. The range of
// the targets is checked by each device (a host loop on CPU, a device reduction on CUDA).
inline void check_cross_entropy_args(const at::Tensor& logits, const at::Tensor& targets, double eps, double z,
                                     const char* op) {
  TORCH_CHECK_VALUE(logits.dim() == 2 && logits.size(1) > 0, op, ": logits must be (N, V) with V > 0, got shape ",
                    logits.sizes());
  TORCH_CHECK_VALUE(targets.dim() == 1 && targets.size(0) == logits.size(0), op, ": targets must have shape (",
                    logits.size(0), ",) to match logits ", logits.sizes(), ", got ", targets.sizes());
  TORCH_CHECK_TYPE(targets.scalar_type() == at::kLong, op, ": targets must be int64, got ", targets.scalar_type());
  TORCH_CHECK_VALUE(eps >= 0.0 && eps <= 1.0, op, ": label_smoothing must be in [0, 1], got ", eps);
  TORCH_CHECK_VALUE(z >= 0.0, op, ": z_loss must be >= 0, got ", z);
}

// The backward's grad_loss and lse (fp32): one value per row of logits.
inline void check_cross_entropy_grad_args(const at::Tensor& grad_loss, const at::Tensor& lse, int64_t N,
                                          const char* op) {
  TORCH_CHECK_VALUE(grad_loss.numel() == N && lse.numel() == N && lse.scalar_type() == at::kFloat, op,
                    ": grad_loss and lse must hold one value per row (", N, "), lse in float32; got grad_loss ",
                    grad_loss.sizes(), " and lse ", lse.sizes(), " ", lse.scalar_type());
}

// An fp32 output with one value per row of logits (the forward's loss and lse).
inline at::Tensor cross_entropy_row_output(const at::Tensor& logits) {
  return at::empty({logits.size(0)}, logits.options().dtype(at::kFloat));
}

// The message of an out-of-range target (both devices say the same).
inline void fail_target_out_of_range(int64_t target, int64_t pos, int64_t V, int64_t ignore_index, const char* op) {
  TORCH_CHECK_VALUE(false, op, ": target ", target, " at position ", pos, " is outside [0, ", V,
                    ") and is not ignore_index=", ignore_index);
}

// NF4 weight of numel elements: packed uint8 ((numel + 1) / 2 bytes), absmax fp32 (one per block), blocksize a power
// of two >= 8 (checked first: the block count divides by it). Returns log2(blocksize).
inline int check_nf4_weight(const at::Tensor& packed, const at::Tensor& absmax, int64_t numel, int64_t blocksize,
                            const char* op) {
  TORCH_CHECK(blocksize >= 8 && (blocksize & (blocksize - 1)) == 0, op,
              ": blocksize must be a power of two >= 8, got ", blocksize);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.numel() == (numel + 1) / 2, op,
              ": packed must be uint8 with ", (numel + 1) / 2, " bytes, got ", packed.scalar_type(), " with ",
              packed.numel());
  TORCH_CHECK(absmax.scalar_type() == at::kFloat && absmax.numel() == (numel + blocksize - 1) / blocksize, op,
              ": absmax must be float32 with one value per block of ", blocksize, ", got ", absmax.scalar_type(),
              " with ", absmax.numel());
  int shift = 0;
  while ((int64_t{1} << shift) < blocksize) ++shift;
  return shift;
}

// NF4 matmul with W (N, K) stored as above: the forward takes a = x (M, K) and n_or_k = N, the backward
// a = grad_y (M, N) and n_or_k = K; bias (N,) or none. Returns log2(blocksize).
inline int check_nf4_matmul_args(const at::Tensor& a, int64_t n_or_k, bool backward, const at::Tensor& packed,
                                 const at::Tensor& absmax, int64_t blocksize, const std::optional<at::Tensor>& bias,
                                 const char* op) {
  TORCH_CHECK(a.dim() == 2, op, backward ? ": grad_y must be 2-D (M, N)" : ": x must be 2-D (M, K)", ", got shape ",
              a.sizes());
  const int64_t N = backward ? a.size(1) : n_or_k, K = backward ? n_or_k : a.size(1);
  TORCH_CHECK(N > 0 && K > 0, op, ": the weight must have a positive shape, got (", N, ", ", K, ")");
  const int shift = check_nf4_weight(packed, absmax, N * K, blocksize, op);
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == N), op, ": bias must have shape (", N,
              "), got ", bias.has_value() ? bias->sizes() : at::IntArrayRef{});
  return shift;
}

// ---- registrations: TORCH_LIBRARY_IMPL(intro2llm, DEVICE, m) { impl_OP<the device's kernels>(m); }

template <auto Fwd, auto Bwd>
void impl_rms_norm(torch::Library& m) {
  m.impl("rms_norm_fwd", Fwd);
  m.impl("rms_norm_bwd", Bwd);
}

template <auto Fwd, auto Bwd>
void impl_flash_attention(torch::Library& m) {
  m.impl("flash_attention_fwd", Fwd);
  m.impl("flash_attention_bwd", Bwd);
}

template <auto Fwd, auto Bwd, auto FwdBwdInplace>
void impl_cross_entropy(torch::Library& m) {
  m.impl("cross_entropy_fwd", Fwd);
  m.impl("cross_entropy_bwd", Bwd);
  m.impl("cross_entropy_fwd_bwd_", FwdBwdInplace);
}

template <auto Dequantize, auto MatmulFwd, auto MatmulBwd>
void impl_nf4(torch::Library& m) {
  m.impl("nf4_dequantize", Dequantize);
  m.impl("nf4_matmul_fwd", MatmulFwd);
  m.impl("nf4_matmul_bwd", MatmulBwd);
}

// RoPE: one kernel Rope(q, k, cos, sin, backward, op); the backward rotates the gradients by -theta.
template <auto Rope>
void impl_rope(torch::Library& m) {
  m.impl("apply_rope_fwd", [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin) {
    return Rope(q, k, cos, sin, /*backward=*/false, "intro2llm::apply_rope_fwd");
  });
  m.impl("apply_rope_bwd", [](const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& cos,
                              const at::Tensor& sin) {
    return Rope(grad_q, grad_k, cos, sin, /*backward=*/true, "intro2llm::apply_rope_bwd");
  });
}

// SwiGLU/GeGLU: one forward Fwd(gate, up, act, op) and one backward Bwd(grad, gate, up, act, op) for every
// activation; Act is the device's activation code (kSilu, kGelu, kGeluTanh).
template <typename Act, auto Fwd, auto Bwd>
void impl_glu(torch::Library& m) {
  m.impl("swiglu_fwd", [](const at::Tensor& gate, const at::Tensor& up) {
    return Fwd(gate, up, Act::kSilu, "intro2llm::swiglu_fwd");
  });
  m.impl("swiglu_bwd", [](const at::Tensor& grad, const at::Tensor& gate, const at::Tensor& up) {
    return Bwd(grad, gate, up, Act::kSilu, "intro2llm::swiglu_bwd");
  });
  m.impl("geglu_fwd", [](const at::Tensor& gate, const at::Tensor& up, c10::string_view approximate) {
    const char* op = "intro2llm::geglu_fwd";
    return Fwd(gate, up, geglu_uses_tanh(approximate, op) ? Act::kGeluTanh : Act::kGelu, op);
  });
  m.impl("geglu_bwd", [](const at::Tensor& grad, const at::Tensor& gate, const at::Tensor& up,
                         c10::string_view approximate) {
    const char* op = "intro2llm::geglu_bwd";
    return Bwd(grad, gate, up, geglu_uses_tanh(approximate, op) ? Act::kGeluTanh : Act::kGelu, op);
  });
}

}  // namespace intro2llm
