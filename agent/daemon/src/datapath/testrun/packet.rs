//! Packet builders for datapath test runs: Ethernet frames and bare IP packets (IPv4 and IPv6)
//! carrying TCP, UDP, ICMP/ICMPv6 or any other protocol, with correct lengths and checksums,
//! IP fragments, and truncation.
//!
//! Sans-IO: values in, bytes out. The programs never verify checksums; they are right anyway
//! so a captured test packet reads cleanly in a dissector.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub use veil_common::ipproto::{
    ICMP as IPPROTO_ICMP, ICMPV6 as IPPROTO_ICMPV6, TCP as IPPROTO_TCP, UDP as IPPROTO_UDP,
};
/// IPv6 fragment extension header.
pub const IPPROTO_FRAGMENT: u8 = 44;

/// TCP flag bits.
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
}

/// ICMP (v4) and ICMPv6 message types used by the tests.
pub mod icmp_type {
    pub const ECHO_REPLY: u8 = 0;
    pub const DEST_UNREACH: u8 = 3;
    pub const ECHO_REQUEST: u8 = 8;
    pub const V6_DEST_UNREACH: u8 = 1;
    pub const V6_ECHO_REQUEST: u8 = 128;
    pub const V6_ECHO_REPLY: u8 = 129;
    pub const V6_NEIGHBOR_SOLICIT: u8 = 135;
}

/// Source and destination MAC of built frames (locally administered).
pub const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// The transport part of a packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    /// ICMP on IPv4, ICMPv6 on IPv6 (the caller picks family-appropriate types). `rest` is the
    /// second header word: identifier and sequence for echo, unused/MTU for errors.
    Icmp {
        kind: u8,
        code: u8,
        rest: [u8; 4],
    },
    /// Any other protocol: no transport header is built, the payload follows the IP header.
    Other {
        protocol: u8,
    },
}

impl L4 {
    pub fn protocol(&self, is_v6: bool) -> u8 {
        match self {
            L4::Tcp { .. } => IPPROTO_TCP,
            L4::Udp { .. } => IPPROTO_UDP,
            L4::Icmp { .. } if is_v6 => IPPROTO_ICMPV6,
            L4::Icmp { .. } => IPPROTO_ICMP,
            L4::Other { protocol } => *protocol,
        }
    }
}

/// Where in its datagram a packet sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fragment {
    /// A whole datagram.
    None,
    /// The first fragment: offset 0, more fragments follow; carries the transport header.
    First { id: u32 },
    /// A later fragment at `offset` (in 8-byte units, > 0): payload bytes only, no transport
    /// header.
    Later { id: u32, offset: u16, is_last: bool },
}

/// One IP packet, built into bytes by [`Packet::ip`] (bare, as on a TUN device) or
/// [`Packet::frame`] (Ethernet, as on a veth).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub l4: L4,
    pub payload: Vec<u8>,
    pub fragment: Fragment,
    /// IPv4 options (a multiple of 4 bytes, at most 40); ignored for IPv6.
    pub ipv4_options: Vec<u8>,
    pub ttl: u8,
}

impl Packet {
    fn new(src: IpAddr, dst: IpAddr, l4: L4) -> Self {
        assert_eq!(
            src.is_ipv6(),
            dst.is_ipv6(),
            "source and destination must be the same family"
        );
        Self {
            src,
            dst,
            l4,
            payload: Vec::new(),
            fragment: Fragment::None,
            ipv4_options: Vec::new(),
            ttl: 64,
        }
    }

    /// A TCP SYN.
    pub fn tcp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> Self {
        Self::new(
            src,
            dst,
            L4::Tcp {
                sport,
                dport,
                flags: tcp_flags::SYN,
            },
        )
    }

    pub fn udp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> Self {
        Self::new(src, dst, L4::Udp { sport, dport })
    }

