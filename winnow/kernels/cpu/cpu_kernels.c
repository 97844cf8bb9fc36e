/* fp32 CPU kernels for the decode loop (x86-64 with AVX2 + FMA), loaded through ctypes.
 *
 * winnow_linear: y[m, n] = x[m, :] . w[n, :] (+ bias[n]) with w packed into panels of 16 output
 *   features, panel p = w[16p : 16p + 16, :] stored k-major ([k][16]), zero rows past n. An fp32
 *   panel row is one 64-byte cache line, so a panel streams linearly. Threads share the panels.
 *   Panels of fp16 or bf16 elements (a 16-bit checkpoint's weights) are widened to fp32 as they
 *   are loaded: the same products and sums as fp32 panels of the same values, half the bytes.
 *   Batches stream each 256-deep slice of a panel once and reuse it from L1 for every 6-row tile
 *   of a block of up to 96 rows of x (6 x 16 register tile, 12 accumulators); the next slice is
 *   prefetched into L2 while the first tile runs. A single row (decode at batch 1) is a pure weight
 *   stream with software prefetch 8 KB ahead (the hardware prefetcher alone left a part of the
 *   memory bandwidth unused; BENCHMARKS.md). On a CPU with AVX-512F the same panels feed 512-bit kernels: a
 *   12-row x 2-panel tile (24 accumulators) for batches, one register per panel row for one row.
 *
 * winnow_paged_decode: one query token per sequence against its keys/values in the paged cache
 *   ([num_blocks, block_size, kv_heads, head_dim] each, fp32, fp16 or bf16 elements), read in
 *   place through the block table. A work item serves every query head of a sequence, or of a
 *   range of its kv heads when the batch is too small to keep the threads busy.
 *
 * winnow_decode_layers: every decoder layer of a step in which each sequence has one new token,
 *   stringing the kernels above together in C (at batch 1 the Python between them cost a share of
 *   every step; BENCHMARKS.md).
 *
 * Threads come from the OpenMP runtime the process already has loaded (PyTorch's libgomp), so
 * these kernels and PyTorch's own ops share one pool.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define NR 16
#define MR 6
#define KC 256
#define MC 96
#define MR512 12
#define PREFETCH_AHEAD 8192 /* bytes: how far ahead of a single-row weight stream to prefetch */

/* Whether winnow_linear takes the AVX-512 path; the loader asks for it where the CPU has it. */
static int use_avx512 = 0;

/* Ask for the AVX-512 kernels (1) or the AVX2 ones (0); returns what is in use now. */
int winnow_use_avx512(int wanted) {
  __builtin_cpu_init();
  use_avx512 = wanted && __builtin_cpu_supports("avx512f");
  return use_avx512;
}

/* Element types of cache rows (--kv-cache-dtype) and of packed weights (a 16-bit checkpoint's
 * projections stay 16-bit): fp32, or fp16 / bf16 widened to fp32 on load, exactly. */
enum { T_F32 = 0, T_F16 = 1, T_BF16 = 2 };

static inline __attribute__((always_inline)) int64_t elem_size(const int type) {
  return type == T_F32 ? 4 : 2;
}

/* Elements e .. e + 7 of the row at `row` as fp32. */
static inline __attribute__((always_inline)) __m256 load8(const char *row, int64_t e,
                                                          const int type) {
  if (type == T_F32) return _mm256_loadu_ps((const float *)row + e);
  __m128i half = _mm_loadu_si128((const __m128i *)((const uint16_t *)row + e));
  if (type == T_F16) return _mm256_cvtph_ps(half);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}

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

/* mr (1..6) rows of x against kc rows of one panel slice of element type wt; `prefetch` (or
 * NULL): the next slice. */
static inline __attribute__((always_inline)) void tile(const int mr, int64_t kc, const float *x,
                                                       int64_t ldx, const char *wp,
                                                       const char *prefetch, float *y,
                                                       int64_t ldy, int64_t nvalid,
                                                       int accumulate, const int wt) {
  ROWS(DECLARE)
  for (int64_t k = 0; k < kc; k++) {
    __m256 b0 = load8(wp, k * NR, wt), b1 = load8(wp, k * NR + 8, wt);
    if (prefetch) _mm_prefetch(prefetch + k * NR * elem_size(wt), _MM_HINT_T1);
    ROWS(STEP)
  }
  ROWS(PUT)
}

#define TILE_CASE(r)                                                            \
  case r:                                                                       \
    tile(r, kc, x, ldx, wp, prefetch, y, ldy, nvalid, accumulate, wt); \
    break;

static inline __attribute__((always_inline)) void tile_rows(int mr, int64_t kc, const float *x,
                                                            int64_t ldx, const char *wp,
                                                            const char *prefetch, float *y,
                                                            int64_t ldy, int64_t nvalid,
                                                            int accumulate, const int wt) {
  switch (mr) {
    TILE_CASE(6) TILE_CASE(5) TILE_CASE(4) TILE_CASE(3) TILE_CASE(2) default: TILE_CASE(1)
  }
}

/* Prefetch the cache lines that hold `bytes` bytes PREFETCH_AHEAD past w; a prefetch never
 * faults, so running past the last panel is harmless. */
static inline __attribute__((always_inline)) void prefetch_ahead(const char *w, int64_t bytes) {
  for (int64_t line = 0; line < bytes; line += 64)
    _mm_prefetch(w + PREFETCH_AHEAD + line, _MM_HINT_T0);
}

