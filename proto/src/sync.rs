//! The atomics every shared-memory type of this crate uses, in one place, so that building with
//! `--cfg loom` swaps in loom's model-checked versions and the slot protocol in `wire` is
//! explored under every interleaving rather than only stress-tested.

#[cfg(loom)]
pub use loom::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

#[cfg(not(loom))]
pub use core::sync::atomic::{fence, AtomicU32, Ordering};

#[cfg(all(not(loom), target_has_atomic = "64"))]
pub use core::sync::atomic::AtomicU64;
