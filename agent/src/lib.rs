//! veil: the `veil` command line, the lab and the demo, around the node agent.
//!
//! Owns: the `veil` command line, the lab that builds a cluster out of network namespaces on one
//! host (a client of the agent, as kubectl is of a cluster), `veil check` and `veil demo`.
//!
//! The agent itself is the `veil-daemon` crate, re-exported here so `veil_agent::auth`,
//! `veil_agent::policy`, … keep one path for tests and tools. Dependencies point one way: this
//! crate uses the daemon; the daemon cannot name anything here.

pub use veil_daemon::*;

pub mod check;
pub mod cli;
pub mod cni;
pub mod demo;
pub mod lab;
pub mod sysdump;