/* One row of x against a whole panel: 4 k-steps in flight hide the FMA latency. */
static inline __attribute__((always_inline)) void gemv_panel(int64_t k, const float *x,
                                                             const char *wp, float *y,
                                                             int64_t nvalid, const int wt) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  int64_t kk = 0;
  for (; kk + 4 <= k; kk += 4) {
    const char *w = wp + kk * NR * elem_size(wt);
    prefetch_ahead(w, 4 * NR * elem_size(wt));
    a0 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + kk), load8(w, 0, wt), a0);
    a1 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + kk), load8(w, 8, wt), a1);
    a2 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + kk + 1), load8(w, 16, wt), a2);
    a3 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + kk + 1), load8(w, 24, wt), a3);
    a4 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + kk + 2), load8(w, 32, wt), a4);
    a5 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + kk + 2), load8(w, 40, wt), a5);
    a6 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + kk + 3), load8(w, 48, wt), a6);
    a7 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + kk + 3), load8(w, 56, wt), a7);
  }
  for (; kk < k; kk++) {
    a0 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + kk), load8(wp, kk * NR, wt), a0);
    a1 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + kk), load8(wp, kk * NR + 8, wt), a1);
  }
  put_row(_mm256_add_ps(_mm256_add_ps(a0, a2), _mm256_add_ps(a4, a6)),
          _mm256_add_ps(_mm256_add_ps(a1, a3), _mm256_add_ps(a5, a7)), y, nvalid, 0);
}

/* ---- AVX-512F: the same packed panels, one 16-element panel row per register ---- */
#define AVX512 __attribute__((target("avx512f")))

/* Elements e .. e + 15 of the row at `row` as fp32. */
static inline __attribute__((always_inline)) AVX512 __m512 load16(const char *row, int64_t e,
                                                                  const int type) {
  if (type == T_F32) return _mm512_loadu_ps((const float *)row + e);
  __m256i half = _mm256_loadu_si256((const __m256i *)((const uint16_t *)row + e));
  if (type == T_F16) return _mm512_cvtph_ps(half);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

static inline __attribute__((always_inline)) AVX512 void put_row512(__m512 v, float *row,
                                                                    __mmask16 mask,
                                                                    int accumulate) {
  if (accumulate) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, row));
  _mm512_mask_storeu_ps(row, mask, v);
}

#define ROWS12(OP) OP(0) OP(1) OP(2) OP(3) OP(4) OP(5) OP(6) OP(7) OP(8) OP(9) OP(10) OP(11)
#define DECLARE512(i) __m512 p##i = _mm512_setzero_ps(), q##i = _mm512_setzero_ps();
#define STEP512(i)                                 \
  if (mr > i) {                                    \
    __m512 a = _mm512_set1_ps(x[i * ldx + k]);     \
    p##i = _mm512_fmadd_ps(a, b0, p##i);           \
    q##i = _mm512_fmadd_ps(a, b1, q##i);           \
  }
#define PUT512(i)                                                   \
  if (mr > i) {                                                     \
    put_row512(p##i, y + i * ldy, mask0, accumulate);               \
    if (mask1) put_row512(q##i, y + i * ldy + NR, mask1, accumulate); \
  }

/* mr (1..12) rows of x against kc rows of two panel slices w0, w1 of element type wt (w1 == w0
 * and mask1 == 0 when there is no second panel); pf0, pf1 (each may be NULL): slices to
 * prefetch into L2, pf_step bytes per k-step. */
static inline __attribute__((always_inline)) AVX512 void tile512(
    const int mr, int64_t kc, const float *x, int64_t ldx, const char *w0, const char *w1,
    const char *pf0, const char *pf1, int64_t pf_step, float *y, int64_t ldy, __mmask16 mask0,
    __mmask16 mask1, int accumulate, const int wt) {
  ROWS12(DECLARE512)
  for (int64_t k = 0; k < kc; k++) {
    __m512 b0 = load16(w0, k * NR, wt), b1 = load16(w1, k * NR, wt);
    if (pf0) _mm_prefetch(pf0 + k * pf_step, _MM_HINT_T1);
    if (pf1) _mm_prefetch(pf1 + k * pf_step, _MM_HINT_T1);
    ROWS12(STEP512)
  }
  ROWS12(PUT512)
}

#define TILE512_CASE(r)                                                                       \
  case r:                                                                                     \
    tile512(r, kc, x, ldx, w0, w1, pf0, pf1, pf_step, y, ldy, mask0, mask1, accumulate, wt); \
    break;

static inline __attribute__((always_inline)) AVX512 void tile512_rows(
    int mr, int64_t kc, const float *x, int64_t ldx, const char *w0, const char *w1,
    const char *pf0, const char *pf1, int64_t pf_step, float *y, int64_t ldy, __mmask16 mask0,
    __mmask16 mask1, int accumulate, const int wt) {
  switch (mr) {
    TILE512_CASE(12) TILE512_CASE(11) TILE512_CASE(10) TILE512_CASE(9) TILE512_CASE(8)
    TILE512_CASE(7) TILE512_CASE(6) TILE512_CASE(5) TILE512_CASE(4) TILE512_CASE(3)
    TILE512_CASE(2) default: TILE512_CASE(1)
  }
}

static inline __attribute__((always_inline)) AVX512 void gemv_panel512(int64_t k, const float *x,
                                                                       const char *wp, float *y,
                                                                       __mmask16 mask,
                                                                       const int wt) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t kk = 0;
  for (; kk + 4 <= k; kk += 4) {
    const char *w = wp + kk * NR * elem_size(wt);
    prefetch_ahead(w, 4 * NR * elem_size(wt));
    a0 = _mm512_fmadd_ps(_mm512_set1_ps(x[kk]), load16(w, 0, wt), a0);
    a1 = _mm512_fmadd_ps(_mm512_set1_ps(x[kk + 1]), load16(w, NR, wt), a1);
    a2 = _mm512_fmadd_ps(_mm512_set1_ps(x[kk + 2]), load16(w, 2 * NR, wt), a2);
    a3 = _mm512_fmadd_ps(_mm512_set1_ps(x[kk + 3]), load16(w, 3 * NR, wt), a3);
  }
  for (; kk < k; kk++)
    a0 = _mm512_fmadd_ps(_mm512_set1_ps(x[kk]), load16(wp, kk * NR, wt), a0);
  put_row512(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)), y, mask, 0);
}

