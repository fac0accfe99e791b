//! The `cilium.io/v2` CiliumNetworkPolicy model, its YAML/JSON parser and validation.
//!
//! Parsing is strict: unknown fields, bad values and ambiguous shapes are errors naming the field
//! path (`spec.ingress[0].fromEndpoints[0].matchLables`). The model serializes back to the same
//! shape (as JSON for the agent's persisted set), and reading that back validates again.

use std::collections::BTreeMap;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

use super::{
    selector::{
        check_dns_label, check_dns_subdomain, check_qualified_name, LabelValue, Operator, Selector,
    },
    Error, Mode, PolicyName,
};

/// The annotation selecting [`Mode`]: `enforce` (default) or `audit`.
pub const MODE_ANNOTATION: &str = "policy.veil.io/mode";

/// Namespace of a namespaced policy without `metadata.namespace`, as Kubernetes.
pub const DEFAULT_NAMESPACE: &str = "default";

/// One CiliumNetworkPolicy or CiliumClusterwideNetworkPolicy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Policy {
    pub api_version: ApiVersion,
    pub kind: Kind,
    pub metadata: Metadata,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<Rule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub specs: Vec<Rule>,
}

/// `apiVersion`: only `cilium.io/v2`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApiVersion;

impl ApiVersion {
    pub const TEXT: &'static str = "cilium.io/v2";
}

impl Serialize for ApiVersion {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(Self::TEXT)
    }
}

impl<'de> Deserialize<'de> for ApiVersion {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if text == Self::TEXT {
            Ok(ApiVersion)
        } else {
            Err(de::Error::custom(format!(
                "unsupported apiVersion `{text}`, expected `{}`",
                Self::TEXT
            )))
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    CiliumNetworkPolicy,
    CiliumClusterwideNetworkPolicy,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    pub name: String,
    /// Filled with [`DEFAULT_NAMESPACE`] for namespaced policies by validation; always absent
    /// for clusterwide ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// One rule (`spec` or an element of `specs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Rule {
    pub endpoint_selector: Selector,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<IngressRule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress_deny: Vec<IngressDenyRule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<EgressRule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress_deny: Vec<EgressDenyRule>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct IngressRule {
    /// Absent: any peer. `[{}]`: every endpoint in the policy's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_endpoints: Option<Vec<Selector>>,
    /// Absent: every port and protocol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_ports: Option<Vec<PortRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authentication: Option<Authentication>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EgressRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_endpoints: Option<Vec<Selector>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_ports: Option<Vec<PortRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authentication: Option<Authentication>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct IngressDenyRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_endpoints: Option<Vec<Selector>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_ports: Option<Vec<PortDenyRule>>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EgressDenyRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_endpoints: Option<Vec<Selector>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_ports: Option<Vec<PortDenyRule>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortRule {
    pub ports: Vec<PortProtocol>,
    /// L7 rules, enforced by the node's L7 proxy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<L7Rules>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortDenyRule {
    pub ports: Vec<PortProtocol>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PortProtocol {
    /// Absent: every port of `protocol`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<Port>,
    #[serde(default)]
    pub protocol: Protocol,
    /// Last port of a range starting at `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_port: Option<u32>,
}

/// A destination port, 1–65535, written as a string (`"8080"`, Cilium's form) or an integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Port(pub u16);

impl Serialize for Port {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0.to_string())
    }
}

impl<'de> Deserialize<'de> for Port {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Port;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a port number 1-65535")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Port, E> {
                match u16::try_from(v) {
                    Ok(p) if p != 0 => Ok(Port(p)),
                    _ => Err(E::custom(format!("port {v} is out of range 1-65535"))),
                }
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Port, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::custom(format!("port {v} is out of range 1-65535"))),
                }
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Port, E> {
                if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(E::custom(format!(
                        "named port `{v}` is not supported, give the number"
                    )));
                }
                match v.parse::<u64>() {
                    Ok(n) => self.visit_u64(n),
                    Err(_) => Err(E::custom(format!("port {v} is out of range 1-65535"))),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// `protocol` of a port: ANY (the default) with a port means TCP, UDP and SCTP.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub enum Protocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    #[serde(rename = "SCTP")]
    Sctp,
    #[serde(rename = "ICMP")]
    Icmp,
    #[default]
    #[serde(rename = "ANY")]
    Any,
}

impl Protocol {
    pub const TCP: u8 = veil_common::ipproto::TCP;
    pub const UDP: u8 = veil_common::ipproto::UDP;
    pub const SCTP: u8 = veil_common::ipproto::SCTP;
    pub const ICMP: u8 = veil_common::ipproto::ICMP;

    /// The IP protocol number, 0 for ANY.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => Self::TCP,
            Protocol::Udp => Self::UDP,
            Protocol::Sctp => Self::SCTP,
            Protocol::Icmp => Self::ICMP,
            Protocol::Any => 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Authentication {
    pub mode: AuthMode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    Required,
    Disabled,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct L7Rules {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<Vec<HttpRule>>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<String>,
}

/// Direction of a rule section, as seen from the selected (local) endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    /// `ingress` or `egress`.
    pub fn name(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }

    pub const ALL: [Direction; 2] = [Direction::Ingress, Direction::Egress];

    /// The datapath's [`veil_common::maps::direction`] code.
    pub fn code(self) -> u8 {
        match self {
            Direction::Ingress => veil_common::maps::direction::INGRESS,
            Direction::Egress => veil_common::maps::direction::EGRESS,
        }
    }
}

/// One ingress/egress (allow or deny) rule, flattened: what the compiler works on.
#[derive(Debug, Clone)]
pub struct PeerRule<'a> {
    /// Field path, e.g. `spec.ingressDeny[1]`.
    pub path: String,
    pub direction: Direction,
    pub is_deny: bool,
    /// `None`: any peer (no `fromEndpoints`/`toEndpoints`).
    pub peers: Option<&'a [Selector]>,
    /// `None`: every port and protocol (no `toPorts`).
    pub ports: Option<Vec<PortProtocol>>,
    /// `ports` as written: the `ports` list of each `toPorts` element.
    pub port_lists: Option<Vec<&'a [PortProtocol]>>,
    /// The `rules.http` of each `toPorts` element (aligned with `port_lists`; deny rules have
    /// none).
    pub http: Vec<Option<&'a [HttpRule]>>,
    pub is_auth_required: bool,
}

