//! The mesh's bookkeeping as a state machine (sans-IO): which control channels exist and which
//! are being dialled, when to redial, the tunnel keys each peer's node handshake gave and when
//! they expire, the auth table, the local workload SVIDs, and the counters `veil status` shows.
//!
//! Every input is a method taking the time (`now`, and the wall clock where SVID expiry
//! matters) and, where randomness spreads retries, the jitter; every output is an [`Effect`]
//! for the IO loop in [`super::Mesh::run`] to carry out. Control channels are opaque handles
//! ([`PeerChannel`]), so a unit test drives it with no sockets and no clock.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::IpAddr,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::time::Instant;
use veil_identity::{BundleSet, SpiffeId};
use veil_transport::PublicKey;

use super::{check_key_claim, check_published, expire_keys, key_deadline, KeyInUse, PeerKeys};
use crate::{
    api,
    auth::{
        self,
        channel::Channel,
        entries::{self, Action, AuthTable, EntriesConfig},
        node_handshake::{NodeKeys, RekeyConfig, RekeySchedule},
        workload::Authenticated,
        AuthFailure, AuthTriple, NodeInfo, StaticWorkloads,
    },
    cluster::ClusterState,
};

/// At most this many pairs' last failures are kept for flow records.
const PAIR_FAILURES_MAX: usize = 65_536;

/// Redial of a peer node whose control channel failed: the n-th consecutive failure waits
/// 250 ms·2ⁿ, at most 30 s.
const REDIAL_BACKOFF: veil_common::backoff::Backoff =
    veil_common::backoff::Backoff::new(Duration::from_millis(250), Duration::from_secs(30));

/// What the state machine needs to know of a control channel.
pub trait PeerChannel: Clone {
    fn peer(&self) -> &NodeInfo;
    /// Until when the peer's node SVID (and its chain) is valid.
    fn peer_valid_until(&self) -> SystemTime;
    /// Whether the peer still validates against `bundles`.
    fn recheck(&self, bundles: &BundleSet, now: SystemTime) -> Result<(), AuthFailure>;
    fn is_closed(&self) -> bool;
    fn epoch(&self) -> u64;
    fn group(&self) -> Option<&'static str>;
    fn peer_svid_serial(&self) -> &str;
}

impl PeerChannel for Channel {
    fn peer(&self) -> &NodeInfo {
        Channel::peer(self)
    }
    fn peer_valid_until(&self) -> SystemTime {
        Channel::peer_valid_until(self)
    }
    fn recheck(&self, bundles: &BundleSet, now: SystemTime) -> Result<(), AuthFailure> {
        Channel::recheck(self, bundles, now)
    }
    fn is_closed(&self) -> bool {
        Channel::is_closed(self)
    }
    fn epoch(&self) -> u64 {
        Channel::epoch(self)
    }
    fn group(&self) -> Option<&'static str> {
        self.negotiated_group().map(|g| g.as_str())
    }
    fn peer_svid_serial(&self) -> &str {
        Channel::peer_svid_serial(self)
    }
}

/// What the IO loop must do.
#[derive(Debug)]
pub enum Effect<C> {
    /// Open a control channel to this peer and run the node handshake.
    Dial(NodeInfo),
    /// Close this channel now.
    Close(C),
    /// Close this channel once in-flight workload handshakes on it finish (it was replaced).
    Retire(C),
    /// Tell the peer that a local workload's SVID is gone.
    SendRevoke(C, SpiffeId),
    /// Ask the peer, the dialling side of the pair, to re-key.
    RequestRekey(C),
    /// Run a workload handshake on `channel` (none: the peer is unreachable) and report it to
    /// [`MeshState::on_handshake_result`] with `started`.
    Authenticate {
        triple: AuthTriple,
        channel: Option<C>,
        started: Instant,
    },
    /// Write the pair's auth entry, valid until `expires_at`.
    WriteAuth {
        triple: AuthTriple,
        expires_at: Instant,
    },
    /// Delete the pair's auth entry.
    DeleteAuth(AuthTriple),
}

struct ChannelState<C> {
    channel: C,
    established: SystemTime,
    schedule: RekeySchedule,
}

/// The mesh's state (see the module docs).
pub struct MeshState<C> {
    node: String,
    rekey_interval: Duration,
    table: AuthTable,
    channels: BTreeMap<u32, ChannelState<C>>,
    /// Peers being dialled: node id → name.
    dialing: BTreeMap<u32, String>,
    /// Earliest redial and consecutive failures, by peer node id.
    redial_at: BTreeMap<u32, (Instant, u32)>,
    /// Each peer's underlay address as last given to [`Self::on_addresses`].
    peer_addrs: HashMap<u32, IpAddr>,
    keys: BTreeMap<String, PeerKeys>,
    /// When each peer's keys expire without a fresh node handshake (`key_deadline`).
    key_deadlines: BTreeMap<String, Instant>,
    local_ids: BTreeMap<u32, SpiffeId>,
    local_serials: BTreeMap<u32, String>,
    /// Counters and last failures (the lists of `MeshStatus` are built by [`Self::status`]).
    counters: super::MeshStatus,
}

impl<C: PeerChannel> MeshState<C> {
    pub fn new(node: String, node_id: u32, rekey_interval: Duration) -> Self {
        Self {
            node,
            rekey_interval,
            table: AuthTable::new(EntriesConfig::default(), node_id),
            channels: BTreeMap::new(),
            dialing: BTreeMap::new(),
            redial_at: BTreeMap::new(),
            peer_addrs: HashMap::new(),
            keys: BTreeMap::new(),
            key_deadlines: BTreeMap::new(),
            local_ids: BTreeMap::new(),
            local_serials: BTreeMap::new(),
            counters: super::MeshStatus::default(),
        }
    }

