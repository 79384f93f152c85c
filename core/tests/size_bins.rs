//! The size bins of the TLSF heap (`Tlsf::set_size_bins`): what they promise and what they must
//! never break.
//!
//! - A freed block of 1 KiB or more waits whole in its bin, and the next request of that bin
//!   takes it back; requests are rounded up to the bin sizes while the bins are on.
//! - The rounding never makes a request fail that fits unrounded, and binned blocks never make
//!   an allocation fail (they are merged back first).
//! - The bins hold at most their share of the heap; lowering the share or turning them off
//!   leaves nothing binned; `trim` empties them.
//! - A free of a binned block's pointer a second time is caught in debug builds.
//! - Heaps that cannot have bins (`SmallHeap`, `OobHeap`, `small-code`) ignore the setting.
//! - Random allocation, reallocation and free with the bins on keep the invariants, the
//!   contents of every block and the "never fails while a fitting block exists" guarantee.

use std::alloc::Layout;
use std::collections::BTreeMap;
use std::ptr::NonNull;

use xalloc_core::tlsf::DEFAULT_COMPACT_ABOVE;
use xalloc_core::{Heap, SmallHeap};

mod common;
use common::{heap_of, layout, Rng};

/// A default heap over `n` bytes with its bins on at `bins` % and its quick lists open always.
fn heap(n: usize, bins: u8) -> Heap {
    common::heap(n, bins, 100)
}

/// Whether the bins can exist in this build (`small-code` compiles them out with the quick
/// lists).
const BINS: bool = cfg!(not(feature = "small-code"));

#[test]
fn a_freed_large_block_serves_the_next_request_of_its_bin() {
    let mut h = heap(4 << 20, 25);
    let _guard = h.allocate(layout(100, 8)).unwrap();
    let l = layout(5000, 8);
    let p = h.allocate(l).unwrap();
    let _after = h.allocate(layout(100, 8)).unwrap();
    let used = h.stats().used_bytes;
    // SAFETY: `p` came from `h` with `l` and is freed once.
    unsafe { h.deallocate(p, l) };
    h.check_invariants().unwrap();
    if !BINS {
        assert_eq!(h.stats().quick_list_bytes, 0);
        return;
    }
    // 5000 bytes + the 8-byte header round up to 5120 (1.25 × 4 KiB), so the block is binned
    // whole: used bytes drop by its size, and the bins hold exactly that.
    let s = h.stats();
    assert_eq!(s.quick_list_bytes, 5120);
    assert_eq!(used - s.used_bytes, 5120);
    // Any request of the same bin (4097..=5120 bytes with the header) takes it back.
    let l2 = layout(4200, 16);
    let q = h.allocate(l2).unwrap();
    assert_eq!(q, p, "the binned block is reused");
    assert_eq!(h.stats().quick_list_bytes, 0);
    h.check_invariants().unwrap();
    // SAFETY: `q` came from `h` with `l2` and is freed once.
    unsafe { h.deallocate(q, l2) };
    h.trim();
    h.check_invariants().unwrap();
    assert_eq!(h.stats().quick_list_bytes, 0);
}

#[test]
fn requests_are_rounded_up_to_bin_sizes_and_blocks_stay_usable() {
    let mut h = heap(8 << 20, 25);
    // Bin sizes from 1 KiB: 1, 1.25, 1.5, 1.75, 2 KiB, then 2.5, 3, 3.5, 4 KiB and so on.
    for (size, block) in [
        (1016usize, 1024usize),
        (1017, 1280),
        (1272, 1280),
        (1273, 1536),
        (2041, 2560),
        (100_000, 114_688),
        (1 << 20, 1_310_720),
    ] {
        let before = h.stats().used_bytes;
        let l = layout(size, 8);
        let p = h.allocate(l).unwrap();
        let grew = h.stats().used_bytes - before;
        let expected = if BINS {
            block
        } else {
            (size + 8).next_multiple_of(16)
        };
        assert_eq!(grew, expected, "a request of {size} bytes");
        // SAFETY: the block holds at least `size` bytes.
        unsafe { p.as_ptr().write_bytes(0xa5, size) };
        h.check_invariants().unwrap();
    }
}

