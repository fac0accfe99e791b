//! X.509-SVIDs: the agent's `Svid` (chain + zeroizing private key) and validation per the
//! X.509-SVID specification (spiffe/standards/X509-SVID.md).
//!
//! Path validation (RFC 5280, as the specification's §5.1 requires) is delegated to
//! `rustls-webpki`: path building, validity windows of the path's certificates, signatures,
//! basicConstraints (cA and pathLenConstraint) of every issuer, name constraints, extended key
//! usage, and refusal of unknown critical extensions. It runs with the aws-lc-rs algorithms, the
//! crypto provider the agent's mTLS already uses, so no second provider (ring) comes in.
//!
//! veil's own rules sit on top, each its own [`SvidError`] variant: the SPIFFE leaf rules
//! (§2, §3.1, §4.3, §5.2) read with `x509-parser` before the path is built; the trust-domain
//! rules (the chain is anchored only in the roots of the SVID's *own* trust domain, which a
//! generic verifier does not know about, and no presented CA names another trust domain); and,
//! on the verified path, what webpki leaves to its caller: keyCertSign on every issuer, the
//! validity window and the pathLenConstraint of the anchoring root.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, SignatureVerificationAlgorithm, TrustAnchor,
    UnixTime,
};
use webpki::{ExtendedKeyUsageValidator, KeyPurposeId, KeyPurposeIdIter};
use x509_parser::certificate::X509Certificate;
use x509_parser::error::X509Error;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;
use x509_parser::time::ASN1Time;
use zeroize::Zeroizing;

use crate::bundle::TrustRoots;
use crate::id::{IdError, SpiffeId, TrustDomain};

/// Longest chain (leaf + intermediates) accepted; SPIRE chains are 1–3 long.
pub const MAX_CHAIN_LEN: usize = 8;

/// Why an X.509-SVID was rejected: one variant per rule. `index` is the position in the
/// presented chain (0 = leaf); `chain.len()` designates the bundle root that anchored it.
/// Refusals found while building the path (webpki's) carry no index: the verifier does not say
/// which certificate of the candidate path failed.
#[derive(Debug, thiserror::Error)]
pub enum SvidError {
    #[error("svid certificate chain is empty")]
    EmptyChain,
    #[error("svid certificate chain has {0} certificates, more than {MAX_CHAIN_LEN}")]
    ChainTooLong(usize),
    #[error("svid certificate {index} is not a parsable x.509 certificate")]
    Malformed {
        index: usize,
        #[source]
        source: X509Error,
    },
    #[error("svid certificate {index} is not a certificate the path verifier accepts")]
    UnsupportedCertificate {
        index: usize,
        #[source]
        source: webpki::Error,
    },
    #[error("svid leaf has no uri san")]
    NoUriSan,
    #[error("svid leaf has {0} uri sans; exactly one is allowed")]
    MultipleUriSans(usize),
    #[error("svid leaf uri san is not a valid spiffe id")]
    InvalidSpiffeId(#[source] IdError),
    #[error("svid leaf spiffe id {0} has no path; a leaf names a workload, not a trust domain")]
    LeafIdWithoutPath(SpiffeId),
    #[error("svid leaf is a ca certificate (basicConstraints ca=true)")]
    LeafIsCa,
    #[error("svid leaf has the keyCertSign key usage")]
    LeafKeyCertSign,
    #[error("svid leaf has the cRLSign key usage")]
    LeafCrlSign,
    #[error("svid leaf lacks the digitalSignature key usage")]
    LeafMissingDigitalSignature,
    #[error("svid leaf has an unknown critical extension")]
    LeafUnknownCriticalExtension,
    #[error("svid leaf is not valid before {} (unix seconds)", unix_secs(*not_before))]
    NotYetValid { not_before: SystemTime },
    #[error("svid leaf expired at {} (unix seconds)", unix_secs(*not_after))]
    Expired { not_after: SystemTime },
    #[error(
        "svid issuer certificate is not valid before {} (unix seconds)",
        unix_secs(*not_before)
    )]
    IssuerNotYetValid { not_before: SystemTime },
    #[error("svid issuer certificate expired at {} (unix seconds)", unix_secs(*not_after))]
    IssuerExpired { not_after: SystemTime },
    #[error("no trust bundle for trust domain {0}")]
    NoBundle(TrustDomain),
    /// A certificate after the leaf is not a CA: used as an issuer, or a second end-entity
    /// certificate presented beside the leaf (a substituted leaf, scenario 14).
    #[error(
        "svid chain has a certificate after the leaf that is not a ca (basicConstraints ca=true)"
    )]
    IntermediateNotCa,
    #[error("svid certificate {index} issues certificates but lacks the keyCertSign key usage")]
    IntermediateCannotSign { index: usize },
    #[error("svid certificate {index} has an unknown critical extension")]
    IntermediateUnknownCriticalExtension { index: usize },
    #[error("svid intermediate {index} belongs to trust domain {found}, not {expected}")]
    IntermediateForeignTrustDomain {
        index: usize,
        expected: TrustDomain,
        found: String,
    },
    #[error("svid chain violates the name constraints of an issuer")]
    NameConstraintViolation,
    #[error("svid chain is longer than the pathLenConstraint of an issuer allows")]
    PathLenConstraintExceeded,
    #[error("svid chain has an extended key usage without both serverAuth and clientAuth")]
    ExtendedKeyUsageNotMtls,
    #[error("svid chain uses an unsupported or weak signature algorithm")]
    UnsupportedSignatureAlgorithm,
    #[error("svid chain has a signature that does not verify with its issuer's key")]
    BadSignature,
    #[error("svid chain does not lead to a root of trust domain {0}")]
    UntrustedRoot(TrustDomain),
    #[error("svid certification path refused by the path verifier")]
    PathRejected(#[source] webpki::Error),
    #[error("svid private key is not a supported pkcs#8 key")]
    UnsupportedKey,
    #[error("svid private key does not match the leaf certificate's public key")]
    KeyMismatch,
}

