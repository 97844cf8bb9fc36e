/* Fused full-vocabulary Gumbel-max for the sampler's free route (x86-64, AVX2; AVX-512F where
 * the CPU has it, chosen at run time). Loaded through ctypes like cpu_kernels.c.
 *
 * For each row r and token j, with the counter-based noise of winnow/sampling/noise.py:
 *
 *   y_j   = min(min(z_j, FLT_MAX) / T_r, FLT_MAX)                    (float32, as torch divides)
 *   bits  = fmix32(key_r ^ mix_j),   mix_j = fmix32(j ^ TOKEN_SALT)
 *   a_j   = (float) log(-log((bits + 0.5) * 2^-32))                  (both logs in double)
 *   s_j   = y_j - a_j                                                (float32)
 *   token = the lowest j with the largest s_j
 *
 * which is the torch reference's pick bit for bit, as long as libm's double log rounds a_j to the
 * same float as torch's (1-ulp logs that differ in a double's last bit almost never straddle a
 * float rounding boundary; the tests compare picks and noise values).
 *
 * fmix32's first round (x ^= x >> 16) distributes over the xor with the key, so the caller's table
 * holds m_j = mix_j ^ (mix_j >> 16) and a row XORs in key_r ^ (key_r >> 16) before the rest of
 * the hash (fmix32_tail): two vector ops less per token, the same bits.
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
 * passes anyway, one far below cannot win). The AVX-512 loop (with AVX512CD) reads the bound off
 * the leading zeros instead: log2(1 - u) >= floor(log2 w) - 32 = -1 - lzcnt(w) (w | 1 keeps
 * lzcnt <= 31; its bound for 31 is -33, which holds for w = 0 and 1 too). Then y_j - c > best,
 * T > 0, is z_j > thr[lzcnt]: one permute of a 32-entry table built from best (thresholds16),
 * and a compare, with no conversion. The bound is up to ln 2 looser, so a few more tokens per
 * row get their exact score.
 *
 * A NaN logit never wins (its bound and score compare false), so a row of raw logits gets the
 * pick the sampler's NaN -> -inf rule gives; an all-NaN / -inf row returns token 0. When asked,
 * the same pass writes y back (processed logprobs read it; NaN stays NaN there).
 *
 * Rows can be read straight from the model's logits (row order[r]) with a few tokens' values
 * taken from elsewhere (patched tokens: penalties, logit_bias, bans): the ids go into a
 * per-thread bit set, the pass skips them (their lanes read as -inf), and they are scored after
 * it from a short list of (id, value), behind the same bound test, so the row is read once and
 * nothing vocabulary-sized is written. The values come from the sampler's work buffer
 * (winnow_gumbel_argmax) or, for rows whose only stages before the pick are penalties,
 * logit_bias and the min_tokens ban, straight from the sampler's tables (winnow_gumbel_step: the
 * sampler's whole step, with no torch op and no copy). A second bit set, one bit per 16-token
 * block, lets the pass run its unmasked loop up to the next block holding a patched token.
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
#define LN2 0.693147180559945
#define A_SLACK 1e-3 /* below log(1 - u): covers the double logs' and the float rounding of a_j */
/* c = float_bits(float(w >> 8)) * C_SCALE + C_OFFSET: (log2 lower bound - 32) * ln 2 - A_SLACK */
#define C_SCALE (0x1p-23f * (float)LN2)
#define C_OFFSET (-151.0f * (float)LN2 - (float)A_SLACK)

/* Tokens ahead of the loop to prefetch into L2 (T1): far enough ahead to cover a miss to memory
 * at the loop's pace, and not into L1, where the token-mix table read beside it lives
 * (bench/sampler.py measured NTA and T0 at 4-16 KB ahead slower, with the row read from memory). */
#define PREFETCH 4096

static int use_avx512 = 0;

/* fmix32 after its first round: fmix32(x) = fmix32_tail(first_round(x)). */
static inline uint32_t fmix32_tail(uint32_t x) {
  x *= FMIX_1;
  x ^= x >> 13;
  x *= FMIX_2;
  return x ^ (x >> 16);
}

