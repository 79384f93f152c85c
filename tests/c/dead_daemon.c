/*
 * Blocks of a daemon that stopped while the program held them, through xalloc.h: the program
 * allocates 8 arena blocks, prints `held`, and waits for a line on stdin (the test stops the
 * daemon meanwhile); then it reads, grows and frees them all. They stay readable, realloc
 * moves one with its bytes, and once all are freed the process counts none held. Prints
 * `dead blocks=B bytes=Y kept=K`; exits 1 on a failure.
 */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "xalloc.h"

int main(void)
{
    unsigned char *keep[8];
    for (int i = 0; i < 8; i++) {
        keep[i] = xalloc_malloc((size_t)1 << 20);
        if (keep[i] == NULL || !xalloc_is_shared(keep[i]))
            return 1;
        memset(keep[i], i + 1, (size_t)1 << 20);
    }
    puts("held");
    fflush(stdout);
    char line[16];
    if (fgets(line, sizeof line, stdin) == NULL)
        return 1;
    int kept = 1;
    for (int i = 0; i < 8; i++)
        kept &= keep[i][0] == i + 1 && keep[i][(1 << 20) - 1] == i + 1;
    unsigned char *r = xalloc_realloc(keep[1], (size_t)3 << 20);
    if (r == NULL)
        return 1;
    kept &= r[0] == 2 && r[(1 << 20) - 1] == 2;
    keep[1] = r;
    for (int i = 0; i < 8; i++)
        xalloc_free(keep[i]);
    struct xalloc_stats s;
    xalloc_stats(&s, sizeof s);
    printf("dead blocks=%llu bytes=%llu kept=%d\n", (unsigned long long)s.arena_blocks,
           (unsigned long long)s.arena_bytes, kept);
    return kept ? 0 : 1;
}
