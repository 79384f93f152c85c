//! Adversarial clients of the channel protocol (issue 12), each against a daemon of its own
//! with real processes: a client that scribbles over its whole channel and then tries to
//! truncate it and the arena (as the daemon's user and as a `--group` member of another uid);
//! 40 processes of 8 threads at once; a process that exec()s while holding 64 MiB; the quotas
//! per process and per user; a flood of connections that never say hello, and the limit of
//! connections per user; forged frees of another client's blocks (ledger entries, requests, a
//! `Rebind` with its id).
//!
//! The tests of this file run one at a time (a lock): several of them load both CPUs of a
//! small machine, and others measure how fast the daemon reacts.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::*;
use xalloc_global::client::{ConnectError, Connection, RequestError};
use xalloc_proto::wire::{Hello, HelloKind, LedgerBlock, Refusal, Status, Welcome};

/// The program whose global allocator is `XallocGlobal` (4 KiB threshold).
const GLOBAL_CLIENT: &str = env!("CARGO_BIN_EXE_xalloc-global-client");
/// The user the tests that need another uid run clients as.
const NOBODY: u32 = 65534;
/// A group nobody is not in by default; the daemons of these tests serve it with `--group`,
/// and clients run as nobody get it as a supplementary group.
const GROUP: u32 = 4243;
const MIB: u64 = 1 << 20;

/// One test at a time (see the module docs); a failed test does not block the others.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A child process whose stdout lines arrive on a channel (so that reading one can time out),
/// killed and reaped when dropped.
struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Proc {
    /// Starts `cmd` with piped stdin and stdout.
    fn spawn(cmd: &mut Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let out = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Self {
            child: Child(child),
            lines,
        }
    }

    fn pid(&self) -> u32 {
        self.child.0.id()
    }

    /// The next line of its stdout, waiting at most 10 s.
    fn line(&self, what: &str) -> String {
        self.lines
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("no line from {what} within 10 s ({e})"))
    }

    /// Writes `line` to its stdin.
    fn say(&mut self, line: &str) {
        let stdin = self.child.0.stdin.as_mut().expect("piped stdin");
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| stdin.flush())
            .expect("write to the child's stdin");
    }

    /// Whether it still runs (not exited, or exited and not yet reaped: it is reaped here).
    fn running(&mut self) -> bool {
        matches!(self.child.0.try_wait(), Ok(None))
    }

    /// Waits up to `limit` for it to exit; returns its status and the lines it printed that
    /// were not read yet.
    fn finish(mut self, what: &str, limit: Duration) -> (ExitStatus, Vec<String>) {
        let t = Instant::now();
        let status = loop {
            if let Some(s) = self.child.0.try_wait().expect("try_wait") {
                break s;
            }
            assert!(t.elapsed() < limit, "{what} still runs after {limit:?}");
            std::thread::sleep(Duration::from_millis(5));
        };
        let mut rest = Vec::new();
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(5)) {
            rest.push(l);
        }
        (status, rest)
    }

    /// Waits for it to exit 0; returns its unread lines.
    fn succeed(self, what: &str, limit: Duration) -> Vec<String> {
        let (status, lines) = self.finish(what, limit);
        assert!(status.success(), "{what} failed ({status}): {lines:?}");
        lines
    }
}

/// Field `key=N` of a line of `k=v` words.
fn field(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
        .unwrap_or_else(|| panic!("no {key}=N in {line:?}"))
}

/// The words after `prefix` in the first of `lines` that starts with it.
fn line_with<'a>(lines: &'a [String], prefix: &str) -> &'a str {
    lines
        .iter()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no line starting {prefix:?} in {lines:?}"))
}

/// Offsets from a `held OFFSET...` line.
fn offsets(held: &str) -> Vec<u64> {
    held.strip_prefix("held")
        .unwrap_or_else(|| panic!("not a held line: {held:?}"))
        .split_whitespace()
        .map(|o| o.parse().expect("offset"))
        .collect()
}

