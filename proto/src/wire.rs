//! What the daemon and a client exchange: the handshake on the instance socket, and the layout
//! of the shared memory they exchange requests through: plain `#[repr(C)]` data and atomics, no
//! OS calls, so that the daemon and the client cannot disagree about it and the protocol can be
//! model-checked (`--cfg loom`).
//!
//! # Objects
//!
//! | object | who can write it | layout |
//! | --- | --- | --- |
//! | `/dev/shm/NAME.socket` | (a Unix socket) | [`Hello`] from the client, [`Welcome`] and three descriptors back, then one [`WAKE`] byte per wake-up |
//! | request channel (memfd, one per client) | that client and the daemon | [`SegmentHeader`], [`ClientBell`], `slot_count` × [`RequestSlot`], one [`Ledger`] |
//! | response channel (memfd, one per client) | the daemon only (the client gets a read-only descriptor) | [`SegmentHeader`], [`DaemonBell`], `slot_count` × [`ResponseSlot`] |
//! | arena (memfd, one per instance) | every client (their blocks) | [`SegmentHeader`] in the first [`ARENA_DATA_OFFSET`] bytes, then the data |
//! | `/dev/shm/NAME.state` | the daemon only | [`SegmentHeader`], one [`OwnerEntry`] per granule of arena data |
//!
//! The memfds are sealed against shrinking and growing before they are handed out, so no client
//! can truncate what another process maps. A client's channel is its own: no other client maps
//! it, so whatever a client writes there can only change what it asks for itself. The daemon
//! trusts nothing in a request channel (it validates every request) and never reads back a
//! header it wrote there.
//!
//! Every part is 64-byte aligned and a multiple of 64 bytes long, so two slots never share a
//! cache line.
//!
//! # A request's life
//!
//! A thread of the client *owns* a slot of its channel after claiming it
//! ([`RequestSlot::try_claim`]; the daemon ignores `owner`: it serves every slot of the channel
//! for the client the kernel identified when it connected). Then, per request:
//!
//! 1. the client writes the fields, bumps `seq` and sets `state` to [`PENDING`]
//!    ([`RequestSlot::submit`]), then rings its [`ClientBell`] ([`ClientBell::ring`]), which
//!    says whether the daemon watches this channel; if not, the client sends one [`WAKE`] byte on
//!    its socket;
//! 2. the daemon sees `rings` move, finds [`PENDING`], snapshots the request and sets `state`
//!    back to [`IDLE`] ([`RequestSlot::take`]): from then on the slot is the client's again, and
//!    a client that scribbles on it can only change what it asks next;
//! 3. the daemon validates and executes the snapshot, publishes the answer under the request's
//!    `seq` ([`ResponseSlot::publish`]) and wakes the client's futex if the client said it
//!    sleeps ([`RequestSlot::waiting`]);
//! 4. the client sees its `seq` in the response ([`ResponseSlot::read`]) and reads the answer.
//!
//! # Wake-ups
//!
//! Both waits use the same handshake: the waiter announces itself (the client's `waiting`; the
//! daemon's `watching` cleared, i.e. "wake me"), issues a `SeqCst` fence and checks once more for
//! work; the other side publishes its work, issues a `SeqCst` fence and loads the announcement.
//! Between two `SeqCst` fences one side always sees the other's store, so no wake-up is lost
//! (`proto/tests/loom_wire.rs` model-checks this with loom, which models fences exactly but
//! treats `SeqCst` loads and stores as acquire/release).
//!
//! No word that several clients can write decides whether a request is seen: each client's
//! `rings` and `watching` live in its own channel, so a client that lies in them (never rings,
//! or never sends its wake byte) delays only its own requests.
//!
//! Every field is an atomic, so a client writing concurrently with the daemon's read is not a
//! data race in the daemon: it sees some value, which it validates like any other.

use crate::sync::{fence, AtomicU32, AtomicU64, Ordering};

/// Version of this layout. Bumped on any incompatible change.
pub const VERSION: u32 = 7;

/// Magic numbers at the start of each segment (ASCII `XALLOC` and a kind letter).
pub const MAGIC: [u64; 4] = [
    u64::from_le_bytes(*b"XALLOCQ\x01"),
    u64::from_le_bytes(*b"XALLOCR\x01"),
    u64::from_le_bytes(*b"XALLOCA\x01"),
    u64::from_le_bytes(*b"XALLOCS\x01"),
];

/// Magic number at the start of a [`Hello`] and a [`Welcome`] (ASCII `XALLOCH` and 1).
pub const HELLO_MAGIC: u64 = u64::from_le_bytes(*b"XALLOCH\x01");

/// A huge page (PMD size on x86-64 and arm64 with 4 KiB pages).
pub const HUGE_PAGE: usize = 2 << 20;

/// Where the arena's data starts. The header takes the first page; the rest of the first huge
/// page is never touched (a hole in the object, no memory), so that data offsets are
/// huge-page-aligned in the file as well as in every mapping, which the kernel needs before it
/// backs shared memory with huge pages.
pub const ARENA_DATA_OFFSET: usize = HUGE_PAGE;

/// The part of the arena segment before the data that is ever written: its header page.
pub const ARENA_HEADER_LEN: usize = 4096;

bitflags::bitflags! {
    /// [`SegmentHeader::flags`]: how the daemon set the instance up.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct HeaderFlags: u32 {
        /// The daemon asked for huge pages on the arena (`xallocd start --huge-pages`); clients
        /// advise their mapping the same way.
        const HUGE_PAGES = 1;
    }
}

/// [`HeaderFlags::HUGE_PAGES`] as the header's word holds it.
pub const HEADER_FLAG_HUGE_PAGES: u32 = HeaderFlags::HUGE_PAGES.bits();

/// Which segment a header describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum SegmentKind {
    /// A client's request channel.
    Request = 0,
    /// A client's response channel.
    Response = 1,
    /// The arena.
    Arena = 2,
    /// `/NAME.state`: the daemon's own record of who owns which block, so that a daemon
    /// restarted after a crash can re-attach to the arena. Only the daemon maps it.
    State = 3,
}

impl SegmentKind {
    /// A short name for messages: `request`, `response`, `arena` or `state`.
    pub const fn suffix(self) -> &'static str {
        match self {
            Self::Request => "request",
            Self::Response => "response",
            Self::Arena => "arena",
            Self::State => "state",
        }
    }
}

impl core::fmt::Display for SegmentKind {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{} segment", self.suffix())
    }
}

/// The first 64 bytes of every segment. Written once by the daemon before it announces the
/// segment; read by attachers with [`SegmentHeader::load`] and checked with
/// [`SegmentHeader::check`].
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    /// [`MAGIC`]`[kind]`.
    pub magic: u64,
    /// [`VERSION`].
    pub version: u32,
    /// [`SegmentKind`] as `u32`.
    pub kind: u32,
    /// Size of this header (64).
    pub header_size: u32,
    /// Size of one slot (64), 0 for the arena.
    pub slot_size: u32,
    /// Number of slots in the request and response segments.
    pub slot_count: u32,
    /// Allocation granule of the arena, in bytes.
    pub granule: u32,
    /// Total length of the arena segment, in bytes.
    pub arena_len: u64,
    /// Identifies one daemon instance: a client that finds it changed knows its blocks are gone.
    pub generation: u64,
    /// The daemon's process id.
    pub daemon_pid: u32,
    /// `HEADER_FLAG_*` bits: how the daemon set the instance up (0 unless it says otherwise).
    pub flags: u32,
}

/// Words in a [`SegmentHeader`].
const HEADER_WORDS: usize = 8;

/// Half `i` (0: the lower addressed) of word `w`'s bytes in memory order.
fn half(w: u64, i: usize) -> [u8; 4] {
    let b = w.to_ne_bytes();
    [b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]
}

/// A [`SegmentHeader`]'s place in shared memory, as the atomic words that
/// [`SegmentHeader::load`] and [`SegmentHeader::store`] read and write: every process sees the
/// header of a segment another process may be rewriting (a daemon that re-attaches rewrites
/// them), so it is never read or written as plain memory.
#[repr(C, align(64))]
#[derive(Debug)]
pub struct HeaderWords(pub [AtomicU64; HEADER_WORDS]);

impl HeaderWords {
    /// All zero, as in a fresh segment.
    pub fn new() -> Self {
        Self(core::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl Default for HeaderWords {
    fn default() -> Self {
        Self::new()
    }
}

/// Why a segment cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayoutError {
    /// The magic number is not ours: not an xalloc segment, or another kind.
    BadMagic,
    /// Made by an incompatible version of xalloc.
    BadVersion(u32),
    /// Header or slot size differ from this build's.
    BadSizes,
    /// The segment is shorter than its header says it must be.
    TooShort {
        /// Bytes needed.
        needed: usize,
        /// Bytes there.
        actual: usize,
    },
}

impl core::fmt::Display for LayoutError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::BadMagic => f.write_str("not an xalloc segment of the expected kind"),
            Self::BadVersion(v) => write!(f, "segment layout version {v}, expected {VERSION}"),
            Self::BadSizes => f.write_str("segment header or slot size differ from this build's"),
            Self::TooShort { needed, actual } => {
                write!(f, "segment is {actual} bytes, its header needs {needed}")
            }
        }
    }
}

