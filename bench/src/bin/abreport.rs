//! `abreport`: the side-by-side tables of `scripts/bench-ab.sh`, from the outputs of the
//! `roundtrip` and `scale` runs it made with two builds ("prev" and "new") in alternating
//! rounds.
//!
//! ```text
//! abreport DIR [--prev LABEL] [--new LABEL]
//! ```
//!
//! `DIR` holds one file per run, `rt.ROUND.BUILD.md` (the output of `roundtrip run`) and
//! `scale.ROUND.BUILD.md` (of `scale run`), BUILD being `prev` or `new`. Only the markdown rows
//! both builds' programs print are read (the latency rows, the idle line, the scaling rows), so
//! the previous build's own binaries, with their own output, serve as they are.
//!
//! # What is printed
//!
//! For each latency row (p50, p99, mean) and each client count (requests/s): the median over
//! the rounds for each build, and the ratio new / previous as the median of the rounds' own
//! ratios (each round runs both builds back to back, so drift on a noisy machine cancels), with
//! its range over the rounds. Then the targets: allocate+free p50 on different CPUs no worse
//! than the previous build's (ratio at most 1), requests/s no worse at every client count
//! (ratio at least 1); and the daemon's CPU ticks while idle for each build. A missed target
//! does not fail the program; files it cannot read or parse do (exit 1).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;

const USAGE: &str = "usage: abreport DIR [--prev LABEL] [--new LABEL]";

/// The two builds, in the order of the tables' columns.
const BUILDS: [&str; 2] = ["prev", "new"];

/// The round-trip row whose p50 is the target's.
const TARGET_ROW: (&str, &str) = ("xalloc allocate+free 1 MiB", "different CPUs");

/// One latency row of a `roundtrip run` output.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Latency {
    p50: f64,
    p99: f64,
    mean: f64,
}

/// What one `roundtrip run` printed: latency rows by (measurement, placement), the idle ticks.
#[derive(Debug, Default, PartialEq)]
struct RoundTrip {
    rows: BTreeMap<(String, String), Latency>,
    idle_ticks: Option<u64>,
}

/// A markdown table row's cells, trimmed; `None` for other lines.
fn cells(line: &str) -> Option<Vec<&str>> {
    let inner = line.trim().strip_prefix('|')?.strip_suffix('|')?;
    Some(inner.split('|').map(str::trim).collect())
}

/// The placement without its CPU numbers: "different CPUs (client 1, daemon 0)" → "different
/// CPUs".
fn placement_key(p: &str) -> String {
    p.split(" (").next().unwrap_or(p).trim().to_owned()
}

fn parse_roundtrip(text: &str) -> RoundTrip {
    let mut rt = RoundTrip::default();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("Daemon CPU time over ") {
            // "Daemon CPU time over 2 idle s: 0 ticks (...)"
            rt.idle_ticks = rest
                .split_once(": ")
                .and_then(|(_, r)| r.split_whitespace().next())
                .and_then(|t| t.parse().ok());
            continue;
        }
        let Some(c) = cells(line) else { continue };
        let [what, placement, p50, p99, mean] = c[..] else {
            continue;
        };
        let is_row = what.starts_with("xalloc allocate+free") || what.starts_with("unix-socket");
        let (Ok(p50), Ok(p99), Ok(mean)) = (p50.parse(), p99.parse(), mean.parse()) else {
            continue;
        };
        if is_row {
            rt.rows.insert(
                (what.to_owned(), placement_key(placement)),
                Latency { p50, p99, mean },
            );
        }
    }
    rt
}

/// Requests/s in all by client count, from a `scale run` output.
fn parse_scale(text: &str) -> Scale {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(c) = cells(line) else { continue };
        let [clients, _cpus, all, _per, _us] = c[..] else {
            continue;
        };
        if let (Ok(n), Ok(r)) = (clients.parse::<usize>(), all.parse::<f64>()) {
            out.insert(n, r);
        }
    }
    out
}

/// Median of `v` (sorts it); `NaN` for none.
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// A comparison over rounds: each build's values, and the rounds' own ratios new / prev.
#[derive(Default)]
struct Compared {
    prev: Vec<f64>,
    new: Vec<f64>,
    ratios: Vec<f64>,
}

impl Compared {
    fn add(&mut self, prev: f64, new: f64) {
        self.prev.push(prev);
        self.new.push(new);
        if prev > 0.0 {
            self.ratios.push(new / prev);
        }
    }

