/*
 * small_churn: small-object malloc/free churn, the workload where an LD_PRELOAD interposer
 * (lib/libxalloc.so) must cost next to nothing: every block here is below the threshold, so
 * the interposer's malloc compares the size with it and calls glibc's __libc_malloc, and its
 * free checks that the pointer lies outside the arena and calls __libc_free.
 *
 * Run it through scripts/bench-c.sh, which runs it alternately plain and under
 * LD_PRELOAD=lib/libxalloc.so (with a daemon of its own) and reports the medians.
 *
 *   cc -O2 -pthread -o small_churn bench/c/small_churn.c -ldl
 *   small_churn [--threads 8] [--ops N] [--window 1000] [--seed S] [--no-large]
 *               [--expect-preload]
 *
 * Each of --threads threads keeps a window of --window live blocks (filled before the clock
 * starts), then does --ops / --threads steps: pick a random slot (a fixed-seed xorshift per
 * thread), check and free its block, malloc a block of a random size of 16 to 512 bytes in its
 * place and write one byte into it. The clock runs from the moment every thread is ready (a
 * barrier) until the last thread's last step; the windows are freed after that.
 *
 * Before the threads start, one large block (1 MiB, above the default threshold) is allocated
 * and held for the run, so that under the interposer the process has a live connection to the
 * daemon and an arena mapped, as a program with both big buffers and small objects has: each
 * free then tests the pointer against the arena's bounds (--no-large leaves it out).
 *
 * Prints one line: `elapsed_ns N ops N threads N preload 0|1 large_shared 0|1|-`. With
 * --expect-preload it exits 1 unless the interposer is loaded (xalloc_is_shared is found with
 * dlsym) and the large block lies in the daemon's arena. Exit 1 also when a block lost the
 * byte written into it, 64 on a bad argument.
 */
#define _GNU_SOURCE

#include <dlfcn.h>
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MIN_SIZE 16u
#define MAX_SIZE 512u
#define LARGE_SIZE ((size_t)1 << 20)

struct worker {
    pthread_t thread;
    unsigned index;
    uint64_t seed;
    uint64_t steps;
    size_t window;
    pthread_barrier_t *start;
    /* Out: when this thread finished its last step, and how many blocks lost their byte. */
    uint64_t end_ns;
    uint64_t corrupt;
    int failed;
};

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* xorshift64 (Marsaglia): fast, fixed sequence for a fixed seed. */
static inline uint64_t xorshift(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *s = x;
    return x;
}

static void *work(void *arg)
{
    struct worker *w = arg;
    uint64_t rng = w->seed;
    size_t n = w->window;
    /* The window: a block and the byte written into it. */
    unsigned char **slot = malloc(n * sizeof *slot);
    unsigned char *mark = malloc(n);
    if (slot == NULL || mark == NULL) {
        w->failed = 1;
        pthread_barrier_wait(w->start);
        return NULL;
    }
    for (size_t i = 0; i < n; i++) {
        size_t size = MIN_SIZE + (size_t)(xorshift(&rng) % (MAX_SIZE - MIN_SIZE + 1));
        slot[i] = malloc(size);
        if (slot[i] == NULL) {
            w->failed = 1;
            n = i;
            break;
        }
        mark[i] = (unsigned char)i;
        slot[i][0] = mark[i];
    }
    pthread_barrier_wait(w->start);
    uint64_t corrupt = 0;
    if (!w->failed) {
        for (uint64_t k = 0; k < w->steps; k++) {
            uint64_t r = xorshift(&rng);
            size_t i = (size_t)(r % n);
            size_t size = MIN_SIZE + (size_t)((r >> 32) % (MAX_SIZE - MIN_SIZE + 1));
            corrupt += slot[i][0] != mark[i];
            free(slot[i]);
            unsigned char *p = malloc(size);
            if (p == NULL) {
                w->failed = 1;
                n = i; /* the blocks after the hole leak: the process exits */
                break;
            }
            mark[i] = (unsigned char)(r >> 8);
            p[0] = mark[i];
            slot[i] = p;
        }
    }
    w->end_ns = now_ns();
    for (size_t i = 0; i < n; i++) {
        corrupt += slot[i][0] != mark[i];
        free(slot[i]);
    }
    w->corrupt = corrupt;
    free(mark);
    free(slot);
    return NULL;
}

static int parse_u64(const char *flag, const char *v, uint64_t *out)
{
    char *end;
    errno = 0;
    unsigned long long x = v ? strtoull(v, &end, 10) : 0;
    if (v == NULL || *v == '\0' || *end != '\0' || errno != 0 || x == 0) {
        fprintf(stderr, "small_churn: %s needs a positive number\n", flag);
        return -1;
    }
    *out = x;
    return 0;
}

