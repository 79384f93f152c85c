//! Two-level segregated fit over one to [`MAX_REGIONS`] regions, generic over where block
//! metadata lives ([`MetaStore`]).
//!
//! # Structure
//!
//! Free blocks sit in doubly linked lists, one per *size class*. A size of `s` granules belongs to
//! class `(fl, sl)`: sizes below [`SL`] granules each have their own class in `fl = 0`; above, `fl`
//! picks the power of two and `sl` one of [`SL`] equal slices of it, so a class spans at most
//! 1/64 of its sizes. Two bitmaps say which lists are non-empty. The heads of the
//! `FL * SL = 25 * 64` lists take 6.4 KiB of the heap's own state (not of its region): the price
//! of a fit within 1.6 % and of peak memory about 1 % lower than with 32 classes per power of two.
//!
//! # Invariants
//!
//! 1. Bit `fl` of `fl_bitmap` is set iff `sl_bitmap[fl] != 0`.
//! 2. Bit `sl` of `sl_bitmap[fl]` is set iff list `(fl, sl)` is non-empty, and then
//!    `heads[fl][sl]` is its first block. When the bit is clear, `heads[fl][sl]` is meaningless.
//!    Every listed block but the head has its predecessor in `prev_free`; a head's `prev_free`
//!    is stale or unwritten and never read.
//! 3. Every free block is in exactly the list of its size class; every block in a list is free.
//! 4. No two free blocks are physically adjacent (coalescing is immediate).
//! 5. The blocks of a region tile it from id `r << LOCAL_BITS` to its sentinel, each block's
//!    `prev_size` is the size of the block before it (0 for the first), its `PREV_FREE` bit says
//!    whether that block is free, and the sentinel has size 0 and is never free.
//! 6. `used_granules`, `live` and `free_blocks` equal the sums over all blocks, and used plus
//!    free granules equal `total_granules`.
//! 7. A used block has exactly the granules its layout's size needs (every spare granule is
//!    split off), unless allocation rounded it up to a size bin or took it from one, or
//!    reallocation shrank it without splitting (see [`Tlsf::reallocate`]): then it has at least
//!    that many, and at least `SL`. So a block under `SL` granules has its layout's size, which
//!    is why a free to a quick list can take the size from the layout.
//! 8. Every block on quick list `g` is a used block of `g` granules, every block in size bin
//!    `k` a used block of `s >= SL` granules with `bin_down(s) == k` whose payload holds `s`
//!    after the bin's link, each on no other list; the lists hold `quick_blocks` blocks in
//!    all, of `quick_granules <= quick_budget` and `bin_granules <= bin_budget` granules, which
//!    `used_granules` and `live` count as used.
//!
//! [`Tlsf::check_invariants`] verifies 1 to 6 and 8 by walking every region and every list;
//! debug builds assert 7 on every free.
//!
//! # Placement
//!
//! A request below [`LOW_FIRST_BYTES`] takes the head of the smallest non-empty class whose
//! every block fits (good fit): a bitmap search and a list pop. Larger requests, and the
//! reallocation policy, lean towards low addresses, because the memory a workload needs is set
//! by the highest address it ever uses: they first try up to [`SCAN_LIMIT`] blocks of the
//! request's own class, then take the lowest of the first [`LOW_FIRST`] blocks of the good-fit
//! class, and a freed block of that size that lies above its list's head is inserted second.
//! [`Tlsf::reallocate`] moves a block down whenever a lower block fits and the copy is at most
//! [`MOVE_DOWN_MAX_BYTES`].
//!
//! Reallocation compacts only while the heap is at least [`Tlsf::set_compact_above`] % full
//! (25 by default), allocation only from [`PLACE_LOW_ABOVE`] % (60). Below, every request up
//! to 1 MiB takes the good-fit head, and reallocation resizes in place first (a block of `SL`
//! granules or more that shrinks to half its size or more keeps it); a block that cannot grow
//! in place moves to the start of a free block [`GROW_ROOM`] times its new size, where it can
//! grow again.
//!
//! # Quick lists
//!
//! Below [`PLACE_LOW_ABOVE`] % full, a freed block of fewer than `SL` granules (under 1 KiB by
//! default) is not merged: it goes whole onto the quick list of its size, a stack linked through
//! the payloads, and the next request of that size (and alignment) takes it back in a few
//! instructions. The lists hold at most `1 / QUICK_SHARE` of the heap; past that, and above
//! the threshold, blocks are freed as usual, while requests still take what the lists hold. A
//! request that nothing else can serve first returns every listed block to the free lists
//! ([`Tlsf::trim`]), so they never make an allocation fail. Stores that may not write inside
//! the region ([`OutOfBand`]) have none.
//!
//! # Size bins
//!
//! Off by default, on with [`Tlsf::set_size_bins`]: what the quick lists do for small blocks,
//! for blocks of `SL` granules or more, whose sizes are too many to be held one list per size.
//! While the quick lists are open, such requests are rounded up to one of four bin sizes per
//! power of two, and freed blocks wait whole in the bin of the largest bin size they hold,
//! so that the next request of that bin takes one without search, split or merge; past the
//! threshold, the next request of [`LOW_FIRST_BYTES`] or more merges them back. It trades
//! memory (the rounding, unmerged blocks) for time, which is why it is a setting.
//!
//! # Time complexity
//!
//! `allocate`, `deallocate` and in-place `reallocate` are O(1) for every alignment: the bitmap
//! search finds a class whose every block fits (the request rounded up to the next class
//! boundary, plus `align - granule` when the alignment exceeds the granule), and the scans above
//! are bounded by constants. Only when that finds nothing, i.e. the heap is nearly out of memory
//! for that size, does `allocate` scan the lists of the classes below, so that it never reports
//! out-of-memory while a block that fits exists. With the size bins on, the first request of
//! [`LOW_FIRST_BYTES`] or more past the threshold merges every binned block back: bounded by
//! the share they may hold, and paid once per binning of a block.

use core::alloc::Layout;
use core::ptr::NonNull;

use crate::store::{BlockId, MetaStore, OutOfBand, LOCAL_BITS, LOCAL_MASK, MAX_REGIONS, NIL};
use crate::{AllocAtError, FreeError, InvariantError, ResizeError, Stats};

// Inlining: the hot helpers are `inline(always)` on hosts, where the benchmark streams run up
// to 7 % slower without it (large blocks, reallocation). On bare-metal targets
// (`target_os = "none"`) the optimiser decides, and the helpers called from several places
// (free-list insertion and removal, carving and releasing blocks, the class and candidate
// searches, `allocate` and `deallocate`) stay out of line: a firmware built for size carries one
// copy of each (the README's code-size table).
//
// With the `small-code` feature, in-band heaps (`MetaStore::SMALL_CODE`, read as
// `Self::SMALL_CODE` in conditions, so that the dead paths vanish at compile time) leave out the
// quick lists, the low-address policy, the exhaustive search and the fast path's copy of the
// allocation; reallocation resizes in place or moves, free blocks are counted only by `stats`,
// and the helpers a firmware would otherwise carry twice are inlined into their one caller (the
// `feature = "small-code"` inlining attributes): see the crate docs, "Code size".

/// log2 of the number of second-level classes per power of two in the default configuration.
///
/// 6 rather than the classic 5: on the benchmark streams the finer classes cut the region a
/// workload needs by about 1 % at no measurable cost in time.
pub const SLI: u32 = 6;
/// Second-level classes per power of two in the default configuration.
pub const SL: usize = 1 << SLI;
/// First-level classes in the default configuration: enough for blocks of up to
/// `2^LOCAL_BITS` granules.
pub const FL: usize = (LOCAL_BITS - SLI + 1) as usize;

/// First-level classes of [`crate::SmallHeap`]: with [`SMALL_SL`], blocks of up to
/// `2^13 - 1` granules (128 KiB in band).
pub const SMALL_FL: usize = 10;
/// Second-level classes per power of two of [`crate::SmallHeap`].
pub const SMALL_SL: usize = 16;

/// `size_flags` bit: the block is free.
const FREE: u32 = 1;
/// `size_flags` bit: the physically previous block is free (so `prev_size` leads to it without
/// reading its header).
const PREV_FREE: u32 = 2;
/// Reallocation moves a block down to a lower free block only when that copies at most this
/// many bytes: beyond it the copy costs more than the compaction is worth (a few MiB buffer in
/// the shared arena, say), and the block is resized in place when it can be.
pub const MOVE_DOWN_MAX_BYTES: usize = 256 * 1024;
/// Below the compacting threshold (see [`Tlsf::set_compact_above`]), a block that cannot grow
/// in place moves into a free block of a class that guarantees this many times its new size
/// (at its start, after any alignment padding), whose rest stays free after it, so that it can
/// grow in place again; else into any block that fits. On the benchmark's realloc stream, 4
/// instead of 2 halved the moves and the bytes copied (without it, every growth moves, and
/// copies four times the bytes).
pub const GROW_ROOM: u32 = 4;
/// How many blocks of the request's own class `allocate` tries before taking a block from a
/// larger class.
pub const SCAN_LIMIT: u32 = 4;
/// How many blocks of the chosen class `allocate` compares to pick the lowest-addressed one.
pub const LOW_FIRST: u32 = 4;
/// Blocks of at least this many bytes get the low-address heuristics (own-class first fit,
/// lowest of [`LOW_FIRST`], second-place insertion); smaller ones take the short path (good fit,
/// list head), sparing cache misses and unpredictable branches where they would buy little.
pub const LOW_FIRST_BYTES: usize = 1024;
/// The largest request that [`Tlsf::allocate`]'s inline path serves while the heap is not
/// placing blocks low (see [`Tlsf::set_compact_above`]); larger ones take the out-of-line path.
const FAST_PATH_MAX_BYTES: usize = 1 << 20;
/// `size_flags` holds the size in granules above the two flag bits.
const SIZE_SHIFT: u32 = 2;

/// The second-level bitmap type.
type SlMap = u64;

/// The TLSF allocator over regions whose metadata lives in `S`, with `FL` first-level classes,
/// `SL` second-level classes per power of two and `SB` size bins.
///
/// The class count sets the heap's own state (`FL * SL` list heads of 4 bytes, `FL` bitmaps of
/// 8) and the largest block: `2^(FL + log2(SL) - 1) - 1` granules; a region larger than that is
/// cut into regions of that size (see `init`). `SL` is a power of two from 2 to 64, `FL` from 1
/// to 32, and the largest block at most [`LOCAL_MASK`] granules; other values do not compile.
/// The size bins ([`Tlsf::set_size_bins`]) take a pointer each; `0` leaves them out.
///
/// Use it through the aliases [`crate::Heap`] (in band, default classes), [`crate::SmallHeap`]
/// (in band, state under 1 KiB) and [`crate::OobHeap`] (out of band).
pub struct Tlsf<
    S,
    const FL: usize = { self::FL },
    const SL: usize = { self::SL },
    const SB: usize = { self::SIZE_BINS },
> {
    store: S,
    fl_bitmap: u32,
    sl_bitmap: [SlMap; FL],
    heads: [[BlockId; SL]; FL],
    /// Size in granules of each region, sentinel excluded; regions `0..regions`.
    region_len: [u32; MAX_REGIONS],
    regions: usize,
    /// Granules of all regions, sentinels excluded.
    total_granules: usize,
    used_granules: usize,
    live: usize,
    free_blocks: usize,
    /// Reallocation moves blocks down while `used_granules >= compact_from`.
    compact_from: usize,
    /// Allocation places blocks low, and the quick lists take no blocks, while
    /// `used_granules >= place_low_from`.
    place_low_from: usize,
    /// The percentage `compact_from` is derived from (see [`Tlsf::set_compact_above`]), plus
    /// one; 0 stands for [`DEFAULT_COMPACT_ABOVE`], so that an empty heap is all zeros (a
    /// `static` of it then lives in `.bss`, not in flash).
    compact_above_plus_one: u8,
    /// Quick lists (see the module docs): `quick[g]` heads the blocks of `g < SL` granules held
    /// for reuse, linked through the first word of their payloads; null when empty.
    quick: [QuickHead; SL],
    /// Granules and blocks held on the quick lists; both are also counted in `used_granules`
    /// and `live`, since to the free lists those blocks are used.
    quick_granules: usize,
    quick_blocks: usize,
    /// The most granules the quick lists may hold: [`QUICK_SHARE`] of the heap.
    quick_budget: usize,
    /// Size bins (see [`Tlsf::set_size_bins`]): `bins[k]` heads the freed blocks whose
    /// largest bin size is bin `k`'s, linked through their payloads like the quick lists; a
    /// binned block's payload holds its size in granules as a `u32` at byte 8, after the link.
    bins: [QuickHead; SB],
    /// Granules held in the bins, also counted in `used_granules` (their blocks are counted in
    /// `quick_blocks`).
    bin_granules: u32,
    /// The most granules the bins may hold: `bin_share` % of the heap, at most `u32::MAX / 2`
    /// (so that adding a block's size to `bin_granules` cannot overflow); 0 while they are off.
    /// `u32` keeps [`crate::SmallHeap`], which carries the counters without bins, within 1 KiB.
    bin_budget: u32,
    bin_share: u8,
    /// Whether a used block may be larger than its layout needs (invariant 7): set once the
    /// bins were on or a reallocation kept a shrunk block's spare granules, and never cleared.
    /// For the debug checks of a free, which are exact until then (and afterwards still catch
    /// a layout under `SL` granules or larger than the block).
    loose_sizes: bool,
}

