// Flash attention on CPU (FlashAttention-2, Dao 2023): softmax(Q Kᵀ·scale + mask) V without the (Tq, Tk) matrix.
//
// Forward: one task per (batch, kv head, query block: up to kLanes = 32 rows over the group's query heads),
// scheduled dynamically over the threads of at::parallel_for. The block stays put; keys/values stream past in
// chunks over the exact key range the causal/window mask leaves visible (wholly masked keys are never touched).
// The block's 32 rows live in the lanes of two 16-float vectors (the "lane path", fwd_lanes): Q is transposed
// once, so a key's 32 scores are one K row times Qᵀ, and per chunk
//   Sᵀ = K_chunk Qᵀ (st_tile)  →  online softmax down the key axis, all rows at once (running max m, sum l;
//   O rescaled by exp(m_old − m_new))  →  O += P V_chunk (pv_tile)
// with K and V rows read in place, and at the end O / l goes straight to the output and lse = m + log l is saved
// (B, H, Tq) fp32. Blocks of at most kThinRows rows (decoding: Tq·G small) take the row path (fwd_rows) instead:
// S = Q Kᵀ by BLAS, a softmax per row, O += P V.
// Backward (recomputes P = exp(S·scale − lse) per tile; Δ = rowsum(O∘dO) first):
//   pass 1, one task per (batch, kv head, key block): dV += Pᵀ dO, dP = dO Vᵀ, dS = P∘(dP − Δ)·scale,
//           dK += dSᵀ Q, summed over the query heads of the group (GQA/MQA: no races, no atomics);
//   pass 2, one task per (batch, head, query block): dQ += dS K.
// Extra memory: O(threads · (kLanes·kLaneChunk + kLanes·D)) scratch plus the outputs — O(T·D), never O(T²).
//
// The backward's and the row path's Q Kᵀ-shaped products go to the BLAS torch links (sgemm_, weak symbol; MKL in
// x86 wheels, OpenBLAS elsewhere), single-threaded inside the parallel region; at::addmm_out on tile views is the
// fallback when no sgemm_ is exported (or when env INTRO2LLM_NO_SGEMM=1, which tests that path). P·V and dS·K
// use pv_tile, a register kernel that reads V (K) rows in place: BLAS re-packed them for every query block.
// The kernels and softmax loops are compiled for AVX-512/AVX2/baseline with target_clones (no -march flag
// needed) and use a polynomial exp that vectorizes (Cephes expf, rel. error ~1e-7).
// fp16/bf16 inputs are widened to fp32 copies once (O(T·D)); accumulation is fp32 throughout. The forward reads
// fp32 q/k/v through their (B, H, T) strides (rows must be contiguous), so transposed projections and KV-cache
// prefix views are not copied; the backward works on contiguous copies.
// Positions: key j at j, query i at i + Tk − Tq (bottom-right). causal: k ≤ q; window w: q − w < k
// (and k < q + w without causal); key_padding_mask (B, Tk) bool, False = hidden. A row that sees no key
// gets output 0, lse = −inf and zero gradients.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "op_checks.h"
#include "simd.h"

// full unrolling of a register tile's small constant loops (GCC; clang reads the same pragma)
#define I2L_UNROLL _Pragma("GCC unroll 16")

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

extern "C" {
// Fortran BLAS, column-major. Weak: resolved from the BLAS inside libtorch_cpu when it exports one.
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
}


namespace intro2llm {
namespace {

// Tile sizes (chosen by measurement: benchmarks/bench_attention.py, figures in lesson 15's README). Forward, lane
// path: 32 rows, 8-key score tiles, 256-key chunks (Sᵀ stays in L1). Backward: tiles of 32 query rows over their
// exact key sub-range.
constexpr int kLanes = 32;            // query rows per forward block (lane path: two 16-float vectors)
constexpr int kSlabs = kLanes / 16;
constexpr int64_t kKeyGroup = 8;      // keys per score tile (lane path)
constexpr int64_t kLaneChunk = 256;   // keys per softmax chunk (lane path): Sᵀ is 32 KB and stays in L1
constexpr int64_t kThinRows = 8;      // blocks of at most this many rows (decoding) take the row path
constexpr int64_t kBlockK = 1024;     // keys per streamed chunk (row path), split evenly over the visible range
constexpr int64_t kBwdBlockK = 128;   // keys per backward pass-1 task
constexpr int64_t kBwdBlockQ = 32;    // query rows per backward tile
constexpr int64_t kBwdChunkK = 256;   // keys per streamed chunk in backward pass 2
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ---- row-major GEMM wrappers over column-major BLAS -----------------------------------------------------------
// Row-major C (m×n) is column-major Cᵀ, so C = op(A)·op(B) is computed as Cᵀ = op(B)ᵀ·op(A)ᵀ.
at::Tensor view(const float* p, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<float*>(p), {rows, cols}, {ld, 1}, at::TensorOptions().dtype(at::kFloat));
}

void blas(char ta, char tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  const int M = static_cast<int>(m), N = static_cast<int>(n), K = static_cast<int>(k);
  const int LDA = static_cast<int>(lda), LDB = static_cast<int>(ldb), LDC = static_cast<int>(ldc);
  sgemm_(&ta, &tb, &M, &N, &K, &alpha, a, &LDA, b, &LDB, &beta, c, &LDC);
}

const bool kUseBlas = sgemm_ != nullptr && std::getenv("INTRO2LLM_NO_SGEMM") == nullptr;

// C (m×n) = alpha · A (m×k) · B (n×k)ᵀ + beta · C
void gemm_nt(int64_t m, int64_t n, int64_t k, float alpha, const float* A, int64_t lda, const float* B, int64_t ldb,
             float beta, float* C, int64_t ldc) {
  if (kUseBlas) return blas('T', 'N', n, m, k, alpha, B, ldb, A, lda, beta, C, ldc);
  auto c = view(C, m, n, ldc);
  at::addmm_out(c, c, view(A, m, k, lda), view(B, n, k, ldb).t(), beta, alpha);
}

// C (m×n) = alpha · A (k×m)ᵀ · B (k×n) + beta · C
void gemm_tn(int64_t m, int64_t n, int64_t k, float alpha, const float* A, int64_t lda, const float* B, int64_t ldb,
             float beta, float* C, int64_t ldc) {
  if (kUseBlas) return blas('N', 'T', n, m, k, alpha, B, ldb, A, lda, beta, C, ldc);
  auto c = view(C, m, n, ldc);
  at::addmm_out(c, c, view(A, k, m, lda).t(), view(B, k, n, ldb), beta, alpha);
}

// ---- vectorizable row kernels -----------------------------------------------------------------------------------
// The clamps and masks below vectorize only without trapping math (simd.h): scoped to these functions.
I2L_NO_TRAPPING_MATH_BEGIN
// One query row against one key chunk, forward. s[0, n): raw scores q·k_j; visible keys are [a, b) (a < b) and,
// with `keep`, only those with keep[j]. Updates the running max m and sum l, turns s into p = exp(s·scale − m_new)
// (0 outside), and rescales the row's accumulator o[0, D) by exp(m_old − m_new).
I2L_CLONES void softmax_chunk_row(float* s, int64_t n, int64_t a, int64_t b, const bool* keep, float scale,
                                     float* m, float* l, float* o, int64_t D) {
  float mx = kNegInf;
  // `omp simd` lets the compiler reorder the max/sum reductions, which is what makes these loops vectorize
  if (keep != nullptr) {
#pragma omp simd
    for (int64_t j = a; j < b; ++j) s[j] = keep[j] ? s[j] * scale : kNegInf;
  } else {
#pragma omp simd
    for (int64_t j = a; j < b; ++j) s[j] *= scale;
  }
#pragma omp simd reduction(max : mx)
  for (int64_t j = a; j < b; ++j) mx = s[j] > mx ? s[j] : mx;
  for (int64_t j = 0; j < a; ++j) s[j] = 0.f;
  for (int64_t j = b; j < n; ++j) s[j] = 0.f;
  const float m_new = std::max(*m, mx);
  if (m_new == kNegInf) {  // nothing visible so far (key padding): p = 0, nothing to rescale
    for (int64_t j = a; j < b; ++j) s[j] = 0.f;
    return;
  }
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = a; j < b; ++j) {
    const float p = exp_poly(s[j] - m_new);
    s[j] = p;
    sum += p;
  }
  const float alpha = std::exp(*m - m_new);  // 0 when m was -inf
  *l = *l * alpha + sum;
  *m = m_new;
  if (alpha != 1.f) {
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) o[d] *= alpha;
  }
}

