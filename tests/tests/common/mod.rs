//! What every multi-process test shares: a daemon of its own, stopped and cleaned up by pid
//! (also when the test fails), and small readers of its status and log.

#![allow(dead_code)] // Each test binary uses its own subset.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use xalloc_proto::os::{self, Fd};

/// The daemon binary built with these tests.
pub const XALLOCD: &str = env!("CARGO_BIN_EXE_xallocd-under-test");
/// The test client.
pub const CLIENT: &str = env!("CARGO_BIN_EXE_xalloc-test-client");

/// A name no other test (or test run) uses: `xt-TAG-PID-N`.
pub fn unique_name(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "xt-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A private directory under the system temp dir, removed by [`TestDaemon`]'s drop.
pub fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create temp dir");
    d
}

/// The names instance `name` has in `/dev/shm`: its socket, its keeper's socket, its state
/// record.
pub const OBJECTS: [&str; 3] = ["socket", "keeper", "state"];

/// Removes `/dev/shm/NAME.*` of instance `name`.
pub fn remove_segments(name: &str) {
    for kind in OBJECTS {
        let _ = std::fs::remove_file(format!("/dev/shm/{name}.{kind}"));
    }
}

/// Which of instance `name`'s objects exist in `/dev/shm`.
pub fn segments_left(name: &str) -> Vec<String> {
    OBJECTS
        .iter()
        .map(|k| format!("/dev/shm/{name}.{k}"))
        .filter(|p| Path::new(p).symlink_metadata().is_ok())
        .collect()
}

/// The pid of the keeper of instance `name` (the process that answers on its keeper socket),
/// if one runs.
pub fn keeper_pid(name: &str) -> Option<u32> {
    let path = std::ffi::CString::new(format!("/dev/shm/{name}.keeper")).ok()?;
    let sock = xalloc_proto::unix::connect(&path).ok()?;
    xalloc_proto::unix::peer(&sock).ok().map(|p| p.pid)
}

/// Stops the keeper of instance `name`, if one runs (SIGTERM through a pidfd: it removes its
/// socket and lets go of the arena), and waits for it.
pub fn stop_keeper(name: &str) {
    let Some(pid) = keeper_pid(name) else {
        return;
    };
    let Ok(fd) = os::pidfd_open(pid) else {
        return;
    };
    // SAFETY: plain system call on an open pidfd.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.raw(),
            libc::SIGTERM,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    let t = Instant::now();
    while !os::pidfd_exited(&fd) && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// What an `xallocd` process of an instance is, by its command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// `xallocd start`: the daemon (or a `start` still waiting for it to be ready).
    Daemon,
    /// `xallocd keeper`: the process that holds the arena across a daemon crash.
    Keeper,
    /// Any other subcommand (`stop`, `status`).
    Other,
}

/// The processes running this build's `xallocd` for instance `name` (its unique name is in
/// their command line, right after `--name`), with their roles.
pub fn instance_processes(name: &str) -> Vec<(u32, Role)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let args: Vec<&[u8]> = raw.split(|&b| b == 0).collect();
            // The keeper runs the daemon's own executable (or `/proc/self/exe` where that was
            // replaced on disk).
            let exe = args.first()?;
            (*exe == XALLOCD.as_bytes() || *exe == b"/proc/self/exe").then_some(())?;
            args.windows(2)
                .any(|w| w[0] == b"--name" && w[1] == name.as_bytes())
                .then_some(())?;
            let role = match args.get(1).copied() {
                Some(b"start") => Role::Daemon,
                Some(b"keeper") => Role::Keeper,
                _ => Role::Other,
            };
            Some((pid, role))
        })
        .collect()
}

/// Sends SIGKILL to process `pid` through a pidfd and waits (at most 5 s) for it to exit.
pub fn kill_and_wait(pid: u32) {
    let Ok(fd) = os::pidfd_open(pid) else {
        return;
    };
    // SAFETY: plain system call on an open pidfd; no siginfo.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.raw(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    let t = Instant::now();
    while !os::pidfd_exited(&fd) && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Kills (SIGKILL, by pidfd) every daemon process of instance `name` that still runs.
pub fn kill_instance_daemon(name: &str) {
    for (pid, role) in instance_processes(name) {
        if role == Role::Daemon {
            kill_and_wait(pid);
        }
    }
}

/// Kills (SIGKILL, by pidfd) every `xallocd` process of instance `name`: daemons and keepers.
pub fn kill_instance_processes(name: &str) {
    for (pid, _) in instance_processes(name) {
        kill_and_wait(pid);
    }
}

/// Bytes of instance `name`'s arena backed by pages, read through the descriptor its keeper
/// holds (`/proc/KEEPER/fd/N`, the memfd `xalloc:NAME.arena`); `None` if no keeper runs or it
/// holds no arena.
pub fn arena_resident(name: &str) -> Option<u64> {
    arena_resident_in(keeper_pid(name)?, name)
}

/// Bytes of instance `name`'s arena backed by pages, read through a descriptor of process
/// `pid` (the daemon or its keeper).
pub fn arena_resident_in(pid: u32, name: &str) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let memfd = format!("/memfd:xalloc:{name}.arena");
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .filter_map(Result::ok)
        .find(|e| {
            std::fs::read_link(e.path()).is_ok_and(|t| {
                t.to_str()
                    .is_some_and(|t| t.strip_suffix(" (deleted)").unwrap_or(t) == memfd)
            })
        })
        // The link is followed: the memfd's own inode, whose blocks are its pages.
        .and_then(|e| std::fs::metadata(e.path()).ok())
        .map(|m| m.blocks() * 512)
}

