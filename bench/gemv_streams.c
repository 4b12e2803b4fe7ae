// How fast can batch-1 int8 decode read its weights on this CPU? A probe outside ONNX Runtime.
//
// Build and run (AVX2 + FMA, OpenMP; 2 threads as the edge bench):
//   gcc -O3 -mavx2 -mfma -fopenmp bench/gemv_streams.c -o /tmp/gemv_streams
//   OMP_NUM_THREADS=2 /tmp/gemv_streams
//
// 1. Read bandwidth: every thread reads its half of 113 MiB either front to back (one stream) or
//    in four quarters at once (four streams), the loads of the four interleaved.
// 2. int8 GEMV over Llama-134M's 61 weight matrices (12 layers of qkv 768x2304, o 768x768, gate and
//    up 768x2048, down 2048x768, and lm_head 768x32000: 113 MB): weights int8 [N][K] with one fp32
//    scale per block of 128, activations quantized to int8 per block (what MatMulNBits does at
//    accuracy level 4), the dot product as llama.cpp's q8_0 on AVX2 (sign + maddubs + madd). Rows
//    either in order (one stream per thread) or four far-apart rows per thread in lockstep (four
//    streams). Outputs of the two orders are compared.
// 3. The same at 4 bits (58 MB): two weights per byte, llama.cpp's Q4_0 nibble order within each
//    32 (byte j holds weights j and j + 16), symmetric with 8 as zero, one fp32 scale per block of
//    128; the nibbles enter maddubs unsigned and the zero point comes off through the activations'
//    block sums. Both bit widths are checked against a plain reference on the first matrix.
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define BLK 128
#define STREAMS 4

typedef struct {
    int k, n;
    int8_t *w;  // [n][k], or at 4 bits [n][k / 2]
    float *s;   // [n][k / BLK]
    int bits;
} Mat;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static inline float hsum(__m256 v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_hadd_ps(a, a);
    a = _mm_hadd_ps(a, a);
    return _mm_cvtss_f32(a);
}

// One block of 128: int8 activations . int8 weights as 8 int32 partial sums.
static inline __m256i dot_block(const int8_t *x, const int8_t *w) {
    __m256i sum = _mm256_setzero_si256();
    for (int j = 0; j < BLK; j += 32) {
        __m256i xv = _mm256_loadu_si256((const __m256i *)(x + j));
        __m256i wv = _mm256_loadu_si256((const __m256i *)(w + j));
        __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(xv, xv), _mm256_sign_epi8(wv, xv));
        sum = _mm256_add_epi32(sum, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
    }
    return sum;
}

// The same at 4 bits: 64 bytes hold the block's 128 weights. The nibbles go into maddubs as they
// are (unsigned, 0..15) against the signed activations; the zero point 8 comes off afterwards as
// 8 x the block's activation sum (``xsum``, once per GEMV), which saves the sign trick's work.
static inline __m256i dot_block4(const int8_t *x, const int8_t *w, int xsum) {
    __m256i sum = _mm256_setzero_si256();
    const __m256i low = _mm256_set1_epi8(0x0F);
    for (int j = 0; j < BLK; j += 64) {
        __m256i packed = _mm256_loadu_si256((const __m256i *)(w + j / 2));  // two groups of 32
        __m256i lo = _mm256_and_si256(packed, low), hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low);
        // lo = weights j..j+15 and j+32..j+47, hi = j+16..j+31 and j+48..j+63
        __m256i w0 = _mm256_permute2x128_si256(lo, hi, 0x20), w1 = _mm256_permute2x128_si256(lo, hi, 0x31);
        __m256i p0 = _mm256_maddubs_epi16(w0, _mm256_loadu_si256((const __m256i *)(x + j)));
        __m256i p1 = _mm256_maddubs_epi16(w1, _mm256_loadu_si256((const __m256i *)(x + j + 32)));
        sum = _mm256_add_epi32(sum, _mm256_madd_epi16(_mm256_add_epi16(p0, p1), _mm256_set1_epi16(1)));
    }
    return _mm256_sub_epi32(sum, _mm256_setr_epi32(8 * xsum, 0, 0, 0, 0, 0, 0, 0));
}

