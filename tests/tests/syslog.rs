//! Logging: what the daemon sends to syslog, and that it reconnects when the syslog server
//! restarts — first with a bare datagram receiver, then with a private `rsyslogd` loaded with
//! the drop-in that `scripts/setup-rsyslog.sh` installs.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn receiver(path: &Path) -> UnixDatagram {
    let _ = std::fs::remove_file(path);
    let s = UnixDatagram::bind(path).expect("bind test syslog socket");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Receives lines until one contains `needle`; returns it.
fn recv_until(s: &UnixDatagram, needle: &str) -> String {
    let mut buf = vec![0u8; 4096];
    loop {
        let n = s
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no line containing {needle:?}: {e}"));
        let line = String::from_utf8_lossy(&buf[..n]).into_owned();
        if line.contains(needle) {
            return line;
        }
    }
}

#[test]
fn lines_are_tagged_xalloc_with_facility_daemon_and_survive_a_server_restart() {
    let guard = Cleanup::new("syslog-rx");
    let sock = guard.dir.join("log.sock");
    let rx = receiver(&sock);
    let d = TestDaemon::start(
        "syslog",
        &[
            "--syslog-socket",
            sock.to_str().unwrap(),
            "--arena-size",
            "4M",
        ],
    );
    let line = recv_until(&rx, "started:");
    // <30> = facility daemon (3) * 8 + severity info (6).
    assert!(line.starts_with("<30>"), "{line}");
    assert!(
        line.contains(&format!(" xalloc[{}]: started:", d.pid)),
        "{line}"
    );
    // The start line says where clients connect and which process keeps the arena.
    assert!(
        line.contains(&format!("/dev/shm/{}.socket", d.name)),
        "{line}"
    );
    assert!(
        line.contains(&format!("keeper pid {}", d.stat("keeper_pid"))),
        "{line}"
    );

    // The server goes away and comes back on a new socket at the same path.
    drop(rx);
    let _ = std::fs::remove_file(&sock);
    d.signal(libc::SIGHUP); // Logged while no server listens: lost (no --log-file).
    std::thread::sleep(Duration::from_millis(100));
    let rx = receiver(&sock);
    d.signal(libc::SIGHUP);
    let line = recv_until(&rx, "stats:");
    assert!(line.starts_with("<30>"), "{line}");
    assert!(line.contains("heap check ok"), "{line}");
}

/// A private rsyslogd on its own socket, with the drop-in's filter writing to `out`.
struct Rsyslogd {
    child: Child,
}

impl Rsyslogd {
    fn start(dir: &Path, sock: &Path, out: &Path) -> Self {
        let dropin = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/rsyslog-xalloc.conf"),
        )
        .expect("scripts/rsyslog-xalloc.conf");
        assert!(dropin.contains("/var/log/xalloc.log"));
        let conf = format!(
            "global(workDirectory=\"{dir}\")\n\
             module(load=\"imuxsock\" SysSock.Use=\"off\")\n\
             input(type=\"imuxsock\" Socket=\"{sock}\")\n\
             {filter}\n",
            dir = dir.display(),
            sock = sock.display(),
            filter = dropin.replace("/var/log/xalloc.log", &out.display().to_string()),
        );
        let conf_path = dir.join("rsyslog.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let child = Command::new("rsyslogd")
            .arg("-n")
            .arg("-f")
            .arg(&conf_path)
            .arg("-i")
            .arg(dir.join("rsyslogd.pid"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run rsyslogd");
        let r = Self {
            child: Child(child),
        };
        let up = (0..500).any(|_| {
            std::thread::sleep(Duration::from_millis(10));
            std::os::unix::net::UnixDatagram::unbound()
                .and_then(|s| s.connect(sock))
                .is_ok()
        });
        assert!(up, "private rsyslogd did not open {}", sock.display());
        r
    }

    fn stop(mut self) {
        // SAFETY: our own child, not yet reaped.
        unsafe { libc::kill(self.child.0.id() as i32, libc::SIGTERM) };
        let _ = self.child.0.wait();
    }
}

fn wait_for_line(path: &Path, needle: &str) -> bool {
    (0..1000).any(|_| {
        if std::fs::read_to_string(path).is_ok_and(|s| s.contains(needle)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
        false
    })
}

fn rsyslogd_available() -> bool {
    let found = Command::new("rsyslogd")
        .arg("-v")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        // CI installs rsyslog (.ci/run); there, its absence is a failure, not a skip.
        assert!(
            std::env::var_os("CI").is_none(),
            "rsyslogd is not installed; .ci/run installs it (apt-get install -y rsyslog)"
        );
        eprintln!("SKIPPED: rsyslogd not installed (apt-get install -y rsyslog)");
    }
    found
}

#[test]
fn rsyslog_with_the_shipped_filter_gets_the_lines_before_and_after_a_restart() {
    if !rsyslogd_available() {
        return;
    }
    let guard = Cleanup::new("rsyslog");
    let dir: PathBuf = guard.dir.clone();
    let sock = dir.join("log.sock");
    let out = dir.join("xalloc.log");
    let rs = Rsyslogd::start(&dir, &sock, &out);
    let d = TestDaemon::start(
        "rsyslog",
        &[
            "--syslog-socket",
            sock.to_str().unwrap(),
            "--arena-size",
            "4M",
        ],
    );
    assert!(
        wait_for_line(&out, &format!("xalloc[{}]: started:", d.pid)),
        "start line in {}",
        out.display()
    );

    rs.stop();
    let rs = Rsyslogd::start(&dir, &sock, &out);
    d.signal(libc::SIGHUP);
    assert!(
        wait_for_line(&out, "heap check ok"),
        "line logged after the restart lands too: {}",
        std::fs::read_to_string(&out).unwrap_or_default()
    );
    rs.stop();
    drop(d);
}
