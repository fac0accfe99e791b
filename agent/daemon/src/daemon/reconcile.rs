//! daemon::reconcile: brings the node in line with the cluster state (tunnel peers, program
//! attachments, SVID subscriptions, the ipcache and node table) and recompiles policy when its
//! input changes. One pass is synchronous and idempotent; the loop in `daemon` decides when.

use std::{collections::BTreeSet, sync::Arc};

use veil_common::{
    maps::{self as map_names, ip_flags, node_flags, IpInfo, NodeInfo},
    programs,
};
use veil_identity::{SelectorSet, SvidSource as _};

use super::{state::Shared, HOLD_DEVICE};
use crate::{
    api,
    cluster::{self, ClusterState},
    datapath::{
        self,
        maps::{Entries, IpCacheMap, KernelHash, Prefix},
        policy as dp_policy, Hook,
    },
};

/// Errors of one reconcile pass (retried on the next).
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Datapath(#[from] datapath::Error),
    #[error("{0}")]
    Map(&'static str, #[source] Box<datapath::Error>),
    #[error(transparent)]
    Tunnel(#[from] crate::tunnel::Error),
    /// Fatal: the datapath, the mesh and the auth table were built with this node's id.
    #[error("this node's id changed from {from} to {to} in the cluster state; the datapath, auth entries and workload handshakes hold the old one, so the agent exits to start again with the new one")]
    NodeIdChanged { from: u32, to: u32 },
}

/// Brings the node in line with the cluster state: tunnel peers and routes, programs on every
/// local pod veth and on the tunnel device, the ipcache and node table exactly as the state says.
pub(super) fn reconcile(s: &mut Shared) -> Result<(), ReconcileError> {
    let cluster = s.cluster.clone();
    let me = s.cfg.node.clone();
    let mut first_error: Option<ReconcileError> = None;
    // Ids do not follow addresses (`cluster::kubernetes::with_ids`); one changes only when
    // an edited lab file says so or an older node of the same id hash leaves.
    if let Some(n) = cluster.node(&me) {
        let from = s.datapath.config_map()?.get()?.node_id;
        if n.id != from {
            return Err(ReconcileError::NodeIdChanged { from, to: n.id });
        }
    }
    // Peers first: a node only gets HAS_KEY (and so traffic) once its peer is on the device.
    let auth_keys = s.mesh_keys.as_ref().map(|rx| rx.borrow().clone());
    let with_key = match s
        .tunnel
        .as_mut()
        .map(|t| t.reconcile(&cluster, &me, auth_keys.as_ref()))
    {
        Some(Ok(nodes)) => nodes,
        Some(Err(e)) => {
            tracing::warn!(error = %crate::error_chain(&e), "tunnel reconcile failed");
            first_error.get_or_insert(e.into());
            Default::default()
        }
        None => Default::default(),
    };
    if let Some(t) = &s.tunnel {
        let ifname = t.interface().to_string();
        let ifindex = nix::net::if_::if_nametoindex(ifname.as_str()).unwrap_or(0);
        let mut cm = s.datapath.config_map()?;
        let mut c = cm.get()?;
        if c.tunnel_ifindex != ifindex {
            c.tunnel_ifindex = ifindex;
            cm.set(c)?;
        }
        let hold = (c.hold_ifindex != 0).then_some(HOLD_DEVICE);
        // Tunnel ingress (decrypted packets), tunnel egress (no host process may pose as a
        // pod), hold ingress (released packets are checked, tracked and marked).
        let mut hooks = vec![
            (programs::FROM_TUNNEL, ifname.clone(), Hook::TcxIngress),
            (programs::TO_TUNNEL, ifname.clone(), Hook::TcxEgress),
        ];
        if let Some(h) = hold {
            hooks.push((programs::FROM_HOLD, h.to_string(), Hook::TcxIngress));
        }
        for (program, interface, hook) in hooks {
            if let Err(e) = s.datapath.attach(program, &interface, hook) {
                tracing::warn!(interface = %interface, program, error = %crate::error_chain(&e), "cannot attach");
                first_error.get_or_insert(e.into());
            }
        }
    }
    // Underlay ingress, with or without encryption: with it, no plaintext for pods from other
    // nodes; without it (the capture sanity check), the ingress checks pod traffic from other
    // nodes gets, as from the tunnel.
    let underlay_ip = cluster.node(&me).map(|n| n.underlay_ip);
    let underlay = underlay_ip.and_then(interface_with_address);
    let found = underlay.is_some();
    match underlay.or_else(|| s.underlay_if.clone()) {
        Some(u) => {
            if !found {
                // The address moved off (a renumbering under way): the programs stay where
                // they are, still filtering, until the interface holding it is known.
                tracing::warn!(underlay_ip = ?underlay_ip, interface = %u, "this node's underlay address is on no interface: the underlay programs stay on the last one");
            }
            s.underlay_if = Some(u.clone());
            // With node encryption, underlay egress too: node traffic goes into the tunnel.
            let mut hooks = vec![(programs::FROM_UNDERLAY, Hook::TcxIngress)];
            if s.cfg.node_encryption && s.cfg.encryption {
                hooks.push((programs::TO_UNDERLAY, Hook::TcxEgress));
                warn_if_second_underlay_elsewhere(cluster.node(&me), &u);
            }
            for (program, hook) in hooks {
                if let Err(e) = s.datapath.attach(program, &u, hook) {
                    tracing::warn!(interface = %u, program, error = %crate::error_chain(&e), "cannot attach to the underlay");
                    first_error.get_or_insert(e.into());
                }
            }
        }
        None => tracing::warn!(
            "no interface holds this node's underlay address: plaintext from the underlay is not filtered"
        ),
    }
    for pod in cluster.pods_on(&me) {
        for (program, hook) in [
            (programs::FROM_POD, Hook::TcxIngress),
            (programs::TO_POD, Hook::TcxEgress),
        ] {
            if let Err(e) = s.datapath.attach(program, &pod.host_veth, hook) {
                tracing::warn!(pod = %format!("{}/{}", pod.namespace, pod.name), program, error = %crate::error_chain(&e), "cannot attach");
                first_error.get_or_insert(e.into());
            }
        }
    }
    s.datapath.prune_pins();
    s.datapath.settle_set_aside();
    if let Some(ids) = &s.identities {
        // Subscribe to the SVIDs of exactly the pods on this node.
        let want: BTreeSet<SelectorSet> = cluster
            .pods_on(&me)
            .filter_map(|p| SelectorSet::k8s_pod(&p.namespace, &p.service_account, &p.name).ok())
            .collect();
        for gone in s.watched.difference(&want) {
            ids.unwatch_workload(gone);
        }
        for new in want.difference(&s.watched) {
            ids.watch_workload(new.clone());
        }
        s.watched = want;
    }
    let node_encryption = s.cfg.encryption && s.cfg.node_encryption;
    let unchanged = s
        .maps_input
        .as_ref()
        .is_some_and(|i| i.same(&cluster, &with_key, node_encryption));
    if !unchanged {
        s.maps_input = None;
        let (ipcache, nodes) = desired_maps(&cluster, &me, &with_key, node_encryption);
        // A map that cannot take every entry (full) keeps what fits; the rest of the pass
        // still runs (policy above all), and the failure is this pass's error (and the next's:
        // only a complete write is remembered). An endpoint left out of the ipcache is matched
        // by its node's pod CIDR entry: unknown identity, so policy drops it (fail closed).
        let ipcache_synced = IpCacheMap::new(s.datapath.ebpf_mut())
            .and_then(|mut m| s.ipcache_written.sync(&mut m, ipcache));
        let nodes_synced =
            KernelHash::<u32, NodeInfo>::new(s.datapath.ebpf_mut(), map_names::NODES)
                .and_then(|mut m| s.nodes_written.sync(&mut m, nodes));
        match (ipcache_synced, nodes_synced) {
            (Ok(_), Ok(_)) => {
                s.maps_input = Some(super::state::MapsInput {
                    pods: cluster.pods.clone(),
                    nodes: cluster.nodes.clone(),
                    with_key,
                    node_encryption,
                })
            }
            (i, n) => {
                if let Err(e) = i {
                    first_error.get_or_insert(ReconcileError::Map("ipcache", Box::new(e)));
                }
                if let Err(e) = n {
                    first_error.get_or_insert(ReconcileError::Map("node table", Box::new(e)));
                }
            }
        }
    }
    if let Err(e) = reconcile_policy(s, &cluster, &me) {
        first_error.get_or_insert(e.into());
    }
    reconcile_proxy(s, &cluster, &me);
    if let Err(e) = reconcile_services(s, &cluster) {
        tracing::warn!(error = %crate::error_chain(&e), "services not installed");
        first_error.get_or_insert(e.into());
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Writes the Service maps, then attaches the socket programs that read them to the pods'
/// cgroup (once; a no-op when this node balances no Services).
fn reconcile_services(s: &mut Shared, cluster: &ClusterState) -> Result<(), datapath::Error> {
    let Some(cgroup) = s.cfg.service_cgroup.clone() else {
        return Ok(());
    };
    // Socket programs that did not load (a kernel before 5.18) leave Services unbalanced on
    // this node, said once at load and in `veil status`; the rest of the node must still become
    // ready, so this is not a reconcile failure.
    if s.datapath.sock_error().is_some() {
        return Ok(());
    }
    if s.services_input.as_ref() != Some(&cluster.services) {
        let changes = datapath::services::install(s.datapath.ebpf_mut(), &cluster.services)?;
        tracing::info!(
            services = cluster.services.len(),
            changes,
            "services installed"
        );
        s.services_input = Some(cluster.services.clone());
    }
    s.datapath.attach_sockets(&cgroup)
}

/// Node encryption steers the interface holding the node's first underlay address: a
/// dual-stack node's IPv6 address on another interface is not steered, so traffic from it to
/// other nodes would leave in clear. Said at WARN, at most once a minute (see ARCHITECTURE.md,
/// "A dual-stack underlay").
fn warn_if_second_underlay_elsewhere(me: Option<&crate::cluster::Node>, underlay_if: &str) {
    static LAST: std::sync::Mutex<Option<std::time::Instant>> = std::sync::Mutex::new(None);
    let Some(v6) = me.and_then(|n| n.underlay_ipv6) else {
        return;
    };
    let elsewhere = interface_with_address(v6.into()).filter(|i| i != underlay_if);
    if let Some(i) = elsewhere {
        if crate::warning_due(&LAST, std::time::Duration::from_secs(60)) {
            tracing::warn!(underlay_ipv6 = %v6, interface = %i, underlay_interface = %underlay_if, "this node's IPv6 underlay address is on another interface than its first: node traffic from it is not steered into the tunnel (said at most once a minute)");
        }
    }
}

/// The interface holding `addr` in this network namespace (the node's underlay interface).
fn interface_with_address(addr: std::net::IpAddr) -> Option<String> {
    nix::ifaddrs::getifaddrs().ok()?.find_map(|ifa| {
        let a = ifa.address?;
        let ip = match (a.as_sockaddr_in(), a.as_sockaddr_in6()) {
            (Some(sin), _) => std::net::IpAddr::V4(sin.ip()),
            (_, Some(sin6)) => std::net::IpAddr::V6(sin6.ip()),
            _ => return None,
        };
        (ip == addr).then(|| ifa.interface_name.clone())
    })
}

/// Logs, once per agent run, that flow events were lost to a full ring buffer: the flow log
/// has gaps (how many: `veil status`, `veil_flow_events_lost_total`). The packets themselves
/// were judged as always; only their records are missing.
pub(super) fn log_events_lost(s: &mut Shared) {
    if s.events_lost_logged {
        return;
    }
    match datapath::maps::events_lost(s.datapath.ebpf()) {
        Ok(0) => {}
        Ok(lost) => {
            tracing::warn!(lost, "flow events lost: the datapath's ring buffer was full (the agent fell behind); flow records are missing, packets were judged as always (counted in veil_flow_events_lost_total; logged once)");
            s.events_lost_logged = true;
        }
        Err(e) => tracing::debug!(error = %e, "cannot read the lost flow events counter"),
    }
}

/// Compiles the cluster's policies for this node's endpoints and installs them atomically when
/// the input changed. A policy that does not compile leaves the previous one in force.
fn reconcile_policy(
    s: &mut Shared,
    cluster: &ClusterState,
    me: &str,
) -> Result<(), datapath::Error> {
    let mut locals: Vec<u32> = cluster
        .pods_on(me)
        .map(|p| p.identity)
        .filter(|i| *i != 0)
        .collect();
    locals.sort_unstable();
    locals.dedup();
    let input = (
        cluster.policy_generation,
        cluster.identities.clone(),
        locals.clone(),
    );
    if s.policy_input.as_ref() == Some(&input) {
        return Ok(());
    }
    let started = std::time::Instant::now();
    let compiled = crate::policy::compile(&cluster.policies, &cluster.identity_table(), &locals);
    match compiled {
        Ok(c) => {
            // Not installed (the idle slot refused writes): the live slot keeps the previous
            // policy whole, `veil status` says which generation did not go in, and the next
            // reconcile tries again (the input is remembered only once installed).
            let changes = match dp_policy::install(s.datapath.ebpf_mut(), &c.entries) {
                Ok(n) => n,
                Err(e) => {
                    s.policy.last_error = Some(format!(
                        "generation {} not installed, previous policy stays in force: {}",
                        cluster.policy_generation,
                        crate::error_chain(&e)
                    ));
                    return Err(e);
                }
            };
            s.policy_input = Some(input);
            let pruned = dp_policy::prune_conntrack(s.datapath.ebpf_mut(), &c.entries)?;
            let _ = s.policy_tx.send(Arc::new(c.entries.clone()));
            s.l7_rules = c.l7.clone();
            tracing::info!(
                generation = cluster.policy_generation,
                policies = cluster.policies.len(),
                entries = c.entries.len(),
                changes,
                conntrack_cut = pruned,
                took_ms = started.elapsed().as_millis() as u64,
                "policy installed"
            );
            s.policy = api::PolicyStatus {
                generation: cluster.policy_generation,
                policies: cluster
                    .policies
                    .iter()
                    .map(|p| p.name().to_string())
                    .collect(),
                entries: c.entries.len(),
                conntrack_cut: pruned,
                last_error: None,
            };
        }
        Err(e) => {
            s.policy_input = Some(input);
            tracing::error!(generation = cluster.policy_generation, error = %e, "policy does not compile; previous policy stays in force");
            s.policy.last_error = Some(format!("generation {}: {e}", cluster.policy_generation));
        }
    }
    Ok(())
}

/// Sends the L7 proxy its configuration when it changed: the pods' addresses and identities
/// and the HTTP rules of the policy in force.
fn reconcile_proxy(s: &mut Shared, cluster: &ClusterState, me: &str) {
    // Its endpoint table is O(endpoints): not rebuilt while the pod list is the same one.
    let same_pods = s
        .proxy_pods
        .as_ref()
        .is_some_and(|p| Arc::ptr_eq(p, &cluster.pods));
    if same_pods && {
        let cur = s.proxy_tx.borrow();
        cur.generation == cluster.policy_generation && cur.rules == s.l7_rules
    } {
        return;
    }
    s.proxy_pods = Some(cluster.pods.clone());
    let cfg = crate::l7::ProxyConfig {
        generation: cluster.policy_generation,
        endpoints: proxy_endpoints(cluster, me, &s.l7_rules),
        rules: s.l7_rules.clone(),
    };
    s.proxy_tx.send_if_modified(|cur| {
        let changed = **cur != cfg;
        if changed {
            *cur = Arc::new(cfg);
        }
        changed
    });
}

/// The endpoints the L7 proxy identifies connections' peers by: every pod with an identity,
/// while any L7 rule exists; none without one (no connection goes to the proxy then, and at
/// 100,000 endpoints the table was 3 MB kept and sent for nothing).
fn proxy_endpoints(
    cluster: &ClusterState,
    me: &str,
    rules: &[crate::policy::compile::L7Rule],
) -> Vec<crate::l7::ProxyEndpoint> {
    if rules.is_empty() {
        return Vec::new();
    }
    cluster
        .pods
        .iter()
        .filter(|p| p.identity != 0)
        .flat_map(|p| {
            p.addrs().map(|ip| crate::l7::ProxyEndpoint {
                ip,
                identity: p.identity,
                local: p.node == me,
            })
        })
        .collect()
}

/// The ipcache and node table this node should have for a cluster state.
pub fn desired_maps(
    cluster: &ClusterState,
    me: &str,
    with_key: &std::collections::BTreeSet<String>,
    node_encryption: bool,
) -> (Entries<Prefix, IpInfo>, Entries<u32, NodeInfo>) {
    // Pushed in any order and sorted once; of an address given twice the later entry stays.
    let mut ipcache = Vec::with_capacity(cluster.pods.len() + 2 * cluster.nodes.len());
    let mut nodes = Vec::with_capacity(cluster.nodes.len());
    for n in &cluster.nodes {
        let cidrs = || n.pod_cidrs().filter_map(cidr_prefix);
        for (cidr, _) in cidrs() {
            ipcache.push((
                cidr,
                IpInfo {
                    identity: 0,
                    node_id: n.id,
                    flags: ip_flags::POD_CIDR,
                    ifindex: 0,
                },
            ));
        }
        if n.name == me {
            // This node's own addresses: its underlay addresses and its pod-network gateways
            // (the first address of each pod CIDR, the source of its traffic to local pods).
            let host = IpInfo {
                identity: veil_common::maps::identity::HOST,
                node_id: n.id,
                flags: ip_flags::HOST,
                ifindex: 0,
            };
            for ip in n.underlay_ips() {
                ipcache.push((Prefix::host(ip), host));
            }
            for (_, gw) in cidrs() {
                ipcache.push((Prefix::host(gw), host));
            }
        } else if node_encryption {
            // Another node's own addresses (both of a dual-stack underlay's node): with node
            // encryption, traffic to them enters the tunnel (`veil_to_underlay`), and policy
            // sees it as the remote-node entity.
            for ip in n.underlay_ips() {
                ipcache.push((
                    Prefix::host(ip),
                    IpInfo {
                        identity: veil_common::maps::identity::REMOTE_NODE,
                        node_id: n.id,
                        flags: ip_flags::NODE,
                        ifindex: 0,
                    },
                ));
            }
        }
        let mut flags = if n.name == me { node_flags::SELF } else { 0 };
        if with_key.contains(&n.name) {
            flags |= node_flags::HAS_KEY;
        }
        nodes.push((n.id, NodeInfo { flags, _pad: 0 }));
    }
    for p in cluster.pods.iter() {
        let Some(node) = cluster.node(&p.node) else {
            continue;
        };
        let local = p.node == me;
        let ifindex = if local {
            nix::net::if_::if_nametoindex(p.host_veth.as_str()).unwrap_or(0)
        } else {
            0
        };
        let flags = ip_flags::POD | if local { ip_flags::LOCAL_POD } else { 0 };
        let identity = if p.identity != 0 {
            p.identity
        } else {
            veil_common::maps::identity::UNKNOWN
        };
        let info = IpInfo {
            identity,
            node_id: node.id,
            flags,
            ifindex,
        };
        for a in p.addrs() {
            ipcache.push((Prefix::host(a), info));
        }
    }
    (ipcache.into_iter().collect(), nodes.into_iter().collect())
}

/// A pod CIDR as an ipcache prefix, with its first address (the node's gateway on it).
fn cidr_prefix(s: &str) -> Option<(Prefix, std::net::IpAddr)> {
    use std::net::IpAddr;
    Some(match cluster::parse_cidr(s)? {
        (IpAddr::V4(net), len) => {
            let gw = std::net::Ipv4Addr::from(u32::from(net).wrapping_add(1));
            (Prefix::v4(net, len), IpAddr::V4(gw))
        }
        (IpAddr::V6(net), len) => {
            let gw = std::net::Ipv6Addr::from(u128::from(net).wrapping_add(1));
            (Prefix::v6(net, len), IpAddr::V6(gw))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    use crate::cluster::{Node, Pod};
    use veil_common::maps::identity;

    fn state() -> ClusterState {
        let pod = |name: &str, node: &str, ip: [u8; 4]| Pod {
            host_veth: "lxc-does-not-exist".into(),
            ..Pod::for_test(name, node, ip, 256)
        };
        ClusterState {
            generation: 1,
            cluster: "t".into(),
            trust_domain: "lab.veil".into(),
            nodes: vec![Node::for_test("a", 1), Node::for_test("b", 2)],
            pods: crate::cluster::pod_list([
                pod("fe", "a", [198, 19, 1, 10]),
                pod("be", "b", [198, 19, 2, 10]),
            ]),
            ..Default::default()
        }
    }

    /// The maps are rebuilt unless the pod list is the one they were written from (by
    /// pointer) and nodes, keyed peers and the encryption setting are as they were.
    #[test]
    fn maps_are_rebuilt_unless_their_input_is_the_same() {
        let written = state();
        let with_key: BTreeSet<String> = ["b".to_string()].into();
        let input = crate::daemon::state::MapsInput {
            pods: written.pods.clone(),
            nodes: written.nodes.clone(),
            with_key: with_key.clone(),
            node_encryption: false,
        };
        // A policy change: the next snapshot shares the list.
        let policy_change = ClusterState {
            policy_generation: 7,
            ..written.clone()
        };
        assert!(input.same(&policy_change, &with_key, false));
        // A pod added, or the same pods parsed again: a new list.
        let mut added = written.clone();
        let mut pods = (*written.pods).clone();
        pods.push(pods[0].clone());
        added.pods = pods.into();
        assert!(!input.same(&added, &with_key, false));
        let reparsed = ClusterState {
            pods: Arc::new((*written.pods).clone()),
            ..written.clone()
        };
        assert!(!input.same(&reparsed, &with_key, false));
        // A node's pod CIDR, a peer's key, node encryption.
        let mut renumbered = written.clone();
        renumbered.nodes[1].pod_cidr = "198.19.9.0/24".into();
        assert!(!input.same(&renumbered, &with_key, false));
        assert!(!input.same(&written, &BTreeSet::new(), false));
        assert!(!input.same(&written, &with_key, true));
    }

    /// The proxy learns the endpoints while an L7 rule exists, and none without one.
    #[test]
    fn the_proxy_gets_endpoints_only_with_l7_rules() {
        let cluster = state();
        assert!(proxy_endpoints(&cluster, "a", &[]).is_empty());
        let rule = crate::policy::compile::L7Rule {
            local: 256,
            direction: "ingress".into(),
            remotes: vec![veil_common::maps::identity::ANY],
            ports: vec![(80, 6)],
            http: None,
            audit: false,
        };
        let endpoints = proxy_endpoints(&cluster, "a", &[rule]);
        let seen: Vec<_> = endpoints
            .iter()
            .map(|e| (e.ip.to_string(), e.identity, e.local))
            .collect();
        assert_eq!(
            seen,
            [
                ("198.19.1.10".to_string(), 256, true),
                ("198.19.2.10".to_string(), 256, false)
            ]
        );
    }

    #[test]
    fn desired_maps_cover_cidrs_pods_and_nodes() {
        let (ipcache, nodes) = desired_maps(&state(), "a", &["b".to_string()].into(), false);
        // Two pod CIDRs, two pods, and this node's own underlay address and gateway.
        assert_eq!(ipcache.len(), 6);
        for own in [Ipv4Addr::new(198, 18, 0, 1), Ipv4Addr::new(198, 19, 1, 1)] {
            let h = ipcache[&Prefix::v4(own, 32)];
            assert_eq!(
                (h.flags, h.identity),
                (ip_flags::HOST, identity::HOST),
                "{own}"
            );
        }
        assert!(!ipcache.contains_key(&Prefix::v4(Ipv4Addr::new(198, 18, 0, 2), 32)));
        let fe = ipcache[&Prefix::v4(Ipv4Addr::new(198, 19, 1, 10), 32)];
        assert_eq!(fe.flags, ip_flags::POD | ip_flags::LOCAL_POD);
        let be = ipcache[&Prefix::v4(Ipv4Addr::new(198, 19, 2, 10), 32)];
        assert_eq!((be.flags, be.node_id), (ip_flags::POD, 2));
        let cidr = ipcache[&Prefix::v4(Ipv4Addr::new(198, 19, 2, 0), 24)];
        assert_eq!((cidr.flags, cidr.node_id), (ip_flags::POD_CIDR, 2));
        assert_eq!(nodes[&1].flags, node_flags::SELF);
        assert_eq!(nodes[&2].flags, node_flags::HAS_KEY);
        let (_, nodes) = desired_maps(&state(), "a", &Default::default(), false);
        assert_eq!(nodes[&2].flags, 0, "no peer, no key: strict mode drops");
        // Node encryption: the other node's own address is known, as the remote-node entity.
        let (ipcache, _) = desired_maps(&state(), "a", &Default::default(), true);
        assert_eq!(ipcache.len(), 7);
        let b = ipcache[&Prefix::v4(Ipv4Addr::new(198, 18, 0, 2), 32)];
        assert_eq!(
            (b.flags, b.identity, b.node_id),
            (ip_flags::NODE, identity::REMOTE_NODE, 2)
        );
    }
}