/// `status --clients --json`'s entry of the client(s) of process `pid`: (bytes, blocks,
/// connected) summed over its connections, or `None` if it has none.
fn client_of(d: &TestDaemon, pid: u32) -> Option<(u64, u64, bool)> {
    let rows: Vec<_> = d
        .clients()
        .into_iter()
        .filter(|c| c["pid"].as_u64() == Some(u64::from(pid)))
        .collect();
    (!rows.is_empty()).then(|| {
        rows.iter().fold((0, 0, true), |(b, n, conn), c| {
            (
                b + c["bytes"].as_u64().expect("bytes"),
                n + c["blocks"].as_u64().expect("blocks"),
                conn && c["connected"].as_bool().expect("connected"),
            )
        })
    })
}

/// A copy of test program `exe` in `dir` that user nobody can execute (the build directory
/// may not be reachable for it).
fn program_for_nobody(dir: &Path, exe: &str) -> PathBuf {
    let copy = dir.join(Path::new(exe).file_name().expect("a file name"));
    std::fs::copy(exe, &copy).expect("copy the test program");
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    copy
}

/// A command that runs `exe` as nobody, with [`GROUP`] as its only supplementary group.
fn as_nobody(exe: &Path) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid",
        &NOBODY.to_string(),
        "--regid",
        &NOBODY.to_string(),
        "--groups",
        &GROUP.to_string(),
    ])
    .arg(exe)
    .current_dir("/");
    cmd
}

/// A raw handshake of kind `kind` (for `Rebind`, naming channel `client_id`) on a connection
/// of its own: the welcome and its reason. The connection is closed on return, so an
/// accepted client leaves again at once.
fn handshake(name: &str, kind: HelloKind, client_id: u32) -> (Welcome, String) {
    let path = std::ffi::CString::new(format!("/dev/shm/{name}.socket")).unwrap();
    let sock = xalloc_proto::unix::connect(&path).expect("connect");
    let hello = Hello { kind, client_id };
    xalloc_proto::unix::send_with_fds(&sock, &hello.encode(), &[]).expect("send the hello");
    let mut buf = [0u8; 1024];
    let msg = xalloc_proto::unix::recv_with_fds(&sock, &mut buf, Duration::from_secs(5))
        .expect("an answer within 5 s")
        .expect("an answer, not a closed connection");
    let (w, reason) = Welcome::decode(&buf[..msg.len]).expect("a welcome");
    (w, reason.to_owned())
}

