//! The arena at its edges: alignments larger than the mappings' own, ledger entries that do
//! not name a block, and the record of reserved pages after a daemon restart.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;

const EDGE_CLIENT: &str = env!("CARGO_BIN_EXE_xalloc-edge-client");

fn edge_client(d: &TestDaemon, args: &[&str]) -> Output {
    Command::new(EDGE_CLIENT)
        .args(args)
        .env("XALLOC_NAME", &d.name)
        .output()
        .expect("run xalloc-edge-client")
}

/// Every alignment from 4 KiB to 256 MiB holds through `XallocGlobal` in a process whose arena
/// mapping is not where the daemon's is modulo 256 MiB (each mapping is aligned only to 2 MiB),
/// for blocks from the daemon and from the cache.
#[test]
fn every_alignment_holds_in_a_mapping_unlike_the_daemons() {
    let d = TestDaemon::start("align", &["--arena-size", "1G"]);
    let pid = d.pid.to_string();
    // A fresh process maps the arena somewhere else; 3 means it landed where the daemon's
    // mapping is, modulo 256 MiB (one chance in 128), and is run again.
    let out = (0..8)
        .map(|_| edge_client(&d, &["align", &pid]))
        .find(|o| o.status.code() != Some(3))
        .expect("eight processes in a row mapped the arena like the daemon");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.starts_with("ok aligned=170 "), "{stdout}");
    assert!(d.stats_line().contains("heap check ok"));
}

/// A ledger entry naming a block outside the arena, written by another process, is dropped
/// and counted, never written through.
#[test]
fn planted_ledger_entries_are_dropped_not_used() {
    let d = TestDaemon::start("ledger", &[]);
    let out = edge_client(&d, &["plant-ledger"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{} (exit {:?})",
        String::from_utf8_lossy(&out.stderr),
        out.status
    );
    assert!(stdout.starts_with("ok bad_ledger_entries="), "{stdout}");
    assert!(d.stats_line().contains("heap check ok"));
}

/// Bytes of `/dev/shm/NAME.arena` backed by pages.
fn arena_resident(name: &str) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/dev/shm/{name}.arena"))
        .expect("arena segment")
        .blocks()
        * 512
}

/// After a restart, the chunks that hold blocks kept for live clients are recorded as reserved
/// (they were, by the daemon that died): a later failure to reserve pages in such a chunk must
/// not give its pages back to the kernel, which would zero the blocks. The pages of chunks that
/// no kept block uses (here those of a client killed while no daemon ran) go back to the
/// kernel.
#[test]
fn a_restarted_daemon_records_the_pages_of_kept_blocks_and_returns_the_rest() {
    let mut d = TestDaemon::start("reserved", &[]);
    let spawn = |mode: &str, count: &str, size: &str| {
        let mut c = Child(
            Command::new(CLIENT)
                .args([mode, &d.name, count, size])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let mut line = String::new();
        BufReader::new(c.0.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.starts_with("held "), "{line}");
        c
    };
    let _holder = spawn("hold-then-free", "3", "300000");
    let before = d.stat("reserved_bytes");
    assert!(before >= 2 << 20, "{:?}", d.status());
    let mut gone = spawn("hold", "4", "2000000");
    let with_gone = arena_resident(&d.name);
    assert!(
        with_gone >= before + (8 << 20),
        "{with_gone} bytes resident"
    );

    d.signal(libc::SIGKILL);
    assert!(d.wait_exit(Duration::from_secs(5)));
    gone.0.kill().unwrap();
    gone.0.wait().unwrap();
    let out = d.start_command(&[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    d.adopt();
    assert!(d.log().contains("kept 3 blocks"), "{}", d.log());
    assert_eq!(d.stat("reserved_bytes"), before, "{:?}", d.status());
    // What stays resident: the kept blocks' chunks, and the arena's header (its first 2 MiB).
    let after = arena_resident(&d.name);
    assert!(
        after <= before + (2 << 20),
        "{after} bytes resident after the restart, {before} reserved"
    );
    assert!(d.stats_line().contains("heap check ok"));
}

/// A FIFO planted under an instance's name (anyone can create files in `/dev/shm`) makes a
/// connection fail at once rather than block: the request segment is a real one (another
/// daemon's, so that its header checks out) and the response segment a FIFO, whose read-only
/// open would wait for a writer.
#[test]
fn a_fifo_planted_as_a_segment_makes_connect_fail_without_blocking() {
    let x = TestDaemon::start("fifo-x", &[]);
    let y = Cleanup::new("fifo-y");
    std::fs::hard_link(
        format!("/dev/shm/{}.request", x.name),
        format!("/dev/shm/{}.request", y.name),
    )
    .unwrap();
    let fifo = std::ffi::CString::new(format!("/dev/shm/{}.response", y.name)).unwrap();
    // SAFETY: plain system call on a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0, "mkfifo");
    let (tx, rx) = std::sync::mpsc::channel();
    let name = y.name.clone();
    std::thread::spawn(move || {
        let _ = tx.send(xalloc_global::client::Connection::connect(&name).map(drop));
    });
    let r = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("connect still blocked after 5 s");
    let err = r.expect_err("a FIFO is no segment");
    assert!(err.to_string().contains("response"), "{err}");
}
