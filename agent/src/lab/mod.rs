//! lab: a small cluster on one host out of network namespaces, veths and cgroups, with a node
//! agent per node and pods that run real servers. The README's main job and the end-to-end
//! tests' fixture.
//!
//! Everything a lab creates is named after the lab and recorded in its journal before it is
//! created, so `veil lab down` removes it all, idempotently, even after `up` was killed.

pub mod cp;
pub mod journal;
pub mod kube;
pub mod kubelet;
pub mod list;
pub mod serve;
pub mod sim;
pub mod spec;
pub mod spire;
pub mod spire_real;
pub mod supervisor;

use std::{
    io::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::{
    cluster::{self, files::FileSource, ClusterState},
    config::{Config, SourceConfig},
    sys,
};
use journal::{Journal, Resource};
use spec::LabSpec;

/// Errors running a lab command.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Spec(#[from] spec::Error),
    #[error(transparent)]
    Sys(#[from] sys::Error),
    #[error(transparent)]
    Journal(#[from] journal::Error),
    #[error("lab {0:?} already exists; remove it first with `veil lab down --name {0}`")]
    Exists(String),
    #[error("no lab named {0:?} (start one with `veil lab up --name {0}`)")]
    NotFound(String),
    #[error("lab {lab:?} state is unreadable: {path}")]
    BadState {
        lab: String,
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// The tail of the log is in the message: a failed `up` removes the lab, log files included.
    #[error("{what} not ready after {waited:?}; the last lines of its log ({log}):\n{log_tail}")]
    NotReady {
        what: String,
        waited: Duration,
        log: PathBuf,
        log_tail: String,
    },
    #[error("lab {lab:?} cannot be created: {what} already exists (not made by this lab; remove it or choose another --name)")]
    InUse { lab: String, what: String },
    #[error("failing on purpose after step {0:?} ({FAIL_AFTER_ENV} is set)")]
    Injected(&'static str),
    #[error("interrupted by a signal")]
    Interrupted,
    /// `up` failed and removing what it had created failed too: both are in the message, which
    /// is all the CLI prints.
    #[error("{cause}; removing the partly built lab also failed: {undo}; `veil lab down --name {lab}` retries")]
    UndoFailed {
        lab: String,
        cause: Box<Error>,
        undo: Box<Error>,
    },
    #[error("SPIRE: {0}")]
    Spire(String),
    #[error("prerequisite missing: {0}")]
    Prerequisite(String),
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

/// Root of every lab's host state.
pub fn run_root() -> PathBuf {
    std::env::var_os("VEIL_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/veil"))
}

/// A tool scripts/setup.sh builds or installs (SPIRE, the Kubernetes binaries, wireguard-go,
/// boringtun-cli): in `$VEIL_TOOLS_BIN`, else `$VEIL_CACHE_DIR/bin`, else `~/.cache/veil/bin`,
/// and only there (scripts/test.sh points `VEIL_TOOLS_BIN` at an empty directory while the Go
/// tools are still building, so a test that needs one fails instead of finding a half-built set).
pub fn tool(name: &str) -> std::result::Result<PathBuf, String> {
    let dir = if let Some(d) = std::env::var_os("VEIL_TOOLS_BIN") {
        PathBuf::from(d)
    } else if let Some(d) = std::env::var_os("VEIL_CACHE_DIR") {
        PathBuf::from(d).join("bin")
    } else {
        let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
        PathBuf::from(home).join(".cache/veil/bin")
    };
    let p = dir.join(name);
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!(
            "{name} not found at {} (scripts/setup.sh installs it there; VEIL_TOOLS_BIN or \
             VEIL_CACHE_DIR move that place)",
            p.display()
        ))
    }
}

/// Where a lab keeps things on the host. All of it is named after the lab.
#[derive(Debug, Clone)]
pub struct LabPaths {
    pub name: String,
    pub root: PathBuf,
    pub cgroup: PathBuf,
    pub bpf: PathBuf,
}

pub const BPFFS: &str = "/sys/fs/bpf";
/// Where the userspace WireGuard device serves UAPI (the path `wg` looks in).
pub use veil_transport::userspace::UAPI_DIR as WG_SOCKET_DIR;

impl LabPaths {
    pub fn new(name: &str) -> Result<Self> {
        let cg = sys::cgroup2_root()?;
        Ok(Self {
            name: name.to_string(),
            root: run_root().join(name),
            cgroup: cg.join("veil").join(name),
            bpf: Path::new(BPFFS).join("veil").join(name),
        })
    }

    pub fn journal(&self) -> PathBuf {
        self.root.join("journal.jsonl")
    }
    pub fn spec(&self) -> PathBuf {
        self.root.join("lab.json")
    }
    pub fn control_plane(&self) -> PathBuf {
        self.root.join("cp")
    }
    pub fn logs(&self) -> PathBuf {
        self.root.join("logs")
    }
    pub fn log(&self, what: &str) -> PathBuf {
        self.logs().join(format!("{what}.log"))
    }
    pub fn node_dir(&self, node: &str) -> PathBuf {
        self.root.join("nodes").join(node)
    }
    pub fn admin_socket(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("admin.sock")
    }
    pub fn agent_config(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("agent.yaml")
    }
    pub fn pin_dir(&self, node: &str) -> PathBuf {
        self.bpf.join(node)
    }
    pub fn node_cgroup(&self, node: &str) -> PathBuf {
        self.cgroup.join(node)
    }
    pub fn pod_cgroup(&self, pod: &spec::PodSpec) -> PathBuf {
        self.node_cgroup(&pod.node)
            .join(format!("pod-{}-{}", pod.namespace, pod.name))
    }
    pub fn supervisor_manifest(&self) -> PathBuf {
        self.root.join("processes.json")
    }
    pub fn ready_dir(&self) -> PathBuf {
        self.root.join("ready")
    }
}

/// `veil lab show -o json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabView {
    pub name: String,
    pub trust_domain: String,
    pub encryption: bool,
    #[serde(default)]
    pub node_encryption: bool,
    /// `ipv4` or `dual`.
    #[serde(default)]
    pub ip_family: String,
    pub backend: String,
    pub svid_ttl_seconds: u64,
    pub pod_mtu: u32,
    /// Who issues the lab's SVIDs.
    pub identity: IdentityView,
    /// `kubernetes` or `files`: where the agents read cluster state.
    pub control_plane: String,
    /// The lab's kube-apiserver (`control_plane: kubernetes` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<kube::KubeView>,
    pub underlay: UnderlayView,
    pub nodes: Vec<NodeView>,
    pub pods: Vec<PodView>,
    /// Services, their ClusterIPs and the (ready) pods behind them.
    pub services: Vec<crate::api::ServiceStatus>,
}

impl LabView {
    /// The node named `name`.
    pub fn node(&self, name: &str) -> Option<&NodeView> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The pod named `pod`: `name` (the first of that name) or `namespace/name`.
    pub fn pod(&self, pod: &str) -> Option<&PodView> {
        self.pods.iter().find(|p| names(pod, &p.namespace, &p.name))
    }

    /// The Service named `service`: `name` (the first of that name) or `namespace/name`.
    pub fn service(&self, service: &str) -> Option<&crate::api::ServiceStatus> {
        self.services
            .iter()
            .find(|s| names(service, &s.namespace, &s.name))
    }
}

/// Whether `wanted` (`name` or `namespace/name`) names the object `namespace/name`.
fn names(wanted: &str, namespace: &str, name: &str) -> bool {
    match wanted.split_once('/') {
        Some((ns, n)) => ns == namespace && n == name,
        None => wanted == name,
    }
}

/// `"identity"` of `veil lab show -o json`: with `spire`, `"$server_bin" entry show -socketPath
/// "$server_socket"` (and `agent list`) run against the lab's spire-server.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IdentityView {
    /// `spire` or `dev`.
    pub provider: String,
    /// spire-server's version; `dev` for veil's dev server.
    pub version: String,
    pub server_socket: Option<String>,
    pub server_bin: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UnderlayView {
    pub netns: String,
    pub bridge: String,
    pub cidr: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeView {
    pub name: String,
    pub netns: String,
    pub underlay_ip: String,
    /// Every underlay address of the node: `underlay_ip`, then the IPv6 one of a dual-stack
    /// underlay.
    #[serde(default)]
    pub underlay_ips: Vec<String>,
    pub pod_cidr: String,
    /// Every pod CIDR of the node: IPv4, then IPv6 when dual-stack.
    #[serde(default)]
    pub pod_cidrs: Vec<String>,
    pub agent_admin: String,
    pub cgroup: String,
    pub pin_dir: String,
    pub wg_interface: String,
    pub agent_log: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodView {
    pub name: String,
    pub namespace: String,
    pub node: String,
    pub netns: String,
    /// The pod's IPv4 address.
    pub ip: String,
    /// Every address of the pod: IPv4, then IPv6 when dual-stack.
    #[serde(default)]
    pub ips: Vec<String>,
    pub labels: std::collections::BTreeMap<String, String>,
    pub service_account: String,
    pub cgroup: String,
    pub host_veth: String,
}

pub fn view(spec: &LabSpec, paths: &LabPaths) -> LabView {
    LabView {
        name: spec.name.clone(),
        trust_domain: spec.trust_domain.clone(),
        encryption: spec.encryption,
        node_encryption: spec.node_encryption,
        ip_family: spec.ip_family.to_string(),
        backend: spec.backend.to_string(),
        svid_ttl_seconds: spec.svid_ttl.as_secs(),
        pod_mtu: spec.pod_mtu(),
        identity: match spec.identity {
            spec::IdentityProvider::Dev => IdentityView {
                provider: "dev".into(),
                version: "dev".into(),
                server_socket: None,
                server_bin: None,
            },
            spec::IdentityProvider::Spire => IdentityView {
                provider: "spire".into(),
                version: spire_real::version().unwrap_or_default(),
                server_socket: Some(spire_real::server_socket(paths).display().to_string()),
                server_bin: spire_real::tool("spire-server")
                    .ok()
                    .map(|p| p.display().to_string()),
            },
        },
        control_plane: spec.control_plane.to_string(),
        kubernetes: (spec.control_plane == spec::ControlPlane::Kubernetes)
            .then(|| kube::view(paths))
            .flatten(),
        underlay: UnderlayView {
            netns: spec::underlay_netns(&spec.name),
            bridge: spec::bridge_name(&spec.name),
            cidr: spec.underlay_cidr().into(),
        },
        nodes: spec
            .nodes
            .iter()
            .map(|n| NodeView {
                name: n.name.clone(),
                netns: n.netns.clone(),
                underlay_ip: n.underlay_ip.to_string(),
                underlay_ips: n.underlay_ips().iter().map(IpAddr::to_string).collect(),
                pod_cidr: n.pod_cidr.clone(),
                pod_cidrs: n.pod_cidrs(),
                agent_admin: paths.admin_socket(&n.name).display().to_string(),
                cgroup: paths.node_cgroup(&n.name).display().to_string(),
                pin_dir: paths.pin_dir(&n.name).display().to_string(),
                wg_interface: n.wg_interface.clone(),
                agent_log: paths
                    .log(&format!("agent-{}", n.name))
                    .display()
                    .to_string(),
            })
            .collect(),
        pods: pod_views(spec, paths),
        services: service_views(spec, paths),
    }
}

/// The lab's Services with the ready pods behind them, as the first node's agent balances them
/// (so Services made with kubectl and the EndpointSlices' readiness show); from the lab file and
/// its pods when no agent answers.
fn service_views(spec: &LabSpec, paths: &LabPaths) -> Vec<crate::api::ServiceStatus> {
    let mut services = published_services(spec, paths).unwrap_or_else(|| {
        cluster_state(spec, 0)
            .services
            .iter()
            .map(crate::api::ServiceStatus::from)
            .collect()
    });
    for s in &mut services {
        s.backends.retain(|b| b.ready);
    }
    services
}

/// The Services the first node's agent balances, if it answers within a second.
fn published_services(spec: &LabSpec, paths: &LabPaths) -> Option<Vec<crate::api::ServiceStatus>> {
    let node = spec.nodes.first()?;
    let sock = paths.admin_socket(&node.name);
    if !sock.exists() {
        return None;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    rt.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(1),
            crate::admin::get_json::<crate::api::Status>(&sock, "/v1/status"),
        )
        .await
    })
    .ok()?
    .ok()
    .map(|st| st.services)
}

/// The lab file's pods and, with Kubernetes, every other pod the lab's kubelets run (made with
/// kubectl), as the kubelets set them up.
fn pod_views(spec: &LabSpec, paths: &LabPaths) -> Vec<PodView> {
    let kubernetes = spec.control_plane == spec::ControlPlane::Kubernetes;
    // The lab file's pods are listed even before a kubelet has set them up (the address is the
    // one it asks host-local for; the veth is the name veil-cni gives it).
    let mut out: Vec<PodView> = spec
        .pods
        .iter()
        .map(|p| PodView {
            name: p.name.clone(),
            namespace: p.namespace.clone(),
            node: p.node.clone(),
            netns: p.netns.clone(),
            ip: p.ip.to_string(),
            ips: p.ips(),
            labels: p.labels.clone(),
            service_account: p.service_account.clone(),
            cgroup: paths.pod_cgroup(p).display().to_string(),
            host_veth: if kubernetes {
                crate::cluster::kubernetes::host_veth_name(&p.namespace, &p.name)
            } else {
                p.host_veth.clone()
            },
        })
        .collect();
    if !kubernetes {
        return out;
    }
    let records = kubelet::records(paths);
    out.extend(
        records
            .into_iter()
            .filter(|r| {
                !spec
                    .pods
                    .iter()
                    .any(|p| p.namespace == r.namespace && p.name == r.name)
            })
            .map(|r| PodView {
                ip: r.ip.map(|i| i.to_string()).unwrap_or_default(),
                ips: r
                    .ip
                    .map(|i| i.to_string())
                    .into_iter()
                    .chain(r.ipv6.map(|i| i.to_string()))
                    .collect(),
                cgroup: r.cgroup.display().to_string(),
                name: r.name,
                namespace: r.namespace,
                node: r.node,
                netns: r.netns,
                labels: r.labels,
                service_account: r.service_account,
                host_veth: r.host_veth,
            }),
    );
    out
}

/// Loads a running lab's resolved spec.
pub fn load(name: &str) -> Result<(LabSpec, LabPaths)> {
    spec::validate_lab_name(name)?;
    let paths = LabPaths::new(name)?;
    let text = match std::fs::read(paths.spec()) {
        Ok(t) => t,
        Err(_) => return Err(Error::NotFound(name.to_string())),
    };
    let spec = serde_json::from_slice(&text).map_err(|source| Error::BadState {
        lab: name.into(),
        path: paths.spec(),
        source,
    })?;
    Ok((spec, paths))
}

/// The cluster state the lab control plane publishes for a spec. The lab CLI is the identity
/// allocator: one numeric identity per namespace + service account + label set, in pod order, the same on every
/// node because every node reads this one state.
pub fn cluster_state(spec: &LabSpec, generation: u64) -> ClusterState {
    let mut alloc = crate::policy::IdentityAllocator::new();
    let mut identities: Vec<cluster::Identity> = Vec::new();
    let pods: Vec<cluster::Pod> = spec
        .pods
        .iter()
        .map(|p| {
            let id = alloc
                .allocate(&p.namespace, &p.service_account, &p.labels)
                .expect("validated labels allocate");
            if !identities.iter().any(|i| i.id == id) {
                identities.push(cluster::Identity {
                    id,
                    namespace: p.namespace.clone(),
                    service_account: p.service_account.clone(),
                    labels: p.labels.clone(),
                    namespace_labels: Default::default(),
                });
            }
            cluster::Pod {
                name: p.name.clone(),
                namespace: p.namespace.clone(),
                node: p.node.clone(),
                ip: p.ip,
                ipv6: p.ipv6,
                labels: p.labels.clone().into(),
                service_account: p.service_account.clone(),
                host_veth: p.host_veth.clone(),
                identity: id,
            }
        })
        .collect();
    ClusterState {
        generation,
        cluster: spec.name.clone(),
        trust_domain: spec.trust_domain.clone(),
        nodes: spec
            .nodes
            .iter()
            .map(|n| cluster::Node {
                name: n.name.clone(),
                id: u32::from(n.id),
                underlay_ip: n.underlay_ip,
                underlay_ipv6: n.underlay_ipv6,
                pod_cidr: n.pod_cidr.clone(),
                pod_cidr_v6: n.pod_cidr_v6.clone(),
                wg_public_key: None,
                wg_next_public_key: None,
            })
            .collect(),
        services: spec
            .services
            .iter()
            .map(|svc| cluster_service(svc, &pods))
            .collect(),
        pods: cluster::pod_list(pods),
        identities,
        policies: Default::default(),
        policy_generation: 0,
        index: Default::default(),
    }
}

/// A lab Service as the files control plane publishes it: its backends are the pods its
/// selector matches (a files-mode pod is ready once it is in the state).
pub fn cluster_service(svc: &spec::ServiceSpec, pods: &[cluster::Pod]) -> cluster::Service {
    cluster::Service {
        namespace: svc.namespace.clone(),
        name: svc.name.clone(),
        cluster_ip: svc.cluster_ip,
        cluster_ipv6: svc.cluster_ipv6,
        ports: svc.ports.clone(),
        affinity_timeout_s: svc.affinity_timeout_s,
        // One backend per address of a family the Service has (an EndpointSlice per family).
        backends: pods
            .iter()
            .filter(|p| svc.selects(&p.namespace, &p.labels))
            .flat_map(|p| {
                p.addrs()
                    .filter(|a| svc.has_family_of(a))
                    .map(|ip| cluster::ServiceBackend {
                        pod: format!("{}/{}", p.namespace, p.name),
                        ip,
                        ready: true,
                    })
            })
            .collect(),
    }
}

/// The agent config the lab writes for a node.
pub fn agent_config(spec: &LabSpec, paths: &LabPaths, node: &spec::NodeSpec) -> Config {
    Config {
        cluster: spec.name.clone(),
        node: node.name.clone(),
        admin_socket: paths.admin_socket(&node.name),
        health_addr: None,
        state_dir: paths.node_dir(&node.name).join("state"),
        bpffs: PathBuf::from(BPFFS),
        pin_dir: paths.pin_dir(&node.name),
        source: match spec.control_plane {
            spec::ControlPlane::Files => SourceConfig::Files {
                dir: paths.control_plane(),
            },
            spec::ControlPlane::Kubernetes => SourceConfig::Kubernetes {
                kubeconfig: Some(kube::node_kubeconfig(paths, &node.name)),
                trust_domain: spec.trust_domain.clone(),
            },
        },
        encryption: spec.encryption,
        strict: true,
        node_encryption: spec.node_encryption,
        backend: spec.node_backend(node),
        interface: node.wg_interface.clone(),
        listen_port: veil_transport::DEFAULT_LISTEN_PORT,
        mtu: spec.pod_mtu() as u16,
        wg_binary: None,
        wg_log: Some(paths.log(&format!("wg-{}", node.name))),
        wg_cgroup: Some(paths.node_cgroup(&node.name).join("wg")),
        service_cgroup: Some(paths.node_cgroup(&node.name)),
        uapi_dir: PathBuf::from(WG_SOCKET_DIR),
        proxy_port: crate::config::DEFAULT_PROXY_PORT,
        proxy_binary: None,
        proxy_log: Some(paths.log(&format!("proxy-{}", node.name))),
        proxy_cgroup: Some(paths.node_cgroup(&node.name).join("proxy")),
        map_max_entries: node.map_max_entries.clone(),
        spire_socket: Some(match spec.identity {
            spec::IdentityProvider::Dev => spire::node_socket(paths, &node.name),
            spec::IdentityProvider::Spire => spire_real::workload_socket(paths, &node.name),
        }),
        spire_admin_socket: (spec.identity == spec::IdentityProvider::Spire)
            .then(|| spire_real::admin_socket(paths, &node.name)),
        mutual_auth: true,
        control_port: crate::auth::DEFAULT_PORT,
        allow_classical_kx: false,
        psk_rotation: spec.psk_rotation,
        key_rotation: spec.key_rotation,
    }
}

/// Progress lines for `lab up`.
pub struct Progress {
    start: Instant,
    quiet: bool,
}

impl Progress {
    pub fn new(quiet: bool) -> Self {
        Self {
            start: Instant::now(),
            quiet,
        }
    }

    pub fn step(&self, msg: impl std::fmt::Display) {
        if !self.quiet {
            println!("  [{:>5.1}s] {msg}", self.start.elapsed().as_secs_f64());
            let _ = std::io::stdout().flush();
        }
    }
}

/// The steps of `lab up`, in order. `VEIL_LAB_UP_FAIL_AFTER=<step>` makes `up` fail right after
/// that step (a fault-injection hook for the end-to-end tests of the undo below; the value is
/// checked before anything is created).
pub const UP_STEPS: [&str; 6] = [
    "state",
    "network",
    "cgroups",
    "control-plane",
    "supervisor",
    "ready",
];
const FAIL_AFTER_ENV: &str = "VEIL_LAB_UP_FAIL_AFTER";
/// `VEIL_LAB_AGENT_ENV={"<node>": {"<VAR>": "<value>", ...}, ...}`: extra environment for the
/// named nodes' agents (and so for the veil-wg each starts), for the end-to-end tests that
/// run one node under a changed clock (libfaketime) and the like. Checked before anything is
/// created; the agents' own `RUST_LOG` (from `VEIL_AGENT_LOG`) can be overridden here.
const AGENT_ENV_ENV: &str = "VEIL_LAB_AGENT_ENV";

/// The test hooks of `lab up`, read from its environment.
#[derive(Debug, Default)]
struct UpHooks {
    fail_after: Option<&'static str>,
    agent_env: supervisor::AgentEnv,
}

impl UpHooks {
    fn from_env(spec: &LabSpec) -> Result<UpHooks> {
        Ok(UpHooks {
            fail_after: fail_after_from_env()?,
            agent_env: agent_env_from_env(spec)?,
        })
    }
}

fn fail_after_from_env() -> Result<Option<&'static str>> {
    let Some(v) = std::env::var_os(FAIL_AFTER_ENV) else {
        return Ok(None);
    };
    let v = v.to_string_lossy();
    UP_STEPS
        .iter()
        .find(|s| **s == v)
        .map(|s| Some(*s))
        .ok_or_else(|| {
            spec::Error::Invalid {
                path: FAIL_AFTER_ENV.into(),
                message: format!("unknown step {v:?} (one of {})", UP_STEPS.join(", ")),
            }
            .into()
        })
}

