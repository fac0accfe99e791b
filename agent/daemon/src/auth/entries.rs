//! Auth-entry lifecycle (sans-IO): which (local identity, remote identity, remote node) triples
//! are authenticated, until when, and what to do next.
//!
//! Inputs: the desired set (triples current policy and placement make possible, so they are
//! pre-authenticated before the first packet), handshake outcomes (ours and the peers'),
//! revocations and deletions, and `now`. Outputs ([`Action`]): handshakes to start, entries to
//! write into / delete from the datapath's auth map. The shell sleeps until [`AuthTable::deadline`]
//! and calls [`AuthTable::poll`].
//!
//! Rules:
//! - a desired triple without an entry is authenticated at once by the node with the smaller
//!   id, after `defer_initial` by the other (so the pair usually runs one handshake, not two);
//! - an entry is re-authenticated at `refresh_fraction` of its lifetime (the deferring side at a
//!   later point), so it never lapses while SVIDs rotate;
//! - an entry is deleted at expiry, when an SVID it relied on is revoked or removed, and when
//!   its node or (through the desired set) its identity or policy goes away; entries the peer
//!   created for triples we do not desire are collected after `undesired_grace`;
//! - failures are retried with capped exponential backoff and kept as the last result.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;
use veil_identity::SpiffeId;

use super::workload::Authenticated;
use super::{AuthFailure, AuthTriple};

/// Lifecycle settings.
#[derive(Clone, Debug, PartialEq)]
pub struct EntriesConfig {
    /// Re-authenticate at this fraction of an entry's lifetime (preferred initiator).
    pub refresh_fraction: f64,
    /// The other side re-authenticates at this later fraction, only if the preferred side did
    /// not refresh the entry first.
    pub fallback_refresh_fraction: f64,
    /// The non-preferred side waits this long before authenticating a new desired triple.
    pub defer_initial: Duration,
    /// Entries the peer created for triples we do not desire live this long.
    pub undesired_grace: Duration,
    pub retry_min: Duration,
    pub retry_max: Duration,
}

impl Default for EntriesConfig {
    fn default() -> Self {
        Self {
            refresh_fraction: 2.0 / 3.0,
            fallback_refresh_fraction: 0.8,
            // Long enough for the preferred side's handshake (a few ms) to arrive first when
            // both sides want the pair, short enough that a pair only one side's policy needs
            // (an ingress rule on the other node) is ready right after `policy apply`.
            defer_initial: Duration::from_millis(25),
            undesired_grace: Duration::from_secs(10),
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(30),
        }
    }
}

/// What the shell must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Run a workload handshake for this triple (report with `on_authenticated`/`on_failed`).
    Start(AuthTriple),
    /// Write this entry into the auth map (`expires_at` → CLOCK_BOOTTIME via [`boot_ns_at`]).
    Write {
        triple: AuthTriple,
        expires_at: Instant,
        expires: SystemTime,
    },
    /// Delete this entry from the auth map.
    Delete(AuthTriple),
}

/// One authenticated entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub expires_at: Instant,
    pub expires: SystemTime,
    pub established_at: Instant,
    /// Wall-clock time of the handshake that wrote this entry.
    pub authenticated: SystemTime,
    pub local_spiffe_id: SpiffeId,
    pub remote_spiffe_id: SpiffeId,
}

/// A triple as `veil status` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TripleStatus {
    pub triple: AuthTriple,
    pub entry: Option<Entry>,
    pub is_desired: bool,
    pub is_in_flight: bool,
    pub last_result: Option<Result<(), AuthFailure>>,
    pub failures: u32,
}

/// What a query can ask of a triple without copying its entry out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TripleSummary {
    pub triple: AuthTriple,
    /// It holds an entry.
    pub is_authenticated: bool,
    /// Its last attempt failed.
    pub is_failing: bool,
}

#[derive(Debug, Default)]
struct State {
    /// Boxed: most triples of a large cluster have no entry (parked until their node's
    /// channel comes up), and an inline `Entry` more than doubled every slot of the table.
    entry: Option<Box<Entry>>,
    desired: bool,
    in_flight: bool,
    failures: u32,
    last_result: Option<Result<(), AuthFailure>>,
    next_attempt: Moment,
    collect_at: Moment,
    /// Where the triple is filed in `AuthTable::timers`.
    timer: Moment,
}

/// An optional instant in 8 bytes, where `Option<Instant>` takes 16: nanoseconds from a
/// process-wide origin, `i64::MIN` for none. A table of a large cluster holds a state for each
/// of some 150,000 triples, each with three of these: 6 MB less.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Moment(i64);

impl Default for Moment {
    fn default() -> Self {
        Self::NONE
    }
}

impl Moment {
    const NONE: Self = Self(i64::MIN);

    fn origin() -> Instant {
        static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        *ORIGIN.get_or_init(Instant::now)
    }

    /// Exact for any instant within 292 years of the origin (clamped beyond).
    fn at(at: Instant) -> Self {
        let origin = Self::origin();
        let nanos = |d: Duration| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX);
        Self(if at >= origin {
            nanos(at - origin)
        } else {
            // Never `i64::MIN`: that is none.
            -nanos(origin - at)
        })
    }

    fn get(self) -> Option<Instant> {
        if self == Self::NONE {
            return None;
        }
        let origin = Self::origin();
        let d = Duration::from_nanos(self.0.unsigned_abs());
        Some(if self.0 >= 0 {
            origin + d
        } else {
            origin.checked_sub(d).unwrap_or(origin)
        })
    }

    fn take(&mut self) -> Option<Instant> {
        std::mem::take(self).get()
    }
}

