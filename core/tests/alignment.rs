//! Alignment and address arithmetic at the edges: every power-of-two alignment a `Layout` can
//! carry (up to `usize::MAX / 2 + 1`), sizes from 0, regions that end at the top of the address
//! space, and out-of-band allocations aligned for another process's view of the region.
//!
//! The properties: an allocation either returns a block aligned as asked, inside the region, or
//! returns `None` and leaves the heap's counters as they were; nothing panics (these tests run
//! with overflow checks); the heap's invariants hold after every step.
//!
//! An out-of-band heap never reads or writes its region, so the region can be an address range
//! the test does not own, such as the last bytes below `usize::MAX`.

use std::alloc::Layout;
use std::ptr::NonNull;

use proptest::prelude::*;
use xalloc_core::store::{IN_BAND_MAX_LOSS, LOCAL_MASK};
use xalloc_core::{Heap, MetaEntry, OobHeap, RegionAllocator};

#[cfg(not(miri))]
const CASES: u32 = 256;
#[cfg(miri)]
const CASES: u32 = 4;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: CASES,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Every power of two a `Layout` accepts.
fn any_align() -> impl Strategy<Value = usize> {
    (0..usize::BITS).prop_map(|k| 1usize << k)
}

/// Sizes from 0, small, and a few granules.
fn any_size() -> impl Strategy<Value = usize> {
    prop_oneof![Just(0usize), 1..64usize, 64..8192usize]
}

/// An out-of-band heap over `size` bytes at address `addr`, which it never touches.
fn oob_at(addr: usize, size: usize, granule: usize, table: &mut [MetaEntry]) -> OobHeap {
    let start = core::ptr::without_provenance_mut::<u8>(addr);
    // SAFETY: 1. an out-of-band heap never reads or writes its region (the test only checks the
    // addresses it returns); 2. `table` outlives the heap and is used by nothing else.
    unsafe { OobHeap::new(start, size, granule, table.as_mut_ptr(), table.len()) }
        .expect("region accepted")
}

/// Allocates `size` bytes at `align` from `h`, whose region spans `lo..end`: the block is
/// aligned and inside the region, or the allocation is refused and the counters are unchanged;
/// the heap's invariants hold either way. `None` also when no `Layout` has that size and
/// alignment (at 2^63 only size 0 does: larger sizes round past `isize::MAX`).
fn allocate_checked<H: RegionAllocator>(
    h: &mut H,
    size: usize,
    align: usize,
    lo: usize,
    end: usize,
) -> Result<Option<(NonNull<u8>, Layout)>, TestCaseError> {
    let Ok(l) = Layout::from_size_align(size, align) else {
        return Ok(None);
    };
    let before = h.stats();
    let got = h.allocate(l);
    match got {
        Some(p) => {
            let a = p.as_ptr().addr();
            prop_assert_eq!(a % align, 0, "size {} align {:#x}", size, align);
            prop_assert!(a >= lo && a <= end && size <= end - a, "outside the region");
        }
        None => prop_assert_eq!(h.stats(), before),
    }
    h.check_invariants().unwrap();
    Ok(got.map(|p| (p, l)))
}

