/* Decode steps' matrix products: a few rows against oneDNN's packed bfloat16 weights.
 *
 * oneDNN packs a bfloat16 linear weight [out, in] as blocks of 64 outputs, each block
 * `in / 2` lines of 64 outputs x 2 inputs (the pairs `vdpbf16ps` multiplies):
 * element (o, i) at ((o / 64) * (in / 2) + i / 2) * 128 + (o % 64) * 2 + i % 2.
 * So a block is one stretch of memory, and each line of it times one pair of an input
 * row's values adds to the block's 64 sums: the weights stream in order, once for up to
 * 8 rows, and from the cache for the next 8. `bot/decode_kernel.py` checks the layout
 * against oneDNN's own product before any layer uses this.
 */
#include <immintrin.h>
#include <stdint.h>

#define BLOCK 64     /* outputs per block */
#define MOST_HELD 8  /* rows whose 64 sums each stay in registers (4 of 16 floats) */

static inline void block_rows(const uint16_t *w, const uint32_t *x, int64_t pairs,
                              const uint16_t *bias, uint16_t *y, int64_t out, int rows) {
    __m512 sums[MOST_HELD][4];
    for (int r = 0; r < rows; ++r)
        for (int j = 0; j < 4; ++j) sums[r][j] = _mm512_setzero_ps();
    for (int64_t p = 0; p < pairs; ++p, w += 2 * BLOCK) {
        const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w);
        const __m512bh w1 = (__m512bh)_mm512_loadu_si512(w + 32);
        const __m512bh w2 = (__m512bh)_mm512_loadu_si512(w + 64);
        const __m512bh w3 = (__m512bh)_mm512_loadu_si512(w + 96);
        for (int r = 0; r < rows; ++r) {
            const __m512bh pair = (__m512bh)_mm512_set1_epi32((int)x[r * pairs + p]);
            sums[r][0] = _mm512_dpbf16_ps(sums[r][0], w0, pair);
            sums[r][1] = _mm512_dpbf16_ps(sums[r][1], w1, pair);
            sums[r][2] = _mm512_dpbf16_ps(sums[r][2], w2, pair);
            sums[r][3] = _mm512_dpbf16_ps(sums[r][3], w3, pair);
        }
    }
    for (int j = 0; j < 4; ++j) {
        __m512 add = _mm512_setzero_ps();
        if (bias) /* bfloat16 to float: its 16 bits on top */
            add = _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(bias + 16 * j))), 16));
        for (int r = 0; r < rows; ++r)
            _mm256_storeu_si256((__m256i *)(y + r * out + 16 * j),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(sums[r][j], add)));
    }
}

/* y [rows, out] = x [rows, in] times the packed weight w, plus bias (or none), all
 * bfloat16; out a multiple of 64, in of 2. */
void decode_product(const uint16_t *w, const uint16_t *x, const uint16_t *bias, uint16_t *y,
                    int64_t rows, int64_t out, int64_t in, int threads) {
    const int64_t pairs = in / 2;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < out / BLOCK; ++b) {
        const uint16_t *wb = w + b * BLOCK * in, *bb = bias ? bias + b * BLOCK : 0;
        for (int64_t r = 0; r < rows; r += MOST_HELD) {
            const uint32_t *xr = (const uint32_t *)x + r * pairs;
            uint16_t *yr = y + r * out + b * BLOCK;
            switch (rows - r < MOST_HELD ? rows - r : MOST_HELD) {
            /* each a constant, so that the sums are registers */
            case 1: block_rows(wb, xr, pairs, bb, yr, out, 1); break;
            case 2: block_rows(wb, xr, pairs, bb, yr, out, 2); break;
            case 3: block_rows(wb, xr, pairs, bb, yr, out, 3); break;
            case 4: block_rows(wb, xr, pairs, bb, yr, out, 4); break;
            case 5: block_rows(wb, xr, pairs, bb, yr, out, 5); break;
            case 6: block_rows(wb, xr, pairs, bb, yr, out, 6); break;
            case 7: block_rows(wb, xr, pairs, bb, yr, out, 7); break;
            default: block_rows(wb, xr, pairs, bb, yr, out, MOST_HELD); break;
            }
        }
    }
}
