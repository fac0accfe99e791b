//! rustls configuration of the control channel: TLS 1.3 only, aws-lc-rs passed explicitly,
//! X25519MLKEM768 preferred (plain X25519 only when configured), no session resumption (every
//! connection re-proves both node SVIDs), and SPIFFE verifiers that validate the peer chain with
//! `veil_identity::validate_x509_svid` against the live `BundleSet` and then check the peer's
//! SPIFFE ID explicitly — never only a library's default verifier.

use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{aws_lc_rs, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, NamedGroup, OtherError,
    SignatureScheme,
};
use veil_identity::{validate_x509_svid, BundleSet, SpiffeId, Svid, TrustDomain, ValidatedSvid};

use super::{node_name_of, AuthFailure, Error};

/// ALPN of the control channel; a peer speaking another version fails the TLS handshake.
pub const ALPN: &[u8] = b"veil-auth/1";

/// TLS settings of the control channel (plain data; part of the agent's auth config).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsConfig {
    /// Also offer/accept plain X25519. Off by default: both ends must then negotiate the
    /// hybrid post-quantum group, so the exporter-derived WireGuard PSK resists
    /// harvest-now-decrypt-later.
    pub allow_classical: bool,
}

/// The aws-lc-rs provider restricted to TLS 1.3 suites and the configured groups.
pub fn provider(cfg: &TlsConfig) -> Arc<CryptoProvider> {
    let base = aws_lc_rs::default_provider();
    let mut kx_groups = vec![aws_lc_rs::kx_group::X25519MLKEM768];
    if cfg.allow_classical {
        kx_groups.push(aws_lc_rs::kx_group::X25519);
    }
    let cipher_suites = base
        .cipher_suites
        .iter()
        .copied()
        .filter(|s| s.version() == &rustls::version::TLS13)
        .collect();
    Arc::new(CryptoProvider {
        cipher_suites,
        kx_groups,
        ..base
    })
}

/// Installs aws-lc-rs as the process-wide default provider (for any rustls user that does not
/// pass one). Idempotent: returns `false` if a default was already installed.
pub fn install_default_provider() -> bool {
    aws_lc_rs::default_provider().install_default().is_ok()
}

/// The key exchange group a session negotiated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KxGroup {
    X25519MLKEM768,
    X25519,
    Other(u16),
}

impl KxGroup {
    pub fn from_named(g: NamedGroup) -> Self {
        match g {
            NamedGroup::X25519MLKEM768 => Self::X25519MLKEM768,
            NamedGroup::X25519 => Self::X25519,
            other => Self::Other(u16::from(other)),
        }
    }

    pub fn is_post_quantum(self) -> bool {
        self == Self::X25519MLKEM768
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::X25519MLKEM768 => "X25519MLKEM768",
            Self::X25519 => "X25519",
            Self::Other(_) => "other",
        }
    }
}

impl fmt::Display for KxGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Other(code) => write!(f, "group-{code:#06x}"),
            g => f.write_str(g.as_str()),
        }
    }
}

/// The group of an established session.
pub fn negotiated_group(conn: &rustls::CommonState) -> Option<KxGroup> {
    conn.negotiated_key_exchange_group()
        .map(|g| KxGroup::from_named(g.name()))
}

/// The TLS exporter (RFC 8446 §7.5) as the sans-IO handshakes need it.
pub trait Exporter {
    fn export(&self, label: &[u8], context: &[u8], out: &mut [u8]) -> Result<(), rustls::Error>;
}

impl<D> Exporter for rustls::ConnectionCommon<D> {
    fn export(&self, label: &[u8], context: &[u8], out: &mut [u8]) -> Result<(), rustls::Error> {
        self.export_keying_material(out, label, Some(context))
            .map(|_| ())
    }
}

/// An SVID with its signing key loaded for rustls.
type Loaded = (Arc<Svid>, Arc<CertifiedKey>);

/// The node SVID the control channel presents, live: the agent calls [`NodeCredentials::set`]
/// on every rotation and each new connection presents the newest one.
#[derive(Clone, Default)]
pub struct NodeCredentials {
    inner: Arc<RwLock<Option<Loaded>>>,
}

impl fmt::Debug for NodeCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cur = self.svid();
        f.debug_struct("NodeCredentials")
            .field(
                "spiffe_id",
                &cur.as_ref().map(|s| s.spiffe_id().to_string()),
            )
            .field("serial", &cur.as_ref().map(|s| s.serial().to_owned()))
            .finish()
    }
}

