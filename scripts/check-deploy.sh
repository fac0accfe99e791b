#!/usr/bin/env bash
# Checks what veil ships for clusters (deploy/) against a real kube-apiserver:
#
#   scripts/check-deploy.sh            the checks below; exit 1 on the first failure
#   scripts/check-deploy.sh --update   regenerate deploy/*.yaml and deploy/crds/ from the chart
#
# One source of truth: the Helm chart deploy/helm/veil. The plain manifests (deploy/namespace.yaml,
# rbac.yaml, configmap.yaml, daemonset.yaml, crds/*.yaml) are the chart rendered with its
# default values (`helm template veil deploy/helm/veil --namespace veil-system`, the Namespace
# with createNamespace=true), written by --update; the check fails when they differ.
#
# Checks, each timed:
#   1. helm lint --strict (nothing but INFO allowed), with the defaults and with the other switches,
#      and values.schema.json refusing bad values;
#   2. the plain manifests are the chart's rendering (diff);
#   3. a throwaway etcd + kube-apiserver (scripts/kube-apiserver.sh, under a temp dir);
#   4. kubectl apply -f deploy/crds/ for real, until every CRD is Established;
#   5. kubectl apply --dry-run=server of the rendered chart and of the plain manifests (no
#      warnings allowed);
#   6. every examples/policies/*.yaml and the policies in tests/src/lib.rs (AUTH_POLICY ...)
#      accepted (--dry-run=server, their namespaces created first);
#   7. schema-violating policies and identities refused by the apiserver with the expected
#      message; unknown policy fields kept, not pruned (a pruned field could widen a policy);
#   8. RBAC applied for real: the veil service account can do what the agent needs and no more
#      (kubectl auth can-i --as);
#   9. the node guard (deploy/node-guard.yaml) applied for real: with a token bound to node-a,
#      the service account changes node-a's veil.dev/ annotations and nothing else of any Node.
set -euo pipefail
cd "$(dirname "$0")/.."

bin="${VEIL_TOOLS_BIN:-${VEIL_CACHE_DIR:-$HOME/.cache/veil}/bin}"
H="$bin/helm"
K="$bin/kubectl"
CHART=deploy/helm/veil
NS=veil-system
SA="system:serviceaccount:$NS:veil"

say() { printf 'check-deploy: %s\n' "$*"; }
die() { printf 'check-deploy: FAILED: %s\n' "$*" >&2; exit 1; }
for b in helm kubectl; do
  [ -x "$bin/$b" ] || die "$bin/$b is missing: run VEIL_GO_TOOLS=\"etcd helm kubernetes\" scripts/setup.sh"
done

tmp=$(mktemp -d /tmp/veil-check-deploy-XXXXXX)
cleanup() {
  if [ -e "$tmp/kube" ]; then scripts/kube-apiserver.sh stop "$tmp/kube" >/dev/null || true; fi
  rm -rf -- "$tmp"
}
trap cleanup EXIT
# Helm keeps its caches and config away from $HOME (a lint or template needs none of them).
export HELM_CACHE_HOME="$tmp/helm/cache" HELM_CONFIG_HOME="$tmp/helm/config" HELM_DATA_HOME="$tmp/helm/data"

# --- The plain manifests, rendered from the chart --------------------------------------------
# "file|template|extra helm args"
PLAIN=(
  "deploy/namespace.yaml|namespace.yaml|--set createNamespace=true"
  "deploy/rbac.yaml|rbac.yaml|"
  "deploy/configmap.yaml|configmap.yaml|"
  "deploy/daemonset.yaml|daemonset.yaml|"
  "deploy/node-guard.yaml|node-guard.yaml|"
  "deploy/crds/cilium.io_ciliumnetworkpolicies.yaml|crds/ciliumnetworkpolicies.yaml|"
  "deploy/crds/cilium.io_ciliumclusterwidenetworkpolicies.yaml|crds/ciliumclusterwidenetworkpolicies.yaml|"
  "deploy/crds/veil.dev_veilidentities.yaml|crds/veilidentities.yaml|"
)

