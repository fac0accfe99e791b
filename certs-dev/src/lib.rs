//! Development PKI.
//!
//! Owns: a CA per trust domain (rcgen, ECDSA P-256), an optional intermediate, node SVIDs
//! `spiffe://<td>/veil/node/<name>` and workload SVIDs `spiffe://<td>/ns/<ns>/sa/<sa>` with a
//! TTL and unique random serials, deliberately bad variants for validation tests (expired, not
//! yet valid, wrong trust domain, two URI SANs, CA leaf, wrong key usage, unknown critical
//! extensions, a non-CA intermediate, violated name and path-length constraints, …), CA
//! rotation (a new root for the same trust domain so bundles can carry old and new), and
//! writing a PKI to disk as PEM files.
//!
//! Must not depend on: the agent or the SPIRE clients. Never used for production identities.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rand::Rng;
use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use veil_identity::{IdError, SpiffeId, Svid, SvidError, SvidPrivateKey, TrustDomain};
use zeroize::Zeroizing;

/// Validity of a dev root or intermediate.
pub const DEFAULT_CA_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// CAs are backdated this much so a leaf issued "now" is always inside its issuer's window.
const CA_BACKDATE: Duration = Duration::from_secs(3600);
/// An extension OID no validator knows: 1.3.6.1.4.1.32473.1, under the private enterprise
/// number IANA reserves for documentation (RFC 5612).
pub const UNKNOWN_EXTENSION_OID: &[u64] = &[1, 3, 6, 1, 4, 1, 32473, 1];
/// id-ce-nameConstraints (2.5.29.30).
const NAME_CONSTRAINTS_OID: &[u64] = &[2, 5, 29, 30];

