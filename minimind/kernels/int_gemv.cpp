// int8, 4-bit and float32 weight matmuls for a few rows (decoding), one-query attention and one-pass sampling on
// CPUs with AVX-512 VNNI or with AVX2 and FMA, built by int_gemv.py with the flags of one of the two (the sections
// below marked AVX-512 and AVX2 hold each one's vector code; the rest is shared).
//
// Both multiply int8 activations by integer weights with vpdpbusd (64 u8 x s8 products summed into 16 int32
// lanes per instruction; on AVX2 vpmaddubsw then vpmaddwd, 32 products per pair), so a weight byte costs a
// fraction of a cycle and the loop runs at the speed the weights stream from memory. Weights are stored in blocks of 16 output rows, 4 consecutive inputs per row
// per 64-byte line, so one broadcast 4-byte slice of the activations meets 16 rows at once and no horizontal
// sums are needed.
//
// int8_gemv: per-output-channel int8 weights; activations rounded to int8 with one scale per row (on AVX-512
//   offset by 128 to be unsigned, the offset removed with the weights' row sums; on AVX2 kept signed).
// q4_gemv: llama.cpp q4_0 weights (groups of 32 inputs, codes 0..15 standing for (q - 8) d, d in bf16), codes
//   packed two per byte; activations rounded to int8 with one scale per group of 32 (as llama.cpp's q8_0).
// f32_gemv: the model's own float32 (N, K) weights, FMA row dots, the next rows prefetched.
// one_query_attention: float32 attention of one new token per row over its KV cache (eager and batched decoding).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t kRows = 16;  // output rows per block

// ---- scalar parts both sections share ----

// The sampler's walk over a row's e^((l - max) / T) (e, V tokens) and their sums per 16-token block: the first
// token whose running sum passes u times the total, the block sums skipping whole blocks.
int64_t draw_token(const float* l, int64_t V, float top, float u, const float* e, const float* block_sums) {
  const int64_t blocks = (V + 15) / 16;
  float total = 0.f;
  for (int64_t i = 0; i < blocks; ++i) total += block_sums[i];
  const float target = u * total;
  int64_t token = -1;
  float running = 0.f;
  for (int64_t i = 0; i < blocks; ++i) {
    if (running + block_sums[i] <= target) {
      running += block_sums[i];
      continue;
    }
    // The block holds the target; should its own sum in this order fall short, its last token that can be
    // drawn (the walk's limit as u approaches the block's end).
    for (int64_t j = 16 * i; j < std::min(16 * i + 16, V); ++j) {
      running += e[j];
      if (e[j] > 0.f) token = j;
      if (running > target) break;
    }
    break;
  }
  if (token < 0) {  // u times the total rounded up to the total (or nothing can be drawn): the likeliest token
    token = 0;
    while (l[token] != top && token + 1 < V) ++token;
  }
  return token;
}

// The largest attended score (-inf where no column is attended).
inline float attended_max(const float* scores, const bool* seen, int64_t S) {
  float top = -INFINITY;
  for (int64_t s = 0; s < S; ++s)
    if (!seen || seen[s]) top = std::max(top, scores[s]);
  return top;
}

// scores[from, S) -> e^(score - top), 0 where not attended; returns sum plus theirs (the vector loops' tail).
inline float exp_tail(float* scores, const bool* seen, int64_t from, int64_t S, float top, float sum) {
  for (int64_t s = from; s < S; ++s) {
    scores[s] = (!seen || seen[s]) ? std::exp(scores[s] - top) : 0.f;
    sum += scores[s];
  }
  return sum;
}

#if defined(__AVX512F__)  // ---------------------------------------- AVX-512 ----------------------------------------

// ---- activations ----

// One row of K floats -> K unsigned bytes round(x / s) + 128, s = max|x| / 127 (0 for an all-zero row).
float quantize_row_i8(const float* x, int64_t K, uint8_t* out) {
  const int64_t K16 = K / 16 * 16;
  __m512 vmax = _mm512_setzero_ps();
  for (int64_t k = 0; k < K16; k += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(x + k)));
  float amax = _mm512_reduce_max_ps(vmax);
  for (int64_t k = K16; k < K; ++k) amax = std::max(amax, std::fabs(x[k]));
  const float inverse = amax > 0.f ? 127.f / amax : 0.f;
  const __m512 vinv = _mm512_set1_ps(inverse);
  const __m512i offset = _mm512_set1_epi32(128);
  for (int64_t k = 0; k < K16; k += 16) {  // cvtps rounds to nearest even, as nearbyint does
    __m512i q = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + k), vinv)), offset);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + k), _mm512_cvtepi32_epi8(q));
  }
  for (int64_t k = K16; k < K; ++k) out[k] = static_cast<uint8_t>(static_cast<int>(std::nearbyint(x[k] * inverse)) + 128);
  return amax / 127.f;
}

// One row of K floats (K a multiple of 32) -> K int8 with a scale per group of 32 inputs, and each group's sum.
void quantize_row_q8_0(const float* x, int64_t K, int8_t* out, float* scales, int32_t* sums) {
  for (int64_t g = 0; g < K / 32; ++g) {
    const __m512 a = _mm512_loadu_ps(x + 32 * g), b = _mm512_loadu_ps(x + 32 * g + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    const __m512 vinv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, vinv)), qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, vinv));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 32 * g), _mm512_cvtepi32_epi8(qa));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 32 * g + 16), _mm512_cvtepi32_epi8(qb));
    scales[g] = amax / 127.f;
    sums[g] = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
  }
}

// ---- int8 x int8 ----

