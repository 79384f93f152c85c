//! The daemon's three shared-memory objects: creation, headers, and removal.
//!
//! Each is created with `O_CREAT | O_EXCL` and an explicit mode, sized, given its header, and
//! only then announced (the request header last, since clients open it first). Objects that
//! already exist are inspected first: ours, from a daemon that is no longer running, are
//! removed (the caller checked the pidfile: no live daemon of this name holds it); anything
//! else (another owner, a wrong size or magic) is refused with a message that names the object
//! and says how to remove it.

// The errors carry the object's name in a fixed buffer (`ShmName`, no allocation); they are
// made once, at start, so their size does not matter.
#![allow(clippy::result_large_err)]

use std::ffi::CString;
use std::fmt;
use std::sync::Arc;

use xalloc_proto::os::{self, Errno, Fd, Mapping, ShmName};
use xalloc_proto::wire::{
    self, DaemonStats, SegmentHeader, SegmentKind, ARENA_DATA_OFFSET, ARENA_HEADER_LEN,
    STATS_OFFSET,
};

/// Mode bits and group of the segments.
#[derive(Clone, Copy, Debug)]
pub struct Access {
    /// Group that may use the daemon (`--group`), if any.
    pub gid: Option<u32>,
}

impl Access {
    fn mode(&self, kind: SegmentKind) -> u32 {
        match (self.gid, kind) {
            (None, _) | (_, SegmentKind::State) => 0o600,
            (Some(_), SegmentKind::Response) => 0o640,
            (Some(_), _) => 0o660,
        }
    }
}

/// Why the segments could not be made.
#[derive(Debug)]
pub enum SegmentError {
    /// An object of ours exists and cannot be replaced.
    Squatted {
        /// The object.
        name: ShmName,
        /// Why it is not ours or not reusable.
        why: String,
    },
    /// A system call failed.
    Os {
        /// The object.
        name: ShmName,
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
                "/dev/shm{name} exists and is not a leftover of this user's xallocd ({why}); \
                 remove it (`rm /dev/shm{name}`, as its owner or root) or pick another --name"
            ),
            Self::Os { name, call, errno } => {
                if errno.0 == libc::ENOSPC {
                    write!(f, "{call} /dev/shm{name}: {errno}: /dev/shm is full")
                } else {
                    write!(f, "{call} /dev/shm{name}: {errno}")
                }
            }
        }
    }
}

/// The names of an instance's four objects.
#[derive(Clone, Copy, Debug)]
pub struct Names {
    /// `/NAME.request`.
    pub request: ShmName,
    /// `/NAME.response`.
    pub response: ShmName,
    /// `/NAME.arena`.
    pub arena: ShmName,
    /// `/NAME.state` (the daemon's own).
    pub state: ShmName,
}

impl Names {
    /// The names for instance `name`.
    pub fn new(name: &str) -> Option<Self> {
        Some(Self {
            request: ShmName::new(name, "request")?,
            response: ShmName::new(name, "response")?,
            arena: ShmName::new(name, "arena")?,
            state: ShmName::new(name, "state")?,
        })
    }

    /// The name of the object of `kind`.
    fn of(&self, kind: SegmentKind) -> ShmName {
        match kind {
            SegmentKind::Request => self.request,
            SegmentKind::Response => self.response,
            SegmentKind::Arena => self.arena,
            SegmentKind::State => self.state,
        }
    }

    fn all(&self) -> [(ShmName, SegmentKind); 4] {
        [
            (self.request, SegmentKind::Request),
            (self.response, SegmentKind::Response),
            (self.arena, SegmentKind::Arena),
            (self.state, SegmentKind::State),
        ]
    }

    /// Removes all four names (mappings stay valid); missing ones are fine.
    pub fn unlink_all(&self) {
        for (n, _) in self.all() {
            let _ = os::shm_unlink(n.as_cstr());
        }
    }

