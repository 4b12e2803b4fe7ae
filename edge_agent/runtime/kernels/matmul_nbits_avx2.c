// MatMulNBits' tile for CPUs with AVX2 but no AVX-512 VNNI (AMD Zen 2 and 3, Intel before Ice
// Lake): the same packed panels and per-block int8 activations as the AVX-512 tile
// (matmul_nbits.c), multiplied 32 bytes at a time with vpmaddubsw + vpmaddwd.
//
// Why: onnxruntime's kernel on these CPUs is the same one that quantizes a prefill's activations
// on one thread and computes a lone row with other instructions than rows in pairs.
//
// Exactness: every block's int32 sum equals the AVX-512 tile's (integer sums, no saturation: 4-bit
// weights are 0..15, so a 16-bit lane's products over NIBBLE_STEPS steps, low and high nibbles,
// are at most 4 x NIBBLE_STEPS x 15 x 127; 8-bit weights are packed as signed bytes here and
// multiplied as |w| x (x with w's sign), a pair at most 2 x 128 x 127 < 32767), and the float
// accumulation is the same fused multiply-add per block: a column's output is bit for bit what
// the AVX-512 tile computes, and as there, independent of the rows beside it.
#include "kernels.h"

#if defined(__x86_64__)
#include <immintrin.h>
#include <math.h>

#include "avx2.h"
#include "matmul_nbits.h"

// A 4-bit tile's steps (8 elements each) summed in 16 bits before widening; 1 widens every step.
#ifndef NIBBLE_STEPS
#define NIBBLE_STEPS 4
#endif
#if NIBBLE_STEPS < 1 || NIBBLE_STEPS > 4
#error "NIBBLE_STEPS: 1 to 4 (4 steps' 16-bit sums reach 30480 of 32767)"
#endif

#pragma GCC push_options
#pragma GCC target("avx2,fma")

