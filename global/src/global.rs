//! [`XallocGlobal`]: a `GlobalAlloc` that serves large allocations from the daemon's shared arena
//! and everything else, or everything when no daemon answers, from the system allocator.
//!
//! # How it decides
//!
//! - A request of at least the threshold (default 256 KiB, `XALLOC_THRESHOLD` overrides) goes
//!   to the daemon; a smaller one, or one the daemon cannot serve (no room, over this
//!   process's or user's quota: [`Counters::over_quota`]), goes to [`System`].
//! - The first large request connects to the daemon instance (default `xalloc`,
//!   `XALLOC_NAME` overrides). A failed connection is retried at most once per
//!   [`RETRY_INTERVAL`], never on every call.
//! - `dealloc` and `realloc` tell arena blocks from system blocks by address: every arena
//!   block is at least the threshold long and lies inside a mapped arena; every other pointer is
//!   the system allocator's.
//!
//! # State, and why the allocation path never re-enters itself
//!
//! Everything lives inside the `XallocGlobal` value (a `static`), in atomics and in cells
//! written once under a flag: no heap allocation, no std lock, no formatting, no logging and no
//! panic on any path. Each connection keeps a pool of up to [`POOL`] request slots of its
//! channel; a thread borrows one for a round trip with an atomic bit operation and returns it
//! after, so threads never wait on each other for a whole round trip (while every slot is lent,
//! a thread waits at most [`SLOT_WAIT_NS`] for one before it falls back). Freed blocks are
//! cached, and released without a round trip, in the connection's ledger. A daemon that dies
//! or stops answering is marked dead; later large requests go to the system allocator until a new daemon is found,
//! however often the daemon is restarted. A connection's arena stays mapped while the program
//! holds any of its blocks, even after the daemon dies; a connection whose daemon is gone, whose
//! blocks are all freed and that no thread uses is unmapped when a new one is made, so that at
//! most [`MAX_CONNECTIONS`] are kept at once (see `State` for how readers that take no lock
//! are kept safe from that).
//!
//! # fork
//!
//! A connection is the process's that made it: the daemon knows its client by the socket, and
//! its channel is not mapped in a child (`MADV_DONTFORK`). In a forked child (a
//! `pthread_atfork` handler, registered when the program is loaded) a connection attempt of
//! another parent thread is abandoned, and every connection inherited from the parent is
//! retired: its copy of the socket is closed (so that the daemon sees the parent's exit or
//! `exec`, whatever the child does), its arena becomes a private copy-on-write mapping, and it
//! is never asked anything again, nor is its channel touched. The child connects anew on its
//! next large request. Blocks it inherited stay readable and writable in the child without
//! ever changing the parent's data; freeing one frees nothing (they are the parent's), so
//! nothing is freed twice. The child's own arena blocks are freed normally, and all of them
//! when it exits or execs.

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::mem::MaybeUninit;
use core::ops::Deref;
use core::ptr::{self, NonNull};
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::alloc::System;

use xalloc_proto::os;
use xalloc_proto::wire::{self, Ledger, LedgerBlock, Status};

use crate::client::{Connection, RequestError};

/// The default threshold: requests of at least this many bytes go to the daemon.
pub const DEFAULT_THRESHOLD: usize = 256 << 10;

/// The default daemon instance.
pub const DEFAULT_NAME: &str = "xalloc";

/// Shortest time between two connection attempts.
pub const RETRY_INTERVAL_NS: u64 = 1_000_000_000;

/// [`RETRY_INTERVAL_NS`] as a duration, for the docs.
pub const RETRY_INTERVAL: core::time::Duration =
    core::time::Duration::from_nanos(RETRY_INTERVAL_NS);

/// The longest a thread waits for another thread's connection attempt before it falls back to
/// the system allocator. An attempt takes about 100 µs on an idle machine, but its thread may
/// not run for a long while on a loaded one (60-260 ms with 320 busy threads on 2 CPUs), and
/// every thread that gave up meanwhile would fall back; one that hangs (a stopped daemon) is
/// cut off by the handshake's own bound, [`HANDSHAKE_TIMEOUT`](crate::client::HANDSHAKE_TIMEOUT),
/// and so is every wait for it.
pub const CONNECT_WAIT_NS: u64 = 2_000_000_000;

/// Connections (one per daemon instance it met: each restart of the daemon that makes a new
/// arena is one) a process keeps at once. One whose daemon is gone and whose blocks the
/// program has all freed makes room for the next; one whose blocks are still held stays.
pub const MAX_CONNECTIONS: usize = 8;

/// Request slots per connection (at most: the channel may have fewer).
pub const POOL: usize = 64;

/// The longest a thread waits for a slot of its connection while every one is lent, before it
/// falls back to the system allocator.
pub const SLOT_WAIT_NS: u64 = 2_000_000;

/// Bytes of freed blocks a process keeps cached for reuse, unless `XALLOC_CACHE` says
/// otherwise (`0` turns the cache off, and with it the release of blocks without a round trip).
pub const DEFAULT_CACHE_BYTES: u64 = 128 << 20;

/// This process's counters, see [`XallocGlobal::counters`]. A forked child starts from zero
/// (its `connections` from the parent's count).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Large allocations served from the arena.
    pub forwarded: u64,
    /// Large allocations served by the system allocator instead (no daemon, or it refused).
    pub fallbacks: u64,
    /// Large allocations the daemon refused because this process or its user is over quota
    /// (`xallocd start --client-quota`, `--user-quota`); counted in `fallbacks` too.
    pub over_quota: u64,
    /// Bytes this process holds in arena blocks now.
    pub arena_bytes: u64,
    /// Arena blocks this process holds now.
    pub arena_blocks: u64,
    /// Connections made to a daemon over the process's life (at most [`MAX_CONNECTIONS`] are
    /// kept at once).
    pub connections: u64,
    /// Bytes of freed arena blocks kept for reuse (counted in `arena_bytes` too: the daemon
    /// still counts them as this process's).
    pub cached_bytes: u64,
    /// Large allocations served from the cache, without a round trip.
    pub cache_hits: u64,
    /// Entries of a ledger of this process that named no block inside the arena (the ledger is
    /// memory this process shares with the daemon; none is expected): dropped, never used.
    pub bad_ledger_entries: u64,
    /// Frees of a pointer into an arena that is not a block the program holds (freed twice,
    /// or not the start of a block): ignored, so nothing is freed twice.
    pub bad_frees: u64,
}

/// One connection: the socket, the mapped channel and arena, and the slots of the channel this
/// allocator has claimed.
struct Conn {
    conn: Connection,
    base: usize,
    len: usize,
    /// The daemon died or stopped answering: nothing more is sent.
    dead: AtomicBool,
    /// Made by a parent this process was forked from: never used for a request again (its
    /// channel is not mapped here).
    inherited: AtomicBool,
    /// Pool positions that hold a registered slot (bit `i`: `slots[i]` is valid).
    registered: AtomicU64,
    /// Pool positions lent to a thread now, or lost.
    busy: AtomicU64,
    /// Pool positions whose last request got no answer (timeout, or the daemon died): busy
    /// until a daemon that re-attached has taken the request out of the slot.
    lost: AtomicU64,
    /// Slot index of each registered position.
    slots: [AtomicU32; POOL],
    /// The blocks the program holds in this arena.
    blocks: BlockTable,
    /// The shared blocks this process owns or views in this arena.
    shares: ShareMarks,
}

/// The length of every arena block the program holds, in granules, at the index of the
/// block's first granule; 0 where no held block starts. Private memory of this process
/// (anonymous, `MAP_NORESERVE`: 4 bytes per granule of arena, a page of it costs memory only
/// once a block starts there), so the daemon and other processes cannot change it.
///
/// It is what lets a pointer alone free a block (C's `free`, which has no size), and what makes
/// a second free of the same pointer, or a free of a pointer into the middle of a block,
/// harmless: a block's entry is taken (swapped to 0) by the one free that frees it.
struct BlockTable {
    map: os::Mapping,
    entries: usize,
    /// log2 of the granule (a power of two: offsets are shifted, never divided, on the
    /// allocation path).
    shift: u32,
}

impl BlockTable {
    /// A table for an arena of `arena_len` bytes in granules of `granule` bytes (a power of
    /// two, else `None`).
    fn new(arena_len: usize, granule: usize) -> Option<Self> {
        if !granule.is_power_of_two() {
            return None;
        }
        let entries = (arena_len / granule).max(1);
        let map = os::Mapping::anonymous(entries.checked_mul(size_of::<AtomicU32>())?).ok()?;
        Some(Self {
            map,
            entries,
            shift: granule.trailing_zeros(),
        })
    }

    /// Every held block: offset and length in bytes.
    fn held(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        (0..self.entries).filter_map(move |g| {
            let n = self.entry(g)?.load(Ordering::Relaxed);
            (n != 0).then(|| (g << self.shift, (n as usize) << self.shift))
        })
    }

