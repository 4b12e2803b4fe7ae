// The edge's kernel library: an onnxruntime custom-op library that registers, under their own
// names in the com.microsoft domain (so a packaged graph runs unchanged with it), the ops that
// dominate a decode step on the CPU:
//   matmul_nbits.c           MatMulNBits: the quantized weight matmuls of int8 and int4 graphs
//   group_query_attention.c  GroupQueryAttention: attention over the shared KV buffers
// edge_agent.runtime.kernels finds the built library; OnnxCausalLM registers it and runs the graph
// on onnxruntime's own kernels wherever the session refuses it (an op refuses what it does not
// take, and the refusal fails the session).
//
// Built by pip (pyproject.toml, tool.setuptools.ext-modules; optional: no compiler, no library)
// against include/onnxruntime_c_api.h, onnxruntime 1.21's C API header (MIT licence, Microsoft);
// newer onnxruntime releases serve that API version. By hand (one command):
//   gcc -O3 -shared -fPIC -fvisibility=hidden -I edge_agent/runtime/kernels/include
//       edge_agent/runtime/kernels/*.c -o libautoglm_kernels.so
#include "kernels.h"

#if defined(__x86_64__)

const OrtApi *ort;

// -DAUTOGLM_NO_ATTENTION builds a library with MatMulNBits alone (bench/engine_steps.py compares).
#ifdef AUTOGLM_NO_ATTENTION
static OrtCustomOp ops[1];
#else
static OrtCustomOp ops[2];
#endif
static OrtCustomOpDomain *domain;

// Whether this CPU runs the kernels (asked through ctypes before a session is made with them).
__attribute__((visibility("default"))) int AutoglmKernelsUsable(void) { return kernels_usable(); }

// The entry point onnxruntime calls when a session registers this library.
__attribute__((visibility("default"))) OrtStatus *ORT_API_CALL RegisterCustomOps(OrtSessionOptions *options,
                                                                                const OrtApiBase *base) {
    if (!ort) ort = base->GetApi(ORT_API_VERSION);
    if (!ort) return NULL;  // an onnxruntime older than our header: nothing registered, built-in kernels run
    if (!domain) {
        matmul_nbits_op(&ops[0]);
#ifndef AUTOGLM_NO_ATTENTION
        group_query_attention_op(&ops[1]);
#endif
        CHECK(ort->CreateCustomOpDomain("com.microsoft", &domain));
        for (size_t i = 0; i < sizeof ops / sizeof ops[0]; i++) CHECK(ort->CustomOpDomain_Add(domain, &ops[i]));
    }
    return ort->AddCustomOpDomain(options, domain);
}

#else  // not x86-64: a library that registers nothing, so onnxruntime's own kernels run

__attribute__((visibility("default"))) int AutoglmKernelsUsable(void) { return 0; }

__attribute__((visibility("default"))) OrtStatus *ORT_API_CALL RegisterCustomOps(OrtSessionOptions *options,
                                                                                const OrtApiBase *base) {
    (void)options, (void)base;
    return NULL;
}

#endif
