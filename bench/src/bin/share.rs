//! `share`: what handing a buffer to another process costs, by share handle, by copy through
//! a Unix socket, and by passing a memfd (the kernel's zero-copy reference), at 64 KiB, 1 MiB
//! and 64 MiB.
//!
//! Run it through `scripts/bench-share.sh [--quick]`, which builds release, starts a daemon of
//! its own pinned on CPU 0 (`--arena-size 256M`), exports `XALLOC_NAME` for it, runs
//! `share run` and always stops the daemon. By hand: `XALLOC_NAME=INSTANCE target/release/share
//! run [options]`.
//!
//! # What is measured
//!
//! Two processes: this one, the **writer**, and its child, the **reader** (this binary again,
//! as `share reader`), each pinned on its own CPU (`--writer-cpu`, default 0, the daemon's;
//! `--reader-cpu`, default 1). They talk over a Unix stream socket pair. For every hand-off the
//! writer first, untimed, makes the buffer and fills it with a pattern that depends on the
//! hand-off's number, then waits `--pause-us` (default 5 ms):
//!
//! - **handle**: `SharedBuf::new(size)`, filled; the hand-off is one 64-byte message holding
//!   the view handle's byte form, and the reader's `SharedBuf::open` of it. After the pause the
//!   daemon is asleep and no longer watches the reader's channel (it spins 50 µs after its last
//!   request, and watches a channel for 2 ms after serving it), so the open pays for waking it.
//! - **handle, daemon awake**: the same, but the reader, once the message is there, first opens
//!   and closes the handle untimed and then opens it timed: the daemon is awake and watches the
//!   reader's channel, as it does for a reader that made a request within the last 2 ms. Its
//!   hand-off is the message's time plus the timed open's.
//! - **socket copy**: a buffer of the writer's own (allocated and faulted in once), filled; the
//!   hand-off writes the message and then every byte through the socket (the writer's send
//!   buffer set to `--sndbuf`, default the largest the system allows, `net.core.wmem_max`: the
//!   copy's best case), and the reader reads them into a buffer of its own (also allocated and
//!   faulted in once).
//! - **memfd**: `memfd_create`, `ftruncate`, `mmap`, filled, `munmap`, a new one per hand-off;
//!   the hand-off is the message with the descriptor attached (`SCM_RIGHTS`), and the reader's
//!   `mmap` of it (`PROT_READ`, `MAP_SHARED`, no `MAP_POPULATE`: its pages fault in as they are
//!   read).
//!
//! The writer reads the monotonic clock (`CLOCK_MONOTONIC`, which both processes share) right
//! before its first `send` and puts the time in the message. The reader waits for the message
//! spinning (a non-blocking `recvmsg`, and `sched_yield` when nothing is there), so no method
//! pays for waking the reader up, and reads the clock when the message is there
//! (**message**), when it can access every byte (**hand-off**: the handle opened, the last byte
//! in its buffer, the memfd mapped), and again after it read them all (**hand-off + read**):
//! the same checksum in every method, one pass over every byte (the wrapping sum and the xor of
//! the 8-byte words), which the writer checks against its own. It also times `SharedBuf::open`
//! (or the memfd's `mmap`) alone (**open**) and counts its page faults while reading. Closing
//! (dropping the view, or `munmap` and `close`) comes after the last clock read and is shown
//! on its own (**release**).
//!
//! Per size, `--rounds` rounds (default 5, `--quick` 2); in each, every method in turn (the
//! first method rotates from round to round) does one warm-up hand-off and then `--iters`
//! measured ones (default 100, 40 and 8 at 64 KiB, 1 MiB and 64 MiB; `--quick` 10, 4 and 1).
//! Medians are over every measured hand-off of a size and method. The CPU time that other
//! processes used meanwhile (from `/proc/stat`, less the writer's, the reader's and the
//! daemon's) is printed, with a warning above 5 % of a CPU.
//!
//! # Output and exit status
//!
//! Markdown: hand-off alone and hand-off + read, median µs per method and size, with the
//! socket ÷ handle and memfd ÷ handle ratios and the open's p50; a detailed table; the
//! targets (open p50 at 64 MiB well under 20 µs, and at 64 MiB the handle at least 1000× faster
//! than the socket copy, which refers to the hand-off alone: with the read, every method pays
//! for one pass over 64 MiB), each for the daemon asleep and awake. Missed targets do not fail
//! the run; errors exit 1: no daemon (unless `--only` leaves the handles out), a refused share
//! operation, a wrong checksum, a reader that died.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, ExitCode, Stdio};
use std::ptr::NonNull;
use std::time::{Duration, Instant};

use xalloc_global::client::Connection;
use xalloc_global::{Handle, SharedBuf};

#[path = "../shared.rs"]
mod shared;
use shared::*;

/// The block sizes, with their measured hand-offs per method and round (full run, `--quick`).
const SIZES: [(usize, usize, usize); 3] = [(64 << 10, 100, 10), (1 << 20, 40, 4), (64 << 20, 8, 1)];
/// Default pause between preparing a buffer and handing it over, µs: longer than the daemon's
/// spin budget (50 µs) and its watch of a client's channel (2 ms), so the daemon is asleep.
const DEFAULT_PAUSE_US: u64 = 5000;
/// Target: open p50 under this at the largest size, µs.
const TARGET_OPEN_US: f64 = 20.0;
/// Target: socket copy ÷ handle at the largest size, hand-off alone.
const TARGET_RATIO: f64 = 1000.0;
/// How long the writer waits for the reader's answer to one hand-off.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

const USAGE: &str = "\
usage: XALLOC_NAME=INSTANCE share run [options]
       share reader --cpu CPU --max-bytes N [--no-daemon]   (internal: the reading process)

  --daemon-cpu CPU   the one CPU the daemon is pinned to (default 0; checked)
  --daemon-pid PID   refuse to run unless the instance's daemon has this pid
  --writer-cpu CPU   the writer's CPU (default 0, the daemon's)
  --reader-cpu CPU   the reader's CPU (default 1; must differ from the writer's)
  --rounds R         rounds per size, the methods alternating (default 5, quick 2)
  --iters N          measured hand-offs per size, method and round (default per size: 100,
                     40, 8; quick: 10, 4, 1)
  --sizes LIST       sizes to measure, e.g. 64K,1M,64M (the default)
  --only LIST        methods to measure (comma-separated: handle, handle-awake, socket,
                     memfd); without the handles no daemon is needed
  --pause-us US      the writer waits this long between preparing a buffer and handing it
                     over (default 5000: the daemon has gone to sleep)
  --sndbuf BYTES     the writer's socket send buffer for the socket copy (default: the
                     largest allowed, net.core.wmem_max; 0 keeps the system's default)
  --quick            small counts (CI smoke run)

