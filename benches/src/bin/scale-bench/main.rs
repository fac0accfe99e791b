//! scale-bench: one real agent in a simulated cluster (scale issue). How node-a's agent's cost
//! grows with the cluster around it.
//!
//! A 2-node lab (benches/labs/bench.yaml, IPv4) runs real agents, programs, maps and veil-wg.
//! Around it the bench puts, through the agent's real cluster source, a simulated cluster at
//! each size: N peer nodes (own names, underlay addresses and pod CIDRs), E remote endpoints
//! (pods without processes behind them) over 1,000 identities, and R policy rules, 1 % of them
//! selecting node-a's pods, plus one `authentication: required` policy over all identities.
//!
//! - `--source kubernetes` (default): a fresh Kubernetes-mode lab per size; the simulated
//!   cluster is created in its real kube-apiserver as Namespaces, Nodes (InternalIP, podCIDR),
//!   Pods (created on their node, then given their address through the status subresource, as a
//!   kubelet reports it) and one CiliumNetworkPolicy per rule. The agents list and watch them and
//!   allocate the identities as `VeilIdentity` objects, as in a cluster.
//! - `--source files`: one files-mode lab; each size is written into the lab's `cluster.json`
//!   and `policies.json`, which the agents watch (inotify; a 250 ms poll as a fallback).
//!
//! The simulated peers never answer: mutual auth is on, so their node handshakes are measured
//! one-sided (the agent dials, nothing answers, no tunnel key is ever installed for them: fail
//! closed).
//!
//! At each size it measures node-a's agent:
//! - the whole simulated cluster published → its policy installed and its last endpoint in the
//!   ipcache (with Kubernetes, the time to create the objects is also reported on its own);
//! - RSS (VmRSS) after it settled, and its peak (VmHWM);
//! - idle CPU over `--idle-seconds` after `--settle-seconds` (the periodic reconcile and the
//!   redials of the silent peers included);
//! - one policy change (one rule's port) → installed, seen in the agent's log, end to end and
//!   as the agent's own compile + install time (`took_ms`);
//! - one pod added on a simulated node → its address in the pinned ipcache with its identity
//!   (with Kubernetes, from the status write that gives the created Pod its address);
//! - a restart (SIGKILL, the lab's supervisor restarts it) → ready again, from the new
//!   process's start;
//! - the control-channel dials node-a makes to the silent peers per second (TCP active opens
//!   in node-a's netns).
//!
//! Prints a table, writes `scale-kubernetes.json` or `scale.json`. Needs root.

use std::{
    io::{Read as _, Seek as _, SeekFrom},
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use clap::Parser;
use serde_json::Value;
use veil_agent::{
    cluster::{files::FileSource, ClusterState, Pod},
    lab::sim::{
        ipcache, ipcache_identity, policy_objects, policy_set, rule_object, simulate, Size,
    },
};
use veil_benches::{cleanup, lab::Lab, procs, report::median_or_nan};
use veil_common::maps::IPCACHE;

mod chart;
mod kube;

#[derive(Parser, Debug)]
#[command(about = "One real agent in a simulated cluster of 10 to 1,000 nodes")]
struct Args {
    /// Sizes as NODES:ENDPOINTS:RULES, comma separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "10:1000:100,100:10000:1000,1000:100000:10000"
    )]
    sizes: Vec<Size>,
    /// Identities the simulated endpoints are spread over.
    #[arg(long, default_value_t = 1000)]
    identities: usize,
    /// Rounds of the policy-change and pod-add measurements at each size.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Seconds of the idle CPU window (the agent reconciles every 5 s). Longer than the
    /// silent peers' redial interval (30 to 45 s), so the dial rate is an average over a cycle.
    #[arg(long, default_value_t = 45)]
    idle_seconds: u64,
    /// Seconds to let the agent settle after the cluster is applied before the idle window:
    /// a silent peer's dials fail after about 3 s (no ARP answer) and back off, spread by
    /// jitter, from 0.5 s to the 30 s cap, which they reach after 50 to 75 s.
    #[arg(long, default_value_t = 90)]
    settle_seconds: u64,
    /// The agent's cluster source the simulated cluster goes through: `kubernetes` (objects
    /// in the lab's kube-apiserver, a fresh lab per size) or `files` (the lab's cluster.json).
    #[arg(long, default_value = "kubernetes")]
    source: Source,
    /// Only draw `scale-chart.png` again from the results files in the output directory
    /// (`scale.json`, `scale-kubernetes.json`), running nothing.
    #[arg(long)]
    rechart: bool,
    #[command(flatten)]
    dirs: veil_benches::setup::Dirs,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Source {
    Kubernetes,
    Files,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Source::Kubernetes => "kubernetes",
            Source::Files => "files",
        })
    }
}

