//! The idle-clients part of `roundtrip`: what many connected clients that ask nothing cost the
//! daemon, and what they cost the one client that does ask.
//!
//! # How
//!
//! - **Holders.** `roundtrip hold --name NAME --count N` connects N times
//!   ([`Connection::connect`]: a socket and a channel each), prints `ready` once all are
//!   connected, then waits for its standard input to close and exits, which closes every one of
//!   its connections. A connection keeps two descriptors in the client (the socket and the
//!   arena memfd); a holder raises its soft `RLIMIT_NOFILE` to the hard limit, and [`run`]
//!   spreads the connections over as many holders as that limit needs (one for 1000 under the
//!   usual hard limits). Holders are pinned on the client's CPU, away from the daemon's.
//! - **Quiet.** Before each measurement the daemon must be asleep: its threads' run count
//!   (`/proc/PID/task/*/schedstat`, or its CPU ticks where the kernel keeps no schedstat) must
//!   stay the same over [`QUIET_POLL`], waited for at most [`QUIET_TIMEOUT`]. Connecting or
//!   closing a thousand clients keeps it busy for a moment; the measurements start after.
//! - **Idle CPU.** With the holders connected and the daemon quiet, its utime + stime over
//!   `--idle-secs` (and its keeper's). Target: zero.
//! - **Rounds.** One more client (this process, pinned on `--other-cpu`) measures
//!   allocate+free of 1 MiB, as in `run`, with the holders connected and without them, in
//!   `--rounds` rounds whose order alternates (with, alone | alone, with | ...), so that drift
//!   on a noisy machine falls on both sides alike. Target: the median over rounds of the ratio
//!   with / alone of the p50s at most [`TARGET_RATIO`].

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use super::{
    clock_ticks_per_second, connect_checked, cpu_sample, measure_xalloc, number, pin_to, summarize,
    Config, CpuSample, Summary,
};
use xalloc_global::client::Connection;

/// Target: allocate+free p50 with the idle clients connected, over the same alone.
const TARGET_RATIO: f64 = 1.2;
/// Descriptors a [`Connection`] keeps open in its process.
const FDS_PER_CONNECTION: u64 = 2;
/// Descriptors a holder keeps for everything else.
const FD_RESERVE: u64 = 64;
/// Most connections one holder takes, whatever its descriptor limit.
const MAX_PER_HOLDER: u64 = 100_000;
/// The daemon counts as quiet when it was not scheduled over this long.
const QUIET_POLL: Duration = Duration::from_millis(100);
/// How long to wait for the daemon to become quiet before measuring anyway (noted).
const QUIET_TIMEOUT: Duration = Duration::from_secs(10);
/// What a holder prints once its connections are all made.
const READY: &str = "ready";

/// `roundtrip hold --name NAME --count N [--cpu CPU]`: makes N connections, says `ready`,
/// holds them until standard input closes.
pub fn hold_main(args: impl Iterator<Item = String>) -> Result<(), String> {
    let mut args = args;
    let (mut name, mut count, mut cpu) = (None, None, None);
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "--name" => name = args.next(),
            "--count" => count = Some(number::<usize>(args.next(), "--count")?),
            "--cpu" => cpu = Some(number::<usize>(args.next(), "--cpu")?),
            _ => return Err(format!("hold: unknown argument {flag:?}")),
        }
    }
    let (Some(name), Some(count)) = (name, count) else {
        return Err("usage: roundtrip hold --name NAME --count N [--cpu CPU]".to_owned());
    };
    if let Some(cpu) = cpu {
        pin_to(cpu).map_err(|e| format!("hold: {e}"))?;
    }
    let limit = raise_nofile().map_err(|e| format!("hold: {e}"))?;
    let needed = count as u64 * FDS_PER_CONNECTION + FD_RESERVE;
    if needed > limit {
        return Err(format!(
            "hold: {count} connections need about {needed} descriptors, RLIMIT_NOFILE is {limit}"
        ));
    }
    let mut conns = Vec::with_capacity(count);
    for i in 0..count {
        let c = Connection::connect(&name)
            .map_err(|e| format!("hold: idle connection {} of {count}: {e}", i + 1))?;
        conns.push(c);
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "{READY}")
        .and_then(|()| out.flush())
        .map_err(|e| format!("hold: stdout: {e}"))?;
    let mut stdin = std::io::stdin().lock();
    let mut buf = [0u8; 64];
    loop {
        match stdin.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("hold: stdin: {e}")),
        }
    }
    drop(conns);
    Ok(())
}

