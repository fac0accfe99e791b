//! daemon::status: builds `api::Status` (`veil status`, `GET /v1/status`) from the agent's state,
//! the datapath's counters and attachments, the tunnel, the identities and the mesh.

use std::{collections::BTreeMap, time::UNIX_EPOCH};

use veil_common::maps as map_names;
use veil_identity::SvidKey;

use super::state::Shared;
use crate::{
    api,
    datapath::{self, policy as dp_policy, Datapath},
};

fn pod_names_by_veth(s: &Shared) -> BTreeMap<String, String> {
    s.cluster
        .pods_on(&s.cfg.node)
        .map(|p| (p.host_veth.clone(), format!("{}/{}", p.namespace, p.name)))
        .collect()
}

/// The node's status as `veil status` shows it.
pub(super) fn status(s: &mut Shared) -> Result<api::Status, datapath::Error> {
    let pods = pod_names_by_veth(s);
    let stats = datapath::maps::interface_stats(s.datapath.ebpf())?;
    let ifnames: BTreeMap<u32, String> = s
        .datapath
        .attachments()
        .map(|a| (a.ifindex, a.interface.clone()))
        .collect();
    let interfaces = stats
        .iter()
        .map(|(ifindex, st)| {
            let interface = ifnames
                .get(ifindex)
                .cloned()
                .unwrap_or_else(|| format!("if{ifindex}"));
            api::InterfaceCounters {
                pod: pods.get(&interface).cloned(),
                interface,
                ifindex: *ifindex,
                packets: st.packets,
                bytes: st.bytes,
            }
        })
        .collect();
    let programs = s
        .datapath
        .attachments()
        .map(|a| api::Program {
            name: a.program.to_string(),
            interface: a.interface.clone(),
            hook: a.hook.as_str().to_string(),
            program_id: a.program_id,
            link_id: a.link_id,
            pod: pods.get(&a.interface).cloned(),
            adopted: a.adopted,
        })
        .collect();
    let socket_programs = s
        .datapath
        .sock_attachments()
        .iter()
        .map(|a| api::Program {
            name: a.program.to_string(),
            interface: a.cgroup.display().to_string(),
            hook: "cgroup".to_string(),
            program_id: a.program_id,
            link_id: a.link_id,
            pod: None,
            adopted: a.adopted,
        })
        .collect();
    let services = s
        .cluster
        .services
        .iter()
        .map(api::ServiceStatus::from)
        .collect();
    let drops = datapath::maps::drops(s.datapath.ebpf())?
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    let events_lost = datapath::maps::events_lost(s.datapath.ebpf())?;
    let (svids, bundles) = identity_status(s);
    let mesh = s
        .mesh_status
        .as_ref()
        .map(|m| m.lock().expect("mesh status lock").clone())
        .unwrap_or_default();
    let cluster = s.cluster.clone();
    let (backend, public_key, peers, tunnel_restarts, tunnel_drops) = match s.tunnel.as_mut() {
        Some(t) => {
            // A device that did not answer for its peers is not asked again for its drops: a
            // hung veil-wg would hold the status request for a second read timeout.
            let (peers, drops) = match t.peers(&cluster) {
                Ok(peers) => {
                    // An older veil-wg (a cluster mid-upgrade) has no drop counters and
                    // refuses the request: said once a minute, not at every status.
                    let drops = t.drops().unwrap_or_else(|e| {
                        static LAST: std::sync::Mutex<Option<std::time::Instant>> =
                            std::sync::Mutex::new(None);
                        if crate::warning_due(&LAST, std::time::Duration::from_secs(60)) {
                            tracing::warn!(error = %crate::error_chain(&e), "cannot read tunnel drops (said at most once a minute)");
                        } else {
                            tracing::debug!(error = %crate::error_chain(&e), "cannot read tunnel drops");
                        }
                        BTreeMap::new()
                    });
                    (peers, drops)
                }
                Err(e) => {
                    tracing::warn!(error = %crate::error_chain(&e), "cannot read tunnel peers");
                    (Vec::new(), BTreeMap::new())
                }
            };
            let r = t.restarts();
            let restarts = api::TunnelRestarts {
                total: r.total,
                recent: r
                    .recent
                    .iter()
                    .map(|(t, why)| api::TunnelRestart {
                        time_unix: *t,
                        reason: why.to_string(),
                    })
                    .collect(),
            };
            (
                t.backend().as_str().to_string(),
                Some(t.public_key().to_base64()),
                peers,
                restarts,
                drops,
            )
        }
        None => (
            "none".to_string(),
            None,
            Vec::new(),
            api::TunnelRestarts::default(),
            BTreeMap::new(),
        ),
    };
    Ok(api::Status {
        node: s.cfg.node.clone(),
        cluster: s.cfg.cluster.clone(),
        ready: s.ready,
        reconcile_error: s.last_error.clone(),
        backend,
        interface: s.cfg.interface.clone(),
        listen_port: s.cfg.listen_port,
        public_key,
        encryption: s.cfg.encryption,
        node_encryption: s.cfg.encryption && s.cfg.node_encryption,
        strict: s.cfg.strict,
        peers,
        svids,
        bundles,
        auth: mesh.auth.clone(),
        auth_pairs: mesh.auth_pairs.clone(),
        policy: s.policy.clone(),
        audit: s.audit,
        maps: map_fill(&s.datapath),
        channels: mesh.channels,
        auth_failures: mesh.failures,
        listener: mesh.listener.counters(),
        hold: {
            let h = *s.hold_stats.lock().expect("hold stats lock");
            api::HoldStatus {
                held: h.held,
                released: h.released,
                timed_out: h.timed_out,
                overflow: h.overflow,
                unclassified: h.unclassified,
            }
        },
        drops,
        tunnel_drops,
        events_lost,
        programs,
        socket_programs,
        services,
        services_unavailable: s
            .cfg
            .service_cgroup
            .as_ref()
            .and(s.datapath.sock_error())
            .map(str::to_string),
        proxy: (s.cfg.proxy_port != 0)
            .then(|| s.proxy_status.lock().expect("proxy status lock").clone()),
        interfaces,
        agent: api::AgentInfo {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            started_unix: s.started_unix,
            restarts: s.restarts,
            pin_dir: s.cfg.pin_dir.display().to_string(),
        },
        tunnel_restarts,
    })
}

