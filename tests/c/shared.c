/*
 * shared: the share-handle functions of xalloc.h (xalloc_shared_*), linked statically with
 * lib/libxalloc.a, checked from C in one process and across processes. Run by
 * tests/tests/c_sharing.rs, with XALLOC_NAME naming the daemon.
 *
 *   shared local                       every function in one process (a daemon serves)
 *   shared range                       buffers too small for a handle: prints what
 *                                      xalloc_shared_handle and xalloc_shared_send answer
 *   shared none                        no daemon answers: the share functions fail with
 *                                      ENOTCONN, the allocator still works
 *   shared create SIZE SEED            a buffer of SIZE bytes with pattern SEED; prints
 *                                      `handle H`, waits for a line on stdin, closes it and
 *                                      prints `closed`
 *   shared view H SIZE SEED            opens H, checks the size and every byte; prints
 *                                      `view ok size=SIZE`
 *   shared send SIZE SEED NEWSEED      a buffer with pattern SEED and a view of it; sends the
 *                                      buffer and prints `transfer T`; waits for a line on
 *                                      stdin (the receiver wrote NEWSEED meanwhile), checks
 *                                      that its view shows NEWSEED, prints `sender view ok`
 *   shared receive T SIZE SEED NEWSEED receives T, checks pattern SEED, writes NEWSEED;
 *                                      prints `received ok size=SIZE`
 *   shared expect OP H ERRNO           OP (open or receive) of H must fail with errno ERRNO
 *                                      (a name: ENOENT...); prints `OP errno=NAME` (what it
 *                                      got, or `OP succeeded`)
 *
 * A check that does not hold prints `FAIL shared.c:LINE: what`; the exit status is 0 if none
 * failed, 1 otherwise.
 */
#define _POSIX_C_SOURCE 200809L

#include "xalloc.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

static unsigned failures;

/* The errno values of xalloc.h's share functions, by name. */
static const struct {
    const char *name;
    int value;
} errnos[] = {
    {"ENOTCONN", ENOTCONN}, {"EXDEV", EXDEV},   {"ENOENT", ENOENT}, {"EPERM", EPERM},
    {"EINVAL", EINVAL},     {"ERANGE", ERANGE}, {"ENOMEM", ENOMEM}, {"EDQUOT", EDQUOT},
    {"EMFILE", EMFILE},     {"EIO", EIO},
};

static const char *errno_name(int e)
{
    static char other[32];
    size_t i;
    for (i = 0; i < sizeof errnos / sizeof errnos[0]; i++)
        if (errnos[i].value == e)
            return errnos[i].name;
    snprintf(other, sizeof other, "E%d", e);
    return other;
}

/* Counts and prints a failed check, with errno as it was. */
static void fail(int line, const char *what)
{
    const char *e = errno_name(errno);
    failures++;
    printf("FAIL shared.c:%d: %s (errno %s)\n", line, what, e);
    fflush(stdout);
}

