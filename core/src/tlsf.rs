//! Two-level segregated fit over one to [`MAX_REGIONS`] regions, generic over where block
//! metadata lives ([`MetaStore`]).
//!
//! # Structure
//!
//! Free blocks sit in doubly linked lists, one per *size class*. A size of `s` granules belongs to
//! class `(fl, sl)`: sizes below [`SL`] granules each have their own class in `fl = 0`; above, `fl`
//! picks the power of two and `sl` one of [`SL`] equal slices of it, so a class spans at most
//! 1/32 of its sizes. Two bitmaps say which lists are non-empty.
//!
//! # Invariants
//!
//! 1. Bit `fl` of `fl_bitmap` is set iff `sl_bitmap[fl] != 0`.
//! 2. Bit `sl` of `sl_bitmap[fl]` is set iff list `(fl, sl)` is non-empty, and then
//!    `heads[fl][sl]` is its first block. When the bit is clear, `heads[fl][sl]` is meaningless.
//! 3. Every free block is in exactly the list of its size class; every block in a list is free.
//! 4. No two free blocks are physically adjacent (coalescing is immediate).
//! 5. The blocks of a region tile it from id `r << LOCAL_BITS` to its sentinel, each block's
//!    `prev_size` is the size of the block before it (0 for the first), and the sentinel has size 0
//!    and is never free.
//! 6. `used`, `free`, `live` and `free_blocks` equal the sums over all blocks.
//!
//! [`Tlsf::check_invariants`] verifies all six by walking every region and every list.
//!
//! # Time complexity
//!
//! `allocate`, `deallocate` and in-place `reallocate` are O(1) for every alignment: a bitmap
//! search finds a class whose every block fits (the request rounded up to the next class
//! boundary, plus `align - granule` when the alignment exceeds the granule). Only when that finds
//! nothing, i.e. the heap is nearly out of memory for that size, does `allocate` scan the lists of
//! the classes below, so that it never reports out-of-memory while a block that fits exists.

use core::alloc::Layout;
use core::ptr::NonNull;

use crate::store::{BlockId, MetaStore, LOCAL_BITS, LOCAL_MASK, MAX_REGIONS, NIL};
use crate::{InvariantError, Stats};

/// log2 of the number of second-level classes per power of two.
pub const SLI: u32 = 5;
/// Second-level classes per power of two.
pub const SL: usize = 1 << SLI;
/// First-level classes: enough for blocks of up to `2^LOCAL_BITS` granules.
pub const FL: usize = (LOCAL_BITS - SLI + 1) as usize;

/// `size_flags` bit: the block is free.
const FREE: u32 = 1;
/// `size_flags` bit: the physically previous block is free (so `prev_size` leads to it without
/// reading its header).
const PREV_FREE: u32 = 2;
/// How many blocks of the request's own class `allocate` tries before taking a block from a
/// larger class.
pub const SCAN_LIMIT: u32 = 16;
/// How many blocks of the chosen class `allocate` compares to pick the lowest-addressed one.
pub const LOW_FIRST: u32 = 8;
/// Requests of at least this many bytes pick the lowest of [`LOW_FIRST`] blocks; smaller ones
/// take the list's head, sparing the cache misses of walking a long list.
pub const LOW_FIRST_BYTES: usize = 4096;
/// Whether a freed block that lies above its list's head goes second rather than first, so
/// that heads lean towards low addresses.
const ADDR_BIAS: bool = true;
/// `size_flags` holds the size in granules above the two flag bits.
const SIZE_SHIFT: u32 = 2;

// The bitmaps are `u32`s.
const _: () = assert!(FL <= 32 && SL <= 32);

/// The TLSF allocator over regions whose metadata lives in `S`.
///
/// Use it through the aliases [`crate::Heap`] (in band) and [`crate::OobHeap`] (out of band).
pub struct Tlsf<S> {
    store: S,
    fl_bitmap: u32,
    sl_bitmap: [u32; FL],
    heads: [[BlockId; SL]; FL],
    /// Size in granules of each region, sentinel excluded; regions `0..regions`.
    region_len: [u32; MAX_REGIONS],
    regions: usize,
    used_granules: usize,
    free_granules: usize,
    live: usize,
    free_blocks: usize,
}

