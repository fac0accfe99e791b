//! The dev server's state machine, sans-IO: registrations, issued SVIDs with their rotation
//! times, forced rotation, revocation and CA rotation. The gRPC shell (`server.rs`) calls it
//! under a lock and publishes its per-node views; time is always a parameter.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rand::Rng;
use veil_certs_dev::{node_id, workload_id, CaOptions, DevCa, LeafSpec};
use veil_identity::{CertificateDer, SelectorSet, SpiffeId, Svid, TrustDomain};

use crate::Error;

/// Default SVID lifetime, as SPIRE's default `default_x509_svid_ttl`.
pub const DEFAULT_SVID_TTL: Duration = Duration::from_secs(3600);
/// Shortest TTL accepted: certificates carry whole seconds, rotation needs room at TTL/2.
pub const MIN_SVID_TTL: Duration = Duration::from_secs(2);

/// One node of the dev server: a name (its SPIFFE ID is `spiffe://<td>/veil/node/<name>`) and
/// the unix socket its "SPIRE agent" serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevNodeConfig {
    pub name: String,
    pub socket: PathBuf,
}

/// Configuration of the dev server. Build with [`DevServerConfig::new`], adjust fields, and
/// [`DevServerConfig::validate`] (also done by `DevServer::start`).
#[derive(Clone, Debug)]
pub struct DevServerConfig {
    pub trust_domain: TrustDomain,
    /// Lifetime of every SVID issued (default 1 h).
    pub svid_ttl: Duration,
    /// SVIDs are re-issued at `svid_ttl / 2 ± rotation_jitter` (uniform). Default `svid_ttl / 10`.
    pub rotation_jitter: Option<Duration>,
    /// Issue from an intermediate under the root.
    pub with_intermediate: bool,
    pub nodes: Vec<DevNodeConfig>,
}

impl DevServerConfig {
    pub fn new(trust_domain: TrustDomain) -> Self {
        Self {
            trust_domain,
            svid_ttl: DEFAULT_SVID_TTL,
            rotation_jitter: None,
            with_intermediate: false,
            nodes: Vec::new(),
        }
    }

    /// The jitter in force.
    pub fn jitter(&self) -> Duration {
        self.rotation_jitter.unwrap_or(self.svid_ttl / 10)
    }

    pub fn validate(&self) -> Result<(), Error> {
        if self.svid_ttl < MIN_SVID_TTL {
            return Err(Error::Config(format!(
                "svid_ttl {:?} is shorter than the minimum {:?}",
                self.svid_ttl, MIN_SVID_TTL
            )));
        }
        if self.jitter() >= self.svid_ttl / 2 {
            return Err(Error::Config(format!(
                "rotation_jitter {:?} must be shorter than half of svid_ttl {:?}",
                self.jitter(),
                self.svid_ttl
            )));
        }
        let mut names = std::collections::BTreeSet::new();
        let mut sockets = std::collections::BTreeSet::new();
        for n in &self.nodes {
            node_id(&self.trust_domain, &n.name)
                .map_err(|e| Error::Config(format!("node name {:?}: {e}", n.name)))?;
            if !names.insert(&n.name) {
                return Err(Error::Config(format!("node {:?} is listed twice", n.name)));
            }
            if !sockets.insert(&n.socket) {
                return Err(Error::Config(format!(
                    "socket {} is used by two nodes",
                    n.socket.display()
                )));
            }
        }
        Ok(())
    }
}

/// A pod the dev server issues an SVID for: `spiffe://<td>/ns/<namespace>/sa/<service_account>`
/// to callers presenting selectors `k8s:ns:<namespace>`, `k8s:sa:<service_account>`,
/// `k8s:pod-name:<name>` on `node`'s socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRegistration {
    pub node: String,
    pub namespace: String,
    pub name: String,
    pub service_account: String,
}

/// What a forced rotation re-issues.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RotateTarget {
    /// One pod's SVID.
    Pod { namespace: String, name: String },
    /// A node's own SVID and those of all pods on it.
    Node(String),
    /// Everything.
    All,
}

/// Where a CA rotation stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaPhase {
    /// One CA, issuing; the bundle holds its root.
    Stable,
    /// A new CA exists and is in the bundle; the old one still issues.
    Prepared,
    /// The new CA issues; the old root stays in the bundle until revoked.
    Activated,
}

