//! The request loop: the arena's allocator, who owns what, the clients and their channels, and
//! the answer to every request.
//!
//! # State (all private to the daemon, none of it in client-writable memory)
//!
//! - `heap`: an [`OobHeap`] over the arena's data, its metadata in a table on the daemon's heap.
//! - the ownership record, in the daemon's own segment `/NAME.state`: for each granule `g`, the
//!   client id that owns the used block starting at `g` (0 elsewhere) and its length.
//!   Invariant: an entry has an owner iff a used block of that length starts at `g`. Each
//!   request updates it before its answer is published, so that after a crash a new daemon
//!   rebuilds a heap in which no block a client was told it holds is free ([`Server::new`]).
//! - `clients`: per connected client (one connection, one channel), the identity the kernel
//!   gave at connect (`SO_PEERCRED`, a pidfd from `SO_PEERPIDFD`), its socket and pidfd (both
//!   in the epoll set: the client is gone when either fires), its channel, and its counts.
//! - `watched`: the clients whose channels the loop polls without being woken (those served
//!   lately). Every other client wakes the daemon through its socket.
//! - `proc_bytes` / `user_bytes`: bytes held per process and per user, for the quotas.
//! - `reserved` / `dirty`: per 2 MiB chunk of the arena, whether its pages are reserved, and
//!   whether any block overlapping it was ever handed out (if not, its pages are still zero).
//!
//! Requests are validated field by field; a refused request changes nothing but the `errors`
//! counter. The heap's checked entry points (`deallocate_at`, `resize_at`) make a bad offset an
//! error rather than corruption even if this layer had a bug.
//!
//! # The loop
//!
//! One thread does everything: it polls the watched channels, and looks at its epoll set (the
//! listening socket, client sockets and pidfds, a signalfd) every [`POLL_INTERVAL`] while busy
//! or spinning, and blocks on it when idle. Before it blocks it stops watching every channel
//! (the handshake in [`DaemonBell::unwatch`]), so a client's next request comes with a wake-up
//! byte on its socket. A client can only delay itself: nothing one client writes decides
//! whether another's request is seen.

use std::collections::{BTreeSet, HashMap};
use std::ffi::CStr;
use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use xalloc_core::{FreeError, MetaEntry, OobHeap, ResizeError};
use xalloc_proto::os::{self, Fd, FileId, Mapping};
use xalloc_proto::unix::{self, Peer};
use xalloc_proto::wire::{
    self, BlockFlags, ClientBell, DaemonBell, Hello, HelloKind, Ledger, LedgerBlock, Op,
    OwnerEntry, Refusal, Request, RequestSlot, Response, ResponseSlot, SegmentHeader, SegmentKind,
    ShareEntry, ShareTableHeader, Status, ViewEntry, Welcome, ARENA_DATA_OFFSET, BELL_OFFSET,
    MAX_ALIGN, MAX_SHARES, MAX_SHARES_PER_CLIENT, MAX_SHARES_PER_USER, MAX_VIEWS_PER_CLIENT,
    MAX_VIEW_REFS, MAX_VIEW_REFS_PER_USER, ORPHAN,
};

use crate::keeper::{KeeperLink, KeptChannel};
use crate::segments::{Access, Segments};

/// Block granule of the arena: a page, so blocks are page-aligned and reserved page-wise.
pub const GRANULE: usize = 4096;

/// Reservation and zero-tracking unit.
const CHUNK: u64 = 2 << 20;

/// While busy or spinning, how often the loop also looks at its epoll set: new connections,
/// wake-ups from clients it does not watch, exits, signals.
pub const POLL_INTERVAL: Duration = Duration::from_micros(20);

/// A watched client that has sent nothing for this long is no longer watched (its next request
/// comes with a wake-up), so that the loop polls only the channels in use.
const WATCH_IDLE: Duration = Duration::from_millis(2);
/// How often a client whose process lives but whose connection ended is looked at again
/// (an `exec` unmaps its channel; a pidfd reports only exits).
const DETACHED_RECHECK: Duration = Duration::from_secs(1);

/// Pause instructions per check of the watched channels while spinning (about 0.1 µs).
const SPIN_BATCH: u32 = 4;

/// Spin batches between two `sched_yield`s when the last client served runs on another CPU (a
/// safety valve: the hint may be stale). When it ran on the daemon's CPU, every batch yields.
const BATCHES_PER_YIELD: u32 = 1024;

/// Most accepted connections waiting for their first message; beyond, the oldest is closed.
const MAX_PENDING: usize = 1024;

/// Most connections of one user waiting for their first message; beyond, that user's oldest
/// is closed (so that one user cannot push out others' connections).
const PENDING_PER_USER: usize = 64;

/// Status replies sent at once (each by a thread of its own, so that a reader that does not
/// read never holds up the request loop); more status requests are closed unanswered.
const MAX_STATUS_SENDERS: usize = 4;

/// How long a status reply may wait for room in the reader's socket, per message.
const STATUS_SEND_TIMEOUT: Duration = Duration::from_millis(200);

/// Epoll tags: the kind of descriptor in the top byte, a client id or connection token below.
const TAG_LISTENER: u64 = 1 << 56;
const TAG_SIGNAL: u64 = 2 << 56;
const TAG_PENDING: u64 = 3 << 56;
const TAG_SOCKET: u64 = 4 << 56;
const TAG_PIDFD: u64 = 5 << 56;
const TAG_KIND: u64 = 0xff << 56;

/// A client's channel, mapped in the daemon (read-write, both halves).
struct Channel {
    request: Mapping,
    response: Mapping,
    slots: u32,
    /// The request channel's memfd: the client's process maps it until it exits or `exec`s.
    request_id: FileId,
}

impl Channel {
    fn bell(&self) -> &ClientBell {
        // SAFETY: the request channel is `request_channel_len(slots)` long (made or checked by
        // the daemon), which holds the bell at its 64-aligned offset.
        unsafe { self.request.at(BELL_OFFSET) }
    }

    fn daemon_bell(&self) -> &DaemonBell {
        // SAFETY: as above, for the response channel.
        unsafe { self.response.at(BELL_OFFSET) }
    }

    /// Request slot `i` (`i < slots`).
    fn slot(&self, i: u32) -> &RequestSlot {
        assert!(i < self.slots);
        // SAFETY: `i < slots`, and the channel's length covers every slot.
        unsafe { self.request.at(wire::request_slot_offset(i)) }
    }

    /// Response slot `i` (`i < slots`).
    fn answer(&self, i: u32) -> &ResponseSlot {
        assert!(i < self.slots);
        // SAFETY: as for `slot`.
        unsafe { self.response.at(wire::response_slot_offset(i)) }
    }

    fn ledger(&self) -> &Ledger {
        // SAFETY: the ledger ends the request channel, at a 64-aligned offset.
        unsafe { self.request.at(wire::ledger_offset(self.slots)) }
    }
}

/// One client: a connection and its channel.
struct Client {
    pid: u32,
    uid: u32,
    /// `/proc/PID/comm` at connect, for `status --clients`.
    command: String,
    /// `None` for a channel re-attached after a crash until the client rebinds, and for a
    /// client whose program closed its socket ([`Server::hung_up`]).
    sock: Option<Fd>,
    /// When a client whose process lives lost its connection, or was last found still
    /// mapping its channel ([`Server::recheck_detached`]).
    detached: Option<Instant>,
    /// The client's process, as the kernel named it when the client connected (or, after a
    /// restart, as the keeper kept it): in the epoll set, which reports its exit; and the
    /// proof, while it has not exited, that `pid` is still that process.
    pidfd: Fd,
    chan: Arc<Channel>,
    /// `rings` when the channel was last looked at.
    last_rings: u32,
    watched: bool,
    last_request: Instant,
    blocks: u64,
    bytes: u64,
    requests: u64,
    /// The shares (their first granule) this client holds views of.
    viewing: BTreeSet<usize>,
    /// Shares this client owns.
    owned_shares: usize,
    /// Bytes of the shares it views whose owner is gone: charged to each of their viewers
    /// (counted in its process's and user's bytes for the quotas, not in `bytes`).
    orphan_bytes: u64,
}

impl Client {
    /// Bytes the client says it keeps cached: its own counter in its ledger, read saturating,
    /// whatever it says.
    fn cached_bytes(&self) -> u64 {
        self.chan
            .ledger()
            .cached_granules
            .load(Ordering::Relaxed)
            .saturating_mul(GRANULE as u64)
    }

    /// A client of process `pid` and user `uid` over `chan`, holding nothing yet; its channel is
    /// taken as looked at up to now.
    fn new(pid: u32, uid: u32, sock: Option<Fd>, pidfd: Fd, chan: Arc<Channel>) -> Self {
        Self {
            pid,
            uid,
            command: command_of(pid),
            sock,
            detached: None,
            pidfd,
            last_rings: chan.bell().rings.load(Ordering::Acquire),
            chan,
            watched: false,
            last_request: Instant::now(),
            blocks: 0,
            bytes: 0,
            requests: 0,
            viewing: BTreeSet::new(),
            owned_shares: 0,
            orphan_bytes: 0,
        }
    }
}

/// A shared block (see [`Op::Share`]), kept in the state record as a [`ShareEntry`] (its
/// views as [`ViewEntry`]s) so that a restarted daemon keeps it.
#[derive(Debug)]
struct Share {
    /// Its entry in the state record's share table.
    slot: usize,
    generation: u32,
    /// The length shared, at most the block's.
    len: u64,
    /// The block's length.
    bytes: u64,
    token: u64,
    /// While in transit ([`Op::Send`]): the token that receives it; 0 otherwise.
    send_token: u64,
    /// The owning client (it may write, send and give up the block); `None` once the owner
    /// gave it up or is gone, and views remain.
    owner: Option<u32>,
    /// The client that pays for the block (the block is recorded as its): the owner; after
    /// the owner gave the block up, still that client until it is gone (so that a process
    /// cannot keep blocks past its quota by giving them up while it views them); `None`
    /// after that (recorded as [`ORPHAN`]'s), and then each viewer pays.
    payer: Option<u32>,
    /// Per client that holds views: how many, and its entry in the view table.
    views: HashMap<u32, (u32, usize)>,
}

/// Who may connect, and how much each may hold.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    /// The user and group served.
    pub access: Access,
    /// Arena bytes one process may hold (`--client-quota`; `u64::MAX`: unlimited).
    pub client_quota: u64,
    /// Arena bytes one user may hold (`--user-quota`; `u64::MAX`: unlimited).
    pub user_quota: u64,
    /// Connections one user may have at once (`--max-clients-per-user`): what keeps one user
    /// from taking every descriptor the daemon has.
    pub max_clients_per_user: usize,
}

/// The daemon's request server.
pub struct Server {
    seg: Segments,
    heap: OobHeap,
    // The heap's metadata table; `heap` points into it, so it must outlive it (field order).
    _table: Box<[MetaEntry]>,
    clients: HashMap<u32, Client>,
    watched: Vec<u32>,
    /// Accepted connections waiting for their first message, with their peer's uid.
    pending: HashMap<u32, (Fd, u32)>,
    /// A descriptor kept spare, given up to accept (and close) one connection when the
    /// daemon is out of descriptors, so that the listener does not stay readable forever.
    spare: Option<Fd>,
    /// Out of descriptors, logged, and not yet over.
    fds_exhausted: bool,
    /// Status replies being sent by their own threads.
    status_senders: Arc<std::sync::atomic::AtomicUsize>,
    next_token: u32,
    next_id: u32,
    proc_bytes: HashMap<u32, u64>,
    user_bytes: HashMap<u32, u64>,
    /// Shares owned, and view-table entries held, per user.
    user_shares: HashMap<u32, usize>,
    user_views: HashMap<u32, usize>,
    policy: Policy,
    listener: Fd,
    epoll: Fd,
    signals: Fd,
    keeper: Option<KeeperLink>,
    /// A keeper error was logged (once per episode).
    keeper_failed: bool,
    name: String,
    reserved: Vec<bool>,
    /// Pages are reserved through the mapping, with huge-page advice (`--huge-pages`).
    huge_pages: bool,
    dirty: Vec<bool>,
    reserved_bytes: u64,
    /// Per chunk: used blocks that overlap it, and since when it has had none (while it is
    /// reserved), for the decay.
    chunk_used: Vec<u32>,
    chunk_idle_since: Vec<Option<Instant>>,
    /// Reserved bytes kept however long they are idle (`--retain`).
    retain: u64,
    /// How long a chunk beyond `retain` stays reserved while idle (`--decay`).
    decay: Duration,
    requests: u64,
    errors: u64,
    stopping: bool,
    stop_asked: bool,
    started_unix: u64,
    /// Reserving pages failed, and has not succeeded since (logged once per episode).
    shm_full: bool,
    /// More than one CPU is online: spinning can pay off.
    spin: bool,
    /// How long to spin for the next request before sleeping (`--spin-us`).
    spin_budget: Duration,
    /// This process's id.
    pid: u32,
    /// The CPU of the last batch of requests, and whether one of them came from a client on it.
    cpu: u32,
    client_on_my_cpu: bool,
    /// Shared blocks, by first granule.
    shares: HashMap<usize, Share>,
    /// Free entries of the state record's share and view tables.
    free_share_slots: Vec<usize>,
    free_view_slots: Vec<usize>,
    /// One more than the highest entry of each table ever in use (every entry above is free
    /// and zero): how far `check` scans.
    share_slots_hi: usize,
    view_slots_hi: usize,
}

