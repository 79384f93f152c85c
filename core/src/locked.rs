//! [`LockedHeap`]: a [`Heap`](crate::Heap) behind a spin lock, for `#[global_allocator]` on bare metal.

use core::alloc::{GlobalAlloc, Layout};
use core::ptr::{self, NonNull};

use crate::store::InBand;
use crate::tlsf::{self, Tlsf};

/// A [`Heap`](crate::Heap) behind a `spin` mutex, implementing [`GlobalAlloc`].
///
/// ```ignore
/// #[global_allocator]
/// static HEAP: LockedHeap = LockedHeap::empty();
///
/// fn main() {
///     // SAFETY: HEAP_MEM is given to the heap alone, before the first allocation.
///     unsafe { HEAP.init(HEAP_MEM.as_mut_ptr(), HEAP_MEM.len()) }
/// }
/// ```
///
/// Out of memory returns null (the `alloc` crate then calls the allocation error handler); an
/// allocation before `init` does the same. The lock is a spin lock: do not allocate from an
/// interrupt handler that may preempt an allocation on the same core.
///
/// `FL` and `SL` choose the heap's size classes as for [`Tlsf`]: the defaults are those of
/// [`Heap`](crate::Heap); [`SmallLockedHeap`] has those of [`SmallHeap`](crate::SmallHeap).
pub struct LockedHeap<const FL: usize = { tlsf::FL }, const SL: usize = { tlsf::SL }>(
    spin::Mutex<Tlsf<InBand, FL, SL>>,
);

/// A [`LockedHeap`] over a [`SmallHeap`](crate::SmallHeap): state under 1 KiB, regions of up
/// to 128 KiB.
pub type SmallLockedHeap = LockedHeap<{ tlsf::SMALL_FL }, { tlsf::SMALL_SL }>;

impl<const FL: usize, const SL: usize> LockedHeap<FL, SL> {
    /// A heap with no memory.
    pub const fn empty() -> Self {
        Self(spin::Mutex::new(Tlsf::<InBand, FL, SL>::empty()))
    }

    /// Gives the heap its memory: see [`Tlsf::init`].
    ///
    /// # Safety
    /// As for [`Tlsf::init`].
    pub unsafe fn init(&self, start: *mut u8, size: usize) {
        // SAFETY: forwarded contract.
        unsafe { self.0.lock().init(start, size) }
    }

    /// Locks the heap, for statistics or to add regions.
    pub fn lock(&self) -> spin::MutexGuard<'_, Tlsf<InBand, FL, SL>> {
        self.0.lock()
    }
}

// SAFETY: every method forwards to `Heap` under the lock, which returns blocks that are aligned,
// large enough and disjoint (the `Heap` contract), or null on failure.
unsafe impl<const FL: usize, const SL: usize> GlobalAlloc for LockedHeap<FL, SL> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.0
            .lock()
            .allocate(layout)
            .map_or(ptr::null_mut(), NonNull::as_ptr)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `GlobalAlloc::dealloc`'s contract: `ptr` came from this allocator with `layout`,
        // so it is non-null and live.
        unsafe {
            self.0
                .lock()
                .deallocate(NonNull::new_unchecked(ptr), layout)
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `GlobalAlloc::realloc`'s contract: `ptr` is a live block of this allocator
        // with `layout`, and `new_size` rounded to the alignment does not overflow.
        unsafe {
            self.0
                .lock()
                .reallocate(NonNull::new_unchecked(ptr), layout, new_size)
                .map_or(ptr::null_mut(), NonNull::as_ptr)
        }
    }
}
