//! `l7-bench`: HTTP through the node's L7 proxy against the same HTTP with L4 policy only, on a
//! real lab (files control plane, dev identities): `client` on node-a, `server` (the lab's HTTP
//! server) on node-b. Interleaved rounds of two policies on `client`'s egress to server:8080:
//! - `l4`: an allow rule without HTTP rules (the datapath alone decides);
//! - `l7`: the same rule with `rules.http` (`GET /api/.*`): every request goes through
//!   node-a's veil-proxy.
//!
//! Each measurement is `veil-rr client --http /api/products` (one keep-alive connection, one
//! outstanding request). For the L7 rounds the proxy's CPU time (utime + stime from
//! /proc/PID/stat) is read around the run: CPU per request. Prints a table and writes
//! `benches/results/l7.json`.

use std::fmt::Write as _;

use anyhow::{bail, Context as _};
use clap::Parser;
use serde::Serialize;
use veil_benches::{cleanup, lab::Lab, report::median_or_nan as median, rr::RrResult};

#[derive(Parser, Debug)]
#[command(about = "HTTP through the L7 proxy vs L4 policy only")]
struct Args {
    #[command(flatten)]
    run: veil_benches::setup::Rounds,
    #[command(flatten)]
    dirs: veil_benches::setup::Dirs,
}

const LAB: &str = "# l7-bench: client on node-a, HTTP server on node-b.\n\
identity: dev\nnodes: [{name: node-a}, {name: node-b}]\npods:\n\
- {name: client, namespace: bench, node: node-a, labels: {app: client}}\n\
- {name: server, namespace: bench, node: node-b, labels: {app: server}, serve: [{port: 8080, kind: http}]}\n";

fn policy(l7: bool) -> String {
    let rules = if l7 {
        "      rules:\n        http:\n        - method: GET\n          path: \"/api/.*\"\n"
    } else {
        ""
    };
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: client-to-server\n  namespace: bench\n\
         spec:\n  endpointSelector:\n    matchLabels:\n      app: client\n  egress:\n  - toEndpoints:\n    - matchLabels:\n        app: server\n\
         \x20   toPorts:\n    - ports:\n      - port: \"8080\"\n        protocol: TCP\n{rules}"
    )
}

#[derive(Debug, Clone, Serialize)]
struct Sample {
    path: &'static str,
    round: usize,
    result: RrResult,
    /// L7 rounds: the proxy's CPU µs per request.
    proxy_cpu_us_per_request: Option<f64>,
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = &stat[stat.rfind(')').context("stat")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks / hz)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    cleanup::reap_stale();
    let _guard = cleanup::install_signal_cleanup();
    let bin_dir = veil_benches::setup::release_bins(
        args.dirs.bin_dir.as_deref(),
        &["veil", "veil-rr", "veil-proxy"],
    )?;
    let (veil, rr) = (bin_dir.join("veil"), bin_dir.join("veil-rr"));
    let out_dir = veil_benches::setup::results_dir(args.dirs.out_dir.as_deref())?;
    let file = std::env::temp_dir().join("l7-bench.yaml");
    std::fs::write(&file, LAB)?;
    cleanup::register_file(&file);
    let lab = Lab::up(&veil, "l7b", &file, &["--quiet"])?;
    let server = format!("{}:8080", lab.pod("server")?.ip);
    let apply = |l7: bool| -> anyhow::Result<()> {
        let pf = std::env::temp_dir().join("l7-bench-policy.yaml");
        std::fs::write(&pf, policy(l7))?;
        cleanup::register_file(&pf);
        let out = std::process::Command::new(&veil)
            .args(["policy", "apply", "--name", lab.name(), "-f"])
            .arg(&pf)
            .output()?;
        if !out.status.success() {
            bail!("policy apply: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    };
    let rr_s = rr.display().to_string();
    let secs = args.run.seconds.to_string();
    let mut samples = Vec::new();
    for round in 0..args.run.rounds {
        // Each round starts with the other path.
        for k in 0..2 {
            let l7 = (round + k) % 2 == 1;
            apply(l7)?;
            let pid = if l7 {
                let st = lab.status("node-a")?;
                Some(
                    st.proxy
                        .and_then(|p| p.pid)
                        .context("node-a runs no veil-proxy")?,
                )
            } else {
                None
            };
            let cpu0 = pid.map(cpu_seconds).transpose()?;
            let argv = [
                rr_s.as_str(),
                "client",
                "--connect",
                &server,
                "--http",
                "/api/products",
                "--seconds",
                &secs,
                "--warmup-seconds",
                "0.5",
            ];
            let out = lab.exec("client", &argv)?;
            let result: RrResult = serde_json::from_str(out.trim())
                .with_context(|| format!("veil-rr client said {out:?}"))?;
            let cpu = match (pid, cpu0) {
                (Some(p), Some(c0)) => {
                    // Warm-up requests went through the proxy too: counted in.
                    let warm = result.transactions as f64 * 0.5 / result.seconds;
                    Some((cpu_seconds(p)? - c0) * 1e6 / (result.transactions as f64 + warm))
                }
                _ => None,
            };
            samples.push(Sample {
                path: if l7 { "l7" } else { "l4" },
                round,
                result,
                proxy_cpu_us_per_request: cpu,
            });
        }
    }
    lab.down();
    let med = |path: &str, f: &dyn Fn(&Sample) -> Option<f64>| {
        median(
            samples
                .iter()
                .filter(|s| s.path == path)
                .filter_map(f)
                .collect(),
        )
    };
    let rps = |s: &Sample| Some(s.result.transactions as f64 / s.result.seconds);
    let (l4_rps, l7_rps) = (med("l4", &rps), med("l7", &rps));
    let p50 = |s: &Sample| Some(s.result.p50_us);
    let p99 = |s: &Sample| Some(s.result.p99_us);
    let (l4_p50, l7_p50) = (med("l4", &p50), med("l7", &p50));
    let spread = |path: &str| {
        let v: Vec<f64> = samples
            .iter()
            .filter(|s| s.path == path)
            .filter_map(rps)
            .collect();
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(0.0, f64::max);
        format!("{lo:.0}–{hi:.0}")
    };
    let mut table = String::from(
        "| path | requests/s (median) | requests/s (range) | p50 µs | p99 µs | proxy CPU µs/request |\n|---|---:|---:|---:|---:|---:|\n",
    );
    for (path, r, p) in [
        ("L4 policy only", l4_rps, l4_p50),
        ("L7 proxy", l7_rps, l7_p50),
    ] {
        let key = if path == "L7 proxy" { "l7" } else { "l4" };
        let cpu = med(key, &|s| s.proxy_cpu_us_per_request);
        let _ = writeln!(
            table,
            "| {path} | {r:.0} | {} | {p:.1} | {:.1} | {} |",
            spread(key),
            med(key, &p99),
            if cpu.is_nan() {
                "–".into()
            } else {
                format!("{cpu:.1}")
            }
        );
    }
    let _ = writeln!(
        table,
        "\nL7 vs L4: requests/s {:.3}× (target ≥ 0.5×), p50 {:.3}× (target ≤ 1.5×)",
        l7_rps / l4_rps,
        l7_p50 / l4_p50
    );
    println!("{table}");
    let json = serde_json::json!({
        "seconds": args.run.seconds,
        "rounds": args.run.rounds,
        "samples": samples,
        "table_md": table,
    });
    veil_benches::setup::write_results(&out_dir, "l7.json", &json)?;
    Ok(())
}
