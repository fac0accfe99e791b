//! auth: mutual authentication between node agents, bound to the WireGuard encryption.
//!
//! Owns the agent control channel (TLS 1.3 on TCP 4250, node X.509-SVIDs on both sides,
//! hybrid post-quantum key exchange), the node handshake that derives each node pair's
//! WireGuard preshared key from the TLS exporter, the workload handshake that proves two
//! workloads' X.509-SVIDs across the channel, and the auth-entry lifecycle that feeds the
//! datapath's `VEIL_AUTH` map.
//!
//! Layout: protocol logic is sans-IO ([`wire`], [`node_handshake`], [`workload`], [`entries`]);
//! [`tls`] builds rustls configs and verifiers; [`channel`], [`server`] and [`client`] are the
//! tokio shells. The cluster is seen only through [`PeerDirectory`] and local SVIDs only through
//! [`LocalWorkloads`], so nothing here knows whether the lab or Kubernetes feeds the agent.
//!
//! How the daemon drives it:
//! - node SVID updates → [`tls::NodeCredentials::set`]; bundle updates → the shared
//!   `veil_identity::BundleSet`; workload SVIDs → its [`LocalWorkloads`] implementation;
//! - [`server::Server::run`] accepts peers, [`client::connect`] dials them (the node with the
//!   smaller name dials: [`should_dial`]); both yield a [`channel::Channel`] plus the
//!   [`node_handshake::NodeKeys`] (peer WireGuard key + PSK) to install in the tunnel;
//! - [`node_handshake::RekeySchedule`] says when to re-run the node handshake;
//! - [`entries::AuthTable`] takes the desired triples and handshake results and says which
//!   handshakes to start ([`channel::Channel::authenticate`]) and which map entries to write or
//!   delete; inbound handshakes arrive as [`channel::ChannelEvent`]s.
//!
//! Must not depend on: a particular cluster-state source, the datapath map types beyond the
//! `AuthKey` triple, or any SPIRE client.

pub mod channel;
pub mod client;
pub mod entries;
pub mod node_handshake;
pub mod server;
pub mod tls;
pub mod wire;
pub mod workload;

#[cfg(test)]
mod loopback_tests;
#[cfg(test)]
pub(crate) mod testing;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use veil_identity::{SpiffeId, Svid, SvidError, TrustDomain};

/// The control channel's production port.
pub const DEFAULT_PORT: u16 = 4250;