// Columns [16 first, 16 (first + P)) (P panels, two 8-column halves each) for activation rows
// [m0, m0 + M). A panel's 64 bytes per step: columns 0-7 in the first 32, 8-15 in the second.
static inline __attribute__((always_inline)) void panel_rows(const Job *job, int64_t first, int64_t m0, const int BITS,
                                                             const int M, const int P, const int AHEAD) {
    const Kernel *kn = job->kernel;
    const int64_t k = kn->k, block = kn->block, nb = kn->nb, n = kn->n;
    const uint8_t *wp[4];
    const float *sp[4];
    _Pragma("GCC unroll 4") for (int p = 0; p < P; p++) {
        wp[p] = nbits_panel(kn, first + p);
        sp[p] = nbits_panel_scales(kn, first + p);
    }
    const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    __m256 f[8][SMALL_M];
    _Pragma("GCC unroll 8") for (int h = 0; h < 2 * P; h++)
        _Pragma("GCC unroll 4") for (int i = 0; i < M; i++) f[h][i] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const int64_t start = b * block, len = (k - start < block ? k - start : block);
        __m256i a[8][SMALL_M];
        const int8_t *x[SMALL_M];
        _Pragma("GCC unroll 4") for (int i = 0; i < M; i++) {
            // 8 bits multiply signed weights (no zero-point term); 4 bits unsigned nibbles.
            const __m256i init = BITS == 8 ? _mm256_setzero_si256() : _mm256_set1_epi32(job->corr[(m0 + i) * nb + b]);
            _Pragma("GCC unroll 8") for (int h = 0; h < 2 * P; h++) a[h][i] = init;
            x[i] = job->xq + (m0 + i) * k + start;
        }
        // Half by half, each weight vector used by every row as soon as it is loaded: the sums and
        // one weight vector in registers, each row's activations broadcast once per step (at 4
        // bits and 3-4 rows, at each use instead: two broadcasts per row would not fit; 4-row
        // SmolLM2 steps 9-11 % faster that way, while 8 bits lost 4 %: bench/RESULTS.md).
        if (BITS == 8) {
            for (int64_t j = 0; j < len; j += 4) {
                __m256i xb[SMALL_M];
                _Pragma("GCC unroll 4") for (int i = 0; i < M; i++) xb[i] = _mm256_set1_epi32(*(const int32_t *)(x[i] + j));
                _Pragma("GCC unroll 8") for (int h = 0; h < 2 * P; h++) {
                    const uint8_t *at = wp[h / 2] + (start + j) * (AVX2_STEP / 4) + 32 * (h % 2);
                    if (AHEAD && AVX2_PREFETCH >= 0 && h % 2 == 0) _mm_prefetch((const char *)(at + AVX2_PREFETCH), _MM_HINT_T0);
                    const __m256i w = _mm256_load_si256((const __m256i *)at), aw = _mm256_abs_epi8(w);
                    _Pragma("GCC unroll 4") for (int i = 0; i < M; i++) {
                        const __m256i pairs = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(xb[i], w));
                        a[h][i] = _mm256_add_epi32(a[h][i], _mm256_madd_epi16(pairs, ones));
                    }
                }
            }
        } else {
            // Up to NIBBLE_STEPS steps' pair sums added in 16 bits before one vpmaddwd widens them
            // (exact: at most 4 x NIBBLE_STEPS x 15 x 127 = 30480 at 4 steps): a 3-4 row tile is
            // bound by its multiplies on one core, and this drops a third of them (Zen 3 VM: 4-row
            // steps 1.08-1.28x and 4-bit prefills 1.06-1.42x faster; bench/RESULTS.md).
            for (int64_t g = 0; g < len; g += 8 * NIBBLE_STEPS) {
                const int64_t end = len - g < 8 * NIBBLE_STEPS ? len : g + 8 * NIBBLE_STEPS;
                __m256i s[8][SMALL_M];
                _Pragma("GCC unroll 8") for (int h = 0; h < 2 * P; h++)
                    _Pragma("GCC unroll 4") for (int i = 0; i < M; i++) s[h][i] = _mm256_setzero_si256();
                for (int64_t j = g; j < end; j += 8) {
                    __m256i xl[SMALL_M], xh[SMALL_M];
                    if (M <= 2) _Pragma("GCC unroll 4") for (int i = 0; i < M; i++) {
                        xl[i] = _mm256_set1_epi32(*(const int32_t *)(x[i] + j));
                        xh[i] = _mm256_set1_epi32(*(const int32_t *)(x[i] + j + 4));
                    }
                    _Pragma("GCC unroll 8") for (int h = 0; h < 2 * P; h++) {
                        const uint8_t *at = wp[h / 2] + (start + j) * (AVX2_STEP / 8) + 32 * (h % 2);
                        if (AHEAD && AVX2_PREFETCH >= 0 && h % 2 == 0) _mm_prefetch((const char *)(at + AVX2_PREFETCH), _MM_HINT_T0);
                        const __m256i packed = _mm256_load_si256((const __m256i *)at);
                        const __m256i lo = _mm256_and_si256(packed, low), hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low);
                        _Pragma("GCC unroll 4") for (int i = 0; i < M; i++) {
                            const __m256i xli = M <= 2 ? xl[i] : _mm256_set1_epi32(*(const int32_t *)(x[i] + j));
                            const __m256i xhi = M <= 2 ? xh[i] : _mm256_set1_epi32(*(const int32_t *)(x[i] + j + 4));
                            s[h][i] = _mm256_add_epi16(s[h][i], _mm256_add_epi16(_mm256_maddubs_epi16(lo, xli), _mm256_maddubs_epi16(hi, xhi)));
                        }
                    }
                }
                _Pragma("GCC unroll 8") for (int h = 0; h < 2 * P; h++)
                    _Pragma("GCC unroll 4") for (int i = 0; i < M; i++) a[h][i] = _mm256_add_epi32(a[h][i], _mm256_madd_epi16(s[h][i], ones));
            }
        }
        _Pragma("GCC unroll 8") for (int h = 0; h < 2 * P; h++) {
            const __m256 scale = _mm256_loadu_ps(sp[h / 2] + b * (AVX2_STEP / 4) + 8 * (h % 2));
            _Pragma("GCC unroll 4") for (int i = 0; i < M; i++) {
                const __m256 xs = _mm256_set1_ps(job->xs[(m0 + i) * nb + b]);
                f[h][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[h][i]), _mm256_mul_ps(scale, xs), f[h][i]);
            }
        }
    }
    _Pragma("GCC unroll 8") for (int h = 0; h < 2 * P; h++) {
        const int64_t c = first * 16 + 8 * h;
        if (c >= n) break;
        const int64_t left = n - c;
        const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(left > 8 ? 8 : (int)left), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        const __m256 bias = !kn->bias ? _mm256_setzero_ps()
                            : left >= 8 ? _mm256_loadu_ps(kn->bias + c)
                                        : _mm256_maskload_ps(kn->bias + c, mask);
        _Pragma("GCC unroll 4") for (int i = 0; i < M; i++) {
            float *out = job->y + (m0 + i) * n + c;
            if (left >= 8)
                _mm256_storeu_ps(out, _mm256_add_ps(f[h][i], bias));
            else
                _mm256_maskstore_ps(out, mask, _mm256_add_ps(f[h][i], bias));
        }
    }
}