XALLOC_NAME names the xallocd instance (default xalloc). Prints markdown tables. Missed targets
do not fail the run; errors exit 1.
";

// ---------------------------------------------------------------------------------------------
// Configuration.

/// How the bytes get to the reader.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Method {
    /// A view handle, opened by the reader; the daemon has been idle for the pause.
    Handle,
    /// The same, but the writer makes two round trips to the daemon (an open and a close of
    /// its own block) right before the hand-off, so that the daemon is awake.
    HandleAwake,
    Socket,
    Memfd,
}

/// How many methods there are.
const N_METHODS: usize = 4;
const METHODS: [Method; N_METHODS] = [
    Method::Handle,
    Method::HandleAwake,
    Method::Socket,
    Method::Memfd,
];

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Handle => "handle",
            Method::HandleAwake => "handle, daemon awake",
            Method::Socket => "socket copy",
            Method::Memfd => "memfd",
        }
    }

    /// The name `--only` takes.
    fn flag(self) -> &'static str {
        match self {
            Method::Handle => "handle",
            Method::HandleAwake => "handle-awake",
            Method::Socket => "socket",
            Method::Memfd => "memfd",
        }
    }

    fn code(self) -> u64 {
        match self {
            Method::Handle => 1,
            Method::HandleAwake => 2,
            Method::Socket => 3,
            Method::Memfd => 4,
        }
    }

    /// Whether the method needs the daemon.
    fn shares(self) -> bool {
        matches!(self, Method::Handle | Method::HandleAwake)
    }

    fn from_code(c: u64) -> Option<Self> {
        METHODS.into_iter().find(|m| m.code() == c)
    }

    fn index(self) -> usize {
        self.code() as usize - 1
    }
}

/// What `share run` was asked to do.
struct Config {
    daemon_cpu: usize,
    daemon_pid: Option<u32>,
    writer_cpu: usize,
    reader_cpu: usize,
    rounds: usize,
    iters: Option<usize>,
    quick: bool,
    sizes: Vec<usize>,
    only: [bool; N_METHODS],
    /// `None`: the largest allowed; `Some(0)`: the system's default.
    sndbuf: Option<usize>,
    /// How long the writer waits between preparing and handing over.
    pause: Duration,
}

impl Config {
    fn iters_for(&self, size: usize) -> usize {
        if let Some(n) = self.iters {
            return n;
        }
        // The listed size, or the row of the next larger size.
        let row = SIZES
            .iter()
            .find(|s| s.0 >= size)
            .unwrap_or(&SIZES[SIZES.len() - 1]);
        if self.quick {
            row.2
        } else {
            row.1
        }
    }

    fn methods(&self) -> Vec<Method> {
        METHODS
            .into_iter()
            .filter(|m| self.only[m.index()])
            .collect()
    }

    /// Whether a measured method needs the daemon.
    fn needs_daemon(&self) -> bool {
        self.methods().into_iter().any(Method::shares)
    }
}

/// `64K`, `1M`, `64M`, or bytes.
fn parse_size(s: &str) -> Result<usize, String> {
    let bad = || format!("not a size: {s:?} (e.g. 64K, 1M)");
    let (digits, shift) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 20),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let n: usize = digits.parse().map_err(|_| bad())?;
    n.checked_shl(shift)
        .filter(|&v| v > 0 && v >> shift == n)
        .ok_or_else(bad)
}