/// The agent's log, read from where it ended when the bench last looked.
struct Log {
    path: PathBuf,
    offset: u64,
}

impl Log {
    fn new(path: PathBuf) -> anyhow::Result<Self> {
        let offset = std::fs::metadata(&path)
            .with_context(|| format!("{}", path.display()))?
            .len();
        Ok(Log { path, offset })
    }

    /// Skips what is there now.
    fn mark(&mut self) {
        self.offset = std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0);
    }

    /// The first new line containing `needle`, if one was written since the mark.
    fn find(&self, needle: &str) -> Option<String> {
        let mut f = std::fs::File::open(&self.path).ok()?;
        f.seek(SeekFrom::Start(self.offset)).ok()?;
        let mut text = String::new();
        f.read_to_string(&mut text).ok()?;
        text.lines()
            .find(|l| l.contains(needle))
            .map(str::to_string)
    }
}

/// `key=value` of a tracing log line.
fn field(line: &str, key: &str) -> Option<u64> {
    let pat = format!(" {key}=");
    let at = line.find(&pat)? + pat.len();
    line[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

fn wait_until<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        // Poll interval: a tenth of the smallest latency reported.
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// TCP active opens (connect attempts that sent a SYN) in a netns, from `nstat`.
fn active_opens(netns: &str) -> anyhow::Result<u64> {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "cat", "/proc/net/snmp"])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (
        tcp.next().context("Tcp header")?,
        tcp.next().context("Tcp values")?,
    );
    let i = names
        .split_whitespace()
        .position(|n| n == "ActiveOpens")
        .context("ActiveOpens")?;
    values
        .split_whitespace()
        .nth(i)
        .and_then(|v| v.parse().ok())
        .context("ActiveOpens value")
}

/// Routes the simulated nodes' underlay addresses (198.18.4.0/22) out of node-a's underlay
/// interface, so its dials to them send SYNs (counted as TCP active opens) that nothing
/// answers, as dials to nodes that went away would, instead of failing at once.
fn route_simulated_underlay(netns: &str, underlay_ip: &str) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(["-n", netns, "-o", "-4", "addr", "show"])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let ifname = text
        .lines()
        .find(|l| l.contains(&format!(" {underlay_ip}/")))
        .and_then(|l| l.split_whitespace().nth(1))
        .with_context(|| format!("no interface holds {underlay_ip} in {netns}"))?;
    veil_benches::lab::ip_in(netns, &["route", "replace", "198.18.4.0/22", "dev", ifname])
}

/// Seconds since the process started, from /proc.
fn process_age(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = &stat[stat.rfind(')').context("stat")? + 2..];
    let start_ticks: f64 = after
        .split_whitespace()
        .nth(19)
        .and_then(|v| v.parse().ok())
        .context("starttime")?;
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")?
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .context("uptime")?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(uptime - start_ticks / hz)
}

