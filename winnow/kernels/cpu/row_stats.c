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
 *   is scanned again without one); a vector compare flags the few tokens above it, taken after
 *   each block of BLOCK tokens. The normaliser comes as bounds [lo, hi] on what total_mass
 *   computes, sum_j exp(y_j - max y), from three parts that split the row:
 *   - the candidates held at the end (the row's maximum among them): their exps exactly as
 *     total_mass takes them, after the pass (EXACT_SLACK);
 *   - tokens taken and then dropped for better ones: float32 exps against their batch's
 *     largest, rescaled in double (DROPPED_SLACK);
 *   - the rest, every token no compare flagged (the flat bulk of an LM's row): no exp at all,
 *     but float bits: round(2^23 (v + 127)) read as a float is 2^floor(v) (1 + frac(v)) for
 *     v = (z - zref) log2(e) / T, over 2^v by a factor in [1, ROUGH_OVER) (a chord of the convex
 *     2^f), one FMA and a conversion per 8 or 16 tokens, summed in float32 lanes per block then
 *     in double (ROUGH_SLACK). zref, the guess (else the sample's largest), is fixed for the row,
 *     so no sum needs rescaling while the maximum rises; none of them lies above the scan's last
 *     threshold, which caps their share (vocab exp(threshold - max y)), and where it lies e^-88
 *     below the maximum total_mass's exps of them are 0, so that share is exactly 0 (low
 *     temperatures).
 *   The caller decides top_p with both bounds and asks for the exact sum only where they
 *   disagree. A row whose bits exps would leave their range gets the exact sum here (both
 *   bounds), from one more read.
 *
 * winnow_source_mass: winnow_total_mass of rows as winnow_scan_rows reads them, for the rows
 *   whose bounds leave their nucleus undecided.
 *
 * winnow_row_logprobs: the logprob normaliser (max + log of total_mass's sum at T = 1) and the
 *   top-k of each row, read in place and cleaned as read: the top-k pass (as top_candidates) gives
 *   the maximum, the sum is one more pass over the row (in cache), no [B, V] log_softmax.
 *
 * winnow_slice_logprobs: winnow_row_logprobs of a row that is -inf off a candidate slice's
 *   survivors (a thresholded row's processed distribution), from the slice alone, bit for bit.
 *
 * winnow_seed_patches / winnow_load_rows (with patch ids): the work buffer's patched tokens get
 *   the cleaned logits before the penalties apply (seed_patches applies them too, row by row, as
 *   winnow_penalise would after it); a row that needs all of z later (greedy, XTC without
 *   truncation, the fallbacks) is loaded around its patched values.
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

static inline __m256 clean8(__m256 x) {
  return _mm256_min_ps(_mm256_set1_ps(FLT_MAX), _mm256_max_ps(x, _mm256_set1_ps(-INFINITY)));
}

static inline float max_of(float a, float b) { return b > a ? b : a; } /* no NaN here */

static inline float clean(float x) { return isnan(x) ? -INFINITY : (x > FLT_MAX ? FLT_MAX : x); }

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
  for (; j < vocab && len < cap; j++) buf[len++] = (entry){clean(z[j]), j};
  float threshold = -INFINITY;
  if (len == cap) {
    select_best(buf, len, n);
    len = n;
    threshold = buf[0].v;
    for (int64_t i = 1; i < n; i++) threshold = buf[i].v < threshold ? buf[i].v : threshold;
  }
  for (; j + 8 <= vocab; j += 8) {
    __m256 v = clean8(_mm256_loadu_ps(z + j));
    int hits = _mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_set1_ps(threshold), _CMP_GT_OQ));
    for (; hits; hits &= hits - 1) {
      int lane = __builtin_ctz(hits);
      float value = clean(z[j + lane]);
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
    if (clean(z[j]) > threshold || len < n) buf[len++] = (entry){clean(z[j]), j};
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

/* Cephes' expf constants, shared by exp_neg and exp_neg16 (which must give the same values):
 * log2(e), ln 2 split in a high and a low part, and the polynomial's coefficients. */
#define EXP_LOG2E 1.44269504088896341f
#define EXP_LN2_HI 0.693359375f
#define EXP_LN2_LO (-2.12194440e-4f)
#define EXP_P0 1.9875691500e-4f
#define EXP_P1 1.3981999507e-3f
#define EXP_P2 8.3334519073e-3f
#define EXP_P3 4.1665795894e-2f
#define EXP_P4 1.6666665459e-1f
#define EXP_P5 5.0000001201e-1f

/* exp(x) for x <= 0 in float32 (Cephes' expf: x = k ln2 + f, |f| <= ln2 / 2, degree-5
 * polynomial); 0 below -87.3 (where float32 exp is 0 or subnormal: nothing a sum of terms >= 1
 * notices). */
static inline __m256 exp_neg(__m256 x) {
  const __m256 low = _mm256_set1_ps(-87.3f);
  __m256 under = _mm256_cmp_ps(x, low, _CMP_LT_OQ);
  x = _mm256_max_ps(x, low);
  __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(EXP_LOG2E)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 f = _mm256_fnmadd_ps(k, _mm256_set1_ps(EXP_LN2_HI), x);
  f = _mm256_fnmadd_ps(k, _mm256_set1_ps(EXP_LN2_LO), f);
  __m256 p = _mm256_set1_ps(EXP_P0);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(EXP_P1));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(EXP_P2));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(EXP_P3));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(EXP_P4));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(EXP_P5));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, f), f, _mm256_add_ps(f, _mm256_set1_ps(1.0f)));
  __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(scale)));
}

static inline float y_of(float z, float t) {
  float y = (z > FLT_MAX ? FLT_MAX : z) / t;
  return y > FLT_MAX ? FLT_MAX : y;
}

#define AVX512 __attribute__((target("avx512f")))

static int use_avx512 = 0;

/* Pick the ISA of winnow_scan_rows and row_mass; returns whether AVX-512 is in use. */
int winnow_row_stats_init(int wanted_avx512) {
  __builtin_cpu_init();
  use_avx512 = wanted_avx512 && __builtin_cpu_supports("avx512f");
  return use_avx512;
}

