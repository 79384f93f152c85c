//! Other users: segments are 0600 unless `--group`; a client of another user falls back
//! cleanly where it may not attach, and is served where the group lets it; objects squatted by
//! another user make `start` refuse. Needs root (to switch users with `setpriv`); CI runs as
//! root, where a missing privilege fails the test instead of skipping it.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::process::Command;

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
    // Even in the group: without --group the segments are 0600.
    let (forwarded, fallbacks) = run_as_nobody(&exe, &d.name, &[GROUP]);
    assert_eq!(forwarded, 0);
    assert!(fallbacks > 0);
    assert_eq!(d.stat("clients"), 0);
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
    let modes: Vec<(u32, u32)> = ["request", "response", "arena"]
        .iter()
        .map(|k| {
            let m = std::fs::metadata(format!("/dev/shm/{}.{k}", d.name)).unwrap();
            (m.mode() & 0o777, m.gid())
        })
        .collect();
    assert_eq!(
        modes,
        [(0o660, GROUP), (0o640, GROUP), (0o660, GROUP)],
        "request, response, arena"
    );
    let exe = client_for_nobody(&d.dir);
    let (forwarded, fallbacks) = run_as_nobody(&exe, &d.name, &[]);
    assert_eq!((forwarded, d.stat("clients")), (0, 0), "not in the group");
    assert!(fallbacks > 0);
    let (forwarded, fallbacks) = run_as_nobody(&exe, &d.name, &[GROUP]);
    assert!(forwarded > 0, "group member served");
    assert_eq!(fallbacks, 0);
    let reclaimed = d.wait_for(std::time::Duration::from_secs(5), || {
        d.stat("used_bytes") == 0
    });
    assert!(reclaimed.is_some());
}

#[test]
fn objects_squatted_by_another_user_make_start_refuse() {
    if !is_root() {
        return;
    }
    let guard = Cleanup::new("squatother");
    let (name, dir) = (&guard.name, &guard.dir);
    let path = format!("/dev/shm/{name}.arena");
    std::fs::write(&path, b"").unwrap();
    std::os::unix::fs::chown(&path, Some(NOBODY), Some(NOBODY)).unwrap();
    let out = Command::new(XALLOCD)
        .args(["start", "--name", name, "--arena-size", "1M"])
        .arg("--pidfile")
        .arg(dir.join("pid"))
        .arg("--syslog-socket")
        .arg(dir.join("none"))
        .output()
        .unwrap();
    let still_there = std::path::Path::new(&path).exists();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&path) && err.contains("uid 65534"), "{err}");
    assert!(still_there, "start must not remove another user's object");
}
