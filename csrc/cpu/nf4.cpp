// NF4 on CPU: dequantization and the fused dequantize-matmul y = x @ dequant(W)ᵀ (+ bias), and its x-gradient.
//
// Format (bitsandbytes', see intro2llm/ops/nf4.py): W (N, K) flattened; element e has the 4-bit code in byte e/2
// (high nibble when e is even) and the fp32 scale absmax[e / blocksize]; its value is kNF4[code] * scale. The
// double-quantized absmax is expanded to fp32 by the caller (numel/64 values: 1/16 of the packed bytes).
//
// The whole dequantized weight is never built. Decoding runs 8 elements at a time: 4 packed bytes broadcast into
// 8 lanes, a per-lane shift picks each nibble, and a two-table shuffle (__builtin_shuffle → vpermps/vpermt2ps)
// looks the 16 code values up; times the block's scale. Work split:
//   forward, M <= kSmallM tokens (decode, small batches): threads own tiles of kTileRows rows of W; a tile is
//     decoded kChunk columns at a time into a 4 KB buffer (L1) and multiplied into per-(token, row) vector
//     accumulators by a register kernel (one x load feeds kTileRows FMAs).
//   forward, larger M (prefill, training): tiles of rows (<= 4 MB fp32 each) are decoded in parallel, then
//     multiplied by at::mm (BLAS) into the output columns of the tile.
//   backward dx = dy @ W: M <= kSmallM: threads own column chunks of W, decode kTileRows rows at a time and
//     accumulate dx[:, chunk] += dy[:, rows] · tile; larger M: row tiles and at::addmm_.
// Peak extra memory: threads × 4 KB (small M) or one tile of <= 4 MB (large M), against N·K·4 bytes dequantized
// (64 MB at 4096 × 4096). x and the output are widened to / accumulated in fp32.
//
// Measured (benchmarks/bench_nf4.py's cases, 2-core AVX2 x86 at load ~20, best of 9 interleaved runs): W 4096 x 4096
// against bitsandbytes 0.50 dequantize_4bit + F.linear: fp32 1 token 4.0x, 16 tokens 3.3x; bf16 2.5x, 3.0x; peak
// extra memory < 0.1 MiB (bitsandbytes: 64 MiB). Dequantize alone runs at bitsandbytes' speed (0.98-1.07x), both
// bound by writing the output (clone() of it: 0.9x the time).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "op_checks.h"
#include "simd.h"

#include <algorithm>
#include <cstring>
#include <vector>

namespace intro2llm {
namespace {

constexpr float kNF4[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f,
};

constexpr int64_t kSmallM = 32;       // tokens up to which the register kernel runs (beyond: BLAS on tiles)
constexpr int64_t kTileRows = 4;      // rows of W per register-kernel tile (tile_dot is written for 4)
constexpr int64_t kChunk = 256;       // columns decoded per step: kTileRows x kChunk fp32 = 4 KB
constexpr int64_t kLargeTileBytes = int64_t{4} << 20;  // fp32 tile of the BLAS path

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));

I2L_INLINE float decode_one(const uint8_t* packed, const float* absmax, int shift, int64_t e) {
  const uint8_t byte = packed[e >> 1];
  const int code = (e & 1) ? (byte & 15) : (byte >> 4);
  return kNF4[code] * absmax[e >> shift];
}

// Decode flat elements [e0, e1) into out[0, e1 - e0) as fp32. blocksize = 1 << shift (a multiple of 8, so any
// 8-aligned group of 8 elements shares one scale and 4 bytes; the 4-byte load never passes element e1 - 1).
I2L_CLONES void decode_range(const uint8_t* __restrict packed, const float* __restrict absmax, int shift, int64_t e0,
                             int64_t e1, float* __restrict out) {
  int64_t e = e0;
  for (; e < e1 && (e & 7); ++e) out[e - e0] = decode_one(packed, absmax, shift, e);  // up to an 8-aligned start
  const v8f lo = {kNF4[0], kNF4[1], kNF4[2], kNF4[3], kNF4[4], kNF4[5], kNF4[6], kNF4[7]};
  const v8f hi = {kNF4[8], kNF4[9], kNF4[10], kNF4[11], kNF4[12], kNF4[13], kNF4[14], kNF4[15]};
  const v8u shifts = {4, 0, 12, 8, 20, 16, 28, 24};  // little-endian bytes: element 2j in bits 8j+4.., 2j+1 in 8j..
  for (; e + 8 <= e1; e += 8) {
    uint32_t word;
    std::memcpy(&word, packed + (e >> 1), sizeof(word));
    const v8u codes = ((v8u{} + word) >> shifts) & 15u;
    v8f v = __builtin_shuffle(lo, hi, (v8i)codes);
    v *= absmax[e >> shift];
    std::memcpy(out + (e - e0), &v, sizeof(v));
  }
  for (; e < e1; ++e) out[e - e0] = decode_one(packed, absmax, shift, e);
}

