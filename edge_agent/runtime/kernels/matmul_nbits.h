// What MatMulNBits' two tiles share (matmul_nbits.c: packing, the op and the AVX-512 VNNI tile;
// matmul_nbits_avx2.c: the AVX2 tile): the packed weights and one call's quantized activations.
#ifndef AUTOGLM_MATMUL_NBITS_H
#define AUTOGLM_MATMUL_NBITS_H

#include <stddef.h>
#include <stdint.h>

#include "kernels.h"

#define SMALL_M 4  // rows per register tile; a call of at most this many quantizes inline
// Rows per AMX tile (AMX's most). A call that runs AMX tiles (more than SMALL_M rows, Kernel.amx)
// quantizes its activations into AMX_ROWS - 1 zeroed rows more: the last tile loads 16 rows.
#define AMX_ROWS 16
// The longest block the AMX tile takes (its widened 4-bit weights, 32 KiB): longer ones run VNNI.
#define AMX_MAX_BLOCK 512
// Bytes ahead of each panel the AVX-512 tile prefetches in a decode-sized call where every such
// call prefetches (kernels_prefetch PREFETCH_ALL: Intel; -1: never). With each panel stored
// whole a task read four streams at once, and 2 KiB ahead made 1-row steps 5-6 % and 4-row steps
// 9-15 % faster (Zen 5 VM). Since a task reads one sequential stream (the interleaved groups
// below), AMD's prefetchers follow it alone and the software prefetches only take load slots
// (Zen 4 VM: 1-row steps 6-18 % faster without them; a lone 8-bit row aside: LONE_PREFETCH),
// while Intel's still need them (Xeon VM: Qwen2-0.5B int4 and int8 1-row steps 1.28x and 1.10x,
// 4-row steps 1.40x and 1.30x faster with them; bench/RESULTS.md).
// Into L2 (PREFETCH_HINT), 6 KiB ahead: on a second Xeon VM, whose decode steps read the weights
// at the VM's read ceiling, prefetches into L1 2 KiB ahead held a task's load slots long enough
// that a lone int8 row ran 7 % slower with them than without; into L2, 4-8 KiB ahead, Qwen2-0.5B
// int4 1-row and 4-row steps were 1.10-1.20x faster than with those, int8 4-row 1.10-1.15x and 1-row level to 5 %,
// SmolLM2 int8 4-8 % / 12-19 %; Llama-134M level to 11 % faster but int4 4-row 3-4 % slower).
#ifndef PREFETCH  // -DPREFETCH=N builds another distance (bench/engine_steps.py compares libraries)
#define PREFETCH 6144
#endif
// Where only lone 8-bit rows prefetch (PREFETCH_LONE_INT8, AMD), 3 KiB ahead (-1: never): on the
// Zen 4 VM Llama-134M int8 1-row steps were 1.07-1.17x faster with 2, 3 or 4 KiB, level with
// 6 KiB, and Qwen2-0.5B int8's (at the VM's read ceiling either way) level (bench/RESULTS.md).
#ifndef LONE_PREFETCH
#define LONE_PREFETCH 3072
#endif
#ifndef PREFETCH_HINT  // -DPREFETCH_HINT=_MM_HINT_T0 builds another level (comparisons)
#define PREFETCH_HINT _MM_HINT_T1
#endif
// The AVX2 tile (matmul_nbits_avx2.c) reads a panel at a time and spends more instructions per
// byte; in a call of 2-4 rows its stream runs slower than the memory and a prefetch 2 KiB ahead
// keeps it fed, while a lone row is faster without (the same Zen 4 VM, AUTOGLM_KERNELS_ISA=avx2:
// 4-row steps 2-4 % faster with it, 1-row steps 0-16 % faster without). So: 2-4 rows on every
// CPU, a lone row too where every call prefetches (PREFETCH_ALL; Xeon VM,
// AUTOGLM_KERNELS_ISA=avx2: Qwen2-0.5B int4 1-row steps 1.21x faster with it; bench/RESULTS.md).
#ifndef AVX2_PREFETCH
#define AVX2_PREFETCH 2048
#endif

