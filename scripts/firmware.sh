#!/usr/bin/env bash
# Builds the firmware example (examples/firmware: xalloc-core's SmallLockedHeap with the
# critical-section lock as the global allocator of a Cortex-M4F program) and runs it in QEMU's
# mps2-an386 board with semihosting. Exits 0 when every check of the firmware passed.
#
#   scripts/firmware.sh           the firmware must exit 0; then its `oom` build (an allocation
#                                 larger than the heap) must exit non-zero through its panic handler
#   scripts/firmware.sh --no-oom  the first run only
#
# Needs: the thumbv7em-none-eabihf target and qemu-system-arm (`.ci/run` installs both). Builds
# into target/firmware/ (the firmware is its own workspace, see examples/firmware/Cargo.toml).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../examples/firmware"

oom=1
case "${1:-}" in
"") ;;
--no-oom) oom=0 ;;
*)
    echo "usage: $0 [--no-oom]" >&2
    exit 2
    ;;
esac

command -v qemu-system-arm >/dev/null || {
    echo "firmware.sh: qemu-system-arm not found (Debian: apt-get install qemu-system-arm)" >&2
    exit 1
}

elf=../../target/firmware/thumbv7em-none-eabihf/debug/xalloc-firmware
timeout_s=60

# run_firmware LOG: runs the built firmware, output to the terminal and to LOG; returns its status
# (124 when it ran out of time).
run_firmware() {
    timeout "$timeout_s" qemu-system-arm -cpu cortex-m4 -machine mps2-an386 -nographic \
        -semihosting-config enable=on,target=native -kernel "$elf" </dev/null 2>&1 | tee "$1"
    return "${PIPESTATUS[0]}"
}

log="$(mktemp)"
trap 'rm -f "$log"' EXIT

echo "--- build (examples/firmware, thumbv7em-none-eabihf)"
cargo build --locked
echo "--- run (qemu-system-arm -machine mps2-an386, timeout ${timeout_s} s)"
rc=0
run_firmware "$log" || rc=$?
if ((rc == 124)); then
    echo "firmware.sh: FAILED: the firmware did not finish within ${timeout_s} s (a hang: a" \
        "deadlock, a fault loop, or SysTick never firing)" >&2
    exit 1
elif ((rc != 0)); then
    echo "firmware.sh: FAILED: the firmware exited with status $rc (its FAILED line above says" \
        "which check)" >&2
    exit "$rc"
fi
echo "firmware.sh: the firmware passed its checks (exit status 0)"

if ((oom)); then
    echo "--- build with the oom feature (must fail through the allocation error handler)"
    cargo build --locked --features oom
    echo "--- run"
    rc=0
    run_firmware "$log" || rc=$?
    if ((rc == 0)); then
        echo "firmware.sh: FAILED: the oom build exited 0; an allocation failure must exit non-zero" >&2
        exit 1
    elif ((rc == 124)); then
        echo "firmware.sh: FAILED: the oom build hung instead of exiting non-zero" >&2
        exit 1
    elif ! grep -q "memory allocation of [0-9]* bytes failed" "$log"; then
        echo "firmware.sh: FAILED: the oom build exited $rc without reporting the failed allocation" >&2
        exit 1
    fi
    echo "firmware.sh: the oom build exited $rc through the panic handler, as it must"
fi