/// An SVID the server holds, with its schedule.
#[derive(Clone, Debug)]
pub struct IssuedSvid {
    pub svid: Arc<Svid>,
    pub issued_at: SystemTime,
    pub rotate_at: SystemTime,
}

#[derive(Debug)]
struct PodState {
    reg: PodRegistration,
    selectors: SelectorSet,
    id: SpiffeId,
    issued: IssuedSvid,
}

#[derive(Debug)]
struct NodeState {
    issued: IssuedSvid,
}

/// What one node's socket serves.
#[derive(Clone, Debug)]
pub(crate) struct NodeView {
    pub trust_domain: TrustDomain,
    pub node_svid: Arc<Svid>,
    /// Registered pods of this node: their selectors and current SVID.
    pub pods: Vec<(SelectorSet, Arc<Svid>)>,
    pub bundle: Arc<Vec<CertificateDer<'static>>>,
    /// Roots of the trust domains this server federates with, served beside its own bundle.
    pub federated: Arc<BTreeMap<TrustDomain, Vec<CertificateDer<'static>>>>,
}

/// Status line of one held SVID (for tests and `veil lab` status).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevSvidStatus {
    pub node: String,
    /// `namespace/name` of the pod, `None` for the node SVID.
    pub pod: Option<String>,
    pub spiffe_id: SpiffeId,
    pub serial: String,
    pub not_after: SystemTime,
    pub rotate_at: SystemTime,
}

pub(crate) struct Core {
    td: TrustDomain,
    ttl: Duration,
    jitter: Duration,
    /// The issuing CA.
    active: DevCa,
    /// Prepared, not yet issuing (phase `Prepared`).
    next: Option<DevCa>,
    /// Former issuer whose root is still trusted (phase `Activated`).
    retired: Option<DevCa>,
    nodes: BTreeMap<String, NodeState>,
    pods: BTreeMap<(String, String), PodState>,
    bundle: Arc<Vec<CertificateDer<'static>>>,
    federated: Arc<BTreeMap<TrustDomain, Vec<CertificateDer<'static>>>>,
}

impl Core {
    pub(crate) fn new(cfg: &DevServerConfig, now: SystemTime) -> Result<Self, Error> {
        cfg.validate()?;
        let ca_options = CaOptions {
            with_intermediate: cfg.with_intermediate,
            ..CaOptions::default()
        };
        let active =
            DevCa::with_options(cfg.trust_domain.clone(), ca_options).map_err(Error::Issue)?;
        let mut core = Self {
            td: cfg.trust_domain.clone(),
            ttl: cfg.svid_ttl,
            jitter: cfg.jitter(),
            active,
            next: None,
            retired: None,
            nodes: BTreeMap::new(),
            pods: BTreeMap::new(),
            bundle: Arc::new(Vec::new()),
            federated: Arc::default(),
        };
        core.rebuild_bundle();
        for n in &cfg.nodes {
            core.add_node(&n.name, now)?;
        }
        Ok(core)
    }

    fn rebuild_bundle(&mut self) {
        // Order: the issuing root first, then the one being introduced or retired.
        let mut roots = vec![self.active.root().clone()];
        roots.extend(self.next.iter().map(|c| c.root().clone()));
        roots.extend(self.retired.iter().map(|c| c.root().clone()));
        self.bundle = Arc::new(roots);
    }

    fn issue(&self, id: &SpiffeId, now: SystemTime) -> Result<IssuedSvid, Error> {
        let svid = self
            .active
            .issue_chain(&LeafSpec::svid(id, now, self.ttl))
            .and_then(|c| c.into_svid())
            .map_err(Error::Issue)?;
        // Uniform in [ttl/2 − jitter, ttl/2 + jitter].
        let half = self.ttl / 2;
        let offset = rand::rng().random_range(0..=2 * self.jitter.as_millis() as u64);
        let rotate_at = now + half - self.jitter + Duration::from_millis(offset);
        Ok(IssuedSvid {
            svid: Arc::new(svid),
            issued_at: now,
            rotate_at,
        })
    }

    pub(crate) fn trust_domain(&self) -> &TrustDomain {
        &self.td
    }

