//! `churn`: what one large allocate / touch / free cycle costs through `XallocGlobal`, next to
//! glibc, mimalloc and jemalloc, and next to the physical floor of touching memory that is
//! already mapped.
//!
//! Run it through `scripts/bench-churn.sh [--quick]`, which builds release, starts a daemon of
//! its own pinned on CPU 0 (`--arena-size 256M`), exports `XALLOC_NAME` for it, runs `churn`
//! and always stops the daemon. By hand: `XALLOC_NAME=INSTANCE target/release/churn [options]`.
//!
//! # What is measured
//!
//! For each block size (256 KiB, 1 MiB, 16 MiB, 64 MiB) and each subject, one iteration is
//!
//! 1. `p = alloc(Layout::from_size_align(size, 8))`,
//! 2. one volatile byte write at every 4 KiB of the block (`p`, `p + 4096`, ...),
//! 3. `dealloc(p, layout)`,
//!
//! timed with the monotonic clock ([`Instant`]), as a whole and phase by phase (four clock
//! reads per iteration for every subject, the floor included). The subjects are called directly
//! through their [`GlobalAlloc`] methods, all in this one process: [`System`] (glibc malloc),
//! `mimalloc::MiMalloc`, `tikv_jemallocator::Jemalloc` (its prefixed symbols, so glibc's malloc
//! stays glibc's) and a `static` [`XallocGlobal`] with the default 256 KiB threshold, so every
//! size here goes to the daemon named by `XALLOC_NAME`. The **floor** row runs step 2 alone on
//! one buffer per size that was mapped (`mmap`, 4 KiB pages like the arena's) and faulted in
//! beforehand: what touching the pages costs when no allocator and no page fault is involved.
//!
//! Per size, the subjects take turns round-robin within each repetition (the starting subject
//! rotates too), so drift in the machine's state affects all of them alike; the first few
//! repetitions are a warm-up and not counted (the first, cold iteration of each subject is shown
//! on its own). Iterations per size by default: 20000, 10000, 1500, 500 after 10% warm-up
//! (about 50 s in all); `--quick` (the CI smoke run, about 5 s): 2000, 1000, 100, 40. The
//! daemon's sleeps (voluntary context switches, from `/proc`) are counted per size: a request
//! that finds the daemon asleep pays a wake-up. The harness's own heap is dlmalloc over `mmap`,
//! so glibc's heap serves the glibc subject only. `--only` measures a subset, for diagnosis.
//!
//! The process pins itself on CPU 1 (`--cpu`) with `sched_setaffinity`; the daemon must be
//! pinned on another CPU (`--daemon-cpu`, default 0; checked).
//!
//! # Output and exit status
//!
//! Markdown: the median (and p90) µs per iteration of each subject at each size; the ratios
//! glibc ÷ x and mimalloc ÷ x (above 1: x is faster) and x ÷ floor, with the median of each
//! phase and the cold first iteration; the daemon's sleeps per XallocGlobal iteration; then the
//! targets:
//! XallocGlobal at least 10× faster than glibc at 64 MiB, and, for information, no slower than
//! mimalloc at every size and within 1.2× of the floor. Missed targets do not fail the run.
//! Errors exit 1: no daemon, a null allocation, and above all any XallocGlobal allocation that
//! was not served from the arena (`counters().fallbacks > 0`, or a block outside the arena),
//! since its numbers would then be glibc's.

use std::alloc::{GlobalAlloc, Layout, System};
use std::fmt::Write as _;
use std::process::ExitCode;
use std::ptr::NonNull;
use std::time::{Duration, Instant};

use mimalloc::MiMalloc;
use tikv_jemallocator::Jemalloc;
use xalloc_global::client::Connection;
use xalloc_global::XallocGlobal;

#[path = "../shared.rs"]
mod shared;
use shared::*;

