//! api: the JSON the agent's admin API serves and the CLI prints with `-o json`. Fields may be
//! added, never renamed or removed (scripts outside the project read them).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `GET /v1/status` and `veil status -o json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    pub node: String,
    pub cluster: String,
    /// The agent finished its first reconcile: programs attached to every local pod.
    pub ready: bool,
    /// Why the last reconcile pass failed (a map that cannot take every entry, a program that
    /// did not attach, ...); it is retried every 5 s and at each cluster change. Absent once a
    /// pass succeeds. What did not fail of the pass is in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconcile_error: Option<String>,
    /// `userspace`, `kernel`, or `none` (encryption off).
    pub backend: String,
    pub interface: String,
    pub listen_port: u16,
    pub public_key: Option<String>,
    pub encryption: bool,
    /// Node traffic (host network, node address to node address) encrypted too.
    #[serde(default)]
    pub node_encryption: bool,
    pub strict: bool,
    pub peers: Vec<Peer>,
    pub svids: Vec<Svid>,
    /// Trust bundles held: trust domain and number of roots.
    pub bundles: Vec<Bundle>,
    /// The first 256 auth pairs in (local identity, remote identity, node) order; all of
    /// them are counted in `auth_pairs`, and `GET /v1/auth` (`veil auth list`) lists them all.
    pub auth: Vec<AuthPair>,
    #[serde(default)]
    pub auth_pairs: AuthPairCounts,
    /// Drop counters by stable reason name.
    pub drops: BTreeMap<String, u64>,
    /// Packets the tunnel device dropped, by reason: veil-wg's own counters (`malformed`,
    /// `no-peer`, `bad-source`, `decrypt`, `replay`, ...), such as traffic for a peer whose
    /// keys were withdrawn. Empty with kernel WireGuard, which reports none.
    #[serde(default)]
    pub tunnel_drops: BTreeMap<String, u64>,
    /// Flow events lost to a full ring buffer (the agent fell behind): the flow log has gaps.
    #[serde(default)]
    pub events_lost: u64,
    /// TC programs on interfaces.
    pub programs: Vec<Program>,
    /// Socket programs (Service load balancing) on the pods' cgroup: `interface` is the
    /// cgroup's path, `hook` is `cgroup`.
    #[serde(default)]
    pub socket_programs: Vec<Program>,
    /// The Services this node balances at the socket, with their backends.
    #[serde(default)]
    pub services: Vec<ServiceStatus>,
    /// Why this node balances no Service although it has a `service_cgroup` (its socket
    /// programs did not load: a kernel before 5.18).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub services_unavailable: Option<String>,
    /// The node's L7 proxy; None when the agent runs without one (`proxy_port: 0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<crate::l7::supervisor::ProxyStatus>,
    pub interfaces: Vec<InterfaceCounters>,
    pub agent: AgentInfo,
    /// Restarts of the userspace tunnel process (veil-wg) by this agent run, with reasons.
    #[serde(default)]
    pub tunnel_restarts: TunnelRestarts,
    /// The policy installed on this node.
    pub policy: PolicyStatus,
    /// Node-wide audit mode.
    pub audit: bool,
    /// Fill of the maps that grow with the cluster.
    pub maps: Vec<MapFill>,
    /// Control channels to peer agents (mutual auth).
    pub channels: Vec<NodeChannel>,
    /// Authentication failures by stable reason.
    pub auth_failures: BTreeMap<String, u64>,
    /// What the control-channel listener did with the connections it accepted.
    #[serde(default)]
    pub listener: ListenerCounters,
    /// Packets held until their identity pair authenticated (no first-packet drop).
    pub hold: HoldStatus,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub namespace: String,
    pub name: String,
    /// The first ClusterIP (IPv4 unless the Service is IPv6-only).
    pub cluster_ip: String,
    /// Every ClusterIP: the first, then a dual-stack Service's IPv6 one (as a pod's `ips`).
    #[serde(default)]
    pub cluster_ips: Vec<String>,
    pub ports: Vec<ServicePortStatus>,
    /// `None` (random backend per connection) or `ClientIP`.
    pub session_affinity: String,
    pub backends: Vec<ServiceBackendStatus>,
}