impl State {
    /// What a query sees of this triple.
    fn summary(&self, triple: AuthTriple) -> TripleSummary {
        TripleSummary {
            triple,
            is_authenticated: self.entry.is_some(),
            is_failing: matches!(self.last_result, Some(Err(_))),
        }
    }

    fn wake_at(&self) -> Option<Instant> {
        let attempt = if self.in_flight {
            None
        } else {
            self.next_attempt.get()
        };
        [
            attempt,
            self.entry.as_ref().map(|e| e.expires_at),
            self.collect_at.get(),
        ]
        .into_iter()
        .flatten()
        .min()
    }
}

/// The auth-entry table of one node.
#[derive(Debug)]
pub struct AuthTable {
    cfg: EntriesConfig,
    local_node: u32,
    states: HashMap<AuthTriple, State>,
    timers: BTreeSet<(Instant, AuthTriple)>,
    by_spiffe: HashMap<SpiffeId, HashSet<AuthTriple>>,
    by_node: HashMap<u32, HashSet<AuthTriple>>,
    /// When a SPIFFE ID was last revoked: `None` scope for our own workloads, `Some(node)` for
    /// a peer's. A handshake result that began before is discarded (results and revocations
    /// reach the shell on different queues).
    revoked: HashMap<(SpiffeId, Option<u32>), Instant>,
    actions: VecDeque<Action>,
}

/// Revocation records are kept this long: far longer than any handshake may take
/// (`ChannelConfig::request_timeout`) plus queueing.
const REVOCATION_MEMORY: Duration = Duration::from_secs(120);

impl AuthTable {
    pub fn new(cfg: EntriesConfig, local_node: u32) -> Self {
        Self {
            cfg,
            local_node,
            states: HashMap::new(),
            timers: BTreeSet::new(),
            by_spiffe: HashMap::new(),
            by_node: HashMap::new(),
            revoked: HashMap::new(),
            actions: VecDeque::new(),
        }
    }

    fn is_preferred(&self, t: &AuthTriple) -> bool {
        self.local_node < t.remote_node
    }

    fn state_mut(&mut self, t: AuthTriple) -> &mut State {
        if !self.states.contains_key(&t) {
            self.by_node.entry(t.remote_node).or_default().insert(t);
        }
        self.states.entry(t).or_default()
    }

    /// Re-files the triple's timer, or forgets the triple if nothing refers to it any more.
    fn settle(&mut self, t: AuthTriple) {
        let Some(s) = self.states.get_mut(&t) else {
            return;
        };
        if let Some(old) = s.timer.take() {
            self.timers.remove(&(old, t));
        }
        if s.entry.is_none() && !s.desired && !s.in_flight {
            self.states.remove(&t);
            if let Some(set) = self.by_node.get_mut(&t.remote_node) {
                set.remove(&t);
                if set.is_empty() {
                    self.by_node.remove(&t.remote_node);
                }
            }
            return;
        }
        if let Some(at) = s.wake_at() {
            s.timer = Moment::at(at);
            self.timers.insert((at, t));
        }
    }

    fn unindex_entry(&mut self, t: AuthTriple, e: &Entry) {
        for id in [&e.local_spiffe_id, &e.remote_spiffe_id] {
            if let Some(set) = self.by_spiffe.get_mut(id) {
                set.remove(&t);
                if set.is_empty() {
                    self.by_spiffe.remove(id);
                }
            }
        }
    }

    fn delete_entry(&mut self, t: AuthTriple) {
        let Some(s) = self.states.get_mut(&t) else {
            return;
        };
        s.collect_at = Moment::NONE;
        if let Some(e) = s.entry.take() {
            self.unindex_entry(t, &e);
            self.actions.push_back(Action::Delete(t));
        }
    }

    /// Replaces the desired set (policy or placement changed).
    pub fn set_desired(&mut self, desired: impl IntoIterator<Item = AuthTriple>, now: Instant) {
        let new: HashSet<AuthTriple> = desired.into_iter().collect();
        let old: Vec<AuthTriple> = self
            .states
            .iter()
            .filter(|(_, s)| s.desired)
            .map(|(t, _)| *t)
            .collect();
        for t in old {
            if new.contains(&t) {
                continue;
            }
            let grace = self.cfg.undesired_grace;
            let s = self.state_mut(t);
            s.desired = false;
            s.next_attempt = Moment::NONE;
            if let Some(e) = &s.entry {
                let collect = e.established_at + grace;
                if collect <= now {
                    self.delete_entry(t);
                } else {
                    s.collect_at = Moment::at(collect);
                }
            }
            self.settle(t);
        }
        for t in new {
            let preferred = self.is_preferred(&t);
            let defer = self.cfg.defer_initial;
            let frac = self.cfg.refresh_fraction;
            let s = self.state_mut(t);
            if s.desired {
                continue;
            }
            s.desired = true;
            s.collect_at = Moment::NONE;
            if s.entry.is_none() && !s.in_flight {
                s.next_attempt = Moment::at(if preferred { now } else { now + defer });
            } else if let Some(e) = &s.entry {
                s.next_attempt = Moment::at(refresh_at(e, frac));
            }
            self.settle(t);
        }
    }

