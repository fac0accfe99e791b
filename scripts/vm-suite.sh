#!/usr/bin/env bash
# The kernel-WireGuard suite, run INSIDE the VM that scripts/vm-test.sh boots (Debian's own
# kernel, which has the wireguard module and no tcx: the datapath runs on clsact there).
#
#   vm-suite.sh NAME=TEST_BINARY...     (vm-test.sh passes transport=, auth=, attach=)
#
# 1. End-to-end tests from tests/tests/*.rs with VEIL_TEST_BACKEND=kernel, so every lab a test
#    does not give a backend runs kernel WireGuard: the leak pair, mutual auth, PSK rotation and
#    SVID rotation under load, the agent restart (the kernel device adopted), node traffic
#    encryption (its leak pair, and on a dual-stack underlay), IPv6 between dual-stack pods (its
#    leak pair and mutual auth), the clsact attach suite, and a lab with a kernel-WireGuard node
#    beside a veil-wg node.
# 2. Throughput (iperf3, one TCP stream) and request/response latency (veil-rr, 64 B, p50)
#    between two pods on two nodes, for plaintext, veil-wg and kernel WireGuard, in interleaved
#    rounds; medians and ratios. Under TCG emulation the absolute numbers are the emulator's;
#    the ratios are what to read.
# VEIL_TEST_IP_FAMILY=ipv4|ipv6|dual (passed in by vm-test.sh) is the tests' lab family, as on
# the host, and the measured labs' `--ip-family`: ipv6 puts the whole suite on an IPv6 underlay.
# VEIL_VM_TESTS="WORD..." runs only the tests whose name holds one of the words, and
# VEIL_VM_ROUNDS=0 skips the measurement (both passed in by vm-test.sh): a targeted rerun.
# Prints `vm-test: N passed, M failed` and exits non-zero on any failure. Logs: /vm-results.
set -uo pipefail

