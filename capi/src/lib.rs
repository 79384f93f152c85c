//! The C library of xalloc: the functions of `include/xalloc.h` (`xalloc_malloc` ...), and,
//! with the `interpose` feature, C's `malloc` family itself, for `LD_PRELOAD`.
//!
//! Both are one [`XallocMalloc`]: the same client as `XallocGlobal` (its connections, cache
//! and counters), seen through pointers alone. The root `Makefile` builds `lib/libxalloc.a`
//! without `interpose` (a static link never replaces the program's `malloc`; small blocks come
//! from the program's own `malloc`) and `lib/libxalloc.so` with it (small blocks from glibc's
//! own entry points, `__libc_malloc` and the rest, since `malloc` is this library's).
//!
//! No function of the allocator here allocates, locks, formats or unwinds: a panic would abort
//! (`extern "C"`), and none is reachable from these paths by design. The share functions
//! (`xalloc_shared_*`, over [`SharedBuf`] and [`SharedView`]) are not allocation paths: each
//! object they hand out is a small box of the system allocator (`malloc`, which the
//! interposer serves from glibc since it is small), and they call into the share API, which
//! may allocate; they never panic either (no `unwrap`, no unchecked index).

use core::ffi::{c_char, c_int, c_void};

use xalloc_global::malloc::{MallocError, XallocMalloc};
use xalloc_global::{Handle, ShareError, SharedBuf, SharedView};

#[cfg(feature = "interpose")]
mod interpose;

/// The system allocator behind small blocks.
#[cfg(not(feature = "interpose"))]
type System = xalloc_global::malloc::Libc;
#[cfg(feature = "interpose")]
type System = interpose::Glibc;

/// The one client of this library.
static XALLOC: XallocMalloc<System> = XallocMalloc::new(System {});

/// Sets C's `errno`.
fn set_errno(e: c_int) {
    // SAFETY: `__errno_location` returns this thread's errno, valid for the thread's life.
    unsafe { *libc::__errno_location() = e };
}

/// The pointer, or null with `errno` set from the error.
fn or_errno(r: Result<*mut u8, MallocError>) -> *mut c_void {
    match r {
        Ok(p) => p.cast(),
        Err(e) => {
            set_errno(match e {
                MallocError::NoMemory => libc::ENOMEM,
                MallocError::Invalid => libc::EINVAL,
            });
            core::ptr::null_mut()
        }
    }
}

/// `xalloc_malloc` (see `xalloc.h`).
#[no_mangle]
pub extern "C" fn xalloc_malloc(size: usize) -> *mut c_void {
    or_errno(XALLOC.malloc(size))
}

/// `xalloc_calloc` (see `xalloc.h`).
#[no_mangle]
pub extern "C" fn xalloc_calloc(count: usize, size: usize) -> *mut c_void {
    or_errno(XALLOC.calloc(count, size))
}

/// `xalloc_realloc` (see `xalloc.h`).
///
/// # Safety
/// `ptr` is null or a live block of this library (or of the system `malloc`).
#[no_mangle]
pub unsafe extern "C" fn xalloc_realloc(ptr: *mut c_void, size: usize) -> *mut c_void {
    // SAFETY: the caller's contract.
    or_errno(unsafe { XALLOC.realloc(ptr.cast(), size) })
}

/// `xalloc_aligned_alloc` (see `xalloc.h`).
#[no_mangle]
pub extern "C" fn xalloc_aligned_alloc(align: usize, size: usize) -> *mut c_void {
    or_errno(XALLOC.aligned_alloc(align, size))
}

/// `xalloc_free` (see `xalloc.h`).
///
/// # Safety
/// `ptr` is null or a block of this library (or of the system `malloc`), not used after.
#[no_mangle]
pub unsafe extern "C" fn xalloc_free(ptr: *mut c_void) {
    // SAFETY: the caller's contract.
    unsafe { XALLOC.free(ptr.cast()) }
}

