// Native CPU kernels for batch-1 decoding, where torch's and inductor's general loops are slow:
//
//   attnkit::linear_bf16(x, weight)      x @ weight.T for ONE row of bf16 activations.
//   attnkit::linear_fp32(x, weight, bias)
//                                        x @ weight.T (+ bias) for ONE row of fp32 activations.
//   attnkit::linear_rows_fp32(x, weight, bias), attnkit::linear_rows_bf16(x, weight)
//                                        x @ weight.T (+ bias, fp32) for 2 to 8 rows (beam search,
//                                        draft checking).
//   attnkit::linear_quantized(x, q, d, m, kind)
//                                        x @ W.T for ONE row, W in GGML's Q8_0 / Q4_0 / Q4_1 blocks
//                                        (int8 dot products, AVX512-VNNI; see its section).
//   attnkit::decode_attention(q, k, v, mask, scale, rows=None)
//                                        softmax(q k^T * scale, over the keys mask allows) v for ONE
//                                        query per head (grouped-query heads), fp32 or bf16; several
//                                        query rows may share a row of keys (a source's beams), or
//                                        read each slot from the key row a table names (beams
//                                        reordered without copying: KVCache.key_rows).
//   attnkit::copy_rows, attnkit::beam_topk
//                                        a cache's rows reordered in place; a beam search step's best
//                                        candidates (decode_common.h: the AVX2 library has them too).
//
// Decoding one token reads every weight once, so the matmuls are bound by memory bandwidth.
// linear_bf16 reads each weight row front to back, one row at a time, so that a thread's share of
// the matrix is one sequential stream, and multiplies with AVX512-BF16 dot products (bf16 pairs,
// fp32 sums): on the 2-core machines we measure on it streams weights at copy bandwidth, where
// inductor's loop (bf16 -> fp32 conversions, then multiply-adds) reaches about half of it.
// linear_fp32 is the same design for fp32 weights (AVX512F multiply-adds, fp32 sums, eight rows read
// side by side). torch's fp32 product for one row (MKL's) streams nearly as fast and costs less per
// call, so kernels.py sends only large matrices here (the figures are there).
// decode_attention replaces a fused loop that reduced across lanes once per (head, key); here the
// allowed keys are listed once per batch row, four keys share one lane-sum, softmax runs over the
// allowed keys only, and the values are summed with full-width multiply-adds (fp32) or bf16 dot
// products over pairs of keys (bf16).
//
// Built by attnkit/kernels.py against PyTorch's stable C ABI (torch/csrc/stable), which compiles in
// about a second, and only on CPUs with AVX512-BF16 and AVX512-VNNI.

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/Exception.h>

#include "decode_common.h"

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

namespace {

using namespace attnkit_common;

// ---- element access: 16 lanes of fp32 from fp32 or bf16 memory, masked past the end ----------

inline __mmask16 lanes(int64_t left) { return left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1u); }

inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const uint16_t* p, __mmask16 m) {  // bf16 is the top half of an fp32
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
inline void store16(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
inline void store16(uint16_t* p, __m512 v, __mmask16 m) {  // round to nearest even
  _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(v));
}

// fp32 -> bf16, round to nearest even (as c10::BFloat16 does); NaN stays NaN.
inline uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// exp(x) for x <= 0: 2^(x log2 e) split into 2^n * 2^f, |f| <= 1/2, 2^f by its Taylor series to
// degree 7 (relative error < 1e-8, below fp32's), n applied with scalef.
inline __m512 exp_nonpositive(__m512 x) {
  const __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.0f)), _mm512_set1_ps(1.4426950408889634f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.525273380405984e-05f);
  for (float c : {1.5403530393381608e-04f, 1.3333558146428443e-03f, 9.618129107628477e-03f,
                  5.550410866482158e-02f, 2.402265069591007e-01f, 6.931471805599453e-01f, 1.0f})
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

// ---- linear_bf16 ------------------------------------------------------------------------------

inline __m512bh load32bf16(const uint16_t* p) { return (__m512bh)_mm512_loadu_si512(p); }

