//! A simulated cluster around a files-mode lab's real nodes, written through the agent's real
//! cluster source (`cluster.json`, `policies.json`): N peer nodes that nothing answers, E remote
//! endpoints (pods without processes) over a number of identities, and R policy rules. Used by
//! `scale-bench` (issue 20's measurements) and the scale scenario's test (35), so both build the
//! same cluster.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::Path,
};

use anyhow::{bail, Context as _};
use serde_json::{json, Value};
use veil_common::maps::{IpInfo, IpKey, IPCACHE};

use crate::{
    cluster::{ClusterState, Identity, Node, Pod},
    datapath::maps::Prefix,
    policy::PolicySet,
};

/// A simulated cluster's size: `NODES:ENDPOINTS:RULES`.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Size {
    pub nodes: usize,
    pub endpoints: usize,
    pub rules: usize,
}

impl std::str::FromStr for Size {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let num = |i: usize, what: &str| -> Result<usize, String> {
            parts
                .get(i)
                .and_then(|p| p.parse::<usize>().ok())
                .filter(|n| *n > 0)
                .ok_or_else(|| {
                    format!("size {s:?}: {what} must be a positive number (NODES:ENDPOINTS:RULES)")
                })
        };
        if parts.len() != 3 {
            return Err(format!("size {s:?}: expected NODES:ENDPOINTS:RULES"));
        }
        Ok(Size {
            nodes: num(0, "NODES")?,
            endpoints: num(1, "ENDPOINTS")?,
            rules: num(2, "RULES")?,
        })
    }
}

/// Address space for the simulated pod CIDRs: the lab's 198.18.0.0/15 without its underlay
/// (198.18.0.0/20, the simulated nodes' underlay addresses included), its ClusterIPs
/// (198.18.16.0/20) and its real nodes' pod CIDRs (198.19.0.0/22).
pub const FREE: [(Ipv4Addr, u8); 9] = [
    (Ipv4Addr::new(198, 18, 32, 0), 19),
    (Ipv4Addr::new(198, 18, 64, 0), 18),
    (Ipv4Addr::new(198, 18, 128, 0), 17),
    (Ipv4Addr::new(198, 19, 4, 0), 22),
    (Ipv4Addr::new(198, 19, 8, 0), 21),
    (Ipv4Addr::new(198, 19, 16, 0), 20),
    (Ipv4Addr::new(198, 19, 32, 0), 19),
    (Ipv4Addr::new(198, 19, 64, 0), 18),
    (Ipv4Addr::new(198, 19, 128, 0), 17),
];

/// Namespaces of the simulated identities (identities / NAMESPACES apps each).
pub const NAMESPACES: usize = 20;

/// The simulated nodes' pod CIDRs: /25s while the rest still fit as /26s, then /26s. Each is
/// (network, prefix length).
pub fn pod_cidrs(nodes: usize) -> anyhow::Result<Vec<(u32, u8)>> {
    let free: u64 = FREE.iter().map(|(_, l)| 1u64 << (32 - l)).sum();
    if nodes as u64 * 64 > free {
        bail!("{nodes} simulated nodes do not fit in the lab's address space as /26s");
    }
    let big = ((free - nodes as u64 * 64) / 64).min(nodes as u64) as usize;
    let mut out = Vec::with_capacity(nodes);
    let mut regions = FREE
        .iter()
        .map(|(a, l)| (u32::from(*a), u32::from(*a) + (1 << (32 - l))));
    let (mut next, mut end) = regions.next().expect("regions");
    for i in 0..nodes {
        let len = if i < big { 25 } else { 26 };
        let size = 1u32 << (32 - len);
        while next + size > end {
            (next, end) = regions.next().context("address space exhausted")?;
        }
        out.push((next, len));
        next += size;
    }
    Ok(out)
}

pub fn sim_identity(i: usize, identities: usize) -> (String, String) {
    let per_ns = identities.div_ceil(NAMESPACES);
    (format!("ns-{}", i / per_ns), format!("app-{}", i % per_ns))
}

