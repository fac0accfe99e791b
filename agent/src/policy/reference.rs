//! The naive policy evaluator, written straight from the policy text for one packet, and an
//! emulation of the datapath's lookup on a compiled map. The property tests below hold the
//! compiler to the evaluator; neither function is used on a packet path.

use std::collections::BTreeMap;

use veil_common::maps::{identity, policy_flags, PolicyEntry, PolicyKey};

use super::{
    parse::{AuthMode, Direction, Policy, PortProtocol, Protocol},
    selector::Selector,
    IdentityLabels, Mode, Verdict,
};

/// The verdict for a packet between `local` (the endpoint on this node) and `remote`, to
/// destination port `port` (0 for protocols without ports) over IP protocol `proto`, in
/// `direction` as seen from `local`. An identity missing from `identities` has no labels: no
/// policy selects it, and as a remote only rules without endpoint selectors match it.
pub fn evaluate(
    policies: &[Policy],
    identities: &[(u32, IdentityLabels)],
    local: u32,
    remote: u32,
    port: u16,
    proto: u8,
    direction: Direction,
) -> Verdict {
    let labels_of = |id: u32| identities.iter().find(|(i, _)| *i == id).map(|(_, l)| l);
    let Some(local_labels) = labels_of(local) else {
        return Verdict::Allowed {
            is_auth_required: false,
        };
    };

    // Endpoint selectors name pods: cluster identities, in the policy's namespace unless the
    // selector says which namespace (always, for a namespaced policy's subject).
    let selects = |s: &Selector, labels: &IdentityLabels, ns: Option<&str>, is_subject: bool| {
        let ns_ok = match ns {
            None => true,
            Some(ns) if is_subject || !s.constrains_namespace() => labels.namespace() == Some(ns),
            Some(_) => true,
        };
        ns_ok && s.matches(labels)
    };
    let peer_matches = |peers: &Option<Vec<Selector>>, ns: Option<&str>| match peers {
        None => true,
        Some(selectors) => {
            remote >= identity::FIRST_CLUSTER
                && labels_of(remote)
                    .is_some_and(|l| selectors.iter().any(|s| selects(s, l, ns, false)))
        }
    };
    let port_matches = |ports: Option<Vec<&PortProtocol>>| match ports {
        None => true,
        Some(ports) => ports.iter().any(|pp| {
            let proto_ok = match pp.protocol {
                // A port needs a protocol with ports.
                Protocol::Any if pp.port.is_some() => {
                    [Protocol::TCP, Protocol::UDP, Protocol::SCTP].contains(&proto)
                }
                Protocol::Any => true,
                p => p.number() == proto,
            };
            let port_ok = match (pp.port, pp.end_port) {
                (None, _) => true,
                (Some(p), None) => p.0 == port,
                (Some(p), Some(end)) if p.0 == 1 && end == 65535 => true,
                (Some(p), Some(end)) => p.0 <= port && u32::from(port) <= end,
            };
            proto_ok && port_ok
        }),
    };

    struct Selecting {
        mode: Mode,
        is_denied: bool,
        is_allowed: bool,
        is_auth_required: bool,
    }
    let mut selecting = Vec::new();
    for p in policies {
        let ns = p.namespace();
        for (_, rule) in p.rules() {
            if !selects(&rule.endpoint_selector, local_labels, ns, true) {
                continue;
            }
            // (peers, ports, is_auth_required) of the allow and of the deny rules.
            let (allows, denies): (Vec<_>, Vec<_>) = match direction {
                Direction::Ingress => (
                    rule.ingress
                        .iter()
                        .map(|r| {
                            (
                                &r.from_endpoints,
                                r.to_ports.as_ref().map(|v| {
                                    v.iter().flat_map(|pr| pr.ports.iter()).collect::<Vec<_>>()
                                }),
                                r.authentication
                                    .is_some_and(|a| a.mode == AuthMode::Required),
                            )
                        })
                        .collect(),
                    rule.ingress_deny
                        .iter()
                        .map(|r| {
                            (
                                &r.from_endpoints,
                                r.to_ports.as_ref().map(|v| {
                                    v.iter().flat_map(|pr| pr.ports.iter()).collect::<Vec<_>>()
                                }),
                                false,
                            )
                        })
                        .collect(),
                ),
                Direction::Egress => (
                    rule.egress
                        .iter()
                        .map(|r| {
                            (
                                &r.to_endpoints,
                                r.to_ports.as_ref().map(|v| {
                                    v.iter().flat_map(|pr| pr.ports.iter()).collect::<Vec<_>>()
                                }),
                                r.authentication
                                    .is_some_and(|a| a.mode == AuthMode::Required),
                            )
                        })
                        .collect(),
                    rule.egress_deny
                        .iter()
                        .map(|r| {
                            (
                                &r.to_endpoints,
                                r.to_ports.as_ref().map(|v| {
                                    v.iter().flat_map(|pr| pr.ports.iter()).collect::<Vec<_>>()
                                }),
                                false,
                            )
                        })
                        .collect(),
                ),
            };
            if allows.is_empty() && denies.is_empty() {
                continue;
            }
            // An empty rule `{}` (no peers, no ports) matches nothing: Cilium's deny-all idiom.
            let rule_matches = |peers: &Option<Vec<Selector>>,
                                ports: Option<Vec<&PortProtocol>>| {
                !(peers.is_none() && ports.is_none())
                    && peer_matches(peers, ns)
                    && port_matches(ports)
            };
            let matching_allows: Vec<_> = allows
                .into_iter()
                .filter(|(peers, ports, _)| rule_matches(peers, ports.clone()))
                .collect();
            selecting.push(Selecting {
                mode: p.mode(),
                is_denied: denies
                    .into_iter()
                    .any(|(peers, ports, _)| rule_matches(peers, ports)),
                is_allowed: !matching_allows.is_empty(),
                is_auth_required: matching_allows.iter().any(|(_, _, auth)| *auth),
            });
        }
    }

    if selecting.is_empty() {
        return Verdict::Allowed {
            is_auth_required: false,
        };
    }
    let is_audit_only = selecting.iter().all(|s| s.mode == Mode::Audit);
    let considered: Vec<_> = selecting
        .iter()
        .filter(|s| is_audit_only || s.mode == Mode::Enforce)
        .collect();
    let verdict = if considered.iter().any(|s| s.is_denied) {
        Verdict::Denied
    } else if considered.iter().any(|s| s.is_allowed) {
        Verdict::Allowed {
            is_auth_required: considered.iter().any(|s| s.is_auth_required),
        }
    } else {
        Verdict::Denied
    };
    match verdict {
        Verdict::Denied if is_audit_only => Verdict::Audit,
        v => v,
    }
}

