// CPU kernels of the q4 decode path (built on first use by backbone/kernels.py). Seven ops in
// the `clp` namespace:
//
// clp::q4_linear      y = op(x) W^T (+ b) (+ residual): W as ggml Q4_1-style groups of 32
//                      (4-bit codes, an fp32 scale and min per group), op(x) quantised per row
//                      to int16 (int8 with CLP_ACT8) in groups of 32 (llama.cpp's q4_1 x q8
//                      dot, with the min term on exact fp32 group sums). Integer dot products
//                      keep a 5-row step close to a 1-row one: the 4-bit weights are decoded
//                      once per group for all rows. op(x) is x, RMSNorm(x) * w, or
//                      act(gate) * up (SiLU or tanh-GELU) for x = [gate | up]: fused in front.
// clp::q8_linear      the same with 8-bit codes and a scale per group of 32 (Q8_0, Q5_0) or
//                      16 (Q6_K): the LM head, Gemma's other types, the drafters' weights.
// clp::rms_norm       RMSNorm of fp32 rows (+ residual), the linears' own arithmetic.
// clp::rope_store     rotary on a step's queries and keys (with Gemma 3's q/k norms in front)
//                      and the write of its keys and values into the (fp16) cache.
// clp::decode_attention  grouped-query attention of a decode step's T queries over a static
//                      KV cache, chunked over keys (both cores busy with 3 K/V heads).
// clp::layers_forward  a whole batch-1 step's decoder layers in one call: the ops above,
//                      called as C++ functions, bit-identical to calling them one by one.
// clp::layers_forward_rows  the same over the rows of many sequences, each with its own cache
//                      slot, length and step mask (continuous batching); one stream is its
//                      special case (StepRows), so a row's result never depends on the batch.
//
// All are row-invariant: a row's result is bit-identical whatever other rows share the
// call, because each row runs the same instruction sequence over the same data in the same
// order (activations are quantised per row; attention chunks sit at fixed virtual positions,
// and a row's keys are exactly those a one-token step at its position would see). Verified
// decoding relies on this to reproduce AR decoding token for token.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define CLP_AVX2 1
#else
#define CLP_AVX2 0
#endif

namespace {

constexpr int64_t G = 32;  // weights per group

#if CLP_AVX2
// exp, Cephes-style polynomial (~1 ulp), arguments clamped to fp32's finite range.
inline __m256 exp256(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 log2e = _mm256_set1_ps(1.44269504088896341f);
  __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
#endif

// ---- activations in front of a linear ----------------------------------------------------------
enum Act : int64_t { ACT_NONE = 0, ACT_SILU_MUL = 1, ACT_GELU_TANH_MUL = 2 };

// One row of a linear's input, as the linear reads it: x itself; RMSNorm(x) * w (norm given);
// or act(gate) * up for x = [gate | up] (act != ACT_NONE). Writes K floats to `row`.
void input_row(const float* x, int64_t K, const float* norm, float eps, int64_t act, float* row) {
  if (act == ACT_NONE && norm == nullptr) {
    std::memcpy(row, x, K * sizeof(float));
    return;
  }
  if (norm != nullptr) {
    double ss = 0.0;  // fixed order: row-invariant; double: no precision question at K <= 10k
    for (int64_t j = 0; j < K; ++j) ss += double(x[j]) * x[j];
    const float r = 1.f / std::sqrt(float(ss / K) + eps);
    for (int64_t j = 0; j < K; ++j) row[j] = (x[j] * r) * norm[j];
    return;
  }
  const float* up = x + K;
  int64_t j = 0;
  if (act == ACT_SILU_MUL) {
#if CLP_AVX2
    const __m256 one = _mm256_set1_ps(1.f);
    for (; j + 8 <= K; j += 8) {
      const __m256 g = _mm256_loadu_ps(x + j);
      const __m256 sg = _mm256_div_ps(g, _mm256_add_ps(one, exp256(_mm256_sub_ps(_mm256_setzero_ps(), g))));
      _mm256_storeu_ps(row + j, _mm256_mul_ps(sg, _mm256_loadu_ps(up + j)));
    }
#endif
    for (; j < K; ++j) row[j] = (x[j] / (1.f + std::exp(-x[j]))) * up[j];
  } else {  // gelu with the tanh approximation (Gemma's gelu_pytorch_tanh)
    for (; j < K; ++j) {
      const float g = x[j];
      const float t = std::tanh(0.7978845608028654f * (g + 0.044715f * g * g * g));
      row[j] = (0.5f * g * (1.f + t)) * up[j];
    }
  }
}

// Activations as integers per group of 32: int16 by default (Q = 32767: below fp32's own
// rounding of the products, so q4 computes what the dequantised model computes), int8 with
// CLP_ACT8 (Q = 127: llama.cpp's q8 rounding, fewer instructions per row).
#ifdef CLP_ACT8
using QT = int8_t;
constexpr float QMAX = 127.f;
#else
using QT = int16_t;
constexpr float QMAX = 32767.f;
#endif

// Per row r and group g of the prepared input: dx = max|x| / QMAX, q = round(x / dx) in
// [-QMAX, QMAX], sx = sum of x (fp32, in index order).
void quantize_rows(const float* x, int64_t M, int64_t K, int64_t x_stride, const float* norm, float eps,
                   int64_t act, QT* q, float* dx, float* sx) {
  const int64_t ng = K / G;
  at::parallel_for(0, M, 1, [&](int64_t b, int64_t e) {
    std::vector<float> row(K);
    for (int64_t r = b; r < e; ++r) {
      input_row(x + r * x_stride, K, norm, eps, act, row.data());
      for (int64_t g = 0; g < ng; ++g) {
        const float* v = row.data() + g * G;
        float amax = 0.f, s = 0.f;
        for (int j = 0; j < G; ++j) {
          amax = std::max(amax, std::fabs(v[j]));
          s += v[j];
        }
        const float d = amax / QMAX;
        const float id = d > 0.f ? 1.f / d : 0.f;
        QT* qr = q + r * K + g * G;
        for (int j = 0; j < G; ++j) qr[j] = (QT)std::nearbyint(v[j] * id);
        dx[r * ng + g] = d;
        sx[r * ng + g] = s;
      }
    }
  });
}

#if CLP_AVX2
inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

// [p0 p1 p2 p3] (8 int32 lanes each) -> [f0 f1 f2 f3 | f0 f1 f2 f3]: each fi the sum of pi's
// lanes in that 128-bit half. Unpacks and adds (single-uop instructions) instead of hadd.
inline __m256i reduce4(__m256i p0, __m256i p1, __m256i p2, __m256i p3) {
#ifdef CLP_HADD
  return _mm256_hadd_epi32(_mm256_hadd_epi32(p0, p1), _mm256_hadd_epi32(p2, p3));
#else
  const __m256i s01 = _mm256_add_epi32(_mm256_unpacklo_epi32(p0, p1), _mm256_unpackhi_epi32(p0, p1));
  const __m256i s23 = _mm256_add_epi32(_mm256_unpacklo_epi32(p2, p3), _mm256_unpackhi_epi32(p2, p3));
  return _mm256_add_epi32(_mm256_unpacklo_epi64(s01, s23), _mm256_unpackhi_epi64(s01, s23));
#endif
}

// u8 x s8 dot of 32 pairs -> 8 int32 lane sums.
inline __m256i dot_u8s8(__m256i w, __m256i x) {
#if defined(__AVXVNNI__) || (defined(__AVX512VNNI__) && defined(__AVX512VL__))
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, x);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1));
#endif
}

// One tile of NT = 4 output features against R rows (1..4). Weights of a tile are laid out
// group by group: 64 bytes of codes (16 per feature, ggml's nibble order), then the 4
// scales and the 4 mins as fp32 (tile_scales / tile_mins, (ng, 4) each).
template <int R>
inline void q4_tile(const uint8_t* wq, const float* wd, const float* wm, int64_t ng, const QT* q,
                    const float* dx, const float* sx, int64_t K, float* out, int64_t N) {
  // acc[r] lanes: features 0..3 (first half of each group's partial sums) then 0..3 again
  // (second half); added together at the end.
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < ng; ++g) {
#ifdef CLP_ACT8
    const __m256i mask = _mm256_set1_epi8(0x0F);
    const __m256i raw01 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq + g * 64));
    const __m256i raw23 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq + g * 64 + 32));
    const __m256i lo01 = _mm256_and_si256(raw01, mask), hi01 = _mm256_and_si256(_mm256_srli_epi16(raw01, 4), mask);
    const __m256i lo23 = _mm256_and_si256(raw23, mask), hi23 = _mm256_and_si256(_mm256_srli_epi16(raw23, 4), mask);
    const __m256i w0 = _mm256_permute2x128_si256(lo01, hi01, 0x20), w1 = _mm256_permute2x128_si256(lo01, hi01, 0x31);
    const __m256i w2 = _mm256_permute2x128_si256(lo23, hi23, 0x20), w3 = _mm256_permute2x128_si256(lo23, hi23, 0x31);
#else
    // Each feature's 32 codes as int16: elements 0..15 (low nibbles), then 16..31 (high).
    const __m128i mask = _mm_set1_epi8(0x0F);
    __m256i wa[4], wb[4];
    for (int f = 0; f < 4; ++f) {
      const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wq + g * 64 + f * 16));
      wa[f] = _mm256_cvtepu8_epi16(_mm_and_si128(raw, mask));
      wb[f] = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(raw, 4), mask));
    }
#endif
    const __m256 d8 = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(wd + g * 4));
    const __m256 m8 = _mm256_zextps128_ps256(_mm_loadu_ps(wm + g * 4));
    for (int r = 0; r < R; ++r) {
#ifdef CLP_ACT8
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + r * K + g * G));
      const __m256i p0 = dot_u8s8(w0, xv), p1 = dot_u8s8(w1, xv), p2 = dot_u8s8(w2, xv), p3 = dot_u8s8(w3, xv);
#else
      const __m256i xa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + r * K + g * G));
      const __m256i xb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + r * K + g * G + 16));
      const __m256i p0 = _mm256_add_epi32(_mm256_madd_epi16(wa[0], xa), _mm256_madd_epi16(wb[0], xb));
      const __m256i p1 = _mm256_add_epi32(_mm256_madd_epi16(wa[1], xa), _mm256_madd_epi16(wb[1], xb));
      const __m256i p2 = _mm256_add_epi32(_mm256_madd_epi16(wa[2], xa), _mm256_madd_epi16(wb[2], xb));
      const __m256i p3 = _mm256_add_epi32(_mm256_madd_epi16(wa[3], xa), _mm256_madd_epi16(wb[3], xb));
#endif
      // hadd sums lane pairs within 128-bit halves; twice gives [f0 f1 f2 f3 | f0 f1 f2 f3].
      const __m256i h = reduce4(p0, p1, p2, p3);
      const __m256 scale = _mm256_mul_ps(d8, _mm256_set1_ps(dx[r * ng + g]));
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(h), scale, acc[r]);
      acc[r] = _mm256_fmadd_ps(m8, _mm256_set1_ps(sx[r * ng + g]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps(acc[r], 1));
    _mm_storeu_ps(out + r * N, s);
  }
}
#endif

