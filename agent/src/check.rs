//! check: the leak self-test (`veil check`). While capturing the lab's underlay, it sends marker
//! traffic (TCP and UDP) between pods on different nodes and reads the capture back: the check
//! passes only if the marker never appears and nothing but WireGuard (and the agents' TLS
//! control channel) crosses between nodes. Users run it after every upgrade, like
//! `cilium connectivity test`.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::{
    lab::{spec, LabPaths},
    sys,
};

/// The WireGuard port on the underlay.
pub const WG_PORT: u16 = veil_transport::DEFAULT_LISTEN_PORT;
/// The agents' mTLS control channel.
pub const CONTROL_PORT: u16 = crate::auth::DEFAULT_PORT;
const MARKER_PORT: u16 = 17917;

/// Errors running the check (not a failed verdict: that is a report with `pass: false`).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the lab has no two pods on different nodes to send marker traffic between")]
    NoPair,
    #[error("capture: {0}")]
    Capture(String),
    #[error(transparent)]
    Sys(#[from] sys::Error),
}

/// What the capture saw.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct CaptureStats {
    pub packets: u64,
    /// UDP to or from the WireGuard port.
    pub wireguard: u64,
    /// TCP to or from the control port (TLS 1.3 between agents).
    pub control: u64,
    /// TCP between a node and the lab's spire-server (SPIRE's own mTLS gRPC: agent attestation
    /// and SVID signing). Never pod traffic.
    pub identity: u64,
    /// TCP between a node and the lab's kube-apiserver (`--control-plane kubernetes`: the
    /// agents' watches and status writes, TLS). Never pod traffic.
    #[serde(default)]
    pub kube_api: u64,
    pub arp: u64,
    /// Link-local control the kernel sends on its own: IGMP to 224.0.0.0/24, IPv6 neighbour
    /// discovery and MLD between link-local addresses. Never pod traffic.
    pub link_local: u64,
    /// Anything else: pod traffic in clear, or something veil does not expect on the wire.
    pub plaintext: u64,
    /// Frames containing the marker bytes.
    pub marker_hits: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub lab: String,
    pub bridge: String,
    pub marker: String,
    pub pairs: Vec<String>,
    pub tcp_round_trips: u32,
    pub udp_datagrams_sent: u32,
    pub udp_datagrams_received: u32,
    pub capture: CaptureStats,
    pub pass: bool,
}

/// Classifies every frame of a pcap file and counts the marker.
pub fn analyse_pcap(data: &[u8], marker: &[u8]) -> Result<CaptureStats, String> {
    if data.len() < 24 {
        return Err("capture file is shorter than a pcap header".into());
    }
    let magic = u32::from_le_bytes(data[0..4].try_into().expect("4 bytes"));
    let le = match magic {
        0xa1b2_c3d4 | 0xa1b2_3c4d => true,
        0xd4c3_b2a1 | 0x4d3c_b2a1 => false,
        _ => return Err(format!("not a pcap file (magic {magic:#x})")),
    };
    let rd = |b: &[u8]| {
        let a: [u8; 4] = b.try_into().expect("4 bytes");
        if le {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        }
    };
    let linktype = rd(&data[20..24]);
    if linktype != 1 {
        return Err(format!(
            "expected an Ethernet capture, got link type {linktype}"
        ));
    }
    let mut st = CaptureStats::default();
    let mut off = 24;
    while off + 16 <= data.len() {
        let incl = rd(&data[off + 8..off + 12]) as usize;
        let start = off + 16;
        let end = (start + incl).min(data.len());
        let frame = &data[start..end];
        off = start + incl;
        st.packets += 1;
        if !marker.is_empty() && frame.windows(marker.len()).any(|w| w == marker) {
            st.marker_hits += 1;
        }
        match classify(frame) {
            Class::Wireguard => st.wireguard += 1,
            Class::Control => st.control += 1,
            Class::Identity => st.identity += 1,
            Class::KubeApi => st.kube_api += 1,
            Class::Arp => st.arp += 1,
            Class::LinkLocal => st.link_local += 1,
            Class::Other => st.plaintext += 1,
        }
    }
    Ok(st)
}

