//! The allocator core of xalloc: a two-level segregated-fit (TLSF) heap over caller-given
//! regions, with no OS dependency.
//!
//! # Map
//!
//! - [`Tlsf`] ([`tlsf`]): the algorithm. O(1) allocate and free for every alignment, immediate
//!   coalescing (except for small blocks held whole on quick lists while an in-band heap is
//!   roomy), in-place reallocation when the next block is free. Generic over a
//!   [`MetaStore`] ([`store`]) that says where block metadata lives:
//!   - [`Heap`] = `Tlsf<InBand>`: 8-byte headers beside the blocks, 16-byte minimum block, up to
//!     [`MAX_REGIONS`](store::MAX_REGIONS) regions. The embedded heap.
//!   - [`OobHeap`] = `Tlsf<OutOfBand, FL, SL, 0>`: metadata in a separate table, nothing
//!     written inside the region, and a checked free by offset ([`OobHeap::deallocate_at`]) for
//!     offsets that come from untrusted parties. The daemon's shared arena.
//! - [`LockedHeap`]: a [`Heap`] behind a lock (a spin lock, or a critical section with the
//!   `critical-section` feature), usable as `#[global_allocator]`; [`SmallLockedHeap`] the same
//!   over a [`SmallHeap`] (state under 1 KiB, for heaps up to about 128 KiB).
//! - [`FirstFit`]: the `linked_list_allocator` crate's heap behind the same [`RegionAllocator`]
//!   trait, kept as the reference baseline.
//!
//! The protocol between the daemon and its clients, and the OS layer beneath it, live in the
//! `xalloc-proto` crate: this one is the allocation algorithms and nothing else.
//!
//! Every free-list link the algorithm stores is a granule index from the start of its region,
//! never an address, so a region can be mapped at a different address in each process that uses
//! it. The quick lists link payload addresses, and only in band: a heap whose metadata lives in
//! its region is one process's memory, while a shared region is out of band and has none.
//!
//! # Code size
//!
//! The cargo feature **`small-code`** builds the in-band heaps for flash-constrained firmware: a
//! [`SmallLockedHeap`] then adds about 1.3 KB of code to a Cortex-M firmware, no more than rlsf
//! (3.7 KB without the feature; the README's "Code size" table, `scripts/code-size.sh`). Same
//! API; what it gives up, compiled out:
//!
//! - the low-address placement and reallocation policy ([`Tlsf::set_compact_above`] has no
//!   effect): a workload may need more memory;
//! - the exhaustive search: allocation takes a block of the smallest non-empty class whose every
//!   block fits (good fit), so it fails when only a block of a lower class would fit, and for
//!   requests above half the largest block. [`Stats::largest_free_bytes`] reports what that
//!   search guarantees;
//! - reallocation resizes in place when the block or its free successor has room, and otherwise
//!   allocates, copies and frees;
//! - the quick lists (every freed block is merged at once; their heads stay in the state);
//! - one region per [`Heap`] or [`SmallHeap`] (`add_region` returns
//!   [`InitError::TooManyRegions`]; a region larger than the largest block is used up to it);
//! - [`Tlsf::stats`] counts the free blocks by walking the free lists (O(free blocks)).
//!
//! Allocation, free and in-place reallocation stay O(1), every alignment is honoured and
//! [`Tlsf::check_invariants`] holds. The feature changes every in-band heap of the build (cargo
//! features add up), so a host program should not enable it; [`OobHeap`] (the daemon's arena)
//! keeps every policy with or without it.

// The example needs `LockedHeap`, which exists only with a lock; without one, the crate map's
// links to it are plain text.
#![cfg_attr(
    any(
        feature = "critical-section",
        all(feature = "spin", target_has_atomic = "8")
    ),
    doc = r#"
# Example: a firmware heap

```
use core::mem::MaybeUninit;
use xalloc_core::LockedHeap;

// In firmware: `#[global_allocator] static HEAP: LockedHeap = LockedHeap::empty();`
static HEAP: LockedHeap = LockedHeap::empty();

