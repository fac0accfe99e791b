//! Development PKI.
//!
//! Will own: a CA per trust domain (rcgen), intermediates, node and workload X.509-SVIDs with
//! SPIFFE URI SANs, and deliberately bad variants (expired, not yet valid, wrong trust domain,
//! two URI SANs, CA leaf, wrong key usage) for tests; writing a PKI to disk.
//!
//! Must not depend on: the agent or the SPIRE clients. Never used for production identities.