impl core::error::Error for LayoutError {}

impl SegmentHeader {
    /// The header of a segment of `kind` with `slot_count` slots for an arena of `arena_len`
    /// bytes in granules of `granule`.
    pub const fn new(
        kind: SegmentKind,
        slot_count: u32,
        granule: u32,
        arena_len: u64,
        generation: u64,
        daemon_pid: u32,
    ) -> Self {
        Self {
            magic: MAGIC[kind as usize],
            version: VERSION,
            kind: kind as u32,
            header_size: size_of::<Self>() as u32,
            slot_size: match kind {
                SegmentKind::Request => size_of::<RequestSlot>() as u32,
                SegmentKind::Response => size_of::<ResponseSlot>() as u32,
                SegmentKind::Arena => 0,
                SegmentKind::State => size_of::<OwnerEntry>() as u32,
            },
            slot_count,
            granule,
            arena_len,
            generation,
            daemon_pid,
            flags: 0,
        }
    }

    /// The same header with [`flags`](Self::flags) set to `flags`.
    pub const fn with_flags(mut self, flags: u32) -> Self {
        self.flags = flags;
        self
    }

    /// Reads a header from shared memory that other processes may be writing, as atomic words.
    ///
    /// Headers change only when a daemon re-attaches (it rewrites `generation` and `daemon_pid`
    /// once), so the words are read until two readings in a row agree: a reading that mixes the
    /// old header with the new one is not returned unless the header keeps changing for 64
    /// readings, which no daemon does (and whatever is returned is still checked like any
    /// header: [`check`](Self::check), [`same_instance`](Self::same_instance)).
    pub fn load(at: &HeaderWords) -> Self {
        let mut last = Self::load_once(at);
        for _ in 0..64 {
            let again = Self::load_once(at);
            if again == last {
                break;
            }
            last = again;
        }
        last
    }

    /// One reading of the header's words.
    fn load_once(at: &HeaderWords) -> Self {
        let w: [u64; HEADER_WORDS] = core::array::from_fn(|i| at.0[i].load(Ordering::Acquire));
        let lo = |w: u64| u32::from_ne_bytes(half(w, 0));
        let hi = |w: u64| u32::from_ne_bytes(half(w, 1));
        Self {
            magic: w[0],
            version: lo(w[1]),
            kind: hi(w[1]),
            header_size: lo(w[2]),
            slot_size: hi(w[2]),
            slot_count: lo(w[3]),
            granule: hi(w[3]),
            arena_len: w[4],
            generation: w[5],
            daemon_pid: lo(w[6]),
            flags: hi(w[6]),
        }
    }

    /// Writes this header into shared memory, one atomic word at a time, in the byte layout of
    /// the `#[repr(C)]` struct (the padding word reads 0).
    pub fn store(&self, at: &HeaderWords) {
        let pair = |a: u32, b: u32| {
            let (a, b) = (a.to_ne_bytes(), b.to_ne_bytes());
            u64::from_ne_bytes([a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3]])
        };
        let w = [
            self.magic,
            pair(self.version, self.kind),
            pair(self.header_size, self.slot_size),
            pair(self.slot_count, self.granule),
            self.arena_len,
            self.generation,
            pair(self.daemon_pid, self.flags),
            0,
        ];
        for (slot, v) in at.0.iter().zip(w) {
            slot.store(v, Ordering::Release);
        }
    }

    /// Whether `other` describes a segment of the same daemon instance (generation, pid,
    /// slot count, arena length, granule): the headers of one instance's segments all agree.
    pub fn same_instance(&self, other: &Self) -> bool {
        self.generation == other.generation
            && self.daemon_pid == other.daemon_pid
            && self.slot_count == other.slot_count
            && self.arena_len == other.arena_len
            && self.granule == other.granule
    }

    /// Checks that this header describes a segment of `kind`, of this build's layout, that fits
    /// in `segment_len` bytes.
    pub fn check(&self, kind: SegmentKind, segment_len: usize) -> Result<(), LayoutError> {
        if self.magic != MAGIC[kind as usize] || self.kind != kind as u32 {
            return Err(LayoutError::BadMagic);
        }
        if self.version != VERSION {
            return Err(LayoutError::BadVersion(self.version));
        }
        let expected = Self::new(
            kind,
            self.slot_count,
            self.granule,
            self.arena_len,
            self.generation,
            self.daemon_pid,
        );
        let data_too_short =
            kind == SegmentKind::Arena && self.arena_len <= ARENA_DATA_OFFSET as u64;
        if *self != expected.with_flags(self.flags) || data_too_short {
            return Err(LayoutError::BadSizes);
        }
        let needed = match kind {
            SegmentKind::Request => request_channel_len(self.slot_count),
            SegmentKind::Response => response_channel_len(self.slot_count),
            SegmentKind::Arena => usize::try_from(self.arena_len).unwrap_or(usize::MAX),
            SegmentKind::State => state_segment_len(self.arena_len, self.granule),
        };
        if segment_len < needed {
            return Err(LayoutError::TooShort {
                needed,
                actual: segment_len,
            });
        }
        Ok(())
    }
}

/// The client's side of its channel's wake-ups, right after the request channel's header.
/// Written by the client; the daemon only reads it (a client that lies here delays only
/// itself).
#[repr(C, align(64))]
#[derive(Debug)]
pub struct ClientBell {
    /// Bumped by the client after every [`RequestSlot::submit`] and every released block put in
    /// its [`Ledger`]: the daemon looks at the channel's slots only when it moved.
    pub rings: AtomicU32,
    /// One more than the highest slot index the client has used: the daemon scans slots below
    /// it only (and never beyond the channel's slot count, whatever it says). Raised by the
    /// client ([`ClientBell::note_claim`]) before its first request in a slot.
    pub slots_hi: AtomicU32,
    _pad: [AtomicU32; 14],
}

impl ClientBell {
    /// A silent bell (all zero, as in a fresh channel).
    pub fn new() -> Self {
        Self {
            rings: AtomicU32::new(0),
            slots_hi: AtomicU32::new(0),
            _pad: core::array::from_fn(|_| AtomicU32::new(0)),
        }
    }

    /// Client side, after claiming slot `index` and before submitting in it: makes sure the
    /// daemon scans that far.
    pub fn note_claim(&self, index: u32) {
        self.slots_hi
            .fetch_max(index.saturating_add(1), Ordering::Release);
    }

    /// Client side, after [`RequestSlot::submit`] (or after putting a released block in the
    /// ledger): rings, and returns whether the daemon must be woken (one [`WAKE`] byte on the
    /// client's socket) because it does not watch this channel.
    pub fn ring(&self, daemon: &DaemonBell) -> bool {
        self.rings.fetch_add(1, Ordering::Release);
        fence(Ordering::SeqCst);
        daemon.watching.load(Ordering::Relaxed) == 0
    }
}

impl Default for ClientBell {
    fn default() -> Self {
        Self::new()
    }
}

/// The daemon's side of a channel's wake-ups and its hints to the client, right after the
/// response channel's header. Written by the daemon only.
#[repr(C, align(64))]
#[derive(Debug)]
pub struct DaemonBell {
    /// 1 while the daemon polls this channel's `rings` (it served it lately and is awake): the
    /// client then needs no wake-up. 0 when the daemon must be woken.
    pub watching: AtomicU32,
    /// [`STATE_RUNNING`] or [`STATE_STOPPING`].
    pub state: AtomicU32,
    /// Bytes of arena data under management (a hint, with `free_bytes`).
    pub arena_bytes: AtomicU64,
    /// Bytes in free blocks when the daemon last answered this client (a hint, for clients that
    /// keep freed blocks to give them back when the arena runs low).
    pub free_bytes: AtomicU64,
    _pad: [AtomicU64; 5],
}

/// [`DaemonBell::state`]: serving requests.
pub const STATE_RUNNING: u32 = 1;
/// [`DaemonBell::state`]: shutting down; new requests get [`Status::ShuttingDown`].
pub const STATE_STOPPING: u32 = 2;

