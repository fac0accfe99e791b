//! policy: CiliumNetworkPolicy parsing, security identities, and compilation to the datapath's
//! policy map. Sans-IO: text and tables in, map contents out.
//!
//! - [`parse`]: the `cilium.io/v2` model; strict YAML/JSON parsing with field-path errors.
//! - [`selector`]: label keys and selectors, Cilium's namespace scoping.
//! - [`identity`]: numeric security identities per (namespace, labels), cluster-consistent.
//! - [`compile`]: policies + identities → `PolicyKey → PolicyEntry` for this node's endpoints.
//! - [`reference`]: a naive evaluator straight from the policy text, and an emulation of the
//!   datapath lookup; the property tests hold the two against each other.
//! - [`set`]: the agent's named, atomically updated set of applied policies.
//!
//! Semantics (Cilium's, plus veil's audit mode):
//! - An endpoint is enforced in a direction once any policy selecting it has rules (allow or
//!   deny) in that direction; then only what some rule allows passes, and deny rules win over
//!   allow rules across all policies.
//! - A namespaced policy's `endpointSelector` selects only in the policy's namespace; its
//!   `fromEndpoints`/`toEndpoints` too, unless the selector names the namespace label itself.
//!   A clusterwide policy's selectors span all namespaces. Endpoint selectors select cluster
//!   identities only, never reserved ones (host, world, unknown, remote node); a rule with
//!   `toPorts` but no endpoint selectors applies to every peer, reserved ones included; an
//!   empty rule `{}` matches nothing (Cilium's deny-all idiom, unlike Kubernetes'
//!   NetworkPolicy).
//! - A policy annotated `policy.veil.io/mode: audit` never drops: if only audit-mode policies
//!   select an endpoint in a direction, everything passes and would-be drops are reported as
//!   AUDIT; if enforce-mode policies select it too, the verdict is theirs alone (the map cannot
//!   report per-policy audit verdicts). AUTH_REQUIRED is compiled in audit mode too, so under
//!   an AUDIT marker the datapath must also pass, as AUDIT, a flow whose auth is missing.
//! - Ports: a port with protocol ANY means TCP, UDP and SCTP; `port`..`endPort` is a range
//!   (1–65535 meaning any port, port 0 included); ICMP takes no port.

pub mod compile;
pub mod identity;
pub mod parse;
pub mod reference;
pub mod selector;
pub mod set;

use std::fmt;

use serde::{Deserialize, Serialize};

pub use compile::{compile, CompiledPolicy, PolicyStats, RuleRef};
pub use identity::{IdentityAllocator, IdentityKey, IdentityLabels};
pub use parse::{parse_yaml, Direction, Policy};
pub use reference::{datapath_lookup, evaluate, Probe};
pub use set::{Applied, PolicySet};

/// Errors parsing, validating, applying and compiling policies and allocating identities.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("policy document {document} is not valid yaml")]
    Yaml {
        document: usize,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("policy is not valid json")]
    Json(#[source] serde_json::Error),
    /// A field is unknown, missing, or has a bad value. `path` is the field's path in the
    /// document, e.g. `spec.ingress[0].toPorts[0].ports[0].port`.
    #[error("{path}: {reason}")]
    Invalid { path: String, reason: String },
    #[error("no policy in the input")]
    Empty,
    #[error("expected one policy, found {0}")]
    NotOnePolicy(usize),
    #[error("policy {name}")]
    InPolicy {
        name: PolicyName,
        #[source]
        source: Box<Error>,
    },
    #[error("policy {0} is given twice")]
    DuplicatePolicy(PolicyName),
    #[error("policy {0} not found")]
    NotFound(PolicyName),
    #[error("bad identity in namespace `{namespace}`: {reason}")]
    BadIdentity { namespace: String, reason: String },
    #[error("identity {0} is given twice")]
    DuplicateIdentity(u32),
    #[error("identity {0} is not in the cluster identity range")]
    ReservedIdentity(u32),
    #[error("local identity {0} is not in the identity table")]
    UnknownLocalIdentity(u32),
    #[error("no free identity left")]
    IdentitiesExhausted,
    #[error("compiled policy needs {entries} map entries, the map holds {max}")]
    TooManyEntries { entries: usize, max: u32 },
}

/// `namespace/name` of a policy; the namespace is empty for clusterwide policies.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PolicyName {
    pub namespace: String,
    pub name: String,
}

impl PolicyName {
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }
}

impl fmt::Display for PolicyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            f.write_str(&self.name)
        } else {
            write!(f, "{}/{}", self.namespace, self.name)
        }
    }
}

/// Per-policy mode, from the `policy.veil.io/mode` annotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Enforce,
    Audit,
}

/// The policy verdict for one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allowed {
        is_auth_required: bool,
    },
    Denied,
    /// Would be denied; passed because only audit-mode policies select the endpoint.
    Audit,
}
