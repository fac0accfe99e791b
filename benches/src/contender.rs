//! The four contenders, client beside node-a → server beside node-b: plaintext (the `client`
//! and `server` pods of a lab with `encryption: off`, pod CIDRs routed over the underlay),
//! veil's userspace backend (the same pods in a lab with encryption on), and two reference
//! userspace WireGuards, boringtun-cli 0.7.1 and wireguard-go, each running in the node
//! namespaces of the plaintext lab, configured with `wg set`, between two endpoint namespaces of
//! its own (see [`RefSpec`]). Each run is checked against its path's byte counters, and the
//! tunnels' UDP sockets are given the same buffers (`sockets`).

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

use crate::{
    cleanup,
    lab::{ip_in, Lab},
    procs,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Contender {
    Plaintext,
    Veil,
    Boringtun,
    WireguardGo,
    /// veil-wg stand-alone, configured like the references (wg-peers-bench; not in [`Self::ALL`]).
    VeilWg,
}

impl Contender {
    pub const ALL: [Contender; 4] = [
        Contender::Plaintext,
        Contender::Veil,
        Contender::Boringtun,
        Contender::WireguardGo,
    ];

    pub fn key(self) -> &'static str {
        match self {
            Contender::Plaintext => "plaintext",
            Contender::Veil => "veil",
            Contender::Boringtun => "boringtun-cli",
            Contender::WireguardGo => "wireguard-go",
            Contender::VeilWg => "veil-wg",
        }
    }

    /// How a reference WireGuard runs beside the plaintext lab; None for plaintext and veil.
    pub fn reference(self) -> Option<&'static RefSpec> {
        match self {
            Contender::Boringtun => Some(&BORINGTUN),
            Contender::WireguardGo => Some(&WIREGUARD_GO),
            Contender::VeilWg => Some(&VEIL_WG),
            Contender::Plaintext | Contender::Veil => None,
        }
    }
}

pub const CLIENT: &str = "client";
pub const SERVER: &str = "server";
const NODE_A: &str = "node-a";
const NODE_B: &str = "node-b";

/// A reference WireGuard's place beside the plaintext lab: its listen port, interface name
/// suffix, and two endpoint namespaces, one beside each node, joined to it by a veth (no veil
/// program on it). Not lab pods: veil's datapath in the plaintext lab tracks connections only
/// on the ways it knows (a pod, the underlay, its own tunnel), so a SYN that reached a pod out
/// of a reference tunnel's TUN left no conntrack entry and the pod's SYN-ACK was dropped
/// `tcp-not-established` (since 22e2539): boringtun-cli carried no TCP at all. Both references
/// run at once, so each has its own port, namespaces, addresses (unused node numbers of the
/// lab's 198.19.N.0/24 pod ranges) and node-side veth.
pub struct RefSpec {
    port: u16,
    /// Interface `<lab>-<suffix><i>` on node i; endpoint namespaces `vb<suffix>-client` and
    /// `vb<suffix>-server`; the node side of an endpoint's veth `vb<suffix>0`.
    suffix: &'static str,
    /// The client end is 198.19.`net`.10 in 198.19.`net`.0/24, the server end the next /24.
    net: u8,
}

const BORINGTUN: RefSpec = RefSpec {
    port: 51830,
    suffix: "bt",
    net: 201,
};
const WIREGUARD_GO: RefSpec = RefSpec {
    port: 51831,
    suffix: "wg",
    net: 203,
};
const VEIL_WG: RefSpec = RefSpec {
    port: 51832,
    suffix: "vw",
    net: 205,
};

impl RefSpec {
    /// End `i` (0 client, 1 server): its netns, its address, and the /24 routed to it.
    fn end(&self, i: usize) -> (String, String, String) {
        let net = u16::from(self.net) + i as u16;
        (
            format!("vb{}-{}", self.suffix, [CLIENT, SERVER][i]),
            format!("198.19.{net}.10"),
            format!("198.19.{net}.0/24"),
        )
    }

    fn host_veth(&self) -> String {
        format!("vb{}0", self.suffix)
    }
}

/// An endpoint's gateway, on the node side of its veth (like the lab's pod gateway).
const ENDPOINT_GATEWAY: &str = "169.254.1.1";

/// Where a contender's client and server run.
pub enum Ends<'a> {
    /// The lab's `client` and `server` pods (`veil lab exec`).
    Pods(&'a Lab),
    /// A reference WireGuard's endpoint namespaces (`ip netns exec`).
    Netns {
        client: String,
        server: String,
        server_ip: String,
    },
}

