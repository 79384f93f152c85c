//! Where block metadata lives: the [`MetaStore`] trait and its two implementations.
//!
//! The TLSF algorithm in [`crate::tlsf`] never touches memory itself. It names blocks by a
//! [`BlockId`] and asks a store to read and write four 32-bit fields per block:
//!
//! | field        | meaning                                                        | valid when |
//! | ------------ | -------------------------------------------------------------- | ---------- |
//! | `size_flags` | size in granules `<< 2`; bit 0 set iff the block is free, bit 1 set iff the physically previous block is free | always |
//! | `prev_size`  | size in granules of the physically previous block, 0 if none   | always     |
//! | `next_free`  | next block in this block's free list, [`NIL`] at the end       | block free |
//! | `prev_free`  | previous block in this block's free list, [`NIL`] at the head  | block free |
//!
//! A *granule* is the store's unit of size and alignment (16 bytes in band, a power of two of
//! the caller's choice out of band). Block ids are granule indices from the start of a region,
//! with the region's number in the top [`REGION_BITS`] bits; every link is such an index, never an
//! address, so a region can be mapped at a different address by every process that shares it.
//!
//! - [`InBand`] keeps `prev_size` and `size_flags` in an 8-byte header just below each payload and
//!   the two free-list links in the first 8 bytes of a free block's payload: the classic embedded
//!   layout, with 8 bytes of overhead per block and a 16-byte minimum block.
//! - [`OutOfBand`] keeps all four fields in a caller-provided table with one [`MetaEntry`] per
//!   granule, indexed by block id; nothing is written inside the managed region, so a program that
//!   scribbles over its buffers can corrupt data but never the allocator.

use core::ptr::NonNull;

/// Identifies a block: the region number in the top [`REGION_BITS`] bits, the granule index of
/// the block's payload within that region below them.
pub type BlockId = u32;

/// The "no block" link value.
pub const NIL: BlockId = u32::MAX;

/// Bits of a [`BlockId`] that hold the region number.
pub const REGION_BITS: u32 = 2;

/// How many regions one heap can manage.
pub const MAX_REGIONS: usize = 1 << REGION_BITS;

/// How many regions an [`InBand`] heap takes: [`MAX_REGIONS`], or one with the `small-code`
/// feature, which then finds a block's region without a search.
pub const IN_BAND_REGIONS: usize = if cfg!(feature = "small-code") {
    1
} else {
    MAX_REGIONS
};

/// Bits of a [`BlockId`] that hold the granule index within the region.
pub const LOCAL_BITS: u32 = 32 - REGION_BITS;

/// Mask of the granule-index bits of a [`BlockId`].
pub const LOCAL_MASK: u32 = (1 << LOCAL_BITS) - 1;

/// The largest number of granules one region can hold, sentinel included.
pub const MAX_REGION_GRANULES: u32 = LOCAL_MASK;

/// Storage of per-block metadata for [`crate::Tlsf`].
///
/// The algorithm names a block by its [`BlockId`] in links and by a [`Ptr`](Self::Ptr), the
/// store's direct handle to its metadata, while it works on it: `locate` turns an id into a
/// handle once, and physical neighbours are reached from a handle by `forward`/`backward`
/// without going through the id again. Accessors do not validate their handle, which is why
/// they are `unsafe`.
///
/// # Safety
///
/// An implementation must guarantee that, for every valid block id `b` of an initialised
/// region (a block start, or for the header fields also the region's end sentinel):
/// 1. `payload(locate(b))` points, with provenance over the whole block, to `granule()`-aligned
///    memory of `size * granule() - OVERHEAD` bytes that belong to the block alone (size as
///    recorded in `size_flags`), and `payload_addr` is its address;
/// 2. `block_of(payload(locate(b)))` returns `b` and a handle equal to `locate(b)`;
/// 3. `forward(locate(b), n) == locate(b + n)` and `backward(locate(b), n) == locate(b - n)`
///    whenever both ids lie in the same region;
/// 4. a value written through a setter is returned by the matching getter until it is written
///    again, and writing one field of one block changes no other field of any block and no byte
///    of any *used* block's payload;
/// 5. `OVERHEAD < granule()`, and `granule()` is a power of two of at least 8;
/// 6. `owner_handle(locate(b), owner)`, where `owner` is the payload pointer the heap handed out
///    for `b`, is a handle to the same block that the free-list accessors may use;
/// 7. if `QUICK_LISTS`, every block's payload is at least a pointer long and pointer-aligned, and
///    the heap may write it while nobody holds the block.
pub unsafe trait MetaStore {
    /// Bytes of every block that its owner cannot use (the in-band header).
    const OVERHEAD: usize;

