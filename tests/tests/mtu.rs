//! Scenario 36 (tests/README.md): MTU and fragmentation. Labs whose underlay MTU is below the
//! default (1280, the IPv6 minimum, and 1420) and above it (9000), so pods get the underlay's MTU
//! minus WireGuard's 60 bytes (80 over an IPv6 underlay); and a pod whose eth0 was raised to 1500 inside its netns, so it sends packets, DF
//! set, larger than the tunnel carries.
//!
//! Pass criteria. NL: a bulk TCP transfer each way arrives byte for byte within a timeout (no
//! black-holed TCP). NI: a capture of the underlay bridge for the whole test holds no frame to or
//! from a pod address, no payload marker, no IP fragment and no frame over the underlay MTU; an
//! oversized DF datagram is never sent in clear or fragmented, and is answered with ICMP
//! frag-needed carrying the tunnel MTU (the last test).

use std::{
    process::Stdio,
    time::{Duration, Instant},
};

use veil_tests::{contains, ip_frames, ip_netns, link_mtu, rand_suffix, Capture, Lab, TempFile};

/// Bytes of each bulk transfer.
const BULK_BYTES: usize = 16 << 20;
/// A transfer of BULK_BYTES takes well under a second here; a black-holed one never ends.
const BULK_TIMEOUT: Duration = Duration::from_secs(60);
/// WireGuard's overhead over an IPv4 underlay: 20 IP + 8 UDP + 32 WireGuard data header and tag.
const WG_OVERHEAD_V4: u32 = 60;
/// IPv6's minimum link MTU.
const IPV6_MIN_MTU: u32 = 1280;

/// A lab on an underlay of `underlay_mtu`, with `extra` lines in its lab file. An underlay too
/// small to give pods IPv6's 1280 makes an IPv4-only lab, whatever family `VEIL_TEST_IP_FAMILY`
/// asks for (`lab up` would refuse it).
fn mtu_lab_with(underlay_mtu: u32, extra: &str) -> Lab {
    let family = if underlay_mtu - WG_OVERHEAD_V4 < IPV6_MIN_MTU {
        "ip_family: ipv4\n"
    } else {
        ""
    };
    Lab::up_with_file(
        &format!("underlay_mtu: {underlay_mtu}\n{family}{extra}"),
        &[],
    )
}

fn mtu_lab(underlay_mtu: u32) -> Lab {
    mtu_lab_with(underlay_mtu, "")
}

/// Raises a pod's eth0 and its host-side veth to `mtu`: the pod then sends packets the tunnel
/// cannot carry (the host veth must follow, or the veth itself drops them before veil sees them).
fn raise_pod_mtu(lab: &Lab, pod: &str, mtu: u32) {
    let p = lab.pod(pod);
    let node = lab.node(&p.node);
    let mtu = mtu.to_string();
    ip_netns(&p.netns, &["ip", "link", "set", "eth0", "mtu", &mtu]);
    ip_netns(
        &node.netns,
        &["ip", "link", "set", &p.host_veth, "mtu", &mtu],
    );
}

/// A capture of the lab's underlay bridge that must be complete.
fn underlay_capture(lab: &Lab) -> Capture {
    Capture::start_lossless(&lab.view.underlay.netns, &lab.view.underlay.bridge)
}

/// What an underlay capture holds that NI forbids, and the WireGuard traffic it carries.
#[derive(Debug, Default)]
struct Findings {
    /// Frames to or from a pod address.
    plaintext: usize,
    /// Whether the payload marker appears anywhere in the capture.
    has_marker: bool,
    /// IP fragments (any: WireGuard datagrams must not be fragmented either).
    fragments: usize,
    /// Frames (or GSO segments) over the underlay MTU.
    oversized: usize,
    /// WireGuard datagrams (GSO batches counted per message).
    wg_datagrams: usize,
    /// The largest WireGuard datagram as it would be on a wire.
    wg_largest: u32,
    /// Up to 5 offending frames, for the failure message.
    examples: Vec<String>,
}

fn classify(raw: &[u8], lab: &Lab, marker: &str, underlay_mtu: u32) -> Findings {
    let pods: Vec<&str> = lab.view.pods.iter().map(|p| p.ip.as_str()).collect();
    let mut out = Findings {
        has_marker: contains(raw, marker.as_bytes()),
        ..Findings::default()
    };
    for f in ip_frames(raw) {
        let is_plaintext = pods.contains(&f.src.as_str()) || pods.contains(&f.dst.as_str());
        let is_oversized = f.wire_len() > underlay_mtu;
        out.plaintext += usize::from(is_plaintext);
        out.fragments += usize::from(f.is_fragment);
        out.oversized += usize::from(is_oversized);
        if (is_plaintext || f.is_fragment || is_oversized) && out.examples.len() < 5 {
            out.examples.push(format!("{f:?}"));
        }
        if f.udp_ports.is_some_and(|(s, d)| s == 51820 || d == 51820) {
            out.wg_datagrams += f.wg_datagrams();
            out.wg_largest = out.wg_largest.max(f.wire_len());
        }
    }
    out
}

