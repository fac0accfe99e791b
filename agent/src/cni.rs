//! veil-cni: the CNI 1.0 plugin that gives a Kubernetes pod its interface on a veil node.
//!
//! Owns: the `veil-cni` binary's protocol (CNI spec 1.0.0, also 0.4.0 configurations): ADD, DEL,
//! CHECK and VERSION, chained with an IPAM plugin (`host-local` in the lab) that owns the
//! addresses. The container runtime runs it in the node's network namespace; it makes the pod's
//! interface in the namespace `CNI_NETNS` names, in the shape the lab's file mode makes by hand:
//!
//! - node side: a veth named [`host_veth_name`]`(K8S_POD_NAMESPACE, K8S_POD_NAME)` (the name the
//!   agent looks the pod up by), carrying the node's pod gateway `gateway/32` (every pod veth
//!   answers for the same gateway, like Calico's 169.254.1.1) and the route `podIP/32 dev <veth>
//!   src gateway`; its alias is the container ID, so a late DEL of an older sandbox of the same
//!   pod cannot remove the newer sandbox's interface;
//! - pod side: `CNI_IFNAME` (eth0) with `podIP/32`, `gateway dev eth0 scope link`, `default via
//!   gateway src podIP`, the configured MTU on both ends, IPv6 disabled.
//!
//! veil's programs: the plugin loads no BPF and never talks to the agent. The agent attaches its
//! TC programs to the host veth when it learns the pod from the Kubernetes API (the Pod's
//! `status.podIP`, which the kubelet writes from the ADD result), so a pod's first packets can
//! precede the attachment; the lab (playing kubelet) therefore starts a pod's process only once
//! the agent reports the interface attached (ARCHITECTURE.md, "Cluster sources").
//!
//! Sans-IO where it is natural: [`Env::parse`] and [`NetConf::parse`] turn the environment and
//! stdin into a typed request, [`plan_add`] computes the `ip` commands, [`add_result`],
//! [`error_json`], [`verify_pod`] and [`verify_node`] are pure; [`invoke`] is the thin shell that
//! runs the IPAM plugin and `ip`. Bad input is an error JSON naming the variable or field (never
//! a panic); a failed ADD releases its address and removes its veth before it returns.
//!
//! Must not depend on: the agent being up, tokio, the lab.

use std::{
    fs::File,
    io::{self, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::{Command as Process, Stdio},
};

use serde::Deserialize;
use serde_json::{json, Value};

use crate::{cluster::kubernetes::host_veth_name, sys};

/// The configuration versions this plugin speaks (VERSION's `supportedVersions`).
pub const SUPPORTED_VERSIONS: [&str; 2] = ["0.4.0", "1.0.0"];
/// The version of errors written before the configuration's own version is known.
pub const DEFAULT_VERSION: &str = "1.0.0";
/// The pod MTU when the configuration has no `mtu` (underlay 1500 − WireGuard's 60).
pub const DEFAULT_MTU: u32 = 1440;

/// Error codes: 1–11 are the spec's well-known codes, 100+ veil-cni's own.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENV: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODING_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    /// Creating or configuring the interface failed.
    pub const SETUP_FAILED: u32 = 100;
    /// CHECK found the interface missing or different from the ADD result.
    pub const CHECK_FAILED: u32 = 101;
    /// The IPAM plugin could not be run or gave a result veil-cni cannot use.
    pub const IPAM_FAILED: u32 = 102;
}

/// What can go wrong in one invocation; each variant is one CNI error code ([`Error::code`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unsupported cniVersion {version:?} (veil-cni supports 0.4.0 and 1.0.0)")]
    IncompatibleVersion { version: String },
    #[error("{var}: {reason}")]
    Env { var: &'static str, reason: String },
    #[error("cannot read the network configuration from stdin")]
    Stdin(#[source] io::Error),
    #[error("the network configuration is not JSON")]
    Decode(#[source] serde_json::Error),
    #[error("network configuration: {field}: {reason}")]
    Config { field: String, reason: String },
    /// The IPAM plugin's own error, passed on with its code.
    #[error("ipam plugin {plugin}: {msg}")]
    Ipam {
        plugin: String,
        code: u32,
        msg: String,
        details: String,
    },
    #[error("ipam plugin {plugin}: {reason}")]
    IpamUnusable { plugin: String, reason: String },
    #[error("cannot run the ipam plugin {path}")]
    IpamSpawn {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot {step}")]
    Setup {
        step: String,
        #[source]
        source: sys::Error,
    },
    #[error("check failed: {0}")]
    Check(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// The CNI error code of this error.
    pub fn code(&self) -> u32 {
        match self {
            Error::IncompatibleVersion { .. } => code::INCOMPATIBLE_VERSION,
            Error::Env { .. } => code::INVALID_ENV,
            Error::Stdin(_) => code::IO_FAILURE,
            Error::Decode(_) => code::DECODING_FAILURE,
            Error::Config { .. } => code::INVALID_CONFIG,
            Error::Ipam { code, .. } => *code,
            Error::IpamUnusable { .. } | Error::IpamSpawn { .. } => code::IPAM_FAILED,
            Error::Setup { .. } => code::SETUP_FAILED,
            Error::Check(_) => code::CHECK_FAILED,
        }
    }
}

fn env_err(var: &'static str, reason: impl Into<String>) -> Error {
    Error::Env {
        var,
        reason: reason.into(),
    }
}

fn config_err(field: impl Into<String>, reason: impl Into<String>) -> Error {
    Error::Config {
        field: field.into(),
        reason: reason.into(),
    }
}

/// The error JSON the spec asks for on stdout: `{"cniVersion","code","msg","details"}`.
pub fn error_json(version: &str, e: &Error) -> Value {
    let details = match e {
        Error::Ipam { details, .. } => details.clone(),
        _ => {
            let mut chain = vec![];
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                chain.push(s.to_string());
                source = s.source();
            }
            chain.join(": ")
        }
    };
    json!({"cniVersion": version, "code": e.code(), "msg": e.to_string(), "details": details})
}

/// `CNI_COMMAND`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
}

impl Command {
    /// Reads `CNI_COMMAND`. STATUS and GC (CNI 1.1) are unknown to a 1.0 plugin: error code 4.
    pub fn from_env(get: &dyn Fn(&str) -> Option<String>) -> Result<Command> {
        match get("CNI_COMMAND").as_deref() {
            None | Some("") => Err(env_err("CNI_COMMAND", "not set")),
            Some("ADD") => Ok(Command::Add),
            Some("DEL") => Ok(Command::Del),
            Some("CHECK") => Ok(Command::Check),
            Some("VERSION") => Ok(Command::Version),
            Some(other) => Err(env_err(
                "CNI_COMMAND",
                format!("unsupported command {other:?} (veil-cni speaks CNI 1.0: ADD, DEL, CHECK, VERSION)"),
            )),
        }
    }
}

/// The pod a request is for, from `CNI_ARGS` (the kubelet passes both).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
}

impl PodRef {
    /// The node-side interface name, as the agent expects it.
    pub fn host_veth(&self) -> String {
        host_veth_name(&self.namespace, &self.name)
    }
}

/// The environment of an ADD, DEL or CHECK, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Env {
    pub command: Command,
    pub container_id: String,
    /// Required for ADD and CHECK; a DEL may come after the namespace is gone.
    pub netns: Option<PathBuf>,
    pub ifname: String,
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
    pub path: Vec<PathBuf>,
}