    /// An echo request (ICMP type 8, or ICMPv6 type 128) with identifier `id`.
    pub fn icmp_echo(src: IpAddr, dst: IpAddr, id: u16) -> Self {
        let kind = if src.is_ipv6() {
            icmp_type::V6_ECHO_REQUEST
        } else {
            icmp_type::ECHO_REQUEST
        };
        let [a, b] = id.to_be_bytes();
        Self::new(
            src,
            dst,
            L4::Icmp {
                kind,
                code: 0,
                rest: [a, b, 0, 1],
            },
        )
    }

    /// Any ICMP/ICMPv6 message (type and code as given, second word zero).
    pub fn icmp(src: IpAddr, dst: IpAddr, kind: u8, code: u8) -> Self {
        Self::new(
            src,
            dst,
            L4::Icmp {
                kind,
                code,
                rest: [0; 4],
            },
        )
    }

    /// A packet of another IP protocol (no transport header).
    pub fn other(src: IpAddr, dst: IpAddr, protocol: u8) -> Self {
        Self::new(src, dst, L4::Other { protocol })
    }

    /// `len` payload bytes (a repeating pattern).
    pub fn with_payload(mut self, len: usize) -> Self {
        self.payload = (0..len).map(|i| i as u8).collect();
        self
    }

    pub fn with_tcp_flags(mut self, f: u8) -> Self {
        if let L4::Tcp { flags, .. } = &mut self.l4 {
            *flags = f;
        }
        self
    }

    pub fn with_ipv4_options(mut self, options: Vec<u8>) -> Self {
        assert!(options.len().is_multiple_of(4) && options.len() <= 40);
        self.ipv4_options = options;
        self
    }

    pub fn first_fragment(mut self, id: u32) -> Self {
        self.fragment = Fragment::First { id };
        self
    }

    /// The same datagram's fragment at `offset` 8-byte units (the transport header is gone).
    pub fn later_fragment(mut self, id: u32, offset: u16, is_last: bool) -> Self {
        assert!(offset > 0, "a later fragment has a non-zero offset");
        self.fragment = Fragment::Later {
            id,
            offset,
            is_last,
        };
        self
    }

    /// The reply direction: addresses and ports swapped, echo request → reply, SYN → SYN|ACK.
    pub fn reply(&self) -> Self {
        let l4 = match &self.l4 {
            L4::Tcp { sport, dport, .. } => L4::Tcp {
                sport: *dport,
                dport: *sport,
                flags: tcp_flags::SYN | tcp_flags::ACK,
            },
            L4::Udp { sport, dport } => L4::Udp {
                sport: *dport,
                dport: *sport,
            },
            L4::Icmp { kind, code, rest } => L4::Icmp {
                kind: match *kind {
                    icmp_type::ECHO_REQUEST => icmp_type::ECHO_REPLY,
                    icmp_type::V6_ECHO_REQUEST => icmp_type::V6_ECHO_REPLY,
                    k => k,
                },
                code: *code,
                rest: *rest,
            },
            other => other.clone(),
        };
        Self {
            src: self.dst,
            dst: self.src,
            l4,
            payload: self.payload.clone(),
            fragment: Fragment::None,
            ipv4_options: Vec::new(),
            ttl: 64,
        }
    }

    pub fn is_v6(&self) -> bool {
        self.src.is_ipv6()
    }

    pub fn protocol(&self) -> u8 {
        self.l4.protocol(self.is_v6())
    }

    /// The Ethernet frame (veth side).
    pub fn frame(&self) -> Vec<u8> {
        let ethertype = if self.is_v6() { ETH_P_IPV6 } else { ETH_P_IP };
        ethernet(ethertype, &self.ip())
    }