#[inline(always)]
fn size_of_flags(v: u32) -> u32 {
    v >> SIZE_SHIFT
}

#[inline(always)]
fn msb(x: u32) -> u32 {
    31 - x.leading_zeros()
}

/// The class of a block of `size` granules (`size >= 1`).
#[inline(always)]
fn class_of(size: u32) -> (usize, usize) {
    if size < SL as u32 {
        (0, size as usize)
    } else {
        let m = msb(size);
        let fl = m - SLI + 1;
        let sl = (size >> (m - SLI)) as usize - SL;
        (fl as usize, sl)
    }
}

/// The smallest class whose every block holds `size` granules.
#[inline(always)]
fn class_at_least(size: u32) -> (usize, usize) {
    if size < SL as u32 {
        (0, size as usize)
    } else {
        let round = (1u32 << (msb(size) - SLI)) - 1;
        class_of(size + round)
    }
}

impl<S: MetaStore> Tlsf<S> {
    /// A heap with no regions over `store`.
    pub(crate) const fn with_store(store: S) -> Self {
        Self {
            store,
            fl_bitmap: 0,
            sl_bitmap: [0; FL],
            heads: [[0; SL]; FL],
            region_len: [0; MAX_REGIONS],
            regions: 0,
            used_granules: 0,
            free_granules: 0,
            live: 0,
            free_blocks: 0,
        }
    }

    /// The metadata store.
    pub fn store(&self) -> &S {
        &self.store
    }

    pub(crate) fn store_mut(&mut self) -> &mut S {
        &mut self.store
    }

    /// Bytes per granule: the unit of block sizes and the alignment every payload has.
    #[inline(always)]
    pub fn granule(&self) -> usize {
        1 << self.store.granule_shift()
    }

    /// Lays out the first free block of a freshly registered region `first..first + n` and its
    /// sentinel.
    ///
    /// # Safety
    /// The store has just registered region `first >> LOCAL_BITS` with `n` granules.
    pub(crate) unsafe fn adopt_region(&mut self, first: BlockId, n: u32) {
        let r = (first >> LOCAL_BITS) as usize;
        self.region_len[r] = n;
        self.regions = self.regions.max(r + 1);
        // SAFETY: 1. `first` is the region's first block start and `first + n` its sentinel,
        // both inside the region the store just registered.
        unsafe {
            self.store.set_prev_size(first, 0);
            self.store.set_prev_size(first + n, n);
            self.store.set_size_flags(first + n, PREV_FREE);
            self.make_free(first, n);
        }
        self.free_granules += n as usize;
    }

    /// Granules a request of `size` bytes needs, or `None` if no region could ever hold it.
    #[inline(always)]
    fn granules_for(&self, size: usize) -> Option<u32> {
        let shift = self.store.granule_shift();
        let bytes = size.checked_add(S::OVERHEAD + (1 << shift) - 1)?;
        let g = (bytes >> shift).max(1);
        if g > LOCAL_MASK as usize / 2 {
            return None;
        }
        Some(g as u32)
    }

    // ----- free lists -----

    /// Marks `b` free with `size` granules and pushes it on its class's list. Its successor's
    /// `prev_size` and `PREV_FREE` bit are the caller's business.
    ///
    /// # Safety
    /// `b` is a block start of `size` granules that is in no list and whose physical
    /// predecessor is not free.
    #[inline(always)]
    unsafe fn make_free(&mut self, b: BlockId, size: u32) {
        let (fl, sl) = class_of(size);
        let head = if self.sl_bitmap[fl] & (1 << sl) != 0 {
            self.heads[fl][sl]
        } else {
            NIL
        };
        // SAFETY: 1. `b` is a block start becoming free; `head`, if not NIL, is a free block.
        unsafe {
            self.store.set_size_flags(b, (size << SIZE_SHIFT) | FREE);
            if head != NIL && ADDR_BIAS && b > head {
                let after = self.store.next_free(head);
                self.store.set_next_free(b, after);
                self.store.set_prev_free(b, head);
                self.store.set_next_free(head, b);
                if after != NIL {
                    self.store.set_prev_free(after, b);
                }
                self.sl_bitmap[fl] |= 1 << sl;
                self.fl_bitmap |= 1 << fl;
                self.free_blocks += 1;
                return;
            }
            self.store.set_next_free(b, head);
            if head != NIL {
                self.store.set_prev_free(head, b);
            }
        }
        self.heads[fl][sl] = b;
        self.sl_bitmap[fl] |= 1 << sl;
        self.fl_bitmap |= 1 << fl;
        self.free_blocks += 1;
    }

