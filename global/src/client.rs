//! A connection to `xallocd`: the three mapped segments, request slots, and the round trip.
//!
//! # Model
//!
//! - A [`Connection`] maps `/NAME.request` read-write, `/NAME.response` read-only and
//!   `/NAME.arena` read-write, after checking each segment's header (magic, version, sizes) and
//!   that one user owns all three.
//! - A [`Slot`] is one request slot, claimed for this process and registered with the daemon
//!   (`Hello`). One request is in flight per slot, so a thread uses its own slot; the
//!   [`Connection`] can be shared between threads. Dropping a slot says `Goodbye` and frees it.
//! - Blocks belong to the process, not to the slot: any slot of the process may free them, and
//!   the daemon frees the rest when the process exits (it watches a pidfd), however it exits.
//!
//! Nothing on the request path allocates, formats or takes a lock. A request waits at most
//! [`ANSWER_TIMEOUT`]; after a timeout the slot is abandoned (never reused, since the daemon may
//! still answer it), and the daemon reclaims it when the process exits. If the daemon dies, a
//! request waits up to [`RESTART_GRACE`] for a new daemon to re-attach to the segments (which
//! then answers it) before it fails with [`RequestError::DaemonGone`].

use core::fmt;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use xalloc_proto::os::{self, Errno, Fd, Mapping, ShmName, Wake};
use xalloc_proto::wire::{
    self, DaemonStats, Doorbell, LayoutError, Ledger, Op, RequestSlot, Response, ResponseSlot,
    SegmentHeader, SegmentKind, StatsSnapshot, Status, ARENA_DATA_OFFSET, DOORBELL_OFFSET,
    FLAG_ZEROED, HEADER_FLAG_HUGE_PAGES, STATS_OFFSET,
};

/// How long a request waits for its answer before the client gives up on the daemon.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a request waits for a new daemon to re-attach after its daemon died.
pub const RESTART_GRACE: Duration = Duration::from_millis(500);

/// How long a waiter spins (when more than one CPU is online) before it sleeps on the futex.
const SPIN_BUDGET: Duration = Duration::from_micros(20);

/// Spin iterations between two `sched_yield`s while the daemon last answered from another CPU
/// (a safety valve: the hint may be stale).
const SPINS_PER_YIELD: u32 = 256;

/// The longest single futex sleep: between sleeps the waiter checks that the daemon lives.
const SLEEP_SLICE: Duration = Duration::from_millis(50);

/// Why [`Connection::connect`] failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectError {
    /// The instance name is empty, too long, or holds a `/`.
    BadName,
    /// A segment does not exist: no daemon of this name runs.
    NotRunning {
        /// The missing segment.
        segment: SegmentKind,
    },
    /// A segment exists but this user may not open it.
    PermissionDenied {
        /// The segment.
        segment: SegmentKind,
    },
    /// A segment's header is not what this build expects.
    Layout {
        /// The segment.
        segment: SegmentKind,
        /// What is wrong with it.
        error: LayoutError,
    },
    /// The segments are not owned by one user, or the response segment is writable by others:
    /// they were not all made by one daemon.
    Ownership {
        /// The segment that differs.
        segment: SegmentKind,
    },
    /// The segments belong to different daemon instances (a restart raced with the connect).
    Mismatch,
    /// The daemon that made the segments no longer runs.
    DaemonGone {
        /// Its process id.
        pid: u32,
    },
    /// Another system call failed.
    Os {
        /// The segment concerned.
        segment: SegmentKind,
        /// The call.
        call: &'static str,
        /// Its error.
        errno: Errno,
    },
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadName => f.write_str("bad instance name (empty, too long, or contains '/')"),
            Self::NotRunning { segment } => write!(
                f,
                "no xallocd instance: its {segment} does not exist (start one with `xallocd start`)"
            ),
            Self::PermissionDenied { segment } => {
                write!(
                    f,
                    "permission denied opening the {segment} (see `xallocd start --group`)"
                )
            }
            Self::Layout { segment, error } => write!(f, "the {segment}: {error}"),
            Self::Ownership { segment } => write!(
                f,
                "the {segment} is not owned like the others of its instance; refusing it"
            ),
            Self::Mismatch => f.write_str("segments belong to different daemon instances"),
            Self::DaemonGone { pid } => write!(f, "the daemon (pid {pid}) no longer runs"),
            Self::Os {
                segment,
                call,
                errno,
            } => write!(f, "{call} of the {segment}: {errno}"),
        }
    }
}

