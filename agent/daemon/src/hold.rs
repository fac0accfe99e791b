//! hold: no first-packet drop. When a flow needs mutual auth and its identity pair is not
//! authenticated yet, the datapath redirects the packet into this node's hold device (a TUN
//! the agent owns) instead of dropping it. The agent queues it (bounded, counted), asks the
//! mesh to authenticate the pair now, and writes the packet back into the hold device the
//! moment the auth entry exists — the stack then routes it on (into the tunnel, or to the pod)
//! as if it had never stopped. A packet still held after the timeout is dropped and recorded
//! with reason `auth-required`.
//!
//! The queue is sans-IO ([`HoldQueue`]); the device loop is a thin shell ([`run`]).

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    sync::{mpsc, watch},
    time::Instant,
};

use crate::{
    auth::AuthTriple,
    cluster::ClusterState,
    flows::{FlowStore, Verdict},
};

/// Limits of the hold queue.
#[derive(Debug, Clone, Copy)]
pub struct HoldConfig {
    pub per_pair: usize,
    pub total: usize,
    /// Bytes held in all queues. The packet bounds alone allow `total` packets of up to 64 KiB
    /// each (a TUN read can be that large whatever the MTU says): 256 MiB.
    pub max_bytes: usize,
    pub timeout: Duration,
}

impl Default for HoldConfig {
    fn default() -> Self {
        Self {
            per_pair: 256,
            total: 4096,
            // 4096 packets of a 1500-byte MTU fit; 64 KiB packets stop at 128.
            max_bytes: 8 << 20,
            timeout: Duration::from_secs(3),
        }
    }
}

/// Most packets read per readiness before the loop looks at its other events: a sender that
/// keeps the device readable must not starve releases, expiries and the runtime thread.
const MAX_BATCH: usize = 256;

/// Counters of the hold queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HoldStats {
    pub held: u64,
    pub released: u64,
    pub timed_out: u64,
    pub overflow: u64,
    /// Packets that named no known pair (not IPv4, malformed header, unknown pod or node):
    /// dropped.
    pub unclassified: u64,
}

/// What happened to a packet offered to the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// Queued; `first` when it opened the pair's queue (ask for auth now).
    Queued { first: bool },
    /// The queue is full: the packet is dropped (`auth-queue-full`).
    Overflow,
}

struct Entry {
    since: Instant,
    packet: Vec<u8>,
}

/// Packets waiting for an identity pair's authentication.
pub struct HoldQueue {
    cfg: HoldConfig,
    queues: BTreeMap<AuthTriple, VecDeque<Entry>>,
    total: usize,
    bytes: usize,
    stats: HoldStats,
}

impl HoldQueue {
    pub fn new(cfg: HoldConfig) -> Self {
        Self {
            cfg,
            queues: BTreeMap::new(),
            total: 0,
            bytes: 0,
            stats: HoldStats::default(),
        }
    }

    pub fn hold(&mut self, t: AuthTriple, packet: Vec<u8>, now: Instant) -> Held {
        let q = self.queues.entry(t).or_default();
        let first = q.is_empty();
        if q.len() >= self.cfg.per_pair
            || self.total >= self.cfg.total
            || self.bytes.saturating_add(packet.len()) > self.cfg.max_bytes
        {
            if first {
                self.queues.remove(&t);
            }
            self.stats.overflow += 1;
            return Held::Overflow;
        }
        self.bytes += packet.len();
        q.push_back(Entry { since: now, packet });
        self.total += 1;
        self.stats.held += 1;
        Held::Queued { first }
    }

    /// Takes a pair's packets, oldest first, with how long the first waited.
    pub fn release(&mut self, t: &AuthTriple, now: Instant) -> Option<(Vec<Vec<u8>>, Duration)> {
        let q = self.queues.remove(t)?;
        self.total -= q.len();
        self.bytes -= q.iter().map(|e| e.packet.len()).sum::<usize>();
        self.stats.released += q.len() as u64;
        let waited = q
            .front()
            .map(|e| now.duration_since(e.since))
            .unwrap_or_default();
        Some((q.into_iter().map(|e| e.packet).collect(), waited))
    }