    /// The tunnel keys each peer's latest node handshake gave.
    pub fn keys(&self) -> &BTreeMap<String, PeerKeys> {
        &self.keys
    }

    /// When the state machine next has something to do without new input.
    pub fn deadline(&self) -> Option<Instant> {
        [self.table.deadline()]
            .into_iter()
            .chain(self.channels.values().map(|c| c.schedule.deadline()))
            .chain(self.key_deadlines.values().map(|t| Some(*t)))
            .chain(self.redial_at.values().map(|(t, _)| Some(*t)))
            .flatten()
            .min()
    }

    /// Every channel, to close at shutdown.
    pub fn channels(&self) -> impl Iterator<Item = &C> {
        self.channels.values().map(|c| &c.channel)
    }

    /// This node's SVID or static key changed: every node handshake runs again.
    pub fn rehandshake_all(&mut self, now: Instant) {
        for c in self.channels.values_mut() {
            c.schedule.on_svid_rotated(now);
        }
    }

    /// The trust bundles changed (a CA prepared, activated or revoked): every open channel's
    /// peer must still validate against them, or its keys and entries go now (a node whose CA
    /// is revoked keeps no tunnel access).
    pub fn on_bundles_changed(&mut self, bundles: &BundleSet, wall: SystemTime) -> Vec<Effect<C>> {
        let failed: Vec<(u32, String, AuthFailure)> = self
            .channels
            .iter()
            .filter_map(|(id, c)| {
                c.channel
                    .recheck(bundles, wall)
                    .err()
                    .map(|r| (*id, c.channel.peer().name.clone(), r))
            })
            .collect();
        let mut out = Vec::new();
        for (id, name, reason) in failed {
            tracing::warn!(peer = %name, reason = reason.as_str(), "peer node no longer validates against the new bundles: channel closed, tunnel keys removed");
            self.count_failure(reason);
            self.node_result(id, Some(reason));
            self.keys.remove(&name);
            self.drop_node(id, &mut out);
        }
        out
    }

    /// The local workload SVIDs now (`super::local_workloads`): a revoked or removed one loses
    /// its entries here and at the peers; a rotated one re-authenticates its pairs.
    pub fn on_local_workloads(
        &mut self,
        workloads: &StaticWorkloads,
        ids_now: BTreeMap<u32, SpiffeId>,
        now: Instant,
    ) -> Vec<Effect<C>> {
        let mut out = Vec::new();
        for (identity, id) in &self.local_ids {
            if !ids_now.contains_key(identity) {
                tracing::info!(%id, "workload svid gone: removing its auth entries");
                self.table.remove_spiffe_id(id, now);
                for c in self.channels.values() {
                    out.push(Effect::SendRevoke(c.channel.clone(), id.clone()));
                }
            }
        }
        for (identity, svid) in workloads.0.iter() {
            let serial = svid.serial().to_string();
            if self
                .local_serials
                .get(identity)
                .is_some_and(|s| *s != serial)
            {
                self.table.refresh_local_identity(*identity, now);
            }
            self.local_serials.insert(*identity, serial);
        }
        // An SVID back (or new): its pairs that failed for want of it need not sit out their
        // backoff (a node whose clock was set right, a spire-agent back).
        for identity in ids_now.keys() {
            if !self.local_ids.contains_key(identity) {
                self.table.retry_local_identity(*identity, now);
            }
        }
        self.local_serials.retain(|id, _| ids_now.contains_key(id));
        self.local_ids = ids_now;
        out
    }

    /// One turn over the current peers (`can_dial`: this node has an SVID to dial with) and the
    /// pairs policy and placement make possible (pre-authenticated): dials due, peers gone,
    /// keys expired, auth table actions, re-keys.
    pub fn poll(
        &mut self,
        peers: &[NodeInfo],
        can_dial: bool,
        desired: Option<BTreeSet<AuthTriple>>,
        now: Instant,
    ) -> Vec<Effect<C>> {
        let mut out = Vec::new();
        let by_id: HashMap<u32, &NodeInfo> = peers.iter().map(|p| (p.id, p)).collect();
        if can_dial {
            for p in peers {
                let due = self.redial_at.get(&p.id).is_none_or(|(t, _)| *t <= now);
                if auth::should_dial(&self.node, &p.name)
                    && !self.channels.contains_key(&p.id)
                    && !self.dialing.contains_key(&p.id)
                    && due
                {
                    self.dialing.insert(p.id, p.name.clone());
                    out.push(Effect::Dial(p.clone()));
                }
            }
        }
        // Forget peers that left the cluster.
        let gone: Vec<u32> = self
            .channels
            .keys()
            .filter(|id| !by_id.contains_key(id))
            .copied()
            .collect();
        for id in gone {
            self.drop_node(id, &mut out);
        }
        let names: HashSet<&str> = peers.iter().map(|p| p.name.as_str()).collect();
        self.keys.retain(|name, _| names.contains(name.as_str()));
        // Tunnel keys live no longer than the peer's authentication: its node SVID's expiry,
        // or a few rotation intervals without a successful node handshake, in both roles.
        for name in expire_keys(&mut self.keys, &mut self.key_deadlines, now) {
            tracing::warn!(peer = %name, "no successful node handshake within the key lifetime (or the peer's node svid expired): tunnel keys removed");
            if let Some(id) = peers.iter().find(|p| p.name == name).map(|p| p.id) {
                self.drop_node(id, &mut out);
            }
        }
        // None: the desired set is as last time (its inputs did not change).
        if let Some(desired) = desired {
            self.table.set_desired(desired, now);
        }
        let mut unreachable = Vec::new();
        for action in self.table.poll(now) {
            out.push(match action {
                Action::Start(triple) => match self.channels.get(&triple.remote_node) {
                    Some(c) => Effect::Authenticate {
                        triple,
                        channel: Some(c.channel.clone()),
                        started: now,
                    },
                    // No control channel to that node: the attempt fails here, without a task
                    // or a turn of the loop, and waits for a channel (`install` retries it)
                    // instead of a backoff timer: a thousand unreachable nodes are a hundred
                    // thousand triples, which retried on timers kept the agent busy idle.
                    None => {
                        unreachable.push(triple);
                        continue;
                    }
                },
                Action::Write {
                    triple, expires_at, ..
                } => Effect::WriteAuth { triple, expires_at },
                Action::Delete(triple) => Effect::DeleteAuth(triple),
            });
        }
        for t in unreachable {
            self.count_failure(AuthFailure::PeerUnreachable);
            // The reason is the node's, kept once for it (a flow record falls back to it),
            // not once per pair: a thousand unreachable nodes are a hundred thousand pairs.
            self.pair_result(t, None);
            if !self.counters.node_failures.contains_key(&t.remote_node) {
                self.node_result(t.remote_node, Some(AuthFailure::PeerUnreachable));
            }
            self.table.park_unreachable(t);
        }
        for (id, c) in self.channels.iter_mut() {
            let Some(reason) = c.schedule.poll(now) else {
                continue;
            };
            let Some(peer) = by_id.get(id) else {
                continue;
            };
            if auth::should_dial(&self.node, &peer.name) {
                if !self.dialing.contains_key(id) {
                    self.dialing.insert(*id, peer.name.clone());
                    tracing::info!(peer = %peer.name, reason = reason.as_str(), "re-keying node pair");
                    out.push(Effect::Dial((*peer).clone()));
                }
            } else {
                // The dialer re-keys; ask it to.
                out.push(Effect::RequestRekey(c.channel.clone()));
            }
        }
        out
    }

