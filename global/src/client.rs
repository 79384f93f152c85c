//! A connection to `xallocd`: the instance socket, this client's own channel, the arena, and
//! the round trip.
//!
//! # Model
//!
//! - [`Connection::connect`] connects to the instance's Unix socket `/dev/shm/NAME.socket`,
//!   says [`Hello`] and receives a [`Welcome`] with three descriptors: the arena, this client's
//!   request channel (read-write) and its response channel (read-only). It checks that the
//!   arena and the request channel are sealed against resizing, that every header describes
//!   one daemon instance and agrees with the welcome, and that the daemon (the socket's peer,
//!   as the kernel reports it) is the user who owns the objects. Nothing in it allocates: it is
//!   called from inside a global allocator.
//! - The connection *is* the registration: the daemon knows this client by the kernel's word
//!   about the socket's peer, and when the socket closes (drop, exit, crash, `exec`: it is
//!   close-on-exec) the daemon frees the client's blocks. Blocks belong to the connection, not
//!   to the process: a block must be freed through the connection that allocated it.
//! - The channel is this client's alone. Its threads share its slots among themselves: a
//!   [`Slot`] is one slot claimed by a thread ([`Connection::claim`], or
//!   [`Connection::register`] for callers that keep their own pool), with one request in flight
//!   at a time; the [`Connection`] can be shared between threads.
//! - A request is written into the slot, the [`ClientBell`] is rung, and one wake byte goes to
//!   the socket if the daemon does not watch the channel ([`Connection::ring`]). The waiter
//!   spins briefly, then sleeps on the answer's futex in slices, checking between slices that
//!   the daemon lives.
//!
//! # Daemon liveness
//!
//! The daemon's pid comes from the response channel's header, which only the daemon can write.
//! A daemon restarted after a crash re-attaches to the channels and rewrites that header's pid
//! and generation; the connection follows it ([`Connection::daemon_alive`]). The socket's
//! hang-up is not a sign of death: a restarted daemon serves the old channels without the old
//! socket. A request waits at most [`ANSWER_TIMEOUT`]; after a timeout its slot is abandoned
//! (never reused: the daemon may still answer it). If the daemon dies, a request waits up to
//! [`RESTART_GRACE`] for a new daemon to re-attach before it fails with
//! [`RequestError::DaemonGone`].
//!
//! # fork
//!
//! The channel is mapped with `MADV_DONTFORK`: a forked child has no mapping of it, and the
//! addresses may hold other mappings there later. Every method that touches the channel checks
//! first that it runs in the process that connected, and refuses otherwise
//! ([`RequestError::SlotUnusable`], `None`, `false`); dropping the connection in a child never
//! unmaps those addresses. The child keeps a mapping of the arena (see
//! [`Connection::privatize_arena_after_fork`]) and a copy of the socket, which it should close
//! ([`Connection::close_inherited_socket`]) so that the daemon sees the parent's exit or
//! `exec`; it makes a connection of its own for its own requests.
//!
//! Nothing on the request path allocates, formats or takes a lock.

use core::ffi::CStr;
use core::fmt;
use core::mem::ManuallyDrop;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use xalloc_proto::os::{self, Errno, Fd, FileId, Mapping, Wake};
use xalloc_proto::unix;
use xalloc_proto::wire::{
    self, BlockFlags, ClientBell, DaemonBell, HandshakeError, HeaderFlags, Hello, HelloKind,
    LayoutError, Ledger, Op, Refusal, RequestSlot, Response, ResponseSlot, SegmentHeader,
    SegmentKind, Status, Welcome, ARENA_DATA_OFFSET,
};

/// How long a request waits for its answer before the client gives up on the daemon.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a request waits for a new daemon to re-attach after its daemon died.
pub const RESTART_GRACE: Duration = Duration::from_millis(500);

/// How long [`Connection::connect`] waits for the daemon's [`Welcome`].
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a waiter spins (when more than one CPU is online) before it sleeps on the futex.
const SPIN_BUDGET: Duration = Duration::from_micros(20);

/// Spin iterations between two `sched_yield`s while the daemon last answered from another CPU
/// (a safety valve: the hint may be stale).
const SPINS_PER_YIELD: u32 = 256;

/// The longest single futex sleep: between sleeps the waiter checks that the daemon lives.
const SLEEP_SLICE: Duration = Duration::from_millis(50);

/// Shortest time between two attempts to rebind a channel to a restarted daemon.
const REBIND_INTERVAL_NS: u64 = 100_000_000;

/// Bytes of a welcome message this client reads: the fixed part and a reason of a few lines.
const WELCOME_BUF: usize = 512;

/// Where an instance's socket lives: `/dev/shm/NAME.socket`.
const SOCKET_DIR: &[u8] = b"/dev/shm/";
/// The socket's suffix.
const SOCKET_SUFFIX: &[u8] = b".socket";
/// Bytes of a Unix socket path, NUL included (`sun_path`).
const SOCKET_PATH_CAP: usize = 108;

/// How many times this process's line of ancestors forked, as seen from here: bumped in every
/// child by a `pthread_atfork` handler that is registered when the program is loaded
/// ([`note_fork`]). A connection records the count it was made at, so that telling a forked child
/// (which has no mapping of its parent's channel) from the connecting process costs a load, not
/// a system call.
static FORKS: AtomicU64 = AtomicU64::new(0);

/// Counts a fork: call first thing in a child (the fork handler registered at load time does;
/// `XallocGlobal`'s own handler calls it too, because the order in which the two run is not
/// known). Async-signal-safe; counting one fork twice is harmless.
pub fn note_fork() {
    FORKS.fetch_add(1, Ordering::Relaxed);
}

extern "C" fn note_fork_in_child() {
    note_fork();
}

/// A page of this process's own that the kernel zero-fills in every child
/// (`MADV_WIPEONFORK`), however the child was made (`fork`, or a raw `clone` or `_Fork` that
/// runs no fork handler, so that [`FORKS`] alone would not see it): its first word is this
/// process's token, its pid, written on first use. Null until made, and for good where the
/// kernel cannot wipe a page ([`NO_TOKEN_PAGE`]).
static TOKEN_PAGE: AtomicPtr<AtomicU64> = AtomicPtr::new(core::ptr::null_mut());
static NO_TOKEN_PAGE: AtomicBool = AtomicBool::new(false);

/// This process's token (see [`TOKEN_PAGE`]), or 0 where the kernel cannot wipe a page on
/// fork. Two loads once set; allocation-free and async-signal-safe.
#[inline]
fn process_token() -> u64 {
    let mut page = TOKEN_PAGE.load(Ordering::Acquire);
    if page.is_null() {
        page = make_token_page();
        if page.is_null() {
            return 0;
        }
    }
    // SAFETY: a published token page is a live, page-aligned, zero-filled mapping that is never
    // unmapped (a child inherits it, wiped, at the same address).
    let word = unsafe { &*page };
    match word.load(Ordering::Relaxed) {
        0 => {
            // First use in this process: its pid and the time (a token only tells this
            // process from its ancestors; the time tells apart a parent and a child of the
            // same pid in different pid namespaces).
            let token = u64::from(os::pid()) | (os::monotonic_ns() << 32) | 1;
            let _ = word.compare_exchange(0, token, Ordering::Relaxed, Ordering::Relaxed);
            word.load(Ordering::Relaxed)
        }
        t => t,
    }
}

#[cold]
#[inline(never)]
fn make_token_page() -> *mut AtomicU64 {
    if NO_TOKEN_PAGE.load(Ordering::Relaxed) {
        return core::ptr::null_mut();
    }
    // A failure is for good: a token that appeared later would differ from the 0 that
    // connections made meanwhile recorded, and retire them in the process that made them.
    let Ok(map) = Mapping::anonymous(4096) else {
        NO_TOKEN_PAGE.store(true, Ordering::Relaxed);
        return core::ptr::null_mut();
    };
    if map.wipe_on_fork().is_err() {
        NO_TOKEN_PAGE.store(true, Ordering::Relaxed);
        return core::ptr::null_mut();
    }
    let p = map.as_ptr().cast::<AtomicU64>();
    match TOKEN_PAGE.compare_exchange(
        core::ptr::null_mut(),
        p,
        Ordering::AcqRel,
        Ordering::Acquire,
    ) {
        Ok(_) => {
            // Published: kept for the life of the process.
            core::mem::forget(map);
            p
        }
        // Another thread's page won; this one is unmapped.
        Err(theirs) => theirs,
    }
}