impl DaemonBell {
    /// A bell that asks to be woken (all zero, as in a fresh channel).
    pub fn new() -> Self {
        Self {
            watching: AtomicU32::new(0),
            state: AtomicU32::new(0),
            arena_bytes: AtomicU64::new(0),
            free_bytes: AtomicU64::new(0),
            _pad: core::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    /// Daemon side: starts watching the channel (its `rings` is polled from now on; the client
    /// stops sending wake-ups).
    pub fn watch(&self) {
        self.watching.store(1, Ordering::Relaxed);
    }

    /// Daemon side: stops watching the channel, and returns its `rings` read after the
    /// handshake's fence: if it differs from the last value the daemon served, a request
    /// arrived that no wake-up announces, and the daemon must look at the channel once more.
    pub fn unwatch(&self, client: &ClientBell) -> u32 {
        self.watching.store(0, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        client.rings.load(Ordering::Acquire)
    }

    /// Client side: whether the arena is low on free room (under an eighth free), as of the
    /// daemon's last answer to this client.
    pub fn arena_is_low(&self) -> bool {
        let free = self.free_bytes.load(Ordering::Relaxed);
        let arena = self.arena_bytes.load(Ordering::Relaxed);
        free < arena / 8
    }
}

impl Default for DaemonBell {
    fn default() -> Self {
        Self::new()
    }
}

/// The byte a client sends on its socket to wake the daemon (any byte does; the daemon reads
/// and drops them).
pub const WAKE: u8 = b'!';

/// The byte a client sends on its socket right before it closes it on purpose (the
/// connection is dropped, not lost to the program closing descriptors): the daemon then
/// reclaims at once, without looking at whether the process still maps its channel.
pub const BYE: u8 = b'.';

/// Entries in a [`Ledger`].
pub const LEDGER_ENTRIES: usize = 64;

/// [`Ledger`] entry bit: the block is released (freed by its client, for the daemon to take
/// back); without it the block is cached (kept by its client for reuse).
pub const LEDGER_RELEASED: u64 = 1 << 63;

/// A block named in a [`Ledger`] entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LedgerBlock {
    /// Offset in the arena's data, in granules.
    pub offset: u32,
    /// Length in granules (at least 1).
    pub granules: u32,
    /// Released (for the daemon), or cached (for its client).
    pub released: bool,
}

impl LedgerBlock {
    /// The entry word: offset in bits 0-31, length in bits 32-62, [`LEDGER_RELEASED`]. `None`
    /// if the length is 0 or does not fit in 31 bits.
    pub const fn encode(self) -> Option<u64> {
        if self.granules == 0 || self.granules >= 1 << 31 {
            return None;
        }
        let r = if self.released { LEDGER_RELEASED } else { 0 };
        Some(self.offset as u64 | (self.granules as u64) << 32 | r)
    }

    /// The block an entry word names; `None` for an empty entry (0) or a length of 0.
    pub const fn decode(word: u64) -> Option<Self> {
        let granules = ((word >> 32) & 0x7fff_ffff) as u32;
        if granules == 0 {
            return None;
        }
        Some(Self {
            offset: word as u32,
            granules,
            released: word & LEDGER_RELEASED != 0,
        })
    }
}

/// A client's record of the arena blocks it has freed, at the end of its request channel:
/// blocks *cached* for its own reuse, which the
/// daemon still counts as the client's and may take back when its arena runs low, and blocks
/// *released*, which the client gave up without waiting for an answer and the daemon frees on
/// its next sweep.
///
/// Every entry is one word, changed only by compare-and-swap, so the client and the daemon
/// never both own a block:
///
/// | from | to | by |
/// | --- | --- | --- |
/// | empty | cached or released | the client ([`Ledger::put`]) |
/// | cached | empty | the client ([`Ledger::take`]) or the daemon ([`Ledger::reclaim`]), whoever swaps first |
/// | released | empty | the daemon only, after freeing the block ([`Ledger::sweep`]) |
///
/// The daemon trusts no entry: it frees a block only if its record says the channel's client
/// holds a block at that offset.
#[repr(C, align(64))]
#[derive(Debug)]
pub struct Ledger {
    /// Granules in cached entries (at least their sum: raised before an entry is stored, lowered
    /// after one is removed).
    pub cached_granules: AtomicU64,
    /// Set by the client after it releases a block; cleared by the daemon before it sweeps.
    pub pending: AtomicU32,
    _pad: [AtomicU32; 13],
    /// The entries (0: empty).
    pub entries: [AtomicU64; LEDGER_ENTRIES],
}

impl Ledger {
    /// An empty ledger (all zero, as in a fresh segment).
    pub fn new() -> Self {
        Self {
            cached_granules: AtomicU64::new(0),
            pending: AtomicU32::new(0),
            _pad: core::array::from_fn(|_| AtomicU32::new(0)),
            entries: core::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    /// The entry indexes, starting at the cache line `hint` picks (threads on different CPUs
    /// start on different lines).
    fn order(hint: usize) -> impl Iterator<Item = usize> {
        let start = (hint % (LEDGER_ENTRIES / 8)) * 8;
        (0..LEDGER_ENTRIES).map(move |i| (start + i) % LEDGER_ENTRIES)
    }

    /// Client side: stores `block` in an empty entry; whether there was one.
    pub fn put(&self, block: LedgerBlock, hint: usize) -> bool {
        let Some(word) = block.encode() else {
            return false;
        };
        let cached = if block.released {
            0
        } else {
            u64::from(block.granules)
        };
        self.cached_granules.fetch_add(cached, Ordering::Relaxed);
        for i in Self::order(hint) {
            let e = &self.entries[i];
            if e.load(Ordering::Relaxed) == 0
                && e.compare_exchange(0, word, Ordering::Release, Ordering::Relaxed)
                    .is_ok()
            {
                if block.released {
                    self.pending.store(1, Ordering::Release);
                }
                return true;
            }
        }
        self.cached_granules.fetch_sub(cached, Ordering::Relaxed);
        false
    }

    /// Client side: takes a cached block of `granules` granules whose offset (in granules)
    /// `fits` accepts, such as one aligned as the client needs; returns its offset in granules.
    /// The entry is the client's to write, so the caller checks the offset before use.
    pub fn take(&self, granules: u32, hint: usize, fits: impl Fn(u32) -> bool) -> Option<u32> {
        for i in Self::order(hint) {
            let e = &self.entries[i];
            let word = e.load(Ordering::Relaxed);
            let Some(b) = LedgerBlock::decode(word) else {
                continue;
            };
            if b.released || b.granules != granules || !fits(b.offset) {
                continue;
            }
            if e.compare_exchange(word, 0, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                self.cached_granules
                    .fetch_sub(u64::from(granules), Ordering::Relaxed);
                return Some(b.offset);
            }
        }
        None
    }

    /// Daemon side: calls `free` with every released block, then empties its entry (freed
    /// first: a daemon that dies in between finds the entry again, and its record says the
    /// block is no longer the client's). Returns how many there were.
    pub fn sweep(&self, mut free: impl FnMut(LedgerBlock)) -> usize {
        let mut n = 0;
        for e in &self.entries {
            let word = e.load(Ordering::Acquire);
            if let Some(b) = LedgerBlock::decode(word).filter(|b| b.released) {
                free(b);
                // Only the daemon changes a released entry, so this store loses nothing.
                e.store(0, Ordering::Release);
                n += 1;
            }
        }
        n
    }

    /// Daemon side: takes every cached block away from the client (an entry the client takes
    /// first stays the client's) and calls `free` with each. Returns how many there were.
    pub fn reclaim(&self, mut free: impl FnMut(LedgerBlock)) -> usize {
        let mut n = 0;
        for e in &self.entries {
            let word = e.load(Ordering::Acquire);
            let Some(b) = LedgerBlock::decode(word).filter(|b| !b.released) else {
                continue;
            };
            if e.compare_exchange(word, 0, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                self.cached_granules
                    .fetch_sub(u64::from(b.granules), Ordering::Relaxed);
                free(b);
                n += 1;
            }
        }
        n
    }

    /// Empties the ledger (the daemon, for a channel whose client is gone).
    pub fn clear(&self) {
        for e in &self.entries {
            e.store(0, Ordering::Relaxed);
        }
        self.cached_granules.store(0, Ordering::Relaxed);
        self.pending.store(0, Ordering::Release);
    }
}

impl Default for Ledger {
    fn default() -> Self {
        Self::new()
    }
}

/// A slot's `state`: no request in it.
pub const IDLE: u32 = 0;
/// A slot's `state`: a request waits for the daemon.
pub const PENDING: u32 = 1;

/// What a request asks. (Codes 1 and 2 were the shared request segment's `Hello` and
/// `Goodbye`: a connection now registers a client, and its end unregisters it.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Op {
    /// Allocate `size` bytes at `align` (`flags`: [`FLAG_ZEROED`] asks for zeroed memory).
    Allocate = 3,
    /// Free the block at `offset`.
    Free = 4,
    /// Resize the block at `offset` to `size` bytes, in place only.
    Reallocate = 5,
    /// Share the block at `offset`, which the client owns and has not shared, as `size` bytes
    /// (at most the block's length): the answer carries the share's generation (`tag`) and the
    /// token that opens views of it (`token`). From then on the block is freed only when its
    /// owner and every view are gone ([`Op::Close`]), never by [`Op::Free`].
    Share = 6,
    /// Open a view of the share at `offset` whose generation is `size` and whose view or send
    /// token is `token`: the answer carries the share's offset and length, its generation and
    /// its view token.
    Open = 7,
    /// Drop one reference of the client to the share at `offset` of generation `size`: a view
    /// of it, or, with [`BlockFlags::OWNER`], its ownership.
    Close = 8,
    /// Put the share at `offset` of generation `size`, which the client owns, in transit: the
    /// answer's `token` is the send token that one process may [`Op::Receive`] it with. The
    /// block stays the sender's (its quota, its lifetime) until then.
    Send = 9,
    /// Take ownership of the share at `offset` of generation `size` in transit with send token
    /// `token`: the answer is as for [`Op::Open`].
    Receive = 10,
}

impl Op {
    /// The operation with this code, if any.
    pub const fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            3 => Self::Allocate,
            4 => Self::Free,
            5 => Self::Reallocate,
            6 => Self::Share,
            7 => Self::Open,
            8 => Self::Close,
            9 => Self::Send,
            10 => Self::Receive,
            _ => return None,
        })
    }
}

