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
    int8_t *w;  // [n][k]
    float *s;   // [n][k / BLK]
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

static float row_dot(const Mat *m, int row, const int8_t *xq, const float *xs) {
    int nb = m->k / BLK;
    const int8_t *w = m->w + (size_t)row * m->k;
    const float *s = m->s + (size_t)row * nb;
    __m256 acc = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++)
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_block(xq + b * BLK, w + b * BLK)),
                              _mm256_set1_ps(s[b] * xs[b]), acc);
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
                    const int8_t *w = m->w + (size_t)rows[r] * m->k + b * BLK;
                    float scale = m->s[(size_t)rows[r] * nb + b] * xs[b];
                    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_block(xq + b * BLK, w)),
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

int main(void) {
    const int shapes[5][2] = {{768, 2304}, {768, 768}, {768, 2048}, {768, 2048}, {2048, 768}};
    const int count = 12 * 5 + 1;
    Mat mats[12 * 5 + 1];
    size_t bytes = 0;
    srand(1);
    for (int i = 0; i < count; i++) {
        int k = i == count - 1 ? 768 : shapes[i % 5][0], n = i == count - 1 ? 32000 : shapes[i % 5][1];
        mats[i] = (Mat){k, n, aligned_alloc(64, (size_t)k * n), malloc(sizeof(float) * n * (k / BLK))};
        for (size_t j = 0; j < (size_t)k * n; j++) mats[i].w[j] = (int8_t)(rand() % 255 - 127);
        for (int j = 0; j < n * (k / BLK); j++) mats[i].s[j] = 1e-3f * (1 + rand() % 100);
        bytes += (size_t)k * n + sizeof(float) * n * (k / BLK);
    }
    int8_t *xq = malloc(2048);
    float xs[16], *y1 = malloc(sizeof(float) * 32000), *y2 = malloc(sizeof(float) * 32000);
    for (int i = 0; i < 2048; i++) xq[i] = (int8_t)(rand() % 255 - 127);
    for (int i = 0; i < 16; i++) xs[i] = 1e-2f;

    size_t rbytes = (size_t)113 << 20;
    int8_t *a = aligned_alloc(64, rbytes);
    for (size_t i = 0; i < rbytes; i++) a[i] = (int8_t)i;
    printf("%d threads\n", omp_get_max_threads());
    printf("read, 1 stream per thread:   %.1f GB/s\n", read_rate(a, rbytes, 1, 30));
    printf("read, %d streams per thread:  %.1f GB/s\n", STREAMS, read_rate(a, rbytes, STREAMS, 30));

    const char *names[2] = {"int8 GEMV, rows in order", "int8 GEMV, 4 streams per thread"};
    void (*kernels[2])(const Mat *, const int8_t *, const float *, float *) = {gemv_in_order, gemv_streams};
    for (int k = 0; k < 2; k++) {
        int rounds = 60;
        double total = 0;
        for (int r = 0; r < rounds + 5; r++) {
            double t0 = now();
            for (int i = 0; i < count; i++) kernels[k](&mats[i], xq, xs, y1);
            if (r >= 5) total += now() - t0;
        }
        double step = total / rounds;
        printf("%s: %.1f MB per step, %.3f ms (%.1f GB/s, %.0f steps/s)\n", names[k], bytes / 1e6, step * 1e3,
               bytes / step / 1e9, 1 / step);
    }
    double worst = 0;  // the two orders compute the same sums
    for (int i = 0; i < count; i++) {
        gemv_in_order(&mats[i], xq, xs, y1);
        gemv_streams(&mats[i], xq, xs, y2);
        for (int n = 0; n < mats[i].n; n++) worst = fmax(worst, fabs(y1[n] - y2[n]));
    }
    printf("max |difference| between the two orders: %g\n", worst);
    return 0;
}
