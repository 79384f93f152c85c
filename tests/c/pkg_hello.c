/*
 * pkg_hello: a program built against an installed copy of xalloc through pkg-config
 * (`pkg-config --cflags --libs xalloc`, shared, or `--static`), by tests/tests/c_library.rs.
 *
 *   pkg_hello daemon|none
 *
 * Prints `pkg ok shared=N stats_size=N`; exit status 1 on a failure.
 */
#include <xalloc.h>

#include <stdio.h>
#include <string.h>

int main(int argc, char **argv)
{
    int expect = argc > 1 && strcmp(argv[1], "daemon") == 0;
    size_t n = 2 * XALLOC_DEFAULT_THRESHOLD;
    unsigned char *p = xalloc_malloc(n);
    if (p == NULL) {
        printf("FAIL xalloc_malloc\n");
        return 1;
    }
    memset(p, 0x42, n);
    int shared = xalloc_is_shared(p);
    int kept = p[0] == 0x42 && p[n - 1] == 0x42;
    xalloc_free(p);
    struct xalloc_stats s;
    size_t size = xalloc_stats(&s, sizeof s);
    if (shared != expect || !kept || size != sizeof s) {
        printf("FAIL shared=%d (expected %d) kept=%d stats_size=%zu\n", shared, expect, kept, size);
        return 1;
    }
    printf("pkg ok shared=%d stats_size=%zu\n", shared, size);
    return 0;
}