// MR rows times NB blocks of 16 outputs: acc[r][j] lanes = sum_k xu[r][k] * w[j][row][k].
template <int MR, int NB>
inline void int8_tile(const int8_t* w, int64_t block_bytes, const uint8_t* xu, int64_t K, int32_t* out) {
  __m512i acc[MR][NB];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_setzero_si512();
  for (int64_t k = 0; k < K / 4; ++k) {
    __m512i xv[MR];
    for (int r = 0; r < MR; ++r) xv[r] = _mm512_set1_epi32(reinterpret_cast<const int32_t*>(xu + r * K)[k]);
    for (int j = 0; j < NB; ++j) {
      __m512i wv = _mm512_loadu_si512(w + j * block_bytes + 64 * k);
      for (int r = 0; r < MR; ++r) acc[r][j] = _mm512_dpbusd_epi32(acc[r][j], xv[r], wv);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NB; ++j) _mm512_storeu_si512(out + (r * NB + j) * kRows, acc[r][j]);
}

template <int MR>
void int8_rows(const int8_t* w, int64_t K, int64_t b0, int64_t b1, const uint8_t* xu, const float* xs,
               const int32_t* wsum, const float* wscale, float* out, int64_t N) {
  const int64_t block_bytes = K * kRows;
  alignas(64) int32_t acc[MR * 4 * kRows];
  for (int64_t b = b0; b < b1;) {
    const int nb = b + 4 <= b1 ? 4 : 1;
    if (nb == 4) int8_tile<MR, 4>(w + b * block_bytes, block_bytes, xu, K, acc);
    else int8_tile<MR, 1>(w + b * block_bytes, block_bytes, xu, K, acc);
    for (int r = 0; r < MR; ++r) {
      for (int j = 0; j < nb; ++j) {
        const int64_t n = (b + j) * kRows;
        __m512i a = _mm512_loadu_si512(acc + (r * nb + j) * kRows);
        a = _mm512_sub_epi32(a, _mm512_slli_epi32(_mm512_loadu_si512(wsum + n), 7));  // the +128 offset
        __m512 scale = _mm512_mul_ps(_mm512_set1_ps(xs[r]), _mm512_loadu_ps(wscale + n));
        _mm512_storeu_ps(out + r * N + n, _mm512_mul_ps(_mm512_cvtepi32_ps(a), scale));
      }
    }
    b += nb;
  }
}

// ---- q4_0 x q8_0 ----

inline __m512 load_bf16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

// MR rows times NB blocks of 16 outputs over every group; p: codes (block, K / 8, 64 bytes), d: bf16 scales
// (block, K / 32, 16).
template <int MR, int NB>
inline void q4_tile(const uint8_t* p, int64_t block_bytes, const uint16_t* d, int64_t block_scales,
                    const int8_t* xq, const float* xs, const int32_t* xsum, int64_t K, float* out) {
  const int64_t G = K / 32;
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512 acc[MR][NB];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512i lo_acc[MR][NB], hi_acc[MR][NB];
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < NB; ++j) {
        lo_acc[r][j] = _mm512_set1_epi32(-8 * xsum[r * G + g]);  // the codes' offset of 8
        hi_acc[r][j] = _mm512_setzero_si512();
      }
    for (int h = 0; h < 4; ++h) {  // 8 inputs per step: 4 in the low nibbles, the next 4 in the high ones
      __m512i xlo[MR], xhi[MR];
      for (int r = 0; r < MR; ++r) {
        const int32_t* xr = reinterpret_cast<const int32_t*>(xq + r * K + 32 * g + 8 * h);
        xlo[r] = _mm512_set1_epi32(xr[0]);
        xhi[r] = _mm512_set1_epi32(xr[1]);
      }
      for (int j = 0; j < NB; ++j) {
        __m512i v = _mm512_loadu_si512(p + j * block_bytes + 256 * g + 64 * h);
        __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        for (int r = 0; r < MR; ++r) {
          lo_acc[r][j] = _mm512_dpbusd_epi32(lo_acc[r][j], lo, xlo[r]);
          hi_acc[r][j] = _mm512_dpbusd_epi32(hi_acc[r][j], hi, xhi[r]);
        }
      }
    }
    for (int j = 0; j < NB; ++j) {
      __m512 dj = load_bf16(d + j * block_scales + kRows * g);
      for (int r = 0; r < MR; ++r) {
        __m512 dots = _mm512_cvtepi32_ps(_mm512_add_epi32(lo_acc[r][j], hi_acc[r][j]));
        acc[r][j] = _mm512_fmadd_ps(dots, _mm512_mul_ps(dj, _mm512_set1_ps(xs[r * G + g])), acc[r][j]);
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NB; ++j) _mm512_storeu_ps(out + (r * NB + j) * kRows, acc[r][j]);
}

template <int MR>
void q4_rows(const uint8_t* p, const uint16_t* d, int64_t K, int64_t b0, int64_t b1, const int8_t* xq,
             const float* xs, const int32_t* xsum, float* out, int64_t N) {
  const int64_t block_bytes = K * kRows / 2, block_scales = K / 32 * kRows;
  constexpr int NB = MR <= 2 ? 4 : 2;
  alignas(64) float acc[MR * NB * kRows];
  for (int64_t b = b0; b < b1;) {
    const int nb = b + NB <= b1 ? NB : 1;
    if (nb == NB) q4_tile<MR, NB>(p + b * block_bytes, block_bytes, d + b * block_scales, block_scales, xq, xs, xsum, K, acc);
    else q4_tile<MR, 1>(p + b * block_bytes, block_bytes, d + b * block_scales, block_scales, xq, xs, xsum, K, acc);
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < nb; ++j)
        _mm512_storeu_ps(out + r * N + (b + j) * kRows, _mm512_loadu_ps(acc + (r * nb + j) * kRows));
    b += nb;
  }
}

// ---- float32 ----

// R rows of a row-major (N, K) float32 matrix times MB rows of x (row stride K): out[m * ldo + r] =
// sum_k w[r][k] x[m][k]. Each weight vector is loaded once for the MB inputs (R x MB accumulators, at most 16).
// While it reads these rows it prefetches the next R: the rows of a decode-sized matrix are short (2-6 KB), and
// without the hint every call started its streams cold (all of `small`'s one-row products: 2.5 ms without, 2.1
// ms with).
template <int R, int MB>
inline void f32_tile(const float* w, int64_t K, const float* x, float* out, int64_t ldo) {
  __m512 acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    __m512 wv[R];
    for (int r = 0; r < R; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(w + (r + R) * K + k), _MM_HINT_T0);
      wv[r] = _mm512_loadu_ps(w + r * K + k);
    }
    for (int m = 0; m < MB; ++m) {
      const __m512 xv = _mm512_loadu_ps(x + m * K + k);
      for (int r = 0; r < R; ++r) acc[r][m] = _mm512_fmadd_ps(wv[r], xv, acc[r][m]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) out[m * ldo + r] = _mm512_reduce_add_ps(acc[r][m]);
}

// R weight rows times all M inputs, four inputs at a time (the rows stay in L1 between the passes).
template <int R>
inline void f32_rows(const float* w, int64_t K, const float* x, int64_t M, float* out, int64_t ldo) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) f32_tile<R, 4>(w, K, x + m * K, out + m * ldo, ldo);
  switch (M - m) {
    case 3: f32_tile<R, 3>(w, K, x + m * K, out + m * ldo, ldo); break;
    case 2: f32_tile<R, 2>(w, K, x + m * K, out + m * ldo, ldo); break;
    case 1: f32_tile<R, 1>(w, K, x + m * K, out + m * ldo, ldo); break;
    default: break;
  }
}

// ---- attention of one new token per row ----

