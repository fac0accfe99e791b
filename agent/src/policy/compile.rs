//! Compilation of policies to the datapath's policy map for this node's endpoints.
//!
//! The map answers any packet with six hash lookups (see `veil_common::maps::policy_flags`), so
//! per-packet cost does not depend on the number of rules; the compiler's job is a correct and
//! compact map. For every local identity L and direction D selected by some policy:
//! - a marker `(L, SELECTOR_MARKER, 0, 0, D)` with ENFORCED (and AUDIT when every selecting
//!   policy is in audit mode) turns on default deny;
//! - each rule adds `(L, remote, port, proto, D)` for every remote identity its peer selectors
//!   match (or ANY without selectors) and every port/protocol it lists (or 0/0 without
//!   `toPorts`), flags ALLOW (+AUTH_REQUIRED) or DENY, merged by OR;
//! - entries that cannot change any verdict (covered by the more general keys every packet
//!   hitting them also hits) are dropped.
//!
//! Ports: a port with protocol ANY becomes TCP, UDP and SCTP (the datapath has no
//! "port, any protocol" lookup); a range `port..=endPort` becomes one entry per port, except
//! 1–65535, which is "any port".

use std::collections::{BTreeMap, BTreeSet};

use veil_common::maps::{identity, policy_flags, PolicyEntry, PolicyKey, POLICY_MAX};

use super::{
    parse::{Direction, Policy, PortProtocol, Protocol},
    selector::{Scope, Selector},
    Error, IdentityLabels, Mode, PolicyName,
};

/// The compiled map for one node, with what the flow records need to name a rule.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompiledPolicy {
    pub entries: BTreeMap<PolicyKey, PolicyEntry>,
    /// `rules[id - 1]` is the rule with id `id` ([`PolicyEntry::rule`]; 0 means none).
    pub rules: Vec<RuleRef>,
    /// One per input policy, in input order.
    pub stats: Vec<PolicyStats>,
}

/// Where a rule id comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleRef {
    pub policy: PolicyName,
    /// e.g. `spec.ingress[0]`.
    pub path: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyStats {
    pub policy: PolicyName,
    /// Allow and deny rules in the policy.
    pub rules: u32,
    /// Map entries (markers included) this policy contributed to, after merging.
    pub entries: u32,
}

impl CompiledPolicy {
    pub fn rule(&self, id: u32) -> Option<&RuleRef> {
        self.rules.get(usize::try_from(id).ok()?.checked_sub(1)?)
    }
}

/// Refuse inputs so large that even building them would be a problem, before pruning.
const BUILD_LIMIT: usize = 4 * POLICY_MAX as usize;

struct Spec {
    policy: usize,
    mode: Mode,
    subject: Selector,
    has_rules: [bool; 2],
    rules: Vec<usize>,
}

struct CRule {
    id: u32,
    direction: Direction,
    flags: u32,
    remotes: Vec<u32>,
    ports: Vec<(u16, u8)>,
}

fn dir_index(d: Direction) -> usize {
    match d {
        Direction::Ingress => 0,
        Direction::Egress => 1,
    }
}

