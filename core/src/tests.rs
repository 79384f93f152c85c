//! Unit tests of the TLSF heap's edge cases. Randomised sequences against a shadow model live in
//! `tests/shadow.rs`.

extern crate std;

use std::vec;
use std::vec::Vec;

use super::*;

/// A 16-aligned buffer of `n` bytes.
fn buffer(n: usize) -> Vec<u128> {
    vec![0u128; n.div_ceil(16)]
}

fn heap_over(buf: &mut [u128]) -> Heap {
    let mut h = Heap::empty();
    // SAFETY: `buf` outlives the heap in every test and is used by nothing else.
    unsafe { h.try_init(buf.as_mut_ptr().cast(), buf.len() * 16).unwrap() };
    h
}

/// An out-of-band heap over all of `region`, with `table` for its metadata.
fn oob_over(region: &mut [u8], table: &mut [MetaEntry], granule: usize) -> OobHeap {
    // SAFETY: in every test the region and the table outlive the heap and are used by nothing
    // else while it lives (the region's bytes are read only after the last heap call).
    unsafe {
        OobHeap::new(
            region.as_mut_ptr(),
            region.len(),
            granule,
            table.as_mut_ptr(),
            table.len(),
        )
    }
    .unwrap()
}

fn layout(size: usize, align: usize) -> Layout {
    Layout::from_size_align(size, align).unwrap()
}

#[test]
fn empty_heap_refuses() {
    let mut h = Heap::empty();
    assert!(h.allocate(layout(8, 8)).is_none());
    assert_eq!(h.stats(), Stats::default());
    h.check_invariants().unwrap();
}

#[test]
fn too_small_and_misaligned_regions_are_reported() {
    let mut buf = buffer(64);
    let p: *mut u8 = buf.as_mut_ptr().cast();
    let mut h = Heap::empty();
    // SAFETY: inside `buf`.
    unsafe {
        assert_eq!(h.try_init(p.add(1), 20), Err(InitError::TooSmall));
        assert_eq!(
            h.try_init(core::ptr::null_mut(), 64),
            Err(InitError::TooSmall)
        );
        // Misaligned but large enough: accepted, payloads still 16-aligned.
        h.try_init(p.add(3), 61).unwrap();
        assert_eq!(h.try_init(p, 64), Err(InitError::AlreadyInitialized));
    }
    let a = h.allocate(layout(8, 16)).unwrap();
    assert_eq!(a.as_ptr().addr() % 16, 0);
    h.check_invariants().unwrap();
}

#[test]
fn init_on_small_region_leaves_empty_heap() {
    let mut buf = buffer(16);
    let mut h = Heap::empty();
    // SAFETY: inside `buf`.
    unsafe { h.init(buf.as_mut_ptr().cast(), 16) };
    assert!(h.allocate(layout(1, 1)).is_none());
}

#[test]
fn minimum_block_and_overhead() {
    let mut buf = buffer(1024);
    let mut h = heap_over(&mut buf);
    let total = h.stats().free_bytes;
    let a = h.allocate(layout(8, 8)).unwrap();
    assert_eq!(
        h.stats().used_bytes,
        16,
        "an 8-byte request takes one 16-byte block"
    );
    let b = h.allocate(layout(24, 8)).unwrap();
    assert_eq!(h.stats().used_bytes, 48, "24 bytes + 8 header = 32");
    assert_eq!(b.as_ptr().addr() - a.as_ptr().addr(), 16);
    // SAFETY: live blocks of this heap.
    unsafe {
        h.deallocate(a, layout(8, 8));
        h.deallocate(b, layout(24, 8));
    }
    let s = h.stats();
    assert_eq!((s.free_bytes, s.free_blocks, s.live_blocks), (total, 1, 0));
    assert_eq!(h.free_bytes(), s.free_bytes);
    h.check_invariants().unwrap();
}

#[test]
fn coalesces_both_sides() {
    let mut buf = buffer(4096);
    let mut h = heap_over(&mut buf);
    // Every freed block is merged at once: no quick lists.
    h.set_compact_above(0);
    let l = layout(100, 8);
    let p: Vec<_> = (0..5).map(|_| h.allocate(l).unwrap()).collect();
    // SAFETY: live blocks of this heap, each freed once.
    unsafe {
        h.deallocate(p[1], l);
        h.deallocate(p[3], l);
        assert_eq!(h.stats().free_blocks, 3);
        h.deallocate(p[2], l); // merges with 1 and 3
        assert_eq!(h.stats().free_blocks, 2);
        h.check_invariants().unwrap();
        h.deallocate(p[0], l);
        h.deallocate(p[4], l);
    }
    assert_eq!(h.stats().free_blocks, 1);
    h.check_invariants().unwrap();
}

