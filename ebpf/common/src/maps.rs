//! Map names, keys and values.
//!
//! Userspace never spells a map name as a string literal: it uses the constants here, which are
//! the static names in `ebpf/src/main.rs` (the loader pins each map under that name).

/// Datapath configuration, one entry (index 0). Written by the agent before programs attach.
pub const CONFIG: &str = "VEIL_CONFIG";
/// Per-interface packet counters (per CPU), keyed by ifindex.
pub const IF_STATS: &str = "VEIL_IF_STATS";
/// Drop counters (per CPU), indexed by [`crate::reason`] code.
pub const DROPS: &str = "VEIL_DROPS";
/// IP → identity, node and (for local pods) interface; longest-prefix match so node pod CIDRs
/// and single pod addresses live in one trie.
pub const IPCACHE: &str = "VEIL_IPCACHE";
/// Cluster nodes by node id: whether the node has an installed tunnel peer.
pub const NODES: &str = "VEIL_NODES";

/// Policy, two slots (A/B): the agent fills the idle slot and flips
/// [`DatapathConfig::policy_slot`], so no packet ever sees a half-applied policy set.
pub const POLICY_A: &str = "VEIL_POLICY_A";
pub const POLICY_B: &str = "VEIL_POLICY_B";
/// Connection tracking: replies of an allowed connection pass without a policy lookup.
pub const CT: &str = "VEIL_CT";
/// Authenticated identity pairs (mutual auth), with expiry.
pub const AUTH: &str = "VEIL_AUTH";
/// Flow events (ring buffer of [`FlowEvent`]).
pub const EVENTS: &str = "VEIL_EVENTS";
/// Flow events the datapath could not write because the ring buffer was full (one per-CPU
/// counter): the agent reports them, so a flow log with gaps says so.
pub const EVENTS_LOST: &str = "VEIL_EVENTS_LOST";
/// Per-flow event throttle: last time an event was emitted for a (src, dst, verdict) tuple.
pub const EVENT_THROTTLE: &str = "VEIL_EVENT_THROTTLE";
/// Ports of fragmented datagrams, learned from the first fragment so later fragments (which
/// carry no transport header) are matched to their flow.
pub const FRAGS: &str = "VEIL_FRAGS";
/// Per-verdict packet counters (per CPU), indexed by [`crate::verdict`] code.
pub const VERDICTS: &str = "VEIL_VERDICTS";
/// Service frontends (ClusterIP, port, protocol) → how many backends and how to pick one.
pub const SERVICES: &str = "VEIL_SERVICES";
/// Backends of each frontend, in slots `0..count`.
pub const BACKENDS: &str = "VEIL_BACKENDS";
/// What the socket programs translated, per socket and backend: read back by getpeername,
/// recvmsg (the reply seems to come from the ClusterIP) and flow events (which name the
/// Service). LRU: an entry lives as long as sockets keep using it.
pub const SVC_REVNAT: &str = "VEIL_SVC_REVNAT";
/// Session affinity: the backend a client network namespace was last given for a frontend.
pub const SVC_AFFINITY: &str = "VEIL_SVC_AFFINITY";

/// Maximum sizes, chosen for a thousand nodes and a hundred thousand endpoints.
pub const IF_STATS_MAX: u32 = 4096;
/// One entry per pod address (two for a dual-stack pod) and per node CIDR or address: 100,000
/// dual-stack endpoints need 200,000. An LPM trie is never preallocated: the kernel holds only
/// the entries written (about 100 bytes each), so the bound costs nothing until used. (Cilium's
/// ipcache holds 512 Ki too.)
pub const IPCACHE_MAX: u32 = 524288;
pub const NODES_MAX: u32 = 4096;
pub const POLICY_MAX: u32 = 262144;
pub const CT_MAX: u32 = 262144;
pub const AUTH_MAX: u32 = 65536;
pub const EVENTS_BYTES: u32 = 1 << 22;
pub const EVENT_THROTTLE_MAX: u32 = 65536;
pub const FRAGS_MAX: u32 = 8192;
pub const SERVICES_MAX: u32 = 65536;
pub const BACKENDS_MAX: u32 = 262144;
pub const SVC_REVNAT_MAX: u32 = 262144;
pub const SVC_AFFINITY_MAX: u32 = 65536;

