/* fp32 CPU kernels for the decode loop (x86-64 with AVX2 + FMA), loaded through ctypes.
 *
 * winnow_linear: y[m, n] = x[m, :] . w[n, :] (+ bias[n]) with w packed into panels of 16 output
 *   features, panel p = w[16p : 16p + 16, :] stored k-major ([k][16]), zero rows past n. One
 *   panel row is one 64-byte cache line, so a panel streams linearly. Threads split the panels.
 *   Batches stream each 256-deep slice of a panel once and reuse it from L1 for every 6-row block
 *   of x (6 x 16 register tile, 12 accumulators); the next slice is prefetched into L2 while the
 *   first block runs. A single row (decode at batch 1) is a pure weight stream: 8 accumulators.
 *
 * winnow_paged_decode: one query token per sequence against its keys/values in the paged cache
 *   ([num_blocks, block_size, kv_heads, head_dim] each), read in place through the block table.
 *   One work item per (sequence, kv head) serves all query heads of its group.
 *
 * Threads come from the OpenMP runtime the process already has loaded (PyTorch's libgomp), so
 * these kernels and PyTorch's own ops share one pool.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#define NR 16
#define MR 6
#define KC 256

static inline __attribute__((always_inline)) void put_row(__m256 lo, __m256 hi, float *row,
                                                          int64_t nvalid, int accumulate) {
  if (nvalid == NR) {
    if (accumulate) {
      lo = _mm256_add_ps(lo, _mm256_loadu_ps(row));
      hi = _mm256_add_ps(hi, _mm256_loadu_ps(row + 8));
    }
    _mm256_storeu_ps(row, lo);
    _mm256_storeu_ps(row + 8, hi);
    return;
  }
  float tmp[NR];
  _mm256_storeu_ps(tmp, lo);
  _mm256_storeu_ps(tmp + 8, hi);
  for (int64_t j = 0; j < nvalid; j++) row[j] = accumulate ? row[j] + tmp[j] : tmp[j];
}

/* Named accumulators rather than an array, so that the compiler keeps all 12 in registers. */
#define ROWS(OP) OP(0) OP(1) OP(2) OP(3) OP(4) OP(5)
#define DECLARE(i) __m256 lo##i = _mm256_setzero_ps(), hi##i = _mm256_setzero_ps();
#define STEP(i)                                     \
  if (mr > i) {                                     \
    __m256 a = _mm256_broadcast_ss(x + i * ldx + k); \
    lo##i = _mm256_fmadd_ps(a, b0, lo##i);          \
    hi##i = _mm256_fmadd_ps(a, b1, hi##i);          \
  }
#define PUT(i) \
  if (mr > i) put_row(lo##i, hi##i, y + i * ldy, nvalid, accumulate);

/* mr (1..6) rows of x against kc rows of one panel slice; `prefetch` (or NULL): the next slice. */
static inline __attribute__((always_inline)) void tile(const int mr, int64_t kc, const float *x,
                                                       int64_t ldx, const float *wp,
                                                       const float *prefetch, float *y,
                                                       int64_t ldy, int64_t nvalid,
                                                       int accumulate) {
  ROWS(DECLARE)
  for (int64_t k = 0; k < kc; k++) {
    __m256 b0 = _mm256_load_ps(wp + k * NR), b1 = _mm256_load_ps(wp + k * NR + 8);
    if (prefetch) _mm_prefetch((const char *)(prefetch + k * NR), _MM_HINT_T1);
    ROWS(STEP)
  }
  ROWS(PUT)
}

static void tile_rows(int mr, int64_t kc, const float *x, int64_t ldx, const float *wp,
                      const float *prefetch, float *y, int64_t ldy, int64_t nvalid,
                      int accumulate) {
  switch (mr) {
    case 6: tile(6, kc, x, ldx, wp, prefetch, y, ldy, nvalid, accumulate); break;
    case 5: tile(5, kc, x, ldx, wp, prefetch, y, ldy, nvalid, accumulate); break;
    case 4: tile(4, kc, x, ldx, wp, prefetch, y, ldy, nvalid, accumulate); break;
    case 3: tile(3, kc, x, ldx, wp, prefetch, y, ldy, nvalid, accumulate); break;
    case 2: tile(2, kc, x, ldx, wp, prefetch, y, ldy, nvalid, accumulate); break;
    default: tile(1, kc, x, ldx, wp, prefetch, y, ldy, nvalid, accumulate); break;
  }
}

/* One row of x against a whole panel: 4 k-steps in flight hide the FMA latency. */
static void gemv_panel(int64_t k, const float *x, const float *wp, float *y, int64_t nvalid) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  int64_t kk = 0;
  for (; kk + 4 <= k; kk += 4) {
    const float *w = wp + kk * NR;
    a0 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + kk), _mm256_load_ps(w), a0);
    a1 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + kk), _mm256_load_ps(w + 8), a1);
    a2 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + kk + 1), _mm256_load_ps(w + 16), a2);
    a3 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + kk + 1), _mm256_load_ps(w + 24), a3);
    a4 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + kk + 2), _mm256_load_ps(w + 32), a4);
    a5 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + kk + 2), _mm256_load_ps(w + 40), a5);
    a6 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + kk + 3), _mm256_load_ps(w + 48), a6);
    a7 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + kk + 3), _mm256_load_ps(w + 56), a7);
  }
  for (; kk < k; kk++) {
    const float *w = wp + kk * NR;
    a0 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + kk), _mm256_load_ps(w), a0);
    a1 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + kk), _mm256_load_ps(w + 8), a1);
  }
  put_row(_mm256_add_ps(_mm256_add_ps(a0, a2), _mm256_add_ps(a4, a6)),
          _mm256_add_ps(_mm256_add_ps(a1, a3), _mm256_add_ps(a5, a7)), y, nvalid, 0);
}