    /// Drops packets held longer than the timeout; returns each pair's dropped packets, oldest
    /// first.
    pub fn expire(&mut self, now: Instant) -> Vec<(AuthTriple, Vec<Vec<u8>>)> {
        let mut out = Vec::new();
        for (t, q) in self.queues.iter_mut() {
            let mut gone = Vec::new();
            while q
                .front()
                .is_some_and(|e| now.duration_since(e.since) >= self.cfg.timeout)
            {
                if let Some(e) = q.pop_front() {
                    self.bytes -= e.packet.len();
                    gone.push(e.packet);
                }
            }
            if !gone.is_empty() {
                out.push((*t, gone));
            }
        }
        self.queues.retain(|_, q| !q.is_empty());
        let dropped: usize = out.iter().map(|(_, p)| p.len()).sum();
        self.total -= dropped;
        self.stats.timed_out += dropped as u64;
        out
    }

    /// When the oldest held packet times out.
    pub fn deadline(&self) -> Option<Instant> {
        self.queues
            .values()
            .filter_map(|q| q.front())
            .map(|e| e.since + self.cfg.timeout)
            .min()
    }

    pub fn pairs(&self) -> impl Iterator<Item = &AuthTriple> {
        self.queues.keys()
    }

    pub fn stats(&self) -> HoldStats {
        self.stats
    }

    /// A packet read from the device that named no pair was dropped.
    pub fn count_unclassified(&mut self) {
        self.stats.unclassified += 1;
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.total
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }
}

/// The IP header fields the hold path reads, from a packet whose header is consistent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct IpHeader {
    src: IpAddr,
    dst: IpAddr,
    /// The transport protocol (IPv6: after the extension headers).
    proto: u8,
    /// Bytes before the transport header (IPv4 20..=60; IPv6 40 plus extension headers).
    header_len: usize,
    /// Total length from the header (≤ the bytes read).
    total_len: usize,
    /// Not the first fragment: no transport header follows.
    is_later_fragment: bool,
}

/// Parses the IP header of a packet read from the device. Anything else — neither IPv4 nor
/// IPv6, a header length under 20 bytes or past the packet, a total length that disagrees, more
/// IPv6 extension headers than the datapath walks — is refused (the caller drops and counts it)
/// rather than read at wrong offsets.
fn ip_header(p: &[u8]) -> Option<IpHeader> {
    match p.first()? >> 4 {
        4 => ipv4_header(p),
        6 => ipv6_header(p),
        _ => None,
    }
}

fn ipv4_header(p: &[u8]) -> Option<IpHeader> {
    let h = p.get(..20)?;
    let header_len = usize::from(h[0] & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes([h[2], h[3]]));
    if header_len < 20 || total_len < header_len || total_len > p.len() {
        return None;
    }
    Some(IpHeader {
        src: Ipv4Addr::new(h[12], h[13], h[14], h[15]).into(),
        dst: Ipv4Addr::new(h[16], h[17], h[18], h[19]).into(),
        proto: h[9],
        header_len,
        total_len,
        is_later_fragment: u16::from_be_bytes([h[6], h[7]]) & 0x1fff != 0,
    })
}

fn ipv6_header(p: &[u8]) -> Option<IpHeader> {
    let h = p.get(..40)?;
    let total_len = 40 + usize::from(u16::from_be_bytes([h[4], h[5]]));
    if total_len > p.len() {
        return None;
    }
    let addr = |at: usize| -> Option<IpAddr> {
        Some(Ipv6Addr::from(*h.get(at..at + 16)?.first_chunk::<16>()?).into())
    };
    let (mut next, mut off, mut is_later_fragment) = (h[6], 40usize, false);
    // The extension headers the datapath walks (hop-by-hop, routing, fragment, destination
    // options), as many as it walks.
    for _ in 0..4 {
        match next {
            0 | 43 | 60 => {
                let e = p.get(off..off + 2)?;
                next = e[0];
                off += (usize::from(e[1]) + 1) * 8;
            }
            44 => {
                let e = p.get(off..off + 8)?;
                next = e[0];
                is_later_fragment = u16::from_be_bytes([e[2], e[3]]) & 0xfff8 != 0;
                off += 8;
            }
            _ => break,
        }
    }
    if matches!(next, 0 | 43 | 44 | 60) || off > total_len {
        return None;
    }
    Some(IpHeader {
        src: addr(8)?,
        dst: addr(24)?,
        proto: next,
        header_len: off,
        total_len,
        is_later_fragment,
    })
}