#define CHECK(cond)                                                                              \
    do {                                                                                         \
        if (!(cond))                                                                             \
            fail(__LINE__, #cond);                                                               \
    } while (0)

/* Byte `i` of pattern `seed`: differs from byte to byte and from page to page. */
static unsigned char pattern(size_t i, unsigned seed)
{
    return (unsigned char)((i * 7u + (i >> 12) * 13u + seed * 101u) & 0xff);
}

static void fill(unsigned char *p, size_t n, unsigned seed)
{
    size_t i;
    for (i = 0; i < n; i++)
        p[i] = pattern(i, seed);
}

/* 1 if the `n` bytes at `p` are pattern `seed`. */
static int holds(const unsigned char *p, size_t n, unsigned seed)
{
    size_t i;
    for (i = 0; i < n; i++)
        if (p[i] != pattern(i, seed))
            return 0;
    return 1;
}

/* 1 if `h` looks like a handle of kind `kind` ('v' or 't'): 63 characters of [0-9a-f-]
 * after `xs` and the kind. */
static int well_formed(const char *h, char kind)
{
    size_t i;
    if (strlen(h) != XALLOC_HANDLE_LEN - 1 || h[0] != 'x' || h[1] != 's' || h[2] != kind)
        return 0;
    for (i = 3; h[i]; i++)
        if (!(h[i] == '-' || (h[i] >= '0' && h[i] <= '9') || (h[i] >= 'a' && h[i] <= 'f')))
            return 0;
    return 1;
}

static size_t number(const char *s)
{
    return (size_t)strtoull(s, NULL, 10);
}

/* Waits for a line (or the end) on stdin. */
static void wait_line(void)
{
    char line[64];
    if (!fgets(line, sizeof line, stdin))
        return;
}

static void usage(void)
{
    fprintf(stderr, "usage: shared local|none|create|view|send|receive|expect ...\n");
    exit(2);
}

/* ------------------------------------------------------------------------------------------ */

static void local(void)
{
    const size_t size = ((size_t)1 << 20) + 3;
    char h[XALLOC_HANDLE_LEN], t[XALLOC_HANDLE_LEN], other[XALLOC_HANDLE_LEN];
    char bad[128];
    struct xalloc_shared *s, *v, *tv, *r, *z, *zv;
    const unsigned char *data;
    unsigned char *w;
    struct xalloc_stats st;
    uint64_t bad_frees;
    size_t i;
    int zero = 1;

    /* A new buffer: zeroed, writable, in the arena. */
    s = xalloc_shared_new(size);
    CHECK(s != NULL);
    if (!s) {
        printf("new errno=%s\n", errno_name(errno));
        return;
    }
    CHECK(xalloc_shared_size(s) == size);
    data = (const unsigned char *)xalloc_shared_data(s);
    w = (unsigned char *)xalloc_shared_writable(s);
    CHECK(data != NULL && (const unsigned char *)w == data);
    CHECK(xalloc_is_shared(data) == 1);
    for (i = 0; i < size; i++)
        if (data[i] != 0)
            zero = 0;
    CHECK(zero);
    fill(w, size, 1);

    /* NULL arguments. */
    errno = 0;
    CHECK(xalloc_shared_data(NULL) == NULL && errno == EINVAL);
    errno = 0;
    CHECK(xalloc_shared_writable(NULL) == NULL && errno == EINVAL);
    CHECK(xalloc_shared_size(NULL) == 0);
    xalloc_shared_close(NULL);

    /* The handle: ERANGE below XALLOC_HANDLE_LEN bytes, nothing written. */
    memset(h, 'Z', sizeof h);
    errno = 0;
    CHECK(xalloc_shared_handle(s, h, XALLOC_HANDLE_LEN - 1) == -1 && errno == ERANGE);
    CHECK(h[0] == 'Z' && h[XALLOC_HANDLE_LEN - 1] == 'Z');
    errno = 0;
    CHECK(xalloc_shared_handle(s, h, 0) == -1 && errno == ERANGE);
    errno = 0;
    CHECK(xalloc_shared_handle(s, NULL, sizeof h) == -1 && errno == EINVAL);
    errno = 0;
    CHECK(xalloc_shared_handle(NULL, h, sizeof h) == -1 && errno == EINVAL);
    CHECK(xalloc_shared_handle(s, h, sizeof h) == 0);
    CHECK(well_formed(h, 'v'));
    printf("handle %s\n", h);

    /* A view in this process: the same bytes, read-only, its handle the same. */
    v = xalloc_shared_open(h);
    CHECK(v != NULL);
    if (v) {
        CHECK(xalloc_shared_size(v) == size);
        CHECK(holds((const unsigned char *)xalloc_shared_data(v), size, 1));
        errno = 0;
        CHECK(xalloc_shared_writable(v) == NULL && errno == EPERM);
        errno = 0;
        CHECK(xalloc_shared_send(v, t, sizeof t) == -1 && errno == EINVAL);
        CHECK(xalloc_shared_size(v) == size);
        CHECK(xalloc_shared_handle(v, other, sizeof other) == 0 && strcmp(other, h) == 0);
    }

    /* A view handle does not transfer. */
    errno = 0;
    CHECK(xalloc_shared_receive(h) == NULL && errno == EPERM);

    /* Text that is no handle. */
    errno = 0;
    CHECK(xalloc_shared_open(NULL) == NULL && errno == EINVAL);
    errno = 0;
    CHECK(xalloc_shared_receive(NULL) == NULL && errno == EINVAL);
    errno = 0;
    CHECK(xalloc_shared_open("") == NULL && errno == EINVAL);
    errno = 0;
    CHECK(xalloc_shared_open("xsv-") == NULL && errno == EINVAL);
    memcpy(bad, h, sizeof h);
    bad[XALLOC_HANDLE_LEN - 2] = 'g';
    errno = 0;
    CHECK(xalloc_shared_open(bad) == NULL && errno == EINVAL);
    memcpy(bad, h, sizeof h);
    for (i = 0; bad[i]; i++)
        if (bad[i] >= 'a' && bad[i] <= 'z')
            bad[i] = (char)(bad[i] - 'a' + 'A');
    errno = 0;
    CHECK(xalloc_shared_open(bad) == NULL && errno == EINVAL);
    memcpy(bad, h, sizeof h);
    bad[XALLOC_HANDLE_LEN - 1] = '0'; /* 64 characters: one too many */
    bad[XALLOC_HANDLE_LEN] = '\0';
    errno = 0;
    CHECK(xalloc_shared_open(bad) == NULL && errno == EINVAL);
    memset(bad, 'x', sizeof bad - 1); /* much longer */
    bad[sizeof bad - 1] = '\0';
    errno = 0;
    CHECK(xalloc_shared_open(bad) == NULL && errno == EINVAL);

    /* A changed token: well formed, but no block has it. */
    memcpy(bad, h, sizeof h);
    bad[XALLOC_HANDLE_LEN - 2] = bad[XALLOC_HANDLE_LEN - 2] == '0' ? '1' : '0';
    errno = 0;
    CHECK(xalloc_shared_open(bad) == NULL && errno == ENOENT);

    /* The block's bytes are no block of xalloc_free: it frees nothing, counts a bad free. */
    memset(&st, 0, sizeof st);
    xalloc_stats(&st, sizeof st);
    bad_frees = st.bad_frees;
    xalloc_free(w);
    xalloc_stats(&st, sizeof st);
    CHECK(st.bad_frees == bad_frees + 1);
    CHECK(holds(data, size, 1));

    /* In a forked child the parent's buffer cannot be sent, and closing it there closes
     * nothing of the parent's; the child can make a buffer of its own. */
    {
        pid_t child;
        int status = -1;
        fflush(stdout);
        child = fork();
        CHECK(child >= 0);
        if (child == 0) {
            struct xalloc_shared *own;
            int ok;
            errno = 0;
            ok = xalloc_shared_send(s, t, sizeof t) == -1 && errno == ENOTCONN;
            xalloc_shared_close(s);
            if (v)
                xalloc_shared_close(v);
            own = xalloc_shared_new(4096);
            ok = ok && own != NULL;
            xalloc_shared_close(own);
            _exit(ok ? 0 : 1);
        }
        if (child > 0)
            CHECK(waitpid(child, &status, 0) == child && WIFEXITED(status) &&
                  WEXITSTATUS(status) == 0);
        if (v)
            CHECK(holds((const unsigned char *)xalloc_shared_data(v), size, 1));
        tv = xalloc_shared_open(h);
        CHECK(tv != NULL);
        xalloc_shared_close(tv);
    }

    /* Send: ERANGE and EINVAL leave the buffer as it was; then the transfer handle. */
    errno = 0;
    CHECK(xalloc_shared_send(s, t, 10) == -1 && errno == ERANGE);
    errno = 0;
    CHECK(xalloc_shared_send(s, NULL, sizeof t) == -1 && errno == EINVAL);
    errno = 0;
    CHECK(xalloc_shared_send(NULL, t, sizeof t) == -1 && errno == EINVAL);
    CHECK(xalloc_shared_size(s) == size && xalloc_shared_writable(s) == w);
    CHECK(holds(data, size, 1));
    CHECK(xalloc_shared_send(s, t, sizeof t) == 0);
    s = NULL;
    CHECK(well_formed(t, 't'));
    printf("transfer %s\n", t);
    /* The view stays open; a transfer handle opens views too. */
    if (v)
        CHECK(holds((const unsigned char *)xalloc_shared_data(v), size, 1));
    tv = xalloc_shared_open(t);
    CHECK(tv != NULL && xalloc_shared_size(tv) == size);
    xalloc_shared_close(tv);

    /* Receive it back: writable again, once. */
    r = xalloc_shared_receive(t);
    CHECK(r != NULL);
    if (r) {
        CHECK(xalloc_shared_size(r) == size);
        w = (unsigned char *)xalloc_shared_writable(r);
        CHECK(w != NULL && holds(w, size, 1));
        if (w) {
            fill(w, size, 2);
            if (v)
                CHECK(holds((const unsigned char *)xalloc_shared_data(v), size, 2));
        }
    }
    errno = 0;
    CHECK(xalloc_shared_receive(t) == NULL && errno == ENOENT);

    /* 0 bytes. */
    z = xalloc_shared_new(0);
    CHECK(z != NULL);
    if (z) {
        CHECK(xalloc_shared_size(z) == 0 && xalloc_shared_data(z) != NULL);
        CHECK(xalloc_shared_handle(z, other, sizeof other) == 0 && well_formed(other, 'v'));
        zv = xalloc_shared_open(other);
        CHECK(zv != NULL && xalloc_shared_size(zv) == 0);
        xalloc_shared_close(zv);
        xalloc_shared_close(z);
    }

    xalloc_shared_close(r);
    xalloc_shared_close(v);
    /* Every reference is gone: the handle names no block now. */
    errno = 0;
    CHECK(xalloc_shared_open(h) == NULL && errno == ENOENT);
    if (failures == 0)
        printf("ok local\n");
}

/* Buffers too small for a handle: -1 with ERANGE, nothing written, the buffer not sent. */
static void range(void)
{
    char h[XALLOC_HANDLE_LEN];
    size_t cap;
    int rc;
    struct xalloc_shared *s = xalloc_shared_new(4096);
    if (!s) {
        printf("new errno=%s\n", errno_name(errno));
        failures++;
        return;
    }
    for (cap = 0; cap <= XALLOC_HANDLE_LEN; cap += XALLOC_HANDLE_LEN - 1) {
        memset(h, 'Z', sizeof h);
        errno = 0;
        rc = xalloc_shared_handle(s, h, cap);
        printf("handle cap=%zu rc=%d errno=%s untouched=%d\n", cap, rc,
               rc ? errno_name(errno) : "-", h[0] == 'Z');
        errno = 0;
        rc = xalloc_shared_send(s, h, cap);
        printf("send cap=%zu rc=%d errno=%s untouched=%d owned=%d\n", cap, rc,
               rc ? errno_name(errno) : "-", h[0] == 'Z', xalloc_shared_writable(s) != NULL);
    }
    /* With room: the handle, then the send, which frees the object. */
    rc = xalloc_shared_handle(s, h, XALLOC_HANDLE_LEN);
    printf("handle cap=%d rc=%d length=%zu\n", XALLOC_HANDLE_LEN, rc, strlen(h));
    rc = xalloc_shared_send(s, h, XALLOC_HANDLE_LEN);
    printf("send cap=%d rc=%d length=%zu\n", XALLOC_HANDLE_LEN, rc, strlen(h));
    if (rc != 0)
        xalloc_shared_close(s);
    /* Nobody receives it: it goes when this process exits. */
}

/* No daemon: the share functions fail, the allocator works (from the system allocator). */
static void none(void)
{
    const char *view = "xsv-0123456789abcdef-0000000000001000-00000001-0123456789abcdef";
    const char *transfer = "xst-0123456789abcdef-0000000000001000-00000001-0123456789abcdef";
    int new_errno;
    unsigned char *p;

    errno = 0;
    CHECK(xalloc_shared_new(4096) == NULL);
    new_errno = errno;
    CHECK(new_errno == ENOTCONN);
    errno = 0;
    CHECK(xalloc_shared_new(0) == NULL && errno == ENOTCONN);
    errno = 0;
    CHECK(xalloc_shared_open(view) == NULL && errno == ENOTCONN);
    errno = 0;
    CHECK(xalloc_shared_receive(transfer) == NULL && errno == ENOTCONN);
    errno = 0;
    CHECK(xalloc_shared_receive(view) == NULL && errno == EPERM);
    errno = 0;
    CHECK(xalloc_shared_open("junk") == NULL && errno == EINVAL);

    p = (unsigned char *)xalloc_malloc((size_t)4 << 20);
    CHECK(p != NULL);
    if (p) {
        CHECK(xalloc_is_shared(p) == 0);
        fill(p, (size_t)4 << 20, 5);
        CHECK(holds(p, (size_t)4 << 20, 5));
        xalloc_free(p);
    }
    if (failures == 0)
        printf("none ok new_errno=%s\n", errno_name(new_errno));
}

static void create(size_t size, unsigned seed)
{
    char h[XALLOC_HANDLE_LEN];
    struct xalloc_shared *s = xalloc_shared_new(size);
    if (!s) {
        printf("new errno=%s\n", errno_name(errno));
        failures++;
        return;
    }
    fill((unsigned char *)xalloc_shared_writable(s), size, seed);
    CHECK(xalloc_shared_handle(s, h, sizeof h) == 0);
    printf("handle %s\n", h);
    fflush(stdout);
    wait_line();
    /* Nobody else writes a view's bytes. */
    CHECK(holds((const unsigned char *)xalloc_shared_data(s), size, seed));
    xalloc_shared_close(s);
    printf("closed\n");
}

static void view(const char *h, size_t size, unsigned seed)
{
    struct xalloc_shared *v = xalloc_shared_open(h);
    if (!v) {
        printf("open errno=%s\n", errno_name(errno));
        failures++;
        return;
    }
    CHECK(xalloc_shared_size(v) == size);
    CHECK(xalloc_shared_size(v) == size &&
          holds((const unsigned char *)xalloc_shared_data(v), size, seed));
    errno = 0;
    CHECK(xalloc_shared_writable(v) == NULL && errno == EPERM);
    xalloc_shared_close(v);
    if (failures == 0)
        printf("view ok size=%zu\n", size);
}

static void sender(size_t size, unsigned seed, unsigned newseed)
{
    char h[XALLOC_HANDLE_LEN], t[XALLOC_HANDLE_LEN];
    struct xalloc_shared *s = xalloc_shared_new(size), *v;
    if (!s) {
        printf("new errno=%s\n", errno_name(errno));
        failures++;
        return;
    }
    fill((unsigned char *)xalloc_shared_writable(s), size, seed);
    CHECK(xalloc_shared_handle(s, h, sizeof h) == 0);
    v = xalloc_shared_open(h);
    CHECK(v != NULL);
    if (xalloc_shared_send(s, t, sizeof t) != 0) {
        printf("send errno=%s\n", errno_name(errno));
        failures++;
        xalloc_shared_close(s);
        xalloc_shared_close(v);
        return;
    }
    printf("transfer %s\n", t);
    fflush(stdout);
    wait_line();
    /* The receiver wrote the block through its own mapping: this view sees it. */
    if (v) {
        CHECK(xalloc_shared_size(v) == size);
        CHECK(holds((const unsigned char *)xalloc_shared_data(v), size, newseed));
    }
    xalloc_shared_close(v);
    if (failures == 0)
        printf("sender view ok\n");
}

static void receiver(const char *t, size_t size, unsigned seed, unsigned newseed)
{
    unsigned char *w;
    struct xalloc_shared *r = xalloc_shared_receive(t);
    if (!r) {
        printf("receive errno=%s\n", errno_name(errno));
        failures++;
        return;
    }
    CHECK(xalloc_shared_size(r) == size);
    w = (unsigned char *)xalloc_shared_writable(r);
    CHECK(w != NULL);
    if (w && xalloc_shared_size(r) == size) {
        CHECK(holds(w, size, seed));
        fill(w, size, newseed);
    }
    xalloc_shared_close(r);
    if (failures == 0)
        printf("received ok size=%zu\n", size);
}

static void expect(const char *op, const char *h, const char *want)
{
    struct xalloc_shared *s = NULL;
    errno = 0;
    if (strcmp(op, "open") == 0)
        s = xalloc_shared_open(h);
    else if (strcmp(op, "receive") == 0)
        s = xalloc_shared_receive(h);
    else
        usage();
    if (s) {
        printf("%s succeeded\n", op);
        failures++;
        xalloc_shared_close(s);
        return;
    }
    printf("%s errno=%s\n", op, errno_name(errno));
    CHECK(strcmp(errno_name(errno), want) == 0);
}

int main(int argc, char **argv)
{
    if (argc < 2)
        usage();
    if (strcmp(argv[1], "local") == 0)
        local();
    else if (strcmp(argv[1], "none") == 0)
        none();
    else if (strcmp(argv[1], "range") == 0)
        range();
    else if (strcmp(argv[1], "create") == 0 && argc == 4)
        create(number(argv[2]), (unsigned)number(argv[3]));
    else if (strcmp(argv[1], "view") == 0 && argc == 5)
        view(argv[2], number(argv[3]), (unsigned)number(argv[4]));
    else if (strcmp(argv[1], "send") == 0 && argc == 5)
        sender(number(argv[2]), (unsigned)number(argv[3]), (unsigned)number(argv[4]));
    else if (strcmp(argv[1], "receive") == 0 && argc == 6)
        receiver(argv[2], number(argv[3]), (unsigned)number(argv[4]), (unsigned)number(argv[5]));
    else if (strcmp(argv[1], "expect") == 0 && argc == 5)
        expect(argv[2], argv[3], argv[4]);
    else
        usage();
    fflush(stdout);
    return failures == 0 ? 0 : 1;
}
