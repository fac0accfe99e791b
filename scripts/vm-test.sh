#!/usr/bin/env bash
# Runs a shell command inside a QEMU VM that boots Debian bookworm's own kernel
# (linux-image-amd64, 6.1, which ships the wireguard module), so the end-to-end tests can run
# against real kernel WireGuard on hosts whose kernel has none.
#
#   scripts/vm-test.sh             (the kernel-WireGuard suite: builds this workspace's release
#                                   binaries and the test binaries it needs on the host, then
#                                   runs scripts/vm-suite.sh in the VM; prints
#                                   `vm-test: N passed, M failed`, exits non-zero on a failure;
#                                   VEIL_TEST_IP_FAMILY=ipv6 runs it all on an IPv6 underlay;
#                                   VEIL_VM_TESTS='node_traffic' VEIL_VM_ROUNDS=0 only the tests
#                                   whose names hold those words, without the measurement)
#   scripts/vm-test.sh --run 'COMMAND' [--timeout SECONDS] [--results DIR] [--log FILE]
#                      [--share DIR]... [--verbose]
#   scripts/vm-test.sh --build     (only build the cached image, then exit)
#
# - Idempotent from nothing: installs qemu-system-x86, qemu-utils (qemu-img), debootstrap and
#   e2fsprogs with apt-get when missing.
# - Root file system built once per machine with debootstrap (minbase + the packages below) and
#   turned into an ext4 image with `mkfs.ext4 -d` (no loop mounts), cached with the kernel and
#   initrd in ~/.cache/veil/vm/image-<hash>/; the hash covers the package list, the guest stub
#   init and the recipe revision, so changing any of them rebuilds. Built under a temporary name
#   and renamed at the end: an interrupted build is never used.
# - Each run boots from a qcow2 copy-on-write overlay in a temporary directory (the cached image
#   is never written). Shared read-only over 9p at the same paths as on the host: this workspace
#   and ~/.cache/veil (which holds bin/ and the go-tools/ and bench/ trees its symlinks point
#   into), plus any --share DIR. A read-write results share is mounted at /vm-results.
# - The image holds only a stub init (/usr/local/sbin/veil-vm-init) that mounts the results share
#   and execs init.sh from it; this script writes init.sh fresh every run, so changing the guest
#   init needs no rebuild. The command travels as /vm-results/cmd.sh, never on the kernel
#   command line; the guest writes its exit status to /vm-results/exit-status and powers off.
# - The guest console (ttyS0) streams to stdout and to the log file; --timeout (default 1800 s; 3600 for the suite)
#   kills QEMU. Exit status: the guest command's, or 124 on timeout, or 125 when the VM ended
#   without reporting one. KVM when /dev/kvm can run this guest (probed once, cached), else TCG;
#   VEIL_VM_ACCEL=kvm|tcg overrides the probe.
set -euo pipefail

say() { printf 'vm-test: %s\n' "$*"; }
die() { printf 'vm-test: error: %s\n' "$*" >&2; exit 1; }

# --- arguments -------------------------------------------------------------------------------
cmd="" build_only=0 timeout_s="" results_keep="" log="" verbose=0
shares=()
while [ $# -gt 0 ]; do
  case "$1" in
    --run) [ $# -ge 2 ] || die "--run needs a shell command"; cmd="$2"; shift 2 ;;
    --timeout) [ $# -ge 2 ] || die "--timeout needs a number of seconds"; timeout_s="$2"; shift 2 ;;
    --results) [ $# -ge 2 ] || die "--results needs a directory"; results_keep="$2"; shift 2 ;;
    --log) [ $# -ge 2 ] || die "--log needs a file"; log="$2"; shift 2 ;;
    --share) [ $# -ge 2 ] || die "--share needs a directory"; shares+=("$2"); shift 2 ;;
    --build) build_only=1; shift ;;
    --verbose) verbose=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done