#[test]
fn every_alignment_up_to_64k() {
    let mut buf = buffer(1 << 20);
    let mut h = heap_over(&mut buf);
    let mut live = Vec::new();
    for shift in 0..=16 {
        let l = layout(24, 1 << shift);
        let p = h.allocate(l).unwrap();
        assert_eq!(p.as_ptr().addr() % (1 << shift), 0, "align {}", 1 << shift);
        live.push((p, l));
        h.check_invariants().unwrap();
    }
    for (p, l) in live {
        // SAFETY: live blocks of this heap.
        unsafe { h.deallocate(p, l) };
    }
    h.check_invariants().unwrap();
    h.trim();
    assert_eq!(h.stats().free_blocks, 1);
    h.check_invariants().unwrap();
}

#[test]
// `small-code` gives up the exhaustive search (crate docs, "Code size").
#[cfg(not(feature = "small-code"))]
fn largest_block_is_always_found() {
    // TLSF's rounding alone would refuse a request for exactly the one free block's size when
    // that size is not a class boundary.
    for size in [1000usize, 4000, 4096 + 200, 65_000] {
        let mut buf = buffer(size + 64);
        let mut h = heap_over(&mut buf);
        let largest = h.stats().largest_free_bytes;
        let p = h
            .allocate(layout(largest, 8))
            .expect("the whole free block");
        assert!(h.allocate(layout(1, 1)).is_none());
        // SAFETY: live block of this heap.
        unsafe { h.deallocate(p, layout(largest, 8)) };
        // An aligned request that fits only at the right offset is found too.
        let p = h
            .allocate(layout(largest - 256, 256))
            .expect("aligned, near the limit");
        assert_eq!(p.as_ptr().addr() % 256, 0);
        h.check_invariants().unwrap();
    }
}

#[test]
fn out_of_memory_returns_none_and_changes_nothing() {
    let mut buf = buffer(4096);
    let mut h = heap_over(&mut buf);
    let a = h.allocate(layout(1000, 8)).unwrap();
    let before = h.stats();
    assert!(h.allocate(layout(8192, 8)).is_none());
    assert!(h.allocate(layout(isize::MAX as usize - 8, 8)).is_none());
    assert!(h.allocate(layout(1 << 40, 4096)).is_none());
    assert_eq!(h.stats(), before);
    // SAFETY: `a` is live with this layout.
    assert!(unsafe { h.reallocate(a, layout(1000, 8), 1 << 20) }.is_none());
    assert_eq!(h.stats(), before);
    h.check_invariants().unwrap();
}

#[test]
// `small-code` gives up the reallocation policy (crate docs, "Code size").
#[cfg(not(feature = "small-code"))]
fn realloc_policy_grows_in_place_moves_down_and_keeps_contents() {
    let mut buf = buffer(1 << 16);
    let mut h = heap_over(&mut buf);
    h.set_compact_above(0);
    let l = layout(100, 8);
    let a = h.allocate(l).unwrap();
    // SAFETY: every pointer used is a live block of at least the size written or read.
    unsafe {
        a.as_ptr().write_bytes(0xAB, 100);
        let g = h.reallocate(a, l, 1000).unwrap();
        assert_eq!(g, a, "free successor and nothing lower: grows in place");
        let b = h.allocate(l).unwrap();
        let m = h.reallocate(g, layout(1000, 8), 5000).unwrap();
        assert!(m > b, "successor used, nothing lower: moves up");
        assert!(core::slice::from_raw_parts(m.as_ptr(), 100)
            .iter()
            .all(|&x| x == 0xAB));
        let s = h.reallocate(m, layout(5000, 8), 500).unwrap();
        assert_eq!(s, a, "a free block below fits: moves down");
        assert!(core::slice::from_raw_parts(s.as_ptr(), 100)
            .iter()
            .all(|&x| x == 0xAB));
        let t = h.reallocate(s, layout(500, 8), 200).unwrap();
        assert_eq!(t, s, "nothing lower: shrinks in place");
        h.check_invariants().unwrap();
        h.deallocate(t, layout(200, 8));
        h.deallocate(b, l);
    }
    assert_eq!(h.stats().free_blocks, 1);
    h.check_invariants().unwrap();
}

