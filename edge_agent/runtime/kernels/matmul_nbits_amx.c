// MatMulNBits' tile for CPUs with AMX (Intel Xeon since Sapphire Rapids), for calls of more than 4
// rows (prefills); decode steps of 1-4 rows keep the AVX-512 VNNI tile (matmul_nbits.c).
//
// Why: with VNNI every row costs one dpbusd per 4 elements of 16 columns, so a prefill's matmuls
// are bound by those multiplies (one or two 512-bit dpbusd per cycle: two on the model-167 Xeon
// VM). One AMX tdpbsud (8-bit weights) or tdpbssd (4-bit) multiplies up to 16 rows by 64 elements
// of 16 columns: a 512-token SmolLM2 prefill ran 1.26x (int4) and 1.32x (int8) as fast on an Intel
// Xeon VM, one 4096 x 4096 matrix 2-2.8x for 16-256 rows (bench/RESULTS.md).
//
// How: the packed panels are already AMX's B layout (16 columns x 4 consecutive elements per 64
// bytes; 4-bit panels are widened to signed bytes, less their zero point, in scratch tiles first).
// Per weight block, the four panels' sums of a group of 64 columns are four accumulator tiles; each
// block's int32 sums then take the same float steps as the VNNI tile's: the block's zero-point
// correction added (the widened 4-bit weights' sums hold it already), times weight scale x
// activation scale, added to the column's float sum. So every output is bit for bit what the VNNI
// tile computes (integer sums are exact in any order): a row's result does not depend on how many
// rows share the call or which tile ran it.
//
// Only for weights whose K and block size are multiples of 64 (one tile's depth), blocks of at most
// AMX_MAX_BLOCK; others keep VNNI.
// Linux hands a process the AMX state only when asked (arch_prctl ARCH_REQ_XCOMP_PERM, kernel
// 5.16+); where it refuses, or AUTOGLM_KERNELS_AMX=0 is set, the VNNI tile runs.
#include "kernels.h"

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "matmul_nbits.h"

#define NP 4         // panels (16 columns each) per group: the four accumulator tiles

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

// GCC 11 and clang 12 first took the AMX intrinsics; an older compiler builds a library that never
// uses AMX (packed_task_amx is then never chosen). (Their assembler must know AMX too: binutils
// 2.36 or later, as every distribution shipping those compilers has.)
#if (defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11)
#define HAVE_AMX 1
#else
#define HAVE_AMX 0
#endif

int kernels_amx(void) {
    static int granted = -1;  // a race here repeats an idempotent request
    if (!HAVE_AMX || kernels_isa() != ISA_AVX512) return 0;
    const char *off = getenv("AUTOGLM_KERNELS_AMX");
    if (off && strcmp(off, "0") == 0) return 0;
    if (granted < 0) {
        unsigned a, b, c, d;
        // CPUID leaf 7: EDX bit 24 AMX-TILE, bit 25 AMX-INT8; then Linux's grant of the tile state.
        granted = __get_cpuid_count(7, 0, &a, &b, &c, &d) && (d >> 24 & 1) && (d >> 25 & 1) &&
                  syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    }
    return granted;
}

#if HAVE_AMX
#pragma GCC push_options
#pragma GCC target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512vnni,fma")

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

// tmm0-3: the int32 sums of a group's four panels (16 rows x 16 columns); tmm4: activations (16
// rows x 64 elements); tmm5, tmm6: weights (16 rows of 4 elements x 16 columns), two so that a load
// can overlap the previous multiply. Configured by every task and released at its end: a thread of
// onnxruntime's pool (or the caller's, which also runs tasks) may run another library's AMX code
// between two of ours (oneDNN's, where torch shares the process), which configures tiles its way.
static void configure(void) {
    TileConfig cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 7; t++) cfg.rows[t] = AMX_ROWS, cfg.colsb[t] = 64;
    _tile_loadconfig(&cfg);
}

