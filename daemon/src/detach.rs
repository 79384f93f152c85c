//! Detaching from the caller the way daemon(7) describes, and the pidfile.
//!
//! [`detach`] forks twice around `setsid` with a readiness pipe between the caller and the
//! daemon: the first process waits on the pipe and exits 0 only when the daemon writes that it
//! serves, or exits 1 with the daemon's own error message. The pidfile is locked (`flock`)
//! *before* forking, by the caller, so a second `start` fails at once; the lock belongs to the
//! open file description, which the daemon inherits and keeps for its life, and the kernel drops
//! it when the daemon dies, however it dies: a pidfile left by a killed daemon is stale and
//! does not block a restart.
//!
//! Nothing about the pidfile is trusted before it is checked, since another user may have
//! made it first: the default directory ([`default_dir`]) is created 0700 and must be a real
//! directory (not a symbolic link) of this user that neither its group nor others may write;
//! a pidfile is opened without following a final symbolic link, and must be a regular file of
//! this user with no other name. [`Pidfile::lock`] (`start`) and [`holder`] (`stop`) make the
//! same checks, so a planted pidfile can neither make `start` overwrite a file it points at nor
//! name the pid `stop` signals.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{ErrorKind, Read, Seek, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// This process's effective user id.
fn euid() -> u32 {
    // SAFETY: always succeeds.
    unsafe { libc::geteuid() }
}

/// The directory of the default pidfiles: `/run/xalloc` for root, else
/// `$XDG_RUNTIME_DIR/xalloc`, else `/tmp/xalloc-UID`. [`Pidfile::lock`] creates it (mode 0700;
/// its parent must exist) and refuses it unless it is private to this user.
pub fn default_dir() -> PathBuf {
    let uid = euid();
    if uid == 0 {
        PathBuf::from("/run/xalloc")
    } else if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        PathBuf::from(d).join("xalloc")
    } else {
        PathBuf::from(format!("/tmp/xalloc-{uid}"))
    }
}

/// The default pidfile of instance `name`: `NAME.pid` in [`default_dir`].
pub fn default_pidfile(name: &str) -> PathBuf {
    default_dir().join(format!("{name}.pid"))
}

/// `path`'s directory if it is [`default_dir`], whose privacy is checked (also for an explicit
/// `--pidfile` there).
fn in_default_dir(path: &Path) -> Option<&Path> {
    path.parent().filter(|d| *d == default_dir())
}

/// Checks that `dir` is private to this user; creates it first (its last component only, mode
/// 0700) if `create` and it is missing. Returns whether it exists (`false` only without
/// `create`), or what is wrong with it and what to do.
///
/// It must be a directory, not a symbolic link to one, owned by this user, that neither group
/// nor others may write. Then nobody else can add, remove or replace entries in it, and nobody
/// else can replace `dir` itself between this check and the pidfile's open: its parent is
/// /run (root's), /tmp (sticky: only `dir`'s owner may rename it) or `$XDG_RUNTIME_DIR` (the
/// user's own).
fn check_private_dir(dir: &Path, create: bool) -> Result<bool, String> {
    let d = dir.display();
    if create {
        match DirBuilder::new().mode(0o700).create(dir) {
            // mkdir(2) creates only the last component and never follows a link there (an
            // existing link, even a dangling one, is `AlreadyExists` and refused below).
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {
                let parent = dir.parent().unwrap_or(Path::new("/")).display();
                return Err(format!(
                    "cannot create directory {d}: {parent} does not exist; create it, or pass \
                     --pidfile PATH"
                ));
            }
            Err(e) => {
                return Err(format!(
                    "cannot create directory {d}: {e}; pass --pidfile PATH to put the pidfile \
                     elsewhere"
                ))
            }
        }
    }
    let meta = match std::fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if !create && e.kind() == ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(format!("directory {d}: {e}")),
    };
    let me = euid();
    if meta.file_type().is_symlink() {
        Err(format!(
            "{d} is a symbolic link, not a directory: remove it, or pass --pidfile PATH"
        ))
    } else if !meta.is_dir() {
        Err(format!(
            "{d} is not a directory: remove it, or pass --pidfile PATH"
        ))
    } else if meta.uid() != me {
        Err(format!(
            "directory {d} is owned by uid {}, not by you (uid {me}): have it removed (by its \
             owner or root), or pass --pidfile PATH",
            meta.uid()
        ))
    } else if meta.mode() & 0o022 != 0 {
        Err(format!(
            "directory {d} is writable by its group or others (mode {:04o}), so another user \
             could plant the pidfile: `chmod 700 {d}` or remove it, or pass --pidfile PATH",
            meta.mode() & 0o7777
        ))
    } else {
        Ok(true)
    }
}

