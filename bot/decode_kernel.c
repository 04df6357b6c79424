/* Decode steps' matrix products, a few rows against oneDNN's packed weights, the decoding
 * rows' attention, and every step's small ops of a layer (norms, rotary, the MLP's gate).
 * Built twice (`bot/decode_kernel.py`): for AVX512-BF16, every function; for AVX2, the
 * float32 product alone (the rest needs AVX512-BF16).
 * `bot/decode_kernel.py` checks a packed weight's layout against oneDNN's own product
 * before any layer uses these.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 64     /* outputs per block */

/* float32: oneDNN packs [out, in] as blocks of 64 outputs, each `in` lines of 64 outputs,
 * element (o, i) at ((o / 64) * in + i) * 64 + o % 64. A weight whose every value is a
 * bfloat16 value (as a bfloat16 checkpoint's are, loaded in float32) can be read from a
 * copy in the same layout in bfloat16 ("halved"): each line widened exactly, once, then
 * multiplied into every row, so the same products come from half the bytes. Plain C, which
 * the compiler turns into the vector instructions of the build (AVX2's 8 floats at a
 * time); a line is read once for up to 4 rows. */
#define PASS_ROWS 4

static inline __attribute__((always_inline)) void block_rows_f32(
    const void *w, const float *x, int64_t in, const float *bias, float *y, int64_t out,
    int rows, int halved) {
    float sums[PASS_ROWS][BLOCK] __attribute__((aligned(64)));
    float widened[BLOCK] __attribute__((aligned(64)));
    for (int r = 0; r < rows; ++r)
        for (int o = 0; o < BLOCK; ++o) sums[r][o] = bias ? bias[o] : 0.0f;
    for (int64_t i = 0; i < in; ++i) {
        const float *line = (const float *)w + i * BLOCK;
        if (halved) { /* bfloat16 is float32's top 16 bits */
            const uint16_t *narrow = (const uint16_t *)w + i * BLOCK;
            for (int o = 0; o < BLOCK; ++o) {
                const uint32_t bits = (uint32_t)narrow[o] << 16;
                memcpy(&widened[o], &bits, sizeof bits);
            }
            line = widened;
        }
        for (int r = 0; r < rows; ++r) {
            const float value = x[r * in + i];
            for (int o = 0; o < BLOCK; ++o) sums[r][o] += value * line[o];
        }
    }
    for (int r = 0; r < rows; ++r)
        for (int o = 0; o < BLOCK; ++o) y[r * out + o] = sums[r][o];
}

/* One block of 64 outputs for every row; `halved` a constant where it is called, as each
 * row count is, so that each is compiled on its own. */
static inline __attribute__((always_inline)) void block_f32(
    const void *w, const float *x, const float *bias, float *y, int64_t rows, int64_t out,
    int64_t in, int64_t b, int halved) {
    const void *wb = (const char *)w + b * BLOCK * in * (halved ? 2 : 4);
    const float *bb = bias ? bias + b * BLOCK : 0;
    for (int64_t r = 0; r < rows; r += PASS_ROWS) {
        const float *xr = x + r * in;
        float *yr = y + r * out + b * BLOCK;
        switch (rows - r < PASS_ROWS ? rows - r : PASS_ROWS) {
        case 1: block_rows_f32(wb, xr, in, bb, yr, out, 1, halved); break;
        case 2: block_rows_f32(wb, xr, in, bb, yr, out, 2, halved); break;
        case 3: block_rows_f32(wb, xr, in, bb, yr, out, 3, halved); break;
        default: block_rows_f32(wb, xr, in, bb, yr, out, PASS_ROWS, halved); break;
        }
    }
}

/* y [rows, out] = x [rows, in] times the packed weight w, plus bias (or none), all float32
 * but w, which is bfloat16 where `halved`; out a multiple of 64. */
void decode_product_f32(const void *w, const float *x, const float *bias, float *y,
                        int64_t rows, int64_t out, int64_t in, int halved, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < out / BLOCK; ++b) {
        if (halved) block_f32(w, x, bias, y, rows, out, in, b, 1);
        else block_f32(w, x, bias, y, rows, out, in, b, 0);
    }
}

