#!/usr/bin/env bash
# The full test suite: setup, preflight (fails without root/netns/BPF), the from-nothing
# toolchain check, a fuzz smoke run (scripts/fuzz.sh --smoke), the deploy check
# (scripts/check-deploy.sh), rustfmt and clippy, release
# build, then every unit, integration and end-to-end test with cargo nextest, and the
# doctests. CI (.ci/run) runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
# Whether this machine had a bpf-linker before: when not (a fresh machine, as CI's), setup.sh
# below builds it from nothing and the from-nothing check after it would only repeat that build.
had_bpf_linker=""
[ -x "$HOME/.cargo/bin/bpf-linker" ] && had_bpf_linker=1
# The Go-built systems the suite runs: SPIRE, wireguard-go, and etcd, helm and Kubernetes
# (kube-apiserver, kubectl) for the deploy check below (~10 more minutes on a fresh 2-core
# machine, cached after). That is every tool go-tools.sh pins, as a plain setup.sh builds.
VEIL_GO_TOOLS="${VEIL_GO_TOOLS:-wireguard-go spire etcd helm kubernetes}" scripts/setup.sh
scripts/preflight.sh
# From nothing: a warm machine once hid a bpf-linker that could not be built (it linked the
# toolchain's linker script instead of libLLVM). Build bpf-linker again into empty temporary
# cache and install directories and link the eBPF programs with that one; fails when it breaks.
# On a machine that had none, setup.sh has just done exactly that build, and the release build
# below links the eBPF programs with it.
if [ -z "$had_bpf_linker" ]; then
  echo "test: from-nothing toolchain check: setup.sh built bpf-linker from nothing in this run; the release build links the eBPF programs with it"
else
  fresh=$(mktemp -d /tmp/veil-fresh-XXXXXX)
  trap 'rm -rf "$fresh"' EXIT
  t0=$(date +%s)
  VEIL_SETUP_TOOLCHAIN_ONLY=1 VEIL_CACHE_DIR="$fresh/cache" VEIL_TOOL_ROOT="$fresh/root" scripts/setup.sh
  (cd ebpf && env -u RUSTUP_TOOLCHAIN PATH="$fresh/root/bin:$HOME/.cargo/bin:$PATH" \
    cargo +nightly build --release --locked --target bpfel-unknown-none -Z build-std=core \
    --target-dir "$fresh/ebpf-target" >/dev/null 2>"$fresh/ebpf-build.log") \
    || { cat "$fresh/ebpf-build.log" >&2; echo "test: the eBPF programs do not link with a bpf-linker built from nothing" >&2; exit 1; }
  echo "test: from-nothing toolchain check (bpf-linker build + eBPF link) passed in $(( $(date +%s) - t0 )) s"
  rm -rf "$fresh"  # ~1.5 GB of build output the rest of the suite needs the disk for
fi
# Every cargo-fuzz target for a few seconds from its committed corpus, so a crash on a seed
# (a regression) or a target that no longer builds fails CI; long runs: scripts/fuzz.sh.
t0=$(date +%s)
scripts/fuzz.sh --smoke
echo "test: fuzz smoke run (build + every target) passed in $(( $(date +%s) - t0 )) s"
# What ships for clusters (deploy/: CRDs, RBAC, node guard, DaemonSet, Helm chart): helm lint,
# the plain manifests are the chart's rendering, and a throwaway etcd + kube-apiserver accepts
# the rendered output, the CRDs and every example policy, refuses schema violations, and holds
# the service account to least privilege. About 15 s; its own step timings are printed.
t0=$(date +%s)
scripts/check-deploy.sh
echo "test: deploy check (helm lint + chart + CRDs on a real kube-apiserver) passed in $(( $(date +%s) - t0 )) s"
export PATH="$HOME/.cargo/bin:$PATH"
# What engineers expect of a Rust project before anything runs: formatted, lint-clean.
cargo fmt --all -- --check
cargo clippy --release --locked --workspace --all-targets -- -D warnings
# The binaries the end-to-end tests run and the tests themselves, in one build: one invocation
# is one feature resolution, so every dependency is compiled once. Built apart, the binaries
# (without dev-dependencies) and the tests (whose dev-dependencies add tokio's test-util, which
# only the unit tests' paused clock uses) each compiled tokio and everything above it (hyper,
# tonic, kube, boringtun, ...) again. As `cargo test` builds a package's binaries for its own
# integration tests, the tested binaries are built like that.
t0=$(date +%s)
cargo build --release --locked --workspace --bins --tests
echo "test: release build (binaries + tests) in $(( $(date +%s) - t0 )) s"
# nextest does not run doctests; they run first so nextest's summary closes the log.
cargo test --release --locked --workspace --doc
cargo nextest run --release --locked --workspace --no-fail-fast --profile ci "$@"