    pub(crate) fn add_node(&mut self, name: &str, now: SystemTime) -> Result<(), Error> {
        if self.nodes.contains_key(name) {
            return Err(Error::Config(format!("node {name:?} exists already")));
        }
        let id = node_id(&self.td, name)
            .map_err(|e| Error::Config(format!("node name {name:?}: {e}")))?;
        let issued = self.issue(&id, now)?;
        self.nodes.insert(name.to_owned(), NodeState { issued });
        Ok(())
    }

    /// Registers (or re-registers) a pod and issues its SVID now.
    pub(crate) fn register_pod(
        &mut self,
        reg: PodRegistration,
        now: SystemTime,
    ) -> Result<SpiffeId, Error> {
        if !self.nodes.contains_key(&reg.node) {
            return Err(Error::UnknownNode(reg.node.clone()));
        }
        let id =
            workload_id(&self.td, &reg.namespace, &reg.service_account).map_err(Error::PodId)?;
        let selectors = SelectorSet::k8s_pod(&reg.namespace, &reg.service_account, &reg.name)
            .map_err(Error::PodSelectors)?;
        let key = (reg.namespace.clone(), reg.name.clone());
        if let Some(existing) = self.pods.get(&key) {
            if existing.reg == reg {
                return Ok(existing.id.clone());
            }
        }
        let issued = self.issue(&id, now)?;
        self.pods.insert(
            key,
            PodState {
                reg,
                selectors,
                id: id.clone(),
                issued,
            },
        );
        Ok(id)
    }

    /// Removes a pod's registration: no more SVIDs for it, and its subscribers get an empty
    /// update.
    pub(crate) fn revoke_pod(&mut self, namespace: &str, name: &str) -> Result<SpiffeId, Error> {
        self.pods
            .remove(&(namespace.to_owned(), name.to_owned()))
            .map(|p| p.id)
            .ok_or_else(|| Error::UnknownPod(format!("{namespace}/{name}")))
    }

    /// Re-issues the targeted SVIDs now; returns how many.
    pub(crate) fn rotate(
        &mut self,
        target: &RotateTarget,
        now: SystemTime,
    ) -> Result<usize, Error> {
        let (nodes, pods): (Vec<String>, Vec<(String, String)>) = match target {
            RotateTarget::Pod { namespace, name } => {
                let key = (namespace.clone(), name.clone());
                if !self.pods.contains_key(&key) {
                    return Err(Error::UnknownPod(format!("{namespace}/{name}")));
                }
                (vec![], vec![key])
            }
            RotateTarget::Node(node) => {
                if !self.nodes.contains_key(node) {
                    return Err(Error::UnknownNode(node.clone()));
                }
                let pods = self
                    .pods
                    .iter()
                    .filter(|(_, p)| &p.reg.node == node)
                    .map(|(k, _)| k.clone())
                    .collect();
                (vec![node.clone()], pods)
            }
            RotateTarget::All => (
                self.nodes.keys().cloned().collect(),
                self.pods.keys().cloned().collect(),
            ),
        };
        self.reissue(&nodes, &pods, now)?;
        Ok(nodes.len() + pods.len())
    }

    fn reissue(
        &mut self,
        nodes: &[String],
        pods: &[(String, String)],
        now: SystemTime,
    ) -> Result<(), Error> {
        for n in nodes {
            let id = node_id(&self.td, n).expect("node names were checked when added");
            let issued = self.issue(&id, now)?;
            self.nodes.get_mut(n).expect("listed from the map").issued = issued;
        }
        for k in pods {
            let id = self.pods[k].id.clone();
            let issued = self.issue(&id, now)?;
            self.pods.get_mut(k).expect("listed from the map").issued = issued;
        }
        Ok(())
    }