/// Registers [`note_fork_in_child`] when the program is loaded (an ELF constructor), before
/// `main` and before the program can fork.
extern "C" fn register_fork_counter() {
    // SAFETY: the handler only increments an atomic, which is async-signal-safe.
    unsafe { at_fork_in_child(note_fork_in_child) };
    // The token page too, while nothing else runs.
    let _ = process_token();
}

/// Registers `child` to run in every child right after `fork` (`pthread_atfork`).
///
/// # Safety
/// `child` must be async-signal-safe.
pub(crate) unsafe fn at_fork_in_child(child: extern "C" fn()) {
    extern "C" {
        fn pthread_atfork(
            prepare: Option<extern "C" fn()>,
            parent: Option<extern "C" fn()>,
            child: Option<extern "C" fn()>,
        ) -> i32;
    }
    // SAFETY: the caller's contract; the function pointer is 'static.
    unsafe { pthread_atfork(None, None, Some(child)) };
}

#[used]
#[link_section = ".init_array"]
static REGISTER_FORK_COUNTER: extern "C" fn() = register_fork_counter;

/// Why [`Connection::connect`] failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectError {
    /// The instance name is empty, too long for a socket path, or holds a `/` or NUL.
    BadName,
    /// No daemon of this name runs: its socket does not exist, or nobody listens on it.
    NotRunning,
    /// The socket exists but this user may not connect to it.
    PermissionDenied,
    /// The daemon did not answer within [`HANDSHAKE_TIMEOUT`], or its queue of new connections
    /// is full.
    Busy,
    /// The daemon refused this client.
    Refused {
        /// Why.
        refusal: Refusal,
    },
    /// The daemon's answer to the handshake is not one this build understands.
    Protocol {
        /// What was wrong with it.
        what: &'static str,
    },
    /// A segment's header is not what this build expects.
    Layout {
        /// The segment.
        segment: SegmentKind,
        /// What is wrong with it.
        error: LayoutError,
    },
    /// A segment can change size (it is not a memfd sealed against shrinking and growing): a
    /// daemon that hands out such objects is not ours.
    NotSealed {
        /// The segment.
        segment: SegmentKind,
    },
    /// A segment is not owned by the user the daemon runs as.
    Ownership {
        /// The segment that differs.
        segment: SegmentKind,
    },
    /// The segments, or the segments and the welcome, describe different daemon instances.
    Mismatch,
    /// The daemon that made the segments no longer runs.
    DaemonGone {
        /// Its process id.
        pid: u32,
    },
    /// Another system call failed.
    Os {
        /// The call.
        call: &'static str,
        /// Its error.
        errno: Errno,
    },
}

/// A fixed sentence for a refusal, for [`ConnectError`]'s `Display`.
fn refusal_text(r: Refusal) -> &'static str {
    match r {
        Refusal::None => "the daemon refused without saying why",
        Refusal::NotServed => "the daemon does not serve this user (see `xallocd start --group`)",
        Refusal::BadVersion => {
            "the daemon speaks another protocol version (this program and xallocd come from \
             different xalloc builds)"
        }
        Refusal::Busy => {
            "the daemon cannot take another client now (out of descriptors or memory); \
             try again later"
        }
        Refusal::ShuttingDown => "the daemon is shutting down",
        Refusal::BadHello => "the daemon did not understand this client's hello",
    }
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadName => f.write_str(
                "bad instance name (empty, too long for a socket path, or contains '/')",
            ),
            Self::NotRunning => f.write_str(
                "no xallocd instance of this name runs (start one with `xallocd start`)",
            ),
            Self::PermissionDenied => f.write_str(
                "permission denied connecting to the daemon (see `xallocd start --group`)",
            ),
            Self::Busy => write!(
                f,
                "the daemon did not take the connection within {HANDSHAKE_TIMEOUT:?}"
            ),
            Self::Refused { refusal } => f.write_str(refusal_text(*refusal)),
            Self::Protocol { what } => write!(f, "bad handshake from the daemon: {what}"),
            Self::Layout { segment, error } => write!(f, "the {segment}: {error}"),
            Self::NotSealed { segment } => write!(
                f,
                "the {segment} the daemon handed over can change size; refusing it"
            ),
            Self::Ownership { segment } => write!(
                f,
                "the {segment} is not owned by the daemon's user; refusing it"
            ),
            Self::Mismatch => f.write_str("the segments belong to different daemon instances"),
            Self::DaemonGone { pid } => write!(f, "the daemon (pid {pid}) no longer runs"),
            Self::Os { call, errno } => write!(f, "{call}: {errno}"),
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
    /// Every slot of the channel is taken.
    NoFreeSlot,
    /// No answer within [`ANSWER_TIMEOUT`]; the slot is abandoned.
    Timeout,
    /// The daemon exited; the slot is abandoned.
    DaemonGone,
    /// The slot was abandoned by an earlier timeout, or this process is not the one that
    /// connected (a forked child: the channel is not mapped here).
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
            Self::SlotUnusable => {
                f.write_str("slot abandoned, or connection inherited through fork")
            }
            Self::Misaligned => f.write_str("the daemon answered with a misaligned block"),
        }
    }
}

impl std::error::Error for RequestError {}

/// One client connection: the socket, this client's channel and the arena, mapped and checked.
#[derive(Debug)]
pub struct Connection {
    /// The socket's descriptor (-1 once closed in a forked child, or lost).
    sock: AtomicI32,
    /// The file `sock` names (device, inode; written before `sock` when the socket changes):
    /// the program may close the descriptor (`close_range`) and open another file under its
    /// number, into which no wake byte must go, and which must never be closed or replaced.
    sock_dev: AtomicU64,
    sock_ino: AtomicU64,
    /// The file `arena_fd` named at connect, checked before it is mapped again after fork
    /// or closed (as `sock`).
    arena_id: FileId,
    /// The request channel, read-write, `MADV_DONTFORK`: unmapped on drop only in `pid`.
    request: ManuallyDrop<Mapping>,
    /// The response channel, read-only, `MADV_DONTFORK`: as `request`.
    response: ManuallyDrop<Mapping>,
    arena: Mapping,
    arena_fd: ManuallyDrop<Fd>,
    slot_count: u32,
    granule: u32,
    client_id: u32,
    /// The process that connected: the only one that maps the channel.
    pid: u32,
    /// [`FORKS`] and [`process_token`] when the connection was made: either different means
    /// this is a forked child, which has no mapping of the channel.
    forks: u64,
    token: u64,
    /// The socket's path, NUL-terminated, for [`HelloKind::Rebind`].
    path: [u8; SOCKET_PATH_CAP],
    /// The user the daemon runs as (who owns the arena and the channel).
    daemon_uid: u32,
    /// The serving daemon's generation and pid: updated when a restarted daemon re-attaches to
    /// this channel (see [`Connection::daemon_alive`]).
    generation: AtomicU64,
    daemon_pid: AtomicU32,
    /// The daemon whose connection the socket is: differs from `daemon_pid` after a restarted
    /// daemon re-attached, until the channel is rebound to it.
    bound_pid: AtomicU32,
    /// A thread is rebinding the channel.
    rebinding: AtomicBool,
    /// The program closed the socket and the daemon refused a new one for this channel: it
    /// serves this connection no more ([`Connection::daemon_alive`] says `false`).
    orphaned: AtomicBool,
    /// When the next attempt to rebind may be made (monotonic ns).
    next_rebind: AtomicU64,
    spin: bool,
    /// The CPU the daemon last answered from (`u32::MAX`: not known yet).
    daemon_cpu: AtomicU32,
    /// The arena is mapped privately (in a forked child).
    private: AtomicBool,
}

