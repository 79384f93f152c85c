/*
 * exercise: every function of xalloc.h, linked statically with lib/libxalloc.a, checked from C.
 * Run by tests/tests/c_library.rs.
 *
 *   exercise daemon|none [SECTION...]
 *
 * `daemon`: a daemon (XALLOC_NAME) serves, so large blocks must be in its arena; `none`: no
 * daemon answers, so every block comes from the system allocator. With SECTIONs, only those
 * run (see `sections` below); else all of them but `quota` (which needs a daemon started with
 * --client-quota 4M), in order.
 *
 * Output, one fact a line: `threshold=N`, `ok SECTION` for a section whose every check held,
 * `skip SECTION (why)`, `FAIL file:line: what` for a check that did not hold, `FAILED SECTION`,
 * facts as `NAME k=v k=v`, then `stats k=v...` (the final xalloc_stats) and `result
 * failures=N`. Exit status 0 if no check failed, 1 otherwise.
 */
#define _POSIX_C_SOURCE 200809L

#include "xalloc.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define KIB ((size_t)1024)
#define MIB (KIB * KIB)

/* 1 if a daemon serves (large blocks must be shared), 0 if none does. */
static int expect_shared;
/* The threshold the library uses (from xalloc_stats). */
static size_t threshold;

static pthread_mutex_t fail_lock = PTHREAD_MUTEX_INITIALIZER;
static unsigned failures;

static unsigned failures_now(void)
{
    pthread_mutex_lock(&fail_lock);
    unsigned n = failures;
    pthread_mutex_unlock(&fail_lock);
    return n;
}

static void fail(int line, const char *what)
{
    pthread_mutex_lock(&fail_lock);
    failures++;
    printf("FAIL exercise.c:%d: %s\n", line, what);
    fflush(stdout);
    pthread_mutex_unlock(&fail_lock);
}

