#!/usr/bin/env bash
# The fault-injection tests at full length, printing the figures for the README's Reliability
# table:
#
#   scripts/faults.sh [CLIENT_KILLS] [DAEMON_KILLS]      # defaults 1000 and 200
#
# CI (scripts/test.sh) runs the same tests with 200 client kills and 50 daemon kills.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

client_kills="${1:-1000}"
daemon_kills="${2:-200}"
export XALLOC_FAULT_KILLS="$client_kills" XALLOC_DAEMON_KILLS="$daemon_kills"
cargo test --release -p xalloc-tests --test faults --test daemon_crash --test full_memory \
    -- --nocapture --test-threads 1 2>&1 | tee /dev/stderr | grep -oE '(FAULTS|DAEMON_CRASH) .*' || {
    echo "faults.sh: a fault test failed" >&2
    exit 1
}
