/* Fused full-vocabulary Gumbel-max for the sampler's free route (x86-64, AVX2; AVX-512F where
 * the CPU has it, chosen at run time). Loaded through ctypes like cpu_kernels.c.
 *
 * For each row r and token j, with the counter-based noise of winnow/sampling/noise.py:
 *
 *   y_j   = min(min(z_j, FLT_MAX) / T_r, FLT_MAX)                    (float32, as torch divides)
 *   bits  = fmix32(key_r ^ mix_j),   mix_j = fmix32(j ^ TOKEN_SALT)  (a table the caller keeps)
 *   a_j   = (float) log(-log((bits + 0.5) * 2^-32))                  (both logs in double)
 *   s_j   = y_j - a_j                                                (float32)
 *   token = the lowest j with the largest s_j
 *
 * which is the torch reference's pick bit for bit, as long as libm's double log rounds a_j to the
 * same float as torch's (1-ulp logs that differ in a double's last bit almost never straddle a
 * float rounding boundary; the tests compare picks and noise values).
 *
 * One pass per row, and the two logs are taken for a handful of tokens only. With w = ~bits,
 * 1 - u = (w + 0.5) * 2^-32 and -log u >= 1 - u, so a_j >= log(1 - u) >= c_j, where c_j is read
 * off the float bits of w (a float's bits, as an integer over 2^23, minus 127 never exceed its
 * log2; less a margin for float rounding). Then y_j - c_j >= s_j bounds the score from above,
 * rounding being monotone, and a token whose bound does not beat the best exact score seen so
 * far cannot win: it is dropped after a hash and a few vector ops; the rest (the bound is within
 * ~0.06 of the exact score where noise is large) get their exact score.
 *
 * A NaN logit never wins (its bound and score compare false), so a row of raw logits gets the
 * pick the sampler's NaN -> -inf rule gives; an all-NaN / -inf row returns token 0. When asked,
 * the same pass writes y back (processed logprobs read it; NaN stays NaN there).
 */
#include <immintrin.h>
#include <math.h>
#include <float.h>
#include <omp.h>
#include <stdint.h>

#define FMIX_1 0x85EBCA6Bu
#define FMIX_2 0xC2B2AE35u
/* c = float_bits(float(w >> 8)) * C_SCALE + C_OFFSET: (log2 lower bound - 32) * ln 2 - margin */
#define C_SCALE (0x1p-23f * 0.693147180559945f)
#define C_OFFSET (-151.0f * 0.693147180559945f - 1e-3f)

static int use_avx512 = 0;

static inline uint32_t fmix32(uint32_t x) {
  x ^= x >> 16;
  x *= FMIX_1;
  x ^= x >> 13;
  x *= FMIX_2;
  return x ^ (x >> 16);
}

static inline float noise_a(uint32_t bits) {
  double u = (double)bits * 0x1p-32 + 0x1p-33;
  return (float)log(-log(u));
}

/* Pick the ISA; returns whether AVX-512 is in use. */
int winnow_gumbel_init(int wanted_avx512) {
  __builtin_cpu_init();
  use_avx512 = wanted_avx512 && __builtin_cpu_supports("avx512f");
  return use_avx512;
}

/* a_j for `n` hash values (tests compare it with the torch formula). */
void winnow_gumbel_noise(const uint32_t *bits, int64_t n, float *out) {
  for (int64_t i = 0; i < n; i++) out[i] = noise_a(bits[i]);
}

static inline float y_of(float z, float t) {
  float y = (z > FLT_MAX ? FLT_MAX : z) / t;
  return y > FLT_MAX ? FLT_MAX : y;
}

/* The exact score of token j; updates the row's best when it wins (ties keep the lower id,
 * which was seen first). */
static inline void consider(float y, uint32_t key, uint32_t mix, int64_t j, float *best,
                            int64_t *best_j) {
  float s = y - noise_a(fmix32(key ^ mix));
  if (s > *best) {
    *best = s;
    *best_j = j;
  }
}

static inline __m256i fmix32_8(__m256i x) {
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32((int)FMIX_1));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 13));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32((int)FMIX_2));
  return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
}

