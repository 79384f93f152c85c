#!/usr/bin/env bash
# The C library's benchmarks, as markdown tables of medians and ratios:
#  1. small-object churn (bench/c/small_churn.c: 8 threads, malloc/free of 16-512 B), run
#     alternately plain and under LD_PRELOAD=lib/libxalloc.so; target: within 1.05x;
#  2. large-block churn (bench/c/large_churn.c: alloc, touch every 4 KiB, free at 256 KiB to
#     64 MiB) through xalloc_malloc (lib/libxalloc.a) and through malloc under LD_PRELOAD, each
#     against glibc and mimalloc in the same process, next to XallocGlobal's ratios from
#     target/release/churn run against the same daemon; target: the same ratios.
#
#   scripts/bench-c.sh [--quick] [--rounds N] [--ops N] [--iters N]
#
# --quick: the CI smoke run (about 10-15 s). --rounds, --ops: interleaved rounds (default 7,
# quick 2) and malloc/free pairs per run (default 40000000, quick 4000000) of the small churn;
# --iters: large-churn iterations at every size (default per size as churn.rs).
#
# Builds the library (make -s lib), xallocd and churn (cargo, release), and bench/c/*.c with
# -O2 into a temporary directory (mimalloc from the sources cargo vendored for the
# libmimalloc-sys crate). Starts a daemon of its own (instance xbench-c-PID, --arena-size 256M,
# pinned on CPU 0, see scripts/lib/bench-daemon.sh) and always stops it, also on failure; the
# benchmarks run on CPU 1. Exits non-zero on any error, above all if an xalloc subject's block
# was not the arena's; missed targets do not fail the run.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

usage() {
    # The comment block at the top of this file.
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
}

quick=0
rounds=""
ops=""
iters=""
positive() {
    if ! [[ "${2:-}" =~ ^[1-9][0-9]*$ ]]; then
        echo "bench-c: $1 needs a positive number" >&2
        exit 64
    fi
}
while [[ $# -gt 0 ]]; do
    case "$1" in
    -h | --help)
        usage
        exit 0
        ;;
    --quick) quick=1 ;;
    --rounds | --ops | --iters)
        positive "$1" "${2:-}"
        case "$1" in
        --rounds) rounds="$2" ;;
        --ops) ops="$2" ;;
        --iters) iters="$2" ;;
        esac
        shift
        ;;
    *)
        echo "bench-c: unknown argument $1" >&2
        usage >&2
        exit 64
        ;;
    esac
    shift
done
if [[ $quick -eq 1 ]]; then
    rounds="${rounds:-2}"
    ops="${ops:-4000000}"
else
    rounds="${rounds:-7}"
    ops="${ops:-40000000}"
fi
threads=8
window=1000
daemon_cpu=0
bench_cpu=1
start=$SECONDS

# ---------------------------------------------------------------------------------------------
# Build.

make -s lib
cargo build --release -p xalloc-daemon -p xalloc-bench
xallocd=target/release/xallocd
churn=target/release/churn
preload="$PWD/lib/libxalloc.so"

# mimalloc's C sources as cargo vendored them for libmimalloc-sys (which the `mimalloc` crate
# of bench/Cargo.toml builds): v3 unless the crate's `v2` feature is on (it is not), v2 or the
# older flat layout as fallbacks.
metadata="$(cargo metadata --format-version 1 --offline 2>/dev/null ||
    cargo metadata --format-version 1)"
mi_manifest="$(grep -m 1 -o '"manifest_path":"[^"]*/libmimalloc-sys-[0-9][^"]*/Cargo.toml"' \
    <<<"$metadata" | sed 's/^"manifest_path":"//; s/"$//')"
if [[ -z "$mi_manifest" ]]; then
    echo "bench-c: no libmimalloc-sys package in cargo metadata (run cargo fetch?)" >&2
    exit 1
fi
mi_src=""
for d in c_src/mimalloc/v3 c_src/mimalloc/v2 c_src/mimalloc; do
    if [[ -f "$(dirname "$mi_manifest")/$d/src/static.c" ]]; then
        mi_src="$(dirname "$mi_manifest")/$d"
        break
    fi
