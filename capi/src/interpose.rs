//! C's `malloc` family, exported by `libxalloc.so` (the `interpose` feature) so that
//! `LD_PRELOAD=libxalloc.so program`, or linking with `-lxalloc`, sends an unmodified
//! program's large blocks to the daemon.
//!
//! # Why it is safe wherever glibc's malloc is
//!
//! - Small blocks go straight to glibc's own entry points (`__libc_malloc` and the rest, which
//!   glibc exports for interposers), after one comparison with the threshold: nothing of this
//!   library needs initialising first, so calls made before its constructors ran, by the
//!   dynamic linker, by `dlsym` or by other libraries' constructors, work.
//! - The large path never allocates, locks, formats or unwinds (the client's rule), so it
//!   cannot call back into `malloc` from inside it, and `fork()` (whose atfork handlers take
//!   glibc's malloc locks) and C++'s `operator new` (which calls `malloc`) see an ordinary
//!   allocator.
//! - glibc's `malloc_usable_size` has no `__libc_` name; it is looked up in glibc itself
//!   (`dlopen("libc.so.6", RTLD_NOLOAD)`, then `dlsym` on that handle, whatever the load
//!   order and whatever other allocator is loaded) when this library is loaded, which may call
//!   `malloc` (served as above). Until then, and if it is not found, the size of a glibc block
//!   is unknown (0), and `realloc` leaves such a block to glibc's `realloc` rather than move
//!   it.
//! - Like glibc's, these functions are not async-signal-safe.

use core::ffi::{c_int, c_void};
use core::sync::atomic::{AtomicUsize, Ordering};

use xalloc_global::malloc::{MallocError, SystemMalloc};

use crate::{or_errno, set_errno, XALLOC};

extern "C" {
    fn __libc_malloc(size: usize) -> *mut c_void;
    fn __libc_calloc(count: usize, size: usize) -> *mut c_void;
    fn __libc_realloc(ptr: *mut c_void, size: usize) -> *mut c_void;
    fn __libc_memalign(align: usize, size: usize) -> *mut c_void;
    fn __libc_free(ptr: *mut c_void);
}

/// glibc's allocator through the names it keeps for interposers, which this library's own
/// `malloc` does not replace.
#[derive(Clone, Copy, Debug)]
pub struct Glibc;

/// glibc's `malloc_usable_size` and `aligned_alloc`, once looked up by [`find_glibc_own`]
/// (0: not found, or not yet).
static USABLE_SIZE: AtomicUsize = AtomicUsize::new(0);
static ALIGNED_ALLOC: AtomicUsize = AtomicUsize::new(0);

type UsableSize = unsafe extern "C" fn(*mut c_void) -> usize;
type AlignedAlloc = unsafe extern "C" fn(usize, usize) -> *mut c_void;

/// Looks up glibc's own `malloc_usable_size` and `aligned_alloc` (this library exports its
/// own; they have no `__libc_` names), when the library is loaded (an ELF constructor):
/// never on an allocation path, where the dynamic linker's lock could be held by a thread
/// that waits for this one.
extern "C" fn find_glibc_own() {
    // SAFETY: RTLD_NOLOAD only returns a handle of the C library the process has loaded
    // already (every dynamically linked program has); the names are NUL-terminated; dlsym on
    // that handle finds glibc's own definitions, not this library's.
    unsafe {
        let libc = libc::dlopen(c"libc.so.6".as_ptr(), libc::RTLD_NOLOAD | libc::RTLD_LAZY);
        if libc.is_null() {
            return;
        }
        let f = libc::dlsym(libc, c"malloc_usable_size".as_ptr());
        USABLE_SIZE.store(f.addr(), Ordering::Release);
        let f = libc::dlsym(libc, c"aligned_alloc".as_ptr());
        ALIGNED_ALLOC.store(f.addr(), Ordering::Release);
        libc::dlclose(libc);
    }
}

