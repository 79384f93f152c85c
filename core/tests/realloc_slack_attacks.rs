//! Attacks on the reallocation policy below the compacting threshold (`Tlsf::reallocate`):
//! a block of `SL` granules or more that shrinks to at least half its size keeps its size
//! ("slack"), and a block that cannot grow in place moves to the start of a free block
//! `GROW_ROOM` times its new size.
//!
//! What a slack block must never do is reach a quick list (whose free takes the size from the
//! layout) with a size other than its layout's, be freed or binned with the wrong size, or
//! throw the counters off. Every test here tracks each live block's size in granules as the
//! heap's own `used_bytes` counter reports it (the change of `used_bytes` when the block was
//! allocated or reallocated) and checks, after every step:
//!
//! - `check_invariants()`, `live_blocks`, and that `used_bytes` is exactly the sum of the live
//!   blocks' sizes (so a free that gives back another size than the block's shows at once);
//! - that a free lowers `used_bytes` by exactly the block's size (a slack block pushed on a
//!   quick list with its layout's size would lower it by less);
//! - invariant 7: a block under `SL` granules has exactly its layout's granules;
//! - no two live blocks overlap (by their sizes), every block is aligned and keeps its contents;
//! - the documented policy: below the threshold a shrink to `g >= SL` granules, at least half
//!   the block, keeps the block whole and in place; every other shrink, and every shrink while
//!   compacting, splits the block to exactly `g` granules; a growth ends in a block of exactly
//!   `g` granules; a failed reallocation changes nothing.
//!
//! Configurations: `Heap`, `SmallHeap` (`SL` = 16), a heap with 8 classes per power of two and
//! bins, one with 4 and no bins; `OobHeap`'s `resize_at` and `reallocate` (no slack there);
//! debug builds' checks of a free (wrong layouts, double frees) around slack blocks; the
//! bound on the memory slack holds at the default threshold; and an in-place growth through a
//! pointer that reaches only the old layout (Stacked Borrows, under Miri).
//!
//! Run also with `--release`, `--features small-code` and under Miri
//! (`MIRIFLAGS=-Zmiri-strict-provenance cargo +nightly miri test -p xalloc-core --test
//! realloc_slack_attacks`), where the case counts are cut.

use std::alloc::Layout;
use std::collections::BTreeMap;
#[cfg(all(debug_assertions, not(feature = "small-code")))]
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr::NonNull;

use xalloc_core::tlsf::{self, GROW_ROOM};
use xalloc_core::{Heap, InBand, MetaEntry, OobHeap, SmallHeap, Tlsf};

mod common;
#[cfg(all(debug_assertions, not(feature = "small-code")))]
use common::panic_msg;
use common::{layout, Rng};

/// Whether this build has the quick lists and the reallocation policy (`small-code` has not).
const SMALL_CODE: bool = cfg!(feature = "small-code");

/// The in-band granule in bytes.
const GRANULE: usize = 16;

/// Steps of each random run.
#[cfg(not(miri))]
const STEPS: usize = 4000;
#[cfg(miri)]
const STEPS: usize = 40;

/// The region of most tests: 1 MiB, 64 KiB under Miri.
const MIB: usize = if cfg!(miri) { 64 << 10 } else { 1 << 20 };

/// Seeds of each random run.
#[cfg(not(miri))]
const SEEDS: u64 = 6;
#[cfg(miri)]
const SEEDS: u64 = 1;

/// A heap's memory, owned by the test (not leaked, so that Miri sees no leak).
struct Buf {
    _v: Vec<u128>,
    p: *mut u8,
    len: usize,
}

/// `n` bytes of 16-aligned, zeroed memory.
fn buf(n: usize) -> Buf {
    let mut v = vec![0u128; n.div_ceil(16)];
    let p = v.as_mut_ptr().cast::<u8>();
    let len = v.len() * 16;
    Buf { _v: v, p, len }
}

/// A heap of configuration `FL`, `SL`, `SB` over `b`, with the given settings.
fn heap_over<const FL: usize, const SL: usize, const SB: usize>(
    b: &Buf,
    compact: u8,
    bins: u8,
) -> Tlsf<InBand, FL, SL, SB> {
    let mut h = Tlsf::<InBand, FL, SL, SB>::empty();
    // SAFETY: `b` outlives the heap in every test (declared first, dropped last), and nothing
    // else uses its memory.
    unsafe { h.try_init(b.p, b.len) }.unwrap();
    h.set_compact_above(compact);
    h.set_size_bins(bins);
    h
}

/// Granules a request of `size` bytes needs in band: payload and 8-byte header, rounded up.
fn gran(size: usize) -> usize {
    size.checked_add(8)
        .map_or(usize::MAX, |s| s.div_ceil(GRANULE).max(1))
}

/// The largest request in bytes that needs exactly `g` granules.
fn bytes_of(g: usize) -> usize {
    g * GRANULE - 8
}

/// Granules in used blocks as `stats` counts them.
fn used_g<const FL: usize, const SL: usize, const SB: usize>(
    h: &Tlsf<InBand, FL, SL, SB>,
) -> usize {
    h.stats().used_bytes / GRANULE
}

/// Whether `reallocate` compacts now: the heap's `used_granules` (used plus listed) at least
/// `compact_above` % of its granules (independent model of `compacting`).
fn compacting<const FL: usize, const SL: usize, const SB: usize>(
    h: &Tlsf<InBand, FL, SL, SB>,
) -> bool {
    if SMALL_CODE {
        return false;
    }
    let s = h.stats();
    let total = s.region_bytes / GRANULE;
    let used = (s.used_bytes + s.quick_list_bytes) / GRANULE;
    let p = h.compact_above() as usize;
    let from = if p >= 100 {
        usize::MAX
    } else {
        total / 100 * p + total % 100 * p / 100
    };
    used >= from
}

/// A live block of the model.
#[derive(Clone, Copy, Debug)]
struct Block {
    ptr: NonNull<u8>,
    layout: Layout,
    /// Its size in granules, as `used_bytes` counted it.
    size: usize,
    fill: u8,
}

/// The model: live blocks by address, and what the run reached.
#[derive(Default)]
struct Model {
    live: BTreeMap<usize, Block>,
    /// Reallocations that kept a shrunk block whole, split one, moved one.
    kept: usize,
    split: usize,
    moved: usize,
    fill: u8,
}