fn answer(status: Status) -> Response {
    Response {
        status: status as u32,
        flags: 0,
        offset: 0,
        size: 0,
        ..Response::default()
    }
}

/// Whether this system gives huge pages to shared mappings that ask for them: `Err` says why
/// not, and what to change.
pub fn huge_pages_allowed() -> Result<(), String> {
    let policy = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
        .unwrap_or_default();
    if policy.contains("[force]")
        || policy.contains("[always]")
        || policy.contains("[advise]")
        || policy.contains("[within_size]")
    {
        return Ok(());
    }
    if policy.contains("[deny]") {
        return Err("shmem huge pages are denied (shmem_enabled is deny)".into());
    }
    Err(
        "shmem huge pages are off (/sys/kernel/mm/transparent_hugepage/shmem_enabled is \
         never); `echo advise > .../shmem_enabled` (as root) allows them"
            .into(),
    )
}

impl Server {
    /// A server over freshly created segments, or over those of a daemon that died
    /// (`seg.reattached`): then the heap is rebuilt from the ownership record, keeping the
    /// blocks and channels (`kept`, from the keeper) of clients that still run. Clients connect
    /// on `listener`; `keeper` is told about every channel so that it outlives a crash.
    pub fn new(
        seg: Segments,
        name: &str,
        listener: Fd,
        keeper: Option<KeeperLink>,
        kept: Vec<KeptChannel>,
        policy: Policy,
    ) -> Result<Self, String> {
        let bytes = usize::try_from(seg.arena_bytes).map_err(|_| "arena too large".to_owned())?;
        let entries = OobHeap::table_entries(bytes, GRANULE);
        let mut table = vec![MetaEntry::default(); entries].into_boxed_slice();
        // SAFETY: 1. the arena's data (`bytes` from ARENA_DATA_OFFSET) lies inside the mapping,
        // which lives in `seg` as long as the heap; the heap never reads or writes it (out of
        // band); 2. `table` is ours, outlives the heap (field order) and is not touched
        // elsewhere; 3. they do not overlap.
        let heap = unsafe {
            OobHeap::new(
                seg.arena.as_ptr().add(ARENA_DATA_OFFSET),
                bytes,
                GRANULE,
                table.as_mut_ptr(),
                table.len(),
            )
        }
        .map_err(|e| format!("arena of {bytes} bytes: {e}"))?;
        let mut heap = heap;
        // Every page of the arena that a block ever reached is memory the system keeps: keep
        // blocks low however empty the arena is.
        heap.set_compact_above(0);
        let chunks = seg.arena_bytes.div_ceil(CHUNK) as usize;
        let started_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let reattached = seg.reattached;
        let huge_pages =
            wire::HeaderFlags::from_bits_retain(seg.flags).contains(wire::HeaderFlags::HUGE_PAGES);
        if huge_pages {
            match seg.arena.advise_huge_pages(ARENA_DATA_OFFSET, bytes) {
                Ok(()) => log::info!("huge pages asked for on the arena"),
                Err(e) => log::warn!("huge pages: madvise(MADV_HUGEPAGE) failed: {e}"),
            }
        }
        let (epoll, signals) = epoll_with_signals().map_err(|e| format!("epoll: {e}"))?;
        epoll_add(&epoll, &listener, TAG_LISTENER, libc::EPOLLIN as u32)
            .map_err(|e| format!("epoll: {e}"))?;
        let mut s = Self {
            seg,
            heap,
            _table: table,
            clients: HashMap::new(),
            watched: Vec::new(),
            pending: HashMap::new(),
            spare: spare_fd(),
            fds_exhausted: false,
            status_senders: Arc::default(),
            next_token: 0,
            next_id: 1,
            proc_bytes: HashMap::new(),
            user_bytes: HashMap::new(),
            user_shares: HashMap::new(),
            user_views: HashMap::new(),
            policy,
            listener,
            epoll,
            signals,
            keeper,
            keeper_failed: false,
            name: name.to_owned(),
            reserved: vec![false; chunks],
            huge_pages,
            // After a restart nothing is known about which pages were handed out before.
            dirty: vec![reattached; chunks],
            reserved_bytes: 0,
            chunk_used: vec![0; chunks],
            chunk_idle_since: vec![None; chunks],
            retain: u64::MAX,
            decay: Duration::MAX,
            requests: 0,
            errors: 0,
            stopping: false,
            stop_asked: false,
            started_unix,
            shm_full: false,
            spin: os::online_cpus() > 1,
            spin_budget: Duration::from_micros(crate::cli::DEFAULT_SPIN_US),
            pid: os::pid(),
            cpu: u32::MAX,
            client_on_my_cpu: false,
            shares: HashMap::new(),
            free_share_slots: (0..MAX_SHARES).rev().collect(),
            free_view_slots: (0..MAX_VIEW_REFS).rev().collect(),
            share_slots_hi: 0,
            view_slots_hi: 0,
        };
        if reattached {
            s.rebuild(kept);
        }
        Ok(s)
    }

    /// Spins up to `budget` for the next request after answering one, before sleeping
    /// (`--spin-us`; only where more than one CPU is online).
    pub fn with_spin(mut self, budget: Duration) -> Self {
        self.spin_budget = budget;
        self
    }

    /// Keeps at most `retain` bytes of idle reserved pages: beyond that, a chunk (2 MiB) that
    /// has held no block for `decay` goes back to the kernel (hole punching), and its pages read
    /// as fresh zeros again. Without this, pages stay reserved once reserved.
    pub fn with_retention(mut self, retain: u64, decay: Duration) -> Self {
        self.retain = retain;
        self.decay = decay;
        self
    }

    /// The keeper's process id, if one holds the arena.
    pub fn keeper_pid(&self) -> Option<u32> {
        self.keeper.as_ref().map(KeeperLink::pid)
    }

    /// Takes the keeper link (for the caller's clean stop: `quit`).
    pub fn take_keeper(&mut self) -> Option<KeeperLink> {
        self.keeper.take()
    }
    /// The chunks that bytes `[offset, offset + len)` of the data overlap.
    fn chunks_of(&self, offset: u64, len: u64) -> core::ops::Range<usize> {
        let first = (offset / CHUNK) as usize;
        let last = ((offset + len).div_ceil(CHUNK) as usize).min(self.reserved.len());
        first..last.max(first)
    }

    /// Counts a used block of `len` bytes at `offset` in the chunks it overlaps.
    fn chunks_hold(&mut self, offset: u64, len: u64) {
        for c in self.chunks_of(offset, len) {
            self.chunk_used[c] += 1;
            self.chunk_idle_since[c] = None;
        }
    }

    /// Uncounts a used block of `len` bytes at `offset`; chunks left without one start idling.
    fn chunks_release(&mut self, offset: u64, len: u64) {
        let mut now = None;
        for c in self.chunks_of(offset, len) {
            self.chunk_used[c] = self.chunk_used[c].saturating_sub(1);
            if self.chunk_used[c] == 0 && self.reserved[c] {
                self.chunk_idle_since[c] = Some(*now.get_or_insert_with(Instant::now));
            }
        }
    }

    /// Returns idle chunks beyond the retained bytes to the kernel, oldest first, once idle for
    /// the decay time. Returns how long until the next chunk would be due, if any is waiting.
    /// O(chunks) when more than `retain` bytes are reserved, O(1) otherwise.
    fn decay_tick(&mut self) -> Option<Duration> {
        if self.reserved_bytes <= self.retain {
            return None;
        }
        let now = Instant::now();
        let mut idle: Vec<(Instant, usize)> = self
            .chunk_idle_since
            .iter()
            .enumerate()
            .filter_map(|(c, t)| t.map(|t| (t, c)))
            .collect();
        idle.sort_unstable();
        let mut punched = 0u64;
        for (since, c) in idle {
            if self.reserved_bytes <= self.retain {
                break;
            }
            let age = now.saturating_duration_since(since);
            if age < self.decay {
                return Some(self.decay - age);
            }
            let start = c as u64 * CHUNK;
            let n = CHUNK.min(self.seg.arena_bytes - start);
            match os::punch_hole(&self.seg.arena_fd, ARENA_DATA_OFFSET as u64 + start, n) {
                Ok(()) => {
                    self.reserved[c] = false;
                    self.dirty[c] = false;
                    self.chunk_idle_since[c] = None;
                    self.reserved_bytes -= n;
                    punched += n;
                }
                Err(e) => {
                    log::warn!("cannot return idle arena pages to the kernel: {e}");
                    self.retain = u64::MAX;
                    break;
                }
            }
        }
        if punched > 0 {
            log::debug!("returned {punched} idle bytes to the kernel");
        }
        None
    }

    /// The ownership record of granule `g` of the arena (`g` below the arena's granules).
    fn entry(&self, g: usize) -> &OwnerEntry {
        // SAFETY: the state segment holds one entry per granule of arena data after its
        // header (its length was set, or checked, for this arena), 4-aligned.
        unsafe {
            self.seg
                .state
                .at(size_of::<SegmentHeader>() + g * size_of::<OwnerEntry>())
        }
    }

    /// The client that owns the used block starting at byte `offset` of the data, 0 if none.
    fn owner_at(&self, offset: usize) -> u32 {
        if !offset.is_multiple_of(GRANULE) || offset / GRANULE >= self.granules() {
            return 0;
        }
        self.entry(offset / GRANULE).owner.load(Ordering::Acquire)
    }

    /// Records (or, with `owner` 0, erases) the used block of `bytes` at byte `offset`.
    fn record(&self, offset: usize, bytes: u64, owner: u32) {
        let e = self.entry(offset / GRANULE);
        if owner != 0 {
            // The length first: a crash between the two stores leaves an entry without owner,
            // which reads as free.
            e.granules
                .store((bytes / GRANULE as u64) as u32, Ordering::Relaxed);
        }
        e.owner.store(owner, Ordering::Release);
    }

    /// Granules of arena data (entries in the state segment).
    fn granules(&self) -> usize {
        (self.seg.arena_bytes / GRANULE as u64) as usize
    }

    /// After a rebuild: gives back to the kernel the pages of every chunk that holds no block
    /// (the dead daemon may have reserved them for blocks freed since, or for clients that are
    /// gone); they read as fresh zeros after. Only chunks with a kept block are recorded as
    /// reserved, so without this such pages would stay resident, uncounted and out of reach
    /// of the decay. Returns the bytes given back (those of chunks where hole punching worked;
    /// the others stay as they were).
    fn return_unused_chunks(&mut self) -> u64 {
        let chunks = self.chunk_used.len();
        let mut returned = 0;
        let mut c = 0;
        while c < chunks {
            if self.chunk_used[c] != 0 {
                c += 1;
                continue;
            }
            let run = c;
            while c < chunks && self.chunk_used[c] == 0 {
                c += 1;
            }
            let start = run as u64 * CHUNK;
            let len = (c as u64 * CHUNK).min(self.seg.arena_bytes) - start;
            match os::punch_hole(&self.seg.arena_fd, ARENA_DATA_OFFSET as u64 + start, len) {
                Ok(()) => {
                    self.dirty[run..c].fill(false);
                    returned += len;
                }
                Err(e) => log::warn!("cannot give back idle arena pages after re-attaching: {e}"),
            }
        }
        returned
    }