    /// A flow missed its entry: authenticate now, whatever the deferral. Not while a full
    /// auth map holds the triple back: every packet of a refused flow would otherwise buy a
    /// handshake the map refuses again; the backoff's retry stands.
    pub fn request_now(&mut self, t: AuthTriple, now: Instant) {
        let s = self.state_mut(t);
        s.desired = true;
        s.collect_at = Moment::NONE;
        let map_full = s.last_result == Some(Err(AuthFailure::AuthMapFull))
            && s.next_attempt.get().is_some_and(|a| a > now);
        if s.entry.is_none() && !s.in_flight && !map_full {
            s.next_attempt = Moment::at(now);
        }
        self.settle(t);
    }

    /// The auth map refused the entry this table asked to write (it is full): the table
    /// forgets the entry, so nothing here claims the pair admitted, and a desired triple is
    /// retried with backoff like a failed handshake.
    pub fn on_write_failed(&mut self, t: AuthTriple, now: Instant, jitter: f64) {
        self.delete_entry(t);
        self.on_failed(t, AuthFailure::AuthMapFull, now, jitter);
    }

    /// A local workload's SVID rotated: re-authenticate its live pairs now (also those only the
    /// peer's policy wants: the peer learns the new SVID at once), so the entries take the new
    /// SVID's lifetime at once instead of at the refresh point.
    pub fn refresh_local_identity(&mut self, identity: u32, now: Instant) {
        let due: Vec<AuthTriple> = self
            .states
            .iter()
            .filter(|(t, s)| t.local_identity == identity && s.entry.is_some() && !s.in_flight)
            .map(|(t, _)| *t)
            .collect();
        for t in due {
            self.state_mut(t).next_attempt = Moment::at(now);
            self.settle(t);
        }
    }

    /// Whether `id` (ours if `node` is `None`, else node `node`'s) was revoked at or after
    /// `since`.
    fn revoked_since(&self, id: &SpiffeId, node: Option<u32>, since: Instant) -> bool {
        self.revoked
            .get(&(id.clone(), node))
            .is_some_and(|at| *at >= since)
    }

    /// A workload handshake that began at `started` succeeded (ours as initiator, or the
    /// peer's with us responding). If either SVID it proved was revoked since `started`, the
    /// result is discarded as [`AuthFailure::Revoked`]: ordering by when the handshake began,
    /// not by when its result arrives, so a revocation always wins.
    pub fn on_authenticated(
        &mut self,
        a: &Authenticated,
        started: Instant,
        now: Instant,
        now_system: SystemTime,
    ) {
        let t = a.triple;
        if self.revoked_since(&a.local_spiffe_id, None, started)
            || self.revoked_since(&a.remote_spiffe_id, Some(t.remote_node), started)
        {
            self.on_failed(t, AuthFailure::Revoked, now, 0.0);
            return;
        }
        let Ok(lifetime) = a.expires.duration_since(now_system) else {
            // Already expired: nothing to admit.
            self.on_failed(t, AuthFailure::ExpiredSvid, now, 0.0);
            return;
        };
        let preferred = self.is_preferred(&t);
        let (frac, fallback, grace) = (
            self.cfg.refresh_fraction,
            self.cfg.fallback_refresh_fraction,
            self.cfg.undesired_grace,
        );
        let entry = Entry {
            expires_at: now + lifetime,
            expires: a.expires,
            established_at: now,
            authenticated: now_system,
            local_spiffe_id: a.local_spiffe_id.clone(),
            remote_spiffe_id: a.remote_spiffe_id.clone(),
        };
        let s = self.state_mut(t);
        let old = s.entry.replace(Box::new(entry.clone()));
        s.in_flight = false;
        s.failures = 0;
        s.last_result = Some(Ok(()));
        if s.desired {
            s.collect_at = Moment::NONE;
            s.next_attempt =
                Moment::at(refresh_at(&entry, if preferred { frac } else { fallback }));
        } else {
            s.next_attempt = Moment::NONE;
            s.collect_at = Moment::at(now + grace);
        }
        if let Some(old) = old {
            self.unindex_entry(t, &old);
        }
        for id in [&entry.local_spiffe_id, &entry.remote_spiffe_id] {
            self.by_spiffe.entry(id.clone()).or_default().insert(t);
        }
        self.actions.push_back(Action::Write {
            triple: t,
            expires_at: entry.expires_at,
            expires: entry.expires,
        });
        self.settle(t);
    }

    /// A handshake we started failed. The entry (if any) stays until it expires: it was
    /// valid and nothing revoked it. `jitter` in [0, 1) spreads retries.
    pub fn on_failed(&mut self, t: AuthTriple, reason: AuthFailure, now: Instant, jitter: f64) {
        let retry = veil_common::backoff::Backoff::new(self.cfg.retry_min, self.cfg.retry_max);
        let s = self.state_mut(t);
        s.in_flight = false;
        s.last_result = Some(Err(reason));
        let exp = s.failures;
        s.failures = s.failures.saturating_add(1);
        if s.desired {
            // Spread above the base ([d, 1.5d], not the reconnect loops' [d/2, d]): a retry
            // never comes earlier than the policy's minimum.
            let base = retry.delay(exp);
            s.next_attempt = Moment::at(now + base.mul_f64(1.0 + jitter.clamp(0.0, 1.0) * 0.5));
        }
        self.settle(t);
    }

    /// A workload SVID (local or remote) was revoked or removed: every entry that relied on it
    /// goes now; desired triples are re-authenticated (with a new SVID, if any) after the
    /// retry delay.
    pub fn remove_spiffe_id(&mut self, id: &SpiffeId, now: Instant) {
        self.revoked.insert((id.clone(), None), now);
        self.remove_spiffe_id_where(id, now, |_| true);
    }