#define CHECK(cond)                                                                              \
    do {                                                                                         \
        if (!(cond))                                                                             \
            fail(__LINE__, #cond);                                                               \
    } while (0)

static void section_end(const char *name, unsigned before)
{
    if (failures_now() == before)
        printf("ok %s\n", name);
    else
        printf("FAILED %s\n", name);
    fflush(stdout);
}

static struct xalloc_stats stats(void)
{
    struct xalloc_stats s;
    memset(&s, 0, sizeof s);
    size_t n = xalloc_stats(&s, sizeof s);
    CHECK(n == sizeof s);
    return s;
}

/* The byte at index `i` of a block filled with `seed`: byte i % 8 (little-endian) of word
 * i / 8, so that a prefix of a filled block holds the same pattern whatever its length. */
static uint64_t word_of(uint64_t seed, size_t w)
{
    return seed ^ ((uint64_t)w * 0x9e3779b97f4a7c15ULL) ^ ((uint64_t)w >> 7);
}

static unsigned char byte_of(uint64_t seed, size_t i)
{
    return (unsigned char)(word_of(seed, i / 8) >> (8 * (i % 8)));
}

/* Fills `n` bytes at `p` (8-aligned) with the pattern of `seed`. */
static void fill(void *p, size_t n, uint64_t seed)
{
    uint64_t *w = p;
    unsigned char *b = p;
    size_t words = n / 8;
    for (size_t i = 0; i < words; i++)
        w[i] = word_of(seed, i);
    for (size_t i = words * 8; i < n; i++)
        b[i] = byte_of(seed, i);
}

/* Whether the first `n` bytes at `p` hold the pattern of `seed`. */
static int holds(const void *p, size_t n, uint64_t seed)
{
    const uint64_t *w = p;
    const unsigned char *b = p;
    size_t words = n / 8;
    uint64_t diff = 0;
    for (size_t i = 0; i < words; i++)
        diff |= w[i] ^ word_of(seed, i);
    for (size_t i = words * 8; i < n; i++)
        diff |= (uint64_t)(b[i] ^ byte_of(seed, i));
    return diff == 0;
}

static int all_bytes(const void *p, size_t n, unsigned char v)
{
    const unsigned char *b = p;
    unsigned char diff = 0;
    for (size_t i = 0; i < n; i++)
        diff |= (unsigned char)(b[i] ^ v);
    return diff == 0;
}

static int aligned(const void *p, size_t align)
{
    return ((uintptr_t)p & (align - 1)) == 0;
}

/* ---- basics: malloc, free, usable_size, is_shared, the exact threshold ---- */

static void section_basics(void)
{
    unsigned before = failures_now();
    int local = 0;

    CHECK(xalloc_is_shared(NULL) == 0);
    CHECK(xalloc_is_shared(&local) == 0);
    CHECK(xalloc_usable_size(NULL) == 0);
    xalloc_free(NULL);

    /* malloc(0): unique pointers that can be freed. */
    void *z1 = xalloc_malloc(0), *z2 = xalloc_malloc(0);
    CHECK(z1 != NULL && z2 != NULL && z1 != z2);
    xalloc_free(z1);
    xalloc_free(z2);

    /* Small blocks: the system allocator's, aligned to 16. */
    static const size_t small[] = {1, 8, 24, 100, 1000, 4096, 65536, 200 * 1024};
    for (size_t i = 0; i < sizeof small / sizeof small[0]; i++) {
        size_t n = small[i];
        if (n >= threshold)
            continue;
        unsigned char *p = xalloc_malloc(n);
        CHECK(p != NULL);
        if (p == NULL)
            continue;
        CHECK(aligned(p, 16));
        CHECK(xalloc_is_shared(p) == 0);
        CHECK(xalloc_usable_size(p) >= n);
        fill(p, n, 0x5a00 + i);
        CHECK(holds(p, n, 0x5a00 + i));
        xalloc_free(p);
    }

    /* Large blocks (from the threshold on): the arena's with a daemon, inside and up to their
     * last byte. */
    static const size_t large[] = {0, 1, 768 * KIB, 3 * MIB + 24, 8 * MIB, 32 * MIB};
    unsigned char *held[sizeof large / sizeof large[0]];
    for (size_t i = 0; i < sizeof large / sizeof large[0]; i++) {
        size_t n = threshold + large[i];
        unsigned char *p = held[i] = xalloc_malloc(n);
        CHECK(p != NULL);
        if (p == NULL)
            continue;
        CHECK(aligned(p, 16));
        CHECK(xalloc_is_shared(p) == expect_shared);
        CHECK(xalloc_is_shared(p + n / 2) == expect_shared);
        CHECK(xalloc_is_shared(p + n - 1) == expect_shared);
        CHECK(xalloc_usable_size(p) >= n);
        fill(p, n, 0x1a00 + i);
    }
    /* All held at once: no two overlap. */
    for (size_t i = 0; i < sizeof large / sizeof large[0]; i++) {
        if (held[i] == NULL)
            continue;
        CHECK(holds(held[i], threshold + large[i], 0x1a00 + i));
        xalloc_free(held[i]);
    }

    /* The threshold itself: one byte less is small. */
    unsigned char *below = xalloc_malloc(threshold - 1), *at = xalloc_malloc(threshold);
    CHECK(below != NULL && at != NULL);
    if (below != NULL && at != NULL) {
        CHECK(xalloc_is_shared(below) == 0);
        CHECK(xalloc_is_shared(at) == expect_shared);
        fill(below, threshold - 1, 7);
        fill(at, threshold, 8);
        CHECK(holds(below, threshold - 1, 7) && holds(at, threshold, 8));
    }
    xalloc_free(below);
    xalloc_free(at);

    /* Requests no allocator can serve: NULL and ENOMEM. */
    errno = 0;
    CHECK(xalloc_malloc(SIZE_MAX) == NULL);
    CHECK(errno == ENOMEM);
    errno = 0;
    CHECK(xalloc_malloc(SIZE_MAX / 2 + 1) == NULL);
    CHECK(errno == ENOMEM);

    /* The static library does not replace the program's malloc: its large blocks stay the
     * system's, and xalloc_free accepts them (as the header says). */
    void *m = malloc(4 * MIB);
    CHECK(m != NULL);
    CHECK(xalloc_is_shared(m) == 0);
    xalloc_free(m);
    m = malloc(100);
    CHECK(m != NULL);
    xalloc_free(m);

    section_end("basics", before);
}

/* ---- threads: 8 threads of large and small blocks, each with its own pattern ---- */

enum { THREADS = 8, ITERS = 40, SLOTS = 4 };

struct thread_result {
    unsigned id;
    unsigned large_shared, large_system, small_blocks, reallocs;
};

static uint64_t next_rand(uint64_t *s)
{
    *s = *s * 6364136223846793005ULL + 1442695040888963407ULL;
    return *s >> 33;
}

/* Checks and frees a held block. */
static void release(unsigned char **p, size_t *n, uint64_t seed)
{
    if (*p == NULL)
        return;
    CHECK(holds(*p, *n, seed));
    CHECK(xalloc_usable_size(*p) >= *n);
    xalloc_free(*p);
    *p = NULL;
}

static void *thread_main(void *arg)
{
    struct thread_result *r = arg;
    uint64_t rng = 0x243f6a8885a308d3ULL * (r->id + 1);
    unsigned char *p[SLOTS] = {NULL};
    size_t n[SLOTS] = {0};
    uint64_t seed[SLOTS] = {0};

    for (unsigned it = 0; it < ITERS; it++) {
        unsigned k = it % SLOTS;
        release(&p[k], &n[k], seed[k]);
        size_t size;
        if (it % 4 == 3)
            size = 16 + (size_t)(next_rand(&rng) % (64 * KIB));
        else
            size = 256 * KIB + (size_t)(next_rand(&rng) % (8 * MIB - 256 * KIB));
        size &= ~(size_t)7;
        uint64_t s = ((uint64_t)(r->id + 1) << 48) ^ ((uint64_t)it << 24) ^ 0xc0ffee;
        unsigned char *q = NULL;
        switch ((it / SLOTS + r->id) % 5) {
        case 0:
            q = xalloc_malloc(size);
            break;
        case 1:
            q = xalloc_calloc(size / 8, 8);
            CHECK(q != NULL && all_bytes(q, size, 0));
            break;
        case 2: {
            size_t align = (size_t)64 << (next_rand(&rng) % 10);
            q = xalloc_aligned_alloc(align, size);
            CHECK(q != NULL && aligned(q, align));
            break;
        }
        case 3:
            q = xalloc_realloc(NULL, size);
            break;
        default: {
            /* Grows from a small block to `size`, its bytes kept. */
            size_t first = size / 3 < 1000 ? size / 3 + 8 : 1000;
            first &= ~(size_t)7;
            q = xalloc_malloc(first);
            CHECK(q != NULL);
            if (q == NULL)
                break;
            fill(q, first, s + 1);
            unsigned char *g = xalloc_realloc(q, size);
            CHECK(g != NULL);
            if (g == NULL) {
                xalloc_free(q);
                q = NULL;
                break;
            }
            CHECK(holds(g, first, s + 1));
            q = g;
            r->reallocs++;
        }
        }
        CHECK(q != NULL);
        if (q == NULL)
            continue;
        if (size >= threshold) {
            if (xalloc_is_shared(q))
                r->large_shared++;
            else
                r->large_system++;
        } else {
            CHECK(xalloc_is_shared(q) == 0);
            r->small_blocks++;
        }
        fill(q, size, s);
        p[k] = q;
        n[k] = size;
        seed[k] = s;

        /* Now and then, resize a held block: half or double, the common prefix kept. */
        if (it % 6 == 5) {
            unsigned j = (k + 1) % SLOTS;
            if (p[j] != NULL) {
                size_t to = it % 12 == 5 ? n[j] / 2 : n[j] * 2;
                to = (to & ~(size_t)7) + 8;
                if (to > 12 * MIB)
                    to = 12 * MIB;
                unsigned char *g = xalloc_realloc(p[j], to);
                CHECK(g != NULL);
                if (g != NULL) {
                    size_t keep = to < n[j] ? to : n[j];
                    CHECK(holds(g, keep, seed[j]));
                    seed[j] ^= 0x5555;
                    fill(g, to, seed[j]);
                    p[j] = g;
                    n[j] = to;
                    r->reallocs++;
                }
            }
        }
        /* Every held block still holds its own pattern (no other thread wrote into it). */
        for (unsigned i = 0; i < SLOTS; i++)
            if (p[i] != NULL && !holds(p[i], n[i], seed[i]))
                fail(__LINE__, "a held block changed under its thread");
    }
    for (unsigned k = 0; k < SLOTS; k++)
        release(&p[k], &n[k], seed[k]);
    return NULL;
}

static void section_threads(void)
{
    unsigned before = failures_now();
    pthread_t t[THREADS];
    struct thread_result r[THREADS];
    memset(r, 0, sizeof r);
    for (unsigned i = 0; i < THREADS; i++) {
        r[i].id = i;
        CHECK(pthread_create(&t[i], NULL, thread_main, &r[i]) == 0);
    }
    unsigned shared = 0, system = 0, small = 0, reallocs = 0;
    for (unsigned i = 0; i < THREADS; i++) {
        CHECK(pthread_join(t[i], NULL) == 0);
        shared += r[i].large_shared;
        system += r[i].large_system;
        small += r[i].small_blocks;
        reallocs += r[i].reallocs;
    }
    printf("threads threads=%u large_shared=%u large_system=%u small=%u reallocs=%u\n",
           (unsigned)THREADS, shared, system, small, reallocs);
    if (expect_shared)
        CHECK(shared > 0);
    else
        CHECK(shared == 0);
    CHECK(small > 0 && reallocs > 0);
    section_end("threads", before);
}

/* ---- alignment: 16 .. 2 MiB, small and large, and alignments that are no power of two ---- */

static void section_align(void)
{
    unsigned before = failures_now();
    enum { N = 20 };
    unsigned char *big[N] = {NULL};
    size_t big_n[N] = {0}, aligns[N] = {0};
    unsigned count = 0;

    for (size_t a = 16; a <= 2 * MIB; a *= 2, count++) {
        aligns[count] = a;
        unsigned char *p = xalloc_aligned_alloc(a, 100);
        CHECK(p != NULL);
        if (p != NULL) {
            CHECK(aligned(p, a));
            CHECK(xalloc_is_shared(p) == 0);
            CHECK(xalloc_usable_size(p) >= 100);
            fill(p, 100, a);
            CHECK(holds(p, 100, a));
            xalloc_free(p);
        }
        /* Large, a size that is no multiple of the alignment; all held at once. */
        size_t n = 1 * MIB + a / 2 + 8;
        unsigned char *q = big[count] = xalloc_aligned_alloc(a, n);
        big_n[count] = n;
        CHECK(q != NULL);
        if (q != NULL) {
            CHECK(aligned(q, a));
            CHECK(xalloc_is_shared(q) == expect_shared);
            CHECK(xalloc_usable_size(q) >= n);
            fill(q, n, 0xa11a + a);
        }
    }
    /* A big block at the biggest alignment. */
    big[count] = xalloc_aligned_alloc(2 * MIB, 6 * MIB + 4096);
    big_n[count] = 6 * MIB + 4096;
    aligns[count] = 2 * MIB;
    CHECK(big[count] != NULL && aligned(big[count], 2 * MIB));
    CHECK(xalloc_is_shared(big[count]) == expect_shared);
    if (big[count] != NULL)
        fill(big[count], big_n[count], 0xa11a + 4 * MIB);
    count++;
    for (unsigned i = 0; i < count; i++) {
        if (big[i] == NULL)
            continue;
        CHECK(holds(big[i], big_n[i], 0xa11a + (i + 1 == count ? 4 * MIB : aligns[i])));
        xalloc_free(big[i]);
    }

    /* Not a power of two: NULL and EINVAL, small or large. */
    static const size_t bad[] = {0, 3, 24, 48, 96, 3 * 4096, 2 * MIB + 16, SIZE_MAX};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        errno = 0;
        CHECK(xalloc_aligned_alloc(bad[i], 100) == NULL);
        CHECK(errno == EINVAL);
        errno = 0;
        CHECK(xalloc_aligned_alloc(bad[i], 1 * MIB) == NULL);
        CHECK(errno == EINVAL);
    }
    /* A size no allocator has: ENOMEM. */
    errno = 0;
    CHECK(xalloc_aligned_alloc(4096, SIZE_MAX - 4096) == NULL);
    CHECK(errno == ENOMEM);
    section_end("align", before);
}

