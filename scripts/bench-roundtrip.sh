#!/usr/bin/env bash
# Round-trip latency of requests to xallocd, against a unix-socket ping-pong, and the daemon's
# CPU time while idle. Prints a markdown table (see bench/src/bin/roundtrip.rs).
#
#   scripts/bench-roundtrip.sh [--quick] [roundtrip run options, e.g. --iters 5000]
#
# Builds release, starts a daemon of its own (instance xbench-rt-PID, pinned with taskset on
# CPU 0, files in a private temp dir) and always stops it by its pid and removes its segments on
# exit, also on failure or Ctrl-C; no other daemon is touched. The client pins itself on CPU 1
# (different CPUs) and CPU 0 (same CPU). Exits non-zero if anything fails, but not on missed
# latency targets. --quick (500 iterations, 2 idle seconds) is the CI smoke run.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

for a in "$@"; do
    case "$a" in
    -h | --help)
        sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
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
name="xbench-rt-$$"
dir="$(mktemp -d "${TMPDIR:-/tmp}/xbench-rt.XXXXXX")"
pidfile="$dir/xallocd.pid"
logfile="$dir/xallocd.log"
daemon_pid=""

# Whether $1 is a live (not zombie) process that is our daemon: its command line names our
# instance, so a reused pid is never signalled.
is_our_daemon() {
    local pid="$1" state
    [[ -r "/proc/$pid/stat" ]] || return 1
    state="$(sed 's/.*) \(.\).*/\1/' "/proc/$pid/stat" 2>/dev/null)" || return 1
    [[ "$state" != "Z" ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "--name $name "
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ -n "$daemon_pid" ]] && is_our_daemon "$daemon_pid"; then
        kill -TERM "$daemon_pid" 2>/dev/null || true
        for _ in $(seq 100); do
            is_our_daemon "$daemon_pid" || break
            sleep 0.1
        done
        if is_our_daemon "$daemon_pid"; then
            echo "bench-roundtrip: daemon $daemon_pid ignored SIGTERM; killing it" >&2
            kill -KILL "$daemon_pid" 2>/dev/null || true
        fi
    fi
    rm -f "/dev/shm/$name.request" "/dev/shm/$name.response" "/dev/shm/$name.arena"
    if [[ $rc -ne 0 && -s "$logfile" ]]; then
        echo "bench-roundtrip: daemon log:" >&2
        sed 's/^/  /' "$logfile" >&2
    fi
    rm -rf "$dir"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The daemon's note that no syslog answers (it logs to $logfile) is kept for failures.
if ! out="$(taskset -c "$daemon_cpu" "$xallocd" start --name "$name" --pidfile "$pidfile" \
    --log-file "$logfile" --syslog-socket /nonexistent --arena-size 64M 2>&1)"; then
    echo "$out" >&2
    echo "bench-roundtrip: xallocd start failed" >&2
    exit 1
fi
daemon_pid="$(cat "$pidfile")"
if ! [[ "$daemon_pid" =~ ^[0-9]+$ ]] || ! is_our_daemon "$daemon_pid"; then
    echo "bench-roundtrip: no daemon behind pidfile $pidfile ($daemon_pid)" >&2
    exit 1
fi

start=$SECONDS
"$roundtrip" run --name "$name" --daemon-pid "$daemon_pid" \
    --daemon-cpu "$daemon_cpu" --other-cpu "$other_cpu" "$@"
echo
echo "bench-roundtrip: done in $((SECONDS - start)) s"
