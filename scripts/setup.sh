#!/usr/bin/env bash
# Installs what veil's build, demo and tests need, idempotently: a second run changes nothing.
#   - Debian packages the lab and tests use (iproute2, tcpdump, iperf3, wireguard-tools, curl, ...)
#   - rust-src for the nightly toolchain (eBPF programs build core from source)
#   - bpf-linker, linked against the same LLVM as that nightly (major version detected, not assumed)
#   - cargo-nextest
#   - the third-party systems veil runs beside, built from source with Go into the cache, once
#     (scripts/go-tools.sh: SPIRE, kube-apiserver, kubectl, etcd, helm, wireguard-go; versions there)
#   - boringtun-cli 0.7.1 from crates.io (interop tests, benchmark), built once into the cache
set -euo pipefail

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (apt packages, and veil itself needs root for netns/BPF)"

# --- Debian packages -------------------------------------------------------------------------
# containernetworking-plugins: the CNI reference plugins, host-local IPAM at /usr/lib/cni/host-local.
# iptables: the benchmark's kube-proxy-style rule set (svc-bench).
# faketime: libfaketime, a process's wall clock set back for the clock-jump test (scenario 38).
# gcc, libc6-dev: the linker rustc calls, and the C of crates built from source (mimalloc, the
# agent's allocator; ring).
PKGS=(iproute2 iputils-ping tcpdump iperf3 wireguard-tools curl procps ncat bpftool
      containernetworking-plugins iptables faketime gcc libc6-dev)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- Rust toolchains -------------------------------------------------------------------------
command -v rustup >/dev/null || die "rustup not found"
export PATH="$HOME/.cargo/bin:$PATH"
# A rustup without any toolchain (a fresh `rustup-init --default-toolchain none`): stable as
# the default, for the workspace's host crates.
if ! rustup show active-toolchain >/dev/null 2>&1; then
  say "installing the stable toolchain (minimal) as rustup's default"
  rustup toolchain install stable --profile minimal >/dev/null \
    || die "rustup could not install the stable toolchain"
  rustup default stable >/dev/null
fi
# rustfmt and clippy (scripts/test.sh checks formatting and lints); part of rustup's default
# profile, added here for minimal installs.
for c in rustfmt clippy; do
  rustup component list --installed 2>/dev/null | grep -q "^$c" || rustup component add "$c" >/dev/null
done
# The eBPF crate builds `core` for bpfel-unknown-none with -Z build-std: a nightly toolchain with
# rust-src (ARCHITECTURE.md says why nightly and not RUSTC_BOOTSTRAP on stable).
if ! rustup toolchain list | grep -q '^nightly'; then
  say "installing the nightly toolchain (minimal, with rust-src)"
  rustup toolchain install nightly --profile minimal --component rust-src >/dev/null \
    || die "rustup could not install the nightly toolchain"
fi
if ! rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src'; then
  say "adding rust-src to nightly"
  rustup component add rust-src --toolchain nightly >/dev/null
fi

