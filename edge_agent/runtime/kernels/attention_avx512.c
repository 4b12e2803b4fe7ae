// GroupQueryAttention's vector routines for CPUs with AVX-512 (group_query_attention.h says what
// each computes): 16 floats per vector, masked tails; each routine that reads the KV cache comes
// for a float cache and for a half-precision one.
#include "kernels.h"

#if defined(__x86_64__)
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "group_query_attention.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,fma")

// exp(x) for x <= 0 (softmax after subtracting the maximum): 2^n x a degree-6 polynomial on
// |r| <= ln 2 / 2, relative error ~2e-7; below -88 it returns e^-88 (~6e-39), nothing beside the
// maximum's 1.
static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-88.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

static inline __mmask16 head_mask(int64_t left) { return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1); }

// Softmax of scores[lo, hi] in place; every other score of [0, end) set to 0 (end: the keys the
// tile's value loop reads).
static void softmax512(float *scores, int64_t lo, int64_t hi, int64_t end) {
    __m512 vmax = _mm512_set1_ps(-INFINITY);
    for (int64_t j = lo; j <= hi; j += 16)
        vmax = _mm512_max_ps(vmax, _mm512_mask_loadu_ps(vmax, head_mask(hi + 1 - j), scores + j));
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
    __m512 vsum = _mm512_setzero_ps();
    for (int64_t j = lo; j <= hi; j += 16) {
        const __mmask16 mask = head_mask(hi + 1 - j);
        const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, scores + j), m));
        vsum = _mm512_add_ps(vsum, _mm512_maskz_mov_ps(mask, e));
        _mm512_mask_storeu_ps(scores + j, mask, e);
    }
    const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(vsum));
    for (int64_t j = lo; j <= hi; j += 16) {
        const __mmask16 mask = head_mask(hi + 1 - j);
        _mm512_mask_storeu_ps(scores + j, mask, _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, scores + j), inv));
    }
    if (lo > 0) memset(scores, 0, sizeof(float) * (size_t)lo);
    if (end > hi + 1) memset(scores + hi + 1, 0, sizeof(float) * (size_t)(end - hi - 1));
}

// Lane k of the result: the sum of v[k]'s lanes (a transposing tree of 31 shuffles and adds, not
// 16 reductions of 8 instructions each).
static inline __m512 sums16(const __m512 v[16]) {
    __m512 t[8], w[4];
    for (int i = 0; i < 8; i++) t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) {  // 128-bit lane L of w[i]: v[4i..4i+3]'s sums over their lane L
        const __m512d a = _mm512_castps_pd(t[2 * i]), b = _mm512_castps_pd(t[2 * i + 1]);
        w[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    const __m512 y0 = _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(1, 0, 1, 0)), _mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512 y1 = _mm512_add_ps(_mm512_shuffle_f32x4(w[2], w[3], _MM_SHUFFLE(1, 0, 1, 0)), _mm512_shuffle_f32x4(w[2], w[3], _MM_SHUFFLE(3, 2, 3, 2)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(y0, y1, _MM_SHUFFLE(2, 0, 2, 0)), _mm512_shuffle_f32x4(y0, y1, _MM_SHUFFLE(3, 1, 3, 1)));
}

// 16 floats of a KV buffer from element i: float, or IEEE half widened (a half-precision cache).
static inline __attribute__((always_inline)) __m512 load_kv(const void *kv, int64_t i, const int half) {
    return half ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)kv + i))) : _mm512_loadu_ps((const float *)kv + i);
}

// Scores of `rows` query rows against the 16 keys at element offsets k (the first n of them
// real): each row's 16 dot products are 16 sums in flight, reduced together (sums16).
static inline __attribute__((always_inline)) void scores_block(const float *q, int rows, const void *keys, const int64_t k[16],
                                                               int64_t h, int64_t n, float *scores, int64_t sstride,
                                                               const int half) {
    for (int r = 0; r < rows; r++) {
        const float *x = q + r * h;
        __m512 a[16];
        const __m512 x0 = _mm512_loadu_ps(x);
        for (int i = 0; i < 16; i++) a[i] = _mm512_mul_ps(x0, load_kv(keys, k[i], half));
        for (int64_t d = 16; d < h; d += 16) {
            const __m512 xd = _mm512_loadu_ps(x + d);
            for (int i = 0; i < 16; i++) a[i] = _mm512_fmadd_ps(xd, load_kv(keys, k[i] + d, half), a[i]);
        }
        _mm512_mask_storeu_ps(scores + r * sstride, head_mask(n), sums16(a));
    }
}

// Widened once per block, not once per row: several rows of a half cache read floats.
#define WIDE_HEAD 256
// A float cache's block is copied the same way for more rows than this (a prompt's, up to 32):
// a 512-row SmolLM2 prompt's attention ran 1.35x slower reading the cache in place, as a decode
// step's heads (at most a KV head's group) still do (the copy cost those 3-11 %).
#define COPY_ROWS 8

