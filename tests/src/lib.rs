//! Multi-process tests of xalloc. The tests live in `tests/`; this crate holds the programs
//! they run: `xallocd-under-test` (the daemon: `xallocd` under another name),
//! `xalloc-test-client` (a protocol client that churns or holds blocks) and
//! `xalloc-global-client` (a std program whose global allocator is `XallocGlobal`); usage in
//! each one's source.