enum Class {
    Wireguard,
    Control,
    Identity,
    KubeApi,
    Arp,
    LinkLocal,
    Other,
}

fn classify(frame: &[u8]) -> Class {
    if frame.len() < 14 {
        return Class::Other;
    }
    match u16::from_be_bytes([frame[12], frame[13]]) {
        0x0806 => Class::Arp,
        0x0800 if frame.len() >= 34 && frame[23] == 2 && frame[30..33] == [224, 0, 0] => {
            Class::LinkLocal
        }
        0x86dd if frame.len() >= 54 => {
            let next = frame[20];
            let src_link = frame[22] == 0xfe && frame[23] & 0xc0 == 0x80;
            let src_unspecified = frame[22..38].iter().all(|b| *b == 0);
            let dst_link_mcast = frame[38] == 0xff && frame[39] & 0x0f == 0x02;
            let dst_link = frame[38] == 0xfe && frame[39] & 0xc0 == 0x80;
            let l4 = &frame[54..];
            // Neighbour discovery (router and neighbour solicitations and advertisements,
            // redirects: ICMPv6 133-137, hop limit 255 so never routed) between the nodes'
            // IPv6 underlay addresses, which it resolves from those global addresses.
            let neighbour_discovery = next == 58
                && frame[21] == 255
                && l4.first().is_some_and(|t| (133..=137).contains(t));
            // ICMPv6 (ND) or hop-by-hop (MLD) kept to the link.
            if neighbour_discovery
                || ((next == 58 || next == 0)
                    && (src_link || src_unspecified)
                    && (dst_link_mcast || dst_link))
            {
                Class::LinkLocal
            } else {
                // An IPv6 underlay (no extension headers: anything else is plaintext).
                let spire = crate::lab::spire_real::SERVER_ADDR6.octets();
                let api = crate::lab::kube::API_IP6.octets();
                by_ports(next, &frame[22..38], &frame[38..54], l4, &[&spire, &api])
            }
        }
        0x0800 if frame.len() >= 34 => {
            let ihl = usize::from(frame[14] & 0x0f) * 4;
            let spire = crate::lab::spire_real::SERVER_ADDR.octets();
            let api = crate::lab::kube::API_IP.octets();
            let l4 = frame.get(14 + ihl..).unwrap_or_default();
            by_ports(
                frame[23],
                &frame[26..30],
                &frame[30..34],
                l4,
                &[&spire, &api],
            )
        }
        _ => Class::Other,
    }
}

/// A packet between the nodes by its protocol, addresses and ports (`l4` from the transport
/// header on): WireGuard, the control channel, or TLS to the lab's spire-server and
/// kube-apiserver at the addresses `servers` names, in that order; anything else, or a header
/// too short for its ports, is plaintext.
fn by_ports(proto: u8, src: &[u8], dst: &[u8], l4: &[u8], servers: &[&[u8]]) -> Class {
    if l4.len() < 4 {
        return Class::Other;
    }
    let sport = u16::from_be_bytes([l4[0], l4[1]]);
    let dport = u16::from_be_bytes([l4[2], l4[3]]);
    let ports = [
        (crate::lab::spire_real::SERVER_PORT, Class::Identity),
        (crate::lab::kube::API_PORT, Class::KubeApi),
    ];
    match proto {
        17 if sport == WG_PORT || dport == WG_PORT => Class::Wireguard,
        6 if sport == CONTROL_PORT || dport == CONTROL_PORT => Class::Control,
        6 => servers
            .iter()
            .zip(ports)
            .find(|(addr, (port, _))| {
                (src == **addr && sport == *port) || (dst == **addr && dport == *port)
            })
            .map_or(Class::Other, |(_, (_, class))| class),
        _ => Class::Other,
    }
}

