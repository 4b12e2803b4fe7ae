// GroupQueryAttention's vector routines for CPUs with AVX2 but no AVX-512 (group_query_attention.h
// says what each computes): the AVX-512 routines' steps 8 floats per vector, with register tiles
// sized for AVX2's 16 registers (the value sums 64, 32, 32 or 16 columns per pass for 1, 2, 3 or
// 4 rows: SmolLM2's 3 query heads per KV head read a head's values in two passes, not four — Zen
// 3 VM, position 1000, 4-row steps mean 1.04x faster, bench/RESULTS.md); each routine that reads
// the KV cache comes for a float cache and for a half-precision one (F16C's conversions).
#include "kernels.h"

#if defined(__x86_64__)
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "avx2.h"
#include "group_query_attention.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

// exp(x) for x <= 0: exp512's polynomial; 2^n built in the exponent field (n >= -126 here: below
// -87.3 the result is 0, as expf's would be to within a denormal).
static inline __m256 exp256(__m256 x) {
    const __m256 small = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_LT_OQ);
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(small, _mm256_mul_ps(p, _mm256_castsi256_ps(bits)));
}

// Whole vectors over scores[lo, hi], the last few through a padded copy (vmaskmov stores are slow
// on AMD's cores: masked tails only).
static void softmax256(float *scores, int64_t lo, int64_t hi, int64_t end) {
    const int64_t whole = lo + (hi + 1 - lo) / 8 * 8, tail = hi + 1 - whole;
    float last[8];
    for (int i = 0; i < 8; i++) last[i] = i < tail ? scores[whole + i] : -INFINITY;
    __m256 vmax = _mm256_loadu_ps(last);
    for (int64_t j = lo; j < whole; j += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(scores + j));
    const __m256 m = _mm256_set1_ps(hmax256(vmax));
    const __m256 e_last = exp256(_mm256_sub_ps(_mm256_loadu_ps(last), m));  // exp(-inf) = 0
    __m256 vsum = e_last;
    for (int64_t j = lo; j < whole; j += 8) {
        const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(scores + j), m));
        vsum = _mm256_add_ps(vsum, e);
        _mm256_storeu_ps(scores + j, e);
    }
    const __m256 inv = _mm256_set1_ps(1.0f / hsum256(vsum));
    for (int64_t j = lo; j < whole; j += 8) _mm256_storeu_ps(scores + j, _mm256_mul_ps(_mm256_loadu_ps(scores + j), inv));
    _mm256_storeu_ps(last, _mm256_mul_ps(e_last, inv));
    for (int64_t i = 0; i < tail; i++) scores[whole + i] = last[i];
    if (lo > 0) memset(scores, 0, sizeof(float) * (size_t)lo);
    if (end > hi + 1) memset(scores + hi + 1, 0, sizeof(float) * (size_t)(end - hi - 1));
}

// Lane k of the result: the sum of v[k]'s lanes (a transposing tree, not 8 reductions).
static inline __m256 sums8(const __m256 v[8]) {
    __m256 t[4], w[2];
    for (int i = 0; i < 4; i++) t[i] = _mm256_add_ps(_mm256_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm256_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 2; i++) {  // 128-bit lane L of w[i]: v[4i..4i+3]'s sums over their lane L
        const __m256d a = _mm256_castps_pd(t[2 * i]), b = _mm256_castps_pd(t[2 * i + 1]);
        w[i] = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(a, b)), _mm256_castpd_ps(_mm256_unpackhi_pd(a, b)));
    }
    return _mm256_add_ps(_mm256_permute2f128_ps(w[0], w[1], 0x20), _mm256_permute2f128_ps(w[0], w[1], 0x31));
}

// 8 floats of a KV buffer from element i: float, or IEEE half widened (a half-precision cache).
static inline __attribute__((always_inline)) __m256 load_kv(const void *kv, int64_t i, const int half) {
    return half ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)kv + i))) : _mm256_loadu_ps((const float *)kv + i);
}

// The first n (1-8) of a block's 8 scores: one vector store for a whole block, a copy through
// the stack for the last, short one (vmaskmov stores are slow on AMD's cores).
static inline __attribute__((always_inline)) void store_scores(float *out, __m256 sums, int64_t n) {
    if (n == 8) {
        _mm256_storeu_ps(out, sums);
    } else {
        float last[8];
        _mm256_storeu_ps(last, sums);
        memcpy(out, last, sizeof(float) * (size_t)n);
    }
}

