#!/usr/bin/env bash
# Code size of each allocator in a minimal thumbv7em-none-eabihf firmware (README, "Code size").
#   scripts/code-size.sh [--check] [--symbols]
# Builds bench/code-size (its own workspace; opt-level "s", fat LTO, one codegen unit,
# panic = "abort") with the full program (init, then alloc, realloc and dealloc) and with init
# alone, each once as it is and once more with xalloc-core's `small-code` feature (for the two
# xalloc rows marked so; features add up in one build, hence the separate builds), then prints a markdown table of the .text bytes each allocator adds to
# the baseline firmware (whose allocator does nothing), split into init and the rest, with the
# ratio to rlsf's, the other flash it adds (.rodata, and .data's initial image) and its static
# state in RAM (.data + .bss).
#   --check    exit 1 if the configuration meant to be small (`SmallLockedHeap` with
#              `small-code`) has a larger total than rlsf's (the target).
#   --symbols  also list the largest functions of the xalloc firmwares.
# Needs: the thumbv7em-none-eabihf target, readelf (binutils) and, for --symbols, nm.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

check=0
symbols=0
for arg in "$@"; do
    case "$arg" in
        --check) check=1 ;;
        --symbols) symbols=1 ;;
        *)
            echo "usage: scripts/code-size.sh [--check] [--symbols]" >&2
            exit 2
            ;;
    esac
done

crate=bench/code-size
target_dir="$PWD/$crate/target"
bin_dir="$target_dir/thumbv7em-none-eabihf/release"

# xalloc locks with its critical-section feature, like every peer here.
features=(xalloc-core/critical-section xalloc-small)
xalloc_lock="critical section (\`critical-section\` feature)"
bins=(baseline xalloc xalloc-small)
bins+=(rlsf talc talc4 linked-list-allocator embedded-alloc-llff embedded-alloc-tlsf)
# The xalloc binaries again, built with `small-code`: rows "<bin>+small-code".
small_code_bins=(xalloc xalloc-small)
# The row that --check holds to rlsf's total.
checked=xalloc-small+small-code