/// `/dev/shm/{name}.socket` as a C string in `buf`, or `None` if the name is empty, holds a
/// `/` or NUL, or makes the path too long for a Unix socket.
fn socket_path<'b>(name: &str, buf: &'b mut [u8; SOCKET_PATH_CAP]) -> Option<&'b CStr> {
    let n = name.as_bytes();
    let len = SOCKET_DIR.len() + n.len() + SOCKET_SUFFIX.len();
    if n.is_empty() || n.iter().any(|&c| c == b'/' || c == 0) || len + 1 > SOCKET_PATH_CAP {
        return None;
    }
    let (dir, rest) = buf.split_at_mut(SOCKET_DIR.len());
    dir.copy_from_slice(SOCKET_DIR);
    rest[..n.len()].copy_from_slice(n);
    rest[n.len()..n.len() + SOCKET_SUFFIX.len()].copy_from_slice(SOCKET_SUFFIX);
    rest[n.len() + SOCKET_SUFFIX.len()] = 0;
    CStr::from_bytes_with_nul(&buf[..=len]).ok()
}

/// What a connected socket's error means for a connection attempt.
fn socket_error(call: &'static str, e: Errno) -> ConnectError {
    match e.0 {
        libc::ENOENT | libc::ECONNREFUSED | libc::ECONNRESET | libc::EPIPE => {
            ConnectError::NotRunning
        }
        libc::EACCES | libc::EPERM => ConnectError::PermissionDenied,
        libc::EAGAIN => ConnectError::Busy,
        _ => ConnectError::Os { call, errno: e },
    }
}

/// Waits for the daemon's one answer on `sock` until `deadline`, retrying calls a signal
/// interrupted.
fn receive(sock: &Fd, buf: &mut [u8], deadline: Instant) -> Result<unix::Received, ConnectError> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ConnectError::Busy);
        }
        match unix::recv_with_fds(sock, buf, left) {
            Ok(Some(r)) => return Ok(r),
            Ok(None) => {
                return Err(ConnectError::Protocol {
                    what: "the daemon closed the connection without an answer",
                })
            }
            Err(Errno(libc::EINTR)) => continue,
            Err(Errno(libc::EAGAIN)) => {
                // A timeout, or a wake-up with nothing to read: look again until the deadline.
                continue;
            }
            Err(e) => return Err(socket_error("recvmsg", e)),
        }
    }
}

/// Maps descriptor `fd` of segment `kind` whole and checks its header; returns the mapping,
/// the header and the object's owner.
fn attach(
    fd: &Fd,
    kind: SegmentKind,
    writable: bool,
) -> Result<(Mapping, SegmentHeader, u32), ConnectError> {
    let segment = kind;
    let info = os::fstat(fd).map_err(|errno| ConnectError::Os {
        call: "fstat",
        errno,
    })?;
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
    let map = Mapping::new(fd, len, writable).map_err(|errno| ConnectError::Os {
        call: "mmap",
        errno,
    })?;
    let Some(words) = map.header() else {
        return Err(ConnectError::Layout {
            segment,
            error: LayoutError::TooShort {
                needed: size_of::<SegmentHeader>(),
                actual: len,
            },
        });
    };
    let header = SegmentHeader::load(words);
    header
        .check(kind, len)
        .map_err(|error| ConnectError::Layout { segment, error })?;
    Ok((map, header, info.uid))
}

/// Maps the arena handed over with `welcome`, read-write, after checking that the object is
/// as long as the welcome says and longer than its header page; returns the mapping and the
/// object's owner.
fn map_arena(fd: &Fd, welcome: &Welcome) -> Result<(Mapping, u32), ConnectError> {
    let segment = SegmentKind::Arena;
    let info = os::fstat(fd).map_err(|errno| ConnectError::Os {
        call: "fstat",
        errno,
    })?;
    if info.len != welcome.arena_len || info.len <= ARENA_DATA_OFFSET as u64 {
        return Err(ConnectError::Layout {
            segment,
            error: LayoutError::BadSizes,
        });
    }
    let len = usize::try_from(info.len).map_err(|_| ConnectError::Layout {
        segment,
        error: LayoutError::BadSizes,
    })?;
    let map = Mapping::new(fd, len, true).map_err(|errno| ConnectError::Os {
        call: "mmap",
        errno,
    })?;
    Ok((map, info.uid))
}

/// Connects to the socket at `path`, says `hello` and waits (at most [`HANDSHAKE_TIMEOUT`])
/// for the daemon's answer, read into `buf`. Returns the socket, its peer (the daemon, as the
/// kernel saw it listen), the welcome and the message with its descriptors; a refusal is an
/// error.
fn handshake(
    path: &CStr,
    hello: Hello,
    buf: &mut [u8],
) -> Result<(Fd, unix::Peer, Welcome, unix::Received), ConnectError> {
    let sock = unix::connect(path).map_err(|e| socket_error("connect", e))?;
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    unix::send_with_fds(&sock, &hello.encode(), &[]).map_err(|e| socket_error("sendmsg", e))?;
    let msg = receive(&sock, buf, deadline)?;
    let (welcome, _reason) =
        Welcome::decode(&buf[..msg.len]).map_err(|e| ConnectError::Protocol {
            what: match e {
                HandshakeError::BadMagic => "not an xalloc welcome",
                HandshakeError::BadVersion(_) => "a welcome of another protocol version",
                HandshakeError::BadField => "a welcome field out of range",
            },
        })?;
    if welcome.refusal != 0 {
        // Descriptors sent with a refusal, if any, are closed with `msg`.
        return Err(match Refusal::from_u32(welcome.refusal) {
            Some(refusal) => ConnectError::Refused { refusal },
            None => ConnectError::Protocol {
                what: "a refusal code this build does not know",
            },
        });
    }
    let daemon = unix::peer(&sock).map_err(|errno| ConnectError::Os {
        call: "getsockopt(SO_PEERCRED)",
        errno,
    })?;
    Ok((sock, daemon, welcome, msg))
}

/// Keeps a mapping out of forked children (`MADV_DONTFORK`).
fn dont_fork(map: &Mapping) -> Result<(), ConnectError> {
    map.dont_fork().map_err(|errno| ConnectError::Os {
        call: "madvise(MADV_DONTFORK)",
        errno,
    })
}

