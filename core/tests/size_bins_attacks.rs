//! Edge cases of the size bins of the TLSF heap (`Tlsf::set_size_bins`): the rounding's
//! boundaries, blocks the rounding does not touch, odd configurations and settings changed while
//! blocks are binned.
//!
//! - Requests of 64 granules or more are rounded to exactly the bin sizes of an independent
//!   model; while the heap places blocks low (`set_compact_above(0)`) none is rounded, on either
//!   side of 1 KiB.
//! - A block the rounding does not touch (over 1 MiB, or aligned past 1 KiB), once binned, serves
//!   the same request again.
//! - A bin hit honours every alignment, and its pointer is usable for the whole request, also
//!   when the block was freed through a pointer that reaches only its old layout (under Miri,
//!   with Stacked Borrows and with Tree Borrows).
//! - Requests near or past the largest block, up to `isize::MAX`, fail or fit without overflow
//!   while blocks are binned; configurations whose bins end above or below their largest block,
//!   and `SmallHeap`'s, keep every guarantee.
//! - Changing the share or `compact_above`, or adding a region, while blocks are binned keeps the
//!   invariants and the counters; lowering the share leaves the quick lists alone.
//! - Debug builds catch a free with too small a layout while the bins are off, and a second free
//!   of a binned block also when the bins are full.
//! - Blocks larger than their layout (rounded up, or taken from a bin) reallocate, in place, moved
//!   or compacted, keeping their contents.
//! - Random allocation, reallocation and free, with the settings changing and (without
//!   `small-code`) a region added mid-run, keep the invariants, every counter, the contents of
//!   every block and the bounds on the memory used and listed, checked at every step.
//!
//! Run with and without `--features small-code`. `SIZE_BINS_SEEDS=N` runs more random seeds;
//! `SIZE_BINS_VERBOSE` prints what each random run listed.

use std::alloc::Layout;
use std::collections::{BTreeMap, BTreeSet};
#[cfg(all(debug_assertions, not(feature = "small-code")))]
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr::NonNull;

use xalloc_core::tlsf;
use xalloc_core::{Heap, InBand, SmallHeap, Tlsf};

mod common;
use common::{heap, heap_of, layout, region, Rng};

/// Whether the bins can exist in this build (`small-code` compiles them out).
const BINS: bool = cfg!(not(feature = "small-code"));

/// Bins per power of two, measured: what a 65-granule request rounds up to (80 granules with
/// four bins per power of two, 72 with eight). 0 where there are no bins.
fn bins_per_octave() -> usize {
    let mut h = heap(1 << 20, 25, 100);
    let before = h.stats().used_bytes;
    let _p = h.allocate(layout(65 * 16 - 8, 8)).unwrap();
    match (h.stats().used_bytes - before) / 16 {
        80 => 4,
        72 => 8,
        76 => 16,
        65 => 0,
        g => panic!("65 granules rounded to {g}"),
    }
}

/// The block size in granules a request of `g >= 64` granules is rounded to, with `per` bins
/// per power of two: the smallest of `{per + 1, ..., 2 per} << e` at or above `g`
/// (independent model of `bin_up`).
fn model_bin_up_per(g: usize, per: usize) -> usize {
    let mut best = usize::MAX;
    for e in 0..40 {
        for c in per + 1..=2 * per {
            let s = c << e;
            if s >= g && s >= 64 && s < best {
                best = s;
            }
        }
    }
    best
}

/// [`model_bin_up_per`] with four bins per power of two (the default heap's).
fn model_bin_up(g: usize) -> usize {
    model_bin_up_per(g, 4)
}

/// The granules a request of `size` bytes needs: payload and 8-byte header, rounded up to 16.
fn granules(size: usize) -> usize {
    ((size + 8 + 15) >> 4).max(1)
}

// ------------------------------------------------------------------------------------------
// Rounding.

/// Every request from 64 granules up to ~1 MiB, at align 16 and 256, is rounded to exactly the
/// model's bin size, and the payload is usable.
#[test]
fn rounding_matches_an_independent_model() {
    let per = bins_per_octave();
    if !BINS || per == 0 {
        return;
    }
    let mut h = heap(8 << 20, 25, 100);
    let mut sizes: Vec<usize> = Vec::new();
    for g in 64..600 {
        sizes.push(g * 16 - 8);
        sizes.push(g * 16 - 23);
    }
    let mut g = 600usize;
    while g * 16 <= 1 << 20 {
        sizes.push(g * 16 - 8);
        sizes.push(g * 16 - 7);
        g = g * 9 / 8 + 1;
    }
    sizes.push(1 << 20);
    for &size in &sizes {
        for align in [16usize, 256] {
            let before = h.stats().used_bytes;
            let l = layout(size, align);
            let p = h.allocate(l).unwrap();
            let grew = h.stats().used_bytes - before;
            assert_eq!(
                grew,
                model_bin_up_per(granules(size), per) * 16,
                "size {size} align {align} ({per} bins per power of two)"
            );
            assert_eq!(p.as_ptr().addr() % align, 0);
            // SAFETY: the block holds `size` bytes.
            unsafe { p.as_ptr().write_bytes(0x5a, size) };
            // SAFETY: `p` came from `h` with `l` and is freed once.
            unsafe { h.deallocate(p, l) };
            h.trim();
        }
    }
    h.check_invariants().unwrap();
}