    /// After a restart: takes over the channels the keeper held for clients that still run,
    /// rebuilds the heap from the ownership record (keeping their blocks, freeing those of
    /// clients that are gone), and frees what they released but the dead daemon never swept.
    fn rebuild(&mut self, kept: Vec<KeptChannel>) {
        let mut dropped_channels = 0;
        for ch in kept {
            let (id, pid) = (ch.id, ch.pid);
            match self.adopt_channel(ch) {
                Ok(()) => {}
                Err(why) => {
                    log::info!("not keeping the channel of client {id} (pid {pid}): {why}");
                    self.keeper_drop(id);
                    dropped_channels += 1;
                }
            }
        }
        self.read_shares();
        let (mut kept_blocks, mut kept_bytes, mut dropped) = (0u64, 0u64, 0u64);
        for g in 0..self.granules() {
            let e = self.entry(g);
            let owner = e.owner.load(Ordering::Acquire);
            if owner == 0 {
                continue;
            }
            let bytes = u64::from(e.granules.load(Ordering::Relaxed)) * GRANULE as u64;
            if owner != ORPHAN {
                self.next_id = self.next_id.max(owner.wrapping_add(1)).max(1);
            }
            let live_owner = owner != ORPHAN && self.clients.contains_key(&owner);
            // A shared block whose owner is gone stays while a live client views it.
            let viewed = self.shares.get(&g).is_some_and(|s| !s.views.is_empty());
            let kept = (live_owner || viewed)
                && self.shares.get(&g).is_none_or(|s| s.bytes == bytes)
                && match self.heap.allocate_at(g * GRANULE, bytes as usize) {
                    Ok(()) => true,
                    Err(err) => {
                        log::error!(
                            "state record for granule {g} ({bytes} bytes, client {owner}) is \
                             unusable ({err}); dropping it"
                        );
                        false
                    }
                };
            if !kept {
                self.record(g * GRANULE, 0, 0);
                if let Some(s) = self.shares.remove(&g) {
                    self.forget_share(g, s);
                }
                dropped += 1;
                continue;
            }
            // The dead daemon reserved these pages before it handed the block out: recorded as
            // reserved, they are never populated (and on failure punched) again while the
            // block lives.
            self.mark_reserved((g * GRANULE) as u64, bytes);
            self.chunks_hold((g * GRANULE) as u64, bytes);
            kept_blocks += 1;
            kept_bytes += bytes;
            if live_owner {
                let gone = self
                    .shares
                    .get(&g)
                    .map(|s| s.slot)
                    .map(|slot| self.share_entry(slot).owner_gone.load(Ordering::Relaxed) != 0);
                if let Some(s) = self.shares.get_mut(&g) {
                    s.payer = Some(owner);
                    s.owner = (gone == Some(false)).then_some(owner);
                    if s.owner.is_none() {
                        s.send_token = 0;
                    }
                    self.count_owned(owner, 1);
                }
                self.account(owner, bytes as i64, 1);
                if self.shares.contains_key(&g) {
                    self.persist_share(g);
                }
                if gone == Some(true) {
                    // Given up: freed now if its views went with their processes.
                    self.free_if_unreferenced(g);
                }
            } else {
                // Owned by a client that is gone: the block is the views' alone now, and each
                // viewer pays for it.
                self.record(g * GRANULE, bytes, ORPHAN);
                let mut viewers = Vec::new();
                if let Some(s) = self.shares.get_mut(&g) {
                    s.owner = None;
                    s.payer = None;
                    s.send_token = 0;
                    viewers.extend(s.views.keys().copied());
                }
                self.persist_share(g);
                for v in viewers {
                    self.account_orphan(v, bytes as i64);
                }
            }
        }
        // Shares whose block the record does not hold (a crash between the two) go.
        let stray: Vec<usize> = self
            .shares
            .keys()
            .copied()
            .filter(|&g| self.heap.block_size_at(g * GRANULE).is_none())
            .collect();
        for g in stray {
            if let Some(s) = self.shares.remove(&g) {
                self.forget_share(g, s);
            }
        }
        // Blocks released but not yet swept by the old daemon are freed now (each at most
        // once: the record says whether the client still holds it).
        let ids: Vec<u32> = self.clients.keys().copied().collect();
        for id in ids {
            if let Some(chan) = self.clients.get(&id).map(|c| Arc::clone(&c.chan)) {
                self.drain_ledger(id, &chan, false);
            }
        }
        let returned = self.return_unused_chunks();
        log::info!(
            "re-attached to the existing segments: kept {kept_blocks} blocks ({kept_bytes} bytes) \
             and the channels of {} live clients; freed {dropped} blocks and {dropped_channels} \
             channels of clients that are gone; returned {returned} bytes of pages no kept block \
             uses to the kernel",
            self.clients.len()
        );
    }

    /// After a restart, before the blocks are rebuilt: reads the state record's share and view
    /// tables. Views of clients that are not kept are dropped; shares get their owner when
    /// their block is rebuilt (`owner` is `None` until then).
    fn read_shares(&mut self) {
        self.free_share_slots.clear();
        self.free_view_slots.clear();
        let granules = self.granules();
        let mut by_slot: HashMap<usize, usize> = HashMap::new();
        for i in (0..MAX_SHARES).rev() {
            let e = self.share_entry(i);
            let at = e.granule.load(Ordering::Acquire) as usize;
            let g = at.wrapping_sub(1);
            let bytes =
                if at != 0 && g < granules && self.entry(g).owner.load(Ordering::Relaxed) != 0 {
                    u64::from(self.entry(g).granules.load(Ordering::Relaxed)) * GRANULE as u64
                } else {
                    0
                };
            let len = e.len.load(Ordering::Relaxed);
            if bytes == 0 || len > bytes || self.shares.contains_key(&g) {
                e.granule.store(0, Ordering::Release);
                self.free_share_slots.push(i);
                continue;
            }
            by_slot.insert(i, g);
            self.shares.insert(
                g,
                Share {
                    slot: i,
                    generation: e.generation.load(Ordering::Relaxed),
                    len,
                    bytes,
                    token: e.token.load(Ordering::Relaxed),
                    send_token: e.send_token.load(Ordering::Relaxed),
                    owner: None,
                    payer: None,
                    views: HashMap::new(),
                },
            );
        }
        self.share_slots_hi = by_slot.keys().map(|&i| i + 1).max().unwrap_or(0);
        for i in (0..MAX_VIEW_REFS).rev() {
            let e = self.view_entry(i);
            let share = (e.share.load(Ordering::Acquire) as usize).wrapping_sub(1);
            let (client, count) = (
                e.client.load(Ordering::Relaxed),
                e.count.load(Ordering::Relaxed),
            );
            let g = by_slot.get(&share).copied();
            let live = count > 0
                && self
                    .clients
                    .get(&client)
                    .is_some_and(|c| c.viewing.len() < MAX_VIEWS_PER_CLIENT);
            let fresh = g.is_some_and(|g| !self.shares[&g].views.contains_key(&client));
            let (Some(g), true, true) = (g, live, fresh) else {
                e.share.store(0, Ordering::Release);
                self.free_view_slots.push(i);
                continue;
            };
            if let Some(s) = self.shares.get_mut(&g) {
                s.views.insert(client, (count, i));
            }
            self.view_slots_hi = self.view_slots_hi.max(i + 1);
            if let Some(c) = self.clients.get_mut(&client) {
                c.viewing.insert(g);
                let uid = c.uid;
                self.count_views(uid, 1);
            }
        }
    }

    /// Erases share `s` of granule `g` (taken out of `shares`) and its views from the state
    /// record, and from its viewers.
    fn forget_share(&mut self, g: usize, s: Share) {
        self.share_entry(s.slot).granule.store(0, Ordering::Release);
        self.free_share_slots.push(s.slot);
        for (client, (_, slot)) in s.views {
            self.view_entry(slot).share.store(0, Ordering::Release);
            self.free_view_slots.push(slot);
            if let Some(c) = self.clients.get_mut(&client) {
                c.viewing.remove(&g);
                let uid = c.uid;
                self.count_views(uid, -1);
            }
        }
    }

    /// Takes over a channel the keeper held: checks it, rewrites its response header for this
    /// daemon, and serves it (watched at once: a request may have waited through the crash).
    fn adopt_channel(&mut self, ch: KeptChannel) -> Result<(), String> {
        if ch.id == 0 || self.clients.contains_key(&ch.id) {
            return Err("duplicate or zero id".into());
        }
        // The pidfd taken when the client connected, not one opened by pid now: the process
        // may have exited while no daemon ran, and its pid been reused.
        let pidfd = ch.pidfd;
        if os::pidfd_exited(&pidfd) {
            return Err("the process has exited".into());
        }
        let slots = self.seg.slots;
        for (fd, len) in [
            (&ch.request, wire::request_channel_len(slots)),
            (&ch.response, wire::response_channel_len(slots)),
        ] {
            let info = os::fstat(fd).map_err(|e| format!("fstat: {e}"))?;
            if info.len != len as u64 || !unix::size_is_sealed(fd) {
                return Err("not a sealed channel of this layout".into());
            }
        }
        let len = wire::request_channel_len(slots);
        let request = Mapping::new(&ch.request, len, true).map_err(|e| format!("mmap: {e}"))?;
        let len = wire::response_channel_len(slots);
        let response = Mapping::new(&ch.response, len, true).map_err(|e| format!("mmap: {e}"))?;
        let request_id = FileId::of_raw(ch.request.raw()).map_err(|e| format!("fstat: {e}"))?;
        let chan = Arc::new(Channel {
            request,
            response,
            slots,
            request_id,
        });
        self.write_channel_headers(&chan);
        epoll_add(
            &self.epoll,
            &pidfd,
            TAG_PIDFD | u64::from(ch.id),
            libc::EPOLLIN as u32,
        )
        .map_err(|e| format!("epoll: {e}"))?;
        let mut client = Client::new(ch.pid, ch.uid, None, pidfd, chan);
        // Looked at once more whatever its bell says.
        client.last_rings = client.last_rings.wrapping_sub(1);
        self.clients.insert(ch.id, client);
        self.next_id = self.next_id.max(ch.id.wrapping_add(1)).max(1);
        self.watch(ch.id);
        Ok(())
    }

    /// Writes both headers of `chan` for this daemon, and says in its bell that it runs.
    fn write_channel_headers(&self, chan: &Channel) {
        let arena_len = self.seg.arena_bytes + ARENA_DATA_OFFSET as u64;
        for (map, kind) in [
            (&chan.request, SegmentKind::Request),
            (&chan.response, SegmentKind::Response),
        ] {
            let h = SegmentHeader::new(
                kind,
                chan.slots,
                GRANULE as u32,
                arena_len,
                self.seg.generation,
                self.pid,
            )
            .with_flags(self.seg.flags);
            if let Some(at) = map.header() {
                h.store(at);
            }
        }
        let bell = chan.daemon_bell();
        bell.arena_bytes
            .store(self.seg.arena_bytes, Ordering::Relaxed);
        bell.free_bytes
            .store(self.heap.stats().free_bytes as u64, Ordering::Relaxed);
        bell.state.store(
            if self.stopping {
                wire::STATE_STOPPING
            } else {
                wire::STATE_RUNNING
            },
            Ordering::Release,
        );
    }

    /// Checks the whole state: the heap's invariants, and that the ownership record lists
    /// exactly the heap's used blocks with their lengths, each owned by a client whose counts
    /// agree, and that the per-process and per-user sums agree. O(granules + blocks); for
    /// SIGHUP, tests and fuzzing.
    pub fn check(&self) -> Result<(), String> {
        self.heap.check_invariants().map_err(|e| e.to_string())?;
        let mut per_client: HashMap<u32, (u64, u64)> = HashMap::new();
        let mut used = vec![0u32; self.chunk_used.len()];
        for g in 0..self.granules() {
            let e = self.entry(g);
            let owner = e.owner.load(Ordering::Relaxed);
            let block = self.heap.block_size_at(g * GRANULE);
            match (owner, block) {
                (0, None) => {}
                (0, Some(_)) => return Err(format!("used block at granule {g} has no owner")),
                (_, None) => return Err(format!("granule {g} recorded for {owner}, not used")),
                (_, Some(bytes)) => {
                    let recorded = u64::from(e.granules.load(Ordering::Relaxed)) * GRANULE as u64;
                    if recorded != bytes as u64 {
                        return Err(format!(
                            "granule {g}: recorded {recorded} bytes, the heap has {bytes}"
                        ));
                    }
                    for c in self.chunks_of((g * GRANULE) as u64, recorded) {
                        used[c] += 1;
                    }
                    let share_owner = self.shares.get(&g).map(|s| s.payer.unwrap_or(ORPHAN));
                    if owner == ORPHAN || share_owner.is_some() {
                        if share_owner != Some(owner) {
                            return Err(format!(
                                "granule {g}: recorded for {owner}, its share says {share_owner:?}"
                            ));
                        }
                        if owner == ORPHAN {
                            continue;
                        }
                    }
                    let c = per_client.entry(owner).or_default();
                    c.0 += 1;
                    c.1 += recorded;
                }
            }
        }
        if used != self.chunk_used {
            return Err("per-chunk block counts differ from the record".into());
        }
        self.check_shares()?;
        for (id, (blocks, bytes)) in &per_client {
            match self.clients.get(id) {
                Some(c) if c.blocks == *blocks && c.bytes == *bytes => {}
                Some(c) => {
                    return Err(format!(
                        "client {id}: counts {} blocks / {} bytes, record {blocks} / {bytes}",
                        c.blocks, c.bytes
                    ))
                }
                None => return Err(format!("blocks of {id}, which is not a client")),
            }
        }
        let mut procs: HashMap<u32, u64> = HashMap::new();
        let mut users: HashMap<u32, u64> = HashMap::new();
        for c in self.clients.values() {
            *procs.entry(c.pid).or_default() += c.bytes + c.orphan_bytes;
            *users.entry(c.uid).or_default() += c.bytes + c.orphan_bytes;
        }
        procs.retain(|_, b| *b > 0);
        users.retain(|_, b| *b > 0);
        let mut p = self.proc_bytes.clone();
        let mut u = self.user_bytes.clone();
        p.retain(|_, b| *b > 0);
        u.retain(|_, b| *b > 0);
        if p != procs || u != users {
            return Err("per-process or per-user byte counts differ from the clients'".into());
        }
        Ok(())
    }

