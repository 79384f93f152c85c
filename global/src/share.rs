//! Share handles: hand an arena block to another process without copying it.
//!
//! Every client maps the whole arena, so a block one process wrote is already in every other
//! client's address space; what is missing is the right to use it, and a lifetime that does not
//! end while someone still reads it. The daemon keeps both: a block that is shared has an owner
//! (the process that may write it, and whose quota pays for it) and views (processes that read
//! it), each a reference it counts per client, and it frees the block when the last reference
//! is gone, whether dropped or lost with its process (exit, kill, `exec`).
//!
//! - [`SharedBuf::new`] and [`SharedBuf::from_vec`] make a shared block this process owns
//!   (`from_vec` takes over a vector's arena block as it is, as every large `Vec` is under
//!   [`XallocGlobal`](crate::XallocGlobal)); [`SharedBuf::handle`] names it.
//! - [`SharedBuf::open`] (in any process served by the same daemon instance) gives a read-only
//!   [`SharedView`] of the same bytes, in one round trip to the daemon whatever the size.
//! - [`SharedBuf::send`] gives the block up, for exactly one process to take with
//!   [`SharedBuf::receive`]: a second handle, so that a reader never gets write access.
//!
//! A [`Handle`] names the daemon instance, the block, the share's generation (a block freed and
//! allocated again has another) and a random 64-bit token, which the daemon keeps in its
//! private state record (readable by its user only) and gives to the share's owner: a handle
//! that was made up, changed, belongs to a freed block or to another instance gives an error,
//! never a view. Within an instance every client
//! can read and write the whole arena anyway (the trust domain: one user, or the members of the
//! daemon's `--group`); the handle decides lifetimes and who owns what, not who can see memory.
//!
//! The share operations talk to the daemon instance this process's allocator uses
//! (`XALLOC_NAME`, else the allocator's `with_name`, default `xalloc`), over the same
//! connection.
//!
//! # Views, owners and `&[u8]`
//!
//! One process never holds a block both ways: [`SharedBuf::open`] of a block it owns and
//! [`SharedBuf::receive`] of one it views are refused ([`ShareError::OwnedHere`],
//! [`ShareError::ViewedHere`]), so safe code never holds `&mut [u8]` and `&[u8]` of the same
//! bytes. Across processes the owner may still write while views read: a view's `&[u8]` is
//! memory another process changes, as with any shared mapping. Hand the handle over once the
//! bytes are written (the usual producer-consumer order; a pipe or socket orders the two
//! processes), or read bytes that change through [`SharedView::as_ptr`] with volatile or
//! atomic loads.
//!
//! ```no_run
//! use xalloc_global::{SharedBuf, Handle};
//!
//! let mut frame = SharedBuf::new(8 << 20)?;
//! frame.fill(7);
//! let text = frame.handle().to_string(); // pass it to another process: pipe, argv, socket
//!
//! // In the other process:
//! let handle: Handle = text.parse()?;
//! let view = SharedBuf::open(handle)?;
//! assert_eq!(view[0], 7);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use core::fmt;
use core::ops::{Deref, DerefMut};
use core::ptr::NonNull;
use core::str::FromStr;
use std::sync::Arc;

use xalloc_proto::wire::{BlockFlags, Op, Response, Status};

use crate::client::RequestError;
use crate::global::{HeldConn, MarkError};

/// What a [`Handle`] gives its holder.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HandleKind {
    /// Opens read-only views ([`SharedBuf::open`]); from [`SharedBuf::handle`] and
    /// [`SharedView::handle`].
    View,
    /// Takes ownership once ([`SharedBuf::receive`]), or opens views; from
    /// [`SharedBuf::send`].
    Transfer,
}

/// The name of a shared block: which daemon instance, which block, which share of it, and
/// the token that proves the holder was given it.
///
/// `Copy` and plain data: pass it to another process as text ([`Display`](fmt::Display),
/// [`FromStr`]: at most [`Handle::MAX_TEXT`] characters of `[0-9a-z-]`, safe on a command line
/// or in an environment variable) or as [`Handle::BYTES`] bytes ([`Handle::to_bytes`],
/// [`Handle::from_bytes`]).
///
/// The text form is `xsv-` (a view handle) or `xst-` (a transfer handle), then in lower-case
/// hex, separated by `-`: the instance (16 digits), the block's offset in the arena (16), the
/// share's generation (8) and the token (16).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Handle {
    kind: HandleKind,
    instance: u64,
    offset: u64,
    generation: u32,
    token: u64,
}

