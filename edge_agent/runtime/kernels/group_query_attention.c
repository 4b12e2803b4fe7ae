// GroupQueryAttention for CPUs with AVX-512 or AVX2 (library.c registers it): the attention of the
// fused graphs the packager ships, over the KV buffers the edge binds as both past and present.
// This file is the op (checks, KV writes, tasks); the vector routines are per instruction set
// (attention_avx512.c, attention_avx2.c).
//
// Why: onnxruntime's CPU kernel allocates and fills a [batch, heads, query, capacity] score buffer
// and runs a GEMM per head even for one query row; in a SmolLM2 decode step it was ~14 % of the
// node time, and from one row to four (parallel slots) its time per call grew 83 -> 207 us, the
// largest growth of any op (bench/RESULTS.md). A prefill computes every query row against every
// key of the buffer, the masked upper triangle included. AMD EPYC Zen 5 VM, 2 threads: this op
// alone 2.3-3.3x onnxruntime's for decode steps of 1 and 4 rows, 1.55x for a 512-row prompt.
//
// How: a decode step (one new row per sequence) runs a task per (sequence, KV head): the query
// heads sharing that KV head take dot products with a block of 16 keys (8 with AVX2) while it is in
// L1, reduced together, and share each value row, so each key and value is read once. A prompt
// runs a task per (sequence, query head, block of query rows): the block's rows take their dot
// products with each block of keys the same way, up to the last row's position. Softmax
// runs over each row's own keys only (causal, and the local window if any). New keys are rotated
// and written into the present buffer first (in place when past and present are one buffer, as
// the edge binds them). Rows of different sequences never share a task, so a sequence's output
// does not depend on what decodes beside it.
//
// A position's output, and so its keys and values in the next layer, are the same bits whether it
// is computed in a prompt or in a decode step: both sum each dot product in one order (lanes of
// the head's columns, then one reduction tree), softmax and the value sums alike. So a prefix
// cache that holds a conversation's answer (positions decode steps computed) serves its next turn
// exactly as a prefill from scratch would, and a prompt repeated from the cache, its last token
// fed alone, gets the logits the whole prompt gets. A prompt's dot products once ran against a
// transposed copy of the keys, summing each over the columns in turn: SmolLM2-135M int8's logits
// then differed by up to 1.5 between the two ways, and greedy answers parted within 30 tokens.
//
// A half-precision cache (ai.autoglm GroupQueryAttentionHalfKV, defined at the end): the same op
// over past and present key and value of IEEE half (everything else float). New keys are rotated
// in floats and rounded as they are written; a decode step widens each cached key block once for
// the heads that share it (scores_group_half) and each value row as it is summed
// (values_tile_half); a prompt widens the values up to its last row once (values_f, beside the
// transposed keys). A 4-row SmolLM2 decode step at position 300 ran 1.12x (int8) and 1.16x (int4)
// faster than over the float cache, a lone row 4-6 %, a 512-token prompt as fast (Intel Xeon VM,
// bench/RESULTS.md).
//
// Takes what our packager emits and onnxruntime's kernel would compute the same way: float
// tensors, packed QKV or separate Q, K, V, past/present in BNSH, rotary (interleaved or not, the
// whole head or its first part), a local window, a scale; head size a multiple of 16. Refuses
// softcap, smooth softmax and the newer optional inputs (position ids, attention bias, head
// sinks), which fails the session; the caller then loads the graph on onnxruntime's kernels.
#include "kernels.h"

#if defined(__x86_64__)
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "group_query_attention.h"

#define ROWS 32  // query rows per task in a prefill

typedef struct {
    int64_t heads, kv_heads;
    int64_t window;  // local_window_size (first_key); <= 0: every earlier key
    int64_t rotary, interleaved;
    float scale;  // 0: 1 / sqrt(head size)
    int half;                     // the KV cache is IEEE half (GroupQueryAttentionHalfKV), else float
    const AttentionKernels *vec;  // the vector routines of this CPU's instruction set
    int64_t cpus;                 // online CPUs: a decode step makes at least this many tasks where it can
} Gqa;

