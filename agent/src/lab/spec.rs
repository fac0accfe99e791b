//! Lab file parsing, validation and address allocation (sans-IO).
//!
//! A lab file overrides any part of the default topology. Parsing is strict: unknown keys and bad
//! values are errors naming the field path, and validation runs to the end before anything is
//! created, so a bad file never leaves half a lab behind.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use serde::{Deserialize, Serialize};

/// Errors in a lab file or lab flags. Each names the field path it is about.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("lab file: {path}: {message}")]
    Parse { path: String, message: String },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

fn invalid(path: impl Into<String>, message: impl Into<String>) -> Error {
    Error::Invalid {
        path: path.into(),
        message: message.into(),
    }
}

/// The agents' WireGuard backend choice is the agent's own type (the lab only passes it on).
pub use crate::config::BackendChoice;

/// Where the lab's SVIDs come from. The default is real SPIRE (the README's main job runs on
/// it); `dev` is for the suites that need forced rotation or instant revocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum IdentityProvider {
    /// veil's dev SPIRE server (`veil lab spire-server`): one process, one socket per node,
    /// forced rotation and instant revocation (`veil lab rotate`, `veil lab ca`).
    Dev,
    /// Real SPIRE: one spire-server in the underlay netns, one spire-agent per node.
    #[default]
    Spire,
}

veil_daemon::keyword_enum!(
    IdentityProvider,
    "identity provider",
    Spire = "spire",
    Dev = "dev"
);

/// Where the agents read cluster state from: a real kube-apiserver the lab runs (Pods made
/// through `veil-cni` by the lab playing kubelet, policies with `kubectl apply`; what `lab up`
/// picks unless told otherwise) or the files the lab writes (`veil policy` edits them). The
/// serde default is `Files`: the state of a lab made before the key existed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ControlPlane {
    /// etcd + kube-apiserver in the underlay namespace; agents use the Kubernetes source.
    Kubernetes,
    /// `cp/*.json` in the lab directory; agents use the files source.
    #[default]
    Files,
}

veil_daemon::keyword_enum!(
    ControlPlane,
    "control plane",
    Kubernetes = "kubernetes",
    Files = "files",
);

/// The pods' address families: `ipv4`, `ipv6` or `dual` (both, IPv4 first). The serde default
/// is `Ipv4`: the state of a lab made before the key existed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum IpFamily {
    #[default]
    Ipv4,
    Ipv6,
    Dual,
}

impl IpFamily {
    /// Do pods get an IPv6 address?
    pub fn has_v6(self) -> bool {
        self != Self::Ipv4
    }

    /// Do pods get an IPv4 address?
    pub fn has_v4(self) -> bool {
        self != Self::Ipv6
    }

    /// Is the underlay IPv6 (the nodes' addresses, WireGuard, the control channel)? Only in an
    /// IPv6-only lab; a dual-stack lab's underlay is IPv4.
    pub fn v6_underlay(self) -> bool {
        self == Self::Ipv6
    }
}

veil_daemon::keyword_enum!(
    IpFamily,
    "IP family",
    Ipv4 = "ipv4",
    Ipv6 = "ipv6",
    Dual = "dual"
);

/// `on`/`off` switch as users write it in YAML or on the command line (YAML 1.1 also reads
/// bare on/off as booleans, so both forms are accepted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OnOff(pub bool);

impl<'de> Deserialize<'de> for OnOff {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bool(b) => Ok(OnOff(b)),
            Raw::Str(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl std::str::FromStr for OnOff {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "on" | "true" => Ok(OnOff(true)),
            "off" | "false" => Ok(OnOff(false)),
            other => Err(format!("expected on or off, got {other:?}")),
        }
    }
}

/// A duration written as `30s`, `5m`, `1h`, `1h30m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl std::str::FromStr for HumanDuration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        humantime::parse_duration(s)
            .map(HumanDuration)
            .map_err(|e| format!("bad duration {s:?}: {e} (write e.g. 30s, 5m, 1h)"))
    }
}

/// The lab file as written. Every key is optional; absent keys take the default topology.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabFile {
    pub trust_domain: Option<String>,
    /// The lab's trust domains federate (`identity: dev` with a node of its own
    /// `trust_domain`): each trust domain's SPIRE serves the others' roots as federated
    /// bundles, so a node holds the roots of a trust domain it must still never peer with.
    pub federation: Option<bool>,
    pub encryption: Option<OnOff>,
    /// Encrypt the nodes' own traffic too (host network), not only pod traffic.
    pub node_encryption: Option<OnOff>,
    /// `ipv4`, `ipv6` or `dual`: the pods' address families.
    pub ip_family: Option<IpFamily>,
    /// `ipv4`, `ipv6` or `dual`: the nodes' underlay addresses. The underlay of the pods' first
    /// family unless asked otherwise; `dual` (a dual-stack lab only) gives each node an IPv6
    /// underlay address beside its IPv4 one, which WireGuard leaves to node traffic.
    pub underlay_family: Option<IpFamily>,
    pub svid_ttl: Option<HumanDuration>,
    pub backend: Option<BackendChoice>,
    /// `spire` or `dev`: who issues the lab's SVIDs.
    pub identity: Option<IdentityProvider>,
    /// `kubernetes` or `files`: where the agents read cluster state from.
    pub control_plane: Option<ControlPlane>,
    pub underlay_mtu: Option<u32>,
    /// How often each node pair re-runs its node handshake (new WireGuard PSK).
    pub psk_rotation: Option<HumanDuration>,
    /// How often each node replaces its static WireGuard key.
    pub key_rotation: Option<HumanDuration>,
    pub nodes: Option<Vec<NodeFile>>,
    pub pods: Option<Vec<PodFile>>,
    /// Services balanced at the socket (default: `shop/backend`, 80 → 8080, with the default
    /// pods).
    pub services: Option<Vec<ServiceFile>>,
}

