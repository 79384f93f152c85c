# Sourced by the daemon benchmarks (bench-roundtrip.sh, bench-churn.sh, bench-scale.sh,
# bench-ab.sh): starts daemons of their own and guarantees they go away.
#
#   bench_daemon_start TAG CPU ARENA_SIZE
#
# starts `xallocd` as instance `xbench-TAG-PID` pinned on CPU, with its pidfile and log file in
# a private temporary directory, and sets `bench_name` and `bench_daemon_pid`. An EXIT trap
# (also run on Ctrl-C and SIGTERM) stops that daemon by pid (SIGTERM, then SIGKILL after 10 s),
# but only while /proc says it is a live process of this instance, so a reused pid is never
# signalled; likewise its keeper process (`xallocd keeper --name NAME`, which a daemon of the
# channel protocol stops on its way out) if it outlived the daemon; then it removes the
# instance's /dev/shm objects (those of both protocols: `.socket`, `.keeper`, `.state`, and
# `.request`, `.response`, `.arena`) and the directory, and prints the daemon's log if the
# script failed. `bench_daemon_stop` does the same at once, so that a script can run daemons
# one after another (one at a time). Set `xallocd` to the binary first. XALLOCD_FLAGS adds
# start flags (e.g. `--huge-pages`).

bench_name=""
bench_daemon_pid=""
bench_dir=""
bench_tag="bench"

# Whether $1 is a live (not zombie) process whose command line holds `--name NAME` for our
# instance, and, if $2 is given, the word $2 (e.g. `keeper`).
bench_is_ours() {
    local pid="$1" word="${2:-}" state cmd
    [[ -n "$pid" && -r "/proc/$pid/stat" ]] || return 1
    state="$(sed 's/.*) \(.\).*/\1/' "/proc/$pid/stat" 2>/dev/null)" || return 1
    [[ "$state" != "Z" ]] || return 1
    cmd="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)" || return 1
    [[ "$cmd " == *" --name $bench_name "* ]] || return 1
    [[ -z "$word" || " $cmd" == *" $word "* ]]
}

# Whether $1 is our daemon (the process the pidfile named).
bench_is_our_daemon() {
    bench_is_ours "$1"
}

# The pids of our instance's keeper processes.
bench_keeper_pids() {
    local p pid
    for p in /proc/[0-9]*; do
        pid="${p#/proc/}"
        if bench_is_ours "$pid" keeper; then
            echo "$pid"
        fi
    done
}

# Stops process $1 (SIGTERM, then SIGKILL after 10 s) while `bench_is_ours $1 $2` holds.
bench_stop_pid() {
    local pid="$1" word="${2:-}"
    bench_is_ours "$pid" "$word" || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do
        bench_is_ours "$pid" "$word" || return 0
        sleep 0.1
    done
    echo "$bench_tag: process $pid ignored SIGTERM; killing it" >&2
    kill -KILL "$pid" 2>/dev/null || true
}

# Stops the current daemon and its keeper, removes its objects and directory; prints the
# daemon's log if $1 (an exit status) is non-zero.
bench_daemon_stop() {
    local rc="${1:-0}" keeper
    if [[ -n "$bench_name" ]]; then
        bench_stop_pid "$bench_daemon_pid"
        # The daemon stops its keeper as it exits; one left over (the daemon was killed) goes.
        for keeper in $(bench_keeper_pids); do
            bench_stop_pid "$keeper" keeper
        done
        local suffix
        for suffix in socket keeper state request response arena; do
            rm -f "/dev/shm/$bench_name.$suffix"
        done
    fi
    if [[ -n "$bench_dir" ]]; then
        if [[ $rc -ne 0 && -s "$bench_dir/xallocd.log" ]]; then
            echo "$bench_tag: daemon log:" >&2
            sed 's/^/  /' "$bench_dir/xallocd.log" >&2
        fi
        rm -rf "$bench_dir"
    fi
    bench_name=""
    bench_daemon_pid=""
    bench_dir=""
}

bench_cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    bench_daemon_stop "$rc"
    exit "$rc"
}

bench_daemon_start() {
    bench_tag="bench-$1"
    local cpu="$2" arena="$3" out
    if [[ -n "$bench_name" ]]; then
        echo "$bench_tag: a daemon of this script runs already ($bench_name)" >&2
        exit 1
    fi
    bench_name="xbench-$1-$$"
    bench_dir="$(mktemp -d "${TMPDIR:-/tmp}/xbench-$1.XXXXXX")"
    trap bench_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    # The daemon's note that no syslog answers (it logs to its file) is kept for failures.
    # shellcheck disable=SC2086 # XALLOCD_FLAGS is a list of flags.
    if ! out="$(taskset -c "$cpu" "$xallocd" start --name "$bench_name" \
        --pidfile "$bench_dir/xallocd.pid" --log-file "$bench_dir/xallocd.log" \
        --syslog-socket /nonexistent --arena-size "$arena" ${XALLOCD_FLAGS:-} 2>&1)"; then
        echo "$out" >&2
        echo "$bench_tag: xallocd start failed" >&2
        exit 1
    fi
    bench_daemon_pid="$(cat "$bench_dir/xallocd.pid")"
    if ! [[ "$bench_daemon_pid" =~ ^[0-9]+$ ]] || ! bench_is_our_daemon "$bench_daemon_pid"; then
        echo "$bench_tag: no daemon behind its pidfile ($bench_daemon_pid)" >&2
        exit 1
    fi
}