impl Connection {
    /// Connects to the daemon instance `name` (the `--name` it was started with). Allocates
    /// nothing; waits at most [`HANDSHAKE_TIMEOUT`] for the daemon's answer.
    pub fn connect(name: &str) -> Result<Self, ConnectError> {
        let mut path = [0u8; SOCKET_PATH_CAP];
        socket_path(name, &mut path).ok_or(ConnectError::BadName)?;
        let hello = Hello {
            kind: HelloKind::Client,
            client_id: 0,
        };
        let mut buf = [0u8; WELCOME_BUF];
        let cpath = CStr::from_bytes_until_nul(&path).map_err(|_| ConnectError::BadName)?;
        let (sock, daemon, welcome, mut msg) = handshake(cpath, hello, &mut buf)?;
        if msg.truncated || msg.fds_truncated || msg.fds[3..].iter().any(Option::is_some) {
            return Err(ConnectError::Protocol {
                what: "more in the welcome than a welcome holds",
            });
        }
        let (Some(arena_fd), Some(request_fd), Some(response_fd)) =
            (msg.fds[0].take(), msg.fds[1].take(), msg.fds[2].take())
        else {
            return Err(ConnectError::Protocol {
                what: "an acceptance without its three descriptors",
            });
        };
        // Nobody can resize what this process maps: a truncated object would raise SIGBUS.
        if !unix::size_is_sealed(&arena_fd) {
            return Err(ConnectError::NotSealed {
                segment: SegmentKind::Arena,
            });
        }
        if !unix::size_is_sealed(&request_fd) {
            return Err(ConnectError::NotSealed {
                segment: SegmentKind::Request,
            });
        }
        let (request, rq, rq_uid) = attach(&request_fd, SegmentKind::Request, true)?;
        let (response, rs, rs_uid) = attach(&response_fd, SegmentKind::Response, false)?;
        // The arena's header is in memory every client may write: it is not read here. What
        // the arena is comes from the welcome (the daemon's word, over a socket the kernel
        // vouches for) and from the object itself.
        let (arena, ar_uid) = map_arena(&arena_fd, &welcome)?;
        dont_fork(&request)?;
        dont_fork(&response)?;
        // The peer is the daemon as the kernel saw it listen: it must own what it handed over.
        for (segment, uid) in [
            (SegmentKind::Arena, ar_uid),
            (SegmentKind::Request, rq_uid),
            (SegmentKind::Response, rs_uid),
        ] {
            if uid != daemon.uid {
                return Err(ConnectError::Ownership { segment });
            }
        }
        let agrees = rq.same_instance(&rs)
            && welcome.slots == rq.slot_count
            && welcome.granule == rq.granule
            && welcome.arena_len == rq.arena_len
            && welcome.generation == rq.generation
            && welcome.daemon_pid == rq.daemon_pid;
        if !agrees || rq.slot_count == 0 || rq.granule == 0 {
            return Err(ConnectError::Mismatch);
        }
        if !os::process_alive(rs.daemon_pid) {
            return Err(ConnectError::DaemonGone { pid: rs.daemon_pid });
        }
        if HeaderFlags::from_bits_retain(welcome.flags).contains(HeaderFlags::HUGE_PAGES) {
            // Advice only: where it is refused the arena works the same with 4 KiB pages.
            let _ = arena.advise_huge_pages(ARENA_DATA_OFFSET, arena.len() - ARENA_DATA_OFFSET);
        }
        // The channel's descriptors are not needed once mapped; the arena's is, to remap it
        // privately in a forked child.
        drop((request_fd, response_fd));
        let id = |fd: &Fd| {
            FileId::of_raw(fd.raw()).map_err(|errno| ConnectError::Os {
                call: "fstat",
                errno,
            })
        };
        let (sock_id, arena_id) = (id(&sock)?, id(&arena_fd)?);
        Ok(Self {
            sock: AtomicI32::new(sock.into_raw()),
            sock_dev: AtomicU64::new(sock_id.dev),
            sock_ino: AtomicU64::new(sock_id.ino),
            arena_id,
            request: ManuallyDrop::new(request),
            response: ManuallyDrop::new(response),
            arena,
            arena_fd: ManuallyDrop::new(arena_fd),
            slot_count: rq.slot_count,
            granule: rq.granule,
            client_id: welcome.client_id,
            pid: os::pid(),
            forks: FORKS.load(Ordering::Relaxed),
            token: process_token(),
            path,
            daemon_uid: daemon.uid,
            generation: AtomicU64::new(rs.generation),
            daemon_pid: AtomicU32::new(rs.daemon_pid),
            bound_pid: AtomicU32::new(rs.daemon_pid),
            rebinding: AtomicBool::new(false),
            orphaned: AtomicBool::new(false),
            next_rebind: AtomicU64::new(0),
            spin: os::online_cpus() > 1,
            daemon_cpu: AtomicU32::new(u32::MAX),
            private: AtomicBool::new(false),
        })
    }

    /// Number of request slots in this client's channel.
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

    /// This client's id in the daemon instance (from the welcome): the owner of its blocks.
    pub fn client_id(&self) -> u32 {
        self.client_id
    }

    /// The process that made the connection: the only one in which its channel is mapped.
    pub fn connected_pid(&self) -> u32 {
        self.pid
    }

    /// Whether this process made the connection (not a forked child of the one that did).
    ///
    /// Loads of a fork counter (see [`note_fork`]) and of a token the kernel wipes in every
    /// child (a `MADV_WIPEONFORK` page), not a `getpid` system call: this is on every request's
    /// path. The token also tells a child made without the C library's fork handlers (a raw
    /// `clone`, glibc's `_Fork`), on kernels from 4.14.
    #[inline]
    pub fn in_connecting_process(&self) -> bool {
        FORKS.load(Ordering::Relaxed) == self.forks && process_token() == self.token
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

    /// This client's bell (in the request channel), or `None` in a process other than the one
    /// that connected.
    pub fn bell(&self) -> Option<&ClientBell> {
        // SAFETY: checked to be the connecting process.
        self.in_connecting_process()
            .then(|| unsafe { self.bell_here() })
    }

    /// The daemon's bell and hints for this client (in the response channel), or `None` in a
    /// process other than the one that connected.
    pub fn daemon_bell(&self) -> Option<&DaemonBell> {
        // SAFETY: checked to be the connecting process.
        self.in_connecting_process()
            .then(|| unsafe { self.daemon_bell_here() })
    }

    /// This client's ledger: where it keeps the blocks it caches for reuse and releases
    /// without a round trip (see [`Ledger`]); `None` in a process other than the one that
    /// connected. Ring ([`Connection::ring`]) after putting a released block in it.
    pub fn ledger(&self) -> Option<&Ledger> {
        // SAFETY: checked to be the connecting process; the channel's length covers the
        // ledger (checked at connect) and its offset is 64-aligned.
        self.in_connecting_process()
            .then(|| unsafe { self.request.at(wire::ledger_offset(self.slot_count)) })
    }

    /// Request slot `i` (`i < slot_count`, in the connecting process), for tests and tools that
    /// write raw requests.
    pub fn request_slot(&self, i: u32) -> Option<&RequestSlot> {
        if i >= self.slot_count || !self.in_connecting_process() {
            return None;
        }
        // SAFETY: the connecting process, and `i < slot_count`.
        Some(unsafe { self.request_slot_here(i) })
    }

    /// Response slot `i` (`i < slot_count`, in the connecting process).
    pub fn response_slot(&self, i: u32) -> Option<&ResponseSlot> {
        if i >= self.slot_count || !self.in_connecting_process() {
            return None;
        }
        // SAFETY: the connecting process, and `i < slot_count`.
        Some(unsafe { self.response_slot_here(i) })
    }

    /// Whether the daemon's arena is low on free room (under an eighth free) as of its last
    /// answer to this client: a hint for clients that keep freed blocks, to give them back.
    /// `false` in a process other than the one that connected.
    pub fn arena_is_low(&self) -> bool {
        self.daemon_bell().is_some_and(DaemonBell::arena_is_low)
    }

    /// Rings this client's bell, and wakes the daemon (one byte on the socket) if it does not
    /// watch the channel: after a request is submitted in a slot, or a released block put in
    /// the ledger. Waits for nothing. Returns `false`, having done nothing, in a process other
    /// than the one that connected.
    pub fn ring(&self) -> bool {
        if !self.in_connecting_process() {
            return false;
        }
        // SAFETY: the connecting process.
        unsafe { self.ring_here() };
        true
    }

    /// Whether a daemon runs and serves this channel. When the daemon this connection was made
    /// with has died and a new one has re-attached to the channel (it rewrote the response
    /// channel's header), the connection follows it: requests in flight are answered by the
    /// new daemon, and the slots and blocks of this client are still its own. The channel then
    /// gets a connection to the new daemon ([`HelloKind::Rebind`], at most one attempt per
    /// 100 ms, waiting up to [`HANDSHAKE_TIMEOUT`]), so that wake-ups reach it and it sees
    /// this process's exit or `exec`. `false` in a process other than the one that connected,
    /// and once the daemon is shutting down.
    pub fn daemon_alive(&self) -> bool {
        if !self.in_connecting_process() || self.orphaned.load(Ordering::Relaxed) {
            return false;
        }
        let mut pid = self.daemon_pid.load(Ordering::Relaxed);
        if !os::process_alive(pid) {
            let Some(h) = self.response.header().map(SegmentHeader::load) else {
                return false;
            };
            let ours = h.check(SegmentKind::Response, self.response.len()).is_ok()
                && h.slot_count == self.slot_count
                && h.granule == self.granule
                && h.arena_len as usize == self.arena.len();
            if !ours || h.daemon_pid == pid || !os::process_alive(h.daemon_pid) {
                return false;
            }
            pid = h.daemon_pid;
            self.generation.store(h.generation, Ordering::Relaxed);
            self.daemon_pid.store(pid, Ordering::Relaxed);
        }
        self.rebind_to(pid);
        // SAFETY: the connecting process.
        let bell = unsafe { self.daemon_bell_here() };
        bell.state.load(Ordering::Relaxed) != wire::STATE_STOPPING
    }

    /// Claims a free slot of the channel for the calling thread.
    pub fn claim(&self) -> Result<Slot<'_>, RequestError> {
        let index = self.register()?;
        Ok(Slot {
            conn: self,
            index,
            usable: true,
        })
    }