// 64 elements of a 4-bit panel (8 packed groups PANEL_STEP apart: low nibbles 4 elements, high
// nibbles the next 4) as 16 rows of signed bytes, AMX's B layout: each weight less its zero point
// 8, so that a signed x signed tile multiply (tdpbssd) sums x (w - 8) = x w + the block's
// zero-point correction (-8 x the sum of x) itself, exactly, and the float steps need not add it:
// two vector ops fewer per 16 outputs of every row tile, for one more per 64 widened bytes.
static inline void widen(const uint8_t *src, uint8_t *dst) {
    const __m512i low = _mm512_set1_epi8(0x0F), zero_point = _mm512_set1_epi8(8);
    for (int g = 0; g < 8; g++) {
        const __m512i packed = _mm512_load_si512(src + PANEL_STEP * g);
        _mm512_store_si512(dst + 128 * g, _mm512_sub_epi8(_mm512_and_si512(packed, low), zero_point));
        _mm512_store_si512(dst + 128 * g + 64,
                           _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(packed, 4), low), zero_point));
    }
}

// The first bytes and block-0 scales of group q's four panels.
static inline void group_panels(const Kernel *kn, int64_t q, const uint8_t *wp[NP], const float *sp[NP]) {
    for (int p = 0; p < NP; p++) {
        wp[p] = nbits_panel(kn, NP * q + p);
        sp[p] = nbits_panel_scales(kn, NP * q + p);
    }
}

// Where `steps` x 64 elements from element `at` of a group's four panels lie for the tile loads:
// 8-bit panels in place, 4-bit ones widened into `wide` first.
static inline void panel_sources(const uint8_t *const wp[NP], int64_t at, int steps, int64_t step_bytes, int eight,
                                 uint8_t (*wide)[NP][16 * 64], const uint8_t *(*src)[NP]) {
    for (int s = 0; s < steps; s++)
        for (int p = 0; p < NP; p++) {
            src[s][p] = wp[p] + (at + 64 * s) * step_bytes / 64;
            if (!eight) {
                widen(src[s][p], wide[s][p]);
                src[s][p] = wide[s][p];
            }
        }
    // The tile intrinsics are asm without a memory clobber: the compiler must not drop or move the
    // widened bytes' stores past the tile loads that read them.
    __asm__ volatile("" ::: "memory");
}

// The four accumulator tiles (tmm0-3) += the activation rows at `a` (k bytes apart, 64 elements)
// times 64 elements of the group's four panels w (rows `stride` apart): 8-bit panels as stored
// (unsigned, w + 128), widened 4-bit ones signed (widen).
static inline void tiles_step(const int8_t *a, int64_t k, const uint8_t *const w[NP], int64_t stride, int eight) {
    _tile_loadd(4, a, k);
    _tile_loadd(5, w[0], stride);
    if (eight) _tile_dpbsud(0, 4, 5); else _tile_dpbssd(0, 4, 5);
    _tile_loadd(6, w[1], stride);
    if (eight) _tile_dpbsud(1, 4, 6); else _tile_dpbssd(1, 4, 6);
    _tile_loadd(5, w[2], stride);
    if (eight) _tile_dpbsud(2, 4, 5); else _tile_dpbssd(2, 4, 5);
    _tile_loadd(6, w[3], stride);
    if (eight) _tile_dpbsud(3, 4, 6); else _tile_dpbssd(3, 4, 6);
}

static inline void tiles_zero(void) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
}

// The accumulators' int32 sums into memory, for the float steps that read them next.
static inline void tiles_store(int32_t (*sums)[AMX_ROWS][16]) {
    _tile_stored(0, sums[0], 64);
    _tile_stored(1, sums[1], 64);
    _tile_stored(2, sums[2], 64);
    _tile_stored(3, sums[3], 64);
    __asm__ volatile("" ::: "memory");  // the sums just stored by the tiles are read after this
}

// A block's 4-bit weights are widened once for every row tile of the call, before any of them is
// loaded into a tile: a tile load of bytes stored just before waits for the stores to reach the
// cache (widening each panel right before its load ran 1.1x slower for 16-256 rows). Blocks of up
// to AMX_MAX_BLOCK elements (matmul_nbits.h; onnxruntime's quantizer makes at most 256).
#define WIDE_MAX (AMX_MAX_BLOCK / 64)
// Rows whose column sums one pass over a group's blocks keeps (ROW_CHUNK x 64 floats, 32 KiB).
#define ROW_CHUNK 128

