//! The quick lists of the TLSF heap, and the guarantees that the `small-code` feature keeps or
//! drops.
//!
//! - Debug builds catch a double free and a free with the wrong layout on the quick path too,
//!   as they do on the free-list path (the wrong-layout check only without `small-code`, whose
//!   free takes the size from the header).
//! - `set_compact_above(0)` leaves no block on the quick lists.
//! - `OobHeap::allocate_offset` finds a fitting block whether or not `small-code` is on
//!   (features add up across a build, so the daemon's arena may be built with it).
//! - Random allocation, reallocation and free keep the invariants, the counters and the
//!   "never fails while a fitting block exists" guarantee, for [`Heap`] and [`SmallHeap`].
//! - A request over-aligned past the fast path merges the quick lists back to serve itself.
//! - A freed block's quick-list link is written through the pointer its owner gave back, even
//!   one whose provenance covers only the layout's bytes.
//!
//! Run with and without `--features small-code`.

use std::alloc::Layout;
use std::collections::BTreeMap;
#[cfg(debug_assertions)]
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr::NonNull;

use xalloc_core::tlsf::QUICK_SHARE;
use xalloc_core::{Heap, MetaEntry, OobHeap, SmallHeap, Tlsf};

fn layout(size: usize, align: usize) -> Layout {
    Layout::from_size_align(size, align).unwrap()
}

/// `n` bytes, 16-aligned, leaked (a heap may hand out pointers into it until the test ends).
fn region(n: usize) -> (*mut u8, usize) {
    let v: &'static mut [u128] = Box::leak(vec![0u128; n.div_ceil(16)].into_boxed_slice());
    (v.as_mut_ptr().cast(), v.len() * 16)
}

fn heap(n: usize) -> Heap {
    let (p, len) = region(n);
    let mut h = Heap::empty();
    // SAFETY: the region is leaked, so it outlives the heap, and nothing else uses it.
    unsafe { h.try_init(p, len) }.unwrap();
    h
}

// ----- 1. Debug checks on the quick path -----

/// Module docs of `tlsf`: "debug builds assert 7 on every free", and `used_block` asserts
/// "double free or foreign pointer". A block freed onto a quick list stays "used" in its
/// header, so the quick path must look for it on the list: a second free of it panics in debug
/// builds instead of pushing it again (which would make the list a cycle and hand the block out
/// twice).
#[test]
#[cfg(debug_assertions)]
fn double_free_of_a_small_block_is_caught_in_debug_builds() {
    let mut h = heap(64 << 10);
    let l = layout(100, 8);
    let p = h.allocate(l).unwrap();
    let _keep = h.allocate(l).unwrap();
    // SAFETY: `p` was just allocated by `h` with `l` and not freed yet.
    unsafe { h.deallocate(p, l) };
    // SAFETY: none: this second free of `p` breaks `deallocate`'s contract on purpose; a debug
    // build must catch it before touching the heap, which is what the test checks.
    let caught = catch_unwind(AssertUnwindSafe(|| unsafe { h.deallocate(p, l) })).is_err();
    if !caught {
        let (a, b) = (h.allocate(l).unwrap(), h.allocate(l).unwrap());
        panic!(
            "second free of {p:?} not caught in a debug build; the next two allocations of its \
             size return {a:?} and {b:?} (the same block twice); check_invariants: {:?}",
            h.check_invariants()
        );
    }
}