#[used]
#[link_section = ".init_array"]
static FIND_GLIBC_OWN: extern "C" fn() = find_glibc_own;

fn glibc_usable_size() -> Option<UsableSize> {
    let f = USABLE_SIZE.load(Ordering::Acquire);
    // SAFETY: a non-zero `f` is the address of glibc's `malloc_usable_size`, whose C signature
    // is `size_t (void *)`.
    (f != 0).then(|| unsafe { core::mem::transmute::<usize, UsableSize>(f) })
}

// SAFETY: glibc's allocator through its own entry points; none of them calls `malloc` by name,
// so none reaches this library again. `usable_size` is 0 (unknown) until glibc's is found.
unsafe impl SystemMalloc for Glibc {
    fn malloc(&self, size: usize) -> *mut u8 {
        // SAFETY: any size.
        unsafe { __libc_malloc(size).cast() }
    }
    fn calloc(&self, count: usize, size: usize) -> *mut u8 {
        // SAFETY: any sizes; glibc checks the product.
        unsafe { __libc_calloc(count, size).cast() }
    }
    unsafe fn realloc(&self, ptr: *mut u8, size: usize) -> *mut u8 {
        // SAFETY: the caller's contract: null or glibc's block.
        unsafe { __libc_realloc(ptr.cast(), size).cast() }
    }
    fn memalign(&self, align: usize, size: usize) -> *mut u8 {
        // SAFETY: any alignment (glibc rounds it up to a power of two) and size.
        unsafe { __libc_memalign(align, size).cast() }
    }
    unsafe fn free(&self, ptr: *mut u8) {
        // SAFETY: the caller's contract: null or glibc's block, not used after.
        unsafe { __libc_free(ptr.cast()) }
    }
    unsafe fn usable_size(&self, ptr: *mut u8) -> usize {
        match glibc_usable_size() {
            // SAFETY: the caller's contract: null or glibc's block.
            Some(f) => unsafe { f(ptr.cast()) },
            None => 0,
        }
    }
}

/// The page size.
fn page() -> usize {
    static PAGE: AtomicUsize = AtomicUsize::new(0);
    match PAGE.load(Ordering::Relaxed) {
        0 => {
            // SAFETY: sysconf has no preconditions.
            let p = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
                .ok()
                .filter(|p| p.is_power_of_two())
                .unwrap_or(4096);
            PAGE.store(p, Ordering::Relaxed);
            p
        }
        p => p,
    }
}

/// C's `malloc`.
#[no_mangle]
pub extern "C" fn malloc(size: usize) -> *mut c_void {
    if size < XALLOC.threshold() {
        // The small path, with nothing between the program and glibc but this comparison
        // (glibc sets errno itself).
        // SAFETY: any size.
        return unsafe { __libc_malloc(size) };
    }
    malloc_large(size)
}

/// `malloc` of at least the threshold (out of line: the small path saves no register).
#[inline(never)]
fn malloc_large(size: usize) -> *mut c_void {
    or_errno(XALLOC.malloc(size))
}

/// C's `free`.
///
/// # Safety
/// `ptr` is null or a live block of this allocator, not used after.
#[no_mangle]
pub unsafe extern "C" fn free(ptr: *mut c_void) {
    // SAFETY: the caller's contract.
    unsafe { XALLOC.free(ptr.cast()) }
}

/// C's `calloc`.
#[no_mangle]
pub extern "C" fn calloc(count: usize, size: usize) -> *mut c_void {
    if count
        .checked_mul(size)
        .is_some_and(|n| n < XALLOC.threshold())
    {
        // SAFETY: any sizes (as `malloc`'s small path).
        return unsafe { __libc_calloc(count, size) };
    }
    or_errno(XALLOC.calloc(count, size))
}

/// C's `realloc`.
///
/// # Safety
/// `ptr` is null or a live block of this allocator.
#[no_mangle]
pub unsafe extern "C" fn realloc(ptr: *mut c_void, size: usize) -> *mut c_void {
    // SAFETY: the caller's contract.
    or_errno(unsafe { XALLOC.realloc(ptr.cast(), size) })
}

