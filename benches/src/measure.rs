//! One measurement each: an iperf3 TCP run (with the tunnel processes' CPU time around it) and a
//! request/response latency run, client pod → server pod.

use std::path::Path;

use anyhow::Context as _;
use serde::Serialize;

use crate::{
    contender::{Ends, PathBytes},
    procs, rr,
};

pub const IPERF_PORT: u16 = 5201;
pub const RR_PORT: u16 = 7001;

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Throughput {
    pub streams: u32,
    pub gbit_per_s: f64,
    pub bytes: u64,
    pub retransmits: u64,
    /// CPU seconds of the tunnel processes (both ends) during the run; None for plaintext.
    pub tunnel_cpu_seconds: Option<f64>,
    /// tunnel_cpu_seconds per GB (1e9 bytes) of payload received.
    pub cpu_seconds_per_gb: Option<f64>,
    /// What the contender's own path counted meanwhile (its tunnel devices, or the underlay for
    /// plaintext): at least `bytes`, or the run is refused.
    #[serde(default)]
    pub path_bytes: PathBytes,
    /// UDP datagrams dropped for a full receive buffer in both node netns meanwhile.
    #[serde(default)]
    pub udp_rcvbuf_errors: u64,
    /// Packets the client node could not queue to the path's device meanwhile (for a TUN: not
    /// read by the tunnel process in time).
    #[serde(default)]
    pub device_tx_dropped: u64,
    /// Segments the server received out of order meanwhile.
    #[serde(default)]
    pub server_out_of_order: u64,
}

/// Starts the servers the measurements talk to in the server end (killed by cleanup/lab down).
pub fn start_servers(ends: &Ends<'_>, rr_bin: &Path) -> anyhow::Result<()> {
    let port = IPERF_PORT.to_string();
    ends.spawn_server(&["iperf3", "-s", "-p", &port])?;
    let rr = rr_bin.display().to_string();
    ends.spawn_server(&[&rr, "server", "--port", &RR_PORT.to_string()])?;
    Ok(())
}

/// `iperf3 -c server -P streams -t seconds -J`, with CPU time of `tunnel_pids` around it.
pub fn iperf(
    ends: &Ends<'_>,
    streams: u32,
    seconds: u32,
    tunnel_pids: &[u32],
) -> anyhow::Result<Throughput> {
    let server = ends.server_ip()?;
    let (p, t, port) = (
        streams.to_string(),
        seconds.to_string(),
        IPERF_PORT.to_string(),
    );
    let mut last_err = None;
    // iperf3's server takes one test at a time and may still be closing the previous one.
    for _ in 0..3 {
        let cpu0 = procs::cpu_seconds_sum(tunnel_pids)?;
        let out = ends.client_output(&[
            "iperf3", "-c", &server, "-p", &port, "-P", &p, "-t", &t, "-J",
        ]);
        let cpu1 = procs::cpu_seconds_sum(tunnel_pids)?;
        let out = match out {
            Ok(o) => o,
            Err(e) => {
                last_err = Some(e);
                // iperf3's server may still be closing the previous test: a pause, then again.
                std::thread::sleep(std::time::Duration::from_secs(1));
                continue;
            }
        };
        let v: serde_json::Value = serde_json::from_str(&out).context("iperf3 -J output")?;
        if let Some(e) = v.get("error") {
            anyhow::bail!("iperf3: {e}");
        }
        let end = &v["end"];
        let bps = end["sum_received"]["bits_per_second"]
            .as_f64()
            .context("iperf3: no end.sum_received.bits_per_second")?;
        let bytes = end["sum_received"]["bytes"].as_u64().unwrap_or(0);
        let retransmits = end["sum_sent"]["retransmits"].as_u64().unwrap_or(0);
        // No -O (omit): the sums cover the whole run, the same time the CPU was read over.
        let moved = bytes as f64;
        let cpu = (!tunnel_pids.is_empty()).then_some(cpu1 - cpu0);
        return Ok(Throughput {
            streams,
            gbit_per_s: bps / 1e9,
            bytes,
            retransmits,
            tunnel_cpu_seconds: cpu,
            cpu_seconds_per_gb: cpu.map(|c| c / (moved / 1e9)),
            path_bytes: PathBytes::default(),
            udp_rcvbuf_errors: 0,
            device_tx_dropped: 0,
            server_out_of_order: 0,
        });
    }
    Err(last_err.unwrap_or_else(|| anyhow::anyhow!("iperf3 failed")))
}

/// A request/response run of `size` bytes for `seconds`.
pub fn request_response(
    ends: &Ends<'_>,
    rr_bin: &Path,
    size: usize,
    seconds: f64,
) -> anyhow::Result<rr::RrResult> {
    let server = ends.server_ip()?;
    let out = ends.client_output(&[
        &rr_bin.display().to_string(),
        "client",
        "--connect",
        &format!("{server}:{RR_PORT}"),
        "--size",
        &size.to_string(),
        "--seconds",
        &seconds.to_string(),
    ])?;
    serde_json::from_str(out.trim()).context("veil-rr output")
}
