//! Drop reasons: stable codes shared with the kernel side and stable kebab-case names shown to
//! users (`veil status`, `veil observe`, metrics). Codes index the drop-counter array; never
//! renumber one, only append.

pub const NONE: u32 = 0;
/// Destination is a cluster pod CIDR whose node has no installed WireGuard peer (strict mode).
pub const NO_KEY: u32 = 1;
/// Denied by policy (or by default-deny once a policy selects the endpoint).
pub const POLICY_DENIED: u32 = 2;
/// Policy requires mutual authentication and no valid auth entry exists.
pub const AUTH_REQUIRED: u32 = 3;
/// The packet was too short for the headers it claims.
pub const TRUNCATED: u32 = 4;
/// A non-first IP fragment with no tracked flow (ports unknown).
pub const FRAGMENT: u32 = 5;
/// Source address does not belong to the pod the packet came from.
pub const SPOOFED_SOURCE: u32 = 6;
/// The datapath is missing its configuration or a map write failed (fails closed).
pub const DATAPATH_ERROR: u32 = 7;
/// Destination pod is not known on this node.
pub const UNKNOWN_ENDPOINT: u32 = 8;
/// Unsupported layer-3 protocol on a pod interface.
pub const UNSUPPORTED_L3: u32 = 9;
/// Held waiting for a workload handshake and the hold queue was full.
pub const AUTH_QUEUE_FULL: u32 = 10;
/// The remote peer failed node authentication (wrong trust domain, wrong SPIFFE ID, ...).
pub const PEER_UNAUTHENTICATED: u32 = 11;

/// With encryption on, a plaintext packet for a pod address arrived on the underlay interface
/// (only WireGuard and the control channel may carry pod traffic between nodes).
pub const PLAINTEXT_UNDERLAY: u32 = 12;
/// A packet entering the tunnel with a local pod's source address did not come from that pod
/// (a host-network process posing as a pod).
pub const HOST_SPOOFED: u32 = 13;
/// An IPv6 packet with an IPv4-mapped address (`::ffff:a.b.c.d`): it would alias a v4 pod.
pub const MAPPED_ADDRESS: u32 = 14;
/// More IPv6 extension headers than the datapath walks: ports and protocol unknown.
pub const EXTENSION_HEADERS: u32 = 15;
/// A TCP packet other than a connection-opening SYN for a connection conntrack does not know
/// (never admitted, expired, or cut by a policy change or revocation): only a SYN can start one.
pub const TCP_NOT_ESTABLISHED: u32 = 16;
/// Larger than the tunnel carries (a pod whose MTU is above the tunnel's). With DF set the pod
/// gets ICMP "fragmentation needed" with the tunnel MTU, as from a router on the path; without
/// DF, or on IPv6, it is only dropped.
pub const MTU_EXCEEDED: u32 = 17;
/// A connection (or datagram) to a Service with no ready backend, refused at the socket
/// (`ECONNREFUSED`) before any packet was made; counted here, not a packet drop.
pub const SERVICE_NO_BACKEND: u32 = 18;
/// A new connection that policy sends through the node's L7 proxy, and no proxy listens
/// (dead, restarting, or not configured): dropped, never passed around the proxy.
pub const PROXY_UNAVAILABLE: u32 = 19;
/// For an address in this node's pod CIDR that no pod here holds now: the pod was deleted
/// (a peer still sending to it), or is not set up yet (its veth not known). Not delivered:
/// the address may be given to another pod next.
pub const ENDPOINT_GONE: u32 = 20;

/// Size of the drop-counter array; one past the highest code.
pub const MAX: u32 = 32;

/// The stable user-facing name of a drop reason.
pub const fn name(code: u32) -> &'static str {
    match code {
        NONE => "none",
        NO_KEY => "no-key",
        POLICY_DENIED => "policy-denied",
        AUTH_REQUIRED => "auth-required",
        TRUNCATED => "truncated",
        FRAGMENT => "fragment",
        SPOOFED_SOURCE => "spoofed-source",
        DATAPATH_ERROR => "datapath-error",
        UNKNOWN_ENDPOINT => "unknown-endpoint",
        UNSUPPORTED_L3 => "unsupported-l3",
        AUTH_QUEUE_FULL => "auth-queue-full",
        PEER_UNAUTHENTICATED => "peer-unauthenticated",
        PLAINTEXT_UNDERLAY => "plaintext-from-underlay",
        HOST_SPOOFED => "host-spoofed-source",
        MAPPED_ADDRESS => "v4-mapped-address",
        EXTENSION_HEADERS => "extension-headers",
        TCP_NOT_ESTABLISHED => "tcp-not-established",
        MTU_EXCEEDED => "mtu-exceeded",
        SERVICE_NO_BACKEND => "service-no-backend",
        PROXY_UNAVAILABLE => "proxy-unavailable",
        ENDPOINT_GONE => "endpoint-gone",
        _ => "unknown",
    }
}

/// Every named reason, in code order (for metrics that list all reasons, even at zero).
pub const ALL: [u32; 21] = [
    NONE,
    NO_KEY,
    POLICY_DENIED,
    AUTH_REQUIRED,
    TRUNCATED,
    FRAGMENT,
    SPOOFED_SOURCE,
    DATAPATH_ERROR,
    UNKNOWN_ENDPOINT,
    UNSUPPORTED_L3,
    AUTH_QUEUE_FULL,
    PEER_UNAUTHENTICATED,
    PLAINTEXT_UNDERLAY,
    HOST_SPOOFED,
    MAPPED_ADDRESS,
    EXTENSION_HEADERS,
    TCP_NOT_ESTABLISHED,
    MTU_EXCEEDED,
    SERVICE_NO_BACKEND,
    PROXY_UNAVAILABLE,
    ENDPOINT_GONE,
];

/// The code for a user-facing name, for parsing filters.
pub fn from_name(n: &str) -> Option<u32> {
    ALL.iter().copied().find(|&code| name(code) == n)
}
