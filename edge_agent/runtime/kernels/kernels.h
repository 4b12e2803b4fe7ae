// What the edge's kernel library's files share: the onnxruntime API they were registered with,
// their error status, and the custom ops each file defines (library.c registers them).
#ifndef AUTOGLM_KERNELS_H
#define AUTOGLM_KERNELS_H

#include "onnxruntime_c_api.h"

#if defined(__x86_64__)

extern const OrtApi *ort;  // set by RegisterCustomOps before any op is created

static inline OrtStatus *fail(const char *what) { return ort->CreateStatus(ORT_FAIL, what); }

#define CHECK(call)                  \
    do {                             \
        OrtStatus *status_ = (call); \
        if (status_) return status_; \
    } while (0)

// AVX-512 VNNI and the AVX-512 subsets the kernels use.
static inline int kernels_usable(void) {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

void matmul_nbits_op(OrtCustomOp *op);           // matmul_nbits.c: com.microsoft MatMulNBits
void group_query_attention_op(OrtCustomOp *op);  // group_query_attention.c: com.microsoft GroupQueryAttention

#endif
#endif
