//! `roundtrip`: what a request to `xallocd` costs, next to a plain kernel hand-off, and what the
//! daemon costs while nobody asks it anything.
//!
//! Run it through `scripts/bench-roundtrip.sh [--quick]`, which builds release, starts a
//! daemon of its own pinned on CPU 0, runs `roundtrip run` against it and always stops it.
//!
//! # What is measured
//!
//! Each latency row is a distribution (p50, p99, mean, in µs) of per-iteration times taken with
//! the monotonic clock ([`Instant`]) around one iteration, over N iterations after a warm-up
//! (default 20000 after 2000; `--quick`: 500 after 50):
//!
//! - **xalloc allocate+free 1 MiB**: `slot.allocate(1 << 20, 4096, false)` then
//!   `slot.free(offset)` through one claimed slot: two request round trips to the daemon. Run
//!   once with this process pinned on another CPU than the daemon ("different CPUs"), once on
//!   the daemon's CPU ("same CPU").
//! - **unix-socket ping-pong 8 B**: one 8-byte message to a child echo process and back over a
//!   socketpair (the child is this binary re-executed as `roundtrip echo`, which pins itself),
//!   with the same two placements: the reference for what waking a process costs here.
//! - **daemon CPU time while idle**: once the clients are done, the daemon's utime + stime
//!   (fields 14 and 15 of `/proc/PID/stat`, in clock ticks) before and after sleeping 10 s
//!   (2 s with `--quick`); also, where the kernel keeps them, the on-CPU nanoseconds and run
//!   counts summed over its threads' `/proc/PID/task/TID/schedstat`. Target: zero.
//! - **idle clients** (then, or alone with `roundtrip idle-clients`; see [`idle`]): 1000 idle
//!   connections (50 with `--quick`) held by child processes; the daemon's CPU time over the
//!   idle seconds while they are connected (target: zero), and allocate+free on different CPUs
//!   by one more client with and without them, alternating for several rounds (target: with
//!   them within 1.2× of alone).
//!
//! Pinning is done in-process with `sched_setaffinity` (this program is single-threaded); the
//! daemon's own pinning (`taskset -c 0` in the script) is checked against `--daemon-cpu`.
//!
//! # Output and exit status
//!
//! A markdown table of the rows above, the idle line, and the targets (allocate+free p50 under
//! 1 µs on different CPUs, under 10 µs on one CPU; zero daemon CPU time when idle), each marked
//! met or missed. Missed targets do not fail the run (timings on shared machines are noisy);
//! anything else that goes wrong (no daemon, a refused request, a dead echo child) exits 1.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use xalloc_global::client::{Connection, Slot};

#[path = "../shared.rs"]
mod shared;
use shared::*;

#[path = "roundtrip/idle.rs"]
mod idle;

/// Bytes per allocation.
const ALLOC_SIZE: u64 = 1 << 20;
/// Alignment of each allocation.
const ALLOC_ALIGN: u64 = 4096;
/// Target: xalloc allocate+free p50 with client and daemon on different CPUs, in µs.
const TARGET_DIFFERENT_US: f64 = 1.0;
/// Target: xalloc allocate+free p50 with client and daemon on one CPU, in µs.
const TARGET_SAME_US: f64 = 10.0;
/// How long the ping-pong parent waits for one echo before it gives up on the child.
const ECHO_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between the last request and the first idle sample.
const SETTLE: Duration = Duration::from_millis(100);

const USAGE: &str = "\
usage: roundtrip run --name NAME [options]
       roundtrip idle-clients --name NAME [options]   (only the idle-clients part of `run`)
       roundtrip echo --cpu CPU        (internal: the ping-pong echo child)
       roundtrip hold --name NAME --count N [--cpu CPU]
                                       (internal: holds N idle connections until stdin closes)

  --name NAME        xallocd instance to measure (required)
  --daemon-pid PID   refuse to run unless the instance's daemon has this pid
  --daemon-cpu CPU   the one CPU the daemon is pinned to (default 0; checked)
  --other-cpu CPU    the client's CPU in the different-CPUs rows (default 1)
  --iters N          measured iterations per row (default 20000, quick 500)
  --warmup N         warm-up iterations per row (default 2000, quick 50)
  --idle-secs S      seconds of daemon idle time measured (default 10, quick 2)
  --idle-clients N   then: N idle connections (in child processes); the daemon's CPU time
                     while they idle, and one client's allocate+free on different CPUs with
                     and without them, alternating (default 1000, quick 50; 0 skips)
  --rounds R         alternations of the idle-clients part (default 5, quick 2)
  --quick            small counts (CI smoke run)
  --gaps LIST        instead: only allocate+free on different CPUs, with a busy pause of each
                     of LIST µs (e.g. 0,20,50) between pairs; prints p50, p99 and the daemon's
                     CPU share per pause (for tuning `xallocd start --spin-us`)