fn unix_secs(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

pub(crate) fn asn1_to_system(t: ASN1Time) -> SystemTime {
    let secs = t.timestamp();
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

pub(crate) fn parse_cert<'a>(der: &'a [u8]) -> Result<X509Certificate<'a>, X509Error> {
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err(X509Error::InvalidCertificate),
        Err(x509_parser::nom::Err::Error(e) | x509_parser::nom::Err::Failure(e)) => Err(e),
        Err(x509_parser::nom::Err::Incomplete(_)) => Err(X509Error::InvalidCertificate),
    }
}

pub(crate) fn is_ca(cert: &X509Certificate<'_>) -> bool {
    matches!(cert.basic_constraints(), Ok(Some(bc)) if bc.value.ca)
}

/// Lowercase hex of the serial's magnitude (no sign byte), the form `veil status` shows.
pub(crate) fn serial_hex(cert: &X509Certificate<'_>) -> String {
    let raw = cert.raw_serial();
    let start = raw
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(raw.len().saturating_sub(1));
    raw[start..].iter().map(|b| format!("{b:02x}")).collect()
}

fn uri_sans<'a>(cert: &X509Certificate<'a>) -> Result<Vec<&'a str>, X509Error> {
    let mut out = Vec::new();
    if let Some(san) = cert.subject_alternative_name()? {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name {
                out.push(*uri);
            }
        }
    }
    Ok(out)
}

/// The leaf's SPIFFE ID: exactly one URI SAN, a valid SPIFFE ID with a path.
fn leaf_spiffe_id(leaf: &X509Certificate<'_>) -> Result<SpiffeId, SvidError> {
    let uris = uri_sans(leaf).map_err(|source| SvidError::Malformed { index: 0, source })?;
    match uris.as_slice() {
        [] => Err(SvidError::NoUriSan),
        [uri] => {
            let id = SpiffeId::parse(uri).map_err(SvidError::InvalidSpiffeId)?;
            if id.path().is_empty() {
                return Err(SvidError::LeafIdWithoutPath(id));
            }
            Ok(id)
        }
        many => Err(SvidError::MultipleUriSans(many.len())),
    }
}

