// MatMulNBits (library.c registers it): the quantized weight matmuls of the int8 and int4 graphs
// the packager ships (67 % of a decode step, more of a prefill). This file packs the weights, runs
// the op and holds the AVX-512 VNNI tile; CPUs with AVX2 alone run matmul_nbits_avx2.c's tile on
// the same panels, and calls of more than 4 rows on CPUs with AMX run matmul_nbits_amx.c's.
//
// Why: onnxruntime's kernel (MLAS, accuracy level 4) quantizes a prefill's activations on one
// thread, and computes a lone row with other instructions than rows in pairs (so an answer
// depends on what decodes beside it). AMD EPYC Zen 4 VM, 2 threads (bench/RESULTS.md): prefill
// 1.5-1.7x onnxruntime's own, decode at par or ahead.
//
// How: at session start the constant weights are copied into panels of 16 output columns, 4 input
// elements per column per 64 bytes, so one dpbusd multiplies 4 elements into 16 outputs; for
// this tile a group of four panels is stored interleaved (matmul_nbits.h: a task reads one
// sequential stream). A register tile is 1-4 activation rows x 64 columns (four panels, each load used by
// every row: a parallel-slots step reads the weights once). Activations are quantized to
// int8 per weight block (scale max |x| / 127, as MatMulNBits does at accuracy level 4), a row per
// task. Every output is summed by the same instructions whatever the number of rows, so a
// sequence's logits do not depend on what decodes beside it.
//
// Takes what our packager emits: symmetric weights (no zero_points: zero point 2^(bits-1)), 8 or
// 4 bits, any block size that is a multiple of 8 (K need not be whole blocks), an optional constant
// bias. Refuses the rest (zero points, g_idx, non-constant weights, a CPU with neither AVX-512
// VNNI nor AVX2, not x86-64), and a refusal fails the session, which the caller answers by loading the graph
// without the library. The packed copy replaces the weights onnxruntime mapped from the graph's
// data file (nbits_drop_source): resident once, as with onnxruntime's own prepacking kernels.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "kernels.h"
#include "matmul_nbits.h"

#if defined(__x86_64__)
#include <immintrin.h>

// A 4-bit tile of at most this many rows takes each high nibble where it lies (masked, not
// shifted: 16 x the weight) into sums of its own, shifted down by 4 at the block's end, which is
// exact (a multiple of 16; at most 16 x 15 x 127 x 4096 < 2^31 for the largest block): one vector
// op fewer per 64 bytes (and, and, 2 vpdpbusd instead of and, shift, and, 2 vpdpbusd), and two
// independent chains per panel. Its extra sums fit the registers up to 2 rows (3-4 would need 24-32
// of them). Intel Xeon VM (bench/RESULTS.md): SmolLM2 int4 1-row steps 1.05-1.09x faster; matrices
// streamed from memory alone, 1 row, 2-3 % faster. -DHI16_ROWS=0 builds the shifted nibbles for every M.
#ifndef HI16_ROWS
#define HI16_ROWS 2
#endif
#define NP 4  // panels (16 columns each) per register tile: the group stored interleaved
// Tasks per matrix: enough for the intra-op pool to balance two to a few dozen threads.
#ifndef TASKS  // -DTASKS=N builds another split (bench/engine_steps.py compares libraries)
#define TASKS 16
#endif

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,fma")

// acc += the dot products of w's unsigned and x's signed bytes, 4 at a time (vpdpbusd), in acc's
// own register. Through the intrinsic GCC (12) gave each sum a new register every step and copied
// it back: the 4-row 8-bit loop ran 32 register copies and 3 stores beside its 16 vpdpbusd, the
// 4-bit one 18 and 7 beside 32. In place none (same instructions otherwise, same sums): a 4-row
// call 1.21x (8 bits) and 1.05x (4 bits) faster from L2 on one thread, a 512-token prefill 1.05-
// 1.18x (AMD EPYC Zen 4 VM, bench/RESULTS.md). -DNBITS_DP_INTRINSIC builds the intrinsic again.
#ifdef NBITS_DP_INTRINSIC
#define DP(acc, w, x) ((acc) = _mm512_dpbusd_epi32((acc), (w), (x)))
#else
#define DP(acc, w, x) __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(w), "v"(x))
#endif

