#!/usr/bin/env bash
# Builds the real third-party systems veil's lab and tests run beside, from source through the Go
# module proxy, once per machine: SPIRE (spire-server, spire-agent), Kubernetes (kube-apiserver,
# kube-controller-manager, kubectl), etcd, helm and wireguard-go. scripts/setup.sh runs it; it
# can also run on its own.
#
#   cache:  ${VEIL_CACHE_DIR:-~/.cache/veil}/go-tools/<tool>-<version>/
#             src/go.mod, go.sum   generated wrapper module (requires, replaces, tool lines)
#             bin/<binary>         the binaries
#             build.log            go's output (its tail is printed when a build fails)
#             stamp                "<tool> <version> <recipe hash>": present = built, nothing to do
#   bin:    ${VEIL_TOOLS_BIN:-${VEIL_CACHE_DIR:-~/.cache/veil}/bin}/<binary>  (symlinks into the cache)
#
# A second run builds nothing and prints one "cached" line per tool. Changing a version below (or
# a tool's recipe function) builds that tool again into a new directory and repoints its links.
set -euo pipefail

# --- The pins: every version of every Go-built tool, and nothing else, is set here -------------
declare -A VERSION=(
  # golang.zx2c4.com/wireguard: no tags on the proxy, only pseudo-versions; the newest it serves.
  [wireguard-go]=v0.0.0-20260522210424-ecfc5a8d5446
  # go.etcd.io/etcd/server/v3: the 3.7 line, which Kubernetes 1.37 pins (hack/lib/etcd.sh 3.7.0).
  [etcd]=v3.7.3
  # helm.sh/helm/v3: newest v3.
  [helm]=v3.22.0
  # github.com/spiffe/spire: served, but not listed (go get needs the exact version).
  [spire]=v1.13.3
  # k8s.io/kubernetes; its staging modules (k8s.io/api, apimachinery, client-go, ...) are taken
  # at the matching v0.MINOR.PATCH (v0.37.2). 1.37 = k8s-openapi 0.29's newest (feature v1_37).
  [kubernetes]=v1.37.2
)
# Build order: quick ones first. Measured first build on 2 cores: about 22 min in all, of which
# spire-server (cgo sqlite) 8 min and kube-apiserver 7 min; the go build cache is shared between them
# within one run (then removed, see check_go).
ORDER=(wireguard-go etcd helm spire kubernetes)

say() { printf 'go-tools: %s\n' "$*"; }
die() { printf 'go-tools: error: %s\n' "$*" >&2; exit 1; }

cache="${VEIL_CACHE_DIR:-$HOME/.cache/veil}"
root="$cache/go-tools"
bindir="${VEIL_TOOLS_BIN:-$cache/bin}"

# --- Recipes: each sets MOD (the wrapper go.mod's requires/replaces) and BINS --------------------
# BINS entries: "binary|package|CGO_ENABLED|ldflags|version command args|text the output must hold"
MOD=""
BINS=()

recipe_wireguard-go() {
  local v=${VERSION[wireguard-go]}
  MOD="require golang.zx2c4.com/wireguard $v"
  # Its own version string (device/version.go) is not the module's pseudo-version: output unchecked.
  BINS=("wireguard-go|golang.zx2c4.com/wireguard|0|-s -w|--version|wireguard-go")
}

recipe_etcd() {
  local v=${VERSION[etcd]}
  MOD="require go.etcd.io/etcd/server/v3 $v"
  # server/main.go is etcd's own main (etcdmain.Main), the one its release build uses.
  BINS=("etcd|go.etcd.io/etcd/server/v3|0|-s -w|--version|etcd Version: ${v#v}")
}

recipe_helm() {
  local v=${VERSION[helm]}
  MOD="require helm.sh/helm/v3 $v"
  local x="-X helm.sh/helm/v3/internal/version.version=$v -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
  # As helm's Makefile: the Kubernetes version helm assumes offline (helm template, lint) is its
  # client-go's minor; KMINOR is filled in from the resolved module graph before the build.
  x+=" -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=@KMINOR@"
  x+=" -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=@KMINOR@"
  BINS=("helm|helm.sh/helm/v3/cmd/helm|0|-s -w $x|version|Version:\"$v\"")
}

recipe_spire() {
  local v=${VERSION[spire]}
  MOD="require github.com/spiffe/spire $v"
  local x="-X github.com/spiffe/spire/pkg/common/version.gittag=${v#v}"  # as SPIRE's Makefile: no "v"
  # spire-server's sqlite datastore is github.com/mattn/go-sqlite3, which needs cgo (with
  # CGO_ENABLED=0 it builds and fails at run time). spire-agent has no cgo dependency.
  BINS=("spire-server|github.com/spiffe/spire/cmd/spire-server|1|-s -w $x|--version|${v#v}"
        "spire-agent|github.com/spiffe/spire/cmd/spire-agent|0|-s -w $x|--version|${v#v}")
}

