//! veil's eBPF programs. They fail closed: a packet the program cannot classify (truncated
//! headers, missing configuration, unknown source) is dropped and counted, never passed on
//! unexamined; a packet for a cluster pod CIDR whose node has no tunnel peer is dropped
//! (`no-key`), never routed in clear.
//!
//! Packet walk (see ARCHITECTURE.md): `veil_from_pod` sees every packet a pod sends (tcx ingress
//! on the host side of its veth): anti-spoofing, conntrack, egress policy of the source and —
//! for a destination on this node — ingress policy of the destination, auth check, then steering:
//! local pods via `bpf_redirect_neigh`, remote pods into the WireGuard device, the rest to the
//! stack. `veil_from_tunnel` sees decrypted packets from peers (tcx ingress on the tunnel
//! device): ingress policy and auth of the destination pod, then delivery by the stack's route.
//! `veil_from_underlay` (tcx ingress on the node's underlay interface) drops plaintext for pod
//! addresses: pod traffic may arrive from another node only inside WireGuard. `veil_to_tunnel`
//! (tcx egress on the tunnel device) admits a local pod's source address into the tunnel only on
//! packets `veil_from_pod` or `veil_from_hold` marked, so a host-network process cannot pose as
//! a pod.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{
        bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2, BPF_F_CURRENT_NETNS, TC_ACT_OK, TC_ACT_SHOT,
    },
    helpers::{
        bpf_check_mtu, bpf_get_socket_cookie, bpf_ktime_get_boot_ns, bpf_redirect,
        bpf_redirect_neigh, bpf_sk_assign, bpf_sk_lookup_tcp, bpf_sk_release,
        bpf_skb_change_tail, bpf_skb_load_bytes,
    },
    macros::{classifier, map},
    maps::{
        lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf,
    },
    programs::TcContext,
};
use veil_common::{
    config_flags,
    maps::{
        ct_flags, ct_timeouts, direction, flow_flags, identity, ip_flags, node_flags,
        policy_decision, policy_flags, AuthEntry, AuthKey, CtEntry, CtKey, DatapathConfig,
        FlowEvent, FragKey, FragPorts, IfStats, IpInfo, IpKey, NodeInfo, PolicyDecision,
        PolicyEntry, PolicyKey, ThrottleKey, ThrottleState, AUTH_MAX, CT_MAX, EVENTS_BYTES,
        EVENT_THROTTLE_MAX, FRAGS_MAX, IF_STATS_MAX, IPCACHE_MAX, NODES_MAX, POLICY_MAX,
    },
    marks, reason, verdict,
};

mod sock;

#[map(name = "VEIL_CONFIG")]
static VEIL_CONFIG: Array<DatapathConfig> = Array::pinned(1, 0);
#[map(name = "VEIL_IF_STATS")]
static VEIL_IF_STATS: PerCpuHashMap<u32, IfStats> = PerCpuHashMap::pinned(IF_STATS_MAX, 0);
#[map(name = "VEIL_DROPS")]
static VEIL_DROPS: PerCpuArray<u64> = PerCpuArray::pinned(reason::MAX, 0);
#[map(name = "VEIL_VERDICTS")]
static VEIL_VERDICTS: PerCpuArray<u64> = PerCpuArray::pinned(verdict::COUNT, 0);
#[map(name = "VEIL_IPCACHE")]
static VEIL_IPCACHE: LpmTrie<IpKey, IpInfo> = LpmTrie::pinned(IPCACHE_MAX, 0);
#[map(name = "VEIL_NODES")]
static VEIL_NODES: HashMap<u32, NodeInfo> = HashMap::pinned(NODES_MAX, 0);
#[map(name = "VEIL_POLICY_A")]
static VEIL_POLICY_A: HashMap<PolicyKey, PolicyEntry> = HashMap::pinned(POLICY_MAX, 0);
#[map(name = "VEIL_POLICY_B")]
static VEIL_POLICY_B: HashMap<PolicyKey, PolicyEntry> = HashMap::pinned(POLICY_MAX, 0);
#[map(name = "VEIL_CT")]
static VEIL_CT: LruHashMap<CtKey, CtEntry> = LruHashMap::pinned(CT_MAX, 0);
#[map(name = "VEIL_AUTH")]
static VEIL_AUTH: HashMap<AuthKey, AuthEntry> = HashMap::pinned(AUTH_MAX, 0);
#[map(name = "VEIL_EVENTS")]
static VEIL_EVENTS: RingBuf = RingBuf::pinned(EVENTS_BYTES, 0);
#[map(name = "VEIL_EVENTS_LOST")]
static VEIL_EVENTS_LOST: PerCpuArray<u64> = PerCpuArray::pinned(1, 0);
#[map(name = "VEIL_FRAGS")]
static VEIL_FRAGS: LruHashMap<FragKey, FragPorts> = LruHashMap::pinned(FRAGS_MAX, 0);
#[map(name = "VEIL_EVENT_THROTTLE")]
static VEIL_EVENT_THROTTLE: LruHashMap<ThrottleKey, ThrottleState> =
    LruHashMap::pinned(EVENT_THROTTLE_MAX, 0);

/// The socket tuple of the proxy listener lookup: off the stack, which `admit` nearly fills.
#[map(name = "VEIL_PROXY_SCRATCH")]
static VEIL_PROXY_SCRATCH: PerCpuArray<bpf_sock_tuple> = PerCpuArray::with_max_entries(1, 0);

/// `emit`'s throttle key and new throttle state: off its stack, which counts against the 512
/// bytes of every program that calls it.
#[repr(C)]
#[derive(Clone, Copy)]
struct EmitScratch {
    key: ThrottleKey,
    state: ThrottleState,
}
#[map(name = "VEIL_EMIT_SCRATCH")]
static VEIL_EMIT_SCRATCH: PerCpuArray<EmitScratch> = PerCpuArray::with_max_entries(1, 0);

