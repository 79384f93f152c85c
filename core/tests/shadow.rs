//! Shadow-model property tests for every [`RegionAllocator`] in xalloc-core.
//!
//! Random sequences of allocate / free / realloc run against an allocator while a model keeps what
//! must stay true of it. After every operation the driver checks that:
//!
//! - every live block lies inside the region and is aligned as asked;
//! - no two live blocks overlap (the model keeps a map of live address ranges);
//! - every block keeps its contents: each block is filled with its own byte pattern, verified in
//!   full when it is freed or reallocated (up to the smaller of the old and new size), and at its
//!   first and last bytes for every live block after every operation, which catches an allocator
//!   that writes metadata into a neighbour;
//! - `check_invariants()` is `Ok`;
//! - `stats()` agrees with the model (live block count, region size, and the
//!   `largest_free_bytes` contract: an allocation with align <= 16 succeeds exactly when its size is
//!   at most `largest_free_bytes`).
//!
//! At the end everything is freed; the region must then be one free block again: `live_blocks`
//! is 0, the stats are those seen right after init, and an allocation of the whole
//! `largest_free_bytes` seen right after init succeeds.
//!
//! Under Miri the case and operation counts are cut so that `cargo miri test` stays short.

use std::alloc::Layout;
use std::collections::BTreeMap;
use std::ops::Range;
use std::ptr::NonNull;

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::TestCaseError;
use xalloc_core::{
    tlsf, FirstFit, Heap, InBand, MetaEntry, OobHeap, RegionAllocator, SmallHeap, Stats, Tlsf,
};

/// Sizes of the property runs; much smaller under Miri.
#[cfg(not(miri))]
mod limits {
    /// Cases per property.
    pub const CASES: u32 = 256;
    /// Most operations in one case.
    pub const MAX_OPS: usize = 400;
    /// Region size for the single-region properties.
    pub const REGION: usize = 256 * 1024;
    /// Upper end of the "large block" size class.
    pub const BIG: usize = 16 * 1024;
}
#[cfg(miri)]
mod limits {
    pub const CASES: u32 = 3;
    pub const MAX_OPS: usize = 24;
    pub const REGION: usize = 32 * 1024;
    pub const BIG: usize = 2 * 1024;
}

/// The largest alignment the tests ask for.
const MAX_ALIGN: usize = 4096;

#[derive(Clone, Debug)]
enum Op {
    Allocate { size: usize, align: usize },
    Free { index: Index },
    Realloc { index: Index, new_size: usize },
}

fn align() -> impl Strategy<Value = usize> {
    prop_oneof![
        8 => (0u32..=4).prop_map(|s| 1usize << s),
        3 => (5u32..=8).prop_map(|s| 1usize << s),
        1 => (9u32..=12).prop_map(|s| 1usize << s),
    ]
}

fn size() -> impl Strategy<Value = usize> {
    prop_oneof![
        12 => 1usize..=64,
        6 => 65usize..=1024,
        2 => 1025usize..=limits::BIG,
        // Mostly larger than what is free: exercises the failure path.
        1 => limits::BIG..=limits::REGION * 2,
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (size(), align()).prop_map(|(size, align)| Op::Allocate { size, align }),
        3 => any::<Index>().prop_map(|index| Op::Free { index }),
        2 => (any::<Index>(), size()).prop_map(|(index, new_size)| Op::Realloc { index, new_size }),
    ]
}

fn ops(max: usize) -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(op(), 1..=max)
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: limits::CASES,
        // No regression files in the source tree; a failure prints its shrunk input instead.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A heap-allocated buffer to hand to an allocator as its region.
struct Region {
    /// Owns the bytes (its capacity; its length stays 0); never touched again after `start` is
    /// taken from it.
    _buf: Vec<u64>,
    start: *mut u8,
    size: usize,
}

impl Region {
    /// `size` bytes starting `offset` bytes after an `align`-aligned address.
    fn new(size: usize, align: usize, offset: usize) -> Self {
        let words = (size + align + offset).div_ceil(8) + 1;
        // Left uninitialised, as a heap's memory is: Miri then also catches an allocator that
        // reads region bytes it never wrote.
        let mut buf = Vec::<u64>::with_capacity(words);
        let base = buf.as_mut_ptr().cast::<u8>();
        let pad = (align - base.addr() % align) % align;
        // `wrapping_add` keeps the provenance of `base`; the sum stays inside `buf`'s capacity
        // by the choice of `words` above.
        let start = base.wrapping_add(pad + offset);
        Region {
            _buf: buf,
            start,
            size,
        }
    }

    fn range(&self) -> Range<usize> {
        self.start.addr()..self.start.addr() + self.size
    }
}