// Scalar version of the same arithmetic (machines without AVX2; results may differ from
// the AVX2 path in the last bits, but are row-invariant the same way).
inline void q4_tile_scalar(const uint8_t* wq, const float* wd, const float* wm, int64_t ng, const QT* q,
                           const float* dx, const float* sx, float* out) {
  for (int f = 0; f < 4; ++f) {
    float acc = 0.f;
    for (int64_t g = 0; g < ng; ++g) {
      int32_t dot = 0;
      for (int j = 0; j < 16; ++j) {
        const uint8_t b = wq[g * 64 + f * 16 + j];
        dot += int32_t(b & 0x0F) * q[g * G + j] + int32_t(b >> 4) * q[g * G + 16 + j];
      }
      acc += float(dot) * (wd[g * 4 + f] * dx[g]);
      acc += wm[g * 4 + f] * sx[g];
    }
    out[f] = acc;
  }
}

struct Scratch {  // per-thread buffers reused across calls
  std::vector<QT> q;
  std::vector<float> dx, sx;
};

// A linear's input rows, prepared (norm or activation applied) and quantised into this
// thread's scratch: q (M, K), dx and sx (M, K/32). Shared by q4_linear and q8_linear.
Scratch& prepare_activations(const torch::Tensor& x, int64_t M, int64_t K, const c10::optional<torch::Tensor>& norm,
                             double eps, int64_t act, const char* op) {
  thread_local Scratch sc;
  const int64_t ng = K / G;
  sc.q.resize(M * K);
  sc.dx.resize(M * ng);
  sc.sx.resize(M * ng);
  torch::Tensor nw;
  if (norm.has_value() && norm->defined()) {
    nw = norm->contiguous();
    TORCH_CHECK(nw.scalar_type() == torch::kFloat && nw.numel() == K, op, ": norm weight must be (K,) float32");
  }
  quantize_rows(x.data_ptr<float>(), M, K, x.size(1), nw.defined() ? nw.data_ptr<float>() : nullptr, (float)eps, act,
                sc.q.data(), sc.dx.data(), sc.sx.data());
  return sc;
}

#if CLP_AVX2 && defined(__AVX512VNNI__) && defined(__AVX512BW__) && !defined(CLP_ACT8)
#define CLP_WIDE 1
// ---- 4-bit weights in tiles of 16 features, with AVX-512 VNNI ---------------------------------
// Where the CPU has AVX512_VNNI, q4 weights are packed 16 output features to a tile (the `wide`
// layout: qs (N/16, K/32, 256) uint8; d, mn (N/16, K/32, 16) fp32; quant.pack_tiles16). Per
// group, the 16 features of each pair of inputs (2k, 2k+1) are one 64-byte vector of int16
// (code of 2k, code of 2k+1) per feature, so one vpdpwssd against the broadcast int16 pair of a
// row adds both products into each feature's own int32 lane: every dot product stays in its
// lane, with no horizontal sums, and the codes are decoded once per group for up to 8 rows.
// Integer sums are exact; per row and feature the float part is always the same sequence,
// acc = fma(dot, d * dx, acc), then fma(min, sx, acc), group after group, whatever the rows.
// Stored per group: 8 blocks of 32 bytes, block b holding the pairs 2b (bytes 8L + j) and
// 2b + 1 (bytes 8L + 4 + j) of feature 4L + j, low nibble the even input, high nibble the odd
// one: the byte order that _mm512_unpacklo/hi_epi16 turn into features 0..15 in lane order.
template <int R>
inline void q4x16_rows(const uint8_t* wq, const float* wd, const float* wm, int64_t ng, const QT* q, const float* dx,
                       const float* sx, int64_t K, float* out, int64_t N) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const __m512i low4 = _mm512_set1_epi16(0x0F);
  for (int64_t g = 0; g < ng; ++g) {
    const uint8_t* w = wq + g * 256;
    __m512i dot[R];
    for (int r = 0; r < R; ++r) dot[r] = _mm512_setzero_si512();
    for (int b = 0; b < 8; ++b) {
      const __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + b * 32)));
      const __m512i lo = _mm512_and_si512(bytes, low4), hi = _mm512_srli_epi16(bytes, 4);
      const __m512i w0 = _mm512_unpacklo_epi16(lo, hi), w1 = _mm512_unpackhi_epi16(lo, hi);
      for (int r = 0; r < R; ++r) {
        const int32_t* pairs = reinterpret_cast<const int32_t*>(q + r * K + g * G);
        dot[r] = _mm512_dpwssd_epi32(dot[r], w0, _mm512_set1_epi32(pairs[2 * b]));
        dot[r] = _mm512_dpwssd_epi32(dot[r], w1, _mm512_set1_epi32(pairs[2 * b + 1]));
      }
    }
    const __m512 d = _mm512_loadu_ps(wd + g * 16), m = _mm512_loadu_ps(wm + g * 16);
    for (int r = 0; r < R; ++r) {
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r]), _mm512_mul_ps(d, _mm512_set1_ps(dx[r * ng + g])), acc[r]);
      acc[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(sx[r * ng + g]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(out + r * N, acc[r]);
}

// T tiles (16 T features) against R rows: each row's broadcast input pair serves all T tiles'
// codes, 1 / T of the broadcasts per vpdpwssd of q4x16_rows. Per row and feature the integer
// sums and the float sequence are q4x16_rows' (the accumulators wait in memory between
// groups, which changes no value), so its results are the same bits. wq, wd, wm: tile 0's;
// tile u's are `tile_bytes` / `tile_floats` further on.
template <int T, int R>
inline void q4xT_rows(const uint8_t* wq, const float* wd, const float* wm, int64_t tile_bytes, int64_t tile_floats,
                      int64_t ng, const QT* q, const float* dx, const float* sx, int64_t K, float* out, int64_t N) {
  alignas(64) float acc[T][R][16] = {};
  const __m512i low4 = _mm512_set1_epi16(0x0F);
  for (int64_t g = 0; g < ng; ++g) {
    __m512i dot[T][R];
    for (int u = 0; u < T; ++u)
      for (int r = 0; r < R; ++r) dot[u][r] = _mm512_setzero_si512();
    for (int b = 0; b < 8; ++b) {
      __m512i w0[T], w1[T];
      for (int u = 0; u < T; ++u) {
        const __m512i bytes = _mm512_cvtepu8_epi16(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq + u * tile_bytes + g * 256 + b * 32)));
        const __m512i lo = _mm512_and_si512(bytes, low4), hi = _mm512_srli_epi16(bytes, 4);
        w0[u] = _mm512_unpacklo_epi16(lo, hi);
        w1[u] = _mm512_unpackhi_epi16(lo, hi);
      }
      for (int r = 0; r < R; ++r) {
        const int32_t* pairs = reinterpret_cast<const int32_t*>(q + r * K + g * G);
        const __m512i x0 = _mm512_set1_epi32(pairs[2 * b]), x1 = _mm512_set1_epi32(pairs[2 * b + 1]);
        for (int u = 0; u < T; ++u) {
          dot[u][r] = _mm512_dpwssd_epi32(dot[u][r], w0[u], x0);
          dot[u][r] = _mm512_dpwssd_epi32(dot[u][r], w1[u], x1);
        }
      }
    }
    for (int u = 0; u < T; ++u) {
      const __m512 d = _mm512_loadu_ps(wd + u * tile_floats + g * 16), m = _mm512_loadu_ps(wm + u * tile_floats + g * 16);
      for (int r = 0; r < R; ++r) {
        __m512 v = _mm512_load_ps(acc[u][r]);
        v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[u][r]), _mm512_mul_ps(d, _mm512_set1_ps(dx[r * ng + g])), v);
        v = _mm512_fmadd_ps(m, _mm512_set1_ps(sx[r * ng + g]), v);
        _mm512_store_ps(acc[u][r], v);
      }
    }
  }
  for (int u = 0; u < T; ++u)
    for (int r = 0; r < R; ++r) _mm512_storeu_ps(out + r * N + u * 16, _mm512_load_ps(acc[u][r]));
}

// A wide product over blocks of 8 rows, its tiles two at a time (threads take pairs):
// pair(t, r) for tiles t, t + 1 and the 8 rows from r; one(t, r, rows) for a lone last tile's
// blocks and for each tile's rows past the last full block. q4_linear and q8_linear's shared
// split (which kernel computes a row never changes its bits).
template <typename Pair, typename One>
void tile_pairs(int64_t tiles, int64_t M, int64_t grain, const Pair& pair, const One& one) {
  const int64_t done = M / 8 * 8;
  at::parallel_for(0, (tiles + 1) / 2, grain, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t t = 2 * p, n_tiles = std::min<int64_t>(2, tiles - t);
      for (int64_t r = 0; r < done; r += 8) {
        if (n_tiles == 2)
          pair(t, r);
        else
          one(t, r, 8);
      }
      if (M > done)
        for (int64_t u = t; u < t + n_tiles; ++u) one(u, done, M - done);
    }
  });
}

void q4x16_tile(const uint8_t* wq, const float* wd, const float* wm, int64_t ng, const QT* q, const float* dx,
                const float* sx, int64_t K, float* o, int64_t N, int64_t M) {
  int64_t r = 0;
  for (; r + 8 <= M; r += 8) q4x16_rows<8>(wq, wd, wm, ng, q + r * K, dx + r * ng, sx + r * ng, K, o + r * N, N);
  const QT* qr = q + r * K;
  const float *dr = dx + r * ng, *sr = sx + r * ng;
  float* orow = o + r * N;
  switch (M - r) {
    case 7: q4x16_rows<7>(wq, wd, wm, ng, qr, dr, sr, K, orow, N); break;
    case 6: q4x16_rows<6>(wq, wd, wm, ng, qr, dr, sr, K, orow, N); break;
    case 5: q4x16_rows<5>(wq, wd, wm, ng, qr, dr, sr, K, orow, N); break;
    case 4: q4x16_rows<4>(wq, wd, wm, ng, qr, dr, sr, K, orow, N); break;
    case 3: q4x16_rows<3>(wq, wd, wm, ng, qr, dr, sr, K, orow, N); break;
    case 2: q4x16_rows<2>(wq, wd, wm, ng, qr, dr, sr, K, orow, N); break;
    case 1: q4x16_rows<1>(wq, wd, wm, ng, qr, dr, sr, K, orow, N); break;
    default: break;
  }
}
#else
#define CLP_WIDE 0
#endif

torch::Tensor q4_linear(const torch::Tensor& x_in, const torch::Tensor& qs, const torch::Tensor& d,
                        const torch::Tensor& mn, const c10::optional<torch::Tensor>& bias,
                        const c10::optional<torch::Tensor>& norm, double eps, int64_t act,
                        const c10::optional<torch::Tensor>& residual) {
  // qs: (N/4, K/32, 64) uint8 tiles, d, mn: (N/4, K/32, 4) fp32; or the wide layout (CLP_WIDE):
  // qs (N/16, K/32, 256), d, mn (N/16, K/32, 16).
  // The input row is RMSNorm(x) * norm when norm is given, act(gate) * up when x = [gate | up]
  // (act = 1: SiLU, 2: tanh-GELU), x otherwise; residual (M, N) is added to the output.
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == torch::kFloat, "q4_linear: x must be (M, K) float32");
  const int64_t width = qs.dim() == 3 && qs.size(2) == 256 ? 16 : 4;  // features per tile
  TORCH_CHECK(qs.scalar_type() == torch::kUInt8 && qs.dim() == 3 && qs.size(2) == width * 16,
              "q4_linear: qs must be (N/4, K/32, 64) or (N/16, K/32, 256) uint8 tiles");
  TORCH_CHECK(width == 4 || CLP_WIDE, "q4_linear: the wide layout needs a build with AVX512_VNNI");
  TORCH_CHECK(act >= 0 && act <= 2 && !(act && norm.has_value()), "q4_linear: act is 0, 1 or 2, and not with norm");
  const auto x = x_in.contiguous();
  const int64_t M = x.size(0), K = act ? x.size(1) / 2 : x.size(1), tiles = qs.size(0), N = tiles * width;
  TORCH_CHECK(K % G == 0 && qs.size(1) == K / G, "q4_linear: K must be a multiple of 32 and match the weight");
  const int64_t ng = K / G;
  TORCH_CHECK(d.is_contiguous() && mn.is_contiguous() && qs.is_contiguous(), "q4_linear: weights must be contiguous");
  TORCH_CHECK(d.numel() == tiles * ng * width && mn.numel() == tiles * ng * width, "q4_linear: scale shape");
  auto out = torch::empty({M, N}, x.options());
  if (M == 0) return out;
  Scratch& sc = prepare_activations(x, M, K, norm, eps, act, "q4_linear");
  QT* qv = sc.q.data();
  float *dxv = sc.dx.data(), *sxv = sc.sx.data();
  const uint8_t* W = qs.data_ptr<uint8_t>();
  const float* D = d.data_ptr<float>();
  const float* Mn = mn.data_ptr<float>();
  float* O = out.data_ptr<float>();