/// A packet's conntrack keys, forward and reverse: off the stack of the programs that track
/// connections. Kernels before 6.x round every frame up to 32 bytes and count the deepest call
/// chain (a program and `emit`) against 512: with the keys on its stack, veil_from_pod did not
/// load on Linux 6.1 ("combined stack size of 2 calls is 544").
#[map(name = "VEIL_CT_SCRATCH")]
static VEIL_CT_SCRATCH: PerCpuArray<[CtKey; 2]> = PerCpuArray::with_max_entries(1, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_ARP: u16 = 0x0806;
use veil_common::ipproto::{
    ICMP as IPPROTO_ICMP, ICMPV6 as IPPROTO_ICMPV6, SCTP as IPPROTO_SCTP, TCP as IPPROTO_TCP,
    UDP as IPPROTO_UDP,
};
/// One event per (identities, port, verdict, reason) per second; the rest are counted into it.
const THROTTLE_NS: u64 = 1_000_000_000;

/// A TC program: runs its `try_` function and drops, with the counted reason, what that refuses.
macro_rules! tc_program {
    ($(#[$doc:meta])* $name:ident => $body:ident) => {
        $(#[$doc])*
        #[classifier]
        pub fn $name(ctx: TcContext) -> i32 {
            match $body(&ctx) {
                Ok(action) => action,
                Err(code) => drop_packet(&ctx, code),
            }
        }
    };
}

tc_program! {
    /// Packets leaving a pod, on the host side of its veth.
    veil_from_pod => try_from_pod
}
tc_program! {
    /// Decrypted packets arriving from peer nodes, on the tunnel device.
    veil_from_tunnel => try_from_tunnel
}
tc_program! {
    /// Packets arriving on the node's underlay interface (fails closed for pod addresses).
    veil_from_underlay => try_from_underlay
}
tc_program! {
    /// Packets leaving on the node's underlay interface (egress), with node encryption: traffic
    /// to another node's own address enters the tunnel (fails closed without a peer).
    veil_to_underlay => try_to_underlay
}
tc_program! {
    /// Packets entering the tunnel device, egress (fails closed for unmarked local pod sources).
    veil_to_tunnel => try_to_tunnel
}
tc_program! {
    /// Packets towards a pod, on the host side of its veth (egress).
    veil_to_pod => try_to_pod
}
tc_program! {
    /// Packets the agent re-injects from its hold device (ingress). Only the agent holds the
    /// device's file descriptor; a released packet of a local pod gets the from-pod mark so it
    /// may enter the tunnel.
    veil_from_hold => try_from_hold
}

/// Is this address a pod's, or inside any node's pod CIDR (this node's included)?
#[inline(always)]
fn is_pod_address(addr: &[u8; 16]) -> Option<IpInfo> {
    lookup_ip(addr)
        .filter(|i| i.flags & (ip_flags::POD | ip_flags::POD_CIDR | ip_flags::LOCAL_POD) != 0)
}

fn try_from_underlay(ctx: &TcContext) -> Result<i32, u32> {
    let cfg = config()?;
    let eth_proto = u16::from_be(ctx.load::<u16>(12).map_err(|_| reason::TRUNCATED)?);
    // With encryption off (the capture sanity check only) pod traffic crosses in clear, and
    // this is where it arrives: the same ingress checks as from the tunnel.
    if cfg.flags & config_flags::ENCRYPT == 0 {
        let flow = match eth_proto {
            ETH_P_IP => parse_v4(ctx, ETH_HLEN)?,
            ETH_P_IPV6 => parse_v6(ctx, ETH_HLEN)?,
            _ => return Ok(TC_ACT_OK),
        };
        return match lookup_ip(&flow.daddr) {
            Some(d) if d.flags & ip_flags::LOCAL_POD != 0 => {
                ingress_from_node(ctx, &cfg, &flow, false)
            }
            _ => Ok(TC_ACT_OK),
        };
    }
    let daddr: [u8; 16] = match eth_proto {
        ETH_P_IP => v4_mapped(ctx.load(ETH_HLEN + 16).map_err(|_| reason::TRUNCATED)?),
        ETH_P_IPV6 => ctx.load(ETH_HLEN + 24).map_err(|_| reason::TRUNCATED)?,
        // ARP and the rest concern the node itself, not its pods.
        _ => return Ok(TC_ACT_OK),
    };
    // WireGuard and the control channel are addressed to the node: one lookup, no parse.
    let Some(dst) = is_pod_address(&daddr) else {
        return Ok(TC_ACT_OK);
    };
    // Dropped; parsed only now, for the flow record.
    let flow = match eth_proto {
        ETH_P_IP => parse_v4(ctx, ETH_HLEN),
        _ => parse_v6(ctx, ETH_HLEN),
    };
    if let Ok(flow) = flow {
        let src = lookup_ip(&flow.saddr);
        // SAFETY: reading ifindex from the context is always valid in a TC program.
        let ifindex = unsafe { (*ctx.skb.skb).ifindex };
        EvBase {
            src_identity: remote_identity(src),
            dst_identity: remote_identity(Some(dst)),
            ifindex,
            remote_node: 0,
            // SAFETY: plain helper call.
            now: unsafe { bpf_ktime_get_boot_ns() },
            cookie: 0,
        }
        .dropped(
            &flow,
            reason::PLAINTEXT_UNDERLAY,
            direction::INGRESS,
            if flow.is_v6 { flow_flags::IPV6 } else { 0 },
        );
    }
    Err(reason::PLAINTEXT_UNDERLAY)
}

/// With node encryption on, a packet to another node's own address (IPv4 or IPv6, the family
/// of the underlay) is redirected into the tunnel device, whatever sends it (a host process, a
/// pod's connection to a node port), except what carries the tunnel: WireGuard's own datagrams
/// (UDP from its port), the control channel (TCP to or from its port) and, on an IPv6 underlay,
/// neighbour discovery (ICMPv6 133-137 at hop limit 255), which resolves the underlay itself as
/// ARP does for IPv4. No peer for that node: `no-key`, never clear. Larger than the tunnel
/// carries: `mtu-exceeded` (the agent gives the routes to the other nodes the tunnel's MTU, so
/// the host's own packets fit: TCP's segments by their MSS, larger datagrams fragmented first).
fn try_to_underlay(ctx: &TcContext) -> Result<i32, u32> {
    let cfg = config()?;
    let both = config_flags::ENCRYPT | config_flags::NODE_ENCRYPT;
    if cfg.flags & both != both {
        return Ok(TC_ACT_OK);
    }
    let eth_proto = u16::from_be(ctx.load::<u16>(12).map_err(|_| reason::TRUNCATED)?);
    let daddr: [u8; 16] = match eth_proto {
        ETH_P_IP => v4_mapped(ctx.load(ETH_HLEN + 16).map_err(|_| reason::TRUNCATED)?),
        ETH_P_IPV6 => ctx.load(ETH_HLEN + 24).map_err(|_| reason::TRUNCATED)?,
        _ => return Ok(TC_ACT_OK),
    };
    let node = match lookup_ip(&daddr) {
        Some(d) if d.flags & ip_flags::NODE != 0 => d.node_id,
        _ => return Ok(TC_ACT_OK),
    };
    let flow = if eth_proto == ETH_P_IP {
        parse_v4(ctx, ETH_HLEN)?
    } else {
        parse_v6(ctx, ETH_HLEN)?
    };
    if !flow.later_fragment {
        let wireguard =
            flow.protocol == IPPROTO_UDP && u32::from(flow.sport) == cfg.wg_port;
        let control = flow.protocol == IPPROTO_TCP
            && (u32::from(flow.sport) == cfg.control_port
                || u32::from(flow.dport) == cfg.control_port);
        if wireguard || control || is_neighbour_discovery(ctx, &flow)? {
            return Ok(TC_ACT_OK);
        }
    }
    steer_check(&cfg, node)?;
    if tunnel_mtu_exceeded(ctx, &flow, cfg.tunnel_ifindex)?.is_some() {
        return Err(reason::MTU_EXCEEDED);
    }
    // SAFETY: plain helper call.
    Ok(unsafe { bpf_redirect(cfg.tunnel_ifindex, 0) } as i32)
}

/// ICMPv6 router and neighbour solicitations and advertisements and redirects (133-137) with
/// hop limit 255 (RFC 4861: anything less is not neighbour discovery and is discarded by the
/// receiver), in an Ethernet frame.
#[inline(always)]
fn is_neighbour_discovery(ctx: &TcContext, flow: &Flow) -> Result<bool, u32> {
    if !flow.is_v6 || flow.protocol != IPPROTO_ICMPV6 || !(133..=137).contains(&flow.icmp_type) {
        return Ok(false);
    }
    let hop_limit: u8 = ctx.load(ETH_HLEN + 7).map_err(|_| reason::TRUNCATED)?;
    Ok(hop_limit == 255)
}

fn try_to_tunnel(ctx: &TcContext) -> Result<i32, u32> {
    // SAFETY: reading the mark from the context is always valid in a TC program.
    let mark = unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*ctx.skb.skb).mark)) };
    if mark & marks::MASK == marks::FROM_POD {
        return Ok(TC_ACT_OK);
    }
    let cfg = config()?;
    // A TUN device carries bare IP packets.
    let version = ctx.load::<u8>(0).map_err(|_| reason::TRUNCATED)? >> 4;
    if mark & marks::MASK == marks::FROM_PROXY {
        return from_proxy(ctx, version);
    }
    let saddr: [u8; 16] = match version {
        4 => v4_mapped(ctx.load(12).map_err(|_| reason::TRUNCATED)?),
        6 => ctx.load(8).map_err(|_| reason::TRUNCATED)?,
        _ => return Err(reason::UNSUPPORTED_L3),
    };
    // Anything claiming an address of this node's pod CIDR without the mark was not sent by
    // that pod: a host process (raw socket) posing as it.
    match is_pod_address(&saddr) {
        Some(s) if s.node_id == cfg.node_id || s.flags & ip_flags::LOCAL_POD != 0 => {
            Err(reason::HOST_SPOOFED)
        }
        _ => Ok(TC_ACT_OK),
    }
}

/// A packet the node's L7 proxy sends with a pod's address (its upstream connection carries the
/// client's 5-tuple; its accepted connection answers as the server): admitted into the tunnel
/// only on a connection conntrack tracks as proxied, and only while its auth entry, if it
/// needed one, lives. Anything else with the proxy's mark is a host process posing as a pod.
#[inline(always)]
fn from_proxy(ctx: &TcContext, version: u8) -> Result<i32, u32> {
    let flow = match version {
        4 => parse_v4(ctx, 0)?,
        6 => parse_v6(ctx, 0)?,
        _ => return Err(reason::UNSUPPORTED_L3),
    };
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    let [fwd, rev] = ct_keys(&flow)?;
    let Some((entry, is_reply)) = ct_lookup(&flow, fwd, rev, now) else {
        return Err(reason::HOST_SPOOFED);
    };
    // SAFETY: map value pointer valid for this program run.
    let e = unsafe { &mut *entry };
    if e.flags & ct_flags::PROXY == 0 {
        return Err(reason::HOST_SPOOFED);
    }
    if e.flags & ct_flags::AUTH != 0
        && !auth_valid(e.src_identity, e.dst_identity, e.remote_node, now, is_reply)
    {
        return Err(reason::AUTH_REQUIRED);
    }
    e.last_seen_ns = now;
    Ok(TC_ACT_OK)
}

/// A packet leaving the host side of a pod's veth towards the pod. Packets from other pods,
/// the tunnel or the hold device were admitted on their way in; this node's own traffic to
/// the pod (kubelet probes, host-network processes: source address flagged HOST) is admitted
/// as Cilium admits the local host by default, and tracked so the pod's replies pass
/// `veil_from_pod`'s TCP-start check.
fn try_to_pod(ctx: &TcContext) -> Result<i32, u32> {
    let eth_proto = u16::from_be(ctx.load::<u16>(12).map_err(|_| reason::TRUNCATED)?);
    let flow = match eth_proto {
        ETH_P_IP => parse_v4(ctx, ETH_HLEN)?,
        ETH_P_IPV6 => parse_v6(ctx, ETH_HLEN)?,
        _ => return Ok(TC_ACT_OK),
    };
    let Some(src) = lookup_ip(&flow.saddr) else {
        return Ok(TC_ACT_OK);
    };
    if src.flags & ip_flags::HOST == 0 {
        return Ok(TC_ACT_OK);
    }
    let dst = match lookup_ip(&flow.daddr) {
        Some(d) if d.flags & ip_flags::LOCAL_POD != 0 => d,
        _ => return Ok(TC_ACT_OK),
    };
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    let [fwd, rev] = ct_keys(&flow)?;
    if let Some((entry, _)) = ct_lookup(&flow, fwd, rev, now) {
        // SAFETY: map value pointer valid for this program run.
        unsafe { (*entry).last_seen_ns = now };
        return Ok(TC_ACT_OK);
    }
    if tcp_may_start(&flow) {
        let entry = CtEntry {
            last_seen_ns: now,
            src_identity: dst.identity,
            dst_identity: identity::HOST,
            flags: ct_flags::INGRESS_OK,
            remote_node: 0,
        };
        let _ = VEIL_CT.insert(fwd, &entry, 0);
    }
    Ok(TC_ACT_OK)
}

