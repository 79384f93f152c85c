/*
 * A library whose constructor allocates through malloc, calloc, realloc and free, and looks
 * symbols up with dlsym, as early as a constructor can run: preloaded beside libxalloc.so,
 * in either order, so that in one of them it runs before the interposer's own constructors.
 * It prints one line `early shared=N ok=1` (N: large blocks in the arena) to stderr, which the
 * test reads; the program it is preloaded into runs as usual.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

__attribute__((constructor(101))) static void early(void)
{
    int (*is_shared)(const void *) = (int (*)(const void *))dlsym(RTLD_DEFAULT, "xalloc_is_shared");
    void *(*real_malloc)(size_t) = (void *(*)(size_t))dlsym(RTLD_NEXT, "malloc");
    int ok = is_shared != NULL && real_malloc != NULL;
    int shared = 0;
    for (int round = 0; round < 4; round++) {
        size_t big = (size_t)(1 + round) << 20;
        char *p = malloc(big);
        char *q = calloc(1, big);
        char *s = malloc(100);
        if (p == NULL || q == NULL || s == NULL) {
            ok = 0;
            break;
        }
        memset(p, 0x5a, big);
        for (size_t i = 0; i < big; i += 4096)
            ok &= q[i] == 0;
        p = realloc(p, 2 * big);
        ok &= p != NULL && p[big - 1] == 0x5a;
        shared += is_shared != NULL && is_shared(p);
        shared += is_shared != NULL && is_shared(q);
        free(p);
        free(q);
        free(s);
    }
    fprintf(stderr, "early shared=%d ok=%d\n", shared, ok);
}
