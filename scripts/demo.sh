#!/usr/bin/env bash
# The main job: set up, build, and run `veil demo` (the default lab, narrated, with numbers).
set -euo pipefail
cd "$(dirname "$0")/.."
# The demo runs on real SPIRE and a real kube-apiserver + etcd (the lab's default control plane);
# wireguard-go and helm are for the test suite.
VEIL_GO_TOOLS="${VEIL_GO_TOOLS:-spire etcd kubernetes}" scripts/setup.sh
scripts/preflight.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --locked --workspace --bins
exec target/release/veil demo "$@"
