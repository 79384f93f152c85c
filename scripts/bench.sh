#!/usr/bin/env bash
# Builds xalloc-bench in release mode and runs it pinned to one CPU.
#   scripts/bench.sh [--quick] [--workload NAME]... [--only ALLOC]... [--reps N]
# BENCH_CPU selects the CPU (default 1, or 0 on a one-CPU machine).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo build --release -p xalloc-bench
default_cpu=1
if [[ "$(nproc)" -lt 2 ]]; then
    default_cpu=0
fi
exec taskset -c "${BENCH_CPU:-$default_cpu}" target/release/xalloc-bench "$@"
