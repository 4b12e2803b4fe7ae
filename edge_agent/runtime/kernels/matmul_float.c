// Float weights (an fp32 graph's matmuls) in the same Kernel as MatMulNBits' (bits 32): packing
// and the two tiles. matmul_nbits_fused.c's ai.autoglm ops MatMulFloat, MatMulFloatSwiGLU,
// SkipRMSNormMatMulFloat(Bias) and SkipRMSNormSwiGLUFloat run them (the packager writes an fp32 graph's
// MatMuls with constant weights as those: cloud/packaging/nbits_fusion.py).
//
// Why: onnxruntime's MatMul (MLAS, its weights prepacked) streamed an fp32 decode step's weights
// below llama.cpp's rate (SmolLM2, AMD EPYC Zen 5 VM: 37.4 GB/s against 40.6; our int8 kernel,
// one sequential stream per task, 39.8), and an fp32 layer ran ten nodes where an int8 one runs
// five (the norms and the gated MLP's activation folded into the matmuls).
//
// How: at session start the weights [K][N] are copied into column groups stored k by k: for the
// AVX-512 tile 64 columns (256 bytes per k: one sequential stream per task, as MatMulNBits' groups
// of four interleaved panels), for the AVX2 tile 16 (a panel, 64 bytes per k: its 16 registers
// hold 6 rows x 16 columns of sums, two weight vectors and a broadcast). A register tile is 1-4
// rows in a decode-sized call, up to 6 in a prefill; each weight load is used by every row of the
// tile. A call of more than 4 rows (a prefill) runs K in blocks of FLOAT_KB (the group's
// block stays in L2 while every row tile reads it), the partial sums stored in the output between
// blocks. Every output is one chain of fused multiply-adds over k = 0..K-1 from zero, in both tiles
// and at any number of rows: a column's value is bit for bit the same on AVX-512 and AVX2 and
// whatever decodes beside its row (the sums differ from MLAS's, which blocks K otherwise); a bias
// (Kernel.bias) is added to the whole sum as it is stored, as the Add after a MatMul would.
#include "kernels.h"

#if defined(__x86_64__)
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "matmul_nbits.h"

#ifndef FLOAT_KB  // -DFLOAT_KB=N and -DFLOAT_ROWS=N build others (bench/engine_steps.py compares)
// K block of a prefill: 128 KiB of an AVX-512 group, 32 KiB of an AVX2 panel (Llama-134M on the
// Xeon VM, 6-row tiles: a 512-token prefill 296 ms, 298 at 256, 344 at 128, 283 unblocked, where
// a group's whole K fits its 2 MiB L2; smaller L2s, as Zen's 1 MiB, keep the block).
#define FLOAT_KB 512
#endif
// Bytes ahead of the weights the AVX-512 tile prefetches in a decode call of 2-4 rows on a CPU that
// prefetches (kernels_prefetch PREFETCH_ALL; -1: never). Qwen2-0.5B fp32, Intel Xeon VM
// (bench/engine_steps.py): 4-row steps 84 ms at 2048, 73-74 at 1024 (78 at 512, 90 at 256, 71-73 at
// 0), 1-row steps alike (57-61 ms); a later Xeon VM, Llama-134M: 4-row steps 1.16x faster with
// 1 KiB, 1-row steps 2 % slower. AMD EPYC Zen 4 VM, none against 1024: Llama-134M 1-row steps 4-6 %
// and 4-row 14-17 % faster, SmolLM2 4-row 13-23 % faster, 1-row level (bench/RESULTS.md).
#ifndef FLOAT_PREFETCH
#define FLOAT_PREFETCH 1024
#endif
// The AVX2 tile's (16-column panels), in decode calls of 2-4 rows on every CPU and of one row where
// every call prefetches (PREFETCH_ALL), as MatMulNBits' AVX2 tile (matmul_nbits.h): Llama-134M
// fp32 on the Zen 4 VM with AUTOGLM_KERNELS_ISA=avx2, 1 KiB ahead, 4-row steps 6-7 % faster with
// it and 1-row steps 6 % faster without; on the Xeon VM 1-row steps 1.12x faster with it.
#ifndef FLOAT_AVX2_PREFETCH
#define FLOAT_AVX2_PREFETCH 1024
#endif
#ifndef FLOAT_ROWS
#define FLOAT_ROWS 6  // rows per AVX-512 register tile in a prefill: 24 sums, 4 weights (4 rows: 333 ms above, 6: 316)
#endif