/* ---- realloc: across the threshold both ways, in place, NULL and 0 ---- */

static void section_realloc(void)
{
    unsigned before = failures_now();
    struct xalloc_stats s0 = stats();

    unsigned char *p = xalloc_malloc(64 * KIB);
    CHECK(p != NULL && xalloc_is_shared(p) == 0);
    if (p == NULL)
        return;
    fill(p, 64 * KIB, 101);
    /* Up across the threshold: into the arena. */
    unsigned char *q = xalloc_realloc(p, 4 * MIB);
    CHECK(q != NULL);
    if (q == NULL) {
        xalloc_free(p);
        return;
    }
    CHECK(holds(q, 64 * KIB, 101));
    CHECK(xalloc_is_shared(q) == expect_shared);
    CHECK(xalloc_usable_size(q) >= 4 * MIB);
    fill(q, 4 * MIB, 102);
    /* Grows while large. */
    p = xalloc_realloc(q, 8 * MIB + 40);
    CHECK(p != NULL);
    if (p == NULL) {
        xalloc_free(q);
        return;
    }
    CHECK(holds(p, 4 * MIB, 102));
    CHECK(xalloc_is_shared(p) == expect_shared);
    fill(p, 8 * MIB + 40, 103);
    /* Shrinks, still large. */
    q = xalloc_realloc(p, 1 * MIB);
    CHECK(q != NULL);
    if (q == NULL) {
        xalloc_free(p);
        return;
    }
    CHECK(holds(q, 1 * MIB, 103));
    CHECK(xalloc_is_shared(q) == expect_shared);
    CHECK(xalloc_usable_size(q) >= 1 * MIB);
    /* Down across the threshold: back to the system allocator. */
    p = xalloc_realloc(q, 1000);
    CHECK(p != NULL);
    if (p == NULL) {
        xalloc_free(q);
        return;
    }
    CHECK(holds(p, 1000, 103));
    CHECK(xalloc_is_shared(p) == 0);
    CHECK(xalloc_usable_size(p) >= 1000);
    /* And up again. */
    q = xalloc_realloc(p, 300 * KIB);
    CHECK(q != NULL);
    if (q == NULL) {
        xalloc_free(p);
        return;
    }
    CHECK(holds(q, 1000, 103));
    CHECK(xalloc_is_shared(q) == expect_shared);
    xalloc_free(q);

    /* realloc(NULL, n) is malloc(n). */
    p = xalloc_realloc(NULL, 2 * MIB);
    CHECK(p != NULL && xalloc_is_shared(p) == expect_shared);
    if (p != NULL) {
        fill(p, 2 * MIB, 104);
        CHECK(holds(p, 2 * MIB, 104));
    }
    q = xalloc_realloc(NULL, 100);
    CHECK(q != NULL && xalloc_is_shared(q) == 0);
    /* realloc(p, 0) frees p and returns NULL. */
    CHECK(xalloc_realloc(q, 0) == NULL);
    if (p != NULL) {
        struct xalloc_stats a = stats();
        CHECK(xalloc_realloc(p, 0) == NULL);
        if (expect_shared) {
            /* It was freed: a free now is a free of no live block, counted, ignored. */
            CHECK(xalloc_usable_size(p) == 0);
            xalloc_free(p);
            struct xalloc_stats b = stats();
            CHECK(b.bad_frees == a.bad_frees + 1);
        }
    }
    struct xalloc_stats s1 = stats();
    printf("realloc forwarded=%" PRIu64 " fallbacks=%" PRIu64 "\n", s1.forwarded - s0.forwarded,
           s1.fallbacks - s0.fallbacks);
    section_end("realloc", before);
}