/// Pairs of pods on different nodes: for each ordered pair of nodes, their first pods.
fn pairs(spec: &spec::LabSpec) -> Vec<(&spec::PodSpec, &spec::PodSpec)> {
    let mut out = Vec::new();
    for a in &spec.nodes {
        for b in &spec.nodes {
            if a.name == b.name {
                continue;
            }
            let pa = spec.pods.iter().find(|p| p.node == a.name);
            let pb = spec.pods.iter().find(|p| p.node == b.name);
            if let (Some(pa), Some(pb)) = (pa, pb) {
                out.push((pa, pb));
            }
        }
    }
    out
}

struct Capture {
    child: Child,
    file: std::path::PathBuf,
}

fn start_capture(netns: &str, bridge: &str, file: &Path) -> Result<Capture, Error> {
    let mut child = Command::new("ip")
        .args([
            "netns",
            "exec",
            netns,
            "tcpdump",
            "--immediate-mode",
            "-i",
            bridge,
            "-U",
            "-s",
            "0",
            "-w",
        ])
        .arg(file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            Error::Capture(format!(
                "cannot run tcpdump (scripts/setup.sh installs it): {e}"
            ))
        })?;
    // tcpdump says "listening on ..." once the capture is armed.
    let mut stderr = child.stderr.take().expect("piped stderr");
    let start = Instant::now();
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&seen).contains("listening on") {
        if start.elapsed() > Duration::from_secs(5) {
            let _ = child.kill();
            return Err(Error::Capture(format!(
                "tcpdump did not start: {}",
                String::from_utf8_lossy(&seen)
            )));
        }
        match stderr.read(&mut buf) {
            Ok(0) => {
                return Err(Error::Capture(format!(
                    "tcpdump exited: {}",
                    String::from_utf8_lossy(&seen)
                )));
            }
            Ok(n) => seen.extend_from_slice(&buf[..n]),
            Err(e) => return Err(Error::Capture(e.to_string())),
        }
    }
    // Keep draining tcpdump's stderr: a closed pipe would kill it with SIGPIPE on its next
    // message.
    std::thread::spawn(move || {
        let mut sink = [0u8; 256];
        while matches!(stderr.read(&mut sink), Ok(n) if n > 0) {}
    });
    Ok(Capture {
        child,
        file: file.to_path_buf(),
    })
}

fn stop_capture(mut c: Capture) -> Result<Vec<u8>, Error> {
    // Let the last frames reach the file before stopping.
    std::thread::sleep(Duration::from_millis(300));
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(c.child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    );
    let _ = c.child.wait();
    let data = std::fs::read(&c.file)
        .map_err(|e| Error::Capture(format!("cannot read {}: {e}", c.file.display())))?;
    let _ = std::fs::remove_file(&c.file);
    Ok(data)
}