// `small-code` has no bins, and its `largest_free_bytes` is a class bound, not exact.
#[cfg(not(feature = "small-code"))]
#[test]
fn rounding_never_makes_a_fitting_request_fail() {
    // A heap whose one free block fits the request exactly but not the request rounded up.
    let mut h = heap(64 << 10, 100);
    let initial = h.stats();
    let total = initial.largest_free_bytes;
    let pad = h.allocate(layout(total - 5000 - 8, 8)).unwrap();
    h.check_invariants().unwrap();
    let free = h.stats().largest_free_bytes;
    assert!((5000..5120).contains(&free), "{free}");
    // `free` bytes fit, though `free` rounds up to a 5 KiB - 8 bin.
    let p = h
        .allocate(layout(free, 8))
        .expect("the request fits unrounded");
    h.check_invariants().unwrap();
    // SAFETY: both came from `h` with these layouts and are freed once.
    unsafe {
        h.deallocate(p, layout(free, 8));
        h.deallocate(pad, layout(total - 5000 - 8, 8));
    }
    h.trim();
    assert_eq!(h.stats(), initial);
}

#[test]
fn binned_blocks_never_make_an_allocation_fail() {
    let mut h = heap(1 << 20, 100);
    let total = h.stats().largest_free_bytes;
    // Fill the heap with blocks of many bins, free them all: they wait in the bins (100 %).
    let mut live = Vec::new();
    let mut size = 1500;
    while let Some(p) = h.allocate(layout(size, 8)) {
        live.push((p, layout(size, 8)));
        size = size * 5 / 4 % 60_000 + 1100;
    }
    for (p, l) in live {
        // SAFETY: each came from `h` with its layout and is freed once.
        unsafe { h.deallocate(p, l) };
    }
    h.check_invariants().unwrap();
    if BINS {
        assert!(h.stats().quick_list_bytes > total / 2);
    }
    // The whole heap in one block: only possible once the bins are merged back.
    let whole = layout(total, 16);
    let p = h
        .allocate(whole)
        .expect("binned blocks are merged back first");
    h.check_invariants().unwrap();
    assert_eq!(h.stats().quick_list_bytes, 0);
    // SAFETY: `p` came from `h` with `whole` and is freed once.
    unsafe { h.deallocate(p, whole) };
}

#[test]
fn bins_hold_at_most_their_share_and_lowering_it_empties_them() {
    let mut h = heap(4 << 20, 10);
    let region = h.stats().region_bytes;
    let l = layout(40 << 10, 8);
    let blocks: Vec<_> = (0..40).map(|_| h.allocate(l).unwrap()).collect();
    for p in blocks {
        // SAFETY: each came from `h` with `l` and is freed once.
        unsafe { h.deallocate(p, l) };
        h.check_invariants().unwrap();
        assert!(h.stats().quick_list_bytes <= region / 10);
    }
    if BINS {
        // 10 % of 4 MiB holds nine of the 40 KiB blocks.
        assert!(h.stats().quick_list_bytes > region / 10 - (40 << 10));
    }
    h.set_size_bins(5);
    assert_eq!(
        h.stats().quick_list_bytes,
        0,
        "lowering the share empties the bins"
    );
    h.check_invariants().unwrap();
    assert_eq!(h.size_bins(), if BINS { 5 } else { 0 });
    let p = h.allocate(l).unwrap();
    // SAFETY: `p` came from `h` with `l` and is freed once.
    unsafe { h.deallocate(p, l) };
    h.set_size_bins(0);
    assert_eq!(
        h.stats().quick_list_bytes,
        0,
        "turning them off empties the bins"
    );
    assert_eq!(h.stats().live_blocks, 0);
    h.check_invariants().unwrap();
    // Off: freed blocks are merged at once.
    let p = h.allocate(l).unwrap();
    // SAFETY: as above.
    unsafe { h.deallocate(p, l) };
    assert_eq!(h.stats().quick_list_bytes, 0);
    assert_eq!(h.stats().free_blocks, 1);
}