out=/vm-results
export PATH=/work/main/target/release:$PATH
export VEIL_TEST_BACKEND=kernel
declare -A bins=()
for a in "$@"; do bins[${a%%=*}]=${a#*=}; done

passed=0 failed=0
failures=()
result() { # name status
  if [ "$2" -eq 0 ]; then passed=$((passed + 1)); else failed=$((failed + 1)); failures+=("$1"); fi
}

TESTS=(
  transport::leak_pair_encrypted_shows_no_marker
  transport::leak_pair_plaintext_shows_marker
  transport::kernel_wireguard_carries_pods_and_interoperates_with_veil_wg
  transport::agent_restart_does_not_cut_a_long_stream
  transport::node_traffic_leak_pair_encrypted_shows_no_marker
  transport::node_traffic_leak_pair_plaintext_shows_marker
  transport::dual_stack_underlay_node_traffic_leak_pair_encrypted_shows_no_marker
  transport::dual_stack_ipv6_between_pods_crosses_only_encrypted_and_under_policy
  auth::allowed_pair_authenticates_on_first_try_and_intruder_is_dropped
  auth::leak_check_still_passes_with_mutual_auth
  auth::dual_stack_ipv6_connections_are_mutually_authenticated_like_ipv4
  auth::psk_rotation_under_load_loses_nothing
  auth::svid_rotation_every_20s_under_load_loses_nothing
  attach::clsact_mode_enforces_policy_and_survives_an_agent_restart
)

echo "vm-suite: kernel $(uname -r); wireguard module: $(lsmod | grep -c '^wireguard '); lab family: ${VEIL_TEST_IP_FAMILY:-the default}"
selected() { # test
  [ -z "${VEIL_VM_TESTS:-}" ] && return 0
  local w
  for w in $VEIL_VM_TESTS; do [[ $1 == *"$w"* ]] && return 0; done
  return 1
}
for t in "${TESTS[@]}"; do
  selected "$t" || continue
  suite=${t%%::*} name=${t#*::}
  bin=${bins[$suite]:-}
  if [ -z "$bin" ] || [ ! -x "$bin" ]; then
    echo "vm-suite: FAIL $t (no test binary for '$suite': '$bin')"
    result "$t" 1
    continue
  fi
  t0=$(date +%s)
  "$bin" --exact "$name" --test-threads 1 --nocapture >"$out/$t.log" 2>&1
  st=$?
  s=$(( $(date +%s) - t0 ))
  if [ $st -eq 0 ]; then
    echo "vm-suite: pass $t (${s} s)"
  else
    echo "vm-suite: FAIL $t (${s} s, exit $st); the last lines of $out/$t.log:"
    tail -n 40 "$out/$t.log" | sed 's/^/    /'
  fi
  grep -E '^(kernel WireGuard|PSK rotation|2 min under load)' "$out/$t.log" | sed 's/^/    /'
  result "$t" $st
done

# --- throughput and latency ----------------------------------------------------------------
ROUNDS=${VEIL_VM_ROUNDS:-3}
declare -A gbit=() rr=()
measure() { # mode lab-args...
  local mode=$1 lab=vp$$ be hostport
  shift
  local family=()
  [ -n "${VEIL_TEST_IP_FAMILY:-}" ] && family=(--ip-family "$VEIL_TEST_IP_FAMILY")
  if ! veil lab up --name "$lab" --quiet --identity dev --control-plane files "${family[@]}" "$@" \
      >"$out/perf-$mode.log" 2>&1; then
    echo "vm-suite: FAIL perf $mode: lab up failed (see $out/perf-$mode.log)"
    return 1
  fi
  # The default lab's backend pod, on node-b: its first address (IPv6 in an IPv6-only lab, as
  # the lab writes 198.19.2.10; the guest has no JSON tool to read `lab show` with).
  if [ "${VEIL_TEST_IP_FAMILY:-}" = ipv6 ]; then
    be=fd00:198:19:2::10 hostport="[fd00:198:19:2::10]:7001"
  else
    be=198.19.2.10 hostport="198.19.2.10:7001"
  fi
  veil lab exec --name "$lab" backend -- sh -c \
    'setsid iperf3 -s -p 5201 >/dev/null 2>&1 </dev/null & setsid veil-rr server --port 7001 >/dev/null 2>&1 </dev/null &'
  local ok=1 i
  for i in $(seq 1 50); do
    veil lab exec --name "$lab" frontend -- ncat -z -w 1 "$be" 5201 2>/dev/null \
      && veil lab exec --name "$lab" frontend -- ncat -z -w 1 "$be" 7001 2>/dev/null \
      && { ok=0; break; }
    sleep 0.2
  done
  local g p
  g=$(veil lab exec --name "$lab" frontend -- iperf3 -c "$be" -p 5201 -t 8 -O 1 -f m 2>&1 \
    | awk '/receiver/ { for (i = 1; i < NF; i++) if ($(i+1) == "Mbits/sec") print $i }')
  p=$(veil lab exec --name "$lab" frontend -- veil-rr client --connect "$hostport" --size 64 \
    --seconds 5 2>&1 | grep -o '"p50_us": *[0-9.]*' | grep -o '[0-9.]*$')
  veil lab down --name "$lab" >>"$out/perf-$mode.log" 2>&1
  if [ $ok -ne 0 ] || [ -z "$g" ] || [ -z "$p" ]; then
    echo "vm-suite: FAIL perf $mode: no figure (servers up: $((1 - ok)), Mbit/s '$g', p50 '$p')"
    return 1
  fi
  gbit[$mode]+="$g "
  rr[$mode]+="$p "
  echo "vm-suite: perf $mode: $g Mbit/s, RR p50 $p us"
}
median() { tr ' ' '\n' | grep . | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
perf_ok=0
[ "$ROUNDS" -eq 0 ] && perf_ok=skipped
for r in $(seq 1 "$ROUNDS"); do
  measure plaintext --encryption off || perf_ok=1
  measure veil-wg --backend userspace || perf_ok=1
  measure kernel --backend kernel || perf_ok=1
done
[ "$perf_ok" != skipped ] \
  && result "perf: plaintext, veil-wg and kernel WireGuard measured in $ROUNDS rounds" $perf_ok
if [ "$perf_ok" = 0 ]; then
  declare -A mg=() mr=()
  for m in plaintext veil-wg kernel; do
    mg[$m]=$(echo "${gbit[$m]}" | median)
    mr[$m]=$(echo "${rr[$m]}" | median)
  done
  ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
  echo "vm-suite: medians of $ROUNDS rounds (one TCP stream Mbit/s; 64 B request/response p50 us):"
  for m in plaintext veil-wg kernel; do
    printf 'vm-suite:   %-10s %10s Mbit/s %10s us\n' "$m" "${mg[$m]}" "${mr[$m]}"
  done
  echo "vm-suite: throughput kernel/veil-wg $(ratio "${mg[kernel]}" "${mg[veil-wg]}"), veil-wg/plaintext $(ratio "${mg[veil-wg]}" "${mg[plaintext]}"), kernel/plaintext $(ratio "${mg[kernel]}" "${mg[plaintext]}")"
  echo "vm-suite: RR p50 kernel/veil-wg $(ratio "${mr[kernel]}" "${mr[veil-wg]}"), veil-wg/plaintext $(ratio "${mr[veil-wg]}" "${mr[plaintext]}"), kernel/plaintext $(ratio "${mr[kernel]}" "${mr[plaintext]}")"
fi

echo "vm-test: $passed passed, $failed failed"
for f in "${failures[@]}"; do echo "vm-test:   failed: $f"; done
[ "$failed" -eq 0 ]