// Backward: s[0, n) raw scores → p = exp(s·scale − lse) on the visible keys [a, b) (and keep), 0 elsewhere.
I2L_CLONES void probs_row(float* s, int64_t n, int64_t a, int64_t b, const bool* keep, float scale, float lse) {
  for (int64_t j = 0; j < a; ++j) s[j] = 0.f;
  for (int64_t j = b; j < n; ++j) s[j] = 0.f;
  if (lse == kNegInf) {  // row saw no key in the forward: no gradient flows through it
    for (int64_t j = a; j < b; ++j) s[j] = 0.f;
    return;
  }
#pragma omp simd
  for (int64_t j = a; j < b; ++j) s[j] = exp_poly(s[j] * scale - lse);
  if (keep != nullptr) {
#pragma omp simd
    for (int64_t j = a; j < b; ++j) s[j] = keep[j] ? s[j] : 0.f;
  }
}

// dS = P ∘ (dP − Δ) · scale over a row of n entries (P is 0 where masked, so dS is too); written into dp.
I2L_CLONES void dscores_row(const float* p, float* dp, int64_t n, float delta, float scale) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dp[j] = p[j] * (dp[j] - delta) * scale;
}

I2L_CLONES float dot_row(const float* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += a[j] * b[j];
  return s;
}

I2L_NO_TRAPPING_MATH_END

// ---- masks ------------------------------------------------------------------------------------------------------
struct Mask {
  int64_t Tq, Tk, window;  // window <= 0: none
  bool causal;
  int64_t offset() const { return Tk - Tq; }
  // visible keys of query row i: [lo(i), hi(i)) — both non-decreasing in i
  int64_t lo(int64_t i) const { return window > 0 ? std::clamp<int64_t>(i + offset() - window + 1, 0, Tk) : 0; }
  int64_t hi(int64_t i) const {
    if (causal) return std::clamp<int64_t>(i + offset() + 1, 0, Tk);
    if (window > 0) return std::clamp<int64_t>(i + offset() + window, 0, Tk);
    return Tk;
  }
  // query rows that see at least one key of [k0, k1): [first_q(k0), last_q(k1))
  int64_t first_q(int64_t k0) const {
    if (causal) return std::clamp<int64_t>(k0 - offset(), 0, Tq);
    if (window > 0) return std::clamp<int64_t>(k0 - offset() - window + 1, 0, Tq);
    return 0;
  }
  int64_t last_q(int64_t k1) const {
    if (window > 0) return std::clamp<int64_t>(k1 - 1 - offset() + window, 0, Tq);
    return Tq;
  }
};

// Run fn(task) for task in [0, n) with dynamic scheduling (causal tasks differ in cost), `grain` consecutive tasks
// per grab.
template <typename Fn>
void parallel_tasks(int64_t n, const Fn& fn, int64_t grain = 1) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(n, at::get_num_threads()));
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      for (int64_t t0 = next.fetch_add(grain); t0 < n; t0 = next.fetch_add(grain)) {
        for (int64_t t = t0; t < std::min(n, t0 + grain); ++t) fn(t);
      }
    }
  });
}

// ---- register micro-kernels --------------------------------------------------------------------------------------
// MKL packs both operands on every call, and at the sizes of one query block (32 rows against a few hundred keys)
// that packing cost as much as the multiply-adds. These kernels read K and V rows in place and keep their output
// tile in registers: 16-float GCC vectors where the CPU has AVX-512 (pv_tile_wide, st_tile_wide), 8-float ones
// in register-sized pieces elsewhere (pv_tile_narrow, st_tile_narrow; simd.h: wide_vectors()).

// O (R rows at O, NV·16 columns from c0) = alpha ∘ O + P (R × keys [j0, j1)) · V (keys × ·, row stride ldv): alpha
// (one factor per row, nullptr: 1) is the online softmax's rescaling. P's entry (i, j) is P[i·si + j·sj]: row-major
// P has (si, sj) = (ldp, 1), the forward's Pᵀ has (1, kLanes). With dst, the result times post (one factor per
// row: 1/l) goes to the rows dst[i] instead of back to O: the forward's last chunk writes its output directly.
template <int R, int NV>
I2L_CLONES void pv_tile_wide(const float* __restrict P, int64_t si, int64_t sj, const float* __restrict V,
                             int64_t ldv, int64_t j0, int64_t j1, float* __restrict O, int64_t ldo, int64_t c0,
                             const float* __restrict alpha, float* const* dst, const float* post) {
  v16 acc[R][NV];
  for (int i = 0; i < R; ++i) {
    for (int c = 0; c < NV; ++c) {
      std::memcpy(&acc[i][c], O + i * ldo + c0 + 16 * c, sizeof(v16));
      if (alpha != nullptr) acc[i][c] *= alpha[i];
    }
  }
  for (int64_t j = j0; j < j1; ++j) {
    v16 vv[NV];
    for (int c = 0; c < NV; ++c) std::memcpy(&vv[c], V + j * ldv + c0 + 16 * c, sizeof(v16));
    for (int i = 0; i < R; ++i) {
      const float pij = P[i * si + j * sj];
      for (int c = 0; c < NV; ++c) acc[i][c] += pij * vv[c];
    }
  }
  if (dst != nullptr) {
    for (int i = 0; i < R; ++i)
      for (int c = 0; c < NV; ++c) {
        const v16 y = acc[i][c] * post[i];
        std::memcpy(dst[i] + c0 + 16 * c, &y, sizeof(v16));
      }
    return;
  }
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < NV; ++c) std::memcpy(O + i * ldo + c0 + 16 * c, &acc[i][c], sizeof(v16));
}

