//! cluster::netpol: Kubernetes `networking.k8s.io/v1` NetworkPolicy as veil's policy model (a
//! namespaced CiliumNetworkPolicy named `networkpolicy.<name>`), or why it cannot be enforced.
//!
//! Kubernetes semantics, in Cilium's terms:
//! - `podSelector` → `endpointSelector`; `policyTypes` (default `Ingress`, plus `Egress` when
//!   egress rules exist) decide the directions the policy isolates: a type with no rules is
//!   `[{}]`, which matches nothing (deny all in that direction).
//! - A rule without peers admits every peer, outside the cluster too: its ports become a
//!   `toPorts` rule without endpoint selectors; without ports either, every protocol (`ANY`,
//!   and `ICMP`).
//! - A peer's `podSelector` selects in the policy's namespace; `namespaceSelector: {}` widens
//!   it to every namespace; a `namespaceSelector` with labels selects the namespaces carrying
//!   them, as the identities' `io.cilium.k8s.namespace.labels.<key>` labels (Cilium's
//!   translation); `kubernetes.io/metadata.name` names the namespace itself. `ipBlock` is
//!   refused (veil has no CIDR rules yet), as are named ports.

use k8s_openapi::{
    api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec},
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};
use serde_json::{json, Value};

use crate::policy::{
    selector::{NAMESPACE_LABEL, NAMESPACE_LABELS_PREFIX},
    Policy,
};

/// The label Kubernetes sets on every Namespace to its name.
const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// The policy's name in veil's set: apart from CiliumNetworkPolicies of the same name.
pub fn policy_name(name: &str) -> String {
    format!("networkpolicy.{name}")
}

/// The NetworkPolicy as a CiliumNetworkPolicy, validated as `veil policy apply` would.
pub fn policy_from(np: &NetworkPolicy) -> Result<Policy, String> {
    let name = np.metadata.name.as_deref().ok_or("no metadata.name")?;
    let namespace = np
        .metadata
        .namespace
        .as_deref()
        .ok_or("no metadata.namespace")?;
    let spec = np.spec.as_ref().ok_or("no spec")?;
    let doc = json!({
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {"name": policy_name(name), "namespace": namespace},
        "spec": rule(spec)?,
    });
    let p = Policy::from_json(&doc.to_string()).map_err(|e| e.to_string())?;
    p.validate_for_apply().map_err(|e| e.to_string())?;
    Ok(p)
}

/// One NetworkPolicy rule: its peers (`from` or `to`) and its ports.
type RuleParts<'a> = (
    Option<&'a Vec<NetworkPolicyPeer>>,
    Option<&'a Vec<NetworkPolicyPort>>,
);

fn rule(spec: &NetworkPolicySpec) -> Result<Value, String> {
    let types = spec.policy_types.clone().unwrap_or_else(|| {
        let mut t = vec!["Ingress".to_owned()];
        if spec.egress.is_some() {
            t.push("Egress".to_owned());
        }
        t
    });
    let mut out = json!({"endpointSelector": selector(spec.pod_selector.as_ref())});
    for (kind, peers_key, cnp_key, cnp_peers) in [
        ("Ingress", "from", "ingress", "fromEndpoints"),
        ("Egress", "to", "egress", "toEndpoints"),
    ] {
        if !types.iter().any(|t| t == kind) {
            continue;
        }
        let rules: Vec<RuleParts> = match kind {
            "Ingress" => spec
                .ingress
                .iter()
                .flatten()
                .map(|r| (r.from.as_ref(), r.ports.as_ref()))
                .collect(),
            _ => spec
                .egress
                .iter()
                .flatten()
                .map(|r| (r.to.as_ref(), r.ports.as_ref()))
                .collect(),
        };
        let mut cnp_rules = Vec::new();
        for (i, (peers, ports)) in rules.into_iter().enumerate() {
            let at = |what: String| format!("spec.{cnp_key}[{i}].{what}");
            let mut r = json!({});
            match peers.filter(|p| !p.is_empty()) {
                Some(peers) => {
                    let sels = peers
                        .iter()
                        .enumerate()
                        .map(|(j, p)| peer(p).map_err(|e| at(format!("{peers_key}[{j}]: {e}"))))
                        .collect::<Result<Vec<_>, _>>()?;
                    r[cnp_peers] = Value::Array(sels);
                    if let Some(ports) = ports.filter(|p| !p.is_empty()) {
                        r["toPorts"] = to_ports(ports).map_err(|e| at(format!("ports: {e}")))?;
                    }
                }
                // No peers: every peer, reserved ones included (a port rule without selectors).
                None => {
                    r["toPorts"] = match ports.filter(|p| !p.is_empty()) {
                        Some(ports) => to_ports(ports).map_err(|e| at(format!("ports: {e}")))?,
                        None => json!([{"ports": [{"protocol": "ANY"}, {"protocol": "ICMP"}]}]),
                    };
                }
            }
            cnp_rules.push(r);
        }
        if cnp_rules.is_empty() {
            // Isolated in this direction with nothing allowed: Cilium's deny-all rule.
            cnp_rules.push(json!({}));
        }
        out[cnp_key] = Value::Array(cnp_rules);
    }
    Ok(out)
}

