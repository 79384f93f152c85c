#!/usr/bin/env bash
# Starts xalloc.
#
# Until the daemon (xallocd) exists, this builds and runs the firmware-style example: a
# `LockedHeap` over a static array as the global allocator, printing its statistics. Once the
# daemon lands, this script builds it (release) when needed and passes its arguments to
# `xallocd start`.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

exec cargo run --release -p xalloc-examples --bin embedded_heap -- "$@"
