//! The client side of xalloc.
//!
//! - [`XallocGlobal`] ([`global`]): the `#[global_allocator]` that serves large allocations
//!   from the daemon's shared arena and everything else from the system allocator, which also
//!   takes over whenever no daemon answers. [`is_shared`] and [`counters`] tell what it did.
//! - [`XallocMalloc`] ([`malloc`]): the same client as C's `malloc` family, where a block is
//!   known by its pointer alone; the C library (`capi/`, `xalloc.h`) and its `LD_PRELOAD`
//!   interposer are this.
//! - [`SharedBuf`], [`SharedView`], [`Handle`] ([`share`]): hand an arena block to another
//!   process without copying it.
//! - [`client`] speaks the protocol to `xallocd`: it connects to the instance's socket, maps
//!   the arena and the channel of its own that the daemon hands over, claims a request slot of
//!   that channel, sends a request and waits for the answer. It never allocates, formats or
//!   takes a lock on the request path, nor while it connects, which is what lets
//!   `XallocGlobal` use it.
//!
//! ```no_run
//! use xalloc_global::XallocGlobal;
//!
//! #[global_allocator]
//! static A: XallocGlobal = XallocGlobal::new(); // 256 KiB threshold, instance "xalloc"
//! # fn main() {}
//! ```
//!
//! The protocol by hand:
//!
//! ```no_run
//! use xalloc_global::client::Connection;
//!
//! let conn = Connection::connect("xalloc")?; // the daemon's --name: /dev/shm/xalloc.socket
//! let mut slot = conn.claim()?;
//! let block = slot.allocate(1 << 20, 4096, false)?;
//! // SAFETY: the block is ours until freed; nothing else refers to it.
//! unsafe { block.as_ptr().write_bytes(0xab, 1 << 20) };
//! slot.free(block.offset)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod client;
pub mod global;
pub mod malloc;
pub mod share;

pub use global::{counters, is_shared, Counters, XallocGlobal};
pub use malloc::XallocMalloc;
pub use share::{Handle, HandleKind, ShareError, SharedBuf, SharedView};
