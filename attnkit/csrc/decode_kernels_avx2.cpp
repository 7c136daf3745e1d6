// The fp32 decoding kernels of decode_kernels.cpp for x86-64 CPUs with AVX2 and FMA but not the
// AVX512 set that file needs (AMD Zen 1-3, Intel client cores, most small cloud machines):
//
//   attnkit::linear_fp32(x, weight, bias)
//                                        x @ weight.T (+ bias) for ONE row of fp32 activations.
//   attnkit::linear_rows_fp32(x, weight, bias)
//                                        x @ weight.T (+ bias) for 1 to 8 rows (beam search, draft
//                                        checking).
//   attnkit::decode_attention(q, k, v, mask, scale, rows=None)
//                                        softmax(q k^T * scale, over the keys mask allows) v for ONE
//                                        query per head (grouped-query heads), fp32 only; several
//                                        query rows may share a row of keys (a source's beams), or
//                                        read each slot from the key row a table names (beams
//                                        reordered without copying: KVCache.key_rows).
//
// The same designs and the same op schemas as there, on 8-lane registers (16 of them, not 32): every
// weight row is read once, front to back, several rows side by side, with fp32 multiply-adds and fp32
// sums; the last K % 8 values come through masked loads (zero past the end). There is no bf16 or int8
// dot-product instruction here, so bf16 and block-quantized weights stay on torch's ops (kernels.py
// routes them there). On the 2-core AMD EPYC (AVX2) we measure on, torch's fp32 product for 4 rows
// reads weights at about half of copy bandwidth; the figures behind the routing are in kernels.py.

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <optional>
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

// ---- element access: 8 lanes of fp32, masked past the end -------------------------------------

// all ones in the lanes below `left` (any value; 8 or more: every lane)
inline __m256i lanes(int64_t left) {
  const int n = static_cast<int>(std::min<int64_t>(std::max<int64_t>(left, 0), 8));
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline __m256 load8(const float* p, __m256i m) { return _mm256_maskload_ps(p, m); }

// [sum of a0, ..., sum of a3] and [sum of a0, ..., sum of a7]: lane-sums four or eight at a time.
inline __m256 pair_sums(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  // per 128-bit half: [a0, a1, a2, a3] partial sums
  return _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
}
inline __m128 sum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  const __m256 t = pair_sums(a0, a1, a2, a3);
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}
inline __m256 sum8(const __m256* a) {
  const __m256 lo = pair_sums(a[0], a[1], a[2], a[3]), hi = pair_sums(a[4], a[5], a[6], a[7]);
  return _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31));
}
inline float sum1(__m256 a) { return _mm_cvtss_f32(sum4(a, a, a, a)); }

// exp(x) for x <= 0: 2^(x log2 e) split into 2^n * 2^f, |f| <= 1/2, 2^f by the Taylor series of
// decode_kernels.cpp (relative error < 1e-8); 2^n from its exponent bits, so x is clamped at -87
// (n >= -126, a normal number): below that exp(x) < 2e-38 counts as 2e-38 beside a softmax total >= 1.
inline __m256 exp_nonpositive(__m256 x) {
  const __m256 t = _mm256_mul_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(1.4426950408889634f));
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(t, n);
  __m256 p = _mm256_set1_ps(1.525273380405984e-05f);
  for (float c : {1.5403530393381608e-04f, 1.3333558146428443e-03f, 9.618129107628477e-03f,
                  5.550410866482158e-02f, 2.402265069591007e-01f, 6.931471805599453e-01f, 1.0f})
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(c));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(two_n));
}

// ---- linear_rows_fp32 (and linear_fp32, its one-row case) -------------------------------------

// y[m * N + r] = dot(weight row r, x row m) for r < R (R consecutive rows, row_stride apart), m < M:
// 8 values of each weight row per step against every row of x (which stays in L1), one accumulator
// per (weight row, x row).
template <int R, int M>
inline void rows_times_rows(const float* w, int64_t row_stride, const float* x, int64_t K, float* y, int64_t N) {
  __m256 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 wr[R];
    for (int r = 0; r < R; ++r) wr[r] = _mm256_loadu_ps(w + r * row_stride + k);
    for (int m = 0; m < M; ++m) {
      const __m256 xm = _mm256_loadu_ps(x + m * K + k);
      for (int r = 0; r < R; ++r) acc[r][m] = _mm256_fmadd_ps(wr[r], xm, acc[r][m]);
    }
  }
  if (k < K) {  // the last 1..7 values, zero-filled past K
    const __m256i tail = lanes(K - k);
    __m256 wr[R];
    for (int r = 0; r < R; ++r) wr[r] = load8(w + r * row_stride + k, tail);
    for (int m = 0; m < M; ++m) {
      const __m256 xm = load8(x + m * K + k, tail);
      for (int r = 0; r < R; ++r) acc[r][m] = _mm256_fmadd_ps(wr[r], xm, acc[r][m]);
    }
  }
  constexpr int kSums = (R * M + 3) / 4 * 4;  // lane-sums four at a time
  alignas(16) float sums[kSums];
  const __m256 zero = _mm256_setzero_ps();
  for (int i = 0; i < kSums; i += 4) {
    auto a = [&](int j) { return j < R * M ? acc[j % R][j / R] : zero; };
    _mm_store_ps(sums + i, sum4(a(i), a(i + 1), a(i + 2), a(i + 3)));
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) y[m * N + r] = sums[m * R + r];
}

