//! Other users: the socket is 0600 unless `--group` (then 0660 and of that group; the state
//! record and the keeper's socket stay 0600); a client of another user falls back cleanly
//! where it may not connect, and is served where the group lets it; objects squatted by
//! another user make `start` refuse. Needs root (to switch users with `setpriv`); CI runs as
//! root, where a missing privilege fails the test instead of skipping it.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const NOBODY: u32 = 65534;
/// A group nobody is not in, used for `--group`.
const GROUP: u32 = 4242;

fn is_root() -> bool {
    common::is_root("to run clients as another user")
}

/// A copy of the `XallocGlobal` test program that user nobody can execute.
fn client_for_nobody(dir: &std::path::Path) -> PathBuf {
    let exe = dir.join("xalloc-global-client");
    std::fs::copy(env!("CARGO_BIN_EXE_xalloc-global-client"), &exe).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    exe
}

/// Runs the client as nobody, with `groups` as supplementary groups; returns its counters.
fn run_as_nobody(exe: &std::path::Path, name: &str, groups: &[u32]) -> (u64, u64) {
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid",
        &NOBODY.to_string(),
        "--regid",
        &NOBODY.to_string(),
    ]);
    if groups.is_empty() {
        cmd.arg("--clear-groups");
    } else {
        let list: Vec<String> = groups.iter().map(u32::to_string).collect();
        cmd.args(["--groups", &list.join(",")]);
    }
    let out = cmd
        .arg(exe)
        .args(["work", "2", "300"])
        .env("XALLOC_NAME", name)
        .current_dir("/")
        .output()
        .expect("run setpriv");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "client as nobody failed: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let field = |k: &str| -> u64 {
        text.split_whitespace()
            .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('=')?.parse().ok())
            .unwrap_or_else(|| panic!("no {k} in {text}"))
    };
    (field("forwarded"), field("fallbacks"))
}

#[test]
fn another_user_falls_back_on_a_private_instance() {
    if !is_root() {
        return;
    }
    let d = TestDaemon::start("private", &["--arena-size", "64M"]);
    let exe = client_for_nobody(&d.dir);
    let socket = std::fs::metadata(format!("/dev/shm/{}.socket", d.name)).unwrap();
    assert_eq!(socket.mode() & 0o777, 0o600);
    // Even in the group: without --group the socket is 0600, so nobody cannot connect.
    let (forwarded, fallbacks) = run_as_nobody(&exe, &d.name, &[GROUP]);
    assert_eq!(forwarded, 0);
    assert!(fallbacks > 0);
    assert_eq!(d.stat("clients"), 0);
    assert_eq!(d.stat("errors"), 0);
}

#[test]
fn group_members_are_served_and_others_are_not() {
    if !is_root() {
        return;
    }
    let d = TestDaemon::start(
        "group",
        &["--arena-size", "64M", "--group", &GROUP.to_string()],
    );
    // Who may connect is the socket's mode and group; the daemon's own objects stay its own.
    let modes: Vec<(u32, u32)> = ["socket", "state", "keeper"]
        .iter()
        .map(|k| {
            let m = std::fs::metadata(format!("/dev/shm/{}.{k}", d.name)).unwrap();
            (m.mode() & 0o777, m.gid())
        })
        .collect();
    assert_eq!(
        modes,
        [(0o660, GROUP), (0o600, 0), (0o600, 0)],
        "socket, state, keeper"
    );
    let exe = client_for_nobody(&d.dir);
    let (forwarded, fallbacks) = run_as_nobody(&exe, &d.name, &[]);
    assert_eq!((forwarded, d.stat("clients")), (0, 0), "not in the group");
    assert!(fallbacks > 0);
    // The daemon checks again from the peer's credentials: with the socket opened to everyone,
    // a user outside the group connects, and is refused with a reason.
    let socket = format!("/dev/shm/{}.socket", d.name);
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let (forwarded, fallbacks) = run_as_nobody(&exe, &d.name, &[]);
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o660)).unwrap();
    assert_eq!(
        (forwarded, d.stat("clients")),
        (0, 0),
        "refused outside the group"
    );
    assert!(fallbacks > 0);
    let log = d.log();
    assert!(
        log.contains(&format!("of user {NOBODY}: not served")),
        "{log}"
    );
    // A member is served, and known to the daemon by the kernel's word: its uid, and its pid.
    let mut member = Child(
        Command::new("setpriv")
            .args([
                "--reuid",
                &NOBODY.to_string(),
                "--regid",
                &NOBODY.to_string(),
            ])
            .args(["--groups", &GROUP.to_string()])
            .arg(&exe)
            .args(["hold-wait", "1", "1048576"])
            .env("XALLOC_NAME", &d.name)
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    BufReader::new(member.0.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("held shared=1 "), "{line}");
    let clients = d.clients();
    assert_eq!(clients.len(), 1, "{clients:?}");
    assert_eq!(clients[0]["uid"], NOBODY, "{clients:?}");
    // setpriv execs the client: the same pid.
    assert_eq!(clients[0]["pid"], member.0.id(), "{clients:?}");
    assert!(clients[0]["bytes"].as_u64() >= Some(1 << 20), "{clients:?}");
    member.0.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    let status = member.0.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let (forwarded, fallbacks) = run_as_nobody(&exe, &d.name, &[GROUP]);
    assert!(forwarded > 0, "group member served");
    assert_eq!(fallbacks, 0);
    let reclaimed = d.wait_for(Duration::from_secs(5), || d.stat("used_bytes") == 0);
    assert!(reclaimed.is_some());
}

