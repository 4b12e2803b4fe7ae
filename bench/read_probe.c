// The read-only memory probe of bench/edge_decode.py's read_bandwidth: the XOR of n bytes (a
// multiple of 512), read front to back.
//
// Why C: numpy's fastest plain read (bitwise_or.reduce over 64-bit words) keeps one accumulator,
// so a thread has few loads in flight and stops well short of the memory: on an Intel Xeon VM 2
// threads read 16-24 GB/s through it against 26-28 through this loop, and our own int8 decode
// kernels streamed faster than numpy's "ceiling" (bench/RESULTS.md). Eight independent
// accumulators of one cache line each (a 512-byte step) keep every line of a step in flight at
// once, as a decode step's weight stream does.
//
// Why vector types: the first version XORed 64 uint64_t lanes and left the vectorizing to the
// compiler; GCC 12 with -march=native vectorized it well for an Intel Xeon but not for an AMD EPYC
// Zen 4, where 2 threads read 20 GB/s through it against 30-39 through this loop (and our decode
// kernels streamed 30-37 GB/s, "150 % of the probe"). Spelled as vectors (split into 32- or
// 16-byte registers where the CPU has no 64-byte ones) the loop is the same on every CPU.
#include <stddef.h>
#include <stdint.h>

// aligned(8): numpy places a large array 16 bytes into its pages, and every load here may be unaligned.
typedef uint64_t line_t __attribute__((vector_size(64), aligned(8)));

uint64_t read_xor(const uint64_t *p, size_t n) {
    line_t acc[8] = {0};
    const line_t *lines = (const line_t *)p;
    for (size_t i = 0; i < n / 64; i += 8)
        for (int j = 0; j < 8; j++) acc[j] ^= lines[i + j];
    for (int j = 1; j < 8; j++) acc[0] ^= acc[j];
    uint64_t x = 0;
    for (int j = 0; j < 8; j++) x ^= acc[0][j];
    return x;
}
