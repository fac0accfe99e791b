//! mesh: runs mutual authentication for this node — the control channels to peer agents, the
//! node handshake whose exporter-derived PSK keys the WireGuard tunnel, and the workload
//! handshakes whose results are the datapath's auth entries.
//!
//! It drives the sans-IO pieces of [`crate::auth`] from four inputs (cluster state, SVID
//! snapshots, the compiled policy, channel events) and produces three outputs: peer keys for the
//! tunnel (a watch channel the daemon applies), auth-map writes and deletes (it owns the
//! `VEIL_AUTH` map), and status for `veil status`.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::time::Instant;

use arc_swap::ArcSwap;
use aya::maps::{HashMap as BpfHash, MapData};
use tokio::sync::{mpsc, watch};
use veil_common::maps::{policy_flags, AuthEntry, AuthKey, PolicyEntry, PolicyKey};
use veil_identity::{BundleSet, IdentitySnapshot, SpiffeId, SvidKey, TrustDomain};
use veil_transport::{PresharedKey, PublicKey};

use crate::{
    api,
    auth::{
        self,
        channel::{
            await_publication, Channel, ChannelConfig, ChannelEvent, Deps, LocalNode,
            PublishedKeys, PUBLICATION_WAIT,
        },
        client::{self, ClientConfig},
        entries::{self, Action, AuthTable, EntriesConfig},
        node_handshake::{EpochBook, NodeKeys, RekeyConfig, RekeySchedule},
        server::{Server, ServerConfig},
        tls::{NodeCredentials, TlsConfig},
        workload::{Authenticated, SigningKeys},
        AuthFailure, AuthTriple, NodeInfo, PeerDirectory as _, StaticDirectory, StaticWorkloads,
    },
    cluster::ClusterState,
};

/// The keys the tunnel must use for one peer node, from its latest node handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerKeys {
    pub public_key: PublicKey,
    pub psk: PresharedKey,
    pub epoch: u64,
}

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

/// At most this many pairs' last failures are kept for flow records.
const PAIR_FAILURES_MAX: usize = 65_536;

/// Redial of a peer node whose control channel failed: the n-th consecutive failure waits
/// 250 ms·2ⁿ, at most 30 s.
const REDIAL_BACKOFF: veil_common::backoff::Backoff =
    veil_common::backoff::Backoff::new(Duration::from_millis(250), Duration::from_secs(30));

