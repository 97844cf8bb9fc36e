/* Whole-row helpers for the sampler's thresholded route (x86-64, AVX2 + FMA; the scan also in
 * AVX-512F where the CPU has it, chosen at run time), through ctypes.
 *
 * winnow_top_candidates: the n largest values of each row and their ids, sorted by value
 *   descending (ties by id ascending; which of the tokens tied at the n-th value are taken is
 *   unspecified, as with torch.topk). One pass: a vector compare against the n-th best value
 *   so far drops almost every token; the few above it go to a buffer of 2n that is cut back to
 *   its best n whenever it fills.
 *
 * winnow_load_rows: the sampler's copy of the model's logits into its work buffer (NaN -> -inf,
 *   +inf -> FLT_MAX, rows in route order), one streaming pass.
 *
 * winnow_total_mass: sum_j exp(y_j - max y) in double over whole rows, y = min(z / T, FLT_MAX),
 *   the top_p normaliser (float32 exps, as torch takes them, from a polynomial within ~2 ulp of
 *   torch's; added in double, so neither the exp's last bit nor the order of the sum can
 *   realistically move a nucleus boundary).
 *
 * winnow_scan_rows: the thresholded route's one pass over a row: its top-n candidates and, where
 *   asked, its top_p normaliser, read straight from the model's logits (NaN -> -inf, +inf ->
 *   FLT_MAX on the fly) with the patched tokens' values (penalties, bias, bans) taken from the
 *   sampler's work buffer (gathered into a thread-local row first). The candidate threshold
 *   starts from a guess off a sample of the row (checked: without n tokens reaching it the row
 *   is scanned again without one). It goes through the row in chunks of CHUNK tokens, taking
 *   each chunk's maximum as it compares tokens with the n-th best so far. The normaliser comes
 *   as bounds [lo, hi] on sum_j exp(y_j - max y) (as total_mass computes it, whatever the last
 *   bits of its exps): chunks with a token within e^-NEAR of the maximum so far take float32
 *   exps as winnow_total_mass does (held to EXACT_SLACK), and the rest, the flat bulk of an
 *   LM's row, a cheap exp with a known error factor. With AVX2 it is two instructions: float
 *   bits 2^23 * (x log2 e + 127) read as a float are 2^floor(v) * (1 + frac(v)) for
 *   v = x log2 e, over 2^v by a factor in [1, 1.0616) (a chord of the convex 2^f); with AVX-512
 *   a quadratic for 2^frac(v), within [ROUGH16_LOW, ROUGH16_HIGH]. Both sums are kept against
 *   the running maximum (rescaled in double when it rises). The caller decides
 *   top_p with both bounds and asks for the exact sum only where they disagree.
 *
 * winnow_source_mass: winnow_total_mass of rows as winnow_scan_rows reads them, for the rows
 *   whose bounds leave their nucleus undecided.
 *
 * winnow_seed_patches / winnow_load_rows (with patch ids): the work buffer's patched tokens get
 *   the cleaned logits before the penalties apply; a row that needs all of z later (greedy, XTC
 *   without truncation, the fallbacks) is loaded around its patched values.
 *
 * winnow_penalise: the repetition / frequency / presence penalties on the work buffer's tokens,
 *   with penalties.PenaltyHistory.apply's float32 operations; winnow_record_tokens: the
 *   history's update after the step (PenaltyHistory.record), one call instead of a dozen
 *   small torch ops.
 */
#include <immintrin.h>
#include <float.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
  float v;
  int64_t id;
} entry;

/* a before b: larger value first, then lower id */
static inline int before(const entry *a, const entry *b) {
  return a->v > b->v || (a->v == b->v && a->id < b->id);
}

static int compare(const void *a, const void *b) {
  return before(a, b) ? -1 : before(b, a) ? 1 : 0;
}

/* Reorder buf[0..len) so that its best n come first (quickselect); n < len. */
static void select_best(entry *buf, int64_t len, int64_t n) {
  int64_t lo = 0, hi = len - 1;
  while (lo < hi) {
    entry pivot = buf[lo + (hi - lo) / 2];
    int64_t i = lo, j = hi;
    while (i <= j) {
      while (before(&buf[i], &pivot)) i++;
      while (before(&pivot, &buf[j])) j--;
      if (i <= j) {
        entry t = buf[i];
        buf[i++] = buf[j];
        buf[j--] = t;
      }
    }
    if (n - 1 <= j) hi = j;
    else if (n - 1 >= i) lo = i;
    else break;
  }
}