impl Model {
    fn next_fill(&mut self) -> u8 {
        self.fill = self.fill.wrapping_add(37) | 1;
        self.fill
    }
}

/// Asserts that the first `n` bytes at `p` all hold `fill` (under Miri, where a byte loop is
/// slow, the first, the last and every 97th).
fn assert_filled(p: NonNull<u8>, n: usize, fill: u8, what: &str) {
    // SAFETY: the callers pass a live block of at least `n` bytes, written with `fill` (or
    // carried over from one).
    let bytes = unsafe { std::slice::from_raw_parts(p.as_ptr(), n) };
    let stride = if cfg!(miri) { 97 } else { 1 };
    let wrong = (0..n)
        .step_by(stride)
        .chain(n.checked_sub(1))
        .find(|&i| bytes[i] != fill);
    if let Some(i) = wrong {
        panic!(
            "{what}: byte {i} of {n} at {p:?} is {:#x}, not {fill:#x}",
            bytes[i]
        );
    }
}

/// Allocates `l` and records the block; checks its size against its layout.
fn alloc_checked<const FL: usize, const SL: usize, const SB: usize>(
    h: &mut Tlsf<InBand, FL, SL, SB>,
    m: &mut Model,
    l: Layout,
) -> Option<NonNull<u8>> {
    let before = used_g(h);
    let p = h.allocate(l)?;
    let size = used_g(h) - before;
    let g = gran(l.size());
    assert!(
        size >= g,
        "allocate({l:?}) gave {size} granules, fewer than {g}"
    );
    if g < SL || h.size_bins() == 0 {
        // Invariant 7: only the bins round a request up, and never one under `SL` granules.
        assert_eq!(
            size, g,
            "allocate({l:?}): a block of another size than its layout's"
        );
    }
    assert_eq!(
        p.as_ptr().addr() % l.align(),
        0,
        "allocate({l:?}) misaligned"
    );
    let fill = m.next_fill();
    // SAFETY: `p` is a fresh block of at least `l.size()` bytes.
    unsafe { p.as_ptr().write_bytes(fill, l.size()) };
    let old = m.live.insert(
        p.as_ptr().addr(),
        Block {
            ptr: p,
            layout: l,
            size,
            fill,
        },
    );
    assert!(old.is_none(), "allocate returned live block {p:?}");
    Some(p)
}

/// Frees the block at `addr`, checking its contents and that `used_bytes` drops by exactly
/// its size.
fn free_checked<const FL: usize, const SL: usize, const SB: usize>(
    h: &mut Tlsf<InBand, FL, SL, SB>,
    m: &mut Model,
    addr: usize,
) {
    let b = m.live.remove(&addr).unwrap();
    assert_filled(b.ptr, b.layout.size(), b.fill, "before free");
    let before = used_g(h);
    // SAFETY: `b.ptr` is live with `b.layout` and freed once (removed from the model).
    unsafe { h.deallocate(b.ptr, b.layout) };
    let freed = before - used_g(h);
    assert_eq!(
        freed, b.size,
        "freeing {b:?} gave back {freed} granules, not the block's {} (a slack block on a quick \
         list of its layout's size?)",
        b.size
    );
}

/// What a reallocation did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Failed,
    Kept,
    Split,
    InPlace,
    Moved,
}

/// Reallocates the block at `addr` to `new_size` bytes, checking the documented policy, the
/// contents and the size the heap counts; returns what happened and the block's address.
fn realloc_checked<const FL: usize, const SL: usize, const SB: usize>(
    h: &mut Tlsf<InBand, FL, SL, SB>,
    m: &mut Model,
    addr: usize,
    new_size: usize,
) -> (Outcome, usize) {
    let b = m.live.remove(&addr).unwrap();
    let g = gran(new_size);
    let comp = compacting(h);
    let before = used_g(h);
    let live_before = h.stats().live_blocks;
    // SAFETY: `b.ptr` is live with `b.layout`; on success it is replaced by the result.
    let r = unsafe { h.reallocate(b.ptr, b.layout, new_size) };
    let Some(q) = r else {
        assert!(
            g > b.size,
            "a reallocation to {g} granules of {b:?} failed, yet the block holds it"
        );
        // It may have trimmed the quick lists, which changes neither of these.
        assert_eq!(
            (used_g(h), h.stats().live_blocks),
            (before, live_before),
            "a failed reallocation changed the used blocks"
        );
        assert_filled(b.ptr, b.layout.size(), b.fill, "after a failed realloc");
        m.live.insert(addr, b);
        return (Outcome::Failed, addr);
    };
    let size = (b.size + used_g(h))
        .checked_sub(before)
        .expect("used_bytes fell by more than the block");
    let kept_ok = b.layout.size().min(new_size);
    assert_filled(q, kept_ok, b.fill, "after realloc");
    assert_eq!(
        q.as_ptr().addr() % b.layout.align(),
        0,
        "realloc misaligned"
    );
    let keep = !SMALL_CODE && !comp && g < b.size && g >= SL && b.size - g <= g;
    let what = || {
        format!(
            "realloc of {b:?} to {new_size} bytes ({g} granules, compacting: {comp}) gave \
             {q:?} of {size} granules"
        )
    };
    let outcome = if keep {
        assert_eq!(
            (q, size),
            (b.ptr, b.size),
            "{}: should keep the block whole",
            what()
        );
        m.kept += 1;
        Outcome::Kept
    } else {
        assert_eq!(size, g, "{}: should be exactly the new size", what());
        if !SMALL_CODE && !comp && g <= b.size {
            assert_eq!(
                q,
                b.ptr,
                "{}: a shrink below the threshold stays in place",
                what()
            );
        }
        if q != b.ptr {
            m.moved += 1;
            Outcome::Moved
        } else if g < b.size {
            m.split += 1;
            Outcome::Split
        } else {
            Outcome::InPlace
        }
    };
    let fill = m.next_fill();
    // SAFETY: `q` holds at least `new_size` bytes.
    unsafe { q.as_ptr().write_bytes(fill, new_size) };
    let old = m.live.insert(
        q.as_ptr().addr(),
        Block {
            ptr: q,
            layout: layout(new_size, b.layout.align()),
            size,
            fill,
        },
    );
    assert!(old.is_none(), "{}: onto another live block", what());
    (outcome, q.as_ptr().addr())
}