/// A request of 1017-1023 bytes (65 granules, under 1 KiB, so on `allocate`'s inline path at any
/// fullness) is not rounded up to a bin while the heap places blocks low
/// (`set_compact_above(0)`).
#[test]
fn no_rounding_while_placing_low() {
    let mut h = heap(1 << 20, 25, 0);
    let before = h.stats().used_bytes;
    let l = layout(1020, 8);
    let _p = h.allocate(l).unwrap();
    let grew = h.stats().used_bytes - before;
    assert_eq!(grew, 65 * 16, "1020 bytes rounded up while placing low");
}

/// While the heap places blocks low, requests of 1023 and 1024 bytes (both 65 granules, on
/// either side of 1 KiB) take the same 65 granules: neither is rounded.
#[test]
fn rounding_is_consistent_across_the_1024_byte_boundary_when_placing_low() {
    let mut h = heap(1 << 20, 25, 0);
    let b0 = h.stats().used_bytes;
    let _a = h.allocate(layout(1024, 8)).unwrap();
    let b1 = h.stats().used_bytes;
    let _b = h.allocate(layout(1023, 8)).unwrap();
    let b2 = h.stats().used_bytes;
    // 1024 bytes: 65 granules unrounded (slow path); 1023: also 65 granules.
    assert_eq!(b1 - b0, 65 * 16);
    assert_eq!(b2 - b1, 65 * 16, "1023 bytes rounded, 1024 not");
}

// ------------------------------------------------------------------------------------------
// Bin reuse for requests the rounding does not touch.

/// A block over 1 MiB (past the fast path), once binned, serves the same request again: the
/// request looks in the bin its block is freed to, so no binned block waits, unmerged and counted
/// against the budget, in a bin that its own size never hits.
#[test]
fn an_unrounded_large_block_serves_the_same_request_again() {
    if !BINS {
        return;
    }
    let mut h = heap(32 << 20, 50, 100);
    let l = layout(2_000_000, 8);
    let _g0 = h.allocate(layout(100, 8)).unwrap();
    let p = h.allocate(l).unwrap();
    let _g1 = h.allocate(layout(100, 8)).unwrap();
    // SAFETY: `p` came from `h` with `l` and is freed once.
    unsafe { h.deallocate(p, l) };
    assert!(h.stats().quick_list_bytes > 0, "binned");
    let q = h.allocate(l).unwrap();
    assert_eq!(
        h.stats().quick_list_bytes,
        0,
        "the same 2 MB request did not take the binned 2 MB block (got {q:p}, binned {p:p})"
    );
}

/// The same for a request aligned past 1 KiB (also past the fast path): its block, once binned,
/// serves the same request again.
#[test]
fn an_unrounded_over_aligned_block_serves_the_same_request_again() {
    if !BINS {
        return;
    }
    let mut h = heap(4 << 20, 50, 100);
    let l = layout(5000, 4096);
    let _g0 = h.allocate(layout(100, 8)).unwrap();
    let p = h.allocate(l).unwrap();
    let _g1 = h.allocate(layout(100, 8)).unwrap();
    // SAFETY: `p` came from `h` with `l` and is freed once.
    unsafe { h.deallocate(p, l) };
    assert!(h.stats().quick_list_bytes > 0, "binned");
    let _q = h.allocate(l).unwrap();
    assert_eq!(
        h.stats().quick_list_bytes,
        0,
        "the same (5000, 4096) request did not take the binned block"
    );
}

// ------------------------------------------------------------------------------------------
// Alignment of a bin hit.

/// A request that its bin serves gets a block at its alignment, from 32 bytes to 64 KiB, and the
/// invariants hold after each allocation and free.
#[test]
fn a_bin_hit_honours_every_alignment() {
    let mut h = heap(8 << 20, 100, 100);
    // Blocks of one bin at various addresses, all freed into the bin.
    let l = layout(5000, 16);
    let blocks: Vec<_> = (0..16).map(|_| h.allocate(l).unwrap()).collect();
    let _guard = h.allocate(layout(100, 8)).unwrap();
    for &p in &blocks {
        // SAFETY: each came from `h` with `l` and is freed once.
        unsafe { h.deallocate(p, l) };
    }
    for align in [32usize, 64, 256, 1024, 2048, 4096, 1 << 16] {
        let la = layout(4500, align);
        let p = h.allocate(la).unwrap();
        assert_eq!(p.as_ptr().addr() % align, 0, "align {align}");
        // SAFETY: the block holds 4500 bytes.
        unsafe { p.as_ptr().write_bytes(1, 4500) };
        h.check_invariants().unwrap();
        // SAFETY: `p` came from `h` with `la` and is freed once.
        unsafe { h.deallocate(p, la) };
        h.check_invariants().unwrap();
    }
}

