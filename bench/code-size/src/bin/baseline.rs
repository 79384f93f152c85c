//! The baseline: an allocator that does nothing.
#![no_std]
#![no_main]

xalloc_code_size::firmware!(xalloc_code_size::NoHeap = xalloc_code_size::NoHeap, |mem| {
    core::hint::black_box(mem)
});
