//! SPIFFE identities.
//!
//! Owns: `TrustDomain` and `SpiffeId` parsing per the SPIFFE ID specification (exact matching
//! only), trust bundles (`Bundles` values and the live, shared `BundleSet`), X.509-SVID
//! validation (`validate_x509_svid`: rustls-webpki path validation with veil's SPIFFE SAN,
//! key-usage and trust-domain rules on top), the agent's `Svid` type with a zeroizing, redacted
//! private key, selectors, and the source trait (`SvidSource` + `IdentitySnapshot`) through
//! which SVID streams reach the agent.
//!
//! Must not depend on: the agent, the transport, or any SPIRE client; it is pure validation and
//! types (tokio only for the `watch` channel type of the source trait).

mod bundle;
mod id;
mod selector;
mod source;
mod svid;

pub use bundle::{split_der_certs, BundleError, BundleSet, Bundles, Roots, TrustRoots};
pub use id::{
    IdError, SpiffeId, TrustDomain, MAX_SPIFFE_ID_LEN, MAX_TRUST_DOMAIN_LEN, SCHEME_PREFIX,
};
pub use selector::{Selector, SelectorError, SelectorSet};
pub use source::{FakeSvidSource, IdentityChange, IdentitySnapshot, SvidKey, SvidSource};
pub use svid::{validate_x509_svid, Svid, SvidError, SvidPrivateKey, ValidatedSvid, MAX_CHAIN_LEN};

/// Re-exported so users name the same DER types as this crate.
pub use rustls_pki_types::{CertificateDer, PrivateKeyDer};
