//! mesh: runs mutual authentication for this node — the control channels to peer agents, the
//! node handshake whose exporter-derived PSK keys the WireGuard tunnel, and the workload
//! handshakes whose results are the datapath's auth entries.
//!
//! It drives the sans-IO pieces of [`crate::auth`] from four inputs (cluster state, SVID
//! snapshots, the compiled policy, channel events) and produces three outputs: peer keys for the
//! tunnel (a watch channel the daemon applies), auth-map writes and deletes (it owns the
//! `VEIL_AUTH` map), and status for `veil status`.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use tokio::time::Instant;

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, watch};
use veil_common::maps::{policy_flags, AuthKey, PolicyEntry, PolicyKey};
use veil_identity::{BundleSet, IdentitySnapshot, SpiffeId, SvidKey, TrustDomain};
use veil_transport::{PresharedKey, PublicKey};

mod dial_log;
pub mod state;

pub use state::{Effect, MeshState, PeerChannel};

use crate::{
    api,
    auth::{
        self,
        channel::{
            await_publication, Channel, ChannelConfig, ChannelEvent, Deps, LocalNode,
            PublishedKeys, PUBLICATION_WAIT,
        },
        client::{self, ClientConfig},
        entries,
        node_handshake::{EpochBook, NodeKeys},
        server::{Server, ServerConfig, ServerStats},
        tls::{NodeCredentials, TlsConfig},
        workload::{Authenticated, SigningKeys},
        AuthFailure, AuthTriple, NodeInfo, PeerDirectory as _, StaticDirectory, StaticWorkloads,
    },
    cluster::ClusterState,
    datapath::auth_map::AuthMap,
};

/// The keys the tunnel must use for one peer node, from its latest node handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerKeys {
    pub public_key: PublicKey,
    pub psk: PresharedKey,
    pub epoch: u64,
}

/// `GET /v1/auth` (`veil auth list`): which auth pairs to list. Every filter given must hold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AuthQuery {
    /// Pairs with this identity on either side (a pod's: its label set's).
    pub identity: Option<u32>,
    /// Pairs whose remote identity is on this node (by id).
    pub node: Option<u32>,
    pub state: Option<PairState>,
    /// At most this many, in (local identity, remote identity, node) order.
    pub limit: Option<usize>,
}

/// Where an auth pair stands, as `veil status` counts pairs: it holds an entry
/// (`authenticated`), its last attempt failed (`failing`; an entry from an earlier success may
/// still admit it until that expires, so a pair can be both), or neither (`pending`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PairState {
    Authenticated,
    Failing,
    Pending,
}

crate::keyword_enum!(
    PairState,
    "pair state",
    Authenticated = "authenticated",
    Failing = "failing",
    Pending = "pending",
);

impl PairState {
    /// Is the pair in this state?
    pub fn holds(self, s: &entries::TripleSummary) -> bool {
        match self {
            Self::Authenticated => s.is_authenticated,
            Self::Failing => s.is_failing,
            Self::Pending => !s.is_authenticated && !s.is_failing,
        }
    }
}

impl AuthQuery {
    pub fn matches(&self, s: &entries::TripleSummary) -> bool {
        let t = &s.triple;
        self.identity
            .is_none_or(|i| t.local_identity == i || t.remote_identity == i)
            && self.node.is_none_or(|n| t.remote_node == n)
            && self.state.is_none_or(|st| st.holds(s))
    }
}

/// A query and where its answer goes (the mesh loop answers from its own table).
pub type AuthQueryRequest = (AuthQuery, tokio::sync::oneshot::Sender<api::AuthPairList>);

/// Settings of the mesh component.
#[derive(Clone, Debug)]
pub struct MeshConfig {
    pub node: String,
    pub node_id: u32,
    pub trust_domain: TrustDomain,
    pub underlay_ip: IpAddr,
    pub port: u16,
    /// Offer plain X25519 besides X25519MLKEM768.
    pub allow_classical: bool,
    /// PSK rotation interval (new node handshake per peer).
    pub rekey_interval: Duration,
}

/// A workload handshake this node started: the triple, when it started (revocations after
/// that win, `AuthTable::on_authenticated`), and its outcome.
type HandshakeResult = (AuthTriple, Instant, Result<Authenticated, AuthFailure>);

/// What `veil status` shows about the mesh.
#[derive(Clone, Debug, Default)]
pub struct MeshStatus {
    pub channels: Vec<api::NodeChannel>,
    /// The first [`MeshState::AUTH_PAIRS_LISTED`] auth pairs.
    pub auth: Vec<api::AuthPair>,
    /// All auth pairs, counted.
    pub auth_pairs: api::AuthPairCounts,
    /// Authentication failures by reason (node and workload handshakes).
    pub failures: BTreeMap<String, u64>,
    pub handshakes_ok: u64,
    /// Why the last node handshake with a node (by id) failed, until one succeeds: flows
    /// dropped for lack of a key to that node carry it.
    pub node_failures: BTreeMap<u32, &'static str>,
    /// Why the last workload handshake of an identity pair failed, until one succeeds: flows
    /// dropped for lack of authentication carry it.
    pub pair_failures: BTreeMap<AuthTriple, &'static str>,
    /// The control-channel listener's counters, live (read when `veil status` asks).
    pub listener: Arc<ServerStats>,
}

impl MeshStatus {
    /// The specific authentication failure behind a `no-key` / `auth-required` drop of a flow
    /// between `local_identity` here and `remote_identity` on node `remote_node`, if known.
    pub fn failure_for(
        &self,
        local_identity: u32,
        remote_identity: u32,
        remote_node: u32,
    ) -> Option<&'static str> {
        self.pair_failures
            .get(&AuthTriple {
                local_identity,
                remote_identity,
                remote_node,
            })
            .or_else(|| self.node_failures.get(&remote_node))
            .copied()
    }
}

/// How long auth entries left by an earlier run of the agent stay without re-authentication.
pub const ADOPTED_ENTRY_GRACE: Duration = Duration::from_secs(5);

/// The mesh's part of `veil status` is rebuilt after a turn that may have changed it, at most
/// once per this many times the last build took (building it scales with the auth pairs: a
/// 100,000-pair table costs milliseconds, and a thousand silent peers' redials wake the loop
/// tens of times a second), so it costs at most 1/STATUS_COST_SHARE of the loop; and never
/// staler than STATUS_MAX_AGE.
const STATUS_COST_SHARE: u32 = 20;
const STATUS_MAX_AGE: Duration = Duration::from_secs(2);