impl std::error::Error for ConnectError {}

/// Why a request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RequestError {
    /// The daemon answered with an error status.
    Refused(Status),
    /// The daemon answered with a status this build does not know.
    UnknownStatus(u32),
    /// Every slot is taken.
    NoFreeSlot,
    /// No answer within [`ANSWER_TIMEOUT`]; the slot is abandoned.
    Timeout,
    /// The daemon exited; the slot is abandoned.
    DaemonGone,
    /// The slot was abandoned by an earlier timeout, or the process forked and this is the
    /// parent's slot.
    SlotUnusable,
    /// The daemon answered an allocation with a block not aligned as asked where this process
    /// maps the arena; the block was freed again.
    Misaligned,
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Refused(s) => write!(f, "refused by the daemon: {s:?}"),
            Self::UnknownStatus(s) => write!(f, "unknown status {s} from the daemon"),
            Self::NoFreeSlot => f.write_str("all request slots are taken"),
            Self::Timeout => write!(f, "no answer within {ANSWER_TIMEOUT:?}"),
            Self::DaemonGone => f.write_str("the daemon exited"),
            Self::SlotUnusable => f.write_str("slot abandoned or inherited through fork"),
            Self::Misaligned => f.write_str("the daemon answered with a misaligned block"),
        }
    }
}

impl std::error::Error for RequestError {}

/// One instance's segments, mapped and checked.
#[derive(Debug)]
pub struct Connection {
    request: Mapping,
    response: Mapping,
    arena: Mapping,
    arena_fd: Fd,
    slot_count: u32,
    granule: u32,
    /// The serving daemon's generation and pid: updated when a restarted daemon re-attaches to
    /// these same segments (see [`Connection::daemon_alive`]).
    generation: AtomicU64,
    daemon_pid: AtomicU32,
    spin: bool,
    /// The CPU the daemon last answered from (`u32::MAX`: not known yet).
    daemon_cpu: AtomicU32,
    /// The arena is mapped privately (in a forked child).
    private: AtomicBool,
}

/// Opens and maps segment `kind` of `name`, and checks its header.
fn attach(
    name: &str,
    kind: SegmentKind,
    writable: bool,
) -> Result<(Mapping, SegmentHeader, os::ObjectInfo, Fd), ConnectError> {
    let shm = ShmName::new(name, kind.suffix()).ok_or(ConnectError::BadName)?;
    let segment = kind;
    let os_err = |call, errno| ConnectError::Os {
        segment,
        call,
        errno,
    };
    let fd = os::shm_open(shm.as_cstr(), writable).map_err(|e| match e.0 {
        libc_codes::ENOENT => ConnectError::NotRunning { segment },
        libc_codes::EACCES | libc_codes::EPERM => ConnectError::PermissionDenied { segment },
        _ => os_err("shm_open", e),
    })?;
    let info = os::fstat(&fd).map_err(|e| os_err("fstat", e))?;
    let len = usize::try_from(info.len).map_err(|_| ConnectError::Layout {
        segment,
        error: LayoutError::BadSizes,
    })?;
    if len < size_of::<SegmentHeader>() {
        return Err(ConnectError::Layout {
            segment,
            error: LayoutError::TooShort {
                needed: size_of::<SegmentHeader>(),
                actual: len,
            },
        });
    }
    let map = Mapping::new(&fd, len, writable).map_err(|e| os_err("mmap", e))?;
    let header = SegmentHeader::load(map.header().expect("checked: longer than a header"));
    header
        .check(kind, len)
        .map_err(|error| ConnectError::Layout { segment, error })?;
    Ok((map, header, info, fd))
}

/// The errno values this module tells apart (the `libc` crate is not a dependency here).
mod libc_codes {
    pub const EPERM: i32 = 1;
    pub const ENOENT: i32 = 2;
    pub const EACCES: i32 = 13;
}