    #[inline(always)]
    fn clear_bit(&mut self, fl: usize, sl: usize) {
        self.sl_bitmap[fl] &= !(1 << sl);
        if self.sl_bitmap[fl] == 0 {
            self.fl_bitmap &= !(1 << fl);
        }
    }

    /// Unlinks free block `b` of `size` granules from its list (its flags are left as they are).
    ///
    /// # Safety
    /// `b` is a free block of `size` granules, in its class's list.
    #[inline(always)]
    unsafe fn unlink(&mut self, b: BlockId, size: u32) {
        let (fl, sl) = class_of(size);
        // SAFETY: `b` is free, so its `next_free` names a free block or NIL.
        let next = unsafe { self.store.next_free(b) };
        // The list is non-empty (it holds `b`), so `heads[fl][sl]` is meaningful. A head's
        // `prev_free` is never read: it goes stale when the block before it is unlinked, which
        // spares allocation a write into the next free block.
        if self.heads[fl][sl] == b {
            self.heads[fl][sl] = next;
            if next == NIL {
                self.clear_bit(fl, sl);
            }
        } else {
            // SAFETY: `b` is not its list's head, so its `prev_free` is its predecessor; both neighbours are free blocks of the same list.
            unsafe {
                let prev = self.store.prev_free(b);
                self.store.set_next_free(prev, next);
                if next != NIL {
                    self.store.set_prev_free(next, prev);
                }
            }
        }
        self.free_blocks -= 1;
    }

    /// Sets or clears block `b`'s `PREV_FREE` bit.
    ///
    /// # Safety
    /// `b` is a block start or a sentinel.
    #[inline(always)]
    unsafe fn set_prev_free_bit(&mut self, b: BlockId, prev_free: bool) {
        // SAFETY: the caller's contract.
        unsafe {
            let v = self.store.size_flags(b);
            let v = if prev_free {
                v | PREV_FREE
            } else {
                v & !PREV_FREE
            };
            self.store.set_size_flags(b, v);
        }
    }

    /// The first non-empty class at or above `(fl, sl)`.
    #[inline(always)]
    fn find_class(&self, fl: usize, sl: usize) -> Option<(usize, usize)> {
        if fl >= FL {
            return None;
        }
        let sl_map = self.sl_bitmap[fl] & (!0u32 << sl);
        if sl_map != 0 {
            return Some((fl, sl_map.trailing_zeros() as usize));
        }
        let fl_map = self.fl_bitmap & (!0u32).checked_shl(fl as u32 + 1).unwrap_or(0);
        if fl_map == 0 {
            return None;
        }
        let fl = fl_map.trailing_zeros() as usize;
        Some((fl, self.sl_bitmap[fl].trailing_zeros() as usize))
    }

    // ----- allocation -----

    /// Allocates a block for `layout`, or returns `None` when no free block can hold it.
    ///
    /// The block's payload is at least `layout.size()` bytes aligned to `layout.align()`.
    ///
    /// # Time complexity
    /// O(1), except when the heap is nearly exhausted for this size (see the module docs).
    #[inline]
    pub fn allocate(&mut self, layout: Layout) -> Option<NonNull<u8>> {
        let g = self.granules_for(layout.size())?;
        let b = match self.candidate(g, layout.align()) {
            Some(b) => b,
            None => self.exhaustive_candidate(g, layout.align())?,
        };
        // SAFETY: `b` is a free block that holds `g` granules at `layout.align()`.
        Some(unsafe { self.take(b, g, layout.align()) })
    }

