/* Whole-row helpers for the sampler's thresholded route (x86-64, AVX2 + FMA), through ctypes.
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
 */
#include <immintrin.h>
#include <float.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

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

static double row_mass(const float *z, int64_t vocab, float t) {
  const __m256 tv = _mm256_set1_ps(t), big = _mm256_set1_ps(FLT_MAX);
  __m256 mv = _mm256_set1_ps(-INFINITY);
  int64_t j = 0;
  for (; j + 8 <= vocab; j += 8)
    mv = _mm256_max_ps(mv, _mm256_min_ps(big, _mm256_div_ps(_mm256_loadu_ps(z + j), tv)));
  float lanes[8], m = -INFINITY;
  _mm256_storeu_ps(lanes, mv);
  for (int i = 0; i < 8; i++) m = lanes[i] > m ? lanes[i] : m;
  for (int64_t i = j; i < vocab; i++) m = y_of(z[i], t) > m ? y_of(z[i], t) : m;
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

/* mass[r] = sum_j exp(y_j - max y) over rows of z (row stride `stride`, no NaN). */
void winnow_total_mass(const float *z, int64_t rows, int64_t vocab, int64_t stride,
                       const float *temperature, double *mass, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (rows > 1)
  for (int64_t r = 0; r < rows; r++) mass[r] = row_mass(z + r * stride, vocab, temperature[r]);
}

/* dst[r] = src[order[r]] (src[r] when order is NULL) with NaN -> -inf and +inf -> FLT_MAX: the
 * sampler's load of the model's logits into its work buffer, in one streaming pass. */
void winnow_load_rows(const float *src, int64_t rows, int64_t vocab, int64_t stride,
                      const int64_t *order, float *dst, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (rows > 1)
  for (int64_t r = 0; r < rows; r++) {
    const float *s = src + (order ? order[r] : r) * stride;
    float *d = dst + r * vocab;
    const __m256 big = _mm256_set1_ps(FLT_MAX), ninf = _mm256_set1_ps(-INFINITY);
    int64_t j = 0;
    for (; j + 8 <= vocab; j += 8) {
      __m256 x = _mm256_min_ps(big, _mm256_loadu_ps(s + j)); /* NaN stays NaN */
      _mm256_storeu_ps(d + j, _mm256_blendv_ps(x, ninf, _mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
    }
    for (; j < vocab; j++) d[j] = isnan(s[j]) ? -INFINITY : (s[j] > FLT_MAX ? FLT_MAX : s[j]);
  }
}
