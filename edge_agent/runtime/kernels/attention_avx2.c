// GroupQueryAttention's vector routines for CPUs with AVX2 but no AVX-512 (group_query_attention.h
// says what each computes): the AVX-512 routines' steps 8 floats per vector, with register tiles
// sized for AVX2's 16 registers (a prefill's 16-key chunk is two vectors, one chunk at a time; the
// value sums 64, 32 or 16 columns per pass for 1, 2 or 3-4 rows).
#include "kernels.h"

#if defined(__x86_64__)
#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "avx2.h"
#include "group_query_attention.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")

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

// Four keys at a time (four sums in flight), h a multiple of 16.
static void scores_dot256(const float *q, const float *keys, int64_t h, int64_t lo, int64_t hi, float *scores) {
    int64_t j = lo;
    for (; j + 3 <= hi; j += 4) {
        const float *k0 = keys + j * h;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
        for (int64_t d = 0; d < h; d += 8) {
            const __m256 x = _mm256_loadu_ps(q + d);
            a0 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k0 + d), a0);
            a1 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k0 + h + d), a1);
            a2 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k0 + 2 * h + d), a2);
            a3 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k0 + 3 * h + d), a3);
        }
        scores[j] = hsum256(a0), scores[j + 1] = hsum256(a1), scores[j + 2] = hsum256(a2), scores[j + 3] = hsum256(a3);
    }
    for (; j <= hi; j++) {
        __m256 a = _mm256_setzero_ps(), b = _mm256_setzero_ps();
        for (int64_t d = 0; d < h; d += 16) {
            a = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(keys + j * h + d), a);
            b = _mm256_fmadd_ps(_mm256_loadu_ps(q + d + 8), _mm256_loadu_ps(keys + j * h + d + 8), b);
        }
        scores[j] = hsum256(_mm256_add_ps(a, b));
    }
}

// R rows against one chunk of 16 transposed keys (two vectors): 2R sums in flight.
static inline __attribute__((always_inline)) void scores_chunk(const float *q, int64_t h, const float *col, int64_t stride,
                                                               float *scores, int64_t sstride, const int R) {
    __m256 a[TILE][2];
    _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) a[r][0] = a[r][1] = _mm256_setzero_ps();
    for (int64_t d = 0; d < h; d++) {
        const __m256 k0 = _mm256_loadu_ps(col + d * stride), k1 = _mm256_loadu_ps(col + d * stride + 8);
        _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) {
            const __m256 x = _mm256_broadcast_ss(q + r * h + d);
            a[r][0] = _mm256_fmadd_ps(x, k0, a[r][0]);
            a[r][1] = _mm256_fmadd_ps(x, k1, a[r][1]);
        }
    }
    _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) {
        _mm256_storeu_ps(scores + r * sstride, a[r][0]);
        _mm256_storeu_ps(scores + r * sstride + 8, a[r][1]);
    }
}

static void scores_tile256(const float *q, int64_t h, const float *kt, int64_t stride, int64_t c0, int64_t c1,
                           float *scores, int64_t sstride, int rows) {
    for (int64_t c = c0; c < c1; c++) {
        const float *col = kt + c * 16;
        float *out = scores + c * 16;
        switch (rows) {
            case 1: scores_chunk(q, h, col, stride, out, sstride, 1); break;
            case 2: scores_chunk(q, h, col, stride, out, sstride, 2); break;
            case 3: scores_chunk(q, h, col, stride, out, sstride, 3); break;
            default: scores_chunk(q, h, col, stride, out, sstride, 4); break;
        }
    }
}

// Columns [d0, d0 + 8W) for R rows: R x W <= 8 sums in flight. Only compile-time bounds index the
// sums, so they stay in registers (a runtime-width branch beside them put them on the stack).
static inline __attribute__((always_inline)) void values_cols(const float *p, int64_t pstride, const float *values,
                                                              int64_t h, int64_t lo, int64_t hi, float *out,
                                                              int64_t ostride, int64_t d0, const int R, const int W) {
    __m256 a[TILE][8];
    _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) _Pragma("GCC unroll 8") for (int v = 0; v < W; v++) a[r][v] = _mm256_setzero_ps();
    for (int64_t j = lo; j <= hi; j++) {
        const float *vj = values + j * h + d0;
        __m256 x[8];
        _Pragma("GCC unroll 8") for (int v = 0; v < W; v++) x[v] = _mm256_loadu_ps(vj + 8 * v);
        _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) {
            const __m256 s = _mm256_broadcast_ss(p + r * pstride + j);
            _Pragma("GCC unroll 8") for (int v = 0; v < W; v++) a[r][v] = _mm256_fmadd_ps(s, x[v], a[r][v]);
        }
    }
    _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) _Pragma("GCC unroll 8") for (int v = 0; v < W; v++)
        _mm256_storeu_ps(out + r * ostride + d0 + 8 * v, a[r][v]);
}

// Passes of W vectors, then of two (h is a multiple of 16).
static inline __attribute__((always_inline)) void values_pass(const float *p, int64_t pstride, const float *values,
                                                              int64_t h, int64_t lo, int64_t hi, float *out,
                                                              int64_t ostride, const int R, const int W) {
    int64_t d0 = 0;
    for (; d0 + 8 * W <= h; d0 += 8 * W) values_cols(p, pstride, values, h, lo, hi, out, ostride, d0, R, W);
    for (; d0 < h; d0 += 16) values_cols(p, pstride, values, h, lo, hi, out, ostride, d0, R, 2);
}

static void values_tile256(const float *p, int64_t pstride, const float *values, int64_t h, int64_t lo, int64_t hi,
                           float *out, int64_t ostride, int rows) {
    switch (rows) {
        case 1: values_pass(p, pstride, values, h, lo, hi, out, ostride, 1, 8); break;
        case 2: values_pass(p, pstride, values, h, lo, hi, out, ostride, 2, 4); break;
        case 3: values_pass(p, pstride, values, h, lo, hi, out, ostride, 3, 2); break;
        default: values_pass(p, pstride, values, h, lo, hi, out, ostride, 4, 2); break;
    }
}

#pragma GCC pop_options

const AttentionKernels attention_avx2 = {scores_dot256, scores_tile256, softmax256, values_tile256};

#endif