// e^x for 16 floats (x <= 88): 2^(x log2 e) as 2^n times a degree-7 polynomial of the fraction (relative error
// about 1e-7); -inf gives 0.
inline __m512 exp16(__m512 x) {
  const __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.f)), _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.69314718055994531f));  // |f| <= ln2 / 2
  __m512 p = _mm512_set1_ps(1.f / 5040.f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 720.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// Sixteen vectors -> one: lane i holds the sum of v[i]'s lanes (a transpose and add, three steps per output).
inline __m512 sum16(const __m512* v) {
  __m512 t[8], u[4], w[2];
  for (int i = 0; i < 8; ++i)  // lanes (4 per 128 bits) alternate v[2i], v[2i + 1]
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // each 128 bits: partial sums of v[4i .. 4i + 3]
    const __m512d a = _mm512_castps_pd(t[2 * i]), b = _mm512_castps_pd(t[2 * i + 1]);
    u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  for (int i = 0; i < 2; ++i)  // 128-bit lanes pairwise added: u[2i] then u[2i + 1], two lanes each
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x88), _mm512_shuffle_f32x4(w[0], w[1], 0xDD));
}

// q . k as 16 partial sums (q held in DC registers).
template <int DC>
inline __m512 key_dot(const __m512* qv, const float* k) {
  __m512 acc = _mm512_mul_ps(qv[0], _mm512_loadu_ps(k));
  for (int c = 1; c < DC; ++c) acc = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(k + 16 * c), acc);
  return acc;
}

// One query head (DC x 16 values) against S keys (row stride ks) -> scores[s] = q . k_s * scale, sixteen keys per
// reduction.
template <int DC>
inline void head_scores(const float* q, const float* keys, int64_t ks, int64_t S, float scale, float* scores) {
  __m512 qv[DC];
  for (int c = 0; c < DC; ++c) qv[c] = _mm512_loadu_ps(q + 16 * c);
  int64_t s = 0;
  for (; s + 16 <= S; s += 16) {
    __m512 dots[16];
    for (int j = 0; j < 16; ++j) dots[j] = key_dot<DC>(qv, keys + (s + j) * ks);
    _mm512_storeu_ps(scores + s, _mm512_mul_ps(sum16(dots), _mm512_set1_ps(scale)));
  }
  for (; s < S; ++s) scores[s] = _mm512_reduce_add_ps(key_dot<DC>(qv, keys + s * ks)) * scale;
}

// scores (S) -> unnormalised probabilities e^(score - max) (0 where not attended); returns their sum.
inline float exp_scores(float* scores, const bool* seen, int64_t S) {
  const float top = attended_max(scores, seen, S);
  if (top == -INFINITY) {  // nothing attended
    std::fill(scores, scores + S, 0.f);
    return 0.f;
  }
  const __m512 vtop = _mm512_set1_ps(top);
  __m512 total = _mm512_setzero_ps();
  int64_t s = 0;
  for (; s + 16 <= S; s += 16) {
    __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(scores + s), vtop));
    if (seen) {
      const __mmask16 keep = _mm512_cmpneq_epi32_mask(
          _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(seen + s))), _mm512_setzero_si512());
      e = _mm512_maskz_mov_ps(keep, e);
    }
    _mm512_storeu_ps(scores + s, e);
    total = _mm512_add_ps(total, e);
  }
  return exp_tail(scores, seen, s, S, top, _mm512_reduce_add_ps(total));
}

// out (DC x 16) = sum over attended s of p[s] v_s / total.
template <int DC>
inline void head_values(const float* p, const bool* seen, const float* values, int64_t vs, int64_t S, float total,
                        float* out) {
  __m512 acc[DC];
  for (int c = 0; c < DC; ++c) acc[c] = _mm512_setzero_ps();
  for (int64_t s = 0; s < S; ++s) {
    if (seen && !seen[s]) continue;  // never read: an unattended column may hold anything
    const __m512 ps = _mm512_set1_ps(p[s]);
    const float* v = values + s * vs;
    for (int c = 0; c < DC; ++c) acc[c] = _mm512_fmadd_ps(ps, _mm512_loadu_ps(v + 16 * c), acc[c]);
  }
  const __m512 inverse = _mm512_set1_ps(total > 0.f ? 1.f / total : 0.f);
  for (int c = 0; c < DC; ++c) _mm512_storeu_ps(out + 16 * c, _mm512_mul_ps(acc[c], inverse));
}

// ---- one sampled token per row ----

// One row of logits l (V floats) at a temperature and a uniform u in [0, 1) -> its token and temperature-1
// logprob (what sample_tokens below says), with scratch e (V rounded up to 256 floats) and block_sums (one per
// 16 tokens, rounded up to 16).
void sample_row(const float* l, int64_t V, float temperature, float u, float* e, float* block_sums, int64_t* token_out,
                float* logprob_out) {
  const int64_t blocks = (V + 15) / 16, full = V / 16, rest = V % 16, groups = (blocks + 15) / 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << rest) - 1);
  __m512 vmax = _mm512_set1_ps(-INFINITY);
  for (int64_t i = 0; i < full; ++i) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(l + 16 * i));
  if (rest) vmax = _mm512_max_ps(vmax, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), tail, l + 16 * full));
  const float top = _mm512_reduce_max_ps(vmax);
  const bool scaled = temperature != 1.f;
  const __m512 vscale = _mm512_set1_ps(1.f / temperature), vtop = _mm512_set1_ps(top);
  __m512 raw = _mm512_setzero_ps();  // e^(l - max) summed, for the temperature-1 logprob
  for (int64_t g = 0; g < groups; ++g) {
    __m512 p[16];
    for (int64_t j = 0; j < 16; ++j) {
      const int64_t i = 16 * g + j;
      if (i >= blocks) {
        p[j] = _mm512_setzero_ps();
        continue;
      }
      const __m512 x = _mm512_sub_ps(
          i < full ? _mm512_loadu_ps(l + 16 * i) : _mm512_mask_loadu_ps(vtop, tail, l + 16 * i), vtop);
      p[j] = exp16(scaled ? _mm512_mul_ps(x, vscale) : x);
      if (i == full) p[j] = _mm512_maskz_mov_ps(tail, p[j]);
      _mm512_storeu_ps(e + 16 * i, p[j]);
      if (scaled) {
        const __m512 q = exp16(x);
        raw = _mm512_add_ps(raw, i == full ? _mm512_maskz_mov_ps(tail, q) : q);
      } else {
        raw = _mm512_add_ps(raw, p[j]);
      }
    }
    _mm512_storeu_ps(block_sums + 16 * g, sum16(p));
  }
  const int64_t token = draw_token(l, V, top, u, e, block_sums);
  *token_out = token;
  *logprob_out = (l[token] - top) - std::log(_mm512_reduce_add_ps(raw));
}

#else  // ---------------------------------------- AVX2 + FMA ----------------------------------------

// The same kernels on CPUs without AVX-512 (most laptops and desktops): 8-lane vectors, two per 16 rows or
// values; int8 products through vpmaddubsw / vpmaddwd instead of vpdpbusd. Tiles are narrower than above because
// AVX2 has 16 vector registers where AVX-512 has 32. Sums that AVX-512 forms 16 lanes at a time are formed 8 at a
// time, so float results agree with the AVX-512 build to rounding, not bit for bit; integer dots agree exactly.

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

inline float hmax8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

inline __m256 abs8(__m256 x) { return _mm256_andnot_ps(_mm256_set1_ps(-0.f), x); }