// The packed weights of one matrix: 8 or 4 bits (MatMulNBits' layout, below), or 32 (float
// weights, matmul_float.c: groups of 64 columns stored k by k on AVX-512, panels of 16 on AVX2;
// no scales, block = k, nb = 1).
typedef struct {
    int64_t k, n, bits, block;
    int64_t nb;          // blocks per column, the last one possibly short (K not a multiple of block)
    int64_t n_pad;       // n rounded up to 64 (four panels per task step)
    uint8_t *packed;     // [n_pad / 16 / group][k * bits / 32][group][64]: the stored bytes (zero point
                         // 2^(bits-1)), a group's panels interleaved (nbits_panel); the AVX2 tile's
                         // 8-bit panels XOR 0x80 (signed: stored - 128)
    float *pscales;      // [n_pad / 16 / group][nb][group][16]
    float *bias;         // [n] or NULL
    int isa;             // ISA_AVX512 or ISA_AVX2 (kernels.h): the tile that runs it
    int64_t group;       // panels stored interleaved: 4 (PANEL_STEP / 64) for AVX-512, AVX2_GROUP for AVX2
    int amx;             // calls of more than SMALL_M rows run matmul_nbits_amx.c's tile (K and block multiples of
                         // 64, block at most AMX_MAX_BLOCK)
    int prefetch;        // which decode-sized calls prefetch the weights (kernels_prefetch: PREFETCH_*)
} Kernel;

// The AVX-512 tiles' panels are stored interleaved four at a time (a group: 64 columns, what a
// tile reads), 64 bytes of each panel in turn: a task reads its groups as one sequential stream
// (PANEL_STEP bytes per step of 4 elements at 8 bits, 8 at 4 bits) rather than four streams of
// one panel each, and a block's scales as 256 contiguous bytes. A decode step runs ~150 small
// matrices, and a new stream is at the memory's pace only once the prefetchers have followed it
// for a while (Zen 5 VM: 1-row decode steps 1.10-1.18x and 4-row steps 1.15-1.26x faster than
// with each panel stored whole; bench/RESULTS.md). The AVX2 tile's panels stay whole (a group of
// one, AVX2_STEP): it reads 3-4 rows one panel at a time (its 16 registers hold no more sums),
// and read interleaved that way a 4-row step ran 1.2-1.7x slower.
#define PANEL_STEP 256
#ifndef AVX2_GROUP  // -DAVX2_GROUP=2 or 4 builds the AVX2 tile over interleaved groups (benchmarks)
#define AVX2_GROUP 1
#endif
#define AVX2_STEP (64 * AVX2_GROUP)
// Panel `panel`'s first 64 bytes (its next ones kn->group x 64 apart) and its block-0 scales (the
// next block's kn->group x 16 floats on).
static inline const uint8_t *nbits_panel(const Kernel *kn, int64_t panel) {
    return kn->packed + panel / kn->group * kn->group * (kn->k * kn->bits / 8 * 16) + panel % kn->group * 64;
}
static inline const float *nbits_panel_scales(const Kernel *kn, int64_t panel) {
    return kn->pscales + panel / kn->group * kn->nb * 16 * kn->group + panel % kn->group * 16;
}

typedef struct {
    const Kernel *kernel;
    const float *a;       // [m][k]: float weights multiply the activations themselves
    const int8_t *xq;     // [m][k]
    const float *xs;      // [m][nb]
    const int32_t *corr;  // [m][nb]: -zero point x the block's sum of xq
    float *y;             // [m][n]
    int64_t m;
    int64_t quads_per_task;  // groups of four panels (64 columns)
} Job;

typedef struct {
    const Kernel *kernel;
    const float *a;
    int8_t *xq;
    float *xs;
    int32_t *corr;
} Quantize;

// Rows [m0, m0 + rows) of the group of four panels q; ahead: 0 a prefill-sized call, 1 a
// decode-sized one, 2 a decode-sized one where every such call prefetches (Kernel.prefetch
// PREFETCH_ALL); each tile decides from it whether to prefetch (PREFETCH, LONE_PREFETCH,
// AVX2_PREFETCH).
typedef void (*QuadTile)(const Job *job, int64_t q, int64_t m0, int rows, int eight, int ahead);