/// What the datapath decides for a packet, given the policy map (see
/// `veil_common::maps::policy_flags`).
pub fn datapath_lookup(
    map: &BTreeMap<PolicyKey, PolicyEntry>,
    local: u32,
    remote: u32,
    port: u16,
    proto: u8,
    direction: Direction,
) -> Verdict {
    let key = |remote_identity, dport, protocol| PolicyKey {
        local_identity: local,
        remote_identity,
        dport,
        protocol,
        direction: direction.code(),
    };
    let allowed = Verdict::Allowed {
        is_auth_required: false,
    };
    let Some(marker) = map.get(&key(identity::SELECTOR_MARKER, 0, 0)) else {
        return allowed;
    };
    if marker.flags & policy_flags::ENFORCED == 0 {
        return allowed;
    }
    let hits: Vec<u32> = [
        key(remote, port, proto),
        key(remote, 0, proto),
        key(remote, 0, 0),
        key(identity::ANY, port, proto),
        key(identity::ANY, 0, proto),
        key(identity::ANY, 0, 0),
    ]
    .iter()
    .filter_map(|k| map.get(k))
    .map(|e| e.flags)
    .collect();
    let verdict = if hits.iter().any(|f| f & policy_flags::DENY != 0) {
        Verdict::Denied
    } else if hits.iter().any(|f| f & policy_flags::ALLOW != 0) {
        Verdict::Allowed {
            is_auth_required: hits
                .iter()
                .any(|f| f & policy_flags::ALLOW != 0 && f & policy_flags::AUTH_REQUIRED != 0),
        }
    } else {
        Verdict::Denied
    };
    match verdict {
        Verdict::Denied if marker.flags & policy_flags::AUDIT != 0 => Verdict::Audit,
        v => v,
    }
}
