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

// matmul_nbits_avx2.c: a task of quads (packed_task's contract) and one row's quantization.
void packed_task_avx2(void *data, size_t t);
void quantize_task_avx2(void *data, size_t i);

#endif
