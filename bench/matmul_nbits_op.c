// An experiment: our own CPU kernel for onnxruntime's MatMulNBits at batch 1-4 (the quantized
// weight matmuls of our int8 and int4 graphs: 84 % of a decode step on the AMD EPYC VM), as an
// onnxruntime custom-op library.
//
// The idea (bench/gemv_streams.c): MLAS walks each thread's weight rows front to back, one memory
// stream per thread; reading four far-apart rows per thread in lockstep keeps four hardware
// prefetch streams busy (AMD EPYC Zen 2: 20 -> 36 GB/s on an int8 GEMV outside onnxruntime).
//
// The op registers under MatMulNBits' own name and domain (com.microsoft), so a packaged graph runs
// unchanged with it (OnnxCausalLM(custom_ops=...)). It takes what our packager emits: symmetric
// weights (no zero_points input: zero point 2^(bits-1)), 8 or 4 bits, blocks of a multiple of 64,
// float activations, quantized here to int8 per weight block as MatMulNBits does at accuracy
// level 4. Kernels: AVX-512 VNNI (dpbusd) where the CPU has it, else AVX2 + FMA (maddubs);
// MATMUL_NBITS_ISA=avx2 pins the latter. Above SMALL_M rows (prefill) it hands the call to
// onnxruntime's own MatMulNBits through InvokeOp (an op made that way is not prepacked).
//
// Measured (bench/RESULTS.md, Intel Xeon VM with AVX-512 VNNI, Llama-134M, 5 rounds): decode 1.05x
// (int8) and 0.91x (int4) of onnxruntime's own kernels, prefill 0.74x / 0.78x: not adopted there.
// KernelContext_ParallelFor's hand-off costs more than MLAS's at these sizes, and the 4-row-stream
// gain needs a memory-bound CPU; not yet measured on an AVX2-only one.
//
// Build (onnxruntime's C headers come from Debian's libonnxruntime-dev, see bench/ort_headers.sh):
//   bash bench/ort_headers.sh /tmp/ort-headers
//   gcc -O3 -shared -fPIC -fvisibility=hidden -I/tmp/ort-headers/onnxruntime
//       bench/matmul_nbits_op.c -o /tmp/libmatmul_nbits_op.so   (one command)
//   python bench/edge_vs_llamacpp.py --llama-cpp DIR --custom-ops /tmp/libmatmul_nbits_op.so
#include <immintrin.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "onnxruntime_c_api.h"

#define SMALL_M 4
#define STREAMS 4
// Row groups per matrix: enough tasks for the intra-op pool to balance, few enough that every
// stream is a long run of consecutive rows.
#define TASKS 16

static const OrtApi *ort;

struct Job;

typedef struct {
    int64_t k, n, bits, block;
    int64_t span;        // 4 bits: activations reordered per this many elements (64 AVX2, 128 VNNI)
    int signed_weights;  // int8 weights taken as signed (AVX2's sign trick): no zero-point correction
    void (*rows_dot)(const struct Job *job, const int64_t *rows, int count);
    OrtOp *builtin;      // onnxruntime's MatMulNBits, for prefill
} Kernel;

typedef struct Job {
    const Kernel *kernel;
    const uint8_t *w;   // [n][k * bits / 8]
    const float *ws;    // [n][k / block]
    const int8_t *xq;   // [m][k], at 4 bits reordered per span: even elements, then odd
    const float *xs;    // [m][k / block]
    const int32_t *corr;  // [m][k / block]: -zero point x the block's sum of xq
    float *y;           // [m][n]
    int m;
    int64_t rows_per_stream;
} Job;

// Each ISA's kernels are compiled for it alone; create() picks one after asking the CPU.
#pragma GCC push_options
#pragma GCC target("avx2,fma")

static inline float hsum256(__m256 v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_hadd_ps(a, a);
    a = _mm_hadd_ps(a, a);
    return _mm_cvtss_f32(a);
}

