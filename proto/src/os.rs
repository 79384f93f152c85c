//! The thin OS layer that the daemon and its clients share (Linux only): POSIX
//! shared memory, mappings, futexes, pidfds and the few process queries the protocol needs.
//!
//! Every system call of the shared-memory protocol goes through this module, so the rest of the
//! code (the [`wire`](crate::wire) layout, the allocator) stays OS-free and model-checkable.
//! Nothing here allocates, formats or panics: a client calls it from inside a global
//! allocator. Errors are the raw `errno` ([`Errno`]); callers map them to their own error enums
//! where the failure is decided.
//!
//! The calls go through `rustix` (raw system calls, typed flags, owned descriptors). `libc` is
//! left for the few things rustix lacks or does worse on the allocator's path, each marked where
//! it is used: `strerror_r`, `clock_gettime`, `sched_getcpu` and `sysconf`.
//!
//! Descriptors are owned by [`Fd`] and mappings by [`Mapping`]; both release their resource on
//! drop, ignoring errors (nothing useful can be done about a failed `close` or `munmap`).

use core::ffi::{c_void, CStr};
use core::fmt;
use core::ptr::NonNull;
use core::sync::atomic::AtomicU32;
use core::time::Duration;
use std::os::fd::{IntoRawFd, OwnedFd, RawFd};

cfg_if::cfg_if! {
    if #[cfg(target_os = "linux")] {
        use rustix::fs::{FallocateFlags, Mode};
        use rustix::io::Errno as SysErrno;
        use rustix::mm::{Advice, MapFlags, ProtFlags};
        use rustix::thread::futex;
    } else {
        compile_error!("xalloc-proto supports Linux only");
    }
}

/// An `errno` value from a failed system call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {
    /// The calling thread's current `errno`: the error of the last failed `libc` call. (The
    /// calls in this crate that go through rustix return their error and leave `errno` alone.)
    pub fn last() -> Self {
        // `last_os_error` only reads `errno`; it allocates nothing.
        Self(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; 128];
        // libc: rustix has no `strerror`; its `Errno`'s `Display` goes through `std::io::Error`,
        // which allocates the message and words it differently.
        // SAFETY: `buf` is writable for its length; the XSI `strerror_r` writes a NUL-terminated
        // string of at most that length, or returns an error and leaves it unspecified.
        let rc = unsafe { libc::strerror_r(self.0, buf.as_mut_ptr().cast(), buf.len()) };
        let text = if rc == 0 {
            CStr::from_bytes_until_nul(&buf)
                .ok()
                .and_then(|s| s.to_str().ok())
        } else {
            None
        };
        match text {
            Some(t) => write!(f, "{t} (errno {})", self.0),
            None => write!(f, "errno {}", self.0),
        }
    }
}

impl core::error::Error for Errno {}

/// A rustix error as the raw `errno` value.
const fn errno(e: SysErrno) -> Errno {
    Errno(e.raw_os_error())
}

/// The page size this crate assumes (x86-64, and arm64 with 4 KiB pages).
const PAGE: usize = 4096;

/// A file offset or length as the kernel's signed `loff_t`, or `EFBIG` (rustix takes `u64` and
/// leaves the range to the kernel, which would answer `EINVAL`).
fn file_offset(v: u64) -> Result<u64, Errno> {
    i64::try_from(v)
        .map(|_| v)
        .map_err(|_| errno(SysErrno::FBIG))
}

/// An owned file descriptor, closed on drop.
///
/// Deliberately not an `OwnedFd`: `OwnedFd::from_raw_fd` asserts that the value is not `-1`, a
/// panic path that [`Fd::from_raw`] (called inside the global allocator) does not have.
#[derive(Debug)]
pub struct Fd(RawFd);

impl Fd {
    /// Takes ownership of `fd`.
    ///
    /// # Safety
    /// `fd` is an open descriptor that nothing else closes.
    pub unsafe fn from_raw(fd: RawFd) -> Self {
        Self(fd)
    }