/// What `veil status` shows about the mesh.
#[derive(Clone, Debug, Default)]
pub struct MeshStatus {
    pub channels: Vec<api::NodeChannel>,
    pub auth: Vec<api::AuthPair>,
    /// Authentication failures by reason (node and workload handshakes).
    pub failures: BTreeMap<String, u64>,
    pub handshakes_ok: u64,
    /// Why the last node handshake with a node (by id) failed, until one succeeds: flows
    /// dropped for lack of a key to that node carry it.
    pub node_failures: BTreeMap<u32, &'static str>,
    /// Why the last workload handshake of an identity pair failed, until one succeeds: flows
    /// dropped for lack of authentication carry it.
    pub pair_failures: BTreeMap<AuthTriple, &'static str>,
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

struct ChannelState {
    channel: Channel,
    established: SystemTime,
    schedule: RekeySchedule,
}

/// How long auth entries left by an earlier run of the agent stay without re-authentication.
pub const ADOPTED_ENTRY_GRACE: Duration = Duration::from_secs(5);

/// The running mesh component.
pub struct Mesh {
    cfg: MeshConfig,
    deps: Deps,
    server_cfg: ServerConfig,
    client_cfg: ClientConfig,
    directory: Arc<ArcSwap<StaticDirectory>>,
    workloads: Arc<ArcSwap<StaticWorkloads>>,
    events_rx: mpsc::Receiver<ChannelEvent>,
    auth_map: BpfHash<MapData, AuthKey, AuthEntry>,
    keys_tx: watch::Sender<BTreeMap<String, PeerKeys>>,
    status: Arc<Mutex<MeshStatus>>,
    requests_rx: mpsc::Receiver<AuthTriple>,
    rehandshake_rx: mpsc::Receiver<()>,
    authed: BTreeSet<AuthTriple>,
    authed_tx: watch::Sender<BTreeSet<AuthTriple>>,
    /// Published node keys as this turn's cluster state has them (handshakes that claim a key
    /// not read yet wait on it: `auth::channel::await_publication`).
    published_tx: watch::Sender<PublishedKeys>,
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
}

impl Mesh {
    pub fn new(
        cfg: MeshConfig,
        auth_map: BpfHash<MapData, AuthKey, AuthEntry>,
        wg_key: PublicKey,
    ) -> (Mesh, MeshHandles) {
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
        let wg_key = deps.wg_key.clone();
        let (authed_tx, authenticated) = watch::channel(BTreeSet::new());
        let status = Arc::new(Mutex::new(MeshStatus::default()));
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
            rehandshake_rx,
            authed: BTreeSet::new(),
            authed_tx,
            published_tx,
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
            },
        )
    }

    /// Runs until `shutdown` resolves.
    pub async fn run(
        mut self,
        mut cluster_rx: watch::Receiver<Arc<ClusterState>>,
        mut ids_rx: watch::Receiver<IdentitySnapshot>,
        mut policy_rx: watch::Receiver<Arc<BTreeMap<PolicyKey, PolicyEntry>>>,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        let mut table = AuthTable::new(EntriesConfig::default(), self.cfg.node_id);
        let mut channels: BTreeMap<u32, ChannelState> = BTreeMap::new();
        let mut dialing: BTreeSet<u32> = BTreeSet::new();
        let mut redial_at: BTreeMap<u32, (Instant, u32)> = BTreeMap::new();
        let (dial_tx, mut dial_rx) = mpsc::channel::<DialOutcome>(64);
        let (result_tx, mut result_rx) = mpsc::channel::<HandshakeResult>(4096);
        let mut keys: BTreeMap<String, PeerKeys> = BTreeMap::new();
        // When each peer's keys expire without a fresh node handshake (`key_deadline`).
        let mut key_deadlines: BTreeMap<String, Instant> = BTreeMap::new();
        let mut server_started = false;
        let mut node_serial: Option<String> = None;
        let mut held_bundles: Option<Arc<veil_identity::Bundles>> = None;
        let mut seen_cluster: Option<Arc<ClusterState>> = None;
        let mut local_ids: BTreeMap<u32, SpiffeId> = BTreeMap::new();
        let mut local_serials: BTreeMap<u32, String> = BTreeMap::new();
        // Entries an earlier run of this agent left in the pinned map: they keep admitting
        // their flows while this run re-authenticates (pre-auth runs as soon as channels are
        // up), and whatever this run has not re-written by the deadline is deleted — so a
        // revocation during an agent restart takes effect within the same bound.
        let mut adopted: Vec<AuthKey> = self.auth_map.keys().filter_map(Result::ok).collect();
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
                    let _ = self.auth_map.remove(k);
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
                            for c in channels.values_mut() {
                                c.schedule.on_svid_rotated(now);
                            }
                        }
                        node_serial = Some(node_svid.serial().to_string());
                    }
                }
            }
            self.deps.bundles.replace((*snapshot.bundles).clone());
            // Bundles changed (a CA prepared, activated or revoked): every open channel's peer
            // must still validate against them, or its keys and entries go now (security
            // issue §6: a node whose CA is revoked keeps no tunnel access).
            let bundles_changed = held_bundles
                .as_ref()
                .is_some_and(|b| !Arc::ptr_eq(b, &snapshot.bundles) && **b != *snapshot.bundles);
            held_bundles = Some(snapshot.bundles.clone());
            if bundles_changed {
                let wall = SystemTime::now();
                let failed: Vec<(u32, String, AuthFailure)> = channels
                    .iter()
                    .filter_map(|(id, c)| {
                        c.channel
                            .recheck(&self.deps.bundles, wall)
                            .err()
                            .map(|r| (*id, c.channel.peer().name.clone(), r))
                    })
                    .collect();
                for (id, name, reason) in failed {
                    tracing::warn!(peer = %name, reason = reason.as_str(), "peer node no longer validates against the new bundles: channel closed, tunnel keys removed");
                    self.count_failure(reason);
                    self.node_result(id, Some(reason));
                    keys.remove(&name);
                    if let Some(c) = channels.remove(&id) {
                        c.channel.close();
                    }
                    table.remove_node(id);
                }
            }
            let (workloads, ids_now) = local_workloads(&cluster, &self.cfg.node, &snapshot);
            // Revocation or removal of a local workload's SVID: delete its entries now and tell
            // the peers so they delete theirs.
            for (identity, id) in &local_ids {
                if !ids_now.contains_key(identity) {
                    tracing::info!(%id, "workload svid gone: removing its auth entries");
                    table.remove_spiffe_id(id, now);
                    for c in channels.values() {
                        let (ch, id) = (c.channel.clone(), id.clone());
                        tokio::spawn(async move {
                            let _ = ch.send_revoke(&id).await;
                        });
                    }
                }
            }
            // Rotation of a local workload's SVID: re-authenticate its pairs now (the entry's
            // expiry follows the new SVID).
            for (identity, svid) in workloads.0.iter() {
                let serial = svid.serial().to_string();
                if local_serials.get(identity).is_some_and(|s| *s != serial) {
                    table.refresh_local_identity(*identity, now);
                }
                local_serials.insert(*identity, serial);
            }
            local_serials.retain(|id, _| ids_now.contains_key(id));
            local_ids = ids_now;
            self.workloads.store(Arc::new(workloads));
            self.directory
                .store(Arc::new(directory(&cluster, &self.cfg.trust_domain)));
            // Only a new cluster snapshot can change the published keys.
            if !seen_cluster
                .as_ref()
                .is_some_and(|c| Arc::ptr_eq(c, &cluster))
            {
                let published = published_keys(&cluster);
                self.published_tx.send_if_modified(|p| {
                    let changed = *p != published;
                    *p = published;
                    changed
                });
                seen_cluster = Some(cluster.clone());
            }

            // The server needs a node SVID before it can answer TLS.
            if !server_started && self.deps.creds.svid().is_some() {
                match Server::bind(self.server_cfg.clone(), self.deps.clone()).await {
                    Ok(server) => {
                        tracing::info!(listen = %self.server_cfg.listen, "control channel listening (TLS 1.3, X25519MLKEM768)");
                        tokio::spawn(server.run(std::future::pending()));
                        server_started = true;
                    }
                    Err(e) => {
                        tracing::warn!(error = %crate::error_chain(&e), "cannot listen for peers; retrying")
                    }
                }
            }

            // Channels: dial every peer this node should dial that has none.
            let peers: Vec<NodeInfo> = cluster
                .nodes
                .iter()
                .filter(|n| n.name != self.cfg.node)
                .filter_map(|n| self.directory.load().node_by_name(&n.name))
                .collect();
            if self.deps.creds.svid().is_some() {
                for p in &peers {
                    let due = redial_at.get(&p.id).is_none_or(|(t, _)| *t <= now);
                    if auth::should_dial(&self.cfg.node, &p.name)
                        && !channels.contains_key(&p.id)
                        && !dialing.contains(&p.id)
                        && due
                    {
                        dialing.insert(p.id);
                        spawn_dial(&self.client_cfg, &self.deps, p.clone(), dial_tx.clone());
                    }
                }
            }
            // Forget peers that left the cluster.
            let live: BTreeSet<u32> = peers.iter().map(|p| p.id).collect();
            let gone: Vec<u32> = channels
                .keys()
                .filter(|id| !live.contains(id))
                .copied()
                .collect();
            for id in gone {
                if let Some(c) = channels.remove(&id) {
                    c.channel.close();
                }
                table.remove_node(id);
            }
            keys.retain(|name, _| peers.iter().any(|p| &p.name == name));
            // Tunnel keys live no longer than the peer's authentication: its node SVID's expiry,
            // or a few rotation intervals without a successful node handshake, in both roles.
            for name in expire_keys(&mut keys, &mut key_deadlines, now) {
                tracing::warn!(peer = %name, "no successful node handshake within the key lifetime (or the peer's node svid expired): tunnel keys removed");
                if let Some(id) = peers.iter().find(|p| p.name == name).map(|p| p.id) {
                    if let Some(c) = channels.remove(&id) {
                        c.channel.close();
                    }
                    table.remove_node(id);
                }
            }

            // What policy and placement make possible: pre-authenticate all of it.
            table.set_desired(desired_triples(&cluster, &self.cfg.node, &policy), now);

            // Due work: auth table actions and re-keys.
            for action in table.poll(now) {
                self.apply_action(action, &channels, &result_tx);
            }
            for (id, c) in channels.iter_mut() {
                if let Some(reason) = c.schedule.poll(now) {
                    let Some(peer) = peers.iter().find(|p| p.id == *id) else {
                        continue;
                    };
                    if auth::should_dial(&self.cfg.node, &peer.name) {
                        if !dialing.contains(id) {
                            tracing::info!(peer = %peer.name, reason = reason.as_str(), "re-keying node pair");
                            dialing.insert(*id);
                            spawn_dial(&self.client_cfg, &self.deps, peer.clone(), dial_tx.clone());
                        }
                    } else {
                        // The dialer re-keys; ask it to.
                        let ch = c.channel.clone();
                        tokio::spawn(async move {
                            let _ = ch.request_rekey().await;
                        });
                    }
                }
            }
            self.publish_status(&channels, &table, &cluster);
            let _ = self.keys_tx.send_if_modified(|k| {
                if *k != keys {
                    *k = keys.clone();
                    true
                } else {
                    false
                }
            });

            // Sleep until the next deadline or input.
            let next = [
                table.deadline(),
                (!adopted.is_empty()).then_some(adopted_until),
            ]
            .into_iter()
            .chain(channels.values().map(|c| c.schedule.deadline()))
            .chain(key_deadlines.values().map(|t| Some(*t)))
            .chain(redial_at.values().map(|(t, _)| Some(*t)))
            .flatten()
            .min()
            .unwrap_or(now + Duration::from_secs(5))
            .max(now + Duration::from_millis(5));
            tokio::select! {
                _ = &mut shutdown => break,
                _ = tokio::time::sleep_until(next) => {}
                r = cluster_rx.changed() => if r.is_err() { break },
                r = ids_rx.changed() => if r.is_err() { break },
                r = policy_rx.changed() => if r.is_err() { break },
                Some((id, r)) = dial_rx.recv() => {
                    dialing.remove(&id);
                    let r = r.and_then(|(channel, nk)| admit_claim(&keys, &cluster, channel, nk));
                    match r {
                        Ok((channel, nk)) => {
                            redial_at.remove(&id);
                            self.count_ok();
                            self.node_result(id, None);
                            install(self.cfg.rekey_interval, &self.deps.wg_key.load(), &mut channels, &mut keys, &mut key_deadlines, id, channel, nk);
                        }
                        Err(reason) => {
                            let tries = redial_at.get(&id).map(|(_, n)| n + 1).unwrap_or(1);
                            let backoff = REDIAL_BACKOFF.delay(tries);
                            redial_at.insert(id, (Instant::now() + backoff, tries));
                            self.count_failure(reason);
                            self.node_result(id, Some(reason));
                            // The peer no longer proves its identity (revoked or expired node
                            // SVID, another trust domain): its tunnel keys go now, fail closed.
                            // A network failure keeps them: live WireGuard sessions carry on.
                            if reason.is_identity_failure() {
                                if let Some(peer) = self.directory.load().node_by_id(id) {
                                    if keys.remove(&peer.name).is_some() {
                                        tracing::warn!(peer = %peer.name, reason = reason.as_str(), "node failed re-authentication: tunnel keys removed");
                                    }
                                }
                                if let Some(c) = channels.remove(&id) {
                                    c.channel.close();
                                }
                                table.remove_node(id);
                            }
                            if let Some(c) = channels.get_mut(&id) {
                                c.schedule.on_failed(Instant::now(), rand::random());
                            }
                        }
                    }
                }
                Some(ev) = self.events_rx.recv() => {
                    match ev {
                        ChannelEvent::Established { channel, keys: nk } => {
                            let id = channel.peer().id;
                            let peer = nk.peer_node.clone();
                            match admit_claim(&keys, &cluster, channel, nk) {
                                Ok((channel, nk)) => {
                                    self.count_ok();
                                    self.node_result(id, None);
                                    install(self.cfg.rekey_interval, &self.deps.wg_key.load(), &mut channels, &mut keys, &mut key_deadlines, id, channel, nk);
                                }
                                Err(reason) => {
                                    // As on the dialling side: a node that fails who it must be
                                    // keeps no keys, channel or auth entries here; a claim of a
                                    // key not yet read here keeps the earlier keys until the
                                    // peer's retry.
                                    self.count_failure(reason);
                                    self.node_result(id, Some(reason));
                                    if reason.is_identity_failure() {
                                        keys.remove(&peer);
                                        if let Some(c) = channels.remove(&id) {
                                            c.channel.close();
                                        }
                                        table.remove_node(id);
                                    }
                                }
                            }
                        }
                        ChannelEvent::Inbound { result, triple, at, .. } => match result {
                            Ok(a) => {
                                self.count_ok();
                                self.pair_result(a.triple, None);
                                table.on_authenticated(&a, at, Instant::now(), SystemTime::now());
                            }
                            Err(reason) => {
                                self.count_failure(reason);
                                self.pair_result(triple, Some(reason));
                            }
                        },
                        ChannelEvent::RemoteRevoked { peer_node, spiffe_id } => {
                            tracing::info!(peer_node, %spiffe_id, "peer revoked a workload: removing entries");
                            table.remove_remote_spiffe_id(peer_node, &spiffe_id, Instant::now());
                        }
                        ChannelEvent::RekeyRequested { peer_node } => {
                            if let Some(c) = channels.get_mut(&peer_node) {
                                c.schedule.on_peer_requested(Instant::now());
                            }
                        }
                        ChannelEvent::Closed { peer_node, reason } => {
                            // Only forget the channel if it is the one that closed (a re-key
                            // closes the previous channel after installing the new one).
                            if channels.get(&peer_node).is_some_and(|c| c.channel.is_closed()) {
                                tracing::info!(peer_node, %reason, "control channel closed");
                                channels.remove(&peer_node);
                            }
                        }
                    }
                }
                Some(t) = self.requests_rx.recv() => {
                    table.request_now(t, Instant::now());
                }
                Some(()) = self.rehandshake_rx.recv() => {
                    tracing::info!(channels = channels.len(), "node key rotated: re-running node handshakes");
                    for c in channels.values_mut() {
                        c.schedule.on_svid_rotated(Instant::now());
                    }
                }
                Some((triple, started, r)) = result_rx.recv() => {
                    match r {
                        Ok(a) => {
                            self.count_ok();
                            self.pair_result(a.triple, None);
                            table.on_authenticated(&a, started, Instant::now(), SystemTime::now());
                        }
                        Err(reason) => {
                            tracing::debug!(?triple, reason = reason.as_str(), "workload handshake failed");
                            self.count_failure(reason);
                            self.pair_result(triple, Some(reason));
                            table.on_failed(triple, reason, Instant::now(), rand::random());
                        }
                    }
                }
            }
        }
        for c in channels.values() {
            c.channel.close();
        }
    }

    fn apply_action(
        &mut self,
        action: Action,
        channels: &BTreeMap<u32, ChannelState>,
        results: &mpsc::Sender<HandshakeResult>,
    ) {
        match action {
            Action::Start(triple) => {
                let tx = results.clone();
                let started = Instant::now();
                match channels.get(&triple.remote_node) {
                    Some(c) => {
                        let ch = c.channel.clone();
                        tokio::spawn(async move {
                            let r = ch
                                .authenticate(triple.local_identity, triple.remote_identity)
                                .await;
                            let _ = tx.send((triple, started, r)).await;
                        });
                    }
                    None => {
                        tokio::spawn(async move {
                            let _ = tx
                                .send((triple, started, Err(AuthFailure::PeerUnreachable)))
                                .await;
                        });
                    }
                }
            }
            Action::Write {
                triple, expires_at, ..
            } => {
                let now = Instant::now();
                let boot = entries::boot_ns_at(expires_at, now, entries::boot_time_ns());
                if let Err(e) = self.auth_map.insert(
                    triple.to_key(),
                    AuthEntry {
                        expires_boot_ns: boot,
                    },
                    0,
                ) {
                    tracing::warn!(?triple, error = %e, "cannot write auth entry");
                } else if self.authed.insert(triple) {
                    let _ = self.authed_tx.send(self.authed.clone());
                }
            }
            Action::Delete(triple) => {
                let _ = self.auth_map.remove(&triple.to_key());
                if self.authed.remove(&triple) {
                    let _ = self.authed_tx.send(self.authed.clone());
                }
            }
        }
    }

    fn count_ok(&self) {
        self.status.lock().expect("mesh status lock").handshakes_ok += 1;
    }

    fn node_result(&self, node: u32, failure: Option<AuthFailure>) {
        let mut st = self.status.lock().expect("mesh status lock");
        match failure {
            Some(r) => st.node_failures.insert(node, r.as_str()),
            None => st.node_failures.remove(&node),
        };
    }

    /// Remembers why a pair last failed, for flow records. Peer-driven: an authenticated
    /// peer picks the triples of its requests, so failures that say nothing about a pair we
    /// host (`not-hosted`, `rate-limited`) are not recorded, and the table is capped.
    fn pair_result(&self, triple: AuthTriple, failure: Option<AuthFailure>) {
        let mut st = self.status.lock().expect("mesh status lock");
        match failure {
            Some(AuthFailure::NotHosted | AuthFailure::RateLimited) => {}
            Some(r) => {
                if st.pair_failures.len() < PAIR_FAILURES_MAX
                    || st.pair_failures.contains_key(&triple)
                {
                    st.pair_failures.insert(triple, r.as_str());
                }
            }
            None => {
                st.pair_failures.remove(&triple);
            }
        }
    }

    fn count_failure(&self, reason: AuthFailure) {
        *self
            .status
            .lock()
            .expect("mesh status lock")
            .failures
            .entry(reason.as_str().to_string())
            .or_default() += 1;
    }

    fn publish_status(
        &self,
        channels: &BTreeMap<u32, ChannelState>,
        table: &AuthTable,
        cluster: &ClusterState,
    ) {
        let node_name = |id: u32| {
            cluster
                .nodes
                .iter()
                .find(|n| n.id == id)
                .map(|n| n.name.clone())
                .unwrap_or_else(|| id.to_string())
        };
        let identity_name = |id: u32| {
            cluster
                .identities
                .iter()
                .find(|i| i.id == id)
                .map(|i| {
                    let labels: Vec<String> =
                        i.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    format!("{id} ({}:{})", i.namespace, labels.join(","))
                })
                .unwrap_or_else(|| id.to_string())
        };
        let mut st = self.status.lock().expect("mesh status lock");
        st.channels = channels
            .iter()
            .map(|(id, c)| api::NodeChannel {
                node: node_name(*id),
                epoch: c.channel.epoch(),
                group: c.channel.negotiated_group().map(|g| g.as_str().to_string()),
                established_unix: unix(c.established),
                peer_svid_serial: c.channel.peer_svid_serial().to_string(),
            })
            .collect();
        st.auth = table
            .statuses()
            .into_iter()
            .map(|s| api::AuthPair {
                src_identity: identity_name(s.triple.local_identity),
                dst_identity: identity_name(s.triple.remote_identity),
                node: node_name(s.triple.remote_node),
                expires_unix: s.entry.as_ref().map(|e| unix(e.expires)).unwrap_or(0),
                authenticated_unix_ms: s
                    .entry
                    .as_ref()
                    .and_then(|e| e.authenticated.duration_since(UNIX_EPOCH).ok())
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0),
                last_result: s.last_result.map(|r| match r {
                    Ok(()) => "ok".to_string(),
                    Err(f) => f.as_str().to_string(),
                }),
            })
            .collect();
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Installs a channel (and its keys) as the one for a peer, closing the one it replaces.
#[allow(clippy::too_many_arguments)]
fn install(
    interval: Duration,
    current_wg_key: &PublicKey,
    channels: &mut BTreeMap<u32, ChannelState>,
    keys: &mut BTreeMap<String, PeerKeys>,
    deadlines: &mut BTreeMap<String, Instant>,
    id: u32,
    channel: Channel,
    nk: NodeKeys,
) {
    let now = Instant::now();
    let valid_until = channel.peer_valid_until();
    let valid_until_instant = valid_until
        .duration_since(SystemTime::now())
        .ok()
        .map(|d| now + d);
    deadlines.insert(
        nk.peer_node.clone(),
        key_deadline(now, valid_until_instant, interval),
    );
    // One schedule per peer, carried from the channel this one replaces: it remembers which
    // peer SVID the last handshake saw (see `RekeySchedule::on_established`).
    let fresh = || {
        RekeySchedule::new(RekeyConfig {
            interval,
            ..RekeyConfig::default()
        })
    };
    let mut schedule = match channels.get_mut(&id) {
        Some(prev) => std::mem::replace(&mut prev.schedule, fresh()),
        None => fresh(),
    };
    schedule.on_established(now, valid_until_instant);
    // This node's static key rotated while the handshake ran: the peer now holds the old key,
    // so announce the new one at once (else the pair is cut until the next re-key).
    if nk.local_wg_key != *current_wg_key {
        tracing::info!(peer = %nk.peer_node, announced = %nk.local_wg_key, current = %current_wg_key, "node key rotated during the node handshake: re-keying");
        schedule.on_svid_rotated(now);
    }
    log_installed(&nk, channel.negotiated_group().map(|g| g.as_str()));
    keys.insert(
        nk.peer_node.clone(),
        PeerKeys {
            public_key: nk.peer_wg_key,
            psk: nk.psk,
            epoch: nk.epoch,
        },
    );
    if let Some(old) = channels.insert(
        id,
        ChannelState {
            channel,
            established: SystemTime::now(),
            schedule,
        },
    ) {
        // Keep the old channel briefly: in-flight workload handshakes finish on it.
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            old.channel.close();
        });
    }
}

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