impl Connection {
    /// Connects to the daemon instance `name` (the `--name` it was started with).
    pub fn connect(name: &str) -> Result<Self, ConnectError> {
        let (request, rq, rq_info, _) = attach(name, SegmentKind::Request, true)?;
        let (response, rs, rs_info, _) = attach(name, SegmentKind::Response, false)?;
        let (arena, ar, ar_info, arena_fd) = attach(name, SegmentKind::Arena, true)?;
        // One owner for all three, and nobody but the owner may write the answers: otherwise
        // another user could have planted one of them.
        if rs_info.uid != rq_info.uid || rs_info.mode & 0o022 != 0 {
            return Err(ConnectError::Ownership {
                segment: SegmentKind::Response,
            });
        }
        if ar_info.uid != rq_info.uid {
            return Err(ConnectError::Ownership {
                segment: SegmentKind::Arena,
            });
        }
        if !rq.same_instance(&rs) || !rq.same_instance(&ar) || ar.arena_len as usize != arena.len()
        {
            return Err(ConnectError::Mismatch);
        }
        if !os::process_alive(rq.daemon_pid) {
            return Err(ConnectError::DaemonGone { pid: rq.daemon_pid });
        }
        if ar.flags & HEADER_FLAG_HUGE_PAGES != 0 {
            // Advice only: where it is refused the arena works the same with 4 KiB pages.
            let _ = arena.advise_huge_pages(ARENA_DATA_OFFSET, arena.len() - ARENA_DATA_OFFSET);
        }
        Ok(Self {
            request,
            response,
            arena,
            arena_fd,
            slot_count: rq.slot_count,
            granule: rq.granule,
            generation: AtomicU64::new(rq.generation),
            daemon_pid: AtomicU32::new(rq.daemon_pid),
            spin: os::online_cpus() > 1,
            daemon_cpu: AtomicU32::new(u32::MAX),
            private: AtomicBool::new(false),
        })
    }

    /// Number of request slots.
    pub fn slot_count(&self) -> u32 {
        self.slot_count
    }

    /// The arena's allocation granule: every block's size and offset are multiples of it.
    pub fn granule(&self) -> usize {
        self.granule as usize
    }

    /// The daemon instance's generation (changes with every daemon start).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// The daemon's process id.
    pub fn daemon_pid(&self) -> u32 {
        self.daemon_pid.load(Ordering::Relaxed)
    }

    /// The first byte of the arena's data: block offsets count from here.
    pub fn arena_base(&self) -> *mut u8 {
        // SAFETY: the arena segment is longer than `ARENA_DATA_OFFSET` (checked at connect).
        unsafe { self.arena.as_ptr().add(ARENA_DATA_OFFSET) }
    }

    /// Bytes of arena data.
    pub fn arena_len(&self) -> usize {
        self.arena.len() - ARENA_DATA_OFFSET
    }

    /// Whether `addr` points into the arena's data.
    pub fn contains(&self, addr: usize) -> bool {
        addr.wrapping_sub(self.arena_base().addr()) < self.arena_len()
    }

    /// The daemon's counters, read from the response segment without a request.
    pub fn stats(&self) -> Option<StatsSnapshot> {
        // SAFETY: the response segment holds the stats block at `STATS_OFFSET` (its length was
        // checked against the header).
        let stats: &DaemonStats = unsafe { self.response.at(STATS_OFFSET) };
        // The daemon may be preempted in the middle of a write: yield to it between bursts.
        for _ in 0..1000 {
            if let Some(s) = stats.load(100) {
                return Some(s);
            }
            os::yield_now();
        }
        None
    }

    /// Whether the daemon's arena is low on free room (under an eighth free): a hint, read
    /// without the statistics' sequence lock, for clients that keep freed blocks to give them
    /// back.
    pub fn arena_is_low(&self) -> bool {
        // SAFETY: as in `stats`.
        let stats: &DaemonStats = unsafe { self.response.at(STATS_OFFSET) };
        let (free, arena) = stats.free_and_arena_bytes();
        free < arena / 8
    }

    /// The daemon's doorbell.
    pub fn doorbell(&self) -> &Doorbell {
        // SAFETY: checked length; 64-aligned offset.
        unsafe { self.request.at(DOORBELL_OFFSET) }
    }

    /// Request slot `i` (for tests and tools that write raw requests; `i < slot_count`).
    pub fn request_slot(&self, i: u32) -> Option<&RequestSlot> {
        // SAFETY: `i < slot_count`, and the segment's length covers every slot (checked).
        (i < self.slot_count).then(|| unsafe { self.request.at(wire::request_slot_offset(i)) })
    }

    /// The ledger of slot `i` (`i < slot_count`): where this process keeps the blocks it
    /// caches for reuse and releases without a round trip (see [`Ledger`]).
    pub fn ledger(&self, i: u32) -> Option<&Ledger> {
        // SAFETY: as for `request_slot`: the segment's length covers every ledger.
        (i < self.slot_count)
            .then(|| unsafe { self.request.at(wire::ledger_offset(self.slot_count, i)) })
    }