/// Checks the heap against the model: invariants, counters, sizes, no overlap; with `deep`,
/// every block's whole contents, else its first and last byte.
fn check_all<const FL: usize, const SL: usize, const SB: usize>(
    h: &Tlsf<InBand, FL, SL, SB>,
    m: &Model,
    step: usize,
    deep: bool,
) {
    h.check_invariants()
        .unwrap_or_else(|e| panic!("step {step}: {e:?}"));
    let s = h.stats();
    assert_eq!(s.live_blocks, m.live.len(), "step {step}: {s:?}");
    assert_eq!(s.used_bytes + s.free_bytes, s.region_bytes, "step {step}");
    assert_eq!(h.free_bytes(), s.free_bytes, "step {step}");
    let sum: usize = m.live.values().map(|b| b.size).sum();
    assert_eq!(
        s.used_bytes / GRANULE,
        sum,
        "step {step}: used_bytes is not the sum of the blocks' sizes"
    );
    let mut prev: Option<&Block> = None;
    for b in m.live.values() {
        let g = gran(b.layout.size());
        assert!(b.size >= g, "step {step}: {b:?} smaller than its layout");
        if b.size < SL {
            assert_eq!(b.size, g, "step {step}: invariant 7 broken by {b:?}");
        }
        if let Some(p) = prev {
            assert!(
                p.ptr.as_ptr().addr() + p.size * GRANULE <= b.ptr.as_ptr().addr(),
                "step {step}: {p:?} overlaps {b:?}"
            );
        }
        if deep {
            assert_filled(b.ptr, b.layout.size(), b.fill, "contents");
        } else if b.layout.size() > 0 {
            let n = b.layout.size();
            // SAFETY: the block is live and holds `n` bytes.
            let (first, last) = unsafe { (*b.ptr.as_ptr(), *b.ptr.as_ptr().add(n - 1)) };
            assert_eq!(
                (first, last),
                (b.fill, b.fill),
                "step {step}: {b:?} overwritten"
            );
        }
        prev = Some(b);
    }
}

/// Frees every live block, trims, and checks that the heap is empty and one free block per
/// region again.
fn free_all<const FL: usize, const SL: usize, const SB: usize>(
    h: &mut Tlsf<InBand, FL, SL, SB>,
    m: &mut Model,
) {
    let addrs: Vec<usize> = m.live.keys().copied().collect();
    for a in addrs {
        free_checked(h, m, a);
    }
    h.trim();
    h.check_invariants().unwrap();
    let s = h.stats();
    assert_eq!((s.used_bytes, s.live_blocks), (0, 0), "{s:?}");
    assert_eq!(s.free_blocks, h.region_count(), "{s:?}");
}

/// Allocates one-granule blocks until one lies right behind live block `a` (an aligned block
/// may have free padding in front of it that the first ones take), so that `a` cannot grow in
/// place.
fn guard_after<const FL: usize, const SL: usize, const SB: usize>(
    h: &mut Tlsf<InBand, FL, SL, SB>,
    m: &mut Model,
    a: usize,
) {
    let end = a + m.live[&a].size * GRANULE;
    for _ in 0..1000 {
        let p = alloc_checked(h, m, layout(8, 8)).unwrap();
        if p.as_ptr().addr() == end {
            return;
        }
    }
    panic!("no block lands behind {a:#x}");
}

// ------------------------------------------------------------------------------------------
// The boundaries of the keep rule.

/// Every shrink of a block of `SL` to `3 SL + 5` granules, to every size from 0 bytes to the
/// block's own size (each granule count at both byte edges), at alignments 8, 64 and 4096,
/// below the threshold and compacting, with the bins off and on: keeps or splits exactly as
/// documented; the block then frees with its new layout, giving back exactly its size (a kept
/// block never reaches a quick list), and a new request of the freed layout gets a block of
/// exactly its size.
fn boundary_sweep<const FL: usize, const SL: usize, const SB: usize>() {
    let b = buf(if cfg!(miri) { 64 << 10 } else { 1 << 20 });
    let olds: &[usize] = if cfg!(miri) {
        &[4]
    } else {
        &[1, 2, 3, 4, 5, 6, 7, 8, 9]
    };
    // Old sizes around `SL` and `2 SL`, by index into this list.
    let old_sizes = [
        SL,
        SL + 1,
        2 * SL - 1,
        2 * SL,
        2 * SL + 1,
        SL + 2,
        2 * SL - 2,
        2 * SL + 2,
        3 * SL + 5,
    ];
    let aligns: &[usize] = if cfg!(miri) { &[8] } else { &[8, 64, 4096] };
    let configs: &[(u8, u8)] = if cfg!(miri) {
        &[(100, 100), (0, 0)]
    } else {
        &[(100, 0), (0, 0), (100, 100), (25, 0)]
    };
    for &(compact, bins) in configs {
        let mut h = heap_over::<FL, SL, SB>(&b, compact, bins);
        let mut m = Model::default();
        let mut step = 0;
        for &i in olds {
            let old = old_sizes[i - 1];
            for &align in aligns {
                let old_variants: &[usize] = if cfg!(miri) { &[0] } else { &[0, 15] };
                for old_bytes in old_variants.iter().map(|d| bytes_of(old) - d) {
                    let news: Vec<usize> = if cfg!(miri) {
                        vec![old.div_ceil(2) - 1, old.div_ceil(2), SL - 1]
                    } else {
                        (1..=old + 1).collect()
                    };
                    for new_g in news {
                        let variants = if cfg!(miri) { 1 } else { 3 };
                        for new_bytes in [bytes_of(new_g), bytes_of(new_g).saturating_sub(15), 0]
                            .into_iter()
                            .take(variants)
                        {
                            if gran(new_bytes) != new_g {
                                continue;
                            }
                            step += 1;
                            let a = alloc_checked(&mut h, &mut m, layout(old_bytes, align))
                                .unwrap()
                                .as_ptr()
                                .addr();
                            let guard = alloc_checked(&mut h, &mut m, layout(8, 8))
                                .unwrap()
                                .as_ptr()
                                .addr();
                            let (_, r) = realloc_checked(&mut h, &mut m, a, new_bytes);
                            check_all(&h, &m, step, true);
                            let r = m.live[&r];
                            free_checked(&mut h, &mut m, r.ptr.as_ptr().addr());
                            // The same layout again: from the quick list (exactly its size,
                            // `alloc_checked` checks) or the free lists.
                            let again = alloc_checked(&mut h, &mut m, r.layout)
                                .unwrap()
                                .as_ptr()
                                .addr();
                            if !cfg!(miri) {
                                check_all(&h, &m, step, true);
                            }
                            free_checked(&mut h, &mut m, again);
                            free_checked(&mut h, &mut m, guard);
                            check_all(&h, &m, step, false);
                        }
                    }
                }
            }
        }
        if !SMALL_CODE && compact == 100 {
            assert!(
                m.kept > 0 && m.split > 0,
                "kept {} split {}",
                m.kept,
                m.split
            );
        }
        if compact == 0 {
            assert_eq!(m.kept, 0, "a compacting heap kept a shrunk block");
        }
        free_all(&mut h, &mut m);
    }
}