static void row_top(const float *z, int64_t vocab, int64_t n, entry *buf, float *values,
                    int64_t *ids) {
  int64_t cap = 2 * n, len = 0, j = 0;
  for (; j < vocab && len < cap; j++) buf[len++] = (entry){z[j], j};
  float threshold = -INFINITY;
  if (len == cap) {
    select_best(buf, len, n);
    len = n;
    threshold = buf[0].v;
    for (int64_t i = 1; i < n; i++) threshold = buf[i].v < threshold ? buf[i].v : threshold;
  }
  for (; j + 8 <= vocab; j += 8) {
    __m256 v = _mm256_loadu_ps(z + j);
    int hits = _mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_set1_ps(threshold), _CMP_GT_OQ));
    for (; hits; hits &= hits - 1) {
      int lane = __builtin_ctz(hits);
      float value = z[j + lane];
      if (!(value > threshold)) continue; /* the threshold rose within this vector */
      buf[len++] = (entry){value, j + lane};
      if (len == cap) {
        select_best(buf, len, n);
        len = n;
        threshold = buf[0].v;
        for (int64_t i = 1; i < n; i++) threshold = buf[i].v < threshold ? buf[i].v : threshold;
      }
    }
  }
  for (; j < vocab; j++) {
    if (z[j] > threshold || len < n) buf[len++] = (entry){z[j], j};
    if (len == cap) {
      select_best(buf, len, n);
      len = n;
    }
  }
  if (len > n) select_best(buf, len, n);
  qsort(buf, n, sizeof(entry), compare);
  for (int64_t i = 0; i < n; i++) {
    values[i] = buf[i].v;
    ids[i] = buf[i].id;
  }
}

/* Rows of z (row stride `stride`, no NaN): values[r, :n] and ids[r, :n] (contiguous), n <= vocab. */
void winnow_top_candidates(const float *z, int64_t rows, int64_t vocab, int64_t stride, int64_t n,
                           float *values, int64_t *ids, int nthreads) {
#pragma omp parallel num_threads(nthreads) if (rows > 1)
  {
    entry *buf = malloc(sizeof(entry) * 2 * n);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; r++) row_top(z + r * stride, vocab, n, buf, values + r * n, ids + r * n);
    free(buf);
  }
}

/* exp(x) for x <= 0 in float32 (Cephes' expf: x = k ln2 + f, |f| <= ln2 / 2, degree-5
 * polynomial); 0 below -87.3 (where float32 exp is 0 or subnormal: nothing a sum of terms >= 1
 * notices). */
static inline __m256 exp_neg(__m256 x) {
  const __m256 low = _mm256_set1_ps(-87.3f);
  __m256 under = _mm256_cmp_ps(x, low, _CMP_LT_OQ);
  x = _mm256_max_ps(x, low);
  __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 f = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);
  f = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), f);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, f), f, _mm256_add_ps(f, _mm256_set1_ps(1.0f)));
  __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(scale)));
}

static inline float y_of(float z, float t) {
  float y = (z > FLT_MAX ? FLT_MAX : z) / t;
  return y > FLT_MAX ? FLT_MAX : y;
}

/* max_z: the row's largest z when the caller knows it (y_of is monotone, so max y = y_of(max z)
 * and the max pass is skipped), else NULL. */
static double row_mass(const float *z, int64_t vocab, float t, const float *max_z) {
  const __m256 tv = _mm256_set1_ps(t), big = _mm256_set1_ps(FLT_MAX);
  int64_t j = 0;
  float m = -INFINITY;
  if (max_z) {
    m = y_of(*max_z, t);
  } else {
    __m256 mv = _mm256_set1_ps(-INFINITY);
    for (; j + 8 <= vocab; j += 8)
      mv = _mm256_max_ps(mv, _mm256_min_ps(big, _mm256_div_ps(_mm256_loadu_ps(z + j), tv)));
    float lanes[8];
    _mm256_storeu_ps(lanes, mv);
    for (int i = 0; i < 8; i++) m = lanes[i] > m ? lanes[i] : m;
    for (int64_t i = j; i < vocab; i++) m = y_of(z[i], t) > m ? y_of(z[i], t) : m;
  }
  if (m == -INFINITY) return NAN; /* torch: exp(-inf - -inf) */
  __m256d lo = _mm256_setzero_pd(), hi = _mm256_setzero_pd();
  for (j = 0; j + 8 <= vocab; j += 8) {
    __m256 y = _mm256_min_ps(big, _mm256_div_ps(_mm256_loadu_ps(z + j), tv));
    __m256 e = exp_neg(_mm256_sub_ps(y, _mm256_set1_ps(m)));
    lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
    hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)));
  }
  double sums[4], total = 0.0;
  _mm256_storeu_pd(sums, _mm256_add_pd(lo, hi));
  for (int i = 0; i < 4; i++) total += sums[i];
  for (; j < vocab; j++) total += (double)expf(y_of(z[j], t) - m);
  return total;
}

