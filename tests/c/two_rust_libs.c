/*
 * Linked with lib/libxalloc.a and another Rust static library (other_rust.rs): both carry a
 * Rust standard library; the other one panics and catches it. Prints `two 46 1021 shared=S`.
 */
#include <stdint.h>
#include <stdio.h>

#include "xalloc.h"

uint64_t other_sum(uint32_t n);

int main(void)
{
    unsigned char *p = xalloc_malloc((size_t)1 << 20);
    if (p == NULL)
        return 1;
    p[0] = 1;
    unsigned long long a = other_sum(10), b = other_sum(7);
    printf("two %llu %llu shared=%d\n", a, b, xalloc_is_shared(p));
    xalloc_free(p);
    return 0;
}