/// What the driver may demand of an allocator's statistics.
#[derive(Clone, Copy, Debug)]
struct Expect {
    /// `stats().live_blocks` is exact.
    live_blocks: bool,
    /// `largest_free_bytes` is exact: an allocation with align <= 16 succeeds iff its size is at
    /// most `largest_free_bytes`.
    largest_free: bool,
    /// Once everything is freed, `stats()` equals what it was right after init.
    restores_stats: bool,
}

const EXACT: Expect = Expect {
    live_blocks: true,
    largest_free: true,
    restores_stats: true,
};

struct Live {
    ptr: NonNull<u8>,
    layout: Layout,
    seed: u8,
}

/// Period of the byte pattern: a prime, so that no power-of-two shift of a block's contents
/// matches the pattern again.
const PERIOD: usize = 251;

/// Two periods of the pattern, so that any `PERIOD` bytes starting in the first period are one
/// slice: blocks are filled and checked a slice at a time (one `memcpy`/`memcmp` each, which keeps
/// Miri fast) rather than a byte at a time.
static PATTERN: [u8; 2 * PERIOD] = {
    let mut t = [0u8; 2 * PERIOD];
    let mut k = 0;
    while k < 2 * PERIOD {
        t[k] = ((k % PERIOD) * 97 % PERIOD) as u8;
        k += 1;
    }
    t
};

/// Byte `i` of the pattern of the block with `seed`: the pattern shifted by the seed, so that
/// every block's contents differ from its neighbours'.
fn pattern(seed: u8, i: usize) -> u8 {
    PATTERN[(seed as usize + i) % PERIOD]
}

/// The pattern of the block with `seed`, from byte `i` on, for at most `PERIOD` bytes.
fn pattern_run(seed: u8, i: usize, len: usize) -> &'static [u8] {
    let start = (seed as usize + i) % PERIOD;
    &PATTERN[start..start + len.min(PERIOD)]
}

/// The shadow of one allocator: the blocks it handed out and what each must contain.
struct Model {
    region: Range<usize>,
    /// The parts of `region` given to the heap, when it was given several: every block must lie
    /// inside one of them. Empty: the whole region.
    subs: Vec<Range<usize>>,
    blocks: Vec<Live>,
    /// start address -> end address of every live block.
    ranges: BTreeMap<usize, usize>,
    next_seed: u8,
}

impl Model {
    fn new(region: Range<usize>) -> Self {
        Model {
            region,
            subs: Vec::new(),
            blocks: Vec::new(),
            ranges: BTreeMap::new(),
            next_seed: 1,
        }
    }

    /// Checks that a block the allocator just returned is in the region, aligned and disjoint
    /// from every live block, then records its range.
    fn place(&mut self, ptr: NonNull<u8>, layout: Layout) -> Result<(), TestCaseError> {
        let start = ptr.as_ptr().addr();
        let end = start + layout.size();
        prop_assert!(
            self.region.start <= start && end <= self.region.end,
            "block {start:#x}..{end:#x} ({layout:?}) outside region {:#x}..{:#x}",
            self.region.start,
            self.region.end
        );
        prop_assert!(
            start & (layout.align() - 1) == 0,
            "block at {start:#x} not aligned to {}",
            layout.align()
        );
        prop_assert!(
            self.subs.is_empty() || self.subs.iter().any(|r| r.start <= start && end <= r.end),
            "block {start:#x}..{end:#x} in none of the regions given {:x?}",
            self.subs
        );
        if let Some((&s, &e)) = self.ranges.range(..end).next_back() {
            prop_assert!(
                e <= start,
                "block {start:#x}..{end:#x} overlaps live block {s:#x}..{e:#x}"
            );
        }
        self.ranges.insert(start, end);
        Ok(())
    }

    fn unplace(&mut self, ptr: NonNull<u8>) {
        self.ranges.remove(&ptr.as_ptr().addr());
    }

    fn take_seed(&mut self) -> u8 {
        let seed = self.next_seed;
        self.next_seed = self.next_seed.wrapping_add(37) | 1;
        seed
    }
}

/// Writes the block's pattern into bytes `from..to`.
///
/// # Safety
/// `ptr..ptr + to` is a live block this test owns.
unsafe fn fill(ptr: NonNull<u8>, from: usize, to: usize, seed: u8) {
    let mut i = from;
    while i < to {
        let run = pattern_run(seed, i, to - i);
        // SAFETY: `i + run.len() <= to`, inside the block by the caller's guarantee; the pattern
        // table is not inside any block.
        unsafe {
            ptr.as_ptr()
                .add(i)
                .copy_from_nonoverlapping(run.as_ptr(), run.len())
        };
        i += run.len();
    }
}