// ---- activations ----

// One row of K floats -> K signed bytes round(x / s), s = max|x| / 127 (0 for an all-zero row).
float quantize_row_i8(const float* x, int64_t K, uint8_t* out) {
  const int64_t K8 = K / 8 * 8;
  __m256 vmax = _mm256_setzero_ps();
  for (int64_t k = 0; k < K8; k += 8) vmax = _mm256_max_ps(vmax, abs8(_mm256_loadu_ps(x + k)));
  float amax = hmax8(vmax);
  for (int64_t k = K8; k < K; ++k) amax = std::max(amax, std::fabs(x[k]));
  const float inverse = amax > 0.f ? 127.f / amax : 0.f;
  const __m256 vinv = _mm256_set1_ps(inverse);
  alignas(32) int32_t q[8];
  for (int64_t k = 0; k < K8; k += 8) {  // cvtps rounds to nearest even, as nearbyint does
    _mm256_store_si256(reinterpret_cast<__m256i*>(q), _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k), vinv)));
    for (int j = 0; j < 8; ++j) out[k + j] = static_cast<uint8_t>(static_cast<int8_t>(q[j]));
  }
  for (int64_t k = K8; k < K; ++k) out[k] = static_cast<uint8_t>(static_cast<int8_t>(std::nearbyint(x[k] * inverse)));
  return amax / 127.f;
}

// One row of K floats (K a multiple of 32) -> K int8 with a scale per group of 32 inputs, and each group's sum.
void quantize_row_q8_0(const float* x, int64_t K, int8_t* out, float* scales, int32_t* sums) {
  alignas(32) int32_t q[32];
  for (int64_t g = 0; g < K / 32; ++g) {
    __m256 v[4];
    __m256 vmax = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_loadu_ps(x + 32 * g + 8 * i);
      vmax = _mm256_max_ps(vmax, abs8(v[i]));
    }
    const float amax = hmax8(vmax);
    const __m256 vinv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    for (int i = 0; i < 4; ++i)
      _mm256_store_si256(reinterpret_cast<__m256i*>(q + 8 * i), _mm256_cvtps_epi32(_mm256_mul_ps(v[i], vinv)));
    int32_t sum = 0;
    for (int j = 0; j < 32; ++j) {
      out[32 * g + j] = static_cast<int8_t>(q[j]);
      sum += q[j];
    }
    scales[g] = amax / 127.f;
    sums[g] = sum;
  }
}

// ---- int8 x int8 ----

// MR rows times NB blocks of 16 outputs: acc[r][j] lanes = sum_k x[r][k] * w[j][row][k], each block's 64-byte
// line as two halves of 8 rows. |x| * (w with x's sign) keeps vpmaddubsw's pair sums within int16 (|w| <= 127).
template <int MR, int NB>
inline void int8_tile(const int8_t* w, int64_t block_bytes, const uint8_t* xq, int64_t K, int32_t* out) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[MR][NB][2];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NB; ++j) acc[r][j][0] = acc[r][j][1] = _mm256_setzero_si256();
  for (int64_t k = 0; k < K / 4; ++k) {
    __m256i xs[MR], xa[MR];
    for (int r = 0; r < MR; ++r) {
      xs[r] = _mm256_set1_epi32(reinterpret_cast<const int32_t*>(xq + r * K)[k]);
      xa[r] = _mm256_sign_epi8(xs[r], xs[r]);
    }
    for (int j = 0; j < NB; ++j)
      for (int h = 0; h < 2; ++h) {
        const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j * block_bytes + 64 * k + 32 * h));
        for (int r = 0; r < MR; ++r)
          acc[r][j][h] = _mm256_add_epi32(
              acc[r][j][h], _mm256_madd_epi16(_mm256_maddubs_epi16(xa[r], _mm256_sign_epi8(wv, xs[r])), ones));
      }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NB; ++j)
      for (int h = 0; h < 2; ++h)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (r * NB + j) * kRows + 8 * h), acc[r][j][h]);
}

template <int MR>
void int8_rows(const int8_t* w, int64_t K, int64_t b0, int64_t b1, const uint8_t* xq, const float* xs,
               const int32_t* /* wsum: no offset to remove */, const float* wscale, float* out, int64_t N) {
  constexpr int NB = MR == 1 ? 4 : MR == 2 ? 2 : 1;
  const int64_t block_bytes = K * kRows;
  alignas(32) int32_t acc[MR * NB * kRows];
  for (int64_t b = b0; b < b1;) {
    const int nb = b + NB <= b1 ? NB : 1;
    if (nb == NB) int8_tile<MR, NB>(w + b * block_bytes, block_bytes, xq, K, acc);
    else int8_tile<MR, 1>(w + b * block_bytes, block_bytes, xq, K, acc);
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < nb; ++j)
        for (int h = 0; h < kRows; h += 8) {
          const int64_t n = (b + j) * kRows + h;
          const __m256 a = _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + (r * nb + j) * kRows + h)));
          const __m256 scale = _mm256_mul_ps(_mm256_set1_ps(xs[r]), _mm256_loadu_ps(wscale + n));
          _mm256_storeu_ps(out + r * N + n, _mm256_mul_ps(a, scale));
        }
    b += nb;
  }
}

// ---- q4_0 x q8_0 ----

inline __m256 load_bf16(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

// MR rows times NB blocks of 16 outputs over every group, as above; a code (0..15) times an int8 input fits
// vpmaddubsw's int16 pair sums, and so do the low and high nibbles' sums added before widening.
template <int MR, int NB>
inline void q4_tile(const uint8_t* p, int64_t block_bytes, const uint16_t* d, int64_t block_scales,
                    const int8_t* xq, const float* xs, const int32_t* xsum, int64_t K, float* out) {
  const int64_t G = K / 32;
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256 acc[MR][NB][2];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NB; ++j) acc[r][j][0] = acc[r][j][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256i dots[MR][NB][2];
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < NB; ++j) dots[r][j][0] = dots[r][j][1] = _mm256_set1_epi32(-8 * xsum[r * G + g]);
    for (int h = 0; h < 4; ++h) {  // 8 inputs per step: 4 in the low nibbles, the next 4 in the high ones
      __m256i xlo[MR], xhi[MR];
      for (int r = 0; r < MR; ++r) {
        const int32_t* xr = reinterpret_cast<const int32_t*>(xq + r * K + 32 * g + 8 * h);
        xlo[r] = _mm256_set1_epi32(xr[0]);
        xhi[r] = _mm256_set1_epi32(xr[1]);
      }
      for (int j = 0; j < NB; ++j)
        for (int half = 0; half < 2; ++half) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + j * block_bytes + 256 * g + 64 * h + 32 * half));
          const __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
          for (int r = 0; r < MR; ++r) {
            const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xlo[r]), _mm256_maddubs_epi16(hi, xhi[r]));
            dots[r][j][half] = _mm256_add_epi32(dots[r][j][half], _mm256_madd_epi16(pairs, ones));
          }
        }
    }
    for (int j = 0; j < NB; ++j)
      for (int half = 0; half < 2; ++half) {
        const __m256 dj = load_bf16(d + j * block_scales + kRows * g + 8 * half);
        for (int r = 0; r < MR; ++r)
          acc[r][j][half] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots[r][j][half]),
                                            _mm256_mul_ps(dj, _mm256_set1_ps(xs[r * G + g])), acc[r][j][half]);
      }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NB; ++j)
      for (int half = 0; half < 2; ++half) _mm256_storeu_ps(out + (r * NB + j) * kRows + 8 * half, acc[r][j][half]);
}