#if CLP_WIDE
  if (width == 16) {
    if (M >= 8) {  // tiles two at a time for the blocks of 8 rows (q4xT_rows), the other rows by q4x16_tile
      const int64_t tb = ng * 256, tf = ng * 16;
      tile_pairs(
          tiles, M, 1,
          [&](int64_t t, int64_t r) {
            q4xT_rows<2, 8>(W + t * tb, D + t * tf, Mn + t * tf, tb, tf, ng, qv + r * K, dxv + r * ng, sxv + r * ng, K,
                            O + r * N + t * 16, N);
          },
          [&](int64_t t, int64_t r, int64_t rows) {
            q4x16_tile(W + t * tb, D + t * tf, Mn + t * tf, ng, qv + r * K, dxv + r * ng, sxv + r * ng, K,
                       O + r * N + t * 16, N, rows);
          });
    } else
    at::parallel_for(0, tiles, 2, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        q4x16_tile(W + t * ng * 256, D + t * ng * 16, Mn + t * ng * 16, ng, qv, dxv, sxv, K, O + t * 16, N, M);
    });
    if (bias.has_value() && bias->defined()) out.add_(*bias);
    if (residual.has_value() && residual->defined()) out.add_(*residual);
    return out;
  }
#endif
  // Tiles of output features split over threads; each output is computed by one thread.
  at::parallel_for(0, tiles, 8, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const uint8_t* wq = W + t * ng * 64;
      const float *wd = D + t * ng * 4, *wm = Mn + t * ng * 4;
      float* o = O + t * 4;
      int64_t r = 0;
#if CLP_AVX2
      for (; r + 4 <= M; r += 4) q4_tile<4>(wq, wd, wm, ng, qv + r * K, dxv + r * ng, sxv + r * ng, K, o + r * N, N);
      switch (M - r) {
        case 3: q4_tile<3>(wq, wd, wm, ng, qv + r * K, dxv + r * ng, sxv + r * ng, K, o + r * N, N); break;
        case 2: q4_tile<2>(wq, wd, wm, ng, qv + r * K, dxv + r * ng, sxv + r * ng, K, o + r * N, N); break;
        case 1: q4_tile<1>(wq, wd, wm, ng, qv + r * K, dxv + r * ng, sxv + r * ng, K, o + r * N, N); break;
        default: break;
      }
#else
      for (; r < M; ++r) q4_tile_scalar(wq, wd, wm, ng, qv + r * K, dxv + r * ng, sxv + r * ng, o + r * N);
#endif
    }
  });
  if (bias.has_value() && bias->defined()) out.add_(*bias);
  if (residual.has_value() && residual->defined()) out.add_(*residual);
  return out;
}

// ---- 8-bit weights (ggml Q8_0 / Q5_0: w = d * q; Q6_K: a scale per 16 weights) -------------
#if CLP_AVX2
// One tile of 4 output features: per group 128 bytes of int8 codes (32 per feature), scales
// (ng, 4) fp32, or with S16 (ng, 8): the 4 features' scales of weights 0..15, then 16..31.
// Activations as in q4_tile.
template <int R, bool S16>
inline void q8_tile(const int8_t* wq, const float* wd, int64_t ng, const QT* q, const float* dx, int64_t K,
                    float* out, int64_t N) {
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < ng; ++g) {
    const int8_t* w = wq + g * 128;
    const __m256 da = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(wd + g * (S16 ? 8 : 4)));
#ifdef CLP_ACT8
    static_assert(!S16, "scales per 16 weights need int16 activations");
    // s8 x s8 via the sign trick: |w| (u8) times x with w's sign.
    __m256i wa[4];
    for (int f = 0; f < 4; ++f) wa[f] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + f * 32));
    for (int r = 0; r < R; ++r) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + r * K + g * G));
      __m256i p[4];
      for (int f = 0; f < 4; ++f)
        p[f] = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(wa[f], wa[f]), _mm256_sign_epi8(xv, wa[f])),
                                 _mm256_set1_epi16(1));
      const __m256i h = reduce4(p[0], p[1], p[2], p[3]);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(h), _mm256_mul_ps(da, _mm256_set1_ps(dx[r * ng + g])), acc[r]);
    }
#else
    __m256i wa[4], wb[4];
    for (int f = 0; f < 4; ++f) {
      wa[f] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + f * 32)));
      wb[f] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + f * 32 + 16)));
    }
    const __m256 db = S16 ? _mm256_broadcast_ps(reinterpret_cast<const __m128*>(wd + g * 8 + 4)) : da;
    for (int r = 0; r < R; ++r) {
      const __m256i xa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + r * K + g * G));
      const __m256i xb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + r * K + g * G + 16));
      const __m256 sx = _mm256_set1_ps(dx[r * ng + g]);
      if (S16) {  // each half of the group with its own scale
        const __m256i ha = reduce4(_mm256_madd_epi16(wa[0], xa), _mm256_madd_epi16(wa[1], xa),
                                   _mm256_madd_epi16(wa[2], xa), _mm256_madd_epi16(wa[3], xa));
        const __m256i hb = reduce4(_mm256_madd_epi16(wb[0], xb), _mm256_madd_epi16(wb[1], xb),
                                   _mm256_madd_epi16(wb[2], xb), _mm256_madd_epi16(wb[3], xb));
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ha), _mm256_mul_ps(da, sx), acc[r]);
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hb), _mm256_mul_ps(db, sx), acc[r]);
      } else {
        __m256i p[4];
        for (int f = 0; f < 4; ++f) p[f] = _mm256_add_epi32(_mm256_madd_epi16(wa[f], xa), _mm256_madd_epi16(wb[f], xb));
        const __m256i h = reduce4(p[0], p[1], p[2], p[3]);
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(h), _mm256_mul_ps(da, sx), acc[r]);
      }
    }
#endif
  }
  for (int r = 0; r < R; ++r) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps(acc[r], 1));
    _mm_storeu_ps(out + r * N, s);
  }
}

template <bool S16>
inline void q8_rows(const int8_t* wq, const float* wd, int64_t ng, const QT* q, const float* dx, int64_t K, float* o,
                    int64_t N, int64_t M) {
  int64_t r = 0;
  for (; r + 4 <= M; r += 4) q8_tile<4, S16>(wq, wd, ng, q + r * K, dx + r * ng, K, o + r * N, N);
  switch (M - r) {
    case 3: q8_tile<3, S16>(wq, wd, ng, q + r * K, dx + r * ng, K, o + r * N, N); break;
    case 2: q8_tile<2, S16>(wq, wd, ng, q + r * K, dx + r * ng, K, o + r * N, N); break;
    case 1: q8_tile<1, S16>(wq, wd, ng, q + r * K, dx + r * ng, K, o + r * N, N); break;
    default: break;
  }
}
#endif

#if CLP_WIDE
// ---- 8-bit weights in tiles of 16 features, with AVX-512 VNNI (the wide layout of q4x16) ---
// qs (N/16, K/32, 512) int8: per group, for each pair of inputs (2k, 2k+1) 32 bytes, byte
// 2f + s = feature f's code of input 2k + s (sign-extended to int16, that is already the
// pair vector); scales (N/16, K/32, 16), or (N/16, K/32, 32) with a scale per 16 inputs
// (Q6_K: the 16 features' first halves, then their second halves).
template <int R, bool S16>
inline void q8x16_rows(const int8_t* wq, const float* wd, int64_t ng, const QT* q, const float* dx, int64_t K,
                       float* out, int64_t N) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < ng; ++g) {
    const int8_t* w = wq + g * 512;
    __m512i dot[R], dot2[R];
    for (int r = 0; r < R; ++r) dot[r] = dot2[r] = _mm512_setzero_si512();
    for (int k = 0; k < 16; ++k) {
      const __m512i wk = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k * 32)));
      for (int r = 0; r < R; ++r) {
        const __m512i x = _mm512_set1_epi32(reinterpret_cast<const int32_t*>(q + r * K + g * G)[k]);
        if (S16 && k >= 8)
          dot2[r] = _mm512_dpwssd_epi32(dot2[r], wk, x);
        else
          dot[r] = _mm512_dpwssd_epi32(dot[r], wk, x);
      }
    }
    const __m512 d = _mm512_loadu_ps(wd + g * (S16 ? 32 : 16));
    for (int r = 0; r < R; ++r) {
      const __m512 sx = _mm512_set1_ps(dx[r * ng + g]);
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r]), _mm512_mul_ps(d, sx), acc[r]);
      if (S16) {
        const __m512 d2 = _mm512_loadu_ps(wd + g * 32 + 16);
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot2[r]), _mm512_mul_ps(d2, sx), acc[r]);
      }
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(out + r * N, acc[r]);
}

// Two q8 tiles (32 features) against 8 rows: q8x16_rows with each broadcast input pair serving
// both tiles (as q4xT_rows does for q4); the same integer sums and float sequence per row and
// feature, the accumulators waiting in memory between groups: the same bits.
template <bool S16>
inline void q8x32_rows8(const int8_t* wq, const float* wd, int64_t tile_bytes, int64_t tile_floats, int64_t ng,
                        const QT* q, const float* dx, int64_t K, float* out, int64_t N) {
  constexpr int R = 8;
  alignas(64) float acc[2][R][16] = {};
  for (int64_t g = 0; g < ng; ++g) {
    __m512i dot[2][R], dot2[2][R];
    for (int u = 0; u < 2; ++u)
      for (int r = 0; r < R; ++r) dot[u][r] = dot2[u][r] = _mm512_setzero_si512();
    for (int k = 0; k < 16; ++k) {
      const __m512i wa = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq + g * 512 + k * 32)));
      const __m512i wb = _mm512_cvtepi8_epi16(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq + tile_bytes + g * 512 + k * 32)));
      for (int r = 0; r < R; ++r) {
        const __m512i x = _mm512_set1_epi32(reinterpret_cast<const int32_t*>(q + r * K + g * G)[k]);
        if (S16 && k >= 8) {
          dot2[0][r] = _mm512_dpwssd_epi32(dot2[0][r], wa, x);
          dot2[1][r] = _mm512_dpwssd_epi32(dot2[1][r], wb, x);
        } else {
          dot[0][r] = _mm512_dpwssd_epi32(dot[0][r], wa, x);
          dot[1][r] = _mm512_dpwssd_epi32(dot[1][r], wb, x);
        }
      }
    }
    for (int u = 0; u < 2; ++u) {
      const float* wdu = wd + u * tile_floats;
      const __m512 d = _mm512_loadu_ps(wdu + g * (S16 ? 32 : 16));
      for (int r = 0; r < R; ++r) {
        const __m512 sx = _mm512_set1_ps(dx[r * ng + g]);
        __m512 v = _mm512_load_ps(acc[u][r]);
        v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[u][r]), _mm512_mul_ps(d, sx), v);
        if (S16) {
          const __m512 d2 = _mm512_loadu_ps(wdu + g * 32 + 16);
          v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot2[u][r]), _mm512_mul_ps(d2, sx), v);
        }
        _mm512_store_ps(acc[u][r], v);
      }
    }
  }
  for (int u = 0; u < 2; ++u)
    for (int r = 0; r < R; ++r) _mm512_storeu_ps(out + r * N + u * 16, _mm512_load_ps(acc[u][r]));
}