impl Handle {
    /// Bytes of [`Handle::to_bytes`].
    pub const BYTES: usize = 32;

    /// Characters of the text form (every handle has this many; the contract says at most 64).
    pub const MAX_TEXT: usize = 63;

    /// Magic of the byte form (ASCII `XSH`, then the kind: `v` or `t`).
    const MAGIC: [u8; 3] = *b"XSH";

    /// What the handle gives.
    pub const fn kind(&self) -> HandleKind {
        self.kind
    }

    /// The daemon instance (its arena's generation, which a restart that re-attaches keeps).
    pub const fn instance(&self) -> u64 {
        self.instance
    }

    /// The block's offset in the arena's data.
    pub const fn offset(&self) -> u64 {
        self.offset
    }

    /// The share's generation.
    pub const fn generation(&self) -> u32 {
        self.generation
    }

    /// The byte form: `XSH`, the kind (`v` or `t`), the generation, the instance, the offset
    /// and the token, little-endian.
    pub fn to_bytes(&self) -> [u8; Self::BYTES] {
        let mut b = [0u8; Self::BYTES];
        b[..3].copy_from_slice(&Self::MAGIC);
        b[3] = match self.kind {
            HandleKind::View => b'v',
            HandleKind::Transfer => b't',
        };
        b[4..8].copy_from_slice(&self.generation.to_le_bytes());
        b[8..16].copy_from_slice(&self.instance.to_le_bytes());
        b[16..24].copy_from_slice(&self.offset.to_le_bytes());
        b[24..32].copy_from_slice(&self.token.to_le_bytes());
        b
    }

    /// Reads the byte form; [`ShareError::BadHandle`] for anything else.
    pub fn from_bytes(b: &[u8]) -> Result<Self, ShareError> {
        if b.len() != Self::BYTES || b[..3] != Self::MAGIC {
            return Err(ShareError::BadHandle);
        }
        let kind = match b[3] {
            b'v' => HandleKind::View,
            b't' => HandleKind::Transfer,
            _ => return Err(ShareError::BadHandle),
        };
        let word = |at: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[at..at + 8]);
            u64::from_le_bytes(w)
        };
        let token = word(24);
        if token == 0 {
            return Err(ShareError::BadHandle);
        }
        Ok(Self {
            kind,
            generation: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            instance: word(8),
            offset: word(16),
            token,
        })
    }
}

impl fmt::Display for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            HandleKind::View => 'v',
            HandleKind::Transfer => 't',
        };
        write!(
            f,
            "xs{kind}-{:016x}-{:016x}-{:08x}-{:016x}",
            self.instance, self.offset, self.generation, self.token
        )
    }
}

impl fmt::Debug for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The token is the secret part: debug output (logs, panics) does not show it.
        f.debug_struct("Handle")
            .field("kind", &self.kind)
            .field("instance", &format_args!("{:016x}", self.instance))
            .field("offset", &self.offset)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl FromStr for Handle {
    type Err = ShareError;

    /// Reads the text form exactly (lower-case hex, fixed widths); anything else is
    /// [`ShareError::BadHandle`].
    fn from_str(s: &str) -> Result<Self, ShareError> {
        let b = s.as_bytes();
        if b.len() != Self::MAX_TEXT || !s.starts_with("xs") {
            return Err(ShareError::BadHandle);
        }
        let kind = match b[2] {
            b'v' => HandleKind::View,
            b't' => HandleKind::Transfer,
            _ => return Err(ShareError::BadHandle),
        };
        let hex = |from: usize, digits: usize| -> Result<u64, ShareError> {
            if b[from - 1] != b'-' {
                return Err(ShareError::BadHandle);
            }
            b[from..from + digits].iter().try_fold(0u64, |v, &c| {
                let d = match c {
                    b'0'..=b'9' => c - b'0',
                    b'a'..=b'f' => c - b'a' + 10,
                    _ => return Err(ShareError::BadHandle),
                };
                Ok(v << 4 | u64::from(d))
            })
        };
        let token = hex(47, 16)?;
        if token == 0 {
            return Err(ShareError::BadHandle);
        }
        Ok(Self {
            kind,
            instance: hex(4, 16)?,
            offset: hex(21, 16)?,
            generation: hex(38, 8)? as u32,
            token,
        })
    }
}