impl Rule {
    /// Does the rule enforce default deny in `d` (Cilium: it has allow or deny rules there)?
    pub fn has_rules(&self, d: Direction) -> bool {
        match d {
            Direction::Ingress => !self.ingress.is_empty() || !self.ingress_deny.is_empty(),
            Direction::Egress => !self.egress.is_empty() || !self.egress_deny.is_empty(),
        }
    }

    /// Every peer rule, in the order ingress, ingressDeny, egress, egressDeny.
    pub fn peer_rules<'a>(&'a self, prefix: &str) -> Vec<PeerRule<'a>> {
        fn auth(a: &Option<Authentication>) -> bool {
            matches!(
                a,
                Some(Authentication {
                    mode: AuthMode::Required
                })
            )
        }
        let mut out = Vec::new();
        push_peer_rules(
            &mut out,
            prefix,
            Direction::Ingress,
            false,
            &self.ingress,
            |r| {
                (
                    r.from_endpoints.as_deref(),
                    port_lists(&r.to_ports, |p| &p.ports),
                    http_lists(&r.to_ports),
                    auth(&r.authentication),
                )
            },
        );
        push_peer_rules(
            &mut out,
            prefix,
            Direction::Ingress,
            true,
            &self.ingress_deny,
            |r| {
                (
                    r.from_endpoints.as_deref(),
                    port_lists(&r.to_ports, |p| &p.ports),
                    Vec::new(),
                    false,
                )
            },
        );
        push_peer_rules(
            &mut out,
            prefix,
            Direction::Egress,
            false,
            &self.egress,
            |r| {
                (
                    r.to_endpoints.as_deref(),
                    port_lists(&r.to_ports, |p| &p.ports),
                    http_lists(&r.to_ports),
                    auth(&r.authentication),
                )
            },
        );
        push_peer_rules(
            &mut out,
            prefix,
            Direction::Egress,
            true,
            &self.egress_deny,
            |r| {
                (
                    r.to_endpoints.as_deref(),
                    port_lists(&r.to_ports, |p| &p.ports),
                    Vec::new(),
                    false,
                )
            },
        );
        out
    }
}

/// The `ports` list of each `toPorts` element; `None` without `toPorts`.
fn port_lists<T>(
    to_ports: &Option<Vec<T>>,
    ports: impl Fn(&T) -> &Vec<PortProtocol>,
) -> Option<Vec<&[PortProtocol]>> {
    to_ports
        .as_ref()
        .map(|v| v.iter().map(|r| &ports(r)[..]).collect())
}

/// The `rules.http` of each `toPorts` element.
fn http_lists(to_ports: &Option<Vec<PortRule>>) -> Vec<Option<&[HttpRule]>> {
    to_ports
        .iter()
        .flatten()
        .map(|r| r.rules.as_ref().and_then(|l7| l7.http.as_deref()))
        .collect()
}

/// One rule section (`ingress`, `ingressDeny`, `egress` or `egressDeny`) as [`PeerRule`]s;
/// `view` gives a rule's peers, `toPorts` lists and whether it requires authentication.
fn push_peer_rules<'a, T>(
    out: &mut Vec<PeerRule<'a>>,
    prefix: &str,
    direction: Direction,
    is_deny: bool,
    rules: &'a [T],
    view: impl Fn(
        &'a T,
    ) -> (
        Option<&'a [Selector]>,
        Option<Vec<&'a [PortProtocol]>>,
        Vec<Option<&'a [HttpRule]>>,
        bool,
    ),
) {
    let section = match (direction, is_deny) {
        (Direction::Ingress, false) => "ingress",
        (Direction::Ingress, true) => "ingressDeny",
        (Direction::Egress, false) => "egress",
        (Direction::Egress, true) => "egressDeny",
    };
    for (i, r) in rules.iter().enumerate() {
        let (peers, port_lists, http, is_auth_required) = view(r);
        out.push(PeerRule {
            path: format!("{prefix}.{section}[{i}]"),
            direction,
            is_deny,
            peers,
            ports: port_lists
                .as_ref()
                .map(|l| l.iter().flat_map(|p| p.iter().copied()).collect()),
            port_lists,
            http,
            is_auth_required,
        });
    }
}

impl Policy {
    /// Parses exactly one policy from YAML (or JSON, which is YAML).
    pub fn from_yaml(text: &str) -> Result<Policy, Error> {
        let mut v = parse_yaml(text)?;
        match v.len() {
            1 => Ok(v.pop().expect("one policy")),
            n => Err(Error::NotOnePolicy(n)),
        }
    }

    /// Parses one policy from JSON (the agent's persisted form), validating as [`parse_yaml`].
    pub fn from_json(text: &str) -> Result<Policy, Error> {
        let mut de = serde_json::Deserializer::from_str(text);
        let mut p: Policy = match serde_path_to_error::deserialize(&mut de) {
            Ok(p) => p,
            Err(e) if e.inner().is_data() => {
                return Err(invalid(&join("", &path_string(e.path())), e.inner()));
            }
            Err(e) => return Err(Error::Json(e.into_inner())),
        };
        de.end().map_err(Error::Json)?;
        p.validate()?;
        Ok(p)
    }