/// Checks bytes `from..to` of a block against its pattern.
///
/// # Safety
/// `ptr..ptr + to` is a live block this test owns, filled up to `to`.
unsafe fn verify(
    ptr: NonNull<u8>,
    from: usize,
    to: usize,
    seed: u8,
    what: &str,
) -> Result<(), TestCaseError> {
    let mut i = from;
    while i < to {
        let want = pattern_run(seed, i, to - i);
        // SAFETY: `i + want.len() <= to`, inside the block by the caller's guarantee.
        let got = unsafe { std::slice::from_raw_parts(ptr.as_ptr().add(i), want.len()) };
        if got != want {
            let k = (0..want.len()).find(|&k| got[k] != want[k]).unwrap();
            return Err(TestCaseError::fail(format!(
                "{what}: byte {} of the block at {:#x} is {:#04x}, expected {:#04x}",
                i + k,
                ptr.as_ptr().addr(),
                got[k],
                pattern(seed, i + k)
            )));
        }
        i += want.len();
    }
    Ok(())
}

/// Checks the first and last few bytes of every live block.
fn verify_edges(model: &Model) -> Result<(), TestCaseError> {
    const EDGE: usize = 16;
    for b in &model.blocks {
        let n = b.layout.size();
        // SAFETY: the block is live and was filled in full when it was placed.
        unsafe {
            verify(b.ptr, 0, n.min(EDGE), b.seed, "live block head")?;
            verify(b.ptr, n.saturating_sub(EDGE), n, b.seed, "live block tail")?;
        }
    }
    Ok(())
}

fn check_state<A: RegionAllocator>(
    a: &A,
    model: &Model,
    initial: &Stats,
    expect: Expect,
    step: usize,
) -> Result<(), TestCaseError> {
    if let Err(e) = a.check_invariants() {
        return Err(TestCaseError::fail(format!(
            "check_invariants failed after op {step}: {e:?}"
        )));
    }
    let s = a.stats();
    prop_assert_eq!(
        s.region_bytes,
        initial.region_bytes,
        "region_bytes changed after op {}",
        step
    );
    if expect.live_blocks {
        prop_assert_eq!(
            s.live_blocks,
            model.blocks.len(),
            "live_blocks wrong after op {}: {:?}",
            step,
            s
        );
    }
    let live_bytes: usize = model.blocks.iter().map(|b| b.layout.size()).sum();
    prop_assert!(
        s.used_bytes >= live_bytes,
        "used_bytes {} < {} bytes held by live blocks after op {}",
        s.used_bytes,
        live_bytes,
        step
    );
    prop_assert!(
        s.used_bytes + s.free_bytes <= s.region_bytes,
        "used + free > region after op {}: {:?}",
        step,
        s
    );
    prop_assert!(
        s.quick_list_bytes <= s.free_bytes,
        "quick_list_bytes > free_bytes after op {}: {:?}",
        step,
        s
    );
    prop_assert!(
        s.largest_free_bytes <= s.free_bytes,
        "largest_free_bytes > free_bytes after op {}: {:?}",
        step,
        s
    );
    verify_edges(model)
}

/// Drives `a`, freshly initialised over `region`, through `ops`, checking it against a shadow
/// model after every operation, then frees everything and checks the region is whole again.
fn run<A: RegionAllocator>(
    a: &mut A,
    ops: &[Op],
    region: Range<usize>,
    expect: Expect,
) -> Result<(), TestCaseError> {
    run_in(a, ops, region, Vec::new(), expect)
}