/// A Service as a lab file writes it (Kubernetes' Service, flattened).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceFile {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Pods of the namespace with all these labels are its backends.
    pub selector: BTreeMap<String, String>,
    pub ports: Vec<ServicePortFile>,
    /// The ClusterIP of its first family (the lab's first unless this is IPv6), from the
    /// service CIDR 198.18.16.0/20 or fd00:198:16::/108; allocated when absent. A dual-stack
    /// Service's other ClusterIP is always allocated.
    pub cluster_ip: Option<IpAddr>,
    /// `SingleStack` (default: one ClusterIP, of `cluster_ip`'s family or the lab's first),
    /// `PreferDualStack` (both families in a dual-stack lab, else one) or `RequireDualStack`
    /// (both, refused outside a dual-stack lab), as Kubernetes' `ipFamilyPolicy`.
    pub ip_family_policy: Option<IpFamilyPolicy>,
    /// `None` (default: a random ready backend per connection) or `ClientIP`.
    pub session_affinity: Option<SessionAffinity>,
    /// How long a client keeps its backend under ClientIP affinity (default 3h, as Kubernetes).
    pub session_affinity_timeout: Option<HumanDuration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServicePortFile {
    #[serde(default)]
    pub name: String,
    pub port: u16,
    /// Defaults to `port`.
    pub target_port: Option<u16>,
    /// `TCP` (default), `UDP` or `SCTP`.
    pub protocol: Option<crate::policy::parse::Protocol>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
pub enum IpFamilyPolicy {
    #[default]
    SingleStack,
    PreferDualStack,
    RequireDualStack,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
pub enum SessionAffinity {
    #[default]
    None,
    #[serde(rename = "ClientIP")]
    ClientIp,
}

/// A resolved Service: its ClusterIP allocated, its ports complete. Backends are not part of
/// the spec: the control plane finds them among the pods.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    pub name: String,
    pub namespace: String,
    pub selector: BTreeMap<String, String>,
    /// The first ClusterIP: IPv4 unless the Service is IPv6-only.
    pub cluster_ip: IpAddr,
    /// A dual-stack Service's IPv6 ClusterIP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_ipv6: Option<Ipv6Addr>,
    pub ports: Vec<crate::cluster::ServicePort>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity_timeout_s: Option<u32>,
}

impl ServiceSpec {
    pub fn qualified_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Its ClusterIPs: the first, then a dual-stack Service's IPv6 one.
    pub fn cluster_ips(&self) -> impl Iterator<Item = IpAddr> {
        std::iter::once(self.cluster_ip).chain(self.cluster_ipv6.map(IpAddr::V6))
    }

    /// Does it have a ClusterIP of `addr`'s family (so a selected pod's `addr` is a backend)?
    pub fn has_family_of(&self, addr: &IpAddr) -> bool {
        self.cluster_ips().any(|c| c.is_ipv4() == addr.is_ipv4())
    }

    /// Does `labels` (a pod's, in `namespace`) match the selector? An empty selector selects
    /// nothing, as in Kubernetes (a Service without a selector has no managed endpoints).
    pub fn selects(&self, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
        namespace == self.namespace
            && !self.selector.is_empty()
            && self.selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeFile {
    pub name: String,
    /// The trust domain whose CA issues this node's SVIDs (and its pods'), when it is not the
    /// lab's: a node of another trust domain, which the others must refuse to peer with.
    pub trust_domain: Option<String>,
    /// This node's WireGuard backend when it is not the lab's (a kernel-WireGuard node beside
    /// veil-wg nodes); wins over the lab-wide `backend:` and `--backend`.
    pub backend: Option<BackendChoice>,
    /// Sizes of this node's maps (the agent config's `map_max_entries`), to fill one at runtime.
    #[serde(default)]
    pub map_max_entries: BTreeMap<String, u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodFile {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    pub node: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub service_account: Option<String>,
    #[serde(default)]
    pub serve: Vec<ServeSpec>,
}

fn default_namespace() -> String {
    "default".to_string()
}

/// A server the lab runs inside a pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeSpec {
    pub port: u16,
    pub kind: ServeKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServeKind {
    /// HTTP/1.1: 200 with a short body on every path.
    Http,
    /// TCP and UDP echo on the same port.
    Echo,
}

/// Options given as `lab up` flags; they win over the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub encryption: Option<bool>,
    pub node_encryption: Option<bool>,
    pub ip_family: Option<IpFamily>,
    pub underlay_family: Option<IpFamily>,
    pub svid_ttl: Option<Duration>,
    pub backend: Option<BackendChoice>,
    pub identity: Option<IdentityProvider>,
    pub control_plane: Option<ControlPlane>,
}

/// A validated lab: names, addresses and options all resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabSpec {
    pub name: String,
    pub trust_domain: String,
    pub encryption: bool,
    /// Node traffic encryption (absent in the state of labs made before the key: off).
    #[serde(default)]
    pub node_encryption: bool,
    /// Absent in the state of labs made before the key: IPv4 only.
    #[serde(default)]
    pub ip_family: IpFamily,
    /// Do the nodes have an IPv6 underlay address beside their IPv4 one (`underlay_family:
    /// dual`)? Absent in the state of labs made before the key: no.
    #[serde(default)]
    pub dual_underlay: bool,
    #[serde(with = "duration_secs")]
    pub svid_ttl: Duration,
    pub backend: BackendChoice,
    /// Absent in the state of labs made before the key existed: those ran the dev server.
    #[serde(default)]
    pub identity: IdentityProvider,
    /// Absent in the state of labs made before the key existed: those used files.
    #[serde(default)]
    pub control_plane: ControlPlane,
    pub underlay_mtu: u32,
    #[serde(with = "duration_secs")]
    pub psk_rotation: Duration,
    #[serde(default = "default_key_rotation", with = "duration_secs")]
    pub key_rotation: Duration,
    pub nodes: Vec<NodeSpec>,
    pub pods: Vec<PodSpec>,
    /// Absent in the state of labs made before Services existed.
    #[serde(default)]
    pub services: Vec<ServiceSpec>,
    /// The lab's trust domains federate (`federation: true`). Absent in the state of labs made
    /// before the key: no.
    #[serde(default)]
    pub federation: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSpec {
    pub name: String,
    /// Small integer: pod CIDR 198.19.<id>.0/24, underlay 198.18.0.<id> (IPv6-only:
    /// `fd00:198:19:<id>::/64` and `fd00:198:18::<id>`).
    pub id: u8,
    pub netns: String,
    pub underlay_ip: IpAddr,
    /// `fd00:198:18::<id>` on a dual-stack underlay, beside `underlay_ip` (IPv4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub underlay_ipv6: Option<Ipv6Addr>,
    /// The first pod CIDR: IPv4, or IPv6 in an IPv6-only lab.
    pub pod_cidr: String,
    /// IPv6 pod CIDR `fd00:198:19:<id>::/64` when the lab is dual-stack.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_cidr_v6: Option<String>,
    /// Interface of the node on the underlay (inside the node netns).
    pub underlay_if: String,
    /// The node's port on the underlay bridge (inside the underlay netns).
    pub bridge_port: String,
    /// WireGuard interface name; unique per lab and node because `wg` finds the userspace
    /// device by `/var/run/wireguard/<name>.sock`, a host-wide path.
    pub wg_interface: String,
    /// Set when this node's SVIDs come from another trust domain than the lab's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_domain: Option<String>,
    /// Set when this node's WireGuard backend is not the lab's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<BackendChoice>,
    /// This node's agent's `map_max_entries`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub map_max_entries: BTreeMap<String, u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodSpec {
    pub name: String,
    pub namespace: String,
    pub node: String,
    pub netns: String,
    /// The first address: IPv4, or IPv6 in an IPv6-only lab.
    pub ip: IpAddr,
    /// `fd00:198:19:<node id>::<host>` (the IPv4 address's last octet, read as hex digits) when
    /// the lab is dual-stack.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<Ipv6Addr>,
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
    /// Host side of the pod's veth, inside the node netns.
    pub host_veth: String,
    pub serve: Vec<ServeSpec>,
}

impl PodSpec {
    pub fn qualified_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Its addresses: the first, then IPv6 when dual-stack.
    pub fn addrs(&self) -> impl Iterator<Item = IpAddr> {
        std::iter::once(self.ip).chain(self.ipv6.map(IpAddr::V6))
    }

    /// Its addresses as text: the first, then IPv6 when dual-stack.
    pub fn ips(&self) -> Vec<String> {
        self.addrs().map(|a| a.to_string()).collect()
    }

    /// Its IPv4 address, if it has one.
    pub fn ipv4(&self) -> Option<Ipv4Addr> {
        match self.ip {
            IpAddr::V4(a) => Some(a),
            IpAddr::V6(_) => None,
        }
    }

    /// Its IPv6 address, if it has one (dual-stack or IPv6-only).
    pub fn ipv6_addr(&self) -> Option<Ipv6Addr> {
        match self.ip {
            IpAddr::V6(a) => Some(a),
            IpAddr::V4(_) => self.ipv6,
        }
    }
}

impl NodeSpec {
    /// Its pod CIDRs: the first, then IPv6 when dual-stack.
    pub fn pod_cidrs(&self) -> Vec<String> {
        std::iter::once(self.pod_cidr.clone())
            .chain(self.pod_cidr_v6.clone())
            .collect()
    }

    /// Its underlay addresses: the first, then a dual-stack underlay's IPv6 one.
    pub fn underlay_ips(&self) -> Vec<IpAddr> {
        std::iter::once(self.underlay_ip)
            .chain(self.underlay_ipv6.map(IpAddr::V6))
            .collect()
    }
}

/// The brief's default: node static keys rotate daily.
fn default_key_rotation() -> Duration {
    Duration::from_secs(24 * 3600)
}

mod duration_secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_secs(u64::deserialize(d)?))
    }
}

pub const DEFAULT_LAB_NAME: &str = "veil";
pub const DEFAULT_TRUST_DOMAIN: &str = "lab.veil";
pub const DEFAULT_SVID_TTL: Duration = Duration::from_secs(3600);
pub const DEFAULT_UNDERLAY_MTU: u32 = 1500;
/// ClusterIPs come from here (the brief's service CIDR; the lab's kube-apiserver uses it too).
pub const SERVICE_CIDR: (Ipv4Addr, u8) = (Ipv4Addr::new(198, 18, 16, 0), 20);
/// IPv6 ClusterIPs: a unique-local /108 beside the lab's underlay (`fd00:198:18::/64`) and pod
/// (`fd00:198:19::/48`) prefixes; /108 is the largest IPv6 service CIDR kube-apiserver takes.
pub const SERVICE_CIDR_V6: (Ipv6Addr, u8) =
    (Ipv6Addr::new(0xfd00, 0x198, 0x16, 0, 0, 0, 0, 0), 108);
/// First ClusterIP the lab hands out on its own (.1 is the `kubernetes` Service's).
const FIRST_SERVICE_HOST: u32 = 10;
/// Kubernetes' default ClientIP affinity timeout.
const DEFAULT_AFFINITY_TIMEOUT: Duration = Duration::from_secs(3 * 3600);
/// The gateway address every pod routes through: the host side of each pod veth answers for it.
pub const POD_GATEWAY_HOST: u8 = 1;
/// First host number handed to pods in a node's /24.
const FIRST_POD_HOST: u8 = 10;
const MAX_NODES: usize = 250;
/// IPv6's minimum link MTU: an interface with less has no IPv6.
const IPV6_MIN_MTU: u32 = 1280;
const MAX_PODS_PER_NODE: usize = 240;
/// Interface names are at most 15 bytes (IFNAMSIZ - 1).
const IFNAMSIZ_MAX: usize = 15;

/// A number written with its decimal digits read as hex, so an IPv6 address reads like its
/// IPv4 sibling (10 is `::10`).
fn decimal_digits(n: u8) -> u16 {
    u16::from_str_radix(&n.to_string(), 16).expect("decimal digits are hex")
}

