//! cluster: the agent's view of the cluster (nodes, pods, identities) and the sources it comes
//! from.
//!
//! The agent sees only [`ClusterState`] snapshots on a watch channel; which source produced them
//! (the lab control plane today, the Kubernetes API next) is invisible to the datapath and the
//! auth code.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// Errors reading cluster state.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read cluster state {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("bad policy store {path}: {message}")]
    Policy { path: PathBuf, message: String },
    #[error("bad cluster state in {path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// One consistent snapshot of the cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterState {
    /// Increases with every change the source publishes.
    pub generation: u64,
    pub cluster: String,
    pub trust_domain: String,
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
    /// Numeric security identities, one per namespace + label set, allocated by the control
    /// plane so every node agrees.
    #[serde(default)]
    pub identities: Vec<Identity>,
    /// Network policies in force, with the generation of the last change.
    #[serde(default)]
    pub policies: Vec<crate::policy::Policy>,
    #[serde(default)]
    pub policy_generation: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    pub id: u32,
    pub namespace: String,
    /// The pods' service account: part of the identity because it is part of the SPIFFE ID.
    pub service_account: String,
    /// The pod labels (without the namespace label the allocator adds).
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    pub name: String,
    pub id: u32,
    pub underlay_ip: Ipv4Addr,
    /// Pod CIDR as `a.b.c.d/len`.
    pub pod_cidr: String,
    /// The node's WireGuard public key (base64), once its agent has published it.
    #[serde(default)]
    pub wg_public_key: Option<String>,
    /// The key the node will use next (base64), published ahead of a static key rotation: a
    /// node handshake may claim either key while the rotation is under way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wg_next_public_key: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pod {
    pub name: String,
    pub namespace: String,
    pub node: String,
    pub ip: Ipv4Addr,
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
    /// Host side of the pod's veth on its node.
    pub host_veth: String,
    /// Numeric security identity (see [`ClusterState::identities`]).
    #[serde(default)]
    pub identity: u32,
}

impl ClusterState {
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    pub fn pods_on<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Pod> + 'a {
        self.pods.iter().filter(move |p| p.node == node)
    }

    pub fn pod_by_ip(&self, ip: Ipv4Addr) -> Option<&Pod> {
        self.pods.iter().find(|p| p.ip == ip)
    }

    /// The identity table in the form the policy compiler takes.
    pub fn identity_table(&self) -> Vec<(u32, crate::policy::IdentityLabels)> {
        self.identities
            .iter()
            .filter_map(|i| {
                crate::policy::IdentityKey::new(&i.namespace, &i.service_account, &i.labels)
                    .ok()
                    .map(|k| (i.id, k.identity_labels()))
            })
            .collect()
    }
}

/// Parses `a.b.c.d/len`.
pub fn parse_cidr_v4(s: &str) -> Option<(Ipv4Addr, u8)> {
    let (ip, len) = s.split_once('/')?;
    let len: u8 = len.parse().ok()?;
    (len <= 32).then_some((ip.parse().ok()?, len))
}

/// The lab control plane: a directory the `veil lab` CLI writes (`cluster.json`) and agents
/// poll. Polling one file's mtime every second costs nothing measurable idle.
pub struct LabSource {
    dir: PathBuf,
    poll: Duration,
}