fn agent_env_from_env(spec: &LabSpec) -> Result<supervisor::AgentEnv> {
    match std::env::var_os(AGENT_ENV_ENV) {
        None => Ok(supervisor::AgentEnv::new()),
        Some(v) => parse_agent_env(&v.to_string_lossy(), spec),
    }
}

/// `VEIL_LAB_AGENT_ENV`'s value: a JSON object of node name to an object of variable to string.
fn parse_agent_env(text: &str, spec: &LabSpec) -> Result<supervisor::AgentEnv> {
    let invalid =
        |path: String, message: String| -> Error { spec::Error::Invalid { path, message }.into() };
    let env: supervisor::AgentEnv = serde_json::from_str(text).map_err(|e| {
        invalid(
            AGENT_ENV_ENV.into(),
            format!("not a JSON object of node name to {{\"VAR\": \"value\"}}: {e}"),
        )
    })?;
    for (node, vars) in &env {
        if !spec.nodes.iter().any(|n| &n.name == node) {
            let known: Vec<&str> = spec.nodes.iter().map(|n| n.name.as_str()).collect();
            return Err(invalid(
                format!("{AGENT_ENV_ENV}.{node}"),
                format!("no such node in this lab (nodes: {})", known.join(", ")),
            ));
        }
        if let Some(var) = vars
            .keys()
            .find(|k| k.is_empty() || k.contains(['=', '\0']))
        {
            return Err(invalid(
                format!("{AGENT_ENV_ENV}.{node}"),
                format!("{var:?} is not an environment variable name"),
            ));
        }
    }
    Ok(env)
}