// A lone row's step of a HI16_ROWS tile: its low nibbles' sums a[0..3][i] += lo x xl and its high
// nibbles' h[0..3][i] += hi x xh, as one statement: with a DP per sum GCC (12) kept a lone row's
// sums in other registers than the instructions' and copied them back, 12 copies beside 8
// vpdpbusd per step (6 where it prefetches); tied together none. (Two rows are the other way
// round: none with a DP per sum, 4 with this.)
#define DP_ROW_HI16(a, h, i, lo, hi, xl, xh)                                                          \
    __asm__("vpdpbusd %[xl], %[l0], %[a0]\n\tvpdpbusd %[xh], %[h0], %[b0]\n\t"                   \
            "vpdpbusd %[xl], %[l1], %[a1]\n\tvpdpbusd %[xh], %[h1], %[b1]\n\t"                   \
            "vpdpbusd %[xl], %[l2], %[a2]\n\tvpdpbusd %[xh], %[h2], %[b2]\n\t"                   \
            "vpdpbusd %[xl], %[l3], %[a3]\n\tvpdpbusd %[xh], %[h3], %[b3]"                         \
            : [a0] "+v"(a[0][i]), [a1] "+v"(a[1][i]), [a2] "+v"(a[2][i]), [a3] "+v"(a[3][i]),         \
              [b0] "+v"(h[0][i]), [b1] "+v"(h[1][i]), [b2] "+v"(h[2][i]), [b3] "+v"(h[3][i])          \
            : [l0] "v"(lo[0]), [l1] "v"(lo[1]), [l2] "v"(lo[2]), [l3] "v"(lo[3]), [h0] "v"(hi[0]),    \
              [h1] "v"(hi[1]), [h2] "v"(hi[2]), [h3] "v"(hi[3]), [xl] "v"(xl), [xh] "v"(xh))
#if NP != 4
#error "DP_ROW_HI16 names the four panels of a tile"
#endif

