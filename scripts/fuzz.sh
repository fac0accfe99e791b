#!/usr/bin/env bash
# Runs veil's cargo-fuzz targets (libFuzzer, nightly) with their kept corpus.
#   scripts/fuzz.sh [TARGET] [RUNS]     default: wg_receive, 10000000 executions
# The corpus lives in transport/fuzz/corpus/<target> and is committed; crashes land in
# transport/fuzz/artifacts/<target> and make this script fail.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
target="${1:-wg_receive}"
runs="${2:-10000000}"
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz (once)"
  cargo install cargo-fuzz --locked >/dev/null
fi
corpus="transport/fuzz/corpus/$target"
mkdir -p "$corpus"
cd transport/fuzz
start=$(date +%s)
# One process: the machine has 2 cores and builds share them.
log="/tmp/veil-fuzz-$target.log"
status=0
cargo +nightly fuzz run --release "$target" "corpus/$target" -- \
  -runs="$runs" -max_len=4096 -print_final_stats=1 >"$log" 2>&1 || status=$?
grep -E "Done [0-9]+ runs|stat::number_of_executed_units|stat::peak_rss|ERROR|panicked" "$log" || true
echo "fuzz: $target: $runs runs requested, exit $status, $(( $(date +%s) - start )) s; log /tmp/veil-fuzz-$target.log"
exit "$status"
