// The edge's kernel library: an onnxruntime custom-op library that registers, under their own
// names in the com.microsoft domain (so a packaged graph runs unchanged with it), the ops that
// dominate a decode step on the CPU:
//   matmul_nbits.c           MatMulNBits: the quantized weight matmuls of int8 and int4 graphs
//                            (its AVX2 tile in matmul_nbits_avx2.c, its AMX tile for calls of
//                            more than 4 rows in matmul_nbits_amx.c)
//   group_query_attention.c  GroupQueryAttention: attention over the shared KV buffers (vector
//                            routines in attention_avx512.c and attention_avx2.c)
// and, in their own domain ai.autoglm, ops of ours that onnxruntime does not have, which the
// packager writes as model-local functions (so a session without this library inlines them):
//   matmul_nbits_fused.c     MatMulNBitsSwiGLU, SkipRMSNormMatMulNBits, SkipRMSNormSwiGLU: a
//                            layer's norms and gated-MLP activation folded into its matmuls;
//                            MatMulFloat and its three fused forms, the same over an fp32
//                            graph's float weights (their tiles in matmul_float.c)
//   group_query_attention.c  GroupQueryAttentionHalfKV: the attention over a half-precision KV
//                            cache (half the cache's memory and reads)
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
static OrtCustomOp matmul_nbits;
#ifndef AUTOGLM_NO_ATTENTION
static OrtCustomOp attention, attention_half_kv;
#endif
// Filled and created once, at the first registration: sessions made earlier read them on every
// call, and onnxruntime requires a domain to outlive its sessions. Which routines run (AVX-512 or
// AVX2) each op decides when it is created (kernels_isa), so one domain serves every session.
static OrtCustomOpDomain *domain, *own_domain;

// Whether this CPU runs the kernels (asked through ctypes before a session is made with them).
__attribute__((visibility("default"))) int AutoglmKernelsUsable(void) { return kernels_isa() != ISA_NONE; }

// The instruction set the kernels would use here: 0 none, 2 AVX2, 3 AVX-512 VNNI.
__attribute__((visibility("default"))) int AutoglmKernelsIsa(void) { return kernels_isa(); }

// Whether calls of more than 4 rows run AMX tiles here (matmul_nbits_amx.c): 1 or 0.
__attribute__((visibility("default"))) int AutoglmKernelsAmx(void) { return kernels_amx(); }

// Which decode calls of ops created now prefetch (kernels_prefetch): 0 none, 1 lone 8-bit rows, 2 all.
__attribute__((visibility("default"))) int AutoglmKernelsPrefetch(void) { return kernels_prefetch(); }

// The entry point onnxruntime calls when a session registers this library: both ops on CPUs with
// AVX2 or AVX-512, nothing on others (onnxruntime's own kernels then run).
__attribute__((visibility("default"))) OrtStatus *ORT_API_CALL RegisterCustomOps(OrtSessionOptions *options,
                                                                                const OrtApiBase *base) {
    if (!ort) ort = base->GetApi(ORT_API_VERSION);
    if (!ort) return NULL;  // an onnxruntime older than our header: nothing registered, built-in kernels run
    if (kernels_isa() == ISA_NONE) return NULL;
    if (!domain) {
        matmul_nbits_op(&matmul_nbits);
        CHECK(ort->CreateCustomOpDomain("com.microsoft", &domain));
        CHECK(ort->CustomOpDomain_Add(domain, &matmul_nbits));
#ifndef AUTOGLM_NO_ATTENTION
        group_query_attention_op(&attention);
        CHECK(ort->CustomOpDomain_Add(domain, &attention));
#endif
        CHECK(ort->CreateCustomOpDomain("ai.autoglm", &own_domain));
        CHECK(matmul_nbits_fused_ops(own_domain));
#ifndef AUTOGLM_NO_ATTENTION
        group_query_attention_half_kv_op(&attention_half_kv);
        CHECK(ort->CustomOpDomain_Add(own_domain, &attention_half_kv));
#endif
    }
    CHECK(ort->AddCustomOpDomain(options, domain));
    return ort->AddCustomOpDomain(options, own_domain);
}

#else  // not x86-64: a library that registers nothing, so onnxruntime's own kernels run

__attribute__((visibility("default"))) int AutoglmKernelsUsable(void) { return 0; }
__attribute__((visibility("default"))) int AutoglmKernelsIsa(void) { return 0; }
__attribute__((visibility("default"))) int AutoglmKernelsAmx(void) { return 0; }

__attribute__((visibility("default"))) OrtStatus *ORT_API_CALL RegisterCustomOps(OrtSessionOptions *options,
                                                                                const OrtApiBase *base) {
    (void)options, (void)base;
    return NULL;
}

#endif
