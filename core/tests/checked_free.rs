//! Property test of `OobHeap::deallocate_at` and `OobHeap::resize_at`, the entry points that
//! check offsets they did not hand out: for any sequence of allocations, frees and in-place
//! resizes at arbitrary offsets, a free succeeds exactly when a live block starts at the offset
//! and returns that block's size; a resize of a live block shrinks it always and grows it only
//! into free space (never over another live block); `allocate_at` claims exactly the ranges
//! that are free; a heap rebuilt from the record of used blocks equals the original; and a
//! refused call changes nothing.

use std::alloc::Layout;
use std::collections::BTreeMap;

use proptest::prelude::*;
use xalloc_core::{AllocAtError, FreeError, MetaEntry, OobHeap, ResizeError};

const GRANULE: usize = 64;
#[cfg(not(miri))]
const CASES: u32 = 256;
#[cfg(miri)]
const CASES: u32 = 3;
#[cfg(not(miri))]
const MAX_OPS: usize = 300;
#[cfg(miri)]
const MAX_OPS: usize = 30;
const GRANULES: usize = 256;

#[derive(Clone, Debug)]
enum Op {
    /// Allocate this many bytes.
    Allocate(usize),
    /// Free at the start of the live block with this index (modulo the live count).
    FreeLive(usize),
    /// Free at an arbitrary offset, usually not a live block's start.
    FreeAt(usize),
    /// Resize the live block with this index (modulo the live count) to this many bytes.
    ResizeLive(usize, usize),
    /// Resize at an arbitrary offset.
    ResizeAt(usize, usize),
    /// Claim this many bytes at an arbitrary offset (`allocate_at`).
    AllocateAt(usize, usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (1..8 * GRANULE).prop_map(Op::Allocate),
        2 => any::<usize>().prop_map(Op::FreeLive),
        2 => (0..(GRANULES + 4) * GRANULE).prop_map(Op::FreeAt),
        2 => (any::<usize>(), 0..16 * GRANULE).prop_map(|(i, n)| Op::ResizeLive(i, n)),
        1 => (0..(GRANULES + 4) * GRANULE, 0..16 * GRANULE).prop_map(|(o, n)| Op::ResizeAt(o, n)),
        2 => (0..(GRANULES + 4) * GRANULE, 0..8 * GRANULE).prop_map(|(o, n)| Op::AllocateAt(o, n)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn checked_free_accepts_exactly_live_block_starts(ops in prop::collection::vec(op(), 1..MAX_OPS)) {
        let size = GRANULES * GRANULE;
        let mut region = vec![0u8; size];
        let mut table = vec![MetaEntry::default(); OobHeap::table_entries(size, GRANULE)];
        // SAFETY: region and table outlive the heap and are used by nothing else. The region is
        // a Vec<u8>, so `new` may align its start up and lose a granule; offsets are taken from
        // the heap itself.
        let mut heap = unsafe {
            OobHeap::new(region.as_mut_ptr(), size, GRANULE, table.as_mut_ptr(), table.len())
        }
        .unwrap();
        // Live blocks: offset -> size in bytes (whole granules).
        let mut live: BTreeMap<usize, usize> = BTreeMap::new();
        for op in ops {
            match op {
                Op::Allocate(n) => {
                    if let Some(p) = heap.allocate(Layout::from_size_align(n, 8).unwrap()) {
                        let off = heap.offset_of(p);
                        prop_assert!(live.insert(off, n.div_ceil(GRANULE) * GRANULE).is_none());
                    }
                }
                Op::FreeLive(i) if !live.is_empty() => {
                    let (&off, &bytes) = live.iter().nth(i % live.len()).unwrap();
                    prop_assert_eq!(heap.deallocate_at(off), Ok(bytes));
                    live.remove(&off);
                }
                Op::FreeLive(_) => {}
                Op::FreeAt(off) => {
                    let before = heap.stats();
                    match heap.deallocate_at(off) {
                        Ok(bytes) => prop_assert_eq!(live.remove(&off), Some(bytes)),
                        Err(e) => {
                            prop_assert!(!live.contains_key(&off), "refused a live block: {e}");
                            prop_assert_eq!(heap.stats(), before);
                            if off % GRANULE != 0 {
                                prop_assert_eq!(e, FreeError::Misaligned);
                            }
                        }
                    }
                }
                Op::ResizeLive(i, n) if !live.is_empty() => {
                    let (&off, &old) = live.iter().nth(i % live.len()).unwrap();
                    let before = heap.stats();
                    let want = n.div_ceil(GRANULE) * GRANULE;
                    match heap.resize_at(off, n) {
                        Ok(bytes) => {
                            prop_assert_eq!(bytes, want);
                            live.insert(off, bytes);
                        }
                        Err(ResizeError::BadSize) => prop_assert_eq!(n, 0),
                        Err(e) => {
                            prop_assert_eq!(e, ResizeError::NoRoom);
                            prop_assert!(want > old, "refused to shrink");
                            prop_assert_eq!(heap.stats(), before);
                        }
                    }
                }
                Op::ResizeLive(..) => {}
                Op::ResizeAt(off, n) => {
                    let before = heap.stats();
                    match heap.resize_at(off, n) {
                        Ok(bytes) => {
                            prop_assert!(live.contains_key(&off), "resized a non-block");
                            live.insert(off, bytes);
                        }
                        Err(ResizeError::Block(_)) => {
                            prop_assert!(!live.contains_key(&off), "refused a live block");
                            prop_assert_eq!(heap.stats(), before);
                        }
                        Err(_) => prop_assert_eq!(heap.stats(), before),
                    }
                }
                Op::AllocateAt(off, n) => {
                    let before = heap.stats();
                    let bytes = n.div_ceil(GRANULE) * GRANULE;
                    let region = heap.stats().region_bytes;
                    let fits = off % GRANULE == 0
                        && n > 0
                        && off + bytes <= region
                        && live.iter().all(|(&o, &b)| off + bytes <= o || o + b <= off);
                    match heap.allocate_at(off, n) {
                        Ok(()) => {
                            prop_assert!(fits, "claimed {}+{} over a used block or out of range", off, n);
                            live.insert(off, bytes);
                        }
                        Err(e) => {
                            prop_assert!(!fits, "refused a free range {}+{}: {}", off, n, e);
                            prop_assert_eq!(heap.stats(), before);
                            if off % GRANULE != 0 {
                                prop_assert_eq!(e, AllocAtError::Misaligned);
                            }
                        }
                    }
                }
            }
            // Live blocks never overlap, and the heap agrees with the model.
            let mut end = 0;
            for (&off, &bytes) in &live {
                prop_assert!(off >= end, "block at {} overlaps the previous one", off);
                end = off + bytes;
            }
            heap.check_invariants().map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(heap.stats().live_blocks, live.len());
            prop_assert_eq!(heap.stats().used_bytes, live.values().sum::<usize>());
        }
        // A heap rebuilt from the record of used blocks (as the daemon does after a crash) is
        // the same heap: same counters, valid, and no block can be claimed twice.
        // The second region starts at the same address modulo the granule, so that both heaps
        // lay out the same granules.
        let mut region2 = vec![0u8; size + GRANULE];
        let skew = (region.as_ptr().addr() % GRANULE + GRANULE - region2.as_ptr().addr() % GRANULE) % GRANULE;
        let mut table2 = vec![MetaEntry::default(); OobHeap::table_entries(size, GRANULE)];
        // SAFETY: as for the first heap; `skew < GRANULE`, so the region stays inside region2.
        let mut rebuilt = unsafe {
            OobHeap::new(region2.as_mut_ptr().add(skew), size, GRANULE, table2.as_mut_ptr(), table2.len())
        }
        .unwrap();
        prop_assert_eq!(rebuilt.stats().region_bytes, heap.stats().region_bytes);
        {
            for (&off, &bytes) in &live {
                prop_assert_eq!(rebuilt.allocate_at(off, bytes), Ok(()));
            }
            for (&off, &bytes) in &live {
                prop_assert_eq!(rebuilt.allocate_at(off, bytes), Err(AllocAtError::NotFree));
            }
            rebuilt.check_invariants().map_err(|e| TestCaseError::fail(e.to_string()))?;
            let (a, b) = (rebuilt.stats(), heap.stats());
            prop_assert_eq!((a.used_bytes, a.free_bytes, a.live_blocks), (b.used_bytes, b.free_bytes, b.live_blocks));
        }
    }
}
