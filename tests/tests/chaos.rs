//! End-to-end chaos under load (issue 17, reliability scenarios 8, 9, 10 and 19): `kill -9` of a
//! node's veil-wg, of a node's agent and of a node's SPIRE agent (real SPIRE), and the programs
//! reloaded under a flood of denied flows, while a TCP line
//! stream and a sequenced UDP probe cross from frontend (node-a) to backend (node-b) under an
//! `authentication: required` policy. Each run captures node-a's underlay interface for its whole
//! duration: nothing may leave in clear.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    process::Command,
    time::{Duration, Instant},
};

use veil_agent::lab::{spire_real, LabPaths};
use veil_tests::{
    contains, pcap_frames, rand_suffix, send_frame, Capture, Lab, Stamped, Streaming, AUTH_POLICY,
    ECHO_LAB, END_ETHERTYPE,
};

/// The capture point: node-a's own underlay interface (in node-a's netns), so every packet
/// node-a sends or receives is in the pcap, whatever the bridge does.
const CAPTURE_IF: &str = "ul0";
/// One probe and one stream line every 100 ms.
const GAP_MS: u32 = 100;

/// A string every payload of a run starts with, to find it in raw capture bytes.
fn token() -> String {
    format!("chaos{:08x}", rand_suffix())
}

// ---------------------------------------------------------------------------------------------
// Clients whose every output line carries the instant it was read.

/// frontend's TCP echo stream and sequenced UDP probe to backend:9000, `n` lines each, one every
/// `GAP_MS`. ncat's idle timeout (5 s) counts stdin too, so it only ends a client 5 s after its
/// last line was sent with nothing echoed meanwhile.
struct Traffic {
    tcp: Streaming,
    udp: Streaming,
    n: u32,
    tok: String,
}

/// What a finished `Traffic` measured.
#[derive(Debug)]
struct Outcome {
    tcp_missing: Vec<u32>,
    udp_missing: Vec<u32>,
    /// Longest time between two consecutive echoes (the receive-side outage).
    tcp_stall: Duration,
    udp_gap: Duration,
    /// When the echo ending the longest UDP gap arrived.
    udp_resumed: Option<Instant>,
    tcp_stderr: String,
}

fn script(tok: &str, kind: &str, n: u32, gap_ms: u32, ncat: &str) -> String {
    format!(
        "for i in $(seq 1 {n}); do echo {tok}-{kind}-$i; sleep 0.{gap_ms:03}; done | ncat {ncat}"
    )
}

impl Traffic {
    fn start(lab: &Lab, tok: &str, n: u32) -> Traffic {
        let be = lab.pod_ip("backend");
        let tcp = script(tok, "line", n, GAP_MS, &format!("-w 5 -i 5 {be} 9000"));
        let udp = script(tok, "seq", n, GAP_MS, &format!("-u -w 3 -i 5 {be} 9000"));
        Traffic {
            tcp: Streaming::spawn(&mut lab.command_in("frontend", &["sh", "-c", &tcp])),
            udp: Streaming::spawn(&mut lab.command_in("frontend", &["sh", "-c", &udp])),
            n,
            tok: tok.to_string(),
        }
    }

    /// Waits until both clients have `k` lines echoed.
    fn wait_flowing(&self, lab: &Lab, k: usize) {
        lab.wait_for(
            &format!("{k} TCP lines and {k} UDP probes echoed"),
            Duration::from_secs(20),
            || (self.tcp.line_count() >= k && self.udp.line_count() >= k).then_some(()),
        );
    }

    fn finish(self) -> Outcome {
        let (tcp, tcp_err) = self.tcp.finish_stamped();
        let (udp, _) = self.udp.finish_stamped();
        let missing = |lines: &[(Instant, String)], kind: &str| -> Vec<u32> {
            (1..=self.n)
                .filter(|i| {
                    let want = format!("{}-{kind}-{i}", self.tok);
                    !lines.iter().any(|(_, l)| *l == want)
                })
                .collect()
        };
        let longest = |lines: &[(Instant, String)]| {
            lines
                .windows(2)
                .map(|w| (w[1].0 - w[0].0, w[1].0))
                .max_by_key(|(d, _)| *d)
        };
        Outcome {
            tcp_missing: missing(&tcp, "line"),
            udp_missing: missing(&udp, "seq"),
            tcp_stall: longest(&tcp).map(|x| x.0).unwrap_or_default(),
            udp_gap: longest(&udp).map(|x| x.0).unwrap_or_default(),
            udp_resumed: longest(&udp).map(|x| x.1),
            tcp_stderr: tcp_err
                .into_iter()
                .map(|(_, l)| l)
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }
}

/// TCP counters of a pod's network namespace that count resets and aborts (`nstat -asz`).
fn tcp_resets(lab: &Lab, pod: &str) -> BTreeMap<String, u64> {
    let out = lab.exec_ok(pod, &["nstat", "-asz"]);
    out.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (k, v) = (f.next()?, f.next()?.parse().ok()?);
            ["TcpEstabResets", "TcpOutRsts", "TcpExtTCPAbortOnData"]
                .contains(&k)
                .then(|| (k.to_string(), v))
        })
        .collect()
}

fn signal(pid: i32, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig)
        .unwrap_or_else(|e| panic!("{sig} to {pid}: {e}"));
}

fn sigkill(pid: i32) {
    signal(pid, nix::sys::signal::Signal::SIGKILL);
}

// ---------------------------------------------------------------------------------------------
// The capture: tcpdump on one interface of one netns, and a classifier of every frame.

/// A plaintext pod-to-pod UDP datagram (198.19.1.250 -> 198.19.2.250, payload
/// `<tok>-canary`) put on node-a's underlay as a raw frame to an unknown unicast MAC (the
/// bridge floods it, every host ignores it). The classifier must flag it: proof that this
/// capture, on this interface, sees a leak when there is one (the sanity half of the leak pair).
fn send_canary(netns: &str, ifname: &str, tok: &str) {
    let payload = format!("{tok}-canary");
    let udp_len = 8 + payload.len() as u16;
    let total = 20 + udp_len;
    let mut f = vec![
        0x02, 0, 0, 0, 0x0c, 0x0c, 0x02, 0, 0, 0, 0x0c, 0x0d, 0x08, 0x00,
    ];
    f.extend([0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0]);
    f[16..18].copy_from_slice(&total.to_be_bytes());
    f.extend([198, 19, 1, 250, 198, 19, 2, 250]);
    f.extend(40000u16.to_be_bytes());
    f.extend(9000u16.to_be_bytes());
    f.extend(udp_len.to_be_bytes());
    f.extend([0, 0]);
    f.extend(payload.as_bytes());
    send_frame(netns, ifname, f);
}