fn parse_run(args: impl Iterator<Item = String>) -> Result<Config, String> {
    let mut args = args.peekable();
    let mut cfg = Config {
        daemon_cpu: 0,
        daemon_pid: None,
        writer_cpu: 0,
        reader_cpu: 1,
        rounds: 0,
        iters: None,
        quick: false,
        sizes: SIZES.iter().map(|s| s.0).collect(),
        only: [true; N_METHODS],
        sndbuf: None,
        pause: Duration::from_micros(DEFAULT_PAUSE_US),
    };
    let mut rounds = None;
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        let mut value = || inline.clone().or_else(|| args.next());
        match flag.as_str() {
            "--daemon-cpu" => cfg.daemon_cpu = number(value(), "--daemon-cpu")?,
            "--daemon-pid" => cfg.daemon_pid = Some(number(value(), "--daemon-pid")?),
            "--writer-cpu" => cfg.writer_cpu = number(value(), "--writer-cpu")?,
            "--reader-cpu" => cfg.reader_cpu = number(value(), "--reader-cpu")?,
            "--rounds" => rounds = Some(number(value(), "--rounds")?),
            "--iters" => cfg.iters = Some(number(value(), "--iters")?),
            "--quick" => cfg.quick = true,
            "--sndbuf" => cfg.sndbuf = Some(number(value(), "--sndbuf")?),
            "--pause-us" => cfg.pause = Duration::from_micros(number(value(), "--pause-us")?),
            "--sizes" => {
                let list = value().ok_or("--sizes needs a value")?;
                cfg.sizes = list
                    .split(',')
                    .filter(|w| !w.is_empty())
                    .map(parse_size)
                    .collect::<Result<_, _>>()?;
            }
            "--only" => {
                let list = value().ok_or("--only needs a value")?;
                cfg.only = [false; N_METHODS];
                for w in list.split(',').filter(|w| !w.is_empty()) {
                    let m = METHODS.into_iter().find(|m| m.flag() == w).ok_or(format!(
                        "--only: no method {w:?} (handle, handle-awake, socket, memfd)"
                    ))?;
                    cfg.only[m.index()] = true;
                }
            }
            "--help" | "-h" => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            _ => return Err(format!("unknown argument {arg:?}\n\n{USAGE}")),
        }
    }
    cfg.rounds = rounds.unwrap_or(if cfg.quick { 2 } else { 5 });
    if cfg.rounds == 0 || cfg.iters == Some(0) {
        return Err("--rounds and --iters must be positive".to_owned());
    }
    if cfg.sizes.is_empty() || !cfg.only.contains(&true) {
        return Err("--sizes and --only need at least one entry".to_owned());
    }
    if cfg.writer_cpu == cfg.reader_cpu {
        return Err("--writer-cpu and --reader-cpu must differ".to_owned());
    }
    Ok(cfg)
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let result = match args.next().as_deref() {
        Some("run") => parse_run(args).and_then(|cfg| run(&cfg)),
        Some("reader") => reader_main(args),
        Some("--help" | "-h") => {
            print!("{USAGE}");
            Ok(())
        }
        _ => Err(format!("expected a subcommand\n\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("share: {e}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The bytes: a pattern per hand-off, and the one way every method reads them.

/// The 8-byte word at index `i` of hand-off `seq`.
#[inline(always)]
fn word(seq: u64, i: u64) -> u64 {
    (seq + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i.wrapping_mul(0x0000_0100_0000_01b3)
}

/// Folds the sum and xor of the words, and the length, into the checksum.
fn finish(sum: u64, xor: u64, len: usize) -> u64 {
    sum ^ xor.rotate_left(32) ^ len as u64
}

/// The checksum every method's reader computes: the wrapping sum and the xor of the
/// little-endian 8-byte words (a last partial word padded with zeros). One pass over every byte.
#[inline(never)]
fn checksum(bytes: &[u8]) -> u64 {
    let mut sum = 0u64;
    let mut xor = 0u64;
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        let w = u64::from_le_bytes(w.try_into().unwrap_or_default());
        sum = sum.wrapping_add(w);
        xor ^= w;
    }
    let rest = words.remainder();
    if !rest.is_empty() {
        let mut last = [0u8; 8];
        last[..rest.len()].copy_from_slice(rest);
        let w = u64::from_le_bytes(last);
        sum = sum.wrapping_add(w);
        xor ^= w;
    }
    finish(sum, xor, bytes.len())
}

/// Fills `dst` with hand-off `seq`'s pattern and returns its [`checksum`].
#[inline(never)]
fn fill(dst: &mut [u8], seq: u64) -> u64 {
    let (mut sum, mut xor) = (0u64, 0u64);
    let len = dst.len();
    let mut words = dst.chunks_exact_mut(8);
    for (i, d) in (&mut words).enumerate() {
        let w = word(seq, i as u64);
        sum = sum.wrapping_add(w);
        xor ^= w;
        d.copy_from_slice(&w.to_le_bytes());
    }
    let rest = words.into_remainder();
    if !rest.is_empty() {
        let mut last = [0u8; 8];
        let n = rest.len();
        last[..n].copy_from_slice(&word(seq, (len / 8) as u64).to_le_bytes()[..n]);
        rest.copy_from_slice(&last[..n]);
        let w = u64::from_le_bytes(last);
        sum = sum.wrapping_add(w);
        xor ^= w;
    }
    finish(sum, xor, len)
}

/// The monotonic clock in nanoseconds: the same clock in both processes.
fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Page faults (minor + major) of this process so far.
fn faults() -> u64 {
    // SAFETY: all zeroes is a valid `rusage`.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable `rusage`.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0;
    }
    (ru.ru_minflt + ru.ru_majflt) as u64
}

/// An error of the last system call, with what was being done.
fn os_err(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

/// A buffer of `len` bytes (at least 1) on anonymous memory, every page faulted in: the
/// socket copy's buffers on either side, allocated once.
fn faulted_buffer(len: usize) -> Vec<u8> {
    vec![1u8; len.max(1)]
}

// ---------------------------------------------------------------------------------------------
// Mappings and messages.

/// A shared mapping of a memfd, unmapped on drop.
struct Map {
    ptr: NonNull<u8>,
    len: usize,
}

impl Map {
    /// Maps `len` bytes of `fd` (`len > 0`), writable or not.
    fn new(fd: RawFd, len: usize, writable: bool) -> Result<Self, String> {
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a new shared mapping of a descriptor we hold; no existing memory is affected.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, fd, 0) };
        if p == libc::MAP_FAILED {
            return Err(os_err("mmap of the memfd"));
        }
        Ok(Self {
            ptr: NonNull::new(p.cast()).ok_or("mmap returned null")?,
            len,
        })
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is `len` readable bytes and lives as long as `self`; the writer
        // no longer writes the memfd once it is handed over.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, mapped writable (only the writer's maps are), and `&mut self`
        // is the one reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, of this length; no slice of it outlives `self`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// A new memfd of `len` bytes holding hand-off `seq`'s pattern; its checksum.
fn filled_memfd(len: usize, seq: u64) -> Result<(OwnedFd, u64), String> {
    // SAFETY: a plain system call with a NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c"xalloc-bench-share".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(os_err("memfd_create"));
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ftruncate on our descriptor.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
        return Err(os_err("ftruncate of the memfd"));
    }
    let sum = if len == 0 {
        checksum(&[])
    } else {
        let mut map = Map::new(fd.as_raw_fd(), len, true)?;
        fill(map.bytes_mut(), seq)
    };
    Ok((fd, sum))
}

/// The writer's message that starts a hand-off.
#[derive(Clone, Copy, Default)]
struct Header {
    /// [`Method::code`], or 0: the reader exits.
    method: u64,
    size: u64,
    /// The writer's clock right before the send.
    t0: u64,
    seq: u64,
    /// The handle's byte form (handle method).
    handle: [u8; Handle::BYTES],
}

const HEADER_BYTES: usize = 32 + Handle::BYTES;

impl Header {
    fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        for (i, v) in [self.method, self.size, self.t0, self.seq]
            .iter()
            .enumerate()
        {
            b[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        b[32..].copy_from_slice(&self.handle);
        b
    }

    fn decode(b: &[u8; HEADER_BYTES]) -> Self {
        let w = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().unwrap_or_default());
        let mut handle = [0u8; Handle::BYTES];
        handle.copy_from_slice(&b[32..]);
        Self {
            method: w(0),
            size: w(1),
            t0: w(2),
            seq: w(3),
            handle,
        }
    }
}

/// The reader's answer to one hand-off: nanoseconds after the writer's `t0`, and what it read.
#[derive(Clone, Copy, Default, Debug)]
struct Answer {
    /// Until every byte was accessible (handle opened, last byte received, memfd mapped).
    access: u64,
    /// Until every byte was read (checksummed).
    done: u64,
    /// `SharedBuf::open` alone (handle), `mmap` alone (memfd), 0 (socket copy).
    open: u64,
    /// Closing afterwards: dropping the view, or `munmap` + `close`.
    release: u64,
    checksum: u64,
    /// Page faults of the reader from the message to the end of the read.
    faults: u64,
    /// Until the 64-byte message was there (the handle, the header of the copy, the
    /// descriptor).
    message: u64,
}

const ANSWER_BYTES: usize = 7 * 8;

impl Answer {
    fn encode(&self) -> [u8; ANSWER_BYTES] {
        let mut b = [0u8; ANSWER_BYTES];
        let v = [
            self.access,
            self.done,
            self.open,
            self.release,
            self.checksum,
            self.faults,
            self.message,
        ];
        for (i, v) in v.iter().enumerate() {
            b[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        b
    }

    fn decode(b: &[u8; ANSWER_BYTES]) -> Self {
        let w = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().unwrap_or_default());
        Self {
            access: w(0),
            done: w(1),
            open: w(2),
            release: w(3),
            checksum: w(4),
            faults: w(5),
            message: w(6),
        }
    }
}

/// Sends `bytes` on `sock`, with `fd` attached (`SCM_RIGHTS`) if given; the whole of `bytes`
/// (a blocking socket).
fn send_msg(sock: &UnixStream, bytes: &[u8], fd: Option<RawFd>) -> Result<(), String> {
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr().cast_mut().cast(),
        iov_len: bytes.len(),
    };
    // Room for one descriptor, aligned for cmsghdr.
    let mut control = [0u64; 8];
    // SAFETY: all zeroes is a valid msghdr (no name, no iov, no control yet).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(fd) = fd {
        // SAFETY: CMSG_SPACE is a pure computation.
        let space = unsafe { libc::CMSG_SPACE(size_of::<RawFd>() as u32) } as usize;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: `msg` points at `control`, which holds at least `space` bytes (64), so the
        // first header lies inside it and is suitably aligned (u64 array).
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(size_of::<RawFd>() as u32) as usize;
            libc::CMSG_DATA(c).cast::<RawFd>().write_unaligned(fd);
        }
    }
    // SAFETY: `msg` points at live buffers of the lengths given.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(os_err("sendmsg"));
    }
    let n = n as usize;
    if n < bytes.len() {
        // The descriptor went with the first byte; the rest goes plainly.
        (&*sock)
            .write_all(&bytes[n..])
            .map_err(|e| format!("send: {e}"))?;
    }
    Ok(())
}