impl Env {
    /// Validates the CNI_* variables of an ADD, DEL or CHECK (`command`).
    pub fn parse(command: Command, get: &dyn Fn(&str) -> Option<String>) -> Result<Env> {
        let non_empty = |var: &'static str| -> Result<String> {
            get(var)
                .filter(|v| !v.is_empty())
                .ok_or_else(|| env_err(var, "not set"))
        };
        let container_id = non_empty("CNI_CONTAINERID")?;
        if !is_container_id(&container_id) {
            return Err(env_err(
                "CNI_CONTAINERID",
                format!("{container_id:?} is not an alphanumeric start followed by alphanumerics, `_`, `.` or `-`"),
            ));
        }
        let netns = match get("CNI_NETNS").filter(|v| !v.is_empty()) {
            None if command == Command::Del => None,
            None => return Err(env_err("CNI_NETNS", "not set")),
            Some(p) if !p.starts_with('/') || p.chars().any(is_unsafe_in_batch) => {
                return Err(env_err(
                    "CNI_NETNS",
                    format!("{p:?} is not an absolute path without spaces or quotes"),
                ))
            }
            Some(p) => Some(PathBuf::from(p)),
        };
        let ifname = non_empty("CNI_IFNAME")?;
        if !is_ifname(&ifname) {
            return Err(env_err(
                "CNI_IFNAME",
                format!("{ifname:?} is not an interface name (1-15 bytes, no `/`, `:` or spaces)"),
            ));
        }
        let path: Vec<PathBuf> = non_empty("CNI_PATH")?
            .split(':')
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .collect();
        if path.is_empty() {
            return Err(env_err("CNI_PATH", "names no directory"));
        }
        let args = parse_cni_args(&get("CNI_ARGS").unwrap_or_default())
            .map_err(|reason| env_err("CNI_ARGS", reason))?;
        let arg = |key: &str| {
            args.iter()
                .find(|(k, v)| k == key && !v.is_empty())
                .map(|(_, v)| v.clone())
        };
        Ok(Env {
            command,
            container_id,
            netns,
            ifname,
            pod_namespace: arg("K8S_POD_NAMESPACE"),
            pod_name: arg("K8S_POD_NAME"),
            path,
        })
    }

    /// The pod from `CNI_ARGS`; an error naming what is missing (ADD and CHECK need both).
    pub fn pod(&self) -> Result<PodRef> {
        match (&self.pod_namespace, &self.pod_name) {
            (Some(namespace), Some(name)) => Ok(PodRef {
                namespace: namespace.clone(),
                name: name.clone(),
            }),
            (ns, name) => {
                let missing: Vec<&str> = [
                    ns.is_none().then_some("K8S_POD_NAMESPACE"),
                    name.is_none().then_some("K8S_POD_NAME"),
                ]
                .into_iter()
                .flatten()
                .collect();
                Err(env_err(
                    "CNI_ARGS",
                    format!(
                        "no {} (the pod's host interface is named after K8S_POD_NAMESPACE and K8S_POD_NAME)",
                        missing.join(" and ")
                    ),
                ))
            }
        }
    }

    /// `CNI_NETNS`, which ADD and CHECK need to exist.
    fn existing_netns(&self) -> Result<&Path> {
        let p = self
            .netns
            .as_deref()
            .ok_or_else(|| env_err("CNI_NETNS", "not set"))?;
        if !p.exists() {
            return Err(env_err(
                "CNI_NETNS",
                format!("{} does not exist", p.display()),
            ));
        }
        Ok(p)
    }
}

/// Splits `CNI_ARGS` (`K=V;K=V`; empty segments skipped, a value may contain `=`).
pub fn parse_cni_args(s: &str) -> std::result::Result<Vec<(String, String)>, String> {
    s.split(';')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| format!("{kv:?} is not KEY=VALUE"))
        })
        .collect()
}

/// The spec's container ID rule: `^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$` (it also goes into `ip -batch`).
fn is_container_id(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        && s.len() <= 255
}

fn is_ifname(s: &str) -> bool {
    (1..=15).contains(&s.len())
        && s != "."
        && s != ".."
        && !s
            .chars()
            .any(|c| c == '/' || c == ':' || is_unsafe_in_batch(c))
}

/// Characters `ip -batch` would split or unquote.
fn is_unsafe_in_batch(c: char) -> bool {
    c.is_whitespace() || c.is_control() || matches!(c, '"' | '\'' | '\\' | '#')
}

/// The network configuration, validated. Unknown keys are tolerated (the spec's rule: a runtime
/// may add keys, and the IPAM object is the IPAM plugin's business); a known key of the wrong
/// type is an error naming it.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    pub mtu: u32,
    /// The node's IPv4 pod gateway address, on every pod's host veth: set when the IPAM plugin
    /// hands out IPv4 addresses.
    pub gateway: Option<Ipv4Addr>,
    /// The node's IPv6 pod gateway (`gateway6`): set when the IPAM plugin hands out IPv6
    /// addresses (dual-stack or IPv6-only pods). At least one of the two is.
    pub gateway6: Option<Ipv6Addr>,
    /// `ipam.type`: the IPAM plugin's file name in `CNI_PATH`.
    pub ipam_type: String,
    pub prev_result: Option<Value>,
}

#[derive(Deserialize)]
struct RawConf {
    #[serde(rename = "cniVersion")]
    cni_version: Option<String>,
    name: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    mtu: Option<u32>,
    gateway: Option<Ipv4Addr>,
    gateway6: Option<Ipv6Addr>,
    ipam: Option<RawIpam>,
    #[serde(rename = "prevResult")]
    prev_result: Option<Value>,
}

#[derive(Deserialize)]
struct RawIpam {
    #[serde(rename = "type")]
    kind: Option<String>,
}

impl NetConf {
    /// Parses stdin: not JSON is code 6, an unsupported version code 1, anything else wrong 7.
    pub fn parse(bytes: &[u8]) -> Result<NetConf> {
        let value: Value = serde_json::from_slice(bytes).map_err(Error::Decode)?;
        if !value.is_object() {
            return Err(config_err("(top level)", "expected a JSON object"));
        }
        let raw: RawConf = serde_path_to_error::deserialize(value).map_err(|e| {
            let field = e.path().to_string();
            config_err(field, e.into_inner().to_string())
        })?;
        let cni_version = raw
            .cni_version
            .ok_or_else(|| config_err("cniVersion", "missing"))?;
        if !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
            return Err(Error::IncompatibleVersion {
                version: cni_version,
            });
        }
        let name = raw
            .name
            .filter(|n| !n.is_empty())
            .ok_or_else(|| config_err("name", "missing"))?;
        raw.kind
            .filter(|t| !t.is_empty())
            .ok_or_else(|| config_err("type", "missing"))?;
        let mtu = raw.mtu.unwrap_or(DEFAULT_MTU);
        if !(68..=65535).contains(&mtu) {
            return Err(config_err("mtu", format!("{mtu} is outside 68..=65535")));
        }
        if raw.gateway.is_none() && raw.gateway6.is_none() {
            return Err(config_err(
                "gateway",
                "missing (the node's IPv4 pod gateway; an IPv6-only network gives `gateway6`)",
            ));
        }
        let ipam = raw.ipam.ok_or_else(|| {
            config_err(
                "ipam",
                "missing (veil-cni delegates addresses to an IPAM plugin such as host-local)",
            )
        })?;
        let ipam_type = ipam
            .kind
            .filter(|t| !t.is_empty())
            .ok_or_else(|| config_err("ipam.type", "missing"))?;
        if ipam_type.contains('/') || ipam_type == "." || ipam_type == ".." {
            return Err(config_err(
                "ipam.type",
                format!("{ipam_type:?} is not a plugin file name"),
            ));
        }
        Ok(NetConf {
            cni_version,
            name,
            mtu,
            gateway: raw.gateway,
            gateway6: raw.gateway6,
            ipam_type,
            prev_result: raw.prev_result,
        })
    }
}

/// The version errors are reported in: the configuration's, when it names a supported one.
pub fn version_hint(stdin: &[u8]) -> String {
    serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_string))
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| DEFAULT_VERSION.to_string())
}

/// VERSION's answer.
pub fn version_json() -> Value {
    json!({"cniVersion": DEFAULT_VERSION, "supportedVersions": SUPPORTED_VERSIONS})
}

/// What an ADD needs from the IPAM plugin's result.
#[derive(Debug, Clone, PartialEq)]
pub struct IpamResult {
    /// The pod's IPv4 address (none for an IPv6-only pod).
    pub ipv4: Option<Ipv4Addr>,
    /// The pod's IPv6 address (a dual-stack or IPv6-only pod).
    pub ipv6: Option<Ipv6Addr>,
    pub dns: Value,
}

impl IpamResult {
    /// Its addresses: IPv4 first.
    pub fn addrs(&self) -> impl Iterator<Item = IpAddr> {
        self.ipv4
            .map(IpAddr::V4)
            .into_iter()
            .chain(self.ipv6.map(IpAddr::V6))
    }
}

/// Reads the IPAM result: at most one address of each family and at least one (an IPv4, a
/// dual-stack or an IPv6-only pod), their prefix lengths ignored (the pod gets a /32 and a
/// /128).
pub fn parse_ipam_result(out: &[u8]) -> std::result::Result<IpamResult, String> {
    let v: Value = serde_json::from_slice(out).map_err(|e| format!("result is not JSON ({e})"))?;
    let ips = v
        .get("ips")
        .and_then(Value::as_array)
        .ok_or("result has no `ips` list")?;
    let (mut v4, mut v6) = (vec![], vec![]);
    for entry in ips {
        let addr = entry
            .get("address")
            .and_then(Value::as_str)
            .ok_or("an `ips` entry has no `address`")?;
        let host = addr.split_once('/').map_or(addr, |(h, _)| h);
        match host.parse::<IpAddr>() {
            Ok(IpAddr::V4(ip)) => v4.push(ip),
            Ok(IpAddr::V6(ip)) => v6.push(ip),
            Err(_) => return Err(format!("`{addr}` is not an address")),
        }
    }
    for (family, n) in [("IPv4", v4.len()), ("IPv6", v6.len())] {
        if n > 1 {
            return Err(format!(
                "returned {n} {family} addresses; a pod has at most one of each family"
            ));
        }
    }
    if v4.is_empty() && v6.is_empty() {
        return Err("returned no address".into());
    }
    Ok(IpamResult {
        ipv4: v4.first().copied(),
        ipv6: v6.first().copied(),
        dns: v.get("dns").cloned().unwrap_or_else(|| json!({})),
    })
}