impl Ends<'_> {
    /// A command in the client (`server == false`) or server end, not started.
    pub fn command(&self, server: bool, argv: &[&str]) -> Command {
        match self {
            Ends::Pods(lab) => lab.exec_cmd(if server { SERVER } else { CLIENT }, argv),
            Ends::Netns {
                client, server: s, ..
            } => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", if server { s } else { client }])
                    .args(argv);
                c
            }
        }
    }

    /// Runs a command in the client to completion; its stdout.
    pub fn client_output(&self, argv: &[&str]) -> anyhow::Result<String> {
        let out = crate::lab::run(self.command(false, argv).stdin(Stdio::null()))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Starts a long-running command in the server end (killed by cleanup or lab down).
    pub fn spawn_server(&self, argv: &[&str]) -> anyhow::Result<Child> {
        let mut cmd = self.command(true, argv);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        cleanup::spawn(&mut cmd)
    }

    /// Segments the server end's TCP received out of order so far (`TcpExtTCPOFOQueue`): a
    /// tunnel that reorders makes the sender retransmit what was not lost.
    pub fn server_out_of_order(&self) -> anyhow::Result<u64> {
        let mut cmd = self.command(true, &["nstat", "-asz", "TcpExtTCPOFOQueue"]);
        let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| {
                let mut f = l.split_whitespace();
                (f.next() == Some("TcpExtTCPOFOQueue")).then(|| f.next()?.parse().ok())?
            })
            .context("nstat: no TcpExtTCPOFOQueue")
    }

    pub fn server_ip(&self) -> anyhow::Result<String> {
        match self {
            Ends::Pods(lab) => Ok(lab.pod(SERVER)?.ip.clone()),
            Ends::Netns { server_ip, .. } => Ok(server_ip.clone()),
        }
    }
}

/// A reference WireGuard on both nodes of the plaintext lab.
pub struct RefTunnel {
    pub contender: Contender,
    spec: &'static RefSpec,
    /// (node netns, interface, child) per node.
    ends: Vec<(String, String, Child)>,
}

impl RefTunnel {
    pub fn pids(&self) -> Vec<u32> {
        self.ends.iter().map(|(_, _, c)| c.id()).collect()
    }

    /// (node netns, interface) per node, node-a (client side) first.
    pub fn interfaces(&self) -> Vec<(String, String)> {
        self.ends
            .iter()
            .map(|(n, i, _)| (n.clone(), i.clone()))
            .collect()
    }

    /// Its client and server ends.
    pub fn endpoints(&self) -> Ends<'static> {
        let (server, server_ip, _) = self.spec.end(1);
        Ends::Netns {
            client: self.spec.end(0).0,
            server,
            server_ip,
        }
    }

    pub fn stop(self) {
        for (_, iface, child) in self.ends {
            cleanup::stop(child);
            let _ = std::fs::remove_file(format!("/var/run/wireguard/{iface}.sock"));
        }
        for i in 0..2 {
            let (ns, _, _) = self.spec.end(i);
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        }
    }
}