#[test]
// `small-code` gives up regions beyond the first (crate docs, "Code size").
#[cfg(not(feature = "small-code"))]
fn regions_can_be_added() {
    let mut b1 = buffer(512);
    let mut b2 = buffer(4096);
    let mut h = heap_over(&mut b1);
    assert!(h.allocate(layout(2000, 8)).is_none());
    // SAFETY: `b2` outlives the heap and is disjoint from `b1`.
    unsafe { h.add_region(b2.as_mut_ptr().cast(), 4096).unwrap() };
    let p = h.allocate(layout(2000, 8)).unwrap();
    let r2 = b2.as_ptr().addr()..b2.as_ptr().addr() + 4096;
    assert!(r2.contains(&p.as_ptr().addr()));
    let q = h.allocate(layout(100, 8)).unwrap();
    h.check_invariants().unwrap();
    // SAFETY: live blocks.
    unsafe {
        h.deallocate(p, layout(2000, 8));
        h.deallocate(q, layout(100, 8));
    }
    assert_eq!(h.stats().free_blocks, 2, "one per region");
    h.check_invariants().unwrap();
    let mut extra = [buffer(1024), buffer(1024), buffer(1024)];
    // SAFETY: each buffer outlives the heap and is disjoint from the others.
    unsafe {
        h.add_region(extra[0].as_mut_ptr().cast(), 1024).unwrap();
        h.add_region(extra[1].as_mut_ptr().cast(), 1024).unwrap();
        assert_eq!(
            h.add_region(extra[2].as_mut_ptr().cast(), 1024),
            Err(InitError::TooManyRegions)
        );
    }
}

#[test]
fn out_of_band_writes_nothing_into_the_region() {
    for granule in [16usize, 64, 4096] {
        let size = 64 * granule;
        let mut region = vec![0xEEu8; size + granule];
        let mut table = vec![MetaEntry::default(); OobHeap::table_entries(size + granule, granule)];
        let mut h = oob_over(&mut region, &mut table, granule);
        let mut live = Vec::new();
        for i in 1..40 {
            let l = layout(i * 37 % (3 * granule) + 1, 8);
            if let Some(p) = h.allocate(l) {
                assert_eq!(p.as_ptr().addr() % granule, 0);
                live.push((p, l));
            }
            if i % 3 == 0 {
                let (p, l) = live.swap_remove(i % live.len());
                // SAFETY: live block of this heap.
                unsafe { h.deallocate(p, l) };
            }
            h.check_invariants().unwrap();
        }
        for (p, l) in live {
            // SAFETY: live block of this heap.
            unsafe { h.deallocate(p, l) };
        }
        assert_eq!(h.stats().free_blocks, 1);
        assert!(
            region.iter().all(|&b| b == 0xEE),
            "granule {granule}: region was written"
        );
    }
}

#[test]
fn out_of_band_rejects_bad_parameters() {
    let mut region = vec![0u8; 4096];
    // Enough for 4096 bytes in 1024-byte granules whatever the region's alignment; far too few
    // for 64-byte granules.
    let mut table = vec![MetaEntry::default(); OobHeap::table_entries(4096, 1024)];
    assert_eq!(table.len(), 5);
    let (r, t) = (region.as_mut_ptr(), table.as_mut_ptr());
    // SAFETY: region and table outlive every heap built here.
    unsafe {
        assert_eq!(
            OobHeap::new(r, 4096, 48, t, 4).err(),
            Some(InitError::BadGranule)
        );
        assert_eq!(
            OobHeap::new(r, 4096, 4, t, 4).err(),
            Some(InitError::BadGranule)
        );
        assert!(matches!(
            OobHeap::new(r, 4096, 64, t, 4),
            Err(InitError::TableTooShort { .. })
        ));
        assert_eq!(
            OobHeap::new(r, 10, 4096, t, 4).err(),
            Some(InitError::TooSmall)
        );
        assert_eq!(
            OobHeap::new(r, 4096, 1024, core::ptr::null_mut(), 4).err(),
            Some(InitError::BadTable)
        );
        assert!(OobHeap::new(r, 4096, 1024, t, 5).is_ok());
    }
}