/// Runs `xalloc-test-client scribble` (through `scribbler`, which names the program and runs it
/// as user `uid`) for 2 s while a client of the daemon's user holds 4 blocks and another
/// churns, and checks that the daemon refused everything, stayed up and kept serving, and that
/// the holder's blocks are its own and intact.
fn scribble_against(d: &TestDaemon, mut scribbler: Command, uid: u32) {
    let mut holder =
        Proc::spawn(Command::new(CLIENT).args(["hold-then-free", &d.name, "4", &MIB.to_string()]));
    let held = offsets(&holder.line("the holder"));
    assert_eq!(held.len(), 4);
    let before = client_of(d, holder.pid()).expect("the holder is a client");
    assert_eq!(before, (4 * MIB, 4, true));
    let errors_before = d.stat("errors");

    let scribbler = Proc::spawn(scribbler.args([&d.name, "2000", "7"]));
    let scribbler_pid = scribbler.pid();
    // It is a client, of the user it runs as.
    let uid_of = || {
        d.clients()
            .iter()
            .find(|c| c["pid"].as_u64() == Some(u64::from(scribbler_pid)))
            .and_then(|c| c["uid"].as_u64())
    };
    let seen = d.wait_for(Duration::from_secs(2), || uid_of().is_some());
    assert!(seen.is_some(), "the scribbler never connected");
    assert_eq!(uid_of(), Some(u64::from(uid)));
    // A client that works while the scribbler scribbles: its requests are seen and answered
    // (churn fails on any error, a lost answer included, and on a block whose pattern changed).
    std::thread::sleep(Duration::from_millis(200));
    let during = Proc::spawn(Command::new(CLIENT).args(["churn", &d.name, "2", "1200", "11"]));
    let out = scribbler.succeed("the scribbler", Duration::from_secs(15));
    let result = line_with(&out, "scribbled ");
    assert!(field(result, "passes") >= 2, "{result}");
    for attempt in [
        "truncate_request",
        "grow_request",
        "truncate_arena",
        "grow_arena",
        "write_response",
    ] {
        assert!(
            result.contains(&format!("{attempt}=refused")),
            "{attempt} was not refused: {result}"
        );
    }
    let churned = during.succeed("the client churning meanwhile", Duration::from_secs(15));
    assert!(
        line_with(&churned, "ok ").trim().parse::<u64>().unwrap() > 0,
        "{churned:?}"
    );

    // The daemon is up and answers; it refused the forgeries (counted as errors).
    assert!(d.alive(), "the daemon died: {}", d.log());
    assert!(
        d.stat("errors") > errors_before,
        "the scribbler's garbage was not refused"
    );
    // The scribbler's connection is gone, and whatever its garbage allocated with it.
    let gone = d.wait_for(Duration::from_secs(5), || {
        client_of(d, scribbler_pid).is_none() && d.stat("used_bytes") == 4 * MIB
    });
    assert!(gone.is_some(), "scribbler not reclaimed: {:?}", d.clients());
    // The holder's blocks are still its own.
    assert_eq!(
        client_of(d, holder.pid()),
        Some(before),
        "{:?}",
        d.clients()
    );

    // A client that comes afterwards is served.
    let after = Proc::spawn(Command::new(CLIENT).args(["churn", &d.name, "2", "500", "12"]));
    let out = after.succeed("the client started afterwards", Duration::from_secs(15));
    assert!(line_with(&out, "ok ").trim().parse::<u64>().unwrap() > 0);

    // The holder's blocks kept their contents, and it frees them itself.
    holder.say("go");
    let out = holder.succeed("the holder", Duration::from_secs(10));
    assert_eq!(out, ["freed 4"]);
    assert_eq!(d.stat("used_bytes"), 0);
    assert!(d.stats_line().contains("heap check ok"));
    assert!(d.alive());
}

/// 1. A client of the daemon's own user writes garbage over its whole channel for 2 s and then
///    tries to truncate and grow it and the arena, and to map its response channel writable.
#[test]
fn a_scribbler_cannot_hurt_the_daemon_or_other_clients() {
    let _serial = serial();
    let d = TestDaemon::start("scribble", &["--arena-size", "64M"]);
    let mut cmd = Command::new(CLIENT);
    cmd.arg("scribble");
    // SAFETY: plain query.
    scribble_against(&d, cmd, unsafe { libc::geteuid() });
}

/// 2. The same from a `--group` member of another uid.
#[test]
fn a_scribbling_group_member_of_another_uid_cannot_hurt_either() {
    if !is_root("to run the scribbler as another user") {
        return;
    }
    let _serial = serial();
    let d = TestDaemon::start(
        "scribblegrp",
        &["--arena-size", "64M", "--group", &GROUP.to_string()],
    );
    let exe = program_for_nobody(&d.dir, CLIENT);
    let mut cmd = as_nobody(&exe);
    cmd.arg("scribble");
    scribble_against(&d, cmd, NOBODY);
}