/// Kills the daemon and keeper of instance `name` (by pidfd) if any run, and removes its
/// objects and directory `dir`, when dropped: for tests that run a daemon without
/// [`TestDaemon`], or expect `start` to refuse, so that a failing assertion leaves nothing
/// behind.
pub struct Cleanup {
    /// Instance name.
    pub name: String,
    /// Private directory.
    pub dir: PathBuf,
}

impl Cleanup {
    /// A unique instance name for `tag`, and its private directory.
    pub fn new(tag: &str) -> Self {
        let name = unique_name(tag);
        let dir = temp_dir(&name);
        Self { name, dir }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        // A daemon a failing test started after all (an expected refusal that did not come).
        kill_instance_daemon(&self.name);
        stop_keeper(&self.name);
        kill_instance_processes(&self.name);
        remove_segments(&self.name);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A daemon started for one test. Dropping it kills it (by its pidfd, so never another
/// process) if it still runs, then its keeper and any other process of its instance name, and
/// removes its objects and directory.
pub struct TestDaemon {
    /// Instance name.
    pub name: String,
    /// Private directory: pidfile, log file.
    pub dir: PathBuf,
    /// The daemon's pid.
    pub pid: u32,
    pidfd: Option<Fd>,
}

impl TestDaemon {
    /// Starts a detached daemon named after `tag`, logging to its directory's `xallocd.log`
    /// (syslog pointed at a socket that does not exist) with a 64 MiB arena, unless `extra`
    /// gives those flags.
    pub fn start(tag: &str, extra: &[&str]) -> Self {
        let name = unique_name(tag);
        let dir = temp_dir(&name);
        let mut d = Self {
            name,
            dir,
            pid: 0,
            pidfd: None,
        };
        let out = d.start_command(extra);
        assert!(
            out.status.success(),
            "xallocd start failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        d.adopt();
        d
    }

    /// Like [`TestDaemon::start`], with `xallocd start` run through `wrapper` (see
    /// [`TestDaemon::start_command_wrapped`]).
    pub fn start_wrapped(tag: &str, extra: &[&str], wrapper: &[&str]) -> Self {
        let name = unique_name(tag);
        let dir = temp_dir(&name);
        let mut d = Self {
            name,
            dir,
            pid: 0,
            pidfd: None,
        };
        let out = d.start_command_wrapped(extra, wrapper);
        assert!(
            out.status.success(),
            "xallocd start (through {wrapper:?}) failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        d.adopt();
        d
    }

    /// [`TestDaemon::start_command`] run through `wrapper`: a command and its first arguments,
    /// to which the daemon's path and arguments are appended (for example `sh -c 'echo $$ >
    /// CGROUP/cgroup.procs && exec "$0" "$@"'`, so that the daemon and its keeper start in a
    /// cgroup).
    pub fn start_command_wrapped(&self, extra: &[&str], wrapper: &[&str]) -> Output {
        let (program, first) = wrapper.split_first().expect("a wrapper command");
        Command::new(program)
            .args(first)
            .arg(XALLOCD)
            .args(self.start_args(extra))
            .arg("--name")
            .arg(&self.name)
            .arg("--pidfile")
            .arg(self.pidfile())
            .output()
            .expect("run the wrapper of xallocd start")
    }

    /// Runs `xallocd start` for this instance with the test's defaults and `extra`.
    pub fn start_command(&self, extra: &[&str]) -> Output {
        let args = self.start_args(extra);
        self.xallocd(&args.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// `start`, the test's defaults that `extra` does not give, and `extra`.
    fn start_args(&self, extra: &[&str]) -> Vec<String> {
        let mut args = vec!["start".to_owned()];
        let mut default = |flag: &str, value: String| {
            if !extra.contains(&flag) {
                args.extend([flag.to_owned(), value]);
            }
        };
        default(
            "--syslog-socket",
            self.dir.join("no-syslog.sock").display().to_string(),
        );
        default("--log-file", self.log_path().display().to_string());
        default("--arena-size", "64M".to_owned());
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    /// Reads the pid from the pidfile and pins the process with a pidfd.
    pub fn adopt(&mut self) {
        let pid: u32 = std::fs::read_to_string(self.pidfile())
            .expect("pidfile after start")
            .trim()
            .parse()
            .expect("pid in pidfile");
        self.pid = pid;
        self.pidfd = Some(os::pidfd_open(pid).expect("daemon process exists after start"));
    }

    /// The pidfile.
    pub fn pidfile(&self) -> PathBuf {
        self.dir.join("xallocd.pid")
    }

    /// The log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("xallocd.log")
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Runs `xallocd ARGS --name NAME --pidfile PIDFILE`.
    pub fn xallocd(&self, args: &[&str]) -> Output {
        Command::new(XALLOCD)
            .args(args)
            .arg("--name")
            .arg(&self.name)
            .arg("--pidfile")
            .arg(self.pidfile())
            .output()
            .expect("run xallocd")
    }

    /// `xallocd status --clients --json`: one JSON object per client.
    pub fn clients(&self) -> Vec<serde_json::Value> {
        let out = self.xallocd(&["status", "--clients", "--json"]);
        assert!(
            out.status.success(),
            "status --clients failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("a JSON array")
    }

    /// `xallocd status --json`, parsed into field → raw value.
    pub fn status(&self) -> HashMap<String, String> {
        let out = self.xallocd(&["status", "--json"]);
        assert!(
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        parse_json_object(&String::from_utf8_lossy(&out.stdout))
    }

    /// One numeric field of the status.
    pub fn stat(&self, field: &str) -> u64 {
        self.status()[field].parse().expect("numeric field")
    }

    /// Waits up to `limit` for `cond`; returns how long it took, or `None`.
    pub fn wait_for(&self, limit: Duration, mut cond: impl FnMut() -> bool) -> Option<Duration> {
        let t = Instant::now();
        while t.elapsed() < limit {
            if cond() {
                return Some(t.elapsed());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        None
    }

    /// Whether the daemon process still runs.
    pub fn alive(&self) -> bool {
        self.pidfd.as_ref().is_some_and(|fd| !os::pidfd_exited(fd))
    }

    /// Sends `sig` to the daemon through its pidfd.
    pub fn signal(&self, sig: i32) {
        let fd = self.pidfd.as_ref().expect("daemon started");
        // SAFETY: plain system call on an open pidfd.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                fd.raw(),
                sig,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
    }

    /// Sends SIGHUP and waits until the log holds one more statistics line; returns it.
    pub fn stats_line(&self) -> String {
        let count = |log: &str| log.matches("stats:").count();
        let before = count(&self.log());
        self.signal(libc::SIGHUP);
        self.wait_for(Duration::from_secs(5), || count(&self.log()) > before)
            .expect("statistics line after SIGHUP");
        self.log()
            .lines()
            .rfind(|l| l.contains("stats:"))
            .unwrap_or_default()
            .to_owned()
    }

    /// Waits for the daemon to exit; true if it did within `limit`.
    pub fn wait_exit(&self, limit: Duration) -> bool {
        self.wait_for(limit, || !self.alive()).is_some()
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        if self.alive() {
            self.signal(libc::SIGKILL);
            self.wait_exit(Duration::from_secs(5));
        }
        // The keeper outlives a killed daemon (that is what it is for).
        stop_keeper(&self.name);
        // What a test restarted and did not adopt, and a keeper whose socket is gone.
        kill_instance_processes(&self.name);
        remove_segments(&self.name);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A child process killed (SIGKILL) and reaped when dropped.
pub struct Child(pub std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Parses a flat JSON object of numbers and strings (what `xallocd status --json` prints).
pub fn parse_json_object(s: &str) -> HashMap<String, String> {
    let body = s
        .trim()
        .strip_prefix('{')
        .and_then(|b| b.strip_suffix('}'))
        .expect("a JSON object");
    body.split(',')
        .map(|kv| {
            let (k, v) = kv.split_once(':').expect("key:value");
            (
                k.trim().trim_matches('"').to_owned(),
                v.trim().trim_matches('"').to_owned(),
            )
        })
        .collect()
}

/// Field `n` (1-based, as in proc(5)) of `/proc/PID/stat`.
pub fn proc_stat_field(pid: u32, n: usize) -> Option<i64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces.
    let rest = &s[s.rfind(')')? + 2..];
    rest.split(' ').nth(n - 3)?.parse().ok()
}

/// Whether this process runs as root, which the tests that act as other users or mount a
/// private `/tmp` need. Without root they are skipped with a line saying `why`, except under
/// CI (`CI` set), which runs as root: there a missing root fails the test.
pub fn is_root(why: &str) -> bool {
    // SAFETY: plain query.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs as root; these tests need it"
        );
        eprintln!("SKIPPED: not root (needed {why})");
    }
    root
}

/// The repository's root (the parent of `tests/`).
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// A command with the environment the client tests control taken out of the caller's.
pub fn command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new(program);
    for var in [
        "LD_PRELOAD",
        "XALLOC_NAME",
        "XALLOC_THRESHOLD",
        "XALLOC_CACHE",
    ] {
        c.env_remove(var);
    }
    c.env("LC_ALL", "C");
    c
}