Prints a markdown table. Missed latency targets do not fail the run; errors exit 1.
";

/// What `roundtrip run` was asked to do.
struct Config {
    name: String,
    daemon_pid: Option<u32>,
    daemon_cpu: usize,
    other_cpu: usize,
    iters: usize,
    warmup: usize,
    idle_secs: u64,
    gaps: Vec<u64>,
    /// Idle connections held for the idle-clients part (0: skipped).
    idle_clients: usize,
    /// Rounds of the idle-clients part, each measuring with and without them.
    rounds: usize,
}

fn parse_run(args: impl Iterator<Item = String>) -> Result<Config, String> {
    let mut args = args.peekable();
    let mut name = None;
    let mut daemon_pid = None;
    let mut daemon_cpu = 0;
    let mut other_cpu = 1;
    let mut iters = None;
    let mut warmup = None;
    let mut idle_secs = None;
    let mut quick = false;
    let mut gaps = Vec::new();
    let mut idle_clients = None;
    let mut rounds = None;
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        let mut value = || inline.clone().or_else(|| args.next());
        match flag.as_str() {
            "--name" => name = Some(value().ok_or("--name needs a value")?),
            "--daemon-pid" => daemon_pid = Some(number(value(), "--daemon-pid")?),
            "--daemon-cpu" => daemon_cpu = number(value(), "--daemon-cpu")?,
            "--other-cpu" => other_cpu = number(value(), "--other-cpu")?,
            "--iters" => iters = Some(number(value(), "--iters")?),
            "--warmup" => warmup = Some(number(value(), "--warmup")?),
            "--idle-secs" => idle_secs = Some(number(value(), "--idle-secs")?),
            "--idle-clients" => idle_clients = Some(number(value(), "--idle-clients")?),
            "--rounds" => rounds = Some(number(value(), "--rounds")?),
            "--quick" => quick = true,
            "--gaps" => {
                for g in value().ok_or("--gaps needs a value")?.split(',') {
                    gaps.push(number(Some(g.to_owned()), "--gaps")?);
                }
            }
            "--help" | "-h" => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            _ => return Err(format!("unknown argument {arg:?}\n\n{USAGE}")),
        }
    }
    let cfg = Config {
        name: name.ok_or(format!("--name is required\n\n{USAGE}"))?,
        daemon_pid,
        daemon_cpu,
        other_cpu,
        iters: iters.unwrap_or(if quick { 500 } else { 20_000 }),
        warmup: warmup.unwrap_or(if quick { 50 } else { 2_000 }),
        idle_secs: idle_secs.unwrap_or(if quick { 2 } else { 10 }),
        gaps,
        idle_clients: idle_clients.unwrap_or(if quick { 50 } else { 1000 }),
        rounds: rounds.unwrap_or(if quick { 2 } else { 5 }),
    };
    if cfg.iters == 0 || cfg.rounds == 0 {
        return Err("--iters and --rounds must be positive".to_owned());
    }
    if cfg.daemon_cpu == cfg.other_cpu {
        return Err("--other-cpu must differ from --daemon-cpu".to_owned());
    }
    Ok(cfg)
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let result = match args.next().as_deref() {
        Some("run") => parse_run(args).and_then(|cfg| run(&cfg)),
        Some("idle-clients") => {
            parse_run(args).and_then(|cfg| idle::run(&cfg, cpu_allowed(cfg.other_cpu)))
        }
        Some("echo") => echo_main(args),
        Some("hold") => idle::hold_main(args),
        Some("--help" | "-h") => {
            print!("{USAGE}");
            Ok(())
        }
        _ => Err(format!("expected a subcommand\n\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("roundtrip: {e}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Statistics.

/// A latency distribution, in µs.
#[derive(Clone, Copy)]
struct Summary {
    p50: f64,
    p99: f64,
    mean: f64,
}

/// Summarizes per-iteration latencies in nanoseconds (sorts them).
fn summarize(ns: &mut [u64]) -> Summary {
    ns.sort_unstable();
    let n = ns.len().max(1);
    // Nearest-rank percentile.
    let pct = |p: f64| {
        let rank = ((p * n as f64).ceil() as usize).clamp(1, n);
        ns.get(rank - 1).copied().unwrap_or(0) as f64 / 1e3
    };
    Summary {
        p50: pct(0.50),
        p99: pct(0.99),
        mean: ns.iter().sum::<u64>() as f64 / n as f64 / 1e3,
    }
}

/// Elapsed nanoseconds since `t`.
fn nanos_since(t: Instant) -> u64 {
    u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Back-to-back clock reads: the floor under every number in the table.
fn clock_overhead(iters: usize) -> Summary {
    let mut lat = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        lat.push(nanos_since(t));
    }
    summarize(&mut lat)
}

// ---------------------------------------------------------------------------------------------
// xalloc allocate+free.

/// One allocate+free pair through `slot`.
fn alloc_free(slot: &mut Slot<'_>) -> Result<(), String> {
    let block = slot
        .allocate(ALLOC_SIZE, ALLOC_ALIGN, false)
        .map_err(|e| format!("allocate of {ALLOC_SIZE} bytes: {e}"))?;
    slot.free(block.offset)
        .map_err(|e| format!("free at offset {}: {e}", block.offset))
}

/// `warmup` untimed pairs, then `iters` timed ones; returns each pair's nanoseconds.
fn measure_xalloc(slot: &mut Slot<'_>, warmup: usize, iters: usize) -> Result<Vec<u64>, String> {
    for _ in 0..warmup {
        alloc_free(slot)?;
    }
    let mut lat = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        alloc_free(slot)?;
        lat.push(nanos_since(t));
    }
    Ok(lat)
}

/// `--gaps`: allocate+free on different CPUs with a busy pause between pairs (a client that
/// computes between requests), per pause: latency, and the daemon's CPU share over the run.
fn run_gaps(cfg: &Config, slot: &mut Slot<'_>, pid: u32) -> Result<(), String> {
    pin_to(cfg.other_cpu)?;
    let tps = clock_ticks_per_second() as f64;
    println!("| pause between pairs µs | p50 µs | p99 µs | daemon CPU share |");
    println!("|---:|---:|---:|---:|");
    for &gap in &cfg.gaps {
        let pause = Duration::from_micros(gap);
        let pair = |slot: &mut Slot<'_>| -> Result<u64, String> {
            let t = Instant::now();
            alloc_free(slot)?;
            let ns = nanos_since(t);
            let p = Instant::now();
            while p.elapsed() < pause {
                std::hint::spin_loop();
            }
            Ok(ns)
        };
        for _ in 0..cfg.warmup {
            pair(slot)?;
        }
        let before = cpu_sample(pid)?;
        let start = Instant::now();
        let mut lat = Vec::with_capacity(cfg.iters);
        for _ in 0..cfg.iters {
            lat.push(pair(slot)?);
        }
        let wall = start.elapsed().as_secs_f64();
        let after = cpu_sample(pid)?;
        let share = match (before.sched, after.sched) {
            (Some((b, _)), Some((a, _))) => a.saturating_sub(b) as f64 / 1e9 / wall,
            _ => after.ticks.saturating_sub(before.ticks) as f64 / tps / wall,
        };
        let s = summarize(&mut lat);
        println!(
            "| {gap} | {:.2} | {:.2} | {:.0} % |",
            s.p50,
            s.p99,
            share * 100.0
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Unix-socket ping-pong.

/// The message the echo child sends once it is pinned.
const READY: [u8; 8] = *b"ready\0\0\0";

/// `roundtrip echo --cpu CPU`: pins itself, then echoes 8-byte messages on the socket that is
/// its standard input until the parent closes it.
fn echo_main(mut args: impl Iterator<Item = String>) -> Result<(), String> {
    let cpu: usize = match args.next().as_deref() {
        Some("--cpu") => number(args.next(), "--cpu")?,
        _ => return Err("usage: roundtrip echo --cpu CPU".to_owned()),
    };
    pin_to(cpu).map_err(|e| format!("echo: {e}"))?;
    let fd = std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| format!("echo: dup of stdin: {e}"))?;
    let mut sock = UnixStream::from(fd);
    sock.write_all(&READY)
        .map_err(|e| format!("echo: write: {e}"))?;
    let mut buf = [0u8; 8];
    loop {
        match sock.read_exact(&mut buf) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(format!("echo: read: {e}")),
        }
        sock.write_all(&buf)
            .map_err(|e| format!("echo: write: {e}"))?;
    }
}

/// Ping-pong with an echo child pinned on `echo_cpu` (this thread stays where it is): `warmup`
/// untimed round trips, then `iters` timed ones.
fn measure_pingpong(echo_cpu: usize, warmup: usize, iters: usize) -> Result<Vec<u64>, String> {
    let (mut sock, theirs) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let mut cmd = Command::new(exe);
    cmd.args(["echo", "--cpu", &echo_cpu.to_string()])
        .stdin(Stdio::from(OwnedFd::from(theirs)))
        .stdout(Stdio::null());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("spawn of the echo child: {e}"))?;
    // Close our copy of the child's end: a dead child then reads as EOF here.
    drop(cmd);
    let result = pingpong_loop(&mut sock, warmup, iters);
    drop(sock);
    let status = child
        .wait()
        .map_err(|e| format!("wait for the echo child: {e}"))?;
    let lat = result?;
    if !status.success() {
        return Err(format!("the echo child failed: {status}"));
    }
    Ok(lat)
}

fn pingpong_loop(sock: &mut UnixStream, warmup: usize, iters: usize) -> Result<Vec<u64>, String> {
    sock.set_read_timeout(Some(ECHO_TIMEOUT))
        .map_err(|e| format!("set_read_timeout: {e}"))?;
    let io = |what: &str, e: std::io::Error| format!("ping-pong {what}: {e}");
    let mut buf = [0u8; 8];
    sock.read_exact(&mut buf)
        .map_err(|e| io("wait for the echo child", e))?;
    if buf != READY {
        return Err("the echo child sent garbage".to_owned());
    }
    let mut lat = Vec::with_capacity(iters);
    for i in 0..warmup + iters {
        let msg = (i as u64).to_le_bytes();
        let t = Instant::now();
        sock.write_all(&msg).map_err(|e| io("write", e))?;
        sock.read_exact(&mut buf).map_err(|e| io("read", e))?;
        let dt = nanos_since(t);
        if buf != msg {
            return Err(format!("ping-pong: sent {msg:?}, got back {buf:?}"));
        }
        if i >= warmup {
            lat.push(dt);
        }
    }
    Ok(lat)
}

// ---------------------------------------------------------------------------------------------
// Daemon CPU time.

/// A process's CPU time at one moment.
#[derive(Clone, Copy)]
struct CpuSample {
    /// utime + stime, in clock ticks.
    ticks: u64,
    /// On-CPU nanoseconds and run count, summed over its threads (absent without schedstat).
    sched: Option<(u64, u64)>,
}

fn cpu_sample(pid: u32) -> Result<CpuSample, String> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    // Field 2 (comm) is parenthesized and may hold spaces or parentheses: count from the last
    // `)`, after which field 3 comes first.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or(format!("{path}: no `)`"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> Result<u64, String> {
        fields
            .get(n - 3)
            .and_then(|f| f.parse().ok())
            .ok_or(format!("{path}: bad field {n}"))
    };
    let ticks = field(14)? + field(15)?;
    Ok(CpuSample {
        ticks,
        sched: sched_sum(pid),
    })
}