/// `base` (the lab's own nodes, pods and identities) with the simulated cluster of `size`
/// around it.
pub fn simulate(
    base: &ClusterState,
    size: Size,
    identities: usize,
) -> anyhow::Result<ClusterState> {
    let mut state = base.clone();
    let first_node = base.nodes.iter().map(|n| n.id).max().unwrap_or(0) + 1;
    let first_id = base.identities.iter().map(|i| i.id).max().unwrap_or(255) + 1;
    for i in 0..identities {
        let (namespace, app) = sim_identity(i, identities);
        state.identities.push(Identity {
            id: first_id + i as u32,
            namespace,
            service_account: app.clone(),
            labels: [("app".to_string(), app)].into(),
            namespace_labels: Default::default(),
        });
    }
    let cidrs = pod_cidrs(size.nodes)?;
    for (i, (net, len)) in cidrs.iter().enumerate() {
        state.nodes.push(Node {
            name: format!("sim-{i:04}"),
            id: first_node + i as u32,
            // 198.18.4.1 onwards (198.18.4.0/22): lab addresses no interface holds.
            underlay_ip: Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 4, 1)) + i as u32).into(),
            underlay_ipv6: None,
            pod_cidr: format!("{}/{len}", Ipv4Addr::from(*net)),
            pod_cidr_v6: None,
            wg_public_key: None,
            wg_next_public_key: None,
        });
    }
    // Pods round-robin over the nodes with room: .2 up to the last address before broadcast.
    let mut used = vec![0u32; cidrs.len()];
    let mut node = 0;
    for e in 0..size.endpoints {
        let mut tried = 0;
        while used[node] + 3 >= 1 << (32 - cidrs[node].1) {
            node = (node + 1) % cidrs.len();
            tried += 1;
            if tried > cidrs.len() {
                bail!(
                    "{} endpoints do not fit in {} nodes",
                    size.endpoints,
                    size.nodes
                );
            }
        }
        let ip = Ipv4Addr::from(cidrs[node].0 + 2 + used[node]);
        used[node] += 1;
        let k = e % identities;
        let ident = &state.identities[base.identities.len() + k];
        std::sync::Arc::make_mut(&mut state.pods).push(
            Pod {
                name: format!("ep-{e}"),
                namespace: ident.namespace.clone(),
                node: format!("sim-{node:04}"),
                ip: ip.into(),
                ipv6: None,
                labels: ident.labels.clone().into(),
                service_account: ident.service_account.clone(),
                host_veth: String::new(),
                identity: ident.id,
            }
            .into(),
        );
        node = (node + 1) % cidrs.len();
    }
    state.generation = base.generation + 1;
    Ok(state)
}

/// Rule `i` as a CiliumNetworkPolicy object: over the simulated identities; every 100th selects
/// node-a's `client` pods (namespace `bench`) from a simulated identity. `port_shift` changes
/// rule 0's port (the measured policy change).
pub fn rule_object(i: usize, identities: usize, port_shift: u16) -> Value {
    let (ns, app) = sim_identity(i % identities, identities);
    let (from_ns, from_app) = sim_identity((i * 7 + 3) % identities, identities);
    let port = 1000 + (i % 500) as u16 + if i == 0 { port_shift } else { 0 };
    let (namespace, selected) = if i.is_multiple_of(100) {
        ("bench".to_string(), "client".to_string())
    } else {
        (ns, app)
    };
    json!({
        "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
        "metadata": {"name": format!("r{i}"), "namespace": namespace},
        "spec": {
            "endpointSelector": {"matchLabels": {"app": selected}},
            "ingress": [{
                "fromEndpoints": [{"matchLabels": {"app": from_app,
                                                   "k8s:io.kubernetes.pod.namespace": from_ns}}],
                "toPorts": [{"ports": [{"port": port.to_string(), "protocol": "TCP"}]}],
            }],
        },
    })
}

/// R rules, one policy each ([`rule_object`]), plus `auth-all`: node-a's `idle` pods accept
/// 9000 only from authenticated peers, from every namespace.
pub fn policy_objects(rules: usize, identities: usize, port_shift: u16) -> Vec<Value> {
    let mut out: Vec<Value> = (0..rules)
        .map(|i| rule_object(i, identities, port_shift))
        .collect();
    out.push(json!({
        "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "auth-all", "namespace": "bench"},
        "spec": {
            "endpointSelector": {"matchLabels": {"app": "idle"}},
            "ingress": [{
                "fromEndpoints": [{"matchExpressions": [
                    {"key": "k8s:io.kubernetes.pod.namespace", "operator": "Exists"}]}],
                "authentication": {"mode": "required"},
                "toPorts": [{"ports": [{"port": "9000", "protocol": "TCP"}]}],
            }],
        },
    }));
    out
}

/// The objects as the files source's policy set (JSON documents are YAML).
pub fn policy_set(objects: &[Value]) -> anyhow::Result<PolicySet> {
    let yaml: String = objects.iter().map(|o| format!("---\n{o}\n")).collect();
    let mut set = PolicySet::new();
    set.apply_all(crate::policy::parse_yaml(&yaml).context("generated policies")?)
        .context("generated policies")?;
    Ok(set)
}

/// A node's pinned ipcache (the agent's `VEIL_IPCACHE`), opened from outside the agent.
pub fn ipcache(
    pin_dir: &Path,
) -> anyhow::Result<aya::maps::LpmTrie<aya::maps::MapData, IpKey, IpInfo>> {
    let path = pin_dir.join(IPCACHE);
    let data = aya::maps::MapData::from_pin(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    Ok(aya::maps::LpmTrie::try_from(aya::maps::Map::LpmTrie(data))?)
}

/// The identity the ipcache holds for one address (its host prefix), if any.
pub fn ipcache_identity(
    map: &aya::maps::LpmTrie<aya::maps::MapData, IpKey, IpInfo>,
    ip: IpAddr,
) -> Option<u32> {
    let p = Prefix::host(ip);
    let key = aya::maps::lpm_trie::Key::new(p.len, IpKey { addr: p.addr });
    map.get(&key, 0).ok().map(|v| v.identity)
}