/// `xalloc_is_shared` (see `xalloc.h`).
#[no_mangle]
pub extern "C" fn xalloc_is_shared(ptr: *const c_void) -> c_int {
    c_int::from(XALLOC.is_shared(ptr.cast()))
}

/// `xalloc_usable_size` (see `xalloc.h`).
///
/// # Safety
/// `ptr` is null or a live block of this library (or of the system `malloc`).
#[no_mangle]
pub unsafe extern "C" fn xalloc_usable_size(ptr: *const c_void) -> usize {
    // SAFETY: the caller's contract.
    unsafe { XALLOC.usable_size(ptr.cast_mut().cast()) }
}

/// `struct xalloc_stats` of `xalloc.h`, field for field.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct XallocStats {
    forwarded: u64,
    fallbacks: u64,
    over_quota: u64,
    arena_bytes: u64,
    arena_blocks: u64,
    cached_bytes: u64,
    cache_hits: u64,
    connections: u64,
    bad_frees: u64,
    threshold: u64,
    daemon_pid: u64,
    daemon_arena_bytes: u64,
    daemon_free_bytes: u64,
}

/// `xalloc_stats` (see `xalloc.h`).
///
/// # Safety
/// `stats` is null or valid for writes of `size` bytes.
#[no_mangle]
pub unsafe extern "C" fn xalloc_stats(stats: *mut XallocStats, size: usize) -> usize {
    if stats.is_null() {
        return 0;
    }
    let c = xalloc_global::counters();
    let daemon = xalloc_global::global::with_newest_connection(|conn| {
        let bell = conn.daemon_bell()?;
        conn.daemon_alive().then(|| {
            (
                u64::from(conn.daemon_pid()),
                bell.arena_bytes.load(core::sync::atomic::Ordering::Relaxed),
                bell.free_bytes.load(core::sync::atomic::Ordering::Relaxed),
            )
        })
    })
    .flatten()
    .unwrap_or_default();
    let s = XallocStats {
        forwarded: c.forwarded,
        fallbacks: c.fallbacks,
        over_quota: c.over_quota,
        arena_bytes: c.arena_bytes,
        arena_blocks: c.arena_blocks,
        cached_bytes: c.cached_bytes,
        cache_hits: c.cache_hits,
        connections: c.connections,
        bad_frees: c.bad_frees,
        threshold: XALLOC.threshold() as u64,
        daemon_pid: daemon.0,
        daemon_arena_bytes: daemon.1,
        daemon_free_bytes: daemon.2,
    };
    let n = size.min(size_of::<XallocStats>());
    // SAFETY: `stats` is valid for `size` bytes (the caller's contract), `n <= size`; `s` is a
    // local of `size_of::<XallocStats>() >= n` bytes; a byte copy needs no alignment.
    unsafe { core::ptr::copy_nonoverlapping((&raw const s).cast::<u8>(), stats.cast::<u8>(), n) };
    size_of::<XallocStats>()
}

// ---------------------------------------------------------------------------------------------
// Share handles

/// `XALLOC_HANDLE_LEN` of `xalloc.h`: a handle's text and its NUL.
const HANDLE_LEN: usize = Handle::MAX_TEXT + 1;
const _: () = assert!(HANDLE_LEN == 64, "xalloc.h says XALLOC_HANDLE_LEN is 64");

/// `struct xalloc_shared` of `xalloc.h` (opaque to C): an owned buffer or a view, in a box of
/// the system allocator that `xalloc_shared_close` (or a successful `xalloc_shared_send`)
/// frees.
#[derive(Debug)]
pub struct XallocShared {
    inner: Shared,
}

#[derive(Debug)]
enum Shared {
    /// A block this process owns (readable and writable).
    Owned(SharedBuf),
    /// A read-only view.
    View(SharedView),
    /// Only while `xalloc_shared_send` runs: the buffer is being sent (C never sees this).
    Sending,
}