/// Receives into `buf` what is there (non-blocking) and any descriptor that came with it:
/// `Ok(None)` if nothing is there yet, `Ok(Some((0, _)))` at end of stream.
fn recv_some(fd: RawFd, buf: &mut [u8]) -> Result<Option<(usize, Option<OwnedFd>)>, String> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = [0u64; 8];
    // SAFETY: as in `send_msg`.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = size_of_val(&control);
    // SAFETY: `msg` points at live, writable buffers of the lengths given.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => Ok(None),
            _ => Err(format!("recvmsg: {e}")),
        };
    }
    let mut got = None;
    // SAFETY: the kernel filled `control` and set `msg_controllen`; the CMSG macros walk it
    // within those bounds.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let fd = libc::CMSG_DATA(c).cast::<RawFd>().read_unaligned();
                got = Some(OwnedFd::from_raw_fd(fd));
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok(Some((n as usize, got)))
}

// ---------------------------------------------------------------------------------------------
// The reader: `share reader --cpu CPU --max-bytes N [--no-daemon]`, the socket on stdin.

fn reader_main(mut args: impl Iterator<Item = String>) -> Result<(), String> {
    let mut cpu = None;
    let mut max_bytes = 0usize;
    let mut daemon = true;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--cpu" => cpu = Some(number(args.next(), "--cpu")?),
            "--max-bytes" => max_bytes = number(args.next(), "--max-bytes")?,
            "--no-daemon" => daemon = false,
            _ => return Err(format!("reader: unknown argument {a:?}")),
        }
    }
    let cpu: usize = cpu.ok_or("reader: --cpu is required")?;
    pin_to(cpu).map_err(|e| format!("reader: {e}"))?;
    let sock = std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| format!("reader: dup of stdin: {e}"))?;
    let sock = UnixStream::from(sock);
    sock.set_nonblocking(true)
        .map_err(|e| format!("reader: set_nonblocking: {e}"))?;
    let mut own = faulted_buffer(max_bytes);
    if daemon {
        // Connects to the daemon now (the first share operation of a process does), and checks
        // that it serves share operations.
        drop(SharedBuf::new(0).map_err(|e| format!("reader: a shared block: {e}"))?);
    }
    send_all(&sock, b"ready\0\0\0")?;
    loop {
        let (header, fd) = match recv_header(&sock)? {
            Some(h) => h,
            None => return Ok(()), // The writer is done.
        };
        let Some(method) = Method::from_code(header.method) else {
            return Ok(());
        };
        let t_seen = now_ns();
        let answer = read_one(&sock, method, &header, t_seen, fd, &mut own)?;
        send_all(&sock, &answer.encode())?;
    }
}

/// Writes all of `bytes` on the reader's non-blocking socket.
fn send_all(sock: &UnixStream, bytes: &[u8]) -> Result<(), String> {
    let mut at = 0;
    while at < bytes.len() {
        match (&*sock).write(&bytes[at..]) {
            Ok(0) => return Err("reader: the writer is gone".to_owned()),
            Ok(n) => at += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::yield_now(),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("reader: send: {e}")),
        }
    }
    Ok(())
}

/// Waits (spinning, yielding the CPU in between) for the next header and the descriptor that
/// may come with it; `None` at end of stream.
fn recv_header(sock: &UnixStream) -> Result<Option<(Header, Option<OwnedFd>)>, String> {
    let mut b = [0u8; HEADER_BYTES];
    let mut got = 0;
    let mut fd = None;
    while got < HEADER_BYTES {
        match recv_some(sock.as_raw_fd(), &mut b[got..])? {
            None => std::thread::yield_now(),
            Some((0, _)) if got == 0 => return Ok(None),
            Some((0, _)) => return Err("reader: the writer stopped mid-message".to_owned()),
            Some((n, f)) => {
                got += n;
                if f.is_some() {
                    fd = f;
                }
            }
        }
    }
    Ok(Some((Header::decode(&b), fd)))
}

/// Receives exactly `buf.len()` bytes, spinning as [`recv_header`] does.
fn recv_exact(sock: &UnixStream, buf: &mut [u8]) -> Result<(), String> {
    let mut got = 0;
    while got < buf.len() {
        match (&*sock).read(&mut buf[got..]) {
            Ok(0) => return Err("reader: the writer stopped mid-copy".to_owned()),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::yield_now(),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("reader: read: {e}")),
        }
    }
    Ok(())
}