/// The `ip` commands of an ADD: `create` makes the veth pair (the pod end straight into the pod's
/// namespace), `node` configures the host end, `pod` the pod end after [`POD_SYSCTLS`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub create: String,
    pub node: Vec<String>,
    pub pod: Vec<String>,
}

/// Set in the pod's namespace before its interface comes up: no IPv6 (not even link-local).
pub const POD_SYSCTLS: [(&str, &str); 2] = [
    ("net.ipv6.conf.all.disable_ipv6", "1"),
    ("net.ipv6.conf.default.disable_ipv6", "1"),
];

/// The same for a pod with IPv6 (dual-stack or IPv6-only): IPv6 on, its address from IPAM,
/// never from router advertisements.
pub const POD_SYSCTLS_DUAL: [(&str, &str); 2] = [
    ("net.ipv6.conf.all.accept_ra", "0"),
    ("net.ipv6.conf.default.accept_ra", "0"),
];

/// The lab's pod shape (`lab::build_network`), for one pod: per family the pod has, its
/// gateway on the host veth, a host route to the pod, and the pod's address, a route to the
/// gateway and its default route through it. `add` checks that each family has its gateway.
pub fn plan_add(
    env: &Env,
    conf: &NetConf,
    netns: &Path,
    host_veth: &str,
    ipam: &IpamResult,
) -> Plan {
    let (mtu, ifname) = (conf.mtu, &env.ifname);
    let v4 = ipam.ipv4.zip(conf.gateway);
    // IPv6 addresses without duplicate detection: the node and IPAM own them, and a tentative
    // address would hold the first packets.
    let v6 = ipam.ipv6.zip(conf.gateway6);
    let mut node = vec![format!("link set {host_veth} alias {}", env.container_id)];
    let mut pod = vec!["link set lo up".to_string()];
    if let Some((ip, gw)) = v4 {
        node.push(format!("addr add {gw}/32 dev {host_veth}"));
        pod.push(format!("addr add {ip}/32 dev {ifname}"));
    }
    if let Some((ip6, gw6)) = v6 {
        node.push(format!("addr add {gw6}/128 dev {host_veth} nodad"));
        pod.push(format!("addr add {ip6}/128 dev {ifname} nodad"));
    }
    node.push(format!("link set {host_veth} up"));
    pod.push(format!("link set {ifname} up"));
    if let Some((ip, gw)) = v4 {
        node.push(format!("route add {ip}/32 dev {host_veth} src {gw}"));
        pod.push(format!("route add {gw} dev {ifname} scope link"));
        pod.push(format!("route add default via {gw} dev {ifname} src {ip}"));
    }
    if let Some((ip6, gw6)) = v6 {
        node.push(format!("route add {ip6}/128 dev {host_veth} src {gw6}"));
        pod.push(format!("route add {gw6}/128 dev {ifname}"));
        pod.push(format!("route add ::/0 via {gw6} dev {ifname} src {ip6}"));
    }
    Plan {
        create: format!(
            "link add {host_veth} mtu {mtu} type veth peer name {ifname} mtu {mtu} netns {}",
            netns.display()
        ),
        node,
        pod,
    }
}

/// ADD's result in the configuration's version (0.4.0 results carry `ips[].version`).
pub fn add_result(
    conf: &NetConf,
    env: &Env,
    netns: &Path,
    host_veth: &str,
    host_mac: &str,
    pod_mac: &str,
    ipam: &IpamResult,
) -> Value {
    let (mut ips, mut routes) = (vec![], vec![]);
    let families = [
        (
            ipam.ipv4.map(IpAddr::V4),
            conf.gateway.map(IpAddr::V4),
            "0.0.0.0/0",
        ),
        (
            ipam.ipv6.map(IpAddr::V6),
            conf.gateway6.map(IpAddr::V6),
            "::/0",
        ),
    ];
    for (ip, gw, default) in families {
        let (Some(ip), Some(gw)) = (ip, gw) else {
            continue;
        };
        let mut entry = json!({
            "address": format!("{ip}/{}", host_len(ip)),
            "gateway": gw.to_string(),
            "interface": 1,
        });
        if conf.cni_version == "0.4.0" {
            entry["version"] = json!(if ip.is_ipv4() { "4" } else { "6" });
        }
        ips.push(entry);
        routes.push(json!({"dst": default, "gw": gw.to_string()}));
    }
    json!({
        "cniVersion": conf.cni_version,
        "interfaces": [
            {"name": host_veth, "mac": host_mac},
            {"name": env.ifname, "mac": pod_mac, "sandbox": netns.display().to_string()},
        ],
        "ips": ips,
        "routes": routes,
        "dns": ipam.dns,
    })
}

/// The addresses of an ADD result handed back as `prevResult` (CHECK): its first IPv4 and its
/// first IPv6 address, at least one of them.
pub fn prev_result_ips(prev: &Value) -> Result<(Option<Ipv4Addr>, Option<Ipv6Addr>)> {
    let bad = |reason: &str| config_err("prevResult.ips", reason);
    let addrs = || prev_result_addrs(prev).ok_or_else(|| bad("missing"));
    let v4 = addrs()?.find_map(|a| a.parse::<Ipv4Addr>().ok());
    let v6 = addrs()?.find_map(|a| a.parse::<Ipv6Addr>().ok());
    if v4.is_none() && v6.is_none() {
        return Err(bad("no address"));
    }
    Ok((v4, v6))
}

fn prev_result_addrs(prev: &Value) -> Option<impl Iterator<Item = &str>> {
    let ips = prev.get("ips").and_then(Value::as_array)?;
    Some(
        ips.iter()
            .filter_map(|i| i.get("address")?.as_str())
            .filter_map(|a| a.split('/').next()),
    )
}

/// One interface, from `ip -j link show`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub name: String,
    pub mac: String,
    pub mtu: u32,
    pub alias: Option<String>,
    pub is_up: bool,
}

/// One route, from `ip -j -4 route show` or `ip -j -6 route show`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// `default` or an address or prefix, as `ip` prints it.
    pub dst: String,
    pub gateway: Option<String>,
    pub dev: Option<String>,
}

/// What CHECK reads from one namespace.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NetState {
    pub links: Vec<Link>,
    /// (interface, address, prefix length) of every address.
    pub addrs: Vec<(String, IpAddr, u8)>,
    pub routes: Vec<Route>,
}

fn json_array(out: &str, what: &str) -> std::result::Result<Vec<Value>, String> {
    // `ip -j` prints nothing at all (not `[]`) for some empty tables.
    if out.trim().is_empty() {
        return Ok(vec![]);
    }
    match serde_json::from_str(out) {
        Ok(Value::Array(a)) => Ok(a),
        _ => Err(format!("cannot read `ip -j {what}` output")),
    }
}

/// Parses `ip -j link show`.
pub fn parse_links(out: &str) -> std::result::Result<Vec<Link>, String> {
    Ok(json_array(out, "link show")?
        .iter()
        .filter_map(|l| {
            Some(Link {
                name: l.get("ifname")?.as_str()?.to_string(),
                mac: l
                    .get("address")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                mtu: l.get("mtu").and_then(Value::as_u64).unwrap_or(0) as u32,
                alias: l.get("ifalias").and_then(Value::as_str).map(str::to_string),
                is_up: l
                    .get("flags")
                    .and_then(Value::as_array)
                    .is_some_and(|f| f.iter().any(|x| x == "UP")),
            })
        })
        .collect())
}

/// Parses `ip -j addr show`.
pub fn parse_addrs(out: &str) -> std::result::Result<Vec<(String, IpAddr, u8)>, String> {
    let mut addrs = vec![];
    for l in json_array(out, "addr show")? {
        let Some(name) = l.get("ifname").and_then(Value::as_str) else {
            continue;
        };
        for a in l
            .get("addr_info")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let local = a.get("local").and_then(Value::as_str);
            let len = a.get("prefixlen").and_then(Value::as_u64);
            if let (Some(Ok(ip)), Some(len)) = (local.map(str::parse::<IpAddr>), len) {
                addrs.push((name.to_string(), ip, len as u8));
            }
        }
    }
    Ok(addrs)
}

/// Parses `ip -j -4 route show`.
pub fn parse_routes(out: &str) -> std::result::Result<Vec<Route>, String> {
    let s = |r: &Value, k: &str| r.get(k).and_then(Value::as_str).map(str::to_string);
    Ok(json_array(out, "route show")?
        .iter()
        .filter_map(|r| {
            Some(Route {
                dst: s(r, "dst")?,
                gateway: s(r, "gateway"),
                dev: s(r, "dev"),
            })
        })
        .collect())
}

