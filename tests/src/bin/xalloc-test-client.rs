//! A client of xallocd for the multi-process tests.
//!
//! ```text
//! xalloc-test-client churn NAME THREADS MILLIS SEED
//!     THREADS threads each claim a slot and, for MILLIS ms, allocate random sizes (4 KiB to
//!     1 MiB), fill each block with a pattern of this process and thread, verify the patterns
//!     of the blocks they hold, and free them. Prints `ok OPS` (allocations plus frees) and
//!     exits 0, or prints what went wrong and exits 1.
//! xalloc-test-client hold NAME COUNT SIZE
//!     Allocates COUNT blocks of SIZE bytes, prints `held OFFSET...`, and sleeps until killed.
//! xalloc-test-client hold-then-free NAME COUNT SIZE
//!     Like `hold`, then waits for a line on stdin, checks that its blocks still hold its
//!     pattern, frees them (through the same slot and connection, whatever happened to the
//!     daemon meanwhile), prints `freed COUNT` and exits 0.
//! xalloc-test-client die-at PHASE NAME
//!     Kills itself with SIGKILL at PHASE: `claimed` (a slot claimed, before its Hello) or
//!     `submitted` (a request for 1 MiB submitted, before waiting for the answer), after
//!     allocating one 64 KiB block.
//! xalloc-test-client fill NAME SIZE
//!     Allocates blocks of SIZE bytes until one is refused, writing every page of each block (a
//!     page the daemon did not reserve would raise SIGBUS here), then tries 20 more. Prints
//!     `filled BLOCKS refused=STATUS... pmd_kib=KIB` (KIB: how much of this process's shared
//!     memory is mapped through huge pages, `ShmemPmdMapped`) and exits 0.
//! ```

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use xalloc_global::client::{Block, Connection, Slot};
use xalloc_tests::{pattern_byte as pattern, Rng};

/// Writes the pattern of `tag` at the first and last byte of each page of `b`, and its tag.
fn fill(b: &Block, tag: u64) {
    let p = b.as_ptr();
    let n = b.size as usize;
    for i in (0..n).step_by(4096).chain([n - 1]) {
        // SAFETY: `i < n`, inside the block, which this thread owns.
        unsafe { p.add(i).write_volatile(pattern(tag, i)) };
    }
}

fn verify(b: &Block, tag: u64) -> bool {
    let p = b.as_ptr();
    let n = b.size as usize;
    (0..n).step_by(4096).chain([n - 1]).all(|i| {
        // SAFETY: as in `fill`.
        unsafe { p.add(i).read_volatile() == pattern(tag, i) }
    })
}

fn churn(name: &str, threads: u64, millis: u64, seed: u64) -> Result<u64, String> {
    let conn = Connection::connect(name).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_millis(millis);
    let pid = u64::from(std::process::id());
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let conn = &conn;
                s.spawn(move || -> Result<u64, String> {
                    let mut slot = conn.claim().map_err(|e| format!("claim: {e}"))?;
                    let mut rng = Rng(seed ^ (pid << 20) ^ (t + 1).wrapping_mul(0x9e37_79b9));
                    let mut held: Vec<(Block, u64)> = Vec::new();
                    let mut ops = 0u64;
                    while Instant::now() < deadline {
                        let r = rng.next_u64();
                        if held.len() < 8 && (!r.is_multiple_of(3) || held.is_empty()) {
                            let size = 4096 + (rng.next_u64() % (1 << 20));
                            let b = slot
                                .allocate(size, 4096, r.is_multiple_of(5))
                                .map_err(|e| format!("allocate {size}: {e}"))?;
                            if b.size < size {
                                return Err(format!("block of {} for {size}", b.size));
                            }
                            let tag = (pid << 24) ^ (t << 16) ^ ops;
                            fill(&b, tag);
                            held.push((b, tag));
                        } else {
                            let (b, tag) = held.swap_remove((r as usize >> 8) % held.len());
                            if !verify(&b, tag) {
                                return Err(format!("block at {} was overwritten", b.offset));
                            }
                            slot.free(b.offset).map_err(|e| format!("free: {e}"))?;
                        }
                        ops += 1;
                    }
                    for (b, tag) in held {
                        if !verify(&b, tag) {
                            return Err(format!("block at {} was overwritten", b.offset));
                        }
                        slot.free(b.offset).map_err(|e| format!("free: {e}"))?;
                        ops += 1;
                    }
                    Ok(ops)
                })
            })
            .collect();
        let mut total = 0;
        for h in handles {
            total += h.join().map_err(|_| "thread panicked".to_owned())??;
        }
        Ok(total)
    })
}

/// Allocates `count` blocks of `size` bytes filled with the pattern of tag 1, and prints
/// `held OFFSET...`.
fn allocate_held(slot: &mut Slot<'_>, count: u64, size: u64) -> Result<Vec<Block>, String> {
    let mut blocks = Vec::new();
    let mut line = String::from("held");
    for _ in 0..count {
        let b = slot
            .allocate(size, 4096, false)
            .map_err(|e| format!("allocate: {e}"))?;
        fill(&b, 1);
        line.push_str(&format!(" {}", b.offset));
        blocks.push(b);
    }
    println!("{line}");
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    Ok(blocks)
}

