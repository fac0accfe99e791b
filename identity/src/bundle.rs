//! Trust bundles: the X.509 roots of each trust domain.
//!
//! [`Bundles`] is an immutable value (what a snapshot carries); [`BundleSet`] is the live,
//! cheaply cloned handle the agent shares between its mTLS verifiers and the identity stream,
//! updated in place (readers never block: `arc-swap`).

use std::collections::BTreeMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls_pki_types::CertificateDer;

use crate::id::TrustDomain;

/// Why a bundle was rejected.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("bundle for trust domain {0} has no root certificate")]
    Empty(TrustDomain),
    #[error(
        "bundle for trust domain {trust_domain}: root {index} is not a parsable x.509 certificate"
    )]
    Malformed {
        trust_domain: TrustDomain,
        index: usize,
        #[source]
        source: x509_parser::error::X509Error,
    },
    #[error("bundle for trust domain {trust_domain}: root {index} is not a ca certificate")]
    NotCa {
        trust_domain: TrustDomain,
        index: usize,
    },
    #[error("bundle data for trust domain {trust_domain} is not a sequence of der certificates")]
    BadConcatenation { trust_domain: TrustDomain },
}

/// Roots of one trust domain, shared.
pub type Roots = Arc<[CertificateDer<'static>]>;

/// Something that can name the roots of a trust domain.
pub trait TrustRoots {
    fn roots(&self, td: &TrustDomain) -> Option<Roots>;
}

/// An immutable map trust domain → roots.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Bundles(BTreeMap<TrustDomain, Roots>);

impl Bundles {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces the roots of `td` after checking each is a parsable CA certificate.
    pub fn insert(
        &mut self,
        td: TrustDomain,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<(), BundleError> {
        check_roots(&td, &roots)?;
        self.0.insert(td, roots.into());
        Ok(())
    }

    pub fn remove(&mut self, td: &TrustDomain) -> bool {
        self.0.remove(td).is_some()
    }

    pub fn get(&self, td: &TrustDomain) -> Option<&Roots> {
        self.0.get(td)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&TrustDomain, &Roots)> {
        self.0.iter()
    }

    pub fn trust_domains(&self) -> impl Iterator<Item = &TrustDomain> {
        self.0.keys()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl TrustRoots for Bundles {
    fn roots(&self, td: &TrustDomain) -> Option<Roots> {
        self.0.get(td).cloned()
    }
}

fn check_roots(td: &TrustDomain, roots: &[CertificateDer<'_>]) -> Result<(), BundleError> {
    if roots.is_empty() {
        return Err(BundleError::Empty(td.clone()));
    }
    for (index, der) in roots.iter().enumerate() {
        let cert = crate::svid::parse_cert(der).map_err(|source| BundleError::Malformed {
            trust_domain: td.clone(),
            index,
            source,
        })?;
        if !crate::svid::is_ca(&cert) {
            return Err(BundleError::NotCa {
                trust_domain: td.clone(),
                index,
            });
        }
    }
    Ok(())
}

/// Splits concatenated DER certificates (the Workload and Delegated Identity APIs carry
/// bundles and chains this way).
pub fn split_der_certs(
    td: &TrustDomain,
    mut data: &[u8],
) -> Result<Vec<CertificateDer<'static>>, BundleError> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let len = der_element_len(data).ok_or_else(|| BundleError::BadConcatenation {
            trust_domain: td.clone(),
        })?;
        out.push(CertificateDer::from(data[..len].to_vec()));
        data = &data[len..];
    }
    Ok(out)
}

/// Length of the DER TLV at the start of `data` (definite lengths only, as DER requires).
pub(crate) fn der_element_len(data: &[u8]) -> Option<usize> {
    if data.len() < 2 || data[0] != 0x30 {
        return None;
    }
    let first = data[1] as usize;
    let (header, len) = if first < 0x80 {
        (2, first)
    } else {
        let n = first & 0x7f;
        if n == 0 || n > 4 || data.len() < 2 + n {
            return None;
        }
        let len = data[2..2 + n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | *b as usize);
        (2 + n, len)
    };
    let total = header.checked_add(len)?;
    (total <= data.len()).then_some(total)
}

/// A live, shared bundle set. Clones share the same state.
#[derive(Clone, Default)]
pub struct BundleSet {
    inner: Arc<ArcSwap<Bundles>>,
}

impl std::fmt::Debug for BundleSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("BundleSet").field(&*self.load()).finish()
    }
}

impl BundleSet {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn from_bundles(bundles: Bundles) -> Self {
        Self {
            inner: Arc::new(ArcSwap::from_pointee(bundles)),
        }
    }

    /// The current value; later updates do not change what was loaded.
    pub fn load(&self) -> Arc<Bundles> {
        self.inner.load_full()
    }

    /// Sets or replaces the roots of one trust domain.
    pub fn set_roots(
        &self,
        td: TrustDomain,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<(), BundleError> {
        check_roots(&td, &roots)?;
        let roots: Roots = roots.into();
        self.inner.rcu(|cur| {
            let mut next = Bundles::clone(cur);
            next.0.insert(td.clone(), roots.clone());
            next
        });
        Ok(())
    }

    /// Removes a trust domain; returns whether it was present.
    pub fn remove(&self, td: &TrustDomain) -> bool {
        let mut was = false;
        self.inner.rcu(|cur| {
            let mut next = Bundles::clone(cur);
            was = next.0.remove(td).is_some();
            next
        });
        was
    }

    /// Replaces everything (a complete bundle update from a stream).
    pub fn replace(&self, bundles: Bundles) {
        self.inner.store(Arc::new(bundles));
    }
}

impl TrustRoots for BundleSet {
    fn roots(&self, td: &TrustDomain) -> Option<Roots> {
        self.inner.load().0.get(td).cloned()
    }
}

impl<T: TrustRoots + ?Sized> TrustRoots for Arc<T> {
    fn roots(&self, td: &TrustDomain) -> Option<Roots> {
        (**self).roots(td)
    }
}