/// The private key of an SVID: PKCS#8 DER, zeroized on drop, never printed.
#[derive(Clone)]
pub struct SvidPrivateKey(Zeroizing<Vec<u8>>);

impl SvidPrivateKey {
    pub fn from_pkcs8_der(der: Vec<u8>) -> Self {
        Self(Zeroizing::new(der))
    }

    pub fn pkcs8_der(&self) -> &[u8] {
        &self.0
    }

    /// Borrowed as the rustls type (no copy of the secret).
    pub fn private_key_der(&self) -> PrivateKeyDer<'_> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(&self.0[..]))
    }
}

impl fmt::Debug for SvidPrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SvidPrivateKey(redacted)")
    }
}

/// An X.509-SVID as the agent holds it: chain (leaf first), private key, and the leaf facts
/// the agent reports. Built only through [`Svid::from_der`], so the facts match the chain.
#[derive(Clone)]
pub struct Svid {
    spiffe_id: SpiffeId,
    cert_chain: Vec<CertificateDer<'static>>,
    private_key: SvidPrivateKey,
    serial: String,
    not_before: SystemTime,
    not_after: SystemTime,
}

impl Svid {
    /// Reads the leaf's SPIFFE ID, serial and validity; checks the SAN rules and that the key
    /// belongs to the leaf. Does **not** check trust: see [`validate_x509_svid`].
    pub fn from_der(
        cert_chain: Vec<CertificateDer<'static>>,
        private_key: SvidPrivateKey,
    ) -> Result<Self, SvidError> {
        let leaf_der = cert_chain.first().ok_or(SvidError::EmptyChain)?;
        let leaf =
            parse_cert(leaf_der).map_err(|source| SvidError::Malformed { index: 0, source })?;
        let spiffe_id = leaf_spiffe_id(&leaf)?;
        check_key_matches(&leaf, &private_key)?;
        let serial = serial_hex(&leaf);
        let not_before = asn1_to_system(leaf.validity().not_before);
        let not_after = asn1_to_system(leaf.validity().not_after);
        Ok(Self {
            spiffe_id,
            cert_chain,
            private_key,
            serial,
            not_before,
            not_after,
        })
    }

    pub fn spiffe_id(&self) -> &SpiffeId {
        &self.spiffe_id
    }
    pub fn cert_chain(&self) -> &[CertificateDer<'static>] {
        &self.cert_chain
    }
    pub fn leaf(&self) -> &CertificateDer<'static> {
        &self.cert_chain[0]
    }
    pub fn private_key(&self) -> &SvidPrivateKey {
        &self.private_key
    }
    /// Lowercase hex serial of the leaf.
    pub fn serial(&self) -> &str {
        &self.serial
    }
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }
    /// Expired at `now` (X.509 `notAfter` is inclusive).
    pub fn is_expired_at(&self, now: SystemTime) -> bool {
        now > self.not_after
    }

    /// Full validation against `bundles` at `now`.
    pub fn validate(
        &self,
        bundles: &impl TrustRoots,
        now: SystemTime,
    ) -> Result<ValidatedSvid, SvidError> {
        validate_x509_svid(&self.cert_chain, bundles, now)
    }
}

impl PartialEq for Svid {
    /// Same certificates; the key follows from the leaf (checked in `from_der`).
    fn eq(&self, other: &Self) -> bool {
        self.cert_chain == other.cert_chain
    }
}
impl Eq for Svid {}

impl fmt::Debug for Svid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Svid")
            .field("spiffe_id", &self.spiffe_id)
            .field("serial", &self.serial)
            .field("not_after_unix", &unix_secs(self.not_after))
            .field("chain_len", &self.cert_chain.len())
            .field("private_key", &self.private_key)
            .finish()
    }
}