/// What is wrong with pidfile `path`, given its metadata (from `fstat` once open, else
/// `lstat`): anything but a regular file of this user with a single name.
fn refuse_file(path: &Path, meta: &std::fs::Metadata) -> Option<String> {
    let p = path.display();
    let me = euid();
    if meta.file_type().is_symlink() {
        Some(format!(
            "pidfile {p} is a symbolic link; refusing to follow it: remove it, or pass another \
             --pidfile"
        ))
    } else if !meta.is_file() {
        Some(format!(
            "pidfile {p} is not a regular file: remove it, or pass another --pidfile"
        ))
    } else if meta.uid() != me {
        Some(format!(
            "pidfile {p} is owned by uid {}, not by you (uid {me}): have it removed (by its \
             owner or root), or pass another --pidfile",
            meta.uid()
        ))
    } else if meta.nlink() > 1 {
        Some(format!(
            "pidfile {p} has {} names (hard links), so writing it would change another file \
             too: remove it, or pass another --pidfile",
            meta.nlink()
        ))
    } else {
        None
    }
}

/// Opens pidfile `path`: creating it (0644) if missing and for reading and writing with
/// `create`, else for reading only. Refuses it unless [`refuse_file`] finds nothing wrong.
///
/// A symbolic link as the last component is never followed (`O_NOFOLLOW`): a link to a file
/// of this user would otherwise have the daemon overwrite that file with its pid.
/// `O_NONBLOCK` keeps a FIFO from blocking the open (regular files ignore it); std adds
/// `O_CLOEXEC`, and the lock is inherited across `fork`, not `exec`.
fn open_checked(path: &Path, create: bool) -> Result<File, PidfileError> {
    let refused = |why| PidfileError::Refused {
        path: path.to_owned(),
        why,
    };
    let opened = OpenOptions::new()
        .read(true)
        .write(create)
        .create(create)
        .truncate(false)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path);
    let file = match opened {
        Ok(f) => f,
        Err(error) => {
            // ELOOP for a link; EACCES, typically, for another user's file: say which.
            if let Some(why) = std::fs::symlink_metadata(path)
                .ok()
                .and_then(|m| refuse_file(path, &m))
            {
                return Err(refused(why));
            }
            return Err(PidfileError::Io {
                path: path.to_owned(),
                error,
            });
        }
    };
    let meta = file.metadata().map_err(|error| PidfileError::Io {
        path: path.to_owned(),
        error,
    })?;
    match refuse_file(path, &meta) {
        Some(why) => Err(refused(why)),
        None => Ok(file),
    }
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
    /// It, or the default directory it is in, is not private to this user: another user could
    /// have planted it.
    Refused {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the file or directory, and what to do.
        why: String,
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
            Self::Refused { why, .. } => f.write_str(why),
        }
    }
}

impl std::error::Error for PidfileError {}

impl Pidfile {
    /// Creates (if needed) and locks `path`, without writing a pid yet (nor truncating: a
    /// stale pid is replaced by [`Pidfile::write_pid`], once the lock is ours).
    ///
    /// In [`default_dir`], the directory is created 0700 if missing and refused unless private
    /// to this user; elsewhere (an explicit `--pidfile`) missing directories are created.
    /// Either way the file itself is refused if it is a symbolic link, not a regular file,
    /// another user's, or has other names.
    pub fn lock(path: &Path) -> Result<Self, PidfileError> {
        let io = |error| PidfileError::Io {
            path: path.to_owned(),
            error,
        };
        if let Some(dir) = in_default_dir(path) {
            check_private_dir(dir, true).map_err(|why| PidfileError::Refused {
                path: path.to_owned(),
                why,
            })?;
        } else if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let mut file = open_checked(path, true)?;
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    /// Nobody holds it (no file, or a stale one).
    Nobody,
    /// A live daemon holds the lock; its pid as written, if readable.
    Daemon(Option<u32>),
    /// The file or its directory fails the checks of [`Pidfile::lock`] (why, and what to do):
    /// another user could have planted it, so the pid in it must not be trusted.
    Refused(String),
}

/// Reads `path` and checks its lock without taking it, after the checks [`Pidfile::lock`]
/// makes (without creating anything).
pub fn holder(path: &Path) -> Holder {
    if let Some(dir) = in_default_dir(path) {
        match check_private_dir(dir, false) {
            Ok(true) => {}
            Ok(false) => return Holder::Nobody,
            Err(why) => return Holder::Refused(why),
        }
    }
    let mut file = match open_checked(path, false) {
        Ok(f) => f,
        Err(PidfileError::Refused { why, .. }) => return Holder::Refused(why),
        Err(_) => return Holder::Nobody,
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
