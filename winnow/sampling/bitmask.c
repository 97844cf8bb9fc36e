/* Token bitmask application for the sampler (constrained decoding).
 *
 * Row r of `masks` says which tokens row rows[r] of `logits` may take: bit j of 32-bit word w
 * stands for token 32 * w + j. Every token whose bit is clear is set to -inf. The work is one
 * branch-free select per token of each word that bans something, and nothing for a word that
 * allows all 32, so the cost grows with rows x V/32 whatever the number of banned tokens.
 */
#include <math.h>
#include <stdint.h>

static inline void mask_span(float *z, uint32_t bits, int64_t count) {
    for (int64_t j = 0; j < count; j++) {
        z[j] = ((bits >> j) & 1u) ? z[j] : -INFINITY;
    }
}

void winnow_apply_bitmask(float *logits, int64_t logits_stride, const int32_t *masks,
                          int64_t mask_stride, const int64_t *rows, int64_t nrows, int64_t vocab) {
    int64_t full_words = vocab / 32, tail = vocab % 32;
    for (int64_t r = 0; r < nrows; r++) {
        float *z = logits + rows[r] * logits_stride;
        const uint32_t *m = (const uint32_t *)(masks + r * mask_stride);
        for (int64_t w = 0; w < full_words; w++) {
            uint32_t bits = m[w];
            if (bits != UINT32_MAX) mask_span(z + 32 * w, bits, 32);
        }
        if (tail) mask_span(z + 32 * full_words, m[full_words], tail);
    }
}