/// `reallocarray` (glibc 2.26, BSD): `realloc(ptr, count * size)`, or null with `ENOMEM` if
/// the product overflows.
///
/// # Safety
/// `ptr` is null or a live block of this allocator.
#[no_mangle]
pub unsafe extern "C" fn reallocarray(ptr: *mut c_void, count: usize, size: usize) -> *mut c_void {
    match count.checked_mul(size) {
        // SAFETY: the caller's contract.
        Some(bytes) => or_errno(unsafe { XALLOC.realloc(ptr.cast(), bytes) }),
        None => or_errno(Err(MallocError::NoMemory)),
    }
}

/// POSIX `posix_memalign`: `align` a power of two and a multiple of `sizeof(void *)`, else
/// `EINVAL`; `ENOMEM` when no memory is left. `errno` is left alone.
///
/// # Safety
/// `out` is valid for a write of a pointer.
#[no_mangle]
pub unsafe extern "C" fn posix_memalign(out: *mut *mut c_void, align: usize, size: usize) -> c_int {
    if !align.is_power_of_two() || !align.is_multiple_of(size_of::<*mut c_void>()) {
        return libc::EINVAL;
    }
    // SAFETY: `__errno_location` is this thread's errno.
    let saved = unsafe { *libc::__errno_location() };
    let r = XALLOC.aligned_alloc(align, size);
    set_errno(saved);
    match r {
        Ok(p) => {
            // SAFETY: the caller's contract.
            unsafe { out.write(p.cast()) };
            0
        }
        Err(MallocError::Invalid) => libc::EINVAL,
        Err(MallocError::NoMemory) => libc::ENOMEM,
    }
}

/// C11's `aligned_alloc`: any size; an alignment that is not a power of two is glibc's own
/// `aligned_alloc`'s to round up or refuse (versions differ: 2.38 refuses), as without this
/// library.
#[no_mangle]
pub extern "C" fn aligned_alloc(align: usize, size: usize) -> *mut c_void {
    if align.is_power_of_two() {
        return or_errno(XALLOC.aligned_alloc(align, size));
    }
    match ALIGNED_ALLOC.load(Ordering::Acquire) {
        0 => Glibc.memalign(align, size).cast(),
        // SAFETY: glibc's `aligned_alloc`, whose C signature is `void *(size_t, size_t)`.
        f => unsafe { core::mem::transmute::<usize, AlignedAlloc>(f)(align, size) },
    }
}

/// `memalign` (obsolete, glibc): an alignment that is not a power of two is rounded up by
/// glibc.
#[no_mangle]
pub extern "C" fn memalign(align: usize, size: usize) -> *mut c_void {
    if align.is_power_of_two() {
        or_errno(XALLOC.aligned_alloc(align, size))
    } else {
        Glibc.memalign(align, size).cast()
    }
}

/// `valloc` (obsolete): page-aligned.
#[no_mangle]
pub extern "C" fn valloc(size: usize) -> *mut c_void {
    or_errno(XALLOC.aligned_alloc(page(), size))
}

/// `pvalloc` (obsolete, glibc): page-aligned, the size rounded up to whole pages (one page
/// for 0).
#[no_mangle]
pub extern "C" fn pvalloc(size: usize) -> *mut c_void {
    let page = page();
    match size.max(1).checked_next_multiple_of(page) {
        Some(bytes) => or_errno(XALLOC.aligned_alloc(page, bytes)),
        None => or_errno(Err(MallocError::NoMemory)),
    }
}

/// glibc's `malloc_usable_size`.
///
/// # Safety
/// `ptr` is null or a live block of this allocator.
#[no_mangle]
pub unsafe extern "C" fn malloc_usable_size(ptr: *mut c_void) -> usize {
    // SAFETY: the caller's contract.
    unsafe { XALLOC.usable_size(ptr.cast()) }
}