// Columns [16 first, 16 (first + NP)) (NP panels: one tile) for activation rows [m0, m0 + M).
// 8 bits: a panel's 64 bytes per step are 16 columns x 4 consecutive elements (w + 128; the
// AVX2 tile's panels hold w itself, matmul_nbits_avx2.c).
// 4 bits: 64 bytes per two steps: low nibbles the first 4 elements, high nibbles the next 4.
// Every column's sum runs the same way whatever M is (see the top of the file). AHEAD: the
// bytes ahead of each load it prefetches into L2 (PREFETCH, LONE_PREFETCH), -1 none.
static inline __attribute__((always_inline)) void panel_rows(const Job *job, int64_t first, int64_t m0,
                                                             const int BITS, const int M, const int AHEAD) {
    const Kernel *kn = job->kernel;
    const int64_t k = kn->k, block = kn->block, nb = kn->nb, n = kn->n;
    const uint8_t *wp[4];
    const float *sp[4];
    _Pragma("GCC unroll 4") for (int p = 0; p < NP; p++) {
        wp[p] = nbits_panel(kn, first + p);
        sp[p] = nbits_panel_scales(kn, first + p);
    }
    const __m512i low = _mm512_set1_epi8(0x0F);
    __m512 f[4][SMALL_M];
    _Pragma("GCC unroll 4") for (int p = 0; p < NP; p++)
        _Pragma("GCC unroll 4") for (int i = 0; i < M; i++) f[p][i] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const int64_t start = b * block, len = (k - start < block ? k - start : block);
        __m512i a[4][SMALL_M];
        const int8_t *x[SMALL_M];
        _Pragma("GCC unroll 4") for (int i = 0; i < M; i++) {
            _Pragma("GCC unroll 4") for (int p = 0; p < NP; p++) a[p][i] = _mm512_set1_epi32(job->corr[(m0 + i) * nb + b]);
            x[i] = job->xq + (m0 + i) * k + start;
        }
        if (BITS == 8) {
            for (int64_t j = 0; j < len; j += 4) {
                __m512i v[4];
                if (AHEAD >= 0) {
                    _Pragma("GCC unroll 4") for (int p = 0; p < NP; p++) _mm_prefetch((const char *)(wp[p] + (start + j) * (PANEL_STEP / 4) + AHEAD), PREFETCH_HINT);
                }
                _Pragma("GCC unroll 4") for (int p = 0; p < NP; p++) v[p] = _mm512_load_si512(wp[p] + (start + j) * (PANEL_STEP / 4));
                _Pragma("GCC unroll 4") for (int i = 0; i < M; i++) {
                    const __m512i xb = _mm512_set1_epi32(*(const int32_t *)(x[i] + j));
                    _Pragma("GCC unroll 4") for (int p = 0; p < NP; p++) DP(a[p][i], v[p], xb);
                }
            }
        } else {
            // M <= HI16_ROWS: the high nibbles in place (16 x each weight) into sums of their own
            const int in_place = M <= HI16_ROWS;
            const __m512i high = _mm512_set1_epi8((char)0xF0);
            __m512i h16[4][SMALL_M];
            _Pragma("GCC unroll 4") for (int p = 0; p < NP; p++)
                _Pragma("GCC unroll 4") for (int i = 0; i < M; i++) h16[p][i] = _mm512_setzero_si512();
            for (int64_t j = 0; j < len; j += 8) {
                __m512i lo[4], hi[4];
                if (AHEAD >= 0) {
                    _Pragma("GCC unroll 4") for (int p = 0; p < NP; p++) _mm_prefetch((const char *)(wp[p] + (start + j) * (PANEL_STEP / 8) + AHEAD), PREFETCH_HINT);
                }
                _Pragma("GCC unroll 4") for (int p = 0; p < NP; p++) {
                    const __m512i packed = _mm512_load_si512(wp[p] + (start + j) * (PANEL_STEP / 8));
                    lo[p] = _mm512_and_si512(packed, low);
                    hi[p] = in_place ? _mm512_and_si512(packed, high) : _mm512_and_si512(_mm512_srli_epi16(packed, 4), low);
                }
                _Pragma("GCC unroll 4") for (int i = 0; i < M; i++) {
                    const __m512i xl = _mm512_set1_epi32(*(const int32_t *)(x[i] + j));
                    const __m512i xh = _mm512_set1_epi32(*(const int32_t *)(x[i] + j + 4));
                    if (in_place && M == 1) {
                        DP_ROW_HI16(a, h16, i, lo, hi, xl, xh);
                    } else if (in_place) {
                        _Pragma("GCC unroll 4") for (int p = 0; p < NP; p++)
                            { DP(a[p][i], lo[p], xl); DP(h16[p][i], hi[p], xh); }
                    } else {
                        _Pragma("GCC unroll 4") for (int p = 0; p < NP; p++)
                            { DP(a[p][i], lo[p], xl); DP(a[p][i], hi[p], xh); }
                    }
                }
            }
            if (in_place) {
                _Pragma("GCC unroll 4") for (int p = 0; p < NP; p++)
                    _Pragma("GCC unroll 4") for (int i = 0; i < M; i++) a[p][i] = _mm512_add_epi32(a[p][i], _mm512_srai_epi32(h16[p][i], 4));
            }
        }
        _Pragma("GCC unroll 4") for (int p = 0; p < NP; p++) {
            const __m512 scale = _mm512_loadu_ps(sp[p] + b * (PANEL_STEP / 4));
            _Pragma("GCC unroll 4") for (int i = 0; i < M; i++)
                f[p][i] = nbits_block_step(f[p][i], a[p][i], scale, job->xs[(m0 + i) * nb + b]);
        }
    }
    _Pragma("GCC unroll 4") for (int p = 0; p < NP; p++) {
        const int64_t c = (first + p) * 16;
        if (c >= n) break;
        _Pragma("GCC unroll 4") for (int i = 0; i < M; i++) nbits_store_panel(job, m0 + i, c, f[p][i]);
    }
}