/// A held packet is released by the agent once it believes the pair authenticated. The kernel's
/// auth map decides, not the agent's belief: the packet passes only with a valid auth entry for
/// the same triple that held it, and then creates the conntrack entry any admitted first packet
/// creates (AUTH set), so its connection is re-checked and cut like any other. A held SYN of a
/// connection the policy sends to the L7 proxy is assigned to the proxy's listener here, as
/// `admit` would have done (no listener: dropped `proxy-unavailable`), so releasing it never
/// lets it pass beside the proxy.
fn try_from_hold(ctx: &TcContext) -> Result<i32, u32> {
    let version = ctx.load::<u8>(0).map_err(|_| reason::TRUNCATED)? >> 4;
    let flow = match version {
        4 => parse_v4(ctx, 0)?,
        6 => parse_v6(ctx, 0)?,
        _ => return Err(reason::UNSUPPORTED_L3),
    };
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    // SAFETY: reading ifindex from the context is always valid in a TC program.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let src = lookup_ip(&flow.saddr);
    let dst = lookup_ip(&flow.daddr);
    let src_local = src.is_some_and(|i| i.flags & ip_flags::LOCAL_POD != 0);
    let dst_local = dst.is_some_and(|i| i.flags & ip_flags::LOCAL_POD != 0);
    // (local identity, remote identity, remote node, conntrack flags, direction)
    let (local, remote, node, ct, dir) = if src_local && !dst_local {
        let node = dst.map(|d| d.node_id).unwrap_or(0);
        (
            src.map(|s| s.identity).unwrap_or(0),
            remote_identity(dst),
            node,
            ct_flags::EGRESS_OK | ct_flags::AUTH,
            direction::EGRESS,
        )
    } else if dst_local && !src_local {
        (
            dst.map(|d| d.identity).unwrap_or(0),
            remote_identity(src),
            src.map(|s| s.node_id).unwrap_or(0),
            ct_flags::INGRESS_OK | ct_flags::AUTH,
            direction::INGRESS,
        )
    } else {
        return Err(reason::UNKNOWN_ENDPOINT);
    };
    let mut flags = flow_flags::ENCRYPTED | flow_flags::AUTH_REQUIRED;
    if flow.is_v6 {
        flags |= flow_flags::IPV6;
    }
    let (src_identity, dst_identity) = if dir == direction::EGRESS {
        (local, remote)
    } else {
        (remote, local)
    };
    let ev = EvBase {
        src_identity,
        dst_identity,
        ifindex,
        remote_node: node,
        now,
        cookie: 0,
    };
    if !auth_valid(local, remote, node, now, false) {
        return Err(ev.dropped(&flow, reason::AUTH_REQUIRED, dir, flags));
    }
    let cfg = config()?;
    let proxy = flow.protocol == IPPROTO_TCP
        && decide(&cfg, local, remote, flow.dport, flow.protocol, dir).proxy;
    if proxy && !assign_proxy(ctx, &cfg, &flow) {
        return Err(ev.dropped(&flow, reason::PROXY_UNAVAILABLE, dir, flags));
    }
    let entry = CtEntry {
        last_seen_ns: now,
        src_identity: local,
        dst_identity: remote,
        flags: if proxy { ct | ct_flags::PROXY } else { ct },
        remote_node: node,
    };
    let _ = VEIL_CT.insert(&ct_key(&flow, false), &entry, 0);
    if proxy {
        set_mark(ctx, marks::TO_PROXY);
    } else if src_local {
        set_from_pod(ctx);
    }
    Ok(TC_ACT_OK)
}

#[inline(always)]
fn set_from_pod(ctx: &TcContext) {
    set_mark(ctx, marks::FROM_POD);
}

/// Puts `value` (one of [`marks`]) in veil's bits of `skb->mark`.
#[inline(always)]
fn set_mark(ctx: &TcContext, value: u32) {
    // SAFETY: TC programs may write skb->mark; the pointer is the program's own context.
    // Volatile and whole-word: the verifier allows only 4-byte access to `mark`, and a plain
    // store of the high half compiles to a 2-byte write it refuses.
    unsafe {
        let mark = core::ptr::addr_of_mut!((*ctx.skb.skb).mark);
        let v = core::ptr::read_volatile(mark);
        core::ptr::write_volatile(mark, (v & !marks::MASK) | value);
    }
}

/// Hands the first packet (SYN) of an L7-proxied connection to the proxy's listener on
/// loopback (`bpf_sk_assign`; the accepted socket keeps the original destination as its local
/// address). False when no proxy listens: the caller drops, never passes the flow around it.
/// Not inlined: its frame stays out of `admit`'s callers' 512 bytes.
#[inline(never)]
fn assign_proxy(ctx: &TcContext, cfg: &DatapathConfig, flow: &Flow) -> bool {
    let port = cfg.proxy_port as u16;
    if port == 0 {
        return false;
    }
    let Ok(tuple) = scratch(&VEIL_PROXY_SCRATCH) else {
        return false;
    };
    let size = if flow.is_v6 {
        let mut daddr = [0u8; 16];
        daddr[15] = 1;
        tuple.__bindgen_anon_1.ipv6 = bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2 {
            saddr: words(&flow.saddr),
            daddr: words(&daddr),
            sport: flow.sport.to_be(),
            dport: port.to_be(),
        };
        core::mem::size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2>()
    } else {
        let s = &flow.saddr;
        tuple.__bindgen_anon_1.ipv4 = bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 {
            saddr: u32::from_ne_bytes([s[12], s[13], s[14], s[15]]),
            daddr: u32::from_ne_bytes([127, 0, 0, 1]),
            sport: flow.sport.to_be(),
            dport: port.to_be(),
        };
        core::mem::size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>()
    };
    let skb = ctx.skb.skb;
    // SAFETY: helper calls on this program's own context and a tuple on its stack; the socket
    // reference the lookup returns is released on every path.
    unsafe {
        let sk = bpf_sk_lookup_tcp(
            skb as *mut _,
            tuple,
            size as u32,
            BPF_F_CURRENT_NETNS as u64,
            0,
        );
        if sk.is_null() {
            return false;
        }
        let assigned = bpf_sk_assign(skb as *mut _, sk as *mut _, 0);
        bpf_sk_release(sk as *mut _);
        assigned == 0
    }
}

#[inline(always)]
fn words(a: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}

/// The parts of a packet the datapath decides on.
#[derive(Clone, Copy)]
struct Flow {
    saddr: [u8; 16],
    daddr: [u8; 16],
    sport: u16,
    dport: u16,
    protocol: u8,
    is_v6: bool,
    /// A non-first IP fragment whose first fragment was not seen: ports unknown.
    later_fragment: bool,
    /// ICMPv6 type (for neighbour discovery), else 0xff.
    icmp_type: u8,
    /// TCP flags of a TCP packet whose header was seen, else 0xff (not TCP, or a later
    /// fragment: unknown).
    tcp_flags: u8,
}

/// Outcome of the policy decision for one direction.
type Decision = PolicyDecision;

const ALLOW: Decision = PolicyDecision::ALLOW;