/// Errors of the dev PKI.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("certificate generation failed")]
    Generate(#[source] rcgen::Error),
    #[error("invalid spiffe id for a dev svid")]
    Id(#[source] IdError),
    #[error("issued svid does not parse as an svid")]
    Svid(#[source] SvidError),
    #[error("pki file name {0:?} is not a plain file name")]
    BadName(String),
    #[error("writing {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl From<rcgen::Error> for Error {
    fn from(e: rcgen::Error) -> Self {
        Self::Generate(e)
    }
}

/// `spiffe://<td>/veil/node/<name>`.
pub fn node_id(td: &TrustDomain, node: &str) -> Result<SpiffeId, IdError> {
    SpiffeId::from_segments(td, &["veil", "node", node])
}

/// `spiffe://<td>/ns/<ns>/sa/<sa>`.
pub fn workload_id(
    td: &TrustDomain,
    namespace: &str,
    service_account: &str,
) -> Result<SpiffeId, IdError> {
    SpiffeId::from_segments(td, &["ns", namespace, "sa", service_account])
}

/// Shape of a dev CA.
#[derive(Clone, Debug)]
pub struct CaOptions {
    /// Issue leaves from an intermediate under the root (chains leaf → intermediate).
    pub with_intermediate: bool,
    pub validity: Duration,
    /// basicConstraints pathLenConstraint of the root (`None`: unconstrained).
    pub root_path_len: Option<u8>,
}

impl Default for CaOptions {
    fn default() -> Self {
        Self {
            with_intermediate: false,
            validity: DEFAULT_CA_VALIDITY,
            root_path_len: None,
        }
    }
}

/// What a leaf should look like; the good and the bad variants are all built from this.
#[derive(Clone, Debug)]
pub struct LeafSpec {
    /// URI SANs, in order (a good SVID has exactly one, its SPIFFE ID).
    pub uris: Vec<String>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// basicConstraints cA=true on the leaf (bad).
    pub is_ca: bool,
    /// keyCertSign on the leaf (bad).
    pub key_cert_sign: bool,
    /// digitalSignature on the leaf (good SVIDs have it).
    pub digital_signature: bool,
    /// clientAuth in the extended key usage, beside serverAuth (good SVIDs have both).
    pub client_auth: bool,
    /// A critical extension of [`UNKNOWN_EXTENSION_OID`] on the leaf (bad).
    pub unknown_critical_extension: bool,
}

impl LeafSpec {
    /// A good SVID for `id` valid from `not_before` for `ttl`.
    pub fn svid(id: &SpiffeId, not_before: SystemTime, ttl: Duration) -> Self {
        Self {
            uris: vec![id.to_string()],
            not_before,
            not_after: not_before + ttl,
            is_ca: false,
            key_cert_sign: false,
            digital_signature: true,
            client_auth: true,
            unknown_critical_extension: false,
        }
    }
}

/// A chain and key as issued, before any SVID rule is applied (bad variants live here).
#[derive(Clone, Debug)]
pub struct IssuedChain {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: SvidPrivateKey,
}

impl IssuedChain {
    pub fn into_svid(self) -> Result<Svid, Error> {
        Svid::from_der(self.chain, self.key).map_err(Error::Svid)
    }
}

/// Deliberately broken SVIDs for tests of the validator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BadVariant {
    /// `notAfter` in the past.
    Expired,
    /// `notBefore` in the future.
    NotYetValid,
    /// A SPIFFE ID of this trust domain, signed by another trust domain's CA.
    WrongTrustDomain,
    /// Two URI SANs.
    TwoUriSans,
    /// No URI SAN at all.
    NoUriSan,
    /// basicConstraints cA=true on the leaf.
    CaLeaf,
    /// keyCertSign key usage on the leaf.
    KeyCertSignLeaf,
    /// No digitalSignature key usage.
    NoDigitalSignature,
    /// A leaf whose signature was altered after issuance.
    TamperedSignature,
    /// An extended key usage with serverAuth but not clientAuth.
    NoClientAuth,
    /// A critical extension no validator knows, on the leaf.
    LeafUnknownCriticalExtension,
    /// A critical extension no validator knows, on an extra intermediate that issues the leaf.
    IntermediateUnknownCriticalExtension,
    /// The leaf is issued by an extra "intermediate" with basicConstraints cA=false (it has
    /// keyCertSign, so the CA bit is the only thing wrong with it).
    IntermediateNotCa,
    /// The leaf is issued by an extra intermediate whose keyUsage lacks keyCertSign.
    IntermediateCannotSign,
    /// The leaf is issued by an extra intermediate whose name constraints exclude the URI host
    /// of the leaf's SPIFFE ID (its trust domain).
    NameConstraintsExcludeLeaf,
    /// The leaf is issued two levels below an extra intermediate with pathLenConstraint 0.
    PathLenExceeded,
}

impl BadVariant {
    pub const ALL: [BadVariant; 16] = [
        Self::Expired,
        Self::NotYetValid,
        Self::WrongTrustDomain,
        Self::TwoUriSans,
        Self::NoUriSan,
        Self::CaLeaf,
        Self::KeyCertSignLeaf,
        Self::NoDigitalSignature,
        Self::TamperedSignature,
        Self::NoClientAuth,
        Self::LeafUnknownCriticalExtension,
        Self::IntermediateUnknownCriticalExtension,
        Self::IntermediateNotCa,
        Self::IntermediateCannotSign,
        Self::NameConstraintsExcludeLeaf,
        Self::PathLenExceeded,
    ];
}

struct CaLevel {
    der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

/// A dev certificate authority for one trust domain.
pub struct DevCa {
    trust_domain: TrustDomain,
    generation: u32,
    options: CaOptions,
    root: CaLevel,
    intermediate: Option<CaLevel>,
}

impl std::fmt::Debug for DevCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevCa")
            .field("trust_domain", &self.trust_domain)
            .field("generation", &self.generation)
            .field("with_intermediate", &self.intermediate.is_some())
            .finish_non_exhaustive()
    }
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand::rng().fill(&mut bytes[..]);
    // Positive and without a leading zero byte, so the DER integer is exactly these 16 bytes
    // and the hex serial is always 32 digits.
    bytes[0] = (bytes[0] & 0x7f).max(1);
    SerialNumber::from_slice(&bytes)
}

