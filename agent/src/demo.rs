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
    /// Default: real SPIRE.
    pub identity: Option<spec::IdentityProvider>,
}

/// The demo lab's X.509-SVID TTL on real SPIRE: SPIRE renews at half the lifetime (counted from
/// `notBefore`, which it backdates by 10 s), so every SVID rotates ~10 s after it was issued
/// and the demo sees SPIRE's own rotations within its run.
pub const SPIRE_DEMO_SVID_TTL: Duration = Duration::from_secs(30);
/// SPIRE's `notBefore` backdating (pkg/server/ca: `backdate = 10 * time.Second`).
const SPIRE_BACKDATE: Duration = Duration::from_secs(10);

/// Runs a command in a pod via `veil lab exec`; returns stdout.
pub fn exec_in_pod(exe: &Path, lab: &str, pod: &str, argv: &[&str]) -> Result<String, Error> {
    stdout_of(
        Command::new(exe)
            .args(["lab", "exec", "--name", lab, pod, "--"])
            .args(argv),
        "cannot run veil lab exec: ",
        &format!("`{}` in {pod}", argv.join(" ")),
    )
}

/// Runs `cmd`; its stdout, or a step error: `spawn_prefix` and the OS error when it cannot
/// start, `what` and its stderr when it fails.
fn stdout_of(cmd: &mut Command, spawn_prefix: &str, what: &str) -> Result<String, Error> {
    let out = cmd
        .output()
        .map_err(|e| Error::Step(format!("{spawn_prefix}{e}")))?;
    if !out.status.success() {
        return Err(Error::Step(format!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The demo's pods, looked up once per step.
struct Shop<'a> {
    fe: &'a spec::PodSpec,
    be: &'a spec::PodSpec,
    intruder: &'a spec::PodSpec,
}

fn shop(spec: &spec::LabSpec) -> Result<Shop<'_>, Error> {
    let pod = |q| spec.find_pod(q).map_err(Error::Step);
    Ok(Shop {
        fe: pod("shop/frontend")?,
        be: pod("shop/backend")?,
        intruder: pod("shop/intruder")?,
    })
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
    let identity = opts.identity.unwrap_or_default();
    let spec = spec::resolve(
        &opts.name,
        spec::LabFile::default(),
        &spec::Overrides {
            identity: Some(identity),
            svid_ttl: (identity == spec::IdentityProvider::Spire).then_some(SPIRE_DEMO_SVID_TTL),
            ..Default::default()
        },
    )
    .map_err(lab::Error::from)?;
    println!(
        "veil demo: lab {:?}, trust domain {}",
        spec.name, spec.trust_domain
    );
    match spec.identity {
        spec::IdentityProvider::Spire => println!(
            "identities: SPIRE {} (spire-server in the underlay, a spire-agent per node attested with a join token, \
             veil's agents on its Delegated Identity API); X.509-SVID TTL {}s",
            lab::spire_real::version().unwrap_or_else(|| "?".into()),
            spec.svid_ttl.as_secs()
        ),
        spec::IdentityProvider::Dev => println!(
            "identities: veil's dev SPIRE server (--identity dev); X.509-SVID TTL {}s",
            spec.svid_ttl.as_secs()
        ),
    }
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
        println!("removed {s}");
    }
    result
}

fn walk(exe: &Path, spec: &spec::LabSpec, paths: &lab::LabPaths) -> Result<(), Error> {
    let Shop { fe, be, .. } = shop(spec)?;
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
    if let (Some(fe6), Some(be6)) = (fe.ipv6, be.ipv6) {
        // A dual-stack lab: the same request over IPv6, through the same tunnel.
        let body6 = exec_in_pod(
            exe,
            &spec.name,
            &fe.qualified_name(),
            &[
                "curl",
                "-sS",
                "-g",
                "--max-time",
                "5",
                &format!("http://[{be6}]:8080/"),
            ],
        )?;
        println!(
            "over IPv6: frontend ({fe6}) -> backend ({be6}): {:?}",
            body6.trim()
        );
    }
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
    // The Service in front of backend: the same request to its ClusterIP, translated once at
    // connect by the socket programs on the pods' cgroup (no NAT rule anywhere).
    if let Some(svc) = after_a
        .services
        .iter()
        .find(|s| s.namespace == be.namespace && s.name == be.name)
    {
        let port = svc.ports.first().map(|p| p.port).unwrap_or(80);
        // An IPv6 ClusterIP is bracketed.
        let svc_url = match svc.cluster_ip.parse::<std::net::IpAddr>() {
            Ok(ip) => format!("http://{}/", std::net::SocketAddr::new(ip, port)),
            Err(_) => format!("http://{}:{port}/", svc.cluster_ip),
        };
        let body = exec_in_pod(
            exe,
            &spec.name,
            &fe.qualified_name(),
            &["curl", "-sS", "--max-time", "5", &svc_url],
        )?;
        println!(
            "Service {}/{} at {svc_url}: {:?}, balanced at connect() by {} socket programs on {}'s pod cgroup",
            svc.namespace,
            svc.name,
            body.trim(),
            after_a.socket_programs.len(),
            fe.node
        );
    }

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
    let Shop { fe, .. } = shop(spec)?;
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
    if spec.identity == spec::IdentityProvider::Spire {
        return spire_rotation(exe, spec, paths, &st, &before);
    }
    let t = Instant::now();
    stdout_of(
        Command::new(exe).args([
            "lab",
            "rotate",
            "--name",
            &spec.name,
            "--pod",
            &fe.qualified_name(),
        ]),
        "",
        "rotate",
    )?;
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

/// When SPIRE's agent renews an SVID: once less than half of its lifetime (from the backdated
/// `notBefore`) is left, i.e. `not_after - (ttl + backdate) / 2`; the agent checks at every
/// sync (1 s in the lab).
fn spire_renewal_unix(spec: &spec::LabSpec, not_after_unix: u64) -> u64 {
    not_after_unix.saturating_sub((spec.svid_ttl + SPIRE_BACKDATE).as_secs() / 2)
}

/// Step 4 on real SPIRE: rather than forcing a new SVID (`lab rotate`, an entry update), the
/// demo shows the registration entry, then waits (bounded) for SPIRE's own renewal of
/// frontend's SVID while frontend keeps calling backend: the rotation users get in production.
fn spire_rotation(
    exe: &Path,
    spec: &spec::LabSpec,
    paths: &lab::LabPaths,
    st: &api::Status,
    before: &str,
) -> Result<(), Error> {
    let Shop { fe, be, .. } = shop(spec)?;
    let id = lab::spire_real::pod_id(spec, &fe.namespace, &fe.service_account);
    let entry = lab::spire_real::server_cli(paths, &["entry", "show", "-spiffeID", &id])?;
    let field = |name: &str| {
        veil_spire::cli::fields(&entry, name)
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "SPIRE registration entry {}: {id}, parent {}, selectors {}, X509-SVID TTL {}",
        field("Entry ID"),
        field("Parent ID"),
        field("Selector"),
        field("X509-SVID TTL")
    );
    let fe_svid = st
        .svids
        .iter()
        .find(|v| v.owner == fe.qualified_name())
        .ok_or_else(|| Error::Step("frontend has no SVID".into()))?;
    let renew_at = spire_renewal_unix(spec, fe_svid.not_after_unix);
    println!(
        "SPIRE renews it at half its lifetime: in ~{}s; frontend calls backend meanwhile",
        renew_at.saturating_sub(crate::cli::unix_now())
    );
    let url = format!("http://{}:8080/", be.ip);
    let bound = spec.svid_ttl + Duration::from_secs(10);
    let t = Instant::now();
    let (mut ok, mut sent) = (0u32, 0u32);
    let (after, now_st) = loop {
        sent += 1;
        if exec_in_pod(
            exe,
            &spec.name,
            &fe.qualified_name(),
            &["curl", "-sS", "--max-time", "2", "-o", "/dev/null", &url],
        )
        .is_ok()
        {
            ok += 1;
        }
        let now_st = status(paths, &fe.node)?;
        match now_st.svids.iter().find(|v| v.owner == fe.qualified_name()) {
            Some(v) if v.serial != before => break (v.serial.clone(), now_st),
            _ if t.elapsed() > bound => {
                return Err(Error::Step(format!(
                    "SPIRE did not rotate frontend's SVID within {bound:?}"
                )))
            }
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    println!(
        "SPIRE rotated frontend's SVID by itself: serial {}.. -> {}.., seen by {}'s agent after waiting {:.1}s; \
         frontend -> backend meanwhile: {ok}/{sent} requests OK",
        &before[..12.min(before.len())],
        &after[..12.min(after.len())],
        fe.node,
        t.elapsed().as_secs_f64()
    );
    for v in &now_st.svids {
        println!(
            "  {:<16} serial {}..  expires in {}s",
            v.owner,
            &v.serial[..v.serial.len().min(12)],
            v.not_after_unix.saturating_sub(crate::cli::unix_now())
        );
    }
    if ok != sent {
        return Err(Error::Step(format!(
            "frontend -> backend failed during the rotation: {ok}/{sent}"
        )));
    }
    Ok(())
}

fn step_policy(exe: &Path, spec: &spec::LabSpec, paths: &lab::LabPaths) -> Result<(), Error> {
    let Shop { fe, be, intruder } = shop(spec)?;
    let url = format!("http://{}:8080/", be.ip);
    println!("\n== 5. identity-based policy in the kernel: only frontend may call backend:8080 ==");
    let policy = paths.root.join("demo-policy.yaml");
    std::fs::write(&policy, DEMO_POLICY).map_err(|e| Error::Step(e.to_string()))?;
    let t = Instant::now();
    let applied = stdout_of(
        Command::new(exe)
            .args(["policy", "apply", "--name", &spec.name, "-f"])
            .arg(&policy),
        "",
        "policy apply",
    )?;
    println!(
        "policy applied; in force on every node after {:.0} ms:",
        t.elapsed().as_secs_f64() * 1e3
    );
    print!("{applied}");
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
    stdout_of(
        Command::new(exe).args(args),
        "",
        &format!("veil {}", args.join(" ")),
    )
}

/// SYN retransmissions so far in a pod's network namespace (`nstat`), if readable.
fn syn_retransmits(exe: &Path, lab: &str, pod: &str) -> Option<u64> {
    let out = exec_in_pod(exe, lab, pod, &["nstat", "-asz", "TcpExtTCPSynRetrans"]).ok()?;
    out.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        (f.next() == Some("TcpExtTCPSynRetrans")).then(|| f.next()?.parse().ok())?
    })
}

/// `curl` from a pod: the HTTP status code and the connect time in ms (what the benches
/// measure too).
pub fn curl_connect(exe: &Path, lab: &str, pod: &str, url: &str) -> Result<(String, f64), Error> {
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
    )?;
    out.split_once(' ')
        .and_then(|(code, t)| Some((code.to_owned(), t.trim().parse::<f64>().ok()? * 1e3)))
        .ok_or_else(|| Error::Step(format!("unexpected curl output `{out}`")))
}

/// `curl` connect time (ms) from a pod, or None when the request failed.
fn connect_ms(exe: &Path, lab: &str, pod: &str, url: &str) -> Option<f64> {
    let (code, ms) = curl_connect(exe, lab, pod, url).ok()?;
    (code == "200").then_some(ms)
}

/// The PSK epoch of `node`'s first control channel (0 before any node handshake).
fn psk_epoch(paths: &lab::LabPaths, node: &str) -> Result<u64, Error> {
    Ok(status(paths, node)?
        .channels
        .first()
        .map(|c| c.epoch)
        .unwrap_or(0))
}

/// A TCP stream and a numbered UDP probe from one pod to another's echo port, `n` lines each.
struct EchoStreams {
    tcp: std::process::Child,
    udp: std::process::Child,
    n: u32,
}

/// What came back of [`EchoStreams`]; prints as `TCP stream 120/120 lines, UDP probe 120/120
/// datagrams, 0 lost`.
struct Echoed {
    tcp: usize,
    udp: usize,
    sent: u32,
}

impl Echoed {
    fn is_complete(&self) -> bool {
        self.tcp + self.udp >= 2 * self.sent as usize
    }
}

impl std::fmt::Display for Echoed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Echoed { tcp, udp, sent: n } = self;
        write!(
            f,
            "TCP stream {tcp}/{n} lines, UDP probe {udp}/{n} datagrams, {} lost",
            (2 * *n as usize).saturating_sub(tcp + udp)
        )
    }
}