fn try_from_pod(ctx: &TcContext) -> Result<i32, u32> {
    count_interface(ctx);
    let cfg = config()?;
    let eth_proto = u16::from_be(ctx.load::<u16>(12).map_err(|_| reason::TRUNCATED)?);
    // SAFETY: reading ifindex from the context is always valid in a TC program.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let flow = match eth_proto {
        ETH_P_ARP => {
            // The sender protocol address (Ethernet/IPv4 ARP: offset 14 in the ARP header) must
            // be the pod's own, or 0.0.0.0 for a probe: no pod answers for another's address.
            let spa: [u8; 4] = ctx.load(ETH_HLEN + 14).map_err(|_| reason::TRUNCATED)?;
            if spa == [0u8; 4] {
                return Ok(TC_ACT_OK);
            }
            return match lookup_ip(&v4_mapped(spa)) {
                Some(i) if i.flags & ip_flags::LOCAL_POD != 0 && i.ifindex == ifindex => {
                    Ok(TC_ACT_OK)
                }
                _ => Err(reason::SPOOFED_SOURCE),
            };
        }
        ETH_P_IP => parse_v4(ctx, ETH_HLEN)?,
        ETH_P_IPV6 => parse_v6(ctx, ETH_HLEN)?,
        _ => return Err(reason::UNSUPPORTED_L3),
    };
    // IPv6 neighbour discovery and multicast listener reports (MLD) to a link-local or
    // link-scope multicast address are the pod resolving its gateway — the ARP of IPv6 — and
    // pass like ARP when they come from a link-local (or, for DAD, the unspecified) address;
    // from the pod's own address they pass after the anti-spoofing check below. To any other
    // destination they take every check.
    let link_control = flow.is_v6 && flow.protocol == IPPROTO_ICMPV6 && is_link_control(&flow);
    if link_control {
        let link_local = flow.saddr[0] == 0xfe && flow.saddr[1] & 0xc0 == 0x80;
        let unspecified = flow.saddr == [0u8; 16];
        if link_local || unspecified {
            return Ok(TC_ACT_OK);
        }
    }
    // Anti-spoofing: the source must be the pod behind this very interface.
    let src = match lookup_ip(&flow.saddr) {
        Some(i) if i.flags & ip_flags::LOCAL_POD != 0 && i.ifindex == ifindex => i,
        _ => return Err(reason::SPOOFED_SOURCE),
    };
    if link_control {
        return Ok(TC_ACT_OK);
    }
    let dst = lookup_ip(&flow.daddr);
    let dst_local = dst.is_some_and(|d| d.flags & ip_flags::LOCAL_POD != 0);
    let dst_identity = remote_identity(dst);
    // Another node's pods, and with node encryption another node's own address (its `NODE`
    // entry exists only then): both leave through the tunnel, marked as this pod's. Without the
    // mark the tunnel's egress would take a pod's reply to a remote host for a host process
    // posing as the pod (`host-spoofed-source`).
    let dst_node = match dst {
        Some(d) if d.flags & (ip_flags::POD | ip_flags::POD_CIDR | ip_flags::NODE) != 0 => {
            d.node_id
        }
        _ => 0,
    };
    let remote = dst_node != 0 && dst_node != cfg.node_id;
    // A local pod without an interface (being created or deleted) cannot be delivered to.
    if dst_local && dst.map(|d| d.ifindex).unwrap_or(0) == 0 {
        return Err(reason::ENDPOINT_GONE);
    }

    let mut flags = 0u32;
    if remote && cfg.flags & config_flags::ENCRYPT != 0 {
        flags |= flow_flags::ENCRYPTED;
    }
    if flow.is_v6 {
        flags |= flow_flags::IPV6;
    }
    let now = unsafe { bpf_ktime_get_boot_ns() };
    let remote_node = if remote { dst_node } else { 0 };

    let a = Admit {
        ev: EvBase {
            src_identity: src.identity,
            dst_identity,
            ifindex,
            remote_node,
            now,
            // SAFETY: plain helper call on this program's own context.
            cookie: unsafe { bpf_get_socket_cookie(ctx.skb.skb as *mut _) },
        },
        local: src.identity,
        peer: dst_identity,
        egress: true,
        ingress: dst_local,
        auth_applies: remote,
        dir: direction::EGRESS,
    };
    // Strict mode first: a packet that cannot be encrypted is never admitted or tracked.
    if remote {
        if let Err(r) = steer_check(&cfg, dst_node) {
            return Err(a.ev.dropped(&flow, r, direction::EGRESS, flags));
        }
    }
    if let Some(act) = admit(ctx, &cfg, &flow, &a, flags)? {
        return Ok(act);
    }

    if dst_local {
        let ifx = dst.map(|d| d.ifindex).unwrap_or(0);
        if ifx == 0 {
            return Err(reason::ENDPOINT_GONE);
        }
        // SAFETY: helper call with a null params pointer, as documented for bpf_redirect_neigh.
        return Ok(unsafe { bpf_redirect_neigh(ifx, core::ptr::null_mut(), 0, 0) } as i32);
    }
    if remote {
        if cfg.flags & config_flags::ENCRYPT != 0 {
            // bpf_redirect skips the tunnel device's MTU check: a packet it cannot carry would
            // vanish inside veil-wg. Answer it as a router on the path would.
            if let Some(mtu) = tunnel_mtu_exceeded(ctx, &flow, cfg.tunnel_ifindex)? {
                a.ev.dropped(&flow, reason::MTU_EXCEEDED, direction::EGRESS, flags);
                if !flow.is_v6 && ipv4_dont_fragment(ctx)? {
                    count_drop(ctx, reason::MTU_EXCEEDED);
                    return frag_needed_v4(ctx, ifindex, mtu);
                }
                if flow.is_v6 && mtu >= IPV6_MIN_MTU {
                    count_drop(ctx, reason::MTU_EXCEEDED);
                    return packet_too_big_v6(ctx, ifindex, mtu);
                }
                return Err(reason::MTU_EXCEEDED);
            }
            set_from_pod(ctx);
            // SAFETY: plain helper call.
            return Ok(unsafe { bpf_redirect(cfg.tunnel_ifindex, 0) } as i32);
        }
    }
    Ok(TC_ACT_OK)
}

/// The fields every flow event of one packet shares (one event builder for all programs).
#[derive(Clone, Copy)]
struct EvBase {
    src_identity: u32,
    dst_identity: u32,
    ifindex: u32,
    remote_node: u32,
    now: u64,
    /// The sending socket's cookie where the packet still carries its socket (a pod's own
    /// packets on its veth), else 0: names the Service a socket program translated from.
    cookie: u64,
}

impl EvBase {
    #[inline(always)]
    fn emit(&self, flow: &Flow, verdict: u8, reason: u32, direction: u8, flags: u32) {
        emit(
            flow,
            &Ev {
                src_identity: self.src_identity,
                dst_identity: self.dst_identity,
                ifindex: self.ifindex,
                remote_node: self.remote_node,
                verdict,
                reason,
                direction,
                flags,
                now: self.now,
                cookie: self.cookie,
            },
        );
    }

    /// Records a drop and returns its reason (for `Err(...)`).
    #[inline(always)]
    fn dropped(&self, flow: &Flow, reason: u32, direction: u8, flags: u32) -> u32 {
        self.emit(flow, verdict::DROPPED, reason, direction, flags);
        reason
    }
}

/// One packet as the admission step sees it.
struct Admit {
    ev: EvBase,
    /// The pod on this node the connection is about (egress: the source; from another node:
    /// the destination) and the other end: the auth key is (local, peer, ev.remote_node) and
    /// conntrack stores them in that order.
    local: u32,
    peer: u32,
    /// The source pod's egress policy applies (the packet leaves a pod of this node).
    egress: bool,
    /// The destination pod's ingress policy applies (it is a pod of this node).
    ingress: bool,
    /// Mutual authentication applies (the other end is on another node).
    auth_applies: bool,
    /// Direction events are recorded in.
    dir: u8,
}

/// The admission step both TC paths share: conntrack (a tracked connection passes while its
/// auth entry, if it needed one, lives), TCP may start only with a SYN, later fragments of an
/// enforced endpoint drop, egress and ingress policy, mutual authentication (held in the
/// agent's hold device when missing), then the conntrack entry that remembers why the
/// connection was admitted. `Ok(None)`: admitted, the caller steers; `Ok(Some(act))`: redirected
/// to the hold device, or delivered to the L7 proxy (a connection with L7 rules, both
/// directions: the SYN assigned to the proxy's listener, every packet marked for local
/// delivery); `Err(reason)`: dropped (recorded).
#[inline(always)]
fn admit(
    ctx: &TcContext,
    cfg: &DatapathConfig,
    flow: &Flow,
    a: &Admit,
    mut flags: u32,
) -> Result<Option<i32>, u32> {
    let ev = &a.ev;
    let now = ev.now;
    let [fwd, rev] = ct_keys(flow)?;
    if let Some((entry, is_reply)) = ct_lookup(flow, fwd, rev, now) {
        // SAFETY: map value pointer valid for this program run.
        let e = unsafe { &mut *entry };
        e.last_seen_ns = now;
        if e.flags & ct_flags::AUTH != 0
            && !auth_valid(e.src_identity, e.dst_identity, e.remote_node, now, is_reply)
        {
            VEIL_CT.remove(if is_reply { rev } else { fwd }).ok();
            return Err(ev.dropped(
                flow,
                reason::AUTH_REQUIRED,
                a.dir,
                flags | flow_flags::AUTH_REQUIRED,
            ));
        }
        count_verdict(verdict::FORWARDED);
        if e.flags & ct_flags::PROXY != 0 {
            set_mark(ctx, marks::TO_PROXY);
            return Ok(Some(TC_ACT_OK));
        }
        return Ok(None);
    }
    if !tcp_may_start(flow) {
        return Err(ev.dropped(flow, reason::TCP_NOT_ESTABLISHED, a.dir, flags));
    }
    if flow.later_fragment
        && ((a.egress && enforced(cfg, ev.src_identity, direction::EGRESS))
            || (a.ingress && enforced(cfg, ev.dst_identity, direction::INGRESS)))
    {
        return Err(ev.dropped(flow, reason::FRAGMENT, a.dir, flags));
    }
    let (src, dst) = (ev.src_identity, ev.dst_identity);
    let egress = if a.egress {
        decide(cfg, src, dst, flow.dport, flow.protocol, direction::EGRESS)
    } else {
        ALLOW
    };
    let ingress = if a.ingress {
        decide(cfg, dst, src, flow.dport, flow.protocol, direction::INGRESS)
    } else {
        ALLOW
    };
    let mut verdict_code = verdict::FORWARDED;
    let mut audit_reason = reason::NONE;
    let mut ct = 0u32;
    if a.egress {
        ct |= ct_flags::EGRESS_OK;
    }
    if a.ingress {
        ct |= ct_flags::INGRESS_OK;
    }
    // HTTP rules apply to TCP only (the compiler puts L7 on TCP entries only).
    if (egress.proxy || ingress.proxy) && flow.protocol == IPPROTO_TCP {
        ct |= ct_flags::PROXY;
    }
    for (d, dir) in [(egress, direction::EGRESS), (ingress, direction::INGRESS)] {
        if !d.allowed {
            if !d.audit {
                return Err(ev.dropped(flow, reason::POLICY_DENIED, dir, flags));
            }
            verdict_code = verdict::AUDIT;
            audit_reason = reason::POLICY_DENIED;
            ct |= ct_flags::AUDITED;
        }
        if d.auth_required {
            flags |= flow_flags::AUTH_REQUIRED;
        }
    }
    if flags & flow_flags::AUTH_REQUIRED != 0 && a.auth_applies {
        let authed = auth_valid(a.local, a.peer, ev.remote_node, now, false);
        if !authed && !(egress.auth_enforced || ingress.auth_enforced) {
            // Audit mode: the missing auth entry is reported, the flow passes.
            verdict_code = verdict::AUDIT;
            audit_reason = reason::AUTH_REQUIRED;
            ct |= ct_flags::AUDITED;
        } else if !authed {
            // No first-packet drop: hold the packet in the agent's hold device until the pair
            // is authenticated (the agent re-injects it, or drops and records it on timeout).
            // A proxied connection's SYN too: `veil_from_hold` assigns it to the proxy.
            if cfg.hold_ifindex != 0 {
                // SAFETY: plain helper call.
                return Ok(Some(unsafe { bpf_redirect(cfg.hold_ifindex, 0) } as i32));
            }
            return Err(ev.dropped(flow, reason::AUTH_REQUIRED, a.dir, flags));
        } else {
            flags |= flow_flags::AUTHENTICATED;
            ct |= ct_flags::AUTH;
        }
    }
    if ct & ct_flags::PROXY != 0 && !assign_proxy(ctx, cfg, flow) {
        return Err(ev.dropped(flow, reason::PROXY_UNAVAILABLE, a.dir, flags));
    }
    let entry = CtEntry {
        last_seen_ns: now,
        src_identity: a.local,
        dst_identity: a.peer,
        flags: ct,
        remote_node: ev.remote_node,
    };
    // A full table (LRU evicts, so only on allocation failure) must not pass the packet
    // untracked; it is still admitted, just re-evaluated on the next packet. A proxied
    // connection's later packets find no entry and drop (`tcp-not-established`): fail closed.
    let _ = VEIL_CT.insert(fwd, &entry, 0);
    ev.emit(flow, verdict_code, audit_reason, a.dir, flags);
    count_verdict(verdict_code);
    if ct & ct_flags::PROXY != 0 {
        set_mark(ctx, marks::TO_PROXY);
        return Ok(Some(TC_ACT_OK));
    }
    Ok(None)
}

