//! linked_list_allocator 0.10's `Heap` behind a critical section.
#![no_std]
#![no_main]

use xalloc_code_size::LlaHeap;

xalloc_code_size::firmware!(LlaHeap = LlaHeap::empty(), |mem| {
    // SAFETY: `mem` is the heap's alone.
    unsafe { HEAP.init(mem.as_mut_ptr().cast(), mem.len()) }
});