impl EchoStreams {
    fn start(
        exe: &Path,
        lab: &str,
        from: &spec::PodSpec,
        to: &spec::PodSpec,
        n: u32,
    ) -> Result<Self, Error> {
        let (pod, ip) = (from.qualified_name(), to.ip.to_string());
        Ok(Self {
            tcp: echo_client(exe, lab, &pod, &ip, n, false)?,
            udp: echo_client(exe, lab, &pod, &ip, n, true)?,
            n,
        })
    }

    /// Lines echoed back on the TCP stream and the UDP probe, once both clients end.
    fn finish(self) -> Echoed {
        Echoed {
            tcp: echoed(self.tcp),
            udp: echoed(self.udp),
            sent: self.n,
        }
    }
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
    let Shop { fe, be, intruder } = shop(spec)?;
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

    let echoed = match spec.identity {
        spec::IdentityProvider::Spire => spire_rotation_under_load(exe, spec, paths, fe, be)?,
        spec::IdentityProvider::Dev => dev_rotation_under_load(exe, lab, paths, fe, be)?,
    };

    // Revocation: the pod's access ends within seconds, established connections included.
    // With SPIRE the entry is deleted and its SVID leaves the agent's stream at the next
    // server cache poll + agent sync (1 s each in the lab).
    let revoke_bound = match spec.identity {
        spec::IdentityProvider::Spire => Duration::from_secs(20),
        spec::IdentityProvider::Dev => Duration::from_secs(10),
    };
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
        if t.elapsed() > revoke_bound {
            return Err(Error::Step(format!(
                "revocation did not remove the auth entries within {revoke_bound:?}"
            )));
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
    if intruder_ok || after.is_some() || !echoed.is_complete() {
        return Err(Error::Step("mutual auth did not behave as promised".into()));
    }
    Ok(())
}

/// Rotation under load on real SPIRE: the streams start ~1.5 s before SPIRE's next renewal of
/// frontend's, backend's or the node's SVID and last until all three renewed (SPIRE's own
/// schedule, half the lifetime; `lab rotate` is the dev server's).
fn spire_rotation_under_load(
    exe: &Path,
    spec: &spec::LabSpec,
    paths: &lab::LabPaths,
    fe: &spec::PodSpec,
    be: &spec::PodSpec,
) -> Result<Echoed, Error> {
    let lab = spec.name.as_str();
    // (what, node whose agent holds it, owner in `veil status`)
    let watched = [
        ("frontend", fe.node.as_str(), fe.qualified_name()),
        ("backend", be.node.as_str(), be.qualified_name()),
        (fe.node.as_str(), fe.node.as_str(), "node".to_string()),
    ];
    let current = |node: &str, owner: &str| -> Result<api::Svid, Error> {
        status(paths, node)?
            .svids
            .into_iter()
            .find(|v| v.owner == owner)
            .ok_or_else(|| Error::Step(format!("no SVID of {owner} on {node}")))
    };
    let mut before = Vec::new();
    for (_, node, owner) in &watched {
        before.push(current(node, owner)?);
    }
    let renewals: Vec<u64> = before
        .iter()
        .map(|v| spire_renewal_unix(spec, v.not_after_unix))
        .collect();
    let (first, last) = (
        *renewals.iter().min().expect("three"),
        *renewals.iter().max().expect("three"),
    );
    let now = crate::cli::unix_now();
    let lead = Duration::from_millis(1500);
    let wait = Duration::from_secs(first.saturating_sub(now)).saturating_sub(lead);
    println!(
        "waiting {:.1}s for SPIRE's next renewals (in {}..{}s), then streaming through them",
        wait.as_secs_f64(),
        first.saturating_sub(now),
        last.saturating_sub(now)
    );
    std::thread::sleep(wait);
    // Lines every 50 ms, covering the renewals plus the agent's 1 s sync and a margin.
    let span = last.saturating_sub(first) + 6;
    let n = (span * 20) as u32 + 30;
    let t = Instant::now();
    let epoch_before = psk_epoch(paths, &fe.node)?;
    let streams = EchoStreams::start(exe, lab, fe, be, n)?;
    let bound = Duration::from_secs(span + 10);
    let mut seen = vec![None; watched.len()];
    while seen.iter().any(Option::is_none) {
        for (i, (_, node, owner)) in watched.iter().enumerate() {
            if seen[i].is_none() {
                let v = current(node, owner)?;
                if v.serial != before[i].serial {
                    seen[i] = Some((v.serial, t.elapsed()));
                }
            }
        }
        if t.elapsed() > bound {
            let _ = streams.finish();
            return Err(Error::Step(format!(
                "SPIRE did not renew all of frontend's, backend's and {}'s SVIDs within {bound:?} of the streams' start",
                fe.node
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let echoed = streams.finish();
    let epoch_after = psk_epoch(paths, &fe.node)?;
    for ((what, _, _), (b, s)) in watched.iter().zip(before.iter().zip(&seen)) {
        let (serial, at) = s.as_ref().expect("all seen");
        println!(
            "  SPIRE renewed {what}'s SVID {:.1}s into the streams: serial {}.. -> {}..",
            at.as_secs_f64(),
            &b.serial[..b.serial.len().min(12)],
            &serial[..serial.len().min(12)]
        );
    }
    println!(
        "under load through SPIRE's renewals: node handshake re-ran (PSK epoch {epoch_before} -> {epoch_after}), pairs re-authenticated; {echoed}",
    );
    Ok(echoed)
}

/// Rotation under load with the dev server: every identity involved rotates (`lab rotate`)
/// while a TCP stream and a numbered UDP probe run.
fn dev_rotation_under_load(
    exe: &Path,
    lab: &str,
    paths: &lab::LabPaths,
    fe: &spec::PodSpec,
    be: &spec::PodSpec,
) -> Result<Echoed, Error> {
    let n = 120;
    let streams = EchoStreams::start(exe, lab, fe, be, n)?;
    let epoch_before = psk_epoch(paths, &fe.node)?;
    std::thread::sleep(Duration::from_millis(800));
    for target in [
        ["--pod", "shop/frontend"],
        ["--pod", "shop/backend"],
        ["--node", fe.node.as_str()],
    ] {
        veil_cmd(exe, &["lab", "rotate", "--name", lab, target[0], target[1]])?;
        std::thread::sleep(Duration::from_millis(1200));
    }
    let echoed = streams.finish();
    let epoch_after = psk_epoch(paths, &fe.node)?;
    println!(
        "rotated frontend's, backend's and {}'s SVIDs under load: node handshake re-ran (PSK epoch {epoch_before} -> {epoch_after}), pairs re-authenticated; {echoed}",
        fe.node,
    );
    Ok(echoed)
}

/// The policies the demo applies are the ones in `examples/policies/`.
const DEMO_POLICY: &str = include_str!("../../examples/policies/backend-ingress.yaml");
const DEMO_AUTH_POLICY: &str = include_str!("../../examples/policies/backend-ingress-auth.yaml");