[ -z "$timeout_s" ] || [[ "$timeout_s" =~ ^[1-9][0-9]*$ ]] || die "--timeout must be a positive number of seconds, not '$timeout_s'"
[ "$(id -u)" -eq 0 ] || die "run as root (debootstrap, and the image holds root-owned files)"

repo=$(cd "$(dirname "$0")/.." && pwd)
cache="${VEIL_CACHE_DIR:-$HOME/.cache/veil}"
vmcache="$cache/vm"
mkdir -p "$vmcache"
log="${log:-$vmcache/console.log}"

# --- the default suite: release binaries and test binaries from this workspace ---------------
if [ "$build_only" -eq 0 ] && [ -z "$cmd" ]; then
  export PATH="$HOME/.cargo/bin:$PATH"
  command -v cargo >/dev/null || die "cargo not found: run scripts/setup.sh first"
  say "building the release binaries and the transport, auth and attach test binaries"
  (cd "$repo" && cargo build --release --locked --workspace --bins) >&2 \
    || die "cargo build --release failed"
  tests_json=$(cd "$repo" && cargo test --release --locked -p veil-tests --test transport \
    --test auth --test attach --no-run --message-format=json 2>/dev/null) \
    || die "building the test binaries failed (cargo test --no-run)"
  test_bins=$(printf '%s\n' "$tests_json" | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["target"]["name"] + "=" + m["executable"])')
  [ "$(printf '%s\n' "$test_bins" | grep -c .)" -eq 3 ] \
    || die "expected 3 test binaries (transport, auth, attach), found: $test_bins"
  cmd="bash $repo/scripts/vm-suite.sh $(printf '%s\n' "$test_bins" | tr '\n' ' ')"
  # The labs' family travels into the guest (ipv6: the whole suite on an IPv6 underlay).
  case ${VEIL_TEST_IP_FAMILY:-} in
    "") ;;
    ipv4 | ipv6 | dual) cmd="VEIL_TEST_IP_FAMILY=$VEIL_TEST_IP_FAMILY $cmd" ;;
    *) die "VEIL_TEST_IP_FAMILY must be ipv4, ipv6 or dual, not '$VEIL_TEST_IP_FAMILY'" ;;
  esac
  # A targeted rerun (scripts/vm-suite.sh): some tests only, the measurement skipped.
  if [ -n "${VEIL_VM_TESTS:-}" ]; then
    [[ $VEIL_VM_TESTS =~ ^[A-Za-z0-9_:\ ]+$ ]] \
      || die "VEIL_VM_TESTS holds test-name words (letters, digits, _ and ::), not '$VEIL_VM_TESTS'"
    cmd="VEIL_VM_TESTS='$VEIL_VM_TESTS' $cmd"
  fi
  if [ -n "${VEIL_VM_ROUNDS:-}" ]; then
    [[ $VEIL_VM_ROUNDS =~ ^[0-9]+$ ]] || die "VEIL_VM_ROUNDS must be a number, not '$VEIL_VM_ROUNDS'"
    cmd="VEIL_VM_ROUNDS=$VEIL_VM_ROUNDS $cmd"
  fi
  timeout_s=${timeout_s:-3600}
fi
timeout_s=${timeout_s:-1800}

# --- host packages ---------------------------------------------------------------------------
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
if [ "${#need[@]}" -gt 0 ]; then
  say "installing Debian packages: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null || die "apt-get update failed"
  apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null \
    || die "apt-get install ${need[*]} failed"
fi

# --- the image -------------------------------------------------------------------------------
SUITE=bookworm
# Recipe revision: bump when the build steps below change in a way the lists do not show.
RECIPE=1
GUEST_PKGS=(linux-image-amd64 initramfs-tools kmod udev iproute2 iputils-ping tcpdump iperf3
            wireguard-tools curl procps ncat bpftool iptables containernetworking-plugins
            ca-certificates util-linux)