    /// The raw descriptor, still owned by `self`.
    pub fn raw(&self) -> RawFd {
        self.0
    }

    /// Gives up ownership: the caller closes the descriptor.
    pub fn into_raw(self) -> RawFd {
        let fd = self.0;
        core::mem::forget(self);
        fd
    }

    /// Takes over a descriptor that rustix returned.
    fn own(fd: OwnedFd) -> Self {
        Self(fd.into_raw_fd())
    }
}

impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: `self` owns the descriptor, which is open (`from_raw`'s contract), and closes
        // it once; nothing uses the number afterwards.
        unsafe { rustix::io::close(self.0) };
    }
}

/// Which open file a descriptor names: its device and inode. A process may close any of its
/// descriptors (`close_range`, a loop over every number), and the number then names whatever
/// it opens next; a library that keeps descriptors in such a process checks this before it
/// writes to one, closes one, or maps one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FileId {
    /// `st_dev`.
    pub dev: u64,
    /// `st_ino`.
    pub ino: u64,
}

impl FileId {
    /// The file that descriptor `fd` names now (`fstat`; async-signal-safe, no allocation).
    pub fn of_raw(fd: RawFd) -> Result<Self, Errno> {
        // SAFETY: `fd` is only borrowed for the call; an fd that is not open gives EBADF.
        let fd = unsafe { rustix::fd::BorrowedFd::borrow_raw(fd) };
        let st = rustix::fs::fstat(fd).map_err(errno)?;
        Ok(Self {
            dev: st.st_dev,
            ino: st.st_ino,
        })
    }

    /// Whether descriptor `fd` names this file now.
    pub fn named_by(&self, fd: RawFd) -> bool {
        fd >= 0 && Self::of_raw(fd).is_ok_and(|id| id == *self)
    }
}

/// What `fstat` says about a shared-memory object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Length in bytes.
    pub len: u64,
    /// Owner's user id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Permission bits (`0o777` mask).
    pub mode: u32,
}

/// The `shm_open` flags beyond the access mode, as glibc's `shm_open` sets them: `O_NOFOLLOW`
/// (glibc adds it; rustix, which adds only `O_CLOEXEC`, does not) and, when opening an existing
/// object, `O_NONBLOCK` (see [`shm_open`]).
fn shm_extra_flags(nonblock: bool) -> rustix::shm::OFlags {
    let mut extra = rustix::fs::OFlags::NOFOLLOW;
    if nonblock {
        extra |= rustix::fs::OFlags::NONBLOCK;
    }
    rustix::shm::OFlags::from_bits_retain(extra.bits())
}

/// `shm_open` through rustix, with glibc's error for a directory (`EINVAL`, not `EISDIR`).
fn shm_open_raw(name: &CStr, flags: rustix::shm::OFlags, mode: u32) -> Result<Fd, Errno> {
    match rustix::shm::open(name, flags, Mode::from_raw_mode(mode)) {
        Ok(fd) => Ok(Fd::own(fd)),
        Err(SysErrno::ISDIR) => Err(errno(SysErrno::INVAL)),
        Err(e) => Err(errno(e)),
    }
}

/// Creates the shared-memory object `name` (`/NAME`, as for `shm_open`) with `mode`, exclusively
/// (`O_CREAT | O_EXCL`: fails with `EEXIST` if it exists), sized to `len` bytes of zeros.
///
/// The mode is set with `fchmod` after creation, so the process umask does not narrow it. On
/// failure after creation the object is unlinked again.
pub fn shm_create(name: &CStr, len: u64, mode: u32) -> Result<Fd, Errno> {
    use rustix::shm::OFlags;
    let len = file_offset(len)?;
    let flags = OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | shm_extra_flags(false);
    let fd = shm_open_raw(name, flags, mode)?;
    let sized = rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode))
        .and_then(|()| rustix::fs::ftruncate(&fd, len));
    match sized {
        Ok(()) => Ok(fd),
        Err(e) => {
            shm_unlink(name).ok();
            Err(errno(e))
        }
    }
}