    /// The entry of granule `g`.
    fn entry(&self, g: usize) -> Option<&AtomicU32> {
        (g < self.entries).then(|| {
            // SAFETY: `g` is inside the mapping, which is page-aligned (so each 4-byte entry
            // is aligned), zero-filled (a valid `AtomicU32`), written only through atomics,
            // and lives as long as `self`.
            unsafe { &*self.map.as_ptr().cast::<AtomicU32>().add(g) }
        })
    }
}

/// What this process holds of each shared block of one arena, at the index of the block's first
/// granule: whether it owns it (a [`SharedBuf`](crate::SharedBuf)), how many view references it
/// holds ([`SharedView`](crate::SharedView)s opened), and the block's length in granules.
/// Private memory, like [`BlockTable`] (8 bytes per granule, costing memory only where shared
/// blocks start).
///
/// It keeps a process from holding a `SharedBuf` and a `SharedView` of the same block at once,
/// which would let safe code hold `&mut [u8]` and `&[u8]` to the same bytes; and it tells a
/// forked child which shared blocks to copy when the arena cannot be remapped.
struct ShareMarks {
    map: os::Mapping,
    entries: usize,
}

/// [`ShareMarks`] entry: this process owns the block.
const MARK_OWNED: u64 = 1 << 63;
/// [`ShareMarks`] entry: a thread of this process is receiving the block (asked the daemon,
/// no answer yet).
const MARK_RECEIVING: u64 = 1 << 62;
/// [`ShareMarks`] entry: one view reference (bits 32 to 61 count them).
const MARK_VIEW: u64 = 1 << 32;
/// [`ShareMarks`] entry: the view count's bits.
const MARK_VIEWS: u64 = MARK_RECEIVING - MARK_VIEW;
/// [`ShareMarks`] entry: the block's length in granules (bits 0 to 31).
const MARK_GRANULES: u64 = MARK_VIEW - 1;

/// Why [`ShareMarks`] refused a mark.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MarkError {
    /// This process owns the block.
    Owned,
    /// This process holds views of the block.
    Viewed,
}

impl ShareMarks {
    fn new(entries: usize) -> Option<Self> {
        let map =
            os::Mapping::anonymous(entries.max(1).checked_mul(size_of::<AtomicU64>())?).ok()?;
        Some(Self {
            map,
            entries: entries.max(1),
        })
    }

    /// The entry of granule `g`.
    fn entry(&self, g: usize) -> Option<&AtomicU64> {
        (g < self.entries).then(|| {
            // SAFETY: `g` is inside the mapping, which is page-aligned (so each 8-byte entry
            // is aligned), zero-filled (a valid `AtomicU64`), written only through atomics,
            // and lives as long as `self`.
            unsafe { &*self.map.as_ptr().cast::<AtomicU64>().add(g) }
        })
    }

    /// Applies `f` to entry `g` atomically; `f`'s error leaves it as it was.
    fn update(&self, g: usize, f: impl Fn(u64) -> Result<u64, MarkError>) -> Result<(), MarkError> {
        let Some(e) = self.entry(g) else {
            return Ok(());
        };
        let mut cur = e.load(Ordering::Relaxed);
        loop {
            let new = f(cur)?;
            match e.compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return Ok(()),
                Err(now) => cur = now,
            }
        }
    }

    /// Every block marked: offset and length in granules.
    fn held(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        (0..self.entries).filter_map(move |g| {
            let n = (self.entry(g)?.load(Ordering::Relaxed) & MARK_GRANULES) as usize;
            (n != 0).then_some((g, n))
        })
    }
}

impl Conn {
    /// The connection's ledger, unless it was inherited through fork.
    fn ledger(&self) -> Option<&Ledger> {
        if self.inherited.load(Ordering::Relaxed) {
            return None;
        }
        self.conn.ledger()
    }

    /// Bytes this process keeps cached in this connection.
    fn cached_bytes(&self) -> u64 {
        self.ledger().map_or(0, |l| {
            // Shared memory: saturating, whatever it says.
            l.cached_granules
                .load(Ordering::Relaxed)
                .saturating_mul(self.conn.granule() as u64)
        })
    }

    /// The block-table entry of the block that starts at `ptr`, if `ptr` is a granule boundary
    /// of this arena.
    fn entry_at(&self, ptr: *const u8) -> Option<&AtomicU32> {
        let offset = ptr.addr().wrapping_sub(self.base);
        let shift = self.blocks.shift;
        if offset >= self.len || offset & ((1 << shift) - 1) != 0 {
            return None;
        }
        self.blocks.entry(offset >> shift)
    }

    /// Records that the program holds the block of `bytes` at `ptr`.
    fn note_block(&self, ptr: *const u8, bytes: usize) {
        let granules = u32::try_from(bytes >> self.blocks.shift).unwrap_or(u32::MAX);
        if let Some(e) = self.entry_at(ptr) {
            e.store(granules, Ordering::Relaxed);
        }
    }

    /// Length in bytes of the held block at `ptr`, or `None` if no held block starts there.
    fn block_len(&self, ptr: *const u8) -> Option<usize> {
        let g = self.entry_at(ptr)?.load(Ordering::Relaxed);
        (g != 0).then(|| (g as usize) << self.blocks.shift)
    }

    /// Takes the record of the held block at `ptr` (the program is freeing it): its length in
    /// bytes, or `None` if no held block starts there (freed already, or not a block).
    fn take_block(&self, ptr: *const u8) -> Option<usize> {
        let g = self.entry_at(ptr)?.swap(0, Ordering::Relaxed);
        (g != 0).then(|| (g as usize) << self.blocks.shift)
    }
}

/// Where a thread starts looking in the ledger: threads on different CPUs start on different
/// cache lines of it.
fn cpu_hint() -> usize {
    os::current_cpu() as usize
}

/// [`Entry::state`]: no connection in the entry.
const VACANT: u64 = 1 << 63;
/// [`Entry::state`]: one arena block held by the program. The held count (bits 32 to 62) stays
/// below [`VACANT`]: it counts blocks held at once, and a daemon's arena holds fewer than 2^30
/// (the program would need 16 GiB only to keep 2^31 pointers).
const HELD: u64 = 1 << 32;
/// [`Entry::state`]: the pins (bits 0 to 31), one per thread using the connection now.
const PINS: u64 = HELD - 1;
/// No entry (for [`State::newest`]).
const NO_ENTRY: usize = usize::MAX;

/// A place for one connection in [`State::conns`].
struct Entry {
    /// [`VACANT`] while no connection is here; [`HELD`] times the blocks of this connection's
    /// arena that the program holds; plus one per [`Pinned`] of it.
    state: AtomicU64,
    /// The arena's first byte and length, readable without a pin (by [`State::conn_of`]); a
    /// match is confirmed under a pin. Stale while the entry is vacant.
    base: AtomicUsize,
    len: AtomicUsize,
    conn: UnsafeCell<MaybeUninit<Conn>>,
}

impl Entry {
    const fn new() -> Self {
        Self {
            state: AtomicU64::new(VACANT),
            base: AtomicUsize::new(0),
            len: AtomicUsize::new(0),
            conn: UnsafeCell::new(MaybeUninit::uninit()),
        }
    }

    /// Pins the connection here, or `None` if the entry is vacant.
    fn pin(&self) -> Option<Pinned<'_>> {
        if self.state.load(Ordering::Relaxed) & VACANT != 0 {
            return None;
        }
        // Acquire: pairs with the Release that published the connection (`State::try_connect`).
        if self.state.fetch_add(1, Ordering::Acquire) & VACANT != 0 {
            self.state.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(Pinned { entry: self })
    }

    /// The connection here.
    ///
    /// # Safety
    /// The entry holds a connection, and keeps it while the reference lives: the caller holds a
    /// pin of it, or holds [`State::connecting`] (only that thread empties entries) and has seen
    /// the entry without [`VACANT`] since taking the flag.
    unsafe fn conn_ref(&self) -> &Conn {
        // SAFETY: 1. initialised: the caller saw the entry full, and full entries hold an
        // initialised connection (published after being written). 2. Not dropped or written
        // while the reference lives: the caller's pin or flag (see `State`).
        unsafe { (*self.conn.get()).assume_init_ref() }
    }
}

/// A connection that this thread uses: while it lives the entry is not emptied, so the
/// connection's mappings stay.
struct Pinned<'s> {
    entry: &'s Entry,
}

impl Pinned<'_> {
    /// Counts one more block of this connection held by the program, and unpins (one atomic
    /// operation, so that the entry is never seen unpinned with the block uncounted).
    fn hold_block_and_unpin(self) {
        let entry = self.entry;
        core::mem::forget(self);
        // Release: as in `drop`.
        entry.state.fetch_add(HELD - 1, Ordering::Release);
    }

    /// Counts one block fewer (the program freed one), and unpins.
    fn free_block_and_unpin(self) {
        let entry = self.entry;
        core::mem::forget(self);
        // Never below zero, even for a block freed twice (the caller's bug): the held count
        // must not borrow from `VACANT`. Release: as in `drop`.
        let _ = entry
            .state
            .fetch_update(Ordering::Release, Ordering::Relaxed, |s| {
                Some(if s & !VACANT > HELD {
                    s - HELD - 1
                } else {
                    s - 1
                })
            });
    }
}