/// Errors of the auth shells and config builders.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("tls config")]
    Tls(#[source] rustls::Error),
    #[error("no node svid yet; the control channel cannot start without one")]
    NoNodeSvid,
    #[error("node svid key is not usable for tls")]
    NodeKey(#[source] rustls::Error),
    #[error("node {0} is not in the peer directory")]
    UnknownNode(String),
    #[error("invalid node spiffe id for node {node}")]
    NodeId {
        node: String,
        #[source]
        source: veil_identity::IdError,
    },
    #[error("i/o on the control channel with {peer}")]
    Io {
        peer: String,
        #[source]
        source: std::io::Error,
    },
    #[error("peer {peer} failed node authentication: {reason}")]
    PeerRejected { peer: String, reason: AuthFailure },
    #[error("timed out during {stage} with {peer}")]
    Timeout { peer: String, stage: &'static str },
    #[error("protocol error with {peer}")]
    Wire {
        peer: String,
        #[source]
        source: wire::Error,
    },
    #[error("node handshake with {peer} failed")]
    NodeHandshake {
        peer: String,
        #[source]
        source: node_handshake::Error,
    },
    #[error("peer {peer} closed the control channel")]
    Closed { peer: String },
    #[error("binding the control channel listener on {addr}")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Why an authentication (node or workload) failed. Stable kebab-case names for `veil status`,
/// `veil observe` and metrics; stable wire codes ([`AuthFailure::code`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AuthFailure {
    /// The SVID belongs to (or chains to) a trust domain other than ours.
    WrongTrustDomain,
    /// The SVID is valid but its SPIFFE ID is not the one expected (wrong node, or a workload
    /// whose ID does not map to the numeric identity named).
    WrongSpiffeId,
    /// The SVID (or an issuer in its chain) has expired.
    ExpiredSvid,
    /// The SVID failed another X.509-SVID rule (malformed, bad signature, not yet valid, ...).
    InvalidSvid,
    /// The node answering (or asking) for a workload does not host it.
    NotHosted,
    /// The proof of possession did not verify.
    BadProof,
    /// This agent holds no SVID for the local workload of the pair.
    NoLocalSvid,
    /// No control channel to the remote node could be established.
    PeerUnreachable,
    /// The handshake did not complete in time.
    Timeout,
    /// The peer sent something the protocol does not allow.
    ProtocolError,
    /// The node's handshake claimed a WireGuard public key another authenticated node holds:
    /// refused, so no node can take over (or black-hole) another's tunnel by naming its key.
    DuplicateWgKey,
    /// The peer sent workload or re-key requests faster than a channel admits
    /// ([`channel::ChannelConfig::inbound_rate`]): refused before any certificate is parsed.
    RateLimited,
    /// The node's handshake claimed a WireGuard public key other than the one it published in
    /// cluster state. Not an identity failure: a node that just rotated its key is refused
    /// until this node reads the new publication, and its old keys stay meanwhile.
    UnpublishedWgKey,
    /// The handshake completed, but an SVID it proved was revoked while it was in flight: the
    /// result is discarded, so a revocation is never undone by a late handshake result.
    Revoked,
    /// The handshake completed, but this node's auth map refused the entry (full): the pair
    /// stays refused and is retried with backoff. Local: never sent to a peer.
    AuthMapFull,
}

impl AuthFailure {
    /// Failures that say the peer (or this node) is not who it must be, as opposed to the
    /// network being in the way: keys derived from an earlier handshake must not outlive them.
    pub const fn is_identity_failure(self) -> bool {
        !matches!(
            self,
            Self::PeerUnreachable
                | Self::Timeout
                | Self::ProtocolError
                | Self::RateLimited
                | Self::UnpublishedWgKey
                | Self::AuthMapFull
        )
    }

    pub const ALL: [AuthFailure; 15] = [
        Self::WrongTrustDomain,
        Self::WrongSpiffeId,
        Self::ExpiredSvid,
        Self::InvalidSvid,
        Self::NotHosted,
        Self::BadProof,
        Self::NoLocalSvid,
        Self::PeerUnreachable,
        Self::Timeout,
        Self::ProtocolError,
        Self::DuplicateWgKey,
        Self::RateLimited,
        Self::Revoked,
        Self::UnpublishedWgKey,
        Self::AuthMapFull,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::WrongTrustDomain => "wrong-trust-domain",
            Self::WrongSpiffeId => "wrong-spiffe-id",
            Self::ExpiredSvid => "expired-svid",
            Self::InvalidSvid => "invalid-svid",
            Self::NotHosted => "not-hosted",
            Self::BadProof => "bad-proof",
            Self::NoLocalSvid => "no-local-svid",
            Self::PeerUnreachable => "peer-unreachable",
            Self::Timeout => "timeout",
            Self::ProtocolError => "protocol-error",
            Self::DuplicateWgKey => "duplicate-wg-key",
            Self::RateLimited => "rate-limited",
            Self::Revoked => "revoked",
            Self::UnpublishedWgKey => "unpublished-wg-key",
            Self::AuthMapFull => "auth-map-full",
        }
    }

    /// Wire code; never renumber, only append.
    pub const fn code(self) -> u8 {
        match self {
            Self::WrongTrustDomain => 1,
            Self::WrongSpiffeId => 2,
            Self::ExpiredSvid => 3,
            Self::InvalidSvid => 4,
            Self::NotHosted => 5,
            Self::BadProof => 6,
            Self::NoLocalSvid => 7,
            Self::PeerUnreachable => 8,
            Self::Timeout => 9,
            Self::ProtocolError => 10,
            Self::DuplicateWgKey => 11,
            Self::RateLimited => 12,
            Self::Revoked => 13,
            Self::UnpublishedWgKey => 14,
            Self::AuthMapFull => 15,
        }
    }

    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.code() == code)
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.as_str() == name)
    }

    /// Classifies an X.509-SVID validation error.
    pub fn from_svid_error(e: &SvidError) -> Self {
        match e {
            SvidError::NoBundle(_)
            | SvidError::UntrustedRoot(_)
            | SvidError::IntermediateForeignTrustDomain { .. } => Self::WrongTrustDomain,
            SvidError::Expired { .. } | SvidError::IssuerExpired { .. } => Self::ExpiredSvid,
            _ => Self::InvalidSvid,
        }
    }
}