/// The running mesh component.
pub struct Mesh {
    cfg: MeshConfig,
    deps: Deps,
    server_cfg: ServerConfig,
    client_cfg: ClientConfig,
    directory: Arc<ArcSwap<StaticDirectory>>,
    workloads: Arc<ArcSwap<StaticWorkloads>>,
    events_rx: mpsc::Receiver<ChannelEvent>,
    auth_map: AuthMap,
    keys_tx: watch::Sender<BTreeMap<String, PeerKeys>>,
    status: Arc<Mutex<MeshStatus>>,
    requests_rx: mpsc::Receiver<AuthTriple>,
    queries_rx: mpsc::Receiver<AuthQueryRequest>,
    rehandshake_rx: mpsc::Receiver<()>,
    authed: BTreeSet<AuthTriple>,
    authed_tx: watch::Sender<BTreeSet<AuthTriple>>,
    /// Published node keys as this turn's cluster state has them (handshakes that claim a key
    /// not read yet wait on it: `auth::channel::await_publication`).
    published_tx: watch::Sender<PublishedKeys>,
    /// Auth entries the map refused since its last accepted write (logged when it starts and
    /// when it ends, not per entry).
    auth_writes_refused: u64,
    /// Counters of every listener this mesh binds.
    listener_stats: Arc<ServerStats>,
}

/// Handles the daemon keeps.
pub struct MeshHandles {
    pub keys: watch::Receiver<BTreeMap<String, PeerKeys>>,
    pub status: Arc<Mutex<MeshStatus>>,
    /// Ask for a pair to be authenticated now (a held flow is waiting).
    pub requests: mpsc::Sender<AuthTriple>,
    /// Pairs with an auth entry in the map, updated on every write and delete.
    pub authenticated: watch::Receiver<BTreeSet<AuthTriple>>,
    /// The node's WireGuard public key as node handshakes announce it.
    pub wg_key: Arc<ArcSwap<PublicKey>>,
    /// Re-run every node handshake now (the static key rotated: peers must learn the new one).
    pub rehandshake: mpsc::Sender<()>,
    /// `veil auth list`: the auth pairs matching a query, from the whole table (`veil status`
    /// lists only the first [`MeshState::AUTH_PAIRS_LISTED`]).
    pub queries: mpsc::Sender<AuthQueryRequest>,
}

impl Mesh {
    pub fn new(cfg: MeshConfig, auth_map: AuthMap, wg_key: PublicKey) -> (Mesh, MeshHandles) {
        let _ = auth::tls::install_default_provider();
        let (events_tx, events_rx) = mpsc::channel(1024);
        let (published_tx, published) = watch::channel(PublishedKeys::new());
        let directory = Arc::new(ArcSwap::from_pointee(StaticDirectory::new()));
        let workloads = Arc::new(ArcSwap::from_pointee(StaticWorkloads::default()));
        let tls = TlsConfig {
            allow_classical: cfg.allow_classical,
        };
        let deps = Deps {
            local: LocalNode {
                name: cfg.node.clone(),
                id: cfg.node_id,
            },
            trust_domain: cfg.trust_domain.clone(),
            creds: NodeCredentials::new(),
            bundles: BundleSet::new(),
            directory: directory.clone(),
            workloads: workloads.clone(),
            wg_key: Arc::new(ArcSwap::from_pointee(wg_key)),
            epochs: Arc::new(EpochBook::new()),
            signing_keys: Arc::new(SigningKeys::new()),
            events: events_tx,
            published,
        };
        let server_cfg = ServerConfig {
            listen: std::net::SocketAddr::new(cfg.underlay_ip, cfg.port),
            tls: tls.clone(),
            channel: ChannelConfig::default(),
            ..ServerConfig::default()
        };
        let client_cfg = ClientConfig {
            tls,
            channel: ChannelConfig::default(),
            port: cfg.port,
            bind: Some(cfg.underlay_ip),
        };
        let (keys_tx, keys) = watch::channel(BTreeMap::new());
        let (requests, requests_rx) = mpsc::channel(4096);
        let (rehandshake, rehandshake_rx) = mpsc::channel(4);
        let (queries, queries_rx) = mpsc::channel(16);
        let wg_key = deps.wg_key.clone();
        let (authed_tx, authenticated) = watch::channel(BTreeSet::new());
        let status = Arc::new(Mutex::new(MeshStatus::default()));
        let listener_stats = status.lock().expect("mesh status lock").listener.clone();
        let mesh = Mesh {
            cfg,
            deps,
            server_cfg,
            client_cfg,
            directory,
            workloads,
            events_rx,
            auth_map,
            keys_tx,
            status: status.clone(),
            requests_rx,
            queries_rx,
            rehandshake_rx,
            authed: BTreeSet::new(),
            authed_tx,
            published_tx,
            auth_writes_refused: 0,
            listener_stats,
        };
        (
            mesh,
            MeshHandles {
                keys,
                status,
                requests,
                authenticated,
                wg_key,
                rehandshake,
                queries,
            },
        )
    }

