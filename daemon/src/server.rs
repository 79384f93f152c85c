//! The request loop: the arena's allocator, who owns what, and the answer to every request.
//!
//! # State (all private to the daemon, none of it in client-writable memory)
//!
//! - `heap`: an [`OobHeap`] over the arena's data, its metadata in a table on the daemon's heap.
//! - the ownership record, in the daemon's own segment `/NAME.state`: for each granule `g`, the
//!   process id that owns the used block starting at `g` (0 elsewhere) and its length.
//!   Invariant: an entry has an owner iff a used block of that length starts at `g`. Each
//!   request updates it before its answer is published, so that after a crash a new daemon
//!   rebuilds a heap in which no block a client was told it holds is free ([`Server::new`]).
//! - `slot_pid[i]`: the process registered (`Hello`) in slot `i`, 0 if none.
//! - `clients`: per registered process, its pidfd (watched by the [`Watcher`] thread) and its
//!   counts of slots, blocks and bytes.
//! - `reserved` / `dirty`: per 2 MiB chunk of the arena, whether its pages are reserved in
//!   `/dev/shm`, and whether any block overlapping it was ever handed out (if not, its pages
//!   are still zero).
//!
//! Requests are validated field by field; a refused request changes nothing but the `errors`
//! counter. The heap's checked entry points (`deallocate_at`, `resize_at`) make a bad offset an
//! error rather than corruption even if this layer had a bug.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use xalloc_proto::os::{self, Fd, Mapping};
use xalloc_proto::wire::{
    self, Doorbell, Ledger, LedgerBlock, Op, OwnerEntry, Request, RequestSlot, Response,
    ResponseSlot, SegmentHeader, StatsSnapshot, Status, ARENA_DATA_OFFSET, DOORBELL_OFFSET,
    FLAG_ZEROED, HEADER_FLAG_HUGE_PAGES, MAX_ALIGN,
};
use xalloc_core::{FreeError, MetaEntry, OobHeap, ResizeError};

use crate::segments::Segments;

/// Block granule of the arena: a page, so blocks are page-aligned and reserved page-wise.
pub const GRANULE: usize = 4096;

/// Reservation and zero-tracking unit.
const CHUNK: u64 = 2 << 20;

/// How often the counters in the response segment are refreshed while requests keep coming
/// (they are refreshed as soon as none is pending).
const STATS_INTERVAL: Duration = Duration::from_millis(1);

/// Pause instructions per check of the doorbell while spinning (about 0.1 µs: a request that
/// arrives during a batch waits for the rest of it).
const SPIN_BATCH: u32 = 4;

/// Spin batches between two `sched_yield`s when the last client served runs on another CPU (a
/// safety valve: the hint may be stale). When it ran on the daemon's CPU, every batch yields.
const BATCHES_PER_YIELD: u32 = 1024;

/// One registered client process.
#[derive(Debug)]
struct Client {
    pidfd: Fd,
    slots: u32,
    blocks: u64,
    bytes: u64,
}

/// Events the watcher thread hands to the request loop.
#[derive(Debug, Default)]
pub struct Events {
    /// SIGTERM or SIGINT arrived.
    pub stop: bool,
    /// SIGHUP arrived.
    pub stats_line: bool,
    /// Client processes that exited.
    pub dead: Vec<u32>,
}

/// Shared between the request loop and the watcher thread.
#[derive(Debug, Default)]
pub struct Mailbox {
    /// Set when `events` holds something.
    pub flag: AtomicBool,
    /// The events.
    pub events: Mutex<Events>,
}

/// The daemon's request server.
pub struct Server {
    seg: Segments,
    heap: OobHeap,
    // The heap's metadata table; `heap` points into it, so it must outlive it (field order).
    _table: Box<[MetaEntry]>,
    slot_pid: Vec<u32>,
    clients: HashMap<u32, Client>,
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
    started_unix: u64,
    /// Reserving pages failed, and has not succeeded since (logged once per episode).
    shm_full: bool,
    /// More than one CPU is online: spinning can pay off.
    spin: bool,
    /// How long to spin for the next request before sleeping (`--spin-us`).
    spin_budget: Duration,
    /// This process's id (for the statistics).
    pid: u32,
    /// The CPU of the last batch of requests, and whether one of them came from a client on it.
    cpu: u32,
    client_on_my_cpu: bool,
    mailbox: Arc<Mailbox>,
    epoll: Arc<Fd>,
}

fn answer(status: Status) -> Response {
    Response {
        status: status as u32,
        flags: 0,
        offset: 0,
        size: 0,
    }
}