// One block of weights against one activation row: 8 int32 partial sums.
// 8 bits: stored as w + 128; the sign trick (|w| unsigned x sign-adjusted activations) keeps
// maddubs' int16 pairs from saturating (at most 2 x 128 x 127).
static inline __m256i dot8_avx2(const uint8_t *w, const int8_t *x, int64_t len) {
    const __m256i flip = _mm256_set1_epi8((char)0x80), ones = _mm256_set1_epi16(1);
    __m256i sum = _mm256_setzero_si256();
    for (int64_t j = 0; j < len; j += 32) {
        __m256i wv = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(w + j)), flip);
        __m256i xv = _mm256_loadu_si256((const __m256i *)(x + j));
        __m256i p = _mm256_maddubs_epi16(_mm256_abs_epi8(wv), _mm256_sign_epi8(xv, wv));
        sum = _mm256_add_epi32(sum, _mm256_madd_epi16(p, ones));
    }
    return sum;
}

// 4 bits: byte j of a block holds elements 2j (low nibble) and 2j + 1 (high). The nibbles enter
// maddubs unsigned (0..15) against activations reordered to match (per 64: even, then odd); the
// zero point 8 comes off through the activations' block sum (``corr`` = -8 x sum).
static inline __m256i dot4_avx2(const uint8_t *w, const int8_t *x, int64_t len, int32_t corr) {
    const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    __m256i sum = _mm256_setr_epi32(corr, 0, 0, 0, 0, 0, 0, 0);
    for (int64_t j = 0; j < len; j += 64) {
        __m256i packed = _mm256_loadu_si256((const __m256i *)(w + j / 2));
        __m256i lo = _mm256_and_si256(packed, low), hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low);
        __m256i p0 = _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)(x + j)));
        __m256i p1 = _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(x + j + 32)));
        sum = _mm256_add_epi32(sum, _mm256_madd_epi16(_mm256_add_epi16(p0, p1), ones));
    }
    return sum;
}

// Rows rows[0..COUNT) against M activation rows, the rows' blocks read in lockstep. Inlined with
// constant BITS, M and COUNT, so every combination gets its own unrolled loop.
static inline __attribute__((always_inline)) void rows_avx2(const Job *job, const int64_t *rows, const int BITS,
                                                            const int M, const int COUNT) {
    const int64_t k = job->kernel->k, block = job->kernel->block, nb = k / block, n = job->kernel->n;
    const int64_t row_bytes = k * BITS / 8, block_bytes = block * BITS / 8;
    __m256 acc[STREAMS][SMALL_M];
    _Pragma("GCC unroll 4") for (int r = 0; r < COUNT; r++)
        _Pragma("GCC unroll 4") for (int i = 0; i < M; i++) acc[r][i] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++)
        _Pragma("GCC unroll 4") for (int r = 0; r < COUNT; r++) {
            const uint8_t *w = job->w + rows[r] * row_bytes + b * block_bytes;
            const float ws = job->ws[rows[r] * nb + b];
            _Pragma("GCC unroll 4") for (int i = 0; i < M; i++) {
                const int8_t *x = job->xq + i * k + b * block;
                __m256i dot = BITS == 8 ? dot8_avx2(w, x, block) : dot4_avx2(w, x, block, job->corr[i * nb + b]);
                acc[r][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(ws * job->xs[i * nb + b]),
                                            acc[r][i]);
            }
        }
    _Pragma("GCC unroll 4") for (int r = 0; r < COUNT; r++)
        _Pragma("GCC unroll 4") for (int i = 0; i < M; i++) job->y[i * n + rows[r]] = hsum256(acc[r][i]);
}