/// Why a share operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ShareError {
    /// No daemon answers (none runs for this process's instance, it refused this process, or
    /// it stopped answering); shared blocks exist only in a daemon's arena.
    NoDaemon,
    /// The handle is of another daemon instance (another `--name`, or a daemon started afresh
    /// since the handle was made).
    OtherInstance,
    /// No live shared block matches the handle: made up, changed, of a block freed since, or
    /// (a transfer handle) received already.
    NotFound,
    /// [`SharedBuf::receive`] was given a view handle: only the handle [`SharedBuf::send`]
    /// returns transfers ownership.
    NotTransfer,
    /// Not a handle (text or bytes of another form).
    BadHandle,
    /// The arena has no room for a block of that size, or the size is larger than the arena.
    OutOfMemory,
    /// The block would take this process or its user over the daemon's quota
    /// (`xallocd start --client-quota`, `--user-quota`).
    OverQuota,
    /// The daemon holds as many shared blocks or views as it can, or this process has as many
    /// views open as one process may.
    TooMany,
    /// [`SharedBuf::open`] of a block this process owns: use the `SharedBuf` itself (a view
    /// beside it would let the program hold `&[u8]` and `&mut [u8]` to the same bytes).
    OwnedHere,
    /// [`SharedBuf::receive`] of a block this process holds views of: drop them first (for
    /// the same reason).
    ViewedHere,
    /// Anything else the daemon or the connection reported.
    Request(RequestError),
}

impl From<MarkError> for ShareError {
    fn from(e: MarkError) -> Self {
        match e {
            MarkError::Owned => Self::OwnedHere,
            MarkError::Viewed => Self::ViewedHere,
        }
    }
}

impl fmt::Display for ShareError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoDaemon => f.write_str(
                "no xalloc daemon answers (start one with `xallocd start`; XALLOC_NAME names the \
                 instance)",
            ),
            Self::OtherInstance => f.write_str(
                "the handle belongs to another xalloc daemon instance (another --name, or one \
                 started afresh since)",
            ),
            Self::NotFound => f.write_str(
                "no shared block matches the handle (made up or changed, its block freed since, \
                 or already received)",
            ),
            Self::NotTransfer => {
                f.write_str("receive needs the handle send() returned; this one only opens views")
            }
            Self::BadHandle => f.write_str("not a share handle"),
            Self::OutOfMemory => f.write_str("the daemon's arena has no room for the block"),
            Self::OverQuota => {
                f.write_str("the block would take this process or user over the daemon's quota")
            }
            Self::TooMany => f.write_str(
                "the daemon holds as many shared blocks or views as it can, or this process \
                 has as many views open as one may",
            ),
            Self::OwnedHere => f.write_str(
                "this process owns the block: read it through its SharedBuf, not a view",
            ),
            Self::ViewedHere => {
                f.write_str("this process holds views of the block: drop them before receiving it")
            }
            Self::Request(e) => write!(f, "share request failed: {e}"),
        }
    }
}

impl std::error::Error for ShareError {}

impl From<RequestError> for ShareError {
    fn from(e: RequestError) -> Self {
        match e {
            RequestError::Refused(Status::NoSuchShare) => Self::NotFound,
            RequestError::Refused(Status::OutOfMemory | Status::BadSize) => Self::OutOfMemory,
            RequestError::Refused(Status::OverQuota) => Self::OverQuota,
            RequestError::Refused(Status::TooManyShares) => Self::TooMany,
            RequestError::Refused(Status::ShuttingDown)
            | RequestError::DaemonGone
            | RequestError::Timeout
            | RequestError::SlotUnusable => Self::NoDaemon,
            e => Self::Request(e),
        }
    }
}

/// A shared block as one process sees it: where, how long, which share.
#[derive(Debug)]
struct Block {
    conn: HeldConn,
    ptr: NonNull<u8>,
    len: usize,
    /// The arena block's length (at least `len`).
    block_bytes: u64,
    handle: Handle,
}

