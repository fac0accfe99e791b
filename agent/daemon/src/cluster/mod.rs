//! cluster: the agent's view of the cluster (nodes, pods, identities, policies, peers' node
//! keys) and the seam its sources plug into.
//!
//! The agent sees only [`ClusterState`] snapshots on a watch channel, and publishes its own node
//! key, through one trait, [`ClusterSource`]; [`open`] builds the source a config names and is
//! the only place that knows the implementations. The file source ([`files`], the lab's control
//! plane directory) is one; the Kubernetes API ([`kubernetes`]) is the other. Which one is in use is invisible
//! to the daemon, the datapath and the auth code.

pub mod apiserver;
pub mod files;
pub mod kubernetes;
pub mod netpol;

use std::{
    collections::BTreeMap,
    future::Future,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    pin::Pin,
    sync::Arc,
};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// Errors reading cluster state.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read cluster state {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("bad policy store {path}: {message}")]
    Policy { path: PathBuf, message: String },
    #[error("cannot publish the node key")]
    Publish(#[source] crate::sys::Error),
    #[error("Kubernetes: {0}")]
    Kubernetes(String),
    #[error("bad cluster state in {path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// One consistent snapshot of the cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterState {
    /// Increases with every change the source publishes.
    pub generation: u64,
    pub cluster: String,
    pub trust_domain: String,
    pub nodes: Vec<Node>,
    /// Shared between snapshots while no pod changed (a source hands the next snapshot the
    /// same list): the daemon then skips what it derives from pods alone, O(endpoints). Each
    /// pod is shared too, with the source's cache and with the snapshots before (a pod event
    /// at 100,000 pods copies pointers, not pods).
    pub pods: PodList,
    /// Numeric security identities, one per namespace + label set, allocated by the control
    /// plane so every node agrees.
    #[serde(default)]
    pub identities: Vec<Identity>,
    /// Network policies in force, with the generation of the last change.
    /// Shared between snapshots while no policy changed, each policy with the source's parse.
    #[serde(default)]
    pub policies: Arc<Vec<Arc<crate::policy::Policy>>>,
    #[serde(default)]
    pub policy_generation: u64,
    /// Services, with their backends resolved by the source.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<Service>,
    /// Lookups by pod IP and node name, derived from the lists above on first use (leave it
    /// `Default`; a snapshot is not changed once looked up in).
    #[serde(skip)]
    pub index: Index,
}

/// A snapshot's pods (see [`ClusterState::pods`]).
pub type PodList = Arc<Vec<Arc<Pod>>>;

/// `pods` as a snapshot's list.
pub fn pod_list(pods: impl IntoIterator<Item = Pod>) -> PodList {
    Arc::new(pods.into_iter().map(Arc::new).collect())
}

/// The lookup tables of a [`ClusterState`]: built once per snapshot, so the per-event paths
/// (flow enrichment, hold classification) cost O(1) however many pods the cluster has.
#[derive(Debug, Default)]
pub struct Index(std::sync::OnceLock<Arc<IndexMaps>>);

#[derive(Debug)]
struct IndexMaps {
    pod_by_ip: std::collections::HashMap<IpAddr, usize>,
    /// Pods by node name, in list order.
    pods_by_node: std::collections::HashMap<String, Vec<usize>>,
    node_by_name: std::collections::HashMap<String, usize>,
    service_by_ip: std::collections::HashMap<IpAddr, usize>,
}

/// Derived data: a copy starts empty and builds its own.
impl Clone for Index {
    fn clone(&self) -> Self {
        Self::default()
    }
}