/// A Service as this node balances it (what its maps are written from).
impl From<&crate::cluster::Service> for ServiceStatus {
    fn from(svc: &crate::cluster::Service) -> Self {
        Self {
            namespace: svc.namespace.clone(),
            name: svc.name.clone(),
            cluster_ip: svc.cluster_ip.to_string(),
            cluster_ips: svc.cluster_ips().map(|a| a.to_string()).collect(),
            ports: svc
                .ports
                .iter()
                .map(|p| ServicePortStatus {
                    port: p.port,
                    target_port: p.target_port,
                    protocol: p.protocol.clone(),
                })
                .collect(),
            session_affinity: if svc.affinity_timeout_s.is_some() {
                "ClientIP"
            } else {
                "None"
            }
            .to_string(),
            backends: svc
                .backends
                .iter()
                .map(|b| ServiceBackendStatus {
                    pod: b.pod.clone(),
                    ip: b.ip.to_string(),
                    ready: b.ready,
                })
                .collect(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePortStatus {
    pub port: u16,
    pub target_port: u16,
    pub protocol: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceBackendStatus {
    pub pod: String,
    pub ip: String,
    pub ready: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldStatus {
    pub held: u64,
    pub released: u64,
    pub timed_out: u64,
    pub overflow: u64,
    /// Packets the hold device received that name no pair needing auth (not from a local
    /// pod to a remote one, or unparseable): dropped, never forwarded.
    #[serde(default)]
    pub unclassified: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyStatus {
    /// Generation of the policy set in force (0: none applied yet).
    pub generation: u64,
    /// `namespace/name` of each policy in force.
    pub policies: Vec<String>,
    /// Entries of the live policy map.
    pub entries: usize,
    /// Established connections the last change cut.
    pub conntrack_cut: usize,
    /// Why the newest generation is not in force, if it is not.
    pub last_error: Option<String>,
}

/// The control-channel listener's counters since the agent started: every connection it
/// accepted, and what became of it. Once none is pending, the outcomes add up to `accepted`
/// (an eviction is counted when a newer connection makes room, for the older one it closes;
/// rarely, one that fails as it is evicted counts twice).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerCounters {
    pub accepted: u64,
    /// Closed before TLS: the source is no node's underlay address.
    pub refused_unknown_source: u64,
    /// Closed before TLS: the listener already had its limit of unauthenticated connections.
    pub refused_over_limit: u64,
    /// Pending connections closed to make room for a newer one from the same source.
    pub evicted_pending: u64,
    /// No TLS handshake within the handshake timeout (a slowloris, a half-open connection).
    pub handshake_timeouts: u64,
    /// TLS failed: garbage, a truncated record, a peer certificate refused.
    pub tls_failures: u64,
    /// TLS succeeded but the node handshake inside it did not (or its certificate named no
    /// node of the cluster).
    pub node_handshake_failures: u64,
    /// Control channels made.
    pub established: u64,
}

impl ListenerCounters {
    /// Each outcome by its stable name (the metric's `outcome` label, `veil status`'s line).
    pub fn outcomes(&self) -> [(&'static str, u64); 7] {
        [
            ("established", self.established),
            ("evicted", self.evicted_pending),
            ("refused-unknown-source", self.refused_unknown_source),
            ("refused-over-limit", self.refused_over_limit),
            ("handshake-timeout", self.handshake_timeouts),
            ("tls-failure", self.tls_failures),
            ("node-handshake-failure", self.node_handshake_failures),
        ]
    }
}

/// Auth pairs (local identity, remote identity, remote node) this node knows, by state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthPairCounts {
    pub total: usize,
    /// With a live entry in the auth map.
    pub authenticated: usize,
    /// Whose last attempt failed.
    pub failing: usize,
    /// That policy and placement make possible (pre-authenticated).
    pub desired: usize,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MapFill {
    pub name: String,
    pub entries: usize,
    pub capacity: u32,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TunnelRestarts {
    pub total: u64,
    /// The most recent ones, oldest first.
    pub recent: Vec<TunnelRestart>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TunnelRestart {
    pub time_unix: u64,
    /// `exited` (the process was gone) or `unresponsive` (it held its socket but did not
    /// answer; it was killed first).
    pub reason: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AgentInfo {
    pub pid: u32,
    pub version: String,
    pub started_unix: u64,
    /// How many times this node's agent has started on the same pinned state (0 = fresh).
    pub restarts: u64,
    pub pin_dir: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Peer {
    pub node: String,
    pub endpoint: Option<String>,
    pub public_key: String,
    pub allowed_ips: Vec<String>,
    pub last_handshake_unix: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Svid {
    pub spiffe_id: String,
    /// `node` or the pod (`namespace/name`) it belongs to.
    pub owner: String,
    pub serial: String,
    pub not_after_unix: u64,
    /// The leaf's issuer (distinguished name), e.g. SPIRE's `C=US, O=SPIFFE`.
    #[serde(default)]
    pub issuer: Option<String>,
    /// The issuing authority: the leaf's authority key identifier in lowercase hex, which is
    /// the authority ID `spire-server localauthority x509 show` prints for a local authority.
    #[serde(default)]
    pub authority_id: Option<String>,
    #[serde(default)]
    pub not_before_unix: u64,
    /// When the issuer renews it: half its lifetime after `not_before` (SPIRE's agent and the
    /// dev server, each with a ±10 % jitter of the half-life).
    #[serde(default)]
    pub rotates_at_unix: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Bundle {
    pub trust_domain: String,
    pub roots: usize,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AuthPair {
    pub src_identity: String,
    pub dst_identity: String,
    pub node: String,
    /// 0 while not authenticated.
    pub expires_unix: u64,
    /// `ok` or the stable failure reason of the last attempt.
    pub last_result: Option<String>,
    /// When the handshake behind the current entry completed (Unix ms; 0 without entry).
    #[serde(default)]
    pub authenticated_unix_ms: u64,
}

/// `GET /v1/auth` (`veil auth list -o json`, one object per node): the auth pairs of one
/// agent that match the query, in (local identity, remote identity, node) order; all of them,
/// unless the query set a limit.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AuthPairList {
    pub node: String,
    /// How many pairs match (more than `pairs` holds when the limit cut the list).
    pub matching: usize,
    /// How many pairs the agent holds.
    pub total: usize,
    pub pairs: Vec<AuthPair>,
}

/// A control channel to a peer agent (mutual TLS, node handshake done).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NodeChannel {
    pub node: String,
    /// The peer's underlay address the channel runs to (or came from).
    #[serde(default)]
    pub address: String,
    /// PSK epoch of the node pair.
    pub epoch: u64,
    /// Negotiated TLS key exchange group (X25519MLKEM768 unless classical is allowed).
    pub group: Option<String>,
    pub established_unix: u64,
    pub peer_svid_serial: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Program {
    pub name: String,
    pub interface: String,
    pub hook: String,
    pub program_id: u32,
    pub link_id: u32,
    pub pod: Option<String>,
    /// Adopted from a pinned link an earlier agent left (restart without a gap).
    pub adopted: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct InterfaceCounters {
    pub interface: String,
    pub ifindex: u32,
    pub pod: Option<String>,
    pub packets: u64,
    pub bytes: u64,
}
