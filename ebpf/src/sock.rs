//! Socket-level Service load balancing (cgroup sock_addr programs, attached to the cgroup that
//! holds the node's pods).
//!
//! `connect` and `sendmsg` to a Service frontend (ClusterIP, port, protocol) are rewritten to
//! one ready backend, once per connection (per datagram for unconnected UDP): no packet is ever
//! NATed, so TCP pays nothing per packet and the TC programs see — and decide policy on — the
//! backend pod itself. What was translated is remembered per socket and backend
//! ([`VEIL_SVC_REVNAT`]), so `getpeername` and `recvmsg` show the ClusterIP the application
//! asked for, and flow events name the Service. A frontend without a ready backend refuses at
//! once (`ECONNREFUSED`, counted as `service-no-backend`); an address that is not a frontend is
//! left alone.
//!
//! The IPv6 programs serve IPv4-mapped destinations of dual-stack sockets as well as IPv6
//! frontends; an IPv4 frontend's backend reached from an IPv4 socket must be IPv4 (else refused).

use aya_ebpf::{
    helpers::{
        bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_ktime_get_boot_ns,
        bpf_set_retval,
    },
    macros::{cgroup_sock_addr, map},
    maps::{HashMap, LruHashMap, PerCpuArray},
    programs::SockAddrContext,
    EbpfContext,
};
use veil_common::{
    maps::{
        service_flags, AffinityEntry, AffinityKey, Backend, BackendKey, RevNatKey, ServiceEntry,
        ServiceKey, BACKENDS_MAX, SERVICES_MAX, SVC_AFFINITY_MAX, SVC_REVNAT_MAX,
    },
    reason,
};

use crate::{is_v4_mapped, v4_mapped};

#[map(name = "VEIL_SERVICES")]
static VEIL_SERVICES: HashMap<ServiceKey, ServiceEntry> = HashMap::pinned(SERVICES_MAX, 0);
#[map(name = "VEIL_BACKENDS")]
static VEIL_BACKENDS: HashMap<BackendKey, Backend> = HashMap::pinned(BACKENDS_MAX, 0);
#[map(name = "VEIL_SVC_REVNAT")]
static VEIL_SVC_REVNAT: LruHashMap<RevNatKey, Backend> = LruHashMap::pinned(SVC_REVNAT_MAX, 0);
#[map(name = "VEIL_SVC_AFFINITY")]
static VEIL_SVC_AFFINITY: LruHashMap<AffinityKey, AffinityEntry> =
    LruHashMap::pinned(SVC_AFFINITY_MAX, 0);

/// The key of [`service_of`]'s lookup, built here rather than on the stack of the TC
/// programs, which are near the 512-byte limit.
#[map(name = "VEIL_SVC_SCRATCH")]
static VEIL_SVC_SCRATCH: PerCpuArray<RevNatKey> = PerCpuArray::with_max_entries(1, 0);

/// cgroup sock_addr verdicts.
const ALLOW: i32 = 1;
const REJECT: i32 = 0;
const ECONNREFUSED: i32 = 111;

