#!/usr/bin/env bash
# The daemon benchmarks of this checkout side by side with those of a previous commit, in one
# run: round trip (roundtrip run) and clients in parallel (scale run), each build with daemons
# of its own, alternating A and B for several rounds; then the idle-clients benchmark of this
# build. Prints markdown tables of medians and ratios new / previous (see bench/src/bin/abreport.rs).
#
#   scripts/bench-ab.sh PREV_COMMIT [--rounds N] [--clients LIST] [--seconds S] [--iters N]
#                       [--quick] [--no-idle] [--out DIR]
#   scripts/bench-ab.sh --prev-bin DIR [--new-bin DIR] [...]    (prebuilt binaries)
#
# PREV_COMMIT is checked out in a git worktree outside the repository
# (${TMPDIR:-/tmp}/xalloc-ab-SHA, reused when it is there; `git worktree remove` it when done)
# and built in release there, with its own CARGO_TARGET_DIR (the worktree's path + -target);
# its own roundtrip and scale binaries and its own xallocd are run. This checkout is built in
# release as usual. --prev-bin/--new-bin name directories that hold xallocd, roundtrip and
# scale already (e.g. to compare two experimental builds). Daemons run pinned on CPU 0 and
# clients on CPU 1 (roundtrip) or spread over the CPUs (scale); each run gets a new daemon,
# always stopped (scripts/lib/bench-daemon.sh). Defaults: 5 rounds, 20000 iterations per
# latency row, clients 1,2,4,8 for 2 s each, 1000 idle clients; about 2.5 minutes on 2 CPUs
# after the builds. --quick: 2 rounds, small counts (under a minute). The raw outputs stay in
# --out (default: a new temporary directory, named at the end). Exits non-zero if a run fails,
# not on a missed target.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

usage() {
    sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

prev_commit=""
prev_bin=""
new_bin=""
rounds=5
clients=1,2,4,8
seconds=2
iters=20000
warmup=2000
idle_secs=2
idle=1
idle_quick=()
out=""
while [[ $# -gt 0 ]]; do
    case "$1" in
    -h | --help)
        usage
        exit 0
        ;;
    --rounds) rounds="$2" && shift ;;
    --clients) clients="$2" && shift ;;
    --seconds) seconds="$2" && shift ;;
    --iters) iters="$2" && warmup=$(($2 / 10)) && shift ;;
    --quick) rounds=2 clients=1,2 seconds=0.3 iters=500 warmup=50 idle_secs=1 idle_quick=(--quick) ;;
    --no-idle) idle=0 ;;
    --out) out="$2" && shift ;;
    --prev-bin) prev_bin="$2" && shift ;;
    --new-bin) new_bin="$2" && shift ;;
    -*)
        echo "bench-ab: unknown option $1" >&2
        exit 2
        ;;
    *)
        if [[ -n "$prev_commit" ]]; then
            echo "bench-ab: one PREV_COMMIT only" >&2
            exit 2
        fi
        prev_commit="$1"
        ;;
    esac
    shift
done
if [[ -z "$prev_commit" && -z "$prev_bin" ]]; then
    usage >&2
    exit 2
fi

new_label="$(git rev-parse --short HEAD)"
if [[ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]]; then
    new_label="$new_label+changes"
fi
if [[ -z "$new_bin" ]]; then
    cargo build --release -p xalloc-daemon -p xalloc-bench
    new_bin="${CARGO_TARGET_DIR:-target}/release"
else
    new_label="$new_bin"
fi

if [[ -z "$prev_bin" ]]; then
    sha="$(git rev-parse --verify "$prev_commit^{commit}")"
    prev_label="$(git rev-parse --short "$sha")"
    worktree="${TMPDIR:-/tmp}/xalloc-ab-${sha:0:12}"
    if [[ -d "$worktree" ]]; then
        if [[ "$(git -C "$worktree" rev-parse HEAD 2>/dev/null)" != "$sha" ]]; then
            echo "bench-ab: $worktree exists but is not a checkout of $sha" >&2
            exit 1
        fi
    else
        git worktree add --detach "$worktree" "$sha" >&2
    fi
    echo "bench-ab: building $prev_label in $worktree" >&2
    (cd "$worktree" && CARGO_TARGET_DIR="$worktree-target" \
        cargo build --release -p xalloc-daemon -p xalloc-bench)
    prev_bin="$worktree-target/release"