typedef struct {
    const Gqa *op;
    const AttentionKernels *vec;
    int64_t batch, seq, head, rot_half;   // rot_half: columns of the cos/sin caches
    int64_t q_stride, k_stride, v_stride;  // floats between consecutive (b, s) rows of each input
    const float *q, *k, *v;                // head 0 of row (0, 0) of each input
    const float *cos, *sin;
    const void *past_k, *past_v;  // NULL when not given or when it is the present buffer
    int64_t past_len, present_len;  // the buffers' position capacity
    void *present_k, *present_v;    // float, or IEEE half where op->half
    size_t kv_size;                 // bytes per KV element
    float *out;
    const int64_t *past;   // [batch]: positions already in the cache before this call
    float *values_f;       // prefill over a half cache: [batch][kv_heads][keys_len][head] values widened
    int64_t keys_len;      // positions of values_f per (sequence, KV head): the longest row's, to 16
    int64_t blocks;        // query row blocks per (sequence, head)
    int64_t per_task;      // decode step: query heads per task (a KV head's group, or part of it)
    float scale;
    int failed;  // a task could not allocate its scratch: the call fails
} Call;

// What follows runs only in an op created on a CPU with AVX2, FMA and F16C at least (create):
// compiled for it, so the rotary products fuse as they did when this was AVX-512-only code.
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

// Rotary embedding of one head vector at position pos (onnxruntime's RotaryEmbedding: the first
// 2 x rot_half columns rotate, pairwise if interleaved, else the first half against the second).
static void rotate(const Call *c, const float *x, float *y, int64_t pos, float mul) {
    const int64_t h = c->head, half = c->rot_half;
    if (!c->op->rotary) {
        for (int64_t d = 0; d < h; d++) y[d] = x[d] * mul;
        return;
    }
    const float *cs = c->cos + pos * half, *sn = c->sin + pos * half;
    if (c->op->interleaved) {
        for (int64_t i = 0; i < half; i++) {
            const float a = x[2 * i], b = x[2 * i + 1];
            y[2 * i] = (a * cs[i] - b * sn[i]) * mul;
            y[2 * i + 1] = (b * cs[i] + a * sn[i]) * mul;
        }
    } else {
        for (int64_t i = 0; i < half; i++) {
            const float a = x[i], b = x[i + half];
            y[i] = (a * cs[i] - b * sn[i]) * mul;
            y[i + half] = (b * cs[i] + a * sn[i]) * mul;
        }
    }
    for (int64_t d = 2 * half; d < h; d++) y[d] = x[d] * mul;
}

// Element `at` of a KV buffer of the call's type.
static inline void *kv_at(const Call *c, const void *base, int64_t at) { return (char *)base + (size_t)at * c->kv_size; }

// n (a multiple of 8) floats rounded to IEEE half, to nearest even as onnxruntime's Cast does.
static void to_half(const float *x, uint16_t *y, int64_t n) {
    for (int64_t i = 0; i < n; i += 8)
        _mm_storeu_si128((__m128i *)(y + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

static void from_half(const uint16_t *x, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i += 8) _mm256_storeu_ps(y + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(x + i))));
}

// A task's scratch of `floats` floats, or NULL with the call marked failed (out of memory).
static float *scratch(const Call *c, int64_t floats) {
    float *p = malloc(sizeof(float) * (size_t)floats);
    if (!p) __atomic_store_n(&((Call *)c)->failed, 1, __ATOMIC_RELAXED);
    return p;
}