    /// A peer node told us (`ChannelEvent::RemoteRevoked`) that one of *its* workloads' SVIDs
    /// went away: only entries with that node are affected, so a node cannot revoke what
    /// another node vouched for.
    pub fn remove_remote_spiffe_id(&mut self, node: u32, id: &SpiffeId, now: Instant) {
        self.revoked.insert((id.clone(), Some(node)), now);
        self.remove_spiffe_id_where(id, now, |t| t.remote_node == node);
    }

    fn remove_spiffe_id_where(
        &mut self,
        id: &SpiffeId,
        now: Instant,
        keep: impl Fn(&AuthTriple) -> bool,
    ) {
        let triples: Vec<AuthTriple> = self
            .by_spiffe
            .get(id)
            .map(|s| s.iter().copied().filter(|t| keep(t)).collect())
            .unwrap_or_default();
        let retry = self.cfg.retry_min;
        for t in triples {
            self.delete_entry(t);
            let s = self.state_mut(t);
            if s.desired && !s.in_flight {
                s.next_attempt = Moment::at(now + retry);
            }
            self.settle(t);
        }
    }

    /// A node left the cluster: forget everything about it.
    pub fn remove_node(&mut self, node: u32) {
        self.forget(indexed(self.by_node.get(&node)));
    }

    fn forget(&mut self, triples: Vec<AuthTriple>) {
        for t in triples {
            self.delete_entry(t);
            let s = self.state_mut(t);
            s.desired = false;
            s.in_flight = false;
            s.next_attempt = Moment::NONE;
            self.settle(t);
        }
    }

    /// When [`Self::poll`] has something to do next.
    pub fn deadline(&self) -> Option<Instant> {
        if !self.actions.is_empty() {
            return Some(Instant::now());
        }
        self.timers.first().map(|(at, _)| *at)
    }

    /// Runs what is due at `now` and drains the actions.
    pub fn poll(&mut self, now: Instant) -> Vec<Action> {
        if let Some(horizon) = now.checked_sub(REVOCATION_MEMORY) {
            self.revoked.retain(|_, at| *at > horizon);
        }
        while let Some(&(at, t)) = self.timers.first() {
            if at > now {
                break;
            }
            self.timers.remove(&(at, t));
            let Some(s) = self.states.get_mut(&t) else {
                continue;
            };
            s.timer = Moment::NONE;
            if s.entry.as_ref().is_some_and(|e| e.expires_at <= now) {
                self.delete_entry(t);
                let s = self.states.get_mut(&t).expect("state exists");
                if s.desired && !s.in_flight && s.next_attempt.get().is_none() {
                    s.next_attempt = Moment::at(now);
                }
            }
            let s = self.states.get_mut(&t).expect("state exists");
            if s.collect_at.get().is_some_and(|c| c <= now) && !s.desired {
                self.delete_entry(t);
            }
            let s = self.states.get_mut(&t).expect("state exists");
            if !s.in_flight && s.next_attempt.get().is_some_and(|a| a <= now) {
                // A due attempt is consumed either way, so a timer never fires twice for it.
                s.next_attempt = Moment::NONE;
                // Desired triples, and live entries asked to refresh (a local SVID rotated).
                if s.desired || s.entry.is_some() {
                    s.in_flight = true;
                    self.actions.push_back(Action::Start(t));
                }
            }
            self.settle(t);
        }
        // Taken, not drained: a policy that makes a hundred thousand triples desired queues as
        // many actions once, and a drained queue would keep that capacity for good.
        Vec::from(std::mem::take(&mut self.actions))
    }

    pub fn status(&self, t: &AuthTriple) -> Option<TripleStatus> {
        self.states.get(t).map(|s| TripleStatus {
            triple: *t,
            entry: s.entry.as_deref().cloned(),
            is_desired: s.desired,
            is_in_flight: s.in_flight,
            last_result: s.last_result,
            failures: s.failures,
        })
    }

    /// The first `limit` known triples in triple order (a bounded heap: the cost grows with
    /// the table, not with its sort).
    pub fn first_statuses(&self, limit: usize) -> Vec<TripleStatus> {
        self.select_statuses(limit, |_| true).1
    }

    /// How many known triples `keep` accepts, and the first `limit` of them in triple order.
    /// `keep` sees each triple's [`TripleSummary`], so only the listed ones are copied out
    /// with their entries, and only the accepted ones go through the bounded heap.
    pub fn select_statuses(
        &self,
        limit: usize,
        keep: impl Fn(&TripleSummary) -> bool,
    ) -> (usize, Vec<TripleStatus>) {
        let mut heap = std::collections::BinaryHeap::new();
        let mut accepted = 0;
        for (t, s) in &self.states {
            if !keep(&s.summary(*t)) {
                continue;
            }
            accepted += 1;
            heap.push(*t);
            if heap.len() > limit {
                heap.pop();
            }
        }
        let mut v: Vec<_> = heap.iter().filter_map(|t| self.status(t)).collect();
        v.sort_by_key(|s| s.triple);
        (accepted, v)
    }

    /// How many triples are known, authenticated, failing (last attempt failed) and desired.
    pub fn counts(&self) -> crate::api::AuthPairCounts {
        let mut c = crate::api::AuthPairCounts {
            total: self.known(),
            ..Default::default()
        };
        for (t, s) in &self.states {
            let summary = s.summary(*t);
            c.authenticated += usize::from(summary.is_authenticated);
            c.failing += usize::from(summary.is_failing);
            c.desired += usize::from(s.desired);
        }
        c
    }

