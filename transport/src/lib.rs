//! veil's WireGuard transport.
//!
//! Owns: x25519 key types (zeroizing, redacted), the `Tunnel` trait (device key, listen port,
//! peers with preshared keys, endpoints and allowed IPs, per-peer stats), the userspace backend
//! (`veil-wg`: TUN + UDP + boringtun, configured over the WireGuard cross-platform UAPI) and the
//! kernel backend (generic netlink `wireguard` family).
//!
//! Must not depend on: the agent, policy, identity or any cluster-state source; it moves keyed
//! packets between nodes and knows nothing of who the pods are.

pub mod allowed_ips;
pub mod kernel;
pub mod key;
pub mod tunnel;
pub mod uapi;
pub mod userspace;

pub use allowed_ips::IpPrefix;
pub use key::{KeyError, PresharedKey, PrivateKey, PublicKey};
pub use tunnel::{Backend, DeviceState, Error, PeerConfig, PeerState, Tunnel};

/// WireGuard's per-packet overhead: outer IP header + UDP (8) + WireGuard header and tag (32).
pub const fn overhead(ipv6_underlay: bool) -> u32 {
    if ipv6_underlay {
        80
    } else {
        60
    }
}

/// Makes a panic in any thread end the whole process (after the default report), for veil-wg
/// and the agent: a process with one dead thread looks healthy to its supervisor while it moves
/// no packets, and a dead process is restarted and counted. Tests keep unwinding panics; only
/// the binaries install this.
pub fn abort_on_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        eprintln!("veil: a thread panicked; aborting the process so it is restarted");
        std::process::abort();
    }));
}
