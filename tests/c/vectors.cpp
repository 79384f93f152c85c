// vectors: an unmodified C++ program (no xalloc in it) whose threads grow std::vectors and
// strings to tens of MiB, for LD_PRELOAD=lib/libxalloc.so in tests/tests/c_library.rs: it
// prints the same checksums with and without the preload, with or without a daemon.
//
//   vectors [THREADS]        (default 4)
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <thread>
#include <vector>

namespace {

std::uint64_t mix(std::uint64_t h, std::uint64_t v)
{
    h ^= v + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2);
    return h;
}

struct alignas(4096) Page {
    unsigned char bytes[4096];
};

std::uint64_t work(unsigned t)
{
    std::uint64_t h = t;

    // Grown one element at a time to 32 MiB: every doubling from 256 KiB on is a large block.
    std::vector<std::uint64_t> v;
    for (std::uint64_t i = 0; i < (std::uint64_t(4) << 20); i++)
        v.push_back(i * 2654435761u ^ (std::uint64_t(t) << 40));
    for (std::size_t i = 0; i < v.size(); i += 4093)
        h = mix(h, v[i]);
    // Half erased, then shrunk: a new smaller block, the elements copied.
    v.erase(v.begin() + static_cast<std::ptrdiff_t>(v.size() / 2), v.end());
    v.shrink_to_fit();
    h = mix(h, v.size());
    h = mix(h, v.back());

    // Many medium vectors held at once (256 KiB to 4 MiB).
    std::vector<std::vector<std::uint32_t>> vs;
    for (unsigned k = 0; k < 16; k++) {
        vs.emplace_back((k + 1) * 65536 + t, k * 7 + t);
        vs.back()[k] = k;
    }
    for (const auto &x : vs)
        h = mix(h, x.size() + x[x.size() / 2] + x[0]);

    // A string grown by appends to about 10 MiB.
    std::string s;
    for (unsigned i = 0; s.size() < (10u << 20); i++)
        s += std::to_string(i * 7919u + t) + ',';
    for (std::size_t i = 0; i < s.size(); i += 997)
        h = mix(h, static_cast<unsigned char>(s[i]));
    h = mix(h, s.size());

    // Over-aligned new (aligned_alloc or posix_memalign underneath) and new[].
    std::vector<Page> pages(512);
    for (std::size_t i = 0; i < pages.size(); i++)
        pages[i].bytes[i % 4096] = static_cast<unsigned char>(i + t);
    h = mix(h, reinterpret_cast<std::uintptr_t>(pages.data()) % 4096);
    for (std::size_t i = 0; i < pages.size(); i++)
        h = mix(h, pages[i].bytes[i % 4096]);
    std::unique_ptr<char[]> raw(new char[24u << 20]);
    for (std::size_t i = 0; i < (24u << 20); i += 4096)
        raw[i] = static_cast<char>(i >> 12);
    for (std::size_t i = 0; i < (24u << 20); i += 8192)
        h = mix(h, static_cast<unsigned char>(raw[i]));
    return h;
}

} // namespace

int main(int argc, char **argv)
{
    unsigned n = argc > 1 ? static_cast<unsigned>(std::strtoul(argv[1], nullptr, 10)) : 4;
    std::vector<std::uint64_t> sums(n);
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < n; t++)
        threads.emplace_back([t, &sums] { sums[t] = work(t); });
    for (auto &th : threads)
        th.join();
    for (unsigned t = 0; t < n; t++)
        std::printf("thread %u checksum %016llx\n", t, static_cast<unsigned long long>(sums[t]));
    std::printf("main checksum %016llx\n", static_cast<unsigned long long>(work(n)));
    return 0;
}