bitflags::bitflags! {
    /// The flags of a request ([`RequestSlot::flags`]) and of its answer
    /// ([`ResponseSlot::flags`]).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct BlockFlags: u32 {
        /// Request ([`Op::Allocate`] only): the memory must be zero. Answer: the memory is
        /// known to be zero (fresh pages), so the client need not clear it.
        const ZEROED = 1;
        /// Request ([`Op::Close`] only): drop the ownership of the share, not a view of it.
        const OWNER = 2;
    }
}

impl BlockFlags {
    /// The flags a request of `op` may set: `None` if `bits` holds others, which the daemon
    /// refuses ([`Status::BadFlags`]).
    pub const fn for_request(op: Op, bits: u32) -> Option<Self> {
        let allowed = match op {
            Op::Allocate => Self::ZEROED.bits(),
            Op::Close => Self::OWNER.bits(),
            Op::Free | Op::Reallocate | Op::Share | Op::Open | Op::Send | Op::Receive => 0,
        };
        if bits & !allowed != 0 {
            return None;
        }
        Some(Self::from_bits_retain(bits))
    }
}

/// [`BlockFlags::ZEROED`] as a slot's word holds it.
pub const FLAG_ZEROED: u32 = BlockFlags::ZEROED.bits();

/// The answer's status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Status {
    /// Done.
    Ok = 0,
    /// No block of that size is free.
    OutOfMemory = 1,
    /// The size is zero or larger than the arena.
    BadSize = 2,
    /// The alignment is not a power of two, or larger than the daemon serves.
    BadAlign = 3,
    /// The offset is out of range, misaligned, or not the start of a block.
    BadOffset = 4,
    /// The block is already free.
    AlreadyFree = 5,
    /// The block belongs to another client.
    NotOwner = 6,
    /// Not used since channels replaced the shared request segment (code kept so that codes
    /// never change meaning).
    BadSlot = 7,
    /// The operation code is unknown.
    UnknownOp = 8,
    /// The block cannot be resized in place.
    NotInPlace = 9,
    /// The daemon is shutting down.
    ShuttingDown = 10,
    /// The request sets flag bits its operation does not define.
    BadFlags = 11,
    /// The allocation would take the client's process or user over its quota
    /// (`xallocd start --client-quota`, `--user-quota`).
    OverQuota = 12,
    /// The block is shared: it is freed when its owner and every view are gone, not by a free,
    /// and never resized; or it is shared already.
    Shared = 13,
    /// No live share matches the handle (made up, mutated, of a block freed since, or already
    /// received), or the client holds no such reference.
    NoSuchShare = 14,
    /// The daemon's table of shares or views is full, or the client (or its user) has as many
    /// shares or views as one may ([`MAX_SHARES_PER_CLIENT`], [`MAX_SHARES_PER_USER`],
    /// [`MAX_VIEWS_PER_CLIENT`], [`MAX_VIEW_REFS_PER_USER`]).
    TooManyShares = 15,
}

impl Status {
    /// The status with this code; unknown codes read as `None`.
    pub const fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            0 => Self::Ok,
            1 => Self::OutOfMemory,
            2 => Self::BadSize,
            3 => Self::BadAlign,
            4 => Self::BadOffset,
            5 => Self::AlreadyFree,
            6 => Self::NotOwner,
            7 => Self::BadSlot,
            8 => Self::UnknownOp,
            9 => Self::NotInPlace,
            10 => Self::ShuttingDown,
            11 => Self::BadFlags,
            12 => Self::OverQuota,
            13 => Self::Shared,
            14 => Self::NoSuchShare,
            15 => Self::TooManyShares,
            _ => return None,
        })
    }
}

/// A request as the daemon took it: plain values, to be validated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Request {
    /// Sequence number the answer must carry.
    pub seq: u32,
    /// [`Op`] code, unchecked.
    pub op: u32,
    /// Flags, unchecked.
    pub flags: u32,
    /// The client's CPU (a hint).
    pub cpu: u32,
    /// Size in bytes.
    pub size: u64,
    /// Alignment in bytes.
    pub align: u64,
    /// Offset of a block in the arena's data; for [`Op::Allocate`], the client's view of the
    /// arena (see [`RequestSlot::offset`]).
    pub offset: u64,
    /// [`Op::Open`], [`Op::Receive`]: the share's token.
    pub token: u64,
}

/// One client's request slot in the request segment.
#[repr(C, align(64))]
#[derive(Debug)]
pub struct RequestSlot {
    /// Which thread of the client uses the slot (any non-zero value the client picks); 0 when
    /// the slot is free. The client's own bookkeeping: the daemon ignores it.
    pub owner: AtomicU32,
    /// [`IDLE`] or [`PENDING`].
    pub state: AtomicU32,
    /// Sequence number of the latest request, bumped by the owner.
    pub seq: AtomicU32,
    /// 1 while the owner is asleep (or about to be) waiting for the answer.
    pub waiting: AtomicU32,
    /// [`Op`] code.
    pub op: AtomicU32,
    /// Request flags.
    pub flags: AtomicU32,
    /// The CPU the client ran on when it submitted: a hint, so that the daemon does not spin
    /// while the client waits for the same CPU.
    pub cpu: AtomicU32,
    /// Size in bytes.
    pub size: AtomicU64,
    /// Alignment in bytes.
    pub align: AtomicU64,
    /// [`Op::Free`], [`Op::Reallocate`]: offset of a block in the arena's data.
    /// [`Op::Allocate`]: the client's address of the arena's data modulo [`MAX_ALIGN`], so
    /// that the block is aligned where the client sees it (the daemon's own mapping of the
    /// arena is at another address, aligned only to [`HUGE_PAGE`]); 0 aligns the offset itself.
    pub offset: AtomicU64,
    /// [`Op::Open`], [`Op::Receive`]: the share's token.
    pub token: AtomicU64,
}

impl RequestSlot {
    /// A free slot (all zero, as in a fresh segment).
    pub fn new() -> Self {
        Self {
            owner: AtomicU32::new(0),
            state: AtomicU32::new(IDLE),
            seq: AtomicU32::new(0),
            waiting: AtomicU32::new(0),
            op: AtomicU32::new(0),
            flags: AtomicU32::new(0),
            cpu: AtomicU32::new(0),
            size: AtomicU64::new(0),
            align: AtomicU64::new(0),
            offset: AtomicU64::new(0),
            token: AtomicU64::new(0),
        }
    }