# Modules the initramfs loads itself (virtio disk), besides udev's coldplug.
INITRD_MODULES=(virtio_pci virtio_blk ext4)

# The stub init baked into the image: reach the results share, exec the per-run init from it.
# The initramfs has usually moved /proc, /sys, /dev and /run here already.
read -r -d '' STUB_INIT <<'EOF' || true
#!/bin/sh
# veil-vm-init (stub, from scripts/vm-test.sh): mounts the results share and runs the per-run
# init that vm-test.sh writes there. Powers off if it cannot.
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH
mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
modprobe -q 9pnet_virtio; modprobe -q 9p
mkdir -p /vm-results
if mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,cache=none results /vm-results \
   && [ -f /vm-results/init.sh ]; then
  exec /bin/bash /vm-results/init.sh
fi
echo "veil-vm-init: cannot mount the results share or find init.sh there; powering off" >&2
echo o > /proc/sysrq-trigger
sleep 60
EOF

key=$(printf '%s\n' "$SUITE" "$RECIPE" "${GUEST_PKGS[*]}" "${INITRD_MODULES[*]}" "$STUB_INIT" \
      | sha256sum | cut -c1-12)
img="$vmcache/image-$key"

# The mirror apt uses for bookworm (deb822 .sources or one-line .list), else deb.debian.org.
host_mirror() {
  local f uri
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    uri=$(awk -v s="$SUITE" '
      /^[[:space:]]*$/ { if (ok && u != "") { print u; exit } ; u=""; ok=0; next }
      /^URIs:/ { u=$2 } /^Suites:/ { for (i=2;i<=NF;i++) if ($i==s) ok=1 }
      END { if (ok && u != "") print u }' "$f" | head -n1)
    [ -n "$uri" ] && { echo "$uri"; return; }
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    uri=$(awk -v s="$SUITE" '$1=="deb" { i=2; if ($2 ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
          if ($(i+1)==s) { print $i; exit } }' "$f")
    [ -n "$uri" ] && { echo "$uri"; return; }
  done
  echo http://deb.debian.org/debian
}

build_image() {
  local mirror tmp root t0 kver
  mirror=$(host_mirror)
  tmp="$vmcache/.build-$key.$$"
  root="$tmp/root"
  rm -rf "$tmp"; mkdir -p "$tmp"
  # Leave nothing half-built behind (debootstrap unmounts its own /proc and /sys).
  trap 'for m in proc sys dev/pts dev; do umount -l "$root/$m" 2>/dev/null || true; done; rm -rf "$tmp"' EXIT
  t0=$(date +%s)
  say "building the VM image (debootstrap $SUITE minbase from $mirror; a few minutes, once)"
  local pkgs
  pkgs=$(IFS=,; echo "${GUEST_PKGS[*]}")
  if ! debootstrap --variant=minbase --include="$pkgs" "$SUITE" "$root" "$mirror" \
       >"$tmp/debootstrap.log" 2>&1; then
    tail -n 30 "$tmp/debootstrap.log" >&2
    [ -f "$root/debootstrap/debootstrap.log" ] && tail -n 30 "$root/debootstrap/debootstrap.log" >&2
    die "debootstrap $SUITE from $mirror failed (log above)"
  fi
  # Guest configuration: stub init, hostname, no fstab entries, virtio modules in the initramfs.
  install -D -m 0755 /dev/stdin "$root/usr/local/sbin/veil-vm-init" <<<"$STUB_INIT"
  echo veil-vm >"$root/etc/hostname"
  printf '127.0.0.1 localhost\n127.0.1.1 veil-vm\n::1 localhost ip6-localhost ip6-loopback\n' \
    >"$root/etc/hosts"
  : >"$root/etc/fstab"
  printf '%s\n' "${INITRD_MODULES[@]}" 9pnet_virtio 9p >>"$root/etc/initramfs-tools/modules"
  kver=$(ls "$root/lib/modules" | sort -V | tail -n1)
  [ -n "$kver" ] || die "no kernel modules in the image (linux-image-amd64 not installed?)"
  chroot "$root" /usr/sbin/update-initramfs -u -k "$kver" >"$tmp/initramfs.log" 2>&1 \
    || { cat "$tmp/initramfs.log" >&2; die "update-initramfs in the image failed"; }
  mkdir -p "$tmp/out"
  cp "$root/boot/vmlinuz-$kver" "$tmp/out/vmlinuz" || die "no /boot/vmlinuz-$kver in the image"
  cp "$root/boot/initrd.img-$kver" "$tmp/out/initrd.img" || die "no /boot/initrd.img-$kver in the image"
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root/debootstrap"
  printf '%s\n' "${GUEST_PKGS[@]}" >"$tmp/out/packages"
  echo "$kver" >"$tmp/out/kernel-release"
  # ext4 straight from the directory: no loop device, no mount. Sparse 4 GiB.
  mkfs.ext4 -q -F -L veil-root -E root_owner=0:0 -d "$root" "$tmp/out/rootfs.ext4" 4G >/dev/null \
    || die "mkfs.ext4 -d $root failed"
  rm -rf "$img"
  mv "$tmp/out" "$img"
  rm -rf "$tmp"
  trap - EXIT
  # Older images (another package list) are dead weight: about 1 GB each.
  for old in "$vmcache"/image-*; do
    [ "$old" = "$img" ] || rm -rf "$old"
  done
  say "image built in $(( $(date +%s) - t0 )) s: $img (kernel $kver)"
}

if [ ! -f "$img/rootfs.ext4" ]; then
  exec 9>"$vmcache/build.lock"
  flock 9
  [ -f "$img/rootfs.ext4" ] || build_image
  flock -u 9
fi
[ "$build_only" -eq 0 ] || { say "image ready: $img"; exit 0; }

# --- accelerator -----------------------------------------------------------------------------
# /dev/kvm may exist yet not run a stock guest (e.g. a PVM host: no VMX, kvm_pvm runs only
# PVM-built guest kernels). So the probe boots this very kernel under KVM, with no disk, and
# waits for its first console line; the answer is cached per host kernel and image.
kvm_probe() {
  local out="$1/kvm-probe.log"
  [ -r /dev/kvm ] && [ -w /dev/kvm ] || return 1
  # Opening the device and creating a VM with vCPUs (fast; fails outright on some hosts).
  timeout 20 qemu-system-x86_64 -accel kvm -cpu host -machine q35 -m 64 -nodefaults \
    -display none -monitor none -S </dev/null >"$out" 2>&1 &
  local p=$!
  sleep 2
  if ! kill -0 "$p" 2>/dev/null; then wait "$p" || true; return 1; fi
  kill "$p" 2>/dev/null; wait "$p" 2>/dev/null || true
  # A real boot: the kernel must print its banner within 30 s (it does in well under 1 s).
  timeout 30 qemu-system-x86_64 -accel kvm -cpu host -machine q35 -m 256 -nodefaults \
    -no-user-config -display none -monitor none -serial stdio -no-reboot \
    -kernel "$img/vmlinuz" -append "console=ttyS0 panic=-1 earlyprintk=ttyS0" \
    </dev/null >"$out" 2>&1 &
  p=$!
  local i
  for i in $(seq 1 60); do
    grep -q 'Linux version' "$out" 2>/dev/null && break
    kill -0 "$p" 2>/dev/null || break
    sleep 0.5
  done
  kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true
  grep -q 'Linux version' "$out"
}

# --- run -------------------------------------------------------------------------------------
tmp=$(mktemp -d /tmp/veil-vm-XXXXXX)
qpid=""
cleanup() {
  if [ -n "$qpid" ] && kill -0 "$qpid" 2>/dev/null; then
    kill "$qpid" 2>/dev/null || true
    sleep 1
    kill -9 "$qpid" 2>/dev/null || true
  fi
  if [ -f "$tmp/qemu.pid" ]; then
    local p; p=$(cat "$tmp/qemu.pid" 2>/dev/null || true)
    [ -n "$p" ] && kill -9 "$p" 2>/dev/null || true
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'say "interrupted; stopping QEMU" >&2; exit 130' INT
trap 'say "terminated; stopping QEMU" >&2; exit 143' TERM

probe_key="$(uname -r)-$key"
probe_file="$vmcache/kvm-probe"
case "${VEIL_VM_ACCEL:-}" in
  kvm) kvm=yes ;;
  tcg) kvm=no ;;
  "")
    if [ "$(cut -d' ' -f1 "$probe_file" 2>/dev/null)" != "$probe_key" ]; then
      say "probing whether KVM can boot this guest (once per host kernel and image)"
      if kvm_probe "$tmp" 2>/dev/null; then kvm=yes; else kvm=no; fi
      echo "$probe_key $kvm" >"$probe_file"
    fi
    kvm=$(cut -d' ' -f2 "$probe_file") ;;
  *) die "VEIL_VM_ACCEL must be kvm, tcg or unset, not '$VEIL_VM_ACCEL'" ;;
