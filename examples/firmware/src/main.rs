//! xalloc-core as the global allocator of a Cortex-M4 firmware, run in QEMU's `mps2-an386` board
//! by `scripts/firmware.sh` (or `cargo run` in this directory).
//!
//! The heap is a [`SmallLockedHeap`] over 32 KiB of RAM: for a heap this size its state (under
//! 1 KiB) costs far less than the default [`LockedHeap`](xalloc_core::LockedHeap)'s 6.8 KiB
//! would, and its coarser size classes cost little. It locks with a critical section
//! (xalloc-core's `critical-section` feature, cortex-m's `critical-section-single-core`: interrupts
//! masked), so the SysTick handler allocates and frees too. The program checks, and panics (exit
//! status 1) on the first failure:
//!
//! 1. A SysTick made pending while the main code holds the heap (inside `LockedHeap::with`) is
//!    held back until the main code lets go, and then allocates. (Under a spin lock it would
//!    preempt the main code and spin forever.)
//! 2. With SysTick firing every 100 µs, the main code builds and drops `Vec`s, `String`s and a
//!    `BTreeMap` while the handler allocates, keeps and frees blocks of its own: every value stays
//!    intact, the heap's invariants hold, the handler allocated, and it interrupted the main code
//!    in the middle of allocator calls.
//! 3. A request larger than the heap fails cleanly (`try_reserve`).
//! 4. Once everything is dropped, the heap is one free block again.
//!
//! Then it prints the heap's statistics and exits with status 0 through semihosting. A panic (an
//! infallible allocation that fails ends in one too, through the allocation error handler) or a
//! HardFault prints what happened and exits with status 1.

#![no_std]
#![no_main]

extern crate alloc;

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;
use core::alloc::{GlobalAlloc, Layout};
use core::cell::RefCell;
use core::fmt::Write as _;
use core::mem::MaybeUninit;
use core::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};

use cortex_m::peripheral::scb::VectActive;
use cortex_m::peripheral::syst::SystClkSource;
use cortex_m::peripheral::SCB;
use cortex_m_rt::{entry, exception, ExceptionFrame};
use cortex_m_semihosting::{debug, hio, hprintln};
use xalloc_core::{SmallLockedHeap, Stats};

/// Bytes of RAM given to the heap.
const HEAP_SIZE: usize = 32 * 1024;

/// The heap. The global allocator is [`Probe`], which forwards every call here.
static HEAP: SmallLockedHeap = SmallLockedHeap::empty();

#[global_allocator]
static ALLOCATOR: Probe = Probe;

/// Instrumentation for this demonstration, not needed in a real firmware (which would put
/// `#[global_allocator]` on `HEAP` itself): forwards to [`HEAP`], counting the calls made from
/// interrupt handlers and flagging the main code's calls, so that the SysTick handler can tell
/// that it interrupted one.
struct Probe;

/// Allocations (`alloc` and `realloc`) made by interrupt handlers.
static HANDLER_ALLOCS: AtomicU32 = AtomicU32::new(0);
/// Frees made by interrupt handlers.
static HANDLER_FREES: AtomicU32 = AtomicU32::new(0);
/// Set while the main code is inside a call to the allocator.
static MAIN_IN_ALLOCATOR: AtomicBool = AtomicBool::new(false);
/// SysTick handler runs so far.
static TICKS: AtomicU32 = AtomicU32::new(0);
/// SysTick handler runs that found the main code inside a call to the allocator.
static TICKS_IN_ALLOCATOR: AtomicU32 = AtomicU32::new(0);

/// Adds one to a counter that only the SysTick handler (one priority, never preempted by
/// itself) writes: a load and a store, which Cortex-M0 has too.
fn bump(counter: &AtomicU32) {
    counter.store(counter.load(Relaxed).wrapping_add(1), Relaxed);
}

/// Runs `op`, an allocator call: counted in `handler_counter` from an interrupt handler,
/// flagged in [`MAIN_IN_ALLOCATOR`] from the main code.
fn probed<R>(handler_counter: &AtomicU32, op: impl FnOnce() -> R) -> R {
    if SCB::vect_active() == VectActive::ThreadMode {
        MAIN_IN_ALLOCATOR.store(true, Relaxed);
        let r = op();
        MAIN_IN_ALLOCATOR.store(false, Relaxed);
        r
    } else {
        bump(handler_counter);
        op()
    }
}

// SAFETY: every call forwards to `HEAP` with the caller's arguments, so `HEAP`'s `GlobalAlloc`
// contract is this one's.
unsafe impl GlobalAlloc for Probe {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract.
        probed(&HANDLER_ALLOCS, || unsafe { HEAP.alloc(layout) })
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded contract.
        probed(&HANDLER_FREES, || unsafe { HEAP.dealloc(ptr, layout) })
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded contract.
        probed(&HANDLER_ALLOCS, || unsafe {
            HEAP.realloc(ptr, layout, new_size)
        })
    }
}

