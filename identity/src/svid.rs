//! X.509-SVIDs: the agent's `Svid` (chain + zeroizing private key) and explicit validation per
//! the X.509-SVID specification (spiffe/standards/X509-SVID.md).
//!
//! Validation is written out rule by rule instead of delegating to a library's path builder:
//! every SPIFFE rule is its own [`SvidError`] variant, and the chain is anchored only in the
//! roots of the SVID's *own* trust domain, which a generic web-PKI verifier does not know about.
//! Signatures are checked with `x509-parser`'s `verify-aws` feature: it verifies one link at a
//! time given the issuer's SPKI (which is what an explicit chain walk needs) and uses aws-lc-rs,
//! the crypto provider the agent's mTLS already uses, so no second provider (ring) comes in.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use x509_parser::certificate::X509Certificate;
use x509_parser::error::X509Error;
use x509_parser::extensions::GeneralName;
use x509_parser::oid_registry::{OID_PKCS1_SHA1WITHRSA, OID_SHA1_WITH_RSA};
use x509_parser::prelude::FromDer;
use x509_parser::time::ASN1Time;
use zeroize::Zeroizing;

use crate::bundle::TrustRoots;
use crate::id::{IdError, SpiffeId, TrustDomain};

/// Longest chain (leaf + intermediates) accepted; SPIRE chains are 1–3 long.
pub const MAX_CHAIN_LEN: usize = 8;

/// Why an X.509-SVID was rejected: one variant per rule. `index` is the position in the
/// presented chain (0 = leaf); `chain.len()` designates the bundle root that anchored it.
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
    #[error("svid leaf is not valid before {} (unix seconds)", unix_secs(*not_before))]
    NotYetValid { not_before: SystemTime },
    #[error("svid leaf expired at {} (unix seconds)", unix_secs(*not_after))]
    Expired { not_after: SystemTime },
    #[error("svid issuer certificate {index} is not valid yet")]
    IssuerNotYetValid { index: usize },
    #[error("svid issuer certificate {index} has expired")]
    IssuerExpired { index: usize },
    #[error("no trust bundle for trust domain {0}")]
    NoBundle(TrustDomain),
    #[error("svid certificate {index} is not a ca but issues certificate {}", index - 1)]
    IntermediateNotCa { index: usize },
    #[error("svid certificate {index} issues certificates but lacks the keyCertSign key usage")]
    IntermediateCannotSign { index: usize },
    #[error("svid intermediate {index} belongs to trust domain {found}, not {expected}")]
    IntermediateForeignTrustDomain {
        index: usize,
        expected: TrustDomain,
        found: String,
    },
    #[error("svid certificate {index}: issuer name does not match the next certificate's subject")]
    IssuerMismatch { index: usize },
    #[error("svid certificate {index} uses an unsupported or weak signature algorithm")]
    UnsupportedSignatureAlgorithm { index: usize },
    #[error("svid certificate {index}: signature does not verify with its issuer's key")]
    BadSignature { index: usize },
    #[error("svid chain does not lead to a root of trust domain {0}")]
    UntrustedRoot(TrustDomain),
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

fn check_validity(
    cert: &X509Certificate<'_>,
    now: SystemTime,
    index: usize,
) -> Result<(), SvidError> {
    let not_before = asn1_to_system(cert.validity().not_before);
    let not_after = asn1_to_system(cert.validity().not_after);
    match (index, now < not_before, now > not_after) {
        (0, true, _) => Err(SvidError::NotYetValid { not_before }),
        (0, _, true) => Err(SvidError::Expired { not_after }),
        (_, true, _) => Err(SvidError::IssuerNotYetValid { index }),
        (_, _, true) => Err(SvidError::IssuerExpired { index }),
        _ => Ok(()),
    }
}

/// Checks that `issuer` may sign and that it signed `cert`.
fn check_link(
    cert: &X509Certificate<'_>,
    index: usize,
    issuer: &X509Certificate<'_>,
    issuer_index: usize,
) -> Result<(), SvidError> {
    if !is_ca(issuer) {
        return Err(SvidError::IntermediateNotCa {
            index: issuer_index,
        });
    }
    match issuer.key_usage() {
        Ok(Some(ku)) if !ku.value.key_cert_sign() => {
            return Err(SvidError::IntermediateCannotSign {
                index: issuer_index,
            })
        }
        Ok(_) => {}
        Err(source) => {
            return Err(SvidError::Malformed {
                index: issuer_index,
                source,
            })
        }
    }
    verify_signature(cert, index, issuer)
}

