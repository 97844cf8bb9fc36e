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
 * ~0.06 of the exact score where noise is large) get their exact score. The test itself is
 * taken without the division: with c_j = k_j * C_SCALE + C_OFFSET (k_j the bits as a float),
 * y_j - c_j > best is z_j * (1 / (T C_SCALE)) + (MARGIN - best - C_OFFSET) / C_SCALE > k_j, one
 * multiply-add against the bits; MARGIN (relative to |best|) covers the product's and the
 * constants' roundings for every y_j near enough to best to matter (a token far above best
 * passes anyway, one far below cannot win).
 *
 * A NaN logit never wins (its bound and score compare false), so a row of raw logits gets the
 * pick the sampler's NaN -> -inf rule gives; an all-NaN / -inf row returns token 0. When asked,
 * the same pass writes y back (processed logprobs read it; NaN stays NaN there).
 *
 * Rows can be read straight from the model's logits (row order[r]) with a few tokens' values
 * taken from the sampler's work buffer instead (patch ids: penalties, logit_bias, bans): the
 * ids go into a per-thread bit set, and a vector holding one of them blends the patched values
 * in, so the row is still read once.
 *
 * winnow_slice_pick is the thresholded route's pick on a row's sorted top-n candidate slice
 * (routes.Routes._pick, in C): top_k -> top_p -> min_p survivors, XTC, the noise and the pick,
 * and the flag for a slice that may miss a survivor.
 */
#include <immintrin.h>
#include <math.h>
#include <float.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define FMIX_1 0x85EBCA6Bu
#define FMIX_2 0xC2B2AE35u
/* c = float_bits(float(w >> 8)) * C_SCALE + C_OFFSET: (log2 lower bound - 32) * ln 2 - margin */
#define C_SCALE (0x1p-23f * 0.693147180559945f)
#define C_OFFSET (-151.0f * 0.693147180559945f - 1e-3f)

/* Tokens ahead of the loop to prefetch, without keeping them in the outer caches (NTA): the
 * row streams through once, and the token-mix table read beside it stays cached. */
#define PREFETCH 1024

static int use_avx512 = 0;

static inline uint32_t fmix32(uint32_t x) {
  x ^= x >> 16;
  x *= FMIX_1;
  x ^= x >> 13;
  x *= FMIX_2;
  return x ^ (x >> 16);
}

/* The constant of the division-free bound test for the best score so far (see the top);
 * +inf while nothing has been scored, so that every finite token is scored. */