/// Reserved numeric security identities. Cluster identities start at [`identity::FIRST_CLUSTER`].
pub mod identity {
    /// Wildcard in policy keys ("any remote identity"); never a real identity.
    pub const ANY: u32 = 0;
    /// The node itself (host netns of the node).
    pub const HOST: u32 = 1;
    /// Outside the cluster.
    pub const WORLD: u32 = 2;
    /// A cluster pod address whose identity this node does not know (yet).
    pub const UNKNOWN: u32 = 3;
    /// Another node's own address.
    pub const REMOTE_NODE: u32 = 4;
    pub const FIRST_CLUSTER: u32 = 256;
    /// Marks the per-endpoint, per-direction enforcement entry in a policy map (see
    /// [`super::policy_flags::ENFORCED`]).
    pub const SELECTOR_MARKER: u32 = u32::MAX;
}

/// Directions in [`PolicyKey::direction`] and flow events.
pub mod direction {
    /// Into the local endpoint.
    pub const INGRESS: u8 = 1;
    /// Out of the local endpoint.
    pub const EGRESS: u8 = 2;
}

/// Bits of [`PolicyEntry::flags`]. For a packet the datapath looks up the six keys
/// (remote, port, proto), (remote, *, proto), (remote, *, *), (*, port, proto), (*, *, proto),
/// (*, *, *) and ORs the flags of every hit: DENY anywhere wins, else ALLOW anywhere admits,
/// AUTH_REQUIRED anywhere requires auth. Six hash lookups, whatever the number of rules.
pub mod policy_flags {
    pub const ALLOW: u32 = 1 << 0;
    pub const DENY: u32 = 1 << 1;
    /// The admitting rule requires mutual authentication of the identity pair.
    pub const AUTH_REQUIRED: u32 = 1 << 2;
    /// On the SELECTOR_MARKER entry: a policy selects this endpoint in this direction, so
    /// anything not allowed is dropped (default deny).
    pub const ENFORCED: u32 = 1 << 3;
    /// On the SELECTOR_MARKER entry: every policy selecting the endpoint in this direction is in
    /// audit mode; would-be drops are reported as AUDIT and passed.
    pub const AUDIT: u32 = 1 << 4;
    /// The admitting rule carries L7 (HTTP) rules for this port: a TCP connection it admits
    /// goes through the node's L7 proxy, which decides request by request.
    pub const L7: u32 = 1 << 5;
}

/// Bits of [`FlowEvent::flags`].
pub mod flow_flags {
    /// The flow crossed (or will cross) the underlay inside WireGuard.
    pub const ENCRYPTED: u32 = 1 << 0;
    /// An auth entry admitted the flow.
    pub const AUTHENTICATED: u32 = 1 << 1;
    /// Policy required authentication for the flow.
    pub const AUTH_REQUIRED: u32 = 1 << 2;
    /// The packet is a reply of a tracked connection.
    pub const REPLY: u32 = 1 << 3;
    /// IPv6 addresses (else v4-mapped IPv4).
    pub const IPV6: u32 = 1 << 4;
}

/// Bits of [`CtEntry::flags`].
pub mod ct_flags {
    /// Egress policy at the source admitted the connection.
    pub const EGRESS_OK: u32 = 1 << 0;
    /// Ingress policy at the destination admitted the connection.
    pub const INGRESS_OK: u32 = 1 << 1;
    /// Admitted only in audit mode.
    pub const AUDITED: u32 = 1 << 2;
    /// Admission needed an auth entry; replies re-check that it still exists.
    pub const AUTH: u32 = 1 << 3;
    /// A TCP FIN or RST was seen: the entry expires after the closing timeout, and a new SYN
    /// on the same 5-tuple starts a new connection (re-evaluated).
    pub const CLOSING: u32 = 1 << 4;
    /// The connection goes through the node's L7 proxy: its packets in both directions are
    /// delivered to the proxy's sockets (mark [`crate::marks::TO_PROXY`]), and the proxy's own
    /// packets of this 5-tuple (mark [`crate::marks::FROM_PROXY`]) may enter the tunnel.
    pub const PROXY: u32 = 1 << 5;
}

