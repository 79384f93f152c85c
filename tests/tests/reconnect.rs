//! `XallocGlobal` across daemon restarts and forks: a process that outlives many daemons keeps
//! using the newest one (connections whose blocks are all gone are recycled), keeps the blocks
//! of the old ones, and a child forked while another thread of its parent is connecting does
//! not wait for that connection.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// The program whose global allocator is `XallocGlobal` (4 KiB threshold).
const GLOBAL_CLIENT: &str = env!("CARGO_BIN_EXE_xalloc-global-client");

/// The global-allocator client with `args`, using daemon `d`, its stdin and stdout piped.
fn client(d: &TestDaemon, args: &[&str]) -> Child {
    Child(
        Command::new(GLOBAL_CLIENT)
            .args(args)
            .env("XALLOC_NAME", &d.name)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    )
}

/// Waits up to `limit` for `child` to exit; kills it (by pid, through `Child`'s drop) if not.
fn wait_with_timeout(mut child: Child, limit: Duration) -> (std::process::ExitStatus, String) {
    let start = Instant::now();
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            let mut out = String::new();
            std::io::Read::read_to_string(child.0.stdout.as_mut().unwrap(), &mut out).unwrap();
            return (status, out);
        }
        assert!(
            start.elapsed() < limit,
            "client pid {} still runs after {limit:?}: killed",
            child.0.id()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The lines a child process prints, read on a thread of their own so that a test can wait
/// for one with a time limit.
struct Lines(std::sync::mpsc::Receiver<String>);

impl Lines {
    fn of(child: &mut Child) -> Self {
        let out = BufReader::new(child.0.stdout.take().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self(rx)
    }

    /// Waits up to `limit` for `child` to exit (killing it if it does not), and returns its
    /// status with the lines it printed since the last `next`.
    fn finish(self, mut child: Child, limit: Duration) -> (std::process::ExitStatus, String) {
        let start = Instant::now();
        let status = loop {
            if let Some(status) = child.0.try_wait().unwrap() {
                break status;
            }
            assert!(
                start.elapsed() < limit,
                "client pid {} still runs after {limit:?}: killed",
                child.0.id()
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut out = String::new();
        while let Ok(line) = self.0.recv_timeout(Duration::from_secs(5)) {
            out.push_str(&line);
            out.push('\n');
        }
        (status, out)
    }

    fn next(&self, what: &str) -> String {
        self.0
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("no {what} line from the client within 20 s: {e}"))
    }
}

/// A thread of another process traced with ptrace (`PTRACE_SEIZE`): only that thread stops;
/// the other threads of its process run on. Detached when dropped.
struct Traced {
    pid: u32,
    tid: libc::pid_t,
}

impl Traced {
    /// Seizes thread `tid` of process `pid` and stops it.
    fn seize(pid: u32, tid: libc::pid_t) -> Self {
        // SAFETY: ptrace requests on a thread of our own child process.
        unsafe {
            assert_eq!(
                libc::ptrace(libc::PTRACE_SEIZE, tid, 0, libc::PTRACE_O_TRACESYSGOOD),
                0,
                "PTRACE_SEIZE thread {tid}: {}",
                std::io::Error::last_os_error()
            );
            assert_eq!(libc::ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0), 0);
        }
        let t = Self { pid, tid };
        t.wait_stop();
        t
    }

    /// Waits for the thread's next stop; returns its wait status.
    fn wait_stop(&self) -> i32 {
        let mut status = 0;
        // SAFETY: waiting for a thread this process traces.
        let r = unsafe { libc::waitpid(self.tid, &mut status, libc::__WALL) };
        assert_eq!(r, self.tid, "waitpid: {}", std::io::Error::last_os_error());
        assert!(libc::WIFSTOPPED(status), "traced thread ended: {status:#x}");
        status
    }

    /// Lets the thread run until it enters system call `nr`, and leaves it stopped there.
    fn run_to_syscall(&self, nr: libc::c_long) {
        let path = format!("/proc/{}/task/{}/syscall", self.pid, self.tid);
        let mut inject = 0;
        loop {
            // SAFETY: the thread is in a ptrace stop.
            let r = unsafe { libc::ptrace(libc::PTRACE_SYSCALL, self.tid, 0, inject) };
            assert_eq!(r, 0);
            let status = self.wait_stop();
            let sig = libc::WSTOPSIG(status);
            inject = 0;
            if sig == libc::SIGTRAP | 0x80 {
                // A system-call stop: `/proc` names the call (entry and exit stops alternate;
                // the first stop at `nr` is its entry).
                let now = std::fs::read_to_string(&path).unwrap_or_default();
                if now.split(' ').next() == Some(&nr.to_string()) {
                    return;
                }
            } else if status >> 16 == 0 {
                // A signal for the thread: delivered as it would have been.
                inject = sig;
            }
        }
    }
}

impl Drop for Traced {
    fn drop(&mut self) {
        // SAFETY: the thread is in a ptrace stop (or gone, which makes this fail harmlessly).
        unsafe { libc::ptrace(libc::PTRACE_DETACH, self.tid, 0, 0) };
    }
}

/// A thread holds the connection flag (stopped by ptrace inside its connection attempt, at
/// system call `nr`) while the main thread forks: the child connects by itself.
fn fork_while_a_thread_is_stopped_in(nr: libc::c_long) {
    let d = TestDaemon::start("fork-conn", &[]);
    let mut client = client(&d, &["fork-while-connecting"]);
    let lines = Lines::of(&mut client);
    let mut stdin = client.0.stdin.take().unwrap();
    let line = lines.next("tid");
    let tid: libc::pid_t = line
        .strip_prefix("tid ")
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    let client_pid = client.0.id();
    let traced = Traced::seize(client_pid, tid);
    writeln!(stdin, "go").unwrap();
    traced.run_to_syscall(nr);
    // Stopped mid-connect: the parent has not been welcomed yet, so the only client the daemon
    // may have is that half-made connection, which holds nothing.
    assert_eq!(d.stat("live_blocks"), 0, "{:?}", d.status());
    writeln!(stdin, "fork").unwrap();
    let child = lines.next("child");
    // The child connected while the parent's thread was still stopped: by itself.
    let log = d.log();
    let connected: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" connected: pid "))
        .collect();
    drop(traced);
    writeln!(stdin, "done").unwrap();
    drop(stdin);
    let (status, out) = lines.finish(client, Duration::from_secs(20));
    assert_eq!(child, "child exit=0", "{out}");
    assert!(status.success(), "client failed ({status:?}): {out}");
    assert!(out.contains("reentries=0"), "{out}");
    let parent = format!(" connected: pid {client_pid} ");
    assert!(
        connected.iter().any(|l| !l.contains(&parent)),
        "the child connected while its parent's thread was stopped: {log}"
    );
    if nr == libc::SYS_connect {
        assert!(
            !connected.iter().any(|l| l.contains(&parent)),
            "the parent's thread connected before `connect`: {log}"
        );
    }
}