/// Strict mode: traffic to a remote node's pods needs an installed tunnel peer.
#[inline(always)]
fn steer_check(cfg: &DatapathConfig, node_id: u32) -> Result<(), u32> {
    if cfg.flags & config_flags::ENCRYPT == 0 {
        return Ok(());
    }
    // SAFETY: read-only map value.
    let has_key =
        unsafe { VEIL_NODES.get(&node_id) }.is_some_and(|n| n.flags & node_flags::HAS_KEY != 0);
    if (!has_key || cfg.tunnel_ifindex == 0) && cfg.flags & config_flags::STRICT != 0 {
        return Err(reason::NO_KEY);
    }
    if cfg.tunnel_ifindex == 0 {
        return Err(reason::NO_KEY);
    }
    Ok(())
}

fn try_from_tunnel(ctx: &TcContext) -> Result<i32, u32> {
    count_interface(ctx);
    let cfg = config()?;
    // A TUN device carries bare IP packets: the header starts at offset 0.
    let version = ctx.load::<u8>(0).map_err(|_| reason::TRUNCATED)? >> 4;
    let flow = match version {
        4 => parse_v4(ctx, 0)?,
        6 => parse_v6(ctx, 0)?,
        _ => return Err(reason::UNSUPPORTED_L3),
    };
    ingress_from_node(ctx, &cfg, &flow, true)
}

/// A packet from another node for a pod here: decrypted from the tunnel, or — with encryption
/// off, the capture sanity check only — straight from the underlay. Ingress policy and auth of
/// the destination pod, conntrack, then the stack delivers.
#[inline(always)]
fn ingress_from_node(
    ctx: &TcContext,
    cfg: &DatapathConfig,
    flow: &Flow,
    encrypted: bool,
) -> Result<i32, u32> {
    // SAFETY: reading ifindex from the context is always valid in a TC program.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let src = lookup_ip(&flow.saddr);
    let src_identity = remote_identity(src);
    let src_node = src.map(|s| s.node_id).unwrap_or(0);
    let dst = match lookup_ip(&flow.daddr) {
        Some(d) if d.flags & ip_flags::LOCAL_POD != 0 => d,
        // Node encryption: another node's traffic for this node's own address (its peer's
        // allowed IPs hold that node's address, so veil-wg vouched for the source) goes to
        // the host stack, like the same packet from the underlay without node encryption.
        Some(d)
            if d.flags & ip_flags::HOST != 0
                && cfg.flags & config_flags::NODE_ENCRYPT != 0
                && encrypted =>
        {
            return Ok(TC_ACT_OK)
        }
        // This node's pod CIDR, no pod there now: deleted while the peer still sends, or not
        // set up yet.
        Some(d) if d.flags & ip_flags::POD_CIDR != 0 && d.node_id == cfg.node_id => {
            return Err(reason::ENDPOINT_GONE)
        }
        // Peers carry only pod traffic (their allowed IPs are pod CIDRs) and, with node
        // encryption, the nodes' own: a decrypted packet for anything else has nowhere
        // legitimate to go.
        _ => return Err(reason::UNKNOWN_ENDPOINT),
    };
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    let mut flags = if encrypted { flow_flags::ENCRYPTED } else { 0 };
    if flow.is_v6 {
        flags |= flow_flags::IPV6;
    }
    // Seen from this node's pod: the auth key and the conntrack entry are (local destination,
    // remote source, source node), like the egress side's; auth applies whatever the source
    // node (an unknown one has no auth entry, so it is held or dropped).
    let a = Admit {
        ev: EvBase {
            src_identity,
            dst_identity: dst.identity,
            ifindex,
            remote_node: src_node,
            now,
            cookie: 0,
        },
        local: dst.identity,
        peer: src_identity,
        egress: false,
        ingress: true,
        auth_applies: true,
        dir: direction::INGRESS,
    };
    if let Some(act) = admit(ctx, cfg, flow, &a, flags)? {
        return Ok(act);
    }
    // Delivery goes through the stack's /32 route to the pod's veth: bpf_redirect_neigh needs an
    // Ethernet header to replace, and a TUN device's packets have none.
    Ok(TC_ACT_OK)
}

#[inline(always)]
fn config() -> Result<DatapathConfig, u32> {
    match VEIL_CONFIG.get(0) {
        Some(c) => Ok(*c),
        None => Err(reason::DATAPATH_ERROR),
    }
}

#[inline(always)]
fn lookup_ip(addr: &[u8; 16]) -> Option<IpInfo> {
    let key = Key::new(128, IpKey { addr: *addr });
    VEIL_IPCACHE.get(&key).copied()
}

/// The security identity of a peer address: its pod identity, UNKNOWN for an address in a pod
/// CIDR that no pod holds, WORLD outside the cluster.
#[inline(always)]
fn remote_identity(info: Option<IpInfo>) -> u32 {
    match info {
        // Pods, and other nodes' own addresses (present with node encryption): remote-node.
        Some(i) if i.flags & (ip_flags::POD | ip_flags::NODE) != 0 => i.identity,
        Some(_) => identity::UNKNOWN,
        None => identity::WORLD,
    }
}

#[inline(always)]
fn policy_get(cfg: &DatapathConfig, key: &PolicyKey) -> u32 {
    // SAFETY: read-only map values.
    let e = if cfg.policy_slot == 0 {
        unsafe { VEIL_POLICY_A.get(key) }
    } else {
        unsafe { VEIL_POLICY_B.get(key) }
    };
    e.map(|e| e.flags).unwrap_or(0)
}

#[inline(always)]
fn enforced(cfg: &DatapathConfig, local: u32, dir: u8) -> bool {
    let marker = PolicyKey {
        local_identity: local,
        remote_identity: identity::SELECTOR_MARKER,
        dport: 0,
        protocol: 0,
        direction: dir,
    };
    policy_get(cfg, &marker) & policy_flags::ENFORCED != 0
}

/// The policy decision for `local` talking to `remote` in `dir`: the marker and six fixed
/// lookups, whatever the number of rules, combined by the rule the agent shares
/// (`veil_common::maps::{PolicyKey::lookups, policy_decision}`).
#[inline(always)]
fn decide(
    cfg: &DatapathConfig,
    local: u32,
    remote: u32,
    dport: u16,
    protocol: u8,
    dir: u8,
) -> Decision {
    let marker = policy_get(cfg, &PolicyKey::marker(local, dir));
    if marker & policy_flags::ENFORCED == 0 {
        return ALLOW;
    }
    let mut acc = 0u32;
    for k in PolicyKey::lookups(local, remote, dport, protocol, dir) {
        acc |= policy_get(cfg, &k);
    }
    policy_decision(Some(marker), acc, cfg.flags & config_flags::AUDIT != 0)
}

