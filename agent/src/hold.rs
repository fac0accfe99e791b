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
    net::Ipv4Addr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    sync::{mpsc, watch},
    time::Instant,
};

use crate::{auth::AuthTriple, cluster::ClusterState, flows::FlowStore};

/// Limits of the hold queue.
#[derive(Debug, Clone, Copy)]
pub struct HoldConfig {
    pub per_pair: usize,
    pub total: usize,
    pub timeout: Duration,
}

impl Default for HoldConfig {
    fn default() -> Self {
        Self {
            per_pair: 256,
            total: 4096,
            timeout: Duration::from_secs(3),
        }
    }
}

/// Counters of the hold queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HoldStats {
    pub held: u64,
    pub released: u64,
    pub timed_out: u64,
    pub overflow: u64,
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
    stats: HoldStats,
}

impl HoldQueue {
    pub fn new(cfg: HoldConfig) -> Self {
        Self {
            cfg,
            queues: BTreeMap::new(),
            total: 0,
            stats: HoldStats::default(),
        }
    }

    pub fn hold(&mut self, t: AuthTriple, packet: Vec<u8>, now: Instant) -> Held {
        let q = self.queues.entry(t).or_default();
        let first = q.is_empty();
        if q.len() >= self.cfg.per_pair || self.total >= self.cfg.total {
            if first {
                self.queues.remove(&t);
            }
            self.stats.overflow += 1;
            return Held::Overflow;
        }
        q.push_back(Entry { since: now, packet });
        self.total += 1;
        self.stats.held += 1;
        Held::Queued { first }
    }

    /// The oldest packet held for a pair (for its flow record).
    pub fn first(&self, t: &AuthTriple) -> Option<&[u8]> {
        self.queues
            .get(t)
            .and_then(|q| q.front())
            .map(|e| e.packet.as_slice())
    }

    /// Takes a pair's packets, oldest first, with how long the first waited.
    pub fn release(&mut self, t: &AuthTriple, now: Instant) -> Option<(Vec<Vec<u8>>, Duration)> {
        let q = self.queues.remove(t)?;
        self.total -= q.len();
        self.stats.released += q.len() as u64;
        let waited = q
            .front()
            .map(|e| now.duration_since(e.since))
            .unwrap_or_default();
        Some((q.into_iter().map(|e| e.packet).collect(), waited))
    }

    /// Drops packets held longer than the timeout; returns (pair, packets dropped).
    pub fn expire(&mut self, now: Instant) -> Vec<(AuthTriple, usize)> {
        let mut out = Vec::new();
        for (t, q) in self.queues.iter_mut() {
            let before = q.len();
            while q
                .front()
                .is_some_and(|e| now.duration_since(e.since) >= self.cfg.timeout)
            {
                q.pop_front();
            }
            if q.len() < before {
                out.push((*t, before - q.len()));
            }
        }
        self.queues.retain(|_, q| !q.is_empty());
        let dropped: usize = out.iter().map(|(_, n)| n).sum();
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

    pub fn len(&self) -> usize {
        self.total
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }
}

/// IPv4 source and destination of a packet.
fn addrs(p: &[u8]) -> Option<(Ipv4Addr, Ipv4Addr)> {
    if p.len() < 20 || p[0] >> 4 != 4 {
        return None;
    }
    Some((
        Ipv4Addr::new(p[12], p[13], p[14], p[15]),
        Ipv4Addr::new(p[16], p[17], p[18], p[19]),
    ))
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
                loop {
                    let n = match guard.try_io(|inner| inner.get_ref().recv(&mut buf)) {
                        Ok(Ok(n)) => n,
                        Ok(Err(e)) => return Err(e),
                        Err(_would_block) => break,
                    };
                    let packet = buf[..n].to_vec();
                    let Some(t) = classify(&packet, &cluster, &me) else { continue };
                    let now = Instant::now();
                    if authed.contains(&t) {
                        // Authenticated between the datapath's miss and now: straight back.
                        let _ = fd.get_ref().send(&packet);
                        continue;
                    }
                    match queue.hold(t, packet, now) {
                        Held::Queued { first: true } => {
                            tracing::debug!(?t, "holding a flow until its identity pair is authenticated");
                            let _ = requests.try_send(t);
                        }
                        Held::Queued { first: false } => {}
                        Held::Overflow => {
                            record(&flows, &cluster, &me, &buf[..n], "DROPPED", Some("auth-queue-full"), None);
                        }
                    }
                }
            }
            r = authenticated.changed() => {
                if r.is_err() {
                    return Ok(());
                }
                let authed = authenticated.borrow_and_update().clone();
                let ready: Vec<AuthTriple> = queue.pairs().filter(|t| authed.contains(t)).copied().collect();
                let cluster = cluster_rx.borrow().clone();
                for t in ready {
                    let first = queue.first(&t).map(<[u8]>::to_vec).unwrap_or_default();
                    if let Some((packets, waited)) = queue.release(&t, Instant::now()) {
                        for p in &packets {
                            let _ = fd.get_ref().send(p);
                        }
                        tracing::info!(?t, packets = packets.len(), waited_ms = waited.as_millis() as u64, "released held packets after authentication");
                        record(&flows, &cluster, &me, &first, "FORWARDED", None, Some(waited));
                    }
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                let cluster = cluster_rx.borrow().clone();
                let firsts: BTreeMap<AuthTriple, Vec<u8>> =
                    queue.pairs().filter_map(|t| Some((*t, queue.first(t)?.to_vec()))).collect();
                for (t, n) in queue.expire(Instant::now()) {
                    tracing::warn!(?t, dropped = n, "authentication did not complete in time: held packets dropped");
                    if let Some(p) = firsts.get(&t) {
                        record(&flows, &cluster, &me, p, "DROPPED", Some("auth-required"), None);
                    }
                }
            }
        }
        *stats.lock().expect("hold stats lock") = queue.stats();
    }
}