/// Runs the leak check on a running lab.
pub fn run(spec: &spec::LabSpec, paths: &LabPaths) -> Result<Report, Error> {
    let pairs = pairs(spec);
    if pairs.is_empty() {
        return Err(Error::NoPair);
    }
    let marker = format!("VEIL-LEAK-MARKER-{:016x}", rand::random::<u64>());
    let ul = spec::underlay_netns(&spec.name);
    let bridge = spec::bridge_name(&spec.name);
    let file = paths
        .root
        .join(format!("check-{}.pcap", std::process::id()));
    let capture = start_capture(&ul, &bridge, &file)?;
    let mut tcp_round_trips = 0;
    let mut udp_sent = 0;
    let mut udp_received = 0;
    let mut names = Vec::new();
    for (src, dst) in &pairs {
        names.push(format!(
            "{} -> {}",
            src.qualified_name(),
            dst.qualified_name()
        ));
        let (t, s, r) = send_markers(&src.netns, &dst.netns, dst.ip, marker.as_bytes())?;
        tcp_round_trips += t;
        udp_sent += s;
        udp_received += r;
        // A dual-stack pair is checked over IPv6 as well.
        if let Some(ip6) = dst.ipv6 {
            names.push(format!(
                "{} -> {} (IPv6)",
                src.qualified_name(),
                dst.qualified_name()
            ));
            let (t, s, r) = send_markers(&src.netns, &dst.netns, ip6.into(), marker.as_bytes())?;
            tcp_round_trips += t;
            udp_sent += s;
            udp_received += r;
        }
    }
    // With node encryption, the nodes' own traffic must not cross in clear either: the same
    // markers between the first two nodes' addresses (host network), each of a dual-stack
    // underlay's two.
    if let (true, [a, b, ..]) = (spec.node_encryption, spec.nodes.as_slice()) {
        for ip in b.underlay_ips() {
            names.push(if ip == b.underlay_ip {
                format!("node {} -> node {}", a.name, b.name)
            } else {
                format!("node {} -> node {} (IPv6)", a.name, b.name)
            });
            let (t, s, r) = send_markers(&a.netns, &b.netns, ip, marker.as_bytes())?;
            tcp_round_trips += t;
            udp_sent += s;
            udp_received += r;
        }
    }
    let data = stop_capture(capture)?;
    let capture = analyse_pcap(&data, marker.as_bytes()).map_err(Error::Capture)?;
    let pass = capture.marker_hits == 0
        && capture.plaintext == 0
        && (capture.wireguard > 0 || tcp_round_trips == 0);
    Ok(Report {
        lab: spec.name.clone(),
        bridge,
        marker,
        pairs: names,
        tcp_round_trips,
        udp_datagrams_sent: udp_sent,
        udp_datagrams_received: udp_received,
        capture,
        pass,
    })
}