// The same tile with 8-float vectors, one 16-column slab at a time: R·2 accumulators and 2 V vectors stay within
// AVX2's 16 registers (P's entries are re-read once per slab). The small loops are unrolled by pragma: left as
// loops, GCC keeps the accumulator arrays on the stack.
template <int R, int NV>
I2L_CLONES void pv_tile_narrow(const float* __restrict P, int64_t si, int64_t sj, const float* __restrict V,
                               int64_t ldv, int64_t j0, int64_t j1, float* __restrict O, int64_t ldo, int64_t c0,
                               const float* __restrict alpha, float* const* dst, const float* post) {
  for (int c = 0; c < NV; ++c) {
    const int64_t col = c0 + 16 * c;
    v8 acc[R][2];
    I2L_UNROLL for (int i = 0; i < R; ++i) {
      I2L_UNROLL for (int h = 0; h < 2; ++h) {
        std::memcpy(&acc[i][h], O + i * ldo + col + 8 * h, sizeof(v8));
        if (alpha != nullptr) acc[i][h] *= alpha[i];
      }
    }
    for (int64_t j = j0; j < j1; ++j) {
      v8 vv[2];
      I2L_UNROLL for (int h = 0; h < 2; ++h) std::memcpy(&vv[h], V + j * ldv + col + 8 * h, sizeof(v8));
      I2L_UNROLL for (int i = 0; i < R; ++i) {
        const float pij = P[i * si + j * sj];
        I2L_UNROLL for (int h = 0; h < 2; ++h) acc[i][h] += pij * vv[h];
      }
    }
    I2L_UNROLL for (int i = 0; i < R; ++i) {
      I2L_UNROLL for (int h = 0; h < 2; ++h) {
        if (dst != nullptr) {
          const v8 y = acc[i][h] * post[i];
          std::memcpy(dst[i] + col + 8 * h, &y, sizeof(v8));
        } else {
          std::memcpy(O + i * ldo + col + 8 * h, &acc[i][h], sizeof(v8));
        }
      }
    }
  }
}

template <int R, int NV>
inline void pv_tile(const float* P, int64_t si, int64_t sj, const float* V, int64_t ldv, int64_t j0, int64_t j1,
                    float* O, int64_t ldo, int64_t c0, const float* alpha, float* const* dst = nullptr,
                    const float* post = nullptr) {
  if (wide_vectors()) return pv_tile_wide<R, NV>(P, si, sj, V, ldv, j0, j1, O, ldo, c0, alpha, dst, post);
  pv_tile_narrow<R, NV>(P, si, sj, V, ldv, j0, j1, O, ldo, c0, alpha, dst, post);
}

// O (M × D) += P (M × n, row-major, row stride ldp) V (n × D): D a multiple of 16 (16, 32, 64, 128).
template <int NV>
void pv_rows(const float* P, int64_t ldp, const float* V, int64_t ldv, int64_t n, float* O, int64_t ldo, int64_t M,
             int64_t D) {
  for (int64_t c0 = 0; c0 < D; c0 += 16 * NV) {
    int64_t r = 0;
    for (; r + 4 <= M; r += 4) pv_tile<4, NV>(P + r * ldp, ldp, 1, V, ldv, 0, n, O + r * ldo, ldo, c0, nullptr);
    for (; r < M; ++r) pv_tile<1, NV>(P + r * ldp, ldp, 1, V, ldv, 0, n, O + r * ldo, ldo, c0, nullptr);
  }
}

void pv_accumulate(const float* P, int64_t ldp, const float* V, int64_t ldv, int64_t n, float* O, int64_t ldo,
                   int64_t M, int64_t D) {
  if (D % 64 == 0) return pv_rows<4>(P, ldp, V, ldv, n, O, ldo, M, D);
  if (D % 32 == 0) return pv_rows<2>(P, ldp, V, ldv, n, O, ldo, M, D);
  return pv_rows<1>(P, ldp, V, ldv, n, O, ldo, M, D);
}

// ---- forward ----------------------------------------------------------------------------------------------------
// Element strides of a (B, H, T, D) operand whose rows (last dim) are contiguous: the forward reads q/k/v in
// place, so transposed projections and KV-cache prefix views need no copy (BLAS takes the row stride as ld).
struct Strides {
  int64_t b, h, t;
};

// One forward task: rows r = 0..M-1 of a query block, row r being query q0 + r % nq of head h0 + r / nq. GQA/MQA
// stack the query heads that share a kv head into one block, so every K/V row is read once per group, not once per
// head (decoding with a cache, Tq = 1, is bound by reading K/V: that is where GQA's speed comes from).
struct Block {
  const float* k;      // (Tk, D) of the block's kv head, row stride ldk
  const float* v;      // (Tk, D), row stride ldv
  int64_t ldk, ldv, Tk;
  const bool* keep;    // (Tk,) key padding mask or nullptr
  int64_t M, nq, q0;   // rows, queries per head, first query
  int64_t lo[kLanes], hi[kLanes];  // visible keys of row r: [lo, hi) (empty: lo == hi)
  int64_t kstart, kend;            // union of the rows' visible keys
};

// -- lane path: the block's rows in vector lanes -------------------------------------------------------------------
// The block is held transposed, Qᵀ·scale (D × kLanes), so the 32 scores of one key are two 16-float vectors. Sᵀ =
// K Qᵀ is computed key-major by st_tile, reading K rows in place; the online softmax then runs down the key axis
// with every row in its own lane (max, exp, sum are whole-vector operations); O += P V reads Pᵀ's entries as
// broadcast scalars. Keys are taken in groups of kKeyGroup, and each group computes only the 16-row slabs that see
// one of its keys: at the causal diagonal and the window's left edge half of a block's rows see a key.

// In-register transpose of a 16×16 tile: at each level b = 8, 4, 2, 1 the off-diagonal b×b blocks of every 2b×2b
// block swap (row i, column c with bit b clear <-> row i + b, column c - b). The two lane selections are
// compile-time index lists (C = 0..15), so __builtin_shufflevector (clang, GCC >= 12) takes them; older GCC gets
// the same masks as vectors through __builtin_shuffle.
template <int b, int... C>
I2L_INLINE void transpose16_level(v16* t, std::integer_sequence<int, C...>) {
  for (int i = 0; i < 16; ++i) {
    if (i & b) continue;
    const v16 x = t[i], y = t[i + b];
#if defined(__clang__) || __GNUC__ >= 12
    t[i] = __builtin_shufflevector(x, y, ((C & b) ? 16 + C - b : C)...);
    t[i + b] = __builtin_shufflevector(x, y, ((C & b) ? 16 + C : C + b)...);
#else
    t[i] = __builtin_shuffle(x, y, v16i{((C & b) ? 16 + C - b : C)...});
    t[i + b] = __builtin_shuffle(x, y, v16i{((C & b) ? 16 + C : C + b)...});
#endif
  }
}