/// One hand-off on the reader's side.
fn read_one(
    sock: &UnixStream,
    method: Method,
    h: &Header,
    t_seen: u64,
    fd: Option<OwnedFd>,
    own: &mut [u8],
) -> Result<Answer, String> {
    let size = h.size as usize;
    let f0 = faults();
    let mut a = Answer {
        message: t_seen - h.t0,
        ..Answer::default()
    };
    match method {
        Method::Handle | Method::HandleAwake => {
            let handle = Handle::from_bytes(&h.handle).map_err(|e| format!("reader: {e}"))?;
            if method == Method::HandleAwake {
                // Untimed: an open and a close, so that the daemon is awake and watching this
                // process's channel when the timed open comes (as it is for a reader that
                // talked to it within the last 2 ms).
                drop(SharedBuf::open(handle).map_err(|e| format!("reader: open: {e}"))?);
            }
            let o0 = now_ns();
            let view = SharedBuf::open(handle).map_err(|e| format!("reader: open: {e}"))?;
            let t_access = now_ns();
            a.checksum = checksum(&view);
            let t_done = now_ns();
            a.faults = faults() - f0;
            drop(view);
            a.release = now_ns() - t_done;
            a.open = t_access - o0;
            // The message's time, then the timed open's (the warm-up left out).
            a.access = a.message + a.open;
            a.done = a.access + (t_done - t_access);
        }
        Method::Socket => {
            let buf = own
                .get_mut(..size)
                .ok_or("reader: a copy larger than its buffer")?;
            recv_exact(sock, buf)?;
            let t_access = now_ns();
            a.checksum = checksum(buf);
            let t_done = now_ns();
            a.faults = faults() - f0;
            a.access = t_access - h.t0;
            a.done = t_done - h.t0;
        }
        Method::Memfd => {
            let fd = fd.ok_or("reader: a memfd hand-off without a descriptor")?;
            let o0 = now_ns();
            let map = if size > 0 {
                Some(Map::new(fd.as_raw_fd(), size, false)?)
            } else {
                None
            };
            let t_access = now_ns();
            a.checksum = checksum(map.as_ref().map_or(&[], Map::bytes));
            let t_done = now_ns();
            a.faults = faults() - f0;
            drop(map);
            drop(fd);
            a.release = now_ns() - t_done;
            a.open = t_access - o0;
            a.access = t_access - h.t0;
            a.done = t_done - h.t0;
        }
    }
    Ok(a)
}

// ---------------------------------------------------------------------------------------------
// The writer.

/// The reader process and the writer's end of the socket.
struct Reader {
    child: Child,
    sock: UnixStream,
}

impl Reader {
    fn spawn(cfg: &Config, max_bytes: usize) -> Result<Self, String> {
        let (sock, theirs) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
        let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
        let mut cmd = Command::new(exe);
        cmd.args([
            "reader",
            "--cpu",
            &cfg.reader_cpu.to_string(),
            "--max-bytes",
            &max_bytes.to_string(),
        ]);
        if !cfg.needs_daemon() {
            cmd.arg("--no-daemon");
        }
        cmd.stdin(Stdio::from(OwnedFd::from(theirs)))
            .stdout(Stdio::null());
        let child = cmd
            .spawn()
            .map_err(|e| format!("spawn of the reader: {e}"))?;
        // Our copy of the reader's end goes with `cmd`: a dead reader then reads as EOF here.
        drop(cmd);
        sock.set_read_timeout(Some(ANSWER_TIMEOUT))
            .map_err(|e| format!("set_read_timeout: {e}"))?;
        let mut r = Reader { child, sock };
        let mut ready = [0u8; 8];
        if let Err(e) = r.sock.read_exact(&mut ready) {
            let status = r.child.wait().map_err(|e| format!("wait: {e}"))?;
            return Err(format!("the reader did not start ({e}; {status})"));
        }
        Ok(r)
    }

    fn answer(&mut self) -> Result<Answer, String> {
        let mut b = [0u8; ANSWER_BYTES];
        self.sock
            .read_exact(&mut b)
            .map_err(|e| format!("the reader's answer: {e}"))?;
        Ok(Answer::decode(&b))
    }

    /// Tells the reader to exit and waits for it.
    fn finish(mut self) -> Result<(), String> {
        let _ = send_msg(&self.sock, &Header::default().encode(), None);
        drop(self.sock);
        let status = self.child.wait().map_err(|e| format!("wait: {e}"))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("the reader failed: {status}"))
        }
    }
}

/// What the writer prepared for one hand-off (kept until the reader has answered).
enum Prepared {
    Handle(SharedBuf),
    Socket,
    Memfd(OwnedFd),
}

/// The writer's side of one hand-off: prepares (untimed), hands over, waits for the answer and
/// checks the checksum.
fn hand_off(
    reader: &mut Reader,
    method: Method,
    size: usize,
    seq: u64,
    own: &mut [u8],
    pause: Duration,
) -> Result<Answer, String> {
    let (prepared, sum) = match method {
        Method::Handle | Method::HandleAwake => {
            let mut buf =
                SharedBuf::new(size).map_err(|e| format!("SharedBuf::new({size}): {e}"))?;
            let sum = fill(&mut buf, seq);
            (Prepared::Handle(buf), sum)
        }
        Method::Socket => {
            let sum = fill(&mut own[..size], seq);
            (Prepared::Socket, sum)
        }
        Method::Memfd => {
            let (fd, sum) = filled_memfd(size, seq)?;
            (Prepared::Memfd(fd), sum)
        }
    };
    let mut h = Header {
        method: method.code(),
        size: size as u64,
        t0: 0,
        seq,
        handle: [0; Handle::BYTES],
    };
    if let Prepared::Handle(buf) = &prepared {
        h.handle = buf.handle().to_bytes();
    }
    if !pause.is_zero() {
        std::thread::sleep(pause);
    }
    h.t0 = now_ns();
    let msg = h.encode();
    match &prepared {
        Prepared::Handle(_) => send_msg(&reader.sock, &msg, None)?,
        Prepared::Socket => {
            send_msg(&reader.sock, &msg, None)?;
            (&reader.sock)
                .write_all(&own[..size])
                .map_err(|e| format!("socket copy: {e}"))?;
        }
        Prepared::Memfd(fd) => send_msg(&reader.sock, &msg, Some(fd.as_raw_fd()))?,
    }
    let a = reader.answer()?;
    if a.checksum != sum {
        return Err(format!(
            "{} of {size} bytes (hand-off {seq}): the reader's checksum {:#x} is not the \
             writer's {sum:#x}",
            method.name(),
            a.checksum
        ));
    }
    drop(prepared);
    Ok(a)
}

/// Sets the writer's send buffer for the socket copy; returns what the kernel reports.
fn set_sndbuf(sock: &UnixStream, want: Option<usize>) -> Result<usize, String> {
    let want = match want {
        Some(0) => None,
        Some(n) => Some(n),
        None => std::fs::read_to_string("/proc/sys/net/core/wmem_max")
            .ok()
            .and_then(|s| s.trim().parse().ok()),
    };
    if let Some(n) = want {
        let v = libc::c_int::try_from(n).unwrap_or(libc::c_int::MAX);
        // SAFETY: setsockopt with a valid int option value of the size passed.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&raw const v).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(os_err("setsockopt(SO_SNDBUF)"));
        }
    }
    let mut v: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt into a valid int of the size passed.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&raw mut v).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(os_err("getsockopt(SO_SNDBUF)"));
    }
    Ok(usize::try_from(v).unwrap_or(0))
}