/// Size bins of the default heap ([`Tlsf::set_size_bins`]): four per power of two from `SL`
/// granules, so for blocks from 1 KiB to 56 MiB; none on bare-metal targets
/// (`target_os = "none"`), where the bins' code (about 0.6 KB) and state (a pointer per bin)
/// would cost a firmware for a setting made for hosts' large-block workloads.
pub const SIZE_BINS: usize = if cfg!(target_os = "none") { 0 } else { 64 };

/// The head of a quick list: the payload of its first block, or null.
#[derive(Clone, Copy)]
struct QuickHead(*mut u8);

// SAFETY: a quick list's blocks belong to the heap as much as its free blocks do (the
// `init`/`add_region` contract gives the regions to the heap alone), so the pointer moves with
// the heap's other state.
unsafe impl Send for QuickHead {}

/// The quick lists may hold up to `1 / QUICK_SHARE` of a heap's granules.
pub const QUICK_SHARE: usize = 16;

/// Allocation places blocks low and the quick lists stop taking blocks once this percentage of
/// the heap is in use, or [`Tlsf::set_compact_above`]'s if that is higher (see there).
pub const PLACE_LOW_ABOVE: u8 = 60;

/// The default of [`Tlsf::set_compact_above`]: the low-address policy applies while more than
/// this percentage of the heap is in use.
pub const DEFAULT_COMPACT_ABOVE: u8 = 25;

/// A block being worked on: its id (for links) and the store's handle (for access).
struct Blk<P> {
    id: BlockId,
    p: P,
}

impl<P: Copy> Clone for Blk<P> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<P: Copy> Copy for Blk<P> {}

/// A size class: `(fl, sl)`, always `fl < FL` and `sl < SL`.
type Class = (usize, usize);

#[cfg_attr(not(target_os = "none"), inline(always))]
#[cfg_attr(target_os = "none", inline)]
fn size_of_flags(v: u32) -> u32 {
    v >> SIZE_SHIFT
}

#[cfg_attr(not(target_os = "none"), inline(always))]
#[cfg_attr(target_os = "none", inline)]
fn msb(x: u32) -> u32 {
    31 - x.leading_zeros()
}

impl<S: MetaStore, const FL: usize, const SL: usize, const SB: usize> Tlsf<S, FL, SL, SB> {
    /// log2 of `SL`.
    const SLI: u32 = SL.trailing_zeros();

    /// Whether this heap keeps quick lists: where the store lets it, unless built for code size.
    const QUICK: bool = S::QUICK_LISTS && !Self::SMALL_CODE;

    /// Whether this heap is built for code size (see [`MetaStore::SMALL_CODE`]).
    const SMALL_CODE: bool = S::SMALL_CODE;

    /// The most granules one block can have: the largest size that has a class.
    pub const MAX_BLOCK_GRANULES: u32 = {
        assert!(SL.is_power_of_two() && SL >= 2 && SL <= SlMap::BITS as usize);
        assert!(FL >= 1 && FL <= 32);
        let bits = FL as u32 + SL.trailing_zeros() - 1;
        assert!(
            bits <= LOCAL_BITS,
            "the classes reach past the largest region"
        );
        if bits == LOCAL_BITS {
            LOCAL_MASK
        } else {
            (1 << bits) - 1
        }
    };

    /// The class of a block of `size` granules (`1 <= size <= MAX_BLOCK_GRANULES`).
    #[cfg_attr(not(target_os = "none"), inline(always))]
    #[cfg_attr(target_os = "none", inline)]
    fn class_of(size: u32) -> Class {
        if size < SL as u32 {
            (0, size as usize)
        } else {
            let m = msb(size);
            let fl = (m - Self::SLI + 1) as usize;
            let sl = (size >> (m - Self::SLI)) as usize & (SL - 1);
            // `size <= MAX_BLOCK_GRANULES` bounds `fl`; `min` lets the compiler drop the bounds
            // checks.
            (fl.min(FL - 1), sl)
        }
    }

    /// The smallest class whose every block holds `size` granules
    /// (`size <= MAX_BLOCK_GRANULES / 2`).
    #[cfg_attr(not(target_os = "none"), inline(always))]
    #[cfg_attr(target_os = "none", inline)]
    fn class_at_least(size: u32) -> Class {
        if size < SL as u32 {
            (0, size as usize)
        } else {
            let round = (1u32 << (msb(size) - Self::SLI)) - 1;
            Self::class_of(size + round)
        }
    }

    /// A heap with no regions over `store`.
    pub(crate) const fn with_store(store: S) -> Self {
        // Evaluating the constant checks the class parameters at compile time.
        let _ = Self::MAX_BLOCK_GRANULES;
        Self {
            store,
            fl_bitmap: 0,
            sl_bitmap: [0; FL],
            heads: [[0; SL]; FL],
            region_len: [0; MAX_REGIONS],
            regions: 0,
            total_granules: 0,
            used_granules: 0,
            live: 0,
            free_blocks: 0,
            compact_from: 0,
            place_low_from: 0,
            compact_above_plus_one: 0,
            quick: [QuickHead(core::ptr::null_mut()); SL],
            quick_granules: 0,
            quick_blocks: 0,
            quick_budget: 0,
            bins: [QuickHead(core::ptr::null_mut()); SB],
            bin_granules: 0,
            bin_budget: 0,
            bin_share: 0,
            loose_sizes: false,
        }
    }

    /// Sets how full the heap must be before it spends time on keeping blocks at low
    /// addresses, in two steps:
    /// - once `percent` % of its granules are in use, [`reallocate`](Self::reallocate) moves
    ///   blocks down when a lower block fits (copying up to [`MOVE_DOWN_MAX_BYTES`]); below,
    ///   it resizes in place whenever it can (a block of `SL` granules or more that shrinks to
    ///   no less than half its size keeps it) and moves a block that cannot grow in place to
    ///   where it can grow again (the start of a free block [`GROW_ROOM`] times its new size);
    /// - once [`PLACE_LOW_ABOVE`] % (60) are in use, or `percent` % if that is higher,
    ///   allocations of at least [`LOW_FIRST_BYTES`] look at a few more blocks for a lower one, a
    ///   freed block that lies above its list's head goes second, and the quick lists take no
    ///   more blocks; below, allocation takes the first block of the good-fit class, and a freed
    ///   block of less than `SL` granules goes onto a quick list (up to `1 / QUICK_SHARE` of the
    ///   heap), from which the next request of its size takes it whole.
    ///
    /// The low-address policy is what lets a workload run in a region close to its peak live
    /// bytes (it keeps the high-water mark down), and it costs time: on the benchmark streams
    /// about 4.4 times as much per reallocation (it copies blocks down), and a fifth to three
    /// fifths more per allocation and free (quick lists closed, more blocks read).
    /// Applied only once the heap fills up, it is paid where memory is short. Blocks spread out
    /// while the heap is emptier stay spread out when it fills up: on the realloc benchmark
    /// streams, reallocation compacting from 50 % rather than 25 % took a quarter more memory
    /// (from 60 %, twice as much); allocation's steps did not need more memory on any stream
    /// when applied from 60 %, and up to 10 % more from 80 % (the README's "Speed against
    /// memory").
    /// `0` applies everything always (the most compact heap, without quick lists; what a heap
    /// whose address range is its cost wants, such as a shared arena whose touched pages are
    /// memory), `100` nothing ever (the fastest). Values above 100 count as 100. The default
    /// is [`DEFAULT_COMPACT_ABOVE`].
    pub fn set_compact_above(&mut self, percent: u8) {
        self.compact_above_plus_one = percent.min(100) + 1;
        self.update_compact_from();
        if percent == 0 {
            // No quick lists from now on, and none left over.
            self.trim();
        }
    }

    /// Turns the size bins on (`percent` > 0: the share of the heap they may hold) or off (`0`,
    /// the default): speed for memory, for workloads of many blocks of `SL` granules (1 KiB)
    /// or more.
    ///
    /// While they are on and the quick lists are open (below [`PLACE_LOW_ABOVE`] % full, see
    /// [`set_compact_above`](Self::set_compact_above)), a request of `SL` granules or more is
    /// rounded up to the next bin size, four per power of two (at most 25 % more, 12 % on
    /// average for sizes spread evenly on a log scale), and a freed block of `SL` granules or
    /// more waits whole in the bin of the largest bin size it holds, while the bins hold less
    /// than `percent` % of the heap. A request whose bin holds a block takes it, at any
    /// fullness, without splitting or merging anything: a few instructions instead of the free
    /// lists' search, split and merges. The block may be up to 1.5 times the request (one not
    /// rounded, such as a reallocated block, waits in the bin below its size). Once the heap is
    /// past the threshold, the next request of [`LOW_FIRST_BYTES`] or more first returns every
    /// binned block to the free lists, so that the low-address steps see them. Requests the
    /// bins cannot serve are served as usual; one that nothing else can serve first returns
    /// every binned block to the free lists (see [`trim`](Self::trim)), so the bins never make
    /// an allocation fail.
    ///
    /// The price is memory: the rounding, and blocks held whole where the free lists would
    /// have merged them. On the benchmark's large-block stream (4 KiB to 1 MiB), `25` makes it
    /// faster than every peer (a little faster than the buddy allocator, twice as fast as
    /// talc), and the region the benchmark streams need 0-2 % larger (the README's "Speed
    /// against memory: size bins"). A heap without quick lists (out of band, `small-code`) or
    /// without bins (`SB = 0`, such as [`SmallHeap`](crate::SmallHeap)) ignores the setting.
    /// Values above 100 count as 100; lowering the share returns every binned block to the free
    /// lists.
    pub fn set_size_bins(&mut self, percent: u8) {
        if !Self::BINS {
            return;
        }
        let lower = percent < self.bin_share;
        self.bin_share = percent.min(100);
        self.loose_sizes |= percent != 0;
        self.update_compact_from();
        if lower {
            // The bins may hold more than the new share: none left over.
            self.trim_bins();
        }
    }

    /// The percentage set by [`set_size_bins`](Self::set_size_bins) (0 in a heap without bins).
    pub fn size_bins(&self) -> u8 {
        self.bin_share
    }

    /// Whether this heap can keep size bins: where it keeps quick lists and has bins, and `SL`
    /// is at least 8 (so that bin sizes are whole numbers of granules).
    const BINS: bool = Self::QUICK && SB > 0 && SL >= 8;

    /// The bin that a request of `g >= SL` granules rounds up to, and the bin's size: four bins
    /// per power of two, bin `k` of size `(5 + (k + 3) % 4) << ((k + 3) / 4 + SLI - 3)`
    /// granules: `SL`, then 1.25, 1.5, 1.75 and 2 times `SL`, and so on (`k` may be `SB` or
    /// more: a size without a bin).
    #[cfg_attr(not(target_os = "none"), inline(always))]
    #[cfg_attr(target_os = "none", inline)]
    fn bin_up(g: u32) -> (usize, u32) {
        // `x = g - 1` lies in `[4, 8) << (m - 2)`: its top three bits `j` pick the quarter of
        // the power of two, and every size up to `(j + 1) << (m - 2)` rounds up to that bin.
        // `g >= SL >= 8` keeps `m >= SLI - 1 >= 2`; the smallest request, `g = SL`, has
        // `m = SLI - 1` and `j = 7`, bin 0.
        let x = g - 1;
        let m = msb(x);
        let j = x >> (m - 2);
        let k = ((m + 1 - Self::SLI) << 2) + j - 7;
        (k as usize, (j + 1) << (m - 2))
    }