    /// The share half of [`Server::check`]: every share's block is used and as long as
    /// recorded, its state-record entries say what the daemon holds, its views are those of
    /// clients that know it, an owner-less share has views, and the free lists account for
    /// every other entry.
    fn check_shares(&self) -> Result<(), String> {
        let mut view_entries = 0;
        for (&g, s) in &self.shares {
            if self.heap.block_size_at(g * GRANULE).map(|b| b as u64) != Some(s.bytes)
                || s.len > s.bytes
            {
                return Err(format!(
                    "share at granule {g}: no used block of {} bytes",
                    s.bytes
                ));
            }
            let e = self.share_entry(s.slot);
            let persisted = (
                e.granule.load(Ordering::Relaxed) as usize,
                e.generation.load(Ordering::Relaxed),
                e.len.load(Ordering::Relaxed),
                e.token.load(Ordering::Relaxed),
                e.send_token.load(Ordering::Relaxed),
            );
            if persisted != (g + 1, s.generation, s.len, s.token, s.send_token) {
                return Err(format!(
                    "share at granule {g}: its state-record entry differs"
                ));
            }
            let owner_pays = s.owner.is_none_or(|o| s.payer == Some(o));
            if !owner_pays || (s.owner.is_none() && (s.views.is_empty() || s.send_token != 0)) {
                return Err(format!(
                    "share at granule {g}: owner {:?}, payer {:?}, {} views, in transit: {}",
                    s.owner,
                    s.payer,
                    s.views.len(),
                    s.send_token != 0
                ));
            }
            if e.owner_gone.load(Ordering::Relaxed) != u32::from(s.owner.is_none()) {
                return Err(format!(
                    "share at granule {g}: its record says owner_gone wrongly"
                ));
            }
            for (client, &(count, slot)) in &s.views {
                let v = self.view_entry(slot);
                let persisted = (
                    v.share.load(Ordering::Relaxed) as usize,
                    v.client.load(Ordering::Relaxed),
                    v.count.load(Ordering::Relaxed),
                );
                let knows = self
                    .clients
                    .get(client)
                    .is_some_and(|c| c.viewing.contains(&g));
                if count == 0 || persisted != (s.slot + 1, *client, count) || !knows {
                    return Err(format!(
                        "share at granule {g}: views of client {client} differ"
                    ));
                }
                view_entries += 1;
            }
        }
        let mut user_shares: HashMap<u32, usize> = HashMap::new();
        let mut user_views: HashMap<u32, usize> = HashMap::new();
        for (id, c) in &self.clients {
            if c.viewing
                .iter()
                .any(|g| !self.shares.get(g).is_some_and(|s| s.views.contains_key(id)))
            {
                return Err(format!("client {id} views a share that does not count it"));
            }
            let owned = self
                .shares
                .values()
                .filter(|s| s.payer == Some(*id))
                .count();
            let orphan_bytes: u64 = c
                .viewing
                .iter()
                .filter_map(|g| self.shares.get(g))
                .filter(|s| s.payer.is_none())
                .map(|s| s.bytes)
                .sum();
            if owned != c.owned_shares || orphan_bytes != c.orphan_bytes {
                return Err(format!(
                    "client {id}: counts {} shares / {} orphan bytes, the shares say {owned} / \
                     {orphan_bytes}",
                    c.owned_shares, c.orphan_bytes
                ));
            }
            *user_shares.entry(c.uid).or_default() += owned;
            *user_views.entry(c.uid).or_default() += c.viewing.len();
        }
        let nonzero = |m: &HashMap<u32, usize>| {
            let mut m = m.clone();
            m.retain(|_, n| *n > 0);
            m
        };
        if nonzero(&user_shares) != nonzero(&self.user_shares)
            || nonzero(&user_views) != nonzero(&self.user_views)
        {
            return Err("per-user share or view counts differ from the clients'".into());
        }
        // Entries above the high-water marks were never handed out since the tables were read.
        let used_shares = (0..self.share_slots_hi)
            .filter(|&i| self.share_entry(i).granule.load(Ordering::Relaxed) != 0)
            .count();
        let used_views = (0..self.view_slots_hi)
            .filter(|&i| self.view_entry(i).share.load(Ordering::Relaxed) != 0)
            .count();
        if used_shares != self.shares.len()
            || used_views != view_entries
            || used_shares + self.free_share_slots.len() != MAX_SHARES
            || used_views + self.free_view_slots.len() != MAX_VIEW_REFS
        {
            return Err("share or view table entries differ from the shares held".into());
        }
        Ok(())
    }

    /// Adds `bytes` (negative: removes) and `blocks` to client `id` and its process and user.
    fn account(&mut self, id: u32, bytes: i64, blocks: i64) {
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        c.bytes = c.bytes.saturating_add_signed(bytes);
        c.blocks = c.blocks.saturating_add_signed(blocks);
        let (pid, uid) = (c.pid, c.uid);
        self.charge(pid, uid, bytes);
    }

    /// Adds `bytes` (negative: removes) of an owner-less share that client `id` views to what
    /// it is charged, and to its process and user.
    fn account_orphan(&mut self, id: u32, bytes: i64) {
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        c.orphan_bytes = c.orphan_bytes.saturating_add_signed(bytes);
        let (pid, uid) = (c.pid, c.uid);
        self.charge(pid, uid, bytes);
    }

    /// Adds `bytes` (negative: removes) to the bytes of process `pid` and user `uid`.
    fn charge(&mut self, pid: u32, uid: u32, bytes: i64) {
        for (map, key) in [(&mut self.proc_bytes, pid), (&mut self.user_bytes, uid)] {
            let v = map.entry(key).or_default();
            *v = v.saturating_add_signed(bytes);
            if *v == 0 {
                map.remove(&key);
            }
        }
    }

    /// Adds `n` (negative: removes) to the shares client `id` owns, and its user's.
    fn count_owned(&mut self, id: u32, n: isize) {
        if let Some(c) = self.clients.get_mut(&id) {
            c.owned_shares = c.owned_shares.saturating_add_signed(n);
            let v = self.user_shares.entry(c.uid).or_default();
            *v = v.saturating_add_signed(n);
        }
    }

    /// Adds `n` (negative: removes) to the view-table entries of user `uid`.
    fn count_views(&mut self, uid: u32, n: isize) {
        let v = self.user_views.entry(uid).or_default();
        *v = v.saturating_add_signed(n);
    }

    /// Whether client `id` may own one more share.
    fn may_own_share(&self, id: u32) -> bool {
        self.clients.get(&id).is_some_and(|c| {
            c.owned_shares < MAX_SHARES_PER_CLIENT
                && self.user_shares.get(&c.uid).copied().unwrap_or(0) < MAX_SHARES_PER_USER
        })
    }

    /// Frees the blocks client `id` released into its ledger, or, with `cached`, also takes
    /// back the ones it keeps cached. Returns (blocks, bytes) freed. A block the record does
    /// not give to `id` is skipped: the ledger is the client's to write.
    fn drain_ledger(&mut self, id: u32, chan: &Channel, cached: bool) -> (u64, u64) {
        let ledger = chan.ledger();
        let (mut blocks, mut bytes) = (0, 0);
        let mut free = |b: LedgerBlock| {
            let offset = u64::from(b.offset) * GRANULE as u64;
            let held = self.owner_at(offset as usize) == id;
            let size = self.heap.block_size_at(offset as usize).unwrap_or(0) as u64;
            if held && self.free(id, offset).status == Status::Ok as u32 {
                blocks += 1;
                bytes += size;
            } else {
                self.errors += 1;
            }
        };
        ledger.sweep(&mut free);
        if cached {
            ledger.reclaim(&mut free);
        }
        (blocks, bytes)
    }

    /// The arena is out of room: takes back every block clients keep cached (and what they
    /// released), so that an allocation can be tried again. Returns the bytes freed.
    fn take_back_caches(&mut self) -> u64 {
        let (mut blocks, mut bytes) = (0, 0);
        let all: Vec<(u32, Arc<Channel>)> = self
            .clients
            .iter()
            .map(|(id, c)| (*id, Arc::clone(&c.chan)))
            .collect();
        for (id, chan) in all {
            let (b, n) = self.drain_ledger(id, &chan, true);
            blocks += b;
            bytes += n;
        }
        if blocks > 0 {
            log::info!(
                "arena full: took back {blocks} blocks ({bytes} bytes) that clients kept cached"
            );
        }
        bytes
    }

    /// Serves until SIGTERM or SIGINT, then answers what is pending with `ShuttingDown`.
    pub fn run(&mut self) {
        let mut last_work = Instant::now();
        let mut last_poll = last_work;
        let mut batches = 0u32;
        loop {
            let served = self.serve_watched();
            let now = Instant::now();
            if served > 0 {
                last_work = now;
            }
            if now.duration_since(last_poll) >= POLL_INTERVAL {
                last_poll = now;
                self.unwatch_idle(now);
                self.recheck_detached();
                self.poll_events(Some(Duration::ZERO));
                if self.stop_asked {
                    break;
                }
            }
            if served > 0 {
                continue;
            }
            // Nothing pending: spin for a while, then sleep. The spin yields the CPU every few
            // batches: a client on this same CPU that waits for its answer (or has the next
            // request ready) runs at once instead of after the budget, while with nothing else
            // runnable a yield returns at once.
            if self.spin && now.duration_since(last_work) < self.spin_budget {
                let (batch, per_yield) = if self.client_on_my_cpu {
                    (1, 1)
                } else {
                    (SPIN_BATCH, BATCHES_PER_YIELD)
                };
                for _ in 0..batch {
                    core::hint::spin_loop();
                }
                batches = batches.wrapping_add(1);
                if batches.is_multiple_of(per_yield) {
                    os::yield_now();
                }
                continue;
            }
            // Going to sleep: no channel is watched any more, so every client wakes us; one
            // that rang in between is served first.
            if self.unwatch_all() {
                last_work = Instant::now();
                continue;
            }
            // Idle pages due to go back to the kernel go now; the sleep lasts until the next
            // are due (only while more than `--retain` bytes are reserved), or an event.
            let due = self.decay_tick();
            let due = match self.recheck_detached() {
                Some(d) => Some(due.map_or(d, |due| due.min(d))),
                None => due,
            };
            self.poll_events(Some(due.unwrap_or(Duration::MAX)));
            last_poll = Instant::now();
            last_work = last_poll;
            if self.stop_asked {
                break;
            }
        }
        self.shut_down();
    }

    /// Looks at every watched channel once; returns how many requests were answered.
    fn serve_watched(&mut self) -> usize {
        let mut n = 0;
        let mut k = 0;
        while k < self.watched.len() {
            let id = self.watched[k];
            n += self.serve_client(id);
            k += 1;
        }
        n
    }

    /// Answers every pending request of client `id` once, and sweeps its ledger, if its bell
    /// rang since the last look; returns how many requests were answered.
    fn serve_client(&mut self, id: u32) -> usize {
        let Some(c) = self.clients.get_mut(&id) else {
            return 0;
        };
        let chan = Arc::clone(&c.chan);
        let rings = chan.bell().rings.load(Ordering::Acquire);
        if rings == c.last_rings {
            return 0;
        }
        c.last_rings = rings;
        // The client's word, bounded by the channel's size whatever it says.
        let hi = chan.bell().slots_hi.load(Ordering::Acquire).min(chan.slots);
        let mut n = 0;
        self.cpu = os::current_cpu();
        for i in 0..hi {
            if let Some(req) = chan.slot(i).take() {
                if n == 0 {
                    self.client_on_my_cpu = false;
                }
                self.client_on_my_cpu |= req.cpu == self.cpu;
                let resp = self.handle(id, &req);
                self.respond(&chan, i, req.seq, resp);
                n += 1;
            }
        }
        let ledger = chan.ledger();
        if ledger.pending.load(Ordering::Relaxed) != 0
            && ledger.pending.swap(0, Ordering::Acquire) != 0
        {
            self.drain_ledger(id, &chan, false);
        }
        if let Some(c) = self.clients.get_mut(&id) {
            c.requests += n as u64;
            if n > 0 {
                c.last_request = Instant::now();
            }
        }
        n
    }

    fn respond(&mut self, chan: &Channel, slot: u32, seq: u32, resp: Response) {
        self.requests += 1;
        // A block that cannot grow in place is an ordinary answer (the client moves it), not a
        // failure.
        if resp.status != Status::Ok as u32 && resp.status != Status::NotInPlace as u32 {
            self.errors += 1;
        }
        // Constant time: this is on every answer's path.
        chan.daemon_bell()
            .free_bytes
            .store(self.heap.free_bytes() as u64, Ordering::Relaxed);
        let rs = chan.answer(slot);
        rs.cpu.store(self.cpu, Ordering::Relaxed);
        if rs.publish(chan.slot(slot), seq, resp) {
            os::futex_wake(&rs.seq, u32::MAX);
        }
    }

    /// Starts watching client `id`'s channel (polled without wake-ups).
    fn watch(&mut self, id: u32) {
        if let Some(c) = self.clients.get_mut(&id) {
            if !c.watched {
                c.chan.daemon_bell().watch();
                c.watched = true;
                c.last_request = Instant::now();
                self.watched.push(id);
            }
        }
    }

    /// Stops watching client `id`; returns whether its bell rang meanwhile (the caller then
    /// looks at it once more).
    fn unwatch(&mut self, id: u32) -> bool {
        let Some(c) = self.clients.get_mut(&id) else {
            return false;
        };
        c.watched = false;
        let rings = c.chan.daemon_bell().unwatch(c.chan.bell());
        rings != c.last_rings
    }

    /// Stops watching every channel; serves (and watches again) those that rang meanwhile.
    /// Returns whether any did: then the caller must not sleep, since those channels are
    /// watched again and their clients send no wake-up (a ring that released a block, or a
    /// request a look already answered, rings without a request to answer).
    fn unwatch_all(&mut self) -> bool {
        let mut rang = false;
        for id in std::mem::take(&mut self.watched) {
            if self.unwatch(id) {
                rang = true;
                self.serve_client(id);
                self.watch(id);
            }
        }
        rang
    }

    /// Stops watching the channels idle for [`WATCH_IDLE`].
    fn unwatch_idle(&mut self, now: Instant) {
        let mut k = 0;
        while k < self.watched.len() {
            let id = self.watched[k];
            let idle = self
                .clients
                .get(&id)
                .is_none_or(|c| now.duration_since(c.last_request) > WATCH_IDLE);
            if idle {
                self.watched.swap_remove(k);
                if self.unwatch(id) {
                    self.serve_client(id);
                    self.watch(id);
                }
            } else {
                k += 1;
            }
        }
    }