#[derive(Debug, serde::Serialize)]
struct Point {
    size: Size,
    identities: usize,
    ipcache_entries: usize,
    ipcache_capacity: u32,
    policy_entries: usize,
    /// Kubernetes: creating the objects (inside `first_apply_s`).
    populate_s: Option<f64>,
    first_apply_s: f64,
    rss_mb: f64,
    peak_rss_mb: f64,
    idle_cpu_percent: f64,
    policy_change_ms: f64,
    policy_change_agent_ms: f64,
    pod_add_ms: f64,
    restart_to_ready_s: f64,
    rss_after_restart_mb: f64,
    dials_per_s: f64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.identities == 0 {
        bail!("--identities must be at least 1");
    }
    if args.rechart {
        let out_dir = veil_benches::setup::results_dir(args.dirs.out_dir.as_deref())?;
        println!("wrote {}", chart::draw(&out_dir)?.display());
        return Ok(());
    }
    cleanup::reap_stale();
    let _guard = cleanup::install_signal_cleanup();
    let bin_dir = veil_benches::setup::release_bins(args.dirs.bin_dir.as_deref(), &["veil"])?;
    let veil = bin_dir.join("veil");
    let out_dir = veil_benches::setup::results_dir(args.dirs.out_dir.as_deref())?;
    let mut points = Vec::new();
    let (run, results) = match args.source {
        Source::Files => (
            files_source(&args, &veil, &out_dir, &mut points),
            "scale.json",
        ),
        Source::Kubernetes => (
            kubernetes_source(&args, &veil, &out_dir, &mut points),
            "scale-kubernetes.json",
        ),
    };
    run?;
    print_table(&points);
    let json = serde_json::json!({
        "machine": veil_benches::setup::machine(),
        "source": args.source.to_string(),
        "file_source": "inotify (250 ms poll as a fallback)",
        "points": points,
    });
    veil_benches::setup::write_results(&out_dir, results, &json)?;
    println!("wrote {}", chart::draw(&out_dir)?.display());
    Ok(())
}

const LAB_FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/labs/bench.yaml");

/// One files-mode lab for every size: each size's cluster replaces the last one in the lab's
/// `cluster.json` and `policies.json`.
fn files_source(
    args: &Args,
    veil: &Path,
    out_dir: &Path,
    points: &mut Vec<Point>,
) -> anyhow::Result<()> {
    let lab = Lab::up(
        veil,
        "vscale",
        Path::new(LAB_FILE),
        &["--quiet", "--ip-family", "ipv4"],
    )?;
    let root = PathBuf::from("/run/veil").join(lab.name());
    let cp = root.join("cp");
    let base: ClusterState = serde_json::from_slice(&std::fs::read(FileSource::state_path(&cp))?)
        .context("the lab's cluster.json")?;
    let mut driver = Files {
        generation: FileSource::read_policies(&cp)?.0,
        cp,
        base,
        state: ClusterState::default(),
        rules: 0,
        needle: String::new(),
    };
    let run = args.sizes.iter().try_for_each(|size| {
        points.push(measure(args, &lab, veil, *size, &mut driver)?);
        anyhow::Ok(())
    });
    // Leave the lab as it was before `lab down` reads it; keep node-a's agent log.
    FileSource::write(&driver.cp, &driver.base)?;
    keep_log(&lab, out_dir, "scale-agent-node-a.log")?;
    lab.down();
    run
}

/// A fresh Kubernetes-mode lab for each size: the simulated cluster is created as API objects
/// in its kube-apiserver, which both agents (and the lab's two kubelets) list and watch.
fn kubernetes_source(
    args: &Args,
    veil: &Path,
    out_dir: &Path,
    points: &mut Vec<Point>,
) -> anyhow::Result<()> {
    for size in &args.sizes {
        let lab = Lab::up_with(
            veil,
            "vscalek",
            "kubernetes",
            Path::new(LAB_FILE),
            &["--quiet", "--ip-family", "ipv4"],
        )?;
        let run = (|| {
            let kubeconfig = lab
                .view
                .kubernetes
                .as_ref()
                .context("the lab shows no kubernetes block")?
                .kubeconfig
                .clone();
            let mut driver = Kube {
                sim: kube::Sim::connect(&kubeconfig)?,
                veil: veil.to_path_buf(),
                lab: lab.name().to_string(),
                want: Vec::new(),
                last_check: std::cell::Cell::new(Instant::now()),
                state: ClusterState::default(),
                populated: None,
            };
            measure(args, &lab, veil, *size, &mut driver)
        })();
        let log = format!("scale-kubernetes-{}-agent-node-a.log", size.nodes);
        let kept = keep_log(&lab, out_dir, &log);
        lab.down();
        points.push(run?);
        kept?;
    }
    Ok(())
}

fn keep_log(lab: &Lab, out_dir: &Path, name: &str) -> anyhow::Result<()> {
    let log = agent_log(lab);
    let kept = out_dir.join(name);
    std::fs::copy(&log, &kept).with_context(|| format!("{}", log.display()))?;
    println!("node-a's agent log: {}", kept.display());
    Ok(())
}