/// Every frame of a capture, sorted.
#[derive(Debug, Default)]
struct Verdict {
    frames: usize,
    /// UDP between node addresses, port 51820 on both sides.
    wireguard: usize,
    /// TCP to or from port 4250 (the agents' TLS control channel).
    control: usize,
    /// TCP between a node and the lab's spire-server (SPIRE's mTLS gRPC, on SPIRE labs) or its
    /// kube-apiserver (the agents' and kubelets' TLS, on Kubernetes labs).
    control_plane: usize,
    /// ICMP errors quoting a WireGuard datagram (node-a answering node-b's WireGuard packets
    /// while no veil-wg listens): the quote is of ciphertext.
    icmp_for_wireguard: usize,
    /// The canary frames this test put on the wire itself.
    canary: usize,
    /// Pod addresses (198.19.0.0/16, fd00:198:19::/48) in an outer IP header, or the run's
    /// payload token in the bytes: a leak.
    plaintext: Vec<String>,
    /// Any other IP traffic (ARP, IGMP to 224.0.0.0/24, IPv6 link-local control, neighbour
    /// discovery and the end frame are not counted).
    other: Vec<String>,
}

/// TCP to or from the lab's spire-server (on either underlay family) or kube-apiserver address
/// and port.
fn control_plane_traffic(src: IpAddr, dst: IpAddr, ports: Option<(u16, u16)>) -> bool {
    use veil_agent::lab::{kube, spire_real};
    [
        (
            IpAddr::from(spire_real::SERVER_ADDR),
            spire_real::SERVER_PORT,
        ),
        (
            IpAddr::from(spire_real::SERVER_ADDR6),
            spire_real::SERVER_PORT,
        ),
        (IpAddr::from(kube::API_IP), kube::API_PORT),
    ]
    .iter()
    .any(|&(addr, port)| {
        ports.is_some_and(|(s, d)| (src == addr && s == port) || (dst == addr && d == port))
    })
}

/// The IP header facts the classifier needs, of an IPv4 or IPv6 frame (no IPv6 extension
/// headers are walked: veil sends none, and a frame with one is "other").
struct Packet<'a> {
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    /// TTL or hop limit.
    hops: u8,
    /// From the transport header on.
    l4: &'a [u8],
}

fn packet(frame: &[u8]) -> Option<Packet<'_>> {
    match frame.get(12..14)? {
        [0x08, 0x00] if frame.len() >= 34 => {
            let ip = &frame[14..];
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            Some(Packet {
                src: <[u8; 4]>::try_from(&ip[12..16]).ok()?.into(),
                dst: <[u8; 4]>::try_from(&ip[16..20]).ok()?.into(),
                proto: ip[9],
                hops: ip[8],
                l4: ip.get(ihl..).unwrap_or_default(),
            })
        }
        [0x86, 0xdd] if frame.len() >= 54 => {
            let ip = &frame[14..];
            Some(Packet {
                src: <[u8; 16]>::try_from(&ip[8..24]).ok()?.into(),
                dst: <[u8; 16]>::try_from(&ip[24..40]).ok()?.into(),
                proto: ip[6],
                hops: ip[7],
                l4: &ip[40..],
            })
        }
        _ => None,
    }
}

/// A pod address: 198.19.0.0/16 or fd00:198:19::/48.
fn is_pod(a: IpAddr) -> bool {
    match a {
        IpAddr::V4(a) => a.octets()[..2] == [198, 19],
        IpAddr::V6(a) => a.segments()[..3] == [0xfd00, 0x198, 0x19],
    }
}

/// Traffic the kernel keeps to the link on its own, never pod traffic: IGMP to 224.0.0.0/24
/// (membership reports when a device comes up); IPv6 from a link-local or the unspecified
/// address (neighbour discovery, MLD); and neighbour discovery between the IPv6 underlay's own
/// addresses (ICMPv6 133-137 with hop limit 255, so never routed).
fn is_link_control(p: &Packet) -> bool {
    match p.src {
        IpAddr::V4(_) => {
            p.proto == 2 && matches!(p.dst, IpAddr::V4(d) if d.octets()[..3] == [224, 0, 0])
        }
        IpAddr::V6(s) => {
            (s.segments()[0] & 0xffc0) == 0xfe80
                || s.is_unspecified()
                || (p.proto == 58
                    && p.hops == 255
                    && p.l4.first().is_some_and(|t| (133..=137).contains(t)))
        }
    }
}

/// An ICMP or ICMPv6 destination-unreachable error quoting a WireGuard datagram (port 51820 on
/// both sides): the quote is of ciphertext.
fn is_icmp_for_wireguard(p: &Packet) -> bool {
    let be16 = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
    let (quote_proto, quote_udp) = match (p.src, p.proto, p.l4.first()) {
        (IpAddr::V4(_), 1, Some(3)) => (8 + 9, 8 + 20),
        (IpAddr::V6(_), 58, Some(1)) => (8 + 6, 8 + 40),
        _ => return false,
    };
    p.l4.len() >= quote_udp + 4
        && p.l4[quote_proto] == 17
        && be16(&p.l4[quote_udp..]) == 51820
        && be16(&p.l4[quote_udp + 2..]) == 51820
}

fn classify(pcap: &[u8], tok: &str) -> Verdict {
    let be16 = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
    let canary = format!("{tok}-canary");
    let mut v = Verdict::default();
    for frame in pcap_frames(pcap) {
        if frame.len() < 14 {
            continue;
        }
        let ethertype = be16(&frame[12..14]);
        if ethertype == END_ETHERTYPE || ethertype == 0x0806 {
            continue;
        }
        v.frames += 1;
        if contains(frame, canary.as_bytes()) {
            v.canary += 1;
            continue;
        }
        let has_token = contains(frame, tok.as_bytes());
        let Some(p) = packet(frame) else {
            v.other.push(format!("ethertype {ethertype:#06x}"));
            continue;
        };
        if has_token {
            v.plaintext
                .push(format!("{} > {} carrying {tok}", p.src, p.dst));
            continue;
        }
        if is_link_control(&p) {
            continue;
        }
        let ports = (p.l4.len() >= 4).then(|| (be16(p.l4), be16(&p.l4[2..])));
        let what = format!("{} > {} proto {} ports {ports:?}", p.src, p.dst, p.proto);
        if is_pod(p.src) || is_pod(p.dst) {
            v.plaintext.push(what);
        } else if p.proto == 17 && ports == Some((51820, 51820)) {
            v.wireguard += 1;
        } else if p.proto == 6 && ports.is_some_and(|(s, d)| s == 4250 || d == 4250) {
            v.control += 1;
        } else if p.proto == 6 && control_plane_traffic(p.src, p.dst, ports) {
            v.control_plane += 1;
        } else if is_icmp_for_wireguard(&p) {
            v.icmp_for_wireguard += 1;
        } else {
            v.other.push(what);
        }
    }
    v
}