static inline __mmask16 valid_mask(int64_t n, int64_t panel) {
  int64_t valid = n - panel * NR;
  return valid >= NR ? (__mmask16)0xFFFF : valid <= 0 ? 0 : (__mmask16)((1u << valid) - 1);
}

/* Rows i0..i1 of x against panels p and p + 1 (when it exists). While a slice is computed, the
 * first tile prefetches the next slice of panel p and the second tile that of panel p + 1 (a lone
 * tile prefetches both): two prefetches per k-step in one tile ran out of the core's miss
 * buffers and stalled it. Slices of 16-bit panels that several tiles share are widened once into
 * fp32 rows on the stack rather than in every tile (BENCHMARKS.md has both measurements). */
static inline __attribute__((always_inline)) AVX512 void pair_rows512(
    const float *x, int64_t i0, int64_t i1, int64_t k, int64_t ldx, const char *wp, int64_t p,
    int64_t panels, int64_t n, float *y, const int wt) {
  int64_t panel_bytes = k * NR * elem_size(wt), row_bytes = NR * elem_size(wt);
  const char *w0 = wp + p * panel_bytes, *w1 = p + 1 < panels ? w0 + panel_bytes : w0;
  float wide[2 * KC * NR] __attribute__((aligned(64))); /* widened 16-bit slices */
  __mmask16 mask0 = valid_mask(n, p), mask1 = p + 1 < panels ? valid_mask(n, p + 1) : 0;
  for (int64_t k0 = 0; k0 < k; k0 += KC) {
    int64_t kc = k - k0 < KC ? k - k0 : KC;
    const char *pf0 = NULL, *pf1 = NULL;
    if (k0 + KC < k) {
      pf0 = w0 + (k0 + KC) * row_bytes;
      pf1 = w1 + (k0 + KC) * row_bytes;
    } else if (p + 2 < panels) { /* the start of the next pair */
      pf0 = wp + (p + 2) * panel_bytes;
      pf1 = p + 3 < panels ? pf0 + panel_bytes : pf0;
    }
    int lone = i1 - i0 <= MR512;
    const char *s0 = w0 + k0 * row_bytes, *s1 = w1 + k0 * row_bytes;
    int widen = wt != T_F32 && !lone;
    if (widen) {
      for (int64_t kk = 0; kk < kc; kk++) {
        _mm512_store_ps(wide + kk * NR, load16(s0, kk * NR, wt));
        _mm512_store_ps(wide + (KC + kk) * NR, load16(s1, kk * NR, wt));
      }
      s0 = (const char *)wide;
      s1 = (const char *)(wide + KC * NR);
    }
    for (int64_t i = i0; i < i1; i += MR512) {
      int mr = i1 - i < MR512 ? (int)(i1 - i) : MR512;
      const char *first = i == i0 ? pf0 : i == i0 + MR512 ? pf1 : NULL, *second = lone ? pf1 : NULL;
      float *out = y + i * n + p * NR;
      if (widen)
        tile512_rows(mr, kc, x + i * ldx + k0, ldx, s0, s1, first, second, row_bytes, out, n,
                     mask0, mask1, k0 > 0, T_F32);
      else
        tile512_rows(mr, kc, x + i * ldx + k0, ldx, s0, s1, first, second, row_bytes, out, n,
                     mask0, mask1, k0 > 0, wt);
    }
  }
}

/* The AVX-512 kernels as functions of their own per weight type: code built for AVX-512 cannot
 * be inlined into the dispatcher, which must also run on AVX2-only CPUs. */
#define AVX512_KERNELS(suffix, wt)                                                             \
  static AVX512 void gemv512_##suffix(int64_t k, const float *x, const char *wp, float *y,     \
                                      __mmask16 mask) {                                        \
    gemv_panel512(k, x, wp, y, mask, wt);                                                      \
  }                                                                                            \
  static AVX512 void pair512_##suffix(const float *x, int64_t i0, int64_t i1, int64_t k,       \
                                      int64_t ldx, const char *wp, int64_t p, int64_t panels,  \
                                      int64_t n, float *y) {                                   \
    pair_rows512(x, i0, i1, k, ldx, wp, p, panels, n, y, wt);                                  \
  }
AVX512_KERNELS(f32, T_F32)
AVX512_KERNELS(f16, T_F16)
AVX512_KERNELS(bf16, T_BF16)
#undef AVX512_KERNELS

static void add_bias(float *y, int64_t ldy, int64_t m, const float *bias, int64_t nvalid) {
  for (int64_t i = 0; i < m; i++)
    for (int64_t j = 0; j < nvalid; j++) y[i * ldy + j] += bias[j];
}