proptest! {
    #![proptest_config(config())]

    /// In band, over a real buffer: any size and alignment is served aligned or refused
    /// without a change.
    #[test]
    fn in_band_honours_or_refuses_every_alignment(
        reqs in prop::collection::vec((any_size(), any_align()), 1..40),
        skew in 0..16usize,
    ) {
        let mut buf = vec![0u128; 64 * 1024 / 16];
        let len = buf.len() * 16 - skew;
        let start = buf.as_mut_ptr().cast::<u8>().wrapping_add(skew);
        let mut h = Heap::empty();
        // SAFETY: `buf` outlives the heap and is used by nothing else.
        unsafe { h.try_init(start, len) }.unwrap();
        let (lo, hi) = (start.addr(), start.addr() + len);
        let mut live = Vec::new();
        for (size, align) in reqs {
            live.extend(allocate_checked(&mut h, size, align, lo, hi)?);
        }
        // Alignments up to a quarter of the region always fit in an empty heap.
        for (p, l) in live.drain(..) {
            // SAFETY: allocated above with `l`, freed once.
            unsafe { h.deallocate(p, l) };
        }
        let l = Layout::from_size_align(1, 8192).unwrap();
        prop_assert!(h.allocate(l).is_some_and(|p| p.as_ptr().addr() % 8192 == 0));
    }

    /// Out of band, over the last bytes of the address space: alignments up to 2^63 never
    /// overflow the address arithmetic.
    #[test]
    fn out_of_band_near_the_top_of_the_address_space(
        reqs in prop::collection::vec((any_size(), any_align()), 1..40),
        below_top in 0..4096usize,
        granule_shift in 3..13u32,
    ) {
        let granule = 1usize << granule_shift;
        let region = 64 * granule;
        let addr = usize::MAX - region - below_top;
        let mut table = vec![MetaEntry::default(); OobHeap::table_entries(region, granule)];
        let mut h = oob_at(addr, region, granule, &mut table);
        for (size, align) in reqs {
            allocate_checked(&mut h, size, align, addr, addr + region)?;
        }
    }

    /// `allocate_offset`: the offset is aligned as the given view of the region sees it,
    /// whatever the heap's own address; alignments that fit are served.
    #[test]
    fn out_of_band_aligns_for_the_view_it_is_given(
        reqs in prop::collection::vec((1..4 * 4096usize, 12..21u32), 1..30),
        heap_addr in (1usize << 20..1usize << 40).prop_map(|a| a & !4095),
        view in any::<usize>().prop_map(|v| v & !4095),
    ) {
        const GRANULE: usize = 4096;
        let size = if cfg!(miri) { 8 << 20 } else { 64 << 20 };
        let mut table = vec![MetaEntry::default(); OobHeap::table_entries(size, GRANULE)];
        let mut h = oob_at(heap_addr, size, GRANULE, &mut table);
        let mut used = 0;
        for (bytes, k) in reqs {
            let align = 1usize << k;
            let l = Layout::from_size_align(bytes, align).unwrap();
            let before = h.stats();
            match h.allocate_offset(l, view) {
                Some(off) => {
                    prop_assert_eq!(view.wrapping_add(off) % align, 0, "align {:#x}", align);
                    prop_assert!(off + bytes <= size);
                    used += bytes.next_multiple_of(GRANULE) + align;
                }
                None => {
                    prop_assert_eq!(h.stats(), before);
                    // Refused only when the padding and blocks so far could have filled it.
                    prop_assert!(used + bytes + align > size / 2, "refused {bytes} at {align:#x}");
                }
            }
            h.check_invariants().unwrap();
        }
    }
}

/// Alignments past what a block can ever pad for (2^29 granules of 16 bytes: 2^33 bytes) are
/// refused, in the fast and the slow path, without touching the counters, wherever the region
/// lies. (Below that, whether a small region holds an aligned address depends on where it is.)
#[test]
fn alignments_beyond_the_heap_are_refused() {
    let mut buf = vec![0u128; 4096 / 16];
    let mut h = Heap::empty();
    // SAFETY: `buf` outlives the heap and is used by nothing else.
    unsafe { h.try_init(buf.as_mut_ptr().cast(), 4096) }.unwrap();
    let before = h.stats();
    for k in 34..usize::BITS {
        for size in [0, 1, 16, 2000] {
            let Ok(l) = Layout::from_size_align(size, 1 << k) else {
                continue;
            };
            assert!(h.allocate(l).is_none(), "size {size} align 2^{k}");
            assert_eq!(h.stats(), before);
        }
    }
    h.check_invariants().unwrap();
}

/// A view that is not on the granule cannot be aligned for (every offset is on the granule):
/// refused without a change.
#[test]
fn a_view_off_the_granule_is_refused() {
    const GRANULE: usize = 64;
    let size = 64 * GRANULE;
    let mut table = vec![MetaEntry::default(); OobHeap::table_entries(size, GRANULE)];
    let mut h = oob_at(1 << 20, size, GRANULE, &mut table);
    let before = h.stats();
    for (align, view) in [(1, 1), (2, 1), (64, 32), (4096, 0x1001), (128, 8)] {
        let l = Layout::from_size_align(1, align).unwrap();
        assert_eq!(
            h.allocate_offset(l, view),
            None,
            "align {align} view {view:#x}"
        );
        assert_eq!(h.stats(), before);
    }
    let l = Layout::from_size_align(1, 4096).unwrap();
    let off = h.allocate_offset(l, 0x1040).unwrap();
    assert_eq!((0x1040 + off) % 4096, 0);
}