/// Same docs: invariant 7 (the layout's size gives the block's size) is asserted on every free
/// in debug builds ("layout differs from the allocation's"), the quick path included: freeing
/// a 2-granule block with a 200-byte layout panics instead of filing the block on the
/// 13-granule list, where the next 200-byte request would get it and overwrite the
/// neighbouring live block. (With `small-code` the free takes the size from the header, so a
/// wrong layout does no harm and there is nothing to check.)
#[test]
#[cfg(all(debug_assertions, not(feature = "small-code")))]
fn freeing_with_a_wrong_layout_is_caught_in_debug_builds() {
    let mut h = heap(64 << 10);
    let (small, big) = (layout(16, 8), layout(200, 8));
    let p = h.allocate(small).unwrap();
    let neighbour = h.allocate(small).unwrap();
    // SAFETY: none: `p` is live, but was allocated with `small`, not `big`, which breaks
    // `deallocate`'s contract on purpose; a debug build must catch it before touching the
    // heap, which is what the test checks.
    let caught = catch_unwind(AssertUnwindSafe(|| unsafe { h.deallocate(p, big) })).is_err();
    if !caught {
        let q = h.allocate(big).unwrap();
        panic!(
            "free with a larger layout not caught in a debug build: allocate(200) now returns \
             {q:?}, a 32-byte block {} bytes below live block {neighbour:?}; check_invariants: {:?}",
            neighbour.as_ptr().addr() - q.as_ptr().addr(),
            h.check_invariants()
        );
    }
}

// ----- 2. set_compact_above(0) and the quick lists -----

/// `set_compact_above` docs: "`0` applies everything always (the most compact heap, without
/// quick lists ...)". Blocks listed before the call are merged back then, not left on the lists
/// until a request of their size or `trim`.
#[test]
fn compact_above_zero_leaves_no_block_on_the_quick_lists() {
    let mut h = heap(64 << 10);
    let l = layout(100, 8);
    let p = h.allocate(l).unwrap();
    let _keep = h.allocate(l).unwrap();
    // SAFETY: `p` was just allocated by `h` with `l` and not freed yet.
    unsafe { h.deallocate(p, l) };
    h.set_compact_above(0);
    let s = h.stats();
    h.check_invariants().unwrap();
    assert_eq!(
        s.quick_list_bytes, 0,
        "set_compact_above(0) left blocks on the quick lists: {s:?}"
    );
}

// ----- 3. small-code and the daemon's heap -----

/// `OobHeap::allocate_offset`: "`None` when no free block can hold the request at that
/// alignment". The daemon's arena keeps the exhaustive search even when `small-code` is
/// enabled anywhere in the build (features add up): a 129-granule request succeeds on a heap
/// whose one free block is 129 granules, although its class (128..=129) does not guarantee 129.
#[test]
fn oob_allocate_offset_finds_the_one_block_that_fits() {
    let granule = 64;
    let n = 129;
    let mut table = vec![MetaEntry::default(); OobHeap::table_entries(n * granule, granule)];
    // An out-of-band heap never touches its region: any granule-aligned address range will do.
    let base = 1usize << 40;
    // SAFETY: 1. the region is never read or written, by the heap (out of band: it keeps all
    // its metadata in `table`) or by the test (only offsets are used), so an address range
    // without provenance serves; 2. `table` is a live buffer of `table.len()` entries, used by
    // nothing else, declared before `h` so it outlives it; 3. a heap allocation cannot overlap
    // an address range at 1 TiB that nothing maps for this test.
    let mut h = unsafe {
        OobHeap::new(
            std::ptr::without_provenance_mut(base),
            n * granule,
            granule,
            table.as_mut_ptr(),
            table.len(),
        )
    }
    .unwrap();
    let s = h.stats();
    assert_eq!(s.free_blocks, 1);
    let whole = s.region_bytes;
    assert_eq!(whole, n * granule);
    assert!(
        h.allocate_offset(layout(whole, granule), 0).is_some(),
        "the one free block ({whole} bytes) holds the request, yet allocate_offset refused it \
         (built with small-code: {})",
        cfg!(feature = "small-code")
    );
    h.check_invariants().unwrap();
}

// ----- 4. The guarantees, under random operations -----