/* Work item `item` of winnow_linear: rows i0..i1 (a block of up to MC rows) against a run of
 * panels. A batch takes runs of 16 panels, so that the prefetch of the next panel pair's first
 * slice lands in the cache of the thread that then reads it (runs of 2 were slower;
 * BENCHMARKS.md); an MC-row slice of x stays in L2 across the panels. */
static inline __attribute__((always_inline)) void linear_item(int64_t item, const float *x,
                                                              int64_t m, int64_t k, int64_t ldx,
                                                              const char *wp, int64_t n,
                                                              const float *bias, float *y,
                                                              const int wt) {
  int64_t panels = (n + NR - 1) / NR, run = m == 1 ? 8 : 16, runs = (panels + run - 1) / run;
  int64_t r = item % runs, i0 = item / runs * MC, i1 = i0 + MC < m ? i0 + MC : m;
  int64_t end = (r + 1) * run < panels ? (r + 1) * run : panels;
  int64_t row_bytes = NR * elem_size(wt), panel_bytes = k * row_bytes;
  for (int64_t p = r * run; p < end; p++) {
    const char *panel = wp + p * panel_bytes;
    int64_t nvalid = n - p * NR < NR ? n - p * NR : NR;
    float *ycol = y + p * NR;
    if (use_avx512 && m == 1) {
      __mmask16 mask = valid_mask(n, p);
      if (wt == T_F16) gemv512_f16(k, x, panel, ycol, mask);
      else if (wt == T_BF16) gemv512_bf16(k, x, panel, ycol, mask);
      else gemv512_f32(k, x, panel, ycol, mask);
    } else if (use_avx512) {
      if ((p - r * run) % 2 == 0) {
        if (wt == T_F16) pair512_f16(x, i0, i1, k, ldx, wp, p, panels, n, y);
        else if (wt == T_BF16) pair512_bf16(x, i0, i1, k, ldx, wp, p, panels, n, y);
        else pair512_f32(x, i0, i1, k, ldx, wp, p, panels, n, y);
      }
    } else if (m == 1) {
      gemv_panel(k, x, panel, ycol, nvalid, wt);
    } else {
      for (int64_t k0 = 0; k0 < k; k0 += KC) {
        int64_t kc = k - k0 < KC ? k - k0 : KC;
        const char *next = k0 + KC < k || p + 1 < panels ? panel + (k0 + KC) * row_bytes : NULL;
        for (int64_t i = i0; i < i1; i += MR) {
          int mr = i1 - i < MR ? (int)(i1 - i) : MR;
          tile_rows(mr, kc, x + i * ldx + k0, ldx, panel + k0 * row_bytes, i == i0 ? next : NULL,
                    ycol + i * n, n, nvalid, k0 > 0, wt);
        }
      }
    }
    if (bias) add_bias(ycol + i0 * n, n, i1 - i0, bias + p * NR, nvalid);
  }
}

/* One parallel loop per weight type, so that each work item's kernels are built for that type
 * (a type passed into the loop's outlined body would stay a run-time value). Work items come
 * from a shared counter, so that one thread the OS preempts does not hold up the rest. */
#define LINEAR_LOOP(suffix, wt)                                                                \
  static void linear_##suffix(const float *x, int64_t m, int64_t k, int64_t ldx,               \
                              const char *wp, int64_t n, const float *bias, float *y,          \
                              int nthreads) {                                                  \
    int64_t panels = (n + NR - 1) / NR, run = m == 1 ? 8 : 16;                                 \
    int64_t items = (m + MC - 1) / MC * ((panels + run - 1) / run);                            \
    _Pragma("omp parallel for num_threads(nthreads) schedule(dynamic, 1)")                    \
    for (int64_t item = 0; item < items; item++)                                               \
      linear_item(item, x, m, k, ldx, wp, n, bias, y, wt);                                     \
  }
LINEAR_LOOP(f32, T_F32)
LINEAR_LOOP(f16, T_F16)
LINEAR_LOOP(bf16, T_BF16)
#undef LINEAR_LOOP

/* x [m, k] row-major (row stride ldx), packed w (see top) of element type wt (T_F32, T_F16 or
 * T_BF16), y [m, n] contiguous. */
