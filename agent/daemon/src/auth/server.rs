//! The control channel server (TCP 4250 in the node netns): accepts peer agents, refuses
//! sources that are not cluster nodes before any TLS work, bounds unauthenticated connections
//! (globally and per source address) and how long they may take, then hands established
//! channels to the daemon as [`ChannelEvent::Established`].

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::{timeout_at, Instant};
use tracing::Instrument;
use veil_identity::ValidatedSvid;

use super::channel::{self, ChannelConfig, ChannelEvent, Deps};
use super::tls::{self, ExpectedPeer, TlsConfig};
use super::{node_name_of, AuthFailure, Error, NodeInfo, DEFAULT_PORT};

/// Server settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub tls: TlsConfig,
    pub channel: ChannelConfig,
    /// Connections that have not completed TLS + node handshake, in total.
    pub max_unauthenticated: usize,
    /// ... and per source address, so one noisy source cannot starve the others.
    pub max_unauthenticated_per_source: usize,
    /// Refuse sources that are no node's underlay address (before TLS). Off only where
    /// agents share an address (tests on loopback).
    pub require_known_source: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT)),
            tls: TlsConfig::default(),
            channel: ChannelConfig::default(),
            max_unauthenticated: 256,
            max_unauthenticated_per_source: 8,
            require_known_source: true,
        }
    }
}

/// Server counters (Prometheus-style, monotonic).
#[derive(Debug, Default)]
pub struct ServerStats {
    pub accepted: AtomicU64,
    pub refused_unknown_source: AtomicU64,
    pub refused_over_limit: AtomicU64,
    /// Pending connections closed to make room for a newer one from the same source.
    pub evicted_pending: AtomicU64,
    pub handshake_timeouts: AtomicU64,
    pub tls_failures: AtomicU64,
    pub node_handshake_failures: AtomicU64,
    pub established: AtomicU64,
    /// Peer node certificates we refused, by [`AuthFailure::code`].
    pub rejected: [AtomicU64; REJECTED_SLOTS],
}

// Every wire code has a counter: appending a code past the array is a build error, not a panic
// on the first peer refused for it.
const _: () = {
    let mut i = 0;
    while i < AuthFailure::ALL.len() {
        assert!((AuthFailure::ALL[i].code() as usize) < REJECTED_SLOTS);
        i += 1;
    }
};
const REJECTED_SLOTS: usize = 16;

