// A decoder layer's small nodes folded into its weight matmuls (domain ai.autoglm; library.c
// registers them), over MatMulNBits-layout weights:
//   MatMulNBitsSwiGLU       (A, gate B, gate scales, up B, up scales) -> silu(A x gate) * (A x up)
//   SkipRMSNormMatMulNBits  (A, skip, gamma, B, scales) -> (norm(A + skip) x B, A + skip)
//   SkipRMSNormMatMulNBitsBias (A, skip, gamma, B, scales, bias) -> (norm(A + skip) x B + bias, A + skip)
//   SkipRMSNormSwiGLU       (A, skip, gamma, gate B, gate scales, up B, up scales)
//                           -> (silu(norm(A + skip) x gate) * (norm(A + skip) x up), A + skip)
// where norm is SkipSimplifiedLayerNormalization's RMSNorm with gamma and the attribute epsilon;
// and the same over float weights W [K, N] (an fp32 graph; matmul_float.c packs and multiplies):
//   MatMulFloat (A, W), MatMulFloatSwiGLU (A, gate W, up W), SkipRMSNormMatMulFloat (A, skip,
//   gamma, W), SkipRMSNormMatMulFloatBias (A, skip, gamma, W, bias), SkipRMSNormSwiGLUFloat (A, skip,
//   gamma, gate W, up W).
// The Bias forms are the packed q/k/v projection of a model with q/k/v biases (Qwen2, GLM): its
// bias Add was a node of its own in every layer (Qwen2-0.5B int4, Intel Xeon VM: 23 Adds, 0.21 ms
// of a 14.3 ms decode step); the tiles add the bias as they store each output.
// The packager writes each as an ONNX model-local function whose body is onnxruntime's own nodes
// (cloud/packaging/nbits_fusion.py): where this library is registered onnxruntime runs these ops
// (a function node that some kernel takes is not inlined), elsewhere it inlines the bodies.
//
// Why: a decode step of a small model ran ~335 nodes, and on two cores each costs onnxruntime a
// dispatch, and a parallel one a hand-off and a join, whatever its size. Per SmolLM2 layer the
// MLP was four (gate, up, the SiLU, the product) and each norm one more; the gate and up also
// quantized the same activations twice. AMD EPYC Zen 3 VM, SmolLM2 int4, one process
// (bench/RESULTS.md): with the MLP and both norms folded a 1-row decode step 8 % and a 4-row
// step 18 % faster (155 nodes a step instead of 335).
//
// How: gate and up are packed as MatMulNBits packs them (matmul_nbits.c). The norm runs per row
// before the activations are quantized (once, for both matrices); in a decode step a task computes
// a range of columns of gate (into a scratch buffer) or of up (into the output), and whichever of
// the two finishes a range second computes the product over it (swiglu_task); in a prefill a task
// computes both and the product for a range and a piece of the rows (swiglu_rows_task). Every
// output is summed by the same instructions as MatMulNBits' and the norm and silu are per row, so
// a row's result does not depend on the rows beside it.
#include "kernels.h"

#if defined(__x86_64__)
#include <stdint.h>
#include <stdlib.h>

#include "matmul_nbits.h"

typedef struct {
    OrtCustomOp op;  // first: onnxruntime's callbacks get this struct's address
    const char *name;
    int pair;  // gate and up with silu(gate) * up, else one matrix
    int norm;  // SkipSimplifiedLayerNormalization first (inputs skip and gamma, output the sum)
    int floats;  // float weights [K, N], one input per matrix (matmul_float.c), else B and scales
    int bias;    // one matrix and then its bias [N] (a constant float input after the weights)
} Variant;

typedef struct {
    Kernel w[2];  // the matrix, or gate and up
    const Variant *variant;
    float epsilon;
} Fused;

// up.y = silu(gate.y) x up.y over the columns of task `range` (the tile's split) for every row of
// the jobs: once both have computed them.
static void silu_range(const Job *gate, const Job *up, size_t range) {
    const int64_t n = up->kernel->n, first = (int64_t)range * up->quads_per_task * 64;
    const int64_t last = first + up->quads_per_task * 64 < n ? first + up->quads_per_task * 64 : n;
    for (int64_t i = 0; first < last && i < up->m; i++) silu_mul_avx2(gate->y + i * n + first, up->y + i * n + first, last - first);
}

typedef struct {
    Job gate, up;  // gate writes the scratch g, up the output
    void (*tiles)(void *, size_t);
    size_t half;  // tasks per matrix
    int *done;    // [half]: how many of gate and up have computed those columns
} SwiGluJob;