/// [`boundary_sweep`] on the default heap (`SL` = 64 granules, 1 KiB).
#[test]
fn boundary_sweep_heap() {
    boundary_sweep::<{ tlsf::FL }, { tlsf::SL }, { tlsf::SIZE_BINS }>();
}

/// [`boundary_sweep`] on `SmallHeap`'s configuration (`SL` = 16 granules, 256 bytes).
#[test]
fn boundary_sweep_small_heap() {
    boundary_sweep::<{ tlsf::SMALL_FL }, { tlsf::SMALL_SL }, 0>();
}

/// [`boundary_sweep`] with 8 classes per power of two and 8 bins.
#[test]
fn boundary_sweep_sl8_with_bins() {
    boundary_sweep::<20, 8, 8>();
}

// ------------------------------------------------------------------------------------------
// A kept block's later life.

/// A block of `2 SL` granules shrunk to `SL` (kept whole), grown back (in place, nothing
/// counted), shrunk to `SL` again and then to `SL - 1` granules is split to exactly `SL - 1`
/// granules; freed with that layout it goes whole onto quick list `SL - 1`, and the next
/// request of that layout takes it back and may write all of it without touching the live
/// neighbour behind it. At alignments 16, 64 and 4096.
#[test]
fn a_kept_block_shrunk_below_sl_reaches_its_quick_list_with_its_size() {
    let sl = tlsf::SL;
    let aligns: &[usize] = if cfg!(miri) { &[64] } else { &[16, 64, 4096] };
    for &align in aligns {
        let b = buf(MIB);
        let mut h: Heap = heap_over(&b, 100, 0);
        let mut m = Model::default();
        let a = alloc_checked(&mut h, &mut m, layout(bytes_of(2 * sl), align)).unwrap();
        let n = alloc_checked(&mut h, &mut m, layout(100, 8)).unwrap();
        let a = a.as_ptr().addr();
        let used = used_g(&h);
        let (o, _) = realloc_checked(&mut h, &mut m, a, bytes_of(sl));
        let u1 = used_g(&h);
        let (o2, _) = realloc_checked(&mut h, &mut m, a, bytes_of(2 * sl));
        let u2 = used_g(&h);
        realloc_checked(&mut h, &mut m, a, bytes_of(sl));
        if !SMALL_CODE {
            assert_eq!((o, o2), (Outcome::Kept, Outcome::InPlace));
            assert_eq!(
                (u1, u2),
                (used, used),
                "nothing counted for the kept granules"
            );
        }
        let (o3, _) = realloc_checked(&mut h, &mut m, a, bytes_of(sl - 1));
        assert_eq!(o3, Outcome::Split);
        assert_eq!(
            used_g(&h),
            used - sl - 1,
            "split to exactly SL - 1 granules"
        );
        check_all(&h, &m, 0, true);
        let q = h.stats().quick_list_bytes;
        free_checked(&mut h, &mut m, a);
        if !SMALL_CODE {
            assert_eq!(h.stats().quick_list_bytes - q, (sl - 1) * GRANULE);
        }
        check_all(&h, &m, 1, true);
        let again = alloc_checked(&mut h, &mut m, layout(bytes_of(sl - 1), align)).unwrap();
        // Requests aligned past 1 KiB take the slow path, which leaves the quick lists alone.
        if !SMALL_CODE && align <= 1024 {
            assert_eq!(again.as_ptr().addr(), a, "the quick list's block");
        }
        // Every byte of it, then the neighbour must be intact (`check_all`, deep).
        check_all(&h, &m, 2, true);
        assert_filled(
            n,
            100,
            m.live[&n.as_ptr().addr()].fill,
            "neighbour of the reused block",
        );
        free_all(&mut h, &mut m);
    }
}

/// A kept block grows back to every size up to its own in place, keeping its contents, and
/// one granule past it grows into its free successor or moves, keeping them too; below the
/// threshold each step is in place while it fits.
#[test]
fn a_kept_block_grows_within_itself_in_place() {
    let sl = tlsf::SL;
    let b = buf(MIB);
    let mut h: Heap = heap_over(&b, 100, 0);
    let mut m = Model::default();
    let a = alloc_checked(&mut h, &mut m, layout(bytes_of(3 * sl), 8)).unwrap();
    let _n = alloc_checked(&mut h, &mut m, layout(8, 8)).unwrap();
    let a = a.as_ptr().addr();
    realloc_checked(&mut h, &mut m, a, bytes_of(3 * sl / 2));
    let step = if cfg!(miri) { 97 } else { 1 };
    for s in (bytes_of(3 * sl / 2)..=bytes_of(3 * sl)).step_by(step) {
        let (o, _) = realloc_checked(&mut h, &mut m, a, s);
        if !SMALL_CODE {
            assert!(
                o == Outcome::Kept || o == Outcome::InPlace,
                "growth to {s} within the block: {o:?}"
            );
        }
        // Back to the low end each time, kept.
        realloc_checked(&mut h, &mut m, a, bytes_of(3 * sl / 2));
    }
    check_all(&h, &m, 0, true);
    let (o, _) = realloc_checked(&mut h, &mut m, a, bytes_of(3 * sl) + 1);
    assert_eq!(o, Outcome::Moved, "its successor is used: it moves");
    check_all(&h, &m, 1, true);
    free_all(&mut h, &mut m);
}