done
if [[ -z "$mi_src" ]]; then
    echo "bench-c: no mimalloc sources (src/static.c) under $(dirname "$mi_manifest")/c_src" >&2
    exit 1
fi

# The daemon first: bench_daemon_start sets an EXIT trap of its own (which stops the daemon),
# so ours, which also removes the temporary directory, is set after it.
# shellcheck source=scripts/lib/bench-daemon.sh
. scripts/lib/bench-daemon.sh
bench_daemon_start c "$daemon_cpu" 256M
name="$bench_name"
daemon_pid="$bench_daemon_pid"
work="$(mktemp -d "${TMPDIR:-/tmp}/xbench-c-build.XXXXXX")"
mi_job=""
on_exit() {
    local rc=$?
    trap - EXIT INT TERM
    # A compile still running in the background writes into $work: it ends first.
    if [[ -n "$mi_job" ]]; then
        wait "$mi_job" 2>/dev/null || true
    fi
    rm -rf "$work"
    bench_daemon_stop "$rc"
    exit "$rc"
}
trap on_exit EXIT

# The same flags as libmimalloc-sys's build.rs in release: no MI_MALLOC_OVERRIDE, so the
# object defines mi_* names only and never replaces malloc (checked below).
cc -O2 -DNDEBUG -DMI_DEBUG=0 -DMI_BUILD_RELEASE -ftls-model=initial-exec \
    -I"$mi_src/include" -I"$mi_src/src" -c "$mi_src/src/static.c" -o "$work/mimalloc.o" &
mi_job=$!
# The warnings of the root Makefile's WARN, which every C file of the repository is held to.
warn=(-std=c99 -Wall -Wextra -Werror -pedantic)
cc "${warn[@]}" -O2 -pthread -o "$work/small_churn" bench/c/small_churn.c -ldl
wait "$mi_job"
mi_job=""
if nm "$work/mimalloc.o" | grep -Eq ' [TWD] (malloc|free|calloc|realloc)$'; then
    echo "bench-c: the mimalloc object defines malloc itself (MI_MALLOC_OVERRIDE?)" >&2
    exit 1
fi
cc "${warn[@]}" -O2 -Ilib -o "$work/large_churn" \
    bench/c/large_churn.c "$work/mimalloc.o" lib/libxalloc.a \
    -lgcc_s -lutil -lrt -lpthread -lm -ldl -lc

# Every program runs on CPU 1 against our daemon, with the default threshold.
on_cpu() {
    env -u XALLOC_THRESHOLD -u LD_PRELOAD XALLOC_NAME="$name" taskset -c "$bench_cpu" "$@"
}

# ---------------------------------------------------------------------------------------------
# 1. Small-object churn, plain and under LD_PRELOAD, interleaved (the order alternates).

echo "bench-c: small-object churn, $rounds rounds of $ops malloc/free in $threads threads" >&2
small=()
for ((r = 1; r <= rounds; r++)); do
    if ((r % 2)); then order="plain preload"; else order="preload plain"; fi
    for mode in $order; do
        args=(--threads "$threads" --ops "$ops" --window "$window")
        if [[ $mode == preload ]]; then
            cmd=(env LD_PRELOAD="$preload" "$work/small_churn" "${args[@]}" --expect-preload)
        else
            cmd=("$work/small_churn" "${args[@]}")
        fi
        if ! out="$(on_cpu "${cmd[@]}")"; then
            echo "bench-c: small_churn ($mode) failed" >&2
            exit 1
        fi
        ns="$(awk '$1 == "elapsed_ns" { print $2 }' <<<"$out")"
        if ! [[ "$ns" =~ ^[0-9]+$ ]]; then
            echo "bench-c: small_churn ($mode) printed no time: $out" >&2
            exit 1
        fi
        small+=("$r $mode $ns")
    done
done

# ---------------------------------------------------------------------------------------------
# 2. Large-block churn: XallocGlobal (churn), the C API, malloc under LD_PRELOAD.

quick_flag=()
[[ $quick -eq 1 ]] && quick_flag=(--quick)
iters_flag=()
[[ -n "$iters" ]] && iters_flag=(--iters "$iters")