    /// Runs until `shutdown` resolves: feeds every input to the [`MeshState`] and carries
    /// out its effects.
    pub async fn run(
        mut self,
        mut cluster_rx: watch::Receiver<Arc<ClusterState>>,
        mut ids_rx: watch::Receiver<IdentitySnapshot>,
        mut policy_rx: watch::Receiver<Arc<BTreeMap<PolicyKey, PolicyEntry>>>,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        let mut state: MeshState<Channel> = MeshState::new(
            self.cfg.node.clone(),
            self.cfg.node_id,
            self.cfg.rekey_interval,
        );
        let (dial_tx, mut dial_rx) = mpsc::channel::<DialOutcome>(64);
        let (result_tx, mut result_rx) = mpsc::channel::<HandshakeResult>(4096);
        // The running server's stop: dropped when this node's underlay address changes (the
        // listener is bound to it) and at shutdown.
        let mut server_stop: Option<tokio::sync::oneshot::Sender<()>> = None;
        let mut node_serial: Option<String> = None;
        let mut held_bundles: Option<Arc<veil_identity::Bundles>> = None;
        let mut seen_cluster: Option<Arc<ClusterState>> = None;
        let mut seen_placement: Option<Placement> = None;
        let mut seen_policy: Option<Arc<BTreeMap<PolicyKey, PolicyEntry>>> = None;
        let mut peers: Vec<NodeInfo> = Vec::new();
        let mut status_at = Instant::now();
        let mut status_every = Duration::ZERO;
        // Peers whose last dial failed, with why and since when (what is logged: `dial_log`).
        let mut dial_log = dial_log::DialLog::default();
        // Entries an earlier run of this agent left in the pinned map: they keep admitting
        // their flows while this run re-authenticates (pre-auth runs as soon as channels are
        // up), and whatever this run has not re-written by the deadline is deleted — so a
        // revocation during an agent restart takes effect within the same bound.
        let mut adopted: Vec<AuthKey> = self.auth_map.keys();
        let adopted_until = Instant::now() + ADOPTED_ENTRY_GRACE;
        if !adopted.is_empty() {
            tracing::info!(
                entries = adopted.len(),
                "adopted auth entries of the previous run until re-authenticated"
            );
        }

        loop {
            let now = Instant::now();
            if !adopted.is_empty() && now >= adopted_until {
                let mine: BTreeSet<AuthKey> = self.authed.iter().map(|t| t.to_key()).collect();
                let stale: Vec<AuthKey> = adopted.drain(..).filter(|k| !mine.contains(k)).collect();
                for k in &stale {
                    self.auth_map.delete(k);
                }
                tracing::info!(
                    removed = stale.len(),
                    "adopted auth entries not re-authenticated removed"
                );
            }
            // Inputs are read fresh each turn; they are cheap clones of Arcs.
            let cluster = cluster_rx.borrow_and_update().clone();
            let snapshot = ids_rx.borrow_and_update().clone();
            let policy = policy_rx.borrow_and_update().clone();

            // Identities: node SVID for TLS, bundles for verification, workload SVIDs by identity.
            if let Some(node_svid) = &snapshot.node {
                if node_serial.as_deref() != Some(node_svid.serial()) {
                    if let Err(e) = self.deps.creds.set(node_svid.clone()) {
                        tracing::warn!(error = %crate::error_chain(&e), "node svid unusable for tls");
                    } else {
                        if node_serial.is_some() {
                            tracing::info!(
                                serial = node_svid.serial(),
                                "node svid rotated: re-running node handshakes"
                            );
                            state.rehandshake_all(now);
                        }
                        node_serial = Some(node_svid.serial().to_string());
                    }
                }
            }
            self.deps.bundles.replace((*snapshot.bundles).clone());
            let bundles_changed = held_bundles
                .as_ref()
                .is_some_and(|b| !Arc::ptr_eq(b, &snapshot.bundles) && **b != *snapshot.bundles);
            held_bundles = Some(snapshot.bundles.clone());
            let mut effects = Vec::new();
            if bundles_changed {
                effects.extend(state.on_bundles_changed(&self.deps.bundles, SystemTime::now()));
            }
            let (workloads, ids_now) = local_workloads(&cluster, &self.cfg.node, &snapshot);
            effects.extend(state.on_local_workloads(&workloads, ids_now, now));
            self.workloads.store(Arc::new(workloads));
            // What only a new cluster snapshot can change: the directory, the peers and the
            // published keys. Rebuilt per snapshot, not per turn: a turn follows every dial,
            // handshake and timer, and these scale with the cluster.
            let cluster_changed = !seen_cluster
                .as_ref()
                .is_some_and(|c| Arc::ptr_eq(c, &cluster));
            // And of those, only a change of where identities run (or of the nodes) changes
            // the directory and the triples to pre-authenticate: a pod added beside others of
            // its identity does not rebuild either (each is O(endpoints)).
            let mut placement_changed = false;
            if cluster_changed {
                let placement = Placement::of(&cluster);
                placement_changed = seen_placement.as_ref() != Some(&placement);
                if placement_changed {
                    let dir = directory(&cluster, &self.cfg.trust_domain);
                    peers = cluster
                        .nodes
                        .iter()
                        .filter(|n| n.name != self.cfg.node)
                        .filter_map(|n| dir.node_by_name(&n.name))
                        .collect();
                    self.directory.store(Arc::new(dir));
                    seen_placement = Some(placement);
                }
                let me_moved = self.follow_own_address(&cluster);
                if me_moved {
                    server_stop = None;
                }
                let fx = state.on_addresses(&peers, me_moved);
                self.apply(fx, &mut state, &dial_tx, &result_tx);
                let published = published_keys(&cluster);
                self.published_tx.send_if_modified(|p| {
                    let changed = *p != published;
                    *p = published;
                    changed
                });
                seen_cluster = Some(cluster.clone());
            }

            // The server needs a node SVID before it can answer TLS.
            if server_stop.is_none() && self.deps.creds.svid().is_some() {
                match Server::bind(self.server_cfg.clone(), self.deps.clone()).await {
                    Ok(server) => {
                        let server = server.counting_into(self.listener_stats.clone());
                        tracing::info!(listen = %self.server_cfg.listen, "control channel listening (TLS 1.3, X25519MLKEM768)");
                        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
                        tokio::spawn(server.run(async move {
                            let _ = stopped.await;
                        }));
                        server_stop = Some(stop);
                    }
                    Err(e) => {
                        tracing::warn!(error = %crate::error_chain(&e), "cannot listen for peers; retrying")
                    }
                }
            }

            // What policy and placement make possible: pre-authenticate all of it. Only a new
            // cluster snapshot or policy changes it.
            let policy_changed = !seen_policy
                .as_ref()
                .is_some_and(|p| Arc::ptr_eq(p, &policy));
            let desired = (placement_changed || policy_changed).then(|| {
                seen_policy = Some(policy.clone());
                desired_triples(&cluster, &self.cfg.node, &policy)
            });
            let can_dial = self.deps.creds.svid().is_some();
            effects.extend(state.poll(&peers, can_dial, desired, now));
            self.apply(effects, &mut state, &dial_tx, &result_tx);
            let _ = self.keys_tx.send_if_modified(|k| {
                if k != state.keys() {
                    *k = state.keys().clone();
                    true
                } else {
                    false
                }
            });

            // Sleep until the next deadline or input.
            let next = [
                state.deadline(),
                (!adopted.is_empty()).then_some(adopted_until),
            ]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(now + Duration::from_secs(5))
            .max(now + Duration::from_millis(5));
            // `veil status`'s view: every turn may have changed it; rebuilt now, or (while
            // rebuilding often would cost more than its share) woken up for when it is due.
            let status_due = status_at + status_every;
            let next = if status_due <= now {
                let t = Instant::now();
                let mut st = state.status(&cluster);
                st.listener = self.listener_stats.clone();
                *self.status.lock().expect("mesh status lock") = st;
                status_at = now;
                status_every = (t.elapsed() * STATUS_COST_SHARE).min(STATUS_MAX_AGE);
                next
            } else {
                next.min(status_due)
            };
            tokio::select! {
                _ = &mut shutdown => break,
                _ = tokio::time::sleep_until(next) => {}
                r = cluster_rx.changed() => if r.is_err() { break },
                r = ids_rx.changed() => if r.is_err() { break },
                r = policy_rx.changed() => if r.is_err() { break },
                Some((id, r)) = dial_rx.recv() => {
                    let r = r.map_err(|f| {
                        let (peer, reason, error) = (&f.peer, f.failure.as_str(), &f.detail);
                        match dial_log.on_failure(id, f.failure, Instant::now()) {
                            dial_log::Log::NotReachableYet => tracing::info!(%peer, reason, %error, warn_after_s = dial_log::UNREACHABLE_WARN_AFTER.as_secs(), "node handshake: peer not reachable yet; redialling with backoff (warned about if it lasts warn_after_s)"),
                            dial_log::Log::Failed => tracing::warn!(%peer, reason, %error, "node handshake failed; redialling with backoff (the same failure again is logged at debug)"),
                            _ => tracing::debug!(%peer, reason, %error, "node handshake failed again"),
                        }
                        f.failure
                    });
                    if r.is_ok() {
                        if let dial_log::Log::Recovered(f) = dial_log.on_success(id) {
                            tracing::info!(node_id = id, after = f.as_str(), "node handshake succeeded after failing");
                        }
                    }
                    let published = r
                        .as_ref()
                        .ok()
                        .and_then(|(_, nk)| cluster.node(&nk.peer_node))
                        .and_then(node_published_keys);
                    let fx = state.on_dial_outcome(
                        id,
                        r,
                        published.as_deref(),
                        &self.deps.wg_key.load(),
                        Instant::now(),
                        SystemTime::now(),
                        rand::random(),
                    );
                    self.apply(fx, &mut state, &dial_tx, &result_tx);
                }
                Some(ev) = self.events_rx.recv() => match ev {
                    ChannelEvent::Established { channel, keys: nk } => {
                        let published = cluster.node(&nk.peer_node).and_then(node_published_keys);
                        let fx = state.on_established(
                            channel,
                            nk,
                            published.as_deref(),
                            &self.deps.wg_key.load(),
                            Instant::now(),
                            SystemTime::now(),
                        );
                        self.apply(fx, &mut state, &dial_tx, &result_tx);
                    }
                    ChannelEvent::Inbound { result, triple, at, .. } => {
                        state.on_inbound(result, triple, at, Instant::now(), SystemTime::now());
                    }
                    ChannelEvent::RemoteRevoked { peer_node, spiffe_id } => {
                        state.on_remote_revoked(peer_node, &spiffe_id, Instant::now());
                    }
                    ChannelEvent::RekeyRequested { peer_node } => {
                        state.on_rekey_requested(peer_node, Instant::now());
                    }
                    ChannelEvent::Closed { peer_node, reason } => state.on_closed(peer_node, &reason),
                },
                Some(t) = self.requests_rx.recv() => state.on_request(t, Instant::now()),
                Some((q, reply)) = self.queries_rx.recv() => {
                    let _ = reply.send(state.auth_pairs(&cluster, &q));
                }
                Some(()) = self.rehandshake_rx.recv() => {
                    tracing::info!(channels = state.channels().count(), "node key rotated: re-running node handshakes");
                    state.rehandshake_all(Instant::now());
                }
                Some((triple, started, r)) = result_rx.recv() => {
                    let now = Instant::now();
                    tracing::debug!(?triple, took_us = now.saturating_duration_since(started).as_micros() as u64, result = r.as_ref().err().map_or("ok", |f| f.as_str()), "workload handshake finished (initiator)");
                    state.on_handshake_result(triple, started, r, now, SystemTime::now(), rand::random());
                }
            }
        }
        for c in state.channels() {
            c.close();
        }
    }

