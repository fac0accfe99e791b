//! Label keys, values and Kubernetes label selectors (`matchLabels` / `matchExpressions`).
//!
//! Keys are stored canonical: the Cilium source prefixes `k8s:` and `any:` are stripped, so
//! `k8s:app` and `app` are the same key (every label veil knows comes from Kubernetes).

use std::{collections::BTreeMap, fmt};

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

use super::identity::IdentityLabels;

/// The label every identity carries with the pod's namespace.
pub const NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";

/// The label every identity carries with the pod's service account (Cilium's key, so policies
/// written for Cilium select service accounts the same way). The service account is part of
/// the identity because it is part of the SPIFFE ID: one numeric identity is one SPIFFE ID.
pub const SERVICE_ACCOUNT_LABEL: &str = "io.cilium.k8s.policy.serviceaccount";

/// The prefix under which an identity carries its namespace's labels (Cilium's key, so
/// `k8s:io.cilium.k8s.namespace.labels.team: a` selects pods of namespaces labelled `team=a`).
pub const NAMESPACE_LABELS_PREFIX: &str = "io.cilium.k8s.namespace.labels.";

/// A canonical label key (no source prefix), validated as a Kubernetes qualified name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LabelKey(String);

impl LabelKey {
    /// Parses a key as written in a policy: `app`, `k8s:app`, `any:app`, `example.com/tier`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let key = match text.split_once(':') {
            None => text,
            Some(("k8s" | "any", rest)) => rest,
            Some((source, _)) => {
                return Err(format!(
                    "label source `{source}:` in `{text}` is not supported (only `k8s:` and `any:`)"
                ))
            }
        };
        check_qualified_name(key).map_err(|why| format!("bad label key `{text}`: {why}"))?;
        Ok(Self(key.to_owned()))
    }

    pub fn namespace() -> Self {
        Self(NAMESPACE_LABEL.to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_namespace(&self) -> bool {
        self.0 == NAMESPACE_LABEL
    }
}

impl fmt::Display for LabelKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for LabelKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for LabelKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Self::parse(&text).map_err(de::Error::custom)
    }
}

/// A label value: empty, or up to 63 characters of `[A-Za-z0-9_.-]` starting and ending
/// alphanumeric.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LabelValue(String);

impl LabelValue {
    pub fn parse(text: &str) -> Result<Self, String> {
        check_label_value(text).map_err(|why| format!("bad label value `{text}`: {why}"))?;
        Ok(Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for LabelValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for LabelValue {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for LabelValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Self::parse(&text).map_err(de::Error::custom)
    }
}

/// Checks a Kubernetes qualified name: `[prefix/]name`, prefix a DNS subdomain, name up to 63
/// characters.
pub fn check_qualified_name(key: &str) -> Result<(), &'static str> {
    // A namespace label carried by an identity: the namespace's own key after Cilium's prefix.
    let key = match key.strip_prefix(NAMESPACE_LABELS_PREFIX) {
        Some("") => return Err("namespace label key must not be empty"),
        Some(rest) => rest,
        None => key,
    };
    let name = match key.rsplit_once('/') {
        Some((prefix, name)) => {
            check_dns_subdomain(prefix).map_err(|_| "prefix must be a DNS subdomain")?;
            name
        }
        None => key,
    };
    if name.is_empty() {
        return Err("name must not be empty");
    }
    check_label_value(name)
}

fn check_label_value(v: &str) -> Result<(), &'static str> {
    if v.len() > 63 {
        return Err("longer than 63 characters");
    }
    let b = v.as_bytes();
    if b.is_empty() {
        return Ok(());
    }
    if !b[0].is_ascii_alphanumeric() || !b[b.len() - 1].is_ascii_alphanumeric() {
        return Err("must start and end with a letter or digit");
    }
    if !b
        .iter()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
    {
        return Err("only letters, digits, `-`, `_` and `.` are allowed");
    }
    Ok(())
}

/// Checks a DNS subdomain (RFC 1123): lowercase, up to 253 characters of dot-separated labels.
pub fn check_dns_subdomain(s: &str) -> Result<(), &'static str> {
    if s.is_empty() {
        return Err("must not be empty");
    }
    if s.len() > 253 {
        return Err("longer than 253 characters");
    }
    s.split('.').try_for_each(check_dns_label)
}

/// Checks a DNS label (RFC 1123): lowercase letters, digits and `-`, up to 63 characters.
pub fn check_dns_label(s: &str) -> Result<(), &'static str> {
    let b = s.as_bytes();
    if b.is_empty() {
        return Err("must not be empty");
    }
    if b.len() > 63 {
        return Err("longer than 63 characters");
    }
    let ok = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    if !ok(&b[0]) || !ok(&b[b.len() - 1]) {
        return Err("must start and end with a lowercase letter or digit");
    }
    if !b.iter().all(|c| ok(c) || *c == b'-') {
        return Err("only lowercase letters, digits and `-` are allowed");
    }
    Ok(())
}