    /// Whether the heap may keep blocks that were freed on quick lists linked through their
    /// payloads (see [`Tlsf`](crate::Tlsf)'s module docs): not where nothing may be written
    /// inside the region.
    const QUICK_LISTS: bool;

    /// Whether heaps over this store are built for code size (see the crate docs, "Code size"):
    /// the `small-code` feature sets it for [`InBand`], the firmware heap; an out-of-band heap
    /// (the daemon's) keeps every policy whatever features a build enables.
    const SMALL_CODE: bool = false;

    /// A direct handle to one block's metadata.
    type Ptr: Copy + PartialEq;

    /// log2 of the granule size in bytes.
    fn granule_shift(&self) -> u32;

    /// The handle of block `b` (no check that a block starts there).
    fn locate(&self, b: BlockId) -> Self::Ptr;

    /// A handle to block `p` for writing its free-list links, derived from `owner`, the payload
    /// pointer that the block's owner hands back when freeing it.
    ///
    /// Links kept in band are written into the freed payload. The owner's pointer may still be
    /// protected by the aliasing model while its block is freed (a `Box` passed by value, for
    /// instance), so those writes must go through it rather than through the region's pointer.
    fn owner_handle(&self, p: Self::Ptr, owner: NonNull<u8>) -> Self::Ptr;
    /// The handle of the block `n` granules after `p`, in the same region.
    fn forward(&self, p: Self::Ptr, n: u32) -> Self::Ptr;
    /// The handle of the block `n` granules before `p`, in the same region.
    fn backward(&self, p: Self::Ptr, n: u32) -> Self::Ptr;

    /// Reads `size_flags`.
    ///
    /// # Safety
    /// `p` is the handle of a block start or a region's sentinel.
    unsafe fn size_flags(&self, p: Self::Ptr) -> u32;
    /// Writes `size_flags`.
    ///
    /// # Safety
    /// As for [`size_flags`](Self::size_flags).
    unsafe fn set_size_flags(&mut self, p: Self::Ptr, v: u32);
    /// Reads `prev_size`.
    ///
    /// # Safety
    /// As for [`size_flags`](Self::size_flags).
    unsafe fn prev_size(&self, p: Self::Ptr) -> u32;
    /// Writes `prev_size`.
    ///
    /// # Safety
    /// As for [`size_flags`](Self::size_flags).
    unsafe fn set_prev_size(&mut self, p: Self::Ptr, v: u32);
    /// Reads `next_free`.
    ///
    /// # Safety
    /// `p` is the handle of a free block.
    unsafe fn next_free(&self, p: Self::Ptr) -> BlockId;
    /// Writes `next_free`.
    ///
    /// # Safety
    /// `p` is the handle of a block that is free or is being made free.
    unsafe fn set_next_free(&mut self, p: Self::Ptr, v: BlockId);
    /// Reads `prev_free`.
    ///
    /// # Safety
    /// As for [`next_free`](Self::next_free).
    unsafe fn prev_free(&self, p: Self::Ptr) -> BlockId;
    /// Writes `prev_free`.
    ///
    /// # Safety
    /// As for [`set_next_free`](Self::set_next_free).
    unsafe fn set_prev_free(&mut self, p: Self::Ptr, v: BlockId);

    /// Records that the block at `p` stopped being a block start because it was merged into a
    /// neighbour. Out of band this clears the entry, so that a stale id is recognisably invalid.
    ///
    /// # Safety
    /// `p` was a block start and is now inside another block.
    unsafe fn retire(&mut self, p: Self::Ptr);

    /// The address of the block's payload, as an integer (for alignment arithmetic).
    fn payload_addr(&self, p: Self::Ptr) -> usize;

