// One decode step of a Llama-style CausalLM, every layer in one call (fp32, CPU): the C++ twin of
// fast_decode.python_step (intro2llm/model/fast_decode.py), which stays the readable version and the fallback.
//
// Why: a decode step of a small model is a chain of ~15 tiny ops per layer. From Python each one pays the
// interpreter, torch's dispatcher and, for our custom ops, the torch.library autograd wrapper: 10-20 us apiece,
// more than the arithmetic at batch 1 (the profile is in lesson 05's README). Here the matrix products are
// small_gemm calls (below) on the decode-time weight layout (W stored (in, out), so a row times W streams W's
// rows), and everything between them (RMSNorm, RoPE, the cache write, attention of the one new query row against
// the cache, SwiGLU) is a plain loop over the B rows.
// Speed against transformers' generate(): benchmarks/bench_generate.py, figures in lesson 05's README.
//
// Per layer, h (B, C) the residual stream:
//   x = rms_norm(h) · w1;  qkv = x W_qkv (+ b);  q, k = rope(q, k);  cache[pos] = k, v
//   o = softmax(q Kᵀ / sqrt(D) + mask) V over the cache slots [lo, pos];  h += o W_o (+ b)
//   x = rms_norm(h) · w2;  gu = x W_gate_up (+ b);  h += (silu(gate) · up) W_down (+ b)
// then logits = rms_norm(h) · w_final · head. Mask: slot j is visible iff j <= pos, j > pos - window (window > 0)
// and key_padding_mask[b, j]. GQA: query head hq reads kv head hq / (H / Hkv), as in repeat_kv.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "rows.h"

// full unrolling of a register tile's small constant loops (GCC; clang reads the same pragma)
#define I2L_UNROLL _Pragma("GCC unroll 16")

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace intro2llm {
namespace {

// One layer's weights, named: the fields of fast_decode.DecodeLayer in its order, which is how `layers` lists them
// (kPerLayer entries per layer). Matrices are (in, out) row-major float32; biases may be absent.
struct LayerWeights {
  at::Tensor input_norm, w_qkv;
  c10::optional<at::Tensor> b_qkv;
  at::Tensor w_o;
  c10::optional<at::Tensor> b_o;
  at::Tensor post_norm, w_gate_up;
  c10::optional<at::Tensor> b_gate_up;
  at::Tensor w_down;
  c10::optional<at::Tensor> b_down;
  int64_t F;  // intermediate size
};
constexpr int kPerLayer = 10;

I2L_NO_TRAPPING_MATH_BEGIN

// out[f] = silu(gu[f]) · gu[F + f]
I2L_CLONES void silu_mul_row(const float* __restrict gu, float* __restrict out, int64_t F) {
#pragma omp simd
  for (int64_t f = 0; f < F; ++f) {
    const float g = gu[f];
    out[f] = g / (1.f + exp_poly(-g)) * gu[F + f];
  }
}

// One query row q (D) against cache rows K, V (slot stride D) over slots [lo, hi]: out (D) = softmax(q·k·scale) V.
// `keep` (or nullptr) masks slots; s is scratch of hi + 1 floats.
I2L_CLONES void attend_row(const float* __restrict q, const float* __restrict K, const float* __restrict V,
                           int64_t lo, int64_t hi, const bool* keep, float scale, int64_t D, float* __restrict s,
                           float* __restrict out) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  float mx = kNegInf;
  for (int64_t j = lo; j <= hi; ++j) {
    const float* k = K + j * D;
    float dot = 0.f;
#pragma omp simd reduction(+ : dot)
    for (int64_t d = 0; d < D; ++d) dot += q[d] * k[d];
    s[j] = (keep == nullptr || keep[j]) ? dot * scale : kNegInf;
    mx = s[j] > mx ? s[j] : mx;
  }
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = lo; j <= hi; ++j) {
    const float p = s[j] == kNegInf ? 0.f : exp_poly(s[j] - mx);
    s[j] = p;
    sum += p;
  }
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) out[d] = 0.f;
  for (int64_t j = lo; j <= hi; ++j) {
    const float p = s[j];
    if (p == 0.f) continue;
    const float* v = V + j * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) out[d] += p * v[d];
  }
  const float inv = sum > 0.f ? 1.f / sum : 0.f;
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) out[d] *= inv;
}

