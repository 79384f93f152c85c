/*
 * xalloc.h alone, as the first line of a C99 translation unit, under every warning the tests
 * can ask for (tests/tests/c_library.rs compiles it with -std=c99 -pedantic -Werror and more):
 * the header is self-contained, guarded against a second inclusion, and declares each
 * function with the prototype its documentation gives.
 */
#include "xalloc.h"
#include "xalloc.h"

/* struct xalloc_stats: thirteen 64-bit counters, no padding. */
typedef char xalloc_stats_is_13_counters[sizeof(struct xalloc_stats) == 13 * sizeof(uint64_t)
                                             ? 1
                                             : -1];

/* The default threshold is a size_t constant expression of 256 KiB. */
typedef char xalloc_default_threshold_is_256k[XALLOC_DEFAULT_THRESHOLD == 262144 ? 1 : -1];

/* Each function, through a pointer of the documented type (a mismatch is an error). */
struct xalloc_api {
    void *(*malloc_)(size_t);
    void *(*calloc_)(size_t, size_t);
    void *(*realloc_)(void *, size_t);
    void *(*aligned_alloc_)(size_t, size_t);
    void (*free_)(void *);
    int (*is_shared_)(const void *);
    size_t (*usable_size_)(const void *);
    size_t (*stats_)(struct xalloc_stats *, size_t);
};

extern const struct xalloc_api xalloc_api_of_header;
const struct xalloc_api xalloc_api_of_header = {
    xalloc_malloc,        xalloc_calloc,    xalloc_realloc,     xalloc_aligned_alloc,
    xalloc_free,          xalloc_is_shared, xalloc_usable_size, xalloc_stats,
};