    /// Picks, without unlinking it, the free block an allocation of `g` granules at `align`
    /// would use, in O(1):
    ///
    /// 1. first fit among the first [`SCAN_LIMIT`] blocks of `g`'s own class, whose members may
    ///    or may not fit (a bounded step towards best fit);
    /// 2. else a block of the smallest non-empty class whose every member fits (good fit); for
    ///    blocks of at least [`LOW_FIRST_BYTES`], the lowest-addressed of its first [`LOW_FIRST`].
    ///
    /// Both steps lean towards low addresses, which keeps the high-water mark of the region, and
    /// with it the memory a workload needs, low. `None` means only
    /// [`exhaustive_candidate`](Self::exhaustive_candidate) can still find a block.
    #[inline(always)]
    fn candidate(&self, g: u32, align: usize) -> Option<BlockId> {
        let shift = self.store.granule_shift();
        let pad = if align > 1 << shift {
            (align >> shift) as u32 - 1
        } else {
            0
        };
        let search = g.checked_add(pad).filter(|&s| s <= LOCAL_MASK / 2)?;
        let (fl, sl) = class_at_least(search);
        let (ofl, osl) = class_of(g);
        if (ofl, osl) != (fl, sl) && self.sl_bitmap[ofl] & (1 << osl) != 0 {
            if let Some(b) = self.first_fit_in(ofl, osl, g, align, SCAN_LIMIT) {
                return Some(b);
            }
        }
        let (fl, sl) = self.find_class(fl, sl)?;
        let head = self.heads[fl][sl];
        if (g as usize) << shift < LOW_FIRST_BYTES {
            return Some(head);
        }
        let (mut b, mut best, mut n) = (head, head, 0);
        while b != NIL && n < LOW_FIRST {
            best = best.min(b);
            // SAFETY: `b` is in a free list, so it is a free block.
            b = unsafe { self.store.next_free(b) };
            n += 1;
        }
        Some(best)
    }

    /// The first of the first `limit` blocks of non-empty list `(fl, sl)` that holds `g`
    /// granules at `align`.
    #[inline(always)]
    fn first_fit_in(
        &self,
        fl: usize,
        sl: usize,
        g: u32,
        align: usize,
        limit: u32,
    ) -> Option<BlockId> {
        let (mut b, mut n) = (self.heads[fl][sl], 0);
        while b != NIL && n < limit {
            // SAFETY: `b` is in a free list, so it is a free block.
            let size = size_of_flags(unsafe { self.store.size_flags(b) });
            if size >= g && size - g >= self.front_pad(b, align) {
                return Some(b);
            }
            // SAFETY: as above.
            b = unsafe { self.store.next_free(b) };
            n += 1;
        }
        None
    }

    /// The slow path, for when [`candidate`](Self::candidate) finds nothing: scans every list
    /// that may hold a block of `g` granules at `align`, so that allocation never fails while a
    /// fitting block exists. Its cost is bounded by the free blocks of those classes, and it runs
    /// only when the heap is nearly exhausted for this size.
    #[cold]
    fn exhaustive_candidate(&self, g: u32, align: usize) -> Option<BlockId> {
        let (mut fl, mut sl) = class_of(g);
        while let Some((f, s)) = self.find_class(fl, sl) {
            if let Some(b) = self.first_fit_in(f, s, g, align, u32::MAX) {
                return Some(b);
            }
            (fl, sl) = if s + 1 < SL { (f, s + 1) } else { (f + 1, 0) };
        }
        None
    }

    /// Granules from block `b`'s payload to the first payload position aligned to `align`.
    #[inline(always)]
    fn front_pad(&self, b: BlockId, align: usize) -> u32 {
        if align <= self.granule() {
            return 0;
        }
        let addr = self.store.payload_addr(b);
        let aligned = (addr + align - 1) & !(align - 1);
        ((aligned - addr) >> self.store.granule_shift()) as u32
    }