// Y (M, N) (+)= X (M, K) · W (K, N) for a few rows (M <= kMaxRows), all row-major: the decode step's products.
// Why not at::mm: for M = 8 MKL packs (copies) W before every product, and the packing took more time than the
// multiply-adds (the profile is in lesson 05's README). Here W is streamed once, row by row, into register
// accumulators: for each tile of 32 output columns, 2 vector accumulators per row, one broadcast of X[r, k] per
// row and k. Tiles are independent (at::parallel_for).
constexpr int64_t kMaxRows = 8;

// Y's 2·L columns from n0 for R rows, L the lanes of V. With AVX-512 (simd.h: wide_vectors()) V = v16 and R up to
// 8 (16 accumulators of 32 registers); otherwise v8 and R <= 4, so that R·2 accumulators and 2 W vectors fit
// AVX2's 16 registers. The loops over r are unrolled: as loops, GCC keeps the accumulators on the stack.
template <typename V, int R>
I2L_CLONES void gemm_slab(const float* __restrict X, int64_t ldx, const float* __restrict W, int64_t N, int64_t K,
                          float* __restrict Y, int64_t ldy, int64_t n0, bool accumulate) {
  constexpr int64_t L = sizeof(V) / sizeof(float);
  V a0[R], a1[R];
  I2L_UNROLL for (int r = 0; r < R; ++r) {
    if (accumulate) {
      std::memcpy(&a0[r], Y + r * ldy + n0, sizeof(V));
      std::memcpy(&a1[r], Y + r * ldy + n0 + L, sizeof(V));
    } else {
      a0[r] = V{};
      a1[r] = V{};
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    V w0, w1;
    std::memcpy(&w0, W + k * N + n0, sizeof(V));
    std::memcpy(&w1, W + k * N + n0 + L, sizeof(V));
    I2L_UNROLL for (int r = 0; r < R; ++r) {
      const float x = X[r * ldx + k];
      a0[r] += x * w0;
      a1[r] += x * w1;
    }
  }
  I2L_UNROLL for (int r = 0; r < R; ++r) {
    std::memcpy(Y + r * ldy + n0, &a0[r], sizeof(V));
    std::memcpy(Y + r * ldy + n0 + L, &a1[r], sizeof(V));
  }
}

// Y's 32 columns from n0 for R rows (R <= kMaxRows = 8)
template <int R>
inline void gemm_tile_rows(const float* X, int64_t ldx, const float* W, int64_t N, int64_t K, float* Y, int64_t ldy,
                           int64_t n0, bool accumulate) {
  if (wide_vectors()) return gemm_slab<v16, R>(X, ldx, W, N, K, Y, ldy, n0, accumulate);
  constexpr int A = R < 4 ? R : 4;  // rows of the first pass; the rest (R - 4 <= 4) in a second
  for (int64_t h = 0; h < 32; h += 16) {
    gemm_slab<v8, A>(X, ldx, W, N, K, Y, ldy, n0 + h, accumulate);
    if constexpr (R > 4) gemm_slab<v8, R - 4>(X + 4 * ldx, ldx, W, N, K, Y + 4 * ldy, ldy, n0 + h, accumulate);
  }
}

// The last N % 32 columns, plainly.
void gemm_cols_tail(const float* X, int64_t ldx, const float* W, int64_t N, int64_t K, float* Y, int64_t ldy,
                    int64_t M, int64_t n0, bool accumulate) {
  for (int64_t r = 0; r < M; ++r) {
    for (int64_t n = n0; n < N; ++n) {
      float acc = accumulate ? Y[r * ldy + n] : 0.f;
      for (int64_t k = 0; k < K; ++k) acc += X[r * ldx + k] * W[k * N + n];
      Y[r * ldy + n] = acc;
    }
  }
}

I2L_NO_TRAPPING_MATH_END

const float* f32(const at::Tensor& t) { return t.const_data_ptr<float>(); }

template <int R>
void gemm_rows(const float* X, int64_t ldx, const float* W, int64_t N, int64_t K, float* Y, int64_t ldy,
               bool accumulate) {
  const int64_t tiles = N / 32;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, K * R));
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) gemm_tile_rows<R>(X, ldx, W, N, K, Y, ldy, t * 32, accumulate);
  });
  if (tiles * 32 < N) gemm_cols_tail(X, ldx, W, N, K, Y, ldy, R, tiles * 32, accumulate);
}