// Qt (D × kLanes) = scale · [rows[0]; …; rows[kLanes-1]]ᵀ, by 16×16 tiles.
I2L_CLONES void transpose_rows(const float* const* rows, int64_t D, float scale, float* __restrict Qt) {
  for (int64_t r0 = 0; r0 < kLanes; r0 += 16) {
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
      v16 t[16];
      for (int64_t i = 0; i < 16; ++i) {
        std::memcpy(&t[i], rows[r0 + i] + d0, sizeof(v16));
        t[i] *= scale;
      }
      constexpr auto lanes = std::make_integer_sequence<int, 16>{};
      transpose16_level<8>(t, lanes);
      transpose16_level<4>(t, lanes);
      transpose16_level<2>(t, lanes);
      transpose16_level<1>(t, lanes);
      for (int64_t i = 0; i < 16; ++i) std::memcpy(Qt + (d0 + i) * kLanes + r0, &t[i], sizeof(v16));
    }
  }
}

// 1 / l for a row's softmax sum, 0 for a row that saw no key (its output is 0)
inline float inv_sum(float l) { return l > 0.f ? 1.f / l : 0.f; }

// dst[0, n) = a · src[0, n)
I2L_CLONES void scale_copy(const float* src, float* dst, int64_t n, float a) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i] * a;
}

I2L_NO_TRAPPING_MATH_BEGIN
// Sᵀ (R keys × NV·16 lanes) = K (R rows, stride ldk) · Qᵀ (D × the NV slabs Qt points at); row stride kLanes.
template <int R, int NV>
I2L_CLONES void st_tile_wide(const float* __restrict K, int64_t ldk, const float* __restrict Qt, int64_t D,
                             float* __restrict St) {
  v16 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c] = v16{};
  for (int64_t d = 0; d < D; ++d) {
    v16 qv[NV];
    for (int c = 0; c < NV; ++c) std::memcpy(&qv[c], Qt + d * kLanes + 16 * c, sizeof(v16));
    for (int r = 0; r < R; ++r) {
      const float kr = K[r * ldk + d];
      for (int c = 0; c < NV; ++c) acc[r][c] += kr * qv[c];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NV; ++c) std::memcpy(St + r * kLanes + 16 * c, &acc[r][c], sizeof(v16));
}

// The same tile with 8-float vectors, RR keys at a time so that RR·W accumulators (W = 2·NV vectors a key) plus the
// W Qᵀ vectors fit AVX2's 16 registers (Qᵀ, in L1, is re-read once per RR keys).
template <int R, int NV>
I2L_CLONES void st_tile_narrow(const float* __restrict K, int64_t ldk, const float* __restrict Qt, int64_t D,
                               float* __restrict St) {
  constexpr int W = 2 * NV, RR = R < 8 / W ? R : 8 / W;
  static_assert(R % RR == 0, "st_tile_narrow: R must be a multiple of the keys per pass");
  for (int r0 = 0; r0 < R; r0 += RR) {
    v8 acc[RR][W];
    I2L_UNROLL for (int r = 0; r < RR; ++r)
      I2L_UNROLL for (int c = 0; c < W; ++c) acc[r][c] = v8{};
    for (int64_t d = 0; d < D; ++d) {
      v8 qv[W];
      I2L_UNROLL for (int c = 0; c < W; ++c) std::memcpy(&qv[c], Qt + d * kLanes + 8 * c, sizeof(v8));
      I2L_UNROLL for (int r = 0; r < RR; ++r) {
        const float kr = K[(r0 + r) * ldk + d];
        I2L_UNROLL for (int c = 0; c < W; ++c) acc[r][c] += kr * qv[c];
      }
    }
    I2L_UNROLL for (int r = 0; r < RR; ++r)
      I2L_UNROLL for (int c = 0; c < W; ++c) std::memcpy(St + (r0 + r) * kLanes + 8 * c, &acc[r][c], sizeof(v8));
  }
}

template <int R, int NV>
inline void st_tile(const float* K, int64_t ldk, const float* Qt, int64_t D, float* St) {
  if (wide_vectors()) return st_tile_wide<R, NV>(K, ldk, Qt, D, St);
  st_tile_narrow<R, NV>(K, ldk, Qt, D, St);
}

// n keys' scores for NV slabs: kKeyGroup keys per tile, the remainder by 4s and 1s.
template <int NV>
void st_keys(const float* K, int64_t ldk, int64_t n, const float* Qt, int64_t D, float* St) {
  int64_t j = 0;
  for (; j + kKeyGroup <= n; j += kKeyGroup) st_tile<kKeyGroup, NV>(K + j * ldk, ldk, Qt, D, St + j * kLanes);
  for (; j + 4 <= n; j += 4) st_tile<4, NV>(K + j * ldk, ldk, Qt, D, St + j * kLanes);
  for (; j < n; ++j) st_tile<1, NV>(K + j * ldk, ldk, Qt, D, St + j * kLanes);
}

// Online softmax down one chunk of Sᵀ (keys [k0, k0 + n) × kLanes): masks what a row cannot see (rows r ≥ M have
// lo = hi: they see nothing), updates each row's running max m and sum l, turns Sᵀ into Pᵀ = exp(S − m_new) (0
// where masked) and leaves in alpha the factor exp(m_old − m_new) that rescales each row's accumulator. Keys in
// [all_lo, all_hi) are visible to every row (no lane mask needed).
I2L_CLONES void lane_softmax(float* __restrict St, int64_t n, int64_t k0, const int32_t* __restrict lo,
                             const int32_t* __restrict hi, int64_t all_lo, int64_t all_hi, const bool* keep,
                             float* __restrict m, float* __restrict l, float* __restrict alpha) {
  alignas(64) float mx[kLanes], msafe[kLanes], sum[kLanes];
  for (int64_t j = 0; j < n; ++j) {
    const int32_t key = static_cast<int32_t>(k0 + j);
    float* s = St + j * kLanes;
    if (keep != nullptr && !keep[key]) {
      for (int c = 0; c < kLanes; ++c) s[c] = kNegInf;
    } else if (key < all_lo || key >= all_hi) {
#pragma omp simd
      for (int c = 0; c < kLanes; ++c) s[c] = (key >= lo[c] && key < hi[c]) ? s[c] : kNegInf;
    }
  }
  for (int c = 0; c < kLanes; ++c) mx[c] = m[c];
  for (int64_t j = 0; j < n; ++j) {
    const float* s = St + j * kLanes;
#pragma omp simd
    for (int c = 0; c < kLanes; ++c) mx[c] = s[c] > mx[c] ? s[c] : mx[c];
  }
#pragma omp simd
  for (int c = 0; c < kLanes; ++c) {
    msafe[c] = mx[c] == kNegInf ? 0.f : mx[c];  // a row that has seen nothing yet: p = 0 below, nothing to rescale
    alpha[c] = m[c] == kNegInf ? 0.f : exp_poly(m[c] - msafe[c]);
    m[c] = mx[c];
    sum[c] = 0.f;
  }
  for (int64_t j = 0; j < n; ++j) {
    float* s = St + j * kLanes;
#pragma omp simd
    for (int c = 0; c < kLanes; ++c) {
      const float p = s[c] == kNegInf ? 0.f : exp_poly(s[c] - msafe[c]);
      s[c] = p;
      sum[c] += p;
    }
  }
#pragma omp simd
  for (int c = 0; c < kLanes; ++c) l[c] = l[c] * alpha[c] + sum[c];
}
I2L_NO_TRAPPING_MATH_END

