#!/usr/bin/env bash
# A throwaway Kubernetes control plane (etcd + kube-apiserver, nothing else) with all of its
# state under one directory, for checks that need a real apiserver (scripts/check-deploy.sh).
#
#   scripts/kube-apiserver.sh start DIR   start it; prints the kubeconfig path when /readyz is ok
#   scripts/kube-apiserver.sh stop DIR    stop both processes and remove DIR
#
# Everything listens on 127.0.0.1 only, on free ports picked at start (so several can run side
# by side); the Service range is 198.18.16.0/20 (inside 198.18.0.0/15, never routed). TLS: a
# CA, the apiserver's serving certificate and an admin client certificate (group
# system:masters), all made with openssl in DIR; authorization Node,RBAC as on a real cluster;
# service-account tokens signed with a key made in DIR.
#
# DIR/admin.kubeconfig  the admin credentials (absolute paths into DIR)
# DIR/env               KUBE_SERVER, ETCD_URL, KUBECONFIG: source it
# DIR/*.log             etcd.log, kube-apiserver.log
#
# `start` on a DIR that already runs does nothing; on a DIR left by a crashed run it stops what
# is left and starts afresh. `stop` on a missing DIR does nothing. Neither touches a DIR that
# this script did not make (it looks for DIR/.veil-kube-apiserver).
#
# Binaries: $VEIL_TOOLS_BIN or ~/.cache/veil/bin (kube-apiserver, etcd, kubectl; scripts/setup.sh
# builds them with VEIL_GO_TOOLS including "etcd kubernetes").
# VEIL_KUBE_START_TIMEOUT: seconds to wait for /readyz (default 120).
set -euo pipefail

MARKER=.veil-kube-apiserver
bin="${VEIL_TOOLS_BIN:-${VEIL_CACHE_DIR:-$HOME/.cache/veil}/bin}"

say() { printf 'kube-apiserver.sh: %s\n' "$*"; }
die() { printf 'kube-apiserver.sh: error: %s\n' "$*" >&2; exit 1; }
usage() { die "usage: $0 start DIR | stop DIR"; }

[ $# -eq 2 ] || usage
cmd=$1
[ -n "$2" ] || usage
# Absolute, so the pid checks (which look for DIR in the command line) and the kubeconfig work
# from any directory.
dir=$(realpath -m -- "$2")
case "$dir" in /|/root|/home|/tmp|/var|/usr|/etc|"$HOME") die "refusing DIR=$dir" ;; esac

# is_ours PIDFILE: the pid in it is alive and its command line names DIR (a recycled pid of an
# unrelated process is never signalled).
is_ours() {
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  { tr '\0' ' ' <"/proc/$pid/cmdline"; } 2>/dev/null | grep -qF -- "$dir/"
}

stop_one() {  # stop_one NAME: TERM, up to 10 s, then KILL
  local f="$dir/$1.pid" pid i
  is_ours "$f" || { rm -f "$f"; return 0; }
  pid=$(cat "$f")
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do
    is_ours "$f" || break
    sleep 0.1
  done
  if is_ours "$f"; then
    say "$1 (pid $pid) did not stop in 10 s; killing it"
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do is_ours "$f" || break; sleep 0.1; done
  fi
  is_ours "$f" && die "$1 (pid $pid) is still running"
  rm -f "$f"
}

do_stop() {
  [ -e "$dir" ] || return 0
  [ -f "$dir/$MARKER" ] || die "$dir was not made by this script (no $MARKER); not touching it"
  # The apiserver first: stopped after etcd it would log a burst of connection errors.
  stop_one kube-apiserver
  stop_one etcd
  rm -rf -- "$dir"
}

# A port on 127.0.0.1 that nothing listens on, below the ephemeral range (32768-60999) so an
# outgoing connection cannot take it between this check and the bind. The bind itself is the
# real check: a lost race makes the process exit and start fails with its log.
taken=" "
free_port() {
  local p i
  for ((i = 0; i < 200; i++)); do
    p=$(( 20000 + RANDOM % 12000 ))
    case "$taken" in *" $p "*) continue ;; esac
    if [ -z "$(ss -Htln "sport = :$p" 2>/dev/null)" ]; then
      taken+="$p "
      echo "$p"
      return 0
    fi
  done
  die "no free port found on 127.0.0.1"
}

# openssl: a P-256 key and a certificate signed by the CA in DIR.
issue() {  # issue NAME SUBJECT EXTENSIONS
  local n=$1 subj=$2 ext=$3
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$dir/pki/$n.key" 2>/dev/null
  openssl req -new -key "$dir/pki/$n.key" -subj "$subj" -out "$dir/pki/$n.csr"
  printf '%s\n' "$ext" >"$dir/pki/$n.ext"
  openssl x509 -req -in "$dir/pki/$n.csr" -CA "$dir/pki/ca.crt" -CAkey "$dir/pki/ca.key" \
    -set_serial "0x$(openssl rand -hex 16)" -days 2 -extfile "$dir/pki/$n.ext" \
    -out "$dir/pki/$n.crt" 2>/dev/null
  rm -f "$dir/pki/$n.csr"
}

make_pki() {
  mkdir -p "$dir/pki"
  chmod 700 "$dir/pki"
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$dir/pki/ca.key" 2>/dev/null
  openssl req -x509 -new -key "$dir/pki/ca.key" -subj "/CN=veil throwaway kube CA" -days 2 \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$dir/pki/ca.crt"
  # The names in-cluster clients use, the Service IP the apiserver gives itself (the first of
  # the range) and the loopback address it actually listens on.
  issue apiserver "/CN=kube-apiserver" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,IP:198.18.16.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  issue admin "/O=system:masters/CN=veil-admin" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth"
  # Service-account token signing key (ES256).
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$dir/pki/sa.key" 2>/dev/null
  openssl pkey -in "$dir/pki/sa.key" -pubout -out "$dir/pki/sa.pub"
}

