// The read-only memory probe of bench/edge_decode.py's read_bandwidth: the XOR of n bytes (a
// multiple of 512), read front to back.
//
// Why C: numpy's fastest plain read (bitwise_or.reduce over 64-bit words) keeps one accumulator,
// so a thread has few loads in flight and stops well short of the memory: on an Intel Xeon VM 2
// threads read 16-24 GB/s through it against 26-28 through this loop, and our own int8 decode
// kernels streamed faster than numpy's "ceiling" (bench/RESULTS.md). Sixty-four independent
// accumulators (a 512-byte step: eight cache lines) let the compiler vectorize the XORs and keep
// every line of a step in flight at once, as a decode step's weight stream does.
#include <stddef.h>
#include <stdint.h>

uint64_t read_xor(const uint64_t *p, size_t n) {
    uint64_t acc[64] = {0};
    for (size_t i = 0; i < n / 8; i += 64)
        for (int j = 0; j < 64; j++) acc[j] ^= p[i + j];
    uint64_t x = 0;
    for (int j = 0; j < 64; j++) x ^= acc[j];
    return x;
}