render_plain() {  # render_plain TEMPLATE [HELM ARGS]: the chart's rendering of one template
  local t=$1; shift
  printf '# Generated from the Helm chart (deploy/helm/veil/templates/%s) by\n' "$t"
  printf '# scripts/check-deploy.sh --update: edit the chart, then run that.\n'
  # shellcheck disable=SC2068  # the extra args are words
  "$H" template veil "$CHART" --namespace "$NS" $@ --show-only "templates/$t"
}

if [ "${1:-}" = --update ]; then
  mkdir -p deploy/crds
  for e in "${PLAIN[@]}"; do
    IFS='|' read -r f t args <<<"$e"
    # shellcheck disable=SC2086
    render_plain "$t" $args >"$f.new"
    mv -f "$f.new" "$f"
    say "wrote $f"
  done
  exit 0
fi
[ $# -eq 0 ] || die "usage: $0 [--update]"

# --- Timing ----------------------------------------------------------------------------------
t_all=$(date +%s.%N)
TIMES=()
t_step=""
begin() { t_step=$(date +%s.%N); say "$1 ..."; }
done_step() {  # done_step NAME
  local d; d=$(awk -v a="$t_step" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  TIMES+=("$(printf '%-44s %6s s' "$1" "$d")")
  say "  ok ($d s)"
}

# --- 1. helm lint ----------------------------------------------------------------------------
begin "helm lint"
lint() {  # lint [HELM ARGS]: --strict turns warnings into failures; only INFO lines may remain
  local out
  # shellcheck disable=SC2068
  out=$("$H" lint --strict "$CHART" --namespace "$NS" $@ 2>&1) || { echo "$out" >&2; die "helm lint $* failed"; }
  if grep -E '^\[(WARNING|ERROR)\]' <<<"$out" >&2; then die "helm lint $*: warnings"; fi
  grep -E '^\[INFO\]' <<<"$out" | sed 's/^/    /' || true
}
lint
lint --set createNamespace=true --set installCRDs=false --set k8sServiceHost=198.18.0.1 \
  --set k8sServicePort=6443 --set image.tag=dev
lint --set installCiliumCRDs=false --set nodeGuard.enabled=false \
  --set mapMaxEntries.VEIL_IPCACHE=1048576 --set mapMaxEntries.VEIL_CT=65536
# values.schema.json refuses bad values at install, as the agent would at start.
BAD=(mtu=100 backend=fast interface=much-too-long-name listenPort=0 pskRotation=soon
     mapMaxEntries.VEIL_AUTH=5 mapMaxEntries.VEIL_CT=0)
for bad in "${BAD[@]}"; do
  if "$H" lint --strict "$CHART" --set "$bad" >"$tmp/out" 2>&1; then die "helm lint accepted --set $bad"; fi
done
echo "    values.schema.json refuses: ${BAD[*]}"
done_step "helm lint (3 value sets, ${#BAD[@]} bad values)"

# --- 2. render; the plain manifests are up to date ------------------------------------------
begin "helm template; deploy/*.yaml and deploy/crds/ are the chart's rendering"
"$H" template veil "$CHART" --namespace "$NS" >"$tmp/rendered.yaml" \
  || die "helm template failed"
grep -q '^kind: DaemonSet' "$tmp/rendered.yaml" || die "the rendering has no DaemonSet"
stale=()
for e in "${PLAIN[@]}"; do
  IFS='|' read -r f t args <<<"$e"
  # shellcheck disable=SC2086
  render_plain "$t" $args >"$tmp/plain"
  if ! diff -u "$f" "$tmp/plain" >"$tmp/diff" 2>&1; then
    head -n 40 "$tmp/diff" >&2
    stale+=("$f")
  fi
done
extra=$(comm -23 <(printf '%s\n' deploy/crds/*.yaml | sort) \
  <(for e in "${PLAIN[@]}"; do echo "${e%%|*}"; done | grep '^deploy/crds/' | sort))
[ -z "$extra" ] || die "deploy/crds/ has files the chart does not render: $extra"
[ ${#stale[@]} -eq 0 ] || die "out of date with the chart: ${stale[*]} (run scripts/check-deploy.sh --update)"
done_step "render + plain manifests up to date"

# --- 3. a real apiserver ---------------------------------------------------------------------
begin "etcd + kube-apiserver (scripts/kube-apiserver.sh)"
scripts/kube-apiserver.sh start "$tmp/kube" >"$tmp/kube-start.log" 2>&1 \
  || { cat "$tmp/kube-start.log" >&2; die "the throwaway apiserver did not start"; }
export KUBECONFIG="$tmp/kube/admin.kubeconfig"
say "  server $("$K" get --raw /version | sed -n 's/.*"gitVersion": *"\([^"]*\)".*/\1/p'), $("$K" version --client | head -n1)"
done_step "etcd + kube-apiserver ready"

# kubectl that fails on any apiserver warning as well as on errors (a deprecation warning today
# is a refusal in a later release).
kc() {  # kc ARGS...: output in $tmp/out
  if ! "$K" "$@" >"$tmp/out" 2>&1; then cat "$tmp/out" >&2; die "kubectl $*"; fi
  if grep -i '^warning:' "$tmp/out" >&2; then die "kubectl $*: the apiserver warned"; fi
}

# --- 4. CRDs for real ------------------------------------------------------------------------
begin "kubectl apply -f deploy/crds/ (Established)"
kc apply -f deploy/crds/
sed 's/^/    /' "$tmp/out"
kc wait --for condition=Established --timeout 60s -f deploy/crds/
done_step "CRDs applied and Established"

# --- 5. the chart and the plain manifests, server-side dry run ------------------------------
begin "kubectl apply --dry-run=server: rendered chart and deploy/*.yaml"
# Namespaced objects need their namespace to exist, also in a dry run.
kc apply -f deploy/namespace.yaml
kc apply --dry-run=server -f "$tmp/rendered.yaml"
sed 's/^/    chart: /' "$tmp/out"
for f in deploy/*.yaml; do
  kc apply --dry-run=server -f "$f"
  sed "s|^|    $f: |" "$tmp/out"
done
done_step "chart + plain manifests accepted (dry run)"

# --- 6. every shipped policy is accepted -----------------------------------------------------
begin "example and test policies accepted"
mkdir -p "$tmp/policies"
cp examples/policies/*.yaml "$tmp/policies/"
# The policies the tests apply (tests/src/lib.rs: AUTH_POLICY ...): inline string constants
# (pub const X: &str = "apiVersion: cilium.io/v2 ... ";, unescaped) and include_str! of files.
awk -v dir="$tmp/policies" '
  /^pub const [A-Z0-9_]+: &str = "apiVersion: cilium[.]io[/]v2/ {
    name = $3; sub(/:$/, "", name); out = dir "/tests-src-lib.rs-" name ".yaml"
    line = $0; sub(/^[^"]*"/, "", line); print line > out; inside = 1; next
  }
  inside && /^";$/ { inside = 0; close(out); next }
  inside { print > out }
' tests/src/lib.rs
for f in "$tmp"/policies/tests-src-lib.rs-*.yaml; do
  if [ -e "$f" ]; then sed -i 's/\\"/"/g' "$f"; fi
done
from_tests=$(find "$tmp/policies" -name 'tests-src-lib.rs-*' | wc -l)
mapfile -t includes < <(sed -n 's/^pub const [A-Z0-9_]*: &str = include_str!("\([^"]*\.yaml\)");$/\1/p' tests/src/lib.rs)
for inc in "${includes[@]}"; do
  f=$(realpath -m --relative-to=. "tests/src/$inc")
  [ -f "$f" ] || die "tests/src/lib.rs includes $inc, which does not exist"
  grep -q '^kind: Cilium' "$f" || continue  # a lab file
  from_tests=$((from_tests + 1))
  case "$f" in examples/policies/*) ;; *) cp "$f" "$tmp/policies/tests-src-lib.rs-${f//\//_}" ;; esac
done
[ "$from_tests" -gt 0 ] || die "found no policy in tests/src/lib.rs (AUTH_POLICY moved?)"
mapfile -t namespaces < <(grep -h '^  namespace:' "$tmp"/policies/*.yaml | awk '{print $2}' | sort -u)
for ns in "${namespaces[@]}"; do
  "$K" get namespace "$ns" >/dev/null 2>&1 || kc create namespace "$ns"
done
n=0
for f in "$tmp"/policies/*.yaml; do
  kc apply --dry-run=server -f "$f"
  printf '    %s: %s\n' "${f##*/}" "$(cat "$tmp/out")"
  n=$((n + 1))
done
done_step "$n policies accepted (dry run)"

# --- 7. what violates the schema is refused --------------------------------------------------
begin "schema-violating objects refused"
refused() {  # refused NAME EXPECTED-MESSAGE YAML: the apiserver must refuse it, saying so
  local name=$1 want=$2
  if printf '%s\n' "$3" | "$K" apply --dry-run=server -f - >"$tmp/out" 2>&1; then
    cat "$tmp/out" >&2
    die "$name: accepted by the apiserver, must be refused"
  fi
  grep -qF -- "$want" "$tmp/out" || { cat "$tmp/out" >&2; die "$name: refused, but not with \"$want\""; }
  printf '    refused: %-37s %s\n' "$name" "$(grep -F -- "$want" "$tmp/out" | head -n1 | sed 's/^[* ]*//; s/^The [A-Za-z]* "[^"]*" is invalid: //' | cut -c1-100)"
}
cnp='apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: bad, namespace: shop}'
refused "endpointSelector a string" 'spec.endpointSelector in body must be of type object' "$cnp
spec: {endpointSelector: x}"
refused "port a list" 'ports[0].port in body must be of type string' "$cnp
spec: {endpointSelector: {}, ingress: [{toPorts: [{ports: [{port: ['8080']}]}]}]}"
refused "port a number, not a string" 'ports[0].port in body must be of type string' "$cnp
spec: {endpointSelector: {}, ingress: [{toPorts: [{ports: [{port: 8080}]}]}]}"
refused "port out of range" 'ports[0].port in body should match' "$cnp
spec: {endpointSelector: {}, egress: [{toPorts: [{ports: [{port: '65536'}]}]}]}"
refused "protocol not in the enum" 'Unsupported value: "HTTP"' "$cnp
spec: {endpointSelector: {}, ingress: [{toPorts: [{ports: [{port: '80', protocol: HTTP}]}]}]}"
refused "authentication.mode not in the enum" 'Unsupported value: "optional"' "$cnp
spec: {endpointSelector: {}, ingress: [{authentication: {mode: optional}}]}"
refused "no endpointSelector" 'spec.endpointSelector: Required value' "$cnp
spec: {ingress: [{}]}"
refused "neither spec nor specs" 'a policy needs spec or specs' "$cnp"
refused "bad matchExpressions operator" 'Unsupported value: "Has"' "$cnp
spec: {endpointSelector: {matchExpressions: [{key: app, operator: Has}]}}"
refused "clusterwide: a label value a number" 'matchLabels.app in body must be of type string' 'apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: bad}
spec: {endpointSelector: {matchLabels: {app: 1}}}'
vid='apiVersion: veil.dev/v1alpha1
kind: VeilIdentity'
refused "identity name not a number" "metadata.name must be the identity's number" "$vid
metadata: {name: frontend}
spec: {labels: {io.kubernetes.pod.namespace: shop}}"
refused "identity number reserved (<256)" "metadata.name must be the identity's number" "$vid
metadata: {name: '255'}
spec: {labels: {io.kubernetes.pod.namespace: shop}}"
refused "identity without namespace label" 'labels must include io.kubernetes.pod.namespace' "$vid
metadata: {name: '256'}
spec: {labels: {app: frontend}}"
# Status: only the shape the agents write.
kc apply -f - <<'EOF'
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: status-probe, namespace: shop}
spec: {endpointSelector: {matchLabels: {app: backend}}}
EOF
kc -n shop patch cnp status-probe --subresource status --type merge \
  -p '{"status":{"nodes":{"node-a":{"enforcing":true,"ok":true,"lastUpdated":"2026-01-01T00:00:00Z","localPolicyRevision":3}}}}'
if "$K" -n shop patch cnp status-probe --subresource status --type merge \
  -p '{"status":{"nodes":{"node-a":{"enforcing":"yes"}}}}' >"$tmp/out" 2>&1; then
  die "status.nodes.<node>.enforcing: a string was accepted"
fi
grep -qF 'must be of type boolean' "$tmp/out" || { cat "$tmp/out" >&2; die "status: refused for another reason"; }
echo "    refused: status.nodes.<node>.enforcing a string"
# Unknown fields inside a rule are stored as written (veil's parser then refuses the policy and
# says why in its status); pruned, `ingress: [{fromCIDR: ...}]` would become `ingress: [{}]`.
printf '%s\n' "$cnp
spec: {endpointSelector: {matchLabel: {app: x}}, ingress: [{fromCIDR: [198.18.0.0/15]}]}" \
  | "$K" create --dry-run=server -f - \
    -o jsonpath='{.spec.ingress[0].fromCIDR[0]} {.spec.endpointSelector.matchLabel.app}' \
    >"$tmp/out" 2>&1 || { cat "$tmp/out" >&2; die "unknown fields: refused"; }
[ "$(cat "$tmp/out")" = "198.18.0.0/15 x" ] || { cat "$tmp/out" >&2; die "unknown policy fields were pruned"; }
echo "    kept:    unknown rule fields (fromCIDR, matchLabel) stored as written, not pruned"
done_step "violations refused, unknown fields kept"

# --- 8. least-privilege RBAC -----------------------------------------------------------------
begin "RBAC: what the veil service account may do"
kc apply -f deploy/rbac.yaml
can() {  # can yes|no VERB RESOURCE [FLAGS]
  local want=$1; shift
  local got
  got=$("$K" auth can-i --as "$SA" "$@" 2>/dev/null || true)
  [ "$got" = "$want" ] || die "auth can-i $*: $got, expected $want"
}
# Everything the agent needs ...
for r in nodes pods namespaces services endpointslices.discovery.k8s.io networkpolicies.networking.k8s.io \
  ciliumnetworkpolicies.cilium.io ciliumclusterwidenetworkpolicies.cilium.io veilidentities.veil.dev; do
  for v in get list watch; do can yes "$v" "$r" --all-namespaces; done
done
can yes patch nodes
can yes patch ciliumnetworkpolicies.cilium.io --subresource status -n shop
can yes update ciliumclusterwidenetworkpolicies.cilium.io --subresource status
can yes create veilidentities.veil.dev
can yes delete veilidentities.veil.dev
can yes patch veilidentities.veil.dev --subresource status
can yes create events -n shop
can yes create events.events.k8s.io -n shop
# ... and nothing more.
can no patch ciliumnetworkpolicies.cilium.io -n shop
can no create ciliumnetworkpolicies.cilium.io -n shop
can no delete ciliumclusterwidenetworkpolicies.cilium.io
can no update veilidentities.veil.dev
can no patch veilidentities.veil.dev
can no delete nodes
can no update nodes
can no create pods -n shop
can no patch pods -n shop
can no delete pods -n shop
can no get secrets -n "$NS"
can no list secrets --all-namespaces
can no get configmaps -n kube-system
can no create serviceaccounts/token -n "$NS"
can no patch networkpolicies.networking.k8s.io -n shop
can no create services -n shop
can no update endpointslices.discovery.k8s.io -n shop
can no '*' '*'
echo "    $SA: reads cluster state; writes policy status, node annotations, identities, events; nothing else"
done_step "RBAC least privilege"

# --- 9. the node guard ----------------------------------------------------------------------
begin "node guard: an agent changes only its own Node's veil.dev/ annotations"
kc apply -f deploy/node-guard.yaml
for n in node-a node-b; do
  kc apply -f - <<EOF
apiVersion: v1
kind: Node
metadata: {name: $n, labels: {kubernetes.io/hostname: $n}}
EOF
done
server=$("$K" config view --minify -o jsonpath='{.clusters[0].cluster.server}')
agent_kubeconfig() {  # agent_kubeconfig FILE TOKEN
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "$server", certificate-authority: "$tmp/kube/pki/ca.crt"}}]
users: [{name: u, user: {token: "$2"}}]
contexts: [{name: c, context: {cluster: c, user: u}}]
current-context: c
EOF
}
# As the kubelet's projected token: bound (here to the Node object), so it names node-a.
node_uid=$("$K" get node node-a -o jsonpath='{.metadata.uid}')
agent_kubeconfig "$tmp/agent-a.kubeconfig" "$("$K" -n "$NS" create token veil --duration 10m \
  --bound-object-kind Node --bound-object-name node-a --bound-object-uid "$node_uid")"