impl Shared {
    /// The block's first byte and its length, without making a reference to the bytes (C may
    /// hold a buffer and a view of one block at once: see `xalloc_shared_open`).
    fn bytes(&self) -> Option<(*const u8, usize)> {
        match self {
            Self::Owned(b) => Some((b.as_ptr(), b.len())),
            Self::View(v) => Some((v.as_ptr(), v.len())),
            Self::Sending => None,
        }
    }

    /// The handle that opens views of the block.
    fn handle(&self) -> Option<Handle> {
        match self {
            Self::Owned(b) => Some(b.handle()),
            Self::View(v) => Some(v.handle()),
            Self::Sending => None,
        }
    }
}

/// C's `errno` for a share error (the table of `xalloc.h`).
fn share_errno(e: ShareError) -> c_int {
    match e {
        ShareError::NoDaemon => libc::ENOTCONN,
        ShareError::OtherInstance => libc::EXDEV,
        ShareError::NotFound => libc::ENOENT,
        ShareError::NotTransfer => libc::EPERM,
        ShareError::BadHandle => libc::EINVAL,
        ShareError::OutOfMemory => libc::ENOMEM,
        ShareError::OverQuota => libc::EDQUOT,
        ShareError::TooMany => libc::EMFILE,
        _ => libc::EIO,
    }
}

/// Sets `errno` to `e` and returns -1.
fn fail(e: c_int) -> c_int {
    set_errno(e);
    -1
}

/// Sets `errno` to `e` and returns null.
fn fail_null<T>(e: c_int) -> *mut T {
    set_errno(e);
    core::ptr::null_mut()
}

/// The object for C, or null with `errno` set. A box that cannot be allocated gives ENOMEM
/// (and closes the share again) rather than aborting as `Box::new` would.
fn new_object(r: Result<Shared, ShareError>) -> *mut XallocShared {
    let inner = match r {
        Ok(inner) => inner,
        Err(e) => return fail_null(share_errno(e)),
    };
    let layout = core::alloc::Layout::new::<XallocShared>();
    // SAFETY: the layout is of a non-zero-sized type.
    let p = unsafe { std::alloc::alloc(layout) }.cast::<XallocShared>();
    if p.is_null() {
        drop(inner);
        return fail_null(libc::ENOMEM);
    }
    // SAFETY: `p` is a fresh allocation of the global allocator with `XallocShared`'s layout:
    // writable, aligned, and (written) a valid box for `Box::from_raw` in `xalloc_shared_close`.
    unsafe { p.write(XallocShared { inner }) };
    p
}

/// The handle of a C string: at most `Handle::MAX_TEXT` bytes read before the NUL (a longer
/// string is no handle, and is not read further).
///
/// # Safety
/// `text` is null or a NUL-terminated string (or readable for `HANDLE_LEN` bytes).
unsafe fn parse_handle(text: *const c_char) -> Result<Handle, c_int> {
    if text.is_null() {
        return Err(libc::EINVAL);
    }
    // SAFETY: `text` is readable up to its NUL or for `HANDLE_LEN` bytes (the caller's
    // contract); strnlen reads no further.
    let n = unsafe { libc::strnlen(text, HANDLE_LEN) };
    if n >= HANDLE_LEN {
        return Err(libc::EINVAL);
    }
    // SAFETY: the `n` bytes before the NUL were just read by strnlen.
    let bytes = unsafe { core::slice::from_raw_parts(text.cast::<u8>(), n) };
    let s = core::str::from_utf8(bytes).map_err(|_| libc::EINVAL)?;
    s.parse::<Handle>().map_err(share_errno)
}

/// A handle's text and NUL, formatted without allocating.
struct HandleText {
    buf: [u8; HANDLE_LEN],
    len: usize,
}

