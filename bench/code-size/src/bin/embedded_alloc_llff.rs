//! embedded-alloc's `LlffHeap` (linked_list_allocator behind a critical section), as it is.
#![no_std]
#![no_main]

use embedded_alloc::LlffHeap;

xalloc_code_size::firmware!(LlffHeap = LlffHeap::empty(), |mem| {
    // SAFETY: `mem` is the heap's alone.
    unsafe { HEAP.init(mem.as_mut_ptr() as usize, mem.len()) }
});
