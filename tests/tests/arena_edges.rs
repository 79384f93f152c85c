//! The arena at its edges: alignments larger than the mappings' own, ledger entries that do
//! not name a block, the record of reserved pages after a daemon restart, and something other
//! than the daemon's socket at the socket's path.

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

/// Bytes of instance `name`'s arena backed by pages: the arena is a memfd without a name in
/// `/dev/shm`, read through the descriptor its keeper holds (the same object the daemon maps).
fn resident(name: &str) -> u64 {
    arena_resident(name).expect("the keeper holds the arena")
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
    let keeper = keeper_pid(&d.name).expect("keeper");
    // The keeper's descriptor and the daemon's are one object.
    assert_eq!(arena_resident_in(d.pid, &d.name), arena_resident(&d.name));
    let with_gone = resident(&d.name);
    assert!(
        with_gone <= d.stat("reserved_bytes") + (2 << 20),
        "{with_gone} bytes resident"
    );
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
    // The same arena: the keeper that held it while no daemon ran handed it back.
    assert_eq!(d.stat("keeper_pid"), u64::from(keeper));
    // What stays resident: the kept blocks' chunks, and the arena's header (its first 2 MiB).
    let after = resident(&d.name);
    assert!(
        after <= before + (2 << 20),
        "{after} bytes resident after the restart, {before} reserved"
    );
    assert!(d.stats_line().contains("heap check ok"));
}

/// What is planted at an instance's socket path (anyone can create files in `/dev/shm`).
#[derive(Clone, Copy, Debug)]
enum Plant {
    /// A FIFO: an open of it would wait for a writer.
    Fifo,
    /// A regular file.
    File,
    /// A socket of another user that nobody listens on.
    OthersStaleSocket,
    /// A socket of another user, listened on by a process that never answers.
    OthersSilentSocket,
}

/// Something other than a daemon's socket at `/dev/shm/NAME.socket` (the segments of the old
/// protocol, where a planted FIFO could block an open, are gone: a client only connects to the
/// socket) makes a connection fail at once, or for a listener that never answers within the
/// handshake's bound, without blocking and with a reason; and `xallocd start` refuses it,
/// naming it, and leaves it in place.
#[test]
fn something_planted_at_the_socket_path_makes_connect_fail_and_start_refuse() {
    use xalloc_global::client::{ConnectError, Connection, HANDSHAKE_TIMEOUT};
    const NOBODY: u32 = 65534;
    let mut plants = vec![Plant::Fifo, Plant::File];
    if is_root("to plant a socket of another user") {
        plants.extend([Plant::OthersStaleSocket, Plant::OthersSilentSocket]);
    }
    let mut failures = Vec::new();
    for plant in plants {
        let guard = Cleanup::new("planted");
        let (name, dir) = (&guard.name, &guard.dir);
        let path = format!("/dev/shm/{name}.socket");
        let c = std::ffi::CString::new(path.clone()).unwrap();
        let mut _listener = None;
        match plant {
            // SAFETY: plain system call on a NUL-terminated path.
            Plant::Fifo => assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o666) }, 0, "mkfifo"),
            Plant::File => std::fs::write(&path, b"").unwrap(),
            Plant::OthersStaleSocket => {
                drop(xalloc_proto::unix::listen(std::path::Path::new(&path), 0o666).unwrap())
            }
            Plant::OthersSilentSocket => {
                _listener =
                    Some(xalloc_proto::unix::listen(std::path::Path::new(&path), 0o666).unwrap())
            }
        }
        if matches!(plant, Plant::OthersStaleSocket | Plant::OthersSilentSocket) {
            std::os::unix::fs::lchown(&path, Some(NOBODY), Some(NOBODY)).unwrap();
        }
        let (at_once, why) = match plant {
            Plant::OthersSilentSocket => (HANDSHAKE_TIMEOUT, "uid 65534"),
            Plant::Fifo | Plant::File => (Duration::ZERO, "not a socket"),
            Plant::OthersStaleSocket => (Duration::ZERO, "uid 65534"),
        };
        // The client: fails, and within the bound (a thread, so that a blocked open would
        // show as a timeout here instead of hanging the test).
        let (tx, rx) = std::sync::mpsc::channel();
        let n = name.clone();
        std::thread::spawn(move || {
            let t = std::time::Instant::now();
            let r = Connection::connect(&n).map(drop);
            let _ = tx.send((r, t.elapsed()));
        });
        match rx.recv_timeout(at_once + Duration::from_secs(5)) {
            Err(_) => failures.push(format!("{plant:?}: connect still blocked after 5 s")),
            Ok((Ok(()), _)) => failures.push(format!("{plant:?}: connected")),
            Ok((Err(e), took)) => {
                let expected = match plant {
                    Plant::OthersSilentSocket => e == ConnectError::Busy,
                    _ => e == ConnectError::NotRunning,
                };
                if !expected || took > at_once + Duration::from_millis(500) {
                    failures.push(format!("{plant:?}: connect failed with {e} after {took:?}"));
                }
            }
        }
        // The daemon: refuses the path, naming it; leaves it in place.
        let out = Command::new(XALLOCD)
            .args(["start", "--name", name, "--arena-size", "1M"])
            .arg("--pidfile")
            .arg(dir.join("pid"))
            .arg("--syslog-socket")
            .arg(dir.join("none"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            failures.push(format!("{plant:?}: start succeeded: {err}"));
        } else if !err.contains(&path) || !err.contains(why) || !err.contains("rm ") {
            failures.push(format!("{plant:?}: start's message: {err}"));
        }
        if std::path::Path::new(&path).symlink_metadata().is_err() {
            failures.push(format!("{plant:?}: start removed it"));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}