impl Deref for Pinned<'_> {
    type Target = Conn;

    fn deref(&self) -> &Conn {
        // SAFETY: `self` is a pin of a full entry (`Entry::pin` checked).
        unsafe { self.entry.conn_ref() }
    }
}

impl Drop for Pinned<'_> {
    fn drop(&mut self) {
        // Release: everything this thread did with the connection happens before a thread that
        // empties the entry (its compare-exchange reads this value or a later one, Acquire).
        self.entry.state.fetch_sub(1, Ordering::Release);
    }
}

/// The process's connections and counters, shared by every `XallocGlobal` value (a process
/// installs one as its global allocator; it has one set of daemon connections).
///
/// # Invariants
///
/// Readers of `conns` take no lock; connections are made and recycled under `connecting`.
///
/// - `conns[i]` holds an initialised connection iff its `state` lacks [`VACANT`]. Only the
///   thread holding `connecting` fills a vacant entry (writes the connection, then the bounds,
///   then clears `VACANT` with Release) or empties a full one (sets `VACANT`, then drops the
///   connection, which closes its socket and unmaps its channel and arena).
/// - Any other thread reads an entry's connection only under a pin ([`Pinned`]): it raises
///   `state` by one (Acquire) and keeps the pin only if `VACANT` was clear; it drops the pin
///   (Release) once done with the connection. The atfork handler, in a child that has one
///   thread, clears the pins of the parent's threads.
/// - `state`'s held count is the number of blocks of that arena the program holds. It is
///   raised before `alloc` returns the block, in one step with the release of the pin the
///   allocating thread took in `live_conn`, and lowered, under a pin, when the program frees
///   one.
///   Cached blocks are not held: they are reached only through the connection, under a pin.
/// - An entry is emptied only by one compare-exchange of `state` from exactly 0 (full, no pin,
///   no held block) to `VACANT`, and only when the connection's daemon is gone (checked with
///   [`Connection::daemon_alive`] after a new connection was opened, so that the instance is
///   served by a daemon that did not re-attach to the old channel), or the connection was
///   inherited through fork. At that instant no
///   thread uses the connection and the program holds no pointer into its arena; from then on
///   no pin of it succeeds. A thread that read `newest` or an entry's bounds before fails to
///   pin it, or pins the connection put there later and checks it again.
/// - At most [`MAX_CONNECTIONS`] connections are kept; a full entry is emptied only to make
///   room for a new connection or right after one was made, so one still holding blocks stays.
/// - `newest` names the entry of the connection made last ([`NO_ENTRY`] before the first);
///   it may name an entry emptied since, which pins then refuse.
struct State {
    /// The entry of the newest connection.
    newest: AtomicUsize,
    /// Connections made over the process's life.
    made: AtomicU64,
    /// The atfork handler is registered.
    atfork: AtomicBool,
    /// Held while connecting or reviving a connection; others wait for the result. The pid of
    /// the process whose thread holds it (0: free), so that a forked child, which does not have
    /// that thread, takes it over even before the atfork handler is registered.
    connecting: AtomicU32,
    /// When the next connection attempt may be made (monotonic ns).
    next_try: AtomicU64,
    conns: [Entry; MAX_CONNECTIONS],
    forwarded: AtomicU64,
    fallbacks: AtomicU64,
    over_quota: AtomicU64,
    arena_bytes: AtomicU64,
    arena_blocks: AtomicU64,
    cache_hits: AtomicU64,
    bad_ledger_entries: AtomicU64,
    /// The cache's bound in bytes (`XALLOC_CACHE`), plus one; 0 until first read.
    cache_cap: AtomicU64,
    bad_frees: AtomicU64,
    /// Every arena ever mapped lies in `[lowest, highest)`: a pointer outside is a system
    /// block, told in two comparisons (C's `free` asks this of every pointer). Only widened.
    lowest: AtomicUsize,
    highest: AtomicUsize,
}

// SAFETY: every field shared between threads is an atomic, except the connections in `conns`,
// which only the thread holding `connecting` writes or drops, and only in a vacant entry (or
// one it has just made vacant, with no pin and no held block); other threads read them only
// under a pin of a full entry (see `State`'s invariants), and only their atomics are written
// by more than one thread.
unsafe impl Sync for State {}

static STATE: State = State {
    newest: AtomicUsize::new(NO_ENTRY),
    made: AtomicU64::new(0),
    atfork: AtomicBool::new(false),
    connecting: AtomicU32::new(0),
    next_try: AtomicU64::new(0),
    conns: [const { Entry::new() }; MAX_CONNECTIONS],
    forwarded: AtomicU64::new(0),
    fallbacks: AtomicU64::new(0),
    over_quota: AtomicU64::new(0),
    arena_bytes: AtomicU64::new(0),
    arena_blocks: AtomicU64::new(0),
    cache_hits: AtomicU64::new(0),
    bad_ledger_entries: AtomicU64::new(0),
    cache_cap: AtomicU64::new(0),
    bad_frees: AtomicU64::new(0),
    lowest: AtomicUsize::new(usize::MAX),
    highest: AtomicUsize::new(0),
};

/// Whether `ptr` points into a daemon's shared arena (a block `XallocGlobal` forwarded).
pub fn is_shared<T: ?Sized>(ptr: *const T) -> bool {
    STATE.conn_of(ptr.cast::<u8>().addr()).is_some()
}

/// This process's counters, read without allocating.
pub fn counters() -> Counters {
    Counters {
        forwarded: STATE.forwarded.load(Ordering::Relaxed),
        fallbacks: STATE.fallbacks.load(Ordering::Relaxed),
        over_quota: STATE.over_quota.load(Ordering::Relaxed),
        arena_bytes: STATE.arena_bytes.load(Ordering::Relaxed),
        arena_blocks: STATE.arena_blocks.load(Ordering::Relaxed),
        connections: STATE.made.load(Ordering::Relaxed),
        cached_bytes: STATE
            .conns()
            .map(|c| c.cached_bytes())
            .fold(0, u64::saturating_add),
        cache_hits: STATE.cache_hits.load(Ordering::Relaxed),
        bad_ledger_entries: STATE.bad_ledger_entries.load(Ordering::Relaxed),
        bad_frees: STATE.bad_frees.load(Ordering::Relaxed),
    }
}

/// Where a pointer the program holds came from, for the faces that are given a pointer alone.
pub(crate) enum Owner {
    /// Not inside any arena: the system allocator's.
    System,
    /// A held arena block of this many bytes.
    Arena(usize),
    /// Inside an arena, but no held block starts there (freed, or inside a block).
    Stray,
}

/// Where `ptr` came from.
pub(crate) fn owner_of(ptr: *const u8) -> Owner {
    match STATE.conn_of(ptr.addr()) {
        None => Owner::System,
        Some(c) => c.block_len(ptr).map_or(Owner::Stray, Owner::Arena),
    }
}

/// Whether `ptr` may point into an arena: `false` means surely not (two comparisons).
#[inline(always)]
pub(crate) fn maybe_in_arena(ptr: *const u8) -> bool {
    STATE.maybe_in_arena(ptr.addr())
}

/// Frees `ptr` if it points into an arena (a held block's start is freed; any other pointer
/// there is counted in [`Counters::bad_frees`] and left alone); `false` if it is a system
/// block, which the caller frees. For pointers that [`maybe_in_arena`].
#[inline(never)]
pub(crate) fn free_in_arena(ptr: *mut u8) -> bool {
    match STATE.find_conn(ptr.addr()) {
        Some(c) => {
            STATE.free_block(c, ptr);
            true
        }
        None => false,
    }
}

/// Resizes the held arena block `ptr` of `old` bytes in place to `new_size` bytes (at least
/// the threshold); whether it did.
pub(crate) fn resize_arena(ptr: *mut u8, old: usize, new_size: usize) -> bool {
    STATE
        .conn_of(ptr.addr())
        .is_some_and(|c| STATE.arena_resize(&c, ptr, old, new_size))
}

/// Runs `f` on the connection this process's allocator made last, if there is one, and returns
/// what `f` returns: for tests and diagnostics that look at the allocator's own channel (its
/// ledger, its slots). Whatever `f` writes there changes what the allocator does next; the
/// connection stays pinned (kept) while `f` runs.
pub fn with_newest_connection<R>(f: impl FnOnce(&Connection) -> R) -> Option<R> {
    let c = STATE.pin(STATE.newest.load(Ordering::Acquire))?;
    Some(f(&c.conn))
}