    /// A handshake could not start: no control channel to the triple's node. It fails without
    /// a retry timer; [`Self::retry_node`] starts it again when a channel to that node comes
    /// up (its entry, if any, stays until it expires, as after any failure).
    pub fn park_unreachable(&mut self, t: AuthTriple) {
        let s = self.state_mut(t);
        s.in_flight = false;
        s.last_result = Some(Err(AuthFailure::PeerUnreachable));
        s.failures = s.failures.saturating_add(1);
        s.next_attempt = Moment::NONE;
        self.settle(t);
    }

    /// A control channel to `node` came up: its desired triples parked by
    /// [`Self::park_unreachable`] are attempted now.
    pub fn retry_node(&mut self, node: u32, now: Instant) {
        for t in indexed(self.by_node.get(&node)) {
            let s = self.state_mut(t);
            if s.desired && !s.in_flight && s.failures > 0 && s.next_attempt.get().is_none() {
                s.next_attempt = Moment::at(now);
            }
            self.settle(t);
        }
    }

    /// A local workload has an SVID again (it had none: not issued yet, withdrawn as outside
    /// its validity by this host's clock, or its spire-agent was away): its desired triples
    /// that failed without an entry are attempted now, not at the end of their backoff.
    pub fn retry_local_identity(&mut self, identity: u32, now: Instant) {
        let due: Vec<AuthTriple> = self
            .states
            .iter()
            .filter(|(t, s)| {
                t.local_identity == identity
                    && s.desired
                    && s.entry.is_none()
                    && !s.in_flight
                    && s.failures > 0
            })
            .map(|(t, _)| *t)
            .collect();
        for t in due {
            self.state_mut(t).next_attempt = Moment::at(now);
            self.settle(t);
        }
    }

    /// Triples known: authenticated, wanted, in flight or remembered for a failure.
    pub fn known(&self) -> usize {
        self.states.len()
    }