impl std::fmt::Display for AuthFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An authenticated (local identity, remote identity, remote node) triple: the key of the
/// datapath's auth map, seen from one node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AuthTriple {
    pub local_identity: u32,
    pub remote_identity: u32,
    pub remote_node: u32,
}

impl AuthTriple {
    pub fn to_key(self) -> veil_common::maps::AuthKey {
        veil_common::maps::AuthKey {
            local_identity: self.local_identity,
            remote_identity: self.remote_identity,
            remote_node: self.remote_node,
            _pad: 0,
        }
    }
}

/// A node as the auth code needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    pub id: u32,
    /// The SPIFFE ID the node's agent must present (`spiffe://<td>/veil/node/<name>`).
    pub spiffe_id: SpiffeId,
    /// Underlay address its agent is reached on (and dials from).
    pub addr: IpAddr,
}

/// `spiffe://<td>/veil/node/<name>`, the node identity convention shared with the dev PKI and
/// the SPIRE registration entries the agent creates.
pub fn node_spiffe_id(td: &TrustDomain, node: &str) -> Result<SpiffeId, veil_identity::IdError> {
    SpiffeId::from_segments(td, &["veil", "node", node])
}

/// The node name a node SPIFFE ID names, if it has the node shape in `td`.
pub fn node_name_of(id: &SpiffeId, td: &TrustDomain) -> Option<String> {
    if !id.is_member_of(td) {
        return None;
    }
    let name = id.path().strip_prefix("/veil/node/")?;
    (!name.is_empty() && !name.contains('/')).then(|| name.to_owned())
}

/// Which of two nodes dials the control channel: the one with the smaller name. One channel
/// per node pair means one PSK per pair, with no race between two simultaneous handshakes.
pub fn should_dial(local_node: &str, remote_node: &str) -> bool {
    local_node < remote_node
}

/// The cluster as the auth code sees it; the agent implements it over its cluster state
/// (lookups must not scan: the server calls them per connection and per request).
pub trait PeerDirectory: Send + Sync + 'static {
    fn node_by_name(&self, name: &str) -> Option<NodeInfo>;
    fn node_by_id(&self, id: u32) -> Option<NodeInfo>;
    fn node_by_addr(&self, addr: IpAddr) -> Option<NodeInfo>;
    /// The numeric identities of the workloads with SPIFFE ID `id` that node `node_id` hosts;
    /// empty if it hosts none (pods sharing a service account may have several label sets).
    fn hosted_identities(&self, node_id: u32, id: &SpiffeId) -> Vec<u32>;
}

/// SVIDs of the workloads this node hosts (from the Delegated Identity API).
pub trait LocalWorkloads: Send + Sync + 'static {
    /// An SVID of a local workload with numeric identity `identity`, if this node hosts one.
    fn svid_for(&self, identity: u32) -> Option<Arc<Svid>>;
}

/// An in-memory [`PeerDirectory`] with hash indexes; the agent can rebuild one per cluster
/// snapshot and publish it through an `ArcSwap`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StaticDirectory {
    by_name: HashMap<String, NodeInfo>,
    name_by_id: HashMap<u32, String>,
    name_by_addr: HashMap<IpAddr, String>,
    workloads: HashMap<(u32, SpiffeId), Vec<u32>>,
}

impl StaticDirectory {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add_node(&mut self, node: NodeInfo) {
        self.name_by_id.insert(node.id, node.name.clone());
        self.name_by_addr.insert(node.addr, node.name.clone());
        self.by_name.insert(node.name.clone(), node);
    }

    pub fn add_workload(&mut self, node_id: u32, id: SpiffeId, identity: u32) {
        let ids = self.workloads.entry((node_id, id)).or_default();
        if !ids.contains(&identity) {
            ids.push(identity);
        }
    }

    pub fn remove_workload(&mut self, node_id: u32, id: &SpiffeId, identity: u32) {
        let key = (node_id, id.clone());
        if let Some(ids) = self.workloads.get_mut(&key) {
            ids.retain(|i| *i != identity);
            if ids.is_empty() {
                self.workloads.remove(&key);
            }
        }
    }
}

