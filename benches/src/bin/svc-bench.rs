//! `svc-bench`: Services at the socket against a pod IP and against a kube-proxy-style iptables
//! rule set, on a real lab (files control plane, dev identities), at 10 and 10,000 Service
//! ports. Per size, interleaved rounds of three targets from `client` (node-a) to `server`
//! (node-b), each with TCP_RR (one connection) and TCP_CRR (a new connection per transaction):
//! - `pod-ip`: the server pod's address, no translation;
//! - `clusterip`: the last Service port of the lab, translated by veil's socket programs;
//! - `iptables`: a virtual address DNATed by a kube-proxy iptables-mode rule set (`KUBE-SERVICES`
//!   with one rule per Service port, each jumping to `KUBE-SVC-*` and `KUBE-SEP-*`) in the client
//!   pod's netns `nat OUTPUT`, the measured one the last rule (the worst case of the linear walk
//!   a new connection takes; replies and later packets are conntrack's).
//!
//! Prints a table and writes `benches/results/services.json`.

use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _};
use clap::Parser;
use serde::Serialize;
use veil_benches::{cleanup, lab::Lab, report::median_or_nan as median, rr::RrResult};

#[derive(Parser, Debug)]
#[command(about = "Services at the socket vs pod IP vs kube-proxy iptables rules")]
struct Args {
    /// Service-port counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "10,10000")]
    sizes: Vec<usize>,
    #[command(flatten)]
    run: veil_benches::setup::Rounds,
    #[command(flatten)]
    dirs: veil_benches::setup::Dirs,
}

/// The server's port and the Service ports' first number.
const SERVER_PORT: u16 = 7001;
const FIRST_PORT: u16 = 1000;
/// Ports per Service: the /20 service CIDR holds 4,086 ClusterIPs from .10, so 10,000 Service
/// ports are 2,500 Services of 4 (kube-proxy writes one rule per Service port either way).
const PORTS_PER_SERVICE: usize = 4;
/// Virtual addresses of the iptables rule set: outside the service CIDR, so veil's socket
/// programs never see them as Services.
const IPTABLES_VIP_BASE: Ipv4Addr = Ipv4Addr::new(198, 18, 64, 0);

#[derive(Debug, Clone, Serialize)]
struct Sample {
    size: usize,
    target: &'static str,
    mode: &'static str,
    round: usize,
    result: RrResult,
}

fn lab_file(services: usize) -> String {
    let mut s = String::from(
        "# svc-bench: client on node-a, server on node-b, SERVICES Service ports on server.\n\
         identity: dev\nnodes: [{name: node-a}, {name: node-b}]\npods:\n\
         - {name: client, namespace: bench, node: node-a, labels: {app: client}}\n\
         - {name: server, namespace: bench, node: node-b, labels: {app: server}}\nservices:\n",
    );
    let count = services.div_ceil(PORTS_PER_SERVICE);
    for i in 0..count {
        let ports = PORTS_PER_SERVICE.min(services - i * PORTS_PER_SERVICE);
        let list: Vec<String> = (0..ports)
            .map(|k| {
                format!(
                    "{{name: p{k}, port: {}, target_port: {SERVER_PORT}}}",
                    FIRST_PORT as usize + k
                )
            })
            .collect();
        let _ = writeln!(
            s,
            "- {{name: s{i}, namespace: bench, selector: {{app: server}}, ports: [{}]}}",
            list.join(", ")
        );
    }
    s
}

