// GroupQueryAttention's vector routines, one set per instruction set (attention_avx512.c,
// attention_avx2.c); group_query_attention.c (the op: its checks, the KV writes, the tasks)
// calls the set kernels_isa chose when the session was made.
#ifndef AUTOGLM_GROUP_QUERY_ATTENTION_H
#define AUTOGLM_GROUP_QUERY_ATTENTION_H

#include <stdint.h>

#define TILE 4  // query rows per register tile

typedef struct {
    // Scores of `rows` query rows (q: [rows][h]) against keys [lo, hi] ([key][h] rows of a float
    // cache, or of a half-precision one for scores_group_half), a block of keys at a time read
    // once for every row; row r's scores at scores + r * sstride. A decode step's heads and a
    // prompt's rows both: each score is summed the same way whatever the rows beside it.
    void (*scores_group)(const float *q, int rows, const void *keys, int64_t h, int64_t lo, int64_t hi,
                         float *scores, int64_t sstride);
    void (*scores_group_half)(const float *q, int rows, const void *keys, int64_t h, int64_t lo, int64_t hi,
                              float *scores, int64_t sstride);
    // Softmax of scores[lo, hi] in place; every other score of [0, end) set to 0 (end: the keys
    // the tile's value loop reads).
    void (*softmax)(float *scores, int64_t lo, int64_t hi, int64_t end);
    // out[r] = sum over keys [lo, hi] of p[r][j] x values[j] ([key][h] rows, float or, for
    // values_tile_half, half), for `rows` rows.
    void (*values_tile)(const float *p, int64_t pstride, const void *values, int64_t h, int64_t lo, int64_t hi,
                        float *out, int64_t ostride, int rows);
    void (*values_tile_half)(const float *p, int64_t pstride, const void *values, int64_t h, int64_t lo, int64_t hi,
                             float *out, int64_t ostride, int rows);
} AttentionKernels;

// The *_prefetch tables: the same routines, prefetching the cache a decode step reads
// (prefetch_l2), on every CPU unless kernels_prefetch says none (PREFETCH_NONE). Intel's first;
// on AMD's, where the weights' stream is left to the hardware prefetchers, a layer's short KV
// reads are not: Zen 4 VM, SmolLM2 int4 (float16 cache) 4-row steps 3-5 % faster at position
// 300, 5-9 % at 1000, 5-6 % at 2000, int8 at 1000 2-7 %; 1-row steps level (-3 to +8 %), bench/RESULTS.md.
extern const AttentionKernels attention_avx512, attention_avx512_prefetch, attention_avx2, attention_avx2_prefetch;

// Bytes ahead of the keys and values a decode step reads (each file's scores_group and values_cols)
// that the prefetching routines ask into L2: in the graph each layer's cache comes from L3, the
// weights streamed since having evicted it from L2, and the hardware prefetchers alone leave the
// reads short of it (Intel Xeon VM, SmolLM2 int8 at position 2000: 1-row steps 1.11-1.17x, 4-row
// 1.18-1.23x faster with 4 KiB; with the AVX2 routines 1.13-1.17x and 1.17-1.21x; bench/RESULTS.md).
#define ATTN_PREFETCH 4096

// `bytes` bytes from `at` + ATTN_PREFETCH into L2 (locality 2: prefetcht1), a line at a time.
static inline __attribute__((always_inline)) void prefetch_l2(const void *at, int64_t bytes) {
    for (int64_t l = 0; l < bytes; l += 64) __builtin_prefetch((const char *)at + ATTN_PREFETCH + l, 0, 2);
}

// An instruction set's two tables, attention_ISA and attention_ISA_prefetch, from its file's
// scores_group(..., half, pf), values_rows(..., half, pf) and softmax ## TAG
// (`half`: a half-precision cache; `pf`: prefetching). Used once at the end of each file.
#define ATTENTION_SCORES(name, half, pf)                                                                            \
    static void name(const float *q, int rows, const void *keys, int64_t h, int64_t lo, int64_t hi, float *scores, \
                     int64_t sstride) {                                                                            \
        scores_group(q, rows, keys, h, lo, hi, scores, sstride, half, pf);                                         \
    }
#define ATTENTION_VALUES(name, half, pf)                                                                           \
    static void name(const float *p, int64_t pstride, const void *values, int64_t h, int64_t lo, int64_t hi,      \
                     float *out, int64_t ostride, int rows) {                                                     \
        values_rows(p, pstride, values, h, lo, hi, out, ostride, rows, half, pf);                                 \
    }
#define ATTENTION_TABLES(ISA, TAG)                                                                                      \
    ATTENTION_SCORES(scores_group##TAG, 0, 0)                                                                           \
    ATTENTION_SCORES(scores_group##TAG##h, 1, 0)                                                                        \
    ATTENTION_SCORES(scores_group##TAG##_pf, 0, 1)                                                                      \
    ATTENTION_SCORES(scores_group##TAG##h_pf, 1, 1)                                                                     \
    ATTENTION_VALUES(values_tile##TAG, 0, 0)                                                                            \
    ATTENTION_VALUES(values_tile##TAG##h, 1, 0)                                                                         \
    ATTENTION_VALUES(values_tile##TAG##_pf, 0, 1)                                                                       \
    ATTENTION_VALUES(values_tile##TAG##h_pf, 1, 1)                                                                      \
    const AttentionKernels attention_##ISA = {scores_group##TAG, scores_group##TAG##h, softmax##TAG,                   \
                                              values_tile##TAG, values_tile##TAG##h};                                  \
    const AttentionKernels attention_##ISA##_prefetch = {scores_group##TAG##_pf, scores_group##TAG##h_pf, softmax##TAG, \
                                                         values_tile##TAG##_pf, values_tile##TAG##h_pf};

#endif
