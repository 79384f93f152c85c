#!/usr/bin/env bash
# Round-trip latency of requests to xallocd, against a unix-socket ping-pong, the daemon's CPU
# time while idle, then the same with 1000 idle clients connected: the daemon's CPU time, and
# one client's round trip with and without them. Prints markdown tables (see
# bench/src/bin/roundtrip.rs).
#
#   scripts/bench-roundtrip.sh [--quick] [roundtrip run options, e.g. --iters 5000]
#
# Builds release, starts a daemon of its own (instance xbench-rt-PID, pinned with taskset on
# CPU 0, files in a private temp dir) and always stops it by its pid and removes its objects on
# exit, also on failure or Ctrl-C; no other daemon is touched. The client pins itself on CPU 1
# (different CPUs) and CPU 0 (same CPU). About 25 s. Exits non-zero if anything fails, but not
# on missed latency targets. --quick (500 iterations, 2 idle seconds, 50 idle clients) is the
# CI smoke run; --idle-clients 0 skips the idle clients.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

for a in "$@"; do
    case "$a" in
    -h | --help)
        sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    esac
done

daemon_cpu=0
other_cpu=1

# XALLOCD and ROUNDTRIP name prebuilt binaries (e.g. on a machine without the crates); by
# default both are built here.
if [[ -z "${XALLOCD:-}" || -z "${ROUNDTRIP:-}" ]]; then
    cargo build --release -p xalloc-daemon -p xalloc-bench
fi
xallocd="${XALLOCD:-target/release/xallocd}"
roundtrip="${ROUNDTRIP:-target/release/roundtrip}"
# shellcheck source=scripts/lib/bench-daemon.sh
. scripts/lib/bench-daemon.sh
bench_daemon_start rt "$daemon_cpu" 64M
name="$bench_name"
daemon_pid="$bench_daemon_pid"

start=$SECONDS
"$roundtrip" run --name "$name" --daemon-pid "$daemon_pid" \
    --daemon-cpu "$daemon_cpu" --other-cpu "$other_cpu" "$@"
echo
echo "bench-roundtrip: done in $((SECONDS - start)) s"
