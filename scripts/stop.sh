#!/usr/bin/env bash
# Stops a daemon started by scripts/start.sh: `xallocd stop` sends SIGTERM to the pid in its
# pidfile and waits until it has exited and its segments are gone.
#
#   scripts/stop.sh                 # instance "xalloc" (or $XALLOC_NAME)
#   scripts/stop.sh --name dev
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cargo build --release --quiet --manifest-path "$root/Cargo.toml" -p xalloc-daemon --bin xallocd
exec "$root/target/release/xallocd" stop "$@"