template <int MR>
void q4_rows(const uint8_t* p, const uint16_t* d, int64_t K, int64_t b0, int64_t b1, const int8_t* xq,
             const float* xs, const int32_t* xsum, float* out, int64_t N) {
  const int64_t block_bytes = K * kRows / 2, block_scales = K / 32 * kRows;
  constexpr int NB = MR == 1 ? 2 : 1;
  alignas(32) float acc[MR * NB * kRows];
  for (int64_t b = b0; b < b1;) {
    const int nb = b + NB <= b1 ? NB : 1;
    if (nb == NB) q4_tile<MR, NB>(p + b * block_bytes, block_bytes, d + b * block_scales, block_scales, xq, xs, xsum, K, acc);
    else q4_tile<MR, 1>(p + b * block_bytes, block_bytes, d + b * block_scales, block_scales, xq, xs, xsum, K, acc);
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < nb; ++j) std::copy_n(acc + (r * nb + j) * kRows, kRows, out + r * N + (b + j) * kRows);
    b += nb;
  }
}

// ---- float32 ----

// R rows of a row-major (N, K) float32 matrix times MB rows of x, as above (R x MB accumulators, at most 8).
template <int R, int MB>
inline void f32_tile(const float* w, int64_t K, const float* x, float* out, int64_t ldo) {
  __m256 acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) {
    __m256 wv[R];
    for (int r = 0; r < R; ++r) {
      if (k % 16 == 0) _mm_prefetch(reinterpret_cast<const char*>(w + (r + R) * K + k), _MM_HINT_T0);
      wv[r] = _mm256_loadu_ps(w + r * K + k);
    }
    for (int m = 0; m < MB; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * K + k);
      for (int r = 0; r < R; ++r) acc[r][m] = _mm256_fmadd_ps(wv[r], xv, acc[r][m]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) out[m * ldo + r] = hsum8(acc[r][m]);
}

// R weight rows times all M inputs, two inputs at a time (the rows stay in L1 between the passes).
template <int R>
inline void f32_rows(const float* w, int64_t K, const float* x, int64_t M, float* out, int64_t ldo) {
  int64_t m = 0;
  for (; m + 2 <= M; m += 2) f32_tile<R, 2>(w, K, x + m * K, out + m * ldo, ldo);
  if (m < M) f32_tile<R, 1>(w, K, x + m * K, out + m * ldo, ldo);
}

// ---- attention of one new token per row ----

// e^x for 8 floats (x <= 88), as exp16 above; 2^n applied as two exact powers of two so that results below
// 2^-126 come out as the same denormals, -inf gives 0.
inline __m256 exp8(__m256 x) {
  const __m256 t = _mm256_mul_ps(_mm256_max_ps(x, _mm256_set1_ps(-104.f)), _mm256_set1_ps(1.44269504088896341f));
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_mul_ps(_mm256_sub_ps(t, n), _mm256_set1_ps(0.69314718055994531f));
  __m256 p = _mm256_set1_ps(1.f / 5040.f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f / 720.f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f / 120.f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f / 24.f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f / 6.f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  const __m256i ni = _mm256_cvtps_epi32(n), half = _mm256_srai_epi32(ni, 1);  // n in [-150, 128]
  const __m256i bias = _mm256_set1_epi32(127);
  p = _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, bias), 23)));
  return _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, half), bias), 23)));
}

// Eight vectors -> one: lane i holds the sum of v[i]'s lanes.
inline __m256 sum8(const __m256* v) {
  const __m256 a = _mm256_hadd_ps(v[0], v[1]), b = _mm256_hadd_ps(v[2], v[3]);
  const __m256 c = _mm256_hadd_ps(v[4], v[5]), d = _mm256_hadd_ps(v[6], v[7]);
  const __m256 ab = _mm256_hadd_ps(a, b), cd = _mm256_hadd_ps(c, d);  // 128-bit halves: v0..v3 lo/hi, v4..v7 lo/hi
  return _mm256_add_ps(_mm256_permute2f128_ps(ab, cd, 0x20), _mm256_permute2f128_ps(ab, cd, 0x31));
}

// q . k as 8 partial sums (q held in 2 DC registers).
template <int DC>
inline __m256 key_dot(const __m256* qv, const float* k) {
  __m256 acc = _mm256_mul_ps(qv[0], _mm256_loadu_ps(k));
  for (int c = 1; c < 2 * DC; ++c) acc = _mm256_fmadd_ps(qv[c], _mm256_loadu_ps(k + 8 * c), acc);
  return acc;
}

// One query head (DC x 16 values) against S keys (row stride ks) -> scores[s] = q . k_s * scale, eight keys per
// reduction.
template <int DC>
inline void head_scores(const float* q, const float* keys, int64_t ks, int64_t S, float scale, float* scores) {
  __m256 qv[2 * DC];
  for (int c = 0; c < 2 * DC; ++c) qv[c] = _mm256_loadu_ps(q + 8 * c);
  int64_t s = 0;
  for (; s + 8 <= S; s += 8) {
    __m256 dots[8];
    for (int j = 0; j < 8; ++j) dots[j] = key_dot<DC>(qv, keys + (s + j) * ks);
    _mm256_storeu_ps(scores + s, _mm256_mul_ps(sum8(dots), _mm256_set1_ps(scale)));
  }
  for (; s < S; ++s) scores[s] = hsum8(key_dot<DC>(qv, keys + s * ks)) * scale;
}

// scores (S) -> unnormalised probabilities e^(score - max) (0 where not attended); returns their sum.
inline float exp_scores(float* scores, const bool* seen, int64_t S) {
  const float top = attended_max(scores, seen, S);
  if (top == -INFINITY) {  // nothing attended
    std::fill(scores, scores + S, 0.f);
    return 0.f;
  }
  const __m256 vtop = _mm256_set1_ps(top);
  __m256 total = _mm256_setzero_ps();
  int64_t s = 0;
  for (; s + 8 <= S; s += 8) {
    __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + s), vtop));
    if (seen) {
      const __m256i flags = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(seen + s)));
      e = _mm256_andnot_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(flags, _mm256_setzero_si256())), e);
    }
    _mm256_storeu_ps(scores + s, e);
    total = _mm256_add_ps(total, e);
  }
  return exp_tail(scores, seen, s, S, top, hsum8(total));
}

