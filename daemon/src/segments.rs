//! An instance's objects, their creation, re-attachment and removal:
//!
//! | object | what |
//! | --- | --- |
//! | `/dev/shm/NAME.socket` | the Unix socket clients connect to (mode 0600, or 0660 for `--group`) |
//! | the arena | a memfd sealed against resizing, handed to each client over its connection; the keeper holds a copy so that it outlives a daemon crash |
//! | `/dev/shm/NAME.state` | the daemon's own ownership record (mode 0600; no client maps it) |
//! | `/dev/shm/NAME.keeper` | the keeper's socket (mode 0600; the daemon's user only) |
//!
//! Objects that already exist are inspected first: this user's leftovers of a daemon that is no
//! longer running are removed (the caller holds the pidfile: no live daemon of this name uses
//! it); anything else (another owner, a live daemon, a wrong layout) is refused with a message
//! that names the object and says how to remove it.

use std::ffi::CString;
use std::fmt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use xalloc_proto::os::{self, Errno, Fd, Mapping, ShmName};
use xalloc_proto::unix;
use xalloc_proto::wire::{self, SegmentHeader, SegmentKind, ARENA_DATA_OFFSET, ARENA_HEADER_LEN};

use crate::keeper::KeeperLink;

/// Who may connect.
#[derive(Clone, Copy, Debug)]
pub struct Access {
    /// Group that may use the daemon (`--group`), if any.
    pub gid: Option<u32>,
}

impl Access {
    /// Mode of the instance socket: connecting needs write permission on it.
    pub fn socket_mode(&self) -> u32 {
        if self.gid.is_some() {
            0o660
        } else {
            0o600
        }
    }
}

/// Why the objects could not be made.
#[derive(Debug)]
pub enum SegmentError {
    /// An object of the instance exists and is not this user's leftover.
    Squatted {
        /// The object's path.
        name: String,
        /// Why it is not ours or not reusable.
        why: String,
    },
    /// A system call failed.
    Os {
        /// The object.
        name: String,
        /// The call.
        call: &'static str,
        /// Its error.
        errno: Errno,
    },
}

impl fmt::Display for SegmentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Squatted { name, why } => write!(
                f,
                "{name} exists and is not a leftover of this user's xallocd ({why}); remove it \
                 (`rm {name}`, as its owner or root) or pick another --name"
            ),
            Self::Os { name, call, errno } => {
                if errno.0 == libc::ENOSPC {
                    write!(f, "{call} {name}: {errno}: /dev/shm is full")
                } else if errno.0 == libc::ENOMEM {
                    write!(f, "{call} {name}: {errno}: not enough memory")
                } else {
                    write!(f, "{call} {name}: {errno}")
                }
            }
        }
    }
}

/// The names of an instance's objects.
#[derive(Clone, Debug)]
pub struct Names {
    /// The instance name.
    pub name: String,
    /// `/dev/shm/NAME.socket`.
    pub socket: PathBuf,
    /// `/dev/shm/NAME.keeper`.
    pub keeper: PathBuf,
    /// `/NAME.state` (a POSIX shared-memory name: `/dev/shm/NAME.state`).
    pub state: ShmName,
}

impl Names {
    /// The names for instance `name`; `None` if it is too long for a socket path.
    pub fn new(name: &str) -> Option<Self> {
        let socket = socket_path(name)?;
        let keeper = PathBuf::from(format!("/dev/shm/{name}.keeper"));
        (keeper.as_os_str().len() < 108).then_some(())?;
        Some(Self {
            name: name.to_owned(),
            socket,
            keeper,
            state: ShmName::new(name, "state")?,
        })
    }

    /// `/dev/shm/NAME.state`.
    pub fn state_path(&self) -> String {
        format!("/dev/shm{}", self.state)
    }

    /// Removes the socket and the state record (mappings stay valid); missing ones are fine.
    pub fn unlink_all(&self) {
        let _ = std::fs::remove_file(&self.socket);
        let _ = os::shm_unlink(self.state.as_cstr());
    }

    /// Whether the socket, the state record or the keeper's socket exists.
    pub fn any_exists(&self) -> bool {
        self.socket.symlink_metadata().is_ok()
            || self.keeper.symlink_metadata().is_ok()
            || Path::new(&self.state_path()).exists()
    }
}

