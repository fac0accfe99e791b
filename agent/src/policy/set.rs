//! The agent's set of applied policies, by `namespace/name`. Every change is validated in full
//! before anything changes, so a refused policy leaves the previous set in force.

use serde::Serialize;

use super::{compile, CompiledPolicy, Error, IdentityLabels, Policy, PolicyName};

/// What [`PolicySet::apply`] did, in kubectl's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Created,
    Configured,
    Unchanged,
}

/// Policies sorted by name, each name once. Serializes (as a JSON array of policies) for the
/// agent to persist; [`PolicySet::from_json`] validates it all again.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct PolicySet {
    policies: Vec<Policy>,
}

impl PolicySet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Validates `policy` for apply, then creates or replaces the policy of the same name.
    pub fn apply(&mut self, policy: Policy) -> Result<Applied, Error> {
        Ok(self.apply_all(vec![policy])?[0].1)
    }

    /// Applies several policies (one file) all or nothing.
    pub fn apply_all(
        &mut self,
        policies: Vec<Policy>,
    ) -> Result<Vec<(PolicyName, Applied)>, Error> {
        let mut checked = Vec::with_capacity(policies.len());
        for mut p in policies {
            let name = p.name();
            p.validate()
                .and_then(|()| p.validate_for_apply())
                .map_err(|e| Error::InPolicy {
                    name: name.clone(),
                    source: Box::new(e),
                })?;
            // Validation fills in the default namespace, which is part of the name.
            let name = p.name();
            if checked
                .iter()
                .any(|(n, _): &(PolicyName, Policy)| *n == name)
            {
                return Err(Error::DuplicatePolicy(name));
            }
            checked.push((name, p));
        }
        let mut next = self.policies.clone();
        let mut results = Vec::with_capacity(checked.len());
        for (name, p) in checked {
            let applied = match next.binary_search_by(|q| q.name().cmp(&name)) {
                Ok(i) if next[i] == p => Applied::Unchanged,
                Ok(i) => {
                    next[i] = p;
                    Applied::Configured
                }
                Err(i) => {
                    next.insert(i, p);
                    Applied::Created
                }
            };
            results.push((name, applied));
        }
        self.policies = next;
        Ok(results)
    }

    /// Removes a policy (`namespace` empty for clusterwide ones).
    pub fn delete(&mut self, namespace: &str, name: &str) -> Result<Policy, Error> {
        let key = PolicyName::new(namespace, name);
        match self.policies.binary_search_by(|q| q.name().cmp(&key)) {
            Ok(i) => Ok(self.policies.remove(i)),
            Err(_) => Err(Error::NotFound(key)),
        }
    }

    pub fn get(&self, namespace: &str, name: &str) -> Option<&Policy> {
        let key = PolicyName::new(namespace, name);
        self.policies
            .binary_search_by(|q| q.name().cmp(&key))
            .ok()
            .map(|i| &self.policies[i])
    }

    /// Every policy, by name.
    pub fn list(&self) -> &[Policy] {
        &self.policies
    }

    pub fn len(&self) -> usize {
        self.policies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    pub fn compile(
        &self,
        identities: &[(u32, IdentityLabels)],
        local_identities: &[u32],
    ) -> Result<CompiledPolicy, Error> {
        compile(&self.policies, identities, local_identities)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("policies serialize")
    }

    /// Reads a persisted set, refusing it whole if any policy would be refused by `apply`.
    pub fn from_json(text: &str) -> Result<Self, Error> {
        let mut de = serde_json::Deserializer::from_str(text);
        let policies: Vec<Policy> = match serde_path_to_error::deserialize(&mut de) {
            Ok(p) => p,
            Err(e) if e.inner().is_data() => {
                return Err(Error::Invalid {
                    path: e.path().to_string(),
                    reason: e.inner().to_string(),
                })
            }
            Err(e) => return Err(Error::Json(e.into_inner())),
        };
        de.end().map_err(Error::Json)?;
        let mut set = Self::new();
        set.apply_all(policies)?;
        Ok(set)
    }
}