    /// Client side: takes the slot for `owner` (non-zero) if it is free.
    pub fn try_claim(&self, owner: u32) -> bool {
        owner != 0
            && self
                .owner
                .compare_exchange(0, owner, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
    }

    /// Client side: frees the slot if `owner` holds it (with no request in flight).
    pub fn release(&self, owner: u32) -> bool {
        self.owner
            .compare_exchange(owner, 0, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    }

    /// Client side, on an owned idle slot: writes a request and marks it pending. Returns the
    /// sequence number its answer will carry. Ring the [`ClientBell`] next.
    pub fn submit(&self, op: Op, flags: u32, size: u64, align: u64, offset: u64) -> u32 {
        self.submit_with_token(op, flags, size, align, offset, 0)
    }

    /// [`RequestSlot::submit`] with a share's token ([`Op::Open`], [`Op::Receive`]).
    pub fn submit_with_token(
        &self,
        op: Op,
        flags: u32,
        size: u64,
        align: u64,
        offset: u64,
        token: u64,
    ) -> u32 {
        self.token.store(token, Ordering::Relaxed);
        self.op.store(op as u32, Ordering::Relaxed);
        self.flags.store(flags, Ordering::Relaxed);
        self.size.store(size, Ordering::Relaxed);
        self.align.store(align, Ordering::Relaxed);
        self.offset.store(offset, Ordering::Relaxed);
        let seq = self.seq.load(Ordering::Relaxed).wrapping_add(1);
        self.seq.store(seq, Ordering::Relaxed);
        // Publishes the fields above; `ClientBell::ring` supplies the fence of the handshake.
        self.state.store(PENDING, Ordering::Release);
        seq
    }

    /// Daemon side: if a request is pending, snapshots it and marks the slot idle again.
    pub fn take(&self) -> Option<Request> {
        if self.state.load(Ordering::Acquire) != PENDING {
            return None;
        }
        let req = Request {
            seq: self.seq.load(Ordering::Relaxed),
            op: self.op.load(Ordering::Relaxed),
            flags: self.flags.load(Ordering::Relaxed),
            cpu: self.cpu.load(Ordering::Relaxed),
            size: self.size.load(Ordering::Relaxed),
            align: self.align.load(Ordering::Relaxed),
            offset: self.offset.load(Ordering::Relaxed),
            token: self.token.load(Ordering::Relaxed),
        };
        // Before the answer is published, so that the owner's next `submit` is never
        // overwritten.
        self.state.store(IDLE, Ordering::Relaxed);
        Some(req)
    }

    /// Client side, before sleeping on the answer: announces the sleep. The client must then
    /// check [`ResponseSlot::read`] once more and sleep (futex wait on the response's `seq`)
    /// only if the answer is not there; [`RequestSlot::woke`] ends the sleep.
    pub fn prepare_sleep(&self) {
        self.waiting.store(1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
    }

    /// Client side, after sleeping or deciding not to.
    pub fn woke(&self) {
        self.waiting.store(0, Ordering::Relaxed);
    }
}

/// An answer as the client read it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Response {
    /// Status code (see [`Status::from_u32`]).
    pub status: u32,
    /// Flags ([`FLAG_ZEROED`]: the block's memory is known to be zero).
    pub flags: u32,
    /// Offset of the block in the arena's data.
    pub offset: u64,
    /// Size of the block in bytes (whole granules); for the share operations, the share's
    /// length.
    pub size: u64,
    /// [`Op::Share`], [`Op::Open`], [`Op::Receive`]: the share's view token; [`Op::Send`]: its
    /// send token.
    pub token: u64,
    /// The share operations: the share's generation.
    pub tag: u64,
}

/// The daemon's answer for one slot, in the response segment.
#[repr(C, align(64))]
#[derive(Debug)]
pub struct ResponseSlot {
    /// Sequence number of the request answered; the owner futex-waits on it.
    pub seq: AtomicU32,
    /// [`Status`] code.
    pub status: AtomicU32,
    /// Response flags.
    pub flags: AtomicU32,
    /// The CPU the daemon answered on: a hint, so that the client does not spin while the
    /// daemon waits for the same CPU.
    pub cpu: AtomicU32,
    /// Offset of the block in the arena's data.
    pub offset: AtomicU64,
    /// Size of the block in bytes.
    pub size: AtomicU64,
    /// See [`Response::token`].
    pub token: AtomicU64,
    /// See [`Response::tag`].
    pub tag: AtomicU64,
}

impl ResponseSlot {
    /// An empty answer slot (all zero, as in a fresh segment).
    pub fn new() -> Self {
        Self {
            seq: AtomicU32::new(0),
            status: AtomicU32::new(0),
            flags: AtomicU32::new(0),
            cpu: AtomicU32::new(0),
            offset: AtomicU64::new(0),
            size: AtomicU64::new(0),
            token: AtomicU64::new(0),
            tag: AtomicU64::new(0),
        }
    }

    /// Daemon side: publishes the answer to request `seq` of `slot`, and returns whether the
    /// owner must be woken (a futex wake on `seq`).
    pub fn publish(&self, slot: &RequestSlot, seq: u32, resp: Response) -> bool {
        self.status.store(resp.status, Ordering::Relaxed);
        self.flags.store(resp.flags, Ordering::Relaxed);
        self.offset.store(resp.offset, Ordering::Relaxed);
        self.size.store(resp.size, Ordering::Relaxed);
        self.token.store(resp.token, Ordering::Relaxed);
        self.tag.store(resp.tag, Ordering::Relaxed);
        // Publishes the fields above, then the handshake's fence.
        self.seq.store(seq, Ordering::Release);
        fence(Ordering::SeqCst);
        slot.waiting.load(Ordering::Relaxed) != 0
    }

    /// Client side: the answer to request `seq`, if it has been published.
    pub fn read(&self, seq: u32) -> Option<Response> {
        if self.seq.load(Ordering::Acquire) != seq {
            return None;
        }
        Some(Response {
            status: self.status.load(Ordering::Relaxed),
            flags: self.flags.load(Ordering::Relaxed),
            offset: self.offset.load(Ordering::Relaxed),
            size: self.size.load(Ordering::Relaxed),
            token: self.token.load(Ordering::Relaxed),
            tag: self.tag.load(Ordering::Relaxed),
        })
    }
}

impl Default for RequestSlot {
    fn default() -> Self {
        Self::new()
    }
}
impl Default for ResponseSlot {
    fn default() -> Self {
        Self::new()
    }
}

/// What a peer wants from the instance socket: the first message it sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum HelloKind {
    /// Become a client: the daemon answers with a [`Welcome`] and, if it accepts, the arena
    /// and a fresh channel. The connection stays open for the client's life: its end (exit,
    /// crash, `exec`) is how the daemon learns that the client is gone.
    Client = 1,
    /// Read the daemon's status: the daemon answers with a JSON document (in one or more
    /// messages) and closes the connection.
    Status = 2,
    /// Give the client's channel [`Hello::client_id`] a new connection: after a daemon crash,
    /// the restarted daemon serves the channels it re-attached to, but their connections died
    /// with the old daemon. The daemon accepts only the process it recorded for that channel,
    /// and only while the channel has no connection; it answers with a [`Welcome`] without
    /// descriptors. From then on the new connection is the client's, as if it had connected.
    Rebind = 3,
}

/// Why a handshake message cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandshakeError {
    /// Too short, or not an xalloc handshake.
    BadMagic,
    /// Made by an incompatible version of xalloc.
    BadVersion(u32),
    /// A field holds a value this build does not know.
    BadField,
}

impl core::fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::BadMagic => f.write_str("not an xalloc handshake"),
            Self::BadVersion(v) => write!(f, "protocol version {v}, expected {VERSION}"),
            Self::BadField => f.write_str("handshake field out of range"),
        }
    }
}

impl core::error::Error for HandshakeError {}

fn word32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn word64(b: &[u8], at: usize) -> u64 {
    u64::from(word32(b, at)) | u64::from(word32(b, at + 4)) << 32
}

/// Checks the magic and version at the start of a handshake message of at least `len` bytes.
fn check_start(b: &[u8], len: usize) -> Result<(), HandshakeError> {
    if b.len() < len || word64(b, 0) != HELLO_MAGIC {
        return Err(HandshakeError::BadMagic);
    }
    match word32(b, 8) {
        VERSION => Ok(()),
        v => Err(HandshakeError::BadVersion(v)),
    }
}

/// A peer's first message on the instance socket: [`HELLO_MAGIC`], [`VERSION`] and what it
/// wants, little-endian, [`Hello::LEN`] bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    /// What the peer wants.
    pub kind: HelloKind,
    /// For [`HelloKind::Rebind`]: the client id of the channel; 0 otherwise.
    pub client_id: u32,
}

impl Hello {
    /// Bytes of an encoded hello.
    pub const LEN: usize = 24;

    /// The message's bytes.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[..8].copy_from_slice(&HELLO_MAGIC.to_le_bytes());
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(self.kind as u32).to_le_bytes());
        b[16..20].copy_from_slice(&self.client_id.to_le_bytes());
        b
    }

    /// Reads a hello; any other bytes are an error.
    pub fn decode(b: &[u8]) -> Result<Self, HandshakeError> {
        check_start(b, Self::LEN)?;
        if b.len() != Self::LEN {
            return Err(HandshakeError::BadField);
        }
        let kind = match word32(b, 12) {
            1 => HelloKind::Client,
            2 => HelloKind::Status,
            3 => HelloKind::Rebind,
            _ => return Err(HandshakeError::BadField),
        };
        Ok(Self {
            kind,
            client_id: word32(b, 16),
        })
    }
}

/// Why the daemon refused a client ([`Welcome::refusal`]); the message says more, in words,
/// after the fixed part.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Refusal {
    /// Accepted.
    None = 0,
    /// The daemon does not serve this user (see `xallocd start --group`).
    NotServed = 1,
    /// The client speaks another protocol version.
    BadVersion = 2,
    /// The daemon cannot take another client now (out of descriptors or memory).
    Busy = 3,
    /// The daemon is shutting down.
    ShuttingDown = 4,
    /// The first message was not a hello.
    BadHello = 5,
}

impl Refusal {
    /// The refusal with this code; unknown codes read as `None`.
    pub const fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            0 => Self::None,
            1 => Self::NotServed,
            2 => Self::BadVersion,
            3 => Self::Busy,
            4 => Self::ShuttingDown,
            5 => Self::BadHello,
            _ => return None,
        })
    }
}