fn ca_params(td: &TrustDomain, cn: String, validity: Duration) -> Result<CertificateParams, Error> {
    let now = SystemTime::now();
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "veil dev");
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.subject_alt_names = vec![SanType::URI(td.id_string().try_into()?)];
    p.not_before = (now - CA_BACKDATE).into();
    p.not_after = (now + validity).into();
    p.serial_number = Some(random_serial());
    p.use_authority_key_identifier_extension = true;
    Ok(p)
}

/// An extension of [`UNKNOWN_EXTENSION_OID`] (value: DER NULL), critical or not.
pub fn unknown_extension(critical: bool) -> CustomExtension {
    let mut ext = CustomExtension::from_oid_content(UNKNOWN_EXTENSION_OID, vec![0x05, 0x00]);
    ext.set_criticality(critical);
    ext
}

/// A CA certificate placed between a [`DevCa`]'s issuing CA and a leaf, for chains that test
/// path rules (see [`DevCa::issue_chain_under`]). The default is a good intermediate.
#[derive(Clone, Debug, Default)]
pub struct ExtraCa {
    /// basicConstraints cA=false while keeping keyCertSign (bad: not a CA).
    pub not_ca: bool,
    /// basicConstraints pathLenConstraint (`None`: unconstrained).
    pub path_len: Option<u8>,
    /// keyUsage without keyCertSign (bad: not allowed to sign certificates).
    pub no_key_cert_sign: bool,
    /// Further extensions: name constraints, unknown (critical) extensions, …
    pub extensions: Vec<CustomExtension>,
}

/// DER tag-length-value.
fn der_tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend_from_slice(content);
    out
}

/// A critical nameConstraints extension excluding the URI hosts `excluded`.
///
/// rcgen's `NameConstraints` cannot express URI subtrees (its `GeneralSubtree` has no URI
/// form), so the extension is encoded by hand (RFC 5280 §4.2.1.10):
/// `NameConstraints ::= SEQUENCE { excludedSubtrees [1] SEQUENCE OF GeneralSubtree }`,
/// `GeneralSubtree ::= SEQUENCE { base GeneralName }`, a URI being `[6] IA5String`; for URIs the
/// constraint names a host, here the trust domain of a SPIFFE ID.
pub fn uri_name_constraints_excluding(excluded: &[&str]) -> CustomExtension {
    let subtrees: Vec<u8> = excluded
        .iter()
        .flat_map(|host| der_tlv(0x30, &der_tlv(0x86, host.as_bytes())))
        .collect();
    let value = der_tlv(0x30, &der_tlv(0xa1, &subtrees));
    let mut ext = CustomExtension::from_oid_content(NAME_CONSTRAINTS_OID, value);
    ext.set_criticality(true);
    ext
}

impl DevCa {
    /// A root-only CA.
    pub fn new(trust_domain: TrustDomain) -> Result<Self, Error> {
        Self::with_options(trust_domain, CaOptions::default())
    }

    pub fn with_options(trust_domain: TrustDomain, options: CaOptions) -> Result<Self, Error> {
        Self::build(trust_domain, options, 1)
    }