/// An unexpired auth entry for (local, remote, node). On a reply the tuple is the same one the
/// connection was admitted with.
#[inline(always)]
fn auth_valid(local: u32, remote: u32, node: u32, now: u64, _is_reply: bool) -> bool {
    let key = AuthKey {
        local_identity: local,
        remote_identity: remote,
        remote_node: node,
        _pad: 0,
    };
    // SAFETY: read-only map value.
    match unsafe { VEIL_AUTH.get(&key) } {
        Some(e) => e.expires_boot_ns > now,
        None => false,
    }
}

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// The conntrack entry of a packet, forward or reverse (then `true`). An entry idle past its
/// timeout, or a closing TCP entry met by a new SYN, is removed and counts as absent; FIN and
/// RST mark an entry closing.
#[inline(always)]
fn ct_lookup(flow: &Flow, fwd: &CtKey, rev: &CtKey, now: u64) -> Option<(*mut CtEntry, bool)> {
    let (entry, is_reply) = match VEIL_CT.get_ptr_mut(fwd) {
        Some(e) => (e, false),
        None => (VEIL_CT.get_ptr_mut(rev)?, true),
    };
    // SAFETY: map value pointer valid for this program run.
    let e = unsafe { &mut *entry };
    let tcp = flow.protocol == IPPROTO_TCP;
    let closing = e.flags & ct_flags::CLOSING != 0;
    let limit = match (tcp, closing) {
        (true, false) => ct_timeouts::TCP_NS,
        (true, true) => ct_timeouts::TCP_CLOSING_NS,
        _ => ct_timeouts::OTHER_NS,
    };
    let new_syn = tcp && closing && is_syn(flow);
    if now.saturating_sub(e.last_seen_ns) > limit || new_syn {
        VEIL_CT.remove(if is_reply { rev } else { fwd }).ok();
        return None;
    }
    if tcp && flow.tcp_flags != 0xff && flow.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        e.flags |= ct_flags::CLOSING;
    }
    Some((entry, is_reply))
}

/// A connection-opening SYN (SYN without ACK).
#[inline(always)]
fn is_syn(flow: &Flow) -> bool {
    flow.tcp_flags != 0xff && flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// Only a SYN may start tracking a TCP connection: any other TCP packet without an entry
/// belongs to a connection that was never admitted here, or was cut (policy change,
/// revocation, expiry). Later fragments (flags unknown) are left to the fragment rules.
#[inline(always)]
fn tcp_may_start(flow: &Flow) -> bool {
    flow.protocol != IPPROTO_TCP || flow.tcp_flags == 0xff || is_syn(flow)
}

/// The packet's conntrack keys, forward and reverse, in this CPU's [`VEIL_CT_SCRATCH`] slot.
#[inline(always)]
fn ct_keys(f: &Flow) -> Result<&'static [CtKey; 2], u32> {
    let k = scratch(&VEIL_CT_SCRATCH)?;
    k[0] = ct_key(f, false);
    k[1] = ct_key(f, true);
    Ok(k)
}

#[inline(always)]
fn ct_key(f: &Flow, reverse: bool) -> CtKey {
    if reverse {
        CtKey {
            saddr: f.daddr,
            daddr: f.saddr,
            sport: f.dport,
            dport: f.sport,
            protocol: f.protocol,
            _pad: [0; 3],
        }
    } else {
        CtKey {
            saddr: f.saddr,
            daddr: f.daddr,
            sport: f.sport,
            dport: f.dport,
            protocol: f.protocol,
            _pad: [0; 3],
        }
    }
}

#[inline(always)]
fn v4_mapped(a: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
    ]
}

#[inline(always)]
fn is_v4_mapped(a: &[u8; 16]) -> bool {
    a[..10] == [0u8; 10] && a[10] == 0xff && a[11] == 0xff
}

#[inline(always)]
fn parse_v4(ctx: &TcContext, off: usize) -> Result<Flow, u32> {
    let vihl: u8 = ctx.load(off).map_err(|_| reason::TRUNCATED)?;
    if vihl >> 4 != 4 {
        return Err(reason::UNSUPPORTED_L3);
    }
    let ihl = usize::from(vihl & 0x0f) * 4;
    if ihl < 20 {
        return Err(reason::TRUNCATED);
    }
    let frag = u16::from_be(ctx.load::<u16>(off + 6).map_err(|_| reason::TRUNCATED)?);
    let protocol: u8 = ctx.load(off + 9).map_err(|_| reason::TRUNCATED)?;
    let saddr: [u8; 4] = ctx.load(off + 12).map_err(|_| reason::TRUNCATED)?;
    let daddr: [u8; 4] = ctx.load(off + 16).map_err(|_| reason::TRUNCATED)?;
    let id = u32::from(u16::from_be(
        ctx.load::<u16>(off + 4).map_err(|_| reason::TRUNCATED)?,
    ));
    let later = frag & 0x1fff != 0;
    let more = frag & 0x2000 != 0;
    let (saddr, daddr) = (v4_mapped(saddr), v4_mapped(daddr));
    let (sport, dport, later_fragment) = if later {
        fragment_ports(&saddr, &daddr, id, protocol)
    } else {
        let (sp, dp) = ports(ctx, off + ihl, protocol)?;
        if more {
            remember_fragment(&saddr, &daddr, id, protocol, sp, dp);
        }
        (sp, dp, false)
    };
    let tcp_flags = if protocol == IPPROTO_TCP && !later {
        ctx.load::<u8>(off + ihl + 13).unwrap_or(0xff)
    } else {
        0xff
    };
    Ok(Flow {
        saddr,
        daddr,
        sport,
        dport,
        protocol,
        is_v6: false,
        later_fragment,
        icmp_type: 0xff,
        tcp_flags,
    })
}

/// ICMPv6 that never leaves the link: neighbour discovery (133–137) or MLD (130–132, 143),
/// addressed to a link-local address, a link-scope multicast group or the node's gateway
/// address on this link (the pod's neighbour advertisement answering the node). A router never
/// forwards such a packet, so it cannot carry data past policy to another endpoint.
#[inline(always)]
fn is_link_control(flow: &Flow) -> bool {
    if !matches!(flow.icmp_type, 130..=137 | 143) {
        return false;
    }
    let d = &flow.daddr;
    let link_local = d[0] == 0xfe && d[1] & 0xc0 == 0x80;
    let link_multicast = d[0] == 0xff && d[1] & 0x0f == 0x02;
    link_local
        || link_multicast
        || lookup_ip(d).is_some_and(|i| i.flags & ip_flags::HOST != 0)
}

#[inline(always)]
fn parse_v6(ctx: &TcContext, off: usize) -> Result<Flow, u32> {
    let first: u8 = ctx.load(off).map_err(|_| reason::TRUNCATED)?;
    if first >> 4 != 6 {
        return Err(reason::UNSUPPORTED_L3);
    }
    let mut next: u8 = ctx.load(off + 6).map_err(|_| reason::TRUNCATED)?;
    let saddr: [u8; 16] = ctx.load(off + 8).map_err(|_| reason::TRUNCATED)?;
    let daddr: [u8; 16] = ctx.load(off + 24).map_err(|_| reason::TRUNCATED)?;
    // IPv4 addresses live in the maps as v4-mapped IPv6 keys: a v6 packet carrying one would
    // be taken for the v4 pod (anti-spoofing, identity). No pod sends such packets.
    if is_v4_mapped(&saddr) || is_v4_mapped(&daddr) {
        return Err(reason::MAPPED_ADDRESS);
    }
    let mut l4 = off + 40;
    let mut later = false;
    let mut more = false;
    let mut frag_id = 0u32;
    // Walk a bounded number of extension headers (hop-by-hop, routing, fragment, dest opts).
    for _ in 0..4 {
        match next {
            0 | 43 | 60 => {
                let hdr: [u8; 2] = ctx.load(l4).map_err(|_| reason::TRUNCATED)?;
                next = hdr[0];
                l4 += (usize::from(hdr[1]) + 1) * 8;
            }
            44 => {
                let hdr: [u8; 8] = ctx.load(l4).map_err(|_| reason::TRUNCATED)?;
                next = hdr[0];
                let off_m = u16::from_be_bytes([hdr[2], hdr[3]]);
                later = off_m & 0xfff8 != 0;
                more = off_m & 1 != 0;
                frag_id = u32::from_be_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]);
                l4 += 8;
            }
            _ => break,
        }
    }
    // Still an extension header after the walk: protocol and ports unknown, so no port rule
    // could be applied; dropped, not passed with protocol = the header type.
    if matches!(next, 0 | 43 | 44 | 60 | 51 | 135 | 139 | 140) {
        return Err(reason::EXTENSION_HEADERS);
    }
    let (sport, dport, later_fragment) = if later {
        fragment_ports(&saddr, &daddr, frag_id, next)
    } else {
        let (sp, dp) = ports(ctx, l4, next)?;
        if more {
            remember_fragment(&saddr, &daddr, frag_id, next, sp, dp);
        }
        (sp, dp, false)
    };
    let icmp_type = if next == IPPROTO_ICMPV6 && !later {
        ctx.load::<u8>(l4).unwrap_or(0xff)
    } else {
        0xff
    };
    let tcp_flags = if next == IPPROTO_TCP && !later {
        ctx.load::<u8>(l4 + 13).unwrap_or(0xff)
    } else {
        0xff
    };
    Ok(Flow {
        saddr,
        daddr,
        sport,
        dport,
        protocol: next,
        is_v6: true,
        later_fragment,
        icmp_type,
        tcp_flags,
    })
}