/// A small deterministic generator, so the stress test needs no dependency.
struct XorShift(u64);
impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn random_stress_keeps_invariants() {
    let ops = if cfg!(miri) { 300 } else { 20_000 };
    let mut buf = buffer(1 << 18);
    let mut h = heap_over(&mut buf);
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let mut live: Vec<(NonNull<u8>, Layout, u8)> = Vec::new();
    for i in 0..ops {
        let r = rng.next();
        match r % 4 {
            0 | 1 => {
                let l = layout((r >> 8) as usize % 3000 + 1, 1 << ((r >> 20) % 8));
                if let Some(p) = h.allocate(l) {
                    assert_eq!(p.as_ptr().addr() % l.align(), 0);
                    // SAFETY: fresh block of `l.size()` bytes.
                    unsafe { p.as_ptr().write_bytes(i as u8, l.size()) };
                    live.push((p, l, i as u8));
                }
            }
            2 if !live.is_empty() => {
                let (p, l, tag) = live.swap_remove((r >> 8) as usize % live.len());
                // SAFETY: live block; its bytes were written with `tag`.
                unsafe {
                    assert!(core::slice::from_raw_parts(p.as_ptr(), l.size())
                        .iter()
                        .all(|&x| x == tag));
                    h.deallocate(p, l);
                }
            }
            3 if !live.is_empty() => {
                let k = (r >> 8) as usize % live.len();
                let (p, l, tag) = live[k];
                let n = (r >> 24) as usize % 6000 + 1;
                // SAFETY: live block with layout `l`.
                if let Some(q) = unsafe { h.reallocate(p, l, n) } {
                    let keep = l.size().min(n);
                    // SAFETY: `q` holds `n` bytes, the first `keep` copied from the old block.
                    unsafe {
                        assert!(core::slice::from_raw_parts(q.as_ptr(), keep)
                            .iter()
                            .all(|&x| x == tag));
                        q.as_ptr().write_bytes(tag, n);
                    }
                    assert_eq!(q.as_ptr().addr() % l.align(), 0);
                    live[k] = (q, layout(n, l.align()), tag);
                }
            }
            _ => {}
        }
        if i % 64 == 0 || cfg!(miri) {
            h.check_invariants().unwrap();
        }
        assert_eq!(h.stats().live_blocks, live.len());
    }
    for (p, l, _) in live {
        // SAFETY: live block.
        unsafe { h.deallocate(p, l) };
    }
    h.check_invariants().unwrap();
    assert_eq!(h.stats().live_blocks, 0);
    h.trim();
    h.check_invariants().unwrap();
    assert_eq!(h.stats().free_blocks, 1);
}

#[test]
fn out_of_band_checked_free_refuses_bad_offsets_and_changes_nothing() {
    let granule = 64;
    let size = 256 * granule;
    let mut region = vec![0u8; size + granule];
    // A table full of garbage: `new` must not trust it.
    let mut table = vec![MetaEntry::default(); OobHeap::table_entries(size + granule, granule)];
    // SAFETY: the table's bytes are plain integers; any pattern is a valid `MetaEntry`.
    unsafe { core::ptr::write_bytes(table.as_mut_ptr(), 0xA5, table.len()) };
    let mut h = oob_over(&mut region, &mut table, granule);
    let a = h.allocate(layout(3 * granule, 8)).unwrap();
    let b = h.allocate(layout(100, 8)).unwrap();
    let (oa, ob) = (h.offset_of(a), h.offset_of(b));
    assert_eq!(h.block_size_at(oa), Some(3 * granule));
    assert_eq!(h.block_size_at(ob), Some(2 * granule));
    let before = h.stats();
    let free_tail = ob + 2 * granule;
    for (offset, want) in [
        (oa + granule, FreeError::NotABlockStart),
        (oa + 1, FreeError::Misaligned),
        (free_tail, FreeError::AlreadyFree),
        (free_tail + granule, FreeError::NotABlockStart),
        (h.stats().region_bytes, FreeError::OutOfRange),
        (usize::MAX & !(granule - 1), FreeError::OutOfRange),
    ] {
        assert_eq!(h.deallocate_at(offset), Err(want), "offset {offset:#x}");
        assert_eq!(h.stats(), before);
        h.check_invariants().unwrap();
    }
    assert_eq!(h.deallocate_at(oa), Ok(3 * granule));
    assert_eq!(
        h.deallocate_at(oa),
        Err(FreeError::AlreadyFree),
        "double free"
    );
    assert_eq!(h.block_size_at(oa), None);
    assert_eq!(h.deallocate_at(ob), Ok(2 * granule));
    // After merging, the old start of `b` lies inside the one free block.
    assert_eq!(h.deallocate_at(ob), Err(FreeError::NotABlockStart));
    let s = h.stats();
    assert_eq!((s.live_blocks, s.free_blocks, s.used_bytes), (0, 1, 0));
    h.check_invariants().unwrap();
}

#[test]
// `small-code` gives up the low-address policy (crate docs, "Code size").
#[cfg(not(feature = "small-code"))]
fn realloc_does_not_copy_large_blocks_down() {
    let mut buf = buffer(4 << 20);
    let mut h = heap_over(&mut buf);
    h.set_compact_above(0);
    let (la, lb) = (layout(400 << 10, 8), layout(300 << 10, 8));
    let a = h.allocate(la).unwrap();
    let b = h.allocate(lb).unwrap();
    // SAFETY: `a` and `b` are live blocks of this heap with these layouts.
    unsafe {
        h.deallocate(a, la);
        // A lower free block would hold the grown `b`, but moving it would copy 300 KiB.
        let g = h.reallocate(b, lb, 310 << 10).unwrap();
        assert_eq!(g, b, "grows in place");
        // Shrunk to 100 KiB, only 100 KiB are copied: it moves down into the hole.
        let s = h.reallocate(g, layout(310 << 10, 8), 100 << 10).unwrap();
        assert_eq!(s, a, "moves down");
        h.deallocate(s, layout(100 << 10, 8));
    }
    h.check_invariants().unwrap();
}