/* exp(x) for x <= 0 as exp_neg, 16 lanes (the same operations, so the same values). */
static inline AVX512 __m512 exp_neg16(__m512 x) {
  const __m512 low = _mm512_set1_ps(-87.3f);
  __mmask16 keep = _mm512_cmp_ps_mask(x, low, _CMP_GE_OQ);
  x = _mm512_max_ps(x, low);
  __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(EXP_LOG2E)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_fnmadd_ps(k, _mm512_set1_ps(EXP_LN2_HI), x);
  f = _mm512_fnmadd_ps(k, _mm512_set1_ps(EXP_LN2_LO), f);
  __m512 p = _mm512_set1_ps(EXP_P0);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP_P1));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP_P2));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP_P3));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP_P4));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP_P5));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, f), f, _mm512_add_ps(f, _mm512_set1_ps(1.0f)));
  __m512i scale = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(k), _mm512_set1_epi32(127)), 23);
  return _mm512_maskz_mul_ps(keep, p, _mm512_castsi512_ps(scale));
}

/* row_mass with 16 lanes: the same terms, added in the same order (8 double sums, term j to
 * sum j % 8, then the scalar tail). raw: z may hold NaN and +inf, cleaned as they are read
 * (NaN -> -inf, +inf -> FLT_MAX) with the same values as a cleaned copy. */
static AVX512 double row_mass16(const float *z, int64_t vocab, float t, const float *max_z,
                                int raw) {
  const __m512 tv = _mm512_set1_ps(t), big = _mm512_set1_ps(FLT_MAX);
  const __m512 none = _mm512_set1_ps(-INFINITY); /* max(NaN, none) = none */
  int64_t j = 0;
  float m = -INFINITY;
  if (max_z) {
    m = y_of(*max_z, t);
  } else {
    __m512 mv = _mm512_set1_ps(-INFINITY);
    for (; j + 16 <= vocab; j += 16) {
      __m512 x = _mm512_loadu_ps(z + j);
      x = raw ? _mm512_min_ps(big, _mm512_max_ps(x, none)) : x;
      mv = _mm512_max_ps(mv, _mm512_min_ps(big, _mm512_div_ps(x, tv)));
    }
    m = _mm512_reduce_max_ps(mv);
    for (int64_t i = j; i < vocab; i++) m = y_of(clean(z[i]), t) > m ? y_of(clean(z[i]), t) : m;
  }
  if (m == -INFINITY) return NAN; /* torch: exp(-inf - -inf) */
  const __m512 mm = _mm512_set1_ps(m);
  __m512d acc = _mm512_setzero_pd();
  for (j = 0; j + 16 <= vocab; j += 16) {
    __m512 x = _mm512_loadu_ps(z + j);
    x = raw ? _mm512_min_ps(big, _mm512_max_ps(x, none)) : x;
    __m512 e = exp_neg16(_mm512_sub_ps(_mm512_min_ps(big, _mm512_div_ps(x, tv)), mm));
    acc = _mm512_add_pd(acc, _mm512_cvtps_pd(_mm512_castps512_ps256(e)));
    acc = _mm512_add_pd(acc, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(e), 1))));
  }
  if (j + 8 <= vocab) {
    __m256 x = _mm256_loadu_ps(z + j);
    x = raw ? clean8(x) : x;
    __m256 y = _mm256_min_ps(_mm256_set1_ps(FLT_MAX), _mm256_div_ps(x, _mm256_set1_ps(t)));
    acc = _mm512_add_pd(acc, _mm512_cvtps_pd(exp_neg(_mm256_sub_ps(y, _mm256_set1_ps(m)))));
    j += 8;
  }
  double sums[8], total = 0.0;
  _mm512_storeu_pd(sums, acc);
  for (int i = 0; i < 4; i++) total += sums[i] + sums[i + 4];
  for (; j < vocab; j++) total += (double)expf(y_of(clean(z[j]), t) - m);
  return total;
}

/* max_z: the row's largest z when the caller knows it (y_of is monotone, so max y = y_of(max z)
 * and the max pass is skipped), else NULL. raw: z cleaned as it is read, as row_mass16. */
static double row_mass(const float *z, int64_t vocab, float t, const float *max_z, int raw) {
  if (use_avx512) return row_mass16(z, vocab, t, max_z, raw);
  const __m256 tv = _mm256_set1_ps(t), big = _mm256_set1_ps(FLT_MAX);
  int64_t j = 0;
  float m = -INFINITY;
  if (max_z) {
    m = y_of(*max_z, t);
  } else {
    __m256 mv = _mm256_set1_ps(-INFINITY);
    for (; j + 8 <= vocab; j += 8) {
      __m256 x = _mm256_loadu_ps(z + j);
      x = raw ? clean8(x) : x;
      mv = _mm256_max_ps(mv, _mm256_min_ps(big, _mm256_div_ps(x, tv)));
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, mv);
    for (int i = 0; i < 8; i++) m = lanes[i] > m ? lanes[i] : m;
    for (int64_t i = j; i < vocab; i++) m = y_of(clean(z[i]), t) > m ? y_of(clean(z[i]), t) : m;
  }
  if (m == -INFINITY) return NAN; /* torch: exp(-inf - -inf) */
  __m256d lo = _mm256_setzero_pd(), hi = _mm256_setzero_pd();
  for (j = 0; j + 8 <= vocab; j += 8) {
    __m256 x = _mm256_loadu_ps(z + j);
    x = raw ? clean8(x) : x;
    __m256 y = _mm256_min_ps(big, _mm256_div_ps(x, tv));
    __m256 e = exp_neg(_mm256_sub_ps(y, _mm256_set1_ps(m)));
    lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
    hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)));
  }
  double sums[4], total = 0.0;
  _mm256_storeu_pd(sums, _mm256_add_pd(lo, hi));
  for (int i = 0; i < 4; i++) total += sums[i];
  for (; j < vocab; j++) total += (double)expf(y_of(clean(z[j]), t) - m);
  return total;
}

/* mass[r] = sum_j exp(y_j - max y) over rows of z (row stride `stride`, no NaN); max_z: each
 * row's largest z (contiguous), or NULL to find it. */
void winnow_total_mass(const float *z, int64_t rows, int64_t vocab, int64_t stride,
                       const float *temperature, const float *max_z, double *mass, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (rows > 1)
  for (int64_t r = 0; r < rows; r++)
    mass[r] = row_mass(z + r * stride, vocab, temperature[r], max_z ? max_z + r : NULL, 0);
}