/// Checks the PKCS#8 key's public half equals the leaf's SPKI key.
fn check_key_matches(leaf: &X509Certificate<'_>, key: &SvidPrivateKey) -> Result<(), SvidError> {
    use aws_lc_rs::signature::{self, KeyPair};
    let der = key.pkcs8_der();
    let public: Vec<u8> = if let Ok(kp) =
        signature::EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, der)
    {
        kp.public_key().as_ref().to_vec()
    } else if let Ok(kp) =
        signature::EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P384_SHA384_ASN1_SIGNING, der)
    {
        kp.public_key().as_ref().to_vec()
    } else if let Ok(kp) = signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(der) {
        kp.public_key().as_ref().to_vec()
    } else if let Ok(kp) = signature::RsaKeyPair::from_pkcs8(der) {
        kp.public_key().as_ref().to_vec()
    } else {
        return Err(SvidError::UnsupportedKey);
    };
    if public.as_slice() == leaf.public_key().subject_public_key.data.as_ref() {
        Ok(())
    } else {
        Err(SvidError::KeyMismatch)
    }
}

/// What a successful validation vouches for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidatedSvid {
    pub spiffe_id: SpiffeId,
    /// Lowercase hex serial of the leaf.
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// Earliest `notAfter` on the verified path (leaf, intermediates, anchoring root): after
    /// it the same chain no longer validates, whatever the leaf says.
    pub valid_until: SystemTime,
    pub leaf: CertificateDer<'static>,
}

/// Whose validity window is checked: the errors name it.
#[derive(Clone, Copy)]
enum Whose {
    /// The leaf's own window, checked before the path so the error carries the leaf's bounds
    /// (webpki checks the issuers').
    Leaf,
    /// A bundle root's: webpki treats a trust anchor as a name and a key and never looks at its
    /// dates; veil refuses a path that only an expired (or future) root anchors.
    Root,
}

fn check_validity(
    cert: &X509Certificate<'_>,
    now: SystemTime,
    whose: Whose,
) -> Result<(), SvidError> {
    let not_before = asn1_to_system(cert.validity().not_before);
    let not_after = asn1_to_system(cert.validity().not_after);
    if now < not_before {
        return Err(match whose {
            Whose::Leaf => SvidError::NotYetValid { not_before },
            Whose::Root => SvidError::IssuerNotYetValid { not_before },
        });
    }
    if now > not_after {
        return Err(match whose {
            Whose::Leaf => SvidError::Expired { not_after },
            Whose::Root => SvidError::IssuerExpired { not_after },
        });
    }
    Ok(())
}

/// An issuer on the verified path (intermediate or root) must be allowed to sign certificates:
/// webpki ignores keyUsage, X509-SVID §3.2/§4.3 require keyCertSign on signing certificates.
fn check_issuer_key_usage(issuer: &X509Certificate<'_>, index: usize) -> Result<(), SvidError> {
    match issuer.key_usage() {
        Ok(Some(ku)) if !ku.value.key_cert_sign() => {
            Err(SvidError::IntermediateCannotSign { index })
        }
        Ok(_) => Ok(()),
        Err(source) => Err(SvidError::Malformed { index, source }),
    }
}

/// webpki applies a trust anchor's name constraints but not its basicConstraints; a bundle
/// root's pathLenConstraint still bounds the intermediates below it (RFC 5280 §4.2.1.9, and Go's
/// crypto/x509, which SPIRE uses, enforces it on roots too).
fn check_root_path_len(
    root: &X509Certificate<'_>,
    root_index: usize,
    intermediates: usize,
) -> Result<(), SvidError> {
    match root.basic_constraints() {
        Ok(Some(bc)) => match bc.value.path_len_constraint {
            Some(max) if intermediates as u64 > u64::from(max) => {
                Err(SvidError::PathLenConstraintExceeded)
            }
            _ => Ok(()),
        },
        Ok(None) => Ok(()),
        Err(source) => Err(SvidError::Malformed {
            index: root_index,
            source,
        }),
    }
}