/// Every measured hand-off of one size and method.
#[derive(Default)]
struct Samples {
    access: Vec<u64>,
    done: Vec<u64>,
    open: Vec<u64>,
    release: Vec<u64>,
    faults: Vec<u64>,
    message: Vec<u64>,
    /// The median hand-off (access) of each round.
    round_access: Vec<u64>,
}

/// One size's results, per method (indexed by [`Method::index`]).
struct SizeRow {
    size: usize,
    iters: usize,
    methods: [Option<Stats>; N_METHODS],
}

/// A method's figures at one size, µs (faults per hand-off).
#[derive(Clone, Copy)]
struct Stats {
    access_p50: f64,
    access_p90: f64,
    done_p50: f64,
    done_p90: f64,
    read_p50: f64,
    open_p50: f64,
    open_p90: f64,
    release_p50: f64,
    message_p50: f64,
    faults: f64,
    round_min: f64,
    round_max: f64,
}

/// Nearest-rank percentile of `v` (sorted here), µs.
fn pct_us(v: &mut [u64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_unstable();
    let n = v.len();
    let rank = ((p * n as f64).ceil() as usize).clamp(1, n);
    v[rank - 1] as f64 / 1e3
}

impl Samples {
    fn push(&mut self, a: &Answer) {
        self.access.push(a.access);
        self.done.push(a.done);
        self.open.push(a.open);
        self.release.push(a.release);
        self.faults.push(a.faults);
        self.message.push(a.message);
    }

    fn stats(mut self) -> Stats {
        let mut read: Vec<u64> = self
            .done
            .iter()
            .zip(&self.access)
            .map(|(d, a)| d.saturating_sub(*a))
            .collect();
        let faults = self.faults.iter().sum::<u64>() as f64 / self.faults.len().max(1) as f64;
        let rmin = self.round_access.iter().min().copied().unwrap_or(0) as f64 / 1e3;
        let rmax = self.round_access.iter().max().copied().unwrap_or(0) as f64 / 1e3;
        Stats {
            access_p50: pct_us(&mut self.access, 0.5),
            access_p90: pct_us(&mut self.access, 0.9),
            done_p50: pct_us(&mut self.done, 0.5),
            done_p90: pct_us(&mut self.done, 0.9),
            read_p50: pct_us(&mut read, 0.5),
            open_p50: pct_us(&mut self.open, 0.5),
            open_p90: pct_us(&mut self.open, 0.9),
            release_p50: pct_us(&mut self.release, 0.5),
            message_p50: pct_us(&mut self.message, 0.5),
            faults,
            round_min: rmin,
            round_max: rmax,
        }
    }
}

/// Checks the instance's daemon: the pid asked for, pinned on `--daemon-cpu` alone. Returns
/// the instance's name and the daemon's pid.
fn check_daemon(cfg: &Config) -> Result<(String, u32), String> {
    let name = std::env::var("XALLOC_NAME").unwrap_or_else(|_| "xalloc".to_owned());
    let conn = Connection::connect(&name).map_err(|e| {
        format!(
            "connect to instance {name:?} (XALLOC_NAME): {e}; is its daemon running? \
             (scripts/bench-share.sh starts one of its own)"
        )
    })?;
    let pid = conn.daemon_pid();
    let largest = cfg.sizes.iter().copied().max().unwrap_or(0);
    if conn.arena_len() < largest {
        return Err(format!(
            "the arena of {name:?} is {} bytes; it must hold a {largest}-byte block (start \
             the daemon with --arena-size 256M)",
            conn.arena_len()
        ));
    }
    drop(conn);
    if let Some(want) = cfg.daemon_pid {
        if want != pid {
            return Err(format!(
                "instance {name:?} is served by pid {pid}, not {want}"
            ));
        }
    }
    let daemon_cpus = cpus_allowed_list(pid)?;
    if daemon_cpus != cfg.daemon_cpu.to_string() {
        return Err(format!(
            "the daemon (pid {pid}) may run on CPUs {daemon_cpus}, not just CPU {}: start it \
             under `taskset -c {}`",
            cfg.daemon_cpu, cfg.daemon_cpu
        ));
    }
    // The writer's share operations go through this process's allocator connection; a first
    // one here connects it, and fails at once if the daemon does not serve shares.
    drop(SharedBuf::new(0).map_err(|e| {
        format!("instance {name:?} refused a shared block: {e} (a daemon of an older build?)")
    })?);
    Ok((name, pid))
}

/// Busy and steal clock ticks of all CPUs so far (`/proc/stat`, the `cpu` line: everything but
/// idle and iowait; steal on its own).
fn system_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest and guest_nice are within user).
    let [user, nice, system, _idle, _iowait, irq, softirq, steal, ..] = v[..] else {
        return None;
    };
    Some((user + nice + system + irq + softirq, steal))
}

/// utime + stime of process `pid`, clock ticks (`/proc/PID/stat` fields 14 and 15).
fn process_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Field 3 is the first after the `)`.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// CPU time the processes of the benchmark (writer, reader, daemon) did not use, over the run:
/// what else ran on the machine meanwhile.
#[derive(Clone, Copy)]
struct Interference {
    /// Busy ticks of other processes (and the kernel on their behalf), per second of the run,
    /// as a share of one CPU.
    others: f64,
    /// Steal (the hypervisor ran something else on these CPUs), likewise.
    steal: f64,
}

