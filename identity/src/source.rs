//! How identities reach the agent: a [`SvidSource`] publishes [`IdentitySnapshot`]s on a
//! `tokio::sync::watch` channel. A snapshot holds only SVIDs that validated against its own
//! bundles when it was published; consumers that need events instead of states use
//! [`IdentitySnapshot::diff`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::watch;

use crate::bundle::Bundles;
use crate::id::SpiffeId;
use crate::selector::SelectorSet;
use crate::svid::Svid;

/// Which SVID slot of a snapshot: the node's own, or a workload's by its selector set.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SvidKey {
    Node,
    Workload(SelectorSet),
}

/// Everything the agent knows about identities at one moment.
#[derive(Clone, Debug, Default)]
pub struct IdentitySnapshot {
    /// Bumped on every publication.
    pub generation: u64,
    /// The node SVID (first SVID of the Workload API response), once one validated.
    pub node: Option<Arc<Svid>>,
    /// Workload SVIDs by the selector set subscribed for them (one pod = one set). A set with
    /// no valid SVID is absent, never present with an empty list.
    pub workloads: BTreeMap<SelectorSet, Vec<Arc<Svid>>>,
    /// Trust bundles the SVIDs above were validated against.
    pub bundles: Arc<Bundles>,
}

/// One difference between two snapshots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdentityChange {
    /// A slot got an SVID (first one or a rotation): the new value.
    Updated { key: SvidKey, svids: Vec<Arc<Svid>> },
    /// A slot lost its SVIDs (removal, revocation, expiry, or unsubscribe).
    Removed {
        key: SvidKey,
        spiffe_ids: Vec<SpiffeId>,
    },
    /// The bundle set changed.
    BundlesChanged,
}

impl IdentitySnapshot {
    /// All SVIDs with their slot.
    pub fn svids(&self) -> impl Iterator<Item = (SvidKey, &Arc<Svid>)> {
        self.node.iter().map(|s| (SvidKey::Node, s)).chain(
            self.workloads
                .iter()
                .flat_map(|(k, v)| v.iter().map(move |s| (SvidKey::Workload(k.clone()), s))),
        )
    }

    /// The first workload SVID with this SPIFFE ID (pods sharing a service account share it).
    pub fn workload_svid(&self, id: &SpiffeId) -> Option<&Arc<Svid>> {
        self.workloads
            .values()
            .flatten()
            .find(|s| s.spiffe_id() == id)
    }

    /// Earliest `not_after` among the SVIDs held.
    pub fn next_expiry(&self) -> Option<SystemTime> {
        self.svids().map(|(_, s)| s.not_after()).min()
    }

    fn slot(&self, key: &SvidKey) -> Option<&[Arc<Svid>]> {
        match key {
            SvidKey::Node => self.node.as_ref().map(std::slice::from_ref),
            SvidKey::Workload(sel) => self.workloads.get(sel).map(Vec::as_slice),
        }
    }

    /// What changed from `prev` to `self`, slot by slot, node first.
    pub fn diff(&self, prev: &IdentitySnapshot) -> Vec<IdentityChange> {
        let mut keys: Vec<SvidKey> = Vec::new();
        keys.push(SvidKey::Node);
        let sels: std::collections::BTreeSet<&SelectorSet> =
            prev.workloads.keys().chain(self.workloads.keys()).collect();
        keys.extend(sels.into_iter().cloned().map(SvidKey::Workload));

        let mut out = Vec::new();
        if self.bundles != prev.bundles {
            out.push(IdentityChange::BundlesChanged);
        }
        for key in keys {
            match (prev.slot(&key), self.slot(&key)) {
                (None, None) => {}
                (Some(old), None) => out.push(IdentityChange::Removed {
                    key,
                    spiffe_ids: old.iter().map(|s| s.spiffe_id().clone()).collect(),
                }),
                (old, Some(new)) => {
                    if old != Some(new) {
                        out.push(IdentityChange::Updated {
                            key,
                            svids: new.to_vec(),
                        });
                    }
                }
            }
        }
        out
    }
}

/// A stream of identity snapshots the agent consumes, plus the workloads it wants SVIDs for.
/// The SPIRE clients implement it; [`FakeSvidSource`] is the test double.
pub trait SvidSource: Send + Sync + 'static {
    /// A receiver of the current and future snapshots.
    fn subscribe(&self) -> watch::Receiver<IdentitySnapshot>;
    /// Start delivering SVIDs for a workload (a pod of this node) identified by selectors.
    fn watch_workload(&self, selectors: SelectorSet);
    /// Stop; its SVIDs leave the next snapshot at once.
    fn unwatch_workload(&self, selectors: &SelectorSet);
}

/// A [`SvidSource`] whose snapshots the test publishes by hand.
#[derive(Clone)]
pub struct FakeSvidSource {
    tx: Arc<watch::Sender<IdentitySnapshot>>,
    watched: Arc<std::sync::Mutex<std::collections::BTreeSet<SelectorSet>>>,
}

impl Default for FakeSvidSource {
    fn default() -> Self {
        Self {
            tx: Arc::new(watch::Sender::new(IdentitySnapshot::default())),
            watched: Arc::default(),
        }
    }
}

impl FakeSvidSource {
    pub fn new() -> Self {
        Self::default()
    }

    /// Publishes `snapshot` with the next generation number.
    pub fn publish(&self, mut snapshot: IdentitySnapshot) {
        self.tx.send_modify(|cur| {
            snapshot.generation = cur.generation + 1;
            *cur = snapshot;
        });
    }

    /// The selector sets currently watched.
    pub fn watched(&self) -> Vec<SelectorSet> {
        self.watched
            .lock()
            .expect("poisoned")
            .iter()
            .cloned()
            .collect()
    }
}

impl SvidSource for FakeSvidSource {
    fn subscribe(&self) -> watch::Receiver<IdentitySnapshot> {
        self.tx.subscribe()
    }
    fn watch_workload(&self, selectors: SelectorSet) {
        self.watched.lock().expect("poisoned").insert(selectors);
    }
    fn unwatch_workload(&self, selectors: &SelectorSet) {
        self.watched.lock().expect("poisoned").remove(selectors);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_of_equal_snapshots_is_empty() {
        let a = IdentitySnapshot::default();
        assert!(a.diff(&a.clone()).is_empty());
    }

    #[test]
    fn fake_source_publishes_generations_and_tracks_watches() {
        let src = FakeSvidSource::new();
        let mut rx = src.subscribe();
        src.publish(IdentitySnapshot::default());
        assert!(rx.has_changed().unwrap());
        assert_eq!(rx.borrow_and_update().generation, 1);
        let sel = SelectorSet::k8s_pod("shop", "a", "a").unwrap();
        src.watch_workload(sel.clone());
        assert_eq!(src.watched(), vec![sel.clone()]);
        src.unwatch_workload(&sel);
        assert!(src.watched().is_empty());
    }
}