/* The logprob normaliser and top-k of rows read cleaned (NaN -> -inf, +inf -> FLT_MAX): work row
 * r is z's row rows[r] (r without rows; row stride `stride`). lse[r] = max + log(sum_j
 * exp(z_j - max)) (row_mass at T = 1; -inf for a row with no finite value), values/ids [r, :k]
 * its k largest by value descending, then id ascending (a total order, so the k are exact). */
void winnow_row_logprobs(const float *z, const int64_t *rows, int64_t n, int64_t vocab,
                         int64_t stride, int64_t k, float *lse, float *values, int64_t *ids,
                         int nthreads) {
#pragma omp parallel num_threads(nthreads) if (n > 1)
  {
    entry *buf = k ? malloc(sizeof(entry) * 2 * k) : NULL;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < n; r++) {
      const float *row = z + (rows ? rows[r] : r) * stride;
      float m = -INFINITY;
      if (k) {
        row_top(row, vocab, k, buf, values + r * k, ids + r * k);
        m = values[r * k];
      } else {
        __m256 mv = _mm256_set1_ps(-INFINITY);
        int64_t j = 0;
        for (; j + 8 <= vocab; j += 8) mv = _mm256_max_ps(mv, clean8(_mm256_loadu_ps(row + j)));
        float lanes[8];
        _mm256_storeu_ps(lanes, mv);
        for (int i = 0; i < 8; i++) m = max_of(m, lanes[i]);
        for (; j < vocab; j++) m = max_of(m, clean(row[j]));
      }
      lse[r] = m == -INFINITY ? -INFINITY : (float)((double)m + log(row_mass(row, vocab, 1.0f, &m, 1)));
    }
    free(buf);
  }
}

/* keys[0..len) sorted by their high 32 bits (below 2^bits), ascending: an LSD radix sort on
 * 8-bit digits, tmp [len] its other buffer. Returns the one that holds the result. */
static uint64_t *sort_by_high(uint64_t *keys, uint64_t *tmp, int64_t len, int bits) {
  for (int shift = 32; shift < 32 + bits; shift += 8) {
    uint32_t start[256], sum = 0;
    memset(start, 0, sizeof(start));
    for (int64_t i = 0; i < len; i++) start[keys[i] >> shift & 0xFF]++;
    for (int d = 0; d < 256; d++) {
      uint32_t count = start[d];
      start[d] = sum;
      sum += count;
    }
    for (int64_t i = 0; i < len; i++) tmp[start[keys[i] >> shift & 0xFF]++] = keys[i];
    uint64_t *swap = keys;
    keys = tmp;
    tmp = swap;
  }
  return keys;
}

static int holds(const entry *e, int64_t n, int64_t id) {
  for (int64_t i = 0; i < n; i++)
    if (e[i].id == id) return 1;
  return 0;
}

/* One row of winnow_slice_logprobs. x [width + 8], keys and tmp [width], best [k]: scratch. */
static void slice_row(const float *ys, const int64_t *ids, const uint8_t *keep, int64_t width,
                      int64_t vocab, int64_t k, int64_t token, float *lse, float *chosen,
                      float *values, int64_t *top_ids, float *x, uint64_t *keys, uint64_t *tmp,
                      entry *best) {
  int64_t kept = 0, found = 0;
  float m = -INFINITY;
  *chosen = -INFINITY;
  for (int64_t i = 0; i < width; i++) {
    if (!keep[i] || ys[i] == -INFINITY) continue; /* -inf: as every token off the slice */
    entry e = {ys[i], ids[i]};
    m = max_of(m, e.v);
    if (e.id == token) *chosen = e.v;
    keys[kept] = (uint64_t)e.id << 32;
    x[kept++] = e.v;
    if (found == k && !(k && before(&e, &best[k - 1]))) continue;
    int64_t at = found < k ? found++ : k - 1; /* insert e into best, sorted */
    for (; at > 0 && before(&e, &best[at - 1]); at--) best[at] = best[at - 1];
    best[at] = e;
  }
  for (int64_t i = 0; i < found; i++) {
    values[i] = best[i].v;
    top_ids[i] = best[i].id;
  }
  for (int64_t i = found, id = 0; i < k; i++, id++) { /* best holds every finite survivor */
    while (holds(best, found, id)) id++;
    values[i] = -INFINITY; /* the lowest other ids */
    top_ids[i] = id;
  }
  if (m == -INFINITY) {
    *lse = -INFINITY;
    return;
  }
  const int64_t body = vocab - vocab % 8; /* row_mass: exp_neg below, expf from here */
  for (int64_t i = kept; i < kept + 8; i++) x[i] = -INFINITY;
  for (int64_t i = 0; i < kept; i += 8) {
    __m256 e = exp_neg(_mm256_sub_ps(_mm256_loadu_ps(x + i), _mm256_set1_ps(m)));
    float terms[8];
    _mm256_storeu_ps(terms, e);
    for (int j = 0; j < 8 && i + j < kept; j++) {
      float term = (int64_t)(keys[i + j] >> 32) < body ? terms[j] : expf(x[i + j] - m);
      uint32_t bits;
      memcpy(&bits, &term, 4);
      keys[i + j] |= bits;
    }
  }
  int id_bits = 8;
  while (id_bits < 32 && (vocab - 1) >> id_bits) id_bits += 8;
  const uint64_t *sorted = sort_by_high(keys, tmp, kept, id_bits);
  double lanes[8] = {0}, total = 0.0;
  int64_t i = 0;
  for (; i < kept && (int64_t)(sorted[i] >> 32) < body; i++) {
    uint32_t bits = (uint32_t)sorted[i];
    float term;
    memcpy(&term, &bits, 4);
    lanes[sorted[i] >> 32 & 7] += (double)term;
  }
  for (int j = 0; j < 4; j++) total += lanes[j] + lanes[j + 4];
  for (; i < kept; i++) {
    uint32_t bits = (uint32_t)sorted[i];
    float term;
    memcpy(&term, &bits, 4);
    total += (double)term;
  }
  *lse = (float)((double)m + log(total));
}