static void add_bias(float *y, int64_t ldy, int64_t m, const float *bias, int64_t nvalid) {
  for (int64_t i = 0; i < m; i++)
    for (int64_t j = 0; j < nvalid; j++) y[i * ldy + j] += bias[j];
}

/* x [m, k] row-major (row stride ldx), packed w (see top), y [m, n] contiguous. */
void winnow_linear(const float *x, int64_t m, int64_t k, int64_t ldx, const float *wp, int64_t n,
                   const float *bias, float *y, int nthreads) {
  int64_t panels = (n + NR - 1) / NR;
#pragma omp parallel num_threads(nthreads)
  {
    int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
    int64_t first = panels * t / nt, end = panels * (t + 1) / nt;
    for (int64_t p = first; p < end; p++) {
      const float *panel = wp + p * k * NR;
      int64_t nvalid = n - p * NR < NR ? n - p * NR : NR;
      float *ycol = y + p * NR;
      if (m == 1) {
        gemv_panel(k, x, panel, ycol, nvalid);
      } else {
        for (int64_t k0 = 0; k0 < k; k0 += KC) {
          int64_t kc = k - k0 < KC ? k - k0 : KC;
          const float *next = k0 + KC < k ? panel + (k0 + KC) * NR
                              : p + 1 < end ? panel + k * NR
                                            : NULL;
          for (int64_t i = 0; i < m; i += MR) {
            int mr = m - i < MR ? (int)(m - i) : MR;
            tile_rows(mr, kc, x + i * ldx + k0, ldx, panel + k0 * NR, i == 0 ? next : NULL,
                      ycol + i * n, n, nvalid, k0 > 0);
          }
        }
      }
      if (bias) add_bias(ycol, n, m, bias + p * NR, nvalid);
    }
  }
}

/* exp on 8 lanes: Cody-Waite range reduction to [-ln2/2, ln2/2], degree-6 polynomial, 2^n by
 * exponent arithmetic; inputs clamped to +-88.38 (the softmax only feeds it values <= 0). */
static inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)),
                    _mm256_set1_ps(-88.3762626647949f));
  __m256 n = _mm256_floor_ps(
      _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  __m256i pow2 = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(pow2));
}

static inline float hsum(__m256 v) {
  __m128 sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
  sum = _mm_add_ss(sum, _mm_movehdup_ps(sum));
  return _mm_cvtss_f32(sum);
}

/* [sum(a0), ..., sum(a7)] in one register. */
static inline __m256 hsum8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5,
                           __m256 a6, __m256 a7) {
  __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
  return _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
}

/* scores[j] = q . rows[j] * scale for j < span, eight keys at a time. */
static void score_keys(const float *q, const float *const *rows, int64_t span, int64_t d,
                       float scale, float *scores) {
  int64_t j = 0;
  for (; j + 8 <= span; j += 8) {
    const float *const *r = rows + j;
    __m256 c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0;
    for (int64_t e = 0; e < d; e += 8) {
      __m256 qv = _mm256_loadu_ps(q + e);
      c0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(r[0] + e), c0);
      c1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(r[1] + e), c1);
      c2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(r[2] + e), c2);
      c3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(r[3] + e), c3);
      c4 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(r[4] + e), c4);
      c5 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(r[5] + e), c5);
      c6 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(r[6] + e), c6);
      c7 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(r[7] + e), c7);
    }
    __m256 dots = hsum8(c0, c1, c2, c3, c4, c5, c6, c7);
    _mm256_storeu_ps(scores + j, _mm256_mul_ps(dots, _mm256_set1_ps(scale)));
  }
  for (; j < span; j++) {
    __m256 c = _mm256_setzero_ps();
    for (int64_t e = 0; e < d; e += 8)
      c = _mm256_fmadd_ps(_mm256_loadu_ps(q + e), _mm256_loadu_ps(rows[j] + e), c);
    scores[j] = hsum(c) * scale;
  }
}