fn agent_log(lab: &Lab) -> PathBuf {
    PathBuf::from("/run/veil")
        .join(lab.name())
        .join("logs/agent-node-a.log")
}

/// How the simulated cluster reaches the agent: its cluster source.
trait Driver {
    /// Publishes the simulated cluster of `size`; the address of its last endpoint.
    fn apply(&mut self, size: Size, identities: usize) -> anyhow::Result<IpAddr>;
    /// Whether the agent installed the policies `apply` published (polled).
    fn applied(&self, log: &Log) -> bool;
    /// Publishes round `round`'s change of rule 0's port; the log line saying it is installed.
    fn change_policy(&mut self, identities: usize, round: usize) -> anyhow::Result<String>;
    /// Makes `pod` known to the source without an address (not an endpoint yet).
    fn prepare_pod(&mut self, pod: &Pod) -> anyhow::Result<()>;
    /// Gives it its address: the source's event the pod-add latency is measured from.
    fn publish_pod(&mut self, pod: &Pod) -> anyhow::Result<()>;
    /// The simulated cluster last published.
    fn state(&self) -> &ClusterState;
    /// How long creating it took, where that is separate from the agent's work.
    fn populated(&self) -> Option<kube::Populated> {
        None
    }
}

/// The lab's `cluster.json` and `policies.json`, which the agents watch.
struct Files {
    cp: PathBuf,
    base: ClusterState,
    generation: u64,
    state: ClusterState,
    /// Rules of the size applied last.
    rules: usize,
    needle: String,
}

impl Files {
    fn write_policies(&mut self, objects: &[Value]) -> anyhow::Result<String> {
        let set = policy_set(objects)?;
        self.generation += 1;
        FileSource::write_policies(&self.cp, self.generation, &set)?;
        Ok(format!("policy installed generation={} ", self.generation))
    }
}

impl Driver for Files {
    fn apply(&mut self, size: Size, identities: usize) -> anyhow::Result<IpAddr> {
        self.state = simulate(&self.base, size, identities)?;
        self.rules = size.rules;
        let last = self.state.pods.last().map(|p| p.ip).context("no pods")?;
        self.needle = self.write_policies(&policy_objects(size.rules, identities, 0))?;
        FileSource::write(&self.cp, &self.state)?;
        Ok(last)
    }

    fn applied(&self, log: &Log) -> bool {
        log.find(&self.needle).is_some()
    }

    fn change_policy(&mut self, identities: usize, round: usize) -> anyhow::Result<String> {
        self.write_policies(&policy_objects(self.rules, identities, 1 + round as u16))
    }

    fn prepare_pod(&mut self, pod: &Pod) -> anyhow::Result<()> {
        std::sync::Arc::make_mut(&mut self.state.pods).push(pod.clone().into());
        self.state.generation += 1;
        self.state.index = Default::default();
        Ok(())
    }

    fn publish_pod(&mut self, _pod: &Pod) -> anyhow::Result<()> {
        Ok(FileSource::write(&self.cp, &self.state)?)
    }

    fn state(&self) -> &ClusterState {
        &self.state
    }
}

/// Objects in the lab's kube-apiserver.
struct Kube {
    sim: kube::Sim,
    veil: PathBuf,
    lab: String,
    /// The policies node-a must list in force once the cluster is applied.
    want: Vec<String>,
    last_check: std::cell::Cell<Instant>,
    state: ClusterState,
    populated: Option<kube::Populated>,
}

impl Driver for Kube {
    fn apply(&mut self, size: Size, identities: usize) -> anyhow::Result<IpAddr> {
        self.state = simulate(&ClusterState::default(), size, identities)?;
        let last = self.state.pods.last().map(|p| p.ip).context("no pods")?;
        let policies = policy_objects(size.rules, identities, 0);
        self.want = policies
            .iter()
            .map(|o| {
                format!(
                    "{}/{}",
                    o["metadata"]["namespace"].as_str().unwrap_or_default(),
                    o["metadata"]["name"].as_str().unwrap_or_default()
                )
            })
            .collect();
        let namespaces: std::collections::BTreeSet<String> = self
            .state
            .pods
            .iter()
            .map(|p| p.namespace.clone())
            .chain(
                self.want
                    .iter()
                    .filter_map(|w| Some(w.split_once('/')?.0.to_string())),
            )
            .filter(|ns| ns != "bench")
            .collect();
        let namespaces: Vec<String> = namespaces.into_iter().collect();
        let populated =
            self.sim
                .populate(&namespaces, &self.state.nodes, &self.state.pods, &policies)?;
        println!(
            "   populated: {} requests in {:.1} s",
            populated.requests, populated.seconds
        );
        self.populated = Some(populated);
        Ok(last)
    }

