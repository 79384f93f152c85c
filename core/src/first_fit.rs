//! [`FirstFit`]: the `linked_list_allocator` crate's heap behind [`RegionAllocator`], kept as the
//! reference baseline for tests and benchmarks.
//!
//! Its allocation and free walk a list of holes sorted by address: O(free blocks) per operation.

use core::alloc::Layout;
use core::ptr::NonNull;

use crate::{InvariantError, RegionAllocator, Stats};

/// A first-fit heap over one region (the `linked_list_allocator` crate).
pub struct FirstFit {
    inner: linked_list_allocator::Heap,
    live: usize,
}

impl FirstFit {
    /// A heap with no memory.
    pub const fn empty() -> Self {
        Self {
            inner: linked_list_allocator::Heap::empty(),
            live: 0,
        }
    }

    /// Gives the heap its region. A region smaller than 3 machine words, or a second call,
    /// leaves the heap as it was (the crate would panic).
    ///
    /// # Safety
    /// `start..start + size` is valid for reads and writes for as long as the heap is used and
    /// is not accessed by anything else, except through blocks this heap hands out.
    pub unsafe fn init(&mut self, start: *mut u8, size: usize) {
        if self.inner.size() != 0 || start.is_null() || size < 3 * size_of::<usize>() {
            return;
        }
        // SAFETY: the caller's contract; the size check above satisfies the crate's minimum
        // (between 2 and 3 words depending on alignment), and the heap is still empty.
        unsafe { self.inner.init(start, size) }
    }
}

impl RegionAllocator for FirstFit {
    fn allocate(&mut self, layout: Layout) -> Option<NonNull<u8>> {
        let p = self.inner.allocate_first_fit(layout).ok()?;
        self.live += 1;
        Some(p)
    }

    unsafe fn deallocate(&mut self, ptr: NonNull<u8>, layout: Layout) {
        // SAFETY: forwarded contract.
        unsafe { self.inner.deallocate(ptr, layout) };
        self.live -= 1;
    }

    unsafe fn reallocate(
        &mut self,
        ptr: NonNull<u8>,
        layout: Layout,
        new_size: usize,
    ) -> Option<NonNull<u8>> {
        let new_layout = Layout::from_size_align(new_size, layout.align()).ok()?;
        let new = self.allocate(new_layout)?;
        // SAFETY: two distinct live blocks of at least `layout.size()` and `new_size` bytes.
        unsafe {
            core::ptr::copy_nonoverlapping(ptr.as_ptr(), new.as_ptr(), layout.size().min(new_size));
            self.deallocate(ptr, layout);
        }
        Some(new)
    }

    /// `free_blocks` is not known to the crate and reads 0; `largest_free_bytes` is an upper
    /// bound (all free bytes).
    fn stats(&self) -> Stats {
        Stats {
            region_bytes: self.inner.size(),
            used_bytes: self.inner.used(),
            free_bytes: self.inner.free(),
            largest_free_bytes: self.inner.free(),
            live_blocks: self.live,
            free_blocks: 0,
            quick_list_bytes: 0,
        }
    }

    /// The crate exposes no structure to walk; this checks the byte counters add up.
    fn check_invariants(&self) -> Result<(), InvariantError> {
        if self.inner.used() + self.inner.free() != self.inner.size() {
            return Err(InvariantError {
                what: "used + free != size",
                block: crate::store::NIL,
            });
        }
        Ok(())
    }
}
