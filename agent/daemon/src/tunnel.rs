//! tunnel: the node's WireGuard device as the agent runs it — the node key, the backend choice,
//! the peers that follow cluster state, and routes for remote pod CIDRs.
//!
//! The agent never sends a pod packet itself: it programs the device (userspace `veil-wg` over
//! UAPI, or the kernel over generic netlink) and tells the datapath which nodes have a peer
//! (`NODES[id].HAS_KEY`), which is what strict mode checks.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write as _,
    net::SocketAddr,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use veil_transport::{
    kernel::KernelTunnel,
    userspace::{Liveness, UserspaceTunnel},
    Backend as TunnelBackend, IpPrefix, PeerConfig, PresharedKey, PrivateKey, PublicKey, Tunnel,
};

use crate::{
    api,
    cluster::{self, ClusterState},
    config::{BackendChoice, Config},
};
use veil_common::marks;

/// How long peers found on an adopted `veil-wg` or kernel WireGuard device (installed by an
/// earlier agent run from its authenticated node handshakes) stay without a fresh handshake of
/// this run.
pub const ADOPTED_PEER_GRACE: std::time::Duration = std::time::Duration::from_secs(20);

/// Errors running the node's tunnel.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("node key {path}")]
    Key {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("node key {path} is not a WireGuard key")]
    BadKey {
        path: PathBuf,
        #[source]
        source: veil_transport::KeyError,
    },
    #[error(transparent)]
    Tunnel(#[from] veil_transport::Error),
    #[error("kernel backend requested but {0}")]
    NoKernel(veil_transport::Error),
    #[error("cannot route {cidr} into {interface}: {message}")]
    Route {
        cidr: String,
        interface: String,
        message: String,
    },
}

