//! Compilation of policies to the datapath's policy map for this node's endpoints.
//!
//! The map answers any packet with six hash lookups (see `veil_common::maps::policy_flags`), so
//! per-packet cost does not depend on the number of rules; the compiler's job is a correct and
//! compact map. For every local identity L and direction D selected by some policy:
//! - a marker `(L, SELECTOR_MARKER, 0, 0, D)` with ENFORCED (and AUDIT when every selecting
//!   policy is in audit mode) turns on default deny;
//! - each rule adds `(L, remote, port, proto, D)` for every remote identity its peer selectors
//!   match (or ANY without selectors) and every port/protocol it lists (or 0/0 without
//!   `toPorts`), flags ALLOW (+AUTH_REQUIRED) or DENY, merged by OR; a rule with neither peers
//!   nor ports (`{}`) adds nothing;
//! - entries that cannot change any verdict (covered by the more general keys every packet
//!   hitting them also hits) are dropped.
//!
//! Ports: a port with protocol ANY becomes TCP, UDP and SCTP (the datapath has no
//! "port, any protocol" lookup); a range `port..=endPort` becomes one entry per port, except
//! 1–65535, which is "any port".

use std::collections::{BTreeMap, BTreeSet, HashMap};

use veil_common::maps::{identity, policy_flags, PolicyEntry, PolicyKey, POLICY_MAX};

use super::{
    parse::{Direction, Policy, PortProtocol, Protocol},
    selector::{Operator, Scope, Selector},
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
    /// What the L7 proxy enforces: for every (local identity, direction) that some rule gives
    /// HTTP rules, every allow rule of that direction (the ones without HTTP rules admit every
    /// request on their ports, as in Cilium).
    pub l7: Vec<L7Rule>,
}

/// One allow rule as the L7 proxy sees it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct L7Rule {
    pub local: u32,
    /// `ingress` or `egress`, seen from `local`.
    pub direction: String,
    /// Remote identities; [`identity::ANY`] for every peer.
    pub remotes: Vec<u32>,
    /// `(port, protocol)`, 0 meaning any.
    pub ports: Vec<(u16, u8)>,
    /// `None`: every request (an L4-only rule).
    pub http: Option<Vec<super::parse::HttpRule>>,
    /// Every policy selecting `local` in this direction is in audit mode: a request the rules
    /// refuse is reported (AUDIT) and forwarded.
    pub audit: bool,
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
    /// Ports of `toPorts` elements with HTTP rules (TCP only), with their rules.
    http: Vec<HttpPorts>,
}

/// `(port, protocol)` keys of one `toPorts` element and its HTTP rules.
type HttpPorts = (Vec<(u16, u8)>, Vec<super::parse::HttpRule>);

fn dir_index(d: Direction) -> usize {
    match d {
        Direction::Ingress => 0,
        Direction::Egress => 1,
    }
}

/// Compiles `policies` for the endpoints of this node (`local_identities`), given every known
/// identity. Policies are refused as [`Policy::validate_for_apply`] would refuse them.
/// The identities by label `key=value`, so a selector is evaluated against the identities
/// that carry one of its required labels rather than against all of them (10,000 rules over
/// 1,000 identities were ten million evaluations per compile).
struct LabelIndex<'a> {
    table: &'a BTreeMap<u32, &'a IdentityLabels>,
    by_label: HashMap<&'a str, HashMap<&'a str, Vec<u32>>>,
}

impl<'a> LabelIndex<'a> {
    fn new(table: &'a BTreeMap<u32, &'a IdentityLabels>) -> Self {
        let mut by_label: HashMap<&str, HashMap<&str, Vec<u32>>> = HashMap::new();
        for (id, labels) in table {
            for (k, v) in labels.iter() {
                by_label
                    .entry(k)
                    .or_default()
                    .entry(v)
                    .or_default()
                    .push(*id);
            }
        }
        Self { table, by_label }
    }

    /// The identities any of `selectors` matches, ascending.
    fn select(&self, selectors: &[Selector]) -> Vec<u32> {
        let mut out = BTreeSet::new();
        for s in selectors {
            match self.candidates(s) {
                Some(ids) => out.extend(
                    ids.into_iter()
                        .filter(|id| self.table.get(id).is_some_and(|l| s.matches(l))),
                ),
                None => out.extend(
                    self.table
                        .iter()
                        .filter(|(_, l)| s.matches(l))
                        .map(|(id, _)| *id),
                ),
            }
        }
        out.into_iter().collect()
    }