// The dot product of weight row w and x (K bf16 each), summed in fp32: two accumulators over
// 64-element steps, then a masked tail.
inline float row_dot(const uint16_t* w, const uint16_t* x, int64_t K) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    acc0 = _mm512_dpbf16_ps(acc0, load32bf16(w + k), load32bf16(x + k));
    acc1 = _mm512_dpbf16_ps(acc1, load32bf16(w + k + 32), load32bf16(x + k + 32));
  }
  for (; k < K; k += 32) {  // the last 1..63 elements, zero-filled past K
    const __mmask32 m = K - k >= 32 ? 0xffffffffu : (__mmask32)((1u << (K - k)) - 1u);
    acc0 = _mm512_dpbf16_ps(acc0, (__m512bh)_mm512_maskz_loadu_epi16(m, w + k),
                            (__m512bh)_mm512_maskz_loadu_epi16(m, x + k));
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

// x (..., K) with one row in all, weight (N, K) with unit stride along K -> (..., N).
Tensor linear_bf16(Tensor x, Tensor weight) {
  STD_TORCH_CHECK(x.scalar_type() == ScalarType::BFloat16 && weight.scalar_type() == ScalarType::BFloat16,
                  "attnkit::linear_bf16 takes bf16 tensors");
  STD_TORCH_CHECK(weight.dim() == 2 && weight.stride(1) == 1,
                  "attnkit::linear_bf16: weight must be (N, K) with unit stride along K");
  const int64_t N = weight.size(0), K = weight.size(1), row_stride = weight.stride(0);
  STD_TORCH_CHECK(x.dim() >= 1 && x.size(x.dim() - 1) == K && x.numel() == K && x.is_contiguous(),
                  "attnkit::linear_bf16: x must be one contiguous row of K = weight.size(1) values");
  Tensor out = torch::stable::empty(linear_out_shape(x, N), ScalarType::BFloat16, std::nullopt, x.device());

  const uint16_t* w = static_cast<const uint16_t*>(weight.data_ptr());
  const uint16_t* xs = static_cast<const uint16_t*>(x.data_ptr());
  uint16_t* y = static_cast<uint16_t*>(out.data_ptr());
  // contiguous blocks of rows per thread: each thread's share of the matrix is one stream (measured
  // faster than sharing rows out dynamically, from one end or both: that breaks the streams)
  torch::stable::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) y[n] = to_bf16(row_dot(w + n * row_stride, xs, K));
  });
  return out;
}

// ---- linear_fp32 ------------------------------------------------------------------------------

// The dot product of weight row w and x (K fp32 each), summed in fp32: four accumulators over
// 64-element steps (enough independent multiply-adds to hide their latency), then 16-element steps,
// the last one masked. For the last N % 8 rows.
inline float row_dot(const float* w, const float* x, int64_t K) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps(), acc2 = _mm512_setzero_ps(),
         acc3 = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k), _mm512_loadu_ps(x + k), acc0);
    acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k + 16), _mm512_loadu_ps(x + k + 16), acc1);
    acc2 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k + 32), _mm512_loadu_ps(x + k + 32), acc2);
    acc3 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k + 48), _mm512_loadu_ps(x + k + 48), acc3);
  }
  for (; k < K; k += 16) {  // the last 1..63 elements, zero-filled past K
    const __mmask16 m = lanes(K - k);
    acc0 = _mm512_fmadd_ps(load16(w + k, m), load16(x + k, m), acc0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc0, acc1), _mm512_add_ps(acc2, acc3)));
}

// [sum of a0, sum of a1, sum of a2, sum of a3]: four lane-sums in one reduction.
inline __m128 sum4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  // per 128-bit block: [a0, a1, a0, a1] and [a2, a3, a2, a3] partial sums, then [a0, a1, a2, a3]
  const __m512 t01 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
  const __m512 t23 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
  const __m512 t = _mm512_add_ps(_mm512_shuffle_ps(t01, t23, _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_shuffle_ps(t01, t23, _MM_SHUFFLE(3, 2, 3, 2)));
  const __m256 halves = _mm256_add_ps(_mm512_castps512_ps256(t), _mm512_extractf32x8_ps(t, 1));
  return _mm_add_ps(_mm256_castps256_ps128(halves), _mm256_extractf128_ps(halves, 1));
}

// The dot products of eight consecutive weight rows (row_stride apart) with x, into y[0..7]: the rows
// are read side by side, 16 elements of each per step into one accumulator per row (eight independent
// multiply-adds per step), and their lane-sums are reduced four at a time. Eight streams per thread
// instead of one row at a time measured 5-17% faster on matrices of 576x576 and up (more reads in flight).
inline void eight_row_dots(const float* w, int64_t row_stride, const float* x, int64_t K, float* y) {
  __m512 acc[8];
  for (int r = 0; r < 8; ++r) acc[r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m512 xk = _mm512_loadu_ps(x + k);
    for (int r = 0; r < 8; ++r) acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(w + r * row_stride + k), xk, acc[r]);
  }
  if (k < K) {  // the last 1..15 elements, zero-filled past K
    const __mmask16 m = lanes(K - k);
    const __m512 xk = load16(x + k, m);
    for (int r = 0; r < 8; ++r) acc[r] = _mm512_fmadd_ps(load16(w + r * row_stride + k, m), xk, acc[r]);
  }
  _mm_storeu_ps(y, sum4(acc[0], acc[1], acc[2], acc[3]));
  _mm_storeu_ps(y + 4, sum4(acc[4], acc[5], acc[6], acc[7]));
}