impl LabSource {
    pub const STATE_FILE: &'static str = "cluster.json";

    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            poll: Duration::from_millis(250),
        }
    }

    pub fn state_path(dir: &Path) -> PathBuf {
        dir.join(Self::STATE_FILE)
    }

    fn keys_dir(dir: &Path) -> PathBuf {
        dir.join("node-keys")
    }

    pub fn policies_path(dir: &Path) -> PathBuf {
        dir.join("policies.json")
    }

    /// Reads the policy store: (generation, policies). Absent means none.
    pub fn read_policies(dir: &Path) -> Result<(u64, crate::policy::PolicySet), Error> {
        let path = Self::policies_path(dir);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok((0, crate::policy::PolicySet::new()))
            }
            Err(source) => return Err(Error::Read { path, source }),
        };
        let stored: StoredPolicies =
            serde_json::from_str(&text).map_err(|source| Error::Parse {
                path: path.clone(),
                source,
            })?;
        let set =
            crate::policy::PolicySet::from_json(&stored.policies.to_string()).map_err(|e| {
                Error::Policy {
                    path,
                    message: e.to_string(),
                }
            })?;
        Ok((stored.generation, set))
    }

    /// Writes the policy store atomically with the next generation (the lab CLI is the writer).
    pub fn write_policies(
        dir: &Path,
        generation: u64,
        set: &crate::policy::PolicySet,
    ) -> Result<(), crate::sys::Error> {
        let policies: serde_json::Value =
            serde_json::from_str(&set.to_json()).expect("policy set json");
        let json = serde_json::to_vec_pretty(&StoredPolicies {
            generation,
            policies,
        })
        .expect("serializes");
        crate::sys::write_atomic(&Self::policies_path(dir), &json)
    }

    /// Publishes this node's WireGuard public key (what Cilium keeps in a node annotation) and,
    /// ahead of a static key rotation, the key it will use next: the key file holds the current
    /// key and, on a second line, the next one.
    pub fn publish_node_key(
        dir: &Path,
        node: &str,
        key: &str,
        next: Option<&str>,
    ) -> Result<(), crate::sys::Error> {
        let kd = Self::keys_dir(dir);
        std::fs::create_dir_all(&kd).map_err(|source| crate::sys::Error::Io {
            what: "cannot create",
            path: kd.clone(),
            source,
        })?;
        let path = kd.join(node);
        let text = match next {
            Some(n) => format!("{key}\n{n}"),
            None => key.to_string(),
        };
        if std::fs::read_to_string(&path).is_ok_and(|k| k == text) {
            return Ok(());
        }
        crate::sys::write_atomic(&path, text.as_bytes())
    }

    /// Reads the current snapshot, with the node keys agents have published.
    pub fn read(dir: &Path) -> Result<ClusterState, Error> {
        let path = Self::state_path(dir);
        let text = std::fs::read(&path).map_err(|source| Error::Read {
            path: path.clone(),
            source,
        })?;
        let mut state: ClusterState =
            serde_json::from_slice(&text).map_err(|source| Error::Parse { path, source })?;
        let kd = Self::keys_dir(dir);
        for n in &mut state.nodes {
            if let Ok(k) = std::fs::read_to_string(kd.join(&n.name)) {
                let mut lines = k.lines().map(str::trim).filter(|l| !l.is_empty());
                n.wg_public_key = lines.next().map(str::to_string);
                n.wg_next_public_key = lines.next().map(str::to_string);
            }
        }
        let (generation, set) = Self::read_policies(dir)?;
        state.policies = set.list().to_vec();
        state.policy_generation = generation;
        Ok(state)
    }

    /// Writes a snapshot atomically (used by the lab CLI, the only writer).
    pub fn write(dir: &Path, state: &ClusterState) -> Result<(), crate::sys::Error> {
        let json = serde_json::to_vec_pretty(state).expect("cluster state serializes");
        crate::sys::write_atomic(&Self::state_path(dir), &json)
    }

    /// Reads the first snapshot, then publishes every change on a watch channel until the
    /// receiver is dropped. A file that fails to parse keeps the last good snapshot in force.
    pub async fn watch(self) -> Result<watch::Receiver<Arc<ClusterState>>, Error> {
        // Stat before reading: any write after this point shows up as a changed mtime.
        let path = Self::state_path(&self.dir);
        let keys = Self::keys_dir(&self.dir);
        let pols = Self::policies_path(&self.dir);
        let mut last_mtime = (mtime(&path), mtime(&keys), mtime(&pols));
        let first = Self::read(&self.dir)?;
        let (tx, rx) = watch::channel(Arc::new(first));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(self.poll).await;
                if tx.is_closed() {
                    return;
                }
                let m = (mtime(&path), mtime(&keys), mtime(&pols));
                if m == last_mtime {
                    continue;
                }
                last_mtime = m;
                match Self::read(&self.dir) {
                    Ok(state) if state != **tx.borrow() => {
                        tracing::info!(generation = state.generation, "cluster state changed");
                        let _ = tx.send(Arc::new(state));
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "keeping last good cluster state"),
                }
            }
        });
        Ok(rx)
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredPolicies {
    generation: u64,
    policies: serde_json::Value,
}

fn mtime(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_publishes_its_next_key_beside_the_current_one() {
        let dir = std::env::temp_dir().join(format!("veil-cluster-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let state = ClusterState {
            nodes: vec![Node {
                name: "node-a".into(),
                id: 1,
                underlay_ip: Ipv4Addr::new(198, 18, 0, 1),
                pod_cidr: "198.19.1.0/24".into(),
                wg_public_key: None,
                wg_next_public_key: None,
            }],
            ..ClusterState::default()
        };
        LabSource::write(&dir, &state).unwrap();
        let keys = |d: &Path| {
            let n = LabSource::read(d).unwrap().nodes.remove(0);
            (n.wg_public_key, n.wg_next_public_key)
        };
        assert_eq!(keys(&dir), (None, None));
        LabSource::publish_node_key(&dir, "node-a", "K1", None).unwrap();
        assert_eq!(keys(&dir), (Some("K1".into()), None));
        LabSource::publish_node_key(&dir, "node-a", "K1", Some("K2")).unwrap();
        assert_eq!(keys(&dir), (Some("K1".into()), Some("K2".into())));
        LabSource::publish_node_key(&dir, "node-a", "K2", None).unwrap();
        assert_eq!(keys(&dir), (Some("K2".into()), None));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn cidr_parsing() {
        assert_eq!(
            parse_cidr_v4("198.19.2.0/24"),
            Some((Ipv4Addr::new(198, 19, 2, 0), 24))
        );
        assert_eq!(parse_cidr_v4("198.19.2.0/33"), None);
        assert_eq!(parse_cidr_v4("198.19.2.0"), None);
        assert_eq!(parse_cidr_v4("x/24"), None);
    }

    #[test]
    fn unknown_fields_in_state_are_errors() {
        let bad =
            r#"{"generation":1,"cluster":"c","trust_domain":"t","nodes":[],"pods":[],"extra":1}"#;
        assert!(serde_json::from_str::<ClusterState>(bad).is_err());
    }
}
