/*
 * family: C's malloc family as a program sees it, with no xalloc in the program: run by
 * tests/tests/c_library.rs plainly (glibc's malloc) and under LD_PRELOAD=lib/libxalloc.so,
 * with and without a daemon. Every check holds for glibc and for the interposer alike;
 * where the preloaded library is there (xalloc_is_shared found with dlsym), large blocks
 * must also be where the mode says.
 *
 *   family plain|daemon|none
 *
 * Output: `ok SECTION` per section, `FAIL family.c:LINE: what`, `family shared=N system=N`,
 * `result failures=N`. Exit status 0 if no check failed.
 */
#define _GNU_SOURCE

#include <dlfcn.h>
#include <errno.h>
#include <malloc.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#define KIB ((size_t)1024)
#define MIB (KIB * KIB)
#define LARGE (1 * MIB)

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static unsigned failures;
static int mode_daemon, mode_plain;
static int (*is_shared_fn)(const void *);
static unsigned shared_blocks, system_blocks;

static void fail(int line, const char *what)
{
    pthread_mutex_lock(&lock);
    failures++;
    printf("FAIL family.c:%d: %s\n", line, what);
    fflush(stdout);
    pthread_mutex_unlock(&lock);
}

#define CHECK(cond)                                                                              \
    do {                                                                                         \
        if (!(cond))                                                                             \
            fail(__LINE__, #cond);                                                               \
    } while (0)

static unsigned failures_now(void)
{
    pthread_mutex_lock(&lock);
    unsigned n = failures;
    pthread_mutex_unlock(&lock);
    return n;
}

static void section_end(const char *name, unsigned before)
{
    printf("%s %s\n", failures_now() == before ? "ok" : "FAILED", name);
    fflush(stdout);
}

/* Checks that a large block is in the arena with a daemon, and not without one. */
static void where_large(const void *p, int line)
{
    if (is_shared_fn == NULL || p == NULL)
        return;
    int shared = is_shared_fn(p);
    pthread_mutex_lock(&lock);
    if (shared)
        shared_blocks++;
    else
        system_blocks++;
    pthread_mutex_unlock(&lock);
    if (shared != mode_daemon)
        fail(line, mode_daemon ? "a large block is not in the arena"
                               : "a large block is in an arena with no daemon");
}

static void where_small(const void *p, int line)
{
    if (is_shared_fn != NULL && p != NULL && is_shared_fn(p))
        fail(line, "a small block is in the arena");
}

static void fill(unsigned char *p, size_t n, unsigned seed)
{
    for (size_t i = 0; i < n; i++)
        p[i] = (unsigned char)((i >> 4) * 131 + i + seed);
}

static int holds(const unsigned char *p, size_t n, unsigned seed)
{
    unsigned char diff = 0;
    for (size_t i = 0; i < n; i++)
        diff |= (unsigned char)(p[i] ^ (unsigned char)((i >> 4) * 131 + i + seed));
    return diff == 0;
}

static int zero(const unsigned char *p, size_t n)
{
    unsigned char diff = 0;
    for (size_t i = 0; i < n; i++)
        diff |= p[i];
    return diff == 0;
}

/* A value the compiler cannot see through (it knows what malloc does with an absurd size, or
 * with a pointer already freed, and would refuse to compile the checks). */
static size_t opaque(size_t n)
{
    volatile size_t v = n;
    return v;
}

static void *launder(void *p)
{
    void *volatile v = p;
    return v;
}

static int aligned(const void *p, size_t a)
{
    return ((uintptr_t)p & (a - 1)) == 0;
}

static void section_malloc(void)
{
    unsigned before = failures_now();
    void *z1 = malloc(0), *z2 = malloc(0);
    CHECK(z1 != NULL && z2 != NULL && z1 != z2);
    free(z1);
    free(z2);
    free(NULL);
    CHECK(malloc_usable_size(NULL) == 0);

    unsigned char *s = malloc(100), *l = malloc(3 * MIB + 5);
    CHECK(s != NULL && l != NULL);
    if (s != NULL && l != NULL) {
        where_small(s, __LINE__);
        where_large(l, __LINE__);
        CHECK(aligned(s, 16) && aligned(l, 16));
        CHECK(malloc_usable_size(s) >= 100 && malloc_usable_size(l) >= 3 * MIB + 5);
        fill(s, 100, 1);
        fill(l, 3 * MIB + 5, 2);
        CHECK(holds(s, 100, 1) && holds(l, 3 * MIB + 5, 2));
    }
    free(s);
    free(l);
    errno = 0;
    CHECK(malloc(opaque(SIZE_MAX)) == NULL && errno == ENOMEM);
    section_end("malloc", before);
}

static void section_calloc(void)
{
    unsigned before = failures_now();
    unsigned char *p = calloc(4 * KIB, KIB);
    CHECK(p != NULL && zero(p, 4 * MIB));
    where_large(p, __LINE__);
    free(p);
    for (unsigned round = 0; round < 3; round++) {
        size_t n = (size_t)(round + 1) * MIB;
        unsigned char *a = malloc(n);
        CHECK(a != NULL);
        if (a == NULL)
            continue;
        memset(a, 0xff, n);
        free(a);
        unsigned char *b = calloc(1, n);
        CHECK(b != NULL && zero(b, n));
        where_large(b, __LINE__);
        free(b);
    }
    errno = 0;
    CHECK(calloc(opaque(SIZE_MAX / 2 + 1), 2) == NULL && errno == ENOMEM);
    section_end("calloc", before);
}

static void section_realloc(void)
{
    unsigned before = failures_now();
    unsigned char *p = malloc(1000);
    CHECK(p != NULL);
    if (p == NULL)
        return;
    fill(p, 1000, 3);
    unsigned char *q = realloc(p, 5 * MIB);
    CHECK(q != NULL && holds(q, 1000, 3));
    if (q == NULL) {
        free(p);
        return;
    }
    where_large(q, __LINE__);
    fill(q, 5 * MIB, 4);
    p = realloc(q, 9 * MIB);
    CHECK(p != NULL && holds(p, 5 * MIB, 4));
    if (p == NULL) {
        free(q);
        return;
    }
    where_large(p, __LINE__);
    q = realloc(p, 2000);
    CHECK(q != NULL && holds(q, 2000, 4));
    if (q == NULL) {
        free(p);
        return;
    }
    where_small(q, __LINE__);
    CHECK(realloc(q, 0) == NULL);
    p = realloc(NULL, LARGE);
    CHECK(p != NULL);
    where_large(p, __LINE__);
    free(p);

    /* reallocarray: a product that overflows leaves the block alone. */
    p = reallocarray(NULL, 1000, 1000);
    CHECK(p != NULL);
    if (p != NULL) {
        where_large(p, __LINE__);
        fill(p, 1000 * 1000, 5);
        errno = 0;
        CHECK(reallocarray(launder(p), opaque(SIZE_MAX / 2), 3) == NULL && errno == ENOMEM);
        CHECK(holds(p, 1000 * 1000, 5));
        q = reallocarray(p, 2000, 1000);
        CHECK(q != NULL && holds(q, 1000 * 1000, 5));
        free(q != NULL ? q : p);
    }
    section_end("realloc", before);
}

static void section_aligned(void)
{
    unsigned before = failures_now();
    long page = sysconf(_SC_PAGESIZE);
    for (size_t a = sizeof(void *); a <= 2 * MIB; a *= 2) {
        void *p = NULL;
        errno = 12345;
        CHECK(posix_memalign(&p, a, 100) == 0 && p != NULL && aligned(p, a));
        where_small(p, __LINE__);
        free(p);
        p = NULL;
        CHECK(posix_memalign(&p, a, LARGE + a) == 0 && p != NULL && aligned(p, a));
        CHECK(errno == 12345);
        where_large(p, __LINE__);
        if (p != NULL) {
            CHECK(malloc_usable_size(p) >= LARGE + a);
            fill(p, LARGE + a, 6);
            CHECK(holds(p, LARGE + a, 6));
        }
        free(p);
        unsigned char *q = aligned_alloc(a, LARGE);
        CHECK(q != NULL && aligned(q, a));
        where_large(q, __LINE__);
        free(q);
        q = memalign(a, 2 * LARGE);
        CHECK(q != NULL && aligned(q, a));
        where_large(q, __LINE__);
        free(q);
    }
    /* posix_memalign: a power of two and a multiple of sizeof(void *), else EINVAL. */
    static const size_t bad[] = {0, 4, 24, 3 * 4096};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        void *p = &lock;
        CHECK(posix_memalign(&p, bad[i], 100) == EINVAL);
        CHECK(posix_memalign(&p, bad[i], LARGE) == EINVAL);
        CHECK(p == (void *)&lock);
    }
    void *p = NULL;
    CHECK(posix_memalign(&p, 64, opaque(SIZE_MAX - 4096)) == ENOMEM);

    unsigned char *v = valloc(100), *w = valloc(2 * LARGE);
    CHECK(v != NULL && w != NULL && aligned(v, (size_t)page) && aligned(w, (size_t)page));
    where_small(v, __LINE__);
    where_large(w, __LINE__);
    free(v);
    free(w);
    v = pvalloc(100);
    CHECK(v != NULL && aligned(v, (size_t)page) && malloc_usable_size(v) >= (size_t)page);
    free(v);
    v = pvalloc(LARGE + 1);
    CHECK(v != NULL && aligned(v, (size_t)page));
    CHECK(malloc_usable_size(v) >= LARGE + (size_t)page);
    where_large(v, __LINE__);
    free(v);
    section_end("aligned", before);
}