// Tasks [0, half) are the gate's, [half, 2 half) the up's, over the same column ranges; the second
// of the two to finish a range computes silu(gate) x up over it. onnxruntime's pool starts each
// thread on a contiguous share of the tasks (its loop counter's home shard), so a thread reads the
// gate's groups (or the up's) as one stream; a task computing both a range's gate and its up made
// each thread switch matrices at every task (Qwen2-0.5B int4, Zen 5 VM: the fused op streamed at ~38 GB/s, a plain matrix ~44-50).
static void swiglu_task(void *data, size_t t) {
    const SwiGluJob *job = data;
    const size_t range = t < job->half ? t : t - job->half;
    job->tiles(t < job->half ? (void *)&job->gate : (void *)&job->up, range);
    // Acquire-release: the second sees the first's outputs.
    if (__atomic_add_fetch(&job->done[range], 1, __ATOMIC_ACQ_REL) < 2) return;
    silu_range(&job->gate, &job->up, range);
}

// A prefill-sized call (more than SMALL_M rows) instead runs one task per range of columns and
// SWIGLU_ROWS rows: the range's gate, its up and their product over those rows, one after the
// other on one core, while the range's outputs are still in its caches. The ranges' two halves
// finished on different cores and the product read a whole call's gate and up outputs back
// (two m x n floats, 6 MiB for a 512-token SmolLM2 prefill): an Intel Xeon VM (CPU model 167)
// profile of that prefill had 9 % of its samples in silu_mul_avx2 (bench/RESULTS.md).
#define SWIGLU_ROWS 128

typedef struct {
    Job gate, up;
    void (*tiles)(void *, size_t);
    size_t chunks;  // pieces of SWIGLU_ROWS rows
} SwiGluRows;

// Rows [r0, r0 + rows) of `job`: the same tile over fewer rows computes the same bits per row.
static Job job_rows(const Job *job, int64_t r0, int64_t rows) {
    const Kernel *kn = job->kernel;
    Job part = *job;
    part.m = rows;
    part.y = job->y + r0 * kn->n;
    if (kn->bits == 32) {
        part.a = job->a + r0 * kn->k;
    } else {
        part.xq = job->xq + r0 * kn->k;
        part.xs = job->xs + r0 * kn->nb;
        part.corr = job->corr + r0 * kn->nb;
    }
    return part;
}

// Task t: column range t / chunks, rows (t % chunks) x SWIGLU_ROWS on (a thread's contiguous share
// of the tasks keeps its ranges' weights in its caches across their row pieces).
static void swiglu_rows_task(void *data, size_t t) {
    const SwiGluRows *job = data;
    const size_t range = t / job->chunks;
    const int64_t r0 = (int64_t)(t % job->chunks) * SWIGLU_ROWS;
    const int64_t rows = job->up.m - r0 < SWIGLU_ROWS ? job->up.m - r0 : SWIGLU_ROWS;
    Job gate = job_rows(&job->gate, r0, rows), up = job_rows(&job->up, r0, rows);
    job->tiles(&gate, range);
    job->tiles(&up, range);
    silu_range(&gate, &up, range);
}

typedef struct {
    const float *a, *skip, *gamma;
    float *sum, *normed;
    float epsilon;
    int64_t k;
} Norm;

static void norm_task(void *data, size_t row) {
    const Norm *job = data;
    const int64_t at = (int64_t)row * job->k;
    skip_rms_norm_avx2(job->a + at, job->skip + at, job->gamma, job->epsilon, job->k, job->sum + at, job->normed + at);
}

// Inputs skip and gamma, the output A + skip, and the normed rows into `normed` [m][k].
static OrtStatus *skip_norm(const Fused *op, OrtKernelContext *context, const float *a, int64_t m, float *normed) {
    const int64_t k = op->w[0].k;
    const OrtValue *skip, *gamma;
    int64_t dims[8], gamma_dims[8];
    size_t rank = 0, count = 0, gamma_rank = 0, gamma_count = 0;
    CHECK(nbits_shape(context, 2, &gamma, gamma_dims, &gamma_rank, &gamma_count));
    if ((int64_t)gamma_count != k) return fail("SkipRMSNorm (autoglm): gamma does not have K elements");
    CHECK(nbits_shape(context, 1, &skip, dims, &rank, &count));
    if ((int64_t)count != m * k || dims[rank - 1] != k) return fail("SkipRMSNorm (autoglm): skip is not shaped as A");
    OrtValue *sum;
    CHECK(ort->KernelContext_GetOutput(context, 1, dims, rank, &sum));
    Norm job = {a, NULL, NULL, NULL, normed, op->epsilon, k};
    CHECK(ort->GetTensorMutableData((OrtValue *)skip, (void **)&job.skip));
    CHECK(ort->GetTensorMutableData((OrtValue *)gamma, (void **)&job.gamma));
    CHECK(ort->GetTensorMutableData(sum, (void **)&job.sum));
    if (m <= SMALL_M) {  // a decode step: not worth a hand-off
        for (int64_t i = 0; i < m; i++) norm_task(&job, (size_t)i);
        return NULL;
    }
    return ort->KernelContext_ParallelFor(context, norm_task, (size_t)m, 0, &job);
}