// out (DC x 16) = sum over attended s of p[s] v_s / total.
template <int DC>
inline void head_values(const float* p, const bool* seen, const float* values, int64_t vs, int64_t S, float total,
                        float* out) {
  __m256 acc[2 * DC];
  for (int c = 0; c < 2 * DC; ++c) acc[c] = _mm256_setzero_ps();
  for (int64_t s = 0; s < S; ++s) {
    if (seen && !seen[s]) continue;  // never read: an unattended column may hold anything
    const __m256 ps = _mm256_set1_ps(p[s]);
    const float* v = values + s * vs;
    for (int c = 0; c < 2 * DC; ++c) acc[c] = _mm256_fmadd_ps(ps, _mm256_loadu_ps(v + 8 * c), acc[c]);
  }
  const __m256 inverse = _mm256_set1_ps(total > 0.f ? 1.f / total : 0.f);
  for (int c = 0; c < 2 * DC; ++c) _mm256_storeu_ps(out + 8 * c, _mm256_mul_ps(acc[c], inverse));
}

// ---- one sampled token per row ----

// One row of logits, as the AVX-512 sample_row: e^((l - max) / T) per token into e, per 16-token block into
// block_sums (the same sums for the total and the walk).
void sample_row(const float* l, int64_t V, float temperature, float u, float* e, float* block_sums, int64_t* token_out,
                float* logprob_out) {
  const int64_t blocks = (V + 15) / 16, full = V / 16, rest = V % 16;
  __m256 vmax = _mm256_set1_ps(-INFINITY);
  for (int64_t i = 0; i < V / 8; ++i) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(l + 8 * i));
  float top = hmax8(vmax);
  for (int64_t i = V / 8 * 8; i < V; ++i) top = std::max(top, l[i]);
  const bool scaled = temperature != 1.f;
  const __m256 vscale = _mm256_set1_ps(1.f / temperature), vtop = _mm256_set1_ps(top);
  __m256 raw = _mm256_setzero_ps();  // e^(l - max) summed, for the temperature-1 logprob
  alignas(32) float padded[16];
  for (int64_t i = 0; i < blocks; ++i) {
    const float* src = l + 16 * i;
    if (i == full) {  // the last, partial block: missing tokens read as the max, then zeroed
      std::fill(padded, padded + 16, top);
      std::copy_n(src, rest, padded);
      src = padded;
    }
    __m256 sum = _mm256_setzero_ps();
    for (int h = 0; h < 2; ++h) {
      const __m256 x = _mm256_sub_ps(_mm256_loadu_ps(src + 8 * h), vtop);
      __m256 p = exp8(scaled ? _mm256_mul_ps(x, vscale) : x);
      __m256 q = scaled ? exp8(x) : p;
      if (i == full) {
        const __m256 lane = _mm256_add_ps(_mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_ps(8.f * h));
        const __m256 keep = _mm256_cmp_ps(lane, _mm256_set1_ps(static_cast<float>(rest)), _CMP_LT_OQ);
        p = _mm256_and_ps(p, keep);
        q = _mm256_and_ps(q, keep);
      }
      _mm256_storeu_ps(e + 16 * i + 8 * h, p);
      sum = _mm256_add_ps(sum, p);
      raw = _mm256_add_ps(raw, q);
    }
    block_sums[i] = hsum8(sum);
  }
  const int64_t token = draw_token(l, V, top, u, e, block_sums);
  *token_out = token;
  *logprob_out = (l[token] - top) - std::log(hsum8(raw));
}

#endif

// ---------------------------------------- shared ----------------------------------------

// Where each weight matrix's outputs go in a product with several matrices (one output row of N_total
// columns, matrix i's at columns offset[i]...), and the tasks of 4 blocks of 16 rows each cover.
struct Layout {
  std::vector<int64_t> offset;      // first output column of each matrix
  std::vector<int64_t> blocks;      // blocks of 16 rows of each matrix
  std::vector<int64_t> first_task;  // first task of each matrix; the last entry is the task count
  int64_t columns = 0;
};

Layout layout(const std::vector<int64_t>& outputs) {
  Layout l;
  int64_t tasks = 0;
  for (int64_t n : outputs) {
    l.offset.push_back(l.columns);
    l.blocks.push_back((n + kRows - 1) / kRows);  // the last one partial only for float32 (any row count)
    l.first_task.push_back(tasks);
    l.columns += n;
    tasks += (l.blocks.back() + 3) / 4;
  }
  l.first_task.push_back(tasks);
  return l;
}

// Calls body(matrix, first block, end block) for the tasks [t0, t1), each task 4 blocks of one matrix.
template <typename F>
void for_blocks(const Layout& l, int64_t t0, int64_t t1, const F& body) {
  size_t i = std::upper_bound(l.first_task.begin(), l.first_task.end(), t0) - l.first_task.begin() - 1;
  for (int64_t t = t0; t < t1;) {
    while (t >= l.first_task[i + 1]) ++i;
    const int64_t stop = std::min(t1, l.first_task[i + 1]);  // this matrix's tasks in the range
    const int64_t b0 = (t - l.first_task[i]) * 4, b1 = std::min((stop - l.first_task[i]) * 4, l.blocks[i]);
    body(i, b0, b1);
    t = stop;
  }
}

// x (M, K) times each int8 matrix i (N_i rows) -> (M, sum N_i): the matrices' outputs side by side. One
// rounding of the activations and one parallel region for all of them (a layer's q, k and v projections).
at::Tensor int8_gemv_cat(const at::Tensor& x, at::TensorList packed, at::TensorList wsum, at::TensorList scales) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "int8_gemv: x must be (M, K) float32");
  TORCH_CHECK(packed.size() == wsum.size() && packed.size() == scales.size() && !packed.empty(),
              "int8_gemv: one wsum and one scales tensor per weight matrix");
  const int64_t M = x.size(0), K = x.size(1);
  std::vector<int64_t> outputs;
  for (size_t i = 0; i < packed.size(); ++i) {
    const int64_t N = scales[i].size(0);
    TORCH_CHECK(packed[i].numel() == N * K && K % 4 == 0 && N % kRows == 0, "int8_gemv: packed weights do not match x");
    outputs.push_back(N);
  }
  const Layout l = layout(outputs);
  at::Tensor out = at::empty({M, l.columns}, x.options());
  std::vector<uint8_t> xu(M * K);  // int8 codes, stored as bytes
  std::vector<float> xs(M);
  for (int64_t m = 0; m < M; ++m) xs[m] = quantize_row_i8(x.data_ptr<float>() + m * K, K, xu.data() + m * K);
  float* o = out.data_ptr<float>();
  at::parallel_for(0, l.first_task.back(), 1, [&](int64_t t0, int64_t t1) {
    for_blocks(l, t0, t1, [&](size_t i, int64_t b0, int64_t b1) {
      const int8_t* w = packed[i].data_ptr<int8_t>();
      const int32_t* ws = wsum[i].data_ptr<int32_t>();
      const float* sc = scales[i].data_ptr<float>();
      for (int64_t m = 0; m < M; m += 4) {
        const int64_t mr = std::min<int64_t>(4, M - m);
        const uint8_t* xr = xu.data() + m * K;
        float* om = o + m * l.columns + l.offset[i];
        switch (mr) {
          case 1: int8_rows<1>(w, K, b0, b1, xr, xs.data() + m, ws, sc, om, l.columns); break;
          case 2: int8_rows<2>(w, K, b0, b1, xr, xs.data() + m, ws, sc, om, l.columns); break;
          case 3: int8_rows<3>(w, K, b0, b1, xr, xs.data() + m, ws, sc, om, l.columns); break;
          default: int8_rows<4>(w, K, b0, b1, xr, xs.data() + m, ws, sc, om, l.columns); break;
        }
      }
    });
  });
  return out;
}