static void *thread_main(void *arg)
{
    unsigned id = (unsigned)(uintptr_t)arg;
    for (unsigned it = 0; it < 40; it++) {
        size_t n = it % 3 == 0 ? 100 + it * 10 : LARGE / 2 + (size_t)(it * 37 + id) * 4096;
        unsigned char *p = malloc(n);
        CHECK(p != NULL);
        if (p == NULL)
            continue;
        fill(p, n, id * 100 + it);
        if (n >= 256 * KIB)
            where_large(p, __LINE__);
        unsigned char *q = realloc(p, n + n / 2);
        CHECK(q != NULL && holds(q, n, id * 100 + it));
        free(q != NULL ? q : p);
    }
    return NULL;
}

static void section_threads(void)
{
    unsigned before = failures_now();
    pthread_t t[6];
    for (unsigned i = 0; i < 6; i++)
        CHECK(pthread_create(&t[i], NULL, thread_main, (void *)(uintptr_t)i) == 0);
    for (unsigned i = 0; i < 6; i++)
        CHECK(pthread_join(t[i], NULL) == 0);
    section_end("threads", before);
}

static void section_double_free(void)
{
    if (!mode_daemon) {
        /* glibc aborts on a double free: only the arena forgives it. */
        printf("skip double_free\n");
        return;
    }
    unsigned before = failures_now();
    unsigned char *a = malloc(LARGE);
    CHECK(a != NULL);
    void *again = launder(a);
    free(a);
    free(again);
    unsigned char *b = malloc(LARGE), *c = malloc(LARGE);
    CHECK(b != NULL && c != NULL && b != c);
    if (b != NULL && c != NULL) {
        fill(b, LARGE, 7);
        fill(c, LARGE, 8);
        CHECK(holds(b, LARGE, 7) && holds(c, LARGE, 8));
    }
    free(b);
    free(c);
    section_end("double_free", before);
}

