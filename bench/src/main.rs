//! `xalloc-bench`: replays identical, pre-generated allocation streams
//! through `xalloc_core::Heap` and peer allocators and prints one markdown
//! table per workload (throughput, region efficiency, tail latency).
//!
//! Run it through `scripts/bench.sh` (release build, pinned to one CPU).
//! `--help` lists the options.

mod allocs;
mod runner;
mod timer;
mod workload;

use std::panic::{self, AssertUnwindSafe};
use std::time::{Duration, Instant};

use allocs::{BenchAlloc, Buddy, Dl, Glibc, LinkedList, Rlsf, Talc, Xalloc, XallocBins};
use runner::{replay, Arena, FootprintProbe, Mode, Outcome};
use workload::{peak_live, Workload};

/// The harness allocates through dlmalloc-over-mmap, so glibc's heap holds
/// nothing but the glibc runs' blocks (clean mallinfo2 footprint, no
/// harness noise in its free lists).
#[global_allocator]
static HARNESS_ALLOC: dlmalloc::GlobalDlmalloc = dlmalloc::GlobalDlmalloc;

/// Size of the region every region-based allocator gets.
const REGION: usize = 64 << 20;
/// random-100k's peak live bytes (~74 MB: 100k blocks × ~740 B mean) do
/// not fit in 64 MiB, so that workload gets this larger region instead.
const BIG_REGION: usize = 128 << 20;
/// A capped allocator's passes replay 1/CAP_FRACTION of the ops its warm-up
/// reached within `Config::cap_budget`.
const CAP_FRACTION: usize = 4;
/// Relative precision of the region-size bisection.
const SEARCH_PRECISION: f64 = 0.005;

const WORKLOADS: &[&str] = &["random-1k", "random-100k", "large", "realloc"];

struct Config {
    quick: bool,
    reps: usize,
    workloads: Vec<String>,
    only: Vec<String>,
    /// Wall-time budget of the warm-up replay; an allocator that cannot
    /// finish the stream in it runs a prefix in all later passes.
    cap_budget: Duration,
    /// With N > 0: only measure region/peak-live, over N seeds per workload.
    region_seeds: u64,
}

const USAGE: &str = "\
usage: xalloc-bench [--quick] [--workload NAME]... [--only ALLOC]... [--reps N]

  --quick          small op counts (CI smoke run, well under 20 s)
  --workload NAME  run only this workload (repeatable or comma-separated):
                   random-1k, random-100k, large, realloc
  --only ALLOC     run only allocators whose name contains ALLOC (repeatable
                   or comma-separated): xalloc, xalloc-bins, talc, rlsf, dlmalloc, buddy,
                   linked_list, glibc (xalloc-bins: xalloc with its size
                   bins on, speed for memory)
  --reps N         throughput repetitions, median reported (default 5, quick 3)
  --region-seeds N measure only region/peak-live, on N streams of other seeds
                   per workload (the usual one first), and report mean, min, max
  --compact-above P  xalloc's Tlsf::set_compact_above(P), 0-100: it keeps blocks at
                   low addresses while more than P % of the heap is used (0: always,
                   the most compact; 100: never, the fastest); default the core's
  --size-bins P    the share xalloc-bins gives Tlsf::set_size_bins(P), 1-100:
                   its size bins hold freed blocks of 1 KiB and more, up to P % of
                   the heap (default 25)
";

/// `v` as a positive integer, or an error naming `flag`.
fn positive(v: String, flag: &str) -> Result<u64, String> {
    v.parse()
        .ok()
        .filter(|&n| n > 0)
        .ok_or(format!("{flag} needs a positive integer, not {v:?}"))
}

