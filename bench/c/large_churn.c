/*
 * large_churn: what one large allocate / touch / free cycle costs through xalloc's C library,
 * next to glibc and mimalloc, all in one process: the C counterpart of bench/src/bin/churn.rs
 * (which measures XallocGlobal the same way).
 *
 * Run it through scripts/bench-c.sh, which builds it, starts a daemon of its own pinned on
 * CPU 0, and runs it twice on CPU 1: plain (the C API) and under LD_PRELOAD=lib/libxalloc.so.
 * By hand (d = the vendored mimalloc, c_src/mimalloc/v3 of the libmimalloc-sys crate):
 *
 *   cc -O2 -DNDEBUG -DMI_DEBUG=0 -DMI_BUILD_RELEASE -ftls-model=initial-exec \
 *      -I$d/include -I$d/src -c $d/src/static.c -o mimalloc.o
 *   cc -O2 -Ilib -o large_churn bench/c/large_churn.c mimalloc.o lib/libxalloc.a \
 *      -lgcc_s -lutil -lrt -lpthread -lm -ldl -lc
 *   XALLOC_NAME=INSTANCE taskset -c 1 ./large_churn [--quick]
 *   XALLOC_NAME=INSTANCE LD_PRELOAD=lib/libxalloc.so taskset -c 1 ./large_churn --preload
 *
 * For each block size (256 KiB, 1 MiB, 16 MiB, 64 MiB) and each subject, one iteration is
 * p = alloc(size); one volatile byte write at every 4 KiB of the block; free(p), timed with
 * CLOCK_MONOTONIC as a whole and phase by phase (four clock reads per iteration). The subjects
 * are called through function pointers, round-robin within each repetition (the starting
 * subject rotates), after a warm-up of 10% (at least 3) that is not counted:
 *
 *   glibc      __libc_malloc / __libc_free (glibc's own names, never interposed)
 *   mimalloc   mi_malloc / mi_free (mimalloc compiled into the program; it does not
 *              replace malloc)
 *   capi       xalloc_malloc / xalloc_free, linked statically from lib/libxalloc.a
 *   preload    (--preload, instead of capi) plain malloc / free, which resolve to the
 *              interposer of LD_PRELOAD=libxalloc.so
 *
 * Iterations per size: 20000, 10000, 1500, 500 (as churn.rs); --quick 2000, 1000, 100, 40;
 * --iters N for all sizes. The harness's own buffers are mmap'd, so no allocator under test
 * sees them.
 *
 * Output (stdout), one line per fact, numbers in µs:
 *
 *   size BYTES iters N warmup N
 *   row BYTES SUBJECT MEDIAN P90 ALLOC TOUCH FREE FAULTS FIRST
 *   xalloc SUBJECT asked N outside N forwarded N fallbacks N held_bytes N daemon_pid N
 *
 * (ALLOC, TOUCH, FREE: the medians of the phases; FAULTS: mean page faults per iteration;
 * FIRST: the cold first iteration.) Exit status 1, with the reason on stderr, if anything
 * failed, above all if any block of the xalloc subject did not lie in the daemon's arena
 * (xalloc_is_shared; the run stops at the first size where one did not), the library counted
 * a fallback to the system allocator or still holds arena bytes after the last free, or the
 * daemon is not the one --daemon-pid names: its numbers would then be glibc's. 64 on a bad
 * argument.
 */
#define _GNU_SOURCE

#include <dlfcn.h>
#include <errno.h>
#include <stddef.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <time.h>

#include "xalloc.h"

/* glibc's allocator under the names it keeps for interposers. */
extern void *__libc_malloc(size_t size);
extern void __libc_free(void *ptr);
/* mimalloc, compiled into the program (its src/static.c, without MI_MALLOC_OVERRIDE). */
extern void *mi_malloc(size_t size);
extern void mi_free(void *ptr);

#define PAGE 4096u
#define N_SIZES 4
#define N_SUBJECTS 3

