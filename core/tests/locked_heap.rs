//! `LockedHeap`'s own API under whichever lock the crate is built with: the spin lock by default,
//! the critical section with `--features critical-section` (whose `std` implementation, a
//! dev-dependency, is a global lock that the same thread may take again):
//!
//! - `init_from_slice`, `try_init` and `init` report misuse and leave the heap as it was;
//! - threads hammering one heap through `GlobalAlloc` keep its invariants and their bytes;
//! - with the critical section: allocating inside a critical section already held works, and a
//!   re-entry from inside `with` is refused (null, leaked free, panic) instead of aliasing.
//!
//! Each test has its own heap, not the global allocator (the harness allocates too).
#![cfg(any(
    feature = "critical-section",
    all(feature = "spin", target_has_atomic = "8")
))]

use std::alloc::{GlobalAlloc, Layout};
use std::mem::MaybeUninit;
use std::sync::{Barrier, Mutex};
use std::thread;

use xalloc_core::{InitError, LockedHeap, SmallLockedHeap};

/// Scale of the thread test; Miri is slow.
#[cfg(not(miri))]
const OPS: usize = 20_000;
#[cfg(miri)]
const OPS: usize = 300;

/// A leaked slice, recorded in [`LEAKED`] and never used from there.
struct Leaked(#[allow(dead_code)] *mut [MaybeUninit<u8>]);

// SAFETY: the pointer is never dereferenced; it only keeps the allocation reachable.
unsafe impl Send for Leaked {}

/// Every slice [`leak`] made, so that Miri's leak check counts those a heap refused as static
/// memory too.
static LEAKED: Mutex<Vec<Leaked>> = Mutex::new(Vec::new());

/// `len` bytes that are nobody's but the caller's, for good.
fn leak(len: usize) -> &'static mut [MaybeUninit<u8>] {
    let mem = Box::leak(vec![MaybeUninit::uninit(); len].into_boxed_slice());
    LEAKED.lock().unwrap().push(Leaked(&raw mut *mem));
    mem
}

#[test]
fn init_from_slice_once() {
    static HEAP: LockedHeap = LockedHeap::empty();
    HEAP.init_from_slice(leak(64 * 1024)).unwrap();
    let before = HEAP.stats();
    assert!(before.region_bytes > 64 * 1024 - 64, "{before:?}");
    assert_eq!(before.live_blocks, 0);
    // A second slice is refused and stays unused; the heap is unchanged.
    assert_eq!(
        HEAP.init_from_slice(leak(4096)),
        Err(InitError::AlreadyInitialized)
    );
    assert_eq!(HEAP.stats(), before);
    // The heap works.
    let layout = Layout::from_size_align(1000, 64).unwrap();
    // SAFETY: a non-zero-size layout; the block is freed once, with the same layout.
    unsafe {
        let p = HEAP.alloc(layout);
        assert!(!p.is_null() && p.addr().is_multiple_of(64));
        p.write_bytes(0xA5, 1000);
        assert_eq!(HEAP.stats().live_blocks, 1);
        HEAP.dealloc(p, layout);
    }
    // The freed block may wait on a quick list, unmerged.
    HEAP.with(|heap| heap.trim());
    assert_eq!(HEAP.stats(), before);
}

#[test]
fn init_from_slice_too_small() {
    static HEAP: SmallLockedHeap = SmallLockedHeap::empty();
    assert_eq!(HEAP.init_from_slice(leak(8)), Err(InitError::TooSmall));
    // Still empty: allocation fails, and a usable slice is accepted afterwards.
    // SAFETY: a non-zero-size layout.
    assert!(unsafe { HEAP.alloc(Layout::new::<u64>()) }.is_null());
    HEAP.init_from_slice(leak(16 * 1024)).unwrap();
    // SAFETY: as above; the block is freed once, with the same layout.
    unsafe {
        let p = HEAP.alloc(Layout::new::<u64>());
        assert!(!p.is_null());
        HEAP.dealloc(p, Layout::new::<u64>());
    }
}