// Rows in tiles of up to SMALL_M, NP panels (64 columns) wide: 256 bytes of weights per step,
// each 64-byte load used by every row of the tile. (Tiles of two panels at 3-4 rows, which keep
// fewer sums in registers, were slower for a 4-row decode step: bench/RESULTS.md.)
static inline __attribute__((always_inline)) void quad512(const Job *job, int64_t q, int64_t m0, int rows, int eight,
                                                          int ahead) {
#define TILES(AHEAD)                                                \
    switch (rows + 10 * eight) {                                    \
        case 11: panel_rows(job, NP * q, m0, 8, 1, AHEAD); break;   \
        case 12: panel_rows(job, NP * q, m0, 8, 2, AHEAD); break;   \
        case 13: panel_rows(job, NP * q, m0, 8, 3, AHEAD); break;   \
        case 14: panel_rows(job, NP * q, m0, 8, 4, AHEAD); break;   \
        case 1: panel_rows(job, NP * q, m0, 4, 1, AHEAD); break;    \
        case 2: panel_rows(job, NP * q, m0, 4, 2, AHEAD); break;    \
        case 3: panel_rows(job, NP * q, m0, 4, 3, AHEAD); break;    \
        default: panel_rows(job, NP * q, m0, 4, 4, AHEAD); break;   \
    }
    if (ahead == 2) {
        TILES(PREFETCH)
    } else if (eight && job->m == 1 && job->kernel->prefetch == PREFETCH_LONE_INT8) {
        panel_rows(job, NP * q, m0, 8, 1, LONE_PREFETCH);
    } else {
        TILES(-1)
    }
#undef TILES
}

void packed_task_avx512(void *data, size_t t) { quad_task(data, t, quad512); }

// The packed kernels' activations: per block, scale = max |x| / 127 and x rounded to nearest
// (cvtps rounds to nearest even, as nearbyintf does), in natural order, the last block as short
// as K leaves it; one row per call (rows are quantized in parallel for a prefill).
static void quantize_row(const Kernel *kn, const float *x, int8_t *q, float *xs, int32_t *corr) {
    const int64_t k = kn->k, block = kn->block, nb = kn->nb;
    const int32_t zero = 1 << (kn->bits - 1);
    for (int64_t b = 0; b < nb; b++) {
        const int64_t start = b * block, len = k - start < block ? k - start : block;
        __m512 amax = _mm512_setzero_ps();
        for (int64_t j = 0; j < len; j += 16) {
            const __mmask16 mask = len - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (len - j)) - 1);
            amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_maskz_loadu_ps(mask, x + start + j)));
        }
        const float scale = _mm512_reduce_max_ps(amax) / 127.0f, inv = scale > 0.0f ? 1.0f / scale : 0.0f;
        const __m512 vinv = _mm512_set1_ps(inv);
        const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
        __m512i total = _mm512_setzero_si512();
        for (int64_t j = 0; j < len; j += 16) {
            const __mmask16 mask = len - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (len - j)) - 1);
            __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(mask, x + start + j), vinv));
            v = _mm512_min_epi32(_mm512_max_epi32(v, lo), hi);
            total = _mm512_add_epi32(total, v);
            _mm_mask_storeu_epi8(q + start + j, mask, _mm512_cvtepi32_epi8(v));
        }
        xs[b] = scale;
        corr[b] = -zero * _mm512_reduce_add_epi32(total);
    }
}