/// `fd00:198:19:<node>::<host>` with both numbers written as their decimal digits (198.19.1.10
/// is fd00:198:19:1::10), so a pod's two addresses read alike.
fn v6_in_node(node: u8, host: u8) -> Ipv6Addr {
    Ipv6Addr::new(
        0xfd00,
        0x198,
        0x19,
        decimal_digits(node),
        0,
        0,
        0,
        decimal_digits(host),
    )
}

/// A node's underlay address: `198.18.0.<id>`, or `fd00:198:18::<id>` in an IPv6-only lab.
fn underlay_address(family: IpFamily, id: u8) -> IpAddr {
    if family.v6_underlay() {
        underlay_v6_address(id).into()
    } else {
        Ipv4Addr::new(198, 18, 0, id).into()
    }
}

/// A node's IPv6 underlay address, `fd00:198:18::<id>` (its only one in an IPv6-only lab, its
/// second on a dual-stack underlay).
fn underlay_v6_address(id: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x198, 0x18, 0, 0, 0, 0, decimal_digits(id))
}

/// Whether the nodes get a second, IPv6, underlay address: `underlay_family` as asked, checked
/// against the pods' families. An IPv4 or IPv6 lab's underlay is of its own family (an IPv6
/// underlay under IPv4 pods, or the reverse, is not built); a dual-stack lab's is IPv4 or dual.
fn resolve_dual_underlay(asked: Option<IpFamily>, pods: IpFamily) -> Result<bool, Error> {
    let own = if pods.v6_underlay() {
        IpFamily::Ipv6
    } else {
        IpFamily::Ipv4
    };
    match asked {
        None => Ok(false),
        Some(f) if f == own => Ok(false),
        Some(IpFamily::Dual) if pods == IpFamily::Dual => Ok(true),
        Some(f) => Err(invalid(
            "underlay_family",
            format!(
                "{f} is not built under {pods} pods: the underlay is {own}{}",
                if pods == IpFamily::Dual {
                    " or dual"
                } else {
                    " (a dual underlay needs ip_family dual)"
                }
            ),
        )),
    }
}

/// The prefix length of the underlay's subnet: a /24 or a /64.
pub fn underlay_prefix_len(addr: IpAddr) -> u8 {
    if addr.is_ipv4() {
        24
    } else {
        64
    }
}

/// Checks a lab name: 1–8 characters of `a-z0-9-`, not starting or ending with `-`.
pub fn validate_lab_name(name: &str) -> Result<(), Error> {
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if name.is_empty()
        || name.len() > 8
        || !ok_chars
        || name.starts_with('-')
        || name.ends_with('-')
    {
        return Err(invalid(
            "--name",
            format!(
                "bad lab name {name:?}: use 1-8 characters of a-z, 0-9 and '-' (not at either end)"
            ),
        ));
    }
    Ok(())
}

/// A Kubernetes-style DNS label: 1–63 of `a-z0-9-`, alphanumeric at both ends.
fn check_dns_label(path: &str, value: &str) -> Result<(), Error> {
    let ok = !value.is_empty()
        && value.len() <= 63
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !value.starts_with('-')
        && !value.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            path,
            format!("{value:?} is not a DNS label (1-63 of a-z, 0-9, '-')"),
        ))
    }
}

/// Label keys and values as Kubernetes accepts them (optional DNS prefix, 63-byte name).
fn check_label(path: &str, key: &str, value: &str) -> Result<(), Error> {
    let name_ok = |s: &str| {
        s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            && s.bytes().next().is_none_or(|b| b.is_ascii_alphanumeric())
            && s.bytes().last().is_none_or(|b| b.is_ascii_alphanumeric())
    };
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if name.is_empty() || !name_ok(name) || prefix.is_some_and(|p| p.is_empty() || p.len() > 253) {
        return Err(invalid(format!("{path}.{key}"), "bad label key"));
    }
    if !name_ok(value) {
        return Err(invalid(
            format!("{path}.{key}"),
            format!("bad label value {value:?}"),
        ));
    }
    Ok(())
}

fn check_trust_domain(path: &str, td: &str) -> Result<(), Error> {
    let ok = !td.is_empty()
        && td.len() <= 255
        && td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            path,
            format!(
                "{td:?} is not a SPIFFE trust domain (lowercase letters, digits, '-', '.', '_')"
            ),
        ))
    }
}

/// Parses a lab file (YAML). Unknown keys and type errors name the field path.
pub fn parse_lab_file(text: &str) -> Result<LabFile, Error> {
    let de = serde_yaml::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." {
            "(top level)".to_string()
        } else {
            path
        };
        Error::Parse {
            path,
            message: e.into_inner().to_string(),
        }
    })
}

/// The default topology: node-a and node-b; frontend and intruder on node-a, backend on node-b.
pub fn default_file() -> LabFile {
    let pod = |name: &str, node: &str, serve: Vec<ServeSpec>| PodFile {
        name: name.to_string(),
        namespace: "shop".to_string(),
        node: node.to_string(),
        labels: BTreeMap::from([("app".to_string(), name.to_string())]),
        service_account: None,
        serve,
    };
    LabFile {
        nodes: Some(vec![
            NodeFile {
                name: "node-a".into(),
                trust_domain: None,
                backend: None,
                map_max_entries: BTreeMap::new(),
            },
            NodeFile {
                name: "node-b".into(),
                trust_domain: None,
                backend: None,
                map_max_entries: BTreeMap::new(),
            },
        ]),
        pods: Some(vec![
            pod("frontend", "node-a", vec![]),
            pod(
                "backend",
                "node-b",
                vec![
                    ServeSpec {
                        port: 8080,
                        kind: ServeKind::Http,
                    },
                    ServeSpec {
                        port: 9000,
                        kind: ServeKind::Echo,
                    },
                ],
            ),
            pod("intruder", "node-a", vec![]),
        ]),
        services: Some(vec![ServiceFile {
            name: "backend".into(),
            namespace: "shop".into(),
            selector: BTreeMap::from([("app".to_string(), "backend".to_string())]),
            ports: vec![ServicePortFile {
                name: "http".into(),
                port: 80,
                target_port: Some(8080),
                protocol: None,
            }],
            cluster_ip: None,
            ip_family_policy: None,
            session_affinity: None,
            session_affinity_timeout: None,
        }]),
        ..LabFile::default()
    }
}

/// The lab's state keeps durations in whole seconds (and SPIRE takes whole seconds): a
/// fraction would hold only until the next command read the state back. Found by the `lab_file`
/// fuzz target (`svid_ttl: 10500ms` read back as 10 s).
fn check_whole_seconds(field: &str, d: Duration) -> Result<(), Error> {
    if d.subsec_nanos() != 0 {
        return Err(invalid(
            field,
            format!(
                "{} is not a whole number of seconds",
                humantime::format_duration(d)
            ),
        ));
    }
    Ok(())
}

