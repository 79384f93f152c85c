#!/usr/bin/env bash
# Builds xallocd (release) when its sources changed, then runs `xallocd start` with the given
# arguments: the daemon detaches, and this returns once it serves (exit 0) or with its error.
#
#   scripts/start.sh                         # instance "xalloc", 256 MiB arena
#   scripts/start.sh --name dev --arena-size 1G
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Cargo rebuilds only what changed; quiet unless it fails.
cargo build --release --quiet --manifest-path "$root/Cargo.toml" -p xalloc-daemon --bin xallocd
exec "$root/target/release/xallocd" start "$@"