static const struct {
    size_t size;
    unsigned full, quick;
} SIZES[N_SIZES] = {
    {(size_t)256 << 10, 20000, 2000},
    {(size_t)1 << 20, 10000, 1000},
    {(size_t)16 << 20, 1500, 100},
    {(size_t)64 << 20, 500, 40},
};

enum kind { PLAIN, CAPI, PRELOAD };

struct subject {
    const char *name;
    void *(*alloc)(size_t);
    void (*release)(void *);
    enum kind kind;
};

/* The xalloc library a subject goes through: its is_shared and stats. */
struct xlib {
    int (*is_shared)(const void *);
    size_t (*stats)(struct xalloc_stats *, size_t);
};

struct times {
    uint64_t total, alloc, touch, release, faults;
};

/* Per-run bookkeeping of the xalloc subject. */
struct check {
    uint64_t asked, outside;
};

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static uint64_t thread_faults(void)
{
    struct rusage ru;
    if (getrusage(RUSAGE_THREAD, &ru) != 0)
        return 0;
    return (uint64_t)ru.ru_minflt + (uint64_t)ru.ru_majflt;
}

/* One volatile byte write at every PAGE bytes of [p, p + size). */
static inline void touch(unsigned char *p, size_t size)
{
    volatile unsigned char *v = p;
    for (size_t off = 0; off < size; off += PAGE)
        v[off] = (unsigned char)(off | 1);
}

/* One timed iteration; 0, or -1 if the allocation failed. */
static __attribute__((noinline)) int iteration(const struct subject *s, const struct xlib *x,
                                               size_t size, struct check *check,
                                               struct times *out)
{
    uint64_t faults = thread_faults();
    uint64_t t0 = now_ns();
    unsigned char *p = s->alloc(size);
    uint64_t t1 = now_ns();
    if (p == NULL)
        return -1;
    touch(p, size);
    uint64_t t2 = now_ns();
    uintptr_t addr = (uintptr_t)p; /* for the check below, by address: p is freed then */
    s->release(p);
    uint64_t t3 = now_ns();
    out->total = t3 - t0;
    out->alloc = t1 - t0;
    out->touch = t2 - t1;
    out->release = t3 - t2;
    out->faults = thread_faults() - faults;
    if (s->kind != PLAIN) {
        /* By address alone, as churn.rs: a freed block's address still lies in the arena. */
        check->asked++;
        check->outside += !x->is_shared((const void *)addr);
    }
    return 0;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

/* The p quantile (nearest rank) of `v[0..n)`, sorted here, in µs. */
static double quantile(uint64_t *v, size_t n, double p)
{
    qsort(v, n, sizeof *v, cmp_u64);
    size_t rank = (size_t)(p * (double)n + 0.999999);
    if (rank < 1)
        rank = 1;
    if (rank > n)
        rank = n;
    return (double)v[rank - 1] / 1e3;
}

/* The p quantile of one field (at byte offset `field`) of `t[0..n)`, using `col` (n words). */
static double column(const struct times *t, size_t n, uint64_t *col, size_t field, double p)
{
    for (size_t j = 0; j < n; j++)
        memcpy(&col[j], (const char *)&t[j] + field, sizeof col[j]);
    return quantile(col, n, p);
}

static void *map(size_t bytes)
{
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

static int parse_uint(const char *flag, const char *v, unsigned long *out)
{
    char *end;
    errno = 0;
    unsigned long x = v ? strtoul(v, &end, 10) : 0;
    if (v == NULL || *v == '\0' || *end != '\0' || errno != 0 || x == 0) {
        fprintf(stderr, "large_churn: %s needs a positive number\n", flag);
        return -1;
    }
    *out = x;
    return 0;
}

static void usage(FILE *f)
{
    fputs("usage: XALLOC_NAME=INSTANCE large_churn [--preload] [--quick] [--iters N]\n"
          "                                        [--warmup N] [--daemon-pid PID]\n"
          "Large-block alloc / touch every 4 KiB / free at 256 KiB, 1 MiB, 16 MiB, 64 MiB:\n"
          "glibc, mimalloc and xalloc's C API (--preload: malloc via LD_PRELOAD=libxalloc.so\n"
          "instead). See bench/c/large_churn.c and scripts/bench-c.sh.\n",
          f);
}

int main(int argc, char **argv)
{
    int preload = 0, quick = 0;
    unsigned long iters_all = 0, warmup_all = 0, want_pid = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        int r = 0;
        if (strcmp(a, "--preload") == 0) {
            preload = 1;
        } else if (strcmp(a, "--quick") == 0) {
            quick = 1;
        } else if (strcmp(a, "--iters") == 0) {
            r = parse_uint(a, v, &iters_all), i++;
        } else if (strcmp(a, "--warmup") == 0) {
            r = parse_uint(a, v, &warmup_all), i++;
        } else if (strcmp(a, "--daemon-pid") == 0) {
            r = parse_uint(a, v, &want_pid), i++;
        } else if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            usage(stdout);
            return 0;
        } else {
            fprintf(stderr, "large_churn: unknown argument %s\n", a);
            usage(stderr);
            return 64;
        }
        if (r != 0)
            return 64;
    }