/// 3. 40 processes × 8 threads of std work through `XallocGlobal` at once, with the default
///    settings (slots per client, connections per user, no quotas): all 40 are clients at the
///    same time, none falls back, no request fails, and the heap is sound afterwards. The
///    arena is 1 GiB rather than the default 256 MiB: this work holds up to about 700 MiB at
///    once, and a fallback for want of room would say nothing about the protocol.
///
///    This found a client bug: with 320 busy threads on 2 CPUs, the thread that makes a
///    process's connection takes 60-260 ms of wall time for it (the daemon answers in under
///    0.4 ms), and the other threads of the process waited for that attempt only 50 ms before
///    each fell back once. They now wait up to the handshake's own bound
///    (`CONNECT_WAIT_NS`).
#[test]
fn forty_processes_of_eight_threads_at_once_never_fall_back() {
    let _serial = serial();
    let d = TestDaemon::start("forty", &["--arena-size", "1G"]);
    let t = Instant::now();
    let procs: Vec<Proc> = (0..40)
        .map(|_| {
            Proc::spawn(
                Command::new(GLOBAL_CLIENT)
                    .args(["work", "8", "2000"])
                    .env("XALLOC_NAME", &d.name),
            )
        })
        .collect();
    // Until every one has exited: the most processes connected at once, the most arena bytes
    // in use.
    let (mut most, mut peak) = (0, 0);
    while t.elapsed() < Duration::from_secs(30) {
        let s = d.status();
        most = most.max(s["processes"].parse::<u64>().unwrap());
        peak = peak.max(s["used_bytes"].parse::<u64>().unwrap());
        if most == 40 && s["processes"] == "0" {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let oks: Vec<String> = procs
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let out = p.succeed(&format!("process {i}"), Duration::from_secs(30));
            line_with(&out, "ok ").to_owned()
        })
        .collect();
    eprintln!(
        "40 × 8 threads: {:?}, at most {most} processes at once, {} MiB used at most",
        t.elapsed(),
        peak >> 20
    );
    assert_eq!(most, 40, "never all 40 processes at once");
    for (i, ok) in oks.iter().enumerate() {
        assert_eq!(field(ok, "over_quota"), 0, "process {i}: {ok}");
        assert_eq!(field(ok, "reentries"), 0, "process {i}: {ok}");
        assert!(field(ok, "forwarded") > 0, "process {i}: {ok}");
    }
    let fell_back: Vec<String> = oks
        .iter()
        .enumerate()
        .filter(|(_, ok)| field(ok, "fallbacks") > 0)
        .map(|(i, ok)| format!("process {i}: {ok}"))
        .collect();
    assert!(
        fell_back.is_empty(),
        "{} of 40 processes fell back (threads that gave up waiting for their process's \
         connection attempt, see CONNECT_WAIT_NS, show as fallbacks=7)\n{}",
        fell_back.len(),
        fell_back.join("\n")
    );
    let reclaimed = d.wait_for(Duration::from_secs(5), || {
        let s = d.status();
        s["used_bytes"] == "0" && s["clients"] == "0"
    });
    assert!(reclaimed.is_some(), "{:?}", d.status());
    assert_eq!(d.stat("errors"), 0);
    let stats = d.stats_line();
    assert!(stats.contains("heap check ok"), "{stats}");
}

/// 4. A process that holds 64 MiB and exec()s: the daemon frees the block within a second,
///    while the new program still runs.
#[test]
fn exec_gives_the_blocks_back_while_the_new_program_runs() {
    let _serial = serial();
    let d = TestDaemon::start("exec", &["--arena-size", "256M"]);
    let mut p = Proc::spawn(
        Command::new(GLOBAL_CLIENT)
            .args(["hold-then-exec", &(64 * MIB).to_string(), "sleep", "3"])
            .env("XALLOC_NAME", &d.name),
    );
    let held = p.line("hold-then-exec");
    let t = Instant::now();
    assert_eq!(field(&held, "shared"), 1, "{held}");
    assert!(field(&held, "arena_bytes") >= 64 * MIB, "{held}");
    let pid = p.pid();
    let freed = d.wait_for(Duration::from_secs(1), || d.stat("used_bytes") == 0);
    let took = t.elapsed();
    assert!(
        p.running(),
        "the process exited instead of running its new program"
    );
    assert!(
        freed.is_some(),
        "used_bytes still {} after 1 s: {:?}",
        d.stat("used_bytes"),
        d.clients()
    );
    // It is `sleep` now (the exec went through), and it is no client any more.
    let comm = || std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    let became = d.wait_for(Duration::from_secs(1), || comm().trim() == "sleep");
    assert!(became.is_some(), "comm is {:?}", comm());
    assert!(p.running());
    assert_eq!(client_of(&d, pid), None);
    let line = format!("(pid {pid}) closed its connection: reclaimed ");
    let log = d.log();
    let reclaimed = log
        .lines()
        .find_map(|l| l.split_once(&line).map(|(_, rest)| rest.to_owned()))
        .unwrap_or_else(|| panic!("no reclaim line for pid {pid}: {log}"));
    let bytes: u64 = reclaimed
        .split_once('(')
        .and_then(|(_, b)| b.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("bytes in {reclaimed:?}"));
    assert!(bytes >= 64 * MIB, "{reclaimed}");
    eprintln!("64 MiB reclaimed {took:?} after the exec");
}