fn verify_signature(
    cert: &X509Certificate<'_>,
    index: usize,
    issuer: &X509Certificate<'_>,
) -> Result<(), SvidError> {
    let alg = &cert.signature_algorithm.algorithm;
    // x509-parser still accepts SHA-1 RSA "for legacy use"; an SVID never needs it.
    if *alg == OID_PKCS1_SHA1WITHRSA || *alg == OID_SHA1_WITH_RSA {
        return Err(SvidError::UnsupportedSignatureAlgorithm { index });
    }
    match cert.verify_signature(Some(issuer.public_key())) {
        Ok(()) => Ok(()),
        Err(X509Error::SignatureUnsupportedAlgorithm) => {
            Err(SvidError::UnsupportedSignatureAlgorithm { index })
        }
        Err(_) => Err(SvidError::BadSignature { index }),
    }
}

/// Validates an X.509-SVID chain (leaf first, then intermediates) against the roots of the
/// leaf's own trust domain in `bundles`, at time `now`.
///
/// Checks, in order, each with its own error: chain parses; exactly one URI SAN that is a
/// SPIFFE ID with a path; leaf is not a CA, has digitalSignature and neither keyCertSign nor
/// cRLSign; leaf validity window; a bundle exists for the trust domain; each link: issuer name
/// matches, issuer is a CA allowed to sign, issuer in the same trust domain, issuer valid at
/// `now`, signature verifies; the last certificate is signed by (or is) a root of that bundle.
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
    check_validity(leaf, now, 0)?;

    let roots = bundles
        .roots(&td)
        .ok_or_else(|| SvidError::NoBundle(td.clone()))?;

    for i in 0..chain.len() - 1 {
        let (cert, issuer) = (&chain[i], &chain[i + 1]);
        if cert.issuer().as_raw() != issuer.subject().as_raw() {
            return Err(SvidError::IssuerMismatch { index: i });
        }
        // An intermediate that names a SPIFFE ID must name this trust domain: a CA of another
        // trust domain cannot vouch for ours even if someone chained it in.
        let uris = uri_sans(issuer).map_err(|source| SvidError::Malformed {
            index: i + 1,
            source,
        })?;
        for uri in uris {
            if let Ok(id) = SpiffeId::parse(uri) {
                if !id.is_member_of(&td) {
                    return Err(SvidError::IntermediateForeignTrustDomain {
                        index: i + 1,
                        expected: td.clone(),
                        found: id.trust_domain_name().to_owned(),
                    });
                }
            }
        }
        check_validity(issuer, now, i + 1)?;
        check_link(cert, i, issuer, i + 1)?;
    }

    // Anchor: the last presented certificate is itself a bundle root, or a bundle root of
    // this trust domain (and only this one) issued it.
    let last_index = chain.len() - 1;
    let last = &chain[last_index];
    let root_index = chain.len();
    let last_der: &[u8] = chain_der[last_index].as_ref();
    let mut valid_until = chain
        .iter()
        .map(|c| asn1_to_system(c.validity().not_after))
        .min()
        .expect("chain is not empty");
    let anchored_in_chain = last_index > 0 && roots.iter().any(|r| r.as_ref() == last_der);
    if !anchored_in_chain {
        let mut name_matched = false;
        let mut failure = None;
        for root_der in roots.iter() {
            // Roots were checked when the bundle was built; a root that no longer parses
            // simply cannot anchor anything.
            let Ok(root) = parse_cert(root_der) else {
                continue;
            };
            if root.subject().as_raw() != last.issuer().as_raw() {
                continue;
            }
            name_matched = true;
            // Several roots may share a name (CA rotation); any one that is valid and whose
            // key verifies the signature anchors the chain.
            match check_validity(&root, now, root_index)
                .and_then(|()| check_link(last, last_index, &root, root_index))
            {
                Ok(()) => {
                    failure = None;
                    valid_until = valid_until.min(asn1_to_system(root.validity().not_after));
                    break;
                }
                Err(e) => {
                    failure.get_or_insert(e);
                }
            }
        }
        if !name_matched {
            return Err(SvidError::UntrustedRoot(td));
        }
        if let Some(e) = failure {
            return Err(e);
        }
    }

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