fn parse_args() -> Result<Config, String> {
    let mut cfg = Config {
        quick: false,
        reps: 0,
        workloads: Vec::new(),
        only: Vec::new(),
        cap_budget: Duration::ZERO,
        region_seeds: 0,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or(format!("{name} needs a value"))
        };
        match flag.as_str() {
            "--quick" => cfg.quick = true,
            "--workload" | "-w" => {
                for w in value("--workload")?.split(',').filter(|w| !w.is_empty()) {
                    if !WORKLOADS.contains(&w) {
                        return Err(format!("unknown workload {w:?} (have {WORKLOADS:?})"));
                    }
                    cfg.workloads.push(w.to_string());
                }
            }
            "--only" => cfg.only.extend(
                value("--only")?
                    .split(',')
                    .filter(|w| !w.is_empty())
                    .map(str::to_lowercase),
            ),
            "--reps" => cfg.reps = positive(value("--reps")?, "--reps")? as usize,
            "--region-seeds" => {
                cfg.region_seeds = positive(value("--region-seeds")?, "--region-seeds")?
            }
            "--compact-above" => {
                let v = value("--compact-above")?;
                let p = v
                    .parse::<u8>()
                    .ok()
                    .filter(|&p| p <= 100)
                    .ok_or(format!("--compact-above needs 0 to 100, not {v:?}"))?;
                allocs::XALLOC_COMPACT_ABOVE.store(p, std::sync::atomic::Ordering::Relaxed);
            }
            "--size-bins" => {
                let v = value("--size-bins")?;
                let p = v
                    .parse::<u8>()
                    .ok()
                    .filter(|&p| (1..=100).contains(&p))
                    .ok_or(format!("--size-bins needs 1 to 100, not {v:?}"))?;
                allocs::XALLOC_BINS.store(p, std::sync::atomic::Ordering::Relaxed);
            }
            "--help" | "-h" => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            _ => return Err(format!("unknown argument {arg:?}")),
        }
    }
    if cfg.reps == 0 {
        cfg.reps = if cfg.quick { 3 } else { 5 };
    }
    cfg.cap_budget = Duration::from_millis(if cfg.quick { 300 } else { 2500 });
    Ok(cfg)
}

fn build_workload(name: &str, quick: bool) -> Workload {
    build_workload_seeded(name, quick, 0)
}

/// The workload `name` generated with its usual seed moved by `variant` (0: the usual stream).
fn build_workload_seeded(name: &str, quick: bool, variant: u64) -> Workload {
    let q = |full: usize, small: usize| if quick { small } else { full };
    let seed = |base: u64| base + 1000 * variant;
    let mut wl = match name {
        "random-1k" => workload::random_mix(
            name_of(name),
            seed(1),
            1_000,
            q(1_000_000, 50_000),
            16,
            4096,
        ),
        "random-100k" => workload::random_mix(
            name_of(name),
            seed(2),
            100_000,
            q(1_000_000, 120_000),
            16,
            4096,
        ),
        "large" => workload::random_mix(
            name_of(name),
            seed(3),
            100,
            q(200_000, 10_000),
            4096,
            1 << 20,
        ),
        "realloc" => workload::realloc_walk(
            name_of(name),
            seed(4),
            1_000,
            q(1_000_000, 50_000),
            16,
            64 << 10,
        ),
        _ => unreachable!("validated in parse_args"),
    };
    wl.region = if name == "random-100k" {
        BIG_REGION
    } else {
        REGION
    };
    wl
}

fn name_of(name: &str) -> &'static str {
    WORKLOADS
        .iter()
        .find(|w| **w == name)
        .expect("known workload")
}

/// One table row.
struct Row {
    name: &'static str,
    ns_per_op: Option<f64>,
    region_ratio: Option<f64>,
    p999_ns: Option<f64>,
    max_ns: Option<f64>,
    /// Footnotes (also used for failures).
    notes: Vec<String>,
}

impl Row {
    fn new(name: &'static str) -> Self {
        Row {
            name,
            ns_per_op: None,
            region_ratio: None,
            p999_ns: None,
            max_ns: None,
            notes: Vec::new(),
        }
    }
    fn fail(mut self, why: String) -> Self {
        self.notes.push(format!("FAILED: {why}"));
        self
    }
}