    /// Allocates `g` granules at `align` from free block `b`: unlinks it, frees the granules in
    /// front of the aligned position and those past `g`, and returns the payload.
    ///
    /// # Safety
    /// `b` is a free block, in its list, of at least `front_pad(b, align) + g` granules.
    #[inline(always)]
    unsafe fn take(&mut self, b: BlockId, g: u32, align: usize) -> NonNull<u8> {
        // SAFETY: `b` is a free block start, so its flags hold its size.
        let size = size_of_flags(unsafe { self.store.size_flags(b) });
        // SAFETY: `b` is a free block of `size` granules in its list.
        unsafe { self.unlink(b, size) };
        let front = self.front_pad(b, align);
        if front == 0 {
            // SAFETY: `b` was free (so its predecessor is used), holds `g`, and is unlisted.
            return unsafe { self.finish_allocation(b, size, g, 0) };
        }
        // SAFETY: the caller guarantees `size >= front + g`. The first `front` granules become a
        // free block (predecessor used), the rest is allocated with `PREV_FREE` set.
        unsafe {
            let rest = b + front;
            self.make_free(b, front);
            self.store.set_prev_size(rest, front);
            self.store.set_prev_size(b + size, size - front);
            self.finish_allocation(rest, size - front, g, PREV_FREE)
        }
    }

    /// Carves `g` granules from unlisted, formerly free block `b` of `size >= g` granules, frees
    /// the rest, marks the block used (with `prev_free` as its `PREV_FREE` bit) and returns its
    /// payload.
    ///
    /// # Safety
    /// `b` is a block start of `size >= g` granules in no list, counted as free; its successor
    /// is not free and has `PREV_FREE` set.
    #[inline(always)]
    unsafe fn finish_allocation(
        &mut self,
        b: BlockId,
        size: u32,
        g: u32,
        prev_free: u32,
    ) -> NonNull<u8> {
        // SAFETY: 1. `b` is a block start; 2. `b + g` is inside the block when `size > g`; 3.
        // `b + size` is the next block or the sentinel.
        unsafe {
            if size > g {
                let rest = b + g;
                self.store.set_prev_size(rest, g);
                self.make_free(rest, size - g);
                // The successor keeps `PREV_FREE`: its predecessor is still free.
                self.store.set_prev_size(b + size, size - g);
            } else {
                self.set_prev_free_bit(b + size, false);
            }
            self.store.set_size_flags(b, (g << SIZE_SHIFT) | prev_free);
        }
        self.free_granules -= g as usize;
        self.used_granules += g as usize;
        self.live += 1;
        // SAFETY: `b` is a valid block.
        unsafe { self.store.payload(b) }
    }

    // ----- deallocation -----

    /// Resolves `ptr` to the id and flags of the used block it starts, as the `# Safety`
    /// contract of the public entry points guarantees.
    #[inline(always)]
    unsafe fn used_block(&self, ptr: NonNull<u8>) -> (BlockId, u32) {
        let b = self.store.block_of(ptr);
        debug_assert!(b.is_some(), "pointer not from this heap");
        // SAFETY: the caller passes a pointer this heap returned and did not free, so it lies in a
        // region, on a granule boundary.
        let b = unsafe { b.unwrap_unchecked() };
        // SAFETY: `b` is a used block start.
        let v = unsafe { self.store.size_flags(b) };
        debug_assert!(
            v & FREE == 0 && size_of_flags(v) > 0,
            "double free or foreign pointer"
        );
        (b, v)
    }

    /// Returns block `b` of `size` granules, out of every list, to the free lists, merging it with
    /// free neighbours. `prev_free` is its `PREV_FREE` bit.
    ///
    /// # Safety
    /// `b` is a block start of `size` granules in no list and not counted as free, and
    /// `prev_free` tells truly whether its predecessor is free.
    #[inline(always)]
    unsafe fn release(&mut self, mut b: BlockId, mut size: u32, prev_free: u32) {
        self.free_granules += size as usize;
        // SAFETY: 1. `b + size` is the next block or the sentinel (never free); 2. when
        // `PREV_FREE` is set, `b - prev_size` is the free previous block; 3. free blocks are in
        // their lists, so unlinking them is sound.
        unsafe {
            let next = b + size;
            let nv = self.store.size_flags(next);
            if nv & FREE != 0 {
                let ns = size_of_flags(nv);
                self.unlink(next, ns);
                self.store.retire(next);
                size += ns;
            }
            if prev_free != 0 {
                let ps = self.store.prev_size(b);
                self.unlink(b - ps, ps);
                self.store.retire(b);
                b -= ps;
                size += ps;
            }
            self.make_free(b, size);
            self.store.set_prev_size(b + size, size);
            self.set_prev_free_bit(b + size, true);
        }
    }

