#!/usr/bin/env bash
# The full test suite: setup, preflight (fails without root/netns/BPF), release build, then every
# unit, integration and end-to-end test with cargo nextest. CI (.ci/run) runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/preflight.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --locked --workspace --bins
cargo nextest run --release --locked --workspace --no-fail-fast --profile ci "$@"