    pub fn name(&self) -> PolicyName {
        PolicyName {
            namespace: self.metadata.namespace.clone().unwrap_or_default(),
            name: self.metadata.name.clone(),
        }
    }

    pub fn is_clusterwide(&self) -> bool {
        self.kind == Kind::CiliumClusterwideNetworkPolicy
    }

    /// The namespace that scopes the policy's selectors; `None` for clusterwide policies.
    pub fn namespace(&self) -> Option<&str> {
        if self.is_clusterwide() {
            None
        } else {
            Some(
                self.metadata
                    .namespace
                    .as_deref()
                    .unwrap_or(DEFAULT_NAMESPACE),
            )
        }
    }

    pub fn mode(&self) -> Mode {
        match self
            .metadata
            .annotations
            .get(MODE_ANNOTATION)
            .map(String::as_str)
        {
            Some("audit") => Mode::Audit,
            _ => Mode::Enforce,
        }
    }

    /// `spec` and every element of `specs`, with their field paths.
    pub fn rules(&self) -> impl Iterator<Item = (String, &Rule)> {
        self.spec.iter().map(|r| ("spec".to_owned(), r)).chain(
            self.specs
                .iter()
                .enumerate()
                .map(|(i, r)| (format!("specs[{i}]"), r)),
        )
    }

    /// Checks what the schema alone cannot, and fills in the default namespace. Every parse
    /// entry point calls it.
    pub fn validate(&mut self) -> Result<(), Error> {
        let m = &mut self.metadata;
        if m.name.is_empty() {
            return Err(invalid("metadata.name", "must not be empty"));
        }
        check_dns_subdomain(&m.name).map_err(|why| invalid("metadata.name", why))?;
        if self.kind == Kind::CiliumClusterwideNetworkPolicy {
            if m.namespace.is_some() {
                return Err(invalid(
                    "metadata.namespace",
                    "a clusterwide policy has no namespace",
                ));
            }
        } else {
            let ns = m
                .namespace
                .get_or_insert_with(|| DEFAULT_NAMESPACE.to_owned());
            check_dns_label(ns).map_err(|why| invalid("metadata.namespace", why))?;
        }
        for (k, v) in &m.labels {
            let path = format!("metadata.labels.{k}");
            check_qualified_name(k).map_err(|why| invalid(&path, why))?;
            LabelValue::parse(v).map_err(|why| invalid(&path, why))?;
        }
        for k in m.annotations.keys() {
            check_qualified_name(k)
                .map_err(|why| invalid(&format!("metadata.annotations.{k}"), why))?;
        }
        if let Some(v) = m.annotations.get(MODE_ANNOTATION) {
            if v != "enforce" && v != "audit" {
                return Err(invalid(
                    &format!("metadata.annotations.{MODE_ANNOTATION}"),
                    format!("unknown mode `{v}`, expected `enforce` or `audit`"),
                ));
            }
        }
        if self.spec.is_none() && self.specs.is_empty() {
            return Err(invalid("spec", "a policy needs `spec` or `specs`"));
        }
        let ns = self.namespace().map(str::to_owned);
        for (path, rule) in self.rules() {
            validate_rule(&path, rule, ns.as_deref())?;
        }
        Ok(())
    }