// y[m * N] = dot(one weight row, x row m) for m < M: the row is read front to back, 16 values a
// step, two accumulators per x row (2 M independent multiply-adds), so each thread reads its block
// of weight rows as one stream. The prefetchers keep up with one stream per core better than with
// several rows side by side: from memory, 2 threads, 4 rows of x, 1536 x 384 weights read at 14.1
// GB/s this way against 8.9 two rows at a time (384 x 1536: 15.9 vs 11.7; ad-hoc medians of 40).
template <int M>
inline void row_times_rows(const float* w, const float* x, int64_t K, float* y, int64_t N) {
  __m256 acc[2][M];
  for (int m = 0; m < M; ++m) acc[0][m] = acc[1][m] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m256 w0 = _mm256_loadu_ps(w + k), w1 = _mm256_loadu_ps(w + k + 8);
    for (int m = 0; m < M; ++m) {
      acc[0][m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * K + k), acc[0][m]);
      acc[1][m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + m * K + k + 8), acc[1][m]);
    }
  }
  for (; k < K; k += 8) {  // the last 1..15 values, zero-filled past K
    const __m256i tail = lanes(K - k);  // at most 8 lanes
    const __m256 wk = load8(w + k, tail);
    for (int m = 0; m < M; ++m) acc[0][m] = _mm256_fmadd_ps(wk, load8(x + m * K + k, tail), acc[0][m]);
  }
  for (int m = 0; m < M; ++m) y[m * N] = sum1(_mm256_add_ps(acc[0][m], acc[1][m]));
}

// a contiguous block of weight rows per thread, read front to back: one weight row at a time
// (row_times_rows: 2 M accumulators + 2 weight vectors + one x vector <= the 16 vector registers,
// so up to 6 rows of x; 7 or 8 rows take one accumulator per row of x).
template <int M>
void few_rows_linear(const float* w, int64_t row_stride, const float* x, int64_t N, int64_t K, float* y) {
  torch::stable::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      if constexpr (M <= 6) {
        row_times_rows<M>(w + n * row_stride, x, K, y + n, N);
      } else {
        rows_times_rows<1, M>(w + n * row_stride, row_stride, x, K, y + n, N);
      }
    }
  });
}

// The dot products of eight consecutive weight rows (row_stride apart) with one row x, into y[0..7]:
// eight streams side by side (eight independent multiply-adds per step), as in decode_kernels.cpp.
inline void eight_row_dots(const float* w, int64_t row_stride, const float* x, int64_t K, float* y) {
  __m256 acc[8];
  for (int r = 0; r < 8; ++r) acc[r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m256 xk = _mm256_loadu_ps(x + k);
    for (int r = 0; r < 8; ++r) acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(w + r * row_stride + k), xk, acc[r]);
  }
  if (k < K) {  // the last 1..7 values, zero-filled past K
    const __m256i tail = lanes(K - k);
    const __m256 xk = load8(x + k, tail);
    for (int r = 0; r < 8; ++r) acc[r] = _mm256_fmadd_ps(load8(w + r * row_stride + k, tail), xk, acc[r]);
  }
  _mm256_storeu_ps(y, sum8(acc));
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
  // a contiguous block of rows per thread (in groups of eight, at least 8 groups per thread), read
  // front to back; the last N % 8 rows one at a time
  torch::stable::parallel_for(0, (N + 7) / 8, 8, [&](int64_t begin, int64_t end) {
    for (int64_t n = 8 * begin; n < std::min(8 * end, N); n += 8) {
      if (n + 8 <= N) {
        eight_row_dots(w + n * row_stride, row_stride, xs, K, y + n);
      } else {
        for (int64_t m = n; m < N; ++m) rows_times_rows<1, 1>(w + m * row_stride, row_stride, xs, K, y + m, N);
      }
    }
    if (b)
      for (int64_t n = 8 * begin; n < std::min(8 * end, N); ++n) y[n] += b[n];
  });
  return out;
}