#[test]
fn bins_take_nothing_above_the_quick_lists_threshold_but_still_serve() {
    let mut h = common::heap(1 << 20, 50, DEFAULT_COMPACT_ABOVE);
    let l = layout(20 << 10, 8);
    let a = h.allocate(l).unwrap();
    // SAFETY: `a` came from `h` with `l` and is freed once.
    unsafe { h.deallocate(a, l) };
    let binned = h.stats().quick_list_bytes;
    assert_eq!(binned > 0, BINS, "binned below 60 % full");
    // Fill past 60 %: a free now goes to the free lists.
    let big = layout(700 << 10, 8);
    let fill = h.allocate(big).unwrap();
    let b = h.allocate(l).unwrap();
    assert_eq!(
        b == a,
        BINS,
        "the binned block serves its bin above the threshold too"
    );
    let c = h.allocate(l).unwrap();
    // SAFETY: each came from `h` with its layout and is freed once.
    unsafe { h.deallocate(c, l) };
    assert_eq!(
        h.stats().quick_list_bytes,
        0,
        "nothing binned above the threshold"
    );
    h.check_invariants().unwrap();
    // SAFETY: as above.
    unsafe {
        h.deallocate(b, l);
        h.deallocate(fill, big);
    }
    h.check_invariants().unwrap();
}

#[test]
fn reallocating_a_rounded_block_keeps_its_bytes() {
    let mut h = heap(4 << 20, 25);
    let l = layout(3000, 8);
    let p = h.allocate(l).unwrap();
    // SAFETY: the block holds 3000 bytes.
    unsafe { p.as_ptr().write_bytes(7, 3000) };
    // Shrink, grow within the rounding, grow past it.
    let mut cur = (p, l);
    for new in [2000usize, 3500, 9000, 1500] {
        // SAFETY: `cur` came from `h` with its layout and is live.
        let q = unsafe { h.reallocate(cur.0, cur.1, new) }.unwrap();
        let kept = cur.1.size().min(new);
        // SAFETY: `q` holds `new >= kept` bytes, the first `kept` of them carried over.
        let bytes = unsafe { std::slice::from_raw_parts(q.as_ptr(), kept) };
        assert!(
            bytes.iter().all(|&b| b == 7),
            "reallocate to {new} lost bytes"
        );
        // SAFETY: `q` holds `new` bytes.
        unsafe { q.as_ptr().write_bytes(7, new) };
        cur = (q, layout(new, 8));
        h.check_invariants().unwrap();
    }
    // SAFETY: `cur` came from `h` with its layout and is freed once.
    unsafe { h.deallocate(cur.0, cur.1) };
    h.trim();
    h.check_invariants().unwrap();
    assert_eq!(h.stats().live_blocks, 0);
}

/// A binned block is "used" in its header, so only the bin tells a second free of it.
#[test]
#[cfg(all(debug_assertions, not(feature = "small-code")))]
fn double_free_of_a_binned_block_is_caught_in_debug_builds() {
    let mut h = heap(1 << 20, 25);
    let l = layout(10_000, 8);
    let p = h.allocate(l).unwrap();
    // SAFETY: `p` came from `h` with `l` and is freed once here.
    unsafe { h.deallocate(p, l) };
    assert!(h.stats().quick_list_bytes > 0);
    let second = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: none: this second free breaks `deallocate`'s contract on purpose; a debug
        // build must panic before it changes anything.
        unsafe { h.deallocate(p, l) }
    }));
    let msg = common::panic_msg(second.expect_err("a double free of a binned block must panic"));
    assert!(msg.contains("double free"), "{msg}");
    h.check_invariants().unwrap();
}

