//! `XallocGlobal` across daemon restarts and forks: a process that outlives many daemons keeps
//! using the newest one (connections whose blocks are all gone are recycled), keeps the blocks
//! of the old ones, and a child forked while another thread of its parent is connecting does
//! not wait for that connection.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// The program whose global allocator is `XallocGlobal` (4 KiB threshold).
const GLOBAL_CLIENT: &str = env!("CARGO_BIN_EXE_xalloc-global-client");

/// Files under `/dev/shm` made by a test, removed when dropped (also when the test fails).
struct ShmFiles(Vec<PathBuf>);

impl Drop for ShmFiles {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Waits up to `limit` for `child` to exit; kills it (by pid, through `Child`'s drop) if not.
fn wait_with_timeout(mut child: Child, limit: Duration) -> (std::process::ExitStatus, String) {
    let start = Instant::now();
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            let mut out = String::new();
            std::io::Read::read_to_string(child.0.stdout.as_mut().unwrap(), &mut out).unwrap();
            return (status, out);
        }
        assert!(
            start.elapsed() < limit,
            "client pid {} still runs after {limit:?}: killed",
            child.0.id()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_child_forked_while_another_thread_connects_does_not_wait_for_that_connection() {
    // Instance Y: the request segment of a real daemon X (so that its header checks out) and a
    // FIFO for the response segment, whose read-only open blocks until a writer comes.
    let x = TestDaemon::start("fork-conn-x", &[]);
    let y = unique_name("fork-conn-y");
    let request = PathBuf::from(format!("/dev/shm/{y}.request"));
    let fifo = PathBuf::from(format!("/dev/shm/{y}.response"));
    let held = PathBuf::from(format!("/dev/shm/{y}.response.held"));
    let _files = ShmFiles(vec![request.clone(), fifo.clone(), held]);
    std::fs::hard_link(format!("/dev/shm/{}.request", x.name), &request).unwrap();
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: plain system call on a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");

    let child = Child(
        Command::new(GLOBAL_CLIENT)
            .args(["fork-while-connecting", fifo.to_str().unwrap()])
            .env("XALLOC_NAME", &y)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let (status, out) = wait_with_timeout(child, Duration::from_secs(20));
    assert!(status.success(), "client failed ({status:?}): {out}");
    assert!(out.contains("reentries=0"), "{out}");
}

/// How the test restarts the daemon, by restart number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Restart {
    /// `xallocd stop` (the segments go), then `start`: new segments.
    Stop,
    /// SIGKILL, then `start --fresh`: the dead daemon's segments are replaced.
    KillFresh,
    /// SIGKILL, then `start`: the new daemon re-attaches to the same segments.
    KillReattach,
}

fn restart_kind(k: u64) -> Restart {
    match k % 3 {
        0 => Restart::KillReattach,
        1 => Restart::Stop,
        _ => Restart::KillFresh,
    }
}

#[test]
fn a_process_keeps_using_the_daemon_across_more_restarts_than_it_keeps_connections() {
    const RESTARTS: u64 = 14;
    let mut d = TestDaemon::start("restarts", &["--arena-size", "64M"]);
    let mut client = Child(
        Command::new(GLOBAL_CLIENT)
            .arg("restarts")
            .env("XALLOC_NAME", &d.name)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let mut stdin = client.0.stdin.take().unwrap();
    let mut stdout = BufReader::new(client.0.stdout.take().unwrap());
    let mut ask = |cmd: &str| -> String {
        writeln!(stdin, "{cmd}").unwrap();
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        line
    };
    // The blocks of the first two daemons are kept to the end: their connections must stay.
    let mode = |k: u64| if k < 2 { "hold" } else { "free" };
    let line = ask(&format!("alloc 0 {}", mode(0)));
    assert_eq!(line.trim_end(), "served gen=0 connections=1");
    let mut expected = 1;
    for k in 1..=RESTARTS {
        let kind = restart_kind(k);
        match kind {
            Restart::Stop => {
                let out = d.xallocd(&["stop"]);
                assert!(out.status.success(), "stop {k}: {out:?}");
            }
            Restart::KillFresh | Restart::KillReattach => {
                d.signal(libc::SIGKILL);
                assert!(d.wait_exit(Duration::from_secs(5)), "kill {k}");
            }
        }
        let extra: &[&str] = if kind == Restart::KillFresh {
            &["--fresh"]
        } else {
            &[]
        };
        let out = d.start_command(extra);
        assert!(out.status.success(), "start {k}: {out:?}");
        d.adopt();
        if kind != Restart::KillReattach {
            expected += 1;
        }
        let line = ask(&format!("alloc {k} {}", mode(k)));
        assert!(
            line.trim_end() == format!("served gen={k} connections={expected}"),
            "restart {k} ({kind:?}): {line}"
        );
        // Served by this daemon: it holds the client's new 1 MiB block.
        assert!(
            d.stat("used_bytes") >= 1 << 20,
            "restart {k}: {:?}",
            d.status()
        );
    }
    let reattached = d
        .log()
        .matches("re-attached to the existing segments")
        .count() as u64;
    assert_eq!(
        reattached,
        RESTARTS / 3,
        "every SIGKILL-then-start re-attached"
    );
    // The blocks of the first two daemons kept their contents and their arenas.
    let line = ask("check");
    assert!(line.starts_with("ok "), "{line}");
    assert!(line.contains("reentries=0"), "{line}");
    assert!(
        line.trim_end()
            .ends_with(&format!("connections={expected}")),
        "{line}"
    );
    assert!(
        expected > 8,
        "more daemons than kept connections: {expected}"
    );
    let status = client.0.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

#[test]
fn a_busy_process_reconnects_through_many_restarts_while_its_threads_free_old_blocks() {
    // Four threads allocate, check and free blocks of every size, and hand them to each other,
    // while the daemon is stopped and started again (new segments each time). Once the client
    // uses a new daemon, it is told to free what its threads keep (they keep blocks of every
    // daemon so far, which would hold every connection): each thread does so when it comes to
    // it, while the others go on, so connections are recycled while blocks of the old arenas
    // are still being freed.
    const RESTARTS: u64 = 9;
    let mut d = TestDaemon::start("restarts-busy", &["--arena-size", "256M"]);
    let mut client = Child(
        Command::new(GLOBAL_CLIENT)
            .args(["work", "4", "0"])
            .env("XALLOC_NAME", &d.name)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    for k in 0..=RESTARTS {
        if k > 0 {
            let out = d.xallocd(&["stop"]);
            assert!(out.status.success(), "stop {k}: {out:?}");
            let out = d.start_command(&["--arena-size", "256M"]);
            assert!(out.status.success(), "start {k}: {out:?}");
            d.adopt();
        }
        // The client found this daemon: it registered, and allocates in its arena.
        let found = d.wait_for(Duration::from_secs(10), || {
            let s = d.status();
            s["clients"] != "0" && s["used_bytes"] != "0"
        });
        assert!(found.is_some(), "daemon {k}: {:?}", d.status());
        writeln!(client.0.stdin.as_mut().unwrap(), "free what you keep").unwrap();
    }
    drop(client.0.stdin.take());
    let (status, out) = wait_with_timeout(client, Duration::from_secs(30));
    assert!(status.success(), "client failed ({status:?}): {out}");
    assert!(out.contains("reentries=0"), "{out}");
    assert!(
        out.contains(&format!("connections={} ", RESTARTS + 1))
            || out
                .trim_end()
                .ends_with(&format!("connections={}", RESTARTS + 1)),
        "{out}"
    );
}