/// The harness allocates through dlmalloc-over-mmap, so that glibc's heap holds the glibc
/// subject's blocks only.
#[global_allocator]
static HARNESS_ALLOC: dlmalloc::GlobalDlmalloc = dlmalloc::GlobalDlmalloc;

/// The subject under test: the default threshold (256 KiB), the instance from `XALLOC_NAME`.
static XALLOC: XallocGlobal = XallocGlobal::new();

/// Distance between two touched bytes.
const PAGE: usize = 4096;
/// Alignment of every allocation.
const ALIGN: usize = 8;
/// The block sizes, with their measured iterations (full run, `--quick`).
/// The full run takes about 50 s on a 2-vCPU VM, nearly all of it glibc's and jemalloc's page
/// faults at 16 and 64 MiB (about 7 and 30 ms per iteration each); `--quick` about 5 s.
const SIZES: [(usize, usize, usize); 4] = [
    (256 << 10, 20_000, 2000),
    (1 << 20, 10_000, 1000),
    (16 << 20, 1500, 100),
    (64 << 20, 500, 40),
];
/// Target: XallocGlobal at least this many times faster than glibc at the largest size.
const TARGET_VS_GLIBC: f64 = 10.0;
/// Informational target: XallocGlobal within this factor of the floor.
const TARGET_VS_FLOOR: f64 = 1.2;

const USAGE: &str = "\
usage: XALLOC_NAME=INSTANCE churn [options]

  --cpu CPU          the CPU this process runs on (default 1)
  --daemon-cpu CPU   the one CPU the daemon is pinned to (default 0; checked)
  --daemon-pid PID   refuse to run unless the instance's daemon has this pid
  --iters N          measured iterations at every size (default per size: 20000, 10000,
                     1500, 500; quick: 2000, 1000, 100, 40)
  --warmup N         warm-up iterations at every size (default 10% of the iterations, >= 3)
  --only LIST        measure only these subjects (comma-separated: glibc, mimalloc,
                     jemalloc, xalloc, floor); for diagnosis, the others show as -
  --quick            small counts (CI smoke run)

XALLOC_NAME names the xallocd instance (default xalloc, as XallocGlobal). Prints markdown
tables. Missed targets do not fail the run; errors, and any XallocGlobal allocation not served
from the arena, exit 1.
";

/// What `churn` was asked to do.
struct Config {
    cpu: usize,
    daemon_cpu: usize,
    daemon_pid: Option<u32>,
    iters: Option<usize>,
    warmup: Option<usize>,
    quick: bool,
    /// Which subjects are measured (`--only`; all by default).
    only: [bool; N_SUBJECTS],
}

impl Config {
    /// Measured and warm-up iterations for size row `(size, full, quick)`.
    fn counts(&self, &(_, full, quick): &(usize, usize, usize)) -> (usize, usize) {
        let iters = self.iters.unwrap_or(if self.quick { quick } else { full });
        let warmup = self.warmup.unwrap_or((iters / 10).max(3));
        (iters, warmup)
    }
}

fn parse(args: impl Iterator<Item = String>) -> Result<Config, String> {
    let mut args = args.peekable();
    let mut cfg = Config {
        cpu: 1,
        daemon_cpu: 0,
        daemon_pid: None,
        iters: None,
        warmup: None,
        quick: false,
        only: [true; N_SUBJECTS],
    };
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        let mut value = || inline.clone().or_else(|| args.next());
        match flag.as_str() {
            "--cpu" => cfg.cpu = number(value(), "--cpu")?,
            "--daemon-cpu" => cfg.daemon_cpu = number(value(), "--daemon-cpu")?,
            "--daemon-pid" => cfg.daemon_pid = Some(number(value(), "--daemon-pid")?),
            "--iters" => cfg.iters = Some(number(value(), "--iters")?),
            "--warmup" => cfg.warmup = Some(number(value(), "--warmup")?),
            "--quick" => cfg.quick = true,
            "--only" => cfg.only = parse_only(&value().ok_or("--only needs a value")?)?,
            "--help" | "-h" => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            _ => return Err(format!("unknown argument {arg:?}\n\n{USAGE}")),
        }
    }
    if cfg.iters == Some(0) {
        return Err("--iters must be positive".to_owned());
    }
    if cfg.cpu == cfg.daemon_cpu {
        return Err("--cpu must differ from --daemon-cpu".to_owned());
    }
    Ok(cfg)
}