    /// The bare IP packet (TUN side).
    pub fn ip(&self) -> Vec<u8> {
        let l4 = if matches!(self.fragment, Fragment::Later { .. }) {
            self.payload.clone()
        } else {
            self.transport()
        };
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => self.ipv4(s, d, &l4),
            (IpAddr::V6(s), IpAddr::V6(d)) => self.ipv6(s, d, &l4),
            _ => unreachable!("families checked in the constructor"),
        }
    }

    /// The transport header and payload, checksummed over the whole (unfragmented) segment.
    fn transport(&self) -> Vec<u8> {
        let protocol = self.protocol();
        let mut seg = match &self.l4 {
            L4::Tcp {
                sport,
                dport,
                flags,
            } => {
                let mut h = Vec::with_capacity(20);
                h.extend(sport.to_be_bytes());
                h.extend(dport.to_be_bytes());
                h.extend(1u32.to_be_bytes()); // sequence
                let ack = if flags & tcp_flags::ACK != 0 { 1u32 } else { 0 };
                h.extend(ack.to_be_bytes());
                h.push(5 << 4); // data offset: 5 words, no options
                h.push(*flags);
                h.extend(64240u16.to_be_bytes()); // window
                h.extend([0, 0, 0, 0]); // checksum, urgent pointer
                h
            }
            L4::Udp { sport, dport } => {
                let len = u16::try_from(8 + self.payload.len()).expect("udp length fits");
                let mut h = Vec::with_capacity(8);
                h.extend(sport.to_be_bytes());
                h.extend(dport.to_be_bytes());
                h.extend(len.to_be_bytes());
                h.extend([0, 0]);
                h
            }
            L4::Icmp { kind, code, rest } => {
                let mut h = vec![*kind, *code, 0, 0];
                h.extend(rest);
                h
            }
            L4::Other { .. } => Vec::new(),
        };
        seg.extend(&self.payload);
        let csum_at = match self.l4 {
            L4::Tcp { .. } => Some(16),
            L4::Udp { .. } => Some(6),
            L4::Icmp { .. } => Some(2),
            L4::Other { .. } => None,
        };
        if let Some(at) = csum_at {
            let pseudo = match (&self.l4, self.src, self.dst) {
                // ICMPv4 has no pseudo-header; TCP, UDP and ICMPv6 do.
                (L4::Icmp { .. }, IpAddr::V4(_), _) => Vec::new(),
                _ => pseudo_header(self.src, self.dst, protocol, seg.len()),
            };
            let mut c = checksum(&[&pseudo, &seg]);
            if c == 0 && matches!(self.l4, L4::Udp { .. }) {
                c = 0xffff;
            }
            seg[at..at + 2].copy_from_slice(&c.to_be_bytes());
        }
        seg
    }

    fn ipv4(&self, src: Ipv4Addr, dst: Ipv4Addr, l4: &[u8]) -> Vec<u8> {
        let ihl = 20 + self.ipv4_options.len();
        let total = u16::try_from(ihl + l4.len()).expect("ipv4 packet fits 64 KiB");
        let (id, frag) = match self.fragment {
            Fragment::None => (0u16, 0x4000u16),           // DF
            Fragment::First { id } => (id as u16, 0x2000), // MF, offset 0
            Fragment::Later {
                id,
                offset,
                is_last,
            } => (
                id as u16,
                (if is_last { 0 } else { 0x2000 }) | (offset & 0x1fff),
            ),
        };
        let mut h = Vec::with_capacity(ihl + l4.len());
        h.push(0x40 | (ihl / 4) as u8);
        h.push(0);
        h.extend(total.to_be_bytes());
        h.extend(id.to_be_bytes());
        h.extend(frag.to_be_bytes());
        h.push(self.ttl);
        h.push(self.protocol());
        h.extend([0, 0]);
        h.extend(src.octets());
        h.extend(dst.octets());
        h.extend(&self.ipv4_options);
        let c = checksum(&[&h]);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h.extend(l4);
        h
    }

    fn ipv6(&self, src: Ipv6Addr, dst: Ipv6Addr, l4: &[u8]) -> Vec<u8> {
        let mut ext = Vec::new();
        let frag = match self.fragment {
            Fragment::None => None,
            Fragment::First { id } => Some((id, 0u16, true)),
            Fragment::Later {
                id,
                offset,
                is_last,
            } => Some((id, offset, !is_last)),
        };
        let next = if let Some((id, offset, more)) = frag {
            ext.push(self.protocol());
            ext.push(0);
            ext.extend(((offset << 3) | u16::from(more)).to_be_bytes());
            ext.extend(id.to_be_bytes());
            IPPROTO_FRAGMENT
        } else {
            self.protocol()
        };
        let payload_len = u16::try_from(ext.len() + l4.len()).expect("ipv6 payload fits");
        let mut h = Vec::with_capacity(40 + ext.len() + l4.len());
        h.extend([0x60, 0, 0, 0]);
        h.extend(payload_len.to_be_bytes());
        h.push(next);
        h.push(self.ttl);
        h.extend(src.octets());
        h.extend(dst.octets());
        h.extend(ext);
        h.extend(l4);
        h
    }
}