/// `xalloc-test-client fill NAME 1M` run through `cmd` (which names the program): how many
/// 1 MiB blocks it got, and why the 21 after the last were refused.
fn fill(mut cmd: Command, name: &str) -> (u64, String) {
    let out = cmd
        .args(["fill", name, &MIB.to_string()])
        .output()
        .expect("run fill");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "fill failed: {text}");
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("filled "))
        .unwrap_or_else(|| panic!("fill said {text:?}"));
    let blocks = line.split_whitespace().next().unwrap().parse().unwrap();
    let refused = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("refused="))
        .unwrap_or_default()
        .to_owned();
    (blocks, refused)
}

/// 5a. `--client-quota 8M`: one process holds at most 8 MiB (an `XallocGlobal` program falls
///     back past it and counts it), and another process gets 8 MiB of its own meanwhile.
#[test]
fn a_process_holds_at_most_its_client_quota() {
    let _serial = serial();
    let d = TestDaemon::start("cquota", &["--arena-size", "64M", "--client-quota", "8M"]);
    assert_eq!(d.clients().len(), 0);
    let mut holder = Proc::spawn(
        Command::new(GLOBAL_CLIENT)
            .args(["hold-wait", "12", &MIB.to_string()])
            .env("XALLOC_NAME", &d.name),
    );
    let held = holder.line("hold-wait");
    assert_eq!(field(&held, "shared"), 8, "{held}");
    assert!(field(&held, "over_quota") >= 4, "{held}");
    assert!(
        field(&held, "fallbacks") >= field(&held, "over_quota"),
        "{held}"
    );
    assert_eq!(field(&held, "arena_bytes"), 8 * MIB, "{held}");
    let (bytes, _, _) = client_of(&d, holder.pid()).expect("the holder is a client");
    assert_eq!(bytes, 8 * MIB);
    // Another process: its own 8 MiB, then OverQuota.
    let (blocks, refused) = fill(Command::new(CLIENT), &d.name);
    assert_eq!(blocks, 8, "refused={refused}");
    assert_eq!(refused, "Refused(OverQuota)");
    assert_eq!(client_of(&d, holder.pid()).map(|c| c.0), Some(8 * MIB));
    holder.say("go");
    let out = holder.succeed("hold-wait", Duration::from_secs(10));
    // Its stdin buffer (8 KiB, past the threshold) was over quota too.
    assert!(field(line_with(&out, "ok "), "over_quota") >= field(&held, "over_quota"));
    let reclaimed = d.wait_for(Duration::from_secs(5), || d.stat("used_bytes") == 0);
    assert!(reclaimed.is_some(), "{:?}", d.status());
}