// y (M, N) = x (M, K) · w (K, N), or y += x · w (accumulate); x, w, y contiguous float32.
void small_gemm(const at::Tensor& x, const at::Tensor& w, at::Tensor& y, bool accumulate) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(1);
  // one row: BLAS's matrix-vector path does not pack and keeps more FMA chains in flight than 2 accumulators;
  // beyond decode sizes its packed GEMM wins
  if (M == 1 || M > 2 * kMaxRows) {
    if (accumulate) {
      y.addmm_(x, w);
    } else {
      at::mm_out(y, x, w);
    }
    return;
  }
  const float* X = x.const_data_ptr<float>();
  const float* W = w.const_data_ptr<float>();
  float* Y = y.mutable_data_ptr<float>();
  for (int64_t r0 = 0; r0 < M; r0 += kMaxRows) {
    const int64_t R = std::min(kMaxRows, M - r0);
    const float* Xr = X + r0 * K;
    float* Yr = Y + r0 * N;
    switch (R) {
      case 1: gemm_rows<1>(Xr, K, W, N, K, Yr, N, accumulate); break;
      case 2: gemm_rows<2>(Xr, K, W, N, K, Yr, N, accumulate); break;
      case 3: gemm_rows<3>(Xr, K, W, N, K, Yr, N, accumulate); break;
      case 4: gemm_rows<4>(Xr, K, W, N, K, Yr, N, accumulate); break;
      case 5: gemm_rows<5>(Xr, K, W, N, K, Yr, N, accumulate); break;
      case 6: gemm_rows<6>(Xr, K, W, N, K, Yr, N, accumulate); break;
      case 7: gemm_rows<7>(Xr, K, W, N, K, Yr, N, accumulate); break;
      default: gemm_rows<8>(Xr, K, W, N, K, Yr, N, accumulate); break;
    }
  }
}

void check_matrix(const c10::optional<at::Tensor>& w, int64_t rows, int64_t cols, const char* what, int64_t layer) {
  TORCH_CHECK(w.has_value() && w->defined(), "intro2llm::decode_step: layer ", layer, ": ", what, " is missing");
  TORCH_CHECK(w->dim() == 2 && w->size(0) == rows && w->size(1) == cols && w->scalar_type() == at::kFloat &&
                  w->is_contiguous(),
              "intro2llm::decode_step: layer ", layer, ": ", what, " must be a contiguous float32 (", rows, ", ", cols,
              ") matrix, got ", w->sizes(), " ", w->scalar_type());
}

void check_vector(const c10::optional<at::Tensor>& b, int64_t n, bool required, const char* what, int64_t layer) {
  if (!required && !(b.has_value() && b->defined())) return;
  TORCH_CHECK(b.has_value() && b->defined(), "intro2llm::decode_step: layer ", layer, ": ", what, " is missing");
  TORCH_CHECK(b->dim() == 1 && b->size(0) == n && b->scalar_type() == at::kFloat && b->is_contiguous(),
              "intro2llm::decode_step: layer ", layer, ": ", what, " must be a contiguous float32 (", n,
              ",) vector, got ", b->sizes(), " ", b->scalar_type());
}

void add_bias(at::Tensor& y, const c10::optional<at::Tensor>& b) {
  if (b.has_value() && b->defined()) y.add_(*b);
}

c10::optional<at::Tensor> bias(const c10::optional<at::Tensor>& b) {
  return b.has_value() && b->defined() ? b : c10::nullopt;
}

// Layer l's entries of `layers` (w: its first), checked: C model width, QS = H·D, NQKV = QS + 2·Hkv·D.
LayerWeights unpack_layer(const c10::optional<at::Tensor>* w, int64_t l, int64_t C, int64_t QS, int64_t NQKV) {
  check_vector(w[0], C, true, "input norm weight", l);
  check_matrix(w[1], C, NQKV, "W_qkv", l);
  check_vector(w[2], NQKV, false, "b_qkv", l);
  check_matrix(w[3], QS, C, "W_o", l);
  check_vector(w[4], C, false, "b_o", l);
  check_vector(w[5], C, true, "post-attention norm weight", l);
  TORCH_CHECK(w[6].has_value() && w[6]->defined() && w[6]->dim() == 2 && w[6]->size(1) % 2 == 0,
              "intro2llm::decode_step: layer ", l, ": W_gate_up must be (C, 2F)");
  const int64_t F = w[6]->size(1) / 2;
  check_matrix(w[6], C, 2 * F, "W_gate_up", l);
  check_vector(w[7], 2 * F, false, "b_gate_up", l);
  check_matrix(w[8], F, C, "W_down", l);
  check_vector(w[9], C, false, "b_down", l);
  return {*w[0], *w[1], bias(w[2]), *w[3], bias(w[4]), *w[5], *w[6], bias(w[7]), *w[8], bias(w[9]), F};
}