    /// The bin a freed block of `s >= SL` granules goes to: the one of the largest bin size at
    /// most `s`, so that the block serves every request of that bin.
    #[cfg_attr(not(target_os = "none"), inline(always))]
    #[cfg_attr(target_os = "none", inline)]
    fn bin_down(s: u32) -> usize {
        // The bin `s + 1` rounds up to is the first whose size exceeds `s`, bin 1 or above.
        Self::bin_up(s + 1).0 - 1
    }

    /// The percentage set by [`set_compact_above`](Self::set_compact_above).
    pub fn compact_above(&self) -> u8 {
        match self.compact_above_plus_one {
            0 => DEFAULT_COMPACT_ABOVE,
            p => p - 1,
        }
    }

    fn update_compact_from(&mut self) {
        if Self::SMALL_CODE {
            // Never read: the low-address policy and the quick lists are compiled out.
            return;
        }
        self.quick_budget = self.total_granules / QUICK_SHARE;
        self.bin_budget = if Self::BINS {
            self.share(self.bin_share)
                .min(self.total_granules)
                .min(u32::MAX as usize / 2) as u32
        } else {
            0
        };
        let percent = self.compact_above();
        let place_low = match percent {
            0 => 0,
            p => p.max(PLACE_LOW_ABOVE),
        };
        self.compact_from = self.share(percent);
        self.place_low_from = self.share(place_low);
    }

    /// `percent` % of the heap's granules; `usize::MAX` (never reached) for 100 %.
    fn share(&self, percent: u8) -> usize {
        let (total, percent) = (self.total_granules, percent as usize);
        if percent >= 100 {
            usize::MAX
        } else {
            // Split so that `total * percent` cannot overflow on 32-bit targets.
            total / 100 * percent + total % 100 * percent / 100
        }
    }

    /// Whether reallocation moves blocks down now (see
    /// [`set_compact_above`](Self::set_compact_above)).
    #[cfg_attr(not(target_os = "none"), inline(always))]
    #[cfg_attr(target_os = "none", inline)]
    fn compacting(&self) -> bool {
        !Self::SMALL_CODE && self.used_granules >= self.compact_from
    }

    /// Whether allocation places blocks low, and the quick lists are closed, now (see
    /// [`set_compact_above`](Self::set_compact_above)).
    #[cfg_attr(not(target_os = "none"), inline(always))]
    #[cfg_attr(target_os = "none", inline)]
    fn placing_low(&self) -> bool {
        !Self::SMALL_CODE && self.used_granules >= self.place_low_from
    }

    /// The metadata store.
    pub fn store(&self) -> &S {
        &self.store
    }

    pub(crate) fn store_mut(&mut self) -> &mut S {
        &mut self.store
    }

    /// Bytes per granule: the unit of block sizes and the alignment every payload has.
    #[cfg_attr(not(target_os = "none"), inline(always))]
    #[cfg_attr(target_os = "none", inline)]
    pub fn granule(&self) -> usize {
        1 << self.store.granule_shift()
    }

    #[cfg_attr(not(target_os = "none"), inline(always))]
    #[cfg_attr(target_os = "none", inline)]
    fn blk(&self, id: BlockId) -> Blk<S::Ptr> {
        Blk {
            id,
            p: self.store.locate(id),
        }
    }

    /// The block `n` granules after `b` (same region).
    #[cfg_attr(not(target_os = "none"), inline(always))]
    #[cfg_attr(target_os = "none", inline)]
    fn after(&self, b: Blk<S::Ptr>, n: u32) -> Blk<S::Ptr> {
        Blk {
            id: b.id + n,
            p: self.store.forward(b.p, n),
        }
    }

    /// The block `n` granules before `b` (same region).
    #[cfg_attr(not(target_os = "none"), inline(always))]
    #[cfg_attr(target_os = "none", inline)]
    fn before(&self, b: Blk<S::Ptr>, n: u32) -> Blk<S::Ptr> {
        Blk {
            id: b.id - n,
            p: self.store.backward(b.p, n),
        }
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
        self.total_granules += n as usize;
        self.update_compact_from();
        let b = self.blk(first);
        let end = self.after(b, n);
        // SAFETY: 1. `first` is the region's first block start and `first + n` its sentinel,
        // both inside the region the store just registered.
        unsafe {
            self.store.set_prev_size(b.p, 0);
            self.store.set_prev_size(end.p, n);
            self.store.set_size_flags(end.p, PREV_FREE);
            self.make_free(b, n);
        }
    }

    /// Granules a request of `size` bytes needs, or `None` if no region could ever hold it.
    #[cfg_attr(not(target_os = "none"), inline(always))]
    #[cfg_attr(target_os = "none", inline)]
    fn granules_for(&self, size: usize) -> Option<u32> {
        let shift = self.store.granule_shift();
        let bytes = size.checked_add(S::OVERHEAD + (1 << shift) - 1)?;
        let g = (bytes >> shift).max(1);
        if g > Self::MAX_BLOCK_GRANULES as usize {
            return None;
        }
        Some(g as u32)
    }

    // ----- free lists -----

    /// Whether second-level bitmaps are worked on as `u32`: when they have at most 32 classes
    /// on a 32-bit target, where `u64` shifts and bit scans take several instructions each. The
    /// stored `u64` then never has a bit above 31 set.
    const NARROW: bool = SL <= 32 && usize::BITS <= 32;

    /// The second-level bitmap of first-level class `fl`.
    #[cfg_attr(not(target_os = "none"), inline(always))]
    #[cfg_attr(target_os = "none", inline)]
    fn sl_map(&self, fl: usize) -> SlMap {
        if Self::NARROW {
            // Zero-extended, so that every operation on it compiles to 32-bit ones.
            self.sl_bitmap[fl] as u32 as SlMap
        } else {
            self.sl_bitmap[fl]
        }
    }

    /// `SlMap` with bits `sl` and up set, for `sl < SL`.
    #[cfg_attr(not(target_os = "none"), inline(always))]
    #[cfg_attr(target_os = "none", inline)]
    fn bits_from(sl: usize) -> SlMap {
        if Self::NARROW {
            (!0u32 << sl) as SlMap
        } else {
            !0 << sl
        }
    }

    /// `SlMap` with bit `sl` set, for `sl < SL`.
    #[cfg_attr(not(target_os = "none"), inline(always))]
    #[cfg_attr(target_os = "none", inline)]
    fn bit(sl: usize) -> SlMap {
        if Self::NARROW {
            (1u32 << sl) as SlMap
        } else {
            1 << sl
        }
    }

    #[cfg_attr(not(target_os = "none"), inline(always))]
    #[cfg_attr(target_os = "none", inline)]
    fn has(&self, (fl, sl): Class) -> bool {
        self.sl_map(fl) & Self::bit(sl) != 0
    }

    /// Marks `b` free with `size` granules and puts it on its class's list: first, or second
    /// when it lies above the head, so that heads lean towards low addresses (see
    /// [`candidate`](Self::candidate)). Its successor's `prev_size` and `PREV_FREE` bit are the
    /// caller's business.
    ///
    /// # Safety
    /// `b` is a block start of `size` granules that is in no list and whose physical
    /// predecessor is not free.
    #[cfg_attr(not(target_os = "none"), inline(always))]
    #[cfg_attr(target_os = "none", inline)]
    unsafe fn make_free(&mut self, b: Blk<S::Ptr>, size: u32) {
        // SAFETY: forwarded; `b.p` is a handle to `b`.
        unsafe { self.make_free_via(b, size, b.p) }
    }

    /// [`make_free`](Self::make_free), writing `b`'s own links through handle `links` (see
    /// [`MetaStore::owner_handle`]).
    ///
    /// # Safety
    /// As for `make_free`, and `links` is `b.p` or `owner_handle(b.p, _)` for `b`'s owner.
    #[cfg_attr(not(target_os = "none"), inline(always))]
    #[cfg_attr(target_os = "none", inline(never))]
    unsafe fn make_free_via(&mut self, b: Blk<S::Ptr>, size: u32, links: S::Ptr) {
        let c @ (fl, sl) = Self::class_of(size);
        if !Self::SMALL_CODE {
            // Small code counts free blocks in `stats` instead.
            self.free_blocks += 1;
        }
        // SAFETY: `b` is a block start becoming free.
        unsafe { self.store.set_size_flags(b.p, (size << SIZE_SHIFT) | FREE) };
        if !self.has(c) {
            // SAFETY: as above.
            unsafe { self.store.set_next_free(links, NIL) };
            self.heads[fl][sl] = b.id;
            self.sl_bitmap[fl] = self.sl_map(fl) | Self::bit(sl);
            self.fl_bitmap |= 1 << fl;
            return;
        }
        let head_id = self.heads[fl][sl];
        let head = self.store.locate(head_id);
        // SAFETY: the list is non-empty, so `head` is a free block; so is `after` if not NIL.
        unsafe {
            if b.id > head_id
                && ((size as usize) << self.store.granule_shift()) >= LOW_FIRST_BYTES
                && self.placing_low()
            {
                let after = self.store.next_free(head);
                self.store.set_next_free(links, after);
                self.store.set_prev_free(links, head_id);
                self.store.set_next_free(head, b.id);
                if after != NIL {
                    self.store.set_prev_free(self.store.locate(after), b.id);
                }
            } else {
                self.store.set_next_free(links, head_id);
                self.store.set_prev_free(head, b.id);
                self.heads[fl][sl] = b.id;
            }
        }
    }

    #[cfg_attr(not(target_os = "none"), inline(always))]
    #[cfg_attr(target_os = "none", inline)]
    fn clear_bit(&mut self, (fl, sl): Class) {
        let map = self.sl_map(fl) & !Self::bit(sl);
        self.sl_bitmap[fl] = map;
        if map == 0 {
            self.fl_bitmap &= !(1 << fl);
        }
    }

    /// Unlinks free block `b` from the list of class `c` (its flags are left as they are).
    ///
    /// # Safety
    /// `b` is a free block in the list of class `c`.
    #[cfg_attr(not(target_os = "none"), inline(always))]
    #[cfg_attr(all(target_os = "none", not(feature = "small-code")), inline(never))]
    #[cfg_attr(all(target_os = "none", feature = "small-code"), inline)]
    unsafe fn unlink(&mut self, b: Blk<S::Ptr>, c @ (fl, sl): Class) {
        if !Self::SMALL_CODE {
            self.free_blocks -= 1;
        }
        // SAFETY: `b` is free, so its `next_free` names a free block or NIL.
        let next = unsafe { self.store.next_free(b.p) };
        // The list is non-empty (it holds `b`), so `heads[fl][sl]` is meaningful. A head's
        // `prev_free` is never read: it goes stale when the block before it is unlinked, which
        // spares allocation a write into the next free block.
        if self.heads[fl][sl] == b.id {
            self.heads[fl][sl] = next;
            if next == NIL {
                self.clear_bit(c);
            }
        } else {
            // SAFETY: `b` is not its list's head, so its `prev_free` is its predecessor; both
            // neighbours are free blocks of the same list.
            unsafe {
                let prev = self.store.prev_free(b.p);
                self.store.set_next_free(self.store.locate(prev), next);
                if next != NIL {
                    self.store.set_prev_free(self.store.locate(next), prev);
                }
            }
        }
    }

    /// Unlinks free block `b` of `size` granules from the list of its class.
    ///
    /// # Safety
    /// `b` is a free block of `size` granules in the list of its class.
    #[cfg_attr(not(target_os = "none"), inline(always))]
    #[cfg_attr(all(target_os = "none", not(feature = "small-code")), inline)]
    #[cfg_attr(all(target_os = "none", feature = "small-code"), inline(never))]
    unsafe fn unlink_sized(&mut self, b: Blk<S::Ptr>, size: u32) {
        // SAFETY: forwarded; a free block is in the list of its size's class.
        unsafe { self.unlink(b, Self::class_of(size)) }
    }

    /// Sets or clears the `PREV_FREE` bit of block (or sentinel) `b`.
    ///
    /// # Safety
    /// `b` is a block start or a sentinel.
    #[cfg_attr(not(target_os = "none"), inline(always))]
    #[cfg_attr(target_os = "none", inline)]
    unsafe fn set_prev_free_bit(&mut self, b: Blk<S::Ptr>, prev_free: bool) {
        // SAFETY: the caller's contract.
        unsafe {
            let v = self.store.size_flags(b.p);
            let v = if prev_free {
                v | PREV_FREE
            } else {
                v & !PREV_FREE
            };
            self.store.set_size_flags(b.p, v);
        }
    }