/// Blocks kept whole below the threshold, then the heap filled past it: reallocating them
/// (growth within their size, shrinks by half, growth past them) splits every spare granule
/// off, moves some down, and keeps their contents; everything freed, the heap is one free
/// block again. Also with the bins on.
#[test]
fn kept_blocks_across_the_compacting_threshold() {
    let sl = tlsf::SL;
    for bins in [0u8, 25] {
        let b = buf(if cfg!(miri) { 128 << 10 } else { 1 << 20 });
        let mut h: Heap = heap_over(&b, 25, bins);
        let mut m = Model::default();
        let n = if cfg!(miri) { 4 } else { 24 };
        let mut kept = Vec::new();
        for _ in 0..n {
            let p = alloc_checked(&mut h, &mut m, layout(bytes_of(2 * sl), 8)).unwrap();
            alloc_checked(&mut h, &mut m, layout(24, 8)).unwrap();
            kept.push(p.as_ptr().addr());
        }
        assert!(!compacting(&h));
        for &a in &kept {
            let (o, _) = realloc_checked(&mut h, &mut m, a, bytes_of(sl));
            if !SMALL_CODE {
                assert_eq!(o, Outcome::Kept);
            }
        }
        check_all(&h, &m, 0, true);
        // Fill past the threshold with blocks of 4 KiB, freeing every third (holes below).
        let mut i = 0;
        while if SMALL_CODE { i < 40 } else { !compacting(&h) } {
            let p = alloc_checked(&mut h, &mut m, layout(4000, 8)).unwrap();
            if i % 3 == 0 {
                free_checked(&mut h, &mut m, p.as_ptr().addr());
            }
            i += 1;
        }
        check_all(&h, &m, 1, true);
        let mut addrs = kept.clone();
        for (j, a) in addrs.iter_mut().enumerate() {
            let new = match j % 4 {
                0 => bytes_of(sl + 3),
                1 => bytes_of(sl / 2),
                2 => bytes_of(2 * sl),
                _ => bytes_of(5 * sl),
            };
            let (o, at) = realloc_checked(&mut h, &mut m, *a, new);
            assert_ne!(o, Outcome::Kept, "compacting: every shrink splits");
            *a = at;
            check_all(&h, &m, 2 + j, true);
        }
        free_all(&mut h, &mut m);
    }
}

/// Reallocations of a kept block (and of plain ones) to sizes no block can have, up to
/// `usize::MAX`, fail without touching the heap or the block: no overflow in the keep rule or
/// in `GROW_ROOM`'s product.
#[test]
fn huge_sizes_fail_cleanly_on_kept_blocks() {
    let sl = tlsf::SL;
    let b = buf(if cfg!(miri) { 64 << 10 } else { 1 << 20 });
    let mut h: Heap = heap_over(&b, 100, 0);
    let mut m = Model::default();
    let a = alloc_checked(&mut h, &mut m, layout(bytes_of(2 * sl), 8))
        .unwrap()
        .as_ptr()
        .addr();
    let c = alloc_checked(&mut h, &mut m, layout(bytes_of(sl), 4096))
        .unwrap()
        .as_ptr()
        .addr();
    realloc_checked(&mut h, &mut m, a, bytes_of(sl + 1));
    let max = Heap::MAX_BLOCK_GRANULES as usize;
    for s in [
        usize::MAX,
        usize::MAX - 7,
        usize::MAX - 23,
        isize::MAX as usize,
        bytes_of(max),
        bytes_of(max) + 1,
        bytes_of(max / 2),
        bytes_of(max / 2 + 1),
        bytes_of(max / GROW_ROOM as usize + 1),
        bytes_of(u32::MAX as usize / GROW_ROOM as usize + 1),
        1 << 40,
        b.len,
    ] {
        for at in [a, c] {
            let (o, _) = realloc_checked(&mut h, &mut m, at, s);
            assert_eq!(o, Outcome::Failed, "realloc to {s}");
        }
        check_all(&h, &m, 0, true);
    }
    free_all(&mut h, &mut m);
}

// ------------------------------------------------------------------------------------------
// GROW_ROOM.

/// A block that cannot grow in place moves to the start of a free block `GROW_ROOM` times its
/// new size, at every alignment up to 4096: growing it again up to that stays in place. A
/// free block of `GROW_ROOM - 1` times the new size lies lower and would be the good fit of a
/// smaller room: the move must pass it by.
#[test]
fn a_moved_block_grows_again_in_place_up_to_grow_room() {
    let room = GROW_ROOM as usize;
    let (aligns, sizes): (&[usize], &[usize]) = if cfg!(miri) {
        (&[8, 64], &[3, 65])
    } else {
        (&[8, 16, 64, 256, 4096], &[3, 63, 64, 65, 200])
    };
    for &align in aligns {
        for &g in sizes {
            let b = buf(MIB);
            let mut h: Heap = heap_over(&b, 100, 0);
            let mut m = Model::default();
            let hole = alloc_checked(&mut h, &mut m, layout(bytes_of((room - 1) * g), 8))
                .unwrap()
                .as_ptr()
                .addr();
            guard_after(&mut h, &mut m, hole);
            let a = alloc_checked(&mut h, &mut m, layout(bytes_of(2), align))
                .unwrap()
                .as_ptr()
                .addr();
            guard_after(&mut h, &mut m, a);
            free_checked(&mut h, &mut m, hole);
            // A free block, not a quick-listed one.
            h.trim();
            let (o, q) = realloc_checked(&mut h, &mut m, a, bytes_of(g));
            assert_eq!(o, Outcome::Moved);
            let (o, _) = realloc_checked(&mut h, &mut m, q, bytes_of(g * room));
            if !SMALL_CODE {
                assert_eq!(o, Outcome::InPlace, "align {align}, {g} granules");
            }
            check_all(&h, &m, 0, true);
            free_all(&mut h, &mut m);
        }
    }
}

