//! veil's benchmark harness: throughput, latency, CPU and idle cost of veil's userspace
//! transport side by side with plaintext and boringtun-cli on the same 2-node lab path, the TC
//! datapath cost (via `tc-cost` where built), and a placeholder for the control plane.
//!
//! Must not depend on: veil's crates. It drives the built binaries through the lab contract
//! (`veil lab up/show/exec/down`, `veil status -o json`), as any outside script would.

pub mod chart;
pub mod cleanup;
pub mod contender;
pub mod lab;
pub mod measure;
pub mod procs;
pub mod report;
pub mod rr;
pub mod setup;
pub mod sockets;