impl Block {
    /// The block an answer to a share operation describes, checked to lie in the arena.
    fn from_answer(conn: HeldConn, r: &Response, kind: HandleKind) -> Result<Self, ShareError> {
        let (base, arena_len, instance, granule) = conn.arena();
        let block_bytes = (r.tag >> 32) * granule as u64;
        let end = r.offset.checked_add(r.size.max(block_bytes));
        if base.is_null() || end.is_none_or(|e| e > arena_len as u64) {
            return Err(ShareError::Request(RequestError::UnknownStatus(r.status)));
        }
        // SAFETY: `offset + len <= arena_len` (checked), so the pointer is inside the mapping,
        // which the held connection keeps.
        let ptr = unsafe { base.add(r.offset as usize) };
        Ok(Self {
            conn,
            ptr: NonNull::new(ptr).ok_or(ShareError::NoDaemon)?,
            len: r.size as usize,
            block_bytes,
            handle: Handle {
                kind,
                instance,
                offset: r.offset,
                generation: r.tag as u32,
                token: r.token,
            },
        })
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `len` bytes at `ptr` lie in the arena mapping, which `conn` keeps mapped; the
        // daemon does not hand the block to anyone else while this reference to it is counted.
        unsafe { core::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// Checks that `handle` may be asked of this process's instance.
    fn check_instance(conn: &HeldConn, handle: &Handle) -> Result<(), ShareError> {
        if conn.arena().2 == handle.instance {
            Ok(())
        } else {
            Err(ShareError::OtherInstance)
        }
    }
}

/// A shared arena block this process owns: readable and writable, with a [`Handle`] that
/// opens read-only views of it in other processes. Dropping it gives up the ownership; the
/// block is freed once every view is gone too.
#[derive(Debug)]
pub struct SharedBuf {
    block: Block,
}

impl SharedBuf {
    /// A zeroed shared block of `len` bytes (0 is allowed), owned by this process.
    pub fn new(len: usize) -> Result<Self, ShareError> {
        let conn = HeldConn::live().ok_or(ShareError::NoDaemon)?;
        let (offset, block_bytes) = conn.allocate_zeroed(len.max(1) as u64)?;
        Self::share(conn, offset, block_bytes, len)
    }

    /// A shared block with the bytes of `v`: the vector's own block, without a copy, if it is
    /// an arena block (every vector of at least the threshold is, under
    /// [`XallocGlobal`](crate::XallocGlobal) or the C library); else a new block and one copy.
    pub fn from_vec(v: Vec<u8>) -> Result<Self, ShareError> {
        if v.capacity() > 0 {
            if let Some((conn, offset, bytes)) = HeldConn::adopt_block(v.as_ptr()) {
                let len = v.len();
                return match conn.request(Op::Share, 0, len as u64, offset, 0) {
                    Ok(r) => {
                        // The block is the share's now: the vector must never free it.
                        core::mem::forget(v);
                        let block = Block::from_answer(conn, &r, HandleKind::View)?;
                        block.conn.mark_owned(offset, block.block_bytes);
                        Ok(Self { block })
                    }
                    Err(e) => {
                        conn.return_block(offset, bytes);
                        Err(e.into())
                    }
                };
            }
        }
        let mut buf = Self::new(v.len())?;
        buf.copy_from_slice(&v);
        Ok(buf)
    }

    /// Shares the block at `offset` (`block_bytes` long), just allocated, as `len` bytes.
    fn share(
        conn: HeldConn,
        offset: u64,
        block_bytes: u64,
        len: usize,
    ) -> Result<Self, ShareError> {
        match conn.request(Op::Share, 0, len as u64, offset, 0) {
            Ok(r) => {
                HeldConn::count(block_bytes, true);
                let block = Block::from_answer(conn, &r, HandleKind::View)?;
                block.conn.mark_owned(offset, block_bytes);
                Ok(Self { block })
            }
            Err(e) => {
                let _ = conn.request(Op::Free, 0, 0, offset, 0);
                Err(e.into())
            }
        }
    }

    /// The handle that opens read-only views of this block ([`SharedBuf::open`]).
    pub fn handle(&self) -> Handle {
        self.block.handle
    }

    /// A read-only view of the block named by `handle` (a view or a transfer handle), in this
    /// process or any other served by the same daemon instance, without a copy: one round trip
    /// to the daemon whatever the block's size. The block lives at least as long as the view
    /// (and its clones).
    ///
    /// A process that owns the block (holds its `SharedBuf`) gets [`ShareError::OwnedHere`]: it
    /// reads the block through the `SharedBuf`, since a view beside it would give safe code a
    /// `&[u8]` of bytes it may change through `&mut [u8]`. (Another process's view is another
    /// matter: see [`SharedView`].)
    pub fn open(handle: Handle) -> Result<SharedView, ShareError> {
        Self::open_in(handle, false)
    }

    /// [`SharedBuf::open`] without the check that this process does not own the block.
    ///
    /// # Safety
    /// While the view (or a clone) lives, the program must not hold a reference to the block's
    /// bytes from a [`SharedBuf`] of this process together with one from the view: for example,
    /// it reads and writes the bytes only through raw pointers (`as_ptr`), as the C library
    /// does on behalf of C programs.
    pub unsafe fn open_unchecked(handle: Handle) -> Result<SharedView, ShareError> {
        Self::open_in(handle, true)
    }

    fn open_in(handle: Handle, unchecked: bool) -> Result<SharedView, ShareError> {
        let conn = HeldConn::live().ok_or(ShareError::NoDaemon)?;
        Block::check_instance(&conn, &handle)?;
        let r = conn.request(
            Op::Open,
            0,
            u64::from(handle.generation),
            handle.offset,
            handle.token,
        )?;
        // Checked once the daemon has said that the handle names a live block (a made-up
        // handle is `NotFound` whatever this process holds).
        let block = Block::from_answer(conn, &r, HandleKind::View)?;
        if let Err(e) = block
            .conn
            .mark_view(handle.offset, block.block_bytes, unchecked)
        {
            // Not a view: the reference the daemon just counted goes again.
            let _ = block.conn.request(
                Op::Close,
                0,
                u64::from(block.handle.generation),
                block.handle.offset,
                0,
            );
            return Err(e.into());
        }
        Ok(SharedView {
            inner: Arc::new(ViewRef(block)),
        })
    }

    /// Gives the block up for exactly one process to take with [`SharedBuf::receive`] and the
    /// returned transfer handle. Views stay open. Until it is received the block stays this
    /// process's in the daemon's books (its quota), and goes if this process exits first.
    /// On failure the buffer comes back with the error.
    pub fn send(self) -> Result<Handle, (SharedBuf, ShareError)> {
        let b = &self.block;
        // Unmarked first: once sent, the block may be received, freed and handed out to this
        // process again before the answer is read.
        b.conn.unmark_owned(b.handle.offset);
        let r = b.conn.request(
            Op::Send,
            0,
            u64::from(b.handle.generation),
            b.handle.offset,
            0,
        );
        match r {
            Ok(r) => {
                let handle = Handle {
                    kind: HandleKind::Transfer,
                    token: r.token,
                    ..b.handle
                };
                HeldConn::count(b.block_bytes, false);
                let me = core::mem::ManuallyDrop::new(self);
                // SAFETY: `me` is never used or dropped again; its connection hold is dropped
                // here, once.
                drop(unsafe { core::ptr::read(&me.block.conn) });
                Ok(handle)
            }
            Err(e) => {
                b.conn.mark_owned(b.handle.offset, b.block_bytes);
                Err((self, e.into()))
            }
        }
    }

    /// Takes ownership (and write access) of the block a transfer handle names; only one
    /// process succeeds. The block's quota moves to this process.
    ///
    /// A process that holds views of the block gets [`ShareError::ViewedHere`] (drop them
    /// first), for the reason [`SharedBuf::open`] gives.
    pub fn receive(handle: Handle) -> Result<SharedBuf, ShareError> {
        Self::receive_in(handle, false)
    }

    /// [`SharedBuf::receive`] without the check that this process holds no view of the block.
    ///
    /// # Safety
    /// As for [`SharedBuf::open_unchecked`]: while this process also holds views of the block,
    /// the program must not hold references to its bytes from both.
    pub unsafe fn receive_unchecked(handle: Handle) -> Result<SharedBuf, ShareError> {
        Self::receive_in(handle, true)
    }

    fn receive_in(handle: Handle, unchecked: bool) -> Result<SharedBuf, ShareError> {
        if handle.kind != HandleKind::Transfer {
            return Err(ShareError::NotTransfer);
        }
        let conn = HeldConn::live().ok_or(ShareError::NoDaemon)?;
        Block::check_instance(&conn, &handle)?;
        // Marked before the request (a block cannot be given back once received): no view of
        // it is opened here meanwhile.
        conn.begin_receive(handle.offset, unchecked)?;
        let r = conn.request(
            Op::Receive,
            0,
            u64::from(handle.generation),
            handle.offset,
            handle.token,
        );
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                conn.end_receive(handle.offset, 0, false);
                return Err(e.into());
            }
        };
        let block = match Block::from_answer(conn.clone(), &r, HandleKind::View) {
            Ok(block) => block,
            Err(e) => {
                conn.end_receive(handle.offset, 0, false);
                return Err(e);
            }
        };
        HeldConn::count(block.block_bytes, true);
        block
            .conn
            .end_receive(handle.offset, block.block_bytes, true);
        Ok(SharedBuf { block })
    }