    /// Adds a client that has no connection (its process is this one, `uid` as given), for
    /// tests and fuzzing: returns its id and a descriptor of its request channel, which the
    /// caller maps to write requests (or any bytes) into; [`Server::serve`] then looks at it.
    #[doc(hidden)]
    pub fn add_local_client(&mut self, uid: u32) -> Result<(u32, Fd), String> {
        let pid = os::pid();
        let pidfd = os::pidfd_open(pid).map_err(|e| format!("pidfd_open: {e}"))?;
        let id = self.new_id();
        let (chan, request_fd, _) = self.new_channel().map_err(|e| format!("channel: {e}"))?;
        self.clients
            .insert(id, Client::new(pid, uid, None, pidfd, chan));
        Ok((id, request_fd))
    }

    /// Looks at client `id`'s channel once, whether or not its bell rang, as the loop does
    /// after a wake-up: answers what is pending, sweeps its ledger. Returns the requests
    /// answered.
    pub fn serve(&mut self, id: u32) -> usize {
        if let Some(c) = self.clients.get_mut(&id) {
            c.last_rings = c.chan.bell().rings.load(Ordering::Relaxed).wrapping_sub(1);
            c.chan.ledger().pending.store(1, Ordering::Relaxed);
        }
        self.serve_client(id)
    }

    /// Forgets client `id` and frees what it held, as when its connection ends.
    pub fn disconnect(&mut self, id: u32) {
        self.reclaim(id, "was disconnected");
    }

    /// Validates and executes one request of client `id`.
    pub fn handle(&mut self, id: u32, req: &Request) -> Response {
        if self.stopping {
            return answer(Status::ShuttingDown);
        }
        let Some(op) = Op::from_u32(req.op) else {
            return answer(Status::UnknownOp);
        };
        if wire::BlockFlags::for_request(op, req.flags).is_none() {
            return answer(Status::BadFlags);
        }
        match op {
            Op::Allocate => self.allocate(id, req),
            Op::Free => self.free(id, req.offset),
            Op::Reallocate => self.resize(id, req.offset, req.size),
            Op::Share => self.share(id, req.offset, req.size),
            Op::Open | Op::Close | Op::Send | Op::Receive => {
                // The generation is a 32-bit word: a larger one names no share.
                let Ok(generation) = u32::try_from(req.size) else {
                    return answer(Status::NoSuchShare);
                };
                match op {
                    Op::Open => self.open(id, req.offset, generation, req.token),
                    Op::Close => {
                        let owner =
                            BlockFlags::from_bits_retain(req.flags).contains(BlockFlags::OWNER);
                        self.close(id, req.offset, generation, owner)
                    }
                    Op::Send => self.send(id, req.offset, generation),
                    _ => self.receive(id, req.offset, generation, req.token),
                }
            }
        }
    }

    /// Whether `extra` more bytes keep client `id`'s process and user within their quotas.
    fn within_quota(&self, id: u32, extra: u64) -> bool {
        let Some(c) = self.clients.get(&id) else {
            return false;
        };
        let proc = self.proc_bytes.get(&c.pid).copied().unwrap_or(0);
        let user = self.user_bytes.get(&c.uid).copied().unwrap_or(0);
        proc.saturating_add(extra) <= self.policy.client_quota
            && user.saturating_add(extra) <= self.policy.user_quota
    }

    fn allocate(&mut self, id: u32, req: &Request) -> Response {
        if req.size == 0 || req.size > self.seg.arena_bytes {
            return answer(Status::BadSize);
        }
        if !req.align.is_power_of_two() || req.align > MAX_ALIGN {
            return answer(Status::BadAlign);
        }
        let Ok(layout) =
            core::alloc::Layout::from_size_align(req.size as usize, req.align as usize)
        else {
            return answer(Status::BadSize);
        };
        // Checked before anything changes, at the size the block will have at least.
        if !self.within_quota(id, req.size.next_multiple_of(GRANULE as u64)) {
            return answer(Status::OverQuota);
        }
        // Aligned where the client sees the arena, which is not where this process maps it. A
        // mapping starts on a page, and so does every block: a view off the page is no client's.
        let view = (req.offset & (MAX_ALIGN - 1)) as usize;
        if !view.is_multiple_of(GRANULE) {
            return answer(Status::BadOffset);
        }
        let Some(offset) = self.heap.allocate_offset(layout, view).or_else(|| {
            (self.take_back_caches() > 0)
                .then(|| self.heap.allocate_offset(layout, view))
                .flatten()
        }) else {
            return answer(Status::OutOfMemory);
        };
        let size = self.heap.block_size_at(offset).unwrap_or(0) as u64;
        if !self.within_quota(id, size) {
            let freed = self.heap.deallocate_at(offset);
            debug_assert!(freed.is_ok());
            return answer(Status::OverQuota);
        }
        let fresh = match self.reserve(offset as u64, size) {
            Ok(fresh) => fresh,
            Err(()) => {
                let freed = self.heap.deallocate_at(offset);
                debug_assert!(freed.is_ok());
                return answer(Status::OutOfMemory);
            }
        };
        // Recorded before the answer is published: a crash from here on leaves the block with
        // its owner, never free while the client holds it.
        self.record(offset, size, id);
        self.chunks_hold(offset as u64, size);
        self.account(id, size as i64, 1);
        Response {
            status: Status::Ok as u32,
            flags: if fresh {
                wire::BlockFlags::ZEROED.bits()
            } else {
                0
            },
            offset: offset as u64,
            size,
            ..Response::default()
        }
    }

    /// The owner check shared by free and resize: `Err` if a used block starts at `offset` and
    /// belongs to another client. Other offset errors are left to the heap's checks.
    fn check_owner(&self, id: u32, offset: u64) -> Result<usize, Status> {
        let off = usize::try_from(offset).map_err(|_| Status::BadOffset)?;
        match self.owner_at(off) {
            o if o != 0 && o != id => Err(Status::NotOwner),
            _ => Ok(off),
        }
    }

    fn free(&mut self, id: u32, offset: u64) -> Response {
        let off = match self.check_owner(id, offset) {
            Ok(off) => off,
            Err(s) => return answer(s),
        };
        if self.is_shared(off) {
            return answer(Status::Shared);
        }
        if self.owner_at(off) == id {
            // Erased first: a crash after this leaves the block free, which the client that
            // asked to free it no longer uses.
            self.record(off, 0, 0);
        }
        match self.heap.deallocate_at(off) {
            Ok(size) => {
                self.chunks_release(off as u64, size as u64);
                self.account(id, -(size as i64), -1);
                answer(Status::Ok)
            }
            Err(e) => answer(free_status(e)),
        }
    }

    fn resize(&mut self, id: u32, offset: u64, new_size: u64) -> Response {
        let off = match self.check_owner(id, offset) {
            Ok(off) => off,
            Err(s) => return answer(s),
        };
        if self.is_shared(off) {
            return answer(Status::Shared);
        }
        let Some(old) = self.heap.block_size_at(off) else {
            // Let the heap say what is wrong with the offset.
            let e = self.heap.resize_at(off, 1).err();
            return answer(match e {
                Some(ResizeError::Block(e)) => free_status(e),
                _ => Status::BadOffset,
            });
        };
        if new_size == 0 || new_size > self.seg.arena_bytes {
            return answer(Status::BadSize);
        }
        let grow = new_size
            .next_multiple_of(GRANULE as u64)
            .saturating_sub(old as u64);
        if grow > 0 && !self.within_quota(id, grow) {
            return answer(Status::OverQuota);
        }
        let size = match self.heap.resize_at(off, new_size as usize) {
            Ok(size) => size as u64,
            Err(ResizeError::Block(e)) => return answer(free_status(e)),
            Err(ResizeError::BadSize) => return answer(Status::BadSize),
            Err(ResizeError::NoRoom | _) => return answer(Status::NotInPlace),
        };
        if size > old as u64 && !self.within_quota(id, size - old as u64) {
            // The heap rounds; the quota holds for what it gave.
            let back = self.heap.resize_at(off, old);
            debug_assert!(back.is_ok());
            return answer(Status::OverQuota);
        }
        if size > old as u64 && self.reserve(off as u64, size).is_err() {
            let back = self.heap.resize_at(off, old);
            debug_assert!(back.is_ok());
            return answer(Status::OutOfMemory);
        }
        self.record(off, size, id);
        self.chunks_release(off as u64, old as u64);
        self.chunks_hold(off as u64, size);
        self.account(id, size as i64 - old as i64, 0);
        Response {
            status: Status::Ok as u32,
            flags: 0,
            offset,
            size,
            ..Response::default()
        }
    }
    /// Whether a shared block starts at byte `off` of the data.
    fn is_shared(&self, off: usize) -> bool {
        // On every free and resize: no hashing while nothing is shared.
        !self.shares.is_empty()
            && off.is_multiple_of(GRANULE)
            && self.shares.contains_key(&(off / GRANULE))
    }

    /// The first granule of the share at byte `offset` of generation `generation`, if one
    /// lives there.
    fn find_share(&self, offset: u64, generation: u32) -> Option<usize> {
        let off = usize::try_from(offset).ok()?;
        if !off.is_multiple_of(GRANULE) {
            return None;
        }
        let g = off / GRANULE;
        self.shares
            .get(&g)
            .filter(|s| s.generation == generation)
            .map(|_| g)
    }

    /// The answer that describes share `g` to a client, with `token`.
    fn share_answer(&self, g: usize, token: u64) -> Response {
        let s = &self.shares[&g];
        Response {
            status: Status::Ok as u32,
            offset: (g * GRANULE) as u64,
            size: s.len,
            token,
            tag: u64::from(s.generation) | (s.bytes / GRANULE as u64) << 32,
            ..Response::default()
        }
    }

    /// The state record's bookkeeping of shares.
    fn share_header(&self) -> &ShareTableHeader {
        let at = wire::share_table_offset(self.state_arena_len(), GRANULE as u32);
        // SAFETY: the state segment is `state_segment_len` long for this arena (made or
        // checked by the daemon), which holds the share tables after the owner entries, at
        // 64-aligned offsets; only the daemon maps it.
        unsafe { self.seg.state.at(at) }
    }

    /// Entry `i` (`< MAX_SHARES`) of the state record's share table.
    fn share_entry(&self, i: usize) -> &ShareEntry {
        assert!(i < MAX_SHARES);
        // SAFETY: as in `share_header`; entries are 8-aligned.
        unsafe {
            self.seg.state.at(wire::share_entry_offset(
                self.state_arena_len(),
                GRANULE as u32,
                i,
            ))
        }
    }

    /// Entry `i` (`< MAX_VIEW_REFS`) of the state record's view table.
    fn view_entry(&self, i: usize) -> &ViewEntry {
        assert!(i < MAX_VIEW_REFS);
        // SAFETY: as in `share_header`; entries are 4-aligned.
        unsafe {
            self.seg.state.at(wire::view_entry_offset(
                self.state_arena_len(),
                GRANULE as u32,
                i,
            ))
        }
    }

    /// The arena segment's length, as the state record's layout counts it.
    fn state_arena_len(&self) -> u64 {
        self.seg.arena_bytes + ARENA_DATA_OFFSET as u64
    }

    /// Writes share `g` into its entry of the state record (in use from the last store on).
    fn persist_share(&self, g: usize) {
        let s = &self.shares[&g];
        let e = self.share_entry(s.slot);
        e.generation.store(s.generation, Ordering::Relaxed);
        e.len.store(s.len, Ordering::Relaxed);
        e.token.store(s.token, Ordering::Relaxed);
        e.send_token.store(s.send_token, Ordering::Relaxed);
        e.owner_gone
            .store(u32::from(s.owner.is_none()), Ordering::Relaxed);
        e.granule.store(g as u32 + 1, Ordering::Release);
    }

    /// Writes client `client`'s `count` views of the share in share entry `share` into view
    /// entry `slot` (in use from the last store on).
    fn persist_view(&self, slot: usize, share: usize, client: u32, count: u32) {
        let e = self.view_entry(slot);
        e.count.store(count, Ordering::Relaxed);
        e.client.store(client, Ordering::Relaxed);
        e.share.store(share as u32 + 1, Ordering::Release);
    }

    /// A new random token (never 0), or `None` if the kernel gives no random bytes.
    fn new_token() -> Option<u64> {
        (0..4).find_map(|_| os::random_u64().filter(|&t| t != 0))
    }

    /// [`Op::Share`]: client `id` shares its block at `offset` as `len` bytes.
    fn share(&mut self, id: u32, offset: u64, len: u64) -> Response {
        let Ok(off) = usize::try_from(offset) else {
            return answer(Status::BadOffset);
        };
        match self.owner_at(off) {
            0 => return answer(Status::BadOffset),
            o if o != id => return answer(Status::NotOwner),
            _ => {}
        }
        let Some(bytes) = self.heap.block_size_at(off) else {
            return answer(Status::BadOffset);
        };
        if len > bytes as u64 {
            return answer(Status::BadSize);
        }
        let g = off / GRANULE;
        if self.shares.contains_key(&g) {
            return answer(Status::Shared);
        }
        if !self.may_own_share(id) {
            return answer(Status::TooManyShares);
        }
        let Some(token) = Self::new_token() else {
            log::warn!("cannot share a block: getrandom gave no random bytes");
            return answer(Status::OutOfMemory);
        };
        let Some(slot) = self.free_share_slots.pop() else {
            return answer(Status::TooManyShares);
        };
        self.share_slots_hi = self.share_slots_hi.max(slot + 1);
        let header = self.share_header();
        let generation = header.next_generation.load(Ordering::Relaxed);
        header
            .next_generation
            .store(generation.wrapping_add(1), Ordering::Relaxed);
        self.shares.insert(
            g,
            Share {
                slot,
                generation,
                len,
                bytes: bytes as u64,
                token,
                send_token: 0,
                owner: Some(id),
                payer: Some(id),
                views: HashMap::new(),
            },
        );
        self.count_owned(id, 1);
        self.persist_share(g);
        self.share_answer(g, token)
    }