struct Ctx {
    arena: Arena,
    lat: Vec<u64>,
    cfg: Config,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// One allocator's measurements on one workload, in phases so that the
/// throughput repetitions of all allocators can be interleaved (round-robin):
/// on a noisy machine a slow spell then hits every allocator alike.
trait Contender {
    fn name(&self) -> &'static str;
    /// Warm-up replay of the full stream, which also decides the op cap.
    fn prepare(&mut self, ctx: &mut Ctx, wl: &Workload) -> Result<(), String>;
    /// Throughput repetition `r`, if this contender runs that many.
    fn rep(&mut self, ctx: &mut Ctx, wl: &Workload, r: usize) -> Result<(), String>;
    /// Latency pass and region search; consumes the collected samples.
    fn finish(&mut self, ctx: &mut Ctx, wl: &Workload) -> Result<Row, String>;
    /// Region search alone, after `prepare`: `None` for an allocator that is not region-based
    /// or was time-capped (a prefix would not be the same stream).
    fn region_only(&mut self, ctx: &mut Ctx, wl: &Workload) -> Option<f64>;
}

struct Contest<A: BenchAlloc> {
    a: Box<A>,
    /// Ops replayed by every pass after the warm-up (a prefix if capped).
    n: usize,
    reps: usize,
    per_op: Vec<f64>,
    notes: Vec<String>,
}

fn contest<A: BenchAlloc + 'static>() -> Box<dyn Contender> {
    Box::new(Contest::<A> {
        a: A::create(),
        n: 0,
        reps: 0,
        per_op: Vec::new(),
        notes: Vec::new(),
    })
}

impl<A: BenchAlloc> Contender for Contest<A> {
    fn name(&self) -> &'static str {
        A::NAME
    }

    fn prepare(&mut self, ctx: &mut Ctx, wl: &Workload) -> Result<(), String> {
        let total = wl.ops.len();
        let deadline = Mode::Deadline(Instant::now() + ctx.cfg.cap_budget);
        let (out, _) = replay(
            &mut *self.a,
            &mut ctx.arena,
            wl.region,
            &wl.ops,
            wl.slots,
            deadline,
        );
        // A stream the allocator cannot replay within the budget is cut to a
        // quarter of the ops it reached, so that each of the ~15 later passes
        // takes a fraction of the budget.
        let mut reached = total;
        self.n = match out {
            Outcome::Done => total,
            Outcome::Deadline(n) => {
                reached = n;
                (n / CAP_FRACTION).max(1)
            }
            Outcome::Oom(i) => {
                return Err(format!(
                    "allocation failed at op #{i} of {total} on the full {} MiB region",
                    wl.region >> 20
                ))
            }
        };
        self.reps = ctx.cfg.reps;
        if self.n < total {
            self.reps = self.reps.min(3);
            self.notes.push(format!(
                "time-capped: the warm-up replay reached only op {reached} of {total} in {:.1} s, \
                 so every measured pass ({} throughput reps, latency, region search) ran only \
                 the first {} ops (1/{CAP_FRACTION} of that)",
                ctx.cfg.cap_budget.as_secs_f64(),
                self.reps,
                self.n
            ));
        }
        Ok(())
    }

    fn rep(&mut self, ctx: &mut Ctx, wl: &Workload, r: usize) -> Result<(), String> {
        if r >= self.reps {
            return Ok(());
        }
        let ops = &wl.ops[..self.n];
        let (out, el) = replay(
            &mut *self.a,
            &mut ctx.arena,
            wl.region,
            ops,
            wl.slots,
            Mode::Plain,
        );
        if let Outcome::Oom(i) = out {
            return Err(format!("allocation failed at op #{i} in a repetition"));
        }
        self.per_op.push(el.as_nanos() as f64 / self.n as f64);
        Ok(())
    }

    fn region_only(&mut self, ctx: &mut Ctx, wl: &Workload) -> Option<f64> {
        self.region_ratio_full(ctx, wl)
    }

    fn finish(&mut self, ctx: &mut Ctx, wl: &Workload) -> Result<Row, String> {
        let n = self.n;
        let ops = &wl.ops[..n];
        let mut row = Row::new(A::NAME);
        row.notes = std::mem::take(&mut self.notes);
        row.ns_per_op = Some(median(std::mem::take(&mut self.per_op)));

        // Per-op latency (TSC read around each op). The replays are identical, so an op's
        // own cost is at most the least of its timings; taking the minimum over passes removes
        // interrupts and preemption by the hypervisor, which otherwise set the maximum.
        let mut best = vec![u64::MAX; n];
        for _ in 0..LATENCY_PASSES {
            let lat = &mut ctx.lat[..n];
            let (out, _) = replay(
                &mut *self.a,
                &mut ctx.arena,
                wl.region,
                ops,
                wl.slots,
                Mode::Latency(lat),
            );
            if let Outcome::Oom(i) = out {
                return Err(format!("allocation failed at op #{i} in the latency pass"));
            }
            for (b, &l) in best.iter_mut().zip(lat.iter()) {
                *b = (*b).min(l);
            }
        }
        let lat = &mut best[..];
        let max = lat.iter().copied().max().unwrap_or(0);
        let k = ((n as f64 * 0.999).ceil() as usize).clamp(1, n) - 1;
        let p999 = *lat.select_nth_unstable(k).1;
        row.p999_ns = Some(timer::to_ns(p999));
        row.max_ns = Some(timer::to_ns(max));

        // Memory efficiency.
        let peak = peak_live(ops, wl.slots);
        if A::REGION_BASED {
            row.region_ratio = Some(region_search(&mut *self.a, ctx, wl, ops, peak));
        } else {
            // A fresh process, so the heap left behind by earlier passes
            // (e.g. chunks parked in tcache pinning the top) cannot inflate
            // the number.
            let fp = glibc_footprint_in_child(wl.name, ctx.cfg.quick, n)?;
            row.region_ratio = Some(fp as f64 / peak as f64);
            row.notes.push(
                "not region-based: the region/peak-live column is glibc's footprint instead, \
                 the peak of mallinfo2 `arena + hblkhd` divided by peak live bytes; see the \
                 notes at the end"
                    .to_string(),
            );
        }
        Ok(row)
    }
}