/* scores -> exp(scores - max) in place; returns their sum. */
static float softmax_numerators(float *scores, int64_t span) {
  float top = scores[0], total = 0.0f;
  for (int64_t j = 1; j < span; j++) top = scores[j] > top ? scores[j] : top;
  __m256 topv = _mm256_set1_ps(top), sum = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= span; j += 8) {
    __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + j), topv));
    _mm256_storeu_ps(scores + j, e);
    sum = _mm256_add_ps(sum, e);
  }
  for (; j < span; j++) {
    scores[j] = expf(scores[j] - top);
    total += scores[j];
  }
  return total + hsum(sum);
}

/* out[0:d] = sum_j weights[j] * rows[j][0:d], 32 columns (four registers) per pass. */
static void weighted_sum(const float *weights, const float *const *rows, int64_t span, int64_t d,
                         float *out) {
  int64_t e = 0;
  for (; e + 32 <= d; e += 32) {
    __m256 o0 = _mm256_setzero_ps(), o1 = o0, o2 = o0, o3 = o0;
    for (int64_t j = 0; j < span; j++) {
      __m256 w = _mm256_broadcast_ss(weights + j);
      const float *v = rows[j] + e;
      o0 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v), o0);
      o1 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 8), o1);
      o2 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 16), o2);
      o3 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 24), o3);
    }
    _mm256_storeu_ps(out + e, o0);
    _mm256_storeu_ps(out + e + 8, o1);
    _mm256_storeu_ps(out + e + 16, o2);
    _mm256_storeu_ps(out + e + 24, o3);
  }
  for (; e < d; e += 8) {
    __m256 o = _mm256_setzero_ps();
    for (int64_t j = 0; j < span; j++)
      o = _mm256_fmadd_ps(_mm256_broadcast_ss(weights + j), _mm256_loadu_ps(rows[j] + e), o);
    _mm256_storeu_ps(out + e, o);
  }
}

/* out[i] [hq, d] = attention of q[tokens[i]] (q [*, hq, d]) over sequence seqs[i]: block table
 * row seqs[i], positions [max(0, len - window), len) (window 0: all). d must be a multiple of 8. */
void winnow_paged_decode(const float *q, float *out, const int64_t *tokens, const int64_t *seqs,
                         int64_t batch, const float *kcache, const float *vcache,
                         const int64_t *block_tables, int64_t table_width, const int64_t *seq_lens,
                         int64_t block_size, int64_t hq, int64_t hkv, int64_t d, int64_t window,
                         float scale, int nthreads) {
  int64_t group = hq / hkv;
#pragma omp parallel num_threads(nthreads)
  {
    /* per thread, grown on demand: scores [group][span], key and value row pointers [span] */
    float *scores = NULL;
    const float **keys = NULL, **values = NULL;
    int64_t capacity = 0;
#pragma omp for schedule(dynamic)
    for (int64_t item = 0; item < batch * hkv; item++) {
      int64_t i = item / hkv, g = item % hkv;
      int64_t len = seq_lens[seqs[i]];
      int64_t start = window > 0 && len > window ? len - window : 0, span = len - start;
      if (span > capacity) {
        capacity = span * 2;
        free(scores);
        free(keys);
        free(values);
        scores = malloc(sizeof(float) * group * capacity);
        keys = malloc(sizeof(float *) * capacity);
        values = malloc(sizeof(float *) * capacity);
      }
      const int64_t *table = block_tables + seqs[i] * table_width;
      for (int64_t pos = start; pos < len;) {
        int64_t offset = pos % block_size, run = block_size - offset;
        if (run > len - pos) run = len - pos;
        int64_t row = ((table[pos / block_size] * block_size + offset) * hkv + g) * d;
        for (int64_t r = 0; r < run; r++, pos++) {
          keys[pos - start] = kcache + row + r * hkv * d;
          values[pos - start] = vcache + row + r * hkv * d;
        }
      }
      for (int64_t h = 0; h < group; h++) {
        const float *qh = q + (tokens[i] * hq + g * group + h) * d;
        float *s = scores + h * span, *o = out + (i * hq + g * group + h) * d;
        score_keys(qh, keys, span, d, scale, s);
        float inv = 1.0f / softmax_numerators(s, span);
        for (int64_t j = 0; j < span; j++) s[j] *= inv;
        weighted_sum(s, values, span, d, o);
      }
    }
    free(scores);
    free(keys);
    free(values);
  }
}