/* mass[r] = sum_j exp(y_j - max y) over rows of z (row stride `stride`, no NaN); max_z: each
 * row's largest z (contiguous), or NULL to find it. */
void winnow_total_mass(const float *z, int64_t rows, int64_t vocab, int64_t stride,
                       const float *temperature, const float *max_z, double *mass, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (rows > 1)
  for (int64_t r = 0; r < rows; r++)
    mass[r] = row_mass(z + r * stride, vocab, temperature[r], max_z ? max_z + r : NULL);
}

#define CHUNK 256
#define PREFETCH 1024 /* tokens ahead, not kept in the outer caches (NTA): the row streams once */

static inline __m256 clean8(__m256 x) {
  return _mm256_min_ps(_mm256_set1_ps(FLT_MAX), _mm256_max_ps(x, _mm256_set1_ps(-INFINITY)));
}

static inline float clean(float x) { return isnan(x) ? -INFINITY : (x > FLT_MAX ? FLT_MAX : x); }

/* dst[r] = src[order[r]] (src[r] when order is NULL) with NaN -> -inf and +inf -> FLT_MAX: the
 * sampler's load of the model's logits into its work buffer, in one streaming pass. Tokens in
 * patch_ids[r, :width] (-1: padding; NULL: none) keep the value dst already holds. */
void winnow_load_rows(const float *src, int64_t rows, int64_t vocab, int64_t stride,
                      const int64_t *order, float *dst, const int64_t *patch_ids, int64_t width,
                      int nthreads) {
#pragma omp parallel num_threads(nthreads) if (rows > 1)
  {
    float *kept = patch_ids ? malloc(sizeof(float) * (width + 1)) : NULL;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
      const float *s = src + (order ? order[r] : r) * stride;
      float *d = dst + r * vocab;
      const int64_t *ids = patch_ids ? patch_ids + r * width : NULL;
      for (int64_t i = 0; ids && i < width; i++) kept[i] = ids[i] >= 0 ? d[ids[i]] : 0.0f;
      int64_t j = 0;
      for (; j + 8 <= vocab; j += 8) _mm256_storeu_ps(d + j, clean8(_mm256_loadu_ps(s + j)));
      for (; j < vocab; j++) d[j] = clean(s[j]);
      for (int64_t i = 0; ids && i < width; i++)
        if (ids[i] >= 0) d[ids[i]] = kept[i];
    }
    free(kept);
  }
}

/* dst[r * vocab + id] = the cleaned src[order[r], id] for the ids in patch_ids[r, :width]. */
void winnow_seed_patches(const float *src, int64_t rows, int64_t vocab, int64_t stride,
                         const int64_t *order, float *dst, const int64_t *patch_ids,
                         int64_t width) {
  for (int64_t r = 0; r < rows; r++) {
    const float *s = src + (order ? order[r] : r) * stride;
    for (int64_t i = 0; i < width; i++) {
      int64_t id = patch_ids[r * width + i];
      if (id >= 0) dst[r * vocab + id] = clean(s[id]);
    }
  }
}

/* mass[i] = winnow_total_mass's value for work row r = rows[i] as winnow_scan_rows reads it
 * (src row order[r], cleaned, with the tokens in patch_ids[r, :width] taken from
 * patch[r * vocab + id]), built in a thread-local row: the exact normaliser of a row whose
 * bounds did not decide its nucleus, without loading it into the work buffer. */
void winnow_source_mass(const float *src, int64_t vocab, int64_t stride, const int64_t *order,
                        const int64_t *patch_ids, int64_t width, const float *patch,
                        const int64_t *rows, int64_t n, const float *temperature,
                        const float *max_z, double *mass, int nthreads) {
#pragma omp parallel num_threads(nthreads) if (n > 1)
  {
    float *row = malloc(sizeof(float) * vocab);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; i++) {
      const int64_t r = rows[i];
      const float *s = src + (order ? order[r] : r) * stride;
      int64_t j = 0;
      for (; j + 8 <= vocab; j += 8) _mm256_storeu_ps(row + j, clean8(_mm256_loadu_ps(s + j)));
      for (; j < vocab; j++) row[j] = clean(s[j]);
      for (int64_t k = 0; patch_ids && k < width; k++) {
        int64_t id = patch_ids[r * width + k];
        if (id >= 0) row[id] = patch[r * vocab + id];
      }
      mass[i] = row_mass(row, vocab, temperature[i], max_z ? max_z + i : NULL);
    }
    free(row);
  }
}