at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& wsum, const at::Tensor& scales) {
  return int8_gemv_cat(x, {packed}, {wsum}, {scales});
}

// ---- q4_0 x q8_0 ----

// x (M, K) times each q4_0 matrix i -> (M, sum N_i), as int8_gemv_cat.
at::Tensor q4_gemv_cat(const at::Tensor& x, at::TensorList packed, at::TensorList scales) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "q4_gemv: x must be (M, K) float32");
  TORCH_CHECK(packed.size() == scales.size() && !packed.empty(), "q4_gemv: one scales tensor per weight matrix");
  const int64_t M = x.size(0), K = x.size(1);
  std::vector<int64_t> outputs;
  for (size_t i = 0; i < packed.size(); ++i) {
    const int64_t N = packed[i].size(0) * kRows;
    TORCH_CHECK(K % 32 == 0 && packed[i].numel() * 2 == N * K && scales[i].numel() * 32 == N * K,
                "q4_gemv: packed weights do not match x");
    outputs.push_back(N);
  }
  const Layout l = layout(outputs);
  at::Tensor out = at::empty({M, l.columns}, x.options());
  const int64_t G = K / 32;
  std::vector<int8_t> xq(M * K);
  std::vector<float> xs(M * G);
  std::vector<int32_t> xsum(M * G);
  for (int64_t m = 0; m < M; ++m)
    quantize_row_q8_0(x.data_ptr<float>() + m * K, K, xq.data() + m * K, xs.data() + m * G, xsum.data() + m * G);
  float* o = out.data_ptr<float>();
  at::parallel_for(0, l.first_task.back(), 1, [&](int64_t t0, int64_t t1) {
    for_blocks(l, t0, t1, [&](size_t i, int64_t b0, int64_t b1) {
      const uint8_t* p = packed[i].data_ptr<uint8_t>();
      const uint16_t* d = reinterpret_cast<const uint16_t*>(scales[i].data_ptr<at::BFloat16>());
      for (int64_t m = 0; m < M; m += 4) {
        const int64_t mr = std::min<int64_t>(4, M - m);
        const int8_t* xr = xq.data() + m * K;
        const float* sr = xs.data() + m * G;
        const int32_t* ur = xsum.data() + m * G;
        float* om = o + m * l.columns + l.offset[i];
        switch (mr) {
          case 1: q4_rows<1>(p, d, K, b0, b1, xr, sr, ur, om, l.columns); break;
          case 2: q4_rows<2>(p, d, K, b0, b1, xr, sr, ur, om, l.columns); break;
          case 3: q4_rows<3>(p, d, K, b0, b1, xr, sr, ur, om, l.columns); break;
          default: q4_rows<4>(p, d, K, b0, b1, xr, sr, ur, om, l.columns); break;
        }
      }
    });
  });
  return out;
}

at::Tensor q4_gemv(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales) {
  return q4_gemv_cat(x, {packed}, {scales});
}


// ---- float32 ----

// x (M, K) times each float32 matrix i (N_i, K), the model's own row-major weights -> (M, sum N_i), as
// int8_gemv_cat: one parallel region for all of them. Every weight row is read from memory once whatever M
// (decoding a few sequences: M up to int_gemv.py's FLOAT_ROWS, where the weights' reads dominate).
at::Tensor f32_gemv_cat(const at::Tensor& x_in, at::TensorList weights) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, "f32_gemv: x must be (M, K) float32");
  TORCH_CHECK(!weights.empty(), "f32_gemv: no weight matrix");
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  std::vector<int64_t> outputs;
  for (const at::Tensor& w : weights) {
    TORCH_CHECK(w.dim() == 2 && w.size(1) == K && K % 16 == 0 && w.scalar_type() == at::kFloat && w.is_contiguous(),
                "f32_gemv: weights must be contiguous (N, K) float32 with K a multiple of 16");
    outputs.push_back(w.size(0));
  }
  const Layout l = layout(outputs);
  at::Tensor out = at::empty({M, l.columns}, x.options());
  const float* xp = x.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, l.first_task.back(), 1, [&](int64_t t0, int64_t t1) {
    for_blocks(l, t0, t1, [&](size_t i, int64_t b0, int64_t b1) {
      const float* w = weights[i].data_ptr<float>();
      const int64_t stop = std::min(b1 * kRows, outputs[i]);
      float* oi = o + l.offset[i];
      int64_t n = b0 * kRows;
      for (; n + 4 <= stop; n += 4) f32_rows<4>(w + n * K, K, xp, M, oi + n, l.columns);
      for (; n < stop; ++n) f32_rows<1>(w + n * K, K, xp, M, oi + n, l.columns);
    });
  });
  return out;
}

at::Tensor f32_gemv(const at::Tensor& x, const at::Tensor& weight) {
  return f32_gemv_cat(x, {weight});
}

// ---- attention of one new token per row ----

template <int DC>
void one_query_heads(const float* q, int64_t qh, const float* keys, int64_t ks, const float* values, int64_t vs,
                     const bool* seen, int64_t R, int64_t S, float scale, float* scores, float* out) {
  for (int64_t r = 0; r < R; ++r) {
    float* sr = scores + r * S;
    head_scores<DC>(q + r * qh, keys, ks, S, scale, sr);
    const float total = exp_scores(sr, seen, S);
    head_values<DC>(sr, seen, values, vs, S, total, out + r * DC * 16);
  }
}

using HeadsFn = void (*)(const float*, int64_t, const float*, int64_t, const float*, int64_t, const bool*, int64_t,
                         int64_t, float, float*, float*);
constexpr HeadsFn kHeads[16] = {one_query_heads<1>,  one_query_heads<2>,  one_query_heads<3>,  one_query_heads<4>,
                                one_query_heads<5>,  one_query_heads<6>,  one_query_heads<7>,  one_query_heads<8>,
                                one_query_heads<9>,  one_query_heads<10>, one_query_heads<11>, one_query_heads<12>,
                                one_query_heads<13>, one_query_heads<14>, one_query_heads<15>, one_query_heads<16>};

