//! veil: the node agent, the CLI and the lab, in one binary.
//!
//! Owns: the agent daemon (datapath loading, cluster-state reconcile, admin API), the `veil`
//! command line, and the lab that builds a cluster out of network namespaces on one host.
//!
//! Must not depend on: a particular cluster-state source in the datapath or auth code (they see
//! only `cluster::ClusterState`); test-only crates outside `#[cfg(test)]`.

pub mod admin;
pub mod api;
pub mod auth;
pub mod check;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod datapath;
pub mod demo;
pub mod flows;
pub mod hold;
pub mod lab;
pub mod mesh;
pub mod policy;
pub mod sys;
pub mod tunnel;

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
