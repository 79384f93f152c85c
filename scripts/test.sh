#!/usr/bin/env bash
# Runs every check CI runs, in order, stopping at the first failure and naming the step.
#
#   scripts/test.sh        every step
#   scripts/test.sh miri   only the Miri steps (which the full run starts in the background)
#
# Needs: stable Rust with clippy and rustfmt, the thumbv7em-none-eabihf and thumbv6m-none-eabi
# targets, nightly with miri, cargo-fuzz, rsyslog, qemu-system-arm, make, gcc, g++, binutils,
# pkg-config and python3 (`.ci/run` installs all of them). Some multi-process tests need root (other users, a private mount
# namespace); under CI they fail rather than skip without it. Every test daemon has its own
# instance name, and everything it creates is removed. With CI=true (as root), it also runs
# scripts/setup-rsyslog.sh against the system's rsyslog and checks that a daemon's lines reach
# /var/log/xalloc.log.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

step_name=""
on_exit() {
    local rc=$?
    if [[ $rc -ne 0 && -n "$step_name" ]]; then
        echo >&2
        echo "scripts/test.sh: FAILED at step: $step_name (exit $rc)" >&2
    fi
}
trap on_exit EXIT

# Miri interprets on one core for about ten minutes. The full run starts it in the background
# after the multi-process tests (which time spin hand-offs and want both cores), beside the
# build and emulation steps that follow (their own target directories, so no build lock is
# shared), and waits for it before the benchmark smokes, which time hand-offs too. The Miri
# steps: the unit, property and doc tests under Stacked Borrows, strict provenance. The test
# that installs LockedHeap as the global allocator runs under Tree Borrows: Stacked Borrows
# gives a `Box<u8>` a tag covering one byte, so the 8 bytes of free-list links that any in-band
# allocator writes into the freed block would be flagged even through the owner's own pointer.
# Then the protocol's shared-memory types (concurrent header rewrites, ledger hand-offs, the
# slot cycle between threads): a plain read racing a write would be flagged. The OS layer's
# tests make system calls Miri does not model, so only `wire` runs.
miri_steps() {
    MIRIFLAGS=-Zmiri-strict-provenance step "miri (stacked borrows)" \
        cargo +nightly miri test -p xalloc-core --lib --test shadow --test checked_free \
        --test alignment --test realloc_slack_attacks
    MIRIFLAGS=-Zmiri-strict-provenance step "miri (protocol layout)" \
        cargo +nightly miri test -p xalloc-proto --lib wire::
    MIRIFLAGS=-Zmiri-strict-provenance step "miri (doc tests)" \
        cargo +nightly miri test -p xalloc-core --doc
    MIRIFLAGS="-Zmiri-strict-provenance -Zmiri-tree-borrows" \
        step "miri (tree borrows, global allocator)" \
        cargo +nightly miri test -p xalloc-core --test global_alloc
}

step() {
    step_name="$1"
    shift
    echo
    echo "=== $step_name: $* ==="
    "$@"
}

case "${1:-}" in
    "") ;;
    miri)
        miri_steps
        step_name=""
        echo "scripts/test.sh miri: all steps passed"
        exit 0
        ;;
    *)
        echo "usage: scripts/test.sh [miri]" >&2
        exit 2
        ;;
esac

step "format" cargo fmt --all --check
# The two firmware crates are workspaces of their own (thumbv7em targets, their own profiles).
for crate in examples/firmware bench/code-size; do
    step "format ($crate)" cargo fmt --manifest-path "$crate/Cargo.toml" --check
done
step "clippy" cargo clippy --workspace --all-targets -- -D warnings
step "clippy (C library's interposer)" cargo clippy -p xalloc-c --features interpose -- -D warnings
step "clippy (core, critical-section lock)" \
    cargo clippy -p xalloc-core --features critical-section --all-targets -- -D warnings
# The configuration built for code size (feature `small-code`; core/src/lib.rs, "Code size").
step "clippy (core, small-code)" \
    cargo clippy -p xalloc-core --features critical-section,small-code --all-targets -- -D warnings
RUSTDOCFLAGS=-Dwarnings step "docs" cargo doc --workspace --no-deps
# Without a lock there is no LockedHeap: the core's docs must still build (thumbv6m's view).
RUSTDOCFLAGS=-Dwarnings step "docs (core without a lock)" \
    cargo doc -p xalloc-core --no-deps --no-default-features
