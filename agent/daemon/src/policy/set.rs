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

    /// Applies several policies (one file) all or nothing. Results are in the order given.
    /// O(n log n) in the policies given and linear in the set's size: a 10,000-policy store is
    /// read back whole on every change (the file source).
    pub fn apply_all(
        &mut self,
        policies: Vec<Policy>,
    ) -> Result<Vec<(PolicyName, Applied)>, Error> {
        let mut checked = Vec::with_capacity(policies.len());
        let mut seen = std::collections::HashSet::with_capacity(policies.len());
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
            if !seen.insert(name.clone()) {
                return Err(Error::DuplicatePolicy(name));
            }
            checked.push((name, Some(p)));
        }
        drop(seen);
        // Merge the given policies, sorted by name, into the sorted set: one pass, no insert
        // into the middle of a vector per policy.
        let mut order: Vec<usize> = (0..checked.len()).collect();
        order.sort_unstable_by(|&a, &b| checked[a].0.cmp(&checked[b].0));
        let mut applied = vec![Applied::Unchanged; checked.len()];
        let mut next = Vec::with_capacity(self.policies.len() + checked.len());
        let mut old = self.policies.iter().peekable();
        for i in order {
            let (name, p) = &mut checked[i];
            let p = p.take().expect("each given policy is merged once");
            while let Some(q) = old.next_if(|q| q.name() < *name) {
                next.push(q.clone());
            }
            applied[i] = match old.next_if(|q| q.name() == *name) {
                Some(q) if *q == p => Applied::Unchanged,
                Some(_) => Applied::Configured,
                None => Applied::Created,
            };
            next.push(p);
        }
        next.extend(old.cloned());
        self.policies = next;
        Ok(checked
            .into_iter()
            .zip(applied)
            .map(|((name, _), a)| (name, a))
            .collect())
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

    /// Every policy, by name, each to be shared.
    pub fn into_shared(self) -> Vec<std::sync::Arc<Policy>> {
        self.policies.into_iter().map(std::sync::Arc::new).collect()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::parse::tests::{BACKEND_INGRESS, ISSUE_EGRESS_L7};

    fn one(yaml: &str) -> Policy {
        Policy::from_yaml(yaml).unwrap()
    }

    #[test]
    fn apply_update_delete_list() {
        let mut set = PolicySet::new();
        assert_eq!(set.apply(one(BACKEND_INGRESS)).unwrap(), Applied::Created);
        assert_eq!(set.apply(one(BACKEND_INGRESS)).unwrap(), Applied::Unchanged);
        let changed = BACKEND_INGRESS.replace("\"8080\"", "\"8081\"");
        assert_eq!(set.apply(one(&changed)).unwrap(), Applied::Configured);
        let cw = one("apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: cw}\nspec: {endpointSelector: {}, egress: [{}]}");
        let dflt = one("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec: {endpointSelector: {}}");
        assert_eq!(
            set.apply_all(vec![cw, dflt]).unwrap(),
            [
                (PolicyName::new("", "cw"), Applied::Created),
                (PolicyName::new("default", "p"), Applied::Created)
            ]
        );
        let names: Vec<_> = set.list().iter().map(|p| p.name().to_string()).collect();
        assert_eq!(names, ["cw", "default/p", "shop/backend-ingress"]);
        assert_eq!(set.get("shop", "backend-ingress"), Some(&one(&changed)));

        assert_eq!(set.delete("", "cw").unwrap().name().to_string(), "cw");
        assert!(matches!(set.delete("", "cw"), Err(Error::NotFound(_))));
        assert!(matches!(
            set.delete("default", "backend-ingress"),
            Err(Error::NotFound(_))
        ));
        assert_eq!(set.len(), 2);
    }

    /// A batch out of name order, landing before, between and after the set's policies, with
    /// one unchanged and one changed: the set stays sorted and each result is the batch's own,
    /// in the batch's order.
    #[test]
    fn a_batch_merges_into_the_sorted_set_and_reports_in_its_own_order() {
        let named = |name: &str, port: &str| {
            one(&BACKEND_INGRESS
                .replace("backend-ingress", name)
                .replace("\"8080\"", &format!("\"{port}\"")))
        };
        let mut set = PolicySet::new();
        set.apply_all(vec![named("b", "80"), named("d", "80"), named("f", "80")])
            .unwrap();
        let got = set
            .apply_all(vec![
                named("g", "80"),
                named("d", "81"),
                named("a", "80"),
                named("b", "80"),
                named("c", "80"),
            ])
            .unwrap();
        let want = [
            ("g", Applied::Created),
            ("d", Applied::Configured),
            ("a", Applied::Created),
            ("b", Applied::Unchanged),
            ("c", Applied::Created),
        ];
        let want: Vec<_> = want
            .iter()
            .map(|(n, a)| (PolicyName::new("shop", n), *a))
            .collect();
        assert_eq!(got, want);
        let names: Vec<_> = set.list().iter().map(|p| p.name().name).collect();
        assert_eq!(names, ["a", "b", "c", "d", "f", "g"]);
        assert_eq!(set.get("shop", "d"), Some(&named("d", "81")));
        assert_eq!(set.get("shop", "f"), Some(&named("f", "80")));
    }

    #[test]
    fn refused_changes_leave_the_set_untouched() {
        let mut set = PolicySet::new();
        set.apply(one(BACKEND_INGRESS)).unwrap();
        let before = set.clone();

        // A bad L7 rule: refused, naming the part.
        let bad_l7 = ISSUE_EGRESS_L7.replace("/api/products", "/api/[");
        let e = set.apply(one(&bad_l7)).unwrap_err();
        assert!(
            crate::error_chain(&e).starts_with(
                "policy shop/frontend-to-backend-l7: spec.egress[0].toPorts[0].rules.http[0].path: not a valid regular expression"
            ),
            "{}",
            crate::error_chain(&e)
        );
        assert_eq!(set, before);

        // An update to an applied policy that adds a bad L7 rule keeps the old version in force.
        let l7_update = bad_l7.replace("frontend-to-backend-l7", "backend-ingress");
        assert!(set.apply(one(&l7_update)).is_err());
        assert_eq!(set, before);

        // A batch with one bad policy applies nothing.
        let good = BACKEND_INGRESS.replace("backend-ingress", "another");
        assert!(set.apply_all(vec![one(&good), one(&bad_l7)]).is_err());
        assert_eq!(set, before);

        // The same name twice in a batch.
        let e = set.apply_all(vec![one(&good), one(&good)]).unwrap_err();
        assert!(matches!(e, Error::DuplicatePolicy(_)), "{e}");
        assert_eq!(set, before);

        // A policy built in code is validated too.
        let mut bad = one(BACKEND_INGRESS);
        bad.metadata.name = "Not A Name".into();
        assert!(set.apply(bad).is_err());
        assert_eq!(set, before);
    }

    #[test]
    fn persisted_set_reads_back_and_is_revalidated() {
        let mut set = PolicySet::new();
        set.apply(one(BACKEND_INGRESS)).unwrap();
        set.apply(one(&ISSUE_EGRESS_L7.replace(
            "      rules:\n        http:\n        - method: \"GET\"\n          path: \"/api/products\"\n",
            "",
        )))
        .unwrap();
        let json = set.to_json();
        assert_eq!(PolicySet::from_json(&json).unwrap(), set);

        // A persisted file someone edited into something `apply` would refuse is refused whole.
        let tampered = json.replacen("\"8080\"", "\"0\"", 1);
        let e = PolicySet::from_json(&tampered).unwrap_err();
        assert!(
            matches!(&e, Error::Invalid { path, .. } if path.starts_with("[0].spec.")),
            "{e}"
        );
        assert!(matches!(PolicySet::from_json("[{"), Err(Error::Json(_))));
        assert_eq!(PolicySet::from_json("[]").unwrap(), PolicySet::new());
    }
}
