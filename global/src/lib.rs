//! The client side of xalloc.
//!
//! [`client`] speaks the shared-memory protocol to `xallocd`: it maps the daemon's segments,
//! claims a request slot, sends a request and waits for the answer. It never allocates, formats
//! or takes a lock on the request path, so that a global allocator can be built on it.
//!
//! ```no_run
//! use xalloc_global::client::Connection;
//!
//! let conn = Connection::connect("xalloc")?; // the daemon's --name
//! let mut slot = conn.claim()?;
//! let block = slot.allocate(1 << 20, 4096, false)?;
//! // SAFETY: the block is ours until freed; nothing else refers to it.
//! unsafe { block.as_ptr().write_bytes(0xab, 1 << 20) };
//! slot.free(block.offset)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod client;
