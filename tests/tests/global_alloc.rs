//! `XallocGlobal` in real programs: std-heavy multi-threaded work through a daemon, the same
//! without a daemon, the daemon killed in the middle, a forked child, and the daemon's
//! `used_bytes` back to 0 once the clients have exited.

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
    // The child's blocks were its own: reclaimed when it exited, like the parent's.
    wait_all_reclaimed(&d);
    assert_eq!(
        d.stat("errors"),
        1,
        "one refused free: the child's of the inherited buffer"
    );
}