template <bool S16>
void q8x16_tile(const int8_t* wq, const float* wd, int64_t ng, const QT* q, const float* dx, int64_t K, float* o,
                int64_t N, int64_t M) {
  int64_t r = 0;
  for (; r + 8 <= M; r += 8) q8x16_rows<8, S16>(wq, wd, ng, q + r * K, dx + r * ng, K, o + r * N, N);
  const QT* qr = q + r * K;
  const float* dr = dx + r * ng;
  float* orow = o + r * N;
  switch (M - r) {
    case 7: q8x16_rows<7, S16>(wq, wd, ng, qr, dr, K, orow, N); break;
    case 6: q8x16_rows<6, S16>(wq, wd, ng, qr, dr, K, orow, N); break;
    case 5: q8x16_rows<5, S16>(wq, wd, ng, qr, dr, K, orow, N); break;
    case 4: q8x16_rows<4, S16>(wq, wd, ng, qr, dr, K, orow, N); break;
    case 3: q8x16_rows<3, S16>(wq, wd, ng, qr, dr, K, orow, N); break;
    case 2: q8x16_rows<2, S16>(wq, wd, ng, qr, dr, K, orow, N); break;
    case 1: q8x16_rows<1, S16>(wq, wd, ng, qr, dr, K, orow, N); break;
    default: break;
  }
}
#endif

inline void q8_tile_scalar(const int8_t* wq, const float* wd, int64_t ng, const QT* q, const float* dx, float* out,
                           bool s16) {
  for (int f = 0; f < 4; ++f) {
    float acc = 0.f;
    for (int64_t g = 0; g < ng; ++g) {
      int64_t dot[2] = {0, 0};
      for (int j = 0; j < G; ++j) dot[j / 16] += int64_t(wq[g * 128 + f * 32 + j]) * q[g * G + j];
      if (s16) {
        acc += float(dot[0]) * (wd[g * 8 + f] * dx[g]);
        acc += float(dot[1]) * (wd[g * 8 + 4 + f] * dx[g]);
      } else {
        acc += float(dot[0] + dot[1]) * (wd[g * 4 + f] * dx[g]);
      }
    }
    out[f] = acc;
  }
}

torch::Tensor q8_linear(const torch::Tensor& x_in, const torch::Tensor& qs, const torch::Tensor& d,
                        const c10::optional<torch::Tensor>& bias, const c10::optional<torch::Tensor>& norm, double eps,
                        int64_t act, const c10::optional<torch::Tensor>& residual) {
  // qs: (N/4, K/32, 128) int8 tiles; d: (N/4, K/32, 4) fp32 scales per 32 weights, or
  // (N/4, K/32, 8) per 16 (Q6_K). bias, norm, act, residual as in q4_linear.
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == torch::kFloat, "q8_linear: x must be (M, K) float32");
  const int64_t width = qs.dim() == 3 && qs.size(2) == 512 ? 16 : 4;  // features per tile (16: the wide layout)
  TORCH_CHECK(qs.scalar_type() == torch::kChar && qs.dim() == 3 && qs.size(2) == width * 32,
              "q8_linear: qs must be (N/4, K/32, 128) or (N/16, K/32, 512) int8 tiles");
  TORCH_CHECK(width == 4 || CLP_WIDE, "q8_linear: the wide layout needs a build with AVX512_VNNI");
  TORCH_CHECK(act >= 0 && act <= 2 && !(act && norm.has_value()), "q8_linear: act is 0, 1 or 2, and not with norm");
  const auto x = x_in.contiguous();
  const int64_t M = x.size(0), K = act ? x.size(1) / 2 : x.size(1), tiles = qs.size(0), N = tiles * width, ng = K / G;
  const bool s16 = d.numel() == tiles * ng * width * 2;
  TORCH_CHECK(K % G == 0 && qs.size(1) == ng && (s16 || d.numel() == tiles * ng * width) && d.is_contiguous() &&
                  qs.is_contiguous(), "q8_linear: weight shapes do not match the input");
  auto out = torch::empty({M, N}, x.options());
  if (M == 0) return out;
  Scratch& sc = prepare_activations(x, M, K, norm, eps, act, "q8_linear");
  QT* qv = sc.q.data();
  float* dxv = sc.dx.data();
  const int8_t* W = qs.data_ptr<int8_t>();
  const float* D = d.data_ptr<float>();
  float* O = out.data_ptr<float>();
#if CLP_WIDE
  if (width == 16) {
    if (M >= 8) {  // tiles two at a time for the blocks of 8 rows (q8x32_rows8), the other rows by q8x16_tile
      const int64_t tb = ng * 512, tf = ng * (s16 ? 32 : 16);
      tile_pairs(
          tiles, M, 2,
          [&](int64_t t, int64_t r) {
            if (s16)
              q8x32_rows8<true>(W + t * tb, D + t * tf, tb, tf, ng, qv + r * K, dxv + r * ng, K, O + r * N + t * 16, N);
            else
              q8x32_rows8<false>(W + t * tb, D + t * tf, tb, tf, ng, qv + r * K, dxv + r * ng, K, O + r * N + t * 16, N);
          },
          [&](int64_t t, int64_t r, int64_t rows) {
            if (s16)
              q8x16_tile<true>(W + t * tb, D + t * tf, ng, qv + r * K, dxv + r * ng, K, O + r * N + t * 16, N, rows);
            else
              q8x16_tile<false>(W + t * tb, D + t * tf, ng, qv + r * K, dxv + r * ng, K, O + r * N + t * 16, N, rows);
          });
    } else
    at::parallel_for(0, tiles, 4, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int8_t* wq = W + t * ng * 512;
        const float* wd = D + t * ng * (s16 ? 32 : 16);
        if (s16)
          q8x16_tile<true>(wq, wd, ng, qv, dxv, K, O + t * 16, N, M);
        else
          q8x16_tile<false>(wq, wd, ng, qv, dxv, K, O + t * 16, N, M);
      }
    });
    if (bias.has_value() && bias->defined()) out.add_(*bias);
    if (residual.has_value() && residual->defined()) out.add_(*residual);
    return out;
  }
#endif
  at::parallel_for(0, tiles, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int8_t* wq = W + t * ng * 128;
      const float* wd = D + t * ng * (s16 ? 8 : 4);
      float* o = O + t * 4;
#if CLP_AVX2
      if (s16)
        q8_rows<true>(wq, wd, ng, qv, dxv, K, o, N, M);
      else
        q8_rows<false>(wq, wd, ng, qv, dxv, K, o, N, M);
#else
      for (int64_t r = 0; r < M; ++r) q8_tile_scalar(wq, wd, ng, qv + r * K, dxv + r * ng, o + r * N, s16);
#endif
    }
  });
  if (bias.has_value() && bias->defined()) out.add_(*bias);
  if (residual.has_value() && residual->defined()) out.add_(*residual);
  return out;
}

// ---- attention -------------------------------------------------------------------------------
constexpr int64_t CHUNK = 128;  // keys per work item, at fixed virtual positions

#if CLP_AVX2
template <typename KV>
inline __m256 load8(const KV* p);
template <>
inline __m256 load8<float>(const float* p) { return _mm256_loadu_ps(p); }
template <>
inline __m256 load8<at::Half>(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
#endif

template <typename KV>
inline float to_f(KV v) { return static_cast<float>(v); }

// Partial softmax-attention of one query over keys at `slots` (n of them): max, sum and the
// unnormalised weighted sum of values (hd floats).
template <typename KV>
void chunk_partial(const float* q, const KV* K, const KV* V, const int64_t* slots, int64_t n, int64_t hd,
                   float scale, float* scores, float* m_out, float* s_out, float* acc) {
#if CLP_AVX2
  if (hd % 8 == 0 && hd <= 512) {
    const int64_t nb = hd / 8;  // 8-float blocks of a head
    // Scores four keys at a time: four independent FMA chains.
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
      const KV *k0 = K + slots[j] * hd, *k1 = K + slots[j + 1] * hd, *k2 = K + slots[j + 2] * hd,
               *k3 = K + slots[j + 3] * hd;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t c = 0; c < nb; ++c) {
        const __m256 qc = _mm256_loadu_ps(q + c * 8);
        a0 = _mm256_fmadd_ps(qc, load8<KV>(k0 + c * 8), a0);
        a1 = _mm256_fmadd_ps(qc, load8<KV>(k1 + c * 8), a1);
        a2 = _mm256_fmadd_ps(qc, load8<KV>(k2 + c * 8), a2);
        a3 = _mm256_fmadd_ps(qc, load8<KV>(k3 + c * 8), a3);
      }
      // [a0 a1 a2 a3] -> 4 sums.
      const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
      const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
      _mm_storeu_ps(scores + j, _mm_mul_ps(s4, _mm_set1_ps(scale)));
    }
    for (; j < n; ++j) {  // the last 0-3 keys, one at a time (same for every row that has them)
      const KV* k = K + slots[j] * hd;
      __m256 a = _mm256_setzero_ps();
      for (int64_t c = 0; c < nb; ++c) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + c * 8), load8<KV>(k + c * 8), a);
      scores[j] = hsum(a) * scale;
    }
    __m256 m8 = _mm256_set1_ps(-std::numeric_limits<float>::infinity());  // exact in any order
    int64_t t = 0;
    for (; t + 8 <= n; t += 8) m8 = _mm256_max_ps(m8, _mm256_loadu_ps(scores + t));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    float mx = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
    for (; t < n; ++t) mx = std::max(mx, scores[t]);
    j = 0;
    __m256 sv = _mm256_setzero_ps();
    const __m256 mv = _mm256_set1_ps(mx);
    for (; j + 8 <= n; j += 8) {
      const __m256 p = exp256(_mm256_sub_ps(_mm256_loadu_ps(scores + j), mv));
      _mm256_storeu_ps(scores + j, p);
      sv = _mm256_add_ps(sv, p);
    }
    float s = hsum(sv);
    for (; j < n; ++j) {
      scores[j] = std::exp(scores[j] - mx);
      s += scores[j];
    }
    // Values: up to eight independent accumulators (8 dims each) per pass over the keys.
    for (int64_t c0 = 0; c0 < nb; c0 += 8) {
      const int64_t cn = std::min<int64_t>(8, nb - c0);
      __m256 o[8];
      for (int c = 0; c < 8; ++c) o[c] = _mm256_setzero_ps();
      for (int64_t t = 0; t < n; ++t) {
        const __m256 p = _mm256_set1_ps(scores[t]);
        const KV* v = V + slots[t] * hd + c0 * 8;
        for (int c = 0; c < cn; ++c) o[c] = _mm256_fmadd_ps(p, load8<KV>(v + c * 8), o[c]);
      }
      for (int c = 0; c < cn; ++c) _mm256_storeu_ps(acc + (c0 + c) * 8, o[c]);
    }
    *m_out = mx;
    *s_out = s;
    return;
  }