#[test]
fn try_init_reports_and_add_region_extends() {
    static HEAP: LockedHeap = LockedHeap::empty();
    let (a, b) = (leak(8192), leak(8192));
    // SAFETY: `a` and `b` are leaked, so they live for good and are used by nothing else.
    unsafe {
        assert_eq!(
            HEAP.try_init(a.as_mut_ptr().cast(), 4),
            Err(InitError::TooSmall)
        );
        HEAP.try_init(a.as_mut_ptr().cast(), a.len()).unwrap();
        assert_eq!(
            HEAP.try_init(b.as_mut_ptr().cast(), b.len()),
            Err(InitError::AlreadyInitialized)
        );
        // More memory goes through `with` (a heap built with `small-code` takes one region).
        let one = HEAP.stats().region_bytes;
        let added = HEAP.with(|heap| heap.add_region(b.as_mut_ptr().cast(), b.len()));
        if cfg!(feature = "small-code") {
            assert_eq!(added, Err(InitError::TooManyRegions));
        } else {
            added.unwrap();
            // (Each region loses up to 38 bytes to alignment and its end sentinel.)
            assert!(HEAP.stats().region_bytes > one + b.len() - 64);
        }
    }
    HEAP.with(|heap| heap.check_invariants()).unwrap();
}

/// `init` on a heap that has its memory fails a debug assertion that says what to do.
#[cfg(debug_assertions)]
#[test]
#[should_panic(expected = "initialise it once")]
fn init_twice_asserts() {
    static HEAP: LockedHeap = LockedHeap::empty();
    let (a, b) = (leak(4096), leak(4096));
    // SAFETY: `a` and `b` are leaked, so they live for good and are used by nothing else.
    unsafe {
        HEAP.init(a.as_mut_ptr().cast(), a.len());
        HEAP.init(b.as_mut_ptr().cast(), b.len());
    }
}

/// `init` with a region too small for a block fails a debug assertion.
#[cfg(debug_assertions)]
#[test]
#[should_panic(expected = "give it a larger region")]
fn init_too_small_asserts() {
    static HEAP: LockedHeap = LockedHeap::empty();
    let a = leak(8);
    // SAFETY: `a` is leaked, so it lives for good and is used by nothing else.
    unsafe { HEAP.init(a.as_mut_ptr().cast(), a.len()) }
}

/// Without debug assertions, a refused `init` leaves the heap as it was.
#[cfg(not(debug_assertions))]
#[test]
fn init_twice_keeps_the_heap() {
    static HEAP: LockedHeap = LockedHeap::empty();
    let (a, b) = (leak(4096), leak(8192));
    // SAFETY: `a` and `b` are leaked, so they live for good and are used by nothing else.
    unsafe {
        HEAP.init(a.as_mut_ptr().cast(), a.len());
        let before = HEAP.stats();
        HEAP.init(b.as_mut_ptr().cast(), b.len());
        assert_eq!(HEAP.stats(), before);
    }
}

/// A small xorshift generator: the test needs no quality, only no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A live block of the thread test: where, how laid out, and the byte it is filled with.
struct Live {
    ptr: *mut u8,
    layout: Layout,
    fill: u8,
}

/// Whether every byte of `b` still holds its fill.
fn intact(b: &Live) -> bool {
    // SAFETY: `b.ptr` is a live block of at least `b.layout.size()` bytes owned by this thread.
    unsafe { std::slice::from_raw_parts(b.ptr, b.layout.size()) }
        .iter()
        .all(|&x| x == b.fill)
}