/// `--only glibc,xalloc`: which subjects to measure.
fn parse_only(list: &str) -> Result<[bool; N_SUBJECTS], String> {
    let mut only = [false; N_SUBJECTS];
    for w in list.split(',').filter(|w| !w.is_empty()) {
        let w = if w.eq_ignore_ascii_case("xalloc") {
            "XallocGlobal"
        } else {
            w
        };
        let i = SUBJECTS
            .iter()
            .position(|(n, _)| n.eq_ignore_ascii_case(w))
            .ok_or(format!("--only: no subject {w:?}"))?;
        only[i] = true;
    }
    if !only.contains(&true) {
        return Err("--only needs at least one subject".to_owned());
    }
    Ok(only)
}

fn main() -> ExitCode {
    match parse(std::env::args().skip(1)).and_then(|cfg| run(&cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("churn: {e}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------------
// CPU placement (as in roundtrip.rs).

/// Voluntary context switches of process `pid`, summed over its threads: each is a sleep (on
/// the doorbell futex, for the daemon), after which the next request pays a wake-up.
fn voluntary_switches(pid: u32) -> Option<u64> {
    let mut sum = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let Ok(task) = task else { continue };
        let Ok(s) = std::fs::read_to_string(task.path().join("status")) else {
            continue; // The thread exited meanwhile.
        };
        sum += s
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse::<u64>().ok())?;
    }
    Some(sum)
}

// ---------------------------------------------------------------------------------------------
// The work.

/// Writes one byte at every [`PAGE`] bytes of `[p, p + size)`, each a volatile store so that
/// none is optimised away.
///
/// # Safety
/// `[p, p + size)` must be writable memory that nothing else uses meanwhile.
#[inline(always)]
unsafe fn touch(p: *mut u8, size: usize) {
    let mut off = 0;
    while off < size {
        // SAFETY: `off < size`, so the byte lies in the block (the caller's contract).
        unsafe { p.add(off).write_volatile(off as u8 | 1) };
        off += PAGE;
    }
}

/// A private anonymous mapping of `len` bytes in 4 KiB pages, every page faulted in: the
/// floor's buffer. It comes from no allocator under test, so none of them sees it.
struct Prefaulted {
    ptr: NonNull<u8>,
    len: usize,
}

impl Prefaulted {
    fn new(len: usize) -> Result<Self, String> {
        // SAFETY: a fresh anonymous mapping; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(format!(
                "mmap of {len} bytes for the floor: {}",
                std::io::Error::last_os_error()
            ));
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or("mmap returned null")?;
        // 4 KiB pages also where transparent huge pages are on for everything, as in the arena
        // (/dev/shm): the floor is that of 4 KiB pages. Advice only; a failure changes nothing.
        // SAFETY: advice on the mapping just made; its contents are not changed.
        unsafe { libc::madvise(p, len, libc::MADV_NOHUGEPAGE) };
        // SAFETY: the mapping is `len` writable bytes, ours alone.
        unsafe { touch(ptr.as_ptr(), len) };
        Ok(Self { ptr, len })
    }
}

