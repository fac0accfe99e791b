#!/usr/bin/env bash
# The main job: set up, build, and run `veil demo` (the default lab, narrated, with numbers).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/preflight.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --locked --workspace --bins
exec target/release/veil demo "$@"