    /// Frees the block at `ptr`.
    ///
    /// # Safety
    /// `ptr` was returned by this heap's `allocate` or `reallocate` and not freed since.
    ///
    /// # Time complexity
    /// O(1).
    #[inline]
    pub unsafe fn deallocate(&mut self, ptr: NonNull<u8>, _layout: Layout) {
        // SAFETY: the caller's contract.
        let (b, v) = unsafe { self.used_block(ptr) };
        let size = size_of_flags(v);
        self.used_granules -= size as usize;
        self.live -= 1;
        // SAFETY: `b` is a used block: in no list, not counted as free; `v` holds its flags.
        unsafe { self.release(b, size, v & PREV_FREE) };
    }

    // ----- reallocation -----

    /// Resizes the block at `ptr` to `new_size` bytes, keeping `layout.align()`. On failure
    /// returns `None` and leaves the block as it was.
    ///
    /// The policy keeps the region compact rather than always resizing in place, since blocks
    /// that only ever grow in place spread over two to three times the memory they hold on a
    /// realloc-heavy workload:
    /// - if the block that `allocate` would pick for the new size lies at a lower address, the
    ///   block moves there (shrinking or growing);
    /// - else a shrinking block shrinks in place, and a growing one grows into a free successor
    ///   when that has room;
    /// - else it moves wherever `allocate` finds room.
    ///
    /// # Safety
    /// `ptr` was returned by this heap with `layout` (same alignment; size at most the block's)
    /// and not freed since.
    ///
    /// # Time complexity
    /// O(1) plus the copy when the block moves.
    pub unsafe fn reallocate(
        &mut self,
        ptr: NonNull<u8>,
        layout: Layout,
        new_size: usize,
    ) -> Option<NonNull<u8>> {
        let g = self.granules_for(new_size)?;
        // SAFETY: the caller's contract.
        let (b, v) = unsafe { self.used_block(ptr) };
        let (size, pf) = (size_of_flags(v), v & PREV_FREE);
        let align = layout.align();
        let lower = self.candidate(g, align).filter(|&c| c < b);
        if let Some(c) = lower {
            // SAFETY: `c` is a free block holding `g` granules at `align`; `ptr` is live.
            return Some(unsafe { self.move_to(c, g, ptr, layout, new_size) });
        }
        if g <= size {
            if g < size {
                // SAFETY: `b` is a used block of `size > g` granules; the tail `b + g..b + size`
                // becomes its own used block (predecessor used) and is released, merging with a
                // free successor.
                unsafe {
                    self.store.set_size_flags(b, (g << SIZE_SHIFT) | pf);
                    self.store.set_prev_size(b + g, g);
                    self.store.set_size_flags(b + g, (size - g) << SIZE_SHIFT);
                    self.used_granules -= (size - g) as usize;
                    self.release(b + g, size - g, 0);
                }
            }
            return Some(ptr);
        }
        // SAFETY: `b + size` is the next block or the sentinel.
        let nv = unsafe { self.store.size_flags(b + size) };
        if nv & FREE != 0 && size + size_of_flags(nv) >= g {
            let ns = size_of_flags(nv);
            let total = size + ns;
            // SAFETY: the successor is a free block of `ns` granules; merging it into `b` and
            // splitting the excess off as a free block keeps invariants 3-5.
            unsafe {
                self.unlink(b + size, ns);
                self.store.retire(b + size);
                if total > g {
                    let rest = b + g;
                    self.store.set_prev_size(rest, g);
                    self.make_free(rest, total - g);
                    // The block after keeps `PREV_FREE`: its predecessor is still free.
                    self.store.set_prev_size(b + total, total - g);
                } else {
                    self.store.set_prev_size(b + total, total);
                    self.set_prev_free_bit(b + total, false);
                }
                self.store.set_size_flags(b, (g << SIZE_SHIFT) | pf);
            }
            self.free_granules -= (g - size) as usize;
            self.used_granules += (g - size) as usize;
            return Some(ptr);
        }
        let c = match self.candidate(g, align) {
            Some(c) => c,
            None => self.exhaustive_candidate(g, align)?,
        };
        // SAFETY: `c` is a free block holding `g` granules at `align`; `ptr` is live.
        Some(unsafe { self.move_to(c, g, ptr, layout, new_size) })
    }