/// Creates and starts a lab, waiting until every agent and pod server is ready.
///
/// A refused `up` leaves nothing behind: everything is checked before the first resource is
/// created, and if a step fails after that (or `up` is interrupted by SIGINT/SIGTERM/SIGHUP
/// while it waits), `up` removes everything it created, as `down` would, before it returns the
/// error. Only `kill -9` leaves a partial lab, which `down` removes.
pub fn up(spec: &LabSpec, exe: &Path, progress: &Progress) -> Result<LabPaths> {
    sys::check_lab_prerequisites().map_err(Error::Prerequisite)?;
    if let Some(node) = spec
        .nodes
        .iter()
        .find(|n| spec.node_backend(n) == spec::BackendChoice::Kernel)
        .filter(|_| spec.encryption && !veil_transport::kernel::available())
    {
        let asked = if node.backend.is_some() {
            format!("node {:?} has `backend: kernel`", node.name)
        } else {
            "--backend kernel".to_string()
        };
        return Err(Error::Prerequisite(format!(
            "{asked}: this kernel has no WireGuard (generic netlink family `wireguard` not found); \
             use --backend userspace or auto"
        )));
    }
    if spec.identity == spec::IdentityProvider::Spire {
        spire_real::check_tools().map_err(Error::Prerequisite)?;
    }
    if spec.control_plane == spec::ControlPlane::Kubernetes {
        kube::check_tools().map_err(Error::Prerequisite)?;
        let cni = exe.with_file_name("veil-cni");
        if !cni.exists() {
            return Err(Error::Prerequisite(format!(
                "`control_plane: kubernetes` needs the CNI plugin {} (cargo build --release --bins)",
                cni.display()
            )));
        }
    }
    let hooks = UpHooks::from_env(spec)?;
    let paths = LabPaths::new(&spec.name)?;
    if paths.journal().exists() || paths.spec().exists() {
        return Err(Error::Exists(spec.name.clone()));
    }
    // What `down` would remove must not exist yet: undoing a failed `up` removes everything its
    // journal names, and that must never include something this `up` did not create.
    if let Some(ns) = all_netns(spec).find(|ns| sys::netns_exists(ns)) {
        return Err(Error::InUse {
            lab: spec.name.clone(),
            what: format!("network namespace {ns}"),
        });
    }
    for (what, p) in [("cgroup", &paths.cgroup), ("bpffs directory", &paths.bpf)] {
        if p.exists() {
            return Err(Error::InUse {
                lab: spec.name.clone(),
                what: format!("{what} {}", p.display()),
            });
        }
    }
    std::fs::create_dir_all(&paths.root).map_err(|source| Error::Write {
        path: paths.root.clone(),
        source,
    })?;
    // Created exclusively: of two `up`s racing for one name, the second stops here, before it
    // could build (or undo) anything of the first.
    let j = match Journal::create_new(&paths.journal()) {
        Ok(j) => j,
        Err(journal::Error::AlreadyExists { .. }) => return Err(Error::Exists(spec.name.clone())),
        Err(e) => {
            let _ = std::fs::remove_dir(&paths.root); // only if this call left it empty
            return Err(e.into());
        }
    };
    let interrupted = interrupt::Guard::install();
    let built = build(spec, &paths, exe, progress, j, &hooks, &interrupted);
    drop(interrupted);
    match built {
        Ok(()) => Ok(paths),
        Err(cause) => Err(undo(&spec.name, progress, cause)),
    }
}