    /// The first non-empty class at or above `(fl, sl)`.
    #[cfg_attr(not(target_os = "none"), inline(always))]
    #[cfg_attr(all(target_os = "none", not(feature = "small-code")), inline(never))]
    #[cfg_attr(all(target_os = "none", feature = "small-code"), inline)]
    fn find_class(&self, (fl, sl): Class) -> Option<Class> {
        let sl_map = self.sl_map(fl) & Self::bits_from(sl);
        if sl_map != 0 {
            // Below `SL` (a bit of the map is set); the mask lets the compiler drop the bounds
            // checks of the caller's `heads[fl][sl]`.
            return Some((fl, sl_map.trailing_zeros() as usize & (SL - 1)));
        }
        let fl_map = self.fl_bitmap & (!0u32).checked_shl(fl as u32 + 1).unwrap_or(0);
        if fl_map == 0 {
            return None;
        }
        let fl = (fl_map.trailing_zeros() as usize).min(FL - 1);
        Some((fl, self.sl_map(fl).trailing_zeros() as usize & (SL - 1)))
    }

    // ----- allocation -----

    /// Allocates a block for `layout`, or returns `None` when no free block can hold it.
    ///
    /// The block's payload is at least `layout.size()` bytes aligned to `layout.align()`.
    ///
    /// # Time complexity
    /// O(1), except when the heap is nearly exhausted for this size (see the module docs).
    #[cfg_attr(not(target_os = "none"), inline(always))]
    #[cfg_attr(all(target_os = "none", not(feature = "small-code")), inline(never))]
    #[cfg_attr(all(target_os = "none", feature = "small-code"), inline)]
    pub fn allocate(&mut self, layout: Layout) -> Option<NonNull<u8>> {
        let shift = self.store.granule_shift();
        if !Self::SMALL_CODE
            && layout.align() <= LOW_FIRST_BYTES
            && (layout.size() < LOW_FIRST_BYTES
                || (layout.size() <= FAST_PATH_MAX_BYTES && !self.placing_low()))
        {
            // The common case, kept short: good fit, the list's head. Size and alignment are
            // bounded, so the arithmetic cannot overflow; a small configuration's classes may
            // still end below `g + pad`, which the slow path then refuses.
            let g = ((layout.size() + S::OVERHEAD + (1 << shift) - 1) >> shift).max(1) as u32;
            let mut fit = g;
            if Self::QUICK && (g as usize) < SL {
                let p = self.quick[g as usize].0;
                if !p.is_null() && p.addr() & (layout.align() - 1) == 0 {
                    // SAFETY: `p` heads quick list `g`: a used block of `g` granules whose
                    // payload's first word (16-aligned, inside the payload) links the list.
                    unsafe { self.quick_pop(g, p) };
                    // SAFETY: a payload pointer is never null.
                    return Some(unsafe { NonNull::new_unchecked(p) });
                }
            } else if Self::BINS && self.bin_budget != 0 {
                let (k, size) = Self::bin_up(g);
                if k < SB {
                    if let Some(p) = self.bin_take(k, layout.align()) {
                        return Some(p);
                    }
                    // Rounded up, so that the block serves any request of its bin once freed;
                    // only while the bins take blocks (a request under 1 KiB of 65 granules
                    // comes here at any fullness).
                    if layout.size() >= LOW_FIRST_BYTES || !self.placing_low() {
                        fit = size;
                    }
                }
            }
            return self.allocate_fit(fit, g, layout.align());
        }
        self.allocate_slow(layout, 0)
    }

    /// [`allocate`](Self::allocate)'s common case past the quick lists and bins: `g` granules
    /// at `align <= LOW_FIRST_BYTES`, from the head of the good-fit class, else `exact <= g`
    /// granules (what the request needs before rounding to a size bin) as the slow path does,
    /// so that the rounding never makes a request fail. Out of line on hosts, so that a request
    /// the quick lists or bins serve saves the registers this needs.
    #[cfg_attr(not(target_os = "none"), inline(never))]
    #[cfg_attr(target_os = "none", inline)]
    fn allocate_fit(&mut self, g: u32, exact: u32, align: usize) -> Option<NonNull<u8>> {
        let shift = self.store.granule_shift();
        let pad = ((align >> shift) as u32).saturating_sub(1);
        let found = if g + pad <= Self::MAX_BLOCK_GRANULES / 2 {
            self.find_class(Self::class_at_least(g + pad))
        } else {
            None
        };
        if let Some(c) = found {
            if pad == 0 {
                // SAFETY: invariant 2: list `c` is non-empty, and every block of class `c`
                // holds `g` granules.
                return Some(unsafe { self.pop_and_take(c, g) });
            }
            let b = self.blk(self.heads[c.0][c.1]);
            // SAFETY: `b` heads list `c`, whose every block holds `g + pad` granules, enough
            // for `g` at any alignment up to `granule << pad`.
            return Some(unsafe { self.take(b, c, g, align, 0) });
        }
        if exact > Self::MAX_BLOCK_GRANULES {
            return None;
        }
        self.allocate_granules(exact, align, 0)
    }

    /// Takes `g` granules from the first block of non-empty list `c`.
    ///
    /// # Safety
    /// List `c` is non-empty and every block of class `c` holds `g` granules.
    #[cfg_attr(not(target_os = "none"), inline(always))]
    #[cfg_attr(target_os = "none", inline)]
    unsafe fn pop_and_take(&mut self, c @ (fl, sl): Class, g: u32) -> NonNull<u8> {
        let b = self.blk(self.heads[fl][sl]);
        // SAFETY: invariant 2: `b` heads the list, so it is a free block.
        let (v, next) = unsafe { (self.store.size_flags(b.p), self.store.next_free(b.p)) };
        self.heads[fl][sl] = next;
        if next == NIL {
            self.clear_bit(c);
        }
        if !Self::SMALL_CODE {
            self.free_blocks -= 1;
        }
        // SAFETY: `b` was free (so its predecessor is used), holds `g` granules, and is unlisted.
        unsafe { self.finish_allocation(b, size_of_flags(v), g, 0) }
    }

    /// Takes block `p`, the head of quick list `g`, off that list.
    ///
    /// # Safety
    /// `p` is non-null and heads quick list `g`.
    #[cfg_attr(not(target_os = "none"), inline(always))]
    #[cfg_attr(target_os = "none", inline)]
    unsafe fn quick_pop(&mut self, g: u32, p: *mut u8) {
        // SAFETY: a block on a quick list is a used block of at least one granule whose payload
        // (granule-aligned, at least a pointer long: see `MetaStore::QUICK_LISTS`) starts with
        // the list's link, written by `quick_push`.
        self.quick[g as usize].0 = unsafe { p.cast::<*mut u8>().read() };
        self.quick_granules -= g as usize;
        self.quick_blocks -= 1;
    }

    /// The first block of bin `k < SB`, taken out of the bin, if there is one and its payload
    /// is aligned to `align`.
    #[cfg_attr(not(target_os = "none"), inline(always))]
    #[cfg_attr(target_os = "none", inline)]
    fn bin_take(&mut self, k: usize, align: usize) -> Option<NonNull<u8>> {
        let p = self.bins[k].0;
        if p.is_null() || p.addr() & (align - 1) != 0 {
            return None;
        }
        // SAFETY: `p` heads bin `k`.
        unsafe { self.bin_pop(k, p) };
        // SAFETY: a payload pointer is never null.
        Some(unsafe { NonNull::new_unchecked(p) })
    }

    /// Takes block `p`, the head of bin `k < SB`, out of the bin, and returns its size.
    ///
    /// # Safety
    /// `p` is non-null and heads bin `k`.
    #[cfg_attr(not(target_os = "none"), inline(always))]
    #[cfg_attr(target_os = "none", inline)]
    unsafe fn bin_pop(&mut self, k: usize, p: *mut u8) -> u32 {
        // SAFETY: a binned block's payload (granule-aligned, at least two words long, see
        // `bin_push`) starts with the bin's link and the block's size, written by `bin_push`.
        let s = unsafe {
            self.bins[k].0 = p.cast::<*mut u8>().read();
            p.cast::<u32>().add(2).read()
        };
        self.bin_granules -= s;
        self.quick_blocks -= 1;
        s
    }

    /// Puts used block `ptr` of `s` granules into bin `k = bin_down(s) < SB`. The bin keeps
    /// `payload`, the same address with the region's provenance: the block's next owner may
    /// be given more bytes than its last owner's pointer may reach (a `Box`'s covers its
    /// layout only), while the link itself is written through that pointer, the one the
    /// aliasing model lets write into the freed block.
    ///
    /// # Safety
    /// `ptr` is the payload of a used block of `s >= SL` granules that nobody else uses any
    /// more, on no list, `payload` is `store.payload` of its handle, and `Self::BINS` holds.
    #[cfg_attr(not(target_os = "none"), inline(always))]
    #[cfg_attr(target_os = "none", inline)]
    unsafe fn bin_push(&mut self, k: usize, ptr: NonNull<u8>, payload: NonNull<u8>, s: u32) {
        // SAFETY: the payload is granule-aligned and, in band (`BINS` implies `QUICK_LISTS`),
        // `s >= 8` granules less an 8-byte header long; the block's owner has given it back.
        unsafe {
            ptr.cast::<*mut u8>().write(self.bins[k].0);
            ptr.cast::<u32>().add(2).write(s);
        }
        self.bins[k].0 = payload.as_ptr();
        self.bin_granules += s;
        self.quick_blocks += 1;
    }

    /// Debug checks of a free of used block `ptr` of `s` granules, whose layout needs `size`:
    /// invariant 7 (the layout is the allocation's, or a smaller one of at least `SL` granules
    /// once sizes may be loose), and that the block is on no quick list or bin (where it is
    /// still "used" in its header, so only the list tells a double free).
    #[cfg(debug_assertions)]
    fn debug_check_free(&self, ptr: NonNull<u8>, size: u32, s: u32) {
        debug_assert!(
            size == s || (self.loose_sizes && size as usize >= SL && size < s),
            "layout differs from the allocation's"
        );
        if Self::QUICK && (s as usize) < SL {
            debug_assert!(!Self::on_list(self.quick[s as usize].0, ptr), "double free");
        }
        if Self::BINS && s as usize >= SL {
            let k = Self::bin_down(s);
            debug_assert!(
                k >= SB || !Self::on_list(self.bins[k].0, ptr),
                "double free"
            );
        }
    }

    /// Whether `ptr`'s block is on the quick list or bin that starts at `head` (for debug
    /// assertions: it walks the list, comparing addresses).
    #[cfg(debug_assertions)]
    fn on_list(mut head: *mut u8, ptr: NonNull<u8>) -> bool {
        while !head.is_null() {
            if head.addr() == ptr.addr().get() {
                return true;
            }
            // SAFETY: a listed block's payload starts with the list's link (see `quick_push`
            // and `bin_push`).
            head = unsafe { head.cast::<*mut u8>().read() };
        }
        false
    }

    /// Puts used block `ptr` of `g < SL` granules on quick list `g`.
    ///
    /// # Safety
    /// `ptr` is the payload of a used block of `g` granules that nobody else uses any more,
    /// and `S::QUICK_LISTS` holds.
    #[cfg_attr(not(target_os = "none"), inline(always))]
    #[cfg_attr(target_os = "none", inline)]
    unsafe fn quick_push(&mut self, g: u32, ptr: NonNull<u8>) {
        // SAFETY: the payload is granule-aligned and at least a pointer long
        // (`MetaStore::QUICK_LISTS`), and the block's owner has given it back.
        unsafe { ptr.cast::<*mut u8>().write(self.quick[g as usize].0) };
        self.quick[g as usize].0 = ptr.as_ptr();
        self.quick_granules += g as usize;
        self.quick_blocks += 1;
    }

    /// Returns every block on the quick lists and in the size bins to the free lists
    /// (merging it with its free neighbours), so that the whole heap is available to any
    /// request (except the spare granules that reallocation let a live block keep, see
    /// [`reallocate`](Self::reallocate)). Allocation does this by itself before it reports that no block fits, so this is
    /// only needed for a heap whose [`stats`](Self::stats) should count those blocks as free
    /// blocks.
    ///
    /// # Time complexity
    /// O(blocks on the lists), which hold at most `1 / QUICK_SHARE` of the heap in blocks under
    /// `SL` granules, and the [`set_size_bins`](Self::set_size_bins) share in blocks of
    /// `SL` granules or more.
    pub fn trim(&mut self) {
        if !Self::QUICK {
            return;
        }
        for g in 1..SL {
            while let Some(ptr) = NonNull::new(self.quick[g].0) {
                // SAFETY: `ptr` heads quick list `g`, a used block of `g` granules that nobody
                // uses: taken off the list, it is freed as `deallocate` would.
                unsafe {
                    self.quick_pop(g as u32, ptr.as_ptr());
                    self.release_used(ptr, g as u32);
                }
            }
        }
        self.trim_bins();
    }

