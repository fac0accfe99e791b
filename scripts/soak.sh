#!/usr/bin/env bash
# The soak (issue 17): mixed traffic across nodes on a lab of its own for a long time, with SVID
# rotation every 30 s and policy churn every minute; agent and veil-wg memory must stay flat
# (within 5 % from the end of the warm-up to the end), nothing may be lost, no error line may
# appear. Not part of CI (an hour by default). Prints a summary table, exits non-zero if any
# criterion fails, and always takes its lab down (also on Ctrl-C).
#
# It runs a copy of target/release/veil, veil-wg and veil-proxy (the agents start the veil-wg and
# veil-proxy beside the veil binary), so a rebuild during the run does not change what is measured.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

usage() {
    cat <<'EOF'
usage: scripts/soak.sh [--duration 1h] [--name soak] [--warmup 5m] [--identity spire|dev]
                       [--bin DIR] [--out DIR]

As root, with target/release/veil built (scripts/setup.sh, cargo build --release). Brings up
lab NAME (frontend on node-a; backend on node-b serving HTTP on 8080 and echo on 9000; intruder
on node-a), applies an `authentication: required` policy admitting frontend to backend on 8080,
9000 and ICMP, then for DURATION runs, frontend -> backend across the tunnel:
  - one long TCP stream to the echo port (a numbered line every 100 ms; loss and stalls counted)
  - a sequenced UDP probe to the echo port (a numbered datagram every 100 ms; losses counted)
  - a short HTTP connection every second (curl, 3 s limit; failures counted)
  - ICMP echo every second (ping; losses counted)
while `veil lab rotate --all` runs every 30 s, and every minute an unrelated policy (intruder's
ingress) is applied or deleted in turn and the measured policy re-applied. Every 10 s it samples
the RSS of every node's agent and veil-wg (and SPIRE's, for information), the load average and
the SVID serials.

Criteria (each PASS/FAIL in the summary):
  memory     each agent and veil-wg: median RSS over the minute after the warm-up vs the median
             over the last minute, |change| <= 5 %; no process restarted (pid unchanged)
  traffic    TCP stream: no missing line, no 10 s interval without progress, not ended early;
             UDP: no probe lost; HTTP: no failure; ICMP: no loss
  rotation   every `lab rotate` succeeded and >= 90 % of them produced a new frontend serial
  policy     every apply/delete succeeded
  drops      no `unknown` or `datapath-error` drop (tests/src/lib.rs's post-test rule), no
             veil-wg restart by an agent (`veil status` tunnel_restarts)
  logs       no panic, agent ERROR, SPIRE level=error or veil-wg error line (same rule)
  cleanup    no netns, state, pin or process of the lab left after `lab down`

Options:
  --duration D   1h (default), 3m, 90s, ...
  --name N       lab name, 1-8 of a-z0-9- (default soak)
  --warmup W     5m (default); capped at a third of the duration
  --identity I   spire (default; real spire-server and spire-agents) or dev
  --bin DIR      take veil, veil-wg and veil-proxy from DIR (default target/release); copied
                 either way
  --out DIR      where samples, traffic records, logs and the summary go
                 (default /tmp/soak-NAME-<UTC time>)
EOF
}

to_secs() {
    local v=$1
    case $v in
        *h) echo $((${v%h} * 3600)) ;;
        *m) echo $((${v%m} * 60)) ;;
        *s) echo "${v%s}" ;;
        *) echo "$v" ;;
    esac
}

DURATION=1h NAME=soak WARMUP=5m IDENTITY=spire OUT= BIN=target/release
while (($#)); do
    case $1 in
        --duration) DURATION=$2; shift 2 ;;
        --name) NAME=$2; shift 2 ;;
        --warmup) WARMUP=$2; shift 2 ;;
        --identity) IDENTITY=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --bin) BIN=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "soak: unknown argument $1" >&2; usage >&2; exit 2 ;;
    esac
done
DUR=$(to_secs "$DURATION") WARM=$(to_secs "$WARMUP")
if ! [[ $DUR =~ ^[0-9]+$ && $WARM =~ ^[0-9]+$ ]] || ((DUR < 120)); then
    echo "soak: --duration must be at least 2m and --warmup a duration (got $DURATION, $WARMUP)" >&2
    exit 2
