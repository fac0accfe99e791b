//! Numeric security identities: one per (namespace, service account, label set), the same on
//! every node. The service account is part of the key because the SPIFFE ID
//! (`spiffe://<td>/ns/<namespace>/sa/<service account>`) is: pods that share labels but not a
//! service account are different workloads, authenticated and revoked apart (security issue §3).
//!
//! The allocator is a plain table owned by whoever publishes cluster state (the lab CLI today, an
//! identity CRD in Kubernetes mode); nodes only read the resulting `(id, labels)` list. Ids are
//! handed out in increasing order from [`identity::FIRST_CLUSTER`] and never reused, so a flow
//! record or an auth entry naming an old id can never be mistaken for a newer label set.

use std::{collections::BTreeMap, fmt};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use veil_common::maps::identity;

use super::{
    selector::{
        check_dns_label, check_qualified_name, LabelValue, NAMESPACE_LABEL,
        NAMESPACE_LABELS_PREFIX, SERVICE_ACCOUNT_LABEL,
    },
    Error,
};

/// The labels of an identity: the pod's labels plus `io.kubernetes.pod.namespace` (and, for pods,
/// `io.cilium.k8s.policy.serviceaccount`), with canonical keys (no `k8s:` prefix).
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct IdentityLabels(BTreeMap<String, String>);

impl IdentityLabels {
    /// The namespace label always carries `namespace`, whatever `labels` say about it: a pod
    /// cannot claim another namespace's identity by labelling itself.
    pub fn new(
        namespace: &str,
        labels: impl IntoIterator<Item = (impl Into<String>, impl Into<String>)>,
    ) -> Self {
        let mut map: BTreeMap<String, String> = labels
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        map.insert(NAMESPACE_LABEL.to_owned(), namespace.to_owned());
        Self(map)
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    pub fn namespace(&self) -> Option<&str> {
        self.get(NAMESPACE_LABEL)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

impl fmt::Display for IdentityLabels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (k, v)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "k8s:{k}={v}")?;
        }
        Ok(())
    }
}

/// What an identity is allocated for: a namespace, a service account, the pod's own labels
/// (without the namespace and service-account labels, which those fields supply) and the
/// namespace's labels (Kubernetes mode; the files source has none).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityKey {
    pub namespace: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub namespace_labels: BTreeMap<String, String>,
}

impl IdentityKey {
    /// Validates the namespace, service account and labels; drops a namespace or
    /// service-account label the pod set on itself (a pod cannot claim another's).
    pub fn new(
        namespace: &str,
        service_account: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<Self, Error> {
        let bad = |reason: String| Error::BadIdentity {
            namespace: namespace.to_owned(),
            reason,
        };
        check_dns_label(namespace).map_err(|why| bad(format!("namespace: {why}")))?;
        if service_account.is_empty() {
            return Err(bad("service account: empty".into()));
        }
        LabelValue::parse(service_account).map_err(|why| bad(format!("service account: {why}")))?;
        check_labels(namespace, "label", labels)?;
        let mut out = BTreeMap::new();
        for (k, v) in labels {
            if k != NAMESPACE_LABEL
                && k != SERVICE_ACCOUNT_LABEL
                && !k.starts_with(NAMESPACE_LABELS_PREFIX)
            {
                out.insert(k.clone(), v.clone());
            }
        }
        Ok(Self {
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            labels: out,
            namespace_labels: BTreeMap::new(),
        })
    }

    /// The key with the namespace's own labels (as `kubectl label namespace` sets them, without
    /// the prefix), validated like pod labels.
    pub fn with_namespace_labels(
        mut self,
        labels: &BTreeMap<String, String>,
    ) -> Result<Self, Error> {
        check_labels(&self.namespace, "namespace label", labels)?;
        self.namespace_labels = labels.clone();
        Ok(self)
    }

    /// Reads a key back from its identity labels (a `VeilIdentity`'s `spec.labels`): the
    /// namespace, service-account and prefixed namespace labels go back to their fields.
    pub fn from_identity_labels(labels: &BTreeMap<String, String>) -> Result<Self, Error> {
        let missing = |what: &str| Error::BadIdentity {
            namespace: labels.get(NAMESPACE_LABEL).cloned().unwrap_or_default(),
            reason: format!("no {what} label"),
        };
        let ns = labels
            .get(NAMESPACE_LABEL)
            .ok_or_else(|| missing(NAMESPACE_LABEL))?;
        let sa = labels
            .get(SERVICE_ACCOUNT_LABEL)
            .ok_or_else(|| missing(SERVICE_ACCOUNT_LABEL))?;
        let ns_labels: BTreeMap<String, String> = labels
            .iter()
            .filter_map(|(k, v)| {
                Some((
                    k.strip_prefix(NAMESPACE_LABELS_PREFIX)?.to_owned(),
                    v.clone(),
                ))
            })
            .collect();
        Self::new(ns, sa, labels)?.with_namespace_labels(&ns_labels)
    }

    pub fn identity_labels(&self) -> IdentityLabels {
        let mut l = IdentityLabels::new(&self.namespace, &self.labels);
        l.0.insert(
            SERVICE_ACCOUNT_LABEL.to_owned(),
            self.service_account.clone(),
        );
        for (k, v) in &self.namespace_labels {
            l.0.insert(format!("{NAMESPACE_LABELS_PREFIX}{k}"), v.clone());
        }
        l
    }
}

/// Validates label keys (qualified names) and values; errors name `what` and the key.
fn check_labels(
    namespace: &str,
    what: &str,
    labels: &BTreeMap<String, String>,
) -> Result<(), Error> {
    let bad = |reason: String| Error::BadIdentity {
        namespace: namespace.to_owned(),
        reason,
    };
    for (k, v) in labels {
        check_qualified_name(k).map_err(|why| bad(format!("{what} key `{k}`: {why}")))?;
        LabelValue::parse(v).map_err(bad)?;
    }
    Ok(())
}

/// The identity table. Serialized as `{"next": N, "identities": [{"id", "namespace",
/// "labels"}]}` (JSON map keys must be strings, so not as a map).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityAllocator {
    table: BTreeMap<IdentityKey, u32>,
    /// Next id to hand out; always above every id ever handed out.
    next: u32,
}