/// Validates a lab file and allocates names and addresses. Pure: touches nothing.
pub fn resolve(name: &str, file: LabFile, overrides: &Overrides) -> Result<LabSpec, Error> {
    validate_lab_name(name)?;
    let defaults = default_file();
    let trust_domain = file
        .trust_domain
        .unwrap_or_else(|| DEFAULT_TRUST_DOMAIN.to_string());
    check_trust_domain("trust_domain", &trust_domain)?;
    let svid_ttl = overrides
        .svid_ttl
        .or(file.svid_ttl.map(|d| d.0))
        .unwrap_or(DEFAULT_SVID_TTL);
    if svid_ttl < Duration::from_secs(10) || svid_ttl > Duration::from_secs(30 * 24 * 3600) {
        return Err(invalid("svid_ttl", "must be between 10s and 30 days"));
    }
    check_whole_seconds("svid_ttl", svid_ttl)?;
    let underlay_mtu = file.underlay_mtu.unwrap_or(DEFAULT_UNDERLAY_MTU);
    let psk_rotation = file
        .psk_rotation
        .map(|d| d.0)
        .unwrap_or(Duration::from_secs(600));
    if psk_rotation < Duration::from_secs(5) {
        return Err(invalid("psk_rotation", "must be at least 5s"));
    }
    check_whole_seconds("psk_rotation", psk_rotation)?;
    let key_rotation = file
        .key_rotation
        .map(|d| d.0)
        .unwrap_or_else(default_key_rotation);
    if key_rotation < Duration::from_secs(5) {
        return Err(invalid("key_rotation", "must be at least 5s"));
    }
    check_whole_seconds("key_rotation", key_rotation)?;
    if !(1280..=9000).contains(&underlay_mtu) {
        return Err(invalid(
            "underlay_mtu",
            format!("{underlay_mtu} is outside 1280..=9000"),
        ));
    }
    // Dual stack unless asked otherwise, where the pods' MTU can carry IPv6 (1280 at least);
    // a smaller underlay leaves the default lab IPv4-only and refuses an explicit dual or ipv6.
    let asked = overrides.ip_family.or(file.ip_family);
    let pod_mtu = underlay_mtu - veil_transport::overhead(asked.is_some_and(IpFamily::v6_underlay));
    let ip_family = match asked {
        Some(f) if f.has_v6() && pod_mtu < IPV6_MIN_MTU => {
            return Err(invalid(
                "ip_family",
                format!(
                    "{f} needs a pod MTU of at least {IPV6_MIN_MTU} (IPv6's minimum); \
                     underlay_mtu {underlay_mtu} leaves the pods {pod_mtu}"
                ),
            ))
        }
        Some(f) => f,
        None if pod_mtu >= IPV6_MIN_MTU => IpFamily::Dual,
        None => IpFamily::Ipv4,
    };
    let dual_underlay = resolve_dual_underlay(
        overrides.underlay_family.or(file.underlay_family),
        ip_family,
    )?;
    let nodes_file = file.nodes.or(defaults.nodes).unwrap_or_default();
    let default_pods = file.pods.is_none();
    let pods_file = match file.pods {
        Some(p) => p,
        // Default pods only make sense on the default nodes.
        None if nodes_file
            .iter()
            .map(|n| n.name.as_str())
            .eq(["node-a", "node-b"]) =>
        {
            defaults.pods.unwrap_or_default()
        }
        None => Vec::new(),
    };
    if nodes_file.is_empty() {
        return Err(invalid("nodes", "a lab needs at least one node"));
    }
    if nodes_file.len() > MAX_NODES {
        return Err(invalid("nodes", format!("at most {MAX_NODES} nodes")));
    }

    let mut netns_names = BTreeSet::new();
    let underlay_netns = underlay_netns(name);
    netns_names.insert(underlay_netns.clone());

    let mut nodes = Vec::with_capacity(nodes_file.len());
    for (i, n) in nodes_file.iter().enumerate() {
        let path = format!("nodes[{i}].name");
        check_dns_label(&path, &n.name)?;
        if nodes.iter().any(|x: &NodeSpec| x.name == n.name) {
            return Err(invalid(path, format!("duplicate node {:?}", n.name)));
        }
        let id = u8::try_from(i + 1).map_err(|_| invalid("nodes", "too many nodes"))?;
        let netns = format!("{name}-{}", n.name);
        if !netns_names.insert(netns.clone()) {
            return Err(invalid(
                path,
                format!("netns name {netns:?} collides with another"),
            ));
        }
        let wg_interface = format!("{name}-wg{id}");
        debug_assert!(wg_interface.len() <= IFNAMSIZ_MAX);
        if let Some(td) = &n.trust_domain {
            check_trust_domain(&format!("nodes[{i}].trust_domain"), td)?;
        }
        crate::config::check_map_max_entries(&n.map_max_entries)
            .map_err(|m| invalid(format!("nodes[{i}].map_max_entries"), m))?;
        nodes.push(NodeSpec {
            name: n.name.clone(),
            id,
            netns,
            underlay_ip: underlay_address(ip_family, id),
            underlay_ipv6: dual_underlay.then(|| underlay_v6_address(id)),
            pod_cidr: if ip_family.has_v4() {
                format!("198.19.{id}.0/24")
            } else {
                format!("{}/64", v6_in_node(id, 0))
            },
            pod_cidr_v6: (ip_family == IpFamily::Dual).then(|| format!("{}/64", v6_in_node(id, 0))),
            underlay_if: "ul0".to_string(),
            bridge_port: format!("n{id}"),
            wg_interface,
            trust_domain: n.trust_domain.clone().filter(|td| *td != trust_domain),
            backend: n.backend,
            map_max_entries: n.map_max_entries.clone(),
        });
    }

    let mut pods: Vec<PodSpec> = Vec::with_capacity(pods_file.len());
    let mut per_node: BTreeMap<String, u8> = BTreeMap::new();
    for (i, p) in pods_file.into_iter().enumerate() {
        let at = |f: &str| format!("pods[{i}].{f}");
        check_dns_label(&at("name"), &p.name)?;
        check_dns_label(&at("namespace"), &p.namespace)?;
        let Some(node) = nodes.iter().find(|n| n.name == p.node) else {
            return Err(invalid(at("node"), format!("unknown node {:?}", p.node)));
        };
        if pods
            .iter()
            .any(|x| x.name == p.name && x.namespace == p.namespace)
        {
            return Err(invalid(
                at("name"),
                format!("duplicate pod {}/{}", p.namespace, p.name),
            ));
        }
        for (k, v) in &p.labels {
            check_label(&at("labels"), k, v)?;
        }
        let service_account = p.service_account.unwrap_or_else(|| p.name.clone());
        check_dns_label(&at("service_account"), &service_account)?;
        for (j, s) in p.serve.iter().enumerate() {
            if s.port == 0 {
                return Err(invalid(
                    format!("pods[{i}].serve[{j}].port"),
                    "port 0 is not a port",
                ));
            }
            if p.serve[..j].iter().any(|o| o.port == s.port) {
                return Err(invalid(
                    format!("pods[{i}].serve[{j}].port"),
                    "duplicate port",
                ));
            }
        }
        let slot = per_node.entry(node.name.clone()).or_insert(0);
        if usize::from(*slot) >= MAX_PODS_PER_NODE {
            return Err(invalid(
                at("node"),
                format!("node {:?} is full ({MAX_PODS_PER_NODE} pods)", node.name),
            ));
        }
        let host = FIRST_POD_HOST + *slot;
        let ip: IpAddr = if ip_family.has_v4() {
            Ipv4Addr::new(198, 19, node.id, host).into()
        } else {
            v6_in_node(node.id, host).into()
        };
        let ipv6 = (ip_family == IpFamily::Dual).then(|| v6_in_node(node.id, host));
        *slot += 1;
        let netns = format!("{name}-{}-{}", p.namespace, p.name);
        if !netns_names.insert(netns.clone()) {
            return Err(invalid(
                at("name"),
                format!("netns name {netns:?} collides with another"),
            ));
        }
        let host_veth = host_veth_name(&p.namespace, &p.name);
        if pods
            .iter()
            .any(|x| x.node == node.name && x.host_veth == host_veth)
        {
            return Err(invalid(
                at("name"),
                "host veth name collides with another pod's; rename the pod",
            ));
        }
        pods.push(PodSpec {
            name: p.name,
            namespace: p.namespace,
            node: node.name.clone(),
            netns,
            ip,
            ipv6,
            labels: p.labels,
            service_account,
            host_veth,
            serve: p.serve,
        });
    }

    // The default Service comes with the default pods it selects.
    let services_file = match file.services {
        Some(s) => s,
        None if default_pods && !pods.is_empty() => defaults.services.unwrap_or_default(),
        None => Vec::new(),
    };
    let services = resolve_services(services_file, ip_family)?;

    let identity = overrides.identity.or(file.identity).unwrap_or_default();
    if identity == IdentityProvider::Spire {
        // One spire-server serves one trust domain; a node of another trust domain would need
        // a second server (and federation), which the lab does not build.
        if let Some((i, n)) = nodes
            .iter()
            .enumerate()
            .find(|(_, n)| n.trust_domain.is_some())
        {
            return Err(invalid(
                format!("nodes[{i}].trust_domain"),
                format!(
                    "node {:?} has its own trust domain; with `identity: spire` the lab runs one \
                     spire-server for one trust domain (use `identity: dev` for this topology)",
                    n.name
                ),
            ));
        }
    }
    let federation = file.federation.unwrap_or(false);
    if federation {
        if identity == IdentityProvider::Spire {
            return Err(invalid(
                "federation",
                "federation needs `identity: dev`: with `identity: spire` the lab runs one \
                 spire-server for one trust domain",
            ));
        }
        if nodes.iter().all(|n| n.trust_domain.is_none()) {
            return Err(invalid(
                "federation",
                "federation needs a second trust domain: give a node its own `trust_domain`",
            ));
        }
    }

    let encryption = overrides
        .encryption
        .or(file.encryption.map(|e| e.0))
        .unwrap_or(true);
    let node_encryption = overrides
        .node_encryption
        .or(file.node_encryption.map(|e| e.0))
        .unwrap_or(false);
    if node_encryption && !encryption {
        return Err(invalid(
            "node_encryption",
            "on needs `encryption: on`: node traffic is encrypted in the pod traffic's tunnel",
        ));
    }

    // Kubernetes unless asked otherwise (`ControlPlane::default()`, Files, is only what a stored
    // state without the key means).
    let control_plane = overrides
        .control_plane
        .or(file.control_plane)
        .unwrap_or(ControlPlane::Kubernetes);

    Ok(LabSpec {
        name: name.to_string(),
        trust_domain,
        encryption,
        node_encryption,
        ip_family,
        dual_underlay,
        svid_ttl,
        backend: overrides.backend.or(file.backend).unwrap_or_default(),
        identity,
        control_plane,
        underlay_mtu,
        psk_rotation,
        key_rotation,
        nodes,
        pods,
        services,
        federation,
    })
}

