/*
 * realloc at two edges, through xalloc.h:
 * - a block of the program's own malloc (glibc's) grown into the arena keeps its bytes,
 *   whatever the order in which libc and libxalloc were linked (the size of a glibc block
 *   must come from glibc itself);
 * - arena blocks that shrink to a small fraction give the rest back (this process's
 *   arena_bytes and the blocks' usable sizes fall).
 * Prints `ok order`, `ok shrink` and `edges shared=N`; exits 1 on a failure.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "xalloc.h"

static int failures;

#define CHECK(cond)                                                                           \
    do {                                                                                      \
        if (!(cond)) {                                                                        \
            printf("FAIL %d: %s\n", __LINE__, #cond);                                         \
            failures++;                                                                       \
        }                                                                                     \
    } while (0)

int main(void)
{
    int shared = 0;

    /* A glibc block, grown across the threshold. */
    unsigned char *g = malloc(1000);
    CHECK(g != NULL);
    memset(g, 'A', 1000);
    CHECK(xalloc_usable_size(g) >= 1000);
    unsigned char *q = xalloc_realloc(g, (size_t)2 << 20);
    CHECK(q != NULL);
    for (int i = 0; q != NULL && i < 1000; i++) {
        if (q[i] != 'A') {
            CHECK(q[i] == 'A');
            break;
        }
    }
    shared += xalloc_is_shared(q);
    xalloc_free(q);
    puts(failures ? "FAIL order" : "ok order");

    /* Three 64 MiB arena blocks shrunk to 300 KiB. */
    int before = failures;
    struct xalloc_stats s0, s1;
    unsigned char *b[3];
    for (int i = 0; i < 3; i++) {
        b[i] = xalloc_malloc((size_t)64 << 20);
        CHECK(b[i] != NULL);
        memset(b[i], 0x40 + i, (size_t)300 << 10);
    }
    xalloc_stats(&s0, sizeof s0);
    for (int i = 0; i < 3; i++) {
        unsigned char *r = xalloc_realloc(b[i], (size_t)300 << 10);
        CHECK(r != NULL);
        if (r == NULL)
            continue;
        b[i] = r;
        CHECK(r[0] == 0x40 + i && r[(300 << 10) - 1] == 0x40 + i);
        if (xalloc_is_shared(r))
            CHECK(xalloc_usable_size(r) < ((size_t)1 << 20));
    }
    xalloc_stats(&s1, sizeof s1);
    if (xalloc_is_shared(b[0])) {
        shared += 3;
        CHECK(s0.arena_bytes >= ((uint64_t)192 << 20));
        CHECK(s1.arena_bytes < ((uint64_t)4 << 20));
    }
    for (int i = 0; i < 3; i++)
        xalloc_free(b[i]);
    puts(failures > before ? "FAIL shrink" : "ok shrink");

    printf("edges shared=%d\n", shared);
    return failures ? 1 : 0;
}
