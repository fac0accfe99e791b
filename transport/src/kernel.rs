//! The kernel backend: WireGuard in the kernel, configured over the generic netlink
//! `wireguard` family (the protocol `wg` speaks to the kernel).
//!
//! Message building and parsing are sans-IO and unit-tested; the socket shell resolves the
//! family (a kernel without WireGuard answers ENOENT, which [`available`] turns into "use the
//! userspace backend"), sends and collects replies.

use std::net::IpAddr;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_generic::{
    ctrl::{nlas::GenlCtrlAttrs, GenlCtrl, GenlCtrlCmd},
    GenlMessage,
};
use netlink_packet_wireguard::{
    WireguardAddressFamily, WireguardAllowedIp, WireguardAllowedIpAttr, WireguardAttribute,
    WireguardCmd, WireguardDeviceFlags, WireguardMessage, WireguardPeer, WireguardPeerAttribute,
    WireguardPeerFlags,
};
use netlink_sys::{protocols::NETLINK_GENERIC, Socket, SocketAddr as NlAddr};

use crate::{
    allowed_ips::IpPrefix,
    tunnel::{Backend, DeviceState, Error, PeerState, Tunnel},
    uapi::{PeerChange, SetRequest},
    PrivateKey, PublicKey,
};

/// The `WG_CMD_SET_DEVICE` message for a UAPI-style set request.
pub fn set_device_message(ifname: &str, req: &SetRequest) -> WireguardMessage {
    let mut attrs = vec![WireguardAttribute::IfName(ifname.to_string())];
    if let Some(k) = &req.private_key {
        attrs.push(WireguardAttribute::PrivateKey(*k.as_bytes()));
    }
    if let Some(p) = req.listen_port {
        attrs.push(WireguardAttribute::ListenPort(p));
    }
    if let Some(m) = req.fwmark {
        attrs.push(WireguardAttribute::Fwmark(m));
    }
    if req.replace_peers {
        attrs.push(WireguardAttribute::Flags(
            WireguardDeviceFlags::ReplacePeers,
        ));
    }
    if !req.peers.is_empty() {
        attrs.push(WireguardAttribute::Peers(
            req.peers.iter().map(peer_attrs).collect(),
        ));
    }
    WireguardMessage {
        cmd: WireguardCmd::SetDevice,
        attributes: attrs,
    }
}

fn peer_attrs(c: &PeerChange) -> WireguardPeer {
    let mut a = vec![WireguardPeerAttribute::PublicKey(*c.public_key.as_bytes())];
    let mut flags = WireguardPeerFlags::empty();
    if c.remove {
        flags |= WireguardPeerFlags::RemoveMe;
    }
    if c.update_only {
        flags |= WireguardPeerFlags::UpdateOnly;
    }
    if c.replace_allowed_ips {
        flags |= WireguardPeerFlags::ReplaceAllowedIps;
    }
    if !flags.is_empty() {
        a.push(WireguardPeerAttribute::Flags(flags));
    }
    if let Some(k) = &c.preshared_key {
        a.push(WireguardPeerAttribute::PresharedKey(*k.as_bytes()));
    }
    if let Some(e) = c.endpoint {
        a.push(WireguardPeerAttribute::Endpoint(e));
    }
    if let Some(k) = c.persistent_keepalive {
        a.push(WireguardPeerAttribute::PersistentKeepalive(k));
    }
    if !c.allowed_ips.is_empty() {
        a.push(WireguardPeerAttribute::AllowedIps(
            c.allowed_ips.iter().map(allowed_ip).collect(),
        ));
    }
    WireguardPeer(a)
}

fn allowed_ip(p: &IpPrefix) -> WireguardAllowedIp {
    let family = if p.addr().is_ipv4() {
        WireguardAddressFamily::Ipv4
    } else {
        WireguardAddressFamily::Ipv6
    };
    WireguardAllowedIp(vec![
        WireguardAllowedIpAttr::Family(family),
        WireguardAllowedIpAttr::IpAddr(p.addr()),
        WireguardAllowedIpAttr::Cidr(p.len()),
    ])
}

