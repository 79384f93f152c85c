//! Detaching from the caller the way daemon(7) describes, and the pidfile.
//!
//! [`detach`] forks twice around `setsid` with a readiness pipe between the caller and the
//! daemon: the first process waits on the pipe and exits 0 only when the daemon writes that it
//! serves, or exits 1 with the daemon's own error message. The pidfile is locked (`flock`)
//! *before* forking, by the caller, so a second `start` fails at once; the lock belongs to the
//! open file description, which the daemon inherits and keeps for its life, and the kernel drops
//! it when the daemon dies, however it dies: a pidfile left by a killed daemon is stale and
//! does not block a restart.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The default pidfile of instance `name`.
pub fn default_pidfile(name: &str) -> PathBuf {
    // SAFETY: always succeeds.
    let uid = unsafe { libc::geteuid() };
    let dir = if uid == 0 {
        PathBuf::from("/run/xalloc")
    } else if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        PathBuf::from(d).join("xalloc")
    } else {
        PathBuf::from(format!("/tmp/xalloc-{uid}"))
    };
    dir.join(format!("{name}.pid"))
}

/// A locked pidfile. Dropping it removes and unlocks the file.
#[derive(Debug)]
pub struct Pidfile {
    path: PathBuf,
    file: File,
}

/// Why the pidfile could not be taken.
#[derive(Debug)]
pub enum PidfileError {
    /// Another live daemon holds it.
    Held {
        /// The file.
        path: PathBuf,
        /// The pid written in it, if readable.
        pid: Option<u32>,
    },
    /// It could not be created or locked.
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        error: std::io::Error,
    },
}

impl std::fmt::Display for PidfileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Held { path, pid } => {
                write!(f, "already running")?;
                if let Some(pid) = pid {
                    write!(f, " as pid {pid}")?;
                }
                write!(
                    f,
                    " (pidfile {} is locked); stop it with `xallocd stop` or pick another --name",
                    path.display()
                )
            }
            Self::Io { path, error } => write!(f, "pidfile {}: {error}", path.display()),
        }
    }
}

impl Pidfile {
    /// Creates (if needed) and locks `path`, without writing a pid yet.
    pub fn lock(path: &Path) -> Result<Self, PidfileError> {
        let io = |error| PidfileError::Io {
            path: path.to_owned(),
            error,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(path)
            .map_err(io)?;
        // SAFETY: plain call on an open descriptor.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut s = String::new();
                let pid = file
                    .read_to_string(&mut s)
                    .ok()
                    .and_then(|_| s.trim().parse().ok());
                return Err(PidfileError::Held {
                    path: path.to_owned(),
                    pid,
                });
            }
            return Err(io(e));
        }
        Ok(Self {
            path: path.to_owned(),
            file,
        })
    }

    /// Writes `pid` into the file (replacing a stale one).
    pub fn write_pid(&mut self, pid: u32) -> std::io::Result<()> {
        self.file.set_len(0)?;
        self.file.rewind()?;
        writeln!(self.file, "{pid}")?;
        self.file.sync_data()
    }

    /// The file's descriptor (kept open across the forks).
    pub fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl Drop for Pidfile {
    fn drop(&mut self) {
        // Removed while still locked, so a new daemon never finds our file half-gone.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// What a pidfile says about its daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holder {
    /// Nobody holds it (no file, or a stale one).
    Nobody,
    /// A live daemon holds the lock; its pid as written, if readable.
    Daemon(Option<u32>),
}

/// Reads `path` and checks its lock without taking it.
pub fn holder(path: &Path) -> Holder {
    let Ok(mut file) = File::open(path) else {
        return Holder::Nobody;
    };
    // SAFETY: plain call on an open descriptor.
    let free = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } == 0;
    if free {
        return Holder::Nobody;
    }
    let mut s = String::new();
    Holder::Daemon(
        file.read_to_string(&mut s)
            .ok()
            .and_then(|_| s.trim().parse().ok()),
    )
}

/// In the daemon: where the readiness verdict goes.
#[derive(Debug)]
pub enum Readiness {
    /// Detached: the pipe to the waiting first process.
    Pipe(File),
    /// Foreground: `$NOTIFY_SOCKET`, if set.
    Foreground,
}

impl Readiness {
    /// Reports that the daemon serves requests.
    pub fn ready(self) {
        match self {
            Self::Pipe(mut f) => {
                let _ = f.write_all(b"OK");
            }
            Self::Foreground => sd_notify("READY=1"),
        }
    }