/// Asserts the whole capture held nothing in clear and only WireGuard and the control channel
/// between nodes; the canary proves the capture could see a leak.
fn assert_nothing_in_clear(v: &Verdict, what: &str) {
    println!(
        "{what}: capture of node-a's {CAPTURE_IF}: {} frames, {} WireGuard, {} control (TCP 4250), {} control plane (TCP to spire-server or kube-apiserver), {} ICMP errors quoting WireGuard, {} plaintext, {} other; canary seen {}x",
        v.frames,
        v.wireguard,
        v.control,
        v.control_plane,
        v.icmp_for_wireguard,
        v.plaintext.len(),
        v.other.len(),
        v.canary
    );
    assert!(
        v.canary >= 1,
        "{what}: the capture did not see the canary plaintext frame: it could not see a leak"
    );
    assert!(
        v.wireguard >= 100,
        "{what}: only {} WireGuard frames captured: wrong capture point?",
        v.wireguard
    );
    assert!(
        v.plaintext.is_empty(),
        "{what}: {} plaintext frames on node-a's underlay: {:#?}",
        v.plaintext.len(),
        v.plaintext
    );
    assert!(
        v.other.is_empty(),
        "{what}: traffic other than WireGuard, TCP 4250 and SPIRE on node-a's underlay: {:#?}",
        v.other
    );
}

/// The denied flows of a fault run, tried by intruder (node-a) against backend (node-b) in loops
/// that span the fault, the recovery and the seconds after it: TCP connections to 8080 (40, one
/// per 0.2-0.7 s) and UDP datagrams to the echo on 9000 (300, one per 50 ms), every one of them
/// announced on stderr.
struct DeniedFlows {
    tcp: Streaming,
    udp: Streaming,
}

/// What the denied loops saw: every TCP try (`ADMITTED-i` or `refused-i`), every UDP echo (each
/// one an admission) and every UDP datagram sent (`sent-i`), with their instants.
struct DeniedOutcome {
    tcp_tries: Stamped,
    udp_echoes: Stamped,
    udp_sent: Stamped,
}

impl DeniedFlows {
    /// Starts both loops and waits until the TCP one has run once.
    fn start(lab: &Lab, tok: &str) -> DeniedFlows {
        let be = lab.pod_ip("backend");
        let url = lab.pod_url("backend", 8080);
        let tcp = Streaming::spawn(&mut lab.command_in(
            "intruder",
            &[
                "sh",
                "-c",
                &format!(
                    "for i in $(seq 1 40); do if curl -s -g -o /dev/null -m 0.5 {url}; then echo ADMITTED-$i; else echo refused-$i; fi; sleep 0.2; done"
                ),
            ],
        ));
        let udp = Streaming::spawn(&mut lab.command_in(
            "intruder",
            &[
                "sh",
                "-c",
                &format!(
                    "for i in $(seq 1 300); do echo {tok}-intr-$i; echo sent-$i >&2; sleep 0.05; done | ncat -u -w 3 -i 3 {be} 9000"
                ),
            ],
        ));
        lab.wait_for("the denied loops to run", Duration::from_secs(10), || {
            (tcp.line_count() >= 1).then_some(())
        });
        DeniedFlows { tcp, udp }
    }

    /// Waits for both loops to end.
    fn finish(self) -> DeniedOutcome {
        let (tcp_tries, _) = self.tcp.finish_stamped();
        let (udp_echoes, udp_sent) = self.udp.finish_stamped();
        DeniedOutcome {
            tcp_tries,
            udp_echoes,
            udp_sent,
        }
    }
}

impl DeniedOutcome {
    fn in_window(lines: &[(Instant, String)], prefix: &str, from: Instant, to: Instant) -> usize {
        lines
            .iter()
            .filter(|(t, l)| l.starts_with(prefix) && *t >= from && *t <= to)
            .count()
    }

    fn admitted_tcp(&self) -> Vec<&String> {
        self.tcp_tries
            .iter()
            .map(|(_, l)| l)
            .filter(|l| l.starts_with("ADMITTED"))
            .collect()
    }

    /// For the run's printed line, `from`..`to` being the fault.
    fn summary(&self, from: Instant, to: Instant) -> String {
        format!(
            "{} TCP tries ({} during the fault), {} UDP datagrams ({} during the fault), admitted {} TCP / {} UDP",
            self.tcp_tries.len(),
            Self::in_window(&self.tcp_tries, "", from, to),
            self.udp_sent.iter().filter(|(_, l)| l.starts_with("sent-")).count(),
            Self::in_window(&self.udp_sent, "sent-", from, to),
            self.admitted_tcp().len(),
            self.udp_echoes.len(),
        )
    }

    /// Not one denied try got through, and the loops did run across the fault (`from`..`to`,
    /// while `what` was down).
    fn assert_none_admitted(&self, from: Instant, to: Instant, what: &str) {
        let admitted = self.admitted_tcp();
        assert!(admitted.is_empty(), "denied TCP admitted: {admitted:?}");
        assert!(
            self.udp_echoes.is_empty(),
            "denied UDP echoed: {:?}",
            self.udp_echoes.iter().map(|(_, l)| l).collect::<Vec<_>>()
        );
        assert!(
            Self::in_window(&self.udp_sent, "sent-", from, to) >= 5,
            "too few denied datagrams while {what} was down: the check proves nothing"
        );
        assert!(
            self.tcp_tries.last().is_some_and(|(t, _)| *t > to),
            "the denied TCP loop ended before {what} was back"
        );
    }
}

/// The auth lab (on the suite's identity provider unless `extra` sets `--identity`) with the
/// `authentication: required` policy applied and frontend admitted.
fn up_with_auth_policy(extra: &[&str]) -> Lab {
    let lab = Lab::up_with_file(ECHO_LAB, extra);
    lab.apply_policy_ok(AUTH_POLICY);
    let url = lab.pod_url("backend", 8080);
    lab.wait_for(
        "frontend admitted to backend under the auth policy",
        Duration::from_secs(10),
        || lab.try_get("frontend", &url).ok(),
    );
    lab
}

/// One run under load: node-a's underlay captured (the canary sent first), frontend's TCP stream
/// and UDP probe flowing, frontend's TCP reset counters taken before the fault.
struct Run {
    cap: Capture,
    traffic: Traffic,
    tok: String,
    resets0: BTreeMap<String, u64>,
}

/// What a finished run measured.
struct Measured {
    out: Outcome,
    verdict: Verdict,
    n: u32,
    resets: (BTreeMap<String, u64>, BTreeMap<String, u64>),
}

impl Run {
    /// Starts the capture and `n` lines of each kind of traffic; returns once 30 of each came
    /// back.
    fn start(lab: &Lab, n: u32) -> Run {
        let netns_a = lab.node_netns("node-a");
        let tok = token();
        let cap = Capture::start(&netns_a, CAPTURE_IF);
        send_canary(&netns_a, CAPTURE_IF, &tok);
        let resets0 = tcp_resets(lab, "frontend");
        let traffic = Traffic::start(lab, &tok, n);
        traffic.wait_flowing(lab, 30);
        Run {
            cap,
            traffic,
            tok,
            resets0,
        }
    }