    /// A pointer to the block's payload.
    ///
    /// # Safety
    /// `p` is the handle of a valid block.
    unsafe fn payload(&self, p: Self::Ptr) -> NonNull<u8>;

    /// The id and handle of the block whose payload starts at `ptr`, or `None` if `ptr` is
    /// outside every region or not on a granule boundary. It does not check that a block starts
    /// there.
    fn block_of(&self, ptr: NonNull<u8>) -> Option<(BlockId, Self::Ptr)>;

    /// [`block_of`](Self::block_of) for a pointer known to be the payload of a block of this
    /// store, without the checks (the heap's free and reallocation paths).
    ///
    /// # Safety
    /// `block_of(ptr)` is `Some`.
    #[inline(always)]
    unsafe fn block_of_unchecked(&self, ptr: NonNull<u8>) -> (BlockId, Self::Ptr) {
        // SAFETY: the caller's contract.
        unsafe { self.block_of(ptr).unwrap_unchecked() }
    }

    /// For [`Tlsf::check_invariants`](crate::Tlsf::check_invariants): whether the store's
    /// record of the granules strictly inside block `p` of `size` granules is clear, where the
    /// store keeps one (out of band, every entry but a block's first is zero, which is what
    /// lets a checked free tell a block start from any other offset). In band there is no such
    /// record: the inside of a block is its payload.
    ///
    /// # Safety
    /// `p` is the handle of a block start whose `size` granules lie inside its region.
    unsafe fn interior_clear(&self, p: Self::Ptr, size: u32) -> bool {
        let _ = (p, size);
        true
    }
}

/// Metadata kept in band, beside the blocks: the embedded layout. Granule: 16 bytes.
///
/// Block `b` of region `r` has its payload at `base[r] + 16 * local(b)` and its 8-byte header
/// (`prev_size`, then `size_flags`) just below. A free block's links fill the first 8 bytes of
/// its payload. A region of `n` granules ends with a sentinel header at `base[r] + 16 * n - 8`.
pub struct InBand {
    /// Payload address of granule 0 of each region; null for regions not added yet.
    bases: [*mut u8; MAX_REGIONS],
    /// Granules of each region, sentinel excluded.
    lens: [u32; MAX_REGIONS],
    /// Regions added so far.
    count: usize,
}

// SAFETY: `InBand` holds raw pointers into regions that the `init`/`add_region` contract gives
// to the heap exclusively; nothing else refers to them, so moving the store to another thread
// moves the only access path with it.
unsafe impl Send for InBand {}

/// The in-band granule: 16 bytes, so every payload is 16-aligned and a 16-byte block (8-byte
/// header, 8 bytes of payload or free-list links) is the smallest.
pub const IN_BAND_GRANULE_SHIFT: u32 = 4;

/// The in-band per-block header size.
pub const IN_BAND_HEADER: usize = 8;

/// The most bytes of an in-band region (below [`MAX_REGION_GRANULES`] granules) that end up in
/// no block: up to 15 to align the first payload, the end sentinel's header, and up to 15 that
/// do not make a whole granule at the end.
pub const IN_BAND_MAX_LOSS: usize = 15 + IN_BAND_HEADER + 15;

impl InBand {
    /// A store with no regions.
    pub const fn empty() -> Self {
        Self {
            bases: [core::ptr::null_mut(); MAX_REGIONS],
            lens: [0; MAX_REGIONS],
            count: 0,
        }
    }