/// Opens the existing shared-memory object `name`, read-write or read-only.
///
/// Never blocks: `/dev/shm` is writable by every user, and a FIFO planted under an instance's
/// name would otherwise hold the open until someone writes to it (with `O_NONBLOCK` it opens at
/// once, and mapping it fails with `ENODEV`). The flag changes nothing for a regular file.
pub fn shm_open(name: &CStr, writable: bool) -> Result<Fd, Errno> {
    use rustix::shm::OFlags;
    let access = if writable {
        OFlags::RDWR
    } else {
        OFlags::RDONLY
    };
    // No `O_CREAT`, so the mode is unused.
    shm_open_raw(name, access | shm_extra_flags(true), 0)
}

/// Removes the name `name`; mappings and descriptors of the object stay valid.
pub fn shm_unlink(name: &CStr) -> Result<(), Errno> {
    rustix::shm::unlink(name).map_err(errno)
}

/// Size, owner and mode of the object behind `fd`.
pub fn fstat(fd: &Fd) -> Result<ObjectInfo, Errno> {
    let st = rustix::fs::fstat(fd).map_err(errno)?;
    Ok(ObjectInfo {
        len: st.st_size as u64,
        uid: st.st_uid,
        gid: st.st_gid,
        mode: st.st_mode & 0o777,
    })
}

/// `fallocate` with `mode`, retried on `EINTR`.
fn fallocate(fd: &Fd, mode: FallocateFlags, offset: u64, len: u64) -> Result<(), Errno> {
    let (offset, len) = (file_offset(offset)?, file_offset(len)?);
    loop {
        match rustix::fs::fallocate(fd, mode, offset, len) {
            Err(SysErrno::INTR) => continue,
            r => return r.map_err(errno),
        }
    }
}

/// Reserves the pages behind bytes `[offset, offset + len)` of the object (`fallocate`), so that
/// touching them later cannot fail. On a full `/dev/shm` this fails with `ENOSPC`, where a
/// store into an unreserved page would raise `SIGBUS`.
pub fn reserve(fd: &Fd, offset: u64, len: u64) -> Result<(), Errno> {
    fallocate(fd, FallocateFlags::empty(), offset, len)
}

/// Returns the pages behind bytes `[offset, offset + len)` of the object to the kernel
/// (`fallocate` with `FALLOC_FL_PUNCH_HOLE`): they read as zeros afterwards, in every mapping,
/// and take no memory until written again. The object keeps its size.
pub fn punch_hole(fd: &Fd, offset: u64, len: u64) -> Result<(), Errno> {
    let mode = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
    fallocate(fd, mode, offset, len)
}