/* ---- calloc: zeroed, also a reused arena block, and overflow ---- */

static void section_calloc(void)
{
    unsigned before = failures_now();

    unsigned char *p = xalloc_calloc(10, 10);
    CHECK(p != NULL && all_bytes(p, 100, 0) && xalloc_is_shared(p) == 0);
    xalloc_free(p);
    p = xalloc_calloc(1024, 4 * KIB);
    CHECK(p != NULL);
    if (p != NULL) {
        CHECK(all_bytes(p, 4 * MIB, 0));
        CHECK(xalloc_is_shared(p) == expect_shared);
        CHECK(xalloc_usable_size(p) >= 4 * MIB);
        xalloc_free(p);
    }

    /* A large block filled with 0xff, freed, and the same size asked zeroed: all zero,
     * whether the block comes back from this process's cache or from the daemon. */
    unsigned reused = 0;
    for (unsigned round = 0; round < 4; round++) {
        size_t n = (size_t)(round + 1) * MIB + 4096;
        unsigned char *a = xalloc_malloc(n);
        CHECK(a != NULL);
        if (a == NULL)
            continue;
        memset(a, 0xff, n);
        xalloc_free(a);
        struct xalloc_stats s0 = stats();
        unsigned char *b = round % 2 ? xalloc_calloc(n, 1) : xalloc_calloc(1, n);
        struct xalloc_stats s1 = stats();
        CHECK(b != NULL);
        if (b == NULL)
            continue;
        if (b == a || s1.cache_hits > s0.cache_hits)
            reused++;
        CHECK(all_bytes(b, n, 0));
        CHECK(xalloc_is_shared(b) == expect_shared);
        xalloc_free(b);
    }
    printf("calloc reused=%u\n", reused);

    /* The product overflows: NULL and ENOMEM. */
    errno = 0;
    CHECK(xalloc_calloc(SIZE_MAX / 2 + 1, 2) == NULL);
    CHECK(errno == ENOMEM);
    errno = 0;
    CHECK(xalloc_calloc(SIZE_MAX, SIZE_MAX) == NULL);
    CHECK(errno == ENOMEM);
    errno = 0;
    CHECK(xalloc_calloc((size_t)1 << 33, (size_t)1 << 32) == NULL);
    CHECK(errno == ENOMEM);
    section_end("calloc", before);
}

