#!/usr/bin/env bash
# The benchmark: veil vs plaintext vs boringtun-cli on a 2-node lab, interleaved, medians and
# ratios against the targets; prints a table, writes benches/results/{results.json,chart.png,
# results.md}. Sets up what it needs (scripts/setup.sh: iperf3, wireguard-tools, bpf-linker;
# boringtun-cli 0.7.1 into ~/.cache/veil/bench once), and removes every lab, netns and process
# it created, also on Ctrl-C. control-bench measures the control plane first, on its own lab. Arguments go to veil-bench (--quick, --rounds N, --seconds N,
# --only veil,boringtun-cli, --update-readme, --help).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/preflight.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --locked --workspace --bins
# The control plane first (mutual auth: handshakes per agent CPU-second, policy apply to
# enforcement, rotation to re-auth, first connection with auth required); it writes
# benches/results/control.json, which veil-bench's target table reads.
target/release/control-bench
exec target/release/veil-bench "$@"