    /// Claims a free slot of the channel and returns its index: the lower-level form of
    /// [`Connection::claim`] for callers that keep their own pool of slots. No round trip: the
    /// channel is this client's, and the daemon serves every slot of it. Give it back with
    /// [`Connection::unregister`].
    pub fn register(&self) -> Result<u32, RequestError> {
        if !self.in_connecting_process() {
            return Err(RequestError::SlotUnusable);
        }
        for i in 0..self.slot_count {
            // SAFETY: the connecting process, and `i < slot_count`.
            let rs = unsafe { self.request_slot_here(i) };
            if rs.owner.load(Ordering::Relaxed) != 0 || !rs.try_claim(self.owner()) {
                continue;
            }
            // SAFETY: the connecting process.
            unsafe { self.bell_here() }.note_claim(i);
            return Ok(i);
        }
        Err(RequestError::NoFreeSlot)
    }

    /// Gives slot `index` back. The slot must be claimed by this client with no request in
    /// flight (not after [`RequestError::Timeout`] or [`RequestError::DaemonGone`]: the daemon
    /// may still answer it).
    pub fn unregister(&self, index: u32) {
        if let Some(rq) = self.request_slot(index) {
            rq.release(self.owner());
        }
    }

    /// The owner token this client's threads claim slots with (any non-zero value does: the
    /// daemon ignores it).
    fn owner(&self) -> u32 {
        self.pid.max(1)
    }

    /// Sends a request in slot `index` and waits for the answer; an answer other than `Ok` is
    /// an error. The slot must be claimed, with no other request in flight on it (one thread at
    /// a time). After [`RequestError::Timeout`] the slot must not be used again: the daemon may
    /// still answer it. Refused with [`RequestError::SlotUnusable`] in a process other than the
    /// one that connected.
    pub fn request(
        &self,
        index: u32,
        op: Op,
        flags: u32,
        size: u64,
        align: u64,
        offset: u64,
    ) -> Result<Response, RequestError> {
        self.request_with_token(index, op, flags, size, align, offset, 0)
    }