static inline float bound_offset(float best) {
  double margin = (fabs((double)best) + 64.0) * 0x1p-20;
  return (float)((margin - (double)best - (double)C_OFFSET) / (double)C_SCALE);
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

/* The 8 bits of `set` (one bit per token) for tokens j..j+7, j a multiple of 8. */
static inline uint32_t bits8(const uint32_t *set, int64_t j) {
  return (set[j >> 5] >> (j & 24)) & 0xFFu;
}

static inline float patched(const float *z, const float *patch, const uint32_t *set, int64_t j) {
  return set && (set[j >> 5] >> (j & 31) & 1u) ? patch[j] : z[j];
}

static int64_t row_avx2(const float *z, const float *patch, const uint32_t *set,
                        const uint32_t *mix, float *y_out, int64_t vocab, float t, uint32_t key) {
  float best = -INFINITY;
  int64_t best_j = 0, j = 0;
  const __m256 tv = _mm256_set1_ps(t), big = _mm256_set1_ps(FLT_MAX);
  const __m256i keyv = _mm256_set1_epi32((int)key), ones = _mm256_set1_epi32(-1);
  const __m256 a = _mm256_set1_ps(1.0f / t / C_SCALE);
  __m256 b = _mm256_set1_ps(bound_offset(best));
  const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  for (; j + 8 <= vocab; j += 8) {
    if (!(j & 15)) _mm_prefetch((const char *)(z + j + PREFETCH), _MM_HINT_NTA);
    __m256 x = _mm256_loadu_ps(z + j);
    uint32_t hit = set ? bits8(set, j) : 0;
    if (hit) {
      __m256i sel = _mm256_and_si256(_mm256_set1_epi32((int)hit), lane_bit);
      __m256 use = _mm256_castsi256_ps(_mm256_cmpeq_epi32(sel, lane_bit));
      x = _mm256_blendv_ps(x, _mm256_loadu_ps(patch + j), use);
    }
    if (y_out) _mm256_storeu_ps(y_out + j, _mm256_min_ps(big, _mm256_div_ps(_mm256_min_ps(big, x), tv)));
    __m256i bits = fmix32_8(_mm256_xor_si256(keyv, _mm256_loadu_si256((const __m256i *)(mix + j))));
    __m256 w = _mm256_cvtepi32_ps(_mm256_srli_epi32(_mm256_xor_si256(bits, ones), 8));
    __m256 k = _mm256_cvtepi32_ps(_mm256_castps_si256(w));
    int hits = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_fmadd_ps(x, a, b), k, _CMP_GT_OQ));
    if (hits) {
      float xs[8];
      _mm256_storeu_ps(xs, x);
      for (; hits; hits &= hits - 1) {
        int lane = __builtin_ctz(hits);
        consider(y_of(xs[lane], t), key, mix[j + lane], j + lane, &best, &best_j);
      }
      b = _mm256_set1_ps(bound_offset(best));
    }
  }
  for (; j < vocab; j++) {
    float y = y_of(patched(z, patch, set, j), t);
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

static AVX512 int64_t row_avx512(const float *z, const float *patch, const uint32_t *set,
                                 const uint32_t *mix, float *y_out, int64_t vocab, float t,
                                 uint32_t key) {
  float best = -INFINITY;
  int64_t best_j = 0, j = 0;
  const __m512 tv = _mm512_set1_ps(t), big = _mm512_set1_ps(FLT_MAX);
  const __m512i keyv = _mm512_set1_epi32((int)key), ones = _mm512_set1_epi32(-1);
  const __m512 a = _mm512_set1_ps(1.0f / t / C_SCALE);
  __m512 b = _mm512_set1_ps(bound_offset(best));
  for (; j + 16 <= vocab; j += 16) {
    _mm_prefetch((const char *)(z + j + PREFETCH), _MM_HINT_NTA);
    __m512 x = _mm512_loadu_ps(z + j);
    __mmask16 hit = set ? (__mmask16)(set[j >> 5] >> (j & 16)) : 0;
    if (hit) x = _mm512_mask_loadu_ps(x, hit, patch + j);
    if (y_out) _mm512_storeu_ps(y_out + j, _mm512_min_ps(big, _mm512_div_ps(_mm512_min_ps(big, x), tv)));
    __m512i bits = fmix32_16(_mm512_xor_si512(keyv, _mm512_loadu_si512(mix + j)));
    __m512 w = _mm512_cvtepi32_ps(_mm512_srli_epi32(_mm512_xor_si512(bits, ones), 8));
    __m512 k = _mm512_cvtepi32_ps(_mm512_castps_si512(w));
    unsigned hits = _mm512_cmp_ps_mask(_mm512_fmadd_ps(x, a, b), k, _CMP_GT_OQ);
    if (hits) {
      float xs[16];
      _mm512_storeu_ps(xs, x);
      for (; hits; hits &= hits - 1) {
        int lane = __builtin_ctz(hits);
        consider(y_of(xs[lane], t), key, mix[j + lane], j + lane, &best, &best_j);
      }
      b = _mm512_set1_ps(bound_offset(best));
    }
  }
  for (; j < vocab; j++) {
    float y = y_of(patched(z, patch, set, j), t);
    if (y_out) y_out[j] = y;
    consider(y, key, mix[j], j, &best, &best_j);
  }
  return best_j;
}

/* Set (or clear) the bits of a row's patch ids (-1: padding) in a bit set of the vocabulary. */
static void mark(uint32_t *set, const int64_t *ids, int64_t width, int on) {
  for (int64_t i = 0; i < width; i++) {
    if (ids[i] < 0) continue;
    uint32_t bit = 1u << (ids[i] & 31);
    set[ids[i] >> 5] = on ? set[ids[i] >> 5] | bit : set[ids[i] >> 5] & ~bit;
  }
}

/* Rows r < rows: row order[r] of z (r without an order; row stride `stride`, float32), token[r]
 * as described at the top. keys[r] are the rows' 32-bit Gumbel-stream keys (int64 holding
 * [0, 2^32)); temperature[r] > 0; mix[j] = token_mix(j) for j < vocab.
 * patch_ids [rows, width] (NULL: none): tokens whose value is patch[r * vocab + id] instead.
 * y_out (row stride `stride`, may be z itself; not with an order or patches) receives y. */
void winnow_gumbel_argmax(const float *z, int64_t rows, int64_t vocab, int64_t stride,
                          const int64_t *order, const int64_t *patch_ids, int64_t width,
                          const float *patch, const float *temperature, const int64_t *keys,
                          const uint32_t *mix, float *y_out, int64_t *tokens, int nthreads) {
#pragma omp parallel num_threads(nthreads) if (rows > 1)
  {
    uint32_t *set = patch_ids ? calloc((size_t)(vocab + 31) / 32 + 1, sizeof(uint32_t)) : NULL;
    float *dense = patch_ids ? malloc(sizeof(float) * vocab) : NULL;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
      const float *zr = z + (order ? order[r] : r) * stride;
      const float *pr = dense;
      float *yr = y_out ? y_out + r * stride : NULL;
      uint32_t key = (uint32_t)keys[r];
      if (set) { /* the patched values into a thread-local row: their cache misses overlap */
        mark(set, patch_ids + r * width, width, 1);
        for (int64_t i = 0; i < width; i++)
          if (patch_ids[r * width + i] >= 0)
            dense[patch_ids[r * width + i]] = patch[r * vocab + patch_ids[r * width + i]];
      }
      tokens[r] = use_avx512 ? row_avx512(zr, pr, set, mix, yr, vocab, temperature[r], key)
                             : row_avx2(zr, pr, set, mix, yr, vocab, temperature[r], key);
      if (set) mark(set, patch_ids + r * width, width, 0);
    }
    free(set);
    free(dense);
  }
}

