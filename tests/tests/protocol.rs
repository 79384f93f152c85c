//! The request protocol with real processes: concurrent round trips from several processes and
//! threads, every malformed request, and a client's death.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use xalloc_proto::wire::{Op, Request, Response, Status, PENDING};
use xalloc_global::client::{Connection, RequestError};

#[test]
fn processes_and_threads_round_trip_concurrently() {
    let d = TestDaemon::start("churn", &["--arena-size", "128M"]);
    let clients: Vec<_> = (0..3)
        .map(|i| {
            Command::new(CLIENT)
                .args(["churn", &d.name, "4", "1500", &(1000 + i).to_string()])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut total = 0u64;
    for c in clients {
        let out = c.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "client failed: {text}");
        total += text
            .trim()
            .strip_prefix("ok ")
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("client output: {text}"));
    }
    assert!(total > 100, "only {total} operations in 1.5 s");
    // Everything was freed by the clients themselves, and every request was answered.
    let s = d.status();
    assert_eq!(s["used_bytes"], "0", "{s:?}");
    assert_eq!(s["live_blocks"], "0", "{s:?}");
    assert_eq!(s["errors"], "0", "{s:?}");
    // Each op is one request; plus a hello and a goodbye per thread.
    assert_eq!(d.stat("requests"), total + 3 * 4 * 2);
    assert!(d.stats_line().contains("heap check ok"));
}

/// A request as a test writes it; `seq` is filled in by [`raw`].
fn req(owner: u32, op: u32, flags: u32, size: u64, align: u64, offset: u64) -> Request {
    Request {
        owner,
        seq: 0,
        op,
        flags,
        cpu: 0,
        size,
        align,
        offset,
    }
}

/// Writes `r` straight into request slot `i` (whatever its owner), rings, and waits for the
/// answer.
fn raw(conn: &Connection, i: u32, r: Request) -> Response {
    let Request {
        owner,
        op,
        flags,
        size,
        align,
        offset,
        ..
    } = r;
    let rq = conn.request_slot(i).unwrap();
    let rs = conn.response_slot(i).unwrap();
    rq.owner.store(owner, Ordering::Relaxed);
    rq.op.store(op, Ordering::Relaxed);
    rq.flags.store(flags, Ordering::Relaxed);
    rq.size.store(size, Ordering::Relaxed);
    rq.align.store(align, Ordering::Relaxed);
    rq.offset.store(offset, Ordering::Relaxed);
    let seq = rq.seq.load(Ordering::Relaxed).wrapping_add(1);
    rq.seq.store(seq, Ordering::Relaxed);
    rq.state.store(PENDING, Ordering::Release);
    let bell = conn.doorbell();
    bell.note_claim(i);
    bell.ring();
    xalloc_proto::os::futex_wake(&bell.rings, 1);
    let t = Instant::now();
    loop {
        if let Some(r) = rs.read(seq) {
            return r;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "no answer");
        std::thread::yield_now();
    }
}

/// The counters a refused request must not change.
fn heap_counters(d: &TestDaemon) -> Vec<String> {
    let s = d.status();
    [
        "used_bytes",
        "free_bytes",
        "largest_free_bytes",
        "live_blocks",
        "clients",
    ]
    .iter()
    .map(|k| s[*k].clone())
    .collect()
}

