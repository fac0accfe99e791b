//! The naive policy evaluator, written straight from the policy text for one packet, and an
//! emulation of the datapath's lookup on a compiled map. The property tests below hold the
//! compiler to the evaluator; neither function is used on a packet path.

use std::collections::BTreeMap;

use veil_common::maps::{identity, policy_decision, PolicyEntry, PolicyKey};

use super::{
    parse::{Direction, PeerRule, Policy, PortProtocol, Protocol},
    selector::Selector,
    IdentityAllocator, IdentityLabels, Mode, Verdict,
};

/// One packet as a policy sees it: between `local` (the endpoint on this node) and `remote`, to
/// destination port `port` (0 for protocols without ports) over IP protocol `proto`, in
/// `direction` as seen from `local`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    pub local: u32,
    pub remote: u32,
    pub port: u16,
    pub proto: u8,
    pub direction: Direction,
}

impl std::fmt::Display for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = self;
        write!(
            f,
            "{}->{} {}/{} {:?}",
            p.local, p.remote, p.port, p.proto, p.direction
        )
    }
}

/// The verdict for the packet `probe`. An identity missing from `identities` has no labels: no
/// policy selects it, and as a remote only rules without endpoint selectors match it.
pub fn evaluate(
    policies: &[Policy],
    identities: &[(u32, IdentityLabels)],
    probe: Probe,
) -> Verdict {
    let Probe {
        local,
        remote,
        port,
        proto,
        direction,
    } = probe;
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
    let peer_matches = |peers: Option<&[Selector]>, ns: Option<&str>| match peers {
        None => true,
        Some(selectors) => {
            remote >= identity::FIRST_CLUSTER
                && labels_of(remote)
                    .is_some_and(|l| selectors.iter().any(|s| selects(s, l, ns, false)))
        }
    };
    let port_matches = |ports: Option<&[PortProtocol]>| match ports {
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
            // The rule's sections flattened by the model itself (`peers`, `ports` as written);
            // the matching below is this evaluator's own.
            let peer_rules: Vec<_> = rule
                .peer_rules("")
                .into_iter()
                .filter(|r| r.direction == direction)
                .collect();
            if peer_rules.is_empty() {
                continue;
            }
            // An empty rule `{}` (no peers, no ports) matches nothing: Cilium's deny-all idiom.
            let rule_matches = |r: &PeerRule| {
                !(r.peers.is_none() && r.ports.is_none())
                    && peer_matches(r.peers, ns)
                    && port_matches(r.ports.as_deref())
            };
            let matching_allows: Vec<_> = peer_rules
                .iter()
                .filter(|r| !r.is_deny && rule_matches(r))
                .collect();
            selecting.push(Selecting {
                mode: p.mode(),
                is_denied: peer_rules.iter().any(|r| r.is_deny && rule_matches(r)),
                is_allowed: !matching_allows.is_empty(),
                is_auth_required: matching_allows.iter().any(|r| r.is_auth_required),
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
pub fn datapath_lookup(map: &BTreeMap<PolicyKey, PolicyEntry>, p: Probe) -> Verdict {
    let direction = p.direction.code();
    let marker = map
        .get(&PolicyKey::marker(p.local, direction))
        .map(|e| e.flags);
    let acc = PolicyKey::lookups(p.local, p.remote, p.port, p.proto, direction)
        .iter()
        .filter_map(|k| map.get(k))
        .fold(0, |acc, e| acc | e.flags);
    let d = policy_decision(marker, acc, false);
    if d.allowed {
        Verdict::Allowed {
            is_auth_required: d.auth_required,
        }
    } else if d.audit {
        Verdict::Audit
    } else {
        Verdict::Denied
    }
}

/// Remotes every agreement check probes beside the known identities: the reserved ones (host,
/// world, unknown, remote node) and one cluster identity no table knows.
pub const STRANGER_REMOTES: [u32; 5] = [
    identity::HOST,
    identity::WORLD,
    identity::UNKNOWN,
    identity::REMOTE_NODE,
    9999,
];
/// Ports probed: none (0), the edges of the ranges the generators use, well-known ones, the top.
pub const PROBE_PORTS: [u16; 14] = [0, 1, 2, 53, 78, 79, 80, 81, 82, 443, 444, 8080, 9000, 65535];
/// IP protocols probed: none, ICMP, TCP, UDP, SCTP, and one no rule names (GRE).
pub const PROBE_PROTOS: [u8; 6] = [0, 1, 6, 17, 132, 47];

/// Every packet an agreement check probes: each of `locals` as the local endpoint; each
/// identity of `ids` and each of [`STRANGER_REMOTES`] as the remote; [`PROBE_PORTS`] and
/// `extra_ports`; [`PROBE_PROTOS`]; both directions.
pub fn probes<'a>(
    ids: &'a [(u32, IdentityLabels)],
    locals: &'a [u32],
    extra_ports: &'a [u16],
) -> impl Iterator<Item = Probe> + 'a {
    let remotes = || ids.iter().map(|(id, _)| *id).chain(STRANGER_REMOTES);
    let ports = || PROBE_PORTS.into_iter().chain(extra_ports.iter().copied());
    locals.iter().flat_map(move |&local| {
        remotes().flat_map(move |remote| {
            ports().flat_map(move |port| {
                PROBE_PROTOS.into_iter().flat_map(move |proto| {
                    Direction::ALL.into_iter().map(move |direction| Probe {
                        local,
                        remote,
                        port,
                        proto,
                        direction,
                    })
                })
            })
        })
    })
}

/// Every packet of [`probes`] where the compiled `map` and [`evaluate`] disagree. The property
/// tests and the policy fuzz target (`fuzz/fuzz_targets/policy.rs`) hold the compiler to the
/// reference through it.
pub fn disagreements(
    policies: &[Policy],
    ids: &[(u32, IdentityLabels)],
    locals: &[u32],
    map: &BTreeMap<PolicyKey, PolicyEntry>,
    extra_ports: &[u16],
) -> Vec<String> {
    probes(ids, locals, extra_ports)
        .filter_map(|p| {
            let want = evaluate(policies, ids, p);
            let got = datapath_lookup(map, p);
            (got != want).then(|| format!("{p}: map {got:?}, reference {want:?}"))
        })
        .collect()
}

/// The identities the compiler's table tests and the policy fuzz target probe with, as the lab
/// allocates them: frontend 256, backend 257, intruder 258 in `shop` and a frontend in `other`
/// (259), each labelled `app=<name>`.
#[doc(hidden)]
pub fn lab_identities() -> Vec<(u32, IdentityLabels)> {
    let mut a = IdentityAllocator::new();
    for (ns, app) in [
        ("shop", "frontend"),
        ("shop", "backend"),
        ("shop", "intruder"),
        ("other", "frontend"),
    ] {
        a.allocate(ns, app, &[("app".to_owned(), app.to_owned())].into())
            .expect("four identities fit the allocator");
    }
    a.identities()
}

#[cfg(test)]
mod tests {
    use proptest::{collection::vec, option, prelude::*, sample::select};

    use super::*;
    use crate::policy::{
        compile,
        parse::{
            ApiVersion, AuthMode, Authentication, EgressDenyRule, EgressRule, IngressDenyRule,
            IngressRule, Kind, Metadata, Port, PortDenyRule, PortRule, Rule, MODE_ANNOTATION,
        },
        selector::{LabelKey, LabelValue, MatchLabels, Operator, Requirement},
    };
    use veil_common::maps::policy_flags;

    const NAMESPACES: [&str; 2] = ["ns1", "ns2"];
    const KEYS: [&str; 4] = ["app", "tier", "k8s:io.kubernetes.pod.namespace", "k8s:app"];
    const VALUES: [&str; 6] = ["a", "b", "x", "ns1", "ns2", "z"];
    const PORTS: [u16; 4] = [1, 79, 80, 443];

    fn key(k: &str) -> LabelKey {
        LabelKey::parse(k).unwrap()
    }

    fn value(v: &str) -> LabelValue {
        LabelValue::parse(v).unwrap()
    }

    fn requirement() -> impl Strategy<Value = Requirement> {
        let op = select(vec![
            Operator::In,
            Operator::NotIn,
            Operator::Exists,
            Operator::DoesNotExist,
        ]);
        (select(&KEYS[..]), op, vec(select(&VALUES[..]), 1..3)).prop_map(|(k, operator, vs)| {
            Requirement {
                key: key(k),
                operator,
                values: match operator {
                    Operator::In | Operator::NotIn => vs.into_iter().map(value).collect(),
                    Operator::Exists | Operator::DoesNotExist => Vec::new(),
                },
            }
        })
    }

    fn selector() -> impl Strategy<Value = Selector> {
        let labels = (
            option::weighted(0.5, select(&["a", "b"][..])),
            option::weighted(0.3, select(&["x", "z"][..])),
            option::weighted(0.2, select(&NAMESPACES[..])),
        );
        (labels, vec(requirement(), 0..3)).prop_map(|((app, tier, ns), match_expressions)| {
            let mut m = BTreeMap::new();
            if let Some(v) = app {
                m.insert(key("k8s:app"), value(v));
            }
            if let Some(v) = tier {
                m.insert(key("tier"), value(v));
            }
            if let Some(v) = ns {
                m.insert(LabelKey::namespace(), value(v));
            }
            Selector {
                match_labels: MatchLabels::from(m),
                match_expressions,
            }
        })
    }

    fn port() -> impl Strategy<Value = PortProtocol> {
        let proto = select(vec![
            Protocol::Tcp,
            Protocol::Udp,
            Protocol::Sctp,
            Protocol::Icmp,
            Protocol::Any,
        ]);
        (proto, option::of(select(&PORTS[..])), 0..4u8).prop_map(|(protocol, port, end)| {
            let port = if protocol == Protocol::Icmp {
                None
            } else {
                port
            };
            let end_port = match (port, end) {
                (Some(p), 1) => Some(u32::from(p) + 1),
                (Some(p), 2) => Some(u32::from(p) + 2),
                (Some(1), 3) => Some(65535),
                _ => None,
            };
            PortProtocol {
                port: port.map(Port),
                protocol,
                end_port,
            }
        })
    }

    type Parts = (
        Option<Vec<Selector>>,
        Option<Vec<Vec<PortProtocol>>>,
        Option<bool>,
    );

    fn parts() -> impl Strategy<Value = Parts> {
        (
            option::of(vec(
                prop_oneof![1 => Just(Selector::default()), 3 => selector()],
                1..3,
            )),
            option::of(vec(vec(port(), 1..3), 1..3)),
            option::of(any::<bool>()),
        )
    }

    fn auth(a: Option<bool>) -> Option<Authentication> {
        a.map(|is_required| Authentication {
            mode: if is_required {
                AuthMode::Required
            } else {
                crate::policy::parse::AuthMode::Disabled
            },
        })
    }

    fn allow_ports(p: Option<Vec<Vec<PortProtocol>>>) -> Option<Vec<PortRule>> {
        p.map(|v| {
            v.into_iter()
                .map(|ports| PortRule { ports, rules: None })
                .collect()
        })
    }

    fn deny_ports(p: Option<Vec<Vec<PortProtocol>>>) -> Option<Vec<PortDenyRule>> {
        p.map(|v| v.into_iter().map(|ports| PortDenyRule { ports }).collect())
    }

    fn rule() -> impl Strategy<Value = Rule> {
        (
            // Subjects match often enough that most cases enforce something.
            prop_oneof![1 => Just(Selector::default()), 2 => selector()],
            vec(parts(), 0..3),
            vec(parts(), 0..2),
            vec(parts(), 0..3),
            vec(parts(), 0..2),
        )
            .prop_map(|(endpoint_selector, ing, ing_deny, eg, eg_deny)| Rule {
                endpoint_selector,
                ingress: ing
                    .into_iter()
                    .map(|(peers, ports, a)| IngressRule {
                        from_endpoints: peers,
                        to_ports: allow_ports(ports),
                        authentication: auth(a),
                    })
                    .collect(),
                ingress_deny: ing_deny
                    .into_iter()
                    .map(|(peers, ports, _)| IngressDenyRule {
                        from_endpoints: peers,
                        to_ports: deny_ports(ports),
                    })
                    .collect(),
                egress: eg
                    .into_iter()
                    .map(|(peers, ports, a)| EgressRule {
                        to_endpoints: peers,
                        to_ports: allow_ports(ports),
                        authentication: auth(a),
                    })
                    .collect(),
                egress_deny: eg_deny
                    .into_iter()
                    .map(|(peers, ports, _)| EgressDenyRule {
                        to_endpoints: peers,
                        to_ports: deny_ports(ports),
                    })
                    .collect(),
                description: None,
            })
    }

    fn policy() -> impl Strategy<Value = Policy> {
        (
            proptest::bool::weighted(0.2),
            select(&NAMESPACES[..]),
            proptest::bool::weighted(0.3),
            vec(rule(), 1..3),
        )
            .prop_map(|(is_clusterwide, ns, is_audit, mut rules)| {
                if !is_clusterwide {
                    // A namespaced subject naming another namespace is refused by validation.
                    for r in &mut rules {
                        if let Some(v) = r
                            .endpoint_selector
                            .match_labels
                            .get_mut(&LabelKey::namespace())
                        {
                            *v = value(ns);
                        }
                    }
                }
                let mut annotations = BTreeMap::new();
                if is_audit {
                    annotations.insert(MODE_ANNOTATION.to_owned(), "audit".to_owned());
                }
                let mut rules = rules.into_iter();
                Policy {
                    api_version: ApiVersion,
                    kind: if is_clusterwide {
                        Kind::CiliumClusterwideNetworkPolicy
                    } else {
                        Kind::CiliumNetworkPolicy
                    },
                    metadata: Metadata {
                        name: String::new(),
                        namespace: (!is_clusterwide).then(|| ns.to_owned()),
                        labels: BTreeMap::new(),
                        annotations,
                    },
                    spec: rules.next(),
                    specs: rules.collect(),
                }
            })
    }

    fn policies() -> impl Strategy<Value = Vec<Policy>> {
        vec(policy(), 1..5).prop_map(|mut ps| {
            for (i, p) in ps.iter_mut().enumerate() {
                p.metadata.name = format!("p{i}");
            }
            ps
        })
    }

    /// Identities over the small label universe, and which of them live on this node.
    fn identities() -> impl Strategy<Value = (Vec<(u32, IdentityLabels)>, Vec<u32>)> {
        let pod = (
            select(&NAMESPACES[..]),
            option::of(select(&["a", "b", "c"][..])),
            option::of(select(&["x", "y"][..])),
        );
        (vec(pod, 1..7), vec(any::<bool>(), 7)).prop_map(|(pods, local_mask)| {
            let mut alloc = IdentityAllocator::new();
            for (ns, app, tier) in pods {
                let mut labels = BTreeMap::new();
                if let Some(a) = app {
                    labels.insert("app".to_owned(), a.to_owned());
                }
                if let Some(t) = tier {
                    labels.insert("tier".to_owned(), t.to_owned());
                }
                alloc.allocate(ns, "sa", &labels).unwrap();
            }
            let ids = alloc.identities();
            let mut locals: Vec<u32> = ids
                .iter()
                .zip(local_mask)
                .filter(|(_, is_local)| *is_local)
                .map(|((id, _), _)| *id)
                .collect();
            if locals.is_empty() {
                locals.push(ids[0].0);
            }
            (ids, locals)
        })
    }

    /// The generators are worth something only if they reach every verdict and build real
    /// maps; this guards against them silently degenerating.
    #[test]
    fn generators_reach_every_verdict() {
        use proptest::{strategy::ValueTree, test_runner::TestRunner};
        let mut runner = TestRunner::deterministic();
        let mut counts: BTreeMap<String, u64> = BTreeMap::new();
        let mut non_empty_maps = 0;
        const CASES: usize = 300;
        for _ in 0..CASES {
            let ps = policies().new_tree(&mut runner).unwrap().current();
            let (ids, locals) = identities().new_tree(&mut runner).unwrap().current();
            if !compile(&ps, &ids, &locals).unwrap().entries.is_empty() {
                non_empty_maps += 1;
            }
            for p in probes(&ids, &locals, &[]) {
                let v = evaluate(&ps, &ids, p);
                *counts.entry(format!("{v:?}")).or_default() += 1;
            }
        }
        let total: u64 = counts.values().sum();
        assert_eq!(counts.len(), 4, "{counts:?}");
        for (verdict, n) in &counts {
            assert!(*n * 100 >= total, "{verdict}: only {n} of {total}");
        }
        assert!(
            non_empty_maps * 2 >= CASES,
            "{non_empty_maps} of {CASES} maps non-empty"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn compiled_map_agrees_with_reference(ps in policies(), (ids, locals) in identities()) {
            for p in &ps {
                let mut checked = p.clone();
                checked.validate().expect("generated policies are valid");
                prop_assert_eq!(&checked, p);
            }
            let c = compile(&ps, &ids, &locals).expect("compiles");
            prop_assert!(c.entries.keys().all(|k| locals.contains(&k.local_identity)));
            let bad = disagreements(&ps, &ids, &locals, &c.entries, &[]);
            prop_assert!(bad.is_empty(), "{} mismatches, first: {}", bad.len(), bad[0]);
        }

        #[test]
        fn policies_survive_persistence(ps in policies()) {
            for p in &ps {
                let json = serde_json::to_string(p).unwrap();
                prop_assert_eq!(&Policy::from_json(&json).unwrap(), p);
                let yaml = serde_yaml::to_string(p).unwrap();
                prop_assert_eq!(&Policy::from_yaml(&yaml).unwrap(), p);
            }
        }
    }

    /// The comparison above can fail: each corruption of a correct map is caught.
    #[test]
    fn corrupted_maps_are_caught() {
        let mut alloc = IdentityAllocator::new();
        let mut id = |app: &str| {
            alloc
                .allocate("ns1", app, &[("app".to_owned(), app.to_owned())].into())
                .unwrap()
        };
        let (a, b, c) = (id("a"), id("b"), id("c"));
        let ids = alloc.identities();
        let yaml = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p, namespace: ns1}\nspec:\n  endpointSelector: {matchLabels: {app: a}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: b}}]\n    toPorts: [{ports: [{port: '80', protocol: TCP}]}]\n    authentication: {mode: required}\n  - toPorts: [{ports: [{port: '443'}]}]\n  ingressDeny: [{fromEndpoints: [{matchLabels: {app: c}}]}]\n---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: q, namespace: ns1, annotations: {policy.veil.io/mode: audit}}\nspec:\n  endpointSelector: {matchLabels: {app: b}}\n  egress: [{toEndpoints: [{matchLabels: {app: a}}]}]\n";
        let ps = crate::policy::parse_yaml(yaml).unwrap();
        let locals = [a, b, c];
        let good = compile(&ps, &ids, &locals).unwrap().entries;
        assert_eq!(
            disagreements(&ps, &ids, &locals, &good, &[]),
            Vec::<String>::new()
        );

        let key =
            |l, r, dport, protocol, d: Direction| PolicyKey::new(l, r, dport, protocol, d.code());
        let m = identity::SELECTOR_MARKER;
        type Corruption = Box<dyn Fn(&mut BTreeMap<PolicyKey, PolicyEntry>)>;
        let corruptions: Vec<(&str, Corruption)> = vec![
            (
                "marker removed",
                Box::new(move |map| {
                    map.remove(&key(a, m, 0, 0, Direction::Ingress));
                }),
            ),
            (
                "audit bit cleared",
                Box::new(move |map| {
                    map.get_mut(&key(b, m, 0, 0, Direction::Egress))
                        .unwrap()
                        .flags &= !policy_flags::AUDIT;
                }),
            ),
            (
                "auth bit cleared",
                Box::new(move |map| {
                    map.get_mut(&key(a, b, 80, Protocol::TCP, Direction::Ingress))
                        .unwrap()
                        .flags &= !policy_flags::AUTH_REQUIRED;
                }),
            ),
            (
                "deny removed",
                Box::new(move |map| {
                    map.remove(&key(a, c, 0, 0, Direction::Ingress));
                }),
            ),
            (
                "port widened",
                Box::new(move |map| {
                    let e = map
                        .remove(&key(a, b, 80, Protocol::TCP, Direction::Ingress))
                        .unwrap();
                    map.insert(key(a, b, 0, Protocol::TCP, Direction::Ingress), e);
                }),
            ),
            (
                "udp dropped from ANY",
                Box::new(move |map| {
                    map.remove(&key(
                        a,
                        identity::ANY,
                        443,
                        Protocol::UDP,
                        Direction::Ingress,
                    ));
                }),
            ),
        ];
        for (what, corrupt) in corruptions {
            let mut bad = good.clone();
            corrupt(&mut bad);
            assert!(
                !disagreements(&ps, &ids, &locals, &bad, &[]).is_empty(),
                "{what} not caught"
            );
        }
    }
}