#define GUMBEL_STREAM 0x243F6A88u
#define XTC_STREAM 0x85A308D3u

/* noise.row_keys for one row. */
static uint32_t row_key(int64_t seed, int64_t position, uint32_t stream) {
  uint32_t h = fmix32((uint32_t)seed ^ stream);
  h = fmix32(h ^ (uint32_t)((uint64_t)seed >> 32));
  return fmix32(h ^ (uint32_t)position);
}

/* One row's parameters for winnow_slice_pick (field order = the caller's ctypes structure). */
typedef struct {
  float temperature, top_p, min_p, xtc_probability, xtc_threshold;
  int64_t top_k, seed, position;
  double total_mass, total_mass_hi; /* bounds on the top_p normaliser of a row without top_k */
} slice_row;

/* torch.cummax's rule: NaN, once seen, stays. */
static inline double cummax(double run, double x) {
  return isnan(run) ? run : isnan(x) || x > run ? x : run;
}

/* out[i] = keep[i] and the mass strictly more likely than token i's value group is < top_p
 * (weights / mass, summed in order; out may be keep). The survivors only grow with mass. */
static void nucleus(const float *ys, const double *weight, int64_t n, double mass, float top_p,
                    const unsigned char *keep, unsigned char *out) {
  double cum = 0.0, above = -INFINITY;
  for (int64_t i = 0; i < n; i++) {
    if (i == 0 || ys[i] != ys[i - 1]) above = cummax(above, cum);
    cum += weight[i] / mass;
    out[i] = keep[i] && above < (double)top_p;
  }
}

/* nucleus for a row without top_k, with the weights (as pick_row takes them) computed as it
 * goes: once the mass above reaches top_p (it only grows) no later token survives, so the exps
 * of the slice's tail are never taken. */
static void nucleus_open(const float *ys, float row_max, int64_t n, double mass, float top_p,
                         const unsigned char *keep, unsigned char *out) {
  double cum = 0.0, above = -INFINITY;
  int64_t i = 0;
  for (; i < n; i++) {
    if (i == 0 || ys[i] != ys[i - 1]) above = cummax(above, cum);
    if (!(above < (double)top_p)) break;
    cum += (keep[i] && ys[i] > -INFINITY ? (double)expf(ys[i] - row_max) : 0.0) / mass;
    out[i] = keep[i];
  }
  for (; i < n; i++) out[i] = 0;
}

/* The pick on one row's slice: values/ids [n] sorted by value descending (no NaN); scratch ys
 * [n] float, weight [n] double, keep and wide [n] bytes. Returns the token; *overflow as
 * truncation.slice_overflows; *undecided when the normaliser's bounds keep different tokens
 * (the token is then not the row's: the caller brings the exact normaliser). Every step is the
 * torch expression's, in the same precision. */