#endif
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) {
    const KV* k = K + slots[j] * hd;
    float a = 0.f;
    for (int64_t c = 0; c < hd; ++c) a += q[c] * to_f(k[c]);
    scores[j] = a * scale;
    mx = std::max(mx, scores[j]);
  }
  float s = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    scores[j] = std::exp(scores[j] - mx);
    s += scores[j];
  }
  for (int64_t c = 0; c < hd; ++c) acc[c] = 0.f;
  for (int64_t t = 0; t < n; ++t)
    for (int64_t c = 0; c < hd; ++c) acc[c] += scores[t] * to_f(V[slots[t] * hd + c]);
  *m_out = mx;
  *s_out = s;
}

// Where a step's rows sit: row i belongs to cache slot `slot[i]`, writes its key and value at
// position `write[i]` of that slot, and sees the slot's keys [0, prefix[i]) before the step.
// Of the step's own keys it sees those of the rows j allowed by `mask` (T, T) (default: the
// rows j <= i of its own slot). One stream is slot 0, write L + i, prefix L.
struct StepRows {
  int64_t T = 0;
  std::vector<int64_t> slot, write, prefix;
  std::vector<std::vector<int64_t>> tail;  // per row: the step keys it sees, as slot positions, in step order

  StepRows(int64_t T_, const int64_t* slot_, const int64_t* write_, const int64_t* prefix_, const bool* mask)
      : T(T_), slot(slot_, slot_ + T_), write(write_, write_ + T_), prefix(prefix_, prefix_ + T_), tail(T_) {
    for (int64_t i = 0; i < T; ++i)
      for (int64_t j = 0; j < T; ++j)
        if (mask ? mask[i * T + j] : (j <= i && slot[j] == slot[i])) tail[i].push_back(write[j]);
  }
  // One stream: slot 0, rows at L, L + 1, ...
  static StepRows single(int64_t T, int64_t L, const bool* mask) {
    std::vector<int64_t> zero(T, 0), write(T), prefix(T, L);
    for (int64_t i = 0; i < T; ++i) write[i] = L + i;
    return StepRows(T, zero.data(), write.data(), prefix.data(), mask);
  }
};

const bool* mask_data(const c10::optional<torch::Tensor>& step_mask, int64_t T, torch::Tensor& holder,
                      const char* op) {
  if (!step_mask.has_value() || !step_mask->defined()) return nullptr;
  holder = step_mask->to(torch::kBool).contiguous();
  TORCH_CHECK(holder.dim() == 2 && holder.size(0) == T && holder.size(1) == T, op, ": step_mask must be (T, T)");
  return holder.data_ptr<bool>();
}

#if defined(__AVX512F__) && CLP_AVX2
// ---- attention with AVX-512: the heads that share a K/V head, together ----------------------
// One pass over a chunk's keys serves every query head of the group: each key and value row is
// loaded (and widened from fp16) once for all of them, scores come four keys at a time without
// a horizontal sum per key, and each head's value sums stay in registers. What a head computes
// depends only on its query and its keys, so a row's result is the same whatever shares the
// step (the row-invariance that keeps verification exact).
template <typename KV>
inline __m512 load16(const KV* p);
template <>
inline __m512 load16<float>(const float* p) { return _mm512_loadu_ps(p); }
template <>
inline __m512 load16<at::Half>(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

inline __m512 exp512(__m512 x) {  // exp256's polynomial on 16 lanes
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.3f));
  __m512 fx = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), x);
  __m512 y = _mm512_set1_ps(1.9875691500E-4f);
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507E-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073E-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894E-2f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459E-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201E-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.f)));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(fx), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(y, _mm512_castsi512_ps(e));
}

// Four 16-lane sums -> their four totals.
inline __m128 sum4x16(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  auto half = [](__m512 a) {
    return _mm256_add_ps(_mm512_castps512_ps256(a), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
  };
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(half(a0), half(a1)), _mm256_hadd_ps(half(a2), half(a3)));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// The partials of G query heads (q: G rows of hd, contiguous) over the same n keys: per head
// g, its max m[g * ms], sum s[g * ms] and unnormalised value sum acc[g * as .. + hd].
template <typename KV, int G>
void chunk_partial_heads(const float* q, const KV* K, const KV* V, const int64_t* keys, int64_t n, int64_t hd,
                         float scale, float* scores, float* m_out, float* s_out, float* acc, int64_t ms, int64_t as) {
  const int64_t nb = hd / 16;
  float* sc[G];
  for (int g = 0; g < G; ++g) sc[g] = scores + g * CHUNK;
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const KV *k0 = K + keys[j] * hd, *k1 = K + keys[j + 1] * hd, *k2 = K + keys[j + 2] * hd,
             *k3 = K + keys[j + 3] * hd;
    __m512 a[G][4];
    for (int g = 0; g < G; ++g)
      for (int r = 0; r < 4; ++r) a[g][r] = _mm512_setzero_ps();
    for (int64_t c = 0; c < nb; ++c) {
      const __m512 x0 = load16<KV>(k0 + c * 16), x1 = load16<KV>(k1 + c * 16), x2 = load16<KV>(k2 + c * 16),
                   x3 = load16<KV>(k3 + c * 16);
      for (int g = 0; g < G; ++g) {
        const __m512 qc = _mm512_loadu_ps(q + g * hd + c * 16);
        a[g][0] = _mm512_fmadd_ps(qc, x0, a[g][0]);
        a[g][1] = _mm512_fmadd_ps(qc, x1, a[g][1]);
        a[g][2] = _mm512_fmadd_ps(qc, x2, a[g][2]);
        a[g][3] = _mm512_fmadd_ps(qc, x3, a[g][3]);
      }
    }
    for (int g = 0; g < G; ++g)
      _mm_storeu_ps(sc[g] + j, _mm_mul_ps(sum4x16(a[g][0], a[g][1], a[g][2], a[g][3]), _mm_set1_ps(scale)));
  }
  for (; j < n; ++j) {  // the last 0-3 keys one at a time (the same for every row that has them)
    const KV* k = K + keys[j] * hd;
    __m512 a[G];
    for (int g = 0; g < G; ++g) a[g] = _mm512_setzero_ps();
    for (int64_t c = 0; c < nb; ++c) {
      const __m512 x = load16<KV>(k + c * 16);
      for (int g = 0; g < G; ++g) a[g] = _mm512_fmadd_ps(_mm512_loadu_ps(q + g * hd + c * 16), x, a[g]);
    }
    for (int g = 0; g < G; ++g) sc[g][j] = _mm512_reduce_add_ps(a[g]) * scale;
  }
  // Softmax numerators per head: exp(score - max), 16 at a time.
  float mx[G], sum[G];
  for (int g = 0; g < G; ++g) {
    // The max 16 lanes at a time (a scalar max is a chain of dependent instructions; the
    // maximum is exact, so the order does not matter).
    __m512 m16 = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    int64_t t0 = 0;
    for (; t0 + 16 <= n; t0 += 16) m16 = _mm512_max_ps(m16, _mm512_loadu_ps(sc[g] + t0));
    float m = _mm512_reduce_max_ps(m16);
    for (; t0 < n; ++t0) m = std::max(m, sc[g][t0]);
    const __m512 mv = _mm512_set1_ps(m);
    __m512 sv = _mm512_setzero_ps();
    int64_t t = 0;
    for (; t + 16 <= n; t += 16) {
      const __m512 p = exp512(_mm512_sub_ps(_mm512_loadu_ps(sc[g] + t), mv));
      _mm512_storeu_ps(sc[g] + t, p);
      sv = _mm512_add_ps(sv, p);
    }
    float s = _mm512_reduce_add_ps(sv);
    for (; t < n; ++t) {
      sc[g][t] = std::exp(sc[g][t] - m);
      s += sc[g][t];
    }
    mx[g] = m;
    sum[g] = s;
  }
  // Values: four 16-dim blocks of every head at a time (a fixed count, so that the sums stay
  // in registers), each value row widened once; then any last blocks one at a time.
  int64_t c0 = 0;
  for (; c0 + 4 <= nb; c0 += 4) {
    __m512 o[G][4];
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < 4; ++c) o[g][c] = _mm512_setzero_ps();
    for (int64_t t = 0; t < n; ++t) {
      const KV* v = V + keys[t] * hd + c0 * 16;
      const __m512 x0 = load16<KV>(v), x1 = load16<KV>(v + 16), x2 = load16<KV>(v + 32), x3 = load16<KV>(v + 48);
      for (int g = 0; g < G; ++g) {
        const __m512 p = _mm512_set1_ps(sc[g][t]);
        o[g][0] = _mm512_fmadd_ps(p, x0, o[g][0]);
        o[g][1] = _mm512_fmadd_ps(p, x1, o[g][1]);
        o[g][2] = _mm512_fmadd_ps(p, x2, o[g][2]);
        o[g][3] = _mm512_fmadd_ps(p, x3, o[g][3]);
      }
    }
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < 4; ++c) _mm512_storeu_ps(acc + g * as + (c0 + c) * 16, o[g][c]);
  }
  for (; c0 < nb; ++c0) {
    __m512 o[G];
    for (int g = 0; g < G; ++g) o[g] = _mm512_setzero_ps();
    for (int64_t t = 0; t < n; ++t) {
      const __m512 x = load16<KV>(V + keys[t] * hd + c0 * 16);
      for (int g = 0; g < G; ++g) o[g] = _mm512_fmadd_ps(_mm512_set1_ps(sc[g][t]), x, o[g]);
    }
    for (int g = 0; g < G; ++g) _mm512_storeu_ps(acc + g * as + c0 * 16, o[g]);
  }
  for (int g = 0; g < G; ++g) {
    m_out[g * ms] = mx[g];
    s_out[g * ms] = sum[g];
  }
}

// Whether chunk_partial_heads serves a group of this size and head size.
inline bool heads_kernel(int64_t group, int64_t hd) { return group >= 1 && group <= 4 && hd % 16 == 0; }

template <typename KV>
void chunk_partial_group(int64_t group, const float* q, const KV* K, const KV* V, const int64_t* keys, int64_t n,
                         int64_t hd, float scale, float* scores, float* m_out, float* s_out, float* acc, int64_t ms,
                         int64_t as) {
  switch (group) {
    case 1: chunk_partial_heads<KV, 1>(q, K, V, keys, n, hd, scale, scores, m_out, s_out, acc, ms, as); break;
    case 2: chunk_partial_heads<KV, 2>(q, K, V, keys, n, hd, scale, scores, m_out, s_out, acc, ms, as); break;
    case 3: chunk_partial_heads<KV, 3>(q, K, V, keys, n, hd, scale, scores, m_out, s_out, acc, ms, as); break;
    default: chunk_partial_heads<KV, 4>(q, K, V, keys, n, hd, scale, scores, m_out, s_out, acc, ms, as); break;
  }
}
#else
inline bool heads_kernel(int64_t, int64_t) { return false; }
#endif