#ifdef __AVX512BF16__
/* bfloat16: oneDNN packs [out, in] as blocks of 64 outputs, each block `in / 2` lines of
 * 64 outputs x 2 inputs (the pairs `vdpbf16ps` multiplies): element (o, i) at
 * ((o / 64) * (in / 2) + i / 2) * 128 + (o % 64) * 2 + i % 2. So a block is one stretch of
 * memory, and each line of it times one pair of an input row's values adds to the block's
 * 64 sums: the weights stream in order, once for up to 8 rows, and from the cache for the
 * next 8. */
#define MOST_HELD 8  /* rows whose 64 sums each stay in registers (4 of 16 floats) */

static inline __m512 widened(const uint16_t *bf16) { /* 16 bfloat16 to float: the top bits */
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)bf16)), 16));
}

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
        const __m512 add = bias ? widened(bias + 16 * j) : _mm512_setzero_ps();
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

static inline __m512 pairs_added(__m512 a, __m512 b) { /* 64-bit halves of 128-bit lanes */
    return _mm512_add_ps(
        _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b))),
        _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b))));
}

static inline __m512 lanes_added(__m512 a, __m512 b) { /* even and odd 128-bit lanes */
    return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xDD));
}

/* The sum of each of 16 vectors, as lane i of one: a tree of shuffles and adds, where 16
 * reductions one by one take three times the instructions. */
static inline __m512 sums16(const __m512 v[16]) {
    __m512 s[8], t[4];
    for (int i = 0; i < 8; ++i)
        s[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                             _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; ++i) t[i] = pairs_added(s[2 * i], s[2 * i + 1]);
    return lanes_added(lanes_added(t[0], t[1]), lanes_added(t[2], t[3]));
}

/* e^x: 2^(x log2 e) as 2^n 2^f, |f| <= 1/2, 2^f by its Taylor series to f^6 (relative
 * error under 2e-7, far below bfloat16's 4e-3); past float32's range, infinity or 0 (as
 * `layer_silu_mul`'s test holds it to, at every bfloat16 value). */
static inline __m512 exp_ps(__m512 x) {
    const __m512 y = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504f));
    const __m512 n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(y, n);
    static const float c[] = {1.5403530e-4f, 1.3333558e-3f, 9.6181291e-3f,
                              5.5504109e-2f, 2.4022651e-1f, 6.9314718e-1f, 1.0f};
    __m512 p = _mm512_set1_ps(c[0]);
    for (int i = 1; i < 7; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c[i]));
    return _mm512_scalef_ps(p, n);
}

/* Decoding rows' attention: each row's query [heads, dim] against the first `lengths[r]`
 * keys and values of its slot in the cache [slots, kv_heads, width, dim], the query heads
 * of each key head together; out [rows, heads, dim]. All bfloat16; the scores (exact
 * products of bfloat16, `vdpbf16ps`), softmax and sums in float32, as SDPA's. dim a
 * multiple of 32, at most MOST_DIM. A row and key head per task, 16 keys at a time. */