esac
if [ "$kvm" = yes ]; then
  accel=(-enable-kvm -cpu host)
  say "accelerator: KVM"
else
  accel=(-accel tcg,thread=multi -cpu max)
  say "note: /dev/kvm cannot run this guest here (probe cached in $probe_file); using TCG emulation (slower)"
fi

results="${results_keep:-$tmp/results}"
mkdir -p "$results"
results=$(cd "$results" && pwd)
rm -f "$results/exit-status"
printf '%s\n' "$cmd" >"$results/cmd.sh"

# Read-only shares at the same path inside: the workspace, the veil cache (bin/ links into
# go-tools/ and bench/ there), and any --share.
ro_paths=("$repo")
[ -d "$cache" ] && ro_paths+=("$(cd "$cache" && pwd)")
for s in "${shares[@]}"; do
  [ -d "$s" ] || die "--share $s: not a directory"
  ro_paths+=("$(cd "$s" && pwd)")
done
virtfs=(-virtfs "local,path=$results,mount_tag=results,security_model=none")
mounts=""
i=0
for p in "${ro_paths[@]}"; do
  virtfs+=(-virtfs "local,path=$p,mount_tag=ro$i,security_model=none,readonly=on")
  mounts+="ro$i $(printf '%q' "$p")"$'\n'
  i=$((i + 1))