#[test]
fn heap_state_stays_small() {
    // The README promises about 7.6 KiB of state per heap (list heads and bitmaps); a firmware
    // author budgets RAM by it.
    let size = core::mem::size_of::<Heap>();
    assert!((7_000..7_900).contains(&size), "size_of::<Heap>() = {size}");
}

#[test]
fn state_sizes() {
    // Printed for the README; the small configuration's bound is also a compile-time assertion.
    let (small, default) = (size_of::<crate::SmallHeap>(), size_of::<Heap>());
    std::println!("SmallHeap {small} bytes, Heap {default} bytes");
    assert!(small <= 1024, "{small}");
}

#[test]
// `small-code` gives up regions beyond the first (crate docs, "Code size").
#[cfg(not(feature = "small-code"))]
fn small_heap_cuts_a_large_region_into_regions_of_its_largest_block() {
    use crate::SmallHeap;
    let max = SmallHeap::MAX_BLOCK_GRANULES as usize * 16;
    assert_eq!(max, (128 << 10) - 16);
    for (bytes, regions) in [(200 << 10, 2), (512 << 10, 4), (1 << 20, 4)] {
        let mut buf = buffer(bytes);
        let mut h = SmallHeap::empty();
        // SAFETY: `buf` outlives the heap and is used by nothing else.
        unsafe { h.try_init(buf.as_mut_ptr().cast(), buf.len() * 16) }.unwrap();
        h.check_invariants().unwrap();
        let s = h.stats();
        assert_eq!(h.region_count(), regions, "{bytes} bytes");
        // Every byte is used up to the fourth region, less 38 per region at most.
        let usable = bytes.min(4 * (max + 16));
        assert!(s.region_bytes + 38 * regions >= usable, "{bytes}: {s:?}");
        assert!(s.region_bytes <= usable);
        // One allocation can take a whole largest block; one more byte cannot fit.
        assert_eq!(s.largest_free_bytes, max - 8);
        let all = layout(s.largest_free_bytes, 16);
        let p = h.allocate(all).unwrap();
        h.check_invariants().unwrap();
        assert!(h.allocate(layout(s.largest_free_bytes + 1, 16)).is_none());
        // SAFETY: `p` is live with `all`.
        unsafe { h.deallocate(p, all) };
        h.check_invariants().unwrap();
        assert_eq!(h.stats(), s);
    }
}

#[test]
fn compaction_setting() {
    let mut h = Heap::empty();
    assert_eq!(h.compact_above(), crate::tlsf::DEFAULT_COMPACT_ABOVE);
    h.set_compact_above(0);
    assert_eq!(h.compact_above(), 0);
    h.set_compact_above(200);
    assert_eq!(h.compact_above(), 100);
}

#[test]
fn below_the_compaction_threshold_realloc_stays_put_and_leaves_room_to_grow() {
    let mut buf = buffer(1 << 20);
    let mut h = heap_over(&mut buf);
    h.set_compact_above(100);
    let l = layout(4000, 8);
    let a = h.allocate(l).unwrap();
    let b = h.allocate(l).unwrap();
    let c = h.allocate(l).unwrap();
    // SAFETY: every pointer used is a live block of this heap with the layout given.
    unsafe {
        h.deallocate(a, l);
        // A lower block would hold it, but the heap is nearly empty: it shrinks in place.
        let s = h.reallocate(c, l, 1000).unwrap();
        assert_eq!(s, c, "shrinks in place");
        // `b` cannot grow in place (its successor is used): it moves, to a free block
        // `GROW_ROOM` times the new size, so that growing again up to that stays in place.
        let g = h.reallocate(b, l, 6000).unwrap();
        assert_ne!(g, b);
        let room = 6000 * crate::tlsf::GROW_ROOM as usize;
        let g2 = h.reallocate(g, layout(6000, 8), room).unwrap();
        assert_eq!(g2, g, "room was left behind the moved block");
        h.check_invariants().unwrap();
        h.deallocate(g2, layout(room, 8));
        h.deallocate(s, layout(1000, 8));
    }
    h.check_invariants().unwrap();
    assert_eq!(h.stats().live_blocks, 0);
}