/* winnow_row_logprobs of rows given as a candidate slice: row r is ys[s, :] at ids[s, :] where
 * keep[s, :] and -inf at every other token (s = rows[r], or r without rows; [*, width],
 * contiguous), the distribution a thresholded row samples from. The same outputs, with the same
 * values, from the slice alone: the maximum; each term in row_mass's float32 operations (exp_neg
 * below vocab - vocab % 8, expf past it) added in its order (term j to double lane j % 8 by
 * ascending j, the lanes folded as (0 + 4) + (1 + 5) + ..., then the last vocab % 8 by ascending
 * j; the -inf tokens' terms are 0 and add nothing); the top k by value descending then id
 * ascending, past the finite survivors the lowest other ids at -inf. chosen[r]: the value of
 * token tokens[r] (-inf off the survivors). */
void winnow_slice_logprobs(const float *ys, const int64_t *ids, const uint8_t *keep,
                           const int64_t *rows, int64_t n, int64_t width, int64_t vocab,
                           int64_t k, const int64_t *tokens, float *lse, float *chosen,
                           float *values, int64_t *top_ids, int nthreads) {
#pragma omp parallel num_threads(nthreads) if (n > 1)
  {
    float *x = malloc(sizeof(float) * (width + 8));
    uint64_t *keys = malloc(sizeof(uint64_t) * 2 * width);
    entry *best = malloc(sizeof(entry) * (k ? k : 1));
#pragma omp for schedule(static)
    for (int64_t r = 0; r < n; r++) {
      int64_t s = rows ? rows[r] : r;
      slice_row(ys + s * width, ids + s * width, keep + s * width, width, vocab, k, tokens[r],
                lse + r, chosen + r, values + r * k, top_ids + r * k, x, keys, keys + width,
                best);
    }
    free(x);
    free(keys);
    free(best);
  }
}

#define SPAN 256 /* tokens in each of sample_threshold's spans */

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

/* Stage 1's tables for n work rows (see winnow_penalise; field order = the caller's ctypes
 * structure). */
typedef struct {
  const int64_t *rows;
  int64_t n;
  const int64_t *prompt; /* [n, wp] (NULL: no row has repetition) */
  int64_t wp;
  const int64_t *output; /* [n, wo] */
  const int32_t *counts; /* [n, wo] (NULL: no row has frequency / presence) */
  int64_t wo;
  const float *repetition;         /* [n] */
  const float *frequency_presence; /* [n, 2] */
} stage_one;

/* Stage 1 on one work row zr for stage-one row i; `done` (a zeroed bit per token) comes back
 * zeroed. Each operation rounds to float32, as torch's do. */
__attribute__((optimize("fp-contract=off"))) static void penalise_row(float *zr, int64_t i,
                                                                      const stage_one *p,
                                                                      uint32_t *done) {
  if (p->repetition) {
    const float r = p->repetition[i];
    for (int pass = 0; pass < 2; pass++) { /* mark and penalise, then clear the marks */
      for (int64_t k = 0; k < p->wp + p->wo; k++) {
        int64_t id = k < p->wp ? p->prompt[i * p->wp + k] : p->output[i * p->wo + k - p->wp];
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
  if (p->frequency_presence) {
    const float f = p->frequency_presence[2 * i], pres = p->frequency_presence[2 * i + 1];
    for (int64_t k = 0; k < p->wo; k++) {
      int32_t c = p->counts[i * p->wo + k];
      if (c <= 0) continue;
      float scaled = (float)c * f, left = zr[p->output[i * p->wo + k]] - scaled;
      zr[p->output[i * p->wo + k]] = left - 1.0f * pres;
    }
  }
}

/* dst[r * vocab + id] = the cleaned src[order[r], id] for the ids in patch_ids[r, :width]; then,
 * with `penalties` (NULL: none), stage 1 on its rows, each right after its seeding, while the
 * tokens it works on are still in cache (a second pass over all rows would miss on each). */
void winnow_seed_patches(const float *src, int64_t rows, int64_t vocab, int64_t stride,
                         const int64_t *order, float *dst, const int64_t *patch_ids,
                         int64_t width, const stage_one *penalties) {
  int64_t *which = penalties ? malloc(sizeof(int64_t) * (size_t)(rows + 1)) : NULL;
  uint32_t *done =
      penalties && penalties->repetition ? calloc((size_t)(vocab + 31) / 32 + 1, sizeof(uint32_t)) : NULL;
  for (int64_t r = 0; which && r < rows; r++) which[r] = -1;
  for (int64_t i = 0; which && i < penalties->n; i++) which[penalties->rows[i]] = i;
  for (int64_t r = 0; r < rows; r++) {
    const float *s = src + (order ? order[r] : r) * stride;
    for (int64_t i = 0; i < width; i++) {
      int64_t id = patch_ids[r * width + i];
      if (id >= 0) dst[r * vocab + id] = clean(s[id]);
    }
    if (which && which[r] >= 0) penalise_row(dst + r * vocab, which[r], penalties, done);
  }
  free(which);
  free(done);
}

/* row_mass of the row s (cleaned, with the tokens in ids[:width] (-1: padding; NULL: none)
 * read from patch_row) in a thread-local copy *row (allocated on first use), or in place
 * where nothing is patched. */
static double read_mass(const float *s, int64_t vocab, const int64_t *ids, int64_t width,
                        const float *patch_row, float t, const float *max_z, float **row) {
  int patched = 0;
  for (int64_t k = 0; ids && k < width; k++) patched |= ids[k] >= 0;
  if (use_avx512 && !patched) return row_mass16(s, vocab, t, max_z, 1); /* cleaned as read */
  if (!*row) *row = malloc(sizeof(float) * vocab);
  float *copy = *row;
  int64_t j = 0;
  for (; j + 8 <= vocab; j += 8) _mm256_storeu_ps(copy + j, clean8(_mm256_loadu_ps(s + j)));
  for (; j < vocab; j++) copy[j] = clean(s[j]);
  for (int64_t k = 0; ids && k < width; k++)
    if (ids[k] >= 0) copy[ids[k]] = patch_row[ids[k]];
  return row_mass(copy, vocab, t, max_z, 0);
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
    float *row = NULL;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; i++) {
      const int64_t r = rows[i];
      mass[i] = read_mass(src + (order ? order[r] : r) * stride, vocab,
                          patch_ids ? patch_ids + r * width : NULL, width, patch + r * vocab,
                          temperature[i], max_z ? max_z + i : NULL, &row);
    }
    free(row);
  }
}

#define TAKEN 4 /* candidates held before the worst are dropped, per candidate asked for */

typedef struct {
  entry *buf; /* [TAKEN n] */
  int64_t len, n;
  int open; /* still taking every token (the first TAKEN n) */
  float threshold; /* the n-th best so far, once not open */
  /* with the normaliser: the tokens taken and then dropped, sum_j exp(y_j - dropped_ref) */
  int want_mass;
  float temperature, dropped_ref;
  double dropped;
  float *scratch; /* [TAKEN n] */
} top_n;

/* The tokens a scan did not take, when the normaliser is wanted: their bits exps (see
 * scan_row) against zref. */
typedef struct {
  float zref;
  double rough;
  int64_t lane_adds; /* float32 adds behind each lane's share of rough */
} rest_sum;

/* sum_i exp(min(FLT_MAX, z[i] / t) - m) in double, each term in row_mass's float32 operations
 * (exp_neg, also for the last count % 8, where row_mass takes expf); y <= m. */
static double exact_terms(const float *z, int64_t count, float t, float m) {
  const __m256 tv = _mm256_set1_ps(t), big = _mm256_set1_ps(FLT_MAX), mm = _mm256_set1_ps(m);
  __m256d lo = _mm256_setzero_pd(), hi = _mm256_setzero_pd();
  int64_t j = 0;
  for (; j < count; j += 8) {
    __m256 x;
    if (j + 8 <= count) {
      x = _mm256_loadu_ps(z + j);
    } else {
      float last[8];
      for (int i = 0; i < 8; i++) last[i] = j + i < count ? z[j + i] : -INFINITY;
      x = _mm256_loadu_ps(last);
    }
    __m256 e = exp_neg(_mm256_sub_ps(_mm256_min_ps(big, _mm256_div_ps(x, tv)), mm));
    lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
    hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)));
  }
  double sums[4];
  _mm256_storeu_pd(sums, _mm256_add_pd(lo, hi));
  return sums[0] + sums[1] + sums[2] + sums[3];
}