/// [`run`] for a heap given the parts `subs` of `region` (empty: all of it).
fn run_in<A: RegionAllocator>(
    a: &mut A,
    ops: &[Op],
    region: Range<usize>,
    subs: Vec<Range<usize>>,
    expect: Expect,
) -> Result<(), TestCaseError> {
    let mut model = Model::new(region);
    model.subs = subs;
    let initial = a.stats();
    check_state(a, &model, &initial, expect, 0)?;

    for (step, op) in ops.iter().enumerate() {
        let step = step + 1;
        match *op {
            Op::Allocate { size, align } => {
                let layout = Layout::from_size_align(size, align).unwrap();
                let before = a.stats();
                let got = a.allocate(layout);
                if expect.largest_free && align <= 16 && before.quick_list_bytes != 0 {
                    // Blocks on the quick lists are in no free block: a larger request may
                    // take one of them, or succeed once they are merged back.
                    prop_assert!(
                        got.is_some() || size > before.largest_free_bytes,
                        "op {}: allocate({:?}) failed with largest_free_bytes = {}",
                        step,
                        layout,
                        before.largest_free_bytes
                    );
                } else if expect.largest_free && align <= 16 {
                    prop_assert_eq!(
                        got.is_some(),
                        size <= before.largest_free_bytes,
                        "op {}: allocate({:?}) with largest_free_bytes = {} returned {:?}",
                        step,
                        layout,
                        before.largest_free_bytes,
                        got
                    );
                }
                if let Some(ptr) = got {
                    model.place(ptr, layout)?;
                    let seed = model.take_seed();
                    // SAFETY: the block was just handed out for `layout`.
                    unsafe { fill(ptr, 0, size, seed) };
                    model.blocks.push(Live { ptr, layout, seed });
                }
            }
            Op::Free { index } => {
                if model.blocks.is_empty() {
                    continue;
                }
                let b = model.blocks.swap_remove(index.index(model.blocks.len()));
                // SAFETY: live block, filled in full.
                unsafe { verify(b.ptr, 0, b.layout.size(), b.seed, "free")? };
                model.unplace(b.ptr);
                // SAFETY: allocated by `a` with this layout and not freed since.
                unsafe { a.deallocate(b.ptr, b.layout) };
            }
            Op::Realloc { index, new_size } => {
                if model.blocks.is_empty() {
                    continue;
                }
                let i = index.index(model.blocks.len());
                let (ptr, layout, seed) = {
                    let b = &model.blocks[i];
                    (b.ptr, b.layout, b.seed)
                };
                // SAFETY: allocated by `a` with this layout and not freed since.
                match unsafe { a.reallocate(ptr, layout, new_size) } {
                    Some(new) => {
                        let new_layout = Layout::from_size_align(new_size, layout.align()).unwrap();
                        let kept = layout.size().min(new_size);
                        // SAFETY: `new` is live for `new_layout`; its first `kept` bytes were
                        // copied from the old block, which was filled in full.
                        unsafe { verify(new, 0, kept, seed, "realloc")? };
                        model.unplace(ptr);
                        model.place(new, new_layout)?;
                        // SAFETY: `new` is live for `new_size` bytes.
                        unsafe { fill(new, kept, new_size, seed) };
                        model.blocks[i] = Live {
                            ptr: new,
                            layout: new_layout,
                            seed,
                        };
                    }
                    None => {
                        // A failed realloc leaves the old block as it was.
                        // SAFETY: the old block is still live and filled in full.
                        unsafe { verify(ptr, 0, layout.size(), seed, "failed realloc")? };
                    }
                }
            }
        }
        check_state(a, &model, &initial, expect, step)?;
    }

    // Free everything: the region must be one free block again.
    for b in model.blocks.drain(..) {
        // SAFETY: live block, filled in full.
        unsafe { verify(b.ptr, 0, b.layout.size(), b.seed, "final free")? };
        // SAFETY: allocated by `a` with this layout and not freed since.
        unsafe { a.deallocate(b.ptr, b.layout) };
    }
    model.ranges.clear();
    let end = ops.len() + 1;
    check_state(a, &model, &initial, expect, end)?;
    a.trim();
    check_state(a, &model, &initial, expect, end)?;
    let s = a.stats();
    prop_assert_eq!(s.quick_list_bytes, 0, "trim left blocks on the quick lists");
    if expect.live_blocks {
        prop_assert_eq!(s.live_blocks, 0);
    }
    if expect.restores_stats {
        prop_assert_eq!(
            s,
            initial,
            "stats after freeing everything differ from after init"
        );
    }
    if initial.largest_free_bytes > 0 {
        let layout = Layout::from_size_align(initial.largest_free_bytes, 16).unwrap();
        let Some(ptr) = a.allocate(layout) else {
            return Err(TestCaseError::fail(format!(
                "after freeing everything, allocate({layout:?}) of the whole initial \
                 largest_free_bytes failed; stats now {s:?}"
            )));
        };
        model.place(ptr, layout)?;
        // SAFETY: the block was just handed out for `layout`.
        unsafe { fill(ptr, 0, layout.size(), 0x5a) };
        // SAFETY: just filled.
        unsafe { verify(ptr, 0, layout.size(), 0x5a, "whole-region block")? };
        // SAFETY: allocated by `a` with this layout and not freed since.
        unsafe { a.deallocate(ptr, layout) };
        model.unplace(ptr);
        check_state(a, &model, &initial, expect, end + 1)?;
    }
    Ok(())
}

/// `FirstFit` counts its live blocks, but its `largest_free_bytes` is only an upper bound (all
/// free bytes): the crate it wraps cannot tell the largest hole.
fn first_fit_expect() -> Expect {
    Expect {
        largest_free: false,
        ..EXACT
    }
}

const GRANULES: [usize; 3] = [16, 64, 4096];