    /// Places a region of `size` bytes at `start` in the in-band layout and records it.
    ///
    /// Returns the id of its first block and its size in granules (sentinel excluded), or why
    /// the region cannot be used (null or too small for a block, past the end of the address
    /// space, all [`MAX_REGIONS`] regions taken). Regions larger than `max_granules` granules
    /// (at most [`MAX_REGION_GRANULES`] - 1) are used up to that size.
    pub(crate) fn push_region(
        &mut self,
        start: *mut u8,
        size: usize,
        max_granules: u32,
    ) -> Result<(BlockId, u32), crate::InitError> {
        use crate::InitError;
        let r = self.count;
        if r >= IN_BAND_REGIONS {
            return Err(InitError::TooManyRegions);
        }
        let addr = start.addr();
        let end = addr.checked_add(size).ok_or(InitError::Overflow)?;
        // The first payload is the first 16-aligned address with room for a header below it
        // (wrapping only when `addr` is within 23 bytes of the address space's end, which the
        // check `base > addr` catches).
        let base = addr.wrapping_add(IN_BAND_HEADER + 15) & !15;
        // Blocks fill [base - 8, base + 16n - 8); the sentinel header takes [base + 16n - 8, base + 16n).
        let n = (end.saturating_sub(base) >> IN_BAND_GRANULE_SHIFT)
            .min(max_granules.min(MAX_REGION_GRANULES - 1) as usize) as u32;
        if start.is_null() || base < addr || n == 0 {
            return Err(InitError::TooSmall);
        }
        self.bases[r] = start.wrapping_add(base - addr);
        self.lens[r] = n;
        self.count += 1;
        Ok(((r as u32) << LOCAL_BITS, n))
    }
}

// The smallest in-band payload holds a quick list's link (the `MetaStore` contract's item 7).
const _: () =
    assert!((1 << IN_BAND_GRANULE_SHIFT) - IN_BAND_HEADER >= core::mem::size_of::<*mut u8>());

// SAFETY: 1. `push_region` places block `b`'s payload at `base + 16 * local(b)`, derived from the
// region's own pointer, with its header in the 8 bytes below and the next block's header 16 * size
// bytes further, so the payload has `16 * size - 8` bytes of its own, 16-aligned; the handle is
// that payload pointer. 2. `block_of` inverts `locate`. 3. Handles of one region are pointers into
// it, 16 bytes per granule. 4. Each field is its own 4-byte word: two in the header, two in a
// *free* block's payload. 5. OVERHEAD = 8 < 16. 6. The owner's payload pointer has the address of
// `locate(b)` and provenance over the payload, where the links are. 7. Payloads are 16-aligned
// and at least 8 bytes (asserted above), inside the region the heap owns.
unsafe impl MetaStore for InBand {
    const OVERHEAD: usize = IN_BAND_HEADER;
    const QUICK_LISTS: bool = true;
    const SMALL_CODE: bool = cfg!(feature = "small-code");

    /// The block's payload address (its header is the 8 bytes below).
    type Ptr = *mut u8;

    #[inline(always)]
    fn granule_shift(&self) -> u32 {
        IN_BAND_GRANULE_SHIFT
    }

    #[inline(always)]
    fn locate(&self, b: BlockId) -> *mut u8 {
        // With one region, ids have no region bits.
        let r = if IN_BAND_REGIONS == 1 {
            0
        } else {
            (b >> LOCAL_BITS) as usize
        };
        let off = ((b & LOCAL_MASK) as usize) << IN_BAND_GRANULE_SHIFT;
        self.bases[r].wrapping_add(off)
    }
    #[inline(always)]
    fn owner_handle(&self, _p: *mut u8, owner: NonNull<u8>) -> *mut u8 {
        owner.as_ptr()
    }
    #[inline(always)]
    fn forward(&self, p: *mut u8, n: u32) -> *mut u8 {
        p.wrapping_add((n as usize) << IN_BAND_GRANULE_SHIFT)
    }
    #[inline(always)]
    fn backward(&self, p: *mut u8, n: u32) -> *mut u8 {
        p.wrapping_sub((n as usize) << IN_BAND_GRANULE_SHIFT)
    }