// x (..., K) with one row in all, weight (N, K) with unit stride along K, bias None or (N,)
// contiguous -> (..., N), all fp32.
Tensor linear_fp32(Tensor x, Tensor weight, std::optional<Tensor> bias) {
  check_linear_fp32(x, weight, bias);
  const int64_t N = weight.size(0), K = weight.size(1), row_stride = weight.stride(0);
  Tensor out = torch::stable::empty(linear_out_shape(x, N), ScalarType::Float, std::nullopt, x.device());

  const float* w = static_cast<const float*>(weight.data_ptr());
  const float* xs = static_cast<const float*>(x.data_ptr());
  const float* b = bias.has_value() ? static_cast<const float*>(bias->data_ptr()) : nullptr;
  float* y = static_cast<float*>(out.data_ptr());
  // as in linear_bf16: a contiguous block of rows per thread (here in groups of eight, at least 8
  // groups per thread), read front to back; the last N % 8 rows one at a time
  torch::stable::parallel_for(0, (N + 7) / 8, 8, [&](int64_t begin, int64_t end) {
    for (int64_t n = 8 * begin; n < std::min(8 * end, N); n += 8) {
      if (n + 8 <= N) {
        eight_row_dots(w + n * row_stride, row_stride, xs, K, y + n);
      } else {
        for (int64_t m = n; m < N; ++m) y[m] = row_dot(w + m * row_stride, xs, K);
      }
    }
    if (b)
      for (int64_t n = 8 * begin; n < std::min(8 * end, N); ++n) y[n] += b[n];
  });
  return out;
}

// ---- linear_rows_fp32 / linear_rows_bf16: a few rows (2..8) at once ---------------------------
//
// Beam search and speculative verification multiply a handful of activation rows by every weight:
// torch's matrix product for 2-8 rows reads the weights at about a third of copy bandwidth on these
// machines. Here every weight row is read once, front to back, for all rows of x: R weight rows side
// by side, each 16 (fp32) or 32 (bf16) values per step against every row of x (which stays in L1),
// one accumulator per (weight row, x row). R x M accumulators fit the 32 vector registers.

template <typename T> struct Lanes;
template <> struct Lanes<float> {  // 16 fp32 per step, multiply-adds
  static constexpr int64_t kStep = 16;
  using Vec = __m512;
  static Vec load(const float* p) { return _mm512_loadu_ps(p); }
  static Vec load_tail(const float* p, int64_t left) { return _mm512_maskz_loadu_ps(lanes(left), p); }
  static __m512 madd(__m512 acc, Vec w, Vec x) { return _mm512_fmadd_ps(w, x, acc); }
  static float out(float v) { return v; }
};
template <> struct Lanes<uint16_t> {  // 32 bf16 per step, pair dot products (exact products, fp32 sums)
  static constexpr int64_t kStep = 32;
  using Vec = __m512bh;
  static Vec load(const uint16_t* p) { return (__m512bh)_mm512_loadu_si512(p); }
  static Vec load_tail(const uint16_t* p, int64_t left) {
    return (__m512bh)_mm512_maskz_loadu_epi16(left >= 32 ? 0xffffffffu : (__mmask32)((1u << left) - 1u), p);
  }
  static __m512 madd(__m512 acc, Vec w, Vec x) { return _mm512_dpbf16_ps(acc, w, x); }
  static uint16_t out(float v) { return to_bf16(v); }
};

// y[m * N + r] = dot(weight row r, x row m) for r < R (R consecutive rows, row_stride apart), m < M.
template <typename T, int R, int M>
inline void rows_times_rows(const T* w, int64_t row_stride, const T* x, int64_t K, T* y, int64_t N) {
  using L = Lanes<T>;
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + L::kStep <= K; k += L::kStep) {
    typename L::Vec wr[R];
    for (int r = 0; r < R; ++r) wr[r] = L::load(w + r * row_stride + k);
    for (int m = 0; m < M; ++m) {
      const typename L::Vec xm = L::load(x + m * K + k);
      for (int r = 0; r < R; ++r) acc[r][m] = L::madd(acc[r][m], wr[r], xm);
    }
  }
  if (k < K) {  // the last values, zero-filled past K
    typename L::Vec wr[R];
    for (int r = 0; r < R; ++r) wr[r] = L::load_tail(w + r * row_stride + k, K - k);
    for (int m = 0; m < M; ++m) {
      const typename L::Vec xm = L::load_tail(x + m * K + k, K - k);
      for (int r = 0; r < R; ++r) acc[r][m] = L::madd(acc[r][m], wr[r], xm);
    }
  }
  // lane-sums four at a time (one reduction per four accumulators: for short rows, reducing each
  // accumulator on its own cost as much as the products)
  constexpr int kSums = (R * M + 3) / 4 * 4;
  alignas(16) float sums[kSums];
  const __m512 zero = _mm512_setzero_ps();
  for (int i = 0; i < kSums; i += 4) {
    auto a = [&](int j) { return j < R * M ? acc[j % R][j / R] : zero; };
    _mm_store_ps(sums + i, sum4(a(i), a(i + 1), a(i + 2), a(i + 3)));
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) y[m * N + r] = L::out(sums[m * R + r]);
}

