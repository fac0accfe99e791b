//! Test helpers: a dev PKI per trust domain and in-memory TLS handshakes (real rustls, no
//! sockets), so the sans-IO handshakes can be tested against a real exporter.

use std::sync::Arc;
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use veil_certs_dev::DevCa;
use veil_identity::{BundleSet, SpiffeId, Svid, TrustDomain};

use super::tls::{self, ExpectedPeer, NodeCredentials, TlsConfig};

pub(crate) struct Pki {
    pub td: TrustDomain,
    pub ca: DevCa,
    pub bundles: BundleSet,
}

impl Pki {
    pub fn new(td: &str) -> Self {
        let td = TrustDomain::new(td).unwrap();
        let ca = DevCa::new(td.clone()).unwrap();
        let bundles = BundleSet::new();
        bundles.set_roots(td.clone(), ca.bundle()).unwrap();
        Self { td, ca, bundles }
    }

    pub fn node_id(&self, name: &str) -> SpiffeId {
        super::node_spiffe_id(&self.td, name).unwrap()
    }

    pub fn node_svid(&self, name: &str) -> Arc<Svid> {
        Arc::new(
            self.ca
                .issue_node_svid(name, Duration::from_secs(3600))
                .unwrap(),
        )
    }

    pub fn node_creds(&self, name: &str) -> NodeCredentials {
        NodeCredentials::from_svid(self.node_svid(name)).unwrap()
    }

    pub fn workload(&self, ns: &str, sa: &str, ttl: Duration) -> Arc<Svid> {
        Arc::new(self.ca.issue_workload_svid(ns, sa, ttl).unwrap())
    }
}

/// Moves what `from` has to send into `to`.
fn pump<A: rustls::SideData, B: rustls::SideData>(
    from: &mut rustls::ConnectionCommon<A>,
    to: &mut rustls::ConnectionCommon<B>,
    buf: &mut Vec<u8>,
) -> Result<(), rustls::Error> {
    buf.clear();
    while from.wants_write() {
        from.write_tls(buf).unwrap();
    }
    let mut rd = &buf[..];
    while !rd.is_empty() {
        to.read_tls(&mut rd).unwrap();
        to.process_new_packets()?;
    }
    Ok(())
}

/// Runs a full TLS handshake between two in-memory connections.
pub(crate) fn drive(
    mut client: rustls::ClientConnection,
    mut server: rustls::ServerConnection,
) -> Result<(rustls::ClientConnection, rustls::ServerConnection), rustls::Error> {
    let mut buf = Vec::new();
    for _ in 0..20 {
        pump(&mut client, &mut server, &mut buf)?;
        pump(&mut server, &mut client, &mut buf)?;
        if !client.is_handshaking() && !server.is_handshaking() {
            return Ok((client, server));
        }
    }
    panic!("in-memory handshake did not finish");
}

pub(crate) fn handshake_in_memory(
    client_creds: &NodeCredentials,
    server_creds: &NodeCredentials,
    bundles: &BundleSet,
    client_expects: SpiffeId,
    server_expects: ExpectedPeer,
    (client_cfg, server_cfg): (&TlsConfig, &TlsConfig),
) -> Result<(rustls::ClientConnection, rustls::ServerConnection), rustls::Error> {
    let cc = tls::client_config(client_cfg, client_creds, bundles, client_expects).unwrap();
    let sc = tls::server_config(server_cfg, server_creds, bundles, server_expects).unwrap();
    let client = rustls::ClientConnection::new(cc, tls::server_name_for("peer")).unwrap();
    let server = rustls::ServerConnection::new(sc).unwrap();
    drive(client, server)
}

/// node-a (client, custom provider) → node-b (server, `server_cfg`).
pub(crate) fn handshake_with_client_provider(
    pki: &Pki,
    provider: Arc<CryptoProvider>,
    server_cfg: &TlsConfig,
) -> Result<(rustls::ClientConnection, rustls::ServerConnection), rustls::Error> {
    let cc = tls::client_config_with_provider(
        provider,
        &pki.node_creds("node-a"),
        &pki.bundles,
        pki.node_id("node-b"),
    )
    .unwrap();
    let sc = tls::server_config(
        server_cfg,
        &pki.node_creds("node-b"),
        &pki.bundles,
        ExpectedPeer::AnyNodeOf(pki.td.clone()),
    )
    .unwrap();
    let client = rustls::ClientConnection::new(cc, tls::server_name_for("node-b")).unwrap();
    let server = rustls::ServerConnection::new(sc).unwrap();
    drive(client, server)
}

/// A connected, authenticated node-a ↔ node-b pair of in-memory sessions.
pub(crate) fn session_pair(pki: &Pki) -> (rustls::ClientConnection, rustls::ServerConnection) {
    handshake_in_memory(
        &pki.node_creds("node-a"),
        &pki.node_creds("node-b"),
        &pki.bundles,
        pki.node_id("node-b"),
        ExpectedPeer::Node(pki.node_id("node-a")),
        (&TlsConfig::default(), &TlsConfig::default()),
    )
    .unwrap()
}