    /// Takes this node's underlay address from `cluster`: when it changed, the control channel
    /// listens and dials from the new one (true: the caller restarts the listener and closes
    /// the channels bound to the old one). An address the node does not hold yet fails to
    /// bind and is retried like any bind failure.
    fn follow_own_address(&mut self, cluster: &ClusterState) -> bool {
        let Some(now) = cluster.node(&self.cfg.node).map(|n| n.underlay_ip) else {
            return false;
        };
        if now == self.cfg.underlay_ip {
            return false;
        }
        tracing::info!(from = %self.cfg.underlay_ip, to = %now, "this node's underlay address changed: the control channel moves to it");
        self.cfg.underlay_ip = now;
        self.server_cfg.listen.set_ip(now);
        self.client_cfg.bind = Some(now);
        true
    }

    /// Carries out the state machine's effects (the only IO of the mesh besides the inputs).
    fn apply(
        &mut self,
        effects: Vec<Effect<Channel>>,
        state: &mut MeshState<Channel>,
        dials: &mpsc::Sender<DialOutcome>,
        results: &mpsc::Sender<HandshakeResult>,
    ) {
        for effect in effects {
            match effect {
                Effect::Dial(peer) => spawn_dial(&self.client_cfg, &self.deps, peer, dials.clone()),
                Effect::Close(c) => c.close(),
                Effect::Retire(c) => {
                    // In-flight workload handshakes finish on the replaced channel.
                    tokio::spawn(async move {
                        tokio::time::sleep(RETIRE_AFTER).await;
                        c.close();
                    });
                }
                Effect::SendRevoke(c, id) => {
                    tokio::spawn(async move {
                        let _ = c.send_revoke(&id).await;
                    });
                }
                Effect::RequestRekey(c) => {
                    tokio::spawn(async move {
                        let _ = c.request_rekey().await;
                    });
                }
                Effect::Authenticate {
                    triple,
                    channel,
                    started,
                } => {
                    let tx = results.clone();
                    tokio::spawn(async move {
                        let r = match channel {
                            Some(ch) => {
                                ch.authenticate(triple.local_identity, triple.remote_identity)
                                    .await
                            }
                            None => Err(AuthFailure::PeerUnreachable),
                        };
                        let _ = tx.send((triple, started, r)).await;
                    });
                }
                Effect::WriteAuth { triple, expires_at } => {
                    let now = Instant::now();
                    let boot = entries::boot_ns_at(expires_at, now, entries::boot_time_ns());
                    if let Err(e) = self.auth_map.write(triple.to_key(), boot) {
                        // Fail closed: the pair stays without an entry (its packets drop as
                        // `auth-required`), fails `auth-map-full` and is retried with backoff.
                        if self.auth_writes_refused == 0 {
                            tracing::warn!(
                                ?triple,
                                capacity = veil_common::maps::AUTH_MAX,
                                error = %crate::error_chain(&e),
                                "auth map refused an entry (full?): new authenticated pairs stay refused until entries free up"
                            );
                        }
                        self.auth_writes_refused += 1;
                        state.on_auth_write_failed(triple, now, rand::random());
                    } else {
                        if self.auth_writes_refused > 0 {
                            tracing::info!(
                                refused = self.auth_writes_refused,
                                "auth map takes entries again"
                            );
                            self.auth_writes_refused = 0;
                        }
                        if self.authed.insert(triple) {
                            let _ = self.authed_tx.send(self.authed.clone());
                        }
                    }
                }
                Effect::DeleteAuth(triple) => {
                    self.auth_map.delete(&triple.to_key());
                    if self.authed.remove(&triple) {
                        let _ = self.authed_tx.send(self.authed.clone());
                    }
                }
            }
        }
    }
}