else
    prev_label="$prev_bin"
fi

for b in "$prev_bin" "$new_bin"; do
    for exe in xallocd roundtrip scale; do
        if [[ ! -x "$b/$exe" ]]; then
            echo "bench-ab: no $exe in $b" >&2
            exit 1
        fi
    done
done
abreport="$new_bin/abreport"
[[ -x "$abreport" ]] || abreport="${CARGO_TARGET_DIR:-target}/release/abreport"

if [[ -z "$out" ]]; then
    out="$(mktemp -d "${TMPDIR:-/tmp}/xbench-ab.XXXXXX")"
else
    mkdir -p "$out"
fi

# shellcheck source=scripts/lib/bench-daemon.sh
. scripts/lib/bench-daemon.sh

# The directory of build $1 (prev or new).
bin_of() {
    if [[ "$1" == prev ]]; then echo "$prev_bin"; else echo "$new_bin"; fi
}

# `roundtrip run` of build $2 in round $1, with a daemon of that build.
run_rt() {
    local round="$1" build="$2" bin extra=()
    bin="$(bin_of "$build")"
    # A roundtrip that knows the idle-clients part skips it here: it runs once, below.
    if "$bin/roundtrip" --help 2>/dev/null | grep -q -- --idle-clients; then
        extra=(--idle-clients 0)
    fi
    xallocd="$bin/xallocd"
    bench_daemon_start "ab-rt-$build" 0 64M
    "$bin/roundtrip" run --name "$bench_name" --daemon-pid "$bench_daemon_pid" \
        --daemon-cpu 0 --other-cpu 1 --iters "$iters" --warmup "$warmup" \
        --idle-secs "$idle_secs" "${extra[@]}" >"$out/rt.$round.$build.md"
    bench_daemon_stop
}

# `scale run` of build $2 in round $1.
run_scale() {
    local round="$1" build="$2" bin
    bin="$(bin_of "$build")"
    xallocd="$bin/xallocd"
    bench_daemon_start "ab-scale-$build" 0 256M
    "$bin/scale" run --name "$bench_name" --daemon-cpu 0 --clients "$clients" \
        --seconds "$seconds" >"$out/scale.$round.$build.md"
    bench_daemon_stop
}

start=$SECONDS
{
    echo "bench-ab: $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs," \
        "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    echo "bench-ab: prev = $prev_label ($prev_bin), new = $new_label ($new_bin)"
    echo "bench-ab: load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "$out/environment.txt" >&2
for round in $(seq "$rounds"); do
    # prev first in odd rounds, new first in even ones.
    order=(prev new)
    if ((round % 2 == 0)); then order=(new prev); fi
    for build in "${order[@]}"; do
        echo "bench-ab: round $round of $rounds: roundtrip, $build" >&2
        run_rt "$round" "$build"
    done
    for build in "${order[@]}"; do
        echo "bench-ab: round $round of $rounds: scale, $build" >&2
        run_scale "$round" "$build"
    done
done
echo "bench-ab: load average at the end of the rounds: $(cut -d' ' -f1-3 /proc/loadavg)" |
    tee -a "$out/environment.txt" >&2

"$abreport" "$out" --prev "$prev_label" --new "$new_label" | tee "$out/report.md"

if [[ "$idle" == 1 ]]; then
    if "$new_bin/roundtrip" --help 2>/dev/null | grep -q -- idle-clients; then
        echo "bench-ab: idle clients, new build" >&2
        xallocd="$new_bin/xallocd"
        bench_daemon_start ab-idle 0 64M
        echo
        "$new_bin/roundtrip" idle-clients --name "$bench_name" \
            --daemon-pid "$bench_daemon_pid" --daemon-cpu 0 --other-cpu 1 \
            --rounds "$rounds" --iters "$iters" --warmup "$warmup" "${idle_quick[@]}" |
            tee "$out/idle.new.md"
        bench_daemon_stop
    else
        echo "bench-ab: $new_bin/roundtrip has no idle-clients part; skipped" >&2
    fi
fi
echo
echo "bench-ab: done in $((SECONDS - start)) s; raw outputs in $out"