echo "bench-c: large-block churn: XallocGlobal (target/release/churn)" >&2
# churn pins itself on --cpu and checks the daemon's pin; jemalloc and the floor are left out.
if ! churn_out="$(env -u XALLOC_THRESHOLD -u LD_PRELOAD XALLOC_NAME="$name" "$churn" \
    --daemon-pid "$daemon_pid" --daemon-cpu "$daemon_cpu" --cpu "$bench_cpu" \
    --only glibc,mimalloc,xalloc "${quick_flag[@]}" "${iters_flag[@]}")"; then
    echo "bench-c: churn failed" >&2
    exit 1
fi
echo "bench-c: large-block churn: C API (lib/libxalloc.a)" >&2
if ! capi_out="$(on_cpu "$work/large_churn" --daemon-pid "$daemon_pid" \
    "${quick_flag[@]}" "${iters_flag[@]}")"; then
    echo "bench-c: large_churn (C API) failed" >&2
    exit 1
fi
echo "bench-c: large-block churn: malloc under LD_PRELOAD=lib/libxalloc.so" >&2
if ! preload_out="$(on_cpu env LD_PRELOAD="$preload" "$work/large_churn" --preload \
    --daemon-pid "$daemon_pid" "${quick_flag[@]}" "${iters_flag[@]}")"; then
    echo "bench-c: large_churn (LD_PRELOAD) failed" >&2
    exit 1
fi

# ---------------------------------------------------------------------------------------------
# Report.

echo "## Small-object churn under LD_PRELOAD (instance $name, daemon pid $daemon_pid on CPU $daemon_cpu; benchmark on CPU $bench_cpu)"
echo
printf '%s\n' "${small[@]}" | awk -v ops="$ops" -v threads="$threads" -v window="$window" \
    -v rounds="$rounds" '
function median(a, n,    i, j, t) {
    for (i = 2; i <= n; i++) {
        t = a[i]
        for (j = i - 1; j >= 1 && a[j] > t; j--) a[j + 1] = a[j]
        a[j + 1] = t
    }
    return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
}
{
    if ($2 == "plain") { p[++np] = $3; byround[$1, "plain"] = $3 }
    else { q[++nq] = $3; byround[$1, "preload"] = $3 }
}
END {
    mp = median(p, np); mq = median(q, nq); r = mq / mp
    printf "%d threads on one CPU, %d malloc/free pairs in all of 16-512 B (random, fixed seed), a window of %d live blocks per thread, one byte written into each; %d rounds, plain and preloaded in alternating order; median of the elapsed times:\n\n", threads, ops, window, rounds
    print "| run | median ms | ns per malloc/free pair | min ms | max ms |"
    print "|---|---:|---:|---:|---:|"
    printf "| plain (glibc) | %.1f | %.1f | %.1f | %.1f |\n", mp / 1e6, mp / ops, p[1] / 1e6, p[np] / 1e6
    printf "| LD_PRELOAD=lib/libxalloc.so | %.1f | %.1f | %.1f | %.1f |\n", mq / 1e6, mq / ops, q[1] / 1e6, q[nq] / 1e6
    per = ""
    for (i = 1; i <= rounds; i++) per = per sprintf("%s%.3f", i > 1 ? ", " : "", byround[i, "preload"] / byround[i, "plain"])
    printf "\nLD_PRELOAD ÷ plain per round: %s.\n\n", per
    print "| target | measured | result |"
    print "|---|---|---|"
    printf "| small-object churn under LD_PRELOAD within 1.05× of plain glibc | %.3f× | %s |\n", r, r <= 1.05 ? "met" : "missed"
}'
echo