    /// Moves live block `ptr` (allocated with `layout`) into free block `c` as a block of `g`
    /// granules, copying `min(layout.size(), new_size)` bytes, and frees the old block.
    ///
    /// # Safety
    /// `c` is a free block holding `g` granules at `layout.align()`, `g` granules hold
    /// `new_size` bytes, and `ptr` is a live block of this heap allocated with `layout`.
    unsafe fn move_to(
        &mut self,
        c: BlockId,
        g: u32,
        ptr: NonNull<u8>,
        layout: Layout,
        new_size: usize,
    ) -> NonNull<u8> {
        // SAFETY: the caller's contract for `c`.
        let new = unsafe { self.take(c, g, layout.align()) };
        // SAFETY: `ptr` holds at least `layout.size()` bytes, `new` at least `new_size`; they
        // are distinct live blocks, so they do not overlap. Then `ptr` is freed once.
        unsafe {
            core::ptr::copy_nonoverlapping(ptr.as_ptr(), new.as_ptr(), layout.size().min(new_size));
            self.deallocate(ptr, layout);
        }
        new
    }

    // ----- introspection -----

    /// Counters of the heap, in bytes and blocks. O(1) except `largest_free_bytes`, which walks
    /// the list of the largest non-empty class.
    pub fn stats(&self) -> Stats {
        let gs = self.store.granule_shift();
        let region: usize = self.region_len[..self.regions]
            .iter()
            .map(|&n| n as usize)
            .sum();
        let mut largest = 0u32;
        if self.fl_bitmap != 0 {
            let fl = msb(self.fl_bitmap) as usize;
            let sl = msb(self.sl_bitmap[fl]) as usize;
            let mut b = self.heads[fl][sl];
            while b != NIL {
                // SAFETY: `b` is in a free list, so it is a free block.
                let (v, next) = unsafe { (self.store.size_flags(b), self.store.next_free(b)) };
                largest = largest.max(size_of_flags(v));
                b = next;
            }
        }
        Stats {
            region_bytes: region << gs,
            used_bytes: self.used_granules << gs,
            free_bytes: self.free_granules << gs,
            largest_free_bytes: ((largest as usize) << gs).saturating_sub(S::OVERHEAD),
            live_blocks: self.live,
            free_blocks: self.free_blocks,
        }
    }

    /// Walks every region and every free list and checks the invariants in the module docs.
    ///
    /// # Time complexity
    /// O(blocks).
    pub fn check_invariants(&self) -> Result<(), InvariantError> {
        let fail = |what: &'static str, block: BlockId| Err(InvariantError { what, block });
        let (mut used, mut free, mut live, mut free_blocks) = (0usize, 0usize, 0usize, 0usize);
        for r in 0..self.regions {
            let first = (r as u32) << LOCAL_BITS;
            let end = first + self.region_len[r];
            let (mut b, mut prev_size, mut prev_free) = (first, 0u32, false);
            while b < end {
                // SAFETY: `b` is a block start: the first one, or the successor of one checked.
                let (v, ps) = unsafe { (self.store.size_flags(b), self.store.prev_size(b)) };
                let size = size_of_flags(v);
                if size == 0 || size > end - b {
                    return fail("block size zero or past the region's end", b);
                }
                if ps != prev_size {
                    return fail("prev_size differs from the previous block's size", b);
                }
                if (v & PREV_FREE != 0) != prev_free {
                    return fail("PREV_FREE bit differs from the previous block's state", b);
                }
                let is_free = v & FREE != 0;
                if is_free {
                    if prev_free {
                        return fail("two adjacent free blocks", b);
                    }
                    free += size as usize;
                    free_blocks += 1;
                    self.check_links(b, size)?;
                } else {
                    used += size as usize;
                    live += 1;
                }
                (prev_size, prev_free) = (size, is_free);
                b += size;
            }
            // SAFETY: `end` is the region's sentinel.
            let (v, ps) = unsafe { (self.store.size_flags(end), self.store.prev_size(end)) };
            let want = if prev_free { PREV_FREE } else { 0 };
            if b != end || v != want || ps != prev_size {
                return fail("region does not end in its sentinel", end);
            }
        }
        if (used, free, live, free_blocks)
            != (
                self.used_granules,
                self.free_granules,
                self.live,
                self.free_blocks,
            )
        {
            return fail("counters disagree with the blocks", NIL);
        }
        let mut listed = 0usize;
        for fl in 0..FL {
            if (self.fl_bitmap >> fl & 1 != 0) != (self.sl_bitmap[fl] != 0) {
                return fail("fl_bitmap disagrees with sl_bitmap", NIL);
            }
            for sl in 0..SL {
                if self.sl_bitmap[fl] >> sl & 1 == 0 {
                    continue;
                }
                let (mut b, mut prev) = (self.heads[fl][sl], NIL);
                if b == NIL {
                    return fail("bitmap bit set for an empty list", NIL);
                }
                while b != NIL {
                    if !self.looks_like_block(b) {
                        return fail("free list links to a non-block", b);
                    }
                    // SAFETY: `b` is a block start (checked just above).
                    let v = unsafe { self.store.size_flags(b) };
                    if v & FREE == 0 || class_of(size_of_flags(v)) != (fl, sl) {
                        return fail("listed block is used or in the wrong class", b);
                    }
                    // SAFETY: `b` is a free block.
                    let (next, back) =
                        unsafe { (self.store.next_free(b), self.store.prev_free(b)) };
                    if prev != NIL && back != prev {
                        return fail("prev_free link broken", b);
                    }
                    listed += 1;
                    if listed > self.free_blocks {
                        return fail("free list longer than the free block count (cycle?)", b);
                    }
                    (prev, b) = (b, next);
                }
            }
        }
        if listed != self.free_blocks {
            return fail("a free block is missing from the lists", NIL);
        }
        Ok(())
    }

