//! The three contenders on the same pod-to-pod path (client on node-a → server on node-b):
//! plaintext (a lab with `encryption: off`, pod CIDRs routed over the underlay), veil's userspace
//! backend (a lab with encryption on), and boringtun-cli 0.7.1 running in the node namespaces
//! of the plaintext lab, configured with `wg set`, with the pod CIDR routes pointed at it.

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
}

impl Contender {
    pub const ALL: [Contender; 3] = [Contender::Plaintext, Contender::Veil, Contender::Boringtun];

    pub fn key(self) -> &'static str {
        match self {
            Contender::Plaintext => "plaintext",
            Contender::Veil => "veil",
            Contender::Boringtun => "boringtun-cli",
        }
    }
}

pub const CLIENT: &str = "client";
pub const SERVER: &str = "server";
const NODE_A: &str = "node-a";
const NODE_B: &str = "node-b";
const BT_PORT: u16 = 51830;

/// boringtun-cli on both nodes of the plaintext lab.
pub struct Boringtun {
    /// (node netns, interface, child) per node.
    ends: Vec<(String, String, Child)>,
}

impl Boringtun {
    pub fn pids(&self) -> Vec<u32> {
        self.ends.iter().map(|(_, _, c)| c.id()).collect()
    }

    pub fn interfaces(&self) -> Vec<(String, String)> {
        self.ends
            .iter()
            .map(|(n, i, _)| (n.clone(), i.clone()))
            .collect()
    }

    pub fn stop(self) {
        for (_, iface, child) in self.ends {
            cleanup::stop(child);
            let _ = std::fs::remove_file(format!("/var/run/wireguard/{iface}.sock"));
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

/// Starts boringtun-cli in both node netns of `lab` and configures it like a 2-node mesh.
pub fn start_boringtun(lab: &Lab, binary: &Path, state: &Path) -> anyhow::Result<Boringtun> {
    let nodes = [lab.node(NODE_A)?.clone(), lab.node(NODE_B)?.clone()];
    let mtu = lab.view.pod_mtu.unwrap_or(1440).to_string();
    let keys = [wg_genkey()?, wg_genkey()?];
    let mut ends = vec![];
    for (i, n) in nodes.iter().enumerate() {
        // UAPI sockets live in a host-wide directory: the name carries the lab name.
        let iface = format!("{}-bt{}", lab.name(), i);
        let sock = PathBuf::from(format!("/var/run/wireguard/{iface}.sock"));
        cleanup::register_file(&sock);
        let log = state.join(format!("{iface}.log"));
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &n.netns])
            .arg(binary)
            .args(["--foreground", "--disable-drop-privileges", "--log"])
            .arg(&log)
            .arg(&iface)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cleanup::spawn(&mut cmd)?;
        ends.push((n.netns.clone(), iface, child));
    }
    let bt = Boringtun { ends };
    for (i, (netns, iface, _)) in bt.ends.iter().enumerate() {
        let sock = PathBuf::from(format!("/var/run/wireguard/{iface}.sock"));
        let start = Instant::now();
        while !sock.exists() {
            if start.elapsed() > Duration::from_secs(10) {
                bail!("boringtun-cli {iface} did not create {}", sock.display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let other = &nodes[1 - i];
        let keyfile = state.join(format!("{iface}.key"));
        std::fs::write(&keyfile, &keys[i].0)?;
        cleanup::register_file(&keyfile);
        let status = Command::new("ip")
            .args(["netns", "exec", netns, "wg", "set", iface, "private-key"])
            .arg(&keyfile)
            .args(["listen-port", &BT_PORT.to_string(), "peer", &keys[1 - i].1])
            .args([
                "endpoint",
                &format!("{}:{BT_PORT}", other.underlay_ip),
                "allowed-ips",
                &other.pod_cidr,
            ])
            .status()?;
        if !status.success() {
            bail!("wg set {iface} failed");
        }
        ip_in(netns, &["link", "set", iface, "mtu", &mtu, "up"])?;
    }
    Ok(bt)
}

/// Points the pod CIDR routes of the plaintext lab at the underlay (plaintext) or at
/// boringtun-cli's interfaces.
pub fn route_plain_lab(lab: &Lab, bt: Option<&Boringtun>) -> anyhow::Result<()> {
    let nodes = [lab.node(NODE_A)?.clone(), lab.node(NODE_B)?.clone()];
    for (i, n) in nodes.iter().enumerate() {
        let other = &nodes[1 - i];
        match bt {
            None => ip_in(
                &n.netns,
                &[
                    "route",
                    "replace",
                    &other.pod_cidr,
                    "via",
                    &other.underlay_ip,
                ],
            )?,
            Some(bt) => {
                let iface = &bt.ends[i].1;
                ip_in(
                    &n.netns,
                    &["route", "replace", &other.pod_cidr, "dev", iface],
                )?
            }
        }
    }
    Ok(())
}

/// The veil-wg processes of both nodes of an encrypted lab.
pub fn veil_wg_pids(lab: &Lab) -> anyhow::Result<Vec<u32>> {
    [NODE_A, NODE_B]
        .iter()
        .map(|node| {
            let st = lab.status(node)?;
            let n = lab.node(node)?;
            let iface = if st.interface.is_empty() {
                n.wg_interface.clone().unwrap_or_default()
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
            lab.status(node)?
                .agent
                .map(|a| a.pid)
                .filter(|&p| p != 0)
                .with_context(|| format!("veil status: no agent pid for {node}"))
        })
        .collect()
}

/// Sends a few pings client → server until one answers (handshakes done, routes warm).
pub fn warm_path(lab: &Lab) -> anyhow::Result<()> {
    let server_ip = lab.pod(SERVER)?.ip.clone();
    let start = Instant::now();
    loop {
        let ok = lab
            .exec_cmd(CLIENT, &["ping", "-c", "1", "-W", "1", "-q", &server_ip])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(20) {
            bail!("lab {}: client cannot reach server {server_ip}", lab.name());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