    #[inline(always)]
    unsafe fn size_flags(&self, p: *mut u8) -> u32 {
        // SAFETY: the caller guarantees `p` is a block start or sentinel, whose 8-byte header
        // lies inside its region just below `p`, 8-aligned; `size_flags` is its second word.
        unsafe { p.wrapping_sub(4).cast::<u32>().read() }
    }
    #[inline(always)]
    unsafe fn set_size_flags(&mut self, p: *mut u8, v: u32) {
        // SAFETY: as in `size_flags`.
        unsafe { p.wrapping_sub(4).cast::<u32>().write(v) }
    }
    #[inline(always)]
    unsafe fn prev_size(&self, p: *mut u8) -> u32 {
        // SAFETY: as in `size_flags`; `prev_size` is the header's first word.
        unsafe { p.wrapping_sub(8).cast::<u32>().read() }
    }
    #[inline(always)]
    unsafe fn set_prev_size(&mut self, p: *mut u8, v: u32) {
        // SAFETY: as in `prev_size`.
        unsafe { p.wrapping_sub(8).cast::<u32>().write(v) }
    }
    #[inline(always)]
    unsafe fn next_free(&self, p: *mut u8) -> BlockId {
        // SAFETY: `p` is a free block's payload: at least 8 bytes (one granule minus the header),
        // 16-aligned, owned by the allocator while the block is free.
        unsafe { p.cast::<u32>().read() }
    }
    #[inline(always)]
    unsafe fn set_next_free(&mut self, p: *mut u8, v: BlockId) {
        // SAFETY: as in `next_free`.
        unsafe { p.cast::<u32>().write(v) }
    }
    #[inline(always)]
    unsafe fn prev_free(&self, p: *mut u8) -> BlockId {
        // SAFETY: as in `next_free`; the payload's second word.
        unsafe { p.wrapping_add(4).cast::<u32>().read() }
    }
    #[inline(always)]
    unsafe fn set_prev_free(&mut self, p: *mut u8, v: BlockId) {
        // SAFETY: as in `prev_free`.
        unsafe { p.wrapping_add(4).cast::<u32>().write(v) }
    }

    #[inline(always)]
    unsafe fn retire(&mut self, _p: *mut u8) {}

    #[inline(always)]
    fn payload_addr(&self, p: *mut u8) -> usize {
        p.addr()
    }

    #[inline(always)]
    unsafe fn payload(&self, p: *mut u8) -> NonNull<u8> {
        // SAFETY: a valid block's payload lies inside a region, above its non-null start.
        unsafe { NonNull::new_unchecked(p) }
    }

    #[inline(always)]
    unsafe fn block_of_unchecked(&self, ptr: NonNull<u8>) -> (BlockId, *mut u8) {
        if IN_BAND_REGIONS == 1 || self.count == 1 {
            // One region (the usual heap, and the only one with `small-code`): no search. The caller guarantees that `ptr` lies in
            // it, on a granule boundary, so the offset is a whole number of granules below
            // `LOCAL_MASK`, and region 0's ids are the granule indices themselves.
            let off = ptr.as_ptr().addr().wrapping_sub(self.bases[0].addr());
            return (
                (off >> IN_BAND_GRANULE_SHIFT) as BlockId,
                self.bases[0].wrapping_add(off),
            );
        }
        // SAFETY: the caller's contract.
        unsafe { self.block_of(ptr).unwrap_unchecked() }
    }

    #[inline(always)]
    fn block_of(&self, ptr: NonNull<u8>) -> Option<(BlockId, *mut u8)> {
        let addr = ptr.as_ptr().addr();
        // `count <= IN_BAND_REGIONS`; `min` lets the compiler drop the bounds checks (and with
        // one region, the loop).
        for r in 0..self.count.min(IN_BAND_REGIONS) {
            let off = addr.wrapping_sub(self.bases[r].addr());
            if off < (self.lens[r] as usize) << IN_BAND_GRANULE_SHIFT {
                if off & ((1 << IN_BAND_GRANULE_SHIFT) - 1) != 0 {
                    return None;
                }
                let b = ((r as u32) << LOCAL_BITS) | (off >> IN_BAND_GRANULE_SHIFT) as u32;
                return Some((b, self.bases[r].wrapping_add(off)));
            }
        }
        None
    }
}

/// One block's metadata in an [`OutOfBand`] table. Plain data; the table holds one per granule
/// of the region plus one for the end sentinel (see [`OutOfBand::table_entries`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MetaEntry {
    size_flags: u32,
    prev_size: u32,
    next_free: u32,
    prev_free: u32,
}

/// Metadata kept out of band, in a table beside the region: the shared-arena layout.
///
/// Block `b` has its payload at `base + granule * b` and its metadata in `table[b]`. The region
/// itself is never read or written by the allocator. One region per heap.
pub struct OutOfBand {
    base: *mut u8,
    table: *mut MetaEntry,
    shift: u32,
    /// Granules in the region, sentinel excluded; the table holds `len + 1` entries.
    len: u32,
}

