//! Multi-process tests of xalloc. The tests live in `tests/`; this crate holds the two programs
//! they run: `xallocd-under-test` (the daemon: `xallocd` under another name) and
//! `xalloc-test-client` (a client that churns or holds blocks; usage in its source).
