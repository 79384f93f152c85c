/*
 * Children made without the C library's fork handlers (glibc's _Fork, and the raw fork
 * system call), run under LD_PRELOAD=libxalloc.so with a daemon: each allocates, writes and
 * frees large blocks on a connection of its own, and frees a block it inherited, without
 * touching its parent's channel (which is not mapped in the child). The parent's block keeps
 * its bytes. Prints `rawfork mode=M child_shared=N parent_ok=1` per mode, exits 1 on failure.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

pid_t _Fork(void);

int main(void)
{
    int (*is_shared)(const void *) = (int (*)(const void *))dlsym(RTLD_DEFAULT, "xalloc_is_shared");
    if (is_shared == NULL) {
        puts("FAIL: not preloaded");
        return 1;
    }
    int failures = 0;
    for (int mode = 0; mode < 2; mode++) {
        unsigned char *p = malloc((size_t)1 << 20);
        if (p == NULL)
            return 1;
        memset(p, 0x11, (size_t)1 << 20);
        free(malloc((size_t)1 << 20)); /* a block left in the cache */
        int pipefd[2];
        if (pipe(pipefd) != 0)
            return 1;
        pid_t pid = mode == 0 ? _Fork() : (pid_t)syscall(SYS_fork);
        if (pid == 0) {
            int shared = 0;
            for (int i = 0; i < 8; i++) {
                unsigned char *q = malloc((size_t)1 << 20);
                if (q == NULL)
                    _exit(3);
                memset(q, 0x22, (size_t)1 << 20);
                shared += is_shared(q);
                free(q);
            }
            free(p); /* the parent's, inherited */
            if (write(pipefd[1], &shared, sizeof shared) != (ssize_t)sizeof shared)
                _exit(4);
            _exit(0);
        }
        int status = 0, shared = -1;
        if (read(pipefd[0], &shared, sizeof shared) != (ssize_t)sizeof shared)
            shared = -1;
        waitpid(pid, &status, 0);
        close(pipefd[0]);
        close(pipefd[1]);
        int parent_ok = 1;
        for (size_t i = 0; i < ((size_t)1 << 20); i += 4096)
            parent_ok &= p[i] == 0x11;
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
            printf("FAIL: child of mode %d: %s %d\n", mode,
                   WIFSIGNALED(status) ? "signal" : "exit",
                   WIFSIGNALED(status) ? WTERMSIG(status) : WEXITSTATUS(status));
            failures++;
        }
        printf("rawfork mode=%d child_shared=%d parent_ok=%d\n", mode, shared, parent_ok);
        failures += !parent_ok;
        free(p);
    }
    return failures ? 1 : 0;
}