    struct xlib x = {xalloc_is_shared, xalloc_stats};
    struct subject subjects[N_SUBJECTS] = {
        {"glibc", __libc_malloc, __libc_free, PLAIN},
        {"mimalloc", mi_malloc, mi_free, PLAIN},
        {"capi", xalloc_malloc, xalloc_free, CAPI},
    };
    if (preload) {
        /* The interposer's own xalloc_* (the shared library exports them; this program's
         * static copy is not in its dynamic symbol table, so dlsym cannot return that). */
        void *sym = dlsym(RTLD_DEFAULT, "xalloc_is_shared");
        void *stats = dlsym(RTLD_DEFAULT, "xalloc_stats");
        if (sym == NULL || stats == NULL) {
            fprintf(stderr, "large_churn: --preload, but no xalloc_is_shared in the process: "
                            "is LD_PRELOAD=libxalloc.so set?\n");
            return 1;
        }
        memcpy(&x.is_shared, &sym, sizeof sym);
        memcpy(&x.stats, &stats, sizeof stats);
        if (x.is_shared == xalloc_is_shared || x.stats == xalloc_stats) {
            fprintf(stderr, "large_churn: dlsym found the static library's functions, not "
                            "the interposer's\n");
            return 1;
        }
        subjects[2] = (struct subject){"preload", malloc, free, PRELOAD};
    }
    const struct subject *xs = &subjects[2];

    struct xalloc_stats s0, s1;
    memset(&s0, 0, sizeof s0);
    memset(&s1, 0, sizeof s1);
    if (x.stats(&s0, sizeof s0) < sizeof s0) {
        fprintf(stderr, "large_churn: the library's struct xalloc_stats is older than xalloc.h\n");
        return 1;
    }
    if (s0.threshold > SIZES[0].size) {
        fprintf(stderr, "large_churn: the threshold is %" PRIu64 " bytes (XALLOC_THRESHOLD?): "
                        "the 256 KiB blocks would go to glibc; unset XALLOC_THRESHOLD\n",
                s0.threshold);
        return 1;
    }