    /// A dial this node started ended: a channel with the node handshake's keys, or why not.
    /// `published`: the peer's published WireGuard keys (`super::node_published_keys`);
    /// `local_wg_key`: this node's key now.
    #[allow(clippy::too_many_arguments)]
    pub fn on_dial_outcome(
        &mut self,
        id: u32,
        outcome: Result<(C, NodeKeys), AuthFailure>,
        published: Option<&[PublicKey]>,
        local_wg_key: &PublicKey,
        now: Instant,
        wall: SystemTime,
        jitter: f64,
    ) -> Vec<Effect<C>> {
        let name = self.dialing.remove(&id);
        let mut out = Vec::new();
        match outcome.and_then(|(c, nk)| self.admit_claim(c, nk, published, &mut out)) {
            Ok((channel, nk)) => {
                self.redial_at.remove(&id);
                self.counters.handshakes_ok += 1;
                self.node_result(id, None);
                self.install(local_wg_key, id, channel, nk, now, wall, &mut out);
            }
            Err(reason) => {
                let tries = self.redial_at.get(&id).map(|(_, n)| n + 1).unwrap_or(1);
                // Spread above the base ([d, 1.5d]): peers that failed together (a thousand
                // unreachable at start) redial spread out, not in waves every 30 s, and never
                // sooner than the backoff, so redials stay within peers / 30 s.
                let wait = REDIAL_BACKOFF
                    .delay(tries)
                    .mul_f64(1.0 + jitter.clamp(0.0, 1.0) * 0.5);
                self.redial_at.insert(id, (now + wait, tries));
                self.count_failure(reason);
                self.node_result(id, Some(reason));
                // The peer no longer proves its identity (revoked or expired node SVID,
                // another trust domain): its tunnel keys go now, fail closed. A network
                // failure keeps them: live WireGuard sessions carry on.
                if reason.is_identity_failure() {
                    if let Some(name) = name {
                        if self.keys.remove(&name).is_some() {
                            tracing::warn!(peer = %name, reason = reason.as_str(), "node failed re-authentication: tunnel keys removed");
                        }
                    }
                    self.drop_node(id, &mut out);
                }
                if let Some(c) = self.channels.get_mut(&id) {
                    c.schedule.on_failed(now, jitter);
                }
            }
        }
        out
    }

    /// A peer dialled this node and its node handshake completed.
    pub fn on_established(
        &mut self,
        channel: C,
        nk: NodeKeys,
        published: Option<&[PublicKey]>,
        local_wg_key: &PublicKey,
        now: Instant,
        wall: SystemTime,
    ) -> Vec<Effect<C>> {
        let id = channel.peer().id;
        let peer = nk.peer_node.clone();
        let mut out = Vec::new();
        match self.admit_claim(channel, nk, published, &mut out) {
            Ok((channel, nk)) => {
                self.counters.handshakes_ok += 1;
                self.node_result(id, None);
                self.install(local_wg_key, id, channel, nk, now, wall, &mut out);
            }
            Err(reason) => {
                // As on the dialling side: a node that fails who it must be keeps no keys,
                // channel or auth entries here; a claim of a key not yet read here keeps the
                // earlier keys until the peer's retry.
                self.count_failure(reason);
                self.node_result(id, Some(reason));
                if reason.is_identity_failure() {
                    self.keys.remove(&peer);
                    self.drop_node(id, &mut out);
                }
            }
        }
        out
    }

    /// A workload handshake a peer started here ended.
    pub fn on_inbound(
        &mut self,
        result: Result<Authenticated, AuthFailure>,
        triple: AuthTriple,
        at: Instant,
        now: Instant,
        wall: SystemTime,
    ) {
        match result {
            Ok(a) => self.on_authenticated(&a, at, now, wall),
            Err(reason) => {
                self.count_failure(reason);
                self.pair_result(triple, Some(reason));
            }
        }
    }