#define MOST_DIM 256
int decode_attention(const uint16_t *q, const uint16_t *keys, const uint16_t *values,
                     const int64_t *slots, const int64_t *lengths, uint16_t *out,
                     int64_t rows, int64_t heads, int64_t kv_heads, int64_t width, int64_t dim,
                     float scale, int threads) {
    const int64_t group = heads / kv_heads, pairs = dim / 32, vectors = dim / 16;
    int failed = 0;
#pragma omp parallel for schedule(dynamic) num_threads(threads) reduction(| : failed)
    for (int64_t task = 0; task < rows * kv_heads; ++task) {
        const int64_t r = task / kv_heads, g = task % kv_heads, n = lengths[r];
        const uint16_t *k = keys + (slots[r] * kv_heads + g) * width * dim;
        const uint16_t *v = values + (slots[r] * kv_heads + g) * width * dim;
        const uint16_t *query = q + (r * heads + g * group) * dim;
        float *scores = malloc(sizeof(float) * group * (n + 16));
        __m512 *sums = aligned_alloc(64, sizeof(__m512) * group * vectors);
        if (!scores || !sums) {
            failed = 1;
            free(scores);
            free(sums);
            continue;
        }
        for (int64_t t0 = 0; t0 < n; t0 += 16) {
            const int64_t tile = n - t0 < 16 ? n - t0 : 16;
            for (int64_t h = 0; h < group; ++h) {
                __m512 dots[16];
                for (int64_t j = 0; j < 16; ++j) {
                    dots[j] = _mm512_setzero_ps();
                    for (int64_t p = 0; j < tile && p < pairs; ++p)
                        dots[j] = _mm512_dpbf16_ps(
                            dots[j], (__m512bh)_mm512_loadu_si512(k + (t0 + j) * dim + 32 * p),
                            (__m512bh)_mm512_loadu_si512(query + h * dim + 32 * p));
                }
                _mm512_storeu_ps(scores + h * (n + 16) + t0,
                                 _mm512_mul_ps(sums16(dots), _mm512_set1_ps(scale)));
            }
        }
        for (int64_t h = 0; h < group; ++h) { /* softmax, less its largest score */
            float *s = scores + h * (n + 16);
            __m512 most = _mm512_set1_ps(s[0]), total = _mm512_setzero_ps();
            const __mmask16 tail = (__mmask16)((1u << (n % 16)) - 1);
            for (int64_t t = 0; t < n; t += 16)
                most = _mm512_mask_max_ps(most, n - t < 16 ? tail : 0xFFFF, most,
                                          _mm512_loadu_ps(s + t));
            const __m512 largest = _mm512_set1_ps(_mm512_reduce_max_ps(most));
            for (int64_t t = 0; t < n; t += 16) {
                const __m512 e = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(s + t), largest));
                _mm512_storeu_ps(s + t, e);
                total = _mm512_mask_add_ps(total, n - t < 16 ? tail : 0xFFFF, total, e);
            }
            const __m512 share = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total));
            for (int64_t t = 0; t < n; t += 16)
                _mm512_storeu_ps(s + t, _mm512_mul_ps(_mm512_loadu_ps(s + t), share));
            for (int64_t d = 0; d < vectors; ++d) sums[h * vectors + d] = _mm512_setzero_ps();
        }
        for (int64_t t = 0; t < n; ++t) {
            __m512 value[MOST_DIM / 16];
            for (int64_t d = 0; d < vectors; ++d) value[d] = widened(v + t * dim + 16 * d);
            for (int64_t h = 0; h < group; ++h) {
                const __m512 weight = _mm512_set1_ps(scores[h * (n + 16) + t]);
                for (int64_t d = 0; d < vectors; ++d)
                    sums[h * vectors + d] = _mm512_fmadd_ps(weight, value[d], sums[h * vectors + d]);
            }
        }
        for (int64_t h = 0; h < group; ++h)
            for (int64_t d = 0; d < vectors; ++d)
                _mm256_storeu_si256((__m256i *)(out + (r * heads + g * group + h) * dim + 16 * d),
                                    (__m256i)_mm512_cvtneps_pbh(sums[h * vectors + d]));
        free(scores);
        free(sums);
    }
    return failed ? -1 : 0;
}

/* The layers' small ops, as one call each where the model's own forward runs 8 to 16 torch
 * ops (each a dispatch, a few microseconds on 2 cores, against well under one for the
 * arithmetic of a few rows). All bfloat16 in and out, computed in float32 and rounded to
 * bfloat16 (`rounded`, to nearest even, as torch rounds) wherever the model's ops round:
 * the same values as theirs, but for the order of a norm's sum and e^x's last bits. Rows
 * go to the threads only where there are enough of them to pay for waking the threads. */
#define THREADED_FROM_ELEMENTS 16384 /* a call with fewer elements runs on one thread */

static inline __m512 widened_masked(const uint16_t *bf16, __mmask16 mask) {
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, bf16)), 16));
}

static inline __m512 rounded(__m512 x) { /* to bfloat16 and back */
    return _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(x)), 16));
}

static inline void store_masked(uint16_t *bf16, __m512 x, __mmask16 mask) {
    _mm256_mask_storeu_epi16(bf16, mask, (__m256i)_mm512_cvtneps_pbh(x));
}

static inline __mmask16 lanes_left(int64_t left) {
    return left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1);
}

/* hidden += delta (unless delta is null), in place; out = the RMS norm of hidden times
 * weight, as Qwen2's and Llama's RMSNorm: the sum of squares in float32, the normalized
 * value rounded, then times the weight and rounded. [rows, dim] each, weight [dim]. */