#define DISPATCH(FN, job, rows, count)                                                   \
    do {                                                                                 \
        const int key_ = ((job)->kernel->bits == 8) * 100 + (job)->m * 10 + ((count) > 1); \
        switch (key_) {                                                                  \
            case 110: FN(job, rows, 8, 1, 1); break;                                     \
            case 111: FN(job, rows, 8, 1, STREAMS); break;                               \
            case 120: FN(job, rows, 8, 2, 1); break;                                     \
            case 121: FN(job, rows, 8, 2, STREAMS); break;                               \
            case 130: FN(job, rows, 8, 3, 1); break;                                     \
            case 131: FN(job, rows, 8, 3, STREAMS); break;                               \
            case 140: FN(job, rows, 8, 4, 1); break;                                     \
            case 141: FN(job, rows, 8, 4, STREAMS); break;                               \
            case 10: FN(job, rows, 4, 1, 1); break;                                      \
            case 11: FN(job, rows, 4, 1, STREAMS); break;                                \
            case 20: FN(job, rows, 4, 2, 1); break;                                      \
            case 21: FN(job, rows, 4, 2, STREAMS); break;                                \
            case 30: FN(job, rows, 4, 3, 1); break;                                      \
            case 31: FN(job, rows, 4, 3, STREAMS); break;                                \
            case 40: FN(job, rows, 4, 4, 1); break;                                      \
            default: FN(job, rows, 4, 4, STREAMS); break;                                \
        }                                                                                \
    } while (0)

static void rows_dot_avx2(const Job *job, const int64_t *rows, int count) { DISPATCH(rows_avx2, job, rows, count); }

#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,fma")

// AVX-512 VNNI: dpbusd multiplies unsigned by signed bytes into int32 without an int16 step, so
// the weights go in as stored (w + 128, or the nibbles) and the zero point comes off through the
// activations' block sums, seeded into the accumulator (``corr``). At 4 bits a block's 64 bytes
// split into 64 low and 64 high nibbles: activations are reordered per 128 to match.
static inline __m512i dot8_vnni(const uint8_t *w, const int8_t *x, int64_t len, int32_t corr) {
    __m512i sum = _mm512_maskz_set1_epi32(1, corr);
    for (int64_t j = 0; j < len; j += 64)
        sum = _mm512_dpbusd_epi32(sum, _mm512_loadu_si512(w + j), _mm512_loadu_si512(x + j));
    return sum;
}

static inline __m512i dot4_vnni(const uint8_t *w, const int8_t *x, int64_t len, int32_t corr) {
    const __m512i low = _mm512_set1_epi8(0x0F);
    __m512i sum = _mm512_maskz_set1_epi32(1, corr);
    for (int64_t j = 0; j < len; j += 128) {
        __m512i packed = _mm512_loadu_si512(w + j / 2);
        sum = _mm512_dpbusd_epi32(sum, _mm512_and_si512(packed, low), _mm512_loadu_si512(x + j));
        sum = _mm512_dpbusd_epi32(sum, _mm512_and_si512(_mm512_srli_epi16(packed, 4), low),
                                  _mm512_loadu_si512(x + j + 64));
    }
    return sum;
}

static inline __attribute__((always_inline)) void rows_vnni(const Job *job, const int64_t *rows, const int BITS,
                                                            const int M, const int COUNT) {
    const int64_t k = job->kernel->k, block = job->kernel->block, nb = k / block, n = job->kernel->n;
    const int64_t row_bytes = k * BITS / 8, block_bytes = block * BITS / 8;
    __m512 acc[STREAMS][SMALL_M];
    _Pragma("GCC unroll 4") for (int r = 0; r < COUNT; r++)
        _Pragma("GCC unroll 4") for (int i = 0; i < M; i++) acc[r][i] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++)
        _Pragma("GCC unroll 4") for (int r = 0; r < COUNT; r++) {
            const uint8_t *w = job->w + rows[r] * row_bytes + b * block_bytes;
            const float ws = job->ws[rows[r] * nb + b];
            _Pragma("GCC unroll 4") for (int i = 0; i < M; i++) {
                const int8_t *x = job->xq + i * k + b * block;
                const int32_t corr = job->corr[i * nb + b];
                __m512i dot = BITS == 8 ? dot8_vnni(w, x, block, corr) : dot4_vnni(w, x, block, corr);
                acc[r][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(ws * job->xs[i * nb + b]),
                                            acc[r][i]);
            }
        }
    _Pragma("GCC unroll 4") for (int r = 0; r < COUNT; r++)
        _Pragma("GCC unroll 4") for (int i = 0; i < M; i++) job->y[i * n + rows[r]] = _mm512_reduce_add_ps(acc[r][i]);
}