/// Every netns a lab creates.
fn all_netns(spec: &LabSpec) -> impl Iterator<Item = String> + '_ {
    std::iter::once(spec::underlay_netns(&spec.name))
        .chain(spec.nodes.iter().map(|n| n.netns.clone()))
        .chain(spec.pods.iter().map(|p| p.netns.clone()))
}

/// Removes what a failed `up` created (its journal, replayed by `down`) and returns the error
/// to report: the cause, or both if the removal failed too.
fn undo(name: &str, progress: &Progress, cause: Error) -> Error {
    progress.step(format!("lab up failed ({cause}); removing what it created"));
    match down(name) {
        Ok(s) => {
            progress.step(format!("removed {s}"));
            cause
        }
        Err(undo) => Error::UndoFailed {
            lab: name.to_string(),
            cause: Box::new(cause),
            undo: Box::new(undo),
        },
    }
}

/// Everything `up` creates, each resource recorded in the journal first.
fn build(
    spec: &LabSpec,
    paths: &LabPaths,
    exe: &Path,
    progress: &Progress,
    mut j: Journal,
    hooks: &UpHooks,
    interrupted: &interrupt::Guard,
) -> Result<()> {
    let step_done = |step: &'static str| -> Result<()> {
        if interrupted.is_set() {
            return Err(Error::Interrupted);
        }
        if hooks.fail_after == Some(step) {
            return Err(Error::Injected(step));
        }
        Ok(())
    };
    let mkdir = |p: &Path| {
        std::fs::create_dir_all(p).map_err(|source| Error::Write {
            path: p.into(),
            source,
        })
    };
    // State dir first: removing it last is what makes `down` idempotent after a crash here.
    j.record(&Resource::Dir {
        path: paths.root.clone(),
    })?;
    j.record(&Resource::Dir {
        path: paths.bpf.clone(),
    })?;
    j.record(&Resource::Cgroup {
        path: paths.cgroup.clone(),
    })?;
    for dir in [paths.logs(), paths.control_plane(), paths.ready_dir()] {
        mkdir(&dir)?;
    }
    let spec_json = serde_json::to_vec_pretty(spec).expect("spec serializes");
    sys::write_atomic(&paths.spec(), &spec_json)?;
    step_done("state")?;

    build_network(spec, &mut j, progress)?;
    step_done("network")?;
    build_cgroups(spec, paths, &mut j)?;
    progress.step(format!("cgroups under {}", paths.cgroup.display()));
    step_done("cgroups")?;

    let kubernetes = spec.control_plane == spec::ControlPlane::Kubernetes;
    if kubernetes {
        kube::prepare(spec, paths)?;
    } else {
        FileSource::write(&paths.control_plane(), &cluster_state(spec, 1))?;
    }
    for node in &spec.nodes {
        mkdir(&paths.node_dir(&node.name))?;
        let cfg = agent_config(spec, paths, node);
        let p = paths.agent_config(&node.name);
        std::fs::write(&p, cfg.to_yaml()).map_err(|source| Error::Write {
            path: p.clone(),
            source,
        })?;
        j.record(&Resource::File {
            path: Path::new(WG_SOCKET_DIR).join(format!("{}.sock", node.wg_interface)),
        })?;
    }
    if spec.identity == spec::IdentityProvider::Spire {
        j.record(&Resource::Dir {
            path: spire_real::dir(paths),
        })?;
        spire_real::prepare(spec, paths)?;
    }
    progress.step("control plane written (cluster state, agent configs)");
    step_done("control-plane")?;

    let manifest = supervisor::manifest(spec, paths, exe, &hooks.agent_env);
    supervisor::write_manifest(paths, &manifest)?;
    let sup_cgroup = paths.cgroup.join("supervisor");
    j.record(&Resource::Cgroup {
        path: sup_cgroup.clone(),
    })?;
    mkdir(&sup_cgroup)?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["lab", "supervise", "--name", &spec.name]);
    let child = sys::spawn_daemon(
        &mut cmd,
        &sys::Placement {
            netns: None,
            cgroup: Some(&sup_cgroup),
            log: &paths.log("supervisor"),
        },
    )?;
    let pid = child.id();
    j.record(&Resource::Process {
        pid,
        start_time: sys::process_start_time(pid).unwrap_or(0),
        what: "supervisor".into(),
    })?;
    progress.step(format!(
        "supervisor started (pid {pid}): {} processes",
        manifest.len()
    ));
    if kubernetes {
        let is_interrupted = || interrupted.is_set();
        kube::bootstrap(
            spec,
            paths,
            progress,
            &Wait::new(Duration::from_secs(90), &is_interrupted),
        )?;
    }
    if spec.identity == spec::IdentityProvider::Spire {
        // Each stage gets its own minute.
        let is_interrupted = || interrupted.is_set();
        for stage in [spire_real::register, spire_real::release_agents] {
            stage(
                spec,
                paths,
                progress,
                &Wait::new(Duration::from_secs(60), &is_interrupted),
            )?;
        }
    }
    step_done("supervisor")?;

    wait_ready(spec, paths, progress, Duration::from_secs(90), interrupted)?;
    step_done("ready")
}