/// Conntrack idle timeouts (boot-time ns since the last packet either way), enforced by the
/// datapath on lookup: an older entry counts as absent.
pub mod ct_timeouts {
    /// Established TCP (Cilium's default TCP lifetime).
    pub const TCP_NS: u64 = 21_600 * 1_000_000_000;
    /// TCP after FIN or RST.
    pub const TCP_CLOSING_NS: u64 = 10 * 1_000_000_000;
    /// UDP, ICMP and the rest.
    pub const OTHER_NS: u64 = 60 * 1_000_000_000;
}

/// Flags in [`IpInfo::flags`].
pub mod ip_flags {
    /// A pod on this node; `ifindex` is the host side of its veth.
    pub const LOCAL_POD: u32 = 1 << 0;
    /// A whole node pod CIDR (not a single pod).
    pub const POD_CIDR: u32 = 1 << 1;
    /// A single pod address (local or remote).
    pub const POD: u32 = 1 << 2;
    /// An address of this node itself (its underlay address, its pod-network gateway).
    pub const HOST: u32 = 1 << 3;
    /// Another node's own (underlay) address; `node_id` is that node's.
    pub const NODE: u32 = 1 << 4;
}

/// Flags in [`NodeInfo::flags`].
pub mod node_flags {
    /// The node's WireGuard peer is installed on the tunnel: traffic to it may be steered.
    pub const HAS_KEY: u32 = 1 << 0;
    /// This node itself.
    pub const SELF: u32 = 1 << 1;
}

/// See [`CONFIG`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DatapathConfig {
    /// [`crate::config_flags`].
    pub flags: u32,
    /// Ifindex of the tunnel device (0 until it exists).
    pub tunnel_ifindex: u32,
    /// This node's id (the same number as in its pod CIDR, 198.19.<id>.0/24 in the lab).
    pub node_id: u32,
    /// Which of the two policy map slots is live (0 or 1).
    pub policy_slot: u32,
    /// Ifindex of the agent's hold device: a packet waiting for its identity pair's auth goes
    /// there instead of being dropped (0: no hold device, drop with `auth-required`).
    pub hold_ifindex: u32,
    /// TCP port of the node's L7 proxy listener on 127.0.0.1 (0: no proxy configured; an
    /// L7-policed connection is dropped with `proxy-unavailable`).
    pub proxy_port: u32,
    /// The node's WireGuard UDP port and its control channel's TCP port: with node encryption,
    /// the node traffic that stays outside the tunnel (it carries the tunnel).
    pub wg_port: u32,
    pub control_port: u32,
}

/// See [`IF_STATS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IfStats {
    pub packets: u64,
    pub bytes: u64,
    pub drops: u64,
}

/// Key of [`IPCACHE`]: an IPv6 address, IPv4 mapped as `::ffff:a.b.c.d`, so one trie serves
/// both families. The LPM prefix length precedes it in the map key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IpKey {
    pub addr: [u8; 16],
}

impl IpKey {
    /// Prefix length offset of an IPv4 prefix inside the mapped form.
    pub const V4_PREFIX_OFFSET: u32 = 96;

    pub const fn from_v4(octets: [u8; 4]) -> Self {
        let mut addr = [0u8; 16];
        addr[10] = 0xff;
        addr[11] = 0xff;
        addr[12] = octets[0];
        addr[13] = octets[1];
        addr[14] = octets[2];
        addr[15] = octets[3];
        Self { addr }
    }

    pub const fn from_v6(addr: [u8; 16]) -> Self {
        Self { addr }
    }
}

/// Value of [`IPCACHE`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpInfo {
    /// Numeric security identity (0 for a pod CIDR entry: the pod is not known).
    pub identity: u32,
    /// Node hosting the address.
    pub node_id: u32,
    /// [`ip_flags`].
    pub flags: u32,
    /// Host-side veth ifindex for [`ip_flags::LOCAL_POD`], else 0.
    pub ifindex: u32,
}

/// Value of [`NODES`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// [`node_flags`].
    pub flags: u32,
    pub _pad: u32,
}