// O = alpha ∘ O + P V for the rows in groups of 4 (then singly), each group over only the keys [j0, j1) of the
// chunk its rows see (P is 0 elsewhere, so skipping is exact). A group that sees none of the chunk is skipped: its
// rows' max did not move, alpha is 1 (or 0 for a row that has seen nothing, whose O is still 0).
template <int NV>
void pv_lanes(const float* Pt, const float* V, int64_t ldv, int64_t n, int64_t k0, const Block& blk,
              const float* alpha, float* O, int64_t D, float* const* dst, const float* inv, bool* written) {
  for (int64_t r = 0; r < blk.M; r += 4) {
    const int64_t R = std::min<int64_t>(4, blk.M - r);
    int64_t a = blk.lo[r], e = blk.hi[r];
    for (int64_t i = r + 1; i < r + R; ++i) {
      if (blk.lo[i] < blk.hi[i]) a = std::min(a, blk.lo[i]), e = std::max(e, blk.hi[i]);
    }
    const int64_t j0 = std::clamp<int64_t>(a - k0, 0, n), j1 = std::clamp<int64_t>(e - k0, 0, n);
    if (j0 >= j1) continue;
    float* const* d = dst != nullptr ? dst + r : nullptr;
    for (int64_t c0 = 0; c0 < D; c0 += 16 * NV) {
      if (R == 4) {
        pv_tile<4, NV>(Pt + r, 1, kLanes, V, ldv, j0, j1, O + r * D, D, c0, alpha + r, d, inv + r);
      } else {
        for (int64_t i = 0; i < R; ++i)
          pv_tile<1, NV>(Pt + r + i, 1, kLanes, V, ldv, j0, j1, O + (r + i) * D, D, c0, alpha + r + i,
                         d ? d + i : nullptr, inv + r + i);
      }
    }
    if (dst != nullptr) std::fill(written + r, written + r + R, true);
  }
}

// One block on the lane path, Qt = Qᵀ·scale (D × kLanes, lanes ≥ M zero): writes row r's output to dst[r] and
// leaves its running max and sum in m[r], l[r] (for the lse). O (M × D) is scratch for the unnormalized output.
// pf_rows: n_pf rows of D floats to prefetch along the way (the next block's), a few lines per key group.
void fwd_lanes(const Block& blk, const float* Qt, int64_t D, float* St, float* O, float* m, float* l,
               float* const* dst, const float* const* pf_rows, int64_t n_pf) {
  int64_t pf_next = 0;  // next line of pf_rows to prefetch
  const int64_t pf_lines = n_pf * (D / 16);
  const int64_t pf_rate = pf_lines / std::max<int64_t>(1, (blk.kend - blk.kstart) / kKeyGroup) + 1;
  auto prefetch_some = [&](int64_t count) {
    for (; count > 0 && pf_next < pf_lines; --count, ++pf_next) {
      __builtin_prefetch(pf_rows[pf_next / (D / 16)] + 16 * (pf_next % (D / 16)), 0, 2);
    }
  };
  alignas(64) int32_t lo[kLanes], hi[kLanes];
  alignas(64) float alpha[kLanes], inv[kLanes];
  bool written[kLanes] = {};
  // keys some row of slab s sees lie in [slab_lo, slab_hi) (none: an empty range); keys every row sees:
  // [all_lo, all_hi). Rows past M, or that see nothing, get lo = hi = 0.
  int64_t slab_lo[kSlabs], slab_hi[kSlabs], all_lo = 0, all_hi = std::numeric_limits<int64_t>::max();
  for (int s = 0; s < kSlabs; ++s) slab_lo[s] = std::numeric_limits<int64_t>::max(), slab_hi[s] = 0;
  for (int c = 0; c < kLanes; ++c) {
    const bool row = c < blk.M && blk.lo[c] < blk.hi[c];
    lo[c] = row ? static_cast<int32_t>(blk.lo[c]) : 0;
    hi[c] = row ? static_cast<int32_t>(blk.hi[c]) : 0;
    all_lo = std::max<int64_t>(all_lo, lo[c]);
    all_hi = std::min<int64_t>(all_hi, hi[c]);
    if (!row) continue;
    slab_lo[c / 16] = std::min(slab_lo[c / 16], blk.lo[c]);
    slab_hi[c / 16] = std::max(slab_hi[c / 16], blk.hi[c]);
  }
  std::fill(O, O + blk.M * D, 0.f);
  std::fill(m, m + kLanes, kNegInf);
  std::fill(l, l + kLanes, 0.f);
  // equal chunks of at most kLaneChunk keys, a multiple of kKeyGroup where possible
  const int64_t len = blk.kend - blk.kstart, nchunks = (len + kLaneChunk - 1) / kLaneChunk;
  const int64_t chunk = nchunks > 0 ? ((len + nchunks - 1) / nchunks + kKeyGroup - 1) / kKeyGroup * kKeyGroup : 0;
  for (int64_t k0 = blk.kstart; k0 < blk.kend; k0 += chunk) {
    const int64_t n = std::min(chunk, blk.kend - k0);
    // Sᵀ per key group, only for the slabs whose rows see one of its keys; the others are masked (-inf)
    for (int64_t j = 0; j < n; j += kKeyGroup) {
      const int64_t nj = std::min(kKeyGroup, n - j), a = k0 + j, b = a + nj;
      bool need[kSlabs];
      for (int s = 0; s < kSlabs; ++s) need[s] = a < slab_hi[s] && b > slab_lo[s];
      float* st = St + j * kLanes;
      for (int s = 0; s < kSlabs; ++s) {
        if (need[s]) continue;
        for (int64_t i = 0; i < nj; ++i) std::fill(st + i * kLanes + 16 * s, st + i * kLanes + 16 * s + 16, kNegInf);
      }
      prefetch_some(pf_rate);
      const float* kr = blk.k + a * blk.ldk;
      // a short last group takes whole tiles when the keys exist (their scores land past n, unread)
      const int64_t nt = a + kKeyGroup <= blk.Tk ? kKeyGroup : nj;
      if (need[0] && need[1]) st_keys<2>(kr, blk.ldk, nt, Qt, D, st);
      else if (need[0] || need[1]) st_keys<1>(kr, blk.ldk, nt, Qt + 16 * need[1], D, st + 16 * need[1]);
    }
    lane_softmax(St, n, k0, lo, hi, all_lo, all_hi, blk.keep, m, l, alpha);
    const float* vp = blk.v + k0 * blk.ldv;
    const bool last = k0 + chunk >= blk.kend;
    if (last) {
      for (int64_t r = 0; r < blk.M; ++r) inv[r] = inv_sum(l[r]);
    }
    float* const* d = last ? dst : nullptr;
    if (D % 64 == 0) pv_lanes<4>(St, vp, blk.ldv, n, k0, blk, alpha, O, D, d, inv, written);
    else if (D % 32 == 0) pv_lanes<2>(St, vp, blk.ldv, n, k0, blk, alpha, O, D, d, inv, written);
    else pv_lanes<1>(St, vp, blk.ldv, n, k0, blk, alpha, O, D, d, inv, written);
  }
  prefetch_some(pf_lines);
  for (int64_t r = 0; r < blk.M; ++r) {  // rows the last chunk did not reach (or no chunk at all)
    if (!written[r]) scale_copy(O + r * D, dst[r], D, inv_sum(l[r]));
  }
}