static int xsums[16];  // per block of the activations: their sum, for the 4-bit zero point

static inline const int8_t *row_of(const Mat *m, int row) {
    return m->w + (size_t)row * m->k * m->bits / 8;
}

static inline __m256i dot_any(const Mat *m, const int8_t *x, const int8_t *w, int b) {
    return m->bits == 4 ? dot_block4(x + b * BLK, w + b * BLK / 2, xsums[b]) : dot_block(x + b * BLK, w + b * BLK);
}

static float row_dot(const Mat *m, int row, const int8_t *xq, const float *xs) {
    int nb = m->k / BLK;
    const int8_t *w = row_of(m, row);
    const float *s = m->s + (size_t)row * nb;
    __m256 acc = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++)
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_any(m, xq, w, b)), _mm256_set1_ps(s[b] * xs[b]), acc);
    return hsum(acc);
}

static void gemv_in_order(const Mat *m, const int8_t *xq, const float *xs, float *y) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < m->n; n++) y[n] = row_dot(m, n, xq, xs);
}

static void gemv_streams(const Mat *m, const int8_t *xq, const float *xs, float *y) {
    int nb = m->k / BLK;
#pragma omp parallel
    {
        int t = omp_get_thread_num(), threads = omp_get_num_threads();
        int lo = (int)((long)m->n * t / threads), hi = (int)((long)m->n * (t + 1) / threads);
        int q = (hi - lo) / STREAMS;
        for (int i = 0; i < q; i++) {
            int rows[STREAMS];
            __m256 acc[STREAMS];
            for (int r = 0; r < STREAMS; r++) rows[r] = lo + r * q + i, acc[r] = _mm256_setzero_ps();
            for (int b = 0; b < nb; b++)
                for (int r = 0; r < STREAMS; r++) {
                    float scale = m->s[(size_t)rows[r] * nb + b] * xs[b];
                    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_any(m, xq, row_of(m, rows[r]), b)),
                                             _mm256_set1_ps(scale), acc[r]);
                }
            for (int r = 0; r < STREAMS; r++) y[rows[r]] = hsum(acc[r]);
        }
        for (int n = lo + STREAMS * q; n < hi; n++) y[n] = row_dot(m, n, xq, xs);
    }
}

static double read_rate(const int8_t *a, size_t bytes, int streams, int rounds) {
    double total = 0;
    volatile int sink = 0;
    for (int r = 0; r < rounds + 2; r++) {
        double t0 = now();
#pragma omp parallel
        {
            int t = omp_get_thread_num(), threads = omp_get_num_threads();
            size_t lo = bytes / threads * t, part = bytes / threads / streams / 64 * 64;
            __m256i acc[STREAMS];
            for (int s = 0; s < STREAMS; s++) acc[s] = _mm256_setzero_si256();
            for (size_t i = 0; i < part; i += 64)
                for (int s = 0; s < streams; s++) {
                    const __m256i *p = (const __m256i *)(a + lo + s * part + i);
                    acc[s] = _mm256_xor_si256(acc[s], _mm256_xor_si256(_mm256_load_si256(p), _mm256_load_si256(p + 1)));
                }
            for (int s = 1; s < STREAMS; s++) acc[0] = _mm256_xor_si256(acc[0], acc[s]);
            sink += _mm256_extract_epi32(acc[0], 0);
        }
        if (r >= 2) total += now() - t0;
    }
    return bytes / (total / rounds) / 1e9;
}

// Row ``row`` the plain way, in double: what both kernels must compute.
static double reference(const Mat *m, int row, const int8_t *xq, const float *xs) {
    int nb = m->k / BLK;
    const uint8_t *w = (const uint8_t *)row_of(m, row);
    double total = 0;
    for (int b = 0; b < nb; b++) {
        long dot = 0;
        for (int j = 0; j < BLK; j++) {
            int i = b * BLK + j, q;
            if (m->bits == 8) {
                q = (int8_t)w[i];
            } else {  // Q4_0 order: byte (i / 32) * 16 + i % 16 holds weight i, low nibble below 16
                uint8_t byte = w[(i / 32) * 16 + i % 16];
                q = (i % 32 < 16 ? byte & 0x0F : byte >> 4) - 8;
            }
            dot += (long)q * xq[i];
        }
        total += (double)dot * m->s[(size_t)row * nb + b] * xs[b];
    }
    return total;
}