// Phase 1, a task per (sequence, KV head): the past copied when present is another buffer, the
// new keys rotated and the new values copied in at their positions, and for a prefill over a half
// cache the values up to the last new one widened (values_f).
static void write_kv(void *data, size_t task) {
    const Call *c = data;
    const int64_t b = (int64_t)task / c->op->kv_heads, g = (int64_t)task % c->op->kv_heads, h = c->head;
    const int64_t at = (b * c->op->kv_heads + g) * c->present_len * h;  // this task's first element
    void *pk = kv_at(c, c->present_k, at), *pv = kv_at(c, c->present_v, at);
    const int64_t past = c->past[b];
    if (c->past_k) {
        const int64_t from = (b * c->op->kv_heads + g) * c->past_len * h;
        memcpy(pk, kv_at(c, c->past_k, from), c->kv_size * (size_t)(past * h));
        memcpy(pv, kv_at(c, c->past_v, from), c->kv_size * (size_t)(past * h));
    }
    // A half cache: each new key is rotated in floats, then rounded.
    float local[256], *row = c->op->half ? h <= 256 ? local : scratch(c, h) : NULL;
    if (c->op->half && !row) return;
    for (int64_t s = 0; s < c->seq; s++) {
        const int64_t r = b * c->seq + s, p = past + s;
        const float *key = c->k + r * c->k_stride + g * h, *value = c->v + r * c->v_stride + g * h;
        if (c->op->half) {
            rotate(c, key, row, p, 1.0f);
            to_half(row, (uint16_t *)pk + p * h, h);
            to_half(value, (uint16_t *)pv + p * h, h);
        } else {
            rotate(c, key, (float *)pk + p * h, p, 1.0f);
            memcpy((float *)pv + p * h, value, sizeof(float) * (size_t)h);
        }
    }
    // A prompt's query rows read every value many times (a task per head and block of rows):
    // widened once here, not on every read (a 512-token prompt ran 1.2x slower reading halves).
    if (c->values_f) from_half(pv, c->values_f + (b * c->op->kv_heads + g) * c->keys_len * h, (past + c->seq) * h);
    if (row != local) free(row);
}

// The first key a query at position p attends to: keys p - window < k <= p, as transformers and
// onnxruntime from 1.24 on (the package requires it) read local_window_size.
static inline int64_t first_key(const Gqa *op, int64_t p) { return op->window > 0 && p >= op->window ? p - op->window + 1 : 0; }

// Phase 2 of a prompt (several new rows), a task per (sequence, query head, block of ROWS query rows).
static void attend(void *data, size_t task) {
    const Call *c = data;
    const Gqa *op = c->op;
    const int64_t h = c->head, group = op->heads / op->kv_heads;
    const int64_t block = (int64_t)task % c->blocks, n = (int64_t)task / c->blocks % op->heads;
    const int64_t b = (int64_t)task / c->blocks / op->heads, g = n / group;
    const int64_t s0 = block * ROWS, rows = c->seq - s0 < ROWS ? c->seq - s0 : ROWS, past = c->past[b];
    const int64_t last = past + s0 + rows - 1, span = (last + 16) / 16 * 16;  // keys [0, last], padded
    const void *values = c->values_f ? (const void *)(c->values_f + (b * op->kv_heads + g) * c->keys_len * h)
                                     : kv_at(c, c->present_v, (b * op->kv_heads + g) * c->present_len * h);
    float *q = scratch(c, rows * h + rows * span);
    if (!q) return;
    float *scores = q + rows * h;
    for (int64_t r = 0; r < rows; r++) {
        const int64_t row = b * c->seq + s0 + r;
        rotate(c, c->q + row * c->q_stride + n * h, q + r * h, past + s0 + r, c->scale);
    }
    const void *keys = kv_at(c, c->present_k, (b * op->kv_heads + g) * c->present_len * h);
    (op->half ? c->vec->scores_group_half : c->vec->scores_group)(q, (int)rows, keys, h, first_key(op, past + s0), last, scores, span);
    float *out = c->out + (b * c->seq + s0) * op->heads * h + n * h;
    const int64_t ostride = op->heads * h;
    for (int64_t r0 = 0; r0 < rows; r0 += TILE) {
        const int R = rows - r0 < TILE ? (int)(rows - r0) : TILE;
        const int64_t lo = first_key(op, past + s0 + r0), hi = past + s0 + r0 + R - 1;
        for (int r = 0; r < R; r++) {
            const int64_t p = past + s0 + r0 + r;
            c->vec->softmax(scores + (r0 + r) * span, first_key(op, p), p, hi + 1);
        }
        const float *pr = scores + r0 * span;
        c->vec->values_tile(pr, span, values, h, lo, hi, out + r0 * ostride, ostride, R);
    }
    free(q);
}