/// How many blocks the SysTick handler keeps, so that its blocks interleave with the main code's.
const KEEP: usize = 16;

/// The blocks the SysTick handler keeps, oldest first. Block `b` holds `b[i] == i ^ b[0]`.
static KEPT: critical_section::Mutex<RefCell<Vec<Box<[u32]>>>> =
    critical_section::Mutex::new(RefCell::new(Vec::new()));

/// Whether a block of the SysTick handler still holds its pattern.
fn intact(block: &[u32]) -> bool {
    (0..block.len()).all(|i| block[i] == i as u32 ^ block[0])
}

/// Allocates a block and a string, keeps the block for [`KEEP`] runs, and frees the oldest.
#[exception]
fn SysTick() {
    let tick = TICKS.load(Relaxed).wrapping_add(1);
    TICKS.store(tick, Relaxed);
    if MAIN_IN_ALLOCATOR.load(Relaxed) {
        bump(&TICKS_IN_ALLOCATOR);
    }
    let len = 1 + (tick as usize * 37) % 96;
    let block: Box<[u32]> = (0..len as u32).map(|i| i ^ tick).collect();
    let mut label = String::new();
    write!(label, "tick {tick}: {len} words").unwrap();
    assert!(label.starts_with("tick "), "handler's string: {label}");
    // Pushing may grow the vector: an allocation inside a critical section already held.
    let oldest = critical_section::with(|cs| {
        let mut kept = KEPT.borrow_ref_mut(cs);
        let oldest = (kept.len() == KEEP).then(|| kept.remove(0));
        kept.push(block);
        oldest
    });
    if let Some(oldest) = oldest {
        assert!(
            intact(&oldest),
            "a block kept by the SysTick handler changed"
        );
    }
}

/// Prints the heap's counters.
fn print_stats(when: &str, s: &Stats) {
    hprintln!(
        "{when}: region {} B, used {} B, free {} B, largest free {} B, {} live blocks, {} free blocks, {} B on quick lists",
        s.region_bytes,
        s.used_bytes,
        s.free_bytes,
        s.largest_free_bytes,
        s.live_blocks,
        s.free_blocks,
        s.quick_list_bytes
    );
}

/// Check 1: a SysTick made pending while the main code holds the heap waits for it.
fn pended_interrupt_waits_for_the_heap() {
    let (ticks, allocs) = (TICKS.load(Relaxed), HANDLER_ALLOCS.load(Relaxed));
    let layout = Layout::new::<[u32; 8]>();
    let (block, ticks_inside) = HEAP.with(|heap| {
        SCB::set_pendst();
        cortex_m::asm::dsb();
        cortex_m::asm::isb();
        let block = heap.allocate(layout).expect("room for 32 bytes");
        (block, TICKS.load(Relaxed))
    });
    cortex_m::asm::isb();
    assert_eq!(
        ticks_inside, ticks,
        "SysTick ran while the main code held the heap"
    );
    assert_eq!(
        TICKS.load(Relaxed),
        ticks + 1,
        "the pended SysTick did not run"
    );
    assert!(
        HANDLER_ALLOCS.load(Relaxed) > allocs,
        "the SysTick handler did not allocate"
    );
    // SAFETY: `block` came from this heap with `layout` and is freed once.
    unsafe { HEAP.with(|heap| heap.deallocate(block, layout)) };
    hprintln!(
        "check 1: a SysTick pended while the main code held the heap ran after it, and allocated"
    );
}

/// Check 2: collections in the main code while the SysTick handler allocates and frees.
fn collections_under_interrupts() {
    const MIN_TICKS: u32 = 300;
    const MAX_ROUNDS: u32 = 100_000;
    let mut log: BTreeMap<u32, String> = BTreeMap::new();
    let mut round = 0u32;
    let start_ticks = TICKS.load(Relaxed);
    while TICKS.load(Relaxed) - start_ticks < MIN_TICKS || TICKS_IN_ALLOCATOR.load(Relaxed) == 0 {
        round += 1;
        assert!(
            round < MAX_ROUNDS,
            "SysTick ran {} times in {round} rounds ({} of them inside an allocator call)",
            TICKS.load(Relaxed) - start_ticks,
            TICKS_IN_ALLOCATOR.load(Relaxed)
        );
        // A vector grown one element at a time (reallocations), then checked.
        let n = 8 + round % 200;
        let reading = |k: u32| k.wrapping_mul(2_654_435_761) ^ round;
        let mut readings: Vec<u32> = Vec::new();
        for k in 0..n {
            readings.push(reading(k));
        }
        assert!(
            (0..n).all(|k| readings[k as usize] == reading(k)),
            "a vector changed"
        );
        // A string built from it.
        let mut line = String::new();
        for r in readings.iter().take(12) {
            write!(line, "{:x},", r & 0xfff).unwrap();
        }
        // A map of the last 48 lines, keyed by round.
        let mut entry = String::with_capacity(line.len() + 12);
        write!(entry, "{round}:{line}").unwrap();
        log.insert(round, entry);
        if log.len() > 48 {
            let (old_round, old) = log.pop_first().unwrap();
            let (key, _) = old.split_once(':').expect("a map entry lost its separator");
            assert_eq!(key.parse::<u32>(), Ok(old_round), "a map entry changed");
        }
        if round.is_multiple_of(512) {
            HEAP.with(|heap| heap.check_invariants())
                .expect("heap invariants");
        }
    }
    let s = HEAP.stats();
    HEAP.with(|heap| heap.check_invariants())
        .expect("heap invariants");
    hprintln!(
        "check 2: {round} rounds of Vec, String and BTreeMap work under {} SysTicks; the handler \
         made {} allocations and {} frees, and interrupted the main code inside an allocator \
         call {} times",
        TICKS.load(Relaxed) - start_ticks,
        HANDLER_ALLOCS.load(Relaxed),
        HANDLER_FREES.load(Relaxed),
        TICKS_IN_ALLOCATOR.load(Relaxed)
    );
    print_stats("heap in use", &s);
    assert!(
        HANDLER_FREES.load(Relaxed) > 0,
        "the SysTick handler never freed"
    );
}

