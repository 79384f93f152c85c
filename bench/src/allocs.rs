//! Uniform adapters over the allocators under test.

use core::alloc::Layout;
use core::cell::Cell;
use core::ptr::{self, NonNull};
use core::sync::atomic::{AtomicU8, Ordering};

/// The interface the harness replays streams through.
///
/// # Safety (for implementors)
/// `alloc`/`realloc` must return null or a block of at least the requested
/// size and alignment that stays valid until freed.
pub trait BenchAlloc {
    /// Name in the report.
    const NAME: &'static str;
    /// Whether the allocator runs on the caller's region (otherwise it is
    /// the process allocator and `reset` ignores the region).
    const REGION_BASED: bool = true;
    /// A fresh, uninitialised instance.
    fn create() -> Box<Self>;
    /// Forget everything and (re)initialise on `[start, start + size)`.
    /// Returns false if the allocator cannot use a region that small.
    ///
    /// # Safety
    /// The region must be valid for writes and not used by anything else
    /// until the next `reset`; all blocks of the previous incarnation are
    /// abandoned.
    unsafe fn reset(&mut self, start: *mut u8, size: usize) -> bool;
    /// Allocate; null on failure.
    fn alloc(&mut self, layout: Layout) -> *mut u8;
    /// Free a block from `alloc`/`realloc` with exactly this layout.
    ///
    /// # Safety
    /// `p` must be live in this allocator with `layout`.
    unsafe fn dealloc(&mut self, p: *mut u8, layout: Layout);
    /// Resize; the new block has `layout.align()` and `new_size`. Null on
    /// failure, in which case the old block is untouched.
    ///
    /// # Safety
    /// `p` must be live in this allocator with `layout`.
    unsafe fn realloc(&mut self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8;
}

/// Fallback realloc for allocators without one: allocate, copy, free.
///
/// # Safety
/// As [`BenchAlloc::realloc`].
#[inline(always)]
unsafe fn move_realloc<A: BenchAlloc + ?Sized>(
    a: &mut A,
    p: *mut u8,
    layout: Layout,
    new_size: usize,
) -> *mut u8 {
    // SAFETY: align comes from a valid layout; sizes in the streams are small.
    let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
    let q = a.alloc(new_layout);
    if !q.is_null() {
        // SAFETY: both blocks are live, distinct, and at least `min` bytes.
        unsafe {
            ptr::copy_nonoverlapping(p, q, layout.size().min(new_size));
            a.dealloc(p, layout);
        }
    }
    q
}

fn or_null(p: Option<NonNull<u8>>) -> *mut u8 {
    p.map_or(ptr::null_mut(), NonNull::as_ptr)
}

/// The percentage `Xalloc` passes to `Tlsf::set_compact_above` (`--compact-above`).
pub static XALLOC_COMPACT_ABOVE: AtomicU8 = AtomicU8::new(xalloc_core::tlsf::DEFAULT_COMPACT_ABOVE);

/// The percentage `XallocBins` passes to `Tlsf::set_size_bins` (`--size-bins`).
pub static XALLOC_BINS: AtomicU8 = AtomicU8::new(25);

/// `xalloc_core::Heap`, the allocator this benchmark is about: as configured by default, or with
/// its size bins on (`BINS`, see [`XallocBins`]).
pub struct Xalloc<const BINS: bool = false>(xalloc_core::Heap);

/// xalloc with its size bins on (`XALLOC_BINS` %, 25 by default): the setting that trades memory
/// for speed on large blocks.
pub type XallocBins = Xalloc<true>;

impl<const BINS: bool> BenchAlloc for Xalloc<BINS> {
    const NAME: &'static str = if BINS { "xalloc-bins" } else { "xalloc" };
    fn create() -> Box<Self> {
        Box::new(Xalloc(xalloc_core::Heap::empty()))
    }
    unsafe fn reset(&mut self, start: *mut u8, size: usize) -> bool {
        self.0 = xalloc_core::Heap::empty();
        // SAFETY: forwarded from the caller.
        unsafe { self.0.init(start, size) };
        self.0
            .set_compact_above(XALLOC_COMPACT_ABOVE.load(Ordering::Relaxed));
        if BINS {
            self.0.set_size_bins(XALLOC_BINS.load(Ordering::Relaxed));
        }
        true
    }
    #[inline]
    fn alloc(&mut self, layout: Layout) -> *mut u8 {
        or_null(self.0.allocate(layout))
    }
    #[inline]
    unsafe fn dealloc(&mut self, p: *mut u8, layout: Layout) {
        // SAFETY: forwarded from the caller; `p` is non-null since it is live.
        unsafe { self.0.deallocate(NonNull::new_unchecked(p), layout) }
    }
    #[inline]
    unsafe fn realloc(&mut self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded from the caller.
        or_null(unsafe {
            self.0
                .reallocate(NonNull::new_unchecked(p), layout, new_size)
        })
    }
}

/// talc 5 (`Talc<Manual>` with the default binning), realloc = in place if
/// possible, else allocate/copy/free (what its own `GlobalAlloc` does).
pub struct Talc(talc::base::Talc<talc::source::Manual, talc::DefaultBinning>);

impl BenchAlloc for Talc {
    const NAME: &'static str = "talc";
    fn create() -> Box<Self> {
        Box::new(Talc(talc::base::Talc::new(talc::source::Manual)))
    }
    unsafe fn reset(&mut self, start: *mut u8, size: usize) -> bool {
        self.0 = talc::base::Talc::new(talc::source::Manual);
        // SAFETY: forwarded from the caller.
        unsafe { self.0.claim(start, size) }.is_some()
    }
    #[inline]
    fn alloc(&mut self, layout: Layout) -> *mut u8 {
        // SAFETY: stream sizes are never zero.
        or_null(unsafe { self.0.allocate(layout) })
    }
    #[inline]
    unsafe fn dealloc(&mut self, p: *mut u8, layout: Layout) {
        // SAFETY: forwarded from the caller.
        unsafe { self.0.deallocate(p, layout) }
    }
    #[inline]
    unsafe fn realloc(&mut self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded from the caller; new_size is nonzero.
        unsafe {
            if self.0.try_realloc_in_place(p, layout, new_size) {
                p
            } else {
                move_realloc(self, p, layout, new_size)
            }
        }
    }
}

/// rlsf 0.2 `Tlsf<u32, u32, 24, 32>`: 32 second-level classes (like
/// xalloc), max block (32 << 24) - 32 bytes.
pub struct Rlsf(rlsf::Tlsf<'static, u32, u32, 24, 32>);

impl BenchAlloc for Rlsf {
    const NAME: &'static str = "rlsf";
    fn create() -> Box<Self> {
        Box::new(Rlsf(rlsf::Tlsf::new()))
    }
    unsafe fn reset(&mut self, start: *mut u8, size: usize) -> bool {
        self.0 = rlsf::Tlsf::new();
        let Some(start) = NonNull::new(start) else {
            return false;
        };
        let block = NonNull::slice_from_raw_parts(start, size);
        // SAFETY: forwarded from the caller.
        unsafe { self.0.insert_free_block_ptr(block) }.is_some()
    }
    #[inline]
    fn alloc(&mut self, layout: Layout) -> *mut u8 {
        or_null(self.0.allocate(layout))
    }
    #[inline]
    unsafe fn dealloc(&mut self, p: *mut u8, layout: Layout) {
        // SAFETY: forwarded from the caller.
        unsafe { self.0.deallocate(NonNull::new_unchecked(p), layout.align()) }
    }
    #[inline]
    unsafe fn realloc(&mut self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded from the caller.
        unsafe {
            let nl = Layout::from_size_align_unchecked(new_size, layout.align());
            or_null(self.0.reallocate(NonNull::new_unchecked(p), nl))
        }
    }
}

/// linked_list_allocator 0.10 (first fit over an address-ordered hole list;
/// alloc and free are O(holes)); realloc = allocate/copy/free.
pub struct LinkedList(linked_list_allocator::Heap);

impl BenchAlloc for LinkedList {
    const NAME: &'static str = "linked_list_allocator";
    fn create() -> Box<Self> {
        Box::new(LinkedList(linked_list_allocator::Heap::empty()))
    }
    unsafe fn reset(&mut self, start: *mut u8, size: usize) -> bool {
        self.0 = linked_list_allocator::Heap::empty();
        // SAFETY: forwarded from the caller.
        unsafe { self.0.init(start, size) };
        true
    }
    #[inline]
    fn alloc(&mut self, layout: Layout) -> *mut u8 {
        or_null(self.0.allocate_first_fit(layout).ok())
    }
    #[inline]
    unsafe fn dealloc(&mut self, p: *mut u8, layout: Layout) {
        // SAFETY: forwarded from the caller.
        unsafe { self.0.deallocate(NonNull::new_unchecked(p), layout) }
    }
    #[inline]
    unsafe fn realloc(&mut self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded from the caller.
        unsafe { move_realloc(self, p, layout, new_size) }
    }
}

/// buddy_system_allocator `Heap<32>` (power-of-two blocks); realloc =
/// allocate/copy/free.
pub struct Buddy(buddy_system_allocator::Heap<32>);

impl BenchAlloc for Buddy {
    const NAME: &'static str = "buddy_system_allocator";
    fn create() -> Box<Self> {
        Box::new(Buddy(buddy_system_allocator::Heap::new()))
    }
    unsafe fn reset(&mut self, start: *mut u8, size: usize) -> bool {
        self.0 = buddy_system_allocator::Heap::new();
        // SAFETY: forwarded from the caller.
        unsafe { self.0.init(start as usize, size) };
        true
    }
    #[inline]
    fn alloc(&mut self, layout: Layout) -> *mut u8 {
        or_null(self.0.alloc(layout).ok())
    }
    #[inline]
    unsafe fn dealloc(&mut self, p: *mut u8, layout: Layout) {
        // SAFETY: forwarded from the caller.
        unsafe { self.0.dealloc(NonNull::new_unchecked(p), layout) }
    }
    #[inline]
    unsafe fn realloc(&mut self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded from the caller.
        unsafe { move_realloc(self, p, layout, new_size) }
    }
}

/// dlmalloc's system-memory hook over the benchmark region: a greedy bump
/// allocator that hands out everything that is left on the first request
/// and refuses once exhausted (never frees, never remaps).
pub struct RegionSource {
    next: Cell<usize>,
    end: usize,
}

// SAFETY: the source only hands out disjoint parts of the region it was
// given; it never frees or remaps, which the trait allows by returning
// false / null.
unsafe impl dlmalloc::Allocator for RegionSource {
    fn alloc(&self, size: usize) -> (*mut u8, usize, u32) {
        let next = self.next.get();
        let left = self.end - next;
        if left < size {
            return (ptr::null_mut(), 0, 0);
        }
        self.next.set(self.end);
        (next as *mut u8, left, 0)
    }
    fn remap(&self, _ptr: *mut u8, _old: usize, _new: usize, _can_move: bool) -> *mut u8 {
        ptr::null_mut()
    }
    fn free_part(&self, _ptr: *mut u8, _old: usize, _new: usize) -> bool {
        false
    }
    fn free(&self, _ptr: *mut u8, _size: usize) -> bool {
        false
    }
    fn can_release_part(&self, _flags: u32) -> bool {
        false
    }
    fn allocates_zeros(&self) -> bool {
        false
    }
    fn page_size(&self) -> usize {
        4096
    }
}

/// The `dlmalloc` crate (Rust port of Doug Lea's malloc 2.8.6) fed the
/// region through [`RegionSource`]; granularity 4 KiB.
pub struct Dl(dlmalloc::Dlmalloc<RegionSource>);

impl Dl {
    fn over(start: usize, size: usize) -> dlmalloc::Dlmalloc<RegionSource> {
        let mut d = dlmalloc::Dlmalloc::new_with_allocator(RegionSource {
            next: Cell::new(start),
            end: start + size,
        });
        d.set_granularity(4096);
        d
    }
}

impl BenchAlloc for Dl {
    const NAME: &'static str = "dlmalloc";
    fn create() -> Box<Self> {
        Box::new(Dl(Self::over(0, 0)))
    }
    unsafe fn reset(&mut self, start: *mut u8, size: usize) -> bool {
        self.0 = Self::over(start as usize, size);
        true
    }
    #[inline]
    fn alloc(&mut self, layout: Layout) -> *mut u8 {
        // SAFETY: dlmalloc's malloc accepts any size/power-of-two align.
        unsafe { self.0.malloc(layout.size(), layout.align()) }
    }
    #[inline]
    unsafe fn dealloc(&mut self, p: *mut u8, layout: Layout) {
        // SAFETY: forwarded from the caller.
        unsafe { self.0.free(p, layout.size(), layout.align()) }
    }
    #[inline]
    unsafe fn realloc(&mut self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded from the caller.
        unsafe { self.0.realloc(p, layout.size(), layout.align(), new_size) }
    }
}

/// glibc malloc of this process (not region-based). Alignment ≤ 16 uses
/// malloc/realloc, larger uses posix_memalign (+ copy/free on realloc, since
/// glibc realloc only guarantees 16-byte alignment).
///
/// Tuned for a like-for-like comparison with the region allocators, which
/// run on pre-faulted memory: `M_TRIM_THRESHOLD` = 2 GiB (never give the
/// top of the heap back, so later passes reuse faulted pages) and
/// `M_MMAP_THRESHOLD` = 32 MiB, its maximum (every block of these streams
/// comes from the heap instead of a fresh mmap per block).
pub struct Glibc;

/// glibc's malloc alignment on x86_64 / aarch64.
const GLIBC_MIN_ALIGN: usize = 16;

impl BenchAlloc for Glibc {
    const NAME: &'static str = "glibc malloc";
    const REGION_BASED: bool = false;
    fn create() -> Box<Self> {
        // SAFETY: plain libc calls; single-threaded at this point.
        let ok = unsafe {
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1
                && libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20) == 1
        };
        assert!(ok, "mallopt rejected the glibc tuning");
        Box::new(Glibc)
    }
    unsafe fn reset(&mut self, _start: *mut u8, _size: usize) -> bool {
        // Every block of the previous pass was freed by the harness.
        true
    }
    #[inline]
    fn alloc(&mut self, layout: Layout) -> *mut u8 {
        if layout.align() <= GLIBC_MIN_ALIGN {
            // SAFETY: plain libc call.
            unsafe { libc::malloc(layout.size()).cast() }
        } else {
            let mut p = ptr::null_mut();
            // SAFETY: align is a power of two multiple of sizeof(void*).
            let rc = unsafe { libc::posix_memalign(&mut p, layout.align(), layout.size()) };
            if rc == 0 {
                p.cast()
            } else {
                ptr::null_mut()
            }
        }
    }
    #[inline]
    unsafe fn dealloc(&mut self, p: *mut u8, _layout: Layout) {
        // SAFETY: `p` came from malloc/posix_memalign/realloc.
        unsafe { libc::free(p.cast()) }
    }
    #[inline]
    unsafe fn realloc(&mut self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.align() <= GLIBC_MIN_ALIGN {
            // SAFETY: `p` came from malloc/realloc.
            unsafe { libc::realloc(p.cast(), new_size).cast() }
        } else {
            // SAFETY: forwarded from the caller.
            unsafe { move_realloc(self, p, layout, new_size) }
        }
    }
}

/// Peak-tracking view of glibc's footprint: `arena + hblkhd` of mallinfo2
/// (bytes obtained via brk plus bytes in mmapped chunks).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn glibc_footprint() -> usize {
    // SAFETY: plain libc call.
    let mi = unsafe { libc::mallinfo2() };
    mi.arena + mi.hblkhd
}

/// Not available off glibc.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn glibc_footprint() -> usize {
    0
}