// ------------------------------------------------------------------------------------------
// Boundaries and overflow.

/// While a block is binned, requests near or past the largest block, up to `isize::MAX`, at
/// alignments up to 4 KiB, fail (those over 1 MiB) or fit, without overflow; reallocating a live
/// block to an impossible size fails and keeps it.
#[test]
fn huge_requests_with_blocks_binned_do_not_overflow() {
    let mut h = heap(1 << 20, 100, 100);
    let l = layout(5000, 8);
    let p = h.allocate(l).unwrap();
    // SAFETY: `p` came from `h` with `l` and is freed once.
    unsafe { h.deallocate(p, l) };
    let max = Heap::MAX_BLOCK_GRANULES as usize;
    for size in [
        max * 16 - 8,
        max * 16 - 7,
        max * 16 + 100,
        (max + 1) * 16 - 8,
        usize::MAX / 4,
        isize::MAX as usize - 8191,
        (1 << 20) + 1,
        (1 << 20) - 7,
    ] {
        for align in [1usize, 16, 1024, 4096] {
            let Ok(l) = Layout::from_size_align(size, align) else {
                continue;
            };
            let r = h.allocate(l);
            if size > (1 << 20) {
                assert!(r.is_none(), "{size}");
            } else if let Some(q) = r {
                // SAFETY: `q` came from `h` with `l` and is freed once.
                unsafe { h.deallocate(q, l) };
            }
            h.check_invariants().unwrap();
        }
    }
    // A binned block is kept while reallocation asks the impossible.
    let l = layout(5000, 8);
    let p = h.allocate(l).unwrap();
    for new in [max * 16, usize::MAX / 2, isize::MAX as usize] {
        // SAFETY: `p` came from `h` with `l` and is live: a failed reallocation keeps it.
        assert!(unsafe { h.reallocate(p, l, new) }.is_none());
        h.check_invariants().unwrap();
    }
    // SAFETY: `p` came from `h` with `l` and is freed once.
    unsafe { h.deallocate(p, l) };
    h.trim();
    h.check_invariants().unwrap();
    assert_eq!(h.stats().live_blocks, 0);
}