    /// (median prev, median new, median ratio, lowest ratio, highest ratio).
    fn summary(&self) -> (f64, f64, f64, f64, f64) {
        let mut r = self.ratios.clone();
        let lo = r.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = r.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (
            median(&mut self.prev.clone()),
            median(&mut self.new.clone()),
            median(&mut r),
            lo,
            hi,
        )
    }
}

/// The runs of one kind: per round, per build, what was parsed.
type Runs<T> = BTreeMap<u32, BTreeMap<String, T>>;

/// Requests/s in all by client count: one `scale run`.
type Scale = BTreeMap<usize, f64>;

/// Reads every `KIND.ROUND.BUILD.md` of `dir`.
fn read_runs(dir: &Path) -> Result<(Runs<RoundTrip>, Runs<Scale>), String> {
    let mut rt: Runs<RoundTrip> = BTreeMap::new();
    let mut scale: Runs<Scale> = BTreeMap::new();
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("{}: {e}", dir.display()))?;
        let file = entry.file_name();
        let Some(file) = file.to_str() else { continue };
        let parts: Vec<&str> = file.split('.').collect();
        let [kind, round, build, "md"] = parts[..] else {
            continue;
        };
        let (Ok(round), true) = (round.parse::<u32>(), BUILDS.contains(&build)) else {
            continue;
        };
        let text = std::fs::read_to_string(entry.path())
            .map_err(|e| format!("{}: {e}", entry.path().display()))?;
        match kind {
            "rt" => {
                let r = parse_roundtrip(&text);
                if r.rows.is_empty() {
                    return Err(format!("{file}: no latency rows"));
                }
                rt.entry(round).or_default().insert(build.to_owned(), r);
            }
            "scale" => {
                let s = parse_scale(&text);
                if s.is_empty() {
                    return Err(format!("{file}: no scaling rows"));
                }
                scale.entry(round).or_default().insert(build.to_owned(), s);
            }
            _ => {}
        }
    }
    Ok((rt, scale))
}

/// Whether a round has both builds' runs.
fn both<T>(m: &BTreeMap<String, T>) -> bool {
    BUILDS.iter().all(|b| m.contains_key(*b))
}