    /// Waits for the traffic to end, then stops the capture and classifies it.
    fn finish(self, lab: &Lab) -> Measured {
        let n = self.traffic.n;
        let out = self.traffic.finish();
        let pcap = self.cap.stop();
        let resets1 = tcp_resets(lab, "frontend");
        Measured {
            verdict: classify(&pcap, &self.tok),
            out,
            n,
            resets: (self.resets0, resets1),
        }
    }
}

impl Measured {
    /// The traffic's side of a run's printed line.
    fn summary(&self) -> String {
        let (out, n) = (&self.out, self.n);
        format!(
            "frontend UDP lost {} of {n} probes ({:?}; {} ms of probes at {GAP_MS} ms), longest gap between echoes {} ms; TCP {} of {n} lines missing, longest stall {} ms, reset counters {:?} -> {:?}",
            out.udp_missing.len(),
            out.udp_missing,
            out.udp_missing.len() as u32 * GAP_MS,
            out.udp_gap.as_millis(),
            out.tcp_missing.len(),
            out.tcp_stall.as_millis(),
            self.resets.0,
            self.resets.1,
        )
    }

    /// Nothing in clear on node-a's underlay, at most `max_lost` probes lost, and the stream
    /// neither reset nor short of a line.
    fn assert_delivered(&self, what: &str, max_lost: usize) {
        assert_nothing_in_clear(&self.verdict, what);
        let out = &self.out;
        assert!(
            out.udp_missing.len() <= max_lost,
            "{what}: lost {} probes: {:?}",
            out.udp_missing.len(),
            out.udp_missing
        );
        assert_eq!(
            out.tcp_missing,
            Vec::<u32>::new(),
            "{what}: TCP stream lost lines; stderr: {}",
            out.tcp_stderr
        );
        assert_eq!(
            self.resets.0, self.resets.1,
            "{what}: TCP resets or aborts in frontend's netns"
        );
    }
}

/// Scenario 9 (userspace device): veil-wg of node-a killed mid-traffic. Nothing leaves node-a in
/// clear while it is gone, the agent restarts it (`exited`), the probe's tail arrives, and the
/// outage is printed.
#[test]
fn veil_wg_kill_under_load_is_restarted_and_nothing_leaks() {
    let lab = up_with_auth_policy(&[]);
    let n = 300;
    let run = Run::start(&lab, n);

    let pid = lab.wg_pid("node-a").expect("veil-wg of node-a runs");
    let restarts0 = lab.status("node-a").tunnel_restarts.total;
    let t_kill = Instant::now();
    sigkill(pid);
    let st = lab.wait_for(
        "node-a's agent to restart veil-wg",
        Duration::from_secs(30),
        || {
            let st = lab.status("node-a");
            (st.tunnel_restarts.total > restarts0).then_some(st)
        },
    );
    let restarted = t_kill.elapsed();
    // Watched through a pidfd, the exit is acted on at once (~110-140 ms measured, status
    // polling included); at the 5 s reconcile alone it took 0-5 s.
    assert!(
        restarted < Duration::from_millis(1500),
        "veil-wg restarted {restarted:?} after the kill: its exit was not noticed"
    );
    assert_eq!(st.tunnel_restarts.total, restarts0 + 1, "{st:?}");
    let reason = &st.tunnel_restarts.recent.last().expect("a restart").reason;
    assert_eq!(reason, "exited");
    let new_pid = lab.wg_pid("node-a").expect("a new veil-wg runs");
    assert_ne!(new_pid, pid, "the same veil-wg process");

    let m = run.finish(&lab);
    let resumed = m
        .out
        .udp_resumed
        .map(|t| t.saturating_duration_since(t_kill).as_millis());
    println!(
        "veil-wg kill -9: restart recorded {} ms after the kill; UDP echoes resumed {resumed:?} ms after the kill; {}",
        restarted.as_millis(),
        m.summary(),
    );
    // Traffic resumed: the last 50 probes (5 s) all arrived.
    assert!(
        m.out.udp_missing.iter().all(|s| *s <= n - 50),
        "the probe's tail was lost: {:?}",
        m.out.udp_missing
    );
    // The agent watches veil-wg's process (a pidfd): its exit triggers the restart at once
    // (137 ms from the kill to the recorded restart, 1 of 300 probes lost, measured; it was
    // 0-5 s, up to 41 probes, when only the 5 s reconcile noticed). Bound: 1 s of probes. (That
    // veil-wg was killed at all is proven by the recorded restart, not by a loss.) The stream
    // stalls but is neither reset nor loses a line.
    m.assert_delivered("veil-wg kill", 10);
}

/// Scenarios 8 and 9 (agent SIGKILL with the userspace device): node-a's agent killed
/// mid-traffic. veil-wg is adopted, nothing leaves in clear, intruder -> backend (denied) never
/// gets through while the agent is down or re-adopting, and the probe loss is bounded.
#[test]
fn agent_kill_under_load_leaks_nothing_and_admits_no_denied_flow() {
    let lab = up_with_auth_policy(&[]);
    let run = Run::start(&lab, 250);
    let before = lab.status("node-a");
    let wg_before = lab.wg_pid("node-a").expect("veil-wg runs");
    let denied = DeniedFlows::start(&lab, &run.tok);

    let t_kill = Instant::now();
    let after = lab.restart_agent(
        "node-a's restarted agent ready",
        "node-a",
        before.agent.pid,
        nix::sys::signal::Signal::SIGKILL,
    );
    let t_ready = Instant::now();
    let denied = denied.finish();
    let m = run.finish(&lab);
    println!(
        "agent kill -9: restarted agent ready {} ms after the kill; denied flows: {}; {}",
        (t_ready - t_kill).as_millis(),
        denied.summary(t_kill, t_ready),
        m.summary(),
    );
    denied.assert_none_admitted(t_kill, t_ready, "the agent");
    // veil-wg adopted, not restarted; the key is the same.
    assert_eq!(lab.wg_pid("node-a"), Some(wg_before), "veil-wg replaced");
    assert_eq!(after.public_key, before.public_key);
    // Probe loss bound: at most 10 probes (1 s) at one per 100 ms.
    m.assert_delivered("agent kill", 10);
}

// ---------------------------------------------------------------------------------------------
// Scenario 10: the programs replaced while denied and allowed flows flood.

/// A flood of denied flows from intruder (node-a) to backend (node-b), on every address family
/// the lab gives them: UDP datagrams (each tenth to backend's echo on 9000, which would answer an
/// admitted one, the rest spread over 1,000 closed ports) at about 5,000 a second, and a TCP
/// connection attempt to 8080 (a SYN; any completed handshake is an admission) every 10 ms, sent
/// from one thread in intruder's netns until stopped.
struct DeniedFlood {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    sent: std::sync::Arc<std::sync::atomic::AtomicU64>,
    thread: std::thread::JoinHandle<FloodCount>,
}