// The columns stored together: 64 on AVX-512, 16 (a panel) on AVX2. A quad (64 columns) is stored
// as one group or as four panels in turn, so a task's columns are contiguous either way.
static int64_t float_width(int isa) { return isa == ISA_AVX512 ? 64 : 16; }

OrtStatus *float_kernel(const OrtKernelInfo *info, size_t index, Kernel *kn) {
    const float *w;
    int64_t dims[8] = {0};
    size_t rank = 0;
    static const char matrix[] = "MatMulFloat (autoglm): the weights must be a constant float matrix [K, N]";
    CHECK(constant_floats(info, index, matrix, &w, dims, &rank));
    if (rank != 2) return fail(matrix);
    *kn = (Kernel){.k = dims[0], .n = dims[1], .bits = 32, .block = dims[0], .nb = 1, .group = 1};
    if (kn->k < 1 || kn->n < 1) return fail("MatMulFloat (autoglm): empty weights");
    kn->isa = kernels_isa();
    kn->prefetch = kernels_prefetch();
    if (kn->isa == ISA_NONE) return fail("MatMulFloat (autoglm): this CPU has neither AVX-512 nor AVX2");
    kn->n_pad = (kn->n + 63) / 64 * 64;
    const int64_t k = kn->k, n = kn->n, width = float_width(kn->isa);
    float *packed = arena_alloc(sizeof(float) * (size_t)(kn->n_pad * k));  // zeroed: padding columns stay 0
    if (!packed) return fail("MatMulFloat (autoglm): out of memory");
    kn->packed = (uint8_t *)packed;
    for (int64_t c0 = 0; c0 < n; c0 += width) {
        float *dst = packed + c0 * k;
        const int64_t cols = n - c0 < width ? n - c0 : width;
        for (int64_t j = 0; j < k; j++) memcpy(dst + j * width, w + j * n + c0, sizeof(float) * (size_t)cols);
    }
    nbits_drop_source(w, sizeof(float) * (size_t)(k * n));
    return NULL;
}

// The row tile for `rows` rows, prefetching (AHEAD) or not.
#define ROWS_AHEAD(TILE, C, AHEAD)                                           \
    switch (rows) {                                                          \
        case 1: TILE(job, w, C, m0, k0, k1, k0 == 0, 1, AHEAD); break;       \
        case 2: TILE(job, w, C, m0, k0, k1, k0 == 0, 2, AHEAD); break;       \
        case 3: TILE(job, w, C, m0, k0, k1, k0 == 0, 3, AHEAD); break;       \
        case 4: TILE(job, w, C, m0, k0, k1, k0 == 0, 4, AHEAD); break;       \
        case 5: TILE(job, w, C, m0, k0, k1, k0 == 0, 5, AHEAD); break;       \
        default: TILE(job, w, C, m0, k0, k1, k0 == 0, 6, AHEAD); break;      \
    }

// Defines NAME, a FloatRows that runs TILE (an instruction set's register tile) for its rows,
// prefetching where WANT (of ahead and rows) holds.
#define FLOAT_ROWS_FN(NAME, TILE, WANT)                                                                       \
    static inline __attribute__((always_inline)) void NAME(const Job *job, const float *w, int64_t c,         \
                                                           int64_t m0, int64_t k0, int64_t k1, int64_t rows, \
                                                           int ahead) {                                       \
        if (WANT) {                                                                                           \
            ROWS_AHEAD(TILE, c, 1)                                                                            \
        } else {                                                                                              \
            ROWS_AHEAD(TILE, c, 0)                                                                            \
        }                                                                                                     \
    }

