#!/usr/bin/env bash
# Builds xalloc-bench in release mode and runs it pinned to one CPU.
#   scripts/bench.sh [--quick] [--workload NAME]... [--only ALLOC]... [--reps N]
# BENCH_CPU selects the CPU (default 1).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo build --release -p xalloc-bench
exec taskset -c "${BENCH_CPU:-1}" target/release/xalloc-bench "$@"