/// A connection the share API ([`crate::share`]) uses, counted as one held block of its entry
/// while this value lives, so that the connection (and its arena mapping, where shared blocks
/// and views lie) is never recycled under a [`SharedBuf`](crate::SharedBuf) or a
/// [`SharedView`](crate::SharedView).
#[derive(Debug)]
pub(crate) struct HeldConn {
    entry: usize,
}

/// The instance the process's allocator ([`XallocGlobal`] or the C library) was configured
/// with, noted on its first use, so that the share API talks to the same instance.
struct NameCell {
    /// 0: not noted; 1: being noted; 2: noted.
    state: AtomicU32,
    ptr: core::sync::atomic::AtomicPtr<u8>,
    len: AtomicUsize,
}

static CONFIGURED_NAME: NameCell = NameCell {
    state: AtomicU32::new(0),
    ptr: core::sync::atomic::AtomicPtr::new(ptr::null_mut()),
    len: AtomicUsize::new(0),
};

impl NameCell {
    /// Notes `name` if no name was noted before.
    fn note(&self, name: &'static str) {
        if self.state.load(Ordering::Relaxed) == 0
            && self
                .state
                .compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
        {
            self.ptr.store(name.as_ptr().cast_mut(), Ordering::Relaxed);
            self.len.store(name.len(), Ordering::Relaxed);
            self.state.store(2, Ordering::Release);
        }
    }

    /// The name noted, or [`DEFAULT_NAME`].
    fn get(&self) -> &'static str {
        if self.state.load(Ordering::Acquire) != 2 {
            return DEFAULT_NAME;
        }
        let (p, len) = (
            self.ptr.load(Ordering::Relaxed),
            self.len.load(Ordering::Relaxed),
        );
        // SAFETY: `p` and `len` are those of a `&'static str` (`note`), published before the
        // state read above (Release/Acquire) and never changed after.
        unsafe { core::str::from_utf8_unchecked(core::slice::from_raw_parts(p, len)) }
    }
}

impl HeldConn {
    /// Holds the live connection of this process (made to `XALLOC_NAME`, else the instance
    /// the process's allocator was configured with, else [`DEFAULT_NAME`], if there is none),
    /// or `None` if no daemon answers.
    pub(crate) fn live() -> Option<Self> {
        let c = STATE.live_conn(CONFIGURED_NAME.get())?;
        let entry = STATE.index_of(&c);
        c.hold_block_and_unpin();
        Some(Self { entry })
    }

    /// Takes the held arena block at `ptr` out of the program's hands, for a share: the hold
    /// the block had on its connection becomes this value's. Returns the block's offset and
    /// length, or `None` if no held block starts at `ptr` (a system block).
    pub(crate) fn adopt_block(ptr: *const u8) -> Option<(Self, u64, usize)> {
        let c = STATE.conn_of(ptr.addr())?;
        if !STATE.usable(&c) {
            return None;
        }
        let bytes = c.take_block(ptr)?;
        let entry = STATE.index_of(&c);
        let offset = (ptr.addr() - c.base) as u64;
        // The block's hold stays; this pin goes.
        drop(c);
        Some((Self { entry }, offset, bytes))
    }

    /// Gives the block at `offset` of `bytes` back to the program (a share of it failed): the
    /// hold becomes the block's again.
    pub(crate) fn return_block(self, offset: u64, bytes: usize) {
        if let Some(c) = STATE.pin(self.entry) {
            c.note_block((c.base + offset as usize) as *const u8, bytes);
        }
        core::mem::forget(self);
    }

    /// The connection, pinned (always there: the hold keeps the entry full).
    fn pinned(&self) -> Option<Pinned<'static>> {
        STATE.pin(self.entry)
    }

    /// Where the arena starts in this process, its length, its instance's generation and its
    /// granule.
    pub(crate) fn arena(&self) -> (*mut u8, usize, u64, usize) {
        self.pinned().map_or((ptr::null_mut(), 0, 0, 1), |c| {
            (
                c.conn.arena_base(),
                c.conn.arena_len(),
                c.conn.generation(),
                c.conn.granule(),
            )
        })
    }

    /// A zeroed block of at least `size` bytes: its offset and length.
    pub(crate) fn allocate_zeroed(&self, size: u64) -> Result<(u64, u64), RequestError> {
        let c = self.pinned().ok_or(RequestError::SlotUnusable)?;
        if !STATE.usable(&c) {
            return Err(RequestError::DaemonGone);
        }
        let align = c.conn.granule() as u64;
        let b = STATE
            .with_slot(&c, |i| c.conn.allocate(i, size, align, true))
            .unwrap_or(Err(RequestError::NoFreeSlot))?;
        Ok((b.offset, b.size))
    }

    /// Whether the connection may still be asked (this process's, its daemon alive or back).
    pub(crate) fn usable(&self) -> bool {
        self.pinned().is_some_and(|c| STATE.usable(&c))
    }

    /// One share request through a slot of the connection.
    pub(crate) fn request(
        &self,
        op: wire::Op,
        flags: u32,
        size: u64,
        offset: u64,
        token: u64,
    ) -> Result<wire::Response, RequestError> {
        let c = self.pinned().ok_or(RequestError::SlotUnusable)?;
        if !STATE.usable(&c) {
            return Err(RequestError::DaemonGone);
        }
        STATE
            .with_slot(&c, |i| {
                c.conn
                    .request_with_token(i, op, flags, size, 0, offset, token)
            })
            .unwrap_or(Err(RequestError::NoFreeSlot))
    }

    /// Adds `bytes` and one block (`more`), or takes them away, from this process's counters.
    pub(crate) fn count(bytes: u64, more: bool) {
        if more {
            STATE.arena_bytes.fetch_add(bytes, Ordering::Relaxed);
            STATE.arena_blocks.fetch_add(1, Ordering::Relaxed);
        } else {
            let less = |v: u64, by: u64| Some(v.saturating_sub(by));
            let _ = STATE
                .arena_bytes
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| less(v, bytes));
            let _ = STATE
                .arena_blocks
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| less(v, 1));
        }
    }

    /// Marks the shared block at `offset` (`bytes` long) owned by this process: one it has just
    /// shared (no other mark of this process can name that block: every mark is taken away
    /// before the block it names can be freed, and a receive in flight that names the offset
    /// names another, older share, which the daemon refuses), or one it received unchecked.
    pub(crate) fn mark_owned(&self, offset: u64, bytes: u64) {
        let granules = self.granules_of(bytes);
        let _ = self.mark(offset, |e| {
            Ok(e & !MARK_GRANULES | MARK_OWNED | Self::granules_mark(granules, e))
        });
    }

    /// Before asking the daemon to receive the block at `offset`: refused while this process
    /// owns it or holds views of it (or receives it in another thread), unless `unchecked`.
    pub(crate) fn begin_receive(&self, offset: u64, unchecked: bool) -> Result<(), MarkError> {
        self.mark(offset, |e| {
            if e & (MARK_OWNED | MARK_RECEIVING) != 0 && !unchecked {
                Err(MarkError::Owned)
            } else if e & MARK_VIEWS != 0 && !unchecked {
                Err(MarkError::Viewed)
            } else {
                Ok(e | MARK_RECEIVING)
            }
        })
    }

    /// After the daemon answered a receive of the block at `offset` (`bytes` long): owned if
    /// it `succeeded`.
    pub(crate) fn end_receive(&self, offset: u64, bytes: u64, succeeded: bool) {
        let granules = self.granules_of(bytes);
        let _ = self.mark(offset, |e| {
            let e = e & !MARK_RECEIVING;
            Ok(if succeeded {
                e & !MARK_GRANULES | MARK_OWNED | Self::granules_mark(granules, e)
            } else {
                Self::tidy(e)
            })
        });
    }

    /// This process no longer owns the shared block at `offset`. (Called before the daemon is
    /// told, so that the mark is gone before the block can be freed and handed out again.)
    pub(crate) fn unmark_owned(&self, offset: u64) {
        let _ = self.mark(offset, |e| Ok(Self::tidy(e & !MARK_OWNED)));
    }

    /// Counts one more view reference of this process to the shared block at `offset`
    /// (`bytes` long), which the daemon has just opened; refused while this process owns it
    /// (or receives it), unless `unchecked`.
    pub(crate) fn mark_view(
        &self,
        offset: u64,
        bytes: u64,
        unchecked: bool,
    ) -> Result<(), MarkError> {
        let granules = self.granules_of(bytes);
        self.mark(offset, |e| {
            if e & (MARK_OWNED | MARK_RECEIVING) != 0 && !unchecked {
                return Err(MarkError::Owned);
            }
            // Saturates rather than overflowing into the flags (2^30 views of one block cannot
            // be held: each view costs memory here).
            let views = (e & MARK_VIEWS).saturating_add(MARK_VIEW).min(MARK_VIEWS);
            Ok(e & !(MARK_VIEWS | MARK_GRANULES) | views | Self::granules_mark(granules, e))
        })
    }

    /// One view reference fewer to the shared block at `offset` (called before the daemon is
    /// told, as for [`HeldConn::unmark_owned`]).
    pub(crate) fn unmark_view(&self, offset: u64) {
        let _ = self.mark(offset, |e| {
            let views = (e & MARK_VIEWS).saturating_sub(MARK_VIEW);
            Ok(Self::tidy(e & !MARK_VIEWS | views))
        });
    }

    /// Entry `e`, emptied (its length forgotten) if nothing of this process holds it any more.
    fn tidy(e: u64) -> u64 {
        if e & (MARK_OWNED | MARK_RECEIVING | MARK_VIEWS) == 0 {
            0
        } else {
            e
        }
    }

    /// Granules of an arena block of `bytes`.
    fn granules_of(&self, bytes: u64) -> u64 {
        (bytes / self.arena().3 as u64).min(MARK_GRANULES)
    }

    /// Entry `e`'s granules, or `granules` if it has none yet.
    fn granules_mark(granules: u64, e: u64) -> u64 {
        match e & MARK_GRANULES {
            0 => granules,
            n => n,
        }
    }

    /// Updates the mark of the block at `offset` (a granule boundary of the arena).
    fn mark(
        &self,
        offset: u64,
        f: impl Fn(u64) -> Result<u64, MarkError>,
    ) -> Result<(), MarkError> {
        let Some(c) = self.pinned() else {
            return Ok(());
        };
        let granule = c.conn.granule() as u64;
        if !offset.is_multiple_of(granule) {
            return Ok(());
        }
        c.shares.update((offset / granule) as usize, f)
    }

    /// Whether the connection was made by this process (not inherited through fork).
    pub(crate) fn ours(&self) -> bool {
        self.pinned()
            .is_some_and(|c| !c.inherited.load(Ordering::Relaxed) && STATE.ours(&c))
    }
}