/* ---- stats: the struct's size, partial copies, counters that move ---- */

static void section_stats(void)
{
    unsigned before = failures_now();
    struct xalloc_stats s;

    CHECK(xalloc_stats(&s, sizeof s) == sizeof(struct xalloc_stats));
    CHECK(xalloc_stats(NULL, sizeof s) == 0);
    CHECK(s.threshold == threshold);

    /* A smaller caller's struct: only its bytes are written. */
    struct xalloc_stats part;
    memset(&part, 0xab, sizeof part);
    CHECK(xalloc_stats(&part, sizeof part.forwarded) == sizeof part);
    CHECK(part.forwarded == s.forwarded);
    CHECK(all_bytes((unsigned char *)&part + sizeof part.forwarded,
                    sizeof part - sizeof part.forwarded, 0xab));
    memset(&part, 0xab, sizeof part);
    CHECK(xalloc_stats(&part, 0) == sizeof part);
    CHECK(all_bytes(&part, sizeof part, 0xab));

    /* One large block: forwarded (with a daemon) or a fallback (without). */
    struct xalloc_stats a = stats();
    unsigned char *p = xalloc_malloc(threshold + MIB);
    struct xalloc_stats b = stats();
    CHECK(p != NULL);
    if (expect_shared) {
        CHECK(b.forwarded == a.forwarded + 1);
        CHECK(b.fallbacks == a.fallbacks);
        CHECK(b.connections >= 1);
        CHECK(b.daemon_pid != 0);
        CHECK(b.daemon_arena_bytes > 0);
        CHECK(b.daemon_free_bytes <= b.daemon_arena_bytes);
        CHECK(b.arena_blocks >= 1 && b.arena_bytes >= threshold + MIB);
    } else {
        CHECK(b.forwarded == a.forwarded);
        CHECK(b.fallbacks == a.fallbacks + 1);
        CHECK(b.connections == 0 && b.daemon_pid == 0);
        CHECK(b.arena_bytes == 0 && b.arena_blocks == 0);
    }
    xalloc_free(p);
    /* A small block counts nowhere. */
    a = stats();
    p = xalloc_malloc(1000);
    b = stats();
    CHECK(p != NULL && b.forwarded == a.forwarded && b.fallbacks == a.fallbacks);
    xalloc_free(p);

    /* Larger than the daemon's whole arena: the system allocator's, as a fallback. */
    if (expect_shared && b.daemon_arena_bytes > 0) {
        size_t n = (size_t)b.daemon_arena_bytes + 4 * MIB;
        a = stats();
        p = xalloc_malloc(n);
        b = stats();
        CHECK(p != NULL);
        if (p != NULL) {
            CHECK(xalloc_is_shared(p) == 0);
            CHECK(xalloc_usable_size(p) >= n);
            p[0] = 1;
            p[n - 1] = 2;
            xalloc_free(p);
        }
        CHECK(b.fallbacks == a.fallbacks + 1);
        CHECK(b.forwarded == a.forwarded);
    }
    section_end("stats", before);
}

/* ---- double free of an arena block ---- */