    fn applied(&self, _log: &Log) -> bool {
        // `veil status` costs the agent work: at most twice a second.
        if self.last_check.get().elapsed() < Duration::from_millis(500) {
            return false;
        }
        self.last_check.set(Instant::now());
        let Ok(st) = status(&self.veil, &self.lab) else {
            return false;
        };
        self.want.iter().all(|w| st.policy.policies.contains(w))
    }

    fn change_policy(&mut self, identities: usize, round: usize) -> anyhow::Result<String> {
        self.sim
            .replace_policy_spec(&rule_object(0, identities, 1 + round as u16))?;
        Ok("policy installed ".to_string())
    }

    fn prepare_pod(&mut self, pod: &Pod) -> anyhow::Result<()> {
        self.sim.add_pod(pod)?;
        std::sync::Arc::make_mut(&mut self.state.pods).push(pod.clone().into());
        self.state.index = Default::default();
        Ok(())
    }

    fn publish_pod(&mut self, pod: &Pod) -> anyhow::Result<()> {
        self.sim.publish_pod(pod)
    }

    fn state(&self) -> &ClusterState {
        &self.state
    }

    fn populated(&self) -> Option<kube::Populated> {
        self.populated
    }
}

/// One size, through `driver`.
fn measure(
    args: &Args,
    lab: &Lab,
    veil: &Path,
    size: Size,
    driver: &mut dyn Driver,
) -> anyhow::Result<Point> {
    println!(
        "== {} nodes, {} endpoints, {} rules ({} source)",
        size.nodes, size.endpoints, size.rules, args.source
    );
    let node = lab.node("node-a")?.clone();
    let pin_dir = PathBuf::from(&node.pin_dir);
    let netns = node.netns.as_str();
    route_simulated_underlay(netns, &node.underlay_ip)?;
    let mut log = Log::new(agent_log(lab))?;
    let map = ipcache(&pin_dir)?;
    log.mark();
    let t = Instant::now();
    let last = driver.apply(size, args.identities)?;
    wait_until(
        "the simulated cluster applied",
        Duration::from_secs(1800),
        || (driver.applied(&log) && ipcache_identity(&map, last).is_some()).then_some(()),
    )?;
    let first_apply_s = t.elapsed().as_secs_f64();
    let populate_s = driver.populated().map(|p| p.seconds);
    let pid = status(veil, lab.name())?.agent.pid;
    std::thread::sleep(Duration::from_secs(args.settle_seconds));
    // Idle: the agent's CPU over the window, dials to the silent peers counted alongside.
    let (cpu0, opens0) = (procs::cpu_seconds(pid)?, active_opens(netns)?);
    std::thread::sleep(Duration::from_secs(args.idle_seconds));
    let (cpu1, opens1) = (procs::cpu_seconds(pid)?, active_opens(netns)?);
    let idle_cpu_percent = (cpu1 - cpu0) / args.idle_seconds as f64 * 100.0;
    let dials_per_s = (opens1 - opens0) as f64 / args.idle_seconds as f64;
    let (rss, peak) = procs::rss_bytes(pid)?;
    let mut change = Vec::new();
    let mut change_agent = Vec::new();
    for r in 0..args.rounds {
        log.mark();
        let t = Instant::now();
        let needle = driver.change_policy(args.identities, r)?;
        let line = wait_until(
            "the policy change installed",
            Duration::from_secs(120),
            || log.find(&needle),
        )?;
        change.push(t.elapsed().as_secs_f64() * 1e3);
        change_agent.push(field(&line, "took_ms").context("took_ms in the log")? as f64);
    }
    let mut pod_add = Vec::new();
    for r in 0..args.rounds {
        let state = driver.state();
        let like = state.pods.last().context("no pods")?.clone();
        let want = ipcache_identity(&map, like.ip)
            .with_context(|| format!("{} ({}) not in the ipcache", like.name, like.ip))?;
        let mut pod = (*like).clone();
        pod.name = format!("added-{r}");
        // The last address of sim-0000's CIDR that the round-robin left free.
        let net = state
            .nodes
            .iter()
            .find(|n| n.name == "sim-0000")
            .context("sim-0000")?;
        let (addr, len) = veil_agent::cluster::parse_cidr_v4(&net.pod_cidr).context("cidr")?;
        let top = u32::from(addr) + (1 << (32 - len)) - 2 - r as u32;
        pod.ip = Ipv4Addr::from(top).into();
        pod.node = net.name.clone();
        if state.pod_by_ip(pod.ip).is_some() {
            bail!("{} is taken: no free address to add a pod at", pod.ip);
        }
        driver.prepare_pod(&pod)?;
        let t = Instant::now();
        driver.publish_pod(&pod)?;
        wait_until(
            "the added pod in the ipcache",
            Duration::from_secs(60),
            || (ipcache_identity(&map, pod.ip) == Some(want)).then_some(()),
        )?;
        pod_add.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let st = status(veil, lab.name())?;
    let (ipcache_entries, ipcache_capacity) = st
        .maps
        .iter()
        .find(|m| m.name == IPCACHE)
        .map(|m| (m.entries, m.capacity))
        .unwrap_or((0, 0));
    let policy_entries = st.policy.entries;
    // Restart: SIGKILL; the lab's supervisor starts a new agent, which re-adopts its pins.
    nix_kill(pid)?;
    let (new_pid, age) = wait_until(
        "the restarted agent ready",
        Duration::from_secs(300),
        || {
            let s = status(veil, lab.name()).ok()?;
            (s.agent.pid != pid && s.ready).then(|| (s.agent.pid, process_age(s.agent.pid).ok()))
        },
    )?;
    let restart_to_ready_s = age.context("new agent's start time")?;
    let (rss_after_restart, _) = procs::rss_bytes(new_pid)?;
    let p = Point {
        size,
        identities: args.identities,
        ipcache_entries,
        ipcache_capacity,
        policy_entries,
        populate_s,
        first_apply_s,
        rss_mb: rss as f64 / 1e6,
        peak_rss_mb: peak as f64 / 1e6,
        idle_cpu_percent,
        policy_change_ms: median_or_nan(change),
        policy_change_agent_ms: median_or_nan(change_agent),
        pod_add_ms: median_or_nan(pod_add),
        restart_to_ready_s,
        rss_after_restart_mb: rss_after_restart as f64 / 1e6,
        dials_per_s,
    };
    println!("{}", serde_json::to_string(&p)?);
    Ok(p)
}

/// `veil status --node node-a -o json`.
fn status(veil: &Path, lab: &str) -> anyhow::Result<veil_agent::api::Status> {
    veil_benches::lab::status(veil, lab, "node-a")
}

fn nix_kill(pid: u32) -> anyhow::Result<()> {
    // SAFETY: kill(2) with a pid this bench read from the agent's own status.
    if unsafe { libc::kill(pid as i32, libc::SIGKILL) } != 0 {
        bail!("kill {pid}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn print_table(points: &[Point]) {
    println!(
        "\n{:>6} {:>8} {:>6} | {:>8} {:>8} {:>7} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7}",
        "nodes",
        "endpts",
        "rules",
        "apply s",
        "RSS MB",
        "idle %",
        "pol ms",
        "pol(ag)",
        "pod ms",
        "restart",
        "ipcache",
        "dials/s"
    );
    for p in points {
        println!(
            "{:>6} {:>8} {:>6} | {:>8.2} {:>8.1} {:>7.2} {:>8.0} {:>8.0} {:>8.0} {:>8.2} {:>8} {:>7.1}",
            p.size.nodes,
            p.size.endpoints,
            p.size.rules,
            p.first_apply_s,
            p.rss_mb,
            p.idle_cpu_percent,
            p.policy_change_ms,
            p.policy_change_agent_ms,
            p.pod_add_ms,
            p.restart_to_ready_s,
            p.ipcache_entries,
            p.dials_per_s
        );
    }
    println!(
        "targets at the largest size: RSS ≤ 150 MB; policy change ≤ 1,000 ms; pod added ≤ 1,000 ms"
    );
}
