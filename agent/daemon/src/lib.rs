//! veil-daemon: the node agent, everything that runs on a node.
//!
//! Owns: datapath loading and its maps, the WireGuard tunnel (veil-wg or the kernel's), mutual
//! authentication, policy compilation, cluster-state reconcile through a [`cluster::ClusterSource`],
//! flows, the hold queue and the admin API.
//!
//! Must not depend on: the lab, the CLI or the demo. This is enforced by the crate graph: those
//! live in `veil-agent` (the `veil` binary), which depends on this crate, never the reverse; a
//! `use veil_agent::…` here does not compile (no such dependency, and cargo refuses the cycle).
//! Test-only crates stay outside `#[cfg(test)]`.

pub mod admin;
pub mod api;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod datapath;
pub mod flows;
pub mod hold;
pub mod l7;
pub mod mesh;
pub mod policy;
pub mod sys;
pub mod tunnel;

/// Whether a warning limited to one per `every` is due now (and, if so, records it): for a
/// condition that lasts, the first occurrence at WARN and the repeats at debug.
pub fn warning_due(
    last: &std::sync::Mutex<Option<std::time::Instant>>,
    every: std::time::Duration,
) -> bool {
    let mut last = last
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if last.is_some_and(|t| t.elapsed() < every) {
        return false;
    }
    *last = Some(std::time::Instant::now());
    true
}

/// An error with its whole `source()` chain, `a: b: c`, for logs and the CLI.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let msg = s.to_string();
        if !out.ends_with(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        cur = s.source();
    }
    out
}

#[cfg(test)]
mod warning_tests {
    #[test]
    fn a_limited_warning_is_due_once_per_period() {
        let last = std::sync::Mutex::new(None);
        let every = std::time::Duration::from_secs(60);
        assert!(super::warning_due(&last, every));
        assert!(!super::warning_due(&last, every));
        assert!(!super::warning_due(&last, every));
        // A period of zero has always passed.
        assert!(super::warning_due(&last, std::time::Duration::ZERO));
    }
}
