//! Throughput of one daemon with several client processes (1, 2, 4, 8, and on up to the number
//! of CPUs): each client, a process of its own pinned on a CPU of its own when there are enough
//! (the daemon keeps its CPU to itself then; beyond, clients share CPUs round robin),
//! repeats allocate + free of 1 MiB through `xalloc_global::client` for a fixed time. Printed:
//! requests per second in all and per client, for each client count.
//!
//! ```text
//! scripts/bench-scale.sh [--quick]        # starts its own daemon on CPU 0
//! scale run --name NAME --daemon-cpu 0 [--clients 1,2,4] [--seconds 2]
//! ```

use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use xalloc_global::client::Connection;

#[path = "../shared.rs"]
mod shared;
use shared::*;

/// One client: allocate + free of 1 MiB until `seconds` pass; prints the number of pairs.
fn worker(name: &str, cpu: usize, seconds: f64) -> Result<(), String> {
    pin_to(cpu)?;
    let conn = Connection::connect(name).map_err(|e| e.to_string())?;
    let mut slot = conn.claim().map_err(|e| e.to_string())?;
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let mut pairs = 0u64;
    while Instant::now() < end {
        for _ in 0..64 {
            let b = slot
                .allocate(1 << 20, 4096, false)
                .map_err(|e| format!("allocate: {e}"))?;
            slot.free(b.offset).map_err(|e| format!("free: {e}"))?;
        }
        pairs += 64;
    }
    println!("{pairs}");
    Ok(())
}

fn arg<T: std::str::FromStr>(args: &[String], flag: &str) -> Option<T> {
    let i = args.iter().position(|a| a == flag)?;
    args.get(i + 1)?.parse().ok()
}

fn run(args: &[String]) -> Result<(), String> {
    let name: String = arg(args, "--name").ok_or("--name NAME is required")?;
    let daemon_cpu: usize = arg(args, "--daemon-cpu").ok_or("--daemon-cpu N is required")?;
    let seconds: f64 = arg(args, "--seconds").unwrap_or(2.0);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    // 1, 2, 4 and 8 clients, and on to as many as there are CPUs: clients beyond the CPUs
    // share them (with each other and, last, with the daemon).
    let default_counts: Vec<usize> = (0..usize::BITS)
        .map(|k| 1usize << k)
        .take_while(|&n| n <= cpus.max(8))
        .collect();
    let counts: Vec<usize> = match arg::<String>(args, "--clients") {
        Some(list) => list
            .split(',')
            .map(|n| n.parse().map_err(|_| format!("bad client count {n}")))
            .collect::<Result<_, _>>()?,
        None => default_counts,
    };
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    // Client CPUs: every CPU but the daemon's, round robin; with fewer CPUs than clients + 1,
    // clients share (and the daemon's CPU is used last).
    let others: Vec<usize> = (0..cpus)
        .filter(|&c| c != daemon_cpu)
        .chain([daemon_cpu])
        .collect();
    println!("## Daemon throughput: allocate + free of 1 MiB, {cpus} CPUs, daemon on CPU {daemon_cpu}, {seconds} s per row\n");
    println!("| clients | CPUs of clients | requests/s (all) | requests/s per client | µs per round trip (per client) |");
    println!("|---:|---|---:|---:|---:|");
    for &n in &counts {
        let cpus_used: Vec<usize> = (0..n).map(|i| others[i % others.len()]).collect();
        let children: Vec<_> = cpus_used
            .iter()
            .map(|cpu| {
                Command::new(&exe)
                    .args(["worker", &name, &cpu.to_string(), &seconds.to_string()])
                    .stdout(Stdio::piped())
                    .spawn()
                    .map_err(|e| e.to_string())
            })
            .collect::<Result<_, _>>()?;
        let mut pairs = 0u64;
        for c in children {
            let out = c.wait_with_output().map_err(|e| e.to_string())?;
            let text = String::from_utf8_lossy(&out.stdout);
            if !out.status.success() {
                return Err(format!("client failed: {text}"));
            }
            pairs += text
                .trim()
                .parse::<u64>()
                .map_err(|_| format!("client said {text}"))?;
        }
        let requests = 2.0 * pairs as f64 / seconds;
        let per = requests / n as f64;
        let shown: Vec<String> = cpus_used.iter().map(usize::to_string).collect();
        println!(
            "| {n} | {} | {:.0} | {:.0} | {:.2} |",
            shown.join(","),
            requests,
            per,
            1e6 / per
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.first().map(String::as_str) {
        Some("run") => run(&args[1..]),
        Some("worker") => match (args.get(1), arg_at(&args, 2), arg_at(&args, 3)) {
            (Some(name), Some(cpu), Some(secs)) => worker(name, cpu, secs),
            _ => Err("usage: scale worker NAME CPU SECONDS".into()),
        },
        _ => Err(
            "usage: scale run --name NAME --daemon-cpu N [--clients 1,2,4] [--seconds S]".into(),
        ),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("scale: {e}");
            ExitCode::FAILURE
        }
    }
}

fn arg_at<T: std::str::FromStr>(args: &[String], i: usize) -> Option<T> {
    args.get(i)?.parse().ok()
}