// One group of four panels for quad_task, in tiles that fit AVX2's 16 registers: four panels
// wide (four weight streams in flight: an AVX2 EPYC read 113 MB as four interleaved streams per
// thread at 1.6x the rate of one, bench/RESULTS.md) for a lone row, two for two rows, one for 3-4.
// (Hence whole panels here, not the AVX-512 tiles' interleaved groups: matmul_nbits.h.)
static inline __attribute__((always_inline)) void quad256(const Job *job, int64_t q, int64_t m0, int rows, int eight,
                                                          int ahead) {
#define TILE(BITS, M, P, AHEAD) \
    for (int64_t p = 0; p < 4; p += P) panel_rows(job, 4 * q + p, m0, BITS, M, P, AHEAD)
#define TILES(AHEAD)                          \
    switch (rows + 10 * eight) {              \
        case 11: TILE(8, 1, 4, AHEAD); break; \
        case 12: TILE(8, 2, 2, AHEAD); break; \
        case 13: TILE(8, 3, 1, AHEAD); break; \
        case 14: TILE(8, 4, 1, AHEAD); break; \
        case 1: TILE(4, 1, 4, AHEAD); break;  \
        case 2: TILE(4, 2, 2, AHEAD); break;  \
        case 3: TILE(4, 3, 1, AHEAD); break;  \
        default: TILE(4, 4, 1, AHEAD); break; \
    }
    if (avx2_prefetches(ahead, rows)) {
        TILES(1)
    } else {
        TILES(0)
    }
#undef TILES
#undef TILE
}

void packed_task_avx2(void *data, size_t t) { quad_task(data, t, quad256); }