static inline uint32_t first_round(uint32_t x) { return x ^ (x >> 16); }

static inline uint32_t fmix32(uint32_t x) { return fmix32_tail(first_round(x)); }

/* The hash bits of a token: key1 = first_round(row key), m = the table's entry. */
static inline uint32_t noise_bits(uint32_t key1, uint32_t m) { return fmix32_tail(key1 ^ m); }

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
  use_avx512 = wanted_avx512 && __builtin_cpu_supports("avx512f") &&
               __builtin_cpu_supports("avx512cd");
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
static inline void consider(float y, uint32_t key1, uint32_t m, int64_t j, float *best,
                            int64_t *best_j) {
  float s = y - noise_a(noise_bits(key1, m));
  if (s > *best) {
    *best = s;
    *best_j = j;
  }
}

static inline __m256i fmix32_tail8(__m256i x) {
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32((int)FMIX_1));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 13));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32((int)FMIX_2));
  return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
}

/* A row's patched tokens, per thread: one bit per token and one per 16-token block. */
typedef struct {
  uint32_t *tokens;
  uint64_t *blocks;
} marks;

static marks marks_new(int64_t vocab) {
  marks m = {calloc((size_t)(vocab + 31) / 32 + 1, sizeof(uint32_t)),
             calloc((size_t)(vocab + 1023) / 1024 + 1, sizeof(uint64_t))};
  return m;
}

static void marks_free(marks m) {
  free(m.tokens);
  free(m.blocks);
}

static inline int marked(const marks *m, int64_t id) { return m->tokens[id >> 5] >> (id & 31) & 1u; }

static inline void mark_one(marks *m, int64_t id) {
  m->tokens[id >> 5] |= 1u << (id & 31);
  m->blocks[id >> 10] |= 1ull << ((id >> 4) & 63);
}

/* Unmark every id of ids[:n] (-1: padding), the words that hold them being all marked ids'. */
static void unmark(marks *m, const int64_t *ids, int64_t n) {
  for (int64_t i = 0; i < n; i++) {
    if (ids[i] < 0) continue;
    m->tokens[ids[i] >> 5] = 0;
    m->blocks[ids[i] >> 10] = 0;
  }
}

/* The first token of the first block at or after token j (a multiple of 16) with a marked
 * token, or `end` (a multiple of 16) when there is none before it. */
static inline int64_t next_marked(const marks *m, int64_t j, int64_t end) {
  int64_t block = j >> 4, w = block >> 6;
  uint64_t word = m->blocks[w] >> (block & 63);
  if (word) {
    int64_t at = (block + __builtin_ctzll(word)) << 4;
    return at < end ? at : end;
  }
  for (w++; w << 10 < end; w++)
    if (m->blocks[w]) {
      int64_t at = ((w << 6) + __builtin_ctzll(m->blocks[w])) << 4;
      return at < end ? at : end;
    }
  return end;
}

/* Tokens j..j+7 of the pass (AVX2): `skip` (8 bits) marks lanes that read as -inf. */
static inline __attribute__((always_inline)) void step8(const float *z, const uint32_t *mix,
                                                       float *y_out, int64_t j, uint32_t skip,
                                                       float t, uint32_t key1, __m256 a,
                                                       __m256 *b, float *best, int64_t *best_j) {
  const __m256 big = _mm256_set1_ps(FLT_MAX);
  __m256 x = _mm256_loadu_ps(z + j);
  if (skip) {
    const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    __m256i sel = _mm256_and_si256(_mm256_set1_epi32((int)skip), lane_bit);
    x = _mm256_blendv_ps(x, _mm256_set1_ps(-INFINITY),
                         _mm256_castsi256_ps(_mm256_cmpeq_epi32(sel, lane_bit)));
  }
  if (y_out) _mm256_storeu_ps(y_out + j, _mm256_min_ps(big, _mm256_div_ps(_mm256_min_ps(big, x), _mm256_set1_ps(t))));
  __m256i bits = fmix32_tail8(_mm256_xor_si256(_mm256_set1_epi32((int)key1), _mm256_loadu_si256((const __m256i *)(mix + j))));
  __m256 w = _mm256_cvtepi32_ps(_mm256_srli_epi32(_mm256_xor_si256(bits, _mm256_set1_epi32(-1)), 8));
  __m256 k = _mm256_cvtepi32_ps(_mm256_castps_si256(w));
  int hits = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_fmadd_ps(x, a, *b), k, _CMP_GT_OQ));
  if (hits) {
    float xs[8];
    _mm256_storeu_ps(xs, x);
    for (; hits; hits &= hits - 1) {
      int lane = __builtin_ctz(hits);
      consider(y_of(xs[lane], t), key1, mix[j + lane], j + lane, best, best_j);
    }
    *b = _mm256_set1_ps(bound_offset(*best));
  }
}