/// One thread's share: allocate, grow and free blocks of random sizes and alignments, each
/// filled with its own byte and checked before it is reallocated or freed.
fn hammer<const FL: usize, const SL: usize, const SB: usize>(
    heap: &LockedHeap<FL, SL, SB>,
    seed: u64,
) {
    let mut rng = Rng(seed | 1);
    let mut live: Vec<Live> = Vec::new();
    for i in 0..OPS {
        let op = rng.below(10);
        if live.len() < 48 && (op < 5 || live.is_empty()) {
            let max = if rng.below(8) == 0 { 2048 } else { 96 };
            let size = 1 + rng.below(max);
            let layout = Layout::from_size_align(size, 1 << rng.below(7)).unwrap();
            // SAFETY: a non-zero-size layout.
            let ptr = unsafe { heap.alloc(layout) };
            if ptr.is_null() {
                continue; // full for now: other threads free soon
            }
            assert!(ptr.addr().is_multiple_of(layout.align()));
            let fill = (seed as u8) ^ (i as u8);
            // SAFETY: a fresh block of `size` bytes.
            unsafe { ptr.write_bytes(fill, size) };
            live.push(Live { ptr, layout, fill });
        } else if op < 7 {
            let k = rng.below(live.len());
            let b = &mut live[k];
            assert!(intact(b), "block overwritten by another thread");
            let new_size = 1 + rng.below(512);
            // SAFETY: `b.ptr` is a live block of `heap` with `b.layout`; `new_size` is small.
            let ptr = unsafe { heap.realloc(b.ptr, b.layout, new_size) };
            if ptr.is_null() {
                continue; // the old block is untouched
            }
            let kept = b.layout.size().min(new_size);
            // SAFETY: `ptr` is the block, `new_size` bytes, its first `kept` bytes copied over.
            unsafe {
                assert!(std::slice::from_raw_parts(ptr, kept)
                    .iter()
                    .all(|&x| x == b.fill));
                ptr.write_bytes(b.fill, new_size);
            }
            b.ptr = ptr;
            b.layout = Layout::from_size_align(new_size, b.layout.align()).unwrap();
        } else {
            let b = live.swap_remove(rng.below(live.len()));
            assert!(intact(&b), "block overwritten by another thread");
            // SAFETY: `b.ptr` is a live block of `heap` with `b.layout`, freed once.
            unsafe { heap.dealloc(b.ptr, b.layout) };
        }
    }
    for b in live {
        assert!(intact(&b), "block overwritten by another thread");
        // SAFETY: as above.
        unsafe { heap.dealloc(b.ptr, b.layout) };
    }
}

/// Threads hammer one heap; one more checks its invariants between their operations. Afterwards
/// the heap is one free block again.
fn threads_keep_invariants<const FL: usize, const SL: usize, const SB: usize>(
    heap: &'static LockedHeap<FL, SL, SB>,
    bytes: usize,
) {
    const THREADS: usize = 4;
    heap.init_from_slice(leak(bytes)).unwrap();
    let empty = heap.stats();
    let start = Barrier::new(THREADS + 1);
    thread::scope(|s| {
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                let start = &start;
                s.spawn(move || {
                    start.wait();
                    hammer(heap, 0x9E37_79B9_7F4A_7C15_u64.wrapping_mul(t as u64 + 1));
                })
            })
            .collect();
        start.wait();
        while !workers.iter().all(|w| w.is_finished()) {
            heap.with(|h| h.check_invariants()).unwrap();
            thread::yield_now();
        }
    });
    heap.with(|h| h.check_invariants()).unwrap();
    heap.with(|h| h.trim());
    heap.with(|h| h.check_invariants()).unwrap();
    let after = heap.stats();
    assert_eq!(after, empty);
    assert_eq!((after.live_blocks, after.free_blocks), (0, 1));
}

#[test]
fn threads_keep_invariants_default() {
    static HEAP: LockedHeap = LockedHeap::empty();
    threads_keep_invariants(&HEAP, 1 << 20);
}

#[test]
fn threads_keep_invariants_small() {
    static HEAP: SmallLockedHeap = SmallLockedHeap::empty();
    threads_keep_invariants(&HEAP, 64 * 1024);
}

/// The critical section's own behaviour: it may be entered again by the same context, so the
/// heap guards against re-entry itself.
#[cfg(feature = "critical-section")]
mod critical_section_lock {
    use super::*;

