//! The keeper: a tiny process that holds copies of the daemon's descriptors (the sealed arena
//! memfd and every client's request and response memfds) so that they outlive a daemon that is
//! killed, and a restarted daemon can re-attach to them. Our own equivalent of systemd's file
//! descriptor store.
//!
//! One keeper runs per instance, as the daemon's uid, listening on the `SOCK_SEQPACKET` socket
//! `/dev/shm/{name}.keeper` (mode 0600). It serves one daemon connection at a time and accepts
//! only peers of its own effective uid. When that connection ends without [`op::QUIT`] (the
//! daemon died), it keeps everything and waits for the next daemon. It exits on `QUIT` or
//! SIGTERM, unlinking its socket; it ignores SIGINT and SIGHUP.
//!
//! The daemon side is [`KeeperLink`]; the keeper process is [`run_keeper`]
//! (`xallocd keeper --name NAME`, a subcommand hidden from `--help`).
//!
//! # Messages
//! Every message is one [`MSG_LEN`]-byte datagram, little-endian, with descriptors attached by
//! `SCM_RIGHTS`:
//!
//! | offset | size | field                                                         |
//! |-------:|-----:|---------------------------------------------------------------|
//! |      0 |    4 | magic [`MAGIC`] (`"XKP1"`: format version 1)                   |
//! |      4 |    2 | op ([`op`])                                                    |
//! |      6 |    2 | status ([`status`]; replies only, else 0)                      |
//! |      8 |    4 | seq: chosen by the daemon per request, echoed in every reply   |
//! |     12 |    4 | id: the client channel's id (`KEPT_END`: channels sent)        |
//! |     16 |    4 | pid of the client                                              |
//! |     20 |    4 | uid of the client                                              |
//! |     24 |    8 | generation of the arena                                        |
//!
//! Requests (daemon → keeper) and their descriptors: `ARENA` (arena), `KEEP` (request,
//! response, the client's pidfd), `DROP`, `TAKE`, `QUIT`. Each is answered by `ACK`, except
//! `TAKE`, answered by `KEPT_ARENA` (arena), one `KEPT_CHANNEL` (request, response, pidfd) per
//! channel, then `KEPT_END`
//! (or by `KEPT_END` with status `NO_ARENA` alone). An `ARENA` or `KEEP` whose descriptors the
//! keeper cannot receive (it is at its descriptor limit) gets `ACK` with status `NO_ROOM`, and
//! the connection goes on. A message of another length, magic, op or descriptor count ends the
//! connection: the keeper never panics on what it receives.
//! The daemon skips replies whose seq is not that of its current request (late answers to a
//! request that timed out).

use std::cell::Cell;
use std::collections::BTreeMap;
use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitCode, Stdio};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};
use xalloc_proto::os::{self, Errno, Fd};
use xalloc_proto::unix;

/// Length of every message.
pub const MSG_LEN: usize = 32;

/// First word of every message: `"XKP1"`. A keeper and a daemon of different formats drop each
/// other's connections instead of misreading them.
pub const MAGIC: u32 = u32::from_le_bytes(*b"XKP1");

/// How long the daemon waits for each answer of its keeper, and the keeper for the daemon to
/// take each of its messages.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// How long [`KeeperLink::spawn`] waits for a new keeper to listen.
pub const START_TIMEOUT: Duration = Duration::from_secs(5);

/// How long [`KeeperLink::quit`] waits for the keeper to exit once told (or signalled).
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(3);

/// Longest socket path: `sun_path` holds 108 bytes, NUL included.
const MAX_SOCKET_PATH: usize = 107;

/// Message op codes.
pub mod op {
    /// Daemon → keeper: hold this arena (1 descriptor) of `generation`, replacing any held.
    pub const ARENA: u16 = 1;
    /// Daemon → keeper: hold client `id`'s channel (2 descriptors: request, response), with
    /// its `pid` and `uid`; replaces a channel of the same id.
    pub const KEEP: u16 = 2;
    /// Daemon → keeper: let go of client `id`'s channel.
    pub const DROP: u16 = 3;
    /// Daemon → keeper: send copies of everything held.
    pub const TAKE: u16 = 4;
    /// Daemon → keeper: release everything, unlink the socket, acknowledge and exit.
    pub const QUIT: u16 = 5;
    /// Keeper → daemon: the request `seq` is done (see `status`).
    pub const ACK: u16 = 0x81;
    /// Keeper → daemon, first answer to `TAKE`: the arena (1 descriptor) and its generation.
    pub const KEPT_ARENA: u16 = 0x82;
    /// Keeper → daemon, answer to `TAKE`: one channel (2 descriptors), its id, pid and uid.
    pub const KEPT_CHANNEL: u16 = 0x83;
    /// Keeper → daemon, last answer to `TAKE`: `id` is the number of channels sent.
    pub const KEPT_END: u16 = 0x84;

    /// Descriptors a message of op `op` carries, or `None` for an unknown op.
    pub fn fds(op: u16) -> Option<usize> {
        match op {
            ARENA | KEPT_ARENA => Some(1),
            KEEP | KEPT_CHANNEL => Some(3),
            DROP | TAKE | QUIT | ACK | KEPT_END => Some(0),
            _ => None,
        }
    }

    /// Whether `op` is one the daemon sends.
    pub fn is_request(op: u16) -> bool {
        matches!(op, ARENA | KEEP | DROP | TAKE | QUIT)
    }
}

/// Reply status codes.
pub mod status {
    /// Done.
    pub const OK: u16 = 0;
    /// `DROP`: the keeper held no channel of that id (nothing to do).
    pub const NOT_HELD: u16 = 1;
    /// `TAKE`: the keeper holds no arena (no daemon ever handed it one).
    pub const NO_ARENA: u16 = 2;
    /// `ARENA`, `KEEP`: the keeper could not receive the descriptors (it has reached its
    /// descriptor limit); it holds what it held before.
    pub const NO_ROOM: u16 = 3;
}

/// One message's fixed header; see the [module docs](self) for the layout.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Msg {
    op: u16,
    status: u16,
    seq: u32,
    id: u32,
    pid: u32,
    uid: u32,
    generation: u64,
}

impl Msg {
    fn encode(&self) -> [u8; MSG_LEN] {
        let mut b = [0u8; MSG_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&self.op.to_le_bytes());
        b[6..8].copy_from_slice(&self.status.to_le_bytes());
        b[8..12].copy_from_slice(&self.seq.to_le_bytes());
        b[12..16].copy_from_slice(&self.id.to_le_bytes());
        b[16..20].copy_from_slice(&self.pid.to_le_bytes());
        b[20..24].copy_from_slice(&self.uid.to_le_bytes());
        b[24..32].copy_from_slice(&self.generation.to_le_bytes());
        b
    }

    /// The header in `b`, if `b` is exactly one message with our magic.
    fn decode(b: &[u8]) -> Option<Msg> {
        let b: &[u8; MSG_LEN] = b.try_into().ok()?;
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        if u32_at(0) != MAGIC {
            return None;
        }
        let mut g = [0u8; 8];
        g.copy_from_slice(&b[24..32]);
        Some(Msg {
            op: u16_at(4),
            status: u16_at(6),
            seq: u32_at(8),
            id: u32_at(12),
            pid: u32_at(16),
            uid: u32_at(20),
            generation: u64::from_le_bytes(g),
        })
    }
}

/// Why a received message is not usable.
#[derive(Debug)]
enum Bad {
    /// Not a message of this format: the connection is dropped.
    Malformed(String),
    /// A well-formed message whose descriptors the kernel could not all install (`MSG_CTRUNC`):
    /// this process is at its descriptor limit. The connection can go on.
    FdsLost(Msg),
}

