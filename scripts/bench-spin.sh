#!/usr/bin/env bash
# How long should xallocd spin for the next request before it sleeps? For each daemon spin
# budget (`xallocd start --spin-us`), allocate+free round trips on different CPUs with a busy
# pause of 0 to 200 µs between pairs (a client that computes between requests): latency p50 and
# p99, and the share of a CPU the daemon burns. Prints one markdown table per budget.
#
#   scripts/bench-spin.sh [--quick] [--budgets 0,25,50,100,200] [--gaps 0,10,20,40,80,200]
#
# Builds release; each budget gets a daemon of its own (via scripts/bench-roundtrip.sh, pinned
# on CPU 0, client on CPU 1), always stopped by its pid, its objects removed. XALLOCD and
# ROUNDTRIP name prebuilt binaries instead (e.g. a previous build's, to compare).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

budgets=0,25,50,100,200
gaps=0,10,20,40,80,200
iters=20000
warmup=2000
while [[ $# -gt 0 ]]; do
    case "$1" in
    -h | --help)
        sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    --quick) iters=200 warmup=20 ;;
    --budgets) budgets="$2" && shift ;;
    --gaps) gaps="$2" && shift ;;
    *)
        echo "bench-spin: unknown argument $1" >&2
        exit 2
        ;;
    esac
    shift
done

if [[ -z "${XALLOCD:-}" || -z "${ROUNDTRIP:-}" ]]; then
    cargo build --release -p xalloc-daemon -p xalloc-bench
fi
for b in ${budgets//,/ }; do
    echo "### xallocd --spin-us $b"
    echo
    XALLOCD="${XALLOCD:-target/release/xallocd}" ROUNDTRIP="${ROUNDTRIP:-target/release/roundtrip}" \
        XALLOCD_FLAGS="--spin-us $b" scripts/bench-roundtrip.sh \
        --gaps "$gaps" --iters "$iters" --warmup "$warmup" | grep '^|'
    echo
done