template <typename T, int M>
void few_rows_linear(const T* w, int64_t row_stride, const T* x, int64_t N, int64_t K, T* y) {
  constexpr int R = M <= 6 ? 4 : 2;  // R * M accumulators + R weight vectors + one x vector <= 32 registers
  // a contiguous block of weight rows per thread, read front to back (one stream per thread)
  torch::stable::parallel_for(0, (N + R - 1) / R, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = R * begin; n < std::min(R * end, N); n += R) {
      if (n + R <= N) {
        rows_times_rows<T, R, M>(w + n * row_stride, row_stride, x, K, y + n, N);
      } else {
        for (int64_t r = n; r < N; ++r) rows_times_rows<T, 1, M>(w + r * row_stride, row_stride, x, K, y + r, N);
      }
    }
  });
}

template <typename T>
Tensor linear_rows(Tensor x, Tensor weight, ScalarType type, const char* name) {
  const int64_t M = check_linear_rows(x, weight, type, name);
  const int64_t N = weight.size(0), K = weight.size(1);
  Tensor out = torch::stable::empty(linear_out_shape(x, N), type, std::nullopt, x.device());
  const T* w = static_cast<const T*>(weight.data_ptr());
  const T* xs = static_cast<const T*>(x.data_ptr());
  T* y = static_cast<T*>(out.data_ptr());
  const int64_t rs = weight.stride(0);
  switch (M) {
    case 1: few_rows_linear<T, 1>(w, rs, xs, N, K, y); break;
    case 2: few_rows_linear<T, 2>(w, rs, xs, N, K, y); break;
    case 3: few_rows_linear<T, 3>(w, rs, xs, N, K, y); break;
    case 4: few_rows_linear<T, 4>(w, rs, xs, N, K, y); break;
    case 5: few_rows_linear<T, 5>(w, rs, xs, N, K, y); break;
    case 6: few_rows_linear<T, 6>(w, rs, xs, N, K, y); break;
    case 7: few_rows_linear<T, 7>(w, rs, xs, N, K, y); break;
    default: few_rows_linear<T, 8>(w, rs, xs, N, K, y); break;
  }
  return out;
}

// x (..., K) with 1 to 8 rows in all, weight (N, K) with unit stride along K -> (..., N); fp32 (with
// bias None or (N,) contiguous) or bf16 (no bias).
Tensor linear_rows_fp32(Tensor x, Tensor weight, std::optional<Tensor> bias) {
  check_bias(bias, weight.size(0), "attnkit::linear_rows_fp32");
  Tensor out = linear_rows<float>(x, weight, ScalarType::Float, "attnkit::linear_rows_fp32");
  if (bias.has_value())
    add_bias_rows(static_cast<float*>(out.data_ptr()), static_cast<const float*>(bias->data_ptr()),
                  x.numel() / weight.size(1), weight.size(0));  // K >= 1 once linear_rows checked
  return out;
}
Tensor linear_rows_bf16(Tensor x, Tensor weight) {
  return linear_rows<uint16_t>(x, weight, ScalarType::BFloat16, "attnkit::linear_rows_bf16");
}

// ---- decode_attention -------------------------------------------------------------------------