/// ClusterIPs of one family: the service CIDR's host addresses, the ones given in the lab
/// file, and the next free one to allocate. Addresses are numbers (IPv4 as its u32).
struct ClusterIpPool {
    /// The service CIDR's network and broadcast (last) addresses.
    net: u128,
    last: u128,
    cidr: String,
    taken: BTreeSet<u128>,
    used: BTreeSet<u128>,
    next: u128,
}

impl ClusterIpPool {
    fn new(v6: bool, files: &[ServiceFile]) -> Self {
        let (net, bits, cidr) = if v6 {
            let (n, len) = SERVICE_CIDR_V6;
            (u128::from(n), 128 - u32::from(len), format!("{n}/{len}"))
        } else {
            let (n, len) = SERVICE_CIDR;
            (
                u128::from(u32::from(n)),
                32 - u32::from(len),
                format!("{n}/{len}"),
            )
        };
        Self {
            net,
            last: net | ((1u128 << bits) - 1),
            cidr,
            taken: files
                .iter()
                .filter_map(|f| f.cluster_ip)
                .filter(|ip| ip.is_ipv6() == v6)
                .map(number)
                .collect(),
            used: BTreeSet::new(),
            next: net + u128::from(FIRST_SERVICE_HOST),
        }
    }

    /// Takes `ip` (given in the lab file) or the lowest free address.
    fn take(&mut self, given: Option<IpAddr>) -> Result<u128, String> {
        match given {
            Some(ip) => {
                let n = number(ip);
                if n <= self.net || n >= self.last {
                    return Err(format!(
                        "{ip} is not a host address of the service CIDR {}",
                        self.cidr
                    ));
                }
                if !self.used.insert(n) {
                    return Err(format!("{ip} is taken by another service"));
                }
                Ok(n)
            }
            None => {
                while self.next < self.last
                    && (self.taken.contains(&self.next) || self.used.contains(&self.next))
                {
                    self.next += 1;
                }
                if self.next >= self.last {
                    return Err(format!("the service CIDR {} is full", self.cidr));
                }
                let n = self.next;
                self.used.insert(n);
                self.next += 1;
                Ok(n)
            }
        }
    }
}