    /// [`Op::Open`]: client `id` opens a view of the share at `offset` of `generation`, with
    /// its view or send token.
    fn open(&mut self, id: u32, offset: u64, generation: u32, token: u64) -> Response {
        let Some(g) = self.find_share(offset, generation) else {
            return answer(Status::NoSuchShare);
        };
        let s = &self.shares[&g];
        let known = token != 0 && (token == s.token || token == s.send_token);
        if !known {
            return answer(Status::NoSuchShare);
        }
        let (share_slot, view_token, orphan, bytes) = (s.slot, s.token, s.payer.is_none(), s.bytes);
        let Some((viewing, uid)) = self.clients.get(&id).map(|c| (c.viewing.len(), c.uid)) else {
            return answer(Status::NoSuchShare);
        };
        let (count, slot) = match s.views.get(&id) {
            Some(&(count, slot)) => {
                let Some(count) = count.checked_add(1) else {
                    return answer(Status::TooManyShares);
                };
                (count, slot)
            }
            None => {
                let of_user = self.user_views.get(&uid).copied().unwrap_or(0);
                if viewing >= MAX_VIEWS_PER_CLIENT || of_user >= MAX_VIEW_REFS_PER_USER {
                    return answer(Status::TooManyShares);
                }
                // A block whose owner is gone is charged to each of its viewers.
                if orphan && !self.within_quota(id, bytes) {
                    return answer(Status::OverQuota);
                }
                let Some(slot) = self.free_view_slots.pop() else {
                    return answer(Status::TooManyShares);
                };
                self.view_slots_hi = self.view_slots_hi.max(slot + 1);
                self.count_views(uid, 1);
                if orphan {
                    self.account_orphan(id, bytes as i64);
                }
                (1, slot)
            }
        };
        self.persist_view(slot, share_slot, id, count);
        if let Some(s) = self.shares.get_mut(&g) {
            s.views.insert(id, (count, slot));
        }
        if let Some(c) = self.clients.get_mut(&id) {
            c.viewing.insert(g);
        }
        self.share_answer(g, view_token)
    }

    /// [`Op::Close`]: client `id` drops one view of the share at `offset` of `generation`, or,
    /// with `owner`, its ownership; the block is freed if that was its last reference.
    fn close(&mut self, id: u32, offset: u64, generation: u32, owner: bool) -> Response {
        let Some(g) = self.find_share(offset, generation) else {
            return answer(Status::NoSuchShare);
        };
        if owner {
            if self.shares[&g].owner != Some(id) {
                return answer(Status::NoSuchShare);
            }
            self.give_up(g);
        } else if !self.drop_view(g, id, false) {
            return answer(Status::NoSuchShare);
        }
        self.free_if_unreferenced(g);
        answer(Status::Ok)
    }

    /// Drops one view (or, with `all`, every view) of client `id` of share `g`; whether it
    /// had one.
    fn drop_view(&mut self, g: usize, id: u32, all: bool) -> bool {
        let Some(s) = self.shares.get_mut(&g) else {
            return false;
        };
        let Some(&(count, slot)) = s.views.get(&id) else {
            return false;
        };
        let share_slot = s.slot;
        if count > 1 && !all {
            s.views.insert(id, (count - 1, slot));
            self.persist_view(slot, share_slot, id, count - 1);
            return true;
        }
        s.views.remove(&id);
        let orphan = s.payer.is_none().then_some(s.bytes);
        self.view_entry(slot).share.store(0, Ordering::Release);
        self.free_view_slots.push(slot);
        if let Some(c) = self.clients.get_mut(&id) {
            c.viewing.remove(&g);
            let uid = c.uid;
            self.count_views(uid, -1);
        }
        if let Some(bytes) = orphan {
            self.account_orphan(id, -(bytes as i64));
        }
        true
    }

    /// Share `g`'s owner gives it up (views remain, or it is freed next): it can no longer be
    /// sent or received, and its client goes on paying for it while it lives.
    fn give_up(&mut self, g: usize) {
        let Some(s) = self.shares.get_mut(&g) else {
            return;
        };
        s.owner = None;
        s.send_token = 0;
        self.persist_share(g);
    }

    /// Client `id`, which pays for share `g`, is gone: the block belongs to no client from now
    /// on (recorded as [`ORPHAN`]'s), and each of its viewers pays for it.
    fn drop_payer(&mut self, g: usize, id: u32) {
        let Some(s) = self.shares.get_mut(&g) else {
            return;
        };
        if s.payer != Some(id) {
            return;
        }
        s.payer = None;
        s.owner = None;
        s.send_token = 0;
        let bytes = s.bytes;
        let viewers: Vec<u32> = s.views.keys().copied().collect();
        self.persist_share(g);
        self.record(g * GRANULE, bytes, ORPHAN);
        self.account(id, -(bytes as i64), -1);
        self.count_owned(id, -1);
        for v in viewers {
            self.account_orphan(v, bytes as i64);
        }
    }

    /// Frees share `g`'s block if nothing refers to it any more: no owner, no view.
    fn free_if_unreferenced(&mut self, g: usize) {
        let unreferenced = self
            .shares
            .get(&g)
            .is_some_and(|s| s.owner.is_none() && s.views.is_empty());
        if !unreferenced {
            return;
        }
        let Some(s) = self.shares.remove(&g) else {
            return;
        };
        // The block recorded as ORPHAN's first, then the share, then the block: a crash in
        // between leaves a block no live share keeps and no client holds, which a restart
        // frees (left recorded for its payer, it would be kept as a block the payer's program
        // does not know it holds).
        if s.payer.is_some() {
            self.record(g * GRANULE, s.bytes, ORPHAN);
        }
        self.share_entry(s.slot).granule.store(0, Ordering::Release);
        self.free_share_slots.push(s.slot);
        self.record(g * GRANULE, 0, 0);
        if let Some(payer) = s.payer {
            self.account(payer, -(s.bytes as i64), -1);
            self.count_owned(payer, -1);
        }
        if let Ok(size) = self.heap.deallocate_at(g * GRANULE) {
            self.chunks_release((g * GRANULE) as u64, size as u64);
        }
    }

    /// [`Op::Send`]: client `id` puts its share at `offset` of `generation` in transit.
    fn send(&mut self, id: u32, offset: u64, generation: u32) -> Response {
        let Some(g) = self.find_share(offset, generation) else {
            return answer(Status::NoSuchShare);
        };
        if self.shares[&g].owner != Some(id) {
            return answer(Status::NotOwner);
        }
        if self.shares[&g].send_token != 0 {
            return answer(Status::Shared);
        }
        let Some(token) = Self::new_token() else {
            log::warn!("cannot send a block: getrandom gave no random bytes");
            return answer(Status::OutOfMemory);
        };
        if let Some(s) = self.shares.get_mut(&g) {
            s.send_token = token;
        }
        self.persist_share(g);
        self.share_answer(g, token)
    }

    /// [`Op::Receive`]: client `id` takes the share at `offset` of `generation` in transit
    /// with send token `token`.
    fn receive(&mut self, id: u32, offset: u64, generation: u32, token: u64) -> Response {
        let Some(g) = self.find_share(offset, generation) else {
            return answer(Status::NoSuchShare);
        };
        let s = &self.shares[&g];
        let (Some(from), true) = (s.owner, token != 0 && token == s.send_token) else {
            return answer(Status::NoSuchShare);
        };
        let (bytes, view_token) = (s.bytes, s.token);
        if from != id {
            if !self.may_own_share(id) {
                return answer(Status::TooManyShares);
            }
            if !self.within_quota(id, bytes) {
                return answer(Status::OverQuota);
            }
            self.account(from, -(bytes as i64), -1);
            self.count_owned(from, -1);
            self.record(g * GRANULE, bytes, id);
            self.account(id, bytes as i64, 1);
            self.count_owned(id, 1);
        }
        if let Some(s) = self.shares.get_mut(&g) {
            s.owner = Some(id);
            s.payer = Some(id);
            s.send_token = 0;
        }
        self.persist_share(g);
        self.share_answer(g, view_token)
    }

    /// Client `id` is going: drops its views and its ownership of shares, freeing the blocks
    /// nothing refers to any more.
    fn release_shares(&mut self, id: u32) {
        let viewing: Vec<usize> = self
            .clients
            .get(&id)
            .map(|c| c.viewing.iter().copied().collect())
            .unwrap_or_default();
        let paid: Vec<usize> = self
            .shares
            .iter()
            .filter(|(_, s)| s.payer == Some(id))
            .map(|(g, _)| *g)
            .collect();
        for &g in &viewing {
            self.drop_view(g, id, true);
        }
        for &g in &paid {
            self.drop_payer(g, id);
        }
        for g in viewing.into_iter().chain(paid) {
            self.free_if_unreferenced(g);
        }
    }

    /// Records the chunks that `[offset, offset + len)` of the data overlaps as reserved.
    fn mark_reserved(&mut self, offset: u64, len: u64) {
        for c in self.chunks_of(offset, len) {
            if !self.reserved[c] {
                self.reserved[c] = true;
                self.reserved_bytes += CHUNK.min(self.seg.arena_bytes - c as u64 * CHUNK);
            }
        }
    }

    /// Reserves the pages behind `[offset, offset + len)` of the data and marks its chunks
    /// handed out. Returns whether every chunk was untouched before (its memory is zero).
    fn reserve(&mut self, offset: u64, len: u64) -> Result<bool, ()> {
        let first = (offset / CHUNK) as usize;
        let last = ((offset + len).div_ceil(CHUNK) as usize).min(self.reserved.len());
        for c in first..last {
            if self.reserved[c] {
                continue;
            }
            let start = c as u64 * CHUNK;
            let n = CHUNK.min(self.seg.arena_bytes - start);
            let file_off = ARENA_DATA_OFFSET as u64 + start;
            // With huge-page advice, pages are reserved through the mapping, which follows the
            // advice; fallocate has no mapping to look at and reserves 4 KiB pages where the
            // mount says `huge=advise`.
            let reserved = if self.huge_pages {
                self.seg
                    .arena
                    .populate(file_off as usize, n as usize)
                    .inspect_err(|_| {
                        // Unlike fallocate, a failed populate keeps the pages it got: give them
                        // back (the chunk holds no block) so that /dev/shm is not left full.
                        let _ = os::punch_hole(&self.seg.arena_fd, file_off, n);
                    })
            } else {
                os::reserve(&self.seg.arena_fd, file_off, n)
            };
            if let Err(e) = reserved {
                // Logged when reservations start failing, not for every refused request.
                if !self.shm_full {
                    log::warn!(
                        "cannot reserve arena pages ({e}): the memory the daemon may use (its \
                         memory cgroup, or the machine's) is exhausted; allocations that need \
                         new pages get OutOfMemory until memory is freed"
                    );
                    self.shm_full = true;
                }
                return Err(());
            }
            if self.shm_full {
                log::info!("arena pages can be reserved again");
                self.shm_full = false;
            }
            self.mark_reserved(start, n);
        }
        let fresh = self.dirty[first..last].iter().all(|d| !d);
        self.dirty[first..last].fill(true);
        Ok(fresh)
    }

    /// Frees everything client `id` held, and forgets it (its socket and pidfd close, which
    /// takes them out of the epoll set).
    fn reclaim(&mut self, id: u32, why: &str) {
        let Some(client) = self.clients.get(&id) else {
            return;
        };
        let pid = client.pid;
        self.watched.retain(|&w| w != id);
        self.release_shares(id);
        let held_blocks = self.clients.get(&id).map_or(0, |c| c.blocks);
        let (mut blocks, mut bytes) = (0u64, 0u64);
        if held_blocks > 0 {
            for g in 0..self.granules() {
                if self.entry(g).owner.load(Ordering::Relaxed) == id {
                    self.record(g * GRANULE, 0, 0);
                    if let Ok(size) = self.heap.deallocate_at(g * GRANULE) {
                        self.chunks_release((g * GRANULE) as u64, size as u64);
                        self.account(id, -(size as i64), -1);
                        blocks += 1;
                        bytes += size as u64;
                    }
                }
            }
        }
        self.clients.remove(&id);
        self.keeper_drop(id);
        log::info!("client {id} (pid {pid}) {why}: reclaimed {blocks} blocks ({bytes} bytes)");
    }

    /// Client `id`'s connection ended. Its process exited or `exec`ed (both unmap the channel
    /// before the socket closes): everything it held is reclaimed. Or it lives and still maps
    /// its channel: the program closed the descriptor itself (`close_range` and loops over
    /// every descriptor do, in programs that run with the library preloaded). Its blocks are
    /// then its own still, in use, and are kept (reclaimed when it exits), the channel served,
    /// and the client may connect again ([`HelloKind::Rebind`]). Where the daemon may not
    /// read the process's mappings (another user's process, without CAP_SYS_PTRACE), the
    /// connection's end is taken as the process's.
    fn hung_up(&mut self, id: u32) {
        let Some(c) = self.clients.get(&id) else {
            return;
        };
        let bye = c.sock.as_ref().is_some_and(unix::said_goodbye);
        if bye || !Self::still_maps(c) {
            return self.reclaim(id, "closed its connection");
        }
        let pid = c.pid;
        if let Some(c) = self.clients.get_mut(&id) {
            // Closing the daemon's end takes it out of the epoll set.
            c.sock = None;
            c.detached = Some(Instant::now());
        }
        log::warn!(
            "client {id} (pid {pid}) closed its connection but its process lives (the program \
             closed the descriptor): its blocks stay its own until it exits, execs or connects \
             again"
        );
    }