/// 5b. `--user-quota 12M`: two processes of one user hold at most 12 MiB together; another
///     user (nobody, a `--group` member) is not charged for the first user's bytes.
#[test]
fn the_processes_of_a_user_share_its_user_quota() {
    let _serial = serial();
    let d = TestDaemon::start(
        "uquota",
        &[
            "--arena-size",
            "64M",
            "--user-quota",
            "12M",
            "--group",
            &GROUP.to_string(),
        ],
    );
    let holder = Proc::spawn(Command::new(CLIENT).args(["hold", &d.name, "8", &MIB.to_string()]));
    assert_eq!(offsets(&holder.line("hold")).len(), 8);
    // The same user's second process gets what is left of 12 MiB.
    let (blocks, refused) = fill(Command::new(CLIENT), &d.name);
    assert_eq!((blocks, refused.as_str()), (4, "Refused(OverQuota)"));
    assert_eq!(client_of(&d, holder.pid()).map(|c| c.0), Some(8 * MIB));
    if !is_root("to run a client as another user") {
        return;
    }
    // Another user, while the first still holds 8 MiB: 12 MiB of its own.
    let exe = program_for_nobody(&d.dir, CLIENT);
    let (blocks, refused) = fill(as_nobody(&exe), &d.name);
    assert_eq!((blocks, refused.as_str()), (12, "Refused(OverQuota)"));
    assert_eq!(client_of(&d, holder.pid()).map(|c| c.0), Some(8 * MIB));
}

/// 6a. 300 connections that never send their hello, held open, do not keep a well-behaved
///     client out.
#[test]
fn silent_connections_do_not_keep_clients_out() {
    let _serial = serial();
    let d = TestDaemon::start("flood", &["--arena-size", "64M"]);
    let path = std::ffi::CString::new(format!("/dev/shm/{}.socket", d.name)).unwrap();
    let mut silent = Vec::new();
    let t = Instant::now();
    while silent.len() < 300 {
        match xalloc_proto::unix::connect(&path) {
            Ok(s) => silent.push(s),
            // The backlog is full for a moment: the daemon accepts them as it goes.
            Err(e) if e.0 == libc::EAGAIN && t.elapsed() < Duration::from_secs(5) => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => panic!("raw connect {}: {e}", silent.len()),
        }
    }
    // A well-behaved client connects and is served while they are all held open.
    let out = Proc::spawn(Command::new(CLIENT).args(["churn", &d.name, "2", "300", "3"])).succeed(
        "the client among silent connections",
        Duration::from_secs(15),
    );
    assert!(line_with(&out, "ok ").trim().parse::<u64>().unwrap() > 0);
    let global = Command::new(GLOBAL_CLIENT)
        .args(["work", "2", "300"])
        .env("XALLOC_NAME", &d.name)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&global.stdout);
    assert!(global.status.success(), "{text}");
    assert_eq!(field(&text, "fallbacks"), 0, "{text}");
    assert!(field(&text, "forwarded") > 0, "{text}");
    assert!(d.alive());
    assert_eq!(d.stat("errors"), 0);
    drop(silent);
    assert!(d.stats_line().contains("heap check ok"));
}

