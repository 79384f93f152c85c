//! embedded-alloc's `TlsfHeap` (rlsf behind a critical section), as it is.
#![no_std]
#![no_main]

use embedded_alloc::TlsfHeap;

xalloc_code_size::firmware!(TlsfHeap = TlsfHeap::empty(), |mem| {
    // SAFETY: `mem` is the heap's alone.
    unsafe { HEAP.init(mem.as_mut_ptr() as usize, mem.len()) }
});