    /// Whether client `c`'s process lives and may still use its blocks: it maps its channel,
    /// or its mappings cannot be read (another user's process, without CAP_SYS_PTRACE: kept,
    /// a leak until it exits being better than handing its blocks to another process).
    fn still_maps(c: &Client) -> bool {
        if os::pidfd_exited(&c.pidfd) {
            return false;
        }
        let maps = maps_file(c.pid, c.chan.request_id);
        // Still that process (its pid is not reused while the pidfd says it lives).
        !os::pidfd_exited(&c.pidfd) && maps != Some(false)
    }

    /// Looks again, at most once per [`DETACHED_RECHECK`], at clients whose connection ended
    /// while their process lived (see [`Server::hung_up`]): one that has `exec`ed since (its
    /// new program does not map the channel) is reclaimed; a pidfd reports only an exit. Returns
    /// when to look next, if any such client is left.
    fn recheck_detached(&mut self) -> Option<Duration> {
        let now = Instant::now();
        let mut next: Option<Duration> = None;
        let mut gone = Vec::new();
        for (&id, c) in &mut self.clients {
            let Some(since) = c.detached else { continue };
            let wait = DETACHED_RECHECK.saturating_sub(now.duration_since(since));
            if !wait.is_zero() {
                next = Some(next.map_or(wait, |n| n.min(wait)));
                continue;
            }
            if Self::still_maps(c) {
                c.detached = Some(now);
                next = Some(next.map_or(DETACHED_RECHECK, |n| n.min(DETACHED_RECHECK)));
            } else {
                gone.push(id);
            }
        }
        for id in gone {
            self.reclaim(id, "no longer maps its channel (exec)");
        }
        next
    }

    /// Tells the keeper to let go of channel `id` (logged once if the keeper fails).
    fn keeper_drop(&mut self, id: u32) {
        if let Some(k) = &self.keeper {
            if let Err(e) = k.drop_channel(id) {
                self.keeper_error(&e);
            }
        }
    }

    fn keeper_error(&mut self, e: &str) {
        if !self.keeper_failed {
            log::warn!(
                "the keeper failed ({e}): while it runs but cannot hold a new client's channel, \
                 new clients are refused (a daemon restarted after a crash would free their \
                 blocks); if it is gone, clients are served but a crash loses every block"
            );
            self.keeper_failed = true;
        }
    }