/// The `WG_CMD_GET_DEVICE` dump request.
pub fn get_device_message(ifname: &str) -> WireguardMessage {
    WireguardMessage {
        cmd: WireguardCmd::GetDevice,
        attributes: vec![WireguardAttribute::IfName(ifname.to_string())],
    }
}

/// Folds the (possibly several, for many peers) replies of a get into one device state.
pub fn parse_device(replies: &[WireguardMessage]) -> DeviceState {
    let mut st = DeviceState::default();
    for m in replies {
        for a in &m.attributes {
            match a {
                WireguardAttribute::PrivateKey(k) => {
                    st.public_key = Some(PrivateKey::from_bytes(*k).public_key())
                }
                WireguardAttribute::PublicKey(k) => st.public_key = Some(PublicKey(*k)),
                WireguardAttribute::ListenPort(p) => st.listen_port = *p,
                WireguardAttribute::Fwmark(f) => st.fwmark = *f,
                WireguardAttribute::Peers(peers) => {
                    for p in peers {
                        merge_peer(&mut st.peers, p);
                    }
                }
                _ => {}
            }
        }
    }
    st
}

fn merge_peer(peers: &mut Vec<PeerState>, p: &WireguardPeer) {
    let key = p.0.iter().find_map(|a| match a {
        WireguardPeerAttribute::PublicKey(k) => Some(PublicKey(*k)),
        _ => None,
    });
    // A peer with many allowed IPs continues in the next message under the same key.
    let idx = match peers
        .iter()
        .position(|x| x.public_key == key && key.is_some())
    {
        Some(i) => i,
        None => {
            peers.push(PeerState {
                public_key: key,
                ..Default::default()
            });
            peers.len() - 1
        }
    };
    let st = &mut peers[idx];
    for a in &p.0 {
        match a {
            WireguardPeerAttribute::PresharedKey(k) => st.has_preshared_key = *k != [0; 32],
            WireguardPeerAttribute::Endpoint(e) => st.endpoint = Some(*e),
            WireguardPeerAttribute::PersistentKeepalive(k) => {
                st.persistent_keepalive = (*k > 0).then_some(*k)
            }
            WireguardPeerAttribute::LastHandshake(t) => {
                let d = std::time::Duration::new(t.seconds as u64, t.nano_seconds as u32);
                st.last_handshake = (!d.is_zero()).then(|| std::time::UNIX_EPOCH + d);
            }
            WireguardPeerAttribute::RxBytes(n) => st.rx_bytes = *n,
            WireguardPeerAttribute::TxBytes(n) => st.tx_bytes = *n,
            WireguardPeerAttribute::AllowedIps(ips) => {
                for ip in ips {
                    let addr = ip.0.iter().find_map(|x| match x {
                        WireguardAllowedIpAttr::IpAddr(a) => Some(*a),
                        _ => None,
                    });
                    let cidr = ip.0.iter().find_map(|x| match x {
                        WireguardAllowedIpAttr::Cidr(c) => Some(*c),
                        _ => None,
                    });
                    if let (Some(a), Some(c)) = (addr, cidr) {
                        if let Ok(pre) = IpPrefix::new(a, c) {
                            st.allowed_ips.push(pre);
                        }
                    }
                }
            }
            _ => {}
        }
    }
}

/// True when this kernel has WireGuard (the generic netlink family resolves).
pub fn available() -> bool {
    Genl::open()
        .and_then(|mut g| g.resolve_family("wireguard"))
        .is_ok()
}

/// A generic netlink socket.
struct Genl {
    socket: Socket,
    seq: u32,
}

impl Genl {
    fn open() -> Result<Self, Error> {
        let io = |source| Error::Io {
            what: "generic netlink",
            source,
        };
        let mut socket = Socket::new(NETLINK_GENERIC).map_err(io)?;
        socket.bind_auto().map_err(io)?;
        socket.connect(&NlAddr::new(0, 0)).map_err(io)?;
        Ok(Self { socket, seq: 0 })
    }

