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

/*
 * Share handles: hand an arena block to another process without copying it.
 *
 * Every client of a daemon maps its whole arena, so the bytes one process wrote into a shared
 * block are already in every other client's address space: another process needs only the
 * block's handle, a 63-character string of [0-9a-z-] (safe in argv, an environment variable,
 * a pipe), to read them. The daemon counts who holds each shared block, and frees it when
 * its owner and every view of it, in every process, are gone: closed, or their process
 * exited or was killed.
 *
 * A struct xalloc_shared is either
 *   - an owned buffer (xalloc_shared_new, xalloc_shared_receive): readable and writable by
 *     this process, charged to its quota; its handle (xalloc_shared_handle) opens views; or
 *   - a view (xalloc_shared_open): the same bytes, read-only by contract (the arena's pages
 *     are writable, but the block's owner expects nobody else to write them). The owner may
 *     write while views read: telling readers when the bytes are ready is the programs' job
 *     (as with any shared memory), for example by passing the handle only once they are.
 * Both are closed with xalloc_shared_close. Ownership passes to exactly one other process with
 * xalloc_shared_send (a transfer handle, "xst-...") and xalloc_shared_receive; view handles
 * ("xsv-...") never give write access.
 *
 * The share functions use the daemon this process's allocator uses (XALLOC_NAME, default
 * "xalloc"), whether or not a large block was allocated first; with no daemon they fail (they
 * never fall back to the system allocator) and everything else works as before. They are
 * thread-safe; an object may be passed between threads, and used from several at once by the
 * functions that take a const pointer. A shared block's bytes are never a block of
 * xalloc_free or xalloc_realloc (freeing one frees nothing and counts in bad_frees). After
 * fork(), the child's copies of the parent's objects stay the parent's: closing one in the
 * child only frees the child's copy of the object (the parent's buffer or view stays open),
 * and sending one there fails (ENOTCONN); the child makes objects of its own with its own
 * connection.
 *
 * errno, for every function below that fails:
 *   ENOTCONN  no daemon answers (none runs for XALLOC_NAME, or it refused or stopped
 *             answering this process)
 *   EXDEV     the handle is of another daemon instance (another XALLOC_NAME, or a daemon
 *             started afresh since the handle was made)
 *   ENOENT    no live shared block matches the handle: made up, changed, its block freed
 *             since, or (a transfer handle) received already
 *   EPERM     xalloc_shared_receive was given a view handle
 *   EINVAL    a NULL argument, text that is no handle, or an object the call cannot take
 *   ERANGE    the buffer for a handle is shorter than XALLOC_HANDLE_LEN
 *   ENOMEM    the arena (or this process's memory) has no room
 *   EDQUOT    the block would take this process or its user over the daemon's quota
 *   EMFILE    the daemon holds as many shared blocks or views as it can (8192 shared blocks,
 *             32768 pairs of a client and a block it views), or this process views as many
 *             blocks as one process may (1024)
 *   EIO       anything else the daemon or the connection reported
 */

/* Bytes of a buffer that holds a handle's text: its 63 characters and the NUL. */
#define XALLOC_HANDLE_LEN 64

/* A shared block as this process holds it: an owned buffer or a view. Opaque. */
struct xalloc_shared;

/*
 * A new shared block of `len` zeroed bytes (0 is allowed), owned by this process: NULL with
 * errno set (ENOTCONN without a daemon, ENOMEM, EDQUOT, EMFILE, EIO) on failure.
 */
struct xalloc_shared *xalloc_shared_new(size_t len);

/*
 * The first byte of the block, of an owned buffer or of a view, for reading: valid until the
 * object is closed or sent. Never NULL for an object (also when its size is 0); NULL with
 * errno EINVAL if `s` is NULL.
 */
const void *xalloc_shared_data(const struct xalloc_shared *s);

/*
 * The same address as xalloc_shared_data, for writing: only an owned buffer gives it. NULL
 * with errno EPERM for a view, EINVAL if `s` is NULL.
 */
void *xalloc_shared_writable(struct xalloc_shared *s);

/* The size of the block in bytes, as asked for when it was made; 0 if `s` is NULL. */
size_t xalloc_shared_size(const struct xalloc_shared *s);

/*
 * Writes the handle that opens views of the block (the text, then a NUL) into `buf`, which
 * has room for `cap` bytes: XALLOC_HANDLE_LEN are enough. Works on owned buffers and views
 * alike; the handle stays valid as long as the block lives, for any number of opens. Returns
 * 0, or -1 with errno ERANGE if `cap` is less than XALLOC_HANDLE_LEN (nothing is written),
 * EINVAL if `s` or `buf` is NULL.
 */
int xalloc_shared_handle(const struct xalloc_shared *s, char *buf, size_t cap);

/*
 * A read-only view of the block `handle` names (a view or a transfer handle, NUL-terminated),
 * in this process or another of the same daemon instance, without a copy: one round trip to
 * the daemon whatever the block's size. The block lives at least as long as the view. NULL
 * with errno set on failure: EINVAL (not a handle), EXDEV, ENOENT, ENOTCONN, EMFILE, ENOMEM,
 * EIO.
 */
struct xalloc_shared *xalloc_shared_open(const char *handle);

/*
 * Closes an owned buffer (this process gives up the block) or a view, and frees `s`. The
 * block goes once its owner and every view are gone. NULL does nothing.
 */
void xalloc_shared_close(struct xalloc_shared *s);

/*
 * Gives up an owned buffer for exactly one process to take with xalloc_shared_receive:
 * writes the transfer handle (as xalloc_shared_handle does) into `buf` and, on success,
 * frees `s` (returns 0; `s` must not be used again). Views of the block stay open. Until it
 * is received, the block stays this process's in the daemon's books (its quota); if this
 * process exits first, nobody can receive it and it goes once its views are gone. Returns
 * -1 with errno, `s` still valid and owned, on failure: EINVAL if `s` or `buf` is NULL or `s`
 * is a view, ERANGE if `cap` is less than XALLOC_HANDLE_LEN, ENOTCONN, EIO.
 */
int xalloc_shared_send(struct xalloc_shared *s, char *buf, size_t cap);

/*
 * Takes ownership (and write access) of the block a transfer handle names: only one process
 * succeeds, and the block's quota moves to it. NULL with errno set on failure: EPERM (a view
 * handle), ENOENT (also: received already), EINVAL (not a handle), EXDEV, EDQUOT, ENOTCONN,
 * ENOMEM, EIO.
 */
struct xalloc_shared *xalloc_shared_receive(const char *handle);

#ifdef __cplusplus
}
#endif

#endif /* XALLOC_H */