/// What the flood's sender saw.
#[derive(Debug, Default)]
struct FloodCount {
    datagrams: u64,
    syns: u64,
    /// Datagrams that came back (only an admitted datagram draws an echo).
    echoes: u64,
    /// TCP attempts that completed a handshake.
    connected: u64,
}

impl DeniedFlood {
    fn start(lab: &Lab, tok: &str) -> DeniedFlood {
        use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let netns = lab.pod("intruder").netns.clone();
        let targets: Vec<IpAddr> = lab
            .pod("backend")
            .ips
            .iter()
            .map(|a| a.parse().expect("a pod address"))
            .collect();
        assert!(!targets.is_empty(), "backend has no address");
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let sent = std::sync::Arc::new(AtomicU64::new(0));
        let payload = format!("{tok}-flood").into_bytes();
        let (stop2, sent2) = (stop.clone(), sent.clone());
        let thread = std::thread::spawn(move || {
            veil_agent::sys::in_netns(&netns, move || {
                let socks: Vec<UdpSocket> = targets
                    .iter()
                    .map(|ip| {
                        let any = if ip.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
                        let s = UdpSocket::bind(any).expect("a UDP socket in intruder");
                        s.set_nonblocking(true).expect("non-blocking");
                        s
                    })
                    .collect();
                let mut c = FloodCount::default();
                let mut buf = [0u8; 2048];
                let mut n: u64 = 0;
                while !stop2.load(Ordering::Relaxed) {
                    for _ in 0..25 {
                        for (sock, ip) in socks.iter().zip(&targets) {
                            let port = if n.is_multiple_of(10) {
                                9000
                            } else {
                                20000 + (n % 1000) as u16
                            };
                            if sock.send_to(&payload, (*ip, port)).is_ok() {
                                c.datagrams += 1;
                            }
                            n += 1;
                        }
                    }
                    for sock in &socks {
                        while sock.recv(&mut buf).is_ok() {
                            c.echoes += 1;
                        }
                    }
                    for ip in &targets {
                        c.syns += 1;
                        let to = SocketAddr::new(*ip, 8080);
                        if TcpStream::connect_timeout(&to, Duration::from_millis(1)).is_ok() {
                            c.connected += 1;
                        }
                    }
                    sent2.store(c.datagrams, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(8));
                }
                c
            })
            .expect("intruder's netns")
        });
        DeniedFlood { stop, sent, thread }
    }

    /// Datagrams sent so far.
    fn sent(&self) -> u64 {
        self.sent.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn finish(self) -> FloodCount {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().expect("the flood thread")
    }
}

/// Frames of a capture whose IPv4 or IPv6 source is one of `ips`.
fn frames_from(pcap: &[u8], ips: &[String]) -> usize {
    let ips: Vec<std::net::IpAddr> = ips.iter().map(|a| a.parse().unwrap()).collect();
    pcap_frames(pcap)
        .into_iter()
        .filter(|f| {
            let src: Option<std::net::IpAddr> = match f.get(12..14) {
                Some([0x08, 0x00]) => f
                    .get(26..30)
                    .map(|b| <[u8; 4]>::try_from(b).unwrap().into()),
                Some([0x86, 0xdd]) => f
                    .get(22..38)
                    .map(|b| <[u8; 16]>::try_from(b).unwrap().into()),
                _ => None,
            };
            src.is_some_and(|s| ips.contains(&s))
        })
        .count()
}

/// The ids of every program a node's agent runs (TC and socket), by (interface, hook, name),
/// with their link ids.
fn attachments(st: &veil_tests::Status) -> BTreeMap<(String, String, String), (u32, u32)> {
    st.programs
        .iter()
        .chain(&st.socket_programs)
        .filter(|p| p.interface != "veil-hold")
        .map(|p| {
            (
                (p.interface.clone(), p.hook.clone(), p.name.clone()),
                (p.program_id, p.link_id),
            )
        })
        .collect()
}

/// Scenario 10: each node's agent is stopped (SIGTERM) and started again, three reloads in all,
/// while intruder floods backend with denied UDP and TCP and frontend's TCP stream and UDP probe
/// (admitted, `authentication: required`) run. Each start loads the programs anew and swaps them
/// into the TC links already attached (new program ids under the same link ids; the socket
/// programs' cgroup links are made before the old ones are released): nothing from
/// intruder reaches backend's interface, nothing is echoed or connects, the stream loses no line
/// and is not reset, and the probe loses at most 3 of 300.
#[test]
fn programs_reloaded_during_a_flood_admit_nothing_denied_and_keep_allowed_flows() {
    let lab = up_with_auth_policy(&[]);
    let backend = lab.pod("backend");
    let inside = Capture::start_lossless(&backend.netns, "eth0");
    let run = Run::start(&lab, 300);
    let flood = DeniedFlood::start(&lab, &run.tok);
    lab.wait_for("the flood to run", Duration::from_secs(10), || {
        (flood.sent() >= 1000).then_some(())
    });
    let denied0 =
        lab.drop_count("node-b", "policy-denied") + lab.drop_count("node-a", "policy-denied");

    for node in ["node-b", "node-a", "node-b"] {
        let before = lab.status(node);
        let sent0 = flood.sent();
        let t_term = Instant::now();
        let after = lab.restart_agent(
            &format!("{node}'s agent started again"),
            node,
            before.agent.pid,
            nix::sys::signal::Signal::SIGTERM,
        );
        let reload = t_term.elapsed();
        let during = flood.sent() - sent0;
        // Reloaded, not re-attached: every program is new, every TC link the one it replaced.
        let (old, new) = (attachments(&before), attachments(&after));
        assert_eq!(
            old.keys().collect::<Vec<_>>(),
            new.keys().collect::<Vec<_>>(),
            "{node}: the attached programs differ after the reload"
        );
        for (k, (prog, link)) in &new {
            let (old_prog, old_link) = old[k];
            assert_ne!(*prog, old_prog, "{node}: {k:?} was not reloaded");
            // A cgroup hook takes the new link beside the old one before the old one goes (make
            // before break, both programs run meanwhile): a new link id there is no window.
            if k.1 != "cgroup" {
                assert_eq!(
                    *link, old_link,
                    "{node}: {k:?} got a new link (a detach window)"
                );
            }
        }
        veil_tests::assert_links_adopted(&after);
        println!(
            "{node}: agent stopped and ready again in {} ms, {} programs replaced, {during} denied datagrams sent meanwhile",
            reload.as_millis(),
            new.len(),
        );
        // 4,000-6,400 measured; the bound leaves room for a loaded machine's slower flood.
        assert!(
            during >= 250,
            "only {during} denied datagrams while {node}'s agent reloaded: the flood proves nothing"
        );
        // The started agent's first moments under the flood too.
        let settle = flood.sent() + 2000;
        lab.wait_for(
            "2,000 more denied datagrams",
            Duration::from_secs(20),
            || (flood.sent() >= settle).then_some(()),
        );
    }
    let count = flood.finish();
    let m = run.finish(&lab);
    let pcap = inside.stop();
    let denied1 =
        lab.drop_count("node-b", "policy-denied") + lab.drop_count("node-a", "policy-denied");
    let from_intruder = frames_from(&pcap, &lab.pod("intruder").ips);
    let from_frontend = frames_from(&pcap, &lab.pod("frontend").ips);
    println!(
        "denied flood: {count:?}; policy-denied drops +{}; frames from intruder on backend's eth0: {from_intruder} (from frontend: {from_frontend}); {}",
        denied1 - denied0,
        m.summary()
    );
    assert!(
        from_frontend >= 300,
        "only {from_frontend} of frontend's frames on backend's eth0: the capture sees nothing"
    );
    assert_eq!(from_intruder, 0, "intruder's packets reached backend");
    assert_eq!(count.echoes, 0, "denied datagrams were echoed");
    assert_eq!(count.connected, 0, "denied TCP connections completed");
    assert!(
        denied1 - denied0 >= count.datagrams / 2,
        "{} policy-denied drops for {} denied datagrams: dropped for another reason?",
        denied1 - denied0,
        count.datagrams
    );
    m.assert_delivered("program reload", 3);
}

/// The pid of the spire-agent in `node`'s spire-agent cgroup (the supervisor runs `veil lab
/// spire-agent` there, which execs spire-agent).
fn spire_agent_pid(paths: &LabPaths, node: &str) -> Option<i32> {
    let procs = paths
        .node_cgroup(node)
        .join("spire-agent")
        .join("cgroup.procs");
    std::fs::read_to_string(procs)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "spire-agent")
        })
}