/// Latency passes per allocator and workload; each op's latency is its minimum over them.
const LATENCY_PASSES: usize = 3;

impl<A: BenchAlloc> Contest<A> {
    fn region_ratio_full(&mut self, ctx: &mut Ctx, wl: &Workload) -> Option<f64> {
        if !A::REGION_BASED || self.n < wl.ops.len() {
            return None;
        }
        let peak = peak_live(&wl.ops, wl.slots);
        Some(region_search(&mut *self.a, ctx, wl, &wl.ops, peak))
    }
}

/// The smallest region (to [`SEARCH_PRECISION`]) on which `ops` run through `a` without an
/// allocation failure, divided by `peak`: a geometric bisection between `peak` (assumed to
/// fail: no allocator here is overhead-free) and the workload's full region (known to pass).
fn region_search<A: BenchAlloc>(
    a: &mut A,
    ctx: &mut Ctx,
    wl: &Workload,
    ops: &[workload::Op],
    peak: usize,
) -> f64 {
    let (mut lo, mut hi) = (peak, wl.region);
    while hi as f64 > lo as f64 * (1.0 + SEARCH_PRECISION) {
        let mid = ((lo as f64 * hi as f64).sqrt() as usize).div_ceil(16) * 16;
        if mid <= lo || mid >= hi {
            break;
        }
        let (out, _) = replay(a, &mut ctx.arena, mid, ops, wl.slots, Mode::Plain);
        match out {
            Outcome::Done => hi = mid,
            _ => lo = mid,
        }
    }
    hi as f64 / peak as f64
}

const CHILD_FLAG: &str = "--glibc-footprint-child";