/// When no free block is `GROW_ROOM` times the new size, a growing block still moves into a
/// block that just fits (the fallback), rather than failing.
#[test]
fn grow_room_falls_back_to_a_block_that_just_fits() {
    let sl = tlsf::SL;
    let b = buf(if cfg!(miri) { 64 << 10 } else { 256 << 10 });
    let mut h: Heap = heap_over(&b, 100, 0);
    let mut m = Model::default();
    let g = 2 * sl;
    let hole = alloc_checked(&mut h, &mut m, layout(bytes_of(g), 8))
        .unwrap()
        .as_ptr()
        .addr();
    alloc_checked(&mut h, &mut m, layout(8, 8)).unwrap();
    let a = alloc_checked(&mut h, &mut m, layout(bytes_of(sl), 8))
        .unwrap()
        .as_ptr()
        .addr();
    alloc_checked(&mut h, &mut m, layout(8, 8)).unwrap();
    // Everything else taken.
    let rest = h.stats().largest_free_bytes;
    alloc_checked(&mut h, &mut m, layout(rest, 8)).unwrap();
    free_checked(&mut h, &mut m, hole);
    assert!(h.stats().largest_free_bytes < bytes_of(g * 2));
    let (o, q) = realloc_checked(&mut h, &mut m, a, bytes_of(g));
    assert_eq!(
        (o, q),
        (Outcome::Moved, hole),
        "moved into the one block that fits"
    );
    check_all(&h, &m, 0, true);
    free_all(&mut h, &mut m);
}

// ------------------------------------------------------------------------------------------
// Random runs.

/// A request size in granules, biased to the keep rule's boundaries.
fn pick_granules(rng: &mut Rng, sl: usize) -> usize {
    match rng.below(10) {
        0..=2 => sl - 2 + rng.below(5) as usize,
        3 | 4 => 2 * sl - 2 + rng.below(5) as usize,
        5 => 1 + rng.below(sl as u64) as usize,
        6 => 1 + rng.below(8 * sl as u64) as usize,
        7 => 4 * sl - 2 + rng.below(5) as usize,
        _ => 1 + rng.below(3 * sl as u64) as usize,
    }
}

/// Bytes for `g` granules: at either end of the granule's byte range.
fn pick_bytes(rng: &mut Rng, g: usize) -> usize {
    match rng.below(4) {
        0 => bytes_of(g),
        1 => bytes_of(g).saturating_sub(15),
        2 if g == 1 => 0,
        _ => bytes_of(g).saturating_sub(rng.below(16) as usize),
    }
}

/// Random allocation, reallocation (biased to the keep rule's boundaries relative to each
/// block's real size: exactly half, half less a granule, `SL`, `SL - 1`, zero, back to the
/// whole block, past it) and free, with `compact_above`, the bins and `trim` changing, checked
/// after every step against the model (see the module docs).
fn random_run<const FL: usize, const SL: usize, const SB: usize>(seed: u64, region: usize) {
    let b = buf(region);
    let mut h = heap_over::<FL, SL, SB>(&b, 25, 0);
    let mut m = Model::default();
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let aligns = [8usize, 8, 8, 16, 16, 32, 64, 256, 4096];
    for step in 0..STEPS {
        match rng.below(100) {
            0 => h.set_compact_above([0u8, 10, 25, 25, 60, 100, 100][rng.below(7) as usize]),
            1 => h.set_size_bins([0u8, 0, 25, 100][rng.below(4) as usize]),
            2 => h.trim(),
            3..=32 => {
                let g = pick_granules(&mut rng, SL);
                let l = layout(pick_bytes(&mut rng, g), aligns[rng.below(9) as usize]);
                let _ = alloc_checked(&mut h, &mut m, l);
            }
            33..=50 if !m.live.is_empty() => {
                let i = rng.below(m.live.len() as u64) as usize;
                let a = *m.live.keys().nth(i).unwrap();
                free_checked(&mut h, &mut m, a);
            }
            _ if !m.live.is_empty() => {
                let i = rng.below(m.live.len() as u64) as usize;
                let a = *m.live.keys().nth(i).unwrap();
                let s = m.live[&a].size;
                let g = match rng.below(12) {
                    0 => s.div_ceil(2),
                    1 => (s / 2).max(1),
                    2 => s.div_ceil(2).saturating_sub(1).max(1),
                    3 => SL,
                    4 => SL - 1,
                    5 => 1,
                    6 => s,
                    7 => s + 1,
                    8 => 2 * s,
                    9 => s - s / 4,
                    _ => pick_granules(&mut rng, SL),
                };
                let bytes = pick_bytes(&mut rng, g);
                realloc_checked(&mut h, &mut m, a, bytes);
            }
            _ => {}
        }
        check_all(&h, &m, step, step % 64 == 0);
    }
    if !SMALL_CODE && !cfg!(miri) {
        assert!(m.kept > 20, "the run kept {} blocks", m.kept);
        assert!(
            m.split > 20 && m.moved > 20,
            "split {} moved {}",
            m.split,
            m.moved
        );
    }
    free_all(&mut h, &mut m);
}

/// [`random_run`] on the default heap.
#[test]
fn random_heap() {
    for seed in 1..=SEEDS {
        random_run::<{ tlsf::FL }, { tlsf::SL }, { tlsf::SIZE_BINS }>(
            seed,
            if cfg!(miri) { 128 << 10 } else { 1 << 20 },
        );
    }
}

/// [`random_run`] on `SmallHeap`'s configuration (`SL` = 16 granules).
#[test]
fn random_small_heap() {
    for seed in 1..=SEEDS {
        random_run::<{ tlsf::SMALL_FL }, { tlsf::SMALL_SL }, 0>(
            seed + 100,
            if cfg!(miri) { 32 << 10 } else { 96 << 10 },
        );
    }
}

/// [`random_run`] with 8 classes per power of two and 8 bins, and with 4 and no bins.
#[test]
fn random_narrow_classes() {
    for seed in 1..=SEEDS {
        random_run::<20, 8, 8>(seed + 200, if cfg!(miri) { 32 << 10 } else { 256 << 10 });
        random_run::<16, 4, 0>(seed + 300, if cfg!(miri) { 32 << 10 } else { 256 << 10 });
    }
}

// ------------------------------------------------------------------------------------------
// SmallHeap, OobHeap.

/// `SmallHeap` (`SL` = 16 granules): a 32-granule block shrunk to 16 keeps its size (without
/// `small-code`), shrunk to 15 is split and goes whole onto quick list 15 when freed.
#[test]
fn small_heap_keeps_at_its_own_sl() {
    let b = buf(64 << 10);
    let mut h: SmallHeap = heap_over(&b, 100, 0);
    let mut m = Model::default();
    let sl = tlsf::SMALL_SL;
    let a = alloc_checked(&mut h, &mut m, layout(bytes_of(2 * sl), 8))
        .unwrap()
        .as_ptr()
        .addr();
    alloc_checked(&mut h, &mut m, layout(8, 8)).unwrap();
    let (o, _) = realloc_checked(&mut h, &mut m, a, bytes_of(sl));
    assert_eq!(
        o,
        if SMALL_CODE {
            Outcome::Split
        } else {
            Outcome::Kept
        }
    );
    let (o, _) = realloc_checked(&mut h, &mut m, a, bytes_of(sl - 1));
    assert_eq!(o, Outcome::Split);
    let q = h.stats().quick_list_bytes;
    free_checked(&mut h, &mut m, a);
    if !SMALL_CODE {
        assert_eq!(h.stats().quick_list_bytes - q, (sl - 1) * GRANULE);
    }
    check_all(&h, &m, 0, true);
    free_all(&mut h, &mut m);
}