    /// Whether any of the four exists.
    pub fn any_exists(&self) -> bool {
        self.all()
            .iter()
            .any(|(n, _)| std::path::Path::new(&format!("/dev/shm{n}")).exists())
    }
}

/// The created segments, mapped in the daemon.
#[derive(Debug)]
pub struct Segments {
    /// `/NAME.request`, read-write (shared with the watcher thread, which rings its doorbell).
    pub request: Arc<Mapping>,
    /// `/NAME.response`, read-write (only the daemon writes it).
    pub response: Mapping,
    /// `/NAME.arena`, read-write: its header page, then the data.
    pub arena: Mapping,
    /// The arena's descriptor, for reserving pages.
    pub arena_fd: Fd,
    /// `/NAME.state`, read-write: the ownership record (see `server`).
    pub state: Mapping,
    /// Bytes of arena data.
    pub arena_bytes: u64,
    /// Request slots.
    pub slots: u32,
    /// Whether these are a dead daemon's segments, re-attached.
    pub reattached: bool,
}

/// Checks existing objects of `names` and removes those that are leftovers of a dead daemon of
/// this user; refuses anything else.
///
/// With `any_layout`, this user's objects are removed whatever their header says (for
/// `start --fresh`); another user's are still refused.
pub fn clear_leftovers(names: &Names, any_layout: bool) -> Result<Vec<ShmName>, SegmentError> {
    let mut removed = Vec::new();
    for (name, kind) in names.all() {
        let Some(found) = open_ours(name, false)? else {
            continue;
        };
        let checked = match found.header {
            Some(h) => h
                .check(kind, found.len)
                .map(|()| h)
                .map_err(|e| e.to_string()),
            None => Err(format!(
                "{} bytes, too short for an xalloc segment",
                found.len
            )),
        };
        let header = match checked {
            Ok(h) => Some(h),
            Err(_) if any_layout => found.header,
            Err(why) => {
                return Err(SegmentError::Squatted {
                    name,
                    why: format!("{why}; `xallocd start --fresh` replaces it"),
                })
            }
        };
        if let Some(pid) = header
            .map(|h| h.daemon_pid)
            .filter(|&p| os::process_alive(p) && p != os::pid())
        {
            // The pidfile is free, yet the daemon that made these still runs: it was started
            // with another pidfile. Two daemons must not share a name.
            return Err(SegmentError::Squatted {
                name,
                why: format!("in use by xallocd pid {pid} (started with another --pidfile?)"),
            });
        }
        os::shm_unlink(name.as_cstr()).map_err(|errno| SegmentError::Os {
            name,
            call: "shm_unlink",
            errno,
        })?;
        removed.push(name);
    }
    Ok(removed)
}

/// An existing object of this user's, opened, and mapped whole when it can hold a header.
struct Existing {
    fd: Fd,
    len: usize,
    map: Option<Mapping>,
    header: Option<SegmentHeader>,
}

/// Opens object `name` if it exists (`None` if not), refusing another user's.
fn open_ours(name: ShmName, writable: bool) -> Result<Option<Existing>, SegmentError> {
    let os_err = |call, errno| SegmentError::Os { name, call, errno };
    let fd = match os::shm_open(name.as_cstr(), writable) {
        Ok(fd) => fd,
        Err(Errno(libc::ENOENT)) => return Ok(None),
        Err(Errno(libc::EACCES)) => {
            return Err(SegmentError::Squatted {
                name,
                why: "owned by another user".into(),
            })
        }
        Err(errno) => return Err(os_err("shm_open", errno)),
    };
    let info = os::fstat(&fd).map_err(|e| os_err("fstat", e))?;
    if info.uid != os::euid() {
        return Err(SegmentError::Squatted {
            name,
            why: format!("owned by uid {}", info.uid),
        });
    }
    let len = usize::try_from(info.len).unwrap_or(usize::MAX);
    if len < size_of::<SegmentHeader>() {
        // Too short to hold a header: mapping it and reading one would fault.
        return Ok(Some(Existing {
            fd,
            len,
            map: None,
            header: None,
        }));
    }
    let map = Mapping::new(&fd, len, writable).map_err(|e| os_err("mmap", e))?;
    let header = map.header().map(SegmentHeader::load);
    Ok(Some(Existing {
        fd,
        len,
        map: Some(map),
        header,
    }))
}