// Phase 2 of a decode step (one new row per sequence), a task per (sequence, KV head, part of its
// query heads): the heads of a part are scored against each block of keys while it is in L1, and
// their value sums share each value row, so a part reads the keys and values once, not once per
// head (SmolLM2's 3 heads per KV head, 4 rows at position 2048: 1.5x faster than a task per head;
// with one row on 2 threads, 3 tasks still beat 9 at every position measured, bench/RESULTS.md).
// A group is split into parts only where sequences x KV heads are fewer than the CPUs (one row of
// a model with one or two KV heads): every head's sums are the same whichever part computes it.
static void attend_step(void *data, size_t task) {
    const Call *c = data;
    const Gqa *op = c->op;
    const int64_t h = c->head, group = op->heads / op->kv_heads, per = c->per_task, parts = (group + per - 1) / per;
    const int64_t part = (int64_t)task % parts, g = (int64_t)task / parts % op->kv_heads;
    const int64_t b = (int64_t)task / parts / op->kv_heads, n0 = g * group + part * per;
    const int64_t count = group - part * per < per ? group - part * per : per;  // >= 1
    const int64_t p = c->past[b], lo = first_key(op, p), span = (p + 16) / 16 * 16;
    const void *keys = kv_at(c, c->present_k, (b * op->kv_heads + g) * c->present_len * h);
    const void *values = kv_at(c, c->present_v, (b * op->kv_heads + g) * c->present_len * h);
    float *q = scratch(c, count * h + count * span);
    if (!q) return;
    float *scores = q + count * h;
    // The first head outside the loop: count >= 1, and so the compiler sees q written before
    // scores_group reads it (GCC 12 warned of a maybe-uninitialized read).
    rotate(c, c->q + b * c->q_stride + n0 * h, q, p, c->scale);
    for (int64_t i = 1; i < count; i++) rotate(c, c->q + b * c->q_stride + (n0 + i) * h, q + i * h, p, c->scale);
    (op->half ? c->vec->scores_group_half : c->vec->scores_group)(q, (int)count, keys, h, lo, p, scores, span);
    for (int64_t i = 0; i < count; i++) c->vec->softmax(scores + i * span, lo, p, p + 1);
    float *out = c->out + b * op->heads * h + n0 * h;
    for (int64_t r0 = 0; r0 < count; r0 += TILE) {
        const int R = count - r0 < TILE ? (int)(count - r0) : TILE;
        (op->half ? c->vec->values_tile_half : c->vec->values_tile)(scores + r0 * span, span, values, h, lo, p, out + r0 * h, h, R);
    }
    free(q);
}

#pragma GCC pop_options

// The dimensions of an input or output value.
static OrtStatus *dims_of(const OrtValue *value, int64_t *dims, size_t max, size_t *rank) {
    OrtTensorTypeAndShapeInfo *info;
    CHECK(ort->GetTensorTypeAndShape(value, &info));
    OrtStatus *status = ort->GetDimensionsCount(info, rank);
    if (!status && *rank > max) status = fail("GroupQueryAttention (autoglm): an input has too many dimensions");
    if (!status) status = ort->GetDimensions(info, dims, *rank);
    ort->ReleaseTensorTypeAndShapeInfo(info);
    return status;
}

static OrtStatus *data_of(const OrtValue *value, const void **out) {
    return ort->GetTensorMutableData((OrtValue *)value, (void **)out);
}