# --- bpf-linker against the nightly's LLVM ---------------------------------------------------
sysroot=$(rustc +nightly --print sysroot)
llvm_major=$(rustc +nightly -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
[ -n "$llvm_major" ] || die "cannot read the nightly's LLVM version (rustc +nightly -vV)"
# VEIL_CACHE_DIR and VEIL_TOOL_ROOT (defaults ~/.cache/veil and ~/.cargo) let CI run this part
# from nothing in empty temporary directories (scripts/test.sh: the from-nothing check).
cache="${VEIL_CACHE_DIR:-$HOME/.cache/veil}"
tool_root="${VEIL_TOOL_ROOT:-$HOME/.cargo}"
mkdir -p "$cache"
stamp="$cache/bpf-linker.llvm"
if [ ! -x "$tool_root/bin/bpf-linker" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$llvm_major" ]; then
  # The toolchain ships libLLVM twice over: the ELF shared object (libLLVM.so.22.1-rust-…) and a
  # 43-byte linker script (libLLVM-22-rust-….so: "INPUT(libLLVM.so.22.1-…)") that rust-lld cannot
  # follow from another directory. Take the file whose first bytes are the ELF magic.
  so=""
  found=()
  for f in "$sysroot"/lib/libLLVM*.so*; do
    [ -f "$f" ] || continue
    found+=("$(basename "$f")")
    if [ "$(head -c 4 "$f" | od -An -c | tr -d ' ')" = '177ELF' ]; then so="$f"; break; fi
  done
  [ -n "$so" ] || die "no ELF libLLVM shared object in $sysroot/lib (found: ${found[*]:-nothing})"
  prefix="$cache/llvm-$llvm_major"
  mkdir -p "$prefix/lib"
  ln -sf "$so" "$prefix/lib/libLLVM.so"
  ln -sf "$so" "$prefix/lib/$(basename "$so")"
  say "building bpf-linker for LLVM $llvm_major against $(basename "$so") (about 2 minutes, once)"
  t0=$(date +%s)
  LLVM_PREFIX="$prefix" cargo install bpf-linker --locked --force --root "$tool_root" \
    --no-default-features --features "llvm-$llvm_major" >/dev/null 2>"$cache/bpf-linker-build.log" \
    || die "bpf-linker build failed; see $cache/bpf-linker-build.log"
  "$tool_root/bin/bpf-linker" --version >/dev/null 2>&1 \
    || die "the bpf-linker just built does not run ($tool_root/bin/bpf-linker)"
  say "bpf-linker built in $(( $(date +%s) - t0 )) s"
  echo "$llvm_major" >"$stamp"
fi

[ -n "${VEIL_SETUP_TOOLCHAIN_ONLY:-}" ] && { say "ok: toolchain (nightly LLVM $llvm_major, $("$tool_root/bin/bpf-linker" --version 2>/dev/null | head -n1))"; exit 0; }

# --- cargo-nextest ---------------------------------------------------------------------------
if ! cargo nextest --version >/dev/null 2>&1; then
  say "installing cargo-nextest"
  cargo install cargo-nextest --locked >/dev/null
fi

# --- SPIRE, kube-apiserver, kubectl, etcd, helm, wireguard-go (Go, from source) --------------
# Not in VEIL_SETUP_TOOLCHAIN_ONLY mode (that one exited above). Links in ${VEIL_TOOLS_BIN:-$cache/bin}.
# VEIL_SETUP_SKIP_GO_TOOLS=1: the caller runs go-tools.sh itself (scripts/test.sh, in the
# background beside the Rust build).
if [ -z "${VEIL_SETUP_SKIP_GO_TOOLS:-}" ]; then
  "$(dirname "$0")/go-tools.sh"
fi

# --- boringtun-cli 0.7.1 (crates.io) ---------------------------------------------------------
# The second independent WireGuard of the interop tests (tests/tests/interop.rs). Built once per
# machine into the directory the benchmark installs it in (benches/src/setup.rs:
# ~/.cache/veil/bench/boringtun-cli-0.7.1), so with the default cache directories one build
# serves both; linked beside wireguard-go, where the interop tests look.
bt_version=0.7.1
bt_root="$cache/bench/boringtun-cli-$bt_version"
if [ ! -x "$bt_root/bin/boringtun-cli" ]; then
  say "installing boringtun-cli $bt_version into $bt_root (about 2 minutes, once)"
  cargo install boringtun-cli --locked --version "$bt_version" --root "$bt_root" \
    >/dev/null 2>"$cache/boringtun-cli-build.log" \
    || die "cargo install boringtun-cli $bt_version failed; see $cache/boringtun-cli-build.log"
fi
tools_bin="${VEIL_TOOLS_BIN:-$cache/bin}"
mkdir -p "$tools_bin"
[ "$(readlink "$tools_bin/boringtun-cli" 2>/dev/null)" = "$bt_root/bin/boringtun-cli" ] \
  || ln -sfn "$bt_root/bin/boringtun-cli" "$tools_bin/boringtun-cli"

say "ok (nightly LLVM $llvm_major, $("$tool_root/bin/bpf-linker" --version 2>/dev/null | head -n1))"
