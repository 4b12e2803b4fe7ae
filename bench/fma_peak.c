// The float32 multiply-add peak probe of bench/edge_decode.py's fma_peak: what a compute-bound
// float32 prefill can reach at most on this CPU.
//
// Why: a 512-token float32 prefill is compute-bound (every weight is used 512 times once read), so
// where both engines reach the same rate the question is whether either has anything left, and
// that is a rate of multiply-adds, not of bytes. On an AMD EPYC Zen 1 VM (two 128-bit FMA pipes,
// so one 8-wide FMA per cycle) both engines' float32 prefills ran at the same rate, level with
// onnxruntime's MLAS.
//
// Twelve independent chains of 8-wide fused multiply-adds (AVX2 + FMA, which every CPU the edge's
// kernels run on has) cover the FMA latency of the CPUs seen here (4-5 cycles, one or two pipes).
// Returns a lane of the sum so the loop is not optimized away; the caller counts 2 × 8 × 12 flops
// per step.
#include <immintrin.h>
#include <stddef.h>

enum { CHAINS = 12 };

float fma_chains(size_t steps) {
  __m256 acc[CHAINS];
  // Multiplier and addend close to 1 and 0 keep the chains finite however long they run.
  const __m256 m = _mm256_set1_ps(0.9999999f), a = _mm256_set1_ps(1e-7f);
  for (int c = 0; c < CHAINS; c++) acc[c] = _mm256_set1_ps((float)c);
  for (size_t i = 0; i < steps; i++)
    for (int c = 0; c < CHAINS; c++) acc[c] = _mm256_fmadd_ps(acc[c], m, a);
  __m256 s = acc[0];
  for (int c = 1; c < CHAINS; c++) s = _mm256_add_ps(s, acc[c]);
  return _mm_cvtss_f32(_mm256_castps256_ps128(s));
}