    /// An allocation made while the caller already holds a critical section (as an interrupt
    /// handler's caller might, or code that masks interrupts around a driver call) works: the
    /// nested critical section is entered again, and the heap is not in use.
    #[test]
    fn allocate_inside_a_held_critical_section() {
        static HEAP: LockedHeap = LockedHeap::empty();
        HEAP.init_from_slice(leak(16 * 1024)).unwrap();
        let layout = Layout::from_size_align(200, 16).unwrap();
        critical_section::with(|_| {
            // SAFETY: a non-zero-size layout; each block is freed once with it.
            unsafe {
                let p = HEAP.alloc(layout);
                assert!(!p.is_null());
                let q = critical_section::with(|_| HEAP.realloc(p, layout, 400));
                assert!(!q.is_null());
                assert_eq!(HEAP.stats().live_blocks, 1);
                HEAP.dealloc(q, Layout::from_size_align(400, 16).unwrap());
            }
        });
        assert_eq!(HEAP.stats().live_blocks, 0);
    }

    /// From inside `with`, the heap is in use: an allocation through `GlobalAlloc` returns null
    /// (as it would if an interrupt handler got in), a reallocation returns null and keeps the
    /// block, and a free leaks its block. Nothing is corrupted.
    #[test]
    fn reentry_from_with_is_refused() {
        static HEAP: LockedHeap = LockedHeap::empty();
        HEAP.init_from_slice(leak(16 * 1024)).unwrap();
        let layout = Layout::from_size_align(64, 8).unwrap();
        // SAFETY: a non-zero-size layout.
        let outside = unsafe { HEAP.alloc(layout) };
        assert!(!outside.is_null());
        let live = HEAP.with(|heap| {
            // SAFETY: a non-zero-size layout; `outside` is live with `layout`.
            unsafe {
                assert!(HEAP.alloc(layout).is_null());
                assert!(HEAP.realloc(outside, layout, 128).is_null());
                HEAP.dealloc(outside, layout);
            }
            heap.stats().live_blocks
        });
        assert_eq!(live, 1);
        // The free was dropped: the block is still counted, and still usable.
        assert_eq!(HEAP.stats().live_blocks, 1);
        HEAP.with(|heap| heap.check_invariants()).unwrap();
        // SAFETY: `outside` is still live with `layout`; freed once.
        unsafe { HEAP.dealloc(outside, layout) };
        assert_eq!(HEAP.stats().live_blocks, 0);
    }

    /// A nested `with` panics (outside `GlobalAlloc`, where a panic is allowed); the heap is
    /// usable afterwards.
    #[test]
    fn nested_with_panics() {
        static HEAP: LockedHeap = LockedHeap::empty();
        HEAP.init_from_slice(leak(16 * 1024)).unwrap();
        let caught = std::panic::catch_unwind(|| HEAP.with(|_| HEAP.stats()));
        let message = *caught.unwrap_err().downcast::<&str>().unwrap();
        assert!(message.contains("in use by the same context"), "{message}");
        assert_eq!(HEAP.stats().live_blocks, 0);
    }

    /// A thread that holds a critical section keeps every other thread out of the heap.
    #[test]
    fn critical_section_excludes_other_threads() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::time::Duration;

        static HEAP: LockedHeap = LockedHeap::empty();
        static HELD: AtomicBool = AtomicBool::new(false);
        HEAP.init_from_slice(leak(16 * 1024)).unwrap();
        let layout = Layout::new::<[u64; 4]>();
        let (tx, rx) = std::sync::mpsc::channel();
        let worker = critical_section::with(|_| {
            HELD.store(true, Ordering::SeqCst);
            let worker = thread::spawn(move || {
                // SAFETY: a non-zero-size layout; freed once with it.
                unsafe {
                    let p = HEAP.alloc(layout);
                    tx.send(HELD.load(Ordering::SeqCst)).unwrap();
                    HEAP.dealloc(p, layout);
                }
            });
            thread::sleep(Duration::from_millis(if cfg!(miri) { 1 } else { 50 }));
            // Still waiting for the critical section.
            assert!(rx.try_recv().is_err());
            HELD.store(false, Ordering::SeqCst);
            worker
        });
        worker.join().unwrap();
        // The thread allocated only once the critical section was released.
        assert!(!rx.recv().unwrap());
    }
}