// A call's `ahead` (QuadTile, and matmul_float.c's FloatRows).
static inline int job_ahead(const Job *job) {
    return job->m <= SMALL_M ? 1 + (job->kernel->prefetch == PREFETCH_ALL) : 0;
}

// Whether an AVX2 tile prefetches (AVX2_PREFETCH, FLOAT_AVX2_PREFETCH) `rows` rows of a call with
// this `ahead`: 2-4 rows of a decode call on every CPU, a lone row where every call prefetches
// (PREFETCH_ALL).
static inline int avx2_prefetches(int ahead, int64_t rows) { return ahead == 2 || (ahead == 1 && rows > 1); }

// The groups of four panels (64 columns) task t computes: [*first, *last).
static inline void task_quads(const Job *job, size_t t, int64_t *first, int64_t *last) {
    const int64_t quads = job->kernel->n_pad / 64;
    *first = (int64_t)t * job->quads_per_task;
    *last = *first + job->quads_per_task < quads ? *first + job->quads_per_task : quads;
}

// One task of the thread pool: groups of four panels (64 columns) [t x quads_per_task, ...), every
// row in tiles of up to SMALL_M. Inlined into each tile file's task with that file's always-inline
// `quad`, so the call is direct and compiled for the file's instruction set.
static inline __attribute__((always_inline)) void quad_task(const Job *job, size_t t, QuadTile quad) {
    int64_t first, last;
    task_quads(job, t, &first, &last);
    const int eight = job->kernel->bits == 8, ahead = job_ahead(job);
    for (int64_t q = first; q < last; q++)
        for (int64_t m0 = 0; m0 < job->m; m0 += SMALL_M)
            quad(job, q, m0, job->m - m0 >= SMALL_M ? SMALL_M : (int)(job->m - m0), eight, ahead);
}

#if defined(__x86_64__)
#include <immintrin.h>

// The float steps of both AVX-512 tiles (matmul_nbits.c's VNNI tile, matmul_nbits_amx.c's AMX
// tile), one definition so that their outputs stay bit for bit equal. A block's int32 sums `a`
// (the zero-point correction included) times weight scale x activation scale, added to the
// column sums f:
static inline __attribute__((always_inline, target("avx512f,avx512bw,avx512vl,avx512vnni,fma"))) __m512
nbits_block_step(__m512 f, __m512i a, __m512 scale, float xs) {
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), _mm512_mul_ps(scale, _mm512_set1_ps(xs)), f);
}

// and row `row`'s outputs of the panel at column c < n: its column sums f plus the bias, masked
// past n.
static inline __attribute__((always_inline, target("avx512f,avx512bw,avx512vl,avx512vnni,fma"))) void
nbits_store_panel(const Job *job, int64_t row, int64_t c, __m512 f) {
    const Kernel *kn = job->kernel;
    const __mmask16 mask = kn->n - c >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (kn->n - c)) - 1);
    const __m512 bias = kn->bias ? _mm512_maskz_loadu_ps(mask, kn->bias + c) : _mm512_setzero_ps();
    _mm512_mask_storeu_ps(job->y + row * kn->n + c, mask, _mm512_add_ps(f, bias));
}
#endif

// Whether a call of m rows with kn runs matmul_nbits_amx.c's tiles (and so quantizes its activations
// into AMX_ROWS - 1 zeroed rows more); the others run the VNNI tile.
static inline int nbits_runs_amx(const Kernel *kn, int64_t m) { return kn->amx && m > SMALL_M; }

// The tasks of each tile: matmul_nbits.c (AVX-512 VNNI), matmul_nbits_amx.c (AMX for calls of more
// than SMALL_M rows, the VNNI tile for the others), matmul_nbits_avx2.c (AVX2, which also quantizes
// a row for AVX2 CPUs).
void packed_task_avx512(void *data, size_t t);
void packed_task_amx(void *data, size_t t);
void packed_task_avx2(void *data, size_t t);
void quantize_task_avx2(void *data, size_t i);