at::Tensor decode_step_cpu(const at::Tensor& h_in, c10::List<c10::optional<at::Tensor>> layers,
                           const at::Tensor& norm_weight, const at::Tensor& head, at::Tensor& k_cache,
                           at::Tensor& v_cache, int64_t pos, const at::Tensor& cos, const at::Tensor& sin,
                           const c10::optional<at::Tensor>& key_padding_mask, int64_t num_heads, double eps_d,
                           int64_t window) {
  const char* op = "intro2llm::decode_step";
  TORCH_CHECK(h_in.dim() == 2 && h_in.scalar_type() == at::kFloat && h_in.device().is_cpu(), op,
              ": h must be a float32 (B, C) CPU tensor, got ", h_in.sizes(), " ", h_in.scalar_type(), " on ",
              h_in.device());
  TORCH_CHECK(k_cache.dim() == 5 && k_cache.sizes() == v_cache.sizes() && k_cache.scalar_type() == at::kFloat &&
                  v_cache.scalar_type() == at::kFloat && k_cache.is_contiguous() && v_cache.is_contiguous(),
              op, ": k_cache/v_cache must be contiguous float32 (L, B, Hkv, Tmax, D) of one shape, got ",
              k_cache.sizes(), " and ", v_cache.sizes());
  const int64_t B = h_in.size(0), C = h_in.size(1);
  const int64_t L = k_cache.size(0), Hkv = k_cache.size(2), Tmax = k_cache.size(3), D = k_cache.size(4);
  const int64_t H = num_heads;
  TORCH_CHECK(k_cache.size(1) == B, op, ": cache batch ", k_cache.size(1), " != h batch ", B);
  TORCH_CHECK(H > 0 && Hkv > 0 && H % Hkv == 0 && D % 2 == 0, op, ": num_heads ", H,
              " must be a multiple of the cache's kv heads ", Hkv, " and head_dim ", D, " even");
  TORCH_CHECK(static_cast<int64_t>(layers.size()) == kPerLayer * L, op, ": expected ", kPerLayer, " entries per layer (",
              kPerLayer * L, " for ", L, " layers), got ", layers.size());
  TORCH_CHECK(0 <= pos && pos < Tmax, op, ": pos ", pos, " outside the cache's [0, ", Tmax, ")");
  TORCH_CHECK(cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(1) == D && (cos.size(0) == 1 || cos.size(0) == B) &&
                  cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                  sin.is_contiguous(),
              op, ": cos/sin must be contiguous float32 (1 or ", B, ", ", D, "), got ", cos.sizes(), " and ",
              sin.sizes());
  const bool* keep = nullptr;
  at::Tensor kpm;
  if (key_padding_mask.has_value() && key_padding_mask->defined()) {
    kpm = key_padding_mask->to(at::kBool).contiguous();
    TORCH_CHECK(kpm.dim() == 2 && kpm.size(0) == B && kpm.size(1) == pos + 1, op,
                ": key_padding_mask must be (", B, ", ", pos + 1, "), got ", kpm.sizes());
    keep = kpm.const_data_ptr<bool>();
  }
  const int64_t QS = H * D, KS = Hkv * D, NQKV = QS + 2 * KS, G = H / Hkv;
  const float eps = static_cast<float>(eps_d), scale = 1.f / std::sqrt(static_cast<float>(D));
  const int64_t lo = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0;

  at::Tensor h = h_in.contiguous().clone();  // the residual stream, updated in place
  at::Tensor x = at::empty({B, C}, h.options());
  at::Tensor attn = at::empty({B, QS}, h.options());
  float* kc = k_cache.mutable_data_ptr<float>();
  float* vc = v_cache.mutable_data_ptr<float>();
  const int64_t cache_bh = Tmax * D;  // floats per (layer, b, kv head)
  std::vector<float> scores(static_cast<size_t>(pos + 1));

  const std::vector<c10::optional<at::Tensor>> entries(layers.begin(), layers.end());
  std::vector<LayerWeights> W;
  W.reserve(L);
  for (int64_t l = 0; l < L; ++l) W.push_back(unpack_layer(entries.data() + l * kPerLayer, l, C, QS, NQKV));
  TORCH_CHECK(norm_weight.dim() == 1 && norm_weight.size(0) == C && norm_weight.scalar_type() == at::kFloat &&
                  norm_weight.is_contiguous(),
              op, ": norm_weight must be a contiguous float32 (", C, ",) vector, got ", norm_weight.sizes());
  TORCH_CHECK(head.dim() == 2 && head.size(0) == C && head.scalar_type() == at::kFloat, op,
              ": head must be float32 (", C, ", V), got ", head.sizes(), " ", head.scalar_type());

  float* hp = h.mutable_data_ptr<float>();
  float* xp = x.mutable_data_ptr<float>();
  float* ap = attn.mutable_data_ptr<float>();
  const float* cp = f32(cos);
  const float* sp = f32(sin);
  const int64_t table_stride = cos.size(0) == 1 ? 0 : D;
  for (int64_t l = 0; l < L; ++l) {
    const LayerWeights& w = W[l];
    const int64_t F = w.F;
    // attention block
    for (int64_t b = 0; b < B; ++b) rms_fwd_row(hp + b * C, f32(w.input_norm), xp + b * C, C, eps);
    at::Tensor qkv = at::empty({B, NQKV}, h.options());
    small_gemm(x, w.w_qkv, qkv, false);  // (B, NQKV)
    add_bias(qkv, w.b_qkv);
    float* qkvp = qkv.mutable_data_ptr<float>();
    for (int64_t b = 0; b < B; ++b) {
      float* row = qkvp + b * NQKV;
      const float* c = cp + b * table_stride;
      const float* s = sp + b * table_stride;
      for (int64_t hh = 0; hh < H + Hkv; ++hh) {  // q heads, then k heads, rotated in place
        rope_rows<false>(row + hh * D, D, c, s, row + hh * D, 1, D);
      }
      for (int64_t hk = 0; hk < Hkv; ++hk) {
        const int64_t off = ((l * B + b) * Hkv + hk) * cache_bh + pos * D;
        std::copy(row + QS + hk * D, row + QS + (hk + 1) * D, kc + off);
        std::copy(row + QS + KS + hk * D, row + QS + KS + (hk + 1) * D, vc + off);
      }
    }
    for (int64_t b = 0; b < B; ++b) {
      const bool* kb = keep ? keep + b * (pos + 1) : nullptr;
      for (int64_t hq = 0; hq < H; ++hq) {
        const int64_t hk = hq / G;
        const int64_t base = ((l * B + b) * Hkv + hk) * cache_bh;
        attend_row(qkvp + b * NQKV + hq * D, kc + base, vc + base, lo, pos, kb, scale, D, scores.data(),
                   ap + b * QS + hq * D);
      }
    }
    small_gemm(attn, w.w_o, h, true);  // h += o W_o
    add_bias(h, w.b_o);
    // feed-forward block
    for (int64_t b = 0; b < B; ++b) rms_fwd_row(hp + b * C, f32(w.post_norm), xp + b * C, C, eps);
    at::Tensor gu = at::empty({B, 2 * F}, h.options());
    small_gemm(x, w.w_gate_up, gu, false);  // (B, 2F)
    add_bias(gu, w.b_gate_up);
    at::Tensor act = at::empty({B, F}, h.options());
    const float* gup = f32(gu);
    float* actp = act.mutable_data_ptr<float>();
    for (int64_t b = 0; b < B; ++b) silu_mul_row(gup + b * 2 * F, actp + b * F, F);
    small_gemm(act, w.w_down, h, true);  // h += act W_down
    add_bias(h, w.b_down);
  }
  for (int64_t b = 0; b < B; ++b) rms_fwd_row(hp + b * C, f32(norm_weight), xp + b * C, C, eps);
  at::Tensor logits = at::empty({B, head.size(1)}, h.options());
  small_gemm(x, head.contiguous(), logits, false);  // (B, V)
  return logits;
}

}  // namespace

TORCH_LIBRARY_IMPL(intro2llm, CPU, m) { m.impl("decode_step", &decode_step_cpu); }

}  // namespace intro2llm
