#!/usr/bin/env bash
# Scenario 32 (tests/README.md): an earlier release rolled out to this build node by node and
# back again, under load, the two nodes on different versions between the steps.
#
#   scripts/upgrade-test.sh [--from REV]
#
# - REV (default: UPGRADE_FROM below, the release before the last) is built once per machine
#   from this repository's history: a detached git worktree, compiled with its own Cargo.lock
#   into a target directory of its own (~/.cache/veil/upgrade/target, so this workspace's build
#   is left alone), its binaries (veil, veil-wg, veil-proxy, veil-cni) cached in
#   ~/.cache/veil/upgrade/<commit>/ under a temporary name and renamed when complete.
# - This workspace's release binaries and tests are built as scripts/test.sh builds them (the
#   same flags, so neither build undoes the other's), then the ignored end-to-end tests
#   `chaos::rollout_n_to_n1_and_back_under_load_*` (files and Kubernetes control planes) run
#   with VEIL_UPGRADE_FROM pointing at REV's binaries (see them for what they check).
# - Installs nothing of its own: run scripts/setup.sh first (scripts/test.sh does).
# - Not part of scripts/test.sh: building a second version of the workspace takes about
#   15 minutes on 2 cores the first time, more than CI's 40-minute budget has left. Its results
#   are recorded with their date in tests/README.md.
# Exit status: the test's; prints `upgrade-test: passed (REV -> this build)` on success.
set -euo pipefail

say() { printf 'upgrade-test: %s\n' "$*"; }
die() { printf 'upgrade-test: error: %s\n' "$*" >&2; exit 1; }

# The release before the last (stop 44): the oldest release an upgrade to this build is tested
# from. Moved on when a release changes what nodes exchange or keep across restarts.
UPGRADE_FROM=70e21972898b9e89ea711f66a883789507d3f80b

from="$UPGRADE_FROM"
while [ $# -gt 0 ]; do
  case "$1" in
    --from) [ $# -ge 2 ] || die "--from needs a git revision"; from="$2"; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done
[ "$(id -u)" -eq 0 ] || die "run as root (labs need network namespaces and BPF)"

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
export PATH="$HOME/.cargo/bin:$PATH"
command -v cargo >/dev/null || die "no cargo: run scripts/setup.sh first"
commit=$(git rev-parse --verify --quiet "$from^{commit}") \
  || die "'$from' is not a commit of this repository's history (a shallow clone? git fetch --unshallow)"
head=$(git rev-parse HEAD)
[ "$commit" != "$head" ] || die "'$from' is this checkout's own commit: nothing to upgrade from"

cache="${VEIL_CACHE_DIR:-$HOME/.cache/veil}/upgrade"
bins="$cache/$commit"
if [ ! -x "$bins/veil" ]; then
  say "building $commit (once per machine) into $bins"
  mkdir -p "$cache"
  src=$(mktemp -d /tmp/veil-upgrade-src-XXXXXX)
  trap 'git -C "$repo" worktree remove --force "$src" 2>/dev/null || rm -rf "$src"' EXIT
  git worktree add --detach --force "$src" "$commit" >/dev/null
  t0=$(date +%s)
  (cd "$src" && cargo build --release --locked -p veil-agent -p veil-transport --bins \
    --target-dir "$cache/target")
  rm -rf "$bins.tmp" && mkdir -p "$bins.tmp"
  for b in veil veil-wg veil-proxy veil-cni; do cp "$cache/target/release/$b" "$bins.tmp/"; done
  rm -rf "$bins" && mv "$bins.tmp" "$bins"
  say "built $commit in $(( $(date +%s) - t0 )) s"
fi

# This workspace, built as scripts/test.sh builds it (same wrapper and flags: same fingerprints).
export RUSTC_WORKSPACE_WRAPPER="$HOME/.cargo/bin/clippy-driver"
export CLIPPY_ARGS="-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__"
cargo build --release --locked --workspace --bins --tests
say "rolling out $commit -> $head (this build) and back"
VEIL_UPGRADE_FROM="$bins" cargo nextest run --release --locked --workspace --profile ci \
  --no-capture --test-threads 1 --run-ignored only -E 'binary(chaos) & test(/^rollout_n_to_n1_and_back_under_load/)'
say "passed ($commit -> this build -> $commit)"