/// xorshift64*.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Checks the counters against each other and the model.
fn check_counters<const FL: usize, const SL: usize, const SB: usize>(
    h: &Tlsf<xalloc_core::InBand, FL, SL, SB>,
    live: &BTreeMap<usize, (usize, Layout, u8)>,
    step: usize,
) {
    h.check_invariants()
        .unwrap_or_else(|e| panic!("step {step}: {e:?}"));
    let s = h.stats();
    assert_eq!(s.live_blocks, live.len(), "step {step}: {s:?}");
    assert_eq!(
        s.used_bytes + s.free_bytes,
        s.region_bytes,
        "step {step}: {s:?}"
    );
    assert_eq!(h.free_bytes(), s.free_bytes, "step {step}: {s:?}");
    assert!(
        s.quick_list_bytes <= s.region_bytes / QUICK_SHARE,
        "step {step}: {s:?}"
    );
    assert!(
        s.largest_free_bytes + s.quick_list_bytes <= s.free_bytes,
        "step {step}: {s:?}"
    );
    let payload: usize = live.values().map(|&(_, l, _)| l.size()).sum();
    assert!(payload <= s.used_bytes, "step {step}: {s:?}");
}

/// Allocation, reallocation and free in random order, with the thresholds changed and (where
/// the build takes them) regions added while blocks sit on the quick lists. After every step:
/// the invariants, the counters, no overlap, contents kept; after every failed request of
/// alignment <= 16: no free block could have held it, even after `trim` (the guarantee "never
/// fails while a fitting block exists", which small-code states as `largest_free_bytes`); and
/// a request of `largest_free_bytes` succeeds.
fn random_ops<const FL: usize, const SL: usize, const SB: usize>(
    h: &mut Tlsf<xalloc_core::InBand, FL, SL, SB>,
    seed: u64,
) {
    let mut rng = Rng(seed);
    // start -> (end, layout, fill byte)
    let mut live: BTreeMap<usize, (usize, Layout, u8)> = BTreeMap::new();
    let mut ptrs: BTreeMap<usize, NonNull<u8>> = BTreeMap::new();
    let aligns = [1, 8, 16, 32, 64, 256, 4096];
    // That the run reaches what it tests: blocks on the quick lists, and refused requests.
    let (mut listed, mut refused) = (0usize, 0usize);
    for step in 0..6000 {
        match rng.below(100) {
            0 => h.set_compact_above([0u8, 25, 60, 90, 100][rng.below(5)]),
            1 if !cfg!(feature = "small-code") && h.region_count() < 4 => {
                let (p, len) = region(16 << 10);
                // SAFETY: the region is freshly leaked, so it outlives the heap, nothing else
                // uses it, and it overlaps none of the heap's other regions.
                unsafe { h.add_region(p, len) }.unwrap();
            }
            2 => h.trim(),
            3..=55 => {
                let size = if rng.below(10) == 0 {
                    1024 + rng.below(24 << 10)
                } else {
                    rng.below(1100)
                };
                let l = layout(size, aligns[rng.below(aligns.len())]);
                match h.allocate(l) {
                    Some(p) => {
                        let a = p.as_ptr().addr();
                        assert_eq!(a % l.align(), 0, "step {step}");
                        if let Some((&s, &(e, _, _))) = live.range(..=a).next_back() {
                            assert!(e <= a, "step {step}: {a:#x} overlaps {s:#x}..{e:#x}");
                        }
                        if let Some((&s, _)) = live.range(a..).next() {
                            assert!(a + size <= s, "step {step}: {a:#x}+{size} overlaps {s:#x}");
                        }
                        let fill = rng.next() as u8;
                        // SAFETY: `p` was just handed out for `l`, so it is valid for writes of
                        // `l.size() == size` bytes.
                        unsafe { p.as_ptr().write_bytes(fill, size) };
                        live.insert(a, (a + size, l, fill));
                        ptrs.insert(a, p);
                    }
                    None if l.align() <= 16 => {
                        refused += 1;
                        h.trim();
                        let s = h.stats();
                        assert!(
                            size > s.largest_free_bytes,
                            "step {step}: allocate({l:?}) failed, yet after trim a block of {} \
                             bytes is free: {s:?}",
                            s.largest_free_bytes
                        );
                    }
                    None => {}
                }
            }
            56..=70 if !live.is_empty() => {
                let k = *live.keys().nth(rng.below(live.len())).unwrap();
                let (_, l, fill) = live.remove(&k).unwrap();
                let p = ptrs.remove(&k).unwrap();
                let new_size = if rng.below(2) == 0 {
                    rng.below(1100)
                } else {
                    rng.below(16 << 10)
                };
                // SAFETY: `p` is live in the model, so `h` returned it with `l` (the layout of
                // its last allocation or reallocation, same alignment) and it is not freed.
                match unsafe { h.reallocate(p, l, new_size) } {
                    Some(q) => {
                        let kept = l.size().min(new_size);
                        // SAFETY: `q` is live for `new_size >= kept` bytes, and its first `kept`
                        // bytes were filled (with `fill`) when `p` was placed.
                        let bytes = unsafe { std::slice::from_raw_parts(q.as_ptr(), kept) };
                        assert!(
                            bytes.iter().all(|&b| b == fill),
                            "step {step}: contents lost"
                        );
                        let nl = layout(new_size, l.align());
                        let a = q.as_ptr().addr();
                        assert_eq!(a % l.align(), 0, "step {step}");
                        // SAFETY: `q` is live for `new_size` bytes, and `bytes` is no longer
                        // used.
                        unsafe { q.as_ptr().write_bytes(fill, new_size) };
                        live.insert(a, (a + new_size, nl, fill));
                        ptrs.insert(a, q);
                    }
                    None => {
                        if l.align() <= 16 {
                            h.trim();
                            let s = h.stats();
                            assert!(
                                new_size > s.largest_free_bytes,
                                "step {step}: reallocate to {new_size} failed, yet after trim a \
                                 block of {} bytes is free: {s:?}",
                                s.largest_free_bytes
                            );
                        }
                        live.insert(k, (k + l.size(), l, fill));
                        ptrs.insert(k, p);
                    }
                }
            }
            _ if !live.is_empty() => {
                let k = *live.keys().nth(rng.below(live.len())).unwrap();
                let (_, l, fill) = live.remove(&k).unwrap();
                let p = ptrs.remove(&k).unwrap();
                // SAFETY: `p` is live (it was in the model) for `l.size()` bytes, all filled
                // with `fill` when it was placed.
                let bytes = unsafe { std::slice::from_raw_parts(p.as_ptr(), l.size()) };
                assert!(
                    bytes.iter().all(|&b| b == fill),
                    "step {step}: contents changed"
                );
                // SAFETY: `p` was returned by `h` with `l` (its last size) and not freed since;
                // it has just left the model, and `bytes` is no longer used.
                unsafe { h.deallocate(p, l) };
            }
            _ => {}
        }
        check_counters(h, &live, step);
        listed = listed.max(h.stats().quick_list_bytes);
        // `largest_free_bytes` is a request that succeeds now.
        let s = h.stats();
        if s.largest_free_bytes > 0 {
            let l = layout(s.largest_free_bytes, 16);
            let p = h.allocate(l).unwrap_or_else(|| {
                panic!("step {step}: a request of largest_free_bytes failed: {s:?}")
            });
            // SAFETY: `p` was just allocated by `h` with `l` and not freed yet.
            unsafe { h.deallocate(p, l) };
        }
    }
    assert!(refused > 0, "no request was refused");
    assert!(
        listed > 0 || cfg!(feature = "small-code") || SL < 2,
        "nothing was ever on the quick lists"
    );
    for (k, (_, l, _)) in std::mem::take(&mut live) {
        // SAFETY: every block in the model was returned by `h` with `l` (its last size) and
        // not freed since; each is freed once, as the model is emptied.
        unsafe { h.deallocate(ptrs[&k], l) };
    }
    h.trim();
    h.check_invariants().unwrap();
    let s = h.stats();
    assert_eq!(
        (s.live_blocks, s.used_bytes, s.quick_list_bytes),
        (0, 0, 0),
        "{s:?}"
    );
    assert_eq!(s.free_blocks, h.region_count(), "{s:?}");
}