/// What [`reattach`] found.
pub enum Found {
    /// No object of the instance exists.
    Nothing,
    /// The objects of a dead daemon, consistent: re-attached.
    Reattached(Segments),
    /// Some objects exist but cannot be re-attached (missing, inconsistent, another layout):
    /// [`clear_leftovers`] decides what to do with them.
    Unusable(String),
}

/// Opens the four objects of a daemon that is no longer running and takes them over: checks
/// that they are this user's, consistent and of this layout, then writes this daemon's pid and
/// `generation` into their headers (the request segment's last, since clients look there).
pub fn reattach(names: Names, generation: u64, flags: u32) -> Result<Found, SegmentError> {
    let mut maps = Vec::new();
    let mut missing = 0;
    for (name, kind) in names.all() {
        let Some(found) = open_ours(name, true)? else {
            missing += 1;
            continue;
        };
        let (Some(map), Some(header)) = (found.map, found.header) else {
            return Ok(Found::Unusable(format!("{name} is too short")));
        };
        if let Err(e) = header.check(kind, found.len) {
            return Ok(Found::Unusable(format!("{name}: {e}")));
        }
        maps.push((kind, found.fd, map, header));
    }
    if missing == 4 {
        return Ok(Found::Nothing);
    }
    if missing > 0 {
        return Ok(Found::Unusable(format!(
            "{missing} of the 4 objects are missing"
        )));
    }
    let h0 = maps[0].3;
    if !maps.iter().all(|(_, _, _, h)| h.same_instance(&h0)) {
        return Ok(Found::Unusable(
            "the objects belong to different daemons".into(),
        ));
    }
    if h0.granule as usize != crate::server::GRANULE {
        return Ok(Found::Unusable(format!(
            "granule {} is not this build's",
            h0.granule
        )));
    }
    if os::process_alive(h0.daemon_pid) && h0.daemon_pid != os::pid() {
        return Err(SegmentError::Squatted {
            name: names.request,
            why: format!(
                "in use by xallocd pid {} (started with another --pidfile?)",
                h0.daemon_pid
            ),
        });
    }
    let pid = os::pid();
    let mut take = |kind: SegmentKind| {
        let i = maps.iter().position(|(k, ..)| *k == kind)?;
        let (_, fd, map, h) = maps.swap_remove(i);
        if let Err(e) = reserve_metadata(&fd, kind, map.len() as u64) {
            return Some(Err(SegmentError::Os {
                name: names.of(kind),
                call: "fallocate",
                errno: e,
            }));
        }
        let header =
            SegmentHeader::new(kind, h.slot_count, h.granule, h.arena_len, generation, pid)
                .with_flags(flags);
        if let Some(at) = map.header() {
            header.store(at);
        }
        Some(Ok((fd, map)))
    };
    let (Some(state), Some(arena), Some(response), Some(request)) = (
        take(SegmentKind::State),
        take(SegmentKind::Arena),
        take(SegmentKind::Response),
        take(SegmentKind::Request),
    ) else {
        return Ok(Found::Unusable("an object is missing".into()));
    };
    let ((_, state), (arena_fd, arena), (_, response), (_, request)) =
        (state?, arena?, response?, request?);
    Ok(Found::Reattached(Segments {
        request: Arc::new(request),
        response,
        arena,
        arena_fd,
        state,
        arena_bytes: h0.arena_len - ARENA_DATA_OFFSET as u64,
        slots: h0.slot_count,
        reattached: true,
    }))
}