/// The NI check of an underlay capture: no frame to or from a pod, no marker, no fragment, no
/// frame over the underlay MTU.
fn assert_underlay_clean(raw: &[u8], lab: &Lab, marker: &str, underlay_mtu: u32) -> Findings {
    let f = classify(raw, lab, marker, underlay_mtu);
    assert!(
        f.plaintext == 0 && !f.has_marker && f.fragments == 0 && f.oversized == 0,
        "the underlay (MTU {underlay_mtu}) carried what it must not: {f:#?}"
    );
    f
}

/// BULK_BYTES of numbered lines each carrying a marker, in a file the pods' ncat sends.
struct Bulk {
    marker: String,
    data: Vec<u8>,
    file: TempFile,
}

/// The two bulk transfers NL asks for: (from, to, port).
const BOTH_WAYS: [(&str, &str, u16); 2] =
    [("frontend", "backend", 9300), ("backend", "frontend", 9301)];

impl Bulk {
    fn new() -> Bulk {
        let marker = format!("veil-mtu-marker-{:08x}", rand_suffix());
        let mut data = Vec::with_capacity(BULK_BYTES + 64);
        let mut i = 0u64;
        while data.len() < BULK_BYTES {
            data.extend_from_slice(format!("{marker} {i:012}\n").as_bytes());
            i += 1;
        }
        data.truncate(BULK_BYTES);
        let file = TempFile::new(&format!("veil-mtu-send-{}", rand_suffix()), &data);
        Bulk { marker, data, file }
    }

    /// [`BOTH_WAYS`], one after the other; returns how long each took.
    fn both_ways(&self, lab: &Lab) -> (Duration, Duration) {
        let [(f1, t1, p1), (f2, t2, p2)] = BOTH_WAYS;
        (
            self.transfer(lab, f1, t1, p1),
            self.transfer(lab, f2, t2, p2),
        )
    }

    /// Sends the data from pod `from` to pod `to`'s IPv4 address over TCP with ncat; asserts it
    /// arrives whole within BULK_TIMEOUT; returns how long it took.
    fn transfer(&self, lab: &Lab, from: &str, to: &str, port: u16) -> Duration {
        self.transfer_to(lab, from, to, &lab.pod_ip(to), port)
    }