/// Marker traffic from `src` to `dst` over TCP (echoed back) and UDP, with listeners the check
/// opens in the destination's netns (a pod's, or a node's) for the duration. Returns (TCP round trips, UDP
/// datagrams sent, UDP datagrams received).
fn send_markers(
    src_ns: &str,
    dst_ns: &str,
    dst_ip: IpAddr,
    marker: &[u8],
) -> Result<(u32, u32, u32), Error> {
    let rounds = 10u32;
    let m = marker.to_vec();
    // The unspecified address of the destination's family, for both ends' sockets.
    let any = match dst_ip {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    // Listeners in the destination pod.
    let (tcp, udp) = sys::in_netns(dst_ns, move || {
        let tcp = TcpListener::bind((any, MARKER_PORT));
        let udp = UdpSocket::bind((any, MARKER_PORT));
        (tcp, udp)
    })?;
    let tcp = tcp.map_err(|e| Error::Capture(format!("cannot listen in {dst_ns}: {e}")))?;
    let udp = udp.map_err(|e| Error::Capture(format!("cannot listen in {dst_ns}: {e}")))?;
    let _ = udp.set_read_timeout(Some(Duration::from_millis(200)));
    let server = std::thread::spawn(move || {
        // A connection policy drops never arrives: accept until a deadline, not forever (the
        // check then reports 0 round trips instead of hanging).
        let _ = tcp.set_nonblocking(true);
        let deadline = Instant::now() + Duration::from_secs(5);
        let conn = loop {
            match tcp.accept() {
                Ok((s, _)) => break Some(s),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        break None;
                    }
                    // Poll interval of a bounded accept, not a wait for an event.
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(_) => break None,
            }
        };
        if let Some(mut s) = conn {
            let _ = s.set_nonblocking(false);
            let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
            let mut buf = [0u8; 4096];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 || s.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    });
    let udp_server = std::thread::spawn(move || {
        let mut got = 0u32;
        let mut buf = [0u8; 2048];
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if udp.recv_from(&mut buf).is_ok() {
                got += 1;
                if got >= 10 {
                    break;
                }
            }
        }
        got
    });
    let addr = SocketAddr::from((dst_ip, MARKER_PORT));
    let client = sys::in_netns(src_ns, move || {
        let mut trips = 0u32;
        let mut sent = 0u32;
        if let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(3)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
            let mut buf = vec![0u8; m.len()];
            for _ in 0..rounds {
                if s.write_all(&m).is_err() || s.read_exact(&mut buf).is_err() || buf != m {
                    break;
                }
                trips += 1;
            }
        }
        if let Ok(u) = UdpSocket::bind((any, 0)) {
            for _ in 0..rounds {
                if u.send_to(&m, addr).is_ok() {
                    sent += 1;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        (trips, sent)
    })?;
    let _ = server.join();
    let received = udp_server.join().unwrap_or(0);
    Ok((client.0, client.1, received))
}

pub fn format_report(r: &Report) -> String {
    let c = &r.capture;
    let mut s = format!(
        "leak check on lab {} (capture on {}):\n  marker traffic: {} ({} TCP round trips, {}/{} UDP datagrams delivered)\n  underlay: {} packets: {} WireGuard, {} control (TLS), {} identity (TLS to spire-server), {} ARP, {} link-local control, {} plaintext; marker seen in {} packets\n",
        r.lab,
        r.bridge,
        r.pairs.join(", "),
        r.tcp_round_trips,
        r.udp_datagrams_received,
        r.udp_datagrams_sent,
        c.packets,
        c.wireguard,
        c.control,
        c.identity,
        c.arp,
        c.link_local,
        c.plaintext,
        c.marker_hits
    );
    s += if r.pass {
        "  PASS: nothing crossed the underlay in clear\n"
    } else if c.marker_hits > 0 || c.plaintext > 0 {
        "  FAIL: pod traffic crossed the underlay in clear\n"
    } else {
        "  FAIL: no encrypted traffic was seen, so nothing was proven\n"
    };
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pcap(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut v = vec![];
        v.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
        v.extend_from_slice(&[2, 0, 4, 0]);
        v.extend_from_slice(&[0; 8]);
        v.extend_from_slice(&65535u32.to_le_bytes());
        v.extend_from_slice(&1u32.to_le_bytes());
        for f in frames {
            v.extend_from_slice(&[0; 8]);
            v.extend_from_slice(&(f.len() as u32).to_le_bytes());
            v.extend_from_slice(&(f.len() as u32).to_le_bytes());
            v.extend_from_slice(f);
        }
        v
    }

    fn ipv4(proto: u8, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&[0x08, 0x00]);
        let mut ip = vec![
            0x45, 0, 0, 0, 0, 0, 0, 0, 64, proto, 0, 0, 198, 18, 0, 1, 198, 18, 0, 2,
        ];
        ip.extend_from_slice(&sport.to_be_bytes());
        ip.extend_from_slice(&dport.to_be_bytes());
        ip.extend_from_slice(&[0; 16]);
        ip.extend_from_slice(payload);
        f.extend(ip);
        f
    }

    #[test]
    fn classifies_and_finds_markers() {
        let arp = {
            let mut f = vec![0u8; 12];
            f.extend_from_slice(&[0x08, 0x06]);
            f.extend_from_slice(&[0; 28]);
            f
        };
        let mut igmp = ipv4(2, 0, 0, b"");
        igmp[30..34].copy_from_slice(&[224, 0, 0, 22]);
        let mut igmp_routed = igmp.clone();
        igmp_routed[30..34].copy_from_slice(&[239, 1, 2, 3]);
        // Node -> spire-server:8081 and back are identity traffic; another port of it is not.
        let mut spire_to = ipv4(6, 40000, 8081, b"tls");
        spire_to[30..34].copy_from_slice(&[198, 18, 0, 254]);
        let mut spire_from = ipv4(6, 8081, 40000, b"tls");
        spire_from[26..30].copy_from_slice(&[198, 18, 0, 254]);
        let mut spire_other_port = ipv4(6, 40000, 8082, b"x");
        spire_other_port[30..34].copy_from_slice(&[198, 18, 0, 254]);
        // Node <-> kube-apiserver:6443 is the control plane; pod traffic to its address is not.
        let mut api_to = ipv4(6, 40000, 6443, b"tls");
        api_to[30..34].copy_from_slice(&[198, 18, 0, 253]);
        let mut api_other_port = ipv4(6, 40000, 8080, b"x");
        api_other_port[30..34].copy_from_slice(&[198, 18, 0, 253]);
        let ipv6_l4 = |src: [u8; 2], dst: [u8; 2], next: u8, l4: [u8; 8]| {
            let mut f = vec![0u8; 12];
            f.extend_from_slice(&[0x86, 0xdd]);
            let mut ip = vec![0x60, 0, 0, 0, 0, 8, next, 255];
            let mut a = [0u8; 16];
            a[..2].copy_from_slice(&src);
            a[15] = 1;
            ip.extend_from_slice(&a);
            let mut b = [0u8; 16];
            b[..2].copy_from_slice(&dst);
            b[15] = 2;
            ip.extend_from_slice(&b);
            ip.extend_from_slice(&l4);
            f.extend(ip);
            f
        };
        let ipv6 = |src, dst, next| ipv6_l4(src, dst, next, [0; 8]);
        let ports = |sport: u16, dport: u16| {
            let mut l4 = [0u8; 8];
            l4[..2].copy_from_slice(&sport.to_be_bytes());
            l4[2..4].copy_from_slice(&dport.to_be_bytes());
            l4
        };
        // Neighbour solicitation between two IPv6 underlay addresses (hop limit 255); the same
        // ICMPv6 type with another hop limit was routed, so it is not kept to the link.
        let ula = [0xfd, 0x00];
        let solicitation = ipv6_l4(ula, ula, 58, [135, 0, 0, 0, 0, 0, 0, 0]);
        let mut routed_solicitation = solicitation.clone();
        routed_solicitation[21] = 64;
        let data = pcap(&[
            ipv4(17, WG_PORT, WG_PORT, b"\x04encrypted"),
            ipv4(6, 40000, CONTROL_PORT, b"tls"),
            spire_to,
            spire_from,
            spire_other_port,
            api_to,
            api_other_port,
            arp,
            ipv4(6, 40000, 8080, b"GET /VEIL-LEAK-MARKER-1 HTTP/1.1"),
            igmp,
            igmp_routed,
            ipv6([0xfe, 0x80], [0xff, 0x02], 58),
            ipv6([0xfe, 0x80], [0xfe, 0x80], 58),
            ipv6([0xfd, 0x00], [0xfd, 0x00], 58),
            ipv6([0xfe, 0x80], [0xff, 0x02], 6),
            solicitation,
            routed_solicitation,
            ipv6_l4(ula, ula, 17, ports(WG_PORT, WG_PORT)),
            ipv6_l4(ula, ula, 6, ports(40000, CONTROL_PORT)),
            ipv6_l4(ula, ula, 6, ports(40000, 8080)),
        ]);
        let st = analyse_pcap(&data, b"VEIL-LEAK-MARKER-1").unwrap();
        assert_eq!(
            st,
            CaptureStats {
                packets: 20,
                wireguard: 2,
                control: 2,
                identity: 2,
                kube_api: 1,
                arp: 1,
                link_local: 4,
                plaintext: 8,
                marker_hits: 1
            }
        );
        // A bare IPv6 header (no transport header) is counted, not a panic.
        let mut bare = ipv6_l4(ula, ula, 17, [0; 8]);
        bare.truncate(54);
        assert_eq!(analyse_pcap(&pcap(&[bare]), b"x").unwrap().plaintext, 1);
        assert!(analyse_pcap(b"short", b"x").is_err());
        assert!(analyse_pcap(&[0u8; 40], b"x").is_err());
    }
}
