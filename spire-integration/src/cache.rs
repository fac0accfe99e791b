//! The client's identity state, sans-IO: updates from the API streams go in, snapshots come
//! out. Time is a parameter, so every rule below is unit-tested without sockets or clocks.
//!
//! Rules:
//! - Only SVIDs that validate (explicitly, `veil_identity::validate_x509_svid`) against the
//!   current bundles at `now` appear in a snapshot; nothing else is ever invented.
//! - What a stream last delivered stays a candidate when the stream breaks (last good kept);
//!   it leaves the snapshot once it expires, or its chain's earliest `notAfter` passes.
//! - An update for a selector set replaces its SVIDs; an empty one removes them at once, and
//!   so does unwatching the set.
//! - Bundles come from one stream at a time, so they never step back: the Delegated Identity
//!   API's bundle stream once it has delivered, the Workload API's bundles (carried with the
//!   node SVID) until then. Mixing the two streams' latest messages could briefly re-trust a
//!   revoked root whenever they arrive out of order.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use tracing::{debug, warn};
use veil_identity::{Bundles, IdentitySnapshot, SelectorSet, Svid, SvidError};

/// One message from a stream, already parsed.
#[derive(Debug)]
pub(crate) enum Update {
    /// A complete Workload API response: the caller's SVIDs (first = the node's) and bundles.
    Node { svids: Vec<Svid>, bundles: Bundles },
    /// A complete Delegated Identity response for one selector set; empty = removed.
    Workload {
        selectors: SelectorSet,
        svids: Vec<Svid>,
    },
    /// A complete bundle map.
    Bundles(Bundles),
    /// The agent no longer wants this selector set.
    Unwatched(SelectorSet),
}

#[derive(Debug)]
struct Candidate {
    svid: Arc<Svid>,
    /// The bundles value this chain last validated against, and until when that holds.
    verified: Option<(Arc<Bundles>, SystemTime)>,
    /// The last rejection was logged (log once per candidate and reason).
    logged: Option<String>,
}

impl Candidate {
    fn new(svid: Svid) -> Self {
        Self {
            svid: Arc::new(svid),
            verified: None,
            logged: None,
        }
    }

    /// Valid at `now` against `bundles`? Chain verification is cached per bundles value; the
    /// time window is checked every time.
    fn check(&mut self, bundles: &Arc<Bundles>, now: SystemTime) -> Result<(), SvidError> {
        if let Some((b, until)) = &self.verified {
            if Arc::ptr_eq(b, bundles) {
                if now < self.svid.not_before() {
                    return Err(SvidError::NotYetValid {
                        not_before: self.svid.not_before(),
                    });
                }
                if now > *until {
                    return Err(SvidError::Expired { not_after: *until });
                }
                return Ok(());
            }
        }
        let v = self.svid.validate(bundles, now)?;
        self.verified = Some((bundles.clone(), v.valid_until));
        Ok(())
    }

    fn check_logged(&mut self, bundles: &Arc<Bundles>, now: SystemTime, slot: &str) -> bool {
        match self.check(bundles, now) {
            Ok(()) => {
                self.logged = None;
                true
            }
            Err(e) => {
                // No bundle has arrived yet: the SVID and bundle streams are separate, and at
                // start the SVIDs often come first. That is waiting, not a fault (debug); the
                // same SVID is judged again, and warned about, once bundles are there.
                let waiting = matches!(e, SvidError::NoBundle(_)) && bundles.is_empty();
                let reason = if waiting {
                    format!("{e} (no bundle received yet)")
                } else {
                    e.to_string()
                };
                if self.logged.as_deref() != Some(&reason) {
                    if waiting {
                        debug!(slot, spiffe_id = %self.svid.spiffe_id(), serial = self.svid.serial(),
                               "svid waits for its trust bundle");
                    } else {
                        // The clock it was judged by: outside its window by a few minutes
                        // usually means this host's clock is off, not the SVID.
                        let clock_unix = now
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.as_secs());
                        warn!(slot, spiffe_id = %self.svid.spiffe_id(), serial = self.svid.serial(),
                              error = %reason, clock_unix, "svid not published");
                    }
                    self.logged = Some(reason);
                }
                false
            }
        }
    }

    /// When this candidate's standing can next change by the clock alone.
    fn next_change(&self, now: SystemTime) -> Option<SystemTime> {
        let until = self
            .verified
            .as_ref()
            .map(|(_, u)| *u)
            .unwrap_or(self.svid.not_after());
        if now < self.svid.not_before() {
            Some(self.svid.not_before())
        } else if now <= until {
            // Strictly after `until` it is expired.
            Some(until + std::time::Duration::from_millis(1))
        } else {
            None
        }
    }
}

