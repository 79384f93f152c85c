#!/usr/bin/env bash
# Routes xallocd's syslog lines to /var/log/xalloc.log: installs the rsyslog drop-in
# scripts/rsyslog-xalloc.conf as /etc/rsyslog.d/30-xalloc.conf and restarts rsyslog (starting
# it if it is not running). Needs root and rsyslog (`apt-get install rsyslog`).
#
#   sudo scripts/setup-rsyslog.sh
#   xallocd start            # then: tail -f /var/log/xalloc.log
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ $EUID -ne 0 ]]; then
    echo "setup-rsyslog.sh: run as root (it writes /etc/rsyslog.d and restarts rsyslog)" >&2
    exit 1
fi
if ! command -v rsyslogd >/dev/null; then
    echo "setup-rsyslog.sh: rsyslogd not found; install it first: apt-get install -y rsyslog" >&2
    exit 1
fi

install -D -m 0644 scripts/rsyslog-xalloc.conf /etc/rsyslog.d/30-xalloc.conf
rsyslogd -N1 >/dev/null 2>&1 || {
    echo "setup-rsyslog.sh: rsyslog rejects the configuration:" >&2
    rsyslogd -N1 >&2
    exit 1
}

# Restart through whatever manages rsyslog here: systemd, the SysV script, or nothing (a
# container), in which case rsyslogd is started directly.
if command -v systemctl >/dev/null && systemctl is-system-running >/dev/null 2>&1; then
    systemctl restart rsyslog
elif command -v service >/dev/null && [[ -x /etc/init.d/rsyslog ]]; then
    service rsyslog restart >/dev/null
else
    if [[ -f /run/rsyslogd.pid ]] && kill -0 "$(cat /run/rsyslogd.pid)" 2>/dev/null; then
        kill "$(cat /run/rsyslogd.pid)"
        for _ in $(seq 50); do
            kill -0 "$(cat /run/rsyslogd.pid 2>/dev/null)" 2>/dev/null || break
            sleep 0.1
        done
    fi
    rsyslogd
fi

for _ in $(seq 50); do
    [[ -S /dev/log ]] && break
    sleep 0.1
done
if [[ ! -S /dev/log ]]; then
    echo "setup-rsyslog.sh: rsyslog did not create /dev/log" >&2
    exit 1
fi
logger -t xalloc -p daemon.info "setup-rsyslog.sh: xalloc lines go to /var/log/xalloc.log"
echo "rsyslog routes ident 'xalloc' to /var/log/xalloc.log (drop-in /etc/rsyslog.d/30-xalloc.conf)"