static void section_double_free(void)
{
    if (!expect_shared) {
        /* Without a daemon every block is the system allocator's: glibc's rules. */
        printf("skip double_free (no arena)\n");
        return;
    }
    unsigned before = failures_now();
    size_t n = 1 * MIB;
    unsigned char *a = xalloc_malloc(n);
    CHECK(a != NULL && xalloc_is_shared(a));
    if (a == NULL)
        return;
    fill(a, n, 201);
    xalloc_free(a);
    struct xalloc_stats s0 = stats();
    xalloc_free(a);
    struct xalloc_stats s1 = stats();
    CHECK(s1.bad_frees == s0.bad_frees + 1);
    CHECK(xalloc_usable_size(a) == 0);
    errno = 0;
    CHECK(xalloc_realloc(a, 2 * MIB) == NULL);
    CHECK(errno == EINVAL);

    /* The block is not handed out twice. */
    unsigned char *b = xalloc_malloc(n), *c = xalloc_malloc(n);
    CHECK(b != NULL && c != NULL);
    if (b != NULL && c != NULL) {
        printf("double_free first_again=%d\n", b == a || c == a);
        CHECK(b != c);
        CHECK(xalloc_is_shared(b) && xalloc_is_shared(c));
        fill(b, n, 202);
        fill(c, n, 203);
        CHECK(holds(b, n, 202));
        CHECK(holds(c, n, 203));
        /* A pointer inside a block is no block: no size, no realloc, and freeing it frees
         * nothing. */
        CHECK(xalloc_is_shared(b + 4096) == 1);
        CHECK(xalloc_usable_size(b + 4096) == 0);
        errno = 0;
        CHECK(xalloc_realloc(b + 4096, 2 * n) == NULL);
        CHECK(errno == EINVAL);
        struct xalloc_stats s2 = stats();
        xalloc_free(b + 4096);
        struct xalloc_stats s3 = stats();
        CHECK(s3.bad_frees == s2.bad_frees + 1);
        CHECK(xalloc_usable_size(b) >= n);
        unsigned char *d = xalloc_malloc(n);
        CHECK(d != NULL && d != b && d != c);
        if (d != NULL) {
            fill(d, n, 204);
            CHECK(holds(b, n, 202) && holds(c, n, 203) && holds(d, n, 204));
            xalloc_free(d);
        }
    }
    xalloc_free(b);
    xalloc_free(c);
    section_end("double_free", before);
}

/* ---- fork: the child on a connection of its own, the parent's data its own ---- */

static void section_fork(void)
{
    unsigned before = failures_now();
    size_t n = 4 * MIB;
    unsigned char *p = xalloc_malloc(n);
    unsigned char *small = xalloc_malloc(1000);
    CHECK(p != NULL && small != NULL);
    if (p == NULL || small == NULL)
        return;
    CHECK(xalloc_is_shared(p) == expect_shared);
    fill(p, n, 301);
    fill(small, 1000, 302);
    struct xalloc_stats parent_before = stats();
    fflush(stdout);

    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid < 0)
        return;
    if (pid == 0) {
        /* The child: counters from zero; its own blocks on its own connection. */
        struct xalloc_stats c0 = stats();
        CHECK(c0.forwarded == 0 && c0.fallbacks == 0 && c0.bad_frees == 0);
        CHECK(holds(p, n, 301));
        CHECK(holds(small, 1000, 302));
        CHECK(xalloc_is_shared(p) == expect_shared);
        /* Its writes into the inherited block are its own. */
        fill(p, n, 401);
        CHECK(holds(p, n, 401));
        unsigned char *mine[6] = {NULL};
        for (unsigned i = 0; i < 6; i++) {
            size_t m = (size_t)(i + 1) * MIB + 512;
            mine[i] = xalloc_malloc(m);
            CHECK(mine[i] != NULL);
            if (mine[i] == NULL)
                continue;
            CHECK(xalloc_is_shared(mine[i]) == expect_shared);
            fill(mine[i], m, 410 + i);
        }
        for (unsigned i = 0; i < 6; i++) {
            if (mine[i] == NULL)
                continue;
            CHECK(holds(mine[i], (size_t)(i + 1) * MIB + 512, 410 + i));
            xalloc_free(mine[i]);
        }
        /* A grown block and a zeroed one in the child too. */
        unsigned char *g = xalloc_realloc(NULL, 100);
        CHECK(g != NULL);
        if (g != NULL) {
            fill(g, 100, 420);
            unsigned char *h = xalloc_realloc(g, 3 * MIB);
            CHECK(h != NULL && holds(h, 100, 420) && xalloc_is_shared(h) == expect_shared);
            xalloc_free(h != NULL ? h : g);
        }
        unsigned char *z = xalloc_calloc(2, MIB);
        CHECK(z != NULL && all_bytes(z, 2 * MIB, 0));
        xalloc_free(z);
        /* An inherited block resized: the child's own copy, its bytes kept. */
        CHECK(xalloc_usable_size(p) >= n);
        unsigned char *grown = xalloc_realloc(p, 2 * n);
        CHECK(grown != NULL);
        if (grown != NULL) {
            CHECK(holds(grown, n, 401));
            CHECK(xalloc_is_shared(grown) == expect_shared);
            fill(grown, 2 * n, 402);
            CHECK(holds(grown, 2 * n, 402));
            xalloc_free(grown);
        }
        /* Freeing the inherited blocks frees nothing of the parent's. */
        xalloc_free(small);
        struct xalloc_stats c1 = stats();
        if (expect_shared) {
            CHECK(c1.forwarded >= 9 && c1.fallbacks == 0);
            CHECK(c1.connections > parent_before.connections);
            CHECK(c1.daemon_pid == parent_before.daemon_pid && c1.daemon_pid != 0);
        } else {
            CHECK(c1.forwarded == 0 && c1.fallbacks >= 8 && c1.connections == 0);
        }
        printf("child pid=%ld forwarded=%" PRIu64 " fallbacks=%" PRIu64 " connections=%" PRIu64
               "\n",
               (long)getpid(), c1.forwarded, c1.fallbacks, c1.connections);
        fflush(stdout);
        _exit(failures_now() == before ? 0 : 1);
    }

    /* The parent works on meanwhile. */
    for (unsigned i = 0; i < 6; i++) {
        size_t m = (size_t)(i + 1) * 512 * KIB;
        unsigned char *q = xalloc_malloc(m);
        CHECK(q != NULL && xalloc_is_shared(q) == expect_shared);
        if (q != NULL) {
            fill(q, m, 500 + i);
            CHECK(holds(q, m, 500 + i));
            xalloc_free(q);
        }
    }
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    /* The parent's data is as it wrote it, whatever the child wrote or freed. */
    CHECK(holds(p, n, 301));
    CHECK(holds(small, 1000, 302));
    CHECK(xalloc_is_shared(p) == expect_shared);
    CHECK(xalloc_usable_size(p) >= n);
    /* The parent's connection still serves. */
    unsigned char *q = xalloc_malloc(2 * MIB);
    CHECK(q != NULL && xalloc_is_shared(q) == expect_shared);
    if (q != NULL) {
        fill(q, 2 * MIB, 303);
        CHECK(holds(q, 2 * MIB, 303) && holds(p, n, 301));
    }
    struct xalloc_stats after = stats();
    if (expect_shared)
        CHECK(after.connections == parent_before.connections);
    xalloc_free(q);
    xalloc_free(p);
    xalloc_free(small);
    section_end("fork", before);
}

