//! Fault injection: clients killed with SIGKILL at random moments against one daemon.
//!
//! Three clients hold known blocks for the whole run. Each round starts a victim that either
//! churns (allocate, fill, verify, free on two threads) and is killed after a random delay (in
//! the middle of a request, while waiting for an answer, between requests, or before it is even
//! connected), or kills itself at a chosen point of the protocol (`die-at claimed`: right after
//! claiming a second slot of its channel, with no request in it; `die-at submitted`: right
//! after submitting and ringing a request, before reading the answer). After each kill the test
//! waits until the daemon holds exactly what the survivors hold, with their three connections
//! as its only clients (`xallocd status --clients --json`), and records how long that took from
//! the kill. Every 25 rounds, and at the end, the daemon checks its whole state (SIGHUP). At the
//! end the survivors' blocks still hold their data: read here, and checked and freed by the
//! survivors themselves.
//!
//! `XALLOC_FAULT_KILLS` sets the number of rounds (default 200, what CI runs);
//! `scripts/faults.sh` runs the long version and prints the table for the README.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use xalloc_global::client::Connection;
use xalloc_tests::{pattern_byte, Rng};

/// Blocks each survivor holds, and their size (25 pages once rounded to the granule).
const HELD_BLOCKS: u64 = 4;
const HELD_SIZE: u64 = 100_000;
const HELD_ROUNDED: u64 = 25 * 4096;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// The daemon's status document with its client rows, asked over its socket from this process
/// (the document `xallocd status --json` and `status --clients --json` print from), so that
/// polling it does not start a process each time.
fn status_doc(name: &str) -> Value {
    let names = xalloc_daemon::segments::Names::new(name).expect("instance name");
    xalloc_daemon::status::ask_status(&names).expect("status over the socket")
}

fn num(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no number {key:?} in {v}"))
}

/// Whether `rows` (client rows of `status --clients --json`) are exactly the survivors, each
/// holding its blocks and nothing more.
fn only_survivors(rows: &[Value], survivors: &BTreeSet<u64>) -> bool {
    let pids: BTreeSet<u64> = rows.iter().map(|c| num(c, "pid")).collect();
    rows.len() == survivors.len()
        && pids == *survivors
        && rows.iter().all(|c| {
            num(c, "blocks") == HELD_BLOCKS && num(c, "bytes") == HELD_BLOCKS * HELD_ROUNDED
        })
}

/// Whether the daemon holds exactly what the survivors hold.
fn settled(doc: &Value, survivors: &BTreeSet<u64>) -> bool {
    let held = survivors.len() as u64 * HELD_BLOCKS * HELD_ROUNDED;
    num(doc, "used_bytes") == held
        && num(doc, "live_blocks") == survivors.len() as u64 * HELD_BLOCKS
        && num(doc, "clients") == survivors.len() as u64
        && num(doc, "processes") == survivors.len() as u64
        && only_survivors(
            doc["client_list"].as_array().expect("client_list"),
            survivors,
        )
}

