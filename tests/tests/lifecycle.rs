//! The daemon's life cycle: detaching, the pidfile, a second start, stop, a killed daemon's
//! leftovers, squatted segments, status, SIGHUP, and `--foreground` with sd_notify.

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::Duration;

use common::*;

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
    // It serves: status reads its pid from the response segment.
    assert_eq!(d.stat("pid"), u64::from(d.pid));
    assert_eq!(segments_left(&d.name).len(), 4);
    for seg in segments_left(&d.name) {
        let mode = std::fs::metadata(&seg).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600,
            "{seg}"
        );
    }

    // A second start of the same name fails and leaves the first untouched.
    let again = d.start_command(&[]);
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("already running"), "{err}");
    assert!(err.contains(&d.pid.to_string()), "{err}");
    assert!(d.alive());
    assert_eq!(d.stat("pid"), u64::from(d.pid));

    let out = d.xallocd(&["stop"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!d.alive(), "stop returns after the daemon exited");
    assert!(segments_left(&d.name).is_empty(), "segments removed");
    assert!(!d.pidfile().exists(), "pidfile removed");
    let log = d.log();
    assert!(log.contains("started: instance"), "{log}");
    assert!(log.contains("stopped:"), "{log}");
    assert!(log.contains(&format!("/{}.arena", d.name)), "{log}");
}

#[test]
fn inherited_descriptors_are_closed() {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for two; no CLOEXEC, so `xallocd start` inherits the write end.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let d = TestDaemon::start("fds", &["--arena-size", "1M"]);
    // SAFETY: closing our own descriptor.
    unsafe { libc::close(fds[1]) };
    // The daemon runs; the pipe reads end-of-file only if no process holds the write end.
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
        "the daemon kept an inherited descriptor open"
    );
}

#[test]
fn a_killed_daemon_does_not_block_a_restart() {
    let mut d = TestDaemon::start("stale", &[]);
    let first = d.pid;
    d.signal(libc::SIGKILL);
    assert!(d.wait_exit(Duration::from_secs(5)));
    // The pidfile and the segments are still there, but nobody holds the lock.
    assert!(d.pidfile().exists());
    assert_eq!(segments_left(&d.name).len(), 4);
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
    // Killed again, and restarted with --fresh: the old objects are replaced instead.
    d.signal(libc::SIGKILL);
    assert!(d.wait_exit(Duration::from_secs(5)));
    let out = d.start_command(&["--fresh"]);
    assert!(
        out.status.success(),
        "restart with --fresh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    d.adopt();
    assert!(d
        .log()
        .contains("left by a daemon that is no longer running (--fresh)"));
}

#[test]
fn squatted_segments_make_start_fail_with_a_clear_message() {
    let guard = Cleanup::new("squat");
    let (name, dir) = (&guard.name, &guard.dir);
    let squat = format!("/dev/shm/{name}.response");
    std::fs::write(&squat, vec![0x5a; 8192]).unwrap();
    let out = Command::new(XALLOCD)
        .args(["start", "--name", name, "--arena-size", "1M"])
        .arg("--pidfile")
        .arg(dir.join("pid"))
        .arg("--syslog-socket")
        .arg(dir.join("none"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&squat), "names the object: {err}");
    assert!(err.contains("rm "), "says how to clean up: {err}");
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
    let d = TestDaemon::start("status", &["--arena-size", "8M", "--slots", "16"]);
    let s = d.status();
    for field in [
        "pid",
        "arena_bytes",
        "used_bytes",
        "free_bytes",
        "largest_free_bytes",
        "live_blocks",
        "clients",
        "requests",
        "errors",
    ] {
        assert!(s.contains_key(field), "missing {field} in {s:?}");
    }
    assert_eq!(s["arena_bytes"], (8u64 << 20).to_string());
    assert_eq!(s["used_bytes"], "0");
    assert_eq!(s["slots_total"], "16");
    let line = d.stats_line();
    assert!(line.contains("0 live blocks"), "{line}");
    assert!(line.contains("heap check ok"), "{line}");
    let table = d.xallocd(&["status"]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains("largest free block"), "{text}");
    assert!(text.contains("0 of 16"), "{text}");
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
    // Ready means serving: the segments exist.
    assert_eq!(segments_left(name).len(), 4);
    // SAFETY: signalling our own child, which has not been reaped.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
    let status = child.0.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(segments_left(name).is_empty());
}