recipe_kubernetes() {
  local v=${VERSION[kubernetes]}
  local staging="v0.${v#v1.}" minor="${v#v1.}"; minor="${minor%%.*}"
  # k8s.io/kubernetes requires its staging modules at v0.0.0 and replaces them with ./staging/...,
  # which a dependency's go.mod cannot do: replace each with its published release instead. The
  # list is its own go.mod's (@STAGING@ is filled in from it before the build).
  MOD="require k8s.io/kubernetes $v
@STAGING@"
  # As hack/lib/version.sh, so --version and kubectl's skew checks see the real release.
  # buildDate is the release's commit time from the proxy (@DATE@), so the build is reproducible.
  local x="" p
  for p in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
    x+=" -X $p.gitVersion=$v -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=archive -X $p.buildDate=@DATE@"
  done
  # kube-controller-manager: the lab runs its EndpointSlice controller (Services' backends).
  BINS=("kube-apiserver|k8s.io/kubernetes/cmd/kube-apiserver|0|-s -w$x|--version|Kubernetes $v"
        "kube-controller-manager|k8s.io/kubernetes/cmd/kube-controller-manager|0|-s -w$x|--version|Kubernetes $v"
        "kubectl|k8s.io/kubernetes/cmd/kubectl|0|-s -w$x|version --client|Client Version: $v")
  STAGING_VERSION=$staging
}

# --- Helpers ---------------------------------------------------------------------------------
recipe_hash() { { declare -f "recipe_$1"; echo "${VERSION[$1]}"; } | sha256sum | cut -c1-16; }

link_bins() {  # link_bins <tool dir> <binary>...
  local d=$1; shift
  mkdir -p "$bindir"
  for b in "$@"; do ln -sfn "$d/bin/$b" "$bindir/$b"; done
}

fail_build() {  # fail_build <tool> <what> <log>
  printf 'go-tools: error: %s %s: %s failed. Last lines of %s:\n' "$1" "${VERSION[$1]}" "$2" "$3" >&2
  tail -n 25 "$3" | sed 's/^/  | /' >&2
  exit 1
}