    /// Checks what only matters once a policy is applied: every `rules.http` rule compiles
    /// (regular expressions, header syntax) and sits on TCP ports (HTTP rules apply to TCP
    /// only; a port with protocol ANY is enforced as TCP).
    pub fn validate_for_apply(&self) -> Result<(), Error> {
        for (prefix, rule) in self.rules() {
            let sections = [
                ("ingress", rule.ingress_ports()),
                ("egress", rule.egress_ports()),
            ];
            for (section, rules) in sections {
                for (i, port_rules) in rules.iter().enumerate() {
                    for (j, pr) in port_rules.iter().enumerate() {
                        let Some(http) = pr.rules.as_ref().and_then(|l7| l7.http.as_ref()) else {
                            continue;
                        };
                        let at = format!("{prefix}.{section}[{i}].toPorts[{j}]");
                        for (k, pp) in pr.ports.iter().enumerate() {
                            if !matches!(pp.protocol, Protocol::Tcp | Protocol::Any) {
                                return Err(invalid(
                                    &format!("{at}.ports[{k}].protocol"),
                                    "`rules.http` applies to TCP ports only",
                                ));
                            }
                        }
                        for (k, h) in http.iter().enumerate() {
                            crate::l7::rules::HttpMatcher::compile(h).map_err(|e| {
                                invalid(&format!("{at}.rules.http[{k}].{}", e.field), e.reason)
                            })?;
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

impl Rule {
    fn ingress_ports(&self) -> Vec<&[PortRule]> {
        self.ingress
            .iter()
            .map(|r| r.to_ports.as_deref().unwrap_or_default())
            .collect()
    }

    fn egress_ports(&self) -> Vec<&[PortRule]> {
        self.egress
            .iter()
            .map(|r| r.to_ports.as_deref().unwrap_or_default())
            .collect()
    }
}

fn validate_rule(prefix: &str, rule: &Rule, ns: Option<&str>) -> Result<(), Error> {
    let es = format!("{prefix}.endpointSelector");
    validate_selector(&es, &rule.endpoint_selector)?;
    if let Some(ns) = ns {
        // Cilium: a namespaced policy's subject is always in the policy's namespace.
        for (k, v) in rule.endpoint_selector.match_labels.iter() {
            if k.is_namespace() && v.as_str() != ns {
                return Err(invalid(
                    &format!("{es}.matchLabels.{k}"),
                    format!("the endpointSelector of a namespaced policy always selects in its namespace `{ns}`"),
                ));
            }
        }
    }
    for r in rule.peer_rules(prefix) {
        let peers_field = match r.direction {
            Direction::Ingress => "fromEndpoints",
            Direction::Egress => "toEndpoints",
        };
        validate_peers(&format!("{}.{peers_field}", r.path), r.peers)?;
        validate_port_rules(&r.path, r.port_lists.map(Vec::into_iter))?;
    }
    Ok(())
}

/// An empty peer list would mean "any peer" in Cilium (as if the field were absent), which
/// reads like "no peer"; refuse it rather than guess.
fn validate_peers(path: &str, peers: Option<&[Selector]>) -> Result<(), Error> {
    match peers {
        None => Ok(()),
        Some([]) => Err(invalid(
            path,
            "empty list: omit the field to allow any peer, or use [{}] for every endpoint in the namespace",
        )),
        Some(v) => v
            .iter()
            .enumerate()
            .try_for_each(|(i, s)| validate_selector(&format!("{path}[{i}]"), s)),
    }
}

fn validate_selector(path: &str, s: &Selector) -> Result<(), Error> {
    for (i, r) in s.match_expressions.iter().enumerate() {
        let p = format!("{path}.matchExpressions[{i}].values");
        match (r.operator, r.values.is_empty()) {
            (Operator::In | Operator::NotIn, true) => {
                return Err(invalid(
                    &p,
                    format!("{:?} needs at least one value", r.operator),
                ))
            }
            (Operator::Exists | Operator::DoesNotExist, false) => {
                return Err(invalid(&p, format!("{:?} takes no values", r.operator)))
            }
            _ => {}
        }
    }
    Ok(())
}

fn validate_port_rules<'a>(
    rule_path: &str,
    port_rules: Option<impl Iterator<Item = &'a [PortProtocol]>>,
) -> Result<(), Error> {
    let Some(port_rules) = port_rules else {
        return Ok(());
    };
    let mut n = 0;
    for (i, ports) in port_rules.enumerate() {
        n += 1;
        let pp = format!("{rule_path}.toPorts[{i}].ports");
        if ports.is_empty() {
            return Err(invalid(
                &pp,
                "empty list: list the ports, or omit toPorts for every port",
            ));
        }
        for (j, p) in ports.iter().enumerate() {
            let path = format!("{pp}[{j}]");
            if p.protocol == Protocol::Icmp && p.port.is_some() {
                return Err(invalid(&format!("{path}.port"), "ICMP has no ports"));
            }
            if let Some(end) = p.end_port {
                let Some(Port(start)) = p.port else {
                    return Err(invalid(&format!("{path}.endPort"), "endPort needs a port"));
                };
                if end > 65535 || end < u32::from(start) {
                    return Err(invalid(
                        &format!("{path}.endPort"),
                        format!("endPort {end} is out of range {start}-65535"),
                    ));
                }
            }
        }
    }
    if n == 0 {
        return Err(invalid(
            &format!("{rule_path}.toPorts"),
            "empty list: list the ports, or omit toPorts for every port",
        ));
    }
    Ok(())
}

fn invalid(path: &str, reason: impl ToString) -> Error {
    Error::Invalid {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

/// Parses every policy in a YAML text: one document, several `---` documents, a `kind: List`
/// with `items`, or a top-level sequence. Nothing is returned unless everything parses.
pub fn parse_yaml(text: &str) -> Result<Vec<Policy>, Error> {
    let mut docs = Vec::new();
    for (i, d) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let v = serde_yaml::Value::deserialize(d).map_err(|source| Error::Yaml {
            document: i + 1,
            source,
        })?;
        docs.push(v);
    }
    let is_multi = docs.iter().filter(|d| !d.is_null()).count() > 1;
    let mut out = Vec::new();
    for (i, doc) in docs.into_iter().enumerate() {
        let doc_prefix = if is_multi {
            format!("document {}: ", i + 1)
        } else {
            String::new()
        };
        match doc {
            serde_yaml::Value::Null => {}
            serde_yaml::Value::Sequence(items) => {
                for (j, item) in items.into_iter().enumerate() {
                    out.push(from_value(item, &format!("{doc_prefix}[{j}]"))?);
                }
            }
            serde_yaml::Value::Mapping(m)
                if m.get("kind").and_then(|k| k.as_str()) == Some("List") =>
            {
                let list: List = serde_path_to_error::deserialize(serde_yaml::Value::Mapping(m))
                    .map_err(|e| invalid(&join(&doc_prefix, &path_string(e.path())), e.inner()))?;
                for (j, item) in list.items.into_iter().enumerate() {
                    out.push(from_value(item, &format!("{doc_prefix}items[{j}]"))?);
                }
            }
            other => out.push(from_value(other, &doc_prefix)?),
        }
    }
    if out.is_empty() {
        return Err(Error::Empty);
    }
    Ok(out)
}

/// `kind: List` (what `kubectl get -o yaml` prints for several objects).
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct List {
    #[serde(rename = "apiVersion")]
    _api_version: Option<String>,
    #[serde(rename = "kind")]
    _kind: String,
    #[serde(rename = "metadata", default)]
    _metadata: Option<serde_yaml::Value>,
    items: Vec<serde_yaml::Value>,
}

fn from_value(v: serde_yaml::Value, prefix: &str) -> Result<Policy, Error> {
    let mut p: Policy = serde_path_to_error::deserialize(v)
        .map_err(|e| invalid(&join(prefix, &path_string(e.path())), e.inner()))?;
    p.validate().map_err(|e| match e {
        Error::Invalid { path, reason } => Error::Invalid {
            path: join(prefix, &path),
            reason,
        },
        e => e,
    })?;
    Ok(p)
}

/// serde_path_to_error prints the root as `.`; name it.
fn path_string(p: &serde_path_to_error::Path) -> String {
    let s = p.to_string();
    if s == "." {
        String::new()
    } else {
        s
    }
}

/// Joins a locator (`items[2]`, `document 2: `, `[1]`) and a field path.
fn join(prefix: &str, path: &str) -> String {
    match (prefix.is_empty() || prefix.ends_with(' '), path.is_empty()) {
        (_, true) if prefix.trim_end().is_empty() => "policy".to_owned(),
        (_, true) => prefix.trim_end_matches([' ', ':']).to_owned(),
        (true, false) => format!("{prefix}{path}"),
        (false, false) => format!("{prefix}.{path}"),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::policy::selector::{LabelKey, NAMESPACE_LABEL};

    /// The egress policy of issue 5, verbatim (the example the docs apply).
    pub(crate) const ISSUE_EGRESS_L7: &str =
        include_str!("../../../../examples/policies/frontend-to-backend-l7.yaml");

    /// Only `app: frontend` may reach `app: backend`, on TCP 8080.
    pub(crate) const BACKEND_INGRESS: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: backend-ingress
  namespace: shop
spec:
  description: only the frontend, only on 8080
  endpointSelector:
    matchLabels:
      app: backend
  ingress:
  - fromEndpoints:
    - matchLabels:
        k8s:app: frontend
    toPorts:
    - ports:
      - port: "8080"
        protocol: TCP
"#;

    fn one(yaml: &str) -> Policy {
        Policy::from_yaml(yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"))
    }

    #[test]
    fn issue_examples_parse() {
        let p = one(ISSUE_EGRESS_L7);
        assert_eq!(p.name(), PolicyName::new("shop", "frontend-to-backend-l7"));
        let spec = p.spec.as_ref().unwrap();
        let e = &spec.egress[0];
        let pr = &e.to_ports.as_ref().unwrap()[0];
        assert_eq!(
            pr.ports,
            vec![PortProtocol {
                port: Some(Port(8080)),
                protocol: Protocol::Tcp,
                end_port: None
            }]
        );
        let http = pr.rules.as_ref().unwrap().http.as_ref().unwrap();
        assert_eq!(http[0].method.as_deref(), Some("GET"));
        assert_eq!(http[0].path.as_deref(), Some("/api/products"));
        p.validate_for_apply().unwrap();
        // A bad regular expression, header or protocol is refused at apply time, naming it.
        for (from, to, path) in [
            (
                "/api/products",
                "/api/[",
                "spec.egress[0].toPorts[0].rules.http[0].path",
            ),
            (
                "\"GET\"",
                "\"GET(\"",
                "spec.egress[0].toPorts[0].rules.http[0].method",
            ),
            (
                "protocol: TCP",
                "protocol: UDP",
                "spec.egress[0].toPorts[0].ports[0].protocol",
            ),
            (
                "method: \"GET\"",
                "method: \"GET\"\n          headers: [\"bad header: 1\"]",
                "spec.egress[0].toPorts[0].rules.http[0].headers[0]",
            ),
        ] {
            let e = one(&ISSUE_EGRESS_L7.replace(from, to))
                .validate_for_apply()
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(&format!("{path}: ")), "{e}");
        }

        let p = one(BACKEND_INGRESS);
        p.validate_for_apply().unwrap();
        assert_eq!(p.mode(), Mode::Enforce);
        let spec = p.spec.as_ref().unwrap();
        let from = spec.ingress[0].from_endpoints.as_ref().unwrap();
        // `k8s:app` and `app` are the same key.
        assert!(from[0]
            .match_labels
            .contains_key(&LabelKey::parse("app").unwrap()));
        assert_eq!(
            spec.description.as_deref(),
            Some("only the frontend, only on 8080")
        );
    }

    const HEAD: &str = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p, namespace: shop}\n";

    /// A namespaced policy whose spec is `spec` (YAML flow or block text).
    fn with_spec(spec: &str) -> String {
        format!("{HEAD}spec:\n{spec}")
    }

    #[test]
    fn valid_documents() {
        // (document, check)
        type Check = fn(&[Policy]);
        let table: Vec<(String, Check)> = vec![
            (
                "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec: {endpointSelector: {}}".into(),
                |p| {
                    assert_eq!(p[0].name(), PolicyName::new("default", "p"));
                    assert_eq!(p[0].namespace(), Some("default"));
                },
            ),
            (
                "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: cw}\nspec: {endpointSelector: {}, ingress: [{}]}".into(),
                |p| {
                    assert!(p[0].is_clusterwide());
                    assert_eq!(p[0].namespace(), None);
                    assert_eq!(p[0].name().to_string(), "cw");
                },
            ),
            (
                with_spec("  endpointSelector: {}\n  ingress:\n  - toPorts:\n    - ports:\n      - port: 53\n        protocol: UDP\n      - port: '8000'\n        endPort: 8010\n      - protocol: ICMP\n      - port: '443'\n"),
                |p| {
                    let ports = &p[0].spec.as_ref().unwrap().ingress[0].to_ports.as_ref().unwrap()[0].ports;
                    assert_eq!(ports[0], PortProtocol { port: Some(Port(53)), protocol: Protocol::Udp, end_port: None });
                    assert_eq!(ports[1], PortProtocol { port: Some(Port(8000)), protocol: Protocol::Any, end_port: Some(8010) });
                    assert_eq!(ports[2], PortProtocol { port: None, protocol: Protocol::Icmp, end_port: None });
                    assert_eq!(ports[3].protocol, Protocol::Any);
                },
            ),
            (
                with_spec("  endpointSelector:\n    matchExpressions:\n    - {key: app, operator: In, values: [a, b]}\n    - {key: k8s:tier, operator: NotIn, values: [x]}\n    - {key: any:env, operator: Exists}\n    - {key: debug, operator: DoesNotExist}\n  egress:\n  - toEndpoints: [{}]\n    authentication: {mode: required}\n  egressDeny:\n  - toEndpoints:\n    - matchLabels: {io.kubernetes.pod.namespace: kube-system}\n  ingressDeny:\n  - toPorts: [{ports: [{port: '22', protocol: TCP}]}]\n"),
                |p| {
                    let s = p[0].spec.as_ref().unwrap();
                    assert_eq!(s.endpoint_selector.match_expressions.len(), 4);
                    assert_eq!(s.egress[0].authentication, Some(Authentication { mode: AuthMode::Required }));
                    assert!(s.egress_deny[0].to_endpoints.as_ref().unwrap()[0].constrains_namespace());
                    assert!(s.has_rules(Direction::Ingress) && s.has_rules(Direction::Egress));
                },
            ),
            (
                format!("{HEAD}specs:\n- endpointSelector: {{matchLabels: {{app: a}}}}\n  ingress: [{{}}]\n- endpointSelector: {{matchLabels: {{app: b}}}}\n  egress: [{{}}]\n"),
                |p| {
                    let paths: Vec<_> = p[0].rules().map(|(path, _)| path).collect();
                    assert_eq!(paths, ["specs[0]", "specs[1]"]);
                },
            ),
            (
                "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: p\n  namespace: shop\n  labels: {team: a}\n  annotations: {policy.veil.io/mode: audit, example.com/note: anything at all}\nspec: {endpointSelector: {}}".into(),
                |p| assert_eq!(p[0].mode(), Mode::Audit),
            ),
            (
                // The namespace in a namespaced subject selector may be the policy's own.
                with_spec("  endpointSelector: {matchLabels: {k8s:io.kubernetes.pod.namespace: shop}}\n"),
                |p| assert_eq!(p.len(), 1),
            ),
            (
                format!("{ISSUE_EGRESS_L7}---\n{BACKEND_INGRESS}---\n"),
                |p| {
                    assert_eq!(p.len(), 2);
                    assert_eq!(p[1].name().name, "backend-ingress");
                },
            ),
            (
                format!("apiVersion: v1\nkind: List\nitems:\n- {}\n- {}", json_of(BACKEND_INGRESS), json_of(ISSUE_EGRESS_L7)),
                |p| assert_eq!(p.len(), 2),
            ),
            (
                format!("- {}\n- {}", json_of(BACKEND_INGRESS), json_of(ISSUE_EGRESS_L7)),
                |p| assert_eq!(p.len(), 2),
            ),
            (
                // JSON is YAML.
                json_of(BACKEND_INGRESS),
                |p| assert_eq!(p[0], Policy::from_yaml(BACKEND_INGRESS).unwrap()),
            ),
        ];
        for (doc, check) in table {
            let policies = parse_yaml(&doc).unwrap_or_else(|e| panic!("{e}\n{doc}"));
            check(&policies);
            // What the agent persists reads back the same.
            for p in &policies {
                let json = serde_json::to_string(p).unwrap();
                assert_eq!(&Policy::from_json(&json).unwrap(), p, "{json}");
                let yaml = serde_yaml::to_string(p).unwrap();
                assert_eq!(&Policy::from_yaml(&yaml).unwrap(), p, "{yaml}");
            }
        }
    }

    fn json_of(yaml: &str) -> String {
        let v: serde_yaml::Value = serde_yaml::from_str(yaml).unwrap();
        serde_json::to_string(&v).unwrap()
    }

    #[test]
    fn invalid_documents() {
        // (document, expected error path, expected words in the reason)
        let table: Vec<(String, &str, &str)> = vec![
            (
                with_spec("  endpointSelector: {}\n  ingress:\n  - fromEndpoints:\n    - matchLables: {app: a}\n"),
                "spec.ingress[0].fromEndpoints[0].matchLables",
                "unknown field",
            ),
            (with_spec("  endpointSelector: {}\n  ingres: []\n"), "spec.ingres", "unknown field"),
            (with_spec("  endpointSelector: {}\n  ingress: [{toCIDR: [10.0.0.0/8]}]\n"), "spec.ingress[0].toCIDR", "unknown field"),
            (format!("{HEAD}spec: {{endpointSelector: {{}}}}\nstatus: {{}}\n"), "status", "unknown field"),
            ("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p, uid: x}\nspec: {endpointSelector: {}}".into(), "metadata.uid", "unknown field"),
            (with_spec("  endpointSelector: {}\n  ingress: [{toPorts: [{ports: [{port: '8080', protocl: TCP}]}]}]\n"), "spec.ingress[0].toPorts[0].ports[0].protocl", "unknown field"),
            (with_spec("  endpointSelector: {}\n  ingressDeny: [{authentication: {mode: required}}]\n"), "spec.ingressDeny[0].authentication", "unknown field"),
            (with_spec("  endpointSelector: {}\n  egressDeny: [{toPorts: [{ports: [{port: '1'}], rules: {http: [{}]}}]}]\n"), "spec.egressDeny[0].toPorts[0].rules", "unknown field"),
            (with_spec("  endpointSelector: {}\n  egress: [{toPorts: [{ports: [{port: '80'}], rules: {kafka: []}}]}]\n"), "spec.egress[0].toPorts[0].rules.kafka", "unknown field"),
            (with_spec("  endpointSelector: {}\n  egress: [{toPorts: [{ports: [{port: '80'}], rules: {http: [{method: GET, pth: /}]}}]}]\n"), "spec.egress[0].toPorts[0].rules.http[0].pth", "unknown field"),
            // Bad values.
            (with_spec("  endpointSelector: {}\n  ingress: [{toPorts: [{ports: [{port: '0'}]}]}]\n"), "spec.ingress[0].toPorts[0].ports[0].port", "out of range"),
            (with_spec("  endpointSelector: {}\n  ingress: [{toPorts: [{ports: [{port: 0}]}]}]\n"), "spec.ingress[0].toPorts[0].ports[0].port", "out of range"),
            (with_spec("  endpointSelector: {}\n  ingress: [{toPorts: [{ports: [{port: '65536'}]}]}]\n"), "spec.ingress[0].toPorts[0].ports[0].port", "out of range"),
            (with_spec("  endpointSelector: {}\n  ingress: [{toPorts: [{ports: [{port: 70000}]}]}]\n"), "spec.ingress[0].toPorts[0].ports[0].port", "out of range"),
            (with_spec("  endpointSelector: {}\n  ingress: [{toPorts: [{ports: [{port: -1}]}]}]\n"), "spec.ingress[0].toPorts[0].ports[0].port", "out of range"),
            (with_spec("  endpointSelector: {}\n  ingress: [{toPorts: [{ports: [{port: http}]}]}]\n"), "spec.ingress[0].toPorts[0].ports[0].port", "named port"),
            (with_spec("  endpointSelector: {}\n  ingress: [{toPorts: [{ports: [{port: '80', protocol: tcp}]}]}]\n"), "spec.ingress[0].toPorts[0].ports[0].protocol", "unknown variant `tcp`"),
            (with_spec("  endpointSelector: {}\n  ingress: [{toPorts: [{ports: [{port: '80', protocol: ICMPv6}]}]}]\n"), "spec.ingress[0].toPorts[0].ports[0].protocol", "unknown variant"),
            (with_spec("  endpointSelector: {}\n  ingress: [{toPorts: [{ports: [{port: '80', protocol: ICMP}]}]}]\n"), "spec.ingress[0].toPorts[0].ports[0].port", "ICMP has no ports"),
            (with_spec("  endpointSelector: {}\n  ingress: [{toPorts: [{ports: [{port: '80', endPort: 79}]}]}]\n"), "spec.ingress[0].toPorts[0].ports[0].endPort", "out of range 80-65535"),
            (with_spec("  endpointSelector: {}\n  ingress: [{toPorts: [{ports: [{port: '80', endPort: 65536}]}]}]\n"), "spec.ingress[0].toPorts[0].ports[0].endPort", "out of range"),
            (with_spec("  endpointSelector: {}\n  ingress: [{toPorts: [{ports: [{endPort: 90}]}]}]\n"), "spec.ingress[0].toPorts[0].ports[0].endPort", "needs a port"),
            (with_spec("  endpointSelector: {}\n  ingress: [{toPorts: [{ports: []}]}]\n"), "spec.ingress[0].toPorts[0].ports", "empty list"),
            (with_spec("  endpointSelector: {}\n  ingress: [{toPorts: [{rules: {}}]}]\n"), "spec.ingress[0].toPorts[0]", "missing field `ports`"),
            (with_spec("  endpointSelector: {}\n  egress: [{toPorts: []}]\n"), "spec.egress[0].toPorts", "empty list"),
            (with_spec("  endpointSelector: {}\n  ingress: [{fromEndpoints: []}]\n"), "spec.ingress[0].fromEndpoints", "empty list"),
            (with_spec("  endpointSelector: {}\n  egressDeny: [{toEndpoints: []}]\n"), "spec.egressDeny[0].toEndpoints", "empty list"),
            (with_spec("  endpointSelector: {}\n  ingress: [{authentication: {mode: optional}}]\n"), "spec.ingress[0].authentication.mode", "unknown variant `optional`"),
            (with_spec("  endpointSelector: {matchLabels: {'bad key': x}}\n"), "spec.endpointSelector.matchLabels.bad key", "bad label key `bad key`"),
            (with_spec("  endpointSelector: {matchLabels: {app: 'a b'}}\n"), "spec.endpointSelector.matchLabels.app", "bad label value"),
            (with_spec("  endpointSelector: {matchLabels: {app: 1}}\n"), "spec.endpointSelector.matchLabels.app", "invalid type"),
            (with_spec("  endpointSelector: {matchLabels: {reserved:host: ''}}\n"), "spec.endpointSelector.matchLabels.reserved:host", "label source `reserved:`"),
            (with_spec("  endpointSelector: {matchLabels: {k8s:app: a, app: a}}\n"), "spec.endpointSelector.matchLabels", "given twice"),
            (with_spec("  endpointSelector: {matchExpressions: [{key: app, operator: Equals, values: [a]}]}\n"), "spec.endpointSelector.matchExpressions[0].operator", "unknown variant `Equals`"),
            (with_spec("  endpointSelector: {matchExpressions: [{key: app, operator: In}]}\n"), "spec.endpointSelector.matchExpressions[0].values", "at least one value"),
            (with_spec("  endpointSelector: {matchExpressions: [{key: app, operator: Exists, values: [a]}]}\n"), "spec.endpointSelector.matchExpressions[0].values", "takes no values"),
            (with_spec("  endpointSelector: {}\n  ingress: [{fromEndpoints: [{matchExpressions: [{key: app, operator: NotIn, values: []}]}]}]\n"), "spec.ingress[0].fromEndpoints[0].matchExpressions[0].values", "at least one value"),
            (with_spec("  endpointSelector: {matchLabels: {io.kubernetes.pod.namespace: other}}\n"), "spec.endpointSelector.matchLabels.io.kubernetes.pod.namespace", "always selects in its namespace `shop`"),
            (with_spec("  ingress: [{}]\n"), "spec", "missing field `endpointSelector`"),
            // Documents and metadata.
            ("apiVersion: cilium.io/v1\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec: {endpointSelector: {}}".into(), "apiVersion", "unsupported apiVersion"),
            ("apiVersion: cilium.io/v2\nkind: NetworkPolicy\nmetadata: {name: p}\nspec: {endpointSelector: {}}".into(), "kind", "unknown variant `NetworkPolicy`"),
            ("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: ''}\nspec: {endpointSelector: {}}".into(), "metadata.name", "must not be empty"),
            ("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: Bad_Name}\nspec: {endpointSelector: {}}".into(), "metadata.name", "lowercase"),
            ("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {namespace: shop}\nspec: {endpointSelector: {}}".into(), "metadata", "missing field `name`"),
            ("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p, namespace: Shop}\nspec: {endpointSelector: {}}".into(), "metadata.namespace", "lowercase"),
            ("apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: p, namespace: shop}\nspec: {endpointSelector: {}}".into(), "metadata.namespace", "clusterwide policy has no namespace"),
            ("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p, annotations: {policy.veil.io/mode: dry-run}}\nspec: {endpointSelector: {}}".into(), "metadata.annotations.policy.veil.io/mode", "unknown mode `dry-run`"),
            ("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p, labels: {a: 'x y'}}\nspec: {endpointSelector: {}}".into(), "metadata.labels.a", "bad label value"),
            ("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\n".into(), "spec", "needs `spec` or `specs`"),
            ("kind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec: {endpointSelector: {}}".into(), "policy", "missing field `apiVersion`"),
            (format!("{HEAD}specs:\n- endpointSelector: {{}}\n- endpointSelector: {{}}\n  egress: [{{toEndpoints: [{{matchLabels: {{app: '-x'}}}}]}}]\n"), "specs[1].egress[0].toEndpoints[0].matchLabels.app", "bad label value"),
            (format!("{BACKEND_INGRESS}---\n{}", with_spec("  endpointSelector: {}\n  ingress: [{toPorts: [{ports: [{port: '0'}]}]}]\n")), "document 2: spec.ingress[0].toPorts[0].ports[0].port", "out of range"),
            (format!("apiVersion: v1\nkind: List\nitems:\n- {}\n- {{apiVersion: cilium.io/v2, kind: CiliumNetworkPolicy, metadata: {{name: q}}, spec: {{endpointSelector: {{}}, egres: []}}}}", json_of(BACKEND_INGRESS)), "items[1].spec.egres", "unknown field"),
            ("apiVersion: v1\nkind: List\nitem: []".into(), "item", "unknown field"),
            (format!("- {}\n- 3", json_of(BACKEND_INGRESS)), "[1]", "invalid type"),
        ];
        let mut failures = Vec::new();
        for (doc, path, reason) in &table {
            match parse_yaml(doc) {
                Err(Error::Invalid {
                    path: got,
                    reason: why,
                }) if got == *path && why.contains(reason) => {}
                got => failures.push(format!("want {path}: {reason}\n got {got:?}")),
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn not_yaml_and_not_one() {
        let e = parse_yaml("spec: [unclosed").unwrap_err();
        assert!(matches!(e, Error::Yaml { document: 1, .. }), "{e:?}");
        assert!(matches!(parse_yaml(""), Err(Error::Empty)));
        assert!(matches!(parse_yaml("---\n---\n"), Err(Error::Empty)));
        let two = format!("{ISSUE_EGRESS_L7}---\n{BACKEND_INGRESS}");
        assert!(matches!(
            Policy::from_yaml(&two),
            Err(Error::NotOnePolicy(2))
        ));
        assert!(matches!(Policy::from_json("{"), Err(Error::Json(_))));
        let e = Policy::from_json(r#"{"apiVersion":"cilium.io/v2","kind":"CiliumNetworkPolicy","metadata":{"name":"p"},"spec":{"endpointSelector":{"matchLabels":{"app":"x"}},"ingress":[{"toPorts":[{"ports":[{"port":"99999"}]}]}]}}"#).unwrap_err();
        assert!(
            e.to_string().starts_with(
                "spec.ingress[0].toPorts[0].ports[0].port: port 99999 is out of range"
            ),
            "{e}"
        );
    }

    #[test]
    fn peer_rules_flatten_each_section() {
        let p = one(&with_spec(
            "  endpointSelector: {}\n  ingress: [{fromEndpoints: [{}], authentication: {mode: required}}]\n  ingressDeny: [{toPorts: [{ports: [{port: '22'}]}, {ports: [{port: '23'}]}]}]\n  egress: [{toPorts: [{ports: [{protocol: UDP}]}]}]\n  egressDeny: [{toEndpoints: [{}, {}]}]\n",
        ));
        let rules = p.spec.as_ref().unwrap().peer_rules("spec");
        let got: Vec<_> = rules
            .iter()
            .map(|r| {
                let ports = r.ports.as_ref().map(|v| {
                    v.iter()
                        .map(|pp| (pp.port.map(|p| p.0), pp.protocol))
                        .collect::<Vec<_>>()
                });
                let lists = r.port_lists.as_ref().map(Vec::len);
                let peers = r.peers.map(<[_]>::len);
                let flags = (r.direction, r.is_deny, r.is_auth_required);
                (r.path.as_str(), flags, peers, ports, lists)
            })
            .collect();
        let any = Protocol::Any;
        assert_eq!(
            got,
            [
                (
                    "spec.ingress[0]",
                    (Direction::Ingress, false, true),
                    Some(1),
                    None,
                    None
                ),
                (
                    "spec.ingressDeny[0]",
                    (Direction::Ingress, true, false),
                    None,
                    Some(vec![(Some(22), any), (Some(23), any)]),
                    Some(2)
                ),
                (
                    "spec.egress[0]",
                    (Direction::Egress, false, false),
                    None,
                    Some(vec![(None, Protocol::Udp)]),
                    Some(1)
                ),
                (
                    "spec.egressDeny[0]",
                    (Direction::Egress, true, false),
                    Some(2),
                    None,
                    None
                ),
            ]
        );
    }

    #[test]
    fn namespace_label_key_is_canonical() {
        let p = one(&with_spec(
            "  endpointSelector: {}\n  ingress: [{fromEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: other}}]}]\n",
        ));
        let sel = &p.spec.unwrap().ingress[0].from_endpoints.clone().unwrap()[0];
        let (k, v) = sel.match_labels.iter().next().unwrap();
        assert_eq!((k.as_str(), v.as_str()), (NAMESPACE_LABEL, "other"));
    }
}
