//! Daemon crashes: the daemon is killed with SIGKILL at random moments while clients work, and
//! restarted each time; the new daemon takes the arena and the clients' channels back from the
//! keeper (one keeper, the same through every restart) and re-attaches to them.
//!
//! Checked: the clients never crash or lose data (two `XallocGlobal` programs check every
//! buffer they use, falling back to the system allocator while no daemon answers); the blocks
//! a protocol client holds stay allocated to it across every restart, are never handed to
//! anyone else (their contents survive), and are freed normally afterwards through the slot
//! and connection made before the first crash; the heap passes its check after restarts; and
//! once everyone has exited the arena is empty.
//!
//! `XALLOC_DAEMON_KILLS` sets the number of kills (default 50); `scripts/faults.sh` runs more.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const GLOBAL_CLIENT: &str = env!("CARGO_BIN_EXE_xalloc-global-client");

#[test]
fn a_daemon_killed_under_load_is_restarted_and_clients_keep_their_blocks() {
    let kills: u64 = std::env::var("XALLOC_DAEMON_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let mut d = TestDaemon::start("crash", &["--arena-size", "256M", "--slots", "64"]);
    let mut holder = Child(
        Command::new(CLIENT)
            .args(["hold-then-free", &d.name, "6", "300000"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut holder_out = BufReader::new(holder.0.stdout.take().unwrap());
    let mut line = String::new();
    holder_out.read_line(&mut line).unwrap();
    assert!(line.starts_with("held "), "{line}");
    let held_bytes = 6 * 300_000u64.next_multiple_of(4096);
    let keeper = d.stat("keeper_pid");

    let millis = (kills * 120 + 500).to_string();
    let workers: Vec<_> = (0..2)
        .map(|_| {
            Command::new(GLOBAL_CLIENT)
                .args(["work", "2", &millis])
                .env("XALLOC_NAME", &d.name)
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();

    let mut seed = 0x0dd_ba11u64;
    let mut restart_times = Vec::new();
    for k in 0..kills {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(20 + seed % 120));
        d.signal(libc::SIGKILL);
        assert!(d.wait_exit(Duration::from_secs(5)), "kill {k}");
        let t = Instant::now();
        let out = d.start_command(&[]);
        assert!(
            out.status.success(),
            "restart {k}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        restart_times.push(t.elapsed());
        d.adopt();
        // The holder's blocks are still allocated (to it: it is alive), in the arena the same
        // keeper kept.
        let s = d.status();
        assert!(
            s["used_bytes"].parse::<u64>().unwrap() >= held_bytes,
            "restart {k}: {s:?}"
        );
        assert_eq!(s["keeper_pid"], keeper.to_string(), "restart {k}: {s:?}");
        if k % 10 == 9 {
            assert!(d.stats_line().contains("heap check ok"), "restart {k}");
        }
    }
    let reattached = d
        .log()
        .matches("re-attached to the existing segments")
        .count() as u64;
    assert_eq!(reattached, kills, "every restart re-attached");

    let mut worker_lines = Vec::new();
    for w in workers {
        let out = w.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(out.status.success(), "worker: {text}");
        assert!(text.contains("reentries=0"), "{text}");
        worker_lines.push(text);
    }
    // Frees of blocks allocated before the first crash are accepted.
    writeln!(holder.0.stdin.as_mut().unwrap()).unwrap();
    line.clear();
    holder_out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "freed 6", "holder");
    let empty = d.wait_for(Duration::from_secs(5), || {
        let s = d.status();
        s["used_bytes"] == "0" && s["clients"] == "0"
    });
    assert!(empty.is_some(), "{:?}", d.status());
    assert!(d.stats_line().contains("heap check ok"));
    restart_times.sort();
    println!(
        "DAEMON_CRASH kills: {kills}; restart (start command) p50 {:?}, max {:?}; \
         blocks lost or handed out twice: 0; workers: {worker_lines:?}",
        restart_times[restart_times.len() / 2],
        restart_times.last().unwrap()
    );
}