fn oob_table(size: usize, granule: usize) -> Vec<MetaEntry> {
    vec![MetaEntry::default(); OobHeap::table_entries(size, granule)]
}

/// Builds an `OobHeap` over `region` with a table of the size it asks for.
fn oob_heap(region: &Region, granule: usize, table: &mut [MetaEntry]) -> OobHeap {
    // SAFETY: 1. the region is a live buffer of `region.size` bytes used by nothing else;
    // 2. the table holds `table_entries(size, granule)` entries and outlives the heap.
    let heap = unsafe {
        OobHeap::new(
            region.start,
            region.size,
            granule,
            table.as_mut_ptr(),
            table.len(),
        )
    };
    match heap {
        Ok(h) => h,
        Err(e) => panic!(
            "OobHeap::new({} bytes, granule {granule}) failed: {e:?}",
            region.size
        ),
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn heap_in_band(
        ops in ops(limits::MAX_OPS),
        compact_above in prop::sample::select(vec![0u8, 1, 25, 100]),
        bins in prop::sample::select(vec![0u8, 25, 100]),
    ) {
        let region = Region::new(limits::REGION, MAX_ALIGN, 0);
        let mut heap = Heap::empty();
        // SAFETY: the region is a live buffer used by nothing else; it outlives the heap.
        unsafe { heap.init(region.start, region.size) };
        heap.set_compact_above(compact_above);
        heap.set_size_bins(bins);
        run(&mut heap, &ops, region.range(), EXACT)?;
    }

    /// The small configuration; a region past its 128 KiB is cut into two.
    #[test]
    fn small_heap_in_band(ops in ops(limits::MAX_OPS)) {
        let region = Region::new(limits::REGION, MAX_ALIGN, 0);
        let mut heap = SmallHeap::empty();
        // SAFETY: the region is a live buffer used by nothing else; it outlives the heap.
        unsafe { heap.init(region.start, region.size) };
        run(&mut heap, &ops, region.range(), EXACT)?;
    }

    #[test]
    fn oob_heap_granule_16(ops in ops(limits::MAX_OPS)) {
        let region = Region::new(limits::REGION, MAX_ALIGN, 0);
        let mut table = oob_table(region.size, 16);
        let mut heap = oob_heap(&region, 16, &mut table);
        run(&mut heap, &ops, region.range(), EXACT)?;
    }

    #[test]
    fn oob_heap_granule_64(ops in ops(limits::MAX_OPS)) {
        let region = Region::new(limits::REGION, MAX_ALIGN, 0);
        let mut table = oob_table(region.size, 64);
        let mut heap = oob_heap(&region, 64, &mut table);
        run(&mut heap, &ops, region.range(), EXACT)?;
    }

    #[test]
    fn oob_heap_granule_4096(ops in ops(limits::MAX_OPS)) {
        // Page-sized granules: give it a bigger region so it holds more than a few blocks.
        let region = Region::new(limits::REGION * 4, MAX_ALIGN, 0);
        let mut table = oob_table(region.size, 4096);
        let mut heap = oob_heap(&region, 4096, &mut table);
        run(&mut heap, &ops, region.range(), EXACT)?;
    }

    #[test]
    fn first_fit(ops in ops(limits::MAX_OPS)) {
        let region = Region::new(limits::REGION, MAX_ALIGN, 0);
        let mut heap = FirstFit::empty();
        // SAFETY: the region is a live buffer used by nothing else; it outlives the heap.
        unsafe { heap.init(region.start, region.size) };
        run(&mut heap, &ops, region.range(), first_fit_expect())?;
    }

    /// Regions of many sizes, from too small to hold anything to 1 MiB, at unaligned starts.
    #[test]
    fn heap_region_sizes(
        size in prop::sample::select(REGION_SIZES.to_vec()),
        offset in 0usize..16,
        bins in prop::sample::select(vec![0u8, 25, 100]),
        ops in ops(limits::MAX_OPS / 4),
    ) {
        in_band_region_size::<{ tlsf::FL }, { tlsf::SL }, { tlsf::SIZE_BINS }>(
            size, offset, bins, &ops,
        )?;
    }

    /// The same for the small configuration.
    #[test]
    fn small_heap_region_sizes(
        size in prop::sample::select(REGION_SIZES.to_vec()),
        offset in 0usize..16,
        ops in ops(limits::MAX_OPS / 4),
    ) {
        in_band_region_size::<{ tlsf::SMALL_FL }, { tlsf::SMALL_SL }, 0>(size, offset, 25, &ops)?;
    }

    /// The same for the out-of-band heap, at every granule, with granule-aligned starts.
    #[test]
    fn oob_heap_region_sizes(
        size in prop::sample::select(REGION_SIZES.to_vec()),
        granule in prop::sample::select(GRANULES.to_vec()),
        ops in ops(limits::MAX_OPS / 4),
    ) {
        let region = Region::new(size, MAX_ALIGN, 0);
        let mut table = oob_table(region.size, granule);
        // SAFETY: as in `oob_heap`.
        let heap = unsafe {
            OobHeap::new(region.start, region.size, granule, table.as_mut_ptr(), table.len())
        };
        match heap {
            Ok(mut heap) => run(&mut heap, &ops, region.range(), EXACT)?,
            // Refusing a region is fair only when it is too small to be worth managing.
            Err(e) => prop_assert!(
                size < 4 * granule.max(64),
                "OobHeap::new refused {} bytes at granule {}: {:?}", size, granule, e
            ),
        }
    }
}

/// An in-band heap with `FL` × `SL` classes and `SB` size bins (set to `bins` %) over `size`
/// bytes starting `offset` bytes past a 16-aligned address, driven through `ops`.
fn in_band_region_size<const FL: usize, const SL: usize, const SB: usize>(
    size: usize,
    offset: usize,
    bins: u8,
    ops: &[Op],
) -> Result<(), TestCaseError> {
    let region = Region::new(size, MAX_ALIGN, offset);
    let mut heap = Tlsf::<InBand, FL, SL, SB>::empty();
    // SAFETY: the region is a live buffer used by nothing else; it outlives the heap.
    unsafe { heap.init(region.start, region.size) };
    heap.set_size_bins(bins);
    run(&mut heap, ops, region.range(), EXACT)
}

/// Region sizes for the multi-size properties: empty, tiny, odd and large.
#[cfg(not(miri))]
const REGION_SIZES: [usize; 12] = [
    0,
    1,
    15,
    64,
    100,
    255,
    4096,
    4099,
    12345,
    65536 + 13,
    300_000,
    1 << 20,
];
#[cfg(miri)]
const REGION_SIZES: [usize; 8] = [0, 1, 15, 64, 100, 255, 4099, 65536 + 13];

/// The small configuration's largest block, in bytes.
const SMALL_MAX_BYTES: usize = 8191 * 16;

/// Sizes that reach the largest block of the small configuration and past it.
fn wide_size() -> impl Strategy<Value = usize> {
    prop_oneof![
        8 => 1usize..=64,
        4 => 65usize..=1024,
        4 => 1025usize..=16 * 1024,
        3 => 16 * 1024usize..=SMALL_MAX_BYTES + 64,
        3 => (0usize..48).prop_map(|d| SMALL_MAX_BYTES + 24 - d),
        3 => (0usize..64).prop_map(|d| SMALL_MAX_BYTES / 2 + 32 - d),
        1 => SMALL_MAX_BYTES..=1 << 20,
    ]
}

fn wide_op() -> impl Strategy<Value = Op> {
    let align = prop_oneof![
        6 => (0u32..=4).prop_map(|s| 1usize << s),
        3 => (5u32..=10).prop_map(|s| 1usize << s),
        2 => (11u32..=12).prop_map(|s| 1usize << s),
    ];
    prop_oneof![
        5 => (wide_size(), align).prop_map(|(size, align)| Op::Allocate { size, align }),
        3 => any::<Index>().prop_map(|index| Op::Free { index }),
        3 => (any::<Index>(), wide_size())
            .prop_map(|(index, new_size)| Op::Realloc { index, new_size }),
    ]
}

/// Sizes of the parts of one buffer given to a heap as its regions: too small for a block,
/// around the small configuration's largest block, and larger (cut into several regions).
fn part_sizes() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(
        prop::sample::select(vec![
            0usize,
            15,
            40,
            100,
            4096,
            65536 + 13,
            SMALL_MAX_BYTES - 1,
            SMALL_MAX_BYTES + 8,
            SMALL_MAX_BYTES + 23,
            SMALL_MAX_BYTES + 40,
            131072,
            300_000,
        ]),
        1..=5,
    )
}