// Columns [64 q, 64 q + 64) for rows [r0, r1), r1 - r0 <= ROW_CHUNK, block by block: each block's
// weights (4-bit ones widened once) serve every 16-row tile of the rows before the next block is
// read. The last tile runs 16 rows too, past r1 into the activations' zeroed padding
// (nbits_quantize: AMX_ROWS - 1 rows more), so the tiles are configured once per task. The float
// steps are the VNNI tile's (nbits_block_step, nbits_store_panel), in the same order for every
// (row, column): the same bits.
//
// Why: with each row tile running the whole K on its own, a 4-bit prefill widened every block
// once per 16 rows (a profile of a 38-token SmolLM2 int4 prefill on an Intel Xeon VM, CPU model
// 167, had a third of the AMX tile's samples in the widening) and configured the tiles again for
// the last, short one. Block by block, SmolLM2 int4 prefills of 38-512 tokens ran 1.05-1.13x
// faster there, int8 level to 1.04x (bench/RESULTS.md; the tile-by-tile order: commit ef72a7f).
static void group_amx(const Job *job, int64_t q, int64_t r0, int64_t r1) {
    const Kernel *kn = job->kernel;
    const int64_t k = kn->k, block = kn->block, nb = kn->nb, n = kn->n;
    const int eight = kn->bits == 8;
    const int64_t step_bytes = eight ? 16 * PANEL_STEP : 8 * PANEL_STEP, stride = eight ? PANEL_STEP : 64;
    const uint8_t *wp[NP];
    const float *sp[NP];
    group_panels(kn, q, wp, sp);
    _Alignas(64) uint8_t wide[WIDE_MAX][NP][16 * 64];
    _Alignas(64) int32_t sums[NP][AMX_ROWS][16];
    _Alignas(64) float f[ROW_CHUNK][NP][16];  // the column sums; block 0 starts them from zero
    for (int64_t b = 0; b < nb; b++) {
        const int64_t start = b * block, len = k - start < block ? k - start : block;
        const int steps = (int)(len / 64);
        const uint8_t *src[WIDE_MAX][NP];
        panel_sources(wp, start, steps, step_bytes, eight, wide, src);
        for (int64_t m0 = r0; m0 < r1; m0 += AMX_ROWS) {
            tiles_zero();
            for (int s = 0; s < steps; s++) tiles_step(job->xq + m0 * k + start + 64 * s, k, src[s], stride, eight);
            tiles_store(sums);
            const int rows = (int)(r1 - m0 < AMX_ROWS ? r1 - m0 : AMX_ROWS);
            for (int p = 0; p < NP; p++) {
                const __m512 scale = _mm512_loadu_ps(sp[p] + b * (PANEL_STEP / 4));
                for (int i = 0; i < rows; i++) {
                    const int64_t row = m0 + i;
                    const __m512i sum_i = _mm512_load_si512(sums[p][i]);
                    const __m512i a = eight ? _mm512_add_epi32(sum_i, _mm512_set1_epi32(job->corr[row * nb + b])) : sum_i;
                    float *fr = f[row - r0][p];
                    const __m512 sum = b ? _mm512_load_ps(fr) : _mm512_setzero_ps();
                    _mm512_store_ps(fr, nbits_block_step(sum, a, scale, job->xs[row * nb + b]));
                }
            }
        }
    }
    for (int p = 0; p < NP; p++) {
        const int64_t c = (NP * q + p) * 16;
        if (c >= n) break;
        for (int64_t row = r0; row < r1; row++) nbits_store_panel(job, row, c, _mm512_load_ps(f[row - r0][p]));
    }
}

// One task: groups [t x quads_per_task, ...), all rows, ROW_CHUNK at a time. A call of SMALL_M
// rows or fewer (a decode step) runs the VNNI tile: it reads the weights at memory speed there,
// and AMX's fixed costs per block (tile stores, the sums' float steps) made 2-4 rows slower, not
// faster (bench/RESULTS.md).
void packed_task_amx(void *data, size_t t) {
    const Job *job = data;
    if (!nbits_runs_amx(job->kernel, job->m)) {
        packed_task_avx512(data, t);
        return;
    }
    int64_t first, last;
    task_quads(job, t, &first, &last);
    configure();
    for (int64_t q = first; q < last; q++)
        for (int64_t r0 = 0; r0 < job->m; r0 += ROW_CHUNK)
            group_amx(job, q, r0, job->m - r0 < ROW_CHUNK ? job->m : r0 + ROW_CHUNK);
    _tile_release();
}

#pragma GCC pop_options

#else

void packed_task_amx(void *data, size_t t) { packed_task_avx512(data, t); }

#endif  // HAVE_AMX

#endif