/// Key of the policy maps.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyKey {
    /// Identity of the endpoint on this node the policy is about.
    pub local_identity: u32,
    /// Peer identity, or [`identity::ANY`], or [`identity::SELECTOR_MARKER`].
    pub remote_identity: u32,
    /// Destination port in host byte order, 0 = any.
    pub dport: u16,
    /// IP protocol number, 0 = any.
    pub protocol: u8,
    /// [`direction`].
    pub direction: u8,
}

impl PolicyKey {
    #[inline(always)]
    pub const fn new(local: u32, remote: u32, dport: u16, protocol: u8, direction: u8) -> Self {
        Self {
            local_identity: local,
            remote_identity: remote,
            dport,
            protocol,
            direction,
        }
    }

    /// The enforcement marker of `local` in `direction` (see [`policy_flags::ENFORCED`]).
    #[inline(always)]
    pub const fn marker(local: u32, direction: u8) -> Self {
        Self {
            local_identity: local,
            remote_identity: identity::SELECTOR_MARKER,
            dport: 0,
            protocol: 0,
            direction,
        }
    }

    /// The six keys one policy decision reads, whatever the number of rules: the remote
    /// identity, then any identity, each with (port, protocol), (any port, protocol) and
    /// (any port, any protocol). The one definition the program and the agent's userspace
    /// evaluation share; combine what they hold with [`policy_decision`].
    #[inline(always)]
    pub fn lookups(local: u32, remote: u32, dport: u16, protocol: u8, direction: u8) -> [Self; 6] {
        let k = |remote_identity, dport, protocol| Self {
            local_identity: local,
            remote_identity,
            dport,
            protocol,
            direction,
        };
        [
            k(remote, dport, protocol),
            k(remote, 0, protocol),
            k(remote, 0, 0),
            k(identity::ANY, dport, protocol),
            k(identity::ANY, 0, protocol),
            k(identity::ANY, 0, 0),
        ]
    }
}

/// A policy decision for one packet in one direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyDecision {
    pub allowed: bool,
    /// Denied, but every policy selecting the endpoint here is in audit mode (or the node
    /// is): report AUDIT and pass.
    pub audit: bool,
    pub auth_required: bool,
    /// Auth is required and enforced (not only audited): a missing auth entry drops.
    pub auth_enforced: bool,
    /// Allowed by a rule with L7 rules: a TCP connection goes through the L7 proxy.
    pub proxy: bool,
}

impl PolicyDecision {
    pub const ALLOW: Self = Self {
        allowed: true,
        audit: false,
        auth_required: false,
        auth_enforced: false,
        proxy: false,
    };
}

/// Combines the marker entry's flags (`None`: no marker) and the OR of the flags the
/// [`PolicyKey::lookups`] keys hold: an endpoint no policy selects in this direction allows
/// everything; otherwise deny wins, something must allow, and auth is required when an
/// admitting entry asks for it.
#[inline(always)]
pub const fn policy_decision(marker: Option<u32>, acc: u32, node_audit: bool) -> PolicyDecision {
    let marker = match marker {
        Some(m) if m & policy_flags::ENFORCED != 0 => m,
        _ => return PolicyDecision::ALLOW,
    };
    let allowed = acc & policy_flags::DENY == 0 && acc & policy_flags::ALLOW != 0;
    let audit_mode = marker & policy_flags::AUDIT != 0 || node_audit;
    let auth_required = allowed && acc & policy_flags::AUTH_REQUIRED != 0;
    PolicyDecision {
        allowed,
        audit: !allowed && audit_mode,
        auth_required,
        auth_enforced: auth_required && !audit_mode,
        proxy: allowed && acc & policy_flags::L7 != 0,
    }
}

/// Value of the policy maps.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyEntry {
    /// [`policy_flags`].
    pub flags: u32,
    /// Index of the first rule that produced this entry (for flow records), else 0.
    pub rule: u32,
}

/// Key of [`CT`]: the 5-tuple in the direction of the first packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
    pub _pad: [u8; 3],
}

/// Value of [`CT`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtEntry {
    /// Boot-time ns of the last packet either way.
    pub last_seen_ns: u64,
    pub src_identity: u32,
    pub dst_identity: u32,
    /// [`ct_flags`].
    pub flags: u32,
    /// Node id of the remote end (0 for node-local).
    pub remote_node: u32,
}

