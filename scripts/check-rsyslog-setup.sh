#!/usr/bin/env bash
# Checks scripts/setup-rsyslog.sh end to end on this machine (root; changes /etc/rsyslog.d and
# restarts rsyslog): after it, a daemon started with the default syslog socket has its start
# and stop lines in /var/log/xalloc.log. Used by scripts/test.sh under CI.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup-rsyslog.sh
cargo build --quiet -p xalloc-daemon --bin xallocd
name="xt-rsyslog-setup-$$"
dir="$(mktemp -d)"
cleanup() {
    if [[ -f "$dir/pid" ]]; then
        kill -9 "$(cat "$dir/pid")" 2>/dev/null || true
        # The daemon's keeper outlives a killed daemon; `stop` tells this instance's keeper
        # to quit and removes the instance's objects.
        target/debug/xallocd stop --name "$name" --pidfile "$dir/pid" 2>/dev/null || true
    fi
    rm -f "/dev/shm/$name.socket" "/dev/shm/$name.keeper" "/dev/shm/$name.state"
    rm -rf "$dir"
}
trap cleanup EXIT

target/debug/xallocd start --name "$name" --pidfile "$dir/pid" --arena-size 1M
pid="$(cat "$dir/pid")"
target/debug/xallocd stop --name "$name" --pidfile "$dir/pid"
for _ in $(seq 100); do
    if grep -q "xalloc\[$pid\]: stopped:" /var/log/xalloc.log 2>/dev/null; then
        grep "xalloc\[$pid\]" /var/log/xalloc.log
        echo "check-rsyslog-setup: ok"
        exit 0
    fi
    sleep 0.1
done
echo "check-rsyslog-setup: the daemon's lines did not reach /var/log/xalloc.log" >&2
tail -n 20 /var/log/xalloc.log >&2 || true
exit 1