impl core::fmt::Write for HandleText {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        // One byte stays for the NUL.
        let end = self.len + s.len();
        if end >= HANDLE_LEN {
            return Err(core::fmt::Error);
        }
        let to = self.buf.get_mut(self.len..end).ok_or(core::fmt::Error)?;
        to.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// Whether a handle fits in `buf` of `cap` bytes: 0, or the `errno` of `xalloc.h`.
fn check_handle_buffer(buf: *mut c_char, cap: usize) -> c_int {
    if buf.is_null() {
        libc::EINVAL
    } else if cap < HANDLE_LEN {
        libc::ERANGE
    } else {
        0
    }
}

/// Writes `h`'s text and a NUL into `buf`.
///
/// # Safety
/// `buf` is valid for writes of `HANDLE_LEN` bytes (see [`check_handle_buffer`]).
unsafe fn write_handle(h: &Handle, buf: *mut c_char) {
    use core::fmt::Write;
    let mut text = HandleText {
        buf: [0; HANDLE_LEN],
        len: 0,
    };
    // The text of a handle is `Handle::MAX_TEXT` characters, always: this cannot fail (if it
    // did, what was written so far would be written, with its NUL).
    let _ = write!(text, "{h}");
    // SAFETY: `buf` has room for `HANDLE_LEN >= text.len + 1` bytes (the caller's contract;
    // `write_str` keeps one byte of `text.buf` for the NUL, which is 0 already).
    unsafe { core::ptr::copy_nonoverlapping(text.buf.as_ptr(), buf.cast::<u8>(), text.len + 1) };
}

/// `xalloc_shared_new` (see `xalloc.h`).
#[no_mangle]
pub extern "C" fn xalloc_shared_new(len: usize) -> *mut XallocShared {
    new_object(SharedBuf::new(len).map(Shared::Owned))
}

/// `xalloc_shared_data` (see `xalloc.h`).
///
/// # Safety
/// `s` is null or a live object of this library (not closed, not sent).
#[no_mangle]
pub unsafe extern "C" fn xalloc_shared_data(s: *const XallocShared) -> *const c_void {
    // SAFETY: `s` is null or a live object (the caller's contract).
    match unsafe { s.as_ref() }.and_then(|s| s.inner.bytes()) {
        Some((p, _)) => p.cast(),
        None => fail_null::<c_void>(libc::EINVAL).cast_const(),
    }
}

/// `xalloc_shared_writable` (see `xalloc.h`).
///
/// # Safety
/// `s` is null or a live object of this library (not closed, not sent), used by no other
/// call while this one runs.
#[no_mangle]
pub unsafe extern "C" fn xalloc_shared_writable(s: *mut XallocShared) -> *mut c_void {
    // SAFETY: `s` is null or a live object that nothing else uses now (the caller's contract).
    match unsafe { s.as_mut() }.map(|s| &mut s.inner) {
        Some(Shared::Owned(b)) => b.as_mut_ptr().cast(),
        Some(Shared::View(_)) => fail_null(libc::EPERM),
        Some(Shared::Sending) | None => fail_null(libc::EINVAL),
    }
}

/// `xalloc_shared_size` (see `xalloc.h`).
///
/// # Safety
/// `s` is null or a live object of this library (not closed, not sent).
#[no_mangle]
pub unsafe extern "C" fn xalloc_shared_size(s: *const XallocShared) -> usize {
    // SAFETY: `s` is null or a live object (the caller's contract).
    unsafe { s.as_ref() }
        .and_then(|s| s.inner.bytes())
        .map_or(0, |(_, len)| len)
}

/// `xalloc_shared_handle` (see `xalloc.h`).
///
/// # Safety
/// `s` is null or a live object of this library (not closed, not sent); `buf` is null or
/// valid for writes of `cap` bytes.
#[no_mangle]
pub unsafe extern "C" fn xalloc_shared_handle(
    s: *const XallocShared,
    buf: *mut c_char,
    cap: usize,
) -> c_int {
    // SAFETY: `s` is null or a live object (the caller's contract).
    let Some(h) = unsafe { s.as_ref() }.and_then(|s| s.inner.handle()) else {
        return fail(libc::EINVAL);
    };
    match check_handle_buffer(buf, cap) {
        0 => {
            // SAFETY: `buf` is valid for `cap >= HANDLE_LEN` bytes (checked; the caller's
            // contract).
            unsafe { write_handle(&h, buf) };
            0
        }
        e => fail(e),
    }
}

/// `xalloc_shared_open` (see `xalloc.h`).
///
/// # Safety
/// `handle` is null or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn xalloc_shared_open(handle: *const c_char) -> *mut XallocShared {
    // SAFETY: the caller's contract.
    match unsafe { parse_handle(handle) } {
        Ok(h) => {
            // SAFETY: the library hands C only raw pointers to a block's bytes
            // (`xalloc_shared_data` and `xalloc_shared_writable` return `as_ptr`/`as_mut_ptr`,
            // which make no reference), so a buffer and a view of one block in this process
            // never give Rust references to the same bytes at once.
            let view = unsafe { SharedBuf::open_unchecked(h) };
            new_object(view.map(Shared::View))
        }
        Err(e) => fail_null(e),
    }
}