/// `matchLabels`: a map whose keys are canonical, so `k8s:app` and `app` given together is an
/// error rather than one silently overriding the other.
///
/// Kept as a vector sorted by key: a selector names a label or two, and a `BTreeMap` allocates
/// a 544-byte node for its first entry (20,000 selectors of 10,000 rules held 11 MB of them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MatchLabels(Vec<(LabelKey, LabelValue)>);

impl MatchLabels {
    /// In key order.
    pub fn iter(&self) -> impl Iterator<Item = (&LabelKey, &LabelValue)> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    pub fn keys(&self) -> impl Iterator<Item = &LabelKey> {
        self.0.iter().map(|(k, _)| k)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn position(&self, k: &LabelKey) -> Option<usize> {
        self.0.binary_search_by(|(x, _)| x.cmp(k)).ok()
    }

    pub fn get(&self, k: &LabelKey) -> Option<&LabelValue> {
        self.position(k).map(|i| &self.0[i].1)
    }

    pub fn get_mut(&mut self, k: &LabelKey) -> Option<&mut LabelValue> {
        self.position(k).map(|i| &mut self.0[i].1)
    }

    pub fn contains_key(&self, k: &LabelKey) -> bool {
        self.position(k).is_some()
    }
}

impl From<BTreeMap<LabelKey, LabelValue>> for MatchLabels {
    fn from(m: BTreeMap<LabelKey, LabelValue>) -> Self {
        // Exact size (a BTreeMap's iterator knows its length): no spare capacity kept.
        Self(m.into_iter().collect())
    }
}

impl Serialize for MatchLabels {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for MatchLabels {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = MatchLabels;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of label keys to values")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<MatchLabels, A::Error> {
                let mut out = BTreeMap::new();
                while let Some((k, v)) = map.next_entry::<LabelKey, LabelValue>()? {
                    if out.contains_key(&k) {
                        return Err(de::Error::custom(format!(
                            "label key `{k}` given twice (with and without a source prefix)"
                        )));
                    }
                    out.insert(k, v);
                }
                Ok(out.into())
            }
        }
        d.deserialize_map(V)
    }
}

/// Operators of `matchExpressions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

/// One `matchExpressions` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Requirement {
    pub key: LabelKey,
    pub operator: Operator,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<LabelValue>,
}

impl Requirement {
    /// Kubernetes semantics: `NotIn` matches when the key is absent.
    pub fn matches(&self, labels: &IdentityLabels) -> bool {
        let value = labels.get(self.key.as_str());
        let in_values = || value.is_some_and(|v| self.values.iter().any(|x| x.as_str() == v));
        match self.operator {
            Operator::In => in_values(),
            Operator::NotIn => !in_values(),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
        }
    }
}

/// A Kubernetes label selector. The empty selector `{}` matches everything (before namespace
/// scoping, which [`Selector::scoped`] adds).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Selector {
    #[serde(default, skip_serializing_if = "is_empty_labels")]
    pub match_labels: MatchLabels,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<Requirement>,
}

fn is_empty_labels(m: &MatchLabels) -> bool {
    m.is_empty()
}