    /// A workload handshake this node started ended.
    pub fn on_handshake_result(
        &mut self,
        triple: AuthTriple,
        started: Instant,
        result: Result<Authenticated, AuthFailure>,
        now: Instant,
        wall: SystemTime,
        jitter: f64,
    ) {
        match result {
            Ok(a) => self.on_authenticated(&a, started, now, wall),
            Err(reason) => {
                tracing::debug!(
                    ?triple,
                    reason = reason.as_str(),
                    "workload handshake failed"
                );
                self.count_failure(reason);
                self.pair_result(triple, Some(reason));
                self.table.on_failed(triple, reason, now, jitter);
            }
        }
    }

    /// The auth map refused a triple's entry (full): the pair fails `auth-map-full` and is
    /// retried with backoff.
    pub fn on_auth_write_failed(&mut self, triple: AuthTriple, now: Instant, jitter: f64) {
        self.count_failure(AuthFailure::AuthMapFull);
        self.pair_result(triple, Some(AuthFailure::AuthMapFull));
        self.table.on_write_failed(triple, now, jitter);
    }

    /// A workload handshake succeeded, in either direction: count it, record the pair's result
    /// and install the entry.
    fn on_authenticated(&mut self, a: &Authenticated, at: Instant, now: Instant, wall: SystemTime) {
        self.counters.handshakes_ok += 1;
        self.pair_result(a.triple, None);
        self.table.on_authenticated(a, at, now, wall);
    }

    /// A peer revoked one of its workloads.
    pub fn on_remote_revoked(&mut self, peer_node: u32, spiffe_id: &SpiffeId, now: Instant) {
        tracing::info!(peer_node, %spiffe_id, "peer revoked a workload: removing entries");
        self.table
            .remove_remote_spiffe_id(peer_node, spiffe_id, now);
    }

    /// The peer (the dialling side) was asked to re-key by us, or asks us to.
    pub fn on_rekey_requested(&mut self, peer_node: u32, now: Instant) {
        if let Some(c) = self.channels.get_mut(&peer_node) {
            c.schedule.on_peer_requested(now);
        }
    }

    /// A node's underlay address changed in the cluster state. A channel runs between the
    /// addresses its two ends had when it opened, so it is closed when its peer's address is
    /// no longer the one in `peers` or, when this node itself moved (`me_moved`), whatever its
    /// peer; the peer is dialled again at once (its backoff forgotten: failures against the
    /// old address say nothing of the new one). Tunnel keys and auth entries stay: WireGuard
    /// sessions carry on from the new address, and the next node handshake renews the keys.
    pub fn on_addresses(&mut self, peers: &[NodeInfo], me_moved: bool) -> Vec<Effect<C>> {
        let now_at: HashMap<u32, IpAddr> = peers.iter().map(|p| (p.id, p.addr)).collect();
        let before = std::mem::replace(&mut self.peer_addrs, now_at);
        let now_at = &self.peer_addrs;
        let stale: Vec<u32> = self
            .channels
            .iter()
            .filter(|(id, c)| {
                me_moved || now_at.get(id).is_some_and(|a| *a != c.channel.peer().addr)
            })
            .map(|(id, _)| *id)
            .collect();
        let mut out = Vec::new();
        for id in stale {
            if let Some(c) = self.channels.remove(&id) {
                tracing::info!(peer = %c.channel.peer().name, from = %c.channel.peer().addr, to = ?now_at.get(&id), me_moved, "underlay address changed: control channel closed, redialling");
                out.push(Effect::Close(c.channel));
            }
        }
        self.redial_at
            .retain(|id, _| !me_moved && before.get(id).is_none_or(|a| now_at.get(id) == Some(a)));
        out
    }

    /// A channel closed. Only the channel in use is forgotten (a re-key closes the previous
    /// channel after installing the new one).
    pub fn on_closed(&mut self, peer_node: u32, reason: &str) {
        if self
            .channels
            .get(&peer_node)
            .is_some_and(|c| c.channel.is_closed())
        {
            tracing::info!(peer_node, %reason, "control channel closed");
            self.channels.remove(&peer_node);
        }
    }

    /// A held flow waits for this pair: authenticate it now.
    pub fn on_request(&mut self, triple: AuthTriple, now: Instant) {
        self.table.request_now(triple, now);
    }

    /// Counters, last failures, channels and auth pairs, names from `cluster`.
    pub fn status(&self, cluster: &ClusterState) -> super::MeshStatus {
        let names = Names::new(cluster);
        let mut st = self.counters.clone();
        st.channels = self
            .channels
            .iter()
            .map(|(id, c)| api::NodeChannel {
                node: names.node(*id),
                address: c.channel.peer().addr.to_string(),
                epoch: c.channel.epoch(),
                group: c.channel.group().map(str::to_string),
                established_unix: unix(c.established),
                peer_svid_serial: c.channel.peer_svid_serial().to_string(),
            })
            .collect();
        st.auth_pairs = self.table.counts();
        st.auth = self
            .table
            .first_statuses(Self::AUTH_PAIRS_LISTED)
            .iter()
            .map(|s| names.pair(s))
            .collect();
        st
    }

    /// `veil auth list`: every auth pair `q` matches (up to its limit, in triple order), and
    /// how many match.
    pub fn auth_pairs(&self, cluster: &ClusterState, q: &super::AuthQuery) -> api::AuthPairList {
        let names = Names::new(cluster);
        let (matching, listed) = self
            .table
            .select_statuses(q.limit.unwrap_or(usize::MAX), |s| q.matches(s));
        api::AuthPairList {
            node: self.node.clone(),
            matching,
            total: self.table.known(),
            pairs: listed.iter().map(|s| names.pair(s)).collect(),
        }
    }

    /// Closes the node's channel and forgets its auth state.
    fn drop_node(&mut self, id: u32, out: &mut Vec<Effect<C>>) {
        if let Some(c) = self.channels.remove(&id) {
            out.push(Effect::Close(c.channel));
        }
        self.table.remove_node(id);
    }