/// Whether `node`'s spire-agent log has, past byte `from`, the line of it minting an X509-SVID
/// for `spiffe_id` (it mints every SVID of its entries after each start and entry change: the
/// sign that it is synced with the server and serves that identity).
fn spire_agent_minted(paths: &LabPaths, node: &str, from: usize, spiffe_id: &str) -> bool {
    let log = std::fs::read(paths.log(&format!("spire-agent-{node}"))).unwrap_or_default();
    let id = format!("spiffe_id=\"{spiffe_id}\"");
    String::from_utf8_lossy(log.get(from..).unwrap_or_default())
        .lines()
        .any(|l| l.contains("msg=\"Creating X509-SVID\"") && l.contains(&id))
}

fn spire_agent_log_len(paths: &LabPaths, node: &str) -> usize {
    std::fs::metadata(paths.log(&format!("spire-agent-{node}")))
        .map(|m| m.len() as usize)
        .unwrap_or(0)
}

/// The group of the workload registered after the spire-agent restart (no lab process has it).
const NEWCOMER_GID: &str = "4242";

/// The serial of the SVID of `spiffe_id` that `node`'s agent holds.
fn serial(lab: &Lab, node: &str, spiffe_id: &str) -> Option<String> {
    lab.status(node)
        .svids
        .into_iter()
        .find(|v| v.spiffe_id == spiffe_id)
        .map(|v| v.serial)
}

/// Issue 17's chaos under load, SPIRE agent (scenario 19 under traffic), on real SPIRE whatever
/// `VEIL_TEST_IDENTITY` says: node-a's spire-agent `kill -9` mid-traffic. veil's agent keeps
/// its cached SVIDs, so established traffic keeps flowing (probes lost and TCP stall measured),
/// nothing leaves node-a in clear, intruder -> backend (denied) is never admitted while
/// spire-agent is down or resyncing, the lab's supervisor restarts spire-agent (as the DaemonSet
/// would), and afterwards identities still flow through it: `lab rotate` gives frontend a new
/// SVID that authenticates, and a workload registered after the restart gets its SVID from
/// node-a's Workload API.
#[test]
fn spire_agent_kill_under_load_serves_cached_svids_and_is_restarted() {
    // The flag wins over the suite default (`Lab::up_with_file`).
    let lab = up_with_auth_policy(&["--identity", "spire"]);
    assert_eq!(lab.view.identity.provider, "spire");
    let paths = LabPaths::new(&lab.name).expect("lab paths");
    let td = lab.view.trust_domain.clone();
    let node_id = format!("spiffe://{td}/veil/node/node-a");
    let frontend_id = format!("spiffe://{td}/ns/shop/sa/frontend");
    let run = Run::start(&lab, 250);
    let before = lab.status("node-a");
    let wg_before = lab.wg_pid("node-a").expect("veil-wg runs");
    let serial_before = serial(&lab, "node-a", &frontend_id).expect("frontend's SVID");
    let denied = DeniedFlows::start(&lab, &run.tok);

    let sa = spire_agent_pid(&paths, "node-a").expect("node-a's spire-agent runs");
    let log_at_kill = spire_agent_log_len(&paths, "node-a");
    let t_kill = Instant::now();
    sigkill(sa);
    let new_sa = lab.wait_for(
        "the supervisor to restart node-a's spire-agent",
        Duration::from_secs(30),
        || spire_agent_pid(&paths, "node-a").filter(|p| *p != sa),
    );
    let restarted = t_kill.elapsed();
    lab.wait_for(
        "node-a's restarted spire-agent to serve veil's node SVID",
        Duration::from_secs(30),
        || spire_agent_minted(&paths, "node-a", log_at_kill, &node_id).then_some(()),
    );
    let t_back = Instant::now();
    let denied = denied.finish();
    let m = run.finish(&lab);
    let after = lab.status("node-a");
    let serial_after = serial(&lab, "node-a", &frontend_id);
    println!(
        "spire-agent kill -9: restarted by the supervisor {} ms after the kill (pid {sa} -> {new_sa}), serving (node SVID minted) {} ms after it; frontend's SVID serial {serial_before} -> {serial_after:?}; denied flows: {}; {}",
        restarted.as_millis(),
        (t_back - t_kill).as_millis(),
        denied.summary(t_kill, t_back),
        m.summary(),
    );
    denied.assert_none_admitted(t_kill, t_back, "spire-agent");
    // The supervisor's first restart delay is 0.5 s (`supervisor::backoff(0)`).
    assert!(
        restarted < Duration::from_secs(5),
        "spire-agent restarted {restarted:?} after the kill"
    );
    // Nothing but spire-agent was restarted: veil's agent and veil-wg ride it out.
    assert_eq!(after.agent.pid, before.agent.pid, "veil's agent restarted");
    assert_eq!(lab.wg_pid("node-a"), Some(wg_before), "veil-wg replaced");
    // Established traffic flows on the cached SVIDs, and on the new ones the restarted
    // spire-agent mints (new serials for every entry): same bound as the agent kill.
    m.assert_delivered("spire-agent kill", 10);

    // Rotation through the restarted spire-agent: `lab rotate` (an entry update) reaches veil's
    // agent as a new SVID, and frontend authenticates with it.
    let current = serial(&lab, "node-a", &frontend_id).expect("frontend's SVID");
    let t_rotate = Instant::now();
    lab.lab_ok("rotate", &["--pod", "shop/frontend"]);
    lab.wait_for(
        "frontend's new SVID on node-a after the restart",
        Duration::from_secs(15),
        || (serial(&lab, "node-a", &frontend_id)? != current).then_some(()),
    );
    let rotated = t_rotate.elapsed();
    let url = lab.pod_url("backend", 8080);
    lab.wait_for(
        "frontend admitted with its rotated SVID",
        Duration::from_secs(10),
        || lab.try_get("frontend", &url).ok(),
    );

    // A workload registered after the restart gets its identity from node-a's Workload API.
    // Selectors uid 0 and gid NEWCOMER_GID: only a process with that group matches, so veil's agent
    // (gid 0) is not offered a second SVID. The fetch waits for spire-agent to mint the SVID:
    // a fetch before the entry is synced makes spire-agent log `No identity issued`.
    let newcomer = format!("spiffe://{td}/chaos/newcomer");
    let log_at_create = spire_agent_log_len(&paths, "node-a");
    let t_create = Instant::now();
    spire_real::server_cli(
        &paths,
        &veil_spire::cli::entry_create_args(
            &format!("spiffe://{td}/node/node-a"),
            &newcomer,
            &["unix:uid:0", &format!("unix:gid:{NEWCOMER_GID}")],
            None,
        ),
    )
    .expect("register the new workload");
    lab.wait_for(
        "node-a's spire-agent to mint the new workload's SVID",
        Duration::from_secs(15),
        || spire_agent_minted(&paths, "node-a", log_at_create, &newcomer).then_some(()),
    );
    let agent_bin = spire_real::tool("spire-agent").expect("spire-agent");
    let fetched = Command::new("setpriv")
        .args(["--regid", NEWCOMER_GID, "--clear-groups"])
        .arg(&agent_bin)
        .args(["api", "fetch", "x509", "-socketPath"])
        .arg(spire_real::workload_socket(&paths, "node-a"))
        .output()
        .expect("spire-agent api fetch");
    let got = String::from_utf8_lossy(&fetched.stdout);
    let issued = t_create.elapsed();
    println!(
        "after the restart: frontend rotated in {} ms and admitted; a new workload's SVID fetched {} ms after its entry was created",
        rotated.as_millis(),
        issued.as_millis()
    );
    assert!(
        fetched.status.success() && got.contains(&newcomer),
        "the new workload got no SVID from node-a's spire-agent: {got}{}",
        String::from_utf8_lossy(&fetched.stderr)
    );
}