// One query head h of batch row b, over kv head g. Chunks = ceil(D / 16), fixed at compile time
// so that the query, one key or value row and the output all stay in registers.
template <typename T, int Chunks>
void attend_head(const HeadViews<T>& t, const int64_t* key_at, const int64_t* value_at, int64_t n,
                 bool uniform, float scale, int64_t b, int64_t h, int64_t g, std::vector<float>& weights) {
  const int64_t D = t.D;
  const T* qh = t.query(b, h);
  const T* kb = t.keys(g);
  const T* vb = t.values(g);
  T* oh = t.output(b, h);
  __mmask16 masks[Chunks];
  for (int c = 0; c < Chunks; ++c) masks[c] = lanes(D - 16 * c);

  weights.resize(n);

  // scores: fp32 keys in 16-lane multiply-adds; bf16 keys in 32-lane bf16 dot products (exact products,
  // fp32 sums) straight from memory, with no conversion. Scaled after the lane sums.
  constexpr bool kBf16 = std::is_same_v<T, uint16_t>;
  constexpr int Pairs = (Chunks + 1) / 2;
  __m512 qs[Chunks];
  __m512bh qp[Pairs];
  __mmask32 masks32[Pairs];
  if constexpr (kBf16) {
    for (int p = 0; p < Pairs; ++p) {
      const int64_t left = D - 32 * p;
      masks32[p] = left >= 32 ? 0xffffffffu : (__mmask32)((1u << left) - 1u);
      qp[p] = (__m512bh)_mm512_maskz_loadu_epi16(masks32[p], qh + 32 * p);
    }
  } else {
    for (int c = 0; c < Chunks; ++c) qs[c] = load16(qh + 16 * c, masks[c]);
  }
  auto score = [&](int64_t i) {  // 16 lanes whose sum is key i's unscaled score
    const T* key = kb + key_at[i];
    if constexpr (kBf16) {
      __m512 acc = _mm512_setzero_ps();
      for (int p = 0; p < Pairs; ++p)
        acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_maskz_loadu_epi16(masks32[p], key + 32 * p), qp[p]);
      return acc;
    } else {
      __m512 acc = _mm512_mul_ps(qs[0], load16(key, masks[0]));
      for (int c = 1; c < Chunks; ++c) acc = _mm512_fmadd_ps(qs[c], load16(key + 16 * c, masks[c]), acc);
      return acc;
    }
  };
  int64_t i = 0;
  for (; i + 4 <= n && !uniform; i += 4) {  // scores, four keys per step: one lane-sum for all four
    const __m512 a0 = score(i), a1 = score(i + 1), a2 = score(i + 2), a3 = score(i + 3);
    // per 128-bit block: [a0, a1, a0, a1] and [a2, a3, a2, a3] partial sums, then [a0, a1, a2, a3]
    const __m512 t01 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
    const __m512 t23 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
    const __m512 t = _mm512_add_ps(_mm512_shuffle_ps(t01, t23, _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm512_shuffle_ps(t01, t23, _MM_SHUFFLE(3, 2, 3, 2)));
    const __m256 halves = _mm256_add_ps(_mm512_castps512_ps256(t), _mm512_extractf32x8_ps(t, 1));
    const __m128 sums = _mm_add_ps(_mm256_castps256_ps128(halves), _mm256_extractf128_ps(halves, 1));
    _mm_storeu_ps(weights.data() + i, _mm_mul_ps(sums, _mm_set1_ps(scale)));
  }
  for (; i < n && !uniform; ++i) weights[i] = _mm512_reduce_add_ps(score(i)) * scale;
  const float top = uniform ? 0.0f : *std::max_element(weights.begin(), weights.end());
  __m512 total = _mm512_setzero_ps();  // softmax over the allowed keys, in fp32
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = lanes(n - i);
    const __m512 e = uniform ? _mm512_set1_ps(1.0f)
                             : exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, weights.data() + i),
                                                             _mm512_set1_ps(top)));
    _mm512_mask_storeu_ps(weights.data() + i, m, e);
    total = _mm512_add_ps(total, _mm512_maskz_mov_ps(m, e));
  }
  const __m512 inv_total = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total));
  if constexpr (kBf16) {
    // Two keys per step: their value rows interleaved into bf16 pairs (unpack within 128-bit blocks),
    // times the pair of their weights rounded to bf16 (as math_attention rounds them before its
    // product with v), summed in fp32 by one dot product per 32 values. Block j of acc[2p] then holds
    // values 32p + 8j .. + 3 and block j of acc[2p + 1] values 32p + 8j + 4 .. + 7; reordered below.
    __m512 acc[2 * Pairs];
    for (int c = 0; c < 2 * Pairs; ++c) acc[c] = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 2) {
      const T* v0 = vb + value_at[i];
      const bool pair = i + 1 < n;
      const T* v1 = pair ? vb + value_at[i + 1] : v0;
      const uint32_t w0 = to_bf16(weights[i]), w1 = pair ? to_bf16(weights[i + 1]) : 0;
      const __m512bh w = (__m512bh)_mm512_set1_epi32(static_cast<int>(w0 | (w1 << 16)));
      for (int p = 0; p < Pairs; ++p) {
        const __m512i r0 = _mm512_maskz_loadu_epi16(masks32[p], v0 + 32 * p);
        const __m512i r1 = _mm512_maskz_loadu_epi16(masks32[p], v1 + 32 * p);
        acc[2 * p] = _mm512_dpbf16_ps(acc[2 * p], (__m512bh)_mm512_unpacklo_epi16(r0, r1), w);
        acc[2 * p + 1] = _mm512_dpbf16_ps(acc[2 * p + 1], (__m512bh)_mm512_unpackhi_epi16(r0, r1), w);
      }
    }
    const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
    for (int c = 0; c < Chunks; ++c) {
      const __m512 lo = acc[c & ~1], hi = acc[c | 1];
      const __m512 ordered = _mm512_permutex2var_ps(lo, c % 2 == 0 ? first : second, hi);
      store16(oh + 16 * c, _mm512_mul_ps(ordered, inv_total), masks[c]);
    }
  } else {
    __m512 acc[Chunks];  // the weighted sum of the values
    for (int c = 0; c < Chunks; ++c) acc[c] = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; ++i) {
      const T* value = vb + value_at[i];
      const __m512 w = _mm512_set1_ps(weights[i]);
      for (int c = 0; c < Chunks; ++c) acc[c] = _mm512_fmadd_ps(w, load16(value + 16 * c, masks[c]), acc[c]);
    }
    for (int c = 0; c < Chunks; ++c) store16(oh + 16 * c, _mm512_mul_ps(acc[c], inv_total), masks[c]);
  }
}

