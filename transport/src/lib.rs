//! veil's WireGuard transport.
//!
//! Will own: x25519 key types (zeroizing, redacted), the `Tunnel` trait (device key, listen port,
//! peers with preshared keys, endpoints and allowed IPs, per-peer stats), the userspace backend
//! (`veil-wg`: TUN + UDP + boringtun, configured over the WireGuard cross-platform UAPI) and the
//! kernel backend (generic netlink `wireguard` family).
//!
//! Must not depend on: the agent, policy, identity or any cluster-state source; it moves keyed
//! packets between nodes and knows nothing of who the pods are.