echo "## Large-block churn through the C library (alloc, touch every 4 KiB, free; instance $name, daemon pid $daemon_pid on CPU $daemon_cpu; benchmark on CPU $bench_cpu)"
echo
{
    awk '{ print "capi", $0 }' <<<"$capi_out"
    awk '{ print "preload", $0 }' <<<"$preload_out"
    awk '{ print "churn", $0 }' <<<"$churn_out"
} | awk '
function label(b) { return b >= 1048576 ? (b / 1048576) " MiB" : (b / 1024) " KiB" }
function bytes(n, u) { return u == "MiB" ? n * 1048576 : n * 1024 }
function us(v) { v += 0; return v >= 100 ? sprintf("%.0f", v) : v >= 10 ? sprintf("%.1f", v) : sprintf("%.2f", v) }
function cell(v) { sub(/^ +/, "", v); sub(/ +$/, "", v); return v }
function subject(name) { return name == "XallocGlobal" || name == "capi" || name == "preload" ? "x" : name }
function ratio_cell(r) { return sprintf(r >= 100 ? " %.0f× |" : " %.2f× |", r) }
# large_churn: "row BYTES SUBJECT MEDIAN P90 ALLOC TOUCH FREE FAULTS FIRST".
$2 == "row" {
    run = $1; s = $3; subj = subject($4)
    med[run, s, subj] = $5 + 0; p90[run, s, subj] = $6 + 0
    alloc[run, s, subj] = $7 + 0; tch[run, s, subj] = $8 + 0; rel[run, s, subj] = $9 + 0
    faults[run, s, subj] = $10 + 0
    if (!(s in seen)) { seen[s] = 1; sizes[++ns] = s }
    next
}
$2 == "size" { iters[$3] = $5; next }
# churn prints two tables; a header names the columns of the rows below it:
#   "| size | iterations | glibc | mimalloc | ... |", rows "| 256 KiB | 2000 (+200 warm-up) |
#   0.10 (0.11) | ...": medians and p90 per subject;
#   "| size | allocator | median µs | ... | alloc µs | touch µs | free µs | faults | ...", rows
#   "| 256 KiB | glibc | 0.10 | ...": phases and faults per subject.
$1 == "churn" && /^churn \| size \|/ {
    table = $0 ~ /\| iterations \|/ ? 1 : $0 ~ /\| allocator \|/ ? 2 : 0
    n = split(substr($0, 7), h, "|")
    for (i = 1; i <= n; i++) col[table, cell(h[i])] = i
    next
}
$1 == "churn" && table && /^churn \| [0-9]+ (KiB|MiB) \|/ {
    split(substr($0, 7), c, "|"); split(cell(c[2]), sz, " "); s = bytes(sz[1], sz[2])
    if (table == 1) {
        for (name in want) {
            if (!((1, name) in col)) continue
            split(cell(c[col[1, name]]), vp, " ")
            if (vp[1] !~ /^[0-9.]+$/) continue
            gsub(/[()]/, "", vp[2])
            med["churn", s, subject(name)] = vp[1] + 0; p90["churn", s, subject(name)] = vp[2] + 0
        }
    } else if (cell(c[3]) in want) {
        subj = subject(cell(c[3]))
        alloc["churn", s, subj] = cell(c[col[2, "alloc µs"]]) + 0
        tch["churn", s, subj] = cell(c[col[2, "touch µs"]]) + 0
        rel["churn", s, subj] = cell(c[col[2, "free µs"]]) + 0
        faults["churn", s, subj] = cell(c[col[2, "faults"]]) + 0
    }
    next
}
$1 == "churn" && !/^churn \|/ { table = 0 }
BEGIN { want["glibc"]; want["mimalloc"]; want["XallocGlobal"] }
END {
    nr = split("capi preload churn", runs, " ")
    title["capi"] = "xalloc_malloc (C API)"
    title["preload"] = "malloc via LD_PRELOAD"
    title["churn"] = "XallocGlobal (churn)"
    short["capi"] = "C API"; short["preload"] = "LD_PRELOAD"; short["churn"] = "XallocGlobal"
    bad = 0
    for (k = 1; k <= ns; k++) for (j = 1; j <= nr; j++) for (m = 1; m <= 3; m++) {
        sb = m == 1 ? "glibc" : m == 2 ? "mimalloc" : "x"
        if (!((runs[j], sizes[k], sb) in med) || med[runs[j], sizes[k], sb] <= 0 || !((runs[j], sizes[k], sb) in tch)) {
            printf "bench-c: no %s numbers at %s in the %s run\n", sb, label(sizes[k]), runs[j] > "/dev/stderr"
            bad = 1
        }
    }
    if (ns == 0 || bad) { print "bench-c: incomplete results" > "/dev/stderr"; exit 1 }

    print "Ratios of medians, glibc ÷ x and mimalloc ÷ x (above 1: x is faster). Each x ran round-robin with glibc and mimalloc in a process of its own (XallocGlobal: target/release/churn against the same daemon, one after the other):\n"
    hdr = "| size |"; sep = "|---|"
    for (m = 1; m <= 2; m++) for (j = 1; j <= nr; j++) {
        hdr = hdr sprintf(" %s ÷ %s |", m == 1 ? "glibc" : "mimalloc", short[runs[j]]); sep = sep "---:|"
    }
    print hdr; print sep
    for (k = 1; k <= ns; k++) {
        s = sizes[k]; line = "| " label(s) " |"
        for (m = 1; m <= 2; m++) for (j = 1; j <= nr; j++) {
            base = m == 1 ? "glibc" : "mimalloc"
            ratio[runs[j], s, base] = med[runs[j], s, base] / med[runs[j], s, "x"]
            line = line ratio_cell(ratio[runs[j], s, base])
        }
        print line
    }

    print "\nMedian µs per iteration (p90 in parentheses) of x, the medians of its phases, its mean page faults per iteration, and the medians of the glibc and mimalloc it ran with:\n"
    print "| size | iterations | x | x µs | alloc µs | touch µs | free µs | faults | glibc µs | mimalloc µs |"
    print "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"
    for (k = 1; k <= ns; k++) for (j = 1; j <= nr; j++) {
        s = sizes[k]; run = runs[j]
        printf "| %s | %s | %s | %s (%s) | %s | %s | %s | %.2f | %s (%s) | %s (%s) |\n", label(s), iters[s], \
            title[run], us(med[run, s, "x"]), us(p90[run, s, "x"]), us(alloc[run, s, "x"]), \
            us(tch[run, s, "x"]), us(rel[run, s, "x"]), faults[run, s, "x"], \
            us(med[run, s, "glibc"]), us(p90[run, s, "glibc"]), us(med[run, s, "mimalloc"]), \
            us(p90[run, s, "mimalloc"])
    }

    print "\n| target | measured per size | result |"
    print "|---|---|---|"
    for (j = 1; j <= 2; j++) {
        run = runs[j]; parts = ""; all = 1
        for (k = 1; k <= ns; k++) {
            s = sizes[k]
            # Judged on the printed (rounded) values.
            g = sprintf("%.2f", ratio[run, s, "glibc"] / ratio["churn", s, "glibc"])
            mi = sprintf("%.2f", ratio[run, s, "mimalloc"] / ratio["churn", s, "mimalloc"])
            ok = g + 0 >= 0.9 && mi + 0 >= 0.9; all = all && ok
            parts = parts sprintf("%s%s %s / %s%s", k > 1 ? ", " : "", label(s), g, mi, ok ? "" : " ✗")
        }
        printf "| %s: the same ratios as XallocGlobal'"'"'s against glibc / mimalloc (each ÷ XallocGlobal'"'"'s ratio ≥ 0.9) | %s | %s |\n", short[run], parts, all ? "met" : "missed"
    }
    for (j = 1; j <= 2; j++) {
        run = runs[j]; parts = ""; all = 1
        for (k = 1; k <= ns; k++) {
            s = sizes[k]
            v = sprintf("%.2f", med[run, s, "x"] / med["churn", s, "x"])
            ok = v + 0 <= 1.1; all = all && ok
            parts = parts sprintf("%s%s %s×%s", k > 1 ? ", " : "", label(s), v, ok ? "" : " ✗")
        }
        printf "| %s: median within 1.1× of XallocGlobal'"'"'s (x µs ÷ XallocGlobal µs ≤ 1.1) | %s | %s (informational) |\n", short[run], parts, all ? "met" : "missed"
    }
}'
# "xalloc SUBJECT asked N outside N forwarded N fallbacks N held_bytes N daemon_pid N"
checks() {
    awk '$1 == "xalloc" { printf "%s of %s blocks forwarded to the arena, %s outside it, %s fallbacks", $8, $4, $6, $10 }' <<<"$1"
}
echo
echo "Arena checks: C API $(checks "$capi_out"); LD_PRELOAD $(checks "$preload_out")."
echo "Missed targets do not fail the run. bench-c: done in $((SECONDS - start)) s."