# The seed's build (root Makefile): the C library, ./xalloc and the C examples, warnings as
# errors. The C library's tests (tests/tests/c_library.rs) run make themselves too.
step "C library (make)" make -s all examples
step "tests" cargo test --workspace
# The Miri steps, in the background (see `miri_steps`), in a session of their own so that a
# failure elsewhere stops them with everything they started.
miri_log="$(mktemp)"
setsid --wait bash "${BASH_SOURCE[0]}" miri >"$miri_log" 2>&1 &
miri_pid=$!
echo
echo "=== miri: started in the background (pid $miri_pid, log $miri_log) ==="
stop_miri() {
    if [[ -n "$miri_pid" ]]; then
        kill -- "-$miri_pid" 2>/dev/null || true
    fi
    rm -f "$miri_log"
}
trap 'on_exit; stop_miri' EXIT
step "no_std build" cargo build -p xalloc-core --target thumbv7em-none-eabihf
# The critical-section lock: on Cortex-M4F, and on Cortex-M0/M0+, which has no compare-and-swap
# (and so no spin lock); then the firmware example on an emulated Cortex-M4 board (QEMU).
step "no_std build (critical-section)" \
    cargo build -p xalloc-core --target thumbv7em-none-eabihf --features critical-section
step "no_std build (thumbv6m, critical-section)" \
    cargo build -p xalloc-core --target thumbv6m-none-eabi --features critical-section
step "no_std build (thumbv6m, heaps without a lock)" \
    cargo build -p xalloc-core --target thumbv6m-none-eabi --no-default-features
step "tests (critical-section lock)" \
    cargo test -p xalloc-core --features critical-section --test locked_heap --test global_alloc
# Unit, shadow (proptest) and lock tests of the code-size configuration, and its no_std builds.
step "tests (core, small-code)" cargo test -p xalloc-core --features small-code
step "no_std build (thumbv6m, critical-section, small-code)" \
    cargo build -p xalloc-core --target thumbv6m-none-eabi --features critical-section,small-code
step "firmware in QEMU (mps2-an386)" bash scripts/firmware.sh
# The code-size table of the README, and its target: `SmallLockedHeap` with `small-code` is no
# larger than rlsf.
step "code size (thumbv7em firmware)" bash scripts/code-size.sh --check
# The slot protocol under loom, in its own target directory so that the --cfg loom build does
# not evict the normal one.
RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=3 CARGO_TARGET_DIR=target/loom step "loom" \
    cargo test -p xalloc-proto --test loom_wire --release
# The fuzz targets (fuzz/, nightly, cargo-fuzz): every input of the committed corpus once, then
# a short run of each; new inputs go to a scratch directory, not into the repository.
fuzz_scratch="$(mktemp -d)"
for target in core_heap daemon_requests; do
    mkdir -p "$fuzz_scratch/$target"
    step "fuzz $target (corpus replay)" \
        cargo +nightly fuzz run --fuzz-dir fuzz "$target" "fuzz/corpus/$target" -- -runs=0
    step "fuzz $target (20 s)" \
        cargo +nightly fuzz run --fuzz-dir fuzz "$target" "$fuzz_scratch/$target" \
        "fuzz/corpus/$target" -- -max_total_time=20
done
rm -rf "$fuzz_scratch"
# The Miri steps' output, once they are done; their failing step is named at the end of it.
step_name="miri (background; its output above)"
echo
echo "=== miri: waiting for the background steps ==="
miri_rc=0
wait "$miri_pid" || miri_rc=$?
miri_pid=""
cat "$miri_log"
if ((miri_rc != 0)); then
    exit "$miri_rc"
fi
if [[ "${CI:-}" == "true" ]]; then
    step "rsyslog set-up (CI only: changes /etc/rsyslog.d)" bash scripts/check-rsyslog-setup.sh
fi
step "bench smoke" bash scripts/bench.sh --quick
step "bench smoke (region over seeds)" bash scripts/bench.sh --quick --region-seeds 2
step "bench smoke (daemon round trip)" bash scripts/bench-roundtrip.sh --quick
step "bench smoke (large-block churn)" bash scripts/bench-churn.sh --quick
step "bench smoke (share handles)" bash scripts/bench-share.sh --quick
step "bench smoke (clients scaling)" bash scripts/bench-scale.sh --quick
step "bench smoke (C library)" bash scripts/bench-c.sh --quick
step "bench smoke (spin budgets)" bash scripts/bench-spin.sh --quick --budgets 0,50 --gaps 0,100
# The A/B script, this build against itself (no worktree build): it must keep working.
step "bench smoke (A/B script)" bash scripts/bench-ab.sh --prev-bin target/release \
    --new-bin target/release --quick --no-idle

step_name=""
echo
echo "scripts/test.sh: all steps passed"