/// The daemon's answer to a client's [`Hello`]: [`Welcome::LEN`] bytes, little-endian, then (on
/// a refusal) the reason in UTF-8. An accepted client receives three descriptors with it, in
/// this order: the arena, its request channel (read-write), its response channel (read-only).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Welcome {
    /// [`Refusal`] code; 0 when accepted.
    pub refusal: u32,
    /// Slots in the client's channel.
    pub slots: u32,
    /// The arena's allocation granule, in bytes.
    pub granule: u32,
    /// `HEADER_FLAG_*` bits of the arena.
    pub flags: u32,
    /// The client's id in this daemon instance: the owner of its blocks in the state record.
    pub client_id: u32,
    /// The daemon's process id.
    pub daemon_pid: u32,
    /// Total length of the arena object, in bytes.
    pub arena_len: u64,
    /// The daemon instance's generation.
    pub generation: u64,
}

impl Welcome {
    /// Bytes of the fixed part.
    pub const LEN: usize = 56;

    /// The fixed part's bytes.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[..8].copy_from_slice(&HELLO_MAGIC.to_le_bytes());
        let words = [
            VERSION,
            self.refusal,
            self.slots,
            self.granule,
            self.flags,
            self.client_id,
            self.daemon_pid,
            0,
        ];
        for (i, w) in words.into_iter().enumerate() {
            b[8 + 4 * i..12 + 4 * i].copy_from_slice(&w.to_le_bytes());
        }
        b[40..48].copy_from_slice(&self.arena_len.to_le_bytes());
        b[48..56].copy_from_slice(&self.generation.to_le_bytes());
        b
    }

    /// Reads the fixed part of a welcome, and the reason that follows it (empty if none, or
    /// not UTF-8).
    pub fn decode(b: &[u8]) -> Result<(Self, &str), HandshakeError> {
        check_start(b, Self::LEN)?;
        let w = Self {
            refusal: word32(b, 12),
            slots: word32(b, 16),
            granule: word32(b, 20),
            flags: word32(b, 24),
            client_id: word32(b, 28),
            daemon_pid: word32(b, 32),
            arena_len: word64(b, 40),
            generation: word64(b, 48),
        };
        let reason = core::str::from_utf8(&b[Self::LEN..]).unwrap_or("");
        Ok((w, reason))
    }
}

/// Types that live in memory shared with other processes, which may write any bytes into it
/// at any time: the only types a shared reference into a mapping is made to
/// ([`Mapping::at`](crate::os::Mapping::at)).
///
/// A type of plain integers is not one: a header is read through [`HeaderWords`].
///
/// ```compile_fail
/// fn shared<T: xalloc_proto::wire::SharedPlain>() {}
/// shared::<xalloc_proto::wire::SegmentHeader>();
/// ```
///
/// # Safety
/// An implementor
/// 1. is `#[repr(C)]` with a layout fixed by [`VERSION`];
/// 2. consists of atomic integers only (padding included), so that a shared reference to it
///    stays sound while other processes write its bytes, and means the same at every address it
///    is mapped to;
/// 3. is valid for every bit pattern, all zeros included (a fresh segment);
/// 4. has no `Drop`, since no process owns it alone.
pub unsafe trait SharedPlain: Sized {}

// SAFETY: 1. `#[repr(C)]`; 2-4. atomic words only, no `Drop`.
unsafe impl SharedPlain for HeaderWords {}
// SAFETY: 1. `#[repr(C)]`; 2-4. atomics of plain integers only (the padding too), no `Drop`.
unsafe impl SharedPlain for ClientBell {}
// SAFETY: as for `ClientBell`.
unsafe impl SharedPlain for DaemonBell {}
// SAFETY: 1. `#[repr(C)]`; 2-4. atomics of plain integers only, no `Drop`.
unsafe impl SharedPlain for RequestSlot {}
// SAFETY: as for `RequestSlot`.
unsafe impl SharedPlain for ResponseSlot {}
// SAFETY: 1. `#[repr(C)]`; 2-4. atomics of plain integers only (the padding too), no `Drop`.
unsafe impl SharedPlain for Ledger {}

/// One granule's entry in the state segment: who owns the block that starts there, and its
/// length. Written by the daemon before it answers a request that changes it, so that the
/// record never lags behind what a client was told.
#[repr(C)]
#[derive(Debug, Default)]
pub struct OwnerEntry {
    /// Client id (see [`Welcome::client_id`]) of the block's owner; 0 if no used block starts
    /// at this granule.
    pub owner: AtomicU32,
    /// Length of the block in granules (meaningful while `owner` is non-zero).
    pub granules: AtomicU32,
}

// SAFETY: 1. `#[repr(C)]`; 2-4. atomics of plain integers only, no `Drop`.
unsafe impl SharedPlain for OwnerEntry {}

/// Granules of arena data in an arena segment of `arena_len` bytes.
pub const fn arena_granules(arena_len: u64, granule: u32) -> usize {
    if granule == 0 || arena_len < ARENA_DATA_OFFSET as u64 {
        return 0;
    }
    ((arena_len - ARENA_DATA_OFFSET as u64) / granule as u64) as usize
}

/// [`OwnerEntry::owner`] of a shared block whose owner is gone while views of it remain: it
/// belongs to no client (no quota pays for it) and is freed with its last view. Never a
/// client id.
pub const ORPHAN: u32 = u32::MAX;

/// Shares an instance holds at once (entries of the state record's share table).
pub const MAX_SHARES: usize = 8192;

/// Distinct (share, client) view references an instance holds at once (entries of the state
/// record's view table); one client opening the same share twice takes one entry.
pub const MAX_VIEW_REFS: usize = 32768;

/// Distinct shares one client may have views of at once.
pub const MAX_VIEWS_PER_CLIENT: usize = 1024;

/// Shares one client may own at once.
pub const MAX_SHARES_PER_CLIENT: usize = 1024;

/// Shares the clients of one user may own at once, together: half the table, so that one
/// user of a `--group` instance cannot take every entry from the others.
pub const MAX_SHARES_PER_USER: usize = MAX_SHARES / 2;

/// View-table entries the clients of one user may hold at once, together (half the table).
pub const MAX_VIEW_REFS_PER_USER: usize = MAX_VIEW_REFS / 2;

/// The state record's share bookkeeping, after the owner entries: the next share generation.
/// Written by the daemon only.
#[repr(C, align(64))]
#[derive(Debug, Default)]
pub struct ShareTableHeader {
    /// The generation the next share gets (a restarted daemon goes on from here, so that a
    /// handle of a block freed before the crash never matches a block shared after it).
    pub next_generation: AtomicU32,
    _pad: [AtomicU32; 15],
}

/// One shared block in the state record (daemon only), so that a daemon restarted after a
/// crash keeps it, its handles and its views. The entry is in use while `granule` is not 0;
/// the daemon writes every other field before it, and erases it first.
#[repr(C)]
#[derive(Debug, Default)]
pub struct ShareEntry {
    /// The block's first granule plus one; 0: the entry is free.
    pub granule: AtomicU32,
    /// The share's generation (see [`Op::Share`]).
    pub generation: AtomicU32,
    /// The share's length in bytes (at most its block's).
    pub len: AtomicU64,
    /// The token that opens views.
    pub token: AtomicU64,
    /// The token one process may receive the block with while it is in transit; 0 otherwise.
    pub send_token: AtomicU64,
    /// 1 once the owner has given the block up while views remain: the client the block is
    /// recorded for still pays for it (until it exits), but owns it no more.
    pub owner_gone: AtomicU32,
    _pad: AtomicU32,
}

/// A client's views of one share in the state record (daemon only). In use while `share` is
/// not 0; written like a [`ShareEntry`].
#[repr(C)]
#[derive(Debug, Default)]
pub struct ViewEntry {
    /// Index of the [`ShareEntry`] plus one; 0: the entry is free.
    pub share: AtomicU32,
    /// The client (its id) that holds the views.
    pub client: AtomicU32,
    /// How many views it holds (opened and not closed).
    pub count: AtomicU32,
    _pad: AtomicU32,
}

// SAFETY: 1. `#[repr(C)]`; 2-4. atomics of plain integers only (the padding too), no `Drop`.
unsafe impl SharedPlain for ShareTableHeader {}
// SAFETY: as for `ShareTableHeader`.
unsafe impl SharedPlain for ShareEntry {}
// SAFETY: as for `ShareTableHeader`.
unsafe impl SharedPlain for ViewEntry {}

/// Offset in the state segment of the [`ShareTableHeader`] (after the owner entries, on a
/// 64-byte boundary); the share entries follow it, then the view entries.
pub const fn share_table_offset(arena_len: u64, granule: u32) -> usize {
    (size_of::<SegmentHeader>()
        + arena_granules(arena_len, granule).saturating_mul(size_of::<OwnerEntry>()))
    .next_multiple_of(64)
}

/// Offset in the state segment of share entry `i` (`i < MAX_SHARES`).
pub const fn share_entry_offset(arena_len: u64, granule: u32, i: usize) -> usize {
    share_table_offset(arena_len, granule)
        + size_of::<ShareTableHeader>()
        + i * size_of::<ShareEntry>()
}