fn build_network(spec: &LabSpec, j: &mut Journal, progress: &Progress) -> Result<()> {
    let ul = spec::underlay_netns(&spec.name);
    let br = spec::bridge_name(&spec.name);
    let mtu = spec.underlay_mtu.to_string();
    let pod_mtu = spec.pod_mtu().to_string();
    j.record(&Resource::Netns { name: ul.clone() })?;
    for n in &spec.nodes {
        j.record(&Resource::Netns {
            name: n.netns.clone(),
        })?;
    }
    // With Kubernetes the lab's kubelets make the pods (and record them) through veil-cni.
    let file_pods: &[spec::PodSpec] = match spec.control_plane {
        spec::ControlPlane::Files => &spec.pods,
        spec::ControlPlane::Kubernetes => &[],
    };
    for p in file_pods {
        j.record(&Resource::Netns {
            name: p.netns.clone(),
        })?;
    }

    // One `ip -batch` in the host namespace creates every namespace and veth pair; then one
    // batch per namespace configures it. ~10x faster than one `ip` per step.
    let mut host = vec![format!("netns add {ul}")];
    host.extend(spec.nodes.iter().map(|n| format!("netns add {}", n.netns)));
    host.extend(file_pods.iter().map(|p| format!("netns add {}", p.netns)));
    for n in &spec.nodes {
        host.push(format!(
            "link add {} mtu {mtu} netns {} type veth peer name {} mtu {mtu} netns {ul}",
            n.underlay_if, n.netns, n.bridge_port
        ));
    }
    for p in file_pods {
        let node = spec.node(&p.node).expect("validated");
        host.push(format!(
            "link add eth0 mtu {pod_mtu} netns {} type veth peer name {} mtu {pod_mtu} netns {}",
            p.netns, p.host_veth, node.netns
        ));
    }
    sys::ip_batch(None, &host)?;

    let mut ul_cmds = vec![
        "link set lo up".to_string(),
        format!("link add {br} mtu {mtu} type bridge"),
        format!("link set {br} up"),
    ];
    for n in &spec.nodes {
        ul_cmds.push(format!("link set {} master {br} up", n.bridge_port));
    }
    let v6_underlay = spec.ip_family.v6_underlay();
    if spec.identity == spec::IdentityProvider::Spire {
        // The spire-server listens here; the nodes reach it over the underlay.
        let ip = spire_real::server_ip(spec);
        ul_cmds.push(if v6_underlay {
            format!("addr add {ip}/64 dev {br} nodad")
        } else {
            format!("addr add {ip}/24 dev {br}")
        });
    }
    if spec.control_plane == spec::ControlPlane::Kubernetes {
        // The kube-apiserver listens here; agents reach it over the underlay.
        let api = kube::api_ip(spec.ip_family);
        ul_cmds.push(if v6_underlay {
            format!("addr add {api}/64 dev {br} nodad")
        } else {
            format!("addr add {api}/24 dev {br}")
        });
    }
    sys::ip_batch(Some(&ul), &ul_cmds)?;
    // An IPv6 underlay's bridge holds the spire-server's IPv6 address.
    if !v6_underlay {
        sysctl_in(
            &ul,
            &[
                ("net.ipv6.conf.all.disable_ipv6", "1"),
                ("net.ipv6.conf.default.disable_ipv6", "1"),
            ],
        )?;
    }
    progress.step(format!(
        "underlay {ul} (bridge {br}, {})",
        spec.underlay_cidr()
    ));

    for n in &spec.nodes {
        let gw = spec.pod_gateway(n);
        let gw6 = spec.pod_gateway_v6(n);
        let v6_underlay = n.underlay_ip.is_ipv6() || n.underlay_ipv6.is_some();
        if gw6.is_some() {
            // The node routes IPv6 between its pods and the tunnel. A dual-stack lab's underlay
            // stays IPv4 only (nothing but WireGuard and the control channel crosses it) unless
            // it is a dual-stack underlay; an IPv6-only lab's is IPv6. An IPv6 underlay address
            // is usable at once (no duplicate address detection: the lab hands out every
            // address) and not from router advertisements.
            // A pod veth's link-local address must be usable at once: while it is tentative
            // (duplicate address detection, a second) the node cannot solicit its pod's
            // address, and the first packet to a new pod waits for the neighbour timer.
            let mut v6 = vec![("net.ipv6.conf.all.forwarding".to_string(), "1")];
            if v6_underlay {
                v6.push((format!("net.ipv6.conf.{}.accept_dad", n.underlay_if), "0"));
                v6.push((format!("net.ipv6.conf.{}.accept_ra", n.underlay_if), "0"));
            } else {
                v6.push((format!("net.ipv6.conf.{}.disable_ipv6", n.underlay_if), "1"));
            }
            for p in file_pods.iter().filter(|p| p.node == n.name) {
                v6.push((format!("net.ipv6.conf.{}.accept_dad", p.host_veth), "0"));
            }
            let v6: Vec<(&str, &str)> = v6.iter().map(|(k, v)| (k.as_str(), *v)).collect();
            sysctl_in(&n.netns, &v6)?;
        }
        let mut cmds = vec![
            "link set lo up".to_string(),
            format!(
                "addr add {}/{} dev {}{}",
                n.underlay_ip,
                spec::underlay_prefix_len(n.underlay_ip),
                n.underlay_if,
                if n.underlay_ip.is_ipv6() {
                    " nodad"
                } else {
                    ""
                }
            ),
            format!("link set {} up", n.underlay_if),
        ];
        if let Some(v6) = n.underlay_ipv6 {
            cmds.push(format!("addr add {v6}/64 dev {} nodad", n.underlay_if));
        }
        for p in file_pods.iter().filter(|p| p.node == n.name) {
            // Every pod veth answers for the same gateway address, like Calico's 169.254.1.1.
            if let Some(gw) = gw {
                cmds.push(format!("addr add {gw}/32 dev {}", p.host_veth));
            }
            if let Some(gw6) = gw6 {
                cmds.push(format!("addr add {gw6}/128 dev {} nodad", p.host_veth));
            }
            cmds.push(format!("link set {} up", p.host_veth));
            for ip in p.addrs() {
                let (len, src) = match ip {
                    IpAddr::V4(_) => (32, gw.map(IpAddr::V4)),
                    IpAddr::V6(_) => (128, gw6.map(IpAddr::V6)),
                };
                let src = src.expect("a pod's family has its gateway");
                cmds.push(format!(
                    "route add {ip}/{len} dev {} src {src}",
                    p.host_veth
                ));
            }
        }
        if !spec.encryption {
            // Plain routing over the underlay: only for the capture sanity check. With
            // encryption on there is no route to another node's pods except the tunnel. The
            // pod CIDRs of the underlay's families only: on an IPv4 underlay a dual-stack lab's
            // IPv6 pods have no path between nodes without the tunnel.
            for other in spec.nodes.iter().filter(|o| o.name != n.name) {
                cmds.push(format!(
                    "route add {} via {}",
                    other.pod_cidr, other.underlay_ip
                ));
                if let (Some(cidr), Some(via)) = (&other.pod_cidr_v6, other.underlay_ipv6) {
                    cmds.push(format!("route add {cidr} via {via}"));
                }
            }
        }
        sys::ip_batch(Some(&n.netns), &cmds)?;
        let mut sysctls = vec![
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
        ];
        if gw6.is_none() {
            sysctls.push(("net.ipv6.conf.all.disable_ipv6", "1"));
        }
        sysctl_in(&n.netns, &sysctls)?;
        let underlay: Vec<String> = n.underlay_ips().iter().map(IpAddr::to_string).collect();
        progress.step(format!(
            "node {} ({}, underlay {}, pods {})",
            n.name,
            n.netns,
            underlay.join(" "),
            n.pod_cidrs().join(" ")
        ));
    }

    for p in file_pods {
        let node = spec.node(&p.node).expect("validated");
        let gw = spec.pod_gateway(node);
        let gw6 = spec.pod_gateway_v6(node);
        let ip4 = p.ipv4();
        let ip6 = p.ipv6_addr();
        let mut cmds = vec!["link set lo up".to_string()];
        if let Some(ip4) = ip4 {
            cmds.push(format!("addr add {ip4}/32 dev eth0"));
        }
        if let Some(ip6) = ip6 {
            cmds.push(format!("addr add {ip6}/128 dev eth0 nodad"));
        }
        cmds.push("link set eth0 up".to_string());
        if let (Some(gw), Some(ip4)) = (gw, ip4) {
            cmds.push(format!("route add {gw} dev eth0 scope link"));
            cmds.push(format!("route add default via {gw} dev eth0 src {ip4}"));
        }
        if let (Some(gw6), Some(ip6)) = (gw6, ip6) {
            cmds.push(format!("route add {gw6}/128 dev eth0"));
            cmds.push(format!("route add ::/0 via {gw6} dev eth0 src {ip6}"));
        }
        sys::ip_batch(Some(&p.netns), &cmds)?;
        if ip6.is_some() {
            // A pod takes its addresses from the lab, not from router advertisements.
            sysctl_in(
                &p.netns,
                &[
                    ("net.ipv6.conf.all.accept_ra", "0"),
                    ("net.ipv6.conf.eth0.accept_ra", "0"),
                ],
            )?;
        } else {
            sysctl_in(
                &p.netns,
                &[
                    ("net.ipv6.conf.all.disable_ipv6", "1"),
                    ("net.ipv6.conf.default.disable_ipv6", "1"),
                ],
            )?;
        }
        progress.step(format!(
            "pod {}/{} on {} ({}, {})",
            p.namespace,
            p.name,
            p.node,
            p.ips().join(" "),
            p.netns
        ));
    }
    Ok(())
}

