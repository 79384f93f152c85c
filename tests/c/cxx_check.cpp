// xalloc.h from C++ (g++ -Wall -Wextra -Werror -pedantic), linked statically with
// lib/libxalloc.a: the header's extern "C" names link, every function answers.
//
//   cxx_check daemon|none
//
// Prints `cxx shared=N forwarded=N fallbacks=N` and `cxx ok`; exit status 1 on a failure.
#include "xalloc.h"

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>

static int failures = 0;

#define CHECK(cond)                                                                              \
    do {                                                                                         \
        if (!(cond)) {                                                                           \
            std::printf("FAIL cxx_check.cpp:%d: %s\n", __LINE__, #cond);                         \
            failures++;                                                                          \
        }                                                                                        \
    } while (0)

int main(int argc, char **argv)
{
    const bool daemon = argc > 1 && std::strcmp(argv[1], "daemon") == 0;
    const int expect = daemon ? 1 : 0;

    const std::size_t large = XALLOC_DEFAULT_THRESHOLD * 4;
    unsigned char *p = static_cast<unsigned char *>(xalloc_malloc(large));
    CHECK(p != nullptr);
    CHECK(xalloc_is_shared(p) == expect);
    CHECK(xalloc_usable_size(p) >= large);
    std::memset(p, 0x5c, large);
    p = static_cast<unsigned char *>(xalloc_realloc(p, 2 * large));
    CHECK(p != nullptr && p[0] == 0x5c && p[large - 1] == 0x5c);
    xalloc_free(p);

    unsigned char *z = static_cast<unsigned char *>(xalloc_calloc(large, 1));
    CHECK(z != nullptr && z[0] == 0 && z[large - 1] == 0);
    xalloc_free(z);

    void *a = xalloc_aligned_alloc(4096, large);
    CHECK(a != nullptr && reinterpret_cast<std::uintptr_t>(a) % 4096 == 0);
    CHECK(xalloc_is_shared(a) == expect);
    xalloc_free(a);
    errno = 0;
    CHECK(xalloc_aligned_alloc(24, 64) == nullptr && errno == EINVAL);

    void *s = xalloc_malloc(64);
    CHECK(s != nullptr && xalloc_is_shared(s) == 0);
    xalloc_free(s);

    // In C++ the function hides the struct's name: `struct` says which one.
    struct xalloc_stats st;
    CHECK(xalloc_stats(&st, sizeof st) == sizeof(struct xalloc_stats));
    CHECK(st.threshold == XALLOC_DEFAULT_THRESHOLD);
    if (daemon)
        CHECK(st.forwarded >= 3 && st.daemon_pid != 0);
    else
        CHECK(st.forwarded == 0 && st.fallbacks >= 3);
    std::printf("cxx shared=%d forwarded=%llu fallbacks=%llu\n", expect,
                static_cast<unsigned long long>(st.forwarded),
                static_cast<unsigned long long>(st.fallbacks));
    if (failures == 0)
        std::printf("cxx ok\n");
    return failures == 0 ? 0 : 1;
}