    /// Asks the daemon to sweep the ledgers (after [`Ledger::put`] of a released block),
    /// waking it if it sleeps; waits for nothing.
    pub fn ring_sweep(&self) {
        let bell = self.doorbell();
        if bell.ring_sweep() {
            os::futex_wake(&bell.rings, 1);
        }
    }

    /// Response slot `i` (`i < slot_count`).
    pub fn response_slot(&self, i: u32) -> Option<&ResponseSlot> {
        // SAFETY: as for `request_slot`.
        (i < self.slot_count).then(|| unsafe { self.response.at(wire::response_slot_offset(i)) })
    }

    /// Whether a daemon runs and serves these segments. When the daemon that this connection
    /// was made with has died and a new one has re-attached to the same segments (it rewrote
    /// their headers), the connection follows it: requests in flight are answered by the new
    /// daemon, and the slots and blocks of this process are still its own.
    pub fn daemon_alive(&self) -> bool {
        let mut pid = self.daemon_pid.load(Ordering::Relaxed);
        if !os::process_alive(pid) {
            let Some(h) = self.request.header().map(SegmentHeader::load) else {
                return false;
            };
            let ours = h.check(SegmentKind::Request, self.request.len()).is_ok()
                && h.slot_count == self.slot_count
                && h.granule == self.granule;
            if !ours || h.daemon_pid == pid || !os::process_alive(h.daemon_pid) {
                return false;
            }
            pid = h.daemon_pid;
            self.generation.store(h.generation, Ordering::Relaxed);
            self.daemon_pid.store(pid, Ordering::Relaxed);
        }
        self.stats().is_none_or(|s| s.state != wire::STATE_STOPPING)
    }