/// Gives a `Tlsf<InBand, FL, SL, SB>` the parts `sizes` of one buffer (at start offsets
/// `offsets`, with gaps between them), with `compact_above` and `bins` (`set_size_bins`) set
/// before or after, and runs `ops` on it.
fn run_on_parts<const FL: usize, const SL: usize, const SB: usize>(
    sizes: &[usize],
    offsets: &[usize],
    compact_above: u8,
    bins: u8,
    set_before: bool,
    ops: &[Op],
) -> Result<(), TestCaseError> {
    let gap = 48;
    let total = sizes.iter().sum::<usize>() + (gap + 16) * sizes.len();
    let region = Region::new(total, MAX_ALIGN, 0);
    let mut heap = Tlsf::<InBand, FL, SL, SB>::empty();
    if set_before {
        heap.set_compact_above(compact_above);
        heap.set_size_bins(bins);
    }
    let (mut parts, mut at) = (Vec::new(), 0);
    for (i, &size) in sizes.iter().enumerate() {
        let start = region
            .start
            .wrapping_add(at + offsets[i % offsets.len()] % 16);
        // SAFETY: disjoint parts of a live buffer used by nothing else; it outlives the heap.
        if unsafe { heap.add_region(start, size) }.is_ok() {
            parts.push(start.addr()..start.addr() + size);
        }
        at += 16 + size + gap;
    }
    if !set_before {
        heap.set_compact_above(compact_above);
        heap.set_size_bins(bins);
    }
    // A part larger than the largest block becomes several regions, cut with no byte lost but
    // the 16 of each cut: recompute where the heap must have cut them.
    let max = Tlsf::<InBand, FL, SL, SB>::MAX_BLOCK_GRANULES as usize;
    let (mut regions, mut granules) = (0, 0);
    for part in &parts {
        let (mut at, end) = (part.start, part.end);
        while regions < xalloc_core::store::IN_BAND_REGIONS {
            // The first payload: 16-aligned, with its 8-byte header in the part.
            let base = (at + 8).next_multiple_of(16);
            let n = end.saturating_sub(base) / 16;
            if n == 0 {
                break;
            }
            let n = n
                .min(max)
                .min(xalloc_core::store::MAX_REGION_GRANULES as usize - 1);
            (regions, granules) = (regions + 1, granules + n);
            at = base + 16 * n;
        }
    }
    prop_assert_eq!(heap.region_count(), regions);
    prop_assert_eq!(heap.stats().region_bytes, granules * 16);
    heap.check_invariants()
        .map_err(|e| TestCaseError::fail(format!("{e}")))?;
    run_in(&mut heap, ops, region.range(), parts, EXACT)
}