// quantize_row of matmul_nbits.c, 8 floats at a time (a block's length is a multiple of 4):
// the same scale, rounding and clamping, so the same int8 activations.
void quantize_task_avx2(void *data, size_t row) {
    const Quantize *job = data;
    const Kernel *kn = job->kernel;
    const int64_t k = kn->k, block = kn->block, nb = kn->nb;
    const float *x = job->a + (int64_t)row * k;
    int8_t *q = job->xq + (int64_t)row * k;
    float *xs = job->xs + (int64_t)row * nb;
    int32_t *corr = job->corr + (int64_t)row * nb;
    const int32_t zero = 1 << (kn->bits - 1);
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int64_t b = 0; b < nb; b++) {
        const int64_t start = b * block, len = k - start < block ? k - start : block;
        __m256 amax = _mm256_setzero_ps();
        for (int64_t j = 0; j < len; j += 8) {
            const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(len - j >= 8 ? 8 : (int)(len - j)), lanes);
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, _mm256_maskload_ps(x + start + j, mask)));
        }
        const float scale = hmax256(amax) / 127.0f, inv = scale > 0.0f ? 1.0f / scale : 0.0f;
        const __m256 vinv = _mm256_set1_ps(inv);
        const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
        __m256i total = _mm256_setzero_si256();
        for (int64_t j = 0; j < len; j += 8) {
            const int left = len - j >= 8 ? 8 : (int)(len - j);
            const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(left), lanes);
            __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_maskload_ps(x + start + j, mask), vinv));
            v = _mm256_min_epi32(_mm256_max_epi32(v, lo), hi);
            total = _mm256_add_epi32(total, v);
            const __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
            const __m128i bytes = _mm_packs_epi16(words, words);
            if (left == 8)
                _mm_storel_epi64((__m128i *)(q + start + j), bytes);
            else {  // the last 4 of a block
                const int32_t four = _mm_cvtsi128_si32(bytes);
                memcpy(q + start + j, &four, sizeof four);
            }
        }
        xs[b] = scale;
        corr[b] = -zero * hsum256_epi32(total);
    }
}

// 1 + e^x for x in [-87, 88] (clamped there: e^-g of a gate output beyond it is 0 or huge either
// way, and silu's quotient is then g or -0): Cephes' expf, a degree-6 polynomial of the remainder
// after x = n ln 2 + r, |r| <= ln 2 / 2, scaled by 2^n through the exponent bits; ~2 ulp. The 1 is
// added in the scaling's fused multiply-add, written out: left to the compiler (a product, then a
// sum) it was fused or not as the compiler chose. (attention_avx2.c's softmax has its own,
// Taylor-coefficient exp for x <= 0: one routine for both would move the last bits of one op's
// outputs, and through int8 activations its logits.)
static inline __m256 one_plus_exp256(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_fmadd_ps(p, _mm256_castsi256_ps(scale), _mm256_set1_ps(1.0f));
}

void silu_mul_avx2(const float *g, float *y, int64_t n) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(g + i);
        const __m256 silu = _mm256_div_ps(v, one_plus_exp256(_mm256_xor_ps(v, sign)));
        _mm256_storeu_ps(y + i, _mm256_mul_ps(silu, _mm256_loadu_ps(y + i)));
    }
    if (i < n) {  // the tail through a padded copy, so every element takes the same instructions
        float gt[8] = {0}, yt[8] = {0};
        memcpy(gt, g + i, sizeof(float) * (size_t)(n - i));
        memcpy(yt, y + i, sizeof(float) * (size_t)(n - i));
        silu_mul_avx2(gt, yt, 8);
        memcpy(y + i, yt, sizeof(float) * (size_t)(n - i));
    }
}

void skip_rms_norm_avx2(const float *a, const float *skip, const float *gamma, float epsilon, int64_t k, float *sum,
                        float *normed) {
    __m256 squares = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= k; j += 8) {
        const __m256 s = _mm256_add_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(skip + j));
        _mm256_storeu_ps(sum + j, s);
        squares = _mm256_fmadd_ps(s, s, squares);
    }
    float total = hsum256(squares);
    for (; j < k; j++) {
        sum[j] = a[j] + skip[j];
        total += sum[j] * sum[j];
    }
    const __m256 inv = _mm256_set1_ps(1.0f / sqrtf(total / (float)k + epsilon));
    for (j = 0; j + 8 <= k; j += 8)
        _mm256_storeu_ps(normed + j, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(sum + j), inv), _mm256_loadu_ps(gamma + j)));
    for (; j < k; j++) normed[j] = sum[j] * _mm256_cvtss_f32(inv) * gamma[j];
}

#pragma GCC pop_options

#endif