template <typename T, int Chunks = 1>
void attend_head_any(int64_t chunks, const HeadViews<T>& t, const int64_t* key_at, const int64_t* value_at,
                     int64_t n, bool uniform, float scale, int64_t b, int64_t h, int64_t g,
                     std::vector<float>& weights) {
  if constexpr (Chunks < kMaxHeadDim / 16) {
    if (chunks > Chunks)
      return attend_head_any<T, Chunks + 1>(chunks, t, key_at, value_at, n, uniform, scale, b, h, g, weights);
  }
  attend_head<T, Chunks>(t, key_at, value_at, n, uniform, scale, b, h, g, weights);
}

// q (B, H, 1, D); k, v (Bk, Hkv, S, D), B % Bk == 0 (query row b reads key row b / (B / Bk)),
// H % Hkv == 0, unit stride along D; mask (Bk, S) bool, true where a key may be seen; or with rows
// (B, S) int32 query row b's slot s read from key row rows[b, s], any Bk, mask (B, S). Returns
// (B, H, 1, D) contiguous, q's dtype (fp32 or bf16; k, v the same).
Tensor decode_attention(Tensor q, Tensor k, Tensor v, Tensor mask, double scale, std::optional<Tensor> rows) {
  const ScalarType dtype = q.scalar_type();
  STD_TORCH_CHECK((dtype == ScalarType::Float || dtype == ScalarType::BFloat16) && k.scalar_type() == dtype &&
                      v.scalar_type() == dtype && mask.scalar_type() == ScalarType::Bool,
                  "attnkit::decode_attention takes fp32 or bf16 q, k, v of one dtype and a bool mask");
  check_decode_attention_shapes(q, k, v, mask, rows);
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), Hkv = k.size(1);
  Tensor out = torch::stable::empty({B, H, 1, D}, dtype, std::nullopt, q.device());
  const KeyLists lists = allowed_keys(q, k, v, mask, rows);
  const int64_t rep = H / Hkv, chunks = (D + 15) / 16;
  const float scale32 = static_cast<float>(scale);
  const HeadViews<float> fp32(q, k, v, out, lists.group);
  const HeadViews<uint16_t> bf16(q, k, v, out, lists.group);
  torch::stable::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {  // one unit per (batch row, head)
    std::vector<float> weights;
    for (int64_t u = begin; u < end; ++u) {
      const int64_t b = u / H, h = u % H, list = b / lists.group;
      const int64_t* key_at = lists.keys(list);
      const int64_t* value_at = lists.values(list);
      const int64_t n = lists.count(list);
      if (dtype == ScalarType::Float)
        attend_head_any<float>(chunks, fp32, key_at, value_at, n, lists.uniform[list], scale32, b, h, h / rep, weights);
      else
        attend_head_any<uint16_t>(chunks, bf16, key_at, value_at, n, lists.uniform[list], scale32, b, h, h / rep,
                                  weights);
    }
  });
  return out;
}


// ---- linear_quantized: block-quantized weights (attnkit/quant.py) ------------------------------
//
// Weights stay in GGML's blocks of 32 along K (Q8_0: w = d (u - 128), u the int8 quant + 128; Q4_0:
// w = d (u - 8); Q4_1: w = d u + m; u unsigned), in the layout of quant.interleave: rows in groups of
// 16, and per group and block the quants of the 16 rows interleaved four bytes at a time, so that one
// 64-byte load holds four consecutive quants of each of the 16 rows (one int32 lane per row). The one
// row of activations is quantized to int8 per block of 32 (scale dx = max|x| / 127, as llama.cpp does
// for its Q8 dot products). Then for a group, per block: four consecutive activations broadcast to
// every lane times those quants is one AVX512-VNNI vpdpbusd (unsigned bytes times signed bytes,
// summed in fours into int32), 8 of them complete the block's 16 integer dot products, and one
// multiply-add applies the 16 rows' scales d * dx:
//   sum_b d_b dx_b (u . xq)_b + c sum_b e_b (dx_b sum xq_b),  c e = -128 d (Q8_0), -8 d (Q4_0), m (Q4_1).
// So the arithmetic per weight is one byte-product, against a conversion, a permute and a multiply-add
// per 16 products when a row's blocks share lanes; the 16 results are stored at once. Each thread
// takes contiguous groups: its share of the matrix is read front to back.

struct QuantizedRow {
  std::vector<int32_t> xq;  // K / 4: the quantized activations, four int8 per int32
  std::vector<float> dx;    // blocks: activation scale per block
  std::vector<float> sx;    // blocks: dx_b * sum(xq_b), for the offset / minimum term
};