static void quantize_task(void *data, size_t i) {
    const Quantize *job = data;
    const int64_t k = job->kernel->k, nb = job->kernel->nb;
    quantize_row(job->kernel, job->a + i * k, job->xq + i * k, job->xs + i * nb, job->corr + i * nb);
}

#pragma GCC pop_options

void (*nbits_tiles(const Kernel *kn))(void *, size_t) {
    if (kn->bits == 32) return kn->isa == ISA_AVX512 ? float_task_avx512 : float_task_avx2;
    if (kn->amx) return packed_task_amx;
    return kn->isa == ISA_AVX512 ? packed_task_avx512 : packed_task_avx2;
}

OrtStatus *nbits_quantize(const Kernel *kn, OrtKernelContext *context, const float *a, int64_t m, Activations *act) {
    *act = (Activations){.a = a};
    if (kn->bits == 32) return NULL;  // float weights multiply a itself
    const int64_t pad = nbits_runs_amx(kn, m) ? AMX_ROWS - 1 : 0;
    act->xq = aligned_alloc(64, (size_t)(((m + pad) * kn->k + 63) / 64 * 64));
    act->xs = malloc(sizeof(float) * (size_t)(m * kn->nb));
    act->corr = malloc(sizeof(int32_t) * (size_t)(m * kn->nb));
    if (!act->xq || !act->xs || !act->corr) {
        nbits_free(act);
        return fail("MatMulNBits: out of memory");
    }
    memset(act->xq + m * kn->k, 0, (size_t)(pad * kn->k));
    Quantize rows = {kn, a, act->xq, act->xs, act->corr};
    void (*quantize)(void *, size_t) = kn->isa == ISA_AVX512 ? quantize_task : quantize_task_avx2;
    if (m <= SMALL_M) {  // a decode step: not worth a hand-off
        for (int64_t i = 0; i < m; i++) quantize(&rows, (size_t)i);
        return NULL;
    }
    OrtStatus *status = ort->KernelContext_ParallelFor(context, quantize, (size_t)m, 0, &rows);
    if (status) nbits_free(act);
    return status;
}

void nbits_free(Activations *act) {
    free(act->xq), free(act->xs), free(act->corr);
    *act = (Activations){0};
}

Job nbits_job(const Kernel *kn, const Activations *act, float *y, int64_t m) {
    const int64_t quads = kn->n_pad / 64;
    return (Job){kn, act->a, act->xq, act->xs, act->corr, y, m, (quads + TASKS - 1) / TASKS};
}

OrtStatus *nbits_multiply(const Kernel *kn, OrtKernelContext *context, const Activations *act, float *y, int64_t m) {
    Job job = nbits_job(kn, act, y, m);
    return ort->KernelContext_ParallelFor(context, nbits_tiles(kn), nbits_task_count(&job), 0, &job);
}

size_t nbits_task_count(const Job *job) {
    const int64_t quads = job->kernel->n_pad / 64;
    return (size_t)((quads + job->quads_per_task - 1) / job->quads_per_task);
}

OrtStatus *nbits_shape(OrtKernelContext *context, size_t index, const OrtValue **value, int64_t dims[8],
                       size_t *rank, size_t *count) {
    CHECK(ort->KernelContext_GetInput(context, index, value));
    OrtTensorTypeAndShapeInfo *info;
    CHECK(ort->GetTensorTypeAndShape(*value, &info));
    OrtStatus *status = ort->GetDimensionsCount(info, rank);
    if (!status && (*rank < 1 || *rank > 8)) status = fail("MatMulNBits (autoglm): inputs must have rank 1 to 8");
    if (!status) status = ort->GetDimensions(info, dims, *rank);
    if (!status) status = ort->GetTensorShapeElementCount(info, count);
    ort->ReleaseTensorTypeAndShapeInfo(info);
    return status;
}