/// The client's identity state.
#[derive(Debug, Default)]
pub(crate) struct IdentityCache {
    node: Vec<Candidate>,
    workloads: BTreeMap<SelectorSet, Vec<Candidate>>,
    /// From the Workload API (fallback).
    node_bundles: Option<Bundles>,
    /// From the Delegated Identity API's bundle stream (preferred).
    delegated_bundles: Option<Bundles>,
    /// The bundles in force, shared with snapshots; replaced only when the content changes.
    bundles: Arc<Bundles>,
}

impl IdentityCache {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    pub(crate) fn apply(&mut self, update: Update) {
        match update {
            Update::Node { svids, bundles } => {
                self.node = svids.into_iter().map(Candidate::new).collect();
                self.node_bundles = Some(bundles);
                self.refresh_bundles();
            }
            Update::Workload { selectors, svids } => {
                if svids.is_empty() {
                    self.workloads.remove(&selectors);
                } else {
                    self.workloads
                        .insert(selectors, svids.into_iter().map(Candidate::new).collect());
                }
            }
            Update::Bundles(b) => {
                self.delegated_bundles = Some(b);
                self.refresh_bundles();
            }
            Update::Unwatched(selectors) => {
                self.workloads.remove(&selectors);
            }
        }
    }

    fn refresh_bundles(&mut self) {
        let Some(effective) = self
            .delegated_bundles
            .as_ref()
            .or(self.node_bundles.as_ref())
        else {
            return;
        };
        if *self.bundles != *effective {
            self.bundles = Arc::new(effective.clone());
        }
    }

    /// What may be published at `now` (generation left at 0 for the caller to set).
    pub(crate) fn snapshot(&mut self, now: SystemTime) -> IdentitySnapshot {
        let bundles = self.bundles.clone();
        // The node SVID is the first of the Workload API response; if that one is not valid,
        // there is no node SVID: another SVID of the response is not promoted in its place.
        let node = self.node.first_mut().and_then(|c| {
            c.check_logged(&bundles, now, "node")
                .then(|| c.svid.clone())
        });
        let mut workloads = BTreeMap::new();
        for (sel, cands) in &mut self.workloads {
            let slot = sel.to_string();
            let valid: Vec<Arc<Svid>> = cands
                .iter_mut()
                .filter_map(|c| c.check_logged(&bundles, now, &slot).then(|| c.svid.clone()))
                .collect();
            if !valid.is_empty() {
                workloads.insert(sel.clone(), valid);
            }
        }
        IdentitySnapshot {
            generation: 0,
            node,
            workloads,
            bundles,
        }
    }

    /// The next instant at which a snapshot can change without any update arriving.
    pub(crate) fn next_deadline(&self, now: SystemTime) -> Option<SystemTime> {
        self.node
            .iter()
            .take(1)
            .chain(self.workloads.values().flatten())
            .filter_map(|c| c.next_change(now))
            .min()
    }
}

