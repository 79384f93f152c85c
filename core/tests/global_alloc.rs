//! `LockedHeap` as a real `#[global_allocator]`: ordinary std code (Vec, String, BTreeMap,
//! HashMap, trait objects, threads) runs with every allocation of this test binary served from a
//! static buffer.
//!
//! The heap must be initialised before anything allocates, and std's runtime set-up allocates
//! before `main` (the main thread's name, for the stack-overflow handler). So the heap is
//! initialised from an ELF `.init_array` constructor, which the loader runs before std's set-up;
//! `main` calls the same initialisation again for targets without `.init_array` (on a heap that
//! already has its region, `try_init` refuses it and changes nothing). The binary has its own `main` (`harness = false` in Cargo.toml)
//! because libtest's harness would only add more allocations before the tests; it prints one line
//! per test and closes with `N passed, M failed`.

use std::alloc::{GlobalAlloc, Layout};
use std::cell::UnsafeCell;
use std::collections::{BTreeMap, HashMap};
use std::panic::{self, AssertUnwindSafe};
use std::sync::{Arc, Mutex};
use std::thread;

use xalloc_core::{InitError, LockedHeap};

/// Bytes in the static buffer the global allocator serves from.
#[cfg(not(miri))]
const ARENA_SIZE: usize = 8 << 20;
#[cfg(miri)]
const ARENA_SIZE: usize = 1 << 20;

/// Scale of the workloads; Miri is slow.
#[cfg(not(miri))]
const N: usize = 10_000;
#[cfg(miri)]
const N: usize = 200;

/// The heap's memory.
#[repr(C, align(4096))]
struct Arena(UnsafeCell<[u8; ARENA_SIZE]>);

// SAFETY: the bytes are reached only through `HEAP`, which serialises every access with its lock,
// and through the blocks it hands out, each owned by one caller at a time.
unsafe impl Sync for Arena {}

static ARENA: Arena = Arena(UnsafeCell::new([0; ARENA_SIZE]));

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

/// Whether `ptr` points into the arena, i.e. was served by `HEAP`.
fn in_arena<T: ?Sized>(ptr: *const T) -> bool {
    let base = ARENA.0.get().cast::<u8>().addr();
    (base..base + ARENA_SIZE).contains(&ptr.cast::<u8>().addr())
}

fn vec_growth() {
    let mut v: Vec<u64> = Vec::new();
    for i in 0..N as u64 * 10 {
        v.push(i * 3);
        assert!(in_arena(v.as_ptr()));
    }
    assert_eq!(v.len(), N * 10);
    assert!(v.iter().enumerate().all(|(i, &x)| x == i as u64 * 3));
    v.truncate(10);
    v.shrink_to_fit();
    assert!(in_arena(v.as_ptr()));
    assert_eq!(v, (0..10).map(|i| i * 3).collect::<Vec<u64>>());
}

fn strings() {
    let mut s = String::new();
    for i in 0..N {
        s.push_str(&i.to_string());
        s.push(',');
    }
    assert!(in_arena(s.as_ptr()));
    let parsed: Vec<usize> = s
        .split(',')
        .filter(|x| !x.is_empty())
        .map(|x| x.parse().unwrap())
        .collect();
    assert_eq!(parsed, (0..N).collect::<Vec<_>>());
    let upper = format!("{}-{}", "xalloc".to_uppercase(), N);
    assert_eq!(upper, format!("XALLOC-{N}"));
    assert!(in_arena(upper.as_ptr()));
}

fn btree_map() {
    let mut m = BTreeMap::new();
    for i in 0..N {
        m.insert(i, format!("value {i}"));
    }
    for i in (0..N).step_by(2) {
        assert_eq!(m.remove(&i), Some(format!("value {i}")));
    }
    assert_eq!(m.len(), N / 2);
    for (k, v) in &m {
        assert_eq!(k % 2, 1);
        assert_eq!(*v, format!("value {k}"));
        assert!(in_arena(v.as_ptr()));
    }
}

fn hash_map() {
    let mut m: HashMap<String, Vec<usize>> = HashMap::new();
    for i in 0..N {
        m.entry(format!("key {}", i % (N / 10)))
            .or_default()
            .push(i);
    }
    assert_eq!(m.len(), N / 10);
    for (k, v) in &m {
        assert!(in_arena(k.as_ptr()));
        assert!(in_arena(v.as_ptr()));
        assert_eq!(v.len(), 10);
        let j: usize = k.strip_prefix("key ").unwrap().parse().unwrap();
        assert!(v.iter().all(|&i| i % (N / 10) == j));
    }
    m.retain(|_, v| v[0] % 2 == 0);
    assert_eq!(m.len(), N / 20);
}

trait Shape {
    fn area(&self) -> u64;
}

struct Square(u64);

impl Shape for Square {
    fn area(&self) -> u64 {
        self.0 * self.0
    }
}

