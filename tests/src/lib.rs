//! Multi-process tests of xalloc. The tests live in `tests/`; this crate holds the two programs
//! they run: `xallocd` (the daemon) and `xalloc-test-client` (a client that churns or holds
//! blocks, see its `--help`).