// -- row path: thin blocks (decoding) ------------------------------------------------------------------------------
// A block of at most kThinRows rows (Tq·G small: one query against a KV cache) would leave most lanes idle, so it
// keeps rows in rows: S = Q Kᵀ by BLAS (a matrix-vector product for one row), a softmax per row, O += P V.
void fwd_rows(const Block& blk, const float* qp, int64_t ldq, int64_t D, float scale, float* S, float* O, float* m,
              float* l) {
  std::fill(O, O + blk.M * D, 0.f);
  std::fill(m, m + blk.M, kNegInf);
  std::fill(l, l + blk.M, 0.f);
  const int64_t len = blk.kend - blk.kstart, nchunks = (len + kBlockK - 1) / kBlockK;
  const int64_t chunk = nchunks > 0 ? (len + nchunks - 1) / nchunks : kBlockK;
  for (int64_t k0 = blk.kstart; k0 < blk.kend; k0 += chunk) {
    const int64_t nk = std::min(chunk, blk.kend - k0);
    gemm_nt(blk.M, nk, D, 1.f, qp, ldq, blk.k + k0 * blk.ldk, blk.ldk, 0.f, S, nk);  // S = Q Kᵀ  (M, nk)
    for (int64_t r = 0; r < blk.M; ++r) {
      const int64_t a = std::clamp<int64_t>(blk.lo[r] - k0, 0, nk);
      const int64_t e = std::clamp<int64_t>(blk.hi[r] - k0, 0, nk);
      float* srow = S + r * nk;
      if (a >= e) {  // this row sees none of the chunk
        std::fill(srow, srow + nk, 0.f);
        continue;
      }
      softmax_chunk_row(srow, nk, a, e, blk.keep ? blk.keep + k0 : nullptr, scale, m + r, l + r, O + r * D, D);
    }
    pv_accumulate(S, nk, blk.v + k0 * blk.ldv, blk.ldv, nk, O, D, blk.M, D);  // O += P V  (M, D)
  }
}

void fwd_impl(const float* q, const float* k, const float* v, Strides qs, Strides ks, Strides vs, const bool* kpm,
              float* out, float* lse, int64_t B, int64_t H, int64_t Hkv, int64_t D, const Mask& mk, float scale) {
  const int64_t Tq = mk.Tq, Tk = mk.Tk, G = H / Hkv;
  // a task: `heads` query heads of one kv head × rows_per_head queries (more than kLanes heads: several tasks)
  const int64_t heads = std::min<int64_t>(G, kLanes), nhc = (G + heads - 1) / heads;
  const int64_t rows_per_head = kLanes / heads;
  const int64_t nqb = (Tq + rows_per_head - 1) / rows_per_head;
  // Order of the blocks within a (batch, kv head) stream: ascending positions, so that each block's new K/V rows
  // follow the previous block's and the next block's can be prefetched; but costliest first (last rows of a causal
  // mask) when there are too few streams to balance the threads' load otherwise. With a window every block costs
  // about the same, so each thread takes runs of `grain` consecutive blocks: its next block then reuses the K/V
  // rows already in its own L2 (blocks dealt round-robin made every thread load every row; lesson 15's README).
  const int64_t threads = at::get_num_threads(), streams = B * Hkv * nhc, ntasks = streams * nqb;
  const bool costliest_first = mk.causal && mk.window <= 0 && streams < 4 * threads;
  const int64_t grain = mk.window > 0 ? std::max<int64_t>(1, ntasks / (4 * threads)) : 1;
  parallel_tasks(ntasks, [&](int64_t task) {
    thread_local std::vector<float> s_buf, o_buf, q_buf;
    alignas(64) float m[kLanes], l[kLanes];
    const int64_t qb = costliest_first ? nqb - 1 - task % nqb : task % nqb, rest = task / nqb;
    const int64_t hc = rest % nhc, bhk = rest / nhc, b = bhk / Hkv, hk = bhk % Hkv;
    const int64_t h0 = hk * G + hc * heads, gh = std::min(heads, (hk + 1) * G - h0);
    Block blk;
    blk.q0 = qb * rows_per_head;
    blk.nq = std::min(blk.q0 + rows_per_head, Tq) - blk.q0;
    blk.M = gh * blk.nq;
    blk.k = k + b * ks.b + hk * ks.h;
    blk.v = v + b * vs.b + hk * vs.h;
    blk.ldk = ks.t;
    blk.ldv = vs.t;
    blk.Tk = Tk;
    blk.keep = kpm ? kpm + b * Tk : nullptr;
    blk.kstart = mk.lo(blk.q0);
    blk.kend = mk.hi(blk.q0 + blk.nq - 1);
    // row r = hh·nq + t: query q0 + t of head h0 + hh (no divisions: this runs once per block)
    const float* qrow[kLanes];
    float* orow[kLanes];
    float* lrow[kLanes];
    for (int64_t hh = 0, r = 0; hh < gh; ++hh) {
      const int64_t bh = b * H + h0 + hh;
      for (int64_t t = 0; t < blk.nq; ++t, ++r) {
        const int64_t i = blk.q0 + t;
        qrow[r] = q + b * qs.b + (h0 + hh) * qs.h + i * qs.t;
        orow[r] = out + (bh * Tq + i) * D;
        lrow[r] = lse + bh * Tq + i;
        blk.lo[r] = mk.lo(i);
        blk.hi[r] = std::max(mk.lo(i), mk.hi(i));
      }
    }
    o_buf.resize(kLanes * D);
    float* O = o_buf.data();
    if (blk.M > kThinRows) {
      q_buf.resize(D * kLanes);
      s_buf.resize((kLaneChunk + kKeyGroup) * kLanes);
      static const float zeros[128] = {};
      for (int64_t r = blk.M; r < kLanes; ++r) qrow[r] = zeros;
      transpose_rows(qrow, D, scale, q_buf.data());  // Qᵀ·scale, lanes past M zero
      // Prefetched while this block computes, spread over its key groups: the query rows of this thread's likely
      // next block (the next one in its run, or `threads` blocks on: single tasks are dealt round-robin) and the
      // K/V rows that block adds. Their first read from memory is not otherwise overlapped with work (window 512:
      // -4% time).
      const float* pf_rows[3 * kLanes];
      int64_t n_pf = 0;
      const int64_t step = grain > 1 ? 1 : threads;
      const int64_t qbn = costliest_first ? qb - step : qb + step;
      if (qbn >= 0 && qbn < nqb) {
        const int64_t q0n = qbn * rows_per_head, nqn = std::min(q0n + rows_per_head, Tq) - q0n;
        for (int64_t hh = 0; hh < gh; ++hh) {
          for (int64_t t = 0; t < nqn; ++t) pf_rows[n_pf++] = q + b * qs.b + (h0 + hh) * qs.h + (q0n + t) * qs.t;
        }
        const int64_t ke = costliest_first ? std::min(blk.kstart, mk.lo(q0n) + rows_per_head) : mk.hi(q0n + nqn - 1);
        const int64_t ka = costliest_first ? mk.lo(q0n) : std::max(blk.kend, ke - rows_per_head);
        for (int64_t j = ka; j < ke && n_pf + 2 <= 3 * kLanes; ++j) {
          pf_rows[n_pf++] = blk.k + j * blk.ldk;
          pf_rows[n_pf++] = blk.v + j * blk.ldv;
        }
      }
      fwd_lanes(blk, q_buf.data(), D, s_buf.data(), O, m, l, orow, pf_rows, n_pf);
    } else {
      s_buf.resize(kThinRows * kBlockK);
      const float* qp = qrow[0];  // (M, D) in place when the block is one head's rows
      int64_t ldq = qs.t;
      if (gh > 1) {  // gather the group's query rows into one block
        q_buf.resize(kThinRows * D);
        for (int64_t r = 0; r < blk.M; ++r) std::copy(qrow[r], qrow[r] + D, q_buf.data() + r * D);
        qp = q_buf.data();
        ldq = D;
      }
      fwd_rows(blk, qp, ldq, D, scale, s_buf.data(), O, m, l);
      for (int64_t r = 0; r < blk.M; ++r) scale_copy(O + r * D, orow[r], D, inv_sum(l[r]));
    }
    for (int64_t r = 0; r < blk.M; ++r) *lrow[r] = l[r] > 0.f ? m[r] + std::log(l[r]) : kNegInf;
  }, grain);
}

