//! The protocol between `xallocd` and its clients, shared by both so that they cannot disagree
//! about it.
//!
//! - [`wire`]: the layout of the shared memory the daemon and a client exchange requests
//!   through, as plain `#[repr(C)]` data and atomics (model-checked with loom:
//!   `tests/loom_wire.rs`).
//! - [`os`]: the thin layer of Linux system calls both sides need (shared memory, futexes,
//!   pidfds), and [`unix`]: the instance socket, descriptor passing, peer credentials and
//!   sealed memfds.
//! - `sync`: the atomics `wire` uses, swapped for loom's under `--cfg loom`.

pub mod os;
pub mod sync;
pub mod unix;
pub mod wire;