    /// The part of [`trim`](Self::trim) that empties the size bins.
    fn trim_bins(&mut self) {
        for k in 0..SB {
            while let Some(ptr) = NonNull::new(self.bins[k].0) {
                // SAFETY: `ptr` heads bin `k`, a used block of the size it holds that nobody
                // uses: taken out of the bin, it is freed as `deallocate` would.
                unsafe {
                    let s = self.bin_pop(k, ptr.as_ptr());
                    self.release_used(ptr, s);
                }
            }
        }
    }

    /// [`exhaustive_candidate`](Self::exhaustive_candidate), and if that finds nothing while
    /// the quick lists hold blocks, the same after [`trim`](Self::trim).
    #[cold]
    fn last_resort(&mut self, g: u32, align: usize, delta: usize) -> Option<(Blk<S::Ptr>, Class)> {
        match self.exhaustive_candidate(g, align, delta) {
            None if self.quick_blocks != 0 => {
                self.trim();
                self.exhaustive_candidate(g, align, delta)
            }
            found => found,
        }
    }

    /// [`allocate`](Self::allocate) for large or over-aligned requests, and for when no class
    /// guarantees a fit; the payload is aligned as seen at `payload_addr + delta` (see
    /// [`front_pad`](Self::front_pad)).
    #[cfg_attr(not(feature = "small-code"), inline(never))]
    fn allocate_slow(&mut self, layout: Layout, delta: usize) -> Option<NonNull<u8>> {
        let g = self.granules_for(layout.size())?;
        if Self::BINS && g as usize >= SL && delta == 0 {
            if self.placing_low() {
                if self.bin_granules != 0 {
                    // The heap has filled up since the bins took these blocks: merged back
                    // before the low-address steps place anything, they are where those steps
                    // look (held whole through the compact regime, they cost the large-block
                    // stream a tenth more region). A block is merged back once per binning.
                    self.trim_bins();
                }
            } else if self.bin_budget != 0 {
                // Over-aligned or over 1 MiB, so not on the fast path: as there, a binned block,
                // else one rounded up to its bin if a class guarantees it, else the exact size.
                let (k, size) = Self::bin_up(g);
                if k < SB {
                    if let Some(p) = self.bin_take(k, layout.align()) {
                        return Some(p);
                    }
                    if let Some((b, c)) = self.candidate(size, layout.align(), 0) {
                        // SAFETY: `b` is a free block of class `c` that holds `size` granules
                        // at the alignment.
                        return Some(unsafe { self.take(b, c, size, layout.align(), 0) });
                    }
                }
            }
        }
        self.allocate_granules(g, layout.align(), delta)
    }

    /// [`allocate_slow`](Self::allocate_slow) for a request of `g` granules at `align`.
    #[cfg_attr(not(target_os = "none"), inline(always))]
    #[cfg_attr(target_os = "none", inline)]
    fn allocate_granules(&mut self, g: u32, align: usize, delta: usize) -> Option<NonNull<u8>> {
        let (b, c) = match self.candidate(g, align, delta) {
            Some(found) => found,
            // Small code gives up the exhaustive search (see the crate docs, "Code size").
            None if Self::SMALL_CODE => return None,
            None => self.last_resort(g, align, delta)?,
        };
        // SAFETY: `b` is a free block of class `c` that holds `g` granules at `align` (as seen
        // with `delta`).
        Some(unsafe { self.take(b, c, g, align, delta) })
    }

    /// Granules of padding an allocation at `align` may need in front of its payload, or
    /// `None` if no block of this heap could hold that much (the heap cannot honour `align`).
    #[cfg_attr(not(target_os = "none"), inline(always))]
    #[cfg_attr(target_os = "none", inline)]
    fn max_front_pad(&self, align: usize) -> Option<u32> {
        let shift = self.store.granule_shift();
        if align <= 1 << shift {
            return Some(0);
        }
        // `align` is a power of two above the granule, so `align >> shift` is at least 2.
        u32::try_from((align >> shift) - 1)
            .ok()
            .filter(|&pad| pad <= Self::MAX_BLOCK_GRANULES / 2)
    }

    /// Picks, without unlinking it, the free block an allocation of `g` granules at `align`
    /// would use, and its class, in O(1):
    ///
    /// 1. first fit among the first [`SCAN_LIMIT`] blocks of `g`'s own class, whose members may
    ///    or may not fit (a bounded step towards best fit);
    /// 2. else a block of the smallest non-empty class whose every member fits (good fit); for
    ///    requests of at least [`LOW_FIRST_BYTES`], the lowest-addressed of its first
    ///    [`LOW_FIRST`] blocks, else its head.
    ///
    /// Both steps, and the list order kept by [`make_free`](Self::make_free), lean towards low
    /// addresses, which keeps the high-water mark of the region, and with it the memory a
    /// workload needs, low. `None` means only
    /// [`exhaustive_candidate`](Self::exhaustive_candidate) can still find a block.
    #[cfg_attr(not(target_os = "none"), inline(always))]
    #[cfg_attr(all(target_os = "none", not(feature = "small-code")), inline(never))]
    #[cfg_attr(all(target_os = "none", feature = "small-code"), inline)]
    fn candidate(&self, g: u32, align: usize, delta: usize) -> Option<(Blk<S::Ptr>, Class)> {
        let shift = self.store.granule_shift();
        let pad = self.max_front_pad(align)?;
        // Past half the largest block, rounding up to a class boundary could leave the classes;
        // such requests go to `exhaustive_candidate`, which is bounded there too: a region holds
        // at most one block of more than half the largest block.
        let search = g
            .checked_add(pad)
            .filter(|&s| s <= Self::MAX_BLOCK_GRANULES / 2)?;
        let good = Self::class_at_least(search);
        let big = ((g as usize) << shift) >= LOW_FIRST_BYTES && self.placing_low();
        if big {
            let own = Self::class_of(g);
            if own != good && self.has(own) {
                if let Some(b) = self.first_fit_in(own, g, align, delta, SCAN_LIMIT) {
                    return Some((b, own));
                }
            }
        }
        let c @ (fl, sl) = self.find_class(good)?;
        let head = self.blk(self.heads[fl][sl]);
        if !big {
            return Some((head, c));
        }
        let (mut best, mut id, mut n) = (head.id, head.id, 0);
        while id != NIL && n < LOW_FIRST {
            best = best.min(id);
            // SAFETY: `id` is in a free list, so it is a free block.
            id = unsafe { self.store.next_free(self.store.locate(id)) };
            n += 1;
        }
        Some((self.blk(best), c))
    }

    /// The first of the first `limit` blocks of non-empty list `c` that holds `g` granules at
    /// `align` (as seen with `delta`).
    #[cfg_attr(not(target_os = "none"), inline(always))]
    #[cfg_attr(target_os = "none", inline(never))]
    fn first_fit_in(
        &self,
        c: Class,
        g: u32,
        align: usize,
        delta: usize,
        limit: u32,
    ) -> Option<Blk<S::Ptr>> {
        let (mut id, mut n) = (self.heads[c.0][c.1], 0);
        while id != NIL && n < limit {
            let b = self.blk(id);
            // SAFETY: `b` is in a free list, so it is a free block.
            let size = size_of_flags(unsafe { self.store.size_flags(b.p) });
            if size >= g && (size - g) as usize >= self.front_pad(b, align, delta) {
                return Some(b);
            }
            // SAFETY: as above.
            id = unsafe { self.store.next_free(b.p) };
            n += 1;
        }
        None
    }

    /// The slow path, for when [`candidate`](Self::candidate) finds nothing: scans every list
    /// that may hold a block of `g` granules at `align`, so that allocation never fails while a
    /// fitting block exists. Its cost is bounded by the free blocks of those classes, and it runs
    /// only when the heap is nearly exhausted for this size.
    #[cold]
    fn exhaustive_candidate(
        &self,
        g: u32,
        align: usize,
        delta: usize,
    ) -> Option<(Blk<S::Ptr>, Class)> {
        self.max_front_pad(align)?;
        let mut from = Self::class_of(g);
        while let Some(c @ (fl, sl)) = self.find_class(from) {
            if let Some(b) = self.first_fit_in(c, g, align, delta, u32::MAX) {
                return Some((b, c));
            }
            if sl + 1 < SL {
                from = (fl, sl + 1);
            } else if fl + 1 < FL {
                from = (fl + 1, 0);
            } else {
                break;
            }
        }
        None
    }

    /// Granules from block `b`'s payload to the first payload position aligned to `align`,
    /// where a payload at `payload_addr` is seen at address `payload_addr + delta` (wrapping):
    /// 0 for the heap's own addresses, or the distance to another mapping of the same region.
    ///
    /// Computed as the distance to the next multiple of `align` modulo `align`, so nothing can
    /// overflow whatever the address and the alignment (a power of two); the result is below
    /// `align >> granule_shift`, which [`max_front_pad`](Self::max_front_pad) bounds before any
    /// block is looked at.
    #[cfg_attr(not(target_os = "none"), inline(always))]
    #[cfg_attr(target_os = "none", inline)]
    fn front_pad(&self, b: Blk<S::Ptr>, align: usize, delta: usize) -> usize {
        if align <= self.granule() {
            return 0;
        }
        let seen = self.store.payload_addr(b.p).wrapping_add(delta);
        (seen.wrapping_neg() & (align - 1)) >> self.store.granule_shift()
    }

    /// Allocates `g` granules at `align` (as seen with `delta`, see
    /// [`front_pad`](Self::front_pad)) from free block `b` of class `c`: unlinks it, frees the
    /// granules in front of the aligned position and those past `g`, and returns the payload.
    ///
    /// # Safety
    /// `b` is a free block in the list of class `c`, of at least
    /// `front_pad(b, align, delta) + g` granules.
    #[cfg_attr(not(target_os = "none"), inline(always))]
    #[cfg_attr(target_os = "none", inline)]
    unsafe fn take(
        &mut self,
        b: Blk<S::Ptr>,
        c: Class,
        g: u32,
        align: usize,
        delta: usize,
    ) -> NonNull<u8> {
        // The caller guarantees the block holds `front + g` granules, so `front` fits in u32.
        let front = self.front_pad(b, align, delta) as u32;
        // SAFETY: forwarded; `front` is the padding that aligns `b`'s payload.
        unsafe { self.take_after(b, c, front, g) }
    }

    /// Allocates `g` granules starting `front` granules into free block `b` of class `c`:
    /// unlinks it, frees the `front` granules before and those past `front + g`, and returns
    /// the payload.
    ///
    /// # Safety
    /// `b` is a free block in the list of class `c`, of at least `front + g` granules.
    #[cfg_attr(not(target_os = "none"), inline(always))]
    #[cfg_attr(all(target_os = "none", not(feature = "small-code")), inline(never))]
    #[cfg_attr(all(target_os = "none", feature = "small-code"), inline)]
    unsafe fn take_after(&mut self, b: Blk<S::Ptr>, c: Class, front: u32, g: u32) -> NonNull<u8> {
        // SAFETY: `b` is a free block start, so its flags hold its size.
        let size = size_of_flags(unsafe { self.store.size_flags(b.p) });
        // SAFETY: `b` is a free block in the list of class `c`.
        unsafe {
            if Self::SMALL_CODE {
                // One call site of `unlink` in all: its copy in `unlink_sized`.
                self.unlink_sized(b, size);
            } else {
                self.unlink(b, c);
            }
        }
        if front == 0 {
            // SAFETY: `b` was free (so its predecessor is used), holds `g`, and is unlisted.
            return unsafe { self.finish_allocation(b, size, g, 0) };
        }
        // SAFETY: the caller guarantees `size >= front + g`. The first `front` granules become a
        // free block (predecessor used), the rest is allocated with `PREV_FREE` set.
        unsafe {
            let rest = self.after(b, front);
            self.make_free(b, front);
            self.store.set_prev_size(rest.p, front);
            let end = self.after(b, size);
            self.store.set_prev_size(end.p, size - front);
            self.finish_allocation(rest, size - front, g, PREV_FREE)
        }
    }