impl Default for IdentityAllocator {
    fn default() -> Self {
        Self {
            table: BTreeMap::new(),
            next: identity::FIRST_CLUSTER,
        }
    }
}

impl IdentityAllocator {
    pub fn new() -> Self {
        Self::default()
    }

    /// The identity of `labels` for service account `sa` in `namespace`, allocating the next
    /// free id if it has none.
    pub fn allocate(
        &mut self,
        namespace: &str,
        sa: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<u32, Error> {
        let key = IdentityKey::new(namespace, sa, labels)?;
        if let Some(id) = self.table.get(&key) {
            return Ok(*id);
        }
        let id = self.next;
        if id == identity::SELECTOR_MARKER {
            return Err(Error::IdentitiesExhausted);
        }
        self.next = id + 1;
        self.table.insert(key, id);
        Ok(id)
    }

    pub fn get(&self, namespace: &str, sa: &str, labels: &BTreeMap<String, String>) -> Option<u32> {
        self.table
            .get(&IdentityKey::new(namespace, sa, labels).ok()?)
            .copied()
    }

    /// Forgets an identity (no pod carries it any more). Its id is not handed out again.
    pub fn release(
        &mut self,
        namespace: &str,
        sa: &str,
        labels: &BTreeMap<String, String>,
    ) -> Option<u32> {
        self.table
            .remove(&IdentityKey::new(namespace, sa, labels).ok()?)
    }

    /// Forgets every identity for which `is_live` is false.
    pub fn retain(&mut self, mut is_live: impl FnMut(&IdentityKey, u32) -> bool) {
        self.table.retain(|k, id| is_live(k, *id));
    }

    pub fn table(&self) -> &BTreeMap<IdentityKey, u32> {
        &self.table
    }

    /// `(id, labels)` of every identity, by id: the compiler's input.
    pub fn identities(&self) -> Vec<(u32, IdentityLabels)> {
        let mut v: Vec<_> = self
            .table
            .iter()
            .map(|(k, id)| (*id, k.identity_labels()))
            .collect();
        v.sort();
        v
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TableEntry {
    id: u32,
    namespace: String,
    service_account: String,
    labels: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TableRepr {
    next: u32,
    identities: Vec<TableEntry>,
}

impl Serialize for IdentityAllocator {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut identities: Vec<_> = self
            .table
            .iter()
            .map(|(k, id)| TableEntry {
                id: *id,
                namespace: k.namespace.clone(),
                service_account: k.service_account.clone(),
                labels: k.labels.clone(),
            })
            .collect();
        identities.sort_by_key(|e| e.id);
        TableRepr {
            next: self.next,
            identities,
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for IdentityAllocator {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        let repr = TableRepr::deserialize(d)?;
        let mut table = BTreeMap::new();
        let mut ids = std::collections::BTreeSet::new();
        let mut next = repr.next.max(identity::FIRST_CLUSTER);
        for e in repr.identities {
            if !(identity::FIRST_CLUSTER..identity::SELECTOR_MARKER).contains(&e.id) {
                return Err(D::Error::custom(format!(
                    "identity {} is outside the cluster range",
                    e.id
                )));
            }
            if !ids.insert(e.id) {
                return Err(D::Error::custom(format!("identity {} given twice", e.id)));
            }
            let key = IdentityKey::new(&e.namespace, &e.service_account, &e.labels)
                .map_err(D::Error::custom)?;
            if table.insert(key, e.id).is_some() {
                return Err(D::Error::custom(format!(
                    "labels of identity {} given twice",
                    e.id
                )));
            }
            next = next.max(e.id + 1);
        }
        Ok(Self { table, next })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn allocation_is_deterministic_and_stable() {
        let mut a = IdentityAllocator::new();
        let fe = a
            .allocate("shop", "sa", &l(&[("app", "frontend")]))
            .unwrap();
        let be = a.allocate("shop", "sa", &l(&[("app", "backend")])).unwrap();
        let fe_other = a
            .allocate("other", "sa", &l(&[("app", "frontend")]))
            .unwrap();
        assert_eq!((fe, be, fe_other), (256, 257, 258));
        assert_eq!(
            a.allocate("shop", "sa", &l(&[("app", "frontend")]))
                .unwrap(),
            fe
        );

        // Another node given the same table computes the same ids.
        let json = serde_json::to_string(&a).unwrap();
        let mut b: IdentityAllocator = serde_json::from_str(&json).unwrap();
        assert_eq!(b, a);
        assert_eq!(
            b.allocate("shop", "sa", &l(&[("app", "backend")])).unwrap(),
            be
        );
        assert_eq!(b.allocate("shop", "sa", &l(&[("app", "db")])).unwrap(), 259);
        assert_eq!(a.allocate("shop", "sa", &l(&[("app", "db")])).unwrap(), 259);
    }

    #[test]
    fn released_ids_are_not_reused() {
        let mut a = IdentityAllocator::new();
        let x = a.allocate("shop", "sa", &l(&[("app", "x")])).unwrap();
        assert_eq!(a.release("shop", "sa", &l(&[("app", "x")])), Some(x));
        let y = a.allocate("shop", "sa", &l(&[("app", "y")])).unwrap();
        assert_ne!(x, y);
        // Even after a round trip through the persisted table.
        a.release("shop", "sa", &l(&[("app", "y")]));
        let mut b: IdentityAllocator =
            serde_json::from_str(&serde_json::to_string(&a).unwrap()).unwrap();
        assert!(b.allocate("shop", "sa", &l(&[("app", "z")])).unwrap() > y);
    }

    #[test]
    fn namespace_labels_come_from_the_namespace_not_the_pod_and_are_selected_as_cilium_writes_them()
    {
        let team = |v: &str| BTreeMap::from([("team".to_owned(), v.to_owned())]);
        // A pod claiming a namespace label for itself does not get it.
        let forged = IdentityKey::new(
            "shop",
            "sa",
            &l(&[("app", "x"), ("io.cilium.k8s.namespace.labels.team", "a")]),
        )
        .unwrap();
        assert_eq!(
            forged,
            IdentityKey::new("shop", "sa", &l(&[("app", "x")])).unwrap()
        );
        let a = forged.clone().with_namespace_labels(&team("a")).unwrap();
        assert_ne!(a, forged, "namespace labels are part of the key");
        let sel: super::super::selector::Selector =
            serde_yaml::from_str("matchLabels: {k8s:io.cilium.k8s.namespace.labels.team: a}")
                .unwrap();
        assert!(sel.matches(&a.identity_labels()));
        assert!(!sel.matches(&forged.identity_labels()));
        let b = forged.clone().with_namespace_labels(&team("b")).unwrap();
        assert!(!sel.matches(&b.identity_labels()));
        // Long namespace label keys fit: the prefix is not counted against the name's 63.
        let long = BTreeMap::from([(
            "app.kubernetes.io/part-of-a-rather-long-name".to_owned(),
            "x".to_owned(),
        )]);
        assert!(forged.clone().with_namespace_labels(&long).is_ok());
        let e = forged.with_namespace_labels(&team("-bad")).unwrap_err();
        assert!(e.to_string().contains("shop"), "{e}");
    }

    #[test]
    fn identity_labels_carry_the_namespace() {
        let mut a = IdentityAllocator::new();
        // A pod labelling itself with another namespace gets its own namespace's identity.
        let forged = a
            .allocate(
                "shop",
                "sa",
                &l(&[
                    ("app", "x"),
                    (NAMESPACE_LABEL, "kube-system"),
                    (SERVICE_ACCOUNT_LABEL, "admin"),
                ]),
            )
            .unwrap();
        let plain = a.allocate("shop", "sa", &l(&[("app", "x")])).unwrap();
        assert_eq!(forged, plain);
        let ids = a.identities();
        assert_eq!(ids.len(), 1);
        assert_eq!(ids[0].1.namespace(), Some("shop"));
        assert_eq!(
            ids[0].1.to_string(),
            "k8s:app=x,k8s:io.cilium.k8s.policy.serviceaccount=sa,k8s:io.kubernetes.pod.namespace=shop"
        );
    }

    #[test]
    fn pods_sharing_labels_but_not_a_service_account_get_apart_identities() {
        // One numeric identity must be one SPIFFE ID (ns + sa): otherwise revoking one pod's
        // SVID cannot remove its admissions while a look-alike pod keeps its own.
        let mut a = IdentityAllocator::new();
        let fe = a
            .allocate("shop", "frontend", &l(&[("app", "frontend")]))
            .unwrap();
        let look_alike = a
            .allocate("shop", "intruder", &l(&[("app", "frontend")]))
            .unwrap();
        assert_ne!(fe, look_alike);
        assert_eq!(
            a.allocate("shop", "frontend", &l(&[("app", "frontend")]))
                .unwrap(),
            fe
        );
        // A pod cannot take another service account's identity by labelling itself.
        let forged = a
            .allocate(
                "shop",
                "intruder",
                &l(&[("app", "frontend"), (SERVICE_ACCOUNT_LABEL, "frontend")]),
            )
            .unwrap();
        assert_eq!(forged, look_alike);
    }

    #[test]
    fn bad_input_is_refused() {
        let mut a = IdentityAllocator::new();
        // (namespace, labels, expected words in the error)
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
        let table: &[Case] = &[
            ("Shop", &[], "namespace"),
            ("", &[], "namespace"),
            ("shop", &[("k8s:app", "x")], "label key `k8s:app`"),
            ("shop", &[("app", "a b")], "bad label value"),
        ];
        assert!(a
            .allocate("shop", "", &BTreeMap::new())
            .unwrap_err()
            .to_string()
            .contains("service account"));
        assert!(a
            .allocate("shop", "a b", &BTreeMap::new())
            .unwrap_err()
            .to_string()
            .contains("service account"));
        for (ns, labels, want) in table {
            let e = a.allocate(ns, "sa", &l(labels)).unwrap_err();
            assert!(e.to_string().contains(want), "{ns} {labels:?}: {e}");
        }
        assert!(a.table().is_empty());
    }

    #[test]
    fn bad_persisted_tables_are_refused() {
        let table = [
            r#"{"next":256,"identities":[{"id":5,"namespace":"a","service_account":"sa","labels":{}}]}"#,
            r#"{"next":256,"identities":[{"id":300,"namespace":"a","service_account":"sa","labels":{}},{"id":300,"namespace":"b","service_account":"sa","labels":{}}]}"#,
            r#"{"next":256,"identities":[{"id":300,"namespace":"a","service_account":"sa","labels":{}},{"id":301,"namespace":"a","service_account":"sa","labels":{}}]}"#,
            r#"{"next":256,"identities":[],"extra":1}"#,
        ];
        for json in table {
            assert!(
                serde_json::from_str::<IdentityAllocator>(json).is_err(),
                "{json}"
            );
        }
        let a: IdentityAllocator = serde_json::from_str(
            r#"{"next":256,"identities":[{"id":900,"namespace":"a","service_account":"sa","labels":{}}]}"#,
        )
        .unwrap();
        let mut a = a;
        assert_eq!(a.allocate("b", "sa", &BTreeMap::new()).unwrap(), 901);
    }

    #[test]
    fn exhaustion_is_an_error() {
        let mut a = IdentityAllocator {
            table: BTreeMap::new(),
            next: identity::SELECTOR_MARKER - 1,
        };
        assert_eq!(
            a.allocate("a", "sa", &BTreeMap::new()).unwrap(),
            identity::SELECTOR_MARKER - 1
        );
        assert!(matches!(
            a.allocate("b", "sa", &BTreeMap::new()),
            Err(Error::IdentitiesExhausted)
        ));
    }
}
