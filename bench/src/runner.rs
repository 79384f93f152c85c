//! Replaying a stream through one allocator, with and without per-op timing.

use core::alloc::Layout;
use std::time::{Duration, Instant};

use crate::allocs::{glibc_footprint, BenchAlloc};
use crate::timer;
use crate::workload::{Op, ALLOC, FREE};

/// One live-table entry.
#[derive(Clone, Copy)]
pub struct Slot {
    ptr: *mut u8,
    size: u32,
    align_shift: u8,
    tag: u8,
}

const EMPTY: Slot = Slot {
    ptr: core::ptr::null_mut(),
    size: 0,
    align_shift: 0,
    tag: 0,
};

/// The memory every region-based allocator runs on, and the replay state.
pub struct Arena {
    /// Start of the region (4096-aligned, pre-faulted).
    pub base: *mut u8,
    /// Region size.
    pub size: usize,
    slots: Vec<Slot>,
}

impl Arena {
    /// Map `size` bytes aligned to 4096 and touch every page.
    pub fn new(size: usize) -> Self {
        let layout = Layout::from_size_align(size, 4096).expect("region layout");
        // SAFETY: non-zero size.
        let base = unsafe { std::alloc::alloc(layout) };
        assert!(!base.is_null(), "cannot allocate the {size}-byte region");
        // Fault every page in now so no allocator pays for first touch.
        // SAFETY: `base` is valid for `size` bytes.
        unsafe { core::ptr::write_bytes(base, 0, size) };
        Arena {
            base,
            size,
            slots: Vec::new(),
        }
    }
}

/// How a replay ended.
pub enum Outcome {
    /// All ops ran.
    Done,
    /// An allocation (or realloc) returned null at this op index.
    Oom(usize),
    /// The deadline passed; this many ops ran.
    Deadline(usize),
}

#[cold]
#[inline(never)]
fn corrupt(name: &str, i: usize, what: &str) -> ! {
    panic!("{name}: correctness failure at op #{i}: {what}")
}

/// Executes one op. Returns false on allocation failure.
///
/// # Safety
/// `slots` must be the live table of this stream replayed through `a`
/// from the start (every FREE/REALLOC refers to a live block of `a`).
#[inline(always)]
unsafe fn exec<A: BenchAlloc>(
    a: &mut A,
    op: Op,
    i: usize,
    slots: &mut [Slot],
    lo: usize,
    hi: usize,
) -> bool {
    let slot = &mut slots[op.slot as usize];
    match op.kind {
        ALLOC => {
            let size = op.size as usize;
            // SAFETY: align is a small power of two; sizes are small.
            let layout = unsafe { Layout::from_size_align_unchecked(size, 1 << op.align_shift) };
            let p = a.alloc(layout);
            if p.is_null() {
                return false;
            }
            let addr = p as usize;
            if addr & (layout.align() - 1) != 0 || addr < lo || addr + size > hi {
                corrupt(A::NAME, i, "block misaligned or outside the region");
            }
            // SAFETY: `p` is a fresh block of `size` bytes.
            unsafe {
                p.write(op.tag);
                p.add(size - 1).write(op.tag);
            }
            *slot = Slot {
                ptr: p,
                size: op.size,
                align_shift: op.align_shift,
                tag: op.tag,
            };
        }
        FREE => {
            let s = *slot;
            let size = s.size as usize;
            // SAFETY: the slot is live (stream invariant), `size` bytes.
            unsafe {
                if s.ptr.read() != s.tag || s.ptr.add(size - 1).read() != s.tag {
                    corrupt(A::NAME, i, "live block overwritten before free");
                }
                a.dealloc(
                    s.ptr,
                    Layout::from_size_align_unchecked(size, 1 << s.align_shift),
                );
            }
        }
        _ => {
            let s = *slot;
            let (old, new) = (s.size as usize, op.size as usize);
            // SAFETY: the slot is live (stream invariant), `old` bytes.
            let layout = unsafe { Layout::from_size_align_unchecked(old, 1 << s.align_shift) };
            // SAFETY: as above.
            let p = unsafe { a.realloc(s.ptr, layout, new) };
            if p.is_null() {
                return false;
            }
            let addr = p as usize;
            if addr & (layout.align() - 1) != 0 || addr < lo || addr + new > hi {
                corrupt(
                    A::NAME,
                    i,
                    "reallocated block misaligned or outside the region",
                );
            }
            // SAFETY: `p` is live with `new` bytes; `old - 1 < new` when checked.
            unsafe {
                if p.read() != s.tag || (new >= old && p.add(old - 1).read() != s.tag) {
                    corrupt(A::NAME, i, "contents not preserved by realloc");
                }
                p.add(new - 1).write(s.tag);
            }
            slot.ptr = p;
            slot.size = op.size;
        }
    }
    true
}