    /// Carves `g` granules from unlisted, formerly free block `b` of `size >= g` granules, frees
    /// the rest, marks the block used (with `prev_free` as its `PREV_FREE` bit) and returns its
    /// payload.
    ///
    /// # Safety
    /// `b` is a block start of `size >= g` granules in no list; its successor is not free and
    /// has `PREV_FREE` set.
    #[cfg_attr(not(target_os = "none"), inline(always))]
    #[cfg_attr(all(target_os = "none", not(feature = "small-code")), inline(never))]
    #[cfg_attr(all(target_os = "none", feature = "small-code"), inline)]
    unsafe fn finish_allocation(
        &mut self,
        b: Blk<S::Ptr>,
        size: u32,
        g: u32,
        prev_free: u32,
    ) -> NonNull<u8> {
        // SAFETY: the caller's contract.
        unsafe { self.carve(b, size, g, prev_free) };
        self.used_granules += g as usize;
        self.live += 1;
        // SAFETY: `b` is a valid block.
        unsafe { self.store.payload(b.p) }
    }

    /// Makes block `b`, which spans `total` granules, a used block of `g <= total` granules
    /// with `prev_free` as its `PREV_FREE` bit, and the granules past `g` a free block.
    ///
    /// # Safety
    /// `b` is a block start spanning `total` granules, in no list; the block after them is not
    /// free and has `PREV_FREE` set; `prev_free` tells truly whether `b`'s predecessor is free.
    #[cfg_attr(not(target_os = "none"), inline(always))]
    #[cfg_attr(target_os = "none", inline(never))]
    unsafe fn carve(&mut self, b: Blk<S::Ptr>, total: u32, g: u32, prev_free: u32) {
        let end = self.after(b, total);
        // SAFETY: 1. `b` is a block start; 2. `b + g` is inside the span when `total > g`; 3.
        // `end` is the next block or the sentinel.
        unsafe {
            if total > g {
                let rest = self.after(b, g);
                self.store.set_prev_size(rest.p, g);
                self.make_free(rest, total - g);
                // `end` keeps `PREV_FREE`: its predecessor is still free.
                self.store.set_prev_size(end.p, total - g);
                if Self::SMALL_CODE {
                    // Unless `resize_in_place` carves a used block followed by a used one.
                    self.set_prev_free_bit(end, true);
                }
            } else {
                self.store.set_prev_size(end.p, total);
                self.set_prev_free_bit(end, false);
            }
            self.store
                .set_size_flags(b.p, (g << SIZE_SHIFT) | prev_free);
        }
    }

    // ----- deallocation -----

    /// Resolves `ptr` to the used block it starts and its flags, as the `# Safety` contract of
    /// the public entry points guarantees.
    #[cfg_attr(not(target_os = "none"), inline(always))]
    #[cfg_attr(target_os = "none", inline)]
    unsafe fn used_block(&self, ptr: NonNull<u8>) -> (Blk<S::Ptr>, u32) {
        debug_assert!(
            self.store.block_of(ptr).is_some(),
            "pointer not from this heap"
        );
        // SAFETY: the caller passes a pointer this heap returned and did not free, so it lies in a
        // region, on a granule boundary.
        let (id, p) = unsafe { self.store.block_of_unchecked(ptr) };
        // SAFETY: `p` is a used block start.
        let v = unsafe { self.store.size_flags(p) };
        debug_assert!(
            v & FREE == 0 && size_of_flags(v) > 0,
            "double free or foreign pointer"
        );
        (Blk { id, p }, v)
    }

    /// Returns block `b` of `size` granules, out of every list, to the free lists, merging it with
    /// free neighbours. `prev_free` is its `PREV_FREE` bit; `links` is the handle through which
    /// `b`'s own links are written if it stays a block start.
    ///
    /// # Safety
    /// `b` is a block start of `size` granules in no list and not counted as used,
    /// `prev_free` tells truly whether its predecessor is free, and `links` is `b.p` or
    /// `owner_handle(b.p, _)` for `b`'s owner.
    #[cfg_attr(not(target_os = "none"), inline(always))]
    #[cfg_attr(all(target_os = "none", not(feature = "small-code")), inline(never))]
    #[cfg_attr(all(target_os = "none", feature = "small-code"), inline)]
    unsafe fn release(&mut self, mut b: Blk<S::Ptr>, mut size: u32, prev_free: u32, links: S::Ptr) {
        let mut links = links;
        // SAFETY: 1. `b + size` is the next block or the sentinel (never free); 2. when
        // `PREV_FREE` is set, `b - prev_size` is the free previous block; 3. free blocks are in
        // the lists of their classes, so unlinking them is sound.
        unsafe {
            let next = self.after(b, size);
            let nv = self.store.size_flags(next.p);
            if nv & FREE != 0 {
                let ns = size_of_flags(nv);
                self.unlink_sized(next, ns);
                self.store.retire(next.p);
                size += ns;
                // The block after `next` has its `PREV_FREE` bit set already (`next` was free).
            } else {
                // `next` stays, after the free block this becomes: its bit is set now, from the
                // flags just read (reading them again at the end would be another cache miss
                // on large blocks).
                self.store.set_size_flags(next.p, nv | PREV_FREE);
            }
            if prev_free != 0 {
                let ps = self.store.prev_size(b.p);
                let prev = self.before(b, ps);
                self.unlink_sized(prev, ps);
                self.store.retire(b.p);
                b = prev;
                links = prev.p;
                size += ps;
            }
            self.make_free_via(b, size, links);
            let end = self.after(b, size);
            self.store.set_prev_size(end.p, size);
        }
    }

    /// Frees the block at `ptr`.
    ///
    /// # Safety
    /// `ptr` was returned by this heap's `allocate` or `reallocate` and not freed since, and
    /// `layout` has the size it was allocated or last reallocated with (its alignment is not
    /// used).
    ///
    /// # Time complexity
    /// O(1).
    #[cfg_attr(not(target_os = "none"), inline(always))]
    #[cfg_attr(target_os = "none", inline(never))]
    pub unsafe fn deallocate(&mut self, ptr: NonNull<u8>, layout: Layout) {
        // A used block under `SL` granules has exactly the granules its layout needs
        // (invariant 7), so the quick lists take the size from the layout without reading the
        // header.
        let size = self.granules_for(layout.size()).unwrap_or(0);
        if Self::BINS && (size as usize) >= SL && self.bin_budget != 0 && !self.placing_low() {
            // The block may be larger than the layout says (rounded up to its bin, or taken
            // from a list): its header tells.
            // SAFETY: the caller's contract.
            let (b, v) = unsafe { self.used_block(ptr) };
            let s = size_of_flags(v);
            let k = Self::bin_down(s);
            if k < SB && self.bin_granules + s <= self.bin_budget {
                #[cfg(debug_assertions)]
                self.debug_check_free(ptr, size, s);
                // SAFETY: the caller gives back `ptr`, a used block of `s` granules, whose
                // handle is `b.p`.
                unsafe { self.bin_push(k, ptr, self.store.payload(b.p), s) };
                return;
            }
        } else if Self::QUICK
            && (size as usize) < SL
            && !self.placing_low()
            && self.quick_granules + size as usize <= self.quick_budget
        {
            #[cfg(debug_assertions)]
            {
                // SAFETY: the caller's contract.
                let (_, v) = unsafe { self.used_block(ptr) };
                self.debug_check_free(ptr, size, size_of_flags(v));
            }
            // SAFETY: the caller gives back `ptr`, a used block of `size` granules.
            unsafe { self.quick_push(size, ptr) };
            return;
        }
        // SAFETY: the caller's contract.
        unsafe { self.release_out_of_line(ptr, size) };
    }

    /// [`release_used`](Self::release_used), out of line on hosts, so that a free the quick
    /// lists take saves the registers this needs.
    ///
    /// # Safety
    /// As for `release_used`.
    #[cfg_attr(not(target_os = "none"), inline(never))]
    #[cfg_attr(target_os = "none", inline)]
    unsafe fn release_out_of_line(&mut self, ptr: NonNull<u8>, size: u32) {
        // SAFETY: forwarded.
        unsafe { self.release_used(ptr, size) }
    }

    /// Frees used block `ptr` into the free lists. `size` is what its layout needs, for a debug
    /// check: the size freed is the header's.
    ///
    /// # Safety
    /// `ptr` is the payload of a used block of at least `size` granules, on no list, that
    /// nobody uses any more.
    #[cfg_attr(not(target_os = "none"), inline(always))]
    #[cfg_attr(target_os = "none", inline)]
    unsafe fn release_used(&mut self, ptr: NonNull<u8>, size: u32) {
        // SAFETY: the caller's contract.
        let (b, v) = unsafe { self.used_block(ptr) };
        // The header's size: a block may be larger than its layout (see `set_size_bins`).
        #[cfg(debug_assertions)]
        self.debug_check_free(ptr, size, size_of_flags(v));
        // Only the debug checks read the layout's size.
        #[cfg(not(debug_assertions))]
        let _ = size;
        let size = size_of_flags(v);
        self.used_granules -= size as usize;
        self.live -= 1;
        let links = self.store.owner_handle(b.p, ptr);
        // SAFETY: `b` is a used block: in no list, no longer counted as used; `v` holds its
        // flags; `links` comes from its owner's pointer.
        unsafe { self.release(b, size, v & PREV_FREE, links) };
    }

    // ----- reallocation -----