/// How long a replaced control channel stays open for the workload handshakes still on it.
const RETIRE_AFTER: Duration = Duration::from_secs(2);

/// How long a node pair's tunnel keys may live without a fresh node handshake: a few PSK
/// rotation intervals (a missed re-key or two is tolerated; a peer whose agent is frozen, cut
/// off or evicted is not).
const KEY_MAX_ROTATIONS: u32 = 3;
/// Floor of that bound, so very short rotation intervals (lab minimum 5 s) still leave room
/// for a slow handshake.
const KEY_MIN_AGE: Duration = Duration::from_secs(30);

/// When a node pair's tunnel keys expire: never after the peer's node SVID does (the proof the
/// keys rest on), and at most a few rotation intervals after the handshake that made them.
pub fn key_deadline(
    now: Instant,
    peer_svid_valid_until: Option<Instant>,
    interval: Duration,
) -> Instant {
    let by_age = now + (interval * KEY_MAX_ROTATIONS).max(KEY_MIN_AGE);
    match peer_svid_valid_until {
        Some(t) => t.min(by_age),
        // Already expired (or unreadable): the keys are good for nothing.
        None => now,
    }
}

/// Removes the keys whose deadline passed; returns the peers that lost them.
pub fn expire_keys(
    keys: &mut BTreeMap<String, PeerKeys>,
    deadlines: &mut BTreeMap<String, Instant>,
    now: Instant,
) -> Vec<String> {
    let expired: Vec<String> = deadlines
        .iter()
        .filter(|(_, t)| **t <= now)
        .map(|(n, _)| n.clone())
        .collect();
    for n in &expired {
        deadlines.remove(n);
        keys.remove(n);
    }
    deadlines.retain(|n, _| keys.contains_key(n));
    expired
}

/// Logs a node pair's new tunnel keys: the peer, its public key and the epoch that tells one
/// PSK from the next — nothing derived from the PSK itself, not even a fingerprint (a short
/// hash of a 32-byte key in every log line is material an attacker should not be handed).
fn log_installed(nk: &NodeKeys, group: Option<&str>) {
    tracing::info!(
        peer = %nk.peer_node,
        public_key = %nk.peer_wg_key,
        epoch = nk.epoch,
        group = group.unwrap_or("?"),
        "node pair authenticated; tunnel keys installed"
    );
}

/// A node handshake claimed a WireGuard public key that another node already holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyInUse {
    /// The node that holds the key.
    pub holder: String,
}

/// Whether `node` may have its tunnel peer keyed with `claimed`, the key its node handshake
/// announced (sans-IO). Not when another node's authenticated handshake already holds it:
/// WireGuard routes by key, so the claimant would take over (or black-hole) that node's tunnel.
/// The first authenticated holder keeps its key until it leaves the cluster or loses its keys.
/// A node re-keying with its own key is not a conflict.
pub fn check_key_claim(
    keys: &BTreeMap<String, PeerKeys>,
    node: &str,
    claimed: &PublicKey,
) -> Result<(), KeyInUse> {
    match keys
        .iter()
        .find(|(holder, k)| holder.as_str() != node && k.public_key == *claimed)
    {
        Some((holder, _)) => Err(KeyInUse {
            holder: holder.clone(),
        }),
        None => Ok(()),
    }
}

/// The claimed key must be one the node published (its current or its next key), once it
/// published one (before its first publication there is nothing to compare with; uniqueness
/// still holds).
fn check_published(
    published: Option<&[PublicKey]>,
    claimed: &PublicKey,
) -> Result<(), AuthFailure> {
    match published {
        // Public keys: plain comparison.
        Some(p) if !p.contains(claimed) => Err(AuthFailure::UnpublishedWgKey),
        _ => Ok(()),
    }
}

/// A dial's end: the peer node id and its channel with the node handshake's keys, or why not.
type DialOutcome = (u32, Result<(Channel, NodeKeys), DialFailure>);

/// Why a dial failed, with the peer's name and the error for the log.
struct DialFailure {
    failure: AuthFailure,
    peer: String,
    detail: String,
}

fn spawn_dial(cfg: &ClientConfig, deps: &Deps, peer: NodeInfo, done: mpsc::Sender<DialOutcome>) {
    let (cfg, deps) = (cfg.clone(), deps.clone());
    tokio::spawn(async move {
        let r = client::connect(&cfg, &deps, &peer)
            .await
            .map_err(|e| DialFailure {
                failure: e.failure(),
                peer: peer.name.clone(),
                detail: crate::error_chain(&e),
            });
        if let Ok((_, nk)) = &r {
            await_publication(
                &deps.published,
                &nk.peer_node,
                &nk.peer_wg_key,
                PUBLICATION_WAIT,
            )
            .await;
        }
        let _ = done.send((peer.id, r)).await;
    });
}