/// A flow record for a held packet (the datapath emitted none for it).
fn record(
    flows: &Arc<Mutex<FlowStore>>,
    cluster: &ClusterState,
    me: &str,
    packet: &[u8],
    verdict: &str,
    reason: Option<&str>,
    waited: Option<Duration>,
) {
    let Some((src, dst)) = addrs(packet) else {
        return;
    };
    let ihl = usize::from(packet[0] & 0x0f) * 4;
    let proto = packet[9];
    let port = |off: usize| {
        packet
            .get(ihl + off..ihl + off + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .unwrap_or(0)
    };
    let (sport, dport) = if matches!(proto, 6 | 17 | 132) {
        (port(0), port(2))
    } else {
        (0, 0)
    };
    let ep = |ip: Ipv4Addr, port: u16| {
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
        verdict: verdict.to_string(),
        drop_reason: reason.map(str::to_string),
        protocol: crate::flows::protocol_name(proto),
        direction: if local_is_src { "egress" } else { "ingress" }.into(),
        src: ep(src, sport),
        dst: ep(dst, dport),
        auth: if verdict == "FORWARDED" {
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
    flows.lock().expect("flow store lock").push(flow);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(n: u32) -> AuthTriple {
        AuthTriple {
            local_identity: 256,
            remote_identity: n,
            remote_node: 2,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn holds_releases_expires_and_bounds() {
        let mut q = HoldQueue::new(HoldConfig {
            per_pair: 2,
            total: 3,
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
        assert_eq!(q.expire(Instant::now()), vec![(t(2), 1)]);
        assert!(q.is_empty());
        assert_eq!(
            q.stats(),
            HoldStats {
                held: 3,
                released: 2,
                timed_out: 1,
                overflow: 2
            }
        );
    }

    #[test]
    fn classifies_held_packets_from_either_direction() {
        use crate::cluster::{Node, Pod};
        let pod = |name: &str, node: &str, ip: [u8; 4], id: u32| Pod {
            name: name.into(),
            namespace: "shop".into(),
            node: node.into(),
            ip: Ipv4Addr::from(ip),
            labels: Default::default(),
            service_account: name.into(),
            host_veth: "x".into(),
            identity: id,
        };
        let node = |name: &str, id: u32| Node {
            name: name.into(),
            id,
            underlay_ip: Ipv4Addr::new(198, 18, 0, id as u8),
            pod_cidr: String::new(),
            wg_public_key: None,
        };
        let c = ClusterState {
            nodes: vec![node("a", 1), node("b", 2)],
            pods: vec![
                pod("fe", "a", [198, 19, 1, 10], 256),
                pod("be", "b", [198, 19, 2, 10], 257),
            ],
            ..Default::default()
        };
        let mut p = vec![0u8; 40];
        p[0] = 0x45;
        p[12..16].copy_from_slice(&[198, 19, 1, 10]);
        p[16..20].copy_from_slice(&[198, 19, 2, 10]);
        // Egress held on a: (frontend, backend, b).
        assert_eq!(
            classify(&p, &c, "a"),
            Some(AuthTriple {
                local_identity: 256,
                remote_identity: 257,
                remote_node: 2
            })
        );
        // Ingress held on b: (backend, frontend, a).
        assert_eq!(
            classify(&p, &c, "b"),
            Some(AuthTriple {
                local_identity: 257,
                remote_identity: 256,
                remote_node: 1
            })
        );
        assert_eq!(classify(&p[..10], &c, "a"), None);
    }
}