fn wg_genkey() -> anyhow::Result<(String, String)> {
    let out = Command::new("wg")
        .arg("genkey")
        .output()
        .context("wg genkey")?;
    let private = String::from_utf8(out.stdout)?.trim().to_string();
    let mut child = Command::new("wg")
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    use std::io::Write as _;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(private.as_bytes())?;
    let out = child.wait_with_output()?;
    Ok((private, String::from_utf8(out.stdout)?.trim().to_string()))
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// An endpoint namespace joined to `node_netns` by a veth of `mtu` (node side `host_veth`),
/// reachable at `addr`.
fn add_endpoint(
    ns: &str,
    addr: &str,
    host_veth: &str,
    node_netns: &str,
    mtu: &str,
) -> anyhow::Result<()> {
    // A namespace of this name left by a run killed with SIGKILL goes first.
    let _ = Command::new("ip")
        .args(["netns", "del", ns])
        .stderr(Stdio::null())
        .status();
    ip(&["netns", "add", ns])?;
    cleanup::register_netns(ns);
    ip(&[
        "link", "add", "eth0", "mtu", mtu, "netns", ns, "type", "veth", "peer", "name", host_veth,
        "mtu", mtu, "netns", node_netns,
    ])?;
    for a in [
        &["link", "set", "lo", "up"][..],
        &["addr", "add", &format!("{addr}/32"), "dev", "eth0"],
        &["link", "set", "eth0", "up"],
        &[
            "route",
            "add",
            ENDPOINT_GATEWAY,
            "dev",
            "eth0",
            "scope",
            "link",
        ],
        &[
            "route",
            "add",
            "default",
            "via",
            ENDPOINT_GATEWAY,
            "dev",
            "eth0",
            "src",
            addr,
        ],
    ] {
        ip(&[&["-n", ns][..], a].concat())?;
    }
    for a in [
        &[
            "addr",
            "add",
            &format!("{ENDPOINT_GATEWAY}/32"),
            "dev",
            host_veth,
        ][..],
        &["link", "set", host_veth, "up"],
        &[
            "route",
            "add",
            &format!("{addr}/32"),
            "dev",
            host_veth,
            "src",
            ENDPOINT_GATEWAY,
        ],
    ] {
        ip(&[&["-n", node_netns][..], a].concat())?;
    }
    Ok(())
}

/// Starts a reference WireGuard (`contender`, from `binary`) in both node netns of `lab`,
/// configured like a 2-node mesh, carrying traffic between its two endpoint namespaces.
pub fn start_reference(
    lab: &Lab,
    contender: Contender,
    binary: &Path,
    state: &Path,
) -> anyhow::Result<RefTunnel> {
    let spec = contender
        .reference()
        .with_context(|| format!("{} is not a reference WireGuard", contender.key()))?;
    let nodes = [lab.node(NODE_A)?.clone(), lab.node(NODE_B)?.clone()];
    let mtu = lab.view.pod_mtu.to_string();
    let keys = [wg_genkey()?, wg_genkey()?];
    let mut ends = vec![];
    for (i, n) in nodes.iter().enumerate() {
        // UAPI sockets live in a host-wide directory: the name carries the lab name.
        let iface = format!("{}-{}{}", lab.name(), spec.suffix, i);
        let sock = PathBuf::from(format!("/var/run/wireguard/{iface}.sock"));
        cleanup::register_file(&sock);
        let log = state.join(format!("{iface}.log"));
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &n.netns]).arg(binary);
        match contender {
            // In the foreground boringtun-cli logs only with `--log`.
            Contender::Boringtun => {
                cmd.args(["--foreground", "--disable-drop-privileges", "--log"])
                    .arg(&log)
                    .stdout(Stdio::null());
            }
            Contender::VeilWg => {
                cmd.arg("--foreground").stdout(Stdio::null());
            }
            // wireguard-go in the foreground logs to stdout.
            _ => {
                cmd.arg("-f")
                    .env("WG_PROCESS_FOREGROUND", "1")
                    .stdout(std::fs::File::create(&log)?);
                cleanup::register_file(&log);
            }
        }
        cmd.arg(&iface).stdin(Stdio::null()).stderr(Stdio::null());
        let child = cleanup::spawn(&mut cmd)?;
        ends.push((n.netns.clone(), iface, child));
    }
    let bt = RefTunnel {
        contender,
        spec,
        ends,
    };
    for (i, (netns, iface, _)) in bt.ends.iter().enumerate() {
        let sock = PathBuf::from(format!("/var/run/wireguard/{iface}.sock"));
        let start = Instant::now();
        while !sock.exists() {
            if start.elapsed() > Duration::from_secs(10) {
                bail!(
                    "{} {iface} did not create {}",
                    contender.key(),
                    sock.display()
                );
            }
            // Poll interval of the wait for the UAPI socket.
            std::thread::sleep(Duration::from_millis(50));
        }
        let other = &nodes[1 - i];
        let keyfile = state.join(format!("{iface}.key"));
        std::fs::write(&keyfile, &keys[i].0)?;
        cleanup::register_file(&keyfile);
        let status = Command::new("ip")
            .args(["netns", "exec", netns, "wg", "set", iface, "private-key"])
            .arg(&keyfile)
            .args([
                "listen-port",
                &spec.port.to_string(),
                "peer",
                &keys[1 - i].1,
            ])
            .args([
                "endpoint",
                &format!("{}:{}", other.underlay_ip, spec.port),
                "allowed-ips",
                &spec.end(1 - i).2,
            ])
            .status()?;
        if !status.success() {
            bail!("wg set {iface} failed");
        }
        ip_in(netns, &["link", "set", iface, "mtu", &mtu, "up"])?;
        let (ns, addr, _) = spec.end(i);
        add_endpoint(&ns, &addr, &spec.host_veth(), netns, &mtu)?;
        ip_in(
            netns,
            &["route", "replace", &spec.end(1 - i).2, "dev", iface],
        )?;
    }
    Ok(bt)
}