    fn build(
        trust_domain: TrustDomain,
        options: CaOptions,
        generation: u32,
    ) -> Result<Self, Error> {
        let root_key = KeyPair::generate()?;
        let mut root_params = ca_params(
            &trust_domain,
            format!("veil dev root {trust_domain} g{generation}"),
            options.validity,
        )?;
        if let Some(len) = options.root_path_len {
            root_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(len));
        }
        let root_der = root_params.self_signed(&root_key)?.der().clone();
        let root = CaLevel {
            der: root_der,
            issuer: Issuer::new(root_params, root_key),
        };
        let intermediate = if options.with_intermediate {
            let key = KeyPair::generate()?;
            let params = ca_params(
                &trust_domain,
                format!("veil dev intermediate {trust_domain} g{generation}"),
                options.validity,
            )?;
            let der = params.signed_by(&key, &root.issuer)?.der().clone();
            Some(CaLevel {
                der,
                issuer: Issuer::new(params, key),
            })
        } else {
            None
        };
        Ok(Self {
            trust_domain,
            generation,
            options,
            root,
            intermediate,
        })
    }

    /// A new CA for the same trust domain (fresh root and keys, next generation): the
    /// "prepare" step of CA rotation. Bundles then carry both roots until the old is revoked.
    pub fn rotate(&self) -> Result<DevCa, Error> {
        Self::build(
            self.trust_domain.clone(),
            self.options.clone(),
            self.generation + 1,
        )
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn generation(&self) -> u32 {
        self.generation
    }

    pub fn root(&self) -> &CertificateDer<'static> {
        &self.root.der
    }

    pub fn intermediate(&self) -> Option<&CertificateDer<'static>> {
        self.intermediate.as_ref().map(|i| &i.der)
    }

    /// This CA's contribution to its trust domain's bundle: the root.
    pub fn bundle(&self) -> Vec<CertificateDer<'static>> {
        vec![self.root.der.clone()]
    }

    /// Issues a leaf as specified, signed by the intermediate if any, else the root.
    pub fn issue_chain(&self, spec: &LeafSpec) -> Result<IssuedChain, Error> {
        self.issue_chain_under(spec, &[])
    }

    /// Issues a leaf under extra CAs of this trust domain: `extra_cas[0]` is signed by this
    /// CA's issuing CA (the intermediate if any, else the root), each next one by the one
    /// before, the leaf by the last. The chain is the leaf, the extra CAs bottom-up, then this
    /// CA's intermediate if any.
    pub fn issue_chain_under(
        &self,
        spec: &LeafSpec,
        extra_cas: &[ExtraCa],
    ) -> Result<IssuedChain, Error> {
        let base = self.intermediate.as_ref().unwrap_or(&self.root);
        let mut levels: Vec<CaLevel> = Vec::new();
        for (level, extra) in extra_cas.iter().enumerate() {
            // Distinct names per level so each certificate's issuer names its parent.
            let mut params = ca_params(
                &self.trust_domain,
                format!(
                    "veil dev extra intermediate {level} {} g{}",
                    self.trust_domain, self.generation
                ),
                self.options.validity,
            )?;
            params.is_ca = match (extra.not_ca, extra.path_len) {
                (true, _) => IsCa::ExplicitNoCa,
                (false, Some(len)) => IsCa::Ca(BasicConstraints::Constrained(len)),
                (false, None) => IsCa::Ca(BasicConstraints::Unconstrained),
            };
            if extra.no_key_cert_sign {
                params.key_usages =
                    vec![KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
            }
            params.custom_extensions = extra.extensions.clone();
            let key = KeyPair::generate()?;
            let signer = levels.last().unwrap_or(base);
            let der = params.signed_by(&key, &signer.issuer)?.der().clone();
            levels.push(CaLevel {
                der,
                issuer: Issuer::new(params, key),
            });
        }

        let key = KeyPair::generate()?;
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "veil dev");
        p.distinguished_name = dn;
        p.subject_alt_names = spec
            .uris
            .iter()
            .map(|u| Ok(SanType::URI(u.clone().try_into()?)))
            .collect::<Result<_, rcgen::Error>>()?;
        p.not_before = spec.not_before.into();
        p.not_after = spec.not_after.into();
        p.serial_number = Some(random_serial());
        p.use_authority_key_identifier_extension = true;
        // rcgen's default `NoCa` omits basicConstraints; SVID consumers (the spiffe crate among
        // them) require it present with cA=false.
        p.is_ca = if spec.is_ca {
            IsCa::Ca(BasicConstraints::Unconstrained)
        } else {
            IsCa::ExplicitNoCa
        };
        let mut usages = Vec::new();
        if spec.digital_signature {
            usages.extend([
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
                KeyUsagePurpose::KeyAgreement,
            ]);
        } else {
            usages.push(KeyUsagePurpose::KeyEncipherment);
        }
        if spec.key_cert_sign {
            usages.push(KeyUsagePurpose::KeyCertSign);
        }
        p.key_usages = usages;
        // X509-SVID §4.4: when present, the extension lists serverAuth and clientAuth.
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        if spec.client_auth {
            p.extended_key_usages
                .push(ExtendedKeyUsagePurpose::ClientAuth);
        }
        if spec.unknown_critical_extension {
            p.custom_extensions.push(unknown_extension(true));
        }
        let signer = levels.last().unwrap_or(base);
        let leaf = p.signed_by(&key, &signer.issuer)?.der().clone();
        let mut chain = vec![leaf];
        chain.extend(levels.iter().rev().map(|l| l.der.clone()));
        if let Some(i) = &self.intermediate {
            chain.push(i.der.clone());
        }
        Ok(IssuedChain {
            chain,
            key: SvidPrivateKey::from_pkcs8_der(key.serialize_der()),
        })
    }

    /// A good SVID for `id`, valid from now for `ttl`.
    pub fn issue(&self, id: &SpiffeId, ttl: Duration) -> Result<Svid, Error> {
        self.issue_chain(&LeafSpec::svid(id, SystemTime::now(), ttl))?
            .into_svid()
    }

    /// `spiffe://<td>/veil/node/<name>`, valid from now for `ttl`.
    pub fn issue_node_svid(&self, node: &str, ttl: Duration) -> Result<Svid, Error> {
        let id = node_id(&self.trust_domain, node).map_err(Error::Id)?;
        self.issue(&id, ttl)
    }

    /// `spiffe://<td>/ns/<ns>/sa/<sa>`, valid from now for `ttl`.
    pub fn issue_workload_svid(
        &self,
        namespace: &str,
        service_account: &str,
        ttl: Duration,
    ) -> Result<Svid, Error> {
        let id = workload_id(&self.trust_domain, namespace, service_account).map_err(Error::Id)?;
        self.issue(&id, ttl)
    }

    /// A deliberately bad chain for `id` (a SPIFFE ID of this CA's trust domain).
    pub fn issue_bad(&self, variant: BadVariant, id: &SpiffeId) -> Result<IssuedChain, Error> {
        let now = SystemTime::now();
        let hour = Duration::from_secs(3600);
        let mut spec = LeafSpec::svid(id, now, hour);
        match variant {
            BadVariant::Expired => {
                spec.not_before = now - 2 * hour;
                spec.not_after = now - hour;
            }
            BadVariant::NotYetValid => {
                spec.not_before = now + hour;
                spec.not_after = now + 2 * hour;
            }
            BadVariant::WrongTrustDomain => {
                let foreign = TrustDomain::new(&format!("foreign.{}", self.trust_domain))
                    .or_else(|_| TrustDomain::new("foreign.invalid"))
                    .map_err(Error::Id)?;
                return DevCa::with_options(foreign, self.options.clone())?.issue_chain(&spec);
            }
            BadVariant::TwoUriSans => {
                let second =
                    SpiffeId::from_segments(&self.trust_domain, &["second"]).map_err(Error::Id)?;
                spec.uris.push(second.to_string());
            }
            BadVariant::NoUriSan => spec.uris.clear(),
            BadVariant::CaLeaf => spec.is_ca = true,
            BadVariant::KeyCertSignLeaf => spec.key_cert_sign = true,
            BadVariant::NoDigitalSignature => spec.digital_signature = false,
            BadVariant::NoClientAuth => spec.client_auth = false,
            BadVariant::LeafUnknownCriticalExtension => spec.unknown_critical_extension = true,
            BadVariant::IntermediateUnknownCriticalExtension => {
                let ca = ExtraCa {
                    extensions: vec![unknown_extension(true)],
                    ..ExtraCa::default()
                };
                return self.issue_chain_under(&spec, &[ca]);
            }
            BadVariant::IntermediateNotCa => {
                let ca = ExtraCa {
                    not_ca: true,
                    ..ExtraCa::default()
                };
                return self.issue_chain_under(&spec, &[ca]);
            }
            BadVariant::IntermediateCannotSign => {
                let ca = ExtraCa {
                    no_key_cert_sign: true,
                    ..ExtraCa::default()
                };
                return self.issue_chain_under(&spec, &[ca]);
            }
            BadVariant::NameConstraintsExcludeLeaf => {
                let leaf_host = self.trust_domain.as_str();
                let ca = ExtraCa {
                    extensions: vec![uri_name_constraints_excluding(&[leaf_host])],
                    ..ExtraCa::default()
                };
                return self.issue_chain_under(&spec, &[ca]);
            }
            BadVariant::PathLenExceeded => {
                let upper = ExtraCa {
                    path_len: Some(0),
                    ..ExtraCa::default()
                };
                return self.issue_chain_under(&spec, &[upper, ExtraCa::default()]);
            }
            BadVariant::TamperedSignature => {
                let mut issued = self.issue_chain(&spec)?;
                let mut leaf = issued.chain[0].as_ref().to_vec();
                // The signature BIT STRING ends the certificate; for ECDSA its last byte is
                // the low byte of `s`, so the DER still parses and only the signature breaks.
                let last = leaf.len() - 1;
                leaf[last] ^= 0x01;
                issued.chain[0] = CertificateDer::from(leaf);
                return Ok(issued);
            }
        }
        self.issue_chain(&spec)
    }
}

