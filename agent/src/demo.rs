//! demo: the README's main job. Brings up the default lab and walks through every promise that
//! works today, printing what it measured.

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use crate::{
    api,
    lab::{self, spec},
};

/// Errors that end the demo.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Lab(#[from] lab::Error),
    #[error("demo step failed: {0}")]
    Step(String),
}

pub struct Options {
    pub name: String,
    pub keep: bool,
}

/// Runs a command in a pod via `veil lab exec`; returns stdout.
pub fn exec_in_pod(exe: &Path, lab: &str, pod: &str, argv: &[&str]) -> Result<String, Error> {
    let out = Command::new(exe)
        .args(["lab", "exec", "--name", lab, pod, "--"])
        .args(argv)
        .output()
        .map_err(|e| Error::Step(format!("cannot run veil lab exec: {e}")))?;
    if !out.status.success() {
        return Err(Error::Step(format!(
            "`{}` in {pod} failed: {}",
            argv.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `GET path` on a node agent's admin socket, as JSON.
fn agent_get<T: serde::de::DeserializeOwned>(
    paths: &lab::LabPaths,
    node: &str,
    path: &str,
) -> Result<T, Error> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(crate::admin::get_json::<T>(&paths.admin_socket(node), path))
        .map_err(|e| Error::Step(e.to_string()))
}

fn status(paths: &lab::LabPaths, node: &str) -> Result<api::Status, Error> {
    agent_get(paths, node, "/v1/status")
}

/// The newest DROPPED flow record from or to `pod` (`namespace%2Fname`) on `node`.
fn last_drop(
    paths: &lab::LabPaths,
    node: &str,
    pod: &str,
) -> Result<Option<crate::flows::Flow>, Error> {
    let flows: Vec<crate::flows::Flow> = agent_get(
        paths,
        node,
        &format!("/v1/flows?verdict=DROPPED&pod={pod}&limit=1"),
    )?;
    Ok(flows.into_iter().last())
}

fn pod_packets(st: &api::Status, pod: &str) -> u64 {
    st.interfaces
        .iter()
        .filter(|i| i.pod.as_deref() == Some(pod))
        .map(|i| i.packets)
        .sum()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

pub fn run(exe: &Path, opts: &Options) -> Result<(), Error> {
    let spec = spec::resolve(
        &opts.name,
        spec::LabFile::default(),
        &spec::Overrides::default(),
    )
    .map_err(lab::Error::from)?;
    println!(
        "veil demo: lab {:?}, trust domain {}",
        spec.name, spec.trust_domain
    );
    println!("\n== 1. a cluster on this host: 2 nodes, 3 pods, one agent per node ==");
    let started = Instant::now();
    let paths = lab::up(&spec, exe, &lab::Progress::new(false))?;
    println!("lab ready in {:.1}s", started.elapsed().as_secs_f64());
    let result = walk(exe, &spec, &paths);
    if opts.keep {
        println!(
            "\nlab {:?} kept: try `veil status --name {}` or `veil lab down --name {}`",
            spec.name, spec.name, spec.name
        );
    } else {
        println!("\n== cleaning up ==");
        let s = lab::down(&spec.name)?;
        println!(
            "removed {} netns, {} cgroups, {} processes",
            s.netns, s.cgroups, s.processes
        );
    }
    result
}

fn walk(exe: &Path, spec: &spec::LabSpec, paths: &lab::LabPaths) -> Result<(), Error> {
    let fe = spec.find_pod("shop/frontend").map_err(Error::Step)?;
    let be = spec.find_pod("shop/backend").map_err(Error::Step)?;
    let url = format!("http://{}:8080/", be.ip);

    println!("\n== 2. pods on different nodes talk; veil's eBPF programs see every packet ==");
    let before_a = status(paths, &fe.node)?;
    let before_b = status(paths, &be.node)?;
    let mut times = Vec::new();
    let mut body = String::new();
    let rounds = 20;
    for _ in 0..rounds {
        let t = Instant::now();
        body = exec_in_pod(
            exe,
            &spec.name,
            &fe.qualified_name(),
            &["curl", "-sS", "--max-time", "5", &url],
        )?;
        times.push(t.elapsed());
    }
    println!(
        "frontend ({}, {}) -> backend ({}, {}): {:?}",
        fe.node,
        fe.ip,
        be.node,
        be.ip,
        body.trim()
    );
    println!(
        "{rounds} requests, median {:.1} ms each (including process start)",
        median(times).as_secs_f64() * 1e3
    );
    let after_a = status(paths, &fe.node)?;
    let after_b = status(paths, &be.node)?;
    println!(
        "TC counters: frontend veth +{} packets on {}, backend veth +{} packets on {}",
        pod_packets(&after_a, &fe.qualified_name()) - pod_packets(&before_a, &fe.qualified_name()),
        fe.node,
        pod_packets(&after_b, &be.qualified_name()) - pod_packets(&before_b, &be.qualified_name()),
        be.node
    );
    println!(
        "programs attached: {} on {}, {} on {}; maps pinned under {}",
        after_a.programs.len(),
        fe.node,
        after_b.programs.len(),
        be.node,
        paths.bpf.display()
    );

    println!("\n== 3. every packet between nodes is WireGuard; nothing leaks in clear ==");
    let peer = after_a.peers.first();
    println!(
        "{}: backend {}, interface {}, public key {}, peer {} at {}",
        fe.node,
        after_a.backend,
        after_a.interface,
        after_a.public_key.as_deref().unwrap_or("-"),
        peer.map(|p| p.node.as_str()).unwrap_or("-"),
        peer.and_then(|p| p.endpoint.as_deref()).unwrap_or("-")
    );
    let report = crate::check::run(spec, paths).map_err(|e| Error::Step(e.to_string()))?;
    let c = &report.capture;
    println!(
        "underlay: {} WireGuard packets, {} plaintext (marker traffic {} TCP round trips + {} UDP datagrams; marker seen {} times) -> {}",
        c.wireguard,
        c.plaintext,
        report.tcp_round_trips,
        report.udp_datagrams_sent,
        c.marker_hits,
        if report.pass { "PASS" } else { "FAIL" }
    );
    if !report.pass {
        return Err(Error::Step("leak check failed".into()));
    }
    if let Some(bps) = iperf(
        exe,
        &spec.name,
        &fe.qualified_name(),
        &be.qualified_name(),
        &be.ip.to_string(),
    ) {
        println!("throughput frontend -> backend through the tunnel: {:.2} Gbit/s (iperf3, 3 s, 1 stream)", bps / 1e9);
    }
    step_identities(exe, spec, paths)?;
    step_policy(exe, spec, paths)?;
    step_mutual_auth(exe, spec, paths)?;
    Ok(())
}

/// A short iperf3 run between two pods; None when iperf3 is missing or fails.
fn iperf(exe: &Path, lab: &str, client: &str, server: &str, server_ip: &str) -> Option<f64> {
    let mut srv = Command::new(exe)
        .args([
            "lab", "exec", "--name", lab, server, "--", "iperf3", "-s", "-1",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    std::thread::sleep(Duration::from_millis(300));
    let out = exec_in_pod(
        exe,
        lab,
        client,
        &["iperf3", "-c", server_ip, "-t", "3", "-J"],
    );
    let _ = srv.kill();
    let _ = srv.wait();
    let v: serde_json::Value = serde_json::from_str(&out.ok()?).ok()?;
    v["end"]["sum_received"]["bits_per_second"].as_f64()
}

fn step_identities(exe: &Path, spec: &spec::LabSpec, paths: &lab::LabPaths) -> Result<(), Error> {
    let fe = spec.find_pod("shop/frontend").map_err(Error::Step)?;
    println!("\n== 4. SPIFFE identities arrive as a stream and rotate live ==");
    let st = status(paths, &fe.node)?;
    for v in &st.svids {
        println!(
            "  {:<16} {}  serial {}..  expires in {}s",
            v.owner,
            v.spiffe_id,
            &v.serial[..v.serial.len().min(12)],
            v.not_after_unix.saturating_sub(crate::cli::unix_now())
        );
    }
    let serial_of = |st: &api::Status| {
        st.svids
            .iter()
            .find(|v| v.owner == fe.qualified_name())
            .map(|v| v.serial.clone())
    };
    let before = serial_of(&st).ok_or_else(|| Error::Step("frontend has no SVID".into()))?;
    let t = Instant::now();
    let out = Command::new(exe)
        .args([
            "lab",
            "rotate",
            "--name",
            &spec.name,
            "--pod",
            &fe.qualified_name(),
        ])
        .output()
        .map_err(|e| Error::Step(e.to_string()))?;
    if !out.status.success() {
        return Err(Error::Step(format!(
            "rotate failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    let after = loop {
        match serial_of(&status(paths, &fe.node)?) {
            Some(s) if s != before => break s,
            _ if t.elapsed() > Duration::from_secs(10) => {
                return Err(Error::Step("rotation did not arrive".into()))
            }
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    println!(
        "rotated frontend's SVID: serial {}.. -> {}.., seen by node-a's agent {:.0} ms after `veil lab rotate`",
        &before[..12.min(before.len())],
        &after[..12.min(after.len())],
        t.elapsed().as_secs_f64() * 1e3
    );
    Ok(())
}

fn step_policy(exe: &Path, spec: &spec::LabSpec, paths: &lab::LabPaths) -> Result<(), Error> {
    let fe = spec.find_pod("shop/frontend").map_err(Error::Step)?;
    let be = spec.find_pod("shop/backend").map_err(Error::Step)?;
    let intruder = spec.find_pod("shop/intruder").map_err(Error::Step)?;
    let url = format!("http://{}:8080/", be.ip);
    println!("\n== 5. identity-based policy in the kernel: only frontend may call backend:8080 ==");
    let policy = paths.root.join("demo-policy.yaml");
    std::fs::write(&policy, DEMO_POLICY).map_err(|e| Error::Step(e.to_string()))?;
    let t = Instant::now();
    let out = Command::new(exe)
        .args(["policy", "apply", "--name", &spec.name, "-f"])
        .arg(&policy)
        .output()
        .map_err(|e| Error::Step(e.to_string()))?;
    if !out.status.success() {
        return Err(Error::Step(format!(
            "policy apply failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    println!(
        "policy applied; in force on every node after {:.0} ms:",
        t.elapsed().as_secs_f64() * 1e3
    );
    print!("{}", String::from_utf8_lossy(&out.stdout));
    let get = |pod: &spec::PodSpec| {
        exec_in_pod(
            exe,
            &spec.name,
            &pod.qualified_name(),
            &["curl", "-sS", "--max-time", "2", &url],
        )
        .is_ok()
    };
    let (fe_ok, in_ok) = (get(fe), get(intruder));
    println!(
        "frontend -> backend: {}",
        if fe_ok {
            "allowed"
        } else {
            "BLOCKED (unexpected)"
        }
    );
    println!(
        "intruder -> backend: {}",
        if in_ok {
            "ALLOWED (unexpected)"
        } else {
            "dropped"
        }
    );
    if let Some(f) = last_drop(paths, &be.node, "shop%2Fintruder")? {
        println!("veil observe --verdict DROPPED:");
        println!("  {}", crate::flows::format_table_header());
        println!("  {}", crate::flows::format_table_row(&f));
    }
    if !fe_ok || in_ok {
        return Err(Error::Step("policy did not behave as applied".into()));
    }
    Ok(())
}

/// Runs a veil subcommand; its stdout, or a step error with its stderr.
fn veil_cmd(exe: &Path, args: &[&str]) -> Result<String, Error> {
    let out = Command::new(exe)
        .args(args)
        .output()
        .map_err(|e| Error::Step(e.to_string()))?;
    if !out.status.success() {
        return Err(Error::Step(format!(
            "veil {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// SYN retransmissions so far in a pod's network namespace (`nstat`), if readable.
fn syn_retransmits(exe: &Path, lab: &str, pod: &str) -> Option<u64> {
    let out = exec_in_pod(exe, lab, pod, &["nstat", "-asz", "TcpExtTCPSynRetrans"]).ok()?;
    out.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        (f.next() == Some("TcpExtTCPSynRetrans")).then(|| f.next()?.parse().ok())?
    })
}

/// `curl` connect time (ms) from a pod, or None when the request failed.
fn connect_ms(exe: &Path, lab: &str, pod: &str, url: &str) -> Option<f64> {
    let out = exec_in_pod(
        exe,
        lab,
        pod,
        &[
            "curl",
            "-sS",
            "--max-time",
            "3",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{time_connect}",
            url,
        ],
    )
    .ok()?;
    let (code, t) = out.split_once(' ')?;
    (code == "200").then(|| t.trim().parse::<f64>().ok().map(|s| s * 1e3))?
}

/// A client in a pod sending `n` numbered lines to `ip:9000` (TCP or UDP echo), one every 50 ms.
fn echo_client(
    exe: &Path,
    lab: &str,
    pod: &str,
    ip: &str,
    n: u32,
    udp: bool,
) -> Result<std::process::Child, Error> {
    let script = format!(
        "for i in $(seq 1 {n}); do echo n-$i; sleep 0.05; done | ncat {} -w 3 -i 3 {ip} 9000",
        if udp { "-u" } else { "" }
    );
    Command::new(exe)
        .args(["lab", "exec", "--name", lab, pod, "--", "sh", "-c", &script])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| Error::Step(e.to_string()))
}

fn echoed(child: std::process::Child) -> usize {
    child
        .wait_with_output()
        .map(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            text.lines()
                .collect::<std::collections::BTreeSet<_>>()
                .len()
        })
        .unwrap_or(0)
}

fn step_mutual_auth(exe: &Path, spec: &spec::LabSpec, paths: &lab::LabPaths) -> Result<(), Error> {
    let fe = spec.find_pod("shop/frontend").map_err(Error::Step)?;
    let be = spec.find_pod("shop/backend").map_err(Error::Step)?;
    let intruder = spec.find_pod("shop/intruder").map_err(Error::Step)?;
    let lab = spec.name.as_str();
    let url = format!("http://{}:8080/", be.ip);
    println!(
        "
== 6. mutual authentication required by policy, bound to the encryption =="
    );
    let st = status(paths, &fe.node)?;
    for c in &st.channels {
        println!(
            "control channel {} <-> {}: TLS 1.3 {}, node SVIDs verified, WireGuard PSK epoch {}",
            fe.node,
            c.node,
            c.group.as_deref().unwrap_or("?"),
            c.epoch
        );
    }
    let policy = paths.root.join("demo-auth-policy.yaml");
    std::fs::write(&policy, DEMO_AUTH_POLICY).map_err(|e| Error::Step(e.to_string()))?;
    let policy = policy.display().to_string();
    let retrans_before = syn_retransmits(exe, lab, &fe.qualified_name());
    veil_cmd(exe, &["policy", "apply", "--name", lab, "-f", &policy])?;
    println!("policy applied: backend admits frontend on 8080/TCP and 9000 only with `authentication: {{mode: required}}`");
    let first = connect_ms(exe, lab, &fe.qualified_name(), &url)
        .ok_or_else(|| Error::Step("the first authenticated connection failed".into()))?;
    let retrans_after = syn_retransmits(exe, lab, &fe.qualified_name());
    let warm = connect_ms(exe, lab, &fe.qualified_name(), &url).unwrap_or(f64::NAN);
    let retrans = match (retrans_before, retrans_after) {
        (Some(a), Some(b)) => (b - a).to_string(),
        _ => "unknown (nstat missing)".into(),
    };
    println!(
        "first connection after the policy: connect {first:.2} ms, SYN retransmissions: {retrans}; an already-authenticated pair: {warm:.2} ms"
    );
    let st = status(paths, &fe.node)?;
    let now = crate::cli::unix_now();
    for p in st.auth.iter().filter(|p| p.expires_unix > now) {
        println!(
            "auth pair {} -> {} via {}: expires in {}s (the earliest SVID not-after), last result {}",
            p.src_identity,
            p.dst_identity,
            p.node,
            p.expires_unix - now,
            p.last_result.as_deref().unwrap_or("-")
        );
    }
    let intruder_ok = exec_in_pod(
        exe,
        lab,
        &intruder.qualified_name(),
        &["curl", "-sS", "--max-time", "2", &url],
    )
    .is_ok();
    println!(
        "intruder (valid SVID, no policy allowance) -> backend: {}",
        if intruder_ok {
            "ALLOWED (unexpected)"
        } else {
            "dropped"
        }
    );

    // Rotation under load: every identity involved rotates while a TCP stream and a numbered
    // UDP probe run.
    let n = 120;
    let tcp = echo_client(exe, lab, &fe.qualified_name(), &be.ip.to_string(), n, false)?;
    let udp = echo_client(exe, lab, &fe.qualified_name(), &be.ip.to_string(), n, true)?;
    let epoch_before = status(paths, &fe.node)?
        .channels
        .first()
        .map(|c| c.epoch)
        .unwrap_or(0);
    std::thread::sleep(Duration::from_millis(800));
    for target in [
        ["--pod", "shop/frontend"],
        ["--pod", "shop/backend"],
        ["--node", fe.node.as_str()],
    ] {
        veil_cmd(exe, &["lab", "rotate", "--name", lab, target[0], target[1]])?;
        std::thread::sleep(Duration::from_millis(1200));
    }
    let (tcp_n, udp_n) = (echoed(tcp), echoed(udp));
    let st = status(paths, &fe.node)?;
    let epoch_after = st.channels.first().map(|c| c.epoch).unwrap_or(0);
    println!(
        "rotated frontend's, backend's and {}'s SVIDs under load: node handshake re-ran (PSK epoch {epoch_before} -> {epoch_after}), pairs re-authenticated; TCP stream {tcp_n}/{n} lines, UDP probe {udp_n}/{n} datagrams, {} lost",
        fe.node,
        (2 * n as usize).saturating_sub(tcp_n + udp_n)
    );

    // Revocation: the pod's access ends within seconds, established connections included.
    let t = Instant::now();
    veil_cmd(
        exe,
        &["lab", "revoke", "--name", lab, "--pod", "shop/frontend"],
    )?;
    let gone = loop {
        let now = crate::cli::unix_now();
        let live = |st: &api::Status| st.auth.iter().any(|p| p.expires_unix > now);
        if !live(&status(paths, &fe.node)?) && !live(&status(paths, &be.node)?) {
            break t.elapsed();
        }
        if t.elapsed() > Duration::from_secs(10) {
            return Err(Error::Step(
                "revocation did not remove the auth entries".into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let after = connect_ms(exe, lab, &fe.qualified_name(), &url);
    println!(
        "revoked frontend's SVID: auth entries gone on both nodes after {:.0} ms; frontend -> backend now {}",
        gone.as_secs_f64() * 1e3,
        if after.is_some() { "ALLOWED (unexpected)" } else { "dropped" }
    );
    // The held SYN is dropped and recorded when its hold times out (3 s): wait for the record.
    let waited = Instant::now();
    let drop = loop {
        let mut found = None;
        for node in [&fe.node, &be.node] {
            found = found.or(last_drop(paths, node, "shop%2Ffrontend")?);
        }
        if found.is_some() || waited.elapsed() > Duration::from_secs(5) {
            break found;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    if let Some(f) = &drop {
        println!("  {}", crate::flows::format_table_header());
        println!("  {}", crate::flows::format_table_row(f));
    }
    if intruder_ok || after.is_some() || tcp_n + udp_n < 2 * n as usize {
        return Err(Error::Step("mutual auth did not behave as promised".into()));
    }
    Ok(())
}

/// The policies the demo applies are the ones in `examples/policies/`.
const DEMO_POLICY: &str = include_str!("../../examples/policies/backend-ingress.yaml");
const DEMO_AUTH_POLICY: &str = include_str!("../../examples/policies/backend-ingress-auth.yaml");
