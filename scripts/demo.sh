#!/usr/bin/env bash
# The main job: set up, build, and run `veil demo` (the default lab, narrated, with numbers).
set -euo pipefail
cd "$(dirname "$0")/.."
# The demo runs on real SPIRE; the other Go-built systems are built by a plain setup.sh.
VEIL_GO_TOOLS="${VEIL_GO_TOOLS:-spire}" scripts/setup.sh
scripts/preflight.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --locked --workspace --bins
exec target/release/veil demo "$@"
