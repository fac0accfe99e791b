//! SPIRE selectors (`type:value`, e.g. `k8s:ns:shop`) and selector sets, the key under which
//! the Delegated Identity API delivers a workload's SVIDs.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

/// Why a selector was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    #[error("selector {0:?} has no `type:value` separator")]
    MissingSeparator(String),
    #[error("selector {0:?} has an empty type")]
    EmptyType(String),
    #[error("selector {0:?} has an empty value")]
    EmptyValue(String),
    #[error("selector set is empty")]
    EmptySet,
}

/// One SPIRE selector. `kind` is the selector type (`k8s`), `value` the rest (`ns:shop`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Selector {
    kind: String,
    value: String,
}

impl Selector {
    pub fn new(kind: &str, value: &str) -> Result<Self, SelectorError> {
        let whole = || format!("{kind}:{value}");
        if kind.is_empty() || kind.contains(':') {
            return Err(SelectorError::EmptyType(whole()));
        }
        if value.is_empty() {
            return Err(SelectorError::EmptyValue(whole()));
        }
        Ok(Self {
            kind: kind.to_owned(),
            value: value.to_owned(),
        })
    }

    pub fn kind(&self) -> &str {
        &self.kind
    }

    pub fn value(&self) -> &str {
        &self.value
    }
}

impl FromStr for Selector {
    type Err = SelectorError;
    fn from_str(s: &str) -> Result<Self, SelectorError> {
        let (kind, value) = s
            .split_once(':')
            .ok_or_else(|| SelectorError::MissingSeparator(s.to_owned()))?;
        Self::new(kind, value)
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

/// A non-empty, ordered set of selectors.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SelectorSet(BTreeSet<Selector>);

impl SelectorSet {
    pub fn new(selectors: impl IntoIterator<Item = Selector>) -> Result<Self, SelectorError> {
        let set: BTreeSet<_> = selectors.into_iter().collect();
        if set.is_empty() {
            return Err(SelectorError::EmptySet);
        }
        Ok(Self(set))
    }

    /// The lab's pod selectors: `k8s:ns:<ns>`, `k8s:sa:<sa>`, `k8s:pod-name:<name>`.
    pub fn k8s_pod(
        namespace: &str,
        service_account: &str,
        pod_name: &str,
    ) -> Result<Self, SelectorError> {
        Self::new([
            Selector::new("k8s", &format!("ns:{namespace}"))?,
            Selector::new("k8s", &format!("sa:{service_account}"))?,
            Selector::new("k8s", &format!("pod-name:{pod_name}"))?,
        ])
    }

    pub fn iter(&self) -> impl Iterator<Item = &Selector> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Every selector of `self` is in `other` (SPIRE's registration-entry match rule).
    pub fn is_subset_of(&self, other: &SelectorSet) -> bool {
        self.0.is_subset(&other.0)
    }
}

impl fmt::Display for SelectorSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for s in &self.0 {
            if !first {
                f.write_str(",")?;
            }
            first = false;
            write!(f, "{s}")?;
        }
        Ok(())
    }
}

impl FromStr for SelectorSet {
    type Err = SelectorError;
    /// Comma-separated selectors.
    fn from_str(s: &str) -> Result<Self, SelectorError> {
        Self::new(
            s.split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(Selector::from_str)
                .collect::<Result<Vec<_>, _>>()?,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_displays() {
        let s: Selector = "k8s:ns:shop".parse().unwrap();
        assert_eq!((s.kind(), s.value()), ("k8s", "ns:shop"));
        assert_eq!(s.to_string(), "k8s:ns:shop");
        assert_eq!(
            "k8s".parse::<Selector>(),
            Err(SelectorError::MissingSeparator("k8s".into()))
        );
        assert_eq!(
            ":x".parse::<Selector>(),
            Err(SelectorError::EmptyType(":x".into()))
        );
        assert_eq!(
            "k8s:".parse::<Selector>(),
            Err(SelectorError::EmptyValue("k8s:".into()))
        );
        assert_eq!("".parse::<SelectorSet>(), Err(SelectorError::EmptySet));
    }

    #[test]
    fn k8s_pod_set_and_subset_matching() {
        let pod = SelectorSet::k8s_pod("shop", "frontend", "frontend").unwrap();
        assert_eq!(
            pod.to_string(),
            "k8s:ns:shop,k8s:pod-name:frontend,k8s:sa:frontend"
        );
        assert_eq!(pod.to_string().parse::<SelectorSet>().unwrap(), pod);
        let ns_only: SelectorSet = "k8s:ns:shop".parse().unwrap();
        assert!(ns_only.is_subset_of(&pod));
        assert!(!pod.is_subset_of(&ns_only));
        let other = SelectorSet::k8s_pod("shop", "frontend", "frontend-2").unwrap();
        assert!(!pod.is_subset_of(&other));
    }
}