write_kubeconfig() {  # write_kubeconfig URL
  cat >"$dir/admin.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: throwaway
  cluster:
    server: $1
    certificate-authority: $dir/pki/ca.crt
users:
- name: admin
  user:
    client-certificate: $dir/pki/admin.crt
    client-key: $dir/pki/admin.key
contexts:
- name: admin@throwaway
  context: {cluster: throwaway, user: admin}
current-context: admin@throwaway
EOF
  chmod 600 "$dir/admin.kubeconfig"
}

log_tail() {  # log_tail NAME
  printf 'kube-apiserver.sh: last lines of %s:\n' "$dir/$1.log" >&2
  tail -n 20 "$dir/$1.log" 2>/dev/null | sed 's/^/  | /' >&2
}

on_start_exit() {  # a start that fails after DIR was made leaves nothing running
  if [ "$1" -ne 0 ]; then do_stop || true; fi
}

do_start() {
  local b
  for b in etcd kube-apiserver kubectl; do
    [ -x "$bin/$b" ] || die "$bin/$b is missing: run VEIL_GO_TOOLS=\"etcd kubernetes\" scripts/setup.sh"
  done
  command -v openssl >/dev/null || die "openssl is missing"
  if [ -f "$dir/$MARKER" ]; then
    if is_ours "$dir/etcd.pid" && is_ours "$dir/kube-apiserver.pid" \
      && "$bin/kubectl" --kubeconfig "$dir/admin.kubeconfig" get --raw /readyz >/dev/null 2>&1; then
      say "already running in $dir"
      echo "$dir/admin.kubeconfig"
      return 0
    fi
    say "$dir holds a stopped or half-started control plane; removing it"
    do_stop
  elif [ -e "$dir" ] && [ -n "$(ls -A "$dir")" ]; then
    die "$dir exists, is not empty and was not made by this script"
  fi
  mkdir -p "$dir"
  : >"$dir/$MARKER"
  # A failure from here on leaves nothing running.
  trap 'on_start_exit $?' EXIT

  local t0=$SECONDS
  make_pki
  local etcd_port peer_port api_port
  etcd_port=$(free_port); peer_port=$(free_port); api_port=$(free_port)
  local etcd_url="http://127.0.0.1:$etcd_port" api_url="https://127.0.0.1:$api_port"

  # Single member, plain HTTP on loopback (only the apiserver talks to it); no fsync: the data
  # is thrown away anyway.
  "$bin/etcd" --name throwaway --data-dir "$dir/etcd" \
    --listen-client-urls "$etcd_url" --advertise-client-urls "$etcd_url" \
    --listen-peer-urls "http://127.0.0.1:$peer_port" \
    --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
    --initial-cluster "throwaway=http://127.0.0.1:$peer_port" \
    --unsafe-no-fsync --log-level warn >"$dir/etcd.log" 2>&1 </dev/null &
  echo $! >"$dir/etcd.pid"
  disown  # stopped by pid (do_stop), not as this shell's job

  # --advertise-address: the apiserver puts it in the `kubernetes` Service's endpoints, which
  # refuse loopback addresses; 198.18.255.254 (benchmark range, assigned nowhere) is only
  # written there, never bound or dialled. The apiserver binds 127.0.0.1 only.
  "$bin/kube-apiserver" \
    --etcd-servers "$etcd_url" \
    --bind-address 127.0.0.1 --secure-port "$api_port" --advertise-address 198.18.255.254 \
    --tls-cert-file "$dir/pki/apiserver.crt" --tls-private-key-file "$dir/pki/apiserver.key" \
    --client-ca-file "$dir/pki/ca.crt" --cert-dir "$dir/cert-dir" \
    --authorization-mode Node,RBAC --allow-privileged=true \
    --service-account-key-file "$dir/pki/sa.pub" \
    --service-account-signing-key-file "$dir/pki/sa.key" \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-cluster-ip-range 198.18.16.0/20 \
    --profiling=false \
    >"$dir/kube-apiserver.log" 2>&1 </dev/null &
  echo $! >"$dir/kube-apiserver.pid"
  disown

  write_kubeconfig "$api_url"
  cat >"$dir/env" <<EOF
KUBE_SERVER=$api_url
ETCD_URL=$etcd_url
KUBECONFIG=$dir/admin.kubeconfig
EOF

  # Ready when /readyz says so (etcd reachable, post-start hooks done: RBAC bootstrap roles,
  # system priority classes); give up at the deadline or as soon as either process is gone.
  local deadline=$(( SECONDS + ${VEIL_KUBE_START_TIMEOUT:-120} )) out=""
  while :; do
    if out=$("$bin/kubectl" --kubeconfig "$dir/admin.kubeconfig" --request-timeout 5s \
      get --raw /readyz 2>&1) && [ "$out" = ok ]; then
      break
    fi
    is_ours "$dir/etcd.pid" || { log_tail etcd; die "etcd exited during start"; }
    is_ours "$dir/kube-apiserver.pid" || { log_tail kube-apiserver; die "kube-apiserver exited during start"; }
    if [ $SECONDS -ge $deadline ]; then
      log_tail kube-apiserver
      die "kube-apiserver not ready after ${VEIL_KUBE_START_TIMEOUT:-120} s (last answer: ${out:0:200})"
    fi
    sleep 0.5
  done
  trap - EXIT
  say "ready in $(( SECONDS - t0 )) s: $api_url (etcd $etcd_url), state in $dir"
  echo "$dir/admin.kubeconfig"
}

case "$cmd" in
  start) do_start ;;
  stop) do_stop ;;
  *) usage ;;
esac