/* The normaliser's share of tokens taken as candidates and then dropped (z[0..count)). */
static void drop_mass(top_n *t, const float *z, int64_t count) {
  float top = -INFINITY;
  for (int64_t i = 0; i < count; i++) top = z[i] > top ? z[i] : top;
  float ref = y_of(top, t->temperature);
  if (ref == -INFINITY) return;
  if (ref > t->dropped_ref) {
    t->dropped *= t->dropped_ref == -INFINITY ? 0.0 : exp((double)t->dropped_ref - (double)ref);
    t->dropped_ref = ref;
  }
  t->dropped += exact_terms(z, count, t->temperature, t->dropped_ref);
}

static void top_push(top_n *t, float v, int64_t id) {
  t->buf[t->len++] = (entry){v, id};
  if (t->len < TAKEN * t->n) return;
  select_best(t->buf, t->len, t->n);
  if (t->want_mass) {
    for (int64_t i = t->n; i < t->len; i++) t->scratch[i - t->n] = t->buf[i].v;
    drop_mass(t, t->scratch, t->len - t->n);
  }
  t->len = t->n;
  t->open = 0;
  float threshold = t->buf[0].v;
  for (int64_t i = 1; i < t->n; i++) threshold = t->buf[i].v < threshold ? t->buf[i].v : threshold;
  t->threshold = threshold;
}

/* A token a loop's compare flagged (raw value x, cleaned here): a candidate if it still beats
 * the threshold, else (the threshold rose after the compare) dropped. */
static inline void take(top_n *t, float x, int64_t id) {
  float v = clean(x);
  if (t->open || v > t->threshold) top_push(t, v, id);
  else if (t->want_mass) drop_mass(t, &v, 1);
}

/* Token id of a row, cleaned, or its patched value. */
static inline float read1(const float *src, const float *patch, const uint32_t *set, int64_t id) {
  return set && (set[id >> 5] >> (id & 31) & 1u) ? patch[id] : clean(src[id]);
}

#define SAMPLE_SPANS 16

/* A guess at a value that about 2n of the row's tokens reach, from the largest values of
 * SAMPLE_SPANS spans of SPAN tokens spread over the row (unpatched); -inf where the row is too
 * short for a sample to tell. Only a starting threshold: the caller checks that n tokens reach
 * it and otherwise scans again without one. Spread over the row, the spans are cache misses no
 * hardware prefetcher foresees: the same spans of the row at `next` (NULL: none) are asked for
 * meanwhile, the rows' guesses being taken one after the other before any row is scanned. */
static float sample_threshold(const float *src, int64_t vocab, int64_t n, const float *next) {
  const int64_t sampled = SAMPLE_SPANS * SPAN;
  int64_t m = (2 * n * sampled + vocab - 1) / vocab;
  if (vocab < 4 * sampled || m > 128) return -INFINITY;
  float best[128], floor = -INFINITY; /* the m largest so far, descending; the m-th once held */
  int64_t len = 0;
  for (int64_t k = 0; k < SAMPLE_SPANS; k++) {
    const int64_t offset = k * (vocab - SPAN) / (SAMPLE_SPANS - 1) & ~(int64_t)7;
    const float *span = src + offset;
    for (int64_t b = 0; next && b < (int64_t)sizeof(float) * SPAN; b += 64)
      _mm_prefetch((const char *)(next + offset) + b, _MM_HINT_T0);
    for (int64_t j = 0; j < SPAN; j += 8) { /* a vector compare drops most of the span */
      __m256 x = clean8(_mm256_loadu_ps(span + j));
      int hits = _mm256_movemask_ps(_mm256_cmp_ps(x, _mm256_set1_ps(floor), _CMP_GT_OQ));
      if (!hits) continue;
      float lanes[8];
      _mm256_storeu_ps(lanes, x);
      for (; hits; hits &= hits - 1) {
        float v = lanes[__builtin_ctz(hits)];
        if (!(v > floor)) continue; /* the floor rose within this vector */
        int64_t i = len < m ? len++ : m - 1;
        for (; i > 0 && best[i - 1] < v; i--) best[i] = best[i - 1];
        best[i] = v;
        if (len == m) floor = best[m - 1];
      }
    }
  }
  return len == m ? floor : -INFINITY;
}