impl NodeCredentials {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn from_svid(svid: Arc<Svid>) -> Result<Self, Error> {
        let c = Self::new();
        c.set(svid)?;
        Ok(c)
    }

    /// Replaces the node SVID (a rotation). The signing key is loaded once here, not per
    /// connection.
    pub fn set(&self, svid: Arc<Svid>) -> Result<(), Error> {
        let key = aws_lc_rs::sign::any_supported_type(&svid.private_key().private_key_der())
            .map_err(Error::NodeKey)?;
        let certified = Arc::new(CertifiedKey::new(svid.cert_chain().to_vec(), key));
        *self.inner.write().unwrap_or_else(|e| e.into_inner()) = Some((svid, certified));
        Ok(())
    }

    pub fn svid(&self) -> Option<Arc<Svid>> {
        self.read().map(|(s, _)| s)
    }

    fn read(&self) -> Option<Loaded> {
        self.inner.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn certified(&self) -> Result<Arc<CertifiedKey>, Error> {
        self.read().map(|(_, k)| k).ok_or(Error::NoNodeSvid)
    }
}

/// Why a peer's node certificate was refused; travels inside `rustls::Error` so the shell can
/// report a specific reason ([`rejection_reason`]).
#[derive(Debug, thiserror::Error)]
#[error("peer node certificate rejected ({reason}): {detail}")]
pub struct PeerCertError {
    pub reason: AuthFailure,
    pub detail: String,
}

fn reject(reason: AuthFailure, detail: impl Into<String>) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(
        PeerCertError {
            reason,
            detail: detail.into(),
        },
    ))))
}

/// The specific reason a TLS handshake failed because *we* refused the peer's certificate.
pub fn rejection_reason(e: &(dyn std::error::Error + 'static)) -> Option<AuthFailure> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if let Some(inner) = io.get_ref() {
                if let Some(r) = rejection_reason(inner) {
                    return Some(r);
                }
            }
        }
        if let Some(rustls::Error::InvalidCertificate(CertificateError::Other(o))) =
            err.downcast_ref::<rustls::Error>()
        {
            if let Some(p) = o.0.downcast_ref::<PeerCertError>() {
                return Some(p.reason);
            }
        }
        if let Some(p) = err.downcast_ref::<PeerCertError>() {
            return Some(p.reason);
        }
        cur = err.source();
    }
    None
}

/// Which peer node identity a verifier accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExpectedPeer {
    /// Exactly this node SPIFFE ID (the node dialled, or the node owning the source address).
    Node(SpiffeId),
    /// Any node identity (`/veil/node/<name>`) of this trust domain; the application layer
    /// must then check it against the node the peer claims to be.
    AnyNodeOf(TrustDomain),
}

impl ExpectedPeer {
    fn trust_domain(&self) -> TrustDomain {
        match self {
            Self::Node(id) => id.trust_domain(),
            Self::AnyNodeOf(td) => td.clone(),
        }
    }
}

fn to_system_time(t: UnixTime) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(t.as_secs())
}