/// Sets sysctls inside a netns (net.* sysctls are per namespace).
fn sysctl_in(netns: &str, kv: &[(&str, &str)]) -> Result<()> {
    let kv: Vec<(String, String)> = kv
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let results = sys::in_netns(netns, move || {
        kv.iter()
            .map(|(k, v)| {
                let path = PathBuf::from("/proc/sys").join(k.replace('.', "/"));
                std::fs::write(&path, v).map_err(|source| sys::Error::Io {
                    what: "cannot set sysctl",
                    path,
                    source,
                })
            })
            .collect::<std::result::Result<Vec<()>, sys::Error>>()
    })?;
    results.map(drop).map_err(Error::from)
}

fn build_cgroups(spec: &LabSpec, paths: &LabPaths, j: &mut Journal) -> Result<()> {
    let mut dirs = vec![paths.cgroup.clone(), paths.cgroup.join("spire")];
    for n in &spec.nodes {
        dirs.push(paths.node_cgroup(&n.name));
        dirs.push(paths.node_cgroup(&n.name).join("agent"));
        dirs.push(paths.node_cgroup(&n.name).join("wg"));
        if spec.identity == spec::IdentityProvider::Spire {
            dirs.push(paths.node_cgroup(&n.name).join("spire-agent"));
        }
    }
    match spec.control_plane {
        spec::ControlPlane::Files => dirs.extend(spec.pods.iter().map(|p| paths.pod_cgroup(p))),
        spec::ControlPlane::Kubernetes => dirs.extend(kube::cgroups(spec, paths)),
    }
    for d in dirs {
        j.record(&Resource::Cgroup { path: d.clone() })?;
        std::fs::create_dir_all(&d).map_err(|source| Error::Write {
            path: d.clone(),
            source,
        })?;
    }
    Ok(())
}