// ---------------------------------------------------------------------------------------------
// Scenario 32: upgrade and downgrade N <-> N+1 under load, with mixed versions between steps.

/// Which build a node's agent (and so its veil-wg and veil-proxy, which the agent starts from
/// beside its own binary) runs.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Version {
    /// The previous release (`VEIL_UPGRADE_FROM`).
    Old,
    /// This workspace's build.
    New,
}

/// The two builds side by side in a private directory, and the switch that picks one per node.
///
/// The lab is brought up by the old `veil` copied to `bin/veil`, so its supervisor restarts
/// every agent from that path (`veil agent --config .../nodes/<node>/agent.yaml`). The first
/// [`Versions::set`] renames a dispatcher script over that path: an agent starts as the version
/// written in `versions/<node>`, everything else the lab runs stays the old build (`bin/veil-n`).
/// Restarting a node's agent then upgrades or downgrades it as a DaemonSet rollout does; its
/// veil-wg follows when restarted, from beside the agent's binary. The test's own commands
/// (`VEIL_BIN`, `cli`) are the lab's tool, except `status`, `observe` and `policy`: this build's
/// CLI, as an operator upgrading has it against a cluster of mixed agents.
struct Versions {
    dir: std::path::PathBuf,
    new: std::path::PathBuf,
    dispatching: std::cell::Cell<bool>,
}

const UPGRADED_BINARIES: [&str; 4] = ["veil", "veil-wg", "veil-proxy", "veil-cni"];

impl Versions {
    fn install(from: &std::path::Path) -> Versions {
        let dir = std::env::temp_dir().join(format!(
            "veil-upgrade-{}-{:08x}",
            std::process::id(),
            rand_suffix()
        ));
        let bin = dir.join("bin");
        std::fs::create_dir_all(dir.join("versions")).expect("versions dir");
        std::fs::create_dir_all(&bin).expect("bin dir");
        for b in UPGRADED_BINARIES {
            std::fs::copy(from.join(b), bin.join(b))
                .unwrap_or_else(|e| panic!("{}: {e}", from.join(b).display()));
        }
        std::fs::copy(bin.join("veil"), bin.join("veil-n")).expect("copy veil");
        let new = veil_tests::veil_bin();
        let v = Versions {
            dir,
            new,
            dispatching: std::cell::Cell::new(false),
        };
        let cli = v.dir.join("cli");
        v.write_script(
            &cli,
            &format!(
                "case \"$1\" in status|observe|policy) exec {} \"$@\";; esac\nexec {} \"$@\"\n",
                v.new.display(),
                bin.join("veil").display()
            ),
        );
        // Each test runs in its own process (nextest); nothing else reads it concurrently.
        std::env::set_var("VEIL_BIN", &cli);
        v
    }

    fn write_script(&self, path: &std::path::Path, body: &str) {
        use std::os::unix::fs::PermissionsExt;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, format!("#!/bin/sh\n{body}")).expect("write script");
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::rename(&tmp, path).expect("rename script");
    }

    /// From its next start, `node`'s agent runs `v`.
    fn set(&self, node: &str, v: Version) {
        let word = if v == Version::New { "new" } else { "old" };
        std::fs::write(self.dir.join("versions").join(node), word).expect("version file");
        if !self.dispatching.replace(true) {
            let bin = self.dir.join("bin");
            self.write_script(
                &bin.join("veil"),
                &format!(
                    "if [ \"$1\" = agent ] && [ \"$2\" = --config ]; then\n  node=$(basename \"$(dirname \"$3\")\")\n  if [ \"$(cat {versions}/\"$node\" 2>/dev/null)\" = new ]; then exec {new} \"$@\"; fi\nfi\nexec {old} \"$@\"\n",
                    versions = self.dir.join("versions").display(),
                    new = self.new.display(),
                    old = bin.join("veil-n").display(),
                ),
            );
        }
    }

    /// Which build the process `pid` runs (its binary's directory), or a panic naming it.
    fn of(&self, pid: u32) -> Version {
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).expect("process exe");
        if exe.parent() == self.new.parent() {
            Version::New
        } else if exe.parent() == Some(&self.dir.join("bin")) {
            Version::Old
        } else {
            panic!("process {pid} runs {}: neither build", exe.display())
        }
    }
}