proptest! {
    // A quarter of the cases: each runs on up to five regions with blocks of up to 1 MiB.
    #![proptest_config(ProptestConfig { cases: limits::CASES / 4, ..config() })]

    /// The small configuration over several regions, some cut at its largest block, at every
    /// compaction setting.
    // Blocks of up to 1 MiB, filled and checked byte by byte: too slow for Miri, which
    // runs the other properties here.
    #[cfg_attr(miri, ignore)]
    #[test]
    fn small_heap_regions(
        sizes in part_sizes(),
        offsets in prop::collection::vec(0usize..16, 1..=4),
        compact_above in prop::sample::select(vec![0u8, 1, 25, 50, 100, 255]),
        set_before in any::<bool>(),
        ops in prop::collection::vec(wide_op(), 1..=limits::MAX_OPS / 2),
    ) {
        run_on_parts::<{ xalloc_core::tlsf::SMALL_FL }, { xalloc_core::tlsf::SMALL_SL }, 0>(
            &sizes, &offsets, compact_above, 25, set_before, &ops,
        )?;
    }

    /// The same for the default configuration.
    // Blocks of up to 1 MiB, filled and checked byte by byte: too slow for Miri, which
    // runs the other properties here.
    #[cfg_attr(miri, ignore)]
    #[test]
    fn heap_regions(
        sizes in part_sizes(),
        offsets in prop::collection::vec(0usize..16, 1..=4),
        compact_above in prop::sample::select(vec![0u8, 1, 25, 50, 100, 255]),
        bins in prop::sample::select(vec![0u8, 5, 25, 100, 255]),
        set_before in any::<bool>(),
        ops in prop::collection::vec(wide_op(), 1..=limits::MAX_OPS / 2),
    ) {
        run_on_parts::<
            { xalloc_core::tlsf::FL },
            { xalloc_core::tlsf::SL },
            { xalloc_core::tlsf::SIZE_BINS },
        >(&sizes, &offsets, compact_above, bins, set_before, &ops)?;
    }

    /// A configuration neither uses (7 x 8 classes, 8 size bins: blocks of up to 1023 granules).
    // Blocks of up to 1 MiB, filled and checked byte by byte: too slow for Miri, which
    // runs the other properties here.
    #[cfg_attr(miri, ignore)]
    #[test]
    fn odd_configuration(
        sizes in part_sizes(),
        compact_above in prop::sample::select(vec![0u8, 25, 100]),
        bins in prop::sample::select(vec![0u8, 25, 100]),
        ops in prop::collection::vec(wide_op(), 1..=limits::MAX_OPS / 2),
    ) {
        run_on_parts::<7, 8, 8>(&sizes, &[3], compact_above, bins, true, &ops)?;
    }
}