/// The connection has a socket but no connection yet: stopped on entering `connect`.
#[test]
fn a_child_forked_while_another_thread_connects_does_not_wait_for_that_connection() {
    fork_while_a_thread_is_stopped_in(libc::SYS_connect);
}

/// The same, stopped later in the handshake: connected and `Hello` sent, on entering the
/// `recvmsg` that waits for the daemon's welcome (the child inherits that connected socket).
#[test]
fn a_child_forked_while_another_thread_awaits_its_welcome_does_not_wait_for_it() {
    fork_while_a_thread_is_stopped_in(libc::SYS_recvmsg);
}

/// The process's first large allocation is made in a `pthread_atfork` handler, so the
/// allocator connects from inside `fork`: it must not register its own fork handler there
/// (glibc holds the handlers' lock), or the process deadlocks.
#[test]
fn a_first_large_allocation_inside_a_fork_handler_does_not_deadlock() {
    let d = TestDaemon::start("fork-handler", &[]);
    let client = client(&d, &["alloc-in-fork-handler"]);
    let (status, out) = wait_with_timeout(client, Duration::from_secs(20));
    assert!(status.success(), "client failed ({status:?}): {out}");
}

/// How the test restarts the daemon, by restart number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Restart {
    /// `xallocd stop` (the objects go, the keeper quits), then `start`: a new arena.
    Stop,
    /// SIGKILL, then `start --fresh`: the dead daemon's keeper lets go of its arena; a new one.
    KillFresh,
    /// SIGKILL, then `start`: the new daemon takes the same arena and channels back from the
    /// keeper and re-attaches.
    KillReattach,
}

fn restart_kind(k: u64) -> Restart {
    match k % 3 {
        0 => Restart::KillReattach,
        1 => Restart::Stop,
        _ => Restart::KillFresh,
    }
}