/// Whether two snapshots publish the same thing (generation aside).
pub(crate) fn same_content(a: &IdentitySnapshot, b: &IdentitySnapshot) -> bool {
    a.node == b.node && a.workloads == b.workloads && a.bundles == b.bundles
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use veil_certs_dev::DevCa;
    use veil_identity::TrustDomain;

    fn td() -> TrustDomain {
        TrustDomain::new("lab.veil").unwrap()
    }

    fn bundles(ca: &[&DevCa]) -> Bundles {
        let mut b = Bundles::new();
        b.insert(td(), ca.iter().flat_map(|c| c.bundle()).collect())
            .unwrap();
        b
    }

    fn pod(name: &str) -> SelectorSet {
        SelectorSet::k8s_pod("shop", name, name).unwrap()
    }

    #[test]
    fn nothing_is_published_before_a_valid_svid_arrives() {
        let mut c = IdentityCache::new();
        let s = c.snapshot(SystemTime::now());
        assert!(s.node.is_none() && s.workloads.is_empty());
        // An SVID without its bundle is not published (fails closed)…
        let ca = DevCa::new(td()).unwrap();
        let svid = ca
            .issue_workload_svid("shop", "a", Duration::from_secs(60))
            .unwrap();
        c.apply(Update::Workload {
            selectors: pod("a"),
            svids: vec![svid.clone()],
        });
        assert!(c.snapshot(SystemTime::now()).workloads.is_empty());
        // …until the bundle arrives, then it is.
        c.apply(Update::Bundles(bundles(&[&ca])));
        let s = c.snapshot(SystemTime::now());
        assert_eq!(s.workloads[&pod("a")][0].serial(), svid.serial());
    }

    /// What `f` logged at WARN, one line each (tracing's fmt output, captured).
    fn warnings_of(f: impl FnOnce()) -> Vec<String> {
        #[derive(Clone, Default)]
        struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Captured {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let out = Captured::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .filter(|l| l.contains(" WARN "))
            .map(String::from)
            .collect()
    }

    #[test]
    fn an_svid_ahead_of_the_first_bundle_waits_quietly_one_outside_the_bundles_is_warned() {
        let ca = DevCa::new(td()).unwrap();
        let svid = ca
            .issue_workload_svid("shop", "a", Duration::from_secs(60))
            .unwrap();
        let mut c = IdentityCache::new();
        // At start the SVID stream often delivers before the bundle stream: not a fault.
        let waiting = warnings_of(|| {
            c.apply(Update::Workload {
                selectors: pod("a"),
                svids: vec![svid.clone()],
            });
            assert!(c.snapshot(SystemTime::now()).workloads.is_empty());
        });
        assert_eq!(waiting, Vec::<String>::new());
        // Bundles arrive without the SVID's trust domain: a fault, warned about once.
        let other = TrustDomain::new("other.veil").unwrap();
        let mut b = Bundles::new();
        b.insert(other.clone(), DevCa::new(other).unwrap().bundle())
            .unwrap();
        let refused = warnings_of(|| {
            c.apply(Update::Bundles(b));
            assert!(c.snapshot(SystemTime::now()).workloads.is_empty());
            assert!(c.snapshot(SystemTime::now()).workloads.is_empty());
        });
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert!(
            refused[0].contains("svid not published")
                && refused[0].contains("no trust bundle for trust domain lab.veil"),
            "{refused:?}"
        );
        // The right bundle: published, nothing more to warn about.
        let published = warnings_of(|| {
            c.apply(Update::Bundles(bundles(&[&ca])));
            assert_eq!(
                c.snapshot(SystemTime::now()).workloads[&pod("a")][0].serial(),
                svid.serial()
            );
        });
        assert_eq!(published, Vec::<String>::new());
    }

    #[test]
    fn last_good_kept_until_expiry_then_dropped() {
        let ca = DevCa::new(td()).unwrap();
        let mut c = IdentityCache::new();
        let node = ca
            .issue_node_svid("node-a", Duration::from_secs(30))
            .unwrap();
        let expiry = node.not_after();
        c.apply(Update::Node {
            svids: vec![node],
            bundles: bundles(&[&ca]),
        });
        let now = SystemTime::now();
        assert!(c.snapshot(now).node.is_some());
        // No update arrives (stream gone); the clock alone decides.
        let deadline = c.next_deadline(now).unwrap();
        assert!(deadline > expiry && deadline <= expiry + Duration::from_secs(1));
        assert!(c.snapshot(expiry).node.is_some(), "notAfter is inclusive");
        assert!(c.snapshot(deadline).node.is_none());
        assert_eq!(c.next_deadline(deadline), None);
    }

    #[test]
    fn removals_and_unwatch_take_effect_at_once() {
        let ca = DevCa::new(td()).unwrap();
        let mut c = IdentityCache::new();
        c.apply(Update::Bundles(bundles(&[&ca])));
        for p in ["a", "b"] {
            let svid = ca
                .issue_workload_svid("shop", p, Duration::from_secs(60))
                .unwrap();
            c.apply(Update::Workload {
                selectors: pod(p),
                svids: vec![svid],
            });
        }
        assert_eq!(c.snapshot(SystemTime::now()).workloads.len(), 2);
        c.apply(Update::Workload {
            selectors: pod("a"),
            svids: vec![],
        });
        let s = c.snapshot(SystemTime::now());
        assert!(!s.workloads.contains_key(&pod("a")) && s.workloads.contains_key(&pod("b")));
        c.apply(Update::Unwatched(pod("b")));
        assert!(c.snapshot(SystemTime::now()).workloads.is_empty());
    }

    #[test]
    fn bundle_change_revalidates_held_svids() {
        let old = DevCa::new(td()).unwrap();
        let new = old.rotate().unwrap();
        let mut c = IdentityCache::new();
        c.apply(Update::Bundles(bundles(&[&old, &new])));
        let svid = old
            .issue_workload_svid("shop", "a", Duration::from_secs(60))
            .unwrap();
        c.apply(Update::Workload {
            selectors: pod("a"),
            svids: vec![svid],
        });
        assert_eq!(c.snapshot(SystemTime::now()).workloads.len(), 1);
        // Old root revoked while the old SVID is still held: it is no longer published.
        c.apply(Update::Bundles(bundles(&[&new])));
        assert!(c.snapshot(SystemTime::now()).workloads.is_empty());
    }

    #[test]
    fn delegated_bundles_win_over_workload_api_bundles() {
        let old = DevCa::new(td()).unwrap();
        let new = old.rotate().unwrap();
        let mut c = IdentityCache::new();
        let node = old
            .issue_node_svid("node-a", Duration::from_secs(60))
            .unwrap();
        // Workload API first: its bundles are used.
        c.apply(Update::Node {
            svids: vec![node.clone()],
            bundles: bundles(&[&old, &new]),
        });
        assert_eq!(
            c.snapshot(SystemTime::now())
                .bundles
                .get(&td())
                .unwrap()
                .len(),
            2
        );
        // The delegated stream says the old root is revoked: that holds…
        c.apply(Update::Bundles(bundles(&[&new])));
        let s = c.snapshot(SystemTime::now());
        assert_eq!(s.bundles.get(&td()).unwrap().len(), 1);
        assert!(s.node.is_none(), "svid of the revoked root refused");
        // …even when a late Workload API message still lists both roots.
        c.apply(Update::Node {
            svids: vec![node],
            bundles: bundles(&[&old, &new]),
        });
        let s = c.snapshot(SystemTime::now());
        assert_eq!(s.bundles.get(&td()).unwrap().len(), 1);
        assert!(s.node.is_none());
    }

    #[test]
    fn invalid_first_node_svid_is_not_replaced_by_another() {
        let ca = DevCa::new(td()).unwrap();
        let other = DevCa::new(TrustDomain::new("other.veil").unwrap()).unwrap();
        let mut c = IdentityCache::new();
        c.apply(Update::Node {
            svids: vec![
                other.issue_node_svid("x", Duration::from_secs(60)).unwrap(),
                ca.issue_node_svid("node-a", Duration::from_secs(60))
                    .unwrap(),
            ],
            bundles: bundles(&[&ca]),
        });
        assert!(c.snapshot(SystemTime::now()).node.is_none());
    }
}