/// Sum of `/proc/PID/task/*/schedstat`: (on-CPU ns, times run).
fn sched_sum(pid: u32) -> Option<(u64, u64)> {
    let mut ns = 0;
    let mut runs = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let Ok(task) = task else { continue };
        let Ok(s) = std::fs::read_to_string(task.path().join("schedstat")) else {
            continue; // The thread exited meanwhile.
        };
        let f: Vec<u64> = s
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        let [on_cpu, _waited, ran] = f[..] else {
            return None;
        };
        ns += on_cpu;
        runs += ran;
    }
    Some((ns, runs))
}

fn clock_ticks_per_second() -> u64 {
    // SAFETY: a plain query.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(t).ok().filter(|&t| t > 0).unwrap_or(100)
}

// ---------------------------------------------------------------------------------------------
// The run.

/// Row label of the xalloc measurement.
const XALLOC: &str = "xalloc allocate+free 1 MiB";
/// Row label of the reference.
const PINGPONG: &str = "unix-socket ping-pong 8 B";

/// One table row; `result` is `None` when the placement was not available.
struct Row {
    what: &'static str,
    placement: String,
    result: Option<Summary>,
}

impl Row {
    fn new(what: &'static str, placement: String, lat: Option<Vec<u64>>) -> Self {
        Row {
            what,
            placement,
            result: lat.map(|mut l| summarize(&mut l)),
        }
    }
}