/// The instance socket's path for `name`, if it fits in a socket address.
pub fn socket_path(name: &str) -> Option<PathBuf> {
    let p = PathBuf::from(format!("/dev/shm/{name}.socket"));
    (p.as_os_str().len() < 108).then_some(p)
}

/// The daemon's arena and ownership record, mapped.
#[derive(Debug)]
pub struct Segments {
    /// The arena, read-write: its header page, then the data.
    pub arena: Mapping,
    /// The arena's descriptor: handed to clients, and used to reserve pages.
    pub arena_fd: Fd,
    /// The ownership record (see `server`).
    pub state: Mapping,
    /// Bytes of arena data.
    pub arena_bytes: u64,
    /// The instance's generation (kept across re-attachment).
    pub generation: u64,
    /// `HEADER_FLAG_*` bits of the arena.
    pub flags: u32,
    /// Slots per client channel.
    pub slots: u32,
    /// Whether these are a dead daemon's objects, re-attached.
    pub reattached: bool,
}

/// Checks the existing objects of `names` and removes those that are leftovers of a dead daemon
/// of this user (telling a keeper that still holds a dead daemon's arena to let go); refuses
/// anything else. Returns what was removed.
///
/// With `any_layout`, this user's state record is removed whatever its header says (for
/// `start --fresh`); another user's objects are still refused.
pub fn clear_leftovers(names: &Names, any_layout: bool) -> Result<Vec<String>, SegmentError> {
    let mut removed = Vec::new();
    check_socket(&names.socket)?;
    match KeeperLink::connect(&names.name) {
        Ok(Some(link)) => {
            let pid = link.pid();
            link.quit().map_err(|why| SegmentError::Squatted {
                name: names.keeper.display().to_string(),
                why: format!("its keeper (pid {pid}) did not quit: {why}"),
            })?;
            removed.push(format!("the keeper (pid {pid}) and the arena it held"));
        }
        Ok(None) => {}
        Err(why) => {
            return Err(SegmentError::Squatted {
                name: names.keeper.display().to_string(),
                why,
            })
        }
    }
    if names.socket.symlink_metadata().is_ok() {
        std::fs::remove_file(&names.socket).map_err(|e| SegmentError::Os {
            name: names.socket.display().to_string(),
            call: "unlink",
            errno: Errno(e.raw_os_error().unwrap_or(0)),
        })?;
        removed.push(names.socket.display().to_string());
    }
    if let Some(found) = open_state(names, false)? {
        let ok = found
            .header
            .is_some_and(|h| h.check(SegmentKind::State, found.len).is_ok());
        if !ok && !any_layout {
            return Err(SegmentError::Squatted {
                name: names.state_path(),
                why: "not a state record of this version; `xallocd start --fresh` replaces it"
                    .into(),
            });
        }
        os::shm_unlink(names.state.as_cstr()).map_err(|errno| SegmentError::Os {
            name: names.state_path(),
            call: "shm_unlink",
            errno,
        })?;
        removed.push(names.state_path());
    }
    Ok(removed)
}

/// Refuses a socket path that is not this user's leftover: another user's file, something
/// that is not a socket, or a socket a live process answers on.
pub fn check_socket(path: &Path) -> Result<(), SegmentError> {
    let Ok(meta) = path.symlink_metadata() else {
        return Ok(());
    };
    let squatted = |why: String| SegmentError::Squatted {
        name: path.display().to_string(),
        why,
    };
    if meta.uid() != os::euid() {
        return Err(squatted(format!("owned by uid {}", meta.uid())));
    }
    if !meta.file_type().is_socket() {
        return Err(squatted("not a socket".into()));
    }
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return Err(squatted("bad path".into()));
    };
    match unix::connect(&c) {
        Ok(sock) => {
            let who = unix::peer(&sock).map_or(0, |p| p.pid);
            Err(squatted(format!(
                "in use by process {who} (an xallocd started with another --pidfile?)"
            )))
        }
        // Nobody listens: a leftover.
        Err(Errno(libc::ECONNREFUSED | libc::ENOENT)) => Ok(()),
        // A live socket of another type (EPROTOTYPE: a stream socket, another program's), or
        // one that cannot be told apart from a live one: not ours to replace.
        Err(e) => {
            let who = std::os::unix::net::UnixStream::connect(path)
                .ok()
                .and_then(|s| rustix::net::sockopt::socket_peercred(&s).ok())
                .map_or_else(|| "?".to_owned(), |c| c.pid.as_raw_nonzero().to_string());
            Err(squatted(format!(
                "in use by process {who} (a socket of another kind answers there: {e})"
            )))
        }
    }
}

