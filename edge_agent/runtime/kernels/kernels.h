// What the edge's kernel library's files share: the onnxruntime API they were registered with,
// their error status, and the custom ops each file defines (library.c registers them).
#ifndef AUTOGLM_KERNELS_H
#define AUTOGLM_KERNELS_H

#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include "onnxruntime_c_api.h"

#if defined(__x86_64__)

extern const OrtApi *ort;  // set by RegisterCustomOps before any op is created

static inline OrtStatus *fail(const char *what) { return ort->CreateStatus(ORT_FAIL, what); }

#define CHECK(call)                  \
    do {                             \
        OrtStatus *status_ = (call); \
        if (status_) return status_; \
    } while (0)

// The instruction sets the kernels are written for, best last: AVX-512 with VNNI, and AVX2 with FMA
// and F16C (AMD Zen 2 and 3, Intel before Ice Lake; every CPU with AVX2 has them), each op with its own routines for either.
enum { ISA_NONE = 0, ISA_AVX2 = 2, ISA_AVX512 = 3 };

// This CPU's best, capped by the environment variable AUTOGLM_KERNELS_ISA=avx2 (a machine with
// AVX-512 then runs and tests what an AVX2-only one would). Read when a session registers the
// library (nothing is registered where this is none) and when each op is created (its routines).
static inline int kernels_isa(void) {
    int isa = ISA_NONE;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) isa = ISA_AVX2;
    if (isa && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vnni"))
        isa = ISA_AVX512;
    const char *cap = getenv("AUTOGLM_KERNELS_ISA");
    if (cap && strcmp(cap, "avx2") == 0 && isa > ISA_AVX2) isa = ISA_AVX2;
    return isa;
}

// Which decode-sized calls prefetch in software ahead of their loads (kernels_prefetch); the
// attention's keys and values (group_query_attention.h, the *_prefetch tables) under both
// PREFETCH_ALL and PREFETCH_LONE_INT8, not under PREFETCH_NONE.
// PREFETCH_ALL: the matmul tiles' (PREFETCH, FLOAT_PREFETCH, the AVX2 tiles' lone rows: they
// prefetch 2-4-row calls on any CPU), on Intel's cores, whose hardware prefetchers alone left a task's one
// sequential stream short of the memory (Xeon VM: Qwen2-0.5B int4 1-row steps 1.28-1.37x, 4-row
// 1.40-1.44x faster with them). PREFETCH_LONE_INT8: only the AVX-512 tile's lone 8-bit rows
// (LONE_PREFETCH), on AMD's, where the prefetches took load slots from 4-bit and 2-4-row calls
// (Zen 4 VM: 1-row steps 6-18 % slower), but a
// lone 8-bit row, whose loads come twice as fast as a 4-bit one's, outran the hardware prefetchers (Zen 4 VM:
// Llama-134M int8 1-row steps 1.07-1.17x faster with them; bench/RESULTS.md). PREFETCH_NONE:
// neither (the AVX2 tiles' 2-4-row calls prefetch whatever this says).
// AUTOGLM_KERNELS_PREFETCH=0 (none) or 1 (all) overrides; -DKERNELS_PREFETCH=0 or 1 builds a
// library whose default is that on every CPU (bench/engine_steps.py compares libraries). Read when
// each op is created.
enum { PREFETCH_NONE = 0, PREFETCH_LONE_INT8 = 1, PREFETCH_ALL = 2 };
static inline int kernels_prefetch(void) {
    const char *set = getenv("AUTOGLM_KERNELS_PREFETCH");
    if (set && (strcmp(set, "0") == 0 || strcmp(set, "1") == 0)) return set[0] == '1' ? PREFETCH_ALL : PREFETCH_NONE;
#ifdef KERNELS_PREFETCH
    return KERNELS_PREFETCH ? PREFETCH_ALL : PREFETCH_NONE;
#else
    return __builtin_cpu_is("intel") ? PREFETCH_ALL : PREFETCH_LONE_INT8;
#endif
}

// Whether this process may run AMX's int8 tiles (matmul_nbits_amx.c): an AVX-512 CPU with AMX-INT8,
// Linux granting the tile state (asked once), AUTOGLM_KERNELS_AMX not 0 (read when each op is made).
int kernels_amx(void);
void matmul_nbits_op(OrtCustomOp *op);           // matmul_nbits.c: com.microsoft MatMulNBits
void group_query_attention_op(OrtCustomOp *op);  // group_query_attention.c: com.microsoft GroupQueryAttention
void group_query_attention_half_kv_op(OrtCustomOp *op);  // and ai.autoglm GroupQueryAttentionHalfKV
// matmul_nbits_fused.c: adds the ai.autoglm ops (MatMulNBitsSwiGLU, SkipRMSNorm...) to domain.
OrtStatus *matmul_nbits_fused_ops(OrtCustomOpDomain *domain);

// What every op of the library shares: the CPU provider, float outputs, all of them required,
// any opset version.
static inline const char *ORT_API_CALL op_provider(const OrtCustomOp *op) { return (void)op, "CPUExecutionProvider"; }

static inline ONNXTensorElementDataType ORT_API_CALL output_type(const OrtCustomOp *op, size_t index) {
    return (void)op, (void)index, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}

static inline OrtCustomOpInputOutputCharacteristic ORT_API_CALL output_kind(const OrtCustomOp *op, size_t index) {
    return (void)op, (void)index, INPUT_OUTPUT_REQUIRED;
}

static inline int ORT_API_CALL start_version(const OrtCustomOp *op) { return (void)op, 1; }
static inline int ORT_API_CALL end_version(const OrtCustomOp *op) { return (void)op, INT_MAX; }

// Defines `void NAME(OrtCustomOp *op)`, which fills op from the static functions the op's file
// defines under these names: op_name, input_count, input_type, input_kind, input_memory,
// output_count, create, compute, destroy.
#define DEFINE_CUSTOM_OP(NAME)                        \
    void NAME(OrtCustomOp *op) {                      \
        *op = (OrtCustomOp){0};                       \
        op->version = ORT_API_VERSION;                \
        op->GetName = op_name;                        \
        op->GetExecutionProviderType = op_provider;   \
        op->GetInputType = input_type;                \
        op->GetInputTypeCount = input_count;          \
        op->GetOutputType = output_type;              \
        op->GetOutputTypeCount = output_count;        \
        op->GetInputCharacteristic = input_kind;      \
        op->GetOutputCharacteristic = output_kind;    \
        op->GetInputMemoryType = input_memory;        \
        op->CreateKernelV2 = create;                  \
        op->KernelComputeV2 = compute;                \
        op->KernelDestroy = destroy;                  \
        op->GetStartVersion = start_version;          \
        op->GetEndVersion = end_version;              \
    }

#endif
#endif
