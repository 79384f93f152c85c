/*
 * xalloc.h: the C interface of xalloc.
 *
 * Blocks of at least the threshold (256 KiB unless XALLOC_THRESHOLD says otherwise: "4096",
 * "64K", "1M") come from the shared arena of the xallocd instance named by XALLOC_NAME
 * (default "xalloc"); smaller blocks, and every block while no daemon answers, come from the
 * system allocator (glibc's malloc). The first large request connects to the daemon; a failed
 * connection is retried at most once a second. Freeing, reallocating and asking the size of
 * a block work on either kind: the library tells them apart by address.
 *
 * Every function is thread-safe and never calls back into itself. After fork() the child
 * makes its own connection on its next large request; blocks it inherited from the parent
 * stay readable and writable in the child (a private copy), and freeing one there frees
 * nothing in the parent.
 *
 * Link:     cc prog.c -Ilib -Llib -l:libxalloc.a -lpthread -ldl -lm   (static, build tree)
 *           cc prog.c $(pkg-config --cflags --libs xalloc-static)          (static, installed)
 *           cc prog.c $(pkg-config --cflags --libs xalloc)                 (shared, installed)
 * Preload:  LD_PRELOAD=/path/to/libxalloc.so program
 *           (the shared library also replaces malloc, free, calloc, realloc, reallocarray,
 *           posix_memalign, aligned_alloc, memalign, valloc, pvalloc and malloc_usable_size;
 *           the static library exports xalloc_* names only).
 *
 * C99; usable from C++.
 */
#ifndef XALLOC_H
#define XALLOC_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The default threshold in bytes: requests of at least this size go to the daemon. */
#define XALLOC_DEFAULT_THRESHOLD ((size_t)256 * 1024)

/*
 * Allocates `size` bytes aligned to 16, like malloc(): NULL with errno ENOMEM when neither
 * the daemon nor the system allocator has room. A size of 0 gives a unique pointer to free.
 */
void *xalloc_malloc(size_t size);

/*
 * Allocates `count * size` zeroed bytes, like calloc(): NULL with errno ENOMEM when the
 * product overflows or no memory is left.
 */
void *xalloc_calloc(size_t count, size_t size);

/*
 * Resizes the block at `ptr` to `size` bytes, like realloc(): keeps the first
 * min(old, size) bytes, and may move the block (between the arena and the system allocator
 * too, when the size crosses the threshold). `ptr` NULL: as xalloc_malloc(size). `size` 0:
 * frees `ptr` and returns NULL. On failure returns NULL, sets errno (ENOMEM; EINVAL for a
 * pointer into the arena that is no live block) and leaves `ptr` as it was.
 */
void *xalloc_realloc(void *ptr, size_t size);

/*
 * Allocates `size` bytes aligned to `align`, which must be a power of two (C11's
 * aligned_alloc without its rule that `size` be a multiple of `align`): NULL with errno
 * EINVAL for any other alignment, ENOMEM when no memory is left.
 */
void *xalloc_aligned_alloc(size_t align, size_t size);

/*
 * Frees a block of this library's (or of the system allocator's malloc), like free(). NULL
 * does nothing. An arena pointer that is no live block (freed already, or inside a block)
 * frees nothing and is counted in xalloc_stats's bad_frees, where glibc would abort (a
 * second free after the block was handed out again frees it, as with any allocator).
 */
void xalloc_free(void *ptr);

/* 1 if `ptr` points into a daemon's shared arena (a block it served, or inside one), else 0. */
int xalloc_is_shared(const void *ptr);

/*
 * Bytes of the block at `ptr` that may be used, like malloc_usable_size(): at least the size
 * asked for. 0 for NULL and for an arena pointer that is no live block.
 */
size_t xalloc_usable_size(const void *ptr);

/* This process's counters (xalloc_stats). */
struct xalloc_stats {
    /* Large allocations served from the arena. */
    uint64_t forwarded;
    /* Large allocations the system allocator served instead (no daemon, no room, quota). */
    uint64_t fallbacks;
    /* Of those, refused because this process or its user is over its quota. */
    uint64_t over_quota;
    /* Bytes and blocks of the arena this process holds now (cached ones included). */
    uint64_t arena_bytes;
    uint64_t arena_blocks;
    /* Bytes of freed arena blocks kept for reuse, and allocations served from them. */
    uint64_t cached_bytes;
    uint64_t cache_hits;
    /* Connections made to a daemon over the process's life. */
    uint64_t connections;
    /* Frees of an arena pointer that was no live block (ignored). */
    uint64_t bad_frees;
    /* The threshold in effect, in bytes. */
    uint64_t threshold;
    /* The daemon of the newest connection: its pid (0 if none is connected and alive), the
     * bytes of its arena, and the bytes free in it as of its last answer to this process. */
    uint64_t daemon_pid;
    uint64_t daemon_arena_bytes;
    uint64_t daemon_free_bytes;
};

/*
 * Fills the first `size` bytes of `*stats` (pass sizeof *stats) with this process's counters
 * and returns the size of the library's own struct xalloc_stats, so a program built against
 * an older header gets the fields it knows and a newer one can tell which are missing.
 * Returns 0 if `stats` is NULL. Never allocates; safe from any thread.
 */
size_t xalloc_stats(struct xalloc_stats *stats, size_t size);

#ifdef __cplusplus
}
#endif

#endif /* XALLOC_H */