static int64_t row_avx2(const float *z, const uint32_t *mix, float *y_out, int64_t vocab, float t,
                        uint32_t key) {
  float best = -INFINITY;
  int64_t best_j = 0, j = 0;
  const __m256 tv = _mm256_set1_ps(t), big = _mm256_set1_ps(FLT_MAX);
  const __m256i keyv = _mm256_set1_epi32((int)key), ones = _mm256_set1_epi32(-1);
  const __m256 scale = _mm256_set1_ps(C_SCALE), offset = _mm256_set1_ps(C_OFFSET);
  for (; j + 8 <= vocab; j += 8) {
    __m256 y = _mm256_min_ps(big, _mm256_div_ps(_mm256_min_ps(big, _mm256_loadu_ps(z + j)), tv));
    if (y_out) _mm256_storeu_ps(y_out + j, y);
    __m256i bits = fmix32_8(_mm256_xor_si256(keyv, _mm256_loadu_si256((const __m256i *)(mix + j))));
    __m256 w = _mm256_cvtepi32_ps(_mm256_srli_epi32(_mm256_xor_si256(bits, ones), 8));
    __m256 c = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_castps_si256(w)), scale, offset);
    __m256 bound = _mm256_sub_ps(y, c);
    int hits = _mm256_movemask_ps(_mm256_cmp_ps(bound, _mm256_set1_ps(best), _CMP_GT_OQ));
    if (hits) {
      float ys[8];
      _mm256_storeu_ps(ys, y);
      for (; hits; hits &= hits - 1) {
        int lane = __builtin_ctz(hits);
        consider(ys[lane], key, mix[j + lane], j + lane, &best, &best_j);
      }
    }
  }
  for (; j < vocab; j++) {
    float y = y_of(z[j], t);
    if (y_out) y_out[j] = y;
    consider(y, key, mix[j], j, &best, &best_j);
  }
  return best_j;
}

#define AVX512 __attribute__((target("avx512f")))

static inline AVX512 __m512i fmix32_16(__m512i x) {
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32((int)FMIX_1));
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 13));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32((int)FMIX_2));
  return _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
}

static AVX512 int64_t row_avx512(const float *z, const uint32_t *mix, float *y_out,
                                 int64_t vocab, float t, uint32_t key) {
  float best = -INFINITY;
  int64_t best_j = 0, j = 0;
  const __m512 tv = _mm512_set1_ps(t), big = _mm512_set1_ps(FLT_MAX);
  const __m512i keyv = _mm512_set1_epi32((int)key), ones = _mm512_set1_epi32(-1);
  const __m512 scale = _mm512_set1_ps(C_SCALE), offset = _mm512_set1_ps(C_OFFSET);
  for (; j + 16 <= vocab; j += 16) {
    __m512 y = _mm512_min_ps(big, _mm512_div_ps(_mm512_min_ps(big, _mm512_loadu_ps(z + j)), tv));
    if (y_out) _mm512_storeu_ps(y_out + j, y);
    __m512i bits = fmix32_16(_mm512_xor_si512(keyv, _mm512_loadu_si512(mix + j)));
    __m512 w = _mm512_cvtepi32_ps(_mm512_srli_epi32(_mm512_xor_si512(bits, ones), 8));
    __m512 c = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_castps_si512(w)), scale, offset);
    __m512 bound = _mm512_sub_ps(y, c);
    unsigned hits = _mm512_cmp_ps_mask(bound, _mm512_set1_ps(best), _CMP_GT_OQ);
    if (hits) {
      float ys[16];
      _mm512_storeu_ps(ys, y);
      for (; hits; hits &= hits - 1) {
        int lane = __builtin_ctz(hits);
        consider(ys[lane], key, mix[j + lane], j + lane, &best, &best_j);
      }
    }
  }
  for (; j < vocab; j++) {
    float y = y_of(z[j], t);
    if (y_out) y_out[j] = y;
    consider(y, key, mix[j], j, &best, &best_j);
  }
  return best_j;
}

/* Rows r < rows of z (row stride `stride`, float32): token[r] as described at the top.
 * keys[r] are the rows' 32-bit Gumbel-stream keys (int64 holding [0, 2^32)); temperature[r] > 0;
 * mix[j] = token_mix(j) for j < vocab.
 * y_out (row stride `stride`, may be z itself) receives y when given. */
void winnow_gumbel_argmax(const float *z, int64_t rows, int64_t vocab, int64_t stride,
                          const float *temperature, const int64_t *keys, const uint32_t *mix,
                          float *y_out,
                          int64_t *tokens, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (rows > 1)
  for (int64_t r = 0; r < rows; r++) {
    const float *zr = z + r * stride;
    float *yr = y_out ? y_out + r * stride : NULL;
    uint32_t key = (uint32_t)keys[r];
    tokens[r] = use_avx512 ? row_avx512(zr, mix, yr, vocab, temperature[r], key)
                           : row_avx2(zr, mix, yr, vocab, temperature[r], key);
  }
}
