#!/usr/bin/env bash
# The full test suite: setup, preflight (fails without root/netns/BPF), the from-nothing
# toolchain check, a fuzz smoke run (scripts/fuzz.sh --smoke), rustfmt, the release build with
# clippy's lints, the deploy check (scripts/check-deploy.sh), then every unit, integration and
# end-to-end test with cargo nextest, and the doctests. CI (.ci/run) runs exactly this.
#
# The Go-built systems (SPIRE, wireguard-go, etcd, helm, kube-apiserver, kubectl; about 22 minutes
# of 2-core compiling on a fresh machine, cached after) build in the background at idle CPU
# priority while the Rust side compiles and the tests that need none of them run; the tests that
# need them run once they are built. Extra arguments go to cargo nextest (then one run, after the
# Go tools).
set -euo pipefail
cd "$(dirname "$0")/.."
# Whether this machine had a bpf-linker before: when not (a fresh machine, as CI's), setup.sh
# below builds it from nothing and the from-nothing check after it would only repeat that build.
had_bpf_linker=""
[ -x "$HOME/.cargo/bin/bpf-linker" ] && had_bpf_linker=1
suite_t0=$(date +%s)
step() { echo "test: $1 in $(( $(date +%s) - $2 )) s (suite at $(( $(date +%s) - suite_t0 )) s)"; }
go_pid="" fresh="" no_tools="" results=""
cleanup() {
  # The background Go build is its own process group (setsid): stop all of it on an early exit.
  if [ -n "$go_pid" ] && kill -0 "$go_pid" 2>/dev/null; then kill -TERM -- "-$go_pid" 2>/dev/null || true; fi
  [ -z "$fresh" ] || rm -rf "$fresh"
  [ -z "$no_tools" ] || rmdir "$no_tools" 2>/dev/null || true
  [ -z "$results" ] || rm -f "$results"
}
trap cleanup EXIT
# Debian packages, the Rust toolchains, bpf-linker, cargo-nextest, boringtun-cli; not the Go tools.
t0=$(date +%s)
VEIL_SETUP_SKIP_GO_TOOLS=1 scripts/setup.sh
step "setup (without the Go tools)" "$t0"
# The Go-built systems the suite runs: SPIRE, wireguard-go, and etcd, helm and Kubernetes
# (kube-apiserver, kubectl) — every tool go-tools.sh pins. SCHED_IDLE (and nice 19): they only
# get CPU time the Rust builds and the running tests leave idle, so they neither slow the build
# nor disturb the timing of the end-to-end tests; their progress lines ("go-tools: ...") are
# interleaved below. Nothing they build is used before the wait further down.
go_t0=$(date +%s)
VEIL_GO_TOOLS="${VEIL_GO_TOOLS:-wireguard-go spire etcd helm kubernetes}" \
  setsid chrt --idle 0 nice -n 19 scripts/go-tools.sh &
go_pid=$!
wait_go_tools() {
  [ -n "$go_pid" ] || return 0
  local t0; t0=$(date +%s)
  if ! wait "$go_pid"; then go_pid=""; echo "test: scripts/go-tools.sh failed (its error is above)" >&2; exit 1; fi
  go_pid=""
  echo "test: Go tools ready $(( $(date +%s) - go_t0 )) s after their build started; waited $(( $(date +%s) - t0 )) s for them"
}
scripts/preflight.sh
# Formatting first: it takes a second, and a diff should not wait for half an hour of builds.
"$HOME/.cargo/bin/cargo" fmt --all -- --check
# From nothing: a warm machine once hid a bpf-linker that could not be built (it linked the
# toolchain's linker script instead of libLLVM). Build bpf-linker again into empty temporary
# cache and install directories and link the eBPF programs with that one; fails when it breaks.
# On a machine that had none, setup.sh has just done exactly that build, and the release build
# below links the eBPF programs with it.
if [ -z "$had_bpf_linker" ]; then
  echo "test: from-nothing toolchain check: setup.sh built bpf-linker from nothing in this run; the release build links the eBPF programs with it"
else
  fresh=$(mktemp -d /tmp/veil-fresh-XXXXXX)
  t0=$(date +%s)
  VEIL_SETUP_TOOLCHAIN_ONLY=1 VEIL_CACHE_DIR="$fresh/cache" VEIL_TOOL_ROOT="$fresh/root" scripts/setup.sh
  (cd ebpf && env -u RUSTUP_TOOLCHAIN PATH="$fresh/root/bin:$HOME/.cargo/bin:$PATH" \
    cargo +nightly build --release --locked --target bpfel-unknown-none -Z build-std=core \
    --target-dir "$fresh/ebpf-target" >/dev/null 2>"$fresh/ebpf-build.log") \
    || { cat "$fresh/ebpf-build.log" >&2; echo "test: the eBPF programs do not link with a bpf-linker built from nothing" >&2; exit 1; }
  echo "test: from-nothing toolchain check (bpf-linker build + eBPF link) passed in $(( $(date +%s) - t0 )) s"
  rm -rf "$fresh"; fresh=""  # ~1.5 GB of build output the rest of the suite needs the disk for