/// SVIDs (node first, then pods) and bundles as `veil status` shows them.
fn identity_status(s: &Shared) -> (Vec<api::Svid>, Vec<api::Bundle>) {
    let Some(ids) = &s.identities else {
        return (Vec::new(), Vec::new());
    };
    let snap = ids.current();
    let owner_of = |key: &SvidKey| match key {
        SvidKey::Node => "node".to_string(),
        SvidKey::Workload(sel) => {
            let get = |k: &str| {
                sel.iter()
                    .filter(|x| x.kind() == "k8s")
                    .find_map(|x| x.value().strip_prefix(&format!("{k}:")).map(str::to_string))
            };
            match (get("ns"), get("pod-name")) {
                (Some(ns), Some(name)) => format!("{ns}/{name}"),
                _ => "workload".to_string(),
            }
        }
    };
    let unix = |t: std::time::SystemTime| {
        t.duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    };
    let svids = snap
        .svids()
        .map(|(key, svid)| {
            let (issuer, authority_id) = issuer_of(svid.leaf());
            let (nb, na) = (unix(svid.not_before()), unix(svid.not_after()));
            api::Svid {
                spiffe_id: svid.spiffe_id().to_string(),
                owner: owner_of(&key),
                serial: svid.serial().to_string(),
                not_after_unix: na,
                issuer,
                authority_id,
                not_before_unix: nb,
                rotates_at_unix: nb + na.saturating_sub(nb) / 2,
            }
        })
        .collect();
    let bundles = snap
        .bundles
        .iter()
        .map(|(td, roots)| api::Bundle {
            trust_domain: td.to_string(),
            roots: roots.len(),
        })
        .collect();
    (svids, bundles)
}

/// The leaf's issuer name and authority key identifier (lowercase hex, as SPIRE prints an
/// authority ID).
fn issuer_of(leaf: &[u8]) -> (Option<String>, Option<String>) {
    use x509_parser::extensions::ParsedExtension;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(leaf) else {
        return (None, None);
    };
    let aki = cert
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(a) => a.key_identifier.as_ref().map(|k| {
                k.0.iter().fold(String::new(), |mut s, b| {
                    use std::fmt::Write as _;
                    let _ = write!(s, "{b:02x}");
                    s
                })
            }),
            _ => None,
        });
    (Some(cert.issuer().to_string()), aki)
}

/// Entries and capacity of the maps that grow with the cluster.
fn map_fill(dp: &Datapath) -> Vec<api::MapFill> {
    use veil_common::maps::{
        AuthEntry, AuthKey, CtEntry, CtKey, NodeInfo, PolicyEntry, PolicyKey, AUTH_MAX, CT_MAX,
        IPCACHE_MAX, NODES_MAX, POLICY_MAX,
    };
    let e = dp.ebpf();
    // As the kernel made them (`map_max_entries`, or an older pin's size).
    let capacity = |name, default| datapath::maps::capacity(e, name).unwrap_or(default);
    vec![
        api::MapFill {
            name: map_names::IPCACHE.into(),
            entries: datapath::maps::ipcache_len(e),
            capacity: capacity(map_names::IPCACHE, IPCACHE_MAX),
        },
        api::MapFill {
            name: map_names::NODES.into(),
            entries: dp_policy::count::<u32, NodeInfo>(e, map_names::NODES),
            capacity: capacity(map_names::NODES, NODES_MAX),
        },
        api::MapFill {
            name: map_names::POLICY_A.into(),
            entries: dp_policy::count::<PolicyKey, PolicyEntry>(e, map_names::POLICY_A),
            capacity: POLICY_MAX,
        },
        api::MapFill {
            name: map_names::POLICY_B.into(),
            entries: dp_policy::count::<PolicyKey, PolicyEntry>(e, map_names::POLICY_B),
            capacity: POLICY_MAX,
        },
        api::MapFill {
            name: map_names::CT.into(),
            entries: dp_policy::count::<CtKey, CtEntry>(e, map_names::CT),
            capacity: capacity(map_names::CT, CT_MAX),
        },
        api::MapFill {
            name: map_names::AUTH.into(),
            // The mesh took this map out of the loaded object (its one writer): counted
            // through its pin (0 if it cannot be opened).
            entries: dp_policy::count_pinned::<AuthKey, AuthEntry>(
                &dp.pin_dir().join(map_names::AUTH),
            )
            .unwrap_or(0),
            capacity: AUTH_MAX,
        },
    ]
}