#[test]
fn heaps_without_bins_ignore_the_setting() {
    let mut h: SmallHeap = heap_of(256 << 10, 100, DEFAULT_COMPACT_ABOVE);
    let l = layout(5000, 8);
    let before = h.stats().used_bytes;
    let a = h.allocate(l).unwrap();
    assert_eq!(h.stats().used_bytes - before, 5008, "no rounding");
    // SAFETY: `a` came from `h` with `l` and is freed once.
    unsafe { h.deallocate(a, l) };
    assert_eq!(h.stats().quick_list_bytes, 0);
    h.check_invariants().unwrap();
}

#[test]
fn random_operations_with_bins_keep_every_guarantee() {
    for seed in 1..=12u64 {
        let bins = [5u8, 25, 100][seed as usize % 3];
        let mut h = heap(2 << 20, bins);
        h.set_compact_above([25u8, 60, 100][seed as usize % 3]);
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let mut live: BTreeMap<usize, (NonNull<u8>, Layout, u8)> = BTreeMap::new();
        for step in 0..3000u32 {
            let roll = rng.below(10);
            if roll < 5 || live.is_empty() {
                let size = match rng.below(4) {
                    0 => 1 + rng.below(1024) as usize,
                    _ => 1000 + rng.below(200_000) as usize,
                };
                let l = layout(size, 1 << rng.below(8));
                let largest = h.stats().largest_free_bytes;
                match h.allocate(l) {
                    Some(p) => {
                        let tag = step as u8;
                        // SAFETY: the block holds `size` bytes.
                        unsafe { p.as_ptr().write_bytes(tag, size) };
                        live.insert(p.as_ptr().addr(), (p, l, tag));
                    }
                    None => {
                        // Nothing fits even after the lists were merged back.
                        h.trim();
                        assert!(
                            l.align() > 16 || size > h.stats().largest_free_bytes,
                            "seed {seed} step {step}: {l:?} refused, largest free {largest}"
                        );
                    }
                }
            } else {
                let key = *live
                    .keys()
                    .nth(rng.below(live.len() as u64) as usize)
                    .unwrap();
                let (p, l, tag) = live.remove(&key).unwrap();
                // SAFETY: live block of `l.size()` bytes, all written with `tag`.
                let bytes = unsafe { std::slice::from_raw_parts(p.as_ptr(), l.size()) };
                assert!(
                    bytes.iter().all(|&b| b == tag),
                    "seed {seed}: block corrupted"
                );
                if roll < 7 {
                    let new = 1 + rng.below(150_000) as usize;
                    // SAFETY: `p` came from `h` with `l` and is live.
                    match unsafe { h.reallocate(p, l, new) } {
                        Some(q) => {
                            let kept = l.size().min(new);
                            // SAFETY: `q` holds `new` bytes, the first `kept` carried over.
                            let b = unsafe { std::slice::from_raw_parts(q.as_ptr(), kept) };
                            assert!(
                                b.iter().all(|&x| x == tag),
                                "seed {seed}: realloc lost bytes"
                            );
                            // SAFETY: as above.
                            unsafe { q.as_ptr().write_bytes(tag, new) };
                            live.insert(q.as_ptr().addr(), (q, layout(new, l.align()), tag));
                        }
                        None => {
                            live.insert(key, (p, l, tag));
                        }
                    }
                } else {
                    // SAFETY: `p` came from `h` with `l` and is freed once.
                    unsafe { h.deallocate(p, l) };
                }
            }
            if step % 50 == 0 {
                h.check_invariants()
                    .unwrap_or_else(|e| panic!("seed {seed} step {step}: {e}"));
            }
        }
        for (_, (p, l, _)) in live {
            // SAFETY: each came from `h` with its layout and is freed once.
            unsafe { h.deallocate(p, l) };
        }
        h.trim();
        h.check_invariants().unwrap();
        let s = h.stats();
        assert_eq!(
            (s.live_blocks, s.free_blocks, s.quick_list_bytes),
            (0, 1, 0)
        );
    }
}