/// kube-proxy's iptables-mode shape for `services` Service ports, all to `backend`.
fn iptables_rules(services: usize, backend: &str) -> (String, Ipv4Addr, u16) {
    let mut r = String::from("*nat\n:OUTPUT ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n");
    let vip = |i: usize| {
        Ipv4Addr::from(u32::from(IPTABLES_VIP_BASE) + 1 + (i / PORTS_PER_SERVICE) as u32)
    };
    let port = |i: usize| FIRST_PORT + (i % PORTS_PER_SERVICE) as u16;
    for i in 0..services {
        let _ = writeln!(r, ":KUBE-SVC-{i} - [0:0]\n:KUBE-SEP-{i} - [0:0]");
    }
    r.push_str("-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n");
    for i in 0..services {
        let _ = writeln!(
            r,
            "-A KUBE-SERVICES -d {}/32 -p tcp -m comment --comment \"bench/s{i}\" -m tcp --dport {} -j KUBE-SVC-{i}",
            vip(i),
            port(i)
        );
    }
    for i in 0..services {
        let _ = writeln!(r, "-A KUBE-SVC-{i} -j KUBE-SEP-{i}");
        let _ = writeln!(
            r,
            "-A KUBE-SEP-{i} -p tcp -m tcp -j DNAT --to-destination {backend}:{SERVER_PORT}"
        );
    }
    r.push_str("COMMIT\n");
    let last = services - 1;
    (r, vip(last), port(last))
}

/// Replaces the client pod's nat table with `rules` (iptables-restore without --noflush: the
/// table is exactly the file, so an empty one removes the set).
fn nat(netns: &str, rules: &str) -> anyhow::Result<()> {
    let mut restore = Command::new("ip")
        .args(["netns", "exec", netns, "iptables-restore"])
        .stdin(Stdio::piped())
        .spawn()
        .context("iptables-restore")?;
    std::io::Write::write_all(restore.stdin.as_mut().context("stdin")?, rules.as_bytes())?;
    if !restore.wait()?.success() {
        bail!("iptables-restore refused the rule set");
    }
    Ok(())
}