/// A received message that is well-formed: right length and magic, a known op, and exactly
/// the descriptors that op carries (in order).
fn parse(buf: &[u8], r: unix::Received) -> Result<(Msg, Vec<Fd>), Bad> {
    if r.truncated {
        return Err(Bad::Malformed(format!(
            "message longer than {} bytes",
            r.len
        )));
    }
    let msg = Msg::decode(&buf[..r.len]).ok_or_else(|| {
        Bad::Malformed(format!(
            "{}-byte message without the keeper's format",
            r.len
        ))
    })?;
    let fds: Vec<Fd> = r.fds.into_iter().flatten().collect();
    match op::fds(msg.op) {
        Some(n) if n > fds.len() && r.fds_truncated => Err(Bad::FdsLost(msg)),
        Some(n) if n == fds.len() && !r.fds_truncated => Ok((msg, fds)),
        Some(n) => Err(Bad::Malformed(format!(
            "op {:#x} with {}{} descriptors (it takes {n})",
            msg.op,
            fds.len(),
            if r.fds_truncated { " or more" } else { "" }
        ))),
        None => Err(Bad::Malformed(format!("unknown op {:#x}", msg.op))),
    }
}

/// The time left until `deadline` (zero once passed).
fn left(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

/// What [`wait`] saw.
#[derive(Debug, PartialEq, Eq)]
enum Ready {
    /// The watched descriptor is readable or writable as asked (or hung up / in error).
    Fd,
    /// The stop descriptor is readable.
    Stop,
    /// The timeout passed.
    Timeout,
}

/// Waits until `fd` has `events` (or a hang-up or error), `stop` is readable, or `timeout`
/// passes (`None`: forever). Retries on `EINTR`.
fn wait(
    fd: &impl AsFd,
    events: PollFlags,
    stop: Option<&Fd>,
    timeout: Option<Duration>,
) -> Result<Ready, Errno> {
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        let mut pfds = vec![PollFd::new(fd, events)];
        if let Some(s) = stop {
            pfds.push(PollFd::new(s, PollFlags::IN));
        }
        let ts = deadline.map(|d| {
            let t = left(d);
            rustix::event::Timespec {
                tv_sec: t.as_secs().min(i64::MAX as u64) as i64,
                tv_nsec: i64::from(t.subsec_nanos()),
            }
        });
        match rustix::event::poll(&mut pfds, ts.as_ref()) {
            Ok(0) => return Ok(Ready::Timeout),
            Ok(_) => {
                if pfds.get(1).is_some_and(|p| !p.revents().is_empty()) {
                    return Ok(Ready::Stop);
                }
                if !pfds[0].revents().is_empty() {
                    return Ok(Ready::Fd);
                }
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(Errno(e.raw_os_error())),
        }
    }
}

/// Sends one message, waiting up to `timeout` for room in the socket's buffer.
fn send(sock: &Fd, msg: &Msg, fds: &[BorrowedFd<'_>], timeout: Duration) -> Result<(), Errno> {
    let bytes = msg.encode();
    let deadline = Instant::now() + timeout;
    loop {
        match unix::send_with_fds(sock, &bytes, fds) {
            Ok(()) => return Ok(()),
            Err(Errno(libc::EAGAIN)) | Err(Errno(libc::ENOBUFS)) => {
                if wait(sock, PollFlags::OUT, None, Some(left(deadline)))? == Ready::Timeout {
                    return Err(Errno(libc::ETIMEDOUT));
                }
            }
            Err(Errno(libc::EINTR)) => {}
            Err(e) => return Err(e),
        }
    }
}

/// `/dev/shm/{name}.keeper`, if `name` makes a usable socket path.
fn socket_path(name: &str) -> Result<PathBuf, String> {
    if name.is_empty() || name.starts_with('.') || name.contains(['/', '\0']) {
        return Err(format!(
            "{name:?} is not a valid instance name for a keeper: give a non-empty name \
             without '/' that does not start with '.'"
        ));
    }
    let path = format!("/dev/shm/{name}.keeper");
    if path.len() > MAX_SOCKET_PATH {
        return Err(format!(
            "instance name {name:?} is too long for the keeper's socket {path}: a Unix socket \
             path holds at most {MAX_SOCKET_PATH} bytes; use a name of at most {} bytes",
            MAX_SOCKET_PATH - "/dev/shm/.keeper".len()
        ));
    }
    Ok(PathBuf::from(path))
}

/// Removes `path`, left by a keeper that no longer listens, if it is a socket of our euid.
fn remove_stale(path: &Path) -> Result<(), String> {
    let euid = os::euid();
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() && m.uid() == euid => match std::fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(format!(
                "cannot remove {}, left by a keeper that no longer runs: {e}",
                path.display()
            )),
        },
        Ok(m) => Err(format!(
            "a {} of uid {}, not a keeper's socket of uid {euid}",
            if m.file_type().is_socket() {
                "socket"
            } else {
                "file that is not a socket"
            },
            m.uid()
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("cannot inspect {}: {e}", path.display())),
    }
}

/// What a keeper holds for its instance: copies for a daemon that re-attaches.
#[derive(Debug)]
pub struct Kept {
    /// The arena memfd.
    pub arena: Fd,
    /// The instance generation the arena was handed with.
    pub generation: u64,
    /// Every client channel held, in order of id.
    pub channels: Vec<KeptChannel>,
}

/// One client's channel as a keeper holds it.
#[derive(Debug)]
pub struct KeptChannel {
    /// The daemon's id for the client.
    pub id: u32,
    /// The client's process id, as the daemon recorded it.
    pub pid: u32,
    /// The client's uid, as the daemon recorded it.
    pub uid: u32,
    /// The client's request memfd.
    pub request: Fd,
    /// The client's response memfd.
    pub response: Fd,
    /// A pidfd of the client's process, taken when it connected: it names that very process
    /// even if the pid has been reused since.
    pub pidfd: Fd,
}

/// The daemon's connection to its keeper.
///
/// Requests are synchronous: each method returns once the keeper has answered (or after
/// [`ANSWER_TIMEOUT`] with an error). A link is `Send` but not `Sync`: one thread talks to the
/// keeper at a time (wrap it in a `Mutex` to share it).
#[derive(Debug)]
pub struct KeeperLink {
    /// The instance name, for messages.
    name: String,
    /// The connection (non-blocking, close-on-exec).
    sock: Fd,
    /// The keeper's process id.
    pid: u32,
    /// A pidfd of the keeper, to wait for its exit and signal it; `None` for a keeper that runs
    /// inside this process (unit tests).
    pidfd: Option<Fd>,
    /// The keeper process, if this process started it (reaped in [`quit`](Self::quit)).
    child: Option<Child>,
    /// The sequence number of the last request.
    seq: Cell<u32>,
}

impl KeeperLink {
    /// Connects to the running keeper of instance `name` (socket `/dev/shm/{name}.keeper`),
    /// checking that it runs as this process's effective uid. `Ok(None)` if no keeper runs:
    /// no socket, or a stale socket nobody listens on (the stale file is removed then, if it is
    /// a socket of our euid; anything else there is an error).
    pub fn connect(name: &str) -> Result<Option<KeeperLink>, String> {
        let path = socket_path(name)?;
        let cpath = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| format!("{} holds a NUL byte", path.display()))?;
        let sock = match unix::connect(&cpath) {
            Ok(s) => s,
            Err(Errno(libc::ENOENT)) => return Ok(None),
            Err(Errno(libc::ECONNREFUSED)) => {
                remove_stale(&path)?;
                return Ok(None);
            }
            Err(Errno(libc::EAGAIN)) => {
                return Err(format!(
                    "the keeper of instance {name} at {} takes no more connections (its \
                     backlog is full); try again, or stop the process that floods it",
                    path.display()
                ))
            }
            Err(e) => {
                return Err(format!(
                    "cannot connect to the keeper of instance {name} at {}: {e}",
                    path.display()
                ))
            }
        };
        let peer = unix::peer(&sock).map_err(|e| {
            format!(
                "cannot read the credentials of the keeper at {}: {e}",
                path.display()
            )
        })?;
        let euid = os::euid();
        if peer.uid != euid {
            return Err(format!(
                "{} is served by process {} of uid {}, not by a keeper of our uid {euid}; \
                 refusing to use it: stop that process or remove the socket",
                path.display(),
                peer.pid,
                peer.uid
            ));
        }
        let pidfd = if peer.pid == os::pid() {
            None
        } else {
            unix::peer_pidfd(&sock, &peer).ok()
        };
        Ok(Some(KeeperLink {
            name: name.to_owned(),
            sock,
            pid: peer.pid,
            pidfd,
            child: None,
            seq: Cell::new(0),
        }))
    }

    /// Starts a keeper for `name` holding `arena` (of instance generation `generation`) and
    /// returns the link to it. Runs the current executable with the hidden subcommand
    /// `keeper --name NAME`, waits up to [`START_TIMEOUT`] until it listens, then connects and
    /// hands it the arena. Fails if a keeper already runs for `name` (use
    /// [`connect`](Self::connect) first).
    pub fn spawn(name: &str, arena: &Fd, generation: u64) -> Result<KeeperLink, String> {
        // A binary replaced on disk since we started reads as "PATH (deleted)": run our own
        // image through /proc/self/exe then.
        let exe = std::env::current_exe()
            .ok()
            .filter(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from("/proc/self/exe"));
        Self::spawn_exe(&exe, name, arena, generation)
    }

    /// [`spawn`](Self::spawn) with executable `exe`.
    fn spawn_exe(
        exe: &Path,
        name: &str,
        arena: &Fd,
        generation: u64,
    ) -> Result<KeeperLink, String> {
        let path = socket_path(name)?;
        let mut cmd = std::process::Command::new(exe);
        cmd.args(["keeper", "--name", name])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        // SAFETY: the closure runs in the child between fork and exec; it makes one raw
        // system call, which is async-signal-safe, and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                // Every descriptor of ours should be close-on-exec already; make sure that none
                // (the pidfile's lock above all) reaches the keeper. Linux 5.11 and later; on
                // older kernels this fails and we rely on O_CLOEXEC alone.
                libc::syscall(
                    libc::SYS_close_range,
                    3u32,
                    u32::MAX,
                    libc::CLOSE_RANGE_CLOEXEC,
                );
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|e| {
            format!(
                "cannot start the keeper of instance {name} ({} keeper --name {name}): {e}",
                exe.display()
            )
        })?;
        let kpid = child.id();
        let answer = match child.stdout.take() {
            Some(out) => read_line(out, START_TIMEOUT),
            None => Err("its stdout was not piped".into()),
        };
        let fail = |mut child: Child, why: String| {
            let _ = child.kill();
            let _ = child.wait();
            Err(format!(
                "the keeper of instance {name} (pid {kpid}) did not start: {why}"
            ))
        };
        match answer {
            Ok(line) if line == "ready" => {}
            Ok(line) => {
                let why = line.strip_prefix("error: ").unwrap_or(&line).to_owned();
                let why = if why.is_empty() {
                    "it exited without saying why".to_owned()
                } else {
                    why
                };
                return fail(child, why);
            }
            Err(e) => return fail(child, e),
        }
        let mut link = match Self::connect(name) {
            Ok(Some(l)) => l,
            Ok(None) => return fail(child, format!("nobody listens at {}", path.display())),
            Err(e) => return fail(child, e),
        };
        if link.pid != kpid {
            let other = link.pid;
            return fail(
                child,
                format!(
                    "process {other}, not our keeper, answers at {}",
                    path.display()
                ),
            );
        }
        link.child = Some(child);
        if let Err(e) = link.give_arena(arena, generation) {
            let pid = link.pid;
            if let Err(q) = link.quit() {
                return Err(format!(
                    "the new keeper of instance {name} (pid {pid}) did not take the arena \
                     ({e}), and did not quit: {q}"
                ));
            }
            return Err(format!(
                "the new keeper of instance {name} (pid {pid}) did not take the arena: {e}"
            ));
        }
        Ok(link)
    }

    /// The keeper's process id (from `SO_PEERCRED`).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Hands the keeper `arena` (of `generation`), replacing any arena it holds.
    fn give_arena(&self, arena: &Fd, generation: u64) -> Result<(), String> {
        let msg = Msg {
            op: op::ARENA,
            generation,
            ..Msg::default()
        };
        self.request(msg, &[arena.as_fd()], "hold the arena")
            .map(|_| ())
    }

    /// Copies of everything the keeper holds (it keeps holding them): for a daemon that
    /// re-attaches. Works for any number of channels (one message each). Raises this
    /// process's soft descriptor limit to the hard limit first, since it receives two
    /// descriptors per channel.
    pub fn take(&self) -> Result<Kept, String> {
        unix::raise_fd_limit();
        let what = "hand over what it holds";
        let seq = self.send_request(
            Msg {
                op: op::TAKE,
                ..Msg::default()
            },
            &[],
            what,
        )?;
        let (first, mut fds) = self.answer(seq, what)?;
        let (arena, generation) = match first.op {
            op::KEPT_ARENA => (fds.remove(0), first.generation),
            op::KEPT_END if first.status == status::NO_ARENA => {
                return Err(format!(
                    "the keeper of instance {} (pid {}) holds no arena: no daemon ever handed it \
                     one; stop it (it holds nothing a client could use) and start a new one",
                    self.name, self.pid
                ))
            }
            _ => return Err(self.unexpected(&first, what)),
        };
        let mut channels = Vec::new();
        loop {
            let (m, fds) = self.answer(seq, what)?;
            match m.op {
                op::KEPT_CHANNEL => {
                    let mut fds = fds.into_iter();
                    let (Some(request), Some(response), Some(pidfd)) =
                        (fds.next(), fds.next(), fds.next())
                    else {
                        return Err(self.unexpected(&m, what));
                    };
                    channels.push(KeptChannel {
                        id: m.id,
                        pid: m.pid,
                        uid: m.uid,
                        request,
                        response,
                        pidfd,
                    });
                }
                op::KEPT_END if m.status == status::OK => {
                    if m.id as usize != channels.len() {
                        return Err(format!(
                            "the keeper of instance {} (pid {}) announced {} channels but sent \
                             {}",
                            self.name,
                            self.pid,
                            m.id,
                            channels.len()
                        ));
                    }
                    return Ok(Kept {
                        arena,
                        generation,
                        channels,
                    });
                }
                _ => return Err(self.unexpected(&m, what)),
            }
        }
    }

    /// Asks the keeper to hold client `id`'s channel (its `pid`, `uid` and `pidfd` recorded
    /// with it), replacing a channel of the same id. Returns once the keeper holds the
    /// descriptors.
    pub fn keep_channel(
        &self,
        id: u32,
        pid: u32,
        uid: u32,
        request: &Fd,
        response: &Fd,
        pidfd: &Fd,
    ) -> Result<(), String> {
        let msg = Msg {
            op: op::KEEP,
            id,
            pid,
            uid,
            ..Msg::default()
        };
        self.request(
            msg,
            &[request.as_fd(), response.as_fd(), pidfd.as_fd()],
            &format!("hold client {id}'s channel"),
        )
        .map(|_| ())
    }

    /// Asks the keeper to let go of client `id`'s channel (`Ok` also if it held none).
    pub fn drop_channel(&self, id: u32) -> Result<(), String> {
        let msg = Msg {
            op: op::DROP,
            id,
            ..Msg::default()
        };
        self.request(msg, &[], &format!("let go of client {id}'s channel"))
            .map(|_| ())
    }

    /// Tells the keeper to exit, releasing everything (the daemon's clean stop, or a fresh start
    /// after a crash), and waits up to [`EXIT_TIMEOUT`] until it has exited. A keeper that does
    /// not acknowledge (busy with another connection, or stopped) gets SIGTERM.
    pub fn quit(mut self) -> Result<(), String> {
        let asked = self.request(
            Msg {
                op: op::QUIT,
                ..Msg::default()
            },
            &[],
            "quit",
        );
        let mut signalled = false;
        if asked.is_ok() {
            // The keeper closes the connection once it has released everything.
            let deadline = Instant::now() + EXIT_TIMEOUT;
            let mut buf = [0u8; 64];
            while !left(deadline).is_zero() {
                match unix::recv_with_fds(&self.sock, &mut buf, left(deadline)) {
                    Ok(Some(_)) | Err(Errno(libc::EINTR)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
        } else if let Some(pidfd) = &self.pidfd {
            signalled = os::pidfd_terminate(pidfd).is_ok();
        }
        let exited = self.wait_exit(EXIT_TIMEOUT);
        match (asked, exited) {
            (_, true) => Ok(()),
            (Ok(_), false) => Err(format!(
                "the keeper of instance {} (pid {}) acknowledged quit but has not exited after \
                 {} s; kill it (kill -9 {})",
                self.name,
                self.pid,
                EXIT_TIMEOUT.as_secs(),
                self.pid
            )),
            (Err(e), false) => Err(format!(
                "{e}; {} has not exited after {} s: kill it (kill -9 {})",
                if signalled {
                    "it was sent SIGTERM and"
                } else {
                    "it"
                },
                EXIT_TIMEOUT.as_secs(),
                self.pid
            )),
        }
    }

    /// Waits up to `timeout` until the keeper process has exited (reaping it if it is our
    /// child). A keeper inside this process (tests) counts as exited once it has closed the
    /// connection.
    fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        if let Some(child) = &mut self.child {
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => return true,
                    Ok(None) if !left(deadline).is_zero() => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Ok(None) => return false,
                    // Reaped elsewhere: it has exited.
                    Err(_) => return true,
                }
            }
        }
        match &self.pidfd {
            Some(pidfd) => matches!(
                wait(pidfd, PollFlags::IN, None, Some(timeout)),
                Ok(Ready::Fd)
            ),
            None if self.pid == os::pid() => {
                let mut buf = [0u8; 64];
                loop {
                    match unix::recv_with_fds(&self.sock, &mut buf, left(deadline)) {
                        Ok(Some(_)) | Err(Errno(libc::EINTR)) => {}
                        Ok(None) => return true,
                        Err(_) => return false,
                    }
                }
            }
            None => {
                while os::process_alive(self.pid) {
                    if left(deadline).is_zero() {
                        return false;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                true
            }
        }
    }

    /// Sends `msg` (with a fresh seq) and returns its `ACK`, which must say `OK` (or
    /// `NOT_HELD` for a `DROP`). `what` says what the keeper was asked, for errors.
    fn request(&self, msg: Msg, fds: &[BorrowedFd<'_>], what: &str) -> Result<Msg, String> {
        let seq = self.send_request(msg, fds, what)?;
        let (m, _) = self.answer(seq, what)?;
        match (m.op, m.status) {
            (op::ACK, status::OK) => Ok(m),
            (op::ACK, status::NOT_HELD) if msg.op == op::DROP => Ok(m),
            (op::ACK, status::NO_ROOM) => Err(format!(
                "the keeper of instance {} (pid {}) could not {what}: it has reached its \
                 descriptor limit (raise the hard limit, ulimit -Hn, for the daemon's user)",
                self.name, self.pid
            )),
            _ => Err(self.unexpected(&m, what)),
        }
    }

    /// Sends `msg` with the next seq; returns that seq.
    fn send_request(
        &self,
        mut msg: Msg,
        fds: &[BorrowedFd<'_>],
        what: &str,
    ) -> Result<u32, String> {
        let seq = self.seq.get().wrapping_add(1);
        self.seq.set(seq);
        msg.seq = seq;
        send(&self.sock, &msg, fds, ANSWER_TIMEOUT).map_err(|e| {
            format!(
                "cannot ask the keeper of instance {} (pid {}) to {what}: {e}",
                self.name, self.pid
            )
        })?;
        Ok(seq)
    }

    /// The next reply to request `seq`, waiting up to [`ANSWER_TIMEOUT`]; replies to earlier
    /// requests are skipped (their descriptors closed).
    fn answer(&self, seq: u32, what: &str) -> Result<(Msg, Vec<Fd>), String> {
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        let who = || format!("the keeper of instance {} (pid {})", self.name, self.pid);
        let mut buf = [0u8; 64];
        loop {
            let r = match unix::recv_with_fds(&self.sock, &mut buf, left(deadline)) {
                Ok(Some(r)) => r,
                Ok(None) => {
                    return Err(format!(
                        "{} closed the connection when asked to {what} (it may have exited, or \
                         be of another xallocd version)",
                        who()
                    ))
                }
                Err(Errno(libc::EINTR)) => continue,
                Err(Errno(libc::EAGAIN)) => {
                    return Err(format!(
                        "{} did not answer within {} s when asked to {what}; it may be stopped \
                         or serving another daemon",
                        who(),
                        ANSWER_TIMEOUT.as_secs()
                    ))
                }
                Err(e) => return Err(format!("cannot read {}'s answer: {e}", who())),
            };
            let (m, fds) = parse(&buf, r).map_err(|e| match e {
                Bad::Malformed(e) => format!("{} answered with a malformed message: {e}", who()),
                Bad::FdsLost(_) => format!(
                    "could not receive the descriptors {} sent when asked to {what}: this \
                     process has reached its descriptor limit (ulimit -n)",
                    who()
                ),
            })?;
            if op::is_request(m.op) {
                return Err(format!("{} answered with request op {:#x}", who(), m.op));
            }
            if m.seq == seq {
                return Ok((m, fds));
            }
        }
    }

    /// The error for an answer `m` that does not fit.
    fn unexpected(&self, m: &Msg, what: &str) -> String {
        format!(
            "the keeper of instance {} (pid {}) gave an unexpected answer (op {:#x}, status {}) \
             when asked to {what}",
            self.name, self.pid, m.op, m.status
        )
    }
}

/// Reads one line from `out` (the keeper's stdout) within `timeout`, without its newline.
/// End of file ends the line too.
fn read_line(mut out: std::process::ChildStdout, timeout: Duration) -> Result<String, String> {
    let deadline = Instant::now() + timeout;
    let mut line = Vec::new();
    let result = loop {
        match wait(&out, PollFlags::IN, None, Some(left(deadline))) {
            Ok(Ready::Fd) => {}
            Ok(_) => {
                break Err(format!(
                    "it did not say `ready` within {} s",
                    timeout.as_secs()
                ))
            }
            Err(e) => break Err(format!("cannot wait for it: {e}")),
        }
        let mut buf = [0u8; 512];
        match out.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                line.extend_from_slice(&buf[..n]);
                if line.contains(&b'\n') || line.len() > 4096 {
                    break Ok(());
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => break Err(format!("cannot read its stdout: {e}")),
        }
    };
    result?;
    let text = String::from_utf8_lossy(&line);
    Ok(text.lines().next().unwrap_or("").trim().to_owned())
}

/// The keeper's listening socket, bound at its path.
#[derive(Debug)]
struct Bound {
    name: String,
    path: PathBuf,
    listener: Fd,
    /// Device and inode of the socket file: it is unlinked only while still ours.
    ident: Option<(u64, u64)>,
}

impl Bound {
    /// Binds `/dev/shm/{name}.keeper` (mode 0600), refusing if a live keeper answers there.
    fn new(name: &str) -> Result<Bound, String> {
        let path = socket_path(name)?;
        if let Some(link) = KeeperLink::connect(name)? {
            return Err(format!(
                "a keeper already runs for instance {name} (pid {}, socket {})",
                link.pid(),
                path.display()
            ));
        }
        let listener = unix::listen(&path, 0o600).map_err(|e| match e {
            Errno(libc::EADDRINUSE) => format!(
                "another keeper took {} just now; run only one per instance",
                path.display()
            ),
            e => format!("cannot listen on {}: {e}", path.display()),
        })?;
        let ident = std::fs::symlink_metadata(&path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        Ok(Bound {
            name: name.to_owned(),
            path,
            listener,
            ident,
        })
    }

    /// Removes the socket file if it is still the one we bound.
    fn unlink(&self) {
        let ours = std::fs::symlink_metadata(&self.path)
            .ok()
            .is_some_and(|m| Some((m.dev(), m.ino())) == self.ident);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    /// Writes one line to stderr, never failing or panicking.
    fn note(&self, msg: &str) {
        let _ = writeln!(
            std::io::stderr(),
            "xallocd keeper {} (pid {}): {msg}",
            self.name,
            os::pid()
        );
    }
}

/// What the keeper holds.
#[derive(Debug, Default)]
struct Held {
    arena: Option<(Fd, u64)>,
    channels: BTreeMap<u32, HeldChannel>,
}

#[derive(Debug)]
struct HeldChannel {
    pid: u32,
    uid: u32,
    request: Fd,
    response: Fd,
    pidfd: Fd,
}

/// Why [`serve`] returned.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    /// A daemon sent `QUIT`.
    Quit,
    /// The stop descriptor became readable (SIGTERM).
    Stopped,
}

/// How one daemon connection ended.
enum LinkEnd {
    /// The daemon closed it, or it was dropped (malformed message, failed send).
    Closed,
    /// `QUIT` with this seq: still to be acknowledged.
    Quit(u32),
    /// The stop descriptor became readable.
    Stopped,
}

/// The keeper's loop: serves one daemon connection at a time until `QUIT` or until `stop`
/// becomes readable (a signalfd for SIGTERM in the keeper process; a pipe in tests), then
/// releases everything and unlinks the socket. Blocks in `poll` while idle.
fn serve(bound: &Bound, stop: Option<&Fd>) -> Ended {
    let euid = os::euid();
    let mut held = Held::default();
    loop {
        match wait(&bound.listener, PollFlags::IN, stop, None) {
            Ok(Ready::Stop) => break,
            Ok(_) => {}
            Err(e) => {
                bound.note(&format!("cannot wait for connections: {e}"));
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        }
        let conn = match unix::accept(&bound.listener) {
            Ok(Some(c)) => c,
            Ok(None) | Err(Errno(libc::EINTR)) | Err(Errno(libc::ECONNABORTED)) => continue,
            Err(e) => {
                // EMFILE and the like: do not spin on a connection we cannot take.
                bound.note(&format!("cannot accept a connection: {e}"));
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        match unix::peer(&conn) {
            Ok(p) if p.uid == euid => {}
            Ok(p) => {
                bound.note(&format!(
                    "refused a connection from process {} of uid {} (only uid {euid} may \
                     connect)",
                    p.pid, p.uid
                ));
                continue;
            }
            Err(e) => {
                bound.note(&format!("dropped a connection of unknown peer: {e}"));
                continue;
            }
        }
        match serve_link(bound, &conn, stop, &mut held) {
            LinkEnd::Closed => {}
            LinkEnd::Quit(seq) => {
                held = Held::default();
                bound.unlink();
                let ack = Msg {
                    op: op::ACK,
                    seq,
                    ..Msg::default()
                };
                let _ = send(&conn, &ack, &[], ANSWER_TIMEOUT);
                drop(held);
                return Ended::Quit;
            }
            LinkEnd::Stopped => break,
        }
    }
    drop(held);
    bound.unlink();
    Ended::Stopped
}

/// Serves one daemon connection until it ends.
fn serve_link(bound: &Bound, conn: &Fd, stop: Option<&Fd>, held: &mut Held) -> LinkEnd {
    let mut buf = [0u8; 64];
    loop {
        match wait(conn, PollFlags::IN, stop, None) {
            Ok(Ready::Stop) => return LinkEnd::Stopped,
            Ok(_) => {}
            Err(e) => {
                bound.note(&format!(
                    "dropped the daemon's connection: poll failed: {e}"
                ));
                return LinkEnd::Closed;
            }
        }
        let r = match unix::recv_with_fds(conn, &mut buf, Duration::ZERO) {
            Ok(Some(r)) => r,
            Ok(None) => return LinkEnd::Closed,
            Err(Errno(libc::EAGAIN)) | Err(Errno(libc::EINTR)) => continue,
            Err(e) => {
                bound.note(&format!("dropped the daemon's connection: {e}"));
                return LinkEnd::Closed;
            }
        };
        let (m, fds) = match parse(&buf, r) {
            Ok((m, fds)) if op::is_request(m.op) => (m, fds),
            Ok((m, _)) => {
                bound.note(&format!(
                    "dropped the daemon's connection: it sent reply op {:#x}",
                    m.op
                ));
                return LinkEnd::Closed;
            }
            Err(Bad::FdsLost(m)) if op::is_request(m.op) => {
                // Out of descriptors: refuse this request, keep serving the daemon.
                bound.note(&format!(
                    "cannot hold more descriptors (op {:#x}, id {}): descriptor limit reached",
                    m.op, m.id
                ));
                let nak = Msg {
                    op: op::ACK,
                    status: status::NO_ROOM,
                    seq: m.seq,
                    id: m.id,
                    ..Msg::default()
                };
                if send(conn, &nak, &[], ANSWER_TIMEOUT).is_err() {
                    return LinkEnd::Closed;
                }
                continue;
            }
            Err(Bad::FdsLost(m)) => {
                bound.note(&format!(
                    "dropped the daemon's connection: it sent reply op {:#x}",
                    m.op
                ));
                return LinkEnd::Closed;
            }
            Err(Bad::Malformed(e)) => {
                bound.note(&format!("dropped the daemon's connection: {e}"));
                return LinkEnd::Closed;
            }
        };
        let mut fds = fds.into_iter();
        let mut ack = Msg {
            op: op::ACK,
            seq: m.seq,
            id: m.id,
            ..Msg::default()
        };
        match m.op {
            op::ARENA => {
                if let Some(arena) = fds.next() {
                    held.arena = Some((arena, m.generation));
                }
            }
            op::KEEP => {
                if let (Some(request), Some(response), Some(pidfd)) =
                    (fds.next(), fds.next(), fds.next())
                {
                    held.channels.insert(
                        m.id,
                        HeldChannel {
                            pid: m.pid,
                            uid: m.uid,
                            request,
                            response,
                            pidfd,
                        },
                    );
                }
            }
            op::DROP => {
                if held.channels.remove(&m.id).is_none() {
                    ack.status = status::NOT_HELD;
                }
            }
            op::TAKE => {
                if let Err(e) = send_all(conn, m.seq, held) {
                    bound.note(&format!(
                        "dropped the daemon's connection: cannot send what it asked for: {e}"
                    ));
                    return LinkEnd::Closed;
                }
                continue;
            }
            op::QUIT => return LinkEnd::Quit(m.seq),
            _ => return LinkEnd::Closed,
        }
        if let Err(e) = send(conn, &ack, &[], ANSWER_TIMEOUT) {
            bound.note(&format!(
                "dropped the daemon's connection: cannot acknowledge: {e}"
            ));
            return LinkEnd::Closed;
        }
    }
}

/// Answers `TAKE` number `seq`: the arena, each channel, then the end marker.
fn send_all(conn: &Fd, seq: u32, held: &Held) -> Result<(), Errno> {
    let Some((arena, generation)) = &held.arena else {
        let end = Msg {
            op: op::KEPT_END,
            status: status::NO_ARENA,
            seq,
            ..Msg::default()
        };
        return send(conn, &end, &[], ANSWER_TIMEOUT);
    };
    let first = Msg {
        op: op::KEPT_ARENA,
        seq,
        generation: *generation,
        ..Msg::default()
    };
    send(conn, &first, &[arena.as_fd()], ANSWER_TIMEOUT)?;
    for (&id, c) in &held.channels {
        let m = Msg {
            op: op::KEPT_CHANNEL,
            seq,
            id,
            pid: c.pid,
            uid: c.uid,
            ..Msg::default()
        };
        send(
            conn,
            &m,
            &[c.request.as_fd(), c.response.as_fd(), c.pidfd.as_fd()],
            ANSWER_TIMEOUT,
        )?;
    }
    let end = Msg {
        op: op::KEPT_END,
        seq,
        id: held.channels.len() as u32,
        ..Msg::default()
    };
    send(conn, &end, &[], ANSWER_TIMEOUT)
}

/// Sets the keeper's signals: SIGINT, SIGHUP and SIGPIPE ignored, SIGTERM blocked and read
/// from the returned signalfd, every other signal unblocked (the daemon's mask is inherited
/// across exec).
fn keeper_signals() -> Result<Fd, String> {
    for (sig, action) in [
        (libc::SIGINT, libc::SIG_IGN),
        (libc::SIGHUP, libc::SIG_IGN),
        (libc::SIGPIPE, libc::SIG_IGN),
        // An ignored SIGTERM (inherited) would be discarded rather than queued for the
        // signalfd.
        (libc::SIGTERM, libc::SIG_DFL),
    ] {
        // SAFETY: setting a signal's disposition to SIG_IGN or SIG_DFL installs no handler.
        unsafe { libc::signal(sig, action) };
    }
    let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: `set` is valid for writing a sigset; `sigemptyset` initialises it before
    // `sigaddset` reads it.
    let set = unsafe {
        libc::sigemptyset(set.as_mut_ptr());
        libc::sigaddset(set.as_mut_ptr(), libc::SIGTERM);
        set.assume_init()
    };
    // SAFETY: `set` is an initialised sigset; the old mask is not wanted.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(format!("cannot block SIGTERM: {}", Errno(rc)));
    }
    // SAFETY: `set` is initialised; -1 asks for a new signalfd.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
    if fd < 0 {
        return Err(format!("cannot create a signalfd: {}", Errno::last()));
    }
    // SAFETY: a fresh descriptor, owned from here on.
    Ok(unsafe { Fd::from_raw(fd) })
}

/// Says `ready` on stdout, then points stdout at /dev/null so that the daemon's pipe is
/// closed. `false` if nobody reads the line any more (the daemon that started us is gone).
fn announce_ready() -> bool {
    let mut out = std::io::stdout().lock();
    if out
        .write_all(b"ready\n")
        .and_then(|()| out.flush())
        .is_err()
    {
        return false;
    }
    drop(out);
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        // SAFETY: both descriptors are open; dup2 replaces fd 1, which std's stdout keeps
        // using (its buffer is flushed and empty).
        unsafe { libc::dup2(null.as_raw_fd(), libc::STDOUT_FILENO) };
    } else {
        // SAFETY: closes fd 1, which nothing but std's (flushed) stdout uses; later writes to
        // it fail harmlessly.
        unsafe { libc::close(libc::STDOUT_FILENO) };
    }
    true
}

/// The keeper process: `xallocd keeper --name NAME` (hidden from `--help`; started by
/// [`KeeperLink::spawn`]).
///
/// Binds `/dev/shm/{name}.keeper` (refusing to start if a live keeper answers there), prints
/// `ready` on stdout (or `error: WHY` and exits 1) and closes stdout, then serves one daemon
/// connection at a time until `QUIT` or SIGTERM, both of which unlink the socket. Ignores
/// SIGINT and SIGHUP; raises its descriptor limit to the hard limit. Later errors go to stderr.
pub fn run_keeper(name: &str) -> ExitCode {
    let early = |msg: String| {
        let _ = writeln!(std::io::stdout(), "error: {msg}");
        ExitCode::FAILURE
    };
    let stop = match keeper_signals() {
        Ok(s) => s,
        Err(e) => return early(e),
    };
    // Do not keep the daemon's working directory (and its file system) busy.
    let _ = std::env::set_current_dir("/");
    unix::raise_fd_limit();
    let bound = match Bound::new(name) {
        Ok(b) => b,
        Err(e) => return early(e),
    };
    if !announce_ready() {
        bound.unlink();
        bound.note("exiting: the daemon that started this keeper is gone");
        return ExitCode::FAILURE;
    }
    match serve(&bound, Some(&stop)) {
        Ended::Quit => {}
        Ended::Stopped => bound.note("stopped by SIGTERM; released everything it held"),
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pidfd of this process: what the daemon passes along with a channel.
    fn test_pidfd() -> Fd {
        os::pidfd_open(os::pid()).expect("pidfd of this process")
    }
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A unique instance name for this test process.
    fn unique() -> String {
        static N: AtomicU32 = AtomicU32::new(0);
        format!(
            "xk-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        )
    }

    fn memfd(len: u64) -> Fd {
        unix::memfd(c"xalloc-keeper-test", len).unwrap()
    }

    fn same(a: &Fd, b: &Fd) -> bool {
        unix::identity(a).unwrap() == unix::identity(b).unwrap()
    }

    fn pipe() -> (Fd, Fd) {
        let mut fds = [0; 2];
        // SAFETY: `fds` is writable for two ints.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: fresh descriptors, owned here.
        unsafe { (Fd::from_raw(fds[0]), Fd::from_raw(fds[1])) }
    }

    /// A keeper serving in a thread of this process; `stop` ends it like SIGTERM.
    struct TestKeeper {
        name: String,
        path: PathBuf,
        stop: Fd,
        thread: Option<std::thread::JoinHandle<Ended>>,
    }

    impl TestKeeper {
        fn start() -> TestKeeper {
            let name = unique();
            let bound = Bound::new(&name).unwrap();
            let path = bound.path.clone();
            let (r, w) = pipe();
            let thread = std::thread::spawn(move || serve(&bound, Some(&r)));
            TestKeeper {
                name,
                path,
                stop: w,
                thread: Some(thread),
            }
        }

        fn link(&self) -> KeeperLink {
            KeeperLink::connect(&self.name).unwrap().unwrap()
        }

        fn join(&mut self) -> Ended {
            self.thread.take().unwrap().join().unwrap()
        }

        fn stop(&mut self) -> Ended {
            // SAFETY: writes one byte from a valid buffer to our pipe.
            let n = unsafe { libc::write(self.stop.raw(), b"x".as_ptr().cast(), 1) };
            assert_eq!(n, 1);
            self.join()
        }
    }

    impl Drop for TestKeeper {
        fn drop(&mut self) {
            if self.thread.is_some() {
                let _ = self.stop();
            }
            let _ = std::fs::remove_file(&self.path);
        }
    }

    #[test]
    fn messages_round_trip() {
        let m = Msg {
            op: op::KEEP,
            status: 7,
            seq: 0xdead_beef,
            id: 1,
            pid: 2,
            uid: 3,
            generation: u64::MAX - 5,
        };
        assert_eq!(Msg::decode(&m.encode()), Some(m));
        assert_eq!(&m.encode()[..4], b"XKP1");
        assert_eq!(Msg::decode(&m.encode()[..31]), None);
        let mut bad = m.encode();
        bad[0] = b'Y';
        assert_eq!(Msg::decode(&bad), None);
    }

    #[test]
    fn long_or_bad_names_are_refused() {
        assert!(socket_path(&"a".repeat(91)).is_ok());
        let e = socket_path(&"a".repeat(92)).unwrap_err();
        assert!(e.contains("at most 91 bytes"), "{e}");
        assert!(socket_path("a/b").is_err());
        assert!(socket_path("").is_err());
    }

    #[test]
    fn keep_take_drop_quit() {
        let mut k = TestKeeper::start();
        let link = k.link();
        assert_eq!(link.pid(), std::process::id());
        let arena = memfd(1 << 16);
        link.give_arena(&arena, 42).unwrap();
        let chans: Vec<(Fd, Fd)> = (0..3).map(|_| (memfd(4096), memfd(4096))).collect();
        for (i, (rq, rs)) in chans.iter().enumerate() {
            link.keep_channel(10 + i as u32, 1000 + i as u32, 7, rq, rs, &test_pidfd())
                .unwrap();
        }
        let kept = link.take().unwrap();
        assert!(same(&kept.arena, &arena));
        assert_eq!(kept.generation, 42);
        assert_eq!(kept.channels.len(), 3);
        for (i, (c, (rq, rs))) in kept.channels.iter().zip(&chans).enumerate() {
            assert!(same(&c.request, rq) && same(&c.response, rs));
            assert_eq!((c.id, c.pid, c.uid), (10 + i as u32, 1000 + i as u32, 7));
        }
        // The keeper keeps holding them: a second take sees the same.
        assert_eq!(link.take().unwrap().channels.len(), 3);
        link.drop_channel(11).unwrap();
        link.drop_channel(99).unwrap();
        // Replacing a channel of the same id.
        link.keep_channel(12, 5, 5, &chans[0].0, &chans[0].1, &test_pidfd())
            .unwrap();
        let kept = link.take().unwrap();
        let ids: Vec<u32> = kept.channels.iter().map(|c| c.id).collect();
        assert_eq!(ids, [10, 12]);
        assert!(same(&kept.channels[1].request, &chans[0].0));
        assert_eq!(kept.channels[1].pid, 5);
        link.quit().unwrap();
        assert_eq!(k.join(), Ended::Quit);
        assert!(!k.path.exists());
        assert!(KeeperLink::connect(&k.name).unwrap().is_none());
    }

    #[test]
    fn a_dropped_link_keeps_everything_for_the_next() {
        let mut k = TestKeeper::start();
        let arena = memfd(1 << 16);
        let (rq, rs) = (memfd(4096), memfd(4096));
        {
            let link = k.link();
            link.give_arena(&arena, 9).unwrap();
            link.keep_channel(1, 100, 0, &rq, &rs, &test_pidfd())
                .unwrap();
            // A request in flight when the daemon dies, never waited for.
            let m = Msg {
                op: op::KEEP,
                seq: 77,
                id: 2,
                pid: 200,
                ..Msg::default()
            };
            let me = test_pidfd();
            send(
                &link.sock,
                &m,
                &[rs.as_fd(), rq.as_fd(), me.as_fd()],
                ANSWER_TIMEOUT,
            )
            .unwrap();
        } // the link dies here, like a killed daemon's
        let link = k.link();
        let kept = link.take().unwrap();
        assert!(same(&kept.arena, &arena));
        assert_eq!(kept.generation, 9);
        assert_eq!(kept.channels.len(), 2);
        assert!(same(&kept.channels[1].request, &rs));
        assert!(same(&kept.channels[1].response, &rq));
        drop(kept);
        drop(link);
        assert_eq!(k.stop(), Ended::Stopped);
        assert!(!k.path.exists(), "SIGTERM's path unlinks the socket");
    }

    #[test]
    fn malformed_messages_drop_the_link_not_the_keeper() {
        let k = TestKeeper::start();
        let arena = memfd(1 << 16);
        k.link().give_arena(&arena, 1).unwrap();
        let good = Msg {
            op: op::TAKE,
            seq: 1,
            ..Msg::default()
        };
        let mut wrong_magic = good.encode();
        wrong_magic[3] = b'9';
        let mut unknown_op = good;
        unknown_op.op = 0x7777;
        let mut reply_op = good;
        reply_op.op = op::ACK;
        let mut keep_one_fd = good;
        keep_one_fd.op = op::KEEP;
        let cases: Vec<(Vec<u8>, usize)> = vec![
            (b"hello".to_vec(), 0),
            (vec![0u8; 200], 0),
            (wrong_magic.to_vec(), 0),
            (unknown_op.encode().to_vec(), 0),
            (reply_op.encode().to_vec(), 0),
            (keep_one_fd.encode().to_vec(), 1),
            (good.encode().to_vec(), 3),
        ];
        for (bytes, nfds) in cases {
            let link = k.link();
            let fds: Vec<BorrowedFd<'_>> = (0..nfds).map(|_| arena.as_fd()).collect();
            unix::send_with_fds(&link.sock, &bytes, &fds).unwrap();
            let mut buf = [0u8; 64];
            let r = unix::recv_with_fds(&link.sock, &mut buf, Duration::from_secs(2));
            assert!(matches!(r, Ok(None)), "{bytes:?}: {r:?}");
        }
        let kept = k.link().take().unwrap();
        assert!(same(&kept.arena, &arena));
        assert!(kept.channels.is_empty());
    }

    #[test]
    fn thousands_of_channels() {
        let limit = unix::raise_fd_limit();
        // The keeper's copies and the taken copies share this process: 4 per channel.
        let n = 3000.min(limit.saturating_sub(256) / 4) as u32;
        assert!(n >= 100, "descriptor limit {limit} too low for this test");
        let k = TestKeeper::start();
        let link = k.link();
        let arena = memfd(1 << 16);
        link.give_arena(&arena, 3).unwrap();
        let (rq, rs) = (memfd(4096), memfd(4096));
        for id in 0..n {
            link.keep_channel(id, id, id, &rq, &rs, &test_pidfd())
                .unwrap();
        }
        let kept = link.take().unwrap();
        assert_eq!(kept.channels.len(), n as usize);
        for (i, c) in kept.channels.iter().enumerate() {
            assert_eq!((c.id, c.pid, c.uid), (i as u32, i as u32, i as u32));
        }
        assert!(same(&kept.channels[n as usize - 1].response, &rs));
    }

    #[test]
    fn take_without_arena_says_so() {
        let k = TestKeeper::start();
        let e = k.link().take().unwrap_err();
        assert!(e.contains("holds no arena"), "{e}");
    }

    #[test]
    fn a_second_keeper_is_refused_and_a_stale_socket_removed() {
        let k = TestKeeper::start();
        let e = Bound::new(&k.name).unwrap_err();
        assert!(e.contains("already runs"), "{e}");

        let name = unique();
        let path = socket_path(&name).unwrap();
        assert!(KeeperLink::connect(&name).unwrap().is_none());
        drop(unix::listen(&path, 0o600).unwrap()); // a socket nobody listens on
        assert!(path.exists());
        assert!(KeeperLink::connect(&name).unwrap().is_none());
        assert!(!path.exists());

        std::fs::write(&path, b"not a socket").unwrap();
        let e = KeeperLink::connect(&name).unwrap_err();
        assert!(e.contains("not a keeper's socket"), "{e}");
        std::fs::remove_file(&path).unwrap();
    }

    /// A peer of another uid is refused (needs root to become another user).
    #[test]
    fn a_peer_of_another_uid_is_refused() {
        if os::euid() != 0 {
            eprintln!("skipped: needs root to connect as another uid");
            return;
        }
        let k = TestKeeper::start();
        let arena = memfd(1 << 16);
        k.link().give_arena(&arena, 5).unwrap();
        std::fs::set_permissions(&k.path, std::os::unix::fs::PermissionsExt::from_mode(0o666))
            .unwrap();
        // SAFETY: an all-zero sockaddr_un is valid; the path is copied in with its NUL.
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (d, s) in addr.sun_path.iter_mut().zip(k.path.as_os_str().as_bytes()) {
            *d = *s as libc::c_char;
        }
        let take = Msg {
            op: op::TAKE,
            seq: 1,
            ..Msg::default()
        }
        .encode();
        // SAFETY: the child makes only async-signal-safe system calls on memory prepared
        // before the fork, and leaves with `_exit`.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: see above; every pointer is to a live local.
            unsafe {
                if libc::setresgid(65534, 65534, 65534) != 0
                    || libc::setresuid(65534, 65534, 65534) != 0
                {
                    libc::_exit(10);
                }
                let s = libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0);
                let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
                if s < 0 || libc::connect(s, (&raw const addr).cast(), len) != 0 {
                    libc::_exit(11);
                }
                libc::send(s, take.as_ptr().cast(), take.len(), libc::MSG_NOSIGNAL);
                let mut p = libc::pollfd {
                    fd: s,
                    events: libc::POLLIN,
                    revents: 0,
                };
                if libc::poll(&mut p, 1, 3000) != 1 {
                    libc::_exit(12);
                }
                let mut buf = [0u8; 64];
                let n = libc::recv(s, buf.as_mut_ptr().cast(), buf.len(), 0);
                // The keeper closed the connection without answering: end of file, or
                // ECONNRESET as our request was still unread.
                let reset = n < 0 && *libc::__errno_location() == libc::ECONNRESET;
                libc::_exit(if n == 0 || reset { 0 } else { 13 });
            }
        }
        assert!(pid > 0);
        let mut st = 0;
        // SAFETY: waits for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut st, 0) }, pid);
        assert!(libc::WIFEXITED(st), "status {st}");
        assert_eq!(libc::WEXITSTATUS(st), 0);
        // And the keeper still serves its own uid.
        assert!(same(&k.link().take().unwrap().arena, &arena));
    }

    /// Kills the process it was made for on drop if it still runs: a failed test leaves no
    /// keeper behind (one would hold the test harness's stderr open). Holds a pidfd, so a
    /// reused pid is never hit.
    struct KillOnDrop(Fd, PathBuf);

    impl KillOnDrop {
        fn new(pid: u32, name: &str) -> KillOnDrop {
            KillOnDrop(os::pidfd_open(pid).unwrap(), socket_path(name).unwrap())
        }
    }

    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            if !os::pidfd_exited(&self.0) {
                let _ = std::fs::remove_file(&self.1);
            }
            // SAFETY: plain system call on a pidfd we own; fails harmlessly once it has exited.
            unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    self.0.raw(),
                    libc::SIGKILL,
                    std::ptr::null::<libc::siginfo_t>(),
                    0u32,
                )
            };
        }
    }

    /// The `xallocd` binary beside this test binary's `deps/` folder, if built and newer than
    /// the daemon's and the protocol crate's sources (`cargo test` does not build it: run
    /// `cargo build -p xalloc-daemon` first).
    fn built_daemon() -> Option<PathBuf> {
        let exe = std::env::current_exe().ok()?;
        let bin = exe.parent()?.parent()?.join("xallocd");
        let built = std::fs::metadata(&bin).ok()?.modified().ok()?;
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        for dir in [root.join("src"), root.join("../proto/src")] {
            for e in std::fs::read_dir(dir).ok()?.flatten() {
                if e.metadata().ok()?.modified().ok()? > built {
                    eprintln!("{} is older than {}", bin.display(), e.path().display());
                    return None;
                }
            }
        }
        Some(bin)
    }

    #[test]
    fn a_keeper_out_of_descriptors_refuses_and_keeps_serving() {
        let Some(bin) = built_daemon() else {
            eprintln!("skipped: no up-to-date xallocd binary beside the test binary");
            return;
        };
        let name = unique();
        let arena = memfd(1 << 16);
        let (rq, rs) = (memfd(4096), memfd(4096));
        let link = KeeperLink::spawn_exe(&bin, &name, &arena, 1).unwrap();
        let _guard = KillOnDrop::new(link.pid(), &name);
        // Room for a few more descriptors only.
        let open = std::fs::read_dir(format!("/proc/{}/fd", link.pid()))
            .unwrap()
            .count() as u64;
        let lim = libc::rlimit {
            rlim_cur: open + 4,
            rlim_max: open + 4,
        };
        // SAFETY: `lim` is a valid rlimit; the old one is not wanted.
        let rc = unsafe {
            libc::prlimit(
                link.pid() as i32,
                libc::RLIMIT_NOFILE,
                &lim,
                std::ptr::null_mut(),
            )
        };
        assert_eq!(rc, 0);
        let mut refused = None;
        for id in 0..10 {
            if let Err(e) = link.keep_channel(id, 1, 1, &rq, &rs, &test_pidfd()) {
                refused = Some((id, e));
                break;
            }
        }
        let (id, e) = refused.expect("the keeper never ran out of descriptors");
        assert!(e.contains("descriptor limit"), "{e}");
        assert!(id >= 1, "it had room for at least one channel");
        // The link goes on: dropping a channel makes room again.
        link.drop_channel(0).unwrap();
        link.keep_channel(id, 1, 1, &rq, &rs, &test_pidfd())
            .unwrap();
        let kept = link.take().unwrap();
        assert_eq!(kept.channels.len(), id as usize);
        assert!(kept.channels.iter().all(|c| c.id != 0));
        link.quit().unwrap();
    }

    #[test]
    fn a_spawned_keeper_outlives_its_link_and_quits() {
        let Some(bin) = built_daemon() else {
            eprintln!("skipped: no up-to-date xallocd binary beside the test binary");
            return;
        };
        let name = unique();
        let arena = memfd(1 << 16);
        let (rq, rs) = (memfd(4096), memfd(4096));
        // A descriptor without close-on-exec (like a careless pidfile lock) must not reach it.
        let probe = unix::memfd(c"xalloc-keeper-leak-probe", 4096).unwrap();
        // SAFETY: dup of a descriptor we own; the copy (not close-on-exec) is owned here.
        let leaky = unsafe { Fd::from_raw(libc::dup(probe.raw())) };
        assert!(leaky.raw() >= 0);
        let link = KeeperLink::spawn_exe(&bin, &name, &arena, 11).unwrap();
        let kpid = link.pid();
        let _guard = KillOnDrop::new(kpid, &name);
        assert_ne!(kpid, std::process::id());
        let held: Vec<String> = std::fs::read_dir(format!("/proc/{kpid}/fd"))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .map(|t| t.display().to_string())
            .collect();
        assert!(
            !held.iter().any(|t| t.contains("leak-probe")),
            "inherited: {held:?}"
        );
        assert!(
            held.iter().any(|t| t.contains("xalloc-keeper-test")),
            "{held:?}"
        );
        drop(leaky);
        link.keep_channel(4, 44, 444, &rq, &rs, &test_pidfd())
            .unwrap();
        let e = KeeperLink::spawn_exe(&bin, &name, &arena, 11)
            .map(|l| l.pid())
            .unwrap_err();
        assert!(e.contains("already runs"), "{e}");
        drop(link); // the daemon "crashes"
        for sig in [libc::SIGINT, libc::SIGHUP] {
            // SAFETY: signals our own child.
            assert_eq!(unsafe { libc::kill(kpid as i32, sig) }, 0);
        }
        std::thread::sleep(Duration::from_millis(100));
        assert!(os::process_alive(kpid), "SIGINT and SIGHUP are ignored");
        let link = KeeperLink::connect(&name).unwrap().unwrap();
        assert_eq!(link.pid(), kpid);
        let kept = link.take().unwrap();
        assert!(same(&kept.arena, &arena));
        assert_eq!(kept.generation, 11);
        assert_eq!(kept.channels.len(), 1);
        assert!(same(&kept.channels[0].response, &rs));
        link.quit().unwrap();
        assert!(!os::process_alive(kpid));
        assert!(!socket_path(&name).unwrap().exists());

        // SIGTERM: exits, unlinking its socket, even when started with SIGTERM blocked (as
        // the daemon blocks it for its signalfd).
        // SAFETY: initialised sigsets; changes only this test thread's mask.
        let old_mask = unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
            old
        };
        let spawned = KeeperLink::spawn_exe(&bin, &name, &arena, 12);
        // SAFETY: restores this thread's mask.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old_mask, std::ptr::null_mut()) };
        let mut link = spawned.unwrap();
        let _guard2 = KillOnDrop::new(link.pid(), &name);
        // SAFETY: signals our own child.
        assert_eq!(unsafe { libc::kill(link.pid() as i32, libc::SIGTERM) }, 0);
        assert!(link.wait_exit(EXIT_TIMEOUT));
        assert!(!socket_path(&name).unwrap().exists());
    }
}