impl ServerStats {
    pub fn rejected_for(&self, reason: AuthFailure) -> u64 {
        self.rejected
            .get(usize::from(reason.code()))
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// The counters as `veil status` shows them.
    pub fn counters(&self) -> crate::api::ListenerCounters {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        crate::api::ListenerCounters {
            accepted: get(&self.accepted),
            refused_unknown_source: get(&self.refused_unknown_source),
            refused_over_limit: get(&self.refused_over_limit),
            evicted_pending: get(&self.evicted_pending),
            handshake_timeouts: get(&self.handshake_timeouts),
            tls_failures: get(&self.tls_failures),
            node_handshake_failures: get(&self.node_handshake_failures),
            established: get(&self.established),
        }
    }

    fn count_rejected(&self, reason: AuthFailure) {
        if let Some(c) = self.rejected.get(usize::from(reason.code())) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Unauthenticated connections per source, oldest first. When a source is at its cap, a new
/// connection evicts that source's oldest pending one instead of being refused: a node's own
/// agent shares its address with whatever else runs on that host, and a legitimate handshake
/// completes in milliseconds while a half-open or slowloris connection sits for the whole
/// handshake timeout — so holding slots open cannot lock the real agent out.
/// Pending connections of one source, oldest first: (slot id, eviction signal).
type PendingQueue = VecDeque<(u64, Arc<Notify>)>;

#[derive(Default)]
struct PerSource {
    pending: Mutex<HashMap<IpAddr, PendingQueue>>,
    next_id: AtomicU64,
}

struct SourceSlot {
    table: Arc<PerSource>,
    ip: IpAddr,
    id: u64,
    evicted: Arc<Notify>,
}

impl PerSource {
    /// A slot for a new connection from `ip`, and whether an older one had to make room.
    fn take(self: &Arc<Self>, ip: IpAddr, max: usize) -> (SourceSlot, bool) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let evicted = Arc::new(Notify::new());
        let mut m = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let q = m.entry(ip).or_default();
        let mut made_room = false;
        while q.len() >= max.max(1) {
            if let Some((_, oldest)) = q.pop_front() {
                oldest.notify_one();
                made_room = true;
            }
        }
        q.push_back((id, evicted.clone()));
        let slot = SourceSlot {
            table: self.clone(),
            ip,
            id,
            evicted,
        };
        (slot, made_room)
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut m = self.table.pending.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(q) = m.get_mut(&self.ip) {
            q.retain(|(id, _)| *id != self.id);
            if q.is_empty() {
                m.remove(&self.ip);
            }
        }
    }
}

/// The control channel server.
pub struct Server {
    listener: TcpListener,
    cfg: ServerConfig,
    deps: Deps,
    stats: Arc<ServerStats>,
}

impl Server {
    pub async fn bind(cfg: ServerConfig, deps: Deps) -> Result<Self, Error> {
        let listener = TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| Error::Bind {
                addr: cfg.listen,
                source,
            })?;
        Ok(Self {
            listener,
            cfg,
            deps,
            stats: Arc::default(),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn stats(&self) -> Arc<ServerStats> {
        self.stats.clone()
    }

    /// Counts into `stats` instead of its own: counters that outlive this listener (the mesh
    /// binds a new one when the node's address moves).
    pub fn counting_into(mut self, stats: Arc<ServerStats>) -> Self {
        self.stats = stats;
        self
    }

    /// Accepts until `shutdown` resolves. Established channels outlive it (the daemon owns
    /// them); connections still handshaking are dropped with the task.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let global = Arc::new(Semaphore::new(self.cfg.max_unauthenticated));
        let per_source = Arc::new(PerSource::default());
        let cfg = Arc::new(self.cfg);
        tokio::pin!(shutdown);
        loop {
            let (tcp, addr) = tokio::select! {
                _ = &mut shutdown => break,
                r = self.listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: back off briefly instead of spinning.
                        tracing::warn!(error = %e, "control channel accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            self.stats.accepted.fetch_add(1, Ordering::Relaxed);
            let ip = canonical_ip(addr.ip());
            let known = self.deps.directory.node_by_addr(ip);
            if known.is_none() && cfg.require_known_source {
                self.stats
                    .refused_unknown_source
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let (slot, made_room) = per_source.take(ip, cfg.max_unauthenticated_per_source);
            if made_room {
                self.stats.evicted_pending.fetch_add(1, Ordering::Relaxed);
            }
            let evicted = slot.evicted.clone();
            let Ok(permit) = global.clone().try_acquire_owned() else {
                self.stats
                    .refused_over_limit
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let expected = match &known {
                Some(n) => ExpectedPeer::Node(n.spiffe_id.clone()),
                None => ExpectedPeer::AnyNodeOf(self.deps.trust_domain.clone()),
            };
            let (deps, stats, cfg) = (self.deps.clone(), self.stats.clone(), cfg.clone());
            let span = tracing::debug_span!("auth_conn", peer = %addr);
            tokio::spawn(
                async move {
                    tokio::select! {
                        r = handle(tcp, expected, &cfg, &deps, &stats, (slot, permit)) => {
                            if let Err(e) = r {
                                tracing::debug!(error = %crate::error_chain(&e), "peer connection refused");
                            }
                        }
                        () = evicted.notified() => {
                            tracing::debug!("pending connection evicted by a newer one from its source");
                        }
                    }
                }
                .instrument(span),
            );
        }
    }
}

/// The cluster node a TLS peer's verified certificate names, and that certificate validated.
fn named_node(
    conn: &rustls::ServerConnection,
    deps: &Deps,
    peer_label: &str,
) -> Result<(NodeInfo, ValidatedSvid), Error> {
    let certs = conn.peer_certificates().unwrap_or_default();
    let expected = ExpectedPeer::AnyNodeOf(deps.trust_domain.clone());
    let rejected = |reason| Error::PeerRejected {
        peer: peer_label.to_owned(),
        reason,
    };
    let v = tls::check_peer_chain(certs, &deps.bundles, &expected).map_err(rejected)?;
    let name = node_name_of(&v.spiffe_id, &deps.trust_domain)
        .ok_or_else(|| rejected(AuthFailure::WrongSpiffeId))?;
    let node = deps
        .directory
        .node_by_name(&name)
        .ok_or(Error::UnknownNode(name))?;
    Ok((node, v))
}

fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

async fn handle(
    tcp: TcpStream,
    expected: ExpectedPeer,
    cfg: &ServerConfig,
    deps: &Deps,
    stats: &ServerStats,
    unauthenticated: (SourceSlot, OwnedSemaphorePermit),
) -> Result<(), Error> {
    let deadline = Instant::now() + cfg.channel.handshake_timeout;
    let _ = tcp.set_nodelay(true);
    let peer_label = tcp
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "unknown".into());
    let config = tls::server_config(&cfg.tls, &deps.creds, &deps.bundles, expected)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let stream = match timeout_at(deadline, acceptor.accept(tcp)).await {
        Err(_) => {
            stats.handshake_timeouts.fetch_add(1, Ordering::Relaxed);
            return Err(Error::Timeout {
                peer: peer_label,
                stage: "tls handshake",
            });
        }
        Ok(Err(e)) => {
            stats.tls_failures.fetch_add(1, Ordering::Relaxed);
            if let Some(reason) = tls::rejection_reason(&e) {
                stats.count_rejected(reason);
                return Err(Error::PeerRejected {
                    peer: peer_label,
                    reason,
                });
            }
            return Err(Error::Io {
                peer: peer_label,
                source: e,
            });
        }
        Ok(Ok(s)) => s,
    };
    // The verifier accepted the chain: the node it names, then the node handshake.
    let result = async {
        let (node, peer_svid) = named_node(stream.get_ref().1, deps, &peer_label)?;
        channel::establish(stream, node, peer_svid, &cfg.channel, deps, deadline).await
    }
    .await;
    let (channel, keys) = match result {
        Ok(x) => x,
        Err(e) => {
            stats
                .node_handshake_failures
                .fetch_add(1, Ordering::Relaxed);
            return Err(e);
        }
    };
    drop(unauthenticated);
    stats.established.fetch_add(1, Ordering::Relaxed);
    channel::await_publication(
        &deps.published,
        &keys.peer_node,
        &keys.peer_wg_key,
        channel::PUBLICATION_WAIT,
    )
    .await;
    tracing::info!(
        peer = %channel.peer().name,
        group = ?channel.negotiated_group(),
        epoch = keys.epoch,
        "control channel established (accepted)"
    );
    if deps
        .events
        .send(ChannelEvent::Established { channel, keys })
        .await
        .is_err()
    {
        tracing::warn!("daemon stopped listening for control channels");
    }
    Ok(())
}