/// What another user plants at an object's path.
#[derive(Clone, Copy, Debug)]
enum Plant {
    /// An empty file.
    File,
    /// A socket nobody listens on.
    StaleSocket,
}

/// Plants `plant`, owned by nobody, at `/dev/shm/NAME.KIND` of a fresh instance and runs
/// `xallocd start`; returns what is wrong, if anything: start must refuse, name the object,
/// its owner and the `rm` that removes it (the README's promise for objects of another user),
/// leave the object in place and leave no daemon or keeper running.
fn squatted_by_nobody(kind: &str, plant: Plant) -> Option<String> {
    let guard = Cleanup::new("squatother");
    let (name, dir) = (&guard.name, &guard.dir);
    let path = format!("/dev/shm/{name}.{kind}");
    match plant {
        Plant::File => std::fs::write(&path, b"").unwrap(),
        Plant::StaleSocket => drop(std::os::unix::net::UnixListener::bind(&path).unwrap()),
    }
    std::os::unix::fs::lchown(&path, Some(NOBODY), Some(NOBODY)).unwrap();
    let out = Command::new(XALLOCD)
        .args(["start", "--name", name, "--arena-size", "1M"])
        .arg("--pidfile")
        .arg(dir.join("pid"))
        .arg("--syslog-socket")
        .arg(dir.join("none"))
        .output()
        .unwrap();
    let still_there = Path::new(&path).symlink_metadata().is_ok();
    let err = String::from_utf8_lossy(&out.stderr);
    let mut problems = Vec::new();
    if out.status.success() {
        problems.push(format!("start succeeded: {err}"));
    } else if !err.contains(&path) || !err.contains("uid 65534") {
        problems.push(format!(
            "the message does not name {path} and uid 65534: {err}"
        ));
    } else if !err.contains(&format!("rm {path}")) {
        problems.push(format!("the message does not say `rm {path}`: {err}"));
    }
    if !still_there {
        problems.push("start removed another user's object".into());
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
fn objects_squatted_by_another_user_make_start_refuse() {
    if !is_root() {
        return;
    }
    let failures: Vec<String> = [
        ("socket", Plant::File),
        ("socket", Plant::StaleSocket),
        ("state", Plant::File),
    ]
    .into_iter()
    .filter_map(|(kind, plant)| squatted_by_nobody(kind, plant))
    .collect();
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

/// The keeper's socket path squatted by another user: refused like the other objects, but the
/// message says "remove it if nothing uses it" instead of naming the `rm`, which the README
/// promises for every object of another user ("Objects of another user ... make `start`
/// refuse, naming the object and the `rm` that removes it").
#[test]
fn a_keeper_path_squatted_by_another_user_makes_start_refuse_naming_the_rm() {
    if !is_root() {
        return;
    }
    let failures: Vec<String> = [Plant::File, Plant::StaleSocket]
        .into_iter()
        .filter_map(|plant| squatted_by_nobody("keeper", plant))
        .collect();
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}
