//! A client of xallocd for the multi-process tests.
//!
//! ```text
//! xalloc-test-client churn NAME THREADS MILLIS SEED
//!     One connection; THREADS threads each claim a slot of its channel and, for MILLIS ms, allocate random sizes (4 KiB to
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
//!     Kills itself with SIGKILL at PHASE: `claimed` (a second slot of its channel claimed,
//!     with no request in it) or `submitted` (a request for 1 MiB submitted and rung, before
//!     waiting for the answer), after allocating one 64 KiB block.
//! xalloc-test-client scribble NAME MILLIS SEED
//!     A hostile client: makes the handshake by hand (keeping its descriptors), then for MILLIS
//!     ms writes garbage over its whole request channel, header included, and ringing and
//!     waking the daemon as it goes: random words on even passes, plausible forgeries on odd
//!     ones (every slot pending with a `Free` or `Reallocate` of a random granule of the arena,
//!     every ledger entry a released or cached block of the arena). Then tries to shrink and to
//!     grow its request channel and the arena, and to map its response channel writable.
//!     Prints `scribbled passes=N truncate_request=R grow_request=R truncate_arena=R
//!     grow_arena=R write_response=R`, each R `refused` or `done`, and exits 0 (every R should
//!     read `refused`).
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
    match phase {
        "claimed" => {
            conn.register()
                .map_err(|e| format!("claim a second slot: {e}"))?;
        }
        "submitted" => {
            let rq = conn.request_slot(slot.index()).ok_or("slot")?;
            rq.submit(xalloc_proto::wire::Op::Allocate, 0, 1 << 20, 4096, 0);
            conn.ring();
        }
        _ => return Err(format!("unknown phase {phase}")),
    }
    // SAFETY: raising a signal in our own process.
    unsafe { libc::raise(libc::SIGKILL) };
    Err("still alive after SIGKILL".into())
}

/// Whether a call that should be refused was (`-1`) or not.
fn outcome(rc: libc::c_int) -> &'static str {
    if rc == -1 {
        "refused"
    } else {
        "done"
    }
}

fn scribble(name: &str, millis: u64, seed: u64) -> Result<(), String> {
    use std::sync::atomic::{AtomicU64, Ordering};
    use xalloc_proto::os::{self, Mapping};
    use xalloc_proto::unix;
    use xalloc_proto::wire::{self, Hello, HelloKind, LedgerBlock, Op, Welcome};

    let path =
        std::ffi::CString::new(format!("/dev/shm/{name}.socket")).map_err(|e| e.to_string())?;
    let sock = unix::connect(&path).map_err(|e| format!("connect: {e}"))?;
    let hello = Hello {
        kind: HelloKind::Client,
        client_id: 0,
    };
    unix::send_with_fds(&sock, &hello.encode(), &[]).map_err(|e| format!("hello: {e}"))?;
    let mut buf = [0u8; 1024];
    let mut msg = unix::recv_with_fds(&sock, &mut buf, Duration::from_secs(5))
        .map_err(|e| format!("welcome: {e}"))?
        .ok_or("the daemon closed the connection")?;
    let (w, reason) = Welcome::decode(&buf[..msg.len]).map_err(|e| format!("welcome: {e}"))?;
    if w.refusal != 0 {
        return Err(format!("refused ({}): {reason}", w.refusal));
    }
    let (Some(arena), Some(request), Some(response)) =
        (msg.fds[0].take(), msg.fds[1].take(), msg.fds[2].take())
    else {
        return Err("a welcome without three descriptors".into());
    };
    let len = os::fstat(&request).map_err(|e| e.to_string())?.len as usize;
    let map = Mapping::new(&request, len, true).map_err(|e| format!("mmap: {e}"))?;
    let word = |i: usize| {
        // SAFETY: `i * 8 + 8 <= len`, inside the mapping, which is page-aligned; the daemon
        // reads this memory with atomics only.
        unsafe { AtomicU64::from_ptr(map.as_ptr().add(i * 8).cast()) }
    };
    let words = len / 8;
    let granules =
        (w.arena_len as usize).saturating_sub(wire::ARENA_DATA_OFFSET) / w.granule.max(1) as usize;
    let mut rng = Rng(seed | 1);
    let deadline = Instant::now() + Duration::from_millis(millis);
    let mut passes = 0u64;
    while Instant::now() < deadline {
        if passes.is_multiple_of(2) {
            for i in 0..words {
                word(i).store(rng.next_u64(), Ordering::Relaxed);
            }
        } else {
            // Forgeries that a careless daemon would act on: every slot asks to free or resize
            // a block of the arena, every ledger entry names one.
            for i in 0..w.slots {
                // SAFETY: in bounds (the channel holds `slots` slots), 64-aligned.
                let rq: &wire::RequestSlot = unsafe { map.at(wire::request_slot_offset(i)) };
                let g = rng.next_u64() % granules.max(1) as u64;
                let op = if rng.next_u64().is_multiple_of(2) {
                    Op::Free
                } else {
                    Op::Reallocate
                };
                rq.submit(op, 0, u64::from(w.granule), 0, g * u64::from(w.granule));
            }
            // SAFETY: in bounds and 64-aligned, as the layout says.
            let bell: &wire::ClientBell = unsafe { map.at(wire::BELL_OFFSET) };
            bell.note_claim(w.slots.saturating_sub(1));
            // SAFETY: as above.
            let ledger: &wire::Ledger = unsafe { map.at(wire::ledger_offset(w.slots)) };
            for e in &ledger.entries {
                let block = LedgerBlock {
                    offset: (rng.next_u64() % granules.max(1) as u64) as u32,
                    granules: 1 + (rng.next_u64() % 16) as u32,
                    released: rng.next_u64().is_multiple_of(2),
                };
                e.store(block.encode().unwrap_or(0), Ordering::Relaxed);
            }
            ledger.pending.store(1, Ordering::Release);
            bell.rings.fetch_add(1, Ordering::Release);
        }
        unix::send_wake(&sock);
        passes += 1;
    }
    let arena_len = os::fstat(&arena).map_err(|e| e.to_string())?.len as libc::off_t;
    // SAFETY: plain system calls on descriptors this process owns; a mapping that succeeds is
    // unmapped at once.
    let (truncate_request, grow_request, truncate_arena, grow_arena, write_response) = unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            response.raw(),
            0,
        );
        if p != libc::MAP_FAILED {
            libc::munmap(p, 4096);
        }
        (
            outcome(libc::ftruncate(request.raw(), 0)),
            outcome(libc::ftruncate(request.raw(), (len * 2) as libc::off_t)),
            outcome(libc::ftruncate(arena.raw(), 4096)),
            outcome(libc::ftruncate(arena.raw(), arena_len * 2)),
            outcome(if p == libc::MAP_FAILED { -1 } else { 0 }),
        )
    };
    println!(
        "scribbled passes={passes} truncate_request={truncate_request} \
         grow_request={grow_request} truncate_arena={truncate_arena} grow_arena={grow_arena} \
         write_response={write_response}"
    );
    Ok(())
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
        (Some("scribble"), Some(name)) => match (num(2), num(3)) {
            (Some(ms), Some(seed)) => scribble(name, ms, seed),
            _ => Err("usage: scribble NAME MILLIS SEED".into()),
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
            "usage: xalloc-test-client churn NAME THREADS MILLIS SEED | hold NAME COUNT SIZE | \
             hold-then-free NAME COUNT SIZE | die-at PHASE NAME | fill NAME SIZE | \
             scribble NAME MILLIS SEED"
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