// Rows [m0, m0 + rows) x `width` columns from c over k in [k0, k1); ahead: 0 a prefill-sized call,
// 1 a decode-sized one, 2 a decode-sized one on a CPU that prefetches (Kernel.prefetch
// PREFETCH_ALL).
typedef void (*FloatRows)(const Job *job, const float *w, int64_t c, int64_t m0, int64_t k0, int64_t k1,
                          int64_t rows, int ahead);

// Task t's columns (its groups of 64: task_quads), `width` at a time (an AVX-512 group, an AVX2
// panel), their rows in tiles of up to SMALL_M in a decode-sized call, else of `tile` rows with K
// in blocks of FLOAT_KB. Inlined into each instruction set's task with its `run`, as quad_task.
static inline __attribute__((always_inline)) void float_task(const Job *job, size_t t, int64_t width, int64_t tile,
                                                             FloatRows run) {
    const int64_t k = job->kernel->k, n = job->kernel->n, m = job->m;
    const int decode = m <= SMALL_M, ahead = job_ahead(job);
    const int64_t kb = decode ? k : FLOAT_KB, per = decode ? SMALL_M : tile;  // a decode step reads a group once
    int64_t first, last;
    task_quads(job, t, &first, &last);
    for (int64_t c = first * 64; c < last * 64 && c < n; c += width) {
        const float *w = (const float *)job->kernel->packed + c * k;
        for (int64_t k0 = 0; k0 < k; k0 += kb) {
            const int64_t k1 = k - k0 < kb ? k : k0 + kb;
            for (int64_t m0 = 0; m0 < m; m0 += per) run(job, w, c, m0, k0, k1, m - m0 >= per ? per : m - m0, ahead);
        }
    }
}

// Rows [m0, m0 + R) x the quad's (or panel's) columns from c, over k in [k0, k1); first: the sums
// start from zero, else from what the output holds (a prefill's earlier K blocks).

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")

static inline __attribute__((always_inline)) void tile512(const Job *job, const float *w, int64_t c, int64_t m0,
                                                          int64_t k0, int64_t k1, int first, const int R,
                                                          const int AHEAD) {
    const Kernel *kn = job->kernel;
    const int64_t k = kn->k, n = kn->n;
    __mmask16 mask[4];
    _Pragma("GCC unroll 4") for (int p = 0; p < 4; p++) {
        const int64_t left = n - c - 16 * p;
        mask[p] = left >= 16 ? (__mmask16)0xFFFF : left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
    }
    __m512 acc[6][4];
    _Pragma("GCC unroll 6") for (int i = 0; i < R; i++) {
        float *y = job->y + (m0 + i) * n + c;
        _Pragma("GCC unroll 4") for (int p = 0; p < 4; p++) acc[i][p] =
            first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(mask[p], y + 16 * p);
    }
    const float *x = job->a + m0 * k;
    for (int64_t j = k0; j < k1; j++) {
        const float *wj = w + j * 64;
        if (AHEAD && FLOAT_PREFETCH >= 0) {
            _Pragma("GCC unroll 4") for (int p = 0; p < 4; p++) _mm_prefetch((const char *)(wj + 16 * p) + FLOAT_PREFETCH, _MM_HINT_T0);
        }
        __m512 v[4];
        _Pragma("GCC unroll 4") for (int p = 0; p < 4; p++) v[p] = _mm512_load_ps(wj + 16 * p);
        _Pragma("GCC unroll 6") for (int i = 0; i < R; i++) {
            const __m512 xb = _mm512_set1_ps(x[i * k + j]);
            _Pragma("GCC unroll 4") for (int p = 0; p < 4; p++) acc[i][p] = _mm512_fmadd_ps(v[p], xb, acc[i][p]);
        }
    }
    if (kn->bias && k1 == k) {  // the last K block: the sums are whole
        _Pragma("GCC unroll 4") for (int p = 0; p < 4; p++) {
            const __m512 b = _mm512_maskz_loadu_ps(mask[p], kn->bias + c + 16 * p);
            _Pragma("GCC unroll 6") for (int i = 0; i < R; i++) acc[i][p] = _mm512_add_ps(acc[i][p], b);
        }
    }
    _Pragma("GCC unroll 6") for (int i = 0; i < R; i++) {
        float *y = job->y + (m0 + i) * n + c;
        _Pragma("GCC unroll 4") for (int p = 0; p < 4; p++) _mm512_mask_storeu_ps(y + 16 * p, mask[p], acc[i][p]);
    }
}

