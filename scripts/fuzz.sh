#!/usr/bin/env bash
# Runs veil's cargo-fuzz targets (libFuzzer, nightly) from their committed seed corpora.
#   scripts/fuzz.sh [TARGET|all] [RUNS|SECONDSs]   default: all, 10000000 executions or one
#                                                  hour each, whichever comes first
#   scripts/fuzz.sh wg_receive 300s                one target for 300 seconds
#   scripts/fuzz.sh --smoke                        every target for VEIL_FUZZ_SMOKE_SECONDS (6)
#   scripts/fuzz.sh --list                         the targets and where their sources live
# Targets live in two cargo roots: transport/fuzz (veil-wg: wg_receive, uapi) and fuzz (the
# agent and identity parsers); fuzz/Cargo.toml lists veil-wg's targets too, so everything is
# built and run from fuzz/ (one dependency graph). Seeds are in <home root>/corpus/<target> and
# only read; what a run discovers goes to fuzz/target/corpus/<target> (git-ignored). A crash,
# timeout or leak lands in fuzz/artifacts/<target> and makes this script fail; keep the input
# as a regression seed in the committed corpus once the bug is fixed. Prints one line per
# target (executions, seconds, result) and a table at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
homes=(transport/fuzz fuzz)
runner=fuzz

if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz (once)"
  cargo install cargo-fuzz --locked >/dev/null
fi

targets_of() { (cd "$1" && cargo +nightly fuzz list); }
home_of() {
  local r
  for r in "${homes[@]}"; do
    if grep -qx "$1" <<<"$(targets_of "$r")"; then echo "$r"; return; fi
  done
  echo "fuzz: unknown target $1 (scripts/fuzz.sh --list)" >&2
  exit 2
}

target="all"
budget="10000000"
case "${1:-}" in
  --list)
    for t in $(targets_of "$runner"); do echo "$(home_of "$t"): $t"; done
    exit 0 ;;
  --smoke) budget="${VEIL_FUZZ_SMOKE_SECONDS:-6}s" ;;
  "") ;;
  *) target="$1"; budget="${2:-$budget}" ;;
esac
case "$budget" in
  *s) limit=(-max_total_time="${budget%s}") ;;
  *[!0-9]*|"") echo "fuzz: budget must be RUNS or SECONDSs, not $budget" >&2; exit 2 ;;
  # N executions or VEIL_FUZZ_MAX_SECONDS (one hour), whichever comes first.
  *) limit=(-runs="$budget" -max_total_time="${VEIL_FUZZ_MAX_SECONDS:-3600}") ;;
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
# The agent's build script builds the eBPF programs (nightly, bpf-linker) with none of this
# build's flags; where the workspace keeps them, so neither build does it twice.
export VEIL_EBPF_TARGET_DIR="${VEIL_EBPF_TARGET_DIR:-$PWD/target/ebpf}"

t0=$(date +%s)
if [[ "$target" == all ]]; then
  plan=($(targets_of "$runner"))
  (cd "$runner" && cargo +nightly fuzz build "${flags[@]}")
else
  home_of "$target" >/dev/null
  plan=("$target")
  (cd "$runner" && cargo +nightly fuzz build "${flags[@]}" "$target")
fi
echo "fuzz: built ${#plan[@]} target(s) in $(( $(date +%s) - t0 )) s"

failed=0
table=()
for t in "${plan[@]}"; do
  seeds="$PWD/$(home_of "$t")/corpus/$t" found="$PWD/$runner/target/corpus/$t"
  mkdir -p "$seeds" "$found"
  log="/tmp/veil-fuzz-$t.log"
  start=$(date +%s)
  status=0
  # One process: the machine has 2 cores and builds share them.
  (cd "$runner" && cargo +nightly fuzz run "${flags[@]}" "$t" "$found" "$seeds" -- \
    "${limit[@]}" -max_len=8192 -timeout=30 -print_final_stats=1) >"$log" 2>&1 || status=$?
  wall=$(( $(date +%s) - start ))
  # -a: a log quoting a crashing input is binary to grep.
  execs=$(grep -ao 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1 || true)
  # libFuzzer's own clock (without cargo's up-to-date check), else the wall clock.
  secs=$(grep -ao 'Done [0-9]* runs in [0-9]* second' "$log" | grep -o 'in [0-9]*' | grep -o '[0-9]*' | tail -1 || true)
  secs="${secs:-$wall}"
  if [[ $status -eq 0 ]]; then result=ok; else
    result="FAILED (exit $status)"; failed=1
    grep -aE "panicked|ERROR|SUMMARY|Test unit written" "$log" | head -20 >&2 || true
  fi
  echo "fuzz: $t: ${execs:-?} executions in $secs s ($wall s with start-up), $result; log $log"
  table+=("$(printf '%-20s %14s %8s  %s' "$t" "${execs:-?}" "$secs" "$result")")
done
if [[ ${#plan[@]} -gt 1 ]]; then
  printf '%-20s %14s %8s  %s\n' target executions seconds result
  printf '%s\n' "${table[@]}"
fi
exit "$failed"