#[test]
fn every_malformed_request_gets_its_own_status_and_changes_nothing() {
    let d = TestDaemon::start("bad", &["--arena-size", "16M", "--slots", "8"]);
    let conn = Connection::connect(&d.name).unwrap();
    let me = std::process::id();

    // Another process holds a block (for the ownership check).
    let mut other = Child(
        Command::new(CLIENT)
            .args(["hold", &d.name, "1", "8192"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    BufReader::new(other.0.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    let theirs: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("hold printed {line:?}"));

    let mut slot = conn.claim().unwrap();
    let i = slot.index();
    // Our own blocks: a 3-page block, and a used neighbour right after it.
    let mine = slot.allocate(3 * 4096, 4096, false).unwrap();
    let _neighbour = slot.allocate(4096, 4096, false).unwrap();
    let freed = slot.allocate(4096, 4096, false).unwrap();
    slot.free(freed.offset).unwrap();

    let before = heap_counters(&d);
    let errors_before = d.stat("errors");
    let arena = conn.arena_len() as u64;
    let (alloc, free, realloc) = (Op::Allocate as u32, Op::Free as u32, Op::Reallocate as u32);
    let m = mine.offset;
    #[rustfmt::skip]
    let cases: Vec<(&str, Request, Status)> = vec![
        // (what, request (owner, op, flags, size, align, offset), expected status)
        ("unknown op", req(me, 99, 0, 4096, 4096, 0), Status::UnknownOp),
        ("op zero", req(me, 0, 0, 0, 0, 0), Status::UnknownOp),
        ("zero size", req(me, alloc, 0, 0, 4096, 0), Status::BadSize),
        ("size beyond the arena", req(me, alloc, 0, arena + 1, 4096, 0), Status::BadSize),
        ("size overflowing", req(me, alloc, 0, u64::MAX, 4096, 0), Status::BadSize),
        ("alignment 0", req(me, alloc, 0, 4096, 0, 0), Status::BadAlign),
        ("alignment not a power of two", req(me, alloc, 0, 4096, 3 << 12, 0), Status::BadAlign),
        ("alignment too large", req(me, alloc, 0, 4096, 1 << 40, 0), Status::BadAlign),
        ("unknown flag", req(me, alloc, 0x80, 4096, 4096, 0), Status::BadFlags),
        ("flag on free", req(me, free, 1, 0, 0, m), Status::BadFlags),
        ("free out of range", req(me, free, 0, 0, 0, arena + 4096), Status::BadOffset),
        ("free far out of range", req(me, free, 0, 0, 0, u64::MAX), Status::BadOffset),
        ("free misaligned", req(me, free, 0, 0, 0, m + 8), Status::BadOffset),
        ("free inside a block", req(me, free, 0, 0, 0, m + 4096), Status::BadOffset),
        ("double free", req(me, free, 0, 0, 0, freed.offset), Status::AlreadyFree),
        ("free another client's block", req(me, free, 0, 0, 0, theirs), Status::NotOwner),
        ("resize another client's block", req(me, realloc, 0, 4096, 0, theirs), Status::NotOwner),
        ("resize to zero", req(me, realloc, 0, 0, 0, m), Status::BadSize),
        ("resize beyond the arena", req(me, realloc, 0, arena * 2, 0, m), Status::BadSize),
        ("grow with a used neighbour", req(me, realloc, 0, 8 * 4096, 0, m), Status::NotInPlace),
        ("resize a free block", req(me, realloc, 0, 4096, 0, freed.offset), Status::AlreadyFree),
        ("owner field forged", req(me + 1, free, 0, 0, 0, m), Status::BadSlot),
    ];
    // Every refusal counts as an error except NotInPlace, an ordinary answer to a resize.
    let refused_cases = cases
        .iter()
        .filter(|(_, _, want)| *want != Status::NotInPlace)
        .count() as u64;
    for (what, request, want) in cases {
        let r = raw(&conn, i, request);
        assert_eq!(Status::from_u32(r.status), Some(want), "{what}");
        assert_eq!(heap_counters(&d), before, "{what} changed the heap");
    }
    // Restore the real owner: the slot still works.
    let r = raw(&conn, i, req(me, alloc, 0, 4096, 4096, 0));
    assert_eq!(Status::from_u32(r.status), Some(Status::Ok));
    let r = raw(&conn, i, req(me, free, 0, 0, 0, r.offset));
    assert_eq!(Status::from_u32(r.status), Some(Status::Ok));

    // A slot claimed without Hello, and Hellos for processes that do not exist.
    let j = (i + 1) % conn.slot_count();
    let r = raw(&conn, j, req(me, alloc, 0, 4096, 4096, 0));
    assert_eq!(
        Status::from_u32(r.status),
        Some(Status::BadSlot),
        "no hello"
    );
    let r = raw(&conn, j, req(0, Op::Hello as u32, 0, 0, 0, 0));
    assert_eq!(
        Status::from_u32(r.status),
        Some(Status::BadSlot),
        "hello from pid 0"
    );
    let r = raw(&conn, j, req(0x3fff_fff0, Op::Hello as u32, 0, 0, 0, 0));
    assert_eq!(
        Status::from_u32(r.status),
        Some(Status::BadSlot),
        "hello from no process"
    );
    conn.request_slot(j)
        .unwrap()
        .owner
        .store(0, Ordering::Relaxed);
    assert_eq!(heap_counters(&d), before);

    // Every refusal was counted, and the heap is intact.
    let refused = refused_cases + 3;
    assert_eq!(d.stat("errors"), errors_before + refused);
    assert!(d.stats_line().contains("heap check ok"));
    assert!(d.alive());
    // A normal request still works through the safe API.
    assert_eq!(
        slot.resize(mine.offset, 4096).map(|b| b.size),
        Ok(4096),
        "shrink in place"
    );
    assert_eq!(
        slot.free(theirs),
        Err(RequestError::Refused(Status::NotOwner))
    );
}

#[test]
fn a_killed_client_gets_its_blocks_and_slot_reclaimed() {
    let d = TestDaemon::start("death", &[]);
    let mut child = Child(
        Command::new(CLIENT)
            .args(["hold", &d.name, "5", "100000"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    BufReader::new(child.0.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("held "), "{line}");
    let s = d.status();
    assert_eq!(s["live_blocks"], "5");
    assert_eq!(s["clients"], "1");
    assert_eq!(s["slots"], "1");
    d.stats_line();
    let holder = format!(
        "client {}: 5 blocks, {} bytes (0 of them cached for reuse), 1 slots",
        child.0.id(),
        5 * 102_400
    );
    assert!(
        d.wait_for(Duration::from_secs(5), || d.log().contains(&holder))
            .is_some(),
        "per-client line {holder:?}: {}",
        d.log()
    );
    assert!(d.stat("used_bytes") >= 5 * 100_000);

    let killed = Instant::now();
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    let took = d
        .wait_for(Duration::from_secs(5), || {
            let s = d.status();
            s["used_bytes"] == "0" && s["clients"] == "0" && s["slots"] == "0"
        })
        .expect("blocks, client and slot reclaimed within 5 s");
    eprintln!(
        "reclaimed {:?} after the kill ({:?} after reaping)",
        killed.elapsed(),
        took
    );
    assert!(d.log().contains("reclaimed 5 blocks"), "{}", d.log());
    // The slot is free for the next client.
    let conn = Connection::connect(&d.name).unwrap();
    let mut slot = conn.claim().unwrap();
    let b = slot.allocate(100_000, 4096, false).unwrap();
    slot.free(b.offset).unwrap();
}

#[test]
fn a_slot_claimed_by_a_process_that_died_before_hello_is_freed() {
    let d = TestDaemon::start("unregistered", &["--arena-size", "1M", "--slots", "4"]);
    let conn = Connection::connect(&d.name).unwrap();
    // A process that has exited: its pid is free (and, this soon, not reused).
    let mut gone = Command::new("true").spawn().unwrap();
    let dead = gone.id();
    gone.wait().unwrap();
    let rq = conn.request_slot(2).unwrap();
    assert!(rq.try_claim(dead), "slot 2 free");
    conn.doorbell().note_claim(2);
    // Any event from the watcher (here SIGHUP) makes the daemon sweep such slots.
    d.stats_line();
    assert!(
        d.wait_for(Duration::from_secs(5), || rq.owner.load(Ordering::Acquire)
            == 0)
            .is_some(),
        "slot claimed by a dead process was not freed"
    );
    assert!(d.log().contains("exited before registering"));
}

#[test]
fn idle_pages_beyond_retain_go_back_to_the_kernel_and_read_as_fresh_zeros() {
    let d = TestDaemon::start(
        "decay",
        &["--arena-size", "32M", "--retain", "2M", "--decay", "0.2"],
    );
    let conn = Connection::connect(&d.name).unwrap();
    let mut slot = conn.claim().unwrap();
    let size = 8u64 << 20;
    let b = slot.allocate(size, 4096, false).unwrap();
    assert!(b.zeroed, "fresh pages at first");
    // SAFETY: the block is ours, `size` bytes long.
    unsafe { b.as_ptr().write_bytes(0xab, size as usize) };
    assert!(d.stat("resident_bytes") >= size);
    slot.free(b.offset).unwrap();
    // Idle for 0.2 s, then returned down to the 2 MiB retained.
    let decayed = d.wait_for(Duration::from_secs(5), || {
        d.stat("resident_bytes") <= 2 << 20
    });
    assert!(decayed.is_some(), "{:?}", d.status());
    let b = slot.allocate(size, 4096, false).unwrap();
    // SAFETY: as above.
    let bytes = unsafe { std::slice::from_raw_parts(b.as_ptr(), size as usize) };
    let punched_part = bytes.iter().filter(|&&x| x == 0).count() as u64;
    assert!(
        punched_part >= size - (2 << 20),
        "pages returned to the kernel read as zeros: {punched_part} of {size}"
    );
    slot.free(b.offset).unwrap();
    assert!(d.stats_line().contains("heap check ok"));
}