# Size in bytes of section $2 of ELF file $1 (0 if absent).
section() {
    local hex
    hex="$(readelf -SW "$1" | sed -n "s/^ *\[ *[0-9]*\] *\\$2 *[A-Z_]* *[0-9a-f]* *[0-9a-f]* *\([0-9a-f]*\).*/\1/p")"
    echo $((16#${hex:-0}))
}

declare -A text init_text flash ram
build() {
    (cd "$crate" && cargo build --release --quiet --locked --target-dir "$target_dir" \
        --features "$1")
}
# Records the sizes of binary $1 under the row name $2.
record() {
    text[$2]="$(section "$bin_dir/$1" .text)"
    local data
    data="$(section "$bin_dir/$1" .data)"
    flash[$2]=$(($(section "$bin_dir/$1" .rodata) + data))
    ram[$2]=$((data + $(section "$bin_dir/$1" .bss)))
}
# Full program, without and with `small-code`.
build "${features[*]} xalloc-core/small-code"
for b in "${small_code_bins[@]}"; do
    record "$b" "$b+small-code"
done
listing=""
if ((symbols)); then
    functions() { nm -S --size-sort -C "$1" | grep -E '^[0-9a-f]+ [0-9a-f]+ [tT] '; }
    listing+="Largest functions of the xalloc-small firmware with small-code (bytes, name):"$'\n'
    while read -r _ size _ name; do
        listing+="$(printf '  %6d %s' $((16#$size)) "$name")"$'\n'
    done < <(functions "$bin_dir/xalloc-small" | grep -E 'xalloc' | tac)
    listing+=$'\n'
fi
build "${features[*]}"
for b in "${bins[@]}"; do
    record "$b" "$b"
done
if ((symbols)); then
    # Functions the baseline does not have (the allocator's, and the program itself, into which
    # the compiler inlines the allocator's fast paths).
    declare -A in_baseline
    while read -r _ _ _ name; do
        in_baseline[$name]=1
    done < <(functions "$bin_dir/baseline")
    baseline_main="$(functions "$bin_dir/baseline" | awk '/__cortex_m_rt_main/ { print $2 }')"
    for b in xalloc xalloc-small; do
        [[ " ${bins[*]} " == *" $b "* ]] || continue
        listing+="Largest functions of the $b firmware that the baseline lacks (bytes, name;"
        listing+=" the baseline's __cortex_m_rt_main has $((16#$baseline_main))):"$'\n'
        while read -r _ size _ name; do
            [[ -n "${in_baseline[$name]:-}" ]] && continue
            listing+="$(printf '  %6d %s' $((16#$size)) "$name")"$'\n'
        done < <(functions "$bin_dir/$b" | tac)
        listing+=$'\n'
    done
fi
# Init alone.
build "${features[*]} init-only xalloc-core/small-code"
for b in "${small_code_bins[@]}"; do
    init_text[$b+small-code]="$(section "$bin_dir/$b" .text)"
done
build "${features[*]} init-only"
for b in "${bins[@]}"; do
    init_text[$b]="$(section "$bin_dir/$b" .text)"
done

# Crate versions, from bench/code-size/Cargo.lock.
version() { # name, version prefix
    awk -v name="$1" -v prefix="$2" '
        $1 == "name" { n = $3; gsub(/"/, "", n) }
        $1 == "version" && n == name { v = $3; gsub(/"/, "", v); if (index(v, prefix) == 1) { print v; exit } }
    ' "$crate/Cargo.lock"
}
declare -A label lock
label[xalloc]="xalloc \`LockedHeap\` (default)"
label[xalloc-small]="xalloc \`SmallLockedHeap\`"
label[xalloc+small-code]="xalloc \`LockedHeap\`, \`small-code\` feature"
label[xalloc-small+small-code]="xalloc \`SmallLockedHeap\`, \`small-code\` feature"
label[rlsf]="rlsf $(version rlsf '') \`Tlsf\` (\`GlobalTlsf\`'s parameters)"
label[talc]="talc $(version talc 5) \`TalcLock\`"
label[talc4]="talc $(version talc 4) \`Talck\`"
label[linked-list-allocator]="linked_list_allocator $(version linked_list_allocator '') \`Heap\`"
label[embedded-alloc-llff]="embedded-alloc $(version embedded-alloc '') \`LlffHeap\`"
label[embedded-alloc-tlsf]="embedded-alloc $(version embedded-alloc '') \`TlsfHeap\`"
lock[xalloc]="$xalloc_lock"
lock[xalloc-small]="$xalloc_lock"
lock[xalloc+small-code]="$xalloc_lock"
lock[xalloc-small+small-code]="$xalloc_lock"
lock[rlsf]="\`Mutex<RefCell<_>>\` (critical section)"
lock[talc]="critical-section \`lock_api\` mutex"
lock[talc4]="critical-section \`lock_api\` mutex"
lock[linked-list-allocator]="\`Mutex<RefCell<_>>\` (critical section)"
lock[embedded-alloc-llff]="its own (critical section)"
lock[embedded-alloc-tlsf]="its own (critical section)"

base="${text[baseline]}"
base_init="${init_text[baseline]}"
rlsf_total=$((text[rlsf] - base))
echo "| Allocator | Lock | alloc + free + realloc | init | total .text | × rlsf | .rodata + .data | RAM |"
echo "|---|---|---:|---:|---:|---:|---:|---:|"
fail=()
rows=()
for b in "${bins[@]}"; do
    rows+=("$b")
    [[ "$b" == xalloc-small ]] && rows+=("${small_code_bins[@]/%/+small-code}")
done
for b in "${rows[@]}"; do
    [[ "$b" == baseline ]] && continue
    total=$((text[$b] - base))
    init=$((init_text[$b] - base_init))
    ops=$((total - init))
    other_flash=$((flash[$b] - flash[baseline]))
    state=$((ram[$b] - ram[baseline]))
    ratio="$(awk -v t="$total" -v r="$rlsf_total" 'BEGIN { printf "%.2f", t / r }')"
    echo "| ${label[$b]} | ${lock[$b]} | $ops | $init | $total | $ratio | $other_flash | $state |"
    if [[ "$b" == "$checked" ]] && ((total > rlsf_total)); then
        fail+=("$b ($total bytes > rlsf's $rlsf_total)")
    fi
done
echo
echo "Baseline firmware: ${base} bytes of .text (${base_init} with init alone); bytes are" \
    "differences to it. thumbv7em-none-eabihf, $(rustc --version | cut -d' ' -f1-2)."
if ((symbols)); then
    echo
    printf '%s' "$listing"
fi

if ((check)) && ((${#fail[@]})); then
    echo "code size: larger than rlsf's: ${fail[*]}" >&2
    exit 1
fi
