# Sourced by the daemon benchmarks (bench-roundtrip.sh, bench-churn.sh, bench-scale.sh): starts
# a daemon of their own and guarantees it goes away.
#
#   bench_daemon_start TAG CPU ARENA_SIZE
#
# starts `xallocd` as instance `xbench-TAG-PID` pinned on CPU, with its pidfile and log file in
# a private temporary directory, and sets `bench_name` and `bench_daemon_pid`. An EXIT trap
# (also run on Ctrl-C and SIGTERM) stops that daemon by pid (SIGTERM, then SIGKILL after 10 s),
# but only while /proc says it is a live process of this instance, so a reused pid is never
# signalled; then it removes the instance's /dev/shm objects and the directory, and prints the
# daemon's log if the script failed. Set `xallocd` to the binary first. XALLOCD_FLAGS adds
# start flags (e.g. `--huge-pages`).

bench_name=""
bench_daemon_pid=""
bench_dir=""

# Whether $1 is a live (not zombie) process whose command line names our instance.
bench_is_our_daemon() {
    local pid="$1" state
    [[ -n "$pid" && -r "/proc/$pid/stat" ]] || return 1
    state="$(sed 's/.*) \(.\).*/\1/' "/proc/$pid/stat" 2>/dev/null)" || return 1
    [[ "$state" != "Z" ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "--name $bench_name "
}

bench_cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if bench_is_our_daemon "$bench_daemon_pid"; then
        kill -TERM "$bench_daemon_pid" 2>/dev/null || true
        for _ in $(seq 100); do
            bench_is_our_daemon "$bench_daemon_pid" || break
            sleep 0.1
        done
        if bench_is_our_daemon "$bench_daemon_pid"; then
            echo "$bench_tag: daemon $bench_daemon_pid ignored SIGTERM; killing it" >&2
            kill -KILL "$bench_daemon_pid" 2>/dev/null || true
        fi
    fi
    if [[ -n "$bench_name" ]]; then
        rm -f "/dev/shm/$bench_name.request" "/dev/shm/$bench_name.response" \
            "/dev/shm/$bench_name.arena" "/dev/shm/$bench_name.state"
    fi
    if [[ -n "$bench_dir" ]]; then
        if [[ $rc -ne 0 && -s "$bench_dir/xallocd.log" ]]; then
            echo "$bench_tag: daemon log:" >&2
            sed 's/^/  /' "$bench_dir/xallocd.log" >&2
        fi
        rm -rf "$bench_dir"
    fi
    exit "$rc"
}

bench_daemon_start() {
    bench_tag="bench-$1"
    local cpu="$2" arena="$3" out
    bench_name="xbench-$1-$$"
    bench_dir="$(mktemp -d "${TMPDIR:-/tmp}/xbench-$1.XXXXXX")"
    trap bench_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    # The daemon's note that no syslog answers (it logs to its file) is kept for failures.
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