#[entry]
fn main() -> ! {
    // `#[entry]` turns this into a `&'static mut` that nothing else can reach.
    static mut HEAP_MEM: [MaybeUninit<u8>; HEAP_SIZE] = [MaybeUninit::uninit(); HEAP_SIZE];
    HEAP.init_from_slice(HEAP_MEM).expect("heap memory");
    hprintln!(
        "xalloc-core SmallLockedHeap ({} bytes of state) over {HEAP_SIZE} bytes, critical-section lock",
        core::mem::size_of::<SmallLockedHeap>()
    );
    print_stats("empty heap", &HEAP.stats());

    let mut core = cortex_m::Peripherals::take().unwrap();
    pended_interrupt_waits_for_the_heap();

    // SysTick every 100 µs of the 25 MHz core clock.
    core.SYST.set_clock_source(SystClkSource::Core);
    core.SYST.set_reload(2_500 - 1);
    core.SYST.clear_current();
    core.SYST.enable_interrupt();
    core.SYST.enable_counter();
    collections_under_interrupts();
    core.SYST.disable_interrupt();
    core.SYST.disable_counter();

    // Check 3: more than the heap has fails cleanly.
    let mut too_big: Vec<u8> = Vec::new();
    assert!(
        too_big.try_reserve(2 * HEAP_SIZE).is_err(),
        "a 64 KiB reservation succeeded"
    );
    hprintln!("check 3: a 64 KiB request is refused without a panic");

    // Check 4: everything freed, the heap is one free block again.
    let kept = critical_section::with(|cs| core::mem::take(&mut *KEPT.borrow_ref_mut(cs)));
    assert!(
        kept.iter().all(|b| intact(b)),
        "a block kept by the SysTick handler changed"
    );
    drop(kept);
    let s = HEAP.stats();
    print_stats("all freed", &s);
    assert_eq!((s.live_blocks, s.used_bytes), (0, 0), "{s:?}");
    // Small freed blocks may wait whole on the quick lists; trimming merges them back.
    HEAP.with(|heap| heap.trim());
    let s = HEAP.stats();
    print_stats("trimmed", &s);
    assert_eq!(
        (
            s.live_blocks,
            s.used_bytes,
            s.free_blocks,
            s.quick_list_bytes
        ),
        (0, 0, 1, 0),
        "{s:?}"
    );
    hprintln!("check 4: all freed and trimmed, the heap is one free block again");

    #[cfg(feature = "oom")]
    {
        hprintln!(
            "oom: allocating {} bytes (must end in the panic handler)",
            2 * HEAP_SIZE
        );
        let v: Vec<u8> = Vec::with_capacity(2 * HEAP_SIZE);
        core::hint::black_box(v);
    }

    hprintln!("firmware: all checks passed");
    debug::exit(debug::EXIT_SUCCESS);
    loop {
        cortex_m::asm::wfi();
    }
}

/// Reports `what` on the host's stderr and exits with status 1. Writes straight to a fresh
/// stderr handle: no lock that the failing code might hold, no allocation.
fn fail(what: core::fmt::Arguments) -> ! {
    cortex_m::interrupt::disable();
    if let Ok(mut stderr) = hio::hstderr() {
        // The `oom` build is meant to end here (scripts/firmware.sh checks that it does): its log
        // should not read like a failure.
        let verdict = if cfg!(feature = "oom") {
            "stopped as the oom build must"
        } else {
            "FAILED"
        };
        let _ = writeln!(stderr, "firmware: {verdict}: {what}");
    }
    debug::exit(debug::EXIT_FAILURE);
    loop {
        cortex_m::asm::bkpt();
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    fail(format_args!("{info}"))
}

#[exception]
unsafe fn HardFault(frame: &ExceptionFrame) -> ! {
    fail(format_args!("HardFault at pc {:#010x}", frame.pc()))
}