/// Loads the node's WireGuard key from `state_dir/wireguard.key`, creating it (mode 0600) on
/// first start. A key file readable by others is tightened to 0600.
pub fn load_or_create_key(state_dir: &Path) -> Result<PrivateKey, Error> {
    let path = state_dir.join("wireguard.key");
    let key_err = |source| Error::Key {
        path: path.clone(),
        source,
    };
    match std::fs::read_to_string(&path).map(zeroize::Zeroizing::new) {
        Ok(text) => {
            let meta = std::fs::metadata(&path).map_err(key_err)?;
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!(path = %path.display(), "node key was readable by others; setting mode 0600");
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                    .map_err(key_err)?;
            }
            PrivateKey::from_base64(text.trim()).map_err(|source| Error::BadKey {
                path: path.clone(),
                source,
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(state_dir).map_err(key_err)?;
            let key = PrivateKey::generate();
            write_key(state_dir, &key)?;
            tracing::info!(public_key = %key.public_key(), "created node WireGuard key");
            Ok(key)
        }
        Err(e) => Err(key_err(e)),
    }
}

/// Writes the node key to `state_dir/wireguard.key`: mode 0600 from creation, synced, then
/// renamed over the old file, so a crash leaves the old key or the new one, never half of one.
fn write_key(state_dir: &Path, key: &PrivateKey) -> Result<(), Error> {
    let path = state_dir.join("wireguard.key");
    let tmp = state_dir.join("wireguard.key.new");
    let key_err = |source| Error::Key {
        path: path.clone(),
        source,
    };
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(key_err)?;
    f.write_all(zeroize::Zeroizing::new(key.to_base64()).as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(key_err)?;
    std::fs::rename(&tmp, &path).map_err(key_err)
}

/// The node's WireGuard device and what the agent has put on it.
pub struct NodeTunnel {
    device: Box<dyn Tunnel>,
    key: PrivateKey,
    listen_port: u16,
    /// Node traffic encryption: the tunnel MTU (each peer's allowed IPs also hold its node's
    /// address, whose route takes that MTU); None when off.
    node_encryption: Option<u16>,
    /// Other nodes' addresses this agent routed with the tunnel's MTU (removed when a node
    /// leaves).
    node_routes: BTreeSet<std::net::IpAddr>,
    /// The listen port WireGuard's own route rule was installed for ([`underlay_rule`]).
    underlay_rule: Option<u16>,
    /// Peers an operator disabled (`veil peer remove`), kept off until re-enabled.
    disabled: BTreeSet<String>,
    /// Preshared keys per peer node (set by the mutual-auth handshake).
    psks: BTreeMap<String, PresharedKey>,
    /// The preshared keys last written to the device.
    psk_applied: BTreeMap<String, PresharedKey>,
    userspace: Option<UserspaceLaunch>,
    /// Node names whose peer is installed, as of the last reconcile.
    installed: BTreeMap<String, PublicKey>,
    /// Peers a previous agent run installed on a veil-wg this run adopted, kept until the
    /// node handshake re-keys them or the grace period ends (so an agent restart does not cut
    /// traffic; see ARCHITECTURE.md).
    adopted: BTreeMap<PublicKey, std::time::Instant>,
    /// veil-wg restarts with reasons (`veil status`).
    restarts: Restarts,
    /// Nodes whose key the last reconcile refused (logged once per change).
    refused: BTreeMap<String, RefusedKey>,
    /// An IPv6 pod CIDR could not be routed into the device (IPv6 off on this host): logged
    /// once, and IPv4 carries on.
    v6_route_failed: bool,
}

/// How long veil-wg has to answer a UAPI `get` before it counts as hung.
const LIVENESS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// Waits (bounded) until process `pid` is gone, so its socket and TUN device are free.
fn wait_gone(pid: i32) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while std::path::Path::new(&format!("/proc/{pid}")).exists()
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Restarts of the userspace tunnel process this agent run performed, with reasons.
#[derive(Debug, Default, Clone)]
pub struct Restarts {
    pub total: u64,
    /// The most recent restarts, newest last (bounded).
    pub recent: std::collections::VecDeque<(u64, &'static str)>,
}

impl Restarts {
    const KEEP: usize = 16;

    fn record(&mut self, reason: &'static str) {
        self.total += 1;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        if self.recent.len() == Self::KEEP {
            self.recent.pop_front();
        }
        self.recent.push_back((now, reason));
    }
}

/// How to (re)start veil-wg when it is not running.
struct UserspaceLaunch {
    binary: PathBuf,
    log: PathBuf,
    cgroup: Option<PathBuf>,
    mtu: u16,
    uapi_dir: PathBuf,
}

impl NodeTunnel {
    /// Opens the configured backend (auto: kernel where the kernel has WireGuard, else
    /// userspace), starting veil-wg if it is not already running — a running one (from before
    /// an agent restart) is adopted as is, so traffic never stops.
    pub fn open(cfg: &Config, key: PrivateKey) -> Result<Self, Error> {
        let use_kernel = match cfg.backend {
            BackendChoice::Kernel => true,
            BackendChoice::Userspace => false,
            BackendChoice::Auto => veil_transport::kernel::available(),
        };
        let mut userspace = None;
        let mut started_fresh = true;
        let device: Box<dyn Tunnel> = if use_kernel {
            let k = KernelTunnel::open(&cfg.interface).map_err(|e| match cfg.backend {
                BackendChoice::Kernel => Error::NoKernel(e),
                _ => Error::Tunnel(e),
            })?;
            let _ = crate::sys::run(
                "ip",
                &[
                    "link",
                    "set",
                    "dev",
                    &cfg.interface,
                    "mtu",
                    &cfg.mtu.to_string(),
                    "up",
                ],
                None,
            );
            // A device an earlier agent run made keeps its peers and sessions: adopted like a
            // running veil-wg, its peers kept for the grace until this run's handshakes.
            if k.existed() {
                tracing::info!(interface = %cfg.interface, "adopted kernel WireGuard device");
                started_fresh = false;
            }
            Box::new(k)
        } else {
            let launch = UserspaceLaunch {
                binary: cfg
                    .wg_binary
                    .clone()
                    .unwrap_or_else(|| crate::sys::sibling_binary("veil-wg")),
                log: cfg
                    .wg_log
                    .clone()
                    .unwrap_or_else(|| cfg.state_dir.join("veil-wg.log")),
                cgroup: cfg.wg_cgroup.clone(),
                mtu: cfg.mtu,
                uapi_dir: cfg.uapi_dir.clone(),
            };
            let u = UserspaceTunnel::new(&cfg.interface, &cfg.uapi_dir);
            let started = u.ensure_running(
                &launch.binary,
                launch.mtu,
                &launch.log,
                launch.cgroup.as_deref(),
            )?;
            if started {
                tracing::info!(interface = %cfg.interface, "started veil-wg");
            } else {
                tracing::info!(interface = %cfg.interface, "adopted running veil-wg");
            }
            started_fresh = started;
            userspace = Some(launch);
            Box::new(u)
        };
        let mut t = Self {
            device,
            key,
            listen_port: cfg.listen_port,
            node_encryption: (cfg.encryption && cfg.node_encryption).then_some(cfg.mtu),
            node_routes: BTreeSet::new(),
            underlay_rule: None,
            disabled: BTreeSet::new(),
            psks: BTreeMap::new(),
            psk_applied: BTreeMap::new(),
            userspace,
            installed: BTreeMap::new(),
            adopted: BTreeMap::new(),
            restarts: Restarts::default(),
            refused: BTreeMap::new(),
            v6_route_failed: false,
        };
        t.ensure_device()?;
        if !started_fresh {
            let until = std::time::Instant::now() + ADOPTED_PEER_GRACE;
            t.adopted = t
                .device
                .state()?
                .peers
                .iter()
                .filter_map(|p| Some((p.public_key?, until)))
                .collect();
        }
        Ok(t)
    }

    pub fn restarts(&self) -> &Restarts {
        &self.restarts
    }

    pub fn backend(&self) -> TunnelBackend {
        self.device.backend()
    }

    pub fn interface(&self) -> &str {
        self.device.interface()
    }

    pub fn public_key(&self) -> PublicKey {
        self.key.public_key()
    }

    /// Replaces the node's static key: a new key is written (0600, atomically) to
    /// `state_dir/wireguard.key` and put on the device at once. Every WireGuard session ends;
    /// peers can handshake again once a node handshake told them the new public key.
    pub fn rotate_key(&mut self, state_dir: &Path) -> Result<PublicKey, Error> {
        self.rotate_key_to(state_dir, PrivateKey::generate())
    }

    /// Puts `key` (made earlier and published first, see `daemon::keys::rotate_node_key`) on the
    /// device and in the state dir.
    pub fn rotate_key_to(&mut self, state_dir: &Path, key: PrivateKey) -> Result<PublicKey, Error> {
        write_key(state_dir, &key)?;
        self.device.set_private_key(&key)?;
        self.key = key;
        // Peers go back on with the new key at the next reconcile.
        self.installed.clear();
        self.adopted.clear();
        Ok(self.key.public_key())
    }

    pub fn set_psk(&mut self, node: &str, psk: PresharedKey) {
        self.psks.insert(node.to_string(), psk);
    }

    pub fn disable_peer(&mut self, node: &str) {
        self.disabled.insert(node.to_string());
    }

    pub fn enable_peer(&mut self, node: &str) {
        self.disabled.remove(node);
    }

    /// The pid of the veil-wg process serving this node's device (userspace backend only), so
    /// the daemon can watch it exit instead of noticing at the next reconcile.
    pub fn device_pid(&self) -> Option<i32> {
        let l = self.userspace.as_ref()?;
        UserspaceTunnel::new(self.device.interface(), &l.uapi_dir).server_pid()
    }

    /// Restarts veil-wg if it died or hangs (ended with SIGKILL first) and puts the node key and
    /// port back if the device lost them. Each restart is counted with its reason.
    fn ensure_device(&mut self) -> Result<(), Error> {
        if let Some(l) = &self.userspace {
            let u = UserspaceTunnel::new(self.device.interface(), &l.uapi_dir);
            let reason = match u.probe(LIVENESS_TIMEOUT) {
                Liveness::Running => None,
                Liveness::Absent => Some("exited"),
                Liveness::Hung { pid } => {
                    tracing::warn!(interface = %self.device.interface(), pid, "veil-wg does not answer its UAPI socket; killing it");
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                    wait_gone(pid);
                    Some("unresponsive")
                }
            };
            if reason.is_some()
                && u.ensure_running(&l.binary, l.mtu, &l.log, l.cgroup.as_deref())?
            {
                let reason = reason.unwrap_or("exited");
                tracing::warn!(interface = %self.device.interface(), reason, "veil-wg was not running; restarted it");
                self.restarts.record(reason);
                self.installed.clear();
                self.adopted.clear();
                self.psk_applied.clear();
            }
        }
        let st = self.device.state()?;
        if st.public_key != Some(self.key.public_key()) {
            self.device.set_private_key(&self.key)?;
            self.installed.clear();
            self.adopted.clear();
        }
        if st.listen_port != self.listen_port {
            self.device.set_listen_port(self.listen_port)?;
        }
        Ok(())
    }

    /// Brings the device's peers to what the cluster state says: one peer per other node with
    /// a published key (unless disabled), endpoint on its underlay IP, allowed IPs its pod CIDR.
    /// Also routes every remote pod CIDR into the device, so even traffic the datapath does not
    /// steer can only leave encrypted (or not at all). Returns the node names with a peer.
    pub fn reconcile(
        &mut self,
        cluster: &ClusterState,
        me: &str,
        auth_keys: Option<&BTreeMap<String, crate::mesh::PeerKeys>>,
    ) -> Result<BTreeSet<String>, Error> {
        self.ensure_device()?;
        let now = std::time::Instant::now();
        self.adopted.retain(|_, until| *until > now);
        self.route_pod_cidrs(cluster, me)?;
        if let Some(mtu) = self.node_encryption {
            self.route_nodes(cluster, me, mtu);
        }
        let PeerPlan {
            desired,
            mut kept,
            refused,
        } = plan_peers(&PlanInput {
            cluster,
            me,
            own_key: &self.key.public_key(),
            listen_port: self.listen_port,
            node_encryption: self.node_encryption.is_some(),
            disabled: &self.disabled,
            psks: &self.psks,
            adopted: &self.adopted,
            auth_keys,
        });
        let refused: BTreeMap<String, RefusedKey> = refused.into_iter().collect();
        for (node, why) in &refused {
            if self.refused.get(node) != Some(why) {
                tracing::warn!(peer = %node, reason = why.as_str(), "no tunnel peer for node: its wireguard key is refused");
            }
        }
        self.refused = refused;
        let st = self.device.state()?;
        let current: BTreeMap<PublicKey, &veil_transport::PeerState> = st
            .peers
            .iter()
            .filter_map(|p| Some((p.public_key?, p)))
            .collect();
        for (key, (node, want)) in &desired {
            // The peer as installed, apart from its PSK.
            let placed = current.get(key).is_some_and(|have| {
                have.allowed_ips == want.allowed_ips
                    && have.endpoint == want.endpoint
                    && self.installed.get(node) == Some(key)
            });
            let psk_same = current
                .get(key)
                .is_some_and(|have| have.has_preshared_key == want.preshared_key.is_some())
                && self.psk_applied.get(node) == want.preshared_key.as_ref();
            if placed && !psk_same {
                // A new PSK alone (every node handshake): the allowed IPs stay untouched.
                self.device
                    .set_preshared_key(key, want.preshared_key.as_ref())?;
                tracing::info!(peer = %node, public_key = %key, "tunnel peer PSK updated");
            } else if !placed {
                self.device.upsert_peer(want)?;
                tracing::info!(peer = %node, public_key = %key, "tunnel peer installed");
            }
        }
        for key in desired.keys() {
            self.adopted.remove(key);
        }
        kept.retain(|k, _| current.contains_key(k) && !desired.contains_key(k));
        for key in current
            .keys()
            .filter(|k| !desired.contains_key(k) && !kept.contains_key(k))
        {
            self.device.remove_peer(key)?;
            self.adopted.remove(key);
            tracing::info!(public_key = %key, "tunnel peer removed");
        }
        self.installed = desired
            .iter()
            .map(|(k, (n, _))| (n.clone(), *k))
            .chain(kept.iter().map(|(k, n)| (n.clone(), *k)))
            .collect();
        self.psk_applied = desired
            .values()
            .filter_map(|(n, p)| p.preshared_key.clone().map(|k| (n.clone(), k)))
            .collect();
        Ok(self.installed.keys().cloned().collect())
    }

    /// Peers as `veil status` shows them.
    pub fn peers(&mut self, cluster: &ClusterState) -> Result<Vec<api::Peer>, Error> {
        let st = self.device.state()?;
        let by_key: BTreeMap<String, &cluster::Node> = cluster
            .nodes
            .iter()
            .filter_map(|n| Some((n.wg_public_key.clone()?, n)))
            .collect();
        Ok(st
            .peers
            .iter()
            .map(|p| {
                let key = p.public_key.map(|k| k.to_base64()).unwrap_or_default();
                api::Peer {
                    node: by_key
                        .get(&key)
                        .map(|n| n.name.clone())
                        .unwrap_or_else(|| "?".into()),
                    endpoint: p.endpoint.map(|e| e.to_string()),
                    public_key: key,
                    allowed_ips: p.allowed_ips.iter().map(|a| a.to_string()).collect(),
                    last_handshake_unix: p
                        .last_handshake
                        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                        .map(|d| d.as_secs()),
                    rx_bytes: p.rx_bytes,
                    tx_bytes: p.tx_bytes,
                }
            })
            .collect())
    }

    /// What the device dropped, by reason (veil-wg's counters; none from kernel WireGuard).
    pub fn drops(&mut self) -> Result<BTreeMap<String, u64>, Error> {
        Ok(self.device.drops()?)
    }

    pub fn listen_port(&self) -> u16 {
        self.listen_port
    }

    /// Routes every other node's pod CIDRs into the device. IPv6 may fail alone: a host with
    /// IPv6 off cannot route another node's IPv6 pods, its own pods have no IPv6 either, so
    /// only that family is lost, and nothing leaves in clear.
    fn route_pod_cidrs(&mut self, cluster: &ClusterState, me: &str) -> Result<(), Error> {
        let (mut v4, mut v6) = (BTreeSet::new(), BTreeSet::new());
        for n in cluster.nodes.iter().filter(|n| n.name != me) {
            for c in n.pod_cidrs() {
                match crate::cluster::parse_cidr(c) {
                    Some((std::net::IpAddr::V4(_), _)) => v4.insert(c),
                    _ => v6.insert(c),
                };
            }
        }
        let dev = self.device.interface().to_string();
        if !v4.is_empty() {
            routes_into(&dev, "-4", &v4)?;
        }
        if !v6.is_empty() {
            match routes_into(&dev, "-6", &v6) {
                Err(e) if !self.v6_route_failed => {
                    tracing::warn!(error = %e, "IPv6 pod CIDRs are not routed into the tunnel (is IPv6 off on this host?); IPv4 is unaffected");
                    self.v6_route_failed = true;
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Node encryption: the route to each other node's address (both of a dual-stack underlay's
    /// nodes) keeps the path the host had (the datapath steers the traffic into the tunnel at
    /// the underlay's egress) but takes the tunnel's MTU, so the host sizes its own packets for
    /// the tunnel: TCP's MSS follows from it, a larger UDP or ICMP datagram is fragmented before
    /// it enters the tunnel (not dropped `mtu-exceeded` there), and kernel WireGuard, which pads
    /// a packet up to the MTU of the route it carries, never makes a datagram the underlay must
    /// fragment. WireGuard's own datagrams to the same address need the underlay's MTU: a rule
    /// sends UDP from the listen port to a table of their own ([`underlay_rule`]).
    fn route_nodes(&mut self, cluster: &ClusterState, me: &str, mtu: u16) {
        let want: BTreeSet<std::net::IpAddr> = cluster
            .nodes
            .iter()
            .filter(|n| n.name != me)
            .flat_map(cluster::Node::underlay_ips)
            .collect();
        if self.underlay_rule != Some(self.listen_port) {
            if let Err(e) = underlay_rule(self.listen_port) {
                tracing::warn!(error = %e, "cannot route WireGuard's datagrams apart from node traffic: node routes keep the underlay's MTU");
            } else {
                self.underlay_rule = Some(self.listen_port);
            }
        }
        let table = marks::UNDERLAY_ROUTE_TABLE.to_string();
        let (tunnel_mtu, mtu) = (mtu, mtu.to_string());
        // Once per node (the reconcile runs on every cluster change): a node already routed
        // keeps its route; a failed one is retried at the next reconcile.
        for ip in want
            .difference(&self.node_routes)
            .copied()
            .collect::<Vec<_>>()
        {
            let family = if ip.is_ipv4() { "-4" } else { "-6" };
            let dst = IpPrefix::host(ip).to_string();
            // The path the node already has to it (gateway, interface), as the kernel resolves
            // it for WireGuard's datagrams (an earlier run's route, with the tunnel's MTU, would
            // be resolved the same way: only the MTU differs).
            let path = match crate::sys::run(
                "ip",
                &[family, "-o", "route", "get", &ip.to_string()],
                None,
            ) {
                Ok(out) => route_path(&out),
                Err(e) => {
                    tracing::warn!(node_ip = %ip, error = %e, "no route to a node: its traffic is not sized for the tunnel");
                    continue;
                }
            };
            let route = |extra: &[&str]| {
                let mut args = vec![family, "route", "replace", dst.as_str()];
                args.extend(path.iter().map(String::as_str));
                args.extend(extra);
                crate::sys::run("ip", &args, None)
            };
            let r = if self.underlay_rule.is_some() {
                // WireGuard's route first: the node's own route must never hold the tunnel's
                // MTU while the datagrams that carry the tunnel would take it too.
                route(&["table", &table]).and_then(|_| route(&["mtu", &mtu]))
            } else {
                // Without WireGuard's rule the route keeps the underlay's MTU, and only TCP is
                // sized for the tunnel (its advertised MSS); larger UDP and ICMP node packets
                // are dropped `mtu-exceeded`, never sent in clear.
                let headers = if ip.is_ipv4() { 40 } else { 60 };
                route(&["advmss", &(u32::from(tunnel_mtu) - headers).to_string()])
            };
            match r {
                Ok(_) => {
                    self.node_routes.insert(ip);
                }
                Err(e) => {
                    tracing::warn!(node_ip = %ip, error = %e, "cannot size a node's route for the tunnel")
                }
            }
        }
        for gone in self
            .node_routes
            .difference(&want)
            .copied()
            .collect::<Vec<_>>()
        {
            let dst = IpPrefix::host(gone).to_string();
            let _ = crate::sys::run("ip", &["route", "del", &dst], None);
            let _ = crate::sys::run("ip", &["route", "del", &dst, "table", &table], None);
            self.node_routes.remove(&gone);
        }
    }
}

/// The rule that keeps WireGuard's own datagrams (UDP from its listen port, whether kernel
/// WireGuard or veil-wg sends them) on the underlay's MTU: `ip rule … ipproto udp sport PORT
/// lookup UNDERLAY_ROUTE_TABLE`, for both families, where that table holds each other node's
/// route without the tunnel's MTU. Keeps the rule an earlier run left; replaces one of another
/// port.
fn underlay_rule(port: u16) -> Result<(), crate::sys::Error> {
    let (table, pref, port) = (
        marks::UNDERLAY_ROUTE_TABLE.to_string(),
        marks::UNDERLAY_RULE_PRIORITY.to_string(),
        port.to_string(),
    );
    let want = format!("ipproto udp sport {port} lookup {table}");
    for family in ["-4", "-6"] {
        // An agent restarted keeps the rule its predecessor left, with no window where
        // WireGuard's datagrams would take the tunnel's MTU.
        let shown = crate::sys::run("ip", &[family, "rule", "show", "pref", &pref], None);
        if shown.is_ok_and(|out| out.lines().count() == 1 && out.contains(&want)) {
            continue;
        }
        while crate::sys::run("ip", &[family, "rule", "del", "pref", &pref], None).is_ok() {}
        let add = crate::sys::run(
            "ip",
            &[
                family, "rule", "add", "pref", &pref, "ipproto", "udp", "sport", &port, "lookup",
                &table,
            ],
            None,
        );
        // A host without IPv6 has no IPv6 nodes to route either.
        if family == "-4" {
            add?;
        }
    }
    Ok(())
}

/// `via GW dev IF` (what is present) of one line of `ip -o route get`.
fn route_path(out: &str) -> Vec<String> {
    let words: Vec<&str> = out.split_whitespace().collect();
    let mut path = Vec::new();
    for key in ["via", "dev"] {
        if let Some(i) = words.iter().position(|w| *w == key) {
            if let Some(v) = words.get(i + 1) {
                path.extend([key.to_string(), v.to_string()]);
            }
        }
    }
    path
}

/// What [`plan_peers`] decides from.
struct PlanInput<'a> {
    cluster: &'a ClusterState,
    me: &'a str,
    own_key: &'a PublicKey,
    listen_port: u16,
    /// Node encryption: a peer's allowed IPs also hold its node's own address.
    node_encryption: bool,
    disabled: &'a BTreeSet<String>,
    psks: &'a BTreeMap<String, PresharedKey>,
    adopted: &'a BTreeMap<PublicKey, std::time::Instant>,
    auth_keys: Option<&'a BTreeMap<String, crate::mesh::PeerKeys>>,
}

/// Why a node gets no peer although it has a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RefusedKey {
    /// Another node claims the same key: WireGuard routes by key, so one of them would silently
    /// receive the other's traffic. Neither gets a peer.
    Duplicate,
    /// A small-order point (or all zeros): no Diffie-Hellman with it is secret.
    LowOrder,
    /// This node's own key.
    Own,
}

impl RefusedKey {
    fn as_str(self) -> &'static str {
        match self {
            Self::Duplicate => "duplicate-wg-key",
            Self::LowOrder => "low-order-wg-key",
            Self::Own => "own-wg-key",
        }
    }
}

/// The device's peers as [`plan_peers`] wants them.
#[derive(Debug, Default)]
struct PeerPlan {
    /// Peers to install, by key: one node per key.
    desired: BTreeMap<PublicKey, (String, PeerConfig)>,
    /// Adopted peers kept as they are, by node, until their node handshake completes.
    kept: BTreeMap<PublicKey, String>,
    /// Nodes with a key but no peer, and why.
    refused: Vec<(String, RefusedKey)>,
}

/// Which peers the device should have (sans-IO): one per other node with a key (from its node
/// handshake with mutual auth, else as published) unless disabled, endpoint on its underlay IP,
/// allowed IPs its pod CIDR — and never two peers with one key, a low-order key or our own.
fn plan_peers(input: &PlanInput<'_>) -> PeerPlan {
    let mut plan = PeerPlan::default();
    let mut claims: Vec<(PublicKey, String, PeerConfig)> = Vec::new();
    let mut adopted_claims: Vec<(PublicKey, String)> = Vec::new();
    let published = |n: &cluster::Node| {
        n.wg_public_key
            .as_deref()
            .and_then(|k| PublicKey::from_base64(k).ok())
    };
    for n in input.cluster.nodes.iter().filter(|n| n.name != input.me) {
        if input.disabled.contains(&n.name) {
            continue;
        }
        // With mutual auth, a peer exists only once its node handshake succeeded: the key
        // and PSK come from that handshake, never from unauthenticated state.
        let (key, psk) = match input.auth_keys {
            Some(keys) => match keys.get(&n.name) {
                Some(k) => (k.public_key, Some(k.psk.clone())),
                None => {
                    if let Some(k) = published(n).filter(|k| input.adopted.contains_key(k)) {
                        adopted_claims.push((k, n.name.clone()));
                    }
                    continue;
                }
            },
            None => match published(n) {
                Some(k) => (k, input.psks.get(&n.name).cloned()),
                None => continue,
            },
        };
        let Ok(cidr) = n.pod_cidr.parse::<IpPrefix>() else {
            continue;
        };
        let mut allowed_ips = vec![cidr];
        allowed_ips.extend(
            n.pod_cidr_v6
                .as_deref()
                .and_then(|c| c.parse::<IpPrefix>().ok()),
        );
        if input.node_encryption {
            allowed_ips.extend(n.underlay_ips().map(IpPrefix::host));
        }
        claims.push((
            key,
            n.name.clone(),
            PeerConfig {
                public_key: key,
                preshared_key: psk,
                endpoint: Some(SocketAddr::from((n.underlay_ip, input.listen_port))),
                allowed_ips,
                persistent_keepalive: None,
            },
        ));
    }
    let count = |keys: &mut dyn Iterator<Item = PublicKey>| {
        let mut n: BTreeMap<PublicKey, usize> = BTreeMap::new();
        for k in keys {
            *n.entry(k).or_default() += 1;
        }
        n
    };
    let claimed = count(&mut claims.iter().map(|c| c.0));
    let adopted_claimed = count(&mut adopted_claims.iter().map(|c| c.0));
    let refusal = |k: &PublicKey, claimants: &BTreeMap<PublicKey, usize>| {
        if k == input.own_key {
            Some(RefusedKey::Own)
        } else if k.is_low_order() {
            Some(RefusedKey::LowOrder)
        } else if claimants.get(k).copied().unwrap_or(0) > 1 {
            Some(RefusedKey::Duplicate)
        } else {
            None
        }
    };
    for (key, node, cfg) in claims {
        match refusal(&key, &claimed) {
            Some(why) => plan.refused.push((node, why)),
            None => {
                plan.desired.insert(key, (node, cfg));
            }
        }
    }
    // An adopted peer is kept only for the one node that still publishes its key, and never
    // when a node that has a peer claims it: an unauthenticated claim cannot displace (or, by
    // colliding, remove) an authenticated one.
    for (key, node) in adopted_claims {
        let why = refusal(&key, &adopted_claimed)
            .or_else(|| claimed.contains_key(&key).then_some(RefusedKey::Duplicate));
        match why {
            Some(why) => plan.refused.push((node, why)),
            None => {
                plan.kept.insert(key, node);
            }
        }
    }
    plan
}

/// Routes each CIDR of `want` (one family: `-4` or `-6`) into `interface` unless the device
/// already has that route: one `ip route show` to find what is missing, one `ip -batch` to add
/// it. A reconcile runs every few seconds, so its cost must not grow with the nodes: a process
/// per node route was 1,000 processes per reconcile at 1,000 nodes.
fn routes_into(interface: &str, family: &str, want: &BTreeSet<&str>) -> Result<(), Error> {
    let err = |cidr: String, e: crate::sys::Error| Error::Route {
        cidr,
        interface: interface.into(),
        message: e.to_string(),
    };
    let shown = crate::sys::run(
        "ip",
        &[family, "-o", "route", "show", "dev", interface],
        None,
    )
    .map_err(|e| err(format!("{family} pod CIDRs"), e))?;
    let have = routed_prefixes(&shown);
    let missing: Vec<&str> = want
        .iter()
        .filter(|c| cluster::parse_cidr(c).is_none_or(|p| !have.contains(&p)))
        .copied()
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let batch: String = missing
        .iter()
        .map(|c| format!("route replace {c} dev {interface}\n"))
        .collect();
    crate::sys::run(
        "ip",
        &[family, "-force", "-batch", "-"],
        Some(batch.as_bytes()),
    )
    .map(drop)
    .map_err(|e| err(missing.join(" "), e))
}

/// The destinations of `ip -o route show` lines (`default` and unparsable ones left out; a
/// host route shows without its length).
fn routed_prefixes(shown: &str) -> BTreeSet<(std::net::IpAddr, u8)> {
    shown
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|d| {
            cluster::parse_cidr(d).or_else(|| {
                let ip: std::net::IpAddr = d.parse().ok()?;
                Some((ip, if ip.is_ipv4() { 32 } else { 128 }))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::PeerKeys;

    fn key(b: u8) -> PublicKey {
        PrivateKey::from_bytes([b; 32]).public_key()
    }

    #[test]
    fn routed_prefixes_read_ip_route_show_of_both_families() {
        let v4 = "198.19.2.0/24 scope link \n198.18.0.7 scope link \ndefault via 198.18.0.1\n";
        let v6 = "fd00:198:19:2::/64 metric 1024 pref medium\nfe80::/64 proto kernel metric 256\n";
        let got = routed_prefixes(&format!("{v4}{v6}"));
        let want = [
            ("198.19.2.0", 24),
            ("198.18.0.7", 32),
            ("fd00:198:19:2::", 64),
            ("fe80::", 64),
        ]
        .map(|(a, l)| (a.parse::<std::net::IpAddr>().unwrap(), l));
        assert_eq!(got, BTreeSet::from(want));
        // What a node's CIDR parses to is what the listing holds: no re-adding every reconcile.
        assert!(got.contains(&cluster::parse_cidr("198.19.2.0/24").unwrap()));
        assert!(got.contains(&cluster::parse_cidr("fd00:198:19:2::/64").unwrap()));
    }

    fn node(name: &str, id: u8, published: Option<PublicKey>) -> cluster::Node {
        cluster::Node {
            name: name.into(),
            id: u32::from(id),
            underlay_ip: std::net::Ipv4Addr::new(198, 18, 0, id).into(),
            underlay_ipv6: None,
            pod_cidr: format!("198.19.{id}.0/24"),
            pod_cidr_v6: None,
            wg_public_key: published.map(|k| k.to_base64()),
            wg_next_public_key: None,
        }
    }

    fn auth(key: PublicKey) -> PeerKeys {
        PeerKeys {
            public_key: key,
            psk: PresharedKey::from_bytes([9; 32]),
            epoch: 1,
        }
    }

    struct World {
        cluster: ClusterState,
        disabled: BTreeSet<String>,
        psks: BTreeMap<String, PresharedKey>,
        adopted: BTreeMap<PublicKey, std::time::Instant>,
        own: PublicKey,
        node_encryption: bool,
    }

    impl World {
        fn new(nodes: Vec<cluster::Node>) -> Self {
            Self {
                cluster: ClusterState {
                    nodes,
                    ..Default::default()
                },
                disabled: BTreeSet::new(),
                psks: BTreeMap::new(),
                adopted: BTreeMap::new(),
                own: key(100),
                node_encryption: false,
            }
        }

        fn plan(&self, auth_keys: Option<&BTreeMap<String, PeerKeys>>) -> PeerPlan {
            plan_peers(&PlanInput {
                cluster: &self.cluster,
                me: "me",
                own_key: &self.own,
                listen_port: 51820,
                node_encryption: self.node_encryption,
                disabled: &self.disabled,
                psks: &self.psks,
                adopted: &self.adopted,
                auth_keys,
            })
        }
    }

    fn installed(plan: &PeerPlan) -> BTreeMap<String, PublicKey> {
        plan.desired
            .iter()
            .map(|(k, (n, _))| (n.clone(), *k))
            .collect()
    }

    #[test]
    fn one_peer_per_node_from_its_handshake() {
        let w = World::new(vec![
            node("me", 1, Some(key(100))),
            node("a", 2, Some(key(50))),
            node("b", 3, None),
            node("c", 4, Some(key(4))),
        ]);
        let keys = BTreeMap::from([("a".to_string(), auth(key(2))), ("b".into(), auth(key(3)))]);
        let plan = w.plan(Some(&keys));
        // The handshake's key, not the published one; c has no handshake yet: no peer.
        assert_eq!(
            installed(&plan),
            BTreeMap::from([("a".to_string(), key(2)), ("b".into(), key(3))])
        );
        let (_, a) = &plan.desired[&key(2)];
        assert_eq!(a.preshared_key, Some(PresharedKey::from_bytes([9; 32])));
        assert_eq!(a.endpoint, Some("198.18.0.2:51820".parse().unwrap()));
        assert_eq!(a.allowed_ips, vec!["198.19.2.0/24".parse().unwrap()]);
        assert!(plan.refused.is_empty());
        // Without mutual auth: the published keys.
        let plan = w.plan(None);
        assert_eq!(
            installed(&plan),
            BTreeMap::from([("a".to_string(), key(50)), ("c".into(), key(4))])
        );
        // Node encryption: the node's own address joins its pod CIDR.
        let mut w = w;
        w.node_encryption = true;
        let plan = w.plan(Some(&keys));
        let (_, a) = &plan.desired[&key(2)];
        assert_eq!(
            a.allowed_ips,
            vec![
                "198.19.2.0/24".parse().unwrap(),
                "198.18.0.2/32".parse().unwrap()
            ]
        );
    }

    #[test]
    fn a_node_route_keeps_its_path() {
        assert_eq!(
            route_path("198.18.0.2 dev ul0 src 198.18.0.1 uid 0 \\    cache "),
            ["dev", "ul0"]
        );
        assert_eq!(
            route_path("10.0.9.7 via 10.0.0.1 dev eth0 src 10.0.0.5 uid 0 \\    cache "),
            ["via", "10.0.0.1", "dev", "eth0"]
        );
    }

    #[test]
    fn two_nodes_with_one_key_get_no_peer_and_bad_keys_none_either() {
        let mut zero = [0u8; 32];
        let low = PublicKey(zero);
        zero[0] = 1;
        let identity = PublicKey(zero);
        let w = World::new(vec![
            node("a", 2, None),
            node("b", 3, None),
            node("c", 4, None),
            node("d", 5, None),
            node("e", 6, None),
            node("f", 7, None),
        ]);
        let keys = BTreeMap::from([
            ("a".to_string(), auth(key(2))),
            // b and c claim one key: WireGuard would route both nodes' traffic to one of them.
            ("b".into(), auth(key(3))),
            ("c".into(), auth(key(3))),
            ("d".into(), auth(low)),
            ("e".into(), auth(identity)),
            ("f".into(), auth(w.own)),
        ]);
        let plan = w.plan(Some(&keys));
        assert_eq!(
            installed(&plan),
            BTreeMap::from([("a".to_string(), key(2))])
        );
        let refused: BTreeMap<_, _> = plan.refused.iter().cloned().collect();
        assert_eq!(
            refused,
            BTreeMap::from([
                ("b".to_string(), RefusedKey::Duplicate),
                ("c".into(), RefusedKey::Duplicate),
                ("d".into(), RefusedKey::LowOrder),
                ("e".into(), RefusedKey::LowOrder),
                ("f".into(), RefusedKey::Own),
            ])
        );
        // Published keys (no mutual auth) are held to the same rules.
        let w = World::new(vec![
            node("a", 2, Some(key(2))),
            node("b", 3, Some(key(3))),
            node("c", 4, Some(key(3))),
            node("d", 5, Some(low)),
        ]);
        let plan = w.plan(None);
        assert_eq!(
            installed(&plan),
            BTreeMap::from([("a".to_string(), key(2))])
        );
        assert_eq!(plan.refused.len(), 3);
    }

    #[test]
    fn an_adopted_peer_never_shares_a_key_with_an_authenticated_one() {
        let mut w = World::new(vec![
            node("a", 2, Some(key(2))),
            node("b", 3, Some(key(2))),
            node("c", 4, Some(key(4))),
        ]);
        let later = std::time::Instant::now() + ADOPTED_PEER_GRACE;
        w.adopted = BTreeMap::from([(key(2), later), (key(4), later)]);
        // a authenticated with its key; b publishes a's key (its own handshake pending): b's
        // claim neither displaces nor removes a's peer, and b keeps nothing.
        let keys = BTreeMap::from([("a".to_string(), auth(key(2)))]);
        let plan = w.plan(Some(&keys));
        assert_eq!(
            installed(&plan),
            BTreeMap::from([("a".to_string(), key(2))])
        );
        assert_eq!(plan.kept, BTreeMap::from([(key(4), "c".to_string())]));
        assert_eq!(plan.refused, vec![("b".to_string(), RefusedKey::Duplicate)]);
        // Before any handshake: two nodes publishing one adopted key keep nothing.
        let plan = w.plan(Some(&BTreeMap::new()));
        assert!(plan.desired.is_empty());
        assert_eq!(plan.kept, BTreeMap::from([(key(4), "c".to_string())]));
        assert_eq!(plan.refused.len(), 2);
    }

    #[test]
    fn key_file_is_created_0600_and_reloaded() {
        let dir = std::env::temp_dir().join(format!("veil-key-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let k1 = load_or_create_key(&dir).unwrap();
        let path = dir.join("wireguard.key");
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let k2 = load_or_create_key(&dir).unwrap();
        assert_eq!(k1.public_key(), k2.public_key());
        // A loosened file is tightened back.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        load_or_create_key(&dir).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // Garbage is an error naming the file, never a silently new key.
        std::fs::write(&path, "not a key").unwrap();
        let e = load_or_create_key(&dir).unwrap_err().to_string();
        assert!(e.contains("wireguard.key"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