    /// Handles what the epoll set reports within `timeout` (`Duration::MAX`: until something
    /// happens).
    fn poll_events(&mut self, timeout: Option<Duration>) {
        let ms = match timeout {
            Some(Duration::MAX) | None => -1,
            Some(t) => i32::try_from(t.as_micros().div_ceil(1000)).unwrap_or(i32::MAX),
        };
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 64];
        // SAFETY: `evs` is writable for its length.
        let n = unsafe { libc::epoll_wait(self.epoll.raw(), evs.as_mut_ptr(), 64, ms) };
        if n <= 0 {
            return;
        }
        for ev in &evs[..n as usize] {
            let (tag, events) = (ev.u64, ev.events);
            let id = (tag & !TAG_KIND) as u32;
            match tag & TAG_KIND {
                TAG_LISTENER => self.accept_all(),
                TAG_SIGNAL => self.read_signals(),
                TAG_PENDING => self.first_message(id),
                TAG_SOCKET => {
                    let hup = events & (libc::EPOLLHUP | libc::EPOLLRDHUP | libc::EPOLLERR) as u32;
                    // A hang-up is what the kernel reports, never a message's content (an empty
                    // message reads like an end of file).
                    let closed = hup != 0
                        || self
                            .clients
                            .get(&id)
                            .and_then(|c| c.sock.as_ref())
                            .is_none_or(|s| unix::drain(s).1);
                    if closed {
                        self.hung_up(id);
                    } else {
                        self.watch(id);
                        self.serve_client(id);
                    }
                }
                TAG_PIDFD => self.reclaim(id, "exited"),
                _ => {}
            }
        }
    }

    /// Accepts every waiting connection; each waits for its first message.
    fn accept_all(&mut self) {
        loop {
            match unix::accept(&self.listener) {
                Ok(Some(sock)) => {
                    self.fds_exhausted = false;
                    let uid = unix::peer(&sock).map_or(u32::MAX, |p| p.uid);
                    self.make_room_for_pending(uid);
                    let token = self.next_token;
                    self.next_token = (self.next_token + 1) & 0x00ff_ffff;
                    let events = (libc::EPOLLIN | libc::EPOLLRDHUP) as u32;
                    if epoll_add(&self.epoll, &sock, TAG_PENDING | u64::from(token), events).is_ok()
                    {
                        self.pending.insert(token, (sock, uid));
                    }
                }
                Ok(None) => return,
                Err(e) if e.0 == libc::EMFILE || e.0 == libc::ENFILE => {
                    if !self.fds_exhausted {
                        log::warn!(
                            "out of descriptors ({e}): refusing new connections until clients \
                             leave (raise the daemon's RLIMIT_NOFILE, or lower \
                             --max-clients-per-user)"
                        );
                        self.fds_exhausted = true;
                    }
                    // The spare descriptor makes room to take the connection out of the
                    // backlog and close it; otherwise the listener would stay readable and the
                    // loop would never sleep.
                    self.spare = None;
                    drop(unix::accept(&self.listener));
                    self.spare = spare_fd();
                    return;
                }
                Err(e) => {
                    log::warn!("accept: {e}");
                    return;
                }
            }
        }
    }

    /// Before a connection of user `uid` joins the pending ones: closes that user's oldest if
    /// it has [`PENDING_PER_USER`] waiting, and the oldest of all if [`MAX_PENDING`] wait.
    fn make_room_for_pending(&mut self, uid: u32) {
        let age = |t: u32| self.next_token.wrapping_sub(t) & 0x00ff_ffff;
        let of_user = self.pending.values().filter(|(_, u)| *u == uid).count();
        let victim = if of_user >= PENDING_PER_USER {
            self.pending
                .iter()
                .filter(|(_, (_, u))| *u == uid)
                .map(|(t, _)| *t)
                .max_by_key(|t| age(*t))
        } else if self.pending.len() >= MAX_PENDING {
            self.pending.keys().copied().max_by_key(|t| age(*t))
        } else {
            None
        };
        if let Some(t) = victim {
            self.pending.remove(&t);
        }
    }

    /// Reads a new connection's first message and answers it.
    fn first_message(&mut self, token: u32) {
        let Some((sock, _)) = self.pending.remove(&token) else {
            return;
        };
        let _ = epoll_del(&self.epoll, &sock);
        let mut buf = [0u8; 64];
        // Descriptors a client sends along are closed when `r` drops.
        let r = match unix::recv_with_fds(&sock, &mut buf, Duration::ZERO) {
            Ok(Some(r)) => r,
            Ok(None) | Err(_) => return,
        };
        let hello = match Hello::decode(&buf[..r.len]) {
            Ok(h) => h,
            Err(wire::HandshakeError::BadVersion(v)) => {
                return refuse(
                    &sock,
                    Refusal::BadVersion,
                    &format!(
                        "this daemon speaks protocol version {}, the client {v}: rebuild the \
                         client against the same xalloc",
                        wire::VERSION
                    ),
                )
            }
            Err(e) => return refuse(&sock, Refusal::BadHello, &format!("bad hello: {e}")),
        };
        match hello.kind {
            HelloKind::Status => {
                if self.served_peer(&sock).is_some() {
                    self.send_status(sock);
                }
            }
            HelloKind::Client => self.admit(sock),
            HelloKind::Rebind => self.rebind(sock, hello.client_id),
        }
    }

    /// The peer of `sock`, if this daemon serves its user; else refuses it.
    fn served_peer(&self, sock: &Fd) -> Option<Peer> {
        let peer = unix::peer(sock).ok()?;
        let me = os::euid();
        let in_group = self.policy.access.gid.is_some_and(|g| {
            peer.gid == g
                || unix::peer_groups(sock).is_ok_and(|(groups, n)| groups[..n].contains(&g))
        });
        if peer.uid == me || peer.uid == 0 || in_group {
            return Some(peer);
        }
        let group = match self.policy.access.gid {
            Some(g) => format!(" and the members of group {g}"),
            None => String::new(),
        };
        refuse(
            sock,
            Refusal::NotServed,
            &format!(
                "this daemon serves user {me}{group}, not user {} (start it with --group GROUP \
                 to share it)",
                peer.uid
            ),
        );
        log::info!("refused pid {} of user {}: not served", peer.pid, peer.uid);
        None
    }

    /// Makes a new client of the peer on `sock`: a channel, its place in the epoll set and in
    /// the keeper, and the welcome with the arena and the channel.
    fn admit(&mut self, sock: Fd) {
        let Some(peer) = self.served_peer(&sock) else {
            return;
        };
        if self.stopping {
            return refuse(&sock, Refusal::ShuttingDown, "the daemon is shutting down");
        }
        let of_user = self.clients.values().filter(|c| c.uid == peer.uid).count();
        if of_user >= self.policy.max_clients_per_user {
            log::warn!(
                "refused pid {}: user {} already has {of_user} connections",
                peer.pid,
                peer.uid
            );
            return refuse(
                &sock,
                Refusal::Busy,
                &format!(
                    "user {} already has {of_user} connections, the most this daemon takes \
                     from one user (--max-clients-per-user)",
                    peer.uid
                ),
            );
        }
        let busy = |sock: &Fd, what: &str, e: &dyn std::fmt::Display| {
            log::warn!("cannot take client pid {}: {what}: {e}", peer.pid);
            refuse(
                sock,
                Refusal::Busy,
                &format!("the daemon cannot take another client now ({what}: {e})"),
            );
        };
        let pidfd = match unix::peer_pidfd(&sock, &peer) {
            Ok(fd) => fd,
            Err(e) => return busy(&sock, "pidfd", &e),
        };
        let id = self.new_id();
        let (chan, request_fd, response_fd) = match self.new_channel() {
            Ok(c) => c,
            Err(e) => return busy(&sock, "channel", &e),
        };
        let response_ro = match unix::read_only_twin(&response_fd) {
            Ok(fd) => fd,
            Err(e) => return busy(&sock, "read-only channel", &e),
        };
        // The keeper must hold the channel before the client may use it: a daemon restarted
        // after a crash frees the blocks of every channel the keeper does not hand back.
        // (A keeper that is gone holds no arena either: a restart then starts afresh with a
        // new arena, and nothing can be handed out twice; the client is taken.)
        let kept = self.keeper.as_ref().map(|k| {
            k.keep_channel(id, peer.pid, peer.uid, &request_fd, &response_fd, &pidfd)
                .map_err(|e| (e, os::process_alive(k.pid())))
        });
        if let Some(Err((e, keeper_alive))) = kept {
            self.keeper_error(&e);
            if keeper_alive {
                return busy(&sock, "keeper", &e);
            }
        }
        let events = (libc::EPOLLIN | libc::EPOLLRDHUP) as u32;
        if let Err(e) =
            epoll_add(&self.epoll, &sock, TAG_SOCKET | u64::from(id), events).and_then(|()| {
                epoll_add(
                    &self.epoll,
                    &pidfd,
                    TAG_PIDFD | u64::from(id),
                    libc::EPOLLIN as u32,
                )
            })
        {
            let _ = epoll_del(&self.epoll, &sock);
            self.keeper_drop(id);
            return busy(&sock, "epoll", &e);
        }

        let welcome = self.welcome(id);
        let fds = [
            self.seg.arena_fd.as_fd(),
            request_fd.as_fd(),
            response_ro.as_fd(),
        ];
        self.clients
            .insert(id, Client::new(peer.pid, peer.uid, Some(sock), pidfd, chan));
        let sent = self.clients[&id]
            .sock
            .as_ref()
            .map(|s| unix::send_with_fds(s, &welcome.encode(), &fds));
        match sent {
            Some(Ok(())) => {
                let c = &self.clients[&id];
                log::info!(
                    "client {id} connected: pid {} ({}), user {}",
                    c.pid,
                    c.command,
                    c.uid
                );
                self.watch(id);
            }
            Some(Err(e)) => self.reclaim(id, &format!("could not be welcomed ({e})")),
            None => {}
        }
    }

    /// Gives re-attached channel `id` the connection `sock`, if its peer is the process the
    /// channel was made for and the channel has none.
    fn rebind(&mut self, sock: Fd, id: u32) {
        let Some(peer) = self.served_peer(&sock) else {
            return;
        };
        if self.stopping {
            return refuse(&sock, Refusal::ShuttingDown, "the daemon is shutting down");
        }
        // While the process the channel was made for has not exited (its pidfd says), its pid
        // is not reused: a peer with that pid is that process.
        let is_it =
            |c: &Client| c.pid == peer.pid && c.uid == peer.uid && !os::pidfd_exited(&c.pidfd);
        // A connection of that process that has hung up but whose end has not been handled
        // yet (the client saw it first: the program closed its descriptor) is handled now.
        // (Only then: another process must not make the daemon read a client's socket.)
        let hung_up = self
            .clients
            .get(&id)
            .filter(|c| is_it(c))
            .and_then(|c| c.sock.as_ref())
            .is_some_and(|s| unix::drain(s).1);
        if hung_up {
            self.hung_up(id);
        }
        let ok = self
            .clients
            .get(&id)
            .is_some_and(|c| c.sock.is_none() && is_it(c));
        if !ok {
            return refuse(
                &sock,
                Refusal::BadHello,
                "no channel of this process without a connection has that id",
            );
        }
        let events = (libc::EPOLLIN | libc::EPOLLRDHUP) as u32;
        if let Err(e) = epoll_add(&self.epoll, &sock, TAG_SOCKET | u64::from(id), events) {
            return refuse(&sock, Refusal::Busy, &format!("epoll: {e}"));
        }
        let welcome = self.welcome(id);
        if unix::send_with_fds(&sock, &welcome.encode(), &[]).is_ok() {
            if let Some(c) = self.clients.get_mut(&id) {
                c.sock = Some(sock);
                c.detached = None;
            }
            log::info!("client {id} (pid {}) has a connection again", peer.pid);
            self.watch(id);
            self.serve_client(id);
        }
    }

    /// The welcome that accepts client `id` (every channel has this instance's slot count).
    fn welcome(&self, id: u32) -> Welcome {
        Welcome {
            refusal: Refusal::None as u32,
            slots: self.seg.slots,
            granule: GRANULE as u32,
            flags: self.seg.flags,
            client_id: id,
            daemon_pid: self.pid,
            arena_len: self.seg.arena_bytes + ARENA_DATA_OFFSET as u64,
            generation: self.seg.generation,
        }
    }

    /// A client id no client uses (never 0).
    fn new_id(&mut self) -> u32 {
        loop {
            let id = self.next_id;
            self.next_id = self.next_id.wrapping_add(1).max(1);
            if id != 0 && id != ORPHAN && !self.clients.contains_key(&id) {
                return id;
            }
        }
    }

    /// A new channel: both memfds made, mapped, given their headers and sealed.
    fn new_channel(&self) -> Result<(Arc<Channel>, Fd, Fd), os::Errno> {
        let slots = self.seg.slots;
        let make = |name: &CStr, len: usize| -> Result<(Fd, Mapping), os::Errno> {
            let fd = unix::memfd(name, len as u64)?;
            let map = Mapping::new(&fd, len, true)?;
            Ok((fd, map))
        };
        let (request_fd, request) = make(c"xalloc:request", wire::request_channel_len(slots))?;
        let (response_fd, response) = make(c"xalloc:response", wire::response_channel_len(slots))?;
        let chan = Arc::new(Channel {
            request,
            response,
            slots,
            request_id: FileId::of_raw(request_fd.raw())?,
        });
        self.write_channel_headers(&chan);
        unix::seal_size(&request_fd)?;
        unix::seal_size(&response_fd)?;
        Ok((chan, request_fd, response_fd))
    }

    /// The status document: the counters, and one entry per client.
    pub fn status_json(&self) -> serde_json::Value {
        let h = self.heap.stats();
        let mut clients: Vec<(&u32, &Client)> = self.clients.iter().collect();
        clients.sort_by_key(|(id, _)| **id);
        let list: Vec<serde_json::Value> = clients
            .iter()
            .map(|(id, c)| {
                let cached = c.cached_bytes();
                // (first granule, generation, views) of each share the client views.
                let views: Vec<(usize, u32, u32)> = c
                    .viewing
                    .iter()
                    .filter_map(|g| {
                        let s = self.shares.get(g)?;
                        Some((*g, s.generation, s.views.get(id)?.0))
                    })
                    .collect();
                let owned = c.owned_shares;
                serde_json::json!({
                    "id": id,
                    "pid": c.pid,
                    "uid": c.uid,
                    "command": c.command,
                    "bytes": c.bytes,
                    "blocks": c.blocks,
                    // The client's own word: at most what it holds.
                    "cached_bytes": cached.min(c.bytes),
                    "requests": c.requests,
                    "connected": c.sock.is_some(),
                    "views": views.iter().map(|v| u64::from(v.2)).sum::<u64>(),
                    "shared_blocks": owned,
                    "orphan_bytes": c.orphan_bytes,
                    "view_list": views.iter().map(|&(g, generation, count)| serde_json::json!({
                        "offset": g * GRANULE,
                        "generation": generation,
                        "count": count,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        let mut procs: Vec<u32> = self.clients.values().map(|c| c.pid).collect();
        procs.sort_unstable();
        procs.dedup();
        let quota = |q: u64| (q != u64::MAX).then_some(q);
        serde_json::json!({
            "name": self.name,
            "state": if self.stopping { "stopping" } else { "running" },
            "pid": self.pid,
            "arena_bytes": h.region_bytes,
            "used_bytes": h.used_bytes,
            "free_bytes": h.free_bytes,
            "largest_free_bytes": h.largest_free_bytes,
            "live_blocks": h.live_blocks,
            "clients": self.clients.len(),
            "processes": procs.len(),
            "watched": self.watched.len(),
            "slots_per_client": self.seg.slots,
            "requests": self.requests,
            "errors": self.errors,
            "reserved_bytes": self.reserved_bytes,
            "resident_bytes": self.reserved_bytes,
            "started_unix": self.started_unix,
            "huge_pages": self.huge_pages,
            "keeper_pid": self.keeper_pid(),
            "client_quota": quota(self.policy.client_quota),
            "user_quota": quota(self.policy.user_quota),
            "shared_blocks": self.shares.len(),
            "shared_bytes": self.shares.values().map(|s| s.bytes).sum::<u64>(),
            "views": self.shares.values().flat_map(|s| s.views.values()).map(|v| u64::from(v.0)).sum::<u64>(),
            "orphaned_shares": self.shares.values().filter(|s| s.payer.is_none()).count(),
            "client_list": list,
        })
    }

    /// Answers a status request on `sock` with [`Server::status_json`], sent by a thread of
    /// its own: a reader that does not read holds up nothing but that thread (which gives up
    /// after [`STATUS_SEND_TIMEOUT`] per message). At most [`MAX_STATUS_SENDERS`] at once.
    fn send_status(&self, sock: Fd) {
        use std::sync::atomic::Ordering as O;
        let senders = Arc::clone(&self.status_senders);
        if senders.fetch_add(1, O::AcqRel) >= MAX_STATUS_SENDERS {
            senders.fetch_sub(1, O::AcqRel);
            log::debug!("{MAX_STATUS_SENDERS} status replies in progress; closing another");
            return;
        }
        let text = self.status_json().to_string();
        let spawned = std::thread::Builder::new().name("status".into()).spawn({
            let senders = Arc::clone(&senders);
            move || {
                if let Err(e) =
                    unix::send_text(&sock, text.as_bytes(), 32 << 10, STATUS_SEND_TIMEOUT)
                {
                    log::debug!("status reader went away: {e}");
                }
                senders.fetch_sub(1, O::AcqRel);
            }
        });
        if spawned.is_err() {
            senders.fetch_sub(1, O::AcqRel);
        }
    }

    fn read_signals(&mut self) {
        loop {
            // SAFETY: all-zero is a valid siginfo; read fills it.
            let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
            let want = size_of::<libc::signalfd_siginfo>();
            // SAFETY: `info` is writable for `want` bytes.
            let got = unsafe { libc::read(self.signals.raw(), (&raw mut info).cast(), want) };
            if got != want as isize {
                return;
            }
            match info.ssi_signo as i32 {
                libc::SIGTERM | libc::SIGINT => self.stop_asked = true,
                libc::SIGHUP => self.log_stats(),
                _ => {}
            }
        }
    }

    /// SIGHUP: the statistics line, the result of the state check, and who holds what.
    fn log_stats(&self) {
        // On request only: the check walks every block and granule.
        let check = match self.check() {
            Ok(()) => "heap check ok".to_owned(),
            Err(e) => format!("heap check FAILED: {e}"),
        };
        log::info!("{}; {check}", self.stats_line());
        // Who holds what (blocks a client keeps in its cache of freed blocks included: they
        // are its own until it reuses them or the daemon takes them back), largest first, at
        // most 20 lines.
        let mut holders: Vec<(&u32, &Client)> = self.clients.iter().collect();
        holders.sort_by_key(|(_, c)| std::cmp::Reverse(c.bytes));
        for (id, c) in holders.iter().take(20) {
            let cached = c.cached_bytes();
            log::info!(
                "client {id} (pid {}, {}, user {}): {} blocks, {} bytes ({cached} of them cached \
                 for reuse), {} requests",
                c.pid,
                c.command,
                c.uid,
                c.blocks,
                c.bytes,
                c.requests
            );
        }
    }

    /// One line of statistics for the log.
    pub fn stats_line(&self) -> String {
        let h = self.heap.stats();
        format!(
            "stats: {} clients, {} live blocks ({} shared), {} of {} bytes used, largest free {}, \
             {} bytes reserved, {} requests, {} errors",
            self.clients.len(),
            h.live_blocks,
            self.shares.len(),
            h.used_bytes,
            h.region_bytes,
            h.largest_free_bytes,
            self.reserved_bytes,
            self.requests,
            self.errors
        )
    }

    /// Stops serving: says so in every channel, and answers every pending request with
    /// `ShuttingDown`. The caller removes the objects and tells the keeper to quit.
    fn shut_down(&mut self) {
        self.stopping = true;
        let ids: Vec<u32> = self.clients.keys().copied().collect();
        for id in &ids {
            if let Some(c) = self.clients.get(id) {
                c.chan
                    .daemon_bell()
                    .state
                    .store(wire::STATE_STOPPING, Ordering::Release);
                c.chan.daemon_bell().watch();
            }
        }
        for id in ids {
            if let Some(c) = self.clients.get_mut(&id) {
                c.last_rings = c.chan.bell().rings.load(Ordering::Relaxed).wrapping_sub(1);
            }
            self.serve_client(id);
        }
    }
}

/// A descriptor to keep spare (`/dev/null`), if one can be had.
fn spare_fd() -> Option<Fd> {
    use std::os::fd::IntoRawFd;
    let f = std::fs::File::open("/dev/null").ok()?;
    // SAFETY: a fresh descriptor, handed over whole.
    Some(unsafe { Fd::from_raw(f.into_raw_fd()) })
}

/// Answers `sock` with a refusal and the reason in words.
fn refuse(sock: &Fd, refusal: Refusal, reason: &str) {
    let w = Welcome {
        refusal: refusal as u32,
        ..Welcome::default()
    };
    let mut msg = w.encode().to_vec();
    msg.extend_from_slice(reason.as_bytes());
    let _ = unix::send_with_fds(sock, &msg, &[]);
}

/// `/proc/PID/comm`, or `?`.
fn command_of(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim_end().to_owned())
        .unwrap_or_else(|_| "?".into())
}

fn free_status(e: FreeError) -> Status {
    match e {
        FreeError::AlreadyFree => Status::AlreadyFree,
        _ => Status::BadOffset,
    }
}

fn epoll_add(epoll: &Fd, fd: &Fd, tag: u64, events: u32) -> std::io::Result<()> {
    let mut ev = libc::epoll_event { events, u64: tag };
    // SAFETY: both descriptors are open; `ev` is a valid event.
    if unsafe { libc::epoll_ctl(epoll.raw(), libc::EPOLL_CTL_ADD, fd.raw(), &mut ev) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn epoll_del(epoll: &Fd, fd: &Fd) -> std::io::Result<()> {
    // SAFETY: both descriptors are open; DEL ignores the event argument.
    let rc = unsafe {
        libc::epoll_ctl(
            epoll.raw(),
            libc::EPOLL_CTL_DEL,
            fd.raw(),
            std::ptr::null_mut(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The signals the daemon handles, blocked in every thread and read from a signalfd.
fn signal_set() -> libc::sigset_t {
    // SAFETY: `sigemptyset` initialises the set; the rest add valid signal numbers.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Blocks the daemon's signals in the calling thread (and the threads it spawns later) and
/// ignores SIGPIPE. Call before spawning any thread.
pub fn block_signals() {
    let set = signal_set();
    // SAFETY: `set` is initialised; the old mask is not wanted.
    unsafe {
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
}

/// A new epoll set holding a signalfd for the daemon's signals.
fn epoll_with_signals() -> std::io::Result<(Fd, Fd)> {
    let set = signal_set();
    // SAFETY: `set` is initialised; -1 asks for a new signalfd.
    let sfd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
    if sfd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fresh descriptor owned here.
    let sfd = unsafe { Fd::from_raw(sfd) };
    // SAFETY: plain call.
    let efd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if efd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fresh descriptor owned here.
    let epoll = unsafe { Fd::from_raw(efd) };
    epoll_add(&epoll, &sfd, TAG_SIGNAL, libc::EPOLLIN as u32)?;
    Ok((epoll, sfd))
}

/// Whether process `pid` maps file `id` (its `/proc/PID/maps` names the file's device and
/// inode), or `None` if its maps cannot be read (the process is gone, or another user's and
/// this daemon may not trace it). Read as bytes: a file name need not be UTF-8.
fn maps_file(pid: u32, id: FileId) -> Option<bool> {
    let maps = std::fs::read(format!("/proc/{pid}/maps")).ok()?;
    let dev = format!("{:02x}:{:02x}", libc::major(id.dev), libc::minor(id.dev));
    let ino = id.ino.to_string();
    Some(maps.split(|&b| b == b'\n').any(|l| {
        let mut f = l
            .split(|b| b.is_ascii_whitespace())
            .filter(|f| !f.is_empty())
            .skip(3);
        f.next() == Some(dev.as_bytes()) && f.next() == Some(ino.as_bytes())
    }))
}