fi
((WARM > DUR / 3)) && WARM=$((DUR / 3))
[[ $NAME =~ ^[a-z0-9-]{1,8}$ ]] || { echo "soak: --name must be 1-8 of a-z0-9-" >&2; exit 2; }
[[ $IDENTITY == spire || $IDENTITY == dev ]] || { echo "soak: --identity spire|dev" >&2; exit 2; }
[[ $(id -u) == 0 ]] || { echo "soak: must run as root (netns, BPF)" >&2; exit 2; }
RUN_ROOT=${VEIL_RUN_DIR:-/run/veil}
if [[ -e $RUN_ROOT/$NAME ]]; then
    echo "soak: a lab named $NAME exists ($RUN_ROOT/$NAME); take it down or pick --name" >&2
    exit 2
fi
OUT=${OUT:-/tmp/soak-$NAME-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT/bin" "$OUT/traffic"
for b in veil veil-wg veil-proxy; do
    [[ -x $BIN/$b ]] || { echo "soak: $BIN/$b missing (cargo build --release)" >&2; exit 2; }
    cp -p "$BIN/$b" "$OUT/bin/$b"
done
V=$OUT/bin/veil
log() { echo "[soak $(date -u +%H:%M:%S)] $*" | tee -a "$OUT/soak.log"; }

# --- cleanup: always ------------------------------------------------------------------------
JOBS=()
CLEANED=0
LEFT=()
cleanup() {
    ((CLEANED)) && return
    CLEANED=1
    for p in "${JOBS[@]}"; do
        kill -TERM -- "-$p" 2>/dev/null
    done
    "$V" lab down --name "$NAME" >>"$OUT/soak.log" 2>&1 || log "lab down failed (see soak.log)"
    for p in "${JOBS[@]}"; do
        kill -KILL -- "-$p" 2>/dev/null
    done
    LEFT=()
    while read -r ns _; do
        [[ $ns == "$NAME"-* ]] && LEFT+=("netns $ns")
    done < <(ip netns list 2>/dev/null)
    [[ -e $RUN_ROOT/$NAME ]] && LEFT+=("state $RUN_ROOT/$NAME")
    [[ -e /sys/fs/bpf/veil/$NAME ]] && LEFT+=("pins /sys/fs/bpf/veil/$NAME")
    # This script and whatever started it (`timeout 2h scripts/soak.sh --name N ...`) name the
    # lab on their command lines too: they are not leftovers.
    local mine=" " p=$$
    while ((p > 1)); do
        mine+="$p "
        p=$(ps -o ppid= -p "$p" 2>/dev/null | tr -d ' ')
        [[ -n $p ]] || break
    done
    for d in /proc/[0-9]*; do
        local c
        c=$(tr '\0' ' ' <"$d/cmdline" 2>/dev/null) || continue
        [[ $mine == *" ${d#/proc/} "* ]] && continue
        if [[ $c == *"$RUN_ROOT/$NAME/"* || $c == *"--name $NAME "* ]]; then
            LEFT+=("process ${d#/proc/}: $c")
        fi
    done
    ((${#LEFT[@]})) && printf 'left behind: %s\n' "${LEFT[@]}" | tee -a "$OUT/soak.log"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

# A background job in its own process group (killed as a group on abort).
spawn() {
    setsid bash -c "$1" &
    JOBS+=($!)
}

# --- lab ------------------------------------------------------------------------------------
log "soak of lab $NAME for ${DUR}s (warm-up ${WARM}s), identity $IDENTITY, output $OUT"
for b in veil veil-wg veil-proxy; do
    log "binary $b: from $BIN, built $(date -u -r "$OUT/bin/$b" '+%F %T') UTC, sha256 $(sha256sum "$OUT/bin/$b" | cut -c1-12)"
done
# HEAD at the start; the binaries were built from whatever tree was there when they were built.
COMMIT=$(git -C "$REPO" rev-parse --short HEAD)
log "HEAD $COMMIT, load average $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) cores"
cp tests/data/echo-lab.yaml "$OUT/lab.yaml"
# The demo's auth policy (frontend -> backend on 8080/TCP and 9000/any), plus ICMP for the pings.
{ cat examples/policies/backend-ingress-auth.yaml; echo '      - protocol: ICMP'; } >"$OUT/measured.yaml"
# Selects intruder (node-a), which the measured flows never touch.
cat >"$OUT/churn.yaml" <<'EOF'
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: soak-churn
  namespace: shop
spec:
  endpointSelector:
    matchLabels:
      app: intruder
  ingress:
  - fromEndpoints:
    - matchLabels:
        app: frontend
    authentication:
      mode: required
    toPorts:
    - ports:
      - port: "7777"
        protocol: TCP
EOF
if ! "$V" lab up --name "$NAME" -f "$OUT/lab.yaml" --identity "$IDENTITY" --control-plane files >>"$OUT/soak.log" 2>&1; then
    log "lab up failed (see $OUT/soak.log)"
    exit 2
fi
"$V" lab show --name "$NAME" -o json >"$OUT/lab.json"
BE=$(python3 -c 'import json,sys; print(next(p["ip"] for p in json.load(open(sys.argv[1]))["pods"] if p["name"]=="backend"))' "$OUT/lab.json")
NODES=$(python3 -c 'import json,sys; print(" ".join(n["name"] for n in json.load(open(sys.argv[1]))["nodes"]))' "$OUT/lab.json")
"$V" policy apply --name "$NAME" -f "$OUT/measured.yaml" >>"$OUT/policy.log" 2>&1 || { log "measured policy refused"; exit 2; }
ready=0
for _ in $(seq 1 30); do
    if [[ $("$V" lab exec --name "$NAME" frontend -- curl -s -m 2 -o /dev/null -w '%{http_code}' "http://$BE:8080/" 2>/dev/null) == 200 ]]; then
        ready=1
        break
    fi
    sleep 1
done
((ready)) || { log "frontend never reached backend:8080 under the measured policy"; exit 2; }
log "lab up: nodes $NODES, backend $BE; frontend -> backend:8080 answers"

# --- traffic (frontend on node-a -> backend on node-b) ---------------------------------------
T0=$(date +%s)
END=$((T0 + DUR))
T=$OUT/traffic
export V NAME BE END T
# Numbered lines every 100 ms until END into one ncat connection (TCP) or socket (UDP); what was
# sent is teed, what the echo server returned recorded; the pipeline's end time tells an early end.
stream() { # PREFIX FILE NCAT-FLAGS...
    local prefix=$1 f=$2
    shift 2
    {
        i=0
        while (($(date +%s) < END)); do
            i=$((i + 1))
            echo "$prefix$i"
            sleep 0.1
        done
    } | tee "$T/$f.sent" | "$V" lab exec --name "$NAME" frontend -- ncat "$@" "$BE" 9000 >"$T/$f.recv" 2>"$T/$f.err"
    echo "${PIPESTATUS[2]} $(date +%s)" >"$T/$f.rc"
}
export -f stream
spawn 'stream line- tcp -w 5 -i 10'
spawn 'stream seq- udp -u -w 5 -i 10'
spawn '"$V" lab exec --name "$NAME" frontend -- sh -c "while [ \$(date +%s) -lt $END ]; do echo \$(date +%s) \$(curl -s -m 3 -o /dev/null -w %{http_code} http://$BE:8080/); sleep 1; done" >"$T/http.out" 2>"$T/http.err"'
# -w (deadline), not -c: under load ping's 1 s interval drifts (3,571 pings took over an hour).
spawn '"$V" lab exec --name "$NAME" frontend -- ping -n -O -i 1 -W 2 -w '"$DUR"' "$BE" >"$T/ping.out" 2>"$T/ping.err"'

# --- the run: samples every 10 s, rotation every 30 s, churn every 60 s ----------------------
echo "t,proc,pid,rss_kb" >"$OUT/rss.csv"
echo "t,load1,load5,load15,tcp_recv,udp_recv" >"$OUT/progress.csv"
echo "t,node,spiffe_id,serial" >"$OUT/serials.csv"
ROT_OK=0 ROT_FAIL=0 POL_OK=0 POL_FAIL=0 CUT=0 STALL_TCP=0 STALL_UDP=0
declare -A FIRST_PID RESTARTS
prev_tcp=-1 prev_udp=-1

sample() {
    local t=$1 node
    # Processes by their command lines under this lab's run directory (anchored at argv[0]: this
    # awk's own command line names them too); veil-wg is the agent's child. One ps per sample
    # (the machine is shared; no fork per /proc entry). A child the agent has forked and not yet
    # exec'd carries the agent's command line: it is not a second agent (one sample on
    # 2026-12-06 counted such a fork as two restarts of node-b's agent).
    ps -eo pid=,ppid=,rss=,args= | awk -v t="$t" -v lab="$RUN_ROOT/$NAME/" '
        { pid[$1] = $2; rss[$1] = $3; a = $0; sub(/^ *[0-9]+ +[0-9]+ +[0-9]+ +/, "", a); args[$1] = a }
        function agent_node(a,    n) {
            if (a !~ /^[^ ]*veil agent --config / || !index(a, " agent --config " lab "nodes/")) return ""
            n = substr(a, index(a, "/nodes/") + 7); sub(/\/.*/, "", n); return n
        }
        END {
            for (p in args) {
                a = args[p]; name = ""
                if ((n = agent_node(a)) != "") {
                    if (agent_node(args[pid[p]]) != "") continue
                    name = "agent-" n; agent[p] = n
                } else if (a ~ /^[^ ]*spire-server run / && index(a, lab)) {
                    name = "spire-server"
                } else if (a ~ /^[^ ]*spire-agent run / && index(a, lab "spire/")) {
                    n = substr(a, index(a, lab "spire/") + length(lab) + 6); sub(/\/.*/, "", n); name = "spire-agent-" n
                }
                if (name != "") print t "," name "," p "," rss[p]
            }
            for (p in args)
                if ((pid[p] in agent) && args[p] ~ /(^|\/)veil-wg /) print t ",veil-wg-" agent[pid[p]] "," p "," rss[p]
        }' >>"$OUT/rss.csv"
    local tcp udp
    tcp=$(wc -l <"$T/tcp.recv" 2>/dev/null || echo 0)
    udp=$(wc -l <"$T/udp.recv" 2>/dev/null || echo 0)
    echo "$t,$(cut -d' ' -f1-3 /proc/loadavg | tr ' ' ','),$tcp,$udp" >>"$OUT/progress.csv"
    # A 10 s interval in which the stream returned nothing is a stall (the first one may be empty).
    if ((t > 5 && t < DUR - 5)); then
        ((tcp == prev_tcp)) && STALL_TCP=$((STALL_TCP + 1)) && log "TCP stream stalled at ${t}s ($tcp lines)"
        ((udp == prev_udp)) && STALL_UDP=$((STALL_UDP + 1)) && log "UDP probe stalled at ${t}s ($udp replies)"
    fi
    prev_tcp=$tcp prev_udp=$udp
    for node in $NODES; do
        "$V" status --name "$NAME" --node "$node" -o json 2>/dev/null |
            python3 -c 'import json,sys
d=json.load(sys.stdin)
for s in d.get("svids",[]): print("%s,%s,%s,%s"%(sys.argv[1],sys.argv[2],s["spiffe_id"],s["serial"]))' "$t" "$node" >>"$OUT/serials.csv" 2>/dev/null
    done
}

policy() { # VERB FILE
    local out
    if out=$("$V" policy "$1" --name "$NAME" -f "$2" 2>&1); then
        POL_OK=$((POL_OK + 1))
    else
        POL_FAIL=$((POL_FAIL + 1))
        log "policy $1 $(basename "$2") failed: $out"
    fi
    echo "$(($(date +%s) - T0)) policy $1 $(basename "$2"): $out" >>"$OUT/policy.log"
    # Connections a change cut (there should be none: the measured flows' rule never changes).
    local n
    for n in $(grep -o '[0-9]* connections cut' <<<"$out" | cut -d' ' -f1); do
        CUT=$((CUT + n))
    done
}

log "traffic started; running until $(date -u -d @"$END" +%H:%M:%S) UTC"
churn_on=0
for ((k = 1; ; k++)); do
    next=$((T0 + 10 * k))
    ((next > END)) && break
    now=$(date +%s)
    ((next > now)) && sleep $((next - now))
    t=$((next - T0))
    if ((t % 30 == 0)); then
        if out=$("$V" lab rotate --name "$NAME" --all 2>&1); then
            ROT_OK=$((ROT_OK + 1))
        else
            ROT_FAIL=$((ROT_FAIL + 1))
            log "lab rotate failed: $out"
        fi
    fi
    if ((t % 60 == 0)); then
        if ((churn_on)); then policy delete "$OUT/churn.yaml"; churn_on=0
        else policy apply "$OUT/churn.yaml"; churn_on=1; fi
        policy apply "$OUT/measured.yaml"
    fi
    sample "$t"
    ((t % 300 == 0)) && log "${t}s: rotations $ROT_OK, policy changes $POL_OK, load $(cut -d' ' -f1 /proc/loadavg)"
done

log "duration over; waiting for the traffic to finish"
for _ in $(seq 1 40); do
    alive=0
    for p in "${JOBS[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    ((alive)) || break
    sleep 1
done
sample "$(($(date +%s) - T0))"

# --- counts ------------------------------------------------------------------------------------
FAIL=0
ROWS=()
row() { # CRITERION RESULT DETAIL
    ROWS+=("$(printf '%-10s %-4s %s' "$1" "$2" "$3")")
    [[ $2 == FAIL ]] && FAIL=1
}

# Traffic.
stream_counts() { # FILE PREFIX -> "sent received missing ncat_rc ended_early_s"
    local f=$1 prefix=$2 rc=? at=0
    [[ -s $T/$f.rc ]] && read -r rc at <"$T/$f.rc"
    python3 - "$T/$f.sent" "$T/$f.recv" "$prefix" "$rc" "$at" "$END" <<'EOF'
import sys
sent_f, recv_f, prefix, rc, at, end = sys.argv[1:]
def seqs(p):
    try:
        return [int(l[len(prefix):]) for l in open(p) if l.startswith(prefix) and l[len(prefix):].strip().isdigit()]
    except FileNotFoundError:
        return []
sent, recv = seqs(sent_f), set(seqs(recv_f))
missing = [s for s in sent if s not in recv]
early = max(0, int(end) - int(at)) if at != "0" else -1
print(len(sent), len(recv), len(missing), rc, early)
EOF
}
read -r TS TR TM TRC TEARLY < <(stream_counts tcp line-)
read -r US UR UM URC UEARLY < <(stream_counts udp seq-)
HS=$(awk 'NF' "$T/http.out" 2>/dev/null | wc -l)
HOK=$(awk '$2 == 200' "$T/http.out" 2>/dev/null | wc -l)
PS=$(grep -o '[0-9]* packets transmitted' "$T/ping.out" 2>/dev/null | cut -d' ' -f1)
PR=$(grep -o '[0-9]* received' "$T/ping.out" 2>/dev/null | cut -d' ' -f1)
if [[ -z $PS ]]; then
    # No summary (ping was stopped): sent = the highest sequence number seen, answered = replies.
    PS=$(grep -o 'icmp_seq=[0-9]*' "$T/ping.out" 2>/dev/null | cut -d= -f2 | sort -n | tail -1)
    PR=$(grep -c 'bytes from' "$T/ping.out" 2>/dev/null)
fi
PS=${PS:-0} PR=${PR:-0}
# An early end over 15 s (the generator checks the clock every 100 ms) means ncat gave up. The
# echo server keeps a half-closed connection open, so the TCP ncat ends by its idle timeout
# (exit 1) 10 s after its input did: that exit, after the end, is the normal one.
if [[ $TRC == 1 && $TEARLY == 0 ]] && grep -q 'Idle timeout expired' "$T/tcp.err"; then
    TRC="1 (idle timeout after the end, normal)"
    tcp_rc_ok=1
else
    [[ $TRC == 0 ]] && tcp_rc_ok=1 || tcp_rc_ok=0
fi
[[ $TM == 0 && $STALL_TCP == 0 && $tcp_rc_ok == 1 && $TEARLY -ge 0 && $TEARLY -le 15 && $TS -gt 0 ]] && r=PASS || r=FAIL
row "tcp" $r "stream: $TS lines sent, $TR echoed, $TM missing; $STALL_TCP stalled 10 s intervals; ncat exit $TRC, ended ${TEARLY}s before the end"
[[ $UM == 0 && $URC == 0 && $UEARLY -ge 0 && $UEARLY -le 15 && $US -gt 0 ]] && r=PASS || r=FAIL
row "udp" $r "probe: $US sent, $UR echoed, $UM lost; $STALL_UDP stalled 10 s intervals; ncat exit $URC, ended ${UEARLY}s before the end"
[[ $HS -gt 0 && $HS == "$HOK" ]] && r=PASS || r=FAIL
row "http" $r "short connections: $HS made, $HOK answered 200, $((HS - HOK)) failed"
[[ $PS -gt 0 && $PS == "$PR" ]] && r=PASS || r=FAIL
row "icmp" $r "ping: $PS sent, $PR answered, $((PS - PR)) lost"

# Rotation and churn.
SER=$(awk -F, '$2=="node-a" && $3 ~ /\/sa\/frontend$/ {print $4}' "$OUT/serials.csv" | uniq | wc -l)
NSER=$(awk -F, '$2=="node-a" && $3 ~ /\/veil\/node\/node-a$/ {print $4}' "$OUT/serials.csv" | uniq | wc -l)
[[ $ROT_FAIL == 0 && $ROT_OK -gt 0 && $(((SER - 1) * 10)) -ge $((ROT_OK * 9)) ]] && r=PASS || r=FAIL
row "rotation" $r "lab rotate --all: $ROT_OK ok, $ROT_FAIL failed; frontend SVID serials seen: $SER, node-a's: $NSER"
[[ $POL_FAIL == 0 && $POL_OK -gt 0 && $CUT == 0 ]] && r=PASS || r=FAIL
row "policy" $r "policy changes: $POL_OK ok, $POL_FAIL failed; connections cut by them: $CUT"

# Drops and restarts, from every node's status.
for node in $NODES; do
    "$V" status --name "$NAME" --node "$node" -o json >"$OUT/status-$node.json" 2>>"$OUT/soak.log"
done
DROPS=$(python3 - "$OUT" $NODES <<'EOF'
import json, sys
out, nodes = sys.argv[1], sys.argv[2:]
parts, bad = [], 0
for n in nodes:
    try:
        st = json.load(open(f"{out}/status-{n}.json"))
    except Exception:
        parts.append(f"{n}: no status"); bad += 1; continue
    nz = {k: v for k, v in st.get("drops", {}).items() if v}
    bad += sum(v for k, v in nz.items() if k in ("unknown", "datapath-error"))
    tr = st.get("tunnel_restarts")
    bad += (tr or {}).get("total", 0)
    parts.append(f"{n}: " + (", ".join(f"{k} {v}" for k, v in sorted(nz.items())) or "none")
                 + f"; tunnel restarts {json.dumps(tr)}")
print(bad, " | ".join(parts))
EOF
)
[[ ${DROPS%% *} == 0 ]] && r=PASS || r=FAIL
row "drops" $r "${DROPS#* }"

# Memory: median over the minute after the warm-up vs over the last minute, per process.
MEM=$(python3 - "$OUT/rss.csv" "$WARM" "$DUR" <<'EOF'
import csv, sys, statistics
path, warm, dur = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rows = [r for r in csv.DictReader(open(path)) if r["rss_kb"]]
procs = sorted({r["proc"] for r in rows})
for p in procs:
    rs = [r for r in rows if r["proc"] == p]
    pids = []
    for r in rs:
        if not pids or pids[-1] != r["pid"]:
            pids.append(r["pid"])
    base = [int(r["rss_kb"]) for r in rs if warm <= int(r["t"]) < warm + 60]
    end = [int(r["rss_kb"]) for r in rs if int(r["t"]) >= dur - 60]
    after = [int(r["rss_kb"]) for r in rs if int(r["t"]) >= warm]
    first = int(rs[0]["rss_kb"])
    if not base or not end:
        print(p, "nodata", 0, 0, 0, 0, len(pids) - 1); continue
    b, e = statistics.median(base), statistics.median(end)
    ch = (e - b) / b * 100
    crit = p.startswith("agent-") or p.startswith("veil-wg-")
    ok = abs(ch) <= 5 and len(pids) == 1
    print(p, ("PASS" if ok else "FAIL") if crit else "info", first, int(b), int(e), f"{ch:+.1f}", max(after), len(pids) - 1)
EOF
)
while read -r p res first b e ch mx restarts; do
    [[ -z $p ]] && continue
    row "memory" "$res" "$(printf '%-20s RSS %6s kB at start, %6s kB after warm-up, %6s kB at the end (%s %%), max %s kB after warm-up; restarts %s' "$p" "$first" "$b" "$e" "$ch" "$mx" "$restarts")"
done <<<"$MEM"
grep -q '^agent-' <<<"$MEM" && grep -q '^veil-wg-' <<<"$MEM" || row "memory" FAIL "no agent or veil-wg samples"

# Error lines, tests/src/lib.rs's rule: a panic anywhere, an agent ERROR, SPIRE level=error, a
# veil-wg error; lines naming one of lab up's spire-agent readiness probes are the lab tool's.
mkdir -p "$OUT/logs"
cp -r "$RUN_ROOT/$NAME/logs/." "$OUT/logs/" 2>/dev/null
cp "$RUN_ROOT/$NAME/spire-probe-pids" "$OUT/" 2>/dev/null
ERRS=$(python3 - "$OUT/logs" "$OUT/spire-probe-pids" <<'EOF'
import os, sys
d, pp = sys.argv[1], sys.argv[2]
try:
    probes = [f" pid={l.strip()} " for l in open(pp) if l.strip()]
except FileNotFoundError:
    probes = []
for f in sorted(os.listdir(d)):
    for line in open(os.path.join(d, f), errors="replace"):
        line = line.rstrip("\n")
        bad = ("panicked at" in line
               or (f.startswith("agent-") and " ERROR " in line)
               or "level=error" in line
               or (f.startswith("wg-") and line.startswith("veil-wg: error")))
        if bad and not any(p in line for p in probes):
            print(f"{f}: {line}")
EOF
)
NERR=$(awk 'NF' <<<"$ERRS" | wc -l)
[[ $NERR == 0 ]] && r=PASS || r=FAIL
row "logs" $r "$NERR error/panic lines (rule of tests/src/lib.rs); WARN lines: $(cat "$OUT"/logs/agent-*.log 2>/dev/null | grep -c ' WARN ')"
((NERR)) && { echo "$ERRS" >"$OUT/error-lines.txt"; head -20 <<<"$ERRS" | sed 's/^/    /' >>"$OUT/soak.log"; }
# The agents' warnings, by message (timestamp and fields after the message left out), for the
# reader: a warning repeated all hour is noise or a fault, and neither shows in a count alone.
WARNS=$(cat "$OUT"/logs/agent-*.log 2>/dev/null | grep ' WARN ' \
    | sed -E 's/^[^ ]+ +WARN +//; s/ [a-z_]+=.*$//' | cut -c1-140 | sort | uniq -c | sort -rn | head -10)
[[ -n $WARNS ]] && row "warnings" info "agents' WARN lines by message (count, target: message):$(sed 's/^ */\n             /' <<<"$WARNS")"

LOAD=$(awk -F, 'NR>1 {s+=$2; n++; if ($2>m) m=$2} END {if (n) printf "mean %.2f, max %.2f", s/n, m}' "$OUT/progress.csv")

cleanup
[[ ${#LEFT[@]} == 0 ]] && r=PASS || r=FAIL
row "cleanup" $r "${#LEFT[@]} things of lab $NAME left after lab down"

{
    echo
    echo "soak of lab $NAME: ${DUR}s, warm-up ${WARM}s, identity $IDENTITY, $(nproc) cores, 1-min load average $LOAD"
    echo "started $(date -u -d @"$T0" '+%F %T') UTC, HEAD $COMMIT at the start; samples, traffic and logs in $OUT"
    printf '%-10s %-4s %s\n' criterion res detail
    printf '%s\n' "${ROWS[@]}"
    ((FAIL)) && echo "SOAK FAILED" || echo "SOAK PASSED"
} | tee "$OUT/summary.txt" | tee -a "$OUT/soak.log"
exit $FAIL
