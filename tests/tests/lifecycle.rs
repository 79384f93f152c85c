//! The daemon's life cycle: detaching, the pidfile, a second start, stop, a killed daemon's
//! leftovers (its keeper, which still holds the arena), squatted objects, status, SIGHUP, and
//! `--foreground` with sd_notify.

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use xalloc_proto::os;

/// Whether process `pid` still runs (a zombie counts as gone).
fn running(pid: u32) -> bool {
    os::pidfd_open(pid).is_ok_and(|fd| !os::pidfd_exited(&fd))
}

/// Checks the instance's objects in `/dev/shm`: exactly its socket, its keeper's socket and its
/// state record, each 0600, and nothing under the names of the old protocol's segments (the
/// arena is a memfd without a name).
fn check_objects(name: &str) {
    let left = segments_left(name);
    assert_eq!(left.len(), 3, "{left:?}");
    for obj in &left {
        let meta = std::fs::symlink_metadata(obj).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{obj}");
        let socket = obj.ends_with(".socket") || obj.ends_with(".keeper");
        assert_eq!(meta.file_type().is_socket(), socket, "{obj}");
    }
    for old in ["arena", "request", "response"] {
        let path = format!("/dev/shm/{name}.{old}");
        assert!(!Path::new(&path).exists(), "{path} exists");
    }
}

/// The processes of instance `name`, sorted.
fn processes(name: &str) -> Vec<(u32, Role)> {
    let mut p = instance_processes(name);
    p.sort_by_key(|&(pid, _)| pid);
    p
}

#[test]
fn start_detaches_and_stop_leaves_nothing_behind() {
    let d = TestDaemon::start("detach", &[]);
    let me = std::process::id() as i64;
    // Fields of /proc/PID/stat: 4 ppid, 6 session, 7 tty_nr.
    let ppid = proc_stat_field(d.pid, 4).expect("daemon's stat");
    let session = proc_stat_field(d.pid, 6).expect("daemon's stat");
    let tty = proc_stat_field(d.pid, 7).expect("daemon's stat");
    let my_session = proc_stat_field(std::process::id(), 6).expect("own stat");
    assert_ne!(ppid, me, "the daemon's parent is not the caller");
    assert_eq!(tty, 0, "no controlling terminal");
    assert_ne!(session, my_session, "its own session");
    assert_ne!(session, d.pid as i64, "not a session leader (forked twice)");
    // The working directory is /.
    assert_eq!(
        std::fs::read_link(format!("/proc/{}/cwd", d.pid)).unwrap(),
        std::path::Path::new("/")
    );
    // Standard streams point at /dev/null.
    for fd in 0..3 {
        assert_eq!(
            std::fs::read_link(format!("/proc/{}/fd/{fd}", d.pid)).unwrap(),
            std::path::Path::new("/dev/null"),
            "fd {fd}"
        );
    }
    // It serves: status comes over its socket, from the daemon itself.
    assert_eq!(d.stat("pid"), u64::from(d.pid));
    check_objects(&d.name);
    // Its keeper is a process of its own, in the daemon's session and without a terminal, that
    // answers on the keeper's socket; status names it.
    let keeper = keeper_pid(&d.name).expect("a keeper answers on NAME.keeper");
    assert_ne!(keeper, d.pid);
    assert_eq!(d.stat("keeper_pid"), u64::from(keeper));
    assert_eq!(proc_stat_field(keeper, 7), Some(0), "the keeper's terminal");
    assert_eq!(
        proc_stat_field(keeper, 6),
        Some(session),
        "the keeper's session"
    );
    let mut both = vec![(d.pid, Role::Daemon), (keeper, Role::Keeper)];
    both.sort_by_key(|&(pid, _)| pid);
    assert_eq!(processes(&d.name), both);

    // A second start of the same name fails and leaves the first untouched.
    let again = d.start_command(&[]);
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("already running"), "{err}");
    assert!(err.contains(&d.pid.to_string()), "{err}");
    assert!(d.alive());
    assert_eq!(d.stat("pid"), u64::from(d.pid));
    assert_eq!(keeper_pid(&d.name), Some(keeper), "the keeper is untouched");

    let out = d.xallocd(&["stop"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!d.alive(), "stop returns after the daemon exited");
    assert!(segments_left(&d.name).is_empty(), "objects removed");
    assert!(!d.pidfile().exists(), "pidfile removed");
    // A clean stop tells the keeper to quit (it lets go of the arena).
    let quit = d.wait_for(Duration::from_secs(5), || !running(keeper));
    assert!(quit.is_some(), "the keeper {keeper} still runs after stop");
    assert!(processes(&d.name).is_empty(), "{:?}", processes(&d.name));
    let log = d.log();
    assert!(log.contains("started: instance"), "{log}");
    assert!(log.contains("stopped:"), "{log}");
    // The start line names where clients connect, and the keeper.
    assert!(
        log.contains(&format!("/dev/shm/{}.socket", d.name)),
        "{log}"
    );
    assert!(log.contains(&format!("keeper pid {keeper}")), "{log}");
}