    /// Claims a free slot for this process and registers it with the daemon.
    pub fn claim(&self) -> Result<Slot<'_>, RequestError> {
        let index = self.register()?;
        Ok(Slot {
            conn: self,
            index,
            pid: os::pid(),
            usable: true,
        })
    }

    /// Claims a free slot for this process, registers it with the daemon (`Hello`) and returns
    /// its index: the lower-level form of [`Connection::claim`] for callers that keep their own
    /// pool of slots. Give it back with [`Connection::unregister`].
    pub fn register(&self) -> Result<u32, RequestError> {
        let pid = os::pid();
        let start = pid % self.slot_count;
        for k in 0..self.slot_count {
            let i = (start + k) % self.slot_count;
            let Some(rs) = self.request_slot(i) else {
                continue;
            };
            if !rs.try_claim(pid) {
                continue;
            }
            self.doorbell().note_claim(i);
            return match self.request(i, Op::Hello, 0, 0, 0, 0) {
                Ok(_) => Ok(i),
                Err(e @ (RequestError::Timeout | RequestError::DaemonGone)) => Err(e),
                Err(e) => {
                    rs.release(pid);
                    Err(e)
                }
            };
        }
        Err(RequestError::NoFreeSlot)
    }

    /// Says `Goodbye` in slot `index` and frees it. The slot must be owned by this process with
    /// no request in flight.
    pub fn unregister(&self, index: u32) {
        match self.request(index, Op::Goodbye, 0, 0, 0, 0) {
            // The request may still be in flight: the slot stays claimed until the process
            // exits, when the daemon frees it.
            Err(RequestError::Timeout) => {}
            _ => {
                if let Some(rq) = self.request_slot(index) {
                    rq.release(os::pid());
                }
            }
        }
    }

    /// Sends a request in slot `index` and waits for the answer; an answer other than `Ok` is
    /// an error. The slot must be registered by this process, with no other request in flight
    /// on it (one thread at a time). After [`RequestError::Timeout`] the slot must not be used
    /// again: the daemon may still answer it.
    pub fn request(
        &self,
        index: u32,
        op: Op,
        flags: u32,
        size: u64,
        align: u64,
        offset: u64,
    ) -> Result<Response, RequestError> {
        let (Some(rq), Some(rs)) = (self.request_slot(index), self.response_slot(index)) else {
            return Err(RequestError::SlotUnusable);
        };
        let cpu = os::current_cpu();
        rq.cpu.store(cpu, Ordering::Relaxed);
        let seq = rq.submit(op, flags, size, align, offset);
        let bell = self.doorbell();
        if bell.ring() {
            os::futex_wake(&bell.rings, 1);
        }
        let r = self.wait(rq, rs, seq, cpu);
        self.daemon_cpu
            .store(rs.cpu.load(Ordering::Relaxed), Ordering::Relaxed);
        let r = r?;
        match Status::from_u32(r.status) {
            Some(Status::Ok) => Ok(r),
            Some(s) => Err(RequestError::Refused(s)),
            None => Err(RequestError::UnknownStatus(r.status)),
        }
    }

    /// Allocates in slot `index` (see [`Connection::request`]); see [`Slot::allocate`].
    pub fn allocate(
        &self,
        index: u32,
        size: u64,
        align: u64,
        zeroed: bool,
    ) -> Result<Block, RequestError> {
        let flags = if zeroed { FLAG_ZEROED } else { 0 };
        // The daemon aligns the block where this process sees the arena.
        let view = self.arena_base().addr() as u64 & (wire::MAX_ALIGN - 1);
        let r = self.request(index, Op::Allocate, flags, size, align, view)?;
        let mut block = self.block(r)?;
        if align == 0 || !block.as_ptr().addr().is_multiple_of(align as usize) {
            // Not what was asked for: given back, never handed to the caller. A free that got
            // no answer is reported as such, so that the slot is not used again.
            return Err(match self.free(index, block.offset) {
                Err(e @ (RequestError::Timeout | RequestError::DaemonGone)) => e,
                _ => RequestError::Misaligned,
            });
        }
        if self.private.load(Ordering::Relaxed) {
            // A private (copy-on-write) view may hold this process's own old writes where the
            // object is fresh: the daemon's word on zeroes does not hold here.
            block.zeroed = false;
        }
        if zeroed && !block.zeroed {
            // SAFETY: the block is ours, `size` bytes long, inside the arena mapping.
            unsafe { block.as_ptr().write_bytes(0, block.size as usize) };
        }
        Ok(block)
    }

    /// Frees the block at `offset` through slot `index`.
    pub fn free(&self, index: u32, offset: u64) -> Result<(), RequestError> {
        self.request(index, Op::Free, 0, 0, 0, offset).map(drop)
    }

    /// Resizes the block at `offset` in place through slot `index`.
    pub fn resize(&self, index: u32, offset: u64, new_size: u64) -> Result<Block, RequestError> {
        let r = self.request(index, Op::Reallocate, 0, new_size, 0, offset)?;
        self.block(r)
    }

    /// The block an answer describes, checked to lie inside the arena.
    fn block(&self, r: Response) -> Result<Block, RequestError> {
        let in_range = r
            .offset
            .checked_add(r.size)
            .is_some_and(|end| end <= self.arena_len() as u64);
        // A daemon that answers outside its own arena is not one to trust.
        let bad = RequestError::UnknownStatus(r.status);
        if !in_range {
            return Err(bad);
        }
        // SAFETY: `offset + size <= arena_len`, so the pointer stays inside the mapping.
        let p = unsafe { self.arena_base().add(r.offset as usize) };
        Ok(Block {
            offset: r.offset,
            size: r.size,
            zeroed: r.flags & FLAG_ZEROED != 0,
            ptr: NonNull::new(p).ok_or(bad)?,
        })
    }

    /// In a child process right after `fork`: replaces this process's shared mapping of the
    /// arena with a private copy-on-write mapping of the same object, at the same address, so
    /// that the child's writes into blocks it inherited never reach the parent. Blocks the
    /// child allocates afterwards live in private pages too, which only this process uses.
    ///
    /// # Safety
    /// Only in a freshly forked child that has one thread, before anything else touches the
    /// arena: the contents stay the same, but a concurrent access during the switch would
    /// race with it.
    pub unsafe fn privatize_arena_after_fork(&self) -> Result<(), Errno> {
        // SAFETY: the caller's contract; the mapping and the descriptor are this connection's.
        unsafe { os::remap_private(&self.arena, &self.arena_fd) }?;
        self.private.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Waits for the answer to request `seq`, submitted from CPU `cpu`: spins briefly when
    /// more than one CPU is online, then sleeps on the response's `seq` in slices, checking
    /// between slices that the daemon lives. When the daemon last answered from this same CPU,
    /// the spin yields at every turn, handing the CPU straight to the daemon.
    fn wait(
        &self,
        rq: &RequestSlot,
        rs: &ResponseSlot,
        seq: u32,
        cpu: u32,
    ) -> Result<Response, RequestError> {
        let start = Instant::now();
        let mut dead_since: Option<Instant> = None;
        if self.spin {
            let per_yield = if self.daemon_cpu.load(Ordering::Relaxed) == cpu {
                1
            } else {
                SPINS_PER_YIELD
            };
            let mut n = 0u32;
            loop {
                if let Some(r) = rs.read(seq) {
                    return Ok(r);
                }
                n = n.wrapping_add(1);
                if n.is_multiple_of(per_yield) {
                    if start.elapsed() > SPIN_BUDGET {
                        break;
                    }
                    os::yield_now();
                } else {
                    core::hint::spin_loop();
                }
            }
        }
        loop {
            rq.prepare_sleep();
            // After the fence in `prepare_sleep`: either the answer is visible here, or the
            // daemon sees `waiting` and wakes us.
            let seen = rs.seq.load(Ordering::Relaxed);
            if seen == seq {
                rq.woke();
                if let Some(r) = rs.read(seq) {
                    return Ok(r);
                }
                continue;
            }
            let woke = os::futex_wait(&rs.seq, seen, Some(SLEEP_SLICE));
            rq.woke();
            if let Some(r) = rs.read(seq) {
                return Ok(r);
            }
            if woke == Wake::TimedOut {
                if self.daemon_alive() {
                    dead_since = None;
                } else {
                    // A daemon restarted by its supervisor re-attaches within milliseconds and
                    // answers the requests waiting in the slots: give it a moment.
                    let since = *dead_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > RESTART_GRACE {
                        return Err(RequestError::DaemonGone);
                    }
                }
                if start.elapsed() > ANSWER_TIMEOUT {
                    return Err(RequestError::Timeout);
                }
            }
        }
    }
}