static OrtStatus *ORT_API_CALL compute(void *op_kernel, OrtKernelContext *context) {
    const Gqa *op = op_kernel;
    const OrtValue *in[9] = {0};
    for (size_t i = 0; i < 9; i++) CHECK(ort->KernelContext_GetInput(context, i, &in[i]));
    if (!in[0] || !in[5] || !in[6]) return fail("GroupQueryAttention (autoglm): query, seqlens_k and total_sequence_length are required");
    if (!in[1] != !in[2] || !in[3] != !in[4] || !in[7] != !in[8])
        return fail("GroupQueryAttention (autoglm): key/value, past key/value and cos/sin caches come in pairs");
    int64_t qd[4], kd[4], pd[4], ld[4], cd[4], sd[4];  // query, key/value, past, seqlens_k, cos, sin
    size_t rank;
    CHECK(dims_of(in[0], qd, 4, &rank));
    if (rank != 3) return fail("GroupQueryAttention (autoglm): query must be [batch, sequence, hidden]");
    const int64_t batch = qd[0], seq = qd[1], packed = !in[1];
    const int64_t h = packed ? qd[2] / (op->heads + 2 * op->kv_heads) : qd[2] / op->heads;
    if (h <= 0 || h % 16 || h * (packed ? op->heads + 2 * op->kv_heads : op->heads) != qd[2])
        return fail("GroupQueryAttention (autoglm): head size must be a multiple of 16");
    if (!packed) {
        for (int i = 1; i <= 2; i++) {
            CHECK(dims_of(in[i], kd, 4, &rank));
            if (rank != 3 || kd[0] != batch || kd[1] != seq || kd[2] != op->kv_heads * h)
                return fail("GroupQueryAttention (autoglm): key and value must be [batch, sequence, kv_heads x head size]");
        }
    }
    int64_t past_len = 0;
    if (in[3]) {
        for (int i = 3; i <= 4; i++) {
            CHECK(dims_of(in[i], pd, 4, &rank));
            if (rank != 4 || pd[0] != batch || pd[1] != op->kv_heads || pd[3] != h)
                return fail("GroupQueryAttention (autoglm): past key and value must be [batch, kv_heads, length, head size]");
            if (i == 3) past_len = pd[2];
            else if (pd[2] != past_len) return fail("GroupQueryAttention (autoglm): past key and value differ in length");
        }
    }
    CHECK(dims_of(in[5], ld, 4, &rank));
    if (rank != 1 || ld[0] != batch) return fail("GroupQueryAttention (autoglm): seqlens_k must be [batch]");
    const int32_t *seqlens, *total_p;
    CHECK(ort->GetTensorMutableData((OrtValue *)in[5], (void **)&seqlens));
    CHECK(ort->GetTensorMutableData((OrtValue *)in[6], (void **)&total_p));
    const int64_t total = *total_p, present_len = total > past_len ? total : past_len;
    // onnxruntime's rule: a call whose query is as long as the total is a first prompt (nothing
    // cached); else each sequence's new rows follow its own cached positions, seqlens_k[b] + 1 -
    // seq of them. onnxruntime's kernel takes several new rows after a cache for one sequence
    // only; here every sequence may, as the parallel slots read newcomers' prompts together
    // (edge_agent/runtime/session.py, prefill_rows): a shorter prompt padded at its end.
    const int first = seq == total;
    int64_t *past = malloc(sizeof(int64_t) * (size_t)(batch > 0 ? batch : 1));
    if (!past) return fail("GroupQueryAttention (autoglm): out of memory");
    int64_t most = 0;
    for (int64_t b = 0; b < batch; b++) {
        past[b] = first ? 0 : (int64_t)seqlens[b] + 1 - seq;
        if (past[b] < 0 || past[b] + seq > present_len) {
            free(past);
            return fail("GroupQueryAttention (autoglm): seqlens_k out of range of the KV buffer");
        }
        if (past[b] + seq > most) most = past[b] + seq;
    }
    Call c = {.op = op, .vec = op->vec, .batch = batch, .seq = seq, .head = h, .past = past, .past_len = past_len,
              .present_len = present_len, .kv_size = op->half ? sizeof(uint16_t) : sizeof(float)};
    c.scale = op->scale != 0.0f ? op->scale : 1.0f / _mm_cvtss_f32(_mm_sqrt_ss(_mm_set_ss((float)h)));
    OrtStatus *status = NULL;
    if (op->rotary) {
        if (!in[7]) status = fail("GroupQueryAttention (autoglm): do_rotary needs cos and sin caches");
        if (!status) status = dims_of(in[7], cd, 4, &rank);
        if (!status && (rank != 2 || 2 * cd[1] > h || cd[0] < most))
            status = fail("GroupQueryAttention (autoglm): cos/sin caches too short for these positions or too wide for the head");
        if (!status) status = dims_of(in[8], sd, 4, &rank);
        if (!status && (rank != 2 || sd[0] != cd[0] || sd[1] != cd[1]))
            status = fail("GroupQueryAttention (autoglm): cos and sin caches differ in shape");
        if (!status) status = data_of(in[7], (const void **)&c.cos);
        if (!status) status = data_of(in[8], (const void **)&c.sin);
        c.rot_half = cd[1];
    }
    if (!status) status = data_of(in[0], (const void **)&c.q);
    if (!status && packed) {
        c.q_stride = c.k_stride = c.v_stride = qd[2];
        c.k = c.q + op->heads * h;
        c.v = c.k + op->kv_heads * h;
    } else if (!status) {
        c.q_stride = op->heads * h, c.k_stride = c.v_stride = op->kv_heads * h;
        status = data_of(in[1], (const void **)&c.k);
        if (!status) status = data_of(in[2], (const void **)&c.v);
    }
    OrtValue *outs[3];
    if (!status) {
        const int64_t od[3] = {batch, seq, op->heads * h}, kvd[4] = {batch, op->kv_heads, present_len, h};
        status = ort->KernelContext_GetOutput(context, 0, od, 3, &outs[0]);
        if (!status) status = ort->KernelContext_GetOutput(context, 1, kvd, 4, &outs[1]);
        if (!status) status = ort->KernelContext_GetOutput(context, 2, kvd, 4, &outs[2]);
    }
    if (!status) status = ort->GetTensorMutableData(outs[0], (void **)&c.out);
    if (!status) status = ort->GetTensorMutableData(outs[1], &c.present_k);
    if (!status) status = ort->GetTensorMutableData(outs[2], &c.present_v);
    int shared = 0;
    if (!status && in[3]) {
        // The edge binds one buffer as past and present: new positions are written in place.
        // Otherwise the present starts as a copy of each sequence's past (write_kv) and zeros.
        status = data_of(in[3], &c.past_k);
        if (!status) status = data_of(in[4], &c.past_v);
        shared = !status && c.past_k && c.past_k == c.present_k && c.past_v == c.present_v;
        if (shared) c.past_k = c.past_v = NULL;
        for (int64_t b = 0; !status && !shared && b < batch; b++)
            if (past[b] > past_len) status = fail("GroupQueryAttention (autoglm): seqlens_k beyond the past key and value");
    }
    if (!status && !shared) {
        const size_t bytes = c.kv_size * (size_t)(batch * op->kv_heads * present_len * h);
        memset(c.present_k, 0, bytes), memset(c.present_v, 0, bytes);
    }
    if (!status && seq > 1 && op->half) {
        c.keys_len = (most + 15) / 16 * 16;
        c.values_f = malloc(sizeof(float) * (size_t)(batch * op->kv_heads * h * c.keys_len));
        if (!c.values_f) status = fail("GroupQueryAttention (autoglm): out of memory");
    }
    if (!status && batch * seq > 0) {
        c.blocks = (seq + ROWS - 1) / ROWS;
        const size_t kv_tasks = (size_t)(batch * op->kv_heads);
        if (seq * batch <= 4) {  // a decode step: the new rows are too few to hand off
            for (size_t t = 0; t < kv_tasks; t++) write_kv(&c, t);
        } else {
            status = ort->KernelContext_ParallelFor(context, write_kv, kv_tasks, 0, &c);
        }
        if (!status && seq == 1) {
            const int64_t group = op->heads / op->kv_heads, groups = batch * op->kv_heads;
            int64_t parts = (op->cpus + groups - 1) / groups;
            parts = parts < 1 ? 1 : parts > group ? group : parts;
            c.per_task = (group + parts - 1) / parts;
            parts = (group + c.per_task - 1) / c.per_task;
            status = ort->KernelContext_ParallelFor(context, attend_step, (size_t)(groups * parts), 0, &c);
        } else if (!status) {
            status = ort->KernelContext_ParallelFor(context, attend, (size_t)(batch * op->heads * c.blocks), 0, &c);
        }
        if (!status && c.failed) status = fail("GroupQueryAttention (autoglm): out of memory");
    }
    free(c.values_f);
    free(past);
    return status;
}