/// Offset in the state segment of view entry `i` (`i < MAX_VIEW_REFS`).
pub const fn view_entry_offset(arena_len: u64, granule: u32, i: usize) -> usize {
    share_entry_offset(arena_len, granule, MAX_SHARES) + i * size_of::<ViewEntry>()
}

/// Bytes of the state segment for an arena segment of `arena_len` bytes.
pub const fn state_segment_len(arena_len: u64, granule: u32) -> usize {
    view_entry_offset(arena_len, granule, MAX_VIEW_REFS)
}

/// Offset of the [`ClientBell`] in a request channel, and of the [`DaemonBell`] in a response
/// channel: right after the header.
pub const BELL_OFFSET: usize = size_of::<SegmentHeader>();

/// Offset of request slot `i` in a request channel.
pub const fn request_slot_offset(i: u32) -> usize {
    BELL_OFFSET + size_of::<ClientBell>() + i as usize * size_of::<RequestSlot>()
}

/// Offset of response slot `i` in a response channel.
pub const fn response_slot_offset(i: u32) -> usize {
    BELL_OFFSET + size_of::<DaemonBell>() + i as usize * size_of::<ResponseSlot>()
}

/// Offset of the [`Ledger`] in a request channel with `slots` slots: after the slots.
pub const fn ledger_offset(slots: u32) -> usize {
    request_slot_offset(slots)
}

/// Bytes of a request channel with `slots` slots.
pub const fn request_channel_len(slots: u32) -> usize {
    ledger_offset(slots) + size_of::<Ledger>()
}

/// Bytes of a response channel with `slots` slots.
pub const fn response_channel_len(slots: u32) -> usize {
    response_slot_offset(slots)
}

/// The largest alignment the daemon serves, in bytes.
pub const MAX_ALIGN: u64 = 1 << 30;

/// The most slots a channel may have (the daemon's `--slots` limit): concurrent requests of one
/// client.
pub const MAX_SLOTS: u32 = 4096;

// The layout is part of the protocol: any change here must bump `VERSION`.
#[cfg(not(loom))]
const _: () = {
    assert!(size_of::<SegmentHeader>() == 64 && align_of::<SegmentHeader>() == 64);
    assert!(size_of::<HeaderWords>() == 64 && align_of::<HeaderWords>() == 64);
    assert!(size_of::<ClientBell>() == 64 && align_of::<ClientBell>() == 64);
    assert!(size_of::<DaemonBell>() == 64 && align_of::<DaemonBell>() == 64);
    assert!(size_of::<RequestSlot>() == 64 && align_of::<RequestSlot>() == 64);
    assert!(size_of::<ResponseSlot>() == 64 && align_of::<ResponseSlot>() == 64);
    assert!(size_of::<OwnerEntry>() == 8);
    assert!(size_of::<ShareTableHeader>() == 64 && align_of::<ShareTableHeader>() == 64);
    assert!(size_of::<ShareEntry>() == 40 && size_of::<ViewEntry>() == 16);
    assert!(size_of::<Ledger>() == 64 + 8 * LEDGER_ENTRIES && align_of::<Ledger>() == 64);
    assert!(
        ARENA_HEADER_LEN >= size_of::<SegmentHeader>() && ARENA_HEADER_LEN <= ARENA_DATA_OFFSET
    );
    assert!(ARENA_DATA_OFFSET.is_multiple_of(HUGE_PAGE));
};

#[cfg(all(test, not(loom)))]
mod tests {
    extern crate std;

    use super::*;
    use std::sync::Arc;
    use std::thread;
    use std::vec::Vec;

    #[test]
    fn header_round_trips_and_rejects_what_is_not_ours() {
        let h = SegmentHeader::new(SegmentKind::Request, 8, 4096, 1 << 30, 7, 42);
        let len = request_channel_len(8);
        assert_eq!(len, 64 + 64 + 8 * 64 + size_of::<Ledger>());
        let words = HeaderWords::new();
        h.store(&words);
        assert_eq!(SegmentHeader::load(&words), h);
        // The words hold the bytes of the `#[repr(C)]` struct: tools that dump a segment read
        // the same fields.
        // SAFETY: both are 64 bytes, and every byte of `words` is initialised.
        let bytes: [u8; 64] = unsafe { core::mem::transmute_copy(&words) };
        // SAFETY: `bytes` holds 64 initialised bytes; a `SegmentHeader` is integers only.
        let plain: SegmentHeader = unsafe { core::mem::transmute(bytes) };
        assert_eq!(plain, h);
        assert_eq!(h.check(SegmentKind::Request, len), Ok(()));
        assert_eq!(
            h.check(SegmentKind::Response, len),
            Err(LayoutError::BadMagic)
        );
        assert_eq!(
            h.check(SegmentKind::Request, len - 1),
            Err(LayoutError::TooShort {
                needed: len,
                actual: len - 1
            })
        );
        let mut old = h;
        old.version = 0;
        assert_eq!(
            old.check(SegmentKind::Request, len),
            Err(LayoutError::BadVersion(0))
        );
        let mut odd = h;
        odd.slot_size = 32;
        assert_eq!(
            odd.check(SegmentKind::Request, len),
            Err(LayoutError::BadSizes)
        );
        let len = ARENA_DATA_OFFSET + (1 << 20);
        let arena = SegmentHeader::new(SegmentKind::Arena, 8, 4096, len as u64, 7, 42)
            .with_flags(HEADER_FLAG_HUGE_PAGES);
        assert_eq!(arena.check(SegmentKind::Arena, len), Ok(()));
        assert!(arena.check(SegmentKind::Arena, len - 1).is_err());
        let no_data =
            SegmentHeader::new(SegmentKind::Arena, 8, 4096, ARENA_DATA_OFFSET as u64, 7, 42);
        assert_eq!(
            no_data.check(SegmentKind::Arena, ARENA_DATA_OFFSET),
            Err(LayoutError::BadSizes)
        );
    }

    /// A header rewritten while another thread reads it (a daemon re-attaching while clients
    /// check their connection) is read word by word, atomically: every word read is one that
    /// was written. Under Miri, a plain read here is a data race.
    #[test]
    fn a_header_read_while_it_is_rewritten_is_made_of_written_words() {
        let a = SegmentHeader::new(SegmentKind::Request, 8, 4096, 1 << 30, 7, 42);
        let b = SegmentHeader::new(SegmentKind::Request, 8, 4096, 1 << 30, 8, 43);
        let words = Arc::new(HeaderWords::new());
        a.store(&words);
        let writer = {
            let words = Arc::clone(&words);
            thread::spawn(move || {
                for i in 0..50 {
                    if i % 2 == 0 { b } else { a }.store(&words);
                }
            })
        };
        for _ in 0..50 {
            let h = SegmentHeader::load(&words);
            assert!(h.generation == 7 || h.generation == 8, "{h:?}");
            assert!(h.daemon_pid == 42 || h.daemon_pid == 43, "{h:?}");
            assert_eq!(
                h.check(SegmentKind::Request, request_channel_len(8)),
                Ok(())
            );
        }
        writer.join().unwrap();
    }

    #[test]
    fn ledger_hands_each_block_to_one_side_only() {
        let b = |offset, granules, released| LedgerBlock {
            offset,
            granules,
            released,
        };
        for block in [b(0, 1, false), b(u32::MAX, (1 << 31) - 1, true)] {
            assert_eq!(LedgerBlock::decode(block.encode().unwrap()), Some(block));
        }
        assert_eq!(b(5, 0, false).encode(), None);
        assert_eq!(b(5, 1 << 31, false).encode(), None);
        assert_eq!(LedgerBlock::decode(0), None);

        let l = Ledger::new();
        assert!(l.put(b(16, 4, false), 3));
        assert!(l.put(b(32, 4, false), 0));
        assert!(l.put(b(64, 2, true), 1));
        assert_eq!(l.cached_granules.load(Ordering::Relaxed), 8);
        assert_eq!(l.pending.load(Ordering::Relaxed), 1);
        assert_eq!(
            l.take(4, 0, |o| o % 32 == 0),
            Some(32),
            "aligned to 32 granules"
        );
        assert_eq!(
            l.take(2, 0, |_| true),
            None,
            "released blocks are not for reuse"
        );
        let mut freed = Vec::new();
        assert_eq!(l.sweep(|b| freed.push(b)), 1);
        assert_eq!(freed, [b(64, 2, true)]);
        assert_eq!(l.reclaim(|b| freed.push(b)), 1);
        assert_eq!(freed[1], b(16, 4, false));
        assert_eq!(l.take(4, 0, |_| true), None, "reclaimed");
        assert_eq!(l.cached_granules.load(Ordering::Relaxed), 0);
        for i in 0..LEDGER_ENTRIES as u32 {
            assert!(l.put(b(i, 1, false), i as usize));
        }
        assert!(!l.put(b(999, 1, false), 0), "full");
        assert_eq!(
            l.cached_granules.load(Ordering::Relaxed),
            LEDGER_ENTRIES as u64
        );
        l.clear();
        assert_eq!(l.take(1, 0, |_| true), None);

        // A client taking while the daemon reclaims: every block goes to exactly one of them.
        for _ in 0..50 {
            let l = Arc::new(Ledger::new());
            for i in 0..LEDGER_ENTRIES as u32 {
                assert!(l.put(b(i, 1, false), 0));
            }
            let client = {
                let l = Arc::clone(&l);
                thread::spawn(move || {
                    let mut got = Vec::new();
                    while let Some(off) = l.take(1, got.len(), |_| true) {
                        got.push(off);
                    }
                    got
                })
            };
            let mut daemon = Vec::new();
            l.reclaim(|b| daemon.push(b.offset));
            let mut all = client.join().unwrap();
            all.extend(daemon);
            all.sort_unstable();
            assert_eq!(all, (0..LEDGER_ENTRIES as u32).collect::<Vec<_>>());
            assert_eq!(l.cached_granules.load(Ordering::Relaxed), 0);
        }
    }

