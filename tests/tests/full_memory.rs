//! A `/dev/shm` smaller than the arena: in a private mount namespace (root), a 6 MiB tmpfs on
//! /dev/shm under a 64 MiB arena. Allocations that need pages past the limit are refused with
//! `OutOfMemory`, no client gets SIGBUS, `XallocGlobal` falls back, and the daemon logs the
//! condition once.

mod common;

use std::process::Command;

use common::*;

const GLOBAL_CLIENT: &str = env!("CARGO_BIN_EXE_xalloc-global-client");

#[test]
fn a_full_dev_shm_gives_out_of_memory_never_sigbus() {
    // SAFETY: plain query.
    if unsafe { libc::geteuid() } != 0 {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs as root; this test needs it"
        );
        eprintln!("SKIPPED: not root (needed for a private mount namespace)");
        return;
    }
    // The segments live in the namespace's tmpfs; the guard removes the directory.
    let guard = Cleanup::new("full");
    let (name, dir) = (&guard.name, &guard.dir);
    let log = dir.join("xallocd.log");
    // Everything runs inside the namespace; the daemon is stopped there, and the tmpfs (with
    // the segments) disappears with the namespace's last process.
    let script = format!(
        r#"set -eu
mount -t tmpfs -o size=6M tmpfs /dev/shm
"{xallocd}" start --name {name} --arena-size 64M --pidfile {dir}/pid --log-file {log} \
    --syslog-socket {dir}/none
trap '"{xallocd}" stop --name {name} --pidfile {dir}/pid' EXIT
"{client}" fill {name} 1048576
XALLOC_NAME={name} "{global}" work 2 300
"#,
        xallocd = XALLOCD,
        client = CLIENT,
        global = GLOBAL_CLIENT,
        dir = dir.display(),
        log = log.display(),
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        out.status.success(),
        "in the namespace: {stdout}\n{stderr}\nlog:\n{log_text}"
    );
    // The protocol client got some blocks, then OutOfMemory only, and survived writing them.
    let filled = stdout
        .lines()
        .find_map(|l| l.strip_prefix("filled "))
        .unwrap_or_else(|| panic!("{stdout}"));
    let (blocks, refused) = filled.split_once(' ').unwrap();
    let blocks: u64 = blocks.parse().unwrap();
    assert!(
        (2..6).contains(&blocks),
        "1 MiB blocks in a 6 MiB tmpfs: {blocks}"
    );
    assert_eq!(refused, "refused=Refused(OutOfMemory)");
    // XallocGlobal ran to the end, falling back for what did not fit.
    let ok = stdout
        .lines()
        .find(|l| l.starts_with("ok "))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(!ok.contains("fallbacks=0 "), "{ok}");
    // Logged once, although dozens of requests were refused.
    assert_eq!(
        log_text.matches("cannot reserve arena pages").count(),
        1,
        "{log_text}"
    );
}