fn selector(s: Option<&LabelSelector>) -> Value {
    let mut v = json!({});
    if let Some(s) = s {
        if let Some(l) = s.match_labels.as_ref().filter(|l| !l.is_empty()) {
            v["matchLabels"] = json!(l);
        }
        if let Some(e) = s.match_expressions.as_ref().filter(|e| !e.is_empty()) {
            v["matchExpressions"] = json!(e);
        }
    }
    v
}

fn peer(p: &NetworkPolicyPeer) -> Result<Value, String> {
    if p.ip_block.is_some() {
        return Err("ipBlock is not supported yet".into());
    }
    let mut sel = selector(p.pod_selector.as_ref());
    if let Some(ns) = &p.namespace_selector {
        // A namespace's name is the identity's namespace label; its other labels are the
        // identity's prefixed namespace labels.
        let key = |k: &str| match k {
            NAMESPACE_NAME_LABEL => NAMESPACE_LABEL.to_owned(),
            _ => format!("{NAMESPACE_LABELS_PREFIX}{k}"),
        };
        let mut exprs: Vec<Value> = sel
            .get("matchExpressions")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        // Any namespace, narrowed by the labels below (without it the selector would be
        // confined to the policy's namespace).
        exprs.push(json!({"key": NAMESPACE_LABEL, "operator": "Exists"}));
        for (k, v) in ns.match_labels.iter().flatten() {
            exprs.push(json!({"key": key(k), "operator": "In", "values": [v]}));
        }
        for r in ns.match_expressions.iter().flatten() {
            let mut e = json!({"key": key(&r.key), "operator": r.operator});
            if let Some(values) = &r.values {
                e["values"] = json!(values);
            }
            exprs.push(e);
        }
        sel["matchExpressions"] = Value::Array(exprs);
    }
    Ok(sel)
}