fi
# Every cargo-fuzz target for a few seconds from its committed corpus, so a crash on a seed
# (a regression) or a target that no longer builds fails CI; long runs: scripts/fuzz.sh.
t0=$(date +%s)
scripts/fuzz.sh --smoke
step "fuzz smoke run (build + every target) passed" "$t0"
export PATH="$HOME/.cargo/bin:$PATH"
# The binaries the end-to-end tests run and the tests themselves, in one build: one invocation
# is one feature resolution, so every dependency is compiled once. Built apart, the binaries
# (without dev-dependencies) and the tests (whose dev-dependencies add tokio's test-util, which
# only the unit tests' paused clock uses) each compiled tokio and everything above it (hyper,
# tonic, kube, boringtun, ...) again. As `cargo test` builds a package's binaries for its own
# integration tests, the tested binaries are built like that.
#
# Lint-clean, as engineers expect before anything runs: clippy's lints ride on this build.
# clippy-driver compiles the workspace's own crates (RUSTC_WORKSPACE_WRAPPER; dependencies get
# plain rustc) and any warning fails the build (`-D warnings`, in clippy-driver's CLIPPY_ARGS
# form, as `cargo clippy` passes it). The workspace is type-checked once, not twice: a separate
# `cargo clippy --all-targets` took 476 s from nothing. It covers the same targets: the libraries,
# their unit tests, the binaries and the integration tests (the workspace has no bench or example
# targets). Exported, because cargo rebuilds a crate whose wrapper changed: the doctests and
# nextest below reuse these artifacts.
export RUSTC_WORKSPACE_WRAPPER="$HOME/.cargo/bin/clippy-driver"
export CLIPPY_ARGS="-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__"
t0=$(date +%s)
cargo build --release --locked --workspace --bins --tests
step "release build (binaries + tests) with clippy's lints" "$t0"
# The doctests (nextest does not run them).
cargo test --release --locked --workspace --doc
# The tests that run the Go-built systems: real SPIRE (spire, real_spire, the chaos suite's
# spire-agent kills, the lab suite's two `lab up` undo tests on a SPIRE lab), a Kubernetes control plane (kube_lab, kubernetes, the L7 and Services tests
# in Kubernetes mode), and the interop suite (wireguard-go, boringtun-cli). Every other test runs
# first, while those systems build, with VEIL_TOOLS_BIN an empty directory: a test needing one
# that this filter misses fails there, every time, instead of passing or failing by how far the
# build has got.
go_tests='binary(spire) | binary(real_spire) | binary(kube_lab) | binary(kubernetes) | binary(interop) | (package(veil-tests) & test(/spire|kubernetes/)) | (binary(lab) & test(/failed_up_removes_everything_it_created|up_never_takes_over_a_namespace_it_did_not_create/))'
# Each nextest run's output is also kept, so that a failure ends the suite's output with a
# digest (the failed tests and their panic messages) instead of the last failing test's logs:
# what a CI page shows first is the tail.
results=$(mktemp /tmp/veil-test-output-XXXXXX)
nextest() {
  cargo nextest run --release --locked --workspace --no-fail-fast --profile ci "$@" 2>&1 | tee -a "$results"
  return "${PIPESTATUS[0]}"
}
failure_digest() {
  echo "test: failed tests (from both runs):"
  grep -E '^ *(FAIL|TIMEOUT|SIGSEGV|SIGABRT|SIGKILL|LEAK-FAIL) \[' "$results" | sed 's/^ */  /' | sort -u || true
  echo "test: their panic messages (first 3 lines each, at most 60 lines):"
  grep -A3 "panicked at" "$results" | cut -c1-300 | head -60 || true
}
rc=0
if [ $# -eq 0 ]; then
  no_tools=$(mktemp -d /tmp/veil-no-tools-XXXXXX)
  t0=$(date +%s)
  VEIL_TOOLS_BIN=$no_tools nextest -E "not ($go_tests)" || rc=$?
  step "tests without the Go tools (exit $rc)" "$t0"
fi
wait_go_tools
# What ships for clusters (deploy/: CRDs, RBAC, node guard, DaemonSet, Helm chart): helm lint,
# the plain manifests are the chart's rendering, and a throwaway etcd + kube-apiserver accepts
# the rendered output, the CRDs and every example policy, refuses schema violations, and holds
# the service account to least privilege. About 15 s; its own step timings are printed.
t0=$(date +%s)
scripts/check-deploy.sh
step "deploy check (helm lint + chart + CRDs on a real kube-apiserver) passed" "$t0"
t0=$(date +%s)
if [ $# -eq 0 ]; then
  nextest -E "$go_tests" || rc=$?
  step "tests with the Go tools" "$t0"
else
  nextest "$@" || rc=$?
fi
if [ "$rc" -ne 0 ]; then
  failure_digest >&2
  echo "test: FAILED: some tests failed (nextest exit $rc; both summaries above)" >&2
fi
exit "$rc"