/// A contender's path, by byte counters at both nodes: the tunnel device's (`wg show <dev>
/// transfer`, summed over peers) or, for plaintext, the underlay interface's.
pub enum PathCounters {
    /// (node netns, WireGuard interface): client side, server side.
    Tunnel([(String, String); 2]),
    /// (node netns, underlay interface): client side, server side.
    Underlay([(String, String); 2]),
}

/// A path's byte counters at both ends: what each end's device sent and received.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PathBytes {
    pub client_tx: u64,
    pub client_rx: u64,
    pub server_tx: u64,
    pub server_rx: u64,
}

impl std::ops::Sub for PathBytes {
    type Output = PathBytes;
    fn sub(self, o: PathBytes) -> PathBytes {
        PathBytes {
            client_tx: self.client_tx.saturating_sub(o.client_tx),
            client_rx: self.client_rx.saturating_sub(o.client_rx),
            server_tx: self.server_tx.saturating_sub(o.server_tx),
            server_rx: self.server_rx.saturating_sub(o.server_rx),
        }
    }
}

impl PathCounters {
    pub fn read(&self) -> anyhow::Result<PathBytes> {
        let ((crx, ctx), (srx, stx)) = match self {
            PathCounters::Tunnel([a, b]) => (wg_transfer(&a.0, &a.1)?, wg_transfer(&b.0, &b.1)?),
            PathCounters::Underlay([a, b]) => (link_bytes(&a.0, &a.1)?, link_bytes(&b.0, &b.1)?),
        };
        Ok(PathBytes {
            client_tx: ctx,
            client_rx: crx,
            server_tx: stx,
            server_rx: srx,
        })
    }

    /// Packets the client node's stack could not queue to the path's device (`tx dropped`):
    /// for a TUN, the tunnel process did not read them in time.
    pub fn client_tx_dropped(&self) -> anyhow::Result<u64> {
        let (PathCounters::Tunnel([a, _]) | PathCounters::Underlay([a, _])) = self;
        Ok(link_stats(&a.0, &a.1)?.tx_dropped)
    }

    pub fn describe(&self) -> String {
        match self {
            PathCounters::Tunnel([a, b]) => format!("wg show {} / {} transfer", a.1, b.1),
            PathCounters::Underlay([a, b]) => {
                format!("{} of {} / {} of {}", a.1, a.0, b.1, b.0)
            }
        }
    }
}

/// (rx, tx) bytes of a WireGuard device, summed over its peers (`wg show <dev> transfer`).
pub fn wg_transfer(netns: &str, iface: &str) -> anyhow::Result<(u64, u64)> {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "wg", "show", iface, "transfer"])
        .output()
        .context("running wg show")?;
    if !out.status.success() {
        bail!(
            "wg show {iface} transfer in {netns}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut sum = (0, 0);
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let f: Vec<&str> = line.split('\t').collect();
        if let [_, rx, tx] = f[..] {
            sum.0 += rx.parse::<u64>()?;
            sum.1 += tx.parse::<u64>()?;
        }
    }
    Ok(sum)
}

struct LinkStats {
    rx_bytes: u64,
    tx_bytes: u64,
    tx_dropped: u64,
}

/// An interface's counters (`ip -j -s link show`).
fn link_stats(netns: &str, iface: &str) -> anyhow::Result<LinkStats> {
    let out = Command::new("ip")
        .args(["-n", netns, "-j", "-s", "link", "show", iface])
        .output()
        .context("running ip -s link")?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("ip -j -s link show {iface} in {netns}"))?;
    let stats = &v[0]["stats64"];
    match (
        stats["rx"]["bytes"].as_u64(),
        stats["tx"]["bytes"].as_u64(),
        stats["tx"]["dropped"].as_u64(),
    ) {
        (Some(rx_bytes), Some(tx_bytes), Some(tx_dropped)) => Ok(LinkStats {
            rx_bytes,
            tx_bytes,
            tx_dropped,
        }),
        _ => bail!("no counters for {iface} in {netns}"),
    }
}

/// (rx, tx) bytes of an interface.
fn link_bytes(netns: &str, iface: &str) -> anyhow::Result<(u64, u64)> {
    let s = link_stats(netns, iface)?;
    Ok((s.rx_bytes, s.tx_bytes))
}