/// A shared mapping of a whole object, unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a mapping is plain memory; what is stored in it is shared through atomics or through
// the protocol's ownership rules, which the users of `as_ptr` answer for.
unsafe impl Send for Mapping {}
// SAFETY: as above; `&Mapping` only hands out the address.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` from offset 0, shared, read-write or read-only. A mapping of
    /// at least [`HUGE_PAGE`](crate::wire::HUGE_PAGE) bytes starts on a huge-page boundary, so
    /// that huge pages of the object can back it (the kernel maps a huge page only where the
    /// address and the file offset agree modulo its size).
    pub fn new(fd: &Fd, len: usize, writable: bool) -> Result<Self, Errno> {
        const HUGE: usize = crate::wire::HUGE_PAGE;
        let prot = if writable {
            ProtFlags::READ | ProtFlags::WRITE
        } else {
            ProtFlags::READ
        };
        if len < HUGE {
            // SAFETY: a fresh mapping chosen by the kernel (no address given, no MAP_FIXED); it
            // aliases nothing of ours.
            let p = unsafe {
                rustix::mm::mmap(core::ptr::null_mut(), len, prot, MapFlags::SHARED, fd, 0)
            }
            .map_err(errno)?;
            let ptr = NonNull::new(p.cast()).ok_or(errno(SysErrno::NOMEM))?;
            return Ok(Self { ptr, len });
        }
        // Reserve a huge page more address space than needed, place the object on the first
        // huge-page boundary inside it, and give back the rest.
        let span = len.checked_add(HUGE).ok_or(errno(SysErrno::NOMEM))?;
        // SAFETY: a fresh inaccessible reservation chosen by the kernel; it aliases nothing.
        let r = unsafe {
            rustix::mm::mmap_anonymous(
                core::ptr::null_mut(),
                span,
                ProtFlags::empty(),
                MapFlags::PRIVATE | MapFlags::NORESERVE,
            )
        }
        .map_err(errno)?;
        let start = r.addr().next_multiple_of(HUGE);
        // SAFETY: `[start, start + len)` lies inside the reservation just made, which is ours
        // alone; MAP_FIXED replaces that part of it.
        let mapped = unsafe {
            rustix::mm::mmap(
                r.with_addr(start),
                len,
                prot,
                MapFlags::SHARED | MapFlags::FIXED,
                fd,
                0,
            )
        };
        let p = match mapped {
            Ok(p) => p,
            Err(e) => {
                // SAFETY: the reservation made above; nothing uses it.
                let _ = unsafe { rustix::mm::munmap(r, span) };
                return Err(errno(e));
            }
        };
        let end = (start + len).next_multiple_of(PAGE);
        // SAFETY: the unused head and tail of the reservation, outside the object's mapping;
        // nothing uses them.
        unsafe {
            if start > r.addr() {
                let _ = rustix::mm::munmap(r, start - r.addr());
            }
            if r.addr() + span > end {
                let _ = rustix::mm::munmap(r.with_addr(end), r.addr() + span - end);
            }
        }
        let ptr = NonNull::new(p.cast()).ok_or(errno(SysErrno::NOMEM))?;
        Ok(Self { ptr, len })
    }

    /// Maps `len` bytes of private, zero-filled memory of this process's own (anonymous,
    /// `MAP_NORESERVE`: a page costs memory only once it is written).
    pub fn anonymous(len: usize) -> Result<Self, Errno> {
        // SAFETY: a fresh private mapping chosen by the kernel (no address given, no
        // MAP_FIXED); it aliases nothing of ours.
        let p = unsafe {
            rustix::mm::mmap_anonymous(
                core::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE | MapFlags::NORESERVE,
            )
        }
        .map_err(errno)?;
        let ptr = NonNull::new(p.cast()).ok_or(errno(SysErrno::NOMEM))?;
        Ok(Self { ptr, len })
    }

    /// Asks for huge pages on bytes `[offset, offset + len)` (`MADV_HUGEPAGE`). The kernel uses
    /// them for shared memory only where the tmpfs allows it (`/dev/shm` mounted with
    /// `huge=advise`, `within_size` or `always`); elsewhere the advice changes nothing.
    pub fn advise_huge_pages(&self, offset: usize, len: usize) -> Result<(), Errno> {
        self.advise(offset, len, Advice::LinuxHugepage)
    }

    /// Backs bytes `[offset, offset + len)` with memory now, as if each page were written
    /// (`MADV_POPULATE_WRITE`), honouring huge-page advice. Where memory runs out this fails
    /// (`EFAULT` or `ENOMEM`) instead of raising `SIGBUS` as a store would.
    pub fn populate(&self, offset: usize, len: usize) -> Result<(), Errno> {
        self.advise(offset, len, Advice::LinuxPopulateWrite)
    }

    /// Keeps the mapping out of child processes (`MADV_DONTFORK`): after `fork`, the child has
    /// no mapping at this address at all. For a client's private channel, which only the
    /// process the daemon identified may use.
    pub fn dont_fork(&self) -> Result<(), Errno> {
        self.advise(0, self.len.next_multiple_of(PAGE), Advice::LinuxDontFork)
    }

    /// Makes every child process see the mapping zero-filled (`MADV_WIPEONFORK`, Linux 4.14),
    /// however it was made: `fork`, or a raw `clone` that runs no fork handler.
    pub fn wipe_on_fork(&self) -> Result<(), Errno> {
        self.advise(0, self.len.next_multiple_of(PAGE), Advice::LinuxWipeOnFork)
    }

    fn advise(&self, offset: usize, len: usize, advice: Advice) -> Result<(), Errno> {
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.len.next_multiple_of(PAGE))
            || !offset.is_multiple_of(PAGE)
        {
            return Err(errno(SysErrno::INVAL));
        }
        loop {
            // SAFETY: a page-aligned range inside this mapping; the advice changes no content
            // (populating writes nothing: pages read as before).
            let r =
                unsafe { rustix::mm::madvise(self.ptr.as_ptr().add(offset).cast(), len, advice) };
            match r {
                Err(SysErrno::INTR) => continue,
                r => return r.map_err(errno),
            }
        }
    }

    /// The first byte.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never: `mmap` refuses length 0).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether `addr` lies inside the mapping.
    pub fn contains(&self, addr: usize) -> bool {
        addr.wrapping_sub(self.ptr.as_ptr().addr()) < self.len
    }

    /// A `T` at byte `offset`.
    ///
    /// # Safety
    /// `offset + size_of::<T>() <= len`, and `offset` is a multiple of `align_of::<T>()` (the
    /// mapping is page-aligned).
    pub unsafe fn at<T: crate::wire::SharedPlain>(&self, offset: usize) -> &T {
        debug_assert!(
            offset + size_of::<T>() <= self.len && offset.is_multiple_of(align_of::<T>())
        );
        // SAFETY: in bounds and aligned (the caller's contract); `SharedPlain` types are valid
        // for every bit pattern and consist of atomics only, so a shared reference to memory
        // that other processes change is sound; the reference lives no longer than the mapping.
        unsafe { &*self.ptr.as_ptr().add(offset).cast::<T>() }
    }

    /// The segment header's words at the start of the mapping, or `None` if the mapping is
    /// shorter than a header. Read and write them with
    /// [`SegmentHeader::load`](crate::wire::SegmentHeader::load) and
    /// [`SegmentHeader::store`](crate::wire::SegmentHeader::store).
    pub fn header(&self) -> Option<&crate::wire::HeaderWords> {
        // SAFETY: offset 0 of a page-aligned mapping is aligned for the 64-byte-aligned words,
        // which fit when `len` is at least their size.
        (self.len >= size_of::<crate::wire::HeaderWords>()).then(|| unsafe { self.at(0) })
    }
}

