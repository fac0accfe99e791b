//! The `Tunnel` trait the agent programs, whatever the backend, and the plain data it speaks.

use std::{collections::BTreeMap, net::SocketAddr, time::SystemTime};

use crate::{
    allowed_ips::IpPrefix,
    key::PresharedKey,
    uapi::{PeerChange, SetRequest},
    PrivateKey, PublicKey,
};

/// Which implementation carries the packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `veil-wg`: TUN + UDP + boringtun in a separate long-lived process.
    Userspace,
    /// The kernel's WireGuard, configured over generic netlink.
    Kernel,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Userspace => "userspace",
            Backend::Kernel => "kernel",
        }
    }
}

/// Errors programming a tunnel.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot reach {what} at {path}")]
    Connect {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} i/o failed")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the device refused the configuration (errno {errno})")]
    Refused { errno: i32 },
    #[error("bad reply from the device: {0}")]
    Protocol(#[from] crate::uapi::UapiError),
    #[error("cannot start veil-wg ({binary})")]
    Spawn {
        binary: String,
        #[source]
        source: std::io::Error,
    },
    #[error("veil-wg for {interface} did not come up within {waited_ms} ms; see {log}")]
    NotReady {
        interface: String,
        waited_ms: u64,
        log: String,
    },
    #[error("kernel wireguard: {0}")]
    Netlink(String),
    #[error("the kernel has no WireGuard (generic netlink family `wireguard` not found)")]
    KernelUnavailable,
}

/// What the agent wants for one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    pub public_key: PublicKey,
    pub preshared_key: Option<PresharedKey>,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpPrefix>,
    pub persistent_keepalive: Option<u16>,
}

/// A peer as the device reports it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PeerState {
    pub public_key: Option<PublicKey>,
    pub has_preshared_key: bool,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpPrefix>,
    pub last_handshake: Option<SystemTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub persistent_keepalive: Option<u16>,
}

/// The device as it reports itself.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeviceState {
    pub public_key: Option<PublicKey>,
    pub listen_port: u16,
    pub fwmark: u32,
    pub peers: Vec<PeerState>,
}

/// A WireGuard device the agent programs. Calls are short, synchronous control operations.
/// A backend implements [`Tunnel::apply`] (both speak the UAPI `set` shape underneath); the
/// operations the agent calls are built on it once, here.
/// The preshared key to write: `psk`, or the zero key, which clears one the peer had.
fn psk_or_clear(psk: Option<&PresharedKey>) -> PresharedKey {
    psk.cloned()
        .unwrap_or_else(|| PresharedKey::from_bytes([0; 32]))
}

pub trait Tunnel: Send {
    fn backend(&self) -> Backend;
    fn interface(&self) -> &str;
    /// Applies one `set` request to the device.
    fn apply(&mut self, req: &SetRequest) -> Result<(), Error>;
    fn state(&mut self) -> Result<DeviceState, Error>;
    /// Packets the device dropped, by reason, since it started: veil-wg's own counters. The
    /// kernel's WireGuard keeps none it would report (empty).
    fn drops(&mut self) -> Result<BTreeMap<String, u64>, Error> {
        Ok(BTreeMap::new())
    }

    fn set_private_key(&mut self, key: &PrivateKey) -> Result<(), Error> {
        self.apply(&SetRequest {
            private_key: Some(key.clone()),
            ..Default::default()
        })
    }

    fn set_listen_port(&mut self, port: u16) -> Result<(), Error> {
        self.apply(&SetRequest {
            listen_port: Some(port),
            ..Default::default()
        })
    }

    /// Creates or updates a peer; its allowed IPs become exactly `peer.allowed_ips`. Changing
    /// only the preshared key keeps the current session: the new key takes effect at the next
    /// handshake.
    fn upsert_peer(&mut self, peer: &PeerConfig) -> Result<(), Error> {
        let mut c = PeerChange::new(peer.public_key);
        c.preshared_key = Some(psk_or_clear(peer.preshared_key.as_ref()));
        c.endpoint = peer.endpoint;
        c.persistent_keepalive = Some(peer.persistent_keepalive.unwrap_or(0));
        c.replace_allowed_ips = true;
        c.allowed_ips = peer.allowed_ips.clone();
        self.apply(&SetRequest {
            peers: vec![c],
            ..Default::default()
        })
    }

    /// Changes only an existing peer's preshared key (`None` clears it); its allowed IPs and
    /// endpoint are left alone. Re-sending unchanged allowed IPs is not free: kernel WireGuard
    /// replaces them by removing and re-inserting, and a packet routed in between finds no
    /// peer and is dropped (one UDP probe in 1,330 across 27 PSK rotations, seen in the VM).
    fn set_preshared_key(
        &mut self,
        key: &PublicKey,
        psk: Option<&PresharedKey>,
    ) -> Result<(), Error> {
        let mut c = PeerChange::new(*key);
        c.update_only = true;
        c.preshared_key = Some(psk_or_clear(psk));
        self.apply(&SetRequest {
            peers: vec![c],
            ..Default::default()
        })
    }

    fn remove_peer(&mut self, key: &PublicKey) -> Result<(), Error> {
        self.apply(&SetRequest {
            peers: vec![PeerChange {
                remove: true,
                ..PeerChange::new(*key)
            }],
            ..Default::default()
        })
    }
}