/// UDP datagrams dropped for a full socket receive buffer in a netns (`RcvbufErrors` of
/// /proc/net/snmp), the drops behind boringtun-cli's retransmits with default buffers.
pub fn udp_rcvbuf_errors(netns: &str) -> anyhow::Result<u64> {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "cat", "/proc/net/snmp"])
        .output()
        .context("reading /proc/net/snmp")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut udp = text.lines().filter(|l| l.starts_with("Udp: "));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        bail!("no Udp lines in /proc/net/snmp of {netns}");
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .context("no RcvbufErrors in /proc/net/snmp")
}

/// The node netns of a lab, node-a (client side) first.
pub fn node_netns(lab: &Lab) -> anyhow::Result<[String; 2]> {
    Ok([
        lab.node(NODE_A)?.netns.clone(),
        lab.node(NODE_B)?.netns.clone(),
    ])
}

/// Counters of veil's tunnel devices in an encrypted lab.
pub fn veil_counters(lab: &Lab) -> anyhow::Result<PathCounters> {
    let dev = |node: &str| -> anyhow::Result<(String, String)> {
        let n = lab.node(node)?;
        Ok((n.netns.clone(), n.wg_interface.clone()))
    };
    Ok(PathCounters::Tunnel([dev(NODE_A)?, dev(NODE_B)?]))
}

/// Counters of the underlay interfaces of a lab (the plaintext path).
pub fn underlay_counters(lab: &Lab) -> anyhow::Result<PathCounters> {
    let [a, b] = node_netns(lab)?;
    Ok(PathCounters::Underlay([
        (a, "ul0".into()),
        (b, "ul0".into()),
    ]))
}

/// Counters of a reference WireGuard's devices.
pub fn reference_counters(bt: &RefTunnel) -> PathCounters {
    let i = bt.interfaces();
    PathCounters::Tunnel([i[0].clone(), i[1].clone()])
}

/// The veil-wg processes of both nodes of an encrypted lab.
pub fn veil_wg_pids(lab: &Lab) -> anyhow::Result<Vec<u32>> {
    [NODE_A, NODE_B]
        .iter()
        .map(|node| {
            let st = lab.status(node)?;
            let n = lab.node(node)?;
            let iface = if st.interface.is_empty() {
                n.wg_interface.clone()
            } else {
                st.interface.clone()
            };
            procs::find_veil_wg(&n.netns, &iface)
                .with_context(|| format!("no veil-wg for {iface} in {}", n.netns))
        })
        .collect()
}

/// The agents of both nodes (pids from `veil status`).
pub fn agent_pids(lab: &Lab) -> anyhow::Result<Vec<u32>> {
    [NODE_A, NODE_B]
        .iter()
        .map(|node| {
            Some(lab.status(node)?.agent.pid)
                .filter(|&p| p != 0)
                .with_context(|| format!("veil status: no agent pid for {node}"))
        })
        .collect()
}

/// Sends a few pings client → server until one answers (handshakes done, routes warm).
pub fn warm_path(ends: &Ends<'_>) -> anyhow::Result<()> {
    let server_ip = ends.server_ip()?;
    let start = Instant::now();
    loop {
        let ping = ["ping", "-c", "1", "-W", "1", "-q", &server_ip];
        if veil_agent::sys::succeeds(&mut ends.command(false, &ping)) {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(20) {
            bail!("the client cannot reach the server {server_ip}");
        }
        // Pause between ping attempts (each waits up to 1 s itself).
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_tunnels_keep_their_own_namespaces_addresses_and_ports() {
        let end = |s: &RefSpec, i| {
            let (n, a, r) = s.end(i);
            format!("{n} {a} {r}")
        };
        assert_eq!(
            end(&BORINGTUN, 0),
            "vbbt-client 198.19.201.10 198.19.201.0/24"
        );
        assert_eq!(
            end(&BORINGTUN, 1),
            "vbbt-server 198.19.202.10 198.19.202.0/24"
        );
        assert_eq!(
            end(&WIREGUARD_GO, 1),
            "vbwg-server 198.19.204.10 198.19.204.0/24"
        );
        assert_eq!(WIREGUARD_GO.host_veth(), "vbwg0");
        // All three run beside one plaintext lab at once: nothing may be shared.
        let specs = [&BORINGTUN, &WIREGUARD_GO, &VEIL_WG];
        let mut seen = std::collections::BTreeSet::new();
        for s in specs {
            for i in 0..2 {
                let (n, a, r) = s.end(i);
                for x in [n, a, r] {
                    assert!(seen.insert(x.clone()), "{x} is used twice");
                }
            }
            assert!(seen.insert(s.host_veth()));
            assert!(seen.insert(s.port.to_string()));
        }
    }
}
