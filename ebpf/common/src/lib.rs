//! Types shared by veil's eBPF programs and userspace.
//!
//! Owns every map key and value, every ring-buffer event, map and program names, pin layout,
//! verdict and drop-reason codes. Everything here is `#[repr(C)]`, `Copy`, fixed width with
//! explicit padding, and free of `bool`, `usize` and enums, so both sides agree byte for byte.
//!
//! Also the one home of the few pure helpers every userspace crate shares ([`backoff`]), since
//! this is the crate they all depend on.
//!
//! Must not depend on: anything but `core` (and `aya`, for `Pod`, behind the `user` feature).
#![no_std]

pub mod backoff;
pub mod maps;
pub mod reason;

/// Program names as they appear in the object file (the function names in `ebpf/src/main.rs`).
pub mod programs {
    /// TC program on the host side of a pod's veth, ingress: packets leaving the pod.
    pub const FROM_POD: &str = "veil_from_pod";
    /// TC program on the tunnel device, ingress: decrypted packets arriving from peers.
    pub const FROM_TUNNEL: &str = "veil_from_tunnel";
    /// TC program on the node's underlay interface, ingress: plaintext for pod addresses is
    /// dropped (strict mode in the receiving direction).
    pub const FROM_UNDERLAY: &str = "veil_from_underlay";
    /// TC program on the node's underlay interface, egress, attached with node encryption: the
    /// node's traffic to other nodes' addresses goes into the tunnel.
    pub const TO_UNDERLAY: &str = "veil_to_underlay";
    /// TC program on the tunnel device, egress: only packets that came from a local pod (or the
    /// agent's hold device) may carry a local pod's source address into the tunnel.
    pub const TO_TUNNEL: &str = "veil_to_tunnel";
    /// TC program on the agent's hold device, ingress: marks released packets of local pods.
    pub const FROM_HOLD: &str = "veil_from_hold";
    /// TC program on the host side of a pod's veth, egress: packets the node itself sends to
    /// the pod (kubelet probes, host-network processes) are tracked, so the pod's replies pass.
    pub const TO_POD: &str = "veil_to_pod";
    /// cgroup sock_addr programs on the cgroup holding the node's pods: Service load balancing
    /// at the socket (translate on connect/sendmsg, translate back on recvmsg/getpeername).
    pub const SOCK: [&str; 8] = [
        "veil_sock_connect4",
        "veil_sock_sendmsg4",
        "veil_sock_recvmsg4",
        "veil_sock_getpeername4",
        "veil_sock_connect6",
        "veil_sock_sendmsg6",
        "veil_sock_recvmsg6",
        "veil_sock_getpeername6",
    ];
}

/// Bits of `skb->mark` the datapath sets.
pub mod marks {
    /// Set by `veil_from_pod` (after anti-spoofing) and `veil_from_hold` on packets of local
    /// pods; `veil_to_tunnel` admits a local pod source into the tunnel only with it.
    pub const FROM_POD: u32 = 0x0e11_0000;
    /// Set by the TC programs on packets of an L7-proxied connection (conntrack `PROXY`): a
    /// policy routing rule (`fwmark TO_PROXY/MASK lookup` [`PROXY_ROUTE_TABLE`]) delivers them
    /// locally, to the proxy's accepted socket (client to server) or to its upstream socket
    /// (server to client), whatever their destination address.
    pub const TO_PROXY: u32 = 0x0e12_0000;
    /// `SO_MARK` of the L7 proxy's sockets: `veil_to_tunnel` admits a local pod's source
    /// address with it only on a connection conntrack tracks as proxied.
    pub const FROM_PROXY: u32 = 0x0e13_0000;
    /// The routing table holding `local default dev lo` for [`TO_PROXY`] packets, and the rule's
    /// priority (before the main table).
    pub const PROXY_ROUTE_TABLE: u32 = 2004;
    pub const PROXY_RULE_PRIORITY: u32 = 90;
    /// With node encryption, the routes to the other nodes carry the tunnel's MTU; WireGuard's
    /// own datagrams to them (UDP from the listen port) look up this table instead, where the
    /// same routes keep the underlay's MTU, through a rule of this priority.
    pub const UNDERLAY_ROUTE_TABLE: u32 = 2005;
    pub const UNDERLAY_RULE_PRIORITY: u32 = 91;
    /// The bits of `skb->mark` veil owns.
    pub const MASK: u32 = 0xffff_0000;
}

/// Flags in [`maps::DatapathConfig::flags`].
pub mod config_flags {
    /// Pod traffic to remote pod CIDRs is steered into the tunnel device.
    pub const ENCRYPT: u32 = 1 << 0;
    /// A packet for a cluster pod CIDR whose node has no installed peer is dropped (`no-key`).
    pub const STRICT: u32 = 1 << 1;
    /// Node-wide audit mode: would-be policy drops are reported as AUDIT and passed.
    pub const AUDIT: u32 = 1 << 2;
    /// Node traffic encryption (with [`ENCRYPT`]): packets to another node's own address enter
    /// the tunnel too, except WireGuard's datagrams and the control channel.
    pub const NODE_ENCRYPT: u32 = 1 << 3;
}

/// IP protocol numbers (IANA), the one home for the datapath, policy, flows and tests.
pub mod ipproto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMPV6: u8 = 58;
    pub const SCTP: u8 = 132;
}

/// Verdict codes carried in flow events.
pub mod verdict {
    pub const FORWARDED: u8 = 1;
    pub const DROPPED: u8 = 2;
    pub const AUDIT: u8 = 3;
    /// Slots of the per-verdict counter map (codes 0..COUNT; 0 is unused).
    pub const COUNT: u32 = 4;
}