/// The state record, opened if it exists (`None` if not), refusing another user's.
struct Existing {
    len: usize,
    map: Option<Mapping>,
    header: Option<SegmentHeader>,
}

fn open_state(names: &Names, writable: bool) -> Result<Option<Existing>, SegmentError> {
    let name = names.state_path();
    let os_err = |call, errno| SegmentError::Os {
        name: name.clone(),
        call,
        errno,
    };
    let fd = match os::shm_open(names.state.as_cstr(), writable) {
        Ok(fd) => fd,
        Err(Errno(libc::ENOENT)) => return Ok(None),
        Err(Errno(libc::EACCES)) => {
            return Err(SegmentError::Squatted {
                name: name.clone(),
                why: "owned by another user".into(),
            })
        }
        Err(errno) => return Err(os_err("shm_open", errno)),
    };
    let info = os::fstat(&fd).map_err(|e| os_err("fstat", e))?;
    if info.uid != os::euid() {
        return Err(SegmentError::Squatted {
            name: name.clone(),
            why: format!("owned by uid {}", info.uid),
        });
    }
    let len = usize::try_from(info.len).unwrap_or(usize::MAX);
    if len < size_of::<SegmentHeader>() {
        return Ok(Some(Existing {
            len,
            map: None,
            header: None,
        }));
    }
    let map = Mapping::new(&fd, len, writable).map_err(|e| os_err("mmap", e))?;
    if writable {
        // Every page reserved, so that no store of the daemon into it can raise SIGBUS.
        os::reserve(&fd, 0, len as u64).map_err(|e| os_err("fallocate", e))?;
    }
    let header = map.header().map(SegmentHeader::load);
    Ok(Some(Existing {
        len,
        map: Some(map),
        header,
    }))
}

/// Creates the arena (a sealed memfd) and the state record for `slots` slots per client and
/// `arena_bytes` of data, writes their headers, and maps them. On failure nothing is left
/// behind.
pub fn create(
    names: &Names,
    slots: u32,
    arena_bytes: u64,
    granule: u32,
    generation: u64,
    flags: u32,
) -> Result<Segments, SegmentError> {
    let result = create_inner(names, slots, arena_bytes, granule, generation, flags);
    if result.is_err() {
        let _ = os::shm_unlink(names.state.as_cstr());
    }
    result
}

fn create_inner(
    names: &Names,
    slots: u32,
    arena_bytes: u64,
    granule: u32,
    generation: u64,
    flags: u32,
) -> Result<Segments, SegmentError> {
    let pid = os::pid();
    let arena_len = arena_bytes + ARENA_DATA_OFFSET as u64;
    let header = |kind| {
        SegmentHeader::new(kind, slots, granule, arena_len, generation, pid).with_flags(flags)
    };
    let arena_name = format!("the arena of {}", names.name);
    let a_err = |call, errno| SegmentError::Os {
        name: arena_name.clone(),
        call,
        errno,
    };
    let memfd_name = CString::new(format!("xalloc:{}.arena", names.name))
        .map_err(|_| a_err("memfd_create", Errno(libc::EINVAL)))?;
    let arena_fd = unix::memfd(&memfd_name, arena_len).map_err(|e| a_err("memfd_create", e))?;
    // The header page is reserved at once; data pages as blocks are handed out.
    os::reserve(&arena_fd, 0, ARENA_HEADER_LEN as u64).map_err(|e| a_err("fallocate", e))?;
    let len = usize::try_from(arena_len).map_err(|_| a_err("mmap", Errno(libc::EFBIG)))?;
    let arena = Mapping::new(&arena_fd, len, true).map_err(|e| a_err("mmap", e))?;
    unix::seal_size(&arena_fd).map_err(|e| a_err("F_ADD_SEALS", e))?;

    let state_name = names.state_path();
    let s_err = |call, errno| SegmentError::Os {
        name: state_name.clone(),
        call,
        errno,
    };
    let state_len = wire::state_segment_len(arena_len, granule) as u64;
    let state_fd =
        os::shm_create(names.state.as_cstr(), state_len, 0o600).map_err(|e| match e {
            Errno(libc::EEXIST) => SegmentError::Squatted {
                name: state_name.clone(),
                why: "created by someone else while starting".into(),
            },
            e => s_err("shm_open", e),
        })?;
    os::reserve(&state_fd, 0, state_len).map_err(|e| s_err("fallocate", e))?;
    let state = Mapping::new(&state_fd, state_len as usize, true).map_err(|e| s_err("mmap", e))?;
    for (map, kind) in [(&state, SegmentKind::State), (&arena, SegmentKind::Arena)] {
        if let Some(at) = map.header() {
            header(kind).store(at);
        }
    }
    Ok(Segments {
        arena,
        arena_fd,
        state,
        arena_bytes,
        generation,
        flags,
        slots,
        reattached: false,
    })
}

