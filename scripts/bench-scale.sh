#!/usr/bin/env bash
# Throughput of one daemon with several client processes (1, 2, 4, 8, and on in powers of two
# up to the CPUs there are), each pinned on a CPU (its own while there are enough; then shared
# round robin), the daemon on CPU 0. Prints a markdown table.
#
#   scripts/bench-scale.sh [--quick] [scale run options, e.g. --clients 1,2 --seconds 5]
#
# Starts its own daemon and always removes it (scripts/lib/bench-daemon.sh). XALLOCD and SCALE
# name prebuilt binaries (for a machine without the crates); by default both are built here.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

args=()
for a in "$@"; do
    case "$a" in
    -h | --help)
        sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    --quick) args+=(--seconds 0.3) ;;
    *) args+=("$a") ;;
    esac
done

if [[ -z "${XALLOCD:-}" || -z "${SCALE:-}" ]]; then
    cargo build --release -p xalloc-daemon -p xalloc-bench
fi
xallocd="${XALLOCD:-target/release/xallocd}"
scale="${SCALE:-target/release/scale}"
# shellcheck source=scripts/lib/bench-daemon.sh
. scripts/lib/bench-daemon.sh
bench_daemon_start scale 0 256M
"$scale" run --name "$bench_name" --daemon-cpu 0 "${args[@]}"