    /// [`Bulk::transfer`] to the address `to_ip` of pod `to` (either family).
    fn transfer_to(&self, lab: &Lab, from: &str, to: &str, to_ip: &str, port: u16) -> Duration {
        let (send, data) = (&self.file.path, self.data.as_slice());
        let recv = TempFile::new(&format!("veil-mtu-recv-{}", rand_suffix()), "");
        let mut server = lab
            .command_in(
                to,
                &[
                    "sh",
                    "-c",
                    &format!("exec ncat -l {port} > {}", recv.path.display()),
                ],
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let sport = format!("sport = :{port}");
        lab.wait_for(
            &format!("{to} listening on {port}"),
            Duration::from_secs(5),
            || {
                let ss = lab.exec_ok(to, &["ss", "-Hltn", &sport]);
                (!ss.trim().is_empty()).then_some(())
            },
        );
        let timeout = BULK_TIMEOUT.as_secs().to_string();
        let start = Instant::now();
        let client = lab.exec(
            from,
            &[
                "timeout",
                &timeout,
                "sh",
                "-c",
                &format!("ncat --send-only {to_ip} {port} < {}", send.display()),
            ],
        );
        // The server ends when the client's FIN arrives after the last byte.
        let done = loop {
            if let Some(st) = server.try_wait().unwrap() {
                break Some(st);
            }
            if start.elapsed() > BULK_TIMEOUT + Duration::from_secs(5) {
                break None;
            }
            // Poll interval of the wait for the receiver to finish.
            std::thread::sleep(Duration::from_millis(20));
        };
        let took = start.elapsed();
        if done.is_none() {
            let _ = server.kill();
            let _ = server.wait();
        }
        let got = std::fs::read(&recv.path).unwrap_or_default();
        assert!(
        client.status.success() && done.is_some(),
        "{from} -> {to}: transfer did not finish in {BULK_TIMEOUT:?} (client {}, {} of {} bytes \
         arrived): black-holed TCP",
        client.status,
        got.len(),
        data.len()
    );
        assert_eq!(got.len(), data.len(), "{from} -> {to}: byte count");
        assert!(got == data, "{from} -> {to}: bytes differ");
        took
    }
}

fn mbit_s(bytes: usize, took: Duration) -> f64 {
    bytes as f64 * 8.0 / took.as_secs_f64() / 1e6
}

/// A lab on an underlay of `underlay_mtu`: the MTUs follow, bulk TCP crosses both ways, and the
/// underlay sees only whole WireGuard datagrams no larger than its MTU.
fn on_underlay_mtu(underlay_mtu: u32, extra: &str) {
    let lab = mtu_lab_with(underlay_mtu, extra);
    let tunnel_mtu = underlay_mtu - lab.wg_overhead();
    assert_eq!(lab.view.pod_mtu, tunnel_mtu);
    for n in &lab.view.nodes {
        assert_eq!(link_mtu(&n.netns, "ul0"), underlay_mtu, "{} ul0", n.name);
        assert_eq!(
            link_mtu(&n.netns, &n.wg_interface),
            tunnel_mtu,
            "{} tunnel",
            n.name
        );
    }
    for p in &lab.view.pods {
        assert_eq!(link_mtu(&p.netns, "eth0"), tunnel_mtu, "{} eth0", p.name);
    }

    let bulk = Bulk::new();
    let cap = underlay_capture(&lab);
    let (there, back) = bulk.both_ways(&lab);
    let raw = cap.stop();
    let Findings {
        wg_datagrams: wg,
        wg_largest: largest,
        ..
    } = assert_underlay_clean(&raw, &lab, &bulk.marker, underlay_mtu);
    // Both transfers crossed the tunnel: at least one WireGuard datagram per tunnel-MTU of data.
    assert!(
        wg as u32 >= 2 * BULK_BYTES as u32 / tunnel_mtu,
        "only {wg} WireGuard datagrams for 2 x {BULK_BYTES} bytes"
    );
    assert_eq!(
        largest, underlay_mtu,
        "full-size TCP segments should fill an underlay frame"
    );
    println!(
        "underlay {underlay_mtu}, tunnel {tunnel_mtu}: {BULK_BYTES} bytes frontend->backend in \
         {there:?} ({:.0} Mbit/s), backend->frontend in {back:?} ({:.0} Mbit/s); {wg} WireGuard \
         datagrams, largest {largest}; 0 plaintext, 0 fragments",
        mbit_s(BULK_BYTES, there),
        mbit_s(BULK_BYTES, back)
    );
}

#[test]
fn underlay_mtu_1280_carries_bulk_tcp_both_ways_without_plaintext_or_fragments() {
    on_underlay_mtu(1280, "");
}

#[test]
fn underlay_mtu_1420_carries_bulk_tcp_both_ways_without_plaintext_or_fragments() {
    on_underlay_mtu(1420, "");
}

/// Jumbo frames: the lab file's largest underlay MTU (9000, tunnel and pods 8940).
#[test]
fn underlay_mtu_9000_carries_bulk_tcp_both_ways_without_plaintext_or_fragments() {
    on_underlay_mtu(9000, "");
}

/// An IPv6-only lab over an IPv6 underlay of 1500: the tunnel and the pods get 1420 (WireGuard's
/// 80 bytes over IPv6) and the same checks hold for IPv6 frames.
#[test]
fn ipv6_underlay_mtu_1500_carries_bulk_tcp_both_ways_without_plaintext_or_fragments() {
    on_underlay_mtu(1500, "ip_family: ipv6\n");
}

/// Sends UDP datagrams of `total_len` bytes (IP) with `marker` from `pod` to `dst`:9302, DF set
/// (or, with `is_df` false, fragmented by the pod as needed), for up to 3 s or until the path MTU
/// the pod's kernel holds drops below `total_len` (ICMP frag-needed arrived, or the pod's own MTU
/// is lower). Returns (datagrams sent, path MTU at the end, send error if any).
fn send_udp(
    lab: &Lab,
    pod: &str,
    dst: &str,
    total_len: u32,
    marker: &str,
    is_df: bool,
) -> (u32, u32, String) {
    const SCRIPT: &str = r#"
import socket, sys, time
dst, total, marker, df = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode(), sys.argv[4]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
# IP_MTU_DISCOVER: IP_PMTUDISC_DO (DF, never fragment) or IP_PMTUDISC_DONT (fragment)
s.setsockopt(socket.IPPROTO_IP, 10, 2 if df == "df" else 0)
s.connect((dst, 9302))
payload = (marker * (total // len(marker) + 1))[: total - 28]
sent, err, deadline = 0, "-", time.time() + 3
while time.time() < deadline:
    try:
        s.send(payload)
        sent += 1
    except OSError as e:
        err = e.strerror.replace(" ", "_")
        break
    if s.getsockopt(socket.IPPROTO_IP, 14) < total:  # IP_MTU: frag-needed lowered it
        break
    time.sleep(0.05)  # poll interval for the ICMP answer
print(sent, s.getsockopt(socket.IPPROTO_IP, 14), err)
"#;
    let out = lab.exec_ok(
        pod,
        &[
            "python3",
            "-c",
            SCRIPT,
            dst,
            &total_len.to_string(),
            marker,
            if is_df { "df" } else { "fragment" },
        ],
    );
    let f: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(f.len(), 3, "{out}");
    (
        f[0].parse().unwrap(),
        f[1].parse().unwrap(),
        f[2].to_string(),
    )
}

/// Packets the kernel handed to a node's tunnel device (its TX counter).
fn tunnel_tx_packets(lab: &Lab, node: &str) -> u64 {
    let n = lab.node(node);
    let out = ip_netns(
        &n.netns,
        &[
            "cat",
            &format!("/sys/class/net/{}/statistics/tx_packets", n.wg_interface),
        ],
    );
    out.trim().parse().unwrap()
}

/// The raised-MTU labs: a 1280-byte underlay (so a 1220-byte tunnel) with frontend's MTU at 1500.
/// Returns the lab and the underlay and tunnel MTUs.
fn raised_frontend_lab() -> (Lab, u32, u32) {
    let underlay_mtu = 1280;
    let lab = mtu_lab(underlay_mtu);
    raise_pod_mtu(&lab, "frontend", 1500);
    let tunnel_mtu = underlay_mtu - lab.wg_overhead();
    (lab, underlay_mtu, tunnel_mtu)
}

#[test]
fn pod_with_a_raised_mtu_leaks_nothing_and_its_tcp_still_flows() {
    let (lab, underlay_mtu, tunnel_mtu) = raised_frontend_lab();
    let fe = lab.pod("frontend");
    assert_eq!(link_mtu(&fe.netns, "eth0"), 1500);
    let be = lab.pod_ip("backend");
    let bulk = Bulk::new();
    let marker = &bulk.marker;

    let cap = underlay_capture(&lab);
    // DF datagrams one byte over the tunnel MTU and well over it, straight from the raised pod.
    let tx_before = tunnel_tx_packets(&lab, "node-a");
    let mut report = Vec::new();
    for total in [tunnel_mtu + 1, 1400, 1500] {
        let (sent, pmtu, err) = send_udp(&lab, "frontend", &be, total, marker, true);
        report.push(format!(
            "{total}: sent {sent}, path mtu {pmtu}, error {err}"
        ));
    }
    let tx_oversized = tunnel_tx_packets(&lab, "node-a") - tx_before;
    // TCP both ways: the raised pod's MSS (1460) is bounded by the other end's (tunnel MTU - 40).
    let (there, back) = bulk.both_ways(&lab);
    let raw = cap.stop();
    let Findings {
        wg_datagrams: wg,
        wg_largest: largest,
        ..
    } = assert_underlay_clean(&raw, &lab, marker, underlay_mtu);
    assert!(largest <= underlay_mtu);
    println!(
        "underlay {underlay_mtu}, tunnel {tunnel_mtu}, frontend eth0 1500: DF UDP {report:?}; \
         {tx_oversized} oversized packets handed to node-a's tunnel device; TCP {BULK_BYTES} bytes \
         there {there:?} ({:.0} Mbit/s), back {back:?} ({:.0} Mbit/s); {wg} WireGuard datagrams, \
         largest {largest}; 0 plaintext, 0 fragments",
        mbit_s(BULK_BYTES, there),
        mbit_s(BULK_BYTES, back)
    );
}

/// The sanity half of the leak pair: the same lab with encryption off must show what the NI
/// check looks for (pod addresses, the marker and, from a datagram the pod fragments itself, IP
/// fragments), or a clean capture proves nothing.
#[test]
fn underlay_mtu_1280_with_encryption_off_shows_plaintext_and_fragments() {
    let underlay_mtu = 1280;
    let lab = mtu_lab_with(underlay_mtu, "encryption: off\n");
    let be = lab.pod_ip("backend");
    let bulk = Bulk::new();
    let cap = underlay_capture(&lab);
    bulk.transfer(&lab, "frontend", "backend", 9300);
    let (sent, _, err) = send_udp(&lab, "frontend", &be, 1400, &bulk.marker, false);
    assert!(sent >= 1, "no datagram sent: {err}");
    let raw = cap.stop();
    let f = classify(&raw, &lab, &bulk.marker, underlay_mtu);
    println!("encryption off: {f:?}");
    assert!(f.plaintext > 0, "the classifier saw no pod address: {f:?}");
    assert!(f.has_marker, "the marker search saw nothing: {f:?}");
    assert!(f.fragments >= 2, "the classifier saw no fragments: {f:?}");
}

/// NL for oversized packets: a DF packet a pod sends over the tunnel MTU must be answered with
/// ICMP frag-needed (or dropped and counted), and TCP between two pods whose MTU is above the
/// tunnel's must not stall. veil_from_pod checks the tunnel MTU itself (its bpf_redirect skips
/// the device's check) and answers ICMP frag-needed (`mtu-exceeded`). Before that fix this test
/// failed: no frag-needed for 1221- or 1400-byte DF datagrams (path MTU stayed 1500), 0 of 16 MiB
/// of TCP in 60 s each way, the packets lost inside veil-wg (`send-failed`, or uncounted).
#[test]
fn oversized_df_packets_get_frag_needed_and_tcp_is_not_black_holed() {
    let (lab, _, tunnel_mtu) = raised_frontend_lab();
    raise_pod_mtu(&lab, "backend", 1500);
    let be = lab.pod_ip("backend");
    let bulk = Bulk::new();
    let mut failures = Vec::new();
    for total in [tunnel_mtu + 1, 1400] {
        let (sent, pmtu, err) = send_udp(&lab, "frontend", &be, total, &bulk.marker, true);
        if pmtu > tunnel_mtu {
            failures.push(format!(
                "a DF datagram of {total} bytes over a tunnel of {tunnel_mtu}: no frag-needed came \
                 back ({sent} sent in 3 s, path mtu still {pmtu}, error {err})"
            ));
        }
    }
    for (from, to, port) in BOTH_WAYS {
        let run = std::panic::AssertUnwindSafe(|| bulk.transfer(&lab, from, to, port));
        if let Err(e) = std::panic::catch_unwind(run) {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .unwrap_or_else(|| "panicked".into());
            failures.push(format!("TCP {from} -> {to}: {msg}"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Dual stack: a pod whose MTU is raised past the tunnel's sends IPv6 packets the tunnel cannot
/// carry. IPv6 routers never fragment, so each must come back as ICMPv6 Packet Too Big carrying
/// the tunnel MTU (RFC 8201), or TCP over IPv6 from that pod is black-holed.
#[test]
fn ipv6_oversized_packets_get_packet_too_big_and_tcp_is_not_black_holed() {
    let underlay_mtu = 1400;
    let lab = mtu_lab(underlay_mtu);
    assert_ne!(lab.view.ip_family, "ipv4");
    let tunnel_mtu = underlay_mtu - lab.wg_overhead();
    raise_pod_mtu(&lab, "frontend", 1500);
    let be6 = lab.pod_ip6("backend");
    const SCRIPT: &str = r#"
import socket, sys, time
dst, total = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, 23, 2)  # IPV6_MTU_DISCOVER: IPV6_PMTUDISC_DO
s.connect((dst, 9302))
sent, err, deadline = 0, "-", time.time() + 3
while time.time() < deadline:
    try:
        s.send(b"x" * (total - 48))
        sent += 1
    except OSError as e:
        err = e.strerror.replace(" ", "_")
        break
    if s.getsockopt(socket.IPPROTO_IPV6, 24) < total:  # IPV6_MTU: Packet Too Big lowered it
        break
    time.sleep(0.05)  # poll interval for the ICMPv6 answer
print(sent, s.getsockopt(socket.IPPROTO_IPV6, 24), err)
"#;
    let out = lab.exec_ok("frontend", &["python3", "-c", SCRIPT, &be6, "1400"]);
    let f: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(f.len(), 3, "{out}");
    assert_eq!(
        f[1].parse::<u32>().unwrap(),
        tunnel_mtu,
        "a 1400-byte IPv6 datagram over a tunnel of {tunnel_mtu}: the path MTU did not drop to \
         the tunnel's (sent, path mtu, error: {out})"
    );
    // TCP over IPv6 from the raised pod (segments up to its 1500-byte MTU) arrives whole.
    Bulk::new().transfer_to(&lab, "frontend", "backend", &be6, 9100);
    lab.expect_drops(&["mtu-exceeded"]);
}