static void int_attribute(const OrtKernelInfo *info, const char *name, int64_t fallback, int64_t *out) {
    OrtStatus *status = ort->KernelInfoGetAttribute_int64(info, name, out);
    if (status) ort->ReleaseStatus(status), *out = fallback;  // absent: onnxruntime's default
}

static const char *ORT_API_CALL half_name(const OrtCustomOp *op);

static OrtStatus *ORT_API_CALL create(const OrtCustomOp *custom, const OrtApi *api, const OrtKernelInfo *info, void **out) {
    (void)api;
    Gqa op = {0};
    int64_t smooth, qk_output;
    float softcap = 0.0f;
    CHECK(ort->KernelInfoGetAttribute_int64(info, "num_heads", &op.heads));
    CHECK(ort->KernelInfoGetAttribute_int64(info, "kv_num_heads", &op.kv_heads));
    if (op.heads < 1 || op.kv_heads < 1 || op.heads % op.kv_heads)
        return fail("GroupQueryAttention (autoglm): num_heads must be a multiple of kv_num_heads");
    int_attribute(info, "do_rotary", 0, &op.rotary);
    int_attribute(info, "rotary_interleaved", 0, &op.interleaved);
    int_attribute(info, "local_window_size", -1, &op.window);
    int_attribute(info, "smooth_softmax", 0, &smooth);
    int_attribute(info, "qk_output", 0, &qk_output);
    OrtStatus *status = ort->KernelInfoGetAttribute_float(info, "scale", &op.scale);
    if (status) ort->ReleaseStatus(status), op.scale = 0.0f;
    status = ort->KernelInfoGetAttribute_float(info, "softcap", &softcap);
    if (status) ort->ReleaseStatus(status), softcap = 0.0f;
    if (softcap != 0.0f || smooth || qk_output)
        return fail("GroupQueryAttention (autoglm): softcap, smooth_softmax and qk_output are not supported");
    size_t inputs = 0, outputs = 0;
    CHECK(ort->KernelInfo_GetInputCount(info, &inputs));
    CHECK(ort->KernelInfo_GetOutputCount(info, &outputs));
    if (inputs > 9 || outputs > 3)
        return fail("GroupQueryAttention (autoglm): position_ids, attention_bias, head_sink and output_qk are not supported");
    // The head size is known when the query's last dimension is: refuse now what compute would.
    OrtTypeInfo *type;
    CHECK(ort->KernelInfo_GetInputTypeInfo(info, 0, &type));
    const OrtTensorTypeAndShapeInfo *tensor;
    int64_t dims[3] = {0};
    size_t rank = 0;
    status = ort->CastTypeInfoToTensorInfo(type, &tensor);
    if (!status && tensor) status = ort->GetDimensionsCount(tensor, &rank);
    if (!status && tensor && rank == 3) status = ort->GetDimensions(tensor, dims, 3);
    ort->ReleaseTypeInfo(type);
    if (status) return status;
    char name[256];
    size_t size = sizeof name;
    CHECK(ort->KernelInfo_GetInputName(info, 1, name, &size));
    const int64_t columns = name[0] ? op.heads : op.heads + 2 * op.kv_heads;
    if (rank == 3 && dims[2] > 0 && (dims[2] % columns || dims[2] / columns % 16))
        return fail("GroupQueryAttention (autoglm): head size must be a multiple of 16");
    const int isa = kernels_isa();
    if (isa == ISA_NONE) return fail("GroupQueryAttention (autoglm): this CPU has neither AVX-512 nor AVX2");
    op.half = custom->GetName == half_name;
    // Every CPU's choice but none (AUTOGLM_KERNELS_PREFETCH=0): AMD's too (group_query_attention.h).
    const int pf = kernels_prefetch() != PREFETCH_NONE;
    op.vec = isa == ISA_AVX512 ? (pf ? &attention_avx512_prefetch : &attention_avx512)
                               : (pf ? &attention_avx2_prefetch : &attention_avx2);
    const long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    op.cpus = cpus > 0 ? cpus : 1;
    Gqa *kernel = malloc(sizeof op);
    if (!kernel) return fail("GroupQueryAttention (autoglm): out of memory");
    *kernel = op;
    *out = kernel;
    return NULL;
}

