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
// kernels streamed 30-37 GB/s, "150 % of the probe"). Why 32-byte vectors: the second version's
// 64-byte ones, on a CPU without AVX-512 (an AMD EPYC Zen 3), were split into 16-byte halves
// shuffled through the stack (2 threads read 14-18 GB/s through it where our decode kernels
// streamed 26-30). Two 32-byte loads per line XORed into one of eight accumulators fit in 16
// registers, and every CPU since Haswell loads 32 bytes at once.
#include <stddef.h>
#include <stdint.h>

// aligned(8): numpy places a large array 16 bytes into its pages, and every load here may be unaligned.
typedef uint64_t half_t __attribute__((vector_size(32), aligned(8)));

uint64_t read_xor(const uint64_t *p, size_t n) {
    half_t acc[8] = {0};
    const half_t *halves = (const half_t *)p;
    for (size_t i = 0; i < n / 32; i += 16)
        for (int j = 0; j < 8; j++) acc[j] ^= halves[i + 2 * j] ^ halves[i + 2 * j + 1];
    for (int j = 1; j < 8; j++) acc[0] ^= acc[j];
    uint64_t x = 0;
    for (int j = 0; j < 4; j++) x ^= acc[0][j];
    return x;
}