/* The pass over one row's tokens that are not marked in `m` (NULL: none), folded into *best /
 * *best_j (the caller starts them at -inf / 0). */
static void row_avx2(const float *z, const marks *m, const uint32_t *mix, float *y_out,
                     int64_t vocab, float t, uint32_t key1, float *best_out, int64_t *best_j_out) {
  float best = *best_out;
  int64_t best_j = *best_j_out, j = 0;
  const __m256 a = _mm256_set1_ps(1.0f / t / C_SCALE);
  __m256 b = _mm256_set1_ps(bound_offset(best));
  const int64_t whole = vocab & ~(int64_t)15;
  while (j < whole) {
    const int64_t stop = m ? next_marked(m, j, whole) : whole;
    for (; j < stop; j += 16) {
      _mm_prefetch((const char *)(z + j + PREFETCH), _MM_HINT_T1);
      step8(z, mix, y_out, j, 0, t, key1, a, &b, &best, &best_j);
      step8(z, mix, y_out, j + 8, 0, t, key1, a, &b, &best, &best_j);
    }
    if (j < whole) {
      uint32_t skip = m->tokens[j >> 5] >> (j & 16);
      step8(z, mix, y_out, j, skip & 0xFFu, t, key1, a, &b, &best, &best_j);
      step8(z, mix, y_out, j + 8, (skip >> 8) & 0xFFu, t, key1, a, &b, &best, &best_j);
      j += 16;
    }
  }
  for (; j < vocab; j++) {
    if (m && marked(m, j)) continue;
    float y = y_of(z[j], t);
    if (y_out) y_out[j] = y;
    consider(y, key1, mix[j], j, &best, &best_j);
  }
  *best_out = best;
  *best_j_out = best_j;
}

#define AVX512 __attribute__((target("avx512f,avx512cd")))

/* ~fmix32_tail(x) | 1, 16 lanes: the complement's last round and the low bit in one ternary op
 * (0xEB: ~(a ^ b) | c). */
static inline AVX512 __m512i flipped_tail16(__m512i x) {
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32((int)FMIX_1));
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 13));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32((int)FMIX_2));
  return _mm512_ternarylogic_epi32(x, _mm512_srli_epi32(x, 16), _mm512_set1_epi32(1), 0xEB);
}

/* thr[l] (l < 32, lanes 0-15 in *lo, 16-31 in *hi): a z_j <= thr[l] cannot beat `best` at
 * temperature t when lzcnt(~bits | 1) = l. With c_l = -(l + 1) ln 2 - A_SLACK (l < 31; -33 ln 2 -
 * A_SLACK for 31) bounding a_j from below, thr[l] = (best + c_l) t less a margin (relative to
 * |best| + 25 > |best| + |c_l|) that covers the float rounding of this sum, of z_j / t and of the
 * table itself; -inf while nothing has been scored. */
static inline AVX512 void thresholds16(float best, float t, __m512 *lo, __m512 *hi) {
  const double margin = ((fabs((double)best) + 25.0) * (double)t) * 0x1p-20;
  const __m512 base = _mm512_set1_ps((float)(((double)best - A_SLACK) * (double)t - margin));
  const __m512 step = _mm512_set1_ps(-(float)(LN2 * (double)t));
  const __m512 low = _mm512_setr_ps(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16);
  const __m512 high = _mm512_setr_ps(17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 33);
  *lo = _mm512_fmadd_ps(low, step, base);
  *hi = _mm512_fmadd_ps(high, step, base);
}