/// Compiles `policies` for the endpoints of this node (`local_identities`), given every known
/// identity. Policies are refused as [`Policy::validate_for_apply`] would refuse them.
pub fn compile(
    policies: &[Policy],
    identities: &[(u32, IdentityLabels)],
    local_identities: &[u32],
) -> Result<CompiledPolicy, Error> {
    let mut table: BTreeMap<u32, &IdentityLabels> = BTreeMap::new();
    for (id, labels) in identities {
        if !(identity::FIRST_CLUSTER..identity::SELECTOR_MARKER).contains(id) {
            return Err(Error::ReservedIdentity(*id));
        }
        if table.insert(*id, labels).is_some() {
            return Err(Error::DuplicateIdentity(*id));
        }
    }

    let mut specs = Vec::new();
    let mut rules = Vec::new();
    let mut rule_refs = Vec::new();
    let mut stats = Vec::new();
    for (pi, policy) in policies.iter().enumerate() {
        policy.validate_for_apply().map_err(|e| Error::InPolicy {
            name: policy.name(),
            source: Box::new(e),
        })?;
        let ns = policy.namespace();
        let mut n_rules = 0;
        for (path, rule) in policy.rules() {
            let subject = rule
                .endpoint_selector
                .scoped(ns.map_or(Scope::Cluster, Scope::Forced));
            let mut spec = Spec {
                policy: pi,
                mode: policy.mode(),
                subject,
                has_rules: [
                    rule.has_rules(Direction::Ingress),
                    rule.has_rules(Direction::Egress),
                ],
                rules: Vec::new(),
            };
            for pr in rule.peer_rules(&path) {
                let remotes = match pr.peers {
                    None => vec![identity::ANY],
                    Some(selectors) => {
                        let scoped: Vec<Selector> = selectors
                            .iter()
                            .map(|s| s.scoped(ns.map_or(Scope::Cluster, Scope::Default)))
                            .collect();
                        table
                            .iter()
                            .filter(|(_, l)| scoped.iter().any(|s| s.matches(l)))
                            .map(|(id, _)| *id)
                            .collect()
                    }
                };
                let flags = if pr.is_deny {
                    policy_flags::DENY
                } else if pr.is_auth_required {
                    policy_flags::ALLOW | policy_flags::AUTH_REQUIRED
                } else {
                    policy_flags::ALLOW
                };
                spec.rules.push(rules.len());
                rules.push(CRule {
                    id: u32::try_from(rules.len() + 1).expect("fewer than 2^32 rules"),
                    direction: pr.direction,
                    flags,
                    remotes,
                    ports: expand_ports(pr.ports.as_deref()),
                });
                rule_refs.push(RuleRef {
                    policy: policy.name(),
                    path: pr.path,
                });
                n_rules += 1;
            }
            specs.push(spec);
        }
        stats.push(PolicyStats {
            policy: policy.name(),
            rules: n_rules,
            entries: 0,
        });
    }

    let locals: BTreeSet<u32> = local_identities.iter().copied().collect();
    let mut entries: BTreeMap<PolicyKey, PolicyEntry> = BTreeMap::new();
    let mut contributed: Vec<BTreeSet<PolicyKey>> = vec![BTreeSet::new(); policies.len()];
    for &local in &locals {
        let labels = table
            .get(&local)
            .ok_or(Error::UnknownLocalIdentity(local))?;
        for d in Direction::ALL {
            let selecting: Vec<&Spec> = specs
                .iter()
                .filter(|s| s.has_rules[dir_index(d)] && s.subject.matches(labels))
                .collect();
            if selecting.is_empty() {
                continue;
            }
            let is_audit_only = selecting.iter().all(|s| s.mode == Mode::Audit);
            let considered: Vec<&Spec> = selecting
                .into_iter()
                .filter(|s| is_audit_only || s.mode == Mode::Enforce)
                .collect();
            let key = |remote, dport, protocol| PolicyKey {
                local_identity: local,
                remote_identity: remote,
                dport,
                protocol,
                direction: d.code(),
            };
            let mut marker_rule = u32::MAX;
            for spec in &considered {
                for r in spec.rules.iter().map(|&i| &rules[i]) {
                    if r.direction != d {
                        continue;
                    }
                    marker_rule = marker_rule.min(r.id);
                    for &remote in &r.remotes {
                        for &(dport, proto) in &r.ports {
                            let k = key(remote, dport, proto);
                            merge(&mut entries, k, r.flags, r.id);
                            contributed[spec.policy].insert(k);
                        }
                        if entries.len() > BUILD_LIMIT {
                            return Err(Error::TooManyEntries {
                                entries: entries.len(),
                                max: POLICY_MAX,
                            });
                        }
                    }
                }
            }
            let mut marker_flags = policy_flags::ENFORCED;
            if is_audit_only {
                marker_flags |= policy_flags::AUDIT;
            }
            let m = key(identity::SELECTOR_MARKER, 0, 0);
            entries.insert(
                m,
                PolicyEntry {
                    flags: marker_flags,
                    rule: marker_rule,
                },
            );
            for spec in &considered {
                contributed[spec.policy].insert(m);
            }
        }
    }

    let entries = prune(entries);
    if entries.len() > POLICY_MAX as usize {
        return Err(Error::TooManyEntries {
            entries: entries.len(),
            max: POLICY_MAX,
        });
    }
    for (st, keys) in stats.iter_mut().zip(&contributed) {
        st.entries = keys.iter().filter(|k| entries.contains_key(k)).count() as u32;
    }
    Ok(CompiledPolicy {
        entries,
        rules: rule_refs,
        stats,
    })
}

fn merge(entries: &mut BTreeMap<PolicyKey, PolicyEntry>, k: PolicyKey, flags: u32, rule: u32) {
    let e = entries.entry(k).or_insert(PolicyEntry { flags: 0, rule });
    e.flags |= flags;
    e.rule = e.rule.min(rule);
}

/// `(dport, protocol)` keys of a rule's ports; `None` (no `toPorts`) is every port and protocol.
fn expand_ports(ports: Option<&[PortProtocol]>) -> Vec<(u16, u8)> {
    let Some(ports) = ports else {
        return vec![(0, 0)];
    };
    let mut out = Vec::new();
    for pp in ports {
        let protos = match (pp.protocol, pp.port) {
            (Protocol::Any, Some(_)) => vec![Protocol::TCP, Protocol::UDP, Protocol::SCTP],
            (p, _) => vec![p.number()],
        };
        let range = match (pp.port, pp.end_port) {
            (None, _) => 0..=0,
            (Some(p), None) => p.0..=p.0,
            (Some(p), Some(65535)) if p.0 == 1 => 0..=0,
            (Some(p), Some(end)) => p.0..=u16::try_from(end).expect("validated endPort"),
        };
        for port in range {
            for &proto in &protos {
                out.push((port, proto));
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// Drops entries whose every effect is already had by more general keys: a packet that hits
/// `(L, R, P, Pr)` also looks up every key with R→ANY, P→0, Pr→0 (except the never-used
/// "port with any protocol" form). So an entry is redundant when a more general entry denies,
/// or when the more general entries' flags together include all of its flags (every AUTH flag
/// sits beside an ALLOW, so OR of flags is exactly what the datapath evaluates).
fn prune(entries: BTreeMap<PolicyKey, PolicyEntry>) -> BTreeMap<PolicyKey, PolicyEntry> {
    let is_redundant = |k: &PolicyKey, e: &PolicyEntry| -> bool {
        if k.remote_identity == identity::SELECTOR_MARKER {
            return false;
        }
        let mut covered = 0;
        for remote in [k.remote_identity, identity::ANY] {
            for dport in [k.dport, 0] {
                for protocol in [k.protocol, 0] {
                    if dport != 0 && protocol == 0 {
                        continue;
                    }
                    let g = PolicyKey {
                        remote_identity: remote,
                        dport,
                        protocol,
                        ..*k
                    };
                    if g == *k {
                        continue;
                    }
                    if let Some(ge) = entries.get(&g) {
                        if ge.flags & policy_flags::DENY != 0 {
                            return true;
                        }
                        covered |= ge.flags;
                    }
                }
            }
        }
        e.flags & !covered == 0
    };
    entries
        .iter()
        .filter(|(k, e)| !is_redundant(k, e))
        .map(|(k, e)| (*k, *e))
        .collect()
}