// acc[(m * R + r) * 8 + lane] += x[m, 0:n] · w[r, 0:n] partial sums (8 lanes, summed by the caller) for m < M,
// r < R = kTileRows. One 8-float load of x feeds R FMAs. acc is read/written with memcpy: no alignment assumed.
I2L_CLONES void tile_dot(const float* __restrict x, int64_t ldx, const float* __restrict w, int64_t n, int64_t M,
                         float* __restrict acc) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * ldx;
    float* am = acc + m * kTileRows * 8;
    v8f a0, a1, a2, a3;
    std::memcpy(&a0, am, sizeof(v8f));
    std::memcpy(&a1, am + 8, sizeof(v8f));
    std::memcpy(&a2, am + 16, sizeof(v8f));
    std::memcpy(&a3, am + 24, sizeof(v8f));
    for (int64_t k = 0; k < n; k += 8) {  // n is a multiple of 8 (the buffer is zero-padded)
      v8f xv, w0, w1, w2, w3;
      std::memcpy(&xv, xm + k, sizeof(xv));
      std::memcpy(&w0, w + k, sizeof(xv));
      std::memcpy(&w1, w + kChunk + k, sizeof(xv));
      std::memcpy(&w2, w + 2 * kChunk + k, sizeof(xv));
      std::memcpy(&w3, w + 3 * kChunk + k, sizeof(xv));
      a0 += xv * w0;
      a1 += xv * w1;
      a2 += xv * w2;
      a3 += xv * w3;
    }
    std::memcpy(am, &a0, sizeof(v8f));
    std::memcpy(am + 8, &a1, sizeof(v8f));
    std::memcpy(am + 16, &a2, sizeof(v8f));
    std::memcpy(am + 24, &a3, sizeof(v8f));
  }
}

// dx[m, 0:n] += sum_r g[m, r] * w[r, 0:n] for the rows r < rows of one tile.
I2L_CLONES void tile_axpy(const float* __restrict g, int64_t ldg, const float* __restrict w, int64_t rows, int64_t n,
                          int64_t M, float* __restrict dx, int64_t lddx) {
  for (int64_t m = 0; m < M; ++m) {
    float* d = dx + m * lddx;
    const float* gm = g + m * ldg;
    for (int64_t r = 0; r < rows; ++r) {
      const float c = gm[r];
      const float* wr = w + r * kChunk;
#pragma omp simd
      for (int64_t k = 0; k < n; ++k) d[k] += c * wr[k];
    }
  }
}

void check_cpu(const at::Tensor& packed, const at::Tensor& absmax, const char* op) {
  TORCH_CHECK(packed.device().is_cpu() && absmax.device().is_cpu(), op, ": expected CPU tensors, got packed on ",
              packed.device(), " and absmax on ", absmax.device());
}

bool is_float_type(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

// The matmul's activation (x, or grad_y in the backward): a CPU float tensor.
void check_activation(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(is_float_type(t.scalar_type()), op, ": ", name, " must be float32, bfloat16 or float16, got ",
              t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), op, ": expected a CPU tensor, got ", name, " on ", t.device());
}

// W's codes and scales, contiguous (the tensors keep the pointers valid).
struct Weight {
  Weight(const at::Tensor& packed, const at::Tensor& absmax)
      : bytes(packed.contiguous()), scales(absmax.contiguous()), p(bytes.const_data_ptr<uint8_t>()),
        a(scales.const_data_ptr<float>()) {}
  at::Tensor bytes, scales;
  const uint8_t* p;
  const float* a;
};

// What both matmul directions start from (a = x, or grad_y in the backward): the checks, log2(blocksize), W's
// codes and scales, and a as contiguous fp32.
struct MatmulInputs {
  int shift;
  Weight w;
  at::Tensor a32;
};