impl Drop for Prefaulted {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, of this length; nothing refers to it any more.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// A subject: an allocator under test, or the floor.
#[derive(Clone, Copy)]
enum Subject {
    Alloc(&'static (dyn GlobalAlloc + Sync)),
    Floor,
}

/// How many subjects there are.
const N_SUBJECTS: usize = 5;
/// Column order of the subjects (the round-robin order is rotated from this each repetition).
static SUBJECTS: [(&str, Subject); N_SUBJECTS] = [
    ("glibc", Subject::Alloc(&System)),
    ("mimalloc", Subject::Alloc(&MiMalloc)),
    ("jemalloc", Subject::Alloc(&Jemalloc)),
    ("XallocGlobal", Subject::Alloc(&XALLOC)),
    ("floor", Subject::Floor),
];
const GLIBC: usize = 0;
const MIMALLOC: usize = 1;
const XALLOC_IX: usize = 3;
const FLOOR: usize = 4;

/// Per-run bookkeeping of what XallocGlobal handed out.
#[derive(Default)]
struct XallocCheck {
    /// Allocations asked of it.
    asked: u64,
    /// Of those, blocks that did not lie in a daemon's arena.
    outside: u64,
}

/// Nanoseconds of one iteration: the whole, and its three phases.
#[derive(Clone, Copy, Default)]
struct Times {
    total: u64,
    alloc: u64,
    touch: u64,
    free: u64,
    /// Page faults this thread took during the iteration (minor and major).
    faults: u64,
    /// Times this thread went to sleep during the iteration (voluntary context switches).
    sleeps: u64,
}

/// Page faults (minor + major) and voluntary context switches of this thread so far
/// (`getrusage(RUSAGE_THREAD)`).
fn thread_usage() -> (u64, u64) {
    // SAFETY: all zeroes is a valid `rusage`.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable `rusage`.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) } != 0 {
        return (0, 0);
    }
    let n = |v: libc::c_long| u64::try_from(v).unwrap_or(0);
    (n(ru.ru_minflt) + n(ru.ru_majflt), n(ru.ru_nvcsw))
}

/// One timed iteration of `subject` at `layout`. Every subject, the floor too, reads the clock
/// four times (before and after each phase), so the clock's cost is the same in every total.
fn iteration(
    subject: Subject,
    layout: Layout,
    floor: &Prefaulted,
    check: &mut XallocCheck,
    is_xalloc: bool,
) -> Result<Times, String> {
    let size = layout.size();
    // Read outside the timed span: a system call.
    let usage_before = thread_usage();
    let (t0, t1, t2, t3);
    match subject {
        Subject::Floor => {
            t0 = Instant::now();
            t1 = Instant::now();
            // SAFETY: the floor buffer is `floor.len >= size` bytes, ours alone.
            unsafe { touch(floor.ptr.as_ptr(), size) };
            t2 = Instant::now();
            t3 = Instant::now();
        }
        Subject::Alloc(a) => {
            t0 = Instant::now();
            // SAFETY: `layout` has a non-zero size.
            let p = unsafe { a.alloc(layout) };
            t1 = Instant::now();
            if p.is_null() {
                return Err(format!("allocation of {size} bytes failed"));
            }
            // SAFETY: `p` is a fresh block of `size` bytes, ours until the dealloc below.
            unsafe { touch(p, size) };
            t2 = Instant::now();
            // SAFETY: `p` came from `a.alloc(layout)` and is freed once.
            unsafe { a.dealloc(p, layout) };
            t3 = Instant::now();
            if is_xalloc {
                check.asked += 1;
                // Only the address is compared with the arena's range; nothing is dereferenced.
                if !xalloc_global::is_shared(p) {
                    check.outside += 1;
                }
            }
        }
    }
    let usage = thread_usage();
    let ns = |a: Instant, b: Instant| u64::try_from((b - a).as_nanos()).unwrap_or(u64::MAX);
    Ok(Times {
        total: ns(t0, t3),
        alloc: ns(t0, t1),
        touch: ns(t1, t2),
        free: ns(t2, t3),
        faults: usage.0.saturating_sub(usage_before.0),
        sleeps: usage.1.saturating_sub(usage_before.1),
    })
}

// ---------------------------------------------------------------------------------------------
// Statistics.

/// One subject at one size, in µs.
#[derive(Clone, Copy)]
struct Summary {
    /// Whole iterations.
    median: f64,
    p90: f64,
    /// Medians of the phases (they need not add up to `median`).
    alloc: f64,
    touch: f64,
    free: f64,
    /// Mean page faults per iteration.
    faults: f64,
    /// Mean sleeps of this thread per iteration.
    sleeps: f64,
    /// The very first (cold) iteration, a warm-up one.
    first: f64,
}

/// The `p` quantile (nearest rank) of nanoseconds `ns`, sorted here, in µs.
fn quantile(ns: &mut [u64], p: f64) -> f64 {
    ns.sort_unstable();
    let n = ns.len().max(1);
    let rank = ((p * n as f64).ceil() as usize).clamp(1, n);
    ns.get(rank - 1).copied().unwrap_or(0) as f64 / 1e3
}

/// The mean of `f` over `times`.
fn mean(times: &[Times], f: fn(&Times) -> u64) -> f64 {
    times.iter().map(f).sum::<u64>() as f64 / times.len().max(1) as f64
}

/// Summarizes one subject's iterations.
fn summarize(times: &[Times], first: Times) -> Summary {
    let col = |f: fn(&Times) -> u64| times.iter().map(f).collect::<Vec<u64>>();
    let mut total = col(|t| t.total);
    Summary {
        median: quantile(&mut total, 0.50),
        p90: quantile(&mut total, 0.90),
        alloc: quantile(&mut col(|t| t.alloc), 0.50),
        touch: quantile(&mut col(|t| t.touch), 0.50),
        free: quantile(&mut col(|t| t.free), 0.50),
        faults: mean(times, |t| t.faults),
        sleeps: mean(times, |t| t.sleeps),
        first: first.total as f64 / 1e3,
    }
}

// ---------------------------------------------------------------------------------------------
// The run.

/// The results at one size.
struct SizeRow {
    size: usize,
    iters: usize,
    warmup: usize,
    /// `None`: not measured (`--only`).
    subjects: [Option<Summary>; N_SUBJECTS],
    /// Times the daemon went to sleep (voluntary context switches) while this size ran.
    daemon_sleeps: Option<u64>,
}

impl SizeRow {
    fn median(&self, i: usize) -> Option<f64> {
        self.subjects[i].map(|m| m.median)
    }
}

/// Measures every subject at `size`, round-robin.
fn measure_size(
    size: usize,
    iters: usize,
    warmup: usize,
    only: &[bool; N_SUBJECTS],
    daemon_pid: u32,
    check: &mut XallocCheck,
) -> Result<SizeRow, String> {
    let layout = Layout::from_size_align(size, ALIGN).map_err(|e| e.to_string())?;
    let floor = Prefaulted::new(size)?;
    let n = N_SUBJECTS;
    // Allocated before the first iteration: the harness allocates nothing while timing.
    let mut lat: Vec<Vec<Times>> = (0..n).map(|_| Vec::with_capacity(iters)).collect();
    let mut first = [Times::default(); N_SUBJECTS];
    let sleeps_before = voluntary_switches(daemon_pid);
    for rep in 0..warmup + iters {
        for k in 0..n {
            let i = (rep + k) % n;
            if !only[i] {
                continue;
            }
            let dt = iteration(SUBJECTS[i].1, layout, &floor, check, i == XALLOC_IX)
                .map_err(|e| format!("{}: {e}", SUBJECTS[i].0))?;
            if rep == 0 {
                first[i] = dt;
            }
            if rep >= warmup {
                lat[i].push(dt);
            }
        }
    }
    let daemon_sleeps = voluntary_switches(daemon_pid)
        .zip(sleeps_before)
        .map(|(a, b)| a.saturating_sub(b));
    let mut subjects = [None; N_SUBJECTS];
    for (i, l) in lat.iter().enumerate() {
        if only[i] {
            subjects[i] = Some(summarize(l, first[i]));
        }
    }
    Ok(SizeRow {
        size,
        iters,
        warmup,
        subjects,
        daemon_sleeps,
    })
}

fn run(cfg: &Config) -> Result<(), String> {
    let started = Instant::now();
    let name = std::env::var("XALLOC_NAME").unwrap_or_else(|_| "xalloc".to_owned());
    let threshold = XALLOC.threshold();
    let smallest = SIZES.iter().map(|s| s.0).min().unwrap_or(0);
    if threshold > smallest {
        return Err(format!(
            "XallocGlobal's threshold is {threshold} bytes (XALLOC_THRESHOLD?): it would send \
             the {smallest}-byte blocks to glibc; unset XALLOC_THRESHOLD"
        ));
    }
    // Checks the instance before measuring; XallocGlobal makes a connection of its own.
    let pid = {
        let conn = Connection::connect(&name).map_err(|e| {
            format!("connect to instance {name:?} (XALLOC_NAME): {e}; is its daemon running?")
        })?;
        let largest = SIZES.iter().map(|s| s.0).max().unwrap_or(0);
        if conn.arena_len() < largest {
            return Err(format!(
                "the arena of {name:?} is {} bytes; it must hold a {largest}-byte block \
                 (start the daemon with --arena-size 256M)",
                conn.arena_len()
            ));
        }
        conn.daemon_pid()
    };
    if let Some(want) = cfg.daemon_pid {
        if want != pid {
            return Err(format!(
                "instance {name:?} is served by pid {pid}, not {want}"
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
    pin_to(cfg.cpu)?;
    let before = xalloc_global::counters();

    let mut check = XallocCheck::default();
    let mut rows = Vec::new();
    for s in &SIZES {
        let (iters, warmup) = cfg.counts(s);
        eprintln!(
            "churn: {} — {iters} iterations after {warmup} warm-up, per subject",
            size_label(s.0)
        );
        rows.push(measure_size(
            s.0, iters, warmup, &cfg.only, pid, &mut check,
        )?);
    }

    let after = xalloc_global::counters();
    let report = Report {
        name: &name,
        pid,
        cfg,
        rows: &rows,
        forwarded: after.forwarded - before.forwarded,
        fallbacks: after.fallbacks - before.fallbacks,
        held_bytes: after.arena_bytes.saturating_sub(after.cached_bytes),
        check: &check,
        elapsed: started.elapsed(),
    };
    print!("{}", report.markdown());
    report.verdict()
}

/// `256 KiB`, `64 MiB`.
fn size_label(size: usize) -> String {
    if size >= 1 << 20 {
        format!("{} MiB", size >> 20)
    } else {
        format!("{} KiB", size >> 10)
    }
}

/// Everything the printed report needs.
struct Report<'a> {
    name: &'a str,
    pid: u32,
    cfg: &'a Config,
    rows: &'a [SizeRow],
    /// XallocGlobal allocations served from the arena during the run.
    forwarded: u64,
    /// XallocGlobal allocations that went to the system allocator instead.
    fallbacks: u64,
    /// Arena bytes still counted as held after the run and not in the cache of freed blocks
    /// (frees the daemon refused).
    held_bytes: u64,
    check: &'a XallocCheck,
    elapsed: Duration,
}

impl Report<'_> {
    /// What went wrong with XallocGlobal's forwarding, if anything.
    fn forwarding_errors(&self) -> Vec<String> {
        let mut e = Vec::new();
        if self.fallbacks > 0 {
            e.push(format!(
                "XallocGlobal FELL BACK to the system allocator {} times: its numbers are \
                 glibc's, not the arena's",
                self.fallbacks
            ));
        }
        if self.check.outside > 0 {
            e.push(format!(
                "{} XallocGlobal blocks lay outside the daemon's arena",
                self.check.outside
            ));
        }
        if self.forwarded != self.check.asked {
            e.push(format!(
                "XallocGlobal forwarded {} allocations to the arena, not all {} asked of it",
                self.forwarded, self.check.asked
            ));
        }
        if self.held_bytes > 0 {
            e.push(format!(
                "{} arena bytes are still held after the run (frees the daemon did not take)",
                self.held_bytes
            ));
        }
        e
    }

    fn verdict(&self) -> Result<(), String> {
        let e = self.forwarding_errors();
        if e.is_empty() {
            Ok(())
        } else {
            Err(e.join("; "))
        }
    }

    fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "## Large-block churn: alloc, touch every 4 KiB, free (XallocGlobal → instance {}, \
             daemon pid {} on CPU {}; this process on CPU {})\n",
            self.name, self.pid, self.cfg.daemon_cpu, self.cfg.cpu
        );
        let errors = self.forwarding_errors();
        for e in &errors {
            let _ = writeln!(s, "**ERROR: {e}.**\n");
        }

        let _ = writeln!(s, "Median µs per iteration (p90 in parentheses):\n");
        let _ = write!(s, "| size | iterations |");
        for (n, _) in &SUBJECTS {
            let _ = write!(s, " {n} |");
        }
        let _ = write!(s, "\n|---|---:|");
        for _ in &SUBJECTS {
            let _ = write!(s, "---:|");
        }
        let _ = writeln!(s);
        for r in self.rows {
            let _ = write!(
                s,
                "| {} | {} (+{} warm-up) |",
                size_label(r.size),
                r.iters,
                r.warmup
            );
            for m in &r.subjects {
                match m {
                    Some(m) => {
                        let _ = write!(s, " {} ({}) |", us(m.median), us(m.p90));
                    }
                    None => s.push_str(" – |"),
                }
            }
            let _ = writeln!(s);
        }

        let _ = writeln!(
            s,
            "\nRatios of medians: glibc ÷ x and mimalloc ÷ x (above 1: x is faster), x ÷ floor \
             (1 = nothing but the page touches); then the medians of the three phases of an \
             iteration (they need not add up), the mean page faults and sleeps (voluntary context \
             switches) of this thread per iteration, and the cold first iteration, µs:\n"
        );
        let _ = writeln!(
            s,
            "| size | allocator | median µs | glibc ÷ x | mimalloc ÷ x | x ÷ floor | alloc µs \
             | touch µs | free µs | faults | sleeps | first µs |"
        );
        let _ = writeln!(
            s,
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for r in self.rows {
            let glibc = r.median(GLIBC);
            let mi = r.median(MIMALLOC);
            let floor = r.median(FLOOR);
            for (i, (n, _)) in SUBJECTS.iter().enumerate() {
                let Some(m) = r.subjects[i] else { continue };
                let _ = write!(
                    s,
                    "| {} | {n} | {} | {} | {} | {} |",
                    size_label(r.size),
                    us(m.median),
                    ratio(glibc, Some(m.median)),
                    ratio(mi, Some(m.median)),
                    ratio(Some(m.median), floor),
                );
                if i == FLOOR {
                    let _ = writeln!(
                        s,
                        " | {} | | {} | {} | {} |",
                        us(m.touch),
                        count(m.faults),
                        count(m.sleeps),
                        us(m.first)
                    );
                } else {
                    let _ = writeln!(
                        s,
                        " {} | {} | {} | {} | {} | {} |",
                        us(m.alloc),
                        us(m.touch),
                        us(m.free),
                        count(m.faults),
                        count(m.sleeps),
                        us(m.first)
                    );
                }
            }
        }
        let _ = writeln!(
            s,
            "\nx ÷ floor below 1 means faster page touches than the floor's 4 KiB pages: blocks on \
             transparent huge pages (mimalloc asks for them with MADV_HUGEPAGE; the floor's \
             buffer and the arena in /dev/shm use 4 KiB pages)."
        );
        if self.rows.iter().any(|r| r.subjects[XALLOC_IX].is_some()) {
            let per_iter: Vec<String> = self
                .rows
                .iter()
                .map(|r| match r.daemon_sleeps {
                    Some(n) => format!(
                        "{} {:.2}",
                        size_label(r.size),
                        n as f64 / (r.iters + r.warmup) as f64
                    ),
                    None => format!("{} –", size_label(r.size)),
                })
                .collect();
            let _ = writeln!(
                s,
                "\nDaemon sleeps (voluntary context switches) per XallocGlobal iteration: {}. \
                 The daemon spins for 50 µs after its last request, then sleeps on a futex; \
                 a request that finds it asleep pays a cross-CPU wake-up.",
                per_iter.join(", ")
            );
        }

        // Targets.
        let _ = writeln!(s, "\n| target | measured | result |");
        let _ = writeln!(s, "|---|---|---|");
        if let Some(r) = self.rows.iter().max_by_key(|r| r.size) {
            let x = r.median(XALLOC_IX);
            let glibc = r.median(GLIBC);
            let (measured, result) = match (glibc, x) {
                (Some(g), Some(x)) => (
                    format!("{:.1}× ({} vs {} µs)", g / x, us(x), us(g)),
                    if g / x >= TARGET_VS_GLIBC {
                        "met"
                    } else {
                        "missed"
                    },
                ),
                _ => ("not measured".to_owned(), "n/a"),
            };
            let _ = writeln!(
                s,
                "| XallocGlobal ≥ {TARGET_VS_GLIBC}× faster than glibc at {} | {measured} | \
                 {result} |",
                size_label(r.size),
            );
        }
        // Per size: the value `f(r)` gives and whether it meets the target.
        let per_size = |f: &dyn Fn(&SizeRow) -> Option<(f64, bool)>| {
            let mut all = true;
            let mut parts = Vec::new();
            for r in self.rows {
                let Some((v, ok)) = f(r) else {
                    return ("not measured".to_owned(), "n/a");
                };
                all &= ok;
                parts.push(format!(
                    "{} {v:.2}×{}",
                    size_label(r.size),
                    if ok { "" } else { " ✗" }
                ));
            }
            (parts.join(", "), if all { "met" } else { "missed" })
        };
        let (m, result) = per_size(&|r| {
            let v = r.median(MIMALLOC)? / r.median(XALLOC_IX)?;
            Some((v, v >= 1.0))
        });
        let _ = writeln!(
            s,
            "| XallocGlobal no slower than mimalloc at every size (mimalloc ÷ x ≥ 1) | {m} | \
             {result} (informational) |"
        );
        let (m, result) = per_size(&|r| {
            let v = r.median(XALLOC_IX)? / r.median(FLOOR)?;
            Some((v, v <= TARGET_VS_FLOOR))
        });
        let _ = writeln!(
            s,
            "| XallocGlobal within {TARGET_VS_FLOOR}× of the floor (x ÷ floor ≤ \
             {TARGET_VS_FLOOR}) | {m} | {result} (informational) |"
        );

        let _ = writeln!(
            s,
            "\nXallocGlobal: {} allocations forwarded to the arena, {} fallbacks to the system \
             allocator{}. Missed targets do not fail the run; measured in {:.1} s.",
            self.forwarded,
            self.fallbacks,
            if !errors.is_empty() {
                " — SEE THE ERRORS ABOVE"
            } else if self.forwarded > 0 {
                " (every block was the arena's)"
            } else {
                ""
            },
            self.elapsed.as_secs_f64()
        );
        s
    }
}

/// µs with a precision that suits the magnitude.
fn us(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// A mean count per iteration.
fn count(v: f64) -> String {
    if v >= 10.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// `a ÷ b` to two decimals (no decimals when large); `–` where either is missing.
fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => {
            let v = a / b;
            if v >= 100.0 {
                format!("{v:.0}×")
            } else {
                format!("{v:.2}×")
            }
        }
        _ => "–".to_owned(),
    }
}
