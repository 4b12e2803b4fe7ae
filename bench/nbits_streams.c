// How fast MatMulNBits' tile (AVX-512 VNNI, or AVX2 where the CPU has no AVX-512 or
// AUTOGLM_KERNELS_ISA=avx2) streams 1-4 rows' 8-bit and 4-bit weights from memory, outside
// onnxruntime: the library's own packing (nbits_pack) and tasks (nbits_tiles) over
// many matrices of one shape, every task of every matrix run in turn on 1 or 2 threads (each a
// contiguous share, as onnxruntime's pool hands them out), a barrier between matrices.
//
// Why: in a model the two widths' steps differ in more than their weights, and on these VMs the
// memory's speed moves 10-30 % within minutes; here an 8-bit set and a 4-bit set of the same bytes
// (80 matrices of 896 x 4864 and 160 at 4 bits, 360 MB each: Qwen2-0.5B's MLP shape, beyond the
// L3) are timed alternately in one process, and the 4-bit / 8-bit ratio of each round cancels the
// drift. Built with the library's -D options it compares tile variants, e.g. HI16_ROWS=0.
//
// Build and run (from the repository root; 2 threads as the edge bench):
//   K=edge_agent/runtime/kernels
//   gcc -O3 -fvisibility=hidden -I $K/include -I $K bench/nbits_streams.c $K/*.c -o /tmp/nbits_streams -lpthread -lm
//   /tmp/nbits_streams [threads] [rows: 1-4, a parallel-slots step]
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "kernels.h"
#include "matmul_nbits.h"

#define ROUNDS 15

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

typedef struct {
    Job *jobs;
    int mats;
    size_t tasks;
    double bytes;  // packed weights and scales
} Set;

typedef struct {
    const Set *set;
    void (*task)(void *, size_t);
    int thread, threads, passes;
    pthread_barrier_t *barrier;
} Worker;

static void *work(void *data) {
    const Worker *w = data;
    const size_t lo = w->set->tasks * (size_t)w->thread / (size_t)w->threads;
    const size_t hi = w->set->tasks * (size_t)(w->thread + 1) / (size_t)w->threads;
    for (int r = 0; r < w->passes; r++)
        for (int m = 0; m < w->set->mats; m++) {
            for (size_t t = lo; t < hi; t++) w->task(&w->set->jobs[m], t);
            pthread_barrier_wait(w->barrier);
        }
    return NULL;
}

// `mats` matrices K x N of random `bits`-bit weights (scales 0.01, blocks of 128), each packed on
// its own, and `rows` activation rows quantized.
static Set make(int bits, int mats, int64_t k, int64_t n, int rows) {
    const int64_t block = 128, nb = (k + block - 1) / block, blob = block * bits / 8;
    uint8_t *w = malloc((size_t)(n * nb * blob));
    float *s = malloc(sizeof(float) * (size_t)(n * nb)), *x = malloc(sizeof(float) * (size_t)(k * rows));
    float *y = malloc(sizeof(float) * (size_t)(n * rows));
    Kernel *kn = calloc((size_t)mats, sizeof(Kernel));
    Job *jobs = calloc((size_t)mats, sizeof(Job));
    Activations *act = calloc(1, sizeof *act);
    if (!w || !s || !x || !y || !kn || !jobs || !act) abort();
    for (int64_t i = 0; i < n * nb * blob; i++) w[i] = (uint8_t)rand();
    for (int64_t i = 0; i < n * nb; i++) s[i] = 0.01f;
    for (int64_t i = 0; i < k * rows; i++) x[i] = (float)(rand() % 200 - 100) / 100.0f;
    for (int m = 0; m < mats; m++) {
        kn[m] = (Kernel){.k = k, .n = n, .bits = bits, .block = block, .isa = kernels_isa(), .prefetch = kernels_prefetch()};
        if (nbits_pack(&kn[m], w, s, NULL)) abort();  // fails only out of memory (no onnxruntime here)
    }
    if (nbits_quantize(&kn[0], NULL, x, rows, act)) abort();  // up to SMALL_M rows: quantized inline, no pool
    for (int m = 0; m < mats; m++) jobs[m] = nbits_job(&kn[m], act, y, rows);
    free(w), free(s);
    return (Set){jobs, mats, nbits_task_count(&jobs[0]), (double)mats * (double)(k * n * bits / 8 + n * nb * 4)};
}

// GB/s of one timed run of two passes over the set.
static double rate(const Set *set, int threads) {
    pthread_barrier_t barrier;
    pthread_barrier_init(&barrier, NULL, (unsigned)threads);
    pthread_t ids[64];
    Worker workers[64];
    const double t0 = now();
    for (int i = 0; i < threads; i++) {
        workers[i] = (Worker){set, nbits_tiles(set->jobs[0].kernel), i, threads, 2, &barrier};
        pthread_create(&ids[i], NULL, work, &workers[i]);
    }
    for (int i = 0; i < threads; i++) pthread_join(ids[i], NULL);
    const double seconds = (now() - t0) / 2;
    pthread_barrier_destroy(&barrier);
    return set->bytes / seconds / 1e9;
}

static int ascending(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    const int threads = argc > 1 ? atoi(argv[1]) : 2, rows = argc > 2 ? atoi(argv[2]) : 1;
    if (kernels_isa() == ISA_NONE) {
        fprintf(stderr, "needs AVX-512 VNNI or AVX2 (the tiles this times)\n");
        return 1;
    }
    if (threads < 1 || threads > 64 || rows < 1 || rows > SMALL_M) return 1;
    const Set eight = make(8, 80, 896, 4864, rows), four = make(4, 160, 896, 4864, rows);
    double r8[ROUNDS], r4[ROUNDS], q[ROUNDS];
    for (int i = 0; i < ROUNDS; i++) {
        r8[i] = rate(&eight, threads);
        r4[i] = rate(&four, threads);
        q[i] = r4[i] / r8[i];
    }
    qsort(r8, ROUNDS, sizeof(double), ascending);
    qsort(r4, ROUNDS, sizeof(double), ascending);
    qsort(q, ROUNDS, sizeof(double), ascending);
    printf("%s tile, %d threads, %d row%s, %.0f MB per set: 8-bit %.1f GB/s, 4-bit %.1f GB/s (medians of %d); "
           "4-bit / 8-bit per round %.3f (interquartile %.3f-%.3f)\n",
           kernels_isa() == ISA_AVX512 ? "AVX-512" : "AVX2", threads, rows, rows > 1 ? "s" : "", eight.bytes / 1e6, r8[ROUNDS / 2], r4[ROUNDS / 2], ROUNDS, q[ROUNDS / 2], q[ROUNDS / 4],
           q[3 * ROUNDS / 4]);
    return 0;
}