OrtStatus *nbits_io(const Kernel *kn, OrtKernelContext *context, const float **a, float **y, int64_t *m) {
    const OrtValue *input;  // A: the weights, scales and bias were packed at session start
    size_t rank = 0, count = 0;
    int64_t dims[8];
    CHECK(nbits_shape(context, 0, &input, dims, &rank, &count));
    if (dims[rank - 1] != kn->k) return fail("MatMulNBits: the last dimension of A is not K");
    *m = (int64_t)count / kn->k;
    dims[rank - 1] = kn->n;
    OrtValue *output;
    CHECK(ort->KernelContext_GetOutput(context, 0, dims, rank, &output));
    if (*m == 0) return NULL;  // an empty output: nothing to read or write
    CHECK(ort->GetTensorMutableData((OrtValue *)input, (void **)a));
    return ort->GetTensorMutableData(output, (void **)y);
}

static OrtStatus *ORT_API_CALL compute(void *op_kernel, OrtKernelContext *context) {
    const Kernel *kn = op_kernel;
    const float *a;
    float *y;
    int64_t m = 0;
    CHECK(nbits_io(kn, context, &a, &y, &m));
    if (m == 0) return NULL;
    Activations act;
    CHECK(nbits_quantize(kn, context, a, m, &act));
    OrtStatus *status = nbits_multiply(kn, context, &act, y, m);
    nbits_free(&act);
    return status;
}

static OrtStatus *attribute(const OrtKernelInfo *info, const char *name, int64_t *out) {
    return ort->KernelInfoGetAttribute_int64(info, name, out);
}

#ifndef MADV_PAGEOUT
#define MADV_PAGEOUT 21  // Linux 5.4
#endif

// After packing, this op never reads the source weights again, but onnxruntime keeps them: for a
// graph with external data they are pages of the file it mapped (private, writable, never
// written), resident beside the packed copy. Ask the kernel to reclaim them, so the quantized
// weights are resident once. MADV_PAGEOUT is a hint that loses nothing: a clean file page is
// dropped (a later read faults the file's bytes back in), an anonymous one goes to swap if there
// is any and stays otherwise; older kernels refuse the advice and nothing changes.
void nbits_drop_source(const void *p, size_t len) {
    const long page = sysconf(_SC_PAGESIZE);
    if (page <= 0) return;
    const uintptr_t lo = ((uintptr_t)p + (uintptr_t)page - 1) / (uintptr_t)page * (uintptr_t)page;
    const uintptr_t hi = ((uintptr_t)p + len) / (uintptr_t)page * (uintptr_t)page;
    if (hi > lo) (void)madvise((void *)lo, hi - lo, MADV_PAGEOUT);
}

