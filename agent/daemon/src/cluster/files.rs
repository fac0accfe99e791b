//! The file source: the lab's control plane directory, polled.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{ClusterSource, ClusterState, Error, WatchFuture};

/// The file source: a directory the `veil lab` CLI writes (`cluster.json`, `policies.json`) and
/// agents poll; each agent publishes its node key as `node-keys/<node>`. Polling one file's mtime every second costs nothing measurable idle.
pub struct FileSource {
    dir: PathBuf,
    poll: Duration,
}

impl FileSource {
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
    pub fn publish_node_key_in(
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
        Self::with_keys_and_policies(dir, Self::read_state_file(dir)?)
    }

    /// `cluster.json` alone.
    fn read_state_file(dir: &Path) -> Result<ClusterState, Error> {
        let path = Self::state_path(dir);
        let text = std::fs::read(&path).map_err(|source| Error::Read {
            path: path.clone(),
            source,
        })?;
        serde_json::from_slice(&text).map_err(|source| Error::Parse { path, source })
    }

    /// `state` (as `cluster.json` says) with the published node keys and the policy store.
    fn with_keys_and_policies(dir: &Path, mut state: ClusterState) -> Result<ClusterState, Error> {
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
    pub async fn watch_dir(self) -> Result<watch::Receiver<Arc<ClusterState>>, Error> {
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
                // A change of the policies or a node key alone does not parse cluster.json
                // again (tens of MB at 100,000 pods, about 400 ms of a policy change): the
                // snapshot in force is its parse. A copy made for the change, not a second
                // one kept (that held 100 MB more at 100,000 pods).
                let state = if m.0 == last_mtime.0 {
                    let mut base = (**tx.borrow()).clone();
                    for n in &mut base.nodes {
                        (n.wg_public_key, n.wg_next_public_key) = (None, None);
                    }
                    Self::with_keys_and_policies(&self.dir, base)
                } else {
                    Self::read(&self.dir)
                };
                last_mtime = m;
                match state {
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

impl ClusterSource for FileSource {
    fn kind(&self) -> &'static str {
        "files"
    }

    fn watch(&self) -> WatchFuture<'_> {
        let me = Self {
            dir: self.dir.clone(),
            poll: self.poll,
        };
        Box::pin(me.watch_dir())
    }

    fn publish_node_key(&self, node: &str, current: &str, next: Option<&str>) -> Result<(), Error> {
        Self::publish_node_key_in(&self.dir, node, current, next).map_err(Error::Publish)
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
    use std::net::Ipv4Addr;

    use super::*;
    use crate::cluster::Node;

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
                pod_cidr_v6: None,
                wg_public_key: None,
                wg_next_public_key: None,
            }],
            ..ClusterState::default()
        };
        FileSource::write(&dir, &state).unwrap();
        let keys = |d: &Path| {
            let n = FileSource::read(d).unwrap().nodes.remove(0);
            (n.wg_public_key, n.wg_next_public_key)
        };
        assert_eq!(keys(&dir), (None, None));
        FileSource::publish_node_key_in(&dir, "node-a", "K1", None).unwrap();
        assert_eq!(keys(&dir), (Some("K1".into()), None));
        FileSource::publish_node_key_in(&dir, "node-a", "K1", Some("K2")).unwrap();
        assert_eq!(keys(&dir), (Some("K1".into()), Some("K2".into())));
        FileSource::publish_node_key_in(&dir, "node-a", "K2", None).unwrap();
        assert_eq!(keys(&dir), (Some("K2".into()), None));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
