//! `XallocGlobal` in real programs: std-heavy multi-threaded work through a daemon, the same
//! without a daemon, the daemon killed in the middle, a forked child, the daemon's `used_bytes`
//! back to 0 once the clients have exited, blocks released without a round trip, and cached
//! blocks the daemon takes back from an idle client.

mod common;

use std::collections::HashMap;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;

/// The program whose global allocator is `XallocGlobal` (4 KiB threshold).
const GLOBAL_CLIENT: &str = env!("CARGO_BIN_EXE_xalloc-global-client");

/// Runs it against instance `name` and parses its `ok k=v...` line.
fn run(name: &str, args: &[&str]) -> (Output, HashMap<String, u64>) {
    let out = Command::new(GLOBAL_CLIENT)
        .args(args)
        .env("XALLOC_NAME", name)
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    let fields = parse_ok(&String::from_utf8_lossy(&out.stdout));
    (out, fields)
}

fn parse_ok(stdout: &str) -> HashMap<String, u64> {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("ok "))
        .map(|rest| {
            rest.split_whitespace()
                .filter_map(|kv| {
                    let (k, v) = kv.split_once('=')?;
                    Some((k.to_owned(), v.parse().ok()?))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "client failed ({:?}): {}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Waits until the daemon holds nothing for any client.
fn wait_all_reclaimed(d: &TestDaemon) {
    let took = d.wait_for(Duration::from_secs(5), || {
        let s = d.status();
        s["used_bytes"] == "0" && s["clients"] == "0"
    });
    assert!(
        took.is_some(),
        "daemon still holds blocks: {:?}",
        d.status()
    );
}

#[test]
fn std_work_goes_through_the_daemon_and_comes_back() {
    let d = TestDaemon::start("global", &["--arena-size", "256M"]);
    let (out, f) = run(&d.name, &["work", "4", "1500"]);
    assert_ok(&out);
    assert!(f["forwarded"] > 100, "{f:?}");
    assert_eq!(f["fallbacks"], 0, "{f:?}");
    assert_eq!(f["reentries"], 0, "the allocator re-entered itself: {f:?}");
    // Forwarded allocations were served by the daemon or by the cache of freed blocks.
    assert!(d.stat("requests") + f["cache_hits"] > f["forwarded"]);
    assert_eq!(d.stat("errors"), 0);
    wait_all_reclaimed(&d);
    assert!(d.stats_line().contains("heap check ok"));
}

#[test]
fn without_a_daemon_everything_falls_back() {
    let name = unique_name("absent");
    let (out, f) = run(&name, &["work", "2", "500"]);
    assert_ok(&out);
    assert_eq!(f["forwarded"], 0, "{f:?}");
    assert!(f["fallbacks"] > 100, "{f:?}");
    assert_eq!(f["reentries"], 0, "{f:?}");
}

#[test]
fn a_daemon_killed_mid_run_leaves_the_program_running_on_the_system_allocator() {
    let d = TestDaemon::start("killed", &["--arena-size", "256M"]);
    let child = Command::new(GLOBAL_CLIENT)
        .args(["work", "4", "3000"])
        .env("XALLOC_NAME", &d.name)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    assert!(d.stat("live_blocks") > 0 || d.stat("requests") > 0);
    d.signal(libc::SIGKILL);
    assert!(d.wait_exit(Duration::from_secs(5)));
    let out = child.wait_with_output().unwrap();
    assert_ok(&out);
    let f = parse_ok(&String::from_utf8_lossy(&out.stdout));
    assert!(f["forwarded"] > 0, "forwarded before the kill: {f:?}");
    assert!(f["fallbacks"] > 0, "fell back after the kill: {f:?}");
    assert_eq!(f["reentries"], 0, "{f:?}");
}

#[test]
fn a_forked_child_registers_itself_and_never_touches_the_parents_blocks() {
    let d = TestDaemon::start("fork", &["--arena-size", "64M"]);
    let (out, f) = run(&d.name, &["fork"]);
    assert_ok(&out);
    assert!(f["forwarded"] > 0, "{f:?}");
    assert_eq!(f["reentries"], 0, "{f:?}");
    // The child made a connection of its own: two clients connected, of two processes.
    let log = d.log();
    let pids: std::collections::BTreeSet<&str> = log
        .lines()
        .filter_map(|l| l.split(" connected: pid ").nth(1)?.split(' ').next())
        .collect();
    assert_eq!(pids.len(), 2, "parent and child each connected: {log}");
    // The child's blocks were its own: reclaimed when it exited, like the parent's.
    wait_all_reclaimed(&d);
    // The child no longer sends a free of the inherited buffer to the daemon (blocks belong to
    // the connection, which the child does not have): nothing was refused. (The old protocol
    // counted one refused free here.)
    assert_eq!(d.stat("errors"), 0);
}

/// Starts `free-then-wait COUNT SIZE` with `cache` bytes of cache, and returns it with the
/// numbers of its `freed` line.
fn free_then_wait(name: &str, count: u64, size: u64, cache: &str) -> (Child, HashMap<String, u64>) {
    let mut child = Child(
        Command::new(GLOBAL_CLIENT)
            .args(["free-then-wait", &count.to_string(), &size.to_string()])
            .env("XALLOC_NAME", name)
            .env("XALLOC_CACHE", cache)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.0.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    let fields = line
        .strip_prefix("freed ")
        .unwrap_or_else(|| panic!("{line:?}"))
        .split_whitespace()
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k.to_owned(), v.trim().parse().ok()?))
        })
        .collect();
    (child, fields)
}

/// Lets a `free-then-wait` client go on, and returns its `ok` fields.
fn finish(mut child: Child) -> HashMap<String, u64> {
    use std::io::{Read, Write};
    child.0.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    let mut rest = String::new();
    child
        .0
        .stdout
        .as_mut()
        .unwrap()
        .read_to_string(&mut rest)
        .unwrap();
    let status = child.0.wait().unwrap();
    assert!(status.success(), "client failed ({status:?}): {rest}");
    parse_ok(&rest)
}

#[test]
fn blocks_beyond_the_cache_are_released_without_a_round_trip() {
    let d = TestDaemon::start("release", &["--arena-size", "64M"]);
    // A 1 MiB cache: of eight 1 MiB blocks freed, one stays cached and seven are released
    // into the ledger; the daemon frees them while the client makes no request at all.
    let (child, freed) = free_then_wait(&d.name, 8, 1 << 20, "1M");
    assert_eq!(freed["cached_bytes"], 1 << 20, "{freed:?}");
    assert_eq!(freed["arena_bytes"], 1 << 20, "{freed:?}");
    // Left: the cached block, and the 8 KiB buffer of stdin (the client reads a line now).
    let took = d.wait_for(Duration::from_secs(5), || {
        d.stat("used_bytes") == (1 << 20) + (8 << 10)
    });
    assert!(
        took.is_some(),
        "released blocks not freed: {:?}",
        d.status()
    );
    // Eight allocations and stdin's buffer (connecting is no request): the frees were none.
    assert_eq!(d.stat("requests"), 9, "{:?}", d.status());
    let ok = finish(child);
    assert_eq!((ok["fallbacks"], ok["cache_hits"]), (0, 1), "{ok:?}");
    wait_all_reclaimed(&d);
}

#[test]
fn the_daemon_takes_cached_blocks_back_from_an_idle_client_when_its_arena_is_full() {
    let d = TestDaemon::start("takeback", &["--arena-size", "64M"]);
    // The first client caches 48 MiB (twelve 4 MiB blocks) and goes idle.
    let (child, freed) = free_then_wait(&d.name, 12, 4 << 20, "64M");
    assert_eq!(freed["cached_bytes"], 48 << 20, "{freed:?}");
    // Held at the daemon: the cache, and the 8 KiB buffer of stdin, where the client now waits.
    let idle = d.wait_for(Duration::from_secs(5), || {
        d.stat("used_bytes") == (48 << 20) + (8 << 10)
    });
    assert!(idle.is_some(), "{:?}", d.status());
    // A second client fills the arena with 4 MiB blocks: 3 fit beside the cache and the first
    // client's 8 KiB stdin buffer; then the daemon takes the cache back, and 12 more fit.
    let out = Command::new(CLIENT)
        .args(["fill", &d.name, &(4u64 << 20).to_string()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.starts_with("filled 15 refused=Refused(OutOfMemory)"),
        "{stdout}"
    );
    assert!(d.log().contains("took back 12 blocks"), "{}", d.log());
    // The idle client finds its cache empty and allocates anew, without falling back.
    let took = d.wait_for(Duration::from_secs(5), || d.stat("clients") == 1);
    assert!(took.is_some(), "{:?}", d.status());
    let ok = finish(child);
    assert_eq!((ok["fallbacks"], ok["cache_hits"]), (0, 0), "{ok:?}");
    wait_all_reclaimed(&d);
}
