/*
 * gen_lines: writes about MIB mebibytes of pseudo-random text lines to PATH, the same bytes on
 * every run (a fixed xorshift seed), for the sort test of tests/tests/c_library.rs.
 *
 *   gen_lines PATH MIB
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: gen_lines PATH MIB\n");
        return 64;
    }
    FILE *f = fopen(argv[1], "wb");
    if (f == NULL) {
        perror(argv[1]);
        return 1;
    }
    unsigned long long total = strtoull(argv[2], NULL, 10) << 20;
    static char buf[1 << 16];
    size_t used = 0;
    uint64_t x = 0x9e3779b97f4a7c15ULL;
    unsigned long long written = 0;
    while (written < total) {
        /* A line: 1 to 40 letters (so that lines share prefixes and lengths differ), a tab,
         * a decimal number, a newline: at most 62 bytes. */
        if (sizeof buf - used < 64) {
            if (fwrite(buf, 1, used, f) != used) {
                perror("fwrite");
                return 1;
            }
            used = 0;
        }
        size_t start = used;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        uint64_t r = x;
        unsigned len = 1 + (unsigned)(r % 40);
        uint64_t y = r;
        for (unsigned i = 0; i < len; i++) {
            if (i % 10 == 0) {
                y ^= y << 13;
                y ^= y >> 7;
                y ^= y << 17;
            }
            /* A small alphabet, so that many lines share long prefixes. */
            buf[used++] = (char)('a' + (y >> (6 * (i % 10))) % 6);
        }
        buf[used++] = '\t';
        used += (size_t)sprintf(buf + used, "%llu", (unsigned long long)(r >> 44));
        buf[used++] = '\n';
        written += used - start;
    }
    if (fwrite(buf, 1, used, f) != used || fclose(f) != 0) {
        perror("write");
        return 1;
    }
    return 0;
}