/// Takes over the arena a keeper held for a daemon that died, and that daemon's state record:
/// checks that the arena is sealed, of this layout and of the record's instance, then writes
/// this daemon's pid into both headers. `Err` says why they cannot be used (the caller then
/// starts afresh).
pub fn reattach(names: &Names, arena_fd: Fd, generation: u64) -> Result<Segments, String> {
    if !unix::size_is_sealed(&arena_fd) {
        return Err("the kept arena is not sealed".into());
    }
    let info = os::fstat(&arena_fd).map_err(|e| format!("fstat of the kept arena: {e}"))?;
    let len = usize::try_from(info.len).map_err(|_| "the kept arena is too large".to_owned())?;
    if len < ARENA_DATA_OFFSET + ARENA_HEADER_LEN {
        return Err("the kept arena is too short".into());
    }
    let arena =
        Mapping::new(&arena_fd, len, true).map_err(|e| format!("mmap of the kept arena: {e}"))?;
    // The arena's own header is in memory every client may write: nothing is taken from it.
    // What the arena is comes from the daemon's private record, and the header is rewritten
    // from that below.
    let Some(found) = open_state(names, true).map_err(|e| e.to_string())? else {
        return Err(format!("{} is missing", names.state_path()));
    };
    let (Some(state), Some(sh)) = (found.map, found.header) else {
        return Err(format!("{} is too short", names.state_path()));
    };
    sh.check(SegmentKind::State, found.len)
        .map_err(|e| format!("{}: {e}", names.state_path()))?;
    if sh.generation != generation
        || sh.arena_len != len as u64
        || sh.granule as usize != crate::server::GRANULE
        || sh.slot_count == 0
        || sh.slot_count > wire::MAX_SLOTS
    {
        return Err(format!(
            "{} describes another arena than the one the keeper held",
            names.state_path()
        ));
    }
    if os::process_alive(sh.daemon_pid) && sh.daemon_pid != os::pid() {
        return Err(format!(
            "{} is in use by xallocd pid {} (started with another --pidfile?)",
            names.state_path(),
            sh.daemon_pid
        ));
    }
    let pid = os::pid();
    for (map, kind) in [(&state, SegmentKind::State), (&arena, SegmentKind::Arena)] {
        let header = SegmentHeader::new(
            kind,
            sh.slot_count,
            sh.granule,
            sh.arena_len,
            sh.generation,
            pid,
        )
        .with_flags(sh.flags);
        if let Some(at) = map.header() {
            header.store(at);
        }
    }
    Ok(Segments {
        arena,
        arena_fd,
        state,
        arena_bytes: len as u64 - ARENA_DATA_OFFSET as u64,
        generation,
        flags: sh.flags,
        slots: sh.slot_count,
        reattached: true,
    })
}

/// Resolves a group name or number to a gid.
pub fn group_id(group: &str) -> Result<u32, String> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    let c = CString::new(group).map_err(|_| format!("bad group name {group:?}"))?;
    // SAFETY: `c` is NUL-terminated; getgrnam returns null or a pointer to static storage,
    // read at once (the daemon is single-threaded at this point).
    let gr = unsafe { libc::getgrnam(c.as_ptr()) };
    if gr.is_null() {
        return Err(format!("no such group: {group}"));
    }
    // SAFETY: non-null result of getgrnam.
    Ok(unsafe { (*gr).gr_gid })
}