template <typename KV>
torch::Tensor attention_impl(const torch::Tensor& q, const torch::Tensor& kc, const torch::Tensor& vc,
                             const StepRows& rows, double scale, int64_t window) {
  // q: (T, n_heads, hd) fp32; kc, vc: (slots, n_kv, capacity, hd) with the step's keys already
  // written (rows.write); window > 0: a row sees only its last `window` keys (sliding-window layers).
  const int64_t T = q.size(0), nh = q.size(1), hd = q.size(2), nslots = kc.dim() == 4 ? kc.size(0) : 1,
                nkv = kc.size(-3), cap = kc.size(-2);
  TORCH_CHECK(nh % nkv == 0, "decode_attention: heads not a multiple of K/V heads");
  TORCH_CHECK(window >= 0, "decode_attention: window must be >= 0");
  const int64_t group = nh / nkv;
  // Each row's keys as a virtual sequence: its slot's [0, prefix), then the step keys it sees
  // in step order (for a chain: exactly a one-token step at its position would see); a window
  // keeps the last `window` of them. Chunks sit at fixed virtual positions, so a row's
  // arithmetic depends on its own keys only: not on the other rows, their slots or the threads.
  std::vector<int64_t> first(T), count(T);
  int64_t max_keys = 0;
  for (int64_t i = 0; i < T; ++i) {
    TORCH_CHECK(rows.slot[i] >= 0 && rows.slot[i] < nslots, "decode_attention: a row's slot is not in the cache");
    count[i] = rows.prefix[i] + (int64_t)rows.tail[i].size();
    TORCH_CHECK(rows.prefix[i] >= 0 && rows.prefix[i] <= cap, "decode_attention: prefix past the cache");
    for (int64_t p : rows.tail[i]) TORCH_CHECK(p >= 0 && p < cap, "decode_attention: the step's keys are past the cache");
    first[i] = window > 0 ? std::max<int64_t>(0, count[i] - window) : 0;
    max_keys = std::max(max_keys, count[i]);
  }
  const int64_t nchunks = std::max<int64_t>(1, (max_keys + CHUNK - 1) / CHUNK);
  // Work items (row, K/V head, chunk), the rows of one slot side by side so that they share
  // each chunk of keys while it is in cache.
  std::vector<int64_t> order(T);
  for (int64_t i = 0; i < T; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return rows.slot[a] < rows.slot[b]; });
  std::vector<std::array<int64_t, 3>> items;
  for (int64_t lo = 0; lo < T;) {
    int64_t hi = lo;
    while (hi < T && rows.slot[order[hi]] == rows.slot[order[lo]]) ++hi;
    for (int64_t kvh = 0; kvh < nkv; ++kvh)
      for (int64_t c = 0; c < nchunks; ++c)
        for (int64_t r = lo; r < hi; ++r) {
          const int64_t i = order[r];
          if (c * CHUNK < count[i] && (c + 1) * CHUNK > first[i]) items.push_back({i, kvh, c});
        }
    lo = hi;
  }
  // Partials per (row, head, chunk): max, sum, acc[hd].
  std::vector<float> pm(T * nh * nchunks), ps(T * nh * nchunks), pacc(T * nh * nchunks * hd);
  const float* Q = q.data_ptr<float>();
  const KV* Kb = kc.data_ptr<KV>();
  const KV* Vb = vc.data_ptr<KV>();
  const bool grouped = heads_kernel(group, hd);
  at::parallel_for(0, (int64_t)items.size(), 1, [&](int64_t b, int64_t e) {
    std::vector<int64_t> keys(CHUNK);
    std::vector<float> scores(CHUNK * std::max<int64_t>(group, 1));
    for (int64_t it = b; it < e; ++it) {
      const int64_t i = items[it][0], kvh = items[it][1], c = items[it][2];
      const KV* K = Kb + (rows.slot[i] * nkv + kvh) * cap * hd;
      const KV* V = Vb + (rows.slot[i] * nkv + kvh) * cap * hd;
      const int64_t L = rows.prefix[i];
      const int64_t lo = std::max(c * CHUNK, first[i]), hi = std::min(count[i], (c + 1) * CHUNK);
      for (int64_t v = lo; v < hi; ++v) keys[v - lo] = v < L ? v : rows.tail[i][v - L];
#if defined(__AVX512F__) && CLP_AVX2
      if (grouped) {
        const int64_t idx = (i * nh + kvh * group) * nchunks + c;  // the group's first head
        chunk_partial_group<KV>(group, Q + (i * nh + kvh * group) * hd, K, V, keys.data(), hi - lo, hd, (float)scale,
                                scores.data(), &pm[idx], &ps[idx], &pacc[idx * hd], nchunks, nchunks * hd);
        continue;
      }
#endif
      for (int64_t g = 0; g < group; ++g) {
        const int64_t h = kvh * group + g;
        const int64_t idx = (i * nh + h) * nchunks + c;
        chunk_partial<KV>(Q + (i * nh + h) * hd, K, V, keys.data(), hi - lo, hd, (float)scale, scores.data(),
                          &pm[idx], &ps[idx], &pacc[idx * hd]);
      }
    }
  });
  auto out = torch::empty({T, nh, hd}, q.options());
  float* O = out.data_ptr<float>();
  // Merge the chunks of each (row, head) in chunk order.
  at::parallel_for(0, T * nh, 4, [&](int64_t b, int64_t e) {
    std::vector<float> acc(hd);
    for (int64_t rh = b; rh < e; ++rh) {
      const int64_t i = rh / nh;
      float m = -std::numeric_limits<float>::infinity(), s = 0.f;
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t c = first[i] / CHUNK; c * CHUNK < count[i]; ++c) {
        const int64_t idx = rh * nchunks + c;
        const float mc = pm[idx];
        const float nm = std::max(m, mc);
        const float a = std::exp(m - nm), bb = std::exp(mc - nm);
        s = s * a + ps[idx] * bb;
        for (int64_t d = 0; d < hd; ++d) acc[d] = acc[d] * a + pacc[idx * hd + d] * bb;
        m = nm;
      }
      const float inv = 1.f / s;
      for (int64_t d = 0; d < hd; ++d) O[rh * hd + d] = acc[d] * inv;
    }
  });
  return out;
}

torch::Tensor attention_rows(const torch::Tensor& q_in, const torch::Tensor& kc, const torch::Tensor& vc,
                             const StepRows& rows, double scale, int64_t window) {
  TORCH_CHECK(q_in.dim() == 3 && q_in.scalar_type() == torch::kFloat, "decode_attention: q must be (T, H, hd) float32");
  TORCH_CHECK((kc.dim() == 4 || kc.dim() == 3) && vc.dim() == kc.dim() && kc.is_contiguous() && vc.is_contiguous(),
              "decode_attention: caches must be contiguous ([slots,] n_kv, capacity, hd)");
  TORCH_CHECK(kc.scalar_type() == vc.scalar_type(), "decode_attention: K and V dtypes differ");
  const auto q = q_in.contiguous();
  if (kc.scalar_type() == torch::kFloat) return attention_impl<float>(q, kc, vc, rows, scale, window);
  TORCH_CHECK(kc.scalar_type() == torch::kHalf, "decode_attention: cache must be float32 or float16");
  return attention_impl<at::Half>(q, kc, vc, rows, scale, window);
}

torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& kc, const torch::Tensor& vc, int64_t L,
                               const c10::optional<torch::Tensor>& step_mask, double scale, int64_t window) {
  // One stream: kc, vc (n_kv, capacity, hd) with the step's keys at [L, L + T).
  TORCH_CHECK(kc.dim() == 3 && vc.dim() == 3, "decode_attention: caches must be (n_kv, capacity, hd)");
  torch::Tensor holder;
  const auto rows = StepRows::single(q.size(0), L, mask_data(step_mask, q.size(0), holder, "decode_attention"));
  return attention_rows(q, kc, vc, rows, scale, window);
}

// ---- RMSNorm ---------------------------------------------------------------------------------------
torch::Tensor rms_norm(const torch::Tensor& x_in, const torch::Tensor& w_in, double eps,
                       const c10::optional<torch::Tensor>& residual) {
  // (M, K) fp32 rows, each scaled to unit RMS and by w (the arithmetic the linears fuse),
  // plus residual (M, K) when given.
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == torch::kFloat, "rms_norm: x must be (M, K) float32");
  const auto x = x_in.contiguous();
  const auto w = w_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(w.scalar_type() == torch::kFloat && w.numel() == K, "rms_norm: weight must be (K,) float32");
  auto out = torch::empty_like(x);
  const float *X = x.data_ptr<float>(), *W = w.data_ptr<float>();
  float* O = out.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) input_row(X + r * K, K, W, (float)eps, ACT_NONE, O + r * K);
  });
  if (residual.has_value() && residual->defined()) out.add_(*residual);
  return out;
}

// ---- rotary + cache write ----------------------------------------------------------------------
template <typename KV>
void store_row(KV* dst, const float* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = KV(src[i]);
}

torch::Tensor rope_store_rows(const torch::Tensor& qkv_in, const torch::Tensor& cos_in, const torch::Tensor& sin_in,
                              torch::Tensor& kc, torch::Tensor& vc, const StepRows& rows, int64_t nh,
                              const c10::optional<torch::Tensor>& q_norm, const c10::optional<torch::Tensor>& k_norm,
                              double eps) {
  // qkv: (T, (nh + 2 nkv) hd) fp32; cos, sin: (T, hd), each row's at its rotary position, with
  // sin's first half negated (so that rotate_half(x) * sin = roll(x, hd / 2) * sin); kc, vc:
  // ([slots,] nkv, capacity, hd). q_norm, k_norm: optional (hd,) RMSNorm weights applied to every
  // query / key head before the rotation (Gemma 3). Rotates the queries and keys, writes each
  // row's key and value at its slot's position rows.write, returns the queries (T, nh, hd).
  const auto qkv = qkv_in.contiguous();
  const auto cs = cos_in.contiguous(), sn = sin_in.contiguous();
  const int64_t T = qkv.size(0), nslots = kc.dim() == 4 ? kc.size(0) : 1, nkv = kc.size(-3), cap = kc.size(-2),
                hd = kc.size(-1), half = hd / 2;
  TORCH_CHECK(qkv.size(1) == (nh + 2 * nkv) * hd, "rope_store: qkv width does not match the heads");
  TORCH_CHECK(kc.is_contiguous() && vc.is_contiguous(), "rope_store: the cache must be contiguous");
  TORCH_CHECK(cs.size(0) == T && cs.size(1) == hd && sn.size(0) == T && sn.size(1) == hd, "rope_store: cos/sin shape");
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(rows.slot[t] >= 0 && rows.slot[t] < nslots && rows.write[t] >= 0 && rows.write[t] < cap,
                "rope_store: a row's slot or position is past the cache");
  auto q = torch::empty({T, nh, hd}, qkv.options());
  const float *X = qkv.data_ptr<float>(), *C = cs.data_ptr<float>(), *S = sn.data_ptr<float>();
  float* Q = q.data_ptr<float>();
  torch::Tensor qn, kn;
  if (q_norm.has_value() && q_norm->defined()) qn = q_norm->contiguous();
  if (k_norm.has_value() && k_norm->defined()) kn = k_norm->contiguous();
  TORCH_CHECK((!qn.defined() || qn.numel() == hd) && (!kn.defined() || kn.numel() == hd), "rope_store: norm shape");
  // Rows in parallel (a prompt chunk has many; each row writes only its own cache positions),
  // the same arithmetic per element whatever the split.
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    std::vector<float> tmp(hd), normed(hd);
    for (int64_t t = t0; t < t1; ++t) {
      const float *c = C + t * hd, *s = S + t * hd, *row = X + t * qkv.size(1);
      const int64_t base = rows.slot[t] * nkv * cap + rows.write[t];  // (slot, kvh = 0, position)
      for (int64_t h = 0; h < nh + nkv; ++h) {
        const float* x = row + h * hd;
        const torch::Tensor& nw = h < nh ? qn : kn;
        if (nw.defined()) {
          input_row(x, hd, nw.data_ptr<float>(), (float)eps, ACT_NONE, normed.data());
          x = normed.data();
        }
        float* dst = h < nh ? Q + (t * nh + h) * hd : tmp.data();
        // x * cos + roll(x, hd / 2) * sin, in two halves (no index wrap: the loops vectorise)
        for (int64_t i = 0; i < half; ++i) dst[i] = x[i] * c[i] + x[i + half] * s[i];
        for (int64_t i = half; i < hd; ++i) dst[i] = x[i] * c[i] + x[i - half] * s[i];
        if (h >= nh) {
          const int64_t at = (base + (h - nh) * cap) * hd;
          if (kc.scalar_type() == torch::kHalf)
            store_row(kc.data_ptr<at::Half>() + at, tmp.data(), hd);
          else
            store_row(kc.data_ptr<float>() + at, tmp.data(), hd);
        }
      }
      for (int64_t kvh = 0; kvh < nkv; ++kvh) {
        const float* v = row + (nh + nkv + kvh) * hd;
        const int64_t at = (base + kvh * cap) * hd;
        if (vc.scalar_type() == torch::kHalf)
          store_row(vc.data_ptr<at::Half>() + at, v, hd);
        else
          store_row(vc.data_ptr<float>() + at, v, hd);
      }
    }
  });
  return q;
}