#[test]
fn inherited_descriptors_are_closed() {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for two; no CLOEXEC, so `xallocd start` inherits the write end.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let d = TestDaemon::start("fds", &["--arena-size", "1M"]);
    // SAFETY: closing our own descriptor.
    unsafe { libc::close(fds[1]) };
    // The daemon and its keeper run; the pipe reads end-of-file only if no process (neither of
    // them) holds the write end.
    assert!(keeper_pid(&d.name).is_some());
    let mut p = libc::pollfd {
        fd: fds[0],
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let ready = unsafe { libc::poll(&mut p, 1, 5000) };
    let mut b = [0u8; 1];
    // SAFETY: reading one byte into `b`.
    let n = unsafe { libc::read(fds[0], b.as_mut_ptr().cast(), 1) };
    // SAFETY: closing our own descriptor.
    unsafe { libc::close(fds[0]) };
    assert!(d.alive());
    assert_eq!(
        (ready, n),
        (1, 0),
        "the daemon or its keeper kept an inherited descriptor open"
    );
}

#[test]
fn a_killed_daemon_does_not_block_a_restart() {
    let mut d = TestDaemon::start("stale", &[]);
    let first = d.pid;
    let keeper = keeper_pid(&d.name).expect("keeper");
    d.signal(libc::SIGKILL);
    assert!(d.wait_exit(Duration::from_secs(5)));
    // The pidfile and the objects are still there, but nobody holds the lock; the keeper still
    // runs and holds the arena.
    assert!(d.pidfile().exists());
    assert_eq!(
        segments_left(&d.name).len(),
        3,
        "{:?}",
        segments_left(&d.name)
    );
    assert_eq!(
        keeper_pid(&d.name),
        Some(keeper),
        "the keeper outlives its daemon"
    );
    let out = d.start_command(&[]);
    assert!(
        out.status.success(),
        "restart after SIGKILL: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    d.adopt();
    assert_ne!(d.pid, first);
    assert_eq!(d.stat("pid"), u64::from(d.pid));
    assert!(d.log().contains("re-attached to the existing segments"));
    // The same keeper handed the arena back, and goes on keeping it.
    assert_eq!(d.stat("keeper_pid"), u64::from(keeper));
    assert_eq!(keeper_pid(&d.name), Some(keeper));
    // Killed again, and restarted with --fresh: the old keeper lets go of the old arena and
    // quits; a new keeper holds a new one.
    d.signal(libc::SIGKILL);
    assert!(d.wait_exit(Duration::from_secs(5)));
    let out = d.start_command(&["--fresh"]);
    assert!(
        out.status.success(),
        "restart with --fresh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    d.adopt();
    let log = d.log();
    assert!(
        log.contains("left by a daemon that is no longer running (--fresh)"),
        "{log}"
    );
    assert!(
        log.contains(&format!("removed the keeper (pid {keeper})")),
        "{log}"
    );
    assert!(!running(keeper), "the old keeper {keeper} still runs");
    let new_keeper = d.stat("keeper_pid");
    assert_ne!(new_keeper, u64::from(keeper));
    assert_eq!(keeper_pid(&d.name).map(u64::from), Some(new_keeper));
}

/// What a test plants at one of an instance's object paths.
#[derive(Debug)]
enum Plant {
    /// A file of 8 KiB of 0x5a (not an object of this layout).
    Garbage,
    /// A `SOCK_SEQPACKET` socket the test listens on, as another xallocd would.
    LiveSocket,
    /// A `SOCK_STREAM` socket the test listens on (some other program's).
    LiveStreamSocket,
}

/// Plants `plant` at `/dev/shm/NAME.KIND` of a fresh instance and runs `xallocd start` for it;
/// returns what is wrong (`why` is a word the message must hold), if anything: start must
/// refuse, name the object and say how to remove it, leave the object in place and leave no
/// daemon or keeper running.
fn squat(kind: &str, plant: &Plant, why: &str) -> Option<String> {
    let guard = Cleanup::new("squat");
    let (name, dir) = (&guard.name, &guard.dir);
    let squat = format!("/dev/shm/{name}.{kind}");
    let mut problems = Vec::new();
    let _listener: Option<Box<dyn std::any::Any>> = match plant {
        Plant::Garbage => {
            std::fs::write(&squat, vec![0x5a; 8192]).unwrap();
            None
        }
        Plant::LiveSocket => Some(Box::new(
            xalloc_proto::unix::listen(Path::new(&squat), 0o600).unwrap(),
        )),
        Plant::LiveStreamSocket => Some(Box::new(UnixListener::bind(&squat).unwrap())),
    };
    let out = Command::new(XALLOCD)
        .args(["start", "--name", name, "--arena-size", "1M"])
        .arg("--pidfile")
        .arg(dir.join("pid"))
        .arg("--syslog-socket")
        .arg(dir.join("none"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    // For a file of this user's own at the keeper's path the keeper's message says "remove it"
    // without the command (the README promises the `rm` for objects of another user, checked
    // in `users.rs`).
    let says_how =
        err.contains(&format!("rm {squat}")) || (kind == "keeper" && err.contains("remove it"));
    if out.status.success() {
        problems.push(format!("start succeeded: {err}"));
    } else if !err.contains(&squat) || !err.contains(why) {
        problems.push(format!("the message does not name {squat} ({why}): {err}"));
    } else if !says_how {
        problems.push(format!("the message does not say how to remove it: {err}"));
    }
    if Path::new(&squat).symlink_metadata().is_err() {
        problems.push("start removed the squatted object".into());
    }
    // A refused daemon exits right after it reported its error to `start`.
    let t = std::time::Instant::now();
    while !instance_processes(name).is_empty() && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let left = instance_processes(name);
    if !left.is_empty() {
        problems.push(format!("left processes {left:?}"));
    }
    (!problems.is_empty()).then(|| format!("{kind} {plant:?}: {}", problems.join("; ")))
}

#[test]
fn squatted_objects_make_start_fail_with_a_clear_message() {
    // Each object of an instance, squatted by this user. (Objects of another user: `users.rs`;
    // a FIFO at the socket's path: `arena_edges.rs`.)
    let failures: Vec<String> = [
        ("state", Plant::Garbage, "not a state record"),
        ("socket", Plant::Garbage, "not a socket"),
        ("socket", Plant::LiveSocket, "in use by process"),
        ("keeper", Plant::Garbage, "not a keeper's socket"),
    ]
    .iter()
    .filter_map(|(kind, plant, why)| squat(kind, plant, why))
    .collect();
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

/// The README: "a socket a live process answers on" makes `start` refuse. A stream socket
/// (another program's) at the socket's path is one, but `start` only tries a `SOCK_SEQPACKET`
/// connection, takes the `EPROTOTYPE` for "nobody answers", unlinks the socket and binds its
/// own in its place.
#[test]
fn a_live_stream_socket_at_the_socket_path_is_not_replaced() {
    if let Some(problem) = squat("socket", &Plant::LiveStreamSocket, "in use by process") {
        panic!("{problem}");
    }
}

#[test]
fn bad_arguments_are_refused_with_a_reason() {
    for (args, says) in [
        (vec!["start", "--arena-size", "12Q"], "not a size"),
        (vec!["start", "--arena-size", "1K"], "too small"),
        (vec!["start", "--name", "a/b"], "not a valid instance name"),
        (vec!["start", "--slots", "0"], "slots"),
    ] {
        let out = Command::new(XALLOCD).args(&args).output().unwrap();
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
    }
    let name = unique_name("absent");
    let out = Command::new(XALLOCD)
        .args(["status", "--name", &name])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not running"));
}

#[test]
fn status_json_has_the_contract_fields_and_sighup_logs_a_line() {
    let d = TestDaemon::start(
        "status",
        &[
            "--arena-size",
            "8M",
            "--slots",
            "16",
            "--client-quota",
            "4M",
        ],
    );
    let s = d.status();
    for field in [
        "name",
        "state",
        "pid",
        "arena_bytes",
        "used_bytes",
        "free_bytes",
        "largest_free_bytes",
        "live_blocks",
        "clients",
        "processes",
        "watched",
        "slots_per_client",
        "requests",
        "errors",
        "reserved_bytes",
        "resident_bytes",
        "started_unix",
        "huge_pages",
        "keeper_pid",
        "client_quota",
        "user_quota",
    ] {
        assert!(s.contains_key(field), "missing {field} in {s:?}");
    }
    // The old protocol's machine-wide slot table is gone.
    for gone in ["slots", "slots_total"] {
        assert!(!s.contains_key(gone), "{gone} in {s:?}");
    }
    assert_eq!(s["name"], d.name);
    assert_eq!(s["state"], "running");
    assert_eq!(s["arena_bytes"], (8u64 << 20).to_string());
    assert_eq!(s["used_bytes"], "0");
    assert_eq!(s["clients"], "0");
    assert_eq!(s["slots_per_client"], "16");
    assert_eq!(s["client_quota"], (4u64 << 20).to_string());
    assert_eq!(s["user_quota"], "null", "unlimited");
    assert!(
        s["huge_pages"] == "true" || s["huge_pages"] == "false",
        "{s:?}"
    );
    let keeper = keeper_pid(&d.name).expect("keeper");
    assert_eq!(s["keeper_pid"], keeper.to_string());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let started: u64 = s["started_unix"].parse().unwrap();
    assert!(started <= now && now - started < 600, "{s:?}");
    // A client: counted as a connection and a process, listed by `--clients`.
    assert_eq!(d.clients(), Vec::<serde_json::Value>::new());
    let mut holder = Child(
        Command::new(CLIENT)
            .args(["hold", &d.name, "1", "65536"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.0.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    assert!(line.starts_with("held "), "{line}");
    let s = d.status();
    assert_eq!((&*s["clients"], &*s["processes"]), ("1", "1"), "{s:?}");
    assert_eq!(s["used_bytes"], "65536", "{s:?}");
    let clients = d.clients();
    assert_eq!(clients.len(), 1, "{clients:?}");
    let c = &clients[0];
    for key in [
        "id",
        "pid",
        "uid",
        "command",
        "bytes",
        "blocks",
        "cached_bytes",
        "requests",
        "connected",
    ] {
        assert!(c.get(key).is_some(), "missing {key} in {c}");
    }
    assert_eq!(c["pid"], holder.0.id());
    // SAFETY: plain query.
    assert_eq!(c["uid"], unsafe { libc::geteuid() });
    assert_eq!(
        (c["bytes"].as_u64(), c["blocks"].as_u64()),
        (Some(65536), Some(1)),
        "{c}"
    );
    drop(holder);
    let gone = d.wait_for(Duration::from_secs(5), || d.stat("clients") == 0);
    assert!(gone.is_some(), "{:?}", d.status());

    let line = d.stats_line();
    assert!(line.contains("0 live blocks"), "{line}");
    assert!(line.contains("heap check ok"), "{line}");
    let table = d.xallocd(&["status"]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains("largest free block"), "{text}");
    assert!(text.contains("0 (0 processes)"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("slots per client") && l.ends_with(" 16")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("keeper pid") && l.ends_with(&format!(" {keeper}"))),
        "{text}"
    );
}

#[test]
fn foreground_reports_readiness_to_notify_socket_and_exits_on_sigterm() {
    let guard = Cleanup::new("fg");
    let (name, dir) = (&guard.name, &guard.dir);
    let sock_path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let child = Command::new(XALLOCD)
        .args([
            "start",
            "--foreground",
            "--name",
            name,
            "--arena-size",
            "1M",
        ])
        .arg("--pidfile")
        .arg(dir.join("pid"))
        .arg("--syslog-socket")
        .arg(dir.join("none"))
        .env("NOTIFY_SOCKET", &sock_path)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut child = Child(child);
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).expect("READY=1 within 10 s");
    assert_eq!(&buf[..n], b"READY=1");
    // Ready means serving: the objects exist, and the keeper runs.
    check_objects(name);
    let keeper = keeper_pid(name).expect("keeper");
    // SAFETY: signalling our own child, which has not been reaped.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
    let status = child.0.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(segments_left(name).is_empty());
    // The keeper was told to quit before the daemon exited.
    let t = std::time::Instant::now();
    while running(keeper) && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(!running(keeper), "the keeper {keeper} still runs");
}