// SAFETY: the region and the table are given to the heap exclusively by `OutOfBand::new`'s
// contract; moving the store moves the only access path to them.
unsafe impl Send for OutOfBand {}

impl OutOfBand {
    /// The number of [`MetaEntry`] slots a table must hold for a region of `region_size` bytes
    /// with granules of `granule` bytes: one per whole granule, plus one for the end sentinel.
    pub const fn table_entries(region_size: usize, granule: usize) -> usize {
        if granule == 0 {
            return 0;
        }
        let n = region_size / granule;
        let cap = MAX_REGION_GRANULES as usize - 1;
        (if n > cap { cap } else { n }) + 1
    }

    /// Builds a store over `size` bytes at `start`, with `table` for metadata.
    ///
    /// Returns the store and the region's size in granules, or an error if `granule` is not a
    /// power of two of at least 8, the region holds no whole granule after aligning `start` up,
    /// or the table is too short.
    ///
    /// # Safety
    /// - `start..start + size` is valid for reads and writes for the store's life, and
    ///   `table..table + table_len` is valid for reads and writes of `MetaEntry` for its life;
    /// - neither is accessed by anything else while the store lives (the region's *payloads* may
    ///   be, by whoever allocated them, which the store never reads);
    /// - the two do not overlap.
    pub unsafe fn new(
        start: *mut u8,
        size: usize,
        granule: usize,
        table: *mut MetaEntry,
        table_len: usize,
    ) -> Result<(Self, u32), crate::InitError> {
        use crate::InitError;
        if !granule.is_power_of_two() || granule < 8 {
            return Err(InitError::BadGranule);
        }
        if table.is_null()
            || !table
                .cast::<u8>()
                .addr()
                .is_multiple_of(align_of::<MetaEntry>())
        {
            return Err(InitError::BadTable);
        }
        let shift = granule.trailing_zeros();
        let addr = start.addr();
        let end = addr.checked_add(size).ok_or(InitError::Overflow)?;
        let base = addr
            .checked_next_multiple_of(granule)
            .ok_or(InitError::Overflow)?;
        if start.is_null() || base >= end {
            return Err(InitError::TooSmall);
        }
        let n = ((end - base) >> shift).min(MAX_REGION_GRANULES as usize - 1) as u32;
        if n == 0 {
            return Err(InitError::TooSmall);
        }
        if table_len < n as usize + 1 {
            return Err(InitError::TableTooShort {
                needed: n as usize + 1,
            });
        }
        // Every entry starts zeroed and only block starts are ever written non-zero (entries of
        // merged blocks are cleared by `retire`), so a non-zero entry identifies a block start:
        // what lets the heap check offsets it did not hand out.
        for i in 0..=n as usize {
            // SAFETY: `i <= n < table_len`, and the caller gives the table to the store.
            unsafe { table.add(i).write(MetaEntry::default()) };
        }
        let store = Self {
            base: start.wrapping_add(base - addr),
            table,
            shift,
            len: n,
        };
        Ok((store, n))
    }

    /// The region's first byte (granule-aligned): payload of block 0.
    pub fn base(&self) -> *mut u8 {
        self.base
    }

    /// The table entry of block `b`.
    #[inline(always)]
    fn entry(&self, b: BlockId) -> *mut MetaEntry {
        self.table.wrapping_add(b as usize)
    }
}

// SAFETY: 6. `owner_handle` returns the table handle itself: links live in the table.
// 1. Block `b`'s payload is `base + granule * b` over `size` whole granules of the region,
// derived from the region's pointer; nothing of it is used for metadata (OVERHEAD = 0). The handle
// is `table + b`. 2. `block_of` inverts that. 3. Handles step by one entry per granule. 4. Each
// field is its own word of `table[b]`, outside the region. 5. `new` accepts only powers of two of
// at least 8.
unsafe impl MetaStore for OutOfBand {
    const OVERHEAD: usize = 0;
    const QUICK_LISTS: bool = false;

    /// The block's entry in the table.
    type Ptr = *mut MetaEntry;

