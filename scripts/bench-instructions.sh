#!/usr/bin/env bash
# Instructions per operation of each allocator on each benchmark stream, counted by callgrind
# (deterministic, unlike time on a shared machine; README, "Instructions per operation").
#   scripts/bench-instructions.sh [WORKLOAD...]   (default: all four; about 1 min)
# Each count is one warm replay of `xalloc-bench --quick`'s stream (bench/src/bin/instructions.rs)
# divided by its operations, the harness's own work included (the same for every allocator).
# Needs valgrind.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
command -v valgrind >/dev/null || {
    echo "bench-instructions.sh: needs valgrind (apt-get install valgrind)" >&2
    exit 1
}
cargo build --release --quiet -p xalloc-bench --bin instructions
bin="${CARGO_TARGET_DIR:-target}/release/instructions"
workloads=("$@")
((${#workloads[@]})) || workloads=(random-1k random-100k large realloc)
allocators=(xalloc xalloc-bins talc rlsf buddy dlmalloc)
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
printf '| instructions per op |'
printf ' %s |' "${allocators[@]}"
printf '\n|---|'
printf -- '---:|%.0s' "${allocators[@]}"
printf '\n'
for w in "${workloads[@]}"; do
    printf '| %s |' "$w"
    for a in "${allocators[@]}"; do
        rc=0
        ops="$(valgrind --tool=callgrind --toggle-collect='instructions::measured' \
            --callgrind-out-file="$out/cg" "$bin" "$a" "$w" 2>"$out/log")" || rc=$?
        ir="$(sed -n 's/.*Collected : \([0-9]*\).*/\1/p' "$out/log")"
        if ((rc != 0)) || [[ -z "$ir" || -z "$ops" ]]; then
            echo "bench-instructions.sh: no count for $a on $w:" >&2
            cat "$out/log" >&2
            exit 1
        fi
        printf ' %s |' "$(awk -v i="$ir" -v o="$ops" 'BEGIN { printf "%.0f", i / o }')"
    done
    printf '\n'
done