    /// Resizes the block at `ptr` to `new_size` bytes, keeping `layout.align()`. On failure
    /// returns `None` and leaves the block as it was.
    ///
    /// While the heap is at least [`set_compact_above`](Self::set_compact_above) % full, the
    /// policy keeps the region compact rather than always resizing in place, since blocks that
    /// only ever grow in place spread over two to three times the memory they hold on a
    /// realloc-heavy workload:
    /// - if the block that `allocate` would pick for the new size lies at a lower address, the
    ///   block moves there (shrinking or growing), unless that means copying more than
    ///   [`MOVE_DOWN_MAX_BYTES`];
    /// - else a shrinking block shrinks in place, and a growing one grows into a free successor
    ///   when that has room;
    /// - else it moves wherever `allocate` finds room.
    ///
    /// Below that, the block is resized in place when it can be, and otherwise moves to the
    /// start of a free block of [`GROW_ROOM`] times the new size if there is one (so that it
    /// can grow again in place), else wherever `allocate` finds room. A block of `SL` granules
    /// or more (1 KiB in [`Heap`](crate::Heap), 256 bytes in [`SmallHeap`](crate::SmallHeap))
    /// that shrinks to at least half its size keeps its size there (nothing is split off, so
    /// the next growth up to it is free): on the benchmark's realloc stream this and
    /// [`GROW_ROOM`] took a tenth to a sixth off the time per reallocation. While the heap is
    /// compacting, every shrink splits the spare granules off.
    ///
    /// Spare granules a block keeps serve no other request, and [`trim`](Self::trim) does not
    /// return them, until the block is resized while the heap is compacting, or freed. The
    /// threshold bounds them, since they arise only below it: a 1 MiB heap whose 2 KiB blocks
    /// were shrunk to 1 KiB, then filled with 1 KiB requests until one failed, held 87 % of its
    /// bytes in payloads at the default threshold (25), 69 % at 60, 50 % at 100.
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
        // A block resized in place is returned through the heap's own pointer to it, as
        // `allocate` returns it, not through `ptr`: the caller's pointer may reach only the
        // old layout's bytes (Stacked Borrows, a slice's pointer), and the block may now be
        // larger. `payload` is valid for `b`, a used block, in every branch below.
        if Self::SMALL_CODE {
            // In place when it can, else wherever `allocate` finds room.
            // SAFETY: `b` is the used block behind `ptr`, `v` its flags.
            if unsafe { self.resize_in_place(b, v, g, false) } {
                // SAFETY: `b` is a valid (used) block.
                return Some(unsafe { self.store.payload(b.p) });
            }
            let new = self.allocate_granules(g, layout.align(), 0)?;
            // SAFETY: `ptr` holds at least `layout.size()` bytes, `new` at least `new_size`;
            // they are distinct live blocks, so they do not overlap. Then `ptr` is freed once.
            unsafe {
                core::ptr::copy_nonoverlapping(
                    ptr.as_ptr(),
                    new.as_ptr(),
                    layout.size().min(new_size),
                );
                self.deallocate(ptr, layout);
            }
            return Some(new);
        }
        let compacting = self.compacting();
        if !compacting
            // SAFETY: `b` is the used block behind `ptr`, `v` its flags.
            && unsafe { self.resize_in_place(b, v, g, true) }
        {
            // SAFETY: `b` is a valid (used) block.
            return Some(unsafe { self.store.payload(b.p) });
        }
        let size = size_of_flags(v);
        let align = layout.align();
        let found = if g > size && !compacting {
            // A block that grew once is likely to grow again: put it where it can, at the
            // start of a free block `GROW_ROOM` times its size, whose rest stays free after it.
            self.candidate(g.saturating_mul(GROW_ROOM), align, 0)
                .or_else(|| self.candidate(g, align, 0))
        } else {
            self.candidate(g, align, 0)
        };
        let copy_bytes = (size.min(g) as usize) << self.store.granule_shift();
        if compacting {
            if let Some((c, class)) =
                found.filter(|(c, _)| c.id < b.id && copy_bytes <= MOVE_DOWN_MAX_BYTES)
            {
                // SAFETY: `c` is a free block of class `class` holding `g` granules at `align`;
                // `ptr` is live.
                return Some(unsafe { self.move_to(c, class, g, ptr, layout, new_size) });
            }
            // SAFETY: `b` is the used block behind `ptr`, `v` its flags.
            if unsafe { self.resize_in_place(b, v, g, false) } {
                // SAFETY: `b` is a valid (used) block.
                return Some(unsafe { self.store.payload(b.p) });
            }
        }
        let (c, class) = match found {
            Some(found) => found,
            None => {
                if self.quick_blocks != 0 {
                    // Blocks on the quick lists may be what stops the block from growing in
                    // place, or from moving.
                    self.trim();
                    // SAFETY: `b` is still the used block behind `ptr`; its flags are read
                    // again, since trimming may have freed its predecessor.
                    if unsafe {
                        self.resize_in_place(b, self.store.size_flags(b.p), g, !compacting)
                    } {
                        // SAFETY: `b` is a valid (used) block.
                        return Some(unsafe { self.store.payload(b.p) });
                    }
                }
                self.exhaustive_candidate(g, align, 0)?
            }
        };
        // SAFETY: `c` is a free block of class `class` holding `g` granules at `align`; `ptr` is
        // live.
        Some(unsafe { self.move_to(c, class, g, ptr, layout, new_size) })
    }

    /// Resizes used block `b` (flags `v`) to `g` granules without moving it: shrinks it (the
    /// tail is freed), or grows it into a free successor with room. Returns whether it did.
    /// With `keep_slack`, in a heap with quick lists, a block that shrinks to `g >= SL`
    /// granules, at least half its size, keeps its size (see [`reallocate`](Self::reallocate)).
    ///
    /// # Safety
    /// `b` is a used block and `v` its current `size_flags`.
    unsafe fn resize_in_place(&mut self, b: Blk<S::Ptr>, v: u32, g: u32, keep_slack: bool) -> bool {
        let (size, pf) = (size_of_flags(v), v & PREV_FREE);
        if Self::SMALL_CODE {
            // One path for both directions: the block and a free successor form a span, which
            // `carve` splits into the block and a free rest.
            let next = self.after(b, size);
            // SAFETY: `next` is the next block or the sentinel.
            let nv = unsafe { self.store.size_flags(next.p) };
            let ns = if nv & FREE != 0 { size_of_flags(nv) } else { 0 };
            if size + ns < g {
                return false;
            }
            // SAFETY: `next`, if free, is a free block of `ns` granules, merged into the span;
            // the span's successor is then not free (no two free blocks are adjacent), and
            // `b`'s own predecessor state is `pf`. `carve` in this configuration sets the
            // successor's `PREV_FREE` bit whichever it was.
            unsafe {
                if ns != 0 {
                    self.unlink_sized(next, ns);
                    self.store.retire(next.p);
                }
                self.carve(b, size + ns, g, pf);
            }
            self.used_granules = self.used_granules + g as usize - size as usize;
            return true;
        }
        if g <= size {
            if g < size && Self::QUICK && keep_slack && g as usize >= SL && size - g <= g {
                // Invariant 7 allows a used block of `SL` granules or more to be larger than
                // its layout; the debug checks of a free must allow it from now on.
                self.loose_sizes = true;
            } else if g < size {
                let tail = self.after(b, g);
                // SAFETY: `b` is a used block of `size > g` granules; the tail becomes its own
                // block (predecessor used), no longer counted as used, and is released, merging
                // with a free successor.
                unsafe {
                    self.store.set_size_flags(b.p, (g << SIZE_SHIFT) | pf);
                    self.store.set_prev_size(tail.p, g);
                    self.used_granules -= (size - g) as usize;
                    self.release(tail, size - g, 0, tail.p);
                }
            }
            return true;
        }
        let next = self.after(b, size);
        // SAFETY: `next` is the next block or the sentinel.
        let nv = unsafe { self.store.size_flags(next.p) };
        if nv & FREE != 0 && size + size_of_flags(nv) >= g {
            let ns = size_of_flags(nv);
            // SAFETY: `next` is a free block of `ns` granules; merged into `b`, the span's
            // successor has `PREV_FREE` set, and `b`'s own predecessor state is `pf`.
            unsafe {
                self.unlink_sized(next, ns);
                self.store.retire(next.p);
                self.carve(b, size + ns, g, pf);
            }
            self.used_granules += (g - size) as usize;
            return true;
        }
        false
    }

    /// Moves live block `ptr` (allocated with `layout`) into free block `c` of class `class` as
    /// a block of `g` granules, copying `min(layout.size(), new_size)` bytes, and frees the old
    /// block.
    ///
    /// # Safety
    /// `c` is a free block of class `class` holding `g` granules at `layout.align()`, `g`
    /// granules hold `new_size` bytes, and `ptr` is a live block of this heap allocated with
    /// `layout`.
    unsafe fn move_to(
        &mut self,
        c: Blk<S::Ptr>,
        class: Class,
        g: u32,
        ptr: NonNull<u8>,
        layout: Layout,
        new_size: usize,
    ) -> NonNull<u8> {
        // SAFETY: the caller's contract for `c`.
        let new = unsafe { self.take(c, class, g, layout.align(), 0) };

        // The old block goes to the free lists, not to a quick list or bin: merged, it may be
        // where a neighbour grows in place next (reallocation-heavy workloads ran 10 % slower
        // with it held whole).
        let old = self.granules_for(layout.size()).unwrap_or(0);
        // SAFETY: `ptr` holds at least `layout.size()` bytes, `new` at least `new_size`; they
        // are distinct live blocks, so they do not overlap. Then `ptr`, a used block of at least
        // `old` granules (invariant 7) on no list, is freed once.
        unsafe {
            core::ptr::copy_nonoverlapping(ptr.as_ptr(), new.as_ptr(), layout.size().min(new_size));
            self.release_used(ptr, old);
        }
        new
    }

    // ----- introspection -----

    /// Bytes not in use: in free blocks, on the quick lists and in the size bins, in constant
    /// time ([`stats`](Self::stats) also finds the largest free block, which walks one free
    /// list).
    pub fn free_bytes(&self) -> usize {
        (self.total_granules - self.used_granules
            + self.quick_granules
            + self.bin_granules as usize)
            << self.store.granule_shift()
    }

    /// Counters of the heap, in bytes and blocks. O(1) except `largest_free_bytes`, which walks
    /// the list of the largest non-empty class.
    pub fn stats(&self) -> Stats {
        let gs = self.store.granule_shift();
        let mut largest = 0u32;
        if self.fl_bitmap != 0 {
            let fl = msb(self.fl_bitmap) as usize;
            let sl = (SlMap::BITS - 1 - self.sl_bitmap[fl].leading_zeros()) as usize;
            if Self::SMALL_CODE {
                // Allocation takes the good-fit class only (no exhaustive search), so the
                // largest request that succeeds is the smallest size of the highest non-empty
                // class, and at most half the largest block (see `candidate`).
                let low = if fl == 0 { sl } else { (SL + sl) << (fl - 1) };
                largest = (low as u32).min(Self::MAX_BLOCK_GRANULES / 2);
            } else {
                let mut id = self.heads[fl][sl];
                while id != NIL {
                    let p = self.store.locate(id);
                    // SAFETY: `id` is in a free list, so it is a free block.
                    let (v, next) = unsafe { (self.store.size_flags(p), self.store.next_free(p)) };
                    largest = largest.max(size_of_flags(v));
                    id = next;
                }
            }
        }
        let free_blocks = if Self::SMALL_CODE {
            // Not counted as blocks come and go: the free lists are walked.
            let mut n = 0;
            for fl in 0..FL {
                for sl in 0..SL {
                    if self.has((fl, sl)) {
                        let mut id = self.heads[fl][sl];
                        while id != NIL {
                            n += 1;
                            // SAFETY: `id` is in a free list, so it is a free block.
                            id = unsafe { self.store.next_free(self.store.locate(id)) };
                        }
                    }
                }
            }
            n
        } else {
            self.free_blocks
        };
        let used = self.used_granules - self.quick_granules - self.bin_granules as usize;
        Stats {
            region_bytes: self.total_granules << gs,
            used_bytes: used << gs,
            free_bytes: (self.total_granules - used) << gs,
            // One allocation takes at most `MAX_BLOCK_GRANULES` granules (see `granules_for`).
            largest_free_bytes: ((largest.min(Self::MAX_BLOCK_GRANULES) as usize) << gs)
                .saturating_sub(S::OVERHEAD),
            live_blocks: self.live - self.quick_blocks,
            free_blocks,
            quick_list_bytes: (self.quick_granules + self.bin_granules as usize) << gs,
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
            let (mut id, mut prev_size, mut prev_free) = (first, 0u32, false);
            while id < end {
                let p = self.store.locate(id);
                // SAFETY: `id` is a block start: the first one, or the successor of one checked.
                let (v, ps) = unsafe { (self.store.size_flags(p), self.store.prev_size(p)) };
                let size = size_of_flags(v);
                if size == 0 || size > end - id {
                    return fail("block size zero or past the region's end", id);
                }
                if ps != prev_size {
                    return fail("prev_size differs from the previous block's size", id);
                }
                if (v & PREV_FREE != 0) != prev_free {
                    return fail("PREV_FREE bit differs from the previous block's state", id);
                }
                // SAFETY: `p` is a block start of `size` granules inside the region (the walk
                // checked `size <= end - id`).
                if !unsafe { self.store.interior_clear(p, size) } {
                    return fail("metadata inside a block is not clear", id);
                }
                let is_free = v & FREE != 0;
                if is_free {
                    if prev_free {
                        return fail("two adjacent free blocks", id);
                    }
                    free += size as usize;
                    free_blocks += 1;
                    self.check_links(id, size)?;
                } else {
                    used += size as usize;
                    live += 1;
                }
                (prev_size, prev_free) = (size, is_free);
                id += size;
            }
            let p = self.store.locate(end);
            // SAFETY: `end` is the region's sentinel.
            let (v, ps) = unsafe { (self.store.size_flags(p), self.store.prev_size(p)) };
            let want = if prev_free { PREV_FREE } else { 0 };
            if id != end || v != want || ps != prev_size {
                return fail("region does not end in its sentinel", end);
            }
        }
        // Small code keeps no count of free blocks: the walk's is the reference.
        let counted_free = if Self::SMALL_CODE {
            free_blocks
        } else {
            self.free_blocks
        };
        if (used, used + free, live, free_blocks)
            != (
                self.used_granules,
                self.total_granules,
                self.live,
                counted_free,
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
                if !self.has((fl, sl)) {
                    continue;
                }
                let (mut id, mut prev) = (self.heads[fl][sl], NIL);
                if id == NIL {
                    return fail("bitmap bit set for an empty list", NIL);
                }
                while id != NIL {
                    if !self.looks_like_block(id) {
                        return fail("free list links to a non-block", id);
                    }
                    let p = self.store.locate(id);
                    // SAFETY: `id` looks like a block start (checked just above).
                    let v = unsafe { self.store.size_flags(p) };
                    if v & FREE == 0 || Self::class_of(size_of_flags(v)) != (fl, sl) {
                        return fail("listed block is used or in the wrong class", id);
                    }
                    // SAFETY: `id` is a free block.
                    let next = unsafe { self.store.next_free(p) };
                    // A head's `prev_free` may never have been written, so it is not read.
                    if prev != NIL {
                        // SAFETY: `id` is a free block that is not its list's head.
                        let back = unsafe { self.store.prev_free(p) };
                        if back != prev {
                            return fail("prev_free link broken", id);
                        }
                    }
                    listed += 1;
                    if listed > counted_free {
                        return fail("free list longer than the free block count (cycle?)", id);
                    }
                    (prev, id) = (id, next);
                }
            }
        }
        if listed != counted_free {
            return fail("a free block is missing from the lists", NIL);
        }
        self.check_quick_lists()
    }

    /// The id and flags of the block a quick list or bin links to at `ptr`, or which of the
    /// two it is not: inside a region, a block start.
    fn listed_block(&self, ptr: NonNull<u8>) -> Result<(BlockId, u32), InvariantError> {
        let fail = |what: &'static str, block: BlockId| Err(InvariantError { what, block });
        let Some((id, h)) = self.store.block_of(ptr) else {
            return fail("quick list or bin links outside the regions", NIL);
        };
        if !self.looks_like_block(id) {
            return fail("quick list or bin links to a non-block", id);
        }
        // SAFETY: `id` looks like a block start (checked just above).
        Ok((id, unsafe { self.store.size_flags(h) }))
    }

    /// Checks invariant 8: every block on quick list `g` is a used block of `g` granules, every
    /// block in bin `k` a used block of a size whose bin is `k` and that its payload holds, and
    /// the lists and bins hold `quick_blocks` blocks, `quick_granules` and `bin_granules`
    /// granules, within their budgets.
    fn check_quick_lists(&self) -> Result<(), InvariantError> {
        let fail = |what: &'static str, block: BlockId| Err(InvariantError { what, block });
        let (mut blocks, mut granules) = (0usize, 0usize);
        for (g, head) in self.quick.iter().enumerate() {
            let mut p = head.0;
            if !Self::QUICK && !p.is_null() {
                return fail("quick list in a heap that may not have them", NIL);
            }
            while let Some(ptr) = NonNull::new(p) {
                let (id, v) = self.listed_block(ptr)?;
                if v & FREE != 0 || size_of_flags(v) as usize != g {
                    return fail("quick-listed block is free or of another size", id);
                }
                blocks += 1;
                granules += g;
                if blocks > self.quick_blocks {
                    return fail("quick list longer than its count (cycle?)", id);
                }
                // SAFETY: a quick-listed block's payload starts with the list's link (it is a
                // used block of this heap, so its payload lies in a region).
                p = unsafe { ptr.cast::<*mut u8>().read() };
            }
        }
        if granules != self.quick_granules || granules > self.quick_budget {
            return fail("quick-list counters disagree with the lists", NIL);
        }
        let mut bin_granules = 0u32;
        for (k, head) in self.bins.iter().enumerate() {
            let mut p = head.0;
            if !Self::BINS && !p.is_null() {
                return fail("bin in a heap that may not have them", NIL);
            }
            while let Some(ptr) = NonNull::new(p) {
                let (id, v) = self.listed_block(ptr)?;
                let s = size_of_flags(v);
                if v & FREE != 0 || (s as usize) < SL || Self::bin_down(s) != k {
                    return fail("binned block is free or in another bin", id);
                }
                // SAFETY: a binned block's payload holds the bin's link and its size (see
                // `bin_push`; it is a used block of this heap, so its payload lies in a region).
                let (next, listed) = unsafe {
                    (
                        ptr.cast::<*mut u8>().read(),
                        ptr.cast::<u32>().add(2).read(),
                    )
                };
                if listed != s {
                    return fail("binned block's size disagrees with its header", id);
                }
                blocks += 1;
                bin_granules += listed;
                if blocks > self.quick_blocks {
                    return fail("quick list or bin longer than its count (cycle?)", id);
                }
                p = next;
            }
        }
        if blocks != self.quick_blocks
            || bin_granules != self.bin_granules
            || bin_granules > self.bin_budget
        {
            return fail("bin counters disagree with the lists", NIL);
        }
        Ok(())
    }

    /// Checks that free block `id` of `size` granules, found by walking its region, is linked
    /// both ways with its list neighbours (or heads its list).
    fn check_links(&self, id: BlockId, size: u32) -> Result<(), InvariantError> {
        let fail = |what: &'static str| Err(InvariantError { what, block: id });
        let p = self.store.locate(id);
        // SAFETY: `id` is a free block (found free by the physical walk).
        let next = unsafe { self.store.next_free(p) };
        let c @ (fl, sl) = Self::class_of(size);
        if !self.has(c) {
            return fail("free block's class has its bitmap bit clear");
        }
        // A head's `prev_free` is stale or unwritten by design (see `unlink`): not read.
        if self.heads[fl][sl] != id {
            // SAFETY: `id` is a free block that is not a head, so its `prev_free` is written.
            let prev = unsafe { self.store.prev_free(p) };
            if !self.looks_like_block(prev) {
                return fail("prev_free names a non-block");
            }
            // SAFETY: `prev` looks like a free block start (checked just above).
            if unsafe { self.store.next_free(self.store.locate(prev)) } != id {
                return fail("prev_free's next_free is not this block");
            }
        }
        if next != NIL {
            if !self.looks_like_block(next) {
                return fail("next_free names a non-block");
            }
            // SAFETY: `next` looks like a free block start (checked just above).
            if unsafe { self.store.prev_free(self.store.locate(next)) } != id {
                return fail("next_free's prev_free is not this block");
            }
        }
        Ok(())
    }

    /// Whether `id` is inside a region and its header agrees with its successor's: the O(1)
    /// plausibility check used for ids found in free lists.
    fn looks_like_block(&self, id: BlockId) -> bool {
        let r = (id >> LOCAL_BITS) as usize;
        if r >= self.regions || id & LOCAL_MASK >= self.region_len[r] {
            return false;
        }
        let end = ((r as u32) << LOCAL_BITS) + self.region_len[r];
        let p = self.store.locate(id);
        // SAFETY: `id` is inside region `r`; the store's accessors read metadata positions only
        // (in band: the header below a granule boundary, inside the region; out of band: the
        // table), so reading them for an arbitrary granule is sound, if possibly meaningless.
        let size = size_of_flags(unsafe { self.store.size_flags(p) });
        // SAFETY: as above, `id + size <= end` is checked first.
        size != 0
            && size <= end - id
            && unsafe { self.store.prev_size(self.store.forward(p, size)) } == size
    }
}