/// `reallocate` docs: below the compaction threshold, a block of `SL` granules or more that
/// shrinks to at least half its size keeps it, and growing back up to it is free; a larger
/// shrink, a block that would be under `SL` granules (a quick list takes its size from the
/// layout) and a compacting heap split the spare granules off. Freeing a kept block with its
/// new, smaller layout is not a wrong layout (debug builds check).
#[test]
#[cfg(not(feature = "small-code"))]
fn below_the_compaction_threshold_a_shrink_to_half_or_more_keeps_the_block() {
    use crate::tlsf::SL;
    let mut buf = buffer(1 << 20);
    let mut h = heap_over(&mut buf);
    h.set_compact_above(100);
    // The layout of exactly `g` granules (16 bytes each, 8 of them the header).
    let of = |g: usize| layout(g * 16 - 8, 8);
    let used = |h: &Heap| h.stats().used_bytes;
    // Each block is followed by a used one, so that a split-off tail stays a free block.
    let a = h.allocate(of(2 * SL)).unwrap();
    let _a_guard = h.allocate(of(1)).unwrap();
    let b = h.allocate(of(SL + 2)).unwrap();
    let _b_guard = h.allocate(of(1)).unwrap();
    let c = h.allocate(of(2 * SL + 2)).unwrap();
    let _c_guard = h.allocate(of(1)).unwrap();
    let before = used(&h);
    // SAFETY: every pointer used is a live block of this heap with the layout given.
    unsafe {
        // To exactly half: kept whole.
        let p = h.reallocate(a, of(2 * SL), (SL * 16) - 8).unwrap();
        assert_eq!(
            (p, used(&h)),
            (a, before),
            "a shrink to half keeps the block"
        );
        let free_blocks = h.stats().free_blocks;
        let p = h.reallocate(p, of(SL), 2 * SL * 16 - 8).unwrap();
        assert_eq!(p, a, "grows back in place");
        assert_eq!((used(&h), h.stats().free_blocks), (before, free_blocks));
        let p = h.reallocate(p, of(2 * SL), SL * 16 - 8).unwrap();
        h.check_invariants().unwrap();
        // Freed with its new layout: the whole block goes back.
        h.deallocate(p, of(SL));
        assert_eq!(used(&h), before - 2 * SL * 16);

        // To one granule under `SL`, by only three granules: split all the same.
        let q = h.reallocate(b, of(SL + 2), (SL - 1) * 16 - 8).unwrap();
        assert_eq!(q, b);
        assert_eq!(used(&h), before - 2 * SL * 16 - 3 * 16);
        h.deallocate(q, of(SL - 1));
        assert_eq!(
            h.stats().quick_list_bytes,
            (SL - 1) * 16,
            "on its quick list, whole"
        );
        h.check_invariants().unwrap();

        // To less than half: split.
        let mark = used(&h);
        let r = h.reallocate(c, of(2 * SL + 2), SL * 16 - 8).unwrap();
        assert_eq!(
            (r, used(&h)),
            (c, mark - (SL + 2) * 16),
            "a larger shrink splits"
        );

        // Compacting: every shrink splits (the block is the lowest free-able spot: it stays).
        h.set_compact_above(0);
        let mark = used(&h);
        let r = h.reallocate(r, of(SL), (SL - 8) * 16 - 8).unwrap();
        assert_eq!(
            used(&h),
            mark - 8 * 16,
            "a compacting heap splits every shrink"
        );
        h.deallocate(r, of(SL - 8));
    }
    h.check_invariants().unwrap();
}

#[test]
// `small-code` gives up the low-address policy (crate docs, "Code size").
#[cfg(not(feature = "small-code"))]
fn compaction_starts_at_the_threshold() {
    // 1 MiB heap, compacting above 50 %: a block that could move down only does so once more
    // than half of the heap is in use. The blocks are too large for the quick lists (the hole
    // must be a free block).
    let mut buf = buffer(1 << 20);
    let mut h = heap_over(&mut buf);
    h.set_compact_above(50);
    let small = layout(1100, 8);
    let hole = h.allocate(small).unwrap();
    let keep = h.allocate(small).unwrap();
    let x = h.allocate(small).unwrap();
    // SAFETY: every pointer used is a live block of this heap with the layout given.
    unsafe {
        h.deallocate(hole, small);
        let y = h.reallocate(x, small, 900).unwrap();
        assert_eq!(y, x, "under half full: shrinks in place");
        let filler = layout(600 << 10, 8);
        let f = h.allocate(filler).unwrap();
        let z = h.reallocate(y, layout(900, 8), 800).unwrap();
        assert_eq!(z, hole, "over half full: moves down");
        h.deallocate(z, layout(800, 8));
        h.deallocate(f, filler);
        h.deallocate(keep, small);
    }
    h.check_invariants().unwrap();
}

