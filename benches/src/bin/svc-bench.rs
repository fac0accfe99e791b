//! `svc-bench`: Services at the socket against a pod IP and against a kube-proxy-style iptables
//! rule set, on a real lab (files control plane, dev identities), at 10 and 10,000 Service
//! ports. Per size, interleaved rounds of three targets from `client` (node-a) to `server`
//! (node-b), each with TCP_RR (one connection), TCP_CRR (a new connection per transaction) and
//! HTTP (keep-alive `GET`s to the lab's HTTP server on the server pod, through one more Service
//! port, 80 → 8080, the last of the last Service, and one more iptables rule, the last):
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
/// The server pod's HTTP server (the lab's `serve: http`), and the Service port in front of it.
const HTTP_PORT: u16 = 8080;
const HTTP_SERVICE_PORT: u16 = 80;
const FIRST_PORT: u16 = 1000;
/// Ports per Service: the /20 service CIDR holds 4,086 ClusterIPs from .10, so 10,000 Service
/// ports are 2,500 Services of 4 (kube-proxy writes one rule per Service port either way).
const PORTS_PER_SERVICE: usize = 4;
/// Virtual addresses of the iptables rule set: outside the service CIDR, so veil's socket
/// programs never see them as Services.
const IPTABLES_VIP_BASE: Ipv4Addr = Ipv4Addr::new(198, 18, 64, 0);

/// The tests of every target: TCP_RR, TCP_CRR, HTTP/1.1 keep-alive GETs.
const MODES: [&str; 3] = ["rr", "crr", "http"];

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
         - {name: server, namespace: bench, node: node-b, labels: {app: server}, serve: [{port: 8080, kind: http}]}\nservices:\n",
    );
    let count = services.div_ceil(PORTS_PER_SERVICE);
    for i in 0..count {
        let ports = PORTS_PER_SERVICE.min(services - i * PORTS_PER_SERVICE);
        let mut list: Vec<String> = (0..ports)
            .map(|k| {
                format!(
                    "{{name: p{k}, port: {}, target_port: {SERVER_PORT}}}",
                    FIRST_PORT as usize + k
                )
            })
            .collect();
        if i == count - 1 {
            list.push(format!(
                "{{name: http, port: {HTTP_SERVICE_PORT}, target_port: {HTTP_PORT}}}"
            ));
        }
        let _ = writeln!(
            s,
            "- {{name: s{i}, namespace: bench, selector: {{app: server}}, ports: [{}]}}",
            list.join(", ")
        );
    }
    s
}