typedef struct {
  entry *buf;
  int64_t len, n;
  int open; /* still taking every token (the first 2n) */
  float threshold; /* the n-th best so far, once not open */
} top_n;

static void top_push(top_n *t, float v, int64_t id) {
  t->buf[t->len++] = (entry){v, id};
  if (t->len < 2 * t->n) return;
  select_best(t->buf, t->len, t->n);
  t->len = t->n;
  t->open = 0;
  float threshold = t->buf[0].v;
  for (int64_t i = 1; i < t->n; i++) threshold = t->buf[i].v < threshold ? t->buf[i].v : threshold;
  t->threshold = threshold;
}

static inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ps(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

#define SAMPLE_SPANS 8

/* A guess at a value that about 2n of the row's tokens reach, from the largest values of
 * SAMPLE_SPANS spans of CHUNK tokens spread over the row (unpatched); -inf where the row is too
 * short for a sample to tell. Only a starting threshold: the caller checks that n tokens reach
 * it and otherwise scans again without one. */
static float sample_threshold(const float *src, int64_t vocab, int64_t n) {
  const int64_t sampled = SAMPLE_SPANS * CHUNK;
  int64_t m = (2 * n * sampled + vocab - 1) / vocab;
  if (vocab < 4 * sampled || m > 64) return -INFINITY;
  float best[64]; /* the m largest so far, descending */
  int64_t len = 0;
  for (int64_t k = 0; k < SAMPLE_SPANS; k++) {
    const float *span = src + (k * (vocab - CHUNK) / (SAMPLE_SPANS - 1) & ~(int64_t)7);
    for (int64_t j0 = 0; j0 < CHUNK; j0 += 8) { /* a vector compare drops most of the span */
      __m256 floor = _mm256_set1_ps(len == m ? best[m - 1] : -INFINITY);
      __m256 x = clean8(_mm256_loadu_ps(span + j0));
      if (len == m && !_mm256_movemask_ps(_mm256_cmp_ps(x, floor, _CMP_GT_OQ))) continue;
      for (int64_t j = j0; j < j0 + 8; j++) {
        float v = clean(span[j]);
        if (len == m && !(v > best[m - 1])) continue;
        int64_t i = len < m ? len++ : m - 1;
        for (; i > 0 && best[i - 1] < v; i--) best[i] = best[i - 1];
        best[i] = v;
      }
    }
  }
  return len == m ? best[m - 1] : -INFINITY;
}

static int compare_keys(const void *a, const void *b) {
  uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
  return (x > y) - (x < y);
}

/* Sort the n entries by value descending, then id ascending: an LSD radix sort on the value
 * half of 64-bit keys (value, id), then each run of equal values (rare in float32 logits, common
 * where they come from bfloat16) sorted by id. */
static void sort_entries(entry *buf, int64_t n, uint64_t *keys, uint64_t *tmp) {
  for (int64_t i = 0; i < n; i++) {
    uint32_t bits;
    memcpy(&bits, &buf[i].v, 4);
    bits = bits >> 31 ? ~bits : bits | 0x80000000u; /* ascending as unsigned */
    keys[i] = (uint64_t)~bits << 32 | (uint64_t)buf[i].id;
  }
  for (int shift = 32; shift < 64; shift += 8) {
    int64_t count[257] = {0};
    for (int64_t i = 0; i < n; i++) count[(keys[i] >> shift & 0xFF) + 1]++;
    if (count[(keys[0] >> shift & 0xFF) + 1] == n) continue; /* one digit value: nothing moves */
    for (int d = 0; d < 256; d++) count[d + 1] += count[d];
    for (int64_t i = 0; i < n; i++) tmp[count[keys[i] >> shift & 0xFF]++] = keys[i];
    memcpy(keys, tmp, sizeof(uint64_t) * n);
  }
  for (int64_t i = 0, run; i < n; i += run) {
    for (run = 1; i + run < n && keys[i + run] >> 32 == keys[i] >> 32; run++) {
    }
    if (run > 1) qsort(keys + i, (size_t)run, sizeof(uint64_t), compare_keys);
  }
  for (int64_t i = 0; i < n; i++) {
    uint32_t bits = ~(uint32_t)(keys[i] >> 32);
    bits = bits >> 31 ? bits & 0x7FFFFFFFu : ~bits;
    memcpy(&buf[i].v, &bits, 4);
    buf[i].id = (int64_t)(keys[i] & 0xFFFFFFFFu);
  }
}

/* The normaliser's bounds (see winnow_scan_rows). */
#define NEAR 5.0f          /* chunks whose tokens are all below e^-NEAR of the maximum so far */
#define ROUGH_OVER 1.0616  /* the upper-bound exp is at most this factor over e^x */
#define ROUGH_SLACK 1e-4   /* its argument's float32 rounding, and the rescales */
#define EXACT_SLACK 4e-6   /* float32 exps of differences rounded to float32, as torch's */

/* One row: candidates into t; when want_mass, mass[0] <= sum_j exp(y_j - max y) <= mass[1]
 * (winnow_scan_rows). */
static void scan_row(const float *src, const float *patch, const uint32_t *set, int64_t vocab,
                     float temperature, int want_mass, top_n *t, double *mass) {
  float chunk[CHUNK] __attribute__((aligned(32)));
  const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256 tv = _mm256_set1_ps(temperature), big = _mm256_set1_ps(FLT_MAX);
  float m = -INFINITY; /* the largest y so far */
  double total = 0.0, rough = 0.0; /* sums of exp(y - m): exact, and upper-bound terms */
  for (int64_t c0 = 0; c0 < vocab; c0 += CHUNK) {
    int64_t len = vocab - c0 < CHUNK ? vocab - c0 : CHUNK, j = 0;
    __m256 mv = _mm256_set1_ps(-INFINITY);
    for (; j + 8 <= len; j += 8) {
      __m256 x = clean8(_mm256_loadu_ps(src + c0 + j));
      uint32_t hit = set ? (set[(c0 + j) >> 5] >> ((c0 + j) & 24)) & 0xFFu : 0;
      if (hit) {
        __m256i sel = _mm256_and_si256(_mm256_set1_epi32((int)hit), lane_bit);
        __m256 use = _mm256_castsi256_ps(_mm256_cmpeq_epi32(sel, lane_bit));
        x = _mm256_blendv_ps(x, _mm256_loadu_ps(patch + c0 + j), use);
      }
      _mm256_store_ps(chunk + j, x);
      mv = _mm256_max_ps(mv, x);
    }
    float cmax = hmax8(mv);
    for (; j < len; j++) {
      int64_t id = c0 + j;
      chunk[j] = set && (set[id >> 5] >> (id & 31) & 1u) ? patch[id] : clean(src[id]);
      cmax = chunk[j] > cmax ? chunk[j] : cmax;
    }
    if (t->open) {
      for (j = 0; j < len; j++)
        if (t->open || chunk[j] > t->threshold) top_push(t, chunk[j], c0 + j);
    } else if (cmax > t->threshold) {
      for (j = 0; j + 8 <= len; j += 8) {
        __m256 v = _mm256_load_ps(chunk + j);
        int hits = _mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_set1_ps(t->threshold), _CMP_GT_OQ));
        for (; hits; hits &= hits - 1) {
          int lane = __builtin_ctz(hits);
          if (chunk[j + lane] > t->threshold) top_push(t, chunk[j + lane], c0 + j + lane);
        }
      }
      for (; j < len; j++)
        if (chunk[j] > t->threshold) top_push(t, chunk[j], c0 + j);
    }
    if (!want_mass || cmax == -INFINITY) continue;
    float cm = y_of(cmax, temperature);
    if (cm > m) {
      double rescale = m == -INFINITY ? 0.0 : exp((double)m - (double)cm);
      total *= rescale;
      rough *= rescale;
      m = cm;
    }
    float lanes[8];
    if (cm < m - NEAR && fabsf(m) <= 256.0f) { /* terms < e^-NEAR: the upper-bound exp */
      const float a = 0x1p23f * 1.44269504088896341f / temperature;
      const __m256 av = _mm256_set1_ps(a), bv = _mm256_set1_ps(0x1p23f * 127.0f - a * temperature * m);
      __m256 acc = _mm256_setzero_ps();
      for (j = 0; j + 8 <= len; j += 8) {
        __m256 bits = _mm256_max_ps(_mm256_fmadd_ps(_mm256_load_ps(chunk + j), av, bv), _mm256_setzero_ps());
        acc = _mm256_add_ps(acc, _mm256_castsi256_ps(_mm256_cvtps_epi32(bits)));
      }
      _mm256_storeu_ps(lanes, acc);
      for (int i = 0; i < 8; i++) rough += lanes[i];
      for (; j < len; j++) rough += exp((double)(y_of(chunk[j], temperature) - m)) * ROUGH_OVER;
      continue;
    }
    __m256 acc = _mm256_setzero_ps(), mm = _mm256_set1_ps(m);
    for (j = 0; j + 8 <= len; j += 8) {
      __m256 y = _mm256_min_ps(big, _mm256_div_ps(_mm256_load_ps(chunk + j), tv));
      acc = _mm256_add_ps(acc, exp_neg(_mm256_sub_ps(y, mm)));
    }
    _mm256_storeu_ps(lanes, acc);
    for (int i = 0; i < 8; i++) total += lanes[i];
    for (; j < len; j++) total += (double)expf(y_of(chunk[j], temperature) - m);
  }
  if (m == -INFINITY) { /* torch: exp(-inf - -inf) */
    mass[0] = mass[1] = NAN;
    return;
  }
  mass[0] = total * (1.0 - EXACT_SLACK) + rough / ROUGH_OVER * (1.0 - ROUGH_SLACK);
  mass[1] = total * (1.0 + EXACT_SLACK) + rough * (1.0 + ROUGH_SLACK) + (double)vocab * 0x1p-120;
}