/// How a selector is limited to namespaces (Cilium's rules, see [`Selector::scoped`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope<'a> {
    /// Exactly this namespace, whatever the selector says (a namespaced policy's subject).
    Forced(&'a str),
    /// This namespace unless the selector constrains the namespace label itself (a namespaced
    /// policy's peers).
    Default(&'a str),
    /// Any namespace: the selector matches pods of every namespace (clusterwide policies).
    Cluster,
}

impl Selector {
    /// Does the selector itself say something about the namespace label?
    pub fn constrains_namespace(&self) -> bool {
        self.match_labels.keys().any(LabelKey::is_namespace)
            || self.match_expressions.iter().any(|r| r.key.is_namespace())
    }

    /// Plain selector matching, no namespace scoping.
    pub fn matches(&self, labels: &IdentityLabels) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k.as_str()) == Some(v.as_str()))
            && self.match_expressions.iter().all(|r| r.matches(labels))
    }

    /// The selector with its namespace scope made explicit.
    pub fn scoped(&self, scope: Scope<'_>) -> Selector {
        let mut s = self.clone();
        let ns = match scope {
            Scope::Forced(ns) => Some(ns),
            Scope::Default(ns) if !self.constrains_namespace() => Some(ns),
            Scope::Default(_) | Scope::Cluster => None,
        };
        if let Some(ns) = ns {
            s.match_expressions.push(Requirement {
                key: LabelKey::namespace(),
                operator: Operator::In,
                values: vec![LabelValue(ns.to_owned())],
            });
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> IdentityLabels {
        let ns = pairs
            .iter()
            .find(|(k, _)| *k == NAMESPACE_LABEL)
            .map_or("default", |(_, v)| v);
        IdentityLabels::new(
            ns,
            pairs
                .iter()
                .filter(|(k, _)| *k != NAMESPACE_LABEL)
                .map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    fn sel(yaml: &str) -> Selector {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn label_keys() {
        let table: &[(&str, Result<&str, &str>)] = &[
            ("app", Ok("app")),
            ("k8s:app", Ok("app")),
            ("any:app", Ok("app")),
            ("k8s:io.kubernetes.pod.namespace", Ok(NAMESPACE_LABEL)),
            ("example.com/tier", Ok("example.com/tier")),
            ("a_b.c-d", Ok("a_b.c-d")),
            ("", Err("name must not be empty")),
            ("k8s:", Err("name must not be empty")),
            ("reserved:host", Err("label source `reserved:`")),
            ("-app", Err("start and end")),
            ("a!b", Err("only letters")),
            ("Example.com/app", Err("prefix must be a DNS subdomain")),
            ("/app", Err("prefix must be a DNS subdomain")),
            (&"a".repeat(64), Err("longer than 63")),
        ];
        for (input, want) in table {
            let got = LabelKey::parse(input);
            match (want, &got) {
                (Ok(w), Ok(k)) => assert_eq!(k.as_str(), *w, "{input}"),
                (Err(w), Err(e)) => assert!(e.contains(w), "{input}: {e}"),
                _ => panic!("{input}: got {got:?}, want {want:?}"),
            }
        }
        assert!(LabelValue::parse("").is_ok());
        assert!(LabelValue::parse("v1.2_x-y").is_ok());
        assert!(LabelValue::parse("a b").is_err());
        assert!(LabelValue::parse(&"a".repeat(64)).is_err());
    }

    #[test]
    fn prefixed_and_plain_key_together_is_an_error() {
        let e = serde_yaml::from_str::<Selector>("matchLabels: {k8s:app: a, app: b}").unwrap_err();
        assert!(e.to_string().contains("given twice"), "{e}");
    }

    #[test]
    fn matching() {
        let fe = labels(&[("app", "frontend"), (NAMESPACE_LABEL, "shop")]);
        let be = labels(&[("app", "backend"), ("tier", "1"), (NAMESPACE_LABEL, "shop")]);
        let other = labels(&[("app", "frontend"), (NAMESPACE_LABEL, "other")]);
        // (selector, frontend, backend, frontend in `other`)
        let table: &[(&str, [bool; 3])] = &[
            ("{}", [true, true, true]),
            ("matchLabels: {app: frontend}", [true, false, true]),
            ("matchLabels: {k8s:app: frontend}", [true, false, true]),
            (
                "matchLabels: {app: frontend, tier: '1'}",
                [false, false, false],
            ),
            (
                "matchExpressions: [{key: app, operator: In, values: [frontend, backend]}]",
                [true, true, true],
            ),
            (
                "matchExpressions: [{key: app, operator: NotIn, values: [frontend]}]",
                [false, true, false],
            ),
            (
                "matchExpressions: [{key: tier, operator: NotIn, values: ['2']}]",
                [true, true, true],
            ),
            (
                "matchExpressions: [{key: tier, operator: Exists}]",
                [false, true, false],
            ),
            (
                "matchExpressions: [{key: tier, operator: DoesNotExist}]",
                [true, false, true],
            ),
            (
                "matchLabels: {k8s:io.kubernetes.pod.namespace: other}",
                [false, false, true],
            ),
            (
                "{matchLabels: {app: frontend}, matchExpressions: [{key: tier, operator: Exists}]}",
                [false, false, false],
            ),
        ];
        for (yaml, want) in table {
            let s = sel(yaml);
            let got = [s.matches(&fe), s.matches(&be), s.matches(&other)];
            assert_eq!(&got, want, "{yaml}");
        }
    }

    #[test]
    fn scoping() {
        let shop = labels(&[("app", "frontend"), (NAMESPACE_LABEL, "shop")]);
        let other = labels(&[("app", "frontend"), (NAMESPACE_LABEL, "other")]);
        // (selector, scope, matches shop, matches other)
        let table: &[(&str, Scope, [bool; 2])] = &[
            ("{}", Scope::Default("shop"), [true, false]),
            ("{}", Scope::Forced("shop"), [true, false]),
            ("{}", Scope::Cluster, [true, true]),
            (
                "matchLabels: {io.kubernetes.pod.namespace: other}",
                Scope::Default("shop"),
                [false, true],
            ),
            (
                "matchExpressions: [{key: any:io.kubernetes.pod.namespace, operator: Exists}]",
                Scope::Default("shop"),
                [true, true],
            ),
            (
                "matchExpressions: [{key: k8s:io.kubernetes.pod.namespace, operator: Exists}]",
                Scope::Forced("shop"),
                [true, false],
            ),
        ];
        for (yaml, scope, want) in table {
            let s = sel(yaml).scoped(*scope);
            assert_eq!(
                [s.matches(&shop), s.matches(&other)],
                *want,
                "{yaml} {scope:?}"
            );
        }
    }
}
