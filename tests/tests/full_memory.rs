//! Memory limits and huge pages. The arena is a memfd whose pages are charged to the daemon's
//! memory cgroup (a small tmpfs on `/dev/shm` no longer bounds it): a daemon started in a
//! memory cgroup smaller than its arena refuses the allocations whose pages the cgroup cannot
//! give with `OutOfMemory`, no client gets SIGBUS, `XallocGlobal` falls back, and the daemon
//! logs the condition once. Huge pages for a memfd follow
//! `/sys/kernel/mm/transparent_hugepage/shmem_enabled`, which a test sets for its duration.
//!
//! Both need root (a cgroup, a sysfs setting); CI runs as root, where a missing privilege or
//! facility fails the test instead of skipping it.

mod common;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;

const GLOBAL_CLIENT: &str = env!("CARGO_BIN_EXE_xalloc-global-client");

/// The cgroup v1 memory controller's mount.
const MEMORY_CGROUPS: &str = "/sys/fs/cgroup/memory";

/// The kernel's policy for huge pages of shared memory (memfds included).
const SHMEM_THP: &str = "/sys/kernel/mm/transparent_hugepage/shmem_enabled";

/// One test of this file at a time: the huge-page test changes a machine-wide setting, which a
/// daemon started meanwhile by the other test would read.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Skips the test with a line saying `why`, except under CI (`CI` set), where what it lacks is
/// provided and its absence fails the test.
fn skip(why: &str) {
    assert!(std::env::var_os("CI").is_none(), "under CI: {why}");
    eprintln!("SKIPPED: {why}");
}

/// A child memory cgroup of this process's own (cgroup v1), with a limit and the OOM killer
/// disabled, so that a charge past the limit fails (`fallocate` gets `ENOMEM`) instead of
/// killing a process. Dropping it kills (SIGKILL, by pidfd) what still runs in it, then removes
/// it.
struct MemCgroup {
    path: PathBuf,
}

impl MemCgroup {
    /// The memory cgroup this process is in, if the v1 memory controller is mounted.
    fn own() -> Option<PathBuf> {
        let mount = Path::new(MEMORY_CGROUPS);
        if !mount.join("memory.limit_in_bytes").exists() {
            return None;
        }
        let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        let rel = own.lines().find_map(|l| {
            let (_, rest) = l.split_once(':')?;
            let (controllers, path) = rest.split_once(':')?;
            controllers
                .split(',')
                .any(|c| c == "memory")
                .then_some(path)
        })?;
        Some(mount.join(rel.trim_start_matches('/')))
    }

    /// Makes cgroup `name` below `parent`, limited to `limit` bytes, the OOM killer disabled.
    fn new(parent: &Path, name: &str, limit: u64) -> Self {
        let path = parent.join(name);
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        let cg = Self { path };
        cg.write("memory.limit_in_bytes", &limit.to_string());
        cg.write("memory.oom_control", "1");
        assert!(
            cg.read("memory.oom_control").contains("oom_kill_disable 1"),
            "{}",
            cg.read("memory.oom_control")
        );
        cg
    }

    fn write(&self, file: &str, value: &str) {
        let p = self.path.join(file);
        std::fs::write(&p, value).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
    }

    fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.path.join(file)).unwrap_or_default()
    }

    /// A number from `file`, or from the line `key N` of `file`.
    fn number(&self, file: &str, key: Option<&str>) -> u64 {
        let text = self.read(file);
        let v = match key {
            None => text.trim(),
            Some(k) => text
                .lines()
                .find_map(|l| l.strip_prefix(k)?.strip_prefix(' '))
                .unwrap_or_else(|| panic!("no {k} in {file}: {text}")),
        };
        v.trim()
            .parse()
            .unwrap_or_else(|e| panic!("{file}: {v:?}: {e}"))
    }

    /// The processes in the cgroup.
    fn pids(&self) -> Vec<u32> {
        self.read("cgroup.procs")
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// The shell command line that moves itself into the cgroup and then runs its arguments:
    /// what they start stays in the cgroup.
    fn wrapper(&self) -> [String; 3] {
        let procs = self.path.join("cgroup.procs");
        [
            "sh".into(),
            "-c".into(),
            format!(r#"echo $$ > '{}' && exec "$0" "$@""#, procs.display()),
        ]
    }
}

impl Drop for MemCgroup {
    fn drop(&mut self) {
        // Only processes this test started are in its cgroup; a SIGKILL also ends one that
        // waits in the cgroup's OOM handling.
        let t = Instant::now();
        loop {
            for pid in self.pids() {
                kill_and_wait(pid);
            }
            match std::fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(e) if t.elapsed() > Duration::from_secs(10) => {
                    eprintln!("cannot remove {}: {e}", self.path.display());
                    return;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

/// The fields of the `filled N refused=S pmd_kib=K` line of `xalloc-test-client fill`.
struct Filled {
    blocks: u64,
    refused: String,
    pmd_kib: u64,
}

/// Runs `xalloc-test-client fill NAME SIZE`: it must exit 0 (a page the daemon did not reserve
/// would raise SIGBUS in it).
fn fill(name: &str, size: u64) -> Filled {
    let out = Command::new(CLIENT)
        .args(["fill", name, &size.to_string()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fill: {:?} (a SIGBUS is signal 7): {stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("filled "))
        .unwrap_or_else(|| panic!("no filled line: {stdout}"));
    let field = |key: &str| -> &str {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in {line}"))
    };
    let number = |v: &str| -> u64 { v.parse().unwrap_or_else(|e| panic!("{line}: {e}")) };
    Filled {
        blocks: number(line.split(' ').next().unwrap_or_default()),
        refused: field("refused=").to_owned(),
        pmd_kib: number(field("pmd_kib=")),
    }
}

#[test]
fn a_memory_limited_daemon_gives_out_of_memory_never_sigbus() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    if !is_root("to make a memory cgroup") {
        return;
    }
    let Some(parent) = MemCgroup::own() else {
        skip(&format!(
            "the cgroup v1 memory controller is not mounted at {MEMORY_CGROUPS}"
        ));
        return;
    };
    // Both ways the daemon reserves pages: `fallocate`, and with `--huge-pages on` writing
    // through its mapping (`MADV_POPULATE_WRITE`), whose partial pages are given back.
    for reserve in ["off", "on"] {
        memory_limited(&parent, reserve);
    }
}

/// The daemon in a 32 MiB cgroup with a 64 MiB arena, reserving with `--huge-pages HUGE`.
fn memory_limited(parent: &Path, huge: &str) {
    let cg = MemCgroup::new(parent, &unique_name("full-cg"), 32 << 20);
    let wrapper = cg.wrapper();
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let d = TestDaemon::start_wrapped(
        "full",
        &["--arena-size", "64M", "--huge-pages", huge],
        &wrapper,
    );
    let keeper = keeper_pid(&d.name).expect("keeper");
    let inside = cg.pids();
    assert!(
        inside.contains(&d.pid) && inside.contains(&keeper),
        "daemon {} and keeper {keeper} in the cgroup: {inside:?}",
        d.pid
    );

    // The protocol client gets some blocks, then OutOfMemory only, and survives writing every
    // page of them.
    let filled = fill(&d.name, 1 << 20);
    assert!(
        (8..32).contains(&filled.blocks),
        "--huge-pages {huge}: 1 MiB blocks under a 32 MiB limit: {}",
        filled.blocks
    );
    assert_eq!(
        filled.refused, "Refused(OutOfMemory)",
        "--huge-pages {huge}"
    );
    // The limit refused them (the arena had room): the cgroup hit it.
    let failcnt = cg.number("memory.failcnt", None);
    assert!(failcnt > 0, "--huge-pages {huge}");
    println!(
        "--huge-pages {huge}: {} blocks of 1 MiB under 32 MiB, then {}; {failcnt} failed \
         charges; {} bytes reserved",
        filled.blocks,
        filled.refused,
        d.stat("reserved_bytes")
    );

    // Another client holds what the daemon could reserve but two blocks, so that an
    // `XallocGlobal` program has little arena: it runs to the end, falling back for the rest.
    let mut holder = Child(
        Command::new(CLIENT)
            .args([
                "hold",
                &d.name,
                &(filled.blocks - 2).to_string(),
                &(1u64 << 20).to_string(),
            ])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.0.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    assert!(line.starts_with("held "), "--huge-pages {huge}: {line}");
    let out = Command::new(GLOBAL_CLIENT)
        .args(["work", "2", "300"])
        .env("XALLOC_NAME", &d.name)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "--huge-pages {huge}: {:?}: {stdout}",
        out.status
    );
    let ok = stdout
        .lines()
        .find(|l| l.starts_with("ok "))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(!ok.contains("fallbacks=0 "), "--huge-pages {huge}: {ok}");
    assert!(!ok.contains("forwarded=0 "), "--huge-pages {huge}: {ok}");
    assert!(ok.contains("reentries=0 "), "--huge-pages {huge}: {ok}");
    drop(holder);

    // Nothing was killed, and nothing waits for memory: the limit only made charges fail.
    assert!(d.alive(), "--huge-pages {huge}: the daemon died");
    assert_eq!(keeper_pid(&d.name), Some(keeper));
    let oom = cg.read("memory.oom_control");
    assert!(
        oom.contains("under_oom 0")
            && !oom
                .lines()
                .any(|l| l.starts_with("oom_kill ") && l != "oom_kill 0"),
        "--huge-pages {huge}: {oom}"
    );
    // Logged once, although dozens of requests were refused.
    let log = d.log();
    assert_eq!(
        log.matches("cannot reserve arena pages").count(),
        1,
        "--huge-pages {huge}: {log}"
    );
    let out = d.xallocd(&["stop"]);
    assert!(
        out.status.success(),
        "--huge-pages {huge}: stop: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Sets `shmem_enabled` for as long as it lives and restores the old policy when dropped.
/// Test runs in parallel (several checkouts) take turns through a lock file, so that one does
/// not restore the policy under another.
struct ShmemHugePages {
    old: String,
    _lock: File,
}

impl ShmemHugePages {
    /// Sets policy `policy`; `Err` says why it cannot be set.
    fn set(policy: &str) -> Result<Self, String> {
        let lock_path = std::env::temp_dir().join("xalloc-tests-shmem-enabled.lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&lock_path)
            .map_err(|e| format!("{}: {e}", lock_path.display()))?;
        // SAFETY: plain call on an open descriptor.
        let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
        if rc != 0 {
            return Err(format!("flock {}", lock_path.display()));
        }
        let current =
            std::fs::read_to_string(SHMEM_THP).map_err(|e| format!("{SHMEM_THP}: {e}"))?;
        let old = current
            .split_whitespace()
            .find_map(|w| w.strip_prefix('[')?.strip_suffix(']'))
            .ok_or_else(|| format!("no policy in {SHMEM_THP}: {current:?}"))?
            .to_owned();
        std::fs::write(SHMEM_THP, policy).map_err(|e| format!("write {SHMEM_THP}: {e}"))?;
        let guard = Self { old, _lock: lock };
        let now = std::fs::read_to_string(SHMEM_THP).unwrap_or_default();
        if !now.contains(&format!("[{policy}]")) {
            return Err(format!("{SHMEM_THP} reads {now:?} after writing {policy}"));
        }
        Ok(guard)
    }
}

impl Drop for ShmemHugePages {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(SHMEM_THP, &self.old) {
            eprintln!("cannot restore {SHMEM_THP} to {}: {e}", self.old);
        }
    }
}

/// Huge pages where the kernel allows them for shared memory (`shmem_enabled` set to `advise`
/// for the test), by default (`--huge-pages auto`): every 2 MiB block the client writes is
/// mapped through a huge page, up to the arena's end, then `OutOfMemory`; the same run with
/// `--huge-pages off` maps none.
#[test]
fn huge_pages_back_the_arena_when_asked_for_and_allowed() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    if !is_root("to set the kernel's huge-page policy for shared memory") {
        return;
    }
    if !Path::new(SHMEM_THP).exists() {
        skip(&format!(
            "{SHMEM_THP} is missing: no transparent huge pages"
        ));
        return;
    }
    let _policy = match ShmemHugePages::set("advise") {
        Ok(p) => p,
        Err(why) => {
            skip(&why);
            return;
        }
    };
    for (flag, huge) in [("auto", true), ("off", false)] {
        // 16 MiB of arena: eight 2 MiB blocks.
        let d = TestDaemon::start("huge", &["--arena-size", "16M", "--huge-pages", flag]);
        let filled = fill(&d.name, 2 << 20);
        let status = d.status();
        let log = d.log();
        let all = format!("--huge-pages {flag}: {status:?}\nlog:\n{log}");
        assert_eq!(filled.blocks, 8, "2 MiB blocks in a 16 MiB arena: {all}");
        assert_eq!(filled.refused, "Refused(OutOfMemory)", "{all}");
        assert_eq!(status["huge_pages"], huge.to_string(), "{all}");
        assert_eq!(
            log.contains("huge pages asked for on the arena"),
            huge,
            "{all}"
        );
        println!(
            "--huge-pages {flag}: {} blocks of 2 MiB, {} KiB mapped through huge pages",
            filled.blocks, filled.pmd_kib
        );
        if huge {
            assert_eq!(
                filled.pmd_kib,
                filled.blocks * 2048,
                "every block on a huge page: {all}"
            );
        } else {
            assert_eq!(
                filled.pmd_kib, 0,
                "no huge pages with --huge-pages off: {all}"
            );
        }
        let out = d.xallocd(&["stop"]);
        assert!(out.status.success(), "{all}");
    }
}