    /// A completed node handshake, unless its claimed key is not one the node published
    /// ([`AuthFailure::UnpublishedWgKey`]; a node that rotated its key publishes the new one
    /// first, so the retry succeeds once this node has read it) or another node holds it
    /// ([`AuthFailure::DuplicateWgKey`]). A refused channel is closed.
    fn admit_claim(
        &self,
        channel: C,
        nk: NodeKeys,
        published: Option<&[PublicKey]>,
        out: &mut Vec<Effect<C>>,
    ) -> Result<(C, NodeKeys), AuthFailure> {
        if let Err(reason) = check_published(published, &nk.peer_wg_key) {
            tracing::warn!(
                peer = %nk.peer_node,
                public_key = %nk.peer_wg_key,
                reason = reason.as_str(),
                "node claimed a wireguard key it has not published: refused"
            );
            out.push(Effect::Close(channel));
            return Err(reason);
        }
        match check_key_claim(&self.keys, &nk.peer_node, &nk.peer_wg_key) {
            Ok(()) => Ok((channel, nk)),
            Err(KeyInUse { holder }) => {
                tracing::warn!(
                    peer = %nk.peer_node,
                    holder = %holder,
                    public_key = %nk.peer_wg_key,
                    reason = AuthFailure::DuplicateWgKey.as_str(),
                    "node claimed a wireguard key another node holds: refused"
                );
                out.push(Effect::Close(channel));
                Err(AuthFailure::DuplicateWgKey)
            }
        }
    }

    /// Installs a channel (and its keys) as the one for a peer, retiring the one it replaces.
    #[allow(clippy::too_many_arguments)]
    fn install(
        &mut self,
        current_wg_key: &PublicKey,
        id: u32,
        channel: C,
        nk: NodeKeys,
        now: Instant,
        wall: SystemTime,
        out: &mut Vec<Effect<C>>,
    ) {
        let interval = self.rekey_interval;
        let valid_until = channel
            .peer_valid_until()
            .duration_since(wall)
            .ok()
            .map(|d| now + d);
        self.key_deadlines.insert(
            nk.peer_node.clone(),
            key_deadline(now, valid_until, interval),
        );
        // One schedule per peer, carried from the channel this one replaces: it remembers
        // which peer SVID the last handshake saw (see `RekeySchedule::on_established`).
        let fresh = || {
            RekeySchedule::new(RekeyConfig {
                interval,
                ..RekeyConfig::default()
            })
        };
        let mut schedule = match self.channels.get_mut(&id) {
            Some(prev) => std::mem::replace(&mut prev.schedule, fresh()),
            None => fresh(),
        };
        schedule.on_established(now, valid_until);
        // This node's static key rotated while the handshake ran: the peer now holds the old
        // key, so announce the new one at once (else the pair is cut until the next re-key).
        if nk.local_wg_key != *current_wg_key {
            tracing::info!(peer = %nk.peer_node, announced = %nk.local_wg_key, current = %current_wg_key, "node key rotated during the node handshake: re-keying");
            schedule.on_svid_rotated(now);
        }
        super::log_installed(&nk, channel.group());
        self.keys.insert(
            nk.peer_node.clone(),
            PeerKeys {
                public_key: nk.peer_wg_key,
                psk: nk.psk,
                epoch: nk.epoch,
            },
        );
        if let Some(old) = self.channels.insert(
            id,
            ChannelState {
                channel,
                established: wall,
                schedule,
            },
        ) {
            out.push(Effect::Retire(old.channel));
        }
        // Pairs with that node that failed while it had no channel need not wait out their
        // backoff.
        self.table.retry_node(id, now);
    }

    /// At most this many auth pairs are listed in `veil status` (all are counted).
    pub const AUTH_PAIRS_LISTED: usize = 256;

    fn count_failure(&mut self, reason: AuthFailure) {
        *self
            .counters
            .failures
            .entry(reason.as_str().to_string())
            .or_default() += 1;
    }

    fn node_result(&mut self, node: u32, failure: Option<AuthFailure>) {
        match failure {
            Some(r) => self.counters.node_failures.insert(node, r.as_str()),
            None => self.counters.node_failures.remove(&node),
        };
    }

    /// Remembers why a pair last failed, for flow records. Peer-driven: an authenticated peer
    /// picks the triples of its requests, so failures that say nothing about a pair we host
    /// (`not-hosted`, `rate-limited`) are not recorded, and the table is capped.
    fn pair_result(&mut self, triple: AuthTriple, failure: Option<AuthFailure>) {
        let st = &mut self.counters;
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
}

/// Node and identity names for what `veil status` and `veil auth list` show (a number that
/// cluster state does not name is shown as the number).
struct Names<'a> {
    nodes: HashMap<u32, &'a str>,
    identities: HashMap<u32, &'a crate::cluster::Identity>,
}

impl<'a> Names<'a> {
    fn new(cluster: &'a ClusterState) -> Self {
        Self {
            nodes: cluster
                .nodes
                .iter()
                .map(|n| (n.id, n.name.as_str()))
                .collect(),
            identities: cluster.identities.iter().map(|i| (i.id, i)).collect(),
        }
    }

    fn node(&self, id: u32) -> String {
        self.nodes
            .get(&id)
            .map(|n| n.to_string())
            .unwrap_or_else(|| id.to_string())
    }

    fn identity(&self, id: u32) -> String {
        self.identities
            .get(&id)
            .map(|i| {
                let labels: Vec<String> =
                    i.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                format!("{id} ({}:{})", i.namespace, labels.join(","))
            })
            .unwrap_or_else(|| id.to_string())
    }