/// Whether this system gives huge pages to `/dev/shm` mappings that ask for them: `Err` says
/// why not, and what to change.
pub fn huge_pages_allowed() -> Result<(), String> {
    let policy = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
        .unwrap_or_default();
    if policy.contains("[force]") {
        return Ok(());
    }
    if policy.contains("[deny]") {
        return Err("shmem huge pages are denied (shmem_enabled is deny)".into());
    }
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    // The last mount on /dev/shm is the one in effect.
    let shm = mounts
        .lines()
        .rfind(|l| l.split_whitespace().nth(1) == Some("/dev/shm"));
    let huge = shm
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|opts| opts.split(',').find_map(|o| o.strip_prefix("huge=")));
    match huge {
        Some("advise" | "within_size" | "always") => Ok(()),
        _ => Err("/dev/shm is mounted without huge=advise; \
                  `mount -o remount,huge=advise /dev/shm` (as root) allows them"
            .into()),
    }
}

impl Server {
    /// A server over freshly created segments, or over the segments of a daemon that died
    /// (`seg.reattached`): then the heap is rebuilt from the ownership record, keeping the
    /// blocks and slots of clients that still run. `epoll` is the watcher's epoll descriptor,
    /// where client pidfds are registered.
    pub fn new(seg: Segments, mailbox: Arc<Mailbox>, epoll: Arc<Fd>) -> Result<Self, String> {
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
        let chunks = seg.arena_bytes.div_ceil(CHUNK) as usize;
        let slots = seg.slots as usize;
        let started_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let reattached = seg.reattached;
        let flags = seg
            .arena
            .header()
            .map_or(0, |h| SegmentHeader::load(h).flags);
        let huge_pages = flags & HEADER_FLAG_HUGE_PAGES != 0;
        if huge_pages {
            match seg.arena.advise_huge_pages(ARENA_DATA_OFFSET, bytes) {
                Ok(()) => log::info!("huge pages asked for on the arena"),
                Err(e) => log::warn!("huge pages: madvise(MADV_HUGEPAGE) failed: {e}"),
            }
        }
        let mut s = Self {
            seg,
            heap,
            _table: table,
            slot_pid: vec![0; slots],
            clients: HashMap::new(),
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
            started_unix,
            shm_full: false,
            spin: os::online_cpus() > 1,
            spin_budget: Duration::from_micros(crate::cli::DEFAULT_SPIN_US),
            pid: os::pid(),
            cpu: u32::MAX,
            client_on_my_cpu: false,
            mailbox,
            epoll,
        };
        if reattached {
            s.rebuild();
        }
        s.publish_stats();
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
            self.publish_stats();
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

    /// The owner of the used block starting at byte `offset` of the data, 0 if none.
    fn owner_at(&self, offset: usize) -> u32 {
        if !offset.is_multiple_of(GRANULE) || offset / GRANULE >= self.granules() {
            return 0;
        }
        self.entry(offset / GRANULE).owner.load(Ordering::Acquire)
    }

    /// Records (or, with `pid` 0, erases) the used block of `bytes` at byte `offset`.
    fn record(&self, offset: usize, bytes: u64, pid: u32) {
        let e = self.entry(offset / GRANULE);
        if pid != 0 {
            // The length first: a crash between the two stores leaves an entry without owner,
            // which reads as free.
            e.granules
                .store((bytes / GRANULE as u64) as u32, Ordering::Relaxed);
        }
        e.owner.store(pid, Ordering::Release);
    }

    /// Granules of arena data (entries in the state segment).
    fn granules(&self) -> usize {
        (self.seg.arena_bytes / GRANULE as u64) as usize
    }

    /// After a restart: rebuilds the heap from the ownership record, keeping the blocks of
    /// processes that still run and freeing those of processes that are gone, and registers
    /// the live owners and their slots again.
    fn rebuild(&mut self) {
        let (mut kept, mut kept_bytes, mut dropped) = (0u64, 0u64, 0u64);
        for g in 0..self.granules() {
            let e = self.entry(g);
            let pid = e.owner.load(Ordering::Acquire);
            if pid == 0 {
                continue;
            }
            let bytes = u64::from(e.granules.load(Ordering::Relaxed)) * GRANULE as u64;
            if !self.ensure_client(pid) {
                self.record(g * GRANULE, 0, 0);
                dropped += 1;
                continue;
            }
            match self.heap.allocate_at(g * GRANULE, bytes as usize) {
                Ok(()) => {
                    // The dead daemon reserved these pages before it handed the block out:
                    // recorded as reserved, they are never populated (and on failure punched)
                    // again while the block lives.
                    self.mark_reserved((g * GRANULE) as u64, bytes);
                    self.chunks_hold((g * GRANULE) as u64, bytes);
                    kept += 1;
                    kept_bytes += bytes;
                    if let Some(c) = self.clients.get_mut(&pid) {
                        c.blocks += 1;
                        c.bytes += bytes;
                    }
                }
                Err(err) => {
                    log::error!(
                        "state record for granule {g} ({bytes} bytes, pid {pid}) is unusable \
                         ({err}); dropping it"
                    );
                    self.record(g * GRANULE, 0, 0);
                    dropped += 1;
                }
            }
        }
        let mut slots = 0;
        for i in 0..self.seg.slots {
            let owner = self.request_slot(i).owner.load(Ordering::Acquire);
            if owner == 0 {
                continue;
            }
            if self.ensure_client(owner) {
                self.slot_pid[i as usize] = owner;
                if let Some(c) = self.clients.get_mut(&owner) {
                    c.slots += 1;
                }
                slots += 1;
            } else {
                self.request_slot(i).reclaim(owner);
            }
        }
        // Blocks released but not yet swept by the old daemon are freed now (each at most
        // once: the record says whether the client still holds it); ledgers of slots nobody
        // owns any more are emptied.
        for i in 0..self.seg.slots {
            match self.slot_pid[i as usize] {
                0 => Self::ledger_in(&self.seg.request, self.seg.slots, i).clear(),
                pid => {
                    self.drain_ledger(i, pid, false);
                }
            }
        }
        let returned = self.return_unused_chunks();
        log::info!(
            "re-attached to the existing segments: kept {kept} blocks ({kept_bytes} bytes) and \
             {slots} slots of {} live clients; freed {dropped} blocks of clients that are gone; \
             returned {returned} bytes of pages no kept block uses to the kernel",
            self.clients.len()
        );
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

    /// Checks the whole state: the heap's invariants, and that the ownership record lists
    /// exactly the heap's used blocks with their lengths, each owned by a registered client
    /// whose counts agree. O(granules + blocks); for SIGHUP, tests and fuzzing.
    pub fn check(&self) -> Result<(), String> {
        self.heap.check_invariants().map_err(|e| e.to_string())?;
        let mut per_client: HashMap<u32, (u64, u64)> = HashMap::new();
        for g in 0..self.granules() {
            let e = self.entry(g);
            let owner = e.owner.load(Ordering::Relaxed);
            let used = self.heap.block_size_at(g * GRANULE);
            match (owner, used) {
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
                    let c = per_client.entry(owner).or_default();
                    c.0 += 1;
                    c.1 += recorded;
                }
            }
        }
        // The chunks' block counts agree with the record.
        let mut used = vec![0u32; self.chunk_used.len()];
        for g in 0..self.granules() {
            let e = self.entry(g);
            if e.owner.load(Ordering::Relaxed) != 0 {
                let len = u64::from(e.granules.load(Ordering::Relaxed)) * GRANULE as u64;
                for c in self.chunks_of((g * GRANULE) as u64, len) {
                    used[c] += 1;
                }
            }
        }
        if used != self.chunk_used {
            return Err("per-chunk block counts differ from the record".into());
        }
        for (pid, (blocks, bytes)) in &per_client {
            match self.clients.get(pid) {
                Some(c) if c.blocks == *blocks && c.bytes == *bytes => {}
                Some(c) => {
                    return Err(format!(
                        "client {pid}: counts {} blocks / {} bytes, record {blocks} / {bytes}",
                        c.blocks, c.bytes
                    ))
                }
                None => return Err(format!("blocks of {pid}, which is not a client")),
            }
        }
        Ok(())
    }

    /// Registers process `pid` as a client if it runs (watching its pidfd); whether it is one.
    fn ensure_client(&mut self, pid: u32) -> bool {
        if self.clients.contains_key(&pid) {
            return true;
        }
        let Ok(pidfd) = os::pidfd_open(pid) else {
            return false;
        };
        if os::pidfd_exited(&pidfd) {
            return false;
        }
        if let Err(e) = watch(&self.epoll, &pidfd, pid) {
            log::error!("cannot watch client {pid}: {e}; refusing it");
            return false;
        }
        self.clients.insert(
            pid,
            Client {
                pidfd,
                slots: 0,
                blocks: 0,
                bytes: 0,
            },
        );
        true
    }

    fn doorbell(&self) -> &Doorbell {
        // SAFETY: the request segment holds the doorbell at its 64-aligned offset.
        unsafe { self.seg.request.at(DOORBELL_OFFSET) }
    }

    fn request_slot(&self, i: u32) -> &RequestSlot {
        // SAFETY: `i < slots` at every call site; the segment holds every slot.
        unsafe { self.seg.request.at(wire::request_slot_offset(i)) }
    }

    /// The ledger of slot `i` (see [`Ledger`]). A free function of the mapping, so that it can
    /// be held while the server changes.
    fn ledger_in(request: &Mapping, slots: u32, i: u32) -> &Ledger {
        assert!(i < slots);
        // SAFETY: `request` is `request_segment_len(slots)` long (checked when mapped), which
        // covers every ledger below `slots` at its 64-aligned offset.
        unsafe { request.at(wire::ledger_offset(slots, i)) }
    }

    /// Frees the blocks client `pid` released into the ledger of slot `i`, or, with `cached`,
    /// also takes back the ones it keeps cached. Returns (blocks, bytes) freed. A block the
    /// record does not give to `pid` is skipped: the ledger is the client's to write.
    fn drain_ledger(&mut self, i: u32, pid: u32, cached: bool) -> (u64, u64) {
        let request = Arc::clone(&self.seg.request);
        let ledger = Self::ledger_in(&request, self.seg.slots, i);
        let (mut blocks, mut bytes) = (0, 0);
        let mut free = |b: LedgerBlock| {
            let offset = u64::from(b.offset) * GRANULE as u64;
            let held = self.owner_at(offset as usize) == pid;
            let size = self.heap.block_size_at(offset as usize).unwrap_or(0) as u64;
            if held && self.free(pid, offset).status == Status::Ok as u32 {
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

    /// Frees what clients released into their ledgers since the last sweep.
    fn sweep_ledgers(&mut self) -> usize {
        let mut n = 0;
        for i in 0..self.seg.slots {
            let pid = self.slot_pid[i as usize];
            if pid != 0
                && Self::ledger_in(&self.seg.request, self.seg.slots, i)
                    .pending
                    .swap(0, Ordering::Acquire)
                    != 0
            {
                n += self.drain_ledger(i, pid, false).0 as usize;
            }
        }
        n
    }

    /// The arena is out of room: takes back every block clients keep cached (and what they
    /// released), so that an allocation can be tried again. Returns the bytes freed.
    fn take_back_caches(&mut self) -> u64 {
        let (mut blocks, mut bytes) = (0, 0);
        for i in 0..self.seg.slots {
            let pid = self.slot_pid[i as usize];
            if pid != 0 {
                let (b, n) = self.drain_ledger(i, pid, true);
                blocks += b;
                bytes += n;
            }
        }
        if blocks > 0 {
            log::info!(
                "arena full: took back {blocks} blocks ({bytes} bytes) that clients kept cached"
            );
        }
        bytes
    }

    fn response_slot(&self, i: u32) -> &ResponseSlot {
        // SAFETY: as for `request_slot`.
        unsafe { self.seg.response.at(wire::response_slot_offset(i)) }
    }

    /// Serves until SIGTERM or SIGINT, then answers what is pending with `ShuttingDown`.
    pub fn run(&mut self) {
        let mut last_work = Instant::now();
        let mut last_published = last_work;
        let mut stats_stale = false;
        loop {
            let seen = self.doorbell().rings.load(Ordering::Acquire);
            let mut served = self.serve_pending();
            if self.doorbell().take_sweep() {
                served += self.sweep_ledgers();
            }
            if self.mailbox.flag.load(Ordering::Acquire) && self.handle_events() {
                break;
            }
            if served > 0 {
                // Under load the counters are published at most once a millisecond; they are
                // always published before the daemon sleeps.
                last_work = Instant::now();
                if last_work.duration_since(last_published) > STATS_INTERVAL {
                    self.publish_stats();
                    last_published = last_work;
                } else {
                    stats_stale = true;
                }
                continue;
            }
            if stats_stale {
                self.publish_stats();
                last_published = Instant::now();
                stats_stale = false;
            }
            // Nothing pending: spin on the doorbell for a while, then sleep on it. The spin
            // yields the CPU every few batches: a client on this same CPU that waits for its
            // answer (or has the next request ready) runs at once instead of after the budget,
            // while with nothing else runnable a yield returns at once.
            if self.spin && last_work.elapsed() < self.spin_budget {
                let (batch, per_yield) = if self.client_on_my_cpu {
                    (1, 1)
                } else {
                    (SPIN_BATCH, BATCHES_PER_YIELD)
                };
                let mut batches = 0u32;
                while self.doorbell().rings.load(Ordering::Relaxed) == seen
                    && !self.mailbox.flag.load(Ordering::Relaxed)
                    && last_work.elapsed() < self.spin_budget
                {
                    for _ in 0..batch {
                        core::hint::spin_loop();
                    }
                    batches = batches.wrapping_add(1);
                    if batches.is_multiple_of(per_yield) {
                        os::yield_now();
                    }
                }
                continue;
            }
            // Idle pages due to go back to the kernel go now; the sleep lasts until the next
            // are due (only while more than `--retain` bytes are reserved), or a request.
            let due = self.decay_tick();
            let bell = self.doorbell();
            let now = bell.prepare_sleep();
            // After the fence in `prepare_sleep`: a client that submitted before it is seen
            // here (the ring count moved); one that submits after it sees `sleeping` and wakes
            // us.
            if now == seen && !self.mailbox.flag.load(Ordering::Acquire) {
                os::futex_wait(&bell.rings, seen, due);
            }
            bell.woke();
            last_work = Instant::now();
        }
        self.shut_down();
    }

    /// Answers every pending request once; returns how many.
    fn serve_pending(&mut self) -> usize {
        let hi = self
            .doorbell()
            .slots_hi
            .load(Ordering::Acquire)
            .min(self.seg.slots);
        let mut n = 0;
        self.cpu = os::current_cpu();
        for i in 0..hi {
            if let Some(req) = self.request_slot(i).take() {
                if n == 0 {
                    self.client_on_my_cpu = false;
                }
                self.client_on_my_cpu |= req.cpu == self.cpu;
                let resp = self.handle(i, &req);
                self.respond(i, req.seq, resp);
                n += 1;
            }
        }
        n
    }

    fn respond(&mut self, slot: u32, seq: u32, resp: Response) {
        self.requests += 1;
        // A block that cannot grow in place is an ordinary answer (the client moves it), not a
        // failure.
        if resp.status != Status::Ok as u32 && resp.status != Status::NotInPlace as u32 {
            self.errors += 1;
        }
        let rs = self.response_slot(slot);
        rs.cpu.store(self.cpu, Ordering::Relaxed);
        if rs.publish(self.request_slot(slot), seq, resp) {
            os::futex_wake(&rs.seq, u32::MAX);
        }
    }

    /// Validates and executes one request from slot `slot`.
    pub fn handle(&mut self, slot: u32, req: &Request) -> Response {
        if self.stopping {
            return answer(Status::ShuttingDown);
        }
        let op = Op::from_u32(req.op);
        if op == Some(Op::Hello) {
            return self.hello(slot, req.owner);
        }
        // Every other request comes from a registered slot, from its registered process.
        let pid = self.slot_pid[slot as usize];
        if pid == 0 || req.owner != pid {
            return answer(Status::BadSlot);
        }
        let Some(op) = op else {
            return answer(Status::UnknownOp);
        };
        let known_flags = if op == Op::Allocate { FLAG_ZEROED } else { 0 };
        if req.flags & !known_flags != 0 {
            return answer(Status::BadFlags);
        }
        match op {
            Op::Hello => self.hello(slot, req.owner),
            Op::Goodbye => {
                // What the slot's ledger holds is given up with it.
                self.drain_ledger(slot, pid, true);
                Self::ledger_in(&self.seg.request, self.seg.slots, slot).clear();
                self.slot_pid[slot as usize] = 0;
                if let Some(c) = self.clients.get_mut(&pid) {
                    c.slots = c.slots.saturating_sub(1);
                }
                answer(Status::Ok)
            }
            Op::Allocate => self.allocate(pid, req),
            Op::Free => self.free(pid, req.offset),
            Op::Reallocate => self.resize(pid, req.offset, req.size),
        }
    }

    fn hello(&mut self, slot: u32, pid: u32) -> Response {
        if pid == 0 {
            return answer(Status::BadSlot);
        }
        // A registered pid whose process has exited (its death not yet delivered) and whose
        // number was reused: reclaim the old one before registering the new one.
        if self
            .clients
            .get(&pid)
            .is_some_and(|c| os::pidfd_exited(&c.pidfd))
        {
            self.reclaim(pid);
        }
        let known = self.clients.contains_key(&pid);
        if !self.ensure_client(pid) {
            return answer(Status::BadSlot);
        }
        if !known {
            log::info!("client {pid} connected");
        }
        let old = std::mem::replace(&mut self.slot_pid[slot as usize], pid);
        if old != pid {
            // A new owner starts with an empty ledger (whatever was in it was not its own).
            Self::ledger_in(&self.seg.request, self.seg.slots, slot).clear();
        }
        if old != 0 {
            if let Some(c) = self.clients.get_mut(&old) {
                c.slots = c.slots.saturating_sub(1);
            }
        }
        if let Some(c) = self.clients.get_mut(&pid) {
            c.slots += 1;
        }
        answer(Status::Ok)
    }

    fn allocate(&mut self, pid: u32, req: &Request) -> Response {
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
        self.record(offset, size, pid);
        self.chunks_hold(offset as u64, size);
        if let Some(c) = self.clients.get_mut(&pid) {
            c.blocks += 1;
            c.bytes += size;
        }
        Response {
            status: Status::Ok as u32,
            flags: if fresh { FLAG_ZEROED } else { 0 },
            offset: offset as u64,
            size,
        }
    }

    /// The owner check shared by free and resize: `Err` if a used block starts at `offset` and
    /// belongs to another process. Other offset errors are left to the heap's checks.
    fn check_owner(&self, pid: u32, offset: u64) -> Result<usize, Status> {
        let off = usize::try_from(offset).map_err(|_| Status::BadOffset)?;
        match self.owner_at(off) {
            o if o != 0 && o != pid => Err(Status::NotOwner),
            _ => Ok(off),
        }
    }

    fn free(&mut self, pid: u32, offset: u64) -> Response {
        let off = match self.check_owner(pid, offset) {
            Ok(off) => off,
            Err(s) => return answer(s),
        };
        if self.owner_at(off) == pid {
            // Erased first: a crash after this leaves the block free, which the client that
            // asked to free it no longer uses.
            self.record(off, 0, 0);
        }
        match self.heap.deallocate_at(off) {
            Ok(size) => {
                self.chunks_release(off as u64, size as u64);
                if let Some(c) = self.clients.get_mut(&pid) {
                    c.blocks = c.blocks.saturating_sub(1);
                    c.bytes = c.bytes.saturating_sub(size as u64);
                }
                answer(Status::Ok)
            }
            Err(e) => answer(free_status(e)),
        }
    }

    fn resize(&mut self, pid: u32, offset: u64, new_size: u64) -> Response {
        let off = match self.check_owner(pid, offset) {
            Ok(off) => off,
            Err(s) => return answer(s),
        };
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
        let size = match self.heap.resize_at(off, new_size as usize) {
            Ok(size) => size as u64,
            Err(ResizeError::Block(e)) => return answer(free_status(e)),
            Err(ResizeError::BadSize) => return answer(Status::BadSize),
            Err(ResizeError::NoRoom | _) => return answer(Status::NotInPlace),
        };
        if size > old as u64 && self.reserve(off as u64, size).is_err() {
            let back = self.heap.resize_at(off, old);
            debug_assert!(back.is_ok());
            return answer(Status::OutOfMemory);
        }
        self.record(off, size, pid);
        self.chunks_release(off as u64, old as u64);
        self.chunks_hold(off as u64, size);
        if let Some(c) = self.clients.get_mut(&pid) {
            c.bytes = (c.bytes + size).saturating_sub(old as u64);
        }
        Response {
            status: Status::Ok as u32,
            flags: 0,
            offset,
            size,
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
                        "cannot reserve arena pages ({e}): /dev/shm is full or limited; \
                         allocations that need new pages get OutOfMemory until memory is freed"
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

    /// Frees everything client `pid` held: its slots and its blocks.
    fn reclaim(&mut self, pid: u32) {
        let Some(client) = self.clients.remove(&pid) else {
            return;
        };
        let _ = unwatch(&self.epoll, &client.pidfd);
        let mut slots = 0;
        for i in 0..self.seg.slots {
            let registered = self.slot_pid[i as usize] == pid;
            if registered {
                self.slot_pid[i as usize] = 0;
                // Its blocks, cached and released ones too, are freed below.
                Self::ledger_in(&self.seg.request, self.seg.slots, i).clear();
            }
            // Also slots it claimed but never registered.
            if self.request_slot(i).reclaim(pid) || registered {
                slots += 1;
            }
        }
        let (mut blocks, mut bytes) = (0u64, 0u64);
        if client.blocks > 0 {
            for g in 0..self.granules() {
                if self.entry(g).owner.load(Ordering::Relaxed) == pid {
                    self.record(g * GRANULE, 0, 0);
                    if let Ok(size) = self.heap.deallocate_at(g * GRANULE) {
                        self.chunks_release((g * GRANULE) as u64, size as u64);
                        blocks += 1;
                        bytes += size as u64;
                    }
                }
            }
        }
        log::info!(
            "client {pid} exited: reclaimed {blocks} blocks ({bytes} bytes) and {slots} slots"
        );
        self.publish_stats();
    }

    /// Frees slots claimed by processes that died before registering (between the claim and
    /// their `Hello`): the daemon watched no pidfd for them. Runs with every batch of events
    /// from the watcher (a client's exit, a signal).
    fn sweep_unregistered(&mut self) {
        let hi = self
            .doorbell()
            .slots_hi
            .load(Ordering::Acquire)
            .min(self.seg.slots);
        for i in 0..hi {
            let owner = self.request_slot(i).owner.load(Ordering::Acquire);
            if owner != 0
                && self.slot_pid[i as usize] == 0
                && !self.clients.contains_key(&owner)
                && !os::process_alive(owner)
                && self.request_slot(i).reclaim(owner)
            {
                log::info!(
                    "slot {i}: claimed by process {owner}, which exited before registering; freed"
                );
            }
        }
    }

    /// Handles the watcher's events; returns whether to stop.
    fn handle_events(&mut self) -> bool {
        self.mailbox.flag.store(false, Ordering::Release);
        let ev = match self.mailbox.events.lock() {
            Ok(mut g) => std::mem::take(&mut *g),
            Err(_) => return true,
        };
        for pid in ev.dead {
            self.reclaim(pid);
        }
        self.sweep_unregistered();
        if ev.stats_line {
            // On request only: the check walks every block and granule.
            let check = match self.check() {
                Ok(()) => "heap check ok".to_owned(),
                Err(e) => format!("heap check FAILED: {e}"),
            };
            log::info!("{}; {check}", self.stats_line());
            // Who holds what (blocks a client keeps in its cache of freed blocks included: they
            // are its own until it reuses them or the daemon takes them back), largest first,
            // at most 20 lines.
            let mut holders: Vec<(&u32, &Client)> = self.clients.iter().collect();
            holders.sort_by_key(|(_, c)| std::cmp::Reverse(c.bytes));
            for (pid, c) in holders.iter().take(20) {
                let cached: u64 = (0..self.seg.slots)
                    .filter(|&i| self.slot_pid[i as usize] == **pid)
                    .map(|i| {
                        Self::ledger_in(&self.seg.request, self.seg.slots, i)
                            .cached_granules
                            .load(Ordering::Relaxed)
                    })
                    // Client-written counters: saturating, whatever they say.
                    .fold(0u64, u64::saturating_add)
                    .saturating_mul(GRANULE as u64);
                log::info!(
                    "client {pid}: {} blocks, {} bytes ({cached} of them cached for reuse), {} \
                     slots",
                    c.blocks,
                    c.bytes,
                    c.slots
                );
            }
        }
        ev.stop
    }

    /// One line of statistics for the log.
    pub fn stats_line(&self) -> String {
        let s = self.snapshot();
        format!(
            "stats: {} clients, {} slots, {} live blocks, {} of {} bytes used, largest free {}, \
             {} bytes reserved, {} requests, {} errors",
            s.clients,
            s.slots,
            s.live_blocks,
            s.used_bytes,
            s.arena_bytes,
            s.largest_free_bytes,
            s.reserved_bytes,
            s.requests,
            s.errors
        )
    }

    fn snapshot(&self) -> StatsSnapshot {
        let h = self.heap.stats();
        StatsSnapshot {
            state: if self.stopping {
                wire::STATE_STOPPING
            } else {
                wire::STATE_RUNNING
            },
            pid: u64::from(self.pid),
            arena_bytes: h.region_bytes as u64,
            used_bytes: h.used_bytes as u64,
            free_bytes: h.free_bytes as u64,
            largest_free_bytes: h.largest_free_bytes as u64,
            live_blocks: h.live_blocks as u64,
            clients: self.clients.len() as u64,
            slots: self.clients.values().map(|c| u64::from(c.slots)).sum(),
            requests: self.requests,
            errors: self.errors,
            reserved_bytes: self.reserved_bytes,
            started_unix: self.started_unix,
        }
    }

    /// Writes the counters into the response segment.
    pub fn publish_stats(&self) {
        self.seg.stats().store(&self.snapshot());
    }

    /// Stops serving: answers every pending request with `ShuttingDown` and publishes the
    /// stopping state. The caller removes the segments.
    fn shut_down(&mut self) {
        self.stopping = true;
        self.publish_stats();
        self.serve_pending();
        self.publish_stats();
    }
}

fn free_status(e: FreeError) -> Status {
    match e {
        FreeError::AlreadyFree => Status::AlreadyFree,
        _ => Status::BadOffset,
    }
}

/// Tag of the signalfd in the epoll set (pids are below 2^22).
const SIGNAL_TAG: u64 = u64::MAX;

fn watch(epoll: &Fd, pidfd: &Fd, pid: u32) -> std::io::Result<()> {
    let mut ev = libc::epoll_event {
        events: (libc::EPOLLIN | libc::EPOLLONESHOT) as u32,
        u64: u64::from(pid),
    };
    // SAFETY: both descriptors are open; `ev` is a valid event.
    if unsafe { libc::epoll_ctl(epoll.raw(), libc::EPOLL_CTL_ADD, pidfd.raw(), &mut ev) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn unwatch(epoll: &Fd, pidfd: &Fd) -> std::io::Result<()> {
    // SAFETY: both descriptors are open; DEL ignores the event argument.
    let rc = unsafe {
        libc::epoll_ctl(
            epoll.raw(),
            libc::EPOLL_CTL_DEL,
            pidfd.raw(),
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

/// The thread that turns signals and client exits into [`Events`] for the request loop.
pub struct Watcher {
    /// The epoll set (signalfd and client pidfds).
    pub epoll: Arc<Fd>,
}

impl Watcher {
    /// Creates the epoll set with the signalfd, and starts the thread. `bell` is the request
    /// segment's doorbell word, rung (with a futex wake) after each event.
    pub fn start(mailbox: Arc<Mailbox>, request: Arc<Mapping>) -> std::io::Result<Self> {
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
        let epoll = Arc::new(unsafe { Fd::from_raw(efd) });
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: SIGNAL_TAG,
        };
        // SAFETY: both descriptors open; `ev` valid.
        if unsafe { libc::epoll_ctl(epoll.raw(), libc::EPOLL_CTL_ADD, sfd.raw(), &mut ev) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let ep = Arc::clone(&epoll);
        std::thread::Builder::new()
            .name("watcher".into())
            .spawn(move || {
                // SAFETY: the request segment holds the doorbell at its 64-aligned offset; the
                // mapping lives as long as this thread (it owns an `Arc` of it).
                let bell: &Doorbell = unsafe { request.at(DOORBELL_OFFSET) };
                watcher_loop(&ep, &sfd, &mailbox, &bell.rings)
            })?;
        Ok(Self { epoll })
    }
}

fn watcher_loop(epoll: &Fd, sfd: &Fd, mailbox: &Mailbox, bell: &AtomicU32) {
    let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 32];
    loop {
        // SAFETY: `evs` is writable for its length.
        let n = unsafe { libc::epoll_wait(epoll.raw(), evs.as_mut_ptr(), evs.len() as i32, -1) };
        if n < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            log::error!("epoll_wait: {}", std::io::Error::last_os_error());
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        let Ok(mut events) = mailbox.events.lock() else {
            return;
        };
        for ev in &evs[..n as usize] {
            let tag = ev.u64;
            if tag == SIGNAL_TAG {
                drain_signals(sfd, &mut events);
            } else {
                let pid = tag as u32;
                // Reported once (EPOLLONESHOT); the loop removes the pidfd when it reclaims.
                if !events.dead.contains(&pid) {
                    events.dead.push(pid);
                }
            }
        }
        drop(events);
        mailbox.flag.store(true, Ordering::Release);
        // Unconditional wake: the `sleeping` word is in client-writable memory, so it is not
        // trusted here.
        bell.fetch_add(1, Ordering::Release);
        os::futex_wake(bell, u32::MAX);
    }
}

fn drain_signals(sfd: &Fd, events: &mut Events) {
    loop {
        // SAFETY: all-zero is a valid siginfo; read fills it.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let want = size_of::<libc::signalfd_siginfo>();
        // SAFETY: `info` is writable for `want` bytes.
        let got = unsafe { libc::read(sfd.raw(), (&raw mut info).cast(), want) };
        if got != want as isize {
            return;
        }
        match info.ssi_signo as i32 {
            libc::SIGTERM | libc::SIGINT => events.stop = true,
            libc::SIGHUP => events.stats_line = true,
            _ => {}
        }
    }
}