    /// Re-issues every SVID whose rotation time has come; returns how many.
    pub(crate) fn tick(&mut self, now: SystemTime) -> Result<usize, Error> {
        let nodes: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.issued.rotate_at <= now)
            .map(|(k, _)| k.clone())
            .collect();
        let pods: Vec<(String, String)> = self
            .pods
            .iter()
            .filter(|(_, p)| p.issued.rotate_at <= now)
            .map(|(k, _)| k.clone())
            .collect();
        self.reissue(&nodes, &pods, now)?;
        Ok(nodes.len() + pods.len())
    }

    /// The next rotation time, if anything is held.
    pub(crate) fn next_rotation(&self) -> Option<SystemTime> {
        self.nodes
            .values()
            .map(|n| n.issued.rotate_at)
            .chain(self.pods.values().map(|p| p.issued.rotate_at))
            .min()
    }

    pub(crate) fn ca_phase(&self) -> CaPhase {
        match (&self.next, &self.retired) {
            (Some(_), _) => CaPhase::Prepared,
            (None, Some(_)) => CaPhase::Activated,
            (None, None) => CaPhase::Stable,
        }
    }

    /// Creates the next CA and adds its root to the bundle; the current CA keeps issuing.
    pub(crate) fn ca_prepare(&mut self) -> Result<(), Error> {
        if self.ca_phase() != CaPhase::Stable {
            return Err(Error::CaRotation {
                phase: self.ca_phase(),
                wanted: "prepare",
            });
        }
        self.next = Some(self.active.rotate().map_err(Error::Issue)?);
        self.rebuild_bundle();
        Ok(())
    }

    /// Makes the prepared CA the issuer and re-issues every SVID from it; the old root stays
    /// trusted until [`Core::ca_revoke`].
    pub(crate) fn ca_activate(&mut self, now: SystemTime) -> Result<(), Error> {
        let Some(next) = self.next.take() else {
            return Err(Error::CaRotation {
                phase: self.ca_phase(),
                wanted: "activate",
            });
        };
        let old = std::mem::replace(&mut self.active, next);
        self.retired = Some(old);
        self.rebuild_bundle();
        let nodes: Vec<String> = self.nodes.keys().cloned().collect();
        let pods: Vec<(String, String)> = self.pods.keys().cloned().collect();
        self.reissue(&nodes, &pods, now)
    }

    /// Drops the old root from the bundle: what it issued is no longer trusted.
    pub(crate) fn ca_revoke(&mut self) -> Result<(), Error> {
        if self.retired.take().is_none() {
            return Err(Error::CaRotation {
                phase: self.ca_phase(),
                wanted: "revoke",
            });
        }
        self.rebuild_bundle();
        Ok(())
    }

    /// Federates with `td`: its roots are served beside this trust domain's bundle (as a
    /// SPIRE server serves a federated trust domain's bundle), replacing any held before.
    pub(crate) fn federate(
        &mut self,
        td: TrustDomain,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<(), Error> {
        if td == self.td {
            return Err(Error::Config(format!(
                "a trust domain cannot federate with itself ({td})"
            )));
        }
        if roots.is_empty() {
            return Err(Error::Config(format!("no roots to federate with {td}")));
        }
        Arc::make_mut(&mut self.federated).insert(td, roots);
        Ok(())
    }

    pub(crate) fn bundle(&self) -> Arc<Vec<CertificateDer<'static>>> {
        self.bundle.clone()
    }

    /// The issuing CA's root.
    pub(crate) fn active_root(&self) -> CertificateDer<'static> {
        self.active.root().clone()
    }

    pub(crate) fn node_svid(&self, node: &str) -> Option<Arc<Svid>> {
        self.nodes.get(node).map(|n| n.issued.svid.clone())
    }

    pub(crate) fn pod_svid(&self, namespace: &str, name: &str) -> Option<Arc<Svid>> {
        self.pods
            .get(&(namespace.to_owned(), name.to_owned()))
            .map(|p| p.issued.svid.clone())
    }

    pub(crate) fn status(&self) -> Vec<DevSvidStatus> {
        let line = |node: &str, pod: Option<String>, i: &IssuedSvid| DevSvidStatus {
            node: node.to_owned(),
            pod,
            spiffe_id: i.svid.spiffe_id().clone(),
            serial: i.svid.serial().to_owned(),
            not_after: i.svid.not_after(),
            rotate_at: i.rotate_at,
        };
        let mut out: Vec<DevSvidStatus> = self
            .nodes
            .iter()
            .map(|(n, s)| line(n, None, &s.issued))
            .collect();
        out.extend(
            self.pods
                .iter()
                .map(|((ns, name), p)| line(&p.reg.node, Some(format!("{ns}/{name}")), &p.issued)),
        );
        out
    }

    pub(crate) fn issued(&self, namespace: &str, name: &str) -> Option<IssuedSvid> {
        self.pods
            .get(&(namespace.to_owned(), name.to_owned()))
            .map(|p| p.issued.clone())
    }

    pub(crate) fn view(&self, node: &str) -> Option<NodeView> {
        let n = self.nodes.get(node)?;
        Some(NodeView {
            trust_domain: self.td.clone(),
            node_svid: n.issued.svid.clone(),
            pods: self
                .pods
                .values()
                .filter(|p| p.reg.node == node)
                .map(|p| (p.selectors.clone(), p.issued.svid.clone()))
                .collect(),
            bundle: self.bundle.clone(),
            federated: self.federated.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use veil_identity::{validate_x509_svid, Bundles};

    fn cfg(ttl: u64) -> DevServerConfig {
        let mut c = DevServerConfig::new(TrustDomain::new("lab.veil").unwrap());
        c.svid_ttl = Duration::from_secs(ttl);
        c.nodes = vec![
            DevNodeConfig {
                name: "node-a".into(),
                socket: "/tmp/a.sock".into(),
            },
            DevNodeConfig {
                name: "node-b".into(),
                socket: "/tmp/b.sock".into(),
            },
        ];
        c
    }

    fn pod(node: &str, name: &str) -> PodRegistration {
        PodRegistration {
            node: node.into(),
            namespace: "shop".into(),
            name: name.into(),
            service_account: name.into(),
        }
    }

    fn bundles(core: &Core) -> Bundles {
        let mut b = Bundles::new();
        b.insert(core.trust_domain().clone(), core.bundle().to_vec())
            .unwrap();
        b
    }

    #[test]
    fn config_validation_names_the_problem() {
        let mut c = cfg(60);
        assert!(c.validate().is_ok());
        c.svid_ttl = Duration::from_secs(1);
        assert!(matches!(c.validate(), Err(Error::Config(m)) if m.contains("svid_ttl")));
        let mut c = cfg(60);
        c.rotation_jitter = Some(Duration::from_secs(30));
        assert!(matches!(c.validate(), Err(Error::Config(m)) if m.contains("rotation_jitter")));
        let mut c = cfg(60);
        c.nodes[1].name = "node-a".into();
        assert!(matches!(c.validate(), Err(Error::Config(m)) if m.contains("twice")));
        let mut c = cfg(60);
        c.nodes[1].name = "bad/name".into();
        assert!(c.validate().is_err());
        assert_eq!(
            DevServerConfig::new(TrustDomain::new("x").unwrap()).svid_ttl,
            DEFAULT_SVID_TTL
        );
    }

    #[test]
    fn rotation_is_scheduled_at_half_ttl_within_jitter() {
        let now = SystemTime::now();
        let mut core = Core::new(&cfg(100), now).unwrap();
        for i in 0..20 {
            core.register_pod(pod("node-a", &format!("p{i}")), now)
                .unwrap();
        }
        for s in core.status() {
            let d = s.rotate_at.duration_since(now).unwrap();
            assert!(
                d >= Duration::from_secs(40) && d <= Duration::from_secs(60),
                "{d:?}"
            );
        }
        assert!(core.next_rotation().unwrap() <= now + Duration::from_secs(60));
        // Nothing is due before the earliest time; everything is due after the latest.
        assert_eq!(core.tick(now + Duration::from_secs(39)).unwrap(), 0);
        let before: Vec<String> = core.status().into_iter().map(|s| s.serial).collect();
        assert_eq!(core.tick(now + Duration::from_secs(61)).unwrap(), 22);
        let after: Vec<String> = core.status().into_iter().map(|s| s.serial).collect();
        assert!(before.iter().zip(&after).all(|(a, b)| a != b));
    }

    #[test]
    fn forced_rotation_by_pod_node_and_all() {
        let now = SystemTime::now();
        let mut core = Core::new(&cfg(3600), now).unwrap();
        core.register_pod(pod("node-a", "frontend"), now).unwrap();
        core.register_pod(pod("node-b", "backend"), now).unwrap();
        let serial = |c: &Core, ns: &str, n: &str| c.pod_svid(ns, n).unwrap().serial().to_owned();
        let fe = serial(&core, "shop", "frontend");
        let be = serial(&core, "shop", "backend");
        let target = RotateTarget::Pod {
            namespace: "shop".into(),
            name: "frontend".into(),
        };
        assert_eq!(core.rotate(&target, now).unwrap(), 1);
        assert_ne!(serial(&core, "shop", "frontend"), fe);
        assert_eq!(serial(&core, "shop", "backend"), be);
        let node_b = core.node_svid("node-b").unwrap().serial().to_owned();
        assert_eq!(
            core.rotate(&RotateTarget::Node("node-b".into()), now)
                .unwrap(),
            2
        );
        assert_ne!(serial(&core, "shop", "backend"), be);
        assert_ne!(core.node_svid("node-b").unwrap().serial(), node_b);
        assert_eq!(core.rotate(&RotateTarget::All, now).unwrap(), 4);
        assert!(matches!(
            core.rotate(&RotateTarget::Node("node-z".into()), now),
            Err(Error::UnknownNode(_))
        ));
    }

    #[test]
    fn registration_views_and_revocation() {
        let now = SystemTime::now();
        let mut core = Core::new(&cfg(3600), now).unwrap();
        let id = core.register_pod(pod("node-a", "frontend"), now).unwrap();
        assert_eq!(id.as_str(), "spiffe://lab.veil/ns/shop/sa/frontend");
        // Re-registering the same pod is idempotent (same SVID).
        let serial = core
            .pod_svid("shop", "frontend")
            .unwrap()
            .serial()
            .to_owned();
        core.register_pod(pod("node-a", "frontend"), now).unwrap();
        assert_eq!(core.pod_svid("shop", "frontend").unwrap().serial(), serial);
        assert!(matches!(
            core.register_pod(pod("node-z", "x"), now),
            Err(Error::UnknownNode(_))
        ));
        let a = core.view("node-a").unwrap();
        assert_eq!(a.pods.len(), 1);
        assert_eq!(
            a.node_svid.spiffe_id().as_str(),
            "spiffe://lab.veil/veil/node/node-a"
        );
        assert!(core.view("node-b").unwrap().pods.is_empty());
        core.revoke_pod("shop", "frontend").unwrap();
        assert!(core.view("node-a").unwrap().pods.is_empty());
        assert!(core.pod_svid("shop", "frontend").is_none());
        assert!(matches!(
            core.revoke_pod("shop", "frontend"),
            Err(Error::UnknownPod(_))
        ));
    }

    #[test]
    fn ca_rotation_prepare_activate_revoke() {
        let now = SystemTime::now();
        let mut core = Core::new(&cfg(3600), now).unwrap();
        core.register_pod(pod("node-a", "frontend"), now).unwrap();
        let old_svid = core.pod_svid("shop", "frontend").unwrap();
        let old_root = core.active_root();
        assert_eq!(core.bundle().len(), 1);
        assert!(matches!(
            core.ca_activate(now),
            Err(Error::CaRotation { .. })
        ));
        assert!(matches!(core.ca_revoke(), Err(Error::CaRotation { .. })));

        core.ca_prepare().unwrap();
        assert_eq!(core.ca_phase(), CaPhase::Prepared);
        assert_eq!(core.bundle().len(), 2);
        assert_eq!(core.active_root(), old_root, "old CA still issues");
        assert!(core.ca_prepare().is_err());

        core.ca_activate(now).unwrap();
        assert_eq!(core.ca_phase(), CaPhase::Activated);
        assert_ne!(core.active_root(), old_root);
        let new_svid = core.pod_svid("shop", "frontend").unwrap();
        assert_ne!(
            new_svid.serial(),
            old_svid.serial(),
            "re-issued from the new CA"
        );
        let overlap = bundles(&core);
        assert!(validate_x509_svid(old_svid.cert_chain(), &overlap, now).is_ok());
        assert!(validate_x509_svid(new_svid.cert_chain(), &overlap, now).is_ok());

        core.ca_revoke().unwrap();
        assert_eq!(core.ca_phase(), CaPhase::Stable);
        assert_eq!(core.bundle().as_slice(), &[core.active_root()]);
        let after = bundles(&core);
        assert!(validate_x509_svid(old_svid.cert_chain(), &after, now).is_err());
        assert!(validate_x509_svid(new_svid.cert_chain(), &after, now).is_ok());
    }
}