#[test]
fn random_operations_keep_the_guarantees_heap() {
    for seed in 1..=4u64 {
        let mut h = heap(256 << 10);
        random_ops(&mut h, seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    }
}

#[test]
fn random_operations_keep_the_guarantees_small_heap() {
    for seed in 1..=4u64 {
        let (p, len) = region(96 << 10);
        let mut h = SmallHeap::empty();
        // SAFETY: the region is leaked, so it outlives the heap, and nothing else uses it.
        unsafe { h.try_init(p, len) }.unwrap();
        random_ops(&mut h, seed.wrapping_mul(0x2545_f491_4f6c_dd1d));
    }
}

// ----- 5. Merging back and provenance -----

/// A request that only the quick-listed memory can serve, over-aligned past the fast path
/// (2048 > LOW_FIRST_BYTES), succeeds by trimming. (No quick lists with `small-code`.)
#[test]
#[cfg(not(feature = "small-code"))]
fn over_aligned_request_merges_the_quick_lists_back() {
    let mut h = heap(64 << 10);
    let l = layout(500, 8);
    let mut blocks = Vec::new();
    while let Some(p) = h.allocate(l) {
        blocks.push(p);
    }
    // The upper half is freed while the heap is over 60 % full (merged), then the lower half
    // from the bottom: the first few wait on the quick list up to its budget.
    let n = blocks.len();
    for p in blocks.drain(n / 2..).rev() {
        // SAFETY: `p` was allocated by `h` with `l`; draining frees each block once.
        unsafe { h.deallocate(p, l) };
    }
    for p in blocks.drain(..) {
        // SAFETY: as above.
        unsafe { h.deallocate(p, l) };
    }
    let s = h.stats();
    assert!(s.quick_list_bytes > 0, "{s:?}");
    let big = layout(s.largest_free_bytes + 16, 2048);
    let p = h
        .allocate(big)
        .unwrap_or_else(|| panic!("{big:?} refused, stats before: {s:?}"));
    assert_eq!(h.stats().quick_list_bytes, 0);
    h.check_invariants().unwrap();
    // SAFETY: `p` was just allocated by `h` with `big` and not freed yet.
    unsafe { h.deallocate(p, big) };
}

/// Provenance: a freed block's quick-list link is written through the pointer its owner gave
/// back, and the next owner of that size gets that same pointer (before the quick lists, every
/// allocation returned a pointer derived from the region). An owner that frees through a pointer
/// derived from a reference to its data (a `Box<u8>` does, under Stacked Borrows) has a tag over
/// `layout.size()` bytes only. Passes natively and under Miri with Tree Borrows; under Stacked
/// Borrows Miri reports UB at the link's write, as it does for a free-list link written through
/// the same pointer (with `set_compact_above(0)`): the reason scripts/test.sh runs the global
/// allocator test under Tree Borrows.
#[test]
fn quick_list_through_a_narrow_owner_pointer() {
    let mut h = heap(4096);
    let l1 = layout(1, 1);
    let p = h.allocate(l1).unwrap();
    let _keep = h.allocate(l1).unwrap();
    // The owner's pointer, as a `Box<u8>` would hold it: derived from a 1-byte reference.
    // SAFETY: `p` is live for 1 byte (`l1`) and this is the only reference to it.
    let narrow = NonNull::from(unsafe { &mut *p.as_ptr() });
    // SAFETY: `narrow` has the address `h` returned for `l1`, not freed since; that its
    // provenance covers only those `l1.size()` bytes is what the test is about.
    unsafe { h.deallocate(narrow, l1) };
    // The next owner of a one-granule block asks for 8 bytes and uses them all.
    let l8 = layout(8, 8);
    let q = h.allocate(l8).unwrap();
    // SAFETY: `q` was just handed out for `l8`: live, 8-aligned, valid for 8 bytes.
    unsafe { q.as_ptr().cast::<u64>().write(u64::MAX) };
    // SAFETY: `q` was allocated by `h` with `l8` and not freed yet.
    unsafe { h.deallocate(q, l8) };
    h.trim();
    h.check_invariants().unwrap();
}
