#!/usr/bin/env bash
# Handing 64 KiB, 1 MiB and 64 MiB to another process and reading it there: by share handle
# (SharedBuf::open in the other process), by copy through a Unix socket, and by passing a memfd
# (SCM_RIGHTS, the kernel's zero-copy reference). Prints markdown tables (see
# bench/src/bin/share.rs): the hand-off alone and the hand-off with the read, medians, ratios
# to the handle, and the open's own latency.
#
#   scripts/bench-share.sh [--quick] [share run options, e.g. --rounds 9, --reader-cpu 1]
#
# Builds release, starts a daemon of its own (instance xbench-share-PID, --arena-size 256M,
# pinned with taskset on CPU 0, files in a private temp dir), exports XALLOC_NAME for it, and
# always stops it by its pid and removes its segments on exit, also on failure or Ctrl-C; no
# other daemon is touched. The writer pins itself on CPU 0 (the daemon's) and the reader on
# CPU 1 (--writer-cpu 1 --reader-cpu 0 swaps them). About 35 s; run it on a quiet machine (it
# says how much CPU other processes took meanwhile). Exits non-zero if anything fails (a
# refused share operation, a wrong checksum), but not on missed targets. --quick (a few
# seconds) is the CI smoke run.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

for a in "$@"; do
    case "$a" in
    -h | --help)
        sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    esac
done

daemon_cpu=0

# XALLOCD and SHARE name prebuilt binaries (e.g. on a machine without the crates); by default
# both are built here.
if [[ -z "${XALLOCD:-}" || -z "${SHARE:-}" ]]; then
    cargo build --release -p xalloc-daemon -p xalloc-bench
fi
xallocd="${XALLOCD:-target/release/xallocd}"
share="${SHARE:-target/release/share}"
# shellcheck source=scripts/lib/bench-daemon.sh
. scripts/lib/bench-daemon.sh
bench_daemon_start share "$daemon_cpu" 256M
name="$bench_name"
daemon_pid="$bench_daemon_pid"

start=$SECONDS
XALLOC_NAME="$name" "$share" run --daemon-pid "$daemon_pid" --daemon-cpu "$daemon_cpu" "$@"
echo
echo "bench-share: done in $((SECONDS - start)) s"