/// Replaces `map` by a private (copy-on-write) mapping of the same object `fd`, at the same
/// address and with the same protection: the contents stay, and writes from then on stay in
/// this process.
///
/// # Safety
/// `map` maps `fd` (from offset 0, read-write), and no other thread of this process accesses
/// the mapping during the call.
pub unsafe fn remap_private(map: &Mapping, fd: &Fd) -> Result<(), Errno> {
    // SAFETY: MAP_FIXED over our own mapping, same length, same object: the caller's contract
    // rules out concurrent access; the range stays mapped throughout (the kernel replaces it
    // in one step).
    unsafe {
        rustix::mm::mmap(
            map.as_ptr().cast::<c_void>(),
            map.len(),
            ProtFlags::READ | ProtFlags::WRITE,
            MapFlags::PRIVATE | MapFlags::FIXED,
            fd,
            0,
        )
    }
    .map(drop)
    .map_err(errno)
}

/// Replaces `map` by private anonymous memory at the same address that holds a copy of the
/// byte ranges `keep` (offset, length from the mapping's start; anything outside the mapping
/// is ignored) and zeros elsewhere: for a mapping whose object's descriptor is gone. Costs a
/// copy of the kept bytes.
///
/// # Safety
/// No other thread of this process accesses the mapping during the call; afterwards it no
/// longer shares anything with the object's other mappings.
pub unsafe fn replace_with_private_copy(
    map: &Mapping,
    keep: impl Iterator<Item = (usize, usize)>,
) -> Result<(), Errno> {
    let len = map.len().next_multiple_of(PAGE);
    let tmp = Mapping::anonymous(len)?;
    for (off, n) in keep {
        if off.checked_add(n).is_none_or(|end| end > map.len()) {
            continue;
        }
        // SAFETY: `[off, off + n)` lies inside both mappings (checked), which are distinct;
        // the caller's contract rules out concurrent access to `map`.
        unsafe { core::ptr::copy_nonoverlapping(map.as_ptr().add(off), tmp.as_ptr().add(off), n) };
    }
    // SAFETY: moves our fresh mapping over `map`'s range, replacing it in one step (the range
    // stays mapped throughout); both are page-aligned and `len` long.
    unsafe {
        rustix::mm::mremap_fixed(
            tmp.as_ptr().cast::<c_void>(),
            len,
            len,
            rustix::mm::MremapFlags::MAYMOVE,
            map.as_ptr().cast::<c_void>(),
        )
    }
    .map_err(errno)?;
    // Moved: what was `tmp`'s range is no longer mapped, and `map` owns the new one.
    core::mem::forget(tmp);
    Ok(())
}