/// kube-proxy's iptables-mode shape for `services` Service ports, all to `backend`'s echo
/// server, plus the HTTP port of the last Service (the last rule) to its HTTP server. The rule
/// set, the last echo port's (address, port) and the HTTP port's.
fn iptables_rules(services: usize, backend: &str) -> (String, (Ipv4Addr, u16), (Ipv4Addr, u16)) {
    let mut r = String::from("*nat\n:OUTPUT ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n");
    let vip = |i: usize| {
        Ipv4Addr::from(u32::from(IPTABLES_VIP_BASE) + 1 + (i / PORTS_PER_SERVICE) as u32)
    };
    let port = |i: usize| FIRST_PORT + (i % PORTS_PER_SERVICE) as u16;
    // Rule `services` is the HTTP port, beside the last echo port's address.
    let http_vip = vip(services - 1);
    for i in 0..=services {
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
    let _ = writeln!(
        r,
        "-A KUBE-SERVICES -d {http_vip}/32 -p tcp -m comment --comment \"bench/http\" -m tcp --dport {HTTP_SERVICE_PORT} -j KUBE-SVC-{services}"
    );
    for i in 0..=services {
        let to = if i == services {
            HTTP_PORT
        } else {
            SERVER_PORT
        };
        let _ = writeln!(r, "-A KUBE-SVC-{i} -j KUBE-SEP-{i}");
        let _ = writeln!(
            r,
            "-A KUBE-SEP-{i} -p tcp -m tcp -j DNAT --to-destination {backend}:{to}"
        );
    }
    r.push_str("COMMIT\n");
    let last = services - 1;
    (r, (vip(last), port(last)), (http_vip, HTTP_SERVICE_PORT))
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

/// One veil-rr client run: `mode` is `rr`, `crr` or `http`.
fn run_client(
    lab: &Lab,
    rr: &Path,
    target: &str,
    mode: &str,
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
    match mode {
        "crr" => argv.push("--new-connections"),
        "http" => argv.extend(["--http", "/"]),
        _ => {}
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
            .service(&last_name)
            .context("lab show lists no last Service")?;
        let cluster_ip = last.cluster_ip.clone();
        // The last echo port (the one before `http`).
        let cluster_port = last
            .ports
            .iter()
            .rev()
            .find(|p| p.port != HTTP_SERVICE_PORT)
            .map(|p| p.port)
            .context("ports")?;
        let (rules, (vip, vport), (http_vip, http_vport)) = iptables_rules(size, &server_ip);
        // (target, echo address, HTTP address)
        let targets: [(&'static str, String, String); 3] = [
            (
                "pod-ip",
                format!("{server_ip}:{SERVER_PORT}"),
                format!("{server_ip}:{HTTP_PORT}"),
            ),
            (
                "clusterip",
                format!("{cluster_ip}:{cluster_port}"),
                format!("{cluster_ip}:{HTTP_SERVICE_PORT}"),
            ),
            (
                "iptables",
                format!("{vip}:{vport}"),
                format!("{http_vip}:{http_vport}"),
            ),
        ];
        eprintln!(
            "svc-bench: {size} Service ports, lab up in {up_s:.1} s; clusterip {cluster_ip}:{cluster_port} and :{HTTP_SERVICE_PORT}, iptables {vip}:{vport} (rule {size} of {}) and {http_vip}:{http_vport} (the last rule)",
            size + 1
        );
        for round in 0..args.run.rounds {
            // Each round starts with another target, so no target always follows the same one
            // (a CRR run leaves thousands of conntrack entries behind it).
            for k in 0..targets.len() {
                let (target, addr, http_addr) = &targets[(round + k) % targets.len()];
                // The rule set exists only while its target is measured: every new connection
                // from the pod walks it, which a node running veil instead of kube-proxy does not.
                if *target == "iptables" {
                    nat(&client_netns, &rules)?;
                }
                for mode in MODES {
                    let to = if mode == "http" { http_addr } else { addr };
                    let result = run_client(&lab, &rr, to, mode, args.run.seconds)?;
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
    // Table: per size and mode, medians over rounds, ratios of the medians to the pod IP's, and
    // the median and range of the per-round ratios (each round measures every target within
    // seconds of the others, so the machine's drift between rounds cancels out of them).
    let mut table = String::from(
        "| Service ports | test | target | transactions/s | p50 µs | p99 µs | tps vs pod IP | p50 vs pod IP | tps vs pod IP, per round: median (range) |\n|---:|---|---|---:|---:|---:|---:|---:|---|\n",
    );
    for &size in &args.sizes {
        for mode in MODES {
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
            let per_round = |target: &str| -> Vec<f64> {
                (0..args.run.rounds)
                    .filter_map(|round| {
                        let of = |t: &str| {
                            samples
                                .iter()
                                .find(|s| {
                                    s.size == size
                                        && s.mode == mode
                                        && s.target == t
                                        && s.round == round
                                })
                                .map(|s| tps(&s.result))
                        };
                        Some(of(target)? / of("pod-ip")?)
                    })
                    .collect()
            };
            let base_tps = med("pod-ip", &tps);
            let base_p50 = med("pod-ip", &|r| r.p50_us);
            for target in ["pod-ip", "clusterip", "iptables"] {
                let t = med(target, &tps);
                let p50 = med(target, &|r| r.p50_us);
                let paired = per_round(target);
                let lo = paired.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = paired.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let _ = writeln!(
                    table,
                    "| {size} | {} | {target} | {t:.0} | {p50:.1} | {:.1} | {:.3}× | {:.3}× | {:.3}× ({lo:.3}–{hi:.3}) |",
                    match mode {
                        "rr" => "TCP_RR",
                        "crr" => "TCP_CRR",
                        _ => "HTTP keep-alive",
                    },
                    med(target, &|r| r.p99_us),
                    t / base_tps,
                    p50 / base_p50,
                    median(paired.clone())
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
    veil_benches::setup::write_results(&out_dir, "services.json", &json)?;
    Ok(())
}
