//! The firmware use of xalloc-core, simulated on the host.
//!
//! A firmware image gives `LockedHeap` a static byte array as its heap and installs it as the
//! `#[global_allocator]`; from then on `alloc`'s `Vec`, `String` and `BTreeMap` work as anywhere
//! else. This program does the same on the host with a 64 KiB array (every allocation of the
//! process, std's own included, is served from it), runs a small sensor-logging workload, and
//! prints the heap's statistics along the way.
//!
//! One difference from firmware: on the host, std's runtime allocates before `main` runs, so the
//! heap is initialised from an ELF `.init_array` constructor. On a microcontroller, call
//! `HEAP.init_from_slice` first thing in the entry function instead (see the README, and the
//! firmware in `examples/firmware/`).

use std::cell::UnsafeCell;
use std::collections::BTreeMap;
use std::fmt::Write as _;

use xalloc_core::{InitError, LockedHeap, Stats};

/// The size of the heap, as a small microcontroller might give it.
const HEAP_SIZE: usize = 64 * 1024;

/// The heap's memory: what a firmware places in `.bss`.
struct HeapMem(UnsafeCell<[u8; HEAP_SIZE]>);

// SAFETY: the bytes are reached only through `HEAP`, which serialises access with its lock, and
// through the blocks it hands out, each owned by one caller at a time.
unsafe impl Sync for HeapMem {}

static HEAP_MEM: HeapMem = HeapMem(UnsafeCell::new([0; HEAP_SIZE]));

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

/// Gives `HEAP` its memory. A second call changes nothing: `try_init` refuses it with
/// `AlreadyInitialized`.
extern "C" fn init_heap() {
    // SAFETY: 1. `HEAP_MEM` is `HEAP_SIZE` bytes that live for the whole program and are used by
    //    nothing but `HEAP`; 2. this runs before the first allocation (from the constructor
    //    below), or, as a second call, is refused and changes nothing.
    let result = unsafe { HEAP.try_init(HEAP_MEM.0.get().cast::<u8>(), HEAP_SIZE) };
    assert!(
        matches!(result, Ok(()) | Err(InitError::AlreadyInitialized)),
        "{result:?}"
    );
}

/// Runs `init_heap` before std's runtime set-up, which allocates.
#[cfg(target_os = "linux")]
#[used]
#[link_section = ".init_array"]
static INIT_HEAP: extern "C" fn() = init_heap;

fn print_stats(when: &str) {
    // Copy the counters out first: the lock must not be held while printing allocates.
    let s: Stats = HEAP.stats();
    println!(
        "{when:<22} used {:>6} B  free {:>6} B  largest free {:>6} B  live blocks {:>4}  free blocks {:>3}",
        s.used_bytes, s.free_bytes, s.largest_free_bytes, s.live_blocks, s.free_blocks
    );
}

/// One sample from a pretend sensor: a slow sine-like wave from integer arithmetic.
fn sample(t: u32) -> i16 {
    let phase = (t % 64) as i32;
    let tri = if phase < 32 { phase } else { 64 - phase };
    (tri * 100 - 1600) as i16
}

fn main() {
    // For targets without `.init_array`; on Linux the constructor already did it.
    init_heap();
    println!("xalloc-core LockedHeap over a static {HEAP_SIZE}-byte array");
    // std's runtime already holds a few blocks (the main thread's name and the like).
    print_stats("after init");

    // Configuration, as firmware might parse it from flash.
    let mut config: BTreeMap<&str, u32> = BTreeMap::new();
    config.insert("sample_rate_hz", 100);
    config.insert("window", 256);
    config.insert("threshold", 1200);
    let window = config["window"] as usize;

    // A window of sensor samples and a log of threshold crossings.
    let mut samples: Vec<i16> = Vec::with_capacity(window);
    let mut log = String::new();
    let mut crossings = 0u32;
    for t in 0..2_000u32 {
        if samples.len() == window {
            samples.remove(0);
        }
        let v = sample(t);
        let threshold = config["threshold"] as i32;
        let was_below = samples.last().is_none_or(|&p| i32::from(p) <= threshold);
        samples.push(v);
        if i32::from(v) > threshold && was_below {
            crossings += 1;
            // Keep the last few lines only, as a ring of log text would.
            if log.len() > 512 {
                let cut = log.find('\n').map_or(0, |i| i + 1);
                log.drain(..cut);
            }
            writeln!(log, "t={t} value={v} over threshold").unwrap();
        }
    }
    print_stats("after sampling");

    // Per-bucket histogram of the window, in a map.
    let mut histogram: BTreeMap<i16, u32> = BTreeMap::new();
    for &v in &samples {
        *histogram.entry(v / 500 * 500).or_default() += 1;
    }
    print_stats("with histogram");

    let mean = samples.iter().map(|&v| i64::from(v)).sum::<i64>() / samples.len() as i64;
    println!(
        "window of {} samples, mean {mean}, {crossings} threshold crossings, {} buckets",
        samples.len(),
        histogram.len()
    );
    println!("last log line: {}", log.lines().last().unwrap_or("(none)"));

    drop((samples, log, histogram, config));
    print_stats("after dropping all");
}