/// A block in the arena, as the daemon handed it out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Block {
    /// Offset from [`Connection::arena_base`].
    pub offset: u64,
    /// Usable size in bytes (the request rounded up to the granule).
    pub size: u64,
    /// Whether the daemon knows the memory is zero (fresh pages).
    pub zeroed: bool,
    ptr: NonNull<u8>,
}

impl Block {
    /// The block's first byte in this process.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

/// A claimed, registered request slot. Not `Sync`: one request at a time.
#[derive(Debug)]
pub struct Slot<'c> {
    conn: &'c Connection,
    index: u32,
    pid: u32,
    usable: bool,
}

impl Slot<'_> {
    /// The slot's index in the segments.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Sends a raw request; an answer other than `Ok` is an error. After a timeout, or once
    /// the daemon has gone, the slot refuses further requests.
    pub fn call(
        &mut self,
        op: Op,
        flags: u32,
        size: u64,
        align: u64,
        offset: u64,
    ) -> Result<Response, RequestError> {
        if !self.usable || os::pid() != self.pid {
            return Err(RequestError::SlotUnusable);
        }
        let r = self
            .conn
            .request(self.index, op, flags, size, align, offset);
        if matches!(r, Err(RequestError::Timeout | RequestError::DaemonGone)) {
            self.usable = false;
        }
        r
    }

    /// Allocates `size` bytes aligned to `align` (a power of two). With `zeroed`, the memory is
    /// zero: the daemon says whether its pages are fresh, and the client clears them otherwise.
    pub fn allocate(&mut self, size: u64, align: u64, zeroed: bool) -> Result<Block, RequestError> {
        self.check()?;
        let r = self.conn.allocate(self.index, size, align, zeroed);
        self.note(r)
    }

    /// Frees the block at `offset` (allocated by this process, through any of its slots).
    pub fn free(&mut self, offset: u64) -> Result<(), RequestError> {
        self.check()?;
        let r = self.conn.free(self.index, offset);
        self.note(r)
    }

    /// Resizes the block at `offset` in place to hold `new_size` bytes; refused with
    /// [`Status::NotInPlace`] when it cannot grow where it is.
    pub fn resize(&mut self, offset: u64, new_size: u64) -> Result<Block, RequestError> {
        self.check()?;
        let r = self.conn.resize(self.index, offset, new_size);
        self.note(r)
    }

    fn check(&self) -> Result<(), RequestError> {
        if self.usable && os::pid() == self.pid {
            Ok(())
        } else {
            Err(RequestError::SlotUnusable)
        }
    }

    fn note<T>(&mut self, r: Result<T, RequestError>) -> Result<T, RequestError> {
        if matches!(r, Err(RequestError::Timeout | RequestError::DaemonGone)) {
            self.usable = false;
        }
        r
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if !self.usable || os::pid() != self.pid {
            return;
        }
        // The daemon forgets the slot on Goodbye; the client frees it only after reading the
        // answer, so that a new owner's answers cannot be mistaken for this one's.
        self.conn.unregister(self.index);
    }
}