MatmulInputs matmul_inputs(const at::Tensor& a, int64_t n_or_k, bool backward, const at::Tensor& packed,
                           const at::Tensor& absmax, int64_t blocksize, const std::optional<at::Tensor>& bias,
                           const char* op) {
  check_cpu(packed, absmax, op);
  const int shift = check_nf4_matmul_args(a, n_or_k, backward, packed, absmax, blocksize, bias, op);
  check_activation(a, backward ? "grad_y" : "x", op);
  return {shift, Weight(packed, absmax), a.to(at::kFloat).contiguous()};
}

template <typename scalar_t>
void dequantize_into(const uint8_t* p, const float* a, int shift, int64_t numel, scalar_t* o) {
  constexpr int64_t kSpan = 16384;  // elements per task (a multiple of 8)
  at::parallel_for(0, (numel + kSpan - 1) / kSpan, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> buf(std::is_same_v<scalar_t, float> ? 0 : kSpan);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t e0 = t * kSpan, e1 = std::min(numel, e0 + kSpan);
      if constexpr (std::is_same_v<scalar_t, float>) {
        decode_range(p, a, shift, e0, e1, o + e0);
      } else {
        decode_range(p, a, shift, e0, e1, buf.data());
        from_f32(buf.data(), o + e0, e1 - e0);
      }
    }
  });
}

at::Tensor nf4_dequantize_cpu(const at::Tensor& packed, const at::Tensor& absmax, int64_t numel, int64_t blocksize,
                              at::ScalarType dtype) {
  const char* op = "intro2llm::nf4_dequantize";
  check_cpu(packed, absmax, op);
  const int shift = check_nf4_weight(packed, absmax, numel, blocksize, op);
  TORCH_CHECK(is_float_type(dtype), op, ": dtype must be float32, bfloat16 or float16, got ", dtype);
  const Weight w(packed, absmax);
  auto out = at::empty({numel}, packed.options().dtype(dtype));
  if (dtype == at::kFloat) {
    dequantize_into(w.p, w.a, shift, numel, out.mutable_data_ptr<float>());
  } else if (dtype == at::kBFloat16) {
    dequantize_into(w.p, w.a, shift, numel, out.mutable_data_ptr<c10::BFloat16>());
  } else {
    dequantize_into(w.p, w.a, shift, numel, out.mutable_data_ptr<c10::Half>());
  }
  return out;
}

// Decode rows [n0, n0 + rows) of W (N, K) into tile (rows, K) fp32, rows in parallel.
void decode_rows_parallel(const uint8_t* p, const float* a, int shift, int64_t K, int64_t n0, int64_t rows,
                          float* tile) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / K), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) decode_range(p, a, shift, (n0 + r) * K, (n0 + r + 1) * K, tile + r * K);
  });
}

int64_t large_tile_rows(int64_t N, int64_t K) {
  return std::min(N, std::max<int64_t>(16, kLargeTileBytes / (K * static_cast<int64_t>(sizeof(float)))));
}

// Large M: W (N, K) decoded tile by tile, fn(n0, rows, tile) with rows [n0, n0 + rows) of W in the fp32 (rows, K)
// tile, for one GEMM per tile.
template <typename Fn>
void for_each_decoded_tile(const MatmulInputs& in, int64_t N, int64_t K, const Fn& fn) {
  const int64_t tn = large_tile_rows(N, K);
  auto tile = at::empty({tn, K}, in.a32.options());
  for (int64_t n0 = 0; n0 < N; n0 += tn) {
    const int64_t rows = std::min(tn, N - n0);
    decode_rows_parallel(in.w.p, in.w.a, in.shift, K, n0, rows, tile.mutable_data_ptr<float>());
    fn(n0, rows, tile.narrow(0, 0, rows));
  }
}