/// Runs the first `n` ops of workload `name` through glibc in a fresh copy
/// of this program and returns the peak footprint in bytes.
fn glibc_footprint_in_child(name: &str, quick: bool, n: usize) -> Result<usize, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args([CHILD_FLAG, name, &n.to_string()]);
    if quick {
        cmd.arg("--quick");
    }
    let out = cmd.output().map_err(|e| format!("footprint child: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "footprint child failed ({}): {}{}",
            out.status,
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    stdout
        .trim()
        .parse()
        .map_err(|_| format!("footprint child printed {stdout:?}"))
}

/// Child side of [`glibc_footprint_in_child`]: `CHILD_FLAG NAME N [--quick]`.
fn glibc_footprint_child(args: &[String]) -> ! {
    let (Some(name), Some(Ok(n))) = (args.first(), args.get(1).map(|n| n.parse::<usize>())) else {
        eprintln!("usage: {CHILD_FLAG} WORKLOAD N [--quick]");
        std::process::exit(2);
    };
    if !WORKLOADS.contains(&name.as_str()) {
        eprintln!("unknown workload {name:?}");
        std::process::exit(2);
    }
    let wl = build_workload(name, args.iter().any(|a| a == "--quick"));
    let ops = &wl.ops[..n.min(wl.ops.len())];
    let mut arena = Arena::new(4096); // glibc ignores the region
    let mut a = Glibc::create();
    let mut fp = FootprintProbe::new();
    let (out, _) = replay(
        &mut *a,
        &mut arena,
        4096,
        ops,
        wl.slots,
        Mode::Footprint(&mut fp),
    );
    if let Outcome::Oom(i) = out {
        println!("allocation failed at op #{i}");
        std::process::exit(1);
    }
    println!("{}", fp.peak);
    std::process::exit(0);
}

type MakeFn = fn() -> Box<dyn Contender>;

/// `--region-seeds N`: region/peak-live of every region-based allocator on N streams per
/// workload (the usual seed first), as mean, min and max. One seed's ratio moves by about 1 %
/// with small changes of policy, so comparisons within that much need several seeds. Returns
/// false if an allocator failed a stream (out of memory on the full region, or a correctness
/// check).
fn region_seeds_report(ctx: &mut Ctx, names: &[&str], allocators: &[(&str, MakeFn)]) -> bool {
    let seeds = ctx.cfg.region_seeds;
    let mut failed = false;
    println!(
        "Region/peak-live over {seeds} streams per workload (seed variants 0..{seeds}); \
         allocators that are not region-based, or too slow to finish a stream in the warm-up \
         budget, are left out.\n"
    );
    for name in names {
        let t = Instant::now();
        let mut ratios: Vec<(&str, Vec<f64>)> =
            allocators.iter().map(|(n, _)| (*n, Vec::new())).collect();
        for v in 0..seeds {
            let wl = build_workload_seeded(name, ctx.cfg.quick, v);
            for ((_, make), (_, rs)) in allocators.iter().zip(ratios.iter_mut()) {
                let mut c = make();
                match guarded(|| c.prepare(ctx, &wl)) {
                    Ok(()) => rs.extend(c.region_only(ctx, &wl)),
                    Err(e) => {
                        eprintln!("[{name}, seed variant {v}] {}: FAILED: {e}", c.name());
                        failed = true;
                    }
                }
            }
        }
        println!("## {name}\n");
        println!("| allocator | mean | min | max | streams |");
        println!("|---|---:|---:|---:|---:|");
        for (n, rs) in ratios.iter().filter(|(_, rs)| !rs.is_empty()) {
            let mean = rs.iter().sum::<f64>() / rs.len() as f64;
            let min = rs.iter().copied().fold(f64::INFINITY, f64::min);
            let max = rs.iter().copied().fold(0.0, f64::max);
            println!("| {n} | {mean:.3} | {min:.3} | {max:.3} | {} |", rs.len());
        }
        println!();
        eprintln!("[{name}] done in {:.1} s", t.elapsed().as_secs_f64());
    }
    !failed
}

/// In report order: xalloc first.
const ALLOCATORS: &[(&str, MakeFn)] = &[
    (<Xalloc>::NAME, contest::<Xalloc>),
    (XallocBins::NAME, contest::<XallocBins>),
    (Talc::NAME, contest::<Talc>),
    (Rlsf::NAME, contest::<Rlsf>),
    (Dl::NAME, contest::<Dl>),
    (Buddy::NAME, contest::<Buddy>),
    (LinkedList::NAME, contest::<LinkedList>),
    (Glibc::NAME, contest::<Glibc>),
];

/// Runs `f`, turning both `Err` and panics into an error message.
fn guarded<T>(f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    match panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => Err(format!("panicked: {}", panic_message(&*p))),
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".to_string())
}

const SUPERSCRIPTS: &[&str] = &["¹", "²", "³", "⁴", "⁵", "⁶", "⁷", "⁸", "⁹"];

fn print_table(wl: &Workload, rows: &[Row]) {
    let peak = peak_live(&wl.ops, wl.slots);
    println!("## {}\n", wl.name);
    println!(
        "{}; peak live {} bytes ({:.2} MiB); region {} MiB.\n",
        wl.desc,
        peak,
        peak as f64 / 1048576.0,
        wl.region >> 20
    );
    println!("| allocator | median ns/op | vs xalloc | region/peak-live | p99.9 ns | max ns |");
    println!("|---|---:|---:|---:|---:|---:|");
    let base = rows
        .iter()
        .find(|r| r.name == <Xalloc>::NAME)
        .and_then(|r| r.ns_per_op);
    let mut notes = Vec::new();
    for r in rows {
        let mut marks = String::new();
        for n in &r.notes {
            notes.push(n.clone());
            marks.push_str(SUPERSCRIPTS.get(notes.len() - 1).copied().unwrap_or("*"));
        }
        let f =
            |v: Option<f64>, prec: usize| v.map_or("—".to_string(), |v| format!("{v:.prec$}"));
        let vs = match (r.ns_per_op, base) {
            (Some(v), Some(b)) if b > 0.0 => format!("{:.2}×", v / b),
            _ => "—".to_string(),
        };
        println!(
            "| {}{} | {} | {} | {} | {} | {} |",
            r.name,
            marks,
            f(r.ns_per_op, 1),
            vs,
            f(r.region_ratio, 3),
            f(r.p999_ns, 0),
            f(r.max_ns, 0)
        );
    }
    if !notes.is_empty() {
        println!();
        for (i, n) in notes.iter().enumerate() {
            println!("{} {n}  ", SUPERSCRIPTS.get(i).copied().unwrap_or("*"));
        }
    }
    println!();
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".to_string())
}

fn cpu_count() -> usize {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|s| s.lines().filter(|l| l.starts_with("processor")).count())
        .unwrap_or(0)
}