/// `OobHeap` keeps no slack: `resize_at` and `reallocate` shrink a block to half its size by
/// splitting (`block_size_at` reports exactly the new size), and growing back needs a free
/// successor.
#[test]
fn oob_heap_never_keeps_slack() {
    let granule = 64;
    let size = 256 * granule;
    let mut region = vec![0u8; size];
    let mut table = vec![MetaEntry::default(); OobHeap::table_entries(size, granule)];
    // SAFETY: `region` and `table` outlive the heap, are used by nothing else and do not
    // overlap.
    let mut h = unsafe {
        OobHeap::new(
            region.as_mut_ptr(),
            size,
            granule,
            table.as_mut_ptr(),
            table.len(),
        )
    }
    .unwrap();
    h.set_compact_above(100);
    let sl = tlsf::SL;
    let big = layout(2 * sl * granule, 8);
    let off = h.allocate_offset(big, 0).unwrap();
    let guard = h.allocate_offset(layout(8, 8), 0).unwrap();
    let half = sl * granule;
    assert_eq!(h.resize_at(off, half), Ok(half));
    assert_eq!(
        h.block_size_at(off),
        Some(half),
        "resize_at split the block"
    );
    h.check_invariants().unwrap();
    assert_eq!(
        h.resize_at(off, 2 * half),
        Ok(2 * half),
        "grows into its freed tail"
    );
    // The same through `reallocate`.
    let base = NonNull::new(h.store().base()).unwrap();
    // SAFETY: `off` is a live block's offset, so `base + off` is its payload, inside `region`.
    let p = unsafe { base.add(off) };
    // SAFETY: `p` is live with `big` (grown back to it).
    let q = unsafe { h.reallocate(p, big, half) }.unwrap();
    assert_eq!(q, p);
    assert_eq!(
        h.block_size_at(off),
        Some(half),
        "reallocate split the block"
    );
    h.check_invariants().unwrap();
    // SAFETY: `q` is live with size `half`; `guard` is live.
    unsafe { h.deallocate(q, layout(half, 8)) };
    assert_eq!(h.deallocate_at(guard), Ok(granule));
    h.check_invariants().unwrap();
    assert_eq!(h.stats().used_bytes, 0);
}

// ------------------------------------------------------------------------------------------
// Debug checks of a free.

/// Runs `f`, which must panic with a message containing `want`.
#[cfg(all(debug_assertions, not(feature = "small-code")))]
fn must_panic(what: &str, want: &str, f: impl FnOnce()) {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(()) => panic!("{what}: not caught in a debug build"),
        Err(e) => {
            let msg = panic_msg(e);
            assert!(msg.contains(want), "{what}: panicked with {msg:?}");
        }
    }
}

/// In a heap that never kept slack nor turned the bins on, freeing a never-shrunk block of
/// `2 SL` granules with a smaller layout of `SL` granules is caught; so it is after shrinks
/// that split (compacting), which must not relax the check either.
#[test]
#[cfg(all(debug_assertions, not(feature = "small-code")))]
fn wrong_layout_caught_while_sizes_are_exact() {
    let sl = tlsf::SL;
    for compacting_shrinks in [false, true] {
        let b = buf(MIB);
        let mut h: Heap = heap_over(&b, if compacting_shrinks { 0 } else { 100 }, 0);
        let mut m = Model::default();
        if compacting_shrinks {
            for _ in 0..4 {
                let a = alloc_checked(&mut h, &mut m, layout(bytes_of(2 * sl), 8)).unwrap();
                let (o, _) = realloc_checked(&mut h, &mut m, a.as_ptr().addr(), bytes_of(sl));
                assert_eq!(o, Outcome::Split);
            }
        }
        let p = h.allocate(layout(bytes_of(2 * sl), 8)).unwrap();
        must_panic(
            "free of a 2 SL block with an SL layout",
            "layout differs",
            // SAFETY: none: `p` was allocated with a larger layout, which breaks
            // `deallocate`'s contract on purpose; the debug check panics before any change.
            || unsafe { h.deallocate(p, layout(bytes_of(sl), 8)) },
        );
        h.check_invariants().unwrap();
    }
}

/// Once a block kept slack, a free of it with its new layout is accepted, but the layouts that
/// are still wrong are caught: one under `SL` granules (it would put the block on a quick list
/// of the wrong size), one larger than the block, and a second free (on the free lists, and
/// in a bin).
#[test]
#[cfg(all(debug_assertions, not(feature = "small-code")))]
fn wrong_layouts_of_a_kept_block_still_caught() {
    let sl = tlsf::SL;
    for bins in [0u8, 100] {
        let b = buf(MIB);
        let mut h: Heap = heap_over(&b, 100, bins);
        let mut m = Model::default();
        let a = alloc_checked(&mut h, &mut m, layout(bytes_of(2 * sl), 8)).unwrap();
        alloc_checked(&mut h, &mut m, layout(8, 8)).unwrap();
        let (o, _) = realloc_checked(&mut h, &mut m, a.as_ptr().addr(), bytes_of(sl));
        assert_eq!(o, Outcome::Kept);
        let size = m.live[&a.as_ptr().addr()].size;
        must_panic(
            "free of a kept block with a layout under SL granules",
            "layout differs",
            // SAFETY: none: a wrong layout on purpose; the debug check panics first.
            || unsafe { h.deallocate(a, layout(bytes_of(sl - 1), 8)) },
        );
        must_panic(
            "free of a kept block with a layout larger than the block",
            "layout differs",
            // SAFETY: none: a wrong layout on purpose; the debug check panics first.
            || unsafe { h.deallocate(a, layout(bytes_of(size + 1), 8)) },
        );
        check_all(&h, &m, 0, true);
        free_checked(&mut h, &mut m, a.as_ptr().addr());
        must_panic(
            "second free of a kept block",
            "double free",
            // SAFETY: none: a double free on purpose; the debug check panics first.
            || unsafe { h.deallocate(a, layout(bytes_of(sl), 8)) },
        );
        check_all(&h, &m, 1, false);
        free_all(&mut h, &mut m);
    }
}