    /// Reports that the daemon failed to start, with `msg` for the caller's stderr.
    pub fn failed(self, msg: &str) {
        match self {
            Self::Pipe(mut f) => {
                let _ = f.write_all(format!("ERR{msg}").as_bytes());
            }
            Self::Foreground => {
                eprintln!("xallocd: {msg}");
                sd_notify(&format!("STATUS={msg}"));
            }
        }
    }
}

/// Sends `state` to the service manager at `$NOTIFY_SOCKET` (a path, or `@name` for the
/// abstract namespace), if set. See sd_notify(3).
pub fn sd_notify(state: &str) {
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = UnixDatagram::unbound() else {
        return;
    };
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
    let addr = match bytes.strip_prefix(b"@") {
        Some(abstract_name) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(abstract_name)
        }
        None => SocketAddr::from_pathname(Path::new(&path)),
    };
    if let Ok(addr) = addr {
        let _ = sock.send_to_addr(state.as_bytes(), &addr);
    }
}

/// Which side of [`detach`] returned.
pub enum Detached {
    /// The first process: exit with this code once the verdict is printed.
    Caller(i32),
    /// The daemon: finish starting, then report through this.
    Daemon(Readiness),
}

fn cvt(rc: libc::c_int) -> std::io::Result<libc::c_int> {
    if rc == -1 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Detaches: readiness pipe, fork, `setsid`, fork, `umask(0o077)`, `chdir /`, stdio to
/// `/dev/null`, every inherited descriptor closed but `keep_fds` and the pipe.
///
/// Must be called while the process has one thread (forking a multi-threaded process leaves the
/// child with locks held by threads that do not exist in it).
pub fn detach(keep_fds: &[RawFd]) -> std::io::Result<Detached> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for two descriptors.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: both descriptors are fresh and owned here.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: single-threaded (the caller's contract), so the child's state is consistent.
    let pid = cvt(unsafe { libc::fork() })?;
    if pid > 0 {
        drop(wr);
        return Ok(Detached::Caller(wait_for_verdict(File::from(rd), pid)));
    }
    drop(rd);
    // First child: new session, no controlling terminal.
    // SAFETY: plain calls in the single-threaded child.
    unsafe {
        if libc::setsid() == -1 {
            libc::_exit(1);
        }
        match libc::fork() {
            -1 => libc::_exit(1),
            0 => {}
            _ => libc::_exit(0),
        }
    }
    // The daemon: not a session leader, so it can never acquire a terminal again.
    // SAFETY: plain calls; `/` exists.
    unsafe {
        libc::umask(0o077);
        libc::chdir(c"/".as_ptr());
    }
    redirect_stdio()?;
    close_inherited(&[keep_fds, &[wr.as_raw_fd()]].concat());
    Ok(Detached::Daemon(Readiness::Pipe(File::from(wr))))
}

/// First process: waits for the daemon's verdict and prints it.
fn wait_for_verdict(mut rd: File, child: libc::pid_t) -> i32 {
    let mut status = 0;
    // Reap the intermediate child (it exits right after the second fork).
    // SAFETY: `child` is our child; `status` is writable.
    unsafe { libc::waitpid(child, &mut status, 0) };
    let mut msg = Vec::new();
    let _ = rd.read_to_end(&mut msg);
    match msg.strip_prefix(b"ERR") {
        _ if msg == b"OK" => 0,
        Some(err) => {
            eprintln!("xallocd: {}", String::from_utf8_lossy(err));
            1
        }
        None => {
            eprintln!(
                "xallocd: the daemon exited before it was ready (see the system log, or start \
                 with --foreground to see its errors)"
            );
            1
        }
    }
}

fn redirect_stdio() -> std::io::Result<()> {
    let null = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    for fd in 0..3 {
        // SAFETY: `null` is open; dup2 onto the standard descriptors.
        cvt(unsafe { libc::dup2(null.as_raw_fd(), fd) })?;
    }
    Ok(())
}

/// Closes every descriptor above 2 except `keep`.
fn close_inherited(keep: &[RawFd]) {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<RawFd> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2 && !keep.contains(&fd))
        .collect();
    for fd in fds {
        // SAFETY: closing a descriptor nothing in this process uses: the daemon has just been
        // born and owns only `keep` (the read_dir handle is closed already, or closing it
        // fails harmlessly with EBADF).
        unsafe { libc::close(fd) };
    }
}