/* The largest (cleaned, unpatched) value of sample_threshold's spans, or of the whole row
 * where it is not longer than they are: the bits exps' reference where there is no guess. */
static float sample_max(const float *src, int64_t vocab) {
  __m256 best = _mm256_set1_ps(-INFINITY);
  float top = -INFINITY;
  int whole = vocab <= SAMPLE_SPANS * SPAN;
  for (int64_t k = 0; k < (whole ? 1 : SAMPLE_SPANS); k++) {
    const float *span = whole ? src : src + (k * (vocab - SPAN) / (SAMPLE_SPANS - 1) & ~(int64_t)7);
    int64_t len = whole ? vocab : SPAN, j = 0;
    for (; j + 8 <= len; j += 8) best = _mm256_max_ps(best, clean8(_mm256_loadu_ps(span + j)));
    for (; j < len; j++) top = max_of(top, clean(span[j]));
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, best);
  for (int i = 0; i < 8; i++) top = max_of(top, lanes[i]);
  return top;
}

static int compare_keys(const void *a, const void *b) {
  uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
  return (x > y) - (x < y);
}

/* The best `keep` of the len entries by value descending, then id ascending, into values and
 * ids: an LSD radix sort on the value half of 64-bit keys (value, id) (the digits' counts in one
 * pass; a digit all keys share moves nothing), then each run of equal values (rare in float32
 * logits, common where they come from bfloat16) sorted by id. keys, tmp: [len]. */
static void sort_entries(const entry *buf, int64_t len, int64_t keep, uint64_t *keys,
                         uint64_t *tmp, float *values, int64_t *ids) {
  uint32_t count[4][256];
  memset(count, 0, sizeof(count));
  for (int64_t i = 0; i < len; i++) {
    uint32_t bits;
    memcpy(&bits, &buf[i].v, 4);
    bits = ~(bits >> 31 ? ~bits : bits | 0x80000000u); /* descending as unsigned */
    keys[i] = (uint64_t)bits << 32 | (uint64_t)buf[i].id;
    for (int d = 0; d < 4; d++) count[d][bits >> 8 * d & 0xFF]++;
  }
  for (int d = 0; d < 4; d++) {
    const int shift = 32 + 8 * d;
    if (count[d][keys[0] >> shift & 0xFF] == (uint32_t)len) continue; /* nothing moves */
    uint32_t start[256], sum = 0;
    for (int k = 0; k < 256; k++) {
      start[k] = sum;
      sum += count[d][k];
    }
    for (int64_t i = 0; i < len; i++) tmp[start[keys[i] >> shift & 0xFF]++] = keys[i];
    uint64_t *swap = keys;
    keys = tmp;
    tmp = swap;
  }
  for (int64_t i = 0, run; i < keep; i += run) {
    for (run = 1; i + run < len && keys[i + run] >> 32 == keys[i] >> 32; run++) {
    }
    if (run > 1) qsort(keys + i, (size_t)run, sizeof(uint64_t), compare_keys);
  }
  for (int64_t i = 0; i < keep; i++) {
    uint32_t bits = ~(uint32_t)(keys[i] >> 32);
    bits = bits >> 31 ? bits & 0x7FFFFFFFu : ~bits;
    memcpy(&values[i], &bits, 4);
    ids[i] = (int64_t)(keys[i] & 0xFFFFFFFFu);
  }
}

/* The normaliser's bounds (see winnow_scan_rows); slacks relative to each part's sum. */
#define ROUGH_OVER 1.0616   /* the bits exp is at most this factor over 2^v */
#define ROUGH_SLACK 1e-3    /* its argument's roundings (|v| < 128, |zref| / T <= BITS_RANGE:
                               ~1.5e-4) and row_mass's own roundings of y and y - max y
                               (|max y| <= MASS_RANGE: ~3e-4); plus lane_adds * 2^-24 for the
                               float32 lane sums */
#define MASS_RANGE 4096.0f
#define BITS_RANGE 256.0
#define ROUGH_TOP 125.0     /* v of the largest token the bits exp may see (2^128 overflows) */
#define EXACT_SLACK 1e-6    /* row_mass's terms, but for expf in its last vocab % 8 (a few ulp) */
#define DROPPED_SLACK 1e-4  /* exps of differences from another reference, each rounded to
                               float32 (|y - max y| < 128: 2^-17), and the rescales */

/* The bits exp's constants: the float32 whose bits are round(2^23 (v + 127)) is
 * 2^floor(v) (1 + frac(v)), v = (z - zref) log2(e) / T, taken as one FMA of z (so its
 * roundings grow with |zref| / T: BITS_RANGE bounds it). */
#define BITS_SCALE(t) (0x1p23f * EXP_LOG2E / (t))
#define BITS_BIAS (0x1p23f * 127.0f)
#define PREFETCH 4096 /* tokens ahead the loops ask for, into L2 (as gumbel_max.c) */
#define BLOCK 512 /* tokens per block of the loops: their sums restart each block, and the
                     candidates a block's compares flag are taken after it (no call inside the
                     loop, so the sums stay in registers) */

/* Tokens from..to one at a time (the row's first ones while t->open, and the last vocab % lanes):
 * a token that is no candidate adds exp((z - zref) / T) to rest->rough (in double: within both
 * of the bits exp's bounds). Returns where it stopped: at `to`, or, with `align`, at the first
 * multiple of align once t is no longer open. */
static int64_t scan_scalar(const float *src, const float *patch, const uint32_t *set,
                           int64_t from, int64_t to, int64_t align, top_n *t, rest_sum *rest) {
  int64_t j = from;
  for (; j < to && !(align && !t->open && j % align == 0); j++) {
    float v = read1(src, patch, set, j);
    if (t->open || v > t->threshold) {
      top_push(t, v, j);
    } else if (t->want_mass) {
      rest->rough += exp(((double)v - (double)rest->zref) / (double)t->temperature);
    }
  }
  return j;
}

/* The candidates a block's compares flagged: the vectors at at[i] with lanes flags[i]. A flag
 * from an older threshold is checked again by take. */