    /// Checks that free block `b` of `size` granules, found by walking its region, is linked
    /// both ways with its list neighbours (or heads its list).
    fn check_links(&self, b: BlockId, size: u32) -> Result<(), InvariantError> {
        let fail = |what: &'static str| Err(InvariantError { what, block: b });
        // SAFETY: `b` is a free block (found free by the physical walk).
        let (next, prev) = unsafe { (self.store.next_free(b), self.store.prev_free(b)) };
        let (fl, sl) = class_of(size);
        if self.sl_bitmap[fl] >> sl & 1 == 0 {
            return fail("free block's class has its bitmap bit clear");
        }
        if self.heads[fl][sl] == b {
            // A head's `prev_free` is stale by design (see `unlink`).
        } else if !self.looks_like_block(prev) {
            return fail("prev_free names a non-block");
        // SAFETY: `prev` looks like a free block start (checked just above).
        } else if unsafe { self.store.next_free(prev) } != b {
            return fail("prev_free's next_free is not this block");
        }
        if next != NIL {
            if !self.looks_like_block(next) {
                return fail("next_free names a non-block");
            }
            // SAFETY: `next` looks like a free block start (checked just above).
            if unsafe { self.store.prev_free(next) } != b {
                return fail("next_free's prev_free is not this block");
            }
        }
        Ok(())
    }

    /// Whether `b` is inside a region and its header agrees with its successor's: the O(1)
    /// plausibility check used for ids found in free lists.
    fn looks_like_block(&self, b: BlockId) -> bool {
        let r = (b >> LOCAL_BITS) as usize;
        if r >= self.regions || b & LOCAL_MASK >= self.region_len[r] {
            return false;
        }
        let end = ((r as u32) << LOCAL_BITS) + self.region_len[r];
        // SAFETY: `b` is inside region `r`; the store's accessors read metadata positions only
        // (in band: the header below a granule boundary, inside the region; out of band: the
        // table), so reading them for an arbitrary granule is sound, if possibly meaningless.
        let size = size_of_flags(unsafe { self.store.size_flags(b) });
        // SAFETY: as above, `b + size <= end` is checked first.
        size != 0 && size <= end - b && unsafe { self.store.prev_size(b + size) } == size
    }
}

// Reachable from `Tlsf` by construction only through the aliases; the init error type is shared.
impl<S> Tlsf<S> {
    /// Number of regions added.
    pub fn region_count(&self) -> usize {
        self.regions
    }
}