/* Tokens j..j+15 of the pass (AVX-512): `skip` marks lanes that read as -inf. */
static inline __attribute__((always_inline)) AVX512 void step16(
    const float *z, const uint32_t *mix, float *y_out, int64_t j, __mmask16 skip, float t,
    uint32_t key1, __m512 *lo, __m512 *hi, float *best, int64_t *best_j) {
  const __m512 big = _mm512_set1_ps(FLT_MAX);
  _mm_prefetch((const char *)(z + j + PREFETCH), _MM_HINT_T1);
  __m512 x = _mm512_loadu_ps(z + j);
  if (skip) x = _mm512_mask_mov_ps(x, skip, _mm512_set1_ps(-INFINITY));
  if (y_out) _mm512_storeu_ps(y_out + j, _mm512_min_ps(big, _mm512_div_ps(_mm512_min_ps(big, x), _mm512_set1_ps(t))));
  __m512i w = flipped_tail16(_mm512_xor_si512(_mm512_set1_epi32((int)key1), _mm512_loadu_si512(mix + j)));
  __m512 thr = _mm512_permutex2var_ps(*lo, _mm512_lzcnt_epi32(w), *hi);
  unsigned hits = _mm512_cmp_ps_mask(x, thr, _CMP_GT_OQ);
  if (hits) {
    float xs[16];
    _mm512_storeu_ps(xs, x);
    for (; hits; hits &= hits - 1) {
      int lane = __builtin_ctz(hits);
      consider(y_of(xs[lane], t), key1, mix[j + lane], j + lane, best, best_j);
    }
    thresholds16(*best, t, lo, hi);
  }
}

static AVX512 void row_avx512(const float *z, const marks *m, const uint32_t *mix,
                              float *y_out, int64_t vocab, float t, uint32_t key1,
                              float *best_out, int64_t *best_j_out) {
  float best = *best_out;
  int64_t best_j = *best_j_out, j = 0;
  __m512 lo, hi;
  thresholds16(best, t, &lo, &hi);
  const int64_t whole = vocab & ~(int64_t)15;
  while (j < whole) {
    const int64_t stop = m ? next_marked(m, j, whole) : whole;
    for (; j < stop; j += 16) step16(z, mix, y_out, j, 0, t, key1, &lo, &hi, &best, &best_j);
    if (j < whole) {
      step16(z, mix, y_out, j, (__mmask16)(m->tokens[j >> 5] >> (j & 16)), t, key1, &lo, &hi,
             &best, &best_j);
      j += 16;
    }
  }
  for (; j < vocab; j++) {
    if (m && marked(m, j)) continue;
    float y = y_of(z[j], t);
    if (y_out) y_out[j] = y;
    consider(y, key1, mix[j], j, &best, &best_j);
  }
  *best_out = best;
  *best_j_out = best_j;
}

/* One row's pick: the pass over the tokens not marked in `m` (NULL: none), then the patched
 * tokens ids[i] (-1: padding; any order, repeats with the same value) with values vals[i], each
 * scored exactly where the pass's bound test says it may beat the best so far (ties -> the
 * lower id). */
static int64_t whole_row(const float *z, const marks *m, const int64_t *ids,
                         const float *vals, int64_t n, const uint32_t *mix, float *y_out,
                         int64_t vocab, float t, uint32_t key) {
  const uint32_t key1 = first_round(key);
  float best = -INFINITY;
  int64_t best_j = 0;
  if (use_avx512)
    row_avx512(z, m, mix, y_out, vocab, t, key1, &best, &best_j);
  else
    row_avx2(z, m, mix, y_out, vocab, t, key1, &best, &best_j);
  const float a = 1.0f / t / C_SCALE;
  float b = bound_offset(best);
  for (int64_t i = 0; i < n; i++) {
    if (ids[i] < 0) continue;
    uint32_t bits = noise_bits(key1, mix[ids[i]]), w_bits;
    float w = (float)(int32_t)(~bits >> 8);
    memcpy(&w_bits, &w, sizeof w);
    if (!(fmaf(vals[i], a, b) > (float)(int32_t)w_bits)) continue; /* the pass's bound test */
    float s = y_of(vals[i], t) - noise_a(bits);
    if (s > best || (s == best && ids[i] < best_j)) {
      best = s;
      best_j = ids[i];
      b = bound_offset(best);
    }
  }
  return best_j;
}