    fn pair(&self, s: &entries::TripleStatus) -> api::AuthPair {
        api::AuthPair {
            src_identity: self.identity(s.triple.local_identity),
            dst_identity: self.identity(s.triple.remote_identity),
            node: self.node(s.triple.remote_node),
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
        }
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::{cell::Cell, net::Ipv4Addr, rc::Rc};

    use veil_identity::TrustDomain;
    use veil_transport::{PresharedKey, PrivateKey};

    use super::*;

    /// A control channel with no socket: a peer, an SVID expiry, and whether the peer still
    /// validates against the bundles.
    #[derive(Clone, Debug)]
    struct Fake {
        peer: NodeInfo,
        valid_until: SystemTime,
        trusted: Rc<Cell<bool>>,
        serial: &'static str,
    }

    impl PartialEq for Fake {
        fn eq(&self, o: &Self) -> bool {
            self.peer == o.peer && self.serial == o.serial
        }
    }

    impl PeerChannel for Fake {
        fn peer(&self) -> &NodeInfo {
            &self.peer
        }
        fn peer_valid_until(&self) -> SystemTime {
            self.valid_until
        }
        fn recheck(&self, _: &BundleSet, _: SystemTime) -> Result<(), AuthFailure> {
            if self.trusted.get() {
                Ok(())
            } else {
                Err(AuthFailure::InvalidSvid)
            }
        }
        fn is_closed(&self) -> bool {
            false
        }
        fn epoch(&self) -> u64 {
            1
        }
        fn group(&self) -> Option<&'static str> {
            Some("X25519MLKEM768")
        }
        fn peer_svid_serial(&self) -> &str {
            self.serial
        }
    }

    const HOUR: Duration = Duration::from_secs(3600);

    fn node(name: &str, id: u32) -> NodeInfo {
        let td = TrustDomain::new("lab.veil").unwrap();
        NodeInfo {
            name: name.into(),
            id,
            spiffe_id: auth::node_spiffe_id(&td, name).unwrap(),
            addr: Ipv4Addr::new(198, 18, 0, id as u8).into(),
        }
    }

    struct World {
        state: MeshState<Fake>,
        now: Instant,
        wall: SystemTime,
        local_key: PublicKey,
        b: NodeInfo,
        b_key: PublicKey,
    }

    impl World {
        /// node-a (id 1), which dials node-b (id 2).
        fn new() -> Self {
            Self {
                state: MeshState::new("node-a".into(), 1, Duration::from_secs(600)),
                now: Instant::now(),
                wall: SystemTime::now(),
                local_key: PrivateKey::generate().public_key(),
                b: node("node-b", 2),
                b_key: PrivateKey::generate().public_key(),
            }
        }

        fn channel(&self, serial: &'static str) -> Fake {
            Fake {
                peer: self.b.clone(),
                valid_until: self.wall + HOUR,
                trusted: Rc::new(Cell::new(true)),
                serial,
            }
        }

        fn keys_for(&self, peer_key: PublicKey) -> NodeKeys {
            NodeKeys {
                peer_node: "node-b".into(),
                peer_wg_key: peer_key,
                psk: PresharedKey::from_bytes([7; 32]),
                epoch: 1,
                local_wg_key: self.local_key,
            }
        }

        fn poll(&mut self, peers: &[NodeInfo]) -> Vec<Effect<Fake>> {
            self.state
                .poll(peers, true, Some(BTreeSet::new()), self.now)
        }

        fn dialled(&mut self, outcome: Result<(Fake, NodeKeys), AuthFailure>) -> Vec<Effect<Fake>> {
            let published = [self.b_key];
            self.state.on_dial_outcome(
                2,
                outcome,
                Some(&published),
                &self.local_key,
                self.now,
                self.wall,
                0.0,
            )
        }

        /// Dials node-b and completes its node handshake with `ch`.
        fn connect(&mut self, ch: Fake) {
            let b = self.b.clone();
            assert!(matches!(&self.poll(&[b])[..], [Effect::Dial(p)] if p.name == "node-b"));
            let nk = self.keys_for(self.b_key);
            assert!(self.dialled(Ok((ch, nk))).is_empty());
            assert_eq!(self.state.keys()["node-b"].public_key, self.b_key);
        }
    }