    /// Entries currently authenticated.
    pub fn len(&self) -> usize {
        self.states.values().filter(|s| s.entry.is_some()).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The triples an index (`by_node`) holds under one key, copied out so the
/// table can change.
fn indexed(set: Option<&HashSet<AuthTriple>>) -> Vec<AuthTriple> {
    set.map(|s| s.iter().copied().collect()).unwrap_or_default()
}

fn refresh_at(e: &Entry, fraction: f64) -> Instant {
    let life = e.expires_at.saturating_duration_since(e.established_at);
    e.established_at + life.mul_f64(fraction.clamp(0.0, 1.0))
}

/// The CLOCK_BOOTTIME nanoseconds the datapath compares against, now.
pub fn boot_time_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec we pass; CLOCK_BOOTTIME exists on every
    // kernel veil supports.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// The boot-clock time of `at`, given the boot clock `boot_now_ns` read at `now`.
pub fn boot_ns_at(at: Instant, now: Instant, boot_now_ns: u64) -> u64 {
    if at >= now {
        boot_now_ns.saturating_add(at.duration_since(now).as_nanos() as u64)
    } else {
        boot_now_ns.saturating_sub(now.duration_since(at).as_nanos() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A large cluster parks most of its triples without an entry: a slot of the table stays
    /// small (56 bytes; the entry, two SPIFFE IDs and four times, is boxed: inline, a slot
    /// was more than twice that; with `Option<Instant>` times, 80).
    #[test]
    fn a_triple_without_an_entry_takes_a_small_slot() {
        let slot = std::mem::size_of::<(AuthTriple, State)>();
        assert!(slot <= 56, "a table slot is {slot} bytes");
    }

    /// A time kept in a state reads back as the same instant, before the origin and after it,
    /// and none stays none.
    #[tokio::test(start_paused = true)]
    async fn a_moment_keeps_its_instant_exactly() {
        let origin = Moment::origin();
        for at in [
            origin,
            origin + Duration::from_nanos(1),
            origin + Duration::from_secs(86_400 * 365 * 50) + Duration::from_nanos(7),
            origin - Duration::from_nanos(3),
        ] {
            assert_eq!(Moment::at(at).get(), Some(at));
        }
        assert_eq!(Moment::NONE.get(), None);
        assert_eq!(Moment::default().get(), None);
        let mut m = Moment::at(origin);
        assert_eq!(m.take(), Some(origin));
        assert_eq!(m.get(), None, "taken");
    }

    /// Ten thousand triples made desired at once queue as many actions: once polled,
    /// the table keeps none of that queue's memory.
    #[tokio::test(start_paused = true)]
    async fn a_burst_of_actions_leaves_no_queue_behind() {
        let mut table = AuthTable::new(EntriesConfig::default(), A);
        table.set_desired((0..10_000).map(|i| t(300, 1_000 + i, B + 1)), now());
        assert_eq!(table.poll(now()).len(), 10_000);
        assert_eq!(table.actions.capacity(), 0);
    }
    use tokio::time::advance;

    const A: u32 = 1;
    const B: u32 = 2;

    fn t(l: u32, r: u32, n: u32) -> AuthTriple {
        AuthTriple {
            local_identity: l,
            remote_identity: r,
            remote_node: n,
        }
    }

    fn sid(s: &str) -> SpiffeId {
        SpiffeId::parse(&format!("spiffe://lab.veil/ns/shop/sa/{s}")).unwrap()
    }

    fn auth(tr: AuthTriple, ttl: Duration) -> Authenticated {
        Authenticated {
            triple: tr,
            local_spiffe_id: sid(&format!("l{}", tr.local_identity)),
            remote_spiffe_id: sid(&format!("r{}", tr.remote_identity)),
            expires: sys0() + ttl,
        }
    }

    /// Sleeps (paused time) to the table's deadline and polls; returns the actions.
    async fn step(table: &mut AuthTable) -> Vec<Action> {
        if let Some(d) = table.deadline() {
            tokio::time::sleep_until(d).await;
        }
        table.poll(Instant::now())
    }

    fn now() -> Instant {
        Instant::now()
    }

    /// A fixed wall clock: lifetimes are then exact, whatever the paused tokio clock says.
    fn sys0() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    }

    /// A full auth map refused a desired triple's entry: the table forgets it (the status shows
    /// no entry and `auth-map-full`), flow misses do not buy handshakes during the backoff, and
    /// the backoff's retry comes. Seen failing with `request_now` ignoring the backoff.
    #[tokio::test(start_paused = true)]
    async fn an_entry_the_map_refused_is_forgotten_and_retried_with_backoff() {
        let mut table = AuthTable::new(EntriesConfig::default(), A);
        let tr = t(300, 301, B);
        table.set_desired([tr], now());
        assert_eq!(table.poll(now()), [Action::Start(tr)]);
        table.on_authenticated(&auth(tr, Duration::from_secs(60)), now(), now(), sys0());
        assert!(matches!(
            table.poll(now()).as_slice(),
            [Action::Write { .. }]
        ));
        table.on_write_failed(tr, now(), 0.0);
        let st = table.status(&tr).unwrap();
        assert_eq!(st.entry, None);
        assert_eq!(st.last_result, Some(Err(AuthFailure::AuthMapFull)));
        assert_eq!(table.poll(now()), [Action::Delete(tr)]);
        assert_eq!(table.counts().authenticated, 0);
        // Misses of the refused flow during the backoff start nothing.
        for _ in 0..5 {
            table.request_now(tr, now());
            assert_eq!(table.poll(now()), []);
        }
        let t0 = now();
        assert_eq!(step(&mut table).await, [Action::Start(tr)]);
        assert_eq!(now() - t0, EntriesConfig::default().retry_min);
    }

    #[tokio::test(start_paused = true)]
    async fn a_local_svid_back_retries_its_failed_triples_at_once() {
        let mut table = AuthTable::new(EntriesConfig::default(), A);
        let (tr, other) = (t(300, 301, B), t(302, 301, B));
        table.set_desired([tr, other], now());
        assert_eq!(table.poll(now()).len(), 2);
        for _ in 0..4 {
            for x in [tr, other] {
                table.on_failed(x, AuthFailure::NoLocalSvid, now(), 0.0);
            }
            advance(Duration::from_secs(60)).await;
            assert_eq!(table.poll(now()).len(), 2);
        }
        for x in [tr, other] {
            table.on_failed(x, AuthFailure::NoLocalSvid, now(), 0.0);
        }
        // Backing off: nothing due now...
        assert_eq!(table.poll(now()), []);
        // ...until identity 300 has its SVID again: its triple starts at once, 302's waits.
        table.retry_local_identity(300, now());
        assert_eq!(table.poll(now()), [Action::Start(tr)]);
        assert_eq!(table.poll(now()), []);
    }

    #[tokio::test(start_paused = true)]
    async fn desired_triples_are_pre_authenticated_then_refreshed_before_expiry() {
        let mut table = AuthTable::new(EntriesConfig::default(), A);
        let tr = t(300, 301, B);
        table.set_desired([tr], now());
        assert_eq!(
            table.poll(now()),
            [Action::Start(tr)],
            "preferred side starts at once"
        );
        assert_eq!(table.poll(now()), [], "only once while in flight");
        let ttl = Duration::from_secs(30);
        table.on_authenticated(&auth(tr, ttl), now(), now(), sys0());
        let acts = table.poll(now());
        assert!(matches!(acts.as_slice(), [Action::Write { triple, .. }] if *triple == tr));
        let t0 = now();
        let acts = step(&mut table).await;
        assert_eq!(acts, [Action::Start(tr)]);
        assert_eq!(
            now() - t0,
            Duration::from_secs(20),
            "at 2/3 of the lifetime"
        );
        // The refresh succeeds with a rotated SVID: new write, no delete, no gap.
        table.on_authenticated(&auth(tr, ttl), now(), now(), sys0());
        let acts = table.poll(now());
        assert!(matches!(acts.as_slice(), [Action::Write { .. }]));
        assert_eq!(table.status(&tr).unwrap().last_result, Some(Ok(())));
        // A local SVID rotation re-authenticates at once; other identities' pairs wait.
        let other = t(302, 301, B);
        table.set_desired([tr, other], now());
        let _ = table.poll(now());
        table.on_authenticated(&auth(other, ttl), now(), now(), sys0());
        let _ = table.poll(now());
        tokio::time::advance(Duration::from_secs(1)).await;
        table.refresh_local_identity(300, now());
        assert_eq!(table.poll(now()), [Action::Start(tr)]);
        // An entry only the peer wants (inbound, undesired here) refreshes too, once.
        let inbound = t(303, 301, B);
        table.on_authenticated(&auth(inbound, ttl), now(), now(), sys0());
        let _ = table.poll(now());
        table.refresh_local_identity(303, now());
        assert_eq!(table.poll(now()), [Action::Start(inbound)]);
        assert_eq!(table.poll(now()), []);
    }

    #[tokio::test(start_paused = true)]
    async fn a_triple_without_a_channel_waits_for_one_instead_of_a_timer() {
        let mut table = AuthTable::new(EntriesConfig::default(), A);
        let (tr, other) = (t(300, 301, B), t(300, 301, 3));
        table.set_desired([tr, other], now());
        assert_eq!(table.poll(now()).len(), 2);
        table.park_unreachable(tr);
        table.on_failed(other, AuthFailure::Timeout, now(), 0.0);
        let st = table.status(&tr).unwrap();
        assert_eq!(st.last_result, Some(Err(AuthFailure::PeerUnreachable)));
        assert_eq!(table.counts().failing, 2);
        // Only the timed-out triple has a retry timer; the parked one never fires...
        assert_eq!(step(&mut table).await, [Action::Start(other)]);
        advance(Duration::from_secs(3600)).await;
        assert_eq!(table.poll(now()), []);
        // ...until its node has a channel; another node's channel does not start it.
        table.retry_node(3, now());
        assert_eq!(table.poll(now()), []);
        table.retry_node(B, now());
        assert_eq!(table.poll(now()), [Action::Start(tr)]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_other_side_defers_and_refreshes_later() {
        let mut table = AuthTable::new(EntriesConfig::default(), B);
        let tr = t(301, 300, A);
        table.set_desired([tr], now());
        assert_eq!(table.poll(now()), []);
        let t0 = now();
        assert_eq!(step(&mut table).await, [Action::Start(tr)]);
        assert_eq!(now() - t0, Duration::from_millis(25));
        // The peer authenticated meanwhile (inbound): our refresh moves to 80 %.
        table.on_authenticated(&auth(tr, Duration::from_secs(100)), now(), now(), sys0());
        table.poll(now());
        let t1 = now();
        assert_eq!(step(&mut table).await, [Action::Start(tr)]);
        assert_eq!(now() - t1, Duration::from_secs(80));
        // A flow miss does not wait for the deferral.
        let tr2 = t(301, 302, A);
        table.set_desired([tr, tr2], now());
        table.request_now(tr2, now());
        assert_eq!(table.poll(now()), [Action::Start(tr2)]);
    }

    #[tokio::test(start_paused = true)]
    async fn entries_are_deleted_at_expiry_if_not_refreshed() {
        let mut table = AuthTable::new(EntriesConfig::default(), A);
        let tr = t(300, 301, B);
        // An inbound entry we do not desire: collected after the grace period...
        table.on_authenticated(&auth(tr, Duration::from_secs(5)), now(), now(), sys0());
        table.poll(now());
        let t0 = now();
        assert_eq!(step(&mut table).await, [Action::Delete(tr)]);
        assert_eq!(
            now() - t0,
            Duration::from_secs(5),
            "...or at expiry, whichever is first"
        );
        assert!(table.status(&tr).is_none(), "nothing left behind");
        // A desired entry whose refresh keeps failing is deleted at expiry and retried.
        table.set_desired([tr], now());
        assert_eq!(table.poll(now()), [Action::Start(tr)]);
        table.on_authenticated(&auth(tr, Duration::from_millis(8500)), now(), now(), sys0());
        table.poll(now());
        assert_eq!(step(&mut table).await, [Action::Start(tr)]);
        table.on_failed(tr, AuthFailure::PeerUnreachable, now(), 0.0);
        let t1 = now();
        let acts = step(&mut table).await;
        assert_eq!(acts, [Action::Start(tr)], "retry after 1 s");
        assert_eq!(now() - t1, Duration::from_secs(1));
        table.on_failed(tr, AuthFailure::PeerUnreachable, now(), 0.0);
        let acts = step(&mut table).await;
        assert_eq!(
            acts,
            [Action::Delete(tr)],
            "expiry comes before the 2 s retry"
        );
        assert_eq!(
            step(&mut table).await,
            [Action::Start(tr)],
            "then the retry"
        );
        table.on_failed(tr, AuthFailure::PeerUnreachable, now(), 0.0);
        let st = table.status(&tr).unwrap();
        assert_eq!(st.last_result, Some(Err(AuthFailure::PeerUnreachable)));
        assert_eq!(st.failures, 3);
        assert!(st.entry.is_none());
    }

    /// Security issue §6: a handshake in flight when an SVID it proves is revoked must not
    /// write an entry after the revocation (results and revocations arrive on two queues).
    #[tokio::test(start_paused = true)]
    async fn a_late_result_never_undoes_a_revocation() {
        let mut table = AuthTable::new(EntriesConfig::default(), A);
        let tr = t(300, 301, B);
        let hour = Duration::from_secs(3600);
        table.set_desired([tr], now());
        assert_eq!(table.poll(now()), [Action::Start(tr)]);
        let started = now();
        advance(Duration::from_millis(10)).await;
        // Our workload's SVID is revoked while the handshake is in flight; its result
        // arrives afterwards.
        table.remove_spiffe_id(&sid("l300"), now());
        advance(Duration::from_millis(10)).await;
        table.on_authenticated(&auth(tr, hour), started, now(), sys0());
        assert!(
            !table
                .poll(now())
                .iter()
                .any(|a| matches!(a, Action::Write { .. })),
            "a result that began before the revocation wrote an entry"
        );
        let st = table.status(&tr).unwrap();
        assert!(st.entry.is_none());
        assert_eq!(st.last_result, Some(Err(AuthFailure::Revoked)));
        // The same for a peer's revocation, scoped to that peer.
        let started = now();
        advance(Duration::from_millis(10)).await;
        table.remove_remote_spiffe_id(B, &sid("r301"), now());
        table.on_authenticated(&auth(tr, hour), started, now(), sys0());
        assert!(table.status(&tr).unwrap().entry.is_none());
        // A handshake that began after the revocation (with a new SVID) is admitted.
        advance(Duration::from_millis(10)).await;
        table.on_authenticated(&auth(tr, hour), now(), now(), sys0());
        assert!(table.status(&tr).unwrap().entry.is_some());
        // Another node's revocation of the same ID does not touch this node's pair.
        let started = now();
        table.remove_remote_spiffe_id(3, &sid("r301"), now());
        table.on_authenticated(&auth(tr, hour), started, now(), sys0());
        assert_eq!(table.status(&tr).unwrap().last_result, Some(Ok(())));
    }

    #[tokio::test(start_paused = true)]
    async fn revocation_deletes_entries_at_once() {
        let mut table = AuthTable::new(EntriesConfig::default(), A);
        let tr1 = t(300, 301, B);
        let tr2 = t(300, 302, B);
        let tr3 = t(303, 301, B);
        table.set_desired([tr1, tr2, tr3], now());
        table.poll(now());
        let hour = Duration::from_secs(3600);
        for tr in [tr1, tr2, tr3] {
            table.on_authenticated(&auth(tr, hour), now(), now(), sys0());
        }
        table.poll(now());
        advance(Duration::from_millis(10)).await;
        // l300's SVID is revoked: both of its entries go in the same poll, well within 5 s.
        table.remove_spiffe_id(&sid("l300"), now());
        let mut acts = table.poll(now());
        acts.sort_by_key(|a| format!("{a:?}"));
        assert_eq!(acts, [Action::Delete(tr1), Action::Delete(tr2)]);
        assert!(table.status(&tr3).unwrap().entry.is_some());
        // The remote side's revocation (told over the channel) works the same way, but only
        // for entries with the node that told us.
        table.remove_remote_spiffe_id(3, &sid("r301"), now());
        assert_eq!(table.poll(now()), []);
        table.remove_remote_spiffe_id(B, &sid("r301"), now());
        assert_eq!(table.poll(now()), [Action::Delete(tr3)]);
        // They are retried (a rotated SVID would succeed; a revoked one keeps failing).
        let acts = step(&mut table).await;
        assert_eq!(acts.len(), 3);
        assert!(acts.iter().all(|a| matches!(a, Action::Start(_))));
    }

    #[tokio::test(start_paused = true)]
    async fn node_and_policy_deletion_collect_entries() {
        let mut table = AuthTable::new(EntriesConfig::default(), A);
        let hour = Duration::from_secs(3600);
        let (tr1, tr2, tr3) = (t(300, 301, B), t(300, 301, 3), t(304, 305, 3));
        table.set_desired([tr1, tr2, tr3], now());
        table.poll(now());
        for tr in [tr1, tr2, tr3] {
            table.on_authenticated(&auth(tr, hour), now(), now(), sys0());
        }
        table.poll(now());
        assert_eq!(table.len(), 3);
        table.remove_node(3);
        let mut acts = table.poll(now());
        acts.sort_by_key(|a| format!("{a:?}"));
        assert_eq!(acts, [Action::Delete(tr2), Action::Delete(tr3)]);
        assert!(table.status(&tr3).is_none());

        table.set_desired([tr1, tr3], now());
        table.poll(now());
        table.on_authenticated(&auth(tr3, hour), now(), now(), sys0());
        table.poll(now());

        // Policy deletion (or an identity gone): tr1 and tr3 leave the desired set. Just
        // established → collected after the grace period; an older one would go at once.
        table.set_desired([], now());
        assert_eq!(table.poll(now()), []);
        let t0 = now();
        let mut acts = step(&mut table).await;
        acts.sort_by_key(|a| format!("{a:?}"));
        assert_eq!(acts, [Action::Delete(tr1), Action::Delete(tr3)]);
        assert_eq!(now() - t0, Duration::from_secs(10));
        assert!(table.is_empty());
        assert_eq!(table.known(), 0);
        assert_eq!(table.deadline(), None, "idle: no timers left");
    }

    #[tokio::test(start_paused = true)]
    async fn results_for_undesired_triples_are_collected_and_late_failures_ignored() {
        let mut table = AuthTable::new(EntriesConfig::default(), A);
        let tr = t(300, 301, B);
        table.set_desired([tr], now());
        assert_eq!(table.poll(now()), [Action::Start(tr)]);
        // Policy removed while the handshake was in flight; the result still arrives.
        advance(Duration::from_secs(60)).await;
        table.set_desired([], now());
        table.on_authenticated(&auth(tr, Duration::from_secs(3600)), now(), now(), sys0());
        assert!(matches!(
            table.poll(now()).as_slice(),
            [Action::Write { .. }]
        ));
        assert_eq!(step(&mut table).await, [Action::Delete(tr)]);
        // An already-expired result writes nothing.
        let mut a = auth(tr, Duration::from_secs(1));
        a.expires = sys0() - Duration::from_secs(1);
        table.set_desired([tr], now());
        table.poll(now());
        table.on_authenticated(&a, now(), now(), sys0());
        assert_eq!(table.poll(now()), []);
        assert_eq!(
            table.status(&tr).unwrap().last_result,
            Some(Err(AuthFailure::ExpiredSvid))
        );
    }

    #[test]
    fn boot_clock_conversion() {
        let now = Instant::now();
        assert_eq!(
            boot_ns_at(now + Duration::from_secs(2), now, 10),
            2_000_000_010
        );
        assert_eq!(boot_ns_at(now, now + Duration::from_nanos(5), 10), 5);
        assert_eq!(boot_ns_at(now, now + Duration::from_secs(5), 10), 0);
        let a = boot_time_ns();
        let b = boot_time_ns();
        assert!(a > 0 && b >= a);
    }
}