/// The quick lists (not built with `small-code`).
#[cfg(not(feature = "small-code"))]
mod quick_lists {
    use super::*;

    #[test]
    fn a_freed_small_block_waits_whole_on_its_quick_list() {
        let mut buf = buffer(64 * 1024);
        let mut h = heap_over(&mut buf);
        let l = layout(100, 8);
        let a = h.allocate(l).unwrap();
        let b = h.allocate(l).unwrap();
        // SAFETY: live blocks of this heap, each freed once.
        unsafe {
            h.deallocate(a, l);
            let s = h.stats();
            // Not merged with the free space after `b`'s neighbour: held whole.
            assert_eq!(
                (s.live_blocks, s.quick_list_bytes, s.free_blocks),
                (1, 112, 1)
            );
            assert_eq!(s.used_bytes, 112);
            h.check_invariants().unwrap();
            // The next request of its size takes it back, another size does not.
            let c = h.allocate(layout(200, 8)).unwrap();
            assert_ne!(c, a);
            assert_eq!(h.allocate(l), Some(a));
            assert_eq!(h.stats().quick_list_bytes, 0);
            h.deallocate(a, l);
            h.deallocate(b, l);
            h.deallocate(c, layout(200, 8));
        }
        h.check_invariants().unwrap();
        h.trim();
        let s = h.stats();
        assert_eq!(
            (s.quick_list_bytes, s.free_blocks, s.live_blocks),
            (0, 1, 0)
        );
        h.check_invariants().unwrap();
    }

    #[test]
    fn a_quick_block_is_taken_only_at_its_alignment() {
        let mut buf = buffer(64 * 1024);
        let mut h = heap_over(&mut buf);
        let l = layout(40, 16);
        // Two blocks of 3 granules: one of them is not 64-aligned.
        let (a, b) = (h.allocate(l).unwrap(), h.allocate(l).unwrap());
        let off = if a.as_ptr().addr().is_multiple_of(64) {
            b
        } else {
            a
        };
        let keep = if off == a { b } else { a };
        // SAFETY: live blocks of this heap, each freed once.
        unsafe {
            h.deallocate(off, l);
            let p = h.allocate(layout(40, 64)).unwrap();
            assert!(p.as_ptr().addr().is_multiple_of(64));
            assert_ne!(p, off);
            assert_eq!(h.stats().quick_list_bytes, 48, "still listed");
            h.deallocate(p, layout(40, 64));
            h.deallocate(keep, l);
        }
        h.check_invariants().unwrap();
    }

    #[test]
    fn quick_lists_never_make_an_allocation_fail() {
        // Free many small blocks while the heap is roomy: the quick lists fill to their budget. A
        // request for the whole heap must still succeed, by merging them back.
        let mut buf = buffer(256 * 1024);
        let mut h = heap_over(&mut buf);
        let whole = h.stats().largest_free_bytes;
        let l = layout(500, 8);
        let blocks: Vec<_> = (0..64).map(|_| h.allocate(l).unwrap()).collect();
        for p in &blocks {
            // SAFETY: live blocks of this heap, each freed once.
            unsafe { h.deallocate(*p, l) };
        }
        let s = h.stats();
        assert!(s.quick_list_bytes > 0, "{s:?}");
        assert!(
            s.quick_list_bytes <= s.region_bytes / crate::tlsf::QUICK_SHARE,
            "{s:?}"
        );
        assert!(s.largest_free_bytes < whole, "{s:?}");
        h.check_invariants().unwrap();
        let all = h.allocate(layout(whole, 16)).expect("the whole heap");
        assert_eq!(h.stats().quick_list_bytes, 0);
        h.check_invariants().unwrap();
        // SAFETY: live block of this heap.
        unsafe { h.deallocate(all, layout(whole, 16)) };
        // The same through reallocation: a block grown to the whole heap.
        let blocks: Vec<_> = (0..64).map(|_| h.allocate(l).unwrap()).collect();
        for p in &blocks[1..] {
            // SAFETY: live blocks of this heap, each freed once.
            unsafe { h.deallocate(*p, l) };
        }
        // SAFETY: `blocks[0]` is live with layout `l`.
        let grown = unsafe { h.reallocate(blocks[0], l, whole) }.expect("grown to the whole heap");
        assert_eq!(h.stats().quick_list_bytes, 0);
        // SAFETY: live block of this heap.
        unsafe { h.deallocate(grown, layout(whole, 8)) };
        h.trim();
        assert_eq!(h.stats().largest_free_bytes, whole);
        h.check_invariants().unwrap();
    }