/// Key of [`AUTH`]: an authenticated (local identity, remote identity, remote node) triple.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AuthKey {
    pub local_identity: u32,
    pub remote_identity: u32,
    pub remote_node: u32,
    pub _pad: u32,
}

/// Value of [`AUTH`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AuthEntry {
    /// CLOCK_BOOTTIME ns (`bpf_ktime_get_boot_ns`) after which the entry no longer admits.
    pub expires_boot_ns: u64,
}

/// Key of [`EVENT_THROTTLE`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ThrottleKey {
    pub src_identity: u32,
    pub dst_identity: u32,
    pub dport: u16,
    pub protocol: u8,
    pub verdict: u8,
    pub reason: u32,
}

/// Key of [`FRAGS`]: one fragmented datagram.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// IPv4 identification (16 bits) or IPv6 fragment identification.
    pub id: u32,
    pub protocol: u8,
    pub _pad: [u8; 3],
}

/// Value of [`FRAGS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragPorts {
    pub sport: u16,
    pub dport: u16,
}

/// Value of [`EVENT_THROTTLE`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThrottleState {
    /// Boot-time ns of the last emitted event for the key.
    pub last_ns: u64,
    /// Packets suppressed since then (folded into the next event's `count`).
    pub suppressed: u32,
    pub _pad: u32,
}

/// Key of [`SERVICES`]: one frontend of a Service. `addr` is IPv6 or IPv4-mapped (as in
/// [`IpKey`]), `port` in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    pub addr: [u8; 16],
    pub port: u16,
    pub protocol: u8,
    pub _pad: u8,
}

/// Flags in [`ServiceEntry::flags`].
pub mod service_flags {
    /// ClientIP session affinity: a client network namespace keeps its backend for
    /// [`super::ServiceEntry::affinity_timeout_s`].
    pub const AFFINITY: u32 = 1 << 0;
}

/// Value of [`SERVICES`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceEntry {
    /// Ready backends, in [`BACKENDS`] slots `0..count`; 0 refuses connections at once.
    pub count: u32,
    /// [`service_flags`].
    pub flags: u32,
    pub affinity_timeout_s: u32,
    pub _pad: u32,
}

/// Key of [`BACKENDS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendKey {
    pub service: ServiceKey,
    pub slot: u32,
}

/// Value of [`BACKENDS`] and of an affinity entry: where a connection goes (`port` in host
/// byte order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Backend {
    pub addr: [u8; 16],
    pub port: u16,
    pub _pad: u16,
}

/// Key of [`SVC_REVNAT`]: a socket (its cookie) and the backend it was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RevNatKey {
    pub cookie: u64,
    pub backend: Backend,
    pub _pad: u32,
}

/// Key of [`SVC_AFFINITY`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub netns_cookie: u64,
    pub service: ServiceKey,
    pub _pad: u32,
}

/// Value of [`SVC_AFFINITY`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityEntry {
    pub backend: Backend,
    /// Its slot in [`BACKENDS`] when chosen (checked again before reuse).
    pub slot: u32,
    /// Boot-time ns of the last connection that used it.
    pub last_ns: u64,
}

/// A flow verdict, emitted on the ring buffer for the first packet of a connection, for drops
/// (throttled per tuple), and for audit verdicts.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    pub time_boot_ns: u64,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub ifindex: u32,
    /// Node id of the remote end, 0 if local.
    pub remote_node: u32,
    /// Packets folded into this event by the throttle since the previous one (>= 1).
    pub count: u32,
    pub protocol: u8,
    /// [`crate::verdict`].
    pub verdict: u8,
    /// [`direction`] of the policy decision.
    pub direction: u8,
    pub _pad: u8,
    /// [`crate::reason`] code.
    pub reason: u32,
    /// [`flow_flags`].
    pub flags: u32,
    /// The ClusterIP a socket program translated this connection from (IPv4 mapped into
    /// IPv6, as [`IpKey`]), all zeros when it went straight to the pod.
    pub service: [u8; 16],
    pub _pad2: u32,
}