static void ORT_API_CALL destroy(void *op_kernel) { free(op_kernel); }

static const char *ORT_API_CALL op_name(const OrtCustomOp *op) { return (void)op, "GroupQueryAttention"; }
static size_t ORT_API_CALL input_count(const OrtCustomOp *op) { return (void)op, 9; }
static size_t ORT_API_CALL output_count(const OrtCustomOp *op) { return (void)op, 3; }

static ONNXTensorElementDataType ORT_API_CALL input_type(const OrtCustomOp *op, size_t index) {
    (void)op;
    return index == 5 || index == 6 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}

static OrtCustomOpInputOutputCharacteristic ORT_API_CALL input_kind(const OrtCustomOp *op, size_t index) {
    return (void)op, index == 0 || index == 5 || index == 6 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
}

static OrtMemType ORT_API_CALL input_memory(const OrtCustomOp *op, size_t index) {
    // total_sequence_length is read on the host (onnxruntime's own kernel declares it so too).
    return (void)op, index == 6 ? OrtMemTypeCPUInput : OrtMemTypeDefault;
}

DEFINE_CUSTOM_OP(group_query_attention_op)

// ai.autoglm GroupQueryAttentionHalfKV: GroupQueryAttention's inputs and outputs in its order, over
// a KV cache of IEEE half (past and present key and value); query, key, value, the cos/sin caches
// and the output stay float. The packager writes it as a model-local function whose body casts to
// half around onnxruntime's float16 GroupQueryAttention (cloud/packaging/half_kv.py): a session
// without this library runs that. Here the attention is computed in floats, each cached key and
// value widened as it is read, so only the cache's rounding differs from the float op.
static const char *ORT_API_CALL half_name(const OrtCustomOp *op) { return (void)op, "GroupQueryAttentionHalfKV"; }

static ONNXTensorElementDataType ORT_API_CALL half_input_type(const OrtCustomOp *op, size_t index) {
    return index == 3 || index == 4 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 : input_type(op, index);
}

static ONNXTensorElementDataType ORT_API_CALL half_output_type(const OrtCustomOp *op, size_t index) {
    return index == 0 ? output_type(op, index) : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
}

void group_query_attention_half_kv_op(OrtCustomOp *op) {
    group_query_attention_op(op);
    op->GetName = half_name;
    op->GetInputType = half_input_type;
    op->GetOutputType = half_output_type;
}

#endif