/// Nanoseconds on the monotonic clock.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // libc: rustix's `clock_gettime` finds the vDSO through the auxiliary vector on its first
    // call, which can allocate (it reads `/proc/self/auxv` into a `Vec` before Linux 6.4) and
    // panic; this runs inside the global allocator. glibc uses the vDSO it found at start-up.
    // SAFETY: `ts` is writable; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `self` owns the mapping; nothing refers to it once `self` is gone (`at`
        // borrows `self`).
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast::<c_void>(), self.len) };
    }
}

/// What ended a [`futex_wait`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wake {
    /// Woken, or the word already differed from the expected value, or a signal interrupted
    /// the wait: look again.
    Woken,
    /// The timeout passed.
    TimedOut,
}

/// Sleeps while `*word == expected`, at most `timeout` (forever if `None`). The word may be in
/// a shared mapping, read-only included: the futex is keyed by the object, not the address, so
/// [`futex_wake`] from another process reaches it.
pub fn futex_wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) -> Wake {
    let ts = timeout.map(|d| futex::Timespec {
        tv_sec: d.as_secs().min(i64::MAX as u64) as i64,
        tv_nsec: i64::from(d.subsec_nanos()),
    });
    // Flags empty, not PRIVATE: FUTEX_WAIT keyed by the object, so it works across processes.
    match futex::wait(word, futex::Flags::empty(), expected, ts.as_ref()) {
        Err(SysErrno::TIMEDOUT) => Wake::TimedOut,
        _ => Wake::Woken,
    }
}

/// Wakes up to `n` waiters on `word` (in any process); returns how many were woken.
pub fn futex_wake(word: &AtomicU32, n: u32) -> usize {
    futex::wake(word, futex::Flags::empty(), n.min(i32::MAX as u32)).unwrap_or(0)
}

/// A pidfd for process `pid`: readable once the process has exited. Fails with `ESRCH` if no
/// such process exists.
pub fn pidfd_open(pid: u32) -> Result<Fd, Errno> {
    let pid = i32::try_from(pid).map_err(|_| errno(SysErrno::SRCH))?;
    // Pid 0 is no process; the kernel answers `EINVAL` for it, and so does this.
    let pid = rustix::process::Pid::from_raw(pid).ok_or(errno(SysErrno::INVAL))?;
    rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::NONBLOCK)
        .map(Fd::own)
        .map_err(errno)
}

/// Sends SIGTERM to the process behind `pidfd`: never to another process that reused its pid.
pub fn pidfd_terminate(pidfd: &Fd) -> Result<(), Errno> {
    // SAFETY: `pidfd` is open for the duration of the call.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(pidfd.raw()) };
    rustix::process::pidfd_send_signal(fd, rustix::process::Signal::TERM)
        .map_err(|e| Errno(e.raw_os_error()))
}