static OrtStatus *ORT_API_CALL compute(void *op_kernel, OrtKernelContext *context) {
    const Fused *op = op_kernel;
    const Kernel *last = &op->w[op->variant->pair];
    const float *a;
    float *y;
    int64_t m = 0;
    CHECK(nbits_io(last, context, &a, &y, &m));
    if (m == 0 && op->variant->norm) {  // the sum output is still made, empty
        const OrtValue *input;
        int64_t dims[8];
        size_t rank = 0, count = 0;
        OrtValue *sum;
        CHECK(nbits_shape(context, 0, &input, dims, &rank, &count));
        return ort->KernelContext_GetOutput(context, 1, dims, rank, &sum);
    }
    if (m == 0) return NULL;
    const size_t k = (size_t)last->k, n = (size_t)last->n;
    float *normed = op->variant->norm ? malloc(sizeof(float) * (size_t)m * k) : NULL;
    float *g = op->variant->pair ? malloc(sizeof(float) * (size_t)m * n) : NULL;
    OrtStatus *status = NULL;
    if ((op->variant->norm && !normed) || (op->variant->pair && !g)) status = fail("MatMulNBits (autoglm): out of memory");
    if (!status && normed) status = skip_norm(op, context, a, m, normed);
    Activations act;  // gate and up share K, bits and block size: one quantization serves both
    if (!status) status = nbits_quantize(last, context, normed ? normed : a, m, &act);
    if (!status) {
        if (op->variant->pair && m > SMALL_M) {
            SwiGluRows job = {nbits_job(&op->w[0], &act, g, m), nbits_job(&op->w[1], &act, y, m), nbits_tiles(last),
                              (size_t)((m + SWIGLU_ROWS - 1) / SWIGLU_ROWS)};
            const size_t tasks = nbits_task_count(&job.up) * job.chunks;  // column ranges x row pieces
            status = ort->KernelContext_ParallelFor(context, swiglu_rows_task, tasks, 0, &job);
        } else if (op->variant->pair) {
            SwiGluJob job = {nbits_job(&op->w[0], &act, g, m), nbits_job(&op->w[1], &act, y, m), nbits_tiles(last), 0, NULL};
            job.half = nbits_task_count(&job.up);
            job.done = calloc(job.half, sizeof(int));
            status = job.done ? ort->KernelContext_ParallelFor(context, swiglu_task, 2 * job.half, 0, &job)
                              : fail("MatMulNBits (autoglm): out of memory");
            free(job.done);
        } else {
            status = nbits_multiply(last, context, &act, y, m);
        }
        nbits_free(&act);
    }
    free(normed), free(g);
    return status;
}

// Input `index`: a constant float vector of n elements (a bias).
static OrtStatus *bias_input(const OrtKernelInfo *info, size_t index, int64_t n, const float **bias) {
    static const char vector[] = "MatMulNBits (autoglm): the bias must be N constant floats";
    int64_t dims[8] = {0};
    size_t rank = 0;
    CHECK(constant_floats(info, index, vector, bias, dims, &rank));
    return rank == 1 && dims[0] == n ? NULL : fail(vector);
}

