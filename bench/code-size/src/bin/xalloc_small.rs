//! xalloc_core::SmallLockedHeap, the configuration for small heaps.
#![no_std]
#![no_main]

xalloc_code_size::firmware!(
    xalloc_core::SmallLockedHeap = xalloc_core::SmallLockedHeap::empty(),
    |mem| {
        // SAFETY: `mem` is the heap's alone.
        unsafe { HEAP.init(mem.as_mut_ptr().cast(), mem.len()) }
    }
);