static void section_fork(void)
{
    unsigned before = failures_now();
    unsigned char *p = malloc(4 * MIB);
    CHECK(p != NULL);
    if (p == NULL)
        return;
    fill(p, 4 * MIB, 9);
    fflush(stdout);
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        int ok = holds(p, 4 * MIB, 9);
        fill(p, 4 * MIB, 10);
        for (unsigned i = 0; i < 4; i++) {
            unsigned char *q = malloc((i + 1) * MIB);
            if (q == NULL)
                _exit(3);
            if (is_shared_fn != NULL && is_shared_fn(q) != mode_daemon)
                _exit(4);
            fill(q, (i + 1) * MIB, 11 + i);
            ok &= holds(q, (i + 1) * MIB, 11 + i);
            free(q);
        }
        free(p);
        _exit(ok ? 0 : 1);
    }
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    CHECK(holds(p, 4 * MIB, 9));
    free(p);
    section_end("fork", before);
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: family plain|daemon|none\n");
        return 64;
    }
    mode_plain = strcmp(argv[1], "plain") == 0;
    mode_daemon = strcmp(argv[1], "daemon") == 0;
    setvbuf(stdout, NULL, _IOLBF, 0);
    /* The preloaded library's own function, if it is there (a data pointer to a function
     * pointer through memcpy, as POSIX allows). */
    void *sym = dlsym(RTLD_DEFAULT, "xalloc_is_shared");
    memcpy(&is_shared_fn, &sym, sizeof sym);
    if (mode_plain)
        CHECK(is_shared_fn == NULL);
    else
        CHECK(is_shared_fn != NULL);

    section_malloc();
    section_calloc();
    section_realloc();
    section_aligned();
    section_threads();
    section_double_free();
    section_fork();
    printf("family shared=%u system=%u\n", shared_blocks, system_blocks);
    printf("result failures=%u\n", failures_now());
    return failures_now() == 0 ? 0 : 1;
}
