//! veil's benchmark harness.
//!
//! Will own: throughput, latency, CPU, idle-cost, datapath and control-plane benchmarks that run
//! veil side by side with plaintext and boringtun-cli baselines and print a table.
//!
//! Must not depend on: anything but the built `veil` binaries and the lab contract.
