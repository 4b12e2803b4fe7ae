// Memory for the packed weights (matmul_nbits.c): carved from 2 MiB-aligned chunks the kernel is
// asked to back with transparent huge pages.
//
// Why: a decode step reads every weight once, ~70 MB for SmolLM2 at int4 in ~120 matrices of
// 0.2-14 MB. In 4 KiB pages that is ~17,000 pages a step, far beyond the CPU's TLB, so the
// weight streams keep stopping for page walks; 2 MiB pages cover them with ~35 entries. AMD EPYC
// Zen 3 VM, SmolLM2 int4, same graph in one process, three runs (bench/RESULTS.md): a 1-row
// decode step 4-7 % faster, a 4-row one 5-6 %.
//
// How: each allocation takes the next whole 4 KiB pages of the current chunk (64 MiB of address
// space, MADV_HUGEPAGE; a larger allocation gets a chunk of its own); a chunk is unmapped when
// the last allocation in it is freed, so a session's weights go when its kernels go (a chunk
// shared with a later session's first kernels stays until those go too). Only pages written are
// resident: beyond the last allocation at most one huge page. Where the kernel has no
// transparent huge pages (or the madvise is refused) the chunks are ordinary memory; where mmap
// fails, the allocation comes from aligned_alloc. Every allocation is zeroed.
#include "kernels.h"

#if defined(__x86_64__)
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "matmul_nbits.h"

#define CHUNK ((size_t)64 << 20)
#define HUGE_PAGE ((size_t)2 << 20)
#define PAGE ((size_t)4096)

typedef struct Chunk {
    uint8_t *base;
    size_t size, used, live;  // live: allocations not yet freed
    struct Chunk *next;
} Chunk;

// Sessions are created and released from any thread.
static Chunk *chunks;  // the newest first: allocations come from it
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

// A new chunk of at least `bytes`, 2 MiB-aligned (an unaligned mapping trimmed at both ends).
static Chunk *chunk_new(size_t bytes) {
    const size_t size = bytes > CHUNK ? (bytes + HUGE_PAGE - 1) / HUGE_PAGE * HUGE_PAGE : CHUNK;
    uint8_t *raw = mmap(NULL, size + HUGE_PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) return NULL;
    Chunk *c = malloc(sizeof *c);
    if (!c) {
        munmap(raw, size + HUGE_PAGE);
        return NULL;
    }
    uint8_t *base = (uint8_t *)(((uintptr_t)raw + HUGE_PAGE - 1) / HUGE_PAGE * HUGE_PAGE);
    if (base > raw) munmap(raw, (size_t)(base - raw));
    if (raw + size + HUGE_PAGE > base + size) munmap(base + size, (size_t)(raw + size + HUGE_PAGE - (base + size)));
    (void)madvise(base, size, MADV_HUGEPAGE);  // a hint: refused, the chunk is ordinary memory
    *c = (Chunk){base, size, 0, 0, NULL};
    return c;
}

void *arena_alloc(size_t bytes) {
    bytes = (bytes + PAGE - 1) / PAGE * PAGE;
    if (!bytes) bytes = PAGE;
    pthread_mutex_lock(&lock);
    Chunk *c = chunks;
    if (!c || c->size - c->used < bytes) {
        c = chunk_new(bytes);
        if (c) {
            if (bytes > CHUNK && chunks) {  // a chunk of its own: the current one stays current
                c->next = chunks->next;
                chunks->next = c;
            } else {
                c->next = chunks;
                chunks = c;
            }
        }
    }
    uint8_t *p = NULL;
    if (c) {
        p = c->base + c->used;  // never handed out before: zero
        c->used += bytes, c->live++;
    }
    pthread_mutex_unlock(&lock);
    if (!p && (p = aligned_alloc(PAGE, bytes))) memset(p, 0, bytes);
    return p;
}

void arena_free(void *p) {
    if (!p) return;
    pthread_mutex_lock(&lock);
    for (Chunk **at = &chunks; *at; at = &(*at)->next) {
        Chunk *c = *at;
        if ((uint8_t *)p < c->base || (uint8_t *)p >= c->base + c->size) continue;
        if (--c->live == 0) {
            munmap(c->base, c->size);
            *at = c->next;
            free(c);
        }
        pthread_mutex_unlock(&lock);
        return;
    }
    pthread_mutex_unlock(&lock);
    free(p);  // from aligned_alloc
}

#endif