/// The chain the TLS peer presented (leaf first), checked as [`check_node_chain`] does now; a
/// refusal is its reason (`InvalidSvid` for an empty chain or an error without one).
pub fn check_peer_chain(
    certs: &[CertificateDer<'_>],
    bundles: &BundleSet,
    expected: &ExpectedPeer,
) -> Result<ValidatedSvid, AuthFailure> {
    let (leaf, rest) = certs.split_first().ok_or(AuthFailure::InvalidSvid)?;
    check_node_chain(leaf, rest, bundles, expected, SystemTime::now())
        .map_err(|e| rejection_reason(&e).unwrap_or(AuthFailure::InvalidSvid))
}

/// Validates a presented node chain and checks the SPIFFE ID (the part shared by both sides).
pub fn check_node_chain(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    bundles: &BundleSet,
    expected: &ExpectedPeer,
    now: SystemTime,
) -> Result<ValidatedSvid, rustls::Error> {
    let mut chain = Vec::with_capacity(1 + intermediates.len());
    chain.push(end_entity.clone());
    chain.extend(intermediates.iter().cloned());
    let td = expected.trust_domain();
    let validated = validate_x509_svid(&chain, bundles, now)
        .map_err(|e| reject(AuthFailure::from_svid_error(&e), crate::error_chain(&e)))?;
    // Validation anchors the chain in the roots of the ID's own trust domain; a federated
    // bundle must still never let another trust domain's node in.
    if !validated.spiffe_id.is_member_of(&td) {
        return Err(reject(
            AuthFailure::WrongTrustDomain,
            format!("{} is not in trust domain {td}", validated.spiffe_id),
        ));
    }
    match expected {
        ExpectedPeer::Node(id) if &validated.spiffe_id != id => Err(reject(
            AuthFailure::WrongSpiffeId,
            format!("presented {}, expected {id}", validated.spiffe_id),
        )),
        ExpectedPeer::AnyNodeOf(td) if node_name_of(&validated.spiffe_id, td).is_none() => {
            Err(reject(
                AuthFailure::WrongSpiffeId,
                format!("{} is not a node identity", validated.spiffe_id),
            ))
        }
        _ => Ok(validated),
    }
}

/// Verifies the peer's node SVID: the server's on the dialling side, the client's on the
/// accepting side (client auth is mandatory).
#[derive(Debug)]
pub struct NodeVerifier {
    bundles: BundleSet,
    expected: ExpectedPeer,
    provider: Arc<CryptoProvider>,
}

impl NodeVerifier {
    fn new(bundles: &BundleSet, expected: ExpectedPeer, provider: &Arc<CryptoProvider>) -> Self {
        NodeVerifier {
            bundles: bundles.clone(),
            expected,
            provider: provider.clone(),
        }
    }

    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ValidatedSvid, rustls::Error> {
        check_node_chain(
            end_entity,
            intermediates,
            &self.bundles,
            &self.expected,
            to_system_time(now),
        )
    }
}

/// The signature methods, the same in rustls' `ServerCertVerifier` and `ClientCertVerifier`
/// (two traits with no common supertrait, so a function cannot serve both impls): TLS 1.2 is
/// refused, TLS 1.3 signatures are checked with the provider's algorithms.
macro_rules! tls13_signature_methods {
    () => {
        fn verify_tls12_signature(
            &self,
            _message: &[u8],
            _cert: &CertificateDer<'_>,
            _dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Err(rustls::Error::General("tls 1.2 is not offered".into()))
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.provider
                .signature_verification_algorithms
                .supported_schemes()
        }
    };
}

impl ServerCertVerifier for NodeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity, intermediates, now)?;
        Ok(ServerCertVerified::assertion())
    }

    tls13_signature_methods!();
}

impl ClientCertVerifier for NodeVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity, intermediates, now)?;
        Ok(ClientCertVerified::assertion())
    }

    tls13_signature_methods!();
}

/// A client config for dialling the node whose SPIFFE ID is `expected`, presenting the
/// current node SVID. Built per connection: cheap (the key is loaded once per rotation).
pub fn client_config(
    cfg: &TlsConfig,
    creds: &NodeCredentials,
    bundles: &BundleSet,
    expected: SpiffeId,
) -> Result<Arc<rustls::ClientConfig>, Error> {
    client_config_with_provider(provider(cfg), creds, bundles, expected)
}

pub(crate) fn client_config_with_provider(
    provider: Arc<CryptoProvider>,
    creds: &NodeCredentials,
    bundles: &BundleSet,
    expected: SpiffeId,
) -> Result<Arc<rustls::ClientConfig>, Error> {
    let verifier = Arc::new(NodeVerifier::new(
        bundles,
        ExpectedPeer::Node(expected),
        &provider,
    ));
    let certified = creds.certified()?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(Error::Tls)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(FixedClientCert(certified)));
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    config.enable_sni = false;
    Ok(Arc::new(config))
}

/// A server config for one accepted connection: the peer must present `expected`.
pub fn server_config(
    cfg: &TlsConfig,
    creds: &NodeCredentials,
    bundles: &BundleSet,
    expected: ExpectedPeer,
) -> Result<Arc<rustls::ServerConfig>, Error> {
    let provider = provider(cfg);
    let verifier = Arc::new(NodeVerifier::new(bundles, expected, &provider));
    let certified = creds.certified()?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(Error::Tls)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(FixedServerCert(certified)));
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// The server name a client uses; the verifier ignores it (identity is the SPIFFE ID) and SNI
/// is off, but rustls needs one.
pub fn server_name_for(node: &str) -> ServerName<'static> {
    ServerName::try_from(node.to_owned())
        .unwrap_or_else(|_| ServerName::try_from("veil-node").expect("a valid dns name"))
}

