//! Helpers shared by the size-bins test files (`size_bins.rs`, `size_bins_attacks.rs`): leaked
//! regions and heaps over them, layouts, a generator, panic messages.
// Each test crate that includes this module uses a part of it.
#![allow(dead_code)]

use std::alloc::Layout;

use xalloc_core::{Heap, InBand, Tlsf};

/// `Layout::from_size_align(size, align)`, which the tests only call with valid values.
pub fn layout(size: usize, align: usize) -> Layout {
    Layout::from_size_align(size, align).unwrap()
}

/// `n` bytes, 16-aligned, leaked (a heap may hand out pointers into it until the test ends).
pub fn region(n: usize) -> (*mut u8, usize) {
    let v: &'static mut [u128] = Box::leak(vec![0u128; n.div_ceil(16)].into_boxed_slice());
    (v.as_mut_ptr().cast(), v.len() * 16)
}

/// A default heap over `n` bytes with `set_compact_above(compact)` and its bins on at `bins` %.
pub fn heap(n: usize, bins: u8, compact: u8) -> Heap {
    heap_of(n, bins, compact)
}

/// [`heap`] for any in-band configuration (`SmallHeap`, tiny ones).
pub fn heap_of<const FL: usize, const SL: usize, const SB: usize>(
    n: usize,
    bins: u8,
    compact: u8,
) -> Tlsf<InBand, FL, SL, SB> {
    let (p, len) = region(n);
    let mut h = Tlsf::<InBand, FL, SL, SB>::empty();
    // SAFETY: the region is leaked, so it outlives the heap, and nothing else uses it.
    unsafe { h.try_init(p, len) }.unwrap();
    h.set_compact_above(compact);
    h.set_size_bins(bins);
    h
}

/// A caught panic's message.
pub fn panic_msg(e: Box<dyn std::any::Any + Send>) -> String {
    e.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| e.downcast_ref::<String>().cloned())
        .unwrap_or_default()
}

/// A small deterministic generator (xorshift), so failures reproduce.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