/* Rows r < rows: row order[r] of z (r without an order; row stride `stride`, float32), token[r]
 * as described at the top. keys[r] are the rows' 32-bit Gumbel-stream keys (int64 holding
 * [0, 2^32)); temperature[r] > 0; mix[j] = first_round(token_mix(j)) for j < vocab.
 * patch_ids [rows, width] (NULL: none): tokens whose value is patch[r * vocab + id] instead.
 * y_out (row stride `stride`, may be z itself; not with an order or patches) receives y. */
void winnow_gumbel_argmax(const float *z, int64_t rows, int64_t vocab, int64_t stride,
                          const int64_t *order, const int64_t *patch_ids, int64_t width,
                          const float *patch, const float *temperature, const int64_t *keys,
                          const uint32_t *mix, float *y_out, int64_t *tokens, int nthreads) {
#pragma omp parallel num_threads(nthreads) if (rows > 1)
  {
    marks m = marks_new(patch_ids ? vocab : 0);
    float *vals = malloc(sizeof(float) * (width + 1));
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
      const int64_t *ids = patch_ids ? patch_ids + r * width : NULL;
      for (int64_t i = 0; i < width; i++) /* the loads below miss together */
        if (ids[i] >= 0) _mm_prefetch((const char *)(patch + r * vocab + ids[i]), _MM_HINT_T0);
      for (int64_t i = 0; i < width; i++) {
        if (ids[i] < 0) continue;
        mark_one(&m, ids[i]);
        vals[i] = patch[r * vocab + ids[i]];
      }
      tokens[r] = whole_row(z + (order ? order[r] : r) * stride, patch_ids ? &m : NULL, ids, vals,
                           width, mix, y_out ? y_out + r * stride : NULL, vocab, temperature[r],
                           (uint32_t)keys[r]);
      unmark(&m, ids, width);
    }
    marks_free(m);
    free(vals);
  }
}

static inline float clean(float x) { return isnan(x) ? -INFINITY : (x > FLT_MAX ? FLT_MAX : x); }

#define GUMBEL_STREAM 0x243F6A88u
#define XTC_STREAM 0x85A308D3u

/* noise.row_keys for one row. */
static uint32_t row_key(int64_t seed, int64_t position, uint32_t stream) {
  uint32_t h = fmix32((uint32_t)seed ^ stream);
  h = fmix32(h ^ (uint32_t)((uint64_t)seed >> 32));
  return fmix32(h ^ (uint32_t)position);
}

/* A row's penalised tokens (stage 1, as penalties.PenaltyHistory.apply computes them, each
 * operation rounded to float32 as torch's are): every distinct id of output[:olen] (at its first
 * occurrence k, where counts[k] > 0) and, with repetition r != 1, of prompt[:plen] (distinct
 * already) gets z' = z > 0 ? z / r : z * r on the cleaned logit z; the output ids then
 * (z' - c * f) - p. Fills ids / vals (the output ids first, at[i] = their k), marks the ids in
 * `m`; returns how many, *outputs how many of them are output ids. */