/// The report, from the parsed runs (rounds where one build is missing are left out).
fn report(rt: &Runs<RoundTrip>, scale: &Runs<Scale>, prev_label: &str, new_label: &str) -> String {
    let mut s = String::new();
    let rt_rounds: Vec<_> = rt.values().filter(|m| both(m)).collect();
    let scale_rounds: Vec<_> = scale.values().filter(|m| both(m)).collect();
    let _ = writeln!(
        s,
        "## Previous build ({prev_label}) against this one ({new_label}), alternating\n"
    );
    let mut targets: Vec<(String, String, &str)> = Vec::new();

    if !rt_rounds.is_empty() {
        let mut keys: Vec<(String, String)> = Vec::new();
        for m in &rt_rounds {
            for k in m["new"].rows.keys() {
                if m["prev"].rows.contains_key(k) && !keys.contains(k) {
                    keys.push(k.clone());
                }
            }
        }
        let _ = writeln!(
            s,
            "### Round trip: µs, medians over {} rounds; new / prev is the median of the rounds' \
             own ratios [lowest-highest] (below 1: the new build is faster)\n",
            rt_rounds.len()
        );
        let _ = writeln!(
            s,
            "| measurement | placement | prev p50 | new p50 | new / prev p50 | prev p99 | new p99 \
             | new / prev p99 | prev mean | new mean | new / prev mean |"
        );
        let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for k in &keys {
            let (mut p50, mut p99, mut mean) = (
                Compared::default(),
                Compared::default(),
                Compared::default(),
            );
            for m in &rt_rounds {
                if let (Some(a), Some(b)) = (m["prev"].rows.get(k), m["new"].rows.get(k)) {
                    p50.add(a.p50, b.p50);
                    p99.add(a.p99, b.p99);
                    mean.add(a.mean, b.mean);
                }
            }
            let _ = write!(s, "| {} | {} |", k.0, k.1);
            for c in [&p50, &p99, &mean] {
                let (a, b, r, lo, hi) = c.summary();
                let _ = write!(s, " {a:.2} | {b:.2} | {r:.2} [{lo:.2}-{hi:.2}] |");
            }
            let _ = writeln!(s);
            if (k.0.as_str(), k.1.as_str()) == TARGET_ROW {
                let (a, b, r, lo, hi) = p50.summary();
                targets.push((
                    "allocate+free p50, different CPUs: new no worse than prev".to_owned(),
                    format!("{b:.2} against {a:.2} µs: {r:.2}× [{lo:.2}-{hi:.2}]"),
                    if r <= 1.0 { "met" } else { "missed" },
                ));
            }
        }
        let _ = writeln!(s);
        let _ = writeln!(s, "Per round, p50 µs prev / new:\n");
        for k in &keys {
            let mut line = format!("- {}, {}:", k.0, k.1);
            for m in &rt_rounds {
                if let (Some(a), Some(b)) = (m["prev"].rows.get(k), m["new"].rows.get(k)) {
                    let _ = write!(line, " {:.2}/{:.2}", a.p50, b.p50);
                }
            }
            let _ = writeln!(s, "{line}");
        }
        let ticks = |b: &str| -> Vec<String> {
            rt_rounds
                .iter()
                .map(|m| m[b].idle_ticks.map_or("?".to_owned(), |t| t.to_string()))
                .collect()
        };
        let _ = writeln!(
            s,
            "\nDaemon CPU ticks while idle, after each run, per round: prev {}; new {}.\n",
            ticks("prev").join(", "),
            ticks("new").join(", ")
        );
    }

    if !scale_rounds.is_empty() {
        let mut counts: Vec<usize> = Vec::new();
        for m in &scale_rounds {
            for n in m["new"].keys() {
                if m["prev"].contains_key(n) && !counts.contains(n) {
                    counts.push(*n);
                }
            }
        }
        counts.sort_unstable();
        let _ = writeln!(
            s,
            "### Clients in parallel: requests/s in all, medians over {} rounds; new / prev as \
             above (above 1: the new build is faster)\n",
            scale_rounds.len()
        );
        let _ = writeln!(
            s,
            "| clients | prev requests/s | new requests/s | new / prev | per round, prev / new (thousands) |"
        );
        let _ = writeln!(s, "|---:|---:|---:|---:|---|");
        let mut worst: Option<(usize, f64)> = None;
        for n in counts {
            let mut c = Compared::default();
            let mut rounds = Vec::new();
            for m in &scale_rounds {
                if let (Some(a), Some(b)) = (m["prev"].get(&n), m["new"].get(&n)) {
                    c.add(*a, *b);
                    rounds.push(format!("{:.0}/{:.0}", a / 1e3, b / 1e3));
                }
            }
            let (a, b, r, lo, hi) = c.summary();
            let _ = writeln!(
                s,
                "| {n} | {a:.0} | {b:.0} | {r:.2} [{lo:.2}-{hi:.2}] | {} |",
                rounds.join(" ")
            );
            if worst.is_none_or(|(_, w)| r < w) {
                worst = Some((n, r));
            }
        }
        let _ = writeln!(s);
        if let Some((n, r)) = worst {
            targets.push((
                "requests/s at every client count: new no worse than prev".to_owned(),
                format!("lowest new / prev {r:.2}× ({n} clients)"),
                if r >= 1.0 { "met" } else { "missed" },
            ));
        }
    }

    if !targets.is_empty() {
        let _ = writeln!(s, "| target | measured | result |");
        let _ = writeln!(s, "|---|---|---|");
        for (t, m, r) in &targets {
            let _ = writeln!(s, "| {t} | {m} | {r} |");
        }
        let _ = writeln!(
            s,
            "\nA ratio is the median of the rounds' own ratios; the range beside it is how far \
             single rounds strayed (the noise of this machine)."
        );
    }
    s
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut dir = None;
    let (mut prev, mut new) = ("prev".to_owned(), "new".to_owned());
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--prev" => prev = it.next().cloned().unwrap_or_default(),
            "--new" => new = it.next().cloned().unwrap_or_default(),
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            d if dir.is_none() && !d.starts_with("--") => dir = Some(d.to_owned()),
            _ => {
                eprintln!("abreport: unknown argument {a:?}\n{USAGE}");
                return ExitCode::FAILURE;
            }
        }
    }
    let Some(dir) = dir else {
        eprintln!("{USAGE}");
        return ExitCode::FAILURE;
    };
    match read_runs(Path::new(&dir)) {
        Ok((rt, scale)) if !rt.is_empty() || !scale.is_empty() => {
            print!("{}", report(&rt, &scale, &prev, &new));
            ExitCode::SUCCESS
        }
        Ok(_) => {
            eprintln!("abreport: no runs in {dir}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("abreport: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RT: &str = "\
## xalloc round trip: instance x, daemon pid 1 pinned on CPU 0

| measurement | placement | p50 µs | p99 µs | mean µs |
|---|---|---:|---:|---:|
| xalloc allocate+free 1 MiB | different CPUs (client 1, daemon 0) | 1.00 | 2.00 | 1.50 |
| xalloc allocate+free 1 MiB | same CPU (client 0, daemon 0) | 8.00 | 12.00 | 9.00 |
| unix-socket ping-pong 8 B | different CPUs (parent 1, echo 0) | skipped: CPU 1 not available | | |
| clock read (back-to-back `Instant::now`) | | 0.02 | 0.02 | 0.02 |

Daemon CPU time over 2 idle s: 3 ticks (30 ms at 100 ticks/s).

| target | measured | result |
|---|---:|---|
| xalloc allocate+free p50 < 1 µs, different CPUs | 1.00 µs | missed |
";

    const SCALE: &str = "\
| clients | CPUs of clients | requests/s (all) | requests/s per client | µs per round trip (per client) |
|---:|---|---:|---:|---:|
| 1 | 1 | 1000000 | 1000000 | 1.00 |
| 2 | 1,0 | 1500000 | 750000 | 1.33 |
";

    #[test]
    fn roundtrip_rows_and_idle_ticks_are_read_and_the_rest_ignored() {
        let rt = parse_roundtrip(RT);
        assert_eq!(rt.idle_ticks, Some(3));
        assert_eq!(rt.rows.len(), 2, "{:?}", rt.rows);
        let k = (
            "xalloc allocate+free 1 MiB".to_owned(),
            "same CPU".to_owned(),
        );
        assert_eq!(
            rt.rows[&k],
            Latency {
                p50: 8.0,
                p99: 12.0,
                mean: 9.0
            }
        );
    }

    #[test]
    fn scale_rows_are_read_by_client_count() {
        let s = parse_scale(SCALE);
        assert_eq!(s.len(), 2);
        assert_eq!(s[&2], 1_500_000.0);
    }

    #[test]
    fn ratios_are_paired_per_round_and_targets_judged() {
        let mut rt: Runs<RoundTrip> = BTreeMap::new();
        let mut scale: Runs<Scale> = BTreeMap::new();
        for (round, prev, new) in [(1, 1.0, 0.9), (2, 2.0, 1.9), (3, 1.0, 1.2)] {
            let mk = |p50: f64| {
                let mut r = parse_roundtrip(RT);
                let k = (
                    "xalloc allocate+free 1 MiB".to_owned(),
                    "different CPUs".to_owned(),
                );
                r.rows.get_mut(&k).unwrap().p50 = p50;
                r
            };
            let m = rt.entry(round).or_default();
            m.insert("prev".to_owned(), mk(prev));
            m.insert("new".to_owned(), mk(new));
            let m = scale.entry(round).or_default();
            m.insert("prev".to_owned(), parse_scale(SCALE));
            m.insert("new".to_owned(), parse_scale(SCALE));
        }
        // A round with one build only is left out.
        rt.entry(4)
            .or_default()
            .insert("new".to_owned(), parse_roundtrip(RT));
        let out = report(&rt, &scale, "a", "b");
        // Ratios 0.9, 0.95, 1.2: median 0.95; medians of the values 1.0 and 1.2.
        assert!(
            out.contains(
                "| xalloc allocate+free 1 MiB | different CPUs | 1.00 | 1.20 | 0.95 [0.90-1.20] |"
            ),
            "{out}"
        );
        assert!(out.contains("medians over 3 rounds"), "{out}");
        assert!(
            out.contains("| allocate+free p50, different CPUs: new no worse than prev | 1.20 against 1.00 µs: 0.95× [0.90-1.20] | met |"),
            "{out}"
        );
        assert!(
            out.contains("| requests/s at every client count: new no worse than prev | lowest new / prev 1.00× (1 clients) | met |"),
            "{out}"
        );
        assert!(out.contains("prev 3, 3, 3; new 3, 3, 3"), "{out}");
    }

    #[test]
    fn medians() {
        assert_eq!(median(&mut [5.0, 1.0, 3.0]), 3.0);
        assert_eq!(median(&mut [1.0, 2.0]), 1.5);
        assert!(median(&mut []).is_nan());
    }
}