#[cfg(feature = "user")]
mod pod_impls {
    use super::*;
    // SAFETY: every type is #[repr(C)], Copy, made only of integers and integer arrays with
    // explicit padding, so any byte pattern of the right size is a valid value.
    unsafe impl aya::Pod for DatapathConfig {}
    unsafe impl aya::Pod for IfStats {}
    unsafe impl aya::Pod for IpKey {}
    unsafe impl aya::Pod for IpInfo {}
    unsafe impl aya::Pod for NodeInfo {}
    unsafe impl aya::Pod for PolicyKey {}
    unsafe impl aya::Pod for PolicyEntry {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtEntry {}
    unsafe impl aya::Pod for AuthKey {}
    unsafe impl aya::Pod for AuthEntry {}
    unsafe impl aya::Pod for ThrottleKey {}
    unsafe impl aya::Pod for ThrottleState {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for FragPorts {}
    unsafe impl aya::Pod for FlowEvent {}
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceEntry {}
    unsafe impl aya::Pod for BackendKey {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for RevNatKey {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityEntry {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    fn bytes_of<T: Copy>(v: &T) -> &[u8] {
        // SAFETY: T is a #[repr(C)] plain-integer type without implicit padding (sizes asserted).
        unsafe { core::slice::from_raw_parts(v as *const T as *const u8, size_of::<T>()) }
    }

    fn from_bytes<T: Copy>(b: &[u8]) -> T {
        assert_eq!(b.len(), size_of::<T>());
        // SAFETY: length checked; T accepts any bit pattern.
        unsafe { core::ptr::read_unaligned(b.as_ptr() as *const T) }
    }

    #[test]
    fn sizes_are_fixed() {
        assert_eq!(size_of::<DatapathConfig>(), 32);
        assert_eq!(size_of::<IfStats>(), 24);
        assert_eq!(size_of::<IpKey>(), 16);
        assert_eq!(size_of::<IpInfo>(), 16);
        assert_eq!(size_of::<NodeInfo>(), 8);
        assert_eq!(size_of::<PolicyKey>(), 12);
        assert_eq!(size_of::<PolicyEntry>(), 8);
        assert_eq!(size_of::<CtKey>(), 40);
        assert_eq!(size_of::<CtEntry>(), 24);
        assert_eq!(size_of::<AuthKey>(), 16);
        assert_eq!(size_of::<AuthEntry>(), 8);
        assert_eq!(size_of::<ThrottleKey>(), 16);
        assert_eq!(size_of::<ThrottleState>(), 16);
        assert_eq!(size_of::<FragKey>(), 40);
        assert_eq!(size_of::<FragPorts>(), 4);
        assert_eq!(size_of::<FlowEvent>(), 96);
        assert_eq!(size_of::<ServiceKey>(), 20);
        assert_eq!(size_of::<ServiceEntry>(), 16);
        assert_eq!(size_of::<BackendKey>(), 24);
        assert_eq!(size_of::<Backend>(), 20);
        assert_eq!(size_of::<RevNatKey>(), 32);
        assert_eq!(size_of::<AffinityKey>(), 32);
        assert_eq!(size_of::<AffinityEntry>(), 32);
    }

    #[test]
    fn byte_round_trips() {
        let c = DatapathConfig {
            flags: 3,
            tunnel_ifindex: 7,
            node_id: 2,
            policy_slot: 1,
            hold_ifindex: 0,
            proxy_port: 0,
            wg_port: 51820,
            control_port: 4250,
        };
        assert_eq!(from_bytes::<DatapathConfig>(bytes_of(&c)), c);
        let s = IfStats {
            packets: 1,
            bytes: 2,
            drops: 3,
        };
        assert_eq!(from_bytes::<IfStats>(bytes_of(&s)), s);
        let k = IpKey::from_v4([198, 19, 1, 10]);
        assert_eq!(&bytes_of(&k)[10..], &[0xff, 0xff, 198, 19, 1, 10]);
        assert_eq!(from_bytes::<IpKey>(bytes_of(&k)), k);
        let i = IpInfo {
            identity: 300,
            node_id: 1,
            flags: ip_flags::POD,
            ifindex: 9,
        };
        assert_eq!(from_bytes::<IpInfo>(bytes_of(&i)), i);
        let n = NodeInfo {
            flags: node_flags::HAS_KEY,
            _pad: 0,
        };
        assert_eq!(from_bytes::<NodeInfo>(bytes_of(&n)), n);
    }
}
