//! rlsf's `Tlsf` as its `GlobalTlsf` configures it, behind a critical section.
#![no_std]
#![no_main]

use xalloc_code_size::RlsfHeap;

xalloc_code_size::firmware!(RlsfHeap = RlsfHeap::empty(), |mem| {
    // SAFETY: `mem` is the heap's alone.
    unsafe { HEAP.init(mem.as_mut_ptr().cast(), mem.len()) }
});