go_checked="" scratch=""
check_go() {  # once, and only when something must be built: Go present, new enough, proxy answers
  [ -n "$go_checked" ] && return 0
  if ! command -v go >/dev/null && [ -x /usr/local/go/bin/go ]; then export PATH="/usr/local/go/bin:$PATH"; fi
  command -v go >/dev/null || die "the Go toolchain (go) is not on PATH; it builds SPIRE, kube-apiserver, kubectl, etcd, helm and wireguard-go (needs Go >= 1.26)"
  local gv; gv=$(go env GOVERSION 2>&1) || die "go env GOVERSION failed: $gv"
  local mm=${gv#go}; local maj=${mm%%.*} rest=${mm#*.}; local min=${rest%%[!0-9]*}
  { [ "$maj" -gt 1 ] || { [ "$maj" -eq 1 ] && [ "$min" -ge 26 ]; }; } \
    || die "Go $gv is too old: these pins need Go >= 1.26 (helm, etcd and Kubernetes 1.37 say go 1.26.0)"
  # Go's build and module caches live for this run only, in one scratch directory shared by the
  # tools it builds and removed when it ends (also on failure): Kubernetes alone leaves ~6 GB of
  # build cache and ~2.5 GB of modules, which a CI disk cannot spare beside the Rust builds that
  # follow. Only the binaries are kept; a rebuild (a pin changed) downloads again.
  scratch=$(mktemp -d "$root/.go-scratch-XXXXXX")
  trap 'rm -rf "$scratch"' EXIT
  export GOCACHE="$scratch/build" GOMODCACHE="$scratch/mod"
  local out
  if ! out=$(cd / && GOWORK=off GOFLAGS=-modcacherw timeout 120 go list -m -versions golang.zx2c4.com/wireguard 2>&1); then
    die "the Go module proxy ($(go env GOPROXY)) does not answer: go list -m -versions golang.zx2c4.com/wireguard: $out"
  fi
  go_checked=1
}

build_tool() {  # build_tool <tool>
  local t=$1 v=${VERSION[$1]}
  MOD=""; BINS=(); STAGING_VERSION=""
  "recipe_$t"
  local d="$root/$t-$v" key; key="$t $v $(recipe_hash "$t")"
  local names=() e
  for e in "${BINS[@]}"; do names+=("${e%%|*}"); done

  local ok=1
  [ "$(cat "$d/stamp" 2>/dev/null)" = "$key" ] || ok=""
  for b in "${names[@]}"; do [ -x "$d/bin/$b" ] || ok=""; done
  if [ -n "$ok" ]; then
    link_bins "$d" "${names[@]}"
    say "cached: $t $v (${names[*]}) in $d/bin"
    return 0
  fi

  check_go
  say "building $t $v (${names[*]}) from source; log: $d/build.log"
  local t0; t0=$(date +%s)
  rm -rf "$d"; mkdir -p "$d/src" "$d/bin"
  local log="$d/build.log"
  : >"$log"
  # -modcacherw: the scratch module cache is writable, so rm -rf removes it.
  export GOWORK=off GOFLAGS="-buildvcs=false -modcacherw"

  # The wrapper module. @STAGING@: a replace for each staging module k8s.io/kubernetes' own go.mod
  # points into ./staging, to the published release of the same version.
  local mod=$MOD
  if [ -n "$STAGING_VERSION" ]; then
    local kmod rep
    kmod=$(cd "$d/src" && go mod download -json "k8s.io/kubernetes@$v" 2>>"$log" | sed -n 's/^\t"GoMod": "\(.*\)",$/\1/p') \
      || fail_build "$t" "go mod download k8s.io/kubernetes@$v" "$log"
    [ -f "$kmod" ] || fail_build "$t" "go mod download k8s.io/kubernetes@$v (no go.mod)" "$log"
    rep=$(sed -n 's#^[[:space:]]*\(k8s\.io/[A-Za-z0-9._-]*\) => \./staging/src/.*#\1#p' "$kmod" \
          | sed "s#.*#replace & => & $STAGING_VERSION#")
    [ -n "$rep" ] || fail_build "$t" "reading the staging replaces of $kmod" "$log"
    mod=${mod/@STAGING@/$rep}
  fi
  printf 'module veil.local/go-tools/%s\n\ngo 1.26.0\n\n%s\n' "$t" "$mod" >"$d/src/go.mod"

  # Resolve the graph for exactly these packages at exactly these versions (no "latest"): go get
  # -tool also records them as tool lines. Checksums are verified against the checksum database.
  local pkgs=() e2
  for e2 in "${BINS[@]}"; do IFS='|' read -r _ p _ <<<"$e2"; pkgs+=("$p"); done
  local main_mod; main_mod=$(sed -n '1s/^require \([^ ]*\) .*/\1/p' <<<"$MOD")
  local getargs=(); for p in "${pkgs[@]}"; do getargs+=("$p@$v"); done
  (cd "$d/src" && go get -tool "${getargs[@]}") >>"$log" 2>&1 || fail_build "$t" "go get -tool ${getargs[*]}" "$log"

  local bdate kminor
  bdate=$(cd "$d/src" && go list -m -f '{{if .Time}}{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}{{end}}' "$main_mod" 2>>"$log") || bdate=""
  kminor=$(cd "$d/src" && go list -m -f '{{.Version}}' k8s.io/client-go 2>/dev/null | sed -n 's/^v0\.\([0-9]*\)\..*/\1/p') || kminor=""

  local name pkg cgo ld vargs want bt out
  for e in "${BINS[@]}"; do
    IFS='|' read -r name pkg cgo ld vargs want <<<"$e"
    ld=${ld//@DATE@/${bdate:-1970-01-01T00:00:00Z}}
    ld=${ld//@KMINOR@/${kminor:-0}}
    bt=$(date +%s)
    printf '\n### go build %s (CGO_ENABLED=%s)\n' "$name" "$cgo" >>"$log"
    (cd "$d/src" && CGO_ENABLED=$cgo go build -trimpath -ldflags "$ld" -o "$d/bin/$name" "$pkg") >>"$log" 2>&1 \
      || fail_build "$t" "go build $pkg" "$log"
    # shellcheck disable=SC2086  # vargs is a word list
    out=$("$d/bin/$name" $vargs 2>&1) || { echo "$out" >>"$log"; fail_build "$t" "running the new $name $vargs" "$log"; }
    grep -qF -- "$want" <<<"$out" || { echo "$out" >>"$log"; fail_build "$t" "$name $vargs (output lacks \"$want\")" "$log"; }
    say "  $name built in $(( $(date +%s) - bt )) s: $(head -n1 <<<"$out")"
  done
  echo "$key" >"$d/stamp"
  link_bins "$d" "${names[@]}"
  say "built $t $v in $(( $(date +%s) - t0 )) s"
}

mkdir -p "$root"
# VEIL_GO_TOOLS="spire wireguard-go" builds only those (scripts/test.sh and scripts/demo.sh name
# what they run; kube-apiserver, kubectl, etcd and helm are for the Kubernetes mode). Default: all.
wanted=("${ORDER[@]}")
if [ -n "${VEIL_GO_TOOLS:-}" ]; then
  read -r -a wanted <<<"$VEIL_GO_TOOLS"
  for t in "${wanted[@]}"; do
    [ -n "${VERSION[$t]:-}" ] || die "VEIL_GO_TOOLS names \"$t\": the tools are ${ORDER[*]}"
  done
fi
for t in "${wanted[@]}"; do build_tool "$t"; done
say "ok: binaries in $bindir"