/// Random operations keep every guarantee in a configuration whose largest block (63 granules)
/// lies below the top bin it can round to (64), in ones whose bins end below their largest blocks
/// (bin `k >= SB`), and with `SmallHeap`'s classes and bins.
#[test]
fn odd_configurations_with_bins() {
    let n = std::env::var("SIZE_BINS_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1u64);
    for i in 0..n {
        let s = i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        random_ops::<4, 8, 64>(1, 3 << 10, 0x1234 ^ s, 1500, None);
        random_ops::<20, 8, 8>(2, 1 << 20, 0x5678 ^ s, 1500, None);
        random_ops::<{ tlsf::SMALL_FL }, { tlsf::SMALL_SL }, 64>(
            3,
            200 << 10,
            0x9abc ^ s,
            1500,
            None,
        );
        random_ops::<{ tlsf::FL }, 8, 3>(4, 1 << 20, 0xdef0 ^ s, 1500, None);
    }
}

/// Every request up to the largest block of a tiny configuration, whose bin sizes exceed it,
/// fits, and leaves the heap as it was once freed and trimmed. (`small-code` has no bins, and
/// its good fit refuses requests above half the largest block.)
#[test]
#[cfg(not(feature = "small-code"))]
fn request_rounding_past_the_largest_block() {
    type T = Tlsf<InBand, 4, 8, 64>;
    let max = T::MAX_BLOCK_GRANULES as usize;
    assert_eq!(max, 63);
    let mut h: T = heap_of(max * 16 + 64, 100, 100);
    let s0 = h.stats();
    for g in 8..=max {
        let l = layout(g * 16 - 8, 8);
        let p = h.allocate(l).unwrap_or_else(|| panic!("{g} granules fit"));
        // SAFETY: the block holds `l.size()` bytes.
        unsafe { p.as_ptr().write_bytes(3, l.size()) };
        // SAFETY: `p` came from `h` with `l` and is freed once.
        unsafe { h.deallocate(p, l) };
        h.check_invariants().unwrap();
        h.trim();
    }
    assert_eq!(h.stats(), s0);
}

// ------------------------------------------------------------------------------------------
// Settings.

/// The share raised, lowered and zeroed, `compact_above` changed while blocks are binned, and a
/// region added after `set_size_bins`: the invariants and counters hold throughout, and nothing
/// is binned at `set_compact_above(0)` or past the share.
#[test]
fn settings_changes_while_binned() {
    if !BINS {
        return;
    }
    let (p0, len0) = region(256 << 10);
    let mut h = Heap::empty();
    h.set_size_bins(200); // above 100 before init
    assert_eq!(h.size_bins(), 100);
    // SAFETY: the region is leaked, so it outlives the heap, and nothing else uses it.
    unsafe { h.try_init(p0, len0) }.unwrap();
    h.set_compact_above(100);
    let l = layout(60_000, 8);
    let a = h.allocate(l).unwrap();
    let b = h.allocate(l).unwrap();
    // SAFETY: `a` came from `h` with `l` and is freed once.
    unsafe { h.deallocate(a, l) };
    assert!(h.stats().quick_list_bytes > 0);
    h.set_size_bins(150); // still 100: no trim
    assert!(h.stats().quick_list_bytes > 0);
    h.check_invariants().unwrap();
    // More memory: the budget grows with it.
    let (p1, len1) = region(1 << 20);
    // SAFETY: the region is leaked, so it outlives the heap, and nothing else uses it.
    unsafe { h.add_region(p1, len1) }.unwrap();
    h.check_invariants().unwrap();
    // SAFETY: `b` came from `h` with `l` and is freed once.
    unsafe { h.deallocate(b, l) };
    h.check_invariants().unwrap();
    // compact_above(0) empties every list.
    h.set_compact_above(0);
    assert_eq!(h.stats().quick_list_bytes, 0);
    h.check_invariants().unwrap();
    // Nothing is binned at compact_above(0), bins or not.
    let c = h.allocate(l).unwrap();
    // SAFETY: `c` came from `h` with `l` and is freed once.
    unsafe { h.deallocate(c, l) };
    assert_eq!(h.stats().quick_list_bytes, 0);
    h.set_compact_above(100);
    h.set_size_bins(1);
    let c = h.allocate(l).unwrap();
    // SAFETY: `c` came from `h` with `l` and is freed once.
    unsafe { h.deallocate(c, l) };
    // 1 % of ~1.25 MiB is under 60 KB: not binned.
    assert_eq!(h.stats().quick_list_bytes, 0);
    h.check_invariants().unwrap();
    h.set_size_bins(0);
    assert_eq!(h.stats().quick_list_bytes, 0);
    assert_eq!(h.stats().free_blocks, 2);
}

/// Lowering the bins' share returns the binned blocks only: on a heap without bins (`SmallHeap`),
/// which ignores the setting, the quick lists keep their blocks.
#[test]
fn lowering_the_bins_share_leaves_the_quick_lists_alone() {
    let mut h: SmallHeap = heap_of(64 << 10, 25, 100);
    let l = layout(100, 8);
    let a = h.allocate(l).unwrap();
    let _b = h.allocate(l).unwrap();
    // SAFETY: `a` came from `h` with `l` and is freed once.
    unsafe { h.deallocate(a, l) };
    let q = h.stats().quick_list_bytes;
    if !BINS {
        return;
    }
    assert!(q > 0);
    h.set_size_bins(0); // a heap without bins: "ignores the setting"
    assert_eq!(
        h.stats().quick_list_bytes,
        q,
        "quick lists trimmed by set_size_bins"
    );
}

// ------------------------------------------------------------------------------------------
// Debug checks.

/// Debug builds catch a free with a layout smaller than the allocation's on the free-list path
/// while the bins have never been on: invariant 7 (the layout gives the block's size) holds for
/// a heap that can have bins as for any other.
#[test]
#[cfg(all(debug_assertions, not(feature = "small-code")))]
fn wrong_layout_free_is_caught_with_bins_off() {
    // compact_above(0): no quick lists, so the free takes `release_used`.
    let mut h = heap(1 << 20, 0, 0);
    let p = h.allocate(layout(100, 8)).unwrap();
    // SAFETY: none: this free with a smaller layout breaks `deallocate`'s contract on purpose; a
    // debug build must catch it before touching the heap, which is what the test checks.
    let r = catch_unwind(AssertUnwindSafe(|| unsafe {
        h.deallocate(p, layout(50, 8))
    }));
    assert!(
        r.is_err(),
        "a 100-byte block freed as 50 bytes was not caught"
    );
}

/// The same for a block of 1 KiB or more (5000 bytes freed as 3000), with the quick lists open
/// and the bins off.
#[test]
#[cfg(all(debug_assertions, not(feature = "small-code")))]
fn wrong_layout_free_of_a_large_block_is_caught_with_bins_off() {
    let mut h = heap(1 << 20, 0, 100);
    let p = h.allocate(layout(5000, 8)).unwrap();
    // SAFETY: none: this free with a smaller layout breaks `deallocate`'s contract on purpose; a
    // debug build must catch it before touching the heap, which is what the test checks.
    let r = catch_unwind(AssertUnwindSafe(|| unsafe {
        h.deallocate(p, layout(3000, 8))
    }));
    assert!(
        r.is_err(),
        "a 5000-byte block freed as 3000 bytes was not caught"
    );
}

/// Debug builds catch a second free of a binned block also when the bins are full, so that the
/// second free goes to the free lists (whose header check sees a "used" block) instead of the
/// bin: the block never ends up both binned and free.
#[test]
#[cfg(all(debug_assertions, not(feature = "small-code")))]
fn double_free_of_a_binned_block_is_caught_when_the_bins_are_full() {
    let mut h = heap(1 << 20, 1, 100);
    let l = layout(8000, 8);
    let p = h.allocate(l).unwrap();
    let _guard = h.allocate(layout(100, 8)).unwrap();
    // SAFETY: `p` came from `h` with `l` and is freed once here.
    unsafe { h.deallocate(p, l) };
    assert!(h.stats().quick_list_bytes > 0, "binned");
    // SAFETY: none: this second free of `p` breaks `deallocate`'s contract on purpose; a debug
    // build must catch it before touching the heap, which is what the test checks.
    let r = catch_unwind(AssertUnwindSafe(|| unsafe { h.deallocate(p, l) }));
    let caught = r.is_err();
    let inv = h.check_invariants();
    assert!(
        caught,
        "double free not caught; heap now: {inv:?} (panic: {})",
        r.err().map(common::panic_msg).unwrap_or_default()
    );
}

// ------------------------------------------------------------------------------------------
// Blocks larger than their layout.

/// A block taken from a bin for a smaller request (with four bins per power of two, a 95-granule
/// block for 65 granules) grows within itself and past itself, and shrinks, under the smaller
/// request's layout, keeping its contents and the invariants.
#[test]
fn reallocating_blocks_larger_than_their_layout() {
    let mut h = heap(4 << 20, 100, 100);
    // A block taken from a bin that is larger than the request: a block one granule short of
    // bin 2's size sits in bin 1 and serves a 65-granule request (bin 1). With four bins per
    // power of two: a 95-granule block (bin 1 = 80..96) for 65 granules.
    let step = 64 / bins_per_octave().max(4);
    let top = 64 + 2 * step - 1;
    let big = layout(top * 16 - 8, 8);
    let a = h.allocate(big).unwrap();
    let _g = h.allocate(layout(100, 8)).unwrap();
    // It was rounded up to bin 2's size: shrink it to `top` granules, compacting for the
    // shrink (otherwise a block that shrinks by less than half keeps its size).
    h.set_compact_above(0);
    // SAFETY: `a` came from `h` with `big` and is live.
    let a = unsafe { h.reallocate(a, big, top * 16 - 8) }.unwrap();
    h.set_compact_above(100);
    // SAFETY: `a`, reallocated to `big`'s size, is live with `big` and freed once.
    unsafe { h.deallocate(a, big) };
    h.check_invariants().unwrap();
    let small = layout(65 * 16 - 8, 8);
    let b = h.allocate(small).unwrap();
    if BINS {
        assert_eq!(b, a, "the {top}-granule block serves a 65-granule request");
    }
    // SAFETY: the block holds `small.size()` bytes.
    unsafe { b.as_ptr().write_bytes(9, small.size()) };
    // Grow within the block, past it, shrink, with the small layout each time.
    let mut cur = (b, small);
    for new in [
        (top - 5) * 16,
        (top - 1) * 16,
        top * 16 - 8,
        200 * 16,
        70 * 16,
        1000,
        1016,
        10,
    ] {
        // SAFETY: `cur.0` came from `h` with layout `cur.1` and is live.
        let q = unsafe { h.reallocate(cur.0, cur.1, new) }.unwrap();
        let kept = cur.1.size().min(new);
        // SAFETY: `q` holds `new >= kept` bytes, the first `kept` of them carried over (written).
        let bytes = unsafe { std::slice::from_raw_parts(q.as_ptr(), kept) };
        assert!(bytes.iter().all(|&x| x == 9), "realloc to {new}");
        // SAFETY: `q` holds `new` bytes.
        unsafe { q.as_ptr().write_bytes(9, new) };
        cur = (q, layout(new, 8));
        h.check_invariants().unwrap();
    }
    // SAFETY: `cur.0` came from `h` with layout `cur.1` and is freed once.
    unsafe { h.deallocate(cur.0, cur.1) };
    h.trim();
    h.check_invariants().unwrap();
}

/// Compacting reallocation (`set_compact_above(1)`) of blocks handed out rounded up or from the
/// bins keeps their contents and the invariants, and leaves one free block once all are freed.
#[test]
fn compacting_reallocation_of_rounded_blocks() {
    let mut h = heap(4 << 20, 100, 100);
    let mut live = Vec::new();
    for i in 0..40usize {
        let l = layout(1000 + i * 777, 8);
        let p = h.allocate(l).unwrap();
        // SAFETY: the block holds `l.size()` bytes.
        unsafe { p.as_ptr().write_bytes(i as u8, l.size()) };
        live.push((p, l, i as u8));
    }
    // Free every other one into the bins.
    let mut kept = Vec::new();
    for (j, e) in live.into_iter().enumerate() {
        if j % 2 == 0 {
            // SAFETY: `e.0` came from `h` with layout `e.1` and is freed once (not kept).
            unsafe { h.deallocate(e.0, e.1) };
        } else {
            kept.push(e);
        }
    }
    h.set_compact_above(1);
    for (j, e) in kept.iter_mut().enumerate() {
        let new = if j % 2 == 0 {
            e.1.size() / 2 + 1
        } else {
            e.1.size() * 3
        };
        // SAFETY: `e.0` came from `h` with layout `e.1` and is live.
        let q = unsafe { h.reallocate(e.0, e.1, new) }.unwrap();
        let n = e.1.size().min(new);
        // SAFETY: `q` holds `new >= n` bytes, the first `n` of them carried over (written).
        let b = unsafe { std::slice::from_raw_parts(q.as_ptr(), n) };
        assert!(b.iter().all(|&x| x == e.2));
        // SAFETY: `q` holds `new` bytes.
        unsafe { q.as_ptr().write_bytes(e.2, new) };
        *e = (q, layout(new, 8), e.2);
        h.check_invariants().unwrap();
    }
    for e in kept {
        // SAFETY: each came from `h` with its layout and is freed once.
        unsafe { h.deallocate(e.0, e.1) };
    }
    h.trim();
    h.check_invariants().unwrap();
    let s = h.stats();
    assert_eq!(
        (s.live_blocks, s.free_blocks, s.quick_list_bytes),
        (0, 1, 0)
    );
}

// ------------------------------------------------------------------------------------------
// Random operations with every setting changing mid-run, every counter checked every step.

/// Checks that the first `size` bytes of live block `p` (its ends and every 997th byte) still
/// hold `tag`, as written when it was handed out.
fn check_block(p: NonNull<u8>, size: usize, tag: u8, what: &str) {
    // SAFETY: every caller passes a live block whose first `size` bytes it wrote, and nothing
    // writes them while `bytes` lives.
    let bytes = unsafe { std::slice::from_raw_parts(p.as_ptr(), size) };
    let probe = |i: usize| assert_eq!(bytes[i], tag, "{what}: byte {i} of {size}");
    for i in 0..size.min(64) {
        probe(i);
    }
    for i in size.saturating_sub(64)..size {
        probe(i);
    }
    let mut i = 0;
    while i < size {
        probe(i);
        i += 997;
    }
}

/// `steps` random allocations, reallocations, frees and setting changes on a heap of this
/// configuration over `bytes` bytes (`extra`: a region of that many bytes added at a random
/// step), with the invariants, every counter and the memory bounds checked at every step.
fn random_ops<const FL: usize, const SL: usize, const SB: usize>(
    id: u32,
    bytes: usize,
    seed: u64,
    steps: u32,
    extra: Option<usize>,
) {
    let max_bytes = (Tlsf::<InBand, FL, SL, SB>::MAX_BLOCK_GRANULES as usize) * 16;
    let (p0, len) = region(bytes);
    let mut h = Tlsf::<InBand, FL, SL, SB>::empty();
    let mut rng = Rng(seed | 1);
    let mut share = [0u8, 1, 10, 25, 100, 255][rng.below(6) as usize];
    h.set_size_bins(share);
    // SAFETY: the region is leaked, so it outlives the heap, and nothing else uses it.
    unsafe { h.init(p0, len) };
    let mut compact = [0u8, 25, 60, 100][rng.below(4) as usize];
    h.set_compact_above(compact);
    let mut live: BTreeMap<usize, (NonNull<u8>, Layout, u8)> = BTreeMap::new();
    // Addresses of live blocks that a reallocation returned: those may keep up to twice what
    // their layout needs (a shrink to half or more below the compacting threshold keeps the
    // block), the others less than 1.5 times (a bin's next size).
    let mut reallocated: BTreeSet<usize> = BTreeSet::new();
    let add_at = rng.below(steps as u64) as u32;
    let cap = (bytes / 12).min(max_bytes * 2).max(64);
    let (mut maxq, mut fails, mut nq) = (0usize, 0usize, 0usize); // for SIZE_BINS_VERBOSE
    for step in 0..steps {
        let what = format!("config {id} seed {seed:#x} step {step}");
        if step == add_at {
            if let Some(n) = extra {
                let (p, l) = region(n);
                // SAFETY: the region is leaked, so it outlives the heap, and nothing else uses
                // it.
                unsafe { h.add_region(p, l) }.unwrap();
            }
        }
        let roll = rng.below(100);
        if roll < 2 {
            share = [0u8, 1, 10, 25, 50, 100, 200][rng.below(7) as usize];
            h.set_size_bins(share);
        } else if roll < 4 {
            compact = [0u8, 1, 25, 60, 100][rng.below(5) as usize];
            h.set_compact_above(compact);
        } else if roll < 5 {
            h.trim();
            assert_eq!(h.stats().quick_list_bytes, 0, "{what}: trim");
        } else if live.is_empty()
            || roll
                < if h.stats().used_bytes * 2 > h.stats().region_bytes {
                    30
                } else {
                    60
                }
        {
            let size = match rng.below(6) {
                0 => 1 + rng.below(1100) as usize,
                1 => 1000 + rng.below(40) as usize,
                2 | 3 => 1 + rng.below(cap as u64 / 8 + 1) as usize,
                4 => 1 + rng.below(cap as u64) as usize,
                _ => {
                    // Exactly a bin size less the header, or one byte more.
                    let g = model_bin_up(SL.max(64) + rng.below(cap as u64 / 16 + 1) as usize);
                    (g * 16 - 8 + rng.below(2) as usize).min(cap)
                }
            };
            let align = match rng.below(8) {
                0 => 1 << (5 + rng.below(9)),
                _ => 1 << rng.below(5),
            };
            let l = layout(size, align);
            match h.allocate(l) {
                Some(p) => {
                    assert_eq!(p.as_ptr().addr() % align, 0, "{what}: misaligned");
                    let tag = (step % 251) as u8;
                    // SAFETY: the block holds `size` bytes.
                    unsafe { p.as_ptr().write_bytes(tag, size) };
                    assert!(
                        live.insert(p.as_ptr().addr(), (p, l, tag)).is_none(),
                        "{what}: handed out a live block"
                    );
                }
                None => {
                    fails += 1;
                    if align <= 16 && granules(size) * 16 <= max_bytes {
                        let s = h.stats();
                        assert_eq!(s.quick_list_bytes, 0, "{what}: failed with blocks listed");
                        assert!(
                            size > s.largest_free_bytes,
                            "{what}: {l:?} refused, largest free {}",
                            s.largest_free_bytes
                        );
                    }
                }
            }
        } else {
            let key = *live
                .keys()
                .nth(rng.below(live.len() as u64) as usize)
                .unwrap();
            let (p, l, tag) = live.remove(&key).unwrap();
            let was_reallocated = reallocated.remove(&key);
            check_block(p, l.size(), tag, &what);
            if roll.is_multiple_of(3) {
                let new = match rng.below(3) {
                    0 => 1 + rng.below(l.size() as u64) as usize,
                    1 => l.size() + rng.below(64) as usize,
                    _ => 1 + rng.below(cap as u64) as usize,
                };
                // SAFETY: `p` came from `h` with `l` and is live (a failed reallocation keeps it,
                // and it goes back into `live`).
                match unsafe { h.reallocate(p, l, new) } {
                    Some(q) => {
                        assert_eq!(q.as_ptr().addr() % l.align(), 0, "{what}: realloc align");
                        check_block(q, l.size().min(new), tag, &what);
                        // SAFETY: `q` holds `new` bytes.
                        unsafe { q.as_ptr().write_bytes(tag, new) };
                        assert!(
                            live.insert(q.as_ptr().addr(), (q, layout(new, l.align()), tag))
                                .is_none(),
                            "{what}: realloc handed out a live block"
                        );
                        reallocated.insert(q.as_ptr().addr());
                    }
                    None => {
                        check_block(p, l.size(), tag, &what);
                        live.insert(key, (p, l, tag));
                        if was_reallocated {
                            reallocated.insert(key);
                        }
                    }
                }
            } else {
                // SAFETY: `p` came from `h` with `l` and is freed once (taken out of `live`).
                unsafe { h.deallocate(p, l) };
            }
        }
        h.check_invariants()
            .unwrap_or_else(|e| panic!("{what}: {e:?}"));
        let s = h.stats();
        maxq = maxq.max(s.quick_list_bytes);
        nq += (s.quick_list_bytes > 0) as usize;
        assert_eq!(s.live_blocks, live.len(), "{what}: live_blocks");
        assert_eq!(
            s.used_bytes + s.free_bytes,
            s.region_bytes,
            "{what}: used + free"
        );
        assert_eq!(h.free_bytes(), s.free_bytes, "{what}: free_bytes()");
        let needed: usize = live.values().map(|(_, l, _)| granules(l.size()) * 16).sum();
        assert!(
            s.used_bytes >= needed,
            "{what}: used {} < needed {needed}",
            s.used_bytes
        );
        // A block is at most its bin's next size, under 1.5 times what its request needs, or,
        // once reallocated, twice (see `reallocated`).
        let bound: usize = live
            .iter()
            .map(|(a, (_, l, _))| {
                let need = granules(l.size()) * 16;
                if reallocated.contains(a) {
                    need * 4
                } else {
                    need * 3
                }
            })
            .sum();
        assert!(
            s.used_bytes * 2 <= bound,
            "{what}: used {} vs needed {needed} (bound {} for these blocks)",
            s.used_bytes,
            bound / 2
        );
        // Quick lists at most 1/16 of the heap, bins at most their share.
        let gran = s.region_bytes / 16;
        let bin_cap = if share >= 100 {
            s.region_bytes
        } else {
            gran / 100 * share as usize * 16 + gran % 100 * share as usize / 100 * 16
        };
        assert!(
            s.quick_list_bytes <= gran / 16 * 16 + bin_cap,
            "{what}: quick_list_bytes {} share {share}",
            s.quick_list_bytes
        );
    }
    if std::env::var("SIZE_BINS_VERBOSE").is_ok() {
        eprintln!(
            "cfg {id} seed {seed:#x}: max listed {maxq}, steps with lists {nq}, \
             failed allocs {fails}"
        );
    }
    for (_, (p, l, tag)) in std::mem::take(&mut live) {
        check_block(p, l.size(), tag, "final");
        // SAFETY: each came from `h` with its layout and is freed once.
        unsafe { h.deallocate(p, l) };
    }
    h.trim();
    h.check_invariants().unwrap();
    let s = h.stats();
    assert_eq!((s.live_blocks, s.used_bytes, s.quick_list_bytes), (0, 0, 0));
    assert_eq!(s.free_bytes, s.region_bytes);
}

/// Random operations on the default heap's configuration, with a region added mid-run (not with
/// `small-code`, which keeps one region per heap).
#[test]
fn random_ops_default_heap() {
    // More seeds: SIZE_BINS_SEEDS=N.
    let n = std::env::var("SIZE_BINS_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8u64);
    for seed in 1..=n {
        random_ops::<{ tlsf::FL }, { tlsf::SL }, { tlsf::SIZE_BINS }>(
            10,
            1 << 20,
            seed.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            1200,
            (!cfg!(feature = "small-code")).then_some(512 << 10),
        );
    }
}

/// Random operations on the default heap's configuration over 24 MiB, with blocks up to 2 MiB.
#[test]
fn random_ops_default_heap_large_blocks() {
    for seed in 5..=6u64 {
        random_ops::<{ tlsf::FL }, { tlsf::SL }, { tlsf::SIZE_BINS }>(
            11,
            24 << 20,
            seed.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            800,
            None,
        );
    }
}

// ------------------------------------------------------------------------------------------
// Provenance (natively, only that the bin hands the block back; the rest needs Miri).

/// A bin hit hands back the block the previous owner freed, and the new owner writes its whole,
/// larger request through the pointer, even where the previous owner freed a pointer derived
/// from a `&mut [u8]` of only its own layout (what `Box<[u8]>` and `Vec` do through
/// `GlobalAlloc`): a bin keeps the block's address with the region's provenance, not the
/// freeing pointer's. Passes under Miri with Stacked Borrows and with Tree Borrows
/// (`-Zmiri-ignore-leaks`: the test regions are leaked on purpose).
#[test]
fn a_bin_hit_hands_out_a_pointer_usable_for_the_whole_request() {
    let mut h = heap(1 << 20, 25, 100);
    let per = bins_per_octave();
    let l1 = layout(1017, 8); // 65 granules, rounded up to the next bin
    let rounded = model_bin_up_per(65, per.max(4));
    let p = h.allocate(l1).unwrap();
    let _guard = h.allocate(layout(100, 8)).unwrap();
    let narrow: *mut u8 = {
        // SAFETY: the block holds `l1.size()` bytes of the zeroed region, and nothing else
        // refers to them while `s` lives.
        let s = unsafe { std::slice::from_raw_parts_mut(p.as_ptr(), l1.size()) };
        s.fill(1);
        s.as_mut_ptr()
    };
    // SAFETY: `narrow` is `p`, which came from `h` with `l1`, and is freed once.
    unsafe { h.deallocate(NonNull::new(narrow).unwrap(), l1) };
    let l2 = layout(rounded * 16 - 8, 8);
    let q = h.allocate(l2).unwrap();
    if BINS && per != 0 {
        assert_eq!(q, p);
    }
    // SAFETY: the block holds `l2.size()` bytes.
    unsafe { q.as_ptr().write_bytes(2, l2.size()) };
    // SAFETY: `q` came from `h` with `l2` and is freed once.
    unsafe { h.deallocate(q, l2) };
    h.check_invariants().unwrap();
}