/// An Ethernet frame around `payload`.
pub fn ethernet(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(ETH_HLEN + payload.len());
    f.extend(DST_MAC);
    f.extend(SRC_MAC);
    f.extend(ethertype.to_be_bytes());
    f.extend(payload);
    f
}

/// An ARP request (who-has `target` tell `sender`), as a pod sends for its gateway.
pub fn arp_request(sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut a = Vec::with_capacity(28);
    a.extend(1u16.to_be_bytes()); // Ethernet
    a.extend(ETH_P_IP.to_be_bytes());
    a.push(6);
    a.push(4);
    a.extend(1u16.to_be_bytes()); // request
    a.extend(SRC_MAC);
    a.extend(sender.octets());
    a.extend([0; 6]);
    a.extend(target.octets());
    let mut f = ethernet(ETH_P_ARP, &a);
    f[..6].copy_from_slice(&[0xff; 6]);
    f
}

/// The first `len` bytes of `bytes` (the headers after that point are missing).
pub fn truncated(mut bytes: Vec<u8>, len: usize) -> Vec<u8> {
    bytes.truncate(len);
    bytes
}

fn pseudo_header(src: IpAddr, dst: IpAddr, protocol: u8, len: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(40);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            p.extend(s.octets());
            p.extend(d.octets());
            p.push(0);
            p.push(protocol);
            p.extend(u16::try_from(len).expect("segment fits").to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            p.extend(s.octets());
            p.extend(d.octets());
            p.extend(u32::try_from(len).expect("segment fits").to_be_bytes());
            p.extend([0, 0, 0, protocol]);
        }
        _ => unreachable!("families checked in the constructor"),
    }
    p
}