// Scores of `rows` query rows against keys [lo, hi], 16 keys at a time: the block's keys stay in
// L1 for every row. A block of a half cache read by several rows is widened to floats first, a
// float cache's copied for a prompt's rows (heads of up to WIDE_HEAD columns); either way each
// score is the same sum of the same floats.
static inline __attribute__((always_inline)) void scores_group(const float *q, int rows, const void *keys, int64_t h, int64_t lo,
                                                               int64_t hi, float *scores, int64_t sstride, const int half,
                                                               const int pf) {
    _Alignas(64) float wide[16 * WIDE_HEAD];
    int64_t at[16];
    for (int i = 0; i < 16; i++) at[i] = i * h;
    for (int64_t j0 = lo; j0 <= hi; j0 += 16) {
        const int64_t n = hi + 1 - j0 < 16 ? hi + 1 - j0 : 16;
        int64_t k[16];
        for (int i = 0; i < 16; i++) k[i] = (j0 + (i < n ? i : n - 1)) * h;  // past the last: read it again
        if (pf) prefetch_l2((const char *)keys + j0 * h * (half ? 2 : 4), 16 * h * (half ? 2 : 4));
        if (h <= WIDE_HEAD && rows > (half ? 1 : COPY_ROWS)) {
            for (int i = 0; i < 16; i++)
                for (int64_t d = 0; d < h; d += 16) _mm512_storeu_ps(wide + i * h + d, load_kv(keys, k[i] + d, half));
            scores_block(q, rows, wide, at, h, n, scores + j0, sstride, 0);
        } else {
            scores_block(q, rows, keys, k, h, n, scores + j0, sstride, half);
        }
    }
}

// Columns [d0, d0 + 16W) for R rows: R x W <= 16 sums in flight. Only compile-time bounds index
// the sums, so they stay in registers (a runtime-width branch beside them put them on the stack).
static inline __attribute__((always_inline)) void values_cols(const float *p, int64_t pstride, const void *values,
                                                              int64_t h, int64_t lo, int64_t hi, float *out,
                                                              int64_t ostride, int64_t d0, const int R, const int W,
                                                              const int half, const int pf) {
    __m512 a[TILE][4];
    _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) _Pragma("GCC unroll 4") for (int v = 0; v < W; v++) a[r][v] = _mm512_setzero_ps();
    for (int64_t j = lo; j <= hi; j++) {
        __m512 x[4];
        if (pf) prefetch_l2((const char *)values + (j * h + d0) * (half ? 2 : 4), W * 16 * (half ? 2 : 4));
        _Pragma("GCC unroll 4") for (int v = 0; v < W; v++) x[v] = load_kv(values, j * h + d0 + 16 * v, half);
        _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) {
            const __m512 s = _mm512_set1_ps(p[r * pstride + j]);
            _Pragma("GCC unroll 4") for (int v = 0; v < W; v++) a[r][v] = _mm512_fmadd_ps(s, x[v], a[r][v]);
        }
    }
    _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) _Pragma("GCC unroll 4") for (int v = 0; v < W; v++)
        _mm512_storeu_ps(out + r * ostride + d0 + 16 * v, a[r][v]);
}

// out[r] = sum over keys [lo, hi] of p[r][j] x values[j], for up to TILE rows (h a multiple of
// 16): passes of 64 columns, then of 16.
static inline __attribute__((always_inline)) void values_tile(const float *p, int64_t pstride, const void *values,
                                                              int64_t h, int64_t lo, int64_t hi, float *out,
                                                              int64_t ostride, const int R, const int half, const int pf) {
    int64_t d0 = 0;
    for (; d0 + 64 <= h; d0 += 64) values_cols(p, pstride, values, h, lo, hi, out, ostride, d0, R, 4, half, pf);
    for (; d0 < h; d0 += 16) values_cols(p, pstride, values, h, lo, hi, out, ostride, d0, R, 1, half, pf);
}

static inline __attribute__((always_inline)) void values_rows(const float *p, int64_t pstride, const void *values, int64_t h,
                                                              int64_t lo, int64_t hi, float *out, int64_t ostride, int rows,
                                                              const int half, const int pf) {
    switch (rows) {
        case 1: values_tile(p, pstride, values, h, lo, hi, out, ostride, 1, half, pf); break;
        case 2: values_tile(p, pstride, values, h, lo, hi, out, ostride, 2, half, pf); break;
        case 3: values_tile(p, pstride, values, h, lo, hi, out, ostride, 3, half, pf); break;
        default: values_tile(p, pstride, values, h, lo, hi, out, ostride, 4, half, pf); break;
    }
}

ATTENTION_TABLES(avx512, 512)

#pragma GCC pop_options

#endif