#[test]
fn a_process_keeps_using_the_daemon_across_more_restarts_than_it_keeps_connections() {
    const RESTARTS: u64 = 14;
    let mut d = TestDaemon::start("restarts", &["--arena-size", "64M"]);
    let mut client = client(&d, &["restarts"]);
    let mut stdin = client.0.stdin.take().unwrap();
    let lines = Lines::of(&mut client);
    let mut ask = |cmd: &str| -> String {
        writeln!(stdin, "{cmd}").unwrap();
        lines.next(cmd) + "\n"
    };
    // The blocks of the first two daemons are kept to the end: their connections must stay.
    let mode = |k: u64| if k < 2 { "hold" } else { "free" };
    let line = ask(&format!("alloc 0 {}", mode(0)));
    assert_eq!(line.trim_end(), "served gen=0 connections=1");
    let mut expected = 1;
    for k in 1..=RESTARTS {
        let kind = restart_kind(k);
        match kind {
            Restart::Stop => {
                let out = d.xallocd(&["stop"]);
                assert!(out.status.success(), "stop {k}: {out:?}");
            }
            Restart::KillFresh | Restart::KillReattach => {
                d.signal(libc::SIGKILL);
                assert!(d.wait_exit(Duration::from_secs(5)), "kill {k}");
            }
        }
        let extra: &[&str] = if kind == Restart::KillFresh {
            &["--fresh"]
        } else {
            &[]
        };
        let keeper = keeper_pid(&d.name);
        let out = d.start_command(extra);
        assert!(out.status.success(), "start {k}: {out:?}");
        d.adopt();
        if kind != Restart::KillReattach {
            expected += 1;
        }
        // Re-attaching keeps the keeper that held the arena; the other restarts make a new one.
        let now = d.stat("keeper_pid");
        assert_eq!(
            keeper.map(u64::from) == Some(now),
            kind == Restart::KillReattach,
            "restart {k} ({kind:?}): keeper {keeper:?} before, {now} after"
        );
        let line = ask(&format!("alloc {k} {}", mode(k)));
        assert!(
            line.trim_end() == format!("served gen={k} connections={expected}"),
            "restart {k} ({kind:?}): {line}"
        );
        // Served by this daemon: it holds the client's new 1 MiB block.
        assert!(
            d.stat("used_bytes") >= 1 << 20,
            "restart {k}: {:?}",
            d.status()
        );
    }
    let reattached = d
        .log()
        .matches("re-attached to the existing segments")
        .count() as u64;
    assert_eq!(
        reattached,
        RESTARTS / 3,
        "every SIGKILL-then-start re-attached"
    );
    // The blocks of the first two daemons kept their contents and their arenas.
    let line = ask("check");
    assert!(line.starts_with("ok "), "{line}");
    assert!(line.contains("reentries=0"), "{line}");
    assert!(
        line.trim_end()
            .ends_with(&format!("connections={expected}")),
        "{line}"
    );
    assert!(
        expected > 8,
        "more daemons than kept connections: {expected}"
    );
    let (status, out) = lines.finish(client, Duration::from_secs(20));
    assert!(status.success(), "{status:?}: {out}");
}

#[test]
fn a_busy_process_reconnects_through_many_restarts_while_its_threads_free_old_blocks() {
    // Four threads allocate, check and free blocks of every size, and hand them to each other,
    // while the daemon is stopped and started again (a new arena each time). Once the client
    // uses a new daemon, it is told to free what its threads keep (they keep blocks of every
    // daemon so far, which would hold every connection): each thread does so when it comes to
    // it, while the others go on, so connections are recycled while blocks of the old arenas
    // are still being freed.
    const RESTARTS: u64 = 9;
    let mut d = TestDaemon::start("restarts-busy", &["--arena-size", "256M"]);
    let mut client = client(&d, &["work", "4", "0"]);
    for k in 0..=RESTARTS {
        if k > 0 {
            let out = d.xallocd(&["stop"]);
            assert!(out.status.success(), "stop {k}: {out:?}");
            let out = d.start_command(&["--arena-size", "256M"]);
            assert!(out.status.success(), "start {k}: {out:?}");
            d.adopt();
        }
        // The client found this daemon: it connected, and allocates in its arena.
        let found = d.wait_for(Duration::from_secs(10), || {
            let s = d.status();
            s["clients"] != "0" && s["used_bytes"] != "0"
        });
        assert!(found.is_some(), "daemon {k}: {:?}", d.status());
        writeln!(client.0.stdin.as_mut().unwrap(), "free what you keep").unwrap();
    }
    drop(client.0.stdin.take());
    let (status, out) = wait_with_timeout(client, Duration::from_secs(30));
    assert!(status.success(), "client failed ({status:?}): {out}");
    assert!(out.contains("reentries=0"), "{out}");
    assert!(
        out.contains(&format!("connections={} ", RESTARTS + 1))
            || out
                .trim_end()
                .ends_with(&format!("connections={}", RESTARTS + 1)),
        "{out}"
    );
}