// Scores of `rows` query rows against the 8 keys at element offsets k (the first n of them
// real): each row's 8 dot products are 8 sums in flight, reduced together (sums8).
static inline __attribute__((always_inline)) void scores_block(const float *q, int rows, const void *keys, const int64_t k[8],
                                                               int64_t h, int64_t n, float *scores, int64_t sstride,
                                                               const int half) {
    for (int r = 0; r < rows; r++) {
        const float *x = q + r * h;
        __m256 a[8];
        const __m256 x0 = _mm256_loadu_ps(x);
        for (int i = 0; i < 8; i++) a[i] = _mm256_mul_ps(x0, load_kv(keys, k[i], half));
        for (int64_t d = 8; d < h; d += 8) {
            const __m256 xd = _mm256_loadu_ps(x + d);
            for (int i = 0; i < 8; i++) a[i] = _mm256_fmadd_ps(xd, load_kv(keys, k[i] + d, half), a[i]);
        }
        store_scores(scores + r * sstride, sums8(a), n);
    }
}

// Widened once per block, not once per row: several rows of a half cache read floats.
#define WIDE_HEAD 256

// 2 or more rows of a half cache: 1 reads each key vector once for every 3 rows (scores_keys),
// 0 (-DSCORES_KEYS=0, benchmarks) widens a block to floats first and reads it row by row. Zen 3
// VM, SmolLM2 int4 (3 query heads per KV head): 1-row steps 1.03-1.08x and 4-row 1.02-1.07x faster
// at positions 1000 and 2000 (bench/RESULTS.md).
#ifndef SCORES_KEYS
#define SCORES_KEYS 1
#endif

// R (2-3) query rows against the 8 keys at element offsets k, 4 keys a pass: each key vector,
// widened as it is loaded, used by every row (R x 4 sums, R query vectors and one key vector in
// registers). Each key's sum is the same chain as scores_block's (bit for bit).
static inline __attribute__((always_inline)) void scores_keys(const float *q, const void *keys, const int64_t k[8],
                                                              int64_t h, int64_t n, float *scores, int64_t sstride,
                                                              const int half, const int R) {
    __m256 sums[3][8];
    _Pragma("GCC unroll 2") for (int i0 = 0; i0 < 8; i0 += 4) {
        __m256 a[3][4], x[3];
        _Pragma("GCC unroll 3") for (int r = 0; r < R; r++) x[r] = _mm256_loadu_ps(q + r * h);
        _Pragma("GCC unroll 4") for (int i = 0; i < 4; i++) {
            const __m256 kv = load_kv(keys, k[i0 + i], half);
            _Pragma("GCC unroll 3") for (int r = 0; r < R; r++) a[r][i] = _mm256_mul_ps(x[r], kv);
        }
        for (int64_t d = 8; d < h; d += 8) {
            _Pragma("GCC unroll 3") for (int r = 0; r < R; r++) x[r] = _mm256_loadu_ps(q + r * h + d);
            _Pragma("GCC unroll 4") for (int i = 0; i < 4; i++) {
                const __m256 kv = load_kv(keys, k[i0 + i] + d, half);
                _Pragma("GCC unroll 3") for (int r = 0; r < R; r++) a[r][i] = _mm256_fmadd_ps(x[r], kv, a[r][i]);
            }
        }
        _Pragma("GCC unroll 3") for (int r = 0; r < R; r++) _Pragma("GCC unroll 4") for (int i = 0; i < 4; i++) sums[r][i0 + i] = a[r][i];
    }
    _Pragma("GCC unroll 3") for (int r = 0; r < R; r++) {
        store_scores(scores + r * sstride, sums8(sums[r]), n);
    }
}