impl crate::OobHeap {
    /// Allocates a block for a process that maps the region at address `view`, and returns
    /// its offset from the region's start: `view + offset` is a multiple of `layout.align()`
    /// (the heap's own mapping does not matter). With `view = 0` the offset itself is aligned.
    /// `None` when no free block can hold the request at that alignment, when no block of this
    /// heap ever could (an alignment beyond `granule * 2^29`), or when `view` is not a multiple
    /// of the granule (offsets are, so such a view could not align even to the granule).
    ///
    /// Only the low bits of `view` matter: any value congruent to the mapping's address modulo
    /// the largest alignment asked for gives the same blocks.
    ///
    /// # Time complexity
    /// As [`allocate`](Self::allocate).
    pub fn allocate_offset(&mut self, layout: Layout, view: usize) -> Option<usize> {
        if !view.is_multiple_of(self.granule()) {
            return None;
        }
        let p = if layout.align() <= self.granule() {
            // Every block is granule-aligned in every view: the fast path needs no view.
            self.allocate(layout)?
        } else {
            let delta = view.wrapping_sub(self.store().base().addr());
            self.allocate_slow(layout, delta)?
        };
        Some(self.offset_of(p))
    }

    /// The size in bytes of the used block whose payload starts `offset` bytes into the region,
    /// or `None` if no used block starts there. O(1).
    pub fn block_size_at(&self, offset: usize) -> Option<usize> {
        self.used_block_at(offset)
            .ok()
            .map(|(_, v)| (size_of_flags(v) as usize) << self.store.granule_shift())
    }

    /// Frees the used block whose payload starts `offset` bytes into the region and returns its
    /// size in bytes, after checking that one does: the entry point for offsets that come from
    /// untrusted parties. A refused offset changes nothing. O(1).
    pub fn deallocate_at(&mut self, offset: usize) -> Result<usize, FreeError> {
        let (b, v) = self.used_block_at(offset)?;
        let size = size_of_flags(v);
        self.used_granules -= size as usize;
        self.live -= 1;
        // SAFETY: `b` is a used block start (checked against its table entry, which is non-zero
        // only at block starts); its links live in the table, so `b.p` serves for them.
        unsafe { self.release(b, size, v & PREV_FREE, b.p) };
        Ok((size as usize) << self.store.granule_shift())
    }

    /// Resizes in place the used block whose payload starts `offset` bytes into the region so
    /// that it holds `new_size` bytes: shrinks it, or grows it into a free successor. Returns
    /// the block's new size in bytes. Checks the offset like [`Tlsf::deallocate_at`]; a refused
    /// request changes nothing. O(1).
    pub fn resize_at(&mut self, offset: usize, new_size: usize) -> Result<usize, ResizeError> {
        let (b, v) = self.used_block_at(offset).map_err(ResizeError::Block)?;
        let g = match self.granules_for(new_size) {
            Some(g) if new_size != 0 => g,
            _ => return Err(ResizeError::BadSize),
        };
        // SAFETY: `b` is a used block start, `v` its flags (just read).
        if unsafe { self.resize_in_place(b, v, g, false) } {
            Ok((g as usize) << self.store.granule_shift())
        } else {
            Err(ResizeError::NoRoom)
        }
    }

    /// Makes the `bytes` starting `offset` bytes into the region a used block, carved from the
    /// free block that holds them all: for rebuilding a heap from a record of its used blocks
    /// (the daemon does this when it re-attaches to an arena after a crash). A refused call
    /// changes nothing.
    ///
    /// # Time complexity
    /// O(granules from the start of the free block that holds them to `offset`): rebuilding a
    /// heap by calling this in increasing offset order costs O(granules) in all.
    pub fn allocate_at(&mut self, offset: usize, bytes: usize) -> Result<(), AllocAtError> {
        let shift = self.store.granule_shift();
        if offset & ((1 << shift) - 1) != 0 {
            return Err(AllocAtError::Misaligned);
        }
        let g = match self.granules_for(bytes) {
            Some(g) if bytes != 0 => g,
            _ => return Err(AllocAtError::BadSize),
        };
        let id = offset >> shift;
        let len = if self.regions == 0 {
            0
        } else {
            self.region_len[0] as usize
        };
        if id >= len || len - id < g as usize {
            return Err(AllocAtError::OutOfRange);
        }
        let id = id as BlockId;
        // The block holding `id` starts at the nearest granule at or below it whose entry is
        // non-zero: entries inside a block are zero (`retire`).
        let mut start = id;
        let v = loop {
            // SAFETY: `start <= id < len`, inside the table.
            let v = unsafe { self.store.size_flags(self.blk(start).p) };
            if size_of_flags(v) != 0 {
                break v;
            }
            if start == 0 {
                return Err(AllocAtError::NotFree);
            }
            start -= 1;
        };
        let size = size_of_flags(v);
        if v & FREE == 0 || start + size < id + g {
            return Err(AllocAtError::NotFree);
        }
        // SAFETY: `start` is a free block of `size` granules, listed in its class, and holds
        // `front + g` granules.
        unsafe { self.take_after(self.blk(start), Self::class_of(size), id - start, g) };
        Ok(())
    }

    /// The used block starting at `offset`, checked.
    fn used_block_at(
        &self,
        offset: usize,
    ) -> Result<(Blk<<OutOfBand as MetaStore>::Ptr>, u32), FreeError> {
        let shift = self.store.granule_shift();
        if offset & ((1 << shift) - 1) != 0 {
            return Err(FreeError::Misaligned);
        }
        let id = offset >> shift;
        if self.regions == 0 || id >= self.region_len[0] as usize {
            return Err(FreeError::OutOfRange);
        }
        let b = self.blk(id as BlockId);
        // SAFETY: `id < len`, inside the table; entries that are not block starts read zero.
        let v = unsafe { self.store.size_flags(b.p) };
        if size_of_flags(v) == 0 {
            return Err(FreeError::NotABlockStart);
        }
        if v & FREE != 0 {
            return Err(FreeError::AlreadyFree);
        }
        Ok((b, v))
    }
}

impl<S, const FL: usize, const SL: usize, const SB: usize> Tlsf<S, FL, SL, SB> {
    /// Number of regions added.
    pub fn region_count(&self) -> usize {
        self.regions
    }
}