    fn closed(fx: &[Effect<Fake>]) -> Vec<&'static str> {
        fx.iter()
            .filter_map(|e| match e {
                Effect::Close(c) => Some(c.serial),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_peer_is_dialled_once_and_its_keys_installed() {
        let mut w = World::new();
        w.connect(w.channel("s1"));
        let b = w.b.clone();
        // A channel exists: no second dial.
        assert!(w.poll(&[b]).is_empty());
        let st = w.state.status(&ClusterState::default());
        assert_eq!((st.handshakes_ok, st.channels.len()), (1, 1));
        // The dialled side never dials.
        let mut m: MeshState<Fake> = MeshState::new("node-c".into(), 3, HOUR);
        assert!(m
            .poll(&[node("node-b", 2)], true, Some(BTreeSet::new()), w.now)
            .is_empty());
    }

    /// A failed dial's redial is spread by the jitter above its backoff: 250 ms · 2¹ · 1.5.
    #[test]
    fn a_redial_is_spread_above_its_backoff() {
        let mut w = World::new();
        let b = w.b.clone();
        assert!(matches!(
            &w.poll(std::slice::from_ref(&b))[..],
            [Effect::Dial(_)]
        ));
        let published = [w.b_key];
        let (local, now, wall) = (w.local_key, w.now, w.wall);
        w.state.on_dial_outcome(
            2,
            Err(AuthFailure::Timeout),
            Some(&published),
            &local,
            now,
            wall,
            1.0,
        );
        w.now += Duration::from_millis(749);
        assert!(w.poll(std::slice::from_ref(&b)).is_empty());
        w.now += Duration::from_millis(1);
        assert!(matches!(&w.poll(&[b])[..], [Effect::Dial(_)]));
    }

    /// Pairs with a node without a control channel fail as `peer-unreachable`, recorded once
    /// for the node, not per pair; a node's own, more specific, reason is kept.
    #[test]
    fn pairs_with_an_unreachable_node_carry_its_reason_stored_once() {
        let mut w = World::new();
        let desired: BTreeSet<AuthTriple> = (0..100)
            .map(|i| AuthTriple {
                local_identity: 300,
                remote_identity: 1_000 + i,
                remote_node: 2 + i % 2,
            })
            .collect();
        w.state.node_result(3, Some(AuthFailure::Timeout));
        w.state.poll(&[], true, Some(desired), w.now);
        let st = w.state.status(&ClusterState::default());
        assert!(
            st.pair_failures.is_empty(),
            "{} pairs",
            st.pair_failures.len()
        );
        assert_eq!(st.failure_for(300, 1_000, 2), Some("peer-unreachable"));
        assert_eq!(st.failure_for(300, 1_001, 3), Some("timeout"));
        assert_eq!(st.failures["peer-unreachable"], 100);
    }

    /// `veil auth list` reads the whole table, past the 256 pairs `veil status` lists: by
    /// identity (either side), peer node, state and limit, counting every match.
    #[test]
    fn auth_pairs_lists_every_pair_a_query_matches_past_the_status_list() {
        use super::super::{AuthQuery, PairState};
        let mut w = World::new();
        let triple = |i: u32| AuthTriple {
            local_identity: 300,
            remote_identity: 1_000 + i,
            remote_node: 2 + i % 2,
        };
        // 600 pairs with nodes 2 and 3, which have no channel: each fails peer-unreachable.
        w.state
            .poll(&[], true, Some((0..600).map(triple).collect()), w.now);
        // One more, authenticated (its peer asked), beyond the first 256 in triple order.
        let late = AuthTriple {
            local_identity: 301,
            ..triple(599)
        };
        let ok = Authenticated {
            triple: late,
            local_spiffe_id: SpiffeId::parse("spiffe://lab.veil/ns/shop/sa/a").unwrap(),
            remote_spiffe_id: SpiffeId::parse("spiffe://lab.veil/ns/shop/sa/b").unwrap(),
            expires: w.wall + HOUR,
        };
        let (now, wall) = (w.now, w.wall);
        w.state.on_inbound(Ok(ok), late, now, now, wall);
        let cluster = ClusterState::default();
        assert_eq!(
            w.state.status(&cluster).auth.len(),
            MeshState::<Fake>::AUTH_PAIRS_LISTED
        );
        let list = |q: AuthQuery| w.state.auth_pairs(&cluster, &q);

        let all = list(AuthQuery::default());
        assert_eq!(
            (all.node.as_str(), all.matching, all.total),
            ("node-a", 601, 601)
        );
        assert_eq!(all.pairs.len(), 601);
        let authed = list(AuthQuery {
            state: Some(PairState::Authenticated),
            ..AuthQuery::default()
        });
        assert_eq!(authed.matching, 1);
        assert_eq!(
            (
                authed.pairs[0].src_identity.as_str(),
                authed.pairs[0].dst_identity.as_str()
            ),
            ("301", "1599")
        );
        assert_eq!(authed.pairs[0].last_result.as_deref(), Some("ok"));
        assert!(authed.pairs[0].expires_unix > 0);
        let failing = list(AuthQuery {
            state: Some(PairState::Failing),
            node: Some(3),
            ..AuthQuery::default()
        });
        assert_eq!(failing.matching, 300);
        assert!(failing
            .pairs
            .iter()
            .all(|p| p.node == "3" && p.last_result.as_deref() == Some("peer-unreachable")));
        // An identity on either side; a limit cuts the list, not the count.
        let one = list(AuthQuery {
            identity: Some(1_599),
            ..AuthQuery::default()
        });
        assert_eq!(one.matching, 2);
        let limited = list(AuthQuery {
            identity: Some(300),
            limit: Some(10),
            ..AuthQuery::default()
        });
        assert_eq!((limited.matching, limited.pairs.len()), (600, 10));
        assert_eq!(limited.pairs[9].dst_identity, "1009");
        assert_eq!(
            list(AuthQuery {
                state: Some(PairState::Pending),
                ..AuthQuery::default()
            })
            .matching,
            0
        );
        // A re-authentication that fails keeps the entry until it expires: the pair is both
        // authenticated and failing, as `veil status` counts it.
        w.state
            .on_handshake_result(late, now, Err(AuthFailure::Timeout), now, wall, 0.0);
        let in_state = |state| {
            w.state
                .auth_pairs(
                    &cluster,
                    &AuthQuery {
                        identity: Some(301),
                        state: Some(state),
                        ..AuthQuery::default()
                    },
                )
                .matching
        };
        assert_eq!(
            [
                PairState::Authenticated,
                PairState::Failing,
                PairState::Pending
            ]
            .map(in_state),
            [1, 1, 0]
        );
        assert_eq!(w.state.status(&cluster).auth_pairs.failing, 601);
    }

    /// A node that moves: the channel to its old address is closed and it is dialled again at
    /// once, at its new address, its backoff forgotten; its keys stay. A channel already at
    /// the new address is kept, and this node moving closes every channel.
    #[test]
    fn a_moved_peer_is_redialled_at_its_new_address_and_its_keys_kept() {
        let mut w = World::new();
        let b = w.b.clone();
        // The serials of the channels closed when node-b is at `at` (this node moved or not).
        let addresses = |w: &mut World, at: &NodeInfo, me_moved: bool| {
            closed(&w.state.on_addresses(std::slice::from_ref(at), me_moved))
        };
        assert!(addresses(&mut w, &b, false).is_empty());
        w.connect(w.channel("s1"));
        // The same addresses again: nothing to do.
        assert!(addresses(&mut w, &b, false).is_empty());
        // A failed redial is waiting its backoff when node-b moves.
        w.state.redial_at.insert(2, (w.now + HOUR, 7));
        let moved = NodeInfo {
            addr: Ipv4Addr::new(198, 18, 0, 50).into(),
            ..b.clone()
        };
        assert_eq!(addresses(&mut w, &moved, false), ["s1"]);
        assert!(w.state.keys().contains_key("node-b"), "keys kept");
        match &w.poll(std::slice::from_ref(&moved))[..] {
            [Effect::Dial(p)] => assert_eq!(p.addr, moved.addr),
            other => panic!(
                "expected one dial to the new address, got {} effects",
                other.len()
            ),
        }
        // A channel to the new address stays when the same state is given again ...
        w.state.dialing.clear();
        w.b = moved.clone();
        w.connect(w.channel("s2"));
        assert!(addresses(&mut w, &moved, false).is_empty());
        // ... and goes when this node moves, whatever its peer.
        w.state.redial_at.insert(2, (w.now + HOUR, 7));
        assert_eq!(addresses(&mut w, &moved, true), ["s2"]);
        assert!(matches!(&w.poll(&[moved])[..], [Effect::Dial(_)]));
    }

    #[test]
    fn an_identity_failure_drops_keys_and_channel_a_network_failure_keeps_them() {
        let mut w = World::new();
        w.connect(w.channel("s1"));
        let b = w.b.clone();
        // A re-dial that fails on the network keeps the live keys and the channel.
        w.state.dialing.insert(2, "node-b".into());
        assert!(w.dialled(Err(AuthFailure::Timeout)).is_empty());
        assert!(w.state.keys().contains_key("node-b"));
        // One that fails on identity removes both.
        w.state.dialing.insert(2, "node-b".into());
        let fx = w.dialled(Err(AuthFailure::Revoked));
        assert_eq!(closed(&fx), ["s1"]);
        assert!(w.state.keys().is_empty());
        let st = w.state.status(&ClusterState::default());
        assert_eq!(st.failures["revoked"], 1);
        assert_eq!(st.node_failures[&2], "revoked");
        // The redial waits its backoff (second consecutive failure: 250 ms · 2²).
        assert!(w.poll(std::slice::from_ref(&b)).is_empty());
        w.now += Duration::from_millis(999);
        assert!(w.poll(std::slice::from_ref(&b)).is_empty());
        w.now += Duration::from_millis(1);
        assert!(matches!(&w.poll(&[b])[..], [Effect::Dial(_)]));
    }

    #[test]
    fn a_claim_of_an_unpublished_or_held_key_is_refused_and_its_channel_closed() {
        let mut w = World::new();
        w.connect(w.channel("s1"));
        // node-c claims node-b's key: refused, node-b keeps it.
        let c = Fake {
            peer: node("node-c", 3),
            ..w.channel("c1")
        };
        let nk = NodeKeys {
            peer_node: "node-c".into(),
            ..w.keys_for(w.b_key)
        };
        let published = [w.b_key];
        let fx = w
            .state
            .on_established(c, nk, Some(&published), &w.local_key, w.now, w.wall);
        assert_eq!(closed(&fx), ["c1"]);
        assert_eq!(w.state.keys().len(), 1);
        // node-b claims a key it never published: refused, its earlier keys stay (the claim
        // may be a rotation this node has not read yet).
        w.state.dialing.insert(2, "node-b".into());
        let other = PrivateKey::generate().public_key();
        let fx = w.dialled(Ok((w.channel("s2"), w.keys_for(other))));
        assert_eq!(closed(&fx), ["s2"]);
        assert_eq!(w.state.keys()["node-b"].public_key, w.b_key);
        let st = w.state.status(&ClusterState::default());
        assert_eq!(
            (
                st.failures["duplicate-wg-key"],
                st.failures["unpublished-wg-key"]
            ),
            (1, 1)
        );
    }

    #[test]
    fn a_peer_failing_new_bundles_loses_channel_and_keys() {
        let mut w = World::new();
        let ch = w.channel("s1");
        let trusted = ch.trusted.clone();
        w.connect(ch);
        assert!(w
            .state
            .on_bundles_changed(&BundleSet::new(), w.wall)
            .is_empty());
        trusted.set(false);
        let fx = w.state.on_bundles_changed(&BundleSet::new(), w.wall);
        assert_eq!(closed(&fx), ["s1"]);
        assert!(w.state.keys().is_empty());
    }

    #[test]
    fn keys_expire_with_the_peer_svid_and_a_departed_peer_is_closed() {
        let mut w = World::new();
        let ch = Fake {
            valid_until: w.wall + Duration::from_secs(60),
            ..w.channel("s1")
        };
        w.connect(ch);
        let b = w.b.clone();
        assert!(w
            .state
            .deadline()
            .is_some_and(|d| d <= w.now + Duration::from_secs(60)));
        w.now += Duration::from_secs(60);
        let fx = w.poll(&[b]);
        assert_eq!(closed(&fx), ["s1"]);
        assert!(w.state.keys().is_empty());
        // Leaving the cluster closes the channel too.
        let mut w = World::new();
        w.connect(w.channel("s1"));
        assert_eq!(closed(&w.poll(&[])), ["s1"]);
        assert!(w.state.keys().is_empty());
    }

    #[test]
    fn a_replaced_channel_is_retired_not_closed() {
        let mut w = World::new();
        w.connect(w.channel("s1"));
        w.state.dialing.insert(2, "node-b".into());
        let fx = w.dialled(Ok((w.channel("s2"), w.keys_for(w.b_key))));
        assert!(
            matches!(&fx[..], [Effect::Retire(c)] if c.serial == "s1"),
            "{fx:?}"
        );
        assert_eq!(
            w.state.channels().map(|c| c.serial).collect::<Vec<_>>(),
            ["s2"]
        );
    }
}
