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
name="xbench-churn-$$"
dir="$(mktemp -d "${TMPDIR:-/tmp}/xbench-churn.XXXXXX")"
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
            echo "bench-churn: daemon $daemon_pid ignored SIGTERM; killing it" >&2
            kill -KILL "$daemon_pid" 2>/dev/null || true
        fi
    fi
    rm -f "/dev/shm/$name".*
    if [[ $rc -ne 0 && -s "$logfile" ]]; then
        echo "bench-churn: daemon log:" >&2
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
    --log-file "$logfile" --syslog-socket /nonexistent --arena-size 256M 2>&1)"; then
    echo "$out" >&2
    echo "bench-churn: xallocd start failed" >&2
    exit 1
fi
daemon_pid="$(cat "$pidfile")"
if ! [[ "$daemon_pid" =~ ^[0-9]+$ ]] || ! is_our_daemon "$daemon_pid"; then
    echo "bench-churn: no daemon behind pidfile $pidfile ($daemon_pid)" >&2
    exit 1
fi

start=$SECONDS
# XALLOC_THRESHOLD is cleared: churn needs the default 256 KiB threshold (it checks).
env -u XALLOC_THRESHOLD XALLOC_NAME="$name" "$churn" --daemon-pid "$daemon_pid" \
    --daemon-cpu "$daemon_cpu" --cpu "$bench_cpu" "$@"
echo
echo "bench-churn: done in $((SECONDS - start)) s"