// ------------------------------------------------------------------------------------------
// What slack costs, and the pointer an in-place growth returns.

/// Slack is made only below the threshold, so at the default `compact_above` (25 %) it holds
/// at most an eighth of the heap: 2 KiB blocks shrunk to 1 KiB while the heap is under 25 %
/// full, then 1 KiB requests until one fails (and fails again after `trim`, which does not
/// return slack). The payloads then fill more than 80 % of the region, and the slack is at
/// most `compact_above` / 2 % of it. (With `compact_above(100)` the same stream stops at about
/// half the region: see the report.)
#[test]
fn slack_is_bounded_by_the_compacting_threshold() {
    let b = buf(MIB);
    let mut h: Heap = heap_over(&b, tlsf::DEFAULT_COMPACT_ABOVE, 0);
    let mut m = Model::default();
    let sl = tlsf::SL;
    let region = h.stats().region_bytes / GRANULE;
    let limit = if cfg!(miri) { 8 } else { usize::MAX };
    let mut n = 0;
    // (`small-code` never compacts: the same quarter of the heap.)
    while n < limit
        && if SMALL_CODE {
            used_g(&h) * 4 < region
        } else {
            !compacting(&h)
        }
    {
        let a = alloc_checked(&mut h, &mut m, layout(bytes_of(2 * sl), 8)).unwrap();
        realloc_checked(&mut h, &mut m, a.as_ptr().addr(), bytes_of(sl));
        n += 1;
    }
    let slack: usize = m
        .live
        .values()
        .map(|x| x.size - gran(x.layout.size()))
        .sum();
    assert!(
        slack * 200 <= region * tlsf::DEFAULT_COMPACT_ABOVE as usize + 2 * sl * 200,
        "{slack} granules of slack in a heap of {region}"
    );
    if SMALL_CODE {
        assert_eq!(slack, 0);
    }
    let mut count = 0;
    while count < limit && alloc_checked(&mut h, &mut m, layout(bytes_of(sl), 8)).is_some() {
        count += 1;
    }
    if !cfg!(miri) {
        h.trim();
        assert!(alloc_checked(&mut h, &mut m, layout(bytes_of(sl), 8)).is_none());
        let payload: usize = m.live.values().map(|x| gran(x.layout.size())).sum();
        assert!(
            payload * 100 >= region * 80,
            "the heap is full with payloads of {payload} granules of {region}"
        );
    }
    check_all(&h, &m, 0, false);
    free_all(&mut h, &mut m);
}

/// A kept block grown back in place through a pointer that reaches only its shrunk layout (as
/// the pointer of a `Box<[u8]>` of that length would), as the global allocator's `realloc`
/// may be called, and a block grown into its free successor the same way: the pointer
/// returned must reach the whole new size. Under Miri with Stacked Borrows this failed at
/// ae9637c (an in-place `reallocate` returned the caller's `ptr`, whose tag covers only the
/// old layout: "tag does not exist in the borrow stack"); abcdee9 returns the heap's own
/// pointer to the block.
#[test]
fn grow_back_through_a_pointer_to_the_shrunk_layout() {
    let sl = tlsf::SL;
    let b = buf(MIB);
    let mut h: Heap = heap_over(&b, 100, 0);
    let big = layout(bytes_of(2 * sl), 8);
    let p = h.allocate(big).unwrap();
    let _guard = h.allocate(layout(8, 8)).unwrap();
    // SAFETY: `p` is live with `big`.
    let q = unsafe { h.reallocate(p, big, bytes_of(sl)) }.unwrap();
    assert_eq!(q, p);
    // SAFETY: `q` holds `bytes_of(sl)` bytes that nothing else uses.
    let s: &mut [u8] = unsafe { std::slice::from_raw_parts_mut(q.as_ptr(), bytes_of(sl)) };
    s.fill(5);
    let narrow = NonNull::new(s.as_mut_ptr()).unwrap();
    // SAFETY: `narrow` is the live block, with its layout after the shrink.
    let r = unsafe { h.reallocate(narrow, layout(bytes_of(sl), 8), big.size()) }.unwrap();
    if !SMALL_CODE {
        assert_eq!(r, narrow, "kept: grows back in place");
    }
    // SAFETY: `r` holds `big.size()` bytes; the first `bytes_of(sl)` were carried over.
    unsafe {
        r.as_ptr().add(big.size() - 1).write(6);
        assert_eq!(*r.as_ptr().add(bytes_of(sl) - 1), 5);
        assert_eq!(*r.as_ptr().add(big.size() - 1), 6);
    }
    // SAFETY: `r` is live with `big.size()` bytes.
    unsafe { h.deallocate(r, big) };
    h.check_invariants().unwrap();
    assert_eq!(h.stats().live_blocks, 1);

    // Growth into a free successor (no slack involved), through a pointer to the old layout:
    // the first block of a fresh heap, followed by the rest of the region.
    let b2 = buf(MIB);
    let mut h: Heap = heap_over(&b2, 100, 0);
    let small = layout(bytes_of(sl), 8);
    let p = h.allocate(small).unwrap();
    // SAFETY: `p` holds `small.size()` bytes that nothing else uses.
    let s: &mut [u8] = unsafe { std::slice::from_raw_parts_mut(p.as_ptr(), small.size()) };
    s.fill(7);
    let narrow = NonNull::new(s.as_mut_ptr()).unwrap();
    // SAFETY: `narrow` is the live block, with `small`.
    let r = unsafe { h.reallocate(narrow, small, 4 * small.size()) }.unwrap();
    assert_eq!(r, narrow, "grows into the free successor in place");
    // SAFETY: `r` holds `4 * small.size()` bytes, the first `small.size()` carried over.
    unsafe {
        r.as_ptr().add(4 * small.size() - 1).write(8);
        assert_eq!(*r.as_ptr().add(small.size() - 1), 7);
    }
    // SAFETY: `r` is live with that size.
    unsafe { h.deallocate(r, layout(4 * small.size(), 8)) };
    h.check_invariants().unwrap();
}