/// Source and destination of a packet.
fn addrs(p: &[u8]) -> Option<(IpAddr, IpAddr)> {
    ip_header(p).map(|h| (h.src, h.dst))
}

/// Source and destination ports of a TCP, UDP or SCTP packet; zero where there are none (other
/// protocols, later fragments, a transport header cut short).
fn ports(p: &[u8], h: &IpHeader) -> (u16, u16) {
    if !matches!(h.proto, 6 | 17 | 132) || h.is_later_fragment {
        return (0, 0);
    }
    p.get(h.header_len..h.total_len)
        .and_then(|l4| l4.first_chunk::<4>())
        .map(|b| {
            (
                u16::from_be_bytes([b[0], b[1]]),
                u16::from_be_bytes([b[2], b[3]]),
            )
        })
        .unwrap_or((0, 0))
}

/// The kernel's own IPv6 link control on the device (a multicast listener report from the
/// unspecified or a link-local address to a link-scope group, sent when the device comes up):
/// not a packet the datapath held, so neither held nor counted.
fn is_own_link_control(p: &[u8]) -> bool {
    let Some(h) = ipv6_header(p) else {
        return false;
    };
    let (IpAddr::V6(src), IpAddr::V6(dst)) = (h.src, h.dst) else {
        return false;
    };
    let link_src = src.is_unspecified() || src.is_unicast_link_local();
    let link_dst = dst.is_multicast() && dst.segments()[0] & 0x000f == 2;
    h.proto == 58 && link_src && link_dst
}

/// The identity pair a held packet waits for, as this node's auth map keys it: (local pod's
/// identity, remote pod's identity, remote node).
pub fn classify(packet: &[u8], cluster: &ClusterState, me: &str) -> Option<AuthTriple> {
    let (src, dst) = addrs(packet)?;
    let s = cluster.pod_by_ip(src)?;
    let d = cluster.pod_by_ip(dst)?;
    let (local, remote) = if s.node == me { (s, d) } else { (d, s) };
    let node = cluster.node(&remote.node)?;
    Some(AuthTriple {
        local_identity: local.identity,
        remote_identity: remote.identity,
        remote_node: node.id,
    })
}

/// Shared counters for `veil status`.
pub type SharedStats = Arc<Mutex<HoldStats>>;

/// Runs the hold device loop until the device fails.
#[allow(clippy::too_many_arguments)] // the component's dependencies, spawned in one place
pub async fn run(
    device: tun_rs::SyncDevice,
    cfg: HoldConfig,
    mut cluster_rx: watch::Receiver<Arc<ClusterState>>,
    me: String,
    requests: mpsc::Sender<AuthTriple>,
    mut authenticated: watch::Receiver<BTreeSet<AuthTriple>>,
    flows: Arc<Mutex<FlowStore>>,
    stats: SharedStats,
) -> std::io::Result<()> {
    device.set_nonblocking(true)?;
    // SAFETY: the device owns its fd for as long as the AsyncFd holds it.
    let fd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(device, tokio::io::Interest::READABLE)
    }
    .map_err(|e| e.into_parts().1)?;
    let mut queue = HoldQueue::new(cfg);
    let mut buf = vec![0u8; 65536];
    loop {
        let deadline = queue
            .deadline()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            r = fd.readable() => {
                let mut guard = r?;
                let cluster = cluster_rx.borrow_and_update().clone();
                let authed = authenticated.borrow().clone();
                let recv = |b: &mut [u8]| guard.try_io(|inner| inner.get_ref().recv(b)).ok();
                read_batch(&mut buf, recv, |packet| {
                    if is_own_link_control(packet) {
                        return;
                    }
                    let Some(t) = classify(packet, &cluster, &me) else {
                        queue.count_unclassified();
                        return;
                    };
                    let now = Instant::now();
                    if authed.contains(&t) {
                        // Authenticated between the datapath's miss and now: straight back,
                        // admitted by `veil_from_hold`, which records nothing; so here.
                        let _ = fd.get_ref().send(packet);
                        record(&flows, &cluster, &me, packet, Verdict::Forwarded, None, Some(Duration::ZERO));
                        return;
                    }
                    match queue.hold(t, packet.to_vec(), now) {
                        Held::Queued { first: true } => {
                            tracing::debug!(?t, "holding a flow until its identity pair is authenticated");
                            let _ = requests.try_send(t);
                        }
                        Held::Queued { first: false } => {}
                        Held::Overflow => {
                            record(&flows, &cluster, &me, packet, Verdict::Dropped, Some("auth-queue-full"), None);
                        }
                    }
                })?;
            }
            r = authenticated.changed() => {
                if r.is_err() {
                    return Ok(());
                }
                let authed = authenticated.borrow_and_update().clone();
                let ready: Vec<AuthTriple> = queue.pairs().filter(|t| authed.contains(t)).copied().collect();
                let cluster = cluster_rx.borrow().clone();
                for t in ready {
                    if let Some((packets, waited)) = queue.release(&t, Instant::now()) {
                        for p in &packets {
                            let _ = fd.get_ref().send(p);
                        }
                        tracing::info!(?t, packets = packets.len(), waited_ms = waited.as_millis() as u64, "released held packets after authentication");
                        // One record per connection the release admits (`veil_from_hold`
                        // records none), not one per identity pair.
                        for first in first_of_each_flow(&packets) {
                            record(&flows, &cluster, &me, first, Verdict::Forwarded, None, Some(waited));
                        }
                    }
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                let cluster = cluster_rx.borrow().clone();
                for (t, packets) in queue.expire(Instant::now()) {
                    tracing::warn!(?t, dropped = packets.len(), "authentication did not complete in time: held packets dropped");
                    // One record per connection refused, as a release records each admitted.
                    for p in first_of_each_flow(&packets) {
                        record(&flows, &cluster, &me, p, Verdict::Dropped, Some("auth-required"), None);
                    }
                }
            }
        }
        *stats.lock().unwrap_or_else(|e| e.into_inner()) = queue.stats();
    }
}

