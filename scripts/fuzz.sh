#!/usr/bin/env bash
# Runs veil's cargo-fuzz targets (libFuzzer, nightly, release with debug assertions) from their
# committed seed corpora.
#   scripts/fuzz.sh [TARGET|all] [RUNS|SECONDSs]   default: all, 10000000 executions each
#   scripts/fuzz.sh wg_receive 300s                one target for 300 seconds
#   scripts/fuzz.sh --smoke                        every target for VEIL_FUZZ_SMOKE_SECONDS (10)
#   scripts/fuzz.sh --list                         the targets and their cargo roots
# Targets live in two cargo roots: transport/fuzz (veil-wg: wg_receive, uapi) and fuzz (the
# agent and identity parsers). Seeds are in <root>/corpus/<target> and only read; what a run
# discovers goes to <root>/target/corpus/<target> (git-ignored). A crash, timeout or leak lands
# in <root>/artifacts/<target> and makes this script fail; keep the input as a regression seed
# in the committed corpus once the bug is fixed. Prints one line per target (executions,
# seconds, result) and a table at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
roots=(transport/fuzz fuzz)

if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz (once)"
  cargo install cargo-fuzz --locked >/dev/null
fi

targets_of() { (cd "$1" && cargo +nightly fuzz list); }
root_of() {
  local r
  for r in "${roots[@]}"; do
    if grep -qx "$1" <<<"$(targets_of "$r")"; then echo "$r"; return; fi
  done
  echo "fuzz: unknown target $1 (scripts/fuzz.sh --list)" >&2
  exit 2
}

target="all"
budget="10000000"
case "${1:-}" in
  --list)
    for r in "${roots[@]}"; do targets_of "$r" | sed "s|^|$r: |"; done
    exit 0 ;;
  --smoke) budget="${VEIL_FUZZ_SMOKE_SECONDS:-10}s" ;;
  "") ;;
  *) target="$1"; budget="${2:-$budget}" ;;
esac
case "$budget" in
  *s) limit=(-max_total_time="${budget%s}") ;;
  *[!0-9]*|"") echo "fuzz: budget must be RUNS or SECONDSs, not $budget" >&2; exit 2 ;;
  *) limit=(-runs="$budget") ;;
esac

# Release + debug assertions: overflow checks and debug_assert!s are part of what is fuzzed.
# The smoke run builds unoptimised instead (debug assertions included): its few seconds per
# target need no speed, and the build is what CI pays for. VEIL_FUZZ_TARGET_DIR builds
# elsewhere (e.g. an empty directory, to measure a fresh machine).
flags=(--release --debug-assertions)
[[ "${1:-}" == --smoke ]] && flags=(--dev)
if [[ -n "${VEIL_FUZZ_TARGET_DIR:-}" ]]; then
  flags+=(--target-dir "$VEIL_FUZZ_TARGET_DIR")
fi
if [[ "$target" == all ]]; then
  plan=()
  for r in "${roots[@]}"; do
    t0=$(date +%s)
    (cd "$r" && cargo +nightly fuzz build "${flags[@]}")
    echo "fuzz: built $r in $(( $(date +%s) - t0 )) s"
    while read -r t; do plan+=("$r:$t"); done < <(targets_of "$r")
  done
else
  plan=("$(root_of "$target"):$target")
fi

failed=0
table=()
for entry in "${plan[@]}"; do
  root="${entry%%:*}" t="${entry#*:}"
  seeds="$root/corpus/$t" found="$root/target/corpus/$t"
  mkdir -p "$seeds" "$found"
  log="/tmp/veil-fuzz-$t.log"
  start=$(date +%s)
  status=0
  # One process: the machine has 2 cores and builds share them.
  (cd "$root" && cargo +nightly fuzz run "${flags[@]}" "$t" "target/corpus/$t" "corpus/$t" -- \
    "${limit[@]}" -max_len=8192 -timeout=30 -print_final_stats=1) >"$log" 2>&1 || status=$?
  wall=$(( $(date +%s) - start ))
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
  # libFuzzer's own clock (without cargo's up-to-date check), else the wall clock.
  secs=$(grep -o 'Done [0-9]* runs in [0-9]* second' "$log" | grep -o 'in [0-9]*' | grep -o '[0-9]*' | tail -1)
  secs="${secs:-$wall}"
  if [[ $status -eq 0 ]]; then result=ok; else
    result="FAILED (exit $status)"; failed=1
    grep -E "panicked|ERROR|SUMMARY|Test unit written" "$log" | head -20 >&2 || true
  fi
  echo "fuzz: $t: ${execs:-?} executions in $secs s ($wall s with start-up), $result; log $log"
  table+=("$(printf '%-20s %14s %8s  %s' "$t" "${execs:-?}" "$secs" "$result")")
done
if [[ ${#plan[@]} -gt 1 ]]; then
  printf '%-20s %14s %8s  %s\n' target executions seconds result
  printf '%s\n' "${table[@]}"
fi
exit "$failed"