/// Size 0 is served as the smallest block and freed as one.
#[test]
fn size_zero_is_a_smallest_block() {
    let mut buf = vec![0u128; 4096 / 16];
    let mut h = Heap::empty();
    // SAFETY: `buf` outlives the heap and is used by nothing else.
    unsafe { h.try_init(buf.as_mut_ptr().cast(), 4096) }.unwrap();
    let l = Layout::from_size_align(0, 1).unwrap();
    let p = h.allocate(l).unwrap();
    assert_eq!(h.stats().live_blocks, 1);
    assert_eq!(h.stats().used_bytes, 16);
    // SAFETY: allocated just above with `l`.
    unsafe { h.deallocate(p, l) };
    assert_eq!(h.stats().live_blocks, 0);
    h.check_invariants().unwrap();
}

/// The documented bound on the bytes of an in-band region that are in no block holds, and is
/// reached.
#[test]
fn in_band_loses_at_most_the_documented_bytes() {
    let mut buf = vec![0u128; 1024 / 16 + 2];
    let base = buf.as_mut_ptr().cast::<u8>();
    let mut worst = 0;
    for skew in 0..16 {
        for len in 512..560 {
            let mut h = Heap::empty();
            // SAFETY: `skew + len` bytes lie inside `buf`, which outlives the heap.
            unsafe { h.try_init(base.wrapping_add(skew), len) }.unwrap();
            let lost = len - h.stats().region_bytes;
            assert!(
                lost <= IN_BAND_MAX_LOSS,
                "skew {skew} len {len}: {lost} bytes lost"
            );
            worst = worst.max(lost);
        }
    }
    assert_eq!(worst, IN_BAND_MAX_LOSS);
}

/// Out of band, the entries inside a block must be zero (the checked free tells block starts
/// by them): `check_invariants` notices one that is not.
#[test]
fn out_of_band_check_finds_a_non_zero_entry_inside_a_block() {
    const GRANULE: usize = 64;
    let size = 64 * GRANULE;
    let mut table = vec![MetaEntry::default(); OobHeap::table_entries(size, GRANULE)];
    // One pointer for the heap and for the test's own write, so neither invalidates the other.
    let tp = table.as_mut_ptr();
    let start = core::ptr::without_provenance_mut::<u8>(1 << 20);
    // SAFETY: 1. the heap never touches its region; 2. `table` outlives the heap and is written
    // below only between heap calls, through the same pointer.
    let mut h = unsafe { OobHeap::new(start, size, GRANULE, tp, table.len()) }.unwrap();
    let off = h
        .allocate_offset(Layout::from_size_align(4 * GRANULE, 1).unwrap(), 0)
        .unwrap();
    h.check_invariants().unwrap();
    let inside = off / GRANULE + 2;
    // SAFETY: entry `inside` is one of the table's (four u32 each, `repr(C)`); the heap is not in
    // use during the write.
    unsafe { tp.add(inside).cast::<u32>().add(1).write(7) };
    let err = h.check_invariants().unwrap_err();
    assert_eq!(err.block, (off / GRANULE) as u32, "{err}");
}

/// `largest_free_bytes` never promises more than one allocation can take: a region of more
/// than 2^29 granules has a free block larger than any allocation. The region is reserved
/// address space; an in-band heap writes only the headers it places.
#[cfg(not(miri))]
#[test]
fn largest_free_bytes_is_an_allocation_that_succeeds() {
    let granules = (LOCAL_MASK as usize / 2) + 4096;
    let len = granules * 16 + 64;
    // Address space only (`MAP_NORESERVE`): pages are backed when the heap writes a header.
    // SAFETY: a fresh anonymous mapping; no existing memory is affected.
    let region = unsafe {
        libc::mmap(
            core::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    assert_ne!(region, libc::MAP_FAILED, "could not map {len} bytes");
    let region = region.cast::<u8>();
    let mut h = Heap::empty();
    // SAFETY: `region` is ours until it is freed below, after the heap's last use.
    unsafe { h.try_init(region, len) }.unwrap();
    let largest = h.stats().largest_free_bytes;
    assert!(largest > 0);
    let p = h.allocate(Layout::from_size_align(largest, 16).unwrap());
    assert!(
        p.is_some(),
        "largest_free_bytes {largest} cannot be allocated"
    );
    // SAFETY: mapped above with `len`; the heap is not used again.
    unsafe { libc::munmap(region.cast(), len) };
}