/// Each node's published WireGuard public keys, current and next (nodes that published none
/// are left out).
fn published_keys(cluster: &ClusterState) -> PublishedKeys {
    cluster
        .nodes
        .iter()
        .filter_map(|n| Some((n.name.clone(), node_published_keys(n)?)))
        .collect()
}

/// A node's published keys, current and next; `None` before its first publication. An
/// unreadable key is not among them.
fn node_published_keys(n: &crate::cluster::Node) -> Option<Vec<PublicKey>> {
    n.wg_public_key.as_ref()?;
    Some(
        [&n.wg_public_key, &n.wg_next_public_key]
            .into_iter()
            .filter_map(|k| PublicKey::from_base64(k.as_deref()?).ok())
            .collect(),
    )
}

/// SPIFFE ID of a pod's workload: `spiffe://<td>/ns/<namespace>/sa/<service account>`.
pub fn workload_spiffe_id(td: &TrustDomain, namespace: &str, sa: &str) -> Option<SpiffeId> {
    SpiffeId::from_segments(td, &["ns", namespace, "sa", sa]).ok()
}

/// What the peer directory and the auth triples take from a cluster snapshot: its nodes, where
/// each identity runs (identity and node id of every pod on a listed node) and each identity's
/// workload (namespace and service account, its SPIFFE ID). Two snapshots with equal
/// placements have the same directory and the same triples under the same policy; making one
/// costs a pass over the pods without hashing a string per pod, where the directory hashes a
/// SPIFFE ID and a node name per pod.
#[derive(Debug)]
pub struct Placement {
    nodes: Vec<crate::cluster::Node>,
    /// Sorted, without repeats.
    pairs: Vec<(u32, u32)>,
    workloads: HashMap<u32, (String, String)>,
    /// An identity carried by pods of different workloads, or two nodes of one name (a
    /// hand-written cluster file can say either): the directory then depends on more than
    /// this holds, so such a placement equals none.
    ambiguous: bool,
}

impl Placement {
    pub fn of(cluster: &ClusterState) -> Self {
        let mut pairs = Vec::with_capacity(cluster.pods.len());
        let mut workloads: HashMap<u32, (&str, &str)> = HashMap::new();
        let mut names = std::collections::HashSet::new();
        let mut ambiguous = false;
        for n in &cluster.nodes {
            ambiguous |= !names.insert(n.name.as_str());
            for p in cluster.pods_on(&n.name) {
                pairs.push((p.identity, n.id));
                // Pods without an identity are in no directory entry, whatever their workload.
                if p.identity != 0 {
                    let w = (p.namespace.as_str(), p.service_account.as_str());
                    ambiguous |= *workloads.entry(p.identity).or_insert(w) != w;
                }
            }
        }
        pairs.sort_unstable();
        pairs.dedup();
        Self {
            nodes: cluster.nodes.clone(),
            pairs,
            workloads: workloads
                .into_iter()
                .map(|(id, (ns, sa))| (id, (ns.to_string(), sa.to_string())))
                .collect(),
            ambiguous,
        }
    }
}

impl PartialEq for Placement {
    fn eq(&self, other: &Self) -> bool {
        !self.ambiguous
            && !other.ambiguous
            && self.nodes == other.nodes
            && self.pairs == other.pairs
            && self.workloads == other.workloads
    }
}

/// The peer directory for a cluster snapshot: nodes by name, id and underlay address, and which
/// numeric identities each node's workloads (by SPIFFE ID) carry.
pub fn directory(cluster: &ClusterState, td: &TrustDomain) -> StaticDirectory {
    let mut d = StaticDirectory::new();
    for n in &cluster.nodes {
        if let Ok(spiffe_id) = auth::node_spiffe_id(td, &n.name) {
            d.add_node(NodeInfo {
                name: n.name.clone(),
                id: n.id,
                spiffe_id,
                addr: n.underlay_ip,
            });
        }
    }
    // One ID per namespace and service account, shared by the pods that carry it (100,000
    // pods over a few thousand IDs: the directory held a copy per pod and node).
    let mut ids: HashMap<(&str, &str), Option<SpiffeId>> = HashMap::new();
    for p in cluster.pods.iter() {
        if p.identity == 0 {
            continue;
        }
        let id = ids
            .entry((&p.namespace, &p.service_account))
            .or_insert_with(|| workload_spiffe_id(td, &p.namespace, &p.service_account));
        let (Some(node), Some(id)) = (cluster.node(&p.node), id.as_ref()) else {
            continue;
        };
        d.add_workload(node.id, id.clone(), p.identity);
    }
    d
}

/// Local workload SVIDs by numeric identity, from the SVID snapshot and the pods on this node.
/// Identities include the service account, so every SVID kept for one identity carries the
/// same SPIFFE ID: an identity loses its SVID (and its auth entries) exactly when no pod of
/// that SPIFFE ID on this node holds a valid one.
pub fn local_workloads(
    cluster: &ClusterState,
    me: &str,
    snapshot: &IdentitySnapshot,
) -> (StaticWorkloads, BTreeMap<u32, SpiffeId>) {
    let mut by_identity = HashMap::new();
    let mut ids = BTreeMap::new();
    for (key, svid) in snapshot.svids() {
        let SvidKey::Workload(sel) = key else {
            continue;
        };
        let value = |k: &str| {
            sel.iter()
                .filter(|s| s.kind() == "k8s")
                .find_map(|s| s.value().strip_prefix(&format!("{k}:")).map(str::to_string))
        };
        let (Some(ns), Some(name)) = (value("ns"), value("pod-name")) else {
            continue;
        };
        let Some(p) = cluster
            .pods_on(me)
            .find(|p| p.namespace == ns && p.name == name)
        else {
            continue;
        };
        if p.identity == 0 {
            continue;
        }
        // One numeric identity is one SPIFFE ID (the identity key holds the namespace and the
        // service account the ID is made of). An SVID for another ID is not this pod's
        // workload identity: peers map IDs to identities by the same rule, so admitting it
        // would vouch for the wrong workload. Fail closed and say so.
        let want = format!("/ns/{}/sa/{}", p.namespace, p.service_account);
        if svid.spiffe_id().path() != want {
            tracing::warn!(
                pod = %format!("{}/{}", p.namespace, p.name),
                svid = %svid.spiffe_id(),
                want = %want,
                "workload svid names another workload: not used for authentication"
            );
            continue;
        }
        by_identity.insert(p.identity, svid.clone());
        ids.insert(p.identity, svid.spiffe_id().clone());
    }
    (StaticWorkloads(by_identity), ids)
}