// Copies constant weights, scales and (optional) bias into the packed layout; refuses (the session
// then fails to load with this library, and the caller falls back) a shape it does not take.
OrtStatus *nbits_pack(Kernel *kn, const uint8_t *w, const float *scales, const float *bias_src) {
    const int64_t k = kn->k, n = kn->n, bits = kn->bits, block = kn->block;
    if (k % (bits == 8 ? 4 : 8) || block % 8) return fail("MatMulNBits (autoglm): K or block not a multiple of 8");
    kn->nb = (k + block - 1) / block;
    kn->n_pad = (n + 63) / 64 * 64;
    kn->group = kn->isa == ISA_AVX2 ? AVX2_GROUP : PANEL_STEP / 64;
    const int64_t step = 64 * kn->group;
    const int64_t blob = block * bits / 8, panel_bytes = k * bits / 8 * 16;
    kn->packed = arena_alloc((size_t)(kn->n_pad / 16 * panel_bytes));  // zeroed: padding columns stay 0
    kn->pscales = arena_alloc(sizeof(float) * (size_t)(kn->n_pad * kn->nb));  // zeroed
    if (!kn->packed || !kn->pscales) return fail("MatMulNBits (autoglm): out of memory");
    for (int64_t c = 0; c < n; c++) {
        uint8_t *lane = (uint8_t *)nbits_panel(kn, c / 16) + c % 16 * 4;
        for (int64_t b = 0; b < kn->nb; b++) {
            const uint8_t *src = w + (c * kn->nb + b) * blob;
            const int64_t start = b * block, len = k - start < block ? k - start : block;
            // start is a multiple of 8 and len of 4 (8 bits) or 8 (4 bits), as checked above: whole groups.
            if (bits == 8) {
                for (int64_t o = 0; o < len; o += 4) memcpy(lane + ((start + o) >> 2) * step, src + o, 4);
            } else {
                // Source bytes s0..s3 hold elements e0..e7 (low nibble first); the panel wants
                // e0..e3 in the low nibbles of its 4 bytes and e4..e7 in the high ones.
                for (int64_t o = 0; o < len; o += 8) {
                    const uint8_t *g = src + o / 2;
                    const uint8_t four[4] = {
                        (uint8_t)((g[0] & 0x0F) | (g[2] << 4)),
                        (uint8_t)((g[0] >> 4) | (g[2] & 0xF0)),
                        (uint8_t)((g[1] & 0x0F) | (g[3] << 4)),
                        (uint8_t)((g[1] >> 4) | (g[3] & 0xF0)),
                    };
                    memcpy(lane + ((start + o) >> 3) * step, four, 4);
                }
            }
            ((float *)nbits_panel_scales(kn, c / 16))[b * 16 * kn->group + c % 16] = scales[c * kn->nb + b];
        }
    }
    // The AVX2 tile multiplies 8-bit weights as signed bytes (vpsignb/vpmaddubsw: an unsigned
    // w + 128 times an int8 activation can saturate the pair sums).
    if (kn->isa == ISA_AVX2 && bits == 8)
        for (size_t i = 0; i < (size_t)(kn->n_pad / 16 * panel_bytes); i++) kn->packed[i] ^= 0x80;
    CHECK(kernel_bias(kn, bias_src));
    nbits_drop_source(w, (size_t)(n * kn->nb * blob));
    nbits_drop_source(scales, sizeof(float) * (size_t)(n * kn->nb));
    return NULL;
}

OrtStatus *kernel_bias(Kernel *kn, const float *bias) {
    if (!bias) return NULL;
    kn->bias = malloc(sizeof(float) * (size_t)kn->n);
    if (!kn->bias) return fail("MatMulNBits (autoglm): out of memory");
    memcpy(kn->bias, bias, sizeof(float) * (size_t)kn->n);
    return NULL;
}

void nbits_release(Kernel *kn) { arena_free(kn->packed), arena_free(kn->pscales), free(kn->bias); }

OrtStatus *nbits_attributes(const OrtKernelInfo *info, Kernel *kn) {
    CHECK(attribute(info, "K", &kn->k));
    CHECK(attribute(info, "N", &kn->n));
    CHECK(attribute(info, "bits", &kn->bits));
    CHECK(attribute(info, "block_size", &kn->block));
    if (kn->bits != 8 && kn->bits != 4) return fail("MatMulNBits (autoglm): only 8 and 4 bits");
    // A block's int32 sum is at most block x 255 x 127 (+ the zero-point term): blocks beyond
    // 8192 could overflow it.
    if (kn->k < 1 || kn->n < 1 || kn->block < 16 || kn->block > 8192)
        return fail("MatMulNBits (autoglm): K, N or block_size out of range");
    kn->isa = kernels_isa();
    kn->prefetch = kernels_prefetch();
    if (kn->isa == ISA_NONE) return fail("MatMulNBits (autoglm): this CPU has neither AVX-512 VNNI nor AVX2");
    kn->amx = kn->isa == ISA_AVX512 && kn->k % 64 == 0 && kn->block % 64 == 0 && kn->block <= AMX_MAX_BLOCK &&
              kernels_amx();
    return NULL;
}

// The node's input `index` as a constant (an initializer), or the message `what`.
static OrtStatus *constant_value(const OrtKernelInfo *info, size_t index, const char *what, const OrtValue **value) {
    int constant = 0;
    *value = NULL;
    CHECK(ort->KernelInfoGetConstantInput_tensor(info, index, &constant, value));
    return constant && *value ? NULL : fail(what);
}

