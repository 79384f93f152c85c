//! Replays one benchmark stream through one allocator twice, the second time inside
//! [`measured`], so that `valgrind --tool=callgrind --toggle-collect=instructions::measured`
//! counts the instructions of exactly one warm replay: the allocator's work per operation plus
//! the harness's, which is the same for every allocator. `scripts/bench-instructions.sh` runs it
//! for every allocator and prints the table.
//!
//! Usage: `instructions ALLOCATOR WORKLOAD` (xalloc, xalloc-bins, talc, rlsf, buddy, dlmalloc; random-1k,
//! random-100k, large, realloc). The streams are `xalloc-bench --quick`'s.

#[path = "../allocs.rs"]
#[allow(dead_code)]
mod allocs;
#[path = "../runner.rs"]
#[allow(dead_code)]
mod runner;
#[path = "../timer.rs"]
#[allow(dead_code)]
mod timer;
#[path = "../workload.rs"]
#[allow(dead_code)]
mod workload;

use allocs::{BenchAlloc, Buddy, Dl, Rlsf, Talc, Xalloc, XallocBins};
use runner::{replay, Arena, Mode, Outcome};
use workload::Workload;

/// The region every allocator gets (random-100k needs more than 64 MiB).
const REGION: usize = 128 << 20;

/// The replay that callgrind counts.
#[inline(never)]
fn measured<A: BenchAlloc>(a: &mut A, arena: &mut Arena, wl: &Workload) -> Outcome {
    replay(a, arena, REGION, &wl.ops, wl.slots, Mode::Plain).0
}

fn run<A: BenchAlloc>(wl: &Workload) -> Result<(), String> {
    let mut arena = Arena::new(REGION);
    let mut a = A::create();
    // The first replay warms the caches and the allocator's code paths alike.
    let _ = replay(&mut *a, &mut arena, REGION, &wl.ops, wl.slots, Mode::Plain);
    match measured(&mut *a, &mut arena, wl) {
        Outcome::Done => Ok(()),
        Outcome::Oom(i) => Err(format!("{}: out of memory at op #{i}", A::NAME)),
        Outcome::Deadline(_) => unreachable!("no deadline was set"),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [alloc, name] = args.as_slice() else {
        eprintln!("usage: instructions ALLOCATOR WORKLOAD");
        std::process::exit(2);
    };
    // `xalloc-bench --quick`'s streams (seeds 1 to 4).
    let wl = match name.as_str() {
        "random-1k" => workload::random_mix("random-1k", 1, 1_000, 50_000, 16, 4096),
        "random-100k" => workload::random_mix("random-100k", 2, 100_000, 120_000, 16, 4096),
        "large" => workload::random_mix("large", 3, 100, 10_000, 4096, 1 << 20),
        "realloc" => workload::realloc_walk("realloc", 4, 1_000, 50_000, 16, 64 << 10),
        _ => {
            eprintln!("unknown workload {name:?}");
            std::process::exit(2);
        }
    };
    let result = match alloc.as_str() {
        "xalloc" => run::<Xalloc>(&wl),
        "xalloc-bins" => run::<XallocBins>(&wl),
        "talc" => run::<Talc>(&wl),
        "rlsf" => run::<Rlsf>(&wl),
        "buddy" => run::<Buddy>(&wl),
        "dlmalloc" => run::<Dl>(&wl),
        _ => Err(format!("unknown allocator {alloc:?}")),
    };
    if let Err(e) = result {
        eprintln!("instructions: {e}");
        std::process::exit(1);
    }
    // The op count, for the script's division.
    println!("{}", wl.ops.len());
}