#[test]
fn clients_killed_at_random_moments_are_always_reclaimed() {
    let kills: usize = std::env::var("XALLOC_FAULT_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let d = TestDaemon::start("faults", &["--arena-size", "128M", "--slots", "64"]);

    // The survivors: 3 clients holding 4 blocks of 100 000 bytes (25 pages) each, filled with
    // the pattern of tag 1 (see `xalloc-test-client`); at the end they check and free them.
    let mut holders = Vec::new();
    let mut held_offsets: Vec<u64> = Vec::new();
    for _ in 0..3 {
        let mut c = Child(
            Command::new(CLIENT)
                .args([
                    "hold-then-free",
                    &d.name,
                    &HELD_BLOCKS.to_string(),
                    &HELD_SIZE.to_string(),
                ])
                .stdin(Stdio::piped())
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
            .unwrap_or_else(|| panic!("hold-then-free printed {line:?}"));
        held_offsets.extend(
            offsets
                .split_whitespace()
                .map(|o| o.parse::<u64>().unwrap()),
        );
        holders.push(c);
    }
    let survivors: BTreeSet<u64> = holders.iter().map(|c| u64::from(c.0.id())).collect();
    let doc = status_doc(&d.name);
    assert!(settled(&doc, &survivors), "{doc}");

    let mut rng = Rng(0x5eed_cafe);
    let mut waits = Vec::new();
    let mut kinds = [0usize; 3];
    for round in 0..kills {
        let kind = (rng.next_u64() % 10) as usize;
        let killed = match kind {
            // Killed by us after a random delay while it churns.
            0..=7 => {
                kinds[0] += 1;
                let mut v = Child(
                    Command::new(CLIENT)
                        .args(["churn", &d.name, "2", "10000", &round.to_string()])
                        .stdout(Stdio::null())
                        .spawn()
                        .unwrap(),
                );
                std::thread::sleep(Duration::from_micros(1000 + rng.next_u64() % 30_000));
                v.0.kill().unwrap();
                let t = Instant::now();
                v.0.wait().unwrap();
                t
            }
            // Kills itself right after claiming a second slot, or right after submitting.
            k => {
                let phase = if k == 8 { "claimed" } else { "submitted" };
                kinds[if k == 8 { 1 } else { 2 }] += 1;
                let out = Command::new(CLIENT)
                    .args(["die-at", phase, &d.name])
                    .stdout(Stdio::piped())
                    .output()
                    .unwrap();
                // Reaped: it died a moment ago.
                let t = Instant::now();
                assert_eq!(
                    out.status.signal(),
                    Some(libc::SIGKILL),
                    "die-at {phase}: {:?} {}",
                    out.status,
                    String::from_utf8_lossy(&out.stdout)
                );
                t
            }
        };
        // Polled from this process (a status request costs the daemon one small answer).
        let mut last = Value::Null;
        while killed.elapsed() < Duration::from_secs(5) {
            last = status_doc(&d.name);
            if settled(&last, &survivors) {
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        let took = killed.elapsed();
        assert!(
            settled(&last, &survivors),
            "round {round} (kind {kind}): not reclaimed within 5 s: {last}"
        );
        waits.push(took);
        // The command line says the same.
        let rows = d.clients();
        assert!(
            only_survivors(&rows, &survivors),
            "round {round}: status --clients --json: {rows:?}"
        );
        if round % 25 == 24 {
            assert!(d.stats_line().contains("heap check ok"), "round {round}");
        }
    }
    assert!(d.stats_line().contains("heap check ok"));
    assert!(d.alive());
    let s = status_doc(&d.name);
    assert!(settled(&s, &survivors), "{s}");

    // The survivors' data is intact: no victim's block ever overlapped theirs. Read through a
    // connection of this process (which maps the whole arena) ...
    let conn = Connection::connect(&d.name).unwrap();
    for &off in &held_offsets {
        // `hold-then-free` writes the first byte of each page and the last byte of the whole
        // block.
        for i in (0..HELD_ROUNDED).step_by(4096).chain([HELD_ROUNDED - 1]) {
            // SAFETY: inside the arena mapping (the block lies in it); read only.
            let b = unsafe { conn.arena_base().add((off + i) as usize).read_volatile() };
            assert_eq!(
                b,
                pattern_byte(1, i as usize),
                "survivor's block at {off} changed at byte {i}"
            );
        }
    }
    drop(conn);
    // ... and checked by each survivor, which then frees its blocks through the connection
    // and slot it allocated them with.
    for mut h in holders {
        h.0.stdin.take().unwrap().write_all(b"go\n").unwrap();
        let mut out = String::new();
        std::io::Read::read_to_string(h.0.stdout.as_mut().unwrap(), &mut out).unwrap();
        let status = h.0.wait().unwrap();
        assert!(
            status.success() && out.trim() == format!("freed {HELD_BLOCKS}"),
            "survivor {}: {status:?} {out}",
            h.0.id()
        );
    }
    let empty = d.wait_for(Duration::from_secs(5), || {
        let s = status_doc(&d.name);
        num(&s, "used_bytes") == 0 && num(&s, "clients") == 0
    });
    assert!(empty.is_some(), "{}", status_doc(&d.name));
    assert!(d.stats_line().contains("heap check ok"));

    waits.sort();
    let (p50, p99, max) = (
        percentile(&waits, 0.5),
        percentile(&waits, 0.99),
        *waits.last().unwrap(),
    );
    println!(
        "FAULTS clients killed: {kills} (churning {}, after claim {}, after submit {}); \
         reclaimed after p50 {p50:?}, p99 {p99:?}, max {max:?}; blocks lost: 0",
        kinds[0], kinds[1], kinds[2]
    );
    // Kernel-driven reclamation is fast; a loose bound keeps a loaded CI machine from failing.
    assert!(max < Duration::from_secs(2), "max {max:?}");
}