/// Creates the four objects for `slots` slots and `arena_bytes` of data, writes their headers
/// (the request segment's last), and maps them. On failure nothing is left behind.
pub fn create(
    names: Names,
    slots: u32,
    arena_bytes: u64,
    granule: u32,
    access: Access,
    generation: u64,
    flags: u32,
) -> Result<Segments, SegmentError> {
    let result = create_inner(
        names,
        slots,
        arena_bytes,
        granule,
        access,
        generation,
        flags,
    );
    if result.is_err() {
        names.unlink_all();
    }
    result
}

fn create_inner(
    names: Names,
    slots: u32,
    arena_bytes: u64,
    granule: u32,
    access: Access,
    generation: u64,
    flags: u32,
) -> Result<Segments, SegmentError> {
    let pid = os::pid();
    let arena_len = arena_bytes + ARENA_DATA_OFFSET as u64;
    let header = |kind| {
        SegmentHeader::new(kind, slots, granule, arena_len, generation, pid).with_flags(flags)
    };
    let open = |name: ShmName, kind: SegmentKind, len: u64| {
        let os_err = |call, errno| SegmentError::Os { name, call, errno };
        let fd = os::shm_create(name.as_cstr(), len, access.mode(kind)).map_err(|e| match e {
            Errno(libc::EEXIST) => SegmentError::Squatted {
                name,
                why: "created by someone else while starting".into(),
            },
            e => os_err("shm_open", e),
        })?;
        if let Some(gid) = access.gid {
            // SAFETY: plain call on an open descriptor; -1 keeps the owner.
            if unsafe { libc::fchown(fd.raw(), u32::MAX, gid) } != 0 {
                return Err(os_err("fchown", Errno::last()));
            }
        }
        reserve_metadata(&fd, kind, len).map_err(|e| os_err("fallocate", e))?;
        let len = usize::try_from(len).map_err(|_| os_err("mmap", Errno(libc::EFBIG)))?;
        let map = Mapping::new(&fd, len, true).map_err(|e| os_err("mmap", e))?;
        Ok((fd, map))
    };
    let (arena_fd, arena) = open(names.arena, SegmentKind::Arena, arena_len)?;
    // The header page is reserved at once; data pages as blocks are handed out.
    os::reserve(&arena_fd, 0, ARENA_HEADER_LEN as u64).map_err(|errno| SegmentError::Os {
        name: names.arena,
        call: "fallocate",
        errno,
    })?;
    let (_, state) = open(
        names.state,
        SegmentKind::State,
        wire::state_segment_len(arena_len, granule) as u64,
    )?;
    let (_, response) = open(
        names.response,
        SegmentKind::Response,
        wire::response_segment_len(slots) as u64,
    )?;
    let (_, request) = open(
        names.request,
        SegmentKind::Request,
        wire::request_segment_len(slots) as u64,
    )?;
    // The request segment's header last: clients open it first.
    for (map, kind) in [
        (&state, SegmentKind::State),
        (&arena, SegmentKind::Arena),
        (&response, SegmentKind::Response),
        (&request, SegmentKind::Request),
    ] {
        if let Some(at) = map.header() {
            header(kind).store(at);
        }
    }
    Ok(Segments {
        request: Arc::new(request),
        response,
        arena,
        state,
        reattached: false,
        arena_fd,
        arena_bytes,
        slots,
    })
}

/// Reserves every page of the daemon's own objects (request, response, state), so that no
/// store of the daemon into them can raise `SIGBUS` when `/dev/shm` fills up; the arena is
/// reserved chunk by chunk as blocks are handed out.
fn reserve_metadata(fd: &Fd, kind: SegmentKind, len: u64) -> Result<(), Errno> {
    match kind {
        SegmentKind::Arena => Ok(()),
        _ => os::reserve(fd, 0, len),
    }
}

impl Segments {
    /// The daemon's statistics block in the response segment.
    pub fn stats(&self) -> &DaemonStats {
        // SAFETY: the response segment is `response_segment_len` long, which covers the stats
        // block at its 64-aligned offset.
        unsafe { self.response.at(STATS_OFFSET) }
    }
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