/// Derived data: two snapshots are equal when their lists are.
impl PartialEq for Index {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Index {}

impl Index {
    fn maps(&self, state: &ClusterState) -> &IndexMaps {
        // The first of duplicates wins, as a scan would find it.
        self.0.get_or_init(|| {
            let mut m = IndexMaps {
                pod_by_ip: std::collections::HashMap::with_capacity(state.pods.len()),
                pods_by_node: Default::default(),
                node_by_name: Default::default(),
                service_by_ip: Default::default(),
            };
            for (i, s) in state.services.iter().enumerate() {
                for a in s.cluster_ips() {
                    m.service_by_ip.entry(a).or_insert(i);
                }
            }
            for (i, p) in state.pods.iter().enumerate() {
                for a in p.addrs() {
                    m.pod_by_ip.entry(a).or_insert(i);
                }
                // The node's name copied once per node, not per pod.
                match m.pods_by_node.get_mut(&p.node) {
                    Some(at) => at.push(i),
                    None => {
                        m.pods_by_node.insert(p.node.clone(), vec![i]);
                    }
                }
            }
            for (i, n) in state.nodes.iter().enumerate() {
                m.node_by_name.entry(n.name.clone()).or_insert(i);
            }
            Arc::new(m)
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    pub id: u32,
    pub namespace: String,
    /// The pods' service account: part of the identity because it is part of the SPIFFE ID.
    pub service_account: String,
    /// The pod labels (without the namespace label the allocator adds).
    pub labels: BTreeMap<String, String>,
    /// The namespace's labels (Kubernetes mode), carried as
    /// `io.cilium.k8s.namespace.labels.<key>`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub namespace_labels: BTreeMap<String, String>,
}

impl Identity {
    /// The identity `id` with the labels of `key`.
    pub fn new(id: u32, key: &crate::policy::IdentityKey) -> Self {
        Self {
            id,
            namespace: key.namespace.clone(),
            service_account: key.service_account.clone(),
            labels: key.labels.clone(),
            namespace_labels: key.namespace_labels.clone(),
        }
    }

    /// Its labels as the allocator's key, checked as a pod's would be.
    pub fn key(&self) -> Result<crate::policy::IdentityKey, crate::policy::Error> {
        crate::policy::IdentityKey::new(&self.namespace, &self.service_account, &self.labels)
            .and_then(|k| k.with_namespace_labels(&self.namespace_labels))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    pub name: String,
    pub id: u32,
    /// The node's address on the underlay (WireGuard's endpoint, the control channel): IPv4 or
    /// IPv6.
    pub underlay_ip: IpAddr,
    /// The IPv6 address of a node on a dual-stack underlay (Kubernetes: its IPv6 `InternalIP`
    /// beside an IPv4 one). WireGuard and the control channel stay on `underlay_ip`; node
    /// traffic encryption covers both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub underlay_ipv6: Option<Ipv6Addr>,
    /// The node's first pod CIDR, as `prefix/len`: IPv4 on an IPv4 or dual-stack node, IPv6 on
    /// an IPv6-only one (Kubernetes' `spec.podCIDR`).
    pub pod_cidr: String,
    /// The IPv6 pod CIDR of a dual-stack node, as `prefix/len`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_cidr_v6: Option<String>,
    /// The node's WireGuard public key (base64), once its agent has published it.
    #[serde(default)]
    pub wg_public_key: Option<String>,
    /// The key the node will use next (base64), published ahead of a static key rotation: a
    /// node handshake may claim either key while the rotation is under way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wg_next_public_key: Option<String>,
}

/// A Service: a stable virtual address (ClusterIP) and ports, balanced at the socket over the
/// ready pods behind it. The source resolves the backends (files: the selector over the pods;
/// Kubernetes: the Service's EndpointSlices), so the datapath never evaluates a selector.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    /// Its first ClusterIP: IPv4 on an IPv4 or dual-stack Service, IPv6 on an IPv6-only one
    /// (as a pod's `ip`; the Kubernetes source takes IPv4 first whatever `ipFamilies` says).
    pub cluster_ip: IpAddr,
    /// The IPv6 ClusterIP of a dual-stack Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_ipv6: Option<Ipv6Addr>,
    pub ports: Vec<ServicePort>,
    /// ClientIP session affinity: seconds a client keeps its backend; none for random choice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity_timeout_s: Option<u32>,
    pub backends: Vec<ServiceBackend>,
}

impl Node {
    /// Its underlay addresses: the first, then a dual-stack node's IPv6 one.
    pub fn underlay_ips(&self) -> impl Iterator<Item = IpAddr> {
        std::iter::once(self.underlay_ip).chain(self.underlay_ipv6.map(IpAddr::V6))
    }
}

impl Service {
    pub fn qualified_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Its ClusterIPs: the first, then a dual-stack Service's IPv6 one.
    pub fn cluster_ips(&self) -> impl Iterator<Item = IpAddr> {
        std::iter::once(self.cluster_ip).chain(self.cluster_ipv6.map(IpAddr::V6))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServicePort {
    /// The port's name (Kubernetes matches it to the EndpointSlice's ports); may be empty.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    pub port: u16,
    pub target_port: u16,
    /// `TCP`, `UDP` or `SCTP`, as Kubernetes spells it.
    pub protocol: String,
}

impl ServicePort {
    /// The IP protocol number, for the datapath; None for a protocol veil does not balance.
    pub fn protocol_number(&self) -> Option<u8> {
        use veil_common::ipproto;
        match self.protocol.as_str() {
            "TCP" => Some(ipproto::TCP),
            "UDP" => Some(ipproto::UDP),
            "SCTP" => Some(ipproto::SCTP),
            _ => None,
        }
    }
}

/// One address of a pod behind a Service (as EndpointSlices list them, one family each: a
/// dual-stack pod behind a dual-stack Service is two backends). A ClusterIP is balanced over
/// the backends of its own family.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceBackend {
    /// `namespace/name` of the pod, when known.
    pub pod: String,
    pub ip: IpAddr,
    /// Not-ready backends are listed (for `veil status`) and never chosen.
    pub ready: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pod {
    pub name: String,
    pub namespace: String,
    pub node: String,
    /// The pod's first address: IPv4 on an IPv4 or dual-stack node, IPv6 on an IPv6-only one
    /// (Kubernetes' `status.podIP`).
    pub ip: IpAddr,
    /// The pod's IPv6 address on a dual-stack node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<Ipv6Addr>,
    /// Shared between the pods that carry the same labels (see
    /// [`ClusterState::compact`]): at 100,000 pods over 1,000 label sets each pod's own
    /// map was most of the snapshot's memory.
    pub labels: Arc<BTreeMap<String, String>>,
    pub service_account: String,
    /// Host side of the pod's veth on its node. The Kubernetes source names it only for this
    /// node's pods (empty for the others): nothing reads another node's.
    pub host_veth: String,
    /// Numeric security identity (see [`ClusterState::identities`]).
    #[serde(default)]
    pub identity: u32,
}

impl Node {
    /// Its pod CIDRs: the first, then the IPv6 one of a dual-stack node.
    pub fn pod_cidrs(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.pod_cidr.as_str()).chain(self.pod_cidr_v6.as_deref())
    }
}

impl Pod {
    /// Its addresses: the first, then the IPv6 one of a dual-stack pod.
    pub fn addrs(&self) -> impl Iterator<Item = IpAddr> {
        std::iter::once(self.ip).chain(self.ipv6.map(IpAddr::V6))
    }

    /// Its IPv4 address, if it has one.
    pub fn ipv4(&self) -> Option<Ipv4Addr> {
        match self.ip {
            IpAddr::V4(a) => Some(a),
            IpAddr::V6(_) => None,
        }
    }
}

impl ClusterState {
    /// Takes over `last`'s lookup tables when they were built and this snapshot has the same
    /// pod list (by pointer), nodes and Services: a policy change then rebuilds no O(endpoints)
    /// index.
    pub fn share_index(&self, last: &ClusterState) {
        if Arc::ptr_eq(&self.pods, &last.pods)
            && self.nodes == last.nodes
            && self.services == last.services
        {
            if let Some(maps) = last.index.0.get() {
                let _ = self.index.0.set(maps.clone());
            }
        }
    }

    /// Makes pods with equal labels share one map, and drops the lists' spare capacity (a
    /// source calls it on each snapshot it builds). A snapshot as parsed has a map per pod, and
    /// its pod list the capacity its parser grew it to: at 100,000 pods, room for 131,072.
    pub fn compact(&mut self) {
        let mut seen: std::collections::HashSet<Arc<BTreeMap<String, String>>> =
            std::collections::HashSet::new();
        // The maps kept, by address: a pod carrying one of them is compared by pointer, not by
        // hashing its labels (a source that shares label sets already, as the Kubernetes
        // source's pod cache does, then costs a pointer lookup per pod).
        let mut kept: std::collections::HashSet<usize> = std::collections::HashSet::new();
        let pods = Arc::make_mut(&mut self.pods);
        for p in pods.iter_mut() {
            if kept.contains(&(Arc::as_ptr(&p.labels) as usize)) {
                continue;
            }
            match seen.get(&p.labels) {
                // A pod whose labels are shared already stays shared itself (not copied).
                Some(shared) if !Arc::ptr_eq(shared, &p.labels) => {
                    Arc::make_mut(p).labels = Arc::clone(shared)
                }
                Some(_) => {}
                None => {
                    kept.insert(Arc::as_ptr(&p.labels) as usize);
                    seen.insert(Arc::clone(&p.labels));
                }
            }
        }
        pods.shrink_to_fit();
        self.nodes.shrink_to_fit();
        self.services.shrink_to_fit();
        self.identities.shrink_to_fit();
    }

    pub fn node(&self, name: &str) -> Option<&Node> {
        let i = *self.index.maps(self).node_by_name.get(name)?;
        self.nodes.get(i).filter(|n| n.name == name)
    }

    /// The pods on `node`, in list order (an index lookup, not a scan of every pod).
    pub fn pods_on<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Pod> + 'a {
        let at: &'a [usize] = self
            .index
            .maps(self)
            .pods_by_node
            .get(node)
            .map_or(&[], Vec::as_slice);
        at.iter()
            .filter_map(move |&i| self.pods.get(i).map(|p| &**p))
            .filter(move |p| p.node == node)
    }

    /// The Service with ClusterIP `ip`, of either family (the first, if two claim it).
    pub fn service_by_ip(&self, ip: impl Into<IpAddr>) -> Option<&Service> {
        let ip = ip.into();
        let i = *self.index.maps(self).service_by_ip.get(&ip)?;
        self.services
            .get(i)
            .filter(|s| s.cluster_ips().any(|a| a == ip))
    }

    /// The pod with address `ip`, IPv4 or IPv6 (the first, if two claim it).
    pub fn pod_by_ip(&self, ip: impl Into<IpAddr>) -> Option<&Pod> {
        let ip = ip.into();
        let i = *self.index.maps(self).pod_by_ip.get(&ip)?;
        self.pods
            .get(i)
            .map(|p| &**p)
            .filter(|p| p.addrs().any(|a| a == ip))
    }

    /// The identity table in the form the policy compiler takes.
    pub fn identity_table(&self) -> Vec<(u32, crate::policy::IdentityLabels)> {
        self.identities
            .iter()
            .filter_map(|i| Some((i.id, i.key().ok()?.identity_labels())))
            .collect()
    }
}

/// Parses a pod CIDR, `prefix/len` of either family.
/// The same parser as the tunnel's allowed IPs (`IpPrefix`), so both read a pod CIDR alike; the
/// length is required here, and host bits are cleared.
pub fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    if !s.contains('/') {
        return None;
    }
    let p: veil_transport::IpPrefix = s.parse().ok()?;
    Some((p.addr(), p.len()))
}

/// Parses `a.b.c.d/len` ([`parse_cidr`], IPv4 only).
pub fn parse_cidr_v4(s: &str) -> Option<(Ipv4Addr, u8)> {
    match parse_cidr(s)? {
        (IpAddr::V4(a), len) => Some((a, len)),
        (IpAddr::V6(_), _) => None,
    }
}

/// Where an agent's cluster state comes from, and where it publishes its node key.
///
/// A source delivers consistent snapshots (never a half-applied change) and keeps the last good
/// one in force when the next cannot be read. Publishing is synchronous and cheap: a source that
/// talks to a remote API queues the write and retries it itself.
pub trait ClusterSource: Send + Sync {
    /// Short name for logs and `veil status` (`files`, `kubernetes`).
    fn kind(&self) -> &'static str;
    /// Reads the first snapshot, then keeps the receiver current until it is dropped.
    fn watch(&self) -> WatchFuture<'_>;
    /// Publishes this node's WireGuard public key and, ahead of a static key rotation, the key it
    /// will use next (what Cilium keeps in a node annotation).
    fn publish_node_key(&self, node: &str, current: &str, next: Option<&str>) -> Result<(), Error>;
}

/// What [`ClusterSource::watch`] returns.
pub type WatchFuture<'a> =
    Pin<Box<dyn Future<Output = Result<watch::Receiver<Arc<ClusterState>>, Error>> + Send + 'a>>;

/// The source a config names.
pub fn open(cfg: &crate::config::Config) -> Arc<dyn ClusterSource> {
    match &cfg.source {
        crate::config::SourceConfig::Files { dir } => Arc::new(files::FileSource::new(dir.clone())),
        crate::config::SourceConfig::Kubernetes {
            kubeconfig,
            trust_domain,
        } => Arc::new(kubernetes::KubeSource::new(kubernetes::KubeConfig {
            kubeconfig: kubeconfig.clone(),
            cluster: cfg.cluster.clone(),
            trust_domain: trust_domain.clone(),
            node: cfg.node.clone(),
            identity_gc_age: kubernetes::IDENTITY_GC_AGE,
        })),
    }
}

/// Test nodes for the modules that work on a [`ClusterState`].
#[cfg(test)]
impl Node {
    /// Node `id` as the lab numbers it: underlay `198.18.0.<id>`, pod CIDR `198.19.<id>.0/24`,
    /// no WireGuard key published yet.
    pub(crate) fn for_test(name: &str, id: u32) -> Node {
        Node {
            name: name.into(),
            id,
            underlay_ip: Ipv4Addr::new(198, 18, 0, id as u8).into(),
            underlay_ipv6: None,
            pod_cidr: format!("198.19.{id}.0/24"),
            pod_cidr_v6: None,
            wg_public_key: None,
            wg_next_public_key: None,
        }
    }
}

/// Test pods for the modules that work on a [`ClusterState`].
#[cfg(test)]
impl Pod {
    /// Pod `name` of namespace `shop` on `node` at `ip`, labelled `app: <name>`, its service
    /// account its name, with security identity `identity`; no IPv6 address.
    pub(crate) fn for_test(name: &str, node: &str, ip: [u8; 4], identity: u32) -> Pod {
        Pod {
            name: name.into(),
            namespace: "shop".into(),
            node: node.into(),
            ip: Ipv4Addr::from(ip).into(),
            ipv6: None,
            labels: Arc::new(BTreeMap::from([("app".into(), name.into())])),
            service_account: name.into(),
            host_veth: "x".into(),
            identity,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, ip: [u8; 4]) -> Pod {
        Pod::for_test(name, "node-a", ip, 0)
    }

    #[test]
    fn lookups_by_ip_and_name_use_the_index_and_find_the_first() {
        let s = ClusterState {
            nodes: vec![
                Node::for_test("node-a", 1),
                Node::for_test("node-b", 2),
                Node::for_test("node-a", 3),
            ],
            pods: (0..1000u32)
                .map(|i| {
                    pod(
                        &format!("p{i}"),
                        [198, 19, (i / 250) as u8, (i % 250) as u8],
                    )
                })
                .chain([pod("dup", [198, 19, 0, 0])])
                .map(Arc::new)
                .collect::<Vec<_>>()
                .into(),
            ..ClusterState::default()
        };
        assert_eq!(
            s.pod_by_ip(Ipv4Addr::new(198, 19, 3, 249)).unwrap().name,
            "p999"
        );
        assert_eq!(
            s.pod_by_ip(Ipv4Addr::new(198, 19, 0, 0)).unwrap().name,
            "p0"
        );
        assert!(s.pod_by_ip(Ipv4Addr::new(198, 19, 9, 9)).is_none());
        assert_eq!(s.node("node-a").unwrap().id, 1);
        assert_eq!(s.node("node-b").unwrap().id, 2);
        assert!(s.node("node-c").is_none());
        // A copy (a new snapshot) builds its own index and compares equal.
        let c = s.clone();
        assert_eq!(c, s);
        assert_eq!(c.node("node-b").unwrap().id, 2);
    }

    /// A snapshot takes over the last one's index only with the very same pod list: one whose
    /// pods changed (a new list, even with equal contents) builds its own, so no lookup answers
    /// from a stale table.
    #[test]
    fn index_shared_only_with_the_same_pod_list() {
        let pod = |name: &str, last: u8| pod(name, [198, 19, 1, last]);
        let last = ClusterState {
            nodes: vec![Node::for_test("node-a", 1)],
            pods: pod_list([pod("a", 10)]),
            ..ClusterState::default()
        };
        let index = |s: &ClusterState| s.index.0.get().map(Arc::as_ptr);
        // Not built yet: nothing to share.
        let early = last.clone();
        early.share_index(&last);
        assert_eq!(index(&early), None);
        assert_eq!(
            last.pod_by_ip(Ipv4Addr::new(198, 19, 1, 10)).unwrap().name,
            "a"
        );
        // A policy change: the same list, shared.
        let policy_change = ClusterState {
            policy_generation: 1,
            ..last.clone()
        };
        policy_change.share_index(&last);
        assert!(index(&last).is_some());
        assert_eq!(index(&policy_change), index(&last));
        // A pod moved to another address: a new list; its own index finds it.
        let moved = ClusterState {
            pods: pod_list([pod("a", 11)]),
            ..last.clone()
        };
        moved.share_index(&last);
        assert_eq!(index(&moved), None);
        assert_eq!(
            moved.pod_by_ip(Ipv4Addr::new(198, 19, 1, 11)).unwrap().name,
            "a"
        );
        assert!(moved.pod_by_ip(Ipv4Addr::new(198, 19, 1, 10)).is_none());
        // An equal list that is not the same one is not trusted either; nor are other nodes.
        let copied = ClusterState {
            pods: Arc::new((*last.pods).clone()),
            ..last.clone()
        };
        copied.share_index(&last);
        assert_eq!(index(&copied), None);
        let renodes = ClusterState {
            nodes: vec![Node::for_test("node-a", 2)],
            ..last.clone()
        };
        renodes.share_index(&last);
        assert_eq!(index(&renodes), None);
    }

    #[test]
    fn cidr_parsing() {
        assert_eq!(
            parse_cidr_v4("198.19.2.0/24"),
            Some((Ipv4Addr::new(198, 19, 2, 0), 24))
        );
        assert_eq!(parse_cidr_v4("198.19.2.0/33"), None);
        assert_eq!(parse_cidr_v4("198.19.2.0"), None);
        assert_eq!(parse_cidr_v4("x/24"), None);
        assert_eq!(parse_cidr_v4("fd00:198:19:2::/64"), None);
        assert_eq!(
            parse_cidr("fd00:198:19:2::1/64"),
            Some(("fd00:198:19:2::".parse().unwrap(), 64))
        );
    }

    #[test]
    fn unknown_fields_in_state_are_errors() {
        let bad =
            r#"{"generation":1,"cluster":"c","trust_domain":"t","nodes":[],"pods":[],"extra":1}"#;
        assert!(serde_json::from_str::<ClusterState>(bad).is_err());
    }
}