/* ---- fork while other threads allocate and free large blocks ---- */

enum { FORK_WORKERS = 4, FORKS = 12 };

static int workers_stop;

struct worker {
    unsigned id;
    unsigned blocks, bad;
};

static void *fork_worker(void *arg)
{
    struct worker *w = arg;
    uint64_t rng = 0x9e3779b97f4a7c15ULL * (w->id + 1);
    while (!__atomic_load_n(&workers_stop, __ATOMIC_RELAXED)) {
        size_t n = (256 * KIB + (size_t)(next_rand(&rng) % (4 * MIB))) & ~(size_t)7;
        uint64_t seed = ((uint64_t)w->id << 32) ^ w->blocks;
        unsigned char *p = w->blocks % 3 == 0 ? xalloc_calloc(1, n) : xalloc_malloc(n);
        if (p == NULL || xalloc_is_shared(p) != expect_shared) {
            w->bad++;
            xalloc_free(p);
            continue;
        }
        fill(p, n, seed);
        if (!holds(p, n, seed))
            w->bad++;
        xalloc_free(p);
        w->blocks++;
    }
    return NULL;
}

static void section_fork_threads(void)
{
    unsigned before = failures_now();
    pthread_t t[FORK_WORKERS];
    struct worker w[FORK_WORKERS];
    memset(w, 0, sizeof w);
    __atomic_store_n(&workers_stop, 0, __ATOMIC_RELAXED);
    for (unsigned i = 0; i < FORK_WORKERS; i++) {
        w[i].id = i;
        CHECK(pthread_create(&t[i], NULL, fork_worker, &w[i]) == 0);
    }
    unsigned char *mine = xalloc_malloc(2 * MIB);
    CHECK(mine != NULL);
    if (mine != NULL)
        fill(mine, 2 * MIB, 600);
    fflush(stdout);
    for (unsigned f = 0; f < FORKS; f++) {
        /* Let the workers be in the middle of something. */
        struct timespec pause = {0, 2000000};
        nanosleep(&pause, NULL);
        pid_t pid = fork();
        CHECK(pid >= 0);
        if (pid < 0)
            break;
        if (pid == 0) {
            /* One thread here, whatever the others held at the fork: no stdio, no locks of
             * this program's; a hang is ended by the alarm (exit status: killed). */
            alarm(30);
            int code = 0;
            if (mine != NULL && !holds(mine, 2 * MIB, 600))
                code = 2;
            for (unsigned i = 0; i < 4 && code == 0; i++) {
                size_t m = (size_t)(i + 1) * MIB;
                unsigned char *q = i % 2 ? xalloc_calloc(m, 1) : xalloc_malloc(m);
                if (q == NULL)
                    code = 3;
                else if (xalloc_is_shared(q) != expect_shared)
                    code = 4;
                else {
                    fill(q, m, 700 + i + f);
                    if (!holds(q, m, 700 + i + f))
                        code = 5;
                }
                xalloc_free(q);
            }
            if (code == 0 && mine != NULL) {
                fill(mine, 2 * MIB, 800 + f);
                xalloc_free(mine);
            }
            _exit(code);
        }
        int status = 0;
        while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
        }
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
            char what[96];
            snprintf(what, sizeof what, "forked child %u: %s %d", f,
                     WIFEXITED(status) ? "exit status" : "killed by signal",
                     WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status));
            fail(__LINE__, what);
        }
    }
    __atomic_store_n(&workers_stop, 1, __ATOMIC_RELAXED);
    unsigned blocks = 0, bad = 0;
    for (unsigned i = 0; i < FORK_WORKERS; i++) {
        CHECK(pthread_join(t[i], NULL) == 0);
        blocks += w[i].blocks;
        bad += w[i].bad;
    }
    CHECK(bad == 0);
    CHECK(blocks > 0);
    CHECK(mine == NULL || holds(mine, 2 * MIB, 600));
    xalloc_free(mine);
    printf("fork_threads forks=%u worker_blocks=%u\n", (unsigned)FORKS, blocks);
    section_end("fork_threads", before);
}