fn hold(name: &str, count: u64, size: u64) -> Result<(), String> {
    let conn = Connection::connect(name).map_err(|e| e.to_string())?;
    let mut slot = conn.claim().map_err(|e| format!("claim: {e}"))?;
    allocate_held(&mut slot, count, size)?;
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn fill_up(name: &str, size: u64) -> Result<(), String> {
    let conn = Connection::connect(name).map_err(|e| e.to_string())?;
    let mut slot = conn.claim().map_err(|e| format!("claim: {e}"))?;
    let mut blocks = 0;
    let mut refusals = Vec::new();
    while refusals.len() < 20 {
        match slot.allocate(size, 4096, false) {
            Ok(b) => {
                // SAFETY: the block is ours; every page of it is written.
                unsafe { b.as_ptr().write_bytes(0x5a, b.size as usize) };
                blocks += 1;
            }
            Err(e) => refusals.push(format!("{e:?}")),
        }
    }
    refusals.dedup();
    let rollup = std::fs::read_to_string("/proc/self/smaps_rollup").map_err(|e| e.to_string())?;
    let pmd_kib = rollup
        .lines()
        .find_map(|l| l.strip_prefix("ShmemPmdMapped:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .ok_or("no ShmemPmdMapped in /proc/self/smaps_rollup")?;
    println!(
        "filled {blocks} refused={} pmd_kib={pmd_kib}",
        refusals.join(",")
    );
    Ok(())
}

fn hold_then_free(name: &str, count: u64, size: u64) -> Result<(), String> {
    let conn = Connection::connect(name).map_err(|e| e.to_string())?;
    let mut slot = conn.claim().map_err(|e| format!("claim: {e}"))?;
    let blocks = allocate_held(&mut slot, count, size)?;
    let mut go = String::new();
    std::io::stdin()
        .read_line(&mut go)
        .map_err(|e| e.to_string())?;
    for b in &blocks {
        if !verify(b, 1) {
            return Err(format!("block at {} was overwritten", b.offset));
        }
        slot.free(b.offset)
            .map_err(|e| format!("free of the block at {}: {e}", b.offset))?;
    }
    println!("freed {}", blocks.len());
    Ok(())
}

fn die_at(phase: &str, name: &str) -> Result<(), String> {
    let conn = Connection::connect(name).map_err(|e| e.to_string())?;
    let mut slot = conn.claim().map_err(|e| format!("claim: {e}"))?;
    slot.allocate(64 << 10, 4096, false)
        .map_err(|e| format!("allocate: {e}"))?;
    let pid = std::process::id();
    match phase {
        "claimed" => {
            let free = (0..conn.slot_count())
                .find(|&i| conn.request_slot(i).is_some_and(|s| s.try_claim(pid)))
                .ok_or("no free slot")?;
            conn.doorbell().note_claim(free);
        }
        "submitted" => {
            let rq = conn.request_slot(slot.index()).ok_or("slot")?;
            rq.submit(xalloc_proto::wire::Op::Allocate, 0, 1 << 20, 4096, 0);
            let bell = conn.doorbell();
            if bell.ring() {
                xalloc_proto::os::futex_wake(&bell.rings, 1);
            }
        }
        _ => return Err(format!("unknown phase {phase}")),
    }
    // SAFETY: raising a signal in our own process.
    unsafe { libc::raise(libc::SIGKILL) };
    Err("still alive after SIGKILL".into())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize| args.get(i).and_then(|s| s.parse::<u64>().ok());
    let result = match (args.first().map(String::as_str), args.get(1)) {
        (Some("churn"), Some(name)) => match (num(2), num(3), num(4)) {
            (Some(t), Some(ms), Some(seed)) => churn(name, t, ms, seed).map(|ops| {
                println!("ok {ops}");
            }),
            _ => Err("usage: churn NAME THREADS MILLIS SEED".into()),
        },
        (Some("die-at"), Some(phase)) => match args.get(2) {
            Some(name) => die_at(phase, name),
            None => Err("usage: die-at PHASE NAME".into()),
        },
        (Some("fill"), Some(name)) => match num(2) {
            Some(size) => fill_up(name, size),
            None => Err("usage: fill NAME SIZE".into()),
        },
        (Some("hold-then-free"), Some(name)) => match (num(2), num(3)) {
            (Some(c), Some(s)) => hold_then_free(name, c, s),
            _ => Err("usage: hold-then-free NAME COUNT SIZE".into()),
        },
        (Some("hold"), Some(name)) => match (num(2), num(3)) {
            (Some(c), Some(s)) => hold(name, c, s),
            _ => Err("usage: hold NAME COUNT SIZE".into()),
        },
        _ => Err(
            "usage: xalloc-test-client churn NAME THREADS MILLIS SEED | hold NAME COUNT SIZE"
                .into(),
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