// Firmware takes a `static mut [MaybeUninit<u8>; N]` once; here, a leaked box.
let mem: &'static mut [MaybeUninit<u8>] = Box::leak(Box::new([MaybeUninit::uninit(); 4096]));
HEAP.init_from_slice(mem).expect("heap memory");
assert_eq!(HEAP.stats().live_blocks, 0);
```
"#
)]
#![cfg_attr(
    not(any(
        feature = "critical-section",
        all(feature = "spin", target_has_atomic = "8")
    )),
    allow(rustdoc::broken_intra_doc_links)
)]
#![no_std]

pub mod first_fit;
/// `LockedHeap` exists when the crate has a lock for it: the `critical-section` feature, or the
/// default `spin` feature on a target with compare-and-swap (not `thumbv6m-none-eabi`).
#[cfg(any(
    feature = "critical-section",
    all(feature = "spin", target_has_atomic = "8")
))]
pub mod locked;
pub mod store;
pub mod tlsf;

use core::alloc::Layout;
use core::fmt;
use core::ptr::NonNull;

pub use first_fit::FirstFit;
#[cfg(any(
    feature = "critical-section",
    all(feature = "spin", target_has_atomic = "8")
))]
pub use locked::{HeapRef, LockedHeap, SmallLockedHeap};
pub use store::{InBand, MetaEntry, MetaStore, OutOfBand};
pub use tlsf::Tlsf;

/// The default heap: TLSF with in-band metadata over one or more regions, each of up to 16 GiB.
/// Its state (the heads of the free lists, the quick lists and the size bins) takes
/// about 7.6 KiB.
pub type Heap = Tlsf<InBand>;

/// The heap for small memories: TLSF with in-band metadata and 10 × 16 size classes, so its state
/// takes under 1 KiB (1016 bytes on 64-bit targets, 904 on Cortex-M), at the price of classes
/// four times as coarse (a fit within 6.25 % instead of 1.6 %) and blocks of at most 128 KiB:
/// a larger region is cut into regions of 128 KiB (see [`Tlsf::init`]). The pick for heaps up to 64-128 KiB.
/// It has no size bins ([`Tlsf::set_size_bins`]).
pub type SmallHeap = Tlsf<InBand, { tlsf::SMALL_FL }, { tlsf::SMALL_SL }, 0>;

// The small configuration's promise, checked on every target the crate is built for.
const _: () = assert!(core::mem::size_of::<SmallHeap>() <= 1024);

/// TLSF with its metadata in a separate table: nothing is written inside the region (so no
/// quick lists or size bins either).
pub type OobHeap = Tlsf<OutOfBand, { tlsf::FL }, { tlsf::SL }, 0>;

/// Counters of a heap. Block sizes include per-block overhead, rounded to the granule.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Bytes under management (all regions, after alignment, without sentinels).
    pub region_bytes: usize,
    /// Bytes in used blocks.
    pub used_bytes: usize,
    /// Bytes not in use: in free blocks, and on the quick lists and in the size bins
    /// (`quick_list_bytes`).
    pub free_bytes: usize,
    /// The largest allocation (alignment up to the granule) that would succeed now from a free
    /// block; while `quick_list_bytes` is not 0, a larger one may succeed too.
    pub largest_free_bytes: usize,
    /// Blocks allocated and not freed.
    pub live_blocks: usize,
    /// Free blocks (after coalescing), not counting those on the quick lists or in the bins.
    pub free_blocks: usize,
    /// Bytes of freed blocks held whole on the quick lists and in the size bins for the next
    /// requests of their sizes (part of `free_bytes`, in no free block; see [`Tlsf::trim`]).
    /// `largest_free_bytes` does not count them: while this is not 0, a larger request may
    /// succeed too.
    pub quick_list_bytes: usize,
}

/// Why a region could not be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum InitError {
    /// After aligning the start, the region holds no block.
    TooSmall,
    /// `start + size` overflows the address space.
    Overflow,
    /// The heap already manages as many regions as it can.
    TooManyRegions,
    /// `init` on a heap that already has a region; use `add_region`.
    AlreadyInitialized,
    /// The granule is not a power of two of at least 8.
    BadGranule,
    /// The metadata table pointer is null or misaligned.
    BadTable,
    /// The metadata table has fewer entries than the region needs.
    TableTooShort {
        /// Entries needed, see [`OutOfBand::table_entries`].
        needed: usize,
    },
}

impl fmt::Display for InitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooSmall => f.write_str("region too small to hold a block after alignment"),
            Self::Overflow => f.write_str("region end overflows the address space"),
            Self::TooManyRegions => {
                write!(f, "heap already has {} regions", store::IN_BAND_REGIONS)
            }
            Self::AlreadyInitialized => {
                f.write_str("heap already initialised; use add_region to extend it")
            }
            Self::BadGranule => f.write_str("granule must be a power of two of at least 8 bytes"),
            Self::BadTable => f.write_str("metadata table pointer is null or misaligned"),
            Self::TableTooShort { needed } => {
                write!(f, "metadata table too short: {needed} entries needed")
            }
        }
    }
}

impl core::error::Error for InitError {}

/// Why [`OobHeap::deallocate_at`] refused an offset. The heap is unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FreeError {
    /// The offset lies outside the region.
    OutOfRange,
    /// The offset is not a multiple of the granule.
    Misaligned,
    /// No block starts at the offset (it lies inside a block).
    NotABlockStart,
    /// The block at the offset is free (a double free, or never allocated).
    AlreadyFree,
}

impl fmt::Display for FreeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::OutOfRange => "offset outside the region",
            Self::Misaligned => "offset not on a granule boundary",
            Self::NotABlockStart => "no block starts at this offset",
            Self::AlreadyFree => "block already free",
        })
    }
}

impl core::error::Error for FreeError {}

/// Why [`OobHeap::resize_at`] refused. The heap is unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ResizeError {
    /// No used block starts at the offset.
    Block(FreeError),
    /// The new size is zero or larger than a block can be.
    BadSize,
    /// The successor is not free or too small: the block cannot grow in place.
    NoRoom,
}

impl fmt::Display for ResizeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Block(e) => e.fmt(f),
            Self::BadSize => f.write_str("new size is zero or too large"),
            Self::NoRoom => f.write_str("no room to grow the block in place"),
        }
    }
}

impl core::error::Error for ResizeError {}

/// Why [`OobHeap::allocate_at`] refused. The heap is unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AllocAtError {
    /// The offset is not a multiple of the granule.
    Misaligned,
    /// The size is zero or larger than a block can be.
    BadSize,
    /// The bytes do not fit in the region.
    OutOfRange,
    /// Some of the bytes are in a used block, or they are not all in one free block.
    NotFree,
}

impl fmt::Display for AllocAtError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Misaligned => "offset not on a granule boundary",
            Self::BadSize => "size zero or too large",
            Self::OutOfRange => "outside the region",
            Self::NotFree => "not inside one free block",
        })
    }
}

impl core::error::Error for AllocAtError {}

/// A broken heap invariant, found by `check_invariants`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InvariantError {
    /// What is wrong.
    pub what: &'static str,
    /// The block concerned ([`store::NIL`] if none).
    pub block: u32,
}

impl fmt::Display for InvariantError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "heap invariant broken at block {:#x}: {}",
            self.block, self.what
        )
    }
}

impl core::error::Error for InvariantError {}

/// The interface shared by every heap of this crate, so tests and benchmarks run against each.
pub trait RegionAllocator {
    /// Allocates a block of at least `layout.size()` bytes aligned to `layout.align()`, or
    /// returns `None` when the heap cannot.
    fn allocate(&mut self, layout: Layout) -> Option<NonNull<u8>>;

    /// Frees a block.
    ///
    /// # Safety
    /// - `ptr` was returned by this heap's `allocate`/`reallocate` and has not been freed;
    /// - `layout` is the layout it was allocated (or last reallocated) with.
    unsafe fn deallocate(&mut self, ptr: NonNull<u8>, layout: Layout);

    /// Resizes a block to `new_size` bytes with the same alignment, moving it if needed; the
    /// first `min(layout.size(), new_size)` bytes are kept. On `None` the old block is untouched.
    ///
    /// # Safety
    /// As for [`deallocate`](Self::deallocate).
    unsafe fn reallocate(
        &mut self,
        ptr: NonNull<u8>,
        layout: Layout,
        new_size: usize,
    ) -> Option<NonNull<u8>>;

    /// The heap's counters.
    fn stats(&self) -> Stats;

    /// Checks the heap's whole structure.
    fn check_invariants(&self) -> Result<(), InvariantError>;

    /// Returns blocks held for reuse to the free blocks, where the allocator holds any
    /// ([`Tlsf::trim`]); by default nothing.
    fn trim(&mut self) {}
}

impl<S: MetaStore, const FL: usize, const SL: usize, const SB: usize> RegionAllocator
    for Tlsf<S, FL, SL, SB>
{
    #[inline]
    fn allocate(&mut self, layout: Layout) -> Option<NonNull<u8>> {
        Tlsf::allocate(self, layout)
    }
    #[inline]
    unsafe fn deallocate(&mut self, ptr: NonNull<u8>, layout: Layout) {
        // SAFETY: forwarded contract.
        unsafe { Tlsf::deallocate(self, ptr, layout) }
    }
    #[inline]
    unsafe fn reallocate(
        &mut self,
        ptr: NonNull<u8>,
        layout: Layout,
        new_size: usize,
    ) -> Option<NonNull<u8>> {
        // SAFETY: forwarded contract.
        unsafe { Tlsf::reallocate(self, ptr, layout, new_size) }
    }
    fn stats(&self) -> Stats {
        Tlsf::stats(self)
    }
    fn check_invariants(&self) -> Result<(), InvariantError> {
        Tlsf::check_invariants(self)
    }
    fn trim(&mut self) {
        Tlsf::trim(self);
    }
}

impl<const FL: usize, const SL: usize, const SB: usize> Tlsf<InBand, FL, SL, SB> {
    /// A heap with no memory; every allocation fails until [`init`](Self::init).
    pub const fn empty() -> Self {
        Self::with_store(InBand::empty())
    }

    /// Gives the heap its first region, `size` bytes at `start`. The start needs no alignment.
    /// At most [`IN_BAND_MAX_LOSS`](store::IN_BAND_MAX_LOSS) bytes (38) of a region are in no
    /// block: up to 15 before the first header (aligning the first payload to 16), the 8-byte
    /// end sentinel, and up to 15 at the end that do not make a whole granule.
    ///
    /// A region larger than the largest block ([`MAX_BLOCK_GRANULES`](Self::MAX_BLOCK_GRANULES)
    /// granules: 16 GiB for [`Heap`], 128 KiB for [`SmallHeap`]) is cut into consecutive
    /// regions of at most that size, as many as the heap still takes
    /// ([`IN_BAND_REGIONS`](store::IN_BAND_REGIONS) in all, one with `small-code`; 16 bytes lost
    /// at each cut); what lies past the last one is not used (compare `stats().region_bytes`
    /// with the size given).
    ///
    /// A region too small for one block, or a heap already initialised, leaves the heap as it
    /// was (allocations keep failing on an empty heap). Use [`try_init`](Self::try_init) to learn
    /// why.
    ///
    /// # Safety
    /// - `start..start + size` is valid for reads and writes for as long as the heap is used;
    /// - nothing else accesses that memory, except through blocks this heap hands out.
    pub unsafe fn init(&mut self, start: *mut u8, size: usize) {
        // SAFETY: forwarded contract.
        let _ = unsafe { self.try_init(start, size) };
    }

    /// [`init`](Self::init), reporting why the region was refused.
    ///
    /// # Safety
    /// As for [`init`](Self::init).
    pub unsafe fn try_init(&mut self, start: *mut u8, size: usize) -> Result<(), InitError> {
        if self.region_count() != 0 {
            return Err(InitError::AlreadyInitialized);
        }
        // SAFETY: forwarded contract.
        unsafe { self.add_region(start, size) }
    }

    /// Adds another region of `size` bytes at `start`; the heap then allocates from all of them.
    ///
    /// # Safety
    /// As for [`init`](Self::init), and the region overlaps no region the heap already has.
    /// A region larger than the largest block is cut as for [`init`](Self::init).
    pub unsafe fn add_region(&mut self, start: *mut u8, size: usize) -> Result<(), InitError> {
        // One call of `push_region` and `adopt_region`, in a loop over the pieces, so that a
        // firmware carries one copy of each.
        let (mut at, mut len) = (start, size);
        loop {
            let (first, n) = match self
                .store_mut()
                .push_region(at, len, Self::MAX_BLOCK_GRANULES)
            {
                Ok(region) => region,
                // The region itself is refused.
                Err(e) if at == start => return Err(e),
                // No region left, or too little memory left for a block: the rest is unused.
                Err(_) => return Ok(()),
            };
            // SAFETY: the store registered region `first >> LOCAL_BITS` with `n` granules just
            // now.
            unsafe { self.adopt_region(first, n) };
            // The region ends with its sentinel's header, just below the sentinel's payload
            // address; the bytes from there on were cut off by the largest block's size.
            // `push_region` checked that `start + size` does not overflow.
            let (rest, end) = (self.store().locate(first + n), start.addr() + size);
            if store::IN_BAND_REGIONS == 1 || rest.addr() >= end {
                return Ok(());
            }
            (at, len) = (rest, end - rest.addr());
        }
    }
}

impl crate::OobHeap {
    /// The number of [`MetaEntry`] slots `new` needs for a region of `region_size` bytes.
    pub const fn table_entries(region_size: usize, granule: usize) -> usize {
        OutOfBand::table_entries(region_size, granule)
    }

    /// A heap over `size` bytes at `start` (aligned up to `granule`), keeping its metadata in
    /// `table`. Every block is a multiple of `granule` bytes and aligned to it.
    ///
    /// # Safety
    /// As for [`OutOfBand::new`].
    pub unsafe fn new(
        start: *mut u8,
        size: usize,
        granule: usize,
        table: *mut MetaEntry,
        table_len: usize,
    ) -> Result<Self, InitError> {
        // SAFETY: forwarded contract.
        let (store, n) = unsafe { OutOfBand::new(start, size, granule, table, table_len)? };
        let mut heap = Self::with_store(store);
        // SAFETY: the store was built for exactly this region of `n` granules, id 0 first.
        unsafe { heap.adopt_region(0, n) };
        Ok(heap)
    }

    /// Offset in bytes of `ptr` from the region's start.
    pub fn offset_of(&self, ptr: NonNull<u8>) -> usize {
        ptr.as_ptr().addr().wrapping_sub(self.store().base().addr())
    }
}

#[cfg(test)]
mod tests;
