// Flash attention on CPU (FlashAttention-2, Dao 2023): softmax(Q Kᵀ·scale + mask) V without the (Tq, Tk) matrix.
//
// Forward: one task per (batch, kv head, query block: kBlockQ rows over the group's query heads), scheduled
// dynamically over the threads of at::parallel_for. The query block stays put; keys/values stream past in chunks
// of kBlockK over the exact key range the causal/window mask leaves visible (wholly masked chunks are never
// touched). Per chunk:
//   S = Q_blk K_chunkᵀ (BLAS)  →  online softmax per row (running max m, sum l; rescale O by exp(m_old - m_new))
//   →  O += P V_chunk (BLAS).  At the end O /= l and the log-sum-exp lse = m + log l is saved (B, H, Tq) fp32.
// Backward (recomputes P = exp(S·scale − lse) per tile; Δ = rowsum(O∘dO) first):
//   pass 1, one task per (batch, kv head, key block): dV += Pᵀ dO, dP = dO Vᵀ, dS = P∘(dP − Δ)·scale,
//           dK += dSᵀ Q, summed over the query heads of the group (GQA/MQA: no races, no atomics);
//   pass 2, one task per (batch, head, query block): dQ += dS K.
// Extra memory: O(threads · (kBlockQ·kBlockK + kBlockQ·D)) scratch plus the outputs — O(T·D), never O(T²).
//
// Q Kᵀ-shaped products go to the BLAS torch links (sgemm_, weak symbol; MKL in x86 wheels, OpenBLAS elsewhere),
// single-threaded inside the parallel region; at::addmm_out on tile views is the fallback when no sgemm_ is
// exported (or when env INTRO2LLM_NO_SGEMM=1, which tests that path). P·V and dS·K use pv_accumulate below, a
// register kernel that reads V (K) rows in place: BLAS re-packed them for every query block.
// The per-row softmax loops are compiled for AVX-512/AVX2/baseline with target_clones (no -march flag needed)
// and use a polynomial exp that vectorizes (Cephes expf, rel. error ~1e-7).
// fp16/bf16 inputs are widened to fp32 copies once (O(T·D)); accumulation is fp32 throughout. The forward reads
// fp32 q/k/v through their (B, H, T) strides (rows must be contiguous), so transposed projections and KV-cache
// prefix views are not copied; the backward works on contiguous copies.
// Positions: key j at j, query i at i + Tk − Tq (bottom-right). causal: k ≤ q; window w: q − w < k
// (and k < q + w without causal); key_padding_mask (B, Tk) bool, False = hidden. A row that sees no key
// gets output 0, lse = −inf and zero gradients.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "simd.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

extern "C" {
// Fortran BLAS, column-major. Weak: resolved from the BLAS inside libtorch_cpu when it exports one.
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
}


namespace intro2llm {
namespace {

// Tile sizes, measured single-threaded on an AMD EPYC (MKL sgemm) at B=1, H=8, T=4096, D=64 fp32: bigger query
// blocks amortize BLAS packing, smaller ones waste less on the mask's diagonal and window edges. With 32/1024:
// causal forward 1.39x torch SDPA's speed (with pv_accumulate; 1.0x with BLAS for P·V too), window 512 3.8-3.9x
// faster than full causal; 16 and 64 were slower on one or the other. Backward tiles of 32 query rows over their exact key sub-range: B=8 H=8 Hkv=4 T=128 D=32
// (the tiny preset's training shape) fwd+bwd 4.3 ms vs SDPA 6.3 ms; T=2048 D=64 causal 190 vs 203 ms.
constexpr int64_t kBlockQ = 32;       // query rows per forward task
constexpr int64_t kKeyAlign = 16;     // forward key ranges start at a multiple of this
constexpr int64_t kBlockK = 1024;     // keys per streamed chunk (forward), split evenly over the visible range
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
// GCC if-converts the clamps and masks below into vector min/max/blend only when FP compares may not trap
// (torch itself builds with -fno-trapping-math); scoped to these functions with push/pop.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#endif
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

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

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

// Run fn(task) for task in [0, n) with dynamic scheduling (causal tasks differ in cost).
template <typename Fn>
void parallel_tasks(int64_t n, const Fn& fn) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(n, at::get_num_threads()));
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      for (int64_t t = next.fetch_add(1); t < n; t = next.fetch_add(1)) fn(t);
    }
  });
}

