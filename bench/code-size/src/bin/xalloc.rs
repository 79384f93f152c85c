//! xalloc_core::LockedHeap, the default configuration.
#![no_std]
#![no_main]

xalloc_code_size::firmware!(
    xalloc_core::LockedHeap = xalloc_core::LockedHeap::empty(),
    |mem| {
        // SAFETY: `mem` is the heap's alone.
        unsafe { HEAP.init(mem.as_mut_ptr().cast(), mem.len()) }
    }
);