#define AVX512 __attribute__((target("avx512f")))

static int use_avx512 = 0;

/* Pick the ISA of winnow_scan_rows; returns whether AVX-512 is in use. */
int winnow_row_stats_init(int wanted_avx512) {
  __builtin_cpu_init();
  use_avx512 = wanted_avx512 && __builtin_cpu_supports("avx512f");
  return use_avx512;
}

/* Tokens j..j+15 of a row, cleaned, with the patched ones blended in. */
static inline AVX512 __m512 row16(const float *src, const float *patch, const uint32_t *set,
                                  int64_t j) {
  __m512 x = _mm512_min_ps(_mm512_set1_ps(FLT_MAX),
                           _mm512_max_ps(_mm512_loadu_ps(src + j), _mm512_set1_ps(-INFINITY)));
  __mmask16 hit = set ? (__mmask16)(set[j >> 5] >> (j & 16)) : 0;
  return hit ? _mm512_mask_loadu_ps(x, hit, patch + j) : x;
}

static inline AVX512 float row1(const float *src, const float *patch, const uint32_t *set,
                                int64_t j) {
  return set && (set[j >> 5] >> (j & 31) & 1u) ? patch[j] : clean(src[j]);
}

/* exp(x) for x <= 0 as exp_neg, 16 lanes. */
static inline AVX512 __m512 exp_neg16(__m512 x) {
  const __m512 low = _mm512_set1_ps(-87.3f);
  __mmask16 keep = _mm512_cmp_ps_mask(x, low, _CMP_GE_OQ);
  x = _mm512_max_ps(x, low);
  __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
  f = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), f);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, f), f, _mm512_add_ps(f, _mm512_set1_ps(1.0f)));
  __m512i scale = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(k), _mm512_set1_epi32(127)), 23);
  return _mm512_maskz_mul_ps(keep, p, _mm512_castsi512_ps(scale));
}