__attribute__((optimize("fp-contract=off"))) static int64_t penalise_row(
    const float *z, const int64_t *prompt, int64_t plen, const int64_t *output,
    const int32_t *counts, int64_t olen, const float *penalty, marks *m, int64_t *ids,
    float *vals, int64_t *at, int64_t *outputs) {
  const float r = penalty[0], f = penalty[1], p = penalty[2];
  const int repeat = r != 1.0f, freq_pres = f != 0.0f || p != 0.0f;
  int64_t n = 0;
  for (int64_t k = 0; k < olen; k++) { /* the loads below miss together, not one by one */
    _mm_prefetch((const char *)(z + output[k]), _MM_HINT_T0);
    _mm_prefetch((const char *)(m->tokens + (output[k] >> 5)), _MM_HINT_T0);
  }
  for (int64_t k = 0; k < olen; k++) {
    const int32_t c = counts[k];
    if (c <= 0) continue;
    const int64_t id = output[k];
    float v = clean(z[id]);
    if (repeat) v = v > 0 ? v / r : v * r;
    if (freq_pres) {
      float scaled = (float)c * f, left = v - scaled;
      v = left - 1.0f * p;
    }
    mark_one(m, id);
    ids[n] = id;
    at[n] = k;
    vals[n++] = v;
  }
  *outputs = n;
  for (int64_t k = 0; repeat && k < plen; k++) {
    const int64_t id = prompt[k];
    if (marked(m, id)) continue;
    float v = clean(z[id]);
    mark_one(m, id);
    ids[n] = id;
    vals[n++] = v > 0 ? v / r : v * r;
  }
  return n;
}

/* The index of `id` in ids (the caller knows it is there: it is marked). */
static inline int64_t find(const int64_t *ids, int64_t id) {
  int64_t i = 0;
  while (ids[i] != id) i++;
  return i;
}

/* A row's stage 2 (as sampler.Sampler._penalise applies it, in float32) on top of its n
 * penalised tokens in ids / vals: each bias_ids[i] gets its value plus bias[i] (its penalised
 * value, or its cleaned logit), then each of bans[:nban] is -inf. New ids are appended and marked
 * in `m`; returns the list's length. */
__attribute__((optimize("fp-contract=off"))) static int64_t edit_row(
    const float *z, const int64_t *bias_ids, const float *bias, int64_t nbias,
    const int64_t *bans, int64_t nban, marks *m, int64_t *ids, float *vals, int64_t n) {
  for (int64_t i = 0; i < nbias; i++) /* the loads below miss together */
    _mm_prefetch((const char *)(z + bias_ids[i]), _MM_HINT_T0);
  for (int64_t i = 0; i < nbias; i++) {
    const int64_t id = bias_ids[i];
    if (marked(m, id)) {
      vals[find(ids, id)] += bias[i];
      continue;
    }
    mark_one(m, id);
    ids[n] = id;
    vals[n++] = clean(z[id]) + bias[i];
  }
  for (int64_t i = 0; i < nban; i++) {
    const int64_t id = bans[i];
    if (marked(m, id)) {
      vals[find(ids, id)] = -INFINITY;
      continue;
    }
    mark_one(m, id);
    ids[n] = id;
    vals[n++] = -INFINITY;
  }
  return n;
}

/* The sampler's plain temperature step in one call: for rows r < rows of z (row stride
 * `stride`, float32), the token winnow_gumbel_argmax picks with the row key of (seeds[r],
 * positions[r]) after the row's stages 1-2, read straight from the sampler's tables. Row r is
 * slot slots[r] (slots NULL: no row has any table to read).
 * Penalties (prompt NULL: no row has any): the slot's distinct prompt ids are
 * prompt[slot * prompt_stride + :plen[r]] and its output ids and counts output[slot * out_stride
 * + :olen[r]] / counts[slot * count_stride + ...], penalised with penalty[r] = (repetition,
 * frequency, presence); olen[r] < 0: a row without penalties (its slot's tables are not read).
 * Then stage 2 (bias_ids NULL: no row has a bias or a ban): logit_bias's distinct ids and values
 * bias_ids / bias[slot * bias_stride + :nbias[r]], and the ids the min_tokens ban holds at -inf
 * this step, bans[slot * ban_stride + :nban[r]].
 * The picked token is then recorded as penalties.PenaltyHistory.record does, at column olen[r]
 * (the caller has made room): its first occurrence counts one more, or the new column 1. */