// q (B, H, 1, D) float32, D a multiple of 16 up to 256; k and v (B, H_kv, >= S, D) float32 with unit stride along D
// (views of a KV cache); mask (B, 1, 1, S) bool, true where a column is attended, or none (all S = k.size(2)
// columns). Query head h reads K/V head h / (H / H_kv). -> (B, H, 1, D): softmax(q k^T / sqrt(D)) v over the
// attended columns (zeros for a row that attends none). One task per (row, K/V head), so its keys and values
// stay in L1 for the query heads that share them. PyTorch's SDPA kernel spends most of its time at one query
// setting up blocks (docs/performance.md, rollout section).
at::Tensor one_query_attention(const at::Tensor& q_in, const at::Tensor& k, const at::Tensor& v,
                               const std::optional<at::Tensor>& mask_in) {
  TORCH_CHECK(q_in.dim() == 4 && q_in.size(2) == 1 && q_in.scalar_type() == at::kFloat,
              "one_query_attention: q must be (B, H, 1, D) float32");
  const at::Tensor q = q_in.stride(3) == 1 ? q_in : q_in.contiguous();  // rows and heads at any stride
  TORCH_CHECK(k.dim() == 4 && v.sizes() == k.sizes() && k.scalar_type() == at::kFloat &&
              v.scalar_type() == at::kFloat && k.stride(3) == 1 && v.stride(3) == 1,
              "one_query_attention: k and v must be (B, H_kv, S, D) float32 with unit stride along D");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), G = k.size(1);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D && G > 0 && H % G == 0, "one_query_attention: shapes disagree");
  TORCH_CHECK(D % 16 == 0 && D <= 256, "one_query_attention: head size must be a multiple of 16 up to 256");
  const int64_t S = mask_in.has_value() ? mask_in->size(-1) : k.size(2);
  TORCH_CHECK(S <= k.size(2), "one_query_attention: the mask is wider than the keys");
  at::Tensor mask;
  if (mask_in.has_value()) {
    TORCH_CHECK(mask_in->scalar_type() == at::kBool && mask_in->numel() == B * S,
                "one_query_attention: mask must be (B, 1, 1, S) bool");
    mask = mask_in->contiguous();
  }
  const bool* mp = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  const int64_t R = H / G;  // query heads per K/V head
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  at::Tensor out = at::empty({B, H, 1, D}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t qb = q.stride(0), qh = q.stride(1), kb = k.stride(0), kg = k.stride(1), ks = k.stride(2),
                vb = v.stride(0), vg = v.stride(1), vs = v.stride(2);
  at::parallel_for(0, B * G, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> scores(R * S);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / G, g = t % G;
      const float* qg = qp + b * qb + g * R * qh;
      const float* keys = kp + b * kb + g * kg;
      const float* values = vp + b * vb + g * vg;
      const bool* seen = mp ? mp + b * S : nullptr;
      kHeads[D / 16 - 1](qg, qh, keys, ks, values, vs, seen, R, S, scale, scores.data(), op + (b * H + g * R) * D);
    }
  });
  return out;
}


// ---- one sampled token per row ----

// logits (B, V) float32 with unit stride along V; temperature (B,) > 0 and uniforms (B,) in [0, 1), float32 ->
// (tokens (B,) int64, logprobs (B,) float32). A row's token is the first whose running sum of e^((l - max) / T)
// passes u times the row's total (the inverse CDF in vocabulary order, as `sampling.sample_rows` draws when no
// filter is set; the row's likeliest token if u times the total rounds up to the total); its logprob is
// the log-softmax of the raw logits (temperature 1) there, what RL records. The running sum adds sixteen-token
// blocks in order, the same sums for the total and for the walk, so the walk skips whole blocks.
std::tuple<at::Tensor, at::Tensor> sample_tokens(const at::Tensor& logits, const at::Tensor& temperature_in,
                                                 const at::Tensor& uniforms_in) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.stride(1) == 1,
              "sample_tokens: logits must be (B, V) float32 with unit stride along V");
  const int64_t B = logits.size(0), V = logits.size(1), ls = logits.stride(0);
  TORCH_CHECK(V > 0, "sample_tokens: an empty vocabulary");
  TORCH_CHECK(temperature_in.scalar_type() == at::kFloat && uniforms_in.scalar_type() == at::kFloat &&
              temperature_in.numel() == B && uniforms_in.numel() == B,
              "sample_tokens: one float32 temperature and uniform per row");
  const at::Tensor temperature = temperature_in.contiguous(), uniforms = uniforms_in.contiguous();
  at::Tensor tokens = at::empty({B}, logits.options().dtype(at::kLong));
  at::Tensor logprobs = at::empty({B}, logits.options());
  const float* lp = logits.data_ptr<float>();
  const float* tp = temperature.data_ptr<float>();
  const float* up = uniforms.data_ptr<float>();
  int64_t* out_tokens = tokens.data_ptr<int64_t>();
  float* out_logprobs = logprobs.data_ptr<float>();
  const int64_t groups = ((V + 15) / 16 + 15) / 16;  // of 16 blocks of 16 tokens
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> e(groups * 256), block_sums(groups * 16);
    for (int64_t b = b0; b < b1; ++b)
      sample_row(lp + b * ls, V, tp[b], up[b], e.data(), block_sums.data(), out_tokens + b, out_logprobs + b);
  });
  return {tokens, logprobs};
}

}  // namespace

TORCH_LIBRARY(minimind, m) {
  m.def("int8_gemv(Tensor x, Tensor packed, Tensor wsum, Tensor scales) -> Tensor");
  m.def("q4_gemv(Tensor x, Tensor packed, Tensor scales) -> Tensor");
  m.def("int8_gemv_cat(Tensor x, Tensor[] packed, Tensor[] wsum, Tensor[] scales) -> Tensor");
  m.def("q4_gemv_cat(Tensor x, Tensor[] packed, Tensor[] scales) -> Tensor");
  m.def("f32_gemv(Tensor x, Tensor weight) -> Tensor");
  m.def("f32_gemv_cat(Tensor x, Tensor[] weights) -> Tensor");
  m.def("one_query_attention(Tensor q, Tensor k, Tensor v, Tensor? mask) -> Tensor");
  m.def("sample_tokens(Tensor logits, Tensor temperature, Tensor uniforms) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(minimind, CPU, m) {
  m.impl("int8_gemv", &int8_gemv);
  m.impl("q4_gemv", &q4_gemv);
  m.impl("int8_gemv_cat", &int8_gemv_cat);
  m.impl("q4_gemv_cat", &q4_gemv_cat);
  m.impl("f32_gemv", &f32_gemv);
  m.impl("f32_gemv_cat", &f32_gemv_cat);
  m.impl("one_query_attention", &one_query_attention);
  m.impl("sample_tokens", &sample_tokens);
}