/// `xalloc_shared_close` (see `xalloc.h`).
///
/// # Safety
/// `s` is null or a live object of this library (not closed, not sent), not used after.
#[no_mangle]
pub unsafe extern "C" fn xalloc_shared_close(s: *mut XallocShared) {
    if !s.is_null() {
        // SAFETY: a live object is a box `new_object` made, which nothing uses after this call
        // (the caller's contract); dropping it gives up the buffer or closes the view.
        drop(unsafe { Box::from_raw(s) });
    }
}

/// `xalloc_shared_send` (see `xalloc.h`).
///
/// # Safety
/// `s` is null or a live object of this library (not closed, not sent), used by no other
/// call while this one runs, and not used after this call succeeds; `buf` is null or valid
/// for writes of `cap` bytes.
#[no_mangle]
pub unsafe extern "C" fn xalloc_shared_send(
    s: *mut XallocShared,
    buf: *mut c_char,
    cap: usize,
) -> c_int {
    // SAFETY: `s` is null or a live object that nothing else uses now (the caller's contract).
    let Some(object) = (unsafe { s.as_mut() }) else {
        return fail(libc::EINVAL);
    };
    match check_handle_buffer(buf, cap) {
        0 => {}
        e => return fail(e),
    }
    let b = match core::mem::replace(&mut object.inner, Shared::Sending) {
        Shared::Owned(b) => b,
        other => {
            object.inner = other;
            return fail(libc::EINVAL);
        }
    };
    match b.send() {
        Ok(h) => {
            // SAFETY: `buf` is valid for `cap >= HANDLE_LEN` bytes (checked; the caller's
            // contract).
            unsafe { write_handle(&h, buf) };
            // SAFETY: `s` is a box `new_object` made, which the caller gives up on success;
            // its buffer was sent (`Sending` holds nothing).
            drop(unsafe { Box::from_raw(s) });
            0
        }
        Err((b, e)) => {
            object.inner = Shared::Owned(b);
            fail(share_errno(e))
        }
    }
}

/// `xalloc_shared_receive` (see `xalloc.h`).
///
/// # Safety
/// `handle` is null or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn xalloc_shared_receive(handle: *const c_char) -> *mut XallocShared {
    // SAFETY: the caller's contract.
    match unsafe { parse_handle(handle) } {
        Ok(h) => {
            // SAFETY: as for `open_unchecked` in `xalloc_shared_open`.
            let buf = unsafe { SharedBuf::receive_unchecked(h) };
            new_object(buf.map(Shared::Owned))
        }
        Err(e) => fail_null(e),
    }
}