/// Signature algorithms accepted anywhere on an SVID path: the aws-lc-rs implementations of
/// ECDSA (P-256, P-384, P-521), Ed25519, RSA PKCS#1 v1.5 and RSA-PSS, all with SHA-2. SHA-1
/// is not among them.
static SIGNATURE_ALGORITHMS: &[&dyn SignatureVerificationAlgorithm] = &[
    webpki::aws_lc_rs::ECDSA_P256_SHA256,
    webpki::aws_lc_rs::ECDSA_P256_SHA384,
    webpki::aws_lc_rs::ECDSA_P384_SHA256,
    webpki::aws_lc_rs::ECDSA_P384_SHA384,
    webpki::aws_lc_rs::ECDSA_P521_SHA256,
    webpki::aws_lc_rs::ECDSA_P521_SHA384,
    webpki::aws_lc_rs::ECDSA_P521_SHA512,
    webpki::aws_lc_rs::ED25519,
    webpki::aws_lc_rs::RSA_PKCS1_2048_8192_SHA256,
    webpki::aws_lc_rs::RSA_PKCS1_2048_8192_SHA384,
    webpki::aws_lc_rs::RSA_PKCS1_2048_8192_SHA512,
    webpki::aws_lc_rs::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
    webpki::aws_lc_rs::RSA_PSS_2048_8192_SHA384_LEGACY_KEY,
    webpki::aws_lc_rs::RSA_PSS_2048_8192_SHA512_LEGACY_KEY,
];

/// id-kp-serverAuth (1.3.6.1.5.5.7.3.1), DER contents.
const EKU_SERVER_AUTH: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x01];
/// id-kp-clientAuth (1.3.6.1.5.5.7.3.2), DER contents.
const EKU_CLIENT_AUTH: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x02];

/// The extended key usage an SVID path must allow.
///
/// webpki wants one usage per verification (`KeyUsage::server_auth()` or `client_auth()`), but
/// `validate_x509_svid` serves both sides of veil's mutual TLS and the SVID source, and an SVID
/// is one certificate for both roles: X509-SVID §4.4 says that when the extension is present,
/// serverAuth *and* clientAuth MUST be set. So: no extension is fine (the extension is a SHOULD),
/// otherwise both are required. The dev PKI (`veil-certs-dev`) and SPIRE issue leaves with both.
/// webpki applies the validator to every certificate of the path, so an intermediate whose EKU
/// narrows below that refuses its leaves as well (§4.4 leaves CA EKU processing to libraries).
struct SpiffeMtlsEku;

impl ExtendedKeyUsageValidator for SpiffeMtlsEku {
    fn validate(&self, iter: KeyPurposeIdIter<'_, '_>) -> Result<(), webpki::Error> {
        let (server, client) = (
            KeyPurposeId::new(EKU_SERVER_AUTH),
            KeyPurposeId::new(EKU_CLIENT_AUTH),
        );
        let (mut is_present, mut has_server, mut has_client) = (false, false, false);
        let mut present = Vec::new();
        for id in iter {
            let id = id?;
            is_present = true;
            has_server |= id == server;
            has_client |= id == client;
            present.push(id.to_decoded_oid());
        }
        if !is_present || (has_server && has_client) {
            return Ok(());
        }
        let required = if has_client {
            webpki::KeyUsage::server_auth()
        } else {
            webpki::KeyUsage::client_auth()
        };
        Err(webpki::Error::RequiredEkuNotFoundContext(
            webpki::RequiredEkuNotFoundContext { required, present },
        ))
    }
}