// Scores of `rows` query rows against keys [lo, hi], 8 keys at a time: the block's keys stay in
// L1 for every row. A block of a half cache read by several rows is read 3 rows at a time
// (scores_keys; or, with SCORES_KEYS 0, widened to floats first, heads of up to WIDE_HEAD columns).
// (A float cache read 3 rows at a time for a prompt's rows, as the AVX-512 routines copy its
// blocks, made no prompt measurably faster and the float decode steps 10 % slower: compiled
// into them, Zen 4 VM, AUTOGLM_KERNELS_ISA=avx2, bench/RESULTS.md.)
static inline __attribute__((always_inline)) void scores_group(const float *q, int rows, const void *keys, int64_t h, int64_t lo,
                                                               int64_t hi, float *scores, int64_t sstride, const int half,
                                                               const int pf) {
    _Alignas(64) float wide[8 * WIDE_HEAD];
    int64_t at[8];
    for (int i = 0; i < 8; i++) at[i] = i * h;
    for (int64_t j0 = lo; j0 <= hi; j0 += 8) {
        const int64_t n = hi + 1 - j0 < 8 ? hi + 1 - j0 : 8;
        int64_t k[8];
        for (int i = 0; i < 8; i++) k[i] = (j0 + (i < n ? i : n - 1)) * h;  // past the last: read it again
        if (pf) prefetch_l2((const char *)keys + j0 * h * (half ? 2 : 4), 8 * h * (half ? 2 : 4));
        if (SCORES_KEYS && half && rows > 1) {
            for (int r0 = 0; r0 < rows; r0 += 3) {
                const float *qr = q + r0 * h;
                float *out = scores + r0 * sstride + j0;
                switch (rows - r0) {
                    case 1: scores_block(qr, 1, keys, k, h, n, out, sstride, half); break;
                    case 2: scores_keys(qr, keys, k, h, n, out, sstride, half, 2); break;
                    default: scores_keys(qr, keys, k, h, n, out, sstride, half, 3); break;
                }
            }
        } else if (half && rows > 1 && h <= WIDE_HEAD) {
            for (int i = 0; i < 8; i++)
                for (int64_t d = 0; d < h; d += 8) _mm256_storeu_ps(wide + i * h + d, load_kv(keys, k[i] + d, 1));
            scores_block(q, rows, wide, at, h, n, scores + j0, sstride, 0);
        } else {
            scores_block(q, rows, keys, k, h, n, scores + j0, sstride, half);
        }
    }
}


// Columns [d0, d0 + 8W) for R rows: R x W <= 12 sums in flight. Only compile-time bounds index the
// sums, so they stay in registers (a runtime-width branch beside them put them on the stack).
static inline __attribute__((always_inline)) void values_cols(const float *p, int64_t pstride, const void *values,
                                                              int64_t h, int64_t lo, int64_t hi, float *out,
                                                              int64_t ostride, int64_t d0, const int R, const int W,
                                                              const int half, const int pf) {
    __m256 a[TILE][8];
    _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) _Pragma("GCC unroll 8") for (int v = 0; v < W; v++) a[r][v] = _mm256_setzero_ps();
    for (int64_t j = lo; j <= hi; j++) {
        if (pf) prefetch_l2((const char *)values + (j * h + d0) * (half ? 2 : 4), W * 8 * (half ? 2 : 4));
        // Each row's weight broadcast once, then each value vector used by every row as it is
        // loaded: R x W sums, R broadcasts and one vector in registers (3 rows x 4 vectors fit).
        __m256 s[TILE];
        _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) s[r] = _mm256_broadcast_ss(p + r * pstride + j);
        _Pragma("GCC unroll 8") for (int v = 0; v < W; v++) {
            const __m256 x = load_kv(values, j * h + d0 + 8 * v, half);
            _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) a[r][v] = _mm256_fmadd_ps(s[r], x, a[r][v]);
        }
    }
    _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) _Pragma("GCC unroll 8") for (int v = 0; v < W; v++)
        _mm256_storeu_ps(out + r * ostride + d0 + 8 * v, a[r][v]);
}

// Passes of W vectors, then of two (h is a multiple of 16).
static inline __attribute__((always_inline)) void values_pass(const float *p, int64_t pstride, const void *values,
                                                              int64_t h, int64_t lo, int64_t hi, float *out,
                                                              int64_t ostride, const int R, const int W, const int half,
                                                              const int pf) {
    int64_t d0 = 0;
    for (; d0 + 8 * W <= h; d0 += 8 * W) values_cols(p, pstride, values, h, lo, hi, out, ostride, d0, R, W, half, pf);
    for (; d0 < h; d0 += 16) values_cols(p, pstride, values, h, lo, hi, out, ostride, d0, R, 2, half, pf);
}

static inline __attribute__((always_inline)) void values_rows(const float *p, int64_t pstride, const void *values, int64_t h,
                                                              int64_t lo, int64_t hi, float *out, int64_t ostride, int rows,
                                                              const int half, const int pf) {
    switch (rows) {
        case 1: values_pass(p, pstride, values, h, lo, hi, out, ostride, 1, 8, half, pf); break;
        case 2: values_pass(p, pstride, values, h, lo, hi, out, ostride, 2, 4, half, pf); break;
        case 3: values_pass(p, pstride, values, h, lo, hi, out, ostride, 3, 4, half, pf); break;
        default: values_pass(p, pstride, values, h, lo, hi, out, ostride, 4, 2, half, pf); break;
    }
}

ATTENTION_TABLES(avx2, 256)

#pragma GCC pop_options

#endif