fn run(cfg: &Config) -> Result<(), String> {
    let started = Instant::now();
    let methods = cfg.methods();
    let daemon = if cfg.needs_daemon() {
        Some(check_daemon(cfg)?)
    } else {
        None
    };
    for cpu in [cfg.writer_cpu, cfg.reader_cpu] {
        if !cpu_allowed(cpu) {
            return Err(format!("this process may not run on CPU {cpu}"));
        }
    }
    pin_to(cfg.writer_cpu)?;
    let max_bytes = cfg.sizes.iter().copied().max().unwrap_or(0);
    let mut own = faulted_buffer(max_bytes);
    let mut reader = Reader::spawn(cfg, max_bytes)?;
    let sndbuf = set_sndbuf(&reader.sock, cfg.sndbuf)?;
    eprintln!(
        "share: writer on CPU {}, reader (pid {}) on CPU {}{}; {} rounds per size, {} µs pause \
         before each hand-off",
        cfg.writer_cpu,
        reader.child.id(),
        cfg.reader_cpu,
        match &daemon {
            Some((name, pid)) => format!(", daemon {name} (pid {pid}) on CPU {}", cfg.daemon_cpu),
            None => String::new(),
        },
        cfg.rounds,
        cfg.pause.as_micros()
    );
    // Our processes' CPU time, and the machine's, before and after.
    let pids: Vec<u32> = [Some(std::process::id()), Some(reader.child.id())]
        .into_iter()
        .chain([daemon.as_ref().map(|d| d.1)])
        .flatten()
        .collect();
    let ours = |pids: &[u32]| pids.iter().filter_map(|&p| process_ticks(p)).sum::<u64>();
    let (sys_before, ours_before, t_before) = (system_ticks(), ours(&pids), Instant::now());
    let mut rows = Vec::new();
    let mut seq = 0u64;
    let measured = (|| -> Result<(), String> {
        for &size in &cfg.sizes {
            let iters = cfg.iters_for(size);
            eprintln!(
                "share: {} — {} rounds × {iters} hand-offs per method (+1 warm-up each)",
                size_label(size),
                cfg.rounds
            );
            let mut samples: [Samples; N_METHODS] = Default::default();
            for round in 0..cfg.rounds {
                for k in 0..methods.len() {
                    let m = methods[(round + k) % methods.len()];
                    let s = &mut samples[m.index()];
                    let mut this_round = Vec::with_capacity(iters);
                    for i in 0..=iters {
                        seq += 1;
                        let a = hand_off(&mut reader, m, size, seq, &mut own, cfg.pause)?;
                        if i > 0 {
                            s.push(&a);
                            this_round.push(a.access);
                        }
                    }
                    let p50 = pct_us(&mut this_round, 0.5);
                    s.round_access.push((p50 * 1e3) as u64);
                }
            }
            let mut stats = [None; N_METHODS];
            for (i, s) in samples.into_iter().enumerate() {
                if cfg.only[i] {
                    stats[i] = Some(s.stats());
                }
            }
            rows.push(SizeRow {
                size,
                iters,
                methods: stats,
            });
        }
        Ok(())
    })();
    // Read while the reader still lives.
    let (sys_after, ours_after, secs) = (system_ticks(), ours(&pids), t_before.elapsed());
    let finished = reader.finish();
    measured?;
    finished?;
    let tck = {
        // SAFETY: a plain query.
        let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        if t > 0 {
            t as f64
        } else {
            100.0
        }
    };
    let interference = sys_before.zip(sys_after).map(|(b, a)| {
        let busy = a.0.saturating_sub(b.0);
        let ours = ours_after.saturating_sub(ours_before);
        let per_cpu_s = |ticks: u64| ticks as f64 / tck / secs.as_secs_f64().max(1e-9);
        Interference {
            others: per_cpu_s(busy.saturating_sub(ours)),
            steal: per_cpu_s(a.1.saturating_sub(b.1)),
        }
    });
    let report = Report {
        cfg,
        daemon,
        rows: &rows,
        sndbuf,
        interference,
        elapsed: started.elapsed(),
    };
    print!("{}", report.markdown());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The report.

/// `64 KiB`, `64 MiB`.
fn size_label(size: usize) -> String {
    if size >= 1 << 20 && size.is_multiple_of(1 << 20) {
        format!("{} MiB", size >> 20)
    } else if size >= 1 << 10 && size.is_multiple_of(1 << 10) {
        format!("{} KiB", size >> 10)
    } else {
        format!("{size} B")
    }
}

/// µs with a precision that suits the magnitude.
fn us(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// `a ÷ b`; `–` where either is missing.
fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => {
            let v = a / b;
            if v >= 100.0 {
                format!("{v:.0}×")
            } else {
                format!("{v:.2}×")
            }
        }
        _ => "–".to_owned(),
    }
}

struct Report<'a> {
    cfg: &'a Config,
    daemon: Option<(String, u32)>,
    rows: &'a [SizeRow],
    sndbuf: usize,
    interference: Option<Interference>,
    elapsed: Duration,
}

/// A statistic of one method at one size.
type Stat = fn(&Stats) -> f64;