fn to_ports(ports: &[NetworkPolicyPort]) -> Result<Value, String> {
    let list = ports
        .iter()
        .map(|p| {
            let protocol = p.protocol.clone().unwrap_or_else(|| "TCP".into());
            let mut v = json!({"protocol": protocol});
            match &p.port {
                None => {}
                Some(IntOrString::Int(n)) => v["port"] = json!(n.to_string()),
                Some(IntOrString::String(s)) if s.parse::<u16>().is_ok() => v["port"] = json!(s),
                Some(IntOrString::String(s)) => {
                    return Err(format!("named port {s:?} is not supported yet"));
                }
            }
            if let Some(end) = p.end_port {
                v["endPort"] = json!(end);
            }
            Ok(v)
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(json!([{"ports": list}]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Direction;

    fn np(spec: Value) -> NetworkPolicy {
        serde_json::from_value(json!({
            "metadata": {"name": "allow", "namespace": "shop"},
            "spec": spec,
        }))
        .unwrap()
    }

    fn converted(spec: Value) -> Value {
        let p = policy_from(&np(spec)).unwrap();
        serde_json::to_value(p.spec.unwrap()).unwrap()
    }

    #[test]
    fn pod_and_port_rules_become_endpoint_and_port_rules() {
        let v = converted(json!({
            "podSelector": {"matchLabels": {"app": "backend"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "frontend"}}}],
                         "ports": [{"port": 8080}, {"port": "9000", "protocol": "UDP", "endPort": 9010}]}]
        }));
        assert_eq!(
            v["endpointSelector"],
            json!({"matchLabels": {"app": "backend"}})
        );
        assert_eq!(
            v["ingress"],
            json!([{"fromEndpoints": [{"matchLabels": {"app": "frontend"}}],
                    "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"},
                                           {"port": "9000", "protocol": "UDP", "endPort": 9010}]}]}])
        );
        assert!(v.get("egress").is_none(), "only Ingress by default: {v}");
        let p = policy_from(&np(json!({"podSelector": {}, "ingress": []}))).unwrap();
        assert_eq!(p.name().name, "networkpolicy.allow");
    }

    #[test]
    fn isolation_without_rules_denies_and_rules_without_peers_admit_everyone() {
        let v = converted(json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}));
        assert_eq!(v["ingress"], json!([{}]));
        assert_eq!(v["egress"], json!([{}]));
        let p = policy_from(&np(json!({"podSelector": {}, "policyTypes": ["Egress"]}))).unwrap();
        let rule = p.spec.as_ref().unwrap();
        assert!(rule.has_rules(Direction::Egress) && !rule.has_rules(Direction::Ingress));
        let v = converted(json!({"podSelector": {}, "ingress": [{}]}));
        assert_eq!(
            v["ingress"],
            json!([{"toPorts": [{"ports": [{"protocol": "ANY"}, {"protocol": "ICMP"}]}]}])
        );
        let v = converted(json!({"podSelector": {}, "ingress": [{"ports": [{"port": 80}]}]}));
        assert_eq!(
            v["ingress"],
            json!([{"toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}]}])
        );
    }

    #[test]
    fn namespace_selectors_by_name_labels_or_all_and_refusals_named() {
        let v = converted(json!({
            "podSelector": {},
            "egress": [{"to": [
                {"namespaceSelector": {}},
                {"namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: "db"}},
                 "podSelector": {"matchLabels": {"app": "pg"}}},
                {"namespaceSelector": {"matchLabels": {"team": "a"},
                    "matchExpressions": [{"key": "env", "operator": "NotIn", "values": ["dev"]},
                                         {"key": "tier", "operator": "Exists"}]}}
            ]}]
        }));
        let exists = json!({"key": NAMESPACE_LABEL, "operator": "Exists"});
        assert_eq!(
            v["egress"][0]["toEndpoints"],
            json!([
                {"matchExpressions": [exists]},
                {"matchLabels": {"app": "pg"},
                 "matchExpressions": [exists, {"key": NAMESPACE_LABEL, "operator": "In", "values": ["db"]}]},
                {"matchExpressions": [exists,
                    {"key": "io.cilium.k8s.namespace.labels.team", "operator": "In", "values": ["a"]},
                    {"key": "io.cilium.k8s.namespace.labels.env", "operator": "NotIn", "values": ["dev"]},
                    {"key": "io.cilium.k8s.namespace.labels.tier", "operator": "Exists"}]}
            ])
        );
        for (spec, want) in [
            (
                json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "198.18.0.0/15"}}]}]}),
                "spec.ingress[0].from[0]: ipBlock",
            ),
            (
                json!({"podSelector": {}, "egress": [{"ports": [{"port": "http"}]}]}),
                "spec.egress[0].ports: named port",
            ),
        ] {
            let e = policy_from(&np(spec)).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
    }
}