/* The bulk's cheap exp with 16 lanes: 2^v = 2^k 2^f (k = floor v) with 2^f taken as
 * 1 + (2/3) f + (1/3) f^2, which is 2^f times a factor in [ROUGH16_LOW, ROUGH16_HIGH] over
 * f in [0, 1] (a quadratic through both ends: nine times tighter than the two-instruction exp,
 * so fewer rows need the exact normaliser). v is clamped at -200 (-inf logits give 0). */
#define ROUGH16_LOW 0.99810
#define ROUGH16_HIGH 1.00345

static inline AVX512 __m512 exp2_rough16(__m512 v) {
  v = _mm512_max_ps(v, _mm512_set1_ps(-200.0f));
  __m512 k = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_sub_ps(v, k);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(1.0f / 3.0f), f, _mm512_set1_ps(2.0f / 3.0f));
  return _mm512_scalef_ps(_mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f)), k);
}

/* scan_row with 16 lanes and no chunk copy: the chunk's first read takes its maximum, its
 * candidates (a compare per vector) and, when the normaliser is asked and the chunk ends up far
 * below the maximum, its cheap exps (exp2_rough16); a chunk that needs exact exps (or the
 * first 2n tokens, without a guessed threshold) is read again from L1. */
static AVX512 void scan_row_avx512(const float *src, const float *patch, const uint32_t *set,
                                   int64_t vocab, float temperature, int want_mass, top_n *t,
                                   double *mass) {
  const __m512 tv = _mm512_set1_ps(temperature), big = _mm512_set1_ps(FLT_MAX);
  const float a = 1.44269504088896341f / temperature;
  float m = -INFINITY; /* the largest y so far */
  double total = 0.0, rough = 0.0; /* sums of exp(y - m): exact, and cheap terms */
  for (int64_t c0 = 0; c0 < vocab; c0 += CHUNK) {
    int64_t len = vocab - c0 < CHUNK ? vocab - c0 : CHUNK, j = 0;
    int fast = want_mass && m > -INFINITY && fabsf(m) <= 256.0f;
    /* v = (y - m) log2 e, as z * (log2 e / T) - m log2 e */
    const __m512 av = _mm512_set1_ps(a), bv = _mm512_set1_ps(-a * temperature * m);
    __m512 mv = _mm512_set1_ps(-INFINITY), acc = _mm512_setzero_ps();
    const int open = t->open;
    for (; j + 16 <= len; j += 16) {
      _mm_prefetch((const char *)(src + c0 + j + PREFETCH), _MM_HINT_NTA);
      __m512 x = row16(src, patch, set, c0 + j);
      mv = _mm512_max_ps(mv, x);
      if (fast) acc = _mm512_add_ps(acc, exp2_rough16(_mm512_fmadd_ps(x, av, bv)));
      unsigned hits = open ? 0 : _mm512_cmp_ps_mask(x, _mm512_set1_ps(t->threshold), _CMP_GT_OQ);
      if (hits) {
        float xs[16];
        _mm512_storeu_ps(xs, x);
        for (; hits; hits &= hits - 1) {
          int lane = __builtin_ctz(hits);
          if (xs[lane] > t->threshold) top_push(t, xs[lane], c0 + j + lane);
        }
      }
    }
    float cmax = _mm512_reduce_max_ps(mv);
    for (int64_t i = j; i < len; i++) {
      float v = row1(src, patch, set, c0 + i);
      cmax = v > cmax ? v : cmax;
      if (!open && v > t->threshold) top_push(t, v, c0 + i);
    }
    if (open) {
      for (j = 0; j < len; j++) {
        float v = row1(src, patch, set, c0 + j);
        if (t->open || v > t->threshold) top_push(t, v, c0 + j);
      }
    }
    if (!want_mass || cmax == -INFINITY) continue;
    float cm = y_of(cmax, temperature);
    if (fast && cm < m - NEAR) { /* terms < e^-NEAR: the cheap exps already taken */
      rough += _mm512_reduce_add_ps(acc);
      for (j = len & ~(int64_t)15; j < len; j++)
        rough += exp((double)(y_of(row1(src, patch, set, c0 + j), temperature) - m));
      continue;
    }
    if (cm > m) {
      double rescale = m == -INFINITY ? 0.0 : exp((double)m - (double)cm);
      total *= rescale;
      rough *= rescale;
      m = cm;
    }
    __m512 sum = _mm512_setzero_ps(), mm = _mm512_set1_ps(m);
    for (j = 0; j + 16 <= len; j += 16) {
      __m512 y = _mm512_min_ps(big, _mm512_div_ps(row16(src, patch, set, c0 + j), tv));
      sum = _mm512_add_ps(sum, exp_neg16(_mm512_sub_ps(y, mm)));
    }
    total += _mm512_reduce_add_ps(sum);
    for (; j < len; j++) total += (double)expf(y_of(row1(src, patch, set, c0 + j), temperature) - m);
  }
  if (m == -INFINITY) { /* torch: exp(-inf - -inf) */
    mass[0] = mass[1] = NAN;
    return;
  }
  mass[0] = total * (1.0 - EXACT_SLACK) + rough / ROUGH16_HIGH * (1.0 - ROUGH_SLACK);
  mass[1] = total * (1.0 + EXACT_SLACK) + rough / ROUGH16_LOW * (1.0 + ROUGH_SLACK) +
            (double)vocab * 0x1p-120;
}