/// The (local identity, remote identity, remote node) triples that current policy and pod
/// placement make possible and that need authentication: every compiled entry with
/// AUTH_REQUIRED, expanded over the pods on other nodes it can match.
pub fn desired_triples(
    cluster: &ClusterState,
    me: &str,
    policy: &BTreeMap<PolicyKey, PolicyEntry>,
) -> BTreeSet<AuthTriple> {
    let Some(my_node) = cluster.node(me) else {
        return BTreeSet::new();
    };
    let local: BTreeSet<u32> = cluster.pods_on(me).map(|p| p.identity).collect();
    // Remote nodes by identity: each entry expands over its identity's nodes only, so the
    // cost follows the entries and the triples, not entries × pods.
    let mut remote: BTreeMap<u32, BTreeSet<u32>> = BTreeMap::new();
    for p in cluster
        .pods
        .iter()
        .filter(|p| p.node != me && p.identity != 0)
    {
        if let Some(n) = cluster.node(&p.node).filter(|n| n.id != my_node.id) {
            remote.entry(p.identity).or_default().insert(n.id);
        }
    }
    let mut out = BTreeSet::new();
    for k in policy.iter().filter_map(|(k, e)| {
        (e.flags & policy_flags::AUTH_REQUIRED != 0 && local.contains(&k.local_identity))
            .then_some(k)
    }) {
        let remotes: Box<dyn Iterator<Item = (&u32, &BTreeSet<u32>)>> =
            if k.remote_identity == veil_common::maps::identity::ANY {
                Box::new(remote.iter())
            } else {
                Box::new(remote.get_key_value(&k.remote_identity).into_iter())
            };
        for (rid, nodes) in remotes {
            for node in nodes {
                out.insert(AuthTriple {
                    local_identity: k.local_identity,
                    remote_identity: *rid,
                    remote_node: *node,
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use veil_common::maps::direction;

    use super::*;
    use crate::cluster::{Node, Pod};

    fn cluster() -> ClusterState {
        let pod = |name: &str, node: &str, id: u32| {
            Pod::for_test(
                name,
                node,
                [198, 19, if node == "a" { 1 } else { 2 }, id as u8],
                id,
            )
        };
        ClusterState {
            nodes: vec![Node::for_test("a", 1), Node::for_test("b", 2)],
            pods: crate::cluster::pod_list([
                pod("fe", "a", 256),
                pod("in", "a", 258),
                pod("be", "b", 257),
            ]),
            ..Default::default()
        }
    }

    fn entry(local: u32, remote: u32, flags: u32, dir: u8) -> (PolicyKey, PolicyEntry) {
        (
            PolicyKey::new(local, remote, 8080, 6, dir),
            PolicyEntry { flags, rule: 1 },
        )
    }

    #[test]
    fn desired_triples_follow_auth_required_entries_and_placement() {
        let c = cluster();
        // Ingress on b: backend requires auth from frontend.
        let policy = BTreeMap::from([entry(
            257,
            256,
            policy_flags::ALLOW | policy_flags::AUTH_REQUIRED,
            direction::INGRESS,
        )]);
        let on_b = desired_triples(&c, "b", &policy);
        assert_eq!(
            on_b,
            BTreeSet::from([AuthTriple {
                local_identity: 257,
                remote_identity: 256,
                remote_node: 1
            }])
        );
        // Node a has no endpoint with identity 257: nothing desired there from this entry.
        assert!(desired_triples(&c, "a", &policy).is_empty());
        // Allow without auth: nothing.
        let plain = BTreeMap::from([entry(257, 256, policy_flags::ALLOW, direction::INGRESS)]);
        assert!(desired_triples(&c, "b", &plain).is_empty());
        // Wildcard remote on a: every remote pod's identity on other nodes.
        let any = BTreeMap::from([entry(
            256,
            0,
            policy_flags::ALLOW | policy_flags::AUTH_REQUIRED,
            direction::EGRESS,
        )]);
        assert_eq!(
            desired_triples(&c, "a", &any),
            BTreeSet::from([AuthTriple {
                local_identity: 256,
                remote_identity: 257,
                remote_node: 2
            }])
        );
    }

    fn peer_keys(key: PublicKey) -> PeerKeys {
        PeerKeys {
            public_key: key,
            psk: PresharedKey::from_bytes([9; 32]),
            epoch: 1,
        }
    }

    #[test]
    fn tunnel_keys_expire_with_the_peer_svid_or_after_a_few_rotations() {
        let now = Instant::now();
        let interval = Duration::from_secs(60);
        // Bounded by age: 3 rotations.
        let far = now + Duration::from_secs(3600);
        assert_eq!(
            key_deadline(now, Some(far), interval),
            now + Duration::from_secs(180)
        );
        // Bounded by the peer's node SVID.
        let soon = now + Duration::from_secs(40);
        assert_eq!(key_deadline(now, Some(soon), interval), soon);
        // Short rotation intervals keep a floor.
        assert_eq!(
            key_deadline(now, Some(far), Duration::from_secs(5)),
            now + KEY_MIN_AGE
        );
        // An SVID already expired: the keys are dead on arrival.
        assert_eq!(key_deadline(now, None, interval), now);

        let k = veil_transport::PrivateKey::generate().public_key();
        let mut keys = BTreeMap::from([
            ("node-b".to_string(), peer_keys(k)),
            ("node-c".to_string(), peer_keys(k)),
        ]);
        let mut deadlines = BTreeMap::from([
            ("node-b".to_string(), now + Duration::from_secs(10)),
            ("node-c".to_string(), now + Duration::from_secs(100)),
        ]);
        assert!(expire_keys(&mut keys, &mut deadlines, now).is_empty());
        assert_eq!(
            expire_keys(&mut keys, &mut deadlines, now + Duration::from_secs(10)),
            vec!["node-b".to_string()]
        );
        assert!(!keys.contains_key("node-b") && keys.contains_key("node-c"));
        assert!(!deadlines.contains_key("node-b"));
    }

    #[test]
    fn a_node_must_claim_the_key_it_published() {
        let k = |b: u8| veil_transport::PrivateKey::from_bytes([b; 32]).public_key();
        assert_eq!(
            check_published(None, &k(1)),
            Ok(()),
            "nothing published yet"
        );
        assert_eq!(check_published(Some(&[k(1)]), &k(1)), Ok(()));
        assert_eq!(
            check_published(Some(&[k(1)]), &k(2)),
            Err(AuthFailure::UnpublishedWgKey)
        );
        // During a rotation: the current key and the announced next key, nothing else.
        assert_eq!(check_published(Some(&[k(1), k(2)]), &k(1)), Ok(()));
        assert_eq!(check_published(Some(&[k(1), k(2)]), &k(2)), Ok(()));
        assert_eq!(
            check_published(Some(&[k(1), k(2)]), &k(3)),
            Err(AuthFailure::UnpublishedWgKey)
        );
        // A published key that does not parse admits nothing.
        assert_eq!(
            check_published(Some(&[]), &k(1)),
            Err(AuthFailure::UnpublishedWgKey)
        );
        assert!(!AuthFailure::UnpublishedWgKey.is_identity_failure());
    }

    #[test]
    fn a_node_cannot_claim_a_key_another_node_holds() {
        let k = |b: u8| veil_transport::PrivateKey::from_bytes([b; 32]).public_key();
        let mut keys = BTreeMap::from([("a".to_string(), peer_keys(k(1)))]);
        keys.insert("b".into(), peer_keys(k(2)));
        // c claims a's key: refused, naming the holder.
        assert_eq!(
            check_key_claim(&keys, "c", &k(1)),
            Err(KeyInUse { holder: "a".into() })
        );
        // b claims a's key on a re-key: refused too.
        assert_eq!(
            check_key_claim(&keys, "b", &k(1)),
            Err(KeyInUse { holder: "a".into() })
        );
        // A re-key with its own key, a rotation to a fresh key, a new node with a fresh key.
        assert_eq!(check_key_claim(&keys, "a", &k(1)), Ok(()));
        assert_eq!(check_key_claim(&keys, "a", &k(3)), Ok(()));
        assert_eq!(check_key_claim(&keys, "c", &k(3)), Ok(()));
        // Once the holder is gone, the key is free.
        keys.remove("a");
        assert_eq!(check_key_claim(&keys, "c", &k(1)), Ok(()));
    }

    /// A `tracing` writer into a shared buffer.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn installed_keys_are_logged_without_anything_derived_from_the_psk() {
        let psk_bytes = [0x3c; 32];
        let nk = NodeKeys {
            peer_node: "node-b".into(),
            peer_wg_key: veil_transport::PrivateKey::from_bytes([1; 32]).public_key(),
            psk: PresharedKey::from_bytes(psk_bytes),
            epoch: 7,
            local_wg_key: veil_transport::PrivateKey::from_bytes([2; 32]).public_key(),
        };
        let out = Captured::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            log_installed(&nk, Some("X25519MLKEM768"));
            tracing::info!(keys = ?nk, peer = ?peer_keys(nk.peer_wg_key), "debug forms");
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert!(text.contains("epoch=7"), "{text}");
        assert!(text.contains("node-b"), "{text}");
        // The 32-bit FNV-1a fingerprint earlier versions logged, the key in hex and base64.
        let mut fnv: u32 = 0x811c_9dc5;
        for b in psk_bytes {
            fnv ^= u32::from(b);
            fnv = fnv.wrapping_mul(0x0100_0193);
        }
        let hex: String = psk_bytes.iter().map(|b| format!("{b:02x}")).collect();
        let b64 = veil_transport::PrivateKey::from_bytes(psk_bytes).to_base64();
        for secret in [
            format!("{fnv:08x}"),
            hex[..16].to_string(),
            b64[..16].to_string(),
        ] {
            assert!(!text.contains(&secret), "{secret} in {text}");
        }
        assert!(!text.contains("psk="), "{text}");
    }

    #[test]
    fn directory_maps_workloads_to_their_nodes() {
        let td = TrustDomain::new("lab.veil").unwrap();
        let d = directory(&cluster(), &td);
        use auth::PeerDirectory as _;
        let fe = workload_spiffe_id(&td, "shop", "fe").unwrap();
        assert_eq!(d.hosted_identities(1, &fe), vec![256]);
        assert!(
            d.hosted_identities(2, &fe).is_empty(),
            "node b does not host frontend"
        );
        assert_eq!(
            d.node_by_addr("198.18.0.2".parse().unwrap()).unwrap().name,
            "b"
        );
        assert_eq!(
            d.node_by_name("a").unwrap().spiffe_id.as_str(),
            "spiffe://lab.veil/veil/node/a"
        );
    }

    #[test]
    fn placement_changes_with_where_identities_run_not_with_every_pod() {
        let base = cluster();
        let with = |f: &dyn Fn(&mut Vec<Arc<Pod>>)| {
            let mut c = base.clone();
            f(Arc::make_mut(&mut c.pods));
            c
        };
        let like = |name: &str, from: &str, f: &dyn Fn(&mut Pod)| {
            let mut p = (**base.pods.iter().find(|p| p.name == from).unwrap()).clone();
            p.name = name.into();
            f(&mut p);
            Arc::new(p)
        };
        let before = Placement::of(&base);
        assert_eq!(before, Placement::of(&base.clone()));
        // A second pod of be's identity on be's node: same directory, same triples.
        let same = with(&|pods| pods.push(like("be-2", "be", &|_| {})));
        assert_eq!(before, Placement::of(&same));
        let td = TrustDomain::new("lab.veil").unwrap();
        assert_eq!(directory(&base, &td), directory(&same, &td));
        // Each of these changes the directory or the triples, so the placement too.
        let on_a = with(&|pods| pods.push(like("be-2", "be", &|p| p.node = "a".into())));
        let new_identity = with(&|pods| pods.push(like("be-2", "be", &|p| p.identity = 300)));
        let gone = with(&|pods| pods.retain(|p| p.name != "be"));
        let mut moved_node = base.clone();
        moved_node.nodes[1].underlay_ip = "198.18.0.9".parse().unwrap();
        for (what, c) in [
            ("identity on another node", &on_a),
            ("new identity", &new_identity),
            ("last pod of an identity gone", &gone),
            ("node address", &moved_node),
        ] {
            assert_ne!(before, Placement::of(c), "{what}");
        }
        // One identity carried by two workloads: equal to nothing, itself included.
        let mixed =
            with(&|pods| pods.push(like("be-2", "be", &|p| p.service_account = "other".into())));
        assert_ne!(Placement::of(&mixed), Placement::of(&mixed));
        assert_ne!(directory(&base, &td), directory(&mixed, &td));
    }
}