torch::Tensor rope_store(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                         torch::Tensor& kc, torch::Tensor& vc, int64_t start, int64_t nh,
                         const c10::optional<torch::Tensor>& q_norm, const c10::optional<torch::Tensor>& k_norm,
                         double eps) {
  // One stream: kc, vc (nkv, capacity, hd); the step's rows go to [start, start + T).
  TORCH_CHECK(kc.dim() == 3 && vc.dim() == 3, "rope_store: caches must be (nkv, capacity, hd)");
  return rope_store_rows(qkv, cos, sin, kc, vc, StepRows::single(qkv.size(0), start, nullptr), nh, q_norm, k_norm, eps);
}

// ---- prompt rows on AMX-BF16 (clp::dense_linear) -----------------------------------------------
// A prompt's rows are many and arrive together: there the tile unit pays. Where the CPU has
// AMX-BF16, a prompt's rows (never a decode step's) run y = op(x) W^T on tiles, with W the
// linear's dequantised weights rounded once to bf16 and op(x) rounded to bf16 per row, fp32
// sums (TDPBF16PS). Each 16 x 16 output tile sums its K blocks in one fixed order, and a row
// only ever meets its own activations, so a row's result does not depend on the other rows,
// on how a prompt is cut into chunks, or on the thread count: a request's text stays the same
// under any load. It is not the q4 kernels' result (a prompt row's hidden state moves by
// ~0.5% against the q4 path): prompts always take this path on such a machine, in one stream
// as in a batch, and decode rows never do, so verified still equals AR token for token.
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__linux__)
#define CLP_AMX_BF16 1
#include <sys/syscall.h>
#include <unistd.h>

// Linux hands out the tile state only on request (arch_prctl), once per process.
bool amx_permitted() {
  static const bool ok = [] {
    if (std::getenv("CLP_NO_AMX") != nullptr) return false;
    constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  }();
  return ok;
}

// Every tile 16 rows x 64 bytes: tiles 0..3 fp32 sums (row block 0/1 x feature tile 0/1),
// 4, 5 two row blocks of activations (16 rows x 32 bf16), 6, 7 two feature tiles of weights
// (16 pairs of inputs x 16 features x 2 bf16: AMX's B layout).
void dense_configure() {
  struct alignas(64) {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
  } c;
  for (int t = 0; t < 8; ++t) c.rows[t] = 16, c.colsb[t] = 64;
  _tile_loadconfig(&c);
}

// RB row blocks x NB feature tiles of sums over kb blocks of 32 inputs. a: the first row
// block's activations, packed as the weights are (512 bf16 per block of 16 rows x 32 inputs,
// so that a tile load reads 1 KB in a row); b0, b1: the feature tiles' packed weights (512
// bf16 per block of 32 inputs); c: fp32 out (row stride ldc).
template <int RB, int NB>
void dense_tiles(const uint16_t* a, const uint16_t* b0, const uint16_t* b1, int64_t kb, float* c, int64_t ldc) {
  _tile_zero(0);
  if (NB > 1) _tile_zero(1);
  if (RB > 1) _tile_zero(2);
  if (RB > 1 && NB > 1) _tile_zero(3);
  for (int64_t k = 0; k < kb; ++k) {
    _tile_loadd(4, a + k * 512, 64);
    if (RB > 1) _tile_loadd(5, a + (kb + k) * 512, 64);
    _tile_loadd(6, b0 + k * 512, 64);
    if (NB > 1) _tile_loadd(7, b1 + k * 512, 64);
    _tile_dpbf16ps(0, 4, 6);
    if (NB > 1) _tile_dpbf16ps(1, 4, 7);
    if (RB > 1) _tile_dpbf16ps(2, 5, 6);
    if (RB > 1 && NB > 1) _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c, ldc * 4);
  if (NB > 1) _tile_stored(1, c + 16, ldc * 4);
  if (RB > 1) _tile_stored(2, c + 16 * ldc, ldc * 4);
  if (RB > 1 && NB > 1) _tile_stored(3, c + 16 * ldc + 16, ldc * 4);
}
#else
#define CLP_AMX_BF16 0
bool amx_permitted() { return false; }
#endif

// x: (M, K') fp32 (K' = K, or 2K for act); w: (N / 16, K / 32, 16, 32) bf16, packed by
// quant.pack_dense; returns (M, N) fp32 = op(x) W^T (+ bias) (+ residual).
torch::Tensor dense_linear(const torch::Tensor& x_in, const torch::Tensor& w, const c10::optional<torch::Tensor>& bias,
                           const c10::optional<torch::Tensor>& norm, double eps, int64_t act,
                           const c10::optional<torch::Tensor>& residual) {
  TORCH_CHECK(CLP_AMX_BF16 && amx_permitted(), "dense_linear: this CPU (or process) has no AMX-BF16 tiles");
  TORCH_CHECK(w.scalar_type() == torch::kBFloat16 && w.dim() == 4 && w.size(2) == 16 && w.size(3) == 32 &&
                  w.is_contiguous(), "dense_linear: weights must be packed (N/16, K/32, 16, 32) bf16");
  const auto x = x_in.contiguous();
  const int64_t M = x.size(0), N = w.size(0) * 16, K = w.size(1) * 32, Mp = (M + 15) / 16 * 16;
  TORCH_CHECK(x.size(1) == (act == ACT_NONE ? K : 2 * K), "dense_linear: input width does not match the weights");
  auto out = torch::empty({Mp, N}, x.options());
#if CLP_AMX_BF16
  const float* nw = norm.has_value() && norm->defined() ? norm->data_ptr<float>() : nullptr;
  const int64_t kb = K / 32, ftiles = N / 16, rblocks = Mp / 16;
  // The rows as AMX reads them: bf16, (row block, block of 32 inputs, 16 rows, 32), padded
  // with zero rows.
  std::vector<uint16_t> a(Mp * K, 0);
  const float* X = x.data_ptr<float>();
  at::parallel_for(0, M, 1, [&](int64_t b, int64_t e) {
    std::vector<float> row(K);
    for (int64_t r = b; r < e; ++r) {
      input_row(X + r * x.size(1), K, nw, (float)eps, act, row.data());
      uint16_t* dst = a.data() + (r / 16) * kb * 512 + (r % 16) * 32;
      for (int64_t j = 0; j < K; j += 16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + (j / 32) * 512 + j % 32),
                            (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(row.data() + j)));
    }
  });
  const uint16_t* W = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  float* O = out.data_ptr<float>();
  at::parallel_for(0, (ftiles + 1) / 2, 1, [&](int64_t p0, int64_t p1) {
    dense_configure();
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t f = 2 * p;
      const uint16_t *b0 = W + f * kb * 512, *b1 = b0 + kb * 512;
      const bool two = f + 1 < ftiles;
      for (int64_t r = 0; r < rblocks; r += 2) {
        const uint16_t* ar = a.data() + r * kb * 512;
        float* c = O + r * 16 * N + f * 16;
        if (r + 1 < rblocks)
          two ? dense_tiles<2, 2>(ar, b0, b1, kb, c, N) : dense_tiles<2, 1>(ar, b0, b1, kb, c, N);
        else
          two ? dense_tiles<1, 2>(ar, b0, b1, kb, c, N) : dense_tiles<1, 1>(ar, b0, b1, kb, c, N);
      }
    }
    _tile_release();
  });
#endif
  out = out.narrow(0, 0, M);
  if (bias.has_value() && bias->defined()) out.add_(*bias);
  if (residual.has_value() && residual->defined()) out.add_(*residual);
  return out;
}

// ---- a whole decode step's layers in one call --------------------------------------------------
// The batch-1 step of LeanForward._forward_native, looped here instead of in Python: the same
// kernels, called as C++ functions (no dispatcher, no interpreter between them), so the result
// is bit-identical and ~180 op calls a step cost nothing. The model arrives flattened:
//   parts: per projection part, 4 tensors (qs, d, m or undefined, bias or undefined) and a
//          kind (0: 4-bit groups, 1: 8-bit groups; absent tensors are empty, numel 0);
//          op_parts: how many parts each of a layer's
//          4 ops (qkv, o, gate_up, down) has (several: side by side, outputs concatenated);
//   norms: 6 per layer (in, mlp, attn_out, mlp_out, q, k; undefined where absent), eps: 5 per
//          layer (in, mlp, attn_out, mlp_out, qk); rope: the layer's index into cos/sin;
//          windows: 0 or the sliding window; act: 1 SiLU, 2 tanh-GELU.
// Returns [hidden after the final norm, then the inputs of each aux layer].
torch::Tensor linear_part(const torch::Tensor& x, const std::vector<torch::Tensor>& parts, const std::vector<int64_t>& kinds,
                          int64_t first, int64_t count, const c10::optional<torch::Tensor>& norm, double eps, int64_t act,
                          const c10::optional<torch::Tensor>& residual) {
  std::vector<torch::Tensor> outs;
  for (int64_t i = first; i < first + count; ++i) {
    const auto& qs = parts[4 * i];
    const auto& d = parts[4 * i + 1];
    const auto& m = parts[4 * i + 2];
    const auto& b = parts[4 * i + 3];
    c10::optional<torch::Tensor> bias = b.numel() ? c10::optional<torch::Tensor>(b) : c10::nullopt;
    c10::optional<torch::Tensor> res = count == 1 ? residual : c10::nullopt;
    outs.push_back(kinds[i] == 0 ? q4_linear(x, qs, d, m, bias, norm, eps, act, res)
                                 : q8_linear(x, qs, d, bias, norm, eps, act, res));
  }
  if (count == 1) return outs[0];
  auto y = torch::cat(outs, 1);
  if (residual.has_value() && residual->defined()) y.add_(*residual);
  return y;
}