    #[test]
    fn codes_round_trip() {
        for v in 3..=10 {
            assert_eq!(Op::from_u32(v).map(|op| op as u32), Some(v));
        }
        for retired_or_unknown in [0, 1, 2, 11, u32::MAX] {
            assert_eq!(Op::from_u32(retired_or_unknown), None);
        }
        for v in 0..=15 {
            assert_eq!(Status::from_u32(v).map(|s| s as u32), Some(v));
        }
        assert_eq!(Status::from_u32(16), None);
    }

    #[test]
    fn offsets_follow_the_documented_layout() {
        assert_eq!(BELL_OFFSET, 64);
        assert_eq!(request_slot_offset(0), 128);
        assert_eq!(request_slot_offset(3), 128 + 3 * 64);
        assert_eq!(response_slot_offset(0), 128);
        assert_eq!(response_channel_len(4), 128 + 4 * 64);
        assert_eq!(ledger_offset(4), 128 + 4 * 64);
        assert_eq!(request_channel_len(4), 128 + 4 * 64 + 576);
    }

    #[test]
    fn handshakes_round_trip_and_reject_what_is_not_ours() {
        for (kind, client_id) in [
            (HelloKind::Client, 0),
            (HelloKind::Status, 0),
            (HelloKind::Rebind, u32::MAX),
        ] {
            let h = Hello { kind, client_id };
            assert_eq!(Hello::decode(&h.encode()), Ok(h));
        }
        let mut b = Hello {
            kind: HelloKind::Client,
            client_id: 0,
        }
        .encode();
        assert_eq!(
            Hello::decode(&b[..Hello::LEN - 1]),
            Err(HandshakeError::BadMagic)
        );
        assert_eq!(Hello::decode(&[0u8; 24]), Err(HandshakeError::BadMagic));
        b[12] = 9;
        assert_eq!(Hello::decode(&b), Err(HandshakeError::BadField));
        b[8] = 4;
        assert_eq!(Hello::decode(&b), Err(HandshakeError::BadVersion(4)));
        let mut long = [0u8; Hello::LEN + 1];
        long[..Hello::LEN].copy_from_slice(
            &Hello {
                kind: HelloKind::Status,
                client_id: 0,
            }
            .encode(),
        );
        assert_eq!(Hello::decode(&long), Err(HandshakeError::BadField));

        let w = Welcome {
            refusal: Refusal::NotServed as u32,
            slots: 64,
            granule: 4096,
            flags: HEADER_FLAG_HUGE_PAGES,
            client_id: 17,
            daemon_pid: 4242,
            arena_len: 1 << 33,
            generation: u64::MAX - 1,
        };
        let mut msg = w.encode().to_vec();
        assert_eq!(Welcome::decode(&msg), Ok((w, "")));
        msg.extend_from_slice(b"not served");
        assert_eq!(Welcome::decode(&msg), Ok((w, "not served")));
        assert_eq!(
            Welcome::decode(&msg[..Welcome::LEN - 1]),
            Err(HandshakeError::BadMagic)
        );
        for code in 0..6 {
            assert_eq!(Refusal::from_u32(code).map(|r| r as u32), Some(code));
        }
        assert_eq!(Refusal::from_u32(6), None);
    }

    #[test]
    fn one_request_cycle() {
        let (slot, resp) = (RequestSlot::new(), ResponseSlot::new());
        let (bell, daemon) = (ClientBell::new(), DaemonBell::new());
        assert!(!slot.try_claim(0), "owner 0 means free");
        assert!(slot.try_claim(7));
        assert!(!slot.try_claim(8), "already owned");
        assert!(slot.take().is_none(), "nothing pending");
        let seq = slot.submit(Op::Allocate, FLAG_ZEROED, 4096, 64, 0);
        assert!(
            bell.ring(&daemon),
            "an unwatched channel asks for a wake-up"
        );
        daemon.watch();
        assert!(!bell.ring(&daemon), "a watched one does not");
        assert!(resp.read(seq).is_none());
        let req = slot.take().unwrap();
        assert_eq!(
            req,
            Request {
                seq,
                op: Op::Allocate as u32,
                flags: FLAG_ZEROED,
                cpu: 0,
                size: 4096,
                align: 64,
                offset: 0,
                token: 0
            }
        );
        assert!(slot.take().is_none(), "taken once");
        slot.submit_with_token(Op::Open, 0, 7, 0, 4096, u64::MAX);
        let open = slot.take().unwrap();
        assert_eq!((open.size, open.offset, open.token), (7, 4096, u64::MAX));
        slot.submit(Op::Free, 0, 0, 0, 4096);
        assert_eq!(
            slot.take().unwrap().token,
            0,
            "a plain request carries no token"
        );
        let answer = Response {
            status: Status::Ok as u32,
            flags: FLAG_ZEROED,
            offset: 8192,
            size: 4096,
            ..Response::default()
        };
        slot.prepare_sleep();
        assert!(
            resp.publish(&slot, req.seq, answer),
            "the client said it sleeps"
        );
        slot.woke();
        assert_eq!(resp.read(seq), Some(answer));
        assert!(resp.read(seq + 1).is_none());
        let seen = bell.rings.load(Ordering::SeqCst);
        assert_eq!(daemon.unwatch(&bell), seen, "nothing rang since");
        assert!(bell.ring(&daemon), "unwatched again");
        assert_ne!(daemon.unwatch(&bell), seen, "a ring moves the count");
        assert!(!slot.release(8), "only the owner releases");
        assert!(slot.release(7));
        assert!(slot.try_claim(8));
    }

    #[test]
    fn request_flags_are_checked_per_operation() {
        assert_eq!(
            BlockFlags::for_request(Op::Allocate, FLAG_ZEROED),
            Some(BlockFlags::ZEROED)
        );
        assert_eq!(
            BlockFlags::for_request(Op::Allocate, 0),
            Some(BlockFlags::empty())
        );
        assert_eq!(BlockFlags::for_request(Op::Allocate, 2), None);
        assert_eq!(BlockFlags::for_request(Op::Free, FLAG_ZEROED), None);
        assert_eq!(BlockFlags::for_request(Op::Reallocate, u32::MAX), None);
        assert_eq!(
            BlockFlags::for_request(Op::Free, 0),
            Some(BlockFlags::empty())
        );
    }

    #[test]
    fn low_arena_hint() {
        let d = DaemonBell::new();
        d.arena_bytes.store(800, Ordering::Relaxed);
        d.free_bytes.store(100, Ordering::Relaxed);
        assert!(!d.arena_is_low());
        d.free_bytes.store(99, Ordering::Relaxed);
        assert!(d.arena_is_low());
    }

    #[test]
    fn client_and_daemon_threads_agree() {
        let n: u32 = if cfg!(miri) { 50 } else { 20_000 };
        let shared = Arc::new((RequestSlot::new(), ResponseSlot::new(), ClientBell::new()));
        assert!(shared.0.try_claim(1));
        let daemon = {
            let shared = Arc::clone(&shared);
            thread::spawn(move || {
                let (slot, resp, _) = &*shared;
                let mut served = 0;
                while served < n {
                    match slot.take() {
                        Some(req) => {
                            let answer = Response {
                                status: Status::Ok as u32,
                                flags: 0,
                                offset: req.size * 2,
                                size: req.size,
                                ..Response::default()
                            };
                            resp.publish(slot, req.seq, answer);
                            served += 1;
                        }
                        None => thread::yield_now(),
                    }
                }
            })
        };
        let (slot, resp, bell) = &*shared;
        for i in 1..=u64::from(n) {
            let seq = slot.submit(Op::Allocate, 0, i, 16, 0);
            bell.ring(&DaemonBell::new());
            let answer = loop {
                if let Some(a) = resp.read(seq) {
                    break a;
                }
                thread::yield_now();
            };
            assert_eq!((answer.size, answer.offset), (i, 2 * i), "request {i}");
        }
        daemon.join().unwrap();
    }
}