static void usage(FILE *f)
{
    fputs("usage: small_churn [--threads 8] [--ops N] [--window 1000] [--seed S] [--no-large]\n"
          "                   [--expect-preload]\n"
          "Small-object malloc/free churn (16-512 B) in --threads threads, --ops steps in all;\n"
          "prints the elapsed time. See bench/c/small_churn.c and scripts/bench-c.sh.\n",
          f);
}

int main(int argc, char **argv)
{
    uint64_t threads = 8, ops = 8000000, window = 1000, seed = 0x9e3779b97f4a7c15u;
    int large = 1, expect_preload = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        int r = 0;
        if (strcmp(a, "--threads") == 0) {
            r = parse_u64(a, v, &threads), i++;
        } else if (strcmp(a, "--ops") == 0) {
            r = parse_u64(a, v, &ops), i++;
        } else if (strcmp(a, "--window") == 0) {
            r = parse_u64(a, v, &window), i++;
        } else if (strcmp(a, "--seed") == 0) {
            r = parse_u64(a, v, &seed), i++;
        } else if (strcmp(a, "--no-large") == 0) {
            large = 0;
        } else if (strcmp(a, "--expect-preload") == 0) {
            expect_preload = 1;
        } else if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            usage(stdout);
            return 0;
        } else {
            fprintf(stderr, "small_churn: unknown argument %s\n", a);
            usage(stderr);
            return 64;
        }
        if (r != 0)
            return 64;
    }
    if (threads > 1024 || window > (1u << 24)) {
        fprintf(stderr, "small_churn: --threads at most 1024, --window at most 2^24\n");
        return 64;
    }

    /* The interposer, if it is loaded: the shared library exports the xalloc_* names too. */
    int (*is_shared)(const void *) = NULL;
    void *sym = dlsym(RTLD_DEFAULT, "xalloc_is_shared");
    memcpy(&is_shared, &sym, sizeof sym); /* POSIX: a data pointer holds a function's address */
    int preload = is_shared != NULL;
    if (expect_preload && !preload) {
        fprintf(stderr, "small_churn: --expect-preload, but no xalloc_is_shared: is "
                        "LD_PRELOAD=libxalloc.so set?\n");
        return 1;
    }
    unsigned char *big = NULL;
    int big_shared = -1;
    if (large) {
        big = malloc(LARGE_SIZE);
        if (big == NULL) {
            perror("small_churn: malloc of the large block");
            return 1;
        }
        memset(big, 1, LARGE_SIZE);
        if (preload)
            big_shared = is_shared(big);
        if (expect_preload && big_shared != 1) {
            fprintf(stderr, "small_churn: the 1 MiB block is not in a daemon's arena: is the "
                            "daemon of XALLOC_NAME running?\n");
            return 1;
        }
    }

    struct worker *w = calloc(threads, sizeof *w);
    pthread_barrier_t start;
    if (w == NULL || pthread_barrier_init(&start, NULL, (unsigned)threads + 1) != 0) {
        fprintf(stderr, "small_churn: set-up failed\n");
        return 1;
    }
    uint64_t per = ops / threads, rest = ops % threads;
    for (uint64_t t = 0; t < threads; t++) {
        w[t].index = (unsigned)t;
        w[t].seed = seed ^ (0xd1b54a32d192ed03u * (t + 1));
        if (w[t].seed == 0)
            w[t].seed = 1;
        w[t].steps = per + (t < rest);
        w[t].window = window;
        w[t].start = &start;
        int e = pthread_create(&w[t].thread, NULL, work, &w[t]);
        if (e != 0) {
            fprintf(stderr, "small_churn: pthread_create: %s\n", strerror(e));
            return 1;
        }
    }
    pthread_barrier_wait(&start);
    uint64_t t0 = now_ns(), t1 = t0, corrupt = 0;
    int failed = 0;
    for (uint64_t t = 0; t < threads; t++) {
        pthread_join(w[t].thread, NULL);
        if (w[t].end_ns > t1)
            t1 = w[t].end_ns;
        corrupt += w[t].corrupt;
        failed |= w[t].failed;
    }
    if (big != NULL)
        free(big);
    if (failed) {
        fprintf(stderr, "small_churn: an allocation failed\n");
        return 1;
    }
    if (corrupt != 0) {
        fprintf(stderr, "small_churn: %" PRIu64 " blocks lost the byte written into them\n",
                corrupt);
        return 1;
    }
    printf("elapsed_ns %" PRIu64 " ops %" PRIu64 " threads %" PRIu64 " preload %d large_shared %s\n",
           t1 - t0, ops, threads, preload,
           big_shared < 0 ? "-" : big_shared ? "1" : "0");
    free(w);
    return 0;
}