    #[inline(always)]
    fn granule_shift(&self) -> u32 {
        self.shift
    }

    #[inline(always)]
    fn locate(&self, b: BlockId) -> *mut MetaEntry {
        self.entry(b)
    }
    #[inline(always)]
    fn owner_handle(&self, p: *mut MetaEntry, _owner: NonNull<u8>) -> *mut MetaEntry {
        p
    }
    #[inline(always)]
    fn forward(&self, p: *mut MetaEntry, n: u32) -> *mut MetaEntry {
        p.wrapping_add(n as usize)
    }
    #[inline(always)]
    fn backward(&self, p: *mut MetaEntry, n: u32) -> *mut MetaEntry {
        p.wrapping_sub(n as usize)
    }

    #[inline(always)]
    unsafe fn size_flags(&self, p: *mut MetaEntry) -> u32 {
        // SAFETY: a block or sentinel handle is `table + b` with `b <= len`, and the table holds
        // `len + 1` entries.
        unsafe { (*p).size_flags }
    }
    #[inline(always)]
    unsafe fn set_size_flags(&mut self, p: *mut MetaEntry, v: u32) {
        // SAFETY: as in `size_flags`.
        unsafe { (*p).size_flags = v }
    }
    #[inline(always)]
    unsafe fn prev_size(&self, p: *mut MetaEntry) -> u32 {
        // SAFETY: as in `size_flags`.
        unsafe { (*p).prev_size }
    }
    #[inline(always)]
    unsafe fn set_prev_size(&mut self, p: *mut MetaEntry, v: u32) {
        // SAFETY: as in `size_flags`.
        unsafe { (*p).prev_size = v }
    }
    #[inline(always)]
    unsafe fn next_free(&self, p: *mut MetaEntry) -> BlockId {
        // SAFETY: as in `size_flags`.
        unsafe { (*p).next_free }
    }
    #[inline(always)]
    unsafe fn set_next_free(&mut self, p: *mut MetaEntry, v: BlockId) {
        // SAFETY: as in `size_flags`.
        unsafe { (*p).next_free = v }
    }
    #[inline(always)]
    unsafe fn prev_free(&self, p: *mut MetaEntry) -> BlockId {
        // SAFETY: as in `size_flags`.
        unsafe { (*p).prev_free }
    }
    #[inline(always)]
    unsafe fn set_prev_free(&mut self, p: *mut MetaEntry, v: BlockId) {
        // SAFETY: as in `size_flags`.
        unsafe { (*p).prev_free = v }
    }

    #[inline(always)]
    unsafe fn retire(&mut self, p: *mut MetaEntry) {
        // SAFETY: as in `size_flags`.
        unsafe { *p = MetaEntry::default() }
    }

    #[inline(always)]
    fn payload_addr(&self, p: *mut MetaEntry) -> usize {
        let b = (p.addr() - self.table.addr()) / size_of::<MetaEntry>();
        self.base.addr() + (b << self.shift)
    }

    #[inline(always)]
    unsafe fn payload(&self, p: *mut MetaEntry) -> NonNull<u8> {
        let b = (p.addr() - self.table.addr()) / size_of::<MetaEntry>();
        // SAFETY: `new` rejected a null start, and a block's payload lies at or above `base`,
        // inside the region.
        unsafe { NonNull::new_unchecked(self.base.wrapping_add(b << self.shift)) }
    }

    unsafe fn interior_clear(&self, p: *mut MetaEntry, size: u32) -> bool {
        (1..size as usize).all(|i| {
            // SAFETY: `p` is a block start of `size` granules inside the region (the caller's
            // contract), so `p + i` for `i < size` is an entry of the table.
            unsafe { *p.wrapping_add(i) == MetaEntry::default() }
        })
    }

    #[inline(always)]
    fn block_of(&self, ptr: NonNull<u8>) -> Option<(BlockId, *mut MetaEntry)> {
        let off = ptr.as_ptr().addr().wrapping_sub(self.base.addr());
        if off >= (self.len as usize) << self.shift || off & ((1 << self.shift) - 1) != 0 {
            return None;
        }
        let b = (off >> self.shift) as BlockId;
        Some((b, self.entry(b)))
    }
}