static void rows_dot_vnni(const Job *job, const int64_t *rows, int count) { DISPATCH(rows_vnni, job, rows, count); }

#pragma GCC pop_options

// Task t: rows [t * STREAMS * rps, ...) as STREAMS runs of rps consecutive rows, one row of each
// run at a time.
static void task(void *data, size_t t) {
    const Job *job = data;
    const int64_t rps = job->rows_per_stream, n = job->kernel->n;
    const int64_t first = (int64_t)t * STREAMS * rps;
    int64_t last = first + STREAMS * rps;
    if (last > n) last = n;
    int64_t rows[STREAMS];
    if (last - first == STREAMS * rps) {
        for (int64_t i = 0; i < rps; i++) {
            for (int s = 0; s < STREAMS; s++) rows[s] = first + s * rps + i;
            job->kernel->rows_dot(job, rows, STREAMS);
        }
    } else {
        for (int64_t row = first; row < last; row++) {
            rows[0] = row;
            job->kernel->rows_dot(job, rows, 1);
        }
    }
}

// Per block: scale = max |x| / 127, x rounded to nearest, and the zero-point correction
// -zero x sum(x). At 4 bits each ``span`` elements are stored even-indexed first, then
// odd-indexed: the order the nibbles come out of the bytes.
static void quantize(const Kernel *kn, const float *a, int m, int8_t *xq, float *xs, int32_t *corr) {
    const int64_t k = kn->k, block = kn->block, nb = k / block, span = kn->span;
    const int32_t zero = kn->signed_weights && kn->bits == 8 ? 0 : 1 << (kn->bits - 1);
    for (int i = 0; i < m; i++)
        for (int64_t b = 0; b < nb; b++) {
            const float *x = a + i * k + b * block;
            float amax = 0.0f;
            for (int64_t j = 0; j < block; j++) amax = fmaxf(amax, fabsf(x[j]));
            float scale = amax / 127.0f, inv = scale > 0.0f ? 1.0f / scale : 0.0f;
            int8_t *q = xq + i * k + b * block;
            int32_t total = 0;
            for (int64_t j = 0; j < block; j++) {
                int v = (int)nearbyintf(x[j] * inv);
                v = v > 127 ? 127 : (v < -127 ? -127 : v);
                total += v;
                int64_t at = j;
                if (kn->bits == 4) at = (j / span) * span + (j % 2) * (span / 2) + (j % span) / 2;
                q[at] = (int8_t)v;
            }
            xs[i * nb + b] = scale;
            corr[i * nb + b] = -zero * total;
        }
}


static OrtStatus *fail(const char *what) { return ort->CreateStatus(ORT_FAIL, what); }

#define CHECK(call)                     \
    do {                                \
        OrtStatus *status_ = (call);    \
        if (status_) return status_;    \
    } while (0)