fn wait_ready(
    spec: &LabSpec,
    paths: &LabPaths,
    progress: &Progress,
    timeout: Duration,
    interrupted: &interrupt::Guard,
) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let deadline = Instant::now() + timeout;
    for n in &spec.nodes {
        let sock = paths.admin_socket(&n.name);
        // Nodes of another trust domain never peer (that is their point): expect peers only
        // among the nodes sharing this one's.
        let peers_expected = spec
            .nodes
            .iter()
            .filter(|m| m.name != n.name && m.trust_domain == n.trust_domain)
            .count();
        loop {
            let st = rt.block_on(crate::admin::get_json::<crate::api::Status>(
                &sock,
                "/v1/status",
            ));
            match st {
                // With encryption on, ready also means a tunnel peer for every other node, so
                // the first packet after `up` finds a key (strict mode would drop it).
                // Ready also means the node SVID and every local pod's SVID arrived from the
                // dev SPIRE server.
                Ok(st)
                    if st.ready
                        && (!spec.encryption || st.peers.len() >= peers_expected)
                        && st.svids.len()
                            > spec.pods.iter().filter(|p| p.node == n.name).count() =>
                {
                    progress.step(format!(
                        "agent {} ready: {} program(s) attached, backend {}, {} tunnel peer(s), {} SVID(s), pins {}",
                        n.name,
                        st.programs.len(),
                        st.backend,
                        st.peers.len(),
                        st.svids.len(),
                        st.agent.pin_dir
                    ));
                    break;
                }
                _ => {}
            }
            keep_waiting(interrupted.is_set(), deadline, || {
                let log = paths.log(&format!("agent-{}", n.name));
                Error::not_ready(format!("agent on {}", n.name), timeout, log)
            })?;
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    for p in &spec.pods {
        for s in &p.serve {
            let marker = serve::ready_file(paths, p, s.port);
            while !marker.exists() {
                keep_waiting(interrupted.is_set(), deadline, || {
                    let what = format!("{:?} server on {}:{}", s.kind, p.qualified_name(), s.port);
                    Error::not_ready(what, timeout, paths.log(&serve::log_name(p, s.port)))
                })?;
                std::thread::sleep(Duration::from_millis(50));
            }
            progress.step(format!(
                "pod {} serving {:?} on {}:{}",
                p.qualified_name(),
                s.kind,
                p.ip,
                s.port
            ));
        }
    }
    // Every node balances the lab's Services over the lab-file pods they select (with
    // Kubernetes the EndpointSlice controller marks them ready only after the Pods are): a
    // connection to a ClusterIP right after `up` is never refused for a backend still coming.
    let wanted: Vec<(&spec::ServiceSpec, Vec<String>)> = spec
        .services
        .iter()
        .map(|svc| {
            let ips = spec
                .pods
                .iter()
                .filter(|p| svc.selects(&p.namespace, &p.labels))
                .flat_map(|p| p.addrs())
                .filter(|a| svc.has_family_of(a))
                .map(|a| a.to_string())
                .collect();
            (svc, ips)
        })
        .collect();
    for n in spec.nodes.iter().filter(|_| !wanted.is_empty()) {
        let sock = paths.admin_socket(&n.name);
        loop {
            let st = rt.block_on(crate::admin::get_json::<crate::api::Status>(
                &sock,
                "/v1/status",
            ));
            // The first Service still without its backends on this node, if any.
            let missing = match &st {
                Ok(st) => {
                    let table: std::collections::HashMap<(&str, &str), &crate::api::ServiceStatus> =
                        st.services
                            .iter()
                            .map(|s| ((s.namespace.as_str(), s.name.as_str()), s))
                            .collect();
                    wanted.iter().find(|(svc, ips)| {
                        !table
                            .get(&(svc.namespace.as_str(), svc.name.as_str()))
                            .is_some_and(|s| {
                                ips.iter()
                                    .all(|ip| s.backends.iter().any(|b| b.ready && &b.ip == ip))
                            })
                    })
                }
                Err(_) => wanted.first(),
            };
            let Some((svc, _)) = missing else {
                break;
            };
            keep_waiting(interrupted.is_set(), deadline, || {
                let log = paths.log(&format!("agent-{}", n.name));
                Error::not_ready(
                    format!("service {} on {}", svc.qualified_name(), n.name),
                    timeout,
                    log,
                )
            })?;
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    if !spec.services.is_empty() {
        progress.step(format!(
            "{} service(s) balanced on every node: {}",
            spec.services.len(),
            spec.services
                .iter()
                .map(|s| {
                    let ips: Vec<String> = s.cluster_ips().map(|a| a.to_string()).collect();
                    format!("{} {}", s.qualified_name(), ips.join(","))
                })
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    Ok(())
}

/// A bounded wait of a `lab up` stage: when it began, its deadline, and whether the user
/// interrupted.
pub(crate) struct Wait<'a> {
    started: Instant,
    deadline: Instant,
    interrupted: &'a dyn Fn() -> bool,
}

impl<'a> Wait<'a> {
    pub(crate) fn new(budget: Duration, interrupted: &'a dyn Fn() -> bool) -> Self {
        let started = Instant::now();
        Wait {
            started,
            deadline: started + budget,
            interrupted,
        }
    }

    /// [`keep_waiting`], with `not_ready` given how long this wait has lasted.
    pub(crate) fn keep_waiting(&self, not_ready: impl FnOnce(Duration) -> Error) -> Result<()> {
        keep_waiting((self.interrupted)(), self.deadline, || {
            not_ready(self.started.elapsed())
        })
    }
}

/// The end of every wait loop: stop when interrupted, fail with `not_ready()` once past
/// `deadline`.
pub(crate) fn keep_waiting(
    is_interrupted: bool,
    deadline: Instant,
    not_ready: impl FnOnce() -> Error,
) -> Result<()> {
    if is_interrupted {
        return Err(Error::Interrupted);
    }
    if Instant::now() > deadline {
        return Err(not_ready());
    }
    Ok(())
}

impl Error {
    /// [`Error::NotReady`] for `what`, quoting the end of its `log`.
    pub(crate) fn not_ready(what: impl Into<String>, waited: Duration, log: PathBuf) -> Error {
        Error::NotReady {
            what: what.into(),
            waited,
            log_tail: log_tail(&log),
            log,
        }
    }
}

/// The last lines of a log file, for an error that outlives the file.
fn log_tail(path: &Path) -> String {
    const LINES: usize = 20;
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LINES)..].join("\n")
}

/// SIGINT, SIGTERM and SIGHUP while `up` runs set a flag that `up` checks between steps and
/// while it waits, so an interrupted `up` removes what it created, like a failed one.
mod interrupt {
    use std::sync::atomic::{AtomicBool, Ordering};

    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

    static SET: AtomicBool = AtomicBool::new(false);
    const SIGNALS: [Signal; 3] = [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP];

    extern "C" fn on_signal(_: nix::libc::c_int) {
        SET.store(true, Ordering::SeqCst);
    }

    /// The handlers, installed until dropped (then the previous actions are back).
    pub struct Guard {
        previous: Vec<(Signal, SigAction)>,
    }

    impl Guard {
        pub fn install() -> Self {
            SET.store(false, Ordering::SeqCst);
            let action = SigAction::new(
                SigHandler::Handler(on_signal),
                SaFlags::SA_RESTART,
                SigSet::empty(),
            );
            let previous = SIGNALS
                .iter()
                // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
                .filter_map(|&s| unsafe { sigaction(s, &action) }.ok().map(|p| (s, p)))
                .collect();
            Self { previous }
        }

        pub fn is_set(&self) -> bool {
            SET.load(Ordering::SeqCst)
        }
    }

    impl Drop for Guard {
        fn drop(&mut self) {
            for (s, p) in &self.previous {
                // SAFETY: puts back the action that was in place before `install`.
                let _ = unsafe { sigaction(*s, p) };
            }
        }
    }
}

/// What `down` removed.
#[derive(Debug, Default)]
pub struct DownSummary {
    pub netns: usize,
    pub cgroups: usize,
    pub processes: usize,
    pub existed: bool,
}

/// What was removed, as `veil lab down` and the demo print it.
impl std::fmt::Display for DownSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} netns, {} cgroups, {} processes",
            self.netns, self.cgroups, self.processes
        )
    }
}