FLOAT_ROWS_FN(rows512, tile512, ahead == 2 && rows > 1)

void float_task_avx512(void *data, size_t t) { float_task(data, t, 64, FLOAT_ROWS, rows512); }

#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")

static inline __attribute__((always_inline)) void tile256(const Job *job, const float *w, int64_t c, int64_t m0,
                                                          int64_t k0, int64_t k1, int first, const int R,
                                                          const int AHEAD) {
    const Kernel *kn = job->kernel;
    const int64_t k = kn->k, n = kn->n;
    __m256i mask[2];
    _Pragma("GCC unroll 2") for (int h = 0; h < 2; h++) {
        const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        mask[h] = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n - c - 8 * h < 8 ? n - c - 8 * h : 8)), lanes);
    }
    __m256 acc[6][2];
    _Pragma("GCC unroll 6") for (int i = 0; i < R; i++) {
        float *y = job->y + (m0 + i) * n + c;
        _Pragma("GCC unroll 2") for (int h = 0; h < 2; h++) acc[i][h] =
            first ? _mm256_setzero_ps() : _mm256_maskload_ps(y + 8 * h, mask[h]);
    }
    const float *x = job->a + m0 * k;
    for (int64_t j = k0; j < k1; j++) {
        const float *wj = w + j * 16;
        if (AHEAD && FLOAT_AVX2_PREFETCH >= 0) _mm_prefetch((const char *)wj + FLOAT_AVX2_PREFETCH, _MM_HINT_T0);
        const __m256 v0 = _mm256_load_ps(wj), v1 = _mm256_load_ps(wj + 8);
        _Pragma("GCC unroll 6") for (int i = 0; i < R; i++) {
            const __m256 xb = _mm256_broadcast_ss(x + i * k + j);
            acc[i][0] = _mm256_fmadd_ps(v0, xb, acc[i][0]);
            acc[i][1] = _mm256_fmadd_ps(v1, xb, acc[i][1]);
        }
    }
    if (kn->bias && k1 == k) {  // the last K block: the sums are whole
        _Pragma("GCC unroll 2") for (int h = 0; h < 2; h++) {
            const __m256 b = _mm256_maskload_ps(kn->bias + c + 8 * h, mask[h]);
            _Pragma("GCC unroll 6") for (int i = 0; i < R; i++) acc[i][h] = _mm256_add_ps(acc[i][h], b);
        }
    }
    _Pragma("GCC unroll 6") for (int i = 0; i < R; i++) {
        float *y = job->y + (m0 + i) * n + c;
        _Pragma("GCC unroll 2") for (int h = 0; h < 2; h++) _mm256_maskstore_ps(y + 8 * h, mask[h], acc[i][h]);
    }
}

FLOAT_ROWS_FN(rows256, tile256, avx2_prefetches(ahead, rows))

// 6 rows in a prefill: 6 x 2 sums, 2 weight vectors and a broadcast in 16 registers.
void float_task_avx2(void *data, size_t t) { float_task(data, t, 16, 6, rows256); }

#pragma GCC pop_options

#endif