/// Ports of a later fragment, from its first fragment; `(0, 0, true)` when the first was not
/// seen (then the fragment cannot be matched to a flow).
#[inline(always)]
fn fragment_ports(saddr: &[u8; 16], daddr: &[u8; 16], id: u32, protocol: u8) -> (u16, u16, bool) {
    let key = FragKey {
        saddr: *saddr,
        daddr: *daddr,
        id,
        protocol,
        _pad: [0; 3],
    };
    // SAFETY: read-only map value.
    match unsafe { VEIL_FRAGS.get(&key) } {
        Some(p) => (p.sport, p.dport, false),
        None => (0, 0, true),
    }
}

#[inline(always)]
fn remember_fragment(
    saddr: &[u8; 16],
    daddr: &[u8; 16],
    id: u32,
    protocol: u8,
    sport: u16,
    dport: u16,
) {
    let key = FragKey {
        saddr: *saddr,
        daddr: *daddr,
        id,
        protocol,
        _pad: [0; 3],
    };
    let _ = VEIL_FRAGS.insert(&key, &FragPorts { sport, dport }, 0);
}

/// Transport ports (host order). ICMP echo uses its identifier as both ports so the reply
/// matches the request in conntrack; other ICMP carries none.
#[inline(always)]
fn ports(ctx: &TcContext, l4: usize, protocol: u8) -> Result<(u16, u16), u32> {
    match protocol {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => {
            let p: [u8; 4] = ctx.load(l4).map_err(|_| reason::TRUNCATED)?;
            // A TCP header is at least 20 bytes: insist the fixed part is there.
            if protocol == IPPROTO_TCP {
                let _: [u8; 20] = ctx.load(l4).map_err(|_| reason::TRUNCATED)?;
            } else if protocol == IPPROTO_UDP {
                let _: [u8; 8] = ctx.load(l4).map_err(|_| reason::TRUNCATED)?;
            }
            Ok((
                u16::from_be_bytes([p[0], p[1]]),
                u16::from_be_bytes([p[2], p[3]]),
            ))
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            let h: [u8; 8] = ctx.load(l4).map_err(|_| reason::TRUNCATED)?;
            let echo = matches!(
                (protocol, h[0]),
                (IPPROTO_ICMP, 0 | 8) | (IPPROTO_ICMPV6, 128 | 129)
            );
            if echo {
                let id = u16::from_be_bytes([h[4], h[5]]);
                Ok((id, id))
            } else {
                Ok((0, 0))
            }
        }
        _ => Ok((0, 0)),
    }
}

/// What a flow event says beyond the packet's addresses and ports.
struct Ev {
    src_identity: u32,
    dst_identity: u32,
    ifindex: u32,
    remote_node: u32,
    reason: u32,
    flags: u32,
    now: u64,
    cookie: u64,
    verdict: u8,
    direction: u8,
}

/// Emits a flow event, throttled to one per key per second (suppressed packets are counted into
/// the next one). Not inlined: its stack frame stays out of the callers' 512 bytes, and the
/// event is written straight into the ring buffer slot.
#[inline(never)]
fn emit(f: &Flow, ev: &Ev) {
    let Ok(scratch) = scratch(&VEIL_EMIT_SCRATCH) else {
        return;
    };
    scratch.key = ThrottleKey {
        src_identity: ev.src_identity,
        dst_identity: ev.dst_identity,
        dport: f.dport,
        protocol: f.protocol,
        verdict: ev.verdict,
        reason: ev.reason,
    };
    let tk = &scratch.key;
    let mut count = 1u32;
    if let Some(st) = VEIL_EVENT_THROTTLE.get_ptr_mut(tk) {
        // SAFETY: map value pointer valid for this run.
        let st = unsafe { &mut *st };
        if ev.now.wrapping_sub(st.last_ns) < THROTTLE_NS {
            st.suppressed = st.suppressed.saturating_add(1);
            return;
        }
        count += st.suppressed;
        st.suppressed = 0;
        st.last_ns = ev.now;
    } else {
        scratch.state = ThrottleState {
            last_ns: ev.now,
            suppressed: 0,
            _pad: 0,
        };
        let _ = VEIL_EVENT_THROTTLE.insert(&scratch.key, &scratch.state, 0);
    }
    if let Some(mut slot) = VEIL_EVENTS.reserve::<FlowEvent>(0) {
        let p = slot.as_mut_ptr();
        // SAFETY: `p` points at a reserved, exclusively owned FlowEvent-sized slot.
        unsafe {
            (*p).time_boot_ns = ev.now;
            (*p).saddr = f.saddr;
            (*p).daddr = f.daddr;
            (*p).sport = f.sport;
            (*p).dport = f.dport;
            (*p).src_identity = ev.src_identity;
            (*p).dst_identity = ev.dst_identity;
            (*p).ifindex = ev.ifindex;
            (*p).remote_node = ev.remote_node;
            (*p).count = count;
            (*p).protocol = f.protocol;
            (*p).verdict = ev.verdict;
            (*p).direction = ev.direction;
            (*p)._pad = 0;
            (*p).reason = ev.reason;
            (*p).flags = ev.flags;
            (*p)._pad2 = 0;
            if ev.cookie != 0 {
                sock::service_of(ev.cookie, &f.daddr, f.dport, &mut (*p).service);
            } else {
                (*p).service = [0; 16];
            }
        }
        slot.submit(0);
    } else if let Some(lost) = VEIL_EVENTS_LOST.get_ptr_mut(0) {
        // The ring is full (the agent is not draining it fast enough): counted, so the flow
        // log's gap is known.
        // SAFETY: per-CPU slot.
        unsafe { *lost += 1 };
    }
}

#[inline(always)]
fn count_interface(ctx: &TcContext) {
    // SAFETY: reading ifindex from the context is always valid in a TC program.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let len = ctx.len() as u64;
    match VEIL_IF_STATS.get_ptr_mut(&ifindex) {
        // SAFETY: per-CPU value, no concurrent writer on this CPU while the program runs.
        Some(stats) => unsafe {
            (*stats).packets += 1;
            (*stats).bytes += len;
        },
        None => {
            let stats = IfStats {
                packets: 1,
                bytes: len,
                drops: 0,
            };
            // A full map only loses the per-interface count, never the packet's verdict.
            let _ = VEIL_IF_STATS.insert(&ifindex, &stats, 0);
        }
    }
}

#[inline(always)]
fn count_verdict(code: u8) {
    if let Some(c) = VEIL_VERDICTS.get_ptr_mut(u32::from(code)) {
        // SAFETY: per-CPU slot.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn drop_packet(ctx: &TcContext, code: u32) -> i32 {
    count_drop(ctx, code);
    TC_ACT_SHOT
}

/// Counts a dropped packet: on its interface, by reason, and as a DROPPED verdict.
fn count_drop(ctx: &TcContext, code: u32) {
    // SAFETY: reading ifindex from the context is always valid in a TC program.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    if let Some(stats) = VEIL_IF_STATS.get_ptr_mut(&ifindex) {
        // SAFETY: per-CPU value.
        unsafe { (*stats).drops += 1 };
    }
    if let Some(counter) = VEIL_DROPS.get_ptr_mut(code) {
        // SAFETY: per-CPU slot.
        unsafe { *counter += 1 };
    }
    count_verdict(verdict::DROPPED);
}

/// The tunnel MTU when this IP packet (or, for a GSO packet, one of its segments) is larger
/// than the tunnel device carries.
#[inline(always)]
fn tunnel_mtu_exceeded(
    ctx: &TcContext,
    flow: &Flow,
    tunnel_ifindex: u32,
) -> Result<Option<u32>, u32> {
    let load16 = |off: usize| -> Result<u32, u32> {
        Ok(u32::from(u16::from_be(
            ctx.load::<u16>(off).map_err(|_| reason::TRUNCATED)?,
        )))
    };
    // The L3 length from the header (bpf_check_mtu would otherwise count the Ethernet header
    // against a device that has none), and the L3 header's own length.
    let (l3_len, l3_hdr) = if flow.is_v6 {
        (load16(ETH_HLEN + 4)? + 40, 40)
    } else {
        let ver_ihl: u8 = ctx.load(ETH_HLEN).map_err(|_| reason::TRUNCATED)?;
        (load16(ETH_HLEN + 2)?, u32::from(ver_ihl & 0x0f) * 4)
    };
    let mut mtu = l3_len;
    // SAFETY: helper call on this program's own skb with a pointer to a stack variable; on
    // return `mtu` holds the device's MTU.
    let r = unsafe { bpf_check_mtu(ctx.skb.skb.cast(), tunnel_ifindex, &mut mtu, 0, 0) };
    if r < 0 {
        // The tunnel device is gone (veil-wg restarting; the agent re-points the datapath at
        // the new device): nothing can carry the packet, as when no tunnel exists yet.
        return Err(reason::NO_KEY);
    }
    if r > 0 {
        return Ok(Some(mtu));
    }
    // A GSO packet passes that check whole (the helper cannot check segments against an
    // explicit length): each segment is the headers plus gso_size bytes.
    // SAFETY: reading a field of this program's own context.
    let gso_size = unsafe { (*ctx.skb.skb).gso_size };
    if gso_size == 0 {
        return Ok(None);
    }
    let l4_hdr = if flow.protocol == IPPROTO_TCP {
        let doff: u8 = ctx
            .load(ETH_HLEN + l3_hdr.min(60) as usize + 12)
            .map_err(|_| reason::TRUNCATED)?;
        u32::from(doff >> 4) * 4
    } else {
        8
    };
    Ok((l3_hdr + l4_hdr + gso_size > mtu).then_some(mtu))
}