static void build(Mat *mats, int count, int bits, size_t *bytes) {
    const int shapes[5][2] = {{768, 2304}, {768, 768}, {768, 2048}, {768, 2048}, {2048, 768}};
    *bytes = 0;
    for (int i = 0; i < count; i++) {
        int k = i == count - 1 ? 768 : shapes[i % 5][0], n = i == count - 1 ? 32000 : shapes[i % 5][1];
        size_t wbytes = (size_t)k * n * bits / 8;
        mats[i] = (Mat){k, n, aligned_alloc(64, wbytes), malloc(sizeof(float) * n * (k / BLK)), bits};
        for (size_t j = 0; j < wbytes; j++) mats[i].w[j] = (int8_t)(rand() % 255 - 127);
        for (int j = 0; j < n * (k / BLK); j++) mats[i].s[j] = 1e-3f * (1 + rand() % 100);
        *bytes += wbytes + sizeof(float) * n * (k / BLK);
    }
}

int main(void) {
    enum { COUNT = 12 * 5 + 1 };
    static Mat mats[COUNT];
    srand(1);
    int8_t *xq = malloc(2048);
    float xs[16], *y1 = malloc(sizeof(float) * 32000), *y2 = malloc(sizeof(float) * 32000);
    for (int i = 0; i < 2048; i++) xq[i] = (int8_t)(rand() % 255 - 127);
    for (int b = 0; b < 16; b++)
        for (int j = 0; j < BLK; j++) xsums[b] += xq[b * BLK + j];
    for (int i = 0; i < 16; i++) xs[i] = 1e-2f;

    size_t rbytes = (size_t)113 << 20;
    int8_t *a = aligned_alloc(64, rbytes);
    for (size_t i = 0; i < rbytes; i++) a[i] = (int8_t)i;
    printf("%d threads\n", omp_get_max_threads());
    printf("read, 1 stream per thread:   %.1f GB/s\n", read_rate(a, rbytes, 1, 30));
    printf("read, %d streams per thread:  %.1f GB/s\n", STREAMS, read_rate(a, rbytes, STREAMS, 30));
    free(a);

    const char *orders[2] = {"rows in order", "4 streams per thread"};
    void (*kernels[2])(const Mat *, const int8_t *, const float *, float *) = {gemv_in_order, gemv_streams};
    for (int bits = 8; bits >= 4; bits -= 4) {
        size_t bytes;
        build(mats, COUNT, bits, &bytes);
        for (int k = 0; k < 2; k++) {
            int rounds = 60;
            double total = 0;
            for (int r = 0; r < rounds + 5; r++) {
                double t0 = now();
                for (int i = 0; i < COUNT; i++) kernels[k](&mats[i], xq, xs, y1);
                if (r >= 5) total += now() - t0;
            }
            double step = total / rounds;
            printf("int%d GEMV, %s: %.1f MB per step, %.3f ms (%.1f GB/s, %.0f steps/s)\n", bits, orders[k],
                   bytes / 1e6, step * 1e3, bytes / step / 1e9, 1 / step);
        }
        double worst = 0;  // the two orders compute the same sums
        for (int i = 0; i < COUNT; i++) {
            gemv_in_order(&mats[i], xq, xs, y1);
            gemv_streams(&mats[i], xq, xs, y2);
            for (int n = 0; n < mats[i].n; n++) worst = fmax(worst, fabs(y1[n] - y2[n]));
        }
        double off = 0;
        for (int n = 0; n < mats[0].n; n++) {
            double want = reference(&mats[0], n, xq, xs);
            off = fmax(off, fabs(row_dot(&mats[0], n, xq, xs) - want) / fmax(1.0, fabs(want)));
        }
        printf("int%d: max |difference| between the two orders: %g; vs a plain reference: %.1e\n", bits, worst, off);
        for (int i = 0; i < COUNT; i++) free(mats[i].w), free(mats[i].s);
    }
    return 0;
}