// x (..., K) with 1 to 8 rows in all, weight (N, K) with unit stride along K, bias None or (N,)
// contiguous -> (..., N), fp32.
Tensor linear_rows_fp32(Tensor x, Tensor weight, std::optional<Tensor> bias) {
  const int64_t M = check_linear_rows(x, weight, ScalarType::Float, "attnkit::linear_rows_fp32");
  check_bias(bias, weight.size(0), "attnkit::linear_rows_fp32");
  const int64_t N = weight.size(0), K = weight.size(1);
  Tensor out = torch::stable::empty(linear_out_shape(x, N), ScalarType::Float, std::nullopt, x.device());
  const float* w = static_cast<const float*>(weight.data_ptr());
  const float* xs = static_cast<const float*>(x.data_ptr());
  float* y = static_cast<float*>(out.data_ptr());
  const int64_t rs = weight.stride(0);
  switch (M) {
    case 1: few_rows_linear<1>(w, rs, xs, N, K, y); break;
    case 2: few_rows_linear<2>(w, rs, xs, N, K, y); break;
    case 3: few_rows_linear<3>(w, rs, xs, N, K, y); break;
    case 4: few_rows_linear<4>(w, rs, xs, N, K, y); break;
    case 5: few_rows_linear<5>(w, rs, xs, N, K, y); break;
    case 6: few_rows_linear<6>(w, rs, xs, N, K, y); break;
    case 7: few_rows_linear<7>(w, rs, xs, N, K, y); break;
    default: few_rows_linear<8>(w, rs, xs, N, K, y); break;
  }
  if (bias.has_value()) add_bias_rows(y, static_cast<const float*>(bias->data_ptr()), M, N);
  return out;
}

// ---- decode_attention -------------------------------------------------------------------------

// One query head h of batch row b, over kv head g. Chunks = ceil(D / 8), fixed at compile time.
template <int Chunks>
void attend_head(const HeadViews<float>& t, const int64_t* key_at, const int64_t* value_at, int64_t n,
                 bool uniform, float scale, int64_t b, int64_t h, int64_t g, std::vector<float>& weights) {
  const int64_t D = t.D;
  const float* qh = t.query(b, h);
  const float* kb = t.keys(g);
  const float* vb = t.values(g);
  float* oh = t.output(b, h);
  const int64_t full = D / 8;  // chunks loaded whole; a last partial one through a mask
  const __m256i tail = lanes(D - 8 * full);
  auto load = [&](const float* p, int c) { return c < full ? _mm256_loadu_ps(p + 8 * c) : load8(p + 8 * c, tail); };

  weights.resize(n + 8);  // room for a whole last 8 lanes
  __m256 qs[Chunks];
  for (int c = 0; c < Chunks; ++c) qs[c] = load(qh, c);
  auto score = [&](int64_t i) {  // 8 lanes whose sum is key i's unscaled score
    const float* key = kb + key_at[i];
    __m256 acc = _mm256_mul_ps(qs[0], load(key, 0));
    for (int c = 1; c < Chunks; ++c) acc = _mm256_fmadd_ps(qs[c], load(key, c), acc);
    return acc;
  };
  int64_t i = 0;
  for (; i + 4 <= n && !uniform; i += 4)  // scores, four keys per step: one lane-sum for all four
    _mm_storeu_ps(weights.data() + i, _mm_mul_ps(sum4(score(i), score(i + 1), score(i + 2), score(i + 3)),
                                                 _mm_set1_ps(scale)));
  for (; i < n && !uniform; ++i) weights[i] = sum1(score(i)) * scale;
  const float top = uniform ? 0.0f : *std::max_element(weights.begin(), weights.begin() + n);
  __m256 total = _mm256_setzero_ps();  // softmax over the allowed keys, in fp32
  for (int64_t i = 0; i < n; i += 8) {
    const __m256 in_range = _mm256_castsi256_ps(lanes(n - i));
    const __m256 e = uniform ? _mm256_set1_ps(1.0f)
                             : exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(weights.data() + i), _mm256_set1_ps(top)));
    _mm256_storeu_ps(weights.data() + i, e);  // lanes past n are never read again
    total = _mm256_add_ps(total, _mm256_and_ps(e, in_range));
  }
  const __m256 inv_total = _mm256_set1_ps(1.0f / sum1(total));
  __m256 acc[Chunks];  // the weighted sum of the values
  for (int c = 0; c < Chunks; ++c) acc[c] = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; ++i) {
    const float* value = vb + value_at[i];
    const __m256 w = _mm256_set1_ps(weights[i]);
    for (int c = 0; c < Chunks; ++c) acc[c] = _mm256_fmadd_ps(w, load(value, c), acc[c]);
  }
  for (int c = 0; c < Chunks; ++c) {
    const __m256 o = _mm256_mul_ps(acc[c], inv_total);
    if (c < full)
      _mm256_storeu_ps(oh + 8 * c, o);
    else
      _mm256_maskstore_ps(oh + 8 * c, tail, o);
  }
}