impl PeerDirectory for StaticDirectory {
    fn node_by_name(&self, name: &str) -> Option<NodeInfo> {
        self.by_name.get(name).cloned()
    }
    fn node_by_id(&self, id: u32) -> Option<NodeInfo> {
        self.by_name.get(self.name_by_id.get(&id)?).cloned()
    }
    fn node_by_addr(&self, addr: IpAddr) -> Option<NodeInfo> {
        self.by_name.get(self.name_by_addr.get(&addr)?).cloned()
    }
    fn hosted_identities(&self, node_id: u32, id: &SpiffeId) -> Vec<u32> {
        // The tuple key needs an owned ID; SPIFFE IDs are short and this runs once per
        // handshake, not per packet.
        self.workloads
            .get(&(node_id, id.clone()))
            .cloned()
            .unwrap_or_default()
    }
}

impl<T: PeerDirectory> PeerDirectory for arc_swap::ArcSwap<T> {
    fn node_by_name(&self, name: &str) -> Option<NodeInfo> {
        self.load().node_by_name(name)
    }
    fn node_by_id(&self, id: u32) -> Option<NodeInfo> {
        self.load().node_by_id(id)
    }
    fn node_by_addr(&self, addr: IpAddr) -> Option<NodeInfo> {
        self.load().node_by_addr(addr)
    }
    fn hosted_identities(&self, node_id: u32, id: &SpiffeId) -> Vec<u32> {
        self.load().hosted_identities(node_id, id)
    }
}

/// An in-memory [`LocalWorkloads`]: numeric identity → SVID.
#[derive(Clone, Debug, Default)]
pub struct StaticWorkloads(pub HashMap<u32, Arc<Svid>>);

impl LocalWorkloads for StaticWorkloads {
    fn svid_for(&self, identity: u32) -> Option<Arc<Svid>> {
        self.0.get(&identity).cloned()
    }
}

impl<T: LocalWorkloads> LocalWorkloads for arc_swap::ArcSwap<T> {
    fn svid_for(&self, identity: u32) -> Option<Arc<Svid>> {
        self.load().svid_for(identity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_names_and_codes_are_stable_and_unique() {
        let names: std::collections::BTreeSet<_> =
            AuthFailure::ALL.iter().map(|f| f.as_str()).collect();
        let codes: std::collections::BTreeSet<_> =
            AuthFailure::ALL.iter().map(|f| f.code()).collect();
        assert_eq!(names.len(), AuthFailure::ALL.len());
        assert_eq!(codes.len(), AuthFailure::ALL.len());
        for f in AuthFailure::ALL {
            assert_eq!(AuthFailure::from_code(f.code()), Some(f));
            assert_eq!(AuthFailure::from_name(f.as_str()), Some(f));
            assert!(f
                .as_str()
                .chars()
                .all(|c| c.is_ascii_lowercase() || c == '-'));
        }
        assert_eq!(AuthFailure::from_code(0), None);
        assert_eq!(AuthFailure::ExpiredSvid.as_str(), "expired-svid");
        assert_eq!(AuthFailure::DuplicateWgKey.as_str(), "duplicate-wg-key");
        assert_eq!(AuthFailure::DuplicateWgKey.code(), 11);
        // Claiming another node's key says who the node is not: its keys go.
        assert!(AuthFailure::DuplicateWgKey.is_identity_failure());
    }

    #[test]
    fn node_names_round_trip_through_spiffe_ids() {
        let td = TrustDomain::new("lab.veil").unwrap();
        let id = node_spiffe_id(&td, "node-a").unwrap();
        assert_eq!(id.as_str(), "spiffe://lab.veil/veil/node/node-a");
        assert_eq!(node_name_of(&id, &td).as_deref(), Some("node-a"));
        let other = TrustDomain::new("other.veil").unwrap();
        assert_eq!(node_name_of(&id, &other), None);
        let wl = SpiffeId::parse("spiffe://lab.veil/ns/shop/sa/frontend").unwrap();
        assert_eq!(node_name_of(&wl, &td), None);
        let nested = SpiffeId::parse("spiffe://lab.veil/veil/node/a/b").unwrap();
        assert_eq!(node_name_of(&nested, &td), None);
    }

    #[test]
    fn exactly_one_side_dials() {
        assert!(should_dial("node-a", "node-b"));
        assert!(!should_dial("node-b", "node-a"));
        assert!(!should_dial("node-a", "node-a"));
    }
}