static OrtStatus *ORT_API_CALL create(const OrtCustomOp *custom, const OrtApi *api, const OrtKernelInfo *info,
                                      void **out) {
    (void)api;
    Fused op = {.variant = (const Variant *)custom};
    if (op.variant->norm) {
        CHECK(ort->KernelInfoGetAttribute_float(info, "epsilon", &op.epsilon));
        if (!(op.epsilon >= 0.0f)) return fail("SkipRMSNorm (autoglm): epsilon must be >= 0");
    }
    const size_t first = op.variant->norm ? 3 : 1;  // after A (and skip, gamma): B, scales (x2)
    OrtStatus *status = NULL;
    const float *bias = NULL;
    if (op.variant->floats) {  // gate and up: the same shape
        for (int i = 0; !status && i <= op.variant->pair; i++) status = float_kernel(info, first + (size_t)i, &op.w[i]);
        if (!status && op.variant->pair && (op.w[1].k != op.w[0].k || op.w[1].n != op.w[0].n))
            status = fail("MatMulFloatSwiGLU (autoglm): gate and up differ in shape");
    } else {
        CHECK(nbits_attributes(info, &op.w[0]));
        op.w[1] = op.w[0];
    }
    if (!status && op.variant->bias) status = bias_input(info, first + (op.variant->floats ? 1 : 2), op.w[0].n, &bias);
    if (!status && op.variant->floats) status = kernel_bias(&op.w[0], bias);  // float_kernel packed the weights
    for (int i = 0; !status && !op.variant->floats && i <= op.variant->pair; i++) {
        const void *w = NULL, *scales = NULL;
        status = nbits_constant(info, first + 2 * (size_t)i, &w);
        if (!status) status = nbits_constant(info, first + 2 * (size_t)i + 1, &scales);
        if (!status) status = nbits_pack(&op.w[i], w, scales, i == 0 ? bias : NULL);
    }
    Fused *kernel = status ? NULL : malloc(sizeof op);
    if (!kernel) {
        nbits_release(&op.w[0]);
        if (op.variant->pair) nbits_release(&op.w[1]);
        return status ? status : fail("MatMulNBits (autoglm): out of memory");
    }
    *kernel = op;
    *out = kernel;
    return NULL;
}

static void ORT_API_CALL destroy(void *op_kernel) {
    Fused *op = op_kernel;
    if (op) {
        nbits_release(&op->w[0]);
        if (op->variant->pair) nbits_release(&op->w[1]);
    }
    free(op);
}

static const char *ORT_API_CALL op_name(const OrtCustomOp *op) { return ((const Variant *)op)->name; }

static size_t ORT_API_CALL input_count(const OrtCustomOp *op) {
    const Variant *v = (const Variant *)op;
    return 1 + 2 * (size_t)v->norm + (v->floats ? 1 : 2) * (1 + (size_t)v->pair) + (size_t)v->bias;
}

static size_t ORT_API_CALL output_count(const OrtCustomOp *op) { return 1 + (size_t)((const Variant *)op)->norm; }

static ONNXTensorElementDataType ORT_API_CALL input_type(const OrtCustomOp *op, size_t index) {
    const Variant *v = (const Variant *)op;
    const size_t first = v->norm ? 3 : 1, weights = 2 * (1 + (size_t)v->pair);  // B at first, first + 2
    return !v->floats && index >= first && index < first + weights && (index - first) % 2 == 0
               ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8
               : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}

static OrtCustomOpInputOutputCharacteristic ORT_API_CALL input_kind(const OrtCustomOp *op, size_t index) {
    return (void)op, (void)index, INPUT_OUTPUT_REQUIRED;
}

static OrtMemType ORT_API_CALL input_memory(const OrtCustomOp *op, size_t index) {
    return (void)op, (void)index, OrtMemTypeDefault;
}

DEFINE_CUSTOM_OP(fill_fused_op)

static Variant variants[] = {
    {.name = "MatMulNBitsSwiGLU", .pair = 1, .norm = 0},
    {.name = "SkipRMSNormMatMulNBits", .pair = 0, .norm = 1},
    {.name = "SkipRMSNormMatMulNBitsBias", .pair = 0, .norm = 1, .bias = 1},
    {.name = "SkipRMSNormSwiGLU", .pair = 1, .norm = 1},
    {.name = "MatMulFloat", .pair = 0, .norm = 0, .floats = 1},
    {.name = "MatMulFloatSwiGLU", .pair = 1, .norm = 0, .floats = 1},
    {.name = "SkipRMSNormMatMulFloat", .pair = 0, .norm = 1, .floats = 1},
    {.name = "SkipRMSNormMatMulFloatBias", .pair = 0, .norm = 1, .floats = 1, .bias = 1},
    {.name = "SkipRMSNormSwiGLUFloat", .pair = 1, .norm = 1, .floats = 1},
};

OrtStatus *matmul_nbits_fused_ops(OrtCustomOpDomain *domain) {
    for (size_t i = 0; i < sizeof variants / sizeof variants[0]; i++) {
        fill_fused_op(&variants[i].op);
        CHECK(ort->CustomOpDomain_Add(domain, &variants[i].op));
    }
    return NULL;
}

#endif