impl Report<'_> {
    fn markdown(&self) -> String {
        let cfg = self.cfg;
        let mut s = String::new();
        let placement = match &self.daemon {
            Some((name, pid)) => format!(
                "instance {name}, daemon pid {pid} on CPU {}; writer on CPU {}, reader on CPU {}",
                cfg.daemon_cpu, cfg.writer_cpu, cfg.reader_cpu
            ),
            None => format!(
                "no daemon (handles not measured); writer on CPU {}, reader on CPU {}",
                cfg.writer_cpu, cfg.reader_cpu
            ),
        };
        let _ = writeln!(s, "## Handing a buffer to another process ({placement})\n");
        let get = |r: &SizeRow, m: Method, f: Stat| r.methods[m.index()].map(|x| f(&x));
        let cell = |v: Option<f64>| v.map_or("–".to_owned(), us);
        let access: Stat = |x| x.access_p50;
        let done: Stat = |x| x.done_p50;
        let open: Stat = |x| x.open_p50;
        let _ = writeln!(
            s,
            "Before each hand-off the writer made the buffer and filled it, then waited {} µs \
             (`--pause-us`), long enough for the daemon to go to sleep and to stop watching the \
             reader's channel: the **handle** column pays for waking it. In **handle, daemon \
             awake** the reader, once the message is there, first opens and closes the handle \
             untimed, then opens it timed: the daemon is awake and watches the reader's channel, \
             as for a reader that talked to it within the last 2 ms; its hand-off is the message's \
             time plus the timed open's.\n",
            cfg.pause.as_micros()
        );
        for (title, f, opens) in [
            (
                "Hand-off alone: median µs from the writer's send until the reader can access \
                 every byte (handle: the 64-byte message and `SharedBuf::open`; socket copy: the \
                 last byte in the reader's buffer; memfd: the descriptor received and mapped). \
                 The targets refer to this table.",
                access,
                true,
            ),
            (
                "Hand-off + read: median µs until the reader has also read (checksummed) every \
                 byte, the same way in every method.",
                done,
                false,
            ),
        ] {
            let _ = writeln!(s, "{title}\n");
            let _ = write!(
                s,
                "| size | handle (µs) | socket copy (µs) | memfd (µs) | socket/handle | \
                 memfd/handle |"
            );
            if opens {
                let _ = write!(s, " open p50 µs |");
            }
            let _ = write!(s, " handle, daemon awake (µs) | socket/handle, awake |");
            if opens {
                let _ = write!(s, " open p50 µs, awake |");
            }
            let _ = writeln!(
                s,
                "\n|---|---:|---:|---:|---:|---:|{}---:|---:|{}",
                if opens { "---:|" } else { "" },
                if opens { "---:|" } else { "" }
            );
            for r in self.rows {
                let h = get(r, Method::Handle, f);
                let hw = get(r, Method::HandleAwake, f);
                let so = get(r, Method::Socket, f);
                let me = get(r, Method::Memfd, f);
                let _ = write!(
                    s,
                    "| {} | {} | {} | {} | {} | {} |",
                    size_label(r.size),
                    cell(h),
                    cell(so),
                    cell(me),
                    ratio(so, h),
                    ratio(me, h),
                );
                if opens {
                    let _ = write!(s, " {} |", cell(get(r, Method::Handle, open)));
                }
                let _ = write!(s, " {} | {} |", cell(hw), ratio(so, hw));
                if opens {
                    let _ = write!(s, " {} |", cell(get(r, Method::HandleAwake, open)));
                }
                let _ = writeln!(s);
            }
            let _ = writeln!(s);
        }

        let _ = writeln!(
            s,
            "In detail: p50 and p90 µs; message = until the 64-byte message (the handle, the \
             copy's header, the descriptor) was there; read = hand-off + read minus hand-off, per hand-off, with \
             the GB/s of its median; open = `SharedBuf::open` (handles) or `mmap` (memfd) alone; \
             the reader's page faults per hand-off; release = dropping the view, or `munmap` and \
             `close` (after the clock stopped); the range of the rounds' hand-off medians.\n"
        );
        let _ = writeln!(
            s,
            "| size | method | hand-offs | message p50 | hand-off p50 | p90 | + read p50 | p90 | \
             read p50 (GB/s) | open p50 | p90 | faults | release p50 | rounds' hand-off p50 |"
        );
        let _ = writeln!(
            s,
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
        );
        for r in self.rows {
            for m in METHODS {
                let Some(x) = r.methods[m.index()] else {
                    continue;
                };
                let gbs = if x.read_p50 > 0.0 {
                    format!("{:.1}", r.size as f64 / (x.read_p50 * 1e3))
                } else {
                    "–".to_owned()
                };
                let (open, open90, release) = if m == Method::Socket {
                    ("–".to_owned(), "–".to_owned(), "–".to_owned())
                } else {
                    (us(x.open_p50), us(x.open_p90), us(x.release_p50))
                };
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} ({gbs}) | {open} | {open90} | \
                     {:.0} | {release} | {}–{} |",
                    size_label(r.size),
                    m.name(),
                    r.iters * cfg.rounds,
                    us(x.message_p50),
                    us(x.access_p50),
                    us(x.access_p90),
                    us(x.done_p50),
                    us(x.done_p90),
                    us(x.read_p50),
                    x.faults,
                    us(x.round_min),
                    us(x.round_max),
                );
            }
        }
        let _ = writeln!(
            s,
            "\nSocket copy: a Unix stream socket pair, the writer's send buffer {} (SO_SNDBUF as \
             the kernel reports it).",
            size_label(self.sndbuf)
        );
        match self.interference {
            Some(i) if self.elapsed < Duration::from_secs(3) => {
                let _ = writeln!(
                    s,
                    "Other processes used about {:.0} % of a CPU while this ran (a short run: \
                     rough).",
                    (i.others + i.steal) * 100.0
                );
            }
            Some(i) => {
                let _ = writeln!(
                    s,
                    "Other processes used {:.0} % of a CPU on average while this ran (steal {:.0} \
                     %){}",
                    i.others * 100.0,
                    i.steal * 100.0,
                    if i.others + i.steal > 0.05 {
                        ": THE NUMBERS ARE DISTURBED, run again on a quiet machine."
                    } else {
                        "."
                    }
                );
            }
            None => {
                let _ = writeln!(s, "(No /proc/stat: other processes' CPU time unknown.)");
            }
        }

        // Targets, at the largest size measured.
        let _ = writeln!(s, "\n| target | measured | result |");
        let _ = writeln!(s, "|---|---|---|");
        if let Some(r) = self.rows.iter().max_by_key(|r| r.size) {
            let label = size_label(r.size);
            let so = r.methods[Method::Socket.index()];
            for m in [Method::HandleAwake, Method::Handle] {
                let state = if m == Method::Handle {
                    "daemon asleep"
                } else {
                    "daemon awake"
                };
                let (v, res) = match r.methods[m.index()] {
                    Some(h) => (
                        format!("{} µs (p90 {})", us(h.open_p50), us(h.open_p90)),
                        verdict(h.open_p50 < TARGET_OPEN_US),
                    ),
                    None => ("not measured".to_owned(), "n/a"),
                };
                let _ = writeln!(
                    s,
                    "| open p50 at {label} well under {TARGET_OPEN_US} µs, {state} | {v} | {res} |"
                );
            }
            for m in [Method::HandleAwake, Method::Handle] {
                let opens: Vec<String> = self
                    .rows
                    .iter()
                    .filter_map(|r| {
                        r.methods[m.index()]
                            .map(|h| format!("{} {}", size_label(r.size), us(h.open_p50)))
                    })
                    .collect();
                if !opens.is_empty() {
                    let _ = writeln!(
                        s,
                        "| open costs one round trip whatever the size ({}) | p50 µs: {} | \
                         (informational) |",
                        m.name(),
                        opens.join(", ")
                    );
                }
            }
            for m in [Method::HandleAwake, Method::Handle] {
                let (v, res) = match (r.methods[m.index()], so) {
                    (Some(h), Some(so)) => {
                        let v = so.access_p50 / h.access_p50;
                        (
                            format!(
                                "{v:.0}× ({} against {} µs); the open alone: {:.0}× ({} µs)",
                                us(so.access_p50),
                                us(h.access_p50),
                                so.access_p50 / h.open_p50,
                                us(h.open_p50)
                            ),
                            verdict(v >= TARGET_RATIO),
                        )
                    }
                    _ => ("not measured".to_owned(), "n/a"),
                };
                let _ = writeln!(
                    s,
                    "| hand-off alone at {label}: {} ≥ {TARGET_RATIO}× faster than the socket \
                     copy | {v} | {res} |",
                    m.name()
                );
            }
            if let (Some(h), Some(so)) = (r.methods[Method::Handle.index()], so) {
                let _ = writeln!(
                    s,
                    "| hand-off + read at {label}: socket copy ÷ handle | {:.1}× ({} against {} \
                     µs) | (informational: both read every byte) |",
                    so.done_p50 / h.done_p50,
                    us(so.done_p50),
                    us(h.done_p50)
                );
            }
        }
        let _ = writeln!(
            s,
            "\nEvery checksum matched. Missed targets do not fail the run; measured in {:.1} s.",
            self.elapsed.as_secs_f64()
        );
        s
    }
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "missed"
    }
}