/// Connects to the instance and checks its daemon: the pid asked for, if any, pinned on
/// `--daemon-cpu` alone, which this process may use too. Returns the connection and the pid.
fn connect_checked(cfg: &Config) -> Result<(Connection, u32), String> {
    let conn = Connection::connect(&cfg.name)
        .map_err(|e| format!("connect to instance {:?}: {e}", cfg.name))?;
    let pid = conn.daemon_pid();
    if let Some(want) = cfg.daemon_pid {
        if want != pid {
            return Err(format!(
                "instance {:?} is served by pid {pid}, not {want}",
                cfg.name
            ));
        }
    }
    let daemon_cpus = cpus_allowed_list(pid)?;
    if daemon_cpus != cfg.daemon_cpu.to_string() {
        return Err(format!(
            "the daemon (pid {pid}) may run on CPUs {daemon_cpus}, not just CPU {}: start it \
             under `taskset -c {}`",
            cfg.daemon_cpu, cfg.daemon_cpu
        ));
    }
    if !cpu_allowed(cfg.daemon_cpu) {
        return Err(format!(
            "this process may not run on CPU {}",
            cfg.daemon_cpu
        ));
    }
    Ok((conn, pid))
}

fn run(cfg: &Config) -> Result<(), String> {
    let started = Instant::now();
    let (conn, pid) = connect_checked(cfg)?;
    let two_cpus = cpu_allowed(cfg.other_cpu);
    let (d, o) = (cfg.daemon_cpu, cfg.other_cpu);
    let different = format!("different CPUs (client {o}, daemon {d})");
    let same = format!("same CPU (client {d}, daemon {d})");
    let pp_different = format!("different CPUs (parent {o}, echo {d})");
    let pp_same = format!("same CPU (parent {d}, echo {d})");
    let mut rows = Vec::new();

    eprintln!(
        "roundtrip: daemon pid {pid} on CPU {d}; {} iterations after {} warm-up per row",
        cfg.iters, cfg.warmup
    );
    let mut slot = conn.claim().map_err(|e| format!("claim a slot: {e}"))?;
    if !cfg.gaps.is_empty() {
        return run_gaps(cfg, &mut slot, pid);
    }
    let mut clock = None;
    if two_cpus {
        pin_to(o)?;
        clock = Some(clock_overhead(cfg.iters));
        eprintln!("roundtrip: xalloc allocate+free, {different}");
        let lat = measure_xalloc(&mut slot, cfg.warmup, cfg.iters)?;
        rows.push(Row::new(XALLOC, different, Some(lat)));
    } else {
        rows.push(Row::new(XALLOC, different, None));
    }
    pin_to(d)?;
    if clock.is_none() {
        clock = Some(clock_overhead(cfg.iters));
    }
    eprintln!("roundtrip: xalloc allocate+free, {same}");
    let lat = measure_xalloc(&mut slot, cfg.warmup, cfg.iters)?;
    rows.push(Row::new(XALLOC, same, Some(lat)));
    drop(slot);
    drop(conn);

    if two_cpus {
        pin_to(o)?;
        eprintln!("roundtrip: unix-socket ping-pong, {pp_different}");
        let lat = measure_pingpong(d, cfg.warmup, cfg.iters)?;
        rows.push(Row::new(PINGPONG, pp_different, Some(lat)));
    } else {
        rows.push(Row::new(PINGPONG, pp_different, None));
    }
    pin_to(d)?;
    eprintln!("roundtrip: unix-socket ping-pong, {pp_same}");
    let lat = measure_pingpong(d, cfg.warmup, cfg.iters)?;
    rows.push(Row::new(PINGPONG, pp_same, Some(lat)));

    eprintln!("roundtrip: daemon CPU time over {} idle s", cfg.idle_secs);
    std::thread::sleep(SETTLE);
    let before = cpu_sample(pid)?;
    std::thread::sleep(Duration::from_secs(cfg.idle_secs));
    let after = cpu_sample(pid)?;
    let idle_ticks = after.ticks.saturating_sub(before.ticks);
    let idle_sched = before
        .sched
        .zip(after.sched)
        .map(|(b, a)| (a.0.saturating_sub(b.0), a.1.saturating_sub(b.1)));

    let report = Report {
        cfg,
        pid,
        rows: &rows,
        clock: clock.unwrap_or(Summary {
            p50: 0.0,
            p99: 0.0,
            mean: 0.0,
        }),
        idle_ticks,
        idle_sched,
        tck: clock_ticks_per_second(),
        elapsed: started.elapsed(),
    };
    print!("{}", report.markdown());
    if cfg.idle_clients > 0 {
        println!();
        idle::run(cfg, two_cpus)?;
    }
    Ok(())
}