#[cgroup_sock_addr(connect4)]
pub fn veil_sock_connect4(ctx: SockAddrContext) -> i32 {
    translate4(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn veil_sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    translate4(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn veil_sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse4(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn veil_sock_getpeername4(ctx: SockAddrContext) -> i32 {
    reverse4(&ctx);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn veil_sock_connect6(ctx: SockAddrContext) -> i32 {
    translate6(&ctx)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn veil_sock_sendmsg6(ctx: SockAddrContext) -> i32 {
    translate6(&ctx)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn veil_sock_recvmsg6(ctx: SockAddrContext) -> i32 {
    reverse6(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn veil_sock_getpeername6(ctx: SockAddrContext) -> i32 {
    reverse6(&ctx);
    ALLOW
}

/// Writes into `out` the ClusterIP (IPv4 mapped into IPv6) the socket `cookie` was translated
/// from when it sent to `daddr`:`dport`, all zeros if it was not (for flow events).
#[inline(always)]
pub fn service_of(cookie: u64, daddr: &[u8; 16], dport: u16, out: &mut [u8; 16]) {
    *out = [0; 16];
    let Some(key) = VEIL_SVC_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot, used only within this program run.
    let key = unsafe { &mut *key };
    key.cookie = cookie;
    key.backend.addr = *daddr;
    key.backend.port = dport;
    key.backend._pad = 0;
    key._pad = 0;
    // SAFETY: the value is copied out before the map can change it.
    if let Some(front) = unsafe { VEIL_SVC_REVNAT.get(key) } {
        *out = front.addr;
    }
}

enum Pick {
    /// Not a Service frontend: leave the address alone.
    NotService,
    /// A frontend with no ready backend.
    Refuse,
    To(Backend),
}

fn translate4(ctx: &SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the context pointer is valid for this run; these fields are readable in every
    // sock_addr program this is attached as.
    let (ip, port, protocol) = unsafe { ((*sa).user_ip4, (*sa).user_port, (*sa).protocol) };
    let key = ServiceKey {
        addr: v4_mapped(ip.to_ne_bytes()),
        port: u16::from_be(port as u16),
        protocol: protocol as u8,
        _pad: 0,
    };
    match pick(ctx, &key) {
        Pick::NotService => ALLOW,
        Pick::To(b) if is_v4_mapped(&b.addr) => {
            // SAFETY: user_ip4 and user_port are writable in connect4 and sendmsg4.
            unsafe {
                (*sa).user_ip4 =
                    u32::from_ne_bytes([b.addr[12], b.addr[13], b.addr[14], b.addr[15]]);
                (*sa).user_port = u32::from(b.port.to_be());
            }
            ALLOW
        }
        _ => refuse(),
    }
}

fn translate6(ctx: &SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: as in translate4, for the IPv6 fields.
    let (ip, port, protocol) = unsafe { ((*sa).user_ip6, (*sa).user_port, (*sa).protocol) };
    let key = ServiceKey {
        addr: words_to_addr(ip),
        port: u16::from_be(port as u16),
        protocol: protocol as u8,
        _pad: 0,
    };
    match pick(ctx, &key) {
        Pick::NotService => ALLOW,
        // A mapped frontend needs a mapped backend (the socket may be IPv4 underneath), and an
        // IPv6 frontend an IPv6 one.
        Pick::To(b) if is_v4_mapped(&b.addr) == is_v4_mapped(&key.addr) => {
            // user_ip6 and user_port are writable in connect6 and sendmsg6.
            set_addr6(ctx, &b);
            ALLOW
        }
        _ => refuse(),
    }
}

#[inline(always)]
fn refuse() -> i32 {
    if let Some(counter) = crate::VEIL_DROPS.get_ptr_mut(reason::SERVICE_NO_BACKEND) {
        // SAFETY: per-CPU slot.
        unsafe { *counter += 1 };
    }
    // SAFETY: plain helper call; makes connect()/sendmsg() fail with ECONNREFUSED instead of
    // the default EPERM of a rejecting program.
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    REJECT
}

fn pick(ctx: &SockAddrContext, key: &ServiceKey) -> Pick {
    // SAFETY: copied out at once.
    let svc = match unsafe { VEIL_SERVICES.get(key) } {
        Some(s) => *s,
        None => return Pick::NotService,
    };
    if svc.count == 0 {
        return Pick::Refuse;
    }
    // SAFETY: plain helper calls on this program's own context.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    let affinity = svc.flags & service_flags::AFFINITY != 0;
    let akey = AffinityKey {
        // SAFETY: as above.
        netns_cookie: if affinity {
            unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }
        } else {
            0
        },
        service: *key,
        _pad: 0,
    };
    let mut chosen: Option<(u32, Backend)> = None;
    if affinity {
        // SAFETY: copied out at once.
        if let Some(a) = unsafe { VEIL_SVC_AFFINITY.get(&akey) } {
            let a = *a;
            let fresh =
                now.wrapping_sub(a.last_ns) < u64::from(svc.affinity_timeout_s) * 1_000_000_000;
            // The remembered backend must still be in its slot (not removed or moved).
            if fresh && a.slot < svc.count {
                if let Some(b) = backend(key, a.slot) {
                    if b == a.backend {
                        chosen = Some((a.slot, b));
                    }
                }
            }
        }
    }
    let (slot, b) = match chosen {
        Some(c) => c,
        None => {
            // SAFETY: plain helper call.
            let slot = unsafe { bpf_get_prandom_u32() } % svc.count;
            // A slot missing while the agent rewrites the set: slot 0 is written first.
            match backend(key, slot)
                .map(|b| (slot, b))
                .or_else(|| backend(key, 0).map(|b| (0, b)))
            {
                Some(c) => c,
                None => return Pick::Refuse,
            }
        }
    };
    if affinity {
        let entry = AffinityEntry {
            backend: b,
            slot,
            last_ns: now,
        };
        let _ = VEIL_SVC_AFFINITY.insert(&akey, &entry, 0);
    }
    let rkey = RevNatKey {
        // SAFETY: plain helper call on this program's own context.
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        backend: b,
        _pad: 0,
    };
    let front = Backend {
        addr: key.addr,
        port: key.port,
        _pad: 0,
    };
    // Without the entry getpeername/recvmsg would show the backend: a full LRU evicts the
    // oldest, so this only fails on a map error, and the connection still works.
    let _ = VEIL_SVC_REVNAT.insert(&rkey, &front, 0);
    Pick::To(b)
}

#[inline(always)]
fn backend(key: &ServiceKey, slot: u32) -> Option<Backend> {
    let bk = BackendKey {
        service: *key,
        slot,
    };
    // SAFETY: copied out at once.
    unsafe { VEIL_BACKENDS.get(&bk) }.copied()
}

/// The frontend a socket's peer address was translated from, if any.
#[inline(always)]
fn frontend(ctx: &SockAddrContext, addr: [u8; 16], port: u32) -> Option<Backend> {
    let key = RevNatKey {
        // SAFETY: plain helper call on this program's own context.
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        backend: Backend {
            addr,
            port: u16::from_be(port as u16),
            _pad: 0,
        },
        _pad: 0,
    };
    // SAFETY: copied out at once.
    unsafe { VEIL_SVC_REVNAT.get(&key) }.copied()
}

fn reverse4(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // SAFETY: readable in recvmsg4 and getpeername4.
    let (ip, port) = unsafe { ((*sa).user_ip4, (*sa).user_port) };
    if let Some(f) = frontend(ctx, v4_mapped(ip.to_ne_bytes()), port) {
        if is_v4_mapped(&f.addr) {
            // SAFETY: writable in recvmsg4 and getpeername4.
            unsafe {
                (*sa).user_ip4 =
                    u32::from_ne_bytes([f.addr[12], f.addr[13], f.addr[14], f.addr[15]]);
                (*sa).user_port = u32::from(f.port.to_be());
            }
        }
    }
}

fn reverse6(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // SAFETY: readable in recvmsg6 and getpeername6.
    let (ip, port) = unsafe { ((*sa).user_ip6, (*sa).user_port) };
    if let Some(f) = frontend(ctx, words_to_addr(ip), port) {
        // Writable in recvmsg6 and getpeername6.
        set_addr6(ctx, &f);
    }
}

/// Writes `to` as the socket address of an IPv6 sock_addr program (the caller's program type
/// allows writing `user_ip6` and `user_port`).
#[inline(always)]
fn set_addr6(ctx: &SockAddrContext, to: &Backend) {
    let w = addr_to_words(&to.addr);
    let sa = ctx.sock_addr;
    // SAFETY: the context pointer is valid for this run; the fields are writable (see above).
    unsafe {
        (*sa).user_ip6[0] = w[0];
        (*sa).user_ip6[1] = w[1];
        (*sa).user_ip6[2] = w[2];
        (*sa).user_ip6[3] = w[3];
        (*sa).user_port = u32::from(to.port.to_be());
    }
}

/// `user_ip6` words (each in network byte order) as address bytes.
#[inline(always)]
fn words_to_addr(w: [u32; 4]) -> [u8; 16] {
    let mut a = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = w[i].to_ne_bytes();
        a[i * 4] = b[0];
        a[i * 4 + 1] = b[1];
        a[i * 4 + 2] = b[2];
        a[i * 4 + 3] = b[3];
        i += 1;
    }
    a
}

#[inline(always)]
fn addr_to_words(a: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}
