#!/usr/bin/env bash
# The benchmark: veil vs plaintext vs boringtun-cli vs wireguard-go on a 2-node lab, interleaved,
# medians and ratios against the targets; prints a table, writes benches/results/{results.json,
# chart.png,results.md}. Sets up what it needs (scripts/setup.sh: iperf3, wireguard-tools,
# bpf-linker, wireguard-go into ~/.cache/veil/bin; boringtun-cli 0.7.1 into ~/.cache/veil/bench
# once), and removes every lab, netns and process it created, also on Ctrl-C. control-bench measures the control plane first, on its own lab.
# Arguments go to veil-bench (--quick, --rounds N, --seconds N, --only veil,wireguard-go,
# --update-readme); --help prints the options and runs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
    cat <<'EOF'
usage: scripts/bench.sh [VEIL-BENCH OPTIONS]
       scripts/bench.sh --scale [SCALE-BENCH OPTIONS]

--scale: only scale-bench: one real agent (node-a of a 2-node lab) in a simulated cluster of
10, 100 and 1,000 nodes, 1,000 to 100,000 endpoints and 100 to 10,000 policy rules, created
as Node, Pod and CiliumNetworkPolicy objects in a Kubernetes-mode lab's kube-apiserver (a fresh
lab per size) and read by the agent's Kubernetes source; prints a table, writes
benches/results/scale-kubernetes.json; then the same sizes through the agent's file source
(one files-mode lab), benches/results/scale.json (target/release/scale-bench --help for its
options: --source, --sizes, --rounds, --idle-seconds, --settle-seconds). First, tc-cost with 1,000 and 100,000 endpoints in the ipcache writes
benches/results/tc-cost-scale.json, wg-peers-bench (stand-alone veil-wg with 1,000 peers
against 1, about 2 minutes) benches/results/wg-peers.json, and flow-bench (the agent under
10,000 new flows a second, about 1 minute) benches/results/flow.json.

As root: runs scripts/setup.sh and scripts/preflight.sh, builds the release binaries, then
control-bench (control plane, its own 77-pod lab; writes benches/results/control.json),
svc-bench (Services: ClusterIP vs pod IP vs iptables DNAT at 10 and 10,000 Service ports;
writes benches/results/services.json), l7-bench (HTTP through the L7 proxy vs L4 policy only;
writes benches/results/l7.json) and veil-bench (veil vs plaintext vs boringtun-cli vs
wireguard-go; prints the table, writes
benches/results/{results.json,chart.png,results.md}). Both carry this run's id, and veil-bench's
target table uses control.json only if control-bench wrote it in this run.

veil-bench options (passed on):
  --quick                 1 round, 3 s runs, 10 s idle
  --rounds N              interleaved rounds (default 5)
  --seconds N             seconds per iperf3 run (default 10)
  --rr-seconds S          seconds per request/response run (default 5)
  --rr-size B             request/response size in bytes (default 64)
  --idle-seconds N        idle window (default 60)
  --skip-idle             no idle measurement
  --only LIST             contenders: plaintext,veil,boringtun-cli,wireguard-go
  --tests LIST            tcp1,tcp2,tcp4,rr
  --bin-dir DIR, --boringtun PATH, --wireguard-go PATH, --lab-file PATH, --out-dir DIR
  --boringtun-default-buffers
                          leave boringtun-cli's UDP sockets at the netns defaults instead of
                          veil-wg's buffers (reproduces the earlier unequal runs)
  --update-readme         rewrite the results block of benches/README.md
  -h, --help              this text (nothing is set up, built or run)

control-bench runs with its defaults (60 clients x 10 servers, 3 handshake rounds, 7 latency
rounds); run target/release/control-bench --help for its options.
EOF
}
for arg in "$@"; do
    case "$arg" in
    -h | --help)
        usage
        exit 0
        ;;
    esac
done
scale=0
if [ "${1:-}" = "--scale" ]; then
    scale=1
    shift
fi

# One id and start time for the whole run: control-bench writes them into control.json and
# veil-bench refuses a control.json from any other run.
VEIL_BENCH_RUN_STARTED_UNIX="$(date +%s)"
VEIL_BENCH_RUN_ID="$(date -u +%Y%m%dT%H%M%SZ)-$$"
export VEIL_BENCH_RUN_ID VEIL_BENCH_RUN_STARTED_UNIX

scripts/setup.sh
scripts/preflight.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --locked --workspace --bins
if [ "$scale" = 1 ]; then
    # The TC program's per-packet cost with the ipcache of the largest size (100,000 remote
    # endpoints) against the smallest's (1,000), at 10 and 100,000 policy entries.
    target/release/tc-cost --sizes 10,100000 --ipcache 1000,100000 --rounds 11 --json \
        >benches/results/tc-cost-scale.json
    # veil-wg's per-packet cost with 1,000 peers against 1 (stand-alone devices, UAPI).
    target/release/wg-peers-bench
    # The agent's CPU and memory under 10,000 new flows a second (its flow store and log).
    target/release/flow-bench
    target/release/scale-bench --source kubernetes "$@"
    exec target/release/scale-bench --source files "$@"
fi
# The control plane first (mutual auth: handshakes per agent CPU-second, policy apply to
# enforcement, rotation to re-auth, first connection with auth required); it writes
# benches/results/control.json, which veil-bench's target table reads.
target/release/control-bench
# Services at the socket vs pod IP vs a kube-proxy iptables rule set, at 10 and 10,000 Service
# ports (TCP_RR, TCP_CRR and HTTP keep-alive; writes benches/results/services.json). Seven
# rounds: the ClusterIP/pod-IP ratios are a few percent from 1, the rounds' spread about as much.
target/release/svc-bench --rounds 7
# HTTP through the node's L7 proxy vs L4 policy only (keep-alive, requests/s, p50/p99, the
# proxy's CPU per request; writes benches/results/l7.json).
target/release/l7-bench
exec target/release/veil-bench "$@"