static OrtStatus *ORT_API_CALL compute(void *op_kernel, OrtKernelContext *context) {
    const Kernel *kn = op_kernel;
    const OrtValue *inputs[3];
    for (size_t i = 0; i < 3; i++) CHECK(ort->KernelContext_GetInput(context, i, &inputs[i]));
    OrtTensorTypeAndShapeInfo *info;
    CHECK(ort->GetTensorTypeAndShape(inputs[0], &info));
    size_t rank = 0, count = 0;
    int64_t dims[8];
    OrtStatus *status = ort->GetDimensionsCount(info, &rank);
    if (!status && (rank < 1 || rank > 8)) status = fail("MatMulNBits: A must have rank 1 to 8");
    if (!status) status = ort->GetDimensions(info, dims, rank);
    if (!status) status = ort->GetTensorShapeElementCount(info, &count);
    ort->ReleaseTensorTypeAndShapeInfo(info);
    if (status) return status;
    if (dims[rank - 1] != kn->k) return fail("MatMulNBits: the last dimension of A is not K");
    const int64_t m = (int64_t)count / kn->k;
    dims[rank - 1] = kn->n;
    OrtValue *output;
    CHECK(ort->KernelContext_GetOutput(context, 0, dims, rank, &output));
    if (m == 0) return NULL;
    if (m > SMALL_M) return ort->InvokeOp(context, kn->builtin, inputs, 3, &output, 1);

    const float *a, *ws;
    const uint8_t *w;
    float *y;
    CHECK(ort->GetTensorMutableData((OrtValue *)inputs[0], (void **)&a));
    CHECK(ort->GetTensorMutableData((OrtValue *)inputs[1], (void **)&w));
    CHECK(ort->GetTensorMutableData((OrtValue *)inputs[2], (void **)&ws));
    CHECK(ort->GetTensorMutableData(output, (void **)&y));

    const int64_t nb = kn->k / kn->block;
    // Activations: at most SMALL_M rows of K bytes, K up to some tens of thousands: the stack is
    // not the place; one allocation per call is noise beside reading the weights.
    int8_t *xq = aligned_alloc(64, (size_t)((m * kn->k + 63) / 64 * 64));
    float *xs = malloc(sizeof(float) * (size_t)(m * nb));
    int32_t *corr = malloc(sizeof(int32_t) * (size_t)(m * nb));
    if (!xq || !xs || !corr) {
        free(xq), free(xs), free(corr);
        return ort->CreateStatus(ORT_FAIL, "MatMulNBits: out of memory");
    }
    quantize(kn, a, (int)m, xq, xs, corr);
    int64_t rps = (kn->n + TASKS * STREAMS - 1) / (TASKS * STREAMS);
    if (rps < 1) rps = 1;
    Job job = {kn, w, ws, xq, xs, corr, y, (int)m, rps};
    size_t tasks = (size_t)((kn->n + STREAMS * rps - 1) / (STREAMS * rps));
    status = ort->KernelContext_ParallelFor(context, task, tasks, 0, &job);
    free(xq), free(xs), free(corr);
    return status;
}

static OrtStatus *attribute(const OrtKernelInfo *info, const char *name, int64_t *out) {
    return ort->KernelInfoGetAttribute_int64(info, name, out);
}

static OrtStatus *ORT_API_CALL create(const OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info,
                                      void **out) {
    (void)op, (void)api;
    Kernel kn = {0};
    CHECK(attribute(info, "K", &kn.k));
    CHECK(attribute(info, "N", &kn.n));
    CHECK(attribute(info, "bits", &kn.bits));
    CHECK(attribute(info, "block_size", &kn.block));
    if (kn.bits != 8 && kn.bits != 4) return fail("MatMulNBits (autoglm): only 8 and 4 bits");
    if (kn.block < 64 || kn.block % 64 || kn.k % kn.block || kn.n < 1)
        return fail("MatMulNBits (autoglm): K must be whole blocks of a multiple of 64");
    const char *isa = getenv("MATMUL_NBITS_ISA");  // "avx2": the AVX2 kernels on a VNNI CPU
    int vnni = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
    if (isa && strcmp(isa, "avx2") == 0) vnni = 0;
    if (vnni && kn.block % 128 == 0) {
        kn.rows_dot = rows_dot_vnni, kn.span = 128, kn.signed_weights = 0;
    } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        kn.rows_dot = rows_dot_avx2, kn.span = 64, kn.signed_weights = 1;
    } else {
        return fail("MatMulNBits (autoglm): this CPU has neither AVX2 with FMA nor AVX-512 VNNI");
    }
    size_t inputs = 0;
    CHECK(ort->KernelInfo_GetInputCount(info, &inputs));
    for (size_t i = 3; i < inputs; i++) {  // zero_points, g_idx, bias: none in our graphs
        char name[256];
        size_t size = sizeof name;
        CHECK(ort->KernelInfo_GetInputName(info, i, name, &size));
        if (name[0]) return fail("MatMulNBits (autoglm): zero points, g_idx and bias are not supported");
    }
    // The built-in kernel, for prefill: same attributes, the three inputs we take.
    const char *names[5] = {"K", "N", "bits", "block_size", "accuracy_level"};
    int64_t values[5] = {kn.k, kn.n, kn.bits, kn.block, 4};
    if (attribute(info, "accuracy_level", &values[4])) values[4] = 4;
    OrtOpAttr *attrs[5] = {0};
    OrtStatus *status = NULL;
    for (int i = 0; i < 5 && !status; i++)
        status = ort->CreateOpAttr(names[i], &values[i], 1, ORT_OP_ATTR_INT, &attrs[i]);
    const char *type_names[2] = {"T1", "T2"};
    ONNXTensorElementDataType types[2] = {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8};
    if (!status)
        status = ort->CreateOp(info, "MatMulNBits", "com.microsoft", 1, type_names, types, 2,
                               (const OrtOpAttr *const *)attrs, 5, 3, 1, &kn.builtin);
    for (int i = 0; i < 5; i++)
        if (attrs[i]) ort->ReleaseOpAttr(attrs[i]);
    if (status) return status;
    Kernel *kernel = malloc(sizeof kn);
    if (!kernel) {
        ort->ReleaseOp(kn.builtin);
        return fail("MatMulNBits (autoglm): out of memory");
    }
    *kernel = kn;
    *out = kernel;
    return NULL;
}