/// An address as a number in its family's space (an IPv4 address as its u32).
fn number(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

/// Validates Services, decides each one's families and allocates the ClusterIPs not given,
/// lowest free first.
fn resolve_services(files: Vec<ServiceFile>, family: IpFamily) -> Result<Vec<ServiceSpec>, Error> {
    let mut pool4 = ClusterIpPool::new(false, &files);
    let mut pool6 = ClusterIpPool::new(true, &files);
    let mut out: Vec<ServiceSpec> = Vec::with_capacity(files.len());
    for (i, f) in files.into_iter().enumerate() {
        let at = |field: &str| format!("services[{i}].{field}");
        check_dns_label(&at("name"), &f.name)?;
        check_dns_label(&at("namespace"), &f.namespace)?;
        if out
            .iter()
            .any(|s| s.name == f.name && s.namespace == f.namespace)
        {
            return Err(invalid(
                at("name"),
                format!("duplicate service {}/{}", f.namespace, f.name),
            ));
        }
        for (k, v) in &f.selector {
            check_label(&at("selector"), k, v)?;
        }
        if f.ports.is_empty() {
            return Err(invalid(at("ports"), "a service needs at least one port"));
        }
        let mut ports: Vec<crate::cluster::ServicePort> = Vec::with_capacity(f.ports.len());
        for (j, p) in f.ports.iter().enumerate() {
            let pat = |field: &str| format!("services[{i}].ports[{j}].{field}");
            let target_port = p.target_port.unwrap_or(p.port);
            if p.port == 0 {
                return Err(invalid(pat("port"), "port 0 is not a port"));
            }
            if target_port == 0 {
                return Err(invalid(pat("target_port"), "port 0 is not a port"));
            }
            if !p.name.is_empty() {
                check_dns_label(&pat("name"), &p.name)?;
            }
            if f.ports.len() > 1 && p.name.is_empty() {
                return Err(invalid(
                    pat("name"),
                    "a service with several ports must name each (as Kubernetes requires)",
                ));
            }
            use crate::policy::parse::Protocol;
            let protocol = match p.protocol.unwrap_or(Protocol::Tcp) {
                Protocol::Tcp => "TCP",
                Protocol::Udp => "UDP",
                Protocol::Sctp => "SCTP",
                other => {
                    return Err(invalid(
                        pat("protocol"),
                        format!("{other:?} is not a Service protocol (TCP, UDP or SCTP)"),
                    ))
                }
            }
            .to_string();
            if ports
                .iter()
                .any(|o| o.port == p.port && o.protocol == protocol)
            {
                return Err(invalid(
                    pat("port"),
                    format!("duplicate {protocol} port {}", p.port),
                ));
            }
            if !p.name.is_empty() && ports.iter().any(|o| o.name == p.name) {
                return Err(invalid(
                    pat("name"),
                    format!("duplicate port name {:?}", p.name),
                ));
            }
            ports.push(crate::cluster::ServicePort {
                name: p.name.clone(),
                port: p.port,
                target_port,
                protocol,
            });
        }
        let policy = f.ip_family_policy.unwrap_or_default();
        if let Some(ip) = f.cluster_ip {
            if (ip.is_ipv4() && !family.has_v4()) || (ip.is_ipv6() && !family.has_v6()) {
                return Err(invalid(
                    at("cluster_ip"),
                    format!("{ip} is not of the lab's IP family {family}"),
                ));
            }
        }
        if policy == IpFamilyPolicy::RequireDualStack && family != IpFamily::Dual {
            return Err(invalid(
                at("ip_family_policy"),
                format!("RequireDualStack needs a dual-stack lab (ip_family dual), not {family}"),
            ));
        }
        // The first family: the given address's, else the lab's first (IPv4 unless IPv6-only).
        let first_v6 = f.cluster_ip.map_or(!family.has_v4(), |ip| ip.is_ipv6());
        let dual = family == IpFamily::Dual && policy != IpFamilyPolicy::SingleStack;
        let (given4, given6) = match f.cluster_ip {
            Some(ip @ IpAddr::V4(_)) => (Some(ip), None),
            Some(ip @ IpAddr::V6(_)) => (None, Some(ip)),
            None => (None, None),
        };
        let mut take6 = || {
            pool6
                .take(given6)
                .map(Ipv6Addr::from)
                .map_err(|e| invalid(at("cluster_ip"), e))
        };
        let cluster_ip = if dual || !first_v6 {
            let n = pool4
                .take(given4)
                .map_err(|e| invalid(at("cluster_ip"), e))?;
            IpAddr::V4(Ipv4Addr::from(n as u32))
        } else {
            IpAddr::V6(take6()?)
        };
        let cluster_ipv6 = if dual { Some(take6()?) } else { None };
        let affinity_timeout_s = match f.session_affinity.unwrap_or_default() {
            SessionAffinity::None => {
                if f.session_affinity_timeout.is_some() {
                    return Err(invalid(
                        at("session_affinity_timeout"),
                        "only with session_affinity: ClientIP",
                    ));
                }
                None
            }
            SessionAffinity::ClientIp => {
                let t = f
                    .session_affinity_timeout
                    .map(|d| d.0)
                    .unwrap_or(DEFAULT_AFFINITY_TIMEOUT);
                check_whole_seconds(&at("session_affinity_timeout"), t)?;
                // Kubernetes' bounds: 1 s to 1 day.
                if t < Duration::from_secs(1) || t > Duration::from_secs(86_400) {
                    return Err(invalid(
                        at("session_affinity_timeout"),
                        "must be between 1s and 1 day",
                    ));
                }
                Some(t.as_secs() as u32)
            }
        };
        out.push(ServiceSpec {
            name: f.name,
            namespace: f.namespace,
            selector: f.selector,
            cluster_ip,
            cluster_ipv6,
            ports,
            affinity_timeout_s,
        });
    }
    Ok(out)
}

pub fn underlay_netns(lab: &str) -> String {
    format!("{lab}-underlay")
}

pub fn bridge_name(lab: &str) -> String {
    format!("{lab}-br0")
}

/// `lxc` + 8 hex digits of a stable hash of `namespace/name`, the way Cilium names host veths.
pub fn host_veth_name(namespace: &str, name: &str) -> String {
    // FNV-1a: stable across builds and platforms, unlike std's hasher.
    let mut h: u32 = 0x811c_9dc5;
    for b in namespace.bytes().chain([b'/']).chain(name.bytes()) {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("lxc{h:08x}")
}

impl LabSpec {
    pub fn node(&self, name: &str) -> Option<&NodeSpec> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The WireGuard backend `node`'s agent runs: its own choice, else the lab's.
    pub fn node_backend(&self, node: &NodeSpec) -> BackendChoice {
        node.backend.unwrap_or(self.backend)
    }

    /// Finds a pod by `name` or `namespace/name`; a bare name must be unambiguous.
    pub fn find_pod(&self, query: &str) -> Result<&PodSpec, String> {
        if let Some((ns, name)) = query.split_once('/') {
            return self
                .pods
                .iter()
                .find(|p| p.namespace == ns && p.name == name)
                .ok_or_else(|| format!("no pod {query:?} in lab {:?}", self.name));
        }
        let matches: Vec<_> = self.pods.iter().filter(|p| p.name == query).collect();
        match matches.as_slice() {
            [one] => Ok(one),
            [] => Err(format!("no pod {query:?} in lab {:?}", self.name)),
            many => Err(format!(
                "pod name {query:?} is ambiguous: {}; use namespace/name",
                many.iter()
                    .map(|p| p.qualified_name())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }

    /// The underlay's subnet: `198.18.0.0/24`, or `fd00:198:18::/64` in an IPv6-only lab.
    pub fn underlay_cidr(&self) -> &'static str {
        if self.ip_family.v6_underlay() {
            "fd00:198:18::/64"
        } else {
            "198.18.0.0/24"
        }
    }

    /// The IPv4 gateway of a node's pods, `198.19.<id>.1`; none in an IPv6-only lab.
    pub fn pod_gateway(&self, node: &NodeSpec) -> Option<Ipv4Addr> {
        self.ip_family
            .has_v4()
            .then(|| Ipv4Addr::new(198, 19, node.id, POD_GATEWAY_HOST))
    }

    /// The IPv6 gateway of a node's pods, `fd00:198:19:<id>::1`, in a dual-stack or IPv6-only
    /// lab.
    pub fn pod_gateway_v6(&self, node: &NodeSpec) -> Option<Ipv6Addr> {
        self.ip_family
            .has_v6()
            .then(|| v6_in_node(node.id, POD_GATEWAY_HOST))
    }

    /// MTU of pod interfaces: the underlay MTU minus WireGuard's overhead on the underlay's
    /// family (IPv4: 20 IP + 8 UDP + 32 WireGuard; IPv6: 40 IP), so an encrypted packet never
    /// needs fragmenting on the underlay.
    pub fn pod_mtu(&self) -> u32 {
        self.underlay_mtu - veil_transport::overhead(self.ip_family.v6_underlay())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve_text(text: &str) -> Result<LabSpec, Error> {
        resolve("t1", parse_lab_file(text)?, &Overrides::default())
    }

    fn err_text(text: &str) -> String {
        resolve_text(text).unwrap_err().to_string()
    }

    #[test]
    fn dual_stack_by_default_where_the_pod_mtu_carries_ipv6() {
        let lab = resolve_text("").unwrap();
        assert_eq!(lab.ip_family, IpFamily::Dual);
        assert_eq!(
            lab.nodes[1].pod_cidr_v6.as_deref(),
            Some("fd00:198:19:2::/64")
        );
        let be = lab.find_pod("backend").unwrap();
        assert_eq!(be.ipv6, Some("fd00:198:19:2::10".parse().unwrap()));
        assert_eq!(
            lab.pod_gateway_v6(&lab.nodes[0]),
            Some("fd00:198:19:1::1".parse().unwrap())
        );
        // Node 250 and host 249 still read as their decimal digits.
        let many: String = (0..250).map(|i| format!("- {{name: n{i}}}\n")).collect();
        let lab = resolve_text(&format!("nodes:\n{many}")).unwrap();
        assert_eq!(
            lab.nodes[249].pod_cidr_v6.as_deref(),
            Some("fd00:198:19:250::/64")
        );
        // IPv4 only when asked, or by default where the pods' MTU is under IPv6's 1280.
        for text in ["ip_family: ipv4", "underlay_mtu: 1300"] {
            let lab = resolve_text(text).unwrap();
            assert_eq!(lab.ip_family, IpFamily::Ipv4, "{text}");
            assert!(lab.nodes.iter().all(|n| n.pod_cidr_v6.is_none()), "{text}");
            assert!(lab.pods.iter().all(|p| p.ipv6.is_none()), "{text}");
        }
        assert_eq!(
            resolve_text("underlay_mtu: 1340").unwrap().ip_family,
            IpFamily::Dual
        );
    }

    #[test]
    fn ipv6_only_labs_have_an_ipv6_underlay_and_no_ipv4() {
        // Kubernetes (the default control plane) too: the lab's apiserver listens on the
        // IPv6 underlay.
        let kube = resolve_text("ip_family: ipv6").unwrap();
        assert_eq!(kube.control_plane, ControlPlane::Kubernetes);
        let lab = resolve_text("ip_family: ipv6\nidentity: dev\ncontrol_plane: files").unwrap();
        assert_eq!(lab.ip_family, IpFamily::Ipv6);
        let b = &lab.nodes[1];
        assert_eq!(b.underlay_ip, "fd00:198:18::2".parse::<IpAddr>().unwrap());
        assert_eq!(b.pod_cidr, "fd00:198:19:2::/64");
        assert_eq!(b.pod_cidr_v6, None);
        assert_eq!(lab.underlay_cidr(), "fd00:198:18::/64");
        let be = lab.find_pod("backend").unwrap();
        assert_eq!(be.ip, "fd00:198:19:2::10".parse::<IpAddr>().unwrap());
        assert_eq!((be.ipv4(), be.ipv6), (None, None));
        assert_eq!(be.ips(), ["fd00:198:19:2::10"]);
        assert_eq!(lab.pod_gateway(b), None);
        assert_eq!(
            lab.pod_gateway_v6(b),
            Some("fd00:198:19:2::1".parse().unwrap())
        );
        // WireGuard's overhead over IPv6 is 80 bytes; the default Service has an IPv6
        // ClusterIP.
        assert_eq!(lab.pod_mtu(), 1420);
        assert_eq!(lab.services.len(), 1);
        assert_eq!(
            lab.services[0].cluster_ips().collect::<Vec<_>>(),
            ["fd00:198:16::a".parse::<IpAddr>().unwrap()]
        );
        // The smallest underlay that still gives the pods IPv6's 1280.
        let lab = resolve_text(
            "ip_family: ipv6\nidentity: dev\ncontrol_plane: files\nunderlay_mtu: 1360",
        )
        .unwrap();
        assert_eq!(lab.pod_mtu(), 1280);
        // Real SPIRE too: its server listens on the IPv6 underlay.
        let lab = resolve_text("ip_family: ipv6\ncontrol_plane: files").unwrap();
        assert_eq!(lab.identity, IdentityProvider::Spire);
        assert_eq!(
            super::super::spire_real::server_ip(&lab),
            "fd00:198:18::254"
        );
    }

    #[test]
    fn default_topology() {
        let lab = resolve("veil", LabFile::default(), &Overrides::default()).unwrap();
        assert_eq!(lab.trust_domain, "lab.veil");
        assert!(lab.encryption);
        assert_eq!(lab.svid_ttl, Duration::from_secs(3600));
        let names: Vec<_> = lab.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["node-a", "node-b"]);
        assert_eq!(lab.nodes[0].underlay_ip, Ipv4Addr::new(198, 18, 0, 1));
        assert_eq!(lab.nodes[1].pod_cidr, "198.19.2.0/24");
        assert_eq!(lab.nodes[1].wg_interface, "veil-wg2");
        let fe = lab.find_pod("frontend").unwrap();
        assert_eq!(
            (fe.node.as_str(), fe.ip),
            ("node-a", Ipv4Addr::new(198, 19, 1, 10).into())
        );
        assert_eq!(fe.labels.get("app").map(String::as_str), Some("frontend"));
        assert_eq!(fe.service_account, "frontend");
        assert_eq!(fe.netns, "veil-shop-frontend");
        let be = lab.find_pod("shop/backend").unwrap();
        assert_eq!(be.ip, Ipv4Addr::new(198, 19, 2, 10));
        assert_eq!(
            be.serve,
            vec![
                ServeSpec {
                    port: 8080,
                    kind: ServeKind::Http
                },
                ServeSpec {
                    port: 9000,
                    kind: ServeKind::Echo
                }
            ]
        );
        assert_eq!(lab.psk_rotation, Duration::from_secs(600));
        assert_eq!(lab.key_rotation, Duration::from_secs(24 * 3600));
        let intruder = lab.find_pod("intruder").unwrap();
        assert_eq!(intruder.ip, Ipv4Addr::new(198, 19, 1, 11));
        assert_eq!(lab.pod_mtu(), 1440);
    }

    #[test]
    fn overrides_win_over_file() {
        let file = parse_lab_file("encryption: off\nsvid_ttl: 2m\nbackend: kernel\n").unwrap();
        let lab = resolve("x", file, &Overrides::default()).unwrap();
        assert!(!lab.encryption);
        assert_eq!(lab.svid_ttl, Duration::from_secs(120));
        assert_eq!(lab.backend, BackendChoice::Kernel);
        let file = parse_lab_file("encryption: off\nsvid_ttl: 2m\n").unwrap();
        let o = Overrides {
            encryption: Some(true),
            svid_ttl: Some(Duration::from_secs(30)),
            backend: Some(BackendChoice::Userspace),
            ..Overrides::default()
        };
        let lab = resolve("x", file, &o).unwrap();
        assert!(lab.encryption);
        assert_eq!(lab.svid_ttl, Duration::from_secs(30));
        assert_eq!(lab.backend, BackendChoice::Userspace);
    }

    #[test]
    fn a_dual_stack_lab_may_have_a_dual_stack_underlay_and_no_other_lab_may() {
        // The default: the underlay of the pods' first family, one address per node.
        let lab = resolve_text("ip_family: dual").unwrap();
        assert!(!lab.dual_underlay);
        assert!(lab.nodes.iter().all(|n| n.underlay_ipv6.is_none()));
        // Dual: an IPv6 address beside the IPv4 one, which stays first (WireGuard's).
        let lab = resolve_text("ip_family: dual\nunderlay_family: dual").unwrap();
        assert!(lab.dual_underlay);
        let b = lab.node("node-b").unwrap();
        assert_eq!(
            b.underlay_ips(),
            [
                "198.18.0.2".parse::<IpAddr>().unwrap(),
                "fd00:198:18::2".parse().unwrap()
            ]
        );
        assert_eq!(lab.pod_mtu(), 1440, "the tunnel stays on IPv4");
        // The flag wins over the file; the underlay of the pods' own family is always fine.
        let o = Overrides {
            underlay_family: Some(IpFamily::Ipv4),
            ..Overrides::default()
        };
        let file = parse_lab_file("ip_family: dual\nunderlay_family: dual").unwrap();
        assert!(!resolve("x", file, &o).unwrap().dual_underlay);
        for ok in [
            "ip_family: ipv4\nunderlay_family: ipv4",
            "ip_family: ipv6\nunderlay_family: ipv6\nidentity: dev",
        ] {
            assert!(!resolve_text(ok).unwrap().dual_underlay, "{ok}");
        }
        // Anything else names the key and what would work.
        for (bad, says) in [
            (
                "ip_family: ipv4\nunderlay_family: dual",
                "needs ip_family dual",
            ),
            ("ip_family: ipv4\nunderlay_family: ipv6", "underlay is ipv4"),
            ("ip_family: ipv6\nunderlay_family: dual", "underlay is ipv6"),
            ("ip_family: dual\nunderlay_family: ipv6", "ipv4 or dual"),
        ] {
            let err = resolve_text(bad).unwrap_err().to_string();
            assert!(
                err.contains("underlay_family") && err.contains(says),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn a_node_backend_wins_over_the_labs() {
        let file = parse_lab_file(
            "backend: userspace\nnodes: [{name: a, backend: kernel}, {name: b}]\npods: []\n",
        )
        .unwrap();
        let o = Overrides {
            backend: Some(BackendChoice::Auto),
            ..Overrides::default()
        };
        let lab = resolve("x", file, &o).unwrap();
        let backends: Vec<_> = lab.nodes.iter().map(|n| lab.node_backend(n)).collect();
        assert_eq!(backends, [BackendChoice::Kernel, BackendChoice::Auto]);
        let err = parse_lab_file("nodes: [{name: a, backend: wg}]\n").unwrap_err();
        assert!(err.to_string().contains("wg"), "{err}");
    }

    #[test]
    fn custom_topology_allocates_addresses_per_node() {
        let lab = resolve_text(
            "trust_domain: example.org\nnodes: [{name: n1}, {name: n2}, {name: n3}]\npods:\n\
             - {name: a, node: n3}\n- {name: b, node: n3, namespace: x}\n- {name: c, node: n1, serve: [{port: 7, kind: echo}]}\n",
        )
        .unwrap();
        assert_eq!(lab.trust_domain, "example.org");
        assert_eq!(lab.pods[0].ip, Ipv4Addr::new(198, 19, 3, 10));
        assert_eq!(lab.pods[1].ip, Ipv4Addr::new(198, 19, 3, 11));
        assert_eq!(lab.pods[2].ip, Ipv4Addr::new(198, 19, 1, 10));
        assert_eq!(lab.pods[0].namespace, "default");
        assert_eq!(lab.pods[1].netns, "t1-x-b");
    }

    #[test]
    fn the_default_service_comes_with_the_default_pods_and_cluster_ips_are_allocated() {
        let lab = resolve("veil", LabFile::default(), &Overrides::default()).unwrap();
        assert_eq!(lab.services.len(), 1);
        let s = &lab.services[0];
        assert_eq!(s.qualified_name(), "shop/backend");
        assert_eq!(s.cluster_ip, Ipv4Addr::new(198, 18, 16, 10));
        assert_eq!((s.ports[0].port, s.ports[0].target_port), (80, 8080));
        assert_eq!(s.ports[0].protocol, "TCP");
        assert!(s.selects("shop", &BTreeMap::from([("app".into(), "backend".into())])));
        assert!(!s.selects("other", &BTreeMap::from([("app".into(), "backend".into())])));
        // Own pods: no default Service; given addresses are skipped when allocating.
        let lab = resolve_text("pods: [{name: p, node: node-a}]").unwrap();
        assert!(lab.services.is_empty());
        let lab = resolve_text(
            "services:\n- {name: a, selector: {x: y}, ports: [{port: 1}]}\n\
             - {name: b, selector: {x: y}, cluster_ip: 198.18.16.10, ports: [{port: 2, protocol: UDP}], \
             session_affinity: ClientIP, session_affinity_timeout: 10m}",
        )
        .unwrap();
        assert_eq!(lab.services[0].cluster_ip, Ipv4Addr::new(198, 18, 16, 11));
        assert_eq!(lab.services[0].ports[0].target_port, 1);
        assert_eq!(lab.services[1].affinity_timeout_s, Some(600));
        assert_eq!(lab.services[1].ports[0].protocol, "UDP");
        let back: LabSpec = serde_json::from_slice(&serde_json::to_vec(&lab).unwrap()).unwrap();
        assert_eq!(back, lab);
    }

    #[test]
    fn services_take_the_families_their_policy_asks_for() {
        let lab = resolve_text(
            "services:\n- {name: one, selector: {x: y}, ports: [{port: 1}]}\n\
             - {name: both, selector: {x: y}, ports: [{port: 1}], ip_family_policy: PreferDualStack}\n\
             - {name: six, selector: {x: y}, ports: [{port: 1}], cluster_ip: 'fd00:198:16::10'}\n\
             - {name: given, selector: {x: y}, ports: [{port: 1}], cluster_ip: 'fd00:198:16::b', \
             ip_family_policy: RequireDualStack}",
        )
        .unwrap();
        assert_eq!(lab.ip_family, IpFamily::Dual);
        let ips: Vec<Vec<String>> = lab
            .services
            .iter()
            .map(|s| s.cluster_ips().map(|a| a.to_string()).collect())
            .collect();
        assert_eq!(
            ips,
            [
                vec!["198.18.16.10"],
                vec!["198.18.16.11", "fd00:198:16::a"],
                vec!["fd00:198:16::10"],
                vec!["198.18.16.12", "fd00:198:16::b"],
            ],
            "SingleStack takes the lab's first family or the given address's; a dual-stack \
             Service lists IPv4 first; allocation skips the given addresses"
        );
        // PreferDualStack outside a dual-stack lab is the lab's one family.
        let lab = resolve_text(
            "ip_family: ipv4\nservices: [{name: a, selector: {}, ports: [{port: 1}], \
             ip_family_policy: PreferDualStack}]",
        )
        .unwrap();
        assert_eq!(lab.services[0].cluster_ipv6, None);
        let back: LabSpec = serde_json::from_slice(&serde_json::to_vec(&lab).unwrap()).unwrap();
        assert_eq!(back, lab);
    }

    #[test]
    fn bad_services_name_the_field() {
        for (text, field) in [
            ("services: [{name: a, selector: {}, ports: [{port: 1}], cluster_ip: 10.0.0.1}]", "services[0].cluster_ip"),
            ("services: [{name: a, selector: {}, ports: [{port: 1}], cluster_ip: 198.18.16.0}]", "services[0].cluster_ip"),
            ("services: [{name: a, selector: {}, ports: []}]", "services[0].ports"),
            ("services: [{name: a, selector: {}, ports: [{port: 0}]}]", "services[0].ports[0].port"),
            ("services: [{name: a, selector: {}, ports: [{port: 1}, {port: 2}]}]", "services[0].ports[0].name"),
            ("services: [{name: a, selector: {}, ports: [{port: 1, protocol: QUIC}]}]", "services[0].ports[0].protocol"),
            ("services: [{name: a, selector: {}, ports: [{port: 1, protocol: ICMP}]}]", "services[0].ports[0].protocol"),
            ("services: [{name: A, selector: {}, ports: [{port: 1}]}]", "services[0].name"),
            ("services: [{name: a, selector: {}, ports: [{port: 1}]}, {name: a, selector: {}, ports: [{port: 1}]}]", "services[1].name"),
            ("services: [{name: a, selector: {}, ports: [{port: 1}], cluster_ip: 198.18.16.9}, {name: b, selector: {}, ports: [{port: 1}], cluster_ip: 198.18.16.9}]", "services[1].cluster_ip"),
            ("services: [{name: a, selector: {}, ports: [{port: 1}], session_affinity_timeout: 1m}]", "services[0].session_affinity_timeout"),
            ("services: [{name: a, selector: {}, ports: [{port: 1}], session_affinity: ClientIP, session_affinity_timeout: 2d}]", "services[0].session_affinity_timeout"),
            ("services: [{name: a, selector: {'bad key!': x}, ports: [{port: 1}]}]", "services[0].selector"),
        ] {
            let e = err_text(text);
            assert!(e.contains(field), "{text}: {e}");
        }
    }

    #[test]
    fn custom_nodes_without_pods_get_no_default_pods() {
        let lab = resolve_text("nodes: [{name: solo}]").unwrap();
        assert!(lab.pods.is_empty());
    }

    /// Regression (fuzz target `lab_file`, corpus `lab_file/regression-subsecond-ttl`): a
    /// sub-second part was accepted, used by `lab up`, and lost when the state was read back.
    #[test]
    fn sub_second_durations_are_refused_and_the_state_reads_back() {
        for (text, field) in [
            ("svid_ttl: 10500ms", "svid_ttl"),
            ("psk_rotation: 5s 1ns", "psk_rotation"),
            ("key_rotation: 90s 500ms", "key_rotation"),
        ] {
            let e = resolve("veil", parse_lab_file(text).unwrap(), &Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(e.contains(field) && e.contains("whole"), "{text}: {e}");
        }
        let overrides = Overrides {
            svid_ttl: Some(Duration::from_millis(10_500)),
            ..Overrides::default()
        };
        assert!(resolve("veil", LabFile::default(), &overrides).is_err());
        let text = "svid_ttl: 10s\npsk_rotation: 1m 5s\nkey_rotation: 2h";
        let spec = resolve("veil", parse_lab_file(text).unwrap(), &Overrides::default()).unwrap();
        let back: LabSpec = serde_json::from_slice(&serde_json::to_vec(&spec).unwrap()).unwrap();
        assert_eq!(back, spec);
    }

    #[test]
    fn bad_files_name_the_field() {
        let cases: &[(&str, &str)] = &[
            ("colour: blue", "colour"),
            ("nodes: [{name: a, zone: x}]", "nodes[0]"),
            ("pods: [{name: p, node: node-a, lables: {}}]", "pods[0]"),
            ("encryption: maybe", "encryption"),
            ("node_encryption: yes please", "node_encryption"),
            ("encryption: off\nnode_encryption: on", "node_encryption"),
            ("ip_family: both", "ip_family"),
            ("ip_family: ipv6\nidentity: dev\ncontrol_plane: files\nunderlay_mtu: 1340", "ip_family"),
            ("ip_family: ipv6\nidentity: dev\ncontrol_plane: files\nservices: [{name: a, selector: {}, ports: [{port: 1}], cluster_ip: 198.18.16.20}]", "services[0].cluster_ip"),
            ("ip_family: ipv4\nservices: [{name: a, selector: {}, ports: [{port: 1}], cluster_ip: 'fd00:198:16::20'}]", "services[0].cluster_ip"),
            ("ip_family: ipv4\nservices: [{name: a, selector: {}, ports: [{port: 1}], ip_family_policy: RequireDualStack}]", "services[0].ip_family_policy"),
            ("services: [{name: a, selector: {}, ports: [{port: 1}], ip_family_policy: DualStack}]", "services[0]"),
            ("services: [{name: a, selector: {}, ports: [{port: 1}], cluster_ip: 'fd00:198:17::20'}]", "services[0].cluster_ip"),
            ("services: [{name: a, selector: {}, ports: [{port: 1}], cluster_ip: 'fd00:198:16::10:0'}]", "services[0].cluster_ip"),
            ("ip_family: dual\nunderlay_mtu: 1300", "ip_family"),
            ("svid_ttl: soon", "svid_ttl"),
            ("svid_ttl: 1s", "svid_ttl"),
            ("backend: ebpf", "backend"),
            ("identity: vault", "identity"),
            ("identity: spire\nnodes: [{name: a}, {name: b, trust_domain: other.veil}]", "nodes[1].trust_domain"),
            ("federation: true\nidentity: spire", "federation"),
            ("federation: true\nidentity: dev", "federation"),
            ("federation: sometimes", "federation"),
            ("underlay_mtu: 100", "underlay_mtu"),
            ("trust_domain: Lab.Veil", "trust_domain"),
            ("nodes: []", "nodes"),
            ("nodes: [{name: Node_A}]", "nodes[0].name"),
            ("nodes: [{name: a}, {name: a}]", "nodes[1].name"),
            ("nodes: [{name: a}, {name: b, map_max_entries: {VEIL_IPCACHE: 0}}]", "nodes[1].map_max_entries"),
            ("nodes: [{name: a, map_max_entries: {VEIL_POLICY_A: 9}}]", "nodes[0].map_max_entries"),
            ("pods: [{name: p, node: node-z}]", "pods[0].node"),
            ("pods: [{name: p, node: node-a}, {name: p, node: node-b}]", "pods[1].name"),
            ("pods: [{name: p, node: node-a, labels: {'bad key!': x}}]", "pods[0].labels"),
            ("pods: [{name: p, node: node-a, serve: [{port: 0, kind: http}]}]", "pods[0].serve[0].port"),
            ("pods: [{name: p, node: node-a, serve: [{port: 80, kind: ftp}]}]", "pods[0].serve[0].kind"),
            ("pods: [{name: p, node: node-a, serve: [{port: 80, kind: http}, {port: 80, kind: echo}]}]", "pods[0].serve[1].port"),
            ("pods: [{name: p, node: node-a, serve: [{port: 99999, kind: http}]}]", "pods[0].serve[0].port"),
            ("nodes: [{name: shop-a}]\npods: [{name: a, namespace: shop, node: shop-a}]", "pods[0].name"),
            ("- just\n- a list", "(top level)"),
        ];
        for (text, path) in cases {
            let e = err_text(text);
            assert!(
                e.contains(path),
                "{text:?}: error {e:?} does not name {path:?}"
            );
        }
    }

    #[test]
    fn identity_provider_from_file_and_flag() {
        let lab = resolve("x", LabFile::default(), &Overrides::default()).unwrap();
        assert_eq!(lab.identity, IdentityProvider::Spire);
        let file = parse_lab_file("identity: dev\n").unwrap();
        let lab = resolve("x", file, &Overrides::default()).unwrap();
        assert_eq!(lab.identity, IdentityProvider::Dev);
        let file = parse_lab_file("identity: spire\n").unwrap();
        let lab = resolve("x", file, &Overrides::default()).unwrap();
        assert_eq!(lab.identity, IdentityProvider::Spire);
        let file = parse_lab_file("identity: spire\n").unwrap();
        let o = Overrides {
            identity: Some(IdentityProvider::Dev),
            ..Default::default()
        };
        assert_eq!(
            resolve("x", file, &o).unwrap().identity,
            IdentityProvider::Dev
        );
        assert!("spiffe".parse::<IdentityProvider>().is_err());
    }

    #[test]
    fn lab_names() {
        for good in ["veil", "a", "t-1", "abcdefgh", "0"] {
            validate_lab_name(good).unwrap();
        }
        for bad in ["", "toolongname", "UPPER", "a_b", "-a", "a-", "a.b"] {
            assert!(validate_lab_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn wg_interface_fits_ifnamsiz_for_longest_names() {
        let nodes: String = (0..250).map(|i| format!("- name: n{i}\n")).collect();
        let lab = resolve(
            "abcdefgh",
            parse_lab_file(&format!("nodes:\n{nodes}")).unwrap(),
            &Overrides::default(),
        )
        .unwrap();
        assert!(lab
            .nodes
            .iter()
            .all(|n| n.wg_interface.len() <= IFNAMSIZ_MAX));
        assert_eq!(lab.nodes[249].pod_cidr, "198.19.250.0/24");
    }

    #[test]
    fn too_many_nodes_rejected() {
        let nodes: String = (0..251).map(|i| format!("- name: n{i}\n")).collect();
        assert!(err_text(&format!("nodes:\n{nodes}")).contains("nodes"));
    }

    #[test]
    fn find_pod_ambiguity() {
        let lab = resolve_text(
            "nodes: [{name: a}]\npods: [{name: p, namespace: x, node: a}, {name: p, namespace: y, node: a}]",
        )
        .unwrap();
        assert!(lab.find_pod("p").unwrap_err().contains("ambiguous"));
        assert_eq!(lab.find_pod("y/p").unwrap().namespace, "y");
        assert!(lab.find_pod("z/p").is_err());
    }

    #[test]
    fn host_veth_names_are_stable_and_short() {
        assert_eq!(
            host_veth_name("shop", "frontend"),
            host_veth_name("shop", "frontend")
        );
        assert_ne!(
            host_veth_name("shop", "frontend"),
            host_veth_name("shop", "backend")
        );
        assert_eq!(host_veth_name("shop", "frontend").len(), 11);
    }
}