    fn request<F>(
        &mut self,
        payload: GenlMessage<F>,
        flags: u16,
    ) -> Result<Vec<GenlMessage<F>>, Error>
    where
        F: netlink_packet_generic::GenlFamily
            + netlink_packet_core::Emitable
            + netlink_packet_core::ParseableParametrized<[u8], netlink_packet_generic::GenlHeader>
            + std::fmt::Debug,
    {
        let io = |source| Error::Io {
            what: "generic netlink",
            source,
        };
        self.seq += 1;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut msg = NetlinkMessage::new(header, NetlinkPayload::from(payload));
        msg.finalize();
        let mut buf = vec![0u8; msg.buffer_len()];
        msg.serialize(&mut buf);
        self.socket.send(&buf, 0).map_err(io)?;
        let mut out = Vec::new();
        let mut rbuf = vec![0u8; 1 << 16];
        loop {
            let n = self.socket.recv(&mut &mut rbuf[..], 0).map_err(io)?;
            let mut off = 0;
            while off < n {
                let m = NetlinkMessage::<GenlMessage<F>>::deserialize(&rbuf[off..n])
                    .map_err(|e| Error::Netlink(e.to_string()))?;
                let len = m.header.length as usize;
                match m.payload {
                    NetlinkPayload::InnerMessage(inner) => out.push(inner),
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(out),
                            Some(code) => Err(Error::Io {
                                what: "generic netlink",
                                source: std::io::Error::from_raw_os_error(-code.get()),
                            }),
                        };
                    }
                    _ => {}
                }
                if len == 0 {
                    break;
                }
                off += (len + 3) & !3;
            }
            if flags & NLM_F_DUMP == 0 && flags & NLM_F_ACK == 0 {
                return Ok(out);
            }
        }
    }

    fn resolve_family(&mut self, name: &str) -> Result<u16, Error> {
        let msg = GenlMessage::from_payload(GenlCtrl {
            cmd: GenlCtrlCmd::GetFamily,
            nlas: vec![GenlCtrlAttrs::FamilyName(name.to_string())],
        });
        let replies = self.request(msg, NLM_F_ACK).map_err(|e| match e {
            Error::Io { source, .. } if source.raw_os_error() == Some(libc::ENOENT) => {
                Error::KernelUnavailable
            }
            other => other,
        })?;
        replies
            .iter()
            .flat_map(|r| r.payload.nlas.iter())
            .find_map(|a| match a {
                GenlCtrlAttrs::FamilyId(id) => Some(*id),
                _ => None,
            })
            .ok_or(Error::KernelUnavailable)
    }
}

/// Kernel WireGuard on one interface.
pub struct KernelTunnel {
    ifname: String,
    genl: Genl,
    family: u16,
    existed: bool,
}

impl KernelTunnel {
    /// Opens (creating the `wireguard` link if missing) the interface.
    pub fn open(ifname: &str) -> Result<Self, Error> {
        let mut genl = Genl::open()?;
        let family = genl.resolve_family("wireguard")?;
        let existed = nix::net::if_::if_nametoindex(ifname).is_ok();
        if !existed {
            let out = std::process::Command::new("ip")
                .args(["link", "add", "dev", ifname, "type", "wireguard"])
                .output()
                .map_err(|source| Error::Io {
                    what: "ip link add",
                    source,
                })?;
            if !out.status.success() {
                return Err(Error::Netlink(
                    String::from_utf8_lossy(&out.stderr).trim().to_string(),
                ));
            }
        }
        Ok(Self {
            ifname: ifname.to_string(),
            genl,
            family,
            existed,
        })
    }

    /// Was the interface already there (made by an earlier run, whose peers it still has)?
    pub fn existed(&self) -> bool {
        self.existed
    }
}

impl Tunnel for KernelTunnel {
    fn backend(&self) -> Backend {
        Backend::Kernel
    }

    fn interface(&self) -> &str {
        &self.ifname
    }

    fn apply(&mut self, req: &SetRequest) -> Result<(), Error> {
        let mut m = GenlMessage::from_payload(set_device_message(&self.ifname, req));
        m.set_resolved_family_id(self.family);
        self.genl.request(m, NLM_F_ACK).map(drop)
    }