// ---- backward ---------------------------------------------------------------------------------------------------
void bwd_impl(const float* dout, const float* q, const float* k, const float* v, const float* out, const float* lse,
              const bool* kpm, float* dq, float* dk, float* dv, int64_t B, int64_t H, int64_t Hkv, int64_t D,
              const Mask& mk, float scale) {
  const int64_t Tq = mk.Tq, Tk = mk.Tk, group = H / Hkv;
  // Δ_i = rowsum(O ∘ dO)  (B, H, Tq)
  std::vector<float> delta(B * H * Tq);
  at::parallel_for(0, B * H * Tq, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) delta[i] = dot_row(out + i * D, dout + i * D, D);
  });

  // pass 1: dK, dV per (b, kv head, key block), summed over the group's query heads and all query blocks.
  // With a single key block (Tk <= kBwdBlockK: short training sequences) a tile's dS already holds every key a
  // query row sees, so dQ = dS K is final here and pass 2 (which would recompute P and dP) is skipped; dq
  // then comes zero-filled from the caller and each tile adds its rows' product once.
  const int64_t nkb = (Tk + kBwdBlockK - 1) / kBwdBlockK;
  const bool one_key_block = nkb == 1;
  parallel_tasks(B * Hkv * nkb, [&](int64_t task) {
    thread_local std::vector<float> p_buf, dp_buf, dk_buf, dv_buf;
    p_buf.resize(kBwdBlockQ * kBwdBlockK);
    dp_buf.resize(kBwdBlockQ * kBwdBlockK);
    dk_buf.resize(kBwdBlockK * D);
    dv_buf.resize(kBwdBlockK * D);
    const int64_t kb = task % nkb, bhk = task / nkb, b = bhk / Hkv, hk = bhk % Hkv;
    const int64_t k0 = kb * kBwdBlockK, k1 = std::min(k0 + kBwdBlockK, Tk), nk = k1 - k0;
    const float* kp = k + (bhk * Tk + k0) * D;  // (nk, D)
    const float* vp = v + (bhk * Tk + k0) * D;  // (nk, D)
    const bool* keep = kpm ? kpm + b * Tk + k0 : nullptr;
    float *P = p_buf.data(), *dP = dp_buf.data(), *dK = dk_buf.data(), *dV = dv_buf.data();
    std::fill(dK, dK + nk * D, 0.f);
    std::fill(dV, dV + nk * D, 0.f);
    const int64_t qstart = mk.first_q(k0), qend = mk.last_q(k1);
    for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
      const int64_t bh = b * H + h;
      for (int64_t q0 = qstart; q0 < qend; q0 += kBwdBlockQ) {
        const int64_t nq = std::min(kBwdBlockQ, qend - q0);
        const float* qp = q + (bh * Tq + q0) * D;
        const float* dop = dout + (bh * Tq + q0) * D;
        float* dqp = dq + (bh * Tq + q0) * D;
        // the keys of this block that some row of the tile sees: [k0 + ka, k0 + ka + n); the rest stay untouched
        const int64_t ka = std::clamp<int64_t>(mk.lo(q0) - k0, 0, nk);
        const int64_t n = std::clamp<int64_t>(mk.hi(q0 + nq - 1) - k0, 0, nk) - ka;
        if (n <= 0) continue;  // one_key_block: these dq rows keep the caller's zeros
        const float* kt = kp + ka * D;
        const float* vt = vp + ka * D;
        gemm_nt(nq, n, D, 1.f, qp, D, kt, D, 0.f, P, n);  // S = Q Kᵀ  (nq, n)
        for (int64_t r = 0; r < nq; ++r) {
          const int64_t a = std::clamp<int64_t>(mk.lo(q0 + r) - k0 - ka, 0, n);
          const int64_t e = std::clamp<int64_t>(mk.hi(q0 + r) - k0 - ka, 0, n);
          probs_row(P + r * n, n, a, std::max(a, e), keep ? keep + ka : nullptr, scale, lse[bh * Tq + q0 + r]);
        }
        gemm_tn(n, D, nq, 1.f, P, n, dop, D, 1.f, dV + ka * D, D);  // dV += Pᵀ dO  (n, D)
        gemm_nt(nq, n, D, 1.f, dop, D, vt, D, 0.f, dP, n);          // dP = dO Vᵀ  (nq, n)
        for (int64_t r = 0; r < nq; ++r) dscores_row(P + r * n, dP + r * n, n, delta[bh * Tq + q0 + r], scale);
        gemm_tn(n, D, nq, 1.f, dP, n, qp, D, 1.f, dK + ka * D, D);  // dK += dSᵀ Q  (n, D)
        if (one_key_block) pv_accumulate(dP, n, kt, D, n, dqp, D, nq, D);  // dQ = dS K onto the caller's zeros
      }
    }
    std::copy(dK, dK + nk * D, dk + (bhk * Tk + k0) * D);
    std::copy(dV, dV + nk * D, dv + (bhk * Tk + k0) * D);
  });

  if (one_key_block) return;
  // pass 2: dQ per (b, head, query block), streaming over its visible keys
  const int64_t nqb = (Tq + kBwdBlockQ - 1) / kBwdBlockQ;
  parallel_tasks(B * H * nqb, [&](int64_t task) {
    thread_local std::vector<float> p_buf, dp_buf;
    p_buf.resize(kBwdBlockQ * kBwdChunkK);
    dp_buf.resize(kBwdBlockQ * kBwdChunkK);
    const int64_t qb = nqb - 1 - task % nqb, bh = task / nqb, b = bh / H, h = bh % H;
    const int64_t q0 = qb * kBwdBlockQ, q1 = std::min(q0 + kBwdBlockQ, Tq), nq = q1 - q0;
    const float* qp = q + (bh * Tq + q0) * D;
    const float* dop = dout + (bh * Tq + q0) * D;
    const float* kp = k + (b * Hkv + h / group) * Tk * D;
    const float* vp = v + (b * Hkv + h / group) * Tk * D;
    float* dqp = dq + (bh * Tq + q0) * D;
    float *P = p_buf.data(), *dP = dp_buf.data();
    std::fill(dqp, dqp + nq * D, 0.f);
    const int64_t kstart = mk.lo(q0), kend = mk.hi(q1 - 1);
    for (int64_t k0 = kstart; k0 < kend; k0 += kBwdChunkK) {
      const int64_t nk = std::min(kBwdChunkK, kend - k0);
      const bool* keep = kpm ? kpm + b * Tk + k0 : nullptr;
      gemm_nt(nq, nk, D, 1.f, qp, D, kp + k0 * D, D, 0.f, P, nk);
      for (int64_t r = 0; r < nq; ++r) {
        const int64_t a = std::clamp<int64_t>(mk.lo(q0 + r) - k0, 0, nk);
        const int64_t e = std::clamp<int64_t>(mk.hi(q0 + r) - k0, 0, nk);
        probs_row(P + r * nk, nk, a, std::max(a, e), keep, scale, lse[bh * Tq + q0 + r]);
      }
      gemm_nt(nq, nk, D, 1.f, dop, D, vp + k0 * D, D, 0.f, dP, nk);
      for (int64_t r = 0; r < nq; ++r) dscores_row(P + r * nk, dP + r * nk, nk, delta[bh * Tq + q0 + r], scale);
      pv_accumulate(dP, nk, kp + k0 * D, D, nk, dqp, D, nq, D);  // dQ += dS K  (nq, D)
    }
  });
}