template <typename T>
void quantize_row(const T* x, int64_t K, QuantizedRow& r) {
  const int64_t nb = K / 32;
  r.xq.resize(K / 4);
  r.dx.resize(nb);
  r.sx.resize(nb);
  const __m512 magnitude = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  for (int64_t b = 0; b < nb; ++b) {
    const __m512 v0 = load16(x + b * 32, 0xffff), v1 = load16(x + b * 32 + 16, 0xffff);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_and_ps(v0, magnitude), _mm512_and_ps(v1, magnitude)));
    const float dx = amax / 127.0f, inv = dx > 0 ? 1.0f / dx : 0.0f;
    const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, _mm512_set1_ps(inv)));  // nearest, ties to even
    const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, _mm512_set1_ps(inv)));
    int8_t* out = reinterpret_cast<int8_t*>(r.xq.data()) + b * 32;
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm512_cvtsepi32_epi8(q0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16), _mm512_cvtsepi32_epi8(q1));
    r.dx[b] = dx;
    r.sx[b] = dx * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1)));
  }
}

// Kind: 0 Q8_0, 1 Q4_0, 2 Q4_1. The 16 dot products of one row group: q, d, m at the group's start.
template <int Kind>
inline __m512 quantized_group_dot(const uint8_t* q, const uint16_t* d, const uint16_t* m, int64_t nb,
                                  const QuantizedRow& x) {
  constexpr int64_t group_block = Kind == 0 ? 512 : 256;  // bytes of one block of 16 rows
  const __m512i low4 = _mm512_set1_epi8(0x0f);
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps(), corr = _mm512_setzero_ps();
  const int32_t* xq = x.xq.data();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* w = q + b * group_block;
    const int32_t* xb = xq + b * 8;  // the block's 32 activations as 8 groups of four
    __m512i even = _mm512_setzero_si512(), odd = _mm512_setzero_si512();
    if constexpr (Kind == 0) {
      for (int j = 0; j < 8; j += 2) {
        even = _mm512_dpbusd_epi32(even, _mm512_loadu_si512(w + 64 * j), _mm512_set1_epi32(xb[j]));
        odd = _mm512_dpbusd_epi32(odd, _mm512_loadu_si512(w + 64 * (j + 1)), _mm512_set1_epi32(xb[j + 1]));
      }
    } else {  // load k: low nibbles are quants 4k..4k+3, high nibbles 16+4k..16+4k+3
      for (int k = 0; k < 4; ++k) {
        const __m512i v = _mm512_loadu_si512(w + 64 * k);
        even = _mm512_dpbusd_epi32(even, _mm512_and_si512(v, low4), _mm512_set1_epi32(xb[k]));
        odd = _mm512_dpbusd_epi32(odd, _mm512_and_si512(_mm512_srli_epi16(v, 4), low4), _mm512_set1_epi32(xb[4 + k]));
      }
    }
    const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(d + b * 16)));
    const __m512 dots = _mm512_cvtepi32_ps(_mm512_add_epi32(even, odd));
    if (b % 2) acc1 = _mm512_fmadd_ps(dots, _mm512_mul_ps(dw, _mm512_set1_ps(x.dx[b])), acc1);
    else acc0 = _mm512_fmadd_ps(dots, _mm512_mul_ps(dw, _mm512_set1_ps(x.dx[b])), acc0);
    const __m512 e = Kind == 2 ? _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(m + b * 16))) : dw;
    corr = _mm512_fmadd_ps(e, _mm512_set1_ps(x.sx[b]), corr);
  }
  const float c = Kind == 0 ? -128.0f : Kind == 1 ? -8.0f : 1.0f;
  return _mm512_fmadd_ps(corr, _mm512_set1_ps(c), _mm512_add_ps(acc0, acc1));
}

template <int Kind, typename T>
void quantized_linear(const T* xs, int64_t K, const uint8_t* q, const uint16_t* d, const uint16_t* m, int64_t N,
                      T* y) {
  thread_local QuantizedRow calling_thread;  // reused: no allocation per call
  const QuantizedRow& x = calling_thread;   // (a reference: worker threads must see this thread's copy)
  quantize_row(xs, K, calling_thread);
  const int64_t nb = K / 32, groups = (N + 15) / 16;
  const int64_t q_group = nb * (Kind == 0 ? 512 : 256);
  torch::stable::parallel_for(0, groups, 4, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const __m512 v = quantized_group_dot<Kind>(q + g * q_group, d + g * nb * 16, m ? m + g * nb * 16 : nullptr, nb, x);
      const __mmask16 keep = lanes(N - g * 16);
      if constexpr (std::is_same_v<T, float>) store16(y + g * 16, v, keep);
      else store16(y + g * 16, v, keep);
    }
  });
}