void winnow_gumbel_step(const float *z, int64_t rows, int64_t vocab, int64_t stride,
                        const int64_t *seeds, const int64_t *positions, const float *temperature,
                        const uint32_t *mix, const int64_t *slots, const float *penalty,
                        const int64_t *prompt, int64_t prompt_stride, const int64_t *plen,
                        int64_t *output, int64_t out_stride, int32_t *counts,
                        int64_t count_stride, const int64_t *olen, const int64_t *bias_ids,
                        const float *bias, int64_t bias_stride, const int64_t *nbias,
                        const int64_t *bans, int64_t ban_stride, const int64_t *nban,
                        int64_t *tokens, int nthreads) {
  int64_t most = 1;
  for (int64_t r = 0; slots && r < rows; r++) {
    int64_t n = prompt && olen[r] >= 0 ? plen[r] + olen[r] : 0;
    n += bias_ids ? nbias[r] + nban[r] : 0;
    most = n > most ? n : most;
  }
#pragma omp parallel num_threads(nthreads) if (rows > 1)
  {
    marks m = marks_new(slots ? vocab : 0);
    int64_t *ids = slots ? malloc(2 * sizeof(int64_t) * most) : NULL;
    float *vals = slots ? malloc(sizeof(float) * most) : NULL;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
      const float *zr = z + r * stride;
      int64_t n = 0, outputs = 0, len = prompt ? olen[r] : -1;
      int64_t *out = len >= 0 ? output + slots[r] * out_stride : NULL;
      int32_t *count = len >= 0 ? counts + slots[r] * count_stride : NULL;
      if (len >= 0)
        n = penalise_row(zr, prompt + slots[r] * prompt_stride, plen[r], out, count, len,
                         penalty + 3 * r, &m, ids, vals, ids + most, &outputs);
      if (bias_ids)
        n = edit_row(zr, bias_ids + slots[r] * bias_stride, bias + slots[r] * bias_stride,
                     nbias[r], bans + slots[r] * ban_stride, nban[r], &m, ids, vals, n);
      const int64_t token =
          whole_row(zr, n ? &m : NULL, ids, vals, n, mix, NULL, vocab, temperature[r],
                    row_key(seeds[r], positions[r], GUMBEL_STREAM));
      tokens[r] = token;
      if (len >= 0) {
        int64_t k = len;
        for (int64_t i = 0; i < outputs && k == len; i++) k = ids[i] == token ? ids[most + i] : k;
        if (k < len) count[k] += 1;
        out[len] = token;
        count[len] = k == len;
      }
      unmark(&m, ids, n);
    }
    marks_free(m);
    free(ids);
    free(vals);
  }
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
    uint32_t bits = noise_bits(first_round(row_key(p->seed, p->position, XTC_STREAM)), mix[0]);
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
  const uint32_t key1 = first_round(row_key(p->seed, p->position, GUMBEL_STREAM));
  float best = -INFINITY;
  int64_t token = vocab;
  for (int64_t i = 0; i < n; i++) {
    if (!keep[i]) continue;
    float s = ys[i] - noise_a(noise_bits(key1, mix[ids[i]]));
    if (s > best || (s == best && ids[i] < token)) {
      best = s;
      token = ids[i];
    }
  }
  return token;
}

/* The thresholded route's pick for rows r < rows of a candidate slice (values [rows, n] float32,
 * ids [rows, n] int64, each row sorted by value descending): tokens[r], overflow[r] and
 * undecided[r] (bytes; see pick_row); keep_out [rows, n] (NULL: not wanted) the survivors the
 * token was picked from (after truncation and XTC), for the row's processed logprobs. */
void winnow_slice_pick(const float *values, const int64_t *ids, int64_t rows, int64_t n,
                       int64_t vocab, const slice_row *params, const uint32_t *mix,
                       int64_t *tokens, unsigned char *overflow, unsigned char *undecided,
                       unsigned char *keep_out, int nthreads) {
#pragma omp parallel num_threads(nthreads) if (rows > 1)
  {
    float *ys = malloc(sizeof(float) * n);
    double *weight = malloc(sizeof(double) * n);
    unsigned char *keep = malloc(2 * n);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
      tokens[r] = pick_row(values + r * n, ids + r * n, n, vocab, params + r, mix, ys, weight,
                           keep, keep + n, overflow + r, undecided + r);
      if (keep_out) memcpy(keep_out + r * n, keep, n);
    }
    free(ys);
    free(weight);
    free(keep);
  }
}
