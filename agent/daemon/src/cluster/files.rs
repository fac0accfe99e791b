//! The file source: the lab's control plane directory, watched with inotify and polled.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{ClusterSource, ClusterState, Error, WatchFuture};

/// The file source: a directory the `veil lab` CLI writes (`cluster.json`, `policies.json`) and
/// agents watch; each agent publishes its node key as `node-keys/<node>`. inotify wakes the
/// agent as soon as a file is written; the stamps (mtime, inode, size) of the three paths are
/// also polled every 250 ms, so a missed or unavailable inotify costs latency, not a change.
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
        // The policies are parsed once, by the policy set (kept raw here).
        let stored: ReadPolicies = serde_json::from_str(&text).map_err(|source| Error::Parse {
            path: path.clone(),
            source,
        })?;
        let set = crate::policy::PolicySet::from_json(stored.policies.get()).map_err(|e| {
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
        let mut state: ClusterState =
            serde_json::from_slice(&text).map_err(|source| Error::Parse { path, source })?;
        state.compact();
        Ok(state)
    }

    /// `state` (as `cluster.json` says) with the published node keys and the policy store.
    fn with_keys_and_policies(dir: &Path, mut state: ClusterState) -> Result<ClusterState, Error> {
        Self::with_keys(dir, &mut state);
        let (generation, set) = Self::read_policies(dir)?;
        state.policies = Arc::new(set.into_shared());
        state.policy_generation = generation;
        Ok(state)
    }

    /// The published node keys into `state`'s nodes.
    fn with_keys(dir: &Path, state: &mut ClusterState) {
        let kd = Self::keys_dir(dir);
        for n in &mut state.nodes {
            if let Ok(k) = std::fs::read_to_string(kd.join(&n.name)) {
                let mut lines = k.lines().map(str::trim).filter(|l| !l.is_empty());
                n.wg_public_key = lines.next().map(str::to_string);
                n.wg_next_public_key = lines.next().map(str::to_string);
            }
        }
    }

    /// Writes a snapshot atomically (used by the lab CLI, the only writer).
    pub fn write(dir: &Path, state: &ClusterState) -> Result<(), crate::sys::Error> {
        let json = serde_json::to_vec_pretty(state).expect("cluster state serializes");
        crate::sys::write_atomic(&Self::state_path(dir), &json)
    }

    /// Reads the first snapshot, then publishes every change on a watch channel until the
    /// receiver is dropped. A file that fails to parse keeps the last good snapshot in force.
    pub async fn watch_dir(self) -> Result<watch::Receiver<Arc<ClusterState>>, Error> {
        // Stat before reading: any write after this point shows up as a changed stamp.
        let path = Self::state_path(&self.dir);
        let keys = Self::keys_dir(&self.dir);
        let pols = Self::policies_path(&self.dir);
        let stamps = move |p: &Path, k: &Path, q: &Path| (stamp(p), stamp(k), stamp(q));
        let mut last_stamp = stamps(&path, &keys, &pols);
        let first = Self::read(&self.dir)?;
        let (tx, rx) = watch::channel(Arc::new(first));
        let mut events = DirEvents::new(&self.dir);
        tokio::spawn(async move {
            loop {
                match events.as_mut() {
                    Some(ev) => ev.next(self.poll, &keys).await,
                    None => tokio::time::sleep(self.poll).await,
                }
                if tx.is_closed() {
                    return;
                }
                let m = stamps(&path, &keys, &pols);
                if m == last_stamp {
                    continue;
                }
                // A change of the policies or a node key alone does not parse cluster.json
                // again (tens of MB at 100,000 pods, about 400 ms of a policy change): the
                // snapshot in force is its parse. A copy made for the change, not a second
                // one kept (that held 100 MB more at 100,000 pods).
                let state = if m.0 == last_stamp.0 {
                    let mut base = (**tx.borrow()).clone();
                    for n in &mut base.nodes {
                        (n.wg_public_key, n.wg_next_public_key) = (None, None);
                    }
                    Self::with_keys_and_policies(&self.dir, base)
                } else if m.2 == last_stamp.2 {
                    // cluster.json alone (a pod added): the policies in force are those of
                    // policies.json as it stands, not parsed and validated again (10,000
                    // policies: about a third of a pod add's time).
                    Self::read_state_file(&self.dir).map(|mut state| {
                        Self::with_keys(&self.dir, &mut state);
                        let current = tx.borrow();
                        state.policies = current.policies.clone();
                        state.policy_generation = current.policy_generation;
                        state
                    })
                } else {
                    Self::read(&self.dir)
                };
                last_stamp = m;
                match state {
                    Ok(state) if state != **tx.borrow() => {
                        state.share_index(&tx.borrow());
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

/// [`StoredPolicies`] as read: the policies' JSON text, for [`crate::policy::PolicySet::from_json`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadPolicies<'a> {
    generation: u64,
    #[serde(borrow)]
    policies: &'a serde_json::value::RawValue,
}

/// What tells a rewrite of `path` apart: its mtime, and its inode and size (an atomic write is
/// a new inode, so two writes within one timestamp tick still differ).
fn stamp(path: &Path) -> Option<(SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.ino(), m.size()))
}

/// inotify on the control-plane directory and its node-key directory: a write wakes the
/// watcher at once instead of at its next poll.
struct DirEvents {
    fd: tokio::io::unix::AsyncFd<InotifyFd>,
    keys_watched: bool,
}

struct InotifyFd(nix::sys::inotify::Inotify);

impl std::os::fd::AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsFd as _;
        self.0.as_fd().as_raw_fd()
    }
}

impl DirEvents {
    const MASK: nix::sys::inotify::AddWatchFlags = nix::sys::inotify::AddWatchFlags::IN_CLOSE_WRITE
        .union(nix::sys::inotify::AddWatchFlags::IN_MOVED_TO)
        .union(nix::sys::inotify::AddWatchFlags::IN_CREATE)
        .union(nix::sys::inotify::AddWatchFlags::IN_DELETE);

    /// None (the poll alone) when inotify cannot watch `dir`.
    fn new(dir: &Path) -> Option<Self> {
        use nix::sys::inotify::{InitFlags, Inotify};
        let ino = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .inspect_err(|e| tracing::debug!(error = %e, "no inotify: the file source polls"))
            .ok()?;
        ino.add_watch(dir, Self::MASK).ok()?;
        // SAFETY: the AsyncFd owns the Inotify (its descriptor valid and open for the
        // AsyncFd's whole life) and nothing else closes it.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(
                InotifyFd(ino),
                tokio::io::Interest::READABLE,
            )
        }
        .ok()?;
        Some(Self {
            fd,
            keys_watched: false,
        })
    }

    /// Returns when something was written or `poll` passed, whichever is first. The node-key
    /// directory is watched once it exists (the first agent to publish creates it).
    async fn next(&mut self, poll: Duration, keys: &Path) {
        if !self.keys_watched {
            self.keys_watched = self.fd.get_ref().0.add_watch(keys, Self::MASK).is_ok();
        }
        let Ok(Ok(mut ready)) = tokio::time::timeout(poll, self.fd.readable()).await else {
            return;
        };
        // Drain what is queued; the stamps say what changed.
        while ready.get_inner().0.read_events().is_ok() {}
        ready.clear_ready();
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::cluster::Node;

    /// An empty directory of this test process, `tag` telling the tests apart.
    fn fresh_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("veil-cluster-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// With the poll an hour away, only inotify can deliver a change: the last of several
    /// quick rewrites of cluster.json, then a rewrite of policies.json, then of cluster.json
    /// alone (the policies in force kept), reach the watcher.
    #[tokio::test]
    async fn a_write_is_seen_without_waiting_for_the_poll() {
        let dir = fresh_dir("inotify");
        let mut state = ClusterState::default();
        FileSource::write(&dir, &state).unwrap();
        let source = FileSource {
            dir: dir.clone(),
            poll: Duration::from_secs(3600),
        };
        let mut rx = source.watch_dir().await.unwrap();
        let seen = |rx: &mut watch::Receiver<Arc<ClusterState>>, want: (u64, u64)| {
            let mut rx = rx.clone();
            async move {
                tokio::time::timeout(
                    Duration::from_secs(20),
                    rx.wait_for(|s| (s.generation, s.policy_generation) == want),
                )
                .await
                .map(|_| ())
                .map_err(|_| {
                    format!("{want:?} not seen; last {:?}", {
                        let s = rx.borrow();
                        (s.generation, s.policy_generation)
                    })
                })
            }
        };
        for g in 1..=5 {
            state.generation = g;
            FileSource::write(&dir, &state).unwrap();
        }
        seen(&mut rx, (5, 0)).await.unwrap();
        FileSource::write_policies(&dir, 7, &crate::policy::PolicySet::new()).unwrap();
        seen(&mut rx, (5, 7)).await.unwrap();
        // cluster.json alone: the policies in force stay (not read again, not lost).
        state.generation = 6;
        FileSource::write(&dir, &state).unwrap();
        seen(&mut rx, (6, 7)).await.unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Pods with equal labels share one map once read (each pod had its own as parsed).
    #[test]
    fn pods_read_share_equal_labels_and_keep_no_spare_room() {
        let dir = fresh_dir("labels");
        let pod = |name: &str, host: u8, app: &str| crate::cluster::Pod {
            labels: Arc::new([("app".to_string(), app.to_string())].into()),
            ..crate::cluster::Pod::for_test(name, "node-a", [198, 19, 1, host], 0)
        };
        let state = ClusterState {
            pods: crate::cluster::pod_list([
                pod("a1", 10, "a"),
                pod("b", 11, "b"),
                pod("a2", 12, "a"),
            ]),
            ..ClusterState::default()
        };
        FileSource::write(&dir, &state).unwrap();
        let read = FileSource::read(&dir).unwrap();
        assert_eq!(read.pods, state.pods);
        let l = |i: usize| &read.pods[i].labels;
        assert!(Arc::ptr_eq(l(0), l(2)), "equal labels not shared");
        assert!(!Arc::ptr_eq(l(0), l(1)));
        // As parsed, 3 pods had room for 4.
        assert_eq!(read.pods.capacity(), read.pods.len());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_node_publishes_its_next_key_beside_the_current_one() {
        let dir = fresh_dir("test");
        let state = ClusterState {
            nodes: vec![Node {
                name: "node-a".into(),
                id: 1,
                underlay_ip: Ipv4Addr::new(198, 18, 0, 1).into(),
                underlay_ipv6: None,
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