template <int Chunks = 1>
void attend_head_any(int64_t chunks, const HeadViews<float>& t, const int64_t* key_at, const int64_t* value_at,
                     int64_t n, bool uniform, float scale, int64_t b, int64_t h, int64_t g,
                     std::vector<float>& weights) {
  if constexpr (Chunks < kMaxHeadDim / 8) {
    if (chunks > Chunks)
      return attend_head_any<Chunks + 1>(chunks, t, key_at, value_at, n, uniform, scale, b, h, g, weights);
  }
  attend_head<Chunks>(t, key_at, value_at, n, uniform, scale, b, h, g, weights);
}

// q (B, H, 1, D); k, v (Bk, Hkv, S, D), B % Bk == 0 (query row b reads key row b / (B / Bk)),
// H % Hkv == 0, unit stride along D; mask (Bk, S) bool, true where a key may be seen; or with rows
// (B, S) int32 query row b's slot s read from key row rows[b, s], any Bk, mask (B, S). Returns
// (B, H, 1, D) contiguous fp32.
Tensor decode_attention(Tensor q, Tensor k, Tensor v, Tensor mask, double scale, std::optional<Tensor> rows) {
  STD_TORCH_CHECK(q.scalar_type() == ScalarType::Float && k.scalar_type() == ScalarType::Float &&
                      v.scalar_type() == ScalarType::Float && mask.scalar_type() == ScalarType::Bool,
                  "attnkit::decode_attention takes fp32 q, k, v (on AVX2 CPUs) and a bool mask");
  check_decode_attention_shapes(q, k, v, mask, rows);
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), Hkv = k.size(1);
  Tensor out = torch::stable::empty({B, H, 1, D}, ScalarType::Float, std::nullopt, q.device());
  const KeyLists lists = allowed_keys(q, k, v, mask, rows);
  const int64_t rep = H / Hkv, chunks = (D + 7) / 8;
  const float scale32 = static_cast<float>(scale);
  const HeadViews<float> views(q, k, v, out, lists.group);
  torch::stable::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {  // one unit per (batch row, head)
    std::vector<float> weights;
    for (int64_t u = begin; u < end; ++u) {
      const int64_t b = u / H, h = u % H, list = b / lists.group;
      attend_head_any(chunks, views, lists.keys(list), lists.values(list), lists.count(list), lists.uniform[list],
                      scale32, b, h, h / rep, weights);
    }
  });
  return out;
}

// beam_topk's test of 16 sums (decode_common.h): any of row[0..16) + r not below worst, or NaN
std::tuple<Tensor, Tensor, int64_t> beam_topk(Tensor log_probs, Tensor running, int64_t n) {
  return beam_topk_with(log_probs, running, n, [](const float* row, float r, float worst) {
    const __m256 add = _mm256_set1_ps(r), bar = _mm256_set1_ps(worst);
    const __m256 low = _mm256_cmp_ps(_mm256_add_ps(_mm256_loadu_ps(row), add), bar, _CMP_NLT_UQ);
    const __m256 high = _mm256_cmp_ps(_mm256_add_ps(_mm256_loadu_ps(row + 8), add), bar, _CMP_NLT_UQ);
    return _mm256_movemask_ps(_mm256_or_ps(low, high)) != 0;
  });
}

}  // namespace

STABLE_TORCH_LIBRARY(attnkit, m) {
  m.def("linear_fp32(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("linear_rows_fp32(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor mask, float scale, Tensor? rows=None) -> Tensor");
  m.def("copy_rows(Tensor(a!)[] views, int[] index) -> ()");
  m.def("beam_topk(Tensor log_probs, Tensor running, int n) -> (Tensor, Tensor, int)");
  m.def("dropout(Tensor x, float p, int seed) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(attnkit, CPU, m) {
  m.impl("linear_fp32", TORCH_BOX(&linear_fp32));
  m.impl("linear_rows_fp32", TORCH_BOX(&linear_rows_fp32));
  m.impl("decode_attention", TORCH_BOX(&decode_attention));
  m.impl("copy_rows", TORCH_BOX(&attnkit_common::copy_rows));
  m.impl("beam_topk", TORCH_BOX(&beam_topk));
  m.impl("dropout", TORCH_BOX(&attnkit_common::dropout));
}