fn pem(label: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(label, der.to_vec()))
}

fn check_name(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if ok {
        Ok(())
    } else {
        Err(Error::BadName(name.to_owned()))
    }
}

/// Writes `contents` to `path` atomically (temp file + rename) with `mode`.
fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), Error> {
    let io = |source| Error::Io {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(contents).map_err(io)?;
    f.sync_all().map_err(io)?;
    fs::rename(&tmp, path).map_err(io)
}

/// Writes a dev PKI under `dir` as PEM:
/// - `bundle.pem`: the roots of `bundle` (e.g. one or two CAs' roots during rotation);
/// - `<name>/svid.pem`: the SVID chain, leaf first;
/// - `<name>/key.pem`: its PKCS#8 private key, mode 0600.
///
/// Names must be plain file names (`[A-Za-z0-9._-]`). Returns the files written.
pub fn write_pki(
    dir: &Path,
    bundle: &[CertificateDer<'_>],
    svids: &[(&str, &Svid)],
) -> Result<Vec<PathBuf>, Error> {
    for (name, _) in svids {
        check_name(name)?;
    }
    let mkdir = |d: &Path| {
        fs::create_dir_all(d).map_err(|source| Error::Io {
            path: d.to_owned(),
            source,
        })
    };
    mkdir(dir)?;
    let mut written = Vec::new();
    let bundle_path = dir.join("bundle.pem");
    let bundle_pem: String = bundle.iter().map(|c| pem("CERTIFICATE", c)).collect();
    write_file(&bundle_path, bundle_pem.as_bytes(), 0o644)?;
    written.push(bundle_path);
    for (name, svid) in svids {
        let sub = dir.join(name);
        mkdir(&sub)?;
        let chain: String = svid
            .cert_chain()
            .iter()
            .map(|c| pem("CERTIFICATE", c))
            .collect();
        let svid_path = sub.join("svid.pem");
        write_file(&svid_path, chain.as_bytes(), 0o644)?;
        let key = Zeroizing::new(pem("PRIVATE KEY", svid.private_key().pkcs8_der()));
        let key_path = sub.join("key.pem");
        write_file(&key_path, key.as_bytes(), 0o600)?;
        written.extend([svid_path, key_path]);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use veil_identity::{validate_x509_svid, Bundles};

    fn td() -> TrustDomain {
        TrustDomain::new("lab.veil").unwrap()
    }

    fn bundles(cas: &[&DevCa]) -> Bundles {
        let mut b = Bundles::new();
        let roots = cas.iter().flat_map(|c| c.bundle()).collect();
        b.insert(cas[0].trust_domain().clone(), roots).unwrap();
        b
    }

    #[test]
    fn issues_node_and_workload_svids_that_validate() {
        for with_intermediate in [false, true] {
            let ca = DevCa::with_options(
                td(),
                CaOptions {
                    with_intermediate,
                    ..CaOptions::default()
                },
            )
            .unwrap();
            let ttl = Duration::from_secs(600);
            let node = ca.issue_node_svid("node-a", ttl).unwrap();
            assert_eq!(
                node.spiffe_id().as_str(),
                "spiffe://lab.veil/veil/node/node-a"
            );
            assert_eq!(node.cert_chain().len(), 1 + with_intermediate as usize);
            let wl = ca.issue_workload_svid("shop", "frontend", ttl).unwrap();
            assert_eq!(
                wl.spiffe_id().as_str(),
                "spiffe://lab.veil/ns/shop/sa/frontend"
            );
            let b = bundles(&[&ca]);
            for svid in [&node, &wl] {
                let v = validate_x509_svid(svid.cert_chain(), &b, SystemTime::now()).unwrap();
                assert_eq!(&v.spiffe_id, svid.spiffe_id());
                assert_eq!(v.serial, svid.serial());
                assert_eq!(v.serial.len(), 32);
                let life = svid.not_after().duration_since(svid.not_before()).unwrap();
                assert_eq!(life, ttl);
            }
        }
    }

    #[test]
    fn serials_are_unique() {
        let ca = DevCa::new(td()).unwrap();
        let serials: std::collections::BTreeSet<String> = (0..20)
            .map(|_| {
                ca.issue_node_svid("n", Duration::from_secs(60))
                    .unwrap()
                    .serial()
                    .to_owned()
            })
            .collect();
        assert_eq!(serials.len(), 20);
    }

    #[test]
    fn rotation_makes_a_distinct_root_for_the_same_trust_domain() {
        let old = DevCa::new(td()).unwrap();
        let new = old.rotate().unwrap();
        assert_eq!(new.trust_domain(), old.trust_domain());
        assert_eq!(new.generation(), 2);
        assert_ne!(new.root(), old.root());
        let svid = old.issue_node_svid("n", Duration::from_secs(60)).unwrap();
        let both = bundles(&[&new, &old]);
        assert!(validate_x509_svid(svid.cert_chain(), &both, SystemTime::now()).is_ok());
        let only_new = bundles(&[&new]);
        assert!(validate_x509_svid(svid.cert_chain(), &only_new, SystemTime::now()).is_err());
    }

    #[test]
    fn write_pki_writes_pem_with_private_key_mode() {
        let dir = std::env::temp_dir().join(format!("veil-certs-dev-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let ca = DevCa::new(td()).unwrap();
        let svid = ca
            .issue_node_svid("node-a", Duration::from_secs(60))
            .unwrap();
        let files = write_pki(&dir, &ca.bundle(), &[("node-a", &svid)]).unwrap();
        assert_eq!(files.len(), 3);
        let bundle = fs::read_to_string(dir.join("bundle.pem")).unwrap();
        assert!(bundle.starts_with("-----BEGIN CERTIFICATE-----"));
        let key = fs::read_to_string(dir.join("node-a/key.pem")).unwrap();
        assert!(key.contains("BEGIN PRIVATE KEY"));
        let mode = {
            use std::os::unix::fs::PermissionsExt;
            fs::metadata(dir.join("node-a/key.pem"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode, 0o600);
        let parsed = pem::parse(fs::read(dir.join("node-a/svid.pem")).unwrap()).unwrap();
        assert_eq!(parsed.contents(), svid.leaf().as_ref());
        assert!(matches!(
            write_pki(&dir, &ca.bundle(), &[("../x", &svid)]),
            Err(Error::BadName(_))
        ));
        fs::remove_dir_all(&dir).unwrap();
    }
}