static void take_flagged(const float *src, const float *patch, const uint32_t *set,
                         const int64_t *at, const uint32_t *flags, int count, top_n *t) {
  for (int i = 0; i < count; i++)
    for (uint32_t h = flags[i]; h; h &= h - 1) {
      int64_t id = at[i] + __builtin_ctz(h);
      take(t, read1(src, patch, set, id), id);
    }
}

/* One row's scan with 8 lanes: candidates into t and, with t->want_mass (the constant `mass`),
 * the bits exps of the tokens no compare flags into rest. */
static inline __attribute__((always_inline)) void scan8(const float *src, const float *patch,
                                                        const uint32_t *set, int64_t vocab,
                                                        top_n *t, rest_sum *rest,
                                                        const int mass) {
  const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const float scale = BITS_SCALE(t->temperature);
  const __m256 a = _mm256_set1_ps(scale), b = _mm256_set1_ps(BITS_BIAS - scale * rest->zref);
  const __m256 zero = _mm256_setzero_ps();
  __m256d sum = _mm256_setzero_pd();
  int64_t at[BLOCK / 8];
  uint32_t flags[BLOCK / 8];
  int64_t j = scan_scalar(src, patch, set, 0, vocab, 8, t, rest), last = vocab & ~(int64_t)7;
  while (j < last) {
    const int64_t end = last - j < BLOCK ? last : j + BLOCK;
    const __m256 threshold = _mm256_set1_ps(t->threshold);
    __m256 acc = zero;
    int count = 0;
    for (; j < end; j += 8) {
      _mm_prefetch((const char *)(src + j + PREFETCH), _MM_HINT_T1);
      __m256 x = _mm256_loadu_ps(src + j);
      uint32_t hit = set ? (set[j >> 5] >> (j & 24)) & 0xFFu : 0;
      if (hit) {
        __m256i sel = _mm256_and_si256(_mm256_set1_epi32((int)hit), lane_bit);
        __m256 use = _mm256_castsi256_ps(_mm256_cmpeq_epi32(sel, lane_bit));
        x = _mm256_blendv_ps(x, _mm256_loadu_ps(patch + j), use);
      }
      __m256 flagged = _mm256_cmp_ps(x, threshold, _CMP_GT_OQ);
      if (mass) { /* NaN and -inf give bits 0 (max returns its second operand for NaN) */
        __m256 bits = _mm256_max_ps(_mm256_fmadd_ps(x, a, b), zero);
        acc = _mm256_add_ps(acc, _mm256_andnot_ps(flagged, _mm256_castsi256_ps(_mm256_cvtps_epi32(bits))));
      }
      uint32_t hits = (uint32_t)_mm256_movemask_ps(flagged);
      at[count] = j;
      flags[count] = hits;
      count += hits != 0;
    }
    if (mass)
      sum = _mm256_add_pd(sum, _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(acc)),
                                             _mm256_cvtps_pd(_mm256_extractf128_ps(acc, 1))));
    take_flagged(src, patch, set, at, flags, count, t);
  }
  if (mass) {
    double sums[4];
    _mm256_storeu_pd(sums, sum);
    rest->rough += sums[0] + sums[1] + sums[2] + sums[3];
    rest->lane_adds = BLOCK / 8;
  }
  scan_scalar(src, patch, set, j, vocab, 0, t, rest);
}

static void scan_row(const float *src, const float *patch, const uint32_t *set, int64_t vocab,
                     top_n *t, rest_sum *rest) {
  if (t->want_mass) scan8(src, patch, set, vocab, t, rest, 1);
  else scan8(src, patch, set, vocab, t, rest, 0);
}

/* scan_row with 16 lanes. */
static inline __attribute__((always_inline)) AVX512 void scan16(const float *src,
                                                                const float *patch,
                                                                const uint32_t *set,
                                                                int64_t vocab, top_n *t,
                                                                rest_sum *rest,
                                                                const int mass) {
  const float scale = BITS_SCALE(t->temperature);
  const __m512 a = _mm512_set1_ps(scale), b = _mm512_set1_ps(BITS_BIAS - scale * rest->zref);
  const __m512 zero = _mm512_setzero_ps();
  __m512d sum = _mm512_setzero_pd();
  int64_t at[BLOCK / 16];
  uint32_t flags[BLOCK / 16];
  int64_t j = scan_scalar(src, patch, set, 0, vocab, 16, t, rest), last = vocab & ~(int64_t)15;
  while (j < last) {
    const int64_t end = last - j < BLOCK ? last : j + BLOCK;
    const __m512 threshold = _mm512_set1_ps(t->threshold);
    __m512 acc = zero;
    int count = 0;
    for (; j < end; j += 16) {
      _mm_prefetch((const char *)(src + j + PREFETCH), _MM_HINT_T1);
      __m512 x = _mm512_loadu_ps(src + j);
      __mmask16 hit = set ? (__mmask16)(set[j >> 5] >> (j & 16)) : 0;
      if (hit) x = _mm512_mask_loadu_ps(x, hit, patch + j);
      __mmask16 flagged = _mm512_cmp_ps_mask(x, threshold, _CMP_GT_OQ);
      if (mass) {
        __m512 bits = _mm512_max_ps(_mm512_fmadd_ps(x, a, b), zero);
        acc = _mm512_mask_add_ps(acc, (__mmask16)~flagged, acc, _mm512_castsi512_ps(_mm512_cvtps_epi32(bits)));
      }
      at[count] = j; /* kept only where a lane is flagged: no branch to mispredict */
      flags[count] = flagged;
      count += flagged != 0;
    }
    if (mass) {
      __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc), 1));
      sum = _mm512_add_pd(sum, _mm512_add_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(acc)),
                                             _mm512_cvtps_pd(hi)));
    }
    take_flagged(src, patch, set, at, flags, count, t);
  }
  if (mass) {
    rest->rough += _mm512_reduce_add_pd(sum);
    rest->lane_adds = BLOCK / 16;
  }
  scan_scalar(src, patch, set, j, vocab, 0, t, rest);
}

static AVX512 void scan_row_avx512(const float *src, const float *patch, const uint32_t *set,
                                   int64_t vocab, top_n *t, rest_sum *rest) {
  if (t->want_mass) scan16(src, patch, set, vocab, t, rest, 1);
  else scan16(src, patch, set, vocab, t, rest, 0);
}