void winnow_linear(const float *x, int64_t m, int64_t k, int64_t ldx, const void *wp, int64_t n,
                   const float *bias, float *y, int nthreads, int wt) {
  if (wt == T_F16) linear_f16(x, m, k, ldx, wp, n, bias, y, nthreads);
  else if (wt == T_BF16) linear_bf16(x, m, k, ldx, wp, n, bias, y, nthreads);
  else linear_f32(x, m, k, ldx, wp, n, bias, y, nthreads);
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

/* row[0 .. n) = x[0 .. n) in the cache's element type, rounded to nearest even (as torch's
 * conversions round, NaN kept a NaN). */
static void store_kv(char *row, const float *x, int64_t n, const int type) {
  if (type == T_F32) {
    for (int64_t e = 0; e < n; e++) ((float *)row)[e] = x[e];
    return;
  }
  uint16_t *out = (uint16_t *)row;
  int64_t e = 0;
  if (type == T_F16)
    for (; e + 8 <= n; e += 8)
      _mm_storeu_si128((__m128i *)(out + e),
                       _mm256_cvtps_ph(_mm256_loadu_ps(x + e), _MM_FROUND_TO_NEAREST_INT));
  for (; e < n; e++) {
    if (type == T_F16) {
      out[e] = (uint16_t)_mm_extract_epi16(
          _mm_cvtps_ph(_mm_set_ss(x[e]), _MM_FROUND_TO_NEAREST_INT), 0);
      continue;
    }
    uint32_t bits;
    memcpy(&bits, x + e, 4);
    out[e] = isnan(x[e]) ? 0x7FC0 : (uint16_t)((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
  }
}

/* scores[j] = q . key j * scale for j < span, eight keys at a time; key j is the d elements at
 * element `offset` of cache row rows[j]. */
static inline __attribute__((always_inline)) void score_keys(const float *q,
                                                             const char *const *rows,
                                                             int64_t offset, int64_t span,
                                                             int64_t d, float scale, float *scores,
                                                             const int type) {
  int64_t j = 0, at = offset * elem_size(type);
  for (; j + 8 <= span; j += 8) {
    const char *r0 = rows[j] + at, *r1 = rows[j + 1] + at, *r2 = rows[j + 2] + at,
               *r3 = rows[j + 3] + at, *r4 = rows[j + 4] + at, *r5 = rows[j + 5] + at,
               *r6 = rows[j + 6] + at, *r7 = rows[j + 7] + at;
    __m256 c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0;
    for (int64_t e = 0; e < d; e += 8) {
      __m256 qv = _mm256_loadu_ps(q + e);
      c0 = _mm256_fmadd_ps(qv, load8(r0, e, type), c0);
      c1 = _mm256_fmadd_ps(qv, load8(r1, e, type), c1);
      c2 = _mm256_fmadd_ps(qv, load8(r2, e, type), c2);
      c3 = _mm256_fmadd_ps(qv, load8(r3, e, type), c3);
      c4 = _mm256_fmadd_ps(qv, load8(r4, e, type), c4);
      c5 = _mm256_fmadd_ps(qv, load8(r5, e, type), c5);
      c6 = _mm256_fmadd_ps(qv, load8(r6, e, type), c6);
      c7 = _mm256_fmadd_ps(qv, load8(r7, e, type), c7);
    }
    __m256 dots = hsum8(c0, c1, c2, c3, c4, c5, c6, c7);
    _mm256_storeu_ps(scores + j, _mm256_mul_ps(dots, _mm256_set1_ps(scale)));
  }
  for (; j < span; j++) {
    __m256 c = _mm256_setzero_ps();
    for (int64_t e = 0; e < d; e += 8)
      c = _mm256_fmadd_ps(_mm256_loadu_ps(q + e), load8(rows[j] + at, e, type), c);
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

/* o0 += sum_j w0[j] * v_j and, when w1 is not NULL, o1 += sum_j w1[j] * v_j, where v_j is the
 * d elements at element rows[j] of `values`: two query heads of one group share every load of a
 * value row. */
static inline __attribute__((always_inline)) void weighted_values(
    const float *w0, const float *w1, const char *values, const int64_t *rows, int64_t span,
    int64_t d, float *o0, float *o1, const int type) {
  const float *w1s = w1 ? w1 : w0;
  int64_t e = 0;
  for (; e + 32 <= d; e += 32) {
    const float *o1s = w1 ? o1 : o0;
    __m256 a0 = _mm256_loadu_ps(o0 + e), a1 = _mm256_loadu_ps(o0 + e + 8),
           a2 = _mm256_loadu_ps(o0 + e + 16), a3 = _mm256_loadu_ps(o0 + e + 24),
           b0 = _mm256_loadu_ps(o1s + e), b1 = _mm256_loadu_ps(o1s + e + 8),
           b2 = _mm256_loadu_ps(o1s + e + 16), b3 = _mm256_loadu_ps(o1s + e + 24);
    for (int64_t j = 0; j < span; j++) {
      const char *v = values + rows[j] * elem_size(type);
      __m256 v0 = load8(v, e, type), v1 = load8(v, e + 8, type),
             v2 = load8(v, e + 16, type), v3 = load8(v, e + 24, type);
      __m256 x = _mm256_broadcast_ss(w0 + j), y = _mm256_broadcast_ss(w1s + j);
      a0 = _mm256_fmadd_ps(x, v0, a0);
      a1 = _mm256_fmadd_ps(x, v1, a1);
      a2 = _mm256_fmadd_ps(x, v2, a2);
      a3 = _mm256_fmadd_ps(x, v3, a3);
      b0 = _mm256_fmadd_ps(y, v0, b0);
      b1 = _mm256_fmadd_ps(y, v1, b1);
      b2 = _mm256_fmadd_ps(y, v2, b2);
      b3 = _mm256_fmadd_ps(y, v3, b3);
    }
    _mm256_storeu_ps(o0 + e, a0);
    _mm256_storeu_ps(o0 + e + 8, a1);
    _mm256_storeu_ps(o0 + e + 16, a2);
    _mm256_storeu_ps(o0 + e + 24, a3);
    if (w1) {
      _mm256_storeu_ps(o1 + e, b0);
      _mm256_storeu_ps(o1 + e + 8, b1);
      _mm256_storeu_ps(o1 + e + 16, b2);
      _mm256_storeu_ps(o1 + e + 24, b3);
    }
  }
  for (; e < d; e += 8) {
    __m256 a = _mm256_loadu_ps(o0 + e), b = _mm256_loadu_ps((w1 ? o1 : o0) + e);
    for (int64_t j = 0; j < span; j++) {
      __m256 v = load8(values + rows[j] * elem_size(type), e, type);
      a = _mm256_fmadd_ps(_mm256_broadcast_ss(w0 + j), v, a);
      b = _mm256_fmadd_ps(_mm256_broadcast_ss(w1s + j), v, b);
    }
    _mm256_storeu_ps(o0 + e, a);
    if (w1) _mm256_storeu_ps(o1 + e, b);
  }
}

/* Prefetch into L2 part [a, b) of `parts` equal parts of the `bytes` at element offset rows[r]
 * of `cache`, for r < n. The heads of a work item each take a part of the next eight positions'
 * rows while they work on the current ones: the misses then overlap the arithmetic instead of
 * following it (BENCHMARKS.md, "Decode attention"). */
static inline __attribute__((always_inline)) void prefetch_rows(const char *cache,
                                                                const int64_t *rows, int64_t n,
                                                                int64_t elem_bytes, int64_t bytes,
                                                                int64_t a, int64_t b,
                                                                int64_t parts) {
  int64_t lines = (bytes + 63) / 64, l0 = a * lines / parts, l1 = b * lines / parts;
  for (int64_t r = 0; r < n; r++)
    for (int64_t l = l0; l < l1; l++)
      _mm_prefetch(cache + rows[r] * elem_bytes + l * 64, _MM_HINT_T2);
}

/* out[i] [hq, d] = attention of q[tokens[i]] (q [*, hq, d]) over sequence seqs[i]: block table
 * row seqs[i], positions [max(0, len - window), len) (window 0: all). d must be a multiple of 8.
 * A work item is one sequence and a range of its kv heads: all of them when the batch keeps every
 * thread busy, else as many parts as it takes to give each thread two items. */
static inline __attribute__((always_inline)) void paged_decode(
    const float *q, float *out, const int64_t *tokens, const int64_t *seqs, int64_t batch,
    const char *kcache, const char *vcache, const int64_t *block_tables, int64_t table_width,
    const int64_t *seq_lens, int64_t block_size, int64_t hq, int64_t hkv, int64_t d,
    int64_t window, float scale, int nthreads, const int type) {
  int64_t group = hq / hkv, stride = hkv * d; /* floats from one cache position to the next */
  int64_t parts = (2 * nthreads + batch - 1) / batch;
  parts = parts > hkv ? hkv : parts;
  int64_t heads_per_part = (hkv + parts - 1) / parts;
#pragma omp parallel num_threads(nthreads)
  {
    /* per thread, grown on demand: scores [hq][span], cache row of each position [span] */
    float *scores = NULL;
    int64_t *rows = NULL;
    const char **keys = NULL;
    int64_t capacity = 0;
#pragma omp for schedule(dynamic)
    for (int64_t item = 0; item < batch * parts; item++) {
      int64_t i = item / parts, kv0 = item % parts * heads_per_part;
      int64_t kv1 = kv0 + heads_per_part < hkv ? kv0 + heads_per_part : hkv;
      int64_t h0 = kv0 * group, h1 = kv1 * group; /* the query heads this item serves */
      if (h0 >= h1) continue;
      int64_t len = seq_lens[seqs[i]];
      int64_t start = window > 0 && len > window ? len - window : 0, span = len - start;
      if (span > capacity) {
        capacity = span * 2;
        free(scores);
        free(rows);
        free(keys);
        scores = malloc(sizeof(float) * hq * capacity);
        rows = malloc(sizeof(int64_t) * capacity);
        keys = malloc(sizeof(char *) * capacity);
      }
      const int64_t *table = block_tables + seqs[i] * table_width;
      for (int64_t pos = start; pos < len;) {
        int64_t offset = pos % block_size, run = block_size - offset;
        if (run > len - pos) run = len - pos;
        int64_t row = (table[pos / block_size] * block_size + offset) * stride;
        for (int64_t r = 0; r < run; r++, pos++) {
          rows[pos - start] = row + r * stride;
          keys[pos - start] = kcache + (row + r * stride) * elem_size(type);
        }
      }
      const float *qi = q + tokens[i] * hq * d;
      /* the part of each cache row this item reads: its kv heads */
      int64_t elem = elem_size(type), part = kv0 * d * elem, part_bytes = (kv1 - kv0) * d * elem;
      const char *kpart = kcache + part, *vpart = vcache + part;
      int64_t nh = h1 - h0;
      for (int64_t j = 0; j < span; j += 8) /* eight positions stay in L1 for every head */
        for (int64_t h = h0; h < h1; h++) {
          int64_t ahead = span - j - 8; /* after the last keys come the first values */
          if (ahead > 0)
            prefetch_rows(kpart, rows + j + 8, ahead < 8 ? ahead : 8, elem, part_bytes, h - h0,
                          h - h0 + 1, nh);
          else
            prefetch_rows(vpart, rows, span < 8 ? span : 8, elem, part_bytes, h - h0, h - h0 + 1,
                          nh);
          score_keys(qi + h * d, keys + j, h / group * d, span - j < 8 ? span - j : 8, d, scale,
                     scores + h * span + j, type);
        }
      for (int64_t h = h0; h < h1; h++) {
        float *s = scores + h * span, inv = 1.0f / softmax_numerators(s, span);
        for (int64_t j = 0; j < span; j++) s[j] *= inv;
      }
      float *oi = out + i * hq * d;
      for (int64_t e = h0 * d; e < h1 * d; e++) oi[e] = 0.0f;
      for (int64_t j = 0; j < span; j += 8) { /* eight value rows stay in L1 for every head */
        int64_t n = span - j < 8 ? span - j : 8;
        for (int64_t h = h0; h < h1; h++) {
          /* heads h and h + 1 together when they read the same value head */
          int pair = h + 1 < h1 && (h + 1) / group == h / group;
          int64_t ahead = span - j - 8;
          if (ahead > 0)
            prefetch_rows(vpart, rows + j + 8, ahead < 8 ? ahead : 8, elem, part_bytes, h - h0,
                          h - h0 + 1 + pair, nh);
          weighted_values(scores + h * span + j, pair ? scores + (h + 1) * span + j : NULL,
                          vcache + h / group * d * elem_size(type), rows + j, n, d, oi + h * d,
                          pair ? oi + (h + 1) * d : NULL, type);
          h += pair;
        }
      }
    }
    free(scores);
    free(rows);
    free(keys);
  }
}

/* The exported entry: one copy of the kernel per cache element type (`type`: T_F32, T_F16 or
 * T_BF16), so that no element load branches on it. */
void winnow_paged_decode(const float *q, float *out, const int64_t *tokens, const int64_t *seqs,
                         int64_t batch, const void *kcache, const void *vcache,
                         const int64_t *block_tables, int64_t table_width, const int64_t *seq_lens,
                         int64_t block_size, int64_t hq, int64_t hkv, int64_t d, int64_t window,
                         float scale, int type, int nthreads) {
#define PAGED_DECODE(t)                                                                        \
  paged_decode(q, out, tokens, seqs, batch, kcache, vcache, block_tables, table_width, seq_lens, \
               block_size, hq, hkv, d, window, scale, nthreads, t)
  switch (type) {
    case T_F16: PAGED_DECODE(T_F16); break;
    case T_BF16: PAGED_DECODE(T_BF16); break;
    default: PAGED_DECODE(T_F32);
  }
#undef PAGED_DECODE
}

/* Row-wise elementwise kernels. Small inputs run on the calling thread: a parallel region costs
 * more than the work. */
#define PARALLEL_MIN_ELEMENTS (1 << 16)

/* out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w; x rows of d floats, row stride ldx. */
void winnow_rms_norm(const float *x, int64_t rows, int64_t d, int64_t ldx, const float *w,
                     float eps, float *out, int nthreads) {
#pragma omp parallel for num_threads(nthreads) if (rows * d >= PARALLEL_MIN_ELEMENTS)
  for (int64_t r = 0; r < rows; r++) {
    const float *xr = x + r * ldx;
    float *o = out + r * d;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0;
    int64_t e = 0;
    for (; e + 16 <= d; e += 16) {
      __m256 a = _mm256_loadu_ps(xr + e), b = _mm256_loadu_ps(xr + e + 8);
      acc0 = _mm256_fmadd_ps(a, a, acc0);
      acc1 = _mm256_fmadd_ps(b, b, acc1);
    }
    float total = hsum(_mm256_add_ps(acc0, acc1));
    for (; e < d; e++) total += xr[e] * xr[e];
    float inv = 1.0f / sqrtf(total / (float)d + eps);
    __m256 scale = _mm256_set1_ps(inv);
    for (e = 0; e + 8 <= d; e += 8)
      _mm256_storeu_ps(o + e, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + e), scale),
                                            _mm256_loadu_ps(w + e)));
    for (; e < d; e++) o[e] = xr[e] * inv * w[e];
  }
}

/* out[r, j] = silu(x[r, j]) * x[r, d + j] for j < d: the gated MLP activation on a fused
 * gate/up projection (rows of 2d floats, row stride ldx). */
void winnow_silu_mul(const float *x, int64_t rows, int64_t d, int64_t ldx, float *out,
                     int nthreads) {
#pragma omp parallel for num_threads(nthreads) if (rows * d >= PARALLEL_MIN_ELEMENTS)
  for (int64_t r = 0; r < rows; r++) {
    const float *gate = x + r * ldx, *up = gate + d;
    float *o = out + r * d;
    int64_t e = 0;
    for (; e + 8 <= d; e += 8) {
      __m256 g = _mm256_loadu_ps(gate + e);
      __m256 denom =
          _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), g)));
      _mm256_storeu_ps(o + e, _mm256_mul_ps(_mm256_div_ps(g, denom), _mm256_loadu_ps(up + e)));
    }
    for (; e < d; e++) o[e] = gate[e] / (1.0f + expf(-gate[e])) * up[e];
  }
}