/* ---- a daemon started with --client-quota 4M: refusals counted, blocks from malloc ---- */

static void section_quota(void)
{
    unsigned before = failures_now();
    enum { BLOCKS = 8 };
    unsigned char *p[BLOCKS];
    unsigned shared = 0;
    struct xalloc_stats a = stats();
    for (unsigned i = 0; i < BLOCKS; i++) {
        p[i] = xalloc_malloc(MIB);
        CHECK(p[i] != NULL);
        if (p[i] == NULL)
            continue;
        shared += (unsigned)xalloc_is_shared(p[i]);
        fill(p[i], MIB, 900 + i);
    }
    struct xalloc_stats b = stats();
    for (unsigned i = 0; i < BLOCKS; i++) {
        if (p[i] == NULL)
            continue;
        CHECK(holds(p[i], MIB, 900 + i));
        xalloc_free(p[i]);
    }
    uint64_t refused = b.over_quota - a.over_quota;
    CHECK(shared > 0 && shared < BLOCKS);
    CHECK(refused > 0);
    CHECK(b.fallbacks - a.fallbacks == BLOCKS - shared);
    CHECK(b.forwarded - a.forwarded == shared);
    CHECK(refused <= b.fallbacks - a.fallbacks);
    printf("quota shared=%u over_quota=%" PRIu64 "\n", shared, refused);
    section_end("quota", before);
}

struct section {
    const char *name;
    void (*run)(void);
    /* Run when no section is named. */
    int by_default;
};

static const struct section sections[] = {
    {"basics", section_basics, 1},
    {"threads", section_threads, 1},
    {"align", section_align, 1},
    {"realloc", section_realloc, 1},
    {"calloc", section_calloc, 1},
    {"stats", section_stats, 1},
    {"double_free", section_double_free, 1},
    {"fork", section_fork, 1},
    {"fork_threads", section_fork_threads, 1},
    {"quota", section_quota, 0},
};

int main(int argc, char **argv)
{
    if (argc < 2 || (strcmp(argv[1], "daemon") != 0 && strcmp(argv[1], "none") != 0)) {
        fprintf(stderr, "usage: exercise daemon|none [SECTION...]\n");
        return 64;
    }
    expect_shared = strcmp(argv[1], "daemon") == 0;
    setvbuf(stdout, NULL, _IOLBF, 0);

    /* Before any large request: no connection. */
    struct xalloc_stats s0 = stats();
    CHECK(s0.connections == 0 && s0.forwarded == 0 && s0.fallbacks == 0);
    CHECK(s0.threshold > 0);
    threshold = (size_t)s0.threshold;
    printf("threshold=%zu struct_size=%zu\n", threshold, sizeof(struct xalloc_stats));

    const size_t count = sizeof sections / sizeof sections[0];
    for (size_t i = 0; i < count; i++) {
        int run = argc == 2 && sections[i].by_default;
        for (int a = 2; a < argc; a++)
            run |= strcmp(argv[a], sections[i].name) == 0;
        if (run)
            sections[i].run();
    }

    struct xalloc_stats s = stats();
    printf("stats forwarded=%" PRIu64 " fallbacks=%" PRIu64 " over_quota=%" PRIu64
           " arena_bytes=%" PRIu64 " arena_blocks=%" PRIu64 " cached_bytes=%" PRIu64
           " cache_hits=%" PRIu64 " connections=%" PRIu64 " bad_frees=%" PRIu64
           " threshold=%" PRIu64 " daemon_pid=%" PRIu64 " daemon_arena_bytes=%" PRIu64
           " daemon_free_bytes=%" PRIu64 "\n",
           s.forwarded, s.fallbacks, s.over_quota, s.arena_bytes, s.arena_blocks, s.cached_bytes,
           s.cache_hits, s.connections, s.bad_frees, s.threshold, s.daemon_pid,
           s.daemon_arena_bytes, s.daemon_free_bytes);
    unsigned f = failures_now();
    printf("result failures=%u\n", f);
    return f == 0 ? 0 : 1;
}