/// CHECK in the pod's namespace: the interface is up with the MTU, `ip/32` (`/128`), and the
/// default route of the address's family.
pub fn verify_pod(
    state: &NetState,
    ifname: &str,
    ip: impl Into<IpAddr>,
    gateway: impl Into<IpAddr>,
    mtu: u32,
) -> std::result::Result<(), String> {
    let (ip, gateway) = (ip.into(), gateway.into());
    let len = host_len(ip);
    let link = up_link(state, ifname, || {
        format!("no {ifname} in the pod's namespace")
    })?;
    if link.mtu != mtu {
        return Err(format!("{ifname} has MTU {} instead of {mtu}", link.mtu));
    }
    if !state.addrs.contains(&(ifname.to_string(), ip, len)) {
        return Err(format!("{ifname} does not have {ip}/{len}"));
    }
    let gw = gateway.to_string();
    if !state.routes.iter().any(|r| {
        r.dst == "default"
            && r.gateway.as_deref() == Some(gw.as_str())
            && r.dev.as_deref() == Some(ifname)
    }) {
        return Err(format!("no default route via {gw} dev {ifname}"));
    }
    Ok(())
}

/// CHECK in the node's namespace: the host veth is up and routes the pod's address.
pub fn verify_node(
    state: &NetState,
    host_veth: &str,
    ip: impl Into<IpAddr>,
) -> std::result::Result<(), String> {
    let ip = ip.into();
    let len = host_len(ip);
    up_link(state, host_veth, || {
        format!("no host interface {host_veth}")
    })?;
    let (dst, dst_host) = (ip.to_string(), format!("{ip}/{len}"));
    if !state
        .routes
        .iter()
        .any(|r| (r.dst == dst || r.dst == dst_host) && r.dev.as_deref() == Some(host_veth))
    {
        return Err(format!("no route {ip}/{len} dev {host_veth}"));
    }
    Ok(())
}

/// The link named `name`, which must be up; `missing` says what is wrong when there is none.
fn up_link<'a>(
    state: &'a NetState,
    name: &str,
    missing: impl FnOnce() -> String,
) -> std::result::Result<&'a Link, String> {
    let link = state
        .links
        .iter()
        .find(|l| l.name == name)
        .ok_or_else(missing)?;
    if !link.is_up {
        return Err(format!("{name} is down"));
    }
    Ok(link)
}

/// A single address's prefix length: 32 or 128.
fn host_len(ip: IpAddr) -> u8 {
    if ip.is_ipv4() {
        32
    } else {
        128
    }
}

// ---------------------------------------------------------------------------------------------
// The shell: processes, namespaces, `ip`.

/// One invocation's output: what goes to stdout and the exit status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub stdout: String,
    pub exit: u8,
}

/// The binary's `main`: the process environment and stdin in, stdout and the exit status out.
pub fn main() -> std::process::ExitCode {
    let get = |k: &str| std::env::var_os(k).map(|v| v.to_string_lossy().into_owned());
    let mut read_stdin = || {
        let mut buf = vec![];
        io::stdin().read_to_end(&mut buf).map(|_| buf)
    };
    // Bad input is an error JSON, never a panic; this turns a bug into one too (code 100).
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        invoke(&get, &mut read_stdin)
    }))
    .unwrap_or_else(|_| Outcome {
        stdout: json!({"cniVersion": DEFAULT_VERSION, "code": code::SETUP_FAILED,
            "msg": "veil-cni panicked", "details": "see stderr"})
        .to_string(),
        exit: 1,
    });
    let mut out = io::stdout().lock();
    let _ = out.write_all(outcome.stdout.as_bytes());
    let _ = out.flush();
    std::process::ExitCode::from(outcome.exit)
}

/// Runs one CNI invocation.
pub fn invoke(
    get: &dyn Fn(&str) -> Option<String>,
    read_stdin: &mut dyn FnMut() -> io::Result<Vec<u8>>,
) -> Outcome {
    let fail = |version: &str, e: Error| Outcome {
        stdout: error_json(version, &e).to_string(),
        exit: 1,
    };
    let command = match Command::from_env(get) {
        Ok(c) => c,
        Err(e) => return fail(DEFAULT_VERSION, e),
    };
    if command == Command::Version {
        // VERSION needs nothing from stdin (and a terminal would block it).
        return Outcome {
            stdout: version_json().to_string(),
            exit: 0,
        };
    }
    let stdin = match read_stdin() {
        Ok(b) => b,
        Err(e) => return fail(DEFAULT_VERSION, Error::Stdin(e)),
    };
    let version = version_hint(&stdin);
    let result = NetConf::parse(&stdin).and_then(|conf| {
        let env = Env::parse(command, get)?;
        match command {
            Command::Add => add(&env, &conf, &stdin).map(|v| v.to_string()),
            Command::Del => del(&env, &conf, &stdin).map(|()| String::new()),
            Command::Check => check(&env, &conf, &stdin).map(|()| String::new()),
            Command::Version => unreachable!("answered above"),
        }
    });
    match result {
        Ok(stdout) => Outcome { stdout, exit: 0 },
        Err(e) => fail(&version, e),
    }
}

fn add(env: &Env, conf: &NetConf, config: &[u8]) -> Result<Value> {
    let pod = env.pod()?;
    let netns = env.existing_netns()?;
    let host_veth = pod.host_veth();
    let ipam = Ipam::find(env, conf)?;
    let allocated = ipam.exec("ADD", config)?;
    let result = parse_ipam_result(&allocated)
        .map_err(|reason| Error::IpamUnusable {
            plugin: ipam.name.clone(),
            reason,
        })
        .and_then(|r| match (r.ipv4, conf.gateway, r.ipv6, conf.gateway6) {
            (Some(ip), None, _, _) => Err(Error::IpamUnusable {
                plugin: ipam.name.clone(),
                reason: format!(
                    "returned IPv4 address {ip}, but the configuration has no `gateway` \
                     (the node's IPv4 pod gateway) to route it through"
                ),
            }),
            (_, _, Some(ip6), None) => Err(Error::IpamUnusable {
                plugin: ipam.name.clone(),
                reason: format!(
                    "returned IPv6 address {ip6}, but the configuration has no `gateway6` \
                     (the node's IPv6 pod gateway) to route it through"
                ),
            }),
            _ => Ok(r),
        })
        .and_then(|r| {
            let plan = plan_add(env, conf, netns, &host_veth, &r);
            let (host_mac, pod_mac) = set_up(&plan, env, netns, &host_veth, r.ipv6.is_some())?;
            Ok(add_result(
                conf, env, netns, &host_veth, &host_mac, &pod_mac, &r,
            ))
        });
    if result.is_err() {
        // No leak: the address goes back before the error does (set_up removed the veth).
        if let Err(e) = ipam.exec("DEL", config) {
            eprintln!("veil-cni: releasing the address after a failed ADD: {e}");
        }
    }
    result
}

/// Creates and configures the veth pair; removes it again if any later step fails. Returns the
/// MACs of the host and pod ends.
fn set_up(
    plan: &Plan,
    env: &Env,
    netns: &Path,
    host_veth: &str,
    has_v6: bool,
) -> Result<(String, String)> {
    let node_links = read_links()?;
    if let Some(stale) = node_links.iter().find(|l| l.name == host_veth) {
        // The same pod's interface from a sandbox whose DEL never came (names are per pod,
        // and one pod has one sandbox at a time).
        eprintln!(
            "veil-cni: replacing stale {host_veth} (container {})",
            stale.alias.as_deref().unwrap_or("unknown")
        );
        sys::ip(&["link", "del", host_veth]).map_err(setup("remove the stale host interface"))?;
    }
    sys::ip_batch(None, std::slice::from_ref(&plan.create))
        .map_err(setup("create the veth pair"))?;
    let configured = (|| {
        if has_v6 {
            // The host end's link-local address must be usable at once: while it is tentative
            // the node cannot solicit the pod's address, and the first packets to the pod wait
            // for the neighbour timer (a second).
            let path = PathBuf::from("/proc/sys/net/ipv6/conf")
                .join(host_veth)
                .join("accept_dad");
            std::fs::write(&path, "0").map_err(|source| Error::Setup {
                step: format!("turn off duplicate address detection on {host_veth}"),
                source: sys::Error::Io {
                    what: "cannot write",
                    path,
                    source,
                },
            })?;
        }
        sys::ip_batch(None, &plan.node).map_err(setup("configure the host interface"))?;
        let pod_cmds = plan.pod.clone();
        let ifname = env.ifname.clone();
        let sysctls = if has_v6 {
            POD_SYSCTLS_DUAL
        } else {
            POD_SYSCTLS
        };
        let pod_mac = in_netns(netns, move || -> Result<String> {
            for (key, value) in sysctls {
                let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
                match std::fs::write(&path, value) {
                    // A kernel without IPv6 has nothing to disable.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    r => r.map_err(|source| Error::Setup {
                        step: format!("set {key} in the pod's namespace"),
                        source: sys::Error::Io {
                            what: "cannot write",
                            path,
                            source,
                        },
                    })?,
                }
            }
            sys::ip_batch(None, &pod_cmds).map_err(setup("configure the pod's interface"))?;
            mac_of(&read_links()?, &ifname)
        })??;
        let host_mac = mac_of(&read_links()?, host_veth)?;
        Ok((host_mac, pod_mac))
    })();
    if configured.is_err() {
        // Deleting one end removes both.
        if let Err(e) = sys::ip(&["link", "del", host_veth]) {
            eprintln!("veil-cni: removing {host_veth} after a failed ADD: {e}");
        }
    }
    configured
}