// ---- forward P·V micro-kernel ------------------------------------------------------------------------------------
// O += P V for a query block is (32 × ≤1024) · (≤1024 × D): MKL packs P and the V chunk on every call, and at these
// sizes that cost as much as the multiply-adds. This kernel reads V's rows in place (16·NV floats of a row per
// step) and keeps a 4-row × 16·NV-column slab of O in registers. T=4096 D=64 causal forward, 1 thread: 197 -> 142 ms.
// (The same for S = Q Kᵀ needs Kᵀ; a transpose per call plus a register kernel measured slower than BLAS there.)
typedef float v16 __attribute__((vector_size(64)));

// O (rows R, NV·16 columns at o) += P (R × n, row stride ldp) · V (n × ·, row stride ldv), for one 16·NV-wide
// column slab starting at column c0.
template <int R, int NV>
I2L_CLONES void pv_tile(const float* __restrict P, int64_t ldp, const float* __restrict V, int64_t ldv, int64_t n,
                        float* __restrict O, int64_t ldo, int64_t c0) {
  v16 acc[R][NV];
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < NV; ++c) std::memcpy(&acc[i][c], O + i * ldo + c0 + 16 * c, sizeof(v16));
  for (int64_t j = 0; j < n; ++j) {
    v16 vv[NV];
    for (int c = 0; c < NV; ++c) std::memcpy(&vv[c], V + j * ldv + c0 + 16 * c, sizeof(v16));
    for (int i = 0; i < R; ++i) {
      const float pij = P[i * ldp + j];
      for (int c = 0; c < NV; ++c) acc[i][c] += pij * vv[c];
    }
  }
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < NV; ++c) std::memcpy(O + i * ldo + c0 + 16 * c, &acc[i][c], sizeof(v16));
}