    #[test]
    fn quick_lists_close_when_the_heap_fills_up_or_compacts_always() {
        let mut buf = buffer(64 * 1024);
        let mut h = heap_over(&mut buf);
        let l = layout(100, 8);
        // Over PLACE_LOW_ABOVE % in use: freed blocks are merged at once.
        let filler = layout(h.stats().free_bytes * 3 / 4, 8);
        let f = h.allocate(filler).unwrap();
        let a = h.allocate(l).unwrap();
        // SAFETY: live blocks of this heap, each freed once.
        unsafe {
            h.deallocate(a, l);
            assert_eq!(h.stats().quick_list_bytes, 0, "heap three quarters full");
            h.deallocate(f, filler);
        }
        // `set_compact_above(0)`: never.
        h.set_compact_above(0);
        let a = h.allocate(l).unwrap();
        // SAFETY: as above.
        unsafe { h.deallocate(a, l) };
        assert_eq!(h.stats().quick_list_bytes, 0, "compacting always");
        assert_eq!(h.stats().free_blocks, 1);
        h.check_invariants().unwrap();
    }

    #[test]
    fn out_of_band_heaps_have_no_quick_lists() {
        let granule = 64;
        let mut region = vec![0u8; 64 * granule];
        let mut table = vec![MetaEntry::default(); 65];
        let mut h = oob_over(&mut region, &mut table, granule);
        let l = layout(100, 8);
        let a = h.allocate(l).unwrap();
        // SAFETY: live block of this heap.
        unsafe { h.deallocate(a, l) };
        assert_eq!(h.stats().quick_list_bytes, 0);
        assert_eq!(h.stats().free_blocks, 1);
        h.check_invariants().unwrap();
    }
}

/// What `small-code` keeps of the above: one region, good fit, in-place reallocation, a
/// truthful `largest_free_bytes`.
#[cfg(feature = "small-code")]
mod small_code {
    use super::*;
    use crate::SmallHeap;

    #[test]
    fn one_region_and_a_truthful_largest_free_bytes() {
        let mut buf = buffer(200 << 10);
        let mut h = SmallHeap::empty();
        // SAFETY: `buf` outlives the heap and is used by nothing else.
        unsafe { h.try_init(buf.as_mut_ptr().cast(), buf.len() * 16) }.unwrap();
        assert_eq!(h.region_count(), 1);
        let mut more = buffer(1024);
        assert_eq!(
            // SAFETY: as above.
            unsafe { h.add_region(more.as_mut_ptr().cast(), more.len() * 16) },
            Err(crate::InitError::TooManyRegions)
        );
        h.check_invariants().unwrap();
        let largest = h.stats().largest_free_bytes;
        assert!(largest > 32 << 10, "{largest}");
        let p = h.allocate(layout(largest, 16)).expect("largest_free_bytes");
        h.check_invariants().unwrap();
        // SAFETY: `p` is live with this layout.
        unsafe { h.deallocate(p, layout(largest, 16)) };
        assert_eq!(h.stats().free_blocks, 1);
    }

    #[test]
    fn realloc_resizes_in_place_or_moves() {
        let mut buf = buffer(4096);
        let mut h = heap_over(&mut buf);
        let l = layout(100, 8);
        let p = h.allocate(l).unwrap();
        // SAFETY: `p` is live with `l`.
        unsafe { p.as_ptr().write_bytes(0x5a, 100) };
        // Grows into the free successor, then shrinks, in place.
        // SAFETY: `p` is live with `l`.
        let q = unsafe { h.reallocate(p, l, 1000) }.unwrap();
        assert_eq!(q, p);
        h.check_invariants().unwrap();
        // SAFETY: `q` is live with size 1000.
        let r = unsafe { h.reallocate(q, layout(1000, 8), 50) }.unwrap();
        assert_eq!(r, p);
        h.check_invariants().unwrap();
        // A block behind it forces a move, which keeps the contents.
        let blocker = h.allocate(layout(16, 8)).unwrap();
        // SAFETY: `r` is live with size 50.
        let s = unsafe { h.reallocate(r, layout(50, 8), 500) }.unwrap();
        assert_ne!(s, r);
        // SAFETY: `s` holds at least 50 initialised bytes.
        assert!(unsafe { core::slice::from_raw_parts(s.as_ptr(), 50) }
            .iter()
            .all(|&b| b == 0x5a));
        h.check_invariants().unwrap();
        // SAFETY: live blocks of this heap.
        unsafe {
            h.deallocate(s, layout(500, 8));
            h.deallocate(blocker, layout(16, 8));
        }
        assert_eq!(h.stats().free_blocks, 1);
        h.check_invariants().unwrap();
    }
}