done

# The per-run init (bash, PID 1 in the guest).
{
  echo '#!/bin/bash'
  echo '# veil VM init for one run, written by scripts/vm-test.sh.'
  printf 'WORKDIR=%q\n' "$repo"
  echo 'MOUNTS=$(cat <<"MOUNTS_EOF"'
  printf '%s' "$mounts"
  echo 'MOUNTS_EOF'
  echo ')'
  cat <<'EOF'
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=dumb LANG=C.UTF-8
R=/vm-results
off() { sync; echo o >/proc/sysrq-trigger; sleep 30; }
trap off EXIT
m() { mountpoint -q "$2" || { mkdir -p "$2" && mount -t "$1" "${@:3}" "$1" "$2"; } \
  || echo "veil-vm-init: cannot mount $1 at $2" >&2; }
m proc /proc
m sysfs /sys
m devtmpfs /dev -o mode=0755
m devpts /dev/pts -o gid=5,mode=620,ptmxmode=666
m tmpfs /dev/shm -o mode=1777,nosuid,nodev
m tmpfs /run -o mode=0755,nosuid,nodev
m tmpfs /tmp -o mode=1777,nosuid,nodev
m cgroup2 /sys/fs/cgroup
m bpf /sys/fs/bpf -o mode=0700
m debugfs /sys/kernel/debug
m tracefs /sys/kernel/tracing
mkdir -p /run/netns /var/run
[ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd
mount -o remount,rw / 2>/dev/null || true
echo veil-vm >/proc/sys/kernel/hostname
ip link set lo up
modprobe wireguard || echo "veil-vm-init: modprobe wireguard failed" >&2
modprobe tun 2>/dev/null || true
while read -r tag path; do
  [ -n "$tag" ] || continue
  eval "path=$path"
  mkdir -p "$path"
  mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,cache=mmap,ro "$tag" "$path" \
    || echo "veil-vm-init: cannot mount share $tag at $path" >&2
done <<<"$MOUNTS"
echo "veil-vm-init: ready (kernel $(uname -r)); running the command"
cd "$WORKDIR" 2>/dev/null || cd /
bash "$R/cmd.sh" </dev/null
rc=$?
echo "$rc" >"$R/exit-status.tmp" && mv "$R/exit-status.tmp" "$R/exit-status"
echo "veil-vm-init: command exited $rc; powering off"
EOF
} >"$results/init.sh"
chmod +x "$results/init.sh"

qemu-img create -q -f qcow2 -b "$img/rootfs.ext4" -F raw "$tmp/overlay.qcow2" \
  || die "qemu-img could not create the overlay on $img/rootfs.ext4"

append="root=/dev/vda rw rootfstype=ext4 console=ttyS0 panic=-1 init=/usr/local/sbin/veil-vm-init"
[ "$verbose" -eq 1 ] || append+=" quiet loglevel=3"
mkdir -p "$(dirname "$log")"
: >"$log"
say "booting $(cat "$img/kernel-release") (timeout ${timeout_s} s; console log: $log)"
t0=$(date +%s)
qemu-system-x86_64 -name veil-vm -machine q35 "${accel[@]}" -m 6G -smp 2 \
  -nographic -nodefaults -no-user-config -no-reboot -serial stdio -monitor none \
  -kernel "$img/vmlinuz" -initrd "$img/initrd.img" -append "$append" \
  -drive "file=$tmp/overlay.qcow2,format=qcow2,if=virtio,cache=unsafe" \
  -device virtio-rng-pci -fw_cfg name=etc/sercon-port,string=0 \
  "${virtfs[@]}" -pidfile "$tmp/qemu.pid" </dev/null >>"$log" 2>"$tmp/qemu.stderr" &
qpid=$!
tail -n +1 -s 0.2 -f --pid="$qpid" "$log" &
tpid=$!
timed_out=0
while kill -0 "$qpid" 2>/dev/null; do
  if [ $(( $(date +%s) - t0 )) -ge "$timeout_s" ]; then
    timed_out=1
    kill "$qpid" 2>/dev/null || true
    sleep 2
    kill -9 "$qpid" 2>/dev/null || true
    break
  fi
  sleep 0.5
done
qrc=0
wait "$qpid" 2>/dev/null || qrc=$?
qpid=""
wait "$tpid" 2>/dev/null || true
elapsed=$(( $(date +%s) - t0 ))
# QEMU's own messages (SeaBIOS is silenced with etc/sercon-port, which QEMU warns about).
grep -v 'sercon-port' "$tmp/qemu.stderr" | sed 's/^/vm-test: qemu: /' | tee -a "$log" >&2 || true

if [ "$timed_out" -eq 1 ]; then
  say "error: timed out after ${timeout_s} s; QEMU killed (console log: $log)" >&2
  exit 124
fi
if [ ! -f "$results/exit-status" ]; then
  say "error: the VM ended (QEMU exit $qrc) after ${elapsed} s without reporting an exit status (console log: $log)" >&2
  exit 125
fi
rc=$(cat "$results/exit-status")
[[ "$rc" =~ ^[0-9]+$ ]] || { say "error: unreadable exit status '$rc' from the guest" >&2; exit 125; }
say "guest command exited $rc (VM run ${elapsed} s)"
exit "$rc"