/* Rotate-half rotary embedding: x [t, heads, d] (head stride d, token stride ldx) -> out
 * contiguous; cos/sin [t, d / 2]. out1 = x1 cos - x2 sin, out2 = x2 cos + x1 sin. */
void winnow_rope(const float *x, int64_t tokens, int64_t heads, int64_t d, int64_t ldx,
                 const float *cos, const float *sin, float *out, int nthreads) {
  int64_t half = d / 2;
#pragma omp parallel for num_threads(nthreads) if (tokens * heads * d >= PARALLEL_MIN_ELEMENTS)
  for (int64_t t = 0; t < tokens; t++) {
    const float *c = cos + t * half, *s = sin + t * half;
    for (int64_t h = 0; h < heads; h++) {
      const float *x1 = x + t * ldx + h * d, *x2 = x1 + half;
      float *o1 = out + (t * heads + h) * d, *o2 = o1 + half;
      int64_t e = 0;
      for (; e + 8 <= half; e += 8) {
        __m256 a = _mm256_loadu_ps(x1 + e), b = _mm256_loadu_ps(x2 + e);
        __m256 cv = _mm256_loadu_ps(c + e), sv = _mm256_loadu_ps(s + e);
        _mm256_storeu_ps(o1 + e, _mm256_fmsub_ps(a, cv, _mm256_mul_ps(b, sv)));
        _mm256_storeu_ps(o2 + e, _mm256_fmadd_ps(b, cv, _mm256_mul_ps(a, sv)));
      }
      for (; e < half; e++) {
        o1[e] = x1[e] * c[e] - x2[e] * s[e];
        o2[e] = x2[e] * c[e] + x1[e] * s[e];
      }
    }
  }
}