/// Everything the printed report needs.
struct Report<'a> {
    cfg: &'a Config,
    pid: u32,
    rows: &'a [Row],
    clock: Summary,
    idle_ticks: u64,
    idle_sched: Option<(u64, u64)>,
    tck: u64,
    elapsed: Duration,
}

impl Report<'_> {
    fn markdown(&self) -> String {
        let cfg = self.cfg;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "## xalloc round trip: instance {}, daemon pid {} pinned on CPU {}\n",
            cfg.name, self.pid, cfg.daemon_cpu
        );
        let _ = writeln!(
            s,
            "{} iterations per row after {} warm-up; latency of one iteration (allocate+free = \
             two round trips to the daemon; ping-pong = one 8-byte message there and back).\n",
            cfg.iters, cfg.warmup
        );
        let _ = writeln!(s, "| measurement | placement | p50 µs | p99 µs | mean µs |");
        let _ = writeln!(s, "|---|---|---:|---:|---:|");
        for r in self.rows {
            match r.result {
                Some(m) => {
                    let _ = writeln!(
                        s,
                        "| {} | {} | {:.2} | {:.2} | {:.2} |",
                        r.what, r.placement, m.p50, m.p99, m.mean
                    );
                }
                None => {
                    let _ = writeln!(
                        s,
                        "| {} | {} | skipped: CPU {} not available | | |",
                        r.what, r.placement, cfg.other_cpu
                    );
                }
            }
        }
        let _ = writeln!(
            s,
            "| clock read (back-to-back `Instant::now`) | | {:.2} | {:.2} | {:.2} |",
            self.clock.p50, self.clock.p99, self.clock.mean
        );
        let ms = self.idle_ticks as f64 * 1e3 / self.tck as f64;
        let sched = match self.idle_sched {
            Some((ns, runs)) => format!(
                "; schedstat: {:.3} ms on CPU, scheduled {runs} times",
                ns as f64 / 1e6
            ),
            None => String::new(),
        };
        let _ = writeln!(
            s,
            "\nDaemon CPU time over {} idle s: {} ticks ({ms:.0} ms at {} ticks/s){sched}.\n",
            cfg.idle_secs, self.idle_ticks, self.tck
        );

        let xalloc_p50 = |i: usize| self.rows.get(i).and_then(|r| r.result).map(|m| m.p50);
        let judge = |v: Option<f64>, limit: f64| match v {
            Some(v) if v < limit => (format!("{v:.2} µs"), "met"),
            Some(v) => (format!("{v:.2} µs"), "missed"),
            None => ("skipped".to_owned(), "n/a"),
        };
        let targets = [
            (
                format!("xalloc allocate+free p50 < {TARGET_DIFFERENT_US} µs, different CPUs"),
                judge(xalloc_p50(0), TARGET_DIFFERENT_US),
            ),
            (
                format!("xalloc allocate+free p50 < {TARGET_SAME_US} µs, same CPU"),
                judge(xalloc_p50(1), TARGET_SAME_US),
            ),
            (
                "daemon CPU time while idle = 0".to_owned(),
                (
                    format!("{} ticks", self.idle_ticks),
                    if self.idle_ticks == 0 {
                        "met"
                    } else {
                        "missed"
                    },
                ),
            ),
        ];
        let _ = writeln!(s, "| target | measured | result |");
        let _ = writeln!(s, "|---|---:|---|");
        for (t, (m, r)) in &targets {
            let _ = writeln!(s, "| {t} | {m} | {r} |");
        }
        let met = targets.iter().filter(|t| t.1 .1 == "met").count();
        let judged = targets.iter().filter(|t| t.1 .1 != "n/a").count();
        let _ = writeln!(
            s,
            "\n{met} of {judged} targets met (missed targets do not fail the run); measured in \
             {:.1} s.",
            self.elapsed.as_secs_f64()
        );
        s
    }
}