fn del(env: &Env, conf: &NetConf, config: &[u8]) -> Result<()> {
    // The pod end first when its namespace is still there: that removes both ends.
    if let Some(netns) = env.netns.as_deref().filter(|p| p.exists()) {
        let ifname = env.ifname.clone();
        in_netns(netns, move || -> Result<()> {
            if read_links()?.iter().any(|l| l.name == ifname) {
                sys::ip(&["link", "del", &ifname]).map_err(setup("remove the pod's interface"))?;
            }
            Ok(())
        })??;
    }
    if let Ok(pod) = env.pod() {
        let host_veth = pod.host_veth();
        if let Some(link) = read_links()?.into_iter().find(|l| l.name == host_veth) {
            if link.alias.as_deref() == Some(env.container_id.as_str()) {
                sys::ip(&["link", "del", &host_veth])
                    .map_err(setup("remove the host interface"))?;
            } else {
                eprintln!(
                    "veil-cni: leaving {host_veth}: it belongs to container {}, not {}",
                    link.alias.as_deref().unwrap_or("unknown"),
                    env.container_id
                );
            }
        }
    }
    Ipam::find(env, conf)?.exec("DEL", config).map(drop)
}

fn check(env: &Env, conf: &NetConf, config: &[u8]) -> Result<()> {
    let pod = env.pod()?;
    let netns = env.existing_netns()?;
    let prev = conf
        .prev_result
        .as_ref()
        .ok_or_else(|| config_err("prevResult", "missing (CHECK needs the ADD result)"))?;
    let (ip, ip6) = prev_result_ips(prev)?;
    Ipam::find(env, conf)?.exec("CHECK", config)?;
    let pod_state = in_netns(netns, read_state)??;
    let node_state = read_state()?;
    if let Some(ip) = ip {
        let gw = conf
            .gateway
            .ok_or_else(|| config_err("gateway", "missing, but the pod has an IPv4 address"))?;
        verify_pod(&pod_state, &env.ifname, ip, gw, conf.mtu).map_err(Error::Check)?;
        verify_node(&node_state, &pod.host_veth(), ip).map_err(Error::Check)?;
    }
    if let Some(ip6) = ip6 {
        let gw6 = conf
            .gateway6
            .ok_or_else(|| config_err("gateway6", "missing, but the pod has an IPv6 address"))?;
        verify_pod(&pod_state, &env.ifname, ip6, gw6, conf.mtu).map_err(Error::Check)?;
        verify_node(&node_state, &pod.host_veth(), ip6).map_err(Error::Check)?;
    }
    Ok(())
}

fn setup(step: &'static str) -> impl FnOnce(sys::Error) -> Error {
    move |source| Error::Setup {
        step: step.to_string(),
        source,
    }
}

fn read_links() -> Result<Vec<Link>> {
    let out = sys::ip(&["-j", "link", "show"]).map_err(setup("list interfaces"))?;
    parse_links(&out).map_err(Error::Check)
}

fn read_state() -> Result<NetState> {
    let addrs = sys::ip(&["-j", "addr", "show"]).map_err(setup("list addresses"))?;
    let mut routes = vec![];
    for family in ["-4", "-6"] {
        let out = sys::ip(&["-j", family, "route", "show"]).map_err(setup("list routes"))?;
        routes.extend(parse_routes(&out).map_err(Error::Check)?);
    }
    Ok(NetState {
        links: read_links()?,
        addrs: parse_addrs(&addrs).map_err(Error::Check)?,
        routes,
    })
}

fn mac_of(links: &[Link], name: &str) -> Result<String> {
    links
        .iter()
        .find(|l| l.name == name)
        .map(|l| l.mac.clone())
        .ok_or_else(|| Error::Check(format!("{name} vanished during ADD")))
}

/// Runs `f` on a thread inside the network namespace at `path` (CNI_NETNS is a path, not a
/// name); processes it starts are in that namespace too.
fn in_netns<T: Send + 'static>(path: &Path, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let path = path.to_path_buf();
    std::thread::spawn(move || -> Result<T> {
        let enter = File::open(&path).and_then(|ns| {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
        });
        enter.map_err(|source| Error::Setup {
            step: "enter the pod's network namespace".into(),
            source: sys::Error::Io {
                what: "cannot enter netns",
                path: path.clone(),
                source,
            },
        })?;
        Ok(f())
    })
    .join()
    .unwrap_or_else(|_| Err(Error::Check("the namespace thread panicked".into())))
}

/// The delegated IPAM plugin, found in `CNI_PATH`.
struct Ipam {
    name: String,
    path: PathBuf,
}

impl Ipam {
    fn find(env: &Env, conf: &NetConf) -> Result<Ipam> {
        env.path
            .iter()
            .map(|d| d.join(&conf.ipam_type))
            .find(|p| p.is_file())
            .map(|path| Ipam {
                name: conf.ipam_type.clone(),
                path,
            })
            .ok_or_else(|| {
                let dirs: Vec<String> = env.path.iter().map(|d| d.display().to_string()).collect();
                config_err(
                    "ipam.type",
                    format!(
                        "no plugin {:?} in CNI_PATH ({})",
                        conf.ipam_type,
                        dirs.join(":")
                    ),
                )
            })
    }

    /// Runs the plugin with this process's environment, `CNI_COMMAND` set to `command`, and the
    /// configuration verbatim on stdin (the spec's delegation); its error is passed on as is.
    fn exec(&self, command: &str, config: &[u8]) -> Result<Vec<u8>> {
        let spawn_err = |source| Error::IpamSpawn {
            path: self.path.clone(),
            source,
        };
        let mut child = Process::new(&self.path)
            .env("CNI_COMMAND", command)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn_err)?;
        if let Some(mut pipe) = child.stdin.take() {
            pipe.write_all(config).map_err(spawn_err)?;
        }
        let out = child.wait_with_output().map_err(spawn_err)?;
        if out.status.success() {
            return Ok(out.stdout);
        }
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        let reported: Option<Value> = serde_json::from_slice(&out.stdout).ok();
        let field = |k: &str| {
            reported
                .as_ref()
                .and_then(|v| v.get(k))
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        match reported
            .as_ref()
            .and_then(|v| v.get("code")?.as_u64())
            .and_then(|c| u32::try_from(c).ok())
        {
            Some(code) => Err(Error::Ipam {
                plugin: self.name.clone(),
                code,
                msg: field("msg").unwrap_or_default(),
                details: field("details").unwrap_or(stderr),
            }),
            None => Err(Error::IpamUnusable {
                plugin: self.name.clone(),
                reason: format!(
                    "{command} failed ({}) without an error result: {} {stderr}",
                    out.status,
                    String::from_utf8_lossy(&out.stdout).trim()
                ),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    const ENV: [(&str, &str); 6] = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "0c2f-uid.1_x"),
        ("CNI_NETNS", "/var/run/netns/pod1"),
        ("CNI_IFNAME", "eth0"),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=frontend;K8S_POD_INFRA_CONTAINER_ID=abc",
        ),
        ("CNI_PATH", "/opt/cni/bin::/usr/lib/cni"),
    ];

    fn env_with(over: &[(&'static str, &'static str)]) -> Result<Env> {
        let mut pairs: Vec<(&str, &str)> = ENV
            .iter()
            .filter(|(k, _)| !over.iter().any(|(o, _)| o == k))
            .copied()
            .collect();
        pairs.extend(over.iter().filter(|(_, v)| *v != "<unset>"));
        let get = vars(&pairs);
        let command = Command::from_env(&get)?;
        Env::parse(command, &get)
    }

    fn env_var_of(e: Error) -> &'static str {
        match e {
            Error::Env { var, .. } => var,
            other => panic!("expected an env error, got {other:?}"),
        }
    }