std::vector<torch::Tensor> layers_core(const torch::Tensor& x_in, const std::vector<torch::Tensor>& parts,
                                       const std::vector<int64_t>& kinds, const std::vector<int64_t>& op_parts,
                                       const std::vector<torch::Tensor>& norms, const std::vector<double>& eps,
                                       std::vector<torch::Tensor>& kcs, std::vector<torch::Tensor>& vcs,
                                       const std::vector<torch::Tensor>& coss, const std::vector<torch::Tensor>& sins,
                                       const std::vector<int64_t>& rope, const std::vector<int64_t>& windows,
                                       const StepRows& rows, int64_t n_heads, double scale, int64_t act,
                                       const torch::Tensor& final_norm, double final_eps,
                                       const std::vector<int64_t>& aux_layers, const std::vector<torch::Tensor>& dense,
                                       int64_t dense_from) {
  const int64_t n_layers = (int64_t)kcs.size();
  TORCH_CHECK(dense.empty() || (int64_t)dense.size() == 8 * n_layers,
              "layers_forward: dense takes 2 tensors (packed weight, bias) per op, 4 ops per layer");
  TORCH_CHECK((int64_t)op_parts.size() == 4 * n_layers && (int64_t)norms.size() == 6 * n_layers &&
                  (int64_t)eps.size() == 5 * n_layers && (int64_t)vcs.size() == n_layers &&
                  (int64_t)rope.size() == n_layers && (int64_t)windows.size() == n_layers,
              "layers_forward: per-layer lists do not match the layer count");
  TORCH_CHECK((int64_t)parts.size() == 4 * (int64_t)kinds.size(), "layers_forward: 4 tensors per part");
  auto opt = [](const torch::Tensor& t) {
    return t.defined() && t.numel() ? c10::optional<torch::Tensor>(t) : c10::nullopt;
  };
  torch::Tensor x = x_in.contiguous();
  const int64_t T = x.size(0);
  std::vector<torch::Tensor> out(1 + aux_layers.size());
  int64_t part = 0;
  // Op o of layer l over the step's rows: rows [0, dense_from) on the q4/q8 parts, the prompt
  // rows [dense_from, T) on the op's dense weights where it has them (dense_linear).
  auto linear = [&](int64_t l, int64_t o, const torch::Tensor& in, int64_t first, int64_t count,
                    const c10::optional<torch::Tensor>& norm, double e, int64_t a,
                    const c10::optional<torch::Tensor>& residual) {
    const int64_t lo = std::max<int64_t>(0, dense_from);
    if (dense.empty() || lo >= T || !dense[8 * l + 2 * o].numel())
      return linear_part(in, parts, kinds, first, count, norm, e, a, residual);
    const auto& dw = dense[8 * l + 2 * o];
    const auto db = opt(dense[8 * l + 2 * o + 1]);
    auto rows = [&](const c10::optional<torch::Tensor>& t, int64_t from, int64_t n) {
      return t.has_value() && t->defined() ? c10::optional<torch::Tensor>(t->narrow(0, from, n)) : c10::nullopt;
    };
    auto tail = dense_linear(in.narrow(0, lo, T - lo), dw, db, norm, e, a, rows(residual, lo, T - lo));
    if (lo == 0) return tail;
    return torch::cat({linear_part(in.narrow(0, 0, lo), parts, kinds, first, count, norm, e, a, rows(residual, 0, lo)),
                       tail}, 0);
  };
  for (int64_t l = 0; l < n_layers; ++l) {
    for (size_t a = 0; a < aux_layers.size(); ++a)
      if (aux_layers[a] == l) out[1 + a] = x;
    const torch::Tensor* nl = &norms[6 * l];
    const double* el = &eps[5 * l];
    const int64_t* np = &op_parts[4 * l];
    auto h = linear(l, 0, x, part, np[0], opt(nl[0]), el[0], 0, c10::nullopt);
    part += np[0];
    auto q = rope_store_rows(h, coss[rope[l]], sins[rope[l]], kcs[l], vcs[l], rows, n_heads, opt(nl[4]), opt(nl[5]),
                             el[4]);
    auto att = attention_rows(q, kcs[l], vcs[l], rows, scale, windows[l]).view({T, -1});
    if (nl[2].numel()) {  // Gemma 3: the attention output normed before its residual
      x = rms_norm(linear(l, 1, att, part, np[1], c10::nullopt, 0.0, 0, c10::nullopt), nl[2], el[2], x);
    } else {
      x = linear(l, 1, att, part, np[1], c10::nullopt, 0.0, 0, x);
    }
    part += np[1];
    h = linear(l, 2, x, part, np[2], opt(nl[1]), el[1], 0, c10::nullopt);
    part += np[2];
    if (nl[3].numel()) {
      x = rms_norm(linear(l, 3, h, part, np[3], c10::nullopt, 0.0, act, c10::nullopt), nl[3], el[3], x);
    } else {
      x = linear(l, 3, h, part, np[3], c10::nullopt, 0.0, act, x);
    }
    part += np[3];
  }
  for (size_t a = 0; a < aux_layers.size(); ++a)
    TORCH_CHECK(out[1 + a].defined(), "layers_forward: aux layer ", aux_layers[a], " is not a layer of this model");
  out[0] = rms_norm(x, final_norm, final_eps, c10::nullopt);
  return out;
}

// One stream: caches (n_kv, capacity, hd) per layer, the step's rows at [start, start + T).
std::vector<torch::Tensor> layers_forward(const torch::Tensor& x, std::vector<torch::Tensor> parts,
                                          std::vector<int64_t> kinds, std::vector<int64_t> op_parts,
                                          std::vector<torch::Tensor> norms, std::vector<double> eps,
                                          std::vector<torch::Tensor> kcs, std::vector<torch::Tensor> vcs,
                                          std::vector<torch::Tensor> coss, std::vector<torch::Tensor> sins,
                                          std::vector<int64_t> rope, std::vector<int64_t> windows, int64_t start,
                                          const c10::optional<torch::Tensor>& step_mask, int64_t n_heads, double scale,
                                          int64_t act, const torch::Tensor& final_norm, double final_eps,
                                          std::vector<int64_t> aux_layers, std::vector<torch::Tensor> dense,
                                          int64_t dense_from) {
  torch::Tensor holder;
  const auto rows = StepRows::single(x.size(0), start, mask_data(step_mask, x.size(0), holder, "layers_forward"));
  return layers_core(x, parts, kinds, op_parts, norms, eps, kcs, vcs, coss, sins, rope, windows, rows, n_heads, scale,
                     act, final_norm, final_eps, aux_layers, dense, dense_from);
}

// Rows of many streams in one step: caches (slots, n_kv, capacity, hd) per layer; row i of x
// belongs to slot row_slot[i], is written at row_write[i] and sees its slot's [0, row_prefix[i])
// and the step rows step_mask allows (default: its own slot's rows up to itself). Every row's
// result is bit-identical to the same row in a one-stream step (StepRows, attention_impl).
std::vector<torch::Tensor> layers_forward_rows(const torch::Tensor& x, std::vector<torch::Tensor> parts,
                                               std::vector<int64_t> kinds, std::vector<int64_t> op_parts,
                                               std::vector<torch::Tensor> norms, std::vector<double> eps,
                                               std::vector<torch::Tensor> kcs, std::vector<torch::Tensor> vcs,
                                               std::vector<torch::Tensor> coss, std::vector<torch::Tensor> sins,
                                               std::vector<int64_t> rope, std::vector<int64_t> windows,
                                               const torch::Tensor& row_slot, const torch::Tensor& row_write,
                                               const torch::Tensor& row_prefix,
                                               const c10::optional<torch::Tensor>& step_mask, int64_t n_heads,
                                               double scale, int64_t act, const torch::Tensor& final_norm,
                                               double final_eps, std::vector<int64_t> aux_layers,
                                               std::vector<torch::Tensor> dense, int64_t dense_from) {
  const int64_t T = x.size(0);
  for (const auto* t : {&row_slot, &row_write, &row_prefix})
    TORCH_CHECK(t->scalar_type() == torch::kLong && t->dim() == 1 && t->size(0) == T && t->is_contiguous(),
                "layers_forward_rows: row_slot, row_write and row_prefix must be (T,) int64");
  for (const auto& k : kcs) TORCH_CHECK(k.dim() == 4, "layers_forward_rows: caches must be (slots, n_kv, capacity, hd)");
  torch::Tensor holder;
  const StepRows rows(T, row_slot.data_ptr<int64_t>(), row_write.data_ptr<int64_t>(), row_prefix.data_ptr<int64_t>(),
                      mask_data(step_mask, T, holder, "layers_forward_rows"));
  return layers_core(x, parts, kinds, op_parts, norms, eps, kcs, vcs, coss, sins, rope, windows, rows, n_heads, scale,
                     act, final_norm, final_eps, aux_layers, dense, dense_from);
}

}  // namespace

TORCH_LIBRARY(clp, m) {
  m.def("q4_linear(Tensor x, Tensor qs, Tensor d, Tensor mn, Tensor? bias, Tensor? norm, float eps, int act, "
        "Tensor? residual) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps, Tensor? residual=None) -> Tensor");
  m.def("layers_forward(Tensor x, Tensor[] parts, int[] kinds, int[] op_parts, Tensor[] norms, float[] eps, "
        "Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, Tensor[] cos, Tensor[] sin, int[] rope, int[] windows, "
        "int start, Tensor? step_mask, int n_heads, float scale, int act, Tensor final_norm, float final_eps, "
        "int[] aux_layers, Tensor[] dense, int dense_from) -> Tensor[]");
  m.def("layers_forward_rows(Tensor x, Tensor[] parts, int[] kinds, int[] op_parts, Tensor[] norms, float[] eps, "
        "Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, Tensor[] cos, Tensor[] sin, int[] rope, int[] windows, "
        "Tensor row_slot, Tensor row_write, Tensor row_prefix, Tensor? step_mask, int n_heads, float scale, int act, "
        "Tensor final_norm, float final_eps, int[] aux_layers, Tensor[] dense, int dense_from) -> Tensor[]");
  m.def("dense_linear(Tensor x, Tensor w, Tensor? bias, Tensor? norm, float eps, int act, Tensor? residual) -> Tensor");
  m.def("q8_linear(Tensor x, Tensor qs, Tensor d, Tensor? bias, Tensor? norm, float eps, int act, "
        "Tensor? residual) -> Tensor");
  m.def("rope_store(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, int start, "
        "int n_heads, Tensor? q_norm=None, Tensor? k_norm=None, float eps=0.0) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, int L, Tensor? step_mask, float scale, int window=0) -> Tensor");
}

TORCH_LIBRARY_IMPL(clp, CPU, m) {
  m.impl("q4_linear", &q4_linear);
  m.impl("decode_attention", &decode_attention);
  m.impl("rope_store", &rope_store);
  m.impl("q8_linear", &q8_linear);
  m.impl("rms_norm", &rms_norm);
  m.impl("layers_forward", &layers_forward);
  m.impl("layers_forward_rows", &layers_forward_rows);
  m.impl("dense_linear", &dense_linear);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("has_avx2", []() { return (bool)CLP_AVX2; });
  m.def("activation_levels", []() { return (double)QMAX; });
  m.def("has_wide_q4", []() { return (bool)CLP_WIDE; });
  m.def("has_amx_bf16", []() { return (bool)CLP_AMX_BF16 && amx_permitted(); });
}
