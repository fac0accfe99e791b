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

/// WireGuard's default UDP port, the one every node listens on unless configured otherwise.
pub const DEFAULT_LISTEN_PORT: u16 = 51820;

/// What WireGuard adds inside its UDP payload to every data packet: the 16-byte header
/// (type, receiver index, counter) and the 16-byte Poly1305 tag.
pub const DATA_OVERHEAD: u32 = 32;

/// WireGuard's per-packet overhead on the underlay: outer IP header (20, or 40 on IPv6) + UDP
/// (8) + [`DATA_OVERHEAD`].
pub const fn overhead(ipv6_underlay: bool) -> u32 {
    let ip = if ipv6_underlay { 40 } else { 20 };
    ip + 8 + DATA_OVERHEAD
}

/// Brings up a TUN device veil made (created down) without an IPv6 link-local address: with
/// one, the kernel would send its own router solicitations and multicast listener reports into
/// the device, where no peer takes them. Where IPv6 is off the sysctl is absent and nothing is
/// needed. IPv6 packets routed into the device still pass.
pub fn enable_without_link_local(dev: &tun_rs::SyncDevice, name: &str) -> std::io::Result<()> {
    let sysctl = std::path::Path::new("/proc/sys/net/ipv6/conf")
        .join(name)
        .join("addr_gen_mode");
    if sysctl.exists() {
        // 1: no link-local address is generated.
        std::fs::write(&sysctl, "1")?;
    }
    dev.enabled(true)
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
