//! daemon::state: what the reconcile loop, the admin routes, status and key rotation share,
//! behind one lock.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use tokio::sync::watch;
use veil_common::maps::{PolicyEntry, PolicyKey};
use veil_identity::SelectorSet;
use veil_spire::IdentityClientHandle;

use crate::{
    api,
    cluster::{ClusterSource, ClusterState},
    config::Config,
    datapath::Datapath,
    mesh::{MeshStatus, PeerKeys},
    tunnel::NodeTunnel,
};

/// Everything the admin API and the reconcile loop share.
pub(super) struct Shared {
    pub(super) cfg: Config,
    /// Where cluster state comes from and this node's key is published.
    pub(super) source: Arc<dyn ClusterSource>,
    pub(super) datapath: Datapath,
    pub(super) cluster: Arc<ClusterState>,
    pub(super) tunnel: Option<NodeTunnel>,
    pub(super) ready: bool,
    pub(super) started_unix: u64,
    pub(super) restarts: u64,
    pub(super) last_error: Option<String>,
    /// Whether flow events lost to a full ring buffer were logged (once per agent run; the
    /// count is in `veil status` and `veil_flow_events_lost_total`).
    pub(super) events_lost_logged: bool,
    /// SVIDs of this node and its pods, as the SPIRE clients deliver them.
    pub(super) identities: Option<IdentityClientHandle>,
    /// Pods whose SVIDs are subscribed (Delegated Identity API selectors).
    pub(super) watched: BTreeSet<SelectorSet>,
    /// What the installed policy was compiled from: (policy generation, identity table, local
    /// identities). Recompiled only when it changes.
    pub(super) policy_input: Option<(u64, Vec<crate::cluster::Identity>, Vec<u32>)>,
    /// The Services the socket maps were last written from: a reconcile with the same ones
    /// (every tick) reads no map.
    pub(super) services_input: Option<Vec<crate::cluster::Service>>,
    /// What the ipcache and node table were last written from, completely: a pass with the
    /// same pod list (shared by pointer between snapshots), nodes, keyed peers and encryption
    /// setting skips rebuilding them (O(endpoints)).
    pub(super) maps_input: Option<MapsInput>,
    /// The pod list the L7 proxy's endpoint table was last built from.
    pub(super) proxy_pods: Option<crate::cluster::PodList>,
    /// What this agent last wrote to the ipcache and the node table.
    pub(super) ipcache_written:
        crate::datapath::maps::Shadowed<crate::datapath::maps::Prefix, veil_common::maps::IpInfo>,
    pub(super) nodes_written: crate::datapath::maps::Shadowed<u32, veil_common::maps::NodeInfo>,
    pub(super) policy: api::PolicyStatus,
    /// The interface the underlay programs were last attached to (the one holding this node's
    /// underlay address then): they stay there while the address is on no interface.
    pub(super) underlay_if: Option<String>,
    /// Node-wide audit mode: would-be policy drops pass and are reported as AUDIT.
    pub(super) audit: bool,
    /// Peer keys from authenticated node handshakes (mutual auth); None: keys from the cluster
    /// state (mutual auth off).
    pub(super) mesh_keys: Option<watch::Receiver<BTreeMap<String, PeerKeys>>>,
    pub(super) mesh_status: Option<Arc<Mutex<MeshStatus>>>,
    /// `veil auth list`'s queries to the mesh (mutual auth only).
    pub(super) mesh_queries: Option<tokio::sync::mpsc::Sender<crate::mesh::AuthQueryRequest>>,
    /// With mutual auth: where node handshakes read the node's public key, and how to make
    /// them re-run (static key rotation).
    pub(super) key_rotation: Option<(
        Arc<arc_swap::ArcSwap<veil_transport::PublicKey>>,
        tokio::sync::mpsc::Sender<()>,
    )>,
    /// The compiled policy in force, for the mesh's pre-authentication.
    pub(super) policy_tx: watch::Sender<Arc<BTreeMap<PolicyKey, PolicyEntry>>>,
    pub(super) hold_stats: crate::hold::SharedStats,
    /// The L7 proxy's rules, from the last policy that compiled.
    pub(super) l7_rules: Vec<crate::policy::compile::L7Rule>,
    /// What the L7 proxy enforces (its supervisor pushes every change).
    pub(super) proxy_tx: watch::Sender<Arc<crate::l7::ProxyConfig>>,
    pub(super) proxy_status: Arc<Mutex<crate::l7::supervisor::ProxyStatus>>,
}

/// Counts agent starts on this node's state (0 on the first), persisted in the state dir.
pub(super) fn bump_start_count(state_dir: &std::path::Path) -> u64 {
    let path = state_dir.join("starts");
    let n: u64 = std::fs::read_to_string(&path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    let _ = std::fs::write(&path, (n + 1).to_string());
    n
}

pub(super) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// See [`Shared::maps_input`].
pub(super) struct MapsInput {
    pub(super) pods: crate::cluster::PodList,
    pub(super) nodes: Vec<crate::cluster::Node>,
    pub(super) with_key: BTreeSet<String>,
    pub(super) node_encryption: bool,
}

impl MapsInput {
    /// Whether the maps written from `self` are those `cluster` and the rest would give.
    pub(super) fn same(
        &self,
        cluster: &crate::cluster::ClusterState,
        with_key: &BTreeSet<String>,
        node_encryption: bool,
    ) -> bool {
        Arc::ptr_eq(&self.pods, &cluster.pods)
            && self.nodes == cluster.nodes
            && self.with_key == *with_key
            && self.node_encryption == node_encryption
    }
}