/// Removes everything a lab created. Idempotent; works from the journal alone.
pub fn down(name: &str) -> Result<DownSummary> {
    spec::validate_lab_name(name)?;
    let paths = LabPaths::new(name)?;
    let resources = Journal::read(&paths.journal())?;
    let mut summary = DownSummary {
        existed: !resources.is_empty() || paths.root.exists(),
        ..Default::default()
    };

    // 1. Processes: the whole lab cgroup tree at once (supervisor first, so nothing restarts),
    //    then any recorded pid that escaped it.
    let sup = paths.cgroup.join("supervisor");
    let _ = sys::cgroup_kill(&sup, Duration::from_secs(5));
    if paths.cgroup.exists() {
        summary.processes += count_procs(&paths.cgroup);
        sys::cgroup_kill(&paths.cgroup, Duration::from_secs(10))?;
    }
    for r in resources.iter().rev() {
        if let Resource::Process {
            pid, start_time, ..
        } = r
        {
            sys::kill_recorded(*pid, *start_time);
        }
    }
    // Read again now that nothing runs: a Kubernetes lab's kubelet may have recorded a pod's
    // netns and cgroup after the first read.
    let resources = Journal::read(&paths.journal())?;
    // 2. Namespaces (their interfaces go with them), pods first.
    for r in resources.iter().rev() {
        if let Resource::Netns { name } = r {
            if sys::netns_exists(name) {
                sys::netns_delete(name)?;
                summary.netns += 1;
            }
        }
    }
    // 3. cgroups, deepest first.
    for r in resources.iter().rev() {
        if let Resource::Cgroup { path } = r {
            if path.exists() {
                summary.cgroups += 1;
            }
            sys::cgroup_remove_tree(path)?;
        }
    }
    sys::cgroup_remove_tree(&paths.cgroup)?;
    // 4. Files and pins; the state dir last.
    for r in resources.iter().rev() {
        match r {
            Resource::File { path } => sys::remove_file(path)?,
            Resource::Dir { path } if *path != paths.root => sys::remove_tree(path)?,
            _ => {}
        }
    }
    sys::remove_tree(&paths.bpf)?;
    if let Some(parent) = paths.bpf.parent() {
        let _ = std::fs::remove_dir(parent); // only if empty: other labs may live there
    }
    if let Some(parent) = paths.cgroup.parent() {
        let _ = std::fs::remove_dir(parent);
    }
    sys::remove_tree(&paths.root)?;
    Ok(summary)
}

fn count_procs(cgroup: &Path) -> usize {
    let mut n = std::fs::read_to_string(cgroup.join("cgroup.procs"))
        .map(|s| s.lines().count())
        .unwrap_or(0);
    if let Ok(rd) = std::fs::read_dir(cgroup) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                n += count_procs(&e.path());
            }
        }
    }
    n
}

/// Replaces the current process with `argv` inside a pod's netns and cgroup (`veil lab exec`).
/// Returns only on error.
pub fn exec_in_pod(
    spec: &LabSpec,
    paths: &LabPaths,
    pod: &str,
    argv: &[String],
) -> Result<std::convert::Infallible> {
    use std::os::unix::process::CommandExt as _;
    // A lab-file pod, or (Kubernetes) one the lab's kubelet runs: `name` or `namespace/name`.
    let (netns, cgroup) = match spec.find_pod(pod) {
        Ok(p) => (p.netns.clone(), paths.pod_cgroup(p)),
        Err(message) => kubelet::records(paths)
            .into_iter()
            .find(|r| r.name == pod || format!("{}/{}", r.namespace, r.name) == pod)
            .map(|r| (r.netns, r.cgroup))
            .ok_or(spec::Error::Invalid {
                path: "POD".into(),
                message,
            })?,
    };
    let Some((program, args)) = argv.split_first() else {
        return Err(spec::Error::Invalid {
            path: "CMD".into(),
            message: "no command given after --".into(),
        }
        .into());
    };
    let procs = cgroup.join("cgroup.procs");
    std::fs::write(&procs, std::process::id().to_string()).map_err(|source| Error::Write {
        path: procs.clone(),
        source,
    })?;
    sys::enter_netns(&netns)?;
    let err = std::process::Command::new(program).args(args).exec();
    Err(sys::Error::Spawn {
        command: program.clone(),
        source: err,
    }
    .into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn default_lab() -> LabSpec {
        spec::resolve("t", spec::default_file(), &spec::Overrides::default()).unwrap()
    }

    #[test]
    fn agent_env_names_a_node_and_its_variables() {
        let env = parse_agent_env(
            r#"{"node-b": {"LD_PRELOAD": "/lib/x.so", "FAKETIME_NO_CACHE": "1"}}"#,
            &default_lab(),
        )
        .unwrap();
        assert_eq!(env.len(), 1);
        assert_eq!(env["node-b"]["LD_PRELOAD"], "/lib/x.so");
        assert_eq!(env["node-b"]["FAKETIME_NO_CACHE"], "1");
        assert!(parse_agent_env("{}", &default_lab()).unwrap().is_empty());
    }

    #[test]
    fn agent_env_refuses_unknown_nodes_bad_names_and_bad_json() {
        let lab = default_lab();
        for (text, names) in [
            (r#"{"node-z": {"A": "1"}}"#, "VEIL_LAB_AGENT_ENV.node-z"),
            (r#"{"node-a": {"A=B": "1"}}"#, "\"A=B\""),
            (r#"{"node-a": {"": "1"}}"#, "\"\""),
            (r#"{"node-a": {"A": 1}}"#, "VEIL_LAB_AGENT_ENV"),
            ("node-a=A", "VEIL_LAB_AGENT_ENV"),
        ] {
            let e = parse_agent_env(text, &lab).unwrap_err().to_string();
            assert!(e.contains(names), "{text}: {e}");
        }
    }

    #[test]
    fn a_lab_view_finds_nodes_pods_and_services_by_name_or_namespace_and_name() {
        let file = spec::parse_lab_file(
            "nodes: [{name: node-a}, {name: node-b}]\n\
             pods:\n\
             - {name: web, namespace: shop, node: node-a, labels: {app: web}}\n\
             - {name: web, namespace: other, node: node-b, labels: {app: web}}\n\
             services:\n\
             - {name: web, namespace: other, selector: {app: web}, ports: [{port: 80}]}\n",
        )
        .unwrap();
        let spec = spec::resolve("t", file, &spec::Overrides::default()).unwrap();
        let paths = LabPaths {
            name: "t".into(),
            root: "/nonexistent/t".into(),
            cgroup: "/nonexistent/cg".into(),
            bpf: "/nonexistent/bpf".into(),
        };
        let v = view(&spec, &paths);
        assert_eq!(v.node("node-b").map(|n| n.name.as_str()), Some("node-b"));
        assert!(v.node("node-z").is_none());
        let node_of = |pod: &str| v.pod(pod).map(|p| p.node.as_str());
        assert_eq!(node_of("web"), Some("node-a"));
        assert_eq!(node_of("shop/web"), Some("node-a"));
        assert_eq!(node_of("other/web"), Some("node-b"));
        assert_eq!(node_of("nosuch/web"), None);
        assert_eq!(node_of("other/"), None);
        assert_eq!(
            v.service("other/web").map(|s| s.namespace.as_str()),
            Some("other")
        );
        assert!(v.service("shop/web").is_none());
    }
}
