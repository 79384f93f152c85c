/*
 * The smallest program that uses xalloc from C: one large block from the daemon's arena (or
 * from malloc when no daemon runs), one small block from malloc, both freed the same way.
 *
 *   make examples && examples/c/quickstart
 *   cc quickstart.c $(pkg-config --cflags --libs xalloc)       (against an installed copy)
 */
#include <stdio.h>
#include <string.h>

#include "xalloc.h"

int main(void)
{
    char *big = xalloc_malloc(8u << 20);   /* 8 MiB: at least the threshold */
    char *small = xalloc_malloc(100);      /* below it: the system allocator */
    if (big == NULL || small == NULL) {
        perror("xalloc_malloc");
        return 1;
    }
    memset(big, 'x', 8u << 20);
    strcpy(small, "hello");
    printf("8 MiB block shared: %d, 100-byte block shared: %d\n", xalloc_is_shared(big),
           xalloc_is_shared(small));
    xalloc_free(big);
    xalloc_free(small);
    return 0;
}