// ---- torch glue -------------------------------------------------------------------------------------------------
void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal, int64_t window,
                  const std::optional<at::Tensor>& kpm, const char* op) {
  check_flash_attention_args(q, k, v, causal, window, kpm, op);
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf, op,
              ": expected float32, bfloat16 or float16, got ", q.scalar_type());
  for (const auto* t : {&q, &k, &v}) {
    TORCH_CHECK(t->device().is_cpu(), op, ": expected CPU tensors, got ", t->device());
  }
}

at::Tensor as_f32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

// fp32 view with contiguous, non-overlapping rows (copied only when the input has neither) and its strides.
std::pair<at::Tensor, Strides> rows_f32(const at::Tensor& t) {
  auto f = t.scalar_type() == at::kFloat ? t : t.to(at::kFloat);
  const int64_t D = f.size(3);
  const bool rows_ok = (f.stride(3) == 1 || D == 1) && (f.size(2) == 1 || f.stride(2) >= D);
  if (!rows_ok) f = f.contiguous();
  const int64_t ld = f.size(2) == 1 ? D : f.stride(2);  // a single row: any ld >= D is valid for BLAS
  return {f, Strides{f.stride(0), f.stride(1), ld}};
}

std::tuple<at::Tensor, at::Tensor> flash_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                           const at::Tensor& v, bool causal, int64_t window,
                                                           double scale, const std::optional<at::Tensor>& kpm) {
  check_inputs(q, k, v, causal, window, kpm, "intro2llm::flash_attention_fwd");
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), D = q.size(3), Hkv = k.size(1), Tk = k.size(2);
  const auto [qf, qs] = rows_f32(q);
  const auto [kf, ks] = rows_f32(k);
  const auto [vf, vs] = rows_f32(v);
  auto out = at::empty({B, H, Tq, D}, q.options().dtype(at::kFloat));
  auto lse = at::empty({B, H, Tq}, q.options().dtype(at::kFloat));
  at::Tensor keep;
  if (kpm.has_value()) keep = kpm->contiguous();
  const Mask mk{Tq, Tk, window, causal};
  if (Tq > 0 && B * H > 0) {
    fwd_impl(qf.const_data_ptr<float>(), kf.const_data_ptr<float>(), vf.const_data_ptr<float>(), qs, ks, vs,
             kpm.has_value() ? keep.const_data_ptr<bool>() : nullptr, out.mutable_data_ptr<float>(),
             lse.mutable_data_ptr<float>(), B, H, Hkv, D, mk, static_cast<float>(scale));
  }
  return {q.scalar_type() == at::kFloat ? out : out.to(q.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, bool causal, int64_t window, double scale, const std::optional<at::Tensor>& kpm) {
  check_inputs(q, k, v, causal, window, kpm, "intro2llm::flash_attention_bwd");
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(),
              "intro2llm::flash_attention_bwd: grad_out and out must have q's shape ", q.sizes(), ", got ",
              grad_out.sizes(), " and ", out.sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 3 && lse.size(0) == q.size(0) &&
                  lse.size(1) == q.size(1) && lse.size(2) == q.size(2),
              "intro2llm::flash_attention_bwd: lse must be float32 (B, H, Tq), got ", lse.scalar_type(), " ",
              lse.sizes());
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), D = q.size(3), Hkv = k.size(1), Tk = k.size(2);
  const auto qf = as_f32(q), kf = as_f32(k), vf = as_f32(v), of = as_f32(out), gf = as_f32(grad_out);
  const auto lc = lse.contiguous();
  auto dq = Tk <= kBwdBlockK ? at::zeros({B, H, Tq, D}, q.options().dtype(at::kFloat))  // see bwd_impl pass 1
                             : at::empty({B, H, Tq, D}, q.options().dtype(at::kFloat));
  // every (b, kv head, key block) task of pass 1 writes its rows of dk and dv: no zero-fill needed
  auto dk = at::empty({B, Hkv, Tk, D}, q.options().dtype(at::kFloat));
  auto dv = at::empty({B, Hkv, Tk, D}, q.options().dtype(at::kFloat));
  at::Tensor keep;
  if (kpm.has_value()) keep = kpm->contiguous();
  const Mask mk{Tq, Tk, window, causal};
  if (Tq > 0 && B * H > 0) {
    bwd_impl(gf.const_data_ptr<float>(), qf.const_data_ptr<float>(), kf.const_data_ptr<float>(),
             vf.const_data_ptr<float>(), of.const_data_ptr<float>(), lc.const_data_ptr<float>(),
             kpm.has_value() ? keep.const_data_ptr<bool>() : nullptr, dq.mutable_data_ptr<float>(),
             dk.mutable_data_ptr<float>(), dv.mutable_data_ptr<float>(), B, H, Hkv, D, mk,
             static_cast<float>(scale));
  } else {  // no queries: no gradient reaches k or v
    dk.zero_();
    dv.zero_();
  }
  const auto dt = q.scalar_type();
  if (dt == at::kFloat) return {dq, dk, dv};
  return {dq.to(dt), dk.to(dt), dv.to(dt)};
}

}  // namespace

TORCH_LIBRARY_IMPL(intro2llm, CPU, m) { impl_flash_attention<flash_attention_fwd_cpu, flash_attention_bwd_cpu>(m); }

}  // namespace intro2llm