/// A large, over-aligned value: exercises alignments above the allocator's minimum.
#[repr(align(256))]
struct Page([u64; 64]);

impl Shape for Page {
    fn area(&self) -> u64 {
        self.0.iter().sum()
    }
}

/// Every third shape is a `Page`, the others `Square`s.
fn is_page(i: u64) -> bool {
    matches!(i % 3, 0)
}

fn boxed_trait_objects() {
    let mut shapes: Vec<Box<dyn Shape>> = Vec::new();
    for i in 0..N as u64 / 10 {
        if is_page(i) {
            shapes.push(Box::new(Page([i; 64])));
        } else {
            shapes.push(Box::new(Square(i)));
        }
    }
    for (i, s) in shapes.iter().enumerate() {
        let i = i as u64;
        let want = if is_page(i) { i * 64 } else { i * i };
        assert_eq!(s.area(), want);
        let p: *const dyn Shape = &**s;
        assert!(in_arena(p));
        if is_page(i) {
            assert_eq!(p.cast::<u8>().addr() & 255, 0, "Page box not 256-aligned");
        }
    }
}

fn threads() {
    let threads = if cfg!(miri) { 2 } else { 4 };
    let shared = Arc::new(Mutex::new(Vec::new()));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let shared = Arc::clone(&shared);
            thread::spawn(move || {
                let mut local = BTreeMap::new();
                for i in 0..N / 4 {
                    local.insert(i, vec![t as u8; i % 64 + 1]);
                    if i % 16 == 0 {
                        shared.lock().unwrap().push(format!("{t}:{i}"));
                    }
                }
                assert!(local.iter().all(|(i, v)| v.len() == i % 64 + 1));
                local.values().map(|v| v.len()).sum::<usize>()
            })
        })
        .collect();
    let per_thread: usize = (0..N / 4).map(|i| i % 64 + 1).sum();
    for h in handles {
        assert_eq!(h.join().unwrap(), per_thread);
    }
    let shared = shared.lock().unwrap();
    assert_eq!(shared.len(), threads * (N / 4).div_ceil(16));
    assert!(shared.iter().all(|s| in_arena(s.as_ptr())));
}

/// Straight through the `GlobalAlloc` interface: blocks come from the arena, realloc keeps
/// contents, and a request bigger than the arena fails with null rather than anything worse.
fn global_alloc_interface() {
    let layout = Layout::from_size_align(1000, 64).unwrap();
    // SAFETY: `layout` has a non-zero size.
    let p = unsafe { HEAP.alloc(layout) };
    assert!(!p.is_null());
    assert!(in_arena(p));
    assert_eq!(p.addr() % 64, 0);
    // SAFETY: `p` is a live block of 1000 bytes.
    unsafe { p.write_bytes(0xab, 1000) };
    // SAFETY: `p` was allocated with `layout`; the new size is non-zero.
    let q = unsafe { HEAP.realloc(p, layout, 5000) };
    assert!(!q.is_null());
    assert!(in_arena(q));
    // SAFETY: `q` is a live block of 5000 bytes, the first 1000 copied from `p`.
    let kept = unsafe { std::slice::from_raw_parts(q, 1000) };
    assert!(kept.iter().all(|&b| b == 0xab));
    // SAFETY: `q` was allocated with `layout`'s alignment and 5000 bytes.
    unsafe { HEAP.dealloc(q, Layout::from_size_align(5000, 64).unwrap()) };

    let huge = Layout::from_size_align(ARENA_SIZE * 2, 16).unwrap();
    // SAFETY: `huge` has a non-zero size.
    let p = unsafe { HEAP.alloc(huge) };
    assert!(
        p.is_null(),
        "an allocation twice the arena's size succeeded"
    );
}

/// Fill the arena with 64 KiB blocks until it refuses, free them, and the same number fit again.
fn exhaust_and_recover() {
    let layout = Layout::from_size_align(64 * 1024, 16).unwrap();
    let mut count = 0;
    let mut blocks = Vec::with_capacity(ARENA_SIZE / layout.size() + 1);
    for round in 0..2 {
        loop {
            // SAFETY: `layout` has a non-zero size.
            let p = unsafe { HEAP.alloc(layout) };
            if p.is_null() {
                break;
            }
            assert!(in_arena(p));
            blocks.push(p);
        }
        assert!(!blocks.is_empty());
        if round == 0 {
            count = blocks.len();
        } else {
            assert_eq!(
                blocks.len(),
                count,
                "fewer blocks fit after freeing them all"
            );
        }
        for p in blocks.drain(..) {
            // SAFETY: allocated above with `layout`, freed once.
            unsafe { HEAP.dealloc(p, layout) };
        }
    }
    // The arena works as before.
    let v = vec![7u8; 1024];
    assert!(v.iter().all(|&b| b == 7));
}