    struct check check = {0, 0};
    for (int si = 0; si < N_SIZES; si++) {
        size_t size = SIZES[si].size;
        size_t iters = iters_all ? iters_all : quick ? SIZES[si].quick : SIZES[si].full;
        size_t warmup = warmup_all ? warmup_all : iters / 10 < 3 ? 3 : iters / 10;
        size_t reps = warmup + iters;
        fprintf(stderr, "large_churn: %zu KiB: %zu iterations after %zu warm-up, per subject\n",
                size >> 10, iters, warmup);
        printf("size %zu iters %zu warmup %zu\n", size, iters, warmup);
        /* All iterations' times of every subject, then one column at a time for quantiles. */
        struct times *t = map(N_SUBJECTS * reps * sizeof *t);
        uint64_t *col = map(iters * sizeof *col);
        if (t == NULL || col == NULL) {
            perror("large_churn: mmap");
            return 1;
        }
        for (size_t rep = 0; rep < reps; rep++) {
            for (int k = 0; k < N_SUBJECTS; k++) {
                int i = (int)((rep + (size_t)k) % N_SUBJECTS);
                if (iteration(&subjects[i], &x, size, &check, &t[(size_t)i * reps + rep]) != 0) {
                    fprintf(stderr, "large_churn: %s: allocation of %zu bytes failed\n",
                            subjects[i].name, size);
                    return 1;
                }
            }
            if (check.outside > 0) {
                fprintf(stderr, "large_churn: ERROR: a %s block of %zu bytes lay outside the "
                                "daemon's arena (no daemon for XALLOC_NAME, or no room?): its "
                                "numbers would be glibc's; stopping\n", xs->name, size);
                return 1;
            }
        }
        for (int i = 0; i < N_SUBJECTS; i++) {
            const struct times *ti = &t[(size_t)i * reps];
            const struct times *m = ti + warmup;
            double faults = 0;
            for (size_t j = 0; j < iters; j++)
                faults += (double)m[j].faults;
            double median = column(m, iters, col, offsetof(struct times, total), 0.5);
            double p90 = column(m, iters, col, offsetof(struct times, total), 0.9);
            double alloc = column(m, iters, col, offsetof(struct times, alloc), 0.5);
            double tch = column(m, iters, col, offsetof(struct times, touch), 0.5);
            double rel = column(m, iters, col, offsetof(struct times, release), 0.5);
            printf("row %zu %s %.3f %.3f %.3f %.3f %.3f %.2f %.3f\n", size, subjects[i].name,
                   median, p90, alloc, tch, rel, faults / (double)iters,
                   (double)ti[0].total / 1e3);
        }
        fflush(stdout);
        munmap(t, N_SUBJECTS * reps * sizeof *t);
        munmap(col, iters * sizeof *col);
    }

    x.stats(&s1, sizeof s1);
    uint64_t forwarded = s1.forwarded - s0.forwarded, fallbacks = s1.fallbacks - s0.fallbacks;
    uint64_t held = s1.arena_bytes > s1.cached_bytes ? s1.arena_bytes - s1.cached_bytes : 0;
    printf("xalloc %s asked %" PRIu64 " outside %" PRIu64 " forwarded %" PRIu64
           " fallbacks %" PRIu64 " held_bytes %" PRIu64 " daemon_pid %" PRIu64 "\n",
           xs->name, check.asked, check.outside, forwarded, fallbacks, held, s1.daemon_pid);
    int bad = 0;
    if (check.outside > 0) {
        fprintf(stderr, "large_churn: ERROR: %" PRIu64 " of %" PRIu64 " %s blocks lay outside "
                        "the daemon's arena: their numbers are glibc's\n",
                check.outside, check.asked, xs->name);
        bad = 1;
    }
    if (fallbacks > 0) {
        fprintf(stderr, "large_churn: ERROR: %s fell back to the system allocator %" PRIu64
                        " times\n", xs->name, fallbacks);
        bad = 1;
    }
    if (forwarded != check.asked) {
        fprintf(stderr, "large_churn: ERROR: %" PRIu64 " allocations forwarded to the arena, "
                        "not the %" PRIu64 " asked of %s\n", forwarded, check.asked, xs->name);
        bad = 1;
    }
    if (held > 0) {
        fprintf(stderr, "large_churn: ERROR: %" PRIu64 " arena bytes still held after the run "
                        "(frees the daemon did not take)\n", held);
        bad = 1;
    }
    if (want_pid != 0 && s1.daemon_pid != want_pid) {
        fprintf(stderr, "large_churn: ERROR: served by daemon pid %" PRIu64 ", not %lu "
                        "(XALLOC_NAME?)\n", s1.daemon_pid, want_pid);
        bad = 1;
    }
    return bad;
}
