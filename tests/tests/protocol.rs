//! The request protocol with real processes: concurrent round trips from several processes and
//! threads, every malformed request written straight into the test's own channel, the
//! connection as the unit of ownership, and a client's death.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use xalloc_global::client::{Connection, RequestError};
use xalloc_proto::wire::{LedgerBlock, Op, Response, Status, PENDING, STATE_STOPPING};

/// The daemon's status document, asked over its socket from this process (what `xallocd status
/// --json` prints, with `client_list`, the rows of `status --clients --json`).
fn status_doc(d: &TestDaemon) -> Value {
    let names = xalloc_daemon::segments::Names::new(&d.name).expect("instance name");
    xalloc_daemon::status::ask_status(&names).expect("status over the socket")
}

/// Field `key` of a status document (or of one of its client rows) as a number.
fn num(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no number {key:?} in {v}"))
}

/// The row of `status --clients` for client `id`.
fn row(doc: &Value, id: u32) -> Value {
    doc["client_list"]
        .as_array()
        .expect("client_list")
        .iter()
        .find(|c| num(c, "id") == u64::from(id))
        .unwrap_or_else(|| panic!("no client {id} in {doc}"))
        .clone()
}

/// Starts `xalloc-test-client hold NAME COUNT SIZE` and returns it with the offsets it holds.
fn spawn_holder(name: &str, count: u64, size: u64) -> (Child, Vec<u64>) {
    let mut c = Child(
        Command::new(CLIENT)
            .args(["hold", name, &count.to_string(), &size.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    BufReader::new(c.0.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    let offsets = line
        .strip_prefix("held")
        .unwrap_or_else(|| panic!("hold printed {line:?}"))
        .split_whitespace()
        .map(|o| o.parse().unwrap())
        .collect();
    (c, offsets)
}

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
    // The connections close with the processes.
    assert!(
        d.wait_for(Duration::from_secs(5), || num(&status_doc(&d), "clients")
            == 0)
            .is_some(),
        "{}",
        status_doc(&d)
    );
    // Everything was freed by the clients themselves, and every request was answered.
    let s = status_doc(&d);
    assert_eq!(num(&s, "used_bytes"), 0, "{s}");
    assert_eq!(num(&s, "live_blocks"), 0, "{s}");
    assert_eq!(num(&s, "errors"), 0, "{s}");
    // Each operation is one request: no handshake goes through the channel.
    assert_eq!(num(&s, "requests"), total, "{s}");
    assert!(d.stats_line().contains("heap check ok"));
}

/// A request's fields as a test writes them: `[op, flags, size, align, offset]`, the op a raw
/// code and op and flags truncated to their 32 bits.
type Fields = [u64; 5];

/// Writes `fields` straight into slot `i` of `conn`'s channel, rings, and waits for the answer.
fn raw(conn: &Connection, i: u32, fields: Fields) -> Response {
    let seq = submit_raw(conn, i, fields);
    conn.ring();
    answer_within(conn, i, seq, Duration::from_secs(5)).expect("no answer within 5 s")
}

/// Writes `fields` into slot `i` and marks it pending, without ringing; returns its `seq`.
/// A known op goes through `RequestSlot::submit`; an unknown code is written field by field
/// the same way.
fn submit_raw(conn: &Connection, i: u32, [op, flags, size, align, offset]: Fields) -> u32 {
    let rq = conn.request_slot(i).expect("slot in the channel");
    let (op, flags) = (op as u32, flags as u32);
    match Op::from_u32(op) {
        Some(op) => rq.submit(op, flags, size, align, offset),
        None => {
            rq.op.store(op, Ordering::Relaxed);
            rq.flags.store(flags, Ordering::Relaxed);
            rq.size.store(size, Ordering::Relaxed);
            rq.align.store(align, Ordering::Relaxed);
            rq.offset.store(offset, Ordering::Relaxed);
            let seq = rq.seq.load(Ordering::Relaxed).wrapping_add(1);
            rq.seq.store(seq, Ordering::Relaxed);
            rq.state.store(PENDING, Ordering::Release);
            seq
        }
    }
}

/// The answer to request `seq` of slot `i`, if it comes within `limit`.
fn answer_within(conn: &Connection, i: u32, seq: u32, limit: Duration) -> Option<Response> {
    let rs = conn.response_slot(i).expect("slot in the channel");
    let t = Instant::now();
    loop {
        if let Some(r) = rs.read(seq) {
            return Some(r);
        }
        if t.elapsed() > limit {
            return None;
        }
        std::thread::yield_now();
    }
}

/// What a refused request must not change: the heap's counters, the number of clients and
/// processes, and what each client holds.
fn heap_state(doc: &Value) -> Vec<String> {
    let mut v: Vec<String> = [
        "used_bytes",
        "free_bytes",
        "largest_free_bytes",
        "live_blocks",
        "clients",
        "processes",
        "reserved_bytes",
    ]
    .iter()
    .map(|k| format!("{k}={}", doc[*k]))
    .collect();
    for c in doc["client_list"].as_array().expect("client_list") {
        v.push(format!(
            "client {} pid {}: {} bytes, {} blocks, {} cached",
            c["id"], c["pid"], c["bytes"], c["blocks"], c["cached_bytes"]
        ));
    }
    v
}

#[test]
fn every_malformed_request_gets_its_own_status_and_changes_nothing() {
    const MIB: u64 = 1 << 20;
    let d = TestDaemon::start(
        "bad",
        &[
            "--arena-size",
            "16M",
            "--slots",
            "8",
            "--client-quota",
            "8M",
        ],
    );
    let conn = Connection::connect(&d.name).unwrap();
    let arena = conn.arena_len() as u64;
    assert_eq!(arena, 16 * MIB);

    // Two other processes hold most of the arena (for the ownership check, and so that an
    // allocation within this process's quota finds no room; each is within its own quota).
    let (_other, theirs) = spawn_holder(&d.name, 1, 6 * MIB);
    let (_third, _) = spawn_holder(&d.name, 1, 6 * MIB);
    let theirs = theirs[0];
    // Another connection of this same process holds a block: not ours either.
    let sibling = Connection::connect(&d.name).unwrap();
    let sibling_block = sibling
        .claim()
        .unwrap()
        .allocate(4096, 4096, false)
        .unwrap();

    let i = conn.register().unwrap();
    // Our own blocks: a 3-page block, and a used neighbour right after it.
    let mine = conn.allocate(i, 3 * 4096, 4096, false).unwrap();
    let neighbour = conn.allocate(i, 4096, 4096, false).unwrap();
    assert_eq!(
        neighbour.offset,
        mine.offset + 3 * 4096,
        "neighbour right after"
    );
    let freed = conn.allocate(i, 4096, 4096, false).unwrap();
    conn.free(i, freed.offset).unwrap();

    let before = status_doc(&d);
    assert_eq!(num(&before, "client_quota"), 8 * MIB, "{before}");
    let (errors0, requests0) = (num(&before, "errors"), num(&before, "requests"));
    let my_requests0 = num(&row(&before, conn.client_id()), "requests");
    let state = heap_state(&before);

    let (alloc, free, realloc) = (Op::Allocate as u64, Op::Free as u64, Op::Reallocate as u64);
    let (share, open, close) = (Op::Share as u64, Op::Open as u64, Op::Close as u64);
    let (send, receive) = (Op::Send as u64, Op::Receive as u64);
    let m = mine.offset;
    let s = sibling_block.offset;
    #[rustfmt::skip]
    let cases: Vec<(&str, Fields, Status)> = vec![
        // (what, [op, flags, size, align, offset], expected status)
        ("op 0", [0, 0, 4096, 4096, 0], Status::UnknownOp),
        ("op 1 (was Hello)", [1, 0, 0, 0, 0], Status::UnknownOp),
        ("op 2 (was Goodbye)", [2, 0, 0, 0, 0], Status::UnknownOp),
        ("op 11", [11, 0, 4096, 4096, 0], Status::UnknownOp),
        ("op 12", [12, 0, 0, 0, m], Status::UnknownOp),
        ("op 99", [99, 0, 4096, 4096, 0], Status::UnknownOp),
        ("op u32::MAX", [u32::MAX as u64, 0, 4096, 4096, 0], Status::UnknownOp),
        ("zero size", [alloc, 0, 0, 4096, 0], Status::BadSize),
        ("size beyond the arena", [alloc, 0, arena + 1, 4096, 0], Status::BadSize),
        ("size overflowing", [alloc, 0, u64::MAX, 4096, 0], Status::BadSize),
        ("alignment 0", [alloc, 0, 4096, 0, 0], Status::BadAlign),
        ("alignment not a power of two", [alloc, 0, 4096, 3 << 12, 0], Status::BadAlign),
        ("alignment above 1 GiB", [alloc, 0, 4096, 1 << 31, 0], Status::BadAlign),
        ("alignment far too large", [alloc, 0, 4096, 1 << 40, 0], Status::BadAlign),
        ("unknown allocate flag", [alloc, 0x80, 4096, 4096, 0], Status::BadFlags),
        ("flag on free", [free, 1, 0, 0, m], Status::BadFlags),
        ("flag on resize", [realloc, 1, 4096, 0, m], Status::BadFlags),
        ("view off a page", [alloc, 0, 4096, 4096, 8], Status::BadOffset),
        ("free out of range", [free, 0, 0, 0, arena + 4096], Status::BadOffset),
        ("free far out of range", [free, 0, 0, 0, u64::MAX], Status::BadOffset),
        ("free misaligned", [free, 0, 0, 0, m + 8], Status::BadOffset),
        ("free inside a block", [free, 0, 0, 0, m + 4096], Status::BadOffset),
        ("resize misaligned", [realloc, 0, 4096, 0, m + 8], Status::BadOffset),
        ("resize out of range", [realloc, 0, 4096, 0, arena], Status::BadOffset),
        ("double free", [free, 0, 0, 0, freed.offset], Status::AlreadyFree),
        ("resize a free block", [realloc, 0, 4096, 0, freed.offset], Status::AlreadyFree),
        ("free another process's block", [free, 0, 0, 0, theirs], Status::NotOwner),
        ("resize another process's block", [realloc, 0, 4096, 0, theirs], Status::NotOwner),
        ("free another connection's block", [free, 0, 0, 0, s], Status::NotOwner),
        ("resize another connection's block", [realloc, 0, 8192, 0, s], Status::NotOwner),
        ("resize to zero", [realloc, 0, 0, 0, m], Status::BadSize),
        ("resize beyond the arena", [realloc, 0, arena * 2, 0, m], Status::BadSize),
        ("grow with a used neighbour", [realloc, 0, 8 * 4096, 0, m], Status::NotInPlace),
        ("no free block fits", [alloc, 0, 6 * MIB, 4096, 0], Status::OutOfMemory),
        ("allocate over the quota", [alloc, 0, 9 * MIB, 4096, 0], Status::OverQuota),
        ("grow over the quota", [realloc, 0, 9 * MIB, 0, m], Status::OverQuota),
        // The share operations (the token is 0 here: no share has that token).
        ("share another process's block", [share, 0, 4096, 0, theirs], Status::NotOwner),
        ("share another connection's block", [share, 0, 4096, 0, s], Status::NotOwner),
        ("share a free block", [share, 0, 0, 0, freed.offset], Status::BadOffset),
        ("share inside a block", [share, 0, 0, 0, m + 4096], Status::BadOffset),
        ("share out of range", [share, 0, 0, 0, u64::MAX], Status::BadOffset),
        ("share more than the block", [share, 0, 3 * 4096 + 1, 0, m], Status::BadSize),
        ("flag on share", [share, 1, 0, 0, m], Status::BadFlags),
        ("open what is not shared", [open, 0, 0, 0, m], Status::NoSuchShare),
        ("open a generation beyond 32 bits", [open, 0, 1 << 32, 0, m], Status::NoSuchShare),
        ("open out of range", [open, 0, 0, 0, u64::MAX], Status::NoSuchShare),
        ("close a view never opened", [close, 0, 0, 0, m], Status::NoSuchShare),
        ("close an ownership never had", [close, 2, 0, 0, theirs], Status::NoSuchShare),
        ("unknown close flag", [close, 4, 0, 0, m], Status::BadFlags),
        ("send what is not shared", [send, 0, 0, 0, m], Status::NoSuchShare),
        ("receive what was not sent", [receive, 0, 0, 0, theirs], Status::NoSuchShare),
    ];
    let mut refused = 0;
    for (n, (what, fields, want)) in cases.iter().enumerate() {
        let r = raw(&conn, i, *fields);
        assert_eq!(Status::from_u32(r.status), Some(*want), "{what}: {r:?}");
        // Every refusal counts as an error except NotInPlace, an ordinary answer to a resize.
        if *want != Status::NotInPlace {
            refused += 1;
        }
        let after = status_doc(&d);
        assert_eq!(heap_state(&after), state, "{what} changed the heap");
        assert_eq!(num(&after, "errors"), errors0 + refused, "{what}: errors");
        let n = n as u64 + 1;
        assert_eq!(num(&after, "requests"), requests0 + n, "{what}: requests");
        let mine_now = num(&row(&after, conn.client_id()), "requests");
        assert_eq!(mine_now, my_requests0 + n, "{what}: this client's requests");
    }
    assert!(d.stats_line().contains("heap check ok"));
    assert!(d.alive());

    // The ledger is this client's to write too: a released entry naming a block that is not
    // this connection's is dropped and counted as an error, never freed.
    let ledger = conn.ledger().unwrap();
    let requests = num(&status_doc(&d), "requests");
    #[rustfmt::skip]
    let entries = [
        ("another connection's block", s, 1),
        ("another process's block", theirs, (6 * MIB / 4096) as u32),
        ("a free block", freed.offset, 1),
        ("inside our own block", m + 4096, 1),
        ("beyond the arena", arena, 1),
    ];
    for (what, offset, granules) in entries {
        let block = LedgerBlock {
            offset: (offset / 4096) as u32,
            granules,
            released: true,
        };
        assert!(ledger.put(block, 0), "{what}: ledger full");
        conn.ring();
        refused += 1;
        let swept = d.wait_for(Duration::from_secs(5), || {
            num(&status_doc(&d), "errors") == errors0 + refused
        });
        assert!(swept.is_some(), "{what}: not swept: {}", status_doc(&d));
        assert!(
            ledger
                .entries
                .iter()
                .all(|e| e.load(Ordering::Acquire) == 0),
            "{what}: entry left in the ledger"
        );
        let after = status_doc(&d);
        assert_eq!(
            heap_state(&after),
            state,
            "released {what} changed the heap"
        );
        assert_eq!(num(&after, "requests"), requests, "{what}: not a request");
    }
    assert!(d.stats_line().contains("heap check ok"));

    // The slot still works, raw and through the safe API.
    let r = raw(&conn, i, [alloc, 0, 4096, 4096, 0]);
    assert_eq!(Status::from_u32(r.status), Some(Status::Ok));
    let r = raw(&conn, i, [free, 0, 0, 0, r.offset]);
    assert_eq!(Status::from_u32(r.status), Some(Status::Ok));
    assert_eq!(
        conn.resize(i, mine.offset, 4096).map(|b| b.size),
        Ok(4096),
        "shrink in place"
    );
    assert_eq!(
        conn.free(i, sibling_block.offset),
        Err(RequestError::Refused(Status::NotOwner))
    );
    // The block is its own connection's to free.
    assert_eq!(sibling.claim().unwrap().free(sibling_block.offset), Ok(()));
    assert_eq!(num(&status_doc(&d), "errors"), errors0 + refused + 1);
    assert!(d.stats_line().contains("heap check ok"));

    // A shared block goes with its last reference, never by a free or a resize, and is shared
    // once; a wrong token or generation opens nothing, and only the owner sends.
    let shared = conn
        .request(i, Op::Share, 0, 100, 0, neighbour.offset)
        .unwrap();
    assert_eq!((shared.offset, shared.size), (neighbour.offset, 100));
    let generation = shared.tag & 0xffff_ffff;
    assert_eq!(shared.tag >> 32, 1, "the block's granules");
    let refused_shared = [
        ("free", Op::Free, 0, 0),
        ("resize", Op::Reallocate, 8192, 0),
        ("share again", Op::Share, 0, 0),
        (
            "open with a wrong token",
            Op::Open,
            generation,
            shared.token ^ 1,
        ),
        (
            "open another generation",
            Op::Open,
            generation + 1,
            shared.token,
        ),
        (
            "receive what was not sent",
            Op::Receive,
            generation,
            shared.token,
        ),
    ];
    for (what, op, size, token) in refused_shared {
        let r = conn.request_with_token(i, op, 0, size, 0, neighbour.offset, token);
        assert!(
            matches!(
                r,
                Err(RequestError::Refused(Status::Shared | Status::NoSuchShare))
            ),
            "{what}: {r:?}"
        );
    }
    let sibling_slot = sibling.register().unwrap();
    assert_eq!(
        sibling
            .request(sibling_slot, Op::Send, 0, generation, 0, neighbour.offset)
            .map(|_| ()),
        Err(RequestError::Refused(Status::NotOwner)),
        "only the owner sends"
    );
    let view = sibling
        .request_with_token(
            sibling_slot,
            Op::Open,
            0,
            generation,
            0,
            neighbour.offset,
            shared.token,
        )
        .unwrap();
    assert_eq!(
        (view.offset, view.size, view.token),
        (shared.offset, 100, shared.token)
    );
    let before = status_doc(&d);
    let (used, paid) = (
        num(&before, "used_bytes"),
        num(&row(&before, conn.client_id()), "bytes"),
    );
    // The owner goes first: the view keeps the block, and the client that gave it up goes on
    // paying for it (it lives); the view's close frees it.
    conn.request(i, Op::Close, 2, generation, 0, neighbour.offset)
        .unwrap();
    let between = status_doc(&d);
    assert_eq!(num(&between, "used_bytes"), used);
    assert_eq!(num(&between, "orphaned_shares"), 0, "{between}");
    assert_eq!(num(&row(&between, conn.client_id()), "bytes"), paid);
    assert_eq!(
        conn.request(i, Op::Send, 0, generation, 0, neighbour.offset)
            .map(|_| ()),
        Err(RequestError::Refused(Status::NotOwner)),
        "given up: no longer the owner's to send"
    );
    sibling
        .request(sibling_slot, Op::Close, 0, generation, 0, neighbour.offset)
        .unwrap();
    let after = status_doc(&d);
    assert_eq!(num(&after, "used_bytes"), used - 4096, "{after}");
    assert_eq!(num(&after, "shared_blocks"), 0, "{after}");
    assert_eq!(num(&row(&after, conn.client_id()), "bytes"), paid - 4096);
    assert!(d.stats_line().contains("heap check ok"));
}

/// A request pending when the daemon stops is answered `ShuttingDown`, and the channel says
/// that the daemon is stopping.
#[test]
fn a_request_pending_at_stop_is_answered_shutting_down() {
    let d = TestDaemon::start("stopping", &["--arena-size", "16M", "--slots", "4"]);
    let conn = Connection::connect(&d.name).unwrap();
    let (i, j) = (conn.register().unwrap(), conn.register().unwrap());
    assert!(i < j);
    // Through the last slot the daemon scans: a pass over the channel ends with its answer.
    // (A pass answers whatever it finds pending, rung or not: a request submitted in a later
    // slot while the daemon still scans would be served now.)
    let b = conn.allocate(j, 8192, 4096, false).unwrap();
    // Submitted without a ring: the daemon does not look at the channel before it stops.
    let alloc = submit_raw(&conn, i, [Op::Allocate as u64, 0, 4096, 4096, 0]);
    let free = submit_raw(&conn, j, [Op::Free as u64, 0, 0, 0, b.offset]);
    let out = d.xallocd(&["stop"]);
    assert!(
        out.status.success(),
        "stop: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (what, slot, seq) in [("allocate", i, alloc), ("free", j, free)] {
        let r = answer_within(&conn, slot, seq, Duration::from_secs(1))
            .unwrap_or_else(|| panic!("{what} pending at stop got no answer"));
        assert_eq!(
            Status::from_u32(r.status),
            Some(Status::ShuttingDown),
            "{what}: {r:?}"
        );
    }
    let bell = conn.daemon_bell().unwrap();
    assert_eq!(bell.state.load(Ordering::Acquire), STATE_STOPPING);
    assert!(!conn.daemon_alive());
    assert!(!d.alive());
}

#[test]
fn a_connection_is_a_client_and_its_blocks_go_when_it_closes() {
    let d = TestDaemon::start("conns", &["--arena-size", "16M"]);
    assert_eq!(num(&status_doc(&d), "clients"), 0);
    let me = u64::from(std::process::id());
    let a = Connection::connect(&d.name).unwrap();
    let b = Connection::connect(&d.name).unwrap();
    assert_ne!(a.client_id(), b.client_id());
    let (mut holder, _) = spawn_holder(&d.name, 2, 8192);
    let holder_pid = u64::from(holder.0.id());

    let ia = a.register().unwrap();
    let ib = b.register().unwrap();
    let kept = a.allocate(ia, 4096, 4096, false).unwrap();
    for _ in 0..3 {
        b.allocate(ib, 16384, 4096, false).unwrap();
    }

    // Three clients in two processes, each row saying what it holds.
    let doc = status_doc(&d);
    assert_eq!(num(&doc, "clients"), 3, "{doc}");
    assert_eq!(num(&doc, "processes"), 2, "{doc}");
    let (ra, rb) = (row(&doc, a.client_id()), row(&doc, b.client_id()));
    assert_eq!(
        [num(&ra, "pid"), num(&ra, "blocks"), num(&ra, "bytes")],
        [me, 1, 4096]
    );
    assert_eq!(
        [num(&rb, "pid"), num(&rb, "blocks"), num(&rb, "bytes")],
        [me, 3, 3 * 16384]
    );
    assert_eq!([num(&ra, "requests"), num(&rb, "requests")], [1, 3]);
    let list = doc["client_list"].as_array().unwrap();
    let rh = list
        .iter()
        .find(|c| num(c, "pid") == holder_pid)
        .expect("the holder's row");
    assert_eq!([num(rh, "blocks"), num(rh, "bytes")], [2, 2 * 8192]);
    // `xallocd status --clients --json` prints the same rows.
    let cli = d.clients();
    let ids = |rows: &[Value]| rows.iter().map(|c| num(c, "id")).collect::<BTreeSet<_>>();
    assert_eq!(ids(&cli), ids(list));
    for c in &cli {
        assert_eq!(c, &row(&doc, num(c, "id") as u32), "status --clients row");
    }

    // Dropping a connection while the process lives on frees its blocks, and only its own.
    let b_id = b.client_id();
    drop(b);
    let gone = d.wait_for(Duration::from_secs(5), || {
        num(&status_doc(&d), "clients") == 2
    });
    assert!(gone.is_some(), "{}", status_doc(&d));
    let doc = status_doc(&d);
    assert_eq!(num(&doc, "used_bytes"), 4096 + 2 * 8192, "{doc}");
    assert_eq!(num(&doc, "live_blocks"), 3, "{doc}");
    assert_eq!(row(&doc, a.client_id())["bytes"], 4096);
    let line = format!("client {b_id} (pid {me}) closed its connection: reclaimed 3 blocks");
    assert!(
        d.wait_for(Duration::from_secs(5), || d.log().contains(&line))
            .is_some(),
        "{line:?} in {}",
        d.log()
    );
    // The other connection of the process still works, and its block is still its own.
    assert_eq!(a.free(ia, kept.offset), Ok(()));

    // The holder's process exits: its connection goes with it.
    holder.0.kill().unwrap();
    holder.0.wait().unwrap();
    let gone = d.wait_for(Duration::from_secs(5), || {
        let s = status_doc(&d);
        num(&s, "clients") == 1 && num(&s, "used_bytes") == 0
    });
    assert!(gone.is_some(), "{}", status_doc(&d));
    assert_eq!(num(&status_doc(&d), "errors"), 0);
    assert!(d.stats_line().contains("heap check ok"));
}

/// The daemon serves slots below the client's `slots_hi` only, and never beyond the channel's
/// slot count whatever `slots_hi` says: a slot the client did not announce is ignored without
/// harm, and a client that lies in `slots_hi` delays only itself.
#[test]
fn slots_beyond_what_the_channel_announces_are_ignored_without_harm() {
    let d = TestDaemon::start("slots", &["--arena-size", "16M", "--slots", "8"]);
    let conn = Connection::connect(&d.name).unwrap();
    let other = Connection::connect(&d.name).unwrap();
    assert_eq!(conn.slot_count(), 8);
    assert!(conn.request_slot(8).is_none() && conn.response_slot(8).is_none());
    let bell = conn.bell().unwrap();
    assert_eq!(bell.slots_hi.load(Ordering::Relaxed), 0);
    let i = conn.register().unwrap();
    assert_eq!(bell.slots_hi.load(Ordering::Relaxed), i + 1);
    let alloc = Op::Allocate as u64;
    let quiet = Duration::from_millis(300);

    // A request in slot 5, above `slots_hi`: rung, but never looked at.
    let seq = submit_raw(&conn, 5, [alloc, 0, 4096, 4096, 0]);
    conn.ring();
    assert!(
        answer_within(&conn, 5, seq, quiet).is_none(),
        "slot 5 served above slots_hi"
    );
    let s = status_doc(&d);
    assert_eq!((num(&s, "requests"), num(&s, "live_blocks")), (0, 0), "{s}");
    // Announced, and rung again: answered.
    bell.note_claim(5);
    conn.ring();
    let r = answer_within(&conn, 5, seq, Duration::from_secs(5)).expect("slot 5 answered");
    assert_eq!(Status::from_u32(r.status), Some(Status::Ok));
    assert_eq!(conn.free(i, r.offset), Ok(()));

    // `slots_hi` far beyond the channel: the daemon stops at its slot count.
    bell.slots_hi.store(u32::MAX, Ordering::Release);
    let b = conn.allocate(i, 4096, 4096, false).unwrap();
    assert_eq!(conn.free(i, b.offset), Ok(()));
    assert!(d.alive());

    // `slots_hi` of 0: this client's requests are not seen, and nobody else's suffer.
    bell.slots_hi.store(0, Ordering::Release);
    let seq = submit_raw(&conn, i, [alloc, 0, 4096, 4096, 0]);
    conn.ring();
    assert!(answer_within(&conn, i, seq, quiet).is_none(), "served");
    let mut slot = other.claim().unwrap();
    let ob = slot.allocate(4096, 4096, false).unwrap();
    assert_eq!(slot.free(ob.offset), Ok(()));
    // Told the truth again, it is served.
    bell.note_claim(i);
    conn.ring();
    let r = answer_within(&conn, i, seq, Duration::from_secs(5)).expect("answered");
    assert_eq!(Status::from_u32(r.status), Some(Status::Ok));
    assert_eq!(conn.free(i, r.offset), Ok(()));

    let s = status_doc(&d);
    assert_eq!(num(&s, "errors"), 0, "{s}");
    assert_eq!(num(&s, "used_bytes"), 0, "{s}");
    assert!(d.stats_line().contains("heap check ok"));
}

#[test]
fn a_killed_client_gets_its_blocks_reclaimed() {
    let d = TestDaemon::start("death", &[]);
    let (mut child, _) = spawn_holder(&d.name, 5, 100_000);
    let pid = child.0.id();
    let rows = d.clients();
    assert_eq!(rows.len(), 1, "{rows:?}");
    let r = &rows[0];
    assert_eq!(num(r, "pid"), u64::from(pid));
    assert_eq!([num(r, "blocks"), num(r, "bytes")], [5, 5 * 102_400]);
    assert_eq!(num(r, "cached_bytes"), 0);
    assert_eq!(num(r, "requests"), 5);
    assert!(
        r["command"]
            .as_str()
            .is_some_and(|c| "xalloc-test-client".starts_with(c) && c.len() >= 8),
        "{r}"
    );
    let id = num(r, "id");
    let s = status_doc(&d);
    assert_eq!((num(&s, "live_blocks"), num(&s, "clients")), (5, 1));
    assert!(num(&s, "used_bytes") >= 5 * 100_000);

    // SIGHUP logs the client with what it holds.
    d.stats_line();
    let holder = format!(
        "client {id} (pid {pid}, {}, user {}): 5 blocks, {} bytes (0 of them cached for reuse), \
         5 requests",
        r["command"].as_str().unwrap(),
        r["uid"],
        5 * 102_400
    );
    assert!(
        d.wait_for(Duration::from_secs(5), || d.log().contains(&holder))
            .is_some(),
        "per-client line {holder:?}: {}",
        d.log()
    );

    let killed = Instant::now();
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    let took = d
        .wait_for(Duration::from_secs(5), || {
            let s = status_doc(&d);
            num(&s, "used_bytes") == 0 && num(&s, "clients") == 0
        })
        .expect("blocks and client reclaimed within 5 s");
    eprintln!(
        "reclaimed {:?} after the kill ({took:?} after reaping)",
        killed.elapsed()
    );
    assert!(d.clients().is_empty());
    let line = format!("(pid {pid})");
    let reclaimed = format!("reclaimed 5 blocks ({} bytes)", 5 * 102_400);
    assert!(
        d.log().lines().any(|l| l.contains(&format!("client {id} "))
            && l.contains(&line)
            && l.contains(&reclaimed)),
        "{}",
        d.log()
    );
    // The room is there for the next client.
    let conn = Connection::connect(&d.name).unwrap();
    let mut slot = conn.claim().unwrap();
    let b = slot.allocate(100_000, 4096, false).unwrap();
    slot.free(b.offset).unwrap();
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
    assert!(num(&status_doc(&d), "resident_bytes") >= size);
    slot.free(b.offset).unwrap();
    // Idle for 0.2 s, then returned down to the 2 MiB retained.
    let decayed = d.wait_for(Duration::from_secs(5), || {
        num(&status_doc(&d), "resident_bytes") <= 2 << 20
    });
    assert!(decayed.is_some(), "{}", status_doc(&d));
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