/// Reads packets with `recv` (`None` once the device would block) into `buf` and hands each to
/// `on_packet`, at most [`MAX_BATCH`] per call. Returns whether the device was drained.
fn read_batch(
    buf: &mut [u8],
    mut recv: impl FnMut(&mut [u8]) -> Option<io::Result<usize>>,
    mut on_packet: impl FnMut(&[u8]),
) -> io::Result<bool> {
    for _ in 0..MAX_BATCH {
        let n = match recv(buf) {
            Some(r) => r?,
            None => return Ok(true),
        };
        if let Some(packet) = buf.get(..n) {
            on_packet(packet);
        }
    }
    Ok(false)
}

/// The first packet of each flow (addresses, protocol and ports) among `packets`, in order:
/// the connections a release admits or a timeout drops.
fn first_of_each_flow(packets: &[Vec<u8>]) -> Vec<&[u8]> {
    let mut seen = BTreeSet::new();
    packets
        .iter()
        .filter(|p| {
            let key = ip_header(p).map(|h| (h.src, h.dst, h.proto, ports(p, &h)));
            seen.insert(key)
        })
        .map(Vec::as_slice)
        .collect()
}

/// A flow record for a held packet (the datapath emitted none for it).
fn record(
    flows: &Arc<Mutex<FlowStore>>,
    cluster: &ClusterState,
    me: &str,
    packet: &[u8],
    verdict: Verdict,
    reason: Option<&str>,
    waited: Option<Duration>,
) {
    let Some(h) = ip_header(packet) else {
        return;
    };
    let (src, dst, proto) = (h.src, h.dst, h.proto);
    let (sport, dport) = ports(packet, &h);
    let ep = |ip: IpAddr, port: u16| {
        let p = cluster.pod_by_ip(ip);
        crate::flows::Endpoint {
            pod: p.map(|p| p.name.clone()),
            namespace: p.map(|p| p.namespace.clone()),
            identity: p.map(|p| p.identity).unwrap_or(0),
            labels: p
                .map(|p| p.labels.iter().map(|(k, v)| format!("{k}={v}")).collect())
                .unwrap_or_default(),
            ip: ip.to_string(),
            port,
        }
    };
    let local_is_src = cluster.pod_by_ip(src).is_some_and(|p| p.node == me);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let flow = crate::flows::Flow {
        time: crate::flows::rfc3339(now),
        time_unix_ns: now,
        node: me.to_string(),
        verdict,
        drop_reason: reason.map(str::to_string),
        protocol: crate::flows::protocol_name(proto),
        direction: if local_is_src { "egress" } else { "ingress" }.into(),
        src: ep(src, sport),
        dst: ep(dst, dport),
        auth: if verdict == Verdict::Forwarded {
            "authenticated"
        } else {
            "required"
        }
        .into(),
        encrypted: true,
        count: 1,
        held_ms: waited.map(|w| w.as_millis() as u64),
        ..Default::default()
    };
    flows.lock().unwrap_or_else(|e| e.into_inner()).push(flow);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn triple(local_identity: u32, remote_identity: u32, remote_node: u32) -> AuthTriple {
        AuthTriple {
            local_identity,
            remote_identity,
            remote_node,
        }
    }

    fn t(n: u32) -> AuthTriple {
        triple(256, n, 2)
    }

    #[tokio::test(start_paused = true)]
    async fn holds_releases_expires_and_bounds() {
        let mut q = HoldQueue::new(HoldConfig {
            per_pair: 2,
            total: 3,
            max_bytes: 1 << 20,
            timeout: Duration::from_secs(3),
        });
        let now = Instant::now();
        assert_eq!(q.hold(t(1), vec![1], now), Held::Queued { first: true });
        assert_eq!(q.hold(t(1), vec![2], now), Held::Queued { first: false });
        assert_eq!(q.hold(t(1), vec![3], now), Held::Overflow, "per-pair bound");
        assert_eq!(q.hold(t(2), vec![4], now), Held::Queued { first: true });
        assert_eq!(q.hold(t(3), vec![5], now), Held::Overflow, "total bound");
        assert_eq!(q.len(), 3);
        tokio::time::advance(Duration::from_millis(40)).await;
        let (packets, waited) = q.release(&t(1), Instant::now()).unwrap();
        assert_eq!(packets, vec![vec![1], vec![2]], "oldest first");
        assert_eq!(waited, Duration::from_millis(40));
        assert!(q.release(&t(1), Instant::now()).is_none());
        assert_eq!(q.deadline(), Some(now + Duration::from_secs(3)));
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(q.expire(Instant::now()), vec![(t(2), vec![vec![4]])]);
        assert!(q.is_empty());
        assert_eq!(
            q.stats(),
            HoldStats {
                held: 3,
                released: 2,
                timed_out: 1,
                overflow: 2,
                unclassified: 0,
            }
        );
    }

    fn cluster() -> ClusterState {
        use crate::cluster::{Node, Pod};
        let pod = |name: &str, node: &str, ip: [u8; 4], id: u32| Pod {
            ipv6: Some(Ipv6Addr::new(
                0xfd00,
                0x198,
                0x19,
                ip[2].into(),
                0,
                0,
                0,
                ip[3].into(),
            )),
            ..Pod::for_test(name, node, ip, id)
        };
        ClusterState {
            nodes: vec![Node::for_test("a", 1), Node::for_test("b", 2)],
            pods: crate::cluster::pod_list([
                pod("fe", "a", [198, 19, 1, 10], 256),
                pod("be", "b", [198, 19, 2, 10], 257),
            ]),
            ..Default::default()
        }
    }

    /// A 40-byte IPv4 packet from the frontend pod to the backend pod.
    fn fe_to_be(proto: u8) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&40u16.to_be_bytes());
        p[9] = proto;
        p[12..16].copy_from_slice(&[198, 19, 1, 10]);
        p[16..20].copy_from_slice(&[198, 19, 2, 10]);
        p
    }

    /// The same packet over IPv6, through a hop-by-hop and a first-fragment header.
    fn fe_to_be_v6(proto: u8) -> Vec<u8> {
        let mut p = vec![0u8; 40 + 8 + 8 + 20];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&(36u16).to_be_bytes());
        p[6] = 0; // hop-by-hop
        p[8..24].copy_from_slice(&Ipv6Addr::new(0xfd00, 0x198, 0x19, 1, 0, 0, 0, 10).octets());
        p[24..40].copy_from_slice(&Ipv6Addr::new(0xfd00, 0x198, 0x19, 2, 0, 0, 0, 10).octets());
        p[40] = 44; // then a fragment header (offset 0, more fragments)
        p[48] = proto;
        p[51] = 1;
        p[56..60].copy_from_slice(&[0x1f, 0x90, 0x00, 0x35]);
        p
    }

    #[test]
    fn classifies_ipv6_packets_and_reads_their_ports_past_extension_headers() {
        let c = cluster();
        let p = fe_to_be_v6(17);
        assert_eq!(classify(&p, &c, "a"), Some(triple(256, 257, 2)));
        let h = ip_header(&p).unwrap();
        assert_eq!((h.proto, h.header_len, ports(&p, &h)), (17, 56, (8080, 53)));
        // A later fragment has no ports; a payload length past the read is refused.
        let mut later = p.clone();
        later[50] = 0x08;
        assert_eq!(ports(&later, &ip_header(&later).unwrap()), (0, 0));
        let mut long = p.clone();
        long[4..6].copy_from_slice(&100u16.to_be_bytes());
        assert_eq!(ip_header(&long), None);
    }

    #[test]
    fn the_kernels_own_listener_reports_are_not_held_packets() {
        let mut report = fe_to_be_v6(58);
        report[8..24].copy_from_slice(&[0; 16]);
        report[24..40].copy_from_slice(&Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0x16).octets());
        assert!(is_own_link_control(&report));
        // A pod's ICMPv6 to a pod is held like any other packet.
        assert!(!is_own_link_control(&fe_to_be_v6(58)));
        assert!(!is_own_link_control(&fe_to_be(1)));
    }

    #[test]
    fn classifies_held_packets_from_either_direction() {
        let c = cluster();
        let p = fe_to_be(6);
        // Egress held on a: (frontend, backend, b).
        assert_eq!(classify(&p, &c, "a"), Some(triple(256, 257, 2)));
        // Ingress held on b: (backend, frontend, a).
        assert_eq!(classify(&p, &c, "b"), Some(triple(257, 256, 1)));
        assert_eq!(classify(&p[..10], &c, "a"), None);
    }

    #[tokio::test(start_paused = true)]
    async fn held_bytes_are_bounded_not_only_held_packets() {
        let mut q = HoldQueue::new(HoldConfig {
            per_pair: 256,
            total: 4096,
            max_bytes: 100_000,
            timeout: Duration::from_secs(3),
        });
        let now = Instant::now();
        // 64 KiB reads (what one TUN read can return) stop at the byte bound, not at 4096.
        assert_eq!(
            q.hold(t(1), vec![0; 65535], now),
            Held::Queued { first: true }
        );
        assert_eq!(q.hold(t(1), vec![0; 65535], now), Held::Overflow);
        assert_eq!(q.hold(t(2), vec![0; 65535], now), Held::Overflow);
        assert_eq!(q.bytes(), 65535);
        // Small packets still fit beside it; releasing and expiring give the bytes back.
        assert_eq!(
            q.hold(t(2), vec![0; 1000], now),
            Held::Queued { first: true }
        );
        q.release(&t(1), now).unwrap();
        assert_eq!(q.bytes(), 1000);
        tokio::time::advance(Duration::from_secs(3)).await;
        q.expire(Instant::now());
        assert_eq!((q.bytes(), q.len()), (0, 0));
        assert_eq!(q.stats().overflow, 2);
    }

    #[test]
    fn malformed_headers_are_refused_not_read_at_wrong_offsets() {
        let c = cluster();
        let good = fe_to_be(17);
        assert!(classify(&good, &c, "a").is_some());
        let with = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut p = good.clone();
            f(&mut p);
            p
        };
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("ihl 0", with(&|p| p[0] = 0x40)),
            ("ihl 4", with(&|p| p[0] = 0x44)),
            ("ihl past the packet", with(&|p| p[0] = 0x4f)),
            (
                "total length past the read",
                with(&|p| p[2..4].copy_from_slice(&41u16.to_be_bytes())),
            ),
            (
                "total length under the header",
                with(&|p| p[2..4].copy_from_slice(&19u16.to_be_bytes())),
            ),
            ("version 5", with(&|p| p[0] = 0x55)),
            ("ipv6 header cut short", with(&|p| p[0] = 0x60)),
            ("truncated", good[..19].to_vec()),
            ("empty", Vec::new()),
        ];
        for (what, p) in cases {
            assert_eq!(ip_header(&p), None, "{what}");
            assert_eq!(classify(&p, &c, "a"), None, "{what}");
        }
    }

    #[test]
    fn flow_records_take_ports_only_from_a_first_fragment() {
        let c = cluster();
        let flows = Arc::new(Mutex::new(FlowStore::open(None, 16, 0)));
        let record_drop = |p: &[u8]| {
            record(
                &flows,
                &c,
                "a",
                p,
                Verdict::Dropped,
                Some("auth-required"),
                None,
            )
        };
        let mut p = fe_to_be(17);
        p[20..24].copy_from_slice(&[0x1f, 0x90, 0x00, 0x35]);
        record_drop(&p);
        // The same bytes as a later fragment are payload, not ports.
        p[6..8].copy_from_slice(&0x00b9u16.to_be_bytes());
        record_drop(&p);
        // A UDP header cut short by the total length has no ports either.
        let mut short = fe_to_be(17);
        short[2..4].copy_from_slice(&22u16.to_be_bytes());
        short[20..24].copy_from_slice(&[0x1f, 0x90, 0x00, 0x35]);
        record_drop(&short);
        let got: Vec<(u16, u16)> = flows
            .lock()
            .unwrap()
            .query(&Default::default())
            .iter()
            .map(|f| (f.src.port, f.dst.port))
            .collect();
        assert_eq!(got, vec![(8080, 53), (0, 0), (0, 0)]);
    }

    #[test]
    fn a_release_records_each_connection_it_admits_once() {
        // Three connections of one identity pair held together (two SYNs of the first: a
        // retransmission), and an IPv6 one.
        let with_ports = |sport: u16, p: &mut Vec<u8>| {
            p[20..24].copy_from_slice(&[(sport >> 8) as u8, sport as u8, 0x1f, 0x90]);
        };
        let conn = |sport: u16| {
            let mut p = fe_to_be(6);
            with_ports(sport, &mut p);
            p
        };
        let packets = vec![
            conn(40001),
            conn(40001),
            conn(40002),
            fe_to_be_v6(6),
            conn(40003),
        ];
        let first = first_of_each_flow(&packets);
        assert_eq!(
            first,
            vec![
                &packets[0][..],
                &packets[2][..],
                &packets[3][..],
                &packets[4][..]
            ]
        );
        // Each becomes a FORWARDED record of its own.
        let c = cluster();
        let flows = Arc::new(Mutex::new(FlowStore::open(None, 16, 0)));
        for p in first {
            record(
                &flows,
                &c,
                "a",
                p,
                Verdict::Forwarded,
                None,
                Some(Duration::from_millis(7)),
            );
        }
        let got: Vec<(u16, Option<u64>)> = flows
            .lock()
            .unwrap()
            .query(&Default::default())
            .iter()
            .map(|f| (f.src.port, f.held_ms))
            .collect();
        assert_eq!(
            got,
            vec![
                (40001, Some(7)),
                (40002, Some(7)),
                (8080, Some(7)),
                (40003, Some(7))
            ]
        );
    }

    #[test]
    fn a_device_that_stays_readable_cannot_keep_the_loop_reading() {
        let mut buf = vec![0u8; 64];
        let mut reads = 0;
        let mut seen = 0;
        // A flood: the device never runs dry.
        let drained = read_batch(
            &mut buf,
            |b| {
                reads += 1;
                (reads <= 10 * MAX_BATCH).then_some(Ok(b.len().min(20)))
            },
            |p| {
                assert_eq!(p.len(), 20);
                seen += 1;
            },
        )
        .unwrap();
        assert!(!drained);
        assert_eq!(
            seen, MAX_BATCH,
            "one batch, then the other events get a turn"
        );
        // A device that runs dry is drained; a read error ends the loop.
        let mut left = 3;
        let drained = read_batch(
            &mut buf,
            |_| {
                left -= 1;
                (left >= 0).then_some(Ok(1))
            },
            |_| {},
        )
        .unwrap();
        assert!(drained);
        let e = read_batch(&mut buf, |_| Some(Err(io::Error::other("gone"))), |_| {});
        assert!(e.is_err());
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_packets_never_panic(p in proptest::collection::vec(proptest::arbitrary::any::<u8>(), 0..128)) {
            let c = cluster();
            if let Some(h) = ip_header(&p) {
                proptest::prop_assert!(20 <= h.header_len && h.header_len <= h.total_len && h.total_len <= p.len());
                let _ = ports(&p, &h);
            }
            let _ = classify(&p, &c, "a");
            let flows = Arc::new(Mutex::new(FlowStore::open(None, 4, 0)));
            record(&flows, &c, "a", &p, Verdict::Dropped, None, None);
        }
    }
}
