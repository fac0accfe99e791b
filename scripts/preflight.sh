#!/usr/bin/env bash
# Fails (never skips) when this machine cannot run veil's end-to-end tests: they need root,
# network namespaces, cgroup2 and BPF (program load and bpffs).
set -euo pipefail
fail() { printf 'preflight: FAIL: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || fail "not root: the lab needs root for netns, cgroups and BPF"
ns="veil-preflight-$$"
ip netns add "$ns" 2>/dev/null || fail "cannot create a network namespace (ip netns add)"
ip netns del "$ns"
grep -q ' - cgroup2 ' /proc/self/mountinfo || fail "no cgroup2 mount"
if ! grep -q ' /sys/fs/bpf .* - bpf ' /proc/self/mountinfo; then
  mount -t bpf bpf /sys/fs/bpf 2>/dev/null || fail "cannot mount bpffs at /sys/fs/bpf"
fi
probe=$(bpftool feature probe kernel 2>/dev/null || true)
grep -q "eBPF program_type sched_cls is available" <<<"$probe" \
  || fail "the kernel cannot load TC (sched_cls) BPF programs"
[ -e /dev/net/tun ] || fail "no /dev/net/tun (the userspace WireGuard backend needs TUN)"
# tcx (Linux 6.6+) is how veil attaches TC programs here; report it, with the kernel version.
kernel=$(uname -r)
major=${kernel%%.*}; rest=${kernel#*.}; minor=${rest%%[!0-9]*}
if [ "$major" -gt 6 ] || { [ "$major" -eq 6 ] && [ "$minor" -ge 6 ]; }; then tcx=yes; else tcx=no; fi
echo "preflight: ok (root, netns, cgroup2, bpffs, sched_cls BPF, TUN; kernel $kernel, tcx: $tcx)"