    /// The block's length in bytes (as shared; the arena block may be longer).
    pub fn len(&self) -> usize {
        self.block.len
    }

    /// The block's first byte, without making a reference to the bytes.
    pub fn as_ptr(&self) -> *const u8 {
        self.block.ptr.as_ptr()
    }

    /// The block's first byte, for writing, without making a reference to the bytes.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.block.ptr.as_ptr()
    }

    /// Whether the block is 0 bytes long.
    pub fn is_empty(&self) -> bool {
        self.block.len == 0
    }
}

impl Deref for SharedBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.block.bytes()
    }
}

impl DerefMut for SharedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `Block::bytes`; this process owns the block, `&mut self` makes this
        // the only reference to it from the buffer, and no view of the block lives in this
        // process (the share marks refuse one; `open_unchecked`'s caller answers for its own).
        unsafe { core::slice::from_raw_parts_mut(self.block.ptr.as_ptr(), self.block.len) }
    }
}

impl Drop for SharedBuf {
    fn drop(&mut self) {
        let b = &self.block;
        // Unmarked first, so that the mark is gone before the block can be freed and handed
        // out to this process again.
        b.conn.unmark_owned(b.handle.offset);
        // In a forked child, the block is the parent's: nothing to give up, nor to uncount.
        if b.conn.ours() {
            if b.conn.usable() {
                let _ = b.conn.request(
                    Op::Close,
                    BlockFlags::OWNER.bits(),
                    u64::from(b.handle.generation),
                    b.handle.offset,
                    0,
                );
            }
            HeldConn::count(b.block_bytes, false);
        }
    }
}

