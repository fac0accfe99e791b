//! How failed node-handshake dials are logged (sans-IO: the caller passes the time and logs
//! what it is told).
//!
//! A failure is logged when it starts or changes, not at every redial: a thousand unreachable
//! peers would flood the log. A peer that cannot be reached (`peer-unreachable`: connection
//! refused, no route, timeout) is at first only noted at INFO: when agents start together, as
//! in a DaemonSet rollout or a lab, each finds some peers not listening yet, and a warning per
//! peer at every start would teach operators to ignore the warning. If it is still unreachable
//! [`UNREACHABLE_WARN_AFTER`] after its first failure, that is warned about once. Every other
//! failure (a refused identity, a TLS or protocol error) is warned about at once.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::auth::AuthFailure;

/// How long a peer may stay unreachable before it is warned about.
pub const UNREACHABLE_WARN_AFTER: Duration = Duration::from_secs(10);

/// What to log for one dial outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Log {
    /// A peer not reachable yet (INFO).
    NotReachableYet,
    /// A failure that started or changed, or one that has lasted too long (WARN).
    Failed,
    /// The same failure again (DEBUG).
    Again,
    /// The first success after failures (INFO, naming the last failure).
    Recovered(AuthFailure),
    /// Nothing: a success with no failure before it.
    Nothing,
}

#[derive(Debug, Clone, Copy)]
struct Failing {
    failure: AuthFailure,
    since: Instant,
    warned: bool,
}

/// Per peer node id: its current run of failures.
#[derive(Debug, Default)]
pub struct DialLog {
    failing: HashMap<u32, Failing>,
}

impl DialLog {
    pub fn on_failure(&mut self, id: u32, failure: AuthFailure, now: Instant) -> Log {
        let unreachable = failure == AuthFailure::PeerUnreachable;
        match self.failing.get_mut(&id) {
            Some(f) if f.failure == failure => {
                if !f.warned && now.saturating_duration_since(f.since) >= UNREACHABLE_WARN_AFTER {
                    f.warned = true;
                    Log::Failed
                } else {
                    Log::Again
                }
            }
            _ => {
                self.failing.insert(
                    id,
                    Failing {
                        failure,
                        since: now,
                        warned: !unreachable,
                    },
                );
                if unreachable {
                    Log::NotReachableYet
                } else {
                    Log::Failed
                }
            }
        }
    }

    pub fn on_success(&mut self, id: u32) -> Log {
        match self.failing.remove(&id) {
            Some(f) => Log::Recovered(f.failure),
            None => Log::Nothing,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreachable_peer_is_noted_then_warned_about_once_it_has_lasted() {
        let t0 = Instant::now();
        let mut log = DialLog::default();
        assert_eq!(
            log.on_failure(7, AuthFailure::PeerUnreachable, t0),
            Log::NotReachableYet
        );
        assert_eq!(
            log.on_failure(7, AuthFailure::PeerUnreachable, t0 + Duration::from_secs(3)),
            Log::Again
        );
        let late = t0 + UNREACHABLE_WARN_AFTER;
        assert_eq!(
            log.on_failure(7, AuthFailure::PeerUnreachable, late),
            Log::Failed
        );
        assert_eq!(
            log.on_failure(
                7,
                AuthFailure::PeerUnreachable,
                late + Duration::from_secs(30)
            ),
            Log::Again
        );
        // Another peer has its own run.
        assert_eq!(
            log.on_failure(8, AuthFailure::PeerUnreachable, late),
            Log::NotReachableYet
        );
        assert_eq!(
            log.on_success(7),
            Log::Recovered(AuthFailure::PeerUnreachable)
        );
        assert_eq!(log.on_success(7), Log::Nothing);
    }

    #[test]
    fn a_peer_reached_in_time_is_never_warned_about() {
        let t0 = Instant::now();
        let mut log = DialLog::default();
        assert_eq!(
            log.on_failure(2, AuthFailure::PeerUnreachable, t0),
            Log::NotReachableYet
        );
        assert_eq!(
            log.on_success(2),
            Log::Recovered(AuthFailure::PeerUnreachable)
        );
        // A later outage starts a new run: noted first again.
        let t1 = t0 + Duration::from_secs(60);
        assert_eq!(
            log.on_failure(2, AuthFailure::PeerUnreachable, t1),
            Log::NotReachableYet
        );
    }

    #[test]
    fn other_failures_are_warned_about_at_once_and_on_every_change() {
        let t0 = Instant::now();
        let mut log = DialLog::default();
        assert_eq!(
            log.on_failure(3, AuthFailure::WrongTrustDomain, t0),
            Log::Failed
        );
        assert_eq!(
            log.on_failure(
                3,
                AuthFailure::WrongTrustDomain,
                t0 + Duration::from_secs(20)
            ),
            Log::Again
        );
        // Unreachable after a refused identity: a change, but unreachable starts quietly.
        assert_eq!(
            log.on_failure(
                3,
                AuthFailure::PeerUnreachable,
                t0 + Duration::from_secs(21)
            ),
            Log::NotReachableYet
        );
        assert_eq!(
            log.on_failure(
                3,
                AuthFailure::WrongTrustDomain,
                t0 + Duration::from_secs(22)
            ),
            Log::Failed
        );
    }
}
