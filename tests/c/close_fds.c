/*
 * A program that closes every descriptor it did not open itself (close_range, as daemons and
 * sandboxes do), run under LD_PRELOAD=libxalloc.so with a daemon. The library's socket and
 * arena descriptor go with them, and the program's next files take their numbers.
 *
 * Checks: no wake-up byte lands in the program's own socket; a forked child's fork handler
 * closes none of the program's files, and the child's writes into a block it inherited stay
 * its own (the arena's descriptor is gone, so the library copies the held blocks); large
 * blocks still come from the arena (the library connects again); the block held across the
 * close keeps its bytes (the daemon did not reclaim it, though the process maps a file whose
 * name is not UTF-8). Prints `closefds held=H injected=I child_ok=C private=P shared_after=S`
 * and `ready`, then waits for a line on stdin (the test looks at the daemon meanwhile) and
 * checks the held block again. Exits 1 on a failure.
 *
 * `close_fds exec PROGRAM...`: holds a block, prints `holding`, closes every descriptor, then
 * execs PROGRAM (the daemon must reclaim the block while PROGRAM runs).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

static int holds(const unsigned char *p, size_t n, unsigned char v)
{
    for (size_t i = 0; i < n; i += 512)
        if (p[i] != v)
            return 0;
    return 1;
}

int main(int argc, char **argv)
{
    const size_t held_len = (size_t)8 << 20;
    unsigned char *held = malloc(held_len);
    if (held == NULL)
        return 1;
    memset(held, 0x33, held_len);
    free(malloc((size_t)1 << 20));

    if (argc > 2 && strcmp(argv[1], "exec") == 0) {
        printf("holding\n");
        fflush(stdout);
        if (close_range(3, ~0U, 0) != 0)
            return 1;
        execvp(argv[2], argv + 2);
        return 1;
    }

    /* A mapped file whose name is not UTF-8 shows in /proc/PID/maps. */
    char odd[] = "/tmp/xalloc-odd-\xff\xfe-XXXXXX";
    int ofd = mkstemp(odd);
    if (ofd < 0 || ftruncate(ofd, 4096) != 0)
        return 1;
    void *om = mmap(NULL, 4096, PROT_READ, MAP_SHARED, ofd, 0);
    unlink(odd);
    if (om == MAP_FAILED)
        return 1;

    /* stdin, stdout and stderr stay; everything else goes, the library's too. */
    if (close_range(3, ~0U, 0) != 0) {
        perror("close_range");
        return 1;
    }
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK, 0, sv) != 0)
        return 1;

    /* A fork before the library has done anything since: the child's writes into the block
     * it inherited stay its own. */
    pid_t early = fork();
    if (early == 0) {
        int inherited = holds(held, held_len, 0x33);
        memset(held, 0x55, held_len);
        _exit(inherited && holds(held, held_len, 0x55) ? 0 : 1);
    }
    int early_status = 0;
    waitpid(early, &early_status, 0);
    int private_early = WIFEXITED(early_status) && WEXITSTATUS(early_status) == 0 &&
                        holds(held, held_len, 0x33);

    int shared_after = 0;
    for (int i = 0; i < 200; i++) {
        unsigned char *q = malloc(((size_t)1 << 20) + (size_t)i * 4096);
        if (q == NULL)
            return 1;
        memset(q, i, 4096);
        free(q);
        if (i % 20 == 19)
            usleep(5000); /* lets the daemon fall asleep, so that wake-ups are sent */
    }
    for (int i = 0; i < 20; i++) {
        unsigned char *q = malloc((size_t)2 << 20);
        extern int xalloc_is_shared(const void *) __attribute__((weak));
        if (q != NULL && xalloc_is_shared != NULL)
            shared_after += xalloc_is_shared(q);
        free(q);
        usleep(2000);
    }

    char buf[64];
    ssize_t got = recv(sv[1], buf, sizeof buf, MSG_DONTWAIT);
    int injected = got > 0 ? (int)got : 0;
    got = recv(sv[0], buf, sizeof buf, MSG_DONTWAIT);
    injected += got > 0 ? (int)got : 0;

    pid_t pid = fork();
    if (pid == 0) {
        /* The child's fork handlers ran: the program's socket must still be open here, and
         * the inherited block readable, and the child's own. */
        int mine = holds(held, held_len, 0x33);
        memset(held, 0x44, held_len);
        _exit(mine && send(sv[0], "x", 1, 0) == 1 ? 0 : 1);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    int child_ok = WIFEXITED(status) && WEXITSTATUS(status) == 0 && recv(sv[1], buf, 1, 0) == 1;
    int private = private_early && holds(held, held_len, 0x33);

    int ok = holds(held, held_len, 0x33);
    printf("closefds held=%d injected=%d child_ok=%d private=%d shared_after=%d\n", ok, injected,
           child_ok, private, shared_after);
    printf("ready\n");
    fflush(stdout);
    if (fgets(buf, sizeof buf, stdin) == NULL)
        return 1;
    ok &= holds(held, held_len, 0x33);
    printf("closefds held_at_end=%d\n", ok);
    free(held);
    munmap(om, 4096);
    return ok && injected == 0 && child_ok && private ? 0 : 1;
}