/// A refusal from webpki's certificate parser, for the presented certificate `index`.
fn certificate_error(index: usize, e: webpki::Error) -> SvidError {
    match (index, e) {
        (0, webpki::Error::UnsupportedCriticalExtension) => SvidError::LeafUnknownCriticalExtension,
        (index, webpki::Error::UnsupportedCriticalExtension) => {
            SvidError::IntermediateUnknownCriticalExtension { index }
        }
        (index, source) => SvidError::UnsupportedCertificate { index, source },
    }
}

/// A refusal from webpki's path building. The leaf's own validity, CA bit and critical
/// extensions were checked before, so validity and CA errors here are about issuers.
fn path_error(e: webpki::Error, td: &TrustDomain) -> SvidError {
    use webpki::Error as E;
    let to_system = |t: UnixTime| UNIX_EPOCH + Duration::from_secs(t.as_secs());
    match e {
        E::UnknownIssuer => SvidError::UntrustedRoot(td.clone()),
        E::CertExpired { not_after, .. } => SvidError::IssuerExpired {
            not_after: to_system(not_after),
        },
        E::CertNotValidYet { not_before, .. } => SvidError::IssuerNotYetValid {
            not_before: to_system(not_before),
        },
        E::CaUsedAsEndEntity => SvidError::LeafIsCa,
        E::EndEntityUsedAsCa => SvidError::IntermediateNotCa,
        E::PathLenConstraintViolated => SvidError::PathLenConstraintExceeded,
        E::NameConstraintViolation => SvidError::NameConstraintViolation,
        E::RequiredEkuNotFoundContext(_) | E::EmptyEkuExtension => {
            SvidError::ExtendedKeyUsageNotMtls
        }
        E::InvalidSignatureForPublicKey => SvidError::BadSignature,
        E::UnsupportedSignatureAlgorithmContext(_)
        | E::UnsupportedSignatureAlgorithmForPublicKeyContext(_) => {
            SvidError::UnsupportedSignatureAlgorithm
        }
        other => SvidError::PathRejected(other),
    }
}

/// Trust anchors for one path search, each with the parsed root it came from.
#[derive(Default)]
struct Anchors<'r> {
    anchors: Vec<TrustAnchor<'r>>,
    roots: Vec<X509Certificate<'r>>,
}

/// The path webpki verified, in terms of the presented chain and the bundle.
struct PathFacts<'r> {
    /// Number of intermediates on the path.
    intermediates: usize,
    /// Presented certificates (indices, leaf excluded) that are on the path.
    presented_on_path: Vec<usize>,
    /// The anchoring root.
    root: X509Certificate<'r>,
}

/// Builds and verifies the path from the leaf through the presented intermediates to a root of
/// `roots` with webpki.
fn verify_path<'r>(
    chain_der: &[CertificateDer<'_>],
    roots: &'r [CertificateDer<'static>],
    td: &TrustDomain,
    now: SystemTime,
) -> Result<PathFacts<'r>, SvidError> {
    let leaf =
        webpki::EndEntityCert::try_from(&chain_der[0]).map_err(|e| certificate_error(0, e))?;
    let intermediates = &chain_der[1..];
    let time = UnixTime::since_unix_epoch(now.duration_since(UNIX_EPOCH).unwrap_or_default());

    // Roots inside their validity window anchor; the others are kept to explain a refusal.
    let mut current = Anchors::default();
    let mut stale = Anchors::default();
    let mut stale_reasons = Vec::new();
    for der in roots.iter() {
        // Roots were checked when the bundle was built; one that no longer parses simply
        // cannot anchor anything.
        let (Ok(anchor), Ok(root)) = (webpki::anchor_from_trusted_cert(der), parse_cert(der))
        else {
            continue;
        };
        let set = match check_validity(&root, now, Whose::Root) {
            Ok(()) => &mut current,
            Err(reason) => {
                stale_reasons.push(reason);
                &mut stale
            }
        };
        set.anchors.push(anchor);
        set.roots.push(root);
    }

    let verify = |set: &Anchors<'r>| -> Result<(usize, usize, Vec<usize>), webpki::Error> {
        let path = leaf.verify_for_usage(
            SIGNATURE_ALGORITHMS,
            &set.anchors,
            intermediates,
            time,
            SpiffeMtlsEku,
            None,
            None,
        )?;
        let used: Vec<CertificateDer<'_>> =
            path.intermediate_certificates().map(|c| c.der()).collect();
        let presented_on_path = (1..chain_der.len())
            .filter(|&i| used.iter().any(|u| u.as_ref() == chain_der[i].as_ref()))
            .collect();
        // The anchor webpki returns is one of `set.anchors`; not finding it fails closed.
        let anchor = set
            .anchors
            .iter()
            .position(|a| std::ptr::eq(a, path.anchor()))
            .ok_or(webpki::Error::UnknownIssuer)?;
        Ok((anchor, used.len(), presented_on_path))
    };

    match verify(&current) {
        Ok((anchor, intermediates, presented_on_path)) => Ok(PathFacts {
            intermediates,
            presented_on_path,
            root: current.roots.swap_remove(anchor),
        }),
        Err(e) => {
            // Would a root outside its validity window anchor it? Then that is the reason.
            if !stale.anchors.is_empty() {
                if let Ok((anchor, _, _)) = verify(&stale) {
                    return Err(stale_reasons.swap_remove(anchor));
                }
            }
            Err(path_error(e, td))
        }
    }
}

