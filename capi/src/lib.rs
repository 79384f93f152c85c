//! The C library of xalloc: the functions of `include/xalloc.h` (`xalloc_malloc` ...), and,
//! with the `interpose` feature, C's `malloc` family itself, for `LD_PRELOAD`.
//!
//! Both are one [`XallocMalloc`]: the same client as `XallocGlobal` (its connections, cache
//! and counters), seen through pointers alone. The root `Makefile` builds `lib/libxalloc.a`
//! without `interpose` (a static link never replaces the program's `malloc`; small blocks come
//! from the program's own `malloc`) and `lib/libxalloc.so` with it (small blocks from glibc's
//! own entry points, `__libc_malloc` and the rest, since `malloc` is this library's).
//!
//! No function here allocates, locks, formats or unwinds: a panic would abort (`extern "C"`),
//! and none is reachable from these paths by design.

use core::ffi::{c_int, c_void};

use xalloc_global::malloc::{MallocError, XallocMalloc};

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