// x (..., K): one contiguous row, fp32 or bf16; q, d, m in quant.interleave's layout: q (G, K/32, 8 | 4, 16, 4)
// uint8, d (G, K/32, 16) fp16, m None (Q8_0, Q4_0) or like d (Q4_1); kind: 0 Q8_0, 1 Q4_0, 2 Q4_1; n: the
// rows of the weight (<= 16 G). -> (..., n), x's dtype.
Tensor linear_quantized(Tensor x, Tensor q, Tensor d, std::optional<Tensor> m, int64_t kind, int64_t n) {
  STD_TORCH_CHECK(kind >= 0 && kind <= 2, "attnkit::linear_quantized: kind is 0 (Q8_0), 1 (Q4_0) or 2 (Q4_1)");
  STD_TORCH_CHECK(x.scalar_type() == ScalarType::Float || x.scalar_type() == ScalarType::BFloat16,
                  "attnkit::linear_quantized takes fp32 or bf16 activations");
  STD_TORCH_CHECK(d.dim() == 3 && d.size(2) == 16 && d.is_contiguous() && d.scalar_type() == ScalarType::Half,
                  "attnkit::linear_quantized: d must be (G, K/32, 16) fp16, contiguous");
  const int64_t G = d.size(0), nb = d.size(1), K = nb * 32;
  STD_TORCH_CHECK(n > 16 * (G - 1) && n <= 16 * G, "attnkit::linear_quantized: n must fit the G row groups");
  STD_TORCH_CHECK(q.dim() == 5 && q.is_contiguous() && q.scalar_type() == ScalarType::Byte && q.size(0) == G &&
                      q.size(1) == nb && q.size(2) == (kind == 0 ? 8 : 4) && q.size(3) == 16 && q.size(4) == 4,
                  "attnkit::linear_quantized: q must be (G, K/32, 8 or 4, 16, 4) uint8, contiguous");
  STD_TORCH_CHECK((kind == 2) == m.has_value(), "attnkit::linear_quantized: Q4_1 (only) takes minimums m");
  if (m.has_value())
    STD_TORCH_CHECK(m->is_contiguous() && m->scalar_type() == ScalarType::Half && m->dim() == 3 && m->size(0) == G &&
                        m->size(1) == nb && m->size(2) == 16, "attnkit::linear_quantized: m must be shaped as d");
  STD_TORCH_CHECK(x.dim() >= 1 && x.size(x.dim() - 1) == K && x.numel() == K && x.is_contiguous(),
                  "attnkit::linear_quantized: x must be one contiguous row of K values");
  Tensor out = torch::stable::empty(linear_out_shape(x, n), x.scalar_type(), std::nullopt, x.device());
  const uint8_t* qp = static_cast<const uint8_t*>(q.data_ptr());
  const uint16_t* dp = static_cast<const uint16_t*>(d.data_ptr());
  const uint16_t* mp = m.has_value() ? static_cast<const uint16_t*>(m->data_ptr()) : nullptr;
  auto run = [&](auto* xs, auto* y) {
    if (kind == 0) quantized_linear<0>(xs, K, qp, dp, mp, n, y);
    else if (kind == 1) quantized_linear<1>(xs, K, qp, dp, mp, n, y);
    else quantized_linear<2>(xs, K, qp, dp, mp, n, y);
  };
  if (x.scalar_type() == ScalarType::Float)
    run(static_cast<const float*>(x.data_ptr()), static_cast<float*>(out.data_ptr()));
  else
    run(static_cast<const uint16_t*>(x.data_ptr()), static_cast<uint16_t*>(out.data_ptr()));
  return out;
}

// beam_topk's test of 16 sums (decode_common.h): any of row[0..16) + r not below worst, or NaN
std::tuple<Tensor, Tensor, int64_t> beam_topk(Tensor log_probs, Tensor running, int64_t n) {
  return beam_topk_with(log_probs, running, n, [](const float* row, float r, float worst) {
    const __m512 sums = _mm512_add_ps(_mm512_loadu_ps(row), _mm512_set1_ps(r));
    return _mm512_cmp_ps_mask(sums, _mm512_set1_ps(worst), _CMP_NLT_UQ) != 0;
  });
}

}  // namespace

STABLE_TORCH_LIBRARY(attnkit, m) {
  m.def("linear_bf16(Tensor x, Tensor weight) -> Tensor");
  m.def("linear_fp32(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("linear_rows_fp32(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("linear_rows_bf16(Tensor x, Tensor weight) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor mask, float scale, Tensor? rows=None) -> Tensor");
  m.def("copy_rows(Tensor(a!)[] views, int[] index) -> ()");
  m.def("beam_topk(Tensor log_probs, Tensor running, int n) -> (Tensor, Tensor, int)");
  m.def("dropout(Tensor x, float p, int seed) -> Tensor");
  m.def("linear_quantized(Tensor x, Tensor q, Tensor d, Tensor? m, int kind, int n) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(attnkit, CPU, m) {
  m.impl("linear_bf16", TORCH_BOX(&linear_bf16));
  m.impl("linear_fp32", TORCH_BOX(&linear_fp32));
  m.impl("linear_rows_fp32", TORCH_BOX(&linear_rows_fp32));
  m.impl("linear_rows_bf16", TORCH_BOX(&linear_rows_bf16));
  m.impl("decode_attention", TORCH_BOX(&decode_attention));
  m.impl("copy_rows", TORCH_BOX(&attnkit_common::copy_rows));
  m.impl("beam_topk", TORCH_BOX(&beam_topk));
  m.impl("dropout", TORCH_BOX(&attnkit_common::dropout));
  m.impl("linear_quantized", TORCH_BOX(&linear_quantized));
}