/// What a replay measures besides its total wall time.
pub enum Mode<'a> {
    /// Nothing: the throughput pass.
    Plain,
    /// Stop (between ops) once this instant has passed.
    Deadline(Instant),
    /// Per-op ticks into the slice (same length as the ops).
    Latency(&'a mut [u64]),
    /// Sample glibc's footprint.
    Footprint(&'a mut FootprintProbe),
}

/// Replays `ops` through a freshly reset `a` on the first `region` bytes of
/// the arena.
/// Live blocks are freed afterwards (untimed) only for the process allocator.
/// Returns the outcome and the elapsed wall time of the op loop.
pub fn replay<A: BenchAlloc>(
    a: &mut A,
    arena: &mut Arena,
    region: usize,
    ops: &[Op],
    nslots: usize,
    mode: Mode<'_>,
) -> (Outcome, Duration) {
    assert!(region <= arena.size);
    arena.slots.clear();
    arena.slots.resize(nslots, EMPTY);
    let (lo, hi) = if A::REGION_BASED {
        (arena.base as usize, arena.base as usize + region)
    } else {
        (0, usize::MAX)
    };
    // SAFETY: the region belongs to the arena, which outlives the run; all
    // blocks of the previous run are abandoned (the slots were cleared).
    if !unsafe { a.reset(arena.base, region) } {
        return (Outcome::Oom(0), Duration::ZERO);
    }
    let slots = &mut arena.slots[..];
    let mut outcome = Outcome::Done;
    let t0 = Instant::now();
    match mode {
        Mode::Latency(lat) => {
            for (i, (&op, l)) in ops.iter().zip(lat.iter_mut()).enumerate() {
                let t = timer::now();
                // SAFETY: `slots` was cleared with the reset above and the
                // stream is replayed from its start.
                let ok = unsafe { exec(a, op, i, slots, lo, hi) };
                *l = timer::now().wrapping_sub(t);
                if !ok {
                    outcome = Outcome::Oom(i);
                    break;
                }
            }
        }
        Mode::Footprint(fp) => {
            for (i, &op) in ops.iter().enumerate() {
                // SAFETY: `slots` was cleared with the reset above and the
                // stream is replayed from its start.
                let ok = unsafe { exec(a, op, i, slots, lo, hi) };
                if !ok {
                    outcome = Outcome::Oom(i);
                    break;
                }
                if op.kind != FREE {
                    fp.sample(i);
                }
            }
        }
        Mode::Deadline(deadline) => {
            for (i, &op) in ops.iter().enumerate() {
                if i > 0 && i.is_multiple_of(1024) && Instant::now() > deadline {
                    outcome = Outcome::Deadline(i);
                    break;
                }
                // SAFETY: `slots` was cleared with the reset above and the
                // stream is replayed from its start.
                let ok = unsafe { exec(a, op, i, slots, lo, hi) };
                if !ok {
                    outcome = Outcome::Oom(i);
                    break;
                }
            }
        }
        Mode::Plain => {
            for (i, &op) in ops.iter().enumerate() {
                // SAFETY: `slots` was cleared with the reset above and the
                // stream is replayed from its start.
                let ok = unsafe { exec(a, op, i, slots, lo, hi) };
                if !ok {
                    outcome = Outcome::Oom(i);
                    break;
                }
            }
        }
    }
    let elapsed = t0.elapsed();
    if !A::REGION_BASED {
        free_live(a, ops, slots, &outcome);
    }
    (outcome, elapsed)
}

/// Frees every block still live after running `ops` (up to the outcome).
fn free_live<A: BenchAlloc>(a: &mut A, ops: &[Op], slots: &mut [Slot], outcome: &Outcome) {
    let n = match *outcome {
        Outcome::Done => ops.len(),
        Outcome::Oom(i) | Outcome::Deadline(i) => i,
    };
    let mut live = vec![false; slots.len()];
    for op in &ops[..n] {
        match op.kind {
            ALLOC => live[op.slot as usize] = true,
            FREE => live[op.slot as usize] = false,
            _ => {}
        }
    }
    for (s, &l) in slots.iter_mut().zip(&live) {
        if l {
            // SAFETY: the slot is live per the stream prefix that ran.
            unsafe {
                a.dealloc(
                    s.ptr,
                    Layout::from_size_align_unchecked(s.size as usize, 1 << s.align_shift),
                )
            };
        }
        *s = EMPTY;
    }
}

/// Tracks the peak of glibc's footprint during a replay.
///
/// mallinfo2 walks glibc's free lists, far too slow to call after every op
/// with 100k live blocks. `arena` only changes when the program break moves,
/// which `sbrk(0)` reports cheaply, so mallinfo2 is called whenever the break
/// moved, plus every 4096th allocating op for mmapped memory (`hblkhd`).
pub struct FootprintProbe {
    last_brk: usize,
    /// Peak seen, bytes.
    pub peak: usize,
}

impl FootprintProbe {
    /// Probe starting from the current footprint.
    pub fn new() -> Self {
        FootprintProbe {
            last_brk: brk(),
            peak: glibc_footprint(),
        }
    }
    #[inline]
    fn sample(&mut self, i: usize) {
        let b = brk();
        if b != self.last_brk || i.is_multiple_of(4096) {
            self.last_brk = b;
            self.peak = self.peak.max(glibc_footprint());
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn brk() -> usize {
    // SAFETY: sbrk(0) only reads the current program break.
    unsafe { libc::sbrk(0) as usize }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn brk() -> usize {
    0
}
