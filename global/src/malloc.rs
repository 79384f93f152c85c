//! [`XallocMalloc`]: the client as C's `malloc` family, where a block is known by its pointer
//! alone (`free(p)` has no size). It is what the C library (`capi/`, `xalloc.h`) and its
//! `LD_PRELOAD` interposer export; it shares every connection, counter and rule with
//! [`XallocGlobal`](crate::XallocGlobal) (one process, one set of daemon connections).
//!
//! - A request of at least the threshold goes to the daemon (alignment as asked, at least
//!   [`MIN_ALIGN`]); a smaller one, or one the daemon does not serve, to the system allocator
//!   `S` ([`SystemMalloc`]).
//! - `free`, `realloc` and `usable_size` tell arena blocks from system blocks by address, in
//!   two comparisons for a pointer below or above every arena; an arena block's length comes
//!   from a table of this process's own (private memory), so a pointer freed twice, or one
//!   into the middle of a block, frees nothing (counted in
//!   [`Counters::bad_frees`](crate::Counters::bad_frees)).
//! - Nothing here allocates, locks, formats or panics, so it can itself be `malloc`.

use core::alloc::Layout;
use core::ptr;

use crate::global::{free_in_arena, maybe_in_arena, owner_of, resize_arena, Config, Owner};

/// The alignment of every block `malloc`, `calloc` and `realloc` return (glibc's on 64-bit
/// Linux: `alignof(max_align_t)`).
pub const MIN_ALIGN: usize = 16;

/// The allocator that serves what the daemon does not: small blocks, and everything when no
/// daemon answers.
///
/// # Safety
/// The methods behave as C's functions of the same names: `malloc`, `calloc`, `realloc` and
/// `memalign` return null or a block of at least the size asked, aligned to at least
/// [`MIN_ALIGN`] (`memalign`: to `align`), that no one else holds; `free` and `usable_size`
/// accept every pointer they returned; the block's bytes up to `usable_size` may be read and
/// written. None of them may call back into the [`XallocMalloc`] that uses it.
pub unsafe trait SystemMalloc: Sync {
    /// C's `malloc`.
    fn malloc(&self, size: usize) -> *mut u8;
    /// C's `calloc`.
    fn calloc(&self, count: usize, size: usize) -> *mut u8;
    /// C's `realloc`.
    ///
    /// # Safety
    /// `ptr` is null or a live block of this allocator.
    unsafe fn realloc(&self, ptr: *mut u8, size: usize) -> *mut u8;
    /// `memalign`: `align` is a power of two.
    fn memalign(&self, align: usize, size: usize) -> *mut u8;
    /// C's `free`.
    ///
    /// # Safety
    /// `ptr` is null or a live block of this allocator, not used after.
    unsafe fn free(&self, ptr: *mut u8);
    /// `malloc_usable_size`, or 0 where it is not known (then `realloc` never moves a block of
    /// this allocator into the arena, which would need to know how many bytes to copy).
    ///
    /// # Safety
    /// `ptr` is null or a live block of this allocator.
    unsafe fn usable_size(&self, ptr: *mut u8) -> usize;
}

/// The process's own `malloc` family, through the names the dynamic linker resolves
/// (glibc's, or whichever allocator the program links or preloads).
#[derive(Clone, Copy, Debug, Default)]
pub struct Libc;

// SAFETY: C's allocator, which keeps C's contract; it does not know `XallocMalloc`, and so never
// calls it (unless the program makes `malloc` call it, which the program must not: use an
// allocator that calls glibc's own entry points then, as the interposer does).
unsafe impl SystemMalloc for Libc {
    fn malloc(&self, size: usize) -> *mut u8 {
        // SAFETY: malloc accepts any size.
        unsafe { libc::malloc(size).cast() }
    }
    fn calloc(&self, count: usize, size: usize) -> *mut u8 {
        // SAFETY: calloc accepts any sizes and checks their product.
        unsafe { libc::calloc(count, size).cast() }
    }
    unsafe fn realloc(&self, ptr: *mut u8, size: usize) -> *mut u8 {
        // SAFETY: the caller's contract: `ptr` is null or malloc's.
        unsafe { libc::realloc(ptr.cast(), size).cast() }
    }
    fn memalign(&self, align: usize, size: usize) -> *mut u8 {
        // SAFETY: memalign accepts any power-of-two alignment and any size.
        unsafe { libc::memalign(align, size).cast() }
    }
    unsafe fn free(&self, ptr: *mut u8) {
        // SAFETY: the caller's contract: `ptr` is null or malloc's, not used after.
        unsafe { libc::free(ptr.cast()) }
    }
    unsafe fn usable_size(&self, ptr: *mut u8) -> usize {
        // SAFETY: the caller's contract: `ptr` is null or malloc's.
        unsafe { libc::malloc_usable_size(ptr.cast()) }
    }
}