agent_kubeconfig "$tmp/agent-unbound.kubeconfig" "$("$K" -n "$NS" create token veil --duration 10m)"
KA=("$K" --kubeconfig "$tmp/agent-a.kubeconfig")
# An admission policy takes effect once the apiserver has compiled it (about a second): wait
# until it refuses what it must, with a deadline.
deadline=$((SECONDS + 30))
until ! "${KA[@]}" annotate node node-b --overwrite veil.dev/probe=1 >"$tmp/out" 2>&1; do
  [ $SECONDS -lt $deadline ] || die "the node guard still allows patching another Node after 30 s"
  sleep 0.5
done
grep -qF 'may change only the Node it runs on (node-a), not node-b' "$tmp/out" \
  || { cat "$tmp/out" >&2; die "node guard: refused for another reason"; }
# (Its type-checking status is written by kube-controller-manager, which this apiserver runs
# without: an expression that does not compile shows as a refused "allowed" case below.)
allowed() {  # allowed WHAT KUBECTL-ARGS...
  local what=$1; shift
  "${KA[@]}" "$@" >"$tmp/out" 2>&1 || { cat "$tmp/out" >&2; die "node guard: $what refused, must be allowed"; }
  printf '    allowed: %s\n' "$what"
}
guarded() {  # guarded WHAT EXPECTED-MESSAGE KUBECTL-ARGS...
  local what=$1 want=$2; shift 2
  if "$@" >"$tmp/out" 2>&1; then die "node guard: $what allowed, must be refused"; fi
  grep -qF -- "$want" "$tmp/out" || { cat "$tmp/out" >&2; die "node guard: $what refused, but not with \"$want\""; }
  printf '    refused: %s\n' "$what"
}
allowed "node-a: set veil.dev/wg-public-key" annotate node node-a --overwrite veil.dev/wg-public-key=dGVzdA==
allowed "node-a: set veil.dev/wg-endpoint" annotate node node-a --overwrite veil.dev/wg-endpoint=198.18.0.1:51820
allowed "node-a: remove veil.dev/wg-endpoint" annotate node node-a veil.dev/wg-endpoint-
guarded "node-b: set veil.dev/wg-public-key" 'may change only the Node it runs on (node-a), not node-b' \
  "${KA[@]}" annotate node node-b --overwrite veil.dev/wg-public-key=dGVzdA==
guarded "node-a: another annotation" 'may change only veil.dev/ annotations' \
  "${KA[@]}" annotate node node-a example.com/x=1
guarded "node-a: a label" "may not change a Node's spec, labels" "${KA[@]}" label node node-a evil=1
guarded "node-a: cordon (spec.unschedulable)" "may not change a Node's spec, labels" \
  "${KA[@]}" patch node node-a -p '{"spec":{"unschedulable":true}}'
guarded "a token bound to no node" 'its token is bound to none' \
  "$K" --kubeconfig "$tmp/agent-unbound.kubeconfig" annotate node node-a --overwrite veil.dev/wg-public-key=x
done_step "node guard"

total=$(awk -v a="$t_all" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
say "all checks passed in $total s:"
printf '  %s\n' "${TIMES[@]}"