/* Rows r < rows: row order[r] of src (r without an order; row stride `stride`), tokens in
 * patch_ids[r, :width] (-1: padding; NULL: none) read from patch[r * vocab + id] instead.
 * values/ids [rows, n] as winnow_top_candidates; where want_mass[r] (NULL: no row),
 * mass[2r] <= winnow_total_mass's value <= mass[2r + 1] (see the top). */
void winnow_scan_rows(const float *src, int64_t rows, int64_t vocab, int64_t stride,
                      const int64_t *order, const int64_t *patch_ids, int64_t width,
                      const float *patch, int64_t n, const float *temperature,
                      const unsigned char *want_mass, float *values, int64_t *ids, double *mass,
                      int nthreads) {
#pragma omp parallel num_threads(nthreads) if (rows > 1)
  {
    entry *buf = malloc(sizeof(entry) * 2 * n);
    uint64_t *keys = malloc(sizeof(uint64_t) * 2 * n);
    uint32_t *set = patch_ids ? calloc((size_t)(vocab + 31) / 32 + 1, sizeof(uint32_t)) : NULL;
    float *dense = patch_ids ? malloc(sizeof(float) * vocab) : NULL;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
      const int64_t *row_ids = patch_ids ? patch_ids + r * width : NULL;
      const float *row = src + (order ? order[r] : r) * stride;
      const float *row_patch = dense;
      /* the patched values into a thread-local row first: gathered together, their cache
       * misses overlap, instead of stalling the streaming loop one by one */
      for (int64_t i = 0; set && i < width; i++)
        if (row_ids[i] >= 0) {
          set[row_ids[i] >> 5] |= 1u << (row_ids[i] & 31);
          dense[row_ids[i]] = patch[r * vocab + row_ids[i]];
        }
      float guess = sample_threshold(row, vocab, n);
      top_n t = {buf, 0, n, guess == -INFINITY, nextafterf(guess, -INFINITY)};
      int wanted = want_mass && want_mass[r];
      double unused[2];
      void (*scan)(const float *, const float *, const uint32_t *, int64_t, float, int, top_n *,
                   double *) = use_avx512 ? scan_row_avx512 : scan_row;
      scan(row, row_patch, set, vocab, temperature[r], wanted, &t, wanted ? mass + 2 * r : unused);
      if (t.len < n && !t.open) { /* fewer than n reach the guess: again, without it */
        t = (top_n){buf, 0, n, 1, -INFINITY};
        scan(row, row_patch, set, vocab, temperature[r], 0, &t, unused);
      }
      if (t.len > n) select_best(buf, t.len, n);
      sort_entries(buf, n, keys, keys + n);
      for (int64_t i = 0; i < n; i++) {
        values[r * n + i] = buf[i].v;
        ids[r * n + i] = buf[i].id;
      }
      for (int64_t i = 0; set && i < width; i++)
        if (row_ids[i] >= 0) set[row_ids[i] >> 5] &= ~(1u << (row_ids[i] & 31));
    }
    free(buf);
    free(keys);
    free(set);
    free(dense);
  }
}

