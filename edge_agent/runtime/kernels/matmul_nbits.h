// What MatMulNBits' two tiles share (matmul_nbits.c: packing, the op and the AVX-512 VNNI tile;
// matmul_nbits_avx2.c: the AVX2 tile): the packed weights and one call's quantized activations.
#ifndef AUTOGLM_MATMUL_NBITS_H
#define AUTOGLM_MATMUL_NBITS_H

#include <stddef.h>
#include <stdint.h>

#define SMALL_M 4  // rows per register tile; a call of at most this many quantizes inline
// Bytes ahead of each weight stream prefetched in a decode-sized call: a step runs ~150 small
// matrices, each task starts new streams, and the hardware prefetcher alone ramps up too late
// (Zen 5 VM: 1-row steps 5-6 % and 4-row steps 9-15 % faster; bench/RESULTS.md).
#ifndef PREFETCH  // -DPREFETCH=N builds another distance (bench/engine_steps.py compares libraries)
#define PREFETCH 2048
#endif

typedef struct {
    int64_t k, n, bits, block;
    int64_t nb;          // blocks per column, the last one possibly short (K not a multiple of block)
    int64_t n_pad;       // n rounded up to 64 (four panels per task step)
    uint8_t *packed;     // [n_pad / 16][k * bits / 32][64]: the stored bytes (zero point 2^(bits-1));
                         // the AVX2 tile's 8-bit panels XOR 0x80 (signed: stored - 128)
    float *pscales;      // [n_pad / 16][nb][16]
    float *bias;         // [n] or NULL
    int isa;             // ISA_AVX512 or ISA_AVX2 (kernels.h): the tile that runs it
} Kernel;

typedef struct {
    const Kernel *kernel;
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

// Rows [m0, m0 + rows) of the group of four panels q; ahead: prefetch (decode-sized calls, which
// are memory-bound).
typedef void (*QuadTile)(const Job *job, int64_t q, int64_t m0, int rows, int eight, int ahead);

// One task of the thread pool: groups of four panels (64 columns) [t x quads_per_task, ...), every
// row in tiles of up to SMALL_M. Inlined into each tile file's task with that file's always-inline
// `quad`, so the call is direct and compiled for the file's instruction set.
static inline __attribute__((always_inline)) void quad_task(const Job *job, size_t t, QuadTile quad) {
    const int64_t quads = job->kernel->n_pad / 64, first = (int64_t)t * job->quads_per_task;
    const int64_t last = first + job->quads_per_task < quads ? first + job->quads_per_task : quads;
    const int eight = job->kernel->bits == 8, ahead = job->m <= SMALL_M;
    for (int64_t q = first; q < last; q++)
        for (int64_t m0 = 0; m0 < job->m; m0 += SMALL_M)
            quad(job, q, m0, job->m - m0 >= SMALL_M ? SMALL_M : (int)(job->m - m0), eight, ahead);
}

// matmul_nbits_avx2.c: quad_task with the AVX2 tiles, and one row's quantization.
void packed_task_avx2(void *data, size_t t);
void quantize_task_avx2(void *data, size_t i);

#endif