    /// A superset of what `s` matches, from the smallest posting list of a label it requires
    /// (`matchLabels`, or an `In` requirement's values); None when it requires none.
    fn candidates(&self, s: &Selector) -> Option<Vec<u32>> {
        let posting = |k: &str, v: &str| {
            self.by_label
                .get(k)
                .and_then(|vs| vs.get(v))
                .map_or(&[][..], Vec::as_slice)
        };
        let required = s
            .match_labels
            .iter()
            .map(|(k, v)| posting(k.as_str(), v.as_str()).to_vec());
        let any_of = s
            .match_expressions
            .iter()
            .filter(|r| r.operator == Operator::In)
            .map(|r| {
                r.values
                    .iter()
                    .flat_map(|v| posting(r.key.as_str(), v.as_str()).iter().copied())
                    .collect::<Vec<u32>>()
            });
        required.chain(any_of).min_by_key(Vec::len)
    }
}

pub fn compile<P: std::borrow::Borrow<Policy>>(
    policies: &[P],
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

    let index = LabelIndex::new(&table);
    let mut specs = Vec::new();
    let mut rules = Vec::new();
    let mut rule_refs = Vec::new();
    let mut stats = Vec::new();
    for (pi, policy) in policies.iter().enumerate() {
        let policy: &Policy = policy.borrow();
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
                    // Cilium: an empty rule `{}` selects no peer (the deny-all idiom); only
                    // ports without peers mean every peer.
                    None if pr.ports.is_none() => Vec::new(),
                    None => vec![identity::ANY],
                    Some(selectors) => {
                        let scoped: Vec<Selector> = selectors
                            .iter()
                            .map(|s| s.scoped(ns.map_or(Scope::Cluster, Scope::Default)))
                            .collect();
                        index.select(&scoped)
                    }
                };
                let flags = if pr.is_deny {
                    policy_flags::DENY
                } else if pr.is_auth_required {
                    policy_flags::ALLOW | policy_flags::AUTH_REQUIRED
                } else {
                    policy_flags::ALLOW
                };
                let (ports, http) = rule_ports(&pr);
                spec.rules.push(rules.len());
                rules.push(CRule {
                    id: u32::try_from(rules.len() + 1).expect("fewer than 2^32 rules"),
                    direction: pr.direction,
                    flags,
                    remotes,
                    ports,
                    http,
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
    let mut l7 = Vec::new();
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
            let key =
                |remote, dport, protocol| PolicyKey::new(local, remote, dport, protocol, d.code());
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
                            let l7_flag = if r.http.iter().any(|(p, _)| p.contains(&(dport, proto)))
                            {
                                policy_flags::L7
                            } else {
                                0
                            };
                            merge(&mut entries, k, r.flags | l7_flag, r.id);
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
            let allows = || {
                considered
                    .iter()
                    .flat_map(|s| s.rules.iter().map(|&i| &rules[i]))
                    .filter(|r| r.direction == d && r.flags & policy_flags::DENY == 0)
            };
            if allows().any(|r| !r.http.is_empty()) {
                for r in allows().filter(|r| !r.remotes.is_empty()) {
                    let mut rest = r.ports.clone();
                    let mut push = |ports: Vec<(u16, u8)>, http| {
                        if !ports.is_empty() {
                            l7.push(L7Rule {
                                local,
                                direction: d.name().to_owned(),
                                remotes: r.remotes.clone(),
                                ports,
                                http,
                                audit: is_audit_only,
                            });
                        }
                    };
                    for (ports, http) in &r.http {
                        rest.retain(|p| !ports.contains(p));
                        push(ports.clone(), Some(http.clone()));
                    }
                    push(rest, None);
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
        l7,
    })
}

/// A rule's `(port, protocol)` keys, and those of its `toPorts` elements with HTTP rules (TCP
/// only: HTTP rules apply to TCP, so such an element admits nothing else).
#[allow(clippy::type_complexity)]
fn rule_ports(
    pr: &super::parse::PeerRule<'_>,
) -> (
    Vec<(u16, u8)>,
    Vec<(Vec<(u16, u8)>, Vec<super::parse::HttpRule>)>,
) {
    let Some(lists) = &pr.port_lists else {
        return (expand_ports(None), Vec::new());
    };
    let mut ports = Vec::new();
    let mut http = Vec::new();
    for (i, list) in lists.iter().enumerate() {
        let mut p = expand_ports(Some(list));
        if let Some(rules) = pr.http.get(i).copied().flatten() {
            p.retain(|&(_, proto)| proto == Protocol::TCP);
            http.push((p.clone(), rules.to_vec()));
        }
        ports.extend(p);
    }
    ports.sort_unstable();
    ports.dedup();
    (ports, http)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{
        datapath_lookup, evaluate, parse::tests::BACKEND_INGRESS, parse::tests::ISSUE_EGRESS_L7,
        parse_yaml, Probe, Verdict,
    };
    use policy_flags::{ALLOW, AUDIT, AUTH_REQUIRED, DENY, ENFORCED};
    use veil_common::maps::direction::{EGRESS, INGRESS};

    const M: u32 = identity::SELECTOR_MARKER;
    const ANY: u32 = identity::ANY;
    const TCP: u8 = Protocol::TCP;
    const UDP: u8 = Protocol::UDP;
    const SCTP: u8 = Protocol::SCTP;

    /// The label index selects exactly what a scan of every identity would, for each operator,
    /// scope and union of selectors, over every combination of a few labels.
    #[test]
    fn the_label_index_selects_what_a_scan_selects() {
        let mut ids = Vec::new();
        for ns in ["n1", "n2"] {
            for app in [None, Some("a"), Some("b"), Some("c")] {
                for tier in [None, Some("x"), Some("y")] {
                    let labels = [("app", app), ("tier", tier)]
                        .into_iter()
                        .filter_map(|(k, v)| Some((k, v?)));
                    ids.push((256 + ids.len() as u32, IdentityLabels::new(ns, labels)));
                }
            }
        }
        let table: BTreeMap<u32, &IdentityLabels> = ids.iter().map(|(i, l)| (*i, l)).collect();
        let index = LabelIndex::new(&table);
        let selectors: Vec<Selector> = [
            r#"{}"#,
            r#"{"matchLabels": {"app": "a"}}"#,
            r#"{"matchLabels": {"app": "a", "tier": "x"}}"#,
            r#"{"matchLabels": {"app": "nobody"}}"#,
            r#"{"matchExpressions": [{"key": "app", "operator": "In", "values": ["b", "c"]}]}"#,
            r#"{"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["a"]}]}"#,
            r#"{"matchExpressions": [{"key": "tier", "operator": "Exists"}]}"#,
            r#"{"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]}"#,
            r#"{"matchLabels": {"tier": "y"}, "matchExpressions": [{"key": "app", "operator": "In", "values": ["a", "b"]}, {"key": "app", "operator": "NotIn", "values": ["b"]}]}"#,
        ]
        .iter()
        .map(|j| serde_json::from_str(j).unwrap())
        .collect();
        let scan = |sel: &[Selector]| -> Vec<u32> {
            table
                .iter()
                .filter(|(_, l)| sel.iter().any(|s| s.matches(l)))
                .map(|(id, _)| *id)
                .collect()
        };
        let mut checked = 0;
        for scope in [Scope::Cluster, Scope::Default("n2"), Scope::Forced("n1")] {
            let scoped: Vec<Selector> = selectors.iter().map(|s| s.scoped(scope)).collect();
            for a in 0..scoped.len() {
                for b in a..scoped.len() {
                    let sel = if a == b {
                        vec![scoped[a].clone()]
                    } else {
                        vec![scoped[a].clone(), scoped[b].clone()]
                    };
                    assert_eq!(index.select(&sel), scan(&sel), "{sel:?}");
                    checked += usize::from(!scan(&sel).is_empty());
                }
            }
        }
        assert!(checked > 100, "only {checked} non-empty selections");
    }

    fn lab() -> Vec<(u32, IdentityLabels)> {
        crate::policy::reference::lab_identities()
    }
    const FE: u32 = 256;
    const BE: u32 = 257;
    const INTRUDER: u32 = 258;
    const OTHER_FE: u32 = 259;

    fn policies(yaml: &str) -> Vec<Policy> {
        parse_yaml(yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"))
    }

    fn egress_without_http() -> String {
        ISSUE_EGRESS_L7
            .split("      rules:")
            .next()
            .unwrap()
            .to_owned()
    }

    fn cnp(name: &str, annotations: &str, spec: &str) -> String {
        format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: {name}, namespace: shop, annotations: {{{annotations}}}}}\nspec:\n{spec}---\n"
        )
    }

    type Entry = (u32, u32, u16, u8, u8, u32, u32);

    fn entries(c: &CompiledPolicy) -> Vec<Entry> {
        c.entries
            .iter()
            .map(|(k, e)| {
                (
                    k.local_identity,
                    k.remote_identity,
                    k.dport,
                    k.protocol,
                    k.direction,
                    e.flags,
                    e.rule,
                )
            })
            .collect()
    }

    #[test]
    fn compiled_maps() {
        // (policies, local identities, expected entries (local, remote, port, proto, dir,
        // flags, rule))
        let table: Vec<(String, Vec<u32>, Vec<Entry>)> = vec![
            // Issue 5: only the frontend, on TCP 8080, into the backend.
            (
                BACKEND_INGRESS.into(),
                vec![BE],
                vec![
                    (BE, FE, 8080, TCP, INGRESS, ALLOW, 1),
                    (BE, M, 0, 0, INGRESS, ENFORCED, 1),
                ],
            ),
            // The same policy selects nothing on node-a.
            (BACKEND_INGRESS.into(), vec![FE, INTRUDER], vec![]),
            // The issue's egress policy without its L7 part.
            (
                egress_without_http(),
                vec![FE, INTRUDER],
                vec![
                    (FE, BE, 8080, TCP, EGRESS, ALLOW, 1),
                    (FE, M, 0, 0, EGRESS, ENFORCED, 1),
                ],
            ),
            // Port with protocol ANY: TCP, UDP and SCTP. No toPorts: everything. Auth.
            (
                cnp(
                    "p",
                    "",
                    "  endpointSelector: {matchLabels: {app: backend}}\n  ingress:\n  - toPorts: [{ports: [{port: '53'}]}]\n  - fromEndpoints: [{matchLabels: {app: frontend}}]\n    authentication: {mode: required}\n",
                ),
                vec![BE],
                vec![
                    (BE, ANY, 53, TCP, INGRESS, ALLOW, 1),
                    (BE, ANY, 53, UDP, INGRESS, ALLOW, 1),
                    (BE, ANY, 53, SCTP, INGRESS, ALLOW, 1),
                    (BE, FE, 0, 0, INGRESS, ALLOW | AUTH_REQUIRED, 2),
                    (BE, M, 0, 0, INGRESS, ENFORCED, 1),
                ],
            ),
            // `[{}]` is every endpoint of the policy's namespace (not `other`); an empty rule
            // `{}` allows nothing but turns on default deny.
            (
                cnp(
                    "p",
                    "",
                    "  endpointSelector: {matchLabels: {app: backend}}\n  ingress: [{fromEndpoints: [{}]}]\n  egress: [{}]\n",
                ),
                vec![BE],
                vec![
                    (BE, FE, 0, 0, INGRESS, ALLOW, 1),
                    (BE, BE, 0, 0, INGRESS, ALLOW, 1),
                    (BE, INTRUDER, 0, 0, INGRESS, ALLOW, 1),
                    (BE, M, 0, 0, INGRESS, ENFORCED, 1),
                    (BE, M, 0, 0, EGRESS, ENFORCED, 2),
                ],
            ),
            // A peer selector naming the namespace reaches into it.
            (
                cnp(
                    "p",
                    "",
                    "  endpointSelector: {matchLabels: {app: backend}}\n  ingress: [{fromEndpoints: [{matchLabels: {app: frontend, k8s:io.kubernetes.pod.namespace: other}}]}]\n",
                ),
                vec![BE],
                vec![
                    (BE, OTHER_FE, 0, 0, INGRESS, ALLOW, 1),
                    (BE, M, 0, 0, INGRESS, ENFORCED, 1),
                ],
            ),
            // Deny wins, and makes narrower allows for the same peer pointless.
            (
                cnp(
                    "p",
                    "",
                    "  endpointSelector: {}\n  ingress:\n  - toPorts: [{ports: [{port: '8080', protocol: TCP}]}]\n  - fromEndpoints: [{matchLabels: {app: intruder}}]\n    toPorts: [{ports: [{port: '8080', protocol: TCP}]}]\n  ingressDeny: [{fromEndpoints: [{matchLabels: {app: intruder}}]}]\n",
                ),
                vec![BE],
                vec![
                    (BE, ANY, 8080, TCP, INGRESS, ALLOW, 1),
                    (BE, INTRUDER, 0, 0, INGRESS, DENY, 3),
                    (BE, M, 0, 0, INGRESS, ENFORCED, 1),
                ],
            ),
            // Narrower allows under a wider one are pruned; a narrower allow that adds auth
            // is not.
            (
                cnp(
                    "p",
                    "",
                    "  endpointSelector: {matchLabels: {app: backend}}\n  ingress:\n  - {}\n  - fromEndpoints: [{}]\n  - fromEndpoints: [{matchLabels: {app: frontend}}]\n    toPorts: [{ports: [{port: '8080', protocol: TCP}]}]\n  - fromEndpoints: [{matchLabels: {app: frontend}}]\n    toPorts: [{ports: [{protocol: UDP}]}]\n    authentication: {mode: required}\n",
                ),
                vec![BE],
                vec![
                    (BE, FE, 0, 0, INGRESS, ALLOW, 2),
                    (BE, FE, 0, UDP, INGRESS, ALLOW | AUTH_REQUIRED, 4),
                    (BE, BE, 0, 0, INGRESS, ALLOW, 2),
                    (BE, INTRUDER, 0, 0, INGRESS, ALLOW, 2),
                    (BE, M, 0, 0, INGRESS, ENFORCED, 1),
                ],
            ),
            // Audit mode alone: AUDIT on the marker.
            (
                cnp(
                    "p",
                    "policy.veil.io/mode: audit",
                    "  endpointSelector: {matchLabels: {app: backend}}\n  ingress: [{fromEndpoints: [{matchLabels: {app: frontend}}]}]\n",
                ),
                vec![BE],
                vec![
                    (BE, FE, 0, 0, INGRESS, ALLOW, 1),
                    (BE, M, 0, 0, INGRESS, ENFORCED | AUDIT, 1),
                ],
            ),
            // Audit beside enforce: the enforcing policy alone decides.
            (
                cnp(
                    "audit",
                    "policy.veil.io/mode: audit",
                    "  endpointSelector: {matchLabels: {app: backend}}\n  ingress: [{fromEndpoints: [{matchLabels: {app: intruder}}]}]\n  ingressDeny: [{fromEndpoints: [{matchLabels: {app: frontend}}]}]\n",
                ) + &cnp(
                    "enforce",
                    "",
                    "  endpointSelector: {matchLabels: {app: backend}}\n  ingress: [{fromEndpoints: [{matchLabels: {app: frontend}}]}]\n",
                ),
                vec![BE],
                vec![
                    (BE, FE, 0, 0, INGRESS, ALLOW, 3),
                    (BE, M, 0, 0, INGRESS, ENFORCED, 3),
                ],
            ),
            // Egress-only policy leaves ingress alone; ranges expand; ICMP has no port;
            // 1-65535 is any port.
            (
                cnp(
                    "p",
                    "",
                    "  endpointSelector: {matchLabels: {app: frontend}}\n  egress:\n  - toPorts: [{ports: [{port: '7000', endPort: 7001, protocol: TCP}, {protocol: ICMP}]}]\n  - toEndpoints: [{matchLabels: {app: backend}}]\n    toPorts: [{ports: [{port: '1', endPort: 65535, protocol: UDP}]}]\n",
                ),
                vec![FE],
                vec![
                    (FE, ANY, 0, Protocol::ICMP, EGRESS, ALLOW, 1),
                    (FE, ANY, 7000, TCP, EGRESS, ALLOW, 1),
                    (FE, ANY, 7001, TCP, EGRESS, ALLOW, 1),
                    (FE, BE, 0, UDP, EGRESS, ALLOW, 2),
                    (FE, M, 0, 0, EGRESS, ENFORCED, 1),
                ],
            ),
            // Clusterwide: `{}` peers span namespaces (cluster identities only).
            (
                "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: cw}\nspec:\n  endpointSelector: {matchLabels: {app: frontend}}\n  egress: [{toEndpoints: [{matchLabels: {app: frontend}}]}]\n".into(),
                vec![FE, OTHER_FE],
                vec![
                    (FE, FE, 0, 0, EGRESS, ALLOW, 1),
                    (FE, OTHER_FE, 0, 0, EGRESS, ALLOW, 1),
                    (FE, M, 0, 0, EGRESS, ENFORCED, 1),
                    (OTHER_FE, FE, 0, 0, EGRESS, ALLOW, 1),
                    (OTHER_FE, OTHER_FE, 0, 0, EGRESS, ALLOW, 1),
                    (OTHER_FE, M, 0, 0, EGRESS, ENFORCED, 1),
                ],
            ),
        ];
        let ids = lab();
        for (yaml, locals, want) in table {
            let ps = policies(&yaml);
            let c = compile(&ps, &ids, &locals).unwrap();
            let mut want = want;
            want.sort();
            assert_eq!(entries(&c), want, "\n{yaml}");
        }
    }

    #[test]
    fn issue_flows() {
        let ids = lab();
        let mut ps = policies(BACKEND_INGRESS);
        ps.extend(policies(&egress_without_http()));
        // node-a hosts frontend and intruder, node-b the backend.
        let node_a = compile(&ps, &ids, &[FE, INTRUDER]).unwrap();
        let node_b = compile(&ps, &ids, &[BE]).unwrap();
        let allowed = Verdict::Allowed {
            is_auth_required: false,
        };
        let denied = Verdict::Denied;
        const IN: Direction = Direction::Ingress;
        const OUT: Direction = Direction::Egress;
        // (map, local, remote, port, proto, direction, verdict)
        let table = [
            (&node_b, BE, FE, 8080, TCP, IN, allowed),
            (&node_b, BE, INTRUDER, 8080, TCP, IN, denied),
            (&node_b, BE, FE, 8081, TCP, IN, denied),
            (&node_b, BE, FE, 8080, UDP, IN, denied),
            (&node_b, BE, identity::WORLD, 8080, TCP, IN, denied),
            (&node_b, BE, FE, 8080, TCP, OUT, allowed),
            (&node_a, FE, BE, 8080, TCP, OUT, allowed),
            (&node_a, FE, BE, 9090, TCP, OUT, denied),
            (&node_a, FE, INTRUDER, 8080, TCP, OUT, denied),
            (&node_a, INTRUDER, BE, 8080, TCP, OUT, allowed),
            (&node_a, FE, INTRUDER, 22, TCP, IN, allowed),
        ];
        for (map, local, remote, port, proto, direction, want) in table {
            let p = Probe {
                local,
                remote,
                port,
                proto,
                direction,
            };
            let got = (datapath_lookup(&map.entries, p), evaluate(&ps, &ids, p));
            assert_eq!(got, (want, want), "{p} (map, evaluator)");
        }

        // Flow records can name the rule behind an entry, and stats count per policy.
        let e = node_b.entries[&PolicyKey::new(BE, FE, 8080, TCP, INGRESS)];
        let r = node_b.rule(e.rule).unwrap();
        assert_eq!(
            (r.policy.to_string(), r.path.as_str()),
            ("shop/backend-ingress".into(), "spec.ingress[0]")
        );
        assert_eq!(node_b.rule(0), None);
        let stats: Vec<_> = node_b
            .stats
            .iter()
            .map(|s| (s.policy.to_string(), s.rules, s.entries))
            .collect();
        assert_eq!(
            stats,
            [
                ("shop/backend-ingress".into(), 1, 2),
                ("shop/frontend-to-backend-l7".into(), 1, 0)
            ]
        );
    }

    #[test]
    fn audit_mode_passes_would_be_drops() {
        let ids = lab();
        let yaml = BACKEND_INGRESS.replace(
            "  namespace: shop\n",
            "  namespace: shop\n  annotations:\n    policy.veil.io/mode: audit\n",
        );
        let ps = policies(&yaml);
        let c = compile(&ps, &ids, &[BE]).unwrap();
        let probe = |remote, port| Probe {
            local: BE,
            remote,
            port,
            proto: TCP,
            direction: Direction::Ingress,
        };
        let v = |r, p| datapath_lookup(&c.entries, probe(r, p));
        assert_eq!(
            v(FE, 8080),
            Verdict::Allowed {
                is_auth_required: false
            }
        );
        assert_eq!(v(INTRUDER, 8080), Verdict::Audit);
        assert_eq!(evaluate(&ps, &ids, probe(INTRUDER, 8080)), Verdict::Audit);
    }

    /// The datapath's decision (with the proxy bit) from a compiled map.
    fn l7_decision(
        c: &CompiledPolicy,
        local: u32,
        remote: u32,
        port: u16,
        proto: u8,
        dir: u8,
    ) -> veil_common::maps::PolicyDecision {
        let marker = c
            .entries
            .get(&PolicyKey::marker(local, dir))
            .map(|e| e.flags);
        let acc = PolicyKey::lookups(local, remote, port, proto, dir)
            .iter()
            .filter_map(|k| c.entries.get(k))
            .fold(0, |a, e| a | e.flags);
        veil_common::maps::policy_decision(marker, acc, false)
    }

    #[test]
    fn http_rules_mark_their_tcp_entries_l7_and_go_to_the_proxy() {
        let ids = lab();
        let c = compile(&policies(ISSUE_EGRESS_L7), &ids, &[FE, BE]).unwrap();
        let e = c.entries[&PolicyKey::new(FE, BE, 8080, TCP, EGRESS)];
        assert_eq!(e.flags, ALLOW | policy_flags::L7);
        assert_eq!(c.l7.len(), 1);
        let r = &c.l7[0];
        assert_eq!(
            (r.local, r.direction.as_str(), &r.remotes, &r.ports),
            (FE, "egress", &vec![BE], &vec![(8080, TCP)])
        );
        assert_eq!(
            r.http.as_ref().unwrap()[0].path.as_deref(),
            Some("/api/products")
        );
        // The datapath's decision carries the proxy bit, for that port only.
        let d = l7_decision(&c, FE, BE, 8080, TCP, EGRESS);
        assert!(d.allowed && d.proxy);
        assert!(!l7_decision(&c, FE, BE, 8081, TCP, EGRESS).allowed);

        // Protocol ANY with HTTP rules admits TCP only; an L4-only element of the same rule
        // goes to the proxy as "every request".
        let any = ISSUE_EGRESS_L7
            .replace("        protocol: TCP\n", "")
            .replace(
                "    toPorts:\n",
                "    toPorts:\n    - ports: [{port: '9090', protocol: TCP}]\n",
            );
        let c = compile(&policies(&any), &ids, &[FE]).unwrap();
        assert!(l7_decision(&c, FE, BE, 8080, TCP, EGRESS).proxy);
        assert!(!l7_decision(&c, FE, BE, 8080, UDP, EGRESS).allowed);
        let plain = l7_decision(&c, FE, BE, 9090, TCP, EGRESS);
        assert!(plain.allowed && !plain.proxy);
        assert_eq!(c.l7.len(), 2);
        assert!(c
            .l7
            .iter()
            .any(|r| r.http.is_none() && r.ports == vec![(9090, TCP)]));

        // Without HTTP rules nothing goes to the proxy.
        let c = compile(&policies(BACKEND_INGRESS), &ids, &[BE]).unwrap();
        assert!(c.l7.is_empty());
        assert!(c.entries.values().all(|e| e.flags & policy_flags::L7 == 0));
    }

    #[test]
    fn refusals() {
        let ids = lab();
        let bad_l7 = ISSUE_EGRESS_L7.replace("/api/products", "/api/[");
        let e = compile(&policies(&bad_l7), &ids, &[FE]).unwrap_err();
        assert!(
            crate::error_chain(&e).starts_with(
                "policy shop/frontend-to-backend-l7: spec.egress[0].toPorts[0].rules.http[0].path: "
            ),
            "{}",
            crate::error_chain(&e)
        );
        let ps = policies(BACKEND_INGRESS);
        assert!(matches!(
            compile(&ps, &ids, &[999]),
            Err(Error::UnknownLocalIdentity(999))
        ));
        let mut dup = ids.clone();
        dup.push(dup[0].clone());
        assert!(matches!(
            compile(&ps, &dup, &[BE]),
            Err(Error::DuplicateIdentity(FE))
        ));
        let mut reserved = ids.clone();
        reserved.push((identity::HOST, IdentityLabels::default()));
        assert!(matches!(
            compile(&ps, &reserved, &[BE]),
            Err(Error::ReservedIdentity(1))
        ));
        // Two remotes × 3 protocols × 65534 ports cannot fit the map.
        let wide = cnp(
            "wide",
            "",
            "  endpointSelector: {}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: frontend}}, {matchLabels: {app: intruder}}]\n    toPorts: [{ports: [{port: '2', endPort: 65535}]}]\n",
        );
        let e = compile(&policies(&wide), &ids, &[BE]).unwrap_err();
        assert!(
            matches!(
                e,
                Error::TooManyEntries {
                    max: POLICY_MAX,
                    ..
                }
            ),
            "{e}"
        );
    }
}