    fn state(&mut self) -> Result<DeviceState, Error> {
        let mut m = GenlMessage::from_payload(get_device_message(&self.ifname));
        m.set_resolved_family_id(self.family);
        let replies = self.genl.request(m, NLM_F_DUMP)?;
        let msgs: Vec<WireguardMessage> = replies.into_iter().map(|r| r.payload).collect();
        Ok(parse_device(&msgs))
    }
}

/// The IP family of a prefix as the kernel encodes it (exposed for tests).
pub fn family_of(ip: IpAddr) -> u16 {
    if ip.is_ipv4() {
        libc::AF_INET as u16
    } else {
        libc::AF_INET6 as u16
    }
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::{Emitable as _, ParseableParametrized as _};
    use netlink_packet_generic::GenlHeader;

    use super::*;

    fn round_trip(m: &WireguardMessage) -> WireguardMessage {
        let mut buf = vec![0u8; m.buffer_len()];
        m.emit(&mut buf);
        let header = GenlHeader {
            cmd: u8::from(m.cmd),
            version: 1,
        };
        WireguardMessage::parse_with_param(&buf[..], header).unwrap()
    }

    #[test]
    fn set_message_carries_every_field_and_survives_the_wire() {
        let req = crate::uapi::tests::set_with_every_field();
        let m = set_device_message("veil0", &req);
        assert_eq!(m.cmd, WireguardCmd::SetDevice);
        let back = round_trip(&m);
        assert_eq!(back, m);
        assert!(back
            .attributes
            .contains(&WireguardAttribute::IfName("veil0".into())));
        assert!(back
            .attributes
            .contains(&WireguardAttribute::PrivateKey([1; 32])));
        assert!(back
            .attributes
            .contains(&WireguardAttribute::ListenPort(51820)));
        assert!(back.attributes.contains(&WireguardAttribute::Flags(
            WireguardDeviceFlags::ReplacePeers
        )));
        let WireguardAttribute::Peers(peers) = back.attributes.last().unwrap() else {
            panic!()
        };
        assert_eq!(peers.len(), 2);
        assert!(peers[0]
            .0
            .contains(&WireguardPeerAttribute::PresharedKey([3; 32])));
        assert!(peers[0].0.contains(&WireguardPeerAttribute::Flags(
            WireguardPeerFlags::ReplaceAllowedIps
        )));
        assert!(peers[1]
            .0
            .contains(&WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe)));
    }

    #[test]
    fn get_replies_fold_into_device_state() {
        let peer_key = PublicKey([7; 32]);
        let part = |ips: &[&str], extra: Vec<WireguardPeerAttribute>| {
            let mut a = vec![WireguardPeerAttribute::PublicKey(peer_key.0)];
            a.extend(extra);
            a.push(WireguardPeerAttribute::AllowedIps(
                ips.iter()
                    .map(|s| allowed_ip(&s.parse().unwrap()))
                    .collect(),
            ));
            WireguardMessage {
                cmd: WireguardCmd::GetDevice,
                attributes: vec![
                    WireguardAttribute::ListenPort(51820),
                    WireguardAttribute::Peers(vec![WireguardPeer(a)]),
                ],
            }
        };
        let replies = vec![
            round_trip(&part(
                &["198.19.2.0/24"],
                vec![
                    WireguardPeerAttribute::RxBytes(5),
                    WireguardPeerAttribute::TxBytes(6),
                ],
            )),
            round_trip(&part(&["198.19.3.0/24"], vec![])),
        ];
        let st = parse_device(&replies);
        assert_eq!(st.listen_port, 51820);
        assert_eq!(st.peers.len(), 1, "continuation merges into one peer");
        assert_eq!(st.peers[0].allowed_ips.len(), 2);
        assert_eq!((st.peers[0].rx_bytes, st.peers[0].tx_bytes), (5, 6));
    }

    #[test]
    fn this_kernel_reports_whether_it_has_wireguard() {
        // Either answer is fine; the call must not hang or panic, and it must agree with the
        // presence of the module's sysfs entry.
        let has = available();
        let module = std::path::Path::new("/sys/module/wireguard").exists();
        assert_eq!(
            has, module,
            "genl family presence disagrees with /sys/module/wireguard"
        );
    }
}