/* ---- The decoder stack of a decode-only step, one call for every layer ----
 * Runs the same kernels the per-op path calls from Python, in the same order and on the same
 * inputs, without a Python round trip between them: the results are bit-identical, except where
 * the per-op path normalises q/k (qk norm) of several tokens with PyTorch. */

/* One decoder layer's weights (packed projections, NULL biases / qk norms where the model has
 * none) and its paged cache (keys and values [num_blocks, block_size, hkv, d] each). */
struct winnow_layer {
  const float *input_norm, *post_norm, *q_norm, *k_norm;
  /* packed projections (element type w_type) and their biases */
  const void *qkv;
  const float *qkv_bias;
  const void *o;
  const float *o_bias;
  const void *gate_up;
  const float *gate_up_bias;
  const void *down;
  const float *down_bias;
  char *kcache, *vcache;
  int64_t window; /* sliding window, 0: none */
};

/* The model's shape and one step's inputs: token i is the one new token of sequence i. */
struct winnow_decode {
  int64_t hidden_size, hq, hkv, d, intermediate, block_size;
  float eps, scale;
  float *hidden; /* [t, hidden_size] residual stream, updated in place */
  int64_t t;
  float *scratch; /* see DecodeStack.run */
  const float *cos, *sin; /* [t, d / 2] */
  const int64_t *slots;   /* [t] cache slot of each token's keys and values */
  const int64_t *rows;    /* [t] 0, 1, ..., t - 1 */
  const int64_t *block_tables, *seq_lens;
  int64_t table_width;
  int kv_type; /* T_F32, T_F16 or T_BF16 */
  int w_type;  /* the packed weights' element type */
  int nthreads;
};