/// The Internet checksum (RFC 1071) over the concatenation of `parts`.
pub fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum = 0u32;
    let mut odd: Option<u8> = None;
    for part in parts {
        for &b in part.iter() {
            match odd.take() {
                Some(hi) => sum += u32::from(u16::from_be_bytes([hi, b])),
                None => odd = Some(b),
            }
        }
    }
    if let Some(hi) = odd {
        sum += u32::from(u16::from_be_bytes([hi, 0]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(a: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(198, 19, 1, a))
    }

    fn v6(a: u16) -> IpAddr {
        IpAddr::V6(Ipv6Addr::new(0xfd00, 0x19, 1, 0, 0, 0, 0, a))
    }

    #[test]
    fn ipv4_tcp_lengths_and_checksums() {
        let p = Packet::tcp(v4(10), v4(20), 40000, 8080).with_payload(10);
        let f = p.frame();
        assert_eq!(f.len(), 14 + 20 + 20 + 10);
        assert_eq!(&f[12..14], &ETH_P_IP.to_be_bytes());
        let ip = &f[14..];
        assert_eq!(ip[0], 0x45);
        assert_eq!(u16::from_be_bytes([ip[2], ip[3]]), 50);
        assert_eq!(ip[9], IPPROTO_TCP);
        assert_eq!(checksum(&[&ip[..20]]), 0, "ip header checksum verifies");
        let pseudo = pseudo_header(v4(10), v4(20), IPPROTO_TCP, 30);
        assert_eq!(checksum(&[&pseudo, &ip[20..]]), 0, "tcp checksum verifies");
        assert_eq!(&ip[20..24], &[0x9c, 0x40, 0x1f, 0x90]);
    }

    #[test]
    fn ipv6_udp_and_icmpv6_checksums() {
        let p = Packet::udp(v6(0x10), v6(0x20), 5353, 53).with_payload(3);
        let ip = p.ip();
        assert_eq!(ip.len(), 40 + 8 + 3);
        assert_eq!(u16::from_be_bytes([ip[4], ip[5]]), 11);
        assert_eq!(ip[6], IPPROTO_UDP);
        let pseudo = pseudo_header(v6(0x10), v6(0x20), IPPROTO_UDP, 11);
        assert_eq!(checksum(&[&pseudo, &ip[40..]]), 0);

        let e = Packet::icmp_echo(v6(0x10), v6(0x20), 0x1234).ip();
        assert_eq!(e[6], IPPROTO_ICMPV6);
        assert_eq!(e[40], icmp_type::V6_ECHO_REQUEST);
        assert_eq!(&e[44..46], &[0x12, 0x34]);
        let pseudo = pseudo_header(v6(0x10), v6(0x20), IPPROTO_ICMPV6, 8);
        assert_eq!(checksum(&[&pseudo, &e[40..]]), 0);
    }

    #[test]
    fn fragments() {
        let p = Packet::udp(v4(10), v4(20), 5000, 53).with_payload(16);
        let first = p.clone().first_fragment(7).ip();
        assert_eq!(u16::from_be_bytes([first[6], first[7]]), 0x2000);
        assert_eq!(first.len(), 20 + 8 + 16);
        let later = p.clone().later_fragment(7, 3, true).ip();
        assert_eq!(u16::from_be_bytes([later[6], later[7]]), 3);
        assert_eq!(later.len(), 20 + 16, "no transport header");

        let p6 = Packet::udp(v6(0x10), v6(0x20), 5000, 53).with_payload(16);
        let later6 = p6.later_fragment(7, 3, false).ip();
        assert_eq!(later6[6], IPPROTO_FRAGMENT);
        assert_eq!(later6[40], IPPROTO_UDP);
        assert_eq!(u16::from_be_bytes([later6[42], later6[43]]), (3 << 3) | 1);
        assert_eq!(later6.len(), 40 + 8 + 16);
    }

    #[test]
    fn reply_swaps_direction() {
        let p = Packet::icmp_echo(v4(10), v4(20), 9);
        let r = p.reply();
        assert_eq!((r.src, r.dst), (p.dst, p.src));
        assert!(matches!(
            r.l4,
            L4::Icmp {
                kind: icmp_type::ECHO_REPLY,
                ..
            }
        ));
        let t = Packet::tcp(v4(10), v4(20), 1, 2).reply();
        assert!(matches!(
            t.l4,
            L4::Tcp {
                sport: 2,
                dport: 1,
                ..
            }
        ));
    }

    #[test]
    fn arp_and_ipv4_options() {
        let a = arp_request(Ipv4Addr::new(198, 19, 1, 10), Ipv4Addr::new(169, 254, 1, 1));
        assert_eq!(a.len(), 14 + 28);
        assert_eq!(&a[12..14], &ETH_P_ARP.to_be_bytes());
        let p = Packet::tcp(v4(10), v4(20), 1, 2)
            .with_ipv4_options(vec![1, 1, 1, 0])
            .ip();
        assert_eq!(p[0], 0x46);
        assert_eq!(checksum(&[&p[..24]]), 0);
    }
}