/* Stage 1 on the work buffer z [*, vocab], as penalties.PenaltyHistory.apply computes it, for
 * rows[i] (work rows): with repetition (NULL: no row), every distinct id of prompt[i, :wp] and
 * output[i, :wo] (-1: padding) becomes z > 0 ? z / r : z * r; then with frequency_presence
 * ([n, 2]; NULL: no row), each output id at its first occurrence (counts[i, k] > 0 there, 0
 * elsewhere) becomes (z - c * f) - p. Each operation rounds to float32, as torch's do. */
__attribute__((optimize("fp-contract=off"))) void winnow_penalise(
    float *z, int64_t vocab, const int64_t *rows, int64_t n, const int64_t *prompt, int64_t wp,
    const int64_t *output, const int32_t *counts, int64_t wo, const float *repetition,
    const float *frequency_presence) {
  uint32_t *done = repetition ? calloc((size_t)(vocab + 31) / 32 + 1, sizeof(uint32_t)) : NULL;
  for (int64_t i = 0; i < n; i++) {
    float *zr = z + rows[i] * vocab;
    if (repetition) {
      const float r = repetition[i];
      for (int pass = 0; pass < 2; pass++) { /* mark and penalise, then clear the marks */
        for (int64_t k = 0; k < wp + wo; k++) {
          int64_t id = k < wp ? prompt[i * wp + k] : output[i * wo + k - wp];
          if (id < 0) continue;
          uint32_t bit = 1u << (id & 31), *word = done + (id >> 5);
          if (pass) {
            *word &= ~bit;
          } else if (!(*word & bit)) {
            *word |= bit;
            zr[id] = zr[id] > 0 ? zr[id] / r : zr[id] * r;
          }
        }
      }
    }
    if (frequency_presence) {
      const float f = frequency_presence[2 * i], p = frequency_presence[2 * i + 1];
      for (int64_t k = 0; k < wo; k++) {
        int32_t c = counts[i * wo + k];
        if (c <= 0) continue;
        float scaled = (float)c * f, left = zr[output[i * wo + k]] - scaled;
        zr[output[i * wo + k]] = left - 1.0f * p;
      }
    }
  }
  free(done);
}

/* penalties.PenaltyHistory.record for n rows: slot slots[i] appends tokens[i] at column
 * cols[i] (its length) of output [*, out_stride] (int64) and counts [*, count_stride] (int32):
 * the token's first earlier occurrence, if any, counts one more and the new column gets 0;
 * otherwise the new column gets 1. The caller has made room for the column. */
void winnow_record_tokens(int64_t *output, int64_t out_stride, int32_t *counts,
                          int64_t count_stride, const int64_t *slots, const int64_t *tokens,
                          const int64_t *cols, int64_t n) {
  for (int64_t i = 0; i < n; i++) {
    int64_t *row = output + slots[i] * out_stride, len = cols[i], k = 0;
    int32_t *count = counts + slots[i] * count_stride;
    while (k < len && row[k] != tokens[i]) k++;
    if (k < len) count[k] += 1;
    row[len] = tokens[i];
    count[len] = k == len;
  }
}
