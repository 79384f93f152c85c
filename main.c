/*
 * ./xalloc: the seed's story end to end, through the C library (xalloc.h).
 *
 * It looks for the daemon named by XALLOC_NAME (default "xalloc"), then, in this process and
 * in a forked child, allocates, fills, checks and frees small and large blocks, grows a block
 * across the threshold with xalloc_realloc, and prints where each block lived and the
 * counters of the process and of the daemon. With no daemon it says how to start one and runs
 * on the system allocator.
 *
 *   make && ./xalloc                  build (see Makefile), then run
 *   ./xalloc --require-daemon         exit 2 if no daemon answers
 *
 * Exit status: 0 when every block held what was written into it, 1 otherwise, 2 with
 * --require-daemon and no daemon, 64 on a bad argument.
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include "xalloc.h"

#define KIB ((size_t)1024)
#define MIB (KIB * KIB)

static const char *where(const void *p)
{
    return xalloc_is_shared(p) ? "daemon's arena" : "system allocator";
}

/* Fills `n` bytes with a pattern of `seed`; checks them. */
static void fill(unsigned char *p, size_t n, unsigned seed)
{
    for (size_t i = 0; i < n; i++)
        p[i] = (unsigned char)(i * 31u + seed);
}

static int holds(const unsigned char *p, size_t n, unsigned seed)
{
    for (size_t i = 0; i < n; i++)
        if (p[i] != (unsigned char)(i * 31u + seed))
            return 0;
    return 1;
}

static void human(char *buf, size_t len, uint64_t bytes)
{
    if (bytes >= MIB && bytes % MIB == 0)
        snprintf(buf, len, "%" PRIu64 " MiB", bytes / MIB);
    else if (bytes >= KIB && bytes % KIB == 0)
        snprintf(buf, len, "%" PRIu64 " KiB", bytes / KIB);
    else
        snprintf(buf, len, "%" PRIu64 " B", bytes);
}

/* Allocates, fills, checks and frees blocks of several sizes; 0 if all held their bytes. */
static int work(const char *who, unsigned seed)
{
    static const size_t sizes[] = {64, 4 * KIB, 200 * KIB, 1 * MIB, 16 * MIB};
    enum { N = sizeof sizes / sizeof sizes[0] };
    unsigned char *blocks[N];
    int ok = 1;
    char h[32];

    for (size_t i = 0; i < N; i++) {
        blocks[i] = xalloc_malloc(sizes[i]);
        if (blocks[i] == NULL) {
            fprintf(stderr, "%s: xalloc_malloc(%zu): %s\n", who, sizes[i], strerror(errno));
            return 0;
        }
        fill(blocks[i], sizes[i], seed + (unsigned)i);
        human(h, sizeof h, sizes[i]);
        printf("  %-6s %8s  -> %s\n", who, h, where(blocks[i]));
    }
    for (size_t i = 0; i < N; i++) {
        ok &= holds(blocks[i], sizes[i], seed + (unsigned)i);
        xalloc_free(blocks[i]);
    }

    /* A block that grows across the threshold moves to the arena, its bytes with it. */
    size_t small = 64 * KIB, large = 4 * MIB;
    unsigned char *p = xalloc_malloc(small);
    if (p == NULL)
        return 0;
    fill(p, small, seed);
    const char *before = where(p);
    unsigned char *q = xalloc_realloc(p, large);
    if (q == NULL) {
        fprintf(stderr, "%s: xalloc_realloc: %s\n", who, strerror(errno));
        xalloc_free(p);
        return 0;
    }
    ok &= holds(q, small, seed);
    printf("  %-6s realloc 64 KiB -> 4 MiB: %s -> %s, contents kept: %s\n", who, before,
           where(q), holds(q, small, seed) ? "yes" : "NO");
    xalloc_free(q);
    return ok;
}

static void print_stats(const char *who)
{
    struct xalloc_stats s;
    char a[32], b[32], c[32];

    xalloc_stats(&s, sizeof s);
    human(a, sizeof a, s.threshold);
    printf("  %s: %" PRIu64 " large blocks from the arena, %" PRIu64
           " from the system allocator (threshold %s), %" PRIu64 " cache hits\n",
           who, s.forwarded, s.fallbacks, a, s.cache_hits);
    if (s.daemon_pid != 0) {
        human(a, sizeof a, s.daemon_arena_bytes);
        human(b, sizeof b, s.daemon_arena_bytes - s.daemon_free_bytes);
        human(c, sizeof c, s.arena_bytes);
        printf("  daemon pid %" PRIu64 ": arena %s, %s in use by all its clients; this process "
               "holds %s (freed blocks kept for reuse)\n",
               s.daemon_pid, a, b, c);
    }
}

int main(int argc, char **argv)
{
    int require_daemon = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--require-daemon") == 0) {
            require_daemon = 1;
        } else if (strcmp(argv[i], "-h") == 0 || strcmp(argv[i], "--help") == 0) {
            printf("usage: %s [--require-daemon]\n"
                   "Allocates small and large blocks through xalloc.h in this process and a\n"
                   "forked child, and shows where they lived. XALLOC_NAME names the daemon\n"
                   "instance (default xalloc), XALLOC_THRESHOLD the size from which blocks go\n"
                   "to it (default 256K).\n",
                   argv[0]);
            return 0;
        } else {
            fprintf(stderr, "%s: unknown argument '%s' (try --help)\n", argv[0], argv[i]);
            return 64;
        }
    }

    const char *name = getenv("XALLOC_NAME");
    if (name == NULL || *name == '\0')
        name = "xalloc";

    /* The first large request connects. */
    struct xalloc_stats s;
    xalloc_stats(&s, sizeof s);
    void *probe = xalloc_malloc((size_t)s.threshold);
    xalloc_stats(&s, sizeof s);
    int found = probe != NULL && xalloc_is_shared(probe) && s.daemon_pid != 0;
    xalloc_free(probe);
    if (found) {
        char a[32];
        human(a, sizeof a, s.daemon_arena_bytes);
        printf("xalloc: daemon '%s' found (pid %" PRIu64 ", arena %s)\n", name, s.daemon_pid,
               a);
    } else {
        printf("xalloc: no daemon answers for instance '%s': every block comes from the system\n"
               "        allocator. Start one with `scripts/start.sh --name %s` (or\n"
               "        `xallocd start --name %s`) and run ./xalloc again.\n",
               name, name, name);
        if (require_daemon)
            return 2;
    }

    printf("\nparent (pid %ld):\n", (long)getpid());
    int ok = work("parent", 1);
    fflush(stdout);

    pid_t child = fork();
    if (child < 0) {
        perror("fork");
        return 1;
    }
    if (child == 0) {
        printf("\nchild (pid %ld), on a connection of its own:\n", (long)getpid());
        int child_ok = work("child", 7);
        print_stats("child");
        fflush(stdout);
        _exit(child_ok ? 0 : 1);
    }
    int status = 0;
    while (waitpid(child, &status, 0) < 0 && errno == EINTR) {
    }
    ok &= WIFEXITED(status) && WEXITSTATUS(status) == 0;

    printf("\ncounters:\n");
    print_stats("parent");
    printf("\nxalloc: %s\n", ok ? "every block held its bytes" : "DATA MISMATCH");
    return ok ? 0 : 1;
}