impl Drop for Versions {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Unix time in ms.
fn unix_ms() -> u64 {
    veil_tests::since_epoch().as_millis() as u64
}

/// One step of the rollout: `node`'s agent restarted (SIGTERM, as a rollout stops a pod) as
/// `to`, its veil-wg restarted after it as `to` too. Checked between them, with the other node
/// on whatever it runs: the control channel between the two nodes made again by a node
/// handshake across the versions, and backend's pair with frontend authenticated again by a
/// workload handshake across the versions. Returns the printed line.
fn rollout_step(lab: &Lab, versions: &Versions, node: &str, to: Version, tok: &str) -> String {
    let other = if node == "node-a" { "node-b" } else { "node-a" };
    let before = lab.status(node);
    let wg_before = lab.wg_pid(node).expect("veil-wg runs");
    versions.set(node, to);
    let denied = DeniedFlows::start(lab, tok);
    let (t0, t0_ms) = (Instant::now(), unix_ms());
    let after = lab.restart_agent(
        &format!("{node}'s agent restarted as {to:?}"),
        node,
        before.agent.pid,
        nix::sys::signal::Signal::SIGTERM,
    );
    let t_ready = Instant::now();
    assert_eq!(versions.of(after.agent.pid), to, "{node}'s agent");
    assert_eq!(
        lab.wg_pid(node),
        Some(wg_before),
        "{node}'s veil-wg not adopted"
    );
    assert_eq!(
        after.public_key, before.public_key,
        "{node}'s node key changed"
    );
    // The node handshake across the versions: each side holds a channel to the other made
    // after the restart.
    let t_channels = lab.wait_for(
        &format!("{node} and {other} to make their channel again"),
        Duration::from_secs(30),
        || {
            [(node, other), (other, node)]
                .iter()
                .all(|(n, peer)| {
                    lab.status(n)
                        .channels
                        .iter()
                        .any(|c| c.node == *peer && c.established_unix * 1000 + 999 >= t0_ms)
                })
                .then(|| t0.elapsed())
        },
    );
    // The workload handshake across the versions: backend's SVID rotated, so node-b (which
    // enforces the policy and holds the pair) authenticates backend's pair with frontend again
    // with node-a.
    let t_rot = unix_ms();
    lab.lab_ok("rotate", &["--pod", "shop/backend"]);
    lab.wait_for(
        "backend's pair with frontend authenticated again after backend's SVID rotation",
        Duration::from_secs(30),
        || {
            let pairs: Vec<_> = ["node-a", "node-b"]
                .iter()
                .flat_map(|n| lab.status(n).auth)
                .filter(|p| {
                    p.expires_unix > 0
                        && (p.src_identity.contains("app=frontend")
                            || p.dst_identity.contains("app=frontend"))
                })
                .collect();
            (!pairs.is_empty() && pairs.iter().all(|p| p.authenticated_unix_ms > t_rot))
                .then_some(())
        },
    );
    // veil-wg restarted by the agent from beside its binary: the new version's device keyed
    // by the agent with what its node handshake agreed.
    let restarts0 = after.tunnel_restarts.total;
    let t_wg = Instant::now();
    signal(wg_before, nix::sys::signal::Signal::SIGTERM);
    lab.wait_for(
        &format!("{node}'s veil-wg restarted as {to:?}"),
        Duration::from_secs(30),
        || (lab.status(node).tunnel_restarts.total > restarts0).then_some(()),
    );
    let wg_after = lab.wg_pid(node).expect("a new veil-wg runs");
    assert_ne!(wg_after, wg_before, "{node}'s veil-wg was not restarted");
    assert_eq!(versions.of(wg_after as u32), to, "{node}'s veil-wg");
    let url = lab.pod_url("backend", 8080);
    lab.wait_for(
        "a new connection frontend -> backend",
        Duration::from_secs(10),
        || lab.try_get("frontend", &url).ok(),
    );
    let t_done = t_wg.elapsed();
    let denied = denied.finish();
    denied.assert_none_admitted(t0, t_ready, &format!("{node}'s agent"));
    format!(
        "{node} -> {to:?}: agent ready {} ms after SIGTERM, channels made again {} ms after it, veil-wg restarted and a new connection served {} ms after its SIGTERM; denied flows: {}",
        (t_ready - t0).as_millis(),
        t_channels.as_millis(),
        t_done.as_millis(),
        denied.summary(t0, t_ready)
    )
}

/// Scenario 32: the previous release (`VEIL_UPGRADE_FROM`, built by scripts/upgrade-test.sh)
/// upgraded to this build node by node and downgraded back, under an `authentication: required`
/// policy with frontend's TCP stream and UDP probe crossing every step. Between the steps the
/// nodes run different versions; each step checks the node handshake and the workload handshake
/// across them, restarts veil-wg as the new version, and tries intruder's denied flows across the
/// agent's restart. Over the whole run: no TCP line lost or reset, at most 10 probes lost per
/// veil-wg restart, nothing in clear on node-a's underlay, no denied flow admitted, no error
/// line in any log.
#[test]
#[ignore = "needs the previous release's binaries: scripts/upgrade-test.sh runs it"]
fn rollout_n_to_n1_and_back_under_load_interrupts_nothing_and_admits_nothing_denied() {
    rollout_under_load(&[]);
}

/// [`rollout_n_to_n1_and_back_under_load_interrupts_nothing_and_admits_nothing_denied`] with
/// the Kubernetes control plane: both versions' agents read the same Nodes, Pods, policies and
/// `VeilIdentity` objects from the lab's kube-apiserver and write policy status beside each
/// other; the policy is applied with this build's `veil policy apply`.
#[test]
#[ignore = "needs the previous release's binaries: scripts/upgrade-test.sh runs it"]
fn rollout_n_to_n1_and_back_under_load_on_kubernetes_interrupts_nothing() {
    rollout_under_load(&["--control-plane", "kubernetes"]);
}

fn rollout_under_load(extra: &[&str]) {
    let from = std::env::var_os("VEIL_UPGRADE_FROM")
        .map(std::path::PathBuf::from)
        .expect("VEIL_UPGRADE_FROM (the previous release's binaries) unset: run scripts/upgrade-test.sh");
    let versions = Versions::install(&from);
    let lab = up_with_auth_policy(extra);
    for node in ["node-a", "node-b"] {
        let st = lab.status(node);
        assert_eq!(versions.of(st.agent.pid), Version::Old, "{node} before");
    }
    let n = 1800;
    let run = Run::start(&lab, n);
    let tok = run.tok.clone();
    let mut lines = Vec::new();
    for (node, to) in [
        ("node-a", Version::New),
        ("node-b", Version::New),
        ("node-a", Version::Old),
        ("node-b", Version::Old),
    ] {
        lines.push(rollout_step(&lab, &versions, node, to, &tok));
        println!("{}", lines.last().expect("a line"));
    }
    assert!(
        run.traffic.tcp.line_count() < n as usize,
        "the stream ended before the last step: it did not span the rollout"
    );
    let m = run.finish(&lab);
    println!("rollout: {}", m.summary());
    // Four veil-wg restarts, each at most 1 s of probes (see the veil-wg kill test).
    m.assert_delivered("rollout N <-> N+1", 40);
}