void layer_add_norm(uint16_t *hidden, const uint16_t *delta, const uint16_t *weight,
                    uint16_t *out, int64_t rows, int64_t dim, float eps, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) \
    if (rows * dim >= THREADED_FROM_ELEMENTS)
    for (int64_t r = 0; r < rows; ++r) {
        uint16_t *h = hidden + r * dim;
        __m512 squares = _mm512_setzero_ps();
        for (int64_t i = 0; i < dim; i += 16) {
            const __mmask16 m = lanes_left(dim - i);
            __m512 x = widened_masked(h + i, m);
            if (delta) {
                x = rounded(_mm512_add_ps(x, widened_masked(delta + r * dim + i, m)));
                store_masked(h + i, x, m);
            }
            squares = _mm512_fmadd_ps(x, x, squares);
        }
        const float mean = _mm512_reduce_add_ps(squares) / (float)dim;
        const float root = _mm_cvtss_f32(_mm_sqrt_ss(_mm_set_ss(mean + eps))); /* no libm */
        const __m512 scale = _mm512_set1_ps(1.0f / root);
        for (int64_t i = 0; i < dim; i += 16) {
            const __mmask16 m = lanes_left(dim - i);
            const __m512 normed = rounded(_mm512_mul_ps(widened_masked(h + i, m), scale));
            const __m512 scaled = _mm512_mul_ps(widened_masked(weight + i, m), normed);
            store_masked(out + r * dim + i, scaled, m);
        }
    }
}

/* Rotary position embedding, in place, of the first `heads` heads of each token's row
 * (`stride` apart): as Qwen2's and Llama's `apply_rotary_pos_emb`, x * cos +
 * rotate_half(x) * sin, each product rounded and then their sum. cos and sin [tokens,
 * dim]; dim even. */
void layer_rotary(uint16_t *x, const uint16_t *cos, const uint16_t *sin, int64_t tokens,
                  int64_t heads, int64_t stride, int64_t dim, int threads) {
    const int64_t half = dim / 2;
#pragma omp parallel for schedule(static) num_threads(threads) \
    if (tokens * heads * dim >= THREADED_FROM_ELEMENTS)
    for (int64_t t = 0; t < tokens; ++t)
        for (int64_t h = 0; h < heads; ++h) {
            uint16_t *v = x + t * stride + h * dim;
            const uint16_t *c = cos + t * dim, *s = sin + t * dim;
            for (int64_t i = 0; i < half; i += 16) {
                const __mmask16 m = lanes_left(half - i);
                const __m512 a = widened_masked(v + i, m), b = widened_masked(v + half + i, m);
                const __m512 first = _mm512_sub_ps(
                    rounded(_mm512_mul_ps(a, widened_masked(c + i, m))),
                    rounded(_mm512_mul_ps(b, widened_masked(s + i, m))));
                const __m512 second = _mm512_add_ps(
                    rounded(_mm512_mul_ps(b, widened_masked(c + half + i, m))),
                    rounded(_mm512_mul_ps(a, widened_masked(s + half + i, m))));
                store_masked(v + i, first, m);
                store_masked(v + half + i, second, m);
            }
        }
}

/* out [rows, inner] = silu(gate) * up, each rounded, from gate_up [rows, 2 * inner] (the
 * gate's columns, then up's): as Qwen2's and Llama's MLP. Results below float32's smallest
 * normal number come out 0 (the conversion to bfloat16 flushes them). */
void layer_silu_mul(const uint16_t *gate_up, uint16_t *out, int64_t rows, int64_t inner,
                    int threads) {
    const __m512 one = _mm512_set1_ps(1.0f);
#pragma omp parallel for schedule(static) num_threads(threads) \
    if (rows * inner >= THREADED_FROM_ELEMENTS)
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t i = 0; i < inner; i += 16) {
            const __mmask16 m = lanes_left(inner - i);
            const __m512 g = widened_masked(gate_up + r * 2 * inner + i, m);
            const __m512 u = widened_masked(gate_up + r * 2 * inner + inner + i, m);
            const __m512 e = exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g)); /* e^-g */
            const __m512 silu = rounded(_mm512_div_ps(g, _mm512_add_ps(one, e)));
            store_masked(out + r * inner + i, _mm512_mul_ps(silu, u), m);
        }
}
#endif