/* hidden += delta, both [n] */
static void add_into(float *hidden, const float *delta, int64_t n) {
  for (int64_t e = 0; e < n; e++) hidden[e] += delta[e];
}

void winnow_decode_layers(const struct winnow_layer *layers, int64_t num_layers,
                          const struct winnow_decode *s) {
  int64_t t = s->t, h = s->hidden_size, d = s->d, half = d / 2, inter = s->intermediate;
  int64_t q_size = s->hq * d, kv_width = s->hkv * d, nqkv = q_size + 2 * kv_width;
  int64_t slot_bytes = kv_width * elem_size(s->kv_type);
  int nthreads = s->nthreads, wt = s->w_type;
  float *normed = s->scratch, *qkv = normed + t * h, *q = qkv + t * nqkv, *attn = q + t * q_size;
  float *gate_up = attn + t * q_size, *act = gate_up + t * 2 * inter, *proj = act + t * inter;
  float *key = proj + t * h; /* [kv_width]: one token's rotated keys before they are stored */
  for (int64_t l = 0; l < num_layers; l++) {
    const struct winnow_layer *layer = layers + l;
    winnow_rms_norm(s->hidden, t, h, h, layer->input_norm, s->eps, normed, nthreads);
    winnow_linear(normed, t, h, h, layer->qkv, nqkv, layer->qkv_bias, qkv, nthreads, wt);
    for (int64_t i = 0; i < t; i++) {
      float *qi = qkv + i * nqkv, *ki = qi + q_size, *vi = ki + kv_width;
      const float *cos = s->cos + i * half, *sin = s->sin + i * half;
      if (layer->q_norm) {
        winnow_rms_norm(qi, s->hq, d, d, layer->q_norm, s->eps, qi, 1);
        winnow_rms_norm(ki, s->hkv, d, d, layer->k_norm, s->eps, ki, 1);
      }
      winnow_rope(qi, 1, s->hq, d, nqkv, cos, sin, q + i * q_size, 1);
      winnow_rope(ki, 1, s->hkv, d, nqkv, cos, sin, key, 1);
      store_kv(layer->kcache + s->slots[i] * slot_bytes, key, kv_width, s->kv_type);
      store_kv(layer->vcache + s->slots[i] * slot_bytes, vi, kv_width, s->kv_type);
    }
    winnow_paged_decode(q, attn, s->rows, s->rows, t, layer->kcache, layer->vcache,
                        s->block_tables, s->table_width, s->seq_lens, s->block_size, s->hq,
                        s->hkv, d, layer->window, s->scale, s->kv_type, nthreads);
    winnow_linear(attn, t, q_size, q_size, layer->o, h, layer->o_bias, proj, nthreads, wt);
    add_into(s->hidden, proj, t * h);
    winnow_rms_norm(s->hidden, t, h, h, layer->post_norm, s->eps, normed, nthreads);
    winnow_linear(normed, t, h, h, layer->gate_up, 2 * inter, layer->gate_up_bias, gate_up,
                  nthreads, wt);
    winnow_silu_mul(gate_up, t, inter, 2 * inter, act, nthreads);
    winnow_linear(act, t, inter, inter, layer->down, h, layer->down_bias, proj, nthreads, wt);
    add_into(s->hidden, proj, t * h);
  }
}