/// A region too small to hold any block leaves a heap whose allocations all fail.
#[test]
fn tiny_regions_allocate_nothing() {
    for size in [0usize, 1, 2, 7, 8, 15] {
        let region = Region::new(size, 16, 0);
        let mut heap = Heap::empty();
        // SAFETY: the region is a live buffer used by nothing else; it outlives the heap.
        unsafe { heap.init(region.start, region.size) };
        assert_eq!(heap.allocate(Layout::from_size_align(1, 1).unwrap()), None);
        assert!(heap.check_invariants().is_ok());
        assert_eq!(heap.stats().live_blocks, 0);
    }
}

/// An empty heap (never initialised) allocates nothing.
#[test]
fn empty_heap_allocates_nothing() {
    let mut heap = Heap::empty();
    assert_eq!(heap.allocate(Layout::from_size_align(8, 8).unwrap()), None);
    assert!(heap.check_invariants().is_ok());
}

/// Right after init, `largest_free_bytes` is exact: that size succeeds, one granule more fails.
#[test]
fn largest_free_is_exact_after_init() {
    for size in [4096usize, 4099, 65536 + 13, limits::REGION] {
        let region = Region::new(size, 16, 0);
        let mut heap = Heap::empty();
        // SAFETY: the region is a live buffer used by nothing else; it outlives the heap.
        unsafe { heap.init(region.start, region.size) };
        let s = heap.stats();
        assert!(s.largest_free_bytes > 0, "{size}-byte region: {s:?}");
        assert!(s.largest_free_bytes <= size, "{size}-byte region: {s:?}");
        assert_eq!(s.free_blocks, 1, "{size}-byte region: {s:?}");
        assert_eq!(s.live_blocks, 0, "{size}-byte region: {s:?}");
        let too_big = Layout::from_size_align(s.largest_free_bytes + 1, 16).unwrap();
        assert_eq!(heap.allocate(too_big), None, "{size}-byte region: {s:?}");
        let all = Layout::from_size_align(s.largest_free_bytes, 16).unwrap();
        let p = heap.allocate(all).expect("whole largest_free_bytes");
        assert_eq!(heap.stats().live_blocks, 1);
        // SAFETY: allocated just above with `all`.
        unsafe { heap.deallocate(p, all) };
        assert_eq!(heap.stats(), s);
    }
}

/// Allocate small blocks until the region is full, free every other one, fill the holes again,
/// then free everything: the region is one block again.
#[test]
fn fill_drain_refill() {
    fn exercise<A: RegionAllocator>(a: &mut A, name: &str) {
        let initial = a.stats();
        let layout = Layout::from_size_align(48, 16).unwrap();
        let mut blocks = Vec::new();
        while let Some(p) = a.allocate(layout) {
            blocks.push(p);
        }
        assert!(
            blocks.len() > 10,
            "{name}: only {} blocks fit",
            blocks.len()
        );
        assert!(a.check_invariants().is_ok(), "{name}: full");
        let full = blocks.len();
        let mut kept = Vec::new();
        for (i, p) in blocks.drain(..).enumerate() {
            if i % 2 == 0 {
                // SAFETY: allocated above with `layout`, freed once.
                unsafe { a.deallocate(p, layout) };
            } else {
                kept.push(p);
            }
        }
        assert!(a.check_invariants().is_ok(), "{name}: holes");
        let mut refilled = 0;
        while let Some(p) = a.allocate(layout) {
            kept.push(p);
            refilled += 1;
        }
        assert_eq!(refilled, full.div_ceil(2), "{name}: holes refilled");
        for p in kept {
            // SAFETY: allocated above with `layout`, freed once.
            unsafe { a.deallocate(p, layout) };
        }
        assert!(a.check_invariants().is_ok(), "{name}: drained");
        assert_eq!(a.stats().live_blocks, 0, "{name}: drained");
        a.trim();
        assert!(a.check_invariants().is_ok(), "{name}: trimmed");
        assert_eq!(a.stats().largest_free_bytes, initial.largest_free_bytes);
    }

    let size = if cfg!(miri) { 8 * 1024 } else { 64 * 1024 };
    let region = Region::new(size, MAX_ALIGN, 0);
    let mut heap = Heap::empty();
    // SAFETY: the region is a live buffer used by nothing else; it outlives the heap.
    unsafe { heap.init(region.start, region.size) };
    exercise(&mut heap, "Heap");

    for granule in [16, 64] {
        let region = Region::new(size, MAX_ALIGN, 0);
        let mut table = oob_table(size, granule);
        let mut heap = oob_heap(&region, granule, &mut table);
        exercise(&mut heap, &format!("OobHeap granule {granule}"));
    }
}