// One call's activations quantized per weight block (what a Job reads), or for float weights the
// activations themselves (a).
typedef struct {
    const float *a;
    int8_t *xq;
    float *xs;
    int32_t *corr;
} Activations;

// matmul_nbits.c, for every op that multiplies by packed weights (MatMulNBits, and the fused ops
// of matmul_nbits_fused.c):
// K, N, bits and block_size from the node's attributes, checked, and the CPU's instruction set.
OrtStatus *nbits_attributes(const OrtKernelInfo *info, Kernel *kn);
// The data of the node's input `index`, which must be a constant (an initializer).
OrtStatus *nbits_constant(const OrtKernelInfo *info, size_t index, const void **data);
// Packs MatMulNBits-layout weights and scales (and a bias, or NULL) into kn's panels.
OrtStatus *nbits_pack(Kernel *kn, const uint8_t *w, const float *scales, const float *bias);
// A copy of n floats of bias beside kn's packed weights (the tiles add it as they store; NULL: none).
OrtStatus *kernel_bias(Kernel *kn, const float *bias);
void nbits_release(Kernel *kn);
// Asks the kernel to reclaim a constant input's pages once it is packed (never read again).
void nbits_drop_source(const void *p, size_t len);

// The data of the node's input `index`, which must be a constant float tensor of rank 1 to 8, and
// its dimensions; fails with the message `what` where it is not.
OrtStatus *constant_floats(const OrtKernelInfo *info, size_t index, const char *what, const float **data,
                           int64_t dims[8], size_t *rank);

// matmul_float.c: a Kernel of float weights from the node's constant input `index` (a float
// matrix [K, N]), packed for this CPU's tile, and the tasks of its two tiles (nbits_tiles).
OrtStatus *float_kernel(const OrtKernelInfo *info, size_t index, Kernel *kn);
void float_task_avx512(void *data, size_t t);
void float_task_avx2(void *data, size_t t);
// Input `index`, its shape (rank 1 to 8) and its element count.
OrtStatus *nbits_shape(OrtKernelContext *context, size_t index, const OrtValue **value, int64_t dims[8],
                       size_t *rank, size_t *count);
// The op's input A [..., K] as m rows and its output [..., N], made.
OrtStatus *nbits_io(const Kernel *kn, OrtKernelContext *context, const float **a, float **y, int64_t *m);
// Quantizes m rows of a (in parallel for a prefill); nbits_free releases them.
OrtStatus *nbits_quantize(const Kernel *kn, OrtKernelContext *context, const float *a, int64_t m, Activations *act);
void nbits_free(Activations *act);
// y [m][n] = the quantized activations times kn's weights, on the thread pool.
OrtStatus *nbits_multiply(const Kernel *kn, OrtKernelContext *context, const Activations *act, float *y, int64_t m);
// What nbits_multiply runs, for ops that run more per task: a job writing y [m][n], its number
// of thread-pool tasks, and the task that runs them on this kernel's instruction set.
Job nbits_job(const Kernel *kn, const Activations *act, float *y, int64_t m);
size_t nbits_task_count(const Job *job);
void (*nbits_tiles(const Kernel *kn))(void *, size_t);

// arena.c: zeroed memory for packed weights and scales, in transparent huge pages where the
// kernel has them; arena_free takes what arena_alloc gave.
void *arena_alloc(size_t bytes);
void arena_free(void *p);

// matmul_nbits_avx2.c: y[i] = silu(g[i]) x y[i] = g[i] / (1 + e^-g[i]) x y[i] for n floats, AVX2
// (every CPU the library runs on has it), elementwise: a row's result does not depend on the rows
// beside it.
void silu_mul_avx2(const float *g, float *y, int64_t n);
// sum = a + skip and normed = sum / sqrt(mean(sum^2) + epsilon) x gamma over one row of k floats
// (SkipSimplifiedLayerNormalization), AVX2; the mean's sum runs in the same order for every row.
void skip_rms_norm_avx2(const float *a, const float *skip, const float *gamma, float epsilon, int64_t k, float *sum,
                        float *normed);

#endif