/// Raises this process's soft `RLIMIT_NOFILE` to its hard limit (bounded by
/// [`MAX_PER_HOLDER`] connections' worth); returns the soft limit in force.
fn raise_nofile() -> Result<u64, String> {
    let (soft, hard) = nofile()?;
    let want = hard.min(MAX_PER_HOLDER * FDS_PER_CONNECTION + FD_RESERVE);
    if want <= soft {
        return Ok(soft);
    }
    let lim = libc::rlimit {
        rlim_cur: want,
        rlim_max: hard,
    };
    // SAFETY: `lim` is a valid `rlimit`, read by the call only.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(format!(
            "setrlimit(RLIMIT_NOFILE, {want}): {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(want)
}

/// The soft and hard `RLIMIT_NOFILE` of this process.
fn nofile() -> Result<(u64, u64), String> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable `rlimit`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(format!(
            "getrlimit(RLIMIT_NOFILE): {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok((lim.rlim_cur, lim.rlim_max))
}

/// Connections one holder may take: what its hard descriptor limit allows.
fn per_holder() -> Result<usize, String> {
    let (_, hard) = nofile()?;
    let n = hard.saturating_sub(FD_RESERVE) / FDS_PER_CONNECTION;
    Ok(n.clamp(1, MAX_PER_HOLDER) as usize)
}

/// Holder processes that keep the idle connections; killed if dropped before [`Holders::stop`].
struct Holders {
    children: Vec<(Child, Option<ChildStdin>)>,
}

impl Holders {
    /// Starts holders for `count` connections in all, pinned on `cpu`, and waits until every
    /// one of them is connected.
    fn start(cfg: &Config, count: usize, per: usize) -> Result<Self, String> {
        let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
        let mut holders = Holders {
            children: Vec::new(),
        };
        let mut left = count;
        while left > 0 {
            let n = left.min(per);
            left -= n;
            let mut child = Command::new(&exe)
                .args(["hold", "--name", &cfg.name])
                .args(["--count", &n.to_string()])
                .args(["--cpu", &cfg.other_cpu.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .map_err(|e| format!("spawn of a holder: {e}"))?;
            let stdin = child.stdin.take();
            let stdout = child.stdout.take();
            holders.children.push((child, stdin));
            let mut line = String::new();
            if let Some(out) = stdout {
                BufReader::new(out)
                    .read_line(&mut line)
                    .map_err(|e| format!("read from a holder: {e}"))?;
            }
            if line.trim() != READY {
                return Err(format!(
                    "a holder of {n} connections did not get them all (said {:?}; see its \
                     message above)",
                    line.trim()
                ));
            }
        }
        Ok(holders)
    }

    /// Closes the holders' standard input, so that they drop their connections and exit, and
    /// waits for them.
    fn stop(mut self) -> Result<(), String> {
        let children = std::mem::take(&mut self.children);
        let mut waiting = Vec::new();
        for (child, stdin) in children {
            drop(stdin);
            waiting.push(child);
        }
        for mut child in waiting {
            let status = child
                .wait()
                .map_err(|e| format!("wait for a holder: {e}"))?;
            if !status.success() {
                return Err(format!("a holder failed: {status}"));
            }
        }
        Ok(())
    }
}

impl Drop for Holders {
    fn drop(&mut self) {
        for (child, _) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The pid of instance `name`'s keeper (`xallocd keeper --name NAME`), if one runs.
fn find_keeper(name: &str) -> Option<u32> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        let keeper = args.windows(3).any(|w| {
            w[0] == b"keeper".as_slice() && w[1] == b"--name".as_slice() && w[2] == name.as_bytes()
        });
        if keeper {
            return Some(pid);
        }
    }
    None
}

/// A measure of how often the daemon ran: its threads' run count where the kernel keeps
/// schedstat, else its CPU ticks.
fn activity(s: &CpuSample) -> u64 {
    s.sched.map_or(s.ticks, |(_, runs)| runs)
}

/// Waits until daemon `pid` stops running (see the module's "Quiet"); returns how long that
/// took, or `None` if it never did within [`QUIET_TIMEOUT`].
fn wait_quiet(pid: u32) -> Result<Option<Duration>, String> {
    let start = Instant::now();
    let mut last = activity(&cpu_sample(pid)?);
    loop {
        std::thread::sleep(QUIET_POLL);
        let now = activity(&cpu_sample(pid)?);
        if now == last {
            return Ok(Some(start.elapsed()));
        }
        if start.elapsed() > QUIET_TIMEOUT {
            return Ok(None);
        }
        last = now;
    }
}

/// Median of `v` (sorts it); 0 for none.
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Whether a measurement is taken with the holders connected.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Alone,
    With,
}

/// One round: the two measurements, in the order taken.
struct Round {
    first: Phase,
    alone: Summary,
    with: Summary,
}

/// The idle-clients part: see the module's documentation. `two_cpus`: whether this process
/// may run on `--other-cpu` (as it started: `run` leaves it pinned on the daemon's CPU).
pub fn run(cfg: &Config, two_cpus: bool) -> Result<(), String> {
    let n = cfg.idle_clients;
    if n == 0 {
        return Ok(());
    }
    if !two_cpus {
        println!(
            "## Idle clients: skipped (CPU {} not available for the client)",
            cfg.other_cpu
        );
        return Ok(());
    }
    let (conn, pid) = connect_checked(cfg)?;
    let mut slot = conn.claim().map_err(|e| format!("claim a slot: {e}"))?;
    pin_to(cfg.other_cpu)?;
    let per = per_holder()?;
    let holder_count = n.div_ceil(per);
    let keeper = find_keeper(&cfg.name);
    let tck = clock_ticks_per_second();
    let mut notes = Vec::new();
    let mut quiet = |what: &str| -> Result<(), String> {
        if wait_quiet(pid)?.is_none() {
            notes.push(format!(
                "the daemon was still running {} s after {what}; measured anyway",
                QUIET_TIMEOUT.as_secs()
            ));
        }
        Ok(())
    };

    eprintln!("roundtrip: connecting {n} idle clients ({holder_count} holder processes)");
    let t = Instant::now();
    let mut holders = Some(Holders::start(cfg, n, per)?);
    let connect_time = t.elapsed();
    quiet("the idle clients connected")?;
    eprintln!(
        "roundtrip: daemon CPU time over {} s with {n} idle clients",
        cfg.idle_secs
    );
    let before = cpu_sample(pid)?;
    let keeper_before = keeper.and_then(|k| cpu_sample(k).ok());
    std::thread::sleep(Duration::from_secs(cfg.idle_secs));
    let after = cpu_sample(pid)?;
    let keeper_after = keeper.and_then(|k| cpu_sample(k).ok());
    let idle_ticks = after.ticks.saturating_sub(before.ticks);
    let idle_sched = before
        .sched
        .zip(after.sched)
        .map(|(b, a)| (a.0.saturating_sub(b.0), a.1.saturating_sub(b.1)));
    let keeper_ticks = keeper_before
        .zip(keeper_after)
        .map(|(b, a)| a.ticks.saturating_sub(b.ticks));

    let mut rounds = Vec::with_capacity(cfg.rounds);
    for r in 0..cfg.rounds {
        // With the holders connected first in even rounds: they are connected already when
        // round 0 starts, and each change of state is made once per two measurements.
        let order = if r % 2 == 0 {
            [Phase::With, Phase::Alone]
        } else {
            [Phase::Alone, Phase::With]
        };
        let mut got = [None, None];
        for phase in order {
            match (phase, holders.is_some()) {
                (Phase::With, false) => {
                    holders = Some(Holders::start(cfg, n, per)?);
                    quiet("the idle clients connected")?;
                }
                (Phase::Alone, true) => {
                    if let Some(h) = holders.take() {
                        h.stop()?;
                    }
                    quiet("the idle clients closed")?;
                }
                _ => quiet("the last measurement")?,
            }
            eprintln!(
                "roundtrip: round {} of {}: allocate+free {}",
                r + 1,
                cfg.rounds,
                if phase == Phase::With {
                    format!("with {n} idle clients")
                } else {
                    "alone".to_owned()
                }
            );
            let mut lat = measure_xalloc(&mut slot, cfg.warmup, cfg.iters)?;
            got[usize::from(phase == Phase::With)] = Some(summarize(&mut lat));
        }
        if let [Some(alone), Some(with)] = got {
            rounds.push(Round {
                first: order[0],
                alone,
                with,
            });
        }
    }
    if let Some(h) = holders.take() {
        h.stop()?;
    }
    drop(slot);
    drop(conn);

    let report = IdleReport {
        cfg,
        pid,
        holder_count,
        connect_time,
        idle_ticks,
        idle_sched,
        keeper,
        keeper_ticks,
        tck,
        rounds: &rounds,
        notes: &notes,
    };
    print!("{}", report.markdown());
    Ok(())
}

/// Everything the idle-clients report needs.
struct IdleReport<'a> {
    cfg: &'a Config,
    pid: u32,
    holder_count: usize,
    connect_time: Duration,
    idle_ticks: u64,
    idle_sched: Option<(u64, u64)>,
    keeper: Option<u32>,
    keeper_ticks: Option<u64>,
    tck: u64,
    rounds: &'a [Round],
    notes: &'a [String],
}

impl IdleReport<'_> {
    fn markdown(&self) -> String {
        let cfg = self.cfg;
        let n = cfg.idle_clients;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "## Idle clients: instance {}, daemon pid {} pinned on CPU {}\n",
            cfg.name, self.pid, cfg.daemon_cpu
        );
        let _ = writeln!(
            s,
            "{n} idle connections in {} holder process(es) pinned on CPU {}, connected in \
             {:.2} s ({:.0} µs each).\n",
            self.holder_count,
            cfg.other_cpu,
            self.connect_time.as_secs_f64(),
            self.connect_time.as_secs_f64() * 1e6 / n as f64
        );
        let ms = self.idle_ticks as f64 * 1e3 / self.tck as f64;
        let sched = match self.idle_sched {
            Some((ns, runs)) => format!(
                "; schedstat: {:.3} ms on CPU, scheduled {runs} times",
                ns as f64 / 1e6
            ),
            None => String::new(),
        };
        let keeper = match (self.keeper, self.keeper_ticks) {
            (Some(k), Some(t)) => format!(" Its keeper (pid {k}): {t} ticks."),
            _ => " (No keeper process found.)".to_owned(),
        };
        let _ = writeln!(
            s,
            "Daemon CPU time over {} s while the {n} clients idle: {} ticks ({ms:.0} ms at {} \
             ticks/s){sched}.{keeper}\n",
            cfg.idle_secs, self.idle_ticks, self.tck
        );
        let _ = writeln!(
            s,
            "One more client, allocate+free 1 MiB on different CPUs (client {}, daemon {}), \
             {} iterations after {} warm-up per measurement, alone and with the {n} idle \
             clients connected, in alternating order:\n",
            cfg.other_cpu, cfg.daemon_cpu, cfg.iters, cfg.warmup
        );
        let _ = writeln!(
            s,
            "| round | first | alone p50 µs | with p50 µs | with / alone | alone p99 µs | with \
             p99 µs | alone mean µs | with mean µs |"
        );
        let _ = writeln!(s, "|---:|---|---:|---:|---:|---:|---:|---:|---:|");
        let mut ratios = Vec::new();
        let (mut a50, mut w50, mut a99, mut w99, mut am, mut wm) =
            (vec![], vec![], vec![], vec![], vec![], vec![]);
        for (i, r) in self.rounds.iter().enumerate() {
            let ratio = r.with.p50 / r.alone.p50;
            ratios.push(ratio);
            a50.push(r.alone.p50);
            w50.push(r.with.p50);
            a99.push(r.alone.p99);
            w99.push(r.with.p99);
            am.push(r.alone.mean);
            wm.push(r.with.mean);
            let _ = writeln!(
                s,
                "| {} | {} | {:.2} | {:.2} | {ratio:.2}× | {:.2} | {:.2} | {:.2} | {:.2} |",
                i + 1,
                if r.first == Phase::With {
                    "with"
                } else {
                    "alone"
                },
                r.alone.p50,
                r.with.p50,
                r.alone.p99,
                r.with.p99,
                r.alone.mean,
                r.with.mean
            );
        }
        let ratio = median(&mut ratios);
        let _ = writeln!(
            s,
            "| median | | {:.2} | {:.2} | {ratio:.2}× | {:.2} | {:.2} | {:.2} | {:.2} |\n",
            median(&mut a50),
            median(&mut w50),
            median(&mut a99),
            median(&mut w99),
            median(&mut am),
            median(&mut wm)
        );
        for note in self.notes {
            let _ = writeln!(s, "Note: {note}.\n");
        }
        let verdict = |ok: bool| if ok { "met" } else { "missed" };
        let _ = writeln!(s, "| target | measured | result |");
        let _ = writeln!(s, "|---|---:|---|");
        let _ = writeln!(
            s,
            "| daemon CPU time while {n} clients idle = 0 | {} ticks | {} |",
            self.idle_ticks,
            verdict(self.idle_ticks == 0)
        );
        let _ = writeln!(
            s,
            "| allocate+free p50 with {n} idle clients within {TARGET_RATIO}× of alone (median \
             of the rounds' ratios) | {ratio:.2}× | {} |",
            verdict(ratio <= TARGET_RATIO)
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&mut []), 0.0);
    }
}