    const CONF: &str = r#"{
        "cniVersion": "1.0.0", "name": "veil-node-a", "type": "veil-cni",
        "mtu": 1400, "gateway": "198.19.1.1",
        "ipam": {"type": "host-local", "ranges": [[{"subnet": "198.19.1.0/24"}]], "dataDir": "/x"}
    }"#;

    fn conf_with(edit: impl FnOnce(&mut Value)) -> Result<NetConf> {
        let mut v: Value = serde_json::from_str(CONF).unwrap();
        edit(&mut v);
        NetConf::parse(v.to_string().as_bytes())
    }

    fn config_field_of(e: Error) -> String {
        match e {
            Error::Config { field, .. } => field,
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn cni_args_split_into_pairs() {
        assert_eq!(
            parse_cni_args("IgnoreUnknown=1;;K8S_POD_NAME=a=b;").unwrap(),
            vec![
                ("IgnoreUnknown".to_string(), "1".to_string()),
                ("K8S_POD_NAME".to_string(), "a=b".to_string())
            ]
        );
        assert_eq!(parse_cni_args("").unwrap(), vec![]);
        assert!(parse_cni_args("K8S_POD_NAME=a;junk")
            .unwrap_err()
            .contains("junk"));
    }

    #[test]
    fn env_parses_every_variable() {
        let env = env_with(&[]).unwrap();
        assert_eq!(env.command, Command::Add);
        assert_eq!(env.container_id, "0c2f-uid.1_x");
        assert_eq!(env.netns, Some(PathBuf::from("/var/run/netns/pod1")));
        assert_eq!(env.ifname, "eth0");
        assert_eq!(
            env.path,
            vec![PathBuf::from("/opt/cni/bin"), PathBuf::from("/usr/lib/cni")]
        );
        let pod = env.pod().unwrap();
        assert_eq!(
            (pod.namespace.as_str(), pod.name.as_str()),
            ("shop", "frontend")
        );
        assert_eq!(pod.host_veth(), host_veth_name("shop", "frontend"));
    }

    #[test]
    fn env_errors_name_the_variable() {
        let table: &[(&[(&'static str, &'static str)], &str)] = &[
            (&[("CNI_COMMAND", "<unset>")], "CNI_COMMAND"),
            (&[("CNI_COMMAND", "STATUS")], "CNI_COMMAND"),
            (&[("CNI_COMMAND", "GC")], "CNI_COMMAND"),
            (&[("CNI_CONTAINERID", "<unset>")], "CNI_CONTAINERID"),
            (&[("CNI_CONTAINERID", "-abc")], "CNI_CONTAINERID"),
            (&[("CNI_CONTAINERID", "a b")], "CNI_CONTAINERID"),
            (&[("CNI_NETNS", "<unset>")], "CNI_NETNS"),
            (
                &[("CNI_COMMAND", "CHECK"), ("CNI_NETNS", "<unset>")],
                "CNI_NETNS",
            ),
            (&[("CNI_NETNS", "relative/ns")], "CNI_NETNS"),
            (&[("CNI_NETNS", "/var/run/netns/a b")], "CNI_NETNS"),
            (&[("CNI_IFNAME", "<unset>")], "CNI_IFNAME"),
            (&[("CNI_IFNAME", "a-very-long-interface")], "CNI_IFNAME"),
            (&[("CNI_IFNAME", "eth/0")], "CNI_IFNAME"),
            (&[("CNI_PATH", "<unset>")], "CNI_PATH"),
            (&[("CNI_PATH", ":::")], "CNI_PATH"),
            (&[("CNI_ARGS", "K8S_POD_NAME")], "CNI_ARGS"),
        ];
        for (over, var) in table {
            let e = env_with(over).expect_err(&format!("{over:?} accepted"));
            assert_eq!(e.code(), code::INVALID_ENV, "{over:?}");
            assert_eq!(env_var_of(e), *var, "{over:?}");
        }
    }

    #[test]
    fn del_needs_no_netns_and_no_pod() {
        let env = env_with(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_NETNS", "<unset>"),
            ("CNI_ARGS", "<unset>"),
        ])
        .unwrap();
        assert_eq!(env.netns, None);
        assert!(env.pod().is_err());
    }

    #[test]
    fn missing_pod_args_are_named() {
        let env = env_with(&[("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop")]).unwrap();
        let e = env.pod().unwrap_err();
        assert_eq!(e.code(), code::INVALID_ENV);
        let msg = e.to_string();
        assert!(
            msg.contains("K8S_POD_NAME") && !msg.contains("no K8S_POD_NAMESPACE"),
            "{msg}"
        );
        let env = env_with(&[("CNI_ARGS", "K8S_POD_NAME=")]).unwrap();
        let msg = env.pod().unwrap_err().to_string();
        assert!(
            msg.contains("no K8S_POD_NAMESPACE and K8S_POD_NAME"),
            "{msg}"
        );
    }

    #[test]
    fn config_parses_with_defaults() {
        let c = NetConf::parse(CONF.as_bytes()).unwrap();
        assert_eq!(c.cni_version, "1.0.0");
        assert_eq!(c.name, "veil-node-a");
        assert_eq!(c.mtu, 1400);
        assert_eq!(c.gateway, Some(Ipv4Addr::new(198, 19, 1, 1)));
        assert_eq!(c.ipam_type, "host-local");
        // An IPv6-only network: `gateway6` without `gateway`.
        let c = conf_with(|v| {
            v.as_object_mut().unwrap().remove("gateway");
            v["gateway6"] = json!("fd00:198:19:1::1");
        })
        .unwrap();
        assert_eq!(c.gateway, None);
        assert_eq!(c.gateway6, Some("fd00:198:19:1::1".parse().unwrap()));
        assert_eq!(c.prev_result, None);
        let c = conf_with(|v| {
            v.as_object_mut().unwrap().remove("mtu");
            v["cniVersion"] = json!("0.4.0");
        })
        .unwrap();
        assert_eq!(c.mtu, DEFAULT_MTU);
        assert_eq!(c.cni_version, "0.4.0");
    }

    #[test]
    fn config_tolerates_unknown_keys() {
        let c = conf_with(|v| {
            v["runtimeConfig"] = json!({"portMappings": [], "bandwidth": {"x": 1}});
            v["args"] = json!({"cni": {"ips": ["198.19.1.9"]}});
            v["somethingNew"] = json!(42);
            v["ipam"]["routes"] = json!([{"dst": "0.0.0.0/0"}]);
            v["prevResult"] = json!({"cniVersion": "1.0.0", "ips": [], "extra": true});
        })
        .unwrap();
        assert_eq!(c.ipam_type, "host-local");
        assert!(c.prev_result.is_some());
    }

    #[test]
    fn config_errors_name_the_field() {
        type Edit = fn(&mut Value);
        let table: &[(Edit, &str)] = &[
            (|v| v["mtu"] = json!("1400"), "mtu"),
            (|v| v["mtu"] = json!(-1), "mtu"),
            (|v| v["mtu"] = json!(40), "mtu"),
            (|v| v["gateway"] = json!("198.19.1"), "gateway"),
            (|v| v["gateway"] = json!("fd00::1"), "gateway"),
            (
                |v| drop(v.as_object_mut().unwrap().remove("gateway")),
                "gateway",
            ),
            (|v| drop(v.as_object_mut().unwrap().remove("ipam")), "ipam"),
            (|v| v["ipam"] = json!("host-local"), "ipam"),
            (|v| v["ipam"] = json!({"subnet": "x"}), "ipam.type"),
            (|v| v["ipam"]["type"] = json!(7), "ipam.type"),
            (|v| v["ipam"]["type"] = json!("../bin/sh"), "ipam.type"),
            (|v| v["name"] = json!(["a"]), "name"),
            (|v| drop(v.as_object_mut().unwrap().remove("name")), "name"),
            (|v| drop(v.as_object_mut().unwrap().remove("type")), "type"),
            (
                |v| drop(v.as_object_mut().unwrap().remove("cniVersion")),
                "cniVersion",
            ),
            (|v| v["cniVersion"] = json!(1), "cniVersion"),
        ];
        for (i, (edit, field)) in table.iter().enumerate() {
            let e = conf_with(edit).expect_err(&format!("case {i} accepted"));
            assert_eq!(e.code(), code::INVALID_CONFIG, "case {i}: {e}");
            assert_eq!(config_field_of(e), *field, "case {i}");
        }
    }

    #[test]
    fn config_decoding_and_version_errors_have_their_codes() {
        assert_eq!(
            NetConf::parse(b"{not json").unwrap_err().code(),
            code::DECODING_FAILURE
        );
        assert_eq!(
            NetConf::parse(b"").unwrap_err().code(),
            code::DECODING_FAILURE
        );
        assert_eq!(
            NetConf::parse(b"[1]").unwrap_err().code(),
            code::INVALID_CONFIG
        );
        for version in ["0.3.1", "1.1.0", "2.0.0"] {
            let e = conf_with(|v| v["cniVersion"] = json!(version)).unwrap_err();
            assert_eq!(e.code(), code::INCOMPATIBLE_VERSION, "{version}");
            assert!(e.to_string().contains(version));
        }
        assert_eq!(version_hint(CONF.as_bytes()), "1.0.0");
        assert_eq!(version_hint(br#"{"cniVersion":"0.4.0"}"#), "0.4.0");
        assert_eq!(version_hint(br#"{"cniVersion":"9.9.9"}"#), DEFAULT_VERSION);
        assert_eq!(version_hint(b"garbage"), DEFAULT_VERSION);
    }

    #[test]
    fn ipam_result_gives_one_address_of_each_family_it_has() {
        let r = parse_ipam_result(
            br#"{"cniVersion":"1.0.0","ips":[{"address":"198.19.1.7/24","gateway":"198.19.1.1"}],"dns":{"nameservers":["198.19.1.53"]}}"#,
        )
        .unwrap();
        assert_eq!(r.ipv4, Some(Ipv4Addr::new(198, 19, 1, 7)));
        assert_eq!(r.ipv6, None);
        assert_eq!(r.dns, json!({"nameservers": ["198.19.1.53"]}));
        let bad: &[(&[u8], &str)] = &[
            (b"nope", "not JSON"),
            (br#"{"ips":[]}"#, "no address"),
            (br#"{"dns":{}}"#, "no `ips`"),
            (
                br#"{"ips":[{"address":"198.19.1.7/24"},{"address":"fd00::5/64"},{"address":"fd00::6/64"}]}"#,
                "2 IPv6",
            ),
            (
                br#"{"ips":[{"address":"198.19.1.7/24"},{"address":"198.19.1.8/24"}]}"#,
                "2 IPv4",
            ),
            (br#"{"ips":[{"gateway":"198.19.1.1"}]}"#, "no `address`"),
        ];
        for (out, needle) in bad {
            let e = parse_ipam_result(out).unwrap_err();
            assert!(e.contains(needle), "{e:?} lacks {needle:?}");
        }
        // A dual-stack pod: one address of each family.
        let dual = parse_ipam_result(
            br#"{"ips":[{"address":"198.19.1.7/24"},{"address":"fd00:198:19:1::7/64"}]}"#,
        )
        .unwrap();
        assert_eq!(
            (dual.ipv4, dual.ipv6),
            (
                Some(Ipv4Addr::new(198, 19, 1, 7)),
                Some("fd00:198:19:1::7".parse().unwrap())
            )
        );
        // An IPv6-only pod.
        let six = parse_ipam_result(br#"{"ips":[{"address":"fd00:198:19:1::7/64"}]}"#).unwrap();
        assert_eq!(
            (six.ipv4, six.ipv6),
            (None, Some("fd00:198:19:1::7".parse().unwrap()))
        );
    }

    #[test]
    fn plan_is_the_lab_pod_shape() {
        let env = env_with(&[]).unwrap();
        let conf = NetConf::parse(CONF.as_bytes()).unwrap();
        let plan_for = |conf: &NetConf, ipv4: Option<Ipv4Addr>, ipv6: Option<&str>| {
            let ipam = IpamResult {
                ipv4,
                ipv6: ipv6.map(|a| a.parse().unwrap()),
                dns: json!({}),
            };
            plan_add(
                &env,
                conf,
                Path::new("/var/run/netns/pod1"),
                "veil0123456789a",
                &ipam,
            )
        };
        let plan = plan_for(&conf, Some(Ipv4Addr::new(198, 19, 1, 7)), None);
        assert_eq!(
            plan.create,
            "link add veil0123456789a mtu 1400 type veth peer name eth0 mtu 1400 netns /var/run/netns/pod1"
        );
        assert_eq!(
            plan.node,
            [
                "link set veil0123456789a alias 0c2f-uid.1_x",
                "addr add 198.19.1.1/32 dev veil0123456789a",
                "link set veil0123456789a up",
                "route add 198.19.1.7/32 dev veil0123456789a src 198.19.1.1",
            ]
        );
        assert_eq!(
            plan.pod,
            [
                "link set lo up",
                "addr add 198.19.1.7/32 dev eth0",
                "link set eth0 up",
                "route add 198.19.1.1 dev eth0 scope link",
                "route add default via 198.19.1.1 dev eth0 src 198.19.1.7",
            ]
        );
        // Dual stack: the same over IPv6, through the configuration's `gateway6`.
        let conf = NetConf {
            gateway6: Some("fd00:198:19:1::1".parse().unwrap()),
            ..conf
        };
        let plan = plan_for(
            &conf,
            Some(Ipv4Addr::new(198, 19, 1, 7)),
            Some("fd00:198:19:1::7"),
        );
        assert_eq!(
            plan.node,
            [
                "link set veil0123456789a alias 0c2f-uid.1_x",
                "addr add 198.19.1.1/32 dev veil0123456789a",
                "addr add fd00:198:19:1::1/128 dev veil0123456789a nodad",
                "link set veil0123456789a up",
                "route add 198.19.1.7/32 dev veil0123456789a src 198.19.1.1",
                "route add fd00:198:19:1::7/128 dev veil0123456789a src fd00:198:19:1::1",
            ]
        );
        assert_eq!(
            plan.pod,
            [
                "link set lo up",
                "addr add 198.19.1.7/32 dev eth0",
                "addr add fd00:198:19:1::7/128 dev eth0 nodad",
                "link set eth0 up",
                "route add 198.19.1.1 dev eth0 scope link",
                "route add default via 198.19.1.1 dev eth0 src 198.19.1.7",
                "route add fd00:198:19:1::1/128 dev eth0",
                "route add ::/0 via fd00:198:19:1::1 dev eth0 src fd00:198:19:1::7",
            ]
        );
        // IPv6 only: no IPv4 gateway, address or route.
        let conf = NetConf {
            gateway: None,
            ..conf
        };
        let plan = plan_for(&conf, None, Some("fd00:198:19:1::7"));
        assert_eq!(
            plan.node,
            [
                "link set veil0123456789a alias 0c2f-uid.1_x",
                "addr add fd00:198:19:1::1/128 dev veil0123456789a nodad",
                "link set veil0123456789a up",
                "route add fd00:198:19:1::7/128 dev veil0123456789a src fd00:198:19:1::1",
            ]
        );
        assert_eq!(
            plan.pod,
            [
                "link set lo up",
                "addr add fd00:198:19:1::7/128 dev eth0 nodad",
                "link set eth0 up",
                "route add fd00:198:19:1::1/128 dev eth0",
                "route add ::/0 via fd00:198:19:1::1 dev eth0 src fd00:198:19:1::7",
            ]
        );
    }

    #[test]
    fn add_result_has_the_spec_shape() {
        let env = env_with(&[]).unwrap();
        let conf = NetConf::parse(CONF.as_bytes()).unwrap();
        let ipam = IpamResult {
            ipv4: Some(Ipv4Addr::new(198, 19, 1, 7)),
            ipv6: None,
            dns: json!({}),
        };
        let netns = Path::new("/var/run/netns/pod1");
        let r = add_result(&conf, &env, netns, "veilx", "aa:aa", "bb:bb", &ipam);
        assert_eq!(
            r,
            json!({
                "cniVersion": "1.0.0",
                "interfaces": [
                    {"name": "veilx", "mac": "aa:aa"},
                    {"name": "eth0", "mac": "bb:bb", "sandbox": "/var/run/netns/pod1"},
                ],
                "ips": [{"address": "198.19.1.7/32", "gateway": "198.19.1.1", "interface": 1}],
                "routes": [{"dst": "0.0.0.0/0", "gw": "198.19.1.1"}],
                "dns": {},
            })
        );
        assert_eq!(prev_result_ips(&r).unwrap(), (ipam.ipv4, None));
        let old = NetConf {
            cni_version: "0.4.0".into(),
            ..conf
        };
        let r = add_result(&old, &env, netns, "veilx", "aa:aa", "bb:bb", &ipam);
        assert_eq!(r["cniVersion"], "0.4.0");
        assert_eq!(r["ips"][0]["version"], "4");
        assert_eq!(
            prev_result_ips(&json!({"ips": []})).unwrap_err().code(),
            code::INVALID_CONFIG
        );
        // Dual stack: both addresses and both default routes, and CHECK reads the IPv6 one back.
        let dual_conf = NetConf {
            gateway6: Some("fd00:198:19:1::1".parse().unwrap()),
            ..old
        };
        let dual = IpamResult {
            ipv6: Some("fd00:198:19:1::7".parse().unwrap()),
            ..ipam
        };
        let r = add_result(&dual_conf, &env, netns, "veilx", "aa:aa", "bb:bb", &dual);
        assert_eq!(r["ips"][1]["address"], "fd00:198:19:1::7/128");
        assert_eq!(r["ips"][1]["version"], "6");
        assert_eq!(
            r["routes"][1],
            json!({"dst": "::/0", "gw": "fd00:198:19:1::1"})
        );
        assert_eq!(prev_result_ips(&r).unwrap(), (dual.ipv4, dual.ipv6));
        // IPv6 only: one address, one default route.
        let six_conf = NetConf {
            gateway: None,
            ..dual_conf
        };
        let six = IpamResult { ipv4: None, ..dual };
        let r = add_result(&six_conf, &env, netns, "veilx", "aa:aa", "bb:bb", &six);
        assert_eq!(r["ips"].as_array().unwrap().len(), 1);
        assert_eq!(r["ips"][0]["address"], "fd00:198:19:1::7/128");
        assert_eq!(
            r["routes"],
            json!([{"dst": "::/0", "gw": "fd00:198:19:1::1"}])
        );
        assert_eq!(prev_result_ips(&r).unwrap(), (None, six.ipv6));
    }

    #[test]
    fn error_json_carries_code_msg_and_details() {
        let cases: Vec<(Error, u32)> = vec![
            (
                Error::IncompatibleVersion {
                    version: "0.3.1".into(),
                },
                1,
            ),
            (env_err("CNI_NETNS", "not set"), 4),
            (Error::Stdin(io::Error::other("closed")), 5),
            (NetConf::parse(b"{").unwrap_err(), 6),
            (config_err("mtu", "bad"), 7),
            (
                Error::Setup {
                    step: "create the veth pair".into(),
                    source: sys::Error::Command {
                        command: "ip".into(),
                        stderr: "RTNETLINK answers: File exists".into(),
                    },
                },
                100,
            ),
            (Error::Check("no eth0".into()), 101),
            (
                Error::IpamUnusable {
                    plugin: "host-local".into(),
                    reason: "no IPv4".into(),
                },
                102,
            ),
            (
                Error::Ipam {
                    plugin: "host-local".into(),
                    code: 999,
                    msg: "range full".into(),
                    details: "d".into(),
                },
                999,
            ),
        ];
        for (e, code) in cases {
            let j = error_json("0.4.0", &e);
            assert_eq!(j["cniVersion"], "0.4.0");
            assert_eq!(j["code"], code, "{e}");
            assert_eq!(j["msg"], e.to_string());
            assert!(j["details"].is_string());
            assert_eq!(j.as_object().unwrap().len(), 4);
        }
        let e = Error::Setup {
            step: "create the veth pair".into(),
            source: sys::Error::Command {
                command: "ip -batch -".into(),
                stderr: "RTNETLINK answers: File exists".into(),
            },
        };
        assert!(error_json("1.0.0", &e)["details"]
            .as_str()
            .unwrap()
            .contains("File exists"));
        assert_eq!(
            version_json(),
            json!({"cniVersion": "1.0.0", "supportedVersions": ["0.4.0", "1.0.0"]})
        );
    }

    #[test]
    fn invoke_answers_without_touching_the_system() {
        let mut no_stdin = || -> io::Result<Vec<u8>> { panic!("VERSION must not read stdin") };
        let out = invoke(&vars(&[("CNI_COMMAND", "VERSION")]), &mut no_stdin);
        assert_eq!(out.exit, 0);
        assert_eq!(
            serde_json::from_str::<Value>(&out.stdout).unwrap(),
            version_json()
        );

        let out = invoke(&vars(&[("CNI_COMMAND", "STATUS")]), &mut no_stdin);
        assert_eq!(out.exit, 1);
        assert_eq!(
            serde_json::from_str::<Value>(&out.stdout).unwrap()["code"],
            4
        );

        // Config errors come before anything runs; the error is in the config's version.
        let mut stdin = || {
            Ok(
                br#"{"cniVersion":"0.4.0","name":"n","type":"veil-cni","gateway":"198.19.1.1"}"#
                    .to_vec(),
            )
        };
        let out = invoke(&vars(&ENV), &mut stdin);
        let j: Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(
            (out.exit, j["code"].clone(), j["cniVersion"].clone()),
            (1, json!(7), json!("0.4.0"))
        );

        let mut stdin = || Err(io::Error::other("closed"));
        let out = invoke(&vars(&ENV), &mut stdin);
        assert_eq!(
            serde_json::from_str::<Value>(&out.stdout).unwrap()["code"],
            5
        );
    }

    const LINKS: &str = r#"[
        {"ifindex":1,"ifname":"lo","flags":["LOOPBACK","UP","LOWER_UP"],"mtu":65536,"address":"00:00:00:00:00:00"},
        {"ifindex":2,"ifname":"eth0","flags":["BROADCAST","MULTICAST","UP","LOWER_UP"],"mtu":1400,"address":"0a:1b:2c:3d:4e:5f","link_netnsid":0},
        {"ifindex":3,"ifname":"veil0123456789a","flags":["BROADCAST","UP"],"mtu":1400,"address":"66:77:88:99:aa:bb","ifalias":"cid-1"}
    ]"#;
    const ADDRS: &str = r#"[{"ifindex":2,"ifname":"eth0","addr_info":[{"family":"inet","local":"198.19.1.7","prefixlen":32,"scope":"global"}]}]"#;
    const ROUTES: &str = r#"[
        {"dst":"default","gateway":"198.19.1.1","dev":"eth0","prefsrc":"198.19.1.7","flags":[]},
        {"dst":"198.19.1.1","dev":"eth0","scope":"link","flags":[]},
        {"dst":"198.19.1.7","dev":"veil0123456789a","scope":"link","prefsrc":"198.19.1.1","flags":["linkdown"]}
    ]"#;

    fn state() -> NetState {
        NetState {
            links: parse_links(LINKS).unwrap(),
            addrs: parse_addrs(ADDRS).unwrap(),
            routes: parse_routes(ROUTES).unwrap(),
        }
    }

    #[test]
    fn ip_json_parses() {
        let s = state();
        assert_eq!(s.links.len(), 3);
        assert_eq!(
            s.links[2],
            Link {
                name: "veil0123456789a".into(),
                mac: "66:77:88:99:aa:bb".into(),
                mtu: 1400,
                alias: Some("cid-1".into()),
                is_up: true,
            }
        );
        assert_eq!(
            s.addrs,
            vec![("eth0".into(), IpAddr::V4(Ipv4Addr::new(198, 19, 1, 7)), 32)]
        );
        assert_eq!(s.routes[0].gateway.as_deref(), Some("198.19.1.1"));
        assert_eq!(parse_routes("").unwrap(), vec![]);
        assert!(parse_links("{}").is_err());
    }

    #[test]
    fn check_finds_what_differs() {
        let (ip, gw) = (Ipv4Addr::new(198, 19, 1, 7), Ipv4Addr::new(198, 19, 1, 1));
        let s = state();
        verify_pod(&s, "eth0", ip, gw, 1400).unwrap();
        verify_node(&s, "veil0123456789a", ip).unwrap();

        assert!(verify_pod(&s, "eth1", ip, gw, 1400)
            .unwrap_err()
            .contains("no eth1"));
        assert!(
            verify_pod(&s, "eth0", Ipv4Addr::new(198, 19, 1, 8), gw, 1400)
                .unwrap_err()
                .contains("198.19.1.8/32")
        );
        assert!(verify_pod(&s, "eth0", ip, gw, 1440)
            .unwrap_err()
            .contains("MTU"));
        assert!(
            verify_pod(&s, "eth0", ip, Ipv4Addr::new(198, 19, 1, 2), 1400)
                .unwrap_err()
                .contains("default route")
        );
        let mut down = s.clone();
        down.links[1].is_up = false;
        assert!(verify_pod(&down, "eth0", ip, gw, 1400)
            .unwrap_err()
            .contains("down"));
        assert!(verify_node(&s, "veilother", ip)
            .unwrap_err()
            .contains("no host"));
        assert!(
            verify_node(&s, "veil0123456789a", Ipv4Addr::new(198, 19, 1, 8))
                .unwrap_err()
                .contains("no route")
        );
    }

    #[test]
    fn check_reads_and_verifies_ipv6_addresses_and_routes() {
        let ip6: Ipv6Addr = "fd00:198:19:1::7".parse().unwrap();
        let gw6: Ipv6Addr = "fd00:198:19:1::1".parse().unwrap();
        let mut s = state();
        s.addrs = parse_addrs(
            r#"[{"ifname":"eth0","addr_info":[{"local":"198.19.1.7","prefixlen":32},
                {"local":"fd00:198:19:1::7","prefixlen":128},{"local":"fe80::1","prefixlen":64}]}]"#,
        )
        .unwrap();
        s.routes.extend(
            parse_routes(
                r#"[{"dst":"default","gateway":"fd00:198:19:1::1","dev":"eth0"},
                    {"dst":"fd00:198:19:1::7","dev":"veil0123456789a"}]"#,
            )
            .unwrap(),
        );
        verify_pod(&s, "eth0", ip6, gw6, 1400).unwrap();
        verify_node(&s, "veil0123456789a", ip6).unwrap();
        let other: Ipv6Addr = "fd00:198:19:1::8".parse().unwrap();
        assert!(verify_pod(&s, "eth0", other, gw6, 1400)
            .unwrap_err()
            .contains("fd00:198:19:1::8/128"));
        assert!(verify_node(&s, "veil0123456789a", other)
            .unwrap_err()
            .contains("no route fd00:198:19:1::8/128"));
        // The IPv4 default route is not the IPv6 one.
        assert!(verify_pod(
            &s,
            "eth0",
            ip6,
            "fd00:198:19:1::2".parse::<Ipv6Addr>().unwrap(),
            1400
        )
        .unwrap_err()
        .contains("default route"));
    }
}
