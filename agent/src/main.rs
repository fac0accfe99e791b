//! The `veil` command: agent, CLI and lab.

use std::{path::PathBuf, process::ExitCode};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};
use veil_agent::{
    admin, api,
    cli::{self, Output},
    config::Config,
    daemon::Agent,
    demo,
    lab::{self, spec},
};

#[derive(Parser)]
#[command(
    name = "veil",
    version,
    about = "Identity-bound pod encryption and mutual-auth policy, without sidecars"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// A CA rotation of the lab's identity provider, or one step of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum CaStep {
    Prepare,
    Activate,
    Revoke,
    /// prepare, wait until every agent trusts the new root, activate (with --revoke-old: then
    /// re-issue, wait, revoke the old root).
    Rotate,
}

#[derive(Subcommand)]
enum PkiCommand {
    /// Write `bundle.pem` and, per identity, `<name>/svid.pem` + `<name>/key.pem` (0600).
    Write {
        /// Directory to write into (created if missing).
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "lab.veil")]
        trust_domain: String,
        /// Node SVIDs `spiffe://<td>/veil/node/<name>` (repeatable).
        #[arg(long)]
        node: Vec<String>,
        /// Workload SVIDs `spiffe://<td>/ns/<ns>/sa/<sa>` as NAMESPACE/SA (repeatable).
        #[arg(long)]
        workload: Vec<String>,
        /// SVID lifetime (1h, 30s, ...).
        #[arg(long, default_value = "1h")]
        ttl: spec::HumanDuration,
    },
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent.
    Agent {
        #[arg(long)]
        config: PathBuf,
        /// This node's name (sets the config's `node`: one file for every node of a DaemonSet).
        #[arg(long)]
        node: Option<String>,
        /// Serve GET /healthz, /readyz and /metrics on this TCP address (sets `health_addr`).
        #[arg(long, value_name = "ADDR:PORT")]
        health_addr: Option<std::net::SocketAddr>,
    },
    /// Build, inspect and remove a lab cluster on this host.
    Lab {
        #[command(subcommand)]
        command: LabCommand,
    },
    /// Show agent status: backend, peers, SVIDs, auth pairs, programs, counters.
    Status {
        #[arg(long, default_value = spec::DEFAULT_LAB_NAME)]
        name: String,
        /// Only this node (default: every node, one after another).
        #[arg(long)]
        node: Option<String>,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// List the auth pairs the agents hold (every one; `veil status` lists the first 256).
    Auth {
        #[command(subcommand)]
        command: AuthCommand,
    },
    /// Leak self-test: marker traffic between pods on different nodes while capturing the
    /// underlay; fails (exit 1) if anything crossed in clear.
    Check {
        #[arg(long, default_value = spec::DEFAULT_LAB_NAME)]
        name: String,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Apply, delete or list CiliumNetworkPolicy-style policies.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Show flows with their verdict, reason, identities, auth and encryption state.
    Observe {
        #[arg(long, default_value = spec::DEFAULT_LAB_NAME)]
        name: String,
        /// Only flows seen on this node (default: every node).
        #[arg(long)]
        node: Option<String>,
        /// FORWARDED, DROPPED or AUDIT.
        #[arg(long)]
        verdict: Option<String>,
        /// Flows from or to this pod (`name` or `namespace/name`).
        #[arg(long)]
        pod: Option<String>,
        #[arg(long)]
        namespace: Option<String>,
        /// TCP, UDP, ICMP, SCTP.
        #[arg(long)]
        protocol: Option<String>,
        /// `l7`: only the L7 proxy's request records; `l3l4`: only packet records.
        #[arg(long = "type", value_name = "TYPE")]
        kind: Option<String>,
        /// Only flows newer than this (30s, 5m, 1h) or unix seconds.
        #[arg(long)]
        since: Option<String>,
        /// Keep printing new flows as they arrive.
        #[arg(short, long)]
        follow: bool,
        /// At most this many (the newest) per node.
        #[arg(long)]
        last: Option<usize>,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Take a node's tunnel peer off (remove) or put it back (add) on one node.
    Peer {
        #[command(subcommand)]
        command: PeerCommand,
    },
    /// Dev PKI: write a CA bundle and SVIDs (with keys) to disk for tests and experiments.
    Pki {
        #[command(subcommand)]
        command: PkiCommand,
    },
    /// Collect what a lab's veil is doing into one archive for a bug report: each node's
    /// status, metrics, flows, addresses, routes, sockets, BPF attachments and maps, WireGuard
    /// device (keys hidden), every log, and the cluster state. A step that fails is listed in
    /// SUMMARY.txt; the rest is still collected.
    Sysdump {
        #[arg(long, default_value = spec::DEFAULT_LAB_NAME)]
        name: String,
        /// Where to write the archive (default: veil-sysdump-<lab>-<UTC time>.tar.gz here).
        #[arg(long)]
        output: Option<std::path::PathBuf>,
    },
    /// Bring up the default lab and walk through what veil does, with numbers.
    Demo {
        #[arg(long, default_value = spec::DEFAULT_LAB_NAME)]
        name: String,
        /// Leave the lab running at the end.
        #[arg(long)]
        keep: bool,
        /// Who issues SVIDs: `spire` (default; SVID TTL 30 s, SPIRE rotates on its own) or
        /// `dev` (veil's dev server; the demo forces rotations with `lab rotate`).
        #[arg(long)]
        identity: Option<spec::IdentityProvider>,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Apply every policy in a YAML file (all or nothing), then report per node.
    Apply {
        #[arg(long, default_value = spec::DEFAULT_LAB_NAME)]
        name: String,
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// Delete the policies named in a file (-f) or given as namespace/name.
    Delete {
        #[arg(long, default_value = spec::DEFAULT_LAB_NAME)]
        name: String,
        #[arg(short = 'f', long = "file")]
        file: Option<PathBuf>,
        /// `namespace/name` of policies to delete.
        policies: Vec<String>,
    },
    /// List the policies in force.
    List {
        #[arg(long, default_value = spec::DEFAULT_LAB_NAME)]
        name: String,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Node-wide audit mode: would-be policy drops are reported as AUDIT and passed.
    Audit {
        #[arg(long, default_value = spec::DEFAULT_LAB_NAME)]
        name: String,
        /// Only this node (default: every node).
        #[arg(long)]
        node: Option<String>,
        /// on or off.
        state: spec::OnOff,
    },
}

#[derive(Subcommand)]
enum AuthCommand {
    /// The auth pairs (local identity, remote identity, peer node) each agent holds, with their
    /// state, expiry and last result; filters combine.
    List {
        #[arg(long, default_value = spec::DEFAULT_LAB_NAME)]
        name: String,
        /// Only this node's agent (default: every node, one after another).
        #[arg(long)]
        node: Option<String>,
        /// Pairs of this pod's identity (`name` or `namespace/name`), on either side.
        #[arg(long)]
        pod: Option<String>,
        /// Pairs whose remote identity is on this node.
        #[arg(long)]
        peer_node: Option<String>,
        /// authenticated (holds an entry), failing (its last attempt failed) or pending (neither),
        /// as `veil status` counts them.
        #[arg(long)]
        state: Option<veil_agent::mesh::PairState>,
        /// At most this many per node (all match counts are still printed).
        #[arg(long)]
        limit: Option<usize>,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
}

#[derive(Subcommand)]
enum PeerCommand {
    /// Remove PEER's tunnel peer on --node (strict mode then drops traffic to PEER's pods).
    Remove {
        #[arg(long, default_value = spec::DEFAULT_LAB_NAME)]
        name: String,
        /// The node whose tunnel changes.
        #[arg(long)]
        node: String,
        /// The peer node to remove.
        peer: String,
    },
    /// Put PEER's tunnel peer back on --node.
    Add {
        #[arg(long, default_value = spec::DEFAULT_LAB_NAME)]
        name: String,
        #[arg(long)]
        node: String,
        peer: String,
    },
}

#[derive(Subcommand)]
enum LabCommand {
    /// Create and start a lab; waits until it is ready.
    Up {
        #[arg(long, default_value = spec::DEFAULT_LAB_NAME)]
        name: String,
        /// Lab file (YAML) overriding the default topology and options.
        #[arg(short = 'f', long = "file")]
        file: Option<PathBuf>,
        #[arg(long)]
        backend: Option<spec::BackendChoice>,
        /// on|off (off only for the capture sanity check).
        #[arg(long)]
        encryption: Option<spec::OnOff>,
        /// on|off: encrypt the nodes' own traffic (host network) too, not only pod traffic.
        /// Default: the lab file's `node_encryption:`, else off.
        #[arg(long)]
        node_encryption: Option<spec::OnOff>,
        /// ipv4|ipv6|dual: the pods' address families (dual: an IPv4 and an IPv6 address
        /// each; ipv6: only IPv6, over an IPv6 underlay).
        /// Default: the lab file's `ip_family:`, else dual where the pod MTU is at least 1280
        /// (IPv6's minimum), ipv4 below that.
        #[arg(long)]
        ip_family: Option<spec::IpFamily>,
        /// ipv4|ipv6|dual: the nodes' underlay addresses. Default: the lab file's
        /// `underlay_family:`, else the pods' first family. dual (with `--ip-family dual`):
        /// each node has an IPv6 underlay address beside its IPv4 one; WireGuard and the
        /// control channel use the IPv4 one, node traffic encryption covers both.
        #[arg(long)]
        underlay_family: Option<spec::IpFamily>,
        /// SVID TTL, e.g. 30s, 1h.
        #[arg(long)]
        svid_ttl: Option<spec::HumanDuration>,
        /// Who issues SVIDs: `spire` (real spire-server + one spire-agent per node; needs the
        /// SPIRE binaries from scripts/setup.sh) or `dev` (veil's dev server; supports
        /// `lab rotate` and `lab ca`, for tests). Default: the lab file's `identity:`, else spire.
        #[arg(long)]
        identity: Option<spec::IdentityProvider>,
        /// Where the agents read cluster state: `kubernetes` (etcd + kube-apiserver in the lab,
        /// pods made through veil-cni, policies with kubectl) or `files` (the lab's JSON files,
        /// `veil policy`). Default: the lab file's `control_plane:`, else kubernetes.
        #[arg(long)]
        control_plane: Option<spec::ControlPlane>,
        /// No progress output.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Show a lab's nodes and pods.
    Show {
        #[arg(long, default_value = spec::DEFAULT_LAB_NAME)]
        name: String,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Run a command in a pod's netns and cgroup.
    Exec {
        #[arg(long, default_value = spec::DEFAULT_LAB_NAME)]
        name: String,
        /// `name` or `namespace/name`.
        pod: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// List the labs on this host: state (from their processes, not readiness), control
    /// plane, identity, backend, nodes, pods, processes running of those kept, age.
    List {
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Remove everything a lab created (idempotent).
    Down {
        #[arg(long, default_value = spec::DEFAULT_LAB_NAME)]
        name: String,
        /// Every lab `veil lab list` shows, whatever its state.
        #[arg(long, conflicts_with = "name")]
        all: bool,
    },
    /// Renew SVIDs now (dev server: re-issue; SPIRE: `entry update` of their entries, which
    /// bumps the revision and makes the spire-agent mint new SVIDs at its next sync).
    Rotate {
        #[arg(long, default_value = spec::DEFAULT_LAB_NAME)]
        name: String,
        /// A pod (`name` or `namespace/name`).
        #[arg(long, conflicts_with_all = ["node", "all"])]
        pod: Option<String>,
        /// A node's SVID.
        #[arg(long, conflicts_with = "all")]
        node: Option<String>,
        /// Every SVID.
        #[arg(long)]
        all: bool,
    },
    /// Revoke a pod's identity (dev server: at once; SPIRE: its entries are deleted).
    Revoke {
        #[arg(long, default_value = spec::DEFAULT_LAB_NAME)]
        name: String,
        #[arg(long)]
        pod: String,
    },
    /// Rotate the lab's CA: `rotate [--revoke-old]` does it all with waits; or step by step:
    /// `prepare` adds a new root to the bundle, `activate` issues from it, `revoke` drops the
    /// old root (SPIRE: `spire-server localauthority x509 prepare|activate|taint+revoke`).
    Ca {
        #[arg(long, default_value = spec::DEFAULT_LAB_NAME)]
        name: String,
        #[arg(value_enum)]
        step: CaStep,
        /// With `rotate`: also re-issue every SVID of the old authority (SPIRE: taint) and
        /// revoke it once no agent holds one.
        #[arg(long)]
        revoke_old: bool,
    },
    /// (internal) Run the lab's dev SPIRE server.
    #[command(hide = true)]
    SpireServer {
        #[arg(long)]
        name: String,
    },
    /// (internal) Become a node's spire-agent once `lab up` has written its config.
    #[command(hide = true)]
    SpireAgent {
        #[arg(long)]
        name: String,
        #[arg(long)]
        node: String,
    },
    /// (internal) Keep a lab's daemons running.
    #[command(hide = true)]
    Supervise {
        #[arg(long)]
        name: String,
    },
    /// (internal) Forward the host's loopback port to the lab's kube-apiserver.
    #[command(hide = true)]
    ApiProxy {
        #[arg(long)]
        name: String,
    },
    /// (internal) Play kubelet for one node of a Kubernetes-mode lab.
    #[command(hide = true)]
    Kubelet {
        #[arg(long)]
        name: String,
        #[arg(long)]
        node: String,
    },
    /// (internal) Serve http or echo inside a pod.
    #[command(hide = true)]
    Serve {
        #[arg(long)]
        kind: String,
        #[arg(long)]
        port: u16,
        #[arg(long)]
        pod: String,
        #[arg(long)]
        ready_file: PathBuf,
    },
}

/// mimalloc, not glibc's malloc: at 1,000 nodes and 100,000 endpoints glibc kept the agent's
/// freed memory resident between pages in use (ARCHITECTURE.md, "Scale"). Every `veil`
/// subcommand allocates with it.
/// (The `system-allocator` feature leaves glibc's, for heaptrack.)
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in the enum of the mimalloc (v3) that libmimalloc-sys builds.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// The signals veil stops on (the agent and the lab supervisor on SIGTERM and SIGINT, `lab up`
/// also on SIGHUP) are unblocked first: a signal mask is inherited through fork and exec, and a
/// parent that blocked them (the benchmarks' cleanup guard does) left an agent that never saw
/// SIGTERM (found at 1,000 nodes: still running 30 s after it, killed by SIGKILL).
fn unblock_shutdown_signals() {
    use nix::sys::signal::{SigSet, SigmaskHow, Signal};
    let mut set = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        set.add(s);
    }
    // Only fails on a bad `how`: nothing to report.
    let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_UNBLOCK, Some(&set), None);
}

fn main() -> ExitCode {
    // Freed pages go back to the kernel at once, not after mimalloc's default second: an
    // idle agent in a 2-node lab keeps 36 MB resident instead of 43.
    // SAFETY: sets one of mimalloc's options; it is read when mimalloc next frees pages.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
    unblock_shutdown_signals();
    veil_transport::abort_on_panic();
    let cli = Cli::parse();
    if !is_daemon(&cli.command) {
        // A CLI whose reader went away (`veil status | head -1`) ends quietly, as cat and
        // kubectl do, instead of panicking in println!. Daemons keep SIGPIPE ignored: a peer
        // closing a socket must not kill them.
        // SAFETY: resetting a signal disposition before any thread exists.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Long-running processes (agent, lab daemons, pod servers, the demo and `lab up`, which drive
/// child processes through pipes) as opposed to one-shot commands that print a result.
fn is_daemon(c: &Command) -> bool {
    matches!(
        c,
        Command::Agent { .. }
            | Command::Demo { .. }
            | Command::Lab {
                command: LabCommand::Up { .. },
            }
            | Command::Lab {
                command: LabCommand::SpireServer { .. }
                    | LabCommand::SpireAgent { .. }
                    | LabCommand::Supervise { .. }
                    | LabCommand::ApiProxy { .. }
                    | LabCommand::Kubelet { .. }
                    | LabCommand::Serve { .. }
            }
    )
}

/// The dev server's CA rotation (its `activate` re-issues every SVID at once).
struct DevCa<'a>(&'a lab::LabPaths);

impl lab::spire_real::CaProvider for DevCa<'_> {
    fn name(&self) -> &'static str {
        "dev"
    }
    fn prepare(&self) -> lab::Result<String> {
        dev_ca_call(self.0, "prepare")
    }
    fn activate(&self) -> lab::Result<String> {
        dev_ca_call(self.0, "activate")
    }
    fn reissue(&self) -> lab::Result<String> {
        Ok("the dev server re-issued every SVID at activate".into())
    }
    fn reissued(&self) -> lab::Result<bool> {
        Ok(true)
    }
    fn revoke(&self) -> lab::Result<String> {
        dev_ca_call(self.0, "revoke")
    }
}

fn dev_ca_call(paths: &lab::LabPaths, step: &str) -> lab::Result<String> {
    spire_call(paths, &format!("/v1/ca/{step}"))
        .map_err(|e| lab::Error::Spire(format!("dev server ca {step}: {e:#}")))
}

/// POST to the lab's dev SPIRE server control socket; returns the JSON answer.
fn spire_call(paths: &lab::LabPaths, path: &str) -> Result<String> {
    let body = current_thread_runtime().block_on(admin::call(
        &lab::spire::control_socket(paths),
        hyper::Method::POST,
        path,
        None,
        std::time::Duration::from_secs(10),
    ))?;
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// The lab's node named `node`, or every node when none is named.
fn selected_nodes<'a>(
    spec: &'a spec::LabSpec,
    lab: &str,
    node: Option<&str>,
) -> Result<Vec<&'a spec::NodeSpec>> {
    Ok(match node {
        Some(n) => vec![spec
            .node(n)
            .with_context(|| format!("no node {n:?} in lab {lab:?}"))?],
        None => spec.nodes.iter().collect(),
    })
}

/// GETs `path` from each node's agent and prints what `text` makes of the answer; a node whose
/// agent does not answer is named on stderr and makes the exit code a failure (the others
/// still print).
fn per_node<T: serde::de::DeserializeOwned>(
    paths: &lab::LabPaths,
    nodes: &[&spec::NodeSpec],
    path: &str,
    text: impl Fn(&T) -> Result<String>,
) -> Result<ExitCode> {
    let rt = current_thread_runtime();
    let mut failed = false;
    for n in nodes {
        match rt.block_on(admin::get_json::<T>(&paths.admin_socket(&n.name), path)) {
            Ok(answer) => print!("{}", text(&answer)?),
            Err(e) => {
                eprintln!("error: node {}: {e}", n.name);
                failed = true;
            }
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn current_thread_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Agent {
            config,
            node,
            health_addr,
        } => {
            let overrides: Vec<(&str, String)> = [
                node.map(|n| ("node", n)),
                health_addr.map(|a| ("health_addr", a.to_string())),
            ]
            .into_iter()
            .flatten()
            .collect();
            run_agent(&config, &overrides)
        }
        Command::Lab { command } => run_lab(command),
        Command::Status { name, node, output } => {
            let (spec, paths) = lab::load(&name)?;
            let nodes = selected_nodes(&spec, &name, node.as_deref())?;
            per_node(&paths, &nodes, "/v1/status", |st: &api::Status| {
                Ok(match output {
                    Output::Json => serde_json::to_string(st)? + "\n",
                    Output::Table => cli::format_status(st) + "\n",
                })
            })
        }
        Command::Auth {
            command:
                AuthCommand::List {
                    name,
                    node,
                    pod,
                    peer_node,
                    state,
                    limit,
                    output,
                },
        } => {
            let (spec, paths) = lab::load(&name)?;
            let nodes = selected_nodes(&spec, &name, node.as_deref())?;
            if let Some(p) = &pod {
                spec.find_pod(p).map_err(anyhow::Error::msg)?;
            }
            if let Some(n) = &peer_node {
                selected_nodes(&spec, &name, Some(n))?;
            }
            let query: String = [
                ("pod", pod),
                ("peer_node", peer_node),
                ("state", state.map(|s| s.to_string())),
                ("limit", limit.map(|l| l.to_string())),
            ]
            .into_iter()
            .filter_map(|(k, v)| Some(format!("&{k}={}", admin::percent_encode(&v?))))
            .collect();
            let path = format!("/v1/auth?{}", query.trim_start_matches('&'));
            per_node(&paths, &nodes, &path, |l: &api::AuthPairList| {
                Ok(match output {
                    Output::Json => serde_json::to_string(l)? + "\n",
                    Output::Table => cli::format_auth_list(l),
                })
            })
        }
        Command::Check { name, output } => {
            let (spec, paths) = lab::load(&name)?;
            let report = veil_agent::check::run(&spec, &paths)?;
            match output {
                Output::Json => println!("{}", serde_json::to_string(&report)?),
                Output::Table => print!("{}", veil_agent::check::format_report(&report)),
            }
            Ok(if report.pass {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Policy { command } => run_policy(command),
        Command::Observe {
            name,
            node,
            verdict,
            pod,
            namespace,
            protocol,
            kind,
            since,
            follow,
            last,
            output,
        } => {
            if let Some(k) = &kind {
                k.parse::<veil_agent::flows::FlowType>()
                    .map_err(|e| anyhow::anyhow!("--type: {e}"))?;
            }
            let (spec, paths) = lab::load(&name)?;
            let nodes: Vec<String> = match &node {
                Some(n) => vec![spec
                    .node(n)
                    .with_context(|| format!("no node {n:?} in lab {name:?}"))?
                    .name
                    .clone()],
                None => spec.nodes.iter().map(|n| n.name.clone()).collect(),
            };
            let verdict = verdict
                .as_deref()
                .map(str::parse::<veil_agent::flows::Verdict>)
                .transpose()
                .map_err(|e| anyhow::anyhow!("--verdict: {e}"))?;
            if let Some(p) = &pod {
                spec.find_pod(p).map_err(anyhow::Error::msg)?;
            }
            let since_ns = since
                .as_deref()
                .map(|s| veil_agent::flows::parse_since(s, std::time::SystemTime::now()))
                .transpose()
                .map_err(anyhow::Error::msg)?;
            let mut query = String::new();
            let mut add =
                |k: &str, v: &str| query.push_str(&format!("&{k}={}", admin::percent_encode(v)));
            if let Some(v) = verdict {
                add("verdict", v.as_str())
            }
            if let Some(v) = &pod {
                add("pod", v)
            }
            if let Some(v) = &namespace {
                add("namespace", v)
            }
            if let Some(v) = &protocol {
                add("protocol", v)
            }
            if let Some(v) = &kind {
                add("type", v)
            }
            if let Some(v) = since_ns {
                add("since_unix_ns", &v.to_string())
            }
            if let Some(v) = last {
                add("limit", &v.to_string())
            }
            let rt = current_thread_runtime();
            let mut cursors: std::collections::BTreeMap<String, u64> = Default::default();
            if output == Output::Table {
                println!("{}", veil_agent::flows::format_table_header());
            }
            loop {
                let mut batch = Vec::new();
                for n in &nodes {
                    let after = cursors
                        .get(n)
                        .map(|c| format!("&after_seq={c}"))
                        .unwrap_or_default();
                    let path = format!("/v1/flows?x=1{query}{after}");
                    let flows: Vec<veil_agent::flows::Flow> = rt
                        .block_on(admin::get_json(&paths.admin_socket(n), &path))
                        .with_context(|| format!("node {n}"))?;
                    if let Some(f) = flows.last() {
                        cursors.insert(n.clone(), f.seq);
                    }
                    batch.extend(flows);
                }
                batch.sort_by_key(|f| f.time_unix_ns);
                for f in &batch {
                    match output {
                        Output::Json => println!("{}", serde_json::to_string(f)?),
                        Output::Table => println!("{}", veil_agent::flows::format_table_row(f)),
                    }
                }
                if !follow {
                    break;
                }
                std::io::Write::flush(&mut std::io::stdout())?;
                std::thread::sleep(std::time::Duration::from_millis(500));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Peer { command } => {
            let (name, node, peer, action) = match command {
                PeerCommand::Remove { name, node, peer } => (name, node, peer, "disable"),
                PeerCommand::Add { name, node, peer } => (name, node, peer, "enable"),
            };
            let (spec, paths) = lab::load(&name)?;
            spec.node(&node)
                .with_context(|| format!("no node {node:?} in lab {name:?}"))?;
            spec.node(&peer)
                .with_context(|| format!("no peer node {peer:?} in lab {name:?}"))?;
            let path = format!("/v1/peers/{}/{action}", admin::percent_encode(&peer));
            current_thread_runtime().block_on(admin::call(
                &paths.admin_socket(&node),
                hyper::Method::POST,
                &path,
                None,
                std::time::Duration::from_secs(10),
            ))?;
            println!(
                "{node}: tunnel peer {peer} {}",
                if action == "disable" {
                    "removed"
                } else {
                    "added"
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Pki {
            command:
                PkiCommand::Write {
                    dir,
                    trust_domain,
                    node,
                    workload,
                    ttl,
                },
        } => {
            let td = veil_identity::TrustDomain::new(&trust_domain)
                .map_err(|e| anyhow::anyhow!("--trust-domain {trust_domain:?}: {e}"))?;
            if node.is_empty() && workload.is_empty() {
                anyhow::bail!("say what to issue: --node NAME and/or --workload NAMESPACE/SA");
            }
            let ca = veil_certs_dev::DevCa::new(td)
                .map_err(|e| anyhow::anyhow!("cannot create the dev CA: {e}"))?;
            let mut issued = Vec::new();
            for n in &node {
                let svid = ca
                    .issue_node_svid(n, ttl.0)
                    .map_err(|e| anyhow::anyhow!("--node {n:?}: {e}"))?;
                issued.push((format!("node-{n}"), svid));
            }
            for w in &workload {
                let (ns, sa) = w.split_once('/').with_context(|| {
                    format!("--workload {w:?}: expected NAMESPACE/SERVICEACCOUNT")
                })?;
                let svid = ca
                    .issue_workload_svid(ns, sa, ttl.0)
                    .map_err(|e| anyhow::anyhow!("--workload {w:?}: {e}"))?;
                issued.push((format!("{ns}-{sa}"), svid));
            }
            let refs: Vec<(&str, &veil_identity::Svid)> =
                issued.iter().map(|(n, s)| (n.as_str(), s)).collect();
            let files = veil_certs_dev::write_pki(&dir, &ca.bundle(), &refs)
                .map_err(|e| anyhow::anyhow!("writing the PKI under {}: {e}", dir.display()))?;
            for (name, svid) in &issued {
                println!("{name}: {}", svid.spiffe_id());
            }
            println!("wrote {} files under {}", files.len(), dir.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Sysdump { name, output } => {
            let (spec, paths) = lab::load(&name)?;
            let r = veil_agent::sysdump::run(&spec, &paths, output.as_deref())?;
            for f in &r.failures {
                eprintln!("warning: not collected: {f}");
            }
            println!(
                "wrote {} ({} files, {} steps not collected: see SUMMARY.txt)",
                r.archive.display(),
                r.files,
                r.failures.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo {
            name,
            keep,
            identity,
        } => {
            let exe = std::env::current_exe().context("cannot find the veil binary")?;
            demo::run(
                &exe,
                &demo::Options {
                    name,
                    keep,
                    identity,
                },
            )?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn run_agent(config: &std::path::Path, overrides: &[(&str, String)]) -> Result<ExitCode> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cfg = Config::load_with(config, overrides)?;
    tracing::info!(config = %config.display(), "effective config:\n{}", cfg.to_yaml());
    let rt = current_thread_runtime();
    rt.block_on(async move {
        let span = tracing::info_span!("agent", node = %cfg.node);
        let _enter = span.enter();
        let agent = Agent::new(cfg).await?;
        agent.run(shutdown_signal()).await?;
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(ExitCode::SUCCESS)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

fn run_policy(cmd: PolicyCommand) -> Result<ExitCode> {
    use veil_agent::policy;
    match cmd {
        PolicyCommand::Apply { name, file } => {
            let (spec, paths) = lab::load(&name)?;
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let policies =
                policy::parse_yaml(&text).with_context(|| format!("{}", file.display()))?;
            for p in &policies {
                p.validate_for_apply()
                    .with_context(|| format!("{}: policy {}", file.display(), p.name()))?;
            }
            if spec.control_plane == spec::ControlPlane::Kubernetes {
                return kube_policy_apply(&spec, &paths, &text, &policies);
            }
            let (generation, results) = lab::cp::apply(&paths, policies)?;
            for (n, r) in &results {
                println!("policy {n} {}", format!("{r:?}").to_lowercase());
            }
            report_nodes(&spec, &paths, generation)
        }
        PolicyCommand::Delete {
            name,
            file,
            policies,
        } => {
            let (spec, paths) = lab::load(&name)?;
            let mut names: Vec<(String, String)> = Vec::new();
            // (kind, namespace, name), for the Kubernetes API.
            let mut kinds: Vec<String> = Vec::new();
            if let Some(f) = &file {
                let text = std::fs::read_to_string(f)
                    .with_context(|| format!("cannot read {}", f.display()))?;
                for p in policy::parse_yaml(&text).with_context(|| format!("{}", f.display()))? {
                    let n = p.name();
                    kinds.push(format!("{:?}", p.kind));
                    names.push((n.namespace, n.name));
                }
            }
            for p in &policies {
                let Some((ns, n)) = p.split_once('/') else {
                    bail!("{p:?}: write namespace/name")
                };
                kinds.push("CiliumNetworkPolicy".into());
                names.push((ns.to_string(), n.to_string()));
            }
            if names.is_empty() {
                bail!("say which policies: -f FILE or namespace/name");
            }
            if spec.control_plane == spec::ControlPlane::Kubernetes {
                let ids: Vec<(String, String, String)> = kinds
                    .into_iter()
                    .zip(names)
                    .map(|(k, (ns, n))| (k, ns, n))
                    .collect();
                lab::kube::delete_policies(&paths, &ids)?;
                for (_, ns, n) in &ids {
                    println!("policy {ns}/{n} deleted (kubectl delete)");
                }
                return Ok(ExitCode::SUCCESS);
            }
            let generation = lab::cp::delete(&paths, &names)?;
            for (ns, n) in &names {
                println!("policy {ns}/{n} deleted");
            }
            report_nodes(&spec, &paths, generation)
        }
        PolicyCommand::List { name, output } => {
            let (spec, paths) = lab::load(&name)?;
            if spec.control_plane == spec::ControlPlane::Kubernetes {
                let list = lab::kube::list_policies(&paths)?;
                match output {
                    Output::Json => println!(
                        "{}",
                        serde_json::to_string(&serde_json::json!({ "policies": list
                            .iter()
                            .map(|(n, k)| serde_json::json!({"name": n, "kind": k}))
                            .collect::<Vec<_>>() }))?
                    ),
                    Output::Table => {
                        println!(
                            "{} polic{} (kube-apiserver)",
                            list.len(),
                            if list.len() == 1 { "y" } else { "ies" }
                        );
                        for (n, k) in &list {
                            println!("  {n}  {k}");
                        }
                    }
                }
                return Ok(ExitCode::SUCCESS);
            }
            let (generation, policies) = lab::cp::list(&paths)?;
            match output {
                Output::Json => println!(
                    "{}",
                    serde_json::to_string(
                        &serde_json::json!({ "generation": generation, "policies": policies })
                    )?
                ),
                Output::Table => {
                    println!(
                        "generation {generation}, {} polic{}",
                        policies.len(),
                        if policies.len() == 1 { "y" } else { "ies" }
                    );
                    for p in &policies {
                        println!("  {}  mode {:?}", p.name(), p.mode());
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Audit { name, node, state } => {
            let (spec, paths) = lab::load(&name)?;
            let nodes = selected_nodes(&spec, &name, node.as_deref())?;
            let rt = current_thread_runtime();
            for n in nodes {
                rt.block_on(admin::call(
                    &paths.admin_socket(&n.name),
                    hyper::Method::POST,
                    &format!("/v1/audit?on={}", state.0),
                    None,
                    std::time::Duration::from_secs(10),
                ))
                .with_context(|| format!("node {}", n.name))?;
                println!(
                    "{}: audit mode {}",
                    n.name,
                    if state.0 { "on" } else { "off" }
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Prints how a policy generation landed on each node; fails if any node did not take it.
/// `veil policy apply` on a Kubernetes lab: the file goes to the apiserver as it is, then each
/// node's verdict comes back through the policies' status (as `kubectl get cnp -o yaml` shows).
fn kube_policy_apply(
    spec: &spec::LabSpec,
    paths: &lab::LabPaths,
    text: &str,
    policies: &[veil_agent::policy::Policy],
) -> Result<ExitCode> {
    let ids: Vec<(String, String, String)> = policies
        .iter()
        .map(|p| {
            let n = p.name();
            (format!("{:?}", p.kind), n.namespace, n.name)
        })
        .collect();
    let verdicts =
        lab::kube::apply_policies(paths, spec, text, &ids, std::time::Duration::from_secs(15))?;
    for p in policies {
        println!("policy {} applied (kubectl apply --server-side)", p.name());
    }
    let mut ok = true;
    for (policy, node, v) in verdicts {
        match v {
            Ok(lab::kube::NodeVerdict::Enforced) => println!("{node}: {policy} enforced"),
            Ok(lab::kube::NodeVerdict::Refused(e)) => {
                ok = false;
                println!("{node}: {policy} NOT enforced: {e}");
            }
            Err(e) => {
                ok = false;
                println!("{node}: {policy} NOT applied: {e}");
            }
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn report_nodes(spec: &spec::LabSpec, paths: &lab::LabPaths, generation: u64) -> Result<ExitCode> {
    let mut ok = true;
    for (node, r) in
        lab::cp::wait_applied(spec, paths, generation, std::time::Duration::from_secs(15))
    {
        match r {
            Ok(p) => println!(
                "{node}: generation {} in force ({} policies, {} map entries, {} connections cut)",
                p.generation,
                p.policies.len(),
                p.entries,
                p.conntrack_cut
            ),
            Err(e) => {
                ok = false;
                println!("{node}: NOT applied: {e}");
            }
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn run_lab(cmd: LabCommand) -> Result<ExitCode> {
    match cmd {
        LabCommand::Up {
            name,
            file,
            backend,
            encryption,
            node_encryption,
            ip_family,
            underlay_family,
            svid_ttl,
            identity,
            control_plane,
            quiet,
        } => {
            let lab_file = match &file {
                Some(path) => {
                    let text = std::fs::read_to_string(path)
                        .with_context(|| format!("cannot read lab file {}", path.display()))?;
                    spec::parse_lab_file(&text)?
                }
                None => spec::LabFile::default(),
            };
            let overrides = spec::Overrides {
                encryption: encryption.map(|e| e.0),
                node_encryption: node_encryption.map(|e| e.0),
                ip_family,
                underlay_family,
                svid_ttl: svid_ttl.map(|d| d.0),
                backend,
                identity,
                control_plane,
            };
            let spec = spec::resolve(&name, lab_file, &overrides)?;
            let exe = std::env::current_exe().context("cannot find the veil binary")?;
            if !quiet {
                println!(
                    "lab {}: {} nodes, {} pods",
                    spec.name,
                    spec.nodes.len(),
                    spec.pods.len()
                );
            }
            match lab::up(&spec, &exe, &lab::Progress::new(quiet)) {
                Ok(_) => {
                    if !quiet {
                        // The default topology's frontend and backend, when the lab has them.
                        let pod = |n: &str| spec.pods.iter().find(|p| p.name == n);
                        match (pod("frontend"), pod("backend")) {
                            (Some(_), Some(be)) => println!(
                                "lab {} is up. Try: veil lab exec --name {} frontend -- curl -s -g http://{}/",
                                spec.name,
                                spec.name,
                                std::net::SocketAddr::new(be.ip, 8080)
                            ),
                            _ => println!("lab {} is up. Try: veil lab show --name {}", spec.name, spec.name),
                        }
                    }
                    Ok(ExitCode::SUCCESS)
                }
                // A failed `up` has already removed what it created (or says why it could not).
                Err(e) => Err(e.into()),
            }
        }
        LabCommand::Show { name, output } => {
            let (spec, paths) = lab::load(&name)?;
            let v = lab::view(&spec, &paths);
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&v)?),
                Output::Table => print!("{}", cli::format_lab(&v)),
            }
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Exec { name, pod, command } => {
            let (spec, paths) = lab::load(&name)?;
            match lab::exec_in_pod(&spec, &paths, &pod, &command)? {}
        }
        LabCommand::List { output } => {
            let labs = lab::list::list()?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&labs)?),
                Output::Table if labs.is_empty() => println!("no labs on this host"),
                Output::Table => {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs());
                    print!("{}", lab::list::format_table(&labs, now));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Down { name, all } => {
            let names = if all {
                lab::list::list()?.into_iter().map(|l| l.name).collect()
            } else {
                vec![name]
            };
            if all && names.is_empty() {
                println!("no labs on this host");
            }
            // With --all, one lab that cannot be removed does not keep the others.
            let mut failed = Vec::new();
            for name in names {
                match lab::down(&name) {
                    Ok(s) if s.existed => println!("lab {name} removed: {s}"),
                    Ok(_) => println!("lab {name}: nothing to remove"),
                    Err(e) if all => {
                        eprintln!("lab {name}: {:#}", anyhow::Error::from(e));
                        failed.push(name);
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            if failed.is_empty() {
                Ok(ExitCode::SUCCESS)
            } else {
                anyhow::bail!(
                    "{} not removed (errors above); `veil lab down --name <lab>` retries one",
                    failed.join(", ")
                )
            }
        }
        LabCommand::Rotate {
            name,
            pod,
            node,
            all,
        } => {
            let (spec, paths) = lab::load(&name)?;
            if spec.identity == spec::IdentityProvider::Spire {
                use lab::spire_real::RotateTarget;
                let target = match (&pod, &node, all) {
                    (Some(p), _, _) => {
                        RotateTarget::Pod(spec.find_pod(p).map_err(anyhow::Error::msg)?)
                    }
                    (None, Some(n), _) => {
                        spec.node(n)
                            .with_context(|| format!("no node {n:?} in lab {name:?}"))?;
                        RotateTarget::Node(n)
                    }
                    (None, None, true) => RotateTarget::All,
                    (None, None, false) => bail!("say what to rotate: --pod P, --node N or --all"),
                };
                let entries = lab::spire_real::rotate(&spec, &paths, target)?;
                if entries.is_empty() {
                    bail!("no SPIRE registration entry to rotate (revoked?)");
                }
                println!(
                    "{}",
                    serde_json::json!({
                        "rotated": entries.len(),
                        "entries": entries,
                        "note": format!(
                            "entry update bumped each entry's revision; spire-agents mint new SVIDs at their next sync \
                             (server cache reload {:?} + agent sync {:?})",
                            lab::spire_real::SERVER_CACHE_RELOAD,
                            lab::spire_real::AGENT_SYNC
                        ),
                    })
                );
                return Ok(ExitCode::SUCCESS);
            }
            let query = match (pod, node, all) {
                (Some(p), _, _) => {
                    let p = spec.find_pod(&p).map_err(anyhow::Error::msg)?;
                    format!("pod={}", admin::percent_encode(&p.qualified_name()))
                }
                (None, Some(n), _) => {
                    spec.node(&n)
                        .with_context(|| format!("no node {n:?} in lab {name:?}"))?;
                    format!("node={}", admin::percent_encode(&n))
                }
                (None, None, true) => "all=1".to_string(),
                (None, None, false) => bail!("say what to rotate: --pod P, --node N or --all"),
            };
            let body = spire_call(&paths, &format!("/v1/rotate?{query}"))?;
            println!("{body}");
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Ca {
            name,
            step,
            revoke_old,
        } => {
            let (spec, paths) = lab::load(&name)?;
            if revoke_old && step != CaStep::Rotate {
                bail!("--revoke-old goes with `lab ca rotate`");
            }
            let spire = spec.identity == spec::IdentityProvider::Spire;
            let body = match (step, spire) {
                (CaStep::Rotate, true) => serde_json::to_string(&lab::spire_real::ca_rotate(
                    &spec,
                    &paths,
                    &lab::spire_real::SpireCa::new(&spec, &paths),
                    revoke_old,
                )?)?,
                (CaStep::Rotate, false) => serde_json::to_string(&lab::spire_real::ca_rotate(
                    &spec,
                    &paths,
                    &DevCa(&paths),
                    revoke_old,
                )?)?,
                (CaStep::Prepare, true) => serde_json::json!({
                    "prepared": lab::spire_real::ca_prepare(&paths)?
                })
                .to_string(),
                (CaStep::Activate, true) => serde_json::json!({
                    "activated": lab::spire_real::ca_activate(&paths)?
                })
                .to_string(),
                (CaStep::Revoke, true) => serde_json::json!({
                    "revoked": lab::spire_real::ca_revoke_step(&paths)?
                })
                .to_string(),
                (CaStep::Prepare, false) => spire_call(&paths, "/v1/ca/prepare")?,
                (CaStep::Activate, false) => spire_call(&paths, "/v1/ca/activate")?,
                (CaStep::Revoke, false) => spire_call(&paths, "/v1/ca/revoke")?,
            };
            println!("{body}");
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Revoke { name, pod } => {
            let (spec, paths) = lab::load(&name)?;
            let p = spec.find_pod(&pod).map_err(anyhow::Error::msg)?;
            if spec.identity == spec::IdentityProvider::Spire {
                let (id, entries) = lab::spire_real::revoke(&spec, &paths, p)?;
                if entries.is_empty() {
                    bail!("no SPIRE registration entry for {id} (already revoked?)");
                }
                let sa = format!("{}/{}", p.namespace, p.service_account);
                println!(
                    "{}",
                    serde_json::json!({
                        "revoked": id,
                        "deleted_entries": entries,
                        "note": format!(
                            "SPIRE entries are per SPIFFE ID: every pod of service account {sa} loses its SVID; \
                             spire-agents drop it at their next sync (server cache reload {:?} + agent sync {:?})",
                            lab::spire_real::SERVER_CACHE_RELOAD,
                            lab::spire_real::AGENT_SYNC
                        ),
                    })
                );
                return Ok(ExitCode::SUCCESS);
            }
            let body = spire_call(
                &paths,
                &format!(
                    "/v1/revoke?pod={}",
                    admin::percent_encode(&p.qualified_name())
                ),
            )?;
            println!("{body}");
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::SpireServer { name } => {
            let (spec, paths) = lab::load(&name)?;
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()?
                .block_on(lab::spire::run(&spec, &paths))?;
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::SpireAgent { name, node } => {
            let paths = lab::LabPaths::new(&name)?;
            match lab::spire_real::exec_agent(&paths, &node)? {}
        }
        LabCommand::Supervise { name } => {
            let paths = lab::LabPaths::new(&name)?;
            lab::supervisor::run(&paths)?;
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::ApiProxy { name } => {
            let (spec, paths) = lab::load(&name)?;
            lab::kube::api_proxy(&spec, &paths)?;
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Kubelet { name, node } => {
            let (spec, paths) = lab::load(&name)?;
            lab::kubelet::run(&spec, &paths, &node)?;
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Serve {
            kind,
            port,
            pod,
            ready_file,
        } => {
            if kind != "http" && kind != "echo" {
                bail!("--kind: expected http or echo, got {kind:?}");
            }
            current_thread_runtime().block_on(lab::serve::run(&kind, port, pod, &ready_file))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn shutdown_signals_blocked_by_a_parent_are_unblocked() {
        use nix::sys::signal::{SigSet, SigmaskHow, Signal};
        let mut set = SigSet::empty();
        set.add(Signal::SIGTERM);
        set.add(Signal::SIGINT);
        // This test's own thread: a signal mask is per thread.
        nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set), None).unwrap();
        super::unblock_shutdown_signals();
        let mut now = SigSet::empty();
        nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, None, Some(&mut now)).unwrap();
        assert!(!now.contains(Signal::SIGTERM) && !now.contains(Signal::SIGINT));
    }
}