#[cfg(target_os = "linux")]
fn affinity() -> String {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it.
    let cpus = unsafe {
        let mut set: libc::cpu_set_t = core::mem::zeroed();
        if libc::sched_getaffinity(0, core::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return "unknown".to_string();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect::<Vec<_>>()
    };
    cpus.iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(not(target_os = "linux"))]
fn affinity() -> String {
    "unknown".to_string()
}

/// UTC date-time from the system clock (civil-from-days, no dependencies).
fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60
    )
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(CHILD_FLAG) {
        glibc_footprint_child(&args[2..]);
    }
    let cfg = match parse_args() {
        Ok(c) => c,
        Err(e) => {
            eprint!("error: {e}\n\n{USAGE}");
            std::process::exit(2);
        }
    };
    let started = Instant::now();
    let names: Vec<&str> = if cfg.workloads.is_empty() {
        WORKLOADS.to_vec()
    } else {
        WORKLOADS
            .iter()
            .copied()
            .filter(|w| cfg.workloads.iter().any(|c| c == w))
            .collect()
    };
    let allocators: Vec<(&str, MakeFn)> = ALLOCATORS
        .iter()
        .copied()
        .filter(|(n, _)| cfg.only.is_empty() || cfg.only.iter().any(|o| n.contains(o.as_str())))
        .collect();
    if allocators.is_empty() {
        eprintln!("error: --only matched no allocator");
        std::process::exit(2);
    }

    let ticks_per_ns = timer::calibrate();
    let overhead_ns = timer::to_ns(timer::overhead());
    println!(
        "# xalloc-bench{}\n",
        if cfg.quick { " (--quick)" } else { "" }
    );
    println!(
        "Machine: {} ({} logical CPUs), running on CPU(s) {} · Date: {} · Command: `{}`\n",
        cpu_model(),
        cpu_count(),
        affinity(),
        utc_now(),
        std::env::args().collect::<Vec<_>>().join(" ")
    );
    println!(
        "- Region: {} MiB (random-100k: {} MiB, because its peak live bytes exceed 64 MiB), \
         4096-aligned and pre-faulted, the same for every region-based allocator, which is \
         re-initialised on it before every pass.\n\
         - Every allocator first replays the stream once untimed (warm-up). Every block gets its \
         first and last byte written; both are checked on free and realloc.\n\
         - median ns/op: median of {} replays timed as a whole (no per-op timing); the \
         repetitions of all allocators are interleaved round-robin. vs xalloc = ns/op ÷ \
         xalloc's ns/op (< 1 means faster than xalloc).\n\
         - region/peak-live: smallest region (geometric bisection to {:.1} %) on which the whole \
         stream runs without an allocation failure, divided by the stream's peak sum of \
         requested sizes.\n\
         - p99.9 / max ns: {} separate passes reading the TSC around every op ({:.3} ticks/ns, \
         calibrated against Instant); each op's latency is its minimum over the passes, which \
         replay the same stream from the same state, so interrupts and preemption drop out; \
         the ≈ {:.0} ns timer overhead is included.\n",
        REGION >> 20,
        BIG_REGION >> 20,
        cfg.reps,
        SEARCH_PRECISION * 100.0,
        LATENCY_PASSES,
        ticks_per_ns,
        overhead_ns,
    );

    let (mut max_ops, mut max_region) = (0, 0);
    for n in &names {
        let wl = build_workload(n, cfg.quick);
        max_ops = max_ops.max(wl.ops.len());
        max_region = max_region.max(wl.region);
    }
    let mut ctx = Ctx {
        arena: Arena::new(max_region),
        lat: vec![0u64; max_ops],
        cfg,
    };
    if ctx.cfg.region_seeds > 0 {
        let ok = region_seeds_report(&mut ctx, &names, &allocators);
        println!("Total wall time: {:.1} s", started.elapsed().as_secs_f64());
        std::process::exit(if ok { 0 } else { 1 });
    }
    let mut any_failed = false;
    for name in names {
        let t = Instant::now();
        let wl = build_workload(name, ctx.cfg.quick);
        let mut cs: Vec<_> = allocators
            .iter()
            .map(|(_, make)| (make(), Ok::<(), String>(()), Duration::ZERO))
            .collect();
        for (c, st, el) in &mut cs {
            let t_a = Instant::now();
            *st = guarded(|| c.prepare(&mut ctx, &wl));
            *el += t_a.elapsed();
        }
        for r in 0..ctx.cfg.reps {
            for (c, st, el) in cs.iter_mut().filter(|(_, st, _)| st.is_ok()) {
                let t_a = Instant::now();
                *st = guarded(|| c.rep(&mut ctx, &wl, r));
                *el += t_a.elapsed();
            }
        }
        let mut rows = Vec::new();
        for (mut c, st, mut el) in cs {
            let t_a = Instant::now();
            let row = st.and_then(|()| guarded(|| c.finish(&mut ctx, &wl)));
            el += t_a.elapsed();
            eprintln!("[{name}] {}: {:.1} s", c.name(), el.as_secs_f64());
            rows.push(row.unwrap_or_else(|e| {
                any_failed = true;
                Row::new(c.name()).fail(e)
            }));
        }
        print_table(&wl, &rows);
        eprintln!("[{name}] done in {:.1} s", t.elapsed().as_secs_f64());
    }
    if allocators.iter().any(|(n, _)| *n == Glibc::NAME) {
        println!(
            "glibc malloc: alignment ≤ 16 uses malloc/realloc, 64 uses posix_memalign (realloc \
             of those = posix_memalign + copy + free). It runs with M_TRIM_THRESHOLD = 2 GiB and \
             M_MMAP_THRESHOLD = 32 MiB, so that, like the region allocators, it works on \
             already-faulted memory after the warm-up and never mmaps per block. Its footprint is \
             measured in a fresh child process replaying the same stream (so blocks parked in \
             tcache by earlier passes cannot pin the heap), calling mallinfo2 whenever the \
             program break moved and every 4096th allocating op; the harness itself allocates through \
             dlmalloc-over-mmap, so glibc's heap holds only the stream's blocks.\n"
        );
    }
    println!("Total wall time: {:.1} s", started.elapsed().as_secs_f64());
    if any_failed {
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every allocator replays a small mixed stream without failing a check.
    #[test]
    fn all_allocators_replay_small_streams() {
        let streams = [
            workload::random_mix("random-1k", 1, 200, 5_000, 16, 4096),
            workload::random_mix("large", 3, 20, 1_000, 4096, 1 << 20),
            workload::realloc_walk("realloc", 4, 100, 3_000, 16, 64 << 10),
        ];
        let mut arena = Arena::new(REGION);
        fn run<A: BenchAlloc>(arena: &mut Arena, wl: &Workload) {
            let mut a = A::create();
            let (out, _) = replay(&mut *a, arena, REGION, &wl.ops, wl.slots, Mode::Plain);
            assert!(
                matches!(out, Outcome::Done),
                "{} failed on {}",
                A::NAME,
                wl.name
            );
        }
        for wl in &streams {
            run::<Xalloc>(&mut arena, wl);
            run::<XallocBins>(&mut arena, wl);
            run::<Talc>(&mut arena, wl);
            run::<Rlsf>(&mut arena, wl);
            run::<Dl>(&mut arena, wl);
            run::<Buddy>(&mut arena, wl);
            run::<LinkedList>(&mut arena, wl);
            run::<Glibc>(&mut arena, wl);
        }
    }

    #[test]
    fn utc_date_is_plausible() {
        let d = utc_now();
        assert!(d.ends_with(" UTC") && d.len() == 20, "{d}");
    }
}