at::Tensor nf4_matmul_fwd_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax, int64_t N,
                              int64_t blocksize, const std::optional<at::Tensor>& bias) {
  const char* op = "intro2llm::nf4_matmul_fwd";
  const auto in = matmul_inputs(x, N, /*backward=*/false, packed, absmax, blocksize, bias, op);
  const at::Tensor& xf = in.a32;  // (M, K)
  const int64_t M = x.size(0), K = x.size(1);
  auto y = at::empty({M, N}, x.options().dtype(at::kFloat));
  if (M == 0) return y.to(x.scalar_type());
  float* yp = y.mutable_data_ptr<float>();

  if (M <= kSmallM) {
    // x padded to a multiple of 8 columns with zeros; the buffer's padding columns are zero as well
    const int64_t Kp = (K + 7) / 8 * 8;
    at::Tensor xpad = Kp == K ? xf : at::constant_pad_nd(xf, {0, Kp - K});
    const float* xp = xpad.const_data_ptr<float>();
    const int64_t tiles = (N + kTileRows - 1) / kTileRows;
    at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
      alignas(64) float buf[kTileRows * kChunk];
      alignas(64) float acc[kSmallM * kTileRows * 8];
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n0 = t * kTileRows, rows = std::min(kTileRows, N - n0);
        std::fill(acc, acc + M * kTileRows * 8, 0.f);
        for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
          const int64_t kn = std::min(kChunk, K - k0), kpad = (kn + 7) / 8 * 8;
          for (int64_t r = 0; r < kTileRows; ++r) {
            float* br = buf + r * kChunk;
            if (r < rows) {
              decode_range(in.w.p, in.w.a, in.shift, (n0 + r) * K + k0, (n0 + r) * K + k0 + kn, br);
              std::fill(br + kn, br + kpad, 0.f);
            } else {
              std::fill(br, br + kpad, 0.f);
            }
          }
          tile_dot(xp + k0, Kp, buf, kpad, M, acc);
        }
        for (int64_t m = 0; m < M; ++m) {
          for (int64_t r = 0; r < rows; ++r) {
            const float* v = acc + (m * kTileRows + r) * 8;
            yp[m * N + n0 + r] = ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
          }
        }
      }
    });
  } else {
    for_each_decoded_tile(in, N, K, [&](int64_t n0, int64_t rows, const at::Tensor& tile) {
      y.narrow(1, n0, rows).copy_(at::mm(xf, tile.t()));
    });
  }
  if (bias.has_value()) y.add_(bias->to(at::kFloat));
  return y.to(x.scalar_type());
}

at::Tensor nf4_matmul_bwd_cpu(const at::Tensor& grad_y, const at::Tensor& packed, const at::Tensor& absmax,
                              int64_t K, int64_t blocksize) {
  const char* op = "intro2llm::nf4_matmul_bwd";
  const auto in = matmul_inputs(grad_y, K, /*backward=*/true, packed, absmax, blocksize, std::nullopt, op);
  const at::Tensor& gf = in.a32;  // (M, N)
  const int64_t M = grad_y.size(0), N = grad_y.size(1);
  auto dx = at::zeros({M, K}, grad_y.options().dtype(at::kFloat));
  if (M == 0) return dx.to(grad_y.scalar_type());

  if (M <= kSmallM) {
    const float* gp = gf.const_data_ptr<float>();
    float* dp = dx.mutable_data_ptr<float>();
    const int64_t chunks = (K + kChunk - 1) / kChunk;
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      alignas(64) float buf[kTileRows * kChunk];
      std::vector<float> gtile(M * kTileRows);
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t k0 = c * kChunk, kn = std::min(kChunk, K - k0);
        for (int64_t n0 = 0; n0 < N; n0 += kTileRows) {
          const int64_t rows = std::min(kTileRows, N - n0);
          for (int64_t r = 0; r < rows; ++r) {
            decode_range(in.w.p, in.w.a, in.shift, (n0 + r) * K + k0, (n0 + r) * K + k0 + kn, buf + r * kChunk);
          }
          for (int64_t m = 0; m < M; ++m)
            for (int64_t r = 0; r < rows; ++r) gtile[m * kTileRows + r] = gp[m * N + n0 + r];
          tile_axpy(gtile.data(), kTileRows, buf, rows, kn, M, dp + k0, K);
        }
      }
    });
  } else {
    for_each_decoded_tile(in, N, K, [&](int64_t n0, int64_t rows, const at::Tensor& tile) {
      dx.addmm_(gf.narrow(1, n0, rows), tile);
    });
  }
  return dx.to(grad_y.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(intro2llm, CPU, m) { impl_nf4<nf4_dequantize_cpu, nf4_matmul_fwd_cpu, nf4_matmul_bwd_cpu>(m); }

}  // namespace intro2llm