    /// [`Connection::request`] with a share's token ([`Op::Open`], [`Op::Receive`]).
    #[allow(clippy::too_many_arguments)]
    pub fn request_with_token(
        &self,
        index: u32,
        op: Op,
        flags: u32,
        size: u64,
        align: u64,
        offset: u64,
        token: u64,
    ) -> Result<Response, RequestError> {
        if index >= self.slot_count || !self.in_connecting_process() {
            return Err(RequestError::SlotUnusable);
        }
        // SAFETY: the connecting process, and `index < slot_count`.
        let (rq, rs) = unsafe {
            (
                self.request_slot_here(index),
                self.response_slot_here(index),
            )
        };
        let cpu = os::current_cpu();
        rq.cpu.store(cpu, Ordering::Relaxed);
        let seq = rq.submit_with_token(op, flags, size, align, offset, token);
        // SAFETY: the connecting process.
        unsafe { self.ring_here() };
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
        let flags = if zeroed { BlockFlags::ZEROED.bits() } else { 0 };
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

    /// Frees the block at `offset` (allocated through this connection) through slot `index`.
    pub fn free(&self, index: u32, offset: u64) -> Result<(), RequestError> {
        self.request(index, Op::Free, 0, 0, 0, offset).map(drop)
    }

    /// Resizes the block at `offset` in place through slot `index`.
    pub fn resize(&self, index: u32, offset: u64, new_size: u64) -> Result<Block, RequestError> {
        let r = self.request(index, Op::Reallocate, 0, new_size, 0, offset)?;
        self.block(r)
    }

    /// The block an answer describes, checked to lie inside the arena.
    pub fn block(&self, r: Response) -> Result<Block, RequestError> {
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
            zeroed: BlockFlags::from_bits_retain(r.flags).contains(BlockFlags::ZEROED),
            ptr: NonNull::new(p).ok_or(bad)?,
        })
    }

    /// In a child process right after `fork`: replaces this process's shared mapping of the
    /// arena with a private copy-on-write mapping of the same object, at the same address, so
    /// that the child's writes into blocks it inherited never reach the parent. Blocks the
    /// child allocates through its own connection live in that connection's mapping.
    ///
    /// # Safety
    /// Only in a freshly forked child that has one thread, before anything else touches the
    /// arena: the contents stay the same, but a concurrent access during the switch would
    /// race with it.
    pub unsafe fn privatize_arena_after_fork(&self) -> Result<(), Errno> {
        // The program may have closed the descriptor, and opened another file under its
        // number: nothing else is mapped over the arena then (see `privatize_arena_by_copy`).
        if !self.arena_id.named_by(self.arena_fd.raw()) {
            return Err(Errno(libc::EBADF));
        }
        // SAFETY: the caller's contract; the mapping and the descriptor are this connection's.
        unsafe { os::remap_private(&self.arena, &self.arena_fd) }?;
        self.private.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// In a child process right after `fork`, where the program closed the arena's descriptor
    /// (so [`Connection::privatize_arena_after_fork`] cannot map it again): replaces the
    /// arena's mapping with private memory holding a copy of `blocks` (offset from
    /// [`Connection::arena_base`], length), zeros elsewhere. Costs a copy of those bytes.
    ///
    /// # Safety
    /// As [`Connection::privatize_arena_after_fork`]; `blocks` are all the blocks the child
    /// may still read (what it inherited).
    pub unsafe fn privatize_arena_by_copy(
        &self,
        blocks: impl Iterator<Item = (usize, usize)>,
    ) -> Result<(), Errno> {
        let blocks = blocks.map(|(off, len)| (off.saturating_add(ARENA_DATA_OFFSET), len));
        // SAFETY: the caller's contract.
        unsafe { os::replace_with_private_copy(&self.arena, blocks) }?;
        self.private.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// In a process other than the one that connected (a forked child): closes this process's
    /// copy of the socket, so that the daemon sees the connecting process's exit or `exec` (a
    /// connection ends only when every copy of its socket is closed). Does nothing in the
    /// connecting process, or when done before. Async-signal-safe: it may run in a `fork`
    /// handler.
    pub fn close_inherited_socket(&self) {
        if self.in_connecting_process() {
            return;
        }
        let fd = self.sock.swap(-1, Ordering::Relaxed);
        if self.sock_is(fd) {
            // SAFETY: the descriptor is this connection's socket (checked: the program did not
            // close it) and nothing else closes it: it is taken out of `sock` (swapped to -1)
            // and closed once, here.
            drop(unsafe { Fd::from_raw(fd) });
        }
    }

    /// Whether descriptor `fd` is this connection's socket (the program has not closed it,
    /// nor put another file under its number).
    fn sock_is(&self, fd: i32) -> bool {
        let id = FileId {
            dev: self.sock_dev.load(Ordering::Acquire),
            ino: self.sock_ino.load(Ordering::Acquire),
        };
        id.named_by(fd)
    }

    /// Records `sock` as the file the connection's socket descriptor names.
    fn set_sock_id(&self, sock: &Fd) -> Result<(), ConnectError> {
        let id = FileId::of_raw(sock.raw()).map_err(|errno| ConnectError::Os {
            call: "fstat",
            errno,
        })?;
        self.sock_dev.store(id.dev, Ordering::Release);
        self.sock_ino.store(id.ino, Ordering::Release);
        Ok(())
    }

    /// Puts `sock` in as the connection's socket: its identity first, then the number.
    fn install_socket(&self, sock: Fd) -> Result<(), ConnectError> {
        self.set_sock_id(&sock)?;
        self.sock.store(sock.into_raw(), Ordering::Release);
        Ok(())
    }

    /// Gives the channel a connection to daemon `pid` (which re-attached to it) unless the
    /// socket is one already, or another thread is at it, or the last attempt was less than
    /// [`REBIND_INTERVAL_NS`] ago. In the connecting process only.
    fn rebind_to(&self, pid: u32) {
        if self.bound_pid.load(Ordering::Acquire) == pid {
            return;
        }
        let now = os::monotonic_ns();
        if now < self.next_rebind.load(Ordering::Relaxed)
            || self.rebinding.swap(true, Ordering::Acquire)
        {
            return;
        }
        self.next_rebind
            .store(now.saturating_add(REBIND_INTERVAL_NS), Ordering::Relaxed);
        match self.rebind(pid) {
            // Tried again later: the daemon may not listen yet, or is busy.
            Err(
                ConnectError::NotRunning
                | ConnectError::Busy
                | ConnectError::Mismatch
                | ConnectError::Os { .. },
            ) => {}
            // Refused while the socket is lost: the channel has no way to wake the daemon
            // any more, and the daemon no longer counts it as this process's.
            Err(ConnectError::Refused { .. })
                if !self.sock_is(self.sock.load(Ordering::Acquire)) =>
            {
                self.orphaned.store(true, Ordering::Relaxed);
            }
            // Done, or refused for good by this daemon: not asked again.
            _ => self.bound_pid.store(pid, Ordering::Release),
        }
        self.rebinding.store(false, Ordering::Release);
    }

    /// Connects to the instance's socket again and asks daemon `pid` to make the new
    /// connection this channel's ([`HelloKind::Rebind`]); on success, the new socket takes the
    /// old one's descriptor number (`dup3`), so that a thread using the old one meanwhile uses
    /// one or the other, never a closed or reused descriptor. Then wakes the daemon once.
    fn rebind(&self, pid: u32) -> Result<(), ConnectError> {
        let path = CStr::from_bytes_until_nul(&self.path).map_err(|_| ConnectError::BadName)?;
        let hello = Hello {
            kind: HelloKind::Rebind,
            client_id: self.client_id,
        };
        let mut buf = [0u8; WELCOME_BUF];
        let (sock, daemon, welcome, _msg) = handshake(path, hello, &mut buf)?;
        if daemon.uid != self.daemon_uid {
            return Err(ConnectError::Ownership {
                segment: SegmentKind::Arena,
            });
        }
        if welcome.daemon_pid != pid || welcome.client_id != self.client_id {
            return Err(ConnectError::Mismatch);
        }
        let old = self.sock.load(Ordering::Acquire);
        if !self.sock_is(old) {
            // Lost: the program closed the socket (and perhaps opened another file under its
            // number, which stays the program's, untouched). The new socket comes in under a
            // number of its own.
            let raw = sock.raw();
            self.install_socket(sock)?;
            // SAFETY: `raw` is open (it names the new socket); borrowed, never closed here.
            let _ = unix::send_wake(&ManuallyDrop::new(unsafe { Fd::from_raw(raw) }));
            return Ok(());
        }
        // The old socket is this connection's, hung up by a daemon that died: the new one
        // takes its number. Its identity is written first; a thread that checks the number in
        // between sees a mismatch and skips one wake-up (it looks again), never a lost socket.
        self.set_sock_id(&sock)?;
        // SAFETY: both descriptors are open and this connection's; `dup3` closes what `old`
        // named and makes it name the new socket in one step, close-on-exec. `sock` is closed
        // below, the socket living on as `old`.
        let rc = unsafe { libc::dup3(sock.raw(), old, libc::O_CLOEXEC) };
        if rc < 0 {
            return Err(ConnectError::Os {
                call: "dup3",
                errno: Errno::last(),
            });
        }
        drop(sock);
        // SAFETY: `old` is open (it names the new socket now); borrowed, never closed here.
        let sock = ManuallyDrop::new(unsafe { Fd::from_raw(old) });
        let _ = unix::send_wake(&sock);
        Ok(())
    }

    /// The client's bell.
    ///
    /// # Safety
    /// Called in the connecting process (the channel is mapped there only).
    unsafe fn bell_here(&self) -> &ClientBell {
        // SAFETY: 1. mapped (the caller's contract); the channel's length covers the bell
        // (checked at connect) and its offset is 64-aligned.
        unsafe { self.request.at(wire::BELL_OFFSET) }
    }

    /// The daemon's bell.
    ///
    /// # Safety
    /// Called in the connecting process.
    unsafe fn daemon_bell_here(&self) -> &DaemonBell {
        // SAFETY: as in `bell_here`, for the response channel.
        unsafe { self.response.at(wire::BELL_OFFSET) }
    }

    /// Request slot `i`.
    ///
    /// # Safety
    /// 1. Called in the connecting process; 2. `i < slot_count`.
    unsafe fn request_slot_here(&self, i: u32) -> &RequestSlot {
        // SAFETY: 1. mapped; 2. the channel's length covers every slot (checked at connect);
        // slot offsets are 64-aligned.
        unsafe { self.request.at(wire::request_slot_offset(i)) }
    }

    /// Response slot `i`.
    ///
    /// # Safety
    /// As for `request_slot_here`.
    unsafe fn response_slot_here(&self, i: u32) -> &ResponseSlot {
        // SAFETY: as in `request_slot_here`, for the response channel.
        unsafe { self.response.at(wire::response_slot_offset(i)) }
    }

    /// Rings the bell and sends a wake byte if the daemon asks for one.
    ///
    /// # Safety
    /// Called in the connecting process.
    unsafe fn ring_here(&self) {
        // SAFETY: the caller's contract.
        let (bell, daemon) = unsafe { (self.bell_here(), self.daemon_bell_here()) };
        if bell.ring(daemon) {
            let fd = self.sock.load(Ordering::Acquire);
            // The program may have closed the socket, and opened another file under its
            // number: checked (one `fstat`, on a path that wakes a sleeping daemon anyway)
            // before a byte is written.
            if self.sock_is(fd) {
                // SAFETY: an open descriptor of this connection's socket (checked just now;
                // the program closing it meanwhile would be its bug, as for any library's
                // descriptor); borrowed, never closed here.
                let sock = ManuallyDrop::new(unsafe { Fd::from_raw(fd) });
                // A socket the daemon hung up is no sign of death by itself: a daemon
                // restarted after a crash serves this channel without it until the channel
                // is rebound, which `daemon_alive` does (and the wait checks it anyway).
                if !unix::send_wake(&sock) {
                    let _ = self.daemon_alive();
                }
            } else if fd >= 0 {
                // Lost to the program: a new connection to the same daemon is asked for
                // (the daemon keeps the channel and its blocks while this process maps it).
                self.bound_pid.store(0, Ordering::Release);
                let _ = self.daemon_alive();
            }
        }
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

impl Drop for Connection {
    fn drop(&mut self) {
        // The channel is unmapped first: the daemon, seeing the socket close, keeps the blocks
        // of a process that still maps its channel (its program closed the socket).
        if self.in_connecting_process() {
            // SAFETY: dropped once, here; nothing refers to the channel once `self` is gone
            // (every reference into it borrows `self`).
            unsafe {
                ManuallyDrop::drop(&mut self.request);
                ManuallyDrop::drop(&mut self.response);
            }
        }
        // Elsewhere (a forked child) the channel is not mapped (`MADV_DONTFORK`), and its
        // addresses may hold this process's other mappings by now: never unmapped from here.
        // Closing the socket ends the connection (once every copy is closed): the daemon
        // frees this client's blocks.
        let fd = self.sock.swap(-1, Ordering::Relaxed);
        if self.sock_is(fd) {
            // SAFETY: the descriptor is this connection's socket (checked), closed once
            // (swapped out first).
            let sock = unsafe { Fd::from_raw(fd) };
            if self.in_connecting_process() {
                unix::send_bye(&sock);
            }
            drop(sock);
        }
        if self.arena_id.named_by(self.arena_fd.raw()) {
            // SAFETY: this connection's descriptor of the arena (checked), dropped once, here.
            unsafe { ManuallyDrop::drop(&mut self.arena_fd) };
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

/// A claimed request slot. Not `Sync`: one request at a time.
#[derive(Debug)]
pub struct Slot<'c> {
    conn: &'c Connection,
    index: u32,
    usable: bool,
}

impl Slot<'_> {
    /// The slot's index in the channel.
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
        self.check()?;
        let r = self
            .conn
            .request(self.index, op, flags, size, align, offset);
        self.note(r)
    }

    /// Allocates `size` bytes aligned to `align` (a power of two). With `zeroed`, the memory is
    /// zero: the daemon says whether its pages are fresh, and the client clears them otherwise.
    pub fn allocate(&mut self, size: u64, align: u64, zeroed: bool) -> Result<Block, RequestError> {
        self.check()?;
        let r = self.conn.allocate(self.index, size, align, zeroed);
        self.note(r)
    }

    /// Frees the block at `offset` (allocated through this connection, in any of its slots).
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

    /// Refuses an abandoned slot. (The process is checked by [`Connection::request`].)
    fn check(&self) -> Result<(), RequestError> {
        if self.usable {
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
        // An abandoned slot stays claimed: the daemon may still answer its request, and a new
        // owner must not mistake that answer for its own.
        if self.usable {
            self.conn.unregister(self.index);
        }
    }
}

#[cfg(test)]
mod tests {
    //! The handshake and a round trip against a stand-in daemon in a thread of the test (the
    //! real one is tested in `tests/`).

    use super::*;
    use std::os::fd::AsFd;
    use std::sync::atomic::AtomicUsize;
    use xalloc_proto::wire::{Request, STATE_RUNNING};

    /// A unique instance name for each test.
    fn name(tag: &str) -> String {
        static N: AtomicUsize = AtomicUsize::new(0);
        format!(
            "xalloc-unit-{}-{tag}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        )
    }

    #[test]
    fn socket_paths_are_built_without_allocating_and_checked() {
        let mut buf = [0u8; SOCKET_PATH_CAP];
        assert_eq!(
            socket_path("xalloc", &mut buf).unwrap(),
            c"/dev/shm/xalloc.socket"
        );
        for bad in ["", "a/b", "a\0b"] {
            assert!(socket_path(bad, &mut buf).is_none(), "{bad:?}");
        }
        let longest = "n".repeat(SOCKET_PATH_CAP - 1 - SOCKET_DIR.len() - SOCKET_SUFFIX.len());
        assert!(socket_path(&longest, &mut buf).is_some());
        assert!(socket_path(&format!("{longest}n"), &mut buf).is_none());
    }

    #[test]
    fn no_daemon_reads_as_not_running() {
        assert_eq!(
            Connection::connect(&name("absent")).err(),
            Some(ConnectError::NotRunning)
        );
        assert_eq!(
            Connection::connect("a/b").err(),
            Some(ConnectError::BadName)
        );
        // A plain file where the socket should be: nobody listens.
        let n = name("file");
        let path = format!("/dev/shm/{n}.socket");
        std::fs::write(&path, b"").unwrap();
        let r = Connection::connect(&n).err();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(r, Some(ConnectError::NotRunning));
    }

    /// What the stand-in daemon does wrong, if anything.
    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Fake {
        Good,
        Refuse,
        Unsealed,
        WrongGeneration,
        TwoFds,
        Silent,
        /// Accepts, then "crashes" and "restarts": the daemon's pid (a `sleep` child standing
        /// in for it) dies, another takes its place in the response channel's header, and the
        /// stand-in waits for the client to rebind and ring once.
        Restart,
    }

    const SLOTS: u32 = 4;
    const GRANULE: u32 = 4096;
    const ARENA: u64 = (ARENA_DATA_OFFSET + (4 << 20)) as u64;

    struct Daemon {
        name: String,
        thread: Option<std::thread::JoinHandle<()>>,
        /// `Fake::Restart`: the first daemon crashes when this is sent on (or dropped).
        crash: Option<std::sync::mpsc::Sender<()>>,
    }

    impl Daemon {
        /// `Fake::Restart`: kills the first stand-in daemon (once the client has connected, so
        /// that its liveness check sees it alive).
        fn crash(&mut self) {
            if let Some(crash) = self.crash.take() {
                let _ = crash.send(());
            }
        }
    }

    impl Drop for Daemon {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(format!("/dev/shm/{}.socket", self.name));
            self.crash.take();
            if let Some(t) = self.thread.take() {
                t.join().unwrap();
            }
        }
    }

    /// A stand-in daemon that accepts one client, behaves as `fake` says, and (when it
    /// accepted) serves `requests` allocations of the size asked at offset 0, then waits for
    /// the client to hang up.
    fn daemon(fake: Fake, requests: usize) -> Daemon {
        let name = name("fake");
        let path = std::path::PathBuf::from(format!("/dev/shm/{name}.socket"));
        let listener = unix::listen(&path, 0o600).unwrap();
        let sleeper = || {
            std::process::Command::new("sleep")
                .arg("30")
                .spawn()
                .unwrap()
        };
        let mut first = (fake == Fake::Restart).then(sleeper);
        let (crash, crash_now) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let sock = loop {
                if let Some(s) = unix::accept(&listener).unwrap() {
                    break s;
                }
                std::thread::sleep(Duration::from_millis(1));
            };
            let mut buf = [0u8; 64];
            let hello = unix::recv_with_fds(&sock, &mut buf, Duration::from_secs(5))
                .unwrap()
                .unwrap();
            assert_eq!(
                Hello::decode(&buf[..hello.len]),
                Ok(Hello {
                    kind: HelloKind::Client,
                    client_id: 0,
                })
            );
            if fake == Fake::Silent {
                std::thread::sleep(HANDSHAKE_TIMEOUT + Duration::from_millis(200));
                return;
            }
            let pid = first.as_ref().map_or(std::process::id(), |c| c.id());
            let mut w = Welcome {
                refusal: 0,
                slots: SLOTS,
                granule: GRANULE,
                flags: 0,
                client_id: 7,
                daemon_pid: pid,
                arena_len: ARENA,
                generation: 99,
            };
            if fake == Fake::Refuse {
                w.refusal = Refusal::NotServed as u32;
                let mut msg = w.encode().to_vec();
                msg.extend_from_slice(b"not served");
                unix::send_with_fds(&sock, &msg, &[]).unwrap();
                return;
            }
            let make = |kind, len: usize, generation| {
                let fd = unix::memfd(c"xalloc-unit", len as u64).unwrap();
                let map = Mapping::new(&fd, len, true).unwrap();
                SegmentHeader::new(kind, SLOTS, GRANULE, ARENA, generation, pid)
                    .store(map.header().unwrap());
                if fake != Fake::Unsealed || kind != SegmentKind::Arena {
                    unix::seal_size(&fd).unwrap();
                }
                (fd, map)
            };
            let (arena, _arena_map) = make(SegmentKind::Arena, ARENA as usize, 99);
            let gen = if fake == Fake::WrongGeneration {
                98
            } else {
                99
            };
            let (request, request_map) =
                make(SegmentKind::Request, wire::request_channel_len(SLOTS), gen);
            let (response, response_map) =
                make(SegmentKind::Response, wire::response_channel_len(SLOTS), 99);
            let response_ro = unix::read_only_twin(&response).unwrap();
            // SAFETY: in bounds and aligned, as the layout says.
            let dbell: &DaemonBell = unsafe { response_map.at(wire::BELL_OFFSET) };
            dbell.state.store(STATE_RUNNING, Ordering::Relaxed);
            let fds = [arena.as_fd(), request.as_fd(), response_ro.as_fd()];
            let fds = if fake == Fake::TwoFds {
                &fds[..2]
            } else {
                &fds[..]
            };
            unix::send_with_fds(&sock, &w.encode(), fds).unwrap();
            if let Some(mut a) = first.take() {
                // The crash, once the client has connected (its connect checks that the daemon
                // is alive: killing it right after the welcome made that check fail at random),
                // and the restarted daemon re-attaching to the channel.
                let _ = crash_now.recv_timeout(Duration::from_secs(10));
                a.kill().unwrap();
                a.wait().unwrap();
                drop(sock);
                let mut b = sleeper();
                let again =
                    SegmentHeader::new(SegmentKind::Response, SLOTS, GRANULE, ARENA, 100, b.id());
                again.store(response_map.header().unwrap());
                // Bounded, so that a client that never rebinds fails the test instead of
                // leaving `Daemon::drop` waiting for this thread forever.
                let deadline = Instant::now() + Duration::from_secs(10);
                let sock = loop {
                    if let Some(s) = unix::accept(&listener).unwrap() {
                        break s;
                    }
                    if Instant::now() > deadline {
                        b.kill().unwrap();
                        b.wait().unwrap();
                        panic!("the client never connected again to rebind");
                    }
                    std::thread::sleep(Duration::from_millis(1));
                };
                let r = unix::recv_with_fds(&sock, &mut buf, Duration::from_secs(5))
                    .unwrap()
                    .unwrap();
                assert_eq!(
                    Hello::decode(&buf[..r.len]),
                    Ok(Hello {
                        kind: HelloKind::Rebind,
                        client_id: 7,
                    })
                );
                w.daemon_pid = b.id();
                w.generation = 100;
                unix::send_with_fds(&sock, &w.encode(), &[]).unwrap();
                // One wake byte after the rebind, then the hang-up when the client drops.
                let deadline = Instant::now() + Duration::from_secs(5);
                let mut wakes = 0;
                loop {
                    let (n, closed) = unix::drain(&sock);
                    wakes += n;
                    if closed || Instant::now() > deadline {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                b.kill().unwrap();
                b.wait().unwrap();
                assert!(wakes >= 1, "no wake byte after the rebind");
                return;
            }
            if fake != Fake::Good {
                return;
            }
            // SAFETY: in bounds and aligned, as the layout says.
            let bell: &ClientBell = unsafe { request_map.at(wire::BELL_OFFSET) };
            let mut served = 0;
            while served < requests {
                let hi = bell.slots_hi.load(Ordering::Acquire).min(SLOTS);
                for i in 0..hi {
                    // SAFETY: as above.
                    let (rq, rs): (&RequestSlot, &ResponseSlot) = unsafe {
                        (
                            request_map.at(wire::request_slot_offset(i)),
                            response_map.at(wire::response_slot_offset(i)),
                        )
                    };
                    if let Some(Request { seq, size, .. }) = rq.take() {
                        let answer = Response {
                            status: Status::Ok as u32,
                            flags: 0,
                            offset: 0,
                            size: size.next_multiple_of(u64::from(GRANULE)),
                            ..Response::default()
                        };
                        if rs.publish(rq, seq, answer) {
                            os::futex_wake(&rs.seq, 1);
                        }
                        served += 1;
                    }
                }
                unix::drain(&sock);
                std::thread::yield_now();
            }
            // Until the client hangs up.
            let deadline = Instant::now() + Duration::from_secs(5);
            while !unix::drain(&sock).1 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        Daemon {
            name,
            thread: Some(thread),
            crash: Some(crash),
        }
    }

    #[test]
    fn a_handshake_maps_the_channel_and_a_request_makes_the_round_trip() {
        let d = daemon(Fake::Good, 2);
        let conn = Connection::connect(&d.name).unwrap();
        assert_eq!(conn.slot_count(), SLOTS);
        assert_eq!(conn.granule(), GRANULE as usize);
        assert_eq!(conn.generation(), 99);
        assert_eq!(conn.client_id(), 7);
        assert_eq!(conn.daemon_pid(), std::process::id());
        assert_eq!(conn.arena_len(), 4 << 20);
        assert!(conn.daemon_alive());
        assert!(!conn.arena_is_low());
        assert!(conn.ledger().is_some());
        assert!(conn.request_slot(SLOTS).is_none());
        let mut slot = conn.claim().unwrap();
        let b = slot.allocate(10_000, 4096, true).unwrap();
        assert_eq!((b.offset, b.size), (0, 12_288));
        assert!(conn.contains(b.as_ptr().addr()));
        let mut other = conn.claim().unwrap();
        assert_ne!(other.index(), slot.index());
        other.call(Op::Allocate, 0, 4096, 4096, 0).unwrap();
        drop(other);
        let claimed: Vec<u32> = (0..SLOTS)
            .filter(|&i| {
                conn.request_slot(i)
                    .is_some_and(|s| s.owner.load(Ordering::Relaxed) != 0)
            })
            .collect();
        assert_eq!(claimed, [slot.index()]);
        drop(slot);
        drop(conn);
        // The stand-in daemon sees the hang-up and ends.
        drop(d);
    }

    #[test]
    fn a_restarted_daemon_gets_the_channel_a_connection_again() {
        let mut d = daemon(Fake::Restart, 0);
        let conn = Connection::connect(&d.name).unwrap();
        d.crash();
        let first = conn.daemon_pid();
        assert_ne!(first, std::process::id());
        let deadline = Instant::now() + Duration::from_secs(5);
        // Rebound means bound to the new daemon: `bound_pid` also reads 0 for a while when the
        // socket is lost, which is not first's pid either (waiting for that only let the test go
        // on before the rebind, and the fake daemon then waited for it forever).
        while conn.daemon_pid() == first
            || conn.bound_pid.load(Ordering::Relaxed) != conn.daemon_pid()
        {
            assert!(Instant::now() < deadline, "not rebound");
            conn.daemon_alive();
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(conn.daemon_alive());
        assert_eq!(conn.generation(), 100);
        drop(conn);
        drop(d);
    }

    /// In a forked child the channel is not mapped: nothing touches it, and dropping the
    /// connection there leaves whatever the child mapped at its addresses alone.
    #[test]
    fn a_forked_child_never_touches_the_parents_channel() {
        let d = daemon(Fake::Good, 0);
        let conn = Connection::connect(&d.name).unwrap();
        let channel = conn.request_slot(0).unwrap() as *const RequestSlot as usize & !4095;
        // SAFETY: the child makes system calls only, and leaves with `_exit`.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let mut code = 0;
            let checks = [
                conn.request_slot(0).is_none(),
                conn.response_slot(0).is_none(),
                conn.ledger().is_none(),
                conn.bell().is_none() && conn.daemon_bell().is_none(),
                !conn.ring() && !conn.daemon_alive() && !conn.arena_is_low(),
                conn.register() == Err(RequestError::SlotUnusable),
                conn.request(0, Op::Free, 0, 0, 0, 0) == Err(RequestError::SlotUnusable),
            ];
            for (i, ok) in checks.into_iter().enumerate() {
                if !ok {
                    code = 10 + i as i32;
                }
            }
            // The parent's channel is not mapped here: the address is free for a mapping of
            // the child's own, which dropping the connection must leave alone.
            // SAFETY: a fresh private mapping at an address this process does not use.
            let p = unsafe {
                libc::mmap(
                    channel as *mut libc::c_void,
                    4096,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                    -1,
                    0,
                )
            };
            if p != channel as *mut libc::c_void {
                code = 2;
            } else {
                // SAFETY: mapped just above.
                unsafe { p.cast::<u8>().write(42) };
                conn.close_inherited_socket();
                drop(conn);
                // SAFETY: still mapped (a fault here fails the test).
                if unsafe { p.cast::<u8>().read() } != 42 {
                    code = 3;
                }
            }
            // SAFETY: leaving the child without running the parent's exit handlers.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "child status {status:#x}"
        );
        // The parent's connection is untouched.
        assert!(conn.request_slot(0).is_some() && conn.daemon_alive());
        drop(conn);
        drop(d);
    }

    #[test]
    fn a_bad_handshake_is_refused() {
        let cases = [
            (
                Fake::Refuse,
                ConnectError::Refused {
                    refusal: Refusal::NotServed,
                },
            ),
            (
                Fake::Unsealed,
                ConnectError::NotSealed {
                    segment: SegmentKind::Arena,
                },
            ),
            (Fake::WrongGeneration, ConnectError::Mismatch),
            (
                Fake::TwoFds,
                ConnectError::Protocol {
                    what: "an acceptance without its three descriptors",
                },
            ),
            (Fake::Silent, ConnectError::Busy),
        ];
        for (fake, want) in cases {
            let d = daemon(fake, 0);
            assert_eq!(Connection::connect(&d.name).err(), Some(want));
        }
        let text = ConnectError::Refused {
            refusal: Refusal::NotServed,
        }
        .to_string();
        assert!(text.contains("xallocd start --group"), "{text}");
    }
}