/// Whether the process behind `pidfd` has exited (its pidfd is readable).
pub fn pidfd_exited(pidfd: &Fd) -> bool {
    use rustix::event::{PollFd, PollFlags, Timespec};
    let mut p = [PollFd::new(pidfd, PollFlags::IN)];
    // A zero timeout never blocks.
    let now = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    let ready = rustix::event::poll(&mut p, Some(&now));
    ready == Ok(1) && p[0].revents().contains(PollFlags::IN)
}

/// Whether process `pid` runs (exists and has not exited: a zombie counts as gone). It may
/// belong to another user.
pub fn process_alive(pid: u32) -> bool {
    match pidfd_open(pid) {
        Ok(fd) => !pidfd_exited(&fd),
        Err(_) => false,
    }
}

/// A random word from the kernel's CSPRNG (`getrandom`), or `None` if it cannot give one.
pub fn random_u64() -> Option<u64> {
    let mut b = [0u8; 8];
    match rustix::rand::getrandom(&mut b, rustix::rand::GetRandomFlags::empty()) {
        Ok(8) => Some(u64::from_ne_bytes(b)),
        _ => None,
    }
}

/// This process's id.
pub fn pid() -> u32 {
    rustix::process::getpid().as_raw_pid() as u32
}

/// The effective user id.
pub fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// CPUs online now (at least 1).
pub fn online_cpus() -> usize {
    // libc: rustix has no `_SC_NPROCESSORS_ONLN` (glibc reads `/sys/devices/system/cpu/online`);
    // `sched_getaffinity` counts the CPUs this thread may use, not those online.
    // SAFETY: plain query.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    usize::try_from(n).unwrap_or(1).max(1)
}

/// The CPU the calling thread runs on now (a hint: it may move at any time), or `u32::MAX` if
/// unknown.
pub fn current_cpu() -> u32 {
    // libc: as for `monotonic_ns`, rustix's `sched_getcpu` looks up the vDSO through the
    // auxiliary vector on its first call (which can allocate or panic, inside the allocator);
    // glibc's reads the thread's rseq area.
    // SAFETY: plain query.
    let c = unsafe { libc::sched_getcpu() };
    u32::try_from(c).unwrap_or(u32::MAX)
}

/// Gives the CPU to another runnable thread, if any.
pub fn yield_now() {
    rustix::thread::sched_yield();
}

/// A shared-memory name `/NAME.KIND` built without allocating: a NUL-terminated buffer.
#[derive(Clone, Copy)]
pub struct ShmName {
    buf: [u8; ShmName::CAP],
    len: usize,
}

impl ShmName {
    /// Bytes a name may take, NUL included (`NAME_MAX` of `/dev/shm` is 255).
    pub const CAP: usize = 256;

    /// `/{instance}.{kind}`, or `None` if `instance` is empty, too long, or holds a `/` or NUL.
    pub fn new(instance: &str, kind: &str) -> Option<Self> {
        let (i, k) = (instance.as_bytes(), kind.as_bytes());
        let bad = |s: &[u8]| s.iter().any(|&c| c == b'/' || c == 0);
        if i.is_empty() || bad(i) || bad(k) || 1 + i.len() + 1 + k.len() + 1 > Self::CAP {
            return None;
        }
        let mut buf = [0u8; Self::CAP];
        buf[0] = b'/';
        buf[1..1 + i.len()].copy_from_slice(i);
        buf[1 + i.len()] = b'.';
        buf[2 + i.len()..2 + i.len() + k.len()].copy_from_slice(k);
        Some(Self {
            buf,
            len: 2 + i.len() + k.len(),
        })
    }

    /// The name as a C string.
    pub fn as_cstr(&self) -> &CStr {
        // The buffer holds no NUL before `len` (checked in `new`) and a NUL at `len`.
        CStr::from_bytes_with_nul(&self.buf[..=self.len]).unwrap_or(c"/")
    }

    /// The name as text (`/NAME.KIND`).
    pub fn as_str(&self) -> &str {
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("/")
    }
}

impl PartialEq for ShmName {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for ShmName {}

impl fmt::Display for ShmName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for ShmName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}