/// Validates an X.509-SVID chain (leaf first, then intermediates) against the roots of the
/// leaf's own trust domain in `bundles`, at time `now`.
///
/// Checks, in order, each with its own error: chain length; every certificate parses; exactly
/// one URI SAN that is a SPIFFE ID with a path; leaf is not a CA, has digitalSignature and
/// neither keyCertSign nor cRLSign; leaf validity window; a bundle exists for the trust domain;
/// no presented CA names a SPIFFE ID of another trust domain; webpki's parser accepts every
/// presented certificate (no unknown critical extension); webpki builds and verifies a path to
/// a root of that bundle (validity of the issuers, signatures, cA and pathLenConstraint of every
/// issuer, name constraints, extended key usage); then on that path every issuer has
/// keyCertSign, the root is inside its validity window and its pathLenConstraint holds.
pub fn validate_x509_svid(
    chain_der: &[CertificateDer<'_>],
    bundles: &impl TrustRoots,
    now: SystemTime,
) -> Result<ValidatedSvid, SvidError> {
    if chain_der.is_empty() {
        return Err(SvidError::EmptyChain);
    }
    if chain_der.len() > MAX_CHAIN_LEN {
        return Err(SvidError::ChainTooLong(chain_der.len()));
    }
    let chain = chain_der
        .iter()
        .enumerate()
        .map(|(index, der)| {
            parse_cert(der).map_err(|source| SvidError::Malformed { index, source })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let leaf = &chain[0];

    // SPIFFE leaf rules (X509-SVID §2, §3.1, §4.3, §5.2).
    let spiffe_id = leaf_spiffe_id(leaf)?;
    let td = spiffe_id.trust_domain();
    if is_ca(leaf) {
        return Err(SvidError::LeafIsCa);
    }
    match leaf.key_usage() {
        Err(source) => return Err(SvidError::Malformed { index: 0, source }),
        Ok(None) => return Err(SvidError::LeafMissingDigitalSignature),
        Ok(Some(ku)) => {
            if ku.value.key_cert_sign() {
                return Err(SvidError::LeafKeyCertSign);
            }
            if ku.value.crl_sign() {
                return Err(SvidError::LeafCrlSign);
            }
            if !ku.value.digital_signature() {
                return Err(SvidError::LeafMissingDigitalSignature);
            }
        }
    }
    check_validity(leaf, now, Whose::Leaf)?;

    let roots = bundles
        .roots(&td)
        .ok_or_else(|| SvidError::NoBundle(td.clone()))?;

    // Every certificate after the leaf must be a CA: a chain carries one end-entity
    // certificate, so another workload's leaf presented beside it is refused, not merely left
    // off the path (webpki would ignore it as an unused intermediate).
    for (index, cert) in chain.iter().enumerate().skip(1) {
        if !is_ca(cert) {
            return Err(SvidError::IntermediateNotCa);
        }
        // A presented CA that names a SPIFFE ID must name this trust domain: a CA of another
        // trust domain cannot vouch for ours even if someone chained it in.
        let uris = uri_sans(cert).map_err(|source| SvidError::Malformed { index, source })?;
        for uri in uris {
            if let Ok(id) = SpiffeId::parse(uri) {
                if !id.is_member_of(&td) {
                    return Err(SvidError::IntermediateForeignTrustDomain {
                        index,
                        expected: td.clone(),
                        found: id.trust_domain_name().to_owned(),
                    });
                }
            }
        }
    }

    // webpki refuses an unknown critical extension while parsing a certificate, but during
    // path building it does not say which one; parsing each presented certificate here names
    // it. A bundle root appended to the chain is an anchor, not an intermediate (webpki
    // ignores unknown critical extensions on anchors), so it is left to the path search.
    for (index, der) in chain_der.iter().enumerate() {
        if index > 0 && roots.iter().any(|r| r.as_ref() == der.as_ref()) {
            continue;
        }
        webpki::EndEntityCert::try_from(der).map_err(|e| certificate_error(index, e))?;
    }

    let path = verify_path(chain_der, &roots, &td, now)?;

    // What webpki leaves to its caller, on the path it verified.
    let root_index = chain.len();
    for &index in &path.presented_on_path {
        check_issuer_key_usage(&chain[index], index)?;
    }
    let root = &path.root;
    check_issuer_key_usage(root, root_index)?;
    check_root_path_len(root, root_index, path.intermediates)?;

    let valid_until = path
        .presented_on_path
        .iter()
        .map(|&i| &chain[i])
        .chain([leaf, root])
        .map(|c| asn1_to_system(c.validity().not_after))
        .min()
        .expect("the path has a leaf and a root");

    Ok(ValidatedSvid {
        spiffe_id,
        serial: serial_hex(leaf),
        not_before: asn1_to_system(leaf.validity().not_before),
        not_after: asn1_to_system(leaf.validity().not_after),
        valid_until,
        leaf: CertificateDer::from(chain_der[0].as_ref().to_vec()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_key_debug_is_redacted() {
        let key = SvidPrivateKey::from_pkcs8_der(vec![0x30, 0x01, 0x42]);
        assert_eq!(format!("{key:?}"), "SvidPrivateKey(redacted)");
        assert!(!format!("{key:?}").contains("42"));
    }

    #[test]
    fn empty_chain_is_rejected() {
        let bundles = crate::Bundles::new();
        assert!(matches!(
            validate_x509_svid(&[], &bundles, SystemTime::now()),
            Err(SvidError::EmptyChain)
        ));
        assert!(matches!(
            Svid::from_der(vec![], SvidPrivateKey::from_pkcs8_der(vec![])),
            Err(SvidError::EmptyChain)
        ));
    }

    #[test]
    fn garbage_is_malformed() {
        let bundles = crate::Bundles::new();
        let chain = [CertificateDer::from(vec![0x30, 0x03, 1, 2, 3])];
        assert!(matches!(
            validate_x509_svid(&chain, &bundles, SystemTime::now()),
            Err(SvidError::Malformed { index: 0, .. })
        ));
    }

    #[test]
    fn too_long_chain_is_rejected() {
        let bundles = crate::Bundles::new();
        let chain: Vec<_> = (0..MAX_CHAIN_LEN + 1)
            .map(|_| CertificateDer::from(vec![0x30, 0x00]))
            .collect();
        assert!(matches!(
            validate_x509_svid(&chain, &bundles, SystemTime::now()),
            Err(SvidError::ChainTooLong(9))
        ));
    }
}
