//! The control channel client: dials a peer node's agent, requires the peer to present
//! exactly that node's SPIFFE ID, runs the node handshake and returns the channel.

use std::net::{IpAddr, SocketAddr};

use tokio::net::TcpSocket;
use tokio::time::{timeout_at, Instant};

use super::channel::{self, Channel, ChannelConfig, Deps};
use super::node_handshake::NodeKeys;
use super::tls::{self, ExpectedPeer, TlsConfig};
use super::{AuthFailure, Error, NodeInfo, DEFAULT_PORT};

/// Client settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientConfig {
    pub tls: TlsConfig,
    pub channel: ChannelConfig,
    /// Peer agents listen here.
    pub port: u16,
    /// Source address to dial from (the node's underlay address, which the server maps back
    /// to this node); `None` lets the kernel choose.
    pub bind: Option<IpAddr>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            tls: TlsConfig::default(),
            channel: ChannelConfig::default(),
            port: DEFAULT_PORT,
            bind: None,
        }
    }
}

impl Error {
    /// The auth failure a daemon records for a channel that could not be established.
    pub fn failure(&self) -> AuthFailure {
        match self {
            Error::PeerRejected { reason, .. } => *reason,
            Error::Timeout { .. } => AuthFailure::Timeout,
            Error::Wire { .. } | Error::NodeHandshake { .. } => AuthFailure::ProtocolError,
            _ => AuthFailure::PeerUnreachable,
        }
    }
}

/// Dials `peer` at its address (port from `cfg`) and establishes a channel.
pub async fn connect(
    cfg: &ClientConfig,
    deps: &Deps,
    peer: &NodeInfo,
) -> Result<(Channel, NodeKeys), Error> {
    connect_to(cfg, deps, peer, SocketAddr::new(peer.addr, cfg.port)).await
}

/// Dials `peer` at an explicit address.
pub async fn connect_to(
    cfg: &ClientConfig,
    deps: &Deps,
    peer: &NodeInfo,
    addr: SocketAddr,
) -> Result<(Channel, NodeKeys), Error> {
    let deadline = Instant::now() + cfg.channel.handshake_timeout;
    let io = |source| Error::Io {
        peer: peer.name.clone(),
        source,
    };
    let timed_out = |stage| Error::Timeout {
        peer: peer.name.clone(),
        stage,
    };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(io)?;
    if let Some(ip) = cfg.bind {
        socket.bind(SocketAddr::new(ip, 0)).map_err(io)?;
    }
    let tcp = timeout_at(deadline, socket.connect(addr))
        .await
        .map_err(|_| timed_out("tcp connect"))?
        .map_err(io)?;
    let _ = tcp.set_nodelay(true);
    let config = tls::client_config(&cfg.tls, &deps.creds, &deps.bundles, peer.spiffe_id.clone())?;
    let connector = tokio_rustls::TlsConnector::from(config);
    let stream = match timeout_at(
        deadline,
        connector.connect(tls::server_name_for(&peer.name), tcp),
    )
    .await
    {
        Err(_) => return Err(timed_out("tls handshake")),
        Ok(Err(e)) => {
            return Err(match tls::rejection_reason(&e) {
                Some(reason) => Error::PeerRejected {
                    peer: peer.name.clone(),
                    reason,
                },
                None => io(e),
            })
        }
        Ok(Ok(s)) => s,
    };
    let peer_svid = {
        let certs = stream.get_ref().1.peer_certificates().unwrap_or_default();
        let expected = ExpectedPeer::Node(peer.spiffe_id.clone());
        tls::check_peer_chain(certs, &deps.bundles, &expected).map_err(|reason| {
            Error::PeerRejected {
                peer: peer.name.clone(),
                reason,
            }
        })?
    };
    let (channel, keys) = channel::establish(
        stream,
        peer.clone(),
        peer_svid,
        &cfg.channel,
        deps,
        deadline,
    )
    .await?;
    tracing::info!(
        peer = %peer.name,
        group = ?channel.negotiated_group(),
        epoch = keys.epoch,
        "control channel established (dialled)"
    );
    Ok((channel, keys))
}
