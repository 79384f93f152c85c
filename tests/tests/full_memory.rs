//! A `/dev/shm` smaller than the arena: in a private mount namespace (root), a 6 MiB tmpfs on
//! /dev/shm under a 64 MiB arena. Allocations that need pages past the limit are refused with
//! `OutOfMemory`, no client gets SIGBUS, `XallocGlobal` falls back, and the daemon logs the
//! condition once.

mod common;

use std::process::Command;

use common::*;

const GLOBAL_CLIENT: &str = env!("CARGO_BIN_EXE_xalloc-global-client");

/// Whether this process may make a private mount namespace (it is root; see [`is_root`]).
fn may_unshare() -> bool {
    is_root("for a private mount namespace")
}

/// Runs shell `script` in a private mount namespace; its output, stdout and stderr.
fn in_private_mount_namespace(script: &str) -> (std::process::Output, String, String) {
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", script])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stdout, stderr)
}

#[test]
fn a_full_dev_shm_gives_out_of_memory_never_sigbus() {
    if !may_unshare() {
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
    let (out, stdout, stderr) = in_private_mount_namespace(&script);
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
    let (blocks, rest) = filled.split_once(' ').unwrap();
    let (refused, _) = rest.split_once(' ').unwrap();
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

/// Huge pages where `/dev/shm` allows them (a private tmpfs mounted `huge=advise`, 16 MiB), by
/// default (`--huge-pages auto`): every 2 MiB block the client writes is mapped through a huge
/// page, the daemon reserves chunks without `SIGBUS` up to the limit and refuses the rest; the
/// same run with `--huge-pages off` maps none.
#[test]
fn huge_pages_back_the_arena_when_asked_for_and_allowed() {
    if !may_unshare() {
        return;
    }
    let guard = Cleanup::new("huge");
    let (name, dir) = (&guard.name, &guard.dir);
    let log = dir.join("xallocd.log");
    let script = format!(
        r#"set -eu
mount -t tmpfs -o size=16M,huge=advise tmpfs /dev/shm
for flag in "" "--huge-pages off"; do
    "{xallocd}" start --name {name} --arena-size 64M --pidfile {dir}/pid --log-file {log} \
        --syslog-socket {dir}/none $flag
    trap '"{xallocd}" stop --name {name} --pidfile {dir}/pid' EXIT
    echo "flag=${{flag:-auto}} $("{client}" fill {name} 2097152)"
    "{xallocd}" status --name {name} --json
    "{xallocd}" stop --name {name} --pidfile {dir}/pid
    trap - EXIT
done
"#,
        xallocd = XALLOCD,
        client = CLIENT,
        dir = dir.display(),
        log = log.display(),
    );
    let (out, stdout, stderr) = in_private_mount_namespace(&script);
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    let all = format!("{stdout}\n{stderr}\nlog:\n{log_text}");
    assert!(out.status.success(), "in the namespace: {all}");
    let field = |line: &str, key: &str| -> u64 {
        line.split(key)
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {line:?}: {all}"))
    };
    let runs: Vec<&str> = stdout.lines().filter(|l| l.starts_with("flag=")).collect();
    assert_eq!(runs.len(), 2, "{all}");
    let (with, without) = (runs[0], runs[1]);
    assert!(with.starts_with("flag=auto filled "), "{all}");
    // 16 MiB of tmpfs: the header page takes a 4 KiB page, so 7 huge pages fit.
    let blocks = field(with, "filled ");
    assert_eq!(blocks, 7, "2 MiB blocks in a 16 MiB tmpfs: {all}");
    assert!(with.contains("refused=Refused(OutOfMemory) "), "{all}");
    assert_eq!(
        field(with, "pmd_kib="),
        blocks * 2048,
        "every block on a huge page: {all}"
    );
    assert_eq!(
        field(without, "pmd_kib="),
        0,
        "no huge pages with --huge-pages off: {all}"
    );
    assert!(field(without, "filled ") >= 7, "{all}");
    assert!(stdout.contains("\"huge_pages\":true"), "{all}");
    assert!(stdout.contains("\"huge_pages\":false"), "{all}");
    assert!(
        log_text.contains("huge pages asked for on the arena"),
        "{all}"
    );
}