/// Gives `HEAP` the arena. Idempotent: on a heap that already has its region, `try_init` refuses
/// it with `AlreadyInitialized` and leaves the heap as it was.
extern "C" fn init_heap() {
    // SAFETY: 1. `ARENA` is `ARENA_SIZE` bytes that live for the whole program and are used by
    //    nothing but `HEAP`; 2. it runs before the first allocation (from the constructor below),
    //    or, as a second call, is refused and changes nothing.
    let result = unsafe { HEAP.try_init(ARENA.0.get().cast::<u8>(), ARENA_SIZE) };
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

/// Boxes passed by value and dropped inside the callee.
fn box_by_value() {
    #[inline(never)]
    fn consume(b: Box<[u64; 8]>) -> u64 {
        let sum = b.iter().sum();
        drop(b);
        sum
    }
    let keep: Vec<Box<[u64; 8]>> = (0..4).map(|i| Box::new([i; 8])).collect();
    for i in 0..16u64 {
        let _spacer = Box::new(i);
        assert_eq!(consume(Box::new([i; 8])), 8 * i);
    }
    assert!(keep.iter().enumerate().all(|(i, b)| b[7] == i as u64));
}

/// The size bins on, as a program would turn them on: large vectors grow, shrink and come and
/// go in threads; the heap stays consistent, and turning the bins off empties them.
fn size_bins_on() {
    HEAP.with(|h| h.set_size_bins(25));
    let workers: Vec<_> = (0..2u8)
        .map(|t| {
            std::thread::spawn(move || {
                let mut kept = Vec::new();
                // Up to 21 kept vectors of up to 80 KiB per thread: 3.4 MiB at most of the
                // 8 MiB arena (under Miri, 12 KiB and 25 rounds in 1 MiB).
                let (rounds, spread) = if cfg!(miri) {
                    (25, 8_000)
                } else {
                    (200, 60_000)
                };
                for i in 0..rounds {
                    let n = 1024 + (i * 7919 + t as usize * 104_729) % spread;
                    let mut v = vec![t; n];
                    v.resize(n + n / 3, t.wrapping_add(1));
                    assert!(v[..n].iter().all(|&b| b == t));
                    if i % 3 == 0 {
                        kept.push(v);
                    }
                    if kept.len() > 20 {
                        kept.swap_remove(i % kept.len());
                    }
                }
                kept.iter().map(Vec::len).sum::<usize>()
            })
        })
        .collect();
    for w in workers {
        assert!(w.join().unwrap() > 0);
    }
    // Nothing may panic while the heap is held: the panic would allocate from it.
    let (on, held, off) = HEAP.with(|h| {
        let on = h.check_invariants();
        let held = h.stats().quick_list_bytes;
        h.set_size_bins(0);
        (on, held, h.check_invariants())
    });
    on.unwrap();
    off.unwrap();
    // `small-code` compiles the bins out, with the quick lists.
    if cfg!(not(feature = "small-code")) {
        assert!(held > 0, "the bins held nothing");
    }
    // Only the quick lists (blocks under 1 KiB) may still hold blocks.
    let s = HEAP.stats();
    assert!(s.quick_list_bytes < ARENA_SIZE / 16, "{s:?}");
}

/// `HEAP`'s own counters see the program's allocations.
fn stats_track_allocations() {
    let before = HEAP.stats();
    assert!(before.region_bytes + 4096 > ARENA_SIZE, "{before:?}");
    let v = std::hint::black_box(vec![1u8; 100_000]);
    let during = HEAP.stats();
    assert!(in_arena(v.as_ptr()));
    assert_eq!(during.live_blocks, before.live_blocks + 1, "{during:?}");
    assert!(
        during.used_bytes >= before.used_bytes + 100_000,
        "{during:?}"
    );
    assert_eq!(during.region_bytes, before.region_bytes);
    drop(v);
    assert_eq!(HEAP.stats(), before);
}

fn main() {
    init_heap();
    assert!(
        in_arena(std::hint::black_box(Box::new(1u8)).as_ref()),
        "the heap was not initialised before std's runtime allocated"
    );

    let tests: &[(&str, fn())] = &[
        ("vec_growth", vec_growth),
        ("strings", strings),
        ("btree_map", btree_map),
        ("hash_map", hash_map),
        ("boxed_trait_objects", boxed_trait_objects),
        ("box_by_value", box_by_value),
        ("threads", threads),
        ("global_alloc_interface", global_alloc_interface),
        ("exhaust_and_recover", exhaust_and_recover),
        ("stats_track_allocations", stats_track_allocations),
        ("size_bins_on", size_bins_on),
    ];
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let (mut passed, mut failed) = (0, 0);
    for (name, f) in tests {
        if !filter.is_empty() && !filter.iter().any(|x| name.contains(x.as_str())) {
            continue;
        }
        match panic::catch_unwind(AssertUnwindSafe(f)) {
            Ok(()) => {
                println!("test {name} ... ok");
                passed += 1;
            }
            Err(_) => {
                println!("test {name} ... FAILED");
                failed += 1;
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
}