/// 6b. Connections of one user beyond `--max-clients-per-user` are refused with the reason;
///     another user is still served, and the first user again once one of its connections
///     closed.
#[test]
fn connections_beyond_the_per_user_limit_are_refused_with_a_reason() {
    let _serial = serial();
    let d = TestDaemon::start(
        "maxclients",
        &[
            "--arena-size",
            "64M",
            "--max-clients-per-user",
            "4",
            "--group",
            &GROUP.to_string(),
        ],
    );
    let mut conns: Vec<Connection> = (0..4)
        .map(|i| Connection::connect(&d.name).unwrap_or_else(|e| panic!("connection {i}: {e}")))
        .collect();
    match Connection::connect(&d.name) {
        Err(ConnectError::Refused {
            refusal: Refusal::Busy,
        }) => {}
        other => panic!("a fifth connection: {other:?}"),
    }
    let (w, reason) = handshake(&d.name, HelloKind::Client, 0);
    assert_eq!(w.refusal, Refusal::Busy as u32, "{reason}");
    assert!(
        reason.contains("already has 4 connections") && reason.contains("--max-clients-per-user"),
        "{reason}"
    );
    assert!(d.log().contains("already has 4 connections"), "{}", d.log());
    // The four still work.
    for c in &conns {
        let mut slot = c.claim().unwrap();
        let b = slot.allocate(MIB, 4096, false).unwrap();
        slot.free(b.offset).unwrap();
    }
    if is_root("to run a client as another user") {
        let exe = program_for_nobody(&d.dir, CLIENT);
        let out = as_nobody(&exe)
            .args(["churn", &d.name, "2", "300", "4"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "another user not served: {text}");
    }
    // One closes: the user may connect again.
    drop(conns.pop());
    let closed = d.wait_for(Duration::from_secs(5), || d.stat("clients") == 3);
    assert!(closed.is_some(), "{:?}", d.clients());
    conns.push(Connection::connect(&d.name).expect("a connection once one closed"));
    assert_eq!(d.stat("clients"), 4);
}

/// 7. A forged identity frees nothing: a client that puts another client's blocks in its own
///    ledger (released, or cached and then the arena filled so that the daemon takes cached
///    blocks back), frees or resizes them through its own channel, or asks for a `Rebind` of
///    the other's channel, gets refusals, and the victim's blocks stay its own and intact.
#[test]
fn a_client_cannot_free_or_take_another_clients_blocks() {
    let _serial = serial();
    let d = TestDaemon::start("forge", &["--arena-size", "16M"]);
    let mut victim =
        Proc::spawn(Command::new(CLIENT).args(["hold-then-free", &d.name, "4", &MIB.to_string()]));
    let held = offsets(&victim.line("the victim"));
    assert_eq!(held.len(), 4);
    let vpid = victim.pid();
    let before = client_of(&d, vpid).expect("the victim is a client");
    assert_eq!(before, (4 * MIB, 4, true));
    let victim_id = d
        .clients()
        .iter()
        .find(|c| c["pid"].as_u64() == Some(u64::from(vpid)))
        .and_then(|c| c["id"].as_u64())
        .expect("the victim's client id") as u32;

    let conn = Connection::connect(&d.name).unwrap();
    let g = conn.granule() as u64;
    let ledger = conn.ledger().unwrap();
    let entry = |off: u64, released: bool| LedgerBlock {
        offset: (off / g) as u32,
        granules: (MIB / g) as u32,
        released,
    };

    // Released entries naming the victim's blocks: the daemon sweeps them and frees nothing.
    let errors = d.stat("errors");
    for &off in &held {
        assert!(ledger.put(entry(off, true), 0));
    }
    assert!(conn.ring());
    let swept = d.wait_for(Duration::from_secs(5), || {
        ledger
            .entries
            .iter()
            .all(|e| e.load(Ordering::Relaxed) == 0)
            && d.stat("errors") == errors + 4
    });
    assert!(
        swept.is_some(),
        "errors {} (before {errors}), ledger {:?}",
        d.stat("errors"),
        ledger.entries
    );
    assert_eq!(client_of(&d, vpid), Some(before));

    // Requests through its own channel.
    let mut slot = conn.claim().unwrap();
    for &off in &held {
        assert_eq!(slot.free(off), Err(RequestError::Refused(Status::NotOwner)));
        assert_eq!(
            slot.resize(off, 2 * MIB).map(drop),
            Err(RequestError::Refused(Status::NotOwner))
        );
        assert_eq!(
            slot.resize(off, 4096).map(drop),
            Err(RequestError::Refused(Status::NotOwner))
        );
        assert_eq!(
            slot.free(off + g),
            Err(RequestError::Refused(Status::BadOffset))
        );
    }
    assert_eq!(client_of(&d, vpid), Some(before));

    // Cached entries naming the victim's blocks, then the arena filled: the daemon takes back
    // the blocks clients keep cached, but not these.
    for &off in &held {
        assert!(ledger.put(entry(off, false), 0));
    }
    let mut mine = Vec::new();
    let refusal = loop {
        match slot.allocate(MIB, 4096, false) {
            Ok(b) => mine.push(b.offset),
            Err(e) => break e,
        }
        assert!(mine.len() <= 16, "more blocks than the arena holds");
    };
    assert_eq!(refusal, RequestError::Refused(Status::OutOfMemory));
    assert_eq!(mine.len(), 12, "the victim's 4 MiB were handed out");
    assert!(mine.iter().all(|o| !held.contains(o)));
    assert_eq!(client_of(&d, vpid), Some(before));
    for off in mine {
        slot.free(off).unwrap();
    }

    // A Rebind of the victim's channel from this process.
    let (w, reason) = handshake(&d.name, HelloKind::Rebind, victim_id);
    assert_eq!(w.refusal, Refusal::BadHello as u32, "{reason}");
    assert_eq!(client_of(&d, vpid), Some(before));

    // The victim's blocks kept their contents, and it frees them itself.
    victim.say("go");
    let out = victim.succeed("the victim", Duration::from_secs(10));
    assert_eq!(out, ["freed 4"]);
    drop(slot);
    drop(conn);
    let reclaimed = d.wait_for(Duration::from_secs(5), || {
        d.stat("used_bytes") == 0 && d.stat("clients") == 0
    });
    assert!(reclaimed.is_some(), "{:?}", d.status());
    assert!(d.stats_line().contains("heap check ok"));
}

/// 8. The arena's header page is memory every client may write (found in review: a restarted
///    daemon took its slot count and flags from there, refused every kept channel for having
///    "another layout", freed their blocks while their clients still used them, and handed
///    them out again). A client writes garbage over the whole header page, the daemon is
///    killed and restarted: the victim keeps its channel and its blocks (and their contents),
///    no block of it is handed to anyone else, and new clients connect and are served.
#[test]
fn a_scribbled_arena_header_does_not_steer_a_restart() {
    let _serial = serial();
    let mut d = TestDaemon::start("header", &["--arena-size", "16M"]);
    let mut victim =
        Proc::spawn(Command::new(CLIENT).args(["hold-then-free", &d.name, "4", &MIB.to_string()]));
    let held = offsets(&victim.line("the victim"));
    assert_eq!(held.len(), 4);
    let vpid = victim.pid();
    {
        let attacker = Connection::connect(&d.name).unwrap();
        // The header page sits just before the arena's data in every client's mapping.
        let header = attacker
            .arena_base()
            .wrapping_sub(xalloc_proto::wire::ARENA_DATA_OFFSET);
        let page = xalloc_proto::wire::ARENA_HEADER_LEN;
        for i in 0..page {
            // SAFETY: the attacker's own read-write mapping of the arena covers the header
            // page; the bytes are plain memory (nothing in this process reads them).
            unsafe {
                header
                    .add(i)
                    .write_volatile((i as u8).wrapping_mul(151) | 1)
            };
        }
        // And a plausible forgery: another slot count in an otherwise valid-looking header.
        // SAFETY: as above; byte 24 is the header's `slot_count`.
        unsafe { header.add(24).cast::<u32>().write_unaligned(32) };
    }
    d.signal(libc::SIGKILL);
    assert!(d.wait_exit(Duration::from_secs(5)));
    let out = d.start_command(&["--arena-size", "16M"]);
    assert!(
        out.status.success(),
        "restart: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    d.adopt();
    let log = d.log();
    assert!(log.contains("re-attached"), "{log}");
    assert!(!log.contains("not keeping the channel"), "{log}");
    assert_eq!(
        client_of(&d, vpid).map(|(b, n, _)| (b, n)),
        Some((4 * MIB, 4)),
        "the victim's blocks after the restart: {:?}",
        d.clients()
    );
    // A new client fills the rest of the arena: 12 of 16 MiB (16 if the victim's blocks had
    // been freed and handed out again).
    let (got, refused) = fill(Command::new(CLIENT), &d.name);
    assert_eq!(got, 12, "refused: {refused}");
    // The victim's data is intact, and it frees its blocks.
    writeln!(victim.child.0.stdin.as_mut().unwrap()).unwrap();
    assert_eq!(victim.line("the victim's free"), "freed 4");
    assert!(d.stats_line().contains("heap check ok"));
}