OrtStatus *nbits_constant(const OrtKernelInfo *info, size_t index, const void **data) {
    const OrtValue *value;
    CHECK(constant_value(info, index, "MatMulNBits (autoglm): weights, scales and bias must be constant", &value));
    return ort->GetTensorMutableData((OrtValue *)value, (void **)data);
}

OrtStatus *constant_floats(const OrtKernelInfo *info, size_t index, const char *what, const float **data,
                           int64_t dims[8], size_t *rank) {
    const OrtValue *value;
    CHECK(constant_value(info, index, what, &value));
    OrtTensorTypeAndShapeInfo *shape;
    CHECK(ort->GetTensorTypeAndShape(value, &shape));
    ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
    OrtStatus *status = ort->GetTensorElementType(shape, &type);
    if (!status) status = ort->GetDimensionsCount(shape, rank);
    if (!status && (*rank < 1 || *rank > 8)) status = fail(what);
    if (!status) status = ort->GetDimensions(shape, dims, *rank);
    ort->ReleaseTensorTypeAndShapeInfo(shape);
    if (status) return status;
    if (type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) return fail(what);
    return ort->GetTensorMutableData((OrtValue *)value, (void **)data);
}

// MatMulNBits' inputs: A, B, scales, zero_points, g_idx, bias. Reads the constant ones and packs them.
static OrtStatus *pack(const OrtKernelInfo *info, Kernel *kn) {
    const void *values[6] = {0};
    size_t inputs = 0;
    CHECK(ort->KernelInfo_GetInputCount(info, &inputs));
    for (size_t i = 1; i < inputs && i < 6; i++) {
        char name[256];
        size_t size = sizeof name;
        CHECK(ort->KernelInfo_GetInputName(info, i, name, &size));
        if (!name[0]) continue;
        if (i == 3 || i == 4) return fail("MatMulNBits (autoglm): zero points and g_idx are not supported");
        CHECK(nbits_constant(info, i, &values[i]));
    }
    if (!values[1] || !values[2]) return fail("MatMulNBits (autoglm): no weights or scales");
    return nbits_pack(kn, values[1], values[2], values[5]);
}

static OrtStatus *ORT_API_CALL create(const OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info,
                                      void **out) {
    (void)op, (void)api;
    Kernel kn = {0};
    CHECK(nbits_attributes(info, &kn));
    OrtStatus *status = pack(info, &kn);
    Kernel *kernel = status ? NULL : malloc(sizeof kn);
    if (!kernel) {
        nbits_release(&kn);
        return status ? status : fail("MatMulNBits (autoglm): out of memory");
    }
    *kernel = kn;
    *out = kernel;
    return NULL;
}

static void ORT_API_CALL destroy(void *op_kernel) {
    if (op_kernel) nbits_release(op_kernel);
    free(op_kernel);
}

static const char *ORT_API_CALL op_name(const OrtCustomOp *op) { return (void)op, "MatMulNBits"; }
static size_t ORT_API_CALL input_count(const OrtCustomOp *op) { return (void)op, 6; }
static size_t ORT_API_CALL output_count(const OrtCustomOp *op) { return (void)op, 1; }

static ONNXTensorElementDataType ORT_API_CALL input_type(const OrtCustomOp *op, size_t index) {
    (void)op;
    switch (index) {
        case 1: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
        case 3: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
        case 4: return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
        default: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    }
}

static OrtCustomOpInputOutputCharacteristic ORT_API_CALL input_kind(const OrtCustomOp *op, size_t index) {
    return (void)op, index < 3 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
}

static OrtMemType ORT_API_CALL input_memory(const OrtCustomOp *op, size_t index) {
    return (void)op, (void)index, OrtMemTypeDefault;
}

DEFINE_CUSTOM_OP(matmul_nbits_op)

#endif