static int64_t pick_row(const float *values, const int64_t *ids, int64_t n, int64_t vocab,
                        const slice_row *p, const uint32_t *mix, float *ys, double *weight,
                        unsigned char *keep, unsigned char *wide, unsigned char *overflow,
                        unsigned char *undecided) {
  for (int64_t i = 0; i < n; i++) ys[i] = y_of(values[i], p->temperature);
  const float row_max = ys[0];
  const int k_on = p->top_k > 0;
  const float kth = ys[(p->top_k < 1 ? 1 : p->top_k > n ? n : p->top_k) - 1];
  const float floor_k = k_on ? kth : -INFINITY;
  for (int64_t i = 0; i < n; i++) keep[i] = ys[i] >= floor_k;
  *undecided = 0;
  if (p->top_p < 1.0f && !k_on) { /* the nucleus against the normaliser's bounds */
    if (p->total_mass == p->total_mass_hi) {
      nucleus_open(ys, row_max, n, p->total_mass, p->top_p, keep, keep);
    } else { /* the same survivors for both bounds are the survivors for the exact normaliser */
      nucleus_open(ys, row_max, n, p->total_mass_hi, p->top_p, keep, wide);
      nucleus_open(ys, row_max, n, p->total_mass, p->top_p, keep, keep);
      *undecided = memcmp(keep, wide, n) != 0;
    }
  } else if (p->top_p < 1.0f) { /* truncation.sorted_survivors' nucleus */
    double mass = 0.0;
    for (int64_t i = 0; i < n; i++) {
      weight[i] = keep[i] && ys[i] > -INFINITY ? (double)expf(ys[i] - row_max) : 0.0;
      mass += weight[i];
    }
    nucleus(ys, weight, n, mass, p->top_p, keep, keep);
  }
  if (p->min_p > 0.0f) {
    float floor_p = row_max + logf(p->min_p);
    for (int64_t i = 0; i < n; i++) keep[i] = keep[i] && ys[i] >= floor_p;
  }
  for (int64_t i = 0; i < n; i++) keep[i] = keep[i] || ys[i] == row_max;
  int apply = 0;
  if (p->xtc_probability > 0.0f && p->xtc_threshold <= 0.5f) {
    uint32_t bits = fmix32(row_key(p->seed, p->position, XTC_STREAM) ^ mix[0]);
    apply = ((double)bits + 0.5) * 0x1p-32 < (double)p->xtc_probability;
  }
  *overflow = 0;
  if (n < vocab) {
    float last = ys[n - 1];
    int reaches = k_on ? last >= kth : keep[n - 1];
    int xtc_zero = apply && p->xtc_threshold <= 0.0f;
    *overflow = reaches && (last > -INFINITY || ys[0] == -INFINITY || xtc_zero);
  }
  if (apply) { /* truncation.xtc_filter on the survivors */
    float kept_max = -INFINITY;
    for (int64_t i = 0; i < n; i++) kept_max = keep[i] && ys[i] > kept_max ? ys[i] : kept_max;
    double mass = 0.0;
    for (int64_t i = 0; i < n; i++) {
      weight[i] = keep[i] && ys[i] > -INFINITY ? (double)expf(ys[i] - kept_max) : 0.0;
      mass += weight[i];
    }
    float least = INFINITY;
    int64_t count = 0, keeper = -1;
    for (int64_t i = 0; i < n; i++) {
      if (!(keep[i] && weight[i] / mass >= (double)p->xtc_threshold)) continue;
      count++;
      least = ys[i] < least ? ys[i] : least;
    }
    for (int64_t i = 0; i < n; i++)
      if (keep[i] && weight[i] / mass >= (double)p->xtc_threshold && ys[i] == least)
        keeper = ids[i] > keeper ? ids[i] : keeper;
    if (count >= 2)
      for (int64_t i = 0; i < n; i++)
        if (keep[i] && weight[i] / mass >= (double)p->xtc_threshold && ids[i] != keeper) keep[i] = 0;
  }
  uint32_t key = row_key(p->seed, p->position, GUMBEL_STREAM);
  float best = -INFINITY;
  int64_t token = vocab;
  for (int64_t i = 0; i < n; i++) {
    if (!keep[i]) continue;
    float s = ys[i] - noise_a(fmix32(key ^ mix[ids[i]]));
    if (s > best || (s == best && ids[i] < token)) {
      best = s;
      token = ids[i];
    }
  }
  return token;
}

/* The thresholded route's pick for rows r < rows of a candidate slice (values [rows, n] float32,
 * ids [rows, n] int64, each row sorted by value descending): tokens[r], overflow[r] and
 * undecided[r] (bytes; see pick_row). */
void winnow_slice_pick(const float *values, const int64_t *ids, int64_t rows, int64_t n,
                       int64_t vocab, const slice_row *params, const uint32_t *mix,
                       int64_t *tokens, unsigned char *overflow, unsigned char *undecided,
                       int nthreads) {
#pragma omp parallel num_threads(nthreads) if (rows > 1)
  {
    float *ys = malloc(sizeof(float) * n);
    double *weight = malloc(sizeof(double) * n);
    unsigned char *keep = malloc(2 * n);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; r++)
      tokens[r] = pick_row(values + r * n, ids + r * n, n, vocab, params + r, mix, ys, weight,
                           keep, keep + n, overflow + r, undecided + r);
    free(ys);
    free(weight);
    free(keep);
  }
}