#[derive(Debug)]
struct FixedClientCert(Arc<CertifiedKey>);

impl rustls::client::ResolvesClientCert for FixedClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[derive(Debug)]
struct FixedServerCert(Arc<CertifiedKey>);

impl rustls::server::ResolvesServerCert for FixedServerCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::testing::{handshake_in_memory, session_pair, Pki};

    #[test]
    fn provider_is_tls13_with_hybrid_first() {
        let p = provider(&TlsConfig::default());
        assert_eq!(p.kx_groups.len(), 1);
        assert_eq!(p.kx_groups[0].name(), NamedGroup::X25519MLKEM768);
        assert!(p
            .cipher_suites
            .iter()
            .all(|s| s.version() == &rustls::version::TLS13));
        let p = provider(&TlsConfig {
            allow_classical: true,
        });
        let names: Vec<_> = p.kx_groups.iter().map(|g| g.name()).collect();
        assert_eq!(names, [NamedGroup::X25519MLKEM768, NamedGroup::X25519]);
    }

    #[test]
    fn good_pair_negotiates_the_hybrid_group() {
        let pki = Pki::new("lab.veil");
        let (client, server) = session_pair(&pki);
        assert_eq!(negotiated_group(&client), Some(KxGroup::X25519MLKEM768));
        assert_eq!(negotiated_group(&server), Some(KxGroup::X25519MLKEM768));
        assert_eq!(client.alpn_protocol(), Some(ALPN));
        assert_eq!(
            client.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        // The exporter agrees on both ends (what the PSK derivation relies on).
        let (mut a, mut b) = ([0u8; 32], [0u8; 32]);
        client.export(b"EXPORTER-test", b"ctx", &mut a).unwrap();
        server.export(b"EXPORTER-test", b"ctx", &mut b).unwrap();
        assert_eq!(a, b);
        server.export(b"EXPORTER-test", b"ctx2", &mut b).unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn classical_only_when_both_allow_it() {
        let pki = Pki::new("lab.veil");
        let classical = TlsConfig {
            allow_classical: true,
        };
        // Both allow it: still hybrid, because it is preferred.
        let (client, _) = handshake_in_memory(
            &pki.node_creds("node-a"),
            &pki.node_creds("node-b"),
            &pki.bundles,
            pki.node_id("node-b"),
            ExpectedPeer::AnyNodeOf(pki.td.clone()),
            (&classical, &classical),
        )
        .unwrap();
        assert_eq!(negotiated_group(&client), Some(KxGroup::X25519MLKEM768));
        // A classical-only client against a default (hybrid-only) server fails.
        let mut classical_only = provider(&classical);
        Arc::get_mut(&mut classical_only).unwrap().kx_groups = vec![aws_lc_rs::kx_group::X25519];
        let err = crate::auth::testing::handshake_with_client_provider(
            &pki,
            classical_only.clone(),
            &TlsConfig::default(),
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                rustls::Error::PeerIncompatible(rustls::PeerIncompatible::NoKxGroupsInCommon)
            ),
            "{err}"
        );
        // ... and succeeds with X25519 against a server that allows classical.
        let (client, _) =
            crate::auth::testing::handshake_with_client_provider(&pki, classical_only, &classical)
                .unwrap();
        assert_eq!(negotiated_group(&client), Some(KxGroup::X25519));
    }

    #[test]
    fn wrong_node_id_and_foreign_trust_domain_are_refused_with_reasons() {
        let pki = Pki::new("lab.veil");
        let cfg = TlsConfig::default();
        let foreign = Pki::new("evil.veil");
        // An impostor CA claiming our trust domain (same root name, other key).
        let impostor = Pki::new("lab.veil");
        let workload = NodeCredentials::from_svid(Arc::new(
            pki.ca
                .issue_workload_svid("shop", "frontend", Duration::from_secs(600))
                .unwrap(),
        ))
        .unwrap();
        // (case, client credentials, server credentials, node dialled, reason)
        let cases = [
            (
                "node-b answers a dial to node-c",
                pki.node_creds("node-a"),
                pki.node_creds("node-b"),
                "node-c",
                AuthFailure::WrongSpiffeId,
            ),
            (
                "client SVID from another trust domain",
                foreign.node_creds("node-a"),
                pki.node_creds("node-b"),
                "node-b",
                AuthFailure::WrongTrustDomain,
            ),
            (
                "server SVID from an impostor CA, not verified by our roots",
                pki.node_creds("node-a"),
                impostor.node_creds("node-b"),
                "node-b",
                AuthFailure::InvalidSvid,
            ),
            (
                "a workload SVID is not a node identity",
                workload,
                pki.node_creds("node-b"),
                "node-b",
                AuthFailure::WrongSpiffeId,
            ),
        ];
        for (case, client, server, dialled, want) in cases {
            let err = handshake_in_memory(
                &client,
                &server,
                &pki.bundles,
                pki.node_id(dialled),
                ExpectedPeer::AnyNodeOf(pki.td.clone()),
                (&cfg, &cfg),
            )
            .unwrap_err();
            assert_eq!(rejection_reason(&err), Some(want), "{case}");
        }
    }

    /// Scenario 12's spellings at the node handshake's verifier: a node ID whose trust domain is
    /// written another way is refused as an invalid SVID, whether this trust domain's CA or a
    /// federated one (both in the bundle set) signed it; the canonical one passes.
    #[test]
    fn a_node_id_with_its_trust_domain_spelled_another_way_is_refused() {
        let pki = Pki::new("lab.veil");
        let federated = Pki::new("other.veil");
        pki.bundles
            .set_roots(federated.td.clone(), federated.ca.bundle())
            .unwrap();
        let now = SystemTime::now();
        let chain = |ca: &veil_certs_dev::DevCa, uri: &str| {
            let mut spec = veil_certs_dev::LeafSpec::svid(
                &pki.node_id("node-b"),
                now,
                Duration::from_secs(60),
            );
            spec.uris = vec![uri.to_string()];
            ca.issue_chain(&spec).unwrap().chain
        };
        let check = |c: &[CertificateDer<'static>]| {
            check_node_chain(
                &c[0],
                &c[1..],
                &pki.bundles,
                &ExpectedPeer::AnyNodeOf(pki.td.clone()),
                now,
            )
        };
        if let Err(e) = check(&chain(&pki.ca, "spiffe://lab.veil/veil/node/node-b")) {
            panic!("the canonical spelling: {e}");
        }
        for uri in [
            "spiffe://LAB.veil/veil/node/node-b",
            "spiffe://lab.VEIL/veil/node/node-b",
            "spiffe://lab.veil:4250/veil/node/node-b",
            "spiffe://node-b@lab.veil/veil/node/node-b",
            "spiffe://lab%2eveil/veil/node/node-b",
            "Spiffe://lab.veil/veil/node/node-b",
        ] {
            for (ca, signer) in [(&pki.ca, "lab.veil"), (&federated.ca, "other.veil")] {
                let err = check(&chain(ca, uri)).expect_err(uri);
                assert_eq!(
                    rejection_reason(&err),
                    Some(AuthFailure::InvalidSvid),
                    "{uri} signed by {signer}'s CA: {err}"
                );
            }
        }
    }

    #[test]
    fn expired_node_svid_is_refused_as_expired() {
        let pki = Pki::new("lab.veil");
        let id = pki.node_id("node-a");
        let expired = pki
            .ca
            .issue_bad(veil_certs_dev::BadVariant::Expired, &id)
            .unwrap();
        // Svid::from_der does not check time; validation does.
        let creds = NodeCredentials::from_svid(Arc::new(expired.into_svid().unwrap())).unwrap();
        let err = handshake_in_memory(
            &creds,
            &pki.node_creds("node-b"),
            &pki.bundles,
            pki.node_id("node-b"),
            ExpectedPeer::Node(id),
            (&TlsConfig::default(), &TlsConfig::default()),
        )
        .unwrap_err();
        assert_eq!(rejection_reason(&err), Some(AuthFailure::ExpiredSvid));
    }

    #[test]
    fn no_svid_no_config() {
        let pki = Pki::new("lab.veil");
        let err = client_config(
            &TlsConfig::default(),
            &NodeCredentials::new(),
            &pki.bundles,
            pki.node_id("node-b"),
        )
        .unwrap_err();
        assert!(matches!(err, Error::NoNodeSvid));
    }
}