impl Clone for HeldConn {
    fn clone(&self) -> Self {
        if let Some(c) = self.pinned() {
            c.hold_block_and_unpin();
        }
        Self { entry: self.entry }
    }
}

impl Drop for HeldConn {
    fn drop(&mut self) {
        if let Some(c) = self.pinned() {
            c.free_block_and_unpin();
        }
    }
}

extern "C" fn after_fork_in_child() {
    // First: from here on no inherited connection counts as this process's own.
    crate::client::note_fork();
    STATE.forget_parent();
}

impl State {
    /// Pins the connection in entry `i`, if there is one.
    fn pin(&self, i: usize) -> Option<Pinned<'_>> {
        self.conns.get(i)?.pin()
    }

    /// The index of the entry `c` pins.
    fn index_of(&self, c: &Pinned<'_>) -> usize {
        let at = core::ptr::from_ref(c.entry).addr();
        (at - self.conns.as_ptr().addr()) / size_of::<Entry>()
    }

    /// Every connection, pinned in turn.
    fn conns(&self) -> impl Iterator<Item = Pinned<'_>> {
        self.conns.iter().filter_map(Entry::pin)
    }

    /// Whether `addr` may lie in an arena: `false` means it is surely a system block. The
    /// bounds are widened before any block of a new arena is handed out (and so before the
    /// program can pass one to another thread), so a held block is never outside.
    #[inline(always)]
    fn maybe_in_arena(&self, addr: usize) -> bool {
        addr >= self.lowest.load(Ordering::Relaxed) && addr < self.highest.load(Ordering::Relaxed)
    }

    /// The connection whose arena holds `addr`, pinned. (Inlined: the test that rules out
    /// every arena, which C's `free` makes for every small block, costs two comparisons.)
    #[inline(always)]
    fn conn_of(&self, addr: usize) -> Option<Pinned<'_>> {
        if !self.maybe_in_arena(addr) {
            return None;
        }
        self.find_conn(addr)
    }

    /// [`State::conn_of`] for an address within the bounds of every arena.
    #[inline(never)]
    fn find_conn(&self, addr: usize) -> Option<Pinned<'_>> {
        self.conns.iter().find_map(|e| {
            // Unpinned first, so that a free touches no other connection's counter; a block
            // the program holds keeps its entry full with these bounds (it happens after the
            // publication), and any match is confirmed under the pin.
            if e.state.load(Ordering::Acquire) & VACANT != 0
                || addr.wrapping_sub(e.base.load(Ordering::Relaxed))
                    >= e.len.load(Ordering::Relaxed)
            {
                return None;
            }
            let c = e.pin()?;
            (addr.wrapping_sub(c.base) < c.len).then_some(c)
        })
    }

    /// The newest connection, pinned, if it is alive and this process's.
    fn newest_live(&self) -> Option<Pinned<'_>> {
        let c = self.pin(self.newest.load(Ordering::Acquire))?;
        if c.dead.load(Ordering::Relaxed) || !self.ours(&c) {
            return None;
        }
        Some(c)
    }

    /// Whether `c` was made by this process. One made by a parent, in a child that ran no fork
    /// handler (a raw `clone`, glibc's `_Fork`: `forget_parent` did not run), is retired here
    /// as that handler would have: never asked anything again. (Its socket stays open and its
    /// arena shared with the parent, as the handler alone can change.)
    fn ours(&self, c: &Conn) -> bool {
        if c.conn.in_connecting_process() {
            return true;
        }
        c.dead.store(true, Ordering::Relaxed);
        if !c.inherited.swap(true, Ordering::Relaxed) {
            // The parent's wait before its next attempt is not this process's.
            self.next_try.store(0, Ordering::Relaxed);
        }
        false
    }

    /// Runs `f` holding the `connecting` flag, or, if another thread holds it, waits until it
    /// is done (at most [`CONNECT_WAIT_NS`], yielding at first and then sleeping, so that the
    /// connecting thread gets the CPU) and returns `None`: the caller then looks for the
    /// connection that attempt made.
    fn exclusively<T>(&self, f: impl FnOnce() -> Option<T>) -> Option<T> {
        let me = os::pid();
        loop {
            let holder = self.connecting.load(Ordering::Acquire);
            if holder == me {
                let deadline = os::monotonic_ns().saturating_add(CONNECT_WAIT_NS);
                let mut turns = 0u32;
                while self.connecting.load(Ordering::Acquire) == me && os::monotonic_ns() < deadline
                {
                    turns = turns.saturating_add(1);
                    if turns < 64 {
                        os::yield_now();
                    } else {
                        // nanosleep: no allocation, no lock.
                        std::thread::sleep(core::time::Duration::from_micros(200));
                    }
                }
                return None;
            }
            // Free, or held by a thread of a parent this process was forked from, which is not
            // here to finish: taken.
            if self
                .connecting
                .compare_exchange(holder, me, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                break;
            }
        }
        let r = f();
        self.connecting.store(0, Ordering::Release);
        r
    }

    /// The newest live connection, pinned; if there is none, revives the newest or connects
    /// anew (at most once per [`RETRY_INTERVAL`]).
    fn live_conn(&self, name: &str) -> Option<Pinned<'_>> {
        self.newest_live().or_else(|| {
            self.exclusively(|| {
                // Re-checked under the flag: another thread may have connected meanwhile.
                if let Some(c) = self.newest_live() {
                    return Some(c);
                }
                if !self.may_try() {
                    return None;
                }
                if let Some(c) = self.pin(self.newest.load(Ordering::Acquire)) {
                    if self.revive(&c) {
                        return Some(c);
                    }
                }
                self.try_connect(name)
            })
            .or_else(|| self.newest_live())
        })
    }

    /// Whether `c` may be used: it is this process's, and its daemon lives, or (checked at
    /// most once per [`RETRY_INTERVAL`]) a new daemon has re-attached to its channel.
    fn usable(&self, c: &Conn) -> bool {
        if c.inherited.load(Ordering::Relaxed) || !self.ours(c) {
            return false;
        }
        if !c.dead.load(Ordering::Relaxed) {
            return true;
        }
        self.exclusively(|| (self.may_try() && self.revive(c)).then_some(()))
            .is_some()
            || !c.dead.load(Ordering::Relaxed)
    }

    /// Takes the right to one connection attempt, at most one per [`RETRY_INTERVAL`].
    fn may_try(&self) -> bool {
        let now = os::monotonic_ns();
        let next = self.next_try.load(Ordering::Relaxed);
        now >= next
            && self
                .next_try
                .compare_exchange(
                    next,
                    now.saturating_add(RETRY_INTERVAL_NS),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
    }

    /// Brings dead connection `c` back if a new daemon has re-attached to its channel (and
    /// the channel has been rebound to it, or will be): its slots and blocks are this
    /// process's as before.
    fn revive(&self, c: &Conn) -> bool {
        if c.inherited.load(Ordering::Relaxed) || !c.conn.daemon_alive() {
            return false;
        }
        // Positions whose request the new daemon has taken out of the slot are free again.
        let lost = c.lost.load(Ordering::Relaxed);
        for pos in (0..POOL).filter(|p| lost & (1 << p) != 0) {
            let idle = c
                .conn
                .request_slot(c.slots[pos].load(Ordering::Relaxed))
                .is_some_and(|s| s.state.load(Ordering::Acquire) == wire::IDLE);
            if idle {
                c.lost.fetch_and(!(1 << pos), Ordering::Relaxed);
                c.busy.fetch_and(!(1 << pos), Ordering::Release);
            }
        }
        c.dead.store(false, Ordering::Relaxed);
        true
    }

    /// Connects to `XALLOC_NAME` if set, else to `name`, and publishes the connection as the
    /// newest, in a vacant entry or in one emptied for it ([`State::recycle`]); then empties
    /// every other entry whose connection nothing needs any more. The caller holds
    /// `connecting`.
    #[cold]
    fn try_connect(&self, name: &str) -> Option<Pinned<'_>> {
        // Normally registered when the program was loaded (`REGISTER_FORK_HANDLER`, which this
        // reference also keeps in the link); registered here only where that did not run.
        core::hint::black_box(&REGISTER_FORK_HANDLER);
        if !self.atfork.load(Ordering::Relaxed) {
            // Before the first connection is published, so that every child forked while one
            // exists forgets the parent's slots.
            register_fork_handler();
        }
        let mut buf = [0u8; 256];
        let name = env_str(c"XALLOC_NAME", &mut buf).unwrap_or(name);
        let conn = Connection::connect(name).ok()?;
        let blocks = BlockTable::new(conn.arena_len(), conn.granule())?;
        let shares = ShareMarks::new(conn.arena_len() / conn.granule().max(1))?;
        let i = (0..MAX_CONNECTIONS)
            .find(|&i| self.conns[i].state.load(Ordering::Acquire) & VACANT != 0)
            .or_else(|| (0..MAX_CONNECTIONS).find(|&i| self.recycle(i)))?;
        let e = &self.conns[i];
        let (base, len) = (conn.arena_base().addr(), conn.arena_len());
        // SAFETY: entry `i` is vacant, so no thread reads its connection (pins fail), and only
        // this thread, holding `connecting`, writes it. Whatever it held before was dropped
        // when it was emptied (or, in a forked child, is a parent thread's connection written
        // but not yet published, overwritten without being dropped: its arena mapping and its
        // copy of the socket stay, unused, until this process exits or execs).
        unsafe {
            (*e.conn.get()).write(Conn {
                conn,
                base,
                len,
                dead: AtomicBool::new(false),
                inherited: AtomicBool::new(false),
                registered: AtomicU64::new(0),
                busy: AtomicU64::new(0),
                lost: AtomicU64::new(0),
                slots: [const { AtomicU32::new(0) }; POOL],
                blocks,
                shares,
            });
        }
        e.base.store(base, Ordering::Relaxed);
        e.len.store(len, Ordering::Relaxed);
        self.lowest.fetch_min(base, Ordering::Relaxed);
        self.highest
            .fetch_max(base.saturating_add(len), Ordering::Relaxed);
        // Release: the connection and bounds are visible to every thread that pins it. Pins
        // that failed meanwhile left their counts, undone by themselves.
        e.state.fetch_and(!VACANT, Ordering::Release);
        self.newest.store(i, Ordering::Release);
        self.made.fetch_add(1, Ordering::Relaxed);
        for j in (0..MAX_CONNECTIONS).filter(|&j| j != i) {
            self.recycle(j);
        }
        self.pin(i)
    }

    /// Empties entry `i` if its connection's daemon is gone (or the connection was inherited
    /// through fork), the program holds none of its blocks and no thread uses it, dropping
    /// the connection (which closes its socket, so that a daemon that might still re-attach
    /// to its channel frees it, and unmaps it); whether it did. The caller holds `connecting`
    /// and has just opened a new connection to the instance: the daemon that serves it did not
    /// re-attach to the old channel (else `daemon_alive` would have followed it there).
    fn recycle(&self, i: usize) -> bool {
        let e = &self.conns[i];
        // Vacant, pinned, or holding blocks: kept. (Only this thread empties entries.)
        if e.state.load(Ordering::Acquire) != 0 {
            return false;
        }
        // SAFETY: 1. seen full just now, and this thread holds `connecting`: no one else
        // empties it. 2. The reference is not used after the drop below.
        let alive = unsafe { e.conn_ref() }.conn.daemon_alive();
        // Acquire: every pinned thread's use of the connection happens before the drop.
        if alive
            || e.state
                .compare_exchange(0, VACANT, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
        {
            return false;
        }
        // SAFETY: 1. initialised: the entry was full. 2. No thread uses it (no pin), none can
        // from now on (`VACANT` set), and the program holds no pointer into its arena (no held
        // block; cached blocks are reached only through the connection). 3. Dropped once:
        // only this thread, holding `connecting`, empties entries.
        unsafe { (*e.conn.get()).assume_init_drop() };
        true
    }

    /// In a forked child, which has one thread: the parent's other threads, and what they were
    /// doing, are gone. A connection attempt or revival one of them was making is abandoned
    /// (`connecting` cleared; an entry it was filling is still vacant, `newest` and every
    /// connection are as one of its steps left them, each step consistent), and so are their
    /// pins. Every connection is the parent's: it is retired (never asked anything again; its
    /// channel, which is not mapped here, never touched), its copy of the socket closed, and
    /// its arena made private. The blocks it holds are the parent's (the child cannot free
    /// them; it holds copies of the parent's pointers, so they stay counted as held until the
    /// program frees them, which frees nothing). The child connects anew on its next large
    /// request, at once.
    fn forget_parent(&self) {
        self.connecting.store(0, Ordering::Relaxed);
        self.next_try.store(0, Ordering::Relaxed);
        // The counters are this process's: the child starts from zero.
        for c in [
            &self.forwarded,
            &self.fallbacks,
            &self.over_quota,
            &self.cache_hits,
            &self.bad_ledger_entries,
            &self.bad_frees,
        ] {
            c.store(0, Ordering::Relaxed);
        }
        for e in &self.conns {
            let s = e.state.load(Ordering::Relaxed);
            e.state.store(s & !PINS, Ordering::Relaxed);
        }
        // The handler is registered when the program is loaded: a parent that never connected
        // leaves nothing to forget.
        if self
            .conns
            .iter()
            .all(|e| e.state.load(Ordering::Relaxed) & VACANT != 0)
        {
            return;
        }
        self.arena_bytes.store(0, Ordering::Relaxed);
        self.arena_blocks.store(0, Ordering::Relaxed);
        for c in self.conns() {
            c.inherited.store(true, Ordering::Relaxed);
            c.dead.store(true, Ordering::Relaxed);
            c.registered.store(0, Ordering::Relaxed);
            c.busy.store(0, Ordering::Relaxed);
            c.lost.store(0, Ordering::Relaxed);
            // So that the daemon sees the parent's exit or exec, whatever the child does.
            c.conn.close_inherited_socket();
            // SAFETY: runs in the child right after fork, which has one thread. Where the
            // program closed the arena's descriptor, the blocks the program holds are copied
            // into private memory instead. Left shared only if both fail (out of memory).
            unsafe {
                if c.conn.privatize_arena_after_fork().is_err() {
                    let shift = c.blocks.shift;
                    let shared = c.shares.held().map(|(g, n)| (g << shift, n << shift));
                    let _ = c
                        .conn
                        .privatize_arena_by_copy(c.blocks.held().chain(shared));
                }
            }
        }
    }

    /// Borrows a claimed slot of `c` (claiming a new one if all are lent, or waiting up to
    /// [`SLOT_WAIT_NS`] for one to be given back), runs `f` on it, and gives it back. `None`
    /// if no slot could be had.
    fn with_slot<T>(
        &self,
        c: &Conn,
        f: impl FnOnce(u32) -> Result<T, RequestError>,
    ) -> Option<Result<T, RequestError>> {
        let pos = Self::take_position(c)?;
        let r = f(c.slots[pos].load(Ordering::Relaxed));
        if matches!(r, Err(RequestError::Timeout | RequestError::DaemonGone)) {
            // The request may still be in the slot: the position stays busy until a daemon
            // has taken it out, and this daemon is not asked anything more.
            c.lost.fetch_or(1 << pos, Ordering::Relaxed);
            c.dead.store(true, Ordering::Relaxed);
        } else {
            c.busy.fetch_and(!(1 << pos), Ordering::Release);
        }
        Some(r)
    }

    /// A pool position of `c` lent to the caller, holding a claimed slot.
    fn take_position(c: &Conn) -> Option<usize> {
        let mut deadline = 0;
        loop {
            let busy = c.busy.load(Ordering::Relaxed);
            let reg = c.registered.load(Ordering::Acquire);
            let idle = reg & !busy;
            if idle != 0 {
                let pos = idle.trailing_zeros() as usize;
                if c.busy.fetch_or(1 << pos, Ordering::Acquire) & (1 << pos) == 0 {
                    return Some(pos);
                }
                continue;
            }
            // Every claimed slot is lent: reserve a new position and claim a slot for it.
            let free = !(reg | busy);
            if free != 0 {
                let pos = free.trailing_zeros() as usize;
                if c.busy.fetch_or(1 << pos, Ordering::Acquire) & (1 << pos) != 0 {
                    continue;
                }
                match c.conn.register() {
                    Ok(index) => {
                        c.slots[pos].store(index, Ordering::Relaxed);
                        c.registered.fetch_or(1 << pos, Ordering::Release);
                        return Some(pos);
                    }
                    Err(RequestError::NoFreeSlot) => {
                        c.busy.fetch_and(!(1 << pos), Ordering::Release);
                    }
                    Err(_) => {
                        c.busy.fetch_and(!(1 << pos), Ordering::Release);
                        return None;
                    }
                }
            }
            // Every slot of the channel (or of the pool) is lent: a round trip takes
            // microseconds, so one is given back soon, unless the daemon is gone.
            if c.dead.load(Ordering::Relaxed) {
                return None;
            }
            let now = os::monotonic_ns();
            if deadline == 0 {
                deadline = now.saturating_add(SLOT_WAIT_NS);
            } else if now > deadline {
                return None;
            }
            os::yield_now();
        }
    }

    /// Allocates in the arena of daemon `name`, or `None`: from the cache of freed blocks if
    /// one of this size is there, else from the daemon (which takes cached blocks back from
    /// every client, this one included, before it refuses for want of room).
    fn arena_alloc(&self, name: &str, layout: Layout, zeroed: bool) -> Option<NonNull<u8>> {
        let c = self.live_conn(name)?;
        let (size, align) = (layout.size() as u64, layout.align() as u64);
        let p = match self.cached_block(&c, layout, zeroed) {
            Some(p) => p,
            None => {
                let r = self.with_slot(&c, |i| c.conn.allocate(i, size, align, zeroed))?;
                let block = match r {
                    Ok(block) => block,
                    Err(RequestError::Refused(Status::OverQuota)) => {
                        self.over_quota.fetch_add(1, Ordering::Relaxed);
                        return None;
                    }
                    Err(_) => return None,
                };
                self.forwarded.fetch_add(1, Ordering::Relaxed);
                self.arena_bytes.fetch_add(block.size, Ordering::Relaxed);
                self.arena_blocks.fetch_add(1, Ordering::Relaxed);
                NonNull::new(block.as_ptr())?
            }
        };
        c.note_block(p.as_ptr(), Self::block_bytes(&c, layout.size()) as usize);
        // Counted as held before the program has the pointer, in one step with the unpin.
        c.hold_block_and_unpin();
        Some(p)
    }

    /// A block of `layout` from this process's cache in `c`, zeroed if asked, or `None`.
    ///
    /// The ledger lives in memory shared with the daemon, so an entry is used only if the block
    /// it names lies inside the arena: one that does not is taken out, counted in
    /// [`Counters::bad_ledger_entries`] and never used.
    fn cached_block(&self, c: &Conn, layout: Layout, zeroed: bool) -> Option<NonNull<u8>> {
        let ledger = c.ledger()?;
        let granule = c.conn.granule();
        let granules = u32::try_from(layout.size().div_ceil(granule)).ok()?;
        let bytes = granules as usize * granule;
        let base = c.conn.arena_base();
        // Aligned as this process sees the block, checked on the address; out-of-range offsets
        // pass here and are refused below, once taken out of the ledger.
        let aligned = |g: u32| {
            (base.addr().wrapping_add((g as usize).wrapping_mul(granule)))
                .is_multiple_of(layout.align())
        };
        let g = ledger.take(granules, cpu_hint(), aligned)?;
        let in_arena = (g as usize)
            .checked_mul(granule)
            .and_then(|off| off.checked_add(bytes))
            .is_some_and(|end| end <= c.conn.arena_len());
        // A block that starts where the program holds one is an entry put twice (a block freed
        // twice whose second free raced the first): dropped, never handed out twice.
        let held = c
            .blocks
            .entry(g as usize)
            .is_some_and(|e| e.load(Ordering::Relaxed) != 0);
        if !in_arena || held {
            self.bad_ledger_entries.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        self.cache_hits.fetch_add(1, Ordering::Relaxed);
        self.forwarded.fetch_add(1, Ordering::Relaxed);
        // SAFETY: `g * granule + bytes <= arena_len` (checked above), so the block lies inside
        // the arena mapping: the write below stays in memory this process maps. That the block
        // is this process's alone is the ledger's protocol, kept by this process and the daemon
        // only (no other process maps this channel): an entry is put there only by `arena_free`
        // for a block this process held, and taken once.
        let p = unsafe { base.add(g as usize * granule) };
        if zeroed {
            // SAFETY: as above; the block is `bytes` long.
            unsafe { p.write_bytes(0, bytes) };
        }
        NonNull::new(p)
    }

    /// The cache's bound in bytes: `XALLOC_CACHE` if set (`0` turns the cache off, and the
    /// ledger with it), else
    /// [`DEFAULT_CACHE_BYTES`].
    fn cache_cap(&self) -> u64 {
        match self.cache_cap.load(Ordering::Relaxed) {
            0 => {
                let cap = env_usize(c"XALLOC_CACHE").map_or(DEFAULT_CACHE_BYTES, |v| v as u64);
                self.cache_cap
                    .store(cap.saturating_add(1), Ordering::Relaxed);
                cap
            }
            v => v - 1,
        }
    }

    /// Frees the block at `ptr` of `c`'s arena, which the program says it holds, and unpins
    /// `c`: the block table, not the caller, says how long it is. A pointer where no held block
    /// starts (freed twice, or inside a block) frees nothing and is counted in
    /// [`Counters::bad_frees`].
    fn free_block(&self, c: Pinned<'_>, ptr: *mut u8) {
        match c.take_block(ptr) {
            Some(bytes) => {
                self.arena_free(&c, ptr, bytes);
                c.free_block_and_unpin();
            }
            None => {
                self.bad_frees.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Bytes of the arena block that holds `size` bytes.
    fn block_bytes(c: &Conn, size: usize) -> u64 {
        size.next_multiple_of(c.conn.granule()) as u64
    }

    /// Frees arena block `ptr` of `size` bytes in `c`: into the cache for the next allocation
    /// of its size, unless the cache is full or the daemon runs low on room; else released
    /// into the ledger for the daemon's next sweep, without waiting; else (ledger full, cache
    /// off) through a round trip. A block of a connection inherited through fork (the
    /// parent's) and a dead daemon's blocks are left alone.
    fn arena_free(&self, c: &Conn, ptr: *mut u8, size: usize) {
        let bytes = Self::block_bytes(c, size);
        if !self.usable(c) {
            // A dead daemon's block is no longer this process's to count (an inherited one
            // never was: a forked child's counters start from zero).
            if !c.inherited.load(Ordering::Relaxed) {
                let less = |v: u64, by: u64| Some(v.saturating_sub(by));
                let _ =
                    (self.arena_bytes)
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| less(v, bytes));
                let _ =
                    (self.arena_blocks)
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| less(v, 1));
            }
            return;
        }
        let offset = (ptr.addr() - c.base) as u64;
        let granule = c.conn.granule() as u64;
        let cap = self.cache_cap();
        if let (Some(ledger), true) = (c.ledger(), cap > 0) {
            let mut block = LedgerBlock {
                offset: u32::try_from(offset / granule).unwrap_or(u32::MAX),
                granules: u32::try_from(bytes / granule).unwrap_or(0),
                released: false,
            };
            let cached = ledger.cached_granules.load(Ordering::Relaxed);
            let room = cached.saturating_mul(granule).saturating_add(bytes) <= cap;
            if room && !c.conn.arena_is_low() && ledger.put(block, cpu_hint()) {
                return;
            }
            block.released = true;
            if ledger.put(block, cpu_hint()) {
                c.conn.ring();
                self.arena_bytes.fetch_sub(bytes, Ordering::Relaxed);
                self.arena_blocks.fetch_sub(1, Ordering::Relaxed);
                return;
            }
        }
        if let Some(Ok(())) = self.with_slot(c, |i| c.conn.free(i, offset)) {
            self.arena_bytes.fetch_sub(bytes, Ordering::Relaxed);
            self.arena_blocks.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Resizes arena block `ptr` (of `old` bytes) in place to `new_size`; whether it did.
    fn arena_resize(&self, c: &Conn, ptr: *mut u8, old: usize, new_size: usize) -> bool {
        if !self.usable(c) {
            return false;
        }
        let offset = (ptr.addr() - c.base) as u64;
        match self.with_slot(c, |i| c.conn.resize(i, offset, new_size as u64)) {
            Some(Ok(b)) => {
                c.note_block(ptr, b.size as usize);
                self.arena_bytes.fetch_add(b.size, Ordering::Relaxed);
                self.arena_bytes
                    .fetch_sub(Self::block_bytes(c, old), Ordering::Relaxed);
                true
            }
            _ => false,
        }
    }
}

/// The `#[global_allocator]` that forwards large allocations to `xallocd`.
///
/// ```no_run
/// use xalloc_global::XallocGlobal;
///
/// #[global_allocator]
/// static A: XallocGlobal = XallocGlobal::new();
///
/// fn main() {
///     let big = vec![0u8; 1 << 20]; // in the daemon's arena, if one runs
///     println!("shared: {}", xalloc_global::is_shared(big.as_ptr()));
/// }
/// ```
pub struct XallocGlobal {
    config: Config,
}

/// What both faces of the client ([`XallocGlobal`] and
/// [`XallocMalloc`](crate::malloc::XallocMalloc)) are configured with: the threshold and the
/// instance, each overridden by the environment.
pub(crate) struct Config {
    threshold: usize,
    name: &'static str,
    /// The threshold in effect (after `XALLOC_THRESHOLD`); 0 until first read.
    effective: AtomicUsize,
}

impl Config {
    pub(crate) const fn new() -> Self {
        Self {
            threshold: DEFAULT_THRESHOLD,
            name: DEFAULT_NAME,
            effective: AtomicUsize::new(0),
        }
    }

    pub(crate) const fn with_threshold(mut self, bytes: usize) -> Self {
        self.threshold = if bytes == 0 { 1 } else { bytes };
        self
    }

    pub(crate) const fn with_name(mut self, name: &'static str) -> Self {
        self.name = name;
        self
    }

    /// The threshold in effect: the configured one, or `XALLOC_THRESHOLD` if set.
    #[inline]
    pub(crate) fn threshold(&self) -> usize {
        let t = self.effective.load(Ordering::Relaxed);
        if t != 0 {
            return t;
        }
        self.read_threshold()
    }

    #[cold]
    #[inline(never)]
    fn read_threshold(&self) -> usize {
        // The first use of the allocator: its instance is the process's, for the share API.
        CONFIGURED_NAME.note(self.name);
        let t = env_usize(c"XALLOC_THRESHOLD")
            .filter(|&t| t > 0)
            .unwrap_or(self.threshold);
        self.effective.store(t, Ordering::Relaxed);
        t
    }

    /// An arena block of `layout` from the daemon, or `None` (counted as a fallback).
    pub(crate) fn arena_alloc(&self, layout: Layout, zeroed: bool) -> Option<NonNull<u8>> {
        let p = STATE.arena_alloc(self.name, layout, zeroed);
        if p.is_none() {
            STATE.fallbacks.fetch_add(1, Ordering::Relaxed);
        }
        p
    }
}

impl Default for XallocGlobal {
    fn default() -> Self {
        Self::new()
    }
}

impl XallocGlobal {
    /// Threshold 256 KiB, instance `xalloc`; the environment (`XALLOC_THRESHOLD`,
    /// `XALLOC_NAME`) overrides both.
    pub const fn new() -> Self {
        Self {
            config: Config::new(),
        }
    }

    /// Forwards requests of at least `bytes` (at least 1; `XALLOC_THRESHOLD` overrides).
    pub const fn with_threshold(self, bytes: usize) -> Self {
        Self {
            config: self.config.with_threshold(bytes),
        }
    }

    /// Talks to the daemon instance `name` (`XALLOC_NAME` overrides).
    pub const fn with_name(self, name: &'static str) -> Self {
        Self {
            config: self.config.with_name(name),
        }
    }

    /// This process's counters (the same as [`counters`]).
    pub fn counters(&self) -> Counters {
        counters()
    }

    /// The threshold in effect: the configured one, or `XALLOC_THRESHOLD` if set (`4096`,
    /// `64K`, `1M`).
    pub fn threshold(&self) -> usize {
        self.config.threshold()
    }

    fn alloc_impl(&self, layout: Layout, zeroed: bool) -> *mut u8 {
        if layout.size() >= self.threshold() {
            if let Some(p) = self.config.arena_alloc(layout, zeroed) {
                return p.as_ptr();
            }
        }
        // SAFETY: `layout` has a non-zero size (GlobalAlloc's contract, forwarded).
        unsafe {
            if zeroed {
                System.alloc_zeroed(layout)
            } else {
                System.alloc(layout)
            }
        }
    }
}

/// Registers `child` to run in the child after every `fork`.
///
/// Registers [`after_fork_in_child`] once (see `REGISTER_FORK_HANDLER`).
extern "C" fn register_fork_handler() {
    if STATE.atfork.swap(true, Ordering::Relaxed) {
        return;
    }
    // SAFETY: the handler only stores atomics and calls `mmap`, which is async-signal-safe;
    // glibc records it with libc's malloc, not this allocator.
    unsafe { crate::client::at_fork_in_child(after_fork_in_child) };
}

/// Registers the fork handler when the program is loaded (an ELF constructor), before `main`
/// and before the program can fork: `pthread_atfork` takes the lock that `fork` holds while it
/// runs the handlers, so registering from inside the allocator, which a library's own fork
/// handler may reach with its first large allocation, would deadlock.
#[used]
#[link_section = ".init_array"]
static REGISTER_FORK_HANDLER: extern "C" fn() = register_fork_handler;

/// The value of environment variable `key` as a number (`4096`, `64K`, `1M`, `2G`), read
/// without allocating.
fn env_usize(key: &core::ffi::CStr) -> Option<usize> {
    let mut buf = [0u8; 64];
    let s = env_str(key, &mut buf)?;
    let (digits, shift) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 10),
        b'm' | b'M' => (&s[..s.len() - 1], 20),
        b'g' | b'G' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    digits.parse::<usize>().ok()?.checked_mul(1 << shift)
}

/// The value of environment variable `key`, copied into `buf`, if set, valid UTF-8 and short
/// enough.
fn env_str<'b>(key: &core::ffi::CStr, buf: &'b mut [u8]) -> Option<&'b str> {
    extern "C" {
        fn getenv(name: *const core::ffi::c_char) -> *const core::ffi::c_char;
    }
    // SAFETY: `key` is NUL-terminated; getenv returns null or a NUL-terminated string that
    // stays valid until the environment changes, and it is copied at once.
    let v = unsafe { getenv(key.as_ptr()) };
    if v.is_null() {
        return None;
    }
    // SAFETY: non-null result of getenv, NUL-terminated.
    let bytes = unsafe { core::ffi::CStr::from_ptr(v) }.to_bytes();
    let dst = buf.get_mut(..bytes.len())?;
    dst.copy_from_slice(bytes);
    core::str::from_utf8(dst).ok().filter(|s| !s.is_empty())
}

// SAFETY: every method returns memory from `System` under the caller's layout, or an arena
// block of at least `layout.size()` bytes at `layout.align()` that no one else holds (the daemon
// hands each block out once, and its arena stays mapped while the program holds it: see
// `State`'s invariants); `dealloc` and `realloc` route each pointer back to where it came from:
// arena blocks are at least the threshold long and lie inside a connection's mapping, system
// blocks never do.
unsafe impl GlobalAlloc for XallocGlobal {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.alloc_impl(layout, false)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        self.alloc_impl(layout, true)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if layout.size() >= self.threshold() {
            if let Some(c) = STATE.conn_of(ptr.addr()) {
                STATE.free_block(c, ptr);
                return;
            }
        }
        // SAFETY: not an arena block, so `System` allocated it with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let threshold = self.threshold();
        // SAFETY: GlobalAlloc's contract: `new_size`, rounded up to `layout.align()`, does not
        // overflow `isize`.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        let in_arena = if layout.size() >= threshold {
            STATE.conn_of(ptr.addr())
        } else {
            None
        };
        let move_to = |new: *mut u8| {
            if !new.is_null() {
                // SAFETY: `ptr` holds `layout.size()` bytes and `new` at least `new_size`;
                // they are different blocks. Then the old block is freed once.
                unsafe {
                    ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                    self.dealloc(ptr, layout);
                }
            }
            new
        };
        match in_arena {
            Some(c) => {
                if new_size >= threshold && STATE.arena_resize(&c, ptr, layout.size(), new_size) {
                    return ptr;
                }
                // Moves: to another arena block, or to the system below the threshold.
                move_to(self.alloc_impl(new_layout, false))
            }
            None => {
                if new_size >= threshold && layout.size() < threshold {
                    // Crosses the threshold upwards: into the arena if the daemon serves.
                    if let Some(p) = self.config.arena_alloc(new_layout, false) {
                        return move_to(p.as_ptr());
                    }
                }
                // SAFETY: a system block of `layout`; the caller's contract for `new_size`.
                unsafe { System.realloc(ptr, layout, new_size) }
            }
        }
    }
}