static void ORT_API_CALL destroy(void *op_kernel) {
    Kernel *kn = op_kernel;
    if (kn && kn->builtin) ort->ReleaseOp(kn->builtin);
    free(kn);
}

static const char *ORT_API_CALL op_name(const OrtCustomOp *op) { return (void)op, "MatMulNBits"; }
static const char *ORT_API_CALL op_provider(const OrtCustomOp *op) { return (void)op, "CPUExecutionProvider"; }
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

static ONNXTensorElementDataType ORT_API_CALL output_type(const OrtCustomOp *op, size_t index) {
    return (void)op, (void)index, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}

static OrtCustomOpInputOutputCharacteristic ORT_API_CALL input_kind(const OrtCustomOp *op, size_t index) {
    return (void)op, index < 3 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
}

static OrtCustomOpInputOutputCharacteristic ORT_API_CALL output_kind(const OrtCustomOp *op, size_t index) {
    return (void)op, (void)index, INPUT_OUTPUT_REQUIRED;
}

static OrtMemType ORT_API_CALL input_memory(const OrtCustomOp *op, size_t index) {
    return (void)op, (void)index, OrtMemTypeDefault;
}

static int ORT_API_CALL start_version(const OrtCustomOp *op) { return (void)op, 1; }
static int ORT_API_CALL end_version(const OrtCustomOp *op) { return (void)op, INT_MAX; }

static OrtCustomOp matmul_nbits;
static OrtCustomOpDomain *domain;

// The entry point onnxruntime calls when a session registers this library.
__attribute__((visibility("default"))) OrtStatus *ORT_API_CALL RegisterCustomOps(OrtSessionOptions *options, const OrtApiBase *base) {
    if (!ort) ort = base->GetApi(ORT_API_VERSION);
    if (!ort) return NULL;  // an onnxruntime older than our headers: nothing registered, built-in kernel runs
    if (!domain) {
        OrtCustomOp op = {0};
        op.version = ORT_API_VERSION;
        op.GetName = op_name;
        op.GetExecutionProviderType = op_provider;
        op.GetInputType = input_type;
        op.GetInputTypeCount = input_count;
        op.GetOutputType = output_type;
        op.GetOutputTypeCount = output_count;
        op.GetInputCharacteristic = input_kind;
        op.GetOutputCharacteristic = output_kind;
        op.GetInputMemoryType = input_memory;
        op.CreateKernelV2 = create;
        op.KernelComputeV2 = compute;
        op.KernelDestroy = destroy;
        op.GetStartVersion = start_version;
        op.GetEndVersion = end_version;
        matmul_nbits = op;
        CHECK(ort->CreateCustomOpDomain("com.microsoft", &domain));
        CHECK(ort->CustomOpDomain_Add(domain, &matmul_nbits));
    }
    return ort->AddCustomOpDomain(options, domain);
}