// O (M × D) += P (M × n) V (n × D): D a multiple of 16 (16, 32, 64, 128).
template <int NV>
void pv_rows(const float* P, int64_t ldp, const float* V, int64_t ldv, int64_t n, float* O, int64_t ldo, int64_t M,
             int64_t D) {
  for (int64_t c0 = 0; c0 < D; c0 += 16 * NV) {
    int64_t r = 0;
    for (; r + 4 <= M; r += 4) pv_tile<4, NV>(P + r * ldp, ldp, V, ldv, n, O + r * ldo, ldo, c0);
    for (; r < M; ++r) pv_tile<1, NV>(P + r * ldp, ldp, V, ldv, n, O + r * ldo, ldo, c0);
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

// GQA/MQA: a task takes the G = H / Hkv query heads that share one kv head together — rows_per_head queries of
// each, stacked into one (G·rows_per_head, D) block — so every K/V chunk is read once per group, not once per head
// (decoding with a cache, Tq = 1, is bound by reading K/V: this is where GQA's speed comes from).
void fwd_impl(const float* q, const float* k, const float* v, Strides qs, Strides ks, Strides vs, const bool* kpm,
              float* out, float* lse, int64_t B, int64_t H, int64_t Hkv, int64_t D, const Mask& mk, float scale) {
  const int64_t Tq = mk.Tq, Tk = mk.Tk, G = H / Hkv;
  const int64_t rows_per_head = std::max<int64_t>(1, kBlockQ / G);
  const int64_t max_rows = G * rows_per_head;  // >= kBlockQ - G + 1, and = G when G > kBlockQ
  const int64_t nqb = (Tq + rows_per_head - 1) / rows_per_head;
  parallel_tasks(B * Hkv * nqb, [&](int64_t task) {
    thread_local std::vector<float> s_buf, o_buf, m_buf, l_buf, q_buf;
    s_buf.resize(max_rows * kBlockK);
    o_buf.resize(max_rows * D);
    m_buf.resize(max_rows);
    l_buf.resize(max_rows);
    // costliest query blocks (last rows under causal) first: better load balance
    const int64_t qb = nqb - 1 - task % nqb, bhk = task / nqb, b = bhk / Hkv, hk = bhk % Hkv;
    const int64_t q0 = qb * rows_per_head, q1 = std::min(q0 + rows_per_head, Tq), nq = q1 - q0;
    const int64_t M = G * nq;  // rows of this task: row r is query q0 + r % nq of head hk·G + r / nq
    const float* qp = q + b * qs.b + hk * G * qs.h + q0 * qs.t;  // (M, D) in place when G == 1
    int64_t ldq = qs.t;
    if (G > 1) {  // gather the group's query rows into one block
      q_buf.resize(max_rows * D);
      for (int64_t r = 0; r < M; ++r) {
        const float* src = q + b * qs.b + (hk * G + r / nq) * qs.h + (q0 + r % nq) * qs.t;
        std::copy(src, src + D, q_buf.data() + r * D);
      }
      qp = q_buf.data();
      ldq = D;
    }
    const float* kp = k + b * ks.b + hk * ks.h;  // (Tk, D), row stride ks.t
    const float* vp = v + b * vs.b + hk * vs.h;  // (Tk, D), row stride vs.t
    const bool* keep = kpm ? kpm + b * Tk : nullptr;  // (Tk,)
    float *S = s_buf.data(), *O = o_buf.data(), *m = m_buf.data(), *l = l_buf.data();
    std::fill(O, O + M * D, 0.f);
    std::fill(m, m + M, kNegInf);
    std::fill(l, l + M, 0.f);
    // union of the rows' visible ranges, its start rounded down to a multiple of kKeyAlign: the extra keys are
    // masked, and aligned column counts suit the GEMM kernels (window 512 at T=4096: 3.80x -> 3.87x causal's speed)
    const int64_t kstart = mk.lo(q0) / kKeyAlign * kKeyAlign, kend = mk.hi(q1 - 1);
    // equal chunks of at most kBlockK keys (no small ragged last chunk: small GEMMs are inefficient)
    const int64_t nchunks = (kend - kstart + kBlockK - 1) / kBlockK;
    const int64_t chunk = nchunks > 0 ? (kend - kstart + nchunks - 1) / nchunks : kBlockK;
    for (int64_t k0 = kstart; k0 < kend; k0 += chunk) {
      const int64_t nk = std::min(chunk, kend - k0);
      gemm_nt(M, nk, D, 1.f, qp, ldq, kp + k0 * ks.t, ks.t, 0.f, S, nk);  // S = Q Kᵀ  (M, nk) (BLAS)
      for (int64_t r = 0; r < M; ++r) {
        const int64_t i = q0 + r % nq;
        const int64_t a = std::clamp<int64_t>(mk.lo(i) - k0, 0, nk);
        const int64_t e = std::clamp<int64_t>(mk.hi(i) - k0, 0, nk);
        float* srow = S + r * nk;
        if (a >= e) {  // this row sees none of the chunk
          std::fill(srow, srow + nk, 0.f);
          continue;
        }
        softmax_chunk_row(srow, nk, a, e, keep ? keep + k0 : nullptr, scale, m + r, l + r, O + r * D, D);
      }
      pv_accumulate(S, nk, vp + k0 * vs.t, vs.t, nk, O, D, M, D);  // O += P V  (M, D) (own kernel)
    }
    for (int64_t r = 0; r < M; ++r) {
      const int64_t bh = b * H + hk * G + r / nq, i = q0 + r % nq;
      const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
      float* op = out + (bh * Tq + i) * D;
      for (int64_t d = 0; d < D; ++d) op[d] = O[r * D + d] * inv;
      lse[bh * Tq + i] = l[r] > 0.f ? m[r] + std::log(l[r]) : kNegInf;
    }
  });
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
  for (const auto* t : {&q, &k, &v}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat || t->scalar_type() == at::kBFloat16 || t->scalar_type() == at::kHalf,
                op, ": expected float32, bfloat16 or float16, got ", t->scalar_type());
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), op, ": q, k, v must share a dtype");
    TORCH_CHECK(t->device().is_cpu(), op, ": expected CPU tensors, got ", t->device());
  }
  if (kpm.has_value()) {
    TORCH_CHECK(kpm->scalar_type() == at::kBool && kpm->dim() == 2 && kpm->size(0) == q.size(0) &&
                    kpm->size(1) == k.size(2),
                op, ": key_padding_mask must be bool (B, Tk) = (", q.size(0), ", ", k.size(2), "), got ",
                kpm->scalar_type(), " ", kpm->sizes());
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

TORCH_LIBRARY_IMPL(intro2llm, CPU, m) {
  m.impl("flash_attention_fwd", &flash_attention_fwd_cpu);
  m.impl("flash_attention_bwd", &flash_attention_bwd_cpu);
}

}  // namespace intro2llm