/// A read-only view of a shared block, in any process of the instance. Clones share one
/// reference in the daemon; the block lives at least until the last clone is dropped (or this
/// process exits).
#[derive(Clone, Debug)]
pub struct SharedView {
    inner: Arc<ViewRef>,
}

/// One view reference in the daemon, closed when the last clone of its [`SharedView`] drops.
#[derive(Debug)]
struct ViewRef(Block);

// SAFETY: a block reference gives `&[u8]` only (`SharedBuf`'s `&mut` goes through its own
// `&mut self`); the bytes stay mapped while it lives, and its connection handle is usable from
// any thread.
unsafe impl Send for Block {}
// SAFETY: as above.
unsafe impl Sync for Block {}

impl SharedView {
    /// A view handle of the block: another process may open it too.
    pub fn handle(&self) -> Handle {
        self.inner.0.handle
    }

    /// The view's length in bytes (the share's).
    pub fn len(&self) -> usize {
        self.inner.0.len
    }

    /// Whether the view is 0 bytes long.
    pub fn is_empty(&self) -> bool {
        self.inner.0.len == 0
    }

    /// The block's first byte, without making a reference to the bytes: for readers that
    /// must see the owner's later writes (volatile or atomic reads; see the type's docs).
    pub fn as_ptr(&self) -> *const u8 {
        self.inner.0.ptr.as_ptr()
    }
}

impl Deref for SharedView {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.inner.0.bytes()
    }
}

impl Drop for ViewRef {
    fn drop(&mut self) {
        let b = &self.0;
        // Unmarked first, as in `SharedBuf::drop`.
        b.conn.unmark_view(b.handle.offset);
        // In a forked child, the view is the parent's: nothing to close here.
        if b.conn.ours() && b.conn.usable() {
            let _ = b.conn.request(
                Op::Close,
                0,
                u64::from(b.handle.generation),
                b.handle.offset,
                0,
            );
        }
    }
}