/// A completed node handshake, unless its claimed key is in use by another node (then the
/// channel is closed and the handshake fails with [`AuthFailure::DuplicateWgKey`]) or is not
/// the key the node published in cluster state ([`AuthFailure::UnpublishedWgKey`]; a node
/// that rotated its key publishes the new one first, so the retry succeeds once this node has
/// read it).
fn admit_claim(
    keys: &BTreeMap<String, PeerKeys>,
    cluster: &ClusterState,
    channel: Channel,
    nk: NodeKeys,
) -> Result<(Channel, NodeKeys), AuthFailure> {
    let published = cluster.node(&nk.peer_node).and_then(node_published_keys);
    if let Err(reason) = check_published(published.as_deref(), &nk.peer_wg_key) {
        tracing::warn!(
            peer = %nk.peer_node,
            public_key = %nk.peer_wg_key,
            reason = reason.as_str(),
            "node claimed a wireguard key it has not published: refused"
        );
        channel.close();
        return Err(reason);
    }
    match check_key_claim(keys, &nk.peer_node, &nk.peer_wg_key) {
        Ok(()) => Ok((channel, nk)),
        Err(KeyInUse { holder }) => {
            tracing::warn!(
                peer = %nk.peer_node,
                holder = %holder,
                public_key = %nk.peer_wg_key,
                reason = AuthFailure::DuplicateWgKey.as_str(),
                "node claimed a wireguard key another node holds: refused"
            );
            channel.close();
            Err(AuthFailure::DuplicateWgKey)
        }
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
type DialOutcome = (u32, Result<(Channel, NodeKeys), AuthFailure>);

fn spawn_dial(cfg: &ClientConfig, deps: &Deps, peer: NodeInfo, done: mpsc::Sender<DialOutcome>) {
    let (cfg, deps) = (cfg.clone(), deps.clone());
    tokio::spawn(async move {
        let r = client::connect(&cfg, &deps, &peer).await.map_err(|e| {
            tracing::warn!(peer = %peer.name, reason = e.failure().as_str(), error = %crate::error_chain(&e), "node handshake failed");
            e.failure()
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
                addr: IpAddr::V4(n.underlay_ip),
            });
        }
    }
    for p in &cluster.pods {
        let (Some(node), Some(id)) = (
            cluster.node(&p.node),
            workload_spiffe_id(td, &p.namespace, &p.service_account),
        ) else {
            continue;
        };
        if p.identity != 0 {
            d.add_workload(node.id, id, p.identity);
        }
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
    let mut by_identity = std::collections::HashMap::new();
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
    let remote: Vec<(u32, u32)> = cluster
        .pods
        .iter()
        .filter(|p| p.node != me && p.identity != 0)
        .filter_map(|p| cluster.node(&p.node).map(|n| (p.identity, n.id)))
        .collect();
    let mut out = BTreeSet::new();
    for (k, e) in policy {
        if e.flags & policy_flags::AUTH_REQUIRED == 0 || !local.contains(&k.local_identity) {
            continue;
        }
        for (rid, node) in &remote {
            let matches =
                k.remote_identity == *rid || k.remote_identity == veil_common::maps::identity::ANY;
            if matches && *node != my_node.id {
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
    use std::net::Ipv4Addr;

    use veil_common::maps::direction;

    use super::*;
    use crate::cluster::{Node, Pod};

    fn cluster() -> ClusterState {
        let node = |name: &str, id: u32| Node {
            name: name.into(),
            id,
            underlay_ip: Ipv4Addr::new(198, 18, 0, id as u8),
            pod_cidr: format!("198.19.{id}.0/24"),
            wg_public_key: None,
            wg_next_public_key: None,
        };
        let pod = |name: &str, node: &str, id: u32| Pod {
            name: name.into(),
            namespace: "shop".into(),
            node: node.into(),
            ip: Ipv4Addr::new(198, 19, if node == "a" { 1 } else { 2 }, id as u8),
            labels: Default::default(),
            service_account: name.into(),
            host_veth: "x".into(),
            identity: id,
        };
        ClusterState {
            nodes: vec![node("a", 1), node("b", 2)],
            pods: vec![
                pod("fe", "a", 256),
                pod("in", "a", 258),
                pod("be", "b", 257),
            ],
            ..Default::default()
        }
    }

    fn entry(local: u32, remote: u32, flags: u32, dir: u8) -> (PolicyKey, PolicyEntry) {
        (
            PolicyKey {
                local_identity: local,
                remote_identity: remote,
                dport: 8080,
                protocol: 6,
                direction: dir,
            },
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
}