/// Whether an IPv4 packet has Don't Fragment set.
#[inline(always)]
fn ipv4_dont_fragment(ctx: &TcContext) -> Result<bool, u32> {
    let frag_off = u16::from_be(
        ctx.load::<u16>(ETH_HLEN + 6)
            .map_err(|_| reason::TRUNCATED)?,
    );
    Ok(frag_off & 0x4000 != 0)
}

/// One's-complement sum of big-endian 16-bit words, folded: an Internet checksum.
#[inline(always)]
fn inet_csum(words: &[u8]) -> u16 {
    csum_fold(csum_add(0, words))
}

/// Adds `words` (big-endian 16-bit words) to a one's complement sum, unfolded.
#[inline(always)]
fn csum_add(mut sum: u32, words: &[u8]) -> u32 {
    let mut i = 0;
    while i + 1 < words.len() {
        sum += u32::from(u16::from_be_bytes([words[i], words[i + 1]]));
        i += 2;
    }
    sum
}

/// Folds a one's complement sum into the 16-bit checksum.
#[inline(always)]
fn csum_fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// This CPU's slot of a one-entry scratch map, used only within this program run.
#[inline(always)]
fn scratch<T>(map: &'static PerCpuArray<T>) -> Result<&'static mut T, u32> {
    match map.get_ptr_mut(0) {
        // SAFETY: this CPU's slot; a program run is not preempted on its CPU.
        Some(p) => Ok(unsafe { &mut *p }),
        None => Err(reason::DATAPATH_ERROR),
    }
}

/// Makes the packet the reply built in `out` and sends it out on `ifindex`.
#[inline(always)]
fn send_reply<const N: usize>(ctx: &TcContext, out: &[u8; N], ifindex: u32) -> Result<i32, u32> {
    // SAFETY: helper call on this program's own skb; it only trims the packet.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, N as u32, 0) } != 0 {
        return Err(reason::MTU_EXCEEDED);
    }
    ctx.store(0, out, 0).map_err(|_| reason::DATAPATH_ERROR)?;
    // SAFETY: plain helper call.
    Ok(unsafe { bpf_redirect(ifindex, 0) } as i32)
}

/// Copies `len` bytes of the packet at `offset` into `out` at `at`: a constant-length copy
/// straight into a scratch slot (aya's load_bytes clamps the length to the packet, which the
/// verifier cannot prove non-zero).
#[inline(always)]
fn load_into<const N: usize>(
    ctx: &TcContext,
    offset: usize,
    out: &mut [u8; N],
    at: usize,
    len: usize,
) -> Result<(), u32> {
    // SAFETY: helper call on this program's own skb into `len` bytes of the slot at `at`.
    let r = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            offset as u32,
            out.as_mut_ptr().add(at).cast(),
            len as u32,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(reason::TRUNCATED)
    }
}

/// The Ethernet header of an answer to this packet: back to where it came from.
#[inline(always)]
fn reply_ethernet<const N: usize>(
    ctx: &TcContext,
    out: &mut [u8; N],
    ethertype: u16,
) -> Result<(), u32> {
    load_into(ctx, 0, out, 0, 12)?;
    for i in 0..6 {
        out.swap(i, i + 6);
    }
    out[12..14].copy_from_slice(&ethertype.to_be_bytes());
    Ok(())
}

/// Length of the ICMP "fragmentation needed" packet `frag_needed_v4` builds: Ethernet, IPv4
/// (20), ICMP header (8), the quoted IPv4 header (20) and 8 bytes of its payload.
const FRAG_NEEDED_LEN: usize = ETH_HLEN + 20 + 8 + 28;

/// Scratch space for building that packet (the programs' stacks are near the 512-byte limit).
#[map(name = "VEIL_SCRATCH")]
static VEIL_SCRATCH: PerCpuArray<[u8; FRAG_NEEDED_LEN]> = PerCpuArray::with_max_entries(1, 0);

/// Turns this IPv4 packet (DF set, too big for the tunnel) into ICMP "fragmentation needed"
/// (type 3, code 4) carrying `mtu`, from the address it was sent to, quoting its IP header and
/// first 8 payload bytes, and sends it back out to the pod on `ifindex`: PMTU discovery then
/// works across the tunnel (RFC 1191) instead of the packet vanishing inside it.
#[inline(always)]
fn frag_needed_v4(ctx: &TcContext, ifindex: u32, mtu: u32) -> Result<i32, u32> {
    // Only a 20-byte header is quoted here; options are rare from pods and then only dropped.
    let ver_ihl: u8 = ctx.load(ETH_HLEN).map_err(|_| reason::TRUNCATED)?;
    if ver_ihl != 0x45 {
        return Err(reason::MTU_EXCEEDED);
    }
    let out = scratch(&VEIL_SCRATCH)?;
    const IP: usize = ETH_HLEN;
    const ICMP: usize = IP + 20;
    const QUOTED: usize = ICMP + 8;
    reply_ethernet(ctx, out, ETH_P_IP)?;
    load_into(ctx, ETH_HLEN, out, QUOTED, 28)?;
    // IPv4: from the address the pod tried to reach, to the pod.
    out[IP..ICMP].fill(0);
    out[IP] = 0x45;
    out[IP + 2..IP + 4].copy_from_slice(&((FRAG_NEEDED_LEN - ETH_HLEN) as u16).to_be_bytes());
    out[IP + 8] = 64;
    out[IP + 9] = IPPROTO_ICMP;
    for i in 0..4 {
        out[IP + 12 + i] = out[QUOTED + 16 + i];
        out[IP + 16 + i] = out[QUOTED + 12 + i];
    }
    let c = inet_csum(&out[IP..ICMP]);
    out[IP + 10..IP + 12].copy_from_slice(&c.to_be_bytes());
    // ICMP: type 3 code 4, next-hop MTU.
    out[ICMP..QUOTED].fill(0);
    out[ICMP] = 3;
    out[ICMP + 1] = 4;
    out[ICMP + 6..ICMP + 8].copy_from_slice(&(mtu.min(0xffff) as u16).to_be_bytes());
    let c = inet_csum(&out[ICMP..]);
    out[ICMP + 2..ICMP + 4].copy_from_slice(&c.to_be_bytes());
    send_reply(ctx, out, ifindex)
}

/// IPv6's minimum link MTU: a Packet Too Big below it is not sent (a host would ignore it).
const IPV6_MIN_MTU: u32 = 1280;

/// Length of the ICMPv6 Packet Too Big `packet_too_big_v6` builds: Ethernet, IPv6 (40), ICMPv6
/// header (8), the quoted IPv6 header (40) and 8 bytes of its payload.
const PTB_LEN: usize = ETH_HLEN + 40 + 8 + 48;

/// Scratch space for building that packet (its own slot: the IPv4 one keeps its size).
#[map(name = "VEIL_SCRATCH6")]
static VEIL_SCRATCH6: PerCpuArray<[u8; PTB_LEN]> = PerCpuArray::with_max_entries(1, 0);

/// Turns this IPv6 packet (too big for the tunnel; IPv6 is never fragmented on the path) into
/// ICMPv6 Packet Too Big (type 2) carrying `mtu`, from the address it was sent to, quoting its
/// IPv6 header and first 8 payload bytes, and sends it back out to the pod on `ifindex`: path
/// MTU discovery then works across the tunnel (RFC 8201), as `frag_needed_v4` does for IPv4.
#[inline(always)]
fn packet_too_big_v6(ctx: &TcContext, ifindex: u32, mtu: u32) -> Result<i32, u32> {
    let out = scratch(&VEIL_SCRATCH6)?;
    const IP: usize = ETH_HLEN;
    const ICMP: usize = IP + 40;
    const QUOTED: usize = ICMP + 8;
    reply_ethernet(ctx, out, ETH_P_IPV6)?;
    load_into(ctx, ETH_HLEN, out, QUOTED, 48)?;
    // IPv6: from the address the pod tried to reach, to the pod.
    out[IP..ICMP].fill(0);
    out[IP] = 0x60;
    out[IP + 4..IP + 6].copy_from_slice(&((PTB_LEN - ICMP) as u16).to_be_bytes());
    out[IP + 6] = IPPROTO_ICMPV6;
    out[IP + 7] = 64;
    for i in 0..16 {
        out[IP + 8 + i] = out[QUOTED + 24 + i];
        out[IP + 24 + i] = out[QUOTED + 8 + i];
    }
    // ICMPv6: type 2 code 0, the MTU; the checksum covers the pseudo-header (both addresses,
    // the ICMPv6 length, next header 58) and the message.
    out[ICMP..QUOTED].fill(0);
    out[ICMP] = 2;
    out[ICMP + 4..ICMP + 8].copy_from_slice(&mtu.to_be_bytes());
    let pseudo = ((PTB_LEN - ICMP) as u32) + u32::from(IPPROTO_ICMPV6);
    let sum = csum_add(csum_add(pseudo, &out[IP + 8..IP + 40]), &out[ICMP..]);
    out[ICMP + 2..ICMP + 4].copy_from_slice(&csum_fold(sum).to_be_bytes());
    send_reply(ctx, out, ifindex)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