fn run_client(
    lab: &Lab,
    rr: &Path,
    target: &str,
    crr: bool,
    seconds: f64,
) -> anyhow::Result<RrResult> {
    let secs = seconds.to_string();
    let rr = rr.display().to_string();
    let mut argv = vec![
        rr.as_str(),
        "client",
        "--connect",
        target,
        "--seconds",
        secs.as_str(),
        "--warmup-seconds",
        "0.5",
    ];
    if crr {
        argv.push("--new-connections");
    }
    let out = lab.exec("client", &argv)?;
    serde_json::from_str(out.trim()).with_context(|| format!("veil-rr client said {out:?}"))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    cleanup::reap_stale();
    let _guard = cleanup::install_signal_cleanup();
    let bin_dir =
        veil_benches::setup::release_bins(args.dirs.bin_dir.as_deref(), &["veil", "veil-rr"])?;
    let (veil, rr) = (bin_dir.join("veil"), bin_dir.join("veil-rr"));
    let out_dir = veil_benches::setup::results_dir(args.dirs.out_dir.as_deref())?;
    let mut samples: Vec<Sample> = Vec::new();
    let mut setup: Vec<(usize, f64)> = Vec::new();
    for &size in &args.sizes {
        if size == 0 {
            bail!("--sizes: 0 Service ports measures nothing");
        }
        let name = format!("svcb{}", size % 1000);
        let file = std::env::temp_dir().join(format!("svc-bench-{size}.yaml"));
        std::fs::write(&file, lab_file(size))?;
        cleanup::register_file(&file);
        let t0 = std::time::Instant::now();
        let lab = Lab::up(&veil, &name, &file, &["--quiet"])?;
        let up_s = t0.elapsed().as_secs_f64();
        setup.push((size, up_s));
        let server_ip = lab.pod("server")?.ip.clone();
        let client_netns = lab.pod("client")?.netns.clone();
        let _server = lab.spawn(
            "server",
            &[
                rr.to_str().context("path")?,
                "server",
                "--port",
                &SERVER_PORT.to_string(),
            ],
        )?;
        // The measured Service port: the last one the lab allocated (its ClusterIP from `lab
        // show`, taken when the lab came up).
        let last_name = format!("s{}", size.div_ceil(PORTS_PER_SERVICE) - 1);
        let last = lab
            .view
            .services
            .iter()
            .find(|s| s["name"] == last_name.as_str())
            .context("lab show lists no last Service")?;
        let cluster_ip = last["cluster_ip"]
            .as_str()
            .context("cluster_ip")?
            .to_string();
        let cluster_port = last["ports"]
            .as_array()
            .and_then(|p| p.last())
            .and_then(|p| p["port"].as_u64())
            .context("ports")?;
        let (rules, vip, vport) = iptables_rules(size, &server_ip);
        let targets: [(&'static str, String); 3] = [
            ("pod-ip", format!("{server_ip}:{SERVER_PORT}")),
            ("clusterip", format!("{cluster_ip}:{cluster_port}")),
            ("iptables", format!("{vip}:{vport}")),
        ];
        eprintln!(
            "svc-bench: {size} Service ports, lab up in {up_s:.1} s; clusterip {cluster_ip}:{cluster_port}, iptables {vip}:{vport} (rule {size} of {size})"
        );
        for round in 0..args.run.rounds {
            // Each round starts with another target, so no target always follows the same one
            // (a CRR run leaves thousands of conntrack entries behind it).
            for k in 0..targets.len() {
                let (target, addr) = &targets[(round + k) % targets.len()];
                // The rule set exists only while its target is measured: every new connection
                // from the pod walks it, which a node running veil instead of kube-proxy does not.
                if *target == "iptables" {
                    nat(&client_netns, &rules)?;
                }
                for (mode, crr) in [("rr", false), ("crr", true)] {
                    let result = run_client(&lab, &rr, addr, crr, args.run.seconds)?;
                    samples.push(Sample {
                        size,
                        target,
                        mode,
                        round,
                        result,
                    });
                }
                if *target == "iptables" {
                    nat(&client_netns, "*nat\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n")?;
                }
            }
        }
        lab.down();
    }
    // Table: per size and mode, medians over rounds, and ratios to the pod IP.
    let mut table = String::from(
        "| Service ports | test | target | transactions/s | p50 µs | p99 µs | tps vs pod IP | p50 vs pod IP |\n|---:|---|---|---:|---:|---:|---:|---:|\n",
    );
    for &size in &args.sizes {
        for mode in ["rr", "crr"] {
            let med = |target: &str, f: &dyn Fn(&RrResult) -> f64| {
                median(
                    samples
                        .iter()
                        .filter(|s| s.size == size && s.mode == mode && s.target == target)
                        .map(|s| f(&s.result))
                        .collect(),
                )
            };
            let tps = |r: &RrResult| r.transactions as f64 / r.seconds;
            let base_tps = med("pod-ip", &tps);
            let base_p50 = med("pod-ip", &|r| r.p50_us);
            for target in ["pod-ip", "clusterip", "iptables"] {
                let t = med(target, &tps);
                let p50 = med(target, &|r| r.p50_us);
                let _ = writeln!(
                    table,
                    "| {size} | {} | {target} | {t:.0} | {p50:.1} | {:.1} | {:.3}× | {:.3}× |",
                    if mode == "rr" { "TCP_RR" } else { "TCP_CRR" },
                    med(target, &|r| r.p99_us),
                    t / base_tps,
                    p50 / base_p50
                );
            }
        }
    }
    println!("{table}");
    for (size, up) in &setup {
        println!("lab up with {size} Service ports: {up:.1} s");
    }
    let json = serde_json::json!({
        "seconds": args.run.seconds,
        "rounds": args.run.rounds,
        "lab_up_seconds": setup.iter().map(|(s, t)| serde_json::json!({"service_ports": s, "seconds": t})).collect::<Vec<_>>(),
        "samples": samples,
        "table_md": table,
    });
    let path = out_dir.join("services.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&json)?)?;
    eprintln!("svc-bench: wrote {}", path.display());
    Ok(())
}
