#!/usr/bin/env bash
# Large-block churn (alloc, touch every 4 KiB, free at 256 KiB, 1 MiB, 16 MiB, 64 MiB) through
# XallocGlobal, glibc, mimalloc and jemalloc, against the floor of touching pre-faulted memory.
# Prints markdown tables (see bench/src/bin/churn.rs).
#
#   scripts/bench-churn.sh [--quick] [churn options, e.g. --iters 100]
#
# Builds release, starts a daemon of its own (instance xbench-churn-PID, --arena-size 256M,
# pinned with taskset on CPU 0, files in a private temp dir), exports XALLOC_NAME for it, and
# always stops it by its pid and removes its segments on exit, also on failure or Ctrl-C; no
# other daemon is touched. churn pins itself on CPU 1. Exits non-zero if anything fails, above
# all if XallocGlobal fell back to the system allocator, but not on missed targets. --quick
# (a few seconds) is the CI smoke run.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

for a in "$@"; do
    case "$a" in
    -h | --help)
        sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    esac
done

daemon_cpu=0
bench_cpu=1

# XALLOCD and CHURN name prebuilt binaries (e.g. on a machine without the crates); by default
# both are built here.
if [[ -z "${XALLOCD:-}" || -z "${CHURN:-}" ]]; then
    cargo build --release -p xalloc-daemon -p xalloc-bench
fi
xallocd="${XALLOCD:-target/release/xallocd}"
churn="${CHURN:-target/release/churn}"
# shellcheck source=scripts/lib/bench-daemon.sh
. scripts/lib/bench-daemon.sh
bench_daemon_start churn "$daemon_cpu" 256M
name="$bench_name"
daemon_pid="$bench_daemon_pid"

start=$SECONDS
# XALLOC_THRESHOLD is cleared: churn needs the default 256 KiB threshold (it checks).
env -u XALLOC_THRESHOLD XALLOC_NAME="$name" "$churn" --daemon-pid "$daemon_pid" \
    --daemon-cpu "$daemon_cpu" --cpu "$bench_cpu" "$@"
echo
echo "bench-churn: done in $((SECONDS - start)) s"