/// Why a request of [`XallocMalloc`] returned null, for C's `errno`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MallocError {
    /// No memory (or a size whose computation overflowed): `ENOMEM`.
    NoMemory,
    /// An alignment that is not a power of two, or a pointer that is no block: `EINVAL`.
    Invalid,
}

/// The client as C's `malloc` family: large blocks from the daemon named by `XALLOC_NAME`,
/// everything else from `S`. See the [module documentation](self).
pub struct XallocMalloc<S> {
    config: Config,
    system: S,
}

impl<S: SystemMalloc> XallocMalloc<S> {
    /// Threshold 256 KiB, instance `xalloc` (`XALLOC_THRESHOLD` and `XALLOC_NAME` override
    /// both), small blocks from `system`.
    pub const fn new(system: S) -> Self {
        Self {
            config: Config::new(),
            system,
        }
    }

    /// Forwards requests of at least `bytes` (at least 1; `XALLOC_THRESHOLD` overrides).
    pub const fn with_threshold(self, bytes: usize) -> Self
    where
        S: Copy,
    {
        Self {
            config: self.config.with_threshold(bytes),
            system: self.system,
        }
    }

    /// Talks to the daemon instance `name` (`XALLOC_NAME` overrides).
    pub const fn with_name(self, name: &'static str) -> Self
    where
        S: Copy,
    {
        Self {
            config: self.config.with_name(name),
            system: self.system,
        }
    }

    /// The threshold in effect (after `XALLOC_THRESHOLD`).
    #[inline]
    pub fn threshold(&self) -> usize {
        self.config.threshold()
    }

    /// An arena block, if `size` is large enough and the daemon serves it.
    fn arena(&self, size: usize, align: usize, zeroed: bool) -> Option<*mut u8> {
        if size < self.threshold() {
            return None;
        }
        let layout = Layout::from_size_align(size, align.max(MIN_ALIGN)).ok()?;
        self.config.arena_alloc(layout, zeroed).map(|p| p.as_ptr())
    }

    /// C's `malloc`: a block of `size` bytes (a unique pointer for 0), aligned to
    /// [`MIN_ALIGN`].
    #[inline]
    pub fn malloc(&self, size: usize) -> Result<*mut u8, MallocError> {
        let p = match self.arena(size, MIN_ALIGN, false) {
            Some(p) => p,
            None => self.system.malloc(size),
        };
        non_null(p)
    }

    /// C's `calloc`: `count * size` zeroed bytes; an overflowing product is
    /// [`MallocError::NoMemory`].
    pub fn calloc(&self, count: usize, size: usize) -> Result<*mut u8, MallocError> {
        let bytes = count.checked_mul(size).ok_or(MallocError::NoMemory)?;
        let p = match self.arena(bytes, MIN_ALIGN, true) {
            Some(p) => p,
            None => self.system.calloc(count, size),
        };
        non_null(p)
    }

    /// `aligned_alloc` (also `memalign`, `posix_memalign`): `size` bytes aligned to `align`,
    /// which must be a power of two ([`MallocError::Invalid`] otherwise).
    pub fn aligned_alloc(&self, align: usize, size: usize) -> Result<*mut u8, MallocError> {
        if !align.is_power_of_two() {
            return Err(MallocError::Invalid);
        }
        let p = match self.arena(size, align, false) {
            Some(p) => p,
            None => self.system.memalign(align, size),
        };
        non_null(p)
    }

    /// C's `free`. An arena pointer where no held block starts (a second free, or a pointer
    /// into a block) frees nothing and is counted.
    ///
    /// # Safety
    /// `ptr` is null, or a block this allocator returned (or the system allocator's),
    /// not used after.
    #[inline]
    pub unsafe fn free(&self, ptr: *mut u8) {
        // Null is below every arena: the system's `free` ignores it.
        if maybe_in_arena(ptr) {
            // SAFETY: the caller's contract.
            return unsafe { self.free_maybe_arena(ptr) };
        }
        // SAFETY: not inside any arena, so the system allocator's (the caller's contract).
        unsafe { self.system.free(ptr) }
    }

    /// [`XallocMalloc::free`] of a pointer within the bounds of the arenas (out of line, so
    /// that the path of every other pointer is two comparisons and a jump).
    ///
    /// # Safety
    /// As [`XallocMalloc::free`].
    #[inline(never)]
    unsafe fn free_maybe_arena(&self, ptr: *mut u8) {
        if !free_in_arena(ptr) {
            // SAFETY: not inside any arena, so the system allocator's (the caller's contract).
            unsafe { self.system.free(ptr) }
        }
    }

    /// `malloc_usable_size`: bytes of the block at `ptr` that may be used (0 for null, and for
    /// an arena pointer where no held block starts).
    ///
    /// # Safety
    /// `ptr` is null or a live block of this allocator (or of the system allocator).
    pub unsafe fn usable_size(&self, ptr: *mut u8) -> usize {
        if ptr.is_null() {
            return 0;
        }
        match owner_of(ptr) {
            Owner::Arena(len) => len,
            Owner::Stray => 0,
            // SAFETY: not inside any arena, so the system allocator's (the caller's contract).
            Owner::System => unsafe { self.system.usable_size(ptr) },
        }
    }

    /// C's `realloc`: null `ptr` is `malloc(size)`; size 0 frees `ptr` and returns null
    /// (glibc's behaviour). A block moves between the arena and the system allocator when its
    /// size crosses the threshold; an arena block grows in place when the daemon can, and one
    /// that shrinks to less than half its size gives its tail back. On failure `ptr` is left
    /// as it was.
    ///
    /// # Safety
    /// `ptr` is null, or a live block of this allocator (or of the system allocator); after
    /// success it is not used again (unless it is the pointer returned).
    pub unsafe fn realloc(&self, ptr: *mut u8, size: usize) -> Result<*mut u8, MallocError> {
        if ptr.is_null() {
            return self.malloc(size);
        }
        if size == 0 {
            // SAFETY: the caller's contract.
            unsafe { self.free(ptr) };
            return Ok(ptr::null_mut());
        }
        let threshold = self.threshold();
        match owner_of(ptr) {
            Owner::Stray => Err(MallocError::Invalid),
            Owner::Arena(old) => {
                if size >= threshold {
                    if size <= old {
                        // Fits. A block that shrinks to less than half gives its tail back
                        // (if the daemon cannot, it stays as it is).
                        if size < old / 2 {
                            resize_arena(ptr, old, size);
                        }
                        return Ok(ptr);
                    }
                    if resize_arena(ptr, old, size) {
                        return Ok(ptr);
                    }
                }
                let new = self.malloc(size)?;
                // SAFETY: `ptr` holds `old` bytes, `new` at least `size`; two blocks. Then
                // `ptr` is freed once (the caller's contract).
                unsafe {
                    ptr::copy_nonoverlapping(ptr, new, old.min(size));
                    self.free(ptr);
                }
                Ok(new)
            }
            Owner::System => {
                if size >= threshold {
                    // SAFETY: a system block (the caller's contract).
                    let old = unsafe { self.system.usable_size(ptr) };
                    // 0: unknown, so left to the system allocator.
                    if old != 0 && old < threshold {
                        // Crosses the threshold upwards: into the arena if the daemon serves.
                        if let Some(new) = self.arena(size, MIN_ALIGN, false) {
                            // SAFETY: `old` bytes of `ptr` are usable, `new` holds `size`
                            // (more); two blocks. Then `ptr` is freed once.
                            unsafe {
                                ptr::copy_nonoverlapping(ptr, new, old);
                                self.system.free(ptr);
                            }
                            return Ok(new);
                        }
                    }
                }
                // SAFETY: a system block (the caller's contract).
                non_null(unsafe { self.system.realloc(ptr, size) })
            }
        }
    }

    /// Whether `ptr` points into a daemon's arena (it is, or is inside, a block it served).
    pub fn is_shared(&self, ptr: *const u8) -> bool {
        crate::is_shared(ptr)
    }
}

fn non_null(p: *mut u8) -> Result<*mut u8, MallocError> {
    if p.is_null() {
        Err(MallocError::NoMemory)
    } else {
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    //! Without a daemon (an instance no one runs): every block is the system allocator's, with
    //! C's semantics. The C library's tests (`tests/tests/c_library.rs`) run these paths
    //! against a daemon.
    use super::*;

    static M: XallocMalloc<Libc> = XallocMalloc::new(Libc)
        .with_name("xalloc-unit-test-no-daemon")
        .with_threshold(64 << 10);

    /// `M`, with the environment's overrides of its name and threshold taken away (a shell
    /// that exported `XALLOC_NAME` would give it a daemon), once, before any test uses it.
    fn m() -> &'static XallocMalloc<Libc> {
        static CLEAN: std::sync::Once = std::sync::Once::new();
        CLEAN.call_once(|| {
            std::env::remove_var("XALLOC_NAME");
            std::env::remove_var("XALLOC_THRESHOLD");
        });
        &M
    }

    #[test]
    fn large_blocks_fall_back_to_the_system_allocator_with_their_bytes() {
        let before = crate::counters().fallbacks;
        let p = m().malloc(1 << 20).unwrap();
        assert!(!m().is_shared(p));
        // SAFETY: a fresh block of 1 MiB.
        unsafe {
            assert!(m().usable_size(p) >= 1 << 20);
            p.write_bytes(0x5a, 1 << 20);
            m().free(p);
        }
        assert!(crate::counters().fallbacks > before);
    }

    #[test]
    fn calloc_checks_its_product_and_zeroes() {
        assert_eq!(m().calloc(usize::MAX, 2), Err(MallocError::NoMemory));
        let p = m().calloc(1 << 10, 1 << 10).unwrap();
        // SAFETY: a fresh block of 1 MiB.
        unsafe {
            assert!(core::slice::from_raw_parts(p, 1 << 20)
                .iter()
                .all(|&b| b == 0));
            m().free(p);
        }
    }

    #[test]
    fn aligned_alloc_wants_a_power_of_two() {
        assert_eq!(m().aligned_alloc(24, 100), Err(MallocError::Invalid));
        assert_eq!(m().aligned_alloc(0, 100), Err(MallocError::Invalid));
        for align in [16, 4096, 1 << 21] {
            for size in [1, 100, 1 << 20] {
                let p = m().aligned_alloc(align, size).unwrap();
                assert!(p.addr().is_multiple_of(align), "{align} {size}");
                // SAFETY: a block of this allocator.
                unsafe { m().free(p) };
            }
        }
    }

    #[test]
    fn realloc_keeps_the_bytes_across_the_threshold_and_frees_at_zero() {
        // SAFETY: every pointer is a live block of `M` until freed or reallocated.
        unsafe {
            let p = m().realloc(ptr::null_mut(), 100).unwrap();
            for i in 0..100 {
                p.add(i).write(i as u8);
            }
            let q = m().realloc(p, 4 << 20).unwrap();
            assert!((0..100).all(|i| q.add(i).read() == i as u8));
            let r = m().realloc(q, 50).unwrap();
            assert!((0..50).all(|i| r.add(i).read() == i as u8));
            assert_eq!(m().realloc(r, 0), Ok(ptr::null_mut()));
            m().free(ptr::null_mut());
            assert_eq!(m().usable_size(ptr::null_mut()), 0);
        }
    }
}