/* mass[0] <= row_mass's value <= mass[1] (see the top): m = max y; kept: the exact terms of
 * the candidates the scan kept, t its state after it; rest: the tokens it did not take.
 * Returns 1 where the bits exps are out of their range and the rest's cap may be loose (the
 * caller then takes the exact normaliser), else 0. */
static int mass_bounds(const top_n *t, float m, double kept, const rest_sum *rest,
                       int64_t vocab, double *mass) {
  if (m == -INFINITY) { /* torch: exp(-inf - -inf) */
    mass[0] = mass[1] = NAN;
    return 0;
  }
  const double temperature = t->temperature, tiny = (double)vocab * 0x1p-120;
  double dropped = t->dropped_ref == -INFINITY ? 0.0 : t->dropped * exp((double)t->dropped_ref - m);
  mass[0] = kept * (1.0 - EXACT_SLACK) + dropped * (1.0 - DROPPED_SLACK) - tiny;
  mass[1] = kept * (1.0 + EXACT_SLACK) + dropped * (1.0 + DROPPED_SLACK) + tiny;
  /* none of the rest lies above the scan's last threshold (a compare or a scalar test found
   * each not above the threshold of its time, and thresholds only rise; while open, every
   * token is taken): a cap on their share whatever the bits exps; below e^-88 of the largest,
   * row_mass's exps are 0 */
  const float top = t->open ? -INFINITY : t->threshold;
  double below = (double)y_of(top, t->temperature) - m;
  if (!(below > -88.0)) return 0;
  double cap = (double)vocab * exp(fmin(below, 0.0)) * (1.0 + DROPPED_SLACK);
  double top_v = ((double)top - rest->zref) / temperature * 1.4426950408889634;
  double scale = exp((double)rest->zref / temperature - m), rough = scale * rest->rough;
  int valid = fabsf(m) <= MASS_RANGE && fabs((double)rest->zref / temperature) <= BITS_RANGE;
  if (!(valid && top_v < ROUGH_TOP && isfinite(rough))) return 1;
  double slack = ROUGH_SLACK + (double)rest->lane_adds * 0x1p-24;
  mass[0] += rough / ROUGH_OVER * (1.0 - slack);
  mass[1] += fmin(cap, rough * (1.0 + slack) + scale * (double)vocab * 0x1p-126);
  return 0;
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
  float *guesses = malloc(sizeof(float) * rows);
#pragma omp parallel num_threads(nthreads) if (rows > 1)
  {
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
      const float *next = r + 1 < rows ? src + (order ? order[r + 1] : r + 1) * stride : NULL;
      guesses[r] = sample_threshold(src + (order ? order[r] : r) * stride, vocab, n, next);
    }
    entry *buf = malloc(sizeof(entry) * TAKEN * n);
    uint64_t *keys = malloc(sizeof(uint64_t) * 2 * TAKEN * n);
    float *scratch = malloc(sizeof(float) * TAKEN * n);
    uint32_t *set = patch_ids ? calloc((size_t)(vocab + 31) / 32 + 1, sizeof(uint32_t)) : NULL;
    float *dense = patch_ids ? malloc(sizeof(float) * vocab) : NULL, *exact_row = NULL;
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
      const int wanted = want_mass && want_mass[r];
      const float t_r = temperature[r], guess = guesses[r];
      const float zref = wanted && guess == -INFINITY ? sample_max(row, vocab) : guess;
      top_n t = {buf, 0, n, guess == -INFINITY, nextafterf(guess, -INFINITY), wanted, t_r,
                 -INFINITY, 0.0, scratch};
      void (*scan)(const float *, const float *, const uint32_t *, int64_t, top_n *,
                   rest_sum *) = use_avx512 ? scan_row_avx512 : scan_row;
      rest_sum rest = {zref, 0.0, 0};
      double kept = 0.0;
      scan(row, row_patch, set, vocab, &t, &rest);
      const top_n first = t;
      float m = -INFINITY;
      if (wanted && t.len) { /* the row's largest token is among them (see the top) */
        float top = -INFINITY;
        for (int64_t i = 0; i < t.len; i++) top = max_of(top, scratch[i] = buf[i].v);
        m = y_of(top, t_r);
        kept = exact_terms(scratch, t.len, t_r, m);
      }
      if (t.len < n && !t.open) { /* fewer than n reach the guess: again, without it */
        t = (top_n){buf, 0, n, 1, -INFINITY, 0, t_r, -INFINITY, 0.0, scratch};
        scan(row, row_patch, set, vocab, &t, &rest);
      }
      sort_entries(buf, t.len, n, keys, keys + TAKEN * n, values + r * n, ids + r * n);
      if (wanted && mass_bounds(&first, first.len ? m : y_of(values[r * n], t_r), kept, &rest,
                                vocab, mass + 2 * r))
        mass[2 * r] = mass[2 * r + 1] = read_mass(row, vocab, row_ids, width, patch + r * vocab,
                                                  t_r, values + r * n, &exact_row);
      for (int64_t i = 0; set && i < width; i++)
        if (row_ids[i] >= 0) set[row_ids[i] >> 5] &= ~(1u << (row_ids[i] & 31));
    }
    free(buf);
    free(keys);
    free(scratch);
    free(set);
    free(dense);
    free(exact_row);
  }
  free(guesses);
}

/* Stage 1 on the work buffer z [*, vocab], as penalties.PenaltyHistory.apply computes it, for
 * the rows p->rows[i] (work rows): with repetition (NULL: no row), every distinct id of
 * prompt[i, :wp] and output[i, :wo] (-1: padding) becomes z > 0 ? z / r : z * r; then with
 * frequency_presence ([n, 2]; NULL: no row), each output id at its first occurrence (counts[i, k]
 * > 0 there, 0 elsewhere) becomes (z - c * f) - p. */
void winnow_penalise(float *z, int64_t vocab, const stage_one *p) {
  uint32_t *done = p->repetition ? calloc((size_t)(vocab + 31) / 32 + 1, sizeof(uint32_t)) : NULL;
  for (int64_t i = 0; i < p->n; i++) penalise_row(z + p->rows[i] * vocab, i, p, done);
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
